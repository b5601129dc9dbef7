//! Helpers for bootlace's end-to-end tests: where the guest binaries and the kernel are, the
//! busybox rootfs fixture, baking an initramfs, and booting it under QEMU with a per-test
//! console log in `target/vm-logs/`.
//!
//! The guest binaries are built by `make test` (scripts/build-guest.sh) into `target/bootlace/`
//! or wherever `$BOOTLACE_ARTIFACTS` points; a missing one fails the test with that hint.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bootlace_image::initramfs::{self, Compression, Modules, Spec};
use bootlace_init::config::InitConfig;
use bootlace_vm::{kernel, Outcome, VmSpec};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A guest binary built by `scripts/build-guest.sh` (`bootlace-init`, `bootlace-probe`).
pub fn artifact(name: &str) -> Result<PathBuf> {
    let dir = std::env::var_os("BOOTLACE_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/bootlace"));
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: run `make test` (it builds the static guest binaries first)",
            path.display()
        );
    }
    Ok(path)
}

/// The kernel the VM tests boot.
pub fn test_kernel() -> Result<kernel::Kernel> {
    kernel::find().context("no kernel for the VM tests (make setup installs linux-image-amd64)")
}

/// A scratch directory for one test, removed when dropped.
pub fn scratch() -> Result<tempfile::TempDir> {
    let base = workspace().join("target/test-scratch");
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::tempdir_in(base)?)
}

/// Makes the busybox rootfs fixture in `dir` (tests/fixtures/busybox-rootfs.sh).
pub fn busybox_rootfs(dir: &Path) -> Result<()> {
    let script = workspace().join("tests/fixtures/busybox-rootfs.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .status()
        .with_context(|| format!("run {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    Ok(())
}

/// Bakes an initramfs of `rootfs` with the real init and `config`, copying the modules the
/// config names from the test kernel's module tree.
pub fn bake(rootfs: &Path, config: InitConfig, out: &Path) -> Result<()> {
    let k = test_kernel()?;
    let spec = Spec {
        rootfs: Some(rootfs.to_owned()),
        init: artifact("bootlace-init")?,
        // The builder copies only what the config needs (possibly nothing).
        modules: Some(Modules {
            root: PathBuf::from("/lib/modules"),
            release: k.release.clone(),
            extra: Vec::new(),
        }),
        config,
        keep_owners: false,
        mtime: 0,
        compression: Compression::Gzip,
    };
    initramfs::build(&spec, out).with_context(|| format!("bake {}", out.display()))?;
    Ok(())
}

/// Boots `initrd` with extra kernel parameters; the console goes to
/// `target/vm-logs/<name>.console.log`.
pub fn boot(name: &str, initrd: &Path, append: &[&str]) -> Result<Outcome> {
    boot_with(name, initrd, append, |_| {})
}

/// Like [`boot`], letting the caller add disks and shares to the spec.
pub fn boot_with(
    name: &str,
    initrd: &Path,
    append: &[&str],
    more: impl FnOnce(&mut VmSpec),
) -> Result<Outcome> {
    let k = test_kernel()?;
    let logs = workspace().join("target/vm-logs");
    std::fs::create_dir_all(&logs)?;
    let mut spec = VmSpec::new(k.image);
    spec.initrd = Some(initrd.to_owned());
    spec.append = append.iter().map(|s| (*s).to_owned()).collect();
    spec.timeout = Duration::from_secs(180);
    spec.console_log = Some(bootlace_vm::console_log_path(&logs, name));
    more(&mut spec);
    Ok(bootlace_vm::run(&spec)?)
}

/// The busybox rootfs with the probe installed as `/sbin/probe` and, if given, a `/probe.sh`
/// it runs after its report.
pub fn probe_rootfs(dir: &Path, script: Option<&str>) -> Result<()> {
    busybox_rootfs(dir)?;
    std::fs::copy(artifact("bootlace-probe")?, dir.join("sbin/probe"))?;
    if let Some(script) = script {
        std::fs::write(dir.join("probe.sh"), script)?;
    }
    Ok(())
}

/// Runs a command, failing with its stderr when it fails.
pub fn run_tool(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The last `lines` lines of a console, for assertion messages.
pub fn tail(outcome: &Outcome, lines: usize) -> String {
    let all: Vec<&str> = outcome.console.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The value of a `PROBE key=value` line.
pub fn probe_value(outcome: &Outcome, key: &str) -> Option<String> {
    let prefix = format!("PROBE {key}=");
    outcome.console.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix(&prefix)
            .map(str::to_owned)
    })
}
