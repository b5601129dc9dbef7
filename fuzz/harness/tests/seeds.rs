//! Writes the seed corpora under `fuzz/corpus/<target>/seed-*` (run by hand when the seeds
//! change: `cargo test -p bootlace-fuzz-harness --test seeds -- --ignored`). The seeds are
//! committed; this keeps them reproducible. Archives are made with the tar crate, gzip with
//! flate2, zstd with the `zstd` tool; malicious entries are written byte by byte.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bootlace_contract::protocol::{Frame, Kind};
use tar::{EntryType, Header};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

fn write(target: &str, name: &str, data: &[u8]) {
    let dir = corpus(target);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
}

fn clear(target: &str) {
    if let Ok(entries) = std::fs::read_dir(corpus(target)) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("seed-") {
                std::fs::remove_file(e.path()).expect("rm seed");
            }
        }
    }
}

// --- archives ------------------------------------------------------------------------------

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_000_000_000);
    h
}

/// An entry written as is: the name and link go into the header bytes unchecked.
fn raw(b: &mut tar::Builder<Vec<u8>>, kind: EntryType, name: &[u8], link: &[u8], data: &[u8]) {
    let mut h = header(kind, 0o644, data.len() as u64);
    {
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname = [0; 100];
        gnu.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_cksum();
    b.append(&h, data).expect("append raw");
}

fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32, data: &[u8]) {
    let mut h = header(EntryType::Regular, mode, data.len() as u64);
    b.append_data(&mut h, path, data).expect("append file");
}

fn dir(b: &mut tar::Builder<Vec<u8>>, path: &str, mode: u32) {
    let mut h = header(EntryType::Directory, mode, 0);
    b.append_data(&mut h, path, &[][..]).expect("append dir");
}

fn tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().expect("finish tar")
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

fn zstd(data: &[u8], args: &[&str]) -> Vec<u8> {
    let mut child = Command::new("zstd")
        .args(args)
        .args(["-q", "-c", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("the zstd tool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(data)
        .expect("zstd input");
    let out = child.wait_with_output().expect("zstd");
    assert!(out.status.success());
    out.stdout
}

/// Selector byte of the extract and decompress targets: limits (low 2 bits), compression
/// (next 2: none, gzip, zstd, sniff), short declared length (0x10, decompress only).
fn sel(limits: u8, compression: u8) -> u8 {
    limits | (compression << 2)
}

fn with(sel: u8, data: &[u8]) -> Vec<u8> {
    let mut v = vec![sel];
    v.extend_from_slice(data);
    v
}

fn good_tar() -> Vec<u8> {
    tar(|b| {
        dir(b, "etc/", 0o755);
        dir(b, "etc/app/", 0o750);
        file(b, "etc/app/app.conf", 0o640, b"listen = 8080\n");
        file(
            b,
            "bootlace.toml",
            0o644,
            b"version = 1\nhostname = \"demo\"\n",
        );
        let mut h = header(EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, "etc/app/current.conf", "app.conf")
            .expect("link");
    })
}

fn archives() -> Vec<(&'static str, Vec<u8>)> {
    let mut v = vec![("good", good_tar())];
    v.push((
        "dotdot",
        tar(|b| raw(b, EntryType::Regular, b"../bootlace-extract-x", b"", b"x")),
    ));
    v.push((
        "absolute",
        tar(|b| raw(b, EntryType::Regular, b"/etc/bootlace-extract-x", b"", b"x")),
    ));
    v.push((
        "symlink-then-file",
        tar(|b| {
            raw(b, EntryType::Symlink, b"l", b"/etc", b"");
            raw(b, EntryType::Regular, b"l/bootlace-extract-x", b"", b"x");
        }),
    ));
    v.push((
        "symlink-up-then-file",
        tar(|b| {
            raw(b, EntryType::Symlink, b"l", b"../sentinel", b"");
            raw(b, EntryType::Regular, b"l/secret", b"", b"x");
        }),
    ));
    v.push((
        "planted-link-file",
        tar(|b| raw(b, EntryType::Regular, b"abs/secret", b"", b"overwritten")),
    ));
    v.push((
        "symlink-then-dir-chmod",
        tar(|b| {
            raw(b, EntryType::Symlink, b"d", b"../sentinel", b"");
            let mut h = header(EntryType::Directory, 0o777, 0);
            h.as_gnu_mut().expect("gnu").name[..2].copy_from_slice(b"d/");
            h.set_cksum();
            b.append(&h, &[][..]).expect("dir");
        }),
    ));
    v.push((
        "rootlink-dev-chmod",
        tar(|b| dir(b, "rootlink/dev/", 0o777)),
    ));
    v.push((
        "hardlink-out",
        tar(|b| raw(b, EntryType::Link, b"passwd", b"/etc/passwd", b"")),
    ));
    v.push((
        "device",
        tar(|b| raw(b, EntryType::Char, b"null", b"", b"")),
    ));
    v.push(("fifo", tar(|b| raw(b, EntryType::Fifo, b"fifo", b"", b""))));
    v.push(("setuid", tar(|b| file(b, "suid", 0o4755, b"#!/bin/sh\n"))));
    v.push((
        "long-name",
        tar(|b| {
            let long = format!("{}/f", "d".repeat(150));
            file(b, &long, 0o644, b"long");
        }),
    ));
    v.push((
        "pax",
        tar(|b| {
            let mut h = Header::new_ustar();
            h.set_entry_type(EntryType::XHeader);
            let rec = b"30 path=pax/bootlace-extract-x\n";
            h.set_size(rec.len() as u64);
            h.set_cksum();
            b.append(&h, &rec[..]).expect("pax");
            file(b, "placeholder", 0o644, b"pax");
        }),
    ));
    let mut truncated = good_tar();
    truncated.truncate(1200);
    v.push(("truncated", truncated));
    v
}

#[test]
#[ignore = "writes the seed corpora; run by hand"]
fn write_seeds() {
    for t in [
        "manifest",
        "confine",
        "extract",
        "decompress",
        "frames",
        "host_session",
    ] {
        clear(t);
    }

    seed_manifest();
    seed_frames();
    seed_host_session();
    seed_extract();
    seed_decompress();
    seed_confine();
}

/// manifest: the documentation's examples, and refusals.
fn seed_manifest() {
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/manifest.md"),
    )
    .expect("docs/manifest.md");
    for (i, block) in docs.split("```toml\n").skip(1).enumerate() {
        let text = block.split("```").next().expect("block");
        write("manifest", &format!("doc-{i}"), text.as_bytes());
    }
    let bad: &[(&str, &str)] = &[
        ("dotdot", "version = 1\n[[files]]\npath = \"/etc/../../x\"\ncontent = \"\"\n"),
        ("proc", "version = 1\n[[directories]]\npath = \"/proc/sys\"\n"),
        ("double-slash", "version = 1\n[[directories]]\npath = \"//proc/x\"\n"),
        ("dup", "version = 1\n[[files]]\npath = \"/x\"\ncontent = \"\"\n[[symlinks]]\npath = \"/x\"\ntarget = \"y\"\n"),
        ("version2", "version = 2\n"),
        ("unknown-key", "version = 1\nbogus = 1\n"),
        ("run", "version = 1\ninstance_id = \"i\"\n[[run]]\nname = \"a\"\ncommand = [\"/bin/true\"]\nfrequency = \"once-per-instance\"\ncwd = \"/var\"\n"),
        ("mounts", "version = 1\n[[mounts]]\ntype = \"bind\"\npath = \"/a\"\nsource = \"/b\"\n[[mounts]]\ntype = \"tmpfs\"\npath = \"/c\"\nsize = \"50%\"\nmode = 0o1777\n"),
    ];
    for (name, text) in bad {
        write("manifest", name, text.as_bytes());
    }
    write(
        "manifest",
        "deep",
        format!(
            "version = 1\nx = {}{}\n",
            "[".repeat(3000),
            "]".repeat(3000)
        )
        .as_bytes(),
    );
}

/// frames: the documentation's frames in a few splits, and refusals.
fn seed_frames() {
    let protocol = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md"),
    )
    .expect("docs/protocol.md");
    let doc_frames = protocol
        .split("```frames\n")
        .nth(1)
        .and_then(|r| r.split("```").next())
        .expect("frames block")
        .as_bytes()
        .to_vec();
    let splits: &[&[u8]] = &[&[], &[1], &[3, 7, 64], &[0, 0], &[15, 1, 2, 200]];
    for (i, s) in splits.iter().enumerate() {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v.extend_from_slice(&doc_frames);
        write("frames", &format!("doc-{i}"), &v);
    }
    for (name, wire) in [
        ("huge-len", &b"BL1 READY 1 4294967296\n"[..]),
        ("not-kv", b"BL1 READY 1 3\nabc"),
        ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("no-newline", &[b'A'; 80]),
        ("cut", b"BL1 HELLO 0 47\nPROTOCOL=1\n"),
    ] {
        let mut v = vec![2, 5, 1];
        v.extend_from_slice(wire);
        write("frames", name, &v);
    }
}

/// host_session: a typical boot, a resend after a lost ack, garbage, a host-only kind.
fn seed_host_session() {
    let enc = |fs: &[Frame]| -> Vec<u8> {
        fs.iter()
            .flat_map(|f| f.encode().expect("encode"))
            .collect()
    };
    let hello = |boot: &str| {
        Frame::new(Kind::Hello, 0)
            .with("PROTOCOL", 1)
            .with("INIT_VERSION", "0.1.0")
            .with("BOOT_ID", boot)
            .with("BOOTTIME_NS", 123)
    };
    let boot = enc(&[
        hello("5a1e"),
        Frame::new(Kind::Step, 1)
            .with("STEP", "host")
            .with("STATE", "finished")
            .with("DURATION_MS", 180),
        Frame::new(Kind::GetBundle, 2),
        Frame::new(Kind::Log, 3).with("MESSAGE", "hi"),
        Frame::new(Kind::Ready, 4)
            .with("READY", 1)
            .with("STATUS", "hand-off: exec /sbin/init"),
        Frame::new(Kind::Exit, 5).with("EXIT_STATUS", 3),
    ]);
    let resend = enc(&[
        hello("b"),
        Frame::new(Kind::Ready, 4).with("READY", 1),
        Frame::new(Kind::Ready, 4).with("READY", 1),
        hello("c"),
        Frame::new(Kind::Ready, 4).with("READY", 1),
        Frame::new(Kind::Failed, 2).with("STATUS", "late"),
    ]);
    let host_only = enc(&[
        hello("x"),
        Frame::new(Kind::Ack, 0),
        Frame::new(Kind::Step, 1),
    ]);
    let cases: &[(&str, u8, u8, &[u8])] = &[
        ("boot-bundle", 1, 0, &boot),
        ("boot-no-bundle", 0, 7, &boot),
        ("boot-eintr-reset", 1 | 2 | 4, 3, &boot),
        ("boot-write-fails", 1 | (2 << 3), 64, &boot),
        ("resend", 0, 0, &resend),
        ("host-only-kind", 1, 0, &host_only),
        ("garbage", 1, 0, b"BL1 HELLO 0 5\nA=1\nBL1 NOPE"),
        ("cut", 1, 1, &boot[..boot.len() - 3]),
    ];
    for (name, flags, chunk, wire) in cases {
        let mut v = vec![*flags, *chunk];
        v.extend_from_slice(wire);
        write("host_session", name, &v);
    }
}

/// extract: each archive plain (default limits), and the good one compressed and with
/// tight limits.
fn seed_extract() {
    for (name, data) in archives() {
        write("extract", name, &with(sel(0, 0), &data));
    }
    let good = good_tar();
    write("extract", "good-gzip", &with(sel(0, 1), &gzip(&good)));
    write(
        "extract",
        "good-zstd",
        &with(sel(0, 2), &zstd(&good, &["-19"])),
    );
    write(
        "extract",
        "good-sniffed-zstd",
        &with(sel(0, 3), &zstd(&good, &[])),
    );
    write("extract", "good-tight-limits", &with(sel(1, 0), &good));
    write("extract", "good-one-entry", &with(sel(2, 1), &gzip(&good)));
}

/// decompress: streams of each kind, multi-member, skippable frames, damage, a bomb.
fn seed_decompress() {
    let good = good_tar();
    let zeros = vec![0u8; 256 * 1024];
    let mut two_gz = gzip(b"first member\n");
    two_gz.extend_from_slice(&gzip(b"second member\n"));
    let mut zst_frames = vec![0x50, 0x2a, 0x4d, 0x18, 4, 0, 0, 0, 1, 2, 3, 4];
    zst_frames.extend_from_slice(&zstd(b"first frame\n", &["--check"]));
    zst_frames.extend_from_slice(&zstd(b"second frame\n", &["--no-check"]));
    let mut bad_crc = gzip(b"some data to be checked\n");
    let n = bad_crc.len();
    bad_crc[n - 6] ^= 0xff;
    let mut bad_check = zstd(b"some data to be checked\n", &["--check"]);
    let n = bad_check.len();
    bad_check[n - 1] ^= 0xff;
    let streams: &[(&str, u8, &[u8])] = &[
        ("gzip", sel(0, 1), &gzip(&good)),
        ("zstd", sel(0, 2), &zstd(&good, &["-19", "--check"])),
        ("none", sel(0, 0), &good),
        ("gzip-members", sel(0, 3), &two_gz),
        ("zstd-frames", sel(0, 3), &zst_frames),
        ("gzip-bad-crc", sel(0, 1), &bad_crc),
        ("zstd-bad-checksum", sel(0, 2), &bad_check),
        ("gzip-bomb", sel(1, 1), &gzip(&zeros)),
        ("zstd-bomb", sel(3, 2), &zstd(&zeros, &["-19"])),
        ("gzip-short-declared", sel(0, 1) | 0x10, &gzip(&good)),
        ("gzip-truncated", sel(0, 1), &gzip(&good)[..40]),
        ("zstd-long-window", sel(0, 2), &zstd(&zeros, &["--long=27"])),
    ];
    for (name, s, data) in streams {
        write("decompress", name, &with(*s, data));
    }
}

/// confine: operations through each trap. Op byte: 0 write, 1 mkdir/chmod, 2 symlink,
/// 3 open_dir (then create flag), 4 preflight, 5 open_file, 6 exists, 7 copy_tree.
fn seed_confine() {
    let names = bootlace_fuzz_harness::confine::NAMES;
    let path = |comps: &[&str]| -> Vec<u8> {
        let mut v = vec![comps.len() as u8];
        for c in comps {
            v.push(names.iter().position(|n| n == c).expect("a known name") as u8);
        }
        v
    };
    let op = |code: u8, p: &[&str], rest: &[u8]| -> Vec<u8> {
        let mut v = vec![code];
        v.extend_from_slice(&path(p));
        v.extend_from_slice(rest);
        v
    };
    let write_op = |p: &[&str]| op(0, p, &[3, b'x', b'y', b'z', 0xed, 0x01, 0, 0]);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("write-abs", write_op(&["abs", "secret"])),
        ("write-abs-secret", write_op(&["abs_secret"])),
        ("write-up", write_op(&["up", "secret"])),
        ("write-upup", write_op(&["upup", "tmp", "bl-fuzz-x"])),
        (
            "write-rootlink-etc",
            write_op(&["rootlink", "etc", "bl-fuzz-x"]),
        ),
        ("write-procself", write_op(&["procself", "bl-fuzz-x"])),
        ("write-magic", write_op(&["magic", "bl-fuzz-x"])),
        ("write-loop", write_op(&["loop", "bl-fuzz-x"])),
        ("write-a-b", write_op(&["a", "bl-fuzz-x"])),
        ("write-proc", write_op(&["etc", "p", "bl-fuzz-x"])),
        (
            "write-dotdot",
            write_op(&["..", "..", "sentinel", "secret"]),
        ),
        (
            "chmod-rootlink-dev",
            op(1, &["rootlink", "dev"], &[0xff, 0x01, 1, 1]),
        ),
        ("chmod-up", op(1, &["up"], &[0xff, 0x01, 0, 0])),
        (
            "mkdir-rootlink-dev-child",
            op(3, &["rootlink", "dev", "bl-fuzz-x", "bl-fuzz-y"], &[1]),
        ),
        (
            "symlink-then-write",
            [
                op(2, &["bl-fuzz-x"], &[0]),
                write_op(&["bl-fuzz-x", "secret"]),
            ]
            .concat(),
        ),
        ("open-fifo", op(5, &["etc", "fifo"], &[])),
        ("open-abs-secret", op(5, &["abs_secret"], &[])),
        (
            "preflight-dev",
            op(4, &["rootlink", "dev", "bl-fuzz-x"], &[]),
        ),
        ("exists-up", op(6, &["up", "secret"], &[])),
        ("copy-etc", op(7, &["etc"], &path(&["bl-fuzz-x"]))),
    ];
    for (name, data) in cases {
        write("confine", name, &data);
    }
}
