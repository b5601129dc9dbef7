//! The bootstrap manifest, `bootlace.toml` at the root of a bundle (schema version 1), and its
//! validation. [`Manifest::parse`] checks everything that can be checked without touching the
//! guest — schema, every value, and the entries against each other — so a manifest that exists
//! is one the init can start applying. `docs/manifest.md` is the reference; a test parses its
//! examples.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;
use crate::types::{
    BundlePath, Command, EnvName, ExecString, HandoffMode, InvalidValue, Label, Mode, ModuleName,
    MountTag, TargetPath,
};

/// The manifest's file name at the bundle root.
pub const MANIFEST_NAME: &str = "bootlace.toml";
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// Largest command timeout accepted, in seconds (one day).
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// Schema versions understood.
pub const SUPPORTED_VERSIONS: &[i64] = &[1];

/// Why a manifest was refused. Messages name the manifest and the entry.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Over [`MAX_MANIFEST_BYTES`].
    #[error("{} is over the {MAX_MANIFEST_BYTES}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// Not TOML for the schema: unknown key, wrong type, invalid value.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and position).
        message: String,
    },
    /// Missing or unsupported `version`.
    #[error("{}: unsupported manifest version {found} (supported: {SUPPORTED_VERSIONS:?})", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found (0 when missing).
        found: i64,
    },
    /// Entries that are each valid but not together.
    #[error("{}: {section}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The section (`files`, `run`, …).
        section: &'static str,
        /// What is wrong, naming the entry.
        message: String,
    },
}

/// A host name: 1-64 bytes of `[A-Za-z0-9.-]`, not starting or ending with `-` or `.`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Hostname(String);

impl Hostname {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Hostname {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !s.starts_with(['-', '.'])
            && !s.ends_with(['-', '.']);
        if ok {
            Ok(Hostname(s))
        } else {
            Err(InvalidValue::new(
                "hostname",
                &s,
                "must be 1-64 characters of [A-Za-z0-9.-], not starting or ending with - or .",
            ))
        }
    }
}

impl From<Hostname> for String {
    fn from(h: Hostname) -> String {
        h.0
    }
}

/// A sysctl key in dotted form (`net.ipv4.ip_forward`), naming a file under `/proc/sys`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SysctlKey(String);

impl SysctlKey {
    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The file under `/proc/sys` (`net/ipv4/ip_forward`).
    pub fn proc_path(&self) -> String {
        self.0.replace('.', "/")
    }
}

impl TryFrom<String> for SysctlKey {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 256
            && s.split('.').all(|c| {
                !c.is_empty()
                    && c.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
        if ok {
            Ok(SysctlKey(s))
        } else {
            Err(InvalidValue::new(
                "sysctl key",
                &s,
                "must be dotted words of [A-Za-z0-9_-]",
            ))
        }
    }
}

impl From<SysctlKey> for String {
    fn from(k: SysctlKey) -> String {
        k.0
    }
}

/// A name for an instance or a run step: 1-128 bytes of `[A-Za-z0-9._-]`, not `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s != "."
            && s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
        if ok {
            Ok(Name(s))
        } else {
            Err(InvalidValue::new(
                "name",
                &s,
                "must be 1-128 characters of [A-Za-z0-9._-]",
            ))
        }
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A tmpfs size: a number of bytes with an optional `k`, `m`, `g` suffix, or a percentage of
/// RAM (`50%`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TmpfsSize(String);

impl TmpfsSize {
    /// A size known to be valid (crate-internal defaults).
    pub(crate) fn trusted(s: &str) -> TmpfsSize {
        debug_assert!(TmpfsSize::try_from(s.to_owned()).is_ok(), "{s}");
        TmpfsSize(s.to_owned())
    }

    /// The size as the tmpfs `size=` option takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TmpfsSize {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let digits = s.trim_end_matches(['k', 'm', 'g', 'K', 'M', 'G', '%']);
        let ok = !digits.is_empty()
            && digits.len() <= 18
            && digits.bytes().all(|b| b.is_ascii_digit())
            && s.len() - digits.len() <= 1;
        if ok {
            Ok(TmpfsSize(s))
        } else {
            Err(InvalidValue::new(
                "tmpfs size",
                &s,
                "must be a number with an optional k, m, g or % suffix",
            ))
        }
    }
}

impl From<TmpfsSize> for String {
    fn from(s: TmpfsSize) -> String {
        s.0
    }
}

fn default_dir_mode() -> Mode {
    Mode::new_const(0o755)
}

fn default_file_mode() -> Mode {
    Mode::new_const(0o644)
}

fn default_true() -> bool {
    true
}

fn default_timeout() -> u64 {
    300
}

fn default_cwd() -> TargetPathOrRoot {
    TargetPathOrRoot::Root
}

/// A directory to create (or whose mode and owner to set, if it exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// Where. Missing parents are created (0755, root).
    pub path: TargetPath,
    /// Permission bits; default `0o755`.
    #[serde(default = "default_dir_mode")]
    pub mode: Mode,
    /// Owner uid; default 0.
    #[serde(default)]
    pub uid: u32,
    /// Owner gid; default 0.
    #[serde(default)]
    pub gid: u32,
}

/// A file to write atomically (temp file, fsync, rename): the target is the old file or the new
/// one, never a partial one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// Where. Missing parents are created (0755, root).
    pub path: TargetPath,
    /// Inline content (exactly one of `content` and `source`).
    #[serde(default)]
    pub content: Option<String>,
    /// A file in the bundle to copy (exactly one of `content` and `source`).
    #[serde(default)]
    pub source: Option<BundlePath>,
    /// Permission bits; default `0o644`.
    #[serde(default = "default_file_mode")]
    pub mode: Mode,
    /// Owner uid; default 0.
    #[serde(default)]
    pub uid: u32,
    /// Owner gid; default 0.
    #[serde(default)]
    pub gid: u32,
}

/// A symbolic link to create (replacing a file or link of the same name, atomically).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Symlink {
    /// Where the link is.
    pub path: TargetPath,
    /// What it points to (stored as given; never followed by bootlace).
    pub target: ExecString,
}

/// A mount, applied in manifest order before files are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Mount {
    /// A tmpfs for a writable location, by default seeded with what the image has there.
    Tmpfs(TmpfsMount),
    /// A filesystem on a block device found by its label.
    Disk(DiskMount),
    /// A virtio 9p share found by its mount tag.
    #[serde(rename = "9p")]
    NineP(NinePMount),
    /// A bind mount of a directory of the root.
    Bind(BindMount),
}

impl Mount {
    /// Where it is mounted.
    pub fn path(&self) -> &TargetPath {
        match self {
            Mount::Tmpfs(m) => &m.path,
            Mount::Disk(m) => &m.path,
            Mount::NineP(m) => &m.path,
            Mount::Bind(m) => &m.path,
        }
    }
}

/// `type = "tmpfs"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TmpfsMount {
    /// Where.
    pub path: TargetPath,
    /// Size limit; default the kernel's (half of RAM).
    #[serde(default)]
    pub size: Option<TmpfsSize>,
    /// Mode of the tmpfs root; default the mode of the directory it covers, else 0o755.
    #[serde(default)]
    pub mode: Option<Mode>,
    /// Copy what the image has at `path` into the tmpfs first; default true.
    #[serde(default = "default_true")]
    pub copy_defaults: bool,
}

/// `type = "disk"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMount {
    /// Where.
    pub path: TargetPath,
    /// The filesystem label to look for (ext4, erofs, vfat, iso9660), 1 to 32 bytes.
    pub label: Label,
    /// Mount read-only; default false.
    #[serde(default)]
    pub read_only: bool,
}

/// `type = "9p"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NinePMount {
    /// Where.
    pub path: TargetPath,
    /// The virtio 9p mount tag, 1 to 31 bytes.
    pub tag: MountTag,
    /// Mount read-only; default false.
    #[serde(default)]
    pub read_only: bool,
}

/// `type = "bind"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindMount {
    /// Where.
    pub path: TargetPath,
    /// The directory of the root to bind there.
    pub source: TargetPath,
    /// Mount read-only; default false.
    #[serde(default)]
    pub read_only: bool,
}

/// What a failed command does to the boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFailure {
    /// Stop: the step fails and the failure policy applies (default).
    #[default]
    Abort,
    /// Report and go on with the next command.
    Continue,
}

/// When a command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Frequency {
    /// Every boot (default).
    #[default]
    Always,
    /// Once for each `instance_id`, recorded under `state_dir`.
    OncePerInstance,
}

/// A working directory: `/` or a target path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TargetPathOrRoot {
    /// `/`.
    Root,
    /// Another directory.
    Path(TargetPath),
}

impl TargetPathOrRoot {
    /// The path.
    pub fn as_str(&self) -> &str {
        match self {
            TargetPathOrRoot::Root => "/",
            TargetPathOrRoot::Path(p) => p.as_str(),
        }
    }
}

impl TryFrom<String> for TargetPathOrRoot {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if s == "/" {
            Ok(TargetPathOrRoot::Root)
        } else {
            TargetPath::try_from(s).map(TargetPathOrRoot::Path)
        }
    }
}

impl From<TargetPathOrRoot> for String {
    fn from(p: TargetPathOrRoot) -> String {
        p.as_str().to_owned()
    }
}

/// A command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Run {
    /// A unique name, used in reports and run-once records.
    pub name: Name,
    /// The argv; the program is an absolute path.
    pub command: Command,
    /// Environment on top of the hand-off environment.
    #[serde(default)]
    pub env: BTreeMap<EnvName, ExecString>,
    /// Working directory; default `/`.
    #[serde(default = "default_cwd")]
    pub cwd: TargetPathOrRoot,
    /// User id to run as; default 0.
    #[serde(default)]
    pub uid: u32,
    /// Group id to run as; default 0.
    #[serde(default)]
    pub gid: u32,
    /// Seconds before its process group gets SIGTERM (then SIGKILL 2 s later); default 300.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    /// `abort` (default) or `continue`.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// `always` (default) or `once-per-instance`.
    #[serde(default)]
    pub frequency: Frequency,
}

/// Overrides of the baked hand-off.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// `exec` or `supervise`.
    #[serde(default)]
    pub mode: Option<HandoffMode>,
    /// The command.
    #[serde(default)]
    pub command: Option<Command>,
}

fn default_state_dir() -> TargetPath {
    TargetPath::trusted("/var/lib/bootlace")
}

/// A bootstrap manifest, schema version 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Schema version; must be 1.
    pub version: i64,
    /// Identity of this instance, for `once-per-instance` commands.
    #[serde(default)]
    pub instance_id: Option<Name>,
    /// Where run-once records are kept; default `/var/lib/bootlace`.
    #[serde(default = "default_state_dir")]
    pub state_dir: TargetPath,
    /// Host name to set.
    #[serde(default)]
    pub hostname: Option<Hostname>,
    /// Environment for the hand-off (and the commands).
    #[serde(default)]
    pub env: BTreeMap<EnvName, ExecString>,
    /// Values to write under `/proc/sys`.
    #[serde(default)]
    pub sysctl: BTreeMap<SysctlKey, ExecString>,
    /// Kernel modules to load.
    #[serde(default)]
    pub modules: Vec<ModuleName>,
    /// Mounts, in order.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Directories.
    #[serde(default)]
    pub directories: Vec<Directory>,
    /// Files.
    #[serde(default)]
    pub files: Vec<File>,
    /// Symbolic links.
    #[serde(default)]
    pub symlinks: Vec<Symlink>,
    /// Commands, in order.
    #[serde(default)]
    pub run: Vec<Run>,
    /// Overrides of the hand-off.
    #[serde(default)]
    pub handoff: Handoff,
    /// A newer bootlace-init carried by the bundle, to take over PID 1 (docs/manifest.md).
    #[serde(default)]
    pub init: Option<NextInit>,
}

/// Default of `[init] check_timeout_ms`: how long the newer init's self-check may take.
pub const DEFAULT_INIT_CHECK_MS: u64 = 5_000;
/// Largest `[init] check_timeout_ms` accepted.
pub const MAX_INIT_CHECK_MS: u64 = 60_000;
/// Largest init binary a bundle may carry, in bytes.
pub const MAX_INIT_BYTES: u64 = 64 * 1024 * 1024;

fn default_init_check_ms() -> u64 {
    DEFAULT_INIT_CHECK_MS
}

/// `[init]`: a newer bootlace-init in the bundle. The running init copies it out of the
/// bundle checking its digest, runs its self-check within `check_timeout_ms`, and hands PID 1
/// over to it; when any of that fails it goes on itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NextInit {
    /// The binary, relative to the bundle root.
    pub path: BundlePath,
    /// Its digest, `sha256:<hex>`: the bytes must be these.
    pub sha256: Sha256Digest,
    /// How long its self-check may take, in milliseconds (1..=60000; default 5000).
    #[serde(default = "default_init_check_ms")]
    pub check_timeout_ms: u64,
}

impl Manifest {
    /// Parses and validates a manifest; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest, ManifestError> {
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                path: path.to_owned(),
            });
        }
        let parse_err = |e: toml::de::Error| ManifestError::Parse {
            path: path.to_owned(),
            message: crate::types::toml_error(text, &e),
        };
        let m: Manifest =
            crate::types::parse_versioned(text, SUPPORTED_VERSIONS, |m: &Manifest| m.version)
                .map_err(|e| match e {
                    crate::types::VersionedError::Version(found) => ManifestError::Version {
                        path: path.to_owned(),
                        found,
                    },
                    crate::types::VersionedError::Toml(e) => parse_err(e),
                })?;
        m.check(path)?;
        Ok(m)
    }

    /// Reads (at most [`MAX_MANIFEST_BYTES`]) and validates a manifest file.
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        Manifest::read_from(
            std::fs::File::open(path).map_err(|source| ManifestError::Read {
                path: path.to_owned(),
                source,
            })?,
            path,
        )
    }

    /// Reads (at most [`MAX_MANIFEST_BYTES`]) and validates a manifest from an open file;
    /// `path` names it in errors.
    pub fn read_from(r: impl std::io::Read, path: &Path) -> Result<Manifest, ManifestError> {
        let text = crate::types::read_capped(r, MAX_MANIFEST_BYTES).map_err(|source| {
            ManifestError::Read {
                path: path.to_owned(),
                source,
            }
        })?;
        Manifest::parse(&text, path)
    }

    /// Cross-entry checks.
    fn check(&self, path: &Path) -> Result<(), ManifestError> {
        let invalid = |section: &'static str, message: String| ManifestError::Invalid {
            path: path.to_owned(),
            section,
            message,
        };
        for f in &self.files {
            match (&f.content, &f.source) {
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "files",
                        format!("{}: both content and source", f.path),
                    ))
                }
                (None, None) => {
                    return Err(invalid(
                        "files",
                        format!("{}: neither content nor source", f.path),
                    ))
                }
                _ => {}
            }
        }
        // Destinations: each path once; no file or link may be a parent of another entry.
        let mut seen: BTreeMap<&TargetPath, &'static str> = BTreeMap::new();
        let entries = self
            .directories
            .iter()
            .map(|d| (&d.path, "directories"))
            .chain(self.files.iter().map(|f| (&f.path, "files")))
            .chain(self.symlinks.iter().map(|s| (&s.path, "symlinks")));
        for (p, section) in entries {
            if let Some(other) = seen.insert(p, section) {
                return Err(invalid(
                    section,
                    format!("{p} is also a destination in {other}"),
                ));
            }
        }
        for (p, section) in &seen {
            if *section == "directories" {
                continue;
            }
            if let Some((child, _)) = seen.iter().find(|(q, _)| *q != p && q.is_within(p)) {
                return Err(invalid(
                    section,
                    format!("{p} is not a directory but {child} is meant to be inside it"),
                ));
            }
        }
        let mut mounts = BTreeSet::new();
        for m in &self.mounts {
            if !mounts.insert(m.path()) {
                return Err(invalid("mounts", format!("{} is mounted twice", m.path())));
            }
        }
        if let Some(i) = &self.init {
            if i.check_timeout_ms == 0 || i.check_timeout_ms > MAX_INIT_CHECK_MS {
                return Err(invalid(
                    "init",
                    format!(
                        "check_timeout_ms {} is not in 1..={MAX_INIT_CHECK_MS}",
                        i.check_timeout_ms
                    ),
                ));
            }
        }
        let mut names = BTreeSet::new();
        for r in &self.run {
            if !names.insert(&r.name) {
                return Err(invalid(
                    "run",
                    format!("two commands are named {:?}", r.name.as_str()),
                ));
            }
            if r.timeout_s == 0 || r.timeout_s > MAX_TIMEOUT_S {
                return Err(invalid(
                    "run",
                    format!(
                        "{}: timeout_s {} is not in 1..={MAX_TIMEOUT_S}",
                        r.name, r.timeout_s
                    ),
                ));
            }
            if r.frequency == Frequency::OncePerInstance && self.instance_id.is_none() {
                return Err(invalid(
                    "run",
                    format!("{}: once-per-instance needs an instance_id", r.name),
                ));
            }
        }
        Ok(())
    }

    /// The bundle files the manifest copies (to check a bundle at build time).
    pub fn bundle_sources(&self) -> impl Iterator<Item = &BundlePath> {
        self.files
            .iter()
            .filter_map(|f| f.source.as_ref())
            .chain(self.init.as_ref().map(|i| &i.path))
    }
}

/// Checks a bundle directory the way the init will: its manifest parses and validates, and
/// every `source` it names is a regular file inside the bundle (no symlink on the way).
pub fn check_bundle_dir(dir: &Path) -> Result<Manifest, ManifestError> {
    let path = dir.join(MANIFEST_NAME);
    let manifest = Manifest::read(&path)?;
    for src in manifest.bundle_sources() {
        let mut here = dir.to_owned();
        for comp in src.as_str().split('/') {
            here.push(comp);
            let meta = std::fs::symlink_metadata(&here).map_err(|source| ManifestError::Read {
                path: here.clone(),
                source,
            })?;
            if meta.file_type().is_symlink() {
                return Err(ManifestError::Invalid {
                    path: path.clone(),
                    section: "files",
                    message: format!(
                        "source {} goes through a symlink ({})",
                        src.as_str(),
                        here.display()
                    ),
                });
            }
        }
        if !std::fs::symlink_metadata(&here).is_ok_and(|m| m.is_file()) {
            return Err(ManifestError::Invalid {
                path: path.clone(),
                section: "files",
                message: format!("source {} is not a regular file", src.as_str()),
            });
        }
    }
    if let Some(init) = &manifest.init {
        let file = dir.join(init.path.as_str());
        let (digest, size) = std::fs::File::open(&file)
            .and_then(crate::digest::of_reader)
            .map_err(|source| ManifestError::Read {
                path: file.clone(),
                source,
            })?;
        let invalid = |message: String| ManifestError::Invalid {
            path: path.clone(),
            section: "init",
            message,
        };
        if size > MAX_INIT_BYTES {
            return Err(invalid(format!(
                "{} is {size} bytes, over the {MAX_INIT_BYTES}-byte limit",
                init.path.as_str()
            )));
        }
        if digest != init.sha256 {
            return Err(invalid(format!(
                "{} has {digest}, not the sha256 = \"{}\" given",
                init.path.as_str(),
                init.sha256
            )));
        }
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, Path::new("bootlace.toml"))
    }

    const FULL: &str = r#"
version = 1
instance_id = "i-0123"
hostname = "web-1"
env = { APP_MODE = "prod" }
sysctl = { "net.ipv4.ip_forward" = "1" }
modules = ["vsock"]

[[mounts]]
type = "tmpfs"
path = "/etc"
size = "16m"

[[mounts]]
type = "disk"
path = "/srv/data"
label = "DATA"

[[mounts]]
type = "9p"
path = "/opt/sw"
tag = "software"
read_only = true

[[mounts]]
type = "bind"
path = "/var/www"
source = "/srv/data/www"

[[directories]]
path = "/var/lib/app"
mode = 0o750
uid = 1000

[[files]]
path = "/etc/app.conf"
content = "key = 1\n"
mode = 0o600

[[files]]
path = "/etc/app.key"
source = "files/app.key"

[[symlinks]]
path = "/etc/app.link"
target = "app.conf"

[[run]]
name = "init-db"
command = ["/bin/sh", "-c", "echo hi"]
timeout_s = 30
frequency = "once-per-instance"

[handoff]
mode = "supervise"
command = ["/usr/bin/app"]
"#;

    #[test]
    fn a_full_manifest_parses() {
        let m = parse(FULL).expect("parses");
        assert_eq!(m.mounts.len(), 4);
        assert!(
            matches!(&m.mounts[2], Mount::NineP(p) if p.read_only && p.tag.as_str() == "software")
        );
        assert_eq!(m.directories[0].mode, Mode::new_const(0o750));
        assert_eq!(
            m.files[1].source.as_ref().map(BundlePath::as_str),
            Some("files/app.key")
        );
        assert_eq!(m.run[0].frequency, Frequency::OncePerInstance);
        assert_eq!(m.run[0].cwd, TargetPathOrRoot::Root);
        assert_eq!(
            m.sysctl.keys().next().map(SysctlKey::proc_path).as_deref(),
            Some("net/ipv4/ip_forward")
        );
        assert_eq!(m.state_dir.as_str(), "/var/lib/bootlace");
        assert_eq!(m.handoff.mode, Some(HandoffMode::Supervise));
        // Round trip through TOML.
        let again = parse(&toml::to_string(&m).expect("serialise")).expect("reparses");
        assert_eq!(again, m);
    }

    #[test]
    fn bad_manifests_name_the_cause() {
        let cases: &[(&str, &str)] = &[
            ("", "unsupported manifest version 0"),
            ("version = 2", "unsupported manifest version 2"),
            ("version = 1\nbogus = 1", "bogus"),
            ("version = 1\n[[files]]\npath = \"/etc/x\"\ncontent = \"\"\nowner = 1", "owner"),
            ("version = 1\n[[files]]\npath = \"../x\"\ncontent = \"\"", "must be absolute"),
            ("version = 1\n[[files]]\npath = \"/etc/../../x\"\ncontent = \"\"", "\"..\" component"),
            ("version = 1\n[[files]]\npath = \"/proc/sys/x\"\ncontent = \"\"", "under /proc"),
            ("version = 1\n[[files]]\npath = \"\"\ncontent = \"\"", "must be absolute"),
            ("version = 1\n[[files]]\npath = \"/x\\u0000\"\ncontent = \"\"", "NUL"),
            ("version = 1\n[[files]]\npath = \"/x\"", "neither content nor source"),
            ("version = 1\n[[files]]\npath = \"/x\"\ncontent = \"\"\nsource = \"a\"", "both content and source"),
            ("version = 1\n[[files]]\npath = \"/x\"\nsource = \"../a\"", "\"..\" component"),
            ("version = 1\n[[files]]\npath = \"/x\"\nsource = \"/etc/shadow\"", "relative to the bundle root"),
            ("version = 1\n[[files]]\npath = \"/x\"\ncontent = \"\"\nmode = 0o17777", "over 0o7777"),
            (
                "version = 1\n[[files]]\npath = \"/x\"\ncontent = \"\"\n[[symlinks]]\npath = \"/x\"\ntarget = \"y\"",
                "/x is also a destination in files",
            ),
            (
                "version = 1\n[[files]]\npath = \"/x\"\ncontent = \"\"\n[[files]]\npath = \"/x/y\"\ncontent = \"\"",
                "/x is not a directory but /x/y",
            ),
            ("version = 1\n[[mounts]]\ntype = \"nfs\"\npath = \"/x\"", "nfs"),
            ("version = 1\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/x\"\nlabel = \"y\"", "label"),
            ("version = 1\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/x\"\nsize = \"lots\"", "tmpfs size"),
            (
                "version = 1\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/x\"\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/x\"",
                "mounted twice",
            ),
            ("version = 1\n[[run]]\nname = \"a\"\ncommand = [\"sh\"]", "absolute path"),
            ("version = 1\n[[run]]\nname = \"a b\"\ncommand = [\"/bin/sh\"]", "name \"a b\""),
            (
                "version = 1\n[[run]]\nname = \"a\"\ncommand = [\"/bin/sh\"]\n[[run]]\nname = \"a\"\ncommand = [\"/bin/sh\"]",
                "two commands are named",
            ),
            ("version = 1\n[[run]]\nname = \"a\"\ncommand = [\"/bin/sh\"]\ntimeout_s = 0", "timeout_s 0"),
            (
                "version = 1\n[[run]]\nname = \"a\"\ncommand = [\"/bin/sh\"]\nfrequency = \"once-per-instance\"",
                "needs an instance_id",
            ),
            ("version = 1\nhostname = \"-bad\"", "hostname"),
            ("version = 1\nsysctl = { \"a..b\" = \"1\" }", "sysctl key"),
            ("version = 1\nsysctl = { \"../x\" = \"1\" }", "sysctl key"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: {err:?} lacks {want:?}");
            assert!(
                err.starts_with("bootlace.toml"),
                "{err:?} does not name the file"
            );
        }
    }

    #[test]
    fn size_and_nesting_limits() {
        let big = format!(
            "version = 1\n#{}\n",
            "x".repeat(MAX_MANIFEST_BYTES as usize)
        );
        assert!(matches!(parse(&big), Err(ManifestError::TooLarge { .. })));
        let deep = format!(
            "version = 1\nx = {}{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(&deep).is_err());
        let deep_tables = format!(
            "version = 1\nx = {}{}",
            "{a=".repeat(10_000),
            "}".repeat(10_000)
        );
        assert!(parse(&deep_tables).is_err());
    }

    #[test]
    fn bundle_dirs_are_checked_like_the_init_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::create_dir_all(d.join("files")).expect("mkdir");
        std::fs::write(d.join("files/a"), b"a").expect("write");
        std::os::unix::fs::symlink("/etc/passwd", d.join("files/link")).expect("symlink");
        let write = |m: &str| std::fs::write(d.join(MANIFEST_NAME), m).expect("write");
        write("version = 1\n[[files]]\npath = \"/a\"\nsource = \"files/a\"\n");
        check_bundle_dir(d).expect("valid bundle");
        write("version = 1\n[[files]]\npath = \"/a\"\nsource = \"files/link\"\n");
        let e = check_bundle_dir(d).expect_err("symlink source").to_string();
        assert!(e.contains("goes through a symlink"), "{e}");
        write("version = 1\n[[files]]\npath = \"/a\"\nsource = \"files/missing\"\n");
        assert!(check_bundle_dir(d).is_err());
        // [init]: the file must be there, regular, with the sha256 given.
        let digest = crate::digest::of_bytes(b"a");
        write(&format!(
            "version = 1\n[init]\npath = \"files/a\"\nsha256 = \"{digest}\"\n"
        ));
        let m = check_bundle_dir(d).expect("valid [init]");
        assert_eq!(
            m.init.map(|i| i.check_timeout_ms),
            Some(DEFAULT_INIT_CHECK_MS)
        );
        let other = crate::digest::of_bytes(b"b");
        write(&format!(
            "version = 1\n[init]\npath = \"files/a\"\nsha256 = \"{other}\"\n"
        ));
        let e = crate::chain(&check_bundle_dir(d).expect_err("wrong digest"));
        assert!(
            e.ends_with(&format!(
                "bootlace.toml: init: files/a has {digest}, not the sha256 = \"{other}\" given"
            )),
            "{e}"
        );
        write(&format!(
            "version = 1\n[init]\npath = \"files/link\"\nsha256 = \"{digest}\"\n"
        ));
        let e = check_bundle_dir(d).expect_err("symlink init").to_string();
        assert!(e.contains("goes through a symlink"), "{e}");
        for bad in ["check_timeout_ms = 0", "check_timeout_ms = 60001"] {
            let e = parse(&format!(
                "version = 1\n[init]\npath = \"files/a\"\nsha256 = \"{digest}\"\n{bad}\n"
            ))
            .expect_err(bad)
            .to_string();
            assert!(e.contains("check_timeout_ms") && e.contains("init"), "{e}");
        }
        std::fs::remove_file(d.join(MANIFEST_NAME)).expect("rm");
        let e = check_bundle_dir(d).expect_err("no manifest").to_string();
        assert!(
            e.contains("cannot read") && e.contains(MANIFEST_NAME),
            "{e}"
        );
    }
}
