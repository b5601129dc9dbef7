//! `bootlace-image capture`: boot a base image with a configuration bundle, let the guest
//! apply it and power off (the `poweroff` hand-off), then bake what it left on its root into
//! the next version of the image (docs/image.md, "Capture").
//!
//! The steps, in a work directory inside the images directory (`.bootlace-capture.*`,
//! removed on every path, so a failure leaves nothing among the images):
//!
//! 1. the parent: `NAME[@VERSION]` from the images directory, its sha256 checked; an ext4
//!    image (the root the guest writes to);
//! 2. a private copy of it, grown so the configuration has room, with a capture `init.toml`:
//!    the parent's, plus a vsock source pinned to the bundle's sha256 and the `poweroff`
//!    hand-off;
//! 3. the boot: the `bootlace-vm` binary, run as a subprocess (this crate never depends on
//!    the harness), with the copy attached read-write and the bundle served over vsock; it
//!    must end with EXIT_STATUS 0 from the poweroff hand-off;
//! 4. the exclusions ([`exclude`]) and the secret scan on the copy;
//! 5. a bake of the copy with the parent's settings and config, then the metadata (schema 3:
//!    `parent`, `bundle`), published without ever replacing an existing file.

pub mod exclude;

use std::io::{self, Read as _};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bootlace_contract::config::{
    FailurePolicy, HandoffMode, HostAddress, InitConfig, Source, CONFIG_PATH,
};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::image::{
    compare_versions, next_version, BundleRef, Format, ImageMeta, Parent, CAPTURE_SCHEMA, SUFFIX,
};
use bootlace_contract::manifest::{Manifest, MANIFEST_NAME};
use bootlace_contract::types::ModuleName;

use crate::bake::{self, BakeError, BakeSpec};
use crate::initramfs::Modules;
use exclude::{Leak, Secret};

/// What to capture, and how.
#[derive(Debug, Clone)]
pub struct CaptureSpec {
    /// The images directory: the parent is read from it, the new version written to it.
    pub images: PathBuf,
    /// The parent: `NAME` (its default version) or `NAME@VERSION`.
    pub image: String,
    /// The bundle tarball (tar, tar.gz, tar.zst; `bootlace-image bundle --format tar.gz`).
    pub bundle: PathBuf,
    /// The new version; `None`: [`next_version`] of the highest version of the name.
    pub version: Option<String>,
    /// The `bootlace-vm` binary.
    pub vm: PathBuf,
    /// Extra arguments for `bootlace-vm run` (`--kernel`, `--memory`, `--kvm`).
    pub vm_args: Vec<String>,
    /// The stage-1 initramfs for the capture boot; `None`: the newest in the images directory.
    pub stage1: Option<PathBuf>,
    /// The capture boot's limit, in seconds.
    pub timeout_s: u64,
    /// Where the kernel modules come from for the bake (the parent's release under it).
    pub modules_root: PathBuf,
    /// Free space given to the copy for the configuration, in MiB.
    pub grow_mib: u64,
    /// SOURCE_DATE_EPOCH of the bake; `None`: the parent's.
    pub mtime: Option<u64>,
    /// Keep the capture boot's console here.
    pub console_log: Option<PathBuf>,
}

/// What a capture made.
#[derive(Debug, Clone)]
pub struct Captured {
    /// The new image's metadata.
    pub meta: ImageMeta,
    /// Where it was written.
    pub meta_path: PathBuf,
    /// What the exclusions and the secret scan removed.
    pub excluded: Vec<String>,
    /// The capture boot, as `bootlace-vm` measured it (QEMU's start to its end).
    pub boot: Duration,
    /// The whole capture.
    pub total: Duration,
}

/// Why a capture failed. Nothing is left in the images directory.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The images directory or a metadata file could not be read.
    #[error("images directory {}", dir.display())]
    Images {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The parent is not there (or is not usable).
    #[error("image {image} in {}: {why}", dir.display())]
    Parent {
        /// The directory.
        dir: PathBuf,
        /// What was asked for.
        image: String,
        /// Why.
        why: String,
    },
    /// Capture loop-mounts its work copy: it needs root.
    #[error(
        "capture needs root: it mounts the guest's configured root (a loop device) to bake it"
    )]
    NotRoot,
    /// The parent has no vsock driver: the capture boot could not fetch the bundle.
    #[error("image {image} has no vsock driver (vmw_vsock_virtio_transport is not among its modules): the capture boot fetches the bundle over vsock; bake the base with --extra-module vmw_vsock_virtio_transport")]
    NoVsock {
        /// The parent.
        image: String,
    },
    /// The parent's format cannot be captured (yet).
    #[error("image {image} is {format}: capture takes an ext4 image (the guest writes its configuration to its root; bake the base with --format ext4)")]
    Format {
        /// The parent.
        image: String,
        /// Its format.
        format: Format,
    },
    /// The new version exists already.
    #[error("{image} exists already in {} ({}): a version is never replaced (--version gives another)", dir.display(), file)]
    Exists {
        /// The directory.
        dir: PathBuf,
        /// `name@version`.
        image: String,
        /// The file that has it.
        file: String,
    },
    /// The bundle could not be read or is not a valid bundle.
    #[error("bundle {}: {why}", path.display())]
    Bundle {
        /// The bundle.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// A file operation on the work copy failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The command, in words.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its stderr, last lines.
        stderr: String,
    },
    /// The capture boot did not end with the guest configured and powered off cleanly.
    #[error("the capture boot failed: {reason}")]
    Guest {
        /// The guest's reason (its power-off line, or how bootlace-vm ended).
        reason: String,
    },
    /// The guest left a secret of the bundle inside a file.
    #[error("{} holds the bundle's {} among other content: refusing to capture it (write the file without the secret, or deliver the secret at boot)", leak.path, leak.what)]
    Secret {
        /// Where.
        leak: Leak,
    },
    /// The init in the configured tree is not the parent's.
    #[error("the configured root's init {path} has sha256 {found}, the parent's metadata says {want}: the configuration replaced the init")]
    Init {
        /// Its path.
        path: String,
        /// Its sha256.
        found: String,
        /// The parent's.
        want: String,
    },
    /// The bake of the configured tree failed.
    #[error("bake")]
    Bake(#[source] BakeError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CaptureError {
    let what = what.into();
    move |source| CaptureError::Io { what, source }
}

/// Every image of `dir` with its metadata path (stage-1 images included).
pub fn catalog(dir: &Path) -> Result<Vec<(PathBuf, ImageMeta)>, CaptureError> {
    let images_err = |source| CaptureError::Images {
        dir: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(images_err)? {
        let path = e.map_err(images_err)?.path();
        let is_meta = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(SUFFIX) && !n.starts_with('.'));
        if is_meta {
            // An unreadable metadata file is skipped here as bootlace-vm skips it.
            if let Ok(m) = ImageMeta::read(&path) {
                out.push((path, m));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// The parent named `image` (`NAME` or `NAME@VERSION`; without a version the one in
/// `DIR/NAME.default`, else the highest), its sha256 checked.
pub fn find_parent(dir: &Path, image: &str) -> Result<(PathBuf, ImageMeta), CaptureError> {
    let all = catalog(dir)?;
    let (name, version) = match image.split_once('@') {
        Some((n, v)) => (n, Some(v.to_owned())),
        None => (image, None),
    };
    let err = |why: String| CaptureError::Parent {
        dir: dir.to_owned(),
        image: image.to_owned(),
        why,
    };
    let of_name: Vec<&(PathBuf, ImageMeta)> = all
        .iter()
        .filter(|(_, m)| m.name == name && !m.stage1)
        .collect();
    let version = match version {
        Some(v) => v,
        None => match std::fs::read_to_string(dir.join(format!("{name}.default"))) {
            Ok(v) => v.trim().to_owned(),
            Err(_) => of_name
                .iter()
                .map(|(_, m)| m.version.clone())
                .max_by(|a, b| compare_versions(a, b))
                .ok_or_else(|| err("no image of that name".to_owned()))?,
        },
    };
    let (path, meta) = of_name
        .into_iter()
        .find(|(_, m)| m.version == version)
        .ok_or_else(|| err(format!("no version {version}")))?;
    let file = meta.image_path(path);
    let (sha, _) =
        bake::hash_file(&file).map_err(|e| err(format!("cannot read {}: {e}", file.display())))?;
    if sha != meta.sha256 {
        return Err(err(format!(
            "{} has sha256 {sha}, its metadata says {}",
            file.display(),
            meta.sha256
        )));
    }
    Ok((path.clone(), meta.clone()))
}

/// The version a capture of `name` writes: `given`, else the next after the highest version
/// of the name in `all`; refused when an image of the name has it already.
pub fn new_version(
    dir: &Path,
    all: &[(PathBuf, ImageMeta)],
    name: &str,
    given: Option<&str>,
) -> Result<String, CaptureError> {
    let highest = all
        .iter()
        .filter(|(_, m)| m.name == name && !m.stage1)
        .map(|(_, m)| m.version.as_str())
        .max_by(|a, b| compare_versions(a, b))
        .unwrap_or("0");
    let version = given.map_or_else(|| next_version(highest), str::to_owned);
    if let Some((_, m)) = all
        .iter()
        .find(|(_, m)| m.name == name && m.version == version)
    {
        return Err(CaptureError::Exists {
            dir: dir.to_owned(),
            image: m.id(),
            file: m.file.clone(),
        });
    }
    Ok(version)
}

/// The new image's file name: `NAME-VERSION.ext4`.
pub fn file_name(name: &str, version: &str, format: Format) -> String {
    format!("{name}-{version}.{}", format.as_str())
}

/// A bundle, read for a capture: its digest, its manifest and its secrets.
#[derive(Debug, Clone)]
pub struct BundleInfo {
    /// `sha256:<hex>` of the tarball.
    pub digest: Sha256Digest,
    /// Its manifest.
    pub manifest: Manifest,
    /// What it delivers without putting it into the root: its files no `[[files]]` entry
    /// copies, and the values of `env` and of every command's `env`.
    pub secrets: Vec<Secret>,
}

/// Files of a bundle larger than this are not taken as secrets (nor held in memory).
const MAX_SECRET_FILE: u64 = 1 << 20;

/// Reads a bundle tarball (tar, gzip or zstd, by its first bytes).
pub fn read_bundle(path: &Path) -> Result<BundleInfo, CaptureError> {
    let err = |why: String| CaptureError::Bundle {
        path: path.to_owned(),
        why,
    };
    let (hex, _) = bake::hash_file(path).map_err(|e| err(e.to_string()))?;
    let digest = Sha256Digest::try_from(format!("sha256:{hex}")).map_err(|e| err(e.to_string()))?;
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic).map_err(|e| err(e.to_string()))?;
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let reader: Box<dyn io::Read> = match magic.get(..n) {
        Some([0x1f, 0x8b, ..]) => Box::new(flate2::read::GzDecoder::new(file)),
        Some([0x28, 0xb5, 0x2f, 0xfd]) => {
            Box::new(zstd::stream::read::Decoder::new(file).map_err(|e| err(e.to_string()))?)
        }
        _ => Box::new(file),
    };
    let mut manifest_text = None;
    let mut files = Vec::new();
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(|e| err(e.to_string()))? {
        let mut entry = entry.map_err(|e| err(e.to_string()))?;
        if !entry.header().entry_type().is_file() || entry.size() > MAX_SECRET_FILE {
            continue;
        }
        let name = entry
            .path()
            .map_err(|e| err(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut body = Vec::new();
        entry
            .read_to_end(&mut body)
            .map_err(|e| err(e.to_string()))?;
        if name == MANIFEST_NAME {
            manifest_text = Some(body);
        } else {
            files.push((name, body));
        }
    }
    let text = manifest_text.ok_or_else(|| err(format!("no {MANIFEST_NAME}")))?;
    let text = String::from_utf8(text).map_err(|_| err(format!("{MANIFEST_NAME} is not UTF-8")))?;
    let manifest = Manifest::parse(&text, &path.join(MANIFEST_NAME))
        .map_err(|e| err(bootlace_contract::chain(&e)))?;
    let secrets = secrets_of(&manifest, files);
    Ok(BundleInfo {
        digest,
        manifest,
        secrets,
    })
}

/// The bundle's secrets: its files no `[[files]]` entry copies, and every `env` value.
pub fn secrets_of(manifest: &Manifest, files: Vec<(String, Vec<u8>)>) -> Vec<Secret> {
    let copied: Vec<&str> = manifest
        .files
        .iter()
        .filter_map(|f| f.source.as_ref())
        .map(|s| s.as_str().trim_start_matches("./"))
        .collect();
    let mut secrets: Vec<Secret> = files
        .into_iter()
        .filter(|(name, _)| !copied.contains(&name.as_str()))
        .map(|(name, value)| Secret {
            what: format!("file {name}"),
            value,
        })
        .collect();
    let envs = manifest
        .env
        .iter()
        .map(|(k, v)| (format!("env {}", k.as_str()), v))
        .chain(manifest.run.iter().flat_map(|r| {
            r.env.iter().map(move |(k, v)| {
                (
                    format!("env {} of command {}", k.as_str(), r.name.as_str()),
                    v,
                )
            })
        }));
    secrets.extend(envs.map(|(what, v)| Secret {
        what,
        value: v.as_str().as_bytes().to_vec(),
    }));
    secrets
}

/// The capture boot's `init.toml`: the parent's, with a vsock bootstrap pinned to the
/// bundle, a required bootstrap, the poweroff hand-off and the poweroff failure policy.
pub fn capture_config(parent: &InitConfig, digest: &Sha256Digest, port: u32) -> InitConfig {
    let mut c = parent.clone();
    c.bootstrap.sources = vec![Source::Vsock];
    c.bootstrap.required = true;
    c.host.address = HostAddress::try_from(format!("vsock:2:{port}")).ok();
    c.host.digest = Some(digest.clone());
    c.handoff.mode = HandoffMode::Poweroff;
    c.on_failure = FailurePolicy::Poweroff;
    c
}

/// Runs a tool; its stderr's last lines name a failure.
fn run_tool(cmd: &mut Command, ok: &[i32]) -> Result<(), CaptureError> {
    let tool = format!("{cmd:?}");
    let out = cmd.output().map_err(io_err(format!("run {tool}")))?;
    match out.status.code() {
        Some(c) if ok.contains(&c) => Ok(()),
        _ => Err(CaptureError::Tool {
            tool,
            status: out.status.to_string(),
            stderr: last_lines(&String::from_utf8_lossy(&out.stderr), 5),
        }),
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .get(lines.len().saturating_sub(n)..)
        .unwrap_or_default()
        .join(" | ")
}

/// A loop mount of the work copy, undone when dropped.
struct Mounted {
    dir: PathBuf,
    active: bool,
}

impl Mounted {
    fn new(image: &Path, dir: &Path) -> Result<Mounted, CaptureError> {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        run_tool(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
                .arg(image)
                .arg(dir),
            &[0],
        )?;
        Ok(Mounted {
            dir: dir.to_owned(),
            active: true,
        })
    }

    fn unmount(mut self) -> Result<(), CaptureError> {
        self.active = false;
        run_tool(Command::new("umount").arg(&self.dir), &[0])
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.active {
            let _ = Command::new("umount").arg(&self.dir).output();
        }
    }
}

/// Reads a regular file of the tree at `path` (absolute in the tree), resolved inside it.
fn read_in_tree(root: &Path, path: &str) -> Result<Vec<u8>, CaptureError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let what = format!("read {path} in the configured root");
    let rootfd = exclude::open_root(root).map_err(io_err(what.clone()))?;
    let fd = rustix::fs::openat2(
        &rootfd,
        path.trim_start_matches('/'),
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| CaptureError::Io {
        what: what.clone(),
        source: e.into(),
    })?;
    let mut body = Vec::new();
    std::fs::File::from(fd)
        .read_to_end(&mut body)
        .map_err(io_err(what))?;
    Ok(body)
}

/// Writes `text` over `path` in the tree (resolved inside it), through a new file renamed
/// into place.
fn write_in_tree(root: &Path, path: &str, text: &[u8]) -> Result<(), CaptureError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let what = format!("write {path} in the work copy");
    let (parent, name) = path
        .trim_start_matches('/')
        .rsplit_once('/')
        .unwrap_or(("", path));
    let rootfd = exclude::open_root(root).map_err(io_err(what.clone()))?;
    let dir = rustix::fs::openat2(
        &rootfd,
        if parent.is_empty() { "." } else { parent },
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| CaptureError::Io {
        what: what.clone(),
        source: e.into(),
    })?;
    let tmp = format!(".{name}.capture");
    let fd = rustix::fs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| CaptureError::Io {
        what: what.clone(),
        source: e.into(),
    })?;
    io::Write::write_all(&mut std::fs::File::from(fd), text).map_err(io_err(what.clone()))?;
    rustix::fs::renameat(&dir, tmp.as_str(), &dir, name).map_err(|e| CaptureError::Io {
        what,
        source: e.into(),
    })
}

/// `bootlace-vm run --json`'s result.
#[derive(Debug, serde::Deserialize)]
struct VmResult {
    ended: String,
    exit_status: Option<i64>,
    status: Option<String>,
    error: Option<String>,
    wall_s: Option<f64>,
}

/// The status a poweroff hand-off powers off with (init/src/boot.rs).
const POWEROFF_STATUS: &str = "configuration applied; hand-off poweroff";

/// Step 3: the capture boot. Returns how long QEMU ran.
fn boot(
    spec: &CaptureSpec,
    stage1: &Path,
    copy: &Path,
    label: &str,
    console: &Path,
) -> Result<Duration, CaptureError> {
    let mut cmd = Command::new(&spec.vm);
    cmd.arg("run")
        .arg("--initrd")
        .arg(stage1)
        .arg("--disk")
        .arg(copy)
        .arg("--append")
        .arg(format!("bootlace.root=LABEL={label}"))
        .arg("--bootstrap-vsock")
        .arg(&spec.bundle)
        .args([
            "--timeout",
            &spec.timeout_s.to_string(),
            "--json",
            "--no-echo",
        ])
        .arg("--console-log")
        .arg(console)
        .args(&spec.vm_args)
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let out = cmd
        .output()
        .map_err(io_err(format!("run {}", spec.vm.display())))?;
    let r: VmResult = serde_json::from_slice(&out.stdout).map_err(|e| CaptureError::Guest {
        reason: format!(
            "{} printed no result ({e}; exit {})",
            spec.vm.display(),
            out.status
        ),
    })?;
    let clean = r.ended == "guest-status"
        && r.exit_status == Some(0)
        && r.status.as_deref() == Some(POWEROFF_STATUS);
    if clean {
        return Ok(Duration::from_secs_f64(r.wall_s.unwrap_or(0.0).max(0.0)));
    }
    let reason = match (r.exit_status, r.status, r.error) {
        (_, _, Some(e)) => format!("{}: {e}", r.ended),
        (Some(s), Some(text), _) => format!("EXIT_STATUS={s} STATUS={text}"),
        _ => format!("{} (no power-off line)", r.ended),
    };
    let errors = std::fs::read_to_string(console)
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("bootlace: error"))
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default();
    Err(CaptureError::Guest {
        reason: if errors.is_empty() || reason.contains(&errors) {
            reason
        } else {
            format!("{reason} (console: {errors})")
        },
    })
}

/// The newest stage-1 initramfs of the catalog whose sha256 verifies.
fn find_stage1(all: &[(PathBuf, ImageMeta)]) -> Option<PathBuf> {
    let mut s1: Vec<&(PathBuf, ImageMeta)> = all.iter().filter(|(_, m)| m.stage1).collect();
    s1.sort_by(|a, b| compare_versions(&b.1.version, &a.1.version));
    s1.into_iter()
        .map(|(p, m)| (m.image_path(p), m))
        .find(|(f, m)| bake::hash_file(f).is_ok_and(|(sha, _)| sha == m.sha256))
        .map(|(f, _)| f)
}

/// Step 2: the private copy, grown by `grow_mib`.
fn work_copy(parent: &Path, copy: &Path, grow_mib: u64) -> Result<(), CaptureError> {
    std::fs::copy(parent, copy).map_err(io_err(format!(
        "copy {} to {}",
        parent.display(),
        copy.display()
    )))?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(copy)
        .map_err(io_err("open the work copy"))?;
    let len = f.metadata().map_err(io_err("stat the work copy"))?.len();
    f.set_len(len + (grow_mib << 20))
        .map_err(io_err("grow the work copy"))?;
    drop(f);
    run_tool(Command::new("e2fsck").args(["-f", "-p"]).arg(copy), &[0, 1])?;
    run_tool(Command::new("resize2fs").arg(copy), &[0])
}

/// Captures: the five steps of the module's description.
pub fn capture(spec: &CaptureSpec) -> Result<Captured, CaptureError> {
    let start = Instant::now();
    if !rustix::process::geteuid().is_root() {
        return Err(CaptureError::NotRoot);
    }
    let (parent_meta_path, parent) = find_parent(&spec.images, &spec.image)?;
    if parent.format != Format::Ext4 {
        return Err(CaptureError::Format {
            image: parent.id(),
            format: parent.format,
        });
    }
    if !parent
        .modules
        .iter()
        .any(|m| m.replace('-', "_") == "vmw_vsock_virtio_transport")
    {
        return Err(CaptureError::NoVsock { image: parent.id() });
    }
    let all = catalog(&spec.images)?;
    let version = new_version(&spec.images, &all, &parent.name, spec.version.as_deref())?;
    let file = file_name(&parent.name, &version, parent.format);
    if spec.images.join(&file).exists() || spec.images.join(format!("{file}{SUFFIX}")).exists() {
        return Err(CaptureError::Exists {
            dir: spec.images.clone(),
            image: format!("{}@{version}", parent.name),
            file,
        });
    }
    let bundle = read_bundle(&spec.bundle)?;
    let stage1 = match &spec.stage1 {
        Some(s) => s.clone(),
        None => find_stage1(&all).ok_or_else(|| CaptureError::Parent {
            dir: spec.images.clone(),
            image: parent.id(),
            why: "no stage-1 initramfs that verifies (bake one with --format initramfs --stage1)"
                .to_owned(),
        })?,
    };
    let work = tempfile::Builder::new()
        .prefix(".bootlace-capture.")
        .tempdir_in(&spec.images)
        .map_err(io_err("create the work directory"))?;
    let w = work.path();
    let copy = w.join("root.ext4");
    work_copy(&parent.image_path(&parent_meta_path), &copy, spec.grow_mib)?;
    let parent_config = prepare(&copy, &w.join("mnt"), &bundle, &parent)?;
    let console = spec
        .console_log
        .clone()
        .unwrap_or_else(|| w.join("console.log"));
    let label = parent.label.clone().unwrap_or_default();
    let boot_time = boot(spec, &stage1, &copy, &label, &console)?;
    let job = Job {
        parent: &parent,
        config: &parent_config,
        bundle: &bundle,
        version: &version,
        file: &file,
    };
    let (meta, excluded) = bake_captured(spec, w, &copy, &job)?;
    let meta_path = publish(w, &spec.images, &file)?;
    Ok(Captured {
        meta,
        meta_path,
        excluded,
        boot: boot_time,
        total: start.elapsed(),
    })
}

/// Step 2, in the copy: the parent's config read, the capture config written. Returns the
/// parent's config.
fn prepare(
    copy: &Path,
    mnt: &Path,
    bundle: &BundleInfo,
    parent: &ImageMeta,
) -> Result<InitConfig, CaptureError> {
    let m = Mounted::new(copy, mnt)?;
    let text = read_in_tree(mnt, CONFIG_PATH)?;
    let text = String::from_utf8(text).map_err(|_| CaptureError::Parent {
        dir: copy.to_owned(),
        image: parent.id(),
        why: format!("{CONFIG_PATH} is not UTF-8"),
    })?;
    let config =
        InitConfig::from_toml(&text, Path::new(CONFIG_PATH)).map_err(|e| CaptureError::Parent {
            dir: copy.to_owned(),
            image: parent.id(),
            why: bootlace_contract::chain(&e),
        })?;
    let capture = capture_config(
        &config,
        &bundle.digest,
        bootlace_contract::protocol::DEFAULT_PORT,
    );
    let mut out = String::from("# Written by bootlace-image capture for the capture boot.\n");
    out.push_str(&capture.to_toml());
    write_in_tree(mnt, CONFIG_PATH, out.as_bytes())?;
    m.unmount()?;
    Ok(config)
}

/// What the bake of a capture is made from.
struct Job<'a> {
    parent: &'a ImageMeta,
    /// The parent's config (baked into the new version).
    config: &'a InitConfig,
    bundle: &'a BundleInfo,
    version: &'a str,
    file: &'a str,
}

/// Steps 4 and 5: exclusions, secrets, the init checked, the bake into `work/out`, the
/// metadata of a captured image.
fn bake_captured(
    spec: &CaptureSpec,
    work: &Path,
    copy: &Path,
    job: &Job<'_>,
) -> Result<(ImageMeta, Vec<String>), CaptureError> {
    let Job {
        parent,
        config,
        bundle,
        version,
        file,
    } = *job;
    let mnt = work.join("mnt");
    let m = Mounted::new(copy, &mnt)?;
    let mut excluded = exclude::apply_all(&mnt, bundle.manifest.state_dir.as_str())
        .map_err(io_err("apply the exclusions to the configured root"))?;
    let (removed, leaks) = exclude::remove_secrets(&mnt, &bundle.secrets)
        .map_err(io_err("scan the configured root for the bundle's secrets"))?;
    if let Some(leak) = leaks.into_iter().next() {
        return Err(CaptureError::Secret { leak });
    }
    excluded.extend(
        removed
            .into_iter()
            .map(|p| format!("{p} (a secret of the bundle)")),
    );
    // The init: the parent's, unchanged.
    let init = read_in_tree(&mnt, &parent.init.path)?;
    let found = {
        use sha2::Digest as _;
        Sha256Digest::from_bytes(&sha2::Sha256::digest(&init))
    };
    if !found.matches_hex(&parent.init.sha256) {
        return Err(CaptureError::Init {
            path: parent.init.path.clone(),
            found: found.hex().to_owned(),
            want: parent.init.sha256.clone(),
        });
    }
    let init_copy = work.join("bootlace-init");
    std::fs::write(&init_copy, &init).map_err(io_err("copy the init out"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&init_copy, std::fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod the init"))?;
    }
    let out_dir = work.join("out");
    std::fs::create_dir(&out_dir).map_err(io_err("create the output directory"))?;
    let spec_b = bake_spec(
        spec,
        parent,
        config,
        &mnt,
        &init_copy,
        &out_dir.join(file),
        version,
    )?;
    let report = bake::bake(&spec_b, &mut |_| {}).map_err(CaptureError::Bake)?;
    m.unmount()?;
    let mut meta = report.meta;
    meta.schema = CAPTURE_SCHEMA;
    for input in &mut meta.inputs {
        input.path = format!("{} configured by bundle {}", parent.id(), bundle.digest);
    }
    meta.parent = Some(Parent {
        name: parent.name.clone(),
        version: parent.version.clone(),
        sha256: parent.sha256.clone(),
        init: parent.init.clone(),
    });
    meta.bundle = Some(BundleRef {
        sha256: bundle.digest.to_string(),
    });
    bake::write_meta(&meta, &report.meta_path).map_err(|e| CaptureError::Io {
        what: "write the metadata".to_owned(),
        source: io::Error::other(bootlace_contract::chain(&e)),
    })?;
    Ok((meta, excluded))
}

/// The bake of the configured tree: the parent's format, label, writable locations, init
/// path, modules and config, the new version.
fn bake_spec(
    spec: &CaptureSpec,
    parent: &ImageMeta,
    config: &InitConfig,
    tree: &Path,
    init: &Path,
    out: &Path,
    version: &str,
) -> Result<BakeSpec, CaptureError> {
    let mut b = BakeSpec::new(
        parent.format,
        out.to_owned(),
        Some(tree.to_owned()),
        init.to_owned(),
    );
    b.init_path = parent.init.path.clone();
    b.config = config.clone();
    b.writable = Some(parent.writable.clone());
    b.label = parent.label.clone();
    b.name = Some(parent.name.clone());
    b.version = version.to_owned();
    b.mtime = spec.mtime.unwrap_or(parent.source_date_epoch);
    if let Some(release) = &parent.kernel_release {
        let extra = parent
            .modules
            .iter()
            .map(|m| ModuleName::try_from(m.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CaptureError::Parent {
                dir: spec.images.clone(),
                image: parent.id(),
                why: format!("modules: {e}"),
            })?;
        b.modules = Some(Modules {
            root: spec.modules_root.clone(),
            release: release.clone(),
            extra,
        });
    }
    Ok(b)
}

/// Step 5's end: the image, then its metadata, linked into the images directory — a link
/// never replaces a file; a metadata file that cannot be linked takes its image back out.
fn publish(work: &Path, images: &Path, file: &str) -> Result<PathBuf, CaptureError> {
    let meta_name = format!("{file}{SUFFIX}");
    let (src, dst) = (work.join("out").join(file), images.join(file));
    std::fs::hard_link(&src, &dst).map_err(io_err(format!("publish {}", dst.display())))?;
    let (msrc, mdst) = (work.join("out").join(&meta_name), images.join(&meta_name));
    if let Err(e) = std::fs::hard_link(&msrc, &mdst) {
        let _ = std::fs::remove_file(&dst);
        return Err(io_err(format!("publish {}", mdst.display()))(e));
    }
    Ok(mdst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_capture_config_pins_the_bundle_and_powers_off() {
        let d = Sha256Digest::from_bytes(&[7u8; 32]);
        let parent = InitConfig {
            on_failure: FailurePolicy::Shell,
            ..InitConfig::default()
        };
        let c = capture_config(&parent, &d, 1024);
        assert_eq!(c.handoff.mode, HandoffMode::Poweroff);
        assert_eq!(c.on_failure, FailurePolicy::Poweroff);
        assert_eq!(c.bootstrap.sources, [Source::Vsock]);
        assert_eq!(c.host.digest.as_ref(), Some(&d));
        let text = c.to_toml();
        let back = InitConfig::from_toml(&text, Path::new("init.toml")).expect("valid");
        assert_eq!(back.handoff.mode, HandoffMode::Poweroff);
    }

    #[test]
    fn secrets_are_the_files_not_copied_and_the_env_values() {
        let m = Manifest::parse(
            "version = 1\n[env]\nTOKEN = \"t0ken-value\"\n[[files]]\npath = \"/etc/app.conf\"\n\
             source = \"app.conf\"\n[[run]]\nname = \"use\"\ncommand = [\"/bin/true\"]\n\
             env = { KEY = \"k3y-value\" }\n",
            Path::new("bootlace.toml"),
        )
        .expect("manifest");
        let s = secrets_of(
            &m,
            vec![
                ("app.conf".into(), b"x=1\n".to_vec()),
                ("secret.txt".into(), b"canary\n".to_vec()),
            ],
        );
        let what: Vec<&str> = s.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(
            what,
            ["file secret.txt", "env TOKEN", "env KEY of command use"]
        );
    }

    #[test]
    fn versions_and_names() {
        let dir = Path::new("/images");
        let mk = |v: &str| {
            let json = format!(
                r#"{{"schema": 2, "name": "base", "version": "{v}", "format": "ext4",
                "file": "base-{v}.ext4", "sha256": "{}", "size": 1, "fstype": "ext4",
                "label": "r", "stage1": false, "read_only": false, "writable": [],
                "inputs": [], "init": {{"path": "/sbin/bootlace-init", "version": "0",
                "sha256": "00"}}, "kernel_release": null, "modules": [],
                "source_date_epoch": 0, "built": "", "tool_versions": {{}}}}"#,
                "0".repeat(64)
            );
            let m = ImageMeta::from_json(json.as_bytes(), Path::new("m")).expect("meta");
            (PathBuf::from(format!("/images/base-{v}.meta.json")), m)
        };
        let all = vec![mk("1.0"), mk("1.9"), mk("1.10")];
        assert_eq!(new_version(dir, &all, "base", None).expect("next"), "1.11");
        assert_eq!(new_version(dir, &all, "other", None).expect("first"), "1");
        assert_eq!(
            new_version(dir, &all, "base", Some("2.0")).expect("given"),
            "2.0"
        );
        assert!(matches!(
            new_version(dir, &all, "base", Some("1.9")),
            Err(CaptureError::Exists { .. })
        ));
        assert_eq!(file_name("base", "1.1", Format::Ext4), "base-1.1.ext4");
    }
}
