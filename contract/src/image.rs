//! The metadata file written beside every baked image (`<image>.meta.json`): what the image
//! is (name, version, format), how to check it (sha256, size), what it was made from (input
//! digests, init, kernel modules, tool versions) and when (SOURCE_DATE_EPOCH). The builder
//! writes it; `bootlace-vm` reads it to boot an image by name and version. Schema 2 (1 is read);
//! docs/image.md lists the fields.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::fs::FsType;

/// The schema version this code writes: 2 adds `unpacked_size` and `min_memory_mib`.
pub const SCHEMA: u32 = 2;

/// The schema of a captured image's metadata (`bootlace-image capture`): 2 and `parent` and
/// `bundle`. Only captured images write it, so an ordinary bake's metadata is unchanged and a
/// reader that knows schema 2 alone names a captured image's schema instead of an unknown field.
pub const CAPTURE_SCHEMA: u32 = 3;

/// The schema of a bootable disk's metadata (`bake --format disk`): 2 and `disk`. Only
/// bootable disks write it, for the same reason as [`CAPTURE_SCHEMA`].
pub const DISK_SCHEMA: u32 = 4;

/// The schema versions this code reads (a schema-1 file has no memory fields; schema 3 adds
/// `parent` and `bundle`; schema 4 adds `disk`).
pub const READS: &[u32] = &[1, 2, 3, 4];

/// The suffix appended to the image's file name: `root.erofs` -> `root.erofs.meta.json`.
pub const SUFFIX: &str = ".meta.json";

/// What `bootlace-image bake` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A newc cpio archive (gzip, zstd or plain), booted with `-initrd`.
    Initramfs,
    /// A read-only erofs root filesystem.
    Erofs,
    /// An ext4 root filesystem.
    Ext4,
    /// A read-only squashfs root filesystem.
    Squashfs,
    /// A qcow2 disk image of an erofs or ext4 root filesystem.
    Qcow2,
    /// A bootable, partitioned disk (GPT: an EFI system partition with a unified kernel
    /// image, the root partition, an optional data partition) that firmware boots with no
    /// `-kernel`; raw, qcow2, vmdk or fixed VHD ([`DiskInfo::container`]).
    Disk,
}

impl Format {
    /// Every format.
    pub const ALL: [Format; 6] = [
        Format::Initramfs,
        Format::Erofs,
        Format::Ext4,
        Format::Squashfs,
        Format::Qcow2,
        Format::Disk,
    ];

    /// Its name on the command line and in the metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Initramfs => "initramfs",
            Format::Erofs => "erofs",
            Format::Ext4 => "ext4",
            Format::Squashfs => "squashfs",
            Format::Qcow2 => "qcow2",
            Format::Disk => "disk",
        }
    }

    /// Whether the image is a root filesystem on a disk (booted through a stage-1 initramfs,
    /// or, for [`Format::Disk`], through firmware).
    pub fn is_disk(self) -> bool {
        self != Format::Initramfs
    }

    /// Whether firmware boots the image by itself (a partitioned disk with its own kernel).
    pub fn is_bootable(self) -> bool {
        self == Format::Disk
    }

    /// The filesystem inside an image of this format; `inner` for a qcow2 and a bootable disk
    /// (which hold an erofs or ext4 root); `None` for an initramfs.
    pub fn fstype(self, inner: FsType) -> Option<FsType> {
        match self {
            Format::Initramfs => None,
            Format::Erofs => Some(FsType::Erofs),
            Format::Ext4 => Some(FsType::Ext4),
            Format::Squashfs => Some(FsType::Squashfs),
            Format::Qcow2 | Format::Disk => Some(inner),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is not one of [`Format::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown format {0:?} (expected one of: initramfs, erofs, ext4, squashfs, qcow2, disk)")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Format, UnknownFormat> {
        Format::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| UnknownFormat(s.to_owned()))
    }
}

/// What an input was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputKind {
    /// A root filesystem directory.
    Dir,
    /// A tarball (tar, tar.gz, tar.zst).
    Tar,
    /// An OCI image layout.
    Oci,
}

/// One input of the bake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Its kind.
    pub kind: InputKind,
    /// The path given.
    pub path: String,
    /// `sha256:<hex>`: of the file (tar), of the manifest (oci), or of a canonical listing of
    /// paths, modes, owners, link targets and file contents (dir).
    pub digest: String,
}

/// The init baked in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitInfo {
    /// Where it is in the image (`/sbin/bootlace-init`).
    pub path: String,
    /// Its version (`bootlace-init --version`), or `unknown` when it cannot be run.
    pub version: String,
    /// sha256 hex of the binary.
    pub sha256: String,
}

/// The metadata of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageMeta {
    /// Schema version ([`SCHEMA`]).
    pub schema: u32,
    /// Image name (default: the output file's stem).
    pub name: String,
    /// Image version (default `"0"`).
    pub version: String,
    /// The format.
    pub format: Format,
    /// The image's file name, relative to the metadata file's directory.
    pub file: String,
    /// sha256 hex of the image file.
    pub sha256: String,
    /// Bytes of the image file.
    pub size: u64,
    /// The filesystem inside (`erofs`, `ext4`, `squashfs`); `None` for an initramfs.
    pub fstype: Option<FsType>,
    /// The filesystem label (`None` for squashfs and initramfs).
    pub label: Option<String>,
    /// A stage-1 initramfs (mounts a real root and switches to it).
    pub stage1: bool,
    /// The root filesystem is read-only at boot (erofs, squashfs).
    pub read_only: bool,
    /// Directories the init backs with tmpfs at boot (`[root] writable`).
    pub writable: Vec<String>,
    /// What the image was made from.
    pub inputs: Vec<Input>,
    /// The init baked in.
    pub init: InitInfo,
    /// The kernel release whose modules were copied in; `None` when none were.
    pub kernel_release: Option<String>,
    /// The kernel modules copied in, in load order.
    pub modules: Vec<String>,
    /// SOURCE_DATE_EPOCH of the bake (every timestamp in the image).
    pub source_date_epoch: u64,
    /// The same as RFC 3339 UTC (`2023-11-14T22:13:20Z`).
    pub built: String,
    /// The versions of the tools that made the image, by tool name.
    pub tool_versions: BTreeMap<String, String>,
    /// An initramfs: the bytes its files take once the kernel has unpacked it into memory
    /// (schema 2; absent in schema 1 and for disk images).
    #[serde(default)]
    pub unpacked_size: Option<u64>,
    /// The least guest memory, in MiB, that boots this image to its init: for an initramfs the
    /// kernel holds the archive and its unpacked files at once (schema 2; absent in schema 1).
    #[serde(default)]
    pub min_memory_mib: Option<u64>,
    /// A captured image: the image it was captured from, and the init that ran the capture
    /// boot (schema 3; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent>,
    /// A captured image: the configuration bundle delivered to the capture boot (schema 3;
    /// absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleRef>,
    /// A bootable disk: its container, partitions and boot path (schema 4; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskInfo>,
}

/// The file format a bootable disk is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Container {
    /// The disk's bytes as they are (sparse where zero).
    #[default]
    Raw,
    /// QEMU's qcow2 (compat 1.1, 64 KiB clusters).
    Qcow2,
    /// A stream-optimised VMDK (what VMware and cloud image imports take).
    Vmdk,
    /// A fixed-size VHD (the disk's bytes and a 512-byte footer; Azure, Hyper-V).
    Vhd,
}

impl Container {
    /// Every container.
    pub const ALL: [Container; 4] = [
        Container::Raw,
        Container::Qcow2,
        Container::Vmdk,
        Container::Vhd,
    ];

    /// Its name on the command line and in the metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Container::Raw => "raw",
            Container::Qcow2 => "qcow2",
            Container::Vmdk => "vmdk",
            Container::Vhd => "vhd",
        }
    }

    /// QEMU's name of the format (`-drive format=`, `qemu-img -f`).
    pub fn qemu_format(self) -> &'static str {
        match self {
            Container::Vhd => "vpc",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A container name that is not one of [`Container::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown disk container {0:?} (expected one of: raw, qcow2, vmdk, vhd)")]
pub struct UnknownContainer(pub String);

impl FromStr for Container {
    type Err = UnknownContainer;
    fn from_str(s: &str) -> Result<Container, UnknownContainer> {
        Container::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownContainer(s.to_owned()))
    }
}

/// How firmware boots a bootable disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// UEFI: `\EFI\BOOT\BOOTX64.EFI` on the EFI system partition.
    Uefi,
}

/// The partitions and boot path of a bootable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskInfo {
    /// The file format.
    pub container: Container,
    /// The firmware that boots it.
    pub firmware: Firmware,
    /// The disk's size as the guest sees it, in bytes.
    pub virtual_size: u64,
    /// The GPT's disk GUID.
    pub disk_guid: String,
    /// The partitions, in table order.
    pub partitions: Vec<DiskPartition>,
    /// The kernel command line baked into the unified kernel image.
    pub cmdline: String,
    /// The kernel's release and sha256 hex.
    pub kernel: KernelInfo,
    /// sha256 hex of the EFI stub the unified kernel image was made from.
    pub stub_sha256: String,
    /// sha256 hex of the stage-1 initramfs inside the unified kernel image.
    pub stage1_sha256: String,
}

/// One partition of a bootable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPartition {
    /// Its number (`/dev/vda2` is 2).
    pub number: u32,
    /// What it is: `esp`, `root` or `data`.
    pub role: String,
    /// Its GPT name (`PARTLABEL=`).
    pub name: String,
    /// Its GPT type GUID.
    pub type_guid: String,
    /// Its unique GUID (`PARTUUID=`).
    pub partuuid: String,
    /// Its first byte on the disk.
    pub offset: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Its filesystem (`vfat`, `erofs`, `ext4`); `None` for a blank data partition.
    pub fstype: Option<String>,
}

/// The kernel inside a bootable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelInfo {
    /// Its release (`6.1.0-57-amd64`).
    pub release: String,
    /// sha256 hex of the kernel image.
    pub sha256: String,
}

/// The image a captured image was made from (`bootlace-image capture`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parent {
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
    /// sha256 hex of its image file.
    pub sha256: String,
    /// The init that ran the capture boot (the parent's).
    pub init: InitInfo,
}

/// The bundle a captured image was configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRef {
    /// `sha256:<hex>` of the bundle tarball as given (the digest the guest was pinned to).
    pub sha256: String,
}

/// Compares versions: runs of digits as numbers, other runs as text (`1.10` > `1.9`,
/// `01` = `1`).
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let (pa, pb) = (version_parts(a), version_parts(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let ord = match (x, y) {
            ((true, x), (true, y)) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// A version cut into runs: (all digits, the run).
fn version_parts(s: &str) -> Vec<(bool, &str)> {
    let mut out = Vec::new();
    let mut start = 0;
    let bytes = s.as_bytes();
    for i in 1..=bytes.len() {
        let boundary = i == bytes.len()
            || bytes.get(i).map(u8::is_ascii_digit) != bytes.get(i - 1).map(u8::is_ascii_digit);
        if boundary {
            let part = s.get(start..i).unwrap_or("");
            out.push((part.bytes().all(|c| c.is_ascii_digit()), part));
            start = i;
        }
    }
    out
}

/// The version after `v`: its last run of digits plus one, its width kept (`1` -> `2`, `1.0`
/// -> `1.1`, `1.9` -> `1.10`, `2.0-rc1` -> `2.0-rc2`, `007` -> `008`); a version without
/// digits gets `.1` (`base` -> `base.1`). Always greater by [`compare_versions`].
pub fn next_version(v: &str) -> String {
    let parts = version_parts(v);
    let Some(last) = parts
        .iter()
        .rposition(|(digits, p)| *digits && !p.is_empty())
    else {
        return format!("{v}.1");
    };
    let mut out = String::with_capacity(v.len() + 1);
    for (i, (_, p)) in parts.iter().enumerate() {
        if i == last {
            out.push_str(&increment_digits(p));
        } else {
            out.push_str(p);
        }
    }
    out
}

/// `"41"` -> `"42"`, `"09"` -> `"10"`, `"99"` -> `"100"`: decimal digits plus one.
fn increment_digits(d: &str) -> String {
    let mut bytes = d.as_bytes().to_vec();
    for b in bytes.iter_mut().rev() {
        if *b == b'9' {
            *b = b'0';
        } else {
            *b += 1;
            return String::from_utf8(bytes).unwrap_or_default();
        }
    }
    let mut s = String::from("1");
    s.push_str(&String::from_utf8(bytes).unwrap_or_default());
    s
}

/// Why a metadata file could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Reading or writing failed.
    #[error("metadata file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid metadata (or a field has a value that cannot be used).
    #[error("metadata file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ImageMeta {
    /// The metadata path for an image path: the image's name plus [`SUFFIX`].
    pub fn path_for(image: &Path) -> PathBuf {
        let mut name = image.file_name().unwrap_or_default().to_os_string();
        name.push(SUFFIX);
        image.with_file_name(name)
    }

    /// The image file this metadata describes (`file` joined to the metadata's directory).
    pub fn image_path(&self, meta_path: &Path) -> PathBuf {
        meta_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&self.file)
    }

    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// Whether the image is a root filesystem on a disk (it needs a stage-1 initramfs).
    pub fn is_disk(&self) -> bool {
        self.format.is_disk()
    }

    /// Whether it boots through a stage-1 initramfs: a root filesystem image (erofs, ext4,
    /// squashfs, qcow2), not an initramfs nor a bootable disk (which carries its own).
    pub fn needs_stage1(&self) -> bool {
        self.format.is_disk() && !self.format.is_bootable()
    }

    /// The checks a reader relies on beyond the types: the schema, a file name that stays
    /// beside the metadata, a sha256 of 64 hex digits, a filesystem type where there is a disk.
    pub fn check(&self) -> Result<(), BadMeta> {
        if !READS.contains(&self.schema) {
            return Err(BadMeta::Schema(self.schema));
        }
        if self.file.is_empty() || self.file.contains('/') || self.file.starts_with('.') {
            return Err(BadMeta::File(self.file.clone()));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadMeta::Sha256(self.sha256.clone()));
        }
        if self.format.is_disk() != self.fstype.is_some() {
            return Err(BadMeta::FsType {
                format: self.format,
                fstype: self.fstype,
            });
        }
        if self.format.is_bootable() != self.disk.is_some() {
            return Err(BadMeta::Disk(self.format));
        }
        Ok(())
    }
}

/// A metadata value that parses but cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadMeta {
    /// `disk` given for another format than `disk`, or missing for a `disk`.
    #[error("format {0}: the disk field belongs to format disk, and only there")]
    Disk(Format),
    /// A schema this code does not know.
    #[error("metadata schema {0} is not supported (this reads schemas {READS:?})")]
    Schema(u32),
    /// The image file is not a plain name beside the metadata.
    #[error("file {0:?} is not a plain file name beside the metadata")]
    File(String),
    /// The sha256 is not 64 hex digits.
    #[error("sha256 {0:?} is not 64 hex digits")]
    Sha256(String),
    /// A disk format without a filesystem, or an initramfs with one.
    #[error("format {format} with filesystem {}", fstype.map_or("none", FsType::as_str))]
    FsType {
        /// The format.
        format: Format,
        /// The filesystem given.
        fstype: Option<FsType>,
    },
}

#[cfg(feature = "json")]
impl ImageMeta {
    /// Parses and checks metadata text (schemas 1 and 2, known fields only); `path` names the file
    /// in errors.
    pub fn from_json(text: &[u8], path: &Path) -> Result<ImageMeta, MetaError> {
        let parse = |message: String| MetaError::Parse {
            path: path.to_owned(),
            message,
        };
        // The schema first, so that a newer schema is named as such and not as an unknown field.
        #[derive(Deserialize)]
        struct Probe {
            schema: Option<u32>,
        }
        if let Ok(Probe {
            schema: Some(schema),
        }) = serde_json::from_slice::<Probe>(text)
        {
            if !READS.contains(&schema) {
                return Err(parse(BadMeta::Schema(schema).to_string()));
            }
        }
        let meta: ImageMeta = serde_json::from_slice(text).map_err(|e| parse(e.to_string()))?;
        meta.check().map_err(|e| parse(e.to_string()))?;
        Ok(meta)
    }

    /// Reads and checks a metadata file.
    pub fn read(path: &Path) -> Result<ImageMeta, MetaError> {
        let text = std::fs::read(path).map_err(|source| MetaError::Io {
            path: path.to_owned(),
            source,
        })?;
        ImageMeta::from_json(&text, path)
    }

    /// The JSON text (pretty, fields in schema order, a final newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// RFC 3339 UTC for seconds since the epoch (`1970-01-01T00:00:00Z`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_versions() {
        for (v, want) in [
            ("1", "2"),
            ("0", "1"),
            ("1.0", "1.1"),
            ("1.9", "1.10"),
            ("1.4", "1.5"),
            ("2.0-rc1", "2.0-rc2"),
            ("007", "008"),
            ("99", "100"),
            ("1.99", "1.100"),
            ("base", "base.1"),
            ("", ".1"),
        ] {
            assert_eq!(next_version(v), want, "after {v}");
            assert_eq!(
                compare_versions(&next_version(v), v),
                std::cmp::Ordering::Greater,
                "{v}"
            );
        }
        assert_eq!(compare_versions("01", "1"), std::cmp::Ordering::Equal);
        assert_eq!(compare_versions("1.10", "1.9"), std::cmp::Ordering::Greater);
    }

    #[test]
    fn rfc3339_dates() {
        for (secs, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_700_000_000, "2023-11-14T22:13:20Z"),
            (4_294_967_295, "2106-02-07T06:28:15Z"),
        ] {
            assert_eq!(rfc3339(secs), want);
        }
    }

    /// A valid metadata value for tests.
    pub fn sample() -> ImageMeta {
        ImageMeta {
            schema: SCHEMA,
            name: "root".into(),
            version: "1.2".into(),
            format: Format::Erofs,
            file: "root.erofs".into(),
            sha256: "00".repeat(32),
            size: 4096,
            fstype: Some(FsType::Erofs),
            label: Some("bootlace-root".into()),
            stage1: false,
            read_only: true,
            writable: vec!["/etc".into()],
            inputs: vec![Input {
                kind: InputKind::Oci,
                path: "layout".into(),
                digest: format!("sha256:{}", "11".repeat(32)),
            }],
            init: InitInfo {
                path: "/sbin/bootlace-init".into(),
                version: "0.1.0".into(),
                sha256: "22".repeat(32),
            },
            kernel_release: None,
            modules: vec![],
            source_date_epoch: 0,
            built: rfc3339(0),
            tool_versions: [("mkfs.erofs".to_owned(), "1.5".to_owned())].into(),
            unpacked_size: None,
            min_memory_mib: Some(128),
            parent: None,
            bundle: None,
            disk: None,
        }
    }

    #[test]
    fn checks() {
        let m = sample();
        assert!(m.check().is_ok());
        assert!(m.is_disk() && m.id() == "root@1.2");
        let dir = Path::new("/images");
        assert_eq!(
            ImageMeta::path_for(&dir.join("root.erofs")),
            dir.join("root.erofs.meta.json")
        );
        assert_eq!(
            m.image_path(&dir.join("root.erofs.meta.json")),
            dir.join("root.erofs")
        );
        for (bad, want) in [
            (
                ImageMeta {
                    schema: 5,
                    ..sample()
                },
                "schema 5",
            ),
            (
                ImageMeta {
                    file: "../x".into(),
                    ..sample()
                },
                "plain file name",
            ),
            (
                ImageMeta {
                    sha256: "ab".into(),
                    ..sample()
                },
                "64 hex digits",
            ),
            (
                ImageMeta {
                    fstype: None,
                    ..sample()
                },
                "format erofs",
            ),
        ] {
            let e = bad.check().expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
        assert_eq!("qcow2".parse::<Format>(), Ok(Format::Qcow2));
        assert!("iso".parse::<Format>().is_err());
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_round_trip_and_strict() {
        let m = sample();
        let text = m.to_json();
        let p = Path::new("root.erofs.meta.json");
        assert_eq!(ImageMeta::from_json(text.as_bytes(), p).expect("parse"), m);
        assert!(text.contains("\"kind\": \"oci\"") && text.contains("\"format\": \"erofs\""));
        let newer = text.replace("\"schema\": 2", "\"schema\": 5, \"new\": 1");
        let e = ImageMeta::from_json(newer.as_bytes(), p).expect_err("schema 5");
        assert!(e.to_string().contains("schema 5 is not supported"), "{e}");
        // Schema 3 (a captured image): parent and bundle, read back; absent otherwise.
        assert!(!text.contains("parent") && !text.contains("bundle"));
        let captured = ImageMeta {
            schema: CAPTURE_SCHEMA,
            parent: Some(Parent {
                name: "root".into(),
                version: "1.1".into(),
                sha256: "11".repeat(32),
                init: m.init.clone(),
            }),
            bundle: Some(BundleRef {
                sha256: format!("sha256:{}", "22".repeat(32)),
            }),
            ..sample()
        };
        let text3 = captured.to_json();
        assert!(text3.contains("\"parent\"") && text3.contains("\"bundle\""));
        assert_eq!(
            ImageMeta::from_json(text3.as_bytes(), p).expect("schema 3"),
            captured
        );
        let extra = text.replace("\"schema\": 2", "\"schema\": 2, \"x\": 1");
        assert!(ImageMeta::from_json(extra.as_bytes(), p).is_err());
        // A schema-1 file (no memory fields) still reads.
        let old = text
            .replace("\"schema\": 2", "\"schema\": 1")
            .replace(",\n  \"unpacked_size\": null", "")
            .replace(",\n  \"min_memory_mib\": 128", "");
        assert!(!old.contains("min_memory_mib"), "{old}");
        let m1 = ImageMeta::from_json(old.as_bytes(), p).expect("schema 1");
        assert_eq!((m1.schema, m1.min_memory_mib), (1, None));
    }
}
