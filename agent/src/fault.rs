//! `--fault KIND[=ARG]`: the host agent's fault injection, as flags for `bootlace-agent` and
//! `bootlace-vm`, so a person or a test can make the host misbehave on purpose.

use std::time::Duration;

use crate::host::Faults;

/// The kinds, one line each (a macro so that both constants below are built from one text).
macro_rules! fault_kinds {
    () => {
        "\
refuse[=N]        close the first N connections at once (default: every one)
stall             never acknowledge anything
delay=MS          wait MS milliseconds before every frame the host writes
drop-after=BYTES  close the connection after BYTES bytes of the bundle
corrupt           flip one byte of the bundle on the wire (the announced sha256 stays true)
lie-size=BYTES    announce SIZE=BYTES in the bundle header, then send the true bytes
duplicate-acks    send every ack twice
drop-acks=N       leave the first N guest messages (HELLO excepted) unacknowledged"
    };
}

/// The long help of a `--fault` flag: what it does, then [`FAULT_HELP`].
pub const FAULT_LONG_HELP: &str = concat!(
    "Misbehave on purpose, to test guests (repeatable). KIND[=ARG] is one of:\n\n",
    fault_kinds!()
);

/// The kinds, one line each, for error messages.
pub const FAULT_HELP: &str = fault_kinds!();

/// One `--fault KIND[=ARG]` flag, parsed (see [`FAULT_HELP`]); [`Faults`] collects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `refuse[=N]`: close the first N connections at once (`u32::MAX`: every one).
    Refuse(u32),
    /// `stall`: never acknowledge anything.
    Stall,
    /// `delay=MS`: wait before every frame the host writes.
    Delay(Duration),
    /// `drop-after=BYTES`: close the connection after this many bundle bytes.
    DropAfter(u64),
    /// `corrupt`: flip one byte of the bundle on the wire.
    Corrupt,
    /// `lie-size=BYTES`: announce this size in the bundle header.
    LieSize(u64),
    /// `duplicate-acks`: send every ack twice.
    DuplicateAcks,
    /// `drop-acks=N`: leave the first N guest messages (HELLO excepted) unacknowledged.
    DropAcks(u32),
}

/// Why a `--fault KIND[=ARG]` flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// The kind is not one of [`FAULT_HELP`].
    #[error("unknown fault {0:?}; the faults are:\n{FAULT_HELP}")]
    Unknown(String),
    /// The kind needs `=ARG` and has none.
    #[error("fault {kind:?} needs ={what}")]
    MissingArgument {
        /// The kind.
        kind: String,
        /// What the argument counts.
        what: &'static str,
    },
    /// The argument is not a number.
    #[error("fault {kind:?}: {value:?} is not a number of {what}")]
    NotANumber {
        /// The kind.
        kind: String,
        /// The argument given.
        value: String,
        /// What the argument counts.
        what: &'static str,
    },
    /// The number does not fit.
    #[error("fault {kind:?}: too many {what}")]
    TooMany {
        /// The kind.
        kind: String,
        /// What the argument counts.
        what: &'static str,
    },
    /// The kind takes no argument and got one.
    #[error("fault {kind:?} takes no argument (got {value:?})")]
    UnexpectedArgument {
        /// The kind.
        kind: String,
        /// The argument given.
        value: String,
    },
}

impl std::str::FromStr for Fault {
    type Err = FaultError;

    fn from_str(spec: &str) -> Result<Fault, FaultError> {
        let (kind, arg) = match spec.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        let number = |what: &'static str| -> Result<u64, FaultError> {
            let a = arg.ok_or_else(|| FaultError::MissingArgument {
                kind: kind.to_owned(),
                what,
            })?;
            a.parse().map_err(|_| FaultError::NotANumber {
                kind: kind.to_owned(),
                value: a.to_owned(),
                what,
            })
        };
        let count = |what: &'static str| -> Result<u32, FaultError> {
            u32::try_from(number(what)?).map_err(|_| FaultError::TooMany {
                kind: kind.to_owned(),
                what,
            })
        };
        let plain = |fault: Fault| -> Result<Fault, FaultError> {
            match arg {
                Some(a) => Err(FaultError::UnexpectedArgument {
                    kind: kind.to_owned(),
                    value: a.to_owned(),
                }),
                None => Ok(fault),
            }
        };
        match kind {
            "refuse" if arg.is_none() => Ok(Fault::Refuse(u32::MAX)),
            "refuse" => count("connections").map(Fault::Refuse),
            "stall" => plain(Fault::Stall),
            "delay" => Ok(Fault::Delay(Duration::from_millis(number("milliseconds")?))),
            "drop-after" => number("bytes").map(Fault::DropAfter),
            "corrupt" => plain(Fault::Corrupt),
            "lie-size" => number("bytes").map(Fault::LieSize),
            "duplicate-acks" => plain(Fault::DuplicateAcks),
            "drop-acks" => count("messages").map(Fault::DropAcks),
            other => Err(FaultError::Unknown(other.to_owned())),
        }
    }
}

/// The flag as a person writes it: `refuse`, `refuse=2`, `delay=150`, `corrupt`, ...
impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Refuse(u32::MAX) => f.write_str("refuse"),
            Fault::Refuse(n) => write!(f, "refuse={n}"),
            Fault::Stall => f.write_str("stall"),
            Fault::Delay(d) => write!(f, "delay={}", d.as_millis()),
            Fault::DropAfter(n) => write!(f, "drop-after={n}"),
            Fault::Corrupt => f.write_str("corrupt"),
            Fault::LieSize(n) => write!(f, "lie-size={n}"),
            Fault::DuplicateAcks => f.write_str("duplicate-acks"),
            Fault::DropAcks(n) => write!(f, "drop-acks={n}"),
        }
    }
}

impl Faults {
    /// Sets one fault (a later flag of the same kind wins).
    pub fn set(&mut self, fault: Fault) {
        match fault {
            Fault::Refuse(n) => self.refuse_connections = n,
            Fault::Stall => self.stall_acks = true,
            Fault::Delay(d) => self.delay = Some(d),
            Fault::DropAfter(n) => self.drop_bundle_after = Some(n),
            Fault::Corrupt => self.corrupt_bundle = true,
            Fault::LieSize(n) => self.announce_size = Some(n),
            Fault::DuplicateAcks => self.duplicate_acks = true,
            Fault::DropAcks(n) => self.drop_acks = n,
        }
    }

    /// Adds one `KIND[=ARG]` fault (see [`FAULT_HELP`]).
    pub fn add(&mut self, spec: &str) -> Result<(), FaultError> {
        self.set(spec.parse()?);
        Ok(())
    }

    /// Faults from a list of `KIND[=ARG]` flags.
    pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<Faults, FaultError> {
        let mut f = Faults::default();
        for s in specs {
            f.add(s.as_ref())?;
        }
        Ok(f)
    }

    /// Whether any fault is set.
    pub fn any(&self) -> bool {
        *self != Faults::default()
    }
}

impl FromIterator<Fault> for Faults {
    fn from_iter<I: IntoIterator<Item = Fault>>(iter: I) -> Faults {
        let mut f = Faults::default();
        for fault in iter {
            f.set(fault);
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_long_help_lists_every_kind() {
        assert!(FAULT_LONG_HELP.ends_with(FAULT_HELP));
    }

    #[test]
    fn every_kind_parses_and_bad_ones_are_named() {
        let f = Faults::parse_all(&[
            "refuse=2",
            "stall",
            "delay=150",
            "drop-after=4096",
            "corrupt",
            "lie-size=99",
            "duplicate-acks",
            "drop-acks=1",
        ])
        .expect("valid");
        assert_eq!(
            f,
            Faults {
                corrupt_bundle: true,
                drop_bundle_after: Some(4096),
                stall_acks: true,
                refuse_connections: 2,
                delay: Some(Duration::from_millis(150)),
                announce_size: Some(99),
                duplicate_acks: true,
                drop_acks: 1,
            }
        );
        assert_eq!(
            Faults::parse_all(&["refuse"])
                .expect("valid")
                .refuse_connections,
            u32::MAX
        );
        assert!(!Faults::default().any() && f.any());
        for spec in ["refuse", "refuse=2", "delay=150", "drop-acks=1", "corrupt"] {
            let fault: Fault = spec.parse().expect(spec);
            assert_eq!(fault.to_string(), spec);
        }
        for (bad, want) in [
            ("explode", "unknown fault \"explode\""),
            ("delay", "needs =milliseconds"),
            ("delay=soon", "not a number"),
            ("corrupt=1", "takes no argument"),
            ("drop-acks=99999999999", "too many"),
        ] {
            let e = Faults::parse_all(&[bad]).expect_err(bad).to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
