//! `bootlace-image`: the image builder's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use bootlace_contract::config::{
    self, parse_command, Command, ExecString, FailurePolicy, HandoffMode, HostAddress, InitConfig,
    LogLevel, ModuleName, Overrides, Sha256Digest, Source,
};
use bootlace_image::initramfs::{self, Compression, Modules, Spec};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-image",
    version,
    about = "Bake bootlace-init into images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Bake the init, its config and kernel modules into a root filesystem image (initramfs,
    /// erofs, ext4, squashfs, qcow2) from a directory, a tarball or an OCI layout; writes
    /// <out>.meta.json beside it.
    Bake(Box<BakeArgs>),
    /// Build an initramfs (newc cpio) from a rootfs directory, the init and kernel modules.
    Initramfs(Box<InitramfsArgs>),
    /// Build a bootstrap bundle from a directory holding bootlace.toml: a labelled disk image
    /// or a directory for a 9p share. The manifest is validated as the init will.
    Bundle(BundleArgs),
    /// List the entries of an initramfs (newc, plain, gzip or zstd).
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

#[derive(clap::Args, Debug)]
struct BundleArgs {
    /// The bundle directory (bootlace.toml at its root).
    dir: PathBuf,
    /// Output format.
    #[arg(long, value_enum)]
    format: BundleFormatArg,
    /// Output file (disk formats) or directory (dir).
    #[arg(long, short)]
    out: PathBuf,
    /// Filesystem label the init looks for.
    #[arg(long, default_value = "BOOTLACE")]
    label: String,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum Compress {
    None,
    Gzip,
}

/// The config flags shared by `initramfs` and `bake`: each is parsed into its typed value by
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
    /// Hand-off command, shell-style words: "/sbin/init" or "/bin/app --flag".
    #[arg(long, value_parser = parse_command)]
    exec: Option<Command>,
    /// Failure policy: poweroff, continue or shell.
    #[arg(long, value_name = "poweroff|continue|shell")]
    on_failure: Option<FailurePolicy>,
    /// Console log level: error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL")]
    log: Option<LogLevel>,
    /// Bootstrap sources to try in order: disk, 9p, vsock (comma-separated; vsock needs --host
    /// and --digest).
    #[arg(long, value_delimiter = ',', value_name = "disk|9p|vsock")]
    source: Option<Vec<Source>>,
    /// Boot on when no bootstrap is found (default: a missing bootstrap is a failure).
    #[arg(long)]
    bootstrap_optional: bool,
    /// Filesystem label of the bootstrap disk (default BOOTLACE).
    #[arg(long)]
    label: Option<ExecString>,
    /// Mount tag of the bootstrap 9p share (default bootlace).
    #[arg(long)]
    tag: Option<ExecString>,
    /// Host configuration manager to report to: vsock:2:PORT.
    #[arg(long)]
    host: Option<HostAddress>,
    /// Pinned digest of the vsock bundle: sha256:HEX (as `bootlace-image bundle` prints).
    #[arg(long)]
    digest: Option<Sha256Digest>,
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
    /// Output format: initramfs, erofs, ext4, squashfs or qcow2.
    #[arg(long)]
    format: String,
    /// Output file (written atomically; <out>.meta.json goes beside it).
    #[arg(long, short)]
    out: PathBuf,
    /// The root filesystem: a directory, a tarball (tar, tar.gz, tar.zst: detected by its
    /// first bytes) or an OCI image layout (a directory with an oci-layout file).
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
    /// Filesystem label of erofs/ext4 root images (erofs: at most 15 bytes, ext4: 16).
    #[arg(long, default_value = "bootlace-root")]
    root_label: String,
    /// A stage-1 initramfs: the init loads the block and filesystem modules, mounts the real
    /// root and switches to it (no --input).
    #[arg(long)]
    stage1: bool,
    /// The real root for --stage1: LABEL=<label> or /dev/<device> (root= or bootlace.root= on
    /// the kernel command line may give it instead).
    #[arg(long)]
    root: Option<String>,
    /// Initramfs compression.
    #[arg(long, value_parser = ["gzip", "zstd", "none"], default_value = "gzip")]
    compress: String,
    /// The filesystem inside a qcow2 image.
    #[arg(long, value_parser = ["erofs", "ext4"], default_value = "erofs")]
    qcow2_fs: String,
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
}

#[derive(clap::Args, Debug)]
struct InitramfsArgs {
    /// Output file (written atomically).
    #[arg(long, short)]
    out: PathBuf,
    /// Root filesystem directory to include.
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// The bootlace-init binary to install as /sbin/bootlace-init (and /init).
    #[arg(long)]
    init: PathBuf,
    #[command(flatten)]
    cfg: ConfigArgs,
    /// Archive compression.
    #[arg(long, value_enum, default_value_t = Compress::Gzip)]
    compress: Compress,
    /// Keep the rootfs owners (default: everything owned by root).
    #[arg(long)]
    keep_owners: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bootlace-image: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Bake(a) => bake_cmd(*a),
        Cmd::Initramfs(a) => initramfs_cmd(*a),
        Cmd::List { file } => list(&file),
        Cmd::Bundle(a) => bundle_cmd(a),
    }
}

/// The base config (a file or the defaults) with the flags applied.
fn build_config(a: &ConfigArgs) -> anyhow::Result<InitConfig> {
    let mut cfg = match &a.config {
        Some(path) => InitConfig::read(path)?
            .ok_or_else(|| anyhow!("config file {} does not exist", path.display()))?,
        None => InitConfig::default(),
    };
    cfg.apply(&a.overrides());
    Ok(cfg)
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
) -> anyhow::Result<Option<Modules>> {
    let wants_modules = force
        || !config.modules.is_empty()
        || !a.extra_modules.is_empty()
        || !config.bootstrap.sources.is_empty()
        || config.host.address.is_some();
    if !wants_modules {
        return Ok(None);
    }
    Ok(Some(Modules {
        root: a.modules_root.clone(),
        release: kernel_release(a)?,
        extra: a.extra_modules.clone(),
    }))
}

fn initramfs_cmd(a: InitramfsArgs) -> anyhow::Result<()> {
    let config = build_config(&a.cfg)?;
    let modules = modules_for(&a.cfg, &config, false)?;
    let spec = Spec {
        rootfs: a.rootfs.clone(),
        init: a.init.clone(),
        config,
        modules,
        keep_owners: a.keep_owners,
        mtime: initramfs::source_date_epoch().map_err(|e| anyhow!(e))?,
        compression: match a.compress {
            Compress::None => Compression::None,
            Compress::Gzip => Compression::Gzip,
        },
    };
    let summary = initramfs::build(&spec, &a.out)?;
    println!(
        "wrote {}: {} entries, {} bytes ({}), init {}, modules: {}",
        a.out.display(),
        summary.entries,
        summary.bytes,
        match spec.compression {
            Compression::None => "newc",
            Compression::Gzip => "newc+gzip",
        },
        config::CONFIG_PATH,
        if summary.modules.is_empty() {
            "none".to_owned()
        } else {
            summary.modules.join(" ")
        }
    );
    Ok(())
}

fn bake_cmd(a: BakeArgs) -> anyhow::Result<()> {
    use bootlace_image::bake::{self, BakeSpec, Compression as C, Format};
    let format: Format = a.format.parse()?;
    let config = build_config(&a.cfg)?;
    let modules = modules_for(&a.cfg, &config, a.stage1)?;
    let mut spec = BakeSpec::new(format, a.out.clone(), a.input.clone(), a.init.clone());
    spec.oci_ref = a.oci_ref.clone();
    spec.init_path = a.init_path.clone();
    spec.config = config;
    spec.writable = a.writable.as_deref().map(|w| {
        if w == "none" {
            Vec::new()
        } else {
            w.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        }
    });
    spec.stage1 = a.stage1;
    spec.stage1_root = a.root.clone();
    spec.modules = modules;
    spec.all_root = a.all_root;
    spec.label = a.root_label.clone();
    spec.compress = match a.compress.as_str() {
        "zstd" => C::Zstd,
        "none" => C::None,
        _ => C::Gzip,
    };
    spec.qcow2_fs = a.qcow2_fs.parse().map_err(|e: String| anyhow!(e))?;
    spec.name = a.name.clone();
    spec.version = a.image_version.clone();
    spec.cache = if a.no_cache {
        None
    } else {
        a.cache
            .clone()
            .or_else(bootlace_image::oci::LayerCache::default_dir)
    };
    spec.mtime = u64::from(initramfs::source_date_epoch().map_err(|e| anyhow!(e))?);
    let report = bake::bake(&spec, &mut |line| eprintln!("bootlace-image: {line}"))?;
    let m = &report.meta;
    println!(
        "wrote {} ({}{}{}, {} bytes) sha256:{}",
        a.out.display(),
        m.format,
        m.fstype
            .filter(|f| f.as_str() != m.format.as_str())
            .map(|f| format!(" of {f}"))
            .unwrap_or_default(),
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
    if s.entries > 0 {
        println!(
            "  staged: {} entries ({} files hard-linked, {} written, {} bytes, {} whiteouts)",
            s.entries, s.linked, s.copied, s.bytes, s.whiteouts
        );
    }
    println!(
        "  init: {} (version {}, sha256 {}), config {}",
        m.init.path,
        m.init.version,
        m.init.sha256,
        config::CONFIG_PATH
    );
    println!(
        "  {}; writable: {}",
        if m.stage1 {
            "stage 1: mounts the real root and switches to it".to_owned()
        } else if m.read_only {
            "read-only root".to_owned()
        } else {
            "read-write root".to_owned()
        },
        if m.writable.is_empty() {
            "none".to_owned()
        } else {
            m.writable.join(" ")
        }
    );
    println!(
        "  modules: {}{}",
        m.kernel_release
            .as_deref()
            .map(|r| format!("{r}: "))
            .unwrap_or_default(),
        if m.modules.is_empty() {
            "none".to_owned()
        } else {
            m.modules.join(" ")
        }
    );
    println!(
        "  metadata: {} (name {}, version {}); staging {:.2} s, image {:.2} s, hash+sync {:.2} s",
        report.meta_path.display(),
        m.name,
        m.version,
        report.staging_time.as_secs_f64(),
        report.image_time.as_secs_f64(),
        report.finish_time.as_secs_f64()
    );
    Ok(())
}

fn bundle_cmd(a: BundleArgs) -> anyhow::Result<()> {
    use bootlace_image::bundle::{self, BundleFormat};
    let format = match a.format {
        BundleFormatArg::DiskExt4 => BundleFormat::DiskExt4,
        BundleFormatArg::DiskErofs => BundleFormat::DiskErofs,
        BundleFormatArg::Dir => BundleFormat::Dir,
        BundleFormatArg::Tar => BundleFormat::Tar,
        BundleFormatArg::TarGz => BundleFormat::TarGz,
        BundleFormatArg::TarZst => BundleFormat::TarZst,
    };
    let mtime = u64::from(initramfs::source_date_epoch().map_err(|e| anyhow!(e))?);
    let s = bundle::build(&a.dir, format, &a.label, mtime, &a.out)?;
    println!(
        "wrote {} ({:?}, label {}): manifest valid, {} files, {} commands, {} bytes",
        a.out.display(),
        a.format,
        a.label,
        s.files,
        s.commands,
        s.bytes
    );
    if let Some(d) = &s.sha256 {
        println!("sha256:{d}");
    }
    Ok(())
}

fn list(file: &PathBuf) -> anyhow::Result<()> {
    let raw = std::fs::read(file).with_context(|| format!("read {}", file.display()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
            .with_context(|| format!("gunzip {}", file.display()))?;
        out
    } else if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        zstd::stream::decode_all(&raw[..]).with_context(|| format!("unzstd {}", file.display()))?
    } else {
        raw
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
