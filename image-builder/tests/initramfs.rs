//! `bake --format initramfs` against a small rootfs and a fake module tree: content, dependency
//! closure, reproducibility, compatibility with cpio(1), and no output on bad input. None of it
//! needs root: the archive is written from the input and the additions, nothing is staged.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use bootlace_contract::config::{unpacked_marker, InitConfig, ModuleName};
use bootlace_image::bake::{bake, BakeError, BakeSpec, Compression, Format, Report};
use bootlace_image::cpio::{self, Kind};
use bootlace_image::initramfs::Modules;

fn write(path: &Path, data: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, data).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("rootfs");
        write(&root.join("usr/bin/busybox"), b"#!fake busybox", 0o755);
        write(&root.join("usr/bin/setuid-tool"), b"x", 0o4755);
        write(&root.join("etc/hostname"), b"fixture\n", 0o644);
        std::fs::create_dir_all(root.join("usr/sbin")).expect("mkdir");
        std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        symlink("usr/bin", root.join("bin")).expect("symlink");
        symlink("usr/sbin", root.join("sbin")).expect("symlink");
        symlink("usr/lib", root.join("lib")).expect("symlink");
        symlink("busybox", root.join("usr/bin/sh")).expect("symlink");
        write(&root.join("init"), b"#!/bin/sh\n", 0o755);
        write(
            &dir.path().join("bootlace-init"),
            b"\x7fELF fake init",
            0o755,
        );
        let m = dir.path().join("modules/9.9.9-test");
        write(
            &m.join("modules.dep"),
            b"kernel/a/leaf.ko:\nkernel/a/mid.ko: kernel/a/leaf.ko\nkernel/a/top.ko: kernel/a/mid.ko kernel/a/leaf.ko\nkernel/a/other.ko:\n",
            0o644,
        );
        write(
            &m.join("modules.builtin"),
            b"kernel/fs/ext4/ext4.ko\n",
            0o644,
        );
        for name in ["leaf", "mid", "top", "other"] {
            write(
                &m.join(format!("kernel/a/{name}.ko")),
                name.as_bytes(),
                0o644,
            );
        }
        Fixture { dir }
    }

    /// The rootfs, the init, `top` loaded at boot (and `ext4` copied), every file root's,
    /// plain newc; the output is given to [`build`].
    fn spec(&self) -> BakeSpec {
        let mut s = BakeSpec::new(
            Format::Initramfs,
            PathBuf::new(),
            Some(self.dir.path().join("rootfs")),
            self.dir.path().join("bootlace-init"),
        );
        s.config = InitConfig {
            modules: vec![ModuleName::try_from("top".to_owned()).expect("name")],
            ..InitConfig::default()
        };
        s.modules = Some(Modules {
            root: self.dir.path().join("modules"),
            release: "9.9.9-test".to_owned(),
            extra: vec![ModuleName::try_from("ext4".to_owned()).expect("name")],
        });
        s.all_root = true;
        s.mtime = 1_700_000_000;
        s.compress = Some(Compression::None);
        s
    }
}

/// Bakes `spec` into `out`.
fn build(spec: &BakeSpec, out: &Path) -> Result<Report, BakeError> {
    let spec = BakeSpec {
        out: out.to_owned(),
        ..spec.clone()
    };
    bake(&spec, &mut |_| {})
}

#[test]
fn archive_holds_the_rootfs_init_config_and_module_closure() {
    let f = Fixture::new();
    let out = f.dir.path().join("out.cpio");
    let report = build(&f.spec(), &out).expect("build");
    assert_eq!(report.meta.modules, ["leaf", "mid", "top"]);
    let entries = cpio::read_all(&std::fs::read(&out).expect("read")).expect("parse");
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.header.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in {:?}",
                    entries.iter().map(|e| &e.header.name).collect::<Vec<_>>()
                )
            })
    };
    // The init lands where /sbin points (merged /usr), /init links to it.
    assert_eq!(get("usr/sbin/bootlace-init").data, b"\x7fELF fake init");
    assert_eq!(get("usr/sbin/bootlace-init").header.perm, 0o755);
    assert_eq!(
        get("init").header.kind,
        Kind::Symlink {
            target: "/sbin/bootlace-init".into()
        }
    );
    assert_eq!(
        get("sbin").header.kind,
        Kind::Symlink {
            target: "usr/sbin".into()
        }
    );
    assert_eq!(
        get("dev/console").header.kind,
        Kind::CharDev { major: 5, minor: 1 }
    );
    assert_eq!(get("usr/bin/setuid-tool").header.perm, 0o4755);
    let config = String::from_utf8(get("etc/bootlace/init.toml").data.clone()).expect("utf8");
    let parsed =
        InitConfig::from_toml(&config, Path::new("init.toml")).expect("baked config is valid");
    let mut want = f.spec().config;
    want.root.unpacked_marker = Some(unpacked_marker());
    assert_eq!(parsed, want);
    assert_eq!(
        String::from_utf8(get("usr/lib/modules/9.9.9-test/modules.dep").data.clone()).expect("utf8"),
        "kernel/a/leaf.ko:\nkernel/a/mid.ko: kernel/a/leaf.ko\nkernel/a/top.ko: kernel/a/mid.ko kernel/a/leaf.ko\n"
    );
    assert_eq!(
        get("usr/lib/modules/9.9.9-test/kernel/a/top.ko").data,
        b"top"
    );
    assert!(entries.iter().all(|e| !e.header.name.ends_with("other.ko")));
    assert!(entries
        .iter()
        .all(|e| e.header.uid == 0 && e.header.gid == 0));
    assert!(entries.iter().all(|e| e.header.mtime == 1_700_000_000));
    // Parents come before children.
    let names: Vec<&str> = entries.iter().map(|e| e.header.name.as_str()).collect();
    for (i, n) in names.iter().enumerate() {
        if let Some((parent, _)) = n.rsplit_once('/') {
            let p = names
                .iter()
                .position(|x| *x == parent)
                .expect("parent present");
            assert!(p < i, "{parent} after {n}");
        }
    }
}

/// Issue 12, items 2 and 3: the archive's first entry is its root, 0755 root:root (else the
/// guest's `/` is world-writable), its last is the marker the init checks for a whole unpack
/// (an input's own marker is left out), and the metadata says what the guest needs.
#[test]
fn root_entry_first_marker_last_and_the_memory_it_needs() {
    let f = Fixture::new();
    write(
        &f.dir.path().join("rootfs/etc/bootlace/unpacked"),
        b"stale",
        0o600,
    );
    let mut spec = f.spec();
    // Owners as on disk: the root entry is root's whoever bakes.
    spec.all_root = false;
    let out = f.dir.path().join("out.cpio");
    let report = build(&spec, &out).expect("build");
    let entries = cpio::read_all(&std::fs::read(&out).expect("read")).expect("parse");
    let first = &entries.first().expect("entries").header;
    assert_eq!(
        (
            first.name.as_str(),
            &first.kind,
            first.perm,
            first.uid,
            first.gid
        ),
        (".", &Kind::Dir, 0o755, 0, 0)
    );
    let last = entries.last().expect("entries");
    assert_eq!(last.header.name, "etc/bootlace/unpacked");
    assert_eq!(last.header.kind, Kind::File { size: 0 });
    assert_eq!((last.header.perm, last.header.uid), (0o644, 0));
    let markers = entries
        .iter()
        .filter(|e| e.header.name == "etc/bootlace/unpacked")
        .count();
    assert_eq!(markers, 1, "the input's own marker is left out");
    assert_eq!(entries.iter().filter(|e| e.header.name == ".").count(), 1);
    let config = entries
        .iter()
        .find(|e| e.header.name == "etc/bootlace/init.toml")
        .expect("config");
    let parsed = InitConfig::from_toml(
        std::str::from_utf8(&config.data).expect("utf8"),
        Path::new("init.toml"),
    )
    .expect("config");
    assert_eq!(parsed.root.unpacked_marker, Some(unpacked_marker()));
    assert_eq!(parsed.root.read_only, None);
    // Each file and symlink in whole pages: at least a page per file, less than the archive
    // plus a page per entry.
    let m = &report.meta;
    let unpacked = m.unpacked_size.expect("unpacked_size");
    let files = entries
        .iter()
        .filter(|e| matches!(e.header.kind, Kind::File { .. } | Kind::Symlink { .. }))
        .count() as u64;
    let nonempty = entries
        .iter()
        .filter(|e| !e.data.is_empty() || matches!(e.header.kind, Kind::Symlink { .. }))
        .count() as u64;
    assert!(unpacked >= nonempty * 4096, "{unpacked} < {nonempty} pages");
    assert!(unpacked <= m.size + files * 4096, "{unpacked}");
    assert_eq!(
        m.min_memory_mib,
        Some(bootlace_image::need::min_memory_mib(
            m.size,
            Some(&bootlace_image::initramfs::ArchiveSummary {
                entries: entries.len() as u64,
                bytes: 0,
                unpacked,
            })
        ))
    );
    assert!(m.min_memory_mib.expect("min") >= bootlace_image::need::FLOOR_MIB);
    let text = std::fs::read_to_string(f.dir.path().join("out.cpio.meta.json")).expect("meta");
    assert!(text.contains("\"unpacked_size\"") && text.contains("\"min_memory_mib\""));
}

#[test]
fn same_inputs_give_identical_bytes_and_cpio_reads_them() {
    let f = Fixture::new();
    for compression in Compression::ALL {
        let mut spec = f.spec();
        spec.compress = Some(compression);
        let a = f.dir.path().join("a.img");
        let b = f.dir.path().join("b.img");
        build(&spec, &a).expect("build a");
        // Touch the sources: mtimes must not leak into the output.
        let busybox = f.dir.path().join("rootfs/usr/bin/busybox");
        std::fs::write(&busybox, b"#!fake busybox").expect("rewrite");
        build(&spec, &b).expect("build b");
        assert_eq!(
            std::fs::read(&a).expect("a"),
            std::fs::read(&b).expect("b"),
            "{compression:?}"
        );
    }
    let plain = f.dir.path().join("a.img");
    let mut spec = f.spec();
    spec.compress = Some(Compression::None);
    build(&spec, &plain).expect("build");
    let out = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&plain)
        .output()
        .expect("cpio(1) installed by make setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    for want in [
        "usr/sbin/bootlace-init",
        "etc/bootlace/init.toml",
        "dev/console",
        "init",
    ] {
        assert!(
            listed.lines().any(|l| l == want),
            "cpio -t lacks {want}:\n{listed}"
        );
    }
}

#[test]
fn bad_input_leaves_no_output() {
    let f = Fixture::new();
    let out = f.dir.path().join("out.img");
    let cases: Vec<(BakeSpec, &str)> = vec![
        (
            BakeSpec {
                init: f.dir.path().join("missing-init"),
                ..f.spec()
            },
            "init binary",
        ),
        (
            BakeSpec {
                input: Some(f.dir.path().join("no-rootfs")),
                ..f.spec()
            },
            "no-rootfs",
        ),
        (
            {
                let mut s = f.spec();
                s.config
                    .modules
                    .push(ModuleName::try_from("absent".to_owned()).expect("name"));
                s
            },
            "\"absent\" not found",
        ),
        (
            BakeSpec {
                modules: None,
                ..f.spec()
            },
            "no kernel release",
        ),
        (
            {
                // The input has a directory where the /init link goes.
                let mut s = f.spec();
                let input = f.dir.path().join("dir-init");
                std::fs::create_dir_all(input.join("init/x")).expect("mkdir");
                s.input = Some(input);
                s
            },
            "the input has a directory at /init",
        ),
    ];
    for (spec, want) in cases {
        let err = build(&spec, &out).expect_err(want);
        let chain = format!("{:#}", anyhow::Error::from(err));
        assert!(chain.contains(want), "{chain:?} lacks {want:?}");
        assert!(!out.exists(), "partial output left for {want}");
        let leftovers: Vec<_> = std::fs::read_dir(f.dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".bootlace-"))
            .collect();
        assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    }
}
