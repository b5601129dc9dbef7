//! VM test of a newer init taking over at boot (the manifest's `[init]`): one baked image
//! (bootlace-init VERSION), bundles served over hybrid vsock by an in-process host agent and
//! trusted by a digest given out of band over SMBIOS.
//! - The host carries `bootlace-init-next` (the same source built as VERSION+next) in the
//!   guest's bundle, as a fleet's `init = …` does (`fleet::compose_with`): the running init copies it out checking its sha256, runs its self-check, hands PID 1 over; the
//!   newer one says HELLO again with the same boot id and `TAKEOVER_FROM`, numbers its reports
//!   after the previous init's, applies the manifest, reports READY with the whole timeline
//!   and supervises the application — the host sees INIT_VERSION change.
//! - The bundle carries a damaged init (cut short, with the sha256 of those bytes): its
//!   self-check fails, the step `init_takeover` is reported failed, and the running init goes
//!   on to READY itself.
//!
//! The two boots run side by side.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Source};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{artifact, bake, boot_with, probe_rootfs, probe_value, scratch, tail};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{End, OobDigest, OobVia, Outcome};

/// The image: the vsock source and a host; bundles trusted by a digest given at boot.
fn image(dir: &Path) -> PathBuf {
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.connect_timeout_ms = 3000;
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let img = dir.join("initrd.img");
    bake(&rootfs, c, &img).expect("bake");
    img
}

/// A bundle carrying `init` (its bytes) as `[init]`; its tarball and digest.
fn bundle_with_init(dir: &Path, name: &str, init: &[u8]) -> (Vec<u8>, Sha256Digest) {
    let b = dir.join(name);
    std::fs::create_dir_all(&b).expect("mkdir");
    std::fs::write(b.join("bootlace-init"), init).expect("init");
    let manifest = format!(
        r#"
version = 1
hostname = "taken-over"

[init]
path = "bootlace-init"
sha256 = "{}"

[handoff]
mode = "supervise"
command = ["/bin/sh", "-c", "/sbin/probe; exit 3"]
"#,
        bootlace_contract::digest::of_bytes(init)
    );
    std::fs::write(b.join("bootlace.toml"), manifest).expect("manifest");
    let out = dir.join(format!("{name}.tar.gz"));
    let s = bundle::build(&b, BundleFormat::TarGz, "BOOTLACE", 0, &out).expect("bundle");
    let digest = format!("sha256:{}", s.sha256.expect("digest"))
        .parse()
        .expect("digest");
    (std::fs::read(&out).expect("read"), digest)
}

/// Boots `img` against a host agent serving `bundle` (its digest given over SMBIOS); the
/// outcome and every event the host saw.
fn boot(
    name: &str,
    img: &Path,
    dir: &Path,
    bundle: (Vec<u8>, Sha256Digest),
) -> (Outcome, Vec<Event>) {
    let vdir = dir.join(name);
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(
        Some(BundleSource::from_bytes(bundle.0)),
        move |e| sink.lock().expect("lock").push(e),
    ));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))
        .expect("listen");
    let o = boot_with(name, img, &[], move |spec| {
        spec.vsock = Some(VsockSpec::new(vdir));
        spec.oob_digest = Some(OobDigest {
            digest: bundle.1,
            via: OobVia::Smbios,
        });
    })
    .expect("boot");
    let events = events
        .lock()
        .expect("lock")
        .iter()
        .map(|e| e.event.clone())
        .collect();
    (o, events)
}

fn hellos(events: &[Event]) -> Vec<&Frame> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Hello(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn reports(events: &[Event]) -> Vec<&Frame> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Report(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn step<'a>(reports: &[&'a Frame], name: &str) -> Vec<&'a Frame> {
    reports
        .iter()
        .copied()
        .filter(|f| f.kind == Kind::Step && f.get("STEP") == Some(name))
        .collect()
}

/// The bundle was applied and the application ran under whichever init.
fn assert_applied(o: &Outcome) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(o, 40));
    assert_eq!(
        probe_value(o, "hostname").as_deref(),
        Some("taken-over"),
        "{}",
        tail(o, 40)
    );
}

/// Seconds of a `name=S.mmms` stamp in a timeline.
fn stamp(timeline: &str, name: &str) -> f64 {
    timeline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|s| s.trim_end_matches('s').parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {timeline}"))
}

fn check_takeover(o: &Outcome, events: &[Event], old: &str, new: &str) {
    assert_applied(o);
    assert!(
        o.console
            .contains(&format!("init: handing PID 1 over to bootlace-init {new}")),
        "{}",
        tail(o, 60)
    );
    assert!(
        o.console.contains(&format!(
            "bootlace-init {new} took over PID 1 from bootlace-init {old}"
        )),
        "{}",
        tail(o, 60)
    );
    // The host saw INIT_VERSION change within one boot.
    let hellos = hellos(events);
    assert_eq!(hellos.len(), 2, "{hellos:?}");
    assert_eq!(hellos[0].get("INIT_VERSION"), Some(old));
    assert_eq!(hellos[1].get("INIT_VERSION"), Some(new));
    assert_eq!(hellos[1].get("TAKEOVER_FROM"), Some(old));
    assert_eq!(hellos[0].get("BOOT_ID"), hellos[1].get("BOOT_ID"));
    // One session: every report once, numbered on from the previous init's.
    let reports = reports(events);
    let seqs: Vec<u64> = reports.iter().map(|f| f.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let handover = step(&reports, "init_handover");
    assert_eq!(handover.len(), 1, "{reports:?}");
    assert_eq!(handover[0].get("NEXT_VERSION"), Some(new));
    let took = step(&reports, "init_takeover");
    assert_eq!(took.len(), 1, "{reports:?}");
    assert_eq!(took[0].get("STATE"), Some("finished"));
    assert_eq!(took[0].get("FROM_VERSION"), Some(old));
    // READY once, from the newer init, after its HELLO, with the whole timeline.
    let hello_at = events
        .iter()
        .rposition(|e| matches!(e, Event::Hello(_)))
        .expect("hello");
    let ready_at = events
        .iter()
        .position(|e| matches!(e, Event::Report(f) if f.kind == Kind::Ready))
        .expect("READY");
    assert!(hello_at < ready_at);
    let ready: Vec<&&Frame> = reports.iter().filter(|f| f.kind == Kind::Ready).collect();
    assert_eq!(ready.len(), 1);
    let timeline = ready[0].get("TIMELINE").expect("timeline");
    let (mounted, handed, entered) = (
        stamp(timeline, "bootstrap_mounted"),
        stamp(timeline, "init_handover"),
        stamp(timeline, "init_takeover"),
    );
    assert!(stamp(timeline, "entry") < mounted && mounted <= handed && handed <= entered);
    eprintln!(
        "takeover: the newer init arrived (bootstrap mounted) at {mounted:.3} s, was handed PID 1 \
         at {handed:.3} s, entered at {entered:.3} s: {:.0} ms from arrival to its first line",
        (entered - mounted) * 1000.0
    );
    // Nothing of the takeover is left on /run, and the bootstrap is gone.
    assert!(
        !o.console.contains("init takeover: remove"),
        "{}",
        tail(o, 60)
    );
}

fn check_fallback(o: &Outcome, events: &[Event], old: &str) {
    assert_applied(o);
    let hellos = hellos(events);
    assert_eq!(hellos.len(), 1, "{hellos:?}");
    assert_eq!(hellos[0].get("INIT_VERSION"), Some(old));
    let reports = reports(events);
    let failed = step(&reports, "init_takeover");
    assert_eq!(failed.len(), 1, "{reports:?}");
    assert_eq!(failed[0].get("STATE"), Some("failed"));
    let why = failed[0].get("STATUS").unwrap_or("");
    assert!(
        why.contains("init takeover: the self-check of /run/bootlace/init.next failed"),
        "{why}"
    );
    assert!(
        o.console
            .contains(&format!("{why}; bootlace-init {old} goes on")),
        "{}",
        tail(o, 60)
    );
    assert!(step(&reports, "init_handover").is_empty());
    assert!(
        !reports.iter().any(|f| f.kind == Kind::Failed),
        "{reports:?}"
    );
    assert_eq!(reports.iter().filter(|f| f.kind == Kind::Ready).count(), 1);
}

#[test]
fn a_newer_init_from_the_bundle_takes_over_and_a_damaged_one_is_not_run() {
    let dir = scratch().expect("scratch");
    let img = image(dir.path());
    let old = bootlace_init::VERSION.to_owned();
    let new = format!("{old}+next");
    let next_path = artifact("bootlace-init-next").expect("artifact");
    let next = std::fs::read(&next_path).expect("read");
    let composed = bootlace_agent::fleet::compose_with(
        None,
        &bootlace_agent::fleet::Customize {
            hostname: Some("taken-over".to_owned()),
            command: Some(vec![
                "/bin/sh".to_owned(),
                "-c".to_owned(),
                "/sbin/probe; exit 3".to_owned(),
            ]),
            init: Some(next_path),
            ..Default::default()
        },
    )
    .expect("compose");
    let digest = bootlace_contract::digest::of_bytes(&composed.bytes);
    let taking = (composed.bytes.as_ref().clone(), digest);
    let damaged = bundle_with_init(dir.path(), "damaged", &next[..next.len() / 3]);
    let d = dir.path().to_owned();
    let img2 = img.clone();
    let fallback = std::thread::spawn(move || boot("takeover_damaged", &img2, &d, damaged));
    let (o, events) = boot("takeover", &img, dir.path(), taking);
    check_takeover(&o, &events, &old, &new);
    let (o, events) = fallback.join().expect("fallback boot");
    check_fallback(&o, &events, &old);
}
