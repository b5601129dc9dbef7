//! `bootlace-image bake` end to end: every format from the busybox fixture, twice, byte for
//! byte, and the same bytes through the overlay and the mirror; the contents the init needs; an
//! OCI layout with two layers, a whiteout and an opaque directory; the layer cache; bad inputs
//! and flags refused for the format, each with a clear error and nothing left behind; the
//! command line's `--json` and exit statuses. The disk formats, tarballs and layers keep
//! owners, setuid bits and device nodes and mount overlays: those tests need root
//! (`cargo test -- --include-ignored` as root); an initramfs of a directory does not.

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use bootlace_contract::image::{ImageMeta, InputKind};
use bootlace_image::bake::{bake, BakeSpec, Compression, Format, Staging, StagingMode};
use sha2::{Digest, Sha256};

const EPOCH: u64 = 1_700_000_000;

/// A stand-in init: a script that answers `--version` like the real one.
fn fake_init(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("bootlace-init");
    std::fs::write(&p, "#!/bin/sh\necho bootlace-init 9.9.9\n")?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

fn busybox_rootfs(dir: &Path) -> Result<PathBuf> {
    ensure!(
        Path::new("/bin/busybox").exists(),
        "/bin/busybox is missing: `make setup` installs busybox-static"
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox-rootfs.sh");
    let root = dir.join("rootfs");
    let out = Command::new("bash").arg(&script).arg(&root).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(root)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sha256_file(p: &Path) -> Result<String> {
    let bytes = std::fs::read(p)?;
    Ok(bootlace_contract::digest::hex(&Sha256::digest(&bytes)))
}

/// The file names in a directory, sorted.
fn names(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

fn spec(format: Format, out: &Path, input: &Path, init: &Path) -> BakeSpec {
    let mut s = BakeSpec::new(
        format,
        out.to_owned(),
        Some(input.to_owned()),
        init.to_owned(),
    );
    s.mtime = EPOCH;
    s.version = "1.0".into();
    s
}

/// The paths in an image, extracted or listed with the format's own tools, as absolute paths.
fn image_paths(format: Format, img: &Path, scratch: &Path) -> Result<BTreeSet<String>> {
    let mut set = BTreeSet::new();
    match format {
        Format::Initramfs => {
            let raw = std::fs::read(img)?;
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut data)?;
            for e in bootlace_image::cpio::read_all(&data)? {
                set.insert(format!("/{}", e.header.name));
            }
        }
        Format::Disk => anyhow::bail!("a bootable disk is read in tests/tests/disk_bake.rs"),
        Format::Squashfs => {
            for l in run(Command::new("unsquashfs").args(["-l", "-d", ""]).arg(img))?.lines() {
                set.insert(l.trim().to_owned());
            }
        }
        Format::Erofs | Format::Qcow2 | Format::Ext4 => {
            let raw = if format == Format::Qcow2 {
                let raw = scratch.join("qcow2.raw");
                run(Command::new("qemu-img")
                    .args(["convert", "-f", "qcow2", "-O", "raw"])
                    .arg(img)
                    .arg(&raw))?;
                raw
            } else {
                img.to_owned()
            };
            let dir = scratch.join("extract");
            let _ = std::fs::remove_dir_all(&dir);
            if format == Format::Ext4 {
                std::fs::create_dir_all(&dir)?;
                run(Command::new("debugfs")
                    .arg("-R")
                    .arg(format!("rdump / {}", dir.display()))
                    .arg(&raw))?;
            } else {
                run(Command::new("fsck.erofs")
                    .arg(format!("--extract={}", dir.display()))
                    .arg(&raw))?;
            }
            let base = dir.clone();
            let mut stack = vec![base.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d)? {
                    let p = e?.path();
                    set.insert(format!("/{}", p.strip_prefix(&base)?.display()));
                    if std::fs::symlink_metadata(&p)?.is_dir() {
                        stack.push(p);
                    }
                }
            }
        }
    }
    Ok(set)
}

#[test]
#[ignore = "needs root"]
fn every_format_from_the_busybox_fixture_twice_is_identical() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rootfs = busybox_rootfs(tmp.path())?;
    let init = fake_init(tmp.path())?;
    // A bootable disk carries a real kernel and stage 1: tests/tests/disk_bake.rs bakes it
    // twice with the real init.
    for format in Format::ALL.into_iter().filter(|f| !f.is_bootable()) {
        let mut shas = Vec::new();
        for round in ["a", "b"] {
            let dir = tmp.path().join(format!("{format}-{round}"));
            std::fs::create_dir(&dir)?;
            let out = dir.join(format!("root.{format}"));
            let report = bake(&spec(format, &out, &rootfs, &init), &mut |_| {})
                .with_context(|| format!("bake {format}"))?;
            let m = ImageMeta::read(&ImageMeta::path_for(&out))?;
            assert_eq!(m, report.meta);
            assert_eq!(m.sha256, sha256_file(&out)?, "{format}");
            assert_eq!(m.size, std::fs::metadata(&out)?.len());
            assert_eq!(m.format, format);
            assert_eq!(m.file, format!("root.{format}"));
            assert_eq!(m.name, "root");
            assert_eq!(m.version, "1.0");
            assert_eq!(m.init.version, "9.9.9");
            assert_eq!(m.init.sha256, sha256_file(&init)?);
            assert_eq!(m.built, "2023-11-14T22:13:20Z");
            assert_eq!(m.inputs.len(), 1);
            assert_eq!(m.inputs[0].kind, InputKind::Dir);
            let read_only = matches!(format, Format::Erofs | Format::Squashfs | Format::Qcow2);
            assert_eq!(m.read_only, read_only, "{format}");
            let want_writable: Vec<String> = if read_only {
                ["/etc", "/var", "/tmp", "/home"].map(String::from).to_vec()
            } else {
                Vec::new()
            };
            assert_eq!(m.writable, want_writable, "{format}");
            // Nothing but the image and its metadata in the output directory.
            assert_eq!(
                names(&dir)?,
                vec![format!("root.{format}"), format!("root.{format}.meta.json")]
            );
            if round == "a" {
                let paths = image_paths(format, &out, &dir)?;
                for want in [
                    "/sbin/bootlace-init",
                    "/etc/bootlace/init.toml",
                    "/.bootstrap",
                    "/proc",
                    "/sys",
                    "/dev",
                    "/run",
                    "/tmp",
                    "/bin/busybox",
                ] {
                    assert!(paths.contains(want), "{format}: {want} missing");
                }
                if read_only {
                    assert!(paths.contains("/home"), "{format}: /home missing");
                }
                if format == Format::Initramfs {
                    assert!(paths.contains("/init") && paths.contains("/dev/console"));
                }
            }
            assert!(m.inputs[0].digest.starts_with("sha256:"));
            shas.push(format!("{} {}", m.sha256, m.inputs[0].digest));
        }
        assert_eq!(shas[0], shas[1], "{format}: two bakes differ");
        eprintln!("{format}: sha256 {} twice", shas[0]);
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn baked_config_and_modes_in_an_ext4_root() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let rootfs = busybox_rootfs(tmp.path())?;
    let init = fake_init(tmp.path())?;
    let out = tmp.path().join("root.ext4");
    let mut s = spec(Format::Ext4, &out, &rootfs, &init);
    s.writable = Some(vec!["/etc".into(), "/srv/data".into()]);
    s.label = Some("myroot".into());
    bake(&s, &mut |_| {})?;
    let cat = run(Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/bootlace/init.toml")
        .arg(&out))?;
    assert!(
        cat.contains("writable = [\"/etc\", \"/srv/data\"]"),
        "{cat}"
    );
    // Issue 12, item 7: stage 1 mounts an ext4 root read-write by the image's own config.
    let baked = bootlace_contract::config::InitConfig::from_toml(&cat, Path::new("init.toml"))?;
    assert_eq!(baked.root.read_only, Some(false), "{cat}");
    assert_eq!(baked.root.unpacked_marker, None, "{cat}");
    let stat = |p: &str| -> Result<String> {
        run(Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {p}"))
            .arg(&out))
    };
    assert!(
        stat("/.bootstrap")?.contains("Mode:  0700"),
        "{}",
        stat("/.bootstrap")?
    );
    assert!(stat("/sbin/bootlace-init")?.contains("Mode:  0755"));
    assert!(stat("/srv/data")?.contains("Type: directory"));
    let label = run(Command::new("e2label").arg(&out))?;
    assert_eq!(label.trim(), "myroot");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Tarballs and OCI layouts, made here.

#[derive(Clone)]
enum E {
    Dir(&'static str, u32),
    File(&'static str, &'static [u8], u32, u32),
    Sym(&'static str, &'static str),
    Hard(&'static str, &'static str),
}

/// A tar stream with these entries, names written as given (even `..` or absolute ones).
fn tar_bytes(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        let (name, data): (&str, &[u8]) = match e {
            E::Dir(n, mode) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                (n, b"")
            }
            E::File(n, d, mode, uid) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(u64::from(*uid));
                h.set_gid(u64::from(*uid));
                (n, d)
            }
            E::Sym(n, t) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_link_name(t).expect("link name");
                (n, b"")
            }
            E::Hard(n, t) => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                (n, b"")
            }
        };
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_cksum();
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("finish")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

fn digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        bootlace_contract::digest::hex(&Sha256::digest(data))
    )
}

/// Writes a blob; returns its descriptor JSON.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> Result<serde_json::Value> {
    let d = digest(data);
    let p = layout.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().expect("parent"))?;
    std::fs::write(&p, data)?;
    Ok(serde_json::json!({"mediaType": media_type, "digest": d, "size": data.len()}))
}

/// An OCI layout with these layers (media type, bytes), bottom first. Returns the layer
/// digests.
fn oci_layout(layout: &Path, layers: &[(&str, Vec<u8>)]) -> Result<Vec<String>> {
    std::fs::create_dir_all(layout)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )?;
    let mut descs = Vec::new();
    for (t, data) in layers {
        descs.push(blob(layout, t, data)?);
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config)?,
    )?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": descs,
    });
    let mut m = blob(
        layout,
        "application/vnd.oci.image.manifest.v1+json",
        &serde_json::to_vec(&manifest)?,
    )?;
    m["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "test"});
    m["platform"] = serde_json::json!({"architecture": "amd64", "os": "linux"});
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap_or_default().to_owned())
        .collect())
}

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

fn two_layers() -> Vec<(&'static str, Vec<u8>)> {
    let lower = tar_bytes(&[
        E::Dir("etc/", 0o755),
        E::File("etc/a.conf", b"a", 0o644, 0),
        E::File("etc/old.conf", b"old", 0o644, 0),
        E::Dir("opt/", 0o755),
        E::Dir("opt/app/", 0o750),
        E::File("opt/app/lib1", b"lib1", 0o644, 0),
        E::Dir("opt/app/sub/", 0o755),
        E::File("opt/app/sub/x", b"x", 0o644, 0),
        E::Dir("usr/", 0o755),
        E::Dir("usr/lib/", 0o755),
        E::Sym("lib", "usr/lib"),
        E::Dir("bin/", 0o755),
        E::File("bin/tool", b"#!tool", 0o4755, 1000),
        E::Hard("bin/tool2", "bin/tool"),
    ]);
    let upper = tar_bytes(&[
        E::File("etc/.wh.old.conf", b"", 0o644, 0),
        E::File("opt/app/new", b"new", 0o600, 0),
        E::File("opt/app/.wh..wh..opq", b"", 0o644, 0),
        E::File("lib/added.so", b"added", 0o644, 0),
        E::File("etc/b.conf", b"b", 0o640, 0),
    ]);
    vec![(TAR, lower), (TAR_GZ, gzip(&upper))]
}

/// Extracts a squashfs image (unsquashfs as root keeps owners and modes).
fn unsquash(img: &Path, into: &Path) -> Result<()> {
    run(Command::new("unsquashfs")
        .args(["-no-progress", "-q", "-d"])
        .arg(into)
        .arg(img))?;
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn oci_layers_whiteouts_opaque_dirs_and_the_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let layout = tmp.path().join("layout");
    let digests = oci_layout(&layout, &two_layers())?;
    let cache = tmp.path().join("cache");
    let mut shas = Vec::new();
    // No cache, then a cold cache, then a warm one: the same image each time.
    for (round, cache) in [
        ("nocache", None),
        ("cold", Some(&cache)),
        ("warm", Some(&cache)),
    ] {
        let out = tmp.path().join(format!("{round}.squashfs"));
        let mut s = spec(Format::Squashfs, &out, &layout, &init);
        s.cache = cache.cloned();
        let mut lines = Vec::new();
        let report = bake(&s, &mut |l| lines.push(l.to_owned()))?;
        let want: Vec<(String, bool)> = digests
            .iter()
            .map(|d| (d.clone(), round == "warm"))
            .collect();
        assert_eq!(report.layers, want, "{round}");
        if round == "warm" {
            for d in &digests {
                assert!(lines.contains(&format!("layer {d} cached")), "{lines:?}");
            }
        }
        assert_eq!(report.meta.inputs[0].kind, InputKind::Oci);
        shas.push(report.meta.sha256.clone());

        let x = tmp.path().join(format!("{round}.x"));
        unsquash(&out, &x)?;
        let read = |p: &str| std::fs::read_to_string(x.join(p)).unwrap_or_default();
        assert_eq!(read("etc/a.conf"), "a");
        assert_eq!(read("etc/b.conf"), "b");
        assert!(!x.join("etc/old.conf").exists(), "whiteout not applied");
        assert_eq!(read("opt/app/new"), "new");
        assert!(
            !x.join("opt/app/lib1").exists(),
            "opaque dir kept lower file"
        );
        assert!(!x.join("opt/app/sub").exists(), "opaque dir kept lower dir");
        assert_eq!(
            read("usr/lib/added.so"),
            "added",
            "lib -> usr/lib not followed"
        );
        assert_eq!(std::fs::read_link(x.join("lib"))?, Path::new("usr/lib"));
        let tool = std::fs::symlink_metadata(x.join("bin/tool"))?;
        assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid bit lost");
        assert_eq!((tool.uid(), tool.gid()), (1000, 1000), "owner lost");
        let tool2 = std::fs::symlink_metadata(x.join("bin/tool2"))?;
        assert_eq!(tool2.ino(), tool.ino(), "hard link lost");
        assert_eq!(
            std::fs::symlink_metadata(x.join("opt/app"))?.mode() & 0o7777,
            0o750
        );
        // No whiteout file anywhere.
        let mut stack = vec![x.clone()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d)? {
                let e = e?;
                assert!(
                    !e.file_name().to_string_lossy().starts_with(".wh."),
                    "{}",
                    e.path().display()
                );
                if e.file_type()?.is_dir() {
                    stack.push(e.path());
                }
            }
        }
        // Init, config, writable dirs and /.bootstrap (0700) are there.
        assert!(x.join("sbin/bootlace-init").is_file());
        assert!(read("etc/bootlace/init.toml").contains("/home"));
        assert_eq!(
            std::fs::metadata(x.join(".bootstrap"))?.mode() & 0o7777,
            0o700
        );
        for d in ["var", "tmp", "home", "proc", "sys", "dev", "run"] {
            assert!(x.join(d).is_dir(), "{d}");
        }
    }
    assert!(shas.windows(2).all(|w| w[0] == w[1]), "{shas:?}");
    // Hard-linked from the cache or unpacked straight into staging: the same bytes.
    for format in [Format::Erofs, Format::Ext4] {
        let mut two = Vec::new();
        for cache in [None, Some(&cache)] {
            let out = tmp.path().join(format!("{}.{format}", cache.is_some()));
            let mut s = spec(format, &out, &layout, &init);
            s.cache = cache.cloned();
            two.push(bake(&s, &mut |_| {})?.meta.sha256);
        }
        assert_eq!(
            two[0], two[1],
            "{format}: cached and uncached layers differ"
        );
    }
    // The cache holds one committed entry per layer and no temporary directory.
    let entries = names(&cache.join("sha256"))?;
    let mut want: Vec<String> = digests.iter().map(|d| d[7..].to_owned()).collect();
    want.sort();
    assert_eq!(entries, want);
    assert_eq!(names(&cache)?, vec!["sha256".to_owned()]);
    Ok(())
}

/// Layers cached by digest are reused across images: two OCI layouts (two images) sharing a
/// base layer, baked into one cache; the second bake takes the base from the cache
/// (`layer sha256:… cached`) and unpacks only its own layer, and each image has its own files
/// over the shared base.
#[test]
#[ignore = "needs root"]
fn a_layer_cached_by_one_image_is_reused_by_another() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let cache = tmp.path().join("cache");
    let base = two_layers().swap_remove(0);
    let mut bakes = Vec::new();
    for (name, file) in [("web", "opt/web"), ("db", "opt/db")] {
        let app = gzip(&tar_bytes(&[
            E::Dir("opt/", 0o755),
            E::File(file, name.as_bytes(), 0o644, 0),
        ]));
        let layout = tmp.path().join(format!("{name}-layout"));
        let digests = oci_layout(&layout, &[base.clone(), (TAR_GZ, app)])?;
        let out = tmp.path().join(format!("{name}.squashfs"));
        let mut s = spec(Format::Squashfs, &out, &layout, &init);
        s.name = Some(name.to_owned());
        s.cache = Some(cache.clone());
        let mut lines = Vec::new();
        let report = bake(&s, &mut |l| lines.push(l.to_owned()))?;
        let x = tmp.path().join(format!("{name}.x"));
        unsquash(&out, &x)?;
        assert_eq!(std::fs::read_to_string(x.join("opt").join(name))?, name);
        assert_eq!(std::fs::read_to_string(x.join("etc/a.conf"))?, "a", "base");
        bakes.push((digests, report.layers, lines));
    }
    let (web, db) = (&bakes[0], &bakes[1]);
    assert_eq!(web.0[0], db.0[0], "the base layer is the same blob");
    assert_ne!(web.0[1], db.0[1]);
    // The first image fills the cache; the second reuses the base and unpacks its own layer.
    assert_eq!(
        web.1,
        [(web.0[0].clone(), false), (web.0[1].clone(), false)]
    );
    assert_eq!(db.1, [(db.0[0].clone(), true), (db.0[1].clone(), false)]);
    assert!(
        db.2.contains(&format!("layer {} cached", db.0[0])),
        "{:?}",
        db.2
    );
    assert!(
        !db.2.contains(&format!("layer {} cached", db.0[1])),
        "{:?}",
        db.2
    );
    // One entry per distinct layer: three, not four.
    assert_eq!(names(&cache.join("sha256"))?.len(), 3);
    Ok(())
}

/// Opaque markers after the layer's own entries: in the bottom layer (nothing below to remove)
/// and in an upper one whose own entry sorts before the marker (`-x`); with and without the
/// cache, the layer's own entries stay and only the lower layer's go.
#[test]
#[ignore = "needs root"]
fn opaque_markers_keep_the_layers_own_entries() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let lower = tar_bytes(&[
        E::File("a/1", b"1", 0o644, 0),
        E::File("a/.wh..wh..opq", b"", 0o644, 0),
        E::File("a/2", b"2", 0o644, 0),
        E::File("d/old", b"old", 0o644, 0),
    ]);
    let upper = tar_bytes(&[
        E::File("d/-x", b"x", 0o644, 0),
        E::File("d/new", b"new", 0o644, 0),
        E::File("d/.wh..wh..opq", b"", 0o644, 0),
    ]);
    let layout = tmp.path().join("layout");
    oci_layout(&layout, &[(TAR, lower), (TAR_GZ, gzip(&upper))])?;
    let cache = tmp.path().join("cache");
    for cache in [None, Some(&cache)] {
        let out = tmp.path().join(format!("{}.squashfs", cache.is_some()));
        let mut s = spec(Format::Squashfs, &out, &layout, &init);
        s.cache = cache.cloned();
        bake(&s, &mut |_| {})?;
        let x = tmp.path().join(format!("{}.x", cache.is_some()));
        unsquash(&out, &x)?;
        for kept in ["a/1", "a/2", "d/-x", "d/new"] {
            assert!(x.join(kept).is_file(), "cache {}: {kept}", cache.is_some());
        }
        assert!(!x.join("d/old").exists(), "cache {}", cache.is_some());
    }
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn tarballs_by_magic_gzip_and_zstd() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let plain = tar_bytes(&[
        E::Dir("etc/", 0o755),
        E::File("etc/hostname", b"h\n", 0o644, 0),
        E::File("usr/bin/app", b"app", 0o755, 0),
    ]);
    let zst = zstd::stream::encode_all(&plain[..], 3)?;
    let mut shas = BTreeSet::new();
    for (name, data) in [
        ("root.tar", plain.clone()),
        ("root.bin", gzip(&plain)),
        ("root.tar.zst", zst),
    ] {
        let input = tmp.path().join(name);
        std::fs::write(&input, &data)?;
        let out = tmp.path().join(format!("{name}.img"));
        let mut s = spec(Format::Initramfs, &out, &input, &init);
        s.compress = Some(Compression::Zstd);
        let r = bake(&s, &mut |_| {})?;
        assert_eq!(r.meta.inputs[0].kind, InputKind::Tar);
        assert_eq!(r.meta.inputs[0].digest, digest(&data));
        shas.insert(r.meta.sha256.clone());
        let cpio = zstd::stream::decode_all(&std::fs::read(&out)?[..])?;
        let entries = bootlace_image::cpio::read_all(&cpio)?;
        assert!(entries.iter().any(|e| e.header.name == "usr/bin/app"));
    }
    assert_eq!(shas.len(), 1, "same tree, same image: {shas:?}");
    Ok(())
}

/// A bad bake: the error's text, and the output directory must hold nothing new.
fn bad_bake(s: &BakeSpec) -> String {
    let dir = s.out.parent().expect("parent").to_owned();
    let before = names(&dir).expect("names");
    let err = bake(s, &mut |_| {}).expect_err("bake should fail");
    let text = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(names(&dir).expect("names"), before, "left behind: {text}");
    text
}

#[test]
#[ignore = "needs root"]
fn bad_inputs_give_clear_errors_and_leave_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir)?;
    let out = outdir.join("root.erofs");
    // An OCI layout, then one byte of a layer changed (same size).
    let layout = tmp.path().join("layout");
    let digests = oci_layout(&layout, &two_layers())?;
    let blob_path = |d: &str| layout.join("blobs/sha256").join(&d[7..]);
    let good = std::fs::read(blob_path(&digests[0]))?;
    let mut bad = good.clone();
    bad[600] ^= 0x20;
    std::fs::write(blob_path(&digests[0]), &bad)?;
    let e = bad_bake(&spec(Format::Erofs, &out, &layout, &init));
    assert!(
        e.contains(&format!("blob {}: digest mismatch", digests[0])),
        "{e}"
    );
    std::fs::write(blob_path(&digests[0]), &good)?;
    // The same through the cache: nothing committed for the bad layer.
    std::fs::write(blob_path(&digests[0]), &bad)?;
    let mut s = spec(Format::Erofs, &out, &layout, &init);
    let cache = tmp.path().join("cache");
    s.cache = Some(cache.clone());
    let e = bad_bake(&s);
    assert!(e.contains("digest mismatch"), "{e}");
    assert!(
        names(&cache.join("sha256"))?.is_empty(),
        "a bad layer was cached"
    );
    assert_eq!(names(&cache)?, vec!["sha256".to_owned()]);
    std::fs::write(blob_path(&digests[0]), &good)?;
    // A missing blob.
    std::fs::remove_file(blob_path(&digests[1]))?;
    let e = bad_bake(&spec(Format::Erofs, &out, &layout, &init));
    assert!(
        e.contains(&format!("blob {}", digests[1])) && e.contains("No such file"),
        "{e}"
    );

    let tarball = |name: &str, data: &[u8]| -> Result<PathBuf> {
        let p = tmp.path().join(name);
        std::fs::write(&p, data)?;
        Ok(p)
    };
    // A corrupt (truncated) tarball.
    let gz = gzip(&tar_bytes(&[E::File("etc/x", &[7u8; 3000], 0o644, 0)]));
    let corrupt = tarball("corrupt.tar.gz", &gz[..gz.len() / 2])?;
    let e = bad_bake(&spec(Format::Erofs, &out, &corrupt, &init));
    assert!(
        e.contains("corrupt.tar.gz: corrupt or unreadable archive"),
        "{e}"
    );
    // Not a tarball at all.
    let junk = tarball("junk.tar", &[b'x'; 2048])?;
    let e = bad_bake(&spec(Format::Erofs, &out, &junk, &init));
    assert!(e.contains("not a tarball"), "{e}");
    // `..` and absolute entries.
    for (name, entries, want) in [
        (
            "dotdot.tar",
            vec![E::File("etc/../../x", b"x", 0o644, 0)],
            "entry \"etc/../../x\": `..` components are not allowed",
        ),
        (
            "abs.tar",
            vec![E::File("/etc/passwd", b"x", 0o644, 0)],
            "entry \"/etc/passwd\": absolute paths are not allowed",
        ),
        (
            "escape.tar",
            vec![
                E::Sym("esc", "../../.."),
                E::File("esc/pwned", b"x", 0o644, 0),
            ],
            "entry \"esc/pwned\": its directory \"esc\" resolves outside the root",
        ),
        (
            "hardlink.tar",
            vec![E::Hard("etc/shadow", "../../etc/shadow")],
            "hard link target: `..` components are not allowed",
        ),
    ] {
        let p = tarball(name, &tar_bytes(&entries))?;
        let e = bad_bake(&spec(Format::Ext4, &out, &p, &init));
        assert!(e.contains(want), "{name}: {e}");
        assert!(
            e.contains(&format!("tarball {}", p.display())),
            "{name}: {e}"
        );
    }
    // The same `..` entry as an OCI layer names the layer.
    let layout2 = tmp.path().join("layout2");
    let d = oci_layout(
        &layout2,
        &[(TAR, tar_bytes(&[E::File("a/../../x", b"x", 0o644, 0)]))],
    )?;
    let e = bad_bake(&spec(Format::Squashfs, &out, &layout2, &init));
    assert!(
        e.contains(&format!("layer {}: entry \"a/../../x\"", d[0])),
        "{e}"
    );
    assert!(!tmp.path().join("x").exists() && !Path::new("/x").exists());
    Ok(())
}

#[test]
fn bad_specs_give_clear_errors_and_leave_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir)?;
    let out = outdir.join("root.erofs");
    let rootfs = tmp.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("etc"))?;
    // The output inside the input directory; a missing init binary.
    let inside = rootfs.join("root.erofs");
    let e = bad_bake(&spec(Format::Erofs, &inside, &rootfs, &init));
    assert!(e.contains("inside the input directory"), "{e}");
    assert_eq!(names(&rootfs)?, vec!["etc".to_owned()]);
    let e = bad_bake(&spec(
        Format::Erofs,
        &out,
        &rootfs,
        &tmp.path().join("no-init"),
    ));
    assert!(e.contains("init binary") && e.contains("no-init"), "{e}");
    // A label too long for erofs; a stage-1 request for a disk format.
    let mut s = spec(Format::Erofs, &out, &rootfs, &init);
    s.label = Some("sixteen-bytes-xx".into());
    assert!(bad_bake(&s).contains("at most 15"));
    let mut s = spec(Format::Ext4, &out, &rootfs, &init);
    s.stage1 = true;
    assert!(bad_bake(&s).contains("--format initramfs"));
    // A config asking for a writable erofs or squashfs root (issue 12, item 7).
    for format in [Format::Erofs, Format::Squashfs] {
        let mut s = spec(format, &out, &rootfs, &init);
        s.config.root.read_only = Some(false);
        let e = bad_bake(&s);
        assert!(
            e.contains("read_only = false") && e.contains(format.as_str()) && e.contains("ext4"),
            "{e}"
        );
    }
    // An unknown format, in the library and on the command line.
    let e = "vhdx".parse::<Format>().expect_err("unknown");
    assert_eq!(
        e,
        bootlace_contract::image::UnknownFormat("vhdx".to_owned())
    );
    assert!(e.to_string().contains("unknown format \"vhdx\""), "{e}");
    let cli = Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
        .args(["bake", "--format", "vhdx", "--input"])
        .arg(&rootfs)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(&out)
        .output()?;
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("unknown format \"vhdx\""), "{stderr}");
    assert!(names(&outdir)?.is_empty());
    Ok(())
}

#[test]
fn stage1_initramfs_has_the_block_and_fs_modules() -> Result<()> {
    let release_dir = Path::new("/lib/modules");
    let release = std::fs::read_dir(release_dir)
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .context("no kernel modules under /lib/modules: `make setup` installs linux-image-amd64")?;
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let out = tmp.path().join("stage1.img");
    let mut s = BakeSpec::new(Format::Initramfs, out.clone(), None, init);
    s.stage1 = true;
    s.stage1_root = Some("LABEL=bootlace-root".into());
    s.modules = Some(bootlace_image::initramfs::Modules {
        root: release_dir.to_owned(),
        release: release.clone(),
        extra: Vec::new(),
    });
    let r = bake(&s, &mut |_| {})?;
    assert!(r.meta.stage1 && r.meta.inputs.is_empty());
    assert_eq!(r.meta.kernel_release.as_deref(), Some(release.as_str()));
    for m in ["virtio_blk", "virtio_pci"] {
        assert!(
            r.meta.modules.iter().any(|x| x == m),
            "{m}: {:?}",
            r.meta.modules
        );
    }
    let paths = image_paths(Format::Initramfs, &out, tmp.path())?;
    assert!(paths.contains(&format!("/lib/modules/{release}/modules.dep")));
    let raw = std::fs::read(&out)?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut data)?;
    let cfg = bootlace_image::cpio::read_all(&data)?
        .into_iter()
        .find(|e| e.header.name == "etc/bootlace/init.toml")
        .context("config")?;
    let text = String::from_utf8(cfg.data.clone())?;
    assert!(
        text.contains("[stage1]") && text.contains("LABEL=bootlace-root"),
        "{text}"
    );
    // The config loads nothing at boot by itself: the init picks the modules.
    assert!(!text.contains("modules = [\"virtio"), "{text}");
    Ok(())
}

#[test]
fn merged_usr_modules_and_the_input_left_untouched() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    // A merged-/usr rootfs that already has an old init and config.
    let root = tmp.path().join("rootfs");
    for d in ["usr/lib", "usr/sbin", "etc/bootlace"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    std::os::unix::fs::symlink("usr/sbin", root.join("sbin"))?;
    std::fs::write(root.join("usr/sbin/bootlace-init"), b"old init")?;
    std::fs::write(root.join("etc/bootlace/init.toml"), b"old config")?;
    // A fake kernel module tree: top needs leaf.
    let mods = tmp.path().join("modules/9.9.9-test");
    std::fs::create_dir_all(mods.join("kernel/a"))?;
    std::fs::write(
        mods.join("modules.dep"),
        "kernel/a/leaf.ko:\nkernel/a/top.ko: kernel/a/leaf.ko\n",
    )?;
    std::fs::write(mods.join("modules.builtin"), "")?;
    for m in ["leaf", "top"] {
        std::fs::write(mods.join(format!("kernel/a/{m}.ko")), m)?;
    }
    let out = tmp.path().join("root.img");
    let mut s = spec(Format::Initramfs, &out, &root, &init);
    s.config.modules = vec![
        bootlace_contract::config::ModuleName::try_from("top".to_owned())
            .map_err(anyhow::Error::msg)?,
    ];
    s.modules = Some(bootlace_image::initramfs::Modules {
        root: tmp.path().join("modules"),
        release: "9.9.9-test".into(),
        extra: Vec::new(),
    });
    let r = bake(&s, &mut |_| {})?;
    assert_eq!(r.meta.modules, vec!["leaf", "top"]);
    assert_eq!(r.meta.kernel_release.as_deref(), Some("9.9.9-test"));
    let raw = std::fs::read(&out)?;
    let mut data = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut data)?;
    let entries = bootlace_image::cpio::read_all(&data)?;
    let get = |name: &str| entries.iter().find(|e| e.header.name == name);
    // Through the image's own symlinks: /lib -> usr/lib, /sbin -> usr/sbin.
    for p in [
        "usr/lib/modules/9.9.9-test/kernel/a/top.ko",
        "usr/lib/modules/9.9.9-test/kernel/a/leaf.ko",
        "usr/lib/modules/9.9.9-test/modules.dep",
    ] {
        assert!(get(p).is_some(), "{p} missing");
    }
    assert!(
        get("lib/modules").is_none(),
        "/lib symlink replaced by a directory"
    );
    let new_init = get("usr/sbin/bootlace-init").context("init")?;
    assert_eq!(new_init.data, std::fs::read(&init)?);
    assert_eq!(new_init.header.perm, 0o755);
    let cfg = get("etc/bootlace/init.toml").context("config")?;
    assert!(String::from_utf8_lossy(&cfg.data).contains("modules = [\"top\"]"));
    // The input directory is as it was (files are hard-linked into staging, never written).
    assert_eq!(
        std::fs::read(root.join("usr/sbin/bootlace-init"))?,
        b"old init"
    );
    assert_eq!(
        std::fs::read(root.join("etc/bootlace/init.toml"))?,
        b"old config"
    );
    assert_eq!(names(&root)?, vec!["etc", "lib", "sbin", "usr"]);
    assert_eq!(
        std::fs::metadata(root.join("usr/sbin/bootlace-init"))?.nlink(),
        1,
        "staging links left behind"
    );
    Ok(())
}

/// One pax record: `<len> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = format!(" {key}={value}\n");
    let mut len = body.len() + 1;
    while format!("{len}{body}").len() != len {
        len += 1;
    }
    format!("{len}{body}").into_bytes()
}

#[test]
#[ignore = "needs root"]
fn tarball_setuid_devices_and_xattrs_kept() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let mut b = tar::Builder::new(Vec::new());
    let mut pax = tar::Header::new_ustar();
    let rec = pax_record("SCHILY.xattr.user.bootlace", "kept");
    pax.set_entry_type(tar::EntryType::XHeader);
    pax.set_path("PaxHeaders/ping")?;
    pax.set_size(rec.len() as u64);
    pax.set_mode(0o644);
    pax.set_uid(0);
    pax.set_gid(0);
    pax.set_mtime(0);
    pax.set_cksum();
    b.append(&pax, &rec[..])?;
    let mut h = tar::Header::new_ustar();
    h.set_path("usr/bin/ping")?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o4755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(4);
    h.set_mtime(0);
    h.set_cksum();
    b.append(&h, &b"ping"[..])?;
    let mut d = tar::Header::new_ustar();
    d.set_path("dev/null")?;
    d.set_entry_type(tar::EntryType::Char);
    d.set_mode(0o666);
    d.set_uid(0);
    d.set_gid(0);
    d.set_device_major(1)?;
    d.set_device_minor(3)?;
    d.set_size(0);
    d.set_mtime(0);
    d.set_cksum();
    b.append(&d, std::io::empty())?;
    let input = tmp.path().join("rootfs.tar");
    std::fs::write(&input, b.into_inner()?)?;
    let out = tmp.path().join("root.squashfs");
    bake(&spec(Format::Squashfs, &out, &input, &init), &mut |_| {})?;
    let x = tmp.path().join("x");
    run(Command::new("unsquashfs")
        .args(["-no-progress", "-q", "-d"])
        .arg(&x)
        .arg(&out))?;
    let ping = std::fs::symlink_metadata(x.join("usr/bin/ping"))?;
    assert_eq!(ping.mode() & 0o7777, 0o4755);
    let mut value = [0u8; 64];
    let n = rustix::fs::getxattr(x.join("usr/bin/ping"), "user.bootlace", &mut value[..])?;
    assert_eq!(&value[..n], b"kept");
    let null = std::fs::symlink_metadata(x.join("dev/null"))?;
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &null.file_type()
    ));
    assert_eq!(null.rdev(), rustix::fs::makedev(1, 3));
    Ok(())
}

/// A merged-/usr input whose directories carry what an overlay's upper layer could hide: a
/// root of mode 0750, a directory owned 1000:1000 with mode 0700, an extended attribute on
/// `usr`, an existing init and config (replaced), `sbin -> usr/sbin` and `lib -> usr/lib`, a
/// setuid file and a hard link; and a module tree for `top` (which needs `leaf`).
fn merged_usr_input(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let root = dir.join("rootfs");
    for d in [
        "usr/bin",
        "usr/lib",
        "usr/sbin",
        "etc/bootlace",
        "etc/secret",
        "srv",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin"))?;
    std::os::unix::fs::symlink("usr/sbin", root.join("sbin"))?;
    std::os::unix::fs::symlink("usr/lib", root.join("lib"))?;
    std::fs::write(root.join("usr/bin/tool"), b"#!/bin/sh\n")?;
    std::fs::set_permissions(root.join("usr/bin/tool"), PermissionsExt::from_mode(0o4755))?;
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool2"))?;
    std::fs::write(root.join("usr/sbin/bootlace-init"), b"old init")?;
    std::fs::write(root.join("etc/bootlace/init.toml"), b"old config")?;
    std::fs::write(root.join("etc/secret/key"), b"k")?;
    std::fs::set_permissions(root.join("etc/secret"), PermissionsExt::from_mode(0o700))?;
    rustix::fs::chown(
        root.join("etc/secret"),
        Some(rustix::fs::Uid::from_raw(1000)),
        Some(rustix::fs::Gid::from_raw(1000)),
    )?;
    rustix::fs::setxattr(
        root.join("usr"),
        "user.bootlace",
        b"kept",
        rustix::fs::XattrFlags::empty(),
    )?;
    std::fs::set_permissions(&root, PermissionsExt::from_mode(0o750))?;
    let mods = dir.join("modules/9.9.9-test");
    std::fs::create_dir_all(mods.join("kernel/a"))?;
    std::fs::write(
        mods.join("modules.dep"),
        "kernel/a/leaf.ko:\nkernel/a/top.ko: kernel/a/leaf.ko\n",
    )?;
    std::fs::write(mods.join("modules.builtin"), "")?;
    for m in ["leaf", "top"] {
        std::fs::write(mods.join(format!("kernel/a/{m}.ko")), m)?;
    }
    Ok((root, dir.join("modules")))
}

fn with_top_module(s: &mut BakeSpec, modules: &Path) -> Result<()> {
    s.config.modules = vec![
        bootlace_contract::config::ModuleName::try_from("top".to_owned())
            .map_err(anyhow::Error::msg)?,
    ];
    s.modules = Some(bootlace_image::initramfs::Modules {
        root: modules.to_owned(),
        release: "9.9.9-test".into(),
        extra: Vec::new(),
    });
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn overlay_and_mirror_give_the_same_bytes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let (root, modules) = merged_usr_input(tmp.path())?;
    let before = names(&root)?;
    for format in [Format::Erofs, Format::Ext4, Format::Squashfs, Format::Qcow2] {
        let mut shas = Vec::new();
        for (mode, want) in [
            (StagingMode::Auto, Staging::Overlay),
            (StagingMode::Mirror, Staging::Mirror),
        ] {
            let dir = tmp.path().join(format!("{format}-{want:?}"));
            std::fs::create_dir(&dir)?;
            let out = dir.join(format!("root.{format}"));
            let mut s = spec(format, &out, &root, &init);
            with_top_module(&mut s, &modules)?;
            s.staging = mode;
            let r = bake(&s, &mut |_| {}).with_context(|| format!("{format} {mode:?}"))?;
            assert_eq!(r.staging, want, "{format}");
            assert_eq!(r.meta.modules, vec!["leaf", "top"]);
            assert_eq!(
                names(&dir)?,
                vec![format!("root.{format}"), format!("root.{format}.meta.json")]
            );
            shas.push(r.meta.sha256);
        }
        assert_eq!(shas[0], shas[1], "{format}: overlay and mirror differ");
    }
    // What the overlay's upper layer must not hide, read back from the squashfs image
    // (unsquashfs as root restores owners, modes and xattrs).
    let x = tmp.path().join("x");
    unsquash(&tmp.path().join("squashfs-Overlay/root.squashfs"), &x)?;
    assert_eq!(std::fs::read_link(x.join("sbin"))?, Path::new("usr/sbin"));
    assert_eq!(std::fs::read_link(x.join("lib"))?, Path::new("usr/lib"));
    assert_eq!(
        std::fs::read(x.join("usr/sbin/bootlace-init"))?,
        std::fs::read(&init)?
    );
    assert!(x
        .join("usr/lib/modules/9.9.9-test/kernel/a/top.ko")
        .is_file());
    let cfg = std::fs::read_to_string(x.join("etc/bootlace/init.toml"))?;
    assert!(cfg.contains("modules = [\"top\"]"), "{cfg}");
    let secret = std::fs::symlink_metadata(x.join("etc/secret"))?;
    assert_eq!(secret.mode() & 0o7777, 0o700);
    assert_eq!((secret.uid(), secret.gid()), (1000, 1000));
    assert_eq!(
        std::fs::symlink_metadata(&x)?.mode() & 0o7777,
        0o750,
        "root mode"
    );
    let mut value = [0u8; 16];
    let n = rustix::fs::getxattr(x.join("usr"), "user.bootlace", &mut value[..])?;
    assert_eq!(&value[..n], b"kept");
    // The input is as it was, and no overlay is left mounted.
    assert_eq!(names(&root)?, before);
    assert_eq!(
        std::fs::read(root.join("usr/sbin/bootlace-init"))?,
        b"old init"
    );
    // (This test's own bakes only: the other tests' bakes, running in parallel in this
    // process's mount namespace, may have theirs mounted right now.)
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let ours = tmp.path().to_string_lossy();
    assert!(!mounts.contains(ours.as_ref()), "{mounts}");
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn an_input_with_a_whiteout_device_is_mirrored() -> Result<()> {
    // A character device 0:0 is an overlay whiteout: an overlay of this input would hide it.
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("dev"))?;
    rustix::fs::mknodat(
        rustix::fs::CWD,
        root.join("dev/gone"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(0, 0),
    )?;
    let out = tmp.path().join("root.squashfs");
    let r = bake(&spec(Format::Squashfs, &out, &root, &init), &mut |_| {})?;
    assert_eq!(r.staging, Staging::Mirror);
    let x = tmp.path().join("x");
    unsquash(&out, &x)?;
    let gone = std::fs::symlink_metadata(x.join("dev/gone"))?;
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &gone.file_type()
    ));
    Ok(())
}

/// Runs `bootlace-image` with `args`; returns (exit status, stdout, stderr).
fn cli(args: &[&std::ffi::OsStr]) -> Result<(Option<i32>, String, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
        .args(args)
        .output()?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn flags_for_another_format_are_refused_and_nothing_is_left() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc"))?;
    let outdir = tmp.path().join("out");
    std::fs::create_dir(&outdir)?;
    let os = |s: &str| std::ffi::OsString::from(s);
    let base = |format: &str, out: &str| -> Vec<std::ffi::OsString> {
        vec![
            os("bake"),
            os("--format"),
            os(format),
            os("--input"),
            root.clone().into(),
            os("--init"),
            init.clone().into(),
            os("--out"),
            outdir.join(out).into(),
        ]
    };
    for (format, extra, want) in [
        (
            "erofs",
            ["--compress", "zstd"],
            "--compress does not apply to --format erofs",
        ),
        (
            "squashfs",
            ["--compress", "gzip"],
            "--compress does not apply to --format squashfs",
        ),
        (
            "ext4",
            ["--qcow2-fs", "ext4"],
            "--qcow2-fs does not apply to --format ext4",
        ),
        (
            "initramfs",
            ["--root-label", "x"],
            "--root-label does not apply to --format initramfs",
        ),
        (
            "squashfs",
            ["--root-label", "x"],
            "--root-label does not apply to --format squashfs",
        ),
        (
            "qcow2",
            ["--qcow2-fs", "vfat"],
            "--qcow2-fs vfat: a qcow2 image holds erofs or ext4",
        ),
    ] {
        let mut args = base(format, "img");
        args.extend(extra.map(os));
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, _, stderr) = cli(&args)?;
        assert_eq!(code, Some(1), "{format} {extra:?}: {stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(
            names(&outdir)?.is_empty(),
            "left behind: {:?}",
            names(&outdir)?
        );
    }
    // A usage error is clap's: status 2.
    let mut args = base("erofs", "img");
    args.push(os("--no-such-flag"));
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    assert_eq!(cli(&args)?.0, Some(2));
    let (code, help, _) = cli(&[std::ffi::OsStr::new("bake"), std::ffi::OsStr::new("--help")])?;
    assert_eq!(code, Some(0));
    assert!(
        help.contains("Exit status:") && help.contains("1  refused or failed"),
        "{help}"
    );
    Ok(())
}

#[test]
fn json_results_and_the_initramfs_alias() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(root.join("etc/hostname"), b"h\n")?;
    let out = tmp.path().join("a.img");
    let (code, stdout, stderr) = cli(&[
        "bake".as_ref(),
        "--format".as_ref(),
        "initramfs".as_ref(),
        "--input".as_ref(),
        root.as_os_str(),
        "--init".as_ref(),
        init.as_os_str(),
        "--out".as_ref(),
        out.as_os_str(),
        "--json".as_ref(),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(v["meta"]["format"], "initramfs");
    assert_eq!(v["staging"], "merged");
    assert_eq!(
        v["meta"]["sha256"].as_str(),
        Some(sha256_file(&out)?.as_str())
    );
    assert!(v["times"]["image_s"].as_f64().is_some(), "{v}");
    assert!(v["stats"]["entries"].is_u64(), "{v}");
    assert_eq!(stdout.trim().lines().count(), 1, "one object: {stdout}");
    // Not a terminal: no progress line on stderr.
    assert!(!stderr.contains("\r"), "{stderr:?}");
    // The old spelling: --rootfs, --keep-owners, --compress none, through the same path.
    let old = tmp.path().join("b.img");
    let (code, _, stderr) = cli(&[
        "initramfs".as_ref(),
        "--rootfs".as_ref(),
        root.as_os_str(),
        "--init".as_ref(),
        init.as_os_str(),
        "--keep-owners".as_ref(),
        "--out".as_ref(),
        old.as_os_str(),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    let plain = tmp.path().join("c.img");
    let (code, _, stderr) = cli(&[
        "initramfs".as_ref(),
        "--rootfs".as_ref(),
        root.as_os_str(),
        "--init".as_ref(),
        init.as_os_str(),
        "--compress".as_ref(),
        "none".as_ref(),
        "--out".as_ref(),
        plain.as_os_str(),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        std::fs::read(&old)?,
        std::fs::read(&out)?,
        "alias and bake differ"
    );
    let entries = bootlace_image::cpio::read_all(&std::fs::read(&plain)?)?;
    assert!(entries.iter().any(|e| e.header.name == "etc/hostname"));
    assert!(ImageMeta::path_for(&old).is_file());
    Ok(())
}

#[test]
fn a_named_image_tells_its_init_its_name() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc"))?;
    let bake = |out: &Path, name: &str| {
        cli(&[
            "bake".as_ref(),
            "--format".as_ref(),
            "initramfs".as_ref(),
            "--compress".as_ref(),
            "none".as_ref(),
            "--input".as_ref(),
            root.as_os_str(),
            "--init".as_ref(),
            init.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--version".as_ref(),
            "2.1".as_ref(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
    };
    let out = tmp.path().join("web.img");
    let (code, _, stderr) = bake(&out, "web")?;
    assert_eq!(code, Some(0), "{stderr}");
    let entries = bootlace_image::cpio::read_all(&std::fs::read(&out)?)?;
    let config = entries
        .iter()
        .find(|e| e.header.name == "etc/bootlace/init.toml")
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .expect("init.toml in the image");
    assert!(config.contains("image = \"web@2.1\""), "{config}");
    // A name that cannot be said in HELLO is refused, with nothing written.
    let bad = tmp.path().join("bad.img");
    let (code, _, stderr) = bake(&bad, "we b")?;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--name/--version") && stderr.contains("name@version"),
        "{stderr}"
    );
    assert!(!bad.exists());
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn capture_refuses_a_base_without_a_vsock_driver_and_writes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let init = fake_init(tmp.path())?;
    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(root.join("etc"))?;
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images)?;
    let out = images.join("app-1.0.ext4");
    let (code, _, stderr) = cli(&[
        "bake".as_ref(),
        "--format".as_ref(),
        "ext4".as_ref(),
        "--input".as_ref(),
        root.as_os_str(),
        "--init".as_ref(),
        init.as_os_str(),
        "--name".as_ref(),
        "app".as_ref(),
        "--version".as_ref(),
        "1.0".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ])?;
    assert_eq!(code, Some(0), "{stderr}");
    let bundle = tmp.path().join("b.tar");
    std::fs::write(&bundle, b"")?;
    let before: Vec<_> = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let (code, _, stderr) = cli(&[
        "capture".as_ref(),
        "--images".as_ref(),
        images.as_os_str(),
        "--image".as_ref(),
        "app@1.0".as_ref(),
        "--bundle".as_ref(),
        bundle.as_os_str(),
    ])?;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("has no vsock driver")
            && stderr.contains("--extra-module vmw_vsock_virtio_transport"),
        "{stderr}"
    );
    let after: Vec<_> = std::fs::read_dir(&images)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(before.len(), after.len(), "capture left something behind");
    Ok(())
}
