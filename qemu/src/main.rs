//! `bootlace-vm`: boot a kernel and initramfs under QEMU and report how the guest ended.
//! The exit code is the guest's reported status (see `Outcome::exit_code`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bootlace_vm::{images, kernel, Accel, Disk, Share, VmSpec, VsockSpec};
use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-vm",
    version,
    about = "Boot bootlace images under QEMU"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a kernel + initramfs; the exit code is the guest's reported EXIT_STATUS
    /// (123 kernel panic or reset, 124 timeout, 125 QEMU failure).
    Run(RunArgs),
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
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Guest CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
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
    #[arg(long = "share", value_parser = parse_share)]
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
    /// Make the host agent misbehave on purpose (repeatable); `--help` lists the kinds.
    #[arg(long = "fault", value_name = "KIND[=ARG]", value_parser = parse_fault,
          long_help = bootlace_agent::fault::FAULT_LONG_HELP)]
    faults: Vec<String>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Extra QEMU arguments, after `--`.
    #[arg(last = true)]
    qemu_args: Vec<String>,
}

fn parse_fault(s: &str) -> Result<String, String> {
    bootlace_agent::host::Faults::default().add(s)?;
    Ok(s.to_owned())
}

fn parse_share(s: &str) -> Result<(String, PathBuf), String> {
    let (tag, dir) = s.split_once('=').ok_or("expected TAG=DIR")?;
    if tag.is_empty() || tag.len() > 31 {
        return Err("the tag must be 1 to 31 characters".to_owned());
    }
    Ok((tag.to_owned(), PathBuf::from(dir)))
}

fn main() -> ExitCode {
    let Cli { command } = Cli::parse();
    match command {
        Cmd::Run(a) => match run(a) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("bootlace-vm: error: {e:#}");
                ExitCode::from(125)
            }
        },
    }
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

/// Starts the host agent on `<uds>_<port>` when `--bootstrap-vsock` or `--host-agent` asks.
fn start_host_services(
    vsock: &VsockSpec,
    bundle_path: Option<&std::path::Path>,
    agent: bool,
    port: u32,
    faults: &[String],
) -> anyhow::Result<HostServices> {
    use bootlace_agent::host::{describe, BundleSource, Faults, Host};
    if bundle_path.is_none() && !agent {
        return Ok(HostServices { _agent: None });
    }
    let bundle = match bundle_path {
        Some(p) => {
            let b = BundleSource::from_path(p)?;
            eprintln!(
                "bootlace-vm: host agent serves {} ({}); pin it with bootlace.digest=sha256:{}",
                p.display(),
                b.summary(),
                b.sha256
            );
            Some(b)
        }
        None => None,
    };
    let faults = Faults::parse_all(faults).map_err(anyhow::Error::msg)?;
    if faults.any() {
        eprintln!("bootlace-vm: the host agent injects faults: {faults:?}");
    }
    let host = std::sync::Arc::new(
        Host::new(bundle, |e| {
            eprintln!("bootlace-vm: host: {}", describe(&e.event));
        })
        .with_faults(faults),
    );
    let path = vsock.port_path(port);
    host.serve_unix(&path)
        .with_context(|| format!("host agent on {}", path.display()))?;
    Ok(HostServices { _agent: Some(host) })
}

fn run(a: RunArgs) -> anyhow::Result<u8> {
    let kernel = match a.kernel {
        Some(k) => k,
        None => kernel::find().context("finding a kernel")?.image,
    };
    let mut spec = VmSpec::new(kernel);
    spec.qemu = a.qemu;
    spec.initrd = a.initrd;
    spec.append = a.append;
    spec.memory_mib = a.memory;
    spec.cpus = a.cpus;
    spec.accel = if a.kvm { Accel::Kvm } else { Accel::Tcg };
    spec.timeout = Duration::from_secs(a.timeout);
    spec.console_log = a.console_log;
    spec.echo = !a.no_echo;
    spec.quiet_kernel = !a.verbose_kernel;
    spec.extra_args = a.qemu_args;
    if let (Some(wanted), Some(dir)) = (&a.image, &a.images) {
        let (name, version) = match wanted.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (wanted.as_str(), None),
        };
        let chosen = images::choose(dir, name, version)?;
        for w in &chosen.warnings {
            eprintln!("bootlace-vm: warning: {w}");
        }
        let m = &chosen.entry.meta;
        let stage1 = match (&a.stage1, m.is_disk()) {
            (Some(p), _) => Some(p.clone()),
            (None, true) => Some(images::stage1(dir)?.path()),
            (None, false) => None,
        };
        bootlace_vm::boot_image(&mut spec, &chosen.entry, stage1.as_deref())?;
        eprintln!(
            "bootlace-vm: booting {} ({}, sha256 {}){}",
            m.id(),
            m.format,
            m.sha256.get(..12).unwrap_or(&m.sha256),
            match &stage1 {
                Some(p) => format!(" through stage 1 {}", p.display()),
                None => String::new(),
            }
        );
    }
    if let Some(path) = a.bootstrap_disk {
        spec.disks.push(Disk {
            path,
            read_only: true,
        });
    }
    spec.disks.extend(a.disks.into_iter().map(|path| Disk {
        path,
        read_only: false,
    }));
    if let Some(dir) = a.bootstrap_9p {
        spec.shares.push(Share {
            dir,
            tag: "bootlace".to_owned(),
            read_only: true,
        });
    }
    spec.shares
        .extend(a.shares.into_iter().map(|(tag, dir)| Share {
            dir,
            tag,
            read_only: false,
        }));
    if !a.faults.is_empty() && a.bootstrap_vsock.is_none() && !a.host_agent {
        anyhow::bail!("--fault needs a host agent: give --host-agent or --bootstrap-vsock");
    }
    // Removed when this function returns, after the VM and the vsock daemon are gone.
    let mut _vsock_tmp = None;
    if a.vsock || a.vsock_dir.is_some() || a.bootstrap_vsock.is_some() || a.host_agent {
        let dir = match &a.vsock_dir {
            Some(dir) => dir.clone(),
            None => {
                let tmp = TempDir::new("bootlace-vm-vsock")?;
                let dir = tmp.0.clone();
                _vsock_tmp = Some(tmp);
                dir
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
    }
    // Held to the end of this function, then dropped before `vsock_tmp` (reverse order).
    let _host_services = match &spec.vsock {
        Some(v) => Some(start_host_services(
            v,
            a.bootstrap_vsock.as_deref(),
            a.host_agent,
            a.host_port,
            &a.faults,
        )?),
        None => None,
    };
    let outcome = bootlace_vm::run(&spec)?;
    for line in outcome.lines_with("bootlace: timeline:") {
        eprintln!(
            "bootlace-vm: guest {}",
            line.split("bootlace: ").nth(1).unwrap_or(line)
        );
    }
    eprintln!("bootlace-vm: {}", outcome.summary());
    Ok(outcome.exit_code())
}
