//! The initramfs format of `bootlace-image bake`: the kernel modules an image gets
//! ([`module_plan`]) and the newc archive itself ([`write_archive`]), written straight from the
//! input tree and the bake's additions, merged while writing — nothing is staged on disk. The
//! same inputs give the same bytes: entries in depth-first order, names sorted in each
//! directory, inode numbers in write order, every mtime SOURCE_DATE_EPOCH.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use bootlace_contract::compression::Compression;
use bootlace_contract::config::{InitConfig, ModuleName};
use bootlace_contract::drivers;
use bootlace_contract::kmod::{KmodError, Module, ModuleIndex, Resolved};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};

use crate::additions::{Additions, Content, Node};
use crate::cpio::{self, Header, Kind};
use crate::dirnames::DirNames;
use crate::path::join;
use crate::progress::Progress;

/// Where the init is installed in the image by default.
pub const INIT_PATH: &str = "/sbin/bootlace-init";

/// The page size the kernel's rootfs holds files in.
const PAGE: u64 = 4096;

/// The mode of the archive's root (`.`), owned by root.
pub const ROOT_MODE: u32 = 0o755;

/// The zstd level of an initramfs.
pub const ZSTD_LEVEL: i32 = 9;

/// Kernel modules to put into the image.
#[derive(Debug, Clone)]
pub struct Modules {
    /// Directory holding one subdirectory per kernel release (`/lib/modules`).
    pub root: PathBuf,
    /// The kernel release (`6.1.0-56-amd64`).
    pub release: String,
    /// Modules copied in besides the ones the config loads at boot.
    pub extra: Vec<ModuleName>,
}

/// Why the kernel modules of an image could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// The module index could not be read, or a module is not in it.
    #[error("kernel modules")]
    Index(#[source] KmodError),
    /// The config needs modules and no kernel release was given.
    #[error("kernel modules: the config needs modules ({needs}) but no kernel release was given")]
    NoKernelRelease {
        /// What needs them.
        needs: String,
    },
    /// The kernel has no driver for a configured bootstrap source.
    #[error(
        "the {which} source needs kernel modules that {release} does not have ({missing}): \
         a guest booted on it would wait out the source's timeout; use a kernel with them \
         (the Debian cloud kernel has no 9p) or another source"
    )]
    SourceDrivers {
        /// The source.
        which: bootlace_contract::config::Source,
        /// The kernel release.
        release: String,
        /// The modules it lacks.
        missing: String,
    },
}

/// The kernel modules an image gets: the files to copy and the index to write.
#[derive(Debug, Clone, Default)]
pub struct ModulePlan {
    /// The kernel release (`None` when no modules are needed).
    pub release: Option<String>,
    /// (path in the image, host file), module files in load order then `modules.builtin`.
    pub files: Vec<(String, PathBuf)>,
    /// `lib/modules/<release>/modules.dep` for exactly the modules copied.
    pub dep: Option<(String, String)>,
    /// Module names copied, in load order.
    pub names: Vec<String>,
}

/// Works out the modules `config` needs (its `modules`, the drivers its bootstrap sources, host
/// link and stage 1 need: [`drivers::implied_by`]) plus `spec.extra`, with their dependency
/// closure. A source whose drivers the kernel does not have is an error (the init would wait
/// out its timeout at boot); an implied filesystem module the kernel lacks is a warning.
pub fn module_plan(config: &InitConfig, spec: Option<&Modules>) -> Result<ModulePlan, ModuleError> {
    let mut wanted: Vec<&str> = config
        .modules
        .iter()
        .chain(spec.iter().flat_map(|m| m.extra.iter()))
        .map(ModuleName::as_str)
        .collect();
    // The drivers and filesystems the configured sources, host link and stage 1 may need.
    let implied = drivers::implied_by(config);
    let Some(mspec) = spec else {
        // overlayfs is optional: without it the init copies the writable locations.
        if wanted.is_empty() && implied.iter().all(|m| *m == drivers::OVERLAY) {
            return Ok(ModulePlan::default());
        }
        return Err(ModuleError::NoKernelRelease {
            needs: if wanted.is_empty() {
                "bootstrap drivers".to_owned()
            } else {
                wanted.join(", ")
            },
        });
    };
    let dir = mspec.root.join(&mspec.release);
    let index = ModuleIndex::read(&dir).map_err(ModuleError::Index)?;
    let has = |m: &str| index.get(m).is_some() || index.is_builtin(m);
    for source in &config.bootstrap.sources {
        let missing: Vec<&str> = drivers::source(*source)
            .iter()
            .copied()
            .filter(|m| !has(m))
            .collect();
        if !missing.is_empty() {
            return Err(ModuleError::SourceDrivers {
                which: *source,
                release: mspec.release.clone(),
                missing: missing.join(", "),
            });
        }
    }
    for m in implied {
        if has(m) {
            if !wanted.contains(&m) {
                wanted.push(m);
            }
        } else {
            log::warn!("{m} is not in {}: not copied", dir.display());
        }
    }
    let plan = index.resolve(wanted).map_err(ModuleError::Index)?;
    let mods: Vec<&Module> = plan
        .iter()
        .filter_map(|r| match r {
            Resolved::Load(m) => Some(m),
            Resolved::Builtin(_) => None,
        })
        .collect();
    let base = format!("lib/modules/{}", mspec.release);
    let mut out = ModulePlan {
        release: Some(mspec.release.clone()),
        ..ModulePlan::default()
    };
    for m in &mods {
        out.files
            .push((format!("{base}/{}", m.path), dir.join(&m.path)));
    }
    out.dep = Some((format!("{base}/modules.dep"), index.dep_text_for(&mods)));
    let builtin = dir.join("modules.builtin");
    if builtin.is_file() {
        out.files.push((format!("{base}/modules.builtin"), builtin));
    }
    out.names = mods.iter().map(|m| m.name.clone()).collect();
    Ok(out)
}

/// Why an archive could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the input (or a file the bake adds) failed.
    #[error("read {}", path.display())]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A name or a symlink target in the input is not UTF-8 (newc names here are).
    #[error("{}: not UTF-8 (archive names and link targets must be)", path.display())]
    Name {
        /// The entry.
        path: PathBuf,
    },
    /// Writing the archive failed.
    #[error("write {}", path.display())]
    Output {
        /// The archive.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What goes into an archive.
#[derive(Debug, Clone, Copy)]
pub struct Archive<'a> {
    /// The input tree (none: the additions alone).
    pub input: Option<&'a Path>,
    /// The bake's additions, resolved against `input`.
    pub additions: &'a Additions,
    /// Keep the owners (else every entry is root's).
    pub keep_owners: bool,
    /// Every entry's mtime.
    pub mtime: u32,
    /// The compression of the archive.
    pub compression: Compression,
    /// Where entries and bytes written are counted.
    pub progress: Option<&'a Progress>,
    /// The file written as the archive's last entry (relative, `etc/bootlace/unpacked`): the
    /// init checks it is there (`[root] unpacked_marker`). An input entry of the same path is
    /// left out. Its directory must be in the archive before it.
    pub marker: Option<&'a str>,
}

/// What was written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// Entries in the archive.
    pub entries: u64,
    /// Bytes of file contents.
    pub bytes: u64,
    /// What the files and symlinks take once unpacked into the kernel's rootfs: each rounded
    /// up to whole 4 KiB pages.
    pub unpacked: u64,
}

/// Writes the archive at `out` (created, 0644; not synced), the input and the additions
/// merged: an addition hides the input's entry of the same path; a directory in both is
/// written once, with the addition's attributes (the input's, see [`crate::additions`]).
///
/// The first entry is `.`, the root itself, 0755 root:root (without it the kernel leaves the
/// rootfs `drwxrwxrwt`); the last is the marker, when there is one.
pub fn write_archive(a: &Archive<'_>, out: &Path) -> Result<ArchiveSummary, ArchiveError> {
    let err = |source| ArchiveError::Output {
        path: out.to_owned(),
        source,
    };
    let file = File::create(out).map_err(err)?;
    let buf = BufWriter::with_capacity(1 << 20, file);
    let (buf, summary) = match a.compression {
        Compression::None => write_entries(a, out, buf)?,
        Compression::Gzip => {
            let gz = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(3)
                .write(buf, flate2::Compression::default());
            let (gz, s) = write_entries(a, out, gz)?;
            (gz.finish().map_err(err)?, s)
        }
        Compression::Zstd => {
            let mut enc = zstd::stream::write::Encoder::new(buf, ZSTD_LEVEL).map_err(err)?;
            enc.include_checksum(true).map_err(err)?;
            let (enc, s) = write_entries(a, out, enc)?;
            (enc.finish().map_err(err)?, s)
        }
    };
    drop(buf.into_inner().map_err(|e| err(e.into_error()))?);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o644)).map_err(err)?;
    Ok(summary)
}

/// One entry of an input directory: its name and `lstat`.
struct Listed {
    cname: CString,
    name: String,
    st: rustix::fs::Stat,
}

/// The merge of an input directory and the additions, written as it goes.
struct Merge<'a, W: Write> {
    a: &'a Archive<'a>,
    /// The archive, for messages.
    out: &'a Path,
    w: cpio::Writer<W>,
    summary: ArchiveSummary,
}

fn write_entries<W: Write>(
    a: &Archive<'_>,
    path: &Path,
    out: W,
) -> Result<(W, ArchiveSummary), ArchiveError> {
    let mut m = Merge {
        a,
        out: path,
        w: cpio::Writer::new(out),
        summary: ArchiveSummary::default(),
    };
    let root = match a.input {
        Some(p) => Some(open_dir(None, p).map_err(|e| m.read_err("", e))?),
        None => None,
    };
    let dot = Header {
        name: ".".to_owned(),
        kind: Kind::Dir,
        perm: ROOT_MODE,
        uid: 0,
        gid: 0,
        mtime: a.mtime,
    };
    m.emit(&dot, None)?;
    m.dir(root, "")?;
    if let Some(marker) = a.marker {
        let h = m.header(marker.to_owned(), Kind::File { size: 0 }, 0o644, 0, 0);
        m.emit(&h, Some(&mut io::empty()))?;
    }
    let (path, summary) = (m.out, m.summary);
    let w = m.w.finish().map_err(|source| ArchiveError::Output {
        path: path.to_owned(),
        source,
    })?;
    Ok((w, summary))
}

fn open_dir(dir: Option<&OwnedFd>, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(match dir {
        Some(d) => rustix::fs::openat(d, name, flags, Mode::empty())?,
        None => rustix::fs::open(name, flags, Mode::empty())?,
    })
}

impl<W: Write> Merge<'_, W> {
    fn host(&self, rel: &str) -> PathBuf {
        self.a.input.unwrap_or(Path::new("")).join(rel)
    }

    fn read_err(&self, rel: &str, source: io::Error) -> ArchiveError {
        ArchiveError::Read {
            path: self.host(rel),
            source,
        }
    }

    fn out_err(&self, source: io::Error) -> ArchiveError {
        ArchiveError::Output {
            path: self.out.to_owned(),
            source,
        }
    }

    /// The input's names in `dir` (at `rel`), sorted, packed ([`DirNames`]: a directory's
    /// listing costs its names alone); a name that is not UTF-8 is refused.
    fn list(&self, dir: &OwnedFd, rel: &str) -> Result<DirNames, ArchiveError> {
        let mut names = DirNames::read(dir).map_err(|e| self.read_err(rel, e.into()))?;
        if let Some(bad) = names.iter().find(|n| n.to_str().is_err()) {
            let shown = join(rel, &bad.to_string_lossy());
            return Err(ArchiveError::Name {
                path: self.host(&shown),
            });
        }
        names.sort();
        Ok(names)
    }

    /// A listed name with its `lstat`.
    fn stat(&self, dir: &OwnedFd, rel: &str, name: &CStr) -> Result<Listed, ArchiveError> {
        let shown = name.to_string_lossy();
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.read_err(&join(rel, &shown), e.into()))?;
        Ok(Listed {
            name: shown.into_owned(),
            cname: name.to_owned(),
            st,
        })
    }

    /// Writes directory `rel`: the input's entries (from `dir`) and the additions, by name.
    fn dir(&mut self, dir: Option<OwnedFd>, rel: &str) -> Result<(), ArchiveError> {
        let listed = match &dir {
            Some(d) => self.list(d, rel)?,
            None => DirNames::default(),
        };
        let additions = self.a.additions;
        let mut added = additions.children(rel).into_iter().flatten().peekable();
        let mut listed = listed.iter().peekable();
        loop {
            let order = match (listed.peek(), added.peek()) {
                (None, None) => return Ok(()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(l), Some((n, _))) => l.to_bytes().cmp(n.as_bytes()),
            };
            let input = if order.is_le() { listed.next() } else { None };
            let addition = if order.is_ge() { added.next() } else { None };
            let input = match (input, &dir) {
                (Some(name), Some(d)) => Some(self.stat(d, rel, name)?),
                _ => None,
            };
            match (input, addition) {
                (Some(l), None) if self.a.marker == Some(join(rel, &l.name).as_str()) => {}
                (Some(l), None) => self.input_entry(dir.as_ref(), rel, l)?,
                (l, Some((name, node))) => {
                    let path = join(rel, name);
                    self.added_entry(&path, node)?;
                    if node.content == Content::Dir {
                        // The input's directory of the same name is merged in.
                        let sub = match (&dir, l) {
                            (Some(d), Some(l))
                                if FileType::from_raw_mode(l.st.st_mode).is_dir() =>
                            {
                                Some(open_dir(Some(d), name).map_err(|e| self.read_err(&path, e))?)
                            }
                            _ => None,
                        };
                        self.dir(sub, &path)?;
                    }
                }
                (None, None) => return Ok(()),
            }
        }
    }

    fn header(&self, name: String, kind: Kind, mode: u32, uid: u32, gid: u32) -> Header {
        let (uid, gid) = if self.a.keep_owners {
            (uid, gid)
        } else {
            (0, 0)
        };
        Header {
            name,
            kind,
            perm: mode & 0o7777,
            uid,
            gid,
            mtime: self.a.mtime,
        }
    }

    fn emit(&mut self, h: &Header, data: Option<&mut dyn io::Read>) -> Result<(), ArchiveError> {
        self.w.entry(h, data).map_err(|e| self.out_err(e))?;
        self.summary.entries += 1;
        let size = match h.kind {
            Kind::File { size } => size,
            _ => 0,
        };
        self.summary.bytes += size;
        let held = match &h.kind {
            Kind::File { size } => *size,
            Kind::Symlink { target } => target.len() as u64,
            _ => 0,
        };
        self.summary.unpacked += held.div_ceil(PAGE) * PAGE;
        if let Some(p) = self.a.progress {
            p.add_entries(1);
            p.add_bytes(size);
        }
        Ok(())
    }

    /// An entry of the input (and, for a directory, everything under it).
    fn input_entry(
        &mut self,
        dir: Option<&OwnedFd>,
        rel: &str,
        l: Listed,
    ) -> Result<(), ArchiveError> {
        let Some(dir) = dir else { return Ok(()) };
        let path = join(rel, &l.name);
        let st = &l.st;
        let h = |kind| self.header(path.clone(), kind, st.st_mode, st.st_uid, st.st_gid);
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => {
                let sub = open_dir(Some(dir), &l.name).map_err(|e| self.read_err(&path, e))?;
                let header = h(Kind::Dir);
                self.emit(&header, None)?;
                self.dir(Some(sub), &path)?;
            }
            FileType::RegularFile => {
                let fd = rustix::fs::openat(
                    dir,
                    l.cname.as_c_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| self.read_err(&path, e.into()))?;
                let header = h(Kind::File {
                    size: st.st_size as u64,
                });
                let mut f = File::from(fd);
                self.emit(&header, Some(&mut f))?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(dir, l.cname.as_c_str(), Vec::new())
                    .map_err(|e| self.read_err(&path, e.into()))?
                    .into_string()
                    .map_err(|_| ArchiveError::Name {
                        path: self.host(&path),
                    })?;
                let header = h(Kind::Symlink { target });
                self.emit(&header, None)?;
            }
            ft @ (FileType::CharacterDevice | FileType::BlockDevice) => {
                let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                let header = h(if ft == FileType::CharacterDevice {
                    Kind::CharDev { major, minor }
                } else {
                    Kind::BlockDev { major, minor }
                });
                self.emit(&header, None)?;
            }
            FileType::Fifo => {
                let header = h(Kind::Fifo);
                self.emit(&header, None)?;
            }
            _ => log::warn!("skipping socket {}", self.host(&path).display()),
        }
        Ok(())
    }

    /// An addition (a directory's contents are written by the caller).
    fn added_entry(&mut self, path: &str, node: &Node) -> Result<(), ArchiveError> {
        let m = &node.meta;
        let h = |kind| self.header(path.to_owned(), kind, m.mode, m.uid, m.gid);
        match &node.content {
            Content::Dir => self.emit(&h(Kind::Dir), None),
            Content::Bytes(b) => {
                let header = h(Kind::File {
                    size: b.len() as u64,
                });
                self.emit(&header, Some(&mut &b[..]))
            }
            Content::HostFile(host) => {
                let read_err = |source| ArchiveError::Read {
                    path: host.clone(),
                    source,
                };
                let mut f = File::open(host).map_err(read_err)?;
                let size = f.metadata().map_err(read_err)?.len();
                let header = h(Kind::File { size });
                self.emit(&header, Some(&mut f))
            }
            Content::Symlink(t) => self.emit(&h(Kind::Symlink { target: t.clone() }), None),
            Content::CharDev(major, minor) => {
                let header = h(Kind::CharDev {
                    major: *major,
                    minor: *minor,
                });
                self.emit(&header, None)
            }
        }
    }
}
