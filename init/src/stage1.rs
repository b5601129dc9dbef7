//! Stage 1 of a disk-root boot: from a small initramfs, find the real root (by filesystem
//! label, GPT partition unique GUID or name, or device node), mount it on `/sysroot`, move
//! `/dev`, `/proc`, `/sys` and `/run` into it, empty the initramfs (its memory is otherwise
//! lost for good), switch root and execute the init inside the image — which is PID 1 again
//! and boots as usual.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::fs::{AtFlags, Mode, OFlags};

use crate::devices::{self, Block, Want};
use crate::modload::ModuleLoader;
use crate::mounts;
use crate::sys::{self, root::Root, Flags};
use bootlace_contract::config::{
    InitConfig, RootSpec, Source, Stage1, CONFIG_PATH, MAX_CONFIG_BYTES,
};
use bootlace_contract::drivers;

/// Where the real root is mounted before the switch.
pub const SYSROOT: &str = "/sysroot";

/// The early mounts carried over into the real root.
const MOVED: &[&str] = &["/dev", "/proc", "/sys", "/run"];

/// A failed stage 1. Each variant names the root, device or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum Stage1Error {
    /// Neither the config nor the kernel command line names the root.
    #[error(
        "no root given: set [stage1] root, or bootlace.root= or root= on the kernel command line"
    )]
    NoRoot,
    /// No device matched within the wait.
    #[error("root {spec} not found after waiting {waited_ms} ms (saw {seen})")]
    NotFound {
        /// The root asked for.
        spec: String,
        /// How long it waited.
        waited_ms: u64,
        /// What each block device held.
        seen: String,
    },
    /// Mounting the root failed.
    #[error("mount root {} ({fstype}) on {SYSROOT}", dev.display())]
    Mount {
        /// The device.
        dev: PathBuf,
        /// Its filesystem type.
        fstype: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The root has no init to execute.
    #[error("root {}: {init} is missing (not executable or not a file)", dev.display())]
    NoInit {
        /// The device.
        dev: PathBuf,
        /// The init looked for.
        init: String,
    },
    /// An early mount could not be moved into the root.
    #[error("move {from} into the root")]
    Move {
        /// The mount.
        from: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The switch itself failed.
    #[error("switch root to {SYSROOT}: {what}")]
    Switch {
        /// The operation that failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The init inside the root could not be executed.
    #[error("execute {init} inside the root")]
    Exec {
        /// The init.
        init: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Finds and mounts the real root, switches to it and executes its init. Returns only on
/// failure; the caller reports it and applies the failure policy.
pub fn switch_root(cfg: &Stage1, loader: &mut ModuleLoader) -> Stage1Error {
    match prepare(cfg, loader) {
        Ok(found) => switch(cfg, &found),
        Err(e) => e,
    }
}

fn prepare(cfg: &Stage1, loader: &mut ModuleLoader) -> Result<Block, Stage1Error> {
    let spec = cfg.root.as_ref().ok_or(Stage1Error::NoRoot)?;
    let found = find_root(cfg, spec, loader)?;
    // Read-only first: the image's own config says whether it is a read-write root.
    mount_root(&found)?;
    let image_read_only = image_read_only();
    let read_only = cfg.read_only(found.fstype, image_read_only);
    if !read_only {
        sys::remount_read_write(Path::new(SYSROOT)).map_err(|source| Stage1Error::Mount {
            dev: found.dev.clone(),
            fstype: found.fstype.as_str(),
            source,
        })?;
    }
    log::info!(
        "stage1: root {spec} is {} ({}), mounted {} on {SYSROOT}{}",
        found.dev.display(),
        found.fstype.as_str(),
        if read_only { "read-only" } else { "read-write" },
        match (cfg.kernel_rw, image_read_only) {
            (Some(true), _) => " (rw on the kernel command line)",
            (Some(false), _) => " (ro on the kernel command line)",
            (None, Some(false)) if !read_only => " (the image's [root] read_only = false)",
            _ => "",
        }
    );
    check_init(cfg, &found)?;
    Ok(found)
}

/// Loads the block drivers and waits for the root device.
fn find_root(
    cfg: &Stage1,
    spec: &RootSpec,
    loader: &mut ModuleLoader,
) -> Result<Block, Stage1Error> {
    let loaded = loader.load_best_effort(drivers::source(Source::Disk));
    if !loaded.is_empty() {
        log::debug!("stage1: loaded {}", loaded.join(" "));
    }
    let want = match spec {
        RootSpec::Label(l) => Want::Label(l),
        RootSpec::PartUuid(g) => Want::PartUuid(g),
        RootSpec::PartLabel(n) => Want::PartLabel(n),
        RootSpec::Device(d) => Want::Node(d),
    };
    let found = devices::wait_for(Duration::from_millis(cfg.wait_ms), || {
        devices::find_block(want)
    })
    .map_err(|seen| Stage1Error::NotFound {
        spec: spec.to_string(),
        waited_ms: cfg.wait_ms,
        seen: seen.to_string(),
    })?;
    loader.load_best_effort(drivers::filesystem(found.fstype));
    Ok(found)
}

/// Mounts the root read-only on [`SYSROOT`].
fn mount_root(found: &Block) -> Result<(), Stage1Error> {
    if let Err(e) = std::fs::create_dir(SYSROOT) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(Stage1Error::Switch {
                what: "create the mount point",
                source: e,
            });
        }
    }
    let flags = Flags {
        rdonly: true,
        ..Flags::default()
    };
    sys::mount(
        &found.dev.to_string_lossy(),
        Path::new(SYSROOT),
        found.fstype.as_str(),
        flags,
        c"",
    )
    .map_err(|source| Stage1Error::Mount {
        dev: found.dev.clone(),
        fstype: found.fstype.as_str(),
        source,
    })
}

/// The root's own `[root] read_only` (its `/etc/bootlace/init.toml`), read inside the root;
/// `None` when it has none or it cannot be read (its init reports a bad config itself).
fn image_read_only() -> Option<bool> {
    let root = Root::open(Path::new(SYSROOT)).ok()?;
    let file = root.open_file(CONFIG_PATH.trim_start_matches('/')).ok()?;
    let text = bootlace_contract::types::read_capped(file, MAX_CONFIG_BYTES).ok()?;
    InitConfig::from_toml(&text, Path::new(CONFIG_PATH))
        .ok()?
        .root
        .read_only
}

/// The init to execute must be an executable file inside the root (an absolute
/// `/sbin -> usr/sbin` link included); otherwise the root is unmounted again.
fn check_init(cfg: &Stage1, found: &Block) -> Result<(), Stage1Error> {
    let init = cfg.init.program().to_string_lossy().into_owned();
    let has_init = Root::open(Path::new(SYSROOT))
        .ok()
        .and_then(|r| r.open_file(init.trim_start_matches('/')).ok())
        .and_then(|f| f.metadata().ok())
        .is_some_and(|m| m.is_file() && m.permissions().mode_bits() & 0o111 != 0);
    if !has_init {
        let _ = sys::unmount(Path::new(SYSROOT));
        return Err(Stage1Error::NoInit {
            dev: found.dev.clone(),
            init,
        });
    }
    Ok(())
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for std::fs::Permissions {
    fn mode_bits(&self) -> u32 {
        std::os::unix::fs::PermissionsExt::mode(self)
    }
}

fn switch(cfg: &Stage1, found: &Block) -> Stage1Error {
    match move_and_switch(found) {
        Ok(()) => {}
        Err(e) => return e,
    }
    let init = cfg.init.program().to_owned();
    let kernel_args = crate::supervise::kernel_args();
    if let Err(e) = sys::cloexec_all_but_stdio() {
        log::warn!("cannot mark fds close-on-exec: {e}");
    }
    log::info!("stage1: executing {} in the real root", init.display());
    let mut cmd = std::process::Command::new(&init);
    cmd.args(cfg.init.args()).args(&kernel_args);
    let source = cmd.exec();
    Stage1Error::Exec {
        init: init.to_string_lossy().into_owned(),
        source,
    }
}

fn move_and_switch(found: &Block) -> Result<(), Stage1Error> {
    let sysroot = Path::new(SYSROOT);
    for &from in MOVED {
        if !mounts::is_mount_point(Path::new(from)).unwrap_or(false) {
            continue;
        }
        let to = sysroot.join(from.trim_start_matches('/'));
        if !to.is_dir() {
            if from == "/run" {
                log::warn!("stage1: the root has no /run; leaving the initramfs's behind");
                continue;
            }
            return Err(Stage1Error::Move {
                from,
                source: io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "the root on {} has no {from} directory",
                        found.dev.display()
                    ),
                ),
            });
        }
        sys::move_mount(Path::new(from), &to)
            .map_err(|source| Stage1Error::Move { from, source })?;
    }
    let freed = empty_initramfs();
    log::debug!("stage1: removed {freed} initramfs entries");
    let sw = |what| move |source| Stage1Error::Switch { what, source };
    std::env::set_current_dir(sysroot).map_err(sw("chdir"))?;
    sys::move_mount(Path::new("."), Path::new("/")).map_err(sw("move the root onto /"))?;
    sys::chroot(Path::new(".")).map_err(sw("chroot"))?;
    std::env::set_current_dir("/").map_err(sw("chdir /"))?;
    Ok(())
}

/// Deletes the initramfs's files (never crossing into another filesystem, so the new root
/// and anything mounted are untouched) when `/` is the kernel's rootfs (ramfs or tmpfs).
/// Best effort: returns how many entries were removed.
fn empty_initramfs() -> usize {
    let magic = sys::fs_magic(Path::new("/")).unwrap_or(0);
    if magic != sys::magic::RAMFS && magic != sys::magic::TMPFS {
        log::warn!("stage1: / is not an initramfs (fs magic {magic:#x}); not emptying it");
        return 0;
    }
    let Ok(root) = rustix::fs::open("/", OFlags::DIRECTORY | OFlags::RDONLY, Mode::empty()) else {
        return 0;
    };
    let Ok(st) = rustix::fs::fstat(&root) else {
        return 0;
    };
    empty_dir(root, st.st_dev, Some(OsStr::new("sysroot")), 0)
}

fn empty_dir(dir: OwnedFd, dev: u64, skip: Option<&OsStr>, depth: usize) -> usize {
    if depth > 64 {
        return 0;
    }
    let Ok(entries) = rustix::fs::Dir::read_from(&dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || Some(OsStr::from_bytes(name)) == skip {
            continue;
        }
        let name = entry.file_name();
        let Ok(st) = rustix::fs::statat(dir.as_fd(), name, AtFlags::SYMLINK_NOFOLLOW) else {
            continue;
        };
        if st.st_dev != dev {
            continue;
        }
        let is_dir =
            rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory;
        if is_dir {
            if let Ok(sub) = rustix::fs::openat(
                dir.as_fd(),
                name,
                OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY,
                Mode::empty(),
            ) {
                removed += empty_dir(sub, dev, None, depth + 1);
            }
        }
        let flags = if is_dir {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        if rustix::fs::unlinkat(dir.as_fd(), name, flags).is_ok() {
            removed += 1;
        }
    }
    removed
}
