//! The bake limits (docs/image.md, "Bake limits"): each refused with an error naming the input,
//! the limit and the flag that raises it, with nothing left behind; the flag raising it lets
//! the bake through. Small limits on small inputs keep these fast. Tarballs and OCI layers are
//! staged with their owners, which needs root (`cargo test -- --include-ignored` as root); a
//! directory input into an initramfs, the JSON documents of a layout and bundles do not.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{ensure, Result};
use bootlace_image::bake::{bake, BakeSpec, Compression, Format};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_image::limits::Limits;
use sha2::{Digest, Sha256};

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A stand-in init: a script that answers `--version` like the real one.
fn fake_init(dir: &Path) -> Result<PathBuf> {
    let p = dir.join("bootlace-init");
    std::fs::write(&p, "#!/bin/sh\necho bootlace-init 9.9.9\n")?;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// The file names in a directory, sorted.
fn names(dir: &Path) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    v.sort();
    Ok(v)
}

/// A test's scratch directory: the init, an empty output directory, the inputs.
struct Scratch {
    tmp: tempfile::TempDir,
    init: PathBuf,
    outdir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch> {
        let tmp = tempfile::tempdir()?;
        let init = fake_init(tmp.path())?;
        let outdir = tmp.path().join("out");
        std::fs::create_dir(&outdir)?;
        Ok(Scratch { tmp, init, outdir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn write(&self, name: &str, data: &[u8]) -> Result<PathBuf> {
        let p = self.path(name);
        std::fs::write(&p, data)?;
        Ok(p)
    }

    /// An initramfs bake of `input` (no compression: quick on large inputs) into the output
    /// directory.
    fn spec(&self, input: &Path, limits: Limits) -> BakeSpec {
        let mut s = BakeSpec::new(
            Format::Initramfs,
            self.outdir.join("root.img"),
            Some(input.to_owned()),
            self.init.clone(),
        );
        s.compress = Some(Compression::None);
        s.mtime = 1_700_000_000;
        s.limits = limits;
        s
    }
}

/// A bake refused: the error's text; the output directory holds nothing new (no image, no
/// metadata, no work directory).
fn refused(s: &BakeSpec) -> String {
    let dir = s.out.parent().expect("parent").to_owned();
    let before = names(&dir).expect("names");
    let err = bake(s, &mut |_| {}).expect_err("the bake should be refused");
    let text = format!("{:#}", anyhow::Error::from(err));
    assert_eq!(names(&dir).expect("names"), before, "left behind: {text}");
    text
}

/// A bake that passes, its output then removed.
fn passes(s: &BakeSpec) -> Result<()> {
    bake(s, &mut |_| {})?;
    std::fs::remove_file(&s.out)?;
    std::fs::remove_file(bootlace_contract::image::ImageMeta::path_for(&s.out))?;
    Ok(())
}

fn limits(f: impl FnOnce(&mut Limits)) -> Limits {
    let mut l = Limits::default();
    f(&mut l);
    l
}

/// A tar stream of regular files (name, contents), root-owned.
fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_size(data.len() as u64);
        h.set_path(name).expect("path");
        h.set_cksum();
        b.append(&h, *data).expect("append");
    }
    b.into_inner().expect("finish")
}

/// A tar stream holding one file of `mib` MiB of zeros, written as it goes.
fn zeros_tar(mib: usize, out: impl std::io::Write) -> Result<()> {
    let mut b = tar::Builder::new(out);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_size((mib << 20) as u64);
    h.set_path("zeros").expect("path");
    h.set_cksum();
    b.append(&h, std::io::repeat(0).take((mib << 20) as u64))?;
    b.into_inner()?.flush()?;
    Ok(())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).expect("gzip");
    gz.finish().expect("gzip")
}

/// A gzip bomb: a tarball of `mib` MiB of zeros, about a thousand times smaller.
fn gzip_bomb(mib: usize) -> Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    zeros_tar(mib, &mut gz)?;
    Ok(gz.finish()?)
}

fn digest(data: &[u8]) -> String {
    format!(
        "sha256:{}",
        bootlace_contract::digest::hex(&Sha256::digest(data))
    )
}

/// Writes a blob; returns its descriptor.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> Result<serde_json::Value> {
    let d = digest(data);
    let p = layout.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().expect("parent"))?;
    std::fs::write(&p, data)?;
    Ok(serde_json::json!({"mediaType": media_type, "digest": d, "size": data.len()}))
}

/// An OCI layout with these layers (media type, bytes), bottom first; `pad` spaces at the end
/// of the manifest and of index.json. Returns the layer digests and the manifest's.
fn oci_layout(
    layout: &Path,
    layers: &[(&str, Vec<u8>)],
    pad: usize,
) -> Result<(Vec<String>, String)> {
    std::fs::create_dir_all(layout)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion": "1.0.0"}"#,
    )?;
    let mut descs = Vec::new();
    for (t, data) in layers {
        descs.push(blob(layout, t, data)?);
    }
    let config = serde_json::json!({"architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": []}});
    let config = blob(
        layout,
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config)?,
    )?;
    let manifest = serde_json::json!({"schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config, "layers": descs});
    let mut text = serde_json::to_vec(&manifest)?;
    text.extend(std::iter::repeat_n(b' ', pad));
    let m = blob(layout, "application/vnd.oci.image.manifest.v1+json", &text)?;
    let manifest_digest = m["digest"].as_str().unwrap_or_default().to_owned();
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [m]});
    let mut text = serde_json::to_vec(&index)?;
    text.extend(std::iter::repeat_n(b' ', pad));
    std::fs::write(layout.join("index.json"), text)?;
    let digests = descs
        .iter()
        .map(|d| d["digest"].as_str().unwrap_or_default().to_owned())
        .collect();
    Ok((digests, manifest_digest))
}

/// A directory of `n` files of `size` bytes each.
fn dir_of(root: &Path, n: usize, size: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(root.join("etc"))?;
    for i in 0..n {
        std::fs::write(root.join(format!("etc/f{i}")), vec![b'x'; size])?;
    }
    Ok(root.to_owned())
}

#[test]
fn a_directory_over_the_entry_or_byte_limit_is_refused() -> Result<()> {
    let s = Scratch::new()?;
    // etc and ten files: eleven entries, 10 x 300 bytes.
    let root = dir_of(&s.path("rootfs"), 10, 300)?;
    let e = refused(&s.spec(&root, limits(|l| l.entries = 10)));
    let want = format!(
        "directory {}: over 10 entries (--max-entries raises it)",
        root.display()
    );
    assert!(e.contains(&want), "{e}");
    passes(&s.spec(&root, limits(|l| l.entries = 11)))?;
    let e = refused(&s.spec(&root, limits(|l| l.bytes = 2999)));
    let want = format!(
        "directory {}: over 2999 bytes unpacked (--max-bytes raises it)",
        root.display()
    );
    assert!(e.contains(&want), "{e}");
    passes(&s.spec(&root, limits(|l| l.bytes = 3000)))?;
    // 0: no limit.
    passes(&s.spec(&root, limits(|l| (l.entries, l.bytes) = (0, 0))))?;
    assert!(names(&s.outdir)?.is_empty());
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_tarball_over_the_entry_or_byte_limit_is_refused() -> Result<()> {
    let s = Scratch::new()?;
    let files: Vec<(&str, &[u8])> = vec![
        ("etc/a", &[b'a'; 1000]),
        ("etc/b", &[b'b'; 1000]),
        ("etc/c", &[b'c'; 1000]),
    ];
    for (name, data) in [
        ("three.tar", tar_of(&files)),
        ("three.tar.gz", gzip(&tar_of(&files))),
        (
            "three.tar.zst",
            zstd::stream::encode_all(&tar_of(&files)[..], 3)?,
        ),
    ] {
        let tarball = s.write(name, &data)?;
        let e = refused(&s.spec(&tarball, limits(|l| l.entries = 2)));
        let want = format!(
            "tarball {}: over 2 entries (--max-entries raises it)",
            tarball.display()
        );
        assert!(e.contains(&want), "{e}");
        passes(&s.spec(&tarball, limits(|l| l.entries = 3)))?;
        let e = refused(&s.spec(&tarball, limits(|l| l.bytes = 2048)));
        let want = format!(
            "tarball {}: over 2048 bytes (2 KiB) unpacked (--max-bytes raises it)",
            tarball.display()
        );
        assert!(e.contains(&want), "{e}");
        passes(&s.spec(&tarball, limits(|l| l.bytes = 3000)))?;
    }
    assert!(names(&s.outdir)?.is_empty());
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn entries_are_counted_over_every_layer_with_and_without_the_cache() -> Result<()> {
    let s = Scratch::new()?;
    let layout = s.path("layout");
    let lower = tar_of(&[("a/1", b"1"), ("a/2", b"2"), ("a/3", b"3")]);
    let upper = tar_of(&[("b/1", b"1"), ("b/2", b"2"), ("b/3", b"3")]);
    let (digests, _) = oci_layout(&layout, &[(TAR, lower), (TAR_GZ, gzip(&upper))], 0)?;
    let cache = s.path("cache");
    for with_cache in [false, true] {
        let mut spec = s.spec(&layout, limits(|l| l.entries = 5));
        spec.cache = with_cache.then(|| cache.clone());
        // Each layer alone is within the limit; both are not.
        let e = refused(&spec);
        let want = format!(
            "layer {}: over 5 entries (--max-entries raises it)",
            digests[1]
        );
        assert!(e.contains(&want), "cache {with_cache}: {e}");
        spec.limits.entries = 6;
        passes(&spec)?;
    }
    assert!(names(&s.outdir)?.is_empty());
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn a_gzip_or_zstd_bomb_is_refused_as_it_unpacks() -> Result<()> {
    let s = Scratch::new()?;
    // 64 MiB of zeros: gzip makes about 64 KiB of it (a ratio near 1000), zstd 2 KiB.
    let gz = s.write("bomb.tar.gz", &gzip_bomb(64)?)?;
    let mut plain = Vec::new();
    zeros_tar(64, &mut plain)?;
    let zst = s.write("bomb.tar.zst", &zstd::stream::encode_all(&plain[..], 3)?)?;
    for tarball in [&gz, &zst] {
        let e = refused(&s.spec(tarball, Limits::default()));
        let want = format!("tarball {}: unpacks to over 200 times", tarball.display());
        assert!(e.contains(&want), "{e}");
        assert!(e.contains("(--max-ratio raises it)"), "{e}");
    }
    // Raised, or off: through (64 MiB is within the other limits).
    passes(&s.spec(&gz, limits(|l| l.ratio = 100_000)))?;
    passes(&s.spec(&zst, limits(|l| l.ratio = 0)))?;
    // The same bomb as a layer names the layer; filled into the cache, nothing is committed
    // there.
    let layout = s.path("layout");
    let (digests, _) = oci_layout(&layout, &[(TAR_GZ, std::fs::read(&gz)?)], 0)?;
    let cache = s.path("cache");
    let mut spec = s.spec(&layout, Limits::default());
    spec.cache = Some(cache.clone());
    let e = refused(&spec);
    let want = format!("layer {}: unpacks to over 200 times", digests[0]);
    assert!(e.contains(&want), "{e}");
    assert_eq!(names(&cache)?, vec!["sha256".to_owned()]);
    assert!(names(&cache.join("sha256"))?.is_empty());
    assert!(names(&s.outdir)?.is_empty());
    Ok(())
}

#[test]
fn an_oversized_index_json_is_refused_before_it_is_read() -> Result<()> {
    let s = Scratch::new()?;
    let layout = s.path("layout");
    oci_layout(&layout, &[(TAR, tar_of(&[("a", b"a")]))], 0)?;
    // 200 MiB by its size (sparse: nothing to read, and nothing is).
    let index = layout.join("index.json");
    std::fs::File::options()
        .write(true)
        .open(&index)?
        .set_len(200 << 20)?;
    let e = refused(&s.spec(&layout, Limits::default()));
    let want = format!(
        "OCI layout {}: index.json: 209715200 bytes (200 MiB) is over the 4194304 bytes \
         (4 MiB) limit of a JSON document (--max-json-bytes raises it)",
        layout.display()
    );
    assert!(e.contains(&want), "{e}");
    // A FIFO has no size to check first: the read stops at the limit, and the writer, with
    // most of its 64 MiB still to write, gets a broken pipe.
    std::fs::remove_file(&index)?;
    let status = Command::new("mkfifo").arg(&index).status()?;
    ensure!(status.success(), "mkfifo {}", index.display());
    let (done, finished) = mpsc::channel();
    let fifo = index.clone();
    std::thread::spawn(move || {
        let written = std::fs::File::options()
            .write(true)
            .open(&fifo)
            .and_then(|mut f| f.write_all(&vec![b' '; 64 << 20]));
        let _ = done.send(written);
    });
    let e = refused(&s.spec(&layout, limits(|l| l.json_bytes = 1024)));
    let writer = finished.recv_timeout(Duration::from_secs(30));
    let want = "index.json: 1025 bytes is over the 1024 bytes (1 KiB) limit";
    assert!(e.contains(want), "{e}");
    let err = writer
        .expect("the writer finished")
        .expect_err("the reader stopped early");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
    Ok(())
}

#[test]
#[ignore = "needs root"]
fn json_documents_over_the_limit_name_the_document_and_the_flag() -> Result<()> {
    let s = Scratch::new()?;
    let layout = s.path("layout");
    // index.json and the manifest padded to over 8 KiB.
    let (_, manifest) = oci_layout(&layout, &[(TAR, tar_of(&[("a", b"a")]))], 8192)?;
    let e = refused(&s.spec(&layout, limits(|l| l.json_bytes = 8192)));
    let want = format!(
        "OCI layout {}: index.json: {} bytes is over the 8192 bytes (8 KiB) limit",
        layout.display(),
        std::fs::metadata(layout.join("index.json"))?.len()
    );
    assert!(e.contains(&want), "{e}");
    assert!(e.contains("(--max-json-bytes raises it)"), "{e}");
    // index.json within it, the manifest not.
    let index = std::fs::read(layout.join("index.json"))?;
    std::fs::write(layout.join("index.json"), index.trim_ascii_end())?;
    let e = refused(&s.spec(&layout, limits(|l| l.json_bytes = 8192)));
    let want = format!("OCI layout {}: blob {manifest}: ", layout.display());
    assert!(e.contains(&want) && e.contains("--max-json-bytes"), "{e}");
    passes(&s.spec(&layout, limits(|l| l.json_bytes = 16384)))?;
    passes(&s.spec(&layout, Limits::default()))?;
    assert!(names(&s.outdir)?.is_empty());
    Ok(())
}

#[test]
fn the_flags_on_the_command_line() -> Result<()> {
    let s = Scratch::new()?;
    let root = dir_of(&s.path("rootfs"), 3, 10)?;
    let out = s.outdir.join("root.img");
    let run = |extra: &[&str]| -> Result<(Option<i32>, String)> {
        let o = Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
            .args(["bake", "--format", "initramfs", "--quiet", "--input"])
            .arg(&root)
            .arg("--init")
            .arg(&s.init)
            .arg("--out")
            .arg(&out)
            .args(extra)
            .output()?;
        Ok((
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    };
    let (code, err) = run(&["--max-entries", "3"])?;
    assert_eq!(code, Some(1), "{err}");
    let want = format!(
        "bootlace-image: error: directory {}: over 3 entries (--max-entries raises it)",
        root.display()
    );
    assert!(err.contains(&want), "{err}");
    assert!(names(&s.outdir)?.is_empty());
    let (code, err) = run(&["--max-bytes", "20"])?;
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("over 20 bytes unpacked (--max-bytes raises it)"),
        "{err}"
    );
    assert!(names(&s.outdir)?.is_empty());
    let (code, err) = run(&["--max-bytes", "4x"])?;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--max-bytes"), "{err}");
    let (code, err) = run(&[
        "--max-entries",
        "4",
        "--max-bytes",
        "1K",
        "--max-json-bytes",
        "64K",
        "--max-ratio",
        "0",
    ])?;
    assert_eq!(code, Some(0), "{err}");
    let (code, err) = run(&["--help"])?;
    assert_eq!(code, Some(0), "{err}");
    Ok(())
}

#[test]
fn a_bundle_over_the_entry_or_byte_limit_is_refused() -> Result<()> {
    let s = Scratch::new()?;
    let dir = s.path("bundle");
    std::fs::create_dir(&dir)?;
    std::fs::write(dir.join("bootlace.toml"), "version = 1\n")?;
    std::fs::write(dir.join("data"), [b'x'; 100])?;
    let out = s.outdir.join("bundle.tar");
    let build = |l: Limits| {
        let p = bootlace_image::progress::Progress::new();
        bundle::build_with(&dir, BundleFormat::Tar, "BOOTLACE", 0, &out, &l, &p)
    };
    let e = build(limits(|l| l.entries = 1)).expect_err("refused");
    let want = format!(
        "bundle {}: over 1 entries (--max-entries raises it)",
        dir.display()
    );
    assert_eq!(e.to_string(), want);
    let e = build(limits(|l| l.bytes = 100)).expect_err("refused");
    assert!(e.to_string().contains("--max-bytes raises it"), "{e}");
    assert!(names(&s.outdir)?.is_empty());
    build(limits(|l| (l.entries, l.bytes) = (2, 200)))?;
    assert_eq!(names(&s.outdir)?, vec!["bundle.tar".to_owned()]);
    Ok(())
}
