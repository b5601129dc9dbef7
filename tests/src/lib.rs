//! Helpers for bootlace's end-to-end tests: where the guest binaries and the kernel are, the
//! busybox rootfs fixture, baking an initramfs, and booting it under QEMU with a per-test
//! console log in `target/vm-logs/`.
//!
//! The guest binaries are built by `make test` (scripts/build-guest.sh) into `target/bootlace/`
//! or wherever `$BOOTLACE_ARTIFACTS` points; a missing one fails the test with that hint.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bootlace_contract::config::InitConfig;
use bootlace_image::bake::{BakeSpec, Format};
use bootlace_image::initramfs::Modules;
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

/// The Debian bookworm root with systemd (`scripts/debian-root.sh`: debootstrap minbase with
/// systemd-sysv, udev and dbus), made once and cached under target/debian between runs.
pub fn debian_root() -> Result<PathBuf> {
    let root = workspace().join("target/debian/bookworm");
    let out = Command::new("bash")
        .arg(workspace().join("scripts/debian-root.sh"))
        .arg(&root)
        .output()
        .context("run scripts/debian-root.sh")?;
    if !out.status.success() {
        bail!(
            "scripts/debian-root.sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(root)
}

/// The test kernel's modules (`/lib/modules/<release>`), with `extra` copied too.
pub fn kernel_modules(extra: &[&str]) -> Result<Modules> {
    Ok(Modules {
        root: PathBuf::from("/lib/modules"),
        release: test_kernel()?.release,
        extra: extra
            .iter()
            .map(|m| bootlace_contract::config::ModuleName::try_from((*m).to_owned()))
            .collect::<Result<_, _>>()?,
    })
}

/// Bakes bootlace's stage-1 initramfs for the test kernel as `DIR/stage1.img` (named
/// `stage1`), with `stage1` as its `[stage1]` (the root comes from the command line).
pub fn bake_stage1(dir: &Path, stage1: bootlace_contract::config::Stage1) -> Result<PathBuf> {
    let out = dir.join("stage1.img");
    let mut s1 = BakeSpec::new(
        Format::Initramfs,
        out.clone(),
        None,
        artifact("bootlace-init")?,
    );
    s1.stage1 = true;
    s1.config.stage1 = Some(stage1);
    s1.modules = Some(kernel_modules(&[])?);
    s1.name = Some("stage1".to_owned());
    bootlace_image::bake::bake(&s1, &mut |_| {}).context("bake stage 1")?;
    Ok(out)
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

/// Bakes an initramfs of `rootfs` with the real init and `config` (`bake --format initramfs
/// --all-root`), copying the modules the config needs from the test kernel's module tree.
pub fn bake(rootfs: &Path, config: InitConfig, out: &Path) -> Result<()> {
    let k = test_kernel()?;
    let mut spec = BakeSpec::new(
        Format::Initramfs,
        out.to_owned(),
        Some(rootfs.to_owned()),
        artifact("bootlace-init")?,
    );
    // The builder copies only what the config needs (possibly nothing).
    spec.modules = Some(Modules {
        root: PathBuf::from("/lib/modules"),
        release: k.release.clone(),
        extra: Vec::new(),
    });
    spec.config = config;
    spec.all_root = true;
    bootlace_image::bake::bake(&spec, &mut |_| {})
        .with_context(|| format!("bake {}", out.display()))?;
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

/// (relative path, content or link target, mode, mtime) of everything in a tree.
pub type TreeSnapshot = Vec<(String, Vec<u8>, u32, i64)>;

/// What a directory tree looks like, to prove something left it alone.
pub fn tree_snapshot(dir: &Path) -> Result<TreeSnapshot> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        let rel = p.strip_prefix(dir)?.to_string_lossy().into_owned();
        let content = if m.is_file() {
            std::fs::read(&p)?
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)?
                .into_os_string()
                .into_encoded_bytes()
        } else {
            Vec::new()
        };
        out.push((rel, content, m.mode(), m.mtime()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// How a test disk is made: [`test_disk`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestDisk<'a> {
    /// No filesystem at all (zeros).
    Blank,
    /// ext4 with this label.
    Ext4(&'a str),
    /// ext4 with this label, filled up: almost no free blocks are left, and `/keep` holds
    /// `old content\n`.
    Ext4Full(&'a str),
}

/// Makes a disk image of `mib` MiB at `path` for the bootstrap and data-disk cases: blank,
/// labelled (a wrong label makes a mislabelled bootstrap disk), or full. A read-only disk is
/// a `Disk { read_only: true }` of any of them; a missing one is no `Disk` at all.
pub fn test_disk(path: &Path, mib: u32, kind: TestDisk<'_>) -> Result<()> {
    run_tool(
        Command::new("truncate")
            .arg("-s")
            .arg(format!("{mib}M"))
            .arg(path),
    )?;
    let (label, full) = match kind {
        TestDisk::Blank => return Ok(()),
        TestDisk::Ext4(l) => (l, false),
        TestDisk::Ext4Full(l) => (l, true),
    };
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-m", "0", "-L", label]);
    if full {
        // Fill it from a directory: /keep plus a file as large as the rest of the space.
        let src = path.with_extension("fill");
        std::fs::create_dir_all(&src)?;
        std::fs::write(src.join("keep"), b"old content\n")?;
        let probe = path.with_extension("probe.img");
        run_tool(
            Command::new("truncate")
                .arg("-s")
                .arg(format!("{mib}M"))
                .arg(&probe),
        )?;
        run_tool(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .arg(&probe),
        )?;
        let out = Command::new("dumpe2fs").arg("-h").arg(&probe).output()?;
        std::fs::remove_file(&probe)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let field = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let free = field("Free blocks:") * field("Block size:");
        // Leave a few blocks for /keep, its directory and the filler's own metadata.
        let filler = free.saturating_sub(256 * 1024);
        let f = std::fs::File::create(src.join("filler"))?;
        // Not zeros: mkfs.ext4 -d stores zero blocks as holes, which fill nothing.
        let mut w = std::io::BufWriter::new(f);
        std::io::copy(&mut std::io::repeat(0xa5).take(filler), &mut w)?;
        std::io::Write::flush(&mut w)?;
        mkfs.arg("-d").arg(&src);
        mkfs.arg(path);
        let r = run_tool(&mut mkfs);
        std::fs::remove_dir_all(&src)?;
        return r;
    }
    run_tool(mkfs.arg(path))
}
