//! The pieces of `bench-fleet`: a fleet directory (a fleet file and one shared bundle), the
//! agent as a child process (its stdout counted line by line, its status socket asked), the
//! simulated guests (async: thousands on one runtime thread), the idle abusers, and the
//! well-behaved guest (the real blocking [`Client`]).

use std::io::{self, BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_agent::client::{Client, Connector, Retry, Stream};
use bootlace_agent::host::hybrid_path;
use bootlace_contract::protocol::{BundleHeader, Decoder, Frame, Kind, VERSION};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

/// The port guests dial (the hybrid-vsock socket is `<base>_<port>`).
pub const PORT: u32 = 1024;
/// How long one step of a simulated guest (a connect, a frame, the bundle) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Per-read and per-write timeout of the well-behaved guest's connection.
const GOOD_IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A fleet directory: `fleet.toml`, `bundle.tar` (shared by every guest), `s/` (the sockets).
#[derive(Debug)]
pub struct FleetDir {
    dir: tempfile::TempDir,
    /// The fleet file.
    pub file: PathBuf,
    /// The status socket the agent is told to serve.
    pub status: PathBuf,
    /// Every guest's socket (`<base>_1024`), `good` first when there is one (the one shared
    /// socket, once per guest, in a shared fleet).
    pub sockets: Vec<PathBuf>,
    /// Listeners the agent has once it is up.
    pub listeners: u64,
    /// Arguments the agent needs besides the fleet (`--uds` of a shared socket).
    pub agent_args: Vec<String>,
    /// The well-behaved guest's socket, if the fleet has one.
    pub good: Option<PathBuf>,
    /// The bundle's sha256 (hex) and size.
    pub pinned: String,
    /// Bytes of the bundle.
    pub bundle_len: u64,
}

impl FleetDir {
    /// A fleet of `n` guests (`vm0`..), plus `good` when asked, all sharing `bundle`.
    pub fn write(n: usize, with_good: bool, bundle: &[u8]) -> anyhow::Result<FleetDir> {
        let dir = tempfile::Builder::new()
            .prefix("bl-fleet.")
            .tempdir()
            .context("temp dir for the fleet")?;
        let sockets_dir = dir.path().join("s");
        std::fs::create_dir(&sockets_dir).context("create the sockets directory")?;
        std::fs::write(dir.path().join("bundle.tar"), bundle).context("write bundle.tar")?;
        let mut toml = String::with_capacity(64 * n + 64);
        toml.push_str("# bench-fleet\n[defaults]\nbundle = \"bundle.tar\"\n");
        let mut names: Vec<String> = Vec::with_capacity(n + 1);
        if with_good {
            names.push("good".to_owned());
        }
        names.extend((0..n).map(|i| format!("vm{i}")));
        let mut sockets = Vec::with_capacity(names.len());
        for name in &names {
            let base = sockets_dir.join(name);
            toml.push_str(&format!(
                "[guests.{name}]\nsocket = \"{}\"\n",
                base.display()
            ));
            sockets.push(hybrid_path(&base, PORT));
        }
        let file = dir.path().join("fleet.toml");
        std::fs::write(&file, toml).context("write fleet.toml")?;
        Ok(FleetDir {
            status: dir.path().join("status.sock"),
            listeners: sockets.len() as u64,
            agent_args: Vec::new(),
            good: with_good.then(|| sockets.first().cloned()).flatten(),
            pinned: bootlace_contract::digest::of_bytes(bundle).hex().to_owned(),
            bundle_len: bundle.len() as u64,
            file,
            sockets,
            dir,
        })
    }

    /// A fleet of `n` guests (`vm0`..) known only by the SMBIOS UUID each reports
    /// ([`uuid`]), all on one shared socket the agent is given with `--uds`: one descriptor per
    /// guest instead of two.
    pub fn write_shared(n: usize, bundle: &[u8]) -> anyhow::Result<FleetDir> {
        let dir = tempfile::Builder::new()
            .prefix("bl-fleet.")
            .tempdir()
            .context("temp dir for the fleet")?;
        std::fs::write(dir.path().join("bundle.tar"), bundle).context("write bundle.tar")?;
        let mut toml = String::with_capacity(64 * n + 64);
        toml.push_str("# bench-fleet, shared socket\n[defaults]\nbundle = \"bundle.tar\"\n");
        for i in 0..n {
            toml.push_str(&format!("[guests.vm{i}]\nuuid = \"{}\"\n", uuid(i)));
        }
        let file = dir.path().join("fleet.toml");
        std::fs::write(&file, toml).context("write fleet.toml")?;
        let base = dir.path().join("shared");
        let shared = hybrid_path(&base, PORT);
        Ok(FleetDir {
            status: dir.path().join("status.sock"),
            listeners: 1,
            // The per-guest cap counts connections per socket (the only identity known at
            // accept): a socket shared by every guest needs it raised.
            agent_args: vec![
                "--uds".to_owned(),
                base.display().to_string(),
                "--max-per-guest".to_owned(),
                (n + 16).to_string(),
            ],
            good: None,
            pinned: bootlace_contract::digest::of_bytes(bundle).hex().to_owned(),
            bundle_len: bundle.len() as u64,
            file,
            sockets: vec![shared; n],
            dir,
        })
    }

    /// The sockets of the guests other than `good`.
    pub fn others(&self) -> &[PathBuf] {
        let skip = usize::from(self.good.is_some());
        self.sockets.get(skip..).unwrap_or_default()
    }

    /// The directory (for the agent's stderr file).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A small bundle: an uncompressed tar of a manifest and a file of `filler` bytes.
pub fn small_bundle(filler: usize) -> anyhow::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    let mut add = |path: &str, data: &[u8]| -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, path, data)
    };
    add(
        "manifest.toml",
        b"version = 1\nenv = { ROLE = \"bench\" }\n",
    )
    .context("bundle: manifest")?;
    let text: Vec<u8> = (0..filler).map(|i| b'a' + (i % 26) as u8).collect();
    add("files/filler.txt", &text).context("bundle: filler")?;
    b.into_inner().context("bundle: finish the tar")
}

/// What the agent wrote on stdout (one JSON object per line), counted as it comes.
#[derive(Debug, Default)]
pub struct Output {
    /// Lines so far.
    pub lines: AtomicU64,
    /// Bytes so far.
    pub bytes: AtomicU64,
    /// When each `"event":"notice"` line arrived, and its text (the first few kept).
    notices: Mutex<Vec<Instant>>,
    examples: Mutex<Vec<String>>,
}

impl Output {
    /// Notice lines from `since` to now: how many, and the most in any one-second window
    /// starting at a notice.
    pub fn notices_since(&self, since: Instant) -> (usize, usize) {
        let at = self.notices.lock().unwrap_or_else(|p| p.into_inner());
        let window: Vec<Instant> = at.iter().copied().filter(|t| *t >= since).collect();
        let mut most = 0;
        for (i, t) in window.iter().enumerate() {
            let end = *t + Duration::from_secs(1);
            let n = window
                .get(i..)
                .unwrap_or_default()
                .iter()
                .take_while(|u| **u < end)
                .count();
            most = most.max(n);
        }
        (window.len(), most)
    }

    /// The first notice lines seen (a few).
    pub fn examples(&self) -> Vec<String> {
        self.examples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn take(&self, line: &str) {
        self.lines.fetch_add(1, Ordering::Relaxed);
        self.bytes
            .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        if line.contains("\"event\":\"notice\"") {
            self.notices
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
            let mut ex = self.examples.lock().unwrap_or_else(|p| p.into_inner());
            if ex.len() < 8 {
                ex.push(line.to_owned());
            }
        }
    }
}

/// How to start the agent.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The bootlace-agent binary.
    pub bin: PathBuf,
    /// Soft and hard RLIMIT_NOFILE of the child (through `prlimit`), if set.
    pub nofile: Option<(u64, u64)>,
    /// More arguments to `serve`.
    pub extra: Vec<String>,
}

/// The agent child: `[prlimit --nofile=S:H --] bootlace-agent serve --fleet F --status-socket
/// S --json`, its stdout read by a thread; killed and reaped on drop.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    stderr_path: PathBuf,
    status: PathBuf,
    /// Its stdout, counted.
    pub out: Arc<Output>,
    exited: Option<ExitStatus>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// Starts the agent on `fleet` and waits until its status socket reports every listener.
    pub fn start(
        opts: &AgentOptions,
        fleet: &FleetDir,
        timeout: Duration,
    ) -> anyhow::Result<Agent> {
        let stderr_path = fleet.path().join("agent.stderr");
        let mut cmd = match opts.nofile {
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg("--")
                    .arg(&opts.bin);
                c
            }
            None => Command::new(&opts.bin),
        };
        cmd.arg("serve")
            .arg("--fleet")
            .arg(&fleet.file)
            .arg("--status-socket")
            .arg(&fleet.status)
            .arg("--json")
            .args(&opts.extra)
            .args(&fleet.agent_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).context("agent stderr file")?);
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "start {} (through prlimit when a limit is set)",
                opts.bin.display()
            )
        })?;
        let stdout = child.stdout.take().context("the agent's stdout")?;
        let out = Arc::new(Output::default());
        let o = Arc::clone(&out);
        std::thread::Builder::new()
            .name("agent-stdout".to_owned())
            .spawn(move || {
                for line in io::BufReader::new(stdout).lines() {
                    match line {
                        Ok(l) => o.take(&l),
                        Err(_) => break,
                    }
                }
            })
            .context("spawn the agent's stdout reader")?;
        let mut agent = Agent {
            child,
            stderr_path,
            status: fleet.status.clone(),
            out,
            exited: None,
        };
        agent.wait_listening(fleet.listeners, timeout)?;
        Ok(agent)
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How it ended, if it did (exit status and stderr).
    pub fn exited(&mut self) -> anyhow::Result<Option<String>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().context("the agent's status")?;
        }
        Ok(self.exited.map(|st| {
            let err = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            let tail: Vec<&str> = err.lines().rev().take(5).collect();
            format!(
                "({st}); stderr ends: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }))
    }

    fn wait_listening(&mut self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.exited()? {
                bail!("the agent exited {why} before listening");
            }
            let up = self
                .status()
                .ok()
                .and_then(|v| v["counters"]["listeners"].as_u64());
            if up.is_some_and(|l| l >= n) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent had {} of {n} listeners up after {timeout:?}",
                    up.map_or_else(|| "?".to_owned(), |u| u.to_string())
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The status table (JSON) from the status socket.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let mut s = std::os::unix::net::UnixStream::connect(&self.status)
            .with_context(|| format!("connect to the status socket {}", self.status.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.set_write_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"status\n").context("ask the status socket")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .context("read the status socket's answer")?;
        serde_json::from_str(&answer).context("the status socket answered something not JSON")
    }

    /// The counters of the status table, with retries (the status socket shares the agent's
    /// descriptors: while they are exhausted its accept backs off too).
    pub fn counters(&self) -> anyhow::Result<serde_json::Value> {
        let mut last = None;
        for _ in 0..20 {
            match self.status() {
                Ok(v) => return Ok(v["counters"].clone()),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no answer")))
    }

    /// A field of `/proc/<pid>/status` (the number before any unit).
    pub fn proc_status(&self, field: &str) -> Option<u64> {
        proc_status(self.pid(), field)
    }
}

/// A field of `/proc/<pid>/status` (`VmRSS` in KiB, `Threads`).
pub fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

async fn send(s: &mut UnixStream, f: &Frame) -> anyhow::Result<()> {
    let bytes = f.encode()?;
    s.write_all(&bytes)
        .await
        .with_context(|| format!("write {}", f.kind))
}

async fn read_frame(s: &mut UnixStream, dec: &mut Decoder) -> anyhow::Result<Frame> {
    let mut buf = [0u8; 256];
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        let want = dec.wanted().min(buf.len());
        let n = s.read(buf.get_mut(..want).unwrap_or(&mut [])).await?;
        if n == 0 {
            bail!("the host closed the connection");
        }
        dec.push(buf.get(..n).unwrap_or_default());
    }
}

/// Sends `f` and waits for its ACK.
async fn acked(s: &mut UnixStream, dec: &mut Decoder, f: Frame) -> anyhow::Result<()> {
    let (kind, seq) = (f.kind, f.seq);
    send(s, &f).await?;
    let a = tokio::time::timeout(STEP_TIMEOUT, read_frame(s, dec))
        .await
        .with_context(|| format!("no ACK of {kind} within {STEP_TIMEOUT:?}"))?
        .with_context(|| format!("waiting for the ACK of {kind}"))?;
    if a.kind != Kind::Ack || a.seq != seq {
        bail!("expected ACK {seq} of {kind}, got {} {}", a.kind, a.seq);
    }
    Ok(())
}

/// GET-BUNDLE, then the bundle's bytes; checks their sha256 against the announced one and
/// `pinned`, as a guest does.
async fn fetch(s: &mut UnixStream, dec: &mut Decoder, pinned: &str) -> anyhow::Result<u64> {
    send(s, &Frame::new(Kind::GetBundle, 1)).await?;
    let f = tokio::time::timeout(STEP_TIMEOUT, read_frame(s, dec))
        .await
        .context("no BUNDLE in time")?
        .context("waiting for BUNDLE")?;
    if f.kind != Kind::Bundle {
        bail!(
            "expected BUNDLE, got {} ({})",
            f.kind,
            f.get("STATUS").unwrap_or("")
        );
    }
    let h = BundleHeader::from_frame(&f)?;
    let size = usize::try_from(h.size).context("bundle size")?;
    let mut bytes = dec.take_buffered();
    if bytes.len() > size {
        bail!("the host sent more than the announced {size} bytes");
    }
    let had = bytes.len();
    bytes.resize(size, 0);
    tokio::time::timeout(
        STEP_TIMEOUT,
        s.read_exact(bytes.get_mut(had..).unwrap_or_default()),
    )
    .await
    .context("bundle bytes not in time")?
    .context("reading the bundle bytes")?;
    let got = bootlace_contract::digest::of_bytes(&bytes);
    if got.hex() != h.sha256 || got.hex() != pinned {
        bail!(
            "bundle sha256 {} (announced {}, pinned {pinned})",
            got.hex(),
            h.sha256
        );
    }
    Ok(h.size)
}

/// The SMBIOS UUID simulated guest `i` reports.
pub fn uuid(i: usize) -> String {
    format!("00000000-0000-4000-8000-{i:012}")
}

/// One simulated guest: connect, HELLO, GET-BUNDLE (sha256 checked), STEP, READY, each acked.
/// Returns connect -> READY acked and the connection, open (as a guest keeps it after READY).
pub async fn guest(
    socket: &Path,
    i: usize,
    pinned: &str,
) -> anyhow::Result<(Duration, UnixStream)> {
    let started = Instant::now();
    let mut s = tokio::time::timeout(STEP_TIMEOUT, UnixStream::connect(socket))
        .await
        .context("connect: not in time")?
        .with_context(|| format!("connect to {}", socket.display()))?;
    let mut dec = Decoder::new();
    let hello = Frame::new(Kind::Hello, 0)
        .with("PROTOCOL", VERSION)
        .with("INIT_VERSION", "bench-fleet")
        .with("BOOT_ID", format!("bench-{i:08}"))
        .with("INSTANCE_ID", uuid(i));
    acked(&mut s, &mut dec, hello).await?;
    fetch(&mut s, &mut dec, pinned).await?;
    let step = Frame::new(Kind::Step, 2)
        .with("STEP", "bootstrap_mounted")
        .with("STATE", "finished")
        .with("DURATION_MS", 1);
    acked(&mut s, &mut dec, step).await?;
    let ready = Frame::new(Kind::Ready, 3)
        .with("READY", 1)
        .with("STATUS", "hand-off: bench");
    acked(&mut s, &mut dec, ready).await?;
    Ok((started.elapsed(), s))
}

/// What the idle abusers did.
#[derive(Debug, Default)]
pub struct IdleStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections made.
    pub opened: AtomicU64,
    /// Connections the host closed.
    pub closed_by_host: AtomicU64,
    /// connect() failures.
    pub connect_failed: AtomicU64,
}

/// An idle connection on `socket` that never says anything: open, wait until the host closes
/// it, wait `pause`, open again; until aborted.
pub async fn idle(socket: PathBuf, pause: Duration, stats: Arc<IdleStats>) {
    loop {
        match UnixStream::connect(&socket).await {
            Ok(mut s) => {
                stats.opened.fetch_add(1, Ordering::Relaxed);
                stats.open.fetch_add(1, Ordering::Relaxed);
                let mut b = [0u8; 64];
                while let Ok(n) = s.read(&mut b).await {
                    if n == 0 {
                        break;
                    }
                }
                stats.open.fetch_sub(1, Ordering::Relaxed);
                stats.closed_by_host.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                stats.connect_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// The well-behaved guest, the real [`Client`] (blocking): connect, HELLO, the bundle (its
/// sha256 checked), STEP, READY; connect -> READY acked, and how many connections it took
/// (the client reconnects and resends on its own, as the init does).
pub fn good_guest(
    socket: &Path,
    attempt: usize,
    fleet: &FleetDir,
) -> anyhow::Result<(Duration, u64)> {
    let connects = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&connects);
    let path = socket.to_owned();
    let started = Instant::now();
    let connector: Connector = Box::new(move |_left| {
        counted.fetch_add(1, Ordering::Relaxed);
        let s = std::os::unix::net::UnixStream::connect(&path)?;
        s.set_read_timeout(Some(GOOD_IO_TIMEOUT))?;
        s.set_write_timeout(Some(GOOD_IO_TIMEOUT))?;
        Ok(Box::new(s) as Box<dyn Stream>)
    });
    let hello = [("BOOT_ID", format!("good-{attempt:04}"))];
    let mut c = Client::connect(connector, &hello, Retry::default()).context("connect + HELLO")?;
    let got = c
        .fetch_bundle(&mut io::sink(), fleet.bundle_len)
        .context("fetch the bundle")?;
    if got.sha256 != fleet.pinned {
        bail!(
            "bundle sha256 {} is not the pinned {}",
            got.sha256,
            fleet.pinned
        );
    }
    c.send(
        Kind::Step,
        &[
            ("STEP", "bootstrap_mounted".to_owned()),
            ("STATE", "finished".to_owned()),
        ],
    )
    .context("STEP")?;
    c.send(Kind::Ready, &[("STATUS", "up".to_owned())])
        .context("READY")?;
    Ok((started.elapsed(), connects.load(Ordering::Relaxed)))
}
