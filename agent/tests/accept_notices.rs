//! A fleet agent reports a host-wide problem once per interval for all its listeners together,
//! not once per listener: accept() failing out of file descriptors, and connections refused at
//! the global cap.
//!
//! Regression tests: the throttle was keyed by listener (by guest), so with a 9,000-guest
//! fleet out of descriptors `bench-fleet` counted 21,489 notice lines in 22 s (up to 7,671 in
//! one second) for the failed accepts, and 6,965 (up to 4,188 in one second) for the global
//! cap's refusals, one per listener per interval.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bootlace_agent::host::hybrid_path;
use bootlace_contract::protocol::{read_frame, Decoder, Frame, Kind};

const GUESTS: usize = 100;
/// The agent's open-file limit: its listeners, the reserve and a few connections.
const NOFILE: usize = 200;
/// Silent connections: more than the limit leaves, so accept() fails with EMFILE.
const IDLE: usize = 300;
/// The agent's report interval (`Limits::default().report_interval`).
const INTERVAL_S: u64 = 10;

fn write_fleet(dir: &Path) -> (PathBuf, Vec<PathBuf>) {
    std::fs::create_dir_all(dir.join("bundle")).expect("bundle dir");
    std::fs::write(dir.join("bundle/manifest.toml"), "version = 1\n").expect("manifest");
    std::fs::create_dir(dir.join("s")).expect("sockets dir");
    let mut toml = String::from("[defaults]\nbundle = \"bundle\"\n");
    let mut sockets = Vec::new();
    for i in 0..GUESTS {
        let base = dir.join("s").join(format!("vm{i}"));
        toml.push_str(&format!(
            "[guests.vm{i}]\nsocket = \"{}\"\n",
            base.display()
        ));
        sockets.push(hybrid_path(&base, 1024));
    }
    let file = dir.join("fleet.toml");
    std::fs::write(&file, toml).expect("write the fleet file");
    (file, sockets)
}

#[test]
fn accept_failures_are_reported_once_per_interval_for_all_listeners() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (fleet, sockets) = write_fleet(dir.path());
    // `ulimit -n` lowers both limits (no privilege needed); --max-connections above what
    // they allow, so the agent really runs out and accept() fails.
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args(["serve", "--json", "--max-connections", "5000", "--fleet"])
        .arg(&fleet)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let rx = lines_of(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sockets.iter().all(|s| s.exists()) {
        assert!(
            Instant::now() < deadline,
            "the agent never listened on its fleet"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut idle = Vec::new();
    for s in sockets.iter().cycle().take(IDLE) {
        if let Ok(c) = UnixStream::connect(s) {
            idle.push(c);
        }
    }
    // Collect the agent's lines for a while with every descriptor in use.
    let mut lines = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if let Ok(l) = rx.recv_timeout(left) {
            lines.push(l);
        }
    }
    let elapsed = started.elapsed();
    let alive = child.try_wait().expect("the agent's status").is_none();
    let _ = child.kill();
    let _ = child.wait();
    drop(idle);
    assert!(alive, "the agent exited while out of descriptors");
    let accept_notices: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"notice\"") && l.contains("accept failed"))
        .collect();
    assert!(
        !accept_notices.is_empty(),
        "the agent never ran out of descriptors: no accept notice in {} lines",
        lines.len()
    );
    let intervals = elapsed.as_secs() / INTERVAL_S + 1;
    assert!(
        accept_notices.len() as u64 <= intervals,
        "{} accept notices in {} interval(s) of {INTERVAL_S} s (one per interval is the rule); first: {:?}",
        accept_notices.len(),
        intervals,
        accept_notices.first()
    );
}

/// Lines of the agent's stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A connection that said HELLO and had it acknowledged.
fn hello(socket: &Path, i: usize) -> UnixStream {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("read timeout");
    let f = Frame::new(Kind::Hello, 0)
        .with("PROTOCOL", 1)
        .with("BOOT_ID", format!("b{i}"));
    s.write_all(&f.encode().expect("encode")).expect("HELLO");
    let ack = read_frame(&mut s, &mut Decoder::new()).expect("the ACK of HELLO");
    assert_eq!(ack.kind, Kind::Ack);
    s
}

#[test]
fn refusals_at_the_global_cap_are_reported_once_per_interval_for_all_guests() {
    const CAP: usize = 5;
    let dir = tempfile::tempdir().expect("temp dir");
    let (fleet, sockets) = write_fleet(dir.path());
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args([
            "serve",
            "--json",
            "--max-connections",
            &CAP.to_string(),
            "--fleet",
        ])
        .arg(&fleet)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the agent");
    let rx = lines_of(&mut child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sockets.iter().all(|s| s.exists()) {
        assert!(
            Instant::now() < deadline,
            "the agent never listened on its fleet"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The cap filled by guests that said HELLO (none to close to make room) ...
    let held: Vec<UnixStream> = sockets
        .iter()
        .take(CAP)
        .enumerate()
        .map(|(i, s)| hello(s, i))
        .collect();
    // ... then one connection from each other guest: each is closed at once.
    for s in sockets.iter().skip(CAP) {
        let mut c = UnixStream::connect(s).expect("connect");
        c.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        let mut byte = [0u8; 1];
        assert!(
            matches!(std::io::Read::read(&mut c, &mut byte), Ok(0) | Err(_)),
            "a connection past the global cap was not closed"
        );
    }
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(500)) {
        lines.push(l);
    }
    let elapsed = started.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    drop(held);
    let refusals: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"notice\"") && l.contains("its cap of"))
        .collect();
    assert!(
        !refusals.is_empty(),
        "no refusal reported in {} lines",
        lines.len()
    );
    let intervals = elapsed.as_secs() / INTERVAL_S + 1;
    assert!(
        refusals.len() as u64 <= intervals,
        "{} refusal notices for {} guests in {intervals} interval(s) of {INTERVAL_S} s (one per \
         interval is the rule); first: {:?}",
        refusals.len(),
        GUESTS - CAP,
        refusals.first()
    );
}
