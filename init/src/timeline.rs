//! CLOCK_BOOTTIME stamps of a boot's milestones, carried in READY and printed at hand-off:
//! `entry=2.190s config=2.195s host=2.320s … handoff=2.512s`.

use std::borrow::Cow;
use std::time::Duration;

use bootlace_contract::takeover::Stamp;

/// The milestones so far, in order.
#[derive(Debug, Default, Clone)]
pub struct Timeline {
    stamps: Vec<(Cow<'static, str>, Duration)>,
}

impl Timeline {
    /// Records a milestone at `at` (CLOCK_BOOTTIME).
    pub fn mark(&mut self, what: &'static str, at: Duration) {
        self.stamps.push((Cow::Borrowed(what), at));
    }

    /// The timeline handed over by a previous init.
    pub fn from_stamps(stamps: &[Stamp]) -> Timeline {
        Timeline {
            stamps: stamps
                .iter()
                .map(|s| (Cow::Owned(s.name.clone()), Duration::from_nanos(s.ns)))
                .collect(),
        }
    }

    /// The milestones, to hand over.
    pub fn to_stamps(&self) -> Vec<Stamp> {
        self.stamps
            .iter()
            .map(|(w, t)| Stamp {
                name: w.to_string(),
                ns: u64::try_from(t.as_nanos()).unwrap_or(u64::MAX),
            })
            .collect()
    }

    /// The stamp of the latest milestone named `what`.
    pub fn at(&self, what: &str) -> Option<Duration> {
        self.stamps
            .iter()
            .rev()
            .find(|(w, _)| w == what)
            .map(|(_, t)| *t)
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
        assert_eq!(t.at("entry"), Some(Duration::from_millis(2190)));
        assert_eq!(t.at("ready"), None);
        let mut again = Timeline::from_stamps(&t.to_stamps());
        again.mark("init_takeover", Duration::from_millis(2600));
        assert_eq!(
            again.render(),
            "entry=2.190s handoff=2.512s init_takeover=2.600s"
        );
    }
}
