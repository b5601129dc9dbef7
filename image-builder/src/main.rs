//! `bootlace-image`: the image builder's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use bootlace_image::initramfs::{self, Compression, Modules, Spec};
use bootlace_init::config::{self, InitConfig, ModuleName};
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
    /// Build an initramfs (newc cpio) from a rootfs directory, the init and kernel modules.
    Initramfs(Box<InitramfsArgs>),
    /// Build a bootstrap bundle from a directory holding bootlace.toml: a labelled disk image
    /// or a directory for a 9p share. The manifest is validated as the init will.
    Bundle(BundleArgs),
    /// List the entries of an initramfs (newc, plain or gzip).
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
    /// Base init.toml to bake (validated); the flags below override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Hand-off mode: exec (replace PID 1) or supervise (run as child, stay PID 1).
    #[arg(long, value_parser = ["exec", "supervise"])]
    handoff: Option<String>,
    /// Hand-off command, shell-style words: "/sbin/init" or "/bin/app --flag".
    #[arg(long)]
    exec: Option<String>,
    /// Failure policy: poweroff, continue or shell.
    #[arg(long, value_parser = ["poweroff", "continue", "shell"])]
    on_failure: Option<String>,
    /// Console log level: error, warn, info, debug, trace.
    #[arg(long, value_parser = ["error", "warn", "info", "debug", "trace"])]
    log: Option<String>,
    /// Bootstrap sources to try in order (disk, 9p), comma-separated.
    #[arg(long)]
    source: Option<String>,
    /// Boot on when no bootstrap is found (default: a missing bootstrap is a failure).
    #[arg(long)]
    bootstrap_optional: bool,
    /// Filesystem label of the bootstrap disk (default BOOTLACE).
    #[arg(long)]
    label: Option<String>,
    /// Mount tag of the bootstrap 9p share (default bootlace).
    #[arg(long)]
    tag: Option<String>,
    /// Host configuration manager to report to: vsock:2:PORT.
    #[arg(long)]
    host: Option<String>,
    /// Pinned digest of the vsock bundle: sha256:HEX (as `bootlace-image bundle` prints).
    #[arg(long)]
    digest: Option<String>,
    /// Kernel module to load at boot (with its dependencies); repeatable.
    #[arg(long = "module")]
    modules: Vec<String>,
    /// Kernel module to copy in without loading it at boot; repeatable.
    #[arg(long = "extra-module")]
    extra_modules: Vec<String>,
    /// Kernel release whose modules to copy (default: the only one under --modules-root).
    #[arg(long)]
    kernel_release: Option<String>,
    /// Directory of module trees.
    #[arg(long, default_value = "/lib/modules")]
    modules_root: PathBuf,
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
        Cmd::Initramfs(a) => initramfs_cmd(*a),
        Cmd::List { file } => list(&file),
        Cmd::Bundle(a) => bundle_cmd(a),
    }
}

/// Applies the flags as `bootlace.*`-style overrides, through the init's own validation.
fn build_config(a: &InitramfsArgs) -> anyhow::Result<InitConfig> {
    let mut cfg = match &a.config {
        Some(path) => InitConfig::read(path)?
            .ok_or_else(|| anyhow!("config file {} does not exist", path.display()))?,
        None => InitConfig::default(),
    };
    let mut set = |key: &str, value: &str| -> anyhow::Result<()> {
        let param = bootlace_init::cmdline::Param {
            key: key.to_owned(),
            value: Some(value.to_owned()),
        };
        cfg.apply_param(&param).map_err(|e| anyhow!("{e}"))
    };
    if let Some(v) = &a.handoff {
        set("bootlace.handoff", v)?;
    }
    if let Some(v) = &a.exec {
        set("bootlace.exec", v)?;
    }
    if let Some(v) = &a.on_failure {
        set("bootlace.failure", v)?;
    }
    if let Some(v) = &a.log {
        set("bootlace.log", v)?;
    }
    if !a.modules.is_empty() {
        set("bootlace.modules", &a.modules.join(","))?;
    }
    if let Some(v) = &a.source {
        set("bootlace.source", v)?;
    }
    if a.bootstrap_optional {
        set("bootlace.bootstrap", "optional")?;
    }
    if let Some(v) = &a.label {
        set("bootlace.label", v)?;
    }
    if let Some(v) = &a.tag {
        set("bootlace.tag", v)?;
    }
    if let Some(v) = &a.host {
        set("bootlace.host", v)?;
    }
    if let Some(v) = &a.digest {
        set("bootlace.digest", v)?;
    }
    Ok(cfg)
}

fn kernel_release(a: &InitramfsArgs) -> anyhow::Result<String> {
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

fn initramfs_cmd(a: InitramfsArgs) -> anyhow::Result<()> {
    let config = build_config(&a)?;
    let wants_modules = !config.modules.is_empty()
        || !a.extra_modules.is_empty()
        || !config.bootstrap.sources.is_empty()
        || config.host.address.is_some();
    let modules = if wants_modules {
        let extra = a
            .extra_modules
            .iter()
            .map(|m| ModuleName::try_from(m.clone()).map_err(|e| anyhow!("--extra-module: {e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Some(Modules {
            root: a.modules_root.clone(),
            release: kernel_release(&a)?,
            extra,
        })
    } else {
        None
    };
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
