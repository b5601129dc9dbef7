//! The guest binaries must be static: no ELF interpreter, no shared-library dependency. Their
//! sizes are printed (run with `--nocapture`, as `make test` does for this test).

use bootlace_tests::artifact;

const PT_INTERP: u32 = 3;
const PT_DYNAMIC: u32 = 2;

/// The program header types of a 64-bit little-endian ELF file.
fn program_header_types(elf: &[u8]) -> Vec<u32> {
    assert!(
        elf.len() > 64 && elf.starts_with(b"\x7fELF"),
        "not an ELF file"
    );
    assert_eq!(elf[4], 2, "not ELF64");
    assert_eq!(elf[5], 1, "not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum)
        .map(|i| {
            let o = phoff + i * phentsize;
            u32::from_le_bytes(elf[o..o + 4].try_into().expect("4 bytes"))
        })
        .collect()
}

/// DT_NEEDED entries would only exist with a PT_DYNAMIC segment; a static-pie has one for
/// relocations, so check its entries.
fn needed_count(elf: &[u8]) -> usize {
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let phentsize = u16::from_le_bytes([elf[0x36], elf[0x37]]) as usize;
    let phnum = u16::from_le_bytes([elf[0x38], elf[0x39]]) as usize;
    let mut needed = 0;
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        let ty = u32::from_le_bytes(elf[o..o + 4].try_into().expect("4"));
        if ty != PT_DYNAMIC {
            continue;
        }
        let off = u64::from_le_bytes(elf[o + 8..o + 16].try_into().expect("8")) as usize;
        let size = u64::from_le_bytes(elf[o + 32..o + 40].try_into().expect("8")) as usize;
        for entry in elf[off..off + size].chunks_exact(16) {
            let tag = i64::from_le_bytes(entry[..8].try_into().expect("8"));
            if tag == 1 {
                needed += 1;
            }
        }
    }
    needed
}

#[test]
fn guest_binaries_are_static() {
    for name in ["bootlace-init", "bootlace-probe"] {
        let path = artifact(name).expect("artifact");
        let elf = std::fs::read(&path).expect("read");
        let types = program_header_types(&elf);
        assert!(
            !types.contains(&PT_INTERP),
            "{} has an ELF interpreter",
            path.display()
        );
        assert_eq!(
            needed_count(&elf),
            0,
            "{} needs shared libraries",
            path.display()
        );
        println!(
            "{name}: static, {} bytes ({:.2} MiB)",
            elf.len(),
            elf.len() as f64 / 1024.0 / 1024.0
        );
    }
}

#[test]
fn a_dynamic_binary_is_told_apart() {
    // The check itself must be able to fail: /bin/sh on the host is dynamically linked.
    let elf = std::fs::read("/bin/sh").expect("read /bin/sh");
    assert!(program_header_types(&elf).contains(&PT_INTERP));
}

#[test]
fn init_refuses_to_boot_when_not_pid1_and_checks_configs() {
    let init = artifact("bootlace-init").expect("artifact");
    let out = std::process::Command::new(&init).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not PID 1"));

    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("init.toml");
    std::fs::write(&cfg, "version = 1\nmodules = [\"vsock\"]\n").expect("write");
    let out = std::process::Command::new(&init)
        .args(["check", "--config"])
        .arg(&cfg)
        .args(["--cmdline", "console=ttyS0 bootlace.handoff=supervise"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mode = \"supervise\""), "{text}");
    assert!(text.contains("modules = [\"vsock\"]"), "{text}");

    let out = std::process::Command::new(&init)
        .args(["check", "--config"])
        .arg(&cfg)
        .args(["--cmdline", "bootlace.typo=1"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\"bootlace.typo\""));
}

#[test]
fn init_check_follows_cli_conventions() {
    use std::os::unix::ffi::OsStrExt;
    let init = artifact("bootlace-init").expect("artifact");
    let run = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(&init)
            .args(args)
            .output()
            .expect("run")
    };
    let os = |s: &str| std::ffi::OsStr::new(s).to_owned();
    // --help works, on stdout, exit 0; also after `check`.
    for args in [vec![os("--help")], vec![os("check"), os("--help")]] {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let out = run(&refs);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("usage: bootlace-init"));
    }
    // A config file that was named but does not exist is an error, not the defaults.
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("missing.toml");
    let out = run(&[
        os("check").as_os_str(),
        os("--config").as_os_str(),
        missing.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.toml does not exist"), "{err}");
    assert!(out.stdout.is_empty());
    // A command line is checked as the init reads /proc/cmdline: raw bytes, of which only
    // bootlace.* values must be UTF-8 (the error names the key); others pass untouched.
    let bad = std::ffi::OsStr::from_bytes(b"FOO=\xff bootlace.log=\xff");
    let out = run(&[os("check").as_os_str(), os("--cmdline").as_os_str(), bad]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bootlace.log=") && err.contains("is not UTF-8"),
        "{err}"
    );
    assert!(!err.contains("FOO"), "{err}");
    let fine = std::ffi::OsStr::from_bytes(b"FOO=\xff init=/bin/\xfe");
    let out = run(&[os("check").as_os_str(), os("--cmdline").as_os_str(), fine]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A non-UTF-8 option name is a usage error naming it, not a panic.
    let out = run(&[
        os("check").as_os_str(),
        std::ffi::OsStr::from_bytes(b"--\xff"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not UTF-8"));
    // Unknown options are usage errors.
    let out = run(&[
        os("check").as_os_str(),
        os("--bogus").as_os_str(),
        os("x").as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    // The whole configuration is validated: a vsock source needs a host.
    let cfg = dir.path().join("init.toml");
    std::fs::write(&cfg, "version = 1\n[bootstrap]\nsources = [\"vsock\"]\n").expect("write");
    let check = |cmdline: &str| {
        run(&[
            os("check").as_os_str(),
            os("--config").as_os_str(),
            cfg.as_os_str(),
            os("--cmdline").as_os_str(),
            os(cmdline).as_os_str(),
        ])
    };
    let out = check("");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("the vsock source needs a host"));
    // With a host and nothing baked to trust a bundle by: valid (a digest may come at boot,
    // out of band), with a warning.
    let out = check("bootlace.host=vsock:2:1024");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("warning: the vsock source has nothing to trust a bundle by"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = format!("sha256:{}", "ab".repeat(32));
    let out = check(&format!(
        "bootlace.host=vsock:2:1024 bootlace.digest={digest}"
    ));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
