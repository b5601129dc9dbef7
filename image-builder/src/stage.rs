//! The staging tree: a root filesystem materialised in a directory on disk, from a directory,
//! a tarball or OCI layers, before a mkfs tool turns it into an image.
//!
//! Unlike a bootstrap bundle, a root filesystem legitimately holds setuid binaries, hard links,
//! device nodes and files of any owner: they are kept (the builder runs as root). What is
//! refused, with an error naming the archive (or layer) and the entry:
//! - entry paths that are absolute or contain `..`, NUL or non-UTF-8 bytes;
//! - entries whose parent directory resolves, through `..` in a symlink's target, above the
//!   root of the tree (absolute symlinks are resolved inside the tree, as they will be when the
//!   image boots);
//! - hard links whose target is outside the tree or missing, sparse files, unknown entry types.
//!
//! Every operation goes through directory fds: a path is resolved one component at a time from
//! the tree's root fd, each step opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` on the single component, and symlinks met on the way are followed by
//! this module (inside the tree) rather than by the kernel, so nothing is ever created or
//! changed outside the tree, whatever the archive holds. The tar crate parses; it never
//! unpacks.
//!
//! Whiteouts (OCI layers): with [`Writer::whiteouts`] on, an entry `.wh.<name>` removes `<name>`
//! from what lower layers put there, and `.wh..wh..opq` empties its directory of everything
//! lower layers put there (entries of the same layer stay). Neither ever appears in the tree.
//! With whiteouts off (the layer cache stores layers verbatim), they are stored as empty files
//! and interpreted when the cached layer is applied.
//!
//! Regular files can be placed by hard link from another tree on the same filesystem (a cached
//! layer, a rootfs directory): nothing in this module ever writes into an existing file, so
//! the source is never changed; a file placed over an existing name replaces the name.

use std::collections::{HashSet, VecDeque};
use std::ffi::CStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::dirnames::DirNames;
use crate::limits::{Budget, LimitError};
use crate::path::{join, normalise, split, Anchor};
use crate::progress::Progress;

/// Longest chain of symlinks followed while resolving one path.
const MAX_LINK_HOPS: usize = 40;

/// Why staging failed. Each names where the entry came from (`tarball rootfs.tar`, `layer
/// sha256:…`, `directory ./rootfs`) and the entry.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// An entry is refused by policy.
    #[error("{origin}: entry {entry:?}: {reason}")]
    Refused {
        /// The archive, layer or directory.
        origin: String,
        /// The entry's path as written there.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A system call on an entry failed.
    #[error("{origin}: entry {entry:?}: {op}")]
    Io {
        /// The archive, layer or directory.
        origin: String,
        /// The entry.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive could not be read (corrupt, truncated, bad compression).
    #[error("{origin}: corrupt or unreadable archive")]
    Archive {
        /// The archive or layer.
        origin: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A bake limit was reached (entries, bytes, compression ratio).
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// The staging directory could not be made or opened.
    #[error("staging directory {}", path.display())]
    Setup {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A directory tree that confined operations cannot leave.
#[derive(Debug)]
pub struct Confined {
    fd: OwnedFd,
    path: PathBuf,
}

impl Confined {
    /// Opens an existing directory as the root of a tree.
    pub fn open(path: &Path) -> Result<Confined, StageError> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| StageError::Setup {
            path: path.to_owned(),
            source: e.into(),
        })?;
        Ok(Confined {
            fd,
            path: path.to_owned(),
        })
    }

    /// The tree's path on the host.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tree's root fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Owner, mode and extended attributes of an entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits, setuid/setgid/sticky included.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Extended attributes (name, value), set where the filesystem allows.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    /// A root-owned entry with this mode and no xattrs.
    pub fn root(mode: u32) -> Meta {
        Meta {
            mode,
            ..Meta::default()
        }
    }
}

/// What an entry is.
pub enum Kind<'r> {
    /// A directory (an existing directory is kept, its owner and mode updated).
    Dir,
    /// A regular file with these bytes.
    File(&'r mut dyn Read),
    /// A regular file hard-linked (or, across filesystems, copied) from `dir`/`name`; its owner,
    /// mode and xattrs come with it and `Meta` is only used for a copy.
    LinkFrom {
        /// The directory holding the source.
        dir: BorrowedFd<'r>,
        /// The source's name in it.
        name: &'r CStr,
    },
    /// A symbolic link with this target (stored as is).
    Symlink(String),
    /// A hard link to this path in the tree (normalised, relative).
    HardLink(String),
    /// A character device.
    CharDev(u32, u32),
    /// A block device.
    BlockDev(u32, u32),
    /// A FIFO.
    Fifo,
}

impl std::fmt::Debug for Kind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::Dir => f.write_str("Dir"),
            Kind::File(_) => f.write_str("File"),
            Kind::LinkFrom { name, .. } => write!(f, "LinkFrom({name:?})"),
            Kind::Symlink(t) => write!(f, "Symlink({t:?})"),
            Kind::HardLink(t) => write!(f, "HardLink({t:?})"),
            Kind::CharDev(a, b) => write!(f, "CharDev({a}, {b})"),
            Kind::BlockDev(a, b) => write!(f, "BlockDev({a}, {b})"),
            Kind::Fifo => f.write_str("Fifo"),
        }
    }
}

/// What was placed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Entries placed (whiteouts not counted).
    pub entries: u64,
    /// Regular files placed by hard link.
    pub linked: u64,
    /// Regular files written or copied.
    pub copied: u64,
    /// Bytes written or copied.
    pub bytes: u64,
    /// Whiteout and opaque markers applied.
    pub whiteouts: u64,
}

/// How a writer with whiteouts on tells a layer's own entries from the lower layers' when an
/// opaque marker empties a directory.
#[derive(Debug)]
enum Opaque {
    /// Whiteouts off: markers are plain files.
    Off,
    /// A layer streams in any order: the paths it placed are remembered and kept.
    Remember(HashSet<String>),
    /// A sorted walk places each directory's marker before its other entries: everything in
    /// the directory then is the lower layers'; nothing is remembered.
    MarkerFirst,
    /// The bottom layer: nothing is below it, nothing to remove or remember.
    Bottom,
}

/// Places entries into a [`Confined`] tree; one per archive or layer.
#[derive(Debug)]
pub struct Writer<'a> {
    root: &'a Confined,
    origin: String,
    whiteouts: bool,
    /// What an opaque marker (whiteouts on) removes.
    opaque: Opaque,
    /// The last parent directory resolved: its path and fd.
    parent_cache: Option<(String, OwnedFd)>,
    /// Directories created because an entry needed them, not from an entry of their own.
    implicit: Vec<String>,
    stats: Stats,
    /// Where entries and bytes placed are counted as they go.
    progress: Option<&'a Progress>,
    /// The bake's limits, charged for every entry read (none: not counted).
    budget: Option<&'a Budget>,
}

const STEP: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Opens the directory `name` in `dir`, never following a symlink.
fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::openat2(
        dir,
        name,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STEP,
    )
}

fn set_owner_mode(fd: BorrowedFd<'_>, m: &Meta) -> Result<(), Errno> {
    // chown first: it clears the setuid/setgid bits that fchmod then sets.
    rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(m.uid)),
        Some(rustix::fs::Gid::from_raw(m.gid)),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(m.mode & 0o7777))
}

fn set_xattrs(fd: BorrowedFd<'_>, m: &Meta, shown: &str) {
    for (name, value) in &m.xattrs {
        if let Err(e) = rustix::fs::fsetxattr(fd, name.as_str(), value, XattrFlags::empty()) {
            log::warn!("{shown}: xattr {name} not kept: {e}");
        }
    }
}

/// The extended attributes of an open file (best effort: none when they cannot be read).
pub fn read_xattrs(fd: BorrowedFd<'_>) -> Vec<(String, Vec<u8>)> {
    let mut list = vec![0u8; 64 * 1024];
    let Ok(n) = rustix::fs::flistxattr(fd, &mut list[..]) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in list[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let mut value = vec![0u8; 64 * 1024];
        if let Ok(len) = rustix::fs::fgetxattr(fd, name, &mut value[..]) {
            value.truncate(len);
            out.push((name.to_owned(), value));
        }
    }
    out.sort();
    out
}

impl<'a> Writer<'a> {
    /// A writer into `root` for entries from `origin` (named in errors).
    pub fn new(root: &'a Confined, origin: impl Into<String>, whiteouts: bool) -> Writer<'a> {
        Writer {
            root,
            origin: origin.into(),
            whiteouts,
            opaque: if whiteouts {
                Opaque::Remember(HashSet::new())
            } else {
                Opaque::Off
            },
            parent_cache: None,
            implicit: Vec::new(),
            stats: Stats::default(),
            progress: None,
            budget: None,
        }
    }

    /// Charges every entry read, and the bytes of regular files, to `budget`.
    pub fn with_budget(mut self, budget: &'a Budget) -> Writer<'a> {
        self.budget = Some(budget);
        self
    }

    /// One more entry read (placed or not), with `bytes` of contents: refused over a limit.
    fn charge(&self, bytes: u64) -> Result<(), StageError> {
        match self.budget {
            Some(b) => Ok(b.charge(&self.origin, bytes)?),
            None => Ok(()),
        }
    }

    /// For the bottom layer (the tree is empty): an opaque marker has nothing to remove, and
    /// no path is remembered for it.
    pub fn bottom_layer(mut self) -> Writer<'a> {
        if self.whiteouts {
            self.opaque = Opaque::Bottom;
        }
        self
    }

    /// Remembers a path placed, when an opaque marker may come after it.
    fn wrote(&mut self, path: &str) {
        if let Opaque::Remember(w) = &mut self.opaque {
            w.insert(path.to_owned());
        }
    }

    /// Counts what this writer places into `progress` too.
    pub fn with_progress(mut self, progress: &'a Progress) -> Writer<'a> {
        self.progress = Some(progress);
        self
    }

    /// One more entry placed.
    fn placed(&mut self) {
        self.stats.entries += 1;
        if let Some(p) = self.progress {
            p.add_entries(1);
        }
    }

    /// Gives the tree's root directory this owner, mode and extended attributes.
    pub fn set_root_meta(&mut self, meta: &Meta) -> Result<(), StageError> {
        set_owner_mode(self.root.fd(), meta).map_err(self.io(".", "chown/chmod"))?;
        set_xattrs(self.root.fd(), meta, ".");
        Ok(())
    }

    /// What was placed so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Directories created only because entries below them needed them (resolved paths).
    pub fn implicit_dirs(&self) -> &[String] {
        &self.implicit
    }

    fn refused(&self, entry: &str, reason: impl Into<String>) -> StageError {
        StageError::Refused {
            origin: self.origin.clone(),
            entry: entry.to_owned(),
            reason: reason.into(),
        }
    }

    fn io(&self, entry: &str, op: &'static str) -> impl FnOnce(Errno) -> StageError + '_ {
        let entry = entry.to_owned();
        move |e| StageError::Io {
            origin: self.origin.clone(),
            entry,
            op,
            source: e.into(),
        }
    }

    /// Resolves directory `rel` inside the tree, following symlinks inside it, creating
    /// missing directories (0755, root) when `create`. `..` above the root is refused.
    fn resolve_dir(&mut self, rel: &str, create: bool, shown: &str) -> Result<OwnedFd, StageError> {
        if let Some((p, fd)) = &self.parent_cache {
            if p == rel {
                return fd.try_clone().map_err(|source| StageError::Io {
                    origin: self.origin.clone(),
                    entry: shown.to_owned(),
                    op: "duplicate fd",
                    source,
                });
            }
        }
        let mut stack: Vec<(String, OwnedFd)> = Vec::new();
        let mut pending: VecDeque<String> = rel
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .map(str::to_owned)
            .collect();
        let mut hops = 0;
        while let Some(comp) = pending.pop_front() {
            if comp == ".." {
                if stack.pop().is_none() {
                    return Err(self.refused(
                        shown,
                        format!(
                            "its directory {rel:?} resolves outside the root (through a symlink)"
                        ),
                    ));
                }
                continue;
            }
            let cur = stack.last().map_or(self.root.fd(), |(_, fd)| fd.as_fd());
            match rustix::fs::statat(cur, comp.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => {
                        let fd =
                            open_dir_at(cur, &comp).map_err(self.io(shown, "open directory"))?;
                        stack.push((comp, fd));
                    }
                    FileType::Symlink => {
                        hops += 1;
                        if hops > MAX_LINK_HOPS {
                            return Err(self.refused(shown, "too many levels of symbolic links"));
                        }
                        let target = rustix::fs::readlinkat(cur, comp.as_str(), Vec::new())
                            .map_err(self.io(shown, "read link"))?;
                        let target = target.to_string_lossy().into_owned();
                        if target.starts_with('/') {
                            stack.clear();
                        }
                        for c in target
                            .split('/')
                            .rev()
                            .filter(|c| !c.is_empty() && *c != ".")
                        {
                            pending.push_front(c.to_owned());
                        }
                    }
                    _ => {
                        let here: Vec<&str> = stack.iter().map(|(n, _)| n.as_str()).collect();
                        return Err(self.refused(
                            shown,
                            format!("{} is not a directory", join(&here.join("/"), &comp)),
                        ));
                    }
                },
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(cur, comp.as_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(self.io(shown, "create directory")(e)),
                    }
                    let fd = open_dir_at(cur, &comp).map_err(self.io(shown, "open directory"))?;
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o755))
                        .map_err(self.io(shown, "chmod"))?;
                    let here: Vec<&str> = stack.iter().map(|(n, _)| n.as_str()).collect();
                    self.implicit.push(join(&here.join("/"), &comp));
                    stack.push((comp, fd));
                }
                Err(e) => return Err(self.io(shown, "resolve")(e)),
            }
        }
        let fd = match stack.pop() {
            Some((_, fd)) => fd,
            None => self.root.fd.try_clone().map_err(|source| StageError::Io {
                origin: self.origin.clone(),
                entry: shown.to_owned(),
                op: "duplicate fd",
                source,
            })?,
        };
        let cached = fd.try_clone().ok();
        self.parent_cache = cached.map(|c| (rel.to_owned(), c));
        Ok(fd)
    }

    /// Removes `name` in `dir` (a whole directory tree if it is one).
    fn remove_all(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &str,
        shown: &str,
    ) -> Result<(), StageError> {
        self.parent_cache = None;
        remove_all(dir, name).map_err(self.io(shown, "remove"))
    }

    /// Makes sure a directory is at `path`: an existing one (or a symlink to one, resolved
    /// inside the tree) is kept as it is; a missing one is created with `meta`.
    pub fn ensure_dir(&mut self, path: &str, meta: &Meta) -> Result<(), StageError> {
        let (parent, name) = split(path);
        let pfd = self.resolve_dir(parent, true, path)?;
        match rustix::fs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => Ok(()),
                FileType::Symlink => self.resolve_dir(path, true, path).map(drop),
                _ => Err(self.refused(path, "it is in the image but not a directory")),
            },
            Err(Errno::NOENT) => self.put(path, Kind::Dir, meta),
            Err(e) => Err(self.io(path, "stat")(e)),
        }
    }

    /// Places one entry at `path` (normalised: see [`normalise`]).
    pub fn put(&mut self, path: &str, kind: Kind<'_>, meta: &Meta) -> Result<(), StageError> {
        let (parent, name) = split(path);
        if self.whiteouts {
            if name == ".wh..wh..opq" {
                return self.opaque(parent, path);
            }
            if let Some(hidden) = name.strip_prefix(".wh.") {
                if hidden.is_empty() || hidden == "." || hidden == ".." {
                    return Err(self.refused(path, "a whiteout that names nothing"));
                }
                let pfd = self.resolve_dir(parent, true, path)?;
                self.stats.whiteouts += 1;
                return match rustix::fs::statat(&pfd, hidden, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(_) => self.remove_all(pfd.as_fd(), hidden, path),
                    Err(Errno::NOENT) => Ok(()),
                    Err(e) => Err(self.io(path, "stat")(e)),
                };
            }
        }
        let pfd = self.resolve_dir(parent, true, path)?;
        let pfd = pfd.as_fd();
        match rustix::fs::statat(pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                if FileType::from_raw_mode(st.st_mode) == FileType::Directory
                    && matches!(kind, Kind::Dir)
                {
                    let fd = open_dir_at(pfd, name).map_err(self.io(path, "open directory"))?;
                    set_owner_mode(fd.as_fd(), meta).map_err(self.io(path, "chown/chmod"))?;
                    set_xattrs(fd.as_fd(), meta, path);
                    self.wrote(path);
                    self.placed();
                    return Ok(());
                }
                self.remove_all(pfd, name, path)?;
            }
            Err(Errno::NOENT) => {}
            Err(e) => return Err(self.io(path, "stat")(e)),
        }
        self.create(pfd, name, path, kind, meta)?;
        self.wrote(path);
        self.placed();
        Ok(())
    }

    fn create(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &str,
        path: &str,
        kind: Kind<'_>,
        meta: &Meta,
    ) -> Result<(), StageError> {
        match kind {
            Kind::Dir => {
                rustix::fs::mkdirat(pfd, name, Mode::from_raw_mode(0o700))
                    .map_err(self.io(path, "create directory"))?;
                let fd = open_dir_at(pfd, name).map_err(self.io(path, "open directory"))?;
                set_owner_mode(fd.as_fd(), meta).map_err(self.io(path, "chown/chmod"))?;
                set_xattrs(fd.as_fd(), meta, path);
            }
            Kind::File(data) => {
                self.write_file(pfd, name, path, data, meta)?;
            }
            Kind::LinkFrom { dir, name: src } => {
                match rustix::fs::linkat(dir, src, pfd, name, AtFlags::empty()) {
                    Ok(()) => self.stats.linked += 1,
                    Err(Errno::XDEV | Errno::PERM | Errno::MLINK | Errno::ACCESS) => {
                        let fd = rustix::fs::openat(
                            dir,
                            src,
                            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                            Mode::empty(),
                        )
                        .map_err(self.io(path, "open source"))?;
                        let mut meta = meta.clone();
                        meta.xattrs = read_xattrs(fd.as_fd());
                        let mut file = std::fs::File::from(fd);
                        self.write_file(pfd, name, path, &mut file, &meta)?;
                    }
                    Err(e) => return Err(self.io(path, "hard link")(e)),
                }
            }
            Kind::Symlink(target) => {
                rustix::fs::symlinkat(target.as_str(), pfd, name)
                    .map_err(self.io(path, "create symlink"))?;
                rustix::fs::chownat(
                    pfd,
                    name,
                    Some(rustix::fs::Uid::from_raw(meta.uid)),
                    Some(rustix::fs::Gid::from_raw(meta.gid)),
                    AtFlags::SYMLINK_NOFOLLOW,
                )
                .map_err(self.io(path, "chown"))?;
            }
            Kind::HardLink(target) => {
                let (tparent, tname) = split(&target);
                let tfd = self
                    .resolve_dir(tparent, false, path)
                    .map_err(|e| match e {
                        StageError::Io { source, .. }
                            if source.kind() == io::ErrorKind::NotFound =>
                        {
                            self.refused(
                                path,
                                format!("hard link target {target:?} does not exist"),
                            )
                        }
                        e => e,
                    })?;
                match rustix::fs::statat(&tfd, tname, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                        return Err(self
                            .refused(path, format!("hard link target {target:?} is a directory")))
                    }
                    Ok(_) => {}
                    Err(Errno::NOENT) => {
                        return Err(self
                            .refused(path, format!("hard link target {target:?} does not exist")))
                    }
                    Err(e) => return Err(self.io(path, "stat link target")(e)),
                }
                rustix::fs::linkat(&tfd, tname, pfd, name, AtFlags::empty())
                    .map_err(self.io(path, "hard link"))?;
            }
            Kind::CharDev(major, minor) | Kind::BlockDev(major, minor) => {
                let ft = if matches!(kind, Kind::CharDev(..)) {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                self.node(pfd, name, path, ft, rustix::fs::makedev(major, minor), meta)?;
            }
            Kind::Fifo => self.node(pfd, name, path, FileType::Fifo, 0, meta)?,
        }
        Ok(())
    }

    fn node(
        &self,
        pfd: BorrowedFd<'_>,
        name: &str,
        path: &str,
        ft: FileType,
        dev: rustix::fs::Dev,
        meta: &Meta,
    ) -> Result<(), StageError> {
        rustix::fs::mknodat(pfd, name, ft, Mode::from_raw_mode(0o600), dev)
            .map_err(self.io(path, "create node"))?;
        rustix::fs::chownat(
            pfd,
            name,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(self.io(path, "chown"))?;
        rustix::fs::chmodat(
            pfd,
            name,
            Mode::from_raw_mode(meta.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(self.io(path, "chmod"))
    }

    fn write_file(
        &mut self,
        pfd: BorrowedFd<'_>,
        name: &str,
        path: &str,
        data: &mut dyn Read,
        meta: &Meta,
    ) -> Result<(), StageError> {
        let fd = rustix::fs::openat(
            pfd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(self.io(path, "create file"))?;
        let mut file = std::fs::File::from(fd);
        let n = io::copy(data, &mut file).map_err(|source| {
            // A read error is the archive's; a write error is ours.
            StageError::Io {
                origin: self.origin.clone(),
                entry: path.to_owned(),
                op: "write file",
                source,
            }
        })?;
        set_owner_mode(file.as_fd(), meta).map_err(self.io(path, "chown/chmod"))?;
        set_xattrs(file.as_fd(), meta, path);
        self.stats.copied += 1;
        self.stats.bytes += n;
        if let Some(p) = self.progress {
            p.add_bytes(n);
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: removes what lower layers put in it (see [`Opaque`]).
    fn opaque(&mut self, dir: &str, shown: &str) -> Result<(), StageError> {
        let dfd = self.resolve_dir(dir, true, shown)?;
        self.stats.whiteouts += 1;
        if matches!(self.opaque, Opaque::Bottom | Opaque::Off) {
            return Ok(());
        }
        let mut names = Vec::new();
        for entry in rustix::fs::Dir::read_from(&dfd).map_err(self.io(shown, "read directory"))? {
            let entry = entry.map_err(self.io(shown, "read directory"))?;
            let n = entry.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            names.push(String::from_utf8_lossy(n).into_owned());
        }
        for n in names {
            let keep = match &self.opaque {
                Opaque::Remember(w) => w.contains(&join(dir, &n)),
                _ => false,
            };
            if !keep {
                self.remove_all(dfd.as_fd(), &n, shown)?;
            }
        }
        Ok(())
    }
}

/// Removes `name` in `dir`, recursively for a directory; symlinks are removed, not followed.
pub fn remove_all(dir: BorrowedFd<'_>, name: &str) -> Result<(), Errno> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(Errno::ISDIR | Errno::PERM) => {}
        Err(e) => return Err(e),
    }
    let fd = open_dir_at(dir, name)?;
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(&fd)? {
        let entry = entry?;
        let n = entry.file_name();
        if n.to_bytes() != b"." && n.to_bytes() != b".." {
            names.push(n.to_owned());
        }
    }
    for n in names {
        remove_all(fd.as_fd(), &n.to_string_lossy())?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
}

/// Reads a tar stream and places its entries with `w`. The stream must be fully readable: a
/// corrupt header, a bad checksum or a truncated stream is an error.
pub fn unpack_tar<R: Read>(w: &mut Writer<'_>, reader: R) -> Result<(), StageError> {
    let origin = w.origin.clone();
    let archive_err = |source: io::Error| StageError::Archive {
        origin: origin.clone(),
        source,
    };
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries().map_err(archive_err)? {
        let mut entry = entry.map_err(archive_err)?;
        let header = entry.header();
        let data = match header.entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => entry.size(),
            _ => 0,
        };
        w.charge(data)?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let path = match normalise(&raw, Anchor::Relative) {
            Ok(Some(p)) => p,
            Ok(None) => continue,
            Err(reason) => return Err(w.refused(&shown, reason.to_string())),
        };
        let meta = tar_meta(w, &mut entry, &shown)?;
        place_tar_entry(w, &mut entry, &path, &shown, &meta)?;
    }
    Ok(())
}

/// A header field that does not parse.
fn bad_header(w: &Writer<'_>, shown: &str, what: &str, e: io::Error) -> StageError {
    w.refused(shown, format!("bad {what} in the header: {e}"))
}

/// An entry's owner, mode and xattrs: the header's, with pax `uid`, `gid` and
/// `SCHILY.xattr.*` records applied.
fn tar_meta<R: Read>(
    w: &Writer<'_>,
    entry: &mut tar::Entry<'_, R>,
    shown: &str,
) -> Result<Meta, StageError> {
    let header = entry.header();
    let bad = |what: &str, e| bad_header(w, shown, what, e);
    let mut meta = Meta {
        mode: header.mode().map_err(|e| bad("mode", e))? & 0o7777,
        uid: u32::try_from(header.uid().map_err(|e| bad("uid", e))?)
            .map_err(|_| w.refused(shown, "uid out of range"))?,
        gid: u32::try_from(header.gid().map_err(|e| bad("gid", e))?)
            .map_err(|_| w.refused(shown, "gid out of range"))?,
        xattrs: Vec::new(),
    };
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            let (Ok(key), value) = (ext.key(), ext.value_bytes()) else {
                continue;
            };
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                meta.xattrs.push((name.to_owned(), value.to_vec()));
            } else if key == "uid" || key == "gid" {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|v| v.parse::<u32>().ok())
                    .ok_or_else(|| w.refused(shown, format!("pax {key} out of range")))?;
                if key == "uid" {
                    meta.uid = v;
                } else {
                    meta.gid = v;
                }
            }
        }
    }
    Ok(meta)
}

/// Places one tar entry at its normalised `path`.
fn place_tar_entry<R: Read>(
    w: &mut Writer<'_>,
    entry: &mut tar::Entry<'_, R>,
    path: &str,
    shown: &str,
    meta: &Meta,
) -> Result<(), StageError> {
    use tar::EntryType as T;
    let header = entry.header().clone();
    let link_name = |w: &Writer<'_>| -> Result<Vec<u8>, StageError> {
        match header.link_name_bytes() {
            Some(l) => Ok(l.into_owned()),
            None => Err(w.refused(shown, "a link without a target")),
        }
    };
    let kind = match header.entry_type() {
        T::Regular | T::Continuous => {
            let mut data: &mut dyn Read = entry;
            return w.put(path, Kind::File(&mut data), meta);
        }
        T::Directory => Kind::Dir,
        T::Symlink => {
            let target = String::from_utf8(link_name(w)?)
                .map_err(|_| w.refused(shown, "the symlink target is not UTF-8"))?;
            if target.is_empty() || target.contains('\0') {
                return Err(w.refused(shown, "empty symlink target"));
            }
            Kind::Symlink(target)
        }
        T::Link => match normalise(&link_name(w)?, Anchor::Relative) {
            Ok(Some(t)) => Kind::HardLink(t),
            Ok(None) => return Err(w.refused(shown, "a hard link to the root")),
            Err(reason) => return Err(w.refused(shown, format!("hard link target: {reason}"))),
        },
        T::Char | T::Block => {
            let bad = |what: &str, e| bad_header(w, shown, what, e);
            let major = header.device_major().map_err(|e| bad("device major", e))?;
            let minor = header.device_minor().map_err(|e| bad("device minor", e))?;
            let (major, minor) = (major.unwrap_or(0), minor.unwrap_or(0));
            if header.entry_type() == T::Char {
                Kind::CharDev(major, minor)
            } else {
                Kind::BlockDev(major, minor)
            }
        }
        T::Fifo => Kind::Fifo,
        T::XGlobalHeader => return Ok(()),
        T::GNUSparse => return Err(w.refused(shown, "sparse files are not supported")),
        other => {
            let t = other.as_byte() as char;
            return Err(w.refused(shown, format!("entry type {t:?} is not supported")));
        }
    };
    w.put(path, kind, meta)
}

/// Walks `src` (sorted by name, parents first; with whiteouts on, each directory's opaque
/// marker and whiteouts before its other entries) and places every entry with `w`: regular
/// files by hard link from `src`, directories, symlinks and nodes recreated with their owner,
/// mode and xattrs. Directories listed in `skip_dirs` get no entry of their own (they were
/// implicit in the layer: their children are placed through whatever is at that path). Every
/// other entry is charged to `w`'s budget, with the size of a regular file.
pub fn apply_dir(
    w: &mut Writer<'_>,
    src: &Path,
    skip_dirs: &HashSet<String>,
) -> Result<(), StageError> {
    let origin = w.origin.clone();
    let root = Confined::open(src).map_err(|e| match e {
        StageError::Setup { source, .. } => StageError::Io {
            origin: origin.clone(),
            entry: ".".to_owned(),
            op: "open",
            source,
        },
        e => e,
    })?;
    let fd = root.fd.try_clone().map_err(|source| StageError::Io {
        origin: origin.clone(),
        entry: ".".to_owned(),
        op: "duplicate fd",
        source,
    })?;
    // Sorted, the opaque marker first: nothing of this layer is in a directory yet when it
    // is emptied, so no path needs remembering.
    if matches!(w.opaque, Opaque::Remember(_)) {
        w.opaque = Opaque::MarkerFirst;
    }
    walk(w, fd, "", skip_dirs)
}

/// The names in a directory being staged, sorted (whiteout markers first when `w` applies
/// them), `.` and `..` left out. Only the names are kept, packed ([`DirNames`]): the largest
/// directory is what this costs.
fn list_dir(w: &Writer<'_>, dir: &OwnedFd, rel: &str) -> Result<DirNames, StageError> {
    let shown_dir = if rel.is_empty() { "." } else { rel };
    let mut names = DirNames::read(dir).map_err(w.io(shown_dir, "read directory"))?;
    if w.whiteouts {
        // The opaque marker, then the whiteouts, before anything of this layer is placed.
        let rank = |n: &[u8]| match n {
            b".wh..wh..opq" => 0,
            b if b.starts_with(b".wh.") => 1,
            _ => 2,
        };
        names.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.cmp(b)));
    } else {
        names.sort();
    }
    Ok(names)
}

/// One entry of a directory being staged: its name (refused unless UTF-8), its path in the
/// tree and its `lstat`.
fn entry_of<'n>(
    w: &Writer<'_>,
    dir: &OwnedFd,
    rel: &str,
    cname: &'n CStr,
) -> Result<(&'n str, String, rustix::fs::Stat), StageError> {
    let Ok(name) = cname.to_str() else {
        return Err(w.refused(
            &join(rel, &cname.to_string_lossy()),
            "the file name is not UTF-8",
        ));
    };
    let path = join(rel, name);
    let st =
        rustix::fs::statat(dir, cname, AtFlags::SYMLINK_NOFOLLOW).map_err(w.io(&path, "stat"))?;
    Ok((name, path, st))
}

fn walk(
    w: &mut Writer<'_>,
    dir: OwnedFd,
    rel: &str,
    skip_dirs: &HashSet<String>,
) -> Result<(), StageError> {
    let names = list_dir(w, &dir, rel)?;
    for cname in names.iter() {
        let (name, path, st) = entry_of(w, &dir, rel, cname)?;
        let mut meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            xattrs: Vec::new(),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        let implicit = ft == FileType::Directory && skip_dirs.contains(&path);
        if !implicit {
            let bytes = if ft == FileType::RegularFile {
                st.st_size as u64
            } else {
                0
            };
            w.charge(bytes)?;
        }
        match ft {
            FileType::Directory => {
                let sub = open_dir_at(dir.as_fd(), name).map_err(w.io(&path, "open directory"))?;
                if !implicit {
                    meta.xattrs = read_xattrs(sub.as_fd());
                    w.put(&path, Kind::Dir, &meta)?;
                }
                walk(w, sub, &path, skip_dirs)?;
            }
            FileType::RegularFile => {
                w.put(
                    &path,
                    Kind::LinkFrom {
                        dir: dir.as_fd(),
                        name: cname,
                    },
                    &meta,
                )?;
            }
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&dir, cname, Vec::new())
                    .map_err(w.io(&path, "read link"))?;
                let target = target
                    .into_string()
                    .map_err(|_| w.refused(&path, "the symlink target is not UTF-8"))?;
                w.put(&path, Kind::Symlink(target), &meta)?;
            }
            FileType::CharacterDevice | FileType::BlockDevice => {
                let (major, minor) = (rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev));
                let kind = if ft == FileType::CharacterDevice {
                    Kind::CharDev(major, minor)
                } else {
                    Kind::BlockDev(major, minor)
                };
                w.put(&path, kind, &meta)?;
            }
            FileType::Fifo => w.put(&path, Kind::Fifo, &meta)?,
            _ => log::warn!("{}: skipping socket {path}", w.origin),
        }
    }
    Ok(())
}

/// Mirrors `src` into the empty root of `w`'s tree: like [`apply_dir`] (files hard-linked,
/// the rest recreated with owner, mode and xattrs), but every entry is created straight in
/// the directory fd the walk holds, without resolving paths or looking for what is already
/// there: for a first, only input into a fresh staging tree, about half the system calls.
pub fn mirror_dir(w: &mut Writer<'_>, src: &Path) -> Result<(), StageError> {
    let origin = w.origin.clone();
    let src_root = Confined::open(src).map_err(|e| match e {
        StageError::Setup { source, .. } => StageError::Io {
            origin: origin.clone(),
            entry: ".".to_owned(),
            op: "open",
            source,
        },
        e => e,
    })?;
    let dup = |fd: BorrowedFd<'_>| {
        fd.try_clone_to_owned().map_err(|source| StageError::Io {
            origin: origin.clone(),
            entry: ".".to_owned(),
            op: "duplicate fd",
            source,
        })
    };
    let (s, d) = (dup(src_root.fd())?, dup(w.root.fd())?);
    w.parent_cache = None;
    mirror(w, s, d, "")
}

fn mirror(w: &mut Writer<'_>, src: OwnedFd, dst: OwnedFd, rel: &str) -> Result<(), StageError> {
    let names = list_dir(w, &src, rel)?;
    for cname in names.iter() {
        let (name, path, st) = entry_of(w, &src, rel, cname)?;
        let mut meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            xattrs: Vec::new(),
        };
        let ft = FileType::from_raw_mode(st.st_mode);
        let kind = match ft {
            FileType::Directory => {
                let sub = open_dir_at(src.as_fd(), name).map_err(w.io(&path, "open directory"))?;
                meta.xattrs = read_xattrs(sub.as_fd());
                w.create(dst.as_fd(), name, &path, Kind::Dir, &meta)?;
                let dsub = open_dir_at(dst.as_fd(), name).map_err(w.io(&path, "open directory"))?;
                w.placed();
                mirror(w, sub, dsub, &path)?;
                continue;
            }
            FileType::RegularFile => Kind::LinkFrom {
                dir: src.as_fd(),
                name: cname,
            },
            FileType::Symlink => {
                let target = rustix::fs::readlinkat(&src, cname, Vec::new())
                    .map_err(w.io(&path, "read link"))?;
                Kind::Symlink(
                    target
                        .into_string()
                        .map_err(|_| w.refused(&path, "the symlink target is not UTF-8"))?,
                )
            }
            FileType::CharacterDevice => {
                Kind::CharDev(rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev))
            }
            FileType::BlockDevice => {
                Kind::BlockDev(rustix::fs::major(st.st_rdev), rustix::fs::minor(st.st_rdev))
            }
            FileType::Fifo => Kind::Fifo,
            _ => {
                log::warn!("{}: skipping socket {path}", w.origin);
                continue;
            }
        };
        w.create(dst.as_fd(), name, &path, kind, &meta)?;
        w.placed();
    }
    Ok(())
}

/// The digest of a directory tree (`sha256:<hex>`): a sha256 over one record per entry, in
/// sorted depth-first order — `path NUL mode(octal, type bits included) NUL uid NUL gid NUL`,
/// then the symlink target, `major:minor` for a device or the sha256 hex of a file's contents,
/// then a newline. Sockets are left out. Stops early (with an error) when `cancel` is set.
pub fn digest_dir(src: &Path, cancel: &std::sync::atomic::AtomicBool) -> io::Result<String> {
    let mut h = Sha256::new();
    digest_walk(src, "", &mut h, cancel)?;
    Ok(format!(
        "sha256:{}",
        bootlace_contract::digest::hex(&h.finalize())
    ))
}

fn digest_walk(
    dir: &Path,
    rel: &str,
    h: &mut Sha256,
    cancel: &std::sync::atomic::AtomicBool,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let fd = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut names = DirNames::read(&fd)?;
    drop(fd);
    names.sort();
    for name in names.iter() {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::other("cancelled"));
        }
        let name = std::ffi::OsStr::from_bytes(name.to_bytes());
        let host = dir.join(name);
        let path = join(rel, &name.to_string_lossy());
        let m = std::fs::symlink_metadata(&host)?;
        let ft = m.file_type();
        if ft.is_socket() {
            continue;
        }
        h.update(path.as_bytes());
        h.update(format!("\0{:o}\0{}\0{}\0", m.mode() & 0o177777, m.uid(), m.gid()).as_bytes());
        if ft.is_symlink() {
            h.update(std::fs::read_link(&host)?.as_os_str().as_bytes());
        } else if ft.is_char_device() || ft.is_block_device() {
            let (ma, mi) = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()));
            h.update(format!("{ma}:{mi}").as_bytes());
        } else if ft.is_file() {
            let (digest, _) = bootlace_contract::digest::of_reader(std::fs::File::open(&host)?)?;
            h.update(digest.hex().as_bytes());
        }
        h.update(b"\n");
        if ft.is_dir() {
            digest_walk(&host, &path, h, cancel)?;
        }
    }
    Ok(())
}
