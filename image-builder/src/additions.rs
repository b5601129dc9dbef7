//! What a bake adds to its input: the mount points, the writable directories, the init, its
//! config and the kernel modules, as an in-memory tree of nodes. Each path is resolved through
//! the input's own symlinks (`/sbin -> usr/sbin`, `/lib -> usr/lib` on merged-/usr images) and
//! the node placed at the resolved path, never outside the input's root; the input is only read,
//! one component at a time from its root fd, with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`.
//!
//! The tree is complete on its own: every directory on the way to an addition is a node too,
//! carrying the input's mode, owner and extended attributes where the input has that directory
//! (the root included: [`Additions::root_meta`]), so that laid over the input — by a read-only
//! overlay, where the topmost layer's directory attributes win, by [`Additions::apply`] onto a
//! staged copy, or merged while an archive is written — it changes nothing the input has but
//! what it replaces. A file replaces a file or a symlink of the input (hiding it); it never
//! replaces a directory (an error), and a directory is never asked for where the input has
//! something else (an error).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::path::{join, split, Shown};
use crate::stage::{self, Confined, Kind, Meta, StageError, Writer};

/// Longest chain of symlinks followed while resolving one path.
const MAX_LINK_HOPS: usize = 40;

/// What a node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A directory.
    Dir,
    /// A regular file with these bytes.
    Bytes(Vec<u8>),
    /// A regular file read from the host when it is written.
    HostFile(PathBuf),
    /// A symbolic link.
    Symlink(String),
    /// A character device (major, minor).
    CharDev(u32, u32),
}

/// One node: what it holds, its owner, mode and extended attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// What it holds.
    pub content: Content,
    /// Owner, mode, xattrs.
    pub meta: Meta,
}

impl Node {
    /// A root-owned node with this mode.
    pub fn root(content: Content, mode: u32) -> Node {
        Node {
            content,
            meta: Meta::root(mode),
        }
    }
}

/// Why an addition could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The path cannot be placed where the input would have it.
    #[error("{path} in the image: {problem}")]
    Place {
        /// The path asked for, as the image sees it.
        path: String,
        /// What is in the way.
        problem: Problem,
    },
    /// Reading the input failed.
    #[error("input {}: {op} {path}", base.display())]
    Read {
        /// The input directory.
        base: PathBuf,
        /// The path in it.
        path: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A host file to add (the init, a module) could not be read.
    #[error("read {}", path.display())]
    Host {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the additions out failed.
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// What stands in the way of an addition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// A `..` in a symlink's target climbs above the root.
    #[error("{0} resolves outside the root (through a symlink)")]
    Outside(String),
    /// Symlinks pointing at each other.
    #[error("too many levels of symbolic links")]
    Loop,
    /// A component on the way is a file.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// The input has a directory where a file or a link is to go.
    #[error("the input has a directory at {0}")]
    DirectoryThere(String),
}

/// What is at a path of the merged tree (the additions over the input).
enum Found {
    Missing,
    Dir,
    Symlink(String),
    Other,
}

/// The additions, resolved against an input directory (or none: a stage-1 image, or an
/// initramfs of the init alone).
#[derive(Debug)]
pub struct Additions {
    base: Option<Confined>,
    root_meta: Meta,
    /// Parent path -> name -> node.
    children: BTreeMap<String, BTreeMap<String, Node>>,
}

const STEP: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// Extended attributes that are copied from the input's directories: all but overlayfs's own,
/// which would change what an overlay shows (`trusted.overlay.opaque`, …).
fn copied_xattrs(xattrs: Vec<(String, Vec<u8>)>) -> Vec<(String, Vec<u8>)> {
    xattrs
        .into_iter()
        .filter(|(n, _)| !n.starts_with("trusted.overlay.") && !n.starts_with("user.overlay."))
        .collect()
}

impl Additions {
    /// No additions yet, over the directory `base` (read, never written).
    pub fn new(base: Option<&Path>) -> Result<Additions, AddError> {
        let Some(path) = base else {
            return Ok(Additions {
                base: None,
                root_meta: Meta::root(0o755),
                children: BTreeMap::new(),
            });
        };
        let base = Confined::open(path).map_err(|e| match e {
            StageError::Setup { source, .. } => AddError::Read {
                base: path.to_owned(),
                path: "/".to_owned(),
                op: "open",
                source,
            },
            e => AddError::Stage(e),
        })?;
        let mut a = Additions {
            base: None,
            root_meta: Meta::default(),
            children: BTreeMap::new(),
        };
        let fd = base
            .fd()
            .try_clone_to_owned()
            .map_err(|source| a.read_err_at(path, "", "open", source))?;
        a.root_meta = meta_of(fd.as_fd()).map_err(|e| a.read_err_at(path, "", "stat", e))?;
        a.base = Some(base);
        Ok(a)
    }

    /// The mode, owner and xattrs the image's root directory gets: the input's (0755 root
    /// without an input).
    pub fn root_meta(&self) -> &Meta {
        &self.root_meta
    }

    /// The nodes directly in directory `dir` (`""` for the root), by name.
    pub fn children(&self, dir: &str) -> Option<&BTreeMap<String, Node>> {
        self.children.get(dir)
    }

    /// Every node, parents before children, names in order.
    pub fn walk(&self) -> Vec<(String, &Node)> {
        let mut out = Vec::new();
        self.walk_into("", &mut out);
        out
    }

    fn walk_into<'s>(&'s self, dir: &str, out: &mut Vec<(String, &'s Node)>) {
        for (name, node) in self.children.get(dir).into_iter().flatten() {
            let path = join(dir, name);
            out.push((path.clone(), node));
            if node.content == Content::Dir {
                self.walk_into(&path, out);
            }
        }
    }

    /// The node at a resolved path.
    pub fn get(&self, path: &str) -> Option<&Node> {
        let (parent, name) = split(path);
        self.children.get(parent)?.get(name)
    }

    /// Makes sure a directory is at `path`: an existing one (in the input or added; through a
    /// symlink at `path` too) is kept as it is; a missing one is added with `meta` (missing
    /// directories behind a symlink get 0755, root). Returns the resolved path.
    pub fn ensure_dir(&mut self, path: &str, meta: &Meta) -> Result<String, AddError> {
        let (parent, name) = split(path);
        let mut dirs = self.resolve(parent, path)?;
        let direct = join(&dirs.join("/"), name);
        let mut meta = meta.clone();
        let mut leaf = name.to_owned();
        if let Found::Symlink(_) = self.find(&direct)? {
            dirs = self.resolve(path, path)?;
            meta = Meta::root(0o755);
            match dirs.pop() {
                Some(l) => leaf = l,
                // The link points at the root.
                None => return Ok(String::new()),
            }
        }
        self.place_dirs(&dirs)?;
        let resolved = join(&dirs.join("/"), &leaf);
        match self.find(&resolved)? {
            Found::Dir => Ok(resolved),
            Found::Missing => {
                let node = Node {
                    content: Content::Dir,
                    meta,
                };
                self.insert(&resolved, node);
                Ok(resolved)
            }
            Found::Symlink(_) | Found::Other => Err(AddError::Place {
                path: Shown(path).to_string(),
                problem: Problem::NotADirectory(Shown(&resolved).to_string()),
            }),
        }
    }

    /// The input's directory at `path`, resolved through the input's symlinks inside it: opened
    /// (never through a link) with its path on the host; `None` when the input has no directory
    /// there.
    pub fn input_dir(&self, path: &str) -> Result<Option<(OwnedFd, PathBuf)>, AddError> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let resolved = self.resolve(path, path)?.join("/");
        match open_beneath(base, &resolved) {
            Ok(fd) => Ok(Some((fd, base.path().join(&resolved)))),
            Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => Ok(None),
            Err(e) => Err(self.read_err(&resolved, "open", e.into())),
        }
    }

    /// Whether the input has something at `path` (its directory resolved through the input's
    /// symlinks, inside it; the last component not followed).
    pub fn input_has(&self, path: &str) -> Result<bool, AddError> {
        if self.base.is_none() {
            return Ok(false);
        }
        let (parent, name) = split(path);
        let dirs = self.resolve(parent, path)?;
        let resolved = join(&dirs.join("/"), name);
        Ok(!matches!(self.find(&resolved)?, Found::Missing))
    }

    /// The input's regular file at `path`: every symlink on the way, the last one too,
    /// resolved inside the input as the booted image resolves it (one that climbs above the
    /// root is an error, never followed out). `None` when the input has nothing there; `Err`
    /// when it has something else than a regular file. Returns the resolved path and an `O_PATH`
    /// descriptor of the file (nothing is opened for reading: a device or FIFO is never opened).
    fn input_file(&self, path: &str) -> Result<Option<(String, OwnedFd)>, AddError> {
        let Some(base) = &self.base else {
            return Ok(None);
        };
        let mut path = path.trim_start_matches('/').to_owned();
        for _ in 0..=MAX_LINK_HOPS {
            let (parent, name) = split(&path);
            let dirs = match self.resolve(parent, &path) {
                Ok(dirs) => dirs,
                Err(AddError::Place {
                    problem: Problem::NotADirectory(_),
                    ..
                }) => return Ok(None),
                Err(e) => return Err(e),
            };
            let dir = dirs.join("/");
            let here = join(&dir, name);
            match self.find(&here)? {
                Found::Missing => return Ok(None),
                Found::Symlink(t) if t.starts_with('/') => path = t,
                Found::Symlink(t) => path = join(&dir, &t),
                Found::Dir => {
                    return Err(self.read_err(&here, "read", io::Error::from(Errno::ISDIR)))
                }
                Found::Other => {
                    let pfd = open_beneath(base, &dir)
                        .map_err(|e| self.read_err(&here, "open", e.into()))?;
                    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let fd = rustix::fs::openat2(&pfd, name, flags, Mode::empty(), STEP)
                        .map_err(|e| self.read_err(&here, "open", e.into()))?;
                    return Ok(Some((here, fd)));
                }
            }
        }
        Err(AddError::Place {
            path: Shown(&path).to_string(),
            problem: Problem::Loop,
        })
    }

    /// The permission bits of the input's regular file at `path` (symlinks followed inside the
    /// input, as [`Additions::read_input_file`] does); `None` when there is none there, or
    /// something else than a regular file.
    pub fn input_file_mode(&self, path: &str) -> Result<Option<u32>, AddError> {
        let found = match self.input_file(path) {
            Ok(f) => f,
            Err(AddError::Read { .. }) => None,
            Err(e) => return Err(e),
        };
        let Some((here, fd)) = found else {
            return Ok(None);
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.read_err(&here, "stat", e.into()))?;
        Ok(
            (FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
                .then_some(st.st_mode & 0o7777),
        )
    }

    /// The bytes of the input's regular file at `path` (`/etc/passwd`), every symlink on the
    /// way resolved inside the input, never outside it; `None` when there is no such file.
    /// Something else than a regular file there, or a file over `max` bytes, is an error.
    pub fn read_input_file(&self, path: &str, max: u64) -> Result<Option<Vec<u8>>, AddError> {
        use std::io::Read as _;
        use std::os::fd::AsRawFd as _;
        let Some((here, fd)) = self.input_file(path)? else {
            return Ok(None);
        };
        let st = rustix::fs::fstat(&fd).map_err(|e| self.read_err(&here, "stat", e.into()))?;
        let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            let e = invalid("not a regular file".to_owned());
            return Err(self.read_err(&here, "read", e));
        }
        let size = u64::try_from(st.st_size).unwrap_or(u64::MAX);
        if size > max {
            let e = invalid(format!("{size} bytes, over the {max}-byte limit"));
            return Err(self.read_err(&here, "read", e));
        }
        // Reopened for reading through its O_PATH descriptor: the very file checked above.
        let file = File::open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .map_err(|e| self.read_err(&here, "open", e))?;
        let mut bytes = Vec::new();
        file.take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| self.read_err(&here, "read", e))?;
        if bytes.len() as u64 > max {
            let e = invalid(format!("over the {max}-byte limit"));
            return Err(self.read_err(&here, "read", e));
        }
        Ok(Some(bytes))
    }

    /// Places a file, symlink or device at `path` (its directory resolved through the input's
    /// symlinks; the last component never followed), hiding what the input has there unless
    /// that is a directory. Returns the resolved path.
    pub fn put(&mut self, path: &str, node: Node) -> Result<String, AddError> {
        let (parent, name) = split(path);
        let dirs = self.resolve(parent, path)?;
        self.place_dirs(&dirs)?;
        let resolved = join(&dirs.join("/"), name);
        if let Found::Dir = self.find(&resolved)? {
            return Err(AddError::Place {
                path: Shown(path).to_string(),
                problem: Problem::DirectoryThere(Shown(&resolved).to_string()),
            });
        }
        self.insert(&resolved, node);
        Ok(resolved)
    }

    fn insert(&mut self, resolved: &str, node: Node) {
        let (parent, name) = split(resolved);
        self.children
            .entry(parent.to_owned())
            .or_default()
            .insert(name.to_owned(), node);
    }

    /// Adds a node for every directory on a resolved path that has none yet: with the input's
    /// attributes where the input has it, 0755 root where it is new.
    fn place_dirs(&mut self, dirs: &[String]) -> Result<(), AddError> {
        for i in 1..=dirs.len() {
            let here = dirs[..i].join("/");
            if self.get(&here).is_some() {
                continue;
            }
            let meta = match self.find(&here)? {
                Found::Dir => self.base_dir_meta(&here)?,
                _ => Meta::root(0o755),
            };
            self.insert(
                &here,
                Node {
                    content: Content::Dir,
                    meta,
                },
            );
        }
        Ok(())
    }

    /// Resolves directory `rel` in the merged tree, following symlinks inside it; returns its
    /// components (missing ones included: they will be created).
    fn resolve(&self, rel: &str, shown: &str) -> Result<Vec<String>, AddError> {
        let place = |problem| AddError::Place {
            path: Shown(shown).to_string(),
            problem,
        };
        let mut resolved: Vec<String> = Vec::new();
        let mut pending: VecDeque<String> = components(rel).collect();
        let mut hops = 0;
        while let Some(comp) = pending.pop_front() {
            if comp == ".." {
                if resolved.pop().is_none() {
                    return Err(place(Problem::Outside(Shown(rel).to_string())));
                }
                continue;
            }
            let here = join(&resolved.join("/"), &comp);
            match self.find(&here)? {
                Found::Missing | Found::Dir => resolved.push(comp),
                Found::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_LINK_HOPS {
                        return Err(place(Problem::Loop));
                    }
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(c);
                    }
                }
                Found::Other => {
                    return Err(place(Problem::NotADirectory(Shown(&here).to_string())))
                }
            }
        }
        Ok(resolved)
    }

    /// What is at a resolved path: the addition there, else the input's entry.
    fn find(&self, here: &str) -> Result<Found, AddError> {
        if let Some(node) = self.get(here) {
            return Ok(match &node.content {
                Content::Dir => Found::Dir,
                Content::Symlink(t) => Found::Symlink(t.clone()),
                _ => Found::Other,
            });
        }
        let Some(base) = &self.base else {
            return Ok(Found::Missing);
        };
        let (parent, name) = split(here);
        let pfd = match open_beneath(base, parent) {
            Ok(fd) => fd,
            Err(Errno::NOENT | Errno::NOTDIR) => return Ok(Found::Missing),
            Err(e) => return Err(self.read_err(here, "open", e.into())),
        };
        match rustix::fs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(match FileType::from_raw_mode(st.st_mode) {
                FileType::Directory => Found::Dir,
                FileType::Symlink => {
                    let t = rustix::fs::readlinkat(&pfd, name, Vec::new())
                        .map_err(|e| self.read_err(here, "read link", e.into()))?;
                    Found::Symlink(t.to_string_lossy().into_owned())
                }
                _ => Found::Other,
            }),
            Err(Errno::NOENT) => Ok(Found::Missing),
            Err(e) => Err(self.read_err(here, "stat", e.into())),
        }
    }

    /// The input's mode, owner and xattrs of the directory at a resolved path.
    fn base_dir_meta(&self, here: &str) -> Result<Meta, AddError> {
        let Some(base) = &self.base else {
            return Ok(Meta::root(0o755));
        };
        let fd = open_beneath(base, here).map_err(|e| self.read_err(here, "open", e.into()))?;
        meta_of(fd.as_fd()).map_err(|e| self.read_err(here, "stat", e))
    }

    fn read_err(&self, path: &str, op: &'static str, source: io::Error) -> AddError {
        let base = self
            .base
            .as_ref()
            .map(|b| b.path())
            .unwrap_or(Path::new(""));
        self.read_err_at(base, path, op, source)
    }

    fn read_err_at(&self, base: &Path, path: &str, op: &'static str, e: io::Error) -> AddError {
        AddError::Read {
            base: base.to_owned(),
            path: Shown(path).to_string(),
            op,
            source: e,
        }
    }

    /// Writes the additions into the empty directory `dir` (its own attributes set to
    /// [`Additions::root_meta`]): the layer an overlay lays over the input.
    pub fn materialize(&self, dir: &Path) -> Result<(), AddError> {
        let root = Confined::open(dir)?;
        let mut w = Writer::new(&root, "the bake's additions", false);
        w.set_root_meta(&self.root_meta)?;
        for (path, node) in self.walk() {
            let meta = &node.meta;
            match &node.content {
                Content::Dir => w.put(&path, Kind::Dir, meta)?,
                Content::Bytes(b) => w.put(&path, Kind::File(&mut &b[..]), meta)?,
                Content::HostFile(host) => {
                    let mut f = File::open(host).map_err(|source| AddError::Host {
                        path: host.clone(),
                        source,
                    })?;
                    w.put(&path, Kind::File(&mut f), meta)?;
                }
                Content::Symlink(t) => w.put(&path, Kind::Symlink(t.clone()), meta)?,
                Content::CharDev(a, b) => w.put(&path, Kind::CharDev(*a, *b), meta)?,
            }
        }
        Ok(())
    }

    /// Places the additions written by [`Additions::materialize`] at `dir` into the staged
    /// tree `root` (files hard-linked from `dir`), and gives `root` the root's attributes.
    pub fn apply(&self, dir: &Path, root: &Confined) -> Result<(), AddError> {
        let mut w = Writer::new(root, "the bake's additions", false);
        w.set_root_meta(&self.root_meta)?;
        stage::apply_dir(&mut w, dir, &Default::default())?;
        Ok(())
    }
}

/// The components of a path, `.` and empty ones left out.
fn components(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::to_owned)
}

/// Opens the directory at a resolved path under `base`, never following a symlink.
fn open_beneath(base: &Confined, rel: &str) -> Result<OwnedFd, Errno> {
    let rel = if rel.is_empty() { "." } else { rel };
    rustix::fs::openat2(
        base.fd(),
        rel,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        STEP,
    )
}

/// Mode, owner and (copied) xattrs of an open directory.
fn meta_of(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<Meta> {
    let st = rustix::fs::fstat(fd)?;
    Ok(Meta {
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        xattrs: copied_xattrs(stage::read_xattrs(fd)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A merged-/usr input: `sbin -> usr/sbin`, `lib -> /usr/lib`, an escaping link, a loop,
    /// a file where a directory would go, an existing init.
    fn input() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tempdir");
        let r = t.path();
        for d in ["usr/sbin", "usr/lib", "etc", "srv"] {
            std::fs::create_dir_all(r.join(d)).expect("mkdir");
        }
        std::fs::set_permissions(r.join("srv"), std::fs::Permissions::from_mode(0o750))
            .expect("chmod");
        symlink("usr/sbin", r.join("sbin")).expect("link");
        symlink("/usr/lib", r.join("lib")).expect("link");
        symlink("../../..", r.join("escape")).expect("link");
        symlink("loop", r.join("loop")).expect("link");
        symlink("var/tmp", r.join("tmp")).expect("link");
        std::fs::write(r.join("etc/passwd"), b"x").expect("file");
        std::fs::write(r.join("usr/sbin/bootlace-init"), b"old").expect("file");
        std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o751)).expect("chmod");
        t
    }

    fn file(data: &[u8]) -> Node {
        Node::root(Content::Bytes(data.to_vec()), 0o644)
    }

    #[test]
    fn resolves_through_the_inputs_links() {
        let t = input();
        let mut a = Additions::new(Some(t.path())).expect("open");
        let cases: &[(&str, &str)] = &[
            ("sbin/bootlace-init", "usr/sbin/bootlace-init"),
            (
                "lib/modules/6.1/modules.dep",
                "usr/lib/modules/6.1/modules.dep",
            ),
            ("etc/bootlace/init.toml", "etc/bootlace/init.toml"),
            ("sbin", "sbin"),
        ];
        for (path, want) in cases {
            assert_eq!(a.put(path, file(b"new")).expect(path), *want, "{path}");
        }
        // Directories on the way carry the input's attributes; new ones are 0755 root.
        assert_eq!(a.get("usr").map(|n| &n.content), Some(&Content::Dir));
        assert_eq!(a.get("usr/lib/modules").map(|n| n.meta.mode), Some(0o755));
        assert!(a.get("lib").is_none(), "the /lib symlink stays the input's");
        let paths: Vec<String> = a.walk().into_iter().map(|(p, _)| p).collect();
        assert_eq!(paths.first().map(String::as_str), Some("etc"));
        assert!(paths.windows(2).all(|w| w[0] != w[1]));
        // A missing directory behind a symlink is created where the link points.
        assert_eq!(
            a.ensure_dir("tmp", &Meta::root(0o1777)).expect("tmp"),
            "var/tmp"
        );
        assert_eq!(a.get("var/tmp").map(|n| n.meta.mode), Some(0o755));
        assert_eq!(a.ensure_dir("srv", &Meta::root(0o755)).expect("srv"), "srv");
        assert!(
            a.get("srv").is_none(),
            "an existing directory is kept as it is"
        );
        assert_eq!(
            a.ensure_dir(".bootstrap", &Meta::root(0o700)).expect("new"),
            ".bootstrap"
        );
        assert_eq!(a.get(".bootstrap").map(|n| n.meta.mode), Some(0o700));
        assert_eq!(a.root_meta().mode, 0o751, "the input root's mode");
    }

    #[test]
    fn refuses_what_is_in_the_way() {
        let t = input();
        let mut a = Additions::new(Some(t.path())).expect("open");
        let cases: &[(&str, &str)] = &[
            ("escape/etc/x", "resolves outside the root"),
            ("loop/x", "too many levels"),
            ("etc/passwd/x", "/etc/passwd is not a directory"),
            ("usr", "the input has a directory at /usr"),
        ];
        for (path, want) in cases {
            let e = a.put(path, file(b"x")).expect_err(path).to_string();
            assert!(e.contains(want), "{path}: {e}");
        }
        let e = a
            .ensure_dir("etc/passwd", &Meta::root(0o755))
            .expect_err("a file")
            .to_string();
        assert!(e.contains("/etc/passwd is not a directory"), "{e}");
    }

    #[test]
    fn reads_input_files_confined_to_the_input() {
        let t = input();
        let r = t.path();
        // A sentinel outside the input, and links that lead to it.
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::write(outside.path().join("passwd"), b"host").expect("file");
        std::fs::create_dir_all(r.join("usr/etc")).expect("mkdir");
        std::fs::write(r.join("usr/etc/group"), b"g").expect("file");
        symlink("../usr/etc/group", r.join("etc/group")).expect("link");
        symlink("/usr/etc/group", r.join("etc/group-abs")).expect("link");
        symlink(outside.path().join("passwd"), r.join("etc/host-abs")).expect("link");
        symlink("../../../../../../../../../etc/passwd", r.join("etc/climb")).expect("link");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            r.join("etc/fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o644),
            0,
        )
        .expect("fifo");
        let a = Additions::new(Some(r)).expect("open");
        let read = |p: &str| a.read_input_file(p, 1024);
        assert_eq!(read("etc/passwd").expect("read"), Some(b"x".to_vec()));
        assert_eq!(read("/etc/group").expect("read"), Some(b"g".to_vec()));
        assert_eq!(read("etc/group-abs").expect("read"), Some(b"g".to_vec()));
        // Through sbin -> usr/sbin.
        assert_eq!(
            read("sbin/bootlace-init").expect("read"),
            Some(b"old".to_vec())
        );
        assert_eq!(read("etc/missing").expect("read"), None);
        assert_eq!(read("etc/passwd/x").expect("read"), None);
        // An absolute link is taken inside the input: the host's file is never read.
        let abs = read("etc/host-abs").expect("read");
        assert_eq!(abs, None, "followed out of the input");
        let e = read("etc/climb").expect_err("climbs out").to_string();
        assert!(e.contains("resolves outside the root"), "{e}");
        let e = read("escape/etc/passwd").expect_err("escapes").to_string();
        assert!(e.contains("resolves outside the root"), "{e}");
        assert!(read("loop").is_err());
        let e = anyhow_chain(&read("etc/fifo").expect_err("fifo"));
        assert!(e.contains("not a regular file"), "{e}");
        assert!(read("etc").is_err(), "a directory");
        let e = anyhow_chain(&a.read_input_file("etc/passwd", 0).expect_err("limit"));
        assert!(e.contains("over the 0-byte limit"), "{e}");
        // Modes: regular files only.
        std::fs::set_permissions(
            r.join("usr/sbin/bootlace-init"),
            std::fs::Permissions::from_mode(0o755),
        )
        .expect("chmod");
        assert_eq!(
            a.input_file_mode("/sbin/bootlace-init").expect("mode"),
            Some(0o755)
        );
        assert_eq!(a.input_file_mode("/etc/fifo").expect("mode"), None);
        assert_eq!(a.input_file_mode("/etc").expect("mode"), None);
        assert_eq!(a.input_file_mode("/nope").expect("mode"), None);
    }

    fn anyhow_chain(e: &AddError) -> String {
        let mut s = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(c) = src {
            s.push_str(&format!(": {c}"));
            src = c.source();
        }
        s
    }

    #[test]
    fn without_an_input() {
        let mut a = Additions::new(None).expect("none");
        assert_eq!(a.put("/sbin/x", file(b"x")).expect("put"), "sbin/x");
        assert_eq!(a.get("sbin").map(|n| n.meta.mode), Some(0o755));
        assert_eq!(a.root_meta(), &Meta::root(0o755));
    }
}
