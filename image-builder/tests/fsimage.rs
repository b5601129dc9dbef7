//! Filesystem images from a directory, with the real tools (e2fsprogs, erofs-utils):
//! reproducibility (twice, from a copy listed in another order, with other file times), the
//! label and UUID in the superblock, the content read back with the tools' own readers (and
//! through the kernel: root, ignored otherwise), and no output or temporary file on errors.

use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use bootlace_contract::fs::FsType;
use bootlace_image::fsimage::{make_image, volume_uuid, FsImageError, FsSpec, FORMATS};

const MTIME: u64 = 1_700_000_000;

/// Deterministic filler bytes.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    std::fs::create_dir_all(path.parent().context("parent")?)?;
    std::fs::write(path, data)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// The entries of the fixture tree, in the order given (so callers can create them in any
/// order).
fn entries() -> Vec<(&'static str, Entry)> {
    let long_target: &'static str =
        Box::leak(format!("{}/target", "a-rather-long-directory-name".repeat(3)).into_boxed_str());
    vec![
        ("etc/hostname", Entry::File(b"bundle\n".to_vec(), 0o644)),
        ("etc/empty", Entry::File(Vec::new(), 0o600)),
        ("bin/tool", Entry::File(bytes(1, 70_000), 0o755)),
        ("lib/big.bin", Entry::File(bytes(2, 3_000_000), 0o644)),
        ("lib/odd size", Entry::File(bytes(3, 4097), 0o640)),
        ("lib/link-to-big", Entry::Symlink("big.bin")),
        ("lib/long-link", Entry::Symlink(long_target)),
        ("lib/hard", Entry::HardLink("lib/big.bin")),
        ("var/empty-dir", Entry::Dir(0o700)),
        ("zz/setuid", Entry::File(b"#!/bin/true\n".to_vec(), 0o4755)),
    ]
}

#[derive(Clone)]
enum Entry {
    File(Vec<u8>, u32),
    Symlink(&'static str),
    HardLink(&'static str),
    Dir(u32),
}

fn make_tree(root: &Path, reverse: bool) -> Result<()> {
    std::fs::create_dir_all(root)?;
    let mut list = entries();
    // Hard links last so their target exists.
    list.sort_by_key(|(_, e)| matches!(e, Entry::HardLink(_)));
    if reverse {
        let (mut plain, links): (Vec<_>, Vec<_>) = list
            .into_iter()
            .partition(|(_, e)| !matches!(e, Entry::HardLink(_)));
        plain.reverse();
        list = plain.into_iter().chain(links).collect();
    }
    // Many names in one directory, so it is an htree and the listing order differs.
    let names: Vec<String> = (0..300).map(|i| format!("entry-{i:04}-name")).collect();
    let ordered: Vec<&String> = if reverse {
        names.iter().rev().collect()
    } else {
        names.iter().collect()
    };
    for n in ordered {
        write(&root.join("many").join(n), n.as_bytes(), 0o644)?;
    }
    for (path, entry) in list {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().context("parent")?)?;
        match entry {
            Entry::File(data, mode) => write(&p, &data, mode)?,
            Entry::Symlink(t) => symlink(t, &p)?,
            Entry::HardLink(t) => std::fs::hard_link(root.join(t), &p)?,
            Entry::Dir(mode) => {
                std::fs::create_dir_all(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))?;
            }
        }
    }
    Ok(())
}

/// Sets the mtime and atime of every regular file and directory under `root`.
fn touch_all(root: &Path, t: SystemTime) -> Result<()> {
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        let meta = std::fs::symlink_metadata(&path)?;
        if meta.is_dir() {
            touch_all(&path, t)?;
        }
        if meta.is_file() || meta.is_dir() {
            let f = std::fs::File::open(&path)?;
            f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))?;
        }
    }
    Ok(())
}

/// An entry's kind (`d`, `l`, `f`), mode bits (0 for symlinks), and data or link target.
type Item = (char, u32, Vec<u8>);

/// A tree's content by relative path, for comparisons (`lost+found` left out).
fn snapshot(root: &Path) -> Result<BTreeMap<String, Item>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            if rel == "lost+found" {
                continue;
            }
            let meta = std::fs::symlink_metadata(&path)?;
            let mode = meta.mode() & 0o7777;
            let value = if meta.is_dir() {
                stack.push(path.clone());
                ('d', mode, Vec::new())
            } else if meta.file_type().is_symlink() {
                let t = std::fs::read_link(&path)?;
                ('l', 0, t.into_os_string().into_encoded_bytes())
            } else {
                ('f', mode, std::fs::read(&path)?)
            };
            out.insert(rel, value);
        }
    }
    Ok(out)
}

fn spec<'a>(dir: &'a Path, label: &'a str, format: FsType) -> FsSpec<'a> {
    FsSpec {
        dir,
        label,
        mtime: MTIME,
        format,
        progress: None,
    }
}

fn same_bytes(a: &Path, b: &Path) -> Result<()> {
    let (x, y) = (std::fs::read(a)?, std::fs::read(b)?);
    ensure!(
        x.len() == y.len(),
        "{} is {} bytes, {} is {}",
        a.display(),
        x.len(),
        b.display(),
        y.len()
    );
    if let Some(i) = x.iter().zip(&y).position(|(p, q)| p != q) {
        bail!("{} and {} differ at byte {i}", a.display(), b.display());
    }
    Ok(())
}

/// Files in `dir` other than `keep`.
fn others(dir: &Path, keep: &[&str]) -> Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if !keep.contains(&name.as_str()) {
            v.push(name);
        }
    }
    Ok(v)
}

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn sbin(tool: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(tool))
}

/// The image's content extracted with the format's own tools.
fn extract(format: FsType, img: &Path, into: &Path) -> Result<()> {
    match format {
        FsType::Ext4 => {
            std::fs::create_dir_all(into)?;
            let out = Command::new(sbin("debugfs"))
                .arg("-R")
                .arg(format!("rdump / {}", into.display()))
                .arg(img)
                .output()?;
            ensure!(out.status.success(), "debugfs rdump: {}", out.status);
            Ok(())
        }
        FsType::Erofs => {
            run(Command::new("fsck.erofs")
                .arg(format!("--extract={}", into.display()))
                .arg(img))?;
            Ok(())
        }
        other => bail!("{other} is not made by fsimage::make_image"),
    }
}

fn label_offset(format: FsType) -> usize {
    match format {
        FsType::Ext4 => 1024 + 120,
        _ => 1024 + 64,
    }
}

fn reproducible(format: FsType) -> Result<()> {
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    let a = t.path().join("a.img");
    let b = t.path().join("b.img");
    let summary = make_image(&spec(&src, "bundle", format), &a)?;
    assert_eq!(summary.bytes, std::fs::metadata(&a)?.len());
    assert_eq!(std::fs::metadata(&a)?.permissions().mode() & 0o777, 0o644);
    // Reading the files for the first image bumped their atimes; the second must not care.
    std::thread::sleep(Duration::from_millis(1100));
    make_image(&spec(&src, "bundle", format), &b)?;
    same_bytes(&a, &b).context("two builds from the same directory")?;

    // The same content created in the opposite order somewhere else, where possible on tmpfs
    // (which lists directories newest first), with other inode numbers, ctimes and mtimes.
    let shm = Path::new("/dev/shm");
    let other_root = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let copy = other_root.path().join("copy");
    make_tree(&copy, true)?;
    touch_all(
        &copy,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_234_567_890),
    )?;
    let list = |d: &Path| -> Result<Vec<_>> {
        std::fs::read_dir(d.join("many"))?
            .map(|e| Ok(e?.file_name()))
            .collect()
    };
    if list(&src)? == list(&copy)? {
        eprintln!("note: both copies list in the same order here; listing order is not tested");
    }
    let c = t.path().join("c.img");
    make_image(&spec(&copy, "bundle", format), &c)?;
    same_bytes(&a, &c).context("a copy created in another order, with other times")?;

    // Same content, files touched: the image does not change (times are normalised).
    touch_all(&src, SystemTime::now())?;
    let d = t.path().join("d.img");
    make_image(&spec(&src, "bundle", format), &d)?;
    same_bytes(&a, &d).context("after touching the files")?;

    // Other content or another mtime or label: another image.
    let e = t.path().join("e.img");
    make_image(
        &FsSpec {
            mtime: MTIME + 1,
            ..spec(&src, "bundle", format)
        },
        &e,
    )?;
    ensure!(std::fs::read(&a)? != std::fs::read(&e)?, "mtime ignored");
    write(&src.join("etc/hostname"), b"other\n", 0o644)?;
    make_image(&spec(&src, "bundle", format), &e)?;
    ensure!(std::fs::read(&a)? != std::fs::read(&e)?, "content ignored");

    assert_eq!(
        others(
            t.path(),
            &["src", "a.img", "b.img", "c.img", "d.img", "e.img"]
        )?,
        Vec::<String>::new()
    );
    Ok(())
}

#[test]
fn ext4_is_reproducible() -> Result<()> {
    reproducible(FsType::Ext4)
}

#[test]
fn erofs_is_reproducible() -> Result<()> {
    reproducible(FsType::Erofs)
}

fn label_and_content(format: FsType, label: &str) -> Result<()> {
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    let img = t.path().join("img");
    make_image(&spec(&src, label, format), &img)?;
    let data = std::fs::read(&img)?;

    let at = label_offset(format);
    let mut want = [0u8; 16];
    want[..label.len()].copy_from_slice(label.as_bytes());
    assert_eq!(&data[at..at + 16], &want, "label in the superblock");

    // blkid reads label and UUID the way udev will (and checks the erofs checksum).
    let out = run(Command::new(sbin("blkid"))
        .args(["-p", "-o", "export"])
        .arg(&img))?;
    let out = String::from_utf8(out)?;
    assert!(out.contains(&format!("LABEL={label}\n")), "{out}");
    assert!(
        out.contains(&format!("UUID={}\n", volume_uuid(format, label))),
        "{out}"
    );
    assert!(out.contains(&format!("TYPE={format}\n")), "{out}");

    // The tools' own consistency checks.
    match format {
        FsType::Ext4 => {
            run(Command::new(sbin("e2fsck")).arg("-fn").arg(&img))?;
            let cat = run(Command::new(sbin("debugfs"))
                .args(["-R", "cat /etc/hostname"])
                .arg(&img))?;
            assert_eq!(cat, b"bundle\n");
            let stat = run(Command::new(sbin("debugfs"))
                .args(["-R", "stat /lib/big.bin"])
                .arg(&img))?;
            let stat = String::from_utf8(stat)?;
            for field in ["ctime", "atime", "mtime", "crtime"] {
                let line = format!("{field}: {MTIME:#x}:00000000");
                assert!(stat.contains(&line), "{line} in {stat}");
            }
            assert!(stat.contains("User:     0   Group:     0"), "{stat}");
            assert!(stat.contains("Links: 2"), "{stat}");

            // Every inode (root, lost+found and each entry) has owner 0:0 and all times at
            // MTIME, whatever the host files had.
            let mut paths = vec!["/".to_owned(), "/lost+found".to_owned()];
            paths.extend(snapshot(&src)?.into_keys().map(|k| format!("/{k}")));
            let script = t.path().join("stat.debugfs");
            let lines: Vec<String> = paths.iter().map(|p| format!("stat \"{p}\"")).collect();
            std::fs::write(&script, lines.join("\n") + "\n")?;
            let stats = run(Command::new(sbin("debugfs"))
                .arg("-f")
                .arg(&script)
                .arg(&img))?;
            let stats = String::from_utf8(stats)?;
            let count = |needle: &str| stats.matches(needle).count();
            assert_eq!(count("Inode: "), paths.len(), "{stats}");
            assert_eq!(count("User:     0   Group:     0"), paths.len(), "{stats}");
            for field in ["ctime", "atime", "mtime", "crtime"] {
                let n = count(&format!("{field}: {MTIME:#x}:00000000"));
                assert_eq!(n, paths.len(), "{field}: {stats}");
            }
        }
        FsType::Erofs => {
            // fsck.erofs verifies the superblock checksum, so it checks the label patch.
            run(Command::new("fsck.erofs").arg(&img))?;
            let dump = run(Command::new("dump.erofs")
                .arg("--path=/lib/big.bin")
                .arg(&img))?;
            let dump = String::from_utf8(dump)?;
            assert!(dump.contains("Uid: 0   Gid: 0"), "{dump}");
            assert!(dump.contains("Links: 2"), "{dump}");
        }
        other => bail!("{other} is not made by fsimage::make_image"),
    }

    let x = t.path().join("x");
    extract(format, &img, &x)?;
    let got = snapshot(&x)?;
    let want = snapshot(&src)?;
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    // The extractors chmod before they chown, which clears set-id bits: compare 0o777 here
    // (the mount tests compare all mode bits).
    for (k, v) in &want {
        let g = &got[k];
        assert!(
            g.0 == v.0 && g.1 & 0o777 == v.1 & 0o777 && g.2 == v.2,
            "{k} differs"
        );
    }
    Ok(())
}

#[test]
fn ext4_label_and_content() -> Result<()> {
    label_and_content(FsType::Ext4, "bundle")?;
    label_and_content(FsType::Ext4, "ABCDEFGHIJ_lm-.9") // the longest: 16 bytes
}

#[test]
fn erofs_label_and_content() -> Result<()> {
    label_and_content(FsType::Erofs, "bundle")?;
    label_and_content(FsType::Erofs, "ABCDEFGHIJ_lm-.") // the longest: 15 bytes
}

/// Through the kernel (root, loop devices).
fn mount(format: FsType) -> Result<()> {
    ensure!(
        Path::new("/dev/loop-control").exists(),
        "no /dev/loop-control: this test needs loop devices"
    );
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    let img = t.path().join("img");
    let label = "mnt-test";
    make_image(&spec(&src, label, format), &img)?;
    let mnt = t.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    run(Command::new("mount")
        .args(["-t", format.as_str(), "-o", "loop,ro"])
        .arg(&img)
        .arg(&mnt))?;
    let result = (|| -> Result<()> {
        let got = snapshot(&mnt)?;
        let want = snapshot(&src)?;
        ensure!(got == want, "mounted content differs");
        let meta = std::fs::metadata(mnt.join("lib/big.bin"))?;
        ensure!(meta.uid() == 0 && meta.gid() == 0, "owner");
        ensure!(meta.mtime() as u64 == MTIME, "mtime {}", meta.mtime());
        ensure!(meta.nlink() == 2, "hard link");
        Ok(())
    })();
    run(Command::new("umount").arg(&mnt))?;
    result
}

#[test]
#[ignore = "needs root"]
fn ext4_mounts() -> Result<()> {
    mount(FsType::Ext4)
}

#[test]
#[ignore = "needs root"]
fn erofs_mounts() -> Result<()> {
    mount(FsType::Erofs)
}

#[test]
fn erofs_refuses_names_mkfs_erofs_would_drop() -> Result<()> {
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    // An empty lost+found (as copied from an ext4 root) is fine: nothing is lost.
    std::fs::create_dir(src.join("lost+found"))?;
    let out = t.path().join("out.img");
    make_image(&spec(&src, "bundle", FsType::Erofs), &out)?;
    std::fs::remove_file(&out)?;
    write(&src.join("var/lost+found.txt"), b"data", 0o644)?;
    let err = make_image(&spec(&src, "bundle", FsType::Erofs), &out).unwrap_err();
    assert!(matches!(err, FsImageError::Input { .. }), "{err:?}");
    let chain = format!("{:#}", anyhow::Error::from(err));
    assert!(chain.contains("var/lost+found.txt"), "{chain}");
    assert!(!out.exists());
    // ext4 keeps such names.
    make_image(&spec(&src, "bundle", FsType::Ext4), &out)?;
    let cat = run(Command::new(sbin("debugfs"))
        .args(["-R", "cat /var/lost+found.txt"])
        .arg(&out))?;
    assert_eq!(cat, b"data");
    assert_eq!(others(t.path(), &["src", "out.img"])?, Vec::<String>::new());
    Ok(())
}

#[test]
fn bad_label_writes_nothing() -> Result<()> {
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    let out = t.path().join("out.img");
    for (format, label) in [
        (FsType::Ext4, "abcdefghijklmnopq"),
        (FsType::Erofs, "abcdefghijklmnop"),
        (FsType::Ext4, "with space"),
        (FsType::Erofs, "slash/"),
        (FsType::Erofs, ""),
    ] {
        let err = make_image(&spec(&src, label, format), &out).unwrap_err();
        assert!(matches!(err, FsImageError::Label { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(format.as_str()), "{msg}");
        assert!(!out.exists());
    }
    assert_eq!(others(t.path(), &["src"])?, Vec::<String>::new());
    Ok(())
}

#[test]
fn missing_input_writes_nothing() -> Result<()> {
    let t = tempfile::tempdir()?;
    let out = t.path().join("out.img");
    let missing = t.path().join("no-such-dir");
    let file = t.path().join("a-file");
    std::fs::write(&file, b"x")?;
    for format in FORMATS {
        for input in [&missing, &file] {
            let err = make_image(&spec(input, "bundle", format), &out).unwrap_err();
            assert!(matches!(err, FsImageError::Input { .. }), "{err:?}");
            let chain = format!("{:#}", anyhow::Error::from(err));
            assert!(chain.contains(&input.display().to_string()), "{chain}");
            assert!(!out.exists());
        }
    }
    assert_eq!(others(t.path(), &["a-file"])?, Vec::<String>::new());
    Ok(())
}

#[test]
fn errors_leave_an_existing_output_alone() -> Result<()> {
    let t = tempfile::tempdir()?;
    let src = t.path().join("src");
    make_tree(&src, false)?;
    let out = t.path().join("out.img");
    std::fs::write(&out, b"previous")?;
    let missing = t.path().join("missing");
    for format in FORMATS {
        for bad in [
            spec(&src, "this-label-is-far-too-long", format),
            spec(&missing, "bundle", format),
            FsSpec {
                mtime: u64::from(u32::MAX) + 1,
                ..spec(&src, "bundle", format)
            },
        ] {
            make_image(&bad, &out).unwrap_err();
            assert_eq!(std::fs::read(&out)?, b"previous");
        }
        // And a successful build replaces it.
        make_image(&spec(&src, "bundle", format), &out)?;
        assert_ne!(std::fs::read(&out)?, b"previous");
        std::fs::write(&out, b"previous")?;
    }
    assert_eq!(others(t.path(), &["src", "out.img"])?, Vec::<String>::new());
    Ok(())
}
