//! A directory -> a labelled filesystem image (ext4 or erofs), made with the standard tools
//! (e2fsprogs, erofs-utils), reproducibly and atomically.
//!
//! Reproducible: the same directory contents and the same `mtime` give a byte-identical image.
//! "Contents" are the names, the bytes of regular files, permission bits, symlink targets,
//! device numbers and hard links. Not part of it: the files' owners (everything is owned by
//! root), their timestamps (all set to `mtime`), extended attributes (dropped, so that host
//! SELinux labels and the like do not leak in), and the order in which the host lists a
//! directory (both tools sort entries by name). The volume UUID is derived from the format and
//! the label ([`volume_uuid`]).
//!
//! Atomic: the image is written to a temporary file beside `out`, synced, then renamed over
//! `out`; on any error `out` is untouched and the temporary file is removed.
//!
//! How each format is made reproducible (tested against e2fsprogs 1.47.0 and erofs-utils 1.5,
//! Debian 12):
//!
//! - ext4: `mke2fs -d` copies each file's owner and atime/mtime/ctime from the host (the ctime
//!   cannot be set by anyone, and reading the files may bump the atime). So after `mke2fs`, a
//!   `debugfs -w` pass sets the owner to 0:0 and every timestamp to `mtime` on the root and on
//!   each inode in use from the first non-reserved one on. `mke2fs` reads its defaults from a
//!   profile written by this module (`MKE2FS_CONFIG`), not the host's `/etc/mke2fs.conf`; the
//!   UUID and directory hash seed are fixed; `E2FSPROGS_FAKE_TIME` fixes the superblock and
//!   creation times (`SOURCE_DATE_EPOCH` too, for e2fsprogs >= 1.47.1, which reads it). The
//!   filesystem has no journal and no resize inode (the image is read-only in the guest).
//! - erofs: `mkfs.erofs -T<mtime>` (every inode's mtime and the build time), `-U<uuid>`,
//!   `--all-root`, `-x-1` (no xattrs), and no `SOURCE_DATE_EPOCH` in its environment (1.5
//!   lets it override `-T` with clamping). erofs-utils 1.5 has no `-L`: the label is written
//!   into the superblock's `volume_name` afterwards and the superblock checksum recomputed.
//!
//! Special files (devices, fifos, sockets) are copied by both tools. `mkfs.erofs` 1.5 silently
//! skips every name starting with `lost+found`, so [`make_image`] refuses such entries for
//! erofs unless they are empty directories.
//!
//! The tools run with a cleared environment (only `PATH`, `LC_ALL=C` and the variables above),
//! stdin from `/dev/null`, and their output captured for error messages.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bootlace_contract::fs::FsType;

use crate::progress::Progress;

/// How often a running tool's output is written back to disk and measured for progress.
const WATCH_EVERY: Duration = Duration::from_millis(250);

/// Everything about a filesystem that differs between the ones [`make_image`] makes.
struct Backend {
    fs: FsType,
    /// The Debian package that has the tools.
    package: &'static str,
    /// The programs run (all from `package`).
    tools: &'static [&'static str],
    /// Writes the image at `job.tmp`.
    build: fn(&Job<'_>) -> Result<(), FsImageError>,
}

const BACKENDS: &[Backend] = &[
    Backend {
        fs: FsType::Ext4,
        package: "e2fsprogs",
        tools: &["mke2fs", "debugfs"],
        build: build_ext4,
    },
    Backend {
        fs: FsType::Erofs,
        package: "erofs-utils",
        tools: &["mkfs.erofs"],
        build: build_erofs,
    },
];

/// The filesystems [`make_image`] makes, in a fixed order (squashfs: [`make_squashfs`]).
pub const FORMATS: [FsType; 2] = [FsType::Ext4, FsType::Erofs];

fn backend(fs: FsType) -> Result<&'static Backend, FsImageError> {
    BACKENDS
        .iter()
        .find(|b| b.fs == fs)
        .ok_or(FsImageError::Unsupported(fs))
}

/// The Debian package providing the tools that make `fs` (`None`: not made here).
pub fn package(fs: FsType) -> Option<&'static str> {
    match fs {
        FsType::Squashfs => Some("squashfs-tools"),
        _ => backend(fs).ok().map(|b| b.package),
    }
}

/// What an image is made from.
#[derive(Debug, Clone, Copy)]
pub struct FsSpec<'a> {
    /// The directory whose contents become the filesystem's root.
    pub dir: &'a Path,
    /// The volume label (`LABEL=` in blkid, `/dev/disk/by-label/`): bytes `[A-Za-z0-9_.-]`,
    /// at most [`FsType::max_label_bytes`] of them.
    pub label: &'a str,
    /// Every timestamp in the image (SOURCE_DATE_EPOCH); at most `u32::MAX`.
    pub mtime: u64,
    /// The filesystem: one of [`FORMATS`].
    pub format: FsType,
    /// Where the size of the image being written is counted while the tool runs.
    pub progress: Option<&'a Progress>,
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSummary {
    /// Bytes of the image file.
    pub bytes: u64,
}

/// What of the input's metadata an image keeps. The default (bundles, [`make_image`]) keeps
/// neither: everything root-owned, no xattrs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FsOptions {
    /// Keep the owners (uid/gid) of the input's files instead of making them root's.
    pub keep_owners: bool,
    /// Keep the input's extended attributes (`security.capability`, …).
    pub xattrs: bool,
    /// Do not fsync the image before renaming it into place (the caller syncs it later, or it
    /// is a scratch file).
    pub skip_sync: bool,
    /// Write the image back to disk while the tool is still writing it (an `fdatasync` every
    /// 250 ms), so that the final fsync, here or the caller's, has little left to do.
    pub write_back: bool,
}

/// Why an image could not be made. Nothing is left at the output path on error.
#[derive(Debug, thiserror::Error)]
pub enum FsImageError {
    /// The label is empty, too long for the format, or has bytes outside `[A-Za-z0-9_.-]`.
    #[error("{format} label {label:?} {reason}")]
    Label {
        /// The format asked for.
        format: FsType,
        /// The label given.
        label: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No tool here makes this filesystem.
    #[error("{0} images are not made by this module (ext4 and erofs are)")]
    Unsupported(FsType),
    /// The timestamp does not fit the formats' 32-bit fields.
    #[error("mtime {0} is out of range (at most {max})", max = u32::MAX)]
    Mtime(u64),
    /// The input directory is missing, not a directory, or could not be read.
    #[error("input directory {}", path.display())]
    Input {
        /// The path that failed (the directory or an entry in it).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tool is not installed.
    #[error("{tool} not found in PATH, /usr/sbin or /sbin (install the Debian package {package})")]
    ToolMissing {
        /// The program.
        tool: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A tool could not be started.
    #[error("could not run {tool} for {}", out.display())]
    Spawn {
        /// The program.
        tool: &'static str,
        /// The image being made.
        out: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A tool failed (exit status, or error messages from `debugfs`, which exits 0 anyway).
    #[error("{tool} failed for {}: {status}: {stderr}", out.display())]
    Tool {
        /// The program.
        tool: &'static str,
        /// The image being made.
        out: PathBuf,
        /// How it ended (`exit status 1`).
        status: String,
        /// What it printed on stderr (the end of it, if long).
        stderr: String,
    },
    /// Writing the output (or a scratch file) failed, or the tool's output was not as expected.
    #[error("write {}", path.display())]
    Output {
        /// The output path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// The volume UUID (and, for ext4, directory hash seed) of images with this format and label: a
/// version-8 UUID from a hash of both, so images do not share a UUID unless they share a label.
pub fn volume_uuid(format: FsType, label: &str) -> String {
    let mut input = b"bootlace-fsimage\0".to_vec();
    input.extend_from_slice(format.as_str().as_bytes());
    input.push(0);
    input.extend_from_slice(label.as_bytes());
    let h1 = fnv1a64(0xcbf2_9ce4_8422_2325, &input);
    let h2 = fnv1a64(h1 ^ 0x9e37_79b9_7f4a_7c15, &input);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&h1.to_be_bytes());
    b[8..].copy_from_slice(&h2.to_be_bytes());
    b[6] = (b[6] & 0x0f) | 0x80; // version 8 (custom)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut s = String::with_capacity(36);
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{byte:02x}");
    }
    s
}

fn fnv1a64(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Checks a label against the format's limits.
pub fn check_label(format: FsType, label: &str) -> Result<(), FsImageError> {
    let err = |reason: String| FsImageError::Label {
        format,
        label: label.to_owned(),
        reason,
    };
    let max = format.max_label_bytes();
    if max == 0 {
        return Err(err(format!("cannot be set: {format} has no label")));
    }
    if label.is_empty() {
        return Err(err("is empty".to_owned()));
    }
    if label.len() > max {
        return Err(err(format!(
            "is {} bytes long (at most {max})",
            label.len()
        )));
    }
    if let Some(b) = label
        .bytes()
        .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
    {
        return Err(err(format!(
            "has the byte {b:#04x}; only A-Z a-z 0-9 _ - . are allowed"
        )));
    }
    Ok(())
}

/// One image being made.
struct Job<'a> {
    spec: &'a FsSpec<'a>,
    backend: &'static Backend,
    opts: FsOptions,
    /// The input directory, canonical (absolute, symlinks resolved).
    dir: PathBuf,
    /// Where the tools write (the temporary file beside `out`).
    tmp: &'a Path,
    /// The output path, for messages.
    out: &'a Path,
    /// The tools, in the order of `Backend::tools`.
    tools: Vec<PathBuf>,
    uuid: String,
}

impl Job<'_> {
    fn out_err(&self, source: io::Error) -> FsImageError {
        FsImageError::Output {
            path: self.out.to_owned(),
            source,
        }
    }

    /// Runs `tool` (an index into `Backend::tools`) with a clean environment plus `env`;
    /// fails on a non-zero exit status.
    fn run(
        &self,
        tool: usize,
        args: &[&OsStr],
        env: &[(&str, String)],
    ) -> Result<std::process::Output, FsImageError> {
        let target = Target {
            out: self.out,
            tmp: Some(self.tmp),
            write_back: self.opts.write_back,
            progress: self.spec.progress,
            // debugfs echoes every command of its script: a line per inode, not kept.
            keep_stdout: self.backend.tools[tool] != "debugfs",
        };
        run_tool(
            &self.tools[tool],
            self.backend.tools[tool],
            args,
            env,
            target,
        )
    }

    fn tool_err(&self, tool: &'static str, status: String, text: &[u8]) -> FsImageError {
        tool_error(tool, self.out, status, text)
    }
}

/// The image a tool writes: named in errors, watched while the tool runs.
#[derive(Debug, Clone, Copy)]
struct Target<'a> {
    /// The output path, for messages.
    out: &'a Path,
    /// The file the tool writes (a temporary beside `out`), when it is watched.
    tmp: Option<&'a Path>,
    /// Write it back to disk while the tool runs.
    write_back: bool,
    /// Count its size here while the tool runs.
    progress: Option<&'a Progress>,
    /// Capture the tool's stdout (for error messages); else it goes to `/dev/null`.
    keep_stdout: bool,
}

impl<'a> Target<'a> {
    fn new(out: &'a Path) -> Target<'a> {
        Target {
            out,
            tmp: None,
            write_back: false,
            progress: None,
            keep_stdout: true,
        }
    }

    fn watching(self, tmp: &'a Path, opts: FsOptions, progress: Option<&'a Progress>) -> Self {
        Target {
            tmp: Some(tmp),
            write_back: opts.write_back,
            progress,
            ..self
        }
    }
}

/// Runs a tool with a clean environment (only `PATH`, `LC_ALL=C` and `env`), stdin from
/// `/dev/null` and its output captured; fails on a non-zero exit status.
fn run_tool(
    program: &Path,
    name: &'static str,
    args: &[&OsStr],
    env: &[(&str, String)],
    target: Target<'_>,
) -> Result<std::process::Output, FsImageError> {
    let out = target.out;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", search_path())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(if target.keep_stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    log::debug!("running {cmd:?}");
    let output = run_watched(&mut cmd, target).map_err(|source| FsImageError::Spawn {
        tool: name,
        out: out.to_owned(),
        source,
    })?;
    if !output.status.success() {
        let mut text = output.stderr.clone();
        if text.iter().all(u8::is_ascii_whitespace) {
            text = output.stdout.clone();
        }
        return Err(tool_error(name, out, describe(output.status), &text));
    }
    Ok(output)
}

/// Runs `cmd` to its end; meanwhile, every [`WATCH_EVERY`], the file it writes is measured
/// for the progress line and (with `write_back`) written back to disk.
fn run_watched(cmd: &mut Command, target: Target<'_>) -> io::Result<std::process::Output> {
    let Some(tmp) = target
        .tmp
        .filter(|_| target.write_back || target.progress.is_some())
    else {
        return cmd.output();
    };
    std::thread::scope(|s| {
        let (stop, stopped) = mpsc::channel::<()>();
        s.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(WATCH_EVERY) {
                let Ok(f) = File::open(tmp) else { continue };
                if let (Some(p), Ok(m)) = (target.progress, f.metadata()) {
                    p.set_bytes(m.len());
                }
                if target.write_back {
                    let _ = f.sync_data();
                }
            }
        });
        let output = cmd.output();
        drop(stop);
        output
    })
}

fn tool_error(tool: &'static str, out: &Path, status: String, text: &[u8]) -> FsImageError {
    const MAX: usize = 4000;
    let text = String::from_utf8_lossy(text);
    let text = text.trim();
    let stderr = if text.is_empty() {
        "(no output)".to_owned()
    } else if text.len() > MAX {
        let mut start = text.len() - MAX;
        while !text.is_char_boundary(start) {
            start += 1;
        }
        format!("...{}", &text[start..])
    } else {
        text.to_owned()
    };
    FsImageError::Tool {
        tool,
        out: out.to_owned(),
        status,
        stderr,
    }
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        (None, None) => status.to_string(),
    }
}

/// `PATH` for the tools and for finding them: the caller's plus the sbin directories, which
/// non-root users often lack but where `mke2fs` and `debugfs` live.
fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_else(|| vec![PathBuf::from("/usr/bin"), PathBuf::from("/bin")]);
    for extra in ["/usr/sbin", "/sbin"] {
        if !dirs.iter().any(|d| d == Path::new(extra)) {
            dirs.push(PathBuf::from(extra));
        }
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| OsString::from("/usr/bin:/bin:/usr/sbin:/sbin"))
}

fn find_tool(tool: &'static str, package: &'static str) -> Result<PathBuf, FsImageError> {
    std::env::split_paths(&search_path())
        .filter(|d| d.is_absolute())
        .map(|d| d.join(tool))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .ok_or(FsImageError::ToolMissing { tool, package })
}

/// Makes the image of `spec.dir` at `out`: written to a temporary file beside it, synced, then
/// renamed, so `out` is either the complete new image or untouched.
pub fn make_image(spec: &FsSpec<'_>, out: &Path) -> Result<ImageSummary, FsImageError> {
    make_image_with(spec, FsOptions::default(), out)
}

/// [`make_image`], keeping what `opts` says of the input's metadata.
pub fn make_image_with(
    spec: &FsSpec<'_>,
    opts: FsOptions,
    out: &Path,
) -> Result<ImageSummary, FsImageError> {
    let backend = backend(spec.format)?;
    check_label(spec.format, spec.label)?;
    if spec.mtime > u64::from(u32::MAX) {
        return Err(FsImageError::Mtime(spec.mtime));
    }
    let dir = input_dir(spec.dir)?;
    let tools = backend
        .tools
        .iter()
        .map(|t| find_tool(t, backend.package))
        .collect::<Result<Vec<_>, _>>()?;
    atomic_output(out, !opts.skip_sync, |tmp| {
        let job = Job {
            spec,
            backend,
            opts,
            dir,
            tmp,
            out,
            tools,
            uuid: volume_uuid(spec.format, spec.label),
        };
        (backend.build)(&job)
    })
}

/// The input directory, checked and made canonical (absolute, symlinks resolved).
fn input_dir(dir: &Path) -> Result<PathBuf, FsImageError> {
    let input_err = |source| FsImageError::Input {
        path: dir.to_owned(),
        source,
    };
    if !std::fs::metadata(dir).map_err(input_err)?.is_dir() {
        return Err(input_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a directory",
        )));
    }
    std::fs::canonicalize(dir).map_err(input_err)
}

/// Writes an image through `make` at a temporary path beside `out`, then (with `sync`) syncs
/// it, makes it 0644, renames it over `out` and syncs the directory; on error nothing is left.
fn atomic_output(
    out: &Path,
    sync: bool,
    make: impl FnOnce(&Path) -> Result<(), FsImageError>,
) -> Result<ImageSummary, FsImageError> {
    let out_err = |source| FsImageError::Output {
        path: out.to_owned(),
        source,
    };
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // Relative paths get a leading "./" so that no tool argument can start with '-'.
    let out_dir = if out_dir.is_relative() && !out_dir.starts_with(".") {
        Path::new(".").join(out_dir)
    } else {
        out_dir
    };
    let tmp = tempfile::Builder::new()
        .prefix(".bootlace-image.")
        .tempfile_in(&out_dir)
        .map_err(out_err)?;
    make(tmp.path())?;
    // The tools wrote through their own descriptors: sync whatever is at the path now.
    let file = File::open(tmp.path()).map_err(out_err)?;
    if sync {
        file.sync_all().map_err(out_err)?;
    }
    let bytes = file.metadata().map_err(out_err)?.len();
    drop(file);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))
        .map_err(out_err)?;
    tmp.persist(out).map_err(|e| out_err(e.error))?;
    if sync {
        if let Err(e) = File::open(&out_dir).and_then(|d| d.sync_all()) {
            log::warn!("fsync {}: {e}", out_dir.display());
        }
    }
    Ok(ImageSummary { bytes })
}

/// A directory -> a squashfs image at `out` (atomically), reproducibly: `mksquashfs DIR OUT
/// -noappend -no-progress -quiet -reproducible -mkfs-time T -all-time T` (plus `-all-root`
/// and `-no-xattrs` unless `opts` keeps them), gzip, default block size, without
/// `SOURCE_DATE_EPOCH` in its environment (squashfs-tools 4.5 refuses it next to the time
/// options). squashfs has no label.
pub fn make_squashfs(
    dir: &Path,
    mtime: u64,
    opts: FsOptions,
    progress: Option<&Progress>,
    out: &Path,
) -> Result<ImageSummary, FsImageError> {
    if mtime > u64::from(u32::MAX) {
        return Err(FsImageError::Mtime(mtime));
    }
    let dir = input_dir(dir)?;
    let tool = find_tool("mksquashfs", "squashfs-tools")?;
    atomic_output(out, !opts.skip_sync, |tmp| {
        let t = mtime.to_string();
        let mut args: Vec<OsString> = vec![
            dir.clone().into(),
            tmp.into(),
            "-noappend".into(),
            "-no-progress".into(),
            "-quiet".into(),
            "-reproducible".into(),
            "-mkfs-time".into(),
            t.clone().into(),
            "-all-time".into(),
            t.into(),
        ];
        if !opts.keep_owners {
            args.push("-all-root".into());
        }
        if !opts.xattrs {
            args.push("-no-xattrs".into());
        }
        let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
        let target = Target::new(out).watching(tmp, opts, progress);
        run_tool(&tool, "mksquashfs", &args, &[], target).map(drop)
    })
}

/// A raw filesystem image -> a qcow2 image at `out` (atomically): `qemu-img convert -f raw
/// -O qcow2 -o compat=1.1,cluster_size=65536` (no timestamps in qcow2; zero clusters are
/// left unallocated, so the same raw image always gives the same bytes).
/// `opts.skip_sync` leaves the fsync to the caller.
pub fn convert_qcow2(
    raw: &Path,
    opts: FsOptions,
    progress: Option<&Progress>,
    out: &Path,
) -> Result<ImageSummary, FsImageError> {
    atomic_output(out, !opts.skip_sync, |tmp| {
        convert_image(
            raw,
            "qcow2",
            "compat=1.1,cluster_size=65536",
            opts,
            progress,
            tmp,
        )
    })
}

/// `qemu-img convert -q -f raw -O FORMAT -o OPTIONS RAW OUT`: a raw disk image into another
/// format, written at `out` itself (no temporary name: a VMDK's descriptor names its own file).
pub fn convert_image(
    raw: &Path,
    format: &str,
    options: &str,
    opts: FsOptions,
    progress: Option<&Progress>,
    out: &Path,
) -> Result<(), FsImageError> {
    let tool = find_tool("qemu-img", "qemu-utils")?;
    let args: [&OsStr; 10] = [
        OsStr::new("convert"),
        OsStr::new("-q"),
        OsStr::new("-f"),
        OsStr::new("raw"),
        OsStr::new("-O"),
        OsStr::new(format),
        OsStr::new("-o"),
        OsStr::new(options),
        raw.as_os_str(),
        out.as_os_str(),
    ];
    let target = Target::new(out).watching(out, opts, progress);
    run_tool(&tool, "qemu-img", &args, &[], target).map(drop)
}

/// The version line of a tool this module runs (`mke2fs 1.47.0 (5-Feb-2023)`), for the
/// record; `None` when it is missing or says nothing. erofs-utils 1.5's `mkfs.erofs` has no
/// version option: `fsck.erofs -V` from the same package is asked instead.
pub fn tool_version(tool: &str) -> Option<String> {
    let (program, arg) = match tool {
        "mke2fs" | "debugfs" => (tool, "-V"),
        "mkfs.erofs" => ("fsck.erofs", "-V"),
        "mksquashfs" => (tool, "-version"),
        "qemu-img" | "mcopy" => (tool, "--version"),
        _ => return None,
    };
    let path = std::env::split_paths(&search_path())
        .map(|d| d.join(program))
        .find(|p| p.is_file())?;
    let out = Command::new(path)
        .arg(arg)
        .env_clear()
        .env("PATH", search_path())
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.iter().all(u8::is_ascii_whitespace) {
        out.stderr
    } else {
        out.stdout
    };
    let line = String::from_utf8_lossy(&text)
        .lines()
        .next()?
        .trim()
        .to_owned();
    (!line.is_empty()).then_some(line)
}

// ---------------------------------------------------------------------------------------------
// erofs

/// Offset of the erofs superblock.
const EROFS_SB: usize = 1024;
const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
const EROFS_FEATURE_COMPAT_SB_CHKSUM: u32 = 0x1;
/// Offsets within the superblock.
const EROFS_SB_CHECKSUM: usize = 4;
const EROFS_SB_FEATURE_COMPAT: usize = 8;
const EROFS_SB_BLKSZBITS: usize = 12;
const EROFS_SB_VOLUME_NAME: usize = 64;

fn build_erofs(job: &Job<'_>) -> Result<(), FsImageError> {
    check_erofs_names(&job.dir)?;
    let mtime = job.spec.mtime.to_string();
    let mut args: Vec<OsString> = vec!["--quiet".into()];
    if !job.opts.xattrs {
        args.push("-x-1".into());
    }
    args.push(format!("-T{mtime}").into());
    args.push(format!("-U{}", job.uuid).into());
    if !job.opts.keep_owners {
        args.push("--all-root".into());
    }
    args.push(job.tmp.into());
    args.push(job.dir.clone().into());
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    // No SOURCE_DATE_EPOCH: erofs-utils 1.5 would let it replace -T with clamping.
    job.run(0, &args, &[])?;
    set_erofs_label(job.tmp, job.spec.label).map_err(|e| job.out_err(e))
}

/// erofs-utils 1.5 silently leaves out every entry whose name starts with `lost+found`, at any
/// depth (later versions keep them): refuse such entries rather than lose them, except empty
/// directories (an empty `lost+found` copied from an ext4 root, say).
fn check_erofs_names(root: &Path) -> Result<(), FsImageError> {
    use std::os::unix::ffi::OsStrExt;
    let err = |path: &Path, source| FsImageError::Input {
        path: path.to_owned(),
        source,
    };
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
            let entry = entry.map_err(|e| err(&dir, e))?;
            let path = entry.path();
            let is_dir = entry.file_type().map_err(|e| err(&path, e))?.is_dir();
            if entry.file_name().as_bytes().starts_with(b"lost+found") {
                let empty = is_dir
                    && std::fs::read_dir(&path)
                        .map_err(|e| err(&path, e))?
                        .next()
                        .is_none();
                if !empty {
                    return Err(err(
                        &path,
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            "mkfs.erofs 1.5 would silently leave it out \
                             (it skips names starting with lost+found)",
                        ),
                    ));
                }
            } else if is_dir {
                stack.push(path);
            }
        }
    }
    Ok(())
}

/// Writes `label` into the superblock's `volume_name` and updates the superblock checksum.
pub(crate) fn set_erofs_label(image: &Path, label: &str) -> io::Result<()> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let file = OpenOptions::new().read(true).write(true).open(image)?;
    let mut head = vec![0u8; EROFS_SB + 128];
    file.read_exact_at(&mut head, 0)?;
    let magic = le32(&head, EROFS_SB);
    if magic != EROFS_MAGIC {
        return Err(bad(format!("no erofs superblock (magic {magic:#010x})")));
    }
    let blkszbits = head[EROFS_SB + EROFS_SB_BLKSZBITS];
    if !(9..=16).contains(&blkszbits) {
        return Err(bad(format!("erofs block size 2^{blkszbits} not supported")));
    }
    let mut block = vec![0u8; 1usize << blkszbits];
    if block.len() <= EROFS_SB + 128 {
        return Err(bad(format!(
            "erofs block size {} too small to patch",
            block.len()
        )));
    }
    file.read_exact_at(&mut block, 0)?;
    let sb = &mut block[EROFS_SB..];
    let has_csum = le32(sb, EROFS_SB_FEATURE_COMPAT) & EROFS_FEATURE_COMPAT_SB_CHKSUM != 0;
    if has_csum {
        let stored = le32(sb, EROFS_SB_CHECKSUM);
        sb[EROFS_SB_CHECKSUM..EROFS_SB_CHECKSUM + 4].fill(0);
        let computed = erofs_crc32c(!0, sb);
        if computed != stored {
            return Err(bad(format!(
                "erofs superblock checksum {stored:#010x}, computed {computed:#010x}"
            )));
        }
    }
    let name = &mut sb[EROFS_SB_VOLUME_NAME..EROFS_SB_VOLUME_NAME + 16];
    name.fill(0);
    name[..label.len()].copy_from_slice(label.as_bytes());
    if has_csum {
        let crc = erofs_crc32c(!0, sb);
        sb[EROFS_SB_CHECKSUM..EROFS_SB_CHECKSUM + 4].copy_from_slice(&crc.to_le_bytes());
    }
    file.write_all_at(&sb[..EROFS_SB_VOLUME_NAME + 16], EROFS_SB as u64)?;
    Ok(())
}

/// CRC-32C as erofs computes the superblock checksum: reflected, seed given, no final xor.
pub(crate) fn erofs_crc32c(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ if crc & 1 != 0 { 0x82F6_3B78 } else { 0 };
        }
    }
    crc
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

// ---------------------------------------------------------------------------------------------
// ext4

const EXT4_BLOCK: u64 = 4096;
const EXT4_INODE_SIZE: u64 = 256;

/// The mke2fs profile used instead of `/etc/mke2fs.conf`, so the host's defaults do not leak
/// into the image. Every usage type mke2fs may pick by size is defined (empty) to silence
/// warnings.
const MKE2FS_PROFILE: &str = "\
[defaults]
	base_features = sparse_super,large_file,filetype,dir_index,ext_attr
	default_mntopts = acl,user_xattr
	enable_periodic_fsck = 0
	blocksize = 4096
	inode_size = 256
	inode_ratio = 16384
	reserved_ratio = 0
	hash_alg = half_md4
	flex_bg_size = 16
	lazy_itable_init = 0
	lazy_journal_init = 0

[fs_types]
	ext4 = {
		features = extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
	}
	floppy = {
	}
	small = {
	}
	default = {
	}
	big = {
	}
	huge = {
	}
";

/// Hard-linked files at least this large (16 blocks) are counted once, by inode; smaller
/// ones once per link. Only the large ones are remembered: the census's memory does not grow
/// with a tree's entries (a mirror's every file has a second link, in the input).
const CENSUS_DEDUP_BYTES: u64 = 16 * EXT4_BLOCK;

/// What the input directory needs, in ext4 terms.
#[derive(Debug, Default)]
struct Census {
    /// Inodes below the root (a hard-linked file of [`CENSUS_DEDUP_BYTES`] or more counted
    /// once, a smaller one once per link: a few inodes and blocks too many at most).
    inodes: u64,
    /// Blocks for file data, directories and long symlinks.
    blocks: u64,
}

impl Census {
    fn walk(root: &Path) -> Result<Census, FsImageError> {
        let mut census = Census::default();
        let mut seen = HashSet::new();
        let mut stack = vec![root.to_owned()];
        while let Some(dir) = stack.pop() {
            let err = |path: &Path, source| FsImageError::Input {
                path: path.to_owned(),
                source,
            };
            // "." and ".." (12 bytes each), then 8 bytes + the name rounded up to 4 per entry.
            let mut dir_bytes = 24u64;
            for entry in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
                let entry = entry.map_err(|e| err(&dir, e))?;
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).map_err(|e| err(&path, e))?;
                dir_bytes += 8 + (entry.file_name().len() as u64).next_multiple_of(4);
                if meta.nlink() > 1
                    && meta.is_file()
                    && meta.len() >= CENSUS_DEDUP_BYTES
                    && !seen.insert((meta.dev(), meta.ino()))
                {
                    continue;
                }
                census.inodes += 1;
                let ft = meta.file_type();
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() {
                    let blocks = meta.len().div_ceil(EXT4_BLOCK);
                    // An extent maps at most 32768 blocks and the inode holds 4 of them;
                    // beyond that the extent tree needs index blocks (count one per extent).
                    census.blocks += blocks + blocks / 32768;
                } else if ft.is_symlink() && meta.len() >= 60 {
                    census.blocks += 1;
                }
            }
            // Leave room for the checksum tail and half-full htree leaves.
            census.blocks += if dir_bytes + 12 <= EXT4_BLOCK {
                1
            } else {
                (2 * dir_bytes).div_ceil(EXT4_BLOCK) + 1
            };
        }
        Ok(census)
    }

    /// The inode count (`-N`): the entries, the root, the 10 reserved inodes, lost+found,
    /// and some slack.
    fn inode_count(&self) -> u64 {
        self.inodes + self.inodes / 16 + 64
    }

    /// The filesystem size in blocks: data + inode tables + group metadata, plus a margin of
    /// 10% and 1 MiB, rounded up to 1 MiB, at least 4 MiB.
    fn fs_blocks(&self) -> u64 {
        let itable = (self.inode_count() * EXT4_INODE_SIZE).div_ceil(EXT4_BLOCK);
        let base = self.blocks + itable + 4; // + lost+found
                                             // Per 128 MiB group: bitmaps, superblock and descriptor backups.
        let groups = base.div_ceil(32768);
        let total = base + base / 10 + groups * 8 + 256;
        total.next_multiple_of(256).max(1024)
    }
}

fn build_ext4(job: &Job<'_>) -> Result<(), FsImageError> {
    let census = Census::walk(&job.dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("bootlace-fsimage.")
        .tempdir()
        .map_err(|e| job.out_err(e))?;
    let profile = scratch.path().join("mke2fs.conf");
    std::fs::write(&profile, MKE2FS_PROFILE).map_err(|e| job.out_err(e))?;
    let mtime = job.spec.mtime.to_string();
    let env = [
        ("MKE2FS_CONFIG", profile.to_string_lossy().into_owned()),
        ("E2FSPROGS_FAKE_TIME", mtime.clone()),
        ("SOURCE_DATE_EPOCH", mtime.clone()),
    ];
    let uuid = &job.uuid;
    let args: Vec<OsString> = vec![
        "-q".into(),
        "-F".into(),
        "-t".into(),
        "ext4".into(),
        "-b".into(),
        EXT4_BLOCK.to_string().into(),
        "-I".into(),
        EXT4_INODE_SIZE.to_string().into(),
        "-N".into(),
        census.inode_count().to_string().into(),
        "-m".into(),
        "0".into(),
        "-L".into(),
        job.spec.label.into(),
        "-U".into(),
        uuid.into(),
        "-E".into(),
        format!(
            "root_owner=0:0,hash_seed={uuid},{}nodiscard",
            if job.opts.xattrs {
                ""
            } else {
                "no_copy_xattrs,"
            }
        )
        .into(),
        "-d".into(),
        job.dir.clone().into(),
        job.tmp.into(),
        format!("{}k", census.fs_blocks() * (EXT4_BLOCK / 1024)).into(),
    ];
    let args: Vec<&OsStr> = args.iter().map(OsString::as_os_str).collect();
    job.run(0, &args, &env)?;

    // Owner and times of every inode mke2fs -d filled from the host: the script is written as
    // the inode bitmaps are read, nothing kept per inode.
    let script_path = scratch.path().join("normalise.debugfs");
    write_normalise_script(job, &script_path, &mtime).map_err(|e| job.out_err(e))?;
    let args = [
        OsStr::new("-w"),
        OsStr::new("-f"),
        script_path.as_os_str(),
        job.tmp.as_os_str(),
    ];
    let output = job.run(1, &args, &env[1..])?;
    let errors = debugfs_errors(&output.stderr);
    if !errors.is_empty() {
        return Err(job.tool_err("debugfs", "command errors".to_owned(), &errors));
    }
    Ok(())
}

/// The debugfs script that sets the owner (with `--all-root`) and every time of each inode in
/// use to `mtime`.
fn write_normalise_script(job: &Job<'_>, path: &Path, mtime: &str) -> io::Result<()> {
    use std::io::Write as _;
    let mut script = io::BufWriter::new(File::create(path)?);
    ext4_inodes_to_normalise(job.tmp, &mut |ino| {
        if !job.opts.keep_owners {
            for field in ["uid", "gid"] {
                writeln!(script, "sif <{ino}> {field} 0")?;
            }
        }
        // mke2fs copies whole seconds only, so the nanosecond parts are already 0.
        for field in ["atime", "ctime", "mtime", "crtime"] {
            writeln!(script, "sif <{ino}> {field} @{mtime}")?;
        }
        Ok(())
    })?;
    script
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    Ok(())
}

/// The error lines in debugfs's stderr: it reports failed commands there and still exits 0;
/// its only normal stderr line is the version banner.
fn debugfs_errors(stderr: &[u8]) -> Vec<u8> {
    let lines: Vec<&[u8]> = stderr
        .split(|&b| b == b'\n')
        .filter(|l| !l.iter().all(u8::is_ascii_whitespace) && !l.starts_with(b"debugfs "))
        .collect();
    lines.join(&b'\n')
}

/// The root directory and every in-use inode from the first non-reserved one on, read from the
/// inode bitmaps of the ext4 image at `image`, each given to `each` in order.
fn ext4_inodes_to_normalise(
    image: &Path,
    each: &mut dyn FnMut(u32) -> io::Result<()>,
) -> io::Result<()> {
    let bad = |msg: String| io::Error::new(io::ErrorKind::InvalidData, msg);
    let file = File::open(image)?;
    let mut sb = [0u8; 1024];
    file.read_exact_at(&mut sb, 1024)?;
    if le16(&sb, 0x38) != 0xEF53 {
        return Err(bad("no ext4 superblock".to_owned()));
    }
    let inodes_count = le32(&sb, 0x0);
    let first_data_block = u64::from(le32(&sb, 0x14));
    let log_block = le32(&sb, 0x18);
    if log_block > 6 {
        return Err(bad(format!("ext4 block size 2^{} bytes", 10 + log_block)));
    }
    let block = 1024u64 << log_block;
    let per_group = le32(&sb, 0x28);
    let first_ino = le32(&sb, 0x54).max(11);
    let is_64bit = le32(&sb, 0x60) & 0x80 != 0;
    let desc_size = if is_64bit {
        u64::from(le16(&sb, 0xFE).max(32))
    } else {
        32
    };
    if per_group == 0 || u64::from(per_group) > block * 8 {
        return Err(bad(format!("ext4 inodes per group {per_group}")));
    }
    let groups = inodes_count.div_ceil(per_group);
    let gdt = (first_data_block + 1) * block;
    each(2)?;
    let mut desc = vec![0u8; desc_size as usize];
    let mut bitmap = vec![0u8; (per_group as usize).div_ceil(8)];
    for g in 0..groups {
        file.read_exact_at(&mut desc, gdt + u64::from(g) * desc_size)?;
        const INODE_UNINIT: u16 = 0x1;
        if le16(&desc, 0x12) & INODE_UNINIT != 0 {
            continue;
        }
        let mut at = u64::from(le32(&desc, 0x4));
        if desc_size >= 64 {
            at |= u64::from(le32(&desc, 0x24)) << 32;
        }
        file.read_exact_at(&mut bitmap, at * block)?;
        for i in 0..per_group {
            let ino = g * per_group + i + 1;
            if ino >= first_ino
                && ino <= inodes_count
                && bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0
            {
                each(ino)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert!(check_label(FsType::Ext4, "abcdefghijklmnop").is_ok());
        assert!(check_label(FsType::Ext4, "abcdefghijklmnopq").is_err());
        assert!(check_label(FsType::Erofs, "abcdefghijklmno").is_ok());
        assert!(check_label(FsType::Erofs, "abcdefghijklmnop").is_err());
        assert!(check_label(FsType::Ext4, "a-b_c.D9").is_ok());
        for bad in ["", "a b", "a/b", "é", "a\0"] {
            assert!(check_label(FsType::Ext4, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuid_shape() {
        let u = volume_uuid(FsType::Ext4, "bundle");
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "8");
        assert!(matches!(&u[19..20], "8" | "9" | "a" | "b"));
        assert_eq!(u, volume_uuid(FsType::Ext4, "bundle"));
        assert_ne!(u, volume_uuid(FsType::Erofs, "bundle"));
        assert_ne!(u, volume_uuid(FsType::Ext4, "bundle2"));
    }

    #[test]
    fn crc32c_check_value() {
        // The standard CRC-32C check value is the complement of this (no final xor here).
        assert_eq!(!erofs_crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn debugfs_stderr() {
        let banner = b"debugfs 1.47.0 (5-Feb-2023)\n";
        assert!(debugfs_errors(banner).is_empty());
        let bad = b"debugfs 1.47.0 (5-Feb-2023)\n<99>: File not found by ext2_lookup \n\
                    sif: invalid field specifier: bogus\n";
        assert_eq!(
            debugfs_errors(bad),
            b"<99>: File not found by ext2_lookup \nsif: invalid field specifier: bogus"
        );
    }

    #[test]
    fn missing_tool() {
        let err = find_tool("bootlace-no-such-tool", "some-package").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bootlace-no-such-tool not found in PATH, /usr/sbin or /sbin \
             (install the Debian package some-package)"
        );
        assert!(find_tool("sh", "dash").is_ok());
    }

    fn job_with_sh<'a>(spec: &'a FsSpec<'a>) -> Job<'a> {
        Job {
            spec,
            backend: backend(FsType::Erofs).expect("erofs"),
            dir: PathBuf::from("/"),
            opts: FsOptions::default(),
            tmp: Path::new("/nonexistent"),
            out: Path::new("out.img"),
            tools: vec![PathBuf::from("/bin/sh")],
            uuid: String::new(),
        }
    }

    #[test]
    fn tool_failure_message() {
        let spec = FsSpec {
            dir: Path::new("/"),
            label: "x",
            mtime: 0,
            format: FsType::Erofs,
            progress: None,
        };
        let job = job_with_sh(&spec);
        let sh = |script: &str| {
            job.run(
                0,
                &[OsStr::new("-c"), OsStr::new(script)],
                &[("X", "1".to_owned())],
            )
        };
        let err = sh("echo usage >&1; echo boom >&2; exit 3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mkfs.erofs failed for out.img: exit status 3: boom"
        );
        // With nothing on stderr, stdout is shown.
        let err = sh("echo usage; exit 1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "mkfs.erofs failed for out.img: exit status 1: usage"
        );
        let err = sh("kill -9 $$").unwrap_err();
        assert!(
            err.to_string().ends_with("killed by signal 9: (no output)"),
            "{err}"
        );
        // A clean environment: only PATH, LC_ALL and what the caller adds.
        let out = sh("env | sort").unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
        assert!(
            names
                .iter()
                .all(|n| ["PATH", "LC_ALL", "X", "PWD", "SHLVL", "_"].contains(n)),
            "{env}"
        );
        assert!(env.contains("LC_ALL=C\n") && env.contains("X=1\n"), "{env}");
    }

    #[test]
    fn backends() {
        for f in FORMATS {
            assert!(backend(f).is_ok(), "{f}");
            assert!(package(f).is_some(), "{f}");
        }
        assert_eq!(package(FsType::Squashfs), Some("squashfs-tools"));
        assert!(matches!(
            backend(FsType::Vfat),
            Err(FsImageError::Unsupported(FsType::Vfat))
        ));
        let e = check_label(FsType::Squashfs, "x").expect_err("no label");
        assert!(e.to_string().contains("has no label"), "{e}");
    }
}
