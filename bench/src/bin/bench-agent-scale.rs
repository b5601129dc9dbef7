//! Host agent scale: how the host agent copes with many guests booting at once.
//!
//! For each guest count N (`--guests 50,200,1000`), one `bootlace-agent serve` child process
//! listens on N hybrid-vsock Unix sockets (`<tmp>/vm<i>_1024`, one per VM, as real hosts have
//! one socket per VM) and serves one bundle (`--bundle-mib 1`: that many MiB of deterministic
//! pseudo-random bytes, so nothing compresses). N threads of this process, released together,
//! each play a guest with the real [`Client`]: connect and HELLO, fetch the bundle (the client
//! hashes it as received and checks it against the announced sha256; the guest also compares it
//! with the pinned digest), send a STEP and a READY, each acknowledged.
//!
//! Measured per N: the per-guest latency (connect -> READY acknowledged; p50 and p99,
//! nearest-rank), the wall time from the release of all guests to the last one done, failed
//! guests (must be 0), and the agent's peak RSS (`VmHWM` of the child, read just before it is
//! killed; the host alone, since the guests are in another process). Also printed: the agent's
//! peak RSS once its listeners are up and before any guest connects, this process's (the
//! guests') peak RSS per run, and the RSS growth per guest (least-squares slope of the agent's
//! peak over N).
//!
//! The agent binary is `--agent PATH` (or `$BOOTLACE_AGENT`), else `bootlace-agent` next to this
//! binary, else `target/release/bootlace-agent`; build it first:
//!
//! ```text
//! cargo build --release -p bootlace-agent
//! cargo run --release -p bootlace-bench --bin bench-agent-scale -- --guests 50,200,1000 --bundle-mib 1
//! ```
//!
//! RLIMIT_NOFILE is raised to its hard limit (the agent child inherits it): the agent holds
//! two descriptors per guest (listener and connection), this process one. Exit status 1 when
//! any guest failed (after printing the results), 2 on a usage error, 3 on a setup error
//! (`bootlace_bench::Exit`).

use std::io::{self, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_agent::client::{Client, Connector, Retry, Stream};
use bootlace_agent::host::hybrid_path;
use bootlace_bench::{percentile_ms, EXIT_CODES_HELP};
use bootlace_contract::protocol::Kind;

/// The port guests dial (the hybrid-vsock socket is `<base>_<port>`).
const PORT: u32 = 1024;
/// Per-read and per-write timeout of a guest's connection.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the agent may take to bind all its sockets.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-agent-scale",
    about = "The host agent against N simulated guests",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Guest counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50,200,1000", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    guests: Vec<usize>,
    /// Bundle size in MiB.
    #[arg(long, default_value_t = 1)]
    bundle_mib: u64,
    /// The bootlace-agent binary (default: next to this binary, else
    /// target/release/bootlace-agent).
    #[arg(long, env = "BOOTLACE_AGENT")]
    agent: Option<PathBuf>,
}

/// splitmix64: deterministic bytes without a dependency.
fn prng_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A `VmXxx:` field of a `/proc/<pid>/status` file, in KiB.
fn status_kib(status_path: &Path, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(status_path).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process (all its threads, live and ended) from
/// `/proc/<pid>/stat`, in seconds (the kernel reports it in USER_HZ = 100 ticks per second).
fn cpu_secs(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime), 1-based over the whole line; `rest` starts at 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
fn raise_nofile() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        let new = Rlimit {
            current: lim.maximum,
            maximum: lim.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            eprintln!("bench-agent-scale: raising RLIMIT_NOFILE: {e}");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The agent child; killed and reaped on drop.
struct Agent {
    child: Child,
    stderr_path: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// `bootlace-agent serve` on one hybrid-vsock socket per base path, serving `bundle`;
    /// its stderr goes to a file in `dir`.
    fn start(bin: &Path, dir: &Path, bases: &[PathBuf], bundle: &Path) -> anyhow::Result<Agent> {
        let stderr_path = dir.join("agent.stderr");
        let mut cmd = Command::new(bin);
        cmd.arg("serve").arg("--port").arg(PORT.to_string());
        cmd.arg("--bundle").arg(bundle);
        for b in bases {
            cmd.arg("--uds").arg(b);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).context("agent stderr file")?);
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        Ok(Agent { child, stderr_path })
    }

    fn status_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/status", self.child.id()))
    }

    /// Why the agent is gone, if it is (its exit status and stderr).
    fn exited(&mut self) -> anyhow::Result<Option<String>> {
        Ok(self.child.try_wait().context("agent status")?.map(|st| {
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            format!("({st}):\n{err}")
        }))
    }

    /// Waits until `last` exists: serve_unix binds the sockets in order, so then all are up.
    fn wait_listening(&mut self, last: &Path, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        while !last.exists() {
            if let Some(why) = self.exited()? {
                bail!("the agent exited {why} before listening");
            }
            if Instant::now() > deadline {
                bail!("the agent did not bind {n} sockets within {LISTEN_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }
}

struct RunResult {
    guests: usize,
    total: Duration,
    /// Connect -> READY acknowledged, per guest, sorted.
    latencies_ms: Vec<f64>,
    /// First guest started -> this guest's READY acknowledged, sorted.
    from_release_ms: Vec<f64>,
    /// First guest started -> last guest started (wake-up skew of the released threads).
    start_skew: Duration,
    failures: Vec<String>,
    agent_idle_hwm_kib: Option<u64>,
    agent_hwm_kib: Option<u64>,
    agent_cpu_s: Option<f64>,
    guests_hwm_kib: Option<u64>,
}

/// One simulated guest: connect -> HELLO -> bundle -> STEP -> READY. When it started (called
/// `Client::connect`) and when its READY was acknowledged.
fn guest(
    i: usize,
    socket: PathBuf,
    pinned: &str,
    bundle_len: u64,
) -> anyhow::Result<(Instant, Instant)> {
    let started = Instant::now();
    let connector: Connector = Box::new(move |_left| {
        let s = UnixStream::connect(&socket)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Box::new(s) as Box<dyn Stream>)
    });
    let hello = [
        ("BOOT_ID", format!("bench-{i:08}")),
        ("GUEST", format!("vm{i}")),
    ];
    let mut c = Client::connect(connector, &hello, Retry::default()).context("connect")?;
    let got = c
        .fetch_bundle(&mut io::sink(), bundle_len)
        .context("fetch bundle")?;
    if got.sha256 != pinned {
        bail!("bundle sha256 {} is not the pinned {pinned}", got.sha256);
    }
    if got.header.size != bundle_len {
        bail!("bundle of {} bytes, expected {bundle_len}", got.header.size);
    }
    c.send(
        Kind::Step,
        &[("STEP", "bundle".to_owned()), ("STATUS", "ok".to_owned())],
    )
    .context("STEP")?;
    c.send(Kind::Ready, &[("STATUS", "up".to_owned())])
        .context("READY")?;
    Ok((started, Instant::now()))
}

/// What the guests of one run did: each one's (start, READY acked), the failures, when they
/// were released and when the last thread was joined.
struct Guests {
    spans: Vec<(Instant, Instant)>,
    failures: Vec<String>,
    released: Instant,
    joined: Instant,
}

/// One thread per socket, released together; waits for every one.
fn run_guests(sockets: Vec<PathBuf>, bundle: &Bundle) -> anyhow::Result<Guests> {
    let n = sockets.len();
    let barrier = Arc::new(Barrier::new(n + 1));
    let pinned: Arc<str> = Arc::from(bundle.pinned.as_str());
    let len = bundle.len;
    let mut handles = Vec::with_capacity(n);
    for (i, socket) in sockets.into_iter().enumerate() {
        let barrier = Arc::clone(&barrier);
        let pinned = Arc::clone(&pinned);
        let h = std::thread::Builder::new()
            .name(format!("guest{i}"))
            .stack_size(256 * 1024)
            .spawn(move || {
                barrier.wait();
                guest(i, socket, &pinned, len)
            })
            .with_context(|| format!("spawn guest thread {i}"))?;
        handles.push(h);
    }
    barrier.wait();
    let released = Instant::now();
    let mut spans = Vec::with_capacity(n);
    let mut failures = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(span)) => spans.push(span),
            Ok(Err(e)) => failures.push(format!("guest {i}: {e:#}")),
            Err(_) => failures.push(format!("guest {i}: thread panicked")),
        }
    }
    Ok(Guests {
        spans,
        failures,
        released,
        joined: Instant::now(),
    })
}

/// One run with `n` guests against a fresh agent.
fn run(agent_bin: &Path, n: usize, bundle: &Bundle) -> anyhow::Result<RunResult> {
    let dir = tempfile::Builder::new()
        .prefix("bl-scale.")
        .tempdir()
        .context("temp dir")?;
    let bases: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("vm{i}"))).collect();
    let sockets: Vec<PathBuf> = bases.iter().map(|b| hybrid_path(b, PORT)).collect();
    let mut agent = Agent::start(agent_bin, dir.path(), &bases, &bundle.path)?;
    agent.wait_listening(sockets.last().context("no guests")?, n)?;
    let status_path = agent.status_path();
    let agent_idle_hwm_kib = status_kib(&status_path, "VmHWM");

    // Peak RSS of this process from here on (5 = reset VmHWM, Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let mut g = run_guests(sockets, bundle)?;
    let guests_hwm_kib = status_kib(Path::new("/proc/self/status"), "VmHWM");
    // Let the agent's connection threads see the hang-ups and finish their events.
    std::thread::sleep(Duration::from_millis(200));
    if let Some(why) = agent.exited()? {
        g.failures
            .push(format!("the agent exited during the run {why}"));
    }
    let agent_hwm_kib = status_kib(&status_path, "VmHWM");
    let agent_cpu_s = cpu_secs(agent.child.id());
    drop(agent);
    Ok(timings(
        n,
        g,
        agent_idle_hwm_kib,
        agent_hwm_kib,
        agent_cpu_s,
        guests_hwm_kib,
    ))
}

/// The run's figures from the guests' spans.
fn timings(
    n: usize,
    g: Guests,
    agent_idle_hwm_kib: Option<u64>,
    agent_hwm_kib: Option<u64>,
    agent_cpu_s: Option<f64>,
    guests_hwm_kib: Option<u64>,
) -> RunResult {
    // The clock starts when the first guest starts (the barrier released them all).
    let first = g.spans.iter().map(|s| s.0).min().unwrap_or(g.released);
    let last_start = g.spans.iter().map(|s| s.0).max().unwrap_or(g.released);
    let total = g.spans.iter().map(|s| s.1).max().unwrap_or(g.joined) - first;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut latencies_ms: Vec<f64> = g.spans.iter().map(|s| ms(s.1 - s.0)).collect();
    let mut from_release_ms: Vec<f64> = g.spans.iter().map(|s| ms(s.1 - first)).collect();
    latencies_ms.sort_by(|a, b| a.total_cmp(b));
    from_release_ms.sort_by(|a, b| a.total_cmp(b));
    RunResult {
        guests: n,
        total,
        latencies_ms,
        from_release_ms,
        start_skew: last_start - first,
        failures: g.failures,
        agent_idle_hwm_kib,
        agent_hwm_kib,
        agent_cpu_s,
        guests_hwm_kib,
    }
}

/// The bundle every guest fetches: `len` deterministic pseudo-random bytes in a file.
struct Bundle {
    _dir: tempfile::TempDir,
    path: PathBuf,
    /// Its sha256, hex.
    pinned: String,
    len: u64,
}

impl Bundle {
    fn make(mib: u64) -> anyhow::Result<Bundle> {
        let len = mib * 1024 * 1024;
        let dir = tempfile::Builder::new()
            .prefix("bl-scale-bundle.")
            .tempdir()
            .context("temp dir")?;
        let path = dir.path().join("bundle.bin");
        let bytes = prng_bytes(usize::try_from(len).context("bundle size")?, 0x5eed);
        let pinned = bootlace_contract::digest::of_bytes(&bytes).hex().to_owned();
        std::fs::write(&path, &bytes).context("write bundle")?;
        Ok(Bundle {
            _dir: dir,
            path,
            pinned,
            len,
        })
    }
}

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-agent-scale", bench(&args)),
        Err(code) => code.into(),
    }
}

/// Every run, then the report; `Ok(false)` when a guest failed.
fn bench(args: &Args) -> anyhow::Result<bool> {
    let agent_bin = bootlace_bench::agent_binary(args.agent.as_deref())?;
    let nofile = raise_nofile();
    let max_n = args.guests.iter().copied().max().unwrap_or(0) as u64;
    if let Some(lim) = nofile.filter(|&lim| lim < 2 * max_n + 64) {
        eprintln!(
            "bench-agent-scale: warning: RLIMIT_NOFILE is {lim}; {max_n} guests need about {}",
            2 * max_n + 64
        );
    }
    let bundle = Bundle::make(args.bundle_mib)?;
    eprintln!(
        "bench-agent-scale: agent {}, bundle {} MiB, RLIMIT_NOFILE {}, {} CPUs",
        agent_bin.display(),
        args.bundle_mib,
        nofile.map_or_else(|| "unlimited".to_owned(), |l| l.to_string()),
        cpus()
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let mut results = Vec::new();
    for &n in &args.guests {
        eprintln!("bench-agent-scale: {n} guests ...");
        let r = run(&agent_bin, n, &bundle)?;
        for f in r.failures.iter().take(5) {
            eprintln!("bench-agent-scale: {n} guests: failed: {f}");
        }
        results.push(r);
    }
    let mut out = io::stdout().lock();
    write_table(&mut out, args.bundle_mib, &load, &results)?;
    write_details(&mut out, &results)?;
    let failed: usize = results.iter().map(|r| r.failures.len()).sum();
    if failed > 0 {
        writeln!(out, "- FAILED guests: {failed} (details on stderr)")?;
    }
    Ok(failed == 0)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// The heading and the table of the report.
fn write_table(
    out: &mut impl io::Write,
    bundle_mib: u64,
    load: &str,
    results: &[RunResult],
) -> io::Result<()> {
    writeln!(
        out,
        "Host agent scale: one `bootlace-agent serve` process, one hybrid-vsock socket per \
         guest, {bundle_mib} MiB bundle; every guest connects, fetches and verifies the bundle, \
         sends STEP and READY (acked); all guests of a run are released together. {} CPUs, \
         load average before the runs: {}.\n",
        cpus(),
        load.trim(),
    )?;
    writeln!(
        out,
        "| guests | total s | p50 ms | p99 ms | failures | agent VmHWM MiB |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|")?;
    for r in results {
        writeln!(
            out,
            "| {} | {:.2} | {:.1} | {:.1} | {} | {} |",
            r.guests,
            r.total.as_secs_f64(),
            percentile_ms(&r.latencies_ms, 0.50),
            percentile_ms(&r.latencies_ms, 0.99),
            r.failures.len(),
            bootlace_bench::mib(r.agent_hwm_kib),
        )?;
    }
    writeln!(out)
}

/// The notes under the table: per-run timings and memory, the RSS growth per guest.
fn write_details(out: &mut impl io::Write, results: &[RunResult]) -> io::Result<()> {
    writeln!(
        out,
        "p50/p99: per-guest latency from its `Client::connect` to its READY acknowledged \
         (nearest rank); total: first guest started -> last READY acknowledged.\n"
    )?;
    for r in results {
        writeln!(
            out,
            "- {} guests: from the first guest's start, READY acked at p50 {:.1} ms, p99 {:.1} \
             ms; the released threads started over {:.1} ms",
            r.guests,
            percentile_ms(&r.from_release_ms, 0.50),
            percentile_ms(&r.from_release_ms, 0.99),
            r.start_skew.as_secs_f64() * 1000.0,
        )?;
    }
    for r in results {
        writeln!(
            out,
            "- {} guests: agent VmHWM {} MiB with its listeners up and no guest yet; \
             agent CPU (user+sys) {} s in all; guest threads (this process) VmHWM {} MiB",
            r.guests,
            bootlace_bench::mib(r.agent_idle_hwm_kib),
            r.agent_cpu_s
                .map_or_else(|| "?".to_owned(), |c| format!("{c:.2}")),
            bootlace_bench::mib(r.guests_hwm_kib),
        )?;
    }
    if let Some((slope, intercept_kib)) = rss_slope(results) {
        writeln!(
            out,
            "- agent RSS growth: {slope:.1} KiB per guest (least-squares slope of the \
             agent's VmHWM over the guest counts; intercept {:.1} MiB)",
            intercept_kib / 1024.0
        )?;
    }
    Ok(())
}

/// Least-squares slope (KiB per guest) and intercept (KiB) of the agent's peak RSS over the
/// guest counts, with two runs or more.
fn rss_slope(results: &[RunResult]) -> Option<(f64, f64)> {
    let points: Vec<(f64, f64)> = results
        .iter()
        .filter_map(|r| Some((r.guests as f64, r.agent_hwm_kib? as f64)))
        .collect();
    if points.len() < 2 {
        return None;
    }
    let k = points.len() as f64;
    let mx = points.iter().map(|p| p.0).sum::<f64>() / k;
    let my = points.iter().map(|p| p.1).sum::<f64>() / k;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 0.0).then(|| (sxy / sxx, my - sxy / sxx * mx))
}
