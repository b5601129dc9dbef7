//! Shared helpers of the benchmarks: the boot manifest, statistics, and the command-line
//! conventions every bench binary follows ([`Exit`], [`EXIT_CODES_HELP`], [`parse_args`]).

use std::process::ExitCode;
use std::time::Duration;

pub mod fleet;

/// The exit codes of the bench binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The benchmark ran and printed its report.
    Success = 0,
    /// The benchmark ran, printed its report, and something it measured failed (e.g. a guest).
    Failed = 1,
    /// The command line was refused (clap's usage error).
    Usage = 2,
    /// The benchmark could not run: setup failed (a tool or an artifact missing, not root, a
    /// VM that did not reach READY).
    Error = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The exit codes as a bench binary's `--help` lists them; [`Exit`] holds the numbers.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the benchmark ran; the report is on stdout
  1  the benchmark ran, and something it measured failed (the report says what)
  2  usage error
  3  the benchmark could not run (setup failed; the message says why)";

/// Parses the command line; on `--help` or `--version` (printed, exit 0) or a usage error
/// (printed, [`Exit::Usage`]), the code to exit with instead.
pub fn parse_args<P: clap::Parser>() -> Result<P, Exit> {
    P::try_parse().map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            Exit::Usage
        } else {
            Exit::Success
        }
    })
}

/// The exit code of a benchmark's result: `Ok(true)` success, `Ok(false)` a measured failure,
/// `Err` could not run (the error chain printed on stderr after `name: error:`).
pub fn finish(name: &str, result: anyhow::Result<bool>) -> ExitCode {
    match result {
        Ok(true) => Exit::Success.into(),
        Ok(false) => Exit::Failed.into(),
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            Exit::Error.into()
        }
    }
}

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
    (percentile_ms(&ms, 0.5), percentile_ms(&ms, 0.95))
}

/// The nearest-rank `p` percentile (0 < p <= 1) of sorted milliseconds; NaN when empty.
pub fn percentile_ms(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return f64::NAN;
    }
    let i = ((p * sorted_ms.len() as f64).ceil() as usize).clamp(1, sorted_ms.len()) - 1;
    sorted_ms.get(i).copied().unwrap_or(f64::NAN)
}

/// The bootlace-agent binary to bench: `given` (`--agent`, `$BOOTLACE_AGENT`), else the one
/// next to this binary, else `target/release/bootlace-agent`.
pub fn agent_binary(given: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("bootlace-agent"));
        }
    }
    candidates.push(std::path::PathBuf::from("target/release/bootlace-agent"));
    candidates.into_iter().find(|p| p.is_file()).context(
        "bootlace-agent not found: build it (`cargo build --release -p bootlace-agent`) \
         or give --agent (or BOOTLACE_AGENT)",
    )
}

/// KiB as MiB with one decimal, `?` when unknown.
pub fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "?".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0))
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
