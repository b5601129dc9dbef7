//! `bootlace-vm up` without a VM: a stand-in QEMU that prints a guest's power-off line (or
//! sleeps), a stand-in vhost-device-vsock (socat listening on the control socket), an images
//! directory with hand-written metadata. The restart policy, the table, the exit codes, the
//! version fallback, a bad task file, and the teardown on SIGTERM. The real thing, with real
//! guests, is `tests/tests/vm_task.rs`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Fixture {
    dir: tempfile::TempDir,
}

fn script(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

impl Fixture {
    /// `qemu_body`: the stand-in QEMU's shell code after it logged its start; `$guest` is the
    /// guest's number (from its vsock directory `<work>/<n>/vhost.sock`).
    fn new(qemu_body: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        std::fs::write(d.join("vmlinuz"), b"kernel").expect("write");
        std::fs::create_dir_all(d.join("images")).expect("mkdir");
        std::fs::create_dir_all(d.join("tmp")).expect("mkdir");
        std::fs::write(d.join("images/web-1.0.img"), b"initramfs").expect("write");
        write_meta(&d.join("images"), "web", "web-1.0.img");
        script(
            &d.join("qemu"),
            &format!(
                "#!/bin/sh\nguest=$(printf '%s\\n' \"$@\" | sed -n 's|.*/\\([0-9]*\\)/vhost.sock$|\\1|p')\n\
                 echo \"$guest $$\" >> '{}'\n{qemu_body}\n",
                d.join("starts").display()
            ),
        );
        // vhost-device-vsock --guest-cid N --socket CONTROL --uds-path UDS
        script(
            &d.join("vsockd"),
            "#!/bin/sh\nexec socat UNIX-LISTEN:\"$4\",fork /dev/null\n",
        );
        Fixture { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn task(&self, text: &str) -> PathBuf {
        let p = self.path("web.toml");
        std::fs::write(&p, text).expect("task");
        p
    }

    fn command(&self, task: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_bootlace-vm"));
        c.arg("up")
            .arg(task)
            .arg("--kernel")
            .arg(self.path("vmlinuz"))
            .arg("--qemu")
            .arg(self.path("qemu"))
            .args(args)
            .env("BOOTLACE_VHOST_DEVICE_VSOCK", self.path("vsockd"))
            .env("TMPDIR", self.path("tmp"));
        c
    }

    fn up(&self, task: &Path, args: &[&str]) -> Output {
        self.command(task, args)
            .output()
            .expect("run bootlace-vm up")
    }

    /// (guest number, pid) of every QEMU started, in order.
    fn starts(&self) -> Vec<(u32, u32)> {
        std::fs::read_to_string(self.path("starts"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (g, p) = l.split_once(' ')?;
                Some((g.parse().ok()?, p.parse().ok()?))
            })
            .collect()
    }

    /// What is left in the temporary directory (the work directory must be gone).
    fn tmp_left(&self) -> Vec<String> {
        std::fs::read_dir(self.path("tmp"))
            .expect("tmp")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect()
    }
}

fn write_meta(dir: &Path, name: &str, file: &str) {
    let bytes = std::fs::read(dir.join(file)).expect("read image");
    let text = format!(
        r#"{{"schema": 2, "name": "{name}", "version": "1.0", "format": "initramfs", "file": "{file}",
  "sha256": "{}", "size": {}, "fstype": null, "label": null, "stage1": false, "read_only": false,
  "writable": [], "inputs": [],
  "init": {{ "path": "/sbin/bootlace-init", "version": "0", "sha256": "{}" }},
  "kernel_release": null, "modules": [], "source_date_epoch": 0, "built": "1970-01-01T00:00:00Z",
  "tool_versions": {{}}, "unpacked_size": 1000, "min_memory_mib": 120}}"#,
        bootlace_contract::digest::of_bytes(&bytes).hex(),
        bytes.len(),
        "00".repeat(32),
    );
    std::fs::write(dir.join(format!("{file}.meta.json")), text).expect("write meta");
}

/// Guest 3 powers off with status 3, the others with 0.
const THIRD_FAILS: &str = r#"if [ "$guest" = 3 ]; then s=3; else s=0; fi
echo "[ 1.0] bootlace: power-off EXIT_STATUS=$s STATUS=app exited"
echo "reboot: Power down""#;

const TASK: &str = r#"
image = "web@1.0"
images = "images"
count = 3
[restart]
policy = "on-failure"
max = 1
delay_ms = 10
"#;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_failing_guest_is_restarted_once_then_named() {
    let f = Fixture::new(THIRD_FAILS);
    let o = f.up(&f.task(TASK), &[]);
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("bootlace-vm: up: failed: web-3\n"), "{err}");
    assert!(
        err.contains("web-3: exit 3: guest powered off")
            && err.contains("restart 1 of 1 (on-failure)"),
        "{err}"
    );
    let mut starts: Vec<u32> = f.starts().iter().map(|s| s.0).collect();
    starts.sort();
    assert_eq!(starts, [1, 2, 3, 3], "guest 3 restarted once: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "GUEST  HOSTNAME  STATE   RUNS  READY  EXIT",
        "{out}"
    );
    assert_eq!(lines[1], "web-1  web-1     exited  1     -      0", "{out}");
    assert_eq!(lines[3], "web-3  web-3     failed  2     -      3", "{out}");
    assert!(f.tmp_left().is_empty(), "{:?}", f.tmp_left());
}

#[test]
fn a_missing_version_falls_back_to_the_default_with_a_warning() {
    let f = Fixture::new(THIRD_FAILS);
    let task = f.task(
        &TASK
            .replace("web@1.0", "web@2.0")
            .replace("max = 1", "max = 0"),
    );
    let o = f.up(&task, &["--json", "--parallel", "1"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("warning: web@2.0: no such version"), "{err}");
    assert!(
        err.contains("warning: booting the default version web@1.0 instead of 2.0"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON object");
    assert_eq!(v["exit_code"], 1);
    assert_eq!(
        (v["requested"].as_str(), v["image"].as_str()),
        (Some("web@2.0"), Some("web@1.0"))
    );
    assert_eq!(v["failed"], serde_json::json!(["web-3"]));
    assert_eq!(v["guests"][2]["exit_status"], 3);
    assert_eq!(v["guests"][2]["runs"], 1, "max = 0: no restart");
    assert_eq!(v["guests"][0]["state"], "exited");
    let file = v["image_file"].as_str().expect("image_file");
    assert!(file.ends_with("images/web-1.0.img"), "{file}");
    // --parallel 1: one after the other, in order.
    let order: Vec<u32> = f.starts().iter().map(|s| s.0).collect();
    assert_eq!(order, [1, 2, 3]);
}

#[test]
fn a_bad_task_is_refused_naming_the_file_and_the_key() {
    let f = Fixture::new(THIRD_FAILS);
    let task = f.task("image = \"web\"\nimages = \"images\"\ncuont = 3\n");
    let o = f.up(&task, &[]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("web.toml") && err.contains("unknown field `cuont`"),
        "{err}"
    );
    let task = f.task("image = \"nope\"\nimages = \"images\"\n");
    let o = f.up(&task, &[]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(125), "{err}");
    assert!(
        err.contains("no usable image \"nope\"") && err.contains("web@1.0"),
        "{err}"
    );
    assert!(f.starts().is_empty(), "nothing started");
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive: it is gone but for its parent's wait.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what}: not within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_tears_every_guest_down() {
    let f = Fixture::new("exec sleep 600");
    let task = f.task(
        &TASK
            .replace("on-failure", "always")
            .replace("max = 1\n", ""),
    );
    let mut child = f
        .command(&task, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for("three QEMUs", || f.starts().len() == 3, &mut child);
    let qemus: Vec<u32> = f.starts().iter().map(|s| s.1).collect();
    wait_for("running", || qemus.iter().all(|p| alive(*p)), &mut child);
    // The stand-in daemons: socat processes listening in the work directory.
    let work = f.path("tmp");
    let daemons = || -> Vec<u32> {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .map(|c| {
                        text(&c).contains(&*work.to_string_lossy()) && text(&c).starts_with("socat")
                    })
                    .unwrap_or(false)
            })
            .filter(|p| alive(*p))
            .collect()
    };
    assert_eq!(daemons().len(), 3, "one vsock daemon per guest");
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(kill.success());
    let o = child.wait_with_output().expect("wait");
    let (out, err) = (text(&o.stdout), text(&o.stderr));
    assert_eq!(o.status.code(), Some(143), "{err}");
    assert!(err.contains("stopping every guest"), "{err}");
    assert!(err.contains("stopped by signal 15"), "{err}");
    for p in &qemus {
        assert!(!alive(*p), "QEMU {p} outlived up");
    }
    assert!(daemons().is_empty(), "a vsock daemon outlived up");
    assert!(f.tmp_left().is_empty(), "{:?}", f.tmp_left());
    for g in ["web-1", "web-2", "web-3"] {
        let line = out.lines().find(|l| l.starts_with(g)).unwrap_or_default();
        assert!(
            line.contains("stopped") && line.ends_with("- (stopped)"),
            "{out}"
        );
    }
    assert_eq!(f.starts().len(), 3, "nothing restarted after the stop");
}
