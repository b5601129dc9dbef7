//! bootlace-vm: boots kernels and images under QEMU, for people (the `bootlace-vm` CLI) and for
//! the end-to-end tests (this library).
//!
//! The QEMU command line is built by small pure functions ([`kernel_cmdline`], [`qemu_args`]);
//! [`run`] starts QEMU in a guard that kills it on every early return, copies the serial
//! console to a log (and, if asked, to stderr as it arrives), enforces a hard timeout, and
//! reads the guest's reported exit status from the console.
//!
//! TCG is the default accelerator: on this project's machines `/dev/kvm` is a nested flavour
//! on which stock kernels hang, so KVM is used only when asked for.
//!
//! Modules:
//! - [`images`]: a directory of baked images, chosen by name and version through their
//!   metadata, checked against their sha256.
//! - [`kernel`]: finding an installed kernel and its release.
//! - [`memory`]: the guest's memory against the least memory an image's metadata records.
//! - [`outcome`]: how a run ended, the exit codes of `bootlace-vm run` ([`Ended`]) and its
//!   `--json` report ([`Report`]).
//! - [`task`]: task files (an image, resources, a count, each guest's configuration, a
//!   restart policy); [`restart`]: the restart policy and the guests' bookkeeping (pure);
//!   [`up`]: `bootlace-vm up`, the guests of a task under one host agent.
//! - [`vsock`]: guest vsock through a `vhost-device-vsock` daemon per VM and hybrid-vsock Unix
//!   sockets on the host ([`VmSpec::vsock`]).

#![deny(unsafe_code)]

pub mod images;
pub mod kernel;
pub mod memory;
pub mod outcome;
pub mod restart;
pub mod task;
pub mod up;
pub mod vsock;

pub use outcome::{End, Ended, Outcome, Reason, Report};
pub use vsock::{VsockDaemon, VsockError, VsockSpec};

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// Software emulation (default; works everywhere).
    #[default]
    Tcg,
    /// Hardware virtualisation through `/dev/kvm` (only on request).
    Kvm,
}

/// What to boot and how.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// QEMU binary.
    pub qemu: PathBuf,
    /// Kernel image (`/boot/vmlinuz-…`).
    pub kernel: PathBuf,
    /// Initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// Kernel parameters on top of the console/panic defaults.
    pub append: Vec<String>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest CPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Hard limit on the whole run; QEMU is killed when it passes.
    pub timeout: Duration,
    /// Where to keep the console log.
    pub console_log: Option<PathBuf>,
    /// Copy the console to stderr as it arrives.
    pub echo: bool,
    /// Pass `quiet` to the kernel (only warnings and worse from the kernel on the console).
    pub quiet_kernel: bool,
    /// Block devices (virtio-blk, raw images), in order: the first is `/dev/vda`.
    pub disks: Vec<Disk>,
    /// Directories shared over virtio 9p.
    pub shares: Vec<Share>,
    /// More QEMU arguments, appended as they are.
    pub extra_args: Vec<String>,
    /// Guest vsock (a `vhost-user-vsock-pci` device served by `vhost-device-vsock`), if any.
    /// [`run`] starts the daemon before QEMU and stops it after. Every socket path follows from
    /// [`VsockSpec::dir`], so a host program can listen for guest connections to port P on
    /// [`VsockSpec::port_path`] (`DIR/vsock_P`) *before* calling [`run`].
    pub vsock: Option<VsockSpec>,
    /// The root disk of a disk-root boot (attached first, as `/dev/vda`), if any.
    pub root_disk: Option<RootDisk>,
    /// The VM's SMBIOS system UUID (QEMU `-uuid`): the guest's machine ID follows it, so one
    /// UUID is one guest across reboots. `None`: QEMU's default.
    pub uuid: Option<Uuid>,
    /// A bundle digest given to the guest out of band (SMBIOS type 11, fw_cfg): what a guest
    /// without a pinned digest trusts its vsock bundle by. `None`: none given.
    pub oob_digest: Option<OobDigest>,
    /// Boot through this UEFI firmware (OVMF) from the root disk, as a cloud boots a machine
    /// image: no `-kernel`, `-initrd` or `-append` (`kernel`, `initrd` and `append` are not
    /// used). `None`: direct kernel boot.
    pub firmware: Option<PathBuf>,
}

/// Where Debian's `ovmf` package puts the UEFI firmware for QEMU (one file: code and an
/// empty variable store, so every boot starts from a fresh NVRAM, as a new instance does).
pub const OVMF_PATHS: &[&str] = &[
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/OVMF/OVMF.fd",
    "/usr/share/qemu/OVMF.fd",
];

/// The UEFI firmware: `$BOOTLACE_OVMF`, else the first of [`OVMF_PATHS`] that exists.
pub fn find_ovmf() -> Result<PathBuf, VmError> {
    if let Some(p) = std::env::var_os("BOOTLACE_OVMF") {
        return Ok(PathBuf::from(p));
    }
    OVMF_PATHS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(VmError::NoFirmware)
}

/// A per-VM bundle digest the VMM gives the guest, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OobDigest {
    /// The digest.
    pub digest: bootlace_contract::digest::Sha256Digest,
    /// The channel(s).
    pub via: OobVia,
}

/// The channel of an out-of-band digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OobVia {
    /// An SMBIOS type 11 OEM string `io.bootlace.digest=sha256:…` (`-smbios type=11,…`).
    Smbios,
    /// The QEMU fw_cfg file `opt/io.bootlace/digest` (`-fw_cfg name=…,string=…`).
    FwCfg,
    /// Both (the guest checks they agree).
    #[default]
    Both,
}

/// The QEMU arguments that give the guest `o`.
pub fn oob_args(o: &OobDigest) -> Vec<String> {
    use bootlace_contract::trust::{FW_CFG_DIGEST_NAME, SMBIOS_DIGEST_KEY};
    let mut a = Vec::new();
    // A digest is `sha256:` and hex: no `,` to escape in a QEMU option value.
    if matches!(o.via, OobVia::Smbios | OobVia::Both) {
        a.push("-smbios".to_owned());
        a.push(format!("type=11,value={SMBIOS_DIGEST_KEY}={}", o.digest));
    }
    if matches!(o.via, OobVia::FwCfg | OobVia::Both) {
        a.push("-fw_cfg".to_owned());
        a.push(format!("name={FW_CFG_DIGEST_NAME},string={}", o.digest));
    }
    a
}

/// An SMBIOS system UUID: 8-4-4-4-12 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uuid(String);

impl std::str::FromStr for Uuid {
    type Err = BadUuid;
    fn from_str(s: &str) -> Result<Uuid, BadUuid> {
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        let hex = groups
            .iter()
            .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        if lens == [8, 4, 4, 4, 12] && hex {
            Ok(Uuid(s.to_ascii_lowercase()))
        } else {
            Err(BadUuid(s.to_owned()))
        }
    }
}

impl Uuid {
    /// The UUID, lowercase.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A UUID that is not 8-4-4-4-12 hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a UUID (8-4-4-4-12 hexadecimal digits)")]
pub struct BadUuid(String);

/// A raw disk image attached as a virtio-blk device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// Attach read-only (the guest cannot change the file).
    pub read_only: bool,
}

/// The root filesystem image of a disk-root boot, attached before every other disk so the
/// guest sees it as `/dev/vda`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootDisk {
    /// The image file.
    pub path: PathBuf,
    /// QEMU's name of its format: `raw`, `qcow2`, `vmdk` or `vpc`.
    pub format: &'static str,
    /// The disk firmware boots from (`bootindex=0`).
    pub bootable: bool,
    /// Attach read-only (erofs, squashfs).
    pub read_only: bool,
    /// Writable, but the writes are dropped when QEMU ends (the image file is not changed).
    pub snapshot: bool,
}

/// A host directory shared with the guest over virtio 9p.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The directory.
    pub dir: PathBuf,
    /// The mount tag the guest sees.
    pub tag: String,
    /// Share read-only (QEMU refuses every write).
    pub read_only: bool,
}

impl VmSpec {
    /// A spec with the defaults: TCG, 256 MiB, 1 CPU, 120 s, quiet kernel, no echo.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmSpec {
            qemu: PathBuf::from("qemu-system-x86_64"),
            kernel: kernel.into(),
            initrd: None,
            append: Vec::new(),
            memory_mib: memory::DEFAULT_MEMORY_MIB,
            cpus: 1,
            accel: Accel::Tcg,
            timeout: Duration::from_secs(120),
            console_log: None,
            echo: false,
            quiet_kernel: true,
            disks: Vec::new(),
            shares: Vec::new(),
            extra_args: Vec::new(),
            vsock: None,
            root_disk: None,
            uuid: None,
            oob_digest: None,
            firmware: None,
        }
    }
}

/// The kernel command line: serial console, reboot at once on panic (QEMU then exits because
/// of `-no-reboot`), optionally `quiet`, then the caller's parameters.
pub fn kernel_cmdline(spec: &VmSpec) -> String {
    let mut words = vec!["console=ttyS0".to_owned(), "panic=-1".to_owned()];
    if spec.quiet_kernel {
        words.push("quiet".to_owned());
    }
    words.extend(spec.append.iter().cloned());
    words.join(" ")
}

/// The x86-64 kernel's command-line buffer (`COMMAND_LINE_SIZE`), its terminating NUL
/// included: the longest line the kernel takes whole is one byte shorter.
pub const KERNEL_COMMAND_LINE_SIZE: usize = 2048;

/// Refuses a kernel command line ([`kernel_cmdline`]: bootlace-vm's own parameters, every
/// appended one and `bootlace.root=`) that the kernel would not take whole.
pub fn check_kernel_cmdline(spec: &VmSpec) -> Result<(), VmError> {
    if spec.firmware.is_some() {
        // The command line is the disk's own.
        return Ok(());
    }
    let len = kernel_cmdline(spec).len();
    if len >= KERNEL_COMMAND_LINE_SIZE {
        return Err(VmError::CommandLineTooLong {
            len,
            max: KERNEL_COMMAND_LINE_SIZE,
        });
    }
    Ok(())
}

/// The QEMU arguments (without the program name). With vsock on, the guest memory lives in a
/// shared memfd backend (`-machine q35,memory-backend=mem`, see [`vsock::vsock_qemu_args`]) so
/// the vhost-user daemon can map it.
pub fn qemu_args(spec: &VmSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| (*s).to_owned()));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    let machine = match spec.vsock {
        Some(_) => format!("q35,memory-backend={}", vsock::MEMORY_BACKEND_ID),
        None => "q35".to_owned(),
    };
    match spec.accel {
        Accel::Tcg => push(&["-machine", &machine, "-accel", "tcg"]),
        Accel::Kvm => push(&["-machine", &machine, "-accel", "kvm", "-cpu", "host"]),
    }
    let mem = spec.memory_mib.to_string();
    let cpus = spec.cpus.to_string();
    push(&["-m", &mem, "-smp", &cpus]);
    if let Some(uuid) = &spec.uuid {
        push(&["-uuid", uuid.as_str()]);
    }
    if let Some(o) = &spec.oob_digest {
        push(&oob_args(o).iter().map(String::as_str).collect::<Vec<_>>());
    }
    if let Some(v) = &spec.vsock {
        let vsock_args = vsock::vsock_qemu_args(&v.control_socket(), spec.memory_mib);
        push(&vsock_args.iter().map(String::as_str).collect::<Vec<_>>());
    }
    push(&["-serial", "stdio", "-monitor", "none"]);
    if let Some(fw) = &spec.firmware {
        let fw = fw.to_string_lossy().into_owned();
        push(&["-bios", &fw]);
    } else {
        let kernel = spec.kernel.to_string_lossy().into_owned();
        push(&["-kernel", &kernel]);
        if let Some(initrd) = &spec.initrd {
            let initrd = initrd.to_string_lossy().into_owned();
            push(&["-initrd", &initrd]);
        }
        let cmdline = kernel_cmdline(spec);
        push(&["-append", &cmdline]);
    }
    if let Some(r) = &spec.root_disk {
        a.extend(root_disk_args(r));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        a.extend(disk_args(i, d));
    }
    for (i, s) in spec.shares.iter().enumerate() {
        a.extend(share_args(i, s));
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

/// QEMU's option values escape `,` by doubling it.
fn opt_value(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// `-drive` + `-device virtio-blk-pci` for disk number `i`.
pub fn disk_args(i: usize, d: &Disk) -> Vec<String> {
    let ro = if d.read_only { ",readonly=on" } else { "" };
    vec![
        "-drive".to_owned(),
        format!(
            "file={},if=none,id=disk{i},format=raw{ro}",
            opt_value(&d.path)
        ),
        "-device".to_owned(),
        format!("virtio-blk-pci,drive=disk{i}"),
    ]
}

/// Sets `spec` up to boot a chosen image: an initramfs directly; a disk image (erofs, ext4,
/// squashfs, qcow2) attached first, with `stage1` as the initramfs and `bootlace.root=` telling
/// it where the root is. A read-write root (ext4) is attached as a snapshot so booting never
/// changes the image file.
pub fn boot_image(
    spec: &mut VmSpec,
    image: &images::Entry,
    stage1: Option<&Path>,
) -> Result<(), images::ImagesError> {
    let m = &image.meta;
    if !m.is_disk() {
        spec.initrd = Some(image.path());
        return Ok(());
    }
    if let Some(disk) = &m.disk {
        return boot_disk(spec, image, disk);
    }
    let stage1 = stage1.ok_or_else(|| images::ImagesError::Bad {
        meta: image.meta_path.clone(),
        why: format!(
            "{} is a {} disk image: it needs a stage-1 initramfs",
            m.id(),
            m.format
        ),
    })?;
    let writable = m.fstype == Some(bootlace_contract::fs::FsType::Ext4);
    spec.root_disk = Some(RootDisk {
        path: image.path(),
        format: if m.format == bootlace_contract::image::Format::Qcow2 {
            "qcow2"
        } else {
            "raw"
        },
        bootable: false,
        read_only: !writable,
        snapshot: writable,
    });
    spec.initrd = Some(stage1.to_owned());
    spec.append.push(images::root_param(m));
    Ok(())
}

/// Sets `spec` up to boot a bootable disk through UEFI firmware, with no `-kernel`: the disk
/// attached first and booted from, read-only for an erofs root, as a snapshot for an ext4 one
/// (the image file never changes). Parameters to append are refused: the disk's command line
/// is baked in.
fn boot_disk(
    spec: &mut VmSpec,
    image: &images::Entry,
    disk: &bootlace_contract::image::DiskInfo,
) -> Result<(), images::ImagesError> {
    let m = &image.meta;
    if let Some(first) = spec.append.first() {
        return Err(images::ImagesError::Bad {
            meta: image.meta_path.clone(),
            why: format!(
                "{} is a bootable disk with its kernel command line baked in ({}): it takes no \
                 kernel parameter such as {first:?} (bake them with --kernel-arg; give a \
                 guest its own settings over vsock, SMBIOS/fw_cfg or a bundle disk)",
                m.id(),
                disk.cmdline
            ),
        });
    }
    let firmware = find_ovmf().map_err(|e| images::ImagesError::Bad {
        meta: image.meta_path.clone(),
        why: e.to_string(),
    })?;
    let writable = m.fstype == Some(bootlace_contract::fs::FsType::Ext4);
    spec.firmware = Some(firmware);
    spec.initrd = None;
    spec.root_disk = Some(RootDisk {
        path: image.path(),
        format: disk.container.qemu_format(),
        bootable: true,
        read_only: !writable,
        snapshot: writable,
    });
    Ok(())
}

/// `-drive` + `-device virtio-blk-pci` for the root disk of a disk-root boot.
pub fn root_disk_args(r: &RootDisk) -> Vec<String> {
    let mut opts = format!(
        "file={},if=none,id=rootdisk,format={}",
        opt_value(&r.path),
        r.format
    );
    if r.read_only {
        opts.push_str(",readonly=on");
    } else if r.snapshot {
        opts.push_str(",snapshot=on");
    }
    vec![
        "-drive".to_owned(),
        opts,
        "-device".to_owned(),
        if r.bootable {
            "virtio-blk-pci,drive=rootdisk,bootindex=0".to_owned()
        } else {
            "virtio-blk-pci,drive=rootdisk".to_owned()
        },
    ]
}

/// `-fsdev` + `-device virtio-9p-pci` for share number `i`.
pub fn share_args(i: usize, s: &Share) -> Vec<String> {
    let ro = if s.read_only { ",readonly=on" } else { "" };
    vec![
        "-fsdev".to_owned(),
        format!(
            "local,id=fs{i},path={},security_model=none{ro}",
            opt_value(&s.dir)
        ),
        "-device".to_owned(),
        format!(
            "virtio-9p-pci,fsdev=fs{i},mount_tag={}",
            s.tag.replace(',', ",,")
        ),
    ]
}

/// Why a run could not happen at all.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The kernel command line is longer than the kernel takes.
    #[error(
        "the kernel command line is {len} bytes; with its terminating NUL that is over the \
         x86-64 kernel's {max}-byte limit (COMMAND_LINE_SIZE), so it takes at most {} bytes \
         (bootlace-vm's own console=, panic= and quiet, every --append and bootlace.root= \
         count)",
        max - 1
    )]
    CommandLineTooLong {
        /// Bytes of the line, without the NUL.
        len: usize,
        /// The limit, NUL included ([`KERNEL_COMMAND_LINE_SIZE`]).
        max: usize,
    },
    /// No UEFI firmware to boot a bootable disk with.
    #[error(
        "no UEFI firmware to boot the disk with: none of {} exists (install ovmf, or set \
         BOOTLACE_OVMF to an OVMF.fd)",
        OVMF_PATHS.join(", ")
    )]
    NoFirmware,
    /// A file the spec names does not exist.
    #[error("{what} {} not found", path.display())]
    Missing {
        /// What it is (kernel, initrd).
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// QEMU could not be started.
    #[error("cannot start {}", qemu.display())]
    Spawn {
        /// The binary.
        qemu: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The console log could not be written.
    #[error("console log {}", path.display())]
    Log {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Waiting for QEMU failed.
    #[error("waiting for QEMU")]
    Wait(#[source] io::Error),
    /// The vsock daemon could not be found or started (the message names the binary and
    /// carries its stderr; a missing binary says to run `make setup`).
    #[error(transparent)]
    Vsock(#[from] VsockError),
}

impl VmError {
    /// Which kind of "could not run" this is (the exit code is 125 for every one).
    pub fn reason(&self) -> Reason {
        match self {
            VmError::Missing { .. } | VmError::Log { .. } | VmError::CommandLineTooLong { .. } => {
                Reason::BadInput
            }
            VmError::Spawn { .. } | VmError::Wait(_) => Reason::Qemu,
            VmError::Vsock(_) | VmError::NoFirmware => Reason::HostSetup,
        }
    }
}

/// A QEMU child that is killed and reaped when dropped, whatever the return path.
#[derive(Debug)]
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn pump<R: Read + Send + 'static>(
    src: R,
    sink: Arc<Mutex<Vec<u8>>>,
    mut log: Option<std::fs::File>,
    echo: bool,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if let Some(f) = log.as_mut() {
                        let _ = f.write_all(&line);
                    }
                    if echo {
                        let _ = io::stderr().write_all(&line);
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.extend_from_slice(&line);
                    }
                }
            }
        }
    })
}

/// Boots the spec and waits for the guest to end (or the timeout).
pub fn run(spec: &VmSpec) -> Result<Outcome, VmError> {
    run_stoppable(spec, &AtomicBool::new(false))
}

/// Like [`run`], and QEMU is killed as soon as `stop` is set (checked every 20 ms): the run
/// then ends as [`End::Stopped`]. What `bootlace-vm up` uses to tear its guests down on
/// Ctrl-C or SIGTERM.
pub fn run_stoppable(spec: &VmSpec, stop: &AtomicBool) -> Result<Outcome, VmError> {
    check_inputs(spec)?;
    let log = open_console_log(spec)?;
    // Declared before QEMU's guard, so it is dropped after it on every return path: the
    // daemon outlives QEMU, then is killed and its sockets removed.
    let daemon = match &spec.vsock {
        Some(v) => Some(VsockDaemon::start(v)?),
        None => None,
    };
    let started = Instant::now();
    let mut qemu = spawn_qemu(spec)?;
    let capture = Capture::start(&mut qemu, log, spec.echo);
    let mut firmware = spec.firmware.as_ref().map(|_| FirmwareWatch::default());
    let status = wait_until(&mut qemu, started + spec.timeout, stop, || {
        firmware.as_mut().and_then(|w| w.look(&capture.console))
    })?;
    drop(qemu);
    let (console, qemu_stderr) = capture.finish();
    let wall = started.elapsed();
    let daemon_stderr = daemon.as_ref().map(VsockDaemon::stderr);
    drop(daemon);
    let end = classify(status, &console, &qemu_stderr, daemon_stderr.as_deref());
    Ok(Outcome {
        end,
        exit_status: bootlace_contract::status::parse_exit_status(&console),
        console,
        wall,
    })
}

/// The kernel takes the command line whole, and every file the spec names exists (before
/// anything starts).
fn check_inputs(spec: &VmSpec) -> Result<(), VmError> {
    check_kernel_cmdline(spec)?;
    let missing = |what, path: &Path| VmError::Missing {
        what,
        path: path.to_owned(),
    };
    match &spec.firmware {
        Some(fw) if !fw.is_file() => return Err(missing("UEFI firmware", fw)),
        Some(_) => {}
        None if !spec.kernel.exists() => return Err(missing("kernel", &spec.kernel)),
        None => {}
    }
    if let Some(initrd) = spec.initrd.as_ref().filter(|p| !p.exists()) {
        return Err(missing("initrd", initrd));
    }
    if let Some(r) = spec.root_disk.as_ref().filter(|r| !r.path.is_file()) {
        return Err(missing("root disk image", &r.path));
    }
    if let Some(d) = spec.disks.iter().find(|d| !d.path.is_file()) {
        return Err(missing("disk image", &d.path));
    }
    if let Some(s) = spec.shares.iter().find(|s| !s.dir.is_dir()) {
        return Err(missing("9p share directory", &s.dir));
    }
    Ok(())
}

fn open_console_log(spec: &VmSpec) -> Result<Option<std::fs::File>, VmError> {
    let Some(path) = &spec.console_log else {
        return Ok(None);
    };
    std::fs::File::create(path)
        .map(Some)
        .map_err(|source| VmError::Log {
            path: path.clone(),
            source,
        })
}

fn spawn_qemu(spec: &VmSpec) -> Result<Guard, VmError> {
    Command::new(&spec.qemu)
        .args(qemu_args(spec))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(Guard)
        .map_err(|source| VmError::Spawn {
            qemu: spec.qemu.clone(),
            source,
        })
}

/// How the wait for QEMU ended.
#[derive(Debug, Clone)]
enum Waited {
    /// QEMU exited.
    Exited(ExitStatus),
    /// The deadline passed first.
    TimedOut,
    /// The stop flag was set first.
    Stopped,
    /// The firmware found nothing to boot (why); QEMU was killed.
    NoBoot(String),
}

/// Waits for QEMU to exit, the deadline to pass, `stop` to be set or `no_boot` to say the
/// firmware gave up.
fn wait_until(
    qemu: &mut Guard,
    deadline: Instant,
    stop: &AtomicBool,
    mut no_boot: impl FnMut() -> Option<String>,
) -> Result<Waited, VmError> {
    loop {
        match qemu.0.try_wait().map_err(VmError::Wait)? {
            Some(status) => return Ok(Waited::Exited(status)),
            None if stop.load(Ordering::SeqCst) => return Ok(Waited::Stopped),
            None if Instant::now() >= deadline => return Ok(Waited::TimedOut),
            None => {
                if let Some(why) = no_boot() {
                    return Ok(Waited::NoBoot(why));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Watches a firmware boot's console for the firmware giving up on the disk (OVMF then
/// starts its shell, or says no bootable option was found, and waits for a key forever).
#[derive(Debug, Default)]
struct FirmwareWatch {
    /// Bytes of the console already looked at.
    seen: usize,
}

impl FirmwareWatch {
    /// Stop looking once the console is this long: the kernel is running by then.
    const LIMIT: usize = 4 << 20;

    fn look(&mut self, console: &Arc<Mutex<Vec<u8>>>) -> Option<String> {
        if self.seen >= Self::LIMIT {
            return None;
        }
        let buf = console.lock().ok()?;
        if buf.len() == self.seen {
            return None;
        }
        self.seen = buf.len();
        firmware_gave_up(&String::from_utf8_lossy(&buf))
    }
}

/// Why the firmware booted nothing, from its console: `None` while it has not given up.
/// OVMF names each boot option it could not load (`BdsDxe: failed to load Boot0001 "UEFI Misc
/// Device" from PciRoot(0x0)/Pci(0x1,0x0): Not Found`), then starts its shell or says no
/// bootable option or device was found.
pub fn firmware_gave_up(console: &str) -> Option<String> {
    let gave_up = console.contains("UEFI Interactive Shell")
        || console.contains("No bootable option or device was found");
    if !gave_up {
        return None;
    }
    let failed: Vec<String> = console
        .split(['\r', '\n'])
        .filter_map(|l| {
            l.split_once("BdsDxe: failed to load ")
                .map(|(_, rest)| rest.trim().to_owned())
        })
        .collect();
    let detail = if failed.is_empty() {
        "no boot option could be loaded".to_owned()
    } else {
        format!("it could not load {}", failed.join("; "))
    };
    Some(format!(
        "the UEFI firmware found nothing to boot ({detail}): the disk has no readable EFI \
         system partition with \\EFI\\BOOT\\BOOTX64.EFI"
    ))
}

/// QEMU's stdout (the serial console: kept, logged, echoed if asked) and stderr (kept,
/// echoed if asked), each copied by its own thread.
struct Capture {
    console: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    pumps: Vec<JoinHandle<()>>,
}

impl Capture {
    fn start(qemu: &mut Guard, log: Option<std::fs::File>, echo: bool) -> Capture {
        let console = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut pumps = Vec::new();
        if let Some(out) = qemu.0.stdout.take() {
            pumps.push(pump(out, console.clone(), log, echo));
        }
        if let Some(err) = qemu.0.stderr.take() {
            pumps.push(pump(err, stderr.clone(), None, echo));
        }
        Capture {
            console,
            stderr,
            pumps,
        }
    }

    /// Console and stderr text, once QEMU has ended and the pumps have drained.
    fn finish(self) -> (String, String) {
        for p in self.pumps {
            let _ = p.join();
        }
        let text = |buf: &Arc<Mutex<Vec<u8>>>| {
            buf.lock()
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        (text(&self.console), text(&self.stderr))
    }
}

/// How the run ended, from how the wait ended (QEMU's exit status) and the console.
fn classify(status: Waited, console: &str, qemu_stderr: &str, daemon_stderr: Option<&str>) -> End {
    let status = match status {
        Waited::TimedOut => return End::TimedOut,
        Waited::Stopped => return End::Stopped,
        Waited::NoBoot(why) => return End::NoBoot(why),
        Waited::Exited(s) => s,
    };
    match status {
        s if !s.success() => {
            let mut why = format!("{s}: {}", qemu_stderr.trim());
            if let Some(e) = daemon_stderr.map(str::trim).filter(|e| !e.is_empty()) {
                why.push_str(&format!("; {} stderr: {e}", vsock::DAEMON));
            }
            End::QemuFailed(why)
        }
        _ if console.contains("Kernel panic - not syncing") => End::KernelPanic,
        _ if console.contains("reboot: Power down") => End::PoweredOff,
        _ => End::Reset,
    }
}

/// Where a test or a person keeps per-run files: `dir/name.console.log`.
pub fn console_log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.console.log"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_tcg_command_line() {
        let mut spec = VmSpec::new("/boot/vmlinuz-x");
        spec.initrd = Some(PathBuf::from("/tmp/i.img"));
        spec.append = vec!["bootlace.log=debug".into()];
        let args = qemu_args(&spec);
        let joined = args.join(" ");
        for want in [
            "-no-reboot",
            "-accel tcg",
            "-m 256",
            "-serial stdio",
            "-kernel /boot/vmlinuz-x",
            "-initrd /tmp/i.img",
        ] {
            assert!(joined.contains(want), "{joined} lacks {want}");
        }
        assert!(!joined.contains("kvm"));
        let append_at = args.iter().position(|a| a == "-append").expect("append");
        assert_eq!(
            args[append_at + 1],
            "console=ttyS0 panic=-1 quiet bootlace.log=debug"
        );
        assert!(!joined.contains("-uuid"));
        spec.uuid = Some(
            "0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0"
                .parse()
                .expect("uuid"),
        );
        let joined = qemu_args(&spec).join(" ");
        assert!(
            joined.contains("-uuid 0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
            "{joined}"
        );
        for bad in [
            "",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
        ] {
            let e = bad.parse::<Uuid>().expect_err(bad);
            assert!(e.to_string().contains("is not a UUID"), "{e}");
        }
    }

    #[test]
    fn an_out_of_band_digest_goes_to_smbios_fw_cfg_or_both() {
        let mut spec = VmSpec::new(PathBuf::from("/boot/vmlinuz"));
        let joined = qemu_args(&spec).join(" ");
        assert!(
            !joined.contains("-smbios") && !joined.contains("-fw_cfg"),
            "{joined}"
        );
        let digest: bootlace_contract::digest::Sha256Digest = format!("sha256:{}", "ab".repeat(32))
            .parse()
            .expect("digest");
        let smbios = format!("-smbios type=11,value=io.bootlace.digest={digest}");
        let fw_cfg = format!("-fw_cfg name=opt/io.bootlace/digest,string={digest}");
        for (via, want_smbios, want_fw_cfg) in [
            (OobVia::Smbios, true, false),
            (OobVia::FwCfg, false, true),
            (OobVia::Both, true, true),
        ] {
            spec.oob_digest = Some(OobDigest {
                digest: digest.clone(),
                via,
            });
            let joined = qemu_args(&spec).join(" ");
            assert_eq!(joined.contains(&smbios), want_smbios, "{via:?}: {joined}");
            assert_eq!(joined.contains(&fw_cfg), want_fw_cfg, "{via:?}: {joined}");
        }
    }

    #[test]
    fn disks_and_shares() {
        let mut spec = VmSpec::new("/k");
        spec.disks = vec![
            Disk {
                path: "/b/boot,strap.img".into(),
                read_only: true,
            },
            Disk {
                path: "/b/data.img".into(),
                read_only: false,
            },
        ];
        spec.shares = vec![Share {
            dir: "/srv/share".into(),
            tag: "bootlace".into(),
            read_only: true,
        }];
        let joined = qemu_args(&spec).join(" ");
        for want in [
            "-drive file=/b/boot,,strap.img,if=none,id=disk0,format=raw,readonly=on -device virtio-blk-pci,drive=disk0",
            "-drive file=/b/data.img,if=none,id=disk1,format=raw -device virtio-blk-pci,drive=disk1",
            "-fsdev local,id=fs0,path=/srv/share,security_model=none,readonly=on -device virtio-9p-pci,fsdev=fs0,mount_tag=bootlace",
        ] {
            assert!(joined.contains(want), "{joined} lacks {want}");
        }
    }

    #[test]
    fn kvm_only_on_request() {
        let mut spec = VmSpec::new("/k");
        spec.accel = Accel::Kvm;
        spec.quiet_kernel = false;
        let joined = qemu_args(&spec).join(" ");
        assert!(joined.contains("-accel kvm -cpu host"));
        assert!(!joined.contains("quiet"));
        assert!(!joined.contains("-initrd"));
    }

    #[test]
    fn vsock_puts_the_memory_in_a_shared_memfd() {
        let mut spec = VmSpec::new("/k");
        spec.memory_mib = 384;
        let plain = qemu_args(&spec).join(" ");
        assert!(plain.contains("-machine q35 -accel tcg"), "{plain}");
        for absent in ["memory-backend", "vhost-user", "-chardev"] {
            assert!(!plain.contains(absent), "{plain} has {absent}");
        }

        spec.vsock = Some(VsockSpec::new("/run/vm1"));
        let joined = qemu_args(&spec).join(" ");
        for want in [
            "-machine q35,memory-backend=mem -accel tcg",
            "-m 384",
            "-object memory-backend-memfd,id=mem,size=384M,share=on",
            "-chardev socket,id=vsock0,path=/run/vm1/vhost.sock",
            "-device vhost-user-vsock-pci,chardev=vsock0",
        ] {
            assert!(joined.contains(want), "{joined} lacks {want}");
        }
        spec.accel = Accel::Kvm;
        let joined = qemu_args(&spec).join(" ");
        assert!(joined.contains("-machine q35,memory-backend=mem -accel kvm -cpu host"));
    }

    #[test]
    fn an_over_long_kernel_command_line_is_refused_before_qemu_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"not a kernel").expect("write");
        let mut spec = VmSpec::new(&kernel);
        // A QEMU that cannot start: a run that got past the check would fail with Spawn.
        spec.qemu = dir.path().join("no-qemu");
        let own = "console=ttyS0 panic=-1 quiet ".len();
        // The longest line the kernel takes: 2047 bytes and the NUL.
        spec.append = vec![format!("x={}", "a".repeat(2047 - own - 2))];
        assert_eq!(kernel_cmdline(&spec).len(), 2047);
        check_kernel_cmdline(&spec).expect("2047 bytes fit");
        assert!(matches!(run(&spec), Err(VmError::Spawn { .. })));
        // One byte more, counted across bootlace-vm's own words and several --append values.
        spec.append = vec![
            format!("x={}", "a".repeat(1000)),
            format!("y={}", "b".repeat(2047 - own - 1000 - 2 - 3)),
        ];
        assert_eq!(kernel_cmdline(&spec).len(), 2047);
        check_kernel_cmdline(&spec).expect("2047 bytes fit");
        spec.append.push("z".to_owned());
        assert_eq!(kernel_cmdline(&spec).len(), 2049);
        let err = run(&spec).expect_err("too long");
        assert!(
            matches!(
                err,
                VmError::CommandLineTooLong {
                    len: 2049,
                    max: 2048
                }
            ),
            "{err}"
        );
        assert_eq!(err.reason(), Reason::BadInput);
        assert_eq!(
            err.to_string(),
            "the kernel command line is 2049 bytes; with its terminating NUL that is over the \
             x86-64 kernel's 2048-byte limit (COMMAND_LINE_SIZE), so it takes at most 2047 \
             bytes (bootlace-vm's own console=, panic= and quiet, every --append and \
             bootlace.root= count)"
        );
        // Without `quiet` the same parameters fit again.
        spec.quiet_kernel = false;
        spec.append.pop();
        spec.append.push("zzzzz".to_owned());
        assert_eq!(kernel_cmdline(&spec).len(), 2047);
        check_kernel_cmdline(&spec).expect("fits without quiet");
        // bootlace.root= that boot_image adds counts too: a line one byte short of fitting
        // with it fits without it.
        spec.quiet_kernel = true;
        let root = "bootlace.root=LABEL=rootfs".to_owned();
        spec.append = vec![String::new()];
        let room = 2047 - kernel_cmdline(&spec).len() - (root.len() + 1) + 1;
        spec.append = vec![format!("y={}", "b".repeat(room - 2))];
        check_kernel_cmdline(&spec).expect("fits before bootlace.root=");
        spec.append.push(root);
        assert_eq!(kernel_cmdline(&spec).len(), 2048);
        assert!(matches!(
            check_kernel_cmdline(&spec),
            Err(VmError::CommandLineTooLong { len: 2048, .. })
        ));
    }

    #[test]
    fn missing_kernel_is_a_clear_error() {
        let spec = VmSpec::new("/nonexistent/vmlinuz");
        let err = run(&spec).expect_err("missing kernel");
        assert_eq!(err.to_string(), "kernel /nonexistent/vmlinuz not found");
    }

    #[test]
    fn a_firmware_that_booted_nothing_is_named() {
        let booting = "\x1b[2JBdsDxe: loading Boot0001 \"UEFI Misc Device\" from PciRoot(0x0)/Pci(0x1,0x0)\r\n\
                       BdsDxe: starting Boot0001 \"UEFI Misc Device\"\r\n";
        assert_eq!(firmware_gave_up(booting), None);
        let failed = "BdsDxe: failed to load Boot0001 \"UEFI Misc Device\" from \
                      PciRoot(0x0)/Pci(0x1,0x0): Not Found\r\n\
                      BdsDxe: loading Boot0002 \"EFI Internal Shell\"\r\n\
                      \x1b[01;01HUEFI Interactive Shell v2.2\r\n";
        let why = firmware_gave_up(failed).expect("gave up");
        assert!(why.contains("Boot0001 \"UEFI Misc Device\""), "{why}");
        assert!(why.contains("Not Found"), "{why}");
        let why = firmware_gave_up("BdsDxe: No bootable option or device was found.\r\n")
            .expect("gave up");
        assert!(why.contains("no boot option could be loaded"), "{why}");
    }

    #[test]
    fn a_firmware_boot_has_no_kernel_arguments() {
        let mut spec = VmSpec::new("/boot/vmlinuz-x");
        spec.append = vec!["x=1".into()];
        spec.firmware = Some(PathBuf::from("/fw/OVMF.fd"));
        spec.root_disk = Some(RootDisk {
            path: PathBuf::from("/i/d.qcow2"),
            format: "qcow2",
            bootable: true,
            read_only: false,
            snapshot: true,
        });
        let joined = qemu_args(&spec).join(" ");
        assert!(joined.contains("-bios /fw/OVMF.fd"), "{joined}");
        assert!(
            !joined.contains("-kernel") && !joined.contains("-append"),
            "{joined}"
        );
        assert!(
            joined.contains("file=/i/d.qcow2,if=none,id=rootdisk,format=qcow2,snapshot=on"),
            "{joined}"
        );
        assert!(joined.contains("drive=rootdisk,bootindex=0"), "{joined}");
        // The baked command line is not the harness's to check.
        spec.append = vec!["y".repeat(4000)];
        assert!(check_kernel_cmdline(&spec).is_ok());
    }
}
