//! A newer bootlace-init taking over PID 1 (the manifest's `[init]`; the contract is
//! [`bootlace_contract::takeover`]).
//!
//! The running init, with the bootstrap mounted: reads `[init]` from the manifest, copies the
//! file out of the bundle to `/run/bootlace/init.next` hashing it on the way (the bytes must
//! have the manifest's sha256; the manifest is as trusted as its bundle), runs its self-check
//! (`init.next takeover-check`, one line and status 0 within the deadline), writes the state
//! and executes it as PID 1. Any failure before the exec leaves nothing behind and the running
//! init goes on itself. The newer init reads the state, removes it and its own copy (the
//! running program stays in memory) and resumes the boot.

use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bootlace_contract::digest::{HashingReader, Sha256Digest};
use bootlace_contract::manifest::{
    Manifest, ManifestError, NextInit, MANIFEST_NAME, MAX_INIT_BYTES,
};
use bootlace_contract::takeover::{self, Handover, StateError, CHECK_COMMAND};

use crate::supervise::{self, StepEnd};
use crate::sys::root::{Root, RootError};
use crate::sys::{self, Ended};

/// Why a takeover did not happen. Each names the file and the step.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The manifest could not be read.
    #[error("init takeover: the manifest")]
    Manifest(#[source] ManifestError),
    /// The file named by `[init] path` could not be opened in the bundle.
    #[error("init takeover: open {path} in the bundle")]
    Open {
        /// The path in the bundle.
        path: String,
        /// The cause.
        #[source]
        source: RootError,
    },
    /// It is not a regular file, or too large.
    #[error("init takeover: {path} in the bundle {what}")]
    NotUsable {
        /// The path in the bundle.
        path: String,
        /// What is wrong with it.
        what: String,
    },
    /// Copying it out of the bundle failed.
    #[error("init takeover: copy {from} to {to}")]
    Copy {
        /// The path in the bundle.
        from: String,
        /// The copy.
        to: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Its bytes are not the ones the manifest names.
    #[error("init takeover: {path} has {found}, not the manifest's {wanted}")]
    Digest {
        /// The path in the bundle.
        path: String,
        /// Its digest.
        found: Sha256Digest,
        /// The manifest's.
        wanted: Sha256Digest,
    },
    /// Its self-check failed.
    #[error("init takeover: the self-check of {path} failed: {why}")]
    SelfCheck {
        /// The copy.
        path: PathBuf,
        /// What happened.
        why: String,
    },
    /// The state could not be written.
    #[error("init takeover: write the state {path}")]
    WriteState {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The exec failed.
    #[error("init takeover: execute {path}")]
    Exec {
        /// The copy.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The state handed over could not be taken.
    #[error("init takeover")]
    State(#[source] StateError),
}

/// A newer init, copied, checked and ready to take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The copy.
    pub path: PathBuf,
    /// The version its self-check said.
    pub version: String,
    /// Its digest.
    pub sha256: Sha256Digest,
    /// Its size.
    pub bytes: u64,
}

/// The `[init]` of the manifest of the bundle mounted at `bundle` (shown as `shown`).
pub fn wanted(bundle: &Root, shown: &Path) -> Result<Option<NextInit>, TakeoverError> {
    let path = shown.join(MANIFEST_NAME);
    let file = bundle.open_file(MANIFEST_NAME).map_err(|e| {
        TakeoverError::Manifest(ManifestError::Read {
            path: path.clone(),
            source: io::Error::other(e.to_string()),
        })
    })?;
    let manifest = Manifest::read_from(file, &path).map_err(TakeoverError::Manifest)?;
    Ok(manifest.init)
}

/// Copies `next` out of `bundle` to `dest` checking its digest, and runs its self-check.
/// `Ok(None)` when it is the program `running` already (the version `running_version` and
/// the same bytes; the bytes are compared only when the versions are the same, which costs a
/// second hash under emulation): there is nothing to take over. On an error nothing is left
/// at `dest`.
pub fn prepare(
    bundle: &Root,
    next: &NextInit,
    dest: &Path,
    running: (&Path, &str),
) -> Result<Option<Prepared>, TakeoverError> {
    let result = copy_checked(bundle, next, dest).and_then(|(sha256, bytes)| {
        let version = self_check(dest, Duration::from_millis(next.check_timeout_ms))?;
        if version == running.1 && same_program(running.0, &sha256, bytes) {
            log::info!(
                "init: the bundle's bootlace-init ({}) is the one running ({sha256}): no takeover",
                next.path.as_str()
            );
            return Ok(None);
        }
        Ok(Some(Prepared {
            path: dest.to_owned(),
            version,
            sha256,
            bytes,
        }))
    });
    if !matches!(result, Ok(Some(_))) {
        remove_quietly(dest);
    }
    result
}

/// Copies the file, hashing it on the way; the copy is executable by root only.
fn copy_checked(
    bundle: &Root,
    next: &NextInit,
    dest: &Path,
) -> Result<(Sha256Digest, u64), TakeoverError> {
    let from = next.path.as_str().to_owned();
    let src = bundle
        .open_file(&from)
        .map_err(|source| TakeoverError::Open {
            path: from.clone(),
            source,
        })?;
    let copy_err = |source: io::Error| TakeoverError::Copy {
        from: from.clone(),
        to: dest.to_owned(),
        source,
    };
    let meta = src.metadata().map_err(copy_err)?;
    if !meta.is_file() {
        return Err(TakeoverError::NotUsable {
            path: from,
            what: "is not a regular file".to_owned(),
        });
    }
    if meta.len() > MAX_INIT_BYTES {
        return Err(TakeoverError::NotUsable {
            path: from,
            what: format!(
                "is {} bytes, over the {MAX_INIT_BYTES}-byte limit",
                meta.len()
            ),
        });
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(copy_err)?;
    }
    remove_quietly(dest);
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(dest)
        .map_err(copy_err)?;
    let mut reader = HashingReader::new(src.take(MAX_INIT_BYTES + 1));
    io::copy(&mut reader, &mut out)
        .and_then(|_| out.flush())
        .map_err(copy_err)?;
    drop(out);
    let (found, bytes) = reader.finish();
    if bytes > MAX_INIT_BYTES {
        return Err(TakeoverError::NotUsable {
            path: from,
            what: format!("grew over the {MAX_INIT_BYTES}-byte limit while it was copied"),
        });
    }
    if found != next.sha256 {
        return Err(TakeoverError::Digest {
            path: from,
            found,
            wanted: next.sha256.clone(),
        });
    }
    Ok((found, bytes))
}

/// Whether the program at `running` has these bytes (the size is compared first).
fn same_program(running: &Path, sha256: &Sha256Digest, bytes: u64) -> bool {
    let Ok(file) = std::fs::File::open(running) else {
        return false;
    };
    if file.metadata().map(|m| m.len()).ok() != Some(bytes) {
        return false;
    }
    bootlace_contract::digest::of_reader(file).is_ok_and(|(d, _)| &d == sha256)
}

/// Runs `path takeover-check` within `deadline` (then SIGTERM, SIGKILL 2 s later); returns
/// the version it said.
pub fn self_check(path: &Path, deadline: Duration) -> Result<String, TakeoverError> {
    let fail = |why: String| TakeoverError::SelfCheck {
        path: path.to_owned(),
        why,
    };
    // Its output goes to a file: the check is reaped with everything else PID 1 reaps, and a
    // pipe it filled would hold it.
    let out_path = path.with_extension("check");
    remove_quietly(&out_path);
    let out = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&out_path)
        .map_err(|e| fail(format!("cannot create {}: {e}", out_path.display())))?;
    let mut cmd = std::process::Command::new(path);
    cmd.arg(CHECK_COMMAND)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| fail(e.to_string()))?)
        .stderr(out);
    sys::reset_signals_on_exec(&mut cmd);
    let end = supervise::run_bounded(cmd, deadline);
    let said = read_bounded(&out_path);
    remove_quietly(&out_path);
    let answer = match end {
        Ok(StepEnd::Ended(Ended::Exited(0))) => {
            return takeover::parse_check_output(&said).map_err(fail)
        }
        Ok(StepEnd::Ended(Ended::Exited(code))) => format!("it exited with status {code}"),
        Ok(StepEnd::Ended(Ended::Signaled(sig))) => format!("it was killed by signal {sig}"),
        Ok(StepEnd::TimedOut(_)) => format!("no answer within {} ms", deadline.as_millis()),
        Ok(StepEnd::SpawnFailed(e)) => format!("it could not be started: {e}"),
        Err(e) => format!("it could not be run: {e}"),
    };
    let said = said.trim();
    Err(fail(if said.is_empty() {
        answer
    } else {
        format!("{answer}; it said {said:?}")
    }))
}

/// At most 512 bytes of a file, as text.
fn read_bounded(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.take(512).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Writes the state (atomically) and executes the newer init as PID 1 with the kernel's
/// arguments; returns only the error (and then nothing is left of the takeover).
pub fn exec(next: &Prepared, state: &Handover, state_path: &Path) -> TakeoverError {
    if let Err(source) = write_state(state, state_path) {
        remove_quietly(&next.path);
        return TakeoverError::WriteState {
            path: state_path.to_owned(),
            source,
        };
    }
    if let Err(e) = sys::cloexec_all_but_stdio() {
        log::warn!("init takeover: cannot mark fds close-on-exec: {e}");
    }
    let kernel_args = supervise::kernel_args();
    let mut cmd = std::process::Command::new(&next.path);
    cmd.args(takeover::exec_args(&kernel_args));
    sys::reset_signals_on_exec(&mut cmd);
    let source = cmd.exec();
    remove_quietly(state_path);
    remove_quietly(&next.path);
    TakeoverError::Exec {
        path: next.path.clone(),
        source,
    }
}

/// Writes the state to `path` whole (a temporary file renamed), readable by root only.
pub fn write_state(state: &Handover, path: &Path) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    remove_quietly(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(state.to_toml().as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The newer init's side: reads the state handed over, then removes it and the copy of the
/// program now running (it stays in memory).
pub fn take_state(state_path: &Path, program: &Path) -> Result<Handover, TakeoverError> {
    let state = Handover::read(state_path).map_err(TakeoverError::State);
    remove_quietly(state_path);
    remove_quietly(program);
    state
}

fn remove_quietly(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("init takeover: remove {}: {e}", path.display()),
    }
}
