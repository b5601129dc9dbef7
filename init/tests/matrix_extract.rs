//! Root-only tier, the bomb rows of docs/test-matrix.md that init/tests/extract.rs does not
//! already cover at full scale: a million entries and files announcing a terabyte, with the
//! default limits. Each is refused naming the cause, quickly and without writing outside the
//! root (a sentinel beside it keeps content, mode and mtime).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use bootlace_contract::chain;
use bootlace_init::extract::{self, Compression, Limits};
use bootlace_init::sys::root::Root;
use tar::{EntryType, Header};

mod common;
use common::snapshot;

fn header(kind: EntryType, name: &str, size: u64) -> [u8; 512] {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_path(name).expect("name");
    h.set_mode(0o755);
    h.set_size(size);
    h.set_cksum();
    *h.as_bytes()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// Extracts `data` into a fresh root beside a sentinel; returns the error chain and how long
/// it took, after checking the sentinel is unchanged.
fn refused(data: &[u8], compression: Compression) -> (String, Duration) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    let sentinel = dir.path().join("sentinel");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::create_dir_all(&sentinel).expect("mkdir");
    std::fs::write(sentinel.join("secret"), b"do not touch").expect("write");
    let before = snapshot(dir.path(), &root);
    let r = Root::open(&root).expect("root");
    let started = Instant::now();
    let e = extract::extract(
        &mut &data[..],
        data.len() as u64,
        compression,
        &r,
        &Limits::default(),
    )
    .expect_err("a bomb was accepted");
    let took = started.elapsed();
    assert_eq!(snapshot(dir.path(), &root), before, "the sentinel changed");
    (chain(&e), took)
}

#[test]
#[ignore = "needs root"]
fn a_million_entries_stop_at_the_entry_cap() {
    // 1000 gzip members of 1000 directory entries each (a multi-member gzip is one stream):
    // a million entries in about a megabyte.
    let block: Vec<u8> = (0..1000)
        .flat_map(|_| header(EntryType::Directory, "d/", 0))
        .collect();
    let member = gzip(&block);
    let mut bomb = Vec::new();
    for _ in 0..1000 {
        bomb.extend_from_slice(&member);
    }
    bomb.extend_from_slice(&gzip(&[0u8; 1024]));
    eprintln!("a million entries in {} bytes", bomb.len());
    let (msg, took) = refused(&bomb, Compression::Gzip);
    assert!(
        msg.contains("bundle: over the 10000-entry limit"),
        "{msg:?}"
    );
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_file_announcing_a_terabyte_is_refused_from_its_header() {
    let tb = 1u64 << 40;
    let mut tar = header(EntryType::Regular, "huge", tb).to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let (msg, took) = refused(&tar, Compression::None);
    assert!(
        msg.contains(&format!(
            "bundle entry \"huge\": {tb} more bytes would take the files over the 268435456-byte limit"
        )),
        "{msg:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // A GNU sparse file announcing a terabyte of holes: refused as sparse, whatever its size.
    let mut tar = header(EntryType::GNUSparse, "holes", 0).to_vec();
    tar.extend_from_slice(&[0u8; 1024]);
    let (msg, _) = refused(&tar, Compression::None);
    assert!(
        msg.contains("bundle entry \"holes\": GNU sparse file: sparse files are not allowed"),
        "{msg:?}"
    );
}

#[test]
fn the_sentinel_helper_sees_changes() {
    // The check above is only worth something if a change would be seen.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("a"), b"1").expect("write");
    let before = snapshot(dir.path(), Path::new("/nonexistent"));
    std::fs::write(dir.path().join("a"), b"2").expect("write");
    assert_ne!(snapshot(dir.path(), Path::new("/nonexistent")), before);
}
