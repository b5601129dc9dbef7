//! `bootlace-image` refuses at bake time what the init would refuse at boot, with the same
//! validation (bootlace-contract's config): a vsock source without a host, a bad trusted key, an
//! unknown source (naming the known ones), and — what only the builder can know — a source the
//! target kernel has no drivers for. Each refusal leaves no output and no metadata.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A stand-in init: a script that answers `--version` like the real one.
fn fake_init(dir: &Path) -> PathBuf {
    let p = dir.join("bootlace-init");
    std::fs::write(&p, "#!/bin/sh\necho bootlace-init 9.9.9\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A module tree for release `r` with the given module files and a modules.dep listing them
/// (no dependencies), like a kernel built without the rest.
fn modules_tree(root: &Path, r: &str, modules: &[&str]) {
    let dir = root.join(r);
    std::fs::create_dir_all(dir.join("kernel")).expect("mkdir");
    let mut dep = String::new();
    for m in modules {
        let rel = format!("kernel/{m}.ko");
        std::fs::write(dir.join(&rel), b"\x7fELF module").expect("module");
        dep.push_str(&format!("{rel}:\n"));
    }
    std::fs::write(dir.join("modules.dep"), dep).expect("modules.dep");
    std::fs::write(dir.join("modules.builtin"), "").expect("modules.builtin");
}

/// Runs `bootlace-image bake --format initramfs` with `args`; returns the exit code and stderr,
/// and checks that nothing was left at the output path.
fn bake(tmp: &Path, args: &[&str]) -> (Option<i32>, String) {
    let out = tmp.join("out.img");
    let o = Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
        .args(["bake", "--format", "initramfs", "--init"])
        .arg(fake_init(tmp))
        .arg("--out")
        .arg(&out)
        .args(args)
        .output()
        .expect("run bootlace-image");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    if !o.status.success() {
        assert!(!out.exists(), "{} left after a refusal", out.display());
        assert!(
            !tmp.join("out.img.meta.json").exists(),
            "metadata left after a refusal"
        );
    }
    (o.status.code(), stderr)
}

#[test]
fn what_the_init_refuses_the_builder_refuses() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let modules = tmp.path().join("modules");
    modules_tree(
        &modules,
        "6.1.0-test",
        &["virtio_pci", "virtio_blk", "vmw_vsock_virtio_transport"],
    );
    let m = modules.to_str().expect("utf-8");
    let digest = format!("sha256:{}", "ab".repeat(32));
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--source", "vsock"],
            1,
            "the vsock source needs a host (host.address, bootlace.host= or --host vsock:2:PORT)",
        ),
        (
            &["--source", "vsock", "--host", "vsock:2:1024", "--trust-key", "ed25519:AAAA"],
            1,
            "--trust-key: ed25519:AAAA: public key \"ed25519:AAAA\" must be ed25519:<base64 of 32 bytes>",
        ),
        (
            &[
                "--source",
                "vsock",
                "--host",
                "vsock-notify:2:1024",
                "--digest",
                &digest,
            ],
            1,
            "the vsock source needs a host that answers: vsock-notify:2:1024 is notify-only",
        ),
        // An unknown source is a usage error that lists the known ones.
        (
            &["--source", "disk,nfs"],
            2,
            "bootstrap source \"nfs\" is not a bootstrap source (known: disk, 9p, vsock)",
        ),
        (
            &["--host", "tcp:1.2.3.4:5"],
            2,
            "must be vsock:<cid>:<port>",
        ),
        (&["--digest", "md5:00"], 2, "sha256:<64 hex digits>"),
        // The kernel has no 9p: booting would wait out the source's timeout every time.
        (
            &[
                "--source",
                "9p",
                "--modules-root",
                m,
                "--kernel-release",
                "6.1.0-test",
            ],
            1,
            "the 9p source needs kernel modules that 6.1.0-test does not have (9pnet_virtio, 9p)",
        ),
    ];
    for (args, code, want) in cases {
        let (got, stderr) = bake(tmp.path(), args);
        assert_eq!(got, Some(*code), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr:?} lacks {want:?}");
    }
    // What the kernel does have bakes.
    let (got, stderr) = bake(
        tmp.path(),
        &[
            "--source",
            "disk,vsock",
            "--host",
            "vsock:2:1024",
            "--digest",
            &digest,
            "--modules-root",
            m,
            "--kernel-release",
            "6.1.0-test",
        ],
    );
    assert_eq!(got, Some(0), "{stderr}");
}
