//! Root-only tier, the manifest rows of docs/test-matrix.md: a bundle directory with a
//! `bootlace.toml` is read, validated and applied to a temporary root exactly as the init does
//! it (`bootstrap::apply_bundle`). Every case checks the three things: the error names the
//! cause, a sentinel tree beside the root is unchanged (content, mode, mtime, owner), and
//! nothing is half-applied (the root is unchanged when the manifest is refused; no temporary
//! file and no truncated file is left when a write fails).

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bootlace_contract::chain;
use bootlace_contract::config::InitConfig;
use bootlace_init::bootstrap::{self, BootstrapError};
use bootlace_init::modload::ModuleLoader;
use bootlace_init::sys::root::Root;

mod common;
use common::{snapshot, Snapshot};

struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    bundle: PathBuf,
    sentinel: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let bundle = dir.path().join("bundle");
        let sentinel = dir.path().join("sentinel");
        for d in [&root, &bundle, &sentinel] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/keep"), b"old content\n").expect("write");
        std::fs::create_dir_all(sentinel.join("dir")).expect("mkdir");
        std::fs::write(sentinel.join("secret"), b"do not touch").expect("write");
        std::fs::set_permissions(
            sentinel.join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::set_permissions(sentinel.join("dir"), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        // Planted by "the image": a link to the sentinel, absolute and relative.
        symlink(&sentinel, root.join("etc/abs-escape")).expect("symlink");
        symlink("../../sentinel", root.join("etc/rel-escape")).expect("symlink");
        std::fs::create_dir_all(bundle.join("files")).expect("mkdir");
        std::fs::write(bundle.join("files/big"), vec![b'n'; 1 << 20]).expect("write");
        Fixture {
            dir,
            root,
            bundle,
            sentinel,
        }
    }

    fn sentinel(&self) -> Snapshot {
        snapshot(&self.sentinel, Path::new("/nonexistent"))
    }

    fn root_tree(&self) -> Snapshot {
        snapshot(&self.root, Path::new("/nonexistent"))
    }

    /// Writes `manifest` (raw bytes) as the bundle's `bootlace.toml` and applies the bundle.
    fn apply(&self, manifest: &[u8]) -> Result<InitConfig, BootstrapError> {
        std::fs::write(self.bundle.join("bootlace.toml"), manifest).expect("manifest");
        let bundle = Root::open(&self.bundle).expect("bundle");
        let root = Root::open(&self.root).expect("root");
        bootstrap::apply_bundle(
            &bundle,
            Path::new("/.bootstrap"),
            &root,
            &InitConfig::default(),
            &mut ModuleLoader::new(),
        )
        .map(|(cfg, _)| cfg)
    }

    /// A manifest that must be refused before any change: the error names the manifest and
    /// `cause`; the root and the sentinel are exactly as before.
    fn refuse(&self, manifest: &[u8], cause: &str) -> String {
        let (root, sentinel) = (self.root_tree(), self.sentinel());
        let e = self
            .apply(manifest)
            .expect_err("a bad manifest was applied");
        let msg = chain(&e);
        assert!(
            matches!(e, BootstrapError::Manifest(_)),
            "not refused as a manifest error: {msg}"
        );
        assert!(
            msg.starts_with("manifest: ") && msg.contains("/.bootstrap/bootlace.toml"),
            "{msg:?} does not name the manifest"
        );
        assert!(msg.contains(cause), "{msg:?} does not contain {cause:?}");
        assert_eq!(self.root_tree(), root, "{cause}: the root changed");
        assert_eq!(self.sentinel(), sentinel, "{cause}: the sentinel changed");
        msg
    }
}

/// Runs `f` on a thread with a 1 MiB stack (an eighth of PID 1's 8 MiB main thread, in a debug
/// build): a parser that recursed once per nesting level would overflow it and abort.
fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(1024 * 1024)
        .spawn(f)
        .expect("thread")
        .join()
        .expect("no panic")
}

#[test]
fn deep_nesting_and_oversized_manifests_are_parse_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            format!(
                "version = 1\nhostname = \"evil\"\nx = {}{}\n",
                "[".repeat(10_000),
                "]".repeat(10_000)
            )
            .into_bytes(),
            "line 3",
        ),
        (
            format!(
                "version = 1\nhostname = \"evil\"\nx = {}1{}\n",
                "{a=".repeat(10_000),
                "}".repeat(10_000)
            )
            .into_bytes(),
            "line 3",
        ),
        (
            // 10k nested table headers are not nesting for a parser, but 10k dotted keys are.
            format!(
                "version = 1\nhostname = \"evil\"\n{} = 1\n",
                vec!["a"; 10_000].join(".")
            )
            .into_bytes(),
            "keys or values nested too deeply (recursion limit)",
        ),
        (
            format!(
                "version = 1\nhostname = \"evil\"\n#{}\n",
                "x".repeat(1024 * 1024)
            )
            .into_bytes(),
            "is over the 1048576-byte limit",
        ),
    ];
    for (text, cause) in cases {
        let msg = on_small_stack(move || {
            let f = Fixture::new();
            f.refuse(&text, cause)
        });
        eprintln!("REFUSED: {}", &msg[..msg.len().min(300)]);
    }
}

#[test]
fn unknown_keys_wrong_types_and_versions_are_refused_before_any_change() {
    let cases: &[(&str, &str)] = &[
        (
            "version = 1\nhostname = \"evil\"\nbogus = 1\n",
            "line 3, column 1: unknown field `bogus`",
        ),
        (
            "version = 1\nhostname = \"evil\"\n[[files]]\npath = \"/etc/x\"\ncontent = 5\n",
            "line 5",
        ),
        (
            "version = 2\nhostname = \"evil\"\n",
            "unsupported manifest version 2",
        ),
        ("hostname = \"evil\"\n", "unsupported manifest version 0"),
        ("version = \"1\"\n", "unsupported manifest version 0"),
    ];
    for (text, cause) in cases {
        Fixture::new().refuse(text.as_bytes(), cause);
    }
}

#[test]
fn bad_paths_are_refused_before_any_change() {
    let long = format!("/{}", "a/".repeat(2100));
    let long = long.trim_end_matches('/');
    let owned: Vec<(Vec<u8>, String)> = vec![
        // Non-UTF-8 bytes in a path (raw bytes: TOML itself cannot escape them).
        (
            b"version = 1\n[[files]]\npath = \"/etc/\xff\xfe\"\ncontent = \"x\"\n".to_vec(),
            "stream did not contain valid UTF-8".to_owned(),
        ),
        (
            b"version = 1\n[[files]]\npath = \"/etc/x\\u0000y\"\ncontent = \"x\"\n".to_vec(),
            "NUL".to_owned(),
        ),
        (
            b"version = 1\n[[files]]\npath = \"/etc/x\0y\"\ncontent = \"x\"\n".to_vec(),
            "line 3".to_owned(),
        ),
        (
            format!("version = 1\n[[files]]\npath = \"{long}\"\ncontent = \"x\"\n").into_bytes(),
            "over 4095".to_owned(),
        ),
        (
            format!("version = 1\n[[directories]]\npath = \"{long}\"\n").into_bytes(),
            "over 4095".to_owned(),
        ),
    ];
    for (text, cause) in &owned {
        Fixture::new().refuse(text, cause);
    }
    let cases: &[(&str, &str)] = &[
        (
            "[[files]]\npath = \"/etc/../../x\"\ncontent = \"x\"",
            "\"..\" component",
        ),
        ("[[files]]\npath = \"etc/x\"\ncontent = \"x\"", "absolute"),
        ("[[files]]\npath = \"\"\ncontent = \"x\"", "absolute"),
        ("[[files]]\npath = \"/\"\ncontent = \"x\"", "root itself"),
        ("[[files]]\npath = \"/etc//x\"\ncontent = \"x\"", "empty component"),
        (
            "[[files]]\npath = \"/proc/sys/kernel/core_pattern\"\ncontent = \"x\"",
            "under /proc",
        ),
        (
            "[[symlinks]]\npath = \"/.bootstrap/x\"\ntarget = \"y\"",
            "under /.bootstrap",
        ),
        ("[[directories]]\npath = \"/sys/x\"", "under /sys"),
        (
            "[[mounts]]\ntype = \"tmpfs\"\npath = \"/dev/shm\"",
            "under /dev",
        ),
        (
            "[[files]]\npath = \"/etc/x\"\nsource = \"../sentinel/secret\"",
            "\"..\" component",
        ),
        (
            "[[files]]\npath = \"/etc/x\"\nsource = \"/etc/shadow\"",
            "relative to the bundle root",
        ),
        // Duplicate and conflicting destinations.
        (
            "[[files]]\npath = \"/etc/a\"\ncontent = \"1\"\n[[files]]\npath = \"/etc/a\"\ncontent = \"2\"",
            "/etc/a",
        ),
        (
            "[[files]]\npath = \"/etc/a\"\ncontent = \"1\"\n[[symlinks]]\npath = \"/etc/a\"\ntarget = \"b\"",
            "/etc/a is also a destination in files",
        ),
        (
            "[[directories]]\npath = \"/etc/d\"\n[[directories]]\npath = \"/etc/d\"",
            "/etc/d",
        ),
        (
            "[[files]]\npath = \"/etc/a\"\ncontent = \"1\"\n[[files]]\npath = \"/etc/a/b\"\ncontent = \"2\"",
            "/etc/a is not a directory but /etc/a/b",
        ),
        (
            "[[symlinks]]\npath = \"/opt\"\ntarget = \"/\"\n[[files]]\npath = \"/opt/x\"\ncontent = \"2\"",
            "/opt",
        ),
        (
            "[[mounts]]\ntype = \"tmpfs\"\npath = \"/m\"\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/m\"",
            "mounted twice",
        ),
    ];
    for (body, cause) in cases {
        let text = format!("version = 1\nhostname = \"evil\"\n{body}\n");
        Fixture::new().refuse(text.as_bytes(), cause);
    }
}

/// Mounts under `dir` as mountinfo lists them (innermost last).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| *p == prefix || p.starts_with(&format!("{prefix}/")))
        .map(str::to_owned)
        .collect()
}

/// Unmounts whatever a test mounted under its directory, even when it fails.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let mut left = mounts_under(&self.0);
        left.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in left {
            let _ = Command::new("umount").arg(&m).status();
        }
    }
}

#[test]
#[ignore = "needs root"]
fn links_planted_earlier_never_redirect_a_later_write_chmod_or_mount() {
    // An earlier boot's manifest (an earlier step of the same bundle's history) plants links
    // that point out of the root; this boot's manifest writes, chmods and mounts through
    // them. Each operation lands inside the root (a link's target resolves against the root)
    // or fails naming the path; the sentinel beside the root never changes.
    let f = Fixture::new();
    let _guard = Unmount(f.dir.path().to_owned());
    let sentinel = f.sentinel();
    let first = format!(
        "version = 1\n\
         [[symlinks]]\npath = \"/opt\"\ntarget = \"{s}\"\n\
         [[symlinks]]\npath = \"/srv\"\ntarget = \"../../../sentinel\"\n\
         [[symlinks]]\npath = \"/etc/secret-link\"\ntarget = \"{s}/secret\"\n\
         [[symlinks]]\npath = \"/etc/dir-link\"\ntarget = \"{s}/dir\"\n",
        s = f.sentinel.display()
    );
    f.apply(first.as_bytes()).expect("the links are made");
    assert_eq!(f.sentinel(), sentinel);
    // The image has a directory at the sentinel's path inside the root, so the absolute links
    // resolve to something there; the relative one (`/srv`) dangles inside the root.
    let inside = f.root.join(f.sentinel.strip_prefix("/").expect("absolute"));
    std::fs::create_dir_all(inside.join("dir")).expect("mkdir");

    // "" must apply; "?" may apply or fail (naming the path); anything else is the error.
    let later: &[(&str, &str)] = &[
        ("[[files]]\npath = \"/opt/secret\"\ncontent = \"pwned\"", ""),
        ("[[files]]\npath = \"/srv/secret\"\ncontent = \"pwned\"", "?"),
        (
            "[[files]]\npath = \"/etc/secret-link\"\ncontent = \"replaced\"",
            "",
        ),
        (
            "[[directories]]\npath = \"/opt/dir\"\nmode = 0o777\nuid = 1234",
            "",
        ),
        (
            "[[directories]]\npath = \"/etc/dir-link\"\nmode = 0o777",
            "directories: /etc/dir-link: something that is not a directory (a file or a symlink) is there",
        ),
        (
            "[[mounts]]\ntype = \"tmpfs\"\npath = \"/opt/dir\"\nmode = 0o777",
            "",
        ),
        (
            "[[mounts]]\ntype = \"tmpfs\"\npath = \"/etc/abs-escape/dir\"\ncopy_defaults = false",
            "",
        ),
        (
            "[[mounts]]\ntype = \"bind\"\npath = \"/mnt/b\"\nsource = \"/srv/dir\"",
            "?",
        ),
        (
            "[[mounts]]\ntype = \"bind\"\npath = \"/mnt/c\"\nsource = \"/opt\"",
            "",
        ),
        (
            "[[symlinks]]\npath = \"/srv/secret\"\ntarget = \"x\"",
            "?",
        ),
    ];
    for (body, want_err) in later {
        let text = format!("version = 1\n{body}\n");
        match (f.apply(text.as_bytes()), want_err.is_empty()) {
            (Ok(_), true) => {}
            (Ok(_), false) if *want_err == "?" => {}
            (Err(e), false) if *want_err == "?" => {
                let msg = chain(&e);
                let named = body
                    .split('"')
                    .filter(|w| w.starts_with('/'))
                    .any(|p| msg.contains(p));
                assert!(named, "{body}: {msg:?} does not name the path");
                eprintln!("REFUSED (safe): {msg}");
            }
            (Err(e), false) => {
                let msg = chain(&e);
                assert!(msg.contains(want_err), "{body}: {msg:?} lacks {want_err:?}");
            }
            (Ok(_), false) => panic!("{body}: applied, expected {want_err}"),
            (Err(e), true) => panic!("{body}: {}", chain(&e)),
        }
        assert_eq!(f.sentinel(), sentinel, "{body}: the sentinel changed");
        // No mount landed outside the root.
        for m in mounts_under(f.dir.path()) {
            assert!(
                Path::new(&m).starts_with(&f.root),
                "{body}: mounted {m} outside the root"
            );
        }
    }
    // The writes landed inside the root, at the link's target taken relative to the root.
    assert_eq!(
        std::fs::read(inside.join("secret")).expect("written inside the root"),
        b"pwned"
    );
    assert_eq!(
        std::fs::read(f.root.join("etc/secret-link")).expect("read"),
        b"replaced"
    );
    // The planted link itself was replaced by a file, not written through.
    assert!(std::fs::symlink_metadata(f.root.join("etc/secret-link"))
        .expect("stat")
        .is_file());
    let mounted = mounts_under(f.dir.path());
    assert!(mounted.len() >= 3, "{mounted:?}");
}

#[test]
#[ignore = "needs root"]
fn a_full_disk_leaves_the_old_file_never_a_truncated_one() {
    // The root is a 256 KiB tmpfs: writing a 1 MiB file over /etc/keep fails with ENOSPC.
    let f = Fixture::new();
    let _guard = Unmount(f.dir.path().to_owned());
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs"])
        .arg(&f.root)
        .status()
        .expect("mount");
    assert!(
        status.success(),
        "mount tmpfs (the root-only tier runs as root)"
    );
    std::fs::create_dir_all(f.root.join("etc")).expect("mkdir");
    std::fs::write(f.root.join("etc/keep"), b"old content\n").expect("write");
    let sentinel = f.sentinel();
    let big = "x".repeat(900 * 1024);
    for (body, what) in [
        (
            format!("[[files]]\npath = \"/etc/keep\"\ncontent = \"{big}\""),
            "inline content",
        ),
        (
            "[[files]]\npath = \"/etc/keep\"\nsource = \"files/big\"".to_owned(),
            "bundle file",
        ),
    ] {
        let text = format!("version = 1\n{body}\n");
        let e = f.apply(text.as_bytes()).expect_err("the disk is full");
        let msg = chain(&e);
        assert!(
            msg.contains("files: /etc/keep: write: No space left on device"),
            "{what}: {msg}"
        );
        assert_eq!(
            std::fs::read(f.root.join("etc/keep")).expect("read"),
            b"old content\n",
            "{what}: the target is not the old file"
        );
        let names: Vec<String> = std::fs::read_dir(f.root.join("etc"))
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["keep"], "{what}: a temporary file was left behind");
        assert_eq!(f.sentinel(), sentinel);
    }
    // What fits is written whole.
    f.apply(b"version = 1\n[[files]]\npath = \"/etc/keep\"\ncontent = \"new\"\n")
        .expect("fits");
    assert_eq!(
        std::fs::read(f.root.join("etc/keep")).expect("read"),
        b"new"
    );
}
