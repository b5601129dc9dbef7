//! `bootlace-vm`: boot a kernel and initramfs under QEMU and report how the guest ended.
//! The exit code is the guest's reported status, or one of bootlace-vm's own codes, all defined
//! in `bootlace_vm::Ended` and listed in `--help` (`bootlace_vm::outcome::EXIT_CODES_HELP`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bootlace_agent::fault::Fault;
use bootlace_vm::memory::{self, MemoryNeed};
use bootlace_vm::outcome::EXIT_CODES_HELP;
use bootlace_vm::{images, kernel, Accel, Disk, Ended, Outcome, Reason, Report, Share, VmSpec};
use bootlace_vm::{OobDigest, OobVia, VmError, VsockSpec};
use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-vm",
    version,
    about = "Boot bootlace images under QEMU",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a kernel + initramfs; the exit code is the guest's reported EXIT_STATUS
    /// (123 no status: kernel panic or reset, 124 timeout, 125 could not run the VM).
    #[command(after_help = EXIT_CODES_HELP)]
    Run(Box<RunArgs>),
    /// Run a task (docs/task.md): COUNT guests of one image, each configured by one host agent
    /// over vsock, restarted by the task's policy; prints a table when they have all ended
    /// (or on Ctrl-C / SIGTERM, which tear everything down).
    #[command(after_help = bootlace_vm::up::EXIT_CODES_HELP)]
    Up(UpArgs),
}

#[derive(clap::Args, Debug)]
struct UpArgs {
    /// The task file (TOML; docs/task.md).
    task: PathBuf,
    /// Directory of baked images (over the task's `images`).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Stage-1 initramfs for a disk image (default: the newest stage-1 image in the images
    /// directory).
    #[arg(long)]
    stage1: Option<PathBuf>,
    /// Kernel image (default: $BOOTLACE_KERNEL, else the newest /boot/vmlinuz-*).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// At most N guests running at once (default: all; under TCG each guest takes a host CPU
    /// while it boots).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    parallel: Option<u32>,
    /// Keep each run's console in DIR/<guest>.<run>.console.log (created if missing).
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
    /// Print one JSON object on stdout at the end instead of the table: exit_code, task,
    /// requested, image, image_file, warnings, stopped_by, failed, guests (guest, hostname,
    /// uuid, state, runs, restarts, ready_s, exit_code, exit_status, end, error,
    /// console_log), wall_s.
    #[arg(long)]
    json: bool,
    /// Use KVM instead of TCG.
    #[arg(long)]
    kvm: bool,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
}

#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("vsock_on").args(["vsock", "vsock_dir", "bootstrap_vsock", "host_agent"]).multiple(true)))]
struct RunArgs {
    /// Kernel image (default: $BOOTLACE_KERNEL, else the newest /boot/vmlinuz-*).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs to boot.
    #[arg(long, conflicts_with = "image")]
    initrd: Option<PathBuf>,
    /// Boot a baked image by name from --images: NAME or NAME@VERSION. A missing or damaged
    /// version falls back to the default version (DIR/NAME.default, else the highest) with a
    /// warning. Disk images boot through a stage-1 initramfs (--stage1, else the newest one
    /// in --images).
    #[arg(long, requires = "images")]
    image: Option<String>,
    /// Directory of baked images and their .meta.json files (bootlace-image bake).
    #[arg(long)]
    images: Option<PathBuf>,
    /// Stage-1 initramfs for disk images (default: the newest stage-1 image in --images).
    #[arg(long, requires = "image")]
    stage1: Option<PathBuf>,
    /// Kernel parameter to add (repeatable), e.g. --append bootlace.log=debug.
    #[arg(long)]
    append: Vec<String>,
    /// Guest memory in MiB [default: 256, raised with a warning to the least memory the
    /// image's metadata records (min_memory_mib); a --memory below that is refused].
    #[arg(long)]
    memory: Option<u32>,
    /// Guest CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// The VM's SMBIOS system UUID (QEMU -uuid): a guest's machine ID follows it, so boots
    /// with one UUID are one guest (default: none; the machine ID is then random per boot).
    #[arg(long)]
    uuid: Option<bootlace_vm::Uuid>,
    /// Use KVM instead of TCG (stock kernels hang on nested /dev/kvm here; time-boxed anyway).
    #[arg(long)]
    kvm: bool,
    /// Hard timeout in seconds; QEMU is killed when it passes.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Keep the console output in this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Do not copy the console to stderr as it arrives.
    #[arg(long)]
    no_echo: bool,
    /// Print one JSON object on stdout at the end: exit_code, ended (guest-status, no-status,
    /// timeout, could-not-run), end, reason and error (could-not-run), exit_status, status
    /// (the power-off line's STATUS), timeline, console_log, wall_s. Usage errors print none.
    #[arg(long)]
    json: bool,
    /// Show all kernel messages (no `quiet`).
    #[arg(long)]
    verbose_kernel: bool,
    /// A bootstrap bundle disk image (attached read-only).
    #[arg(long)]
    bootstrap_disk: Option<PathBuf>,
    /// A bootstrap bundle directory, shared read-only over 9p with the tag `bootlace`.
    #[arg(long = "bootstrap-9p")]
    bootstrap_9p: Option<PathBuf>,
    /// A raw disk image to attach read-write (repeatable; after the bootstrap disk).
    #[arg(long = "disk")]
    disks: Vec<PathBuf>,
    /// A directory to share read-write over 9p, as TAG=DIR (repeatable).
    #[arg(long = "share", value_parser = parse_share, value_name = "TAG=DIR")]
    shares: Vec<(String, PathBuf)>,
    /// Give the guest vsock (vhost-device-vsock + vhost-user-vsock-pci), with its sockets in a
    /// temporary directory printed on stderr and removed afterwards. A guest connection to host
    /// port P arrives on the Unix socket DIR/vsock_P.
    #[arg(long)]
    vsock: bool,
    /// Give the guest vsock with its sockets in DIR (created if missing, kept afterwards); listen
    /// on DIR/vsock_P before the guest boots to take its connections to host port P.
    #[arg(long, value_name = "DIR")]
    vsock_dir: Option<PathBuf>,
    /// The guest's vsock CID (with --vsock or --vsock-dir).
    #[arg(long, value_name = "N", requires = "vsock_on")]
    #[arg(default_value_t = bootlace_vm::vsock::DEFAULT_GUEST_CID)]
    #[arg(value_parser = clap::value_parser!(u32).range(3..i64::from(u32::MAX)))]
    guest_cid: u32,
    /// Serve this bundle (tarball or directory) to the guest over vsock with a host agent on
    /// port --host-port, printing what the guest reports (implies vsock).
    #[arg(long, value_name = "BUNDLE")]
    bootstrap_vsock: Option<PathBuf>,
    /// Run a host agent without a bundle, printing what the guest reports (implies vsock).
    #[arg(long)]
    host_agent: bool,
    /// The port the guest dials for its host agent.
    #[arg(long, default_value_t = bootlace_contract::protocol::DEFAULT_PORT)]
    host_port: u32,
    /// Give the guest a bundle digest out of band (SMBIOS type 11 and/or fw_cfg, see
    /// --oob-via): sha256:HEX, or `bundle` for the digest of --bootstrap-vsock's bundle. A
    /// guest without a pinned digest trusts its vsock bundle by it (docs/security.md).
    #[arg(long, value_name = "sha256:HEX|bundle")]
    oob_digest: Option<OobDigestArg>,
    /// How --oob-digest reaches the guest: smbios (-smbios type=11,value=io.bootlace.digest=…),
    /// fw-cfg (-fw_cfg name=opt/io.bootlace/digest,…) or both.
    #[arg(long, value_enum, default_value_t = OobVia::Both, requires = "oob_digest")]
    oob_via: OobVia,
    /// Make the host agent misbehave on purpose (repeatable); `--help` lists the kinds.
    #[arg(long = "fault", value_name = "KIND[=ARG]",
          value_parser = clap::value_parser!(Fault),
          long_help = bootlace_agent::fault::FAULT_LONG_HELP)]
    faults: Vec<Fault>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Extra QEMU arguments, after `--`.
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

/// `--oob-digest`: a digest, or the served bundle's.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OobDigestArg {
    /// This digest.
    Digest(bootlace_contract::digest::Sha256Digest),
    /// The digest of `--bootstrap-vsock`'s bundle.
    Bundle,
}

impl std::str::FromStr for OobDigestArg {
    type Err = bootlace_contract::digest::BadDigest;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bundle" => Ok(OobDigestArg::Bundle),
            _ => s.parse().map(OobDigestArg::Digest),
        }
    }
}

/// A `--share` value that is not `TAG=DIR` with a 9p mount tag QEMU takes.
#[derive(Debug, thiserror::Error)]
enum ShareError {
    /// No `=`.
    #[error("expected TAG=DIR")]
    NotTagDir,
    /// The tag is empty or longer than 31 bytes.
    #[error("the tag must be 1 to 31 characters")]
    TagLength,
}

fn parse_share(s: &str) -> Result<(String, PathBuf), ShareError> {
    let (tag, dir) = s.split_once('=').ok_or(ShareError::NotTagDir)?;
    if tag.is_empty() || tag.len() > 31 {
        return Err(ShareError::TagLength);
    }
    Ok((tag.to_owned(), PathBuf::from(dir)))
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version succeed; a usage error is 125, not clap's 2 (a guest status).
            let ended = Ended::CouldNotRun(Reason::Usage);
            return ExitCode::from(if e.use_stderr() { ended.code() } else { 0 });
        }
    };
    match cli.command {
        Cmd::Run(a) => main_run(*a, started),
        Cmd::Up(a) => main_up(a),
    }
}

/// `bootlace-vm up`: the exit code is 0, 1 (a guest failed), 125 (the task could not run) or
/// 128 + the signal that stopped it.
fn main_up(a: UpArgs) -> ExitCode {
    use bootlace_vm::task::Task;
    use bootlace_vm::up::{self, Stop, UpOptions};
    // Before any thread exists, so every thread (and child) has them blocked and the one
    // waiting for them gets them.
    let stop = Stop::new();
    if let Err(e) = wait_for_signals(Arc::clone(&stop)) {
        eprintln!("bootlace-vm: up: cannot handle SIGINT and SIGTERM: {e}");
        return ExitCode::from(Ended::COULD_NOT_RUN);
    }
    let cannot = |reason: Reason, e: &dyn std::fmt::Display| {
        eprintln!("bootlace-vm: up: cannot run the task ({reason}): {e}");
        ExitCode::from(Ended::COULD_NOT_RUN)
    };
    let task = match Task::read(&a.task) {
        Ok(t) => t,
        Err(e) => return cannot(Reason::BadInput, &bootlace_contract::chain(&e)),
    };
    let kernel = match a.kernel.clone().map_or_else(
        || kernel::find().map(|k| k.image).context("finding a kernel"),
        Ok,
    ) {
        Ok(k) => k,
        Err(e) => return cannot(Reason::BadInput, &format!("{e:#}")),
    };
    let mut opts = UpOptions::new(kernel);
    opts.qemu = a.qemu;
    opts.accel = if a.kvm { Accel::Kvm } else { Accel::Tcg };
    opts.images = a.images;
    opts.stage1 = a.stage1;
    opts.parallel = a.parallel.map(|n| n as usize);
    opts.logs = a.logs;
    opts.stop = stop;
    let report = match up::up(&task, &opts) {
        Ok(r) => r,
        Err(e) => return cannot(e.reason(), &bootlace_contract::chain(&e)),
    };
    if !report.failed.is_empty() {
        eprintln!("bootlace-vm: up: failed: {}", report.failed.join(", "));
    }
    if let Some(sig) = report.stopped_by {
        eprintln!("bootlace-vm: up: stopped by signal {sig}; every guest torn down");
    }
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.table());
    }
    ExitCode::from(report.exit_code)
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread and child started after)
/// and waits for them on a thread of its own, which asks `stop` to stop.
fn wait_for_signals(stop: Arc<bootlace_vm::up::Stop>) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT and SIGTERM")?;
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || loop {
            if let Ok(sig) = set.wait() {
                stop.request(sig as i32);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// `bootlace-vm run`.
fn main_run(a: RunArgs, started: Instant) -> ExitCode {
    let (json, console_log) = (a.json, a.console_log.clone());
    let report = match run(a) {
        Ok(outcome) => Report::of_outcome(&outcome, console_log.as_deref()),
        Err(e) => {
            eprintln!(
                "bootlace-vm: cannot run the VM ({}): {:#}",
                e.reason, e.error
            );
            Report::could_not_run(
                e.reason,
                format!("{:#}", e.error),
                console_log.as_deref(),
                started.elapsed(),
            )
        }
    };
    if json {
        println!("{}", report.to_json());
    }
    ExitCode::from(report.exit_code)
}

/// Why the VM could not run, and the error that says so.
#[derive(Debug)]
struct CannotRun {
    reason: Reason,
    error: anyhow::Error,
}

impl From<VmError> for CannotRun {
    fn from(e: VmError) -> CannotRun {
        CannotRun {
            reason: e.reason(),
            error: e.into(),
        }
    }
}

/// Tags an error with the reason the VM could not run.
trait Because<T> {
    fn because(self, reason: Reason) -> Result<T, CannotRun>;
}

impl<T, E: Into<anyhow::Error>> Because<T> for Result<T, E> {
    fn because(self, reason: Reason) -> Result<T, CannotRun> {
        self.map_err(|e| CannotRun {
            reason,
            error: e.into(),
        })
    }
}

/// `bootlace-vm run`: the spec from the arguments, the host side, the VM; the outcome.
fn run(a: RunArgs) -> Result<Outcome, CannotRun> {
    if !a.faults.is_empty() && a.bootstrap_vsock.is_none() && !a.host_agent {
        return Err(anyhow::anyhow!(
            "--fault needs a host agent: give --host-agent or --bootstrap-vsock"
        ))
        .because(Reason::Usage);
    }
    let bundle = served_bundle(&a)?;
    let mut spec = base_spec(&a)?;
    spec.oob_digest = oob_digest(&a, bundle.as_ref())?;
    let needs = match (&a.image, &a.images) {
        (Some(wanted), Some(dir)) => choose_image(
            &mut spec,
            dir,
            wanted,
            a.stage1.as_deref(),
            a.kernel.is_some(),
        )
        .because(Reason::BadInput)?,
        _ => a.initrd.iter().filter_map(|p| need_beside(p)).collect(),
    };
    let mem = memory::guest_memory(&needs, a.memory).because(Reason::BadInput)?;
    if let Some(w) = &mem.raised {
        eprintln!("bootlace-vm: warning: {w}");
    }
    spec.memory_mib = mem.mib;
    attach_disks_and_shares(&mut spec, &a);
    // Before anything starts (the vsock daemon, the host agent, QEMU).
    bootlace_vm::check_kernel_cmdline(&spec)?;
    // Removed when this function returns, after the VM and the vsock daemon are gone.
    let _vsock_tmp = add_vsock(&mut spec, &a).because(Reason::HostSetup)?;
    // Held to the end of this function, then dropped before `_vsock_tmp` (reverse order).
    let _host_services = match &spec.vsock {
        Some(v) => Some(start_host_services(v, &a, bundle)?),
        None => None,
    };
    let outcome = bootlace_vm::run(&spec)?;
    for line in outcome.timeline() {
        eprintln!("bootlace-vm: guest timeline: {line}");
    }
    eprintln!("bootlace-vm: {}", outcome.summary());
    Ok(outcome)
}

/// The spec of the plain flags: kernel, initrd, parameters, resources, console.
fn base_spec(a: &RunArgs) -> Result<VmSpec, CannotRun> {
    let kernel = match &a.kernel {
        Some(k) => k.clone(),
        None => {
            kernel::find()
                .context("finding a kernel")
                .because(Reason::BadInput)?
                .image
        }
    };
    let mut spec = VmSpec::new(kernel);
    spec.qemu = a.qemu.clone();
    spec.initrd = a.initrd.clone();
    spec.append = a.append.clone();
    spec.cpus = a.cpus;
    spec.uuid = a.uuid.clone();
    spec.accel = if a.kvm { Accel::Kvm } else { Accel::Tcg };
    spec.timeout = Duration::from_secs(a.timeout);
    spec.console_log = a.console_log.clone();
    spec.echo = !a.no_echo;
    spec.quiet_kernel = !a.verbose_kernel;
    spec.extra_args = a.qemu_args.clone();
    Ok(spec)
}

/// The least memory recorded in `FILE.meta.json` beside an image given by path, if any; a
/// metadata file that cannot be read is a warning (the need is then not checked).
fn need_beside(image: &Path) -> Option<MemoryNeed> {
    memory::need_beside(image).unwrap_or_else(|e| {
        eprintln!(
            "bootlace-vm: warning: {}; the guest memory is not checked against it",
            bootlace_contract::chain(&e)
        );
        None
    })
}

/// `--image NAME[@VERSION]` from `--images DIR`: the image (or its default version, with a
/// warning), through a stage-1 initramfs for a disk image. Returns the least memory the image
/// and its stage 1 record.
fn choose_image(
    spec: &mut VmSpec,
    dir: &Path,
    wanted: &str,
    stage1: Option<&Path>,
    kernel_given: bool,
) -> anyhow::Result<Vec<MemoryNeed>> {
    let (name, version) = match wanted.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (wanted, None),
    };
    let chosen = images::choose(dir, name, version)?;
    for w in &chosen.warnings {
        eprintln!("bootlace-vm: warning: {w}");
    }
    let m = &chosen.entry.meta;
    if m.format.is_bootable() && (stage1.is_some() || kernel_given) {
        anyhow::bail!(
            "{} is a bootable disk with its own kernel and stage 1, booted through UEFI \
             firmware: --kernel and --stage1 do not apply",
            m.id()
        );
    }
    let mut needs: Vec<MemoryNeed> = MemoryNeed::of(m).into_iter().collect();
    let stage1 = match (stage1, m.needs_stage1()) {
        (Some(p), true) => {
            needs.extend(need_beside(p));
            Some(p.to_owned())
        }
        (Some(p), false) => Some(p.to_owned()),
        (None, true) => {
            let s1 = images::stage1(dir)?;
            needs.extend(MemoryNeed::of(&s1.meta));
            Some(s1.path())
        }
        (None, false) => None,
    };
    bootlace_vm::boot_image(spec, &chosen.entry, stage1.as_deref())?;
    eprintln!(
        "bootlace-vm: booting {} ({}, sha256 {}){}",
        m.id(),
        m.format,
        m.sha256.get(..12).unwrap_or(&m.sha256),
        match &stage1 {
            Some(p) => format!(" through stage 1 {}", p.display()),
            None if m.format.is_bootable() => format!(
                " through UEFI firmware {}",
                spec.firmware.as_deref().unwrap_or(Path::new("?")).display()
            ),
            None => String::new(),
        }
    );
    Ok(needs)
}

/// `--bootstrap-disk`, `--disk`, `--bootstrap-9p`, `--share`.
fn attach_disks_and_shares(spec: &mut VmSpec, a: &RunArgs) {
    if let Some(path) = &a.bootstrap_disk {
        spec.disks.push(Disk {
            path: path.clone(),
            read_only: true,
        });
    }
    spec.disks.extend(a.disks.iter().map(|path| Disk {
        path: path.clone(),
        read_only: false,
    }));
    if let Some(dir) = &a.bootstrap_9p {
        spec.shares.push(Share {
            dir: dir.clone(),
            tag: "bootlace".to_owned(),
            read_only: true,
        });
    }
    spec.shares.extend(a.shares.iter().map(|(tag, dir)| Share {
        dir: dir.clone(),
        tag: tag.clone(),
        read_only: false,
    }));
}

/// Gives the guest vsock when a flag asks for it; the temporary socket directory, if one was
/// made, is removed when the returned value is dropped.
fn add_vsock(spec: &mut VmSpec, a: &RunArgs) -> anyhow::Result<Option<TempDir>> {
    if !(a.vsock || a.vsock_dir.is_some() || a.bootstrap_vsock.is_some() || a.host_agent) {
        return Ok(None);
    }
    let (dir, tmp) = match &a.vsock_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let tmp = TempDir::new("bootlace-vm-vsock")?;
            (tmp.0.clone(), Some(tmp))
        }
    };
    let vsock = VsockSpec {
        guest_cid: a.guest_cid,
        dir,
    };
    eprintln!(
        "bootlace-vm: vsock: guest CID {}; a guest connection to host port P arrives on \
         {}_P (listen there before the guest dials)",
        vsock.guest_cid,
        vsock.uds_path().display()
    );
    spec.vsock = Some(vsock);
    Ok(tmp)
}

/// A temporary directory for `--vsock`, removed with everything in it when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let base = std::env::temp_dir();
        let pid = std::process::id();
        for n in 0..100u32 {
            let dir = base.join(format!("{prefix}-{pid}-{n}"));
            // Private: the sockets in it reach the guest.
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(TempDir(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
            }
        }
        anyhow::bail!(
            "no free temporary directory name {prefix}-{pid}-N in {}",
            base.display()
        )
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Host-side vsock services, listening before the guest boots and held until the VM has
/// ended: the host agent, when asked for.
#[derive(Debug)]
struct HostServices {
    _agent: Option<std::sync::Arc<bootlace_agent::host::Host>>,
}

/// `--bootstrap-vsock`'s bundle (and its signature sidecar), read before anything starts.
fn served_bundle(a: &RunArgs) -> Result<Option<bootlace_agent::host::BundleSource>, CannotRun> {
    let Some(p) = &a.bootstrap_vsock else {
        return Ok(None);
    };
    let b = bootlace_agent::host::BundleSource::from_path(p).because(Reason::BadInput)?;
    let how = if a.oob_digest == Some(OobDigestArg::Bundle) {
        "its digest goes to the guest out of band".to_owned()
    } else {
        format!(
            "pin it with bootlace.digest=sha256:{} or give it with --oob-digest bundle",
            b.sha256
        )
    };
    eprintln!(
        "bootlace-vm: host agent serves {} ({}); {how}",
        p.display(),
        b.summary()
    );
    Ok(Some(b))
}

/// `--oob-digest` and `--oob-via` as the VM's out-of-band digest.
fn oob_digest(
    a: &RunArgs,
    bundle: Option<&bootlace_agent::host::BundleSource>,
) -> Result<Option<OobDigest>, CannotRun> {
    let digest = match (&a.oob_digest, bundle) {
        (None, _) => return Ok(None),
        (Some(OobDigestArg::Digest(d)), _) => d.clone(),
        (Some(OobDigestArg::Bundle), Some(b)) => format!("sha256:{}", b.sha256)
            .parse()
            .context("the served bundle's digest")
            .because(Reason::BadInput)?,
        (Some(OobDigestArg::Bundle), None) => {
            return Err(anyhow::anyhow!(
                "--oob-digest bundle needs --bootstrap-vsock (the bundle whose digest to give)"
            ))
            .because(Reason::Usage)
        }
    };
    Ok(Some(OobDigest {
        digest,
        via: a.oob_via,
    }))
}

/// Starts the host agent on `<uds>_<port>` when `--bootstrap-vsock` or `--host-agent` asks.
fn start_host_services(
    vsock: &VsockSpec,
    a: &RunArgs,
    bundle: Option<bootlace_agent::host::BundleSource>,
) -> Result<HostServices, CannotRun> {
    use bootlace_agent::host::{describe, Faults, Host};
    if a.bootstrap_vsock.is_none() && !a.host_agent {
        return Ok(HostServices { _agent: None });
    }
    let faults: Faults = a.faults.iter().copied().collect();
    if faults.any() {
        let flags: Vec<String> = a.faults.iter().map(Fault::to_string).collect();
        eprintln!(
            "bootlace-vm: the host agent injects faults: {}",
            flags.join(" ")
        );
    }
    let host = std::sync::Arc::new(
        Host::new(bundle, |e| {
            eprintln!("bootlace-vm: host: {}", describe(&e.event));
        })
        .with_faults(faults),
    );
    let path = vsock.port_path(a.host_port);
    host.serve_unix(&path)
        .with_context(|| format!("host agent on {}", path.display()))
        .because(Reason::HostSetup)?;
    Ok(HostServices { _agent: Some(host) })
}
