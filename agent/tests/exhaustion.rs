//! The host agent out of file descriptors: accept() fails with EMFILE, and the agent backs off,
//! reports it once per interval (not in a loop), closes silent connections to make room, keeps
//! serving a well-behaved guest and never aborts.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bootlace_agent::client::{Client, Retry, Stream};
use bootlace_agent::host::hybrid_path;
use bootlace_contract::protocol::Kind;

fn good_guest(path: &Path) -> Result<(), String> {
    let p = path.to_owned();
    let connector = Box::new(move |_left: Duration| {
        let s = UnixStream::connect(&p)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Box::new(s) as Box<dyn Stream>)
    });
    let retry = Retry {
        give_up_after: Duration::from_secs(20),
        ..Retry::default()
    };
    let mut c = Client::connect(connector, &[("BOOT_ID", "good".to_owned())], retry)
        .map_err(|e| format!("connect: {e}"))?;
    let mut b = Vec::new();
    c.fetch_bundle(&mut b, 1 << 20)
        .map_err(|e| format!("bundle: {e}"))?;
    c.send(Kind::Ready, &[("READY", "1".into())])
        .map_err(|e| format!("ready: {e}"))
}

#[test]
fn out_of_descriptors_the_agent_backs_off_reports_once_and_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    std::fs::create_dir(&bundle).expect("mkdir");
    std::fs::write(bundle.join("bootlace.toml"), "version = 1\n").expect("manifest");
    // 48 descriptors, and a global cap the limit cannot honour: accept() itself fails.
    let mut agent = Command::new("prlimit")
        .arg("--nofile=48:48")
        .arg(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args(["serve", "--json", "--max-connections", "1000"])
        .args(["--max-per-guest", "1000", "--hello-timeout", "60"])
        .arg("--bundle")
        .arg(&bundle)
        .arg("--uds")
        .arg(dir.path().join("vm"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the agent under prlimit");
    let (tx, rx) = mpsc::channel();
    let stdout = agent.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let path = hybrid_path(&dir.path().join("vm"), 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "the agent did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    // 200 connections that never say a word: far past what the agent can hold.
    let idle: Vec<UnixStream> = (0..200)
        .filter_map(|_| UnixStream::connect(&path).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let served = good_guest(&path);
    eprintln!(
        "good guest beside {} idle connections: {served:?} in {:?}",
        idle.len(),
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        agent.try_wait().expect("wait").is_none(),
        "the agent ended under descriptor exhaustion"
    );
    let lines: Vec<String> = rx.try_iter().collect();
    let _ = agent.kill();
    let _ = agent.wait();
    served.expect("a well-behaved guest is served while descriptors run out");
    let accept_notices: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("\"event\":\"notice\"") && l.contains("accept failed"))
        .collect();
    assert!(
        !accept_notices.is_empty(),
        "accept() never failed: the test did not exhaust descriptors"
    );
    assert!(
        accept_notices.len() <= 2,
        "accept errors reported in a loop: {accept_notices:#?}"
    );
    assert!(
        accept_notices[0].contains("Too many open files"),
        "{accept_notices:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("closed before HELLO: the host is at its connection limit")),
        "no silent connection was closed to make room"
    );
    drop(idle);
}
