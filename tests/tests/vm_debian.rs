//! A real distribution behind bootlace: a Debian bookworm root made by debootstrap (minbase,
//! systemd-sysv, udev, dbus; `scripts/debian-root.sh`, cached under target/debian), baked as
//! erofs and ext4 with bootlace-init handing off to systemd, booted by name through a stage-1
//! initramfs with a bundle fetched over vsock (digest-pinned) from a host agent. A service the
//! manifest installs waits until systemd says the system is running, prints what it sees, and
//! powers off:
//!
//! - systemd is PID 1, the system is `running` with no failed unit, and systemd loaded autofs4
//!   from the image's module indexes (no "Failed to find module"); the manifest loaded `dummy`,
//!   a module of the image's own that the bake never listed;
//! - the manifest's host name, file and environment are what the service sees;
//! - each guest has its own machine ID (D-Bus's copy too): two SMBIOS UUIDs, two IDs, one UUID
//!   booted twice, one ID; never the one the image ships;
//! - the host heard bootlace's READY, then systemd's readiness (`STEP systemd_ready`, relayed
//!   from systemd's NOTIFY_SOCKET after the hand-off);
//! - the power-off is clean: no `[FAILED]` line on the console, from boot to power-off.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{
    Command as Argv, HostAddress, InitConfig, Sha256Digest, Source, Stage1,
};
use bootlace_contract::protocol::{Frame, Kind, SYSTEMD_READY_STEP};
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{
    artifact, bake_stage1, debian_root, kernel_modules, scratch, tail, test_kernel, workspace,
};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{images, Outcome, VmSpec};

const PROBE: &str = r#"#!/bin/sh
exec > /dev/console 2>&1
state=$(systemctl is-system-running --wait)
echo "PROBE state=$state"
echo "PROBE failed=$(systemctl --failed --no-legend --plain | wc -l)"
echo "PROBE pid1=$(cat /proc/1/comm)"
echo "PROBE hostname=$(cat /proc/sys/kernel/hostname)"
echo "PROBE etc_hostname=$(cat /etc/hostname)"
echo "PROBE machine_id=$(cat /etc/machine-id)"
echo "PROBE dbus_id=$(cat /var/lib/dbus/machine-id)"
echo "PROBE env=$APP_MODE"
echo "PROBE file=$(cat /etc/app.conf)"
echo "PROBE autofs4=$(grep -c '^autofs4 ' /proc/modules)"
echo "PROBE dummy=$(grep -c '^dummy ' /proc/modules)"
echo "PROBE done"
systemctl poweroff
"#;

const MANIFEST: &str = r#"version = 1
hostname = "guest-1"
modules = ["dummy"]

[env]
APP_MODE = "production"

[[files]]
path = "/etc/app.conf"
content = "from the manifest\n"

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

struct Fixture {
    dir: PathBuf,
    images: PathBuf,
    /// The bundle (tar.gz) the host serves.
    bundle: Vec<u8>,
    /// The machine ID the image ships.
    shipped_id: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| make_fixture().expect("the Debian images"))
}

/// The Debian root with a kernel module of its own that no bake lists (`dummy`, with the
/// image's own `modules.dep`): a copy, so the cached root stays as debootstrap made it.
fn root_with_a_module(dir: &Path, release: &str) -> Result<PathBuf> {
    let root = dir.join("root");
    let cp = Command::new("cp")
        .arg("-a")
        .arg(debian_root()?)
        .arg(&root)
        .status()?;
    anyhow::ensure!(cp.success(), "cp -a the Debian root");
    let mods = root.join(format!("usr/lib/modules/{release}"));
    std::fs::create_dir_all(mods.join("kernel/drivers/net"))?;
    std::fs::copy(
        format!("/lib/modules/{release}/kernel/drivers/net/dummy.ko"),
        mods.join("kernel/drivers/net/dummy.ko"),
    )?;
    std::fs::write(mods.join("modules.dep"), "kernel/drivers/net/dummy.ko:\n")?;
    Ok(root)
}

fn make_fixture() -> Result<Fixture> {
    let debian = debian_root()?;
    let shipped_id = std::fs::read_to_string(debian.join("etc/machine-id"))?
        .trim()
        .to_owned();
    // Kept for the whole run.
    let dir = scratch()?.keep();
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let k = test_kernel()?;
    let root = root_with_a_module(&dir, &k.release)?;
    bake_stage1(&images, Stage1::default())?;
    let bundle_dir = dir.join("bundle");
    std::fs::create_dir_all(&bundle_dir)?;
    std::fs::write(bundle_dir.join("bootlace.toml"), MANIFEST)?;
    std::fs::write(bundle_dir.join("probe.sh"), PROBE)?;
    let tarball = dir.join("bundle.tar.gz");
    bundle::build(&bundle_dir, BundleFormat::TarGz, "BOOTLACE", 0, &tarball)?;
    let bundle = std::fs::read(&tarball)?;
    let mut cfg = InitConfig::default();
    cfg.handoff.command = Argv::try_from(vec!["/sbin/init".to_owned()])?;
    cfg.bootstrap.sources = vec![Source::Vsock];
    cfg.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned())?);
    cfg.host.digest = Some(Sha256Digest::try_from(
        bootlace_contract::digest::of_bytes(&bundle).to_string(),
    )?);
    for (format, file) in [
        (Format::Erofs, "debian.erofs"),
        (Format::Ext4, "debian.ext4"),
    ] {
        let name = format!("debian-{format}");
        let mut spec = BakeSpec::new(
            format,
            images.join(file),
            Some(root.clone()),
            artifact("bootlace-init")?,
        );
        spec.config = cfg.clone();
        spec.name = Some(name.clone());
        // systemd loads autofs4 itself: through the image's binary module indexes.
        spec.modules = Some(kernel_modules(&["autofs4"])?);
        bake::bake(&spec, &mut |_| {}).with_context(|| format!("bake {name}"))?;
    }
    Ok(Fixture {
        dir,
        images,
        bundle,
        shipped_id,
    })
}

/// A boot: the console, and the reports the host heard.
struct Run {
    o: Outcome,
    reports: Vec<Frame>,
}

/// Boots `name` as the VM whose SMBIOS UUID is `uuid`, a host agent serving the bundle.
fn boot(name: &str, uuid: &str, log: &str) -> Result<Run> {
    let f = fixture();
    let vdir = f.dir.join(format!("vsock-{log}"));
    std::fs::create_dir_all(&vdir)?;
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(
        Some(BundleSource::from_bytes(f.bundle.clone())),
        move |e| sink.lock().expect("lock").push(e),
    ));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))?;
    let chosen = images::choose(&f.images, name, None)?;
    let mut spec = VmSpec::new(test_kernel()?.image);
    let stage1 = images::stage1(&f.images)?.path();
    bootlace_vm::boot_image(&mut spec, &chosen.entry, Some(&stage1))?;
    spec.memory_mib = 512;
    spec.timeout = Duration::from_secs(240);
    spec.uuid = Some(uuid.parse()?);
    spec.vsock = Some(VsockSpec::new(vdir.clone()));
    let logs = workspace().join("target/vm-logs");
    std::fs::create_dir_all(&logs)?;
    spec.console_log = Some(bootlace_vm::console_log_path(&logs, log));
    let o = bootlace_vm::run(&spec)?;
    let reports = events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    Ok(Run { o, reports })
}

/// The value of `PROBE key=` anywhere in a console line.
fn probe(o: &Outcome, key: &str) -> String {
    let needle = format!("PROBE {key}=");
    o.console
        .lines()
        .find_map(|l| {
            let at = l.find(&needle)?;
            Some(l[at + needle.len()..].trim_end_matches('\r').to_owned())
        })
        .unwrap_or_else(|| panic!("no PROBE {key}:\n{}", tail(o, 60)))
}

/// What every boot of the Debian root must show.
fn assert_clean_systemd_boot(r: &Run) {
    let o = &r.o;
    // The host heard bootlace's READY, then systemd's.
    let ready = r.reports.iter().position(|f| f.kind == Kind::Ready);
    let systemd = r
        .reports
        .iter()
        .position(|f| f.kind == Kind::Step && f.get("STEP") == Some(SYSTEMD_READY_STEP));
    assert!(
        matches!((ready, systemd), (Some(a), Some(b)) if a < b),
        "READY at {ready:?}, systemd_ready at {systemd:?}: {:?}\n{}",
        r.reports.iter().map(|f| f.kind).collect::<Vec<_>>(),
        tail(o, 60)
    );
    assert_eq!(probe(o, "pid1"), "systemd", "{}", tail(o, 60));
    assert_eq!(probe(o, "state"), "running", "{}", tail(o, 60));
    assert_eq!(probe(o, "failed"), "0");
    assert_eq!(probe(o, "hostname"), "guest-1");
    assert_eq!(probe(o, "etc_hostname"), "guest-1");
    assert_eq!(probe(o, "env"), "production");
    assert_eq!(probe(o, "file"), "from the manifest");
    assert_eq!(probe(o, "autofs4"), "1");
    // The manifest loaded a module the image has and the bake never listed.
    assert_eq!(probe(o, "dummy"), "1");
    assert!(
        !o.console.contains("Failed to find module"),
        "{}",
        tail(o, 60)
    );
    assert_eq!(probe(o, "dbus_id"), probe(o, "machine_id"));
    assert_ne!(probe(o, "machine_id"), fixture().shipped_id);
    assert!(
        !o.console.contains("FAILED"),
        "a [FAILED] line:\n{}",
        tail(o, 60)
    );
    assert_eq!(o.end, bootlace_vm::End::PoweredOff, "{}", tail(o, 60));
}

const UUID_A: &str = "0a0a0a0a-1111-4222-8333-444444444444";
const UUID_B: &str = "0b0b0b0b-1111-4222-8333-444444444444";

#[test]
fn debian_on_erofs_boots_systemd_with_a_per_guest_identity() {
    let a = boot("debian-erofs", UUID_A, "debian-erofs-a").expect("boot");
    assert_clean_systemd_boot(&a);
    assert_eq!(probe(&a.o, "machine_id"), UUID_A.replace('-', ""));
    assert!(a.o.console.contains("root: writable: overlay on /var"));
    // Another guest of the same image: another machine ID.
    let b = boot("debian-erofs", UUID_B, "debian-erofs-b").expect("boot");
    assert_clean_systemd_boot(&b);
    assert_ne!(probe(&a.o, "machine_id"), probe(&b.o, "machine_id"));
    // The first guest again: its own ID again.
    let again = boot("debian-erofs", UUID_A, "debian-erofs-a2").expect("boot");
    assert_clean_systemd_boot(&again);
    assert_eq!(probe(&again.o, "machine_id"), probe(&a.o, "machine_id"));
}

#[test]
fn debian_on_ext4_boots_systemd_read_write() {
    let r = boot("debian-ext4", UUID_A, "debian-ext4").expect("boot");
    assert_clean_systemd_boot(&r);
    assert!(
        r.o.console
            .contains("(the image's [root] read_only = false)"),
        "{}",
        tail(&r.o, 60)
    );
    assert_eq!(probe(&r.o, "machine_id"), UUID_A.replace('-', ""));
}

#[test]
fn the_root_is_debians_own() {
    let root = debian_root().expect("root");
    for want in [
        "usr/lib/systemd/systemd",
        "usr/bin/dbus-daemon",
        "etc/debian_version",
    ] {
        assert!(Path::new(&root).join(want).exists(), "{want} missing");
    }
}
