//! Root-only tier: [`Root`] refuses to change a forbidden root (`/proc`, `/sys`, `/dev`,
//! `/.bootstrap`) itself or to create anything under one when a planted symlink leads there,
//! refuses before creating anything, and never blocks opening a FIFO. (Defects found while
//! building the `confine` and `extract` fuzz targets; their inputs are replayed from
//! `fuzz/corpus/`.)

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootlace_contract::config::InitConfig;
use bootlace_contract::manifest::Manifest;
use bootlace_init::apply;
use bootlace_init::modload::ModuleLoader;
use bootlace_init::sys::root::{Root, RootError};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

/// A root with `dev/` (mode 0755, one file in it) and `up -> /`, `etc/p -> ../dev` planted.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("dev")).expect("mkdir");
    std::fs::create_dir_all(root.join("etc")).expect("mkdir");
    std::fs::set_permissions(root.join("dev"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::write(root.join("dev/null"), b"").expect("write");
    symlink("/", root.join("up")).expect("symlink");
    symlink("../dev", root.join("etc/p")).expect("symlink");
    Fixture { _dir: dir, root }
}

fn dev_state(f: &Fixture) -> (u32, u32, i64, Vec<String>) {
    let m = std::fs::metadata(f.root.join("dev")).expect("stat dev");
    let mut names: Vec<String> = std::fs::read_dir(f.root.join("dev"))
        .expect("list dev")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    (m.mode(), m.uid(), m.ctime_nsec(), names)
}

fn forbidden(r: Result<(), RootError>, what: &str) {
    match r {
        Err(RootError::Forbidden { forbidden, .. }) => assert_eq!(forbidden, "/dev", "{what}"),
        other => panic!("{what}: {other:?}"),
    }
}

#[test]
fn a_forbidden_root_reached_through_a_symlink_is_not_changed() {
    let f = fixture();
    let before = dev_state(&f);
    let root = Root::open(&f.root).expect("root");
    // The directory itself: chmod and chown of /dev through `up -> /`.
    forbidden(
        root.make_dir("/up/dev", 0o777, 1000, 1000),
        "make_dir /up/dev",
    );
    forbidden(root.preflight("/up/dev"), "preflight /up/dev");
    // Missing directories under it are not created before the check.
    forbidden(
        root.open_dir("/up/dev/x/y", true).map(drop),
        "open_dir /up/dev/x/y",
    );
    forbidden(
        root.make_dir("/etc/p/x/y", 0o755, 0, 0),
        "make_dir /etc/p/x/y",
    );
    forbidden(
        root.write_file("/etc/p/x/f", &mut &b"x"[..], 0o644, 0, 0)
            .map(drop),
        "write_file /etc/p/x/f",
    );
    forbidden(root.preflight("/up/dev/x/y"), "preflight /up/dev/x/y");
    assert_eq!(dev_state(&f), before, "/dev changed");
}

#[test]
fn a_missing_forbidden_root_is_not_created_through_a_symlink() {
    let f = fixture();
    let root = Root::open(&f.root).expect("root");
    for name in ["sys", ".bootstrap"] {
        let path = format!("/up/{name}");
        let r = root
            .write_file(&path, &mut &b"x"[..], 0o644, 0, 0)
            .map(drop);
        assert!(
            matches!(r, Err(RootError::Forbidden { .. })),
            "{path}: {r:?}"
        );
        let r = root.make_symlink(&path, "/");
        assert!(
            matches!(r, Err(RootError::Forbidden { .. })),
            "{path}: {r:?}"
        );
        assert!(!f.root.join(name).exists(), "{name} was created");
    }
}

#[test]
fn a_manifest_through_a_planted_link_to_dev_fails_before_any_change() {
    let f = fixture();
    let bundle = tempfile::tempdir().expect("bundle");
    let before = dev_state(&f);
    let m = Manifest::parse(
        "version = 1\n[[files]]\npath = \"/etc/first\"\ncontent = \"x\"\n\
         [[directories]]\npath = \"/up/dev\"\nmode = 0o777\n",
        Path::new("bootlace.toml"),
    )
    .expect("a valid manifest");
    let e = apply::apply(
        &m,
        &Root::open(&f.root).expect("root"),
        &Root::open(bundle.path()).expect("bundle"),
        &mut ModuleLoader::new(),
        &InitConfig::default(),
    )
    .expect_err("applied through a link to /dev");
    let msg = bootlace_contract::chain(&e);
    assert!(msg.contains("/up/dev") && msg.contains("/dev"), "{msg}");
    assert_eq!(dev_state(&f), before, "/dev changed");
    assert!(!f.root.join("etc/first").exists(), "half-applied");
}

#[test]
fn opening_a_fifo_as_a_bundle_file_does_not_block() {
    let f = fixture();
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        f.root.join("etc/fifo"),
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .expect("mkfifo");
    let path = f.root.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let root = Root::open(&path).expect("root");
        let _ = tx.send(root.open_file("/etc/fifo").map(drop));
    });
    let r = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("open_file blocked on a FIFO");
    assert!(
        matches!(&r, Err(RootError::InTheWay { what, .. }) if what.contains("regular file")),
        "{r:?}"
    );
}

#[test]
fn a_last_component_of_dot_dot_never_reaches_the_parent_of_the_root() {
    let f = fixture();
    let parent = f.root.parent().expect("parent").to_owned();
    let before = std::fs::metadata(&parent).expect("stat");
    let root = Root::open(&f.root).expect("root");
    for path in ["/..", "/up/..", "/etc/..", "/.", "/etc/", ""] {
        for r in [
            root.make_dir(path, 0o777, 65534, 65534),
            root.preflight(path),
            root.write_file(path, &mut &b"x"[..], 0o644, 0, 0).map(drop),
            root.make_symlink(path, "/"),
        ] {
            assert!(
                matches!(&r, Err(RootError::InTheWay { what, .. }) if what.contains("not a name")),
                "{path:?}: {r:?}"
            );
        }
        assert!(!root.exists(path), "{path:?}");
    }
    let after = std::fs::metadata(&parent).expect("stat");
    assert_eq!(
        (
            before.mode(),
            before.uid(),
            before.gid(),
            before.ctime_nsec()
        ),
        (after.mode(), after.uid(), after.gid(), after.ctime_nsec()),
        "the directory holding the root changed"
    );
}
