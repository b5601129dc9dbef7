//! A vsock bundle never takes the guest down: whatever its size and what it unpacks to, the
//! guest refuses what its memory cannot hold — naming the limit and the memory — before the OOM
//! killer or a kernel panic can happen, and a bundle that fits unpacks without holding the
//! tarball and its files whole at once.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Sha256Digest, Source};
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_tests::{bake, boot_with, probe_rootfs, scratch, tail};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{End, Outcome};

const MANIFEST: &str = "version = 1\n[handoff]\nmode = \"supervise\"\ncommand = [\"/bin/true\"]\n";

/// A plain tar (bytes) of `bootlace.toml` and one file of `size` bytes: `fill` says how
/// compressible (every 4 KiB: `fill` pseudo-random bytes, then zeros).
fn tar_with(size: u64, fill: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(MANIFEST.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "bootlace.toml", MANIFEST.as_bytes())
        .expect("manifest");
    let mut data = vec![0u8; usize::try_from(size).expect("size")];
    let mut x: u32 = 0x1234_5678;
    for chunk in data.chunks_mut(4096) {
        for byte in chunk.iter_mut().take(fill) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    b.append_data(&mut h, "files/big", &data[..]).expect("big");
    // A setuid file: unpacked without the bit, and counted in the log.
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o4755);
    h.set_size(2);
    h.set_cksum();
    b.append_data(&mut h, "files/suid", &b"#!"[..])
        .expect("suid");
    b.into_inner().expect("tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

struct Run {
    outcome: Outcome,
    reports: Vec<Frame>,
}

/// Boots a guest of `memory_mib` that fetches `bundle` (pinned) over vsock.
fn boot_bundle(name: &str, memory_mib: u32, bundle: Vec<u8>) -> Run {
    let dir = scratch().expect("scratch");
    let digest = bootlace_contract::digest::of_bytes(&bundle);
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.digest = Some(Sha256Digest::try_from(digest.to_string()).expect("digest"));
    let rootfs = dir.path().join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let img = dir.path().join("initrd.img");
    bake(&rootfs, c, &img).expect("bake");
    let vdir: PathBuf = dir.path().join("vsock");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(
        Some(BundleSource::from_bytes(bundle)),
        move |e| sink.lock().expect("lock").push(e),
    ));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))
        .expect("listen");
    let outcome = boot_with(name, &img, &[], |spec| {
        spec.vsock = Some(VsockSpec::new(vdir.clone()));
        spec.memory_mib = memory_mib;
    })
    .expect("boot");
    let reports = events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    Run { outcome, reports }
}

fn failed(r: &Run) -> &Frame {
    r.reports
        .iter()
        .find(|f| f.kind == Kind::Failed)
        .unwrap_or_else(|| panic!("no FAILED: {:?}\n{}", r.reports, tail(&r.outcome, 40)))
}

/// The guest ended cleanly: powered off, no panic, no OOM killer.
fn clean(o: &Outcome) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    for bad in [
        "Kernel panic",
        "Out of memory",
        "oom-kill",
        "deadlocked on memory",
    ] {
        assert!(!o.console.contains(bad), "{bad}:\n{}", tail(o, 60));
    }
}

#[test]
fn a_bundle_announced_larger_than_the_guest_holds_is_refused_before_a_byte_is_stored() {
    // 200 MiB does not fit in a 256 MiB guest (the documented cap is 256 MiB).
    let r = boot_bundle("mem_announced", 256, tar_with(200 << 20, 0));
    clean(&r.outcome);
    assert_eq!(r.outcome.exit_status, Some(71), "{}", tail(&r.outcome, 40));
    let f = failed(&r);
    let status = f.get("STATUS").unwrap_or("");
    assert!(
        status.contains("the host announces a bundle of 2097")
            && status.contains("bytes: more than the ")
            && status.contains("bytes this guest holds for a bundle and its files")
            && status.contains("MemAvailable")
            && status.contains("host.max_bundle_bytes 268435456"),
        "{status}"
    );
    assert!(
        !r.outcome.console.contains("bootstrap: fetched"),
        "{}",
        tail(&r.outcome, 30)
    );
}

#[test]
fn a_small_bundle_that_unpacks_past_the_guests_memory_stops_cleanly() {
    // A 5-ish MB gzip that unpacks to 190 MB (ratio about 38, under the ratio cap).
    let bundle = gzip(&tar_with(190 << 20, 100));
    assert!(bundle.len() < 8 << 20, "{}", bundle.len());
    let r = boot_bundle("mem_unpack", 256, bundle);
    clean(&r.outcome);
    assert_eq!(r.outcome.exit_status, Some(71), "{}", tail(&r.outcome, 40));
    let status = failed(&r).get("STATUS").unwrap_or("").to_owned();
    assert!(
        status.contains("the bundle unpacks to more than the ")
            && status.contains("bytes this guest holds for a bundle and its files")
            && status.contains("MemAvailable"),
        "{status}"
    );
    assert!(failed(&r).get("MEM_PEAK_KB").is_some());
}

#[test]
fn a_plain_tar_that_fits_is_unpacked_without_holding_it_twice() {
    // 90 MB plain: held whole twice (the tarball, then its files) it would not fit beside the
    // reserve in a 256 MiB guest; given back as it is read, it does.
    let r = boot_bundle("mem_fits", 256, tar_with(90 << 20, 4096));
    clean(&r.outcome);
    assert_eq!(r.outcome.exit_status, Some(0), "{}", tail(&r.outcome, 40));
    let ready = r
        .reports
        .iter()
        .find(|f| f.kind == Kind::Ready)
        .expect("READY");
    let total: u64 = ready
        .get("MEM_TOTAL_KB")
        .and_then(|v| v.parse().ok())
        .expect("total");
    let peak: u64 = ready
        .get("MEM_PEAK_KB")
        .and_then(|v| v.parse().ok())
        .expect("peak");
    eprintln!("90 MB plain tar in a 256 MiB guest: peak {peak} KiB of {total} KiB");
    assert!(peak < total, "{peak} of {total}");
    // docs/security.md: setuid, setgid and sticky bits are stripped, and counted.
    assert!(
        r.outcome
            .console
            .contains("3 entries (94371907 bytes) into a tmpfs on /.bootstrap; 1 setuid, setgid or sticky bits stripped"),
        "{}",
        tail(&r.outcome, 30)
    );
}

#[test]
fn a_truncated_initramfs_is_reported_not_booted() {
    // The padding sorts after the init (var/ after sbin/), so the kernel still finds the init
    // after it ran out of memory unpacking: the init must notice and stop.
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let mut pad = vec![0u8; 120 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in pad.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::create_dir_all(rootfs.join("var")).expect("mkdir");
    std::fs::write(rootfs.join("var/pad"), &pad).expect("pad");
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    let img = dir.path().join("initrd.img");
    bake(&rootfs, c, &img).expect("bake");
    let o = boot_with("mem_truncated_initramfs", &img, &[], |spec| {
        spec.memory_mib = 256;
    })
    .expect("boot");
    assert!(
        o.console.contains("Initramfs unpacking failed"),
        "the kernel unpacked it whole: no test\n{}",
        tail(&o, 40)
    );
    clean(&o);
    assert_eq!(o.exit_status, Some(71), "{}", tail(&o, 40));
    assert!(
        o.console
            .contains("the initramfs was not unpacked whole (Initramfs unpacking failed"),
        "{}",
        tail(&o, 40)
    );
    assert!(
        !o.console.contains("PROBE"),
        "the probe ran on a truncated root"
    );
}
