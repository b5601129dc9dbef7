//! The host-agent and vsock rows of docs/test-matrix.md, over real hybrid-vsock Unix sockets:
//! every fault the host can inject (`Faults`, `--fault`) against the guest client, guests known
//! by their socket and not by what they claim, and a host that survives 100 disconnects
//! mid-transfer, slow readers and garbage while other guests are served whole.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootlace_agent::client::{Client, ClientError, Connector, Retry};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, Faults, GuestEvent, Host, Limits};
use bootlace_contract::protocol::{Frame, Kind};

type Events = Arc<Mutex<Vec<GuestEvent>>>;

/// A host on `<dir>/<name>_1024` for each name, with `faults`.
fn host(
    dir: &Path,
    names: &[&str],
    bundle: Option<Vec<u8>>,
    faults: Faults,
) -> (Vec<PathBuf>, Events) {
    host_with(dir, names, bundle, faults, Limits::default())
}

/// [`host`] with `limits`.
fn host_with(
    dir: &Path,
    names: &[&str],
    bundle: Option<Vec<u8>>,
    faults: Faults,
    limits: Limits,
) -> (Vec<PathBuf>, Events) {
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(
        Host::new(bundle.map(BundleSource::from_bytes), move |e| {
            sink.lock().expect("lock").push(e)
        })
        .with_faults(faults)
        .with_limits(limits),
    );
    let paths = names
        .iter()
        .map(|n| {
            let p = hybrid_path(&dir.join(n), 1024);
            host.serve_unix(&p).expect("listen");
            p
        })
        .collect();
    (paths, events)
}

fn connector(path: PathBuf, read_timeout: Duration) -> Connector {
    Box::new(move |_left| {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(read_timeout))?;
        Ok(Box::new(s) as Box<dyn bootlace_agent::client::Stream>)
    })
}

fn retry() -> Retry {
    Retry {
        give_up_after: Duration::from_millis(1500),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        resends: 3,
        acks: true,
    }
}

fn hello(boot: &str) -> Vec<(&'static str, String)> {
    vec![
        ("BOOT_ID", boot.to_owned()),
        ("INSTANCE_ID", "i-same".to_owned()),
    ]
}

fn guest(path: &Path, boot: &str) -> Client {
    Client::connect(
        connector(path.to_owned(), Duration::from_millis(400)),
        &hello(boot),
        retry(),
    )
    .expect("connect")
}

/// Reports (kind, guest) seen so far, in order.
fn reports(events: &Events) -> Vec<(Kind, String, Frame)> {
    events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some((f.kind, e.guest.clone(), f.clone())),
            _ => None,
        })
        .collect()
}

fn errors(events: &Events) -> Vec<String> {
    events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Error(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn settle() {
    std::thread::sleep(Duration::from_millis(200));
}

#[test]
fn duplicate_acks_and_lost_acks_are_survived_and_reported_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = vec![9u8; 70_000];
    for (name, faults) in [
        (
            "dup",
            Faults {
                duplicate_acks: true,
                ..Faults::default()
            },
        ),
        (
            "lost",
            Faults {
                drop_acks: 2,
                ..Faults::default()
            },
        ),
        (
            "both",
            Faults {
                duplicate_acks: true,
                drop_acks: 1,
                delay: Some(Duration::from_millis(30)),
                ..Faults::default()
            },
        ),
    ] {
        let (paths, events) = host(dir.path(), &[name], Some(bytes.clone()), faults);
        let mut c = guest(&paths[0], "boot-1");
        for (kind, k, v) in [
            (Kind::Step, "STEP", "host"),
            (Kind::Step, "STEP", "modules"),
        ] {
            c.send(kind, &[(k, v.to_owned())]).expect("acked");
        }
        let mut got = Vec::new();
        c.fetch_bundle(&mut got, 1 << 20)
            .unwrap_or_else(|e| panic!("{name}: bundle: {e}"));
        assert_eq!(got, bytes, "{name}");
        c.send(Kind::Ready, &[("READY", "1".to_owned())])
            .unwrap_or_else(|e| panic!("{name}: READY: {e}"));
        c.send(Kind::Exit, &[("EXIT_STATUS", "0".to_owned())])
            .unwrap_or_else(|e| panic!("{name}: EXIT: {e}"));
        settle();
        let kinds: Vec<Kind> = reports(&events).into_iter().map(|r| r.0).collect();
        assert_eq!(
            kinds,
            [Kind::Step, Kind::Step, Kind::Ready, Kind::Exit],
            "{name}: each report exactly once"
        );
    }
}

#[test]
fn lying_lengths_refusals_and_stalls_fail_cleanly_and_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = vec![5u8; 50_000];
    // A SIZE over the true one: the guest waits for bytes that never come; its per-read
    // deadline fires. A SIZE under it: the digest of what arrived is not the announced one.
    // A SIZE over the guest's cap: refused before a byte is stored.
    for (name, size, want) in [
        ("longer", 60_000u64, "bundle transfer"),
        ("shorter", 40_000, "corrupted in transit"),
        ("huge", 1 << 40, "over the"),
    ] {
        let (paths, _events) = host(
            dir.path(),
            &[name],
            Some(bytes.clone()),
            Faults {
                announce_size: Some(size),
                ..Faults::default()
            },
        );
        let mut c = guest(&paths[0], "boot-1");
        let started = Instant::now();
        let mut sink = Vec::new();
        let e = c.fetch_bundle(&mut sink, 1 << 20).expect_err(name);
        assert!(e.to_string().contains(want), "{name}: {e}");
        assert!(started.elapsed() < Duration::from_secs(5), "{name}");
        if name == "huge" {
            assert!(sink.is_empty());
        }
    }
    // Refused twice, then served: the guest's retries get through.
    let (paths, events) = host(
        dir.path(),
        &["refuse2"],
        None,
        Faults {
            refuse_connections: 2,
            ..Faults::default()
        },
    );
    let mut c = guest(&paths[0], "boot-1");
    c.send(Kind::Ready, &[("READY", "1".to_owned())])
        .expect("ready");
    settle();
    assert_eq!(
        errors(&events)
            .iter()
            .filter(|e| e.contains("connection refused"))
            .count(),
        2
    );
    // Refused for good, or never acknowledged: unreachable after bounded tries.
    for (name, faults) in [
        (
            "refuse-all",
            Faults {
                refuse_connections: u32::MAX,
                ..Faults::default()
            },
        ),
        (
            "stall",
            Faults {
                stall_acks: true,
                ..Faults::default()
            },
        ),
    ] {
        let (paths, _) = host(dir.path(), &[name], None, faults);
        let started = Instant::now();
        let e = Client::connect(
            connector(paths[0].clone(), Duration::from_millis(200)),
            &hello("boot-1"),
            retry(),
        )
        .expect_err(name);
        assert!(matches!(e, ClientError::Unreachable { .. }), "{name}: {e}");
        assert!(
            e.to_string().starts_with("host unreachable after"),
            "{name}: {e}"
        );
        assert!(started.elapsed() < Duration::from_secs(4), "{name}");
    }
}

#[test]
fn guests_are_known_by_their_socket_not_by_what_they_claim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (paths, events) = host(dir.path(), &["vm-a", "vm-b"], None, Faults::default());
    // Both guests claim the same boot and instance ids; b even claims to be a.
    let mut a = guest(&paths[0], "boot-same");
    let mut b = Client::connect(
        connector(paths[1].clone(), Duration::from_millis(400)),
        &[
            ("BOOT_ID", "boot-same".to_owned()),
            ("INSTANCE_ID", "i-same".to_owned()),
            ("GUEST", paths[0].display().to_string()),
        ],
        retry(),
    )
    .expect("connect");
    a.send(Kind::Ready, &[("STATUS", "a".to_owned())])
        .expect("a");
    b.send(Kind::Ready, &[("STATUS", "b".to_owned())])
        .expect("b");
    settle();
    let r = reports(&events);
    assert_eq!(
        r.len(),
        2,
        "b's READY (same seq, same claimed ids) was not dropped: {r:?}"
    );
    for (kind, guest, frame) in &r {
        assert_eq!(*kind, Kind::Ready);
        let want = if frame.get("STATUS") == Some("a") {
            &paths[0]
        } else {
            &paths[1]
        };
        assert_eq!(guest, &want.display().to_string(), "{frame:?}");
    }
}

/// 100 guests that hang up mid-bundle, 5 slow readers, and 6 that send garbage, all on `chaos`.
fn misbehaving_guests(chaos: &Path) -> Vec<std::thread::JoinHandle<()>> {
    let mut bad = Vec::new();
    // 100 guests that hang up mid-bundle, after 0..64 KiB.
    for i in 0..100usize {
        let p = chaos.to_owned();
        bad.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).expect("connect");
            s.write_all(b"BL1 HELLO 0 0\nBL1 GET-BUNDLE 1 0\n")
                .expect("ask");
            let mut some = vec![0u8; (i % 16) * 4096 + 1];
            let _ = s.read_exact(&mut some);
        }));
    }
    // 5 slow readers: a kilobyte every 20 ms for 3 s, then gone.
    for _ in 0..5 {
        let p = chaos.to_owned();
        bad.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).expect("connect");
            s.write_all(b"BL1 HELLO 0 0\nBL1 GET-BUNDLE 1 0\n")
                .expect("ask");
            let until = Instant::now() + Duration::from_secs(3);
            let mut kb = [0u8; 1024];
            while Instant::now() < until {
                let _ = s.read(&mut kb);
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    // Garbage, a 4 GiB length, frames the host should never receive, a header without end.
    for junk in [
        &b"\x00\x01\x02 garbage\n"[..],
        b"BL1 READY 1 4294967296\n",
        b"BL1 ACK 1 0\n",
        b"BL1 BUNDLE 1 0\n",
        &[b'A'; 70_000][..],
        b"BL1 HELLO 0 5\nX=1\n\nBL1 STEP x 0\n",
    ] {
        let p = chaos.to_owned();
        let junk = junk.to_vec();
        bad.push(std::thread::spawn(move || {
            let mut s = UnixStream::connect(&p).expect("connect");
            let _ = s.write_all(&junk);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }));
    }
    bad
}

#[test]
fn the_host_survives_disconnects_slow_readers_and_garbage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    let sha = bootlace_contract::digest::of_bytes(&bytes).hex().to_owned();
    // 111 connections on one socket at once: this test is about the sessions, not the
    // per-guest cap (tested on its own), so the cap is raised past them.
    let (paths, events) = host_with(
        dir.path(),
        &["chaos", "calm"],
        Some(bytes.clone()),
        Faults::default(),
        Limits {
            max_per_guest: 200,
            ..Limits::default()
        },
    );
    let (chaos, calm) = (paths[0].clone(), paths[1].clone());
    let started = Instant::now();
    let bad = misbehaving_guests(&chaos);
    // Meanwhile, well-behaved guests on both sockets get whole bundles and are heard.
    let mut good = Vec::new();
    for i in 0..10 {
        let p = if i % 2 == 0 {
            calm.clone()
        } else {
            chaos.clone()
        };
        let want = sha.clone();
        good.push(std::thread::spawn(move || {
            let mut c = Client::connect(
                connector(p, Duration::from_secs(10)),
                &hello(&format!("good-{i}")),
                Retry {
                    give_up_after: Duration::from_secs(10),
                    ..retry()
                },
            )
            .expect("connect");
            let mut got = Vec::new();
            let r = c.fetch_bundle(&mut got, 16 << 20).expect("whole bundle");
            assert_eq!(r.sha256, want);
            c.send(Kind::Ready, &[("READY", "1".to_owned())])
                .expect("ready");
        }));
    }
    for g in good {
        g.join().expect("a good guest failed");
    }
    let good_took = started.elapsed();
    for b in bad {
        let _ = b.join();
    }
    settle();
    eprintln!(
        "10 good guests served in {good_took:?} beside 100 disconnects, 5 slow readers, 6 garbage"
    );
    assert!(good_took < Duration::from_secs(30), "{good_took:?}");
    let readies = reports(&events)
        .into_iter()
        .filter(|r| r.0 == Kind::Ready)
        .count();
    assert_eq!(readies, 10);
    let errs = errors(&events);
    assert!(errs.len() >= 100, "{} errors: {errs:?}", errs.len());
    // Still serving afterwards.
    let mut c = guest(&calm, "after");
    let mut got = Vec::new();
    c.fetch_bundle(&mut got, 16 << 20).expect("still serving");
    assert_eq!(got.len(), bytes.len());
}

#[test]
fn a_guest_that_stops_reading_loses_its_connection_at_the_write_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(
        Host::new(Some(BundleSource::from_bytes(bytes)), move |e| {
            sink.lock().expect("lock").push(e)
        })
        .with_write_timeout(Duration::from_millis(300)),
    );
    let path = hybrid_path(&dir.path().join("stuck"), 1024);
    host.serve_unix(&path).expect("listen");
    // Ask for the 8 MiB bundle, then read nothing while keeping the connection open.
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"BL1 HELLO 0 0\nBL1 GET-BUNDLE 1 0\n")
        .expect("ask");
    let started = Instant::now();
    let gave_up = loop {
        let errors: Vec<String> = events
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|e| match &e.event {
                Event::Error(m) => Some(m.clone()),
                _ => None,
            })
            .collect();
        if let Some(m) = errors.into_iter().next() {
            break m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the host still writes to a guest that reads nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Given up at the deadline (300 ms) — not at once, not never.
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{gave_up} after {:?}",
        started.elapsed()
    );
    // The message says it was the write deadline and what was being written (not a bare
    // "transport").
    let prefix = "dropped the guest at the write deadline: it took nothing for 300 ms while \
                  the host wrote the bundle (";
    let taken: u64 = gave_up
        .strip_prefix(prefix)
        .and_then(|r| r.strip_suffix(" of 8388608 bytes taken)"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{gave_up:?}"));
    assert!(taken < 8 << 20, "{gave_up}");
    assert_eq!(
        bootlace_agent::host::describe(&Event::Error(gave_up.clone())),
        format!("error: {gave_up}")
    );
    drop(s);
}
