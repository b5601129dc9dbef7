//! How a run ended, the exit code `bootlace-vm run` returns for it (defined here, once, in
//! [`Ended`]), and the JSON report of `bootlace-vm run --json` ([`Report`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bootlace_contract::status::{parse_power_off, PowerOff};
use serde::Serialize;

/// How QEMU ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The guest powered itself off.
    PoweredOff,
    /// The guest kernel panicked (for example because PID 1 exited).
    KernelPanic,
    /// The guest rebooted or reset (QEMU stops instead, `-no-reboot`).
    Reset,
    /// The hard timeout passed; QEMU was killed.
    TimedOut,
    /// QEMU itself failed, with its stderr.
    QemuFailed(String),
    /// The host stopped the run (`bootlace-vm up` on Ctrl-C or SIGTERM); QEMU was killed.
    Stopped,
    /// The UEFI firmware found nothing to boot on the disk (why); QEMU was killed.
    NoBoot(String),
}

impl End {
    /// `powered-off`, `kernel-panic`, `reset`, `timeout`, `qemu-failed` or `stopped`.
    pub fn as_str(&self) -> &'static str {
        match self {
            End::PoweredOff => "powered-off",
            End::KernelPanic => "kernel-panic",
            End::Reset => "reset",
            End::TimedOut => "timeout",
            End::QemuFailed(_) => "qemu-failed",
            End::Stopped => "stopped",
            End::NoBoot(_) => "no-boot",
        }
    }
}

/// The result of a run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub end: End,
    /// The exit status the guest's init reported on the console, if any.
    pub exit_status: Option<u8>,
    /// The whole console output.
    pub console: String,
    /// Wall time from QEMU start to its end.
    pub wall: Duration,
}

/// Why `bootlace-vm` could not run the VM (exit 125); the message names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The command line was refused (clap's errors, remapped from 2).
    Usage,
    /// Input found bad before QEMU started: a missing kernel, initrd, disk, share or bundle
    /// file, an unknown image, an unwritable console log, a kernel command line over the
    /// kernel's limit, a `--memory` below the image's least memory.
    BadInput,
    /// The host side could not be set up: the vsock daemon, its directory, the host agent's
    /// listener.
    HostSetup,
    /// QEMU could not be started, or it failed (exited with an error status).
    Qemu,
}

impl Reason {
    /// `usage`, `bad-input`, `host-setup` or `qemu` (the JSON `reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Usage => "usage",
            Reason::BadInput => "bad-input",
            Reason::HostSetup => "host-setup",
            Reason::Qemu => "qemu",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reason::Usage => "usage error",
            Reason::BadInput => "bad input",
            Reason::HostSetup => "host setup failed",
            Reason::Qemu => "QEMU failed",
        })
    }
}

/// How `bootlace-vm run` ended, as its exit code tells it. The one definition of its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The guest powered off after printing its power-off line: exit with its EXIT_STATUS.
    GuestStatus(u8),
    /// The guest ended without a status to pass on. Powered off cleanly without a power-off
    /// line (a real init such as busybox did it): exit 0; a kernel panic or a reset:
    /// [`Ended::NO_STATUS`], whatever the console said before.
    NoStatus {
        /// It powered off cleanly.
        powered_off: bool,
    },
    /// The hard timeout passed and QEMU was killed: [`Ended::TIMED_OUT`].
    TimedOut,
    /// bootlace-vm could not run the VM: [`Ended::COULD_NOT_RUN`].
    CouldNotRun(Reason),
}

impl Ended {
    /// The guest ended without a power-off line: a kernel panic or a reset.
    pub const NO_STATUS: u8 = 123;
    /// The hard timeout passed (as timeout(1)).
    pub const TIMED_OUT: u8 = 124;
    /// bootlace-vm could not run the VM (as timeout(1), env(1), chroot(1) for their own
    /// failures; 2, clap's usage error, is also a guest status).
    pub const COULD_NOT_RUN: u8 = 125;

    /// The exit code.
    pub fn code(self) -> u8 {
        match self {
            Ended::GuestStatus(s) => s,
            Ended::NoStatus { powered_off: true } => 0,
            Ended::NoStatus { powered_off: false } => Ended::NO_STATUS,
            Ended::TimedOut => Ended::TIMED_OUT,
            Ended::CouldNotRun(_) => Ended::COULD_NOT_RUN,
        }
    }

    /// `guest-status`, `no-status`, `timeout` or `could-not-run` (the JSON `ended`).
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::GuestStatus(_) => "guest-status",
            Ended::NoStatus { .. } => "no-status",
            Ended::TimedOut => "timeout",
            Ended::CouldNotRun(_) => "could-not-run",
        }
    }
}

/// The exit codes as `bootlace-vm run --help` lists them; [`Ended`] holds the numbers.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0-255  the guest's EXIT_STATUS, when it powered off after printing its power-off line
         (0 when it powered off without one, e.g. a real init such as busybox did it)
  123    the guest ended without a power-off line: kernel panic or reset, or the UEFI
         firmware found nothing to boot on a bootable disk (the message says why)
  124    the hard timeout (--timeout) passed; QEMU was killed
  125    bootlace-vm could not run the VM: a usage error, bad input found before QEMU
         started (a missing kernel, initrd, disk or bundle, an unknown image, a kernel
         command line over the kernel's limit, a --memory below the image's need), the host
         side (vsock daemon, host agent) could not be set up, or QEMU failed to start or
         failed; the message says which";

impl Outcome {
    /// How the run ended, as the exit code tells it.
    pub fn ended(&self) -> Ended {
        match (&self.end, self.exit_status) {
            (End::PoweredOff, Some(s)) => Ended::GuestStatus(s),
            (End::PoweredOff, None) => Ended::NoStatus { powered_off: true },
            (End::KernelPanic | End::Reset | End::Stopped | End::NoBoot(_), _) => {
                Ended::NoStatus { powered_off: false }
            }
            (End::TimedOut, _) => Ended::TimedOut,
            (End::QemuFailed(_), _) => Ended::CouldNotRun(Reason::Qemu),
        }
    }

    /// The exit code the CLI returns: the guest's status on a clean power-off (0 when it
    /// reported none), 123 for a kernel panic or reset, 124 for a timeout, 125 when QEMU failed.
    pub fn exit_code(&self) -> u8 {
        self.ended().code()
    }

    /// The last power-off line on the console (its status and `STATUS=` text), if any.
    pub fn power_off(&self) -> Option<PowerOff> {
        parse_power_off(&self.console)
    }

    /// A one-line account of the run.
    pub fn summary(&self) -> String {
        let secs = self.wall.as_secs_f64();
        let status = self.exit_status.map_or_else(
            || "no status line".to_owned(),
            |s| format!("EXIT_STATUS={s}"),
        );
        match &self.end {
            End::PoweredOff => format!("guest powered off after {secs:.1} s ({status})"),
            End::KernelPanic => format!("guest kernel panicked after {secs:.1} s ({status})"),
            End::Reset => format!("guest reset after {secs:.1} s ({status})"),
            End::TimedOut => format!("timed out after {secs:.1} s; QEMU killed ({status})"),
            End::QemuFailed(e) => format!("QEMU failed after {secs:.1} s: {e}"),
            End::Stopped => format!("stopped by the host after {secs:.1} s; QEMU killed"),
            End::NoBoot(why) => format!("nothing booted after {secs:.1} s: {why}; QEMU killed"),
        }
    }

    /// The console lines holding `needle`.
    pub fn lines_with<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .lines()
            .filter(move |l| l.contains(needle))
            .map(|l| l.trim_end_matches('\r'))
    }

    /// The guest's timeline lines (`bootlace: timeline: entry=… …`), the text after
    /// `timeline: `.
    pub fn timeline(&self) -> impl Iterator<Item = &str> + '_ {
        self.lines_with(TIMELINE)
            .filter_map(|l| l.split_once(TIMELINE).map(|(_, t)| t))
    }
}

/// What precedes the guest's timeline on its console.
const TIMELINE: &str = "bootlace: timeline: ";

/// The one JSON object `bootlace-vm run --json` prints on stdout at the end.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The exit code bootlace-vm returns.
    pub exit_code: u8,
    /// `guest-status`, `no-status`, `timeout` or `could-not-run` ([`Ended::as_str`]).
    pub ended: &'static str,
    /// How QEMU ended ([`End::as_str`]); null when QEMU never ran.
    pub end: Option<&'static str>,
    /// With `could-not-run`: `usage`, `bad-input`, `host-setup` or `qemu`.
    pub reason: Option<&'static str>,
    /// With `could-not-run`: the message.
    pub error: Option<String>,
    /// The EXIT_STATUS of the guest's power-off line, if it printed one.
    pub exit_status: Option<u8>,
    /// The STATUS text of that line.
    pub status: Option<String>,
    /// The guest's timeline lines (`entry=0.08s … (VmHWM … KiB)`), if it printed any.
    pub timeline: Vec<String>,
    /// Where the console log was kept (`--console-log`), if anywhere.
    pub console_log: Option<PathBuf>,
    /// Seconds from QEMU's start to its end (without QEMU: the time bootlace-vm took).
    pub wall_s: f64,
}

impl Report {
    /// The report of a run that happened.
    pub fn of_outcome(o: &Outcome, console_log: Option<&Path>) -> Report {
        let ended = o.ended();
        let power_off = o.power_off();
        Report {
            exit_code: ended.code(),
            ended: ended.as_str(),
            end: Some(o.end.as_str()),
            reason: match ended {
                Ended::CouldNotRun(r) => Some(r.as_str()),
                _ => None,
            },
            error: match &o.end {
                End::QemuFailed(e) | End::NoBoot(e) => Some(e.clone()),
                _ => None,
            },
            exit_status: o.exit_status,
            status: power_off.map(|p| p.status),
            timeline: o.timeline().map(str::to_owned).collect(),
            console_log: console_log.map(Path::to_owned),
            wall_s: o.wall.as_secs_f64(),
        }
    }

    /// The report of a run that could not happen.
    pub fn could_not_run(
        reason: Reason,
        error: String,
        console_log: Option<&Path>,
        wall: Duration,
    ) -> Report {
        let ended = Ended::CouldNotRun(reason);
        Report {
            exit_code: ended.code(),
            ended: ended.as_str(),
            end: None,
            reason: Some(reason.as_str()),
            error: Some(error),
            exit_status: None,
            status: None,
            timeline: Vec::new(),
            console_log: console_log.map(Path::to_owned),
            wall_s: wall.as_secs_f64(),
        }
    }

    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(end: End, console: &str) -> Outcome {
        Outcome {
            end,
            exit_status: bootlace_contract::status::parse_exit_status(console),
            console: console.to_owned(),
            wall: Duration::from_millis(2500),
        }
    }

    #[test]
    fn exit_codes() {
        let line = "[ 2.0] bootlace: power-off EXIT_STATUS=7 STATUS=app exited\n";
        let zero = "[ 2.0] bootlace: power-off EXIT_STATUS=0 STATUS=ok\n";
        let cases: &[(End, &str, u8, &str)] = &[
            (End::PoweredOff, line, 7, "guest-status"),
            (End::PoweredOff, "", 0, "no-status"),
            (End::KernelPanic, zero, 123, "no-status"),
            (End::Reset, "", 123, "no-status"),
            (End::TimedOut, "", 124, "timeout"),
            (End::QemuFailed("x".into()), "", 125, "could-not-run"),
        ];
        for (end, console, code, ended) in cases {
            let o = o(end.clone(), console);
            assert_eq!(o.exit_code(), *code, "{end:?}");
            assert_eq!(o.ended().as_str(), *ended, "{end:?}");
        }
        for r in [
            Reason::Usage,
            Reason::BadInput,
            Reason::HostSetup,
            Reason::Qemu,
        ] {
            assert_eq!(Ended::CouldNotRun(r).code(), 125);
        }
        for code in ["123", "124", "125", "0-255"] {
            assert!(EXIT_CODES_HELP.contains(code), "{code}");
        }
    }

    #[test]
    fn json_reports() {
        let console = "[ 1.0] bootlace: timeline: entry=0.08s ready=1.2s (VmHWM 900 KiB)\r\n\
                       [ 2.0] bootlace: power-off EXIT_STATUS=7 STATUS=app exited\n";
        let r = Report::of_outcome(&o(End::PoweredOff, console), Some(Path::new("/l.log")));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
        assert_eq!(v["exit_code"], 7);
        assert_eq!(v["ended"], "guest-status");
        assert_eq!(v["end"], "powered-off");
        assert_eq!(v["exit_status"], 7);
        assert_eq!(v["status"], "app exited");
        assert_eq!(
            v["timeline"],
            serde_json::json!(["entry=0.08s ready=1.2s (VmHWM 900 KiB)"])
        );
        assert_eq!(v["console_log"], "/l.log");
        assert_eq!(v["wall_s"], 2.5);
        assert!(v["reason"].is_null() && v["error"].is_null());

        let r = Report::could_not_run(
            Reason::BadInput,
            "initrd /x not found".into(),
            None,
            Duration::ZERO,
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
        assert_eq!(v["exit_code"], 125);
        assert_eq!(v["ended"], "could-not-run");
        assert_eq!(v["reason"], "bad-input");
        assert_eq!(v["error"], "initrd /x not found");
        assert!(v["end"].is_null() && v["exit_status"].is_null());

        let r = Report::of_outcome(&o(End::QemuFailed("exit status: 1".into()), ""), None);
        assert_eq!((r.exit_code, r.reason), (125, Some("qemu")));
    }

    #[test]
    fn the_documented_report_has_every_field() {
        let doc = include_str!("../../docs/boot.md");
        let block = doc
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a json block in docs/boot.md");
        let documented: serde_json::Value = serde_json::from_str(block).expect("valid JSON");
        let real: serde_json::Value =
            serde_json::from_str(&Report::of_outcome(&o(End::PoweredOff, ""), None).to_json())
                .expect("JSON");
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&documented), keys(&real));
    }
}
