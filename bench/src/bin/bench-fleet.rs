//! A fleet against one host agent: 10,000 simulated guests, then the abuse cases.
//!
//! One `bootlace-agent serve --fleet F --status-socket S --json` child per case. The fleet file
//! names every guest by its own hybrid-vsock socket (`[guests.vmI] socket = ".../vmI"`, as
//! real hosts have one socket per VM); every guest gets the same small bundle (an uncompressed
//! tar of a few KiB, `--bundle-bytes`), so that bundle bytes do not dominate.
//!
//! - **scale**: the guests are tasks on a one-worker tokio runtime in this process (no thread
//!   per guest), at most `--in-flight` of them between connect and READY at a time. Each
//!   connects, says HELLO, fetches the bundle (sha256 checked against the announced and the
//!   pinned digest), sends STEP and READY, each acknowledged, and keeps its connection open,
//!   as a guest does after READY. Measured: total time, per-guest latency (connect -> READY
//!   acked, p50/p99), failures (must be 0); the agent's VmRSS with its listeners up and again
//!   with every guest connected, the growth per guest, its thread count, and the counters of
//!   its status socket.
//! - the abuse cases: a well-behaved guest (the real blocking `Client`, on its own socket)
//!   timed connect -> READY acked, `--tries` times on the idle agent, then `--tries` times
//!   spread over `--abuse-secs` while the abuse runs: **per-guest** (`--idle` silent
//!   connections on one other guest's socket), **spread** (`--idle` silent connections spread
//!   over every other guest's socket), **fd-cap** (a `--fd-fleet`-guest fleet, the agent's
//!   RLIMIT_NOFILE at `--fd-limit`, `--fd-idle` silent connections: the default cap follows
//!   the limit), **emfile** (the same with `--max-connections` above what the limit allows, so
//!   accept() itself fails with EMFILE), **pids** (the agent in a pids cgroup whose pids.max
//!   is its thread count while the guests of the scale case connect). A silent connection that
//!   the agent closes is opened again after `--reconnect-ms`. Per case: the agent's notice
//!   lines (its stdout, counted per second), its counters, whether it is still alive.
//!
//! The agent needs two descriptors per guest (listener and connection) plus its reserve (64):
//! the bench raises RLIMIT_NOFILE as far as it may and, where the hard limit cannot be raised
//! (no CAP_SYS_RESOURCE), runs the largest fleet that fits and says so.
//!
//! A bin of its own rather than more of `bench-agent-scale`: that one runs thread-per-guest
//! clients against `serve --uds` with a 1 MiB bundle at several sizes; this one needs a fleet
//! file, the status socket, an async driver, child rlimits, a cgroup and abusers.
//!
//! Exit status 1 when a guest failed (any of the fleet, or the well-behaved one in any case)
//! or the agent died, 2 on a usage error, 3 on a setup error (`bootlace_bench::Exit`).

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_bench::fleet::{self, Agent, AgentOptions, FleetDir, IdleStats};
use bootlace_bench::{percentile_ms, EXIT_CODES_HELP};

/// Descriptors the agent keeps free of guest connections (`bootlace_agent::host::FD_RESERVE`)
/// plus its own (stdio, the event loop, the status socket).
const FD_OVERHEAD: u64 = bootlace_agent::host::FD_RESERVE as u64 + 64;
/// How long an agent may take to bind every socket of its fleet.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(180);
/// The pids cgroup hierarchy (cgroup v1).
const PIDS_ROOT: &str = "/sys/fs/cgroup/pids";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    Scale,
    /// The scale case with every guest known by its reported UUID on one shared socket.
    ScaleShared,
    PerGuest,
    Spread,
    FdCap,
    Emfile,
    Pids,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        match self.to_possible_value() {
            Some(v) => f.write_str(v.get_name()),
            None => write!(f, "{self:?}"),
        }
    }
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-fleet",
    about = "A fleet of simulated guests against one host agent, and the abuse cases",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Guests in the fleet (fewer when the open-file limit cannot hold two descriptors each).
    #[arg(long, default_value_t = 10_000)]
    guests: usize,
    /// Guests between connect and READY at a time.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    /// Size of the shared bundle's filler file, bytes (the tar adds its headers).
    #[arg(long, default_value_t = 2048)]
    bundle_bytes: usize,
    /// Which cases to run (comma-separated).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "scale,scale-shared,per-guest,spread,fd-cap,emfile,pids"
    )]
    cases: Vec<Case>,
    /// Tries of the well-behaved guest, idle and under abuse.
    #[arg(long, default_value_t = 20)]
    tries: usize,
    /// Seconds of abuse the tries are spread over.
    #[arg(long, default_value_t = 12.0)]
    abuse_secs: f64,
    /// Silent connections of the per-guest and spread cases.
    #[arg(long, default_value_t = 10_000)]
    idle: usize,
    /// Pause before a silent connection the agent closed is opened again, ms.
    #[arg(long, default_value_t = 1000)]
    reconnect_ms: u64,
    /// Guests in the fleet of the fd cases.
    #[arg(long, default_value_t = 1000)]
    fd_fleet: usize,
    /// The agent's RLIMIT_NOFILE (soft and hard) in the fd cases.
    #[arg(long, default_value_t = 1100)]
    fd_limit: u64,
    /// Silent connections of the fd cases.
    #[arg(long, default_value_t = 2000)]
    fd_idle: usize,
    /// `--max-connections` of the emfile case (above what --fd-limit allows).
    #[arg(long, default_value_t = 5000)]
    emfile_max_connections: usize,
    /// The bootlace-agent binary (default: next to this binary, else
    /// target/release/bootlace-agent).
    #[arg(long, env = "BOOTLACE_AGENT")]
    agent: Option<PathBuf>,
}

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-fleet", bench(&args)),
        Err(code) => code.into(),
    }
}

/// RLIMIT_NOFILE raised for `guests` (hard limit too, where allowed); the soft limit now,
/// and why it is lower than wanted, if it is.
fn raise_nofile(guests: usize) -> (u64, Option<String>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let want = 2 * guests as u64 + FD_OVERHEAD;
    let lim = getrlimit(Resource::Nofile);
    let hard = lim.maximum.unwrap_or(u64::MAX);
    let mut why = None;
    if hard < want {
        let more = Rlimit {
            current: Some(want),
            maximum: Some(want),
        };
        if let Err(e) = setrlimit(Resource::Nofile, more) {
            why = Some(format!(
                "the open-file hard limit is {hard} and raising it to {want} failed ({e}: \
                 it takes CAP_SYS_RESOURCE)"
            ));
        }
    }
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    (soft, why)
}

/// The guests of one scale run: each one's latency, the failures, the open connections.
struct Run {
    latencies: Vec<Duration>,
    failures: Vec<String>,
    total: Duration,
    streams: Vec<tokio::net::UnixStream>,
}

/// Every socket's guest, at most `in_flight` between connect and READY at a time.
async fn run_guests(sockets: Vec<PathBuf>, pinned: Arc<str>, in_flight: usize) -> Run {
    let gate = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
    let mut set = tokio::task::JoinSet::new();
    let started = Instant::now();
    for (i, socket) in sockets.into_iter().enumerate() {
        let Ok(permit) = Arc::clone(&gate).acquire_owned().await else {
            break;
        };
        let pinned = Arc::clone(&pinned);
        set.spawn(async move {
            let r = fleet::guest(&socket, i, &pinned).await;
            drop(permit);
            r.map_err(|e| format!("guest {i} ({}): {e:#}", socket.display()))
        });
    }
    let mut run = Run {
        latencies: Vec::new(),
        failures: Vec::new(),
        total: Duration::ZERO,
        streams: Vec::new(),
    };
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok((lat, stream))) => {
                run.latencies.push(lat);
                run.streams.push(stream);
            }
            Ok(Err(e)) => run.failures.push(e),
            Err(e) => run.failures.push(format!("a guest task ended: {e}")),
        }
    }
    run.total = started.elapsed();
    run
}

/// What the scale case measured.
struct Scale {
    guests: usize,
    run: Run,
    rss_before_kib: Option<u64>,
    rss_after_kib: Option<u64>,
    hwm_kib: Option<u64>,
    threads_before: Option<u64>,
    threads_after: Option<u64>,
    counters: serde_json::Value,
    agent_dead: Option<String>,
    listen_time: Duration,
    lines: u64,
}

/// Waits until the agent's stdout has `lines` lines, or has not grown for a second.
fn settle(agent: &Agent, lines: u64) {
    let mut last = (agent.out.lines.load(Ordering::Relaxed), Instant::now());
    loop {
        let now = agent.out.lines.load(Ordering::Relaxed);
        if now >= lines || last.1.elapsed() > Duration::from_secs(1) {
            return;
        }
        if now != last.0 {
            last = (now, Instant::now());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn scale(
    rt: &tokio::runtime::Runtime,
    opts: &AgentOptions,
    n: usize,
    args: &Args,
    bundle: &[u8],
    shared: bool,
) -> anyhow::Result<Scale> {
    let fleet = if shared {
        FleetDir::write_shared(n, bundle)?
    } else {
        FleetDir::write(n, false, bundle)?
    };
    let t = Instant::now();
    let mut agent = Agent::start(opts, &fleet, LISTEN_TIMEOUT)?;
    let listen_time = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss_before_kib = agent.proc_status("VmRSS");
    let threads_before = agent.proc_status("Threads");
    let pinned: Arc<str> = Arc::from(fleet.pinned.as_str());
    let run = rt.block_on(run_guests(fleet.others().to_vec(), pinned, args.in_flight));
    // Five events per guest: connected, hello, bundle_sent, STEP, READY.
    settle(&agent, 5 * n as u64);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_kib = agent.proc_status("VmRSS");
    let threads_after = agent.proc_status("Threads");
    let hwm_kib = agent.proc_status("VmHWM");
    let counters = agent
        .counters()
        .unwrap_or_else(|e| serde_json::json!({"error": format!("{e:#}")}));
    let agent_dead = agent.exited()?;
    let lines = agent.out.lines.load(Ordering::Relaxed);
    Ok(Scale {
        guests: n,
        run,
        rss_before_kib,
        rss_after_kib,
        hwm_kib,
        threads_before,
        threads_after,
        counters,
        agent_dead,
        listen_time,
        lines,
    })
}

/// The abuse a case runs while the well-behaved guest tries.
enum Abuse {
    /// Silent connections on these sockets (one per entry), reopened when closed.
    Idle(Vec<PathBuf>),
    /// The fleet's other guests, as in the scale case.
    Guests,
}

/// One abuse case.
struct Spec {
    case: Case,
    what: String,
    fleet_guests: usize,
    nofile: Option<(u64, u64)>,
    extra: Vec<String>,
    abuse: fn(&FleetDir, &Args) -> Abuse,
    pids: bool,
}

/// What one abuse case measured.
struct AbuseResult {
    case: Case,
    what: String,
    idle_ms: Vec<f64>,
    abused_ms: Vec<f64>,
    failures: Vec<String>,
    /// The fleet's guests that connected alongside (the pids case) and failed.
    fleet_failures: Vec<String>,
    reconnects: u64,
    counters: serde_json::Value,
    notices: (usize, usize),
    notice_secs: f64,
    examples: Vec<String>,
    agent_dead: Option<String>,
    rss_kib: Option<u64>,
    threads: Option<u64>,
    idle_stats: Option<IdleCounts>,
    note: String,
}

/// `tries` of the well-behaved guest, one every `every`; latencies (ms, sorted), failures,
/// and the connections beyond one per try.
fn tries(
    fleet: &FleetDir,
    tries: usize,
    every: Duration,
    tag: usize,
) -> (Vec<f64>, Vec<String>, u64) {
    let Some(socket) = fleet.good.clone() else {
        return (
            Vec::new(),
            vec!["no well-behaved guest in the fleet".to_owned()],
            0,
        );
    };
    let mut ms = Vec::new();
    let mut failures = Vec::new();
    let mut extra = 0;
    for i in 0..tries {
        let slot = Instant::now();
        match fleet::good_guest(&socket, tag + i, fleet) {
            Ok((d, connects)) => {
                ms.push(d.as_secs_f64() * 1000.0);
                extra += connects.saturating_sub(1);
            }
            Err(e) => failures.push(format!("try {i}: {e:#}")),
        }
        if let Some(rest) = every.checked_sub(slot.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    ms.sort_by(f64::total_cmp);
    (ms, failures, extra)
}

/// A pids cgroup holding the agent; the agent is moved back out and the group removed on drop.
struct PidsGroup {
    dir: PathBuf,
}

impl PidsGroup {
    fn enter(pid: u32, max: u64) -> anyhow::Result<PidsGroup> {
        let dir = Path::new(PIDS_ROOT).join(format!("bench-fleet-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| {
            format!("create the pids cgroup {} (cgroup v1, root)", dir.display())
        })?;
        let g = PidsGroup { dir };
        std::fs::write(g.dir.join("pids.max"), max.to_string()).context("write pids.max")?;
        std::fs::write(g.dir.join("cgroup.procs"), pid.to_string())
            .context("move the agent into the pids cgroup")?;
        Ok(g)
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file))
            .unwrap_or_default()
            .trim()
            .replace('\n', " ")
    }
}

impl Drop for PidsGroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.split_whitespace() {
            let _ = std::fs::write(Path::new(PIDS_ROOT).join("cgroup.procs"), p);
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("bench-fleet: remove {}: {e}", self.dir.display());
        }
    }
}

/// What the silent connections did (see [`IdleStats`]).
#[derive(Debug, Clone, Copy)]
struct IdleCounts {
    opened: u64,
    open: u64,
    closed_by_host: u64,
    connect_failed: u64,
}

/// The abuse, running on the runtime.
struct Running {
    abusers: tokio::task::JoinSet<()>,
    guests: Option<tokio::task::JoinHandle<Run>>,
    stats: Arc<IdleStats>,
}

impl Running {
    /// Starts `abuse`; silent connections are all opened (or failed) before it returns.
    fn start(rt: &tokio::runtime::Runtime, fleet: &FleetDir, abuse: Abuse, args: &Args) -> Running {
        let mut r = Running {
            abusers: tokio::task::JoinSet::new(),
            guests: None,
            stats: Arc::new(IdleStats::default()),
        };
        let pause = Duration::from_millis(args.reconnect_ms);
        match abuse {
            Abuse::Idle(sockets) => {
                let count = sockets.len() as u64;
                for s in sockets {
                    let idle = fleet::idle(s, pause, Arc::clone(&r.stats));
                    r.abusers.spawn_on(idle, rt.handle());
                }
                let deadline = Instant::now() + Duration::from_secs(5);
                while r.stats.opened.load(Ordering::Relaxed)
                    + r.stats.connect_failed.load(Ordering::Relaxed)
                    < count
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Abuse::Guests => {
                let pinned: Arc<str> = Arc::from(fleet.pinned.as_str());
                let sockets = fleet.others().to_vec();
                r.guests = Some(rt.spawn(run_guests(sockets, pinned, args.in_flight)));
            }
        }
        r
    }

    /// Stops the silent connections (closing them), waits for the guests; what each did.
    fn stop(
        mut self,
        rt: &tokio::runtime::Runtime,
    ) -> anyhow::Result<(Option<IdleCounts>, Option<Run>)> {
        let s = &self.stats;
        let idle = (!self.abusers.is_empty()).then(|| IdleCounts {
            opened: s.opened.load(Ordering::Relaxed),
            open: s.open.load(Ordering::Relaxed),
            closed_by_host: s.closed_by_host.load(Ordering::Relaxed),
            connect_failed: s.connect_failed.load(Ordering::Relaxed),
        });
        rt.block_on(self.abusers.shutdown());
        let run = match self.guests {
            Some(g) => Some(rt.block_on(g).context("the guests' task")?),
            None => None,
        };
        Ok((idle, run))
    }
}

fn abuse_case(
    rt: &tokio::runtime::Runtime,
    opts: &AgentOptions,
    spec: &Spec,
    args: &Args,
    bundle: &[u8],
) -> anyhow::Result<AbuseResult> {
    eprintln!("bench-fleet: {}: {} ...", spec.case, spec.what);
    let fleet = FleetDir::write(spec.fleet_guests.saturating_sub(1), true, bundle)?;
    let opts = AgentOptions {
        nofile: spec.nofile.or(opts.nofile),
        extra: spec.extra.clone(),
        ..opts.clone()
    };
    let mut agent = Agent::start(&opts, &fleet, LISTEN_TIMEOUT)?;
    let group = if spec.pids {
        let threads = agent
            .proc_status("Threads")
            .context("the agent's thread count")?;
        Some(PidsGroup::enter(agent.pid(), threads)?)
    } else {
        None
    };
    let (idle_ms, mut failures, _) = tries(&fleet, args.tries, Duration::from_millis(20), 0);
    let ramp = Instant::now();
    let running = Running::start(rt, &fleet, (spec.abuse)(&fleet, args), args);
    let every = Duration::from_secs_f64(args.abuse_secs / args.tries.max(1) as f64);
    let (abused_ms, f, reconnects) = tries(&fleet, args.tries, every, 1000);
    failures.extend(f);
    let rss_kib = agent.proc_status("VmRSS");
    let threads = agent.proc_status("Threads");
    let notice_secs = ramp.elapsed().as_secs_f64();
    let notices = agent.out.notices_since(ramp);
    let (idle_stats, run) = running.stop(rt)?;
    let mut note = String::new();
    let mut fleet_failures = Vec::new();
    if let Some(run) = run {
        note = format!(
            "{} guests connected and READY alongside, {} failed, in {:.2} s; ",
            run.latencies.len(),
            run.failures.len(),
            run.total.as_secs_f64()
        );
        fleet_failures = run.failures;
    }
    let counters = agent
        .counters()
        .unwrap_or_else(|e| serde_json::json!({"error": format!("{e:#}")}));
    if let Some(g) = &group {
        note.push_str(&format!(
            "pids.max {}, pids.current {}, pids.events {:?} (clone() refused that often)",
            g.read("pids.max"),
            g.read("pids.current"),
            g.read("pids.events")
        ));
    }
    let agent_dead = agent.exited()?;
    let examples = agent.out.examples();
    drop(agent);
    drop(group);
    Ok(AbuseResult {
        case: spec.case,
        what: spec.what.clone(),
        idle_ms,
        abused_ms,
        failures,
        fleet_failures,
        reconnects,
        counters,
        notices,
        notice_secs,
        examples,
        agent_dead,
        rss_kib,
        threads,
        idle_stats,
        note,
    })
}

/// `count` sockets taken round-robin from `from`.
fn spread(from: &[PathBuf], count: usize) -> Vec<PathBuf> {
    from.iter()
        .cycle()
        .take(if from.is_empty() { 0 } else { count })
        .cloned()
        .collect()
}

fn specs(args: &Args, n: usize) -> Vec<Spec> {
    let mut out = Vec::new();
    for &case in &args.cases {
        let spec = match case {
            Case::Scale | Case::ScaleShared => continue,
            Case::PerGuest => Spec {
                case,
                what: format!("{} silent connections on one other guest's socket", args.idle),
                fleet_guests: 2,
                nofile: None,
                extra: Vec::new(),
                abuse: |f, a| Abuse::Idle(spread(f.others(), a.idle)),
                pids: false,
            },
            Case::Spread => Spec {
                case,
                what: format!("{} silent connections over {} other guests' sockets", args.idle, n - 1),
                fleet_guests: n,
                nofile: None,
                extra: Vec::new(),
                abuse: |f, a| Abuse::Idle(spread(f.others(), a.idle)),
                pids: false,
            },
            Case::FdCap => Spec {
                case,
                what: format!(
                    "{} silent connections, {}-guest fleet, RLIMIT_NOFILE {} (default cap: the limit less the listeners and 64)",
                    args.fd_idle, args.fd_fleet, args.fd_limit
                ),
                fleet_guests: args.fd_fleet,
                nofile: Some((args.fd_limit, args.fd_limit)),
                extra: Vec::new(),
                abuse: |f, a| Abuse::Idle(spread(f.others(), a.fd_idle)),
                pids: false,
            },
            Case::Emfile => Spec {
                case,
                what: format!(
                    "{} silent connections, {}-guest fleet, RLIMIT_NOFILE {}, --max-connections {} (accept() fails with EMFILE)",
                    args.fd_idle, args.fd_fleet, args.fd_limit, args.emfile_max_connections
                ),
                fleet_guests: args.fd_fleet,
                nofile: Some((args.fd_limit, args.fd_limit)),
                extra: vec!["--max-connections".to_owned(), args.emfile_max_connections.to_string()],
                abuse: |f, a| Abuse::Idle(spread(f.others(), a.fd_idle)),
                pids: false,
            },
            Case::Pids => Spec {
                case,
                what: format!("pids.max = the agent's threads, while {} guests connect and stay", n - 1),
                fleet_guests: n,
                nofile: None,
                extra: Vec::new(),
                abuse: |_, _| Abuse::Guests,
                pids: true,
            },
        };
        out.push(spec);
    }
    out
}

/// Every case, then the report; `Ok(false)` when a guest failed or the agent died.
fn bench(args: &Args) -> anyhow::Result<bool> {
    let agent_bin = bootlace_bench::agent_binary(args.agent.as_deref())?;
    if args.guests < 2 {
        bail!("--guests must be at least 2");
    }
    let (soft, why) = raise_nofile(args.guests);
    let fits = usize::try_from(soft.saturating_sub(FD_OVERHEAD) / 2).unwrap_or(usize::MAX);
    let n = args.guests.min(fits);
    let fd_note = (n < args.guests).then(|| {
        format!(
            "{} guests instead of {}: {}; the agent needs 2 per guest plus {FD_OVERHEAD}",
            n,
            args.guests,
            why.clone()
                .unwrap_or_else(|| format!("the open-file limit is {soft}"))
        )
    });
    if let Some(note) = &fd_note {
        eprintln!("bench-fleet: {note}");
    }
    let bundle = fleet::small_bundle(args.bundle_bytes)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("the guests' runtime")?;
    let opts = AgentOptions {
        bin: agent_bin,
        nofile: None,
        extra: Vec::new(),
    };
    let load = loadavg();
    let mut scale_result = None;
    if args.cases.contains(&Case::Scale) {
        eprintln!("bench-fleet: scale: {n} guests ...");
        scale_result = Some(scale(&rt, &opts, n, args, &bundle, false)?);
    }
    let mut shared_result = None;
    if args.cases.contains(&Case::ScaleShared) {
        // One descriptor per guest: the whole fleet fits where one socket per guest does not.
        let n = args.guests.min(
            usize::try_from(soft)
                .unwrap_or(usize::MAX)
                .saturating_sub(256),
        );
        eprintln!("bench-fleet: scale-shared: {n} guests on one socket ...");
        shared_result = Some(scale(&rt, &opts, n, args, &bundle, true)?);
    }
    let mut abuse = Vec::new();
    for spec in specs(args, n) {
        abuse.push(abuse_case(&rt, &opts, &spec, args, &bundle)?);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "Fleet bench: one `bootlace-agent serve --fleet` process, one hybrid-vsock socket per \
         guest, one shared bundle of {} bytes (an uncompressed tar, so bundle bytes do not \
         dominate); {} CPUs, load average before: {load}; RLIMIT_NOFILE {soft}.\n",
        bundle.len(),
        std::thread::available_parallelism().map_or(0, |c| c.get()),
    )?;
    if let Some(note) = &fd_note {
        writeln!(out, "Note: {note}.\n")?;
    }
    let mut ok = true;
    if let Some(s) = &scale_result {
        ok &= write_scale(&mut out, s, args.in_flight, "one socket per guest")?;
    }
    if let Some(s) = &shared_result {
        ok &= write_scale(
            &mut out,
            s,
            args.in_flight,
            "one shared socket, each guest known by the SMBIOS UUID it reports",
        )?;
    }
    if !abuse.is_empty() {
        ok &= write_abuse(&mut out, &abuse)?;
    }
    Ok(ok)
}

fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn counter(c: &serde_json::Value, name: &str) -> String {
    c[name]
        .as_u64()
        .map_or_else(|| "?".to_owned(), |v| v.to_string())
}

/// The scale table; whether it passed (no failure, the agent alive).
fn write_scale(
    out: &mut impl io::Write,
    s: &Scale,
    in_flight: usize,
    how: &str,
) -> io::Result<bool> {
    let mut ms: Vec<f64> = s
        .run
        .latencies
        .iter()
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let per_guest = match (s.rss_before_kib, s.rss_after_kib) {
        (Some(b), Some(a)) => format!("{:.0}", (a as f64 - b as f64) * 1024.0 / s.guests as f64),
        _ => "?".to_owned(),
    };
    writeln!(
        out,
        "## {} guests, {how} (at most {in_flight} between connect and READY at a time)\n",
        s.guests
    )?;
    writeln!(out, "| guests | total s | p50 ms | p99 ms | failures | agent VmRSS before MiB | with all connected MiB | bytes per guest | threads |")?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| {} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {per_guest} | {} |\n",
        s.guests,
        s.run.total.as_secs_f64(),
        percentile_ms(&ms, 0.50),
        percentile_ms(&ms, 0.99),
        s.run.failures.len(),
        bootlace_bench::mib(s.rss_before_kib),
        bootlace_bench::mib(s.rss_after_kib),
        s.threads_after
            .map_or_else(|| "?".to_owned(), |t| t.to_string()),
    )?;
    let c = &s.counters;
    writeln!(
        out,
        "- latency: connect -> READY acked per guest (nearest rank); total: first connect -> last READY acked\n\
         - agent: up for {} fleet guests in {:.2} s; VmRSS {} MiB with its listeners up and no guest ({:.0} bytes per \
         fleet guest, its listener if it has one, the fleet entry and the base included); VmHWM {} MiB at the end; threads {} before the guests, {} with them\n\
         - status counters with all connected: connections_open {}, connections_accepted {}, refused_per_guest {}, \
         refused_global {}, evicted {}, accept_errors {}, listeners {}\n\
         - agent stdout: {} JSON lines\n",
        s.guests,
        s.listen_time.as_secs_f64(),
        bootlace_bench::mib(s.rss_before_kib),
        s.rss_before_kib.map_or(0.0, |b| b as f64 * 1024.0 / s.guests as f64),
        bootlace_bench::mib(s.hwm_kib),
        s.threads_before.map_or_else(|| "?".to_owned(), |t| t.to_string()),
        s.threads_after.map_or_else(|| "?".to_owned(), |t| t.to_string()),
        counter(c, "connections_open"),
        counter(c, "connections_accepted"),
        counter(c, "refused_per_guest"),
        counter(c, "refused_global"),
        counter(c, "evicted"),
        counter(c, "accept_errors"),
        counter(c, "listeners"),
        s.lines,
    )?;
    for f in s.run.failures.iter().take(10) {
        writeln!(out, "- FAILED: {f}")?;
    }
    if let Some(why) = &s.agent_dead {
        writeln!(out, "- FAILED: the agent exited {why}")?;
    }
    Ok(s.run.failures.is_empty() && s.agent_dead.is_none())
}

/// The abuse table and its notes; whether every case passed.
fn write_abuse(out: &mut impl io::Write, rs: &[AbuseResult]) -> io::Result<bool> {
    writeln!(out, "## Abuse: a well-behaved guest (the real client) connect -> READY acked, idle agent then under abuse\n")?;
    writeln!(out, "| case | idle median ms | abused median ms | abused max ms | ratio | failed | refused per guest | refused global | evicted | accept errors | notice lines (max per s) | agent |")?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )?;
    let mut ok = true;
    for r in rs {
        let idle = percentile_ms(&r.idle_ms, 0.5);
        let abused = percentile_ms(&r.abused_ms, 0.5);
        let c = &r.counters;
        writeln!(
            out,
            "| {} | {idle:.2} | {abused:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} ({}) | {} |",
            r.case,
            r.abused_ms.last().copied().unwrap_or(f64::NAN),
            abused / idle,
            r.failures.len(),
            counter(c, "refused_per_guest"),
            counter(c, "refused_global"),
            counter(c, "evicted"),
            counter(c, "accept_errors"),
            r.notices.0,
            r.notices.1,
            if r.agent_dead.is_some() { "DIED" } else { "alive" },
        )?;
        ok &= r.failures.is_empty() && r.fleet_failures.is_empty() && r.agent_dead.is_none();
    }
    writeln!(out)?;
    for r in rs {
        write_abuse_notes(out, r)?;
    }
    Ok(ok)
}

fn write_abuse_notes(out: &mut impl io::Write, r: &AbuseResult) -> io::Result<()> {
    writeln!(out, "- {}: {}", r.case, r.what)?;
    if let Some(i) = r.idle_stats {
        writeln!(
            out,
            "  - silent connections: {} opened, {} closed by the agent, {} still open at the \
             end, {} connect() failures",
            i.opened, i.closed_by_host, i.open, i.connect_failed
        )?;
    }
    writeln!(
        out,
        "  - agent: VmRSS {} MiB, threads {} under abuse; {} notice lines in {:.1} s (at most {} in one second); \
         the good guest reconnected {} times in all",
        bootlace_bench::mib(r.rss_kib),
        r.threads.map_or_else(|| "?".to_owned(), |t| t.to_string()),
        r.notices.0,
        r.notice_secs,
        r.notices.1,
        r.reconnects
    )?;
    if !r.note.is_empty() {
        writeln!(out, "  - {}", r.note)?;
    }
    for e in r.examples.iter().take(3) {
        let short: String = e.chars().take(240).collect();
        writeln!(out, "  - notice: `{short}`")?;
    }
    for f in r.failures.iter().take(5) {
        writeln!(out, "  - FAILED: the well-behaved guest: {f}")?;
    }
    for f in r.fleet_failures.iter().take(5) {
        writeln!(out, "  - FAILED: {f}")?;
    }
    if let Some(why) = &r.agent_dead {
        writeln!(out, "  - FAILED: the agent exited {why}")?;
    }
    Ok(())
}
