//! `bootlace-agent`: the host configuration manager.
//!
//! - `serve`: serve a bundle to guests and print what each reports, until killed;
//! - `wait-ready`: the same, ending when a guest reports READY or FAILED or the timeout passes;
//! - `exit-status LOG`: the EXIT_STATUS a guest printed on its console.
//!
//! The exit codes are defined once, in [`Exit`], and listed in `--help` ([`EXIT_CODES`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_agent::fault::Fault;
use bootlace_agent::fleet::Fleet;
use bootlace_agent::host::{self, BundleSource, Event, Faults, GuestEvent, Host, Limits};
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
    /// Bundle to serve every guest: a tarball (tar, tar.gz, tar.zst) or a directory tarred
    /// on the fly.
    #[arg(long, conflicts_with = "fleet")]
    bundle: Option<PathBuf>,
    /// Fleet file (or directory of them) mapping each guest, by socket, CID or SMBIOS UUID,
    /// to its bundle, hostname, vars and image; listens on every guest's socket; changes
    /// apply without a restart (docs/host.md).
    #[arg(long, value_name = "PATH")]
    fleet: Option<PathBuf>,
    /// Answer `bootlace-agent status` on this Unix socket (mode 0600).
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`), e.g.
    /// 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Also append every event as a JSON line to this file.
    #[arg(long, value_name = "FILE")]
    events: Option<PathBuf>,
    /// Connections open at once, all guests together (0: what the open-file limit allows).
    #[arg(long, default_value_t = 0)]
    max_connections: usize,
    /// Connections open at once from one guest (one socket or CID).
    #[arg(long, default_value_t = 8)]
    max_per_guest: u32,
    /// Seconds a new connection has to say HELLO.
    #[arg(long, default_value_t = 10)]
    hello_timeout: u64,
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
        /// Wait for this guest (its fleet name or socket; repeatable: every one of them);
        /// without it, the first guest that is ready.
        #[arg(long = "guest", value_name = "NAME")]
        guests: Vec<String>,
    },
    /// Print what a fleet gives each guest (or the named ones): its bundle's size and sha256
    /// (what to hand a VM out of band, e.g. `bootlace-vm --oob-digest`), image and whether the
    /// bundle is signed; checks the fleet as `serve` would.
    #[command(after_help = EXIT_CODES)]
    Resolve {
        /// The fleet file or directory.
        #[arg(long, value_name = "PATH")]
        fleet: PathBuf,
        /// The port guests dial (sockets are `<socket>_<port>`).
        #[arg(long, default_value_t = DEFAULT_PORT)]
        port: u32,
        /// One JSON object per guest, one per line.
        #[arg(long)]
        json: bool,
        /// Only these guests.
        guests: Vec<String>,
    },
    /// Print the table of guests of a running agent (`serve --status-socket PATH`).
    #[command(after_help = EXIT_CODES)]
    Status {
        /// The agent's status socket.
        #[arg(long, value_name = "PATH")]
        socket: PathBuf,
        /// The table as JSON (exactly as the agent keeps it).
        #[arg(long, conflicts_with = "metrics")]
        json: bool,
        /// Prometheus' text format.
        #[arg(long)]
        metrics: bool,
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
            let (_host, rx) = start(&l)?;
            let mut out = Printer::new(&l)?;
            for e in rx {
                out.print(&e);
            }
            Ok(Exit::Success)
        }
        Cmd::WaitReady {
            listen,
            timeout,
            until,
            guests,
        } => wait_ready(&listen, Duration::from_secs(timeout), until, &guests),
        Cmd::Status {
            socket,
            json,
            metrics,
        } => status(&socket, json, metrics),
        Cmd::Resolve {
            fleet,
            port,
            json,
            guests,
        } => resolve(&fleet, port, json, &guests),
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

/// Raises the soft open-file limit to the hard one: every guest connection is a descriptor.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// Events waiting for the printer at most.
const EVENT_QUEUE: usize = 262_144;

/// Events waiting for the printer now.
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// Events dropped because the printer was [`EVENT_QUEUE`] behind.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Where events go: stdout (text or JSON lines) and, with `--events`, a JSON-lines file.
struct Printer {
    json: bool,
    events: Option<std::io::LineWriter<std::fs::File>>,
}

impl Printer {
    fn new(l: &Listen) -> anyhow::Result<Printer> {
        let events = match &l.events {
            Some(p) => Some(std::io::LineWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("open the events file {}", p.display()))?,
            )),
            None => None,
        };
        Ok(Printer {
            json: l.json,
            events,
        })
    }

    fn print(&mut self, e: &GuestEvent) {
        QUEUED.fetch_sub(1, Ordering::Relaxed);
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            self.print_one(&GuestEvent {
                guest: "bootlace-agent".to_owned(),
                name: None,
                event: Event::Notice(format!(
                    "{dropped} events not shown: the output fell {EVENT_QUEUE} events behind"
                )),
            });
        }
        self.print_one(e);
    }

    fn print_one(&mut self, e: &GuestEvent) {
        if self.json {
            println!("{}", host::to_json(e));
        } else {
            let who = match &e.name {
                Some(n) => format!("{} {}", host::escape_controls(n), e.guest),
                None => e.guest.clone(),
            };
            println!("[{who}] {}", host::describe(&e.event));
        }
        if let Some(f) = self.events.as_mut() {
            use std::io::Write as _;
            if let Err(err) = writeln!(f, "{}", host::to_json(e)) {
                eprintln!("bootlace-agent: events file: {err}; no longer written");
                self.events = None;
            }
        }
    }
}

/// Starts every listener; the events of every guest arrive on the receiver.
fn start(l: &Listen) -> anyhow::Result<(Arc<Host>, mpsc::Receiver<GuestEvent>)> {
    if l.uds.is_empty() && !l.vsock && l.fleet.is_none() {
        bail!("nothing to listen on: give --uds PATH, --vsock and/or --fleet PATH");
    }
    raise_nofile();
    // Bounded: the event loop never waits for the output, and a stalled stdout cannot grow the
    // agent's memory past EVENT_QUEUE events; what does not fit is counted and reported by the
    // printer. (A channel that allocates as it fills: a preallocated one of that size would
    // cost megabytes for nothing.)
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let sink = move |e| {
        if QUEUED.fetch_add(1, Ordering::Relaxed) >= EVENT_QUEUE {
            QUEUED.fetch_sub(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
        } else if let Ok(t) = tx.lock() {
            let _ = t.send(e);
        }
    };
    let faults: Faults = l.faults.iter().copied().collect();
    if faults.any() {
        let flags: Vec<String> = l.faults.iter().map(Fault::to_string).collect();
        eprintln!("bootlace-agent: injecting faults: {}", flags.join(" "));
    }
    let fleet = match &l.fleet {
        Some(p) => {
            let f = Fleet::open(p, l.port).with_context(|| format!("fleet {}", p.display()))?;
            eprintln!(
                "bootlace-agent: fleet {}: {} guests",
                p.display(),
                f.current().len()
            );
            Some(f)
        }
        None => None,
    };
    let host = match &fleet {
        Some(f) => Host::with_resolver(Arc::clone(f) as Arc<dyn host::Resolve>, sink),
        None => Host::new(load_bundle(l.bundle.as_deref())?, sink),
    };
    let host = Arc::new(host.with_faults(faults).with_limits(Limits {
        max_connections: l.max_connections,
        max_per_guest: l.max_per_guest.max(1),
        hello_timeout: Duration::from_secs(l.hello_timeout.max(1)),
        ..Limits::default()
    }));
    for uds in &l.uds {
        let path = host::hybrid_path(uds, l.port);
        host.serve_unix(&path)
            .with_context(|| format!("listen on {}", path.display()))?;
        eprintln!("bootlace-agent: listening on {}", path.display());
    }
    if l.vsock {
        host.serve_vsock(l.port)
            .with_context(|| format!("listen on AF_VSOCK port {}", l.port))?;
        eprintln!("bootlace-agent: listening on vsock port {}", l.port);
    }
    if let Some(f) = &fleet {
        f.watch(&host, FLEET_CHECK)
            .context("watch the fleet for changes")?;
    }
    if let Some(a) = l.metrics {
        let bound = host
            .serve_metrics(a)
            .with_context(|| format!("metrics on {a}"))?;
        eprintln!("bootlace-agent: metrics on http://{bound}/metrics");
    }
    if let Some(p) = &l.status_socket {
        host.serve_status(p)
            .with_context(|| format!("status socket {}", p.display()))?;
        eprintln!("bootlace-agent: status on {}", p.display());
    }
    Ok((host, rx))
}

/// How often the fleet's files are checked for changes.
const FLEET_CHECK: Duration = Duration::from_secs(1);

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
fn wait_ready(
    l: &Listen,
    timeout: Duration,
    until: Until,
    guests: &[String],
) -> anyhow::Result<Exit> {
    let (_host, rx) = start(l)?;
    let mut out = Printer::new(l)?;
    let outcome = wait_for_outcome(&mut out, &rx, timeout, until, guests);
    match &outcome {
        Outcome::Ready { .. } => {}
        Outcome::Failed { guest, status } => eprintln!(
            "bootlace-agent: {} failed: {}",
            host::escape_controls(guest),
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
/// or FAILED report, or the deadline; with `guests`, until each of them is ready (or one
/// fails). Only reports the host believed count: a report arrives only from a connection
/// that said HELLO.
fn wait_for_outcome(
    out: &mut Printer,
    rx: &mpsc::Receiver<GuestEvent>,
    timeout: Duration,
    until: Until,
    guests: &[String],
) -> Outcome {
    let deadline = Instant::now() + timeout;
    let mut waiting: Vec<&String> = guests.iter().collect();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(e) = rx.recv_timeout(left) else {
            return Outcome::TimedOut;
        };
        out.print(&e);
        let Event::Report(f) = &e.event else { continue };
        let is = |g: &String| Some(g) == e.name.as_ref() || *g == e.guest;
        if !guests.is_empty() && !guests.iter().any(is) {
            continue;
        }
        let who = e.name.clone().unwrap_or_else(|| e.guest.clone());
        let status = f.get("STATUS").map(str::to_owned);
        let ready = match f.kind {
            Kind::Ready => until == Until::Bootlace,
            Kind::Step => {
                until == Until::Systemd
                    && f.get("STEP") == Some(bootlace_contract::protocol::SYSTEMD_READY_STEP)
            }
            Kind::Failed => return Outcome::Failed { guest: who, status },
            _ => false,
        };
        if ready {
            waiting.retain(|g| !is(g));
            if waiting.is_empty() {
                return Outcome::Ready { guest: who, status };
            }
        }
    }
}

/// `resolve --fleet PATH [GUEST…]`: what each guest gets.
fn resolve(fleet: &Path, port: u32, json: bool, guests: &[String]) -> anyhow::Result<Exit> {
    let loaded = bootlace_agent::fleet::Loaded::read(fleet, port)
        .with_context(|| format!("fleet {}", fleet.display()))?;
    let names: Vec<String> = if guests.is_empty() {
        loaded.names().map(str::to_owned).collect()
    } else {
        guests.to_vec()
    };
    for name in &names {
        let a = loaded
            .assignment(name)
            .with_context(|| format!("guest {name:?} is not in the fleet {}", fleet.display()))?;
        let b = a.bundle.as_ref();
        if json {
            println!(
                "{}",
                serde_json::json!({
                    "name": name,
                    "image": a.image,
                    "bundle": b.map(|b| serde_json::json!({
                        "size": b.bytes.len(),
                        "sha256": b.sha256,
                        "compression": b.compression.to_string(),
                        "signature": b.signature,
                    })),
                    "reason": a.reason,
                })
            );
        } else {
            match b {
                Some(b) => println!(
                    "{name}: {}{}",
                    b.summary(),
                    if b.signature.is_some() {
                        ", signed"
                    } else {
                        ", unsigned"
                    }
                ),
                None => println!("{name}: no bundle ({})", a.why_none()),
            }
        }
    }
    Ok(Exit::Success)
}

/// `status --socket PATH`: the agent's table of guests.
fn status(socket: &Path, json: bool, metrics: bool) -> anyhow::Result<Exit> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket)
        .with_context(|| format!("connect to the agent's status socket {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = if metrics { "metrics\n" } else { "status\n" };
    s.write_all(request.as_bytes())
        .with_context(|| format!("ask {}", socket.display()))?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)
        .with_context(|| format!("read the answer from {}", socket.display()))?;
    if metrics || json {
        print!("{answer}");
        return Ok(Exit::Success);
    }
    let v: serde_json::Value = serde_json::from_str(&answer)
        .with_context(|| format!("{} answered something that is not JSON", socket.display()))?;
    print!("{}", status_table(&v));
    Ok(Exit::Success)
}

/// The status JSON as a table for people (guest text escaped).
fn status_table(v: &serde_json::Value) -> String {
    let text = |x: &serde_json::Value| host::escape_controls(x.as_str().unwrap_or("-"));
    let short = |x: &serde_json::Value, n: usize| text(x).chars().take(n).collect::<String>();
    let mut rows = vec![[
        "GUEST",
        "STATE",
        "CONN",
        "BOOT",
        "IMAGE",
        "BUNDLE",
        "LAST ERROR",
    ]
    .map(str::to_owned)];
    for g in v["guests"].as_array().into_iter().flatten() {
        let name = if g["name"].is_string() {
            &g["name"]
        } else {
            &g["guest"]
        };
        rows.push([
            text(name),
            text(&g["state"]),
            g["connections"].to_string(),
            short(&g["boot_id"], 8),
            text(&g["image"]),
            short(&g["bundle_sha256"], 12),
            text(&g["last_error"]),
        ]);
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    let c = &v["counters"];
    out.push_str(&format!(
        "connections: {} open, {} accepted; refused: {} at the per-guest cap, {} at the global \
         cap; {} closed before HELLO to make room; {} accept errors\n",
        c["connections_open"],
        c["connections_accepted"],
        c["refused_per_guest"],
        c["refused_global"],
        c["evicted"],
        c["accept_errors"]
    ));
    out
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
