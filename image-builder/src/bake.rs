//! `bootlace-image bake`: a root filesystem (directory, tarball or OCI layout), `bootlace-init`,
//! its config and the kernel modules it needs -> an image (initramfs, erofs, ext4, squashfs or
//! qcow2) with a metadata file beside it.
//!
//! The steps, all inside a work directory created next to the output (so renames stay on one
//! filesystem) and removed on every path:
//! 1. the input is staged in `work/root` ([`crate::stage`]): a directory is mirrored by hard
//!    links (copied across filesystems), a tarball unpacked, OCI layers applied from the layer
//!    cache ([`crate::oci`]);
//! 2. the bake adds what the init needs: the mount points (`/proc /sys /dev /run /tmp`,
//!    `/.bootstrap` 0700 — a read-only root cannot get them at boot), the writable
//!    directories, the init binary (0755), `/etc/bootlace/init.toml` (validated by the init's
//!    own parser first) and the kernel-module closure under `/lib/modules/<release>` (through
//!    the image's own `/lib` symlink on merged-/usr images);
//! 3. the image tool runs on `work/root` (reproducible arguments: see [`crate::fsimage`]);
//! 4. the image's sha256 goes into the metadata ([`ImageMeta`]); the metadata is
//!    written, then the image is renamed to the output path and the metadata beside it.
//!
//! On any error the output path and the metadata path are left as they were and nothing else
//! remains.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use bootlace_contract::config::{
    ConfigError, InitConfig, RootSpec, Stage1, TargetPath, CONFIG_PATH,
};
use sha2::{Digest, Sha256};

use crate::fsimage::{self, FsFormat, FsImageError, FsOptions, FsSpec};
use crate::initramfs::{self, BuildError, Modules};
use crate::oci::{self, Image, LayerCache, OciError};
use crate::stage::{self, Confined, Kind, Meta, StageError, Writer};
use crate::tree::{Content, Node, Tree};
use bootlace_contract::digest::hex;
use bootlace_contract::fs::FsType;
pub use bootlace_contract::image::Format;
use bootlace_contract::image::{self as meta, ImageMeta, InitInfo, Input, InputKind, MetaError};

pub use bootlace_contract::compression::Compression;

/// The zstd level of an initramfs.
pub const ZSTD_LEVEL: i32 = 9;

/// The writable locations of a read-only root by default.
pub const DEFAULT_WRITABLE: &[&str] = &["/etc", "/var", "/tmp", "/home"];

/// The default filesystem label of root images.
pub const DEFAULT_LABEL: &str = "bootlace-root";

/// Everything a bake is made from.
#[derive(Debug, Clone)]
pub struct BakeSpec {
    /// The output format.
    pub format: Format,
    /// The output file; the metadata goes beside it (`<out>.meta.json`).
    pub out: PathBuf,
    /// The root filesystem: a directory, a tarball or an OCI layout (none for `stage1`).
    pub input: Option<PathBuf>,
    /// The manifest's ref name in an OCI layout with several.
    pub oci_ref: Option<String>,
    /// The `bootlace-init` binary.
    pub init: PathBuf,
    /// Where it goes in the image (default `/sbin/bootlace-init`; an initramfs also gets
    /// `/init` pointing at it).
    pub init_path: String,
    /// The config to bake (its `root.writable` and `stage1` are set from the fields below).
    pub config: InitConfig,
    /// Writable locations; `None` for the format's default (see [`default_writable`]).
    pub writable: Option<Vec<String>>,
    /// A stage-1 initramfs: mounts the real root and switches to it.
    pub stage1: bool,
    /// The stage-1 root (`LABEL=…` or `/dev/…`); the kernel command line may give it instead.
    pub stage1_root: Option<String>,
    /// Where the kernel modules come from (needed when the config needs modules).
    pub modules: Option<Modules>,
    /// Make every file root-owned (default: keep the input's owners).
    pub all_root: bool,
    /// The filesystem label of erofs/ext4 images (and of the filesystem inside a qcow2).
    pub label: String,
    /// Compression of an initramfs.
    pub compress: Compression,
    /// The filesystem inside a qcow2 image (erofs or ext4).
    pub qcow2_fs: FsFormat,
    /// Image name for the metadata (default: the output's file stem).
    pub name: Option<String>,
    /// Image version for the metadata.
    pub version: String,
    /// The layer cache directory (`None`: no cache, layers unpacked straight into staging).
    pub cache: Option<PathBuf>,
    /// SOURCE_DATE_EPOCH: every timestamp in the image.
    pub mtime: u64,
}

impl BakeSpec {
    /// A spec with the defaults: `/sbin/bootlace-init`, default config, format-default
    /// writable locations, label `bootlace-root`, gzip, qcow2 of erofs, version "0", no cache.
    pub fn new(format: Format, out: PathBuf, input: Option<PathBuf>, init: PathBuf) -> BakeSpec {
        BakeSpec {
            format,
            out,
            input,
            oci_ref: None,
            init,
            init_path: initramfs::INIT_PATH.to_owned(),
            config: InitConfig::default(),
            writable: None,
            stage1: false,
            stage1_root: None,
            modules: None,
            all_root: false,
            label: DEFAULT_LABEL.to_owned(),
            compress: Compression::Gzip,
            qcow2_fs: FsFormat::Erofs,
            name: None,
            version: "0".to_owned(),
            cache: None,
            mtime: 0,
        }
    }

    /// The filesystem inside the output (`None` for an initramfs).
    pub fn fstype(&self) -> Option<FsType> {
        self.format.fstype(self.qcow2_fs.fs_type())
    }

    /// Whether the root is read-only at boot (erofs, squashfs, qcow2 of erofs).
    pub fn read_only(&self) -> bool {
        matches!(self.fstype(), Some(FsType::Erofs | FsType::Squashfs))
    }
}

/// The writable locations a format gets by default: `/etc /var /tmp /home` on read-only roots,
/// none otherwise.
pub fn default_writable(spec: &BakeSpec) -> Vec<String> {
    if spec.read_only() {
        DEFAULT_WRITABLE.iter().map(|s| (*s).to_owned()).collect()
    } else {
        Vec::new()
    }
}

/// Why a bake failed. Nothing is left at the output or metadata path.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// The options do not fit together (or a value is out of range).
    #[error("{0}")]
    Spec(String),
    /// The init binary is missing or not a regular file.
    #[error("init binary {}", path.display())]
    Init {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input is missing or of no known kind.
    #[error("input {}: {message}", path.display())]
    Input {
        /// The path given.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Reading the input failed.
    #[error("input {}", path.display())]
    InputIo {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The OCI layout is unusable.
    #[error(transparent)]
    Oci(#[from] OciError),
    /// Staging failed (a refused entry, a corrupt archive, …).
    #[error(transparent)]
    Stage(#[from] StageError),
    /// The config to bake is invalid.
    #[error("the config to bake")]
    Config(#[source] ConfigError),
    /// The kernel modules could not be resolved.
    #[error(transparent)]
    Modules(#[from] BuildError),
    /// The image tool failed.
    #[error(transparent)]
    Image(#[from] FsImageError),
    /// Writing the output failed.
    #[error("write {}", path.display())]
    Output {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the metadata failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// What a bake did.
#[derive(Debug, Clone)]
pub struct Report {
    /// The metadata written beside the image.
    pub meta: ImageMeta,
    /// Where it was written.
    pub meta_path: PathBuf,
    /// OCI layers applied: digest and whether the cache had it.
    pub layers: Vec<(String, bool)>,
    /// What staging the input placed.
    pub input_stats: stage::Stats,
    /// Time spent staging (input + bake additions).
    pub staging_time: Duration,
    /// Time spent in the image tool (and compression).
    pub image_time: Duration,
    /// Time spent hashing and syncing the image and writing the metadata.
    pub finish_time: Duration,
}

/// What staging and the image tool produced.
struct Made {
    inputs: Vec<Input>,
    layers: Vec<(String, bool)>,
    input_stats: stage::Stats,
    init_sha: String,
    tool_versions: BTreeMap<String, String>,
    staging_time: Duration,
    image_time: Duration,
}

/// The kind of input at `path`: an OCI layout (a directory with `oci-layout`), a directory,
/// or a tarball (a file: tar, gzip or zstd by its first bytes).
pub fn input_kind(path: &Path) -> Result<InputKind, BakeError> {
    let meta = std::fs::metadata(path).map_err(|e| BakeError::Input {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    if meta.is_dir() {
        Ok(if oci::is_layout(path) {
            InputKind::Oci
        } else {
            InputKind::Dir
        })
    } else if meta.is_file() {
        Ok(InputKind::Tar)
    } else {
        Err(BakeError::Input {
            path: path.to_owned(),
            message: "neither a directory nor a file".to_owned(),
        })
    }
}

struct Hashing<R> {
    inner: R,
    hash: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// Bakes. `progress` gets one line per notable step (layers cached or unpacked, …).
pub fn bake(spec: &BakeSpec, progress: &mut dyn FnMut(&str)) -> Result<Report, BakeError> {
    // Everything that can be checked before any work.
    let init_meta = std::fs::metadata(&spec.init).map_err(|source| BakeError::Init {
        path: spec.init.clone(),
        source,
    })?;
    if !init_meta.is_file() {
        return Err(BakeError::Init {
            path: spec.init.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    if spec.stage1 && spec.format != Format::Initramfs {
        return Err(BakeError::Spec(
            "--stage1 makes an initramfs: use --format initramfs".to_owned(),
        ));
    }
    if !spec.stage1 && spec.stage1_root.is_some() {
        return Err(BakeError::Spec("--root is for --stage1 only".to_owned()));
    }
    let input_kind = match (&spec.input, spec.stage1) {
        (Some(_), true) => {
            return Err(BakeError::Spec(
                "a stage-1 initramfs takes no --input (it mounts the real root at boot)".to_owned(),
            ))
        }
        (None, false) => {
            return Err(BakeError::Spec(
                "--input (a rootfs directory, tarball or OCI layout) is required".to_owned(),
            ))
        }
        (Some(p), false) => Some(input_kind(p)?),
        (None, true) => None,
    };
    if spec.mtime > u64::from(u32::MAX) {
        return Err(BakeError::Spec(format!(
            "SOURCE_DATE_EPOCH {} is out of range (at most {})",
            spec.mtime,
            u32::MAX
        )));
    }
    let fs_format = match spec.format {
        Format::Erofs => Some(FsFormat::Erofs),
        Format::Ext4 => Some(FsFormat::Ext4),
        Format::Qcow2 => Some(spec.qcow2_fs),
        Format::Initramfs | Format::Squashfs => None,
    };
    if let Some(f) = fs_format {
        fsimage::check_label(f, &spec.label)?;
    }
    let init_path = normalise_abs(&spec.init_path).ok_or_else(|| {
        BakeError::Spec(format!(
            "--init-path {:?}: an absolute path",
            spec.init_path
        ))
    })?;

    // The config, validated by the init's own parser.
    let mut config = spec.config.clone();
    let writable = spec
        .writable
        .clone()
        .unwrap_or_else(|| default_writable(spec));
    config.root.writable = writable
        .iter()
        .map(|w| {
            TargetPath::try_from(w.clone())
                .map_err(|e| BakeError::Spec(format!("writable location: {e}")))
        })
        .collect::<Result<_, _>>()?;
    if spec.stage1 {
        let root = spec
            .stage1_root
            .clone()
            .map(|r| RootSpec::try_from(r).map_err(|e| BakeError::Spec(format!("--root: {e}"))))
            .transpose()?;
        config.stage1 = Some(Stage1 {
            root,
            ..config.stage1.clone().unwrap_or_default()
        });
    }
    let mut config_text =
        String::from("# Written by bootlace-image bake; see docs/boot.md for the schema.\n");
    config_text.push_str(&config.to_toml());
    InitConfig::from_toml(&config_text, Path::new(CONFIG_PATH)).map_err(BakeError::Config)?;
    config
        .validate()
        .map_err(|e| BakeError::Config(ConfigError::from(e)))?;
    let plan = initramfs::module_plan(&config, spec.modules.as_ref())?;

    // The work directory beside the output.
    let out_dir = match spec.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let out_name = spec
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            BakeError::Spec(format!("--out {}: no UTF-8 file name", spec.out.display()))
        })?
        .to_owned();
    let out_err = |source| BakeError::Output {
        path: spec.out.clone(),
        source,
    };
    if let (Some(input), Some(InputKind::Dir | InputKind::Oci)) = (&spec.input, input_kind) {
        // The work directory (and the image) would end up inside the tree being read.
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        if canon(&out_dir).starts_with(canon(input)) {
            return Err(BakeError::Spec(format!(
                "--out {} is inside the input directory {}",
                spec.out.display(),
                input.display()
            )));
        }
    }
    let work = tempfile::Builder::new()
        .prefix(".bootlace-bake.")
        .tempdir_in(&out_dir)
        .map_err(out_err)?;
    let root_dir = work.path().join("root");
    std::fs::create_dir(&root_dir).map_err(out_err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&root_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(out_err)?;
    }
    let root = Confined::open(&root_dir)?;
    let image = work.path().join("image");
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let (made, dir_digest) = std::thread::scope(|s| {
        // A directory input's digest reads every file: done beside staging and the image tool.
        let digest_job = match (&spec.input, input_kind) {
            (Some(p), Some(InputKind::Dir)) => {
                let cancel = &cancel;
                Some(s.spawn(move || stage::digest_dir(p, cancel)))
            }
            _ => None,
        };
        let made = (|| -> Result<Made, BakeError> {
            let started = Instant::now();

            // 1. The input.
            let mut inputs = Vec::new();
            let mut layers = Vec::new();
            let mut input_stats = stage::Stats::default();
            if let (Some(path), Some(kind)) = (&spec.input, input_kind) {
                let shown = path.display().to_string();
                let digest = match kind {
                    InputKind::Dir => {
                        // The digest is computed beside, in its own thread.
                        let mut w = Writer::new(&root, format!("directory {shown}"), false);
                        stage::mirror_dir(&mut w, path)?;
                        input_stats = w.stats();
                        String::new()
                    }
                    InputKind::Tar => {
                        let (digest, stats) = stage_tarball(&root, path)?;
                        input_stats = stats;
                        digest
                    }
                    InputKind::Oci => {
                        let image = Image::open(path, spec.oci_ref.as_deref())?;
                        let cache = spec.cache.as_deref().map(LayerCache::open).transpose()?;
                        image.apply(&root, cache.as_ref(), &mut |digest, cached| {
                            progress(&format!(
                                "layer {digest} {}",
                                if cached { "cached" } else { "unpacked" }
                            ));
                            layers.push((digest.to_owned(), cached));
                        })?;
                        image.manifest_digest.clone()
                    }
                };
                inputs.push(Input {
                    kind,
                    path: shown,
                    digest,
                });
            }

            // 2. What the init needs.
            let mut w = Writer::new(&root, "bake", false);
            let mut dirs: Vec<(&str, u32)> = vec![
                ("dev", 0o755),
                ("proc", 0o755),
                ("sys", 0o755),
                ("run", 0o755),
                ("tmp", 0o1777),
                (".bootstrap", 0o700),
                ("etc/bootlace", 0o755),
            ];
            for wdir in &writable {
                dirs.push((wdir.trim_start_matches('/'), 0o755));
            }
            for (d, mode) in dirs {
                w.ensure_dir(d, &Meta::root(mode))?;
            }
            let mut init_file = File::open(&spec.init).map_err(|source| BakeError::Init {
                path: spec.init.clone(),
                source,
            })?;
            let mut hashing = Hashing {
                inner: &mut init_file,
                hash: Sha256::new(),
            };
            w.put(&init_path, Kind::File(&mut hashing), &Meta::root(0o755))?;
            let init_sha = hex(&hashing.hash.finalize());
            if spec.format == Format::Initramfs {
                w.put(
                    "init",
                    Kind::Symlink(format!("/{init_path}")),
                    &Meta::root(0o777),
                )?;
            }
            w.put(
                CONFIG_PATH.trim_start_matches('/'),
                Kind::File(&mut config_text.as_bytes()),
                &Meta::root(0o644),
            )?;
            for (path, host) in &plan.files {
                let mut f = File::open(host).map_err(|source| BakeError::InputIo {
                    path: host.clone(),
                    source,
                })?;
                w.put(path, Kind::File(&mut f), &Meta::root(0o644))?;
            }
            if let Some((path, text)) = &plan.dep {
                w.put(path, Kind::File(&mut text.as_bytes()), &Meta::root(0o644))?;
            }
            drop(w);
            let staging_time = started.elapsed();

            // 3. The image.
            let started = Instant::now();
            let opts = FsOptions {
                keep_owners: !spec.all_root,
                xattrs: true,
                // The image is synced once, when it is hashed.
                skip_sync: true,
            };
            let mut tool_versions = BTreeMap::new();
            let mut record_tool = |t: &str| {
                if let Some(v) = fsimage::tool_version(t) {
                    tool_versions.insert(t.to_owned(), v);
                }
            };
            match spec.format {
                Format::Initramfs => write_initramfs(spec, &root_dir, &image)?,
                Format::Erofs | Format::Ext4 => {
                    let format = fs_format.unwrap_or(FsFormat::Erofs);
                    fsimage::make_image_with(
                        &FsSpec {
                            dir: &root_dir,
                            label: &spec.label,
                            mtime: spec.mtime,
                            format,
                        },
                        opts,
                        &image,
                    )?;
                    record_tool(if format == FsFormat::Ext4 {
                        "mke2fs"
                    } else {
                        "mkfs.erofs"
                    });
                }
                Format::Squashfs => {
                    fsimage::make_squashfs(&root_dir, spec.mtime, opts, &image)?;
                    record_tool("mksquashfs");
                }
                Format::Qcow2 => {
                    let raw = work.path().join("raw");
                    fsimage::make_image_with(
                        &FsSpec {
                            dir: &root_dir,
                            label: &spec.label,
                            mtime: spec.mtime,
                            format: spec.qcow2_fs,
                        },
                        opts,
                        &raw,
                    )?;
                    fsimage::convert_qcow2(&raw, opts, &image)?;
                    let _ = std::fs::remove_file(&raw);
                    record_tool(if spec.qcow2_fs == FsFormat::Ext4 {
                        "mke2fs"
                    } else {
                        "mkfs.erofs"
                    });
                    record_tool("qemu-img");
                }
            }
            let image_time = started.elapsed();
            Ok(Made {
                inputs,
                layers,
                input_stats,
                init_sha,
                tool_versions,
                staging_time,
                image_time,
            })
        })();
        if made.is_err() {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        (made, digest_job.map(|j| j.join()))
    });
    let Made {
        mut inputs,
        layers,
        input_stats,
        init_sha,
        tool_versions,
        staging_time,
        image_time,
    } = made?;
    if let (Some(job), Some(path)) = (dir_digest, &spec.input) {
        let digest = job
            .map_err(|_| BakeError::Spec("the input digest thread panicked".to_owned()))?
            .map_err(|source| BakeError::InputIo {
                path: path.clone(),
                source,
            })?;
        if let Some(i) = inputs.first_mut() {
            i.digest = digest;
        }
    }

    // 4. Metadata, then both into place. The image is hashed while it is synced and the
    // staging tree removed.
    let started = Instant::now();
    let (hashed, synced) = std::thread::scope(|s| {
        let hash = s.spawn(|| hash_file(&image));
        s.spawn(|| {
            if let Err(e) = std::fs::remove_dir_all(&root_dir) {
                log::warn!("remove {}: {e}", root_dir.display());
            }
        });
        let synced = File::open(&image).and_then(|f| f.sync_all());
        (hash.join(), synced)
    });
    synced.map_err(out_err)?;
    let (sha256, size) = hashed
        .map_err(|_| out_err(io::Error::other("the hashing thread panicked")))?
        .map_err(out_err)?;
    let meta = ImageMeta {
        schema: meta::SCHEMA,
        name: spec.name.clone().unwrap_or_else(|| {
            Path::new(&out_name)
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or(&out_name)
                .to_owned()
        }),
        version: spec.version.clone(),
        format: spec.format,
        file: out_name.clone(),
        sha256,
        size,
        fstype: spec.fstype(),
        label: fs_format.map(|_| spec.label.clone()),
        stage1: spec.stage1,
        read_only: spec.read_only(),
        writable: writable.clone(),
        inputs,
        init: InitInfo {
            path: format!("/{init_path}"),
            version: init_version(&spec.init),
            sha256: init_sha,
        },
        kernel_release: plan.release.clone().filter(|_| !plan.names.is_empty()),
        modules: plan.names.clone(),
        source_date_epoch: spec.mtime,
        built: meta::rfc3339(spec.mtime),
        tool_versions,
    };
    let meta_tmp = work.path().join("meta.json");
    write_meta(&meta, &meta_tmp)?;
    let meta_path = ImageMeta::path_for(&spec.out);
    std::fs::rename(&image, &spec.out).map_err(out_err)?;
    if let Err(source) = std::fs::rename(&meta_tmp, &meta_path) {
        let _ = std::fs::remove_file(&spec.out);
        return Err(BakeError::Output {
            path: meta_path,
            source,
        });
    }
    if let Err(e) = File::open(&out_dir).and_then(|d| d.sync_all()) {
        log::warn!("fsync {}: {e}", out_dir.display());
    }
    let finish_time = started.elapsed();
    Ok(Report {
        meta,
        meta_path,
        layers,
        input_stats,
        staging_time,
        image_time,
        finish_time,
    })
}

/// Writes metadata atomically: a temporary file in the same directory, synced, renamed.
pub fn write_meta(meta: &ImageMeta, path: &Path) -> Result<(), MetaError> {
    use std::io::Write as _;
    let err = |source| MetaError::Io {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bootlace-meta.")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(meta.to_json().as_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
            .map_err(err)?;
    }
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// `/sbin/x` or `sbin/x` -> `sbin/x`; `None` for the root, `..` or empty components.
fn normalise_abs(p: &str) -> Option<String> {
    let rel = p.strip_prefix('/')?;
    stage::normalise(rel.as_bytes()).ok().flatten()
}

/// Unpacks a tarball (tar, gzip or zstd by its first bytes) into the staging tree; returns the
/// file's digest.
fn stage_tarball(root: &Confined, path: &Path) -> Result<(String, stage::Stats), BakeError> {
    use bootlace_contract::compression::{sniff, Compression};
    let io_err = |source| BakeError::InputIo {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut h = Hashing {
        inner: BufReader::with_capacity(256 * 1024, file),
        hash: Sha256::new(),
    };
    let head = h.inner.fill_buf().map_err(io_err)?;
    let compression = sniff(head);
    if compression == Compression::None && head.get(257..262) != Some(b"ustar".as_slice()) {
        return Err(BakeError::Input {
            path: path.to_owned(),
            message: "not a tarball: no gzip or zstd magic and no ustar header".to_owned(),
        });
    }
    let origin = format!("tarball {}", path.display());
    let mut w = Writer::new(root, origin.clone(), false);
    oci::unpack_stream(&mut w, &mut h, compression, &origin)?;
    io::copy(&mut h, &mut io::sink()).map_err(io_err)?;
    Ok((format!("sha256:{}", hex(&h.hash.finalize())), w.stats()))
}

fn write_initramfs(spec: &BakeSpec, root: &Path, out: &Path) -> Result<(), BakeError> {
    let err = |source| BakeError::Output {
        path: spec.out.clone(),
        source,
    };
    let mut tree = Tree::new();
    tree.add_host_dir(root, !spec.all_root)
        .map_err(|e| err(io::Error::other(e.to_string())))?;
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    tree.put("dev/console", Node::root(Content::CharDev(5, 1), 0o600))
        .map_err(|e| err(io::Error::other(e.to_string())))?;
    let mtime = spec.mtime as u32;
    let file = File::create(out).map_err(err)?;
    let buf = BufWriter::with_capacity(1 << 20, file);
    let buf = match spec.compress {
        Compression::None => initramfs::write_cpio(&tree, mtime, buf).map_err(err)?,
        Compression::Gzip => {
            let gz = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(3)
                .write(buf, flate2::Compression::default());
            initramfs::write_cpio(&tree, mtime, gz)
                .and_then(|gz| gz.finish())
                .map_err(err)?
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(buf, ZSTD_LEVEL).map_err(err)?;
            enc.include_checksum(true).map_err(err)?;
            initramfs::write_cpio(&tree, mtime, enc)
                .and_then(|enc| enc.finish())
                .map_err(err)?
        }
    };
    // Synced when it is hashed.
    drop(buf.into_inner().map_err(|e| err(e.into_error()))?);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644)).map_err(err)
}

/// sha256 hex and size of a file.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let n = io::copy(&mut f, &mut h)?;
    Ok((hex(&h.finalize()), n))
}

/// `bootlace-init --version` of the binary (`0.1.0`), run with a 5 s limit; `unknown` when it
/// cannot be run here (another architecture, a stand-in).
fn init_version(init: &Path) -> String {
    let unknown = || "unknown".to_owned();
    let Ok(mut child) = std::process::Command::new(init)
        .arg("--version")
        .env_clear()
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return unknown();
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return unknown();
            }
        }
    }
    let mut out = String::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_string(&mut out);
    }
    out.lines()
        .next()
        .and_then(|l| l.strip_prefix("bootlace-init "))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(unknown)
}
