//! The init's configuration: `/etc/bootlace/init.toml` (schema version 1), overridden by
//! `bootlace.*` keys on the kernel command line or by the image builder's flags.
//!
//! Every value is validated while it is parsed (newtypes with `try_from`), so an
//! [`InitConfig`] that exists is a valid one. Overrides are typed ([`Overrides`]): the kernel
//! command line is parsed into them key by key, the image builder fills them from its flags,
//! and both apply them the same way. [`InitConfig::validate`] checks what only holds for the
//! whole, effective configuration (a vsock source needs a host that answers); the init runs it
//! at boot and the image builder at bake time, so an image the builder accepts is one the init
//! accepts.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cmdline::{self, Param};
pub use crate::digest::Sha256Digest;
use crate::gpt::{self, Guid};
pub use crate::manifest::TmpfsSize;
pub use crate::signature::PublicKey;
pub use crate::types::{
    Command, EnvName, ExecString, HandoffMode, ImageRef, InvalidValue, Label, ModuleName, MountTag,
    TargetPath, UnixId, WorkDir,
};

/// Where the image builder bakes the config and where the init reads it.
pub const CONFIG_PATH: &str = "/etc/bootlace/init.toml";
/// Largest config file the init reads; anything bigger is refused unread.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Longest wait for a bootstrap device, in milliseconds (ten minutes).
const MAX_WAIT_MS: u64 = 600_000;
/// Longest shutdown grace period accepted, in milliseconds (one hour).
const MAX_GRACE_MS: u64 = 3_600_000;
/// Most supplementary groups `[handoff] groups` may list.
pub const MAX_GROUPS: usize = 1024;

/// Schema versions this init understands.
pub const SUPPORTED_VERSIONS: &[i64] = &[1];

/// Why a configuration was refused. Each variant names where the bad input came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A config file that was named does not exist.
    #[error("{} does not exist", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The config file is over [`MAX_CONFIG_BYTES`].
    #[error("{} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The file is not valid TOML for the schema (unknown key, wrong type, bad value).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and position.
        message: String,
    },
    /// The file has no `version` or one this init does not support.
    #[error("{}: unsupported config version {found} (supported: {SUPPORTED_VERSIONS:?})", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found (0 when missing).
        found: i64,
    },
    /// A `bootlace.*` key on the kernel command line that this init does not know.
    #[error("unknown kernel command line key {key:?} (known: {})", CMDLINE_KEYS.join(", "))]
    UnknownKey {
        /// The key as written.
        key: String,
    },
    /// A known `bootlace.*` key with a value that does not fit.
    #[error("kernel command line {key}={value:?}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// The value as written.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The effective configuration is inconsistent (see [`InitConfig::validate`]).
    #[error("{0}")]
    Inconsistent(#[from] Inconsistency),
}

/// A configuration whose values are each valid but do not work together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Inconsistency {
    /// The vsock source without a host to fetch from.
    #[error("the vsock source needs a host (host.address, bootlace.host= or --host vsock:2:PORT)")]
    VsockWithoutHost,
    /// The vsock source with a host that is only listened to (`vsock-notify:`).
    #[error("the vsock source needs a host that answers: {0} is notify-only")]
    VsockNotifyHost(String),
}

/// The `bootlace.*` kernel command line keys, in the order they are documented.
pub const CMDLINE_KEYS: &[&str] = &[
    "bootlace.log",
    "bootlace.failure",
    "bootlace.modules",
    "bootlace.handoff",
    "bootlace.exec",
    "bootlace.source",
    "bootlace.bootstrap",
    "bootlace.label",
    "bootlace.tag",
    "bootlace.host",
    "bootlace.digest",
    "bootlace.root",
];

/// Where a bootstrap filesystem can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Source {
    /// A block device whose filesystem label matches `bootstrap.label`.
    #[serde(rename = "disk")]
    Disk,
    /// A virtio 9p share whose mount tag matches `bootstrap.tag`.
    #[serde(rename = "9p")]
    NineP,
    /// A bundle tarball fetched from the host (`host.address`), checked against `host.digest`.
    #[serde(rename = "vsock")]
    Vsock,
}

impl Source {
    /// Every source, in the order they are documented.
    pub const ALL: [Source; 3] = [Source::Disk, Source::NineP, Source::Vsock];

    /// The name used in config and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Disk => "disk",
            Source::NineP => "9p",
            Source::Vsock => "vsock",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Source {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        Source::ALL
            .into_iter()
            .find(|src| src.as_str() == s)
            .ok_or_else(|| {
                InvalidValue::new(
                    "bootstrap source",
                    s,
                    "is not a bootstrap source (known: disk, 9p, vsock)",
                )
            })
    }
}

fn default_label() -> Label {
    Label::trusted("BOOTLACE")
}

fn default_tag() -> MountTag {
    MountTag::trusted("bootlace")
}

fn default_wait_ms() -> u64 {
    5000
}

fn default_required() -> bool {
    true
}

/// The host's address: `vsock:<cid>:<port>` (the host is CID 2), or `vsock-notify:<cid>:<port>`
/// for a plain listener that does not answer (messages are not acknowledged; no bundle).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostAddress {
    /// Context id (2 = the host).
    pub cid: u32,
    /// Port.
    pub port: u32,
    /// Notify mode: write messages without waiting for acks.
    pub notify: bool,
}

impl TryFrom<String> for HostAddress {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        let bad = || {
            InvalidValue::new(
                "host address",
                &s,
                "must be vsock:<cid>:<port>, e.g. vsock:2:1024",
            )
        };
        let (notify, rest) = match s.strip_prefix("vsock-notify:") {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix("vsock:").ok_or_else(bad)?),
        };
        let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
        let cid: u32 = cid.parse().map_err(|_| bad())?;
        let port: u32 = port.parse().map_err(|_| bad())?;
        if cid == u32::MAX || port == u32::MAX {
            return Err(bad());
        }
        Ok(HostAddress { cid, port, notify })
    }
}

impl FromStr for HostAddress {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        HostAddress::try_from(s.to_owned())
    }
}

impl From<HostAddress> for String {
    fn from(a: HostAddress) -> String {
        a.to_string()
    }
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.notify { "vsock-notify" } else { "vsock" };
        write!(f, "{scheme}:{}:{}", self.cid, self.port)
    }
}

/// `[host] trust_keys`: each key checked, a bad one named by its place in the list
/// (`host.trust_keys[1]: public key "…" must be …`), and at most
/// [`crate::trust::MAX_TRUST_KEYS`] of them.
fn trust_keys<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<PublicKey>, D::Error> {
    use serde::de::Error as _;
    let texts = Vec::<String>::deserialize(d)?;
    let max = crate::trust::MAX_TRUST_KEYS;
    if texts.len() > max {
        return Err(D::Error::custom(format!(
            "host.trust_keys lists {} keys, at most {max}",
            texts.len()
        )));
    }
    let mut keys: Vec<PublicKey> = Vec::with_capacity(texts.len());
    for (i, t) in texts.into_iter().enumerate() {
        let k = PublicKey::try_from(t)
            .map_err(|e| D::Error::custom(format!("host.trust_keys[{i}]: {e}")))?;
        if keys.contains(&k) {
            return Err(D::Error::custom(format!(
                "host.trust_keys[{i}]: {k} is listed twice"
            )));
        }
        keys.push(k);
    }
    Ok(keys)
}

fn default_connect_ms() -> u64 {
    10_000
}

fn default_io_ms() -> u64 {
    5_000
}

fn default_max_bundle() -> u64 {
    256 * 1024 * 1024
}

/// The host configuration manager the guest reports to (and fetches a vsock bundle from).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// `vsock:2:<port>`; default none (no host: nothing is reported).
    #[serde(default)]
    pub address: Option<HostAddress>,
    /// The sha256 a vsock bundle must have. When present it alone decides (see
    /// [`crate::trust`]); default none.
    #[serde(default)]
    pub digest: Option<Sha256Digest>,
    /// Keys whose signature of a vsock bundle's digest makes it trusted (when no digest is
    /// pinned or given out of band): `ed25519:<base64 of 32 bytes>` each, several for a key
    /// rotation, at most [`crate::trust::MAX_TRUST_KEYS`]. Default none.
    #[serde(
        default,
        deserialize_with = "trust_keys",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub trust_keys: Vec<PublicKey>,
    /// Take a vsock bundle as the host serves it when nothing else decides (no pinned or
    /// out-of-band digest, no trusted keys): the host agent and the vsock path are then
    /// trusted with the guest. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trust_host: bool,
    /// Give up reaching the host after this many ms (retries with backoff); default 10000.
    #[serde(default = "default_connect_ms")]
    pub connect_timeout_ms: u64,
    /// Per-read deadline on the connection, in ms; default 5000.
    #[serde(default = "default_io_ms")]
    pub io_timeout_ms: u64,
    /// Largest bundle accepted, in bytes (compressed and unpacked); default 256 MiB.
    #[serde(default = "default_max_bundle")]
    pub max_bundle_bytes: u64,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            address: None,
            digest: None,
            trust_keys: Vec::new(),
            trust_host: false,
            connect_timeout_ms: default_connect_ms(),
            io_timeout_ms: default_io_ms(),
            max_bundle_bytes: default_max_bundle(),
        }
    }
}

/// Where to find the bootstrap filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bootstrap {
    /// Sources looked at together: the first to appear wins, the order decides only between
    /// sources present at once. Default none (no bootstrap).
    #[serde(default)]
    pub sources: Vec<Source>,
    /// Whether a boot without a bootstrap is a failure; default true.
    #[serde(default = "default_required")]
    pub required: bool,
    /// Filesystem label of a bootstrap disk (1 to 32 bytes); default `BOOTLACE`.
    #[serde(default = "default_label")]
    pub label: Label,
    /// Mount tag of a bootstrap 9p share (1 to 31 bytes); default `bootlace`.
    #[serde(default = "default_tag")]
    pub tag: MountTag,
    /// How long to wait for any source to appear (one deadline for all), in ms; default 5000,
    /// at most 600000.
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
}

impl Default for Bootstrap {
    fn default() -> Self {
        Bootstrap {
            sources: Vec::new(),
            required: default_required(),
            label: default_label(),
            tag: default_tag(),
            wait_ms: default_wait_ms(),
        }
    }
}

/// Console log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Only failed actions.
    Error,
    /// Also abnormal but survivable conditions.
    Warn,
    /// Also one line per boot step (default).
    #[default]
    Info,
    /// Also details of each step.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The matching `log` filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// What the init does when a boot step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    /// Report the failure and power off (default).
    #[default]
    Poweroff,
    /// Report the failure and hand off anyway.
    Continue,
    /// Report the failure and run `/bin/sh` on the console; power off when it exits.
    Shell,
}

impl FailurePolicy {
    /// The policy's name in config.
    pub fn as_str(self) -> &'static str {
        match self {
            FailurePolicy::Poweroff => "poweroff",
            FailurePolicy::Continue => "continue",
            FailurePolicy::Shell => "shell",
        }
    }
}

macro_rules! impl_from_str_serde_enum {
    ($t:ty, $what:literal) => {
        impl FromStr for $t {
            type Err = InvalidValue;
            fn from_str(s: &str) -> Result<Self, InvalidValue> {
                <$t>::deserialize(
                    serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s),
                )
                .map_err(|e| InvalidValue::new($what, s, format!("is not a {}: {e}", $what)))
            }
        }
    };
}
impl_from_str_serde_enum!(LogLevel, "log level");
impl_from_str_serde_enum!(FailurePolicy, "failure policy");

/// The hand-off: what runs after the boot steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Handoff {
    /// `exec` (default): replace PID 1 with `command`; `supervise`: run it as a child.
    #[serde(default)]
    pub mode: HandoffMode,
    /// The real init or the application, argv form. Default `["/sbin/init"]`.
    #[serde(default = "default_command")]
    pub command: Command,
    /// Environment given to `command` on top of `PATH`, `HOME` and `TERM`. Default empty.
    #[serde(default)]
    pub env: BTreeMap<EnvName, ExecString>,
    /// In `supervise` mode, how long the application (and any process left) gets between
    /// SIGTERM and SIGKILL at shutdown, in milliseconds. Default 5000; at most 3600000.
    #[serde(default = "default_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// The working directory `command` starts in (absolute). Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<WorkDir>,
    /// The user ID `command` runs as. Default: root's, as the init runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UnixId>,
    /// The group ID `command` runs as. Default 0 (with `user` or `groups` set; else root's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<UnixId>,
    /// The supplementary group IDs of `command`, at most [`MAX_GROUPS`]. With `user` or
    /// `group` set they replace root's (none when empty). Default none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<UnixId>,
}

impl Handoff {
    /// Whether `command` runs with other credentials than the init's own (`user`, `group` or
    /// `groups` set): then its supplementary groups are set to `groups`, its group ID to
    /// `group` (else 0) and its user ID to `user` (else 0), in that order.
    pub fn changes_credentials(&self) -> bool {
        self.user.is_some() || self.group.is_some() || !self.groups.is_empty()
    }
}

fn default_command() -> Command {
    Command::default_init()
}

fn default_grace_ms() -> u64 {
    5000
}

impl Default for Handoff {
    fn default() -> Self {
        Handoff {
            mode: HandoffMode::default(),
            command: default_command(),
            env: BTreeMap::new(),
            shutdown_grace_ms: default_grace_ms(),
            workdir: None,
            user: None,
            group: None,
            groups: Vec::new(),
        }
    }
}

/// The root filesystem of the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootFs {
    /// Directories backed by a fresh tmpfs at boot, before the bootstrap, with their contents
    /// in the image copied in first: the writable places of a read-only root, so that one
    /// image serves many guests. Each must exist in the image. Default none.
    #[serde(default)]
    pub writable: Vec<TargetPath>,
    /// How stage 1 mounts this root when it is a disk: `false` read-write (an ext4 root baked
    /// read-write), `true` read-only. `ro` / `rw` on the kernel command line win; default
    /// (absent) read-only. The image builder writes it for every disk root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// In an initramfs: a file the image builder writes as the archive's last entry. The init
    /// checks it is there before anything else: a kernel that ran out of memory while unpacking
    /// the archive leaves it out (and boots on a truncated root). Default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unpacked_marker: Option<TargetPath>,
    /// The size of each writable location's tmpfs (the upper layer of its overlay, or its
    /// copy): bytes with a `k`, `m` or `g` suffix, or a percentage of the guest's memory.
    /// Default [`DEFAULT_WRITABLE_SIZE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_size: Option<TmpfsSize>,
    /// Sizes of single writable locations, over `writable_size`: `{ "/var" = "512m" }`. Each
    /// must be listed in `writable`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub writable_sizes: BTreeMap<TargetPath, TmpfsSize>,
}

/// The size of a writable location's tmpfs when the config gives none: a quarter of the
/// guest's memory, so that four of them cannot take it all.
pub const DEFAULT_WRITABLE_SIZE: &str = "25%";

impl RootFs {
    /// The size of the tmpfs behind the writable location `path`.
    pub fn writable_size_of(&self, path: &TargetPath) -> TmpfsSize {
        self.writable_sizes
            .get(path)
            .or(self.writable_size.as_ref())
            .cloned()
            .unwrap_or_else(|| TmpfsSize::trusted(DEFAULT_WRITABLE_SIZE))
    }
}

/// The file the image builder writes as the last entry of every initramfs (see
/// [`RootFs::unpacked_marker`]).
pub const UNPACKED_MARKER: &str = "/etc/bootlace/unpacked";

/// [`UNPACKED_MARKER`] as a path.
pub fn unpacked_marker() -> TargetPath {
    TargetPath::trusted(UNPACKED_MARKER)
}

/// Where the real root filesystem is: `LABEL=<label>` (a filesystem label),
/// `PARTUUID=<guid>` (a GPT partition's unique GUID), `PARTLABEL=<name>` (a GPT partition's
/// name) or a device node such as `/dev/vda`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RootSpec {
    /// The block device whose filesystem has this label.
    Label(String),
    /// The GPT partition with this unique GUID (hex digits in either case when parsed,
    /// printed lowercase).
    PartUuid(Guid),
    /// The GPT partition with this name: 1 to [`gpt::MAX_NAME_UNITS`] UTF-16 code units, no
    /// whitespace or control character (it travels on the kernel command line).
    PartLabel(String),
    /// This device node.
    Device(PathBuf),
}

/// What [`RootSpec`]'s text may be, for its errors.
const ROOT_FORMS: &str =
    "must be LABEL=<label>, PARTUUID=<guid>, PARTLABEL=<name> or a device node under /dev";

/// Checks a `PARTLABEL=` name (`spec` is the whole value, for the error): one a GPT entry can
/// hold and the kernel command line can carry.
fn check_part_label(spec: &str, name: &str) -> Result<(), InvalidValue> {
    let why = if name.is_empty() {
        "PARTLABEL=: the partition name is empty".into()
    } else if name.encode_utf16().count() > gpt::MAX_NAME_UNITS {
        format!(
            "PARTLABEL=: a GPT partition name holds at most {} UTF-16 code units",
            gpt::MAX_NAME_UNITS
        )
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "PARTLABEL=: the partition name may not hold whitespace or control characters".into()
    } else {
        return Ok(());
    };
    Err(InvalidValue::new("root", spec, why))
}

impl TryFrom<String> for RootSpec {
    type Error = InvalidValue;
    fn try_from(s: String) -> Result<Self, InvalidValue> {
        if let Some(label) = s.strip_prefix("LABEL=") {
            let label = Label::try_from(label.to_owned())
                .map_err(|e| InvalidValue::new("root", &s, format!("LABEL=: {}", e.why)))?;
            return Ok(RootSpec::Label(label.as_str().to_owned()));
        }
        if let Some(guid) = s.strip_prefix("PARTUUID=") {
            return guid
                .parse::<Guid>()
                .map(RootSpec::PartUuid)
                .map_err(|e| InvalidValue::new("root", &s, format!("PARTUUID=: {e}")));
        }
        if let Some(name) = s.strip_prefix("PARTLABEL=") {
            check_part_label(&s, name)?;
            return Ok(RootSpec::PartLabel(name.to_owned()));
        }
        let dev = s.strip_prefix("/dev/").filter(|rest| {
            !rest.is_empty()
                && !rest
                    .split('/')
                    .any(|c| c.is_empty() || c == ".." || c == ".")
        });
        match dev {
            Some(_) if !s.contains('\0') => Ok(RootSpec::Device(PathBuf::from(s))),
            _ => Err(InvalidValue::new("root", &s, ROOT_FORMS)),
        }
    }
}

impl From<RootSpec> for String {
    fn from(r: RootSpec) -> String {
        match r {
            RootSpec::Label(l) => format!("LABEL={l}"),
            RootSpec::PartUuid(g) => format!("PARTUUID={g}"),
            RootSpec::PartLabel(n) => format!("PARTLABEL={n}"),
            RootSpec::Device(d) => d.to_string_lossy().into_owned(),
        }
    }
}

impl std::fmt::Display for RootSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(self.clone()))
    }
}

impl FromStr for RootSpec {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, InvalidValue> {
        RootSpec::try_from(s.to_owned())
    }
}

fn default_stage1_init() -> Command {
    Command::default_bootlace()
}

fn default_root_wait_ms() -> u64 {
    10_000
}

/// Stage 1 of a disk-root boot: present only in the config of a stage-1 initramfs. The init
/// loads the block and filesystem modules, mounts the real root, moves /dev, /proc, /sys and
/// /run into it, empties the initramfs, switches root and executes `init` there as PID 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage1 {
    /// The real root. `bootlace.root=` on the kernel command line overrides it, and `root=`
    /// is used when neither gives one. Default none.
    #[serde(default)]
    pub root: Option<RootSpec>,
    /// Mount the root read-write (ext4 only; erofs and squashfs are always read-only).
    /// Default false: the image's own `[root] read_only` decides (see [`Stage1::read_only`]).
    #[serde(default)]
    pub read_write: bool,
    /// `rw` (true) or `ro` (false) on the kernel command line, the last one given: it wins over
    /// everything else. Not part of the file.
    #[serde(skip)]
    pub kernel_rw: Option<bool>,
    /// What to execute inside the real root. Default `["/sbin/bootlace-init"]`.
    #[serde(default = "default_stage1_init")]
    pub init: Command,
    /// How long to wait for the root device to appear, in ms; default 10000, at most 600000.
    #[serde(default = "default_root_wait_ms")]
    pub wait_ms: u64,
}

impl Stage1 {
    /// Whether stage 1 mounts a root of `fstype` read-only, given the image's own
    /// `[root] read_only`: `rw`/`ro` on the kernel command line first, then `read_write` here,
    /// then the image; read-only when nothing says otherwise. Only ext4 can be read-write.
    pub fn read_only(&self, fstype: crate::fs::FsType, image_read_only: Option<bool>) -> bool {
        if fstype != crate::fs::FsType::Ext4 {
            return true;
        }
        match (self.kernel_rw, self.read_write, image_read_only) {
            (Some(rw), _, _) => !rw,
            (None, true, _) => false,
            (None, false, image) => image.unwrap_or(true),
        }
    }
}

impl Default for Stage1 {
    fn default() -> Self {
        Stage1 {
            root: None,
            read_write: false,
            kernel_rw: None,
            init: default_stage1_init(),
            wait_ms: default_root_wait_ms(),
        }
    }
}

/// The validated configuration of one boot (schema version 1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// Schema version; must be 1.
    pub version: i64,
    /// Console log level: `error`, `warn`, `info` (default), `debug`, `trace`.
    #[serde(default)]
    pub log: LogLevel,
    /// What to do when a boot step fails: `poweroff` (default), `continue`, `shell`.
    #[serde(default)]
    pub on_failure: FailurePolicy,
    /// The image this init was baked into (`name@version`, written by the bake): reported to
    /// the host in HELLO (`IMAGE`), so that a fleet can check each guest runs what it should.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// Kernel modules to load at boot, with their dependencies. Default none.
    #[serde(default)]
    pub modules: Vec<ModuleName>,
    /// Where to find the bootstrap filesystem.
    #[serde(default)]
    pub bootstrap: Bootstrap,
    /// The host to report to.
    #[serde(default)]
    pub host: Host,
    /// What runs after the boot steps.
    #[serde(default)]
    pub handoff: Handoff,
    /// The root filesystem: its writable locations.
    #[serde(default)]
    pub root: RootFs,
    /// Present only in a stage-1 initramfs: mount the real root and switch to it.
    #[serde(default)]
    pub stage1: Option<Stage1>,
}

impl Default for InitConfig {
    fn default() -> Self {
        InitConfig {
            version: 1,
            log: LogLevel::default(),
            on_failure: FailurePolicy::default(),
            image: None,
            modules: Vec::new(),
            bootstrap: Bootstrap::default(),
            host: Host::default(),
            handoff: Handoff::default(),
            root: RootFs::default(),
            stage1: None,
        }
    }
}

impl InitConfig {
    /// Parses and validates a config file's text. `path` names the file in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size: text.len() as u64,
            });
        }
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            path: path.to_owned(),
            message: crate::types::toml_error(text, &e),
        };
        use crate::types::{parse_versioned, VersionedError};
        let config: InitConfig = parse_versioned(text, SUPPORTED_VERSIONS, |c: &InitConfig| {
            c.version
        })
        .map_err(|e| match e {
            VersionedError::Version(found) => ConfigError::Version {
                path: path.to_owned(),
                found,
            },
            VersionedError::Toml(e) => parse_err(e),
        })?;
        if config.bootstrap.wait_ms > MAX_WAIT_MS {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "bootstrap.wait_ms = {} is over {MAX_WAIT_MS}",
                    config.bootstrap.wait_ms
                ),
            });
        }
        if let Some(wait) = config.stage1.as_ref().map(|s| s.wait_ms) {
            if wait > MAX_WAIT_MS {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!("stage1.wait_ms = {wait} is over {MAX_WAIT_MS}"),
                });
            }
        }
        if let Some(p) = config
            .root
            .writable_sizes
            .keys()
            .find(|p| !config.root.writable.contains(p))
        {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "root.writable_sizes names {}, which root.writable does not list",
                    p.as_str()
                ),
            });
        }
        for (i, w) in config.root.writable.iter().enumerate() {
            let clash = config
                .root
                .writable
                .iter()
                .skip(i + 1)
                .find(|o| w.is_within(o) || o.is_within(w));
            if let Some(o) = clash {
                return Err(ConfigError::Parse {
                    path: path.to_owned(),
                    message: format!(
                        "root.writable lists {} and {}: one contains the other",
                        w.as_str(),
                        o.as_str()
                    ),
                });
            }
        }
        if config.handoff.shutdown_grace_ms > MAX_GRACE_MS {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "handoff.shutdown_grace_ms = {} is over {MAX_GRACE_MS}",
                    config.handoff.shutdown_grace_ms
                ),
            });
        }
        if config.handoff.groups.len() > MAX_GROUPS {
            return Err(ConfigError::Parse {
                path: path.to_owned(),
                message: format!(
                    "handoff.groups lists {} groups, at most {MAX_GROUPS}",
                    config.handoff.groups.len()
                ),
            });
        }
        Ok(config)
    }

    /// Reads and validates a config file; `Ok(None)` when it does not exist.
    pub fn read(path: &Path) -> Result<Option<Self>, ConfigError> {
        let read_err = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
        };
        let text = crate::types::read_capped(file, MAX_CONFIG_BYTES).map_err(read_err)?;
        Self::from_toml(&text, path).map(Some)
    }

    /// Renders the config as TOML (what the image builder bakes).
    pub fn to_toml(&self) -> String {
        // Serialising plain data with string keys cannot fail; fall back to an empty
        // document rather than panicking if it ever did.
        toml::to_string(self).unwrap_or_default()
    }

    /// Applies typed overrides (from the kernel command line or the image builder's flags).
    /// `bootlace.root` / `--root` only applies to a stage-1 config: the real root's init sees
    /// the same command line and ignores it.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(v) = o.log {
            self.log = v;
        }
        if let Some(v) = o.on_failure {
            self.on_failure = v;
        }
        if let Some(v) = o.handoff {
            self.handoff.mode = v;
        }
        if let Some(v) = &o.exec {
            self.handoff.command = v.clone();
        }
        for m in &o.modules {
            if !self.modules.contains(m) {
                self.modules.push(m.clone());
            }
        }
        if let Some(v) = &o.sources {
            self.bootstrap.sources = v.clone();
        }
        if let Some(v) = o.required {
            self.bootstrap.required = v;
        }
        if let Some(v) = &o.label {
            self.bootstrap.label = v.clone();
        }
        if let Some(v) = &o.tag {
            self.bootstrap.tag = v.clone();
        }
        if let Some(v) = o.host {
            self.host.address = Some(v);
        }
        if let Some(v) = &o.digest {
            self.host.digest = Some(v.clone());
        }
        if let (Some(v), Some(stage1)) = (&o.root, &mut self.stage1) {
            stage1.root = Some(v.clone());
        }
    }

    /// The checks that only hold for the whole, effective configuration (file and overrides
    /// together): the init runs them at boot, the image builder before it bakes.
    pub fn validate(&self) -> Result<(), Inconsistency> {
        if self.bootstrap.sources.contains(&Source::Vsock) {
            match self.host.address {
                None => return Err(Inconsistency::VsockWithoutHost),
                Some(a) if a.notify => return Err(Inconsistency::VsockNotifyHost(a.to_string())),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Whether the vsock source is configured with nothing in the image to trust a bundle by
    /// (no pinned digest, no trusted keys, no `trust_host`): the boot then relies on a digest
    /// given at boot (`bootlace.digest=`, SMBIOS type 11 or fw_cfg) and refuses the bundle
    /// without one. Valid; the image builder says so when it bakes one.
    pub fn vsock_trusts_only_boot_digests(&self) -> bool {
        self.bootstrap.sources.contains(&Source::Vsock)
            && self.host.digest.is_none()
            && self.host.trust_keys.is_empty()
            && !self.host.trust_host
    }
}

/// Typed overrides of a configuration: what the `bootlace.*` kernel command line keys and the
/// image builder's flags can change. Later values win; modules accumulate.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `bootlace.log=`.
    pub log: Option<LogLevel>,
    /// `bootlace.failure=`.
    pub on_failure: Option<FailurePolicy>,
    /// `bootlace.handoff=`.
    pub handoff: Option<HandoffMode>,
    /// `bootlace.exec=`.
    pub exec: Option<Command>,
    /// `bootlace.modules=` (added to the config's).
    pub modules: Vec<ModuleName>,
    /// `bootlace.source=` (replaces the config's).
    pub sources: Option<Vec<Source>>,
    /// `bootlace.bootstrap=required|optional`.
    pub required: Option<bool>,
    /// `bootlace.label=`.
    pub label: Option<Label>,
    /// `bootlace.tag=`.
    pub tag: Option<MountTag>,
    /// `bootlace.host=`.
    pub host: Option<HostAddress>,
    /// `bootlace.digest=`.
    pub digest: Option<Sha256Digest>,
    /// `bootlace.root=` (stage 1 only).
    pub root: Option<RootSpec>,
}

impl Overrides {
    /// Reads one `bootlace.*` kernel command line parameter into the overrides; parameters of
    /// other namespaces are not bootlace's business and are ignored. The error names the key.
    pub fn set_param(&mut self, param: &Param) -> Result<(), ConfigError> {
        if !param.key.starts_with("bootlace.") {
            return Ok(());
        }
        let key = param.key.as_str();
        if !CMDLINE_KEYS.contains(&key) {
            return Err(ConfigError::UnknownKey {
                key: key.to_owned(),
            });
        }
        let value = param.value.as_deref().unwrap_or("");
        let bad = |reason: String| ConfigError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            reason,
        };
        if param.value.is_none() {
            return Err(bad("needs a value (key=value)".to_owned()));
        }
        self.set(key, value).map_err(|e| bad(e.to_string()))
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), InvalidValue> {
        match key {
            "bootlace.log" => self.log = Some(value.parse()?),
            "bootlace.failure" => self.on_failure = Some(value.parse()?),
            "bootlace.handoff" => self.handoff = Some(value.parse()?),
            "bootlace.modules" => {
                for name in value.split(',').filter(|n| !n.is_empty()) {
                    let name = ModuleName::try_from(name.to_owned())?;
                    if !self.modules.contains(&name) {
                        self.modules.push(name);
                    }
                }
            }
            "bootlace.source" => self.sources = Some(parse_sources(value)?),
            "bootlace.bootstrap" => {
                self.required = Some(match value {
                    "required" => true,
                    "optional" => false,
                    _ => {
                        return Err(InvalidValue::new(
                            "bootstrap",
                            value,
                            "must be required or optional",
                        ))
                    }
                })
            }
            "bootlace.label" => self.label = Some(value.parse()?),
            "bootlace.tag" => self.tag = Some(value.parse()?),
            "bootlace.host" => self.host = Some(value.parse()?),
            "bootlace.digest" => {
                self.digest = Some(value.parse().map_err(|e: crate::digest::BadDigest| {
                    InvalidValue::new("digest", value, e.to_string())
                })?)
            }
            "bootlace.root" => self.root = Some(value.parse()?),
            "bootlace.exec" => self.exec = Some(parse_command(value)?),
            _ => {}
        }
        Ok(())
    }
}

/// A comma-separated list of bootstrap sources (`disk,9p`); empty entries are skipped.
pub fn parse_sources(value: &str) -> Result<Vec<Source>, InvalidValue> {
    value
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// A command written shell-style (`/bin/app --flag 'a b'`), split into argv words.
pub fn parse_command(value: &str) -> Result<Command, InvalidValue> {
    let words = cmdline::split_command(value)
        .map_err(|e| InvalidValue::new("command", value, e.to_string()))?;
    Command::try_from(words)
}

/// The outcome of loading the configuration: the config to boot with, and the first error met.
///
/// When there is an error, `config` is the best that could be had — the file's config (or the
/// defaults if the file itself was bad) with every valid command line key applied — so the
/// failure policy the user asked for is still the one that handles the error.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration to use.
    pub config: InitConfig,
    /// Whether a config file was found.
    pub from_file: bool,
    /// The first error, if any.
    pub error: Option<ConfigError>,
}

/// Whether a missing config file is an error (a file named by hand) or means the defaults
/// (the image's own `/etc/bootlace/init.toml`, which a bare initramfs may not have).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IfMissing {
    /// Boot with the built-in defaults.
    Defaults,
    /// Refuse: the file was asked for.
    Error,
}

/// Loads the effective configuration from the file at `path` and the kernel command line (its
/// raw bytes: only `bootlace.*` parameters must be UTF-8), then validates the whole.
pub fn load(path: &Path, cmdline: &[u8], if_missing: IfMissing) -> Loaded {
    let (mut config, from_file, mut error) = match InitConfig::read(path) {
        Ok(Some(c)) => (c, true, None),
        Ok(None) if if_missing == IfMissing::Defaults => (InitConfig::default(), false, None),
        Ok(None) => (
            InitConfig::default(),
            false,
            Some(ConfigError::Missing {
                path: path.to_owned(),
            }),
        ),
        Err(e) => (InitConfig::default(), true, Some(e)),
    };
    let mut overrides = Overrides::default();
    let mut kernel_root = None;
    for param in cmdline::parse_bytes(cmdline) {
        let param = match param {
            Ok(p) => p,
            Err(e) => {
                error.get_or_insert(ConfigError::BadValue {
                    key: e.key,
                    value: e.value,
                    reason: "is not UTF-8".to_owned(),
                });
                continue;
            }
        };
        match (param.key.as_str(), param.value.as_deref()) {
            ("root", Some(v)) => kernel_root = Some(v.to_owned()),
            ("rw" | "ro", None) => {
                if let Some(s1) = &mut config.stage1 {
                    s1.kernel_rw = Some(param.key == "rw");
                }
            }
            _ => {}
        }
        if let Err(e) = overrides.set_param(&param) {
            error.get_or_insert(e);
        }
    }
    config.apply(&overrides);
    // Stage 1 falls back on the kernel's own `root=` when neither the file nor
    // `bootlace.root=` names the root.
    if let (Some(s1), Some(v)) = (&mut config.stage1, kernel_root) {
        if s1.root.is_none() {
            match RootSpec::try_from(v.clone()) {
                Ok(spec) => s1.root = Some(spec),
                Err(reason) => {
                    error.get_or_insert(ConfigError::BadValue {
                        key: "root".to_owned(),
                        value: v,
                        reason: reason.to_string(),
                    });
                }
            }
        }
    }
    if error.is_none() {
        error = config.validate().err().map(ConfigError::from);
    }
    Loaded {
        config,
        from_file,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<InitConfig, ConfigError> {
        InitConfig::from_toml(text, Path::new("init.toml"))
    }

    #[test]
    fn valid_files() {
        let full = r#"
version = 1
log = "debug"
on_failure = "shell"
modules = ["virtio-blk", "9pnet_virtio"]
[handoff]
mode = "supervise"
command = ["/bin/app", "--flag"]
env = { APP_MODE = "prod", _X1 = "" }
shutdown_grace_ms = 250
"#;
        let c = parse(full).expect("full config parses");
        assert_eq!(c.log, LogLevel::Debug);
        assert_eq!(c.on_failure, FailurePolicy::Shell);
        let mods: Vec<&str> = c.modules.iter().map(ModuleName::as_str).collect();
        assert_eq!(mods, ["virtio_blk", "9pnet_virtio"]);
        assert_eq!(c.handoff.mode, HandoffMode::Supervise);
        assert_eq!(c.handoff.command.to_string(), "/bin/app --flag");
        assert_eq!(c.handoff.shutdown_grace_ms, 250);
        assert_eq!(c.handoff.env.len(), 2);

        let minimal = parse("version = 1\n").expect("minimal parses");
        assert_eq!(minimal, InitConfig::default());
        assert_eq!(minimal.handoff.command.to_string(), "/sbin/init");
    }

    #[test]
    fn handoff_workdir_user_group_groups() {
        let c = parse(
            "version = 1\n[handoff]\nworkdir = \"/srv/app\"\nuser = 1000\ngroup = 100\n\
             groups = [10, 20]\n",
        )
        .expect("parses");
        assert_eq!(
            c.handoff.workdir.as_ref().map(WorkDir::as_str),
            Some("/srv/app")
        );
        assert_eq!(c.handoff.user.map(UnixId::get), Some(1000));
        assert_eq!(c.handoff.group.map(UnixId::get), Some(100));
        let groups: Vec<u32> = c.handoff.groups.iter().map(|g| g.get()).collect();
        assert_eq!(groups, [10, 20]);
        assert!(c.handoff.changes_credentials());
        assert_eq!(parse(&c.to_toml()).expect("round trip"), c);
        // Absent: the init's own credentials and `/`; nothing written for them.
        let d = InitConfig::default();
        assert!(!d.handoff.changes_credentials());
        assert!(!d.to_toml().contains("workdir"), "{}", d.to_toml());
        assert!(parse("version = 1\n[handoff]\nworkdir = \"/\"\n").is_ok());
        let bad: &[(&str, &str)] = &[
            ("workdir = \"srv\"", "must be absolute"),
            ("workdir = \"/srv/../etc\"", "\"..\" component"),
            ("workdir = \"/srv//x\"", "empty component"),
            ("user = -1", "line 3, column 8"),
            ("user = 4294967295", "-1"),
            ("group = 4294967296", "expected u32"),
            ("user = \"app\"", "expected u32"),
        ];
        for (line, want) in bad {
            let e = parse(&format!("version = 1\n[handoff]\n{line}\n"))
                .expect_err(line)
                .to_string();
            assert!(e.contains(want), "{line}: {e}");
        }
        let many: Vec<String> = (0..=MAX_GROUPS).map(|g| g.to_string()).collect();
        let e = parse(&format!(
            "version = 1\n[handoff]\ngroups = [{}]\n",
            many.join(",")
        ))
        .expect_err("too many groups")
        .to_string();
        assert!(e.contains("at most 1024"), "{e}");
    }

    #[test]
    fn round_trips_through_toml() {
        let mut c = InitConfig::default();
        c.handoff.mode = HandoffMode::Supervise;
        c.modules
            .push(ModuleName::try_from("vsock".to_owned()).expect("valid"));
        c.handoff.env.insert(
            EnvName::try_from("A".to_owned()).expect("valid"),
            ExecString::try_from("b c".to_owned()).expect("valid"),
        );
        let text = c.to_toml();
        assert_eq!(parse(&text).expect("round trip"), c, "{text}");
    }

    #[test]
    fn invalid_files_name_the_cause() {
        let cases: &[(&str, &str)] = &[
            ("", "unsupported config version 0"),
            ("version = 2", "unsupported config version 2"),
            ("version = \"1\"", "unsupported config version 0"),
            ("version = 1\nbogus = 1", "bogus"),
            ("version = 1\n[handoff]\nmod = \"exec\"", "mod"),
            ("version = 1\nlog = \"loud\"", "loud"),
            ("version = 1\nlog = 3", "wanted string"),
            ("version = 1\non_failure = \"reboot\"", "reboot"),
            ("version = 1\nmodules = [\"a/b\"]", "may hold only"),
            ("version = 1\nmodules = [\"\"]", "1 to 56 bytes"),
            ("version = 1\n[handoff]\ncommand = []", "command is empty"),
            (
                "version = 1\n[handoff]\ncommand = [\"init\"]",
                "absolute path",
            ),
            ("version = 1\n[handoff]\ncommand = [\"/a\\u0000b\"]", "NUL"),
            (
                "version = 1\n[handoff]\nenv = { \"1A\" = \"x\" }",
                "[A-Za-z_]",
            ),
            (
                "version = 1\n[handoff]\nenv = { \"A=B\" = \"x\" }",
                "[A-Za-z_]",
            ),
            (
                "version = 1\n[handoff]\nshutdown_grace_ms = 3600001",
                "over",
            ),
            ("version = 1\nversion = 1", "duplicate"),
            ("version = 1\n[[[", "init.toml"),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(want), "{text:?}: error {err:?} lacks {want:?}");
            assert!(
                err.contains("init.toml"),
                "{text:?}: error {err:?} lacks the path"
            );
        }
    }

    #[test]
    fn oversized_and_deeply_nested_files_are_refused() {
        let big = format!("version = 1\n#{}\n", "x".repeat(MAX_CONFIG_BYTES as usize));
        assert!(matches!(parse(&big), Err(ConfigError::TooLarge { .. })));
        let deep = format!(
            "version = 1\nx = {}{}",
            "[".repeat(10_000),
            "]".repeat(10_000)
        );
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn command_line_overrides() {
        let base = InitConfig::default();
        type Check = fn(&InitConfig) -> bool;
        let cases: &[(&str, Check)] = &[
            ("bootlace.log=debug", |c| c.log == LogLevel::Debug),
            ("bootlace.failure=continue", |c| {
                c.on_failure == FailurePolicy::Continue
            }),
            ("bootlace.handoff=supervise", |c| {
                c.handoff.mode == HandoffMode::Supervise
            }),
            (r#"bootlace.exec="/bin/sh -c 'exit 7'""#, |c| {
                c.handoff.command.argv().collect::<Vec<_>>() == ["/bin/sh", "-c", "exit 7"]
            }),
            ("bootlace.modules=a-b,c bootlace.modules=c,d", |c| {
                c.modules.iter().map(ModuleName::as_str).collect::<Vec<_>>() == ["a_b", "c", "d"]
            }),
            ("console=ttyS0 quiet foo.bar=1", |c| {
                c == &InitConfig::default()
            }),
            ("bootlace.log=debug bootlace.log=warn", |c| {
                c.log == LogLevel::Warn
            }),
            ("bootlace.host=vsock:2:1024 bootlace.digest=sha256:00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF", |c| {
                c.host.address == Some(HostAddress { cid: 2, port: 1024, notify: false })
                    && c.host.digest.as_ref().map(Sha256Digest::hex)
                        == Some("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
            }),
            ("bootlace.source=9p,disk", |c| {
                c.bootstrap.sources == [Source::NineP, Source::Disk]
            }),
            (
                "bootlace.bootstrap=optional bootlace.label=BOOT2 bootlace.tag=t",
                |c| {
                    !c.bootstrap.required
                        && c.bootstrap.label.as_str() == "BOOT2"
                        && c.bootstrap.tag.as_str() == "t"
                },
            ),
        ];
        for (line, check) in cases {
            let mut c = base.clone();
            let mut o = Overrides::default();
            for p in cmdline::parse(line) {
                o.set_param(&p).unwrap_or_else(|e| panic!("{line}: {e}"));
            }
            c.apply(&o);
            assert!(check(&c), "{line}: {c:?}");
        }
    }

    #[test]
    fn bad_command_line_keys_are_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "bootlace.bogus=1",
                "unknown kernel command line key \"bootlace.bogus\"",
            ),
            ("bootlace.log", "needs a value"),
            ("bootlace.log=loud", "bootlace.log=\"loud\""),
            ("bootlace.failure=explode", "failure policy"),
            ("bootlace.exec=init", "absolute path"),
            ("bootlace.exec=\"/bin/sh 'x\"", "unterminated"),
            ("bootlace.modules=a/b", "may hold only"),
            ("bootlace.source=nfs", "not a bootstrap source"),
            ("bootlace.bootstrap=maybe", "required or optional"),
            ("bootlace.host=tcp:1.2.3.4:5", "vsock:<cid>:<port>"),
            ("bootlace.digest=md5:abc", "sha256:<64 hex digits>"),
        ];
        for (line, want) in cases {
            let mut o = Overrides::default();
            let errs: Vec<String> = cmdline::parse(line)
                .iter()
                .filter_map(|p| o.set_param(p).err())
                .map(|e| e.to_string())
                .collect();
            assert_eq!(errs.len(), 1, "{line}: {errs:?}");
            assert!(errs[0].contains(want), "{line}: {errs:?} lacks {want:?}");
        }
    }

    #[test]
    fn load_keeps_the_best_effort_config_and_first_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.toml");
        std::fs::write(&path, "version = 1\non_failure = \"continue\"\n").expect("write");
        let l = load(
            &path,
            "bootlace.nope=1 bootlace.log=debug bootlace.log=x".as_bytes(),
            IfMissing::Defaults,
        );
        assert!(l.from_file);
        assert_eq!(l.config.on_failure, FailurePolicy::Continue);
        assert_eq!(l.config.log, LogLevel::Debug);
        assert!(matches!(l.error, Some(ConfigError::UnknownKey { .. })));

        std::fs::write(&path, "version = 9\n").expect("write");
        let l = load(
            &path,
            "bootlace.failure=shell".as_bytes(),
            IfMissing::Defaults,
        );
        assert_eq!(l.config.on_failure, FailurePolicy::Shell);
        assert!(matches!(
            l.error,
            Some(ConfigError::Version { found: 9, .. })
        ));

        let l = load(
            &dir.path().join("absent.toml"),
            "".as_bytes(),
            IfMissing::Defaults,
        );
        assert!(!l.from_file && l.error.is_none());
        assert_eq!(l.config, InitConfig::default());
    }

    #[test]
    fn the_effective_config_is_validated() {
        let mut c = InitConfig::default();
        c.bootstrap.sources = vec![Source::Disk, Source::Vsock];
        assert_eq!(c.validate(), Err(Inconsistency::VsockWithoutHost));
        c.host.address = "vsock-notify:2:1024".parse().ok();
        assert!(matches!(
            c.validate(),
            Err(Inconsistency::VsockNotifyHost(a)) if a == "vsock-notify:2:1024"
        ));
        c.host.address = "vsock:2:1024".parse().ok();
        // Nothing baked to trust a bundle by: valid, relying on a digest given at boot.
        assert_eq!(c.validate(), Ok(()));
        assert!(c.vsock_trusts_only_boot_digests());
        c.host.trust_host = true;
        assert!(!c.vsock_trusts_only_boot_digests());
        c.host.trust_host = false;
        c.host.digest = format!("sha256:{}", "0".repeat(64)).parse().ok();
        assert_eq!(c.validate(), Ok(()));
        assert!(!c.vsock_trusts_only_boot_digests());
        // A notify-only host without the vsock source is fine (it only listens).
        let mut c = InitConfig::default();
        c.host.address = "vsock-notify:2:1024".parse().ok();
        assert_eq!(c.validate(), Ok(()));

        // load() runs it on the file and the command line together.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.toml");
        std::fs::write(&path, "version = 1\n[bootstrap]\nsources = [\"vsock\"]\n").expect("w");
        let l = load(&path, "".as_bytes(), IfMissing::Defaults);
        assert!(
            matches!(
                l.error,
                Some(ConfigError::Inconsistent(Inconsistency::VsockWithoutHost))
            ),
            "{:?}",
            l.error
        );
        let line = format!(
            "bootlace.host=vsock:2:1024 bootlace.digest=sha256:{}",
            "1".repeat(64)
        );
        assert!(load(&path, line.as_bytes(), IfMissing::Defaults)
            .error
            .is_none());
        // A command line error is the first error, not the inconsistency it leaves.
        let l = load(&path, "bootlace.host=nope".as_bytes(), IfMissing::Defaults);
        assert!(
            matches!(l.error, Some(ConfigError::BadValue { .. })),
            "{:?}",
            l.error
        );
    }

    #[test]
    fn only_bootlace_keys_must_be_utf8_and_values_fit_their_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let l = load(
            &path,
            b"FOO=\xff init=/x\xfe bootlace.log=debug",
            IfMissing::Defaults,
        );
        assert!(l.error.is_none(), "{:?}", l.error);
        assert_eq!(l.config.log, LogLevel::Debug);
        let l = load(&path, b"bootlace.tag=\xff", IfMissing::Defaults);
        let e = l.error.expect("an error").to_string();
        assert!(
            e.contains("bootlace.tag=") && e.contains("is not UTF-8"),
            "{e}"
        );
        // A label longer than any filesystem keeps is refused, naming the key, not waited for.
        let long = format!("bootlace.label={}", "L".repeat(1900));
        let e = load(&path, long.as_bytes(), IfMissing::Defaults)
            .error
            .expect("an error")
            .to_string();
        assert!(
            e.contains("bootlace.label=") && e.contains("must be 1 to 32 bytes"),
            "{e}"
        );
        let e = load(
            &path,
            format!("bootlace.tag={}", "t".repeat(32)).as_bytes(),
            IfMissing::Defaults,
        )
        .error
        .expect("an error")
        .to_string();
        assert!(
            e.contains("bootlace.tag=") && e.contains("must be 1 to 31 bytes"),
            "{e}"
        );
    }

    #[test]
    fn a_named_config_that_is_missing_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("absent.toml");
        let l = load(&path, "".as_bytes(), IfMissing::Error);
        let e = l.error.expect("an error");
        assert!(e.to_string().contains("absent.toml does not exist"), "{e}");
        assert!(!l.from_file);
    }

    #[test]
    fn overrides_apply_like_the_command_line() {
        let mut o = Overrides::default();
        for p in cmdline::parse("bootlace.source=9p,disk bootlace.bootstrap=optional") {
            o.set_param(&p).expect("valid");
        }
        let typed = Overrides {
            sources: Some(vec![Source::NineP, Source::Disk]),
            required: Some(false),
            ..Overrides::default()
        };
        assert_eq!(o, typed);
        let mut a = InitConfig::default();
        let mut b = InitConfig::default();
        a.apply(&o);
        b.apply(&typed);
        assert_eq!(a, b);
        assert_eq!(
            parse_sources("disk,nfs").expect_err("nfs").to_string(),
            "bootstrap source \"nfs\" is not a bootstrap source (known: disk, 9p, vsock)"
        );
    }

    #[test]
    fn root_spec_forms_round_trip() {
        let guid = "5C1B6F2E-0A3D-4E8F-9B7A-1D2C3E4F5A6B";
        let cases = [
            (
                "LABEL=bootlace-root",
                RootSpec::Label("bootlace-root".into()),
            ),
            (
                "PARTUUID=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6b",
                RootSpec::PartUuid(guid.parse().expect("guid")),
            ),
            ("PARTLABEL=root", RootSpec::PartLabel("root".into())),
            (
                "PARTLABEL=ünïcode-root",
                RootSpec::PartLabel("ünïcode-root".into()),
            ),
            ("/dev/vda2", RootSpec::Device("/dev/vda2".into())),
        ];
        for (text, want) in cases {
            let got: RootSpec = text.parse().expect(text);
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), text, "printed back");
            assert_eq!(String::from(got.clone()).parse::<RootSpec>(), Ok(got));
        }
        // Upper-case hex is taken and printed lower-case.
        let upper: RootSpec = format!("PARTUUID={guid}").parse().expect("upper");
        assert_eq!(
            upper.to_string(),
            format!("PARTUUID={}", guid.to_lowercase())
        );
        // The longest name: 36 UTF-16 code units (a character outside the BMP takes two).
        let longest = format!("{}\u{1F600}", "r".repeat(34));
        assert!(format!("PARTLABEL={longest}").parse::<RootSpec>().is_ok());
        // In a config file, where serde goes through the same String form.
        let c = parse(&format!(
            "version = 1\n[stage1]\nroot = \"PARTUUID={guid}\"\n"
        ))
        .expect("parses");
        assert_eq!(c.stage1.as_ref().and_then(|s| s.root.clone()), Some(upper));
        assert_eq!(parse(&c.to_toml()).expect("round trip"), c);
    }

    #[test]
    fn bad_root_specs_say_why() {
        let too_long = format!("PARTLABEL={}", "r".repeat(37));
        let too_long_wide = format!("PARTLABEL={}\u{1F600}", "r".repeat(35));
        for (text, why) in [
            ("PARTUUID=", "is not a GUID"),
            ("PARTUUID=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6", "is not a GUID"),
            ("PARTUUID=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6g", "is not a GUID"),
            ("PARTUUID=5c1b6f2e0a3d4e8f9b7a1d2c3e4f5a6b", "is not a GUID"),
            ("partuuid=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6b", "PARTUUID=<guid>"),
            ("PARTLABEL=", "the partition name is empty"),
            (&too_long, "at most 36 UTF-16 code units"),
            (&too_long_wide, "at most 36 UTF-16 code units"),
            ("PARTLABEL=my root", "whitespace"),
            ("PARTLABEL=root\t", "whitespace"),
            ("PARTLABEL=ro\0ot", "control characters"),
            ("UUID=1", "must be LABEL=<label>, PARTUUID=<guid>, PARTLABEL=<name> or a device node under /dev"),
        ] {
            let e = text.parse::<RootSpec>().expect_err(text).to_string();
            assert!(e.contains(why), "{text:?}: {e}");
        }
    }

    #[test]
    fn root_and_stage1() {
        let c = parse(
            "version = 1\n[root]\nwritable = [\"/etc\", \"/var\"]\n[stage1]\nroot = \"LABEL=ROOT\"\n",
        )
        .expect("parses");
        let w: Vec<&str> = c.root.writable.iter().map(TargetPath::as_str).collect();
        assert_eq!(w, ["/etc", "/var"]);
        let s1 = c.stage1.clone().expect("stage1");
        assert_eq!(s1.root, Some(RootSpec::Label("ROOT".to_owned())));
        assert_eq!(s1.init.to_string(), "/sbin/bootlace-init");
        assert!(!s1.read_write);
        assert_eq!(parse(&c.to_toml()).expect("round trip"), c);

        for (text, want) in [
            (
                "[root]\nwritable = [\"/etc\", \"/etc/x\"]",
                "one contains the other",
            ),
            ("[root]\nwritable = [\"etc\"]", "absolute"),
            ("[root]\nwritable = [\"/proc\"]", "/proc"),
            ("[stage1]\nroot = \"UUID=1\"", "LABEL=<label>"),
            ("[stage1]\nroot = \"/dev/../etc\"", "device node"),
            ("[stage1]\nwait_ms = 600001", "over"),
            ("[stage1]\nbogus = 1", "bogus"),
            (
                "[root]\nwritable = [\"/etc\"]\nwritable_sizes = { \"/var\" = \"1m\" }",
                "root.writable_sizes names /var, which root.writable does not list",
            ),
            ("[root]\nwritable_size = \"lots\"", "tmpfs size"),
        ] {
            let e = parse(&format!("version = 1\n{text}\n")).expect_err(text);
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn each_writable_location_has_a_size() {
        let c = parse("version = 1\n[root]\nwritable = [\"/etc\", \"/var\"]\n").expect("parses");
        let size = |c: &InitConfig, p: &str| {
            c.root
                .writable_size_of(&TargetPath::try_from(p.to_owned()).expect("path"))
                .as_str()
                .to_owned()
        };
        assert_eq!(size(&c, "/var"), DEFAULT_WRITABLE_SIZE);
        let c = parse(
            "version = 1\n[root]\nwritable = [\"/etc\", \"/var\"]\nwritable_size = \"16m\"\n\
             writable_sizes = { \"/var\" = \"50%\" }\n",
        )
        .expect("parses");
        assert_eq!(
            (size(&c, "/etc"), size(&c, "/var")),
            ("16m".into(), "50%".into())
        );
        assert_eq!(parse(&c.to_toml()).expect("round trip"), c);
    }

    #[test]
    fn stage1_mounts_the_root_as_the_image_says_unless_told_otherwise() {
        use crate::fs::FsType::{Erofs, Ext4, Squashfs};
        let s1 = |kernel_rw, read_write| Stage1 {
            kernel_rw,
            read_write,
            ..Stage1::default()
        };
        // (kernel rw/ro, [stage1] read_write, fstype, the image's [root] read_only) -> ro?
        let cases = [
            (None, false, Ext4, None, true),
            (None, false, Ext4, Some(false), false),
            (None, false, Ext4, Some(true), true),
            (None, true, Ext4, None, false),
            (None, true, Ext4, Some(true), false),
            (Some(false), true, Ext4, Some(false), true),
            (Some(true), false, Ext4, Some(true), false),
            (Some(true), true, Erofs, Some(false), true),
            (None, false, Squashfs, Some(false), true),
        ];
        for (kernel, rw, fstype, image, want) in cases {
            assert_eq!(
                s1(kernel, rw).read_only(fstype, image),
                want,
                "{kernel:?} {rw} {fstype} {image:?}"
            );
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.toml");
        std::fs::write(&path, "version = 1\n[stage1]\n").expect("write");
        let l = load(&path, b"rw ro", IfMissing::Defaults);
        assert_eq!(l.config.stage1.expect("stage1").kernel_rw, Some(false));
    }

    #[test]
    fn stage1_root_from_the_command_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("init.toml");
        std::fs::write(&path, "version = 1\n[stage1]\n").expect("write");
        let l = load(&path, "root=/dev/vda rw".as_bytes(), IfMissing::Defaults);
        assert!(l.error.is_none(), "{:?}", l.error);
        let s1 = l.config.stage1.expect("stage1");
        assert_eq!(s1.root, Some(RootSpec::Device("/dev/vda".into())));
        assert_eq!(s1.kernel_rw, Some(true));
        // bootlace.root= wins over root=, in any order.
        let l = load(
            &path,
            "bootlace.root=LABEL=R root=/dev/vda".as_bytes(),
            IfMissing::Defaults,
        );
        assert_eq!(
            l.config.stage1.expect("stage1").root,
            Some(RootSpec::Label("R".to_owned()))
        );
        // The kernel's own PARTUUID= form, as a bootable disk's command line gives it.
        let l = load(
            &path,
            "root=PARTUUID=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6b".as_bytes(),
            IfMissing::Defaults,
        );
        assert!(l.error.is_none(), "{:?}", l.error);
        assert_eq!(
            l.config.stage1.expect("stage1").root.map(|r| r.to_string()),
            Some("PARTUUID=5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6b".to_owned())
        );
        // Outside stage 1 both are ignored (the real root's init sees the same line).
        std::fs::write(&path, "version = 1\n").expect("write");
        let l = load(
            &path,
            "bootlace.root=LABEL=R root=/dev/vda rw".as_bytes(),
            IfMissing::Defaults,
        );
        assert!(l.error.is_none() && l.config.stage1.is_none());
        // ... but a malformed bootlace.root= is still an error.
        let l = load(
            &path,
            "bootlace.root=UUID=x".as_bytes(),
            IfMissing::Defaults,
        );
        assert!(l.error.is_some());
    }

    #[test]
    fn trust_keys_and_trust_host() {
        let k1 = "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
        let k2 = "ed25519:PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=";
        let c = parse(&format!(
            "version = 1\n[host]\ntrust_keys = [\"{k1}\", \"{k2}\"]\ntrust_host = true\n"
        ))
        .expect("parses");
        let keys: Vec<String> = c.host.trust_keys.iter().map(|k| k.to_string()).collect();
        assert_eq!(keys, [k1, k2]);
        assert!(c.host.trust_host);
        assert_eq!(parse(&c.to_toml()).expect("round trip"), c);
        // Nothing about trust is written when nothing is set (older images read the same).
        let plain = InitConfig::default().to_toml();
        assert!(!plain.contains("trust"), "{plain}");

        let many: Vec<String> = (0..33).map(|_| format!("\"{k1}\"")).collect();
        for (text, want) in [
            (
                format!("trust_keys = [\"{k1}\", \"ed25519:AAAA\"]"),
                "host.trust_keys[1]: public key \"ed25519:AAAA\" must be ed25519:<base64 of 32 bytes>",
            ),
            (
                "trust_keys = [\"11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=\"]".to_owned(),
                "host.trust_keys[0]: public key \"11qY",
            ),
            (
                format!("trust_keys = [\"{k1}\", \"{k1}\"]"),
                "host.trust_keys[1]: ed25519:11qY",
            ),
            (
                format!("trust_keys = [{}]", many.join(", ")),
                "host.trust_keys lists 33 keys, at most 32",
            ),
            ("trust_keys = \"x\"".to_owned(), "invalid type"),
            ("trust_host = \"yes\"".to_owned(), "invalid type"),
        ] {
            let e = parse(&format!("version = 1\n[host]\n{text}\n")).expect_err(&text);
            assert!(e.to_string().contains(want), "{text}: {e}");
            assert!(e.to_string().contains("line 3"), "{text}: {e}");
        }
    }

    #[test]
    fn the_documented_init_toml_parses() {
        let doc = include_str!("../../docs/boot.md");
        let start = doc.find("```toml\n").expect("a toml block in docs/boot.md") + 8;
        let len = doc[start..].find("```").expect("closed block");
        // The digest is elided in the prose; any valid one stands in for it.
        let text =
            doc[start..start + len].replace("sha256:…", &format!("sha256:{}", "ab".repeat(32)));
        let c = parse(&text).unwrap_or_else(|e| panic!("docs/boot.md init.toml: {e}"));
        assert_eq!(c.root.writable.len(), 2);
        assert!(c.stage1.is_some() && c.host.address.is_some());
    }
}
