//! Bootable disks booted as a cloud boots a machine image: UEFI firmware (OVMF), no `-kernel`,
//! the kernel command line baked into the disk's unified kernel image.
//! - busybox disks (erofs root, raw) boot to READY with a per-guest bundle and no edit of the
//!   disk: over vsock from a host agent (trusted by the digest its VMM hands it over SMBIOS),
//!   and, for an image without a host, from a bundle disk;
//! - the Debian root baked as a disk (ext4 root, qcow2) boots systemd through the firmware,
//!   configured over vsock (READY, then systemd's readiness);
//! - a damaged EFI system partition: the firmware boots nothing and bootlace-vm says so at once
//!   (not a timeout); a disk without its root partition: stage 1 names the PARTUUID it waited
//!   for and what it saw, and the guest powers off with a failure status.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Source};
use bootlace_contract::image::{Container, DiskInfo};
use bootlace_contract::protocol::{Frame, Kind, SYSTEMD_READY_STEP};
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_image::disk::DiskOptions;
use bootlace_tests::{
    artifact, debian_root, kernel_modules, probe_rootfs, probe_value, scratch, tail, workspace,
};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{images, Disk, End, OobDigest, OobVia, Outcome, RootDisk, VmSpec};

const PORT: u32 = 1024;

fn manifest(hostname: &str) -> String {
    format!(
        r#"
version = 1
hostname = "{hostname}"

[handoff]
mode = "supervise"
command = ["/bin/sh", "-c", "/sbin/probe; exit 3"]
"#
    )
}

struct Fixture {
    dir: PathBuf,
    images: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| make_fixture().expect("the disk images"))
}

/// The busybox probe root baked as two bootable disks (erofs, raw): `bb`, which fetches its
/// bundle over vsock from the host it reports to, trusting it only by a digest given at boot,
/// and `bb-local`, with no host, which takes its bundle from a disk.
fn make_fixture() -> anyhow::Result<Fixture> {
    let dir = scratch()?.keep();
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, None)?;
    for (name, host) in [("bb", true), ("bb-local", false)] {
        let mut spec = BakeSpec::new(
            Format::Disk,
            images.join(format!("{name}.img")),
            Some(rootfs.clone()),
            artifact("bootlace-init")?,
        );
        spec.all_root = true;
        spec.name = Some(name.to_owned());
        spec.modules = Some(kernel_modules(&[])?);
        if host {
            spec.config.bootstrap.sources = vec![Source::Vsock];
            spec.config.host.address = Some(HostAddress::try_from(format!("vsock:2:{PORT}"))?);
        } else {
            spec.config.bootstrap.sources = vec![Source::Disk];
        }
        bake::bake(&spec, &mut |_| {})?;
    }
    Ok(Fixture { dir, images })
}

/// A bundle of `hostname` in `format` at `out`.
fn bundle_at(dir: &Path, hostname: &str, format: BundleFormat, out: &Path) {
    let src = dir.join(format!("{hostname}.d"));
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("bootlace.toml"), manifest(hostname)).expect("manifest");
    bundle::build(&src, format, "BOOTLACE", 0, out).expect("bundle");
}

/// The spec booting image `name` through the firmware, as `bootlace-vm run --image` does.
fn firmware_spec(images: &Path, name: &str, log: &str) -> (VmSpec, DiskInfo) {
    let chosen = images::choose(images, name, None).expect("choose");
    let mut spec = VmSpec::new("/nonexistent/vmlinuz");
    bootlace_vm::boot_image(&mut spec, &chosen.entry, None).expect("boot_image");
    spec.timeout = Duration::from_secs(240);
    let logs = workspace().join("target/vm-logs");
    std::fs::create_dir_all(&logs).expect("logs");
    spec.console_log = Some(bootlace_vm::console_log_path(&logs, log));
    let args = bootlace_vm::qemu_args(&spec).join(" ");
    assert!(
        !args.contains("-kernel") && !args.contains("-initrd") && !args.contains("-append"),
        "{args}"
    );
    assert!(
        args.contains("-bios") && args.contains("bootindex=0"),
        "{args}"
    );
    (
        spec,
        chosen.entry.meta.disk.clone().expect("a bootable disk"),
    )
}

/// A host agent serving `bundle` on `vdir`, and the events it hears.
fn host_for(vdir: &Path, bundle: Vec<u8>) -> (Arc<Host>, Arc<Mutex<Vec<GuestEvent>>>) {
    std::fs::create_dir_all(vdir).expect("mkdir");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(
        Some(BundleSource::from_bytes(bundle)),
        move |e| sink.lock().expect("lock").push(e),
    ));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), PORT))
        .expect("listen");
    (host, events)
}

fn reports(events: &Mutex<Vec<GuestEvent>>) -> Vec<Frame> {
    events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.clone()),
            _ => None,
        })
        .collect()
}

fn root_partuuid(info: &DiskInfo) -> &str {
    &info
        .partitions
        .iter()
        .find(|p| p.role == "root")
        .expect("root partition")
        .partuuid
}

fn assert_configured(o: &Outcome, info: &DiskInfo, hostname: &str) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(o, 40));
    assert_eq!(
        probe_value(o, "hostname").as_deref(),
        Some(hostname),
        "{}",
        tail(o, 40)
    );
    let found = format!(
        "stage1: root PARTUUID={} is /dev/vda2 (erofs)",
        root_partuuid(info)
    );
    assert!(o.console.contains(&found), "{found}:\n{}", tail(o, 60));
    assert!(
        o.timeline().any(|t| t.contains("ready=")),
        "{}",
        tail(o, 40)
    );
}

#[test]
fn a_busybox_disk_boots_through_uefi_to_ready_with_a_bundle_over_vsock() {
    let f = fixture();
    let dir = f.dir.join("vsock-boot");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let tarball = dir.join("bundle.tar.gz");
    bundle_at(&dir, "disk-vsock", BundleFormat::TarGz, &tarball);
    let bytes = std::fs::read(&tarball).expect("bundle");
    let digest = bootlace_contract::digest::of_bytes(&bytes);
    let vdir = dir.join("vsock");
    let (_host, events) = host_for(&vdir, bytes);
    let (mut spec, info) = firmware_spec(&f.images, "bb", "disk_bb_vsock");
    spec.vsock = Some(VsockSpec::new(vdir));
    // The per-guest trust comes from the VMM, not from the disk.
    spec.oob_digest = Some(OobDigest {
        digest: digest.clone(),
        via: OobVia::Smbios,
    });
    let o = bootlace_vm::run(&spec).expect("run");
    assert_configured(&o, &info, "disk-vsock");
    assert!(
        o.console.contains("bootstrap: the bundle is trusted by"),
        "{}",
        tail(&o, 40)
    );
    let kinds: Vec<Kind> = reports(&events).iter().map(|f| f.kind).collect();
    assert!(kinds.contains(&Kind::Ready), "{kinds:?}\n{}", tail(&o, 40));
}

#[test]
fn a_busybox_disk_boots_through_uefi_to_ready_with_a_bundle_from_a_bundle_disk() {
    let f = fixture();
    let dir = f.dir.join("disk-boot");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let bdisk = dir.join("bundle.erofs");
    bundle_at(&dir, "disk-disk", BundleFormat::DiskErofs, &bdisk);
    let (mut spec, info) = firmware_spec(&f.images, "bb-local", "disk_bb_bundle_disk");
    spec.disks.push(Disk {
        path: bdisk,
        read_only: true,
    });
    let o = bootlace_vm::run(&spec).expect("run");
    assert_configured(&o, &info, "disk-disk");
    // The image file is as baked: booting never writes it.
    images::choose(&f.images, "bb-local", None)
        .expect("choose")
        .entry
        .verify()
        .expect("the image file is unchanged");
}

/// A copy of the fixture's disk with `change` applied to its bytes.
fn damaged_copy(name: &str, change: impl FnOnce(&Path, &DiskInfo)) -> (PathBuf, DiskInfo) {
    let f = fixture();
    let chosen = images::choose(&f.images, "bb", None).expect("choose");
    let info = chosen.entry.meta.disk.clone().expect("disk");
    let copy = f.dir.join(name);
    std::fs::copy(chosen.entry.path(), &copy).expect("copy");
    change(&copy, &info);
    (copy, info)
}

fn boot_raw_disk(path: &Path, log: &str) -> Outcome {
    let mut spec = VmSpec::new("/nonexistent/vmlinuz");
    spec.firmware = Some(bootlace_vm::find_ovmf().expect("OVMF"));
    spec.root_disk = Some(RootDisk {
        path: path.to_owned(),
        format: "raw",
        bootable: true,
        read_only: true,
        snapshot: false,
    });
    spec.timeout = Duration::from_secs(180);
    let logs = workspace().join("target/vm-logs");
    std::fs::create_dir_all(&logs).expect("logs");
    spec.console_log = Some(bootlace_vm::console_log_path(&logs, log));
    bootlace_vm::run(&spec).expect("run")
}

#[test]
fn a_damaged_esp_is_named_when_the_firmware_boots_nothing() {
    let (copy, _) = damaged_copy("damaged-esp.img", |p, info| {
        use std::os::unix::fs::FileExt;
        let esp = &info.partitions[0];
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(p)
            .expect("open");
        // The FAT boot sector, its FSInfo and its backup copy.
        file.write_all_at(&[0u8; 64 * 512], esp.offset)
            .expect("zero");
    });
    let o = boot_raw_disk(&copy, "disk_damaged_esp");
    match &o.end {
        End::NoBoot(why) => {
            assert!(why.contains("found nothing to boot"), "{why}");
            assert!(why.contains("EFI system partition"), "{why}");
        }
        other => panic!(
            "ended {other:?}, not as a firmware that booted nothing:\n{}",
            tail(&o, 30)
        ),
    }
    assert!(o.summary().contains("nothing booted"), "{}", o.summary());
    assert_eq!(o.exit_code(), 123);
}

#[test]
fn a_disk_without_its_root_partition_says_so_from_stage_1() {
    let (copy, info) = damaged_copy("no-root.img", |p, info| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("open");
        let mut head = vec![0u8; 34 * 512];
        file.read_exact_at(&mut head, 0).expect("read");
        let mut t = bootlace_contract::gpt::parse(&head, 512).expect("gpt");
        t.partitions.retain(|p| p.name != "root");
        let (head, tail) = t.write().expect("table");
        file.write_all_at(&head, 0).expect("head");
        file.write_all_at(&tail, info.virtual_size - tail.len() as u64)
            .expect("tail");
    });
    let o = boot_raw_disk(&copy, "disk_no_root_partition");
    let uuid = root_partuuid(&info);
    let line = o
        .console
        .lines()
        .find(|l| l.contains("not found after waiting"))
        .unwrap_or_else(|| panic!("no not-found line:\n{}", tail(&o, 30)));
    assert!(line.contains(&format!("root PARTUUID={uuid}")), "{line}");
    assert!(line.contains("/dev/vda1 (vfat"), "what was seen: {line}");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert!(
        matches!(o.exit_status, Some(s) if s != 0),
        "{}",
        tail(&o, 30)
    );
}

const DEBIAN_PROBE: &str = r#"#!/bin/sh
exec > /dev/console 2>&1
state=$(systemctl is-system-running --wait)
echo "PROBE state=$state"
echo "PROBE pid1=$(cat /proc/1/comm)"
echo "PROBE hostname=$(cat /proc/sys/kernel/hostname)"
echo "PROBE root=$(findmnt -n -o SOURCE,FSTYPE /)"
systemctl poweroff
"#;

const DEBIAN_MANIFEST: &str = r#"version = 1
hostname = "debian-disk"

[[files]]
path = "/etc/bootlace-probe.sh"
source = "probe.sh"
mode = 0o755

[[files]]
path = "/etc/systemd/system/bootlace-probe.service"
content = """
[Unit]
Description=bootlace test probe
[Service]
Type=simple
ExecStart=/etc/bootlace-probe.sh
[Install]
WantedBy=multi-user.target
"""

[[symlinks]]
path = "/etc/systemd/system/multi-user.target.wants/bootlace-probe.service"
target = "/etc/systemd/system/bootlace-probe.service"
"#;

/// The value of `PROBE key=` anywhere in a console line (systemd's messages may share it).
fn probe_anywhere(o: &Outcome, key: &str) -> Option<String> {
    let needle = format!("PROBE {key}=");
    o.console.lines().find_map(|l| {
        let at = l.find(&needle)?;
        Some(l[at + needle.len()..].trim_end_matches('\r').to_owned())
    })
}

#[test]
fn the_debian_root_as_a_disk_boots_systemd_through_uefi() {
    let d = scratch().expect("scratch");
    let images = d.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    let mut cfg = InitConfig::default();
    cfg.handoff.command = Argv::try_from(vec!["/sbin/init".to_owned()]).expect("argv");
    cfg.bootstrap.sources = vec![Source::Vsock];
    cfg.host.address = Some(HostAddress::try_from(format!("vsock:2:{PORT}")).expect("host"));
    cfg.host.trust_host = true;
    let mut spec = BakeSpec::new(
        Format::Disk,
        images.join("debian.qcow2"),
        Some(debian_root().expect("debian root")),
        artifact("bootlace-init").expect("init"),
    );
    spec.config = cfg;
    spec.name = Some("debian-disk".to_owned());
    spec.modules = Some(kernel_modules(&["autofs4"]).expect("modules"));
    spec.disk = DiskOptions {
        fs: bootlace_contract::fs::FsType::Ext4,
        container: Container::Qcow2,
        ..DiskOptions::default()
    };
    bake::bake(&spec, &mut |_| {}).expect("bake the Debian disk");
    let bdir = d.path().join("bundle");
    std::fs::create_dir_all(&bdir).expect("mkdir");
    std::fs::write(bdir.join("bootlace.toml"), DEBIAN_MANIFEST).expect("manifest");
    std::fs::write(bdir.join("probe.sh"), DEBIAN_PROBE).expect("probe");
    let tarball = d.path().join("bundle.tar.gz");
    bundle::build(&bdir, BundleFormat::TarGz, "BOOTLACE", 0, &tarball).expect("bundle");
    let vdir = d.path().join("vsock");
    let (_host, events) = host_for(&vdir, std::fs::read(&tarball).expect("bundle"));
    let (mut vm, info) = firmware_spec(&images, "debian-disk", "disk_debian");
    assert_eq!(info.container, Container::Qcow2);
    vm.memory_mib = 512;
    vm.vsock = Some(VsockSpec::new(vdir));
    let o = bootlace_vm::run(&vm).expect("run");
    let r = reports(&events);
    let ready = r.iter().position(|f| f.kind == Kind::Ready);
    let systemd = r
        .iter()
        .position(|f| f.kind == Kind::Step && f.get("STEP") == Some(SYSTEMD_READY_STEP));
    assert!(
        matches!((ready, systemd), (Some(a), Some(b)) if a < b),
        "READY at {ready:?}, systemd_ready at {systemd:?}\n{}",
        tail(&o, 60)
    );
    assert_eq!(
        probe_anywhere(&o, "pid1").as_deref(),
        Some("systemd"),
        "{}",
        tail(&o, 60)
    );
    assert_eq!(
        probe_anywhere(&o, "state").as_deref(),
        Some("running"),
        "{}",
        tail(&o, 60)
    );
    assert_eq!(
        probe_anywhere(&o, "hostname").as_deref(),
        Some("debian-disk")
    );
    let root = probe_anywhere(&o, "root").unwrap_or_default();
    let root: Vec<&str> = root.split_whitespace().collect();
    assert_eq!(root, ["/dev/vda2", "ext4"], "{}", tail(&o, 60));
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 60));
    assert!(
        !o.console.contains("FAILED"),
        "a [FAILED] line:\n{}",
        tail(&o, 60)
    );
}
