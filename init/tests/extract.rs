//! Root-only tier: bundle tarballs, good and malicious, extracted into a temporary root. Every
//! malicious case checks the error names the cause and that a sentinel tree beside the root
//! (content, mode, mtime) and `/etc/passwd` are unchanged.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bootlace_contract::chain;
use bootlace_init::extract::{self, Compression, ExtractError, Limits, Summary};
use bootlace_init::sys::root::Root;
use tar::{EntryType, Header};

mod common;
use common::{snapshot, Snapshot};

struct Fixture {
    dir: tempfile::TempDir,
    root: PathBuf,
    sentinel: PathBuf,
    before: Snapshot,
    passwd: (Vec<u8>, u32, i64, u64),
}

fn passwd() -> (Vec<u8>, u32, i64, u64) {
    let m = std::fs::symlink_metadata("/etc/passwd").expect("stat /etc/passwd");
    (
        std::fs::read("/etc/passwd").expect("read /etc/passwd"),
        m.mode(),
        m.mtime(),
        m.nlink(),
    )
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let sentinel = dir.path().join("sentinel");
        std::fs::create_dir_all(&root).expect("mkdir");
        std::fs::create_dir_all(sentinel.join("dir")).expect("mkdir");
        std::fs::write(sentinel.join("secret"), b"do not touch").expect("write");
        std::fs::set_permissions(
            sentinel.join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o750)).expect("chmod");
        let before = snapshot(dir.path(), &root);
        Fixture {
            dir,
            root,
            sentinel,
            before,
            passwd: passwd(),
        }
    }

    fn run(
        &self,
        data: &[u8],
        compression: Compression,
        limits: &Limits,
    ) -> Result<Summary, ExtractError> {
        let root = Root::open(&self.root).expect("root");
        extract::extract(
            &mut &data[..],
            data.len() as u64,
            compression,
            &root,
            limits,
        )
    }

    /// Runs a malicious archive: it must fail with `cause` in the message, and nothing beside
    /// the root may change.
    fn refuse(
        &self,
        data: &[u8],
        compression: Compression,
        limits: &Limits,
        cause: &str,
    ) -> ExtractError {
        let e = self
            .run(data, compression, limits)
            .expect_err("a malicious archive was accepted");
        let msg = chain(&e);
        eprintln!("REFUSED: {msg}");
        assert!(msg.contains(cause), "{msg:?} does not contain {cause:?}");
        self.assert_untouched();
        e
    }

    fn assert_untouched(&self) {
        assert_eq!(
            snapshot(self.dir.path(), &self.root),
            self.before,
            "something beside the root changed"
        );
        assert_eq!(passwd(), self.passwd, "/etc/passwd changed");
        for p in ["/etc/bootlace-extract-x", "/bootlace-extract-x"] {
            assert!(!Path::new(p).exists(), "{p} was created");
        }
    }
}

// --- building archives ---------------------------------------------------------------------

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_000_000_000);
    h
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data).expect("append file");
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(EntryType::Directory, mode, 0);
    b.append_data(&mut h, path, &[][..]).expect("append dir");
}

fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = header(EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, path, target).expect("append symlink");
}

/// An entry written as is: no path checks by the builder.
fn raw(
    b: &mut tar::Builder<Vec<u8>>,
    kind: EntryType,
    name: &[u8],
    link: &[u8],
    mode: u32,
    data: &[u8],
) {
    let mut h = header(kind, mode, data.len() as u64);
    {
        let old = h.as_old_mut();
        old.name = [0; 100];
        old.name[..name.len()].copy_from_slice(name);
        old.linkname = [0; 100];
        old.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    b.append(&h, data).expect("append raw");
}

/// A GNU long name (or link) entry for the next entry.
fn long(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, value: &[u8]) {
    let mut data = value.to_vec();
    data.push(0);
    raw(b, kind, b"././@LongLink", b"", 0o644, &data);
}

/// A pax extended header for the next entry.
fn pax(b: &mut tar::Builder<Vec<u8>>, records: &[(&str, &[u8])]) {
    let mut data = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(format!("{len} {key}=").as_bytes());
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    raw(b, EntryType::XHeader, b"PaxHeader/x", b"", 0o644, &data);
}

fn finish(b: tar::Builder<Vec<u8>>) -> Vec<u8> {
    b.into_inner().expect("finish")
}

fn one_raw(kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, kind, name, link, 0o644, data);
    finish(b)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn zstd(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(["-q", "-c", "--no-progress"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the zstd command line tool is needed to build test data");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("zstd");
    writer.join().expect("join").expect("write to zstd");
    assert!(out.status.success(), "zstd failed");
    out.stdout
}

/// A good bundle with modes, uid/gid 1000, a setuid file, a sticky directory, `./` prefixes, a
/// symlink, a GNU long name and a pax path.
fn good_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    raw(&mut b, EntryType::Directory, b"./", b"", 0o755, b"");
    raw(&mut b, EntryType::Directory, b"./etc/", b"", 0o750, b"");
    raw(
        &mut b,
        EntryType::Regular,
        b"./etc/app.conf",
        b"",
        0o640,
        b"key = 1\n",
    );
    dir(&mut b, "bin", 0o755);
    file(&mut b, "bin/tool", 0o4755, b"#!/bin/sh\necho hi\n");
    dir(&mut b, "tmp", 0o1777);
    symlink(&mut b, "etc/current", "app.conf");
    symlink(&mut b, "abs", "/etc/app.conf");
    let long_path = format!("deep/{}/file", "d".repeat(150));
    file(&mut b, &long_path, 0o600, b"long");
    pax(&mut b, &[("path", b"pax/named-by-pax"), ("mtime", b"1.5")]);
    raw(
        &mut b,
        EntryType::Regular,
        b"pax/short",
        b"",
        0o644,
        b"pax data",
    );
    // A pax global header, as `git archive` writes: ignored.
    raw(
        &mut b,
        EntryType::XGlobalHeader,
        b"pax_global_header",
        b"",
        0o644,
        b"52 comment=0123456789012345678901234567890123456789\n",
    );
    file(&mut b, "empty", 0o644, b"");
    finish(b)
}

fn check_good(f: &Fixture, s: &Summary) {
    assert_eq!(
        *s,
        Summary {
            entries: 12,
            files: 5,
            dirs: 3,
            symlinks: 2,
            bytes: 8 + 18 + 4 + 8,
            stripped_modes: 2,
        }
    );
    let r = &f.root;
    let mode = |p: &str| std::fs::symlink_metadata(r.join(p)).expect(p).mode() & 0o7777;
    assert_eq!(
        std::fs::read(r.join("etc/app.conf")).expect("read"),
        b"key = 1\n"
    );
    assert_eq!(mode("etc"), 0o750);
    assert_eq!(mode("etc/app.conf"), 0o640);
    assert_eq!(mode("bin/tool"), 0o755, "setuid must be stripped");
    assert_eq!(mode("tmp"), 0o777, "sticky must be stripped");
    assert_eq!(
        std::fs::read_link(r.join("etc/current")).expect("link"),
        Path::new("app.conf")
    );
    assert_eq!(
        std::fs::read_link(r.join("abs")).expect("link"),
        Path::new("/etc/app.conf")
    );
    let long_path = format!("deep/{}/file", "d".repeat(150));
    assert_eq!(std::fs::read(r.join(long_path)).expect("long"), b"long");
    assert_eq!(
        std::fs::read(r.join("pax/named-by-pax")).expect("pax"),
        b"pax data"
    );
    assert!(!r.join("pax/short").exists());
    assert!(!r.join("pax_global_header").exists());
    assert_eq!(std::fs::read(r.join("empty")).expect("empty"), b"");
    for p in [
        "etc",
        "etc/app.conf",
        "bin/tool",
        "tmp",
        "abs",
        "pax/named-by-pax",
    ] {
        let m = std::fs::symlink_metadata(r.join(p)).expect(p);
        assert_eq!((m.uid(), m.gid()), (0, 0), "{p} must be owned by root");
    }
    f.assert_untouched();
}

// --- good archives -------------------------------------------------------------------------

#[test]
fn compression_names_and_sniffing() {
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        assert_eq!(c.to_string(), c.as_str());
    }
    let e = "xz".parse::<Compression>().expect_err("xz");
    assert!(e.to_string().contains("\"xz\""), "{e}");
    let tar = good_tar();
    assert_eq!(extract::sniff(&tar), Compression::None);
    assert_eq!(extract::sniff(&gzip(&tar)), Compression::Gzip);
    assert_eq!(extract::sniff(&zstd(&tar)), Compression::Zstd);
    assert_eq!(
        extract::sniff(&[0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]),
        Compression::Zstd
    );
    assert_eq!(extract::sniff(&[0x1f]), Compression::None);
    assert_eq!(extract::sniff(&[]), Compression::None);
}

#[test]
#[ignore = "needs root"]
fn a_good_tar_round_trips() {
    let f = Fixture::new();
    let s = f
        .run(&good_tar(), Compression::None, &Limits::default())
        .expect("extract");
    check_good(&f, &s);
}

#[test]
#[ignore = "needs root"]
fn a_good_tar_gz_round_trips() {
    let f = Fixture::new();
    let s = f
        .run(&gzip(&good_tar()), Compression::Gzip, &Limits::default())
        .expect("extract");
    check_good(&f, &s);
}

#[test]
#[ignore = "needs root"]
fn a_good_tar_zst_round_trips() {
    let f = Fixture::new();
    let s = f
        .run(&zstd(&good_tar()), Compression::Zstd, &Limits::default())
        .expect("extract");
    check_good(&f, &s);
}

#[test]
#[ignore = "needs root"]
fn multi_member_gzip_and_multi_frame_zstd_are_read_whole() {
    let tar = good_tar();
    let (a, b) = tar.split_at(1000);
    let f = Fixture::new();
    let gz = [gzip(a), gzip(b)].concat();
    check_good(
        &f,
        &f.run(&gz, Compression::Gzip, &Limits::default())
            .expect("gzip"),
    );
    // A skippable frame first (as pzstd writes), then two frames.
    let mut zst = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    zst.extend(zstd(a));
    zst.extend(zstd(b));
    let f = Fixture::new();
    check_good(
        &f,
        &f.run(&zst, Compression::Zstd, &Limits::default())
            .expect("zstd"),
    );
}

#[test]
#[ignore = "needs root"]
fn a_symlink_replaced_by_a_file_is_replaced_not_written_through() {
    let f = Fixture::new();
    let secret = f.sentinel.join("secret");
    let mut b = tar::Builder::new(Vec::new());
    symlink(&mut b, "f", secret.to_str().expect("utf-8"));
    symlink(&mut b, "g", "../../sentinel/secret");
    file(&mut b, "f", 0o644, b"replaced");
    file(&mut b, "g", 0o644, b"replaced");
    f.run(&finish(b), Compression::None, &Limits::default())
        .expect("extract");
    for p in ["f", "g"] {
        let m = std::fs::symlink_metadata(f.root.join(p)).expect(p);
        assert!(m.is_file(), "{p} is not a regular file");
        assert_eq!(std::fs::read(f.root.join(p)).expect(p), b"replaced");
    }
    f.assert_untouched();
}

// --- malicious paths -----------------------------------------------------------------------

#[test]
fn escaping_and_unnormalised_paths_are_rejected() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"../x",
            "bundle entry \"../x\": path has a \"..\" component",
        ),
        (b"./../x", "path has a \"..\" component"),
        (
            b"a/../../x",
            "bundle entry \"a/../../x\": path has a \"..\" component",
        ),
        (
            b"/etc/bootlace-extract-x",
            "bundle entry \"/etc/bootlace-extract-x\": path is absolute",
        ),
        (b"/bootlace-extract-x", "path is absolute"),
        (b"a//b", "empty component"),
        (b"a/./b", "path has a \".\" component"),
        (b"a/", "empty component"),
        (b"\xffname", "path is not UTF-8"),
    ];
    for (name, cause) in cases {
        let f = Fixture::new();
        f.refuse(
            &one_raw(EntryType::Regular, name, b"", b"x"),
            Compression::None,
            &Limits::default(),
            cause,
        );
        assert_eq!(
            std::fs::read_dir(&f.root).expect("read_dir").count(),
            0,
            "{cause}"
        );
    }
}

#[test]
fn escaping_long_names_and_pax_paths_are_rejected() {
    let f = Fixture::new();
    let deep = format!("{}/../../../x", "a".repeat(120));
    let mut b = tar::Builder::new(Vec::new());
    long(&mut b, EntryType::GNULongName, deep.as_bytes());
    raw(&mut b, EntryType::Regular, b"harmless", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "path has a \"..\" component",
    );

    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    pax(&mut b, &[("path", b"../../x")]);
    raw(&mut b, EntryType::Regular, b"harmless", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "bundle entry \"../../x\": path has a \"..\" component",
    );

    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    long(&mut b, EntryType::GNULongName, b"a\0b");
    raw(&mut b, EntryType::Regular, b"harmless", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "path contains a NUL byte",
    );

    let f = Fixture::new();
    let limits = Limits {
        max_path: 16,
        ..Limits::default()
    };
    f.refuse(
        &one_raw(EntryType::Regular, b"a-name-that-is-too-long", b"", b"x"),
        Compression::None,
        &limits,
        "over the 16-byte limit",
    );

    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    long(&mut b, EntryType::GNULongName, "a/".repeat(3000).as_bytes());
    raw(&mut b, EntryType::Regular, b"harmless", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "GNU long name of 6001 bytes is over the 4096-byte limit",
    );

    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    pax(&mut b, &[("SCHILY.xattr.user.big", &vec![b'x'; 70_000])]);
    raw(&mut b, EntryType::Regular, b"harmless", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "pax header of 70",
    );
}

#[test]
fn a_pax_size_that_disagrees_with_the_header_is_rejected() {
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    pax(&mut b, &[("size", b"0")]);
    raw(&mut b, EntryType::Regular, b"f", b"", 0o644, &[0; 1024]);
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "bundle entry \"f\": corrupt archive: pax size \"0\" disagrees with the header size 1024",
    );
}

// --- symlinks ------------------------------------------------------------------------------

#[test]
fn writing_through_an_escaping_symlink_stays_in_the_root() {
    let f = Fixture::new();
    let abs = f.sentinel.to_str().expect("utf-8").to_owned();
    for target in ["../../sentinel", "../sentinel", abs.as_str(), "/etc"] {
        for (kind, name) in [
            (EntryType::Regular, "secret"),
            (EntryType::Regular, "passwd"),
            (EntryType::Directory, "dir"),
        ] {
            let mut b = tar::Builder::new(Vec::new());
            symlink(&mut b, "link", target);
            raw(
                &mut b,
                kind,
                format!("link/{name}").as_bytes(),
                b"",
                0o777,
                if kind == EntryType::Regular {
                    b"pwned"
                } else {
                    b""
                },
            );
            match f.run(&finish(b), Compression::None, &Limits::default()) {
                // It may land inside the root (where the link leads, resolved in the root).
                Ok(_) => {}
                Err(e) => {
                    eprintln!("REFUSED: {}", chain(&e));
                    assert!(chain(&e).contains("bundle entry \"link/"), "{}", chain(&e))
                }
            }
            f.assert_untouched();
        }
    }
}

#[test]
#[ignore = "needs root"]
fn an_escaping_symlink_resolves_inside_the_root() {
    let f = Fixture::new();
    let abs = f.sentinel.to_str().expect("utf-8").to_owned();
    let mut b = tar::Builder::new(Vec::new());
    // What the links would reach if they were followed on the host, planted inside the root.
    dir(&mut b, "sentinel", 0o755);
    raw(
        &mut b,
        EntryType::Directory,
        abs.trim_start_matches('/').as_bytes(),
        b"",
        0o755,
        b"",
    );
    symlink(&mut b, "rel", "../../sentinel");
    symlink(&mut b, "abs", &abs);
    file(&mut b, "rel/secret", 0o644, b"pwned rel");
    file(&mut b, "abs/secret", 0o644, b"pwned abs");
    let s = f
        .run(&finish(b), Compression::None, &Limits::default())
        .expect("extract");
    assert_eq!((s.files, s.symlinks), (2, 2));
    let inside_abs = f.root.join(abs.trim_start_matches('/'));
    assert_eq!(
        std::fs::read(f.root.join("sentinel/secret")).expect("rel"),
        b"pwned rel"
    );
    assert_eq!(
        std::fs::read(inside_abs.join("secret")).expect("abs"),
        b"pwned abs"
    );
    f.assert_untouched();
}

#[test]
#[ignore = "needs root"]
fn a_directory_over_an_escaping_symlink_is_refused() {
    let f = Fixture::new();
    let abs = f.sentinel.to_str().expect("utf-8").to_owned();
    for target in [abs.as_str(), "../sentinel", "/etc"] {
        let mut b = tar::Builder::new(Vec::new());
        symlink(&mut b, "d", target);
        dir(&mut b, "d", 0o777);
        let e = f.refuse(
            &finish(b),
            Compression::None,
            &Limits::default(),
            "bundle entry \"d\"",
        );
        assert!(chain(&e).contains("not a directory"), "{}", chain(&e));
    }
    // And a symlink over a directory is refused too.
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    dir(&mut b, "d", 0o755);
    symlink(&mut b, "d", &abs);
    dir(&mut b, "d", 0o777);
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "a directory is there",
    );
}

#[test]
fn bad_symlink_targets_are_rejected() {
    let f = Fixture::new();
    f.refuse(
        &one_raw(EntryType::Symlink, b"l", b"", b""),
        Compression::None,
        &Limits::default(),
        "bundle entry \"l\": symlink target is empty",
    );
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    long(&mut b, EntryType::GNULongLink, b"\xff\xfe");
    raw(&mut b, EntryType::Symlink, b"l", b"x", 0o777, b"");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "symlink target is not UTF-8",
    );
}

// --- entry types ---------------------------------------------------------------------------

#[test]
fn hard_links_are_rejected() {
    let f = Fixture::new();
    f.refuse(
        &one_raw(EntryType::Link, b"h", b"/etc/passwd", b""),
        Compression::None,
        &Limits::default(),
        "bundle entry \"h\": hard link to \"/etc/passwd\": hard links are not allowed",
    );
    let f = Fixture::new();
    let secret = f.sentinel.join("secret");
    f.refuse(
        &one_raw(
            EntryType::Link,
            b"h",
            secret.to_str().expect("utf-8").as_bytes(),
            b"",
        ),
        Compression::None,
        &Limits::default(),
        "hard links are not allowed",
    );
    let f = Fixture::new();
    f.refuse(
        &one_raw(EntryType::Link, b"h", b"../sentinel/secret", b""),
        Compression::None,
        &Limits::default(),
        "hard links are not allowed",
    );
    assert!(!f.root.join("h").exists());
}

#[test]
fn devices_fifos_and_sparse_files_are_rejected() {
    let cases: &[(EntryType, &[u8], &str)] = &[
        (
            EntryType::Char,
            b"dev/x",
            "bundle entry \"dev/x\": character device: device nodes are not allowed",
        ),
        (
            EntryType::Char,
            b"null",
            "bundle entry \"null\": character device: device nodes are not allowed",
        ),
        (
            EntryType::Block,
            b"sda",
            "block device: device nodes are not allowed",
        ),
        (
            EntryType::Fifo,
            b"fifo",
            "bundle entry \"fifo\": FIFO: FIFOs are not allowed",
        ),
        (
            EntryType::GNUSparse,
            b"sparse",
            "GNU sparse file: sparse files are not allowed",
        ),
        (
            EntryType::new(b'V'),
            b"volume",
            "entry type 'V': not supported",
        ),
    ];
    for (kind, name, cause) in cases {
        let f = Fixture::new();
        f.refuse(
            &one_raw(*kind, name, b"", b""),
            Compression::None,
            &Limits::default(),
            cause,
        );
        assert_eq!(
            std::fs::read_dir(&f.root).expect("read_dir").count(),
            0,
            "{cause}"
        );
    }
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    pax(
        &mut b,
        &[("GNU.sparse.major", b"1"), ("GNU.sparse.minor", b"0")],
    );
    raw(&mut b, EntryType::Regular, b"sparse", b"", 0o644, b"x");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "pax sparse file",
    );
}

// --- limits --------------------------------------------------------------------------------

/// A tar of one entry of `kind` whose data is `size` zero bytes (and the end marker).
fn zeros_tar(kind: EntryType, name: &str, size: usize) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::with_capacity(size + 4096));
    let mut h = header(kind, 0o644, size as u64);
    b.append_data(&mut h, name, std::io::repeat(0).take(size as u64))
        .expect("append");
    finish(b)
}

use std::io::Read as _;

#[test]
#[ignore = "needs root"]
fn a_gzip_bomb_is_stopped() {
    let bomb = gzip(&zeros_tar(EntryType::Regular, "zeros", 100 << 20));
    assert!(bomb.len() < 1 << 20);
    // Over max_bytes: refused from the header, before the data is decompressed.
    let f = Fixture::new();
    let limits = Limits {
        max_bytes: 16 << 20,
        max_ratio: 200,
        ..Limits::default()
    };
    f.refuse(&bomb, Compression::Gzip, &limits, "bundle entry \"zeros\": 104857600 more bytes would take the files over the 16777216-byte limit");
    // Within max_bytes: the ratio stops it.
    let f = Fixture::new();
    let e = f.refuse(
        &bomb,
        Compression::Gzip,
        &Limits::default(),
        "(ratio limit)",
    );
    assert!(
        chain(&e).contains(&format!(
            "decompressed more than {} bytes",
            bomb.len() as u64 * 200
        )),
        "{}",
        chain(&e)
    );
    // The zeros in the data of a directory entry (never written) count too.
    let f = Fixture::new();
    let bomb = gzip(&zeros_tar(EntryType::Directory, "d/", 100 << 20));
    let limits = Limits {
        max_bytes: 16 << 20,
        max_ratio: 1_000_000,
        ..Limits::default()
    };
    let e = f.refuse(&bomb, Compression::Gzip, &limits, "(size limit)");
    assert!(
        chain(&e).contains(&format!(
            "decompressed more than {} bytes",
            limits.max_stream()
        )),
        "{}",
        chain(&e)
    );
}

#[test]
fn a_zstd_bomb_is_stopped() {
    let bomb = zstd(&zeros_tar(EntryType::Regular, "zeros", 100 << 20));
    let f = Fixture::new();
    f.refuse(
        &bomb,
        Compression::Zstd,
        &Limits::default(),
        "(ratio limit)",
    );
}

#[test]
#[ignore = "needs root"]
fn too_many_entries_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..20_001 {
        dir(&mut b, &format!("d{i:05}"), 0o755);
    }
    let tar = finish(b);
    let f = Fixture::new();
    let limits = Limits {
        max_entries: 20_000,
        ..Limits::default()
    };
    f.refuse(
        &gzip(&tar),
        Compression::Gzip,
        &limits,
        "bundle: over the 20000-entry limit",
    );

    // The limit itself is fine.
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..100 {
        dir(&mut b, &format!("d{i:03}"), 0o755);
    }
    let tar = finish(b);
    let f = Fixture::new();
    let limits = Limits {
        max_entries: 100,
        ..Limits::default()
    };
    assert_eq!(
        f.run(&tar, Compression::None, &limits)
            .expect("100 entries")
            .dirs,
        100
    );
    let limits = Limits {
        max_entries: 99,
        ..Limits::default()
    };
    f.refuse(&tar, Compression::None, &limits, "over the 99-entry limit");
}

#[test]
#[ignore = "needs root"]
fn total_bytes_are_counted_across_files() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..4 {
        file(&mut b, &format!("f{i}"), 0o644, &[b'x'; 1000]);
    }
    let tar = finish(b);
    let f = Fixture::new();
    let limits = Limits {
        max_bytes: 4000,
        ..Limits::default()
    };
    assert_eq!(
        f.run(&tar, Compression::None, &limits)
            .expect("at the limit")
            .bytes,
        4000
    );
    let f = Fixture::new();
    let limits = Limits {
        max_bytes: 3999,
        ..Limits::default()
    };
    f.refuse(
        &tar,
        Compression::None,
        &limits,
        "bundle entry \"f3\": 1000 more bytes would take the files over the 3999-byte limit",
    );
}

#[test]
#[ignore = "needs root"]
fn input_longer_than_declared_is_refused() {
    let f = Fixture::new();
    let tar = good_tar();
    let root = Root::open(&f.root).expect("root");
    let e = extract::extract(
        &mut &tar[..],
        1024,
        Compression::None,
        &root,
        &Limits::default(),
    )
    .expect_err("accepted");
    assert!(
        chain(&e).contains("longer than the 1024 bytes declared"),
        "{}",
        chain(&e)
    );
    f.assert_untouched();
}

// --- corrupt archives ----------------------------------------------------------------------

#[test]
#[ignore = "needs root"]
fn truncated_archives_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "a", 0o644, &[b'a'; 3000]);
    file(&mut b, "b", 0o644, &[b'b'; 3000]);
    let tar = finish(b);
    // Inside the data of "b".
    let f = Fixture::new();
    f.refuse(
        &tar[..512 * 8 + 512 + 1000],
        Compression::None,
        &Limits::default(),
        "bundle entry \"b\": corrupt archive: truncated",
    );
    assert!(
        !f.root.join("b").exists(),
        "a cut-short file was put in place"
    );
    // At a header boundary: no end-of-archive marker.
    let f = Fixture::new();
    f.refuse(
        &tar[..512 * 7],
        Compression::None,
        &Limits::default(),
        "truncated: the archive ends without an end-of-archive marker",
    );
    // Inside a header.
    let f = Fixture::new();
    f.refuse(
        &tar[..512 * 7 + 100],
        Compression::None,
        &Limits::default(),
        "bundle: corrupt archive",
    );
    // Empty.
    let f = Fixture::new();
    f.refuse(
        &[],
        Compression::None,
        &Limits::default(),
        "without an end-of-archive marker",
    );
    // A cut compressed stream.
    let gz = gzip(&tar);
    let f = Fixture::new();
    f.refuse(
        &gz[..gz.len() / 2],
        Compression::Gzip,
        &Limits::default(),
        "corrupt archive",
    );
    let f = Fixture::new();
    f.refuse(
        &gz[..gz.len() - 4],
        Compression::Gzip,
        &Limits::default(),
        "corrupt archive",
    );
    let zst = zstd(&tar);
    let f = Fixture::new();
    f.refuse(
        &zst[..zst.len() / 2],
        Compression::Zstd,
        &Limits::default(),
        "corrupt archive",
    );
    let f = Fixture::new();
    f.refuse(
        &zst[..zst.len() - 2],
        Compression::Zstd,
        &Limits::default(),
        "corrupt archive",
    );
}

#[test]
#[ignore = "needs root"]
fn corrupted_streams_are_refused() {
    let tar = good_tar();
    // A corrupt tar header (checksum mismatch).
    let mut bad = tar.clone();
    bad[512 + 10] ^= 0x55;
    let f = Fixture::new();
    f.refuse(
        &bad,
        Compression::None,
        &Limits::default(),
        "corrupt archive: archive header checksum mismatch",
    );
    // Corrupted gzip: in the deflate data, in the CRC.
    let gz = gzip(&tar);
    for at in [gz.len() / 2, gz.len() - 6] {
        let mut bad = gz.clone();
        bad[at] ^= 0xff;
        let f = Fixture::new();
        f.refuse(
            &bad,
            Compression::Gzip,
            &Limits::default(),
            "bundle: corrupt archive",
        );
    }
    // Not gzip at all.
    let f = Fixture::new();
    f.refuse(
        &tar,
        Compression::Gzip,
        &Limits::default(),
        "bundle: corrupt archive",
    );
    // Corrupted zstd: in the data, in the checksum.
    let zst = zstd(&tar);
    for at in [zst.len() / 2, zst.len() - 2] {
        let mut bad = zst.clone();
        bad[at] ^= 0xff;
        let f = Fixture::new();
        f.refuse(
            &bad,
            Compression::Zstd,
            &Limits::default(),
            "bundle: corrupt archive",
        );
    }
    let f = Fixture::new();
    f.refuse(
        &tar,
        Compression::Zstd,
        &Limits::default(),
        "bundle: corrupt archive: zstd",
    );
}

#[test]
#[ignore = "needs root"]
fn entries_under_directories_the_archive_does_not_list_are_placed() {
    // `tar c files/app.conf` writes no entry for `files/`: its parents are made (0755, root).
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    file(&mut b, "bootlace.toml", 0o644, b"version = 1\n");
    file(&mut b, "files/deep/app.conf", 0o640, b"conf");
    symlink(&mut b, "links/here", "../files/deep/app.conf");
    dir(&mut b, "empty/inside", 0o700);
    let s = f
        .run(&finish(b), Compression::None, &Limits::default())
        .unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert_eq!(s.files, 2);
    assert_eq!(
        std::fs::read(f.root.join("links/here")).expect("through the link"),
        b"conf"
    );
    for d in ["files", "files/deep", "links", "empty"] {
        let m = std::fs::metadata(f.root.join(d)).expect(d);
        assert_eq!((m.mode() & 0o7777, m.uid()), (0o755, 0), "{d}");
    }
    f.assert_untouched();
}

#[test]
#[ignore = "needs root"]
fn an_entry_through_a_dangling_link_says_so() {
    let f = Fixture::new();
    let mut b = tar::Builder::new(Vec::new());
    symlink(&mut b, "files", "missing/dir");
    file(&mut b, "files/app.conf", 0o644, b"conf");
    f.refuse(
        &finish(b),
        Compression::None,
        &Limits::default(),
        "bundle entry \"files/app.conf\": files/app.conf: /files is a symlink to \"missing/dir\", \
         which is not an existing directory",
    );
}
