//! Replays every committed corpus file (`fuzz/corpus/<target>/*`: seeds, what the fuzzers
//! kept, and regression inputs of fixed defects) through the check its fuzz target runs.
//! The `confine` and `extract` checks need root, like the init's other root-only tests.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use bootlace_fuzz_harness::TARGETS;

/// How long one input may take (the slowest take milliseconds).
const DEADLINE: Duration = Duration::from_secs(30);

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

fn replay(target: &str) {
    let check = TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, f)| *f)
        .expect("a target of that name");
    let files = corpus(target);
    let mut failed = Vec::new();
    for file in &files {
        let data = std::fs::read(file).expect("read corpus file");
        // Each input on its own thread, with a deadline: a hang fails the test, naming the
        // input, instead of hanging it.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let ok = std::panic::catch_unwind(|| check(&data)).is_ok();
            let _ = tx.send(ok);
        });
        match rx.recv_timeout(DEADLINE) {
            Ok(true) => {}
            Ok(false) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                failed.push(file.display().to_string())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                failed.push(format!("{} (did not end in {DEADLINE:?})", file.display()))
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} corpus files fail: {failed:#?}",
        failed.len(),
        files.len()
    );
    eprintln!("{target}: {} corpus files replayed", files.len());
}

#[test]
fn every_target_has_a_corpus() {
    for (name, _) in TARGETS {
        corpus(name);
    }
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (name, _) in TARGETS {
        let target = fuzz_dir.join("fuzz_targets").join(format!("{name}.rs"));
        assert!(target.is_file(), "no fuzz target {}", target.display());
    }
}

#[test]
fn replay_manifest() {
    replay("manifest");
}

#[test]
#[ignore = "needs root"]
fn replay_confine() {
    replay("confine");
}

#[test]
#[ignore = "needs root"]
fn replay_extract() {
    replay("extract");
}

#[test]
fn replay_decompress() {
    replay("decompress");
}

#[test]
fn replay_frames() {
    replay("frames");
}

#[test]
fn replay_host_session() {
    replay("host_session");
}
