//! Shared helpers of the benchmarks: statistics and the markdown report.

use std::time::Duration;

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
