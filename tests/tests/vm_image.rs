//! VM tests of baked images (`bootlace-image bake`): the busybox fixture baked as an erofs,
//! ext4, squashfs and qcow2 root booted in disk-root mode through a stage-1 initramfs, and as
//! an initramfs booted directly — each chosen by name from a directory of images through its
//! metadata, as `bootlace-vm --images DIR --image NAME` does. Each reaches the probe (the
//! image's "real init"); on the read-only roots a write to /etc works (tmpfs) while / stays
//! read-only; the ext4 root is read-write as its config says; the initramfs's `/` is 0755
//! root's.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result};
use bootlace_contract::config::{Command as Argv, HandoffMode, InitConfig, Stage1};
use bootlace_contract::fs::FsType;
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_tests::{
    artifact, bake_stage1, kernel_modules, probe_rootfs, probe_value, scratch, tail, test_kernel,
    workspace,
};
use bootlace_vm::{images, Outcome, VmSpec};

const PROBE_SCRIPT: &str = r#"
echo hello > /etc/written && echo "PROBE etc_write=$(cat /etc/written)"
if touch /root-write 2>/dev/null; then echo "PROBE root_write=yes"; else echo "PROBE root_write=no"; fi
echo "PROBE root_fs=$(awk '$2 == "/" { print $3 }' /proc/mounts | tail -n 1)"
echo "PROBE etc_fs=$(awk '$2 == "/etc" { print $3 }' /proc/mounts | tail -n 1)"
echo "PROBE initramfs_left=$(ls /sysroot 2>/dev/null | wc -l)"
echo "PROBE root_mode=$(stat -c '%a %u:%g' /)"
echo "PROBE etc_default=$(grep -c '^version = 1' /etc/bootlace/init.toml)"
rm -f /etc/bootlace/init.toml && echo "PROBE etc_rm=$(ls /etc/bootlace | grep -c init.toml)"
echo "PROBE upper=$(awk '$2 == "/run/bootlace/writable/0" { print $3 }' /proc/mounts)"
"#;

/// The images directory, baked once for every test in this file.
fn images_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| bake_all().expect("bake the test images"))
}

fn bake_all() -> Result<PathBuf> {
    // Kept for the whole test run (scratch dirs are removed on drop: leak it on purpose).
    let scratch = scratch()?.keep();
    let rootfs = scratch.join("rootfs");
    probe_rootfs(&rootfs, Some(PROBE_SCRIPT))?;
    let dir = scratch.join("images");
    std::fs::create_dir_all(&dir)?;
    let mut cfg = InitConfig::default();
    cfg.handoff.mode = HandoffMode::Supervise;
    cfg.handoff.command =
        Argv::try_from(vec!["/sbin/probe".to_owned()]).map_err(|e| anyhow::anyhow!(e))?;

    bake_stage1(&dir, Stage1::default())?;

    for (name, format, file) in [
        ("base-initramfs", Format::Initramfs, "base.cpio.gz"),
        ("base-erofs", Format::Erofs, "base.erofs"),
        ("base-ext4", Format::Ext4, "base.ext4"),
        ("base-squashfs", Format::Squashfs, "base.squashfs"),
        ("base-qcow2", Format::Qcow2, "base.qcow2"),
    ] {
        let mut spec = BakeSpec::new(
            format,
            dir.join(file),
            Some(rootfs.clone()),
            artifact("bootlace-init")?,
        );
        spec.config = cfg.clone();
        spec.name = Some(name.to_owned());
        spec.version = "1.0".to_owned();
        spec.all_root = true;
        if format == Format::Qcow2 {
            spec.qcow2_fs = Some(FsType::Erofs);
        }
        // erofs and qcow2 get overlayfs (their writable locations are overlays); squashfs
        // none, so its locations are copied into tmpfs.
        if matches!(format, Format::Erofs | Format::Qcow2) {
            spec.modules = Some(kernel_modules(&[])?);
        }
        if format == Format::Initramfs {
            // The initramfs is writable as it is; no tmpfs needed.
            spec.writable = Some(Vec::new());
        }
        bake::bake(&spec, &mut |_| {}).with_context(|| format!("bake {name}"))?;
    }
    Ok(dir)
}

fn boot_image(name: &str) -> Result<Outcome> {
    let dir = images_dir();
    let chosen = images::choose(dir, name, Some("1.0"))?;
    assert!(chosen.warnings.is_empty(), "{:?}", chosen.warnings);
    let k = test_kernel()?;
    let mut spec = VmSpec::new(k.image);
    let stage1 = if chosen.entry.meta.needs_stage1() {
        Some(images::stage1(dir)?.path())
    } else {
        None
    };
    bootlace_vm::boot_image(&mut spec, &chosen.entry, stage1.as_deref())?;
    spec.timeout = Duration::from_secs(180);
    let logs = workspace().join("target/vm-logs");
    std::fs::create_dir_all(&logs)?;
    spec.console_log = Some(bootlace_vm::console_log_path(
        &logs,
        &format!("image-{name}"),
    ));
    Ok(bootlace_vm::run(&spec)?)
}

fn probe(o: &Outcome, key: &str) -> String {
    probe_value(o, key).unwrap_or_else(|| panic!("no PROBE {key}:\n{}", tail(o, 40)))
}

fn assert_reached_probe(o: &Outcome) {
    assert_eq!(o.exit_status, Some(0), "{}", tail(o, 40));
    assert!(o.console.contains("PROBE done"), "{}", tail(o, 40));
    assert!(!o.console.contains("Kernel panic"), "{}", tail(o, 40));
}

/// A read-only root booted through stage 1: the probe runs inside it, /etc is writable (an
/// overlay over the image's /etc, or a tmpfs holding a copy: `etc_fs`) and shows the image's
/// files, a file of the image can be removed from it, / refuses writes, and nothing of the
/// initramfs is left.
fn assert_read_only_root(o: &Outcome, fstype: &str, etc_fs: &str) {
    assert_reached_probe(o);
    assert!(
        o.console.contains("stage1: root LABEL=") || o.console.contains("stage1: root /dev/vda"),
        "{}",
        tail(o, 40)
    );
    assert_eq!(probe(o, "root_fs"), fstype);
    assert_eq!(probe(o, "etc_fs"), etc_fs, "{}", tail(o, 40));
    assert_eq!(probe(o, "etc_write"), "hello");
    assert_eq!(probe(o, "etc_default"), "1");
    assert_eq!(probe(o, "etc_rm"), "0");
    if etc_fs == "overlay" {
        assert_eq!(probe(o, "upper"), "tmpfs");
        assert!(
            o.console
                .contains("root: writable: overlay on /etc (upper: a tmpfs of 25% on /run/bootlace/writable/0)"),
            "{}",
            tail(o, 40)
        );
    } else {
        assert!(
            o.console
                .contains("root: writable: copying /etc into a tmpfs: no overlayfs"),
            "{}",
            tail(o, 40)
        );
    }
    assert_eq!(probe(o, "root_write"), "no");
    assert_eq!(probe(o, "initramfs_left"), "0");
}

#[test]
fn erofs_root_boots_read_only_with_a_writable_etc() {
    let o = boot_image("base-erofs").expect("boot");
    assert_read_only_root(&o, "erofs", "overlay");
}

#[test]
fn squashfs_root_boots_by_device() {
    let o = boot_image("base-squashfs").expect("boot");
    assert_read_only_root(&o, "squashfs", "tmpfs");
    assert!(
        o.console.contains("stage1: root /dev/vda"),
        "{}",
        tail(&o, 40)
    );
}

#[test]
fn qcow2_of_erofs_boots() {
    let o = boot_image("base-qcow2").expect("boot");
    assert_read_only_root(&o, "erofs", "overlay");
}

#[test]
fn ext4_root_boots_through_stage1() {
    let o = boot_image("base-ext4").expect("boot");
    assert_reached_probe(&o);
    assert_eq!(probe(&o, "root_fs"), "ext4");
    // Issue 12, item 7: the image says `[root] read_only = false` and stage 1 follows it,
    // with no `rw` on the command line (bootlace-vm adds none).
    assert_eq!(probe(&o, "root_write"), "yes", "{}", tail(&o, 40));
    assert!(
        o.console.contains("(the image's [root] read_only = false)"),
        "{}",
        tail(&o, 40)
    );
}

#[test]
fn initramfs_boots_directly() {
    let o = boot_image("base-initramfs").expect("boot");
    assert_reached_probe(&o);
    assert_eq!(probe(&o, "etc_write"), "hello");
    assert!(!o.console.contains("stage1:"), "{}", tail(&o, 40));
    // Issue 12, item 3: the archive's `.` entry, not the kernel's world-writable default.
    assert_eq!(probe(&o, "root_mode"), "755 0:0", "{}", tail(&o, 40));
}

#[test]
fn stage1_without_its_root_says_what_it_saw_and_powers_off() {
    let dir = images_dir();
    let chosen = images::choose(dir, "base-erofs", None).expect("choose");
    let k = test_kernel().expect("kernel");
    let mut spec = VmSpec::new(k.image);
    let stage1 = images::stage1(dir).expect("stage 1").path();
    bootlace_vm::boot_image(&mut spec, &chosen.entry, Some(&stage1)).expect("spec");
    // A later bootlace.root= wins: ask for a label no disk has.
    spec.append
        .push("bootlace.root=LABEL=no-such-root".to_owned());
    spec.timeout = Duration::from_secs(180);
    let o = bootlace_vm::run(&spec).expect("boot");
    assert_eq!(o.exit_status, Some(71), "{}", tail(&o, 30));
    assert!(
        o.console
            .contains("stage1: root LABEL=no-such-root not found after waiting 10000 ms")
            && o.console
                .contains("/dev/vda (erofs, label \"bootlace-root\")"),
        "{}",
        tail(&o, 30)
    );
    assert!(!o.console.contains("Kernel panic"), "{}", tail(&o, 30));
}
