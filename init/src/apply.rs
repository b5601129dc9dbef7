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

use bootlace_contract::manifest::{Frequency, Manifest, Mount, OnFailure, TmpfsMount};
use bootlace_contract::types::TargetPath;

use crate::devices::{self, Block, Want};
use crate::modload::{ModLoadError, ModuleLoader};
use crate::supervise::{self, handoff_env, StepEnd};
use crate::sys::root::{fd_path, Root, RootError};
use crate::sys::{self, Ended, Flags};
use bootlace_contract::config::InitConfig;
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
    if let Some(mode) = manifest.handoff.mode {
        cfg.handoff.mode = mode;
    }
    if let Some(cmd) = &manifest.handoff.command {
        cfg.handoff.command = cmd.clone();
    }
}

/// Backs each of `paths` with a fresh tmpfs holding a copy of what the image has there (the
/// writable locations of a read-only root, `[root] writable`). Each tmpfs takes the mode and
/// owner of the directory it covers. Returns the number of entries copied.
pub fn writable_locations(
    paths: &[TargetPath],
    loader: &mut ModuleLoader,
) -> Result<(), ApplyError> {
    let root = Root::open(Path::new("/")).map_err(|source| ApplyError::Mount {
        path: "/".to_owned(),
        what: "open the root".to_owned(),
        source: Some(source),
    })?;
    for path in paths {
        let mount = Mount::Tmpfs(TmpfsMount {
            path: path.clone(),
            size: None,
            mode: None,
            copy_defaults: true,
        });
        apply_mount(&mount, &root, loader, "root: writable")?;
    }
    Ok(())
}

fn root_err(step: &'static str) -> impl FnOnce(RootError) -> ApplyError {
    move |source| ApplyError::Root { step, source }
}

/// Applies a manifest: `root` is the guest's root, `bundle` the bootstrap filesystem, `cfg`
/// the config with the manifest's hand-off merged (its environment is the commands' base).
pub fn apply(
    m: &Manifest,
    root: &Root,
    bundle: &Root,
    loader: &mut ModuleLoader,
    cfg: &InitConfig,
) -> Result<Applied, ApplyError> {
    preflight(m, root, bundle)?;
    let mut done = Applied::default();
    if let Some(name) = &m.hostname {
        sys::set_hostname(name.as_str()).map_err(|source| ApplyError::Hostname {
            name: name.as_str().to_owned(),
            source,
        })?;
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
    for mount in &m.mounts {
        apply_mount(mount, root, loader, "manifest: mounts")?;
        done.mounts += 1;
    }
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
    let env = handoff_env(cfg);
    for r in &m.run {
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
                continue;
            }
        }
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
        log::info!("manifest: run: {} ({})", r.name, r.command);
        let end =
            supervise::run_bounded(cmd, Duration::from_secs(r.timeout_s)).map_err(|source| {
                ApplyError::Supervise {
                    name: r.name.as_str().to_owned(),
                    source,
                }
            })?;
        let failure = match end {
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
        };
        match (failure, r.on_failure) {
            (None, _) => {
                done.ran += 1;
                if let Some(marker) = &marker {
                    let stamp = format!("{:?}\n", sys::boottime());
                    root.write_file(marker, &mut stamp.as_bytes(), 0o644, 0, 0)
                        .map_err(root_err("run"))?;
                }
            }
            (Some(outcome), OnFailure::Continue) => {
                log::warn!(
                    "manifest: run: {}: {outcome}; on_failure = continue",
                    r.name
                );
                done.ran += 1;
            }
            (Some(outcome), OnFailure::Abort) => {
                return Err(ApplyError::Command {
                    name: r.name.as_str().to_owned(),
                    outcome,
                })
            }
        }
    }
    Ok(done)
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
            let st = rustix::fs::fstat(&target).map_err(|e| merr("tmpfs".into())(e.into()))?;
            let mode = t.mode.map_or(st.st_mode & 0o7777, |m| m.bits());
            let mut opts = format!("mode={mode:o},uid={},gid={}", st.st_uid, st.st_gid);
            if let Some(size) = &t.size {
                opts.push_str(&format!(",size={}", size.as_str()));
            }
            let data = std::ffi::CString::new(opts)
                .map_err(|e| merr("tmpfs".into())(io::Error::other(e)))?;
            sys::mount("tmpfs", &target_path, "tmpfs", rw(false), &data)
                .map_err(merr("tmpfs".into()))?;
            let mut copied = 0;
            if t.copy_defaults {
                // `target` still refers to the directory the tmpfs now covers: copy from it.
                let fresh = root.open_dir(path, false).map_err(root_err("mounts"))?;
                copied = root
                    .copy_tree(path, target.as_fd(), fresh.as_fd())
                    .map_err(root_err("mounts"))?;
            }
            log::info!("{origin}: tmpfs on {path} ({copied} default entries copied)");
        }
        Mount::Disk(d) => {
            loader.load_best_effort(drivers::source(bootlace_contract::config::Source::Disk));
            let found = devices::wait_for(DISK_WAIT, || {
                devices::find_block(Want::Label(d.label.as_str()))
            });
            let Block { dev, fstype } = found.map_err(|seen| ApplyError::Mount {
                path: path.to_owned(),
                what: format!(
                    "disk labelled {:?}: no such block device after {} s (saw {seen})",
                    d.label.as_str(),
                    DISK_WAIT.as_secs()
                ),
                source: None,
            })?;
            loader.load_best_effort(drivers::filesystem(fstype));
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
