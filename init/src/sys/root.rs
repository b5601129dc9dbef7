//! File operations confined to a root directory.
//!
//! Every path is resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` against an
//! fd of the root, so `..` and symlinks — absolute or relative, planted by the image or by an
//! earlier step — resolve inside the root and never outside it. The last component is never
//! followed: files and links are replaced by `renameat` (which replaces a symlink rather than
//! writing through it), directories are opened with `O_NOFOLLOW` before `fchmod`/`fchown`.
//! On top of that, the directory an operation lands in must not be under a forbidden root
//! (`/proc`, `/sys`, `/dev`, `/.bootstrap`), and the entry it creates or changes must not be
//! one, checked on the resolved fd itself — before anything is created.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use bootlace_contract::types::FORBIDDEN_ROOTS;

/// A failed confined operation. The message names the path as the manifest wrote it.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    /// The system call failed.
    #[error("{path}: {op}")]
    Io {
        /// The path (absolute, as in the manifest).
        path: String,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path resolves somewhere a manifest may not change.
    #[error("{path}: resolves to {resolved}, under {forbidden}, which a manifest may not change")]
    Forbidden {
        /// The path as written.
        path: String,
        /// Where it resolved, relative to the root.
        resolved: String,
        /// The forbidden root.
        forbidden: &'static str,
    },
    /// Something of the wrong kind is in the way.
    #[error("{path}: {what}")]
    InTheWay {
        /// The path.
        path: String,
        /// What is there.
        what: String,
    },
}

impl RootError {
    /// Whether the filesystem ran out of space (ENOSPC): a tmpfs reached its size.
    pub fn is_no_space(&self) -> bool {
        matches!(self, RootError::Io { source, .. }
            if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()))
    }
}

/// A directory that confined operations cannot leave.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// The root's path as the kernel reports it (`/` for the real root).
    prefix: PathBuf,
}

static TMP_COUNTER: AtomicU32 = AtomicU32::new(0);

fn io_err<'a>(path: &'a str, op: &'static str) -> impl FnOnce(Errno) -> RootError + 'a {
    move |e| RootError::Io {
        path: path.to_owned(),
        op,
        source: e.into(),
    }
}

const RESOLVE: ResolveFlags = ResolveFlags::IN_ROOT.union(ResolveFlags::NO_MAGICLINKS);

/// `/proc/self/fd/N` for an fd: a path the mount calls follow to exactly that directory.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn split(path: &str) -> (&str, &str) {
    let rel = path.trim_start_matches('/');
    match rel.rsplit_once('/') {
        Some((parent, name)) => (parent, name),
        None => ("", rel),
    }
}

/// [`split`] for an operation on the last component, which must be a name: `.` or `..` there
/// would be used relative to the parent's fd without `RESOLVE_IN_ROOT`, and `..` of the root's
/// fd is outside the root.
fn split_name(path: &str) -> Result<(&str, &str), RootError> {
    match split(path) {
        (_, "" | "." | "..") => Err(RootError::InTheWay {
            path: path.to_owned(),
            what: "the last component is not a name (empty, . or ..)".to_owned(),
        }),
        pair => Ok(pair),
    }
}

impl Root {
    /// Opens a root directory.
    pub fn open(path: &Path) -> io::Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let prefix = std::fs::read_link(fd_path(fd.as_fd()))?;
        Ok(Root { fd, prefix })
    }

    /// The root's own fd.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Where an fd of this root is, relative to the root (`etc/app`); the root itself is "".
    fn relative_of(&self, fd: BorrowedFd<'_>) -> io::Result<String> {
        let abs = std::fs::read_link(fd_path(fd))?;
        let rel = abs.strip_prefix(&self.prefix).unwrap_or(&abs);
        Ok(rel.to_string_lossy().into_owned())
    }

    fn check_allowed(&self, path: &str, fd: BorrowedFd<'_>) -> Result<(), RootError> {
        self.check_allowed_at(path, fd, "")
    }

    /// Checks that the entry `name` of the directory `dir` (the directory itself for "") is
    /// neither a forbidden root nor under one.
    fn check_allowed_at(
        &self,
        path: &str,
        dir: BorrowedFd<'_>,
        name: &str,
    ) -> Result<(), RootError> {
        let rel = self.relative_of(dir).map_err(|source| RootError::Io {
            path: path.to_owned(),
            op: "locate",
            source,
        })?;
        let abs = match (rel.as_str(), name) {
            (rel, "") => format!("/{rel}"),
            ("", name) => format!("/{name}"),
            (rel, name) => format!("/{rel}/{name}"),
        };
        for root in FORBIDDEN_ROOTS {
            if abs == *root || abs.strip_prefix(root).is_some_and(|r| r.starts_with('/')) {
                return Err(RootError::Forbidden {
                    path: path.to_owned(),
                    resolved: abs,
                    forbidden: root,
                });
            }
        }
        Ok(())
    }

    /// Opens a directory (resolved in the root), creating it and missing parents (0755) when
    /// `create` is set. Checks it is not under a forbidden root.
    pub fn open_dir(&self, path: &str, create: bool) -> Result<OwnedFd, RootError> {
        let fd = self.open_dir_unchecked(path, path, create)?;
        self.check_allowed(path, fd.as_fd())?;
        Ok(fd)
    }

    fn open_dir_unchecked(
        &self,
        shown: &str,
        path: &str,
        create: bool,
    ) -> Result<OwnedFd, RootError> {
        let rel = path.trim_start_matches('/');
        let rel = if rel.is_empty() { "." } else { rel };
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC;
        match rustix::fs::openat2(self.fd(), rel, flags, Mode::empty(), RESOLVE) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOENT) if create && rel != "." => {
                let (parent, name) = split(rel);
                let pfd = self.open_dir_unchecked(shown, parent, true)?;
                // Checked before creating: a symlink on the way may lead under /dev.
                self.check_allowed_at(shown, pfd.as_fd(), name)?;
                match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o755)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(io_err(shown, "create directory")(e)),
                }
                rustix::fs::openat2(self.fd(), rel, flags, Mode::empty(), RESOLVE).map_err(|e| {
                    // Still missing after mkdir: `name` is a link to a directory that is not
                    // there (a dangling link is never followed to create its target).
                    match (e, rustix::fs::readlinkat(&pfd, name, Vec::new())) {
                        (Errno::NOENT, Ok(target)) => RootError::InTheWay {
                            path: shown.to_owned(),
                            what: format!(
                                "/{rel} is a symlink to {:?}, which is not an existing directory",
                                target.to_string_lossy()
                            ),
                        },
                        (e, _) => io_err(shown, "open directory")(e),
                    }
                })
            }
            Err(Errno::NOTDIR) => Err(RootError::InTheWay {
                path: shown.to_owned(),
                what: format!("{rel} (or a parent) is not a directory"),
            }),
            Err(e) => Err(io_err(shown, "open directory")(e)),
        }
    }

    /// Checks, before anything is changed, that `path` would land in an allowed place as the
    /// tree is now: its deepest existing ancestor (or its parent) must resolve outside the
    /// forbidden roots. The operations check again when they run.
    pub fn preflight(&self, path: &str) -> Result<(), RootError> {
        let (parent, name) = split_name(path)?;
        // The deepest existing ancestor and its child on the way to `path`: the operation
        // changes or creates that child, which must not be a forbidden root either.
        let (mut dir, mut child) = (parent.to_owned(), name.to_owned());
        loop {
            let rel = if dir.is_empty() { "." } else { dir.as_str() };
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
            match rustix::fs::openat2(self.fd(), rel, flags, Mode::empty(), RESOLVE) {
                Ok(fd) => return self.check_allowed_at(path, fd.as_fd(), &child),
                Err(Errno::NOENT) if !dir.is_empty() => {
                    let (up, last) = split(&dir);
                    child = last.to_owned();
                    dir = up.to_owned();
                }
                Err(Errno::NOTDIR) => {
                    return Err(RootError::InTheWay {
                        path: path.to_owned(),
                        what: format!("/{rel} is not a directory"),
                    })
                }
                Err(e) => return Err(io_err(path, "resolve")(e)),
            }
        }
    }

    /// Opens a regular file for reading, resolved in the root (for bundle sources). Opening
    /// never blocks (`O_NONBLOCK`: a FIFO is refused, not waited on) nor takes a terminal.
    pub fn open_file(&self, path: &str) -> Result<std::fs::File, RootError> {
        let rel = path.trim_start_matches('/');
        let fd = rustix::fs::openat2(
            self.fd(),
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY,
            Mode::empty(),
            RESOLVE,
        )
        .map_err(|e| match e {
            // O_NOFOLLOW on a symlink: say so, not "too many levels of symbolic links".
            Errno::LOOP => RootError::InTheWay {
                path: path.to_owned(),
                what: "a symlink, which is not followed: it must be a regular file".to_owned(),
            },
            e => io_err(path, "open")(e),
        })?;
        let st = rustix::fs::fstat(&fd).map_err(io_err(path, "stat"))?;
        if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(RootError::InTheWay {
                path: path.to_owned(),
                what: "not a regular file".to_owned(),
            });
        }
        Ok(std::fs::File::from(fd))
    }

    /// Whether something exists at `path` (the last component not followed).
    pub fn exists(&self, path: &str) -> bool {
        let Ok((parent, name)) = split_name(path) else {
            return false;
        };
        match self.open_dir_unchecked(path, parent, false) {
            Ok(pfd) => rustix::fs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW).is_ok(),
            Err(_) => false,
        }
    }

    /// For an atomic replace of `path`: its parent directory (created if missing, resolved in
    /// the root and checked), its last component, and a temporary name beside it. A directory
    /// at `path` is refused.
    fn prepare_replace<'p>(&self, path: &'p str) -> Result<(OwnedFd, &'p str, String), RootError> {
        let (parent, name) = split_name(path)?;
        let pfd = self
            .open_dir(&format!("/{parent}"), true)
            .map_err(|e| rename_path(e, path))?;
        self.check_allowed_at(path, pfd.as_fd(), name)?;
        if let Ok(st) = rustix::fs::statat(&pfd, name, AtFlags::SYMLINK_NOFOLLOW) {
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                return Err(RootError::InTheWay {
                    path: path.to_owned(),
                    what: "a directory is there".to_owned(),
                });
            }
        }
        let tmp = format!(
            ".{name}.bootlace-{}-{}",
            std::process::id(),
            TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Ok((pfd, name, tmp))
    }

    /// Writes a file atomically: a temporary file in the same directory, written, owned,
    /// moded and fsynced, then renamed over the target (replacing a file or symlink there,
    /// never writing through it), then the directory fsynced.
    pub fn write_file(
        &self,
        path: &str,
        data: &mut dyn Read,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<u64, RootError> {
        let (pfd, name, tmp) = self.prepare_replace(path)?;
        let result = (|| {
            let fd = rustix::fs::openat(
                &pfd,
                tmp.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(io_err(path, "create temporary file"))?;
            let mut file = std::fs::File::from(fd);
            let n = io::copy(data, &mut file).map_err(|source| RootError::Io {
                path: path.to_owned(),
                op: "write",
                source,
            })?;
            file.flush().map_err(|source| RootError::Io {
                path: path.to_owned(),
                op: "write",
                source,
            })?;
            set_owner_mode(&file, path, uid, gid, mode)?;
            rustix::fs::fsync(&file).map_err(io_err(path, "fsync"))?;
            rustix::fs::renameat(&pfd, tmp.as_str(), &pfd, name)
                .map_err(io_err(path, "rename into place"))?;
            Ok(n)
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&pfd, tmp.as_str(), AtFlags::empty());
        } else {
            let _ = rustix::fs::fsync(&pfd);
        }
        result
    }

    /// Creates a directory (and missing parents), or takes the existing one; then sets its
    /// owner and mode. A symlink at `path` is refused, not followed.
    pub fn make_dir(&self, path: &str, mode: u32, uid: u32, gid: u32) -> Result<(), RootError> {
        let (parent, name) = split_name(path)?;
        let pfd = self
            .open_dir(&format!("/{parent}"), true)
            .map_err(|e| rename_path(e, path))?;
        // The directory itself too: through a symlink, `path` may be a forbidden root, whose
        // mode and owner a manifest may not change.
        self.check_allowed_at(path, pfd.as_fd(), name)?;
        match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(io_err(path, "create directory")(e)),
        }
        let fd = rustix::fs::openat(
            &pfd,
            name,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOTDIR | Errno::LOOP => RootError::InTheWay {
                path: path.to_owned(),
                what: "something that is not a directory (a file or a symlink) is there".to_owned(),
            },
            e => io_err(path, "open directory")(e),
        })?;
        set_owner_mode(&fd, path, uid, gid, mode)
    }

    /// Creates or replaces a symbolic link atomically. A directory at `path` is refused.
    pub fn make_symlink(&self, path: &str, target: &str) -> Result<(), RootError> {
        let (pfd, name, tmp) = self.prepare_replace(path)?;
        rustix::fs::symlinkat(target, &pfd, tmp.as_str())
            .map_err(io_err(path, "create symlink"))?;
        if let Err(e) = rustix::fs::renameat(&pfd, tmp.as_str(), &pfd, name) {
            let _ = rustix::fs::unlinkat(&pfd, tmp.as_str(), AtFlags::empty());
            return Err(io_err(path, "rename into place")(e));
        }
        Ok(())
    }

    /// Copies the tree under directory `from` into directory `to` (both fds of this root),
    /// keeping modes, owners, symlinks and device nodes. Used to seed a tmpfs with what the
    /// image had at its mount point.
    pub fn copy_tree(
        &self,
        shown: &str,
        from: BorrowedFd<'_>,
        to: BorrowedFd<'_>,
    ) -> Result<u64, RootError> {
        let mut count = 0;
        let dir = rustix::fs::Dir::read_from(from).map_err(io_err(shown, "read directory"))?;
        for entry in dir {
            let entry = entry.map_err(io_err(shown, "read directory"))?;
            let name = entry.file_name().to_owned();
            let name_bytes = name.to_bytes();
            if name_bytes == b"." || name_bytes == b".." {
                continue;
            }
            let child = format!("{shown}/{}", String::from_utf8_lossy(name_bytes));
            let st = rustix::fs::statat(from, name.as_c_str(), AtFlags::SYMLINK_NOFOLLOW)
                .map_err(io_err(&child, "stat"))?;
            let mode = st.st_mode & 0o7777;
            let (uid, gid) = (st.st_uid, st.st_gid);
            match rustix::fs::FileType::from_raw_mode(st.st_mode) {
                rustix::fs::FileType::Directory => {
                    match rustix::fs::mkdirat(to, name.as_c_str(), Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(io_err(&child, "create directory")(e)),
                    }
                    let flags =
                        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                    let src = rustix::fs::openat(from, name.as_c_str(), flags, Mode::empty())
                        .map_err(io_err(&child, "open directory"))?;
                    let dst = rustix::fs::openat(to, name.as_c_str(), flags, Mode::empty())
                        .map_err(io_err(&child, "open directory"))?;
                    count += self.copy_tree(&child, src.as_fd(), dst.as_fd())?;
                    set_owner_mode(&dst, &child, uid, gid, mode)?;
                }
                rustix::fs::FileType::RegularFile => {
                    let src = rustix::fs::openat(
                        from,
                        name.as_c_str(),
                        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io_err(&child, "open"))?;
                    let dst = rustix::fs::openat(
                        to,
                        name.as_c_str(),
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::TRUNC
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )
                    .map_err(io_err(&child, "create"))?;
                    let (mut src, mut dst) = (std::fs::File::from(src), std::fs::File::from(dst));
                    io::copy(&mut src, &mut dst).map_err(|source| RootError::Io {
                        path: child.clone(),
                        op: "copy",
                        source,
                    })?;
                    set_owner_mode(&dst, &child, uid, gid, mode)?;
                }
                rustix::fs::FileType::Symlink => {
                    let target = rustix::fs::readlinkat(from, name.as_c_str(), Vec::new())
                        .map_err(io_err(&child, "read link"))?;
                    rustix::fs::symlinkat(target.as_c_str(), to, name.as_c_str())
                        .map_err(io_err(&child, "create symlink"))?;
                    let _ = rustix::fs::chownat(
                        to,
                        name.as_c_str(),
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    );
                }
                rustix::fs::FileType::CharacterDevice
                | rustix::fs::FileType::BlockDevice
                | rustix::fs::FileType::Fifo => {
                    let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
                    rustix::fs::mknodat(
                        to,
                        name.as_c_str(),
                        ft,
                        Mode::from_raw_mode(mode),
                        st.st_rdev,
                    )
                    .map_err(io_err(&child, "create node"))?;
                }
                _ => continue,
            }
            count += 1;
        }
        Ok(count)
    }
}

fn rename_path(e: RootError, path: &str) -> RootError {
    match e {
        RootError::Io { op, source, .. } => RootError::Io {
            path: path.to_owned(),
            op,
            source,
        },
        RootError::Forbidden {
            resolved,
            forbidden,
            ..
        } => RootError::Forbidden {
            path: path.to_owned(),
            resolved,
            forbidden,
        },
        RootError::InTheWay { what, .. } => RootError::InTheWay {
            path: path.to_owned(),
            what,
        },
    }
}

fn set_owner_mode<Fd: AsFd>(
    fd: Fd,
    path: &str,
    uid: u32,
    gid: u32,
    mode: u32,
) -> Result<(), RootError> {
    // chown first: it clears setuid/setgid bits that fchmod then sets.
    rustix::fs::fchown(
        &fd,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
    )
    .map_err(io_err(path, "chown"))?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(io_err(path, "chmod"))
}
