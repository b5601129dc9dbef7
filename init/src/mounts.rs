//! The early mounts every boot needs before anything else: proc, sysfs, devtmpfs (with devpts
//! and a tmpfs on /dev/shm) and a tmpfs on /run. A target that is already a mount point — the
//! kernel may have mounted devtmpfs, or a stage-1 init moved these — is left as it is.

use std::ffi::CStr;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::sys::{self, Flags};

/// The options of every virtio 9p mount (the bootstrap share and a manifest's `9p` mounts).
pub const NINEP_OPTIONS: &CStr = c"trans=virtio,version=9p2000.L,msize=262144";

/// A mount that failed.
#[derive(Debug, thiserror::Error)]
#[error("mount {fstype} on {}", target.display())]
pub struct MountError {
    /// Filesystem type.
    pub fstype: &'static str,
    /// Mount point.
    pub target: PathBuf,
    /// The cause.
    #[source]
    pub source: io::Error,
}

struct Early {
    fstype: &'static str,
    target: &'static str,
    flags: Flags,
    data: &'static CStr,
}

const NOSUID_NODEV_NOEXEC: Flags = Flags {
    nosuid: true,
    nodev: true,
    noexec: true,
    rdonly: false,
};

const EARLY: &[Early] = &[
    Early {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
    },
    Early {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"",
    },
    Early {
        fstype: "devtmpfs",
        target: "/dev",
        flags: Flags {
            nosuid: true,
            nodev: false,
            noexec: true,
            rdonly: false,
        },
        data: c"mode=0755",
    },
    Early {
        fstype: "devpts",
        target: "/dev/pts",
        flags: Flags {
            nosuid: true,
            nodev: false,
            noexec: true,
            rdonly: false,
        },
        data: c"mode=0620,ptmxmode=0666,gid=5",
    },
    Early {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: NOSUID_NODEV_NOEXEC,
        data: c"mode=1777",
    },
    Early {
        fstype: "tmpfs",
        target: "/run",
        flags: Flags {
            nosuid: true,
            nodev: true,
            noexec: false,
            rdonly: false,
        },
        data: c"mode=0755",
    },
];

/// Whether `path` is a mount point: its device differs from its parent's.
pub fn is_mount_point(path: &Path) -> io::Result<bool> {
    let me = std::fs::symlink_metadata(path)?;
    let parent = path.parent().unwrap_or(Path::new("/"));
    let up = std::fs::symlink_metadata(parent)?;
    Ok(me.dev() != up.dev() || me.ino() == up.ino())
}

/// Mounts what is not mounted yet. Returns the targets it mounted.
pub fn early_mounts() -> Result<Vec<&'static str>, MountError> {
    let mut mounted = Vec::new();
    for m in EARLY {
        let target = Path::new(m.target);
        let err = |source| MountError {
            fstype: m.fstype,
            target: target.to_owned(),
            source,
        };
        if !target.exists() {
            std::fs::create_dir(target).map_err(err)?;
        }
        if is_mount_point(target).map_err(err)? {
            continue;
        }
        sys::mount(m.fstype, target, m.fstype, m.flags, m.data).map_err(err)?;
        mounted.push(m.target);
    }
    for (link, to) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if let Err(e) = std::os::unix::fs::symlink(to, link) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                log::warn!("cannot create {link} -> {to}: {e}");
            }
        }
    }
    Ok(mounted)
}
