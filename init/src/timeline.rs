//! CLOCK_BOOTTIME stamps of a boot's milestones, carried in READY and printed at hand-off:
//! `entry=2.190s config=2.195s host=2.320s … handoff=2.512s`.

use std::time::Duration;

/// The milestones so far, in order.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    stamps: Vec<(&'static str, Duration)>,
}

impl Timeline {
    /// Records a milestone at `at` (CLOCK_BOOTTIME).
    pub fn mark(&mut self, what: &'static str, at: Duration) {
        self.stamps.push((what, at));
    }

    /// The stamp of the latest milestone (zero before the first).
    pub fn last(&self) -> Duration {
        self.stamps.last().map_or(Duration::ZERO, |(_, t)| *t)
    }

    /// `entry=0.912s config=0.915s … handoff=0.950s`.
    pub fn render(&self) -> String {
        self.stamps
            .iter()
            .map(|(w, t)| format!("{w}={}.{:03}s", t.as_secs(), t.subsec_millis()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_in_order() {
        let mut t = Timeline::default();
        assert_eq!(t.last(), Duration::ZERO);
        t.mark("entry", Duration::from_millis(2190));
        t.mark("handoff", Duration::from_millis(2512));
        assert_eq!(t.last(), Duration::from_millis(2512));
        assert_eq!(t.render(), "entry=2.190s handoff=2.512s");
    }
}
