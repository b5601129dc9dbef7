//! `bootlace-image`: the image builder's command line. Each command parses its flags into the
//! library's typed values, calls the library, and prints the result (text, or one JSON object
//! with `--json`). Exit status: 0 done; 1 refused or failed (nothing is left at the output);
//! 2 a usage error (clap).

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use bootlace_contract::compression::{sniff, Compression};
use bootlace_contract::config::{
    self, parse_command, Command, FailurePolicy, HandoffMode, HostAddress, InitConfig,
    InvalidValue, Label, LogLevel, ModuleName, MountTag, Overrides, Sha256Digest, Source,
    TmpfsSize,
};
use bootlace_contract::fs::FsType;
use bootlace_image::bake::{self, BakeSpec, Format, Report, StagingMode};
use bootlace_image::bundle::{self, BundleFormat, BundleSummary};
use bootlace_image::initramfs::Modules;
use bootlace_image::limits::{self, Limits};
use bootlace_image::ociconfig::ImageConfigUse;
use bootlace_image::progress::{self, Progress, Ticker};
use clap::{Parser, Subcommand, ValueEnum};

/// The exit statuses, shown under every command's `--help`.
const EXIT_STATUS: &str = "\
Exit status:
  0  done
  1  refused or failed (the error says what; nothing is left at the output)
  2  usage error (unknown flag or value)";

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-image",
    version,
    about = "Bake bootlace-init into images",
    after_help = EXIT_STATUS
)]
struct Cli {
    /// Log what the builder chooses (how the input is staged, …) on stderr.
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bake the init, its config and kernel modules into a root filesystem image (initramfs,
    /// erofs, ext4, squashfs, qcow2) from a directory, a tarball or an OCI layout; writes
    /// <out>.meta.json beside it.
    #[command(after_help = EXIT_STATUS)]
    Bake(Box<BakeArgs>),
    /// `bake --format initramfs` (the older spelling, its flags kept: --rootfs for --input,
    /// --keep-owners, which is now the default).
    #[command(after_help = EXIT_STATUS)]
    Initramfs(Box<InitramfsArgs>),
    /// Build a bootstrap bundle from a directory holding bootlace.toml: a labelled disk image,
    /// a directory for a 9p share, or a tarball for vsock. The manifest is validated as the
    /// init will.
    #[command(after_help = EXIT_STATUS)]
    Bundle(BundleArgs),
    /// Make an ed25519 key pair for signing bundles: KEY (the private key, PKCS#8 PEM, mode
    /// 0600) and KEY.pub (the public key, SPKI PEM, for `bake --trust-key`). Never overwrites.
    /// Keys made by `openssl genpkey -algorithm ed25519` (and `openssl pkey -pubout`) work too.
    #[command(after_help = EXIT_STATUS)]
    Keygen {
        /// The private key file to write; the public key goes to KEY.pub.
        #[arg(long, short, value_name = "KEY")]
        out: PathBuf,
    },
    /// Capture a configured guest: boot an ext4 image from --images with a bundle over vsock
    /// (the poweroff hand-off), wait for it to apply the configuration and power off cleanly,
    /// then bake its root into the next version of the image (metadata: parent, bundle).
    /// Runs as root (it loop-mounts its work copy) and runs bootlace-vm.
    #[command(after_help = EXIT_STATUS)]
    Capture(CaptureArgs),
    /// List the entries of an initramfs (newc, plain, gzip or zstd).
    #[command(after_help = EXIT_STATUS)]
    List {
        /// The archive.
        file: PathBuf,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BundleFormatArg {
    DiskExt4,
    DiskErofs,
    Dir,
    Tar,
    #[value(name = "tar.gz")]
    TarGz,
    #[value(name = "tar.zst")]
    TarZst,
}

impl From<BundleFormatArg> for BundleFormat {
    fn from(a: BundleFormatArg) -> BundleFormat {
        match a {
            BundleFormatArg::DiskExt4 => BundleFormat::DiskExt4,
            BundleFormatArg::DiskErofs => BundleFormat::DiskErofs,
            BundleFormatArg::Dir => BundleFormat::Dir,
            BundleFormatArg::Tar => BundleFormat::Tar,
            BundleFormatArg::TarGz => BundleFormat::TarGz,
            BundleFormatArg::TarZst => BundleFormat::TarZst,
        }
    }
}

/// `bootlace-image capture`.
#[derive(clap::Args, Debug)]
struct CaptureArgs {
    /// Directory of baked images: the parent is read from it, the new version written to it.
    #[arg(long)]
    images: PathBuf,
    /// The parent image: NAME (its default version) or NAME@VERSION.
    #[arg(long)]
    image: String,
    /// The configuration bundle: a tarball (bootlace-image bundle --format tar|tar.gz|tar.zst).
    #[arg(long)]
    bundle: PathBuf,
    /// The new version [default: the highest version of the name, its last number plus one:
    /// 1 -> 2, 1.0 -> 1.1, 1.9 -> 1.10]. An existing version is never replaced.
    #[arg(long)]
    version: Option<String>,
    /// The bootlace-vm binary [default: $BOOTLACE_VM, else bootlace-vm beside this binary,
    /// else bootlace-vm on PATH].
    #[arg(long)]
    vm: Option<PathBuf>,
    /// Kernel for the capture boot (bootlace-vm --kernel).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Stage-1 initramfs for the capture boot [default: the newest in --images].
    #[arg(long)]
    stage1: Option<PathBuf>,
    /// Guest memory in MiB for the capture boot (bootlace-vm --memory).
    #[arg(long)]
    memory: Option<u32>,
    /// Use KVM for the capture boot.
    #[arg(long)]
    kvm: bool,
    /// The capture boot's limit in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Free space given to the work copy for the configuration, MiB.
    #[arg(long, default_value_t = 256)]
    grow_mib: u64,
    /// Kernel modules for the bake (the parent's kernel release under it).
    #[arg(long, default_value = "/lib/modules")]
    modules_root: PathBuf,
    /// Keep the capture boot's console in this file.
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// How a command reports: text or JSON on stdout, a progress line on stderr.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ReportArgs {
    /// Print the result as one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// No progress line and no notes on stderr (the progress line is only drawn when stderr
    /// is a terminal).
    #[arg(long, short)]
    quiet: bool,
}

/// The bake limits (see docs/image.md, "Bake limits"); 0 is no limit.
#[derive(clap::Args, Debug, Clone, Copy)]
struct LimitArgs {
    /// Largest JSON document of an OCI layout (oci-layout, index.json, index, manifest, config):
    /// bytes, or with K, M, G, T (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "4M", value_parser = limits::parse_size)]
    max_json_bytes: u64,
    /// Most entries over every input (a tarball's, the layers', a directory's).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_ENTRIES)]
    max_entries: u64,
    /// Most bytes of file contents unpacked over every input: bytes, or with K, M, G, T.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = limits::parse_size)]
    max_bytes: u64,
    /// Highest compression ratio of a gzip or zstd tarball or layer (bytes out per byte in,
    /// checked past 1 MiB out).
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_RATIO)]
    max_ratio: u64,
}

impl From<LimitArgs> for Limits {
    fn from(a: LimitArgs) -> Limits {
        Limits {
            json_bytes: a.max_json_bytes,
            entries: a.max_entries,
            bytes: a.max_bytes,
            ratio: a.max_ratio,
        }
    }
}

/// The limits of a bundle directory; 0 is no limit.
#[derive(clap::Args, Debug, Clone, Copy)]
struct BundleLimitArgs {
    /// Most entries in the bundle directory.
    #[arg(long, value_name = "N", default_value_t = limits::DEFAULT_ENTRIES)]
    max_entries: u64,
    /// Most bytes of files in the bundle directory: bytes, or with K, M, G, T.
    #[arg(long, value_name = "SIZE", default_value = "16G", value_parser = limits::parse_size)]
    max_bytes: u64,
}

#[derive(clap::Args, Debug)]
struct BundleArgs {
    /// The bundle directory (bootlace.toml at its root).
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    format: BundleFormatArg,
    /// Output file (disk formats, tarballs) or directory (dir).
    #[arg(long, short)]
    out: PathBuf,
    /// Filesystem label the init looks for.
    #[arg(long, default_value = "BOOTLACE")]
    label: String,
    /// Sign the tarball with this ed25519 private key (PKCS#8 PEM, from `keygen`): writes
    /// <out>.sig, one line `ed25519:<base64>`, a signature of the tarball's sha256, which
    /// `bootlace-agent` and `bootlace-vm --bootstrap-vsock` send with the bundle. Tarball
    /// formats only. Without it, a stale <out>.sig is removed.
    #[arg(long, value_name = "KEY")]
    sign: Option<PathBuf>,
    #[command(flatten)]
    limits: BundleLimitArgs,
    #[command(flatten)]
    report: ReportArgs,
}

/// The config flags shared by `bake` and `initramfs`: each is parsed into its typed value by
/// the contract's own parser, so a bad value is refused here with the same message the init
/// would give.
#[derive(clap::Args, Debug)]
struct ConfigArgs {
    /// Base init.toml to bake (validated); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hand-off mode: exec (replace PID 1) or supervise (run as child, stay PID 1).
    #[arg(long, value_name = "exec|supervise")]
    handoff: Option<HandoffMode>,
    /// Hand-off command, shell-style words: "/sbin/init" or "/bin/app --flag". With an OCI
    /// layout it replaces the image's Entrypoint and Cmd (as docker run --entrypoint does).
    #[arg(long, value_parser = parse_command)]
    exec: Option<Command>,
    /// With an OCI layout: arguments in place of the image's Cmd, its Entrypoint kept (as the
    /// arguments of docker run IMAGE ARGS), shell-style words.
    #[arg(long, value_name = "WORDS", value_parser = parse_words, conflicts_with = "exec")]
    cmd: Option<Words>,
    /// With an OCI layout: take nothing from the image's config (Entrypoint, Cmd, Env,
    /// WorkingDir, User); the hand-off is what the flags and --config say, as for a directory.
    #[arg(long, conflicts_with = "cmd")]
    ignore_image_config: bool,
    /// Failure policy: poweroff, continue or shell.
    #[arg(long, value_name = "poweroff|continue|shell")]
    on_failure: Option<FailurePolicy>,
    /// Console log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL")]
    log: Option<LogLevel>,
    /// Bootstrap sources, looked at together (the first to appear wins; the order breaks ties):
    /// disk, 9p, vsock (comma-separated; vsock needs --host, and trusts a bundle by --digest,
    /// --trust-key, --trust-host or a digest given at boot).
    #[arg(long, value_delimiter = ',', value_name = "disk|9p|vsock")]
    source: Option<Vec<Source>>,
    /// Boot on when no bootstrap is found (default: a missing bootstrap is a failure).
    #[arg(long)]
    bootstrap_optional: bool,
    /// Filesystem label of the bootstrap disk (default BOOTLACE).
    #[arg(long)]
    label: Option<Label>,
    /// Mount tag of the bootstrap 9p share (default bootlace).
    #[arg(long)]
    tag: Option<MountTag>,
    /// Host configuration manager to report to: vsock:2:PORT.
    #[arg(long)]
    host: Option<HostAddress>,
    /// Pinned digest of the vsock bundle: sha256:HEX (as `bootlace-image bundle` prints).
    /// When given it alone decides which bundle the guest takes.
    #[arg(long)]
    digest: Option<Sha256Digest>,
    /// Trust vsock bundles signed by this ed25519 public key (repeatable, for a key
    /// rotation): a file (SPKI PEM, e.g. KEY.pub from `keygen`, or one line ed25519:<base64>)
    /// or the ed25519:<base64> value itself. Baked as [host] trust_keys.
    #[arg(long = "trust-key", value_name = "PUB")]
    trust_keys: Vec<String>,
    /// Take a vsock bundle as the host serves it when nothing else decides (no pinned or
    /// out-of-band digest, no trusted keys): trusts the host agent and the vsock path with
    /// the guest. Baked as [host] trust_host = true.
    #[arg(long)]
    trust_host: bool,
    /// Kernel module to load at boot (with its dependencies); repeatable.
    #[arg(long = "module")]
    modules: Vec<ModuleName>,
    /// Kernel module to copy in without loading it at boot; repeatable.
    #[arg(long = "extra-module")]
    extra_modules: Vec<ModuleName>,
    /// Kernel release whose modules to copy (default: the only one under --modules-root).
    #[arg(long)]
    kernel_release: Option<String>,
    /// Directory of module trees.
    #[arg(long, default_value = "/lib/modules")]
    modules_root: PathBuf,
}

impl ConfigArgs {
    /// The flags as typed overrides of the config.
    fn overrides(&self) -> Overrides {
        Overrides {
            log: self.log,
            on_failure: self.on_failure,
            handoff: self.handoff,
            exec: self.exec.clone(),
            modules: self.modules.clone(),
            sources: self.source.clone(),
            required: self.bootstrap_optional.then_some(false),
            label: self.label.clone(),
            tag: self.tag.clone(),
            host: self.host,
            digest: self.digest.clone(),
            root: None,
        }
    }
}

#[derive(clap::Args, Debug)]
struct BakeArgs {
    /// Output format: initramfs, erofs, ext4, squashfs, qcow2, or disk (a bootable GPT disk
    /// that UEFI firmware boots with no -kernel: see the disk flags).
    #[arg(long)]
    format: Format,
    /// Output file (written atomically; <out>.meta.json goes beside it).
    #[arg(long, short)]
    out: PathBuf,
    /// The root filesystem: a directory, a tarball (tar, tar.gz, tar.zst: detected by its
    /// first bytes) or an OCI image layout (a directory with an oci-layout file). Optional for
    /// an initramfs (the init alone boots); none with --stage1.
    #[arg(long)]
    input: Option<PathBuf>,
    /// The manifest to use in an OCI layout with several (org.opencontainers.image.ref.name).
    #[arg(long)]
    oci_ref: Option<String>,
    /// The bootlace-init binary to install.
    #[arg(long)]
    init: PathBuf,
    /// Where the init goes in the image (an initramfs also gets /init pointing at it).
    #[arg(long, default_value = "/sbin/bootlace-init")]
    init_path: String,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Writable locations backed by tmpfs at boot, comma-separated, or "none" (default:
    /// /etc,/var,/tmp,/home for erofs, squashfs and qcow2 of erofs; none otherwise).
    #[arg(long)]
    writable: Option<String>,
    /// Size of each writable location's tmpfs (the upper layer of its overlay): bytes with a
    /// k, m or g suffix, or a percentage of the guest's memory (default 25%). Per location:
    /// `writable_sizes` in --config.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    writable_size: Option<TmpfsSize>,
    /// Filesystem label of erofs/ext4 root images and of the filesystem in a qcow2 (erofs: at
    /// most 15 bytes, ext4: 16; default bootlace-root). Refused for initramfs and squashfs.
    #[arg(long)]
    root_label: Option<String>,
    /// A stage-1 initramfs: the init loads the block and filesystem modules, mounts the real
    /// root and switches to it (no --input).
    #[arg(long)]
    stage1: bool,
    /// The real root for --stage1: LABEL=<label>, PARTUUID=<guid>, PARTLABEL=<name> or
    /// /dev/<device> (root= or bootlace.root= on the kernel command line may give it instead).
    #[arg(long)]
    root: Option<String>,
    /// Initramfs compression: gzip (default), zstd or none. Refused for other formats.
    #[arg(long, value_name = "gzip|zstd|none")]
    compress: Option<Compression>,
    /// The filesystem inside a qcow2 image: erofs (default) or ext4. Refused for other formats.
    #[arg(long, value_name = "erofs|ext4")]
    qcow2_fs: Option<FsType>,
    /// How a directory input is staged for the disk formats: auto (a read-only overlay of the
    /// additions over the input when root can mount one, else a mirror) or mirror.
    #[arg(long, default_value = "auto", value_name = "auto|mirror")]
    staging: StagingMode,
    /// Image name for the metadata (default: the output file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Image version for the metadata.
    #[arg(long = "version", default_value = "0")]
    image_version: String,
    /// Layer cache directory (default: $XDG_CACHE_HOME/bootlace/layers or
    /// ~/.cache/bootlace/layers).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Do not use the layer cache: unpack OCI layers straight into the staging tree.
    #[arg(long, conflicts_with = "cache")]
    no_cache: bool,
    /// Make every file root-owned (default: keep the input's owners).
    #[arg(long)]
    all_root: bool,
    #[command(flatten)]
    disk: DiskArgs,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    report: ReportArgs,
}

/// The flags of `--format disk` (docs/image.md, "Bootable disks").
#[derive(clap::Args, Debug)]
struct DiskArgs {
    /// The root partition's filesystem: erofs (read-only, default) or ext4.
    #[arg(long, value_name = "erofs|ext4")]
    disk_fs: Option<FsType>,
    /// The disk's file format: raw (default), qcow2, vmdk (stream-optimised) or vhd (fixed).
    #[arg(long, value_name = "raw|qcow2|vmdk|vhd")]
    disk_format: Option<bootlace_contract::image::Container>,
    /// The kernel baked into the unified kernel image (default: /boot/vmlinuz-<release> of
    /// the modules' kernel release; it must be that release).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// systemd's EFI stub (default: /usr/lib/systemd/boot/efi/linuxx64.efi.stub, from
    /// systemd-boot-efi).
    #[arg(long)]
    efi_stub: Option<PathBuf>,
    /// A kernel parameter baked after bootlace's own (repeatable), e.g. --kernel-arg
    /// bootlace.log=debug. The command line is part of the disk: per-guest configuration comes
    /// from the host over vsock, SMBIOS/fw_cfg or a bundle disk instead.
    #[arg(long = "kernel-arg", value_name = "ARG")]
    kernel_args: Vec<String>,
    /// Size of the EFI system partition (bytes, or with a K, M or G suffix; default 64M, or
    /// more when the kernel image needs it).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    esp_size: Option<u64>,
    /// Add a blank data partition of this size (GPT name "data", Linux data type).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    data_size: Option<u64>,
}

impl DiskArgs {
    fn options(&self) -> bootlace_image::disk::DiskOptions {
        let d = bootlace_image::disk::DiskOptions::default();
        bootlace_image::disk::DiskOptions {
            fs: self.disk_fs.unwrap_or(d.fs),
            container: self.disk_format.unwrap_or(d.container),
            kernel: self.kernel.clone(),
            stub: self.efi_stub.clone(),
            kernel_args: self.kernel_args.clone(),
            esp_size: self.esp_size,
            data_size: self.data_size,
        }
    }
}

/// A size in bytes: digits with an optional K, M or G suffix (powers of 1024).
fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        _ => {
            return Err(format!(
                "{s:?}: a size is digits with an optional K, M or G suffix"
            ))
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?}: not a size above 0 that fits 64 bits"))
}

#[derive(clap::Args, Debug)]
struct InitramfsArgs {
    /// Output file (written atomically; <out>.meta.json goes beside it).
    #[arg(long, short)]
    out: PathBuf,
    /// Root filesystem to include: a directory, a tarball or an OCI layout (optional: the init
    /// alone boots).
    #[arg(long, visible_alias = "rootfs")]
    input: Option<PathBuf>,
    /// The bootlace-init binary to install as /sbin/bootlace-init (and /init).
    #[arg(long)]
    init: PathBuf,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Archive compression: gzip (default), zstd or none.
    #[arg(long, value_name = "gzip|zstd|none")]
    compress: Option<Compression>,
    /// Keep the input's owners: the default now (accepted for older scripts).
    #[arg(long, conflicts_with = "all_root")]
    keep_owners: bool,
    /// Make every file root-owned.
    #[arg(long)]
    all_root: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    report: ReportArgs,
}

/// Writes warnings (and with `--verbose`, what the builder chose) on stderr.
#[derive(Debug)]
struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level() && m.target().starts_with("bootlace")
    }

    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let level = match r.level() {
                log::Level::Error => "error: ",
                log::Level::Warn => "warning: ",
                _ => "",
            };
            progress::note(&format!("bootlace-image: {level}{}", r.args()));
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(if cli.verbose {
            log::LevelFilter::Info
        } else {
            log::LevelFilter::Warn
        });
    }
    // First, before any thread: the overlays a bake mounts stay in a namespace of its own and
    // cannot outlive the process, whatever ends it.
    bootlace_image::overlay::private_mount_namespace();
    // With panic = "abort" no destructor runs: unmount a bake's overlay here.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        bootlace_image::overlay::unmount_all();
        default_hook(info);
    }));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            progress::note(&format!("bootlace-image: error: {e:#}"));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Bake(a) => {
            let report = a.report;
            run_bake(&bake_spec(*a)?, report)
        }
        Cmd::Initramfs(a) => {
            let report = a.report;
            run_bake(&initramfs_spec(*a)?, report)
        }
        Cmd::Capture(a) => capture_cmd(a),
        Cmd::List { file } => list(&file),
        Cmd::Keygen { out } => keygen(&out),
        Cmd::Bundle(a) => bundle_cmd(a),
    }
}

/// `--cmd`: argv words.
#[derive(Debug, Clone)]
struct Words(Vec<String>);

fn parse_words(value: &str) -> Result<Words, InvalidValue> {
    bootlace_contract::cmdline::split_command(value)
        .map(Words)
        .map_err(|e| InvalidValue::new("--cmd", value, e.to_string()))
}

/// How an OCI image's config is used: the flags, and whether `--config` sets the hand-off's
/// `command` or `mode` itself (then the image's do not replace them).
fn image_config_use(a: &ConfigArgs) -> anyhow::Result<ImageConfigUse> {
    let (mut mode_given, mut command_given) = (a.handoff.is_some(), a.exec.is_some());
    if let Some(path) = &a.config {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let handoff = table.get("handoff").and_then(toml::Value::as_table);
        let has = |key: &str| handoff.is_some_and(|h| h.contains_key(key));
        mode_given |= has("mode");
        command_given |= has("command");
    }
    Ok(ImageConfigUse {
        apply: !a.ignore_image_config,
        command_given,
        mode_given,
        cmd: a.cmd.clone().map(|w| w.0),
    })
}

/// The base config (a file or the defaults) with the flags applied.
fn build_config(a: &ConfigArgs) -> anyhow::Result<InitConfig> {
    let mut cfg = match &a.config {
        Some(path) => InitConfig::read(path)?
            .ok_or_else(|| anyhow!("config file {} does not exist", path.display()))?,
        None => InitConfig::default(),
    };
    cfg.apply(&a.overrides());
    for arg in &a.trust_keys {
        let key = bootlace_image::keys::read_public_key(arg).context("--trust-key")?;
        if !cfg.host.trust_keys.contains(&key) {
            cfg.host.trust_keys.push(key);
        }
    }
    if a.trust_host {
        cfg.host.trust_host = true;
    }
    Ok(cfg)
}

/// The bootlace-vm binary: `--vm`, `$BOOTLACE_VM`, beside this binary, or on PATH.
fn vm_binary(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("BOOTLACE_VM").map(PathBuf::from))
        .or_else(|| {
            let beside = std::env::current_exe().ok()?.with_file_name("bootlace-vm");
            beside.is_file().then_some(beside)
        })
        .unwrap_or_else(|| PathBuf::from("bootlace-vm"))
}

fn capture_cmd(a: CaptureArgs) -> anyhow::Result<()> {
    let mut vm_args = Vec::new();
    for (flag, value) in [
        ("--kernel", a.kernel.map(PathBuf::into_os_string)),
        ("--memory", a.memory.map(|m| m.to_string().into())),
    ] {
        if let Some(v) = value {
            vm_args.push(flag.to_owned());
            vm_args.push(v.to_string_lossy().into_owned());
        }
    }
    if a.kvm {
        vm_args.push("--kvm".to_owned());
    }
    let mtime = match std::env::var_os("SOURCE_DATE_EPOCH") {
        Some(_) => Some(bake::source_date_epoch()?),
        None => None,
    };
    let spec = bootlace_image::capture::CaptureSpec {
        images: a.images,
        image: a.image,
        bundle: a.bundle,
        version: a.version,
        vm: vm_binary(a.vm),
        vm_args,
        stage1: a.stage1,
        timeout_s: a.timeout,
        modules_root: a.modules_root,
        grow_mib: a.grow_mib,
        mtime,
        console_log: a.console_log,
    };
    let c = bootlace_image::capture::capture(&spec)?;
    if a.json {
        let v = serde_json::json!({
            "image": c.meta.image_path(&c.meta_path),
            "meta_path": c.meta_path,
            "meta": c.meta,
            "excluded": c.excluded,
            "boot_s": c.boot.as_secs_f64(),
            "total_s": c.total.as_secs_f64(),
        });
        println!("{v}");
    } else {
        let p = c.meta.parent.as_ref();
        println!(
            "captured {} from {} with bundle {} in {:.1} s (boot {:.1} s)",
            c.meta.id(),
            p.map_or_else(String::new, |p| format!("{}@{}", p.name, p.version)),
            c.meta.bundle.as_ref().map_or("", |b| b.sha256.as_str()),
            c.total.as_secs_f64(),
            c.boot.as_secs_f64()
        );
        println!("image: {}", c.meta.image_path(&c.meta_path).display());
        println!("sha256: {}", c.meta.sha256);
        for e in &c.excluded {
            println!("excluded: {e}");
        }
    }
    Ok(())
}

fn keygen(out: &Path) -> anyhow::Result<()> {
    let key = bootlace_image::keys::keygen(out)?;
    println!(
        "wrote {} (private, 0600) and {}",
        out.display(),
        bootlace_image::keys::public_path(out).display()
    );
    println!("{key}");
    Ok(())
}

fn kernel_release(a: &ConfigArgs) -> anyhow::Result<String> {
    if let Some(r) = &a.kernel_release {
        return Ok(r.clone());
    }
    let mut releases: Vec<String> = std::fs::read_dir(&a.modules_root)
        .with_context(|| format!("list {}", a.modules_root.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    releases.sort();
    match releases.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(anyhow!(
            "no kernel release under {}",
            a.modules_root.display()
        )),
        many => Err(anyhow!(
            "several kernel releases under {} ({}): name one with --kernel-release",
            a.modules_root.display(),
            many.join(", ")
        )),
    }
}

/// The module source for a config, when it needs modules (or `force`).
fn modules_for(
    a: &ConfigArgs,
    config: &InitConfig,
    force: bool,
    writable: bool,
) -> anyhow::Result<Option<Modules>> {
    let wants_modules = force
        || !config.modules.is_empty()
        || !a.extra_modules.is_empty()
        || !config.bootstrap.sources.is_empty()
        || config.host.address.is_some();
    if !wants_modules {
        // A read-only root's writable locations are overlays when the image has overlayfs:
        // copy its module when the kernel release is known, else the init copies them.
        return Ok(writable
            .then(|| kernel_release(a).ok())
            .flatten()
            .map(|release| Modules {
                root: a.modules_root.clone(),
                release,
                extra: Vec::new(),
            }));
    }
    Ok(Some(Modules {
        root: a.modules_root.clone(),
        release: kernel_release(a)?,
        extra: a.extra_modules.clone(),
    }))
}

/// `--writable`: comma-separated, or `none`.
fn writable(w: &str) -> Vec<String> {
    if w == "none" {
        return Vec::new();
    }
    w.split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The layer cache: `--cache`, the default directory, or none with `--no-cache`.
fn layer_cache(cache: Option<PathBuf>, no_cache: bool) -> Option<PathBuf> {
    if no_cache {
        None
    } else {
        cache.or_else(bootlace_image::oci::LayerCache::default_dir)
    }
}

fn bake_spec(a: BakeArgs) -> anyhow::Result<BakeSpec> {
    let config = build_config(&a.cfg)?;
    let mut spec = BakeSpec::new(a.format, a.out, a.input, a.init);
    spec.config = config;
    spec.config.root.writable_size = a.writable_size;
    spec.oci_ref = a.oci_ref;
    spec.init_path = a.init_path;
    spec.writable = a.writable.as_deref().map(writable);
    spec.stage1 = a.stage1;
    spec.stage1_root = a.root;
    spec.all_root = a.all_root;
    spec.label = a.root_label;
    spec.compress = a.compress;
    spec.qcow2_fs = a.qcow2_fs;
    spec.staging = a.staging;
    spec.name = a.name;
    spec.version = a.image_version;
    spec.cache = layer_cache(a.cache, a.no_cache);
    spec.limits = a.limits.into();
    spec.mtime = bake::source_date_epoch()?;
    spec.image_config = image_config_use(&a.cfg)?;
    spec.disk = a.disk.options();
    let writable = !spec
        .writable
        .clone()
        .unwrap_or_else(|| bake::default_writable(&spec))
        .is_empty();
    // A bootable disk carries a kernel: its stage 1 and root need that release's modules.
    let force = a.stage1 || a.format == Format::Disk;
    spec.modules = modules_for(&a.cfg, &spec.config, force, writable)?;
    Ok(spec)
}

/// `--writable-size`.
fn parse_size(s: &str) -> Result<TmpfsSize, InvalidValue> {
    TmpfsSize::try_from(s.to_owned())
}

/// `initramfs`: `bake --format initramfs` with bake's defaults.
fn initramfs_spec(a: InitramfsArgs) -> anyhow::Result<BakeSpec> {
    let config = build_config(&a.cfg)?;
    let mut spec = BakeSpec::new(Format::Initramfs, a.out, a.input, a.init);
    spec.modules = modules_for(&a.cfg, &config, false, false)?;
    spec.config = config;
    spec.all_root = a.all_root;
    spec.compress = a.compress;
    spec.cache = layer_cache(None, false);
    spec.limits = a.limits.into();
    spec.mtime = bake::source_date_epoch()?;
    spec.image_config = image_config_use(&a.cfg)?;
    Ok(spec)
}

/// Starts the progress line when stderr is a terminal and `--quiet` is not given.
fn ticker(progress: &Arc<Progress>, r: ReportArgs) -> Option<Ticker> {
    (!r.quiet && std::io::stderr().is_terminal())
        .then(|| Ticker::start(Arc::clone(progress), "bootlace-image: "))
}

fn run_bake(spec: &BakeSpec, r: ReportArgs) -> anyhow::Result<()> {
    let progress = Arc::new(Progress::new());
    let ticker = ticker(&progress, r);
    let report = bake::bake_with(spec, &progress, &mut |line| {
        if !r.quiet {
            progress::note(&format!("bootlace-image: {line}"));
        }
    });
    drop(ticker);
    let report = report?;
    if r.json {
        println!("{}", bake_json(&spec.out, &report));
    } else {
        print_bake(&spec.out, &report);
    }
    Ok(())
}

/// The bake's result as one JSON object: the metadata, where it went, how it was staged, the
/// times and what staging placed.
fn bake_json(out: &Path, r: &Report) -> serde_json::Value {
    let layers: Vec<serde_json::Value> = r
        .layers
        .iter()
        .map(|(digest, cached)| serde_json::json!({"digest": digest, "cached": cached}))
        .collect();
    let s = r.input_stats;
    serde_json::json!({
        "image": out,
        "meta_path": r.meta_path,
        "meta": r.meta,
        "staging": r.staging,
        "layers": layers,
        "times": {
            "staging_s": r.staging_time.as_secs_f64(),
            "image_s": r.image_time.as_secs_f64(),
            "finish_s": r.finish_time.as_secs_f64(),
        },
        "stats": {
            "entries": s.entries,
            "linked": s.linked,
            "copied": s.copied,
            "bytes": s.bytes,
            "whiteouts": s.whiteouts,
        },
    })
}

fn print_bake(out: &Path, report: &Report) {
    let m = &report.meta;
    let fs = m.fstype.filter(|f| f.as_str() != m.format.as_str());
    println!(
        "wrote {} ({}{}{}, {} bytes) sha256:{}",
        out.display(),
        m.format,
        fs.map(|f| format!(" of {f}")).unwrap_or_default(),
        m.label
            .as_deref()
            .map(|l| format!(", label {l}"))
            .unwrap_or_default(),
        m.size,
        m.sha256
    );
    for i in &m.inputs {
        println!("  input: {:?} {} {}", i.kind, i.path, i.digest);
    }
    let s = report.input_stats;
    println!("  staging: {}", report.staging.as_str());
    if s.entries > 0 {
        println!(
            "  staged: {} entries ({} files hard-linked, {} written, {} bytes, {} whiteouts)",
            s.entries, s.linked, s.copied, s.bytes, s.whiteouts
        );
    }
    print_contents(m);
    println!(
        "  metadata: {} (name {}, version {}); staging {:.2} s, image {:.2} s, hash+sync {:.2} s",
        report.meta_path.display(),
        m.name,
        m.version,
        report.staging_time.as_secs_f64(),
        report.image_time.as_secs_f64(),
        report.finish_time.as_secs_f64()
    );
}

/// The init, the root's kind and the modules, as the bake summary prints them.
fn print_contents(m: &bootlace_contract::image::ImageMeta) {
    let none_or = |v: &[String]| {
        if v.is_empty() {
            "none".to_owned()
        } else {
            v.join(" ")
        }
    };
    println!(
        "  init: {} (version {}, sha256 {}), config {}",
        m.init.path,
        m.init.version,
        m.init.sha256,
        config::CONFIG_PATH
    );
    let root = if m.stage1 {
        "stage 1: mounts the real root and switches to it"
    } else if m.read_only {
        "read-only root"
    } else {
        "read-write root"
    };
    println!("  {root}; writable: {}", none_or(&m.writable));
    println!(
        "  modules: {}{}",
        m.kernel_release
            .as_deref()
            .map(|r| format!("{r}: "))
            .unwrap_or_default(),
        none_or(&m.modules)
    );
    let unpacked = m
        .unpacked_size
        .map(|u| {
            format!(
                "unpacks to {} MiB in the guest's memory; ",
                u.div_ceil(1 << 20)
            )
        })
        .unwrap_or_default();
    if let Some(min) = m.min_memory_mib {
        println!("  memory: {unpacked}boots in {min} MiB or more (bootlace-vm --memory)");
    }
}

fn bundle_cmd(a: BundleArgs) -> anyhow::Result<()> {
    let format = BundleFormat::from(a.format);
    // The key is read before anything is made: a bad key leaves nothing behind.
    let key = match &a.sign {
        Some(_) if !format.is_tarball() => {
            return Err(anyhow!(
                "--sign applies to the vsock tarballs (tar, tar.gz, tar.zst), not {}",
                format.as_str()
            ))
        }
        Some(path) => Some(bootlace_image::keys::read_signing_key(path).context("--sign")?),
        None => None,
    };
    let mtime = bake::source_date_epoch()?;
    let progress = Arc::new(Progress::new());
    let ticker = ticker(&progress, a.report);
    let limits = Limits {
        entries: a.limits.max_entries,
        bytes: a.limits.max_bytes,
        ..Limits::default()
    };
    let s = bundle::build_with(&a.dir, format, &a.label, mtime, &a.out, &limits, &progress);
    drop(ticker);
    let s = s?;
    let signature = sign_or_clear(&a.out, format, key.as_ref(), &s)?;
    if a.report.json {
        let mut j = bundle_json(&a.out, format, &a.label, &s);
        j["signature"] = serde_json::json!(signature.as_ref().map(|(p, sig, key)| {
            serde_json::json!({"path": p, "signature": sig.to_string(), "key": key.to_string()})
        }));
        println!("{j}");
        return Ok(());
    }
    println!(
        "wrote {} ({}, label {}): manifest valid, {} files, {} commands, {} bytes",
        a.out.display(),
        format.as_str(),
        a.label,
        s.files,
        s.commands,
        s.bytes
    );
    if let Some(d) = &s.sha256 {
        println!("sha256:{d}");
    }
    if let Some((path, _, key)) = &signature {
        println!("signed by {key}: {}", path.display());
    }
    Ok(())
}

/// A signed tarball's sidecar, written after the tarball (which is removed again if the
/// sidecar cannot be written); without a key, a stale sidecar of an earlier build is removed.
fn sign_or_clear(
    out: &Path,
    format: BundleFormat,
    key: Option<&bootlace_contract::signature::SigningKey>,
    s: &BundleSummary,
) -> anyhow::Result<
    Option<(
        PathBuf,
        bootlace_contract::signature::Signature,
        bootlace_contract::signature::PublicKey,
    )>,
> {
    let sidecar = bootlace_image::keys::signature_path(out);
    let (Some(key), Some(hex)) = (key, &s.sha256) else {
        if format.is_tarball() && sidecar.exists() {
            std::fs::remove_file(&sidecar)
                .with_context(|| format!("remove the stale {}", sidecar.display()))?;
            progress::note(&format!(
                "bootlace-image: removed {}: it signed an earlier build",
                sidecar.display()
            ));
        }
        return Ok(None);
    };
    let digest: Sha256Digest = format!("sha256:{hex}").parse()?;
    match bootlace_image::keys::write_signature(out, key, &digest) {
        Ok((path, sig)) => Ok(Some((path, sig, key.public()))),
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e.into())
        }
    }
}

/// The bundle's result as one JSON object.
fn bundle_json(
    out: &Path,
    format: BundleFormat,
    label: &str,
    s: &BundleSummary,
) -> serde_json::Value {
    serde_json::json!({
        "path": out,
        "format": format.as_str(),
        "label": label,
        "files": s.files,
        "commands": s.commands,
        "bytes": s.bytes,
        "sha256": s.sha256.as_ref().map(|d| format!("sha256:{d}")),
    })
}

fn list(file: &Path) -> anyhow::Result<()> {
    let raw = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let bytes = match sniff(&raw) {
        Compression::Gzip => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&raw[..]), &mut out)
                .with_context(|| format!("gunzip {}", file.display()))?;
            out
        }
        Compression::Zstd => zstd::stream::decode_all(&raw[..])
            .with_context(|| format!("unzstd {}", file.display()))?,
        Compression::None => raw,
    };
    for e in bootlace_image::cpio::read_all(&bytes)
        .with_context(|| format!("read {}", file.display()))?
    {
        let h = &e.header;
        let extra = match &h.kind {
            bootlace_image::cpio::Kind::Symlink { target } => format!(" -> {target}"),
            bootlace_image::cpio::Kind::File { size } => format!(" ({size} bytes)"),
            _ => String::new(),
        };
        println!("{:04o} {}:{} /{}{}", h.perm, h.uid, h.gid, h.name, extra);
    }
    Ok(())
}
