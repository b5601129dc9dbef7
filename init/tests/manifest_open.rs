//! A manifest that cannot be opened says why: a symlink is not followed (it must be a regular
//! file), a missing one is named, and nothing is applied.

use std::path::Path;

use bootlace_contract::chain;
use bootlace_contract::config::InitConfig;
use bootlace_init::bootstrap::{self, BootstrapError};
use bootlace_init::modload::ModuleLoader;
use bootlace_init::sys::root::Root;

fn open_error(setup: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let bundle = dir.path().join("bundle");
    let root = dir.path().join("root");
    std::fs::create_dir_all(&bundle).expect("mkdir");
    std::fs::create_dir_all(&root).expect("mkdir");
    setup(&bundle);
    let e = bootstrap::apply_bundle(
        &Root::open(&bundle).expect("bundle"),
        Path::new("/.bootstrap"),
        &Root::open(&root).expect("root"),
        &InitConfig::default(),
        &mut ModuleLoader::new(),
    )
    .expect_err("refused");
    assert!(e.is_config(), "a manifest problem is a config error (78)");
    assert!(matches!(e, BootstrapError::OpenManifest { .. }), "{e:?}");
    assert_eq!(
        std::fs::read_dir(&root).expect("root").count(),
        0,
        "something was applied"
    );
    chain(&e)
}

#[test]
fn a_manifest_that_is_a_symlink_says_so() {
    let msg = open_error(|b| {
        std::fs::write(b.join("real.toml"), "version = 1\n").expect("write");
        std::os::unix::fs::symlink("real.toml", b.join("bootlace.toml")).expect("symlink");
    });
    assert_eq!(
        msg,
        "manifest: open /.bootstrap/bootlace.toml: bootlace.toml: a symlink, which is not \
         followed: it must be a regular file"
    );
}

#[test]
fn a_missing_manifest_is_named() {
    let msg = open_error(|_| {});
    assert!(
        msg.starts_with(
            "manifest: open /.bootstrap/bootlace.toml: bootlace.toml: open: No such file"
        ),
        "{msg}"
    );
}
