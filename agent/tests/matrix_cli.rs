//! `--fault KIND[=ARG]` on `bootlace-agent`: a bad kind is refused naming the kinds, and a
//! host told to duplicate and drop acks still brings a guest's READY through, once.

use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bootlace_agent::client::{Client, Retry, Stream};
use bootlace_contract::protocol::Kind;

#[test]
fn bad_faults_are_refused_with_the_list_of_kinds() {
    let out = Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args(["serve", "--uds", "/nonexistent/vm", "--fault", "explode"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown fault \"explode\""), "{err}");
    assert!(err.contains("drop-acks=N"), "{err}");
}

#[test]
fn wait_ready_with_duplicate_and_dropped_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vm");
    let agent = Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args(["wait-ready", "--json", "--timeout", "20", "--uds"])
        .arg(&uds)
        .args(["--fault", "duplicate-acks", "--fault", "drop-acks=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let path = bootlace_agent::host::hybrid_path(&uds, 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let connector = Box::new(move |_left: Duration| {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_millis(300)))?;
        Ok(Box::new(s) as Box<dyn Stream>)
    });
    let mut c = Client::connect(connector, &[("BOOT_ID", "b".to_owned())], Retry::default())
        .expect("connect");
    // The first ack (of STEP) is dropped: STEP is resent on a new connection, acked twice
    // and reported once; then READY ends wait-ready.
    c.send(Kind::Step, &[("STEP", "host".to_owned())])
        .expect("STEP acknowledged in the end");
    c.send(Kind::Ready, &[("READY", "1".to_owned())])
        .expect("READY acknowledged");
    let out = agent.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("injecting faults: duplicate-acks drop-acks=1"),
        "{stderr}"
    );
    assert_eq!(stdout.matches("\"kind\":\"STEP\"").count(), 1, "{stdout}");
    assert_eq!(stdout.matches("\"kind\":\"READY\"").count(), 1, "{stdout}");
}
