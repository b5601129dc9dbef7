//! Target `confine`: [`Root`] operations on fuzzer-chosen paths, in a fresh tree per run.
//!
//! The tree: `<tmp>/root` holds planted traps — absolute symlinks to the real sentinel, `..`
//! links, links to `/` and into `/proc` (plain and magic), symlink loops, a FIFO, and the
//! forbidden roots `proc`, `sys`, `dev`, `.bootstrap` as real directories with a file each;
//! `<tmp>/sentinel` sits beside it. The input is a short sequence of operations (write a file,
//! make a directory or chmod an existing one, make a symlink, open a directory creating its
//! parents, preflight, open a file and read it, exists, copy a tree) on paths built from names
//! that reach the traps. After the run:
//! - everything beside the root is unchanged (content, mode, mtime, ctime, owner, inode) and
//!   nothing was created beside it, nor at a few host canary paths;
//! - nothing at or under the forbidden roots inside the root changed;
//! - no temporary file of an atomic write is left behind.
//!
//! Every operation must return (a FIFO must not block an open) and must not panic.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use bootlace_init::sys::root::Root;

use crate::tree::{assert_same, snapshot};
use crate::Input;

/// Operations per run, at most.
const MAX_OPS: usize = 12;

/// Names a fuzzer may not know but needs: the traps, the forbidden roots, `.`/`..`, canaries.
/// A path component byte below 0xc0 picks one of these.
pub const NAMES: &[&str] = &[
    "etc",
    "abs",
    "abs_secret",
    "up",
    "upup",
    "rootlink",
    "procself",
    "magic",
    "fdlink",
    "loop",
    "a",
    "b",
    "proc",
    "sys",
    "dev",
    ".bootstrap",
    "sentinel",
    "secret",
    "dir",
    "..",
    ".",
    "",
    "bl-fuzz-x",
    "bl-fuzz-y",
    "tmp",
    "self",
    "root",
    "hosts",
    "fifo",
    "keep",
    "p",
];

/// Names created by the fuzzer that must never appear on the host outside the temporary tree.
const CANARIES: &[&str] = &["bl-fuzz-x", "bl-fuzz-y"];

struct Fixture {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("bootlace-fuzz-confine")
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir: {e}"));
        let base = dir.path().to_owned();
        let root = base.join("root");
        let sentinel = base.join("sentinel");
        let mkdir = |p: &Path| std::fs::create_dir_all(p).unwrap_or_else(|e| panic!("{e}"));
        let write = |p: &Path, c: &[u8]| std::fs::write(p, c).unwrap_or_else(|e| panic!("{e}"));
        let link = |target: &str, p: &str| {
            std::os::unix::fs::symlink(target, root.join(p)).unwrap_or_else(|e| panic!("{e}"))
        };
        mkdir(&sentinel.join("dir"));
        write(&sentinel.join("secret"), b"do not touch");
        mkdir(&root.join("etc/keep"));
        write(&root.join("etc/hosts"), b"127.0.0.1 localhost\n");
        for forbidden in ["proc", "sys", "dev", ".bootstrap"] {
            mkdir(&root.join(forbidden).join("keep"));
            write(&root.join(forbidden).join("hosts"), b"kernel interface");
        }
        let abs = |p: &Path| p.to_string_lossy().into_owned();
        link(&abs(&sentinel), "abs");
        link(&abs(&sentinel.join("secret")), "abs_secret");
        link("../sentinel", "up");
        link("../../../../../../../..", "upup");
        link("/", "rootlink");
        link("/proc/self/root", "procself");
        link("/proc/self/cwd", "magic");
        link("/proc/self/fd/0", "fdlink");
        link("loop", "loop");
        link("b", "a");
        link("a", "b");
        link("proc", "etc/p");
        rustix::fs::mkfifoat(
            rustix::fs::CWD,
            root.join("etc/fifo"),
            rustix::fs::Mode::from_raw_mode(0o644),
        )
        .unwrap_or_else(|e| panic!("mkfifo: {e}"));
        Fixture {
            _dir: dir,
            base,
            root,
        }
    }
}

/// A path: up to 4 names, optionally absolute and with a trailing `/`.
fn path(input: &mut Input<'_>, base_name: &str) -> String {
    let n = input.byte();
    let mut p = String::new();
    if n & 0x40 == 0 {
        p.push('/');
    }
    for i in 0..(n % 5) {
        if i > 0 {
            p.push('/');
        }
        let c = input.byte();
        if c == 0xff {
            p.push_str(base_name);
        } else if c >= 0xc0 {
            // A raw name: printable ASCII only (the operations take UTF-8).
            let len = usize::from(c & 0x7);
            for b in input.take(len) {
                p.push(char::from(b' ' + b % 95));
            }
        } else {
            p.push_str(NAMES[usize::from(c) % NAMES.len()]);
        }
    }
    if n & 0x80 != 0 {
        p.push('/');
    }
    p
}

fn target(input: &mut Input<'_>, fx: &Fixture, base_name: &str) -> String {
    let t = input.byte();
    let sentinel = fx.base.join("sentinel");
    let fixed = [
        sentinel.to_string_lossy().into_owned(),
        sentinel.join("secret").to_string_lossy().into_owned(),
        fx.base.to_string_lossy().into_owned(),
        "/".to_owned(),
        "/proc".to_owned(),
        "/proc/self/root".to_owned(),
        "/proc/self/cwd".to_owned(),
        "/proc/self/fd/0".to_owned(),
        "..".to_owned(),
        "../..".to_owned(),
        "../sentinel".to_owned(),
        "../../sentinel/secret".to_owned(),
        "loop".to_owned(),
        "/etc".to_owned(),
        "/dev".to_owned(),
        "/tmp".to_owned(),
        "bl-fuzz-x".to_owned(),
        "/bl-fuzz-x".to_owned(),
    ];
    if t < 0x80 {
        fixed[usize::from(t) % fixed.len()].clone()
    } else {
        let p = path(input, base_name);
        if p.is_empty() {
            "x".to_owned()
        } else {
            p
        }
    }
}

fn mode(input: &mut Input<'_>) -> u32 {
    u32::from(u16::from_le_bytes([input.byte(), input.byte()])) & 0o7777
}

fn owner(input: &mut Input<'_>) -> u32 {
    [0, 1000, 65534][usize::from(input.byte() % 3)]
}

/// The check.
pub fn run(data: &[u8]) {
    let fx = Fixture::new();
    let forbidden: Vec<PathBuf> = ["proc", "sys", "dev", ".bootstrap"]
        .iter()
        .map(|f| fx.root.join(f))
        .collect();
    let beside = snapshot(&fx.base, std::slice::from_ref(&fx.root));
    let kernel: Vec<_> = forbidden.iter().map(|f| snapshot(f, &[])).collect();
    let canaries = canary_paths(&fx.base);
    let canaries_before: Vec<bool> = canaries.iter().map(|p| exists(p)).collect();
    let base_name = fx
        .base
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let root = Root::open(&fx.root).unwrap_or_else(|e| panic!("open root: {e}"));
    let mut input = Input::new(data);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        let op = input.byte();
        let p = path(&mut input, &base_name);
        // Results are ignored: refusing is fine, escaping is not (checked below).
        match op % 8 {
            0 => {
                let want = usize::from(input.byte() % 32);
                let content = input.take(want);
                let (len, mut content) = (content.len(), content);
                let (m, uid, gid) = (mode(&mut input), owner(&mut input), owner(&mut input));
                if let Ok(n) = root.write_file(&p, &mut content, m, uid, gid) {
                    assert_eq!(
                        n as usize, len,
                        "write_file({p:?}) wrote {n} of {len} bytes"
                    );
                }
            }
            1 => {
                let (m, uid, gid) = (mode(&mut input), owner(&mut input), owner(&mut input));
                let _ = root.make_dir(&p, m, uid, gid);
            }
            2 => {
                let t = target(&mut input, &fx, &base_name);
                let _ = root.make_symlink(&p, &t);
            }
            3 => {
                let _ = root.open_dir(&p, input.byte() & 1 == 1);
            }
            4 => {
                let _ = root.preflight(&p);
            }
            5 => {
                if let Ok(f) = root.open_file(&p) {
                    let mut buf = Vec::new();
                    let _ =
                        std::io::Read::read_to_end(&mut std::io::Read::take(f, 1 << 20), &mut buf);
                }
            }
            6 => {
                let _ = root.exists(&p);
            }
            _ => {
                let to = path(&mut input, &base_name);
                copy_tree(&root, &p, &to);
            }
        }
    }
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
        assert!(before || !exists(p), "{} was created", p.display());
    }
    for (rel, _) in snapshot(&fx.root, &[]) {
        assert!(
            !rel.contains(".bootlace-"),
            "a temporary file was left behind: {rel}"
        );
    }
}

/// Copies a tree when neither directory contains the other (the recursion would not end
/// otherwise; the init only copies an image directory into a fresh tmpfs).
fn copy_tree(root: &Root, from: &str, to: &str) {
    let (Ok(src), Ok(dst)) = (root.open_dir(from, false), root.open_dir(to, true)) else {
        return;
    };
    let where_ = |fd: std::os::fd::BorrowedFd<'_>| {
        std::fs::read_link(bootlace_init::sys::root::fd_path(fd)).unwrap_or_default()
    };
    let (a, b) = (where_(src.as_fd()), where_(dst.as_fd()));
    if a.starts_with(&b) || b.starts_with(&a) {
        return;
    }
    let _ = root.copy_tree(from, src.as_fd(), dst.as_fd());
}

fn canary_paths(base: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![
        PathBuf::from("/"),
        PathBuf::from("/etc"),
        std::env::temp_dir(),
    ];
    if let Ok(cwd) = std::env::current_dir() {
        dirs.push(cwd);
    }
    if let Some(parent) = base.parent() {
        dirs.push(parent.to_owned());
    }
    dirs.iter()
        .flat_map(|d| CANARIES.iter().map(move |c| d.join(c)))
        .collect()
}

fn exists(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok()
}
