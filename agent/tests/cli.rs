//! `bootlace-agent wait-ready`: the exit code host scripts rely on.

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
    let cases: &[(Option<Kind>, i32, &str)] = &[
        (Some(Kind::Ready), 0, "\"kind\":\"READY\""),
        (Some(Kind::Failed), 1, "failed: disk on fire"),
        (None, 2, "no guest was ready within 1 s"),
    ];
    for (i, (kind, code, want)) in cases.iter().enumerate() {
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
    }
}
