//! VM tests of the host conversation: real guests reach a host agent through
//! vhost-device-vsock (hybrid vsock: the guest's connection to CID 2 port 1024 arrives on
//! `<dir>/vsock_1024`).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Sha256Digest, Source};
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{bake, boot_with, probe_rootfs, probe_value, scratch, tail};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{Disk, End, Outcome};

const MANIFEST: &str = r#"
version = 1
hostname = "vsock-host"
env = { APP_MODE = "from-vsock" }

[[files]]
path = "/etc/app.conf"
source = "files/app.conf"
mode = 0o640

[handoff]
mode = "supervise"
command = ["/bin/sh", "-c", "/sbin/probe; exit 3"]
"#;

const PROBE_SCRIPT: &str = r#"
echo "PROBE appconf=$(cat /etc/app.conf 2>&1)|$(stat -c %a /etc/app.conf 2>&1)"
echo "PROBE secret_on_disk=$(grep -rl CANARY-SECRET /etc /var /root /tmp /run 2>/dev/null | tr '\n' ' ')"
"#;

fn config(sources: &[Source], digest: Option<&str>) -> InitConfig {
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = sources.to_vec();
    c.bootstrap.wait_ms = 3000;
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.digest = digest.map(|d| Sha256Digest::try_from(format!("sha256:{d}")).expect("digest"));
    c.host.connect_timeout_ms = 3000;
    c
}

fn image(dir: &Path, cfg: InitConfig) -> PathBuf {
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, Some(PROBE_SCRIPT)).expect("rootfs");
    let img = dir.join("initrd.img");
    bake(&rootfs, cfg, &img).expect("bake");
    img
}

/// The bundle directory and its tar.gz (bytes, sha256).
fn bundle_tarball(dir: &Path) -> (PathBuf, Vec<u8>, String) {
    let b = dir.join("bundle");
    std::fs::create_dir_all(b.join("files")).expect("mkdir");
    std::fs::write(b.join("bootlace.toml"), MANIFEST).expect("manifest");
    std::fs::write(b.join("files/app.conf"), "from the vsock bundle").expect("file");
    std::fs::write(b.join("files/secret"), "CANARY-SECRET").expect("secret");
    let out = dir.join("bundle.tar.gz");
    let s = bundle::build(&b, BundleFormat::TarGz, "BOOTLACE", 0, &out).expect("bundle");
    (
        b,
        std::fs::read(&out).expect("read"),
        s.sha256.expect("digest"),
    )
}

/// Starts a host agent on `<dir>/vsock_1024`, collecting events.
fn host(dir: &Path, bundle: Option<BundleSource>) -> Arc<Mutex<Vec<GuestEvent>>> {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(bundle, move |e| {
        sink.lock().expect("lock").push(e)
    }));
    host.serve_unix(&hybrid_path(&dir.join("vsock"), 1024))
        .expect("listen");
    events
}

fn reports(events: &Arc<Mutex<Vec<GuestEvent>>>) -> Vec<Frame> {
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

fn boot_vsock(name: &str, img: &Path, vsock_dir: &Path, disks: Vec<Disk>) -> Outcome {
    let dir = vsock_dir.to_owned();
    boot_with(name, img, &[], move |spec| {
        spec.vsock = Some(VsockSpec::new(dir));
        spec.disks = disks;
    })
    .expect("boot")
}

fn probe(o: &Outcome, key: &str) -> String {
    probe_value(o, key).unwrap_or_else(|| panic!("no PROBE {key}:\n{}", tail(o, 40)))
}

#[test]
fn vsock_bundle_end_to_end_and_exit_status() {
    let dir = scratch().expect("scratch");
    let (_, bytes, digest) = bundle_tarball(dir.path());
    let img = image(dir.path(), config(&[Source::Vsock], Some(&digest)));
    let vdir = dir.path().join("vsock");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events = host(&vdir, Some(BundleSource::from_bytes(bytes)));
    let o = boot_vsock("vsock_bundle", &img, &vdir, Vec::new());
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(&o, 40));
    assert_eq!(probe(&o, "hostname"), "vsock-host");
    assert!(probe(&o, "env").contains("APP_MODE=from-vsock"));
    assert_eq!(probe(&o, "appconf"), "from the vsock bundle|640");
    assert_eq!(probe(&o, "bootstrap_dir"), "absent");
    assert!(!probe(&o, "mounts").contains("bootstrap"));
    assert_eq!(
        probe(&o, "secret_on_disk"),
        "",
        "the canary outlived the bootstrap"
    );

    let all = events.lock().expect("lock").clone();
    let hello = all.iter().find_map(|e| match &e.event {
        Event::Hello(f) => Some(f.clone()),
        _ => None,
    });
    let hello = hello.unwrap_or_else(|| panic!("no HELLO: {all:?}"));
    assert_eq!(hello.get("PROTOCOL"), Some("1"));
    assert!(
        hello.get("BOOT_ID").is_some_and(|b| b.len() == 36),
        "{hello:?}"
    );
    assert!(all
        .iter()
        .any(|e| matches!(e.event, Event::BundleSent { .. })));
    let r = reports(&events);
    let steps: Vec<&str> = r
        .iter()
        .filter(|f| f.kind == Kind::Step)
        .filter_map(|f| f.get("STEP"))
        .collect();
    for want in [
        "host",
        "config",
        "modules",
        "bootstrap_found",
        "bootstrap_mounted",
        "manifest_done",
        "cleanup_done",
    ] {
        assert!(steps.contains(&want), "no STEP {want} in {steps:?}");
    }
    let ready = r.iter().find(|f| f.kind == Kind::Ready).expect("READY");
    assert_eq!(ready.get("READY"), Some("1"));
    // READY goes out once the manifest is applied, before the cleanup (docs/boot.md).
    let tl = ready.get("TIMELINE").unwrap_or("");
    assert!(
        tl.contains("manifest_done=") && tl.contains("ready=") && !tl.contains("cleanup_done="),
        "{tl}"
    );
    let exit = r.iter().find(|f| f.kind == Kind::Exit).expect("EXIT");
    assert_eq!(exit.get("EXIT_STATUS"), Some("3"));
    assert!(o.console.contains("bootstrap: fetched"), "{}", tail(&o, 40));
}

#[test]
fn disk_bootstrap_reports_ready_and_bad_digest_fails() {
    let dir = scratch().expect("scratch");
    let (b, bytes, digest) = bundle_tarball(dir.path());

    // A disk-sourced bootstrap still reports READY over vsock.
    let img = image(&dir.path().join("disk"), config(&[Source::Disk], None));
    let disk = dir.path().join("bundle.img");
    bundle::build(&b, BundleFormat::DiskErofs, "BOOTLACE", 0, &disk).expect("disk bundle");
    let vdir = dir.path().join("v1");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events = host(&vdir, None);
    let o = boot_vsock(
        "vsock_disk_ready",
        &img,
        &vdir,
        vec![Disk {
            path: disk,
            read_only: true,
        }],
    );
    assert_eq!(o.exit_status, Some(3), "{}", tail(&o, 40));
    let r = reports(&events);
    assert!(r.iter().any(|f| f.kind == Kind::Ready), "{r:?}");

    // The host serves other bytes than the pinned ones: FAILED with the reason, nothing applied.
    let wrong = "0".repeat(64);
    assert_ne!(wrong, digest);
    let img = image(
        &dir.path().join("pinned"),
        config(&[Source::Vsock], Some(&wrong)),
    );
    let vdir = dir.path().join("v2");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events = host(&vdir, Some(BundleSource::from_bytes(bytes)));
    let o = boot_vsock("vsock_bad_digest", &img, &vdir, Vec::new());
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert_eq!(o.exit_status, Some(71));
    let failed: Vec<Frame> = reports(&events)
        .into_iter()
        .filter(|f| f.kind == Kind::Failed)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let status = failed[0].get("STATUS").unwrap_or("");
    assert!(
        status.contains("bundle digest mismatch") && status.contains("nothing was extracted"),
        "{status}"
    );
    assert!(
        !o.console.contains("manifest:"),
        "something was applied:\n{}",
        tail(&o, 40)
    );
}

#[test]
fn absent_host_gives_up_in_bounded_time() {
    let dir = scratch().expect("scratch");
    let img = image(dir.path(), config(&[], None));
    let vdir = dir.path().join("v");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    // Nobody listens on vsock_1024.
    let o = boot_vsock("vsock_absent", &img, &vdir, Vec::new());
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert_eq!(o.exit_status, Some(71));
    let line: Vec<&str> = o
        .lines_with("bootlace: error: host: host unreachable after")
        .collect();
    assert_eq!(line.len(), 1, "{}", tail(&o, 40));
    // "in N ms": the 3000 ms configured, not the kernel's or the retry loop's own.
    let ms: u64 = line[0]
        .split(" in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("a time");
    // The deadline is checked around each attempt: allow one scheduling slice past it.
    assert!((2500..=3500).contains(&ms), "{}", line[0]);
}

#[test]
fn a_plain_listener_reads_ready() {
    use std::io::Read;
    let dir = scratch().expect("scratch");
    let mut cfg = config(&[], None);
    cfg.host.address = Some(HostAddress::try_from("vsock-notify:2:1024".to_owned()).expect("addr"));
    let img = image(dir.path(), cfg);
    let vdir = dir.path().join("v");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let path = hybrid_path(&vdir.join("vsock"), 1024);
    let (tx, rx) = mpsc::channel();
    // socat: a third-party listener that never answers.
    let mut socat = std::process::Command::new("socat")
        .arg("-u")
        .arg(format!("UNIX-LISTEN:{},fork", path.display()))
        .arg("STDOUT")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("socat (installed by make setup)");
    let mut out = socat.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    for _ in 0..100 {
        if path.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let o = boot_vsock("vsock_socat", &img, &vdir, Vec::new());
    let _ = socat.kill();
    let _ = socat.wait();
    let heard = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("socat output");
    assert_eq!(probe(&o, "pid"), "1", "{}", tail(&o, 40));
    assert!(
        heard.lines().any(|l| l == "READY=1"),
        "socat heard: {heard:?}"
    );
    assert!(
        heard.contains("STATUS=hand-off: exec /sbin/probe"),
        "{heard:?}"
    );
}

/// A host that does what `bootlace-agent wait-ready` does: acks every message, and once it
/// has acked READY it exits — its connection and its listening socket close. Returns the
/// kinds it received (when it has exited).
fn exits_after_ready(dir: &Path) -> mpsc::Receiver<Vec<Kind>> {
    use bootlace_contract::protocol::{read_frame, write_frame, Decoder};
    let path = hybrid_path(&dir.join("vsock"), 1024);
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut kinds = Vec::new();
        'conn: for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let mut dec = Decoder::new();
            while let Ok(f) = read_frame(&mut s, &mut dec) {
                kinds.push(f.kind);
                if write_frame(&mut s, &Frame::new(Kind::Ack, f.seq)).is_err() {
                    continue 'conn;
                }
                if f.kind == Kind::Ready {
                    break 'conn;
                }
            }
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        let _ = tx.send(kinds);
    });
    rx
}

/// The milestone `name` of a guest timeline line (`entry=0.912s … handoff=0.950s`).
fn milestone(timeline: &str, name: &str) -> Option<Duration> {
    timeline.split(' ').find_map(|w| {
        let (k, v) = w.split_once('=')?;
        (k == name)
            .then(|| v.strip_suffix('s')?.parse::<f64>().ok())
            .flatten()
            .map(Duration::from_secs_f64)
    })
}

/// The README's recipe (`bootlace-agent wait-ready`, which exits at READY) must not hold the
/// hand-off: after READY the guest reports `cleanup_done` and, in supervise mode, EXIT to a
/// host that is gone. Before the fix the STEP was retried until `STEP was not acknowledged
/// after 4 tries` and the hand-off came about 30 s after READY.
#[test]
fn hand_off_follows_ready_when_the_host_exits_after_it() {
    let dir = scratch().expect("scratch");
    let (b, _, _) = bundle_tarball(dir.path());
    let mut cfg = config(&[Source::Disk], None);
    // The init's default connect deadline, as a baked image has it.
    cfg.host.connect_timeout_ms = InitConfig::default().host.connect_timeout_ms;
    let img = image(dir.path(), cfg);
    let disk = dir.path().join("bundle.img");
    bundle::build(&b, BundleFormat::DiskErofs, "BOOTLACE", 0, &disk).expect("disk bundle");
    let vdir = dir.path().join("v");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let host = exits_after_ready(&vdir);
    let o = boot_vsock(
        "vsock_host_exits_after_ready",
        &img,
        &vdir,
        vec![Disk {
            path: disk,
            read_only: true,
        }],
    );
    let heard = host
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("the host never heard READY:\n{}", tail(&o, 40)));
    assert!(heard.contains(&Kind::Ready), "{heard:?}");
    // The supervised app ran and its status came through.
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(&o, 40));
    let tl = o
        .timeline()
        .find(|t| t.contains("handoff="))
        .unwrap_or_else(|| panic!("no timeline:\n{}", tail(&o, 40)))
        .to_owned();
    let at = |name| milestone(&tl, name).unwrap_or_else(|| panic!("no {name} in {tl}"));
    let (ready, cleaned, handoff) = (at("ready"), at("cleanup_done"), at("handoff"));
    eprintln!(
        "guest timeline: READY -> hand-off {:?} (cleanup {:?}, then the cleanup_done report \
         {:?}): {tl}",
        handoff - ready,
        cleaned - ready,
        handoff - cleaned
    );
    // A correctness bound, not a benchmark: the unmount and a report to a gone host, in a TCG
    // guest on a loaded machine.
    assert!(
        handoff - ready < Duration::from_secs(1),
        "hand-off {:?} after READY: {tl}\n{}",
        handoff - ready,
        tail(&o, 40)
    );
    assert!(
        !o.console.contains("was not acknowledged"),
        "{}",
        tail(&o, 40)
    );
}
