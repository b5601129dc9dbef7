//! The restart policy of a task and the bookkeeping of its guests: which to start, which to
//! restart and when, and how each ended. Pure: the caller passes the time, starts the VMs it
//! is told to and reports back, so every decision is tested with a fake clock
//! ([`Supervisor`]).
//!
//! The policies are the ones Docker's `--restart` and systemd's `Restart=` users expect:
//! `no` (never), `on-failure` (when a run ends with a non-zero code: a guest status other than
//! 0, no status, a timeout, a VM that could not run) and `always` (whenever a run ends), with
//! at most `max` restarts per guest when `max` is given, each after `delay`. A guest stopped
//! by the host (Ctrl-C, SIGTERM) is never restarted.

use std::time::{Duration, Instant};

/// When a guest is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Never (the default).
    #[default]
    No,
    /// When its run ended with a non-zero code.
    OnFailure,
    /// Whenever its run ended.
    Always,
}

impl Policy {
    /// `no`, `on-failure` or `always`.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::No => "no",
            Policy::OnFailure => "on-failure",
            Policy::Always => "always",
        }
    }
}

/// A task's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// When.
    pub policy: Policy,
    /// At most this many restarts per guest (`None`: no limit).
    pub max: Option<u32>,
    /// The wait between a run's end and the restart.
    pub delay: Duration,
}

impl Restart {
    /// Whether a guest restarted `restarts` times so far, whose run just ended with exit code
    /// `code` (bootlace-vm's: the guest's status, 123, 124, 125), is restarted.
    pub fn restarts(&self, code: u8, restarts: u32) -> bool {
        let wanted = match self.policy {
            Policy::No => false,
            Policy::OnFailure => code != 0,
            Policy::Always => true,
        };
        wanted && self.max.is_none_or(|m| restarts < m)
    }
}

/// Where a guest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Not started yet (waiting for a `--parallel` slot).
    Waiting,
    /// Its VM runs; it has not reported READY in this run.
    Booting,
    /// Its VM runs and it reported READY.
    Ready,
    /// Its run ended; it starts again after the policy's delay.
    Restarting,
    /// Its last run ended with code 0 and it is not restarted.
    Exited,
    /// Its last run ended with a non-zero code and it is not restarted.
    Failed,
    /// Stopped by the host (Ctrl-C, SIGTERM) before it ended by itself.
    Stopped,
}

impl State {
    /// The word the table shows.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Booting => "booting",
            State::Ready => "ready",
            State::Restarting => "restarting",
            State::Exited => "exited",
            State::Failed => "failed",
            State::Stopped => "stopped",
        }
    }

    /// Its VM runs.
    pub fn running(self) -> bool {
        matches!(self, State::Booting | State::Ready)
    }

    /// Nothing more happens to it.
    pub fn settled(self) -> bool {
        matches!(self, State::Exited | State::Failed | State::Stopped)
    }
}

/// One guest's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Where it is.
    pub state: State,
    /// Runs started.
    pub runs: u32,
    /// When its current (or last) run started.
    pub started: Option<Instant>,
    /// Time from its latest run's start to READY, if that run reported READY.
    pub ready_after: Option<Duration>,
    /// The exit code of its last run that ended.
    pub last_code: Option<u8>,
    /// When it is restarted (state [`State::Restarting`]).
    pub restart_at: Option<Instant>,
}

impl Slot {
    /// Restarts so far.
    pub fn restarts(&self) -> u32 {
        self.runs.saturating_sub(1)
    }
}

/// What happened when a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterEnd {
    /// Restarted at this time (restart number `nth`).
    Restart {
        /// When.
        at: Instant,
        /// Which restart it will be (1 for the first).
        nth: u32,
    },
    /// Settled in this state.
    Settled(State),
}

/// The guests of a task and the policy that restarts them.
#[derive(Debug, Clone)]
pub struct Supervisor {
    restart: Restart,
    parallel: usize,
    stopping: bool,
    slots: Vec<Slot>,
}

impl Supervisor {
    /// `count` guests, all waiting; at most `parallel` running at once (at least 1).
    pub fn new(count: usize, restart: Restart, parallel: usize) -> Supervisor {
        let slot = Slot {
            state: State::Waiting,
            runs: 0,
            started: None,
            ready_after: None,
            last_code: None,
            restart_at: None,
        };
        Supervisor {
            restart,
            parallel: parallel.max(1),
            stopping: false,
            slots: vec![slot; count],
        }
    }

    /// The guests' records, in order.
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// The guests to start at `now`, in order (marked booting, their run counted): waiting
    /// ones and those whose restart time has come, while fewer than `parallel` run.
    pub fn due(&mut self, now: Instant) -> Vec<usize> {
        if self.stopping {
            return Vec::new();
        }
        let mut running = self.slots.iter().filter(|s| s.state.running()).count();
        let mut out = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate() {
            if running >= self.parallel {
                break;
            }
            let due = match s.state {
                State::Waiting => true,
                State::Restarting => s.restart_at.is_some_and(|t| t <= now),
                _ => false,
            };
            if due {
                s.state = State::Booting;
                s.runs += 1;
                s.started = Some(now);
                s.ready_after = None;
                s.restart_at = None;
                running += 1;
                out.push(i);
            }
        }
        out
    }

    /// Guest `i` reported READY at `now` (counted once per run, while it runs).
    pub fn ready(&mut self, i: usize, now: Instant) -> Option<Duration> {
        let s = self.slots.get_mut(i)?;
        if s.state != State::Booting {
            return None;
        }
        s.state = State::Ready;
        let after = now.saturating_duration_since(s.started?);
        s.ready_after = Some(after);
        Some(after)
    }

    /// Guest `i`'s run ended at `now` with exit code `code`; `stopped`: the host stopped it.
    pub fn ended(&mut self, i: usize, code: u8, stopped: bool, now: Instant) -> AfterEnd {
        let restart = self.restart;
        let stopping = self.stopping;
        let Some(s) = self.slots.get_mut(i) else {
            return AfterEnd::Settled(State::Failed);
        };
        s.last_code = Some(code);
        if stopped || stopping {
            s.state = State::Stopped;
            return AfterEnd::Settled(State::Stopped);
        }
        if restart.restarts(code, s.restarts()) {
            let at = now + restart.delay;
            s.state = State::Restarting;
            s.restart_at = Some(at);
            return AfterEnd::Restart {
                at,
                nth: s.restarts() + 1,
            };
        }
        s.state = if code == 0 {
            State::Exited
        } else {
            State::Failed
        };
        AfterEnd::Settled(s.state)
    }

    /// Stop everything: nothing more starts; guests not running are stopped now, the running
    /// ones when their runs end.
    pub fn stop(&mut self) {
        self.stopping = true;
        for s in &mut self.slots {
            if matches!(s.state, State::Waiting | State::Restarting) {
                s.state = State::Stopped;
                s.restart_at = None;
            }
        }
    }

    /// Whether [`Supervisor::stop`] was called.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    /// Every guest has settled: nothing runs and nothing will.
    pub fn finished(&self) -> bool {
        self.slots.iter().all(|s| s.state.settled())
    }

    /// The next restart time, if a restart is pending.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.slots.iter().filter_map(|s| s.restart_at).min()
    }

    /// The guests that failed: their last run ended with a non-zero code and they are not
    /// restarted (a guest stopped by the host is not one, whatever its code).
    pub fn failed(&self) -> Vec<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == State::Failed)
            .map(|(i, _)| i)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(policy: Policy, max: Option<u32>) -> Restart {
        Restart {
            policy,
            max,
            delay: Duration::from_secs(1),
        }
    }

    #[test]
    fn the_policies() {
        let no = policy(Policy::No, None);
        let on_failure = policy(Policy::OnFailure, Some(2));
        let always = policy(Policy::Always, None);
        for code in [0, 1, 3, 123, 124, 125] {
            assert!(!no.restarts(code, 0), "no restarts nothing");
            assert!(always.restarts(code, 1000), "always restarts {code}");
        }
        assert!(!on_failure.restarts(0, 0), "a success is not restarted");
        for code in [1, 3, 71, 123, 124, 125] {
            assert!(on_failure.restarts(code, 0));
            assert!(on_failure.restarts(code, 1));
            assert!(!on_failure.restarts(code, 2), "max 2");
        }
        assert!(!policy(Policy::Always, Some(0)).restarts(0, 0));
        assert!(policy(Policy::OnFailure, None).restarts(1, u32::MAX - 1));
    }

    /// A fake clock: `t(s)` is `s` seconds after a fixed start.
    fn clock() -> impl Fn(u64) -> Instant {
        let base = Instant::now();
        move |s| base + Duration::from_secs(s)
    }

    #[test]
    fn on_failure_with_a_max_restarts_then_reports() {
        let t = clock();
        let mut sup = Supervisor::new(3, policy(Policy::OnFailure, Some(1)), 8);
        assert_eq!(sup.due(t(0)), [0, 1, 2]);
        assert_eq!(sup.due(t(0)), Vec::<usize>::new(), "started once");
        assert_eq!(sup.ready(1, t(3)), Some(Duration::from_secs(3)));
        assert_eq!(sup.ready(1, t(4)), None, "READY counts once per run");
        assert_eq!(sup.slots()[1].state, State::Ready);
        assert_eq!(
            sup.ended(0, 0, false, t(5)),
            AfterEnd::Settled(State::Exited)
        );
        assert_eq!(
            sup.ended(1, 0, false, t(5)),
            AfterEnd::Settled(State::Exited)
        );
        // Guest 3 fails: restarted once, after the delay...
        assert_eq!(
            sup.ended(2, 3, false, t(5)),
            AfterEnd::Restart { at: t(6), nth: 1 }
        );
        assert_eq!(sup.next_wakeup(), Some(t(6)));
        assert!(sup.due(t(5)).is_empty(), "not before the delay");
        assert_eq!(sup.due(t(6)), [2]);
        let s = &sup.slots()[2];
        assert_eq!((s.state, s.runs, s.ready_after), (State::Booting, 2, None));
        assert!(!sup.finished());
        // ... fails again: reported.
        assert_eq!(
            sup.ended(2, 3, false, t(9)),
            AfterEnd::Settled(State::Failed)
        );
        assert!(sup.finished());
        assert_eq!(sup.failed(), [2]);
        assert_eq!(sup.slots()[2].last_code, Some(3));
        assert_eq!(sup.slots()[2].restarts(), 1);
    }

    #[test]
    fn parallel_limits_the_guests_running_at_once() {
        let t = clock();
        let mut sup = Supervisor::new(3, policy(Policy::No, None), 2);
        assert_eq!(sup.due(t(0)), [0, 1]);
        assert!(sup.due(t(1)).is_empty());
        assert_eq!(sup.slots()[2].state, State::Waiting);
        sup.ended(1, 0, false, t(2));
        assert_eq!(sup.due(t(2)), [2]);
        assert_eq!(sup.slots()[2].started, Some(t(2)));
        sup.ended(0, 124, false, t(3));
        sup.ended(2, 0, false, t(4));
        assert!(sup.finished());
        assert_eq!(sup.failed(), [0], "a timeout is a failure");
    }

    #[test]
    fn always_restarts_until_stopped() {
        let t = clock();
        let mut sup = Supervisor::new(2, policy(Policy::Always, None), 8);
        sup.due(t(0));
        for k in 1..=5u32 {
            let end = t(u64::from(k) * 10);
            assert!(
                matches!(sup.ended(0, 0, false, end), AfterEnd::Restart { nth, .. } if nth == k)
            );
            assert_eq!(sup.due(end + Duration::from_secs(1)), [0]);
        }
        sup.ended(0, 0, false, t(100));
        assert_eq!(sup.slots()[0].state, State::Restarting);
        // Ctrl-C: the one waiting to restart is stopped at once, the running one when it ends.
        sup.stop();
        assert_eq!(sup.slots()[0].state, State::Stopped);
        assert_eq!(sup.slots()[1].state, State::Booting);
        assert!(!sup.finished());
        assert!(sup.due(t(200)).is_empty(), "nothing starts once stopping");
        assert_eq!(
            sup.ended(1, 123, true, t(101)),
            AfterEnd::Settled(State::Stopped)
        );
        assert!(sup.finished());
        assert!(sup.failed().is_empty(), "stopped guests did not fail");
        assert_eq!(sup.next_wakeup(), None);
    }

    #[test]
    fn stop_before_a_guest_starts() {
        let t = clock();
        let mut sup = Supervisor::new(2, policy(Policy::OnFailure, None), 1);
        assert_eq!(sup.due(t(0)), [0]);
        sup.stop();
        assert_eq!(sup.slots()[1].state, State::Stopped);
        assert_eq!(sup.slots()[1].runs, 0);
        // A run that ends on its own during the stop is stopped too (not restarted).
        assert_eq!(
            sup.ended(0, 1, false, t(1)),
            AfterEnd::Settled(State::Stopped)
        );
        assert!(sup.finished());
    }
}
