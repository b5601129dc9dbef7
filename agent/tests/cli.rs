//! `bootlace-agent wait-ready` and `exit-status`: the exit codes and JSON host scripts rely on.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bootlace_agent::client::{Client, Retry, Stream};
use bootlace_contract::protocol::Kind;

fn wait_ready(uds: &Path, timeout: u64) -> Child {
    Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args([
            "wait-ready",
            "--json",
            "--timeout",
            &timeout.to_string(),
            "--uds",
        ])
        .arg(uds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

fn guest(uds: &Path) -> Client {
    let path = bootlace_agent::host::hybrid_path(uds, 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let connector = Box::new(move |_left: Duration| {
        UnixStream::connect(&path).map(|s| Box::new(s) as Box<dyn Stream>)
    });
    Client::connect(connector, &[("BOOT_ID", "b".to_owned())], Retry::default()).expect("connect")
}

#[test]
fn exit_codes_follow_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(Option<Kind>, i32, &str, &str)] = &[
        (Some(Kind::Ready), 0, "\"kind\":\"READY\"", "ready"),
        (Some(Kind::Failed), 1, "failed: disk on fire", "failed"),
        (None, 124, "no guest was ready within 1 s", "timeout"),
    ];
    for (i, (kind, code, want, outcome)) in cases.iter().enumerate() {
        let uds = dir.path().join(format!("vm{i}"));
        let child = wait_ready(&uds, if kind.is_some() { 30 } else { 1 });
        if let Some(kind) = kind {
            let mut g = guest(&uds);
            g.send(
                *kind,
                &[("READY", "1".into()), ("STATUS", "disk on fire".into())],
            )
            .expect("send");
        }
        let out = child.wait_with_output().expect("wait");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(*code), "{text}");
        assert!(text.contains(want), "{text} lacks {want}");
        // --json: the last line on stdout is the outcome.
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON");
        assert_eq!(last["event"], "outcome", "{stdout}");
        assert_eq!(last["outcome"], *outcome, "{stdout}");
        assert_eq!(last["exit_code"], *code, "{stdout}");
    }
}

fn agent(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args(args)
        .output()
        .expect("run")
}

#[test]
fn exit_status_reads_the_power_off_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("console.log");
    std::fs::write(
        &log,
        "boot\n[ 2.1] bootlace: power-off EXIT_STATUS=7 STATUS=app exited\n",
    )
    .expect("write");
    let log_s = log.to_str().expect("utf-8");
    let out = agent(&["exit-status", log_s]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "7\n");
    let out = agent(&["exit-status", "--json", log_s]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["exit_status"], 7);
    assert_eq!(v["status"], "app exited");

    std::fs::write(&log, "no status here\n").expect("write");
    let out = agent(&["exit-status", "--json", log_s]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["exit_status"].is_null(), "{v}");

    let missing = dir.path().join("missing.log");
    let out = agent(&["exit-status", missing.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn help_and_usage_errors() {
    for args in [&["--help"][..], &["wait-ready", "--help"], &["--version"]] {
        let out = agent(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
    let help = String::from_utf8_lossy(&agent(&["--help"]).stdout).into_owned();
    for want in ["Exit codes:", "124", "usage error"] {
        assert!(help.contains(want), "{help} lacks {want}");
    }
    let out = agent(&["wait-ready", "--timeout", "soon"]);
    assert_eq!(out.status.code(), Some(2));
    let out = agent(&["serve"]);
    assert_eq!(out.status.code(), Some(3), "nothing to listen on");
}

/// The README's recipe: `wait-ready` exits once READY arrives. The guest's reports after READY
/// (STEP cleanup_done at once, then, in supervise mode, EXIT when the app ends) must not hold
/// its hand-off, whether the host is still there or gone; before the fix the STEP after a gone
/// host was retried until `STEP was not acknowledged after 4 tries`, about 30 s later.
#[test]
fn reports_after_ready_do_not_wait_for_a_wait_ready_that_exited() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vm");
    let child = wait_ready(&uds, 30);
    // The init's retry settings (Retry::default() but for the connect deadline it configures).
    let mut g = guest(&uds);
    g.send(Kind::Step, &[("STEP", "manifest_done".into())])
        .expect("STEP before READY is acknowledged");
    g.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    // At once, as the init does: the host may or may not have gone yet.
    let started = Instant::now();
    let _ = g.send(Kind::Step, &[("STEP", "cleanup_done".into())]);
    let first = started.elapsed();
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0));
    // The host is gone for sure now.
    let mut took = Vec::new();
    for kind in [Kind::Log, Kind::Step, Kind::Exit] {
        let started = Instant::now();
        let r = g.send(kind, &[("STATUS", "after the host left".into())]);
        took.push((kind, started.elapsed(), r.map_err(|e| e.to_string())));
    }
    eprintln!("STEP right after READY: {first:?}; after the host left: {took:?}");
    assert!(first < Duration::from_millis(100), "STEP took {first:?}");
    for (kind, t, r) in &took {
        assert!(*t < Duration::from_millis(100), "{kind} took {t:?}: {r:?}");
    }
}

/// `wait-ready --until systemd` does not end at bootlace's READY but at the `STEP
/// systemd_ready` the guest's relay sends after the hand-off, with systemd's STATUS.
#[test]
fn wait_ready_until_systemd_waits_for_systemds_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vm");
    let child = Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args([
            "wait-ready",
            "--json",
            "--until",
            "systemd",
            "--timeout",
            "30",
            "--uds",
        ])
        .arg(&uds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut g = guest(&uds);
    g.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    g.send(Kind::Step, &[("STEP", "cleanup_done".into())])
        .expect("written");
    g.send(
        Kind::Step,
        &[
            (
                "STEP",
                bootlace_contract::protocol::SYSTEMD_READY_STEP.into(),
            ),
            ("STATE", "finished".into()),
            ("STATUS", "Ready.".into()),
        ],
    )
    .expect("written");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let last = stdout.lines().last().expect("outcome");
    let v: serde_json::Value = serde_json::from_str(last).expect("json");
    assert_eq!(v["outcome"], "ready", "{last}");
    assert_eq!(v["status"], "Ready.", "{last}");
    // bootlace's READY alone is not enough: the wait times out.
    let uds = dir.path().join("vm2");
    let child = Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
        .args([
            "wait-ready",
            "--until",
            "systemd",
            "--timeout",
            "2",
            "--uds",
        ])
        .arg(&uds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut g = guest(&uds);
    g.send(Kind::Ready, &[("READY", "1".into())])
        .expect("READY acknowledged");
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(124));
}

/// One forged READY with no HELLO before it does not end `wait-ready`: it times out (124).
#[test]
fn wait_ready_does_not_believe_a_ready_without_hello() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vm");
    let child = wait_ready(&uds, 2);
    let path = bootlace_agent::host::hybrid_path(&uds, 1024);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = UnixStream::connect(&path).expect("connect");
    s.write_all(b"BL1 READY 1 8\nREADY=1\n").expect("write");
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(124), "{stdout}");
    assert!(stdout.contains("before HELLO"), "{stdout}");
}
