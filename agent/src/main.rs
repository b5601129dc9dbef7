//! `bootlace-agent`: the host configuration manager.
//!
//! - `serve`: serve a bundle to guests and print what each reports, until killed;
//! - `wait-ready`: the same, ending when a guest reports READY or FAILED or the timeout passes;
//! - `exit-status LOG`: the EXIT_STATUS a guest printed on its console.
//!
//! The exit codes are defined once, in [`Exit`], and listed in `--help` ([`EXIT_CODES`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_agent::fault::Fault;
use bootlace_agent::host::{self, BundleSource, Event, Faults, GuestEvent, Host};
use bootlace_contract::protocol::{Kind, DEFAULT_PORT};
use clap::{Parser, Subcommand};

/// The exit codes of `bootlace-agent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// wait-ready: a guest reported READY; exit-status: the status was printed.
    Success = 0,
    /// wait-ready: a guest reported FAILED; exit-status: the log has no power-off line.
    Negative = 1,
    /// The command line was refused (clap's usage error).
    Usage = 2,
    /// Any other error: cannot listen, a bad bundle, an unreadable log.
    Error = 3,
    /// wait-ready: no guest was READY or FAILED within `--timeout` (as timeout(1)).
    TimedOut = 124,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// The exit codes as `--help` lists them; [`Exit`] holds the numbers.
const EXIT_CODES: &str = "\
Exit codes:
  0    success (wait-ready: a guest reported READY; exit-status: the status was printed)
  1    wait-ready: a guest reported FAILED; exit-status: the log has no power-off line
  2    usage error
  3    any other error (cannot listen, bad bundle, unreadable log)
  124  wait-ready: the timeout passed";

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-agent",
    version,
    about = "Host side of the bootlace guest conversation",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug)]
struct Listen {
    /// Hybrid-vsock base path (vhost-device-vsock `uds-path`); listens on `<PATH>_<port>`.
    #[arg(long)]
    uds: Vec<PathBuf>,
    /// The port guests dial (CID 2).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u32,
    /// Also listen on AF_VSOCK at --port (hosts with /dev/vhost-vsock).
    #[arg(long)]
    vsock: bool,
    /// Bundle to serve: a tarball (tar, tar.gz, tar.zst) or a directory tarred on the fly.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// One JSON object per line on stdout instead of text (wait-ready ends with an
    /// `"event":"outcome"` line).
    #[arg(long)]
    json: bool,
    /// Misbehave on purpose to test guests (repeatable); `--help` lists the kinds.
    #[arg(long = "fault", value_name = "KIND[=ARG]",
          value_parser = clap::value_parser!(Fault),
          long_help = bootlace_agent::fault::FAULT_LONG_HELP)]
    faults: Vec<Fault>,
}

/// `wait-ready --until`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Until {
    /// bootlace's READY.
    Bootlace,
    /// systemd's readiness, after bootlace's READY.
    Systemd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve guests until killed.
    #[command(after_help = EXIT_CODES)]
    Serve(Listen),
    /// Serve until a guest is READY (exit 0), FAILED (exit 1) or the timeout passes (exit 124).
    #[command(after_help = EXIT_CODES)]
    WaitReady {
        #[command(flatten)]
        listen: Listen,
        /// Seconds to wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// What "ready" means: bootlace's READY (the bootstrap is done, the hand-off follows),
        /// or systemd's (`STEP systemd_ready`, relayed once systemd, the real init, has
        /// finished starting up).
        #[arg(long, value_enum, default_value = "bootlace")]
        until: Until,
    },
    /// Print the EXIT_STATUS a guest reported on its console (exit 1 when there is none).
    #[command(after_help = EXIT_CODES)]
    ExitStatus {
        /// A console log (as written by `bootlace-vm run --console-log`).
        log: PathBuf,
        /// Print one JSON object: `{"log":…,"exit_status":N|null,"status":…}`.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are "errors" that go to stdout and succeed.
            return if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Success
            }
            .into();
        }
    };
    match run(cli) {
        Ok(code) => code.into(),
        Err(e) => {
            eprintln!("bootlace-agent: error: {e:#}");
            Exit::Error.into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Cmd::Serve(l) => {
            let rx = start(&l)?;
            for e in rx {
                print(&l, &e);
            }
            Ok(Exit::Success)
        }
        Cmd::WaitReady {
            listen,
            timeout,
            until,
        } => wait_ready(&listen, Duration::from_secs(timeout), until),
        Cmd::ExitStatus { log, json } => exit_status(&log, json),
    }
}

/// The bundle to serve, if any, announced on stderr.
fn load_bundle(path: Option<&Path>) -> anyhow::Result<Option<BundleSource>> {
    let Some(p) = path else { return Ok(None) };
    let b = BundleSource::from_path(p)?;
    eprintln!("bootlace-agent: serving {} ({})", p.display(), b.summary());
    Ok(Some(b))
}

/// Starts every listener; the events of every guest arrive on the receiver.
fn start(l: &Listen) -> anyhow::Result<mpsc::Receiver<GuestEvent>> {
    if l.uds.is_empty() && !l.vsock {
        bail!("nothing to listen on: give --uds PATH and/or --vsock");
    }
    let bundle = load_bundle(l.bundle.as_deref())?;
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let faults: Faults = l.faults.iter().copied().collect();
    if faults.any() {
        let flags: Vec<String> = l.faults.iter().map(Fault::to_string).collect();
        eprintln!("bootlace-agent: injecting faults: {}", flags.join(" "));
    }
    let host = Arc::new(
        Host::new(bundle, move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .with_faults(faults),
    );
    for uds in &l.uds {
        let path = host::hybrid_path(uds, l.port);
        host.serve_unix(&path)
            .with_context(|| format!("listen on {}", path.display()))?;
        eprintln!("bootlace-agent: listening on {}", path.display());
    }
    if l.vsock {
        host::serve_vsock(&host, l.port)
            .with_context(|| format!("listen on AF_VSOCK port {}", l.port))?;
        eprintln!("bootlace-agent: listening on vsock port {}", l.port);
    }
    Ok(rx)
}

fn print(l: &Listen, e: &GuestEvent) {
    if l.json {
        println!("{}", host::to_json(e));
    } else {
        println!("[{}] {}", e.guest, host::describe(&e.event));
    }
}

/// How `wait-ready` ended.
#[derive(Debug)]
enum Outcome {
    /// A guest reported READY.
    Ready {
        guest: String,
        status: Option<String>,
    },
    /// A guest reported FAILED.
    Failed {
        guest: String,
        status: Option<String>,
    },
    /// Neither within the timeout.
    TimedOut,
}

impl Outcome {
    fn exit(&self) -> Exit {
        match self {
            Outcome::Ready { .. } => Exit::Success,
            Outcome::Failed { .. } => Exit::Negative,
            Outcome::TimedOut => Exit::TimedOut,
        }
    }

    /// `{"event":"outcome","outcome":"ready"|"failed"|"timeout","exit_code":N,...}`.
    fn to_json(&self, timeout: Duration) -> serde_json::Value {
        let (outcome, guest, status) = match self {
            Outcome::Ready { guest, status } => ("ready", Some(guest), status.as_ref()),
            Outcome::Failed { guest, status } => ("failed", Some(guest), status.as_ref()),
            Outcome::TimedOut => ("timeout", None, None),
        };
        serde_json::json!({
            "event": "outcome",
            "outcome": outcome,
            "exit_code": self.exit() as u8,
            "guest": guest,
            "status": status,
            "timeout_s": timeout.as_secs(),
        })
    }
}

/// Serves until a guest reports READY or FAILED, or `timeout` passes.
fn wait_ready(l: &Listen, timeout: Duration, until: Until) -> anyhow::Result<Exit> {
    let rx = start(l)?;
    let outcome = wait_for_outcome(l, &rx, timeout, until);
    match &outcome {
        Outcome::Ready { .. } => {}
        Outcome::Failed { guest, status } => eprintln!(
            "bootlace-agent: {guest} failed: {}",
            host::escape_controls(status.as_deref().unwrap_or("no reason given"))
        ),
        Outcome::TimedOut => eprintln!(
            "bootlace-agent: no guest was ready within {} s",
            timeout.as_secs()
        ),
    }
    if l.json {
        println!("{}", outcome.to_json(timeout));
    }
    Ok(outcome.exit())
}

/// Prints events until the first READY (or, `until` systemd, the first `STEP systemd_ready`)
/// or FAILED report, or the deadline.
fn wait_for_outcome(
    l: &Listen,
    rx: &mpsc::Receiver<GuestEvent>,
    timeout: Duration,
    until: Until,
) -> Outcome {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(e) = rx.recv_timeout(left) else {
            return Outcome::TimedOut;
        };
        print(l, &e);
        let Event::Report(f) = &e.event else { continue };
        let status = f.get("STATUS").map(str::to_owned);
        let systemd_ready = f.kind == Kind::Step
            && f.get("STEP") == Some(bootlace_contract::protocol::SYSTEMD_READY_STEP);
        match f.kind {
            Kind::Ready if until == Until::Bootlace => {
                return Outcome::Ready {
                    guest: e.guest,
                    status,
                }
            }
            Kind::Step if until == Until::Systemd && systemd_ready => {
                return Outcome::Ready {
                    guest: e.guest,
                    status,
                }
            }
            Kind::Failed => {
                return Outcome::Failed {
                    guest: e.guest,
                    status,
                }
            }
            _ => {}
        }
    }
}

/// `exit-status LOG`: prints the status of the log's last power-off line.
fn exit_status(log: &Path, json: bool) -> anyhow::Result<Exit> {
    let bytes = std::fs::read(log).with_context(|| format!("read {}", log.display()))?;
    let found = bootlace_contract::status::parse_power_off(&String::from_utf8_lossy(&bytes));
    if json {
        println!(
            "{}",
            serde_json::json!({
                "log": log.display().to_string(),
                "exit_status": found.as_ref().map(|p| p.exit_status),
                "status": found.as_ref().map(|p| p.status.as_str()),
            })
        );
    }
    match found {
        Some(p) => {
            if !json {
                println!("{}", p.exit_status);
            }
            Ok(Exit::Success)
        }
        None => {
            eprintln!(
                "bootlace-agent: {} has no power-off status line",
                log.display()
            );
            Ok(Exit::Negative)
        }
    }
}
