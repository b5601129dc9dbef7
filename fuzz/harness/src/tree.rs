//! Snapshots of directory trees, to prove an operation left a tree alone.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What one entry looks like: content (or link target), type and mode, times, owner, inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File content, symlink target, or empty.
    pub content: Vec<u8>,
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// `st_mtime`, seconds and nanoseconds.
    pub mtime: (i64, i64),
    /// `st_ctime` (changes with chmod, chown, link count).
    pub ctime: (i64, i64),
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Inode number (a replaced file is a different inode).
    pub ino: u64,
}

/// Every entry under `dir` (`dir` itself as ""), by relative path, skipping the `skip` paths
/// and what is under them.
pub type Snapshot = BTreeMap<String, Entry>;

/// Takes a snapshot of `dir`, not following symlinks.
pub fn snapshot(dir: &Path, skip: &[PathBuf]) -> Snapshot {
    let mut out = Snapshot::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        if skip.contains(&p) {
            continue;
        }
        let m =
            std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("stat {}: {e}", p.display()));
        let content = if m.is_file() {
            std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap_or_else(|e| panic!("readlink {}: {e}", p.display()))
                .into_os_string()
                .into_encoded_bytes()
        } else {
            Vec::new()
        };
        let rel = p
            .strip_prefix(dir)
            .map(|r| r.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.insert(
            rel,
            Entry {
                content,
                mode: m.mode(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                uid: m.uid(),
                gid: m.gid(),
                ino: m.ino(),
            },
        );
        if m.is_dir() {
            let entries =
                std::fs::read_dir(&p).unwrap_or_else(|e| panic!("list {}: {e}", p.display()));
            for e in entries {
                stack.push(
                    e.unwrap_or_else(|e| panic!("list {}: {e}", p.display()))
                        .path(),
                );
            }
        }
    }
    out
}

/// Panics, naming the first difference, when two snapshots differ.
pub fn assert_same(what: &str, before: &Snapshot, after: &Snapshot) {
    if before == after {
        return;
    }
    for (k, v) in after {
        match before.get(k) {
            None => panic!("{what}: {k:?} was created: {v:?}"),
            Some(b) if b != v => panic!("{what}: {k:?} changed: {b:?} -> {v:?}"),
            Some(_) => {}
        }
    }
    for k in before.keys() {
        if !after.contains_key(k) {
            panic!("{what}: {k:?} was removed");
        }
    }
}
