//! Signed bundles from the command line: `keygen`, `bundle --sign` and its sidecar, `bake
//! --trust-key` / `--trust-host` into init.toml; keys made by the real openssl CLI work as they
//! are; a bad key is refused naming the file, leaving nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bootlace_contract::config::InitConfig;
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::signature::{PublicKey, Signature};

fn image(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
        .args(args)
        .output()
        .expect("run bootlace-image")
}

fn run(args: &[&str]) -> Output {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
    image(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8")
}

/// A bundle directory with a valid manifest.
fn bundle_dir(dir: &Path) -> PathBuf {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).expect("mkdir");
    std::fs::write(
        b.join("bootlace.toml"),
        "version = 1\nhostname = \"signed\"\n",
    )
    .expect("w");
    b
}

/// Every entry of `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn keygen_sign_and_verify_the_sidecar() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = tmp.path().join("k");
    let o = run(&["keygen", "--out", p(&key)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let private = std::fs::read_to_string(&key).expect("read");
    assert!(
        private.starts_with("-----BEGIN PRIVATE KEY-----\n"),
        "{private}"
    );
    let public_pem = std::fs::read_to_string(tmp.path().join("k.pub")).expect("pub");
    assert!(
        public_pem.starts_with("-----BEGIN PUBLIC KEY-----\n"),
        "{public_pem}"
    );
    let public = PublicKey::from_file_text(&public_pem).expect("a public key");
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains(&public.to_string()), "{printed}");

    // Never overwrites, either file; the refusal changes nothing.
    let o = run(&["keygen", "--out", p(&key)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("exists (keygen never overwrites a key"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read_to_string(&key).expect("read"), private);
    std::fs::write(tmp.path().join("k2.pub"), "mine").expect("w");
    let o = run(&["keygen", "--out", p(&tmp.path().join("k2"))]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("k2.pub: exists"), "{}", stderr(&o));
    assert!(!tmp.path().join("k2").exists());

    // bundle --sign: the tarball and its sidecar, one line, the key's signature of its sha256.
    let b = bundle_dir(tmp.path());
    let out = tmp.path().join("b.tar.gz");
    let o = run(&[
        "bundle",
        p(&b),
        "--format",
        "tar.gz",
        "--out",
        p(&out),
        "--sign",
        p(&key),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let digest: Sha256Digest = j["sha256"]
        .as_str()
        .expect("sha256")
        .parse()
        .expect("digest");
    assert_eq!(
        bootlace_contract::digest::of_bytes(&std::fs::read(&out).expect("b")),
        digest
    );
    let sidecar = std::fs::read_to_string(tmp.path().join("b.tar.gz.sig")).expect("sidecar");
    assert!(
        sidecar.ends_with('\n') && sidecar.lines().count() == 1,
        "{sidecar:?}"
    );
    let sig: Signature = sidecar.trim_end().parse().expect("a signature");
    assert!(public.verifies(&digest, &sig));
    assert_eq!(j["signature"]["signature"], sidecar.trim_end());
    assert_eq!(j["signature"]["key"], public.to_string());
    // The host agent reads it beside the bundle.
    let served = bootlace_agent::bundle::BundleSource::from_path(&out).expect("serve");
    assert_eq!(served.signature.as_deref(), Some(sidecar.trim_end()));

    // Rebuilt without --sign: the stale sidecar goes.
    let o = run(&["bundle", p(&b), "--format", "tar.gz", "--out", p(&out)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("b.tar.gz.sig: it signed an earlier build"),
        "{}",
        stderr(&o)
    );
    assert!(!tmp.path().join("b.tar.gz.sig").exists());
}

#[test]
fn a_bad_key_is_refused_naming_it_and_nothing_is_left() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let b = bundle_dir(tmp.path());
    let work = tmp.path().join("out");
    std::fs::create_dir(&work).expect("mkdir");
    let public_only = tmp.path().join("k.pub");
    let o = run(&["keygen", "--out", p(&tmp.path().join("k"))]);
    assert!(o.status.success(), "{}", stderr(&o));
    let garbage = tmp.path().join("garbage");
    std::fs::write(
        &garbage,
        "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
    )
    .expect("w");
    let out = work.join("b.tar");
    let absent = tmp.path().join("absent");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--sign", p(&public_only)],
            "k.pub: not an ed25519 private key in PKCS#8 PEM",
        ),
        (
            &["--sign", p(&garbage)],
            "garbage: not an ed25519 private key",
        ),
        (&["--sign", p(&absent)], "read "),
    ];
    for (extra, want) in cases {
        let mut args = vec!["bundle", p(&b), "--format", "tar", "--out", p(&out)];
        args.extend_from_slice(extra);
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{extra:?}: {}", stderr(&o));
        assert!(
            listing(&work).is_empty(),
            "{extra:?}: left {:?}",
            listing(&work)
        );
    }
    // --sign on a disk image: refused before anything is made.
    let o = run(&[
        "bundle",
        p(&b),
        "--format",
        "dir",
        "--out",
        p(&work.join("d")),
        "--sign",
        p(&tmp.path().join("k")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("--sign applies to the vsock tarballs"),
        "{}",
        stderr(&o)
    );
    assert!(listing(&work).is_empty(), "left {:?}", listing(&work));
}

/// A stand-in init: a script that answers `--version` like the real one.
fn fake_init(dir: &Path) -> PathBuf {
    let p = dir.join("bootlace-init");
    std::fs::write(&p, "#!/bin/sh\necho bootlace-init 9.9.9\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// Bakes an initramfs (no modules: the stand-in kernel has none) with `args`; returns the
/// baked init.toml, or the error.
fn bake_config(tmp: &Path, args: &[&str]) -> Result<(InitConfig, String), String> {
    let out = tmp.join("out.img");
    let _ = std::fs::remove_file(&out);
    let _ = std::fs::remove_file(tmp.join("out.img.meta.json"));
    let modules = tmp.join("modules/6.1.0-test");
    std::fs::create_dir_all(modules.join("kernel")).expect("mkdir");
    let mut dep = String::new();
    for m in ["virtio_pci", "vmw_vsock_virtio_transport", "qemu_fw_cfg"] {
        std::fs::write(modules.join(format!("kernel/{m}.ko")), b"\x7fELF").expect("module");
        dep.push_str(&format!("kernel/{m}.ko:\n"));
    }
    std::fs::write(modules.join("modules.dep"), dep).expect("dep");
    std::fs::write(modules.join("modules.builtin"), "").expect("builtin");
    let mut all = vec![
        "bake",
        "--format",
        "initramfs",
        "--compress",
        "none",
        "--init",
    ];
    let init = fake_init(tmp);
    all.push(p(&init));
    all.extend(["--out", p(&out), "--modules-root"]);
    let mroot = tmp.join("modules");
    all.push(p(&mroot));
    all.extend(["--source", "vsock", "--host", "vsock:2:1024"]);
    all.extend_from_slice(args);
    let o = run(&all);
    if !o.status.success() {
        assert!(!out.exists(), "output left after a refusal");
        return Err(stderr(&o));
    }
    let bytes = std::fs::read(&out).expect("read");
    let entries = bootlace_image::cpio::read_all(&bytes).expect("newc");
    let config = entries
        .iter()
        .find(|e| e.header.name == "etc/bootlace/init.toml")
        .expect("init.toml in the archive");
    let text = String::from_utf8(config.data.clone()).expect("utf-8");
    let c = InitConfig::from_toml(&text, Path::new("init.toml")).expect("parses");
    Ok((c, stderr(&o)))
}

#[test]
fn bake_trust_keys_and_trust_host_into_init_toml() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for k in ["a", "b"] {
        let o = run(&["keygen", "--out", p(&tmp.path().join(k))]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let read = |k: &str| {
        PublicKey::from_file_text(&std::fs::read_to_string(tmp.path().join(k)).expect("r"))
            .expect("key")
    };
    let (a, b) = (read("a.pub"), read("b.pub"));
    let b_text = b.to_string();
    // A PEM file and an ed25519: value; the same key twice is baked once.
    let a_pub = tmp.path().join("a.pub");
    let c = bake_config(
        tmp.path(),
        &[
            "--trust-key",
            p(&a_pub),
            "--trust-key",
            &b_text,
            "--trust-key",
            p(&a_pub),
        ],
    )
    .expect("bakes");
    assert_eq!(c.0.host.trust_keys, [a, b]);
    assert!(!c.0.host.trust_host);
    assert!(!c.1.contains("nothing baked"), "{}", c.1);
    let (c, _) = bake_config(tmp.path(), &["--trust-host"]).expect("bakes");
    assert!(c.host.trust_host && c.host.trust_keys.is_empty());

    // Nothing baked to trust by: baked, with a warning saying what the guest will need.
    let tmp2 = tempfile::tempdir().expect("tempdir");
    let (c, warned) = bake_config(tmp2.path(), &[]).expect("bakes");
    assert!(c.vsock_trusts_only_boot_digests());
    assert!(
        warned.contains("warning: the vsock source has nothing baked to trust a bundle by")
            && warned.contains("SMBIOS type 11 io.bootlace.digest"),
        "{warned}"
    );

    // A bad key file or value: refused naming it, nothing left.
    let priv_key = tmp.path().join("a");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--trust-key", p(&priv_key)],
            format!("--trust-key: {}: not an ed25519 public key", p(&priv_key)),
        ),
        (
            vec!["--trust-key", "/nonexistent/k.pub"],
            "--trust-key: read /nonexistent/k.pub".to_owned(),
        ),
        (
            vec!["--trust-key", "ed25519:!!"],
            "public key \"ed25519:!!\" must be ed25519:<base64 of 32 bytes>".to_owned(),
        ),
    ];
    for (args, want) in cases {
        let e = bake_config(tmp.path(), &args).expect_err(&want);
        assert!(e.contains(&want), "{args:?}: {e}");
    }
}

/// Keys made by the real openssl CLI: `openssl genpkey -algorithm ed25519` signs, and
/// `openssl pkey -pubout` is a trusted key.
#[test]
fn openssl_keys_work_as_they_are() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let key = tmp.path().join("ossl.pem");
    let public = tmp.path().join("ossl.pub");
    let gen = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out", p(&key)])
        .output()
        .expect("openssl is installed (qemu/setup.sh installs it)");
    assert!(gen.status.success(), "{}", stderr(&gen));
    let o = Command::new("openssl")
        .args(["pkey", "-in", p(&key), "-pubout", "-out", p(&public)])
        .output()
        .expect("openssl");
    assert!(o.status.success(), "{}", stderr(&o));

    let b = bundle_dir(tmp.path());
    let out = tmp.path().join("b.tar");
    let o = run(&[
        "bundle",
        p(&b),
        "--format",
        "tar",
        "--out",
        p(&out),
        "--sign",
        p(&key),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let digest: Sha256Digest = j["sha256"].as_str().expect("sha").parse().expect("digest");
    let pk = bootlace_image::keys::read_public_key(p(&public)).expect("openssl public key");
    let sig: Signature = std::fs::read_to_string(tmp.path().join("b.tar.sig"))
        .expect("sidecar")
        .trim_end()
        .parse()
        .expect("signature");
    assert!(pk.verifies(&digest, &sig));
    assert_eq!(j["signature"]["key"], pk.to_string());

    // And openssl verifies bootlace's signature of the documented message.
    let msg = tmp.path().join("msg");
    std::fs::write(&msg, bootlace_contract::signature::message(&digest)).expect("w");
    let sigfile = tmp.path().join("sig.bin");
    std::fs::write(&sigfile, sig.bytes()).expect("w");
    let o = Command::new("openssl")
        .args([
            "pkeyutl",
            "-verify",
            "-pubin",
            "-inkey",
            p(&public),
            "-rawin",
            "-in",
            p(&msg),
            "-sigfile",
            p(&sigfile),
        ])
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
}
