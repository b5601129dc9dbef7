//! `bootlace-vm up TASK`: the guests of a task ([`crate::task`]) booted side by side from one
//! image file, configured by one in-process host agent, restarted by the task's policy
//! ([`crate::restart`]), and torn down on request.
//!
//! - **One image file.** The image is chosen from the images directory as `bootlace-vm run
//!   --images DIR --image NAME@VERSION` chooses it (checked against its sha256; a missing or
//!   damaged version falls back to the default with a warning) and every guest boots that one
//!   file: an initramfs is passed to each QEMU, erofs and squashfs are attached read-only, ext4
//!   as a snapshot (each guest's writes go to QEMU's own temporary overlay).
//! - **One agent.** A [`Host`] with a resolver that knows each guest by its own hybrid-vsock
//!   socket (each VM has its own `vhost-device-vsock`, sockets in `WORK/<n>/`) and gives it
//!   its bundle, composed with its hostname and vars ([`bootlace_agent::fleet::compose`]);
//!   the VM is given that bundle's digest out of band (SMBIOS type 11 and fw_cfg), which an
//!   image with no pinned digest trusts it by.
//! - **Teardown.** When [`Stop::request`] is called (the CLI does on SIGINT and SIGTERM),
//!   every QEMU is killed (its `vhost-device-vsock` with it), the agent stops listening and
//!   the work directory is removed; the same happens on every return path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bootlace_agent::host::{BundleSource, Event, GuestEvent, Host};
use bootlace_agent::resolve::{Assignment, Identity, Transport};
use bootlace_contract::protocol::Kind;
use serde::Serialize;

use crate::memory::{self, MemoryNeed};
use crate::restart::{AfterEnd, State, Supervisor};
use crate::task::Task;
use crate::{images, Accel, End, Ended, Outcome, Reason, VmError, VmSpec, VsockSpec};

/// `up`'s exit code when a guest failed (its last run ended with a non-zero code and the
/// policy does not restart it).
pub const EXIT_FAILED: u8 = 1;
/// The exit codes as `bootlace-vm up --help` lists them.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0        every guest ended with code 0 (after the restarts its policy allowed)
  1        a guest failed: its last run ended with a non-zero code (its guest status, 123 no
           status, 124 timeout, 125 its VM could not run) and the policy does not restart
           it; stderr names every one that failed
  125      the task could not run: a usage error, a bad task file, an image that cannot be
           chosen (an unknown name, a damaged default), a bad bundle, or the host side (work
           directory, host agent) could not be set up; nothing was left running
  130,143  stopped by SIGINT (Ctrl-C) or SIGTERM (128 + the signal): every guest torn down";

/// A run with no time limit is limited to this (Instant arithmetic needs a bound).
const NO_TIMEOUT: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How often the loop looks at the stop request when nothing happens.
const TICK: Duration = Duration::from_millis(100);
/// Console lines shown for a guest that failed, when its console is not kept in a file.
const TAIL_LINES: usize = 12;

/// A request to stop a running task, and the signal that asked for it.
#[derive(Debug, Default)]
pub struct Stop {
    requested: AtomicBool,
    signal: AtomicI32,
}

impl Stop {
    /// A request not made yet.
    pub fn new() -> Arc<Stop> {
        Arc::new(Stop::default())
    }

    /// Asks the task to stop, because of `signal` (its number: 2 SIGINT, 15 SIGTERM).
    pub fn request(&self, signal: i32) {
        self.signal.store(signal, Ordering::SeqCst);
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// The signal that asked for it, if any.
    pub fn signal(&self) -> Option<i32> {
        self.requested().then(|| self.signal.load(Ordering::SeqCst))
    }
}

/// How to run a task.
pub struct UpOptions {
    /// The kernel.
    pub kernel: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
    /// The accelerator.
    pub accel: Accel,
    /// The images directory (over the task's `images`).
    pub images: Option<PathBuf>,
    /// The stage-1 initramfs for a disk image (default: the newest in the images directory).
    pub stage1: Option<PathBuf>,
    /// At most this many guests running at once (`None`: all of them).
    pub parallel: Option<usize>,
    /// Keep each run's console in `DIR/<guest>.<run>.console.log`.
    pub logs: Option<PathBuf>,
    /// Where the work directory (vsock sockets) is made.
    pub work_base: PathBuf,
    /// The stop request.
    pub stop: Arc<Stop>,
    /// Where progress lines go (one line each, no newline).
    pub say: Arc<dyn Fn(&str) + Send + Sync>,
}

impl std::fmt::Debug for UpOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpOptions")
            .field("kernel", &self.kernel)
            .field("qemu", &self.qemu)
            .field("accel", &self.accel)
            .field("images", &self.images)
            .field("parallel", &self.parallel)
            .field("logs", &self.logs)
            .field("work_base", &self.work_base)
            .finish_non_exhaustive()
    }
}

impl UpOptions {
    /// Defaults: QEMU from `PATH`, TCG, every guest at once, no console logs, the work
    /// directory in the temporary directory, progress on stderr.
    pub fn new(kernel: impl Into<PathBuf>) -> UpOptions {
        UpOptions {
            kernel: kernel.into(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            images: None,
            stage1: None,
            parallel: None,
            logs: None,
            work_base: std::env::temp_dir(),
            stop: Stop::new(),
            say: Arc::new(|line| eprintln!("bootlace-vm: {line}")),
        }
    }
}

/// Why a task could not run at all (nothing was started, or what was is torn down).
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Neither `--images` nor the task's `images` names the images directory.
    #[error("{}: no images directory: give --images DIR or `images = \"DIR\"` in the task", .0.display())]
    NoImages(PathBuf),
    /// The image cannot be chosen.
    #[error(transparent)]
    Image(#[from] images::ImagesError),
    /// The guests cannot get the memory the image needs.
    #[error("{}: memory: {source}", file.display())]
    Memory {
        /// The task file.
        file: PathBuf,
        /// The cause.
        source: memory::MemoryError,
    },
    /// A guest's bundle cannot be read or composed.
    #[error("{}: the bundle of {guest}", file.display())]
    Bundle {
        /// The task file.
        file: PathBuf,
        /// The guest.
        guest: String,
        /// The cause.
        #[source]
        source: bootlace_agent::fleet::BundleError,
    },
    /// A directory `up` needs cannot be made.
    #[error("cannot make {what} {}", path.display())]
    Dir {
        /// What it is for.
        what: &'static str,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The agent cannot listen for a guest.
    #[error("the host agent cannot listen on {}", path.display())]
    Listen {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The VM spec is refused before anything starts.
    #[error(transparent)]
    Vm(#[from] VmError),
}

impl UpError {
    /// Which kind of "could not run" this is (exit 125 for every one).
    pub fn reason(&self) -> Reason {
        match self {
            UpError::NoImages(_) => Reason::Usage,
            UpError::Image(_) | UpError::Memory { .. } | UpError::Bundle { .. } => Reason::BadInput,
            UpError::Dir { .. } | UpError::Listen { .. } => Reason::HostSetup,
            UpError::Vm(e) => e.reason(),
        }
    }
}

/// One guest in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestRow {
    /// Its name (`TASK-N`).
    pub guest: String,
    /// The hostname its bundle gives it.
    pub hostname: String,
    /// Its SMBIOS UUID.
    pub uuid: String,
    /// Where it is (`exited`, `failed`, `stopped`, …: [`State`]).
    pub state: &'static str,
    /// Runs started.
    pub runs: u32,
    /// Restarts (runs after the first).
    pub restarts: u32,
    /// Seconds from its latest run's start to READY (null: no READY in that run).
    pub ready_s: Option<f64>,
    /// Its last run's exit code, as `bootlace-vm run` would return it (null: none ended).
    pub exit_code: Option<u8>,
    /// The EXIT_STATUS of its last run's power-off line, if any.
    pub exit_status: Option<u8>,
    /// How its last run's QEMU ended (`powered-off`, `timeout`, `stopped`, …).
    pub end: Option<&'static str>,
    /// Why its last run could not run, if it could not.
    pub error: Option<String>,
    /// Its last run's console log (with `--logs`).
    pub console_log: Option<PathBuf>,
}

/// What `up` did: what `--json` prints, and the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UpReport {
    /// The exit code: 0, [`EXIT_FAILED`], or 128 + the signal that stopped the task.
    pub exit_code: u8,
    /// The task's name.
    pub task: String,
    /// The image as the task asks for it.
    pub requested: String,
    /// The image booted (`name@version`): another version when the one asked for is missing
    /// or damaged.
    pub image: String,
    /// The one image file every guest booted.
    pub image_file: PathBuf,
    /// Warnings met choosing the image (fallbacks, skipped metadata, raised memory).
    pub warnings: Vec<String>,
    /// The signal that stopped the task, if one did.
    pub stopped_by: Option<i32>,
    /// The guests that failed.
    pub failed: Vec<String>,
    /// Every guest.
    pub guests: Vec<GuestRow>,
    /// Seconds from the start to the end of the task.
    pub wall_s: f64,
}

impl UpReport {
    /// One line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The table for people: guest, hostname, state, runs, time to READY, exit.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "GUEST".to_owned(),
            "HOSTNAME".to_owned(),
            "STATE".to_owned(),
            "RUNS".to_owned(),
            "READY".to_owned(),
            "EXIT".to_owned(),
        ]];
        for g in &self.guests {
            rows.push([
                g.guest.clone(),
                g.hostname.clone(),
                g.state.to_owned(),
                g.runs.to_string(),
                g.ready_s.map_or("-".to_owned(), |s| format!("{s:.1} s")),
                exit_words(g),
            ]);
        }
        let mut widths = [0usize; 6];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in &rows {
            let cells: Vec<String> = r
                .iter()
                .zip(widths)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        out
    }
}

/// The EXIT cell: the code, with what it means when it is not the guest's own status.
fn exit_words(g: &GuestRow) -> String {
    match (g.exit_code, g.end) {
        (None, _) => "-".to_owned(),
        (Some(_), Some("stopped")) => "- (stopped)".to_owned(),
        (Some(c), _) if g.exit_status == Some(c) => c.to_string(),
        (Some(0), Some("powered-off")) => "0".to_owned(),
        (Some(Ended::NO_STATUS), Some(end)) => format!("{} ({end})", Ended::NO_STATUS),
        (Some(Ended::TIMED_OUT), _) => format!("{} (timeout)", Ended::TIMED_OUT),
        (Some(c), _) => format!("{c} (could not run)"),
    }
}

/// Runs `task` until every guest has settled (ended, and not restarted by the policy) or a
/// stop is requested; then tears everything down. `Err` only when nothing could start.
pub fn up(task: &Task, opts: &UpOptions) -> Result<UpReport, UpError> {
    let started = Instant::now();
    let prepared = prepare(task, opts)?;
    let work = WorkDir::new(&opts.work_base)?;
    if let Some(dir) = &opts.logs {
        std::fs::create_dir_all(dir).map_err(|source| UpError::Dir {
            what: "the console log directory",
            path: dir.clone(),
            source,
        })?;
    }
    let (tx, rx) = mpsc::channel();
    let guests: Vec<Guest> = task
        .instances
        .iter()
        .zip(&prepared.bundles)
        .map(|(inst, bundle)| Guest::new(inst, bundle, &work.0, task.port))
        .collect::<Result<_, _>>()?;
    let agent = Agent::start(&guests, &prepared.image, tx.clone())?;
    let mut runner = Runner {
        task,
        opts,
        base: prepared.spec,
        guests,
        sup: Supervisor::new(
            task.instances.len(),
            task.restart,
            opts.parallel.unwrap_or(task.instances.len()),
        ),
        kill: Arc::new(AtomicBool::new(false)),
        tx,
        threads: Vec::new(),
    };
    runner.drive(&rx);
    runner.join();
    drop(agent);
    drop(work);
    let stopped_by = runner.sup.stopping().then(|| opts.stop.signal()).flatten();
    Ok(runner.report(
        prepared.image,
        prepared.image_file,
        prepared.warnings,
        stopped_by,
        started,
    ))
}

/// What every guest shares, made before anything starts.
struct Prepared {
    /// The VM spec without the per-guest parts (vsock, UUID, console log).
    spec: VmSpec,
    image: String,
    image_file: PathBuf,
    warnings: Vec<String>,
    /// Each guest's bundle, in order.
    bundles: Vec<Arc<BundleSource>>,
}

fn prepare(task: &Task, opts: &UpOptions) -> Result<Prepared, UpError> {
    let dir = opts
        .images
        .clone()
        .or_else(|| task.images.clone())
        .ok_or_else(|| UpError::NoImages(task.file.clone()))?;
    let chosen = images::choose(&dir, &task.image, task.version.as_deref())?;
    let mut warnings = chosen.warnings.clone();
    let m = &chosen.entry.meta;
    let mut needs: Vec<MemoryNeed> = MemoryNeed::of(m).into_iter().collect();
    let stage1 = match (&opts.stage1, m.needs_stage1()) {
        (_, false) => None,
        (Some(p), true) => Some(p.clone()),
        (None, true) => {
            let s1 = images::stage1(&dir)?;
            needs.extend(MemoryNeed::of(&s1.meta));
            Some(s1.path())
        }
    };
    let mut spec = VmSpec::new(&opts.kernel);
    spec.qemu = opts.qemu.clone();
    spec.accel = opts.accel;
    spec.cpus = task.cpus;
    spec.append = task.append.clone();
    spec.timeout = task.timeout.unwrap_or(NO_TIMEOUT);
    crate::boot_image(&mut spec, &chosen.entry, stage1.as_deref())?;
    let mem = memory::guest_memory(&needs, task.memory_mib).map_err(|source| UpError::Memory {
        file: task.file.clone(),
        source,
    })?;
    warnings.extend(mem.raised);
    spec.memory_mib = mem.mib;
    crate::check_kernel_cmdline(&spec)?;
    for w in &warnings {
        (opts.say)(&format!("warning: {w}"));
    }
    let bundles = task
        .instances
        .iter()
        .map(|i| {
            bootlace_agent::fleet::compose_with(
                i.bundle.as_deref(),
                &bootlace_agent::fleet::Customize {
                    hostname: Some(i.hostname.clone()),
                    vars: i.vars.clone(),
                    command: i.command.clone(),
                    init: i.init.clone(),
                },
            )
            .map(Arc::new)
            .map_err(|source| UpError::Bundle {
                file: task.file.clone(),
                guest: i.name.clone(),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    (opts.say)(&format!(
        "{}: {} guest(s) of {} ({}, {}), {} MiB and {} vCPU each",
        task.name,
        task.instances.len(),
        m.id(),
        m.format,
        chosen.entry.path().display(),
        spec.memory_mib,
        spec.cpus
    ));
    Ok(Prepared {
        spec,
        image: m.id(),
        image_file: chosen.entry.path(),
        warnings,
        bundles,
    })
}

/// The task's private directory (mode 0700: the sockets in it reach the guests), removed with
/// everything in it when dropped.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl WorkDir {
    fn new(base: &Path) -> Result<WorkDir, UpError> {
        use std::os::unix::fs::DirBuilderExt;
        let pid = std::process::id();
        let mut last = None;
        for n in 0..100u32 {
            let dir = base.join(format!("bootlace-up-{pid}-{n}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(WorkDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(source) => {
                    return Err(UpError::Dir {
                        what: "the work directory",
                        path: dir,
                        source,
                    })
                }
            }
        }
        Err(UpError::Dir {
            what: "the work directory",
            path: base.join(format!("bootlace-up-{pid}-N")),
            source: last.unwrap_or_else(|| std::io::Error::other("no free name")),
        })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One guest: its name, its vsock directory and the socket the agent knows it by.
#[derive(Debug)]
struct Guest {
    name: String,
    hostname: String,
    uuid: crate::Uuid,
    vsock: VsockSpec,
    socket: PathBuf,
    bundle: Arc<BundleSource>,
    /// Its last run's outcome (or why it could not run).
    last: Option<Result<Outcome, String>>,
    console_log: Option<PathBuf>,
}

impl Guest {
    fn new(
        inst: &crate::task::Instance,
        bundle: &Arc<BundleSource>,
        work: &Path,
        port: u32,
    ) -> Result<Guest, UpError> {
        let dir = work.join(inst.n.to_string());
        std::fs::create_dir_all(&dir).map_err(|source| UpError::Dir {
            what: "a guest's vsock directory",
            path: dir.clone(),
            source,
        })?;
        let vsock = VsockSpec::new(dir);
        Ok(Guest {
            name: inst.name.clone(),
            hostname: inst.hostname.clone(),
            uuid: inst.uuid.clone(),
            socket: vsock.port_path(port),
            vsock,
            bundle: Arc::clone(bundle),
            last: None,
            console_log: None,
        })
    }
}

/// Messages to the loop: the agent's events and the ends of runs.
enum Msg {
    Guest(GuestEvent),
    Ended {
        i: usize,
        result: Result<Outcome, VmError>,
    },
}

/// The in-process host agent: one [`Host`] for every guest, each known by its socket.
struct Agent {
    host: Arc<Host>,
    sockets: Vec<PathBuf>,
}

impl Agent {
    fn start(guests: &[Guest], image: &str, tx: Sender<Msg>) -> Result<Agent, UpError> {
        let table: HashMap<PathBuf, Assignment> = guests
            .iter()
            .map(|g| {
                let a = Assignment {
                    name: Some(g.name.clone()),
                    bundle: Some(Arc::clone(&g.bundle)),
                    reason: None,
                    image: Some(image.to_owned()),
                };
                (g.socket.clone(), a)
            })
            .collect();
        let resolver = move |who: &Identity<'_>| match who.transport {
            Transport::Unix(p) => table.get(p).cloned().unwrap_or_else(|| {
                Assignment::refused(format!("{} is not a guest of this task", p.display()))
            }),
            other => Assignment::refused(format!("{} is not a guest of this task", other.label())),
        };
        let tx = std::sync::Mutex::new(tx);
        let host = Arc::new(Host::with_resolver(Arc::new(resolver), move |e| {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(Msg::Guest(e));
            }
        }));
        let mut agent = Agent {
            host,
            sockets: Vec::new(),
        };
        for g in guests {
            agent
                .host
                .serve_unix(&g.socket)
                .map_err(|source| UpError::Listen {
                    path: g.socket.clone(),
                    source,
                })?;
            agent.sockets.push(g.socket.clone());
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        for s in &self.sockets {
            self.host.unserve_unix(s);
        }
    }
}

/// The loop: starts runs, follows the agent's events and the runs' ends, applies the policy.
struct Runner<'a> {
    task: &'a Task,
    opts: &'a UpOptions,
    base: VmSpec,
    guests: Vec<Guest>,
    sup: Supervisor,
    /// Set to kill every QEMU (a stop request, or a return on any path).
    kill: Arc<AtomicBool>,
    tx: Sender<Msg>,
    threads: Vec<JoinHandle<()>>,
}

impl Runner<'_> {
    fn say(&self, line: &str) {
        (self.opts.say)(line)
    }

    fn drive(&mut self, rx: &Receiver<Msg>) {
        loop {
            if self.opts.stop.requested() && !self.sup.stopping() {
                self.say(&format!("{}: stopping every guest", self.task.name));
                self.sup.stop();
                self.kill.store(true, Ordering::SeqCst);
            }
            for i in self.sup.due(Instant::now()) {
                self.start(i);
            }
            if self.sup.finished() {
                return;
            }
            let wait = self
                .sup
                .next_wakeup()
                .map_or(TICK, |t| t.saturating_duration_since(Instant::now()))
                .min(TICK);
            match rx.recv_timeout(wait) {
                Ok(Msg::Guest(e)) => self.on_event(&e),
                Ok(Msg::Ended { i, result }) => self.on_end(i, result),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Starts a run of guest `i` on a thread of its own.
    fn start(&mut self, i: usize) {
        let Some(g) = self.guests.get_mut(i) else {
            return;
        };
        let run = self.sup.slots().get(i).map_or(1, |s| s.runs);
        let mut spec = self.base.clone();
        spec.vsock = Some(g.vsock.clone());
        spec.uuid = Some(g.uuid.clone());
        // The VMM is who knows which bundle this guest gets: its digest, out of band, is what
        // an image with nothing pinned trusts the composed bundle by (docs/security.md).
        spec.oob_digest = format!("sha256:{}", g.bundle.sha256)
            .parse()
            .ok()
            .map(|digest| crate::OobDigest {
                digest,
                via: crate::OobVia::Both,
            });
        g.console_log = self
            .opts
            .logs
            .as_ref()
            .map(|d| crate::console_log_path(d, &format!("{}.{run}", g.name)));
        spec.console_log = g.console_log.clone();
        let (kill, tx) = (Arc::clone(&self.kill), self.tx.clone());
        let what = if run == 1 { "starting" } else { "restarting" };
        let line = format!("{}: {what} (run {run})", g.name);
        self.say(&line);
        self.threads.push(std::thread::spawn(move || {
            let result = crate::run_stoppable(&spec, &kill);
            let _ = tx.send(Msg::Ended { i, result });
        }));
    }

    fn on_event(&mut self, e: &GuestEvent) {
        let Some(i) = self
            .guests
            .iter()
            .position(|g| g.socket.display().to_string() == e.guest)
        else {
            return;
        };
        let name = self
            .guests
            .get(i)
            .map(|g| g.name.clone())
            .unwrap_or_default();
        match &e.event {
            Event::Report(f) if f.kind == Kind::Ready => {
                if let Some(after) = self.sup.ready(i, Instant::now()) {
                    self.say(&format!("{name}: READY after {:.1} s", after.as_secs_f64()));
                }
            }
            Event::Report(f) if f.kind == Kind::Failed => {
                let status = f.get("STATUS").unwrap_or("");
                self.say(&format!(
                    "{name}: FAILED: {}",
                    bootlace_agent::host::escape_controls(status)
                ));
            }
            Event::NoBundle { reason } => {
                self.say(&format!(
                    "{name}: no bundle: {}",
                    bootlace_agent::host::escape_controls(reason)
                ));
            }
            Event::Error(m) => self.say(&format!(
                "{name}: host: {}",
                bootlace_agent::host::escape_controls(m)
            )),
            _ => {}
        }
    }

    fn on_end(&mut self, i: usize, result: Result<Outcome, VmError>) {
        let (code, stopped, words) = match &result {
            Ok(o) => (o.exit_code(), o.end == End::Stopped, o.summary()),
            Err(e) => (
                Ended::COULD_NOT_RUN,
                false,
                format!("could not run: {}", bootlace_contract::chain(e)),
            ),
        };
        let after = self.sup.ended(i, code, stopped, Instant::now());
        let Some(g) = self.guests.get_mut(i) else {
            return;
        };
        g.last = Some(result.map_err(|e| bootlace_contract::chain(&e)));
        let name = g.name.clone();
        match after {
            AfterEnd::Restart { at, nth } => {
                let policy = self.task.restart;
                let of = policy.max.map_or(String::new(), |m| format!(" of {m}"));
                let secs = at.saturating_duration_since(Instant::now()).as_secs_f64();
                self.say(&format!(
                    "{name}: exit {code}: {words}; restart {nth}{of} ({}) in {secs:.1} s",
                    policy.policy.as_str()
                ));
            }
            AfterEnd::Settled(State::Failed) => {
                self.say(&format!("{name}: failed: exit {code}: {words}"));
                self.show_tail(i);
            }
            AfterEnd::Settled(state) => {
                self.say(&format!("{name}: {}: exit {code}: {words}", state.as_str()))
            }
        }
    }

    /// The end of a failed guest's console, when it is not kept in a file.
    fn show_tail(&self, i: usize) {
        let Some(g) = self.guests.get(i) else {
            return;
        };
        if let Some(p) = &g.console_log {
            self.say(&format!("{}: console: {}", g.name, p.display()));
            return;
        }
        if let Some(Ok(o)) = &g.last {
            let lines: Vec<&str> = o.console.lines().collect();
            for l in lines
                .get(lines.len().saturating_sub(TAIL_LINES)..)
                .unwrap_or(&[])
            {
                self.say(&format!(
                    "{} | {}",
                    g.name,
                    bootlace_agent::host::escape_controls(l.trim_end_matches('\r'))
                ));
            }
        }
    }

    /// Kills whatever still runs and waits for every run's thread.
    fn join(&mut self) {
        self.kill.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    fn report(
        &self,
        image: String,
        image_file: PathBuf,
        warnings: Vec<String>,
        stopped_by: Option<i32>,
        started: Instant,
    ) -> UpReport {
        let guests: Vec<GuestRow> = self
            .guests
            .iter()
            .zip(self.sup.slots())
            .map(|(g, s)| row(g, s))
            .collect();
        let failed: Vec<String> = self
            .sup
            .failed()
            .into_iter()
            .filter_map(|i| self.guests.get(i).map(|g| g.name.clone()))
            .collect();
        let exit_code = match (stopped_by, failed.is_empty()) {
            (Some(sig), _) => u8::try_from(128 + sig.clamp(0, 127)).unwrap_or(u8::MAX),
            (None, false) => EXIT_FAILED,
            (None, true) => 0,
        };
        UpReport {
            exit_code,
            task: self.task.name.clone(),
            requested: match &self.task.version {
                Some(v) => format!("{}@{v}", self.task.image),
                None => self.task.image.clone(),
            },
            image,
            image_file,
            warnings,
            stopped_by,
            failed,
            guests,
            wall_s: started.elapsed().as_secs_f64(),
        }
    }
}

impl Drop for Runner<'_> {
    fn drop(&mut self) {
        self.join();
    }
}

fn row(g: &Guest, s: &crate::restart::Slot) -> GuestRow {
    let (exit_status, end, error) = match &g.last {
        Some(Ok(o)) => (o.exit_status, Some(o.end.as_str()), None),
        Some(Err(e)) => (None, None, Some(e.clone())),
        None => (None, None, None),
    };
    GuestRow {
        guest: g.name.clone(),
        hostname: g.hostname.clone(),
        uuid: g.uuid.as_str().to_owned(),
        state: s.state.as_str(),
        runs: s.runs,
        restarts: s.restarts(),
        ready_s: s.ready_after.map(|d| d.as_secs_f64()),
        exit_code: s.last_code,
        exit_status,
        end,
        error,
        console_log: g.console_log.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(
        name: &str,
        state: &'static str,
        code: Option<u8>,
        status: Option<u8>,
        end: Option<&'static str>,
    ) -> GuestRow {
        GuestRow {
            guest: name.to_owned(),
            hostname: name.to_owned(),
            uuid: String::new(),
            state,
            runs: 1,
            restarts: 0,
            ready_s: code.map(|_| 2.54),
            exit_code: code,
            exit_status: status,
            end,
            error: None,
            console_log: None,
        }
    }

    #[test]
    fn the_table() {
        let r = UpReport {
            exit_code: 1,
            task: "web".into(),
            requested: "web@2.0".into(),
            image: "web@1.0".into(),
            image_file: "/i/web.img".into(),
            warnings: Vec::new(),
            stopped_by: None,
            failed: vec!["web-3".into()],
            guests: vec![
                g("web-1", "exited", Some(0), Some(0), Some("powered-off")),
                g("web-2", "exited", Some(0), None, Some("powered-off")),
                g("web-3", "failed", Some(3), Some(3), Some("powered-off")),
                g("web-4", "failed", Some(124), None, Some("timeout")),
                g("web-5", "failed", Some(123), None, Some("kernel-panic")),
                g("web-6", "failed", Some(125), None, None),
                g("web-7", "stopped", Some(123), None, Some("stopped")),
                g("web-8", "waiting", None, None, None),
            ],
            wall_s: 1.0,
        };
        let t = r.table();
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "GUEST  HOSTNAME  STATE    RUNS  READY  EXIT");
        assert_eq!(lines[1], "web-1  web-1     exited   1     2.5 s  0");
        assert_eq!(lines[3], "web-3  web-3     failed   1     2.5 s  3");
        assert!(lines[4].ends_with("124 (timeout)"), "{t}");
        assert!(lines[5].ends_with("123 (kernel-panic)"), "{t}");
        assert!(lines[6].ends_with("125 (could not run)"), "{t}");
        assert!(lines[7].ends_with("- (stopped)"), "{t}");
        assert_eq!(lines[8], "web-8  web-8     waiting  1     -      -");
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("JSON");
        assert_eq!(v["failed"], serde_json::json!(["web-3"]));
        assert_eq!(v["guests"][2]["exit_status"], 3);
        assert_eq!(v["image"], "web@1.0");
    }

    #[test]
    fn the_documented_report_has_every_field() {
        let doc = include_str!("../../docs/task.md");
        let block = doc
            .split("```json\n")
            .nth(1)
            .and_then(|b| b.split("```").next())
            .expect("a json block in docs/task.md");
        let documented: serde_json::Value = serde_json::from_str(block).expect("valid JSON");
        let real = UpReport {
            exit_code: 0,
            task: "t".into(),
            requested: "i".into(),
            image: "i@1".into(),
            image_file: "/i".into(),
            warnings: Vec::new(),
            stopped_by: None,
            failed: Vec::new(),
            guests: vec![g("t-1", "exited", Some(0), Some(0), Some("powered-off"))],
            wall_s: 1.0,
        };
        let real: serde_json::Value = serde_json::from_str(&real.to_json()).expect("JSON");
        let keys = |v: &serde_json::Value| -> Vec<String> {
            let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
            k.sort();
            k
        };
        assert_eq!(keys(&documented), keys(&real));
        assert_eq!(keys(&documented["guests"][0]), keys(&real["guests"][0]));
    }

    #[test]
    fn stop_remembers_the_signal() {
        let s = Stop::new();
        assert!(!s.requested());
        assert_eq!(s.signal(), None);
        s.request(15);
        assert!(s.requested());
        assert_eq!(s.signal(), Some(15));
    }
}
