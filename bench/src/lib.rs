//! Shared helpers of the benchmarks: statistics and the markdown report.

use std::time::Duration;

/// The 10-step manifest every bootlace boot scenario applies: hostname, env, sysctl, a tmpfs
/// /etc seeded with the image's, a directory, three files, a symlink, one command.
pub const MANIFEST: &str = r#"
version = 1
hostname = "bench-host"
env = { APP_MODE = "bench" }
sysctl = { "kernel.domainname" = "bench" }

[[mounts]]
type = "tmpfs"
path = "/etc"

[[directories]]
path = "/var/lib/app"
mode = 0o750

[[files]]
path = "/etc/app.conf"
content = "listen = 8080\n"

[[files]]
path = "/etc/app.env"
content = "MODE=bench\n"

[[files]]
path = "/etc/app.key"
source = "files/app.key"
mode = 0o600

[[symlinks]]
path = "/etc/app.current"
target = "app.conf"

[[run]]
name = "trivial"
command = ["/bin/true"]
"#;

/// [`MANIFEST`] without its hostname and sysctl lines: the same work, safe to apply on the
/// host itself (`bench-native`).
pub fn manifest_without_host_changes() -> String {
    MANIFEST
        .lines()
        .filter(|l| !l.starts_with("hostname") && !l.starts_with("sysctl"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Median and 95th percentile of a sample (nearest-rank), in milliseconds.
pub fn median_p95(samples: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    if ms.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let rank = |p: f64| {
        let i = ((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1;
        ms[i]
    };
    (rank(0.5), rank(0.95))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s: Vec<Duration> = (1..=20).map(Duration::from_millis).collect();
        assert_eq!(median_p95(&s), (10.0, 19.0));
        assert_eq!(median_p95(&[Duration::from_millis(7)]), (7.0, 7.0));
        assert!(median_p95(&[]).0.is_nan());
    }
}
