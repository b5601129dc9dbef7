//! `bootlace-vm run` refusals that need no VM: found before QEMU starts (exit 125, bad input),
//! and the guest memory an image's metadata asks for. A stand-in QEMU script records the
//! arguments it was given and exits at once.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A kernel and an initramfs (any bytes: the stand-in QEMU boots nothing) and a stand-in QEMU
/// that writes its arguments, one a line, to `qemu.args`.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Fixture {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("vmlinuz"), b"kernel").expect("write");
        std::fs::write(dir.path().join("app.img"), b"initramfs").expect("write");
        let qemu = dir.path().join("qemu");
        std::fs::write(
            &qemu,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n",
                dir.path().join("qemu.args").display()
            ),
        )
        .expect("write");
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_bootlace-vm"))
            .arg("run")
            .arg("--kernel")
            .arg(self.path("vmlinuz"))
            .arg("--qemu")
            .arg(self.path("qemu"))
            .args(["--no-echo", "--timeout", "20"])
            .args(args)
            .output()
            .expect("run bootlace-vm")
    }

    /// The arguments the stand-in QEMU got, if it ran.
    fn qemu_args(&self) -> Option<Vec<String>> {
        std::fs::read_to_string(self.path("qemu.args"))
            .ok()
            .map(|t| t.lines().map(str::to_owned).collect())
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Hand-written schema-2 metadata for `file` in `dir` (its true sha256 and size), recording
/// `min_memory_mib`.
fn write_meta(dir: &Path, name: &str, file: &str, min_memory_mib: u64) {
    let bytes = std::fs::read(dir.join(file)).expect("read image");
    let text = format!(
        r#"{{
  "schema": 2,
  "name": "{name}",
  "version": "1.0",
  "format": "initramfs",
  "file": "{file}",
  "sha256": "{}",
  "size": {},
  "fstype": null,
  "label": null,
  "stage1": false,
  "read_only": false,
  "writable": [],
  "inputs": [],
  "init": {{ "path": "/sbin/bootlace-init", "version": "0", "sha256": "{}" }},
  "kernel_release": null,
  "modules": [],
  "source_date_epoch": 0,
  "built": "1970-01-01T00:00:00Z",
  "tool_versions": {{}},
  "unpacked_size": 1000,
  "min_memory_mib": {min_memory_mib}
}}
"#,
        bootlace_contract::digest::of_bytes(&bytes).hex(),
        bytes.len(),
        "00".repeat(32),
    );
    std::fs::write(dir.join(format!("{file}.meta.json")), text).expect("write meta");
}

#[test]
fn an_over_long_kernel_command_line_is_refused_before_qemu_starts() {
    let f = Fixture::new();
    let img = f.path("app.img");
    let img = img.to_str().expect("utf-8");
    // 2010 bytes of --append fit with bootlace-vm's own `console=ttyS0 panic=-1 quiet` (2039
    // bytes); a second --append of 8 bytes makes the line 2048 bytes, 2049 with its NUL.
    let long = format!("bootlace.x={}", "a".repeat(1999));
    let started = Instant::now();
    let o = f.run(&["--initrd", img, "--append", &long, "--append", "more=yes"]);
    let took = started.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(
            "bootlace-vm: cannot run the VM (bad input): the kernel command line is 2048 bytes;"
        ),
        "{err}"
    );
    assert!(
        err.contains("over the x86-64 kernel's 2048-byte limit (COMMAND_LINE_SIZE)"),
        "{err}"
    );
    assert_eq!(f.qemu_args(), None, "QEMU was started");
    assert!(took < Duration::from_secs(5), "{took:?}");

    // The same with --json: the report says why.
    let o = f.run(&[
        "--initrd", img, "--append", &long, "--append", "more=yes", "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["reason"], "bad-input", "{v}");
    assert_eq!(v["exit_code"], 125, "{v}");

    // Without the second --append it fits, and QEMU gets the whole line.
    let o = f.run(&["--initrd", img, "--append", &long]);
    assert_ne!(o.status.code(), Some(125), "{}", stderr(&o));
    let args = f.qemu_args().expect("QEMU started");
    let at = args.iter().position(|a| a == "-append").expect("-append");
    assert_eq!(args[at + 1].len(), 2039);
}

#[test]
fn the_memory_follows_the_least_memory_the_image_records() {
    let f = Fixture::new();
    write_meta(f.dir.path(), "app", "app.img", 600);
    let img = f.path("app.img");
    let img = img.to_str().expect("utf-8");
    let memory = |f: &Fixture| {
        let args = f.qemu_args().expect("QEMU started");
        let at = args.iter().position(|a| a == "-m").expect("-m");
        args[at + 1].clone()
    };

    // --memory below the need: refused before QEMU starts, naming both.
    let o = f.run(&["--initrd", img, "--memory", "512"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains(
            "cannot run the VM (bad input): app@1.0 needs at least 600 MiB of guest memory \
             (min_memory_mib in its metadata); --memory 512 is less"
        ),
        "{err}"
    );
    assert_eq!(f.qemu_args(), None, "QEMU was started");

    // No --memory: the default is raised, with a warning.
    let o = f.run(&["--initrd", img]);
    let err = stderr(&o);
    assert!(
        err.contains(
            "bootlace-vm: warning: raising the guest memory from the default 256 MiB to 600 \
             MiB: app@1.0 needs that much"
        ),
        "{err}"
    );
    assert_eq!(memory(&f), "600");

    // Enough given: as given, no warning.
    let o = f.run(&["--initrd", img, "--memory", "1024"]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert_eq!(memory(&f), "1024");

    // By name from --images: the same rules.
    let o = f.run(&[
        "--images",
        f.dir.path().to_str().expect("utf-8"),
        "--image",
        "app",
        "--memory",
        "300",
    ]);
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("needs at least 600 MiB"),
        "{}",
        stderr(&o)
    );
    let o = f.run(&[
        "--images",
        f.dir.path().to_str().expect("utf-8"),
        "--image",
        "app",
    ]);
    assert!(stderr(&o).contains("warning: raising"), "{}", stderr(&o));
    assert_eq!(memory(&f), "600");

    // No metadata beside the initramfs: the default, as before.
    std::fs::remove_file(f.path("app.img.meta.json")).expect("rm");
    let o = f.run(&["--initrd", img]);
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
    assert_eq!(memory(&f), "256");
}

/// Hand-written schema-4 metadata of a bootable disk `disk.img` (vmdk) in `dir`.
fn write_disk_meta(dir: &Path) {
    std::fs::write(dir.join("disk.img"), b"not really a disk").expect("write");
    let bytes = std::fs::read(dir.join("disk.img")).expect("read");
    let text = format!(
        r#"{{
  "schema": 4, "name": "d", "version": "1", "format": "disk", "file": "disk.img",
  "sha256": "{}", "size": {}, "fstype": "erofs", "label": "bootlace-root", "stage1": false,
  "read_only": true, "writable": [], "inputs": [],
  "init": {{ "path": "/sbin/bootlace-init", "version": "0", "sha256": "{}" }},
  "kernel_release": "6.1.0-57-amd64", "modules": [], "source_date_epoch": 0,
  "built": "1970-01-01T00:00:00Z", "tool_versions": {{}}, "unpacked_size": null,
  "min_memory_mib": 120,
  "disk": {{
    "container": "vmdk", "firmware": "uefi", "virtual_size": 73400320,
    "disk_guid": "0d7b6858-e1bd-46a5-bf97-03edfe4dc669", "partitions": [],
    "cmdline": "console=ttyS0 bootlace.root=PARTUUID=6408a301-b806-4160-8726-49683f9cfa5d",
    "kernel": {{ "release": "6.1.0-57-amd64", "sha256": "{z}" }},
    "stub_sha256": "{z}", "stage1_sha256": "{z}"
  }}
}}"#,
        bootlace_contract::digest::of_bytes(&bytes).hex(),
        bytes.len(),
        "00".repeat(32),
        z = "00".repeat(32),
    );
    std::fs::write(dir.join("disk.img.meta.json"), text).expect("write meta");
}

#[test]
fn a_bootable_disk_boots_through_firmware_and_takes_no_kernel_or_parameters() {
    let f = Fixture::new();
    write_disk_meta(f.dir.path());
    let ovmf = f.path("OVMF.fd");
    std::fs::write(&ovmf, b"firmware").expect("write");
    let run = |args: &[&str], firmware: &Path| {
        Command::new(env!("CARGO_BIN_EXE_bootlace-vm"))
            .arg("run")
            .arg("--images")
            .arg(f.dir.path())
            .args(["--image", "d", "--no-echo", "--timeout", "20", "--qemu"])
            .arg(f.path("qemu"))
            .args(args)
            .env("BOOTLACE_OVMF", firmware)
            .output()
            .expect("run bootlace-vm")
    };
    let o = run(&[], &ovmf);
    assert!(
        stderr(&o).contains("through UEFI firmware"),
        "{}",
        stderr(&o)
    );
    let args = f.qemu_args().expect("QEMU ran").join(" ");
    assert!(
        args.contains(&format!("-bios {}", ovmf.display())),
        "{args}"
    );
    assert!(
        !args.contains("-kernel") && !args.contains("-append"),
        "{args}"
    );
    assert!(args.contains("format=vmdk,readonly=on"), "{args}");
    assert!(
        args.contains("virtio-blk-pci,drive=rootdisk,bootindex=0"),
        "{args}"
    );
    std::fs::remove_file(f.path("qemu.args")).expect("rm");
    // The baked command line cannot be added to, the kernel and stage 1 are the disk's own.
    for (args, says) in [
        (
            &["--append", "bootlace.log=debug"][..],
            "takes no kernel parameter",
        ),
        (
            &["--kernel", "/boot/vmlinuz"][..],
            "--kernel and --stage1 do not apply",
        ),
        (
            &["--stage1", "/tmp/stage1.img"][..],
            "--kernel and --stage1 do not apply",
        ),
    ] {
        let o = run(args, &ovmf);
        assert_eq!(o.status.code(), Some(125), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(f.qemu_args().is_none(), "QEMU started for {args:?}");
    }
    let o = run(&[], &f.path("no-such-firmware.fd"));
    assert_eq!(o.status.code(), Some(125), "{}", stderr(&o));
    assert!(stderr(&o).contains("UEFI firmware"), "{}", stderr(&o));
    assert!(f.qemu_args().is_none());
}
