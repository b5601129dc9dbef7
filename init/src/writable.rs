//! The writable locations of a read-only root (`[root] writable`). Over each, an overlay whose
//! lower layer is the image's own directory and whose upper layer is a fresh tmpfs of
//! `[root] writable_size` (`writable_sizes` per location): the image's contents appear without
//! being copied, whatever their size, and what the guest writes lives in memory. Each upper
//! tmpfs is mounted on `/run/bootlace/writable/<n>` (0700, root's), `upper` and `work` in it.
//! Where overlayfs is missing (no `overlay` module in the image or the kernel) or refuses the
//! directory, the location gets a tmpfs of the same size holding a copy of it instead, and the
//! console says why.
//!
//! Each location is recorded in libmount's `/run/mount/utab` with the option `x-initrd.mount`:
//! mounted before the real init, kept until the end. systemd then leaves it out of its shutdown
//! transaction (where unmounting `/var` fails while journald still writes there) and
//! `systemd-shutdown` unmounts it last.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bootlace_contract::config::{RootFs, TargetPath, TmpfsSize};
use bootlace_contract::drivers::OVERLAY;

use crate::apply::{self, ApplyError};
use crate::modload::ModuleLoader;
use crate::sys::root::{fd_path, Root};
use crate::sys::{self, Flags};

/// Where the upper layers' tmpfs are mounted.
pub const UPPER_ROOT: &str = "/run/bootlace/writable";

/// `nosuid,nodev`, read-write: the flags of every mount made here.
const FLAGS: Flags = Flags {
    nosuid: true,
    nodev: true,
    noexec: false,
    rdonly: false,
};

/// Makes each writable location writable, in order: an overlay, else a tmpfs with a copy.
pub fn writable_locations(cfg: &RootFs, loader: &mut ModuleLoader) -> Result<(), ApplyError> {
    if cfg.writable.is_empty() {
        return Ok(());
    }
    let root = Root::open(Path::new("/")).map_err(|source| ApplyError::Mount {
        path: "/".to_owned(),
        what: "open the root".to_owned(),
        source: Some(source),
    })?;
    let started = std::time::Instant::now();
    let overlay = overlay_available(loader);
    let mut made = Vec::new();
    for (i, path) in cfg.writable.iter().enumerate() {
        let size = cfg.writable_size_of(path);
        let why = match &overlay {
            Ok(()) => match overlay_on(i, path, &size, &root) {
                Ok(upper) => {
                    log::info!(
                        "root: writable: overlay on {path} (upper: a tmpfs of {} on {})",
                        size.as_str(),
                        upper.display()
                    );
                    made.push(("overlay", path.as_str()));
                    continue;
                }
                Err(e) => bootlace_contract::chain(&e),
            },
            Err(why) => why.clone(),
        };
        log::info!("root: writable: copying {path} into a tmpfs: {why}");
        apply::tmpfs_with_copy(path, &size, &root, loader, "root: writable")?;
        made.push(("tmpfs", path.as_str()));
    }
    if let Err(e) = record_in_utab(&made) {
        log::warn!("root: writable: {UTAB}: {e}");
    }
    log::info!(
        "root: writable: {} locations in {} us",
        cfg.writable.len(),
        started.elapsed().as_micros()
    );
    Ok(())
}

/// Whether the kernel has overlayfs, built in or from its module; else why not.
fn overlay_available(loader: &mut ModuleLoader) -> Result<(), String> {
    let listed = std::fs::read_to_string("/proc/filesystems").is_ok_and(|l| {
        l.lines()
            .any(|l| l.split_whitespace().last() == Some(OVERLAY))
    });
    if listed {
        return Ok(());
    }
    loader
        .load([OVERLAY])
        .map(drop)
        .map_err(|e| format!("no overlayfs ({})", bootlace_contract::chain(&e)))
}

/// The overlay over `path` (the `n`th location), its upper layer a fresh tmpfs of `size`;
/// returns where that tmpfs is. On a failure nothing of it is left mounted.
fn overlay_on(
    n: usize,
    path: &TargetPath,
    size: &TmpfsSize,
    root: &Root,
) -> Result<PathBuf, ApplyError> {
    let target = root
        .open_dir(path.as_str(), false)
        .map_err(|source| ApplyError::Root {
            step: "root: writable",
            source,
        })?;
    let err = |what: String| {
        let path = path.as_str().to_owned();
        move |source: io::Error| ApplyError::Mount {
            path,
            what,
            source: Some(source),
        }
    };
    let st = rustix::fs::fstat(&target).map_err(|e| err("stat".to_owned())(e.into()))?;
    let upper_root = PathBuf::from(format!("{UPPER_ROOT}/{n}"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&upper_root)
        .map_err(err(format!("create {}", upper_root.display())))?;
    let opts = std::ffi::CString::new(format!("mode=0700,size={}", size.as_str()))
        .map_err(|e| err("tmpfs options".to_owned())(io::Error::other(e)))?;
    sys::mount("tmpfs", &upper_root, "tmpfs", FLAGS, &opts).map_err(err(format!(
        "tmpfs of {} on {}",
        size.as_str(),
        upper_root.display()
    )))?;
    let lower = if plain(path.as_str()) {
        PathBuf::from(path.as_str())
    } else {
        fd_path(target.as_fd())
    };
    let layered = layers(&upper_root, st.st_mode & 0o7777, st.st_uid, st.st_gid).and_then(|()| {
        let data = format!(
            "lowerdir={},upperdir={}/upper,workdir={}/work",
            lower.display(),
            upper_root.display(),
            upper_root.display()
        );
        let data = std::ffi::CString::new(data).map_err(io::Error::other)?;
        sys::mount("overlay", &fd_path(target.as_fd()), "overlay", FLAGS, &data)
    });
    if let Err(e) = layered {
        if let Err(u) = sys::unmount(&upper_root) {
            log::warn!("root: writable: unmount {}: {u}", upper_root.display());
        }
        // Best effort: an empty directory on /run.
        let _ = std::fs::remove_dir(&upper_root);
        return Err(err("overlay".to_owned())(e));
    }
    Ok(upper_root)
}

/// libmount's table of userspace mount options.
const UTAB: &str = "/run/mount/utab";

/// Appends a line per mount (`source`, mount point) to [`UTAB`], marking it `x-initrd.mount`.
fn record_in_utab(mounts: &[(&str, &str)]) -> io::Result<()> {
    use std::io::Write as _;
    if mounts.is_empty() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create("/run/mount")?;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(UTAB)?;
    f.write_all(utab_lines(mounts).as_bytes())
}

/// The lines of [`record_in_utab`]: values with spaces, tabs, newlines and backslashes in
/// octal escapes, as libmount writes them.
pub fn utab_lines(mounts: &[(&str, &str)]) -> String {
    let mangle = |s: &str| -> String {
        s.chars()
            .map(|c| match c {
                ' ' | '\t' | '\n' | '\\' => format!("\\{:03o}", c as u32),
                c => c.to_string(),
            })
            .collect()
    };
    mounts
        .iter()
        .map(|(src, target)| {
            format!(
                "SRC={} TARGET={} ROOT=/ OPTS=x-initrd.mount\n",
                mangle(src),
                mangle(target)
            )
        })
        .collect()
}

/// `upper` (with the mode and owner of the directory it covers) and `work` in `dir`.
fn layers(dir: &Path, mode: u32, uid: u32, gid: u32) -> io::Result<()> {
    let upper = dir.join("upper");
    std::fs::create_dir(&upper)?;
    std::os::unix::fs::chown(&upper, Some(uid), Some(gid))?;
    std::fs::set_permissions(&upper, std::fs::Permissions::from_mode(mode))?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir.join("work"))
}

/// Whether `path` can go in overlay's options as it is (no separators or escapes in it).
fn plain(path: &str) -> bool {
    path.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+@".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utab_marks_each_location_as_mounted_before_the_real_init() {
        assert_eq!(
            utab_lines(&[("overlay", "/var"), ("tmpfs", "/srv/my data")]),
            "SRC=overlay TARGET=/var ROOT=/ OPTS=x-initrd.mount\n\
             SRC=tmpfs TARGET=/srv/my\\040data ROOT=/ OPTS=x-initrd.mount\n"
        );
    }

    #[test]
    fn only_plain_paths_go_in_the_options() {
        assert!(plain("/etc") && plain("/var/lib/my-app_1.0"));
        for p in ["/a,b", "/a:b", "/a b", "/a\\b", "/a=b"] {
            assert!(!plain(p), "{p}");
        }
    }
}
