//! Applying a validated manifest to the guest, in a fixed order:
//! hostname, sysctl, modules, mounts, directories, files, symlinks, run.
//!
//! Mounts come before files so that files land in the writable locations the manifest
//! creates over a read-only root. Every path goes through [`Root`], so it resolves inside the
//! root and never under `/proc`, `/sys`, `/dev` or `/.bootstrap`.

use std::io;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use bootlace_contract::manifest::{
    Frequency, Manifest, Mount, OnFailure, Run, TmpfsMount, TmpfsSize,
};
use bootlace_contract::types::TargetPath;

use crate::devices::{self, Block, Want};
use crate::modload::{ModLoadError, ModuleLoader};
use crate::supervise::{self, handoff_env, StepEnd};
use crate::sys::root::{fd_path, Root, RootError};
use crate::sys::{self, Ended, Flags};
use bootlace_contract::config::{HandoffMode, InitConfig};
use bootlace_contract::drivers;

/// How long a `disk` mount waits for its device to appear.
const DISK_WAIT: Duration = Duration::from_secs(5);

/// A failed manifest step. The message names the step and the path or entry.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A confined file operation failed.
    #[error("{step}")]
    Root {
        /// The step.
        step: &'static str,
        /// The cause (names the path).
        #[source]
        source: RootError,
    },
    /// A module failed to load.
    #[error("modules")]
    Modules(#[source] ModLoadError),
    /// The host name could not be set.
    #[error("hostname: {name}")]
    Hostname {
        /// The name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A sysctl could not be written.
    #[error("sysctl: {key}")]
    Sysctl {
        /// The key.
        key: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A mount failed.
    #[error("mounts: {path}: {what}")]
    Mount {
        /// The mount point.
        path: String,
        /// What was being mounted.
        what: String,
        /// The cause.
        #[source]
        source: Option<io::Error>,
    },
    /// A command failed (and its `on_failure` is `abort`).
    #[error("run: {name}: {outcome}")]
    Command {
        /// The command's name.
        name: String,
        /// How it ended.
        outcome: String,
    },
    /// A command's supervision failed.
    #[error("run: {name}")]
    Supervise {
        /// The command's name.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// What applying did.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// Mounts made.
    pub mounts: usize,
    /// Directories made.
    pub directories: usize,
    /// Files written.
    pub files: usize,
    /// Links made.
    pub symlinks: usize,
    /// Commands run.
    pub ran: usize,
    /// Commands skipped (once-per-instance, already done).
    pub skipped: usize,
    /// The manifest's `instance_id`.
    pub instance_id: Option<String>,
}

impl Applied {
    /// `2 mounts, 1 file, …`.
    pub fn summary(&self) -> String {
        format!(
            "{} mounts, {} directories, {} files, {} symlinks, {} commands run, {} skipped",
            self.mounts, self.directories, self.files, self.symlinks, self.ran, self.skipped
        )
    }
}

/// Applies the manifest's environment and hand-off overrides to the config.
pub fn merge_handoff(cfg: &mut InitConfig, manifest: &Manifest) {
    for (k, v) in &manifest.env {
        cfg.handoff.env.insert(k.clone(), v.clone());
    }
    // A poweroff hand-off (a capture boot) stays: the guest must end once configured.
    match manifest.handoff.mode {
        Some(mode)
            if cfg.handoff.mode == HandoffMode::Poweroff && mode != HandoffMode::Poweroff =>
        {
            log::info!(
                "manifest: [handoff] mode {} not taken: this boot's hand-off is poweroff",
                mode.as_str()
            );
        }
        Some(mode) => cfg.handoff.mode = mode,
        None => {}
    }
    if let Some(cmd) = &manifest.handoff.command {
        cfg.handoff.command = cmd.clone();
    }
}

/// A tmpfs of `size` over `path`, holding a copy of what the image has there (a writable
/// location where overlayfs cannot be used; see [`crate::writable`]). Logged as `origin`.
pub fn tmpfs_with_copy(
    path: &TargetPath,
    size: &TmpfsSize,
    root: &Root,
    loader: &mut ModuleLoader,
    origin: &str,
) -> Result<(), ApplyError> {
    let mount = Mount::Tmpfs(TmpfsMount {
        path: path.clone(),
        size: Some(size.clone()),
        mode: None,
        copy_defaults: true,
    });
    apply_mount(&mount, root, loader, origin)
}

fn root_err(step: &'static str) -> impl FnOnce(RootError) -> ApplyError {
    move |source| ApplyError::Root { step, source }
}

/// Applies a manifest: `root` is the guest's root, `bundle` the bootstrap filesystem, `cfg`
/// the config with the manifest's hand-off merged (its environment is the commands' base).
/// Every path is checked first ([`preflight`]); then the steps run in the documented order.
pub fn apply(
    m: &Manifest,
    root: &Root,
    bundle: &Root,
    loader: &mut ModuleLoader,
    cfg: &InitConfig,
) -> Result<Applied, ApplyError> {
    preflight(m, root, bundle)?;
    let mut done = Applied {
        instance_id: m.instance_id.as_ref().map(|i| i.as_str().to_owned()),
        ..Applied::default()
    };
    system_settings(m, root, loader)?;
    for mount in &m.mounts {
        apply_mount(mount, root, loader, "manifest: mounts")?;
        done.mounts += 1;
    }
    tree_entries(m, root, bundle, &mut done)?;
    let env = handoff_env(cfg);
    for r in &m.run {
        run_step(m, r, root, &env, &mut done)?;
    }
    Ok(done)
}

/// The hostname, sysctl values and modules.
fn system_settings(m: &Manifest, root: &Root, loader: &mut ModuleLoader) -> Result<(), ApplyError> {
    if let Some(name) = &m.hostname {
        sys::set_hostname(name.as_str()).map_err(|source| ApplyError::Hostname {
            name: name.as_str().to_owned(),
            source,
        })?;
        persist_hostname(root, name.as_str())?;
        log::info!("manifest: hostname {}", name.as_str());
    }
    for (key, value) in &m.sysctl {
        let path = Path::new("/proc/sys").join(key.proc_path());
        write_sysctl(&path, value.as_str()).map_err(|source| ApplyError::Sysctl {
            key: key.as_str().to_owned(),
            source,
        })?;
    }
    if !m.sysctl.is_empty() {
        log::info!("manifest: sysctl: {} values set", m.sysctl.len());
    }
    if !m.modules.is_empty() {
        let loaded = loader
            .load(m.modules.iter().map(|n| n.as_str()))
            .map_err(ApplyError::Modules)?;
        log::info!("manifest: modules: loaded {}", loaded.join(" "));
    }
    Ok(())
}

/// The host name in `/etc/hostname` too, where a real init (systemd) reads it again: written
/// when `/etc` is writable, covered by a bind mount when the image has one on a read-only
/// `/etc`, left alone when the image has none and cannot get one.
fn persist_hostname(root: &Root, name: &str) -> Result<(), ApplyError> {
    const HOSTNAME: &str = "/etc/hostname";
    let wanted = format!("{name}\n");
    let current = std::fs::read_to_string(HOSTNAME).ok();
    if current.as_deref() == Some(wanted.as_str()) {
        return Ok(());
    }
    match crate::identity::persist(root, HOSTNAME, &wanted, 0o644) {
        Ok(()) => Ok(()),
        Err(e) if current.is_none() => {
            log::info!(
                "manifest: hostname not persisted ({})",
                bootlace_contract::chain(&e)
            );
            Ok(())
        }
        Err(e) => Err(ApplyError::Hostname {
            name: name.to_owned(),
            source: io::Error::other(bootlace_contract::chain(&e)),
        }),
    }
}

/// Directories, files and symlinks, in that order.
fn tree_entries(
    m: &Manifest,
    root: &Root,
    bundle: &Root,
    done: &mut Applied,
) -> Result<(), ApplyError> {
    for d in &m.directories {
        root.make_dir(d.path.as_str(), d.mode.bits(), d.uid, d.gid)
            .map_err(root_err("directories"))?;
        done.directories += 1;
    }
    for f in &m.files {
        let mut data: Box<dyn io::Read> = match (&f.content, &f.source) {
            (Some(c), _) => Box::new(io::Cursor::new(c.clone().into_bytes())),
            (None, Some(src)) => {
                Box::new(bundle.open_file(src.as_str()).map_err(root_err("files"))?)
            }
            (None, None) => Box::new(io::empty()),
        };
        root.write_file(f.path.as_str(), &mut data, f.mode.bits(), f.uid, f.gid)
            .map_err(root_err("files"))?;
        done.files += 1;
    }
    for s in &m.symlinks {
        root.make_symlink(s.path.as_str(), s.target.as_str())
            .map_err(root_err("symlinks"))?;
        done.symlinks += 1;
    }
    if done.mounts + done.directories + done.files + done.symlinks > 0 {
        log::info!(
            "manifest: {} mounts, {} directories, {} files, {} symlinks",
            done.mounts,
            done.directories,
            done.files,
            done.symlinks
        );
    }
    Ok(())
}

/// Runs one command of the manifest (or skips it when it already ran for this instance),
/// then records it as done or applies its `on_failure`.
fn run_step(
    m: &Manifest,
    r: &Run,
    root: &Root,
    env: &[(String, String)],
    done: &mut Applied,
) -> Result<(), ApplyError> {
    let marker = match (r.frequency, &m.instance_id) {
        (Frequency::OncePerInstance, Some(id)) => Some(format!(
            "{}/instances/{}/{}.done",
            m.state_dir.as_str(),
            id.as_str(),
            r.name.as_str()
        )),
        _ => None,
    };
    if let Some(marker) = &marker {
        if root.exists(marker) {
            log::info!(
                "manifest: run: {} already ran for this instance; skipped",
                r.name
            );
            done.skipped += 1;
            return Ok(());
        }
    }
    log::info!("manifest: run: {} ({})", r.name, r.command);
    let end = supervise::run_bounded(step_command(r, env), Duration::from_secs(r.timeout_s))
        .map_err(|source| ApplyError::Supervise {
            name: r.name.as_str().to_owned(),
            source,
        })?;
    match (step_failure(r, end), r.on_failure) {
        (None, _) => {
            done.ran += 1;
            if let Some(marker) = &marker {
                let stamp = format!("{:?}\n", sys::boottime());
                root.write_file(marker, &mut stamp.as_bytes(), 0o644, 0, 0)
                    .map_err(root_err("run"))?;
            }
            Ok(())
        }
        (Some(outcome), OnFailure::Continue) => {
            log::warn!(
                "manifest: run: {}: {outcome}; on_failure = continue",
                r.name
            );
            done.ran += 1;
            Ok(())
        }
        (Some(outcome), OnFailure::Abort) => Err(ApplyError::Command {
            name: r.name.as_str().to_owned(),
            outcome,
        }),
    }
}

/// The command of a run step: its argv, the hand-off environment plus its own, its cwd, uid
/// and gid, default signal handling.
fn step_command(r: &Run, env: &[(String, String)]) -> std::process::Command {
    let mut cmd = std::process::Command::new(r.command.program());
    if let Some(arg0) = r.command.argv().next() {
        cmd.arg0(arg0);
    }
    cmd.args(r.command.args())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .envs(r.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(r.cwd.as_str())
        .uid(r.uid)
        .gid(r.gid);
    sys::reset_signals_on_exec(&mut cmd);
    cmd
}

/// How a run step failed, in words; `None` when it exited 0.
fn step_failure(r: &Run, end: StepEnd) -> Option<String> {
    match end {
        StepEnd::Ended(Ended::Exited(0)) => None,
        StepEnd::Ended(Ended::Exited(code)) => Some(format!("exited with status {code}")),
        StepEnd::Ended(Ended::Signaled(sig)) => Some(format!("killed by signal {sig}")),
        StepEnd::TimedOut(_) => Some(format!(
            "timed out after {} s; its process group was terminated",
            r.timeout_s
        )),
        StepEnd::SpawnFailed(e) => Some(format!(
            "cannot execute {}: {e}",
            r.command.program().display()
        )),
    }
}

/// Checks every path of the manifest against the tree as it is, and that every bundle source
/// is a regular file, before the first change: a planted link or a missing source fails the
/// manifest with nothing applied.
fn preflight(m: &Manifest, root: &Root, bundle: &Root) -> Result<(), ApplyError> {
    for mount in &m.mounts {
        root.preflight(mount.path().as_str())
            .map_err(root_err("mounts"))?;
        if let Mount::Bind(b) = mount {
            root.preflight(b.source.as_str())
                .map_err(root_err("mounts"))?;
        }
    }
    for d in &m.directories {
        root.preflight(d.path.as_str())
            .map_err(root_err("directories"))?;
    }
    for f in &m.files {
        root.preflight(f.path.as_str()).map_err(root_err("files"))?;
        if let Some(src) = &f.source {
            bundle.open_file(src.as_str()).map_err(root_err("files"))?;
        }
    }
    for s in &m.symlinks {
        root.preflight(s.path.as_str())
            .map_err(root_err("symlinks"))?;
    }
    Ok(())
}

fn write_sysctl(path: &Path, value: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)?;
    f.write_all(value.as_bytes())
}

/// `origin` prefixes the log line: which config asked for the mount.
fn apply_mount(
    mount: &Mount,
    root: &Root,
    loader: &mut ModuleLoader,
    origin: &str,
) -> Result<(), ApplyError> {
    let path = mount.path().as_str();
    let target = root.open_dir(path, true).map_err(root_err("mounts"))?;
    let target_path = fd_path(target.as_fd());
    let merr = |what: String| {
        let path = path.to_owned();
        move |source: io::Error| ApplyError::Mount {
            path,
            what,
            source: Some(source),
        }
    };
    let rw = |read_only: bool| Flags {
        nosuid: true,
        nodev: true,
        noexec: false,
        rdonly: read_only,
    };
    match mount {
        Mount::Tmpfs(t) => {
            let copied = mount_tmpfs(t, root, path, &target, &target_path)?;
            log::info!("{origin}: tmpfs on {path} ({copied} default entries copied)");
        }
        Mount::Disk(d) => {
            let Block { dev, fstype } = find_disk(d.label.as_str(), path, loader)?;
            let what = format!("{} ({})", dev.display(), fstype.as_str());
            sys::mount(
                &dev.to_string_lossy(),
                &target_path,
                fstype.as_str(),
                rw(d.read_only),
                c"",
            )
            .map_err(merr(what.clone()))?;
            log::info!("{origin}: {what} on {path}");
        }
        Mount::NineP(n) => {
            loader.load_best_effort(drivers::source(bootlace_contract::config::Source::NineP));
            let what = format!("9p share {:?}", n.tag.as_str());
            sys::mount(
                n.tag.as_str(),
                &target_path,
                "9p",
                rw(n.read_only),
                crate::mounts::NINEP_OPTIONS,
            )
            .map_err(merr(what.clone()))?;
            log::info!("{origin}: {what} on {path}");
        }
        Mount::Bind(b) => {
            let source = root
                .open_dir(b.source.as_str(), false)
                .map_err(root_err("mounts"))?;
            let what = format!("bind of {}", b.source);
            sys::bind_mount(&fd_path(source.as_fd()), &target_path).map_err(merr(what.clone()))?;
            if b.read_only {
                // `target` still names the directory under the new mount: reopen to reach it.
                let mounted = root.open_dir(path, false).map_err(root_err("mounts"))?;
                sys::remount_bind_read_only(&fd_path(mounted.as_fd()))
                    .map_err(merr(what.clone()))?;
            }
            log::info!("{origin}: {what} on {path}");
        }
    }
    Ok(())
}

/// A tmpfs on `target` (which is `path` in the root), with the mode and owner of the directory
/// it covers (or the mount's own mode), holding a copy of what was there when `copy_defaults`.
/// Returns the number of entries copied.
fn mount_tmpfs(
    t: &TmpfsMount,
    root: &Root,
    path: &str,
    target: &std::os::fd::OwnedFd,
    target_path: &Path,
) -> Result<u64, ApplyError> {
    let err = |source: io::Error| ApplyError::Mount {
        path: path.to_owned(),
        what: "tmpfs".to_owned(),
        source: Some(source),
    };
    let st = rustix::fs::fstat(target).map_err(|e| err(e.into()))?;
    let mode = t.mode.map_or(st.st_mode & 0o7777, |m| m.bits());
    let mut opts = format!("mode={mode:o},uid={},gid={}", st.st_uid, st.st_gid);
    if let Some(size) = &t.size {
        opts.push_str(&format!(",size={}", size.as_str()));
    }
    let data = std::ffi::CString::new(opts).map_err(|e| err(io::Error::other(e)))?;
    let flags = Flags {
        nosuid: true,
        nodev: true,
        noexec: false,
        rdonly: false,
    };
    sys::mount("tmpfs", target_path, "tmpfs", flags, &data).map_err(err)?;
    if !t.copy_defaults {
        return Ok(0);
    }
    // `target` still refers to the directory the tmpfs now covers: copy from it.
    let fresh = root.open_dir(path, false).map_err(root_err("mounts"))?;
    root.copy_tree(path, target.as_fd(), fresh.as_fd())
        .map_err(root_err("mounts"))
}

/// The block device labelled `label`, waited for a bounded time once its drivers are loaded.
fn find_disk(label: &str, path: &str, loader: &mut ModuleLoader) -> Result<Block, ApplyError> {
    loader.load_best_effort(drivers::source(bootlace_contract::config::Source::Disk));
    let found = devices::wait_for(DISK_WAIT, || devices::find_block(Want::Label(label))).map_err(
        |seen| ApplyError::Mount {
            path: path.to_owned(),
            what: format!(
                "disk labelled {label:?}: no such block device after {} s (saw {seen})",
                DISK_WAIT.as_secs()
            ),
            source: None,
        },
    )?;
    loader.load_best_effort(drivers::filesystem(found.fstype));
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_cannot_move_a_poweroff_handoff_but_can_others() {
        let m = Manifest::parse(
            "version = 1\n[env]\nA = \"1\"\n[handoff]\nmode = \"supervise\"\ncommand = [\"/bin/app\"]\n",
            Path::new("bootlace.toml"),
        )
        .expect("manifest");
        let mut cfg = InitConfig::default();
        cfg.handoff.mode = HandoffMode::Poweroff;
        merge_handoff(&mut cfg, &m);
        assert_eq!(cfg.handoff.mode, HandoffMode::Poweroff);
        let mut cfg = InitConfig::default();
        merge_handoff(&mut cfg, &m);
        assert_eq!(cfg.handoff.mode, HandoffMode::Supervise);
        assert_eq!(cfg.handoff.command.to_string(), "/bin/app");
    }
}
