//! A read-only overlay mount of a bake's additions over its directory input, so that the image
//! tool reads both as one tree without the input being copied:
//!
//! ```text
//! mount -t overlay overlay -o lowerdir=ADDITIONS:INPUT,redirect_dir=nofollow,metacopy=off MERGED
//! ```
//!
//! (read-only, nosuid, nodev, noexec; no upper directory). It needs root; the caller falls back
//! to mirroring the input when it cannot be made. An [`Overlay`] unmounts on drop — on every
//! return and on a panic that unwinds; [`unmount_all`] detaches whatever is still mounted, for
//! a panic hook when panics abort.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use std::os::fd::OwnedFd;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

use crate::path::join;

/// Gives this process a mount namespace of its own, its mounts private to it, when it runs as
/// root: an overlay it mounts is then seen only by it and the image tools it runs, and goes away
/// with the process however it ends (Ctrl-C, a kill), never left on the host. Must be called
/// before any thread is started (the kernel refuses it in a multithreaded process). Returns
/// whether it worked; when not, overlays are mounted in the host's namespace and unmounted as
/// usual.
pub fn private_mount_namespace() -> bool {
    if !rustix::process::geteuid().is_root() {
        return false;
    }
    if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS) {
        log::info!("no private mount namespace ({e}): overlays are mounted on the host");
        return false;
    }
    let private =
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC;
    if let Err(e) = rustix::mount::mount_change("/", private) {
        // Still shared with the host: the mounts would propagate back. Keep the namespace
        // (nothing is mounted yet) but do not count on it.
        log::info!("cannot make / private in the new mount namespace ({e})");
        return false;
    }
    true
}

/// Overlays mounted by this process and not unmounted yet.
static MOUNTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Why an overlay could not be mounted (the bake then mirrors the input instead).
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A layer's path cannot be written in the mount options.
    #[error("{}: a path with ',', ':', '\\' or a control character cannot be an overlay layer", .0.display())]
    Path(PathBuf),
    /// mount(2) failed.
    #[error("mount a read-only overlay at {}", target.display())]
    Mount {
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A mounted read-only overlay; unmounted when dropped.
#[derive(Debug)]
pub struct Overlay {
    target: PathBuf,
}

/// The mount options for `layers`, topmost first.
fn options(layers: &[&Path]) -> Result<String, OverlayError> {
    let mut dirs = Vec::with_capacity(layers.len());
    for l in layers {
        let s = l
            .to_str()
            .filter(|s| !s.contains([',', ':', '\\']) && !s.chars().any(char::is_control))
            .ok_or_else(|| OverlayError::Path(l.to_path_buf()))?;
        dirs.push(s);
    }
    Ok(format!(
        "lowerdir={},redirect_dir=nofollow,metacopy=off",
        dirs.join(":")
    ))
}

impl Overlay {
    /// Mounts `layers` (absolute directories, topmost first) read-only at `target`.
    pub fn mount(layers: &[&Path], target: &Path) -> Result<Overlay, OverlayError> {
        let data = std::ffi::CString::new(options(layers)?)
            .map_err(|_| OverlayError::Path(target.to_owned()))?;
        let flags =
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        // Registered first, so that a panic hook running between the two still finds it.
        let mut mounted = MOUNTED.lock().unwrap_or_else(PoisonError::into_inner);
        rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str()).map_err(
            |e| OverlayError::Mount {
                target: target.to_owned(),
                source: e.into(),
            },
        )?;
        mounted.push(target.to_owned());
        Ok(Overlay {
            target: target.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        unmount(&self.target);
        MOUNTED
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|p| p != &self.target);
    }
}

/// Unmounts `target`: a busy mount is retried for a moment, then detached (it goes away as soon
/// as nothing uses it).
fn unmount(target: &Path) {
    for _ in 0..10 {
        match rustix::mount::unmount(target, UnmountFlags::empty()) {
            Ok(()) => return,
            Err(rustix::io::Errno::BUSY) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                log::warn!("unmount {}: {e}", target.display());
                return;
            }
        }
    }
    if let Err(e) = rustix::mount::unmount(target, UnmountFlags::DETACH) {
        log::warn!("detach {}: {e}", target.display());
    }
}

/// The first entry under `dir` that an overlay would take for a whiteout and hide: a character
/// device 0:0 (a read-only overlay of such an input would lose it). Only character devices are
/// looked at: the walk reads directories and their entry types, and stats nothing else.
pub fn find_whiteout(dir: &Path) -> io::Result<Option<String>> {
    let fd = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    whiteout_in(fd, "")
}

fn whiteout_in(dir: OwnedFd, rel: &str) -> io::Result<Option<String>> {
    let mut subdirs = Vec::new();
    for entry in rustix::fs::Dir::read_from(&dir)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let ft = match entry.file_type() {
            FileType::Unknown => {
                let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                FileType::from_raw_mode(st.st_mode)
            }
            ft => ft,
        };
        match ft {
            FileType::CharacterDevice => {
                let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)?;
                if st.st_rdev == 0 {
                    return Ok(Some(join(rel, &name.to_string_lossy())));
                }
            }
            FileType::Directory => subdirs.push(name.to_owned()),
            _ => {}
        }
    }
    for name in subdirs {
        let flags = OFlags::DIRECTORY | OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let sub = rustix::fs::openat(&dir, name.as_c_str(), flags, Mode::empty())?;
        if let Some(found) = whiteout_in(sub, &join(rel, &name.to_string_lossy()))? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Detaches every overlay this process still has mounted (for a panic hook: with
/// `panic = "abort"` no destructor runs).
pub fn unmount_all() {
    let mounted = match MOUNTED.try_lock() {
        Ok(m) => m.clone(),
        Err(std::sync::TryLockError::Poisoned(m)) => m.into_inner().clone(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for target in mounted {
        let _ = rustix::mount::unmount(&target, UnmountFlags::DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options() {
        let o = options(&[Path::new("/w/additions"), Path::new("/usr/share")]).expect("ok");
        assert_eq!(
            o,
            "lowerdir=/w/additions:/usr/share,redirect_dir=nofollow,metacopy=off"
        );
        for bad in ["/a,b", "/a:b", "/a\\b", "/a\nb"] {
            assert!(
                matches!(options(&[Path::new(bad)]), Err(OverlayError::Path(_))),
                "{bad:?}"
            );
        }
    }
}
