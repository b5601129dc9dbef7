//! Guest client against the host agent over real hybrid-vsock Unix sockets, with faults.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bootlace_agent::client::{
    AfterReadyError, Client, ClientError, Connector, Retry, FINAL_ACK_WAIT,
};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, Faults, GuestEvent, Host};
use bootlace_contract::protocol::{read_frame, write_frame, Decoder, Frame, Kind};

fn start(
    dir: &Path,
    bundle: Option<BundleSource>,
    faults: Faults,
) -> (PathBuf, mpsc::Receiver<GuestEvent>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let host = Arc::new(
        Host::new(bundle, move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .with_faults(faults),
    );
    let path = hybrid_path(&dir.join("vm.vsock"), 1024);
    host.serve_unix(&path).expect("listen");
    (path, rx)
}

fn connector(path: PathBuf) -> Connector {
    Box::new(move |_left| {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(Box::new(s) as Box<dyn bootlace_agent::client::Stream>)
    })
}

fn hello() -> Vec<(&'static str, String)> {
    vec![
        ("BOOT_ID", "boot-1".to_owned()),
        ("INSTANCE_ID", "i-1".to_owned()),
    ]
}

fn quick() -> Retry {
    Retry {
        give_up_after: Duration::from_millis(800),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        resends: 2,
        acks: true,
    }
}

fn reports(rx: &mpsc::Receiver<GuestEvent>) -> Vec<Kind> {
    let mut out = Vec::new();
    while let Ok(e) = rx.recv_timeout(Duration::from_millis(300)) {
        if let Event::Report(f) = e.event {
            out.push(f.kind);
        }
    }
    out
}

#[test]
fn hello_steps_bundle_ready() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (path, rx) = start(
        dir.path(),
        Some(BundleSource::from_bytes(bytes.clone())),
        Faults::default(),
    );
    let mut c = Client::connect(connector(path.clone()), &hello(), quick()).expect("connect");
    let mut got = Vec::new();
    let r = c.fetch_bundle(&mut got, 1 << 20).expect("bundle");
    assert_eq!(got, bytes);
    assert_eq!(
        r.sha256,
        bootlace_contract::digest::of_bytes(&bytes).hex().to_owned()
    );
    c.send(
        Kind::Step,
        &[("STEP", "bootstrap".into()), ("STATE", "finished".into())],
    )
    .expect("step");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("ready");
    let events: Vec<GuestEvent> =
        std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(300)).ok()).collect();
    assert!(events.iter().all(|e| e.guest == path.display().to_string()));
    let hello = events.iter().find_map(|e| match &e.event {
        Event::Hello(f) => Some(f.clone()),
        _ => None,
    });
    assert_eq!(
        hello
            .and_then(|f| f.get("BOOT_ID").map(str::to_owned))
            .as_deref(),
        Some("boot-1")
    );
    assert!(events
        .iter()
        .any(|e| matches!(e.event, Event::BundleSent { bytes: 300_000, .. })));
    let kinds: Vec<Kind> = events
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.kind),
            _ => None,
        })
        .collect();
    assert_eq!(kinds, [Kind::Step, Kind::Ready]);
}

#[test]
fn bundle_faults_are_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = vec![7u8; 100_000];
    let cases: Vec<(Faults, &str)> = vec![
        (
            Faults {
                corrupt_bundle: true,
                ..Faults::default()
            },
            "corrupted in transit",
        ),
        (
            Faults {
                drop_bundle_after: Some(5000),
                ..Faults::default()
            },
            "bundle transfer",
        ),
    ];
    for (i, (faults, want)) in cases.into_iter().enumerate() {
        let sub = dir.path().join(i.to_string());
        std::fs::create_dir_all(&sub).expect("mkdir");
        let (path, _rx) = start(&sub, Some(BundleSource::from_bytes(bytes.clone())), faults);
        let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
        let err = c.fetch_bundle(&mut Vec::new(), 1 << 20).expect_err(want);
        assert!(err.to_string().contains(want), "{err}");
    }
    // Over the guest's size cap: refused before any byte is stored.
    let sub = dir.path().join("x");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let (path, _rx) = start(
        &sub,
        Some(BundleSource::from_bytes(bytes)),
        Faults::default(),
    );
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    let mut sink = Vec::new();
    let err = c.fetch_bundle(&mut sink, 1000).expect_err("too large");
    assert!(
        matches!(
            err,
            ClientError::BundleTooLarge {
                size: 100_000,
                max: 1000
            }
        ),
        "{err}"
    );
    assert!(sink.is_empty());
}

#[test]
fn no_bundle_and_absent_or_silent_hosts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _rx) = start(dir.path(), None, Faults::default());
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    let err = c.fetch_bundle(&mut Vec::new(), 1 << 20).expect_err("none");
    assert!(err.to_string().contains("no bundle"), "{err}");

    // Nobody listening: bounded retries, then a clear error.
    let started = Instant::now();
    let err = Client::connect(connector(dir.path().join("absent_1024")), &hello(), quick())
        .expect_err("absent");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().starts_with("host unreachable after"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));

    // A host that accepts but never answers: the per-read timeout fires, bounded tries.
    let sub = dir.path().join("silent");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let (path, _rx) = start(
        &sub,
        None,
        Faults {
            stall_acks: true,
            ..Faults::default()
        },
    );
    let err = Client::connect(connector(path), &hello(), quick()).expect_err("silent");
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
}

#[test]
fn duplicates_are_dropped_and_garbage_does_not_hurt_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, rx) = start(dir.path(), None, Faults::default());
    // A raw client that sends READY twice with the same sequence number (a resend after a
    // lost ack): the host acks both, reports once.
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"BL1 HELLO 0 15\nBOOT_ID=boot-9\n")
        .expect("hello");
    s.write_all(b"BL1 READY 1 8\nREADY=1\nBL1 READY 1 8\nREADY=1\n")
        .expect("ready x2");
    let mut buf = [0u8; 64];
    let mut acks = Vec::new();
    while acks.windows(3).filter(|w| w == b"ACK").count() < 3 {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0);
        acks.extend_from_slice(&buf[..n]);
    }
    drop(s);
    // Garbage and a 4 GiB length prefix on other connections.
    for junk in [&b"\x00\x01\x02 garbage\n"[..], b"BL1 BUNDLE 1 4294967296\n"] {
        let mut g = UnixStream::connect(&path).expect("connect");
        g.write_all(junk).expect("write");
        let mut sink = Vec::new();
        let _ = g.read_to_end(&mut sink);
    }
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("still serving");
    c.send(Kind::Exit, &[("EXIT_STATUS", "3".into())])
        .expect("exit");
    let kinds = reports(&rx);
    assert_eq!(kinds, [Kind::Ready, Kind::Exit]);
}

#[test]
fn notify_mode_talks_to_a_plain_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain_1024");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        text
    });
    let retry = Retry {
        acks: false,
        ..quick()
    };
    let mut c = Client::connect(connector(path), &hello(), retry).expect("connect without acks");
    c.send(
        Kind::Ready,
        &[("READY", "1".into()), ("STATUS", "up".into())],
    )
    .expect("send");
    drop(c);
    let text = reader.join().expect("reader");
    assert!(text.lines().any(|l| l == "READY=1"), "{text}");
}

#[test]
fn a_guest_leaving_mid_bundle_does_not_hurt_the_host() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = vec![1u8; 8 << 20];
    let (path, rx) = start(
        dir.path(),
        Some(BundleSource::from_bytes(bytes.clone())),
        Faults::default(),
    );
    // Ask for the bundle, read a little, hang up.
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"BL1 HELLO 0 0\nBL1 GET-BUNDLE 1 0\n")
        .expect("ask");
    let mut some = [0u8; 4096];
    s.read_exact(&mut some).expect("some bytes");
    drop(s);
    // The host reports the broken transfer and goes on serving whole bundles.
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    let mut got = Vec::new();
    c.fetch_bundle(&mut got, 16 << 20).expect("a whole bundle");
    assert_eq!(got.len(), bytes.len());
    let events: Vec<Event> =
        std::iter::from_fn(|| rx.recv_timeout(Duration::from_millis(300)).ok())
            .map(|e| e.event)
            .collect();
    assert!(
        events.iter().any(|e| matches!(e, Event::Error(_))),
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::BundleSent { .. }))
            .count(),
        1
    );
}

/// A host that acks every message up to READY, then keeps the connection open and reads
/// nothing more: hung, or busy elsewhere. The connection is handed back when `release` says.
fn hung_after_ready(path: &Path) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    let (release, hold) = mpsc::channel();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut dec = Decoder::new();
        loop {
            let f = read_frame(&mut s, &mut dec).expect("frame");
            write_frame(&mut s, &Frame::new(Kind::Ack, f.seq)).expect("ack");
            if f.kind == Kind::Ready {
                break;
            }
        }
        let _ = hold.recv();
        drop(s);
    });
    (release, t)
}

#[test]
fn after_ready_a_hung_host_holds_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("hung_1024");
    let (release, host) = hung_after_ready(&path);
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    // Small reports go into the socket buffer: written at once, their acks not awaited.
    let started = Instant::now();
    c.send(Kind::Step, &[("STEP", "cleanup_done".into())])
        .expect("written");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "STEP took {:?}",
        started.elapsed()
    );
    // Large ones fill the buffer the host does not read: each send still returns in bounded
    // time, the one that finds no room fails, and every later one fails at once.
    let big = "x".repeat(60_000);
    let mut outcomes = Vec::new();
    for _ in 0..40 {
        let started = Instant::now();
        let r = c.send(Kind::Log, &[("MESSAGE", big.clone())]);
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(100),
            "LOG took {took:?}: {r:?}"
        );
        outcomes.push(r);
    }
    let first_err = outcomes
        .iter()
        .position(Result::is_err)
        .expect("the buffer filled up");
    let e = outcomes[first_err].as_ref().expect_err("failed");
    assert!(
        matches!(
            e,
            ClientError::AfterReady {
                kind: Kind::Log,
                source: AfterReadyError::Stalled { .. }
            }
        ),
        "{e}"
    );
    assert_eq!(
        bootlace_contract::chain(e),
        "LOG after READY: the host took none of it within 5 ms: it is not reading"
    );
    for r in &outcomes[first_err + 1..] {
        assert!(
            matches!(
                r,
                Err(ClientError::AfterReady {
                    source: AfterReadyError::Lost,
                    ..
                })
            ),
            "{r:?}"
        );
    }
    release.send(()).expect("release");
    host.join().expect("host");
}

#[test]
fn after_ready_exit_waits_a_bounded_time_for_its_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("silent_1024");
    let (release, host) = hung_after_ready(&path);
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    let started = Instant::now();
    let e = c
        .send(Kind::Exit, &[("EXIT_STATUS", "0".into())])
        .expect_err("no ack");
    let took = started.elapsed();
    assert!(
        took >= FINAL_ACK_WAIT && took < FINAL_ACK_WAIT + Duration::from_millis(300),
        "EXIT waited {took:?}"
    );
    assert_eq!(
        bootlace_contract::chain(&e),
        "EXIT after READY: no ACK within 1000 ms"
    );
    // The host hangs up: a gone host ends the wait at once.
    release.send(()).expect("release");
    host.join().expect("host");

    let path = dir.path().join("leaves_1024");
    let (release, host) = hung_after_ready(&path);
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    release.send(()).expect("release");
    host.join().expect("host");
    let started = Instant::now();
    let e = c
        .send(Kind::Exit, &[("EXIT_STATUS", "0".into())])
        .expect_err("gone");
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "EXIT took {:?}: {e}",
        started.elapsed()
    );
    assert_eq!(
        bootlace_contract::chain(&e),
        "EXIT after READY: the host has closed the connection (as `bootlace-agent wait-ready` \
         does at READY)"
    );
}

#[test]
fn after_ready_a_live_host_still_gets_and_acks_every_report() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, rx) = start(
        dir.path(),
        None,
        Faults {
            duplicate_acks: true,
            ..Faults::default()
        },
    );
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("ready");
    for step in ["cleanup_done", "extra"] {
        c.send(Kind::Step, &[("STEP", step.into())]).expect("step");
    }
    // EXIT's wait skips the acks (and duplicate acks) of the two STEPs nobody waited for.
    c.send(Kind::Exit, &[("EXIT_STATUS", "0".into())])
        .expect("EXIT acknowledged");
    assert_eq!(
        reports(&rx),
        [Kind::Ready, Kind::Step, Kind::Step, Kind::Exit]
    );
}

/// Nothing a connection says before its HELLO is believed: a forged READY (or a bundle asked
/// for) as the first frame drops the connection with an error that says so, no report reaches
/// the host's listeners, and the same socket still serves a guest that starts with HELLO.
#[test]
fn nothing_before_hello_is_believed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, rx) = start(dir.path(), None, Faults::default());
    for kind in [Kind::Ready, Kind::GetBundle, Kind::Step] {
        let mut s = UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let forged = Frame::new(kind, 1).with("READY", "1");
        write_frame(&mut s, &forged).expect("write");
        // The host hangs up without an ack or a bundle.
        let mut buf = [0u8; 64];
        assert_eq!(
            s.read(&mut buf).expect("read"),
            0,
            "{kind}: the host answered"
        );
    }
    let mut errors = Vec::new();
    while let Ok(e) = rx.recv_timeout(Duration::from_millis(300)) {
        match e.event {
            Event::Report(f) => panic!("a report before HELLO was believed: {f:?}"),
            Event::Error(msg) => errors.push(msg),
            _ => {}
        }
    }
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0]
            .contains("the guest sent READY before HELLO (every connection starts with HELLO)"),
        "{errors:?}"
    );
    // A well-behaved guest on the same socket is heard.
    let mut c = Client::connect(connector(path), &hello(), quick()).expect("connect");
    c.send(Kind::Ready, &[("READY", "1".into())])
        .expect("ready");
    assert_eq!(reports(&rx), [Kind::Ready]);
}

/// Text a guest sends reaches a terminal with its control characters escaped; JSON keeps it
/// exact.
#[test]
fn guest_text_cannot_drive_the_terminal() {
    let mut f = Frame::new(Kind::Log, 3).with("MESSAGE", "\u{1b}[2Jcleared\tover\u{7}");
    f = f.with("STATUS", "ok");
    let e = GuestEvent {
        guest: "vm1".to_owned(),
        name: None,
        event: Event::Report(f),
    };
    let human = bootlace_agent::host::describe(&e.event);
    assert_eq!(
        human,
        "LOG MESSAGE=\\u{1b}[2Jcleared\\tover\\u{7} STATUS=ok"
    );
    assert!(!human.chars().any(char::is_control));
    let json = bootlace_agent::host::to_json(&e);
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(v["fields"]["MESSAGE"], "\u{1b}[2Jcleared\tover\u{7}");
}
