//! Supervise mode: run the application as a child and stay a correct PID 1.
//!
//! - Every child that ends is reaped, the application's own status is kept.
//! - SIGHUP, SIGUSR1, SIGUSR2 and SIGQUIT are forwarded to the application.
//! - SIGTERM and SIGINT (ctrl-alt-del) are forwarded, SIGPWR is forwarded as SIGTERM, and each
//!   starts the shutdown grace period.
//! - When the application has exited, every process left gets SIGTERM and the grace period.
//! - When the grace period runs out, every process left gets SIGKILL.
//! - The supervisor returns once the application has ended and no process is left.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::sys::{self, Ended};
use bootlace_contract::config::{Command, Handoff, InitConfig, UnixId, WorkDir};
use bootlace_contract::status::ExitStatus;

/// How the application ended.
#[derive(Debug)]
pub enum AppEnd {
    /// It ran and ended.
    Ended(Ended),
    /// It could not be started.
    SpawnFailed(io::Error),
}

impl AppEnd {
    /// The status reported on the console and to the host.
    pub fn status(&self) -> ExitStatus {
        match self {
            AppEnd::Ended(Ended::Exited(code)) => ExitStatus::from_exit_code(*code),
            AppEnd::Ended(Ended::Signaled(sig)) => ExitStatus::Signaled(*sig),
            AppEnd::SpawnFailed(e) => spawn_error_status(e),
        }
    }

    /// A one-line account, naming the command.
    pub fn summary(&self, command: &Command) -> String {
        let program = command.program().display();
        match self {
            AppEnd::Ended(Ended::Exited(code)) => {
                format!("app {program} exited with status {code}")
            }
            AppEnd::Ended(Ended::Signaled(sig)) => {
                let name = Signal::try_from(*sig).map_or("unknown", Signal::as_str);
                format!("app {program} was killed by signal {sig} ({name})")
            }
            AppEnd::SpawnFailed(e) => format!("cannot execute {program}: {e}"),
        }
    }
}

/// Default PATH given to the hand-off.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The environment of the hand-off (and the base of a manifest command's): PATH, HOME, TERM
/// (the kernel's, else `linux`), then the configured variables, which may override those three.
pub fn handoff_env(config: &InitConfig) -> Vec<(String, String)> {
    let term = std::env::var("TERM").unwrap_or_else(|_| "linux".to_owned());
    let mut env: Vec<(String, String)> = vec![
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOME".to_owned(), "/".to_owned()),
        ("TERM".to_owned(), term),
    ];
    for (k, v) in &config.handoff.env {
        env.retain(|(name, _)| name != k.as_str());
        env.push((k.as_str().to_owned(), v.as_str().to_owned()));
    }
    env
}

/// The arguments the kernel gave PID 1 (after `--`, or unknown bare words): they go on to the
/// real init, as if the kernel had started it itself. Never fails on non-UTF-8 bytes.
pub fn kernel_args() -> Vec<std::ffi::OsString> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    bootlace_contract::takeover::split_args(&args).1
}

/// The status for a command that could not be executed: 127 when it does not exist, else 126.
pub fn spawn_error_status(e: &io::Error) -> ExitStatus {
    if e.kind() == io::ErrorKind::NotFound {
        ExitStatus::NotFound
    } else {
        ExitStatus::CannotExec
    }
}

/// Where and as whom the hand-off command runs: `[handoff] workdir`, `user`, `group` and
/// `groups`. The default is `/`, as root with no supplementary group, as PID 1 runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunAs {
    /// The working directory; `/` when none.
    pub workdir: Option<WorkDir>,
    /// User ID, group ID and supplementary groups, when they change.
    pub credentials: Option<(u32, u32, Vec<u32>)>,
}

impl RunAs {
    /// What the config's hand-off says.
    pub fn of(handoff: &Handoff) -> RunAs {
        let id = |i: Option<UnixId>| i.map_or(0, UnixId::get);
        RunAs {
            workdir: handoff.workdir.clone(),
            credentials: handoff.changes_credentials().then(|| {
                let groups = handoff.groups.iter().map(|g| g.get()).collect();
                (id(handoff.user), id(handoff.group), groups)
            }),
        }
    }

    /// The working directory.
    pub fn dir(&self) -> &Path {
        self.workdir
            .as_ref()
            .map_or(Path::new("/"), WorkDir::as_path)
    }

    /// ` in /srv as 1000:1000 (groups 10,20)`, or nothing for the default.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        if let Some(w) = &self.workdir {
            s.push_str(&format!(" in {w}"));
        }
        if let Some((uid, gid, groups)) = &self.credentials {
            s.push_str(&format!(" as {uid}:{gid}"));
            if !groups.is_empty() {
                let g: Vec<String> = groups.iter().map(u32::to_string).collect();
                s.push_str(&format!(" (groups {})", g.join(",")));
            }
        }
        s
    }

    /// Checks, in PID 1 before the hand-off, that the working directory is one: a missing
    /// one is reported naming it (not as the command's own error).
    pub fn check(&self) -> io::Result<()> {
        let dir = self.dir();
        match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(io::Error::other(format!(
                "working directory {}: not a directory",
                dir.display()
            ))),
            Err(e) => Err(io::Error::other(format!(
                "working directory {}: {e}",
                dir.display()
            ))),
        }
    }
}

/// A std `Command` for the hand-off: the given argv and environment only, the working
/// directory and credentials of `run_as` (chdir first, as root; then setgroups, setgid,
/// setuid), an empty signal mask and default signal dispositions.
pub fn command(
    cmd: &Command,
    extra_args: &[std::ffi::OsString],
    env: &[(String, String)],
    run_as: &RunAs,
) -> std::process::Command {
    let mut c = std::process::Command::new(cmd.program());
    if let Some(arg0) = cmd.argv().next() {
        c.arg0(arg0);
    }
    c.args(cmd.args())
        .args(extra_args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(run_as.dir());
    sys::reset_signals_on_exec(&mut c);
    if let Some((uid, gid, groups)) = &run_as.credentials {
        sys::set_credentials_on_exec(&mut c, *uid, *gid, groups);
    }
    c
}

/// How long to wait for processes to end after SIGKILL before powering off regardless
/// (a process stuck in uninterruptible sleep never ends).
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Runs the application until it and every other process have ended.
pub fn run(
    cmd: &Command,
    env: &[(String, String)],
    run_as: &RunAs,
    grace: Duration,
) -> io::Result<AppEnd> {
    if let Err(e) = sys::set_child_subreaper() {
        log::warn!("cannot become child subreaper: {e}");
    }
    let signals = sys::Signals::open(sys::HANDLED_SIGNALS)?;
    if let Err(e) = run_as.check() {
        return Ok(AppEnd::SpawnFailed(e));
    }
    let child = match command(cmd, &[], env, run_as).spawn() {
        Ok(c) => c,
        Err(e) => return Ok(AppEnd::SpawnFailed(e)),
    };
    let app = child.id();
    log::info!("supervising {cmd} as pid {app}{}", run_as.describe());

    let mut app_end: Option<Ended> = None;
    let mut deadline: Option<Instant> = None;
    let mut left_behind_termed = false;
    let mut killed: Option<Instant> = None;
    loop {
        // Reap everything that has ended.
        let mut no_children = false;
        loop {
            match sys::reap_one() {
                Ok(Some((pid, ended))) if pid == app => {
                    log::debug!("app pid {pid} ended: {ended:?}");
                    app_end = Some(ended);
                }
                Ok(Some((pid, ended))) => log::trace!("reaped pid {pid}: {ended:?}"),
                Ok(None) => break,
                Err(e) if sys::is_no_children(&e) => {
                    no_children = true;
                    break;
                }
                Err(e) => {
                    log::warn!("waitpid: {e}");
                    break;
                }
            }
        }
        if let Some(ended) = app_end {
            if no_children {
                return Ok(AppEnd::Ended(ended));
            }
            if !left_behind_termed {
                // The app is gone; ask whatever it left behind to finish, within the grace
                // period (the one a shutdown signal already started, if any).
                let _ = sys::kill_all(Signal::SIGTERM);
                left_behind_termed = true;
                deadline.get_or_insert(Instant::now() + grace);
            }
        }
        if let Some(d) = deadline {
            if killed.is_none() && Instant::now() >= d {
                log::warn!(
                    "grace period of {} ms over: killing every process left",
                    grace.as_millis()
                );
                let _ = sys::kill_all(Signal::SIGKILL);
                killed = Some(Instant::now());
            }
        }
        if let (Some(at), Some(ended)) = (killed, app_end) {
            if at.elapsed() > KILL_WAIT {
                log::warn!("processes left after SIGKILL did not end within {KILL_WAIT:?}");
                return Ok(AppEnd::Ended(ended));
            }
        }
        let timeout = match (deadline, killed) {
            (Some(d), None) => Some(d.saturating_duration_since(Instant::now())),
            // After SIGKILL the kernel ends everything promptly; poll for the reaping.
            (Some(_), Some(_)) => Some(Duration::from_millis(100)),
            (None, _) => None,
        };
        for sig in signals.wait(timeout)? {
            let forward = match sig {
                Signal::SIGCHLD => continue,
                Signal::SIGPWR => Signal::SIGTERM,
                other => other,
            };
            if app_end.is_none() {
                log::info!("forwarding {} to app pid {app}", forward.as_str());
                if let Err(e) = sys::kill(app, forward) {
                    log::warn!("cannot forward {} to pid {app}: {e}", forward.as_str());
                }
            }
            if matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGPWR)
                && deadline.is_none()
            {
                log::info!(
                    "shutdown requested by {}: grace period {} ms",
                    sig.as_str(),
                    grace.as_millis()
                );
                deadline = Some(Instant::now() + grace);
            }
        }
    }
}

/// How a bounded command ended.
#[derive(Debug)]
pub enum StepEnd {
    /// It ended by itself.
    Ended(Ended),
    /// Its timeout passed: its process group got SIGTERM, then SIGKILL.
    TimedOut(Ended),
    /// It could not be started.
    SpawnFailed(io::Error),
}

/// Time between SIGTERM and SIGKILL for a command past its timeout.
pub const STEP_KILL_AFTER: Duration = Duration::from_secs(2);

/// Runs a command in its own process group with a timeout, reaping whatever else ends
/// meanwhile (PID 1 adopts orphans). At the timeout the whole group gets SIGTERM, and SIGKILL
/// [`STEP_KILL_AFTER`] later.
pub fn run_bounded(mut cmd: std::process::Command, timeout: Duration) -> io::Result<StepEnd> {
    let signals = sys::Signals::open(&[Signal::SIGCHLD])?;
    cmd.process_group(0);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Ok(StepEnd::SpawnFailed(e)),
    };
    let pid = child.id();
    let deadline = Instant::now() + timeout;
    let mut term_sent: Option<Instant> = None;
    loop {
        loop {
            match sys::reap_one() {
                Ok(Some((p, ended))) if p == pid => {
                    return Ok(match term_sent {
                        Some(_) => StepEnd::TimedOut(ended),
                        None => StepEnd::Ended(ended),
                    });
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        let now = Instant::now();
        let next = match term_sent {
            None if now >= deadline => {
                log::warn!(
                    "pid {pid} is past its timeout of {} s: SIGTERM to its process group",
                    timeout.as_secs()
                );
                let _ = sys::kill_group(pid, Signal::SIGTERM);
                term_sent = Some(now);
                now + STEP_KILL_AFTER
            }
            None => deadline,
            Some(t) if now >= t + STEP_KILL_AFTER => {
                let _ = sys::kill_group(pid, Signal::SIGKILL);
                now + Duration::from_millis(100)
            }
            Some(t) => t + STEP_KILL_AFTER,
        };
        // SIGCHLD wakes this at once in PID 1; the cap keeps it correct where another thread
        // of the process might take the signal (tests).
        let nap = next
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_millis(100));
        signals.wait(Some(nap))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        Command::try_from(vec!["/bin/sh".into(), "-c".into(), script.into()]).expect("command")
    }

    #[test]
    fn run_as_from_the_config() {
        let mut h = Handoff::default();
        assert_eq!(RunAs::of(&h), RunAs::default());
        assert_eq!(RunAs::of(&h).dir(), Path::new("/"));
        h.groups = vec![UnixId::try_from(5).expect("id")];
        assert_eq!(RunAs::of(&h).credentials, Some((0, 0, vec![5])));
        h.user = UnixId::try_from(7).ok();
        h.workdir = "/tmp".parse().ok();
        let r = RunAs::of(&h);
        assert_eq!(r.describe(), " in /tmp as 7:0 (groups 5)");
        assert!(r.check().is_ok());
        let missing = RunAs {
            workdir: "/nonexistent-bootlace".parse().ok(),
            credentials: None,
        };
        let e = missing.check().expect_err("missing").to_string();
        assert!(
            e.starts_with("working directory /nonexistent-bootlace: "),
            "{e}"
        );
    }

    #[test]
    fn the_command_starts_in_its_workdir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let run_as = RunAs {
            workdir: dir.path().to_str().and_then(|p| p.parse().ok()),
            credentials: None,
        };
        let out = command(&sh("pwd"), &[], &[], &run_as)
            .output()
            .expect("run");
        let pwd = String::from_utf8_lossy(&out.stdout);
        assert_eq!(pwd.trim(), dir.path().to_string_lossy());
    }

    #[test]
    #[ignore = "needs root"]
    fn the_command_runs_with_its_credentials() {
        let run_as = RunAs {
            workdir: None,
            credentials: Some((65534, 65533, vec![4, 65532])),
        };
        let out = command(&sh("id -u; id -g; id -G"), &[], &[], &run_as)
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines, ["65534", "65533", "65533 4 65532"], "{text}");
        // No supplementary group: root's are dropped all the same.
        let run_as = RunAs {
            workdir: None,
            credentials: Some((1000, 1000, Vec::new())),
        };
        let out = command(&sh("id -G"), &[], &[], &run_as)
            .output()
            .expect("run");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1000");
    }
}
