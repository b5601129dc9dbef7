//! The metadata file written beside every baked image (`<image>.meta.json`): what the image
//! is (name, version, format), how to check it (sha256, size), what it was made from (input
//! digests, init, kernel modules, tool versions) and when (SOURCE_DATE_EPOCH). `bootlace-vm`
//! reads these files to boot an image by name and version. Schema 1; docs/image.md lists the
//! fields.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The schema version written by this builder.
pub const SCHEMA: u32 = 1;

/// The suffix appended to the image's file name: `root.erofs` -> `root.erofs.meta.json`.
pub const SUFFIX: &str = ".meta.json";

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
    /// Its version (`bootlace-init --version`), or the builder's when it cannot be run.
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
    /// `initramfs`, `erofs`, `ext4`, `squashfs` or `qcow2`.
    pub format: String,
    /// The image's file name, relative to the metadata file's directory.
    pub file: String,
    /// sha256 hex of the image file.
    pub sha256: String,
    /// Bytes of the image file.
    pub size: u64,
    /// The filesystem inside (`erofs`, `ext4`, `squashfs`); `None` for an initramfs.
    pub fstype: Option<String>,
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
    pub tool_versions: std::collections::BTreeMap<String, String>,
}

/// Why a metadata file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// Reading or writing failed.
    #[error("metadata file {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The file is not valid metadata.
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

    /// Reads and checks a metadata file (schema 1, known fields only).
    pub fn read(path: &Path) -> Result<ImageMeta, MetaError> {
        let text = std::fs::read_to_string(path).map_err(|source| MetaError::Io {
            path: path.to_owned(),
            source,
        })?;
        let meta: ImageMeta = serde_json::from_str(&text).map_err(|e| MetaError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        if meta.schema != SCHEMA {
            return Err(MetaError::Parse {
                path: path.to_owned(),
                message: format!("schema {} (this builder knows {SCHEMA})", meta.schema),
            });
        }
        Ok(meta)
    }

    /// The image file this metadata describes (`file` joined to the metadata's directory).
    pub fn image_path(&self, meta_path: &Path) -> PathBuf {
        meta_path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(&self.file)
    }

    /// The JSON text (pretty, fields in schema order, a final newline).
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Writes the metadata atomically: a temporary file in the same directory, synced, renamed.
    pub fn write(&self, path: &Path) -> Result<(), MetaError> {
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
        tmp.write_all(self.to_json().as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
                .map_err(err)?;
        }
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
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

    #[test]
    fn round_trip_and_strict() {
        let m = ImageMeta {
            schema: SCHEMA,
            name: "root".into(),
            version: "1.2".into(),
            format: "erofs".into(),
            file: "root.erofs".into(),
            sha256: "00".repeat(32),
            size: 4096,
            fstype: Some("erofs".into()),
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
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("root.erofs.meta.json");
        m.write(&p).expect("write");
        assert_eq!(ImageMeta::read(&p).expect("read"), m);
        assert_eq!(ImageMeta::path_for(&dir.path().join("root.erofs")), p);
        assert_eq!(m.image_path(&p), dir.path().join("root.erofs"));
        let text = std::fs::read_to_string(&p).expect("text");
        assert!(text.contains("\"kind\": \"oci\""), "{text}");
        std::fs::write(&p, text.replace("\"schema\": 1", "\"schema\": 2")).expect("w");
        assert!(ImageMeta::read(&p).is_err());
        std::fs::write(&p, text.replace("\"schema\": 1", "\"schema\": 1, \"x\": 1")).expect("w");
        assert!(ImageMeta::read(&p).is_err());
    }
}
