//! The running init's side of a takeover, on this machine's processes: a newer init copied out
//! of a bundle directory, its digest checked, its self-check run with a deadline; every refusal
//! named, nothing left behind; the state written whole and taken once.
//!
//! The self-check is reaped the way PID 1 reaps (any child): the tests take turns, and this
//! file starts no other process.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::manifest::NextInit;
use bootlace_contract::takeover::{self, Handover};
use bootlace_init::sys::root::Root;
use bootlace_init::takeover::{prepare, take_state, write_state};

/// One self-check at a time: each reaps any child of the process.
static TURN: Mutex<()> = Mutex::new(());
fn script(dir: &Path, name: &str, body: &str) -> (Sha256Digest, String) {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let (d, _) =
        bootlace_contract::digest::of_reader(std::fs::File::open(&p).expect("open")).expect("hash");
    (d, name.to_owned())
}

fn next(path: &str, sha256: &Sha256Digest, ms: u64) -> NextInit {
    NextInit {
        path: path.to_owned().try_into().expect("path"),
        sha256: sha256.clone(),
        check_timeout_ms: ms,
    }
}

fn setup() -> (tempfile::TempDir, Root, PathBuf) {
    let t = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(t.path().join("bundle")).expect("mkdir");
    let root = Root::open(&t.path().join("bundle")).expect("root");
    let dest = t.path().join("run/bootlace/init.next");
    (t, root, dest)
}

#[test]
fn a_good_init_is_copied_checked_and_named_by_its_answer() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (t, root, dest) = setup();
    let (d, name) = script(
        &t.path().join("bundle"),
        "init",
        r#"[ "$1" = takeover-check ] && echo "bootlace-init 9.9.9 takeover 1""#,
    );
    let p = prepare(
        &root,
        &next(&name, &d, 5000),
        &dest,
        (Path::new("/proc/self/exe"), "0.0.0-test"),
    )
    .expect("prepared")
    .expect("a takeover");
    assert_eq!(p.version, "9.9.9");
    assert_eq!(p.sha256, d);
    let mode = std::fs::metadata(&dest).expect("copy").permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert!(!dest.with_extension("check").exists());
}

#[test]
fn every_failure_names_its_cause_and_leaves_nothing() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (t, root, dest) = setup();
    let b = t.path().join("bundle");
    let (good, _) = script(&b, "good", "echo 'bootlace-init 9.9.9 takeover 1'");
    let (wrong_answer, _) = script(&b, "wrong", "echo hello");
    let (fails, _) = script(&b, "fails", "echo 'bootlace-init 9.9.9 takeover 1'; exit 4");
    let (old_state, _) = script(&b, "old", "echo 'bootlace-init 0.0.1 takeover 0'");
    let (slow, _) = script(&b, "slow", "sleep 30");
    std::fs::create_dir(b.join("dir")).expect("mkdir");
    let cases: Vec<(NextInit, &str)> = vec![
        (next("good", &wrong_answer, 5000), "has sha256:"),
        (next("wrong", &wrong_answer, 5000), "answered \"hello\""),
        (next("fails", &fails, 5000), "status 4"),
        (
            next("old", &old_state, 5000),
            "does not read takeover state version 1",
        ),
        (next("slow", &slow, 200), "no answer within 200 ms"),
        (next("missing", &good, 5000), "open missing in the bundle"),
        (
            next("dir", &good, 5000),
            "open dir in the bundle: dir: not a regular file",
        ),
    ];
    for (n, why) in cases {
        let e = prepare(
            &root,
            &n,
            &dest,
            (Path::new("/proc/self/exe"), "0.0.0-test"),
        )
        .expect_err(why);
        let text = bootlace_contract::chain(&e);
        assert!(text.contains(why), "{text:?} lacks {why:?}");
        assert!(!dest.exists(), "{why}: the copy was left");
        assert!(!dest.with_extension("check").exists(), "{why}");
    }
}

#[test]
fn the_running_program_is_not_taken_over_by_itself() {
    let (t, root, dest) = setup();
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (d, name) = script(
        &t.path().join("bundle"),
        "init",
        "echo 'bootlace-init 9.9.9 takeover 1'",
    );
    let running = t.path().join("bundle/init");
    assert_eq!(
        prepare(&root, &next(&name, &d, 5000), &dest, (&running, "9.9.9")).expect("ok"),
        None
    );
    assert!(!dest.exists());
    // The same bytes under another running version: taken over (a rebuild with a new tag).
    assert!(
        prepare(&root, &next(&name, &d, 5000), &dest, (&running, "9.9.8"))
            .expect("ok")
            .is_some()
    );
}

#[test]
fn the_state_is_written_whole_and_taken_once() {
    let t = tempfile::tempdir().expect("tmp");
    let state = Handover {
        state_version: takeover::STATE_VERSION,
        from_version: "0.1.0".to_owned(),
        stage: takeover::Stage::BootstrapMounted,
        timeline: Vec::new(),
        host_seq: Some(3),
        bootstrap: "a disk".to_owned(),
    };
    let path = t.path().join("takeover.toml");
    write_state(&state, &path).expect("write");
    let program = t.path().join("init.next");
    std::fs::write(&program, b"x").expect("write");
    assert_eq!(take_state(&path, &program).expect("take"), state);
    assert!(!path.exists() && !program.exists());
    let e = take_state(&path, &program).expect_err("gone");
    assert!(
        bootlace_contract::chain(&e).contains("takeover.toml"),
        "{e}"
    );
}
