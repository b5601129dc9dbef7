//! Target `extract`: [`extract::extract`] of arbitrary bytes into a fresh root, with a sentinel
//! tree beside it and the same traps as [`confine`](crate::confine) planted in the root.
//!
//! The first byte chooses the compression (none, gzip, zstd, or sniffed as the init does) and
//! the limits (the defaults or small ones, so that every cap can be hit); the rest is the
//! archive. What the module promises, checked after every run, success or error:
//! - nothing beside the root changed or was created, nor at host canary paths, nor at or
//!   under the forbidden roots inside the root;
//! - no temporary file of an atomic write is left behind;
//! - every file is owned by root with no setuid, setgid or sticky bit, and is a regular file,
//!   directory or symlink (no device node, FIFO or hard link);
//! - regular file bytes stay within `max_bytes`, entries within `max_entries`.
//!
//! On error the module promises no clean-up inside the root (the caller discards the whole
//! root), so partial output inside it is allowed; the properties above hold either way. On
//! success the summary matches the tree.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use bootlace_contract::compression::Compression;
use bootlace_init::extract::{self, Limits};
use bootlace_init::sys::root::Root;

use crate::tree::{assert_same, snapshot, Snapshot};

/// The limits a run uses, chosen by the low bits of `b`.
pub fn limits(b: u8) -> Limits {
    match b % 4 {
        0 => Limits::default(),
        1 => Limits {
            max_bytes: 1024,
            max_entries: 8,
            max_ratio: 4,
            max_path: 64,
        },
        2 => Limits {
            max_bytes: 0,
            max_entries: 1,
            max_ratio: 1,
            max_path: 4095,
        },
        _ => Limits {
            max_bytes: 64 * 1024,
            max_entries: 100,
            max_ratio: 1000,
            max_path: 255,
        },
    }
}

/// The compression a run uses: none, gzip, zstd, or sniffed from the data as the init does.
pub fn compression(b: u8, data: &[u8]) -> Compression {
    match b % 4 {
        0 => Compression::None,
        1 => Compression::Gzip,
        2 => Compression::Zstd,
        _ => extract::sniff(data),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("bootlace-fuzz-extract")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let base = dir.path().to_owned();
        let root = base.join("root");
        let sentinel = base.join("sentinel");
        let io = |r: std::io::Result<()>| r.unwrap_or_else(|e| panic!("fixture: {e}"));
        io(std::fs::create_dir_all(sentinel.join("dir")));
        io(std::fs::write(sentinel.join("secret"), b"do not touch"));
        io(std::fs::create_dir_all(root.join("etc")));
        for forbidden in ["proc", "sys", "dev", ".bootstrap"] {
            io(std::fs::create_dir_all(root.join(forbidden)));
            io(std::fs::write(
                root.join(forbidden).join("hosts"),
                b"kernel",
            ));
        }
        let link =
            |target: &Path, name: &str| io(std::os::unix::fs::symlink(target, root.join(name)));
        link(&sentinel, "abs");
        link(Path::new("../sentinel"), "up");
        link(Path::new("/"), "rootlink");
        link(Path::new("/proc/self/root"), "procself");
        link(Path::new("loop"), "loop");
        Fixture {
            _dir: dir,
            base,
            root,
        }
    }
}

/// The check.
pub fn run(data: &[u8]) {
    let Some((&sel, archive)) = data.split_first() else {
        return;
    };
    let limits = limits(sel);
    let compression = compression(sel >> 2, archive);
    let fx = Fixture::new();
    let forbidden: Vec<PathBuf> = ["proc", "sys", "dev", ".bootstrap"]
        .iter()
        .map(|f| fx.root.join(f))
        .collect();
    let beside = snapshot(&fx.base, std::slice::from_ref(&fx.root));
    let kernel: Vec<Snapshot> = forbidden.iter().map(|f| snapshot(f, &[])).collect();
    let planted = snapshot(&fx.root, &[]);
    let canaries: Vec<PathBuf> = ["/", "/etc", "/tmp"]
        .iter()
        .map(|d| Path::new(d).join("bootlace-extract-x"))
        .collect();
    let canaries_before: Vec<bool> = canaries.iter().map(|p| p.exists()).collect();

    let root = Root::open(&fx.root).unwrap_or_else(|e| panic!("open root: {e}"));
    let result = extract::extract(
        &mut &archive[..],
        archive.len() as u64,
        compression,
        &root,
        &limits,
    );
    drop(root);

    assert_same(
        "beside the root",
        &beside,
        &snapshot(&fx.base, std::slice::from_ref(&fx.root)),
    );
    for (dir, before) in forbidden.iter().zip(&kernel) {
        assert_same(
            &format!("forbidden root {}", dir.display()),
            before,
            &snapshot(dir, &[]),
        );
    }
    for (p, before) in canaries.iter().zip(canaries_before) {
        assert!(before || !p.exists(), "{} was created", p.display());
    }

    let after = snapshot(&fx.root, &[]);
    // Directories are not counted: missing parents are created without an entry of their own.
    let (mut files, mut links, mut bytes) = (0u64, 0u64, 0u64);
    for (rel, e) in &after {
        assert!(!rel.contains(".bootlace-"), "temporary file left: {rel}");
        if rel.is_empty() || planted.get(rel) == Some(e) {
            continue;
        }
        let full = fx.root.join(rel);
        let meta = std::fs::symlink_metadata(&full).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let ft = meta.file_type();
        assert!(
            ft.is_file() || ft.is_dir() || ft.is_symlink(),
            "{rel}: neither a file, a directory nor a symlink ({:o})",
            e.mode
        );
        assert_eq!((e.uid, e.gid), (0, 0), "{rel}: not owned by root");
        if !ft.is_symlink() {
            assert_eq!(
                e.mode & 0o7000,
                0,
                "{rel}: mode {:o} kept a special bit",
                e.mode
            );
        }
        if ft.is_file() {
            assert_eq!(meta.nlink(), 1, "{rel}: hard-linked");
            files += 1;
            bytes += meta.len();
        } else if ft.is_symlink() {
            links += 1;
        }
    }
    assert!(
        bytes <= limits.max_bytes,
        "{bytes} bytes unpacked, over the {}-byte limit",
        limits.max_bytes
    );
    if let Ok(summary) = result {
        assert!(summary.bytes <= limits.max_bytes && summary.entries <= limits.max_entries);
        assert!(summary.files + summary.dirs + summary.symlinks <= summary.entries);
        // Entries may replace each other, so the tree holds at most what the summary counts.
        assert!(files <= summary.files, "{files} files, summary {summary:?}");
        assert!(
            links <= summary.symlinks,
            "{links} links, summary {summary:?}"
        );
        assert!(bytes <= summary.bytes, "{bytes} bytes, summary {summary:?}");
    }
}
