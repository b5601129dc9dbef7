//! Handing PID 1 over to a newer bootlace-init (the manifest's `[init]`): what the running init
//! and the newer one agree on — the self-check's command and answer, the command line of the
//! exec, and the state handed over (a small TOML file on `/run`).
//!
//! The running init copies the newer one to [`NEXT_INIT_PATH`], runs
//! `NEXT_INIT_PATH takeover-check` and expects one line, `bootlace-init <version> takeover
//! <state versions…>`, and exit status 0 within the manifest's deadline; then it writes a
//! [`Handover`] to [`STATE_PATH`] and executes `NEXT_INIT_PATH --takeover STATE_PATH --
//! <the kernel's arguments for init>` as PID 1. The newer init resumes where the running one
//! stopped: the bootstrap is mounted, the manifest not yet applied.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// Where the newer init is copied out of the bundle (the bundle is unmounted later, and an
/// executing file would keep it busy).
pub const NEXT_INIT_PATH: &str = "/run/bootlace/init.next";
/// The state handed over.
pub const STATE_PATH: &str = "/run/bootlace/takeover.toml";
/// The self-check command: `bootlace-init takeover-check`.
pub const CHECK_COMMAND: &str = "takeover-check";
/// The first argument of a PID 1 that takes over: `--takeover STATE -- ARGS…`.
pub const TAKEOVER_FLAG: &str = "--takeover";
/// The state versions this build writes and reads.
pub const STATE_VERSION: u32 = 1;
/// Largest state file read, in bytes.
pub const MAX_STATE_BYTES: u64 = 64 * 1024;

/// Where the handing-over init was in its boot. Version 1 knows one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// The bootstrap is mounted on `/.bootstrap`; its manifest is not applied yet.
    BootstrapMounted,
}

/// One milestone of the timeline: its name and CLOCK_BOOTTIME in nanoseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stamp {
    /// `entry`, `config`, `bootstrap_mounted`, …
    pub name: String,
    /// CLOCK_BOOTTIME, ns.
    pub ns: u64,
}

/// The state handed over with PID 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handover {
    /// [`STATE_VERSION`] of the writer.
    pub state_version: u32,
    /// The version of the init that handed over.
    pub from_version: String,
    /// Where it was.
    pub stage: Stage,
    /// Its timeline so far.
    pub timeline: Vec<Stamp>,
    /// The host session's last sequence number (absent: no host connected); the newer init
    /// says HELLO again (same boot id) and numbers its reports from the next one, so the host
    /// neither drops them as resends nor sees one twice.
    #[serde(default)]
    pub host_seq: Option<u64>,
    /// What was mounted, for the log (`the host's bundle over vsock`).
    pub bootstrap: String,
}

/// A state that cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// It could not be read.
    #[error("cannot read the takeover state {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a state of a version this init reads.
    #[error("the takeover state {path} is refused: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl Handover {
    /// The TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Parses a state file's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Handover, StateError> {
        let invalid = |message: String| StateError::Invalid {
            path: path.display().to_string(),
            message,
        };
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(invalid(format!("over {MAX_STATE_BYTES} bytes")));
        }
        let h: Handover =
            toml::from_str(text).map_err(|e| invalid(e.message().trim().to_owned()))?;
        if h.state_version != STATE_VERSION {
            return Err(invalid(format!(
                "state version {} (this init reads {STATE_VERSION})",
                h.state_version
            )));
        }
        Ok(h)
    }

    /// Reads and parses a state file.
    pub fn read(path: &Path) -> Result<Handover, StateError> {
        let file = std::fs::File::open(path).map_err(|source| StateError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let text = crate::types::read_capped(file, MAX_STATE_BYTES).map_err(|source| {
            StateError::Read {
                path: path.display().to_string(),
                source,
            }
        })?;
        Handover::parse(&text, path)
    }
}

/// The self-check's answer: `bootlace-init <version> takeover <state versions…>`.
pub fn check_line(version: &str) -> String {
    format!("bootlace-init {version} takeover {STATE_VERSION}")
}

/// The version a self-check's output names, when it is a bootlace-init that reads the state
/// this build writes; otherwise why not.
pub fn parse_check_output(out: &str) -> Result<String, String> {
    let line = out.lines().next().unwrap_or("").trim();
    let mut words = line.split_ascii_whitespace();
    let (Some("bootlace-init"), Some(version), Some("takeover")) =
        (words.next(), words.next(), words.next())
    else {
        return Err(format!(
            "its self-check answered {:?}, not \"bootlace-init <version> takeover <versions>\"",
            shorten(line)
        ));
    };
    let wanted = STATE_VERSION.to_string();
    if !words.any(|w| w == wanted) {
        return Err(format!(
            "bootlace-init {version} does not read takeover state version {STATE_VERSION}"
        ));
    }
    if version.len() > 64 || !version.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "its version {:?} is not printable",
            shorten(version)
        ));
    }
    Ok(version.to_owned())
}

/// At most 120 characters of guest-supplied text, for messages.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if s.chars().count() > 120 {
        out.push('…');
    }
    out
}

/// The arguments a takeover exec gives the newer init: `--takeover STATE -- ARGS…`.
pub fn exec_args<A: Clone + From<&'static str>>(kernel_args: &[A]) -> Vec<A> {
    let mut v: Vec<A> = vec![TAKEOVER_FLAG.into(), STATE_PATH.into(), "--".into()];
    v.extend(kernel_args.iter().cloned());
    v
}

/// Splits PID 1's arguments (without `argv[0]`): the takeover state, when it was started as a
/// takeover, and the kernel's arguments for init.
pub fn split_args<A: AsRef<std::ffi::OsStr> + Clone>(args: &[A]) -> (Option<A>, Vec<A>) {
    match args {
        [flag, state, rest @ ..] if flag.as_ref() == TAKEOVER_FLAG => {
            let rest = match rest.split_first() {
                Some((dashes, tail)) if dashes.as_ref() == "--" => tail,
                _ => rest,
            };
            (Some(state.clone()), rest.to_vec())
        }
        _ => (None, args.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn sample() -> Handover {
        Handover {
            state_version: STATE_VERSION,
            from_version: "0.1.0".to_owned(),
            stage: Stage::BootstrapMounted,
            timeline: vec![
                Stamp {
                    name: "entry".to_owned(),
                    ns: 2_190_000_000,
                },
                Stamp {
                    name: "bootstrap_mounted".to_owned(),
                    ns: 2_400_000_000,
                },
            ],
            host_seq: Some(7),
            bootstrap: "the host's bundle over vsock".to_owned(),
        }
    }

    #[test]
    fn the_state_round_trips_and_other_versions_are_refused() {
        let h = sample();
        let text = h.to_toml();
        assert_eq!(Handover::parse(&text, Path::new("s")).expect("parse"), h);
        let other = text.replace("state_version = 1", "state_version = 2");
        let e = Handover::parse(&other, Path::new("/run/x")).expect_err("v2");
        assert!(e.to_string().contains("/run/x"), "{e}");
        assert!(e.to_string().contains("state version 2"), "{e}");
        let unknown = format!("{text}\nsurprise = 1\n");
        assert!(Handover::parse(&unknown, Path::new("s")).is_err());
        let no_host = Handover {
            host_seq: None,
            ..sample()
        };
        assert_eq!(
            Handover::parse(&no_host.to_toml(), Path::new("s")).expect("parse"),
            no_host
        );
    }

    #[test]
    fn the_self_check_answer() {
        assert_eq!(check_line("0.2.0"), "bootlace-init 0.2.0 takeover 1");
        assert_eq!(
            parse_check_output("bootlace-init 0.2.0 takeover 1\n").as_deref(),
            Ok("0.2.0")
        );
        assert_eq!(
            parse_check_output("bootlace-init 0.3.0 takeover 2 1").as_deref(),
            Ok("0.3.0")
        );
        for bad in [
            "",
            "hello",
            "bootlace-init 0.2.0",
            "bootlace-init 0.2.0 takeover 2",
            "busybox v1.36 takeover 1",
        ] {
            assert!(parse_check_output(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pid1_arguments_with_and_without_a_takeover() {
        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let args = exec_args(&os(&["single", "quiet"]));
        assert_eq!(
            args,
            os(&["--takeover", STATE_PATH, "--", "single", "quiet"])
        );
        let (state, rest) = split_args(&args);
        assert_eq!(state, Some(OsString::from(STATE_PATH)));
        assert_eq!(rest, os(&["single", "quiet"]));
        let (state, rest) = split_args(&os(&["single"]));
        assert_eq!(state, None);
        assert_eq!(rest, os(&["single"]));
        let (state, rest) = split_args(&os(&[]));
        assert_eq!((state, rest), (None, Vec::new()));
    }
}
