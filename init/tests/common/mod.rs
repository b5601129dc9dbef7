//! Helpers shared by the root-only test files.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What a sentinel tree looks like, to prove an operation left it alone.
pub type Snapshot = Vec<(String, Vec<u8>, u32, i64, u32, u32)>;

/// (relative path, content or link target, mode, mtime, uid, gid) of everything under `dir`,
/// `dir` itself included, skipping `skip`.
pub fn snapshot(dir: &Path, skip: &Path) -> Snapshot {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(p) = stack.pop() {
        if p == skip {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).expect("stat");
        let rel = p
            .strip_prefix(dir)
            .expect("prefix")
            .to_string_lossy()
            .into_owned();
        let content = if m.is_file() {
            std::fs::read(&p).expect("read")
        } else if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .expect("readlink")
                .into_os_string()
                .into_encoded_bytes()
        } else {
            Vec::new()
        };
        out.push((rel, content, m.mode(), m.mtime(), m.uid(), m.gid()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).expect("read_dir") {
                stack.push(e.expect("entry").path());
            }
        }
    }
    out.sort();
    out
}
