//! `bootlace-image bake`: a root filesystem (directory, tarball or OCI layout), `bootlace-init`,
//! its config and the kernel modules it needs -> an image (initramfs, erofs, ext4, squashfs or
//! qcow2) with a metadata file beside it.
//!
//! [`bake`] is five steps, one function each, inside a work directory created next to the
//! output (so renames stay on one filesystem) and removed on every path:
//! 1. [`validate`]: the flags against the format, the init binary, the input's kind, the
//!    config (validated as the init will), the kernel modules it needs — before any work;
//! 2. [`stage_input`]: a directory input is used where it is (never written to); a tarball is
//!    unpacked and OCI layers applied into `work/root` ([`crate::stage`], [`crate::oci`]); its
//!    entries, bytes and compression ratio held to the bake limits ([`crate::limits`]);
//! 3. [`add_payload`]: what the init needs, as an in-memory tree resolved through the input's
//!    own symlinks ([`crate::additions`]): the mount points (`/proc /sys /dev /run /tmp`,
//!    `/.bootstrap` 0700 — a read-only root cannot get them at boot), the writable
//!    directories, the init binary (0755), `/etc/bootlace/init.toml` and the kernel-module
//!    closure under `/lib/modules/<release>`;
//! 4. [`make_image`]: an initramfs is written straight from the input and the additions,
//!    merged while writing ([`crate::initramfs`]). For the other formats the additions are
//!    written to `work/additions` and the image tool reads the input and them together: through
//!    a read-only overlay mount ([`crate::overlay`]) for a directory input, else — not root,
//!    the mount refused, or [`StagingMode::Mirror`] — through a mirror of the input made of
//!    hard links with the additions placed in it (a tarball's or layers' tree gets them placed
//!    in it directly). The tool's arguments are reproducible: see [`crate::fsimage`];
//! 5. [`publish`]: the image is hashed and synced, its metadata ([`ImageMeta`]) written, then
//!    the image is renamed to the output path and the metadata beside it.
//!
//! A directory input's digest is computed beside steps 2-4, in its own thread. On any error the
//! output path and the metadata path are left as they were and nothing else remains.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bootlace_contract::config::{
    unpacked_marker, ConfigError, InitConfig, RootSpec, Stage1, TargetPath, CONFIG_PATH,
};
use bootlace_contract::digest::{self, HashingReader};
use bootlace_contract::fs::FsType;
use bootlace_contract::image::{self as meta, ImageMeta, InitInfo, Input, InputKind, MetaError};
use bootlace_contract::types::InvalidValue;

use crate::additions::{AddError, Additions, Content, Node};
use crate::depmod::{self, DepmodError};
use crate::disk::{DiskError, DiskOptions};
use crate::fsimage::{self, FsImageError, FsOptions, FsSpec};
use crate::initramfs::{
    self, Archive, ArchiveError, ArchiveSummary, ModuleError, ModulePlan, Modules,
};
use crate::limits::{self, Budget, CountError, LimitError, Limits};
use crate::need;
use crate::oci::{self, Image, LayerCache, OciError};
use crate::ociconfig::{self, ImageConfigError, ImageConfigUse};
use crate::overlay::{self, Overlay};
use crate::path::{normalise, Anchor, BadPath};
use crate::progress::{CountingReader, Progress};
use crate::stage::{self, Confined, Meta, StageError, Writer};

pub use bootlace_contract::compression::Compression;
pub use bootlace_contract::image::Format;

/// The writable locations of a read-only root by default.
pub const DEFAULT_WRITABLE: &[&str] = &["/etc", "/var", "/tmp", "/home"];

/// The default filesystem label of root images.
pub const DEFAULT_LABEL: &str = "bootlace-root";

/// The mount points every image gets (when missing), with their modes.
const MOUNT_POINTS: &[(&str, u32)] = &[
    ("dev", 0o755),
    ("proc", 0o755),
    ("sys", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    (".bootstrap", 0o700),
    ("etc/bootlace", 0o755),
];

/// How a directory input may be staged for the disk formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StagingMode {
    /// A read-only overlay of the additions over the input when it can be mounted (root), else
    /// a mirror.
    #[default]
    Auto,
    /// Always a mirror of the input (hard links) with the additions placed in it.
    Mirror,
}

impl std::str::FromStr for StagingMode {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        match s {
            "auto" => Ok(StagingMode::Auto),
            "mirror" => Ok(StagingMode::Mirror),
            _ => Err(InvalidValue::new("staging", s, "expected auto or mirror")),
        }
    }
}

/// How the tree the image was made from was put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Staging {
    /// Nothing staged: the input and the additions merged while the initramfs was written.
    Merged,
    /// A read-only overlay mount of the additions over the input directory.
    Overlay,
    /// A mirror of the input directory (hard links) with the additions placed in it.
    Mirror,
    /// A tarball or OCI layers unpacked into a staging tree, the additions placed in it (or,
    /// for an initramfs, merged while writing).
    Unpacked,
}

impl Staging {
    /// Its name: `merged`, `overlay`, `mirror`, `unpacked`.
    pub fn as_str(self) -> &'static str {
        match self {
            Staging::Merged => "merged",
            Staging::Overlay => "overlay",
            Staging::Mirror => "mirror",
            Staging::Unpacked => "unpacked",
        }
    }
}

/// Everything a bake is made from.
#[derive(Debug, Clone)]
pub struct BakeSpec {
    /// The output format.
    pub format: Format,
    /// The output file; the metadata goes beside it (`<out>.meta.json`).
    pub out: PathBuf,
    /// The root filesystem: a directory, a tarball or an OCI layout. Required but for an
    /// initramfs (the init alone boots); none for `stage1`.
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
    /// The stage-1 root (`LABEL=…`, `PARTUUID=…`, `PARTLABEL=…` or `/dev/…`); the kernel
    /// command line may give it instead.
    pub stage1_root: Option<String>,
    /// Where the kernel modules come from (needed when the config needs modules).
    pub modules: Option<Modules>,
    /// Make every file root-owned (default: keep the input's owners).
    pub all_root: bool,
    /// The filesystem label of erofs/ext4 images (and of the filesystem inside a qcow2);
    /// `None`: [`DEFAULT_LABEL`]. Refused for formats without a label.
    pub label: Option<String>,
    /// Compression of an initramfs; `None`: gzip. Refused for the other formats.
    pub compress: Option<Compression>,
    /// The filesystem inside a qcow2 image (erofs or ext4); `None`: erofs. Refused for the
    /// other formats.
    pub qcow2_fs: Option<FsType>,
    /// How a directory input is staged for the disk formats.
    pub staging: StagingMode,
    /// Image name for the metadata (default: the output's file stem).
    pub name: Option<String>,
    /// Image version for the metadata.
    pub version: String,
    /// The layer cache directory (`None`: no cache, layers unpacked straight into staging).
    pub cache: Option<PathBuf>,
    /// SOURCE_DATE_EPOCH: every timestamp in the image.
    pub mtime: u64,
    /// How much of the input the bake reads before it refuses it (see [`crate::limits`]).
    pub limits: Limits,
    /// Whether and how an OCI image's config (Entrypoint, Cmd, Env, WorkingDir, User) makes
    /// the hand-off (see [`crate::ociconfig`]).
    pub image_config: ImageConfigUse,
    /// A bootable disk's root filesystem, container, kernel and partitions (refused, but for
    /// the defaults, with other formats).
    pub disk: DiskOptions,
}

impl BakeSpec {
    /// A spec with the defaults: `/sbin/bootlace-init`, default config, format-default
    /// writable locations, no flag given for label, compression or qcow2 filesystem (their
    /// defaults: `bootlace-root`, gzip, erofs), version "0", no cache.
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
            label: None,
            compress: None,
            qcow2_fs: None,
            staging: StagingMode::Auto,
            name: None,
            version: "0".to_owned(),
            cache: None,
            mtime: 0,
            limits: Limits::default(),
            image_config: ImageConfigUse::default(),
            disk: DiskOptions::default(),
        }
    }

    /// The filesystem inside the output (`None` for an initramfs).
    pub fn fstype(&self) -> Option<FsType> {
        let inner = match self.format {
            Format::Disk => self.disk.fs,
            _ => self.qcow2_fs.unwrap_or(FsType::Erofs),
        };
        self.format.fstype(inner)
    }

    /// The labelled filesystem a tool makes (erofs, ext4, the one inside a qcow2); `None` for
    /// an initramfs and squashfs, which have no label.
    pub fn labelled_fs(&self) -> Option<FsType> {
        self.fstype().filter(|f| f.max_label_bytes() > 0)
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
    /// A flag given for a format it does not apply to.
    #[error("{flag} does not apply to --format {format} (only to {applies})")]
    FlagNotForFormat {
        /// The flag.
        flag: &'static str,
        /// The format asked for.
        format: Format,
        /// The formats it applies to.
        applies: &'static str,
    },
    /// The config says `[root] read_only = false` for a root that cannot be written.
    #[error(
        "the config says [root] read_only = false, but a {0} root cannot be written: \
         bake ext4 (--format ext4, or --format qcow2 --qcow2-fs ext4) or leave read_only out"
    )]
    ReadOnlyRoot(FsType),
    /// `--qcow2-fs` names a filesystem a qcow2 is not made of.
    #[error("--qcow2-fs {0}: a qcow2 image holds erofs or ext4")]
    Qcow2Fs(FsType),
    /// `--name`/`--version` do not make a valid `name@version`.
    #[error("--name/--version")]
    ImageName(#[source] bootlace_contract::config::InvalidValue),
    /// `--cmd` for an input that is no OCI layout.
    #[error("--cmd replaces the Cmd of an OCI image: the input is no OCI layout")]
    CmdWithoutImage,
    /// The OCI image's config cannot make the hand-off.
    #[error(transparent)]
    ImageConfig(#[from] Box<ImageConfigError>),
    /// `--stage1` with a format other than initramfs.
    #[error("--stage1 makes an initramfs: use --format initramfs")]
    Stage1Format,
    /// `--root` without `--stage1`.
    #[error("--root is for --stage1 only")]
    RootWithoutStage1,
    /// `--input` with `--stage1`.
    #[error("a stage-1 initramfs takes no --input (it mounts the real root at boot)")]
    InputWithStage1,
    /// No `--input` for a disk format.
    #[error("--input (a rootfs directory, tarball or OCI layout) is required for --format {0}")]
    InputRequired(Format),
    /// The bootable disk could not be made.
    #[error("bootable disk")]
    Disk(#[from] DiskError),
    /// SOURCE_DATE_EPOCH does not fit the formats' 32-bit fields.
    #[error("SOURCE_DATE_EPOCH {0} is out of range (at most {max})", max = u32::MAX)]
    Epoch(u64),
    /// `--init-path` is not an absolute path to a file.
    #[error("--init-path {path:?}: an absolute path to a file")]
    InitPath {
        /// The path given.
        path: String,
        /// What is wrong with it (none: it names the root).
        #[source]
        source: Option<BadPath>,
    },
    /// A writable location is not a valid path.
    #[error("writable location {path:?}")]
    Writable {
        /// The location given.
        path: String,
        /// Why.
        #[source]
        source: InvalidValue,
    },
    /// The stage-1 root is not `LABEL=…`, `PARTUUID=…`, `PARTLABEL=…` or `/dev/…`.
    #[error("--root {root:?}")]
    Stage1Root {
        /// The value given.
        root: String,
        /// Why.
        #[source]
        source: InvalidValue,
    },
    /// The output path has no UTF-8 file name.
    #[error("--out {}: no UTF-8 file name", .0.display())]
    OutName(PathBuf),
    /// The output is inside the directory being read.
    #[error("--out {} is inside the input directory {}", out.display(), input.display())]
    OutInsideInput {
        /// The output.
        out: PathBuf,
        /// The input.
        input: PathBuf,
    },
    /// The init binary is missing or not a regular file.
    #[error("init binary {}", path.display())]
    Init {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input is missing.
    #[error("input {}", path.display())]
    InputMissing {
        /// The path given.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input is neither a directory nor a file.
    #[error("input {}: neither a directory nor a file", .0.display())]
    InputKind(PathBuf),
    /// A file input that is no tarball.
    #[error("input {}: not a tarball: no gzip or zstd magic and no ustar header", .0.display())]
    NotATarball(PathBuf),
    /// Reading the input failed.
    #[error("input {}", path.display())]
    InputIo {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper thread of the bake panicked.
    #[error("the {0} thread panicked")]
    Thread(&'static str),
    /// A bake limit was reached: the input, the limit and the flag that raises it.
    #[error(transparent)]
    Limit(#[from] LimitError),
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
    Modules(#[from] ModuleError),
    /// What the bake adds could not be placed.
    #[error("add the init, its config and modules")]
    Additions(#[from] AddError),
    /// The kernel-module indexes could not be made.
    #[error("kernel-module indexes")]
    Depmod(#[from] DepmodError),
    /// Writing the initramfs failed.
    #[error("write the initramfs")]
    Archive(#[from] ArchiveError),
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

/// SOURCE_DATE_EPOCH in the environment is not a timestamp the images can hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SOURCE_DATE_EPOCH={0:?} is not a timestamp (seconds since 1970, at most {max})", max = u32::MAX)]
pub struct BadEpoch(pub String);

/// SOURCE_DATE_EPOCH from the environment, or 0.
pub fn source_date_epoch() -> Result<u64, BadEpoch> {
    match std::env::var("SOURCE_DATE_EPOCH") {
        Err(_) => Ok(0),
        Ok(v) => v
            .trim()
            .parse::<u32>()
            .map(u64::from)
            .map_err(|_| BadEpoch(v)),
    }
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
    /// What staging placed (a tarball's or layers' entries, a mirror's; nothing for an
    /// overlay or a merged initramfs).
    pub input_stats: stage::Stats,
    /// How the tree the image was made from was put together.
    pub staging: Staging,
    /// Time spent staging (input + bake additions, the overlay mount or the mirror).
    pub staging_time: Duration,
    /// Time spent in the image tool (and compression).
    pub image_time: Duration,
    /// Time spent hashing and syncing the image and writing the metadata.
    pub finish_time: Duration,
}

/// The kind of input at `path`: an OCI layout (a directory with `oci-layout`), a directory,
/// or a tarball (a file: tar, gzip or zstd by its first bytes).
pub fn input_kind(path: &Path) -> Result<InputKind, BakeError> {
    let meta = std::fs::metadata(path).map_err(|source| BakeError::InputMissing {
        path: path.to_owned(),
        source,
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
        Err(BakeError::InputKind(path.to_owned()))
    }
}

/// Bakes, silently. `notes` gets one line per notable event (an OCI layer cached or unpacked).
pub fn bake(spec: &BakeSpec, notes: &mut dyn FnMut(&str)) -> Result<Report, BakeError> {
    bake_with(spec, &Progress::new(), notes)
}

/// Bakes, counting what is done into `progress`: the five steps.
pub fn bake_with(
    spec: &BakeSpec,
    progress: &Progress,
    notes: &mut dyn FnMut(&str),
) -> Result<Report, BakeError> {
    progress.phase("validate");
    let plan = validate(spec)?;
    let work = Work::beside(&plan.out_dir)?;
    let cancel = AtomicBool::new(false);
    let (made, digest) = std::thread::scope(|s| {
        // A directory input's digest reads every file: done beside the other steps.
        let digest = plan
            .dir_input()
            .map(|dir| s.spawn(|| stage::digest_dir(dir, &cancel)));
        let made = stage_input(spec, &plan, &work, progress, notes).and_then(|staged| {
            let payload = add_payload(spec, &plan, &staged, &work, notes)?;
            make_image(spec, &plan, &work, staged, &payload, progress)
        });
        if made.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        (made, digest.map(|job| job.join()))
    });
    let made = with_input_digest(made?, digest, &plan)?;
    publish(spec, &plan, work, made, progress)
}

// ---------------------------------------------------------------------------------------------
// 1. Validate

/// What the bake will do, checked before any work.
#[derive(Debug)]
struct Plan {
    /// The input and its kind.
    input: Option<(PathBuf, InputKind)>,
    /// Where the init goes (normalised: `sbin/bootlace-init`).
    init_path: String,
    /// The writable locations baked into the config.
    writable: Vec<String>,
    /// The config to bake, before the OCI image's config is applied to it.
    config: InitConfig,
    /// An OCI layout input, opened (its index, manifest and config read and checked).
    oci: Option<Image>,
    /// The initramfs's last entry, relative (`[root] unpacked_marker`).
    marker: Option<String>,
    /// The kernel modules to copy.
    modules: ModulePlan,
    /// The labelled filesystem and its label (erofs, ext4, the one in a qcow2).
    labelled: Option<(FsType, String)>,
    /// The initramfs compression.
    compression: Compression,
    /// The output's directory and file name.
    out_dir: PathBuf,
    out_name: String,
}

impl Plan {
    fn dir_input(&self) -> Option<&Path> {
        match &self.input {
            Some((p, InputKind::Dir)) => Some(p),
            _ => None,
        }
    }
}

/// Step 1: everything that can be checked before any work.
fn validate(spec: &BakeSpec) -> Result<Plan, BakeError> {
    check_flags(spec)?;
    check_init(&spec.init)?;
    let input = input_of(spec)?;
    let init_path = match normalise(spec.init_path.as_bytes(), Anchor::Absolute) {
        Ok(Some(p)) => p,
        Ok(None) => return Err(init_path_err(spec, None)),
        Err(e) => return Err(init_path_err(spec, Some(e))),
    };
    let labelled = match spec.labelled_fs() {
        Some(fs) => {
            let label = spec.label.as_deref().unwrap_or(DEFAULT_LABEL);
            fsimage::check_label(fs, label)?;
            Some((fs, label.to_owned()))
        }
        None => None,
    };
    let (writable, config) = config_of(spec)?;
    let marker = config
        .root
        .unpacked_marker
        .as_ref()
        .map(|m| m.relative().to_owned());
    let modules = initramfs::module_plan(&config, spec.modules.as_ref())?;
    let (out_dir, out_name) = out_paths(spec, input.as_ref())?;
    config_text(&config)?;
    let oci = match &input {
        Some((layout, InputKind::Oci)) => {
            Some(Image::open(layout, spec.oci_ref.as_deref(), &spec.limits)?)
        }
        _ if spec.image_config.cmd.is_some() => return Err(BakeError::CmdWithoutImage),
        _ => None,
    };
    Ok(Plan {
        input,
        init_path,
        writable,
        config,
        oci,
        marker,
        modules,
        labelled,
        compression: spec.compress.unwrap_or(Compression::Gzip),
        out_dir,
        out_name,
    })
}

fn init_path_err(spec: &BakeSpec, source: Option<BadPath>) -> BakeError {
    BakeError::InitPath {
        path: spec.init_path.clone(),
        source,
    }
}

/// The flags against the format: each given for a format it does not apply to is refused.
fn check_flags(spec: &BakeSpec) -> Result<(), BakeError> {
    let format = spec.format;
    let refuse = |flag, applies| BakeError::FlagNotForFormat {
        flag,
        format,
        applies,
    };
    if spec.compress.is_some() && format != Format::Initramfs {
        return Err(refuse("--compress", "initramfs"));
    }
    match spec.qcow2_fs {
        Some(_) if format != Format::Qcow2 => return Err(refuse("--qcow2-fs", "qcow2")),
        Some(fs @ (FsType::Vfat | FsType::Iso9660 | FsType::Squashfs)) => {
            return Err(BakeError::Qcow2Fs(fs))
        }
        _ => {}
    }
    if spec.label.is_some() && spec.labelled_fs().is_none() {
        let applies = "erofs, ext4 and qcow2: initramfs and squashfs have no label";
        return Err(refuse("--root-label", applies));
    }
    if format != Format::Disk && spec.disk != DiskOptions::default() {
        return Err(refuse(
            "--disk-fs, --disk-format, --kernel, --efi-stub, --kernel-arg, --esp-size or --data-size",
            "disk",
        ));
    }
    if format == Format::Disk && !matches!(spec.disk.fs, FsType::Erofs | FsType::Ext4) {
        return Err(DiskError::RootFs(spec.disk.fs).into());
    }
    if spec.stage1 && format != Format::Initramfs {
        return Err(BakeError::Stage1Format);
    }
    if !spec.stage1 && spec.stage1_root.is_some() {
        return Err(BakeError::RootWithoutStage1);
    }
    if spec.mtime > u64::from(u32::MAX) {
        return Err(BakeError::Epoch(spec.mtime));
    }
    Ok(())
}

fn check_init(init: &Path) -> Result<(), BakeError> {
    let err = |source| BakeError::Init {
        path: init.to_owned(),
        source,
    };
    if !std::fs::metadata(init).map_err(err)?.is_file() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(())
}

/// The input and its kind: required but for an initramfs, refused for stage 1.
fn input_of(spec: &BakeSpec) -> Result<Option<(PathBuf, InputKind)>, BakeError> {
    match (&spec.input, spec.stage1) {
        (Some(_), true) => Err(BakeError::InputWithStage1),
        (None, false) if spec.format != Format::Initramfs => {
            Err(BakeError::InputRequired(spec.format))
        }
        (None, _) => Ok(None),
        (Some(p), false) => Ok(Some((p.clone(), input_kind(p)?))),
    }
}

/// The config to bake (writable locations and stage 1 set from the spec), validated as the
/// init validates it; with the writable locations.
fn config_of(spec: &BakeSpec) -> Result<(Vec<String>, InitConfig), BakeError> {
    let mut config = spec.config.clone();
    // A named image says its name to the host in HELLO (`IMAGE`); an unnamed one keeps its
    // bytes independent of the output's file name.
    if let Some(name) = &spec.name {
        config.image = Some(
            bootlace_contract::config::ImageRef::new(name, &spec.version)
                .map_err(BakeError::ImageName)?,
        );
    }
    let writable = spec
        .writable
        .clone()
        .unwrap_or_else(|| default_writable(spec));
    config.root.writable = writable
        .iter()
        .map(|w| {
            TargetPath::try_from(w.clone()).map_err(|source| BakeError::Writable {
                path: w.clone(),
                source,
            })
        })
        .collect::<Result<_, _>>()?;
    if spec.format == Format::Initramfs {
        config.root.read_only = None;
        config.root.unpacked_marker = Some(unpacked_marker());
    } else if let Some(fs) = spec.fstype() {
        // Stage 1 mounts the root as this says (the kernel's rw/ro aside).
        if config.root.read_only == Some(false) && spec.read_only() {
            return Err(BakeError::ReadOnlyRoot(fs));
        }
        config.root.read_only = Some(config.root.read_only.unwrap_or(spec.read_only()));
        config.root.unpacked_marker = None;
    }
    if spec.stage1 {
        let root = spec
            .stage1_root
            .clone()
            .map(|r| {
                RootSpec::try_from(r.clone())
                    .map_err(|source| BakeError::Stage1Root { root: r, source })
            })
            .transpose()?;
        config.stage1 = Some(Stage1 {
            root,
            ..config.stage1.clone().unwrap_or_default()
        });
    }
    config
        .validate()
        .map_err(|e| BakeError::Config(ConfigError::from(e)))?;
    if config.vsock_trusts_only_boot_digests() {
        log::warn!(
            "the vsock source has nothing baked to trust a bundle by (no --digest, --trust-key \
             or --trust-host): the guest takes a bundle only by a digest given at boot \
             (bootlace.digest=, SMBIOS type 11 io.bootlace.digest, fw_cfg \
             opt/io.bootlace/digest) and refuses it otherwise"
        );
    }
    Ok((writable, config))
}

/// `/etc/bootlace/init.toml` as written, read back by the init's own parser first.
fn config_text(config: &InitConfig) -> Result<String, BakeError> {
    let mut text =
        String::from("# Written by bootlace-image bake; see docs/boot.md for the schema.\n");
    text.push_str(&config.to_toml());
    InitConfig::from_toml(&text, Path::new(CONFIG_PATH)).map_err(BakeError::Config)?;
    Ok(text)
}

/// The output's directory and file name; an output inside a directory input is refused (the
/// bake would read its own work).
fn out_paths(
    spec: &BakeSpec,
    input: Option<&(PathBuf, InputKind)>,
) -> Result<(PathBuf, String), BakeError> {
    let out_dir = match spec.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let out_name = spec
        .out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| BakeError::OutName(spec.out.clone()))?
        .to_owned();
    if let Some((input, InputKind::Dir | InputKind::Oci)) = input {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
        if canon(&out_dir).starts_with(canon(input)) {
            return Err(BakeError::OutInsideInput {
                out: spec.out.clone(),
                input: input.clone(),
            });
        }
    }
    Ok((out_dir, out_name))
}

/// The work directory beside the output: removed when dropped.
#[derive(Debug)]
struct Work {
    dir: tempfile::TempDir,
}

impl Work {
    fn beside(out_dir: &Path) -> Result<Work, BakeError> {
        let dir = tempfile::Builder::new()
            .prefix(".bootlace-bake.")
            .tempdir_in(out_dir)
            .map_err(|source| BakeError::Output {
                path: out_dir.to_owned(),
                source,
            })?;
        Ok(Work { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The image being made.
    fn image(&self) -> PathBuf {
        self.path("image")
    }

    /// Creates `work/name` with `mode`; returns its absolute path.
    fn new_dir(&self, name: &str, mode: u32) -> Result<PathBuf, BakeError> {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        let err = |source| BakeError::Output {
            path: path.clone(),
            source,
        };
        std::fs::create_dir(&path).map_err(err)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        std::fs::canonicalize(&path).map_err(err)
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Stage the input

/// The tree the image is made from, before the additions.
#[derive(Debug)]
struct Staged {
    /// The input directory, or the staging tree a tarball or layers were unpacked into.
    base: Option<PathBuf>,
    /// Whether `base` is the bake's own staging tree (writable) rather than the input.
    unpacked: bool,
    inputs: Vec<Input>,
    layers: Vec<(String, bool)>,
    stats: stage::Stats,
    started: Instant,
}

/// Step 2: a directory input is used where it is; a tarball or an OCI layout is unpacked into
/// `work/root`.
fn stage_input(
    spec: &BakeSpec,
    plan: &Plan,
    work: &Work,
    progress: &Progress,
    notes: &mut dyn FnMut(&str),
) -> Result<Staged, BakeError> {
    progress.phase("stage");
    let mut staged = Staged {
        base: None,
        unpacked: false,
        inputs: Vec::new(),
        layers: Vec::new(),
        stats: stage::Stats::default(),
        started: Instant::now(),
    };
    let Some((path, kind)) = &plan.input else {
        return Ok(staged);
    };
    let budget = Budget::new(spec.limits);
    let digest = match kind {
        InputKind::Dir => {
            count_input_dir(path, &budget)?;
            staged.base = Some(path.clone());
            // Filled in from the digest thread.
            String::new()
        }
        InputKind::Tar | InputKind::Oci => {
            let root_dir = work.new_dir("root", 0o755)?;
            let root = Confined::open(&root_dir)?;
            staged.base = Some(root_dir);
            staged.unpacked = true;
            if *kind == InputKind::Tar {
                let (digest, stats) = stage_tarball(&root, path, &budget, progress)?;
                staged.stats = stats;
                digest
            } else {
                let layers = &mut staged.layers;
                let image = plan
                    .oci
                    .as_ref()
                    .ok_or(BakeError::InputKind(path.clone()))?;
                stage_oci(spec, image, &root, layers, &budget, progress, notes)?
            }
        }
    };
    staged.inputs.push(Input {
        kind: *kind,
        path: path.display().to_string(),
        digest,
    });
    Ok(staged)
}

/// Counts a directory input's entries and bytes against the limits, before any work.
fn count_input_dir(path: &Path, budget: &Budget) -> Result<(), BakeError> {
    let input = format!("directory {}", path.display());
    limits::count_dir(path, budget, &input).map_err(|e| match e {
        CountError::Limit(e) => BakeError::Limit(e),
        CountError::Io { path, source } => BakeError::InputIo { path, source },
    })
}

/// Unpacks a tarball (tar, gzip or zstd by its first bytes) into the staging tree, charging
/// `budget`; returns the file's digest.
fn stage_tarball(
    root: &Confined,
    path: &Path,
    budget: &Budget,
    progress: &Progress,
) -> Result<(String, stage::Stats), BakeError> {
    use bootlace_contract::compression::{is_tar, sniff};
    let io_err = |source| BakeError::InputIo {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut h = HashingReader::new(BufReader::with_capacity(256 * 1024, file));
    let head = h.get_mut().fill_buf().map_err(io_err)?;
    let compression = sniff(head);
    if compression == Compression::None && !is_tar(head) {
        return Err(BakeError::NotATarball(path.to_owned()));
    }
    let origin = format!("tarball {}", path.display());
    let mut w = Writer::new(root, origin.clone(), false)
        .with_progress(progress)
        .with_budget(budget);
    let max_ratio = budget.limits().ratio;
    oci::unpack_stream(&mut w, &mut h, compression, &origin, max_ratio)?;
    io::copy(&mut h, &mut io::sink()).map_err(io_err)?;
    Ok((h.finish().0.to_string(), w.stats()))
}

/// Applies an OCI layout's layers into the staging tree; returns the manifest's digest.
fn stage_oci(
    spec: &BakeSpec,
    image: &Image,
    root: &Confined,
    layers: &mut Vec<(String, bool)>,
    budget: &Budget,
    progress: &Progress,
    notes: &mut dyn FnMut(&str),
) -> Result<String, BakeError> {
    let cache = spec.cache.as_deref().map(LayerCache::open).transpose()?;
    image.apply(
        root,
        cache.as_ref(),
        Some(progress),
        budget,
        &mut |digest, cached| {
            notes(&format!(
                "layer {digest} {}",
                if cached { "cached" } else { "unpacked" }
            ));
            layers.push((digest.to_owned(), cached));
        },
    )?;
    Ok(image.manifest_digest.clone())
}

// ---------------------------------------------------------------------------------------------
// 3. Add the init payload

/// What the bake adds, and the init's digest.
#[derive(Debug)]
struct Payload {
    additions: Additions,
    init_sha: String,
}

/// Step 3: the mount points, the writable directories, the init, its config (with an OCI
/// image's own config applied, read from the staged tree) and the kernel modules, resolved
/// against the staged tree.
fn add_payload(
    spec: &BakeSpec,
    plan: &Plan,
    staged: &Staged,
    work: &Work,
    notes: &mut dyn FnMut(&str),
) -> Result<Payload, BakeError> {
    let mut a = Additions::new(staged.base.as_deref())?;
    let mut config = plan.config.clone();
    if let Some(image) = &plan.oci {
        let how = &spec.image_config;
        let note = ociconfig::apply(&mut config, &image.run, how, &mut a, &image.name);
        if let Some(note) = note.map_err(Box::new)? {
            notes(&note);
        }
    }
    let config_text = config_text(&config)?;
    for (dir, mode) in MOUNT_POINTS {
        a.ensure_dir(dir, &Meta::root(*mode))?;
    }
    for w in &plan.writable {
        a.ensure_dir(w.trim_start_matches('/'), &Meta::root(0o755))?;
    }
    let init = std::fs::read(&spec.init).map_err(|source| BakeError::Init {
        path: spec.init.clone(),
        source,
    })?;
    let init_sha = digest::of_bytes(&init).hex().to_owned();
    a.put(&plan.init_path, Node::root(Content::Bytes(init), 0o755))?;
    if spec.format == Format::Initramfs {
        let target = format!("/{}", plan.init_path);
        a.put("init", Node::root(Content::Symlink(target), 0o777))?;
        // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
        a.put("dev/console", Node::root(Content::CharDev(5, 1), 0o600))?;
    }
    let config = Content::Bytes(config_text.into_bytes());
    a.put(
        CONFIG_PATH.trim_start_matches('/'),
        Node::root(config, 0o644),
    )?;
    add_modules(&mut a, &plan.modules, &work.path("depmod"))?;
    Ok(Payload {
        additions: a,
        init_sha,
    })
}

/// The kernel modules of the plan, merged with the image's own tree for the same release when it
/// has one ([`depmod`]): the image's modules and lines stay, the binary indexes are rewritten.
fn add_modules(a: &mut Additions, modules: &ModulePlan, work: &Path) -> Result<(), BakeError> {
    let (Some(release), Some((dep_path, ours))) = (&modules.release, &modules.dep) else {
        return Ok(());
    };
    let top = format!("lib/modules/{release}");
    let image = match a.input_dir(&top)? {
        Some((fd, host)) => Some(depmod::scan(fd, host)?),
        None => None,
    };
    let mut added = Vec::new();
    for (path, host) in &modules.files {
        let rel = path.strip_prefix(&format!("{top}/")).unwrap_or(path);
        let has = image
            .as_ref()
            .is_some_and(|i| i.files.contains(rel) || i.meta.contains(rel));
        if !has {
            a.put(path, Node::root(Content::HostFile(host.clone()), 0o644))?;
            added.push((rel.to_owned(), host.clone()));
        }
    }
    let dep = match image.as_ref().and_then(|i| i.dep.as_deref()) {
        Some(theirs) => depmod::merged_dep(theirs, ours),
        None => ours.clone(),
    };
    a.put(
        dep_path,
        Node::root(Content::Bytes(dep.into_bytes()), 0o644),
    )?;
    let indexes = match depmod::indexes(release, image.as_ref(), &added, work) {
        Ok(indexes) => indexes,
        // Without an image tree of its own there is nothing stale: the text index serves.
        Err(DepmodError::Spawn(e)) if image.is_none() => {
            log::warn!("depmod cannot run ({e}): the image gets no binary module indexes");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    // modules.devname is read by `kmod static-nodes` alone (systemd's kmod-static-nodes.service
    // runs /bin/kmod when it is not empty): an image without kmod gets none.
    let kmod = a.input_has("bin/kmod")?;
    for (name, file) in indexes {
        if name == "modules.devname" && !kmod {
            continue;
        }
        a.put(
            &format!("{top}/{name}"),
            Node::root(Content::HostFile(file), 0o644),
        )?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Make the image

/// What staging and the image step produced.
#[derive(Debug)]
struct Made {
    inputs: Vec<Input>,
    layers: Vec<(String, bool)>,
    input_stats: stage::Stats,
    init_sha: String,
    tool_versions: BTreeMap<String, String>,
    staging: Staging,
    /// The staging tree to remove (`work/root`), when there is one.
    staged_tree: Option<PathBuf>,
    staging_time: Duration,
    image_time: Duration,
    /// What an initramfs holds.
    archive: Option<ArchiveSummary>,
    /// A bootable disk's partitions and boot path.
    disk: Option<meta::DiskInfo>,
}

/// Step 4: the image at `work/image`, from the staged tree and the additions.
fn make_image(
    spec: &BakeSpec,
    plan: &Plan,
    work: &Work,
    staged: Staged,
    payload: &Payload,
    progress: &Progress,
) -> Result<Made, BakeError> {
    let mut made = Made {
        staging: if staged.unpacked {
            Staging::Unpacked
        } else {
            Staging::Merged
        },
        staged_tree: staged.base.clone().filter(|_| staged.unpacked),
        inputs: staged.inputs,
        layers: staged.layers,
        input_stats: staged.stats,
        init_sha: payload.init_sha.clone(),
        tool_versions: BTreeMap::new(),
        staging_time: Duration::ZERO,
        image_time: Duration::ZERO,
        archive: None,
        disk: None,
    };
    if spec.format == Format::Initramfs {
        made.staging_time = staged.started.elapsed();
        let started = Instant::now();
        progress.phase("initramfs");
        let archive = Archive {
            input: staged.base.as_deref(),
            additions: &payload.additions,
            keep_owners: !spec.all_root,
            mtime: spec.mtime as u32,
            compression: plan.compression,
            progress: Some(progress),
            marker: plan.marker.as_deref(),
        };
        made.archive = Some(initramfs::write_archive(&archive, &work.image())?);
        made.image_time = started.elapsed();
        return Ok(made);
    }
    let base = staged
        .base
        .as_deref()
        .ok_or(BakeError::InputRequired(spec.format))?;
    let root = image_root(spec, work, base, staged.unpacked, payload, progress)?;
    made.staging_time = staged.started.elapsed();
    if let Some(kind) = root.staging {
        made.staging = kind;
    }
    if root.staging == Some(Staging::Mirror) {
        made.input_stats = root.stats;
        made.staged_tree = Some(root.path.clone());
    }
    let started = Instant::now();
    (made.tool_versions, made.disk) = run_image_tool(spec, plan, work, &root.path, progress)?;
    made.image_time = started.elapsed();
    Ok(made)
}

/// The tree a disk image is made from.
#[derive(Debug)]
struct ImageRoot {
    path: PathBuf,
    /// Kept mounted while the tool runs; unmounted when dropped.
    _overlay: Option<Overlay>,
    /// How it was made (`None`: the unpacked tree, as staged).
    staging: Option<Staging>,
    /// What the mirror placed.
    stats: stage::Stats,
}

/// The additions written to `work/additions`, then laid over the input: placed into the
/// unpacked tree; a read-only overlay of the input directory; or a mirror of it.
fn image_root(
    spec: &BakeSpec,
    work: &Work,
    base: &Path,
    unpacked: bool,
    payload: &Payload,
    progress: &Progress,
) -> Result<ImageRoot, BakeError> {
    let dir = work.new_dir("additions", 0o700)?;
    payload.additions.materialize(&dir)?;
    let mut root = ImageRoot {
        path: base.to_owned(),
        _overlay: None,
        staging: None,
        stats: stage::Stats::default(),
    };
    if unpacked {
        payload.additions.apply(&dir, &Confined::open(base)?)?;
        return Ok(root);
    }
    if spec.staging == StagingMode::Auto {
        if let Some(overlay) = try_overlay(work, &dir, base) {
            root.path = overlay.path().to_owned();
            root._overlay = Some(overlay);
            root.staging = Some(Staging::Overlay);
            return Ok(root);
        }
    }
    progress.phase("stage (mirror)");
    root.path = work.new_dir("root", 0o755)?;
    let tree = Confined::open(&root.path)?;
    let origin = format!("directory {}", base.display());
    let mut w = Writer::new(&tree, origin, false).with_progress(progress);
    stage::mirror_dir(&mut w, base)?;
    root.stats = w.stats();
    payload.additions.apply(&dir, &tree)?;
    root.staging = Some(Staging::Mirror);
    Ok(root)
}

/// A read-only overlay of `additions` over `input` at `work/merged`; `None` (logged) when it
/// cannot be mounted.
fn try_overlay(work: &Work, additions: &Path, input: &Path) -> Option<Overlay> {
    if !rustix::process::geteuid().is_root() {
        log::info!("staging: a mirror of the input (an overlay mount needs root)");
        return None;
    }
    let fallback = |why: String| {
        log::warn!("staging: a mirror of the input: {why}");
        None
    };
    let merged = match work.new_dir("merged", 0o755) {
        Ok(m) => m,
        Err(e) => return fallback(bootlace_contract::chain(&e)),
    };
    let input = match std::fs::canonicalize(input) {
        Ok(i) => i,
        Err(e) => return fallback(format!("{}: {e}", input.display())),
    };
    match overlay::find_whiteout(&input) {
        Ok(None) => {}
        Ok(Some(entry)) => {
            return fallback(format!(
                "/{entry} is a character device 0:0, which an overlay would hide"
            ))
        }
        Err(e) => return fallback(format!("{}: {e}", input.display())),
    }
    match Overlay::mount(&[additions, &input], &merged) {
        Ok(o) => {
            log::info!("staging: a read-only overlay of the additions over the input");
            Some(o)
        }
        Err(e) => fallback(bootlace_contract::chain(&e)),
    }
}

/// Runs the image tool(s) on `root`; returns their versions, for the metadata.
fn run_image_tool(
    spec: &BakeSpec,
    plan: &Plan,
    work: &Work,
    root: &Path,
    progress: &Progress,
) -> Result<(BTreeMap<String, String>, Option<meta::DiskInfo>), BakeError> {
    let opts = FsOptions {
        keep_owners: !spec.all_root,
        xattrs: true,
        // The image is synced once, when it is hashed; written back while the tool runs.
        skip_sync: true,
        write_back: true,
    };
    let image = work.image();
    let mut tools = Vec::new();
    let mut disk = None;
    let mut vfat = None;
    if let Some((fs, label)) = &plan.labelled {
        let tool = if *fs == FsType::Ext4 {
            "mke2fs"
        } else {
            "mkfs.erofs"
        };
        // A qcow2 and a bootable disk are made from a raw filesystem image first.
        let qcow2 = matches!(spec.format, Format::Qcow2 | Format::Disk);
        progress.phase(format!("image ({tool})"));
        let fs_spec = FsSpec {
            dir: root,
            label,
            mtime: spec.mtime,
            format: *fs,
            progress: Some(progress),
        };
        let raw = if qcow2 {
            work.path("raw")
        } else {
            image.clone()
        };
        let raw_opts = FsOptions {
            write_back: !qcow2,
            ..opts
        };
        fsimage::make_image_with(&fs_spec, raw_opts, &raw)?;
        tools.push(tool);
        if spec.format == Format::Disk {
            let name = image_name(spec, &plan.out_name);
            let job = crate::disk::Job {
                spec,
                work: work.dir.path(),
                root_fs: &raw,
                out_name: &plan.out_name,
                out: &image,
                image: (&name, &spec.version),
                progress,
            };
            let made = crate::disk::make(&job)?;
            let _ = std::fs::remove_file(&raw);
            tools.extend(made.tools);
            if !made.mkfs_vfat.is_empty() {
                vfat = Some(made.mkfs_vfat);
            }
            disk = Some(made.info);
        } else if qcow2 {
            progress.phase("image (qemu-img)");
            fsimage::convert_qcow2(&raw, opts, Some(progress), &image)?;
            let _ = std::fs::remove_file(&raw);
            tools.push("qemu-img");
        }
    } else {
        progress.phase("image (mksquashfs)");
        fsimage::make_squashfs(root, spec.mtime, opts, Some(progress), &image)?;
        tools.push("mksquashfs");
    }
    let mut versions: BTreeMap<String, String> = tools
        .into_iter()
        .filter_map(|t| fsimage::tool_version(t).map(|v| (t.to_owned(), v)))
        .collect();
    if let Some(v) = vfat {
        versions.insert("mkfs.vfat".to_owned(), v);
    }
    Ok((versions, disk))
}

/// The directory input's digest into the made image's inputs.
fn with_input_digest(
    mut made: Made,
    job: Option<std::thread::Result<io::Result<String>>>,
    plan: &Plan,
) -> Result<Made, BakeError> {
    let (Some(job), Some(path)) = (job, plan.dir_input()) else {
        return Ok(made);
    };
    let digest = job
        .map_err(|_| BakeError::Thread("input digest"))?
        .map_err(|source| BakeError::InputIo {
            path: path.to_owned(),
            source,
        })?;
    if let Some(i) = made.inputs.first_mut() {
        i.digest = digest;
    }
    Ok(made)
}

// ---------------------------------------------------------------------------------------------
// 5. Publish

/// Step 5: hash and sync the image (the staging tree removed meanwhile), write the metadata,
/// rename both into place.
fn publish(
    spec: &BakeSpec,
    plan: &Plan,
    work: Work,
    made: Made,
    progress: &Progress,
) -> Result<Report, BakeError> {
    let started = Instant::now();
    progress.phase("hash");
    let image = work.image();
    let (sha256, size) =
        hash_and_sync(&image, made.staged_tree.as_deref(), progress).map_err(|source| {
            BakeError::Output {
                path: spec.out.clone(),
                source,
            }
        })?;
    let meta = image_meta(spec, plan, &made, sha256, size);
    let meta_tmp = work.path("meta.json");
    write_meta(&meta, &meta_tmp)?;
    let meta_path = ImageMeta::path_for(&spec.out);
    let out_err = |path: &Path| {
        let path = path.to_owned();
        move |source| BakeError::Output { path, source }
    };
    std::fs::rename(&image, &spec.out).map_err(out_err(&spec.out))?;
    if let Err(e) = std::fs::rename(&meta_tmp, &meta_path) {
        let _ = std::fs::remove_file(&spec.out);
        return Err(out_err(&meta_path)(e));
    }
    if let Err(e) = File::open(&plan.out_dir).and_then(|d| d.sync_all()) {
        log::warn!("fsync {}: {e}", plan.out_dir.display());
    }
    Ok(Report {
        meta,
        meta_path,
        layers: made.layers,
        input_stats: made.input_stats,
        staging: made.staging,
        staging_time: made.staging_time,
        image_time: made.image_time,
        finish_time: started.elapsed(),
    })
}

/// The image's sha256 and size, read while it is synced and the staging tree removed.
fn hash_and_sync(
    image: &Path,
    staged_tree: Option<&Path>,
    progress: &Progress,
) -> io::Result<(String, u64)> {
    let (hashed, synced) = std::thread::scope(|s| {
        let hash = s.spawn(|| hash_counted(image, progress));
        if let Some(tree) = staged_tree {
            s.spawn(move || {
                if let Err(e) = std::fs::remove_dir_all(tree) {
                    log::warn!("remove {}: {e}", tree.display());
                }
            });
        }
        let synced = File::open(image).and_then(|f| f.sync_all());
        (hash.join(), synced)
    });
    synced?;
    hashed.map_err(|_| io::Error::other("the hashing thread panicked"))?
}

/// The sha256 hex and size of a file, read in 1 MiB blocks (fewer system calls than
/// `io::copy`'s 8 KiB), counted into `progress`.
fn hash_counted(path: &Path, progress: &Progress) -> io::Result<(String, u64)> {
    let mut h = HashingReader::new(CountingReader::new(File::open(path)?, progress));
    let mut buf = vec![0u8; 1 << 20];
    while h.read(&mut buf)? > 0 {}
    let (d, n) = h.finish();
    Ok((d.hex().to_owned(), n))
}

/// The image's name: `--name`, else the output file's stem.
fn image_name(spec: &BakeSpec, out_name: &str) -> String {
    spec.name.clone().unwrap_or_else(|| {
        Path::new(out_name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(out_name)
            .to_owned()
    })
}

/// The metadata of the image made.
fn image_meta(spec: &BakeSpec, plan: &Plan, made: &Made, sha256: String, size: u64) -> ImageMeta {
    let name = image_name(spec, &plan.out_name);
    let modules = &plan.modules;
    ImageMeta {
        schema: if made.disk.is_some() {
            meta::DISK_SCHEMA
        } else {
            meta::SCHEMA
        },
        name,
        version: spec.version.clone(),
        format: spec.format,
        file: plan.out_name.clone(),
        sha256,
        size,
        fstype: spec.fstype(),
        label: plan.labelled.as_ref().map(|(_, l)| l.clone()),
        stage1: spec.stage1,
        read_only: spec.read_only(),
        writable: plan.writable.clone(),
        inputs: made.inputs.clone(),
        init: InitInfo {
            path: format!("/{}", plan.init_path),
            version: init_version(&spec.init),
            sha256: made.init_sha.clone(),
        },
        kernel_release: modules
            .release
            .clone()
            .filter(|_| !modules.names.is_empty()),
        modules: modules.names.clone(),
        source_date_epoch: spec.mtime,
        built: meta::rfc3339(spec.mtime),
        tool_versions: made.tool_versions.clone(),
        unpacked_size: made.archive.map(|a| a.unpacked),
        min_memory_mib: Some(need::min_memory_mib(size, made.archive.as_ref())),
        parent: None,
        bundle: None,
        disk: made.disk.clone(),
    }
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

/// sha256 hex and size of a file.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let (d, n) = digest::of_reader(File::open(path)?)?;
    Ok((d.hex().to_owned(), n))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(format: Format) -> BakeSpec {
        BakeSpec::new(
            format,
            PathBuf::from("out.img"),
            Some(PathBuf::from("rootfs")),
            PathBuf::from("init"),
        )
    }

    #[test]
    fn flags_for_other_formats_are_refused() {
        let cases: Vec<(BakeSpec, &str)> = vec![
            (
                BakeSpec {
                    compress: Some(Compression::Zstd),
                    ..spec(Format::Erofs)
                },
                "--compress does not apply to --format erofs (only to initramfs)",
            ),
            (
                BakeSpec {
                    qcow2_fs: Some(FsType::Ext4),
                    ..spec(Format::Ext4)
                },
                "--qcow2-fs does not apply to --format ext4 (only to qcow2)",
            ),
            (
                BakeSpec {
                    qcow2_fs: Some(FsType::Squashfs),
                    ..spec(Format::Qcow2)
                },
                "--qcow2-fs squashfs: a qcow2 image holds erofs or ext4",
            ),
            (
                BakeSpec {
                    label: Some("x".into()),
                    ..spec(Format::Squashfs)
                },
                "--root-label does not apply to --format squashfs",
            ),
            (
                BakeSpec {
                    label: Some("x".into()),
                    ..spec(Format::Initramfs)
                },
                "initramfs and squashfs have no label",
            ),
            (
                BakeSpec {
                    mtime: u64::from(u32::MAX) + 1,
                    ..spec(Format::Erofs)
                },
                "SOURCE_DATE_EPOCH 4294967296 is out of range",
            ),
        ];
        for (s, want) in cases {
            let e = check_flags(&s).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        for ok in [
            BakeSpec {
                compress: Some(Compression::None),
                ..spec(Format::Initramfs)
            },
            BakeSpec {
                qcow2_fs: Some(FsType::Ext4),
                label: Some("x".into()),
                ..spec(Format::Qcow2)
            },
            BakeSpec {
                label: Some("x".into()),
                ..spec(Format::Erofs)
            },
        ] {
            assert!(check_flags(&ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn labels_and_filesystems() {
        assert_eq!(spec(Format::Squashfs).labelled_fs(), None);
        assert_eq!(spec(Format::Initramfs).labelled_fs(), None);
        assert_eq!(spec(Format::Qcow2).labelled_fs(), Some(FsType::Erofs));
        let ext4_qcow2 = BakeSpec {
            qcow2_fs: Some(FsType::Ext4),
            ..spec(Format::Qcow2)
        };
        assert_eq!(ext4_qcow2.labelled_fs(), Some(FsType::Ext4));
        assert!(!ext4_qcow2.read_only() && spec(Format::Qcow2).read_only());
        assert_eq!("mirror".parse(), Ok(StagingMode::Mirror));
        assert!("copy".parse::<StagingMode>().is_err());
    }
}
