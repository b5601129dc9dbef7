//! `--fault KIND[=ARG]`: the host agent's fault injection, as flags for `bootlace-agent` and
//! `bootlace-vm`, so a person or a test can make the host misbehave on purpose.

use std::time::Duration;

use crate::host::Faults;

/// The long help of a `--fault` flag: what it does, then [`FAULT_HELP`].
pub const FAULT_LONG_HELP: &str = "\
Misbehave on purpose, to test guests (repeatable). KIND[=ARG] is one of:

refuse[=N]        close the first N connections at once (default: every one)
stall             never acknowledge anything
delay=MS          wait MS milliseconds before every frame the host writes
drop-after=BYTES  close the connection after BYTES bytes of the bundle
corrupt           flip one byte of the bundle on the wire (the announced sha256 stays true)
lie-size=BYTES    announce SIZE=BYTES in the bundle header, then send the true bytes
duplicate-acks    send every ack twice
drop-acks=N       leave the first N guest messages (HELLO excepted) unacknowledged";

/// The kinds, one line each, for error messages.
pub const FAULT_HELP: &str = "\
refuse[=N]        close the first N connections at once (default: every one)
stall             never acknowledge anything
delay=MS          wait MS milliseconds before every frame the host writes
drop-after=BYTES  close the connection after BYTES bytes of the bundle
corrupt           flip one byte of the bundle on the wire (the announced sha256 stays true)
lie-size=BYTES    announce SIZE=BYTES in the bundle header, then send the true bytes
duplicate-acks    send every ack twice
drop-acks=N       leave the first N guest messages (HELLO excepted) unacknowledged";

impl Faults {
    /// Adds one `KIND[=ARG]` fault (see [`FAULT_HELP`]).
    pub fn add(&mut self, spec: &str) -> Result<(), String> {
        let (kind, arg) = match spec.split_once('=') {
            Some((k, a)) => (k, Some(a)),
            None => (spec, None),
        };
        let number = |what: &str| -> Result<u64, String> {
            let a = arg.ok_or_else(|| format!("fault {kind:?} needs ={what}"))?;
            a.parse()
                .map_err(|_| format!("fault {kind:?}: {a:?} is not a number of {what}"))
        };
        let none = || -> Result<(), String> {
            match arg {
                Some(a) => Err(format!("fault {kind:?} takes no argument (got {a:?})")),
                None => Ok(()),
            }
        };
        let count = |what: &str| -> Result<u32, String> {
            u32::try_from(number(what)?).map_err(|_| format!("fault {kind:?}: too many {what}"))
        };
        match kind {
            "refuse" => {
                self.refuse_connections = match arg {
                    None => u32::MAX,
                    Some(_) => count("connections")?,
                }
            }
            "stall" => {
                none()?;
                self.stall_acks = true;
            }
            "delay" => self.delay = Some(Duration::from_millis(number("milliseconds")?)),
            "drop-after" => self.drop_bundle_after = Some(number("bytes")?),
            "corrupt" => {
                none()?;
                self.corrupt_bundle = true;
            }
            "lie-size" => self.announce_size = Some(number("bytes")?),
            "duplicate-acks" => {
                none()?;
                self.duplicate_acks = true;
            }
            "drop-acks" => self.drop_acks = count("messages")?,
            other => {
                return Err(format!(
                    "unknown fault {other:?}; the faults are:\n{FAULT_HELP}"
                ))
            }
        }
        Ok(())
    }

    /// Faults from a list of `KIND[=ARG]` flags.
    pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<Faults, String> {
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
        for (bad, want) in [
            ("explode", "unknown fault \"explode\""),
            ("delay", "needs =milliseconds"),
            ("delay=soon", "not a number"),
            ("corrupt=1", "takes no argument"),
            ("drop-acks=99999999999", "too many"),
        ] {
            let e = Faults::parse_all(&[bad]).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
