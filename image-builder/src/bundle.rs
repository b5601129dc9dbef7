//! `bootlace-image bundle`: a bootstrap bundle directory (its `bootlace.toml` validated with the
//! init's own code) -> a labelled disk image (ext4, erofs) or a clean directory for a 9p share.

use std::io;
use std::path::{Path, PathBuf};

use bootlace_contract::fs::FsType;
use bootlace_contract::manifest::{check_bundle_dir, ManifestError};

use crate::fsimage::{self, FsImageError, FsSpec};
use crate::limits::{self, Budget, CountError, LimitError, Limits};
use crate::progress::Progress;

/// What to make of a bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleFormat {
    /// An ext4 disk image.
    DiskExt4,
    /// An erofs disk image.
    DiskErofs,
    /// A directory (for a 9p share).
    Dir,
    /// A deterministic tarball for the vsock source (sorted, mtime fixed, root-owned).
    Tar,
    /// The same, gzip-compressed.
    TarGz,
    /// The same, zstd-compressed.
    TarZst,
}

/// Why a bundle could not be made. Nothing is left at the output path on error.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The manifest (or a file it names) is invalid: the init would refuse it too.
    #[error("bundle {}", dir.display())]
    Manifest {
        /// The bundle directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: ManifestError,
    },
    /// Making the disk image failed.
    #[error("bundle image")]
    Image(#[source] FsImageError),
    /// Copying the directory failed.
    #[error("copy {} to {}", from.display(), to.display())]
    Copy {
        /// Source.
        from: PathBuf,
        /// Destination.
        to: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The bundle directory is over `--max-entries` or `--max-bytes`.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The bundle directory could not be read.
    #[error("bundle {}: read {}", dir.display(), path.display())]
    Read {
        /// The bundle directory.
        dir: PathBuf,
        /// What could not be read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The output exists and is not something this command replaces.
    #[error("{}: exists (remove it first)", .0.display())]
    Exists(PathBuf),
}

/// What was made.
#[derive(Debug, Clone)]
pub struct BundleSummary {
    /// Files the manifest writes, commands it runs.
    pub files: usize,
    /// Commands.
    pub commands: usize,
    /// Bytes of the image (0 for a directory).
    pub bytes: u64,
    /// sha256 of a tarball: the digest to pin (`bootlace.digest=sha256:…`).
    pub sha256: Option<String>,
}

impl BundleFormat {
    /// Whether it is a tarball (for the vsock source; the formats that can be signed).
    pub fn is_tarball(self) -> bool {
        matches!(
            self,
            BundleFormat::Tar | BundleFormat::TarGz | BundleFormat::TarZst
        )
    }

    /// Its name on the command line: `disk-ext4`, `disk-erofs`, `dir`, `tar`, `tar.gz`,
    /// `tar.zst`.
    pub fn as_str(self) -> &'static str {
        match self {
            BundleFormat::DiskExt4 => "disk-ext4",
            BundleFormat::DiskErofs => "disk-erofs",
            BundleFormat::Dir => "dir",
            BundleFormat::Tar => "tar",
            BundleFormat::TarGz => "tar.gz",
            BundleFormat::TarZst => "tar.zst",
        }
    }
}

/// Validates `dir` and makes the bundle at `out`, within the default limits.
pub fn build(
    dir: &Path,
    format: BundleFormat,
    label: &str,
    mtime: u64,
    out: &Path,
) -> Result<BundleSummary, BundleError> {
    let limits = Limits::default();
    build_with(dir, format, label, mtime, out, &limits, &Progress::new())
}

/// [`build`], the directory's entries and bytes counted against `limits` (its `entries` and
/// `bytes`) before any work, what is done counted into `progress` (phases `check`, then
/// `image`, `copy` or `tar`).
pub fn build_with(
    dir: &Path,
    format: BundleFormat,
    label: &str,
    mtime: u64,
    out: &Path,
    limits: &Limits,
    progress: &Progress,
) -> Result<BundleSummary, BundleError> {
    progress.phase("check");
    let manifest = check_bundle_dir(dir).map_err(|source| BundleError::Manifest {
        dir: dir.to_owned(),
        source,
    })?;
    let input = format!("bundle {}", dir.display());
    limits::count_dir(dir, &Budget::new(*limits), &input).map_err(|e| match e {
        CountError::Limit(e) => BundleError::Limit(e),
        CountError::Io { path, source } => BundleError::Read {
            dir: dir.to_owned(),
            path,
            source,
        },
    })?;
    let mut summary = BundleSummary {
        files: manifest.files.len(),
        commands: manifest.run.len(),
        bytes: 0,
        sha256: None,
    };
    match format {
        BundleFormat::DiskExt4 | BundleFormat::DiskErofs => {
            let format = if format == BundleFormat::DiskExt4 {
                FsType::Ext4
            } else {
                FsType::Erofs
            };
            progress.phase("image");
            let spec = FsSpec {
                dir,
                label,
                mtime,
                format,
                progress: Some(progress),
            };
            summary.bytes = fsimage::make_image(&spec, out)
                .map_err(BundleError::Image)?
                .bytes;
        }
        BundleFormat::Dir => {
            progress.phase("copy");
            copy_dir_atomically(dir, out)?;
        }
        BundleFormat::Tar | BundleFormat::TarGz | BundleFormat::TarZst => {
            progress.phase("tar");
            let bytes = tarball(dir, format, mtime).map_err(|source| BundleError::Copy {
                from: dir.to_owned(),
                to: out.to_owned(),
                source,
            })?;
            write_atomically(out, &bytes).map_err(|source| BundleError::Copy {
                from: dir.to_owned(),
                to: out.to_owned(),
                source,
            })?;
            summary.bytes = bytes.len() as u64;
            summary.sha256 = Some(bootlace_contract::digest::of_bytes(&bytes).hex().to_owned());
        }
    }
    Ok(summary)
}

/// Copies `from` to a new directory `out` (through a temporary sibling renamed at the end).
fn copy_dir_atomically(from: &Path, out: &Path) -> Result<(), BundleError> {
    if out.exists() {
        return Err(BundleError::Exists(out.to_owned()));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let err = |source| BundleError::Copy {
        from: from.to_owned(),
        to: out.to_owned(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".bootlace-bundle.")
        .tempdir_in(parent)
        .map_err(err)?;
    copy_tree(from, tmp.path()).map_err(err)?;
    std::fs::rename(tmp.path(), out).map_err(err)?;
    // The directory now lives at `out`; nothing is left for the guard to remove.
    let _ = tmp.keep();
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    let mut names: Vec<_> = std::fs::read_dir(from)?.collect::<Result<_, _>>()?;
    names.sort_by_key(|e| e.file_name());
    for e in names {
        let src = e.path();
        let dst = to.join(e.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        if meta.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
            std::fs::set_permissions(&dst, meta.permissions())?;
        } else if meta.is_file() {
            std::fs::copy(&src, &dst)?;
        } else if meta.file_type().is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: only files, directories and symlinks go in a bundle",
                    src.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The bundle as a deterministic tarball, compressed as asked (fixed gzip header, zstd level 3).
fn tarball(dir: &Path, format: BundleFormat, mtime: u64) -> io::Result<Vec<u8>> {
    use std::io::Write;
    let tar = bootlace_agent::host::tar_dir(dir, mtime)?;
    match format {
        BundleFormat::TarGz => {
            let mut gz = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(3)
                .write(Vec::new(), flate2::Compression::default());
            gz.write_all(&tar)?;
            gz.finish()
        }
        BundleFormat::TarZst => zstd::stream::encode_all(&tar[..], 3),
        _ => Ok(tar),
    }
}

fn write_atomically(out: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".bootlace-bundle.")
        .tempfile_in(parent)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(out).map_err(|e| e.error)?;
    Ok(())
}
