//! VM tests for the PID-1, hand-off, cleanup and secrets rows of docs/test-matrix.md, grouped
//! so that one bake serves several boots and one boot checks several things. Every case checks
//! the error (console, and host when there is one), that nothing outside the target changed,
//! and that nothing was half-applied or left behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootlace_agent::host::{hybrid_path, BundleSource, Event, Faults, GuestEvent, Host};
use bootlace_contract::config::{
    Command as Argv, FailurePolicy, HandoffMode, HostAddress, InitConfig, Sha256Digest, Source,
};
use bootlace_contract::protocol::Kind;
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{
    bake, boot_with, busybox_rootfs, probe_rootfs, probe_value, scratch, tail, test_disk,
    tree_snapshot, workspace, TestDisk,
};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{Disk, End, Outcome, Share};

fn argv(words: &[&str]) -> Argv {
    Argv::try_from(words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>()).expect("argv")
}

fn probe(o: &Outcome, key: &str) -> String {
    probe_value(o, key).unwrap_or_else(|| panic!("no PROBE {key}:\n{}", tail(o, 40)))
}

/// A clean end: powered off by the init with exactly `status`, never a kernel panic.
fn assert_clean_power_off(o: &Outcome, status: u8, what: &str) {
    assert_eq!(o.end, End::PoweredOff, "{what}:\n{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(status), "{what}:\n{}", tail(o, 40));
    assert_eq!(o.exit_code(), status, "{what}");
    for bad in ["Attempted to kill init", "Kernel panic", "panicked"] {
        assert!(
            !o.console.contains(bad),
            "{what}: {bad:?}:\n{}",
            tail(o, 40)
        );
    }
}

/// Exit code, signal, and exec failures of the supervised app: the exact status on the
/// power-off line, a clean power-off. One bake, the command chosen on the kernel command line.
#[test]
fn supervised_app_statuses_are_exact_and_power_off_is_clean() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    std::fs::write(rootfs.join("not-executable"), "#!/bin/sh\nexit 0\n").expect("write");
    let mut cfg = InitConfig::default();
    cfg.handoff.mode = HandoffMode::Supervise;
    cfg.handoff.command = argv(&["/bin/sh", "-c", "exit 0"]);
    let img = dir.path().join("initrd.img");
    bake(&rootfs, cfg, &img).expect("bake");
    let cases: &[(&str, &str, u8, &str)] = &[
        ("exit_0", "", 0, "STATUS=app /bin/sh exited with status 0"),
        (
            "sigkill",
            "bootlace.exec=\"/bin/sh -c 'kill -KILL $$'\"",
            137,
            "STATUS=app /bin/sh was killed by signal 9 (SIGKILL)",
        ),
        (
            "not_found",
            "bootlace.exec=/nonexistent/app",
            127,
            "STATUS=cannot execute /nonexistent/app: No such file or directory",
        ),
        (
            "not_executable",
            "bootlace.exec=/not-executable",
            126,
            "STATUS=cannot execute /not-executable: Permission denied",
        ),
    ];
    for (name, arg, status, line) in cases {
        let append: Vec<&str> = if arg.is_empty() { vec![] } else { vec![*arg] };
        let o = boot_with(&format!("matrix_status_{name}"), &img, &append, |_| {}).expect("boot");
        assert_clean_power_off(&o, *status, name);
        let off: Vec<&str> = o.lines_with("bootlace: power-off EXIT_STATUS=").collect();
        assert_eq!(off.len(), 1, "{name}: {off:?}");
        assert!(
            off[0].contains(&format!("EXIT_STATUS={status} {line}")),
            "{name}: {off:?}"
        );
    }
}

/// Sends `sendkey ctrl-alt-delete` on the QEMU monitor at `monitor` once `marker` is on the
/// console log `log`.
fn ctrl_alt_del_when(
    log: PathBuf,
    monitor: PathBuf,
    marker: &'static str,
) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(150);
        while Instant::now() < deadline {
            let seen = std::fs::read_to_string(&log)
                .map(|s| s.contains(marker))
                .unwrap_or(false);
            if seen {
                let Ok(mut m) = UnixStream::connect(&monitor) else {
                    return false;
                };
                let _ = m.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = m.write_all(b"sendkey ctrl-alt-delete\n");
                let mut buf = [0u8; 4096];
                let _ = m.read(&mut buf);
                std::thread::sleep(Duration::from_millis(500));
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    })
}

/// SIGPWR and SIGINT from ctrl-alt-del to PID 1 (SIGTERM is in vm_boot.rs): forwarded to the
/// app, a grace period, SIGKILL to what is left when it runs out, sync, power off.
#[test]
fn sigpwr_and_ctrl_alt_del_shut_down_gracefully() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    std::fs::write(
        rootfs.join("app.sh"),
        r#"
trap 'echo "APP got TERM; ignoring it"' TERM
trap 'echo "APP got INT"; exit 6' INT
(sleep 600 &)
echo "APP ready $1"
if [ "$1" = pwr ]; then kill -PWR 1; fi
i=0
while [ $i -lt 120 ]; do sleep 1; i=$((i+1)); done
echo "APP was never stopped"
exit 1
"#,
    )
    .expect("app");
    let mut cfg = InitConfig::default();
    cfg.handoff.mode = HandoffMode::Supervise;
    cfg.handoff.command = argv(&["/bin/sh", "/app.sh", "pwr"]);
    cfg.handoff.shutdown_grace_ms = 2000;
    let img = dir.path().join("initrd.img");
    bake(&rootfs, cfg, &img).expect("bake");

    // SIGPWR: forwarded as SIGTERM, which the app ignores; SIGKILL after 2 s of grace.
    let o = boot_with("matrix_sigpwr", &img, &[], |_| {}).expect("boot");
    assert_clean_power_off(&o, 137, "sigpwr");
    for want in [
        "bootlace: shutdown requested by SIGPWR: grace period 2000 ms",
        "bootlace: forwarding SIGTERM to app pid",
        "APP got TERM; ignoring it",
        "bootlace: warning: grace period of 2000 ms over: killing every process left",
        "STATUS=app /bin/sh was killed by signal 9 (SIGKILL)",
    ] {
        assert!(o.console.contains(want), "no {want:?}:\n{}", tail(&o, 40));
    }
    assert!(!o.console.contains("APP was never stopped"));

    // ctrl-alt-del: the init turned it into SIGINT to PID 1 at boot; forwarded to the app,
    // which exits 6; its orphan goes at the SIGTERM that follows.
    let logs = workspace().join("target/vm-logs");
    let log = bootlace_vm::console_log_path(&logs, "matrix_ctrl_alt_del");
    let _ = std::fs::remove_file(&log);
    let monitor = dir.path().join("monitor.sock");
    let sender = ctrl_alt_del_when(log, monitor.clone(), "APP ready cad");
    let o = boot_with(
        "matrix_ctrl_alt_del",
        &img,
        &["bootlace.exec=\"/bin/sh /app.sh cad\""],
        |spec| {
            spec.extra_args.extend([
                "-monitor".to_owned(),
                format!("unix:{},server=on,wait=off", monitor.display()),
            ]);
        },
    )
    .expect("boot");
    assert!(sender.join().expect("sender"), "ctrl-alt-del was not sent");
    assert_clean_power_off(&o, 6, "ctrl-alt-del");
    for want in [
        "bootlace: forwarding SIGINT to app pid",
        "bootlace: shutdown requested by SIGINT: grace period 2000 ms",
        "APP got INT",
        "STATUS=app /bin/sh exited with status 6",
    ] {
        assert!(o.console.contains(want), "no {want:?}:\n{}", tail(&o, 40));
    }
    assert_eq!(
        o.lines_with("grace period of").count(),
        0,
        "{}",
        tail(&o, 30)
    );
}

const CANARY_MANIFEST: &str = r#"
version = 1
hostname = "canary-host"
env = { APP_MODE = "from-bundle" }

[[files]]
path = "/etc/app.conf"
source = "files/app.conf"

[[run]]
name = "uses-the-secret"
command = ["/bin/sh", "-c", "test -n \"$TOKEN\" && echo token-was-set"]
env = { TOKEN = "CANARY-7f3a9c" }
"#;

/// Finds the canary (built at run time, so this script does not hold it) in every regular
/// file of the root filesystem, /run, /dev/shm and /tmp, and in the environment of every
/// process.
const CANARY_PROBE: &str = r#"
c=CANARY; c="$c-7f3a9c"
files=$(for d in / /run /dev/shm /tmp; do find "$d" -xdev -type f; done | sort -u | xargs grep -l "$c" 2>/dev/null | tr '\n' ' ')
echo "PROBE files_searched=$(for d in / /run /dev/shm /tmp; do find "$d" -xdev -type f; done | sort -u | wc -l)"
echo "PROBE canary_files=$(echo $files)"
echo "PROBE canary_environ=$(grep -l "$c" /proc/[0-9]*/environ 2>/dev/null | tr '\n' ' ')"
echo "PROBE appconf=$(cat /etc/app.conf)"
echo "PROBE tmpfs_mounts=$(grep -c ' /.bootstrap' /proc/self/mountinfo)"
"#;

/// Exec hand-off after a vsock bootstrap from a host that drops and duplicates acks: the real
/// init gets an empty signal mask, default dispositions, fds 0-2, the exact environment, no
/// /.bootstrap (directory or mount, the vsock tmpfs included); a canary secret of the bundle
/// is nowhere after the hand-off — not on disk, not in any /proc/*/environ, not in what the
/// host heard.
#[test]
fn exec_handoff_after_vsock_is_clean_and_leaks_no_secret() {
    let dir = scratch().expect("scratch");
    let b = dir.path().join("bundle");
    std::fs::create_dir_all(b.join("files")).expect("mkdir");
    std::fs::write(b.join("bootlace.toml"), CANARY_MANIFEST).expect("manifest");
    std::fs::write(b.join("files/app.conf"), "plain config").expect("file");
    std::fs::write(b.join("files/secret.key"), "CANARY-7f3a9c").expect("secret");
    let tarball = dir.path().join("bundle.tar.zst");
    let summary = bundle::build(&b, BundleFormat::TarZst, "BOOTLACE", 0, &tarball).expect("bundle");
    let digest = summary.sha256.expect("digest");

    let rootfs = dir.path().join("rootfs");
    probe_rootfs(&rootfs, Some(CANARY_PROBE)).expect("rootfs");
    let mut cfg = InitConfig::default();
    cfg.handoff.command = argv(&["/sbin/probe"]);
    cfg.bootstrap.sources = vec![Source::Vsock];
    cfg.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    cfg.host.digest = Some(Sha256Digest::try_from(format!("sha256:{digest}")).expect("digest"));
    cfg.host.connect_timeout_ms = 5000;
    cfg.host.io_timeout_ms = 1000;
    let img = dir.path().join("initrd.img");
    bake(&rootfs, cfg, &img).expect("bake");

    let vdir = dir.path().join("v");
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(
        Host::new(
            Some(BundleSource::from_bytes(
                std::fs::read(&tarball).expect("read"),
            )),
            move |e| sink.lock().expect("lock").push(e),
        )
        .with_faults(Faults {
            duplicate_acks: true,
            drop_acks: 1,
            ..Faults::default()
        }),
    );
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))
        .expect("listen");
    let o = boot_with("matrix_exec_vsock_canary", &img, &[], |spec| {
        spec.vsock = Some(VsockSpec::new(vdir.clone()));
        spec.timeout = Duration::from_secs(120);
    })
    .expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert!(!o.console.contains("Kernel panic"), "{}", tail(&o, 40));
    // Hand-off hygiene.
    assert_eq!(probe(&o, "pid"), "1");
    assert_eq!(probe(&o, "argv"), "/sbin/probe");
    assert_eq!(probe(&o, "sigblk"), "0000000000000000");
    assert_eq!(probe(&o, "sigign"), "0000000000000000");
    assert_eq!(probe(&o, "fds"), "0,1,2", "the vsock connection leaked");
    assert_eq!(
        probe(&o, "env"),
        "APP_MODE=from-bundle|HOME=/|PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|TERM=linux"
    );
    assert_eq!(probe(&o, "bootstrap_dir"), "absent");
    assert_eq!(
        probe(&o, "tmpfs_mounts"),
        "0",
        "the vsock tmpfs is still mounted"
    );
    assert!(!probe(&o, "mounts").contains("bootstrap"));
    // The manifest ran with its secret...
    assert_eq!(probe(&o, "hostname"), "canary-host");
    assert_eq!(probe(&o, "appconf"), "plain config");
    assert!(o.console.contains("token-was-set"), "{}", tail(&o, 40));
    // ...which is now nowhere.
    // busybox, the probe, the init, its config, /etc, /probe.sh, what the manifest wrote.
    assert!(probe(&o, "files_searched").parse::<u32>().expect("count") >= 8);
    assert_eq!(probe(&o, "canary_files"), "", "the canary is on disk");
    assert_eq!(
        probe(&o, "canary_environ"),
        "",
        "the canary is in an environment"
    );
    let heard = format!("{:?}", events.lock().expect("lock"));
    assert!(
        !heard.contains("CANARY-7f3a9c"),
        "the host heard the canary"
    );
    // The lost ack was resent and the duplicates dropped: every step reported once.
    let steps: Vec<String> = events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) if f.kind == Kind::Step => f.get("STEP").map(str::to_owned),
            _ => None,
        })
        .collect();
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(steps, unique, "a step was reported twice");
    assert!(steps.iter().any(|s| s == "cleanup_done"), "{steps:?}");
    let readies = events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(&e.event, Event::Report(f) if f.kind == Kind::Ready))
        .count();
    assert_eq!(readies, 1);
}

/// A bootstrap image for the cleanup and disk cases: the probe as real init, /probe.sh, 9p
/// and disk sources, the `continue` policy so that the probe shows what was left.
fn probe_image(dir: &Path, script: &str, sources: &[Source], wait_ms: u64) -> PathBuf {
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, Some(script)).expect("rootfs");
    let mut cfg = InitConfig::default();
    cfg.handoff.command = argv(&["/sbin/probe"]);
    cfg.bootstrap.sources = sources.to_vec();
    cfg.bootstrap.wait_ms = wait_ms;
    cfg.on_failure = FailurePolicy::Continue;
    let img = dir.join("initrd.img");
    bake(&rootfs, cfg, &img).expect("bake");
    img
}

/// A busy /.bootstrap (a manifest command left a process inside it) is reported and left
/// mounted — never lazily detached, never deleted; the 9p share is not modified.
#[test]
fn a_busy_bootstrap_is_reported_never_deleted_and_the_share_is_untouched() {
    let dir = scratch().expect("scratch");
    let img = probe_image(
        dir.path(),
        "echo \"PROBE bundle_left=$(ls /.bootstrap | tr '\\n' ' ')\"\n\
         echo \"PROBE bootstrap_mounts=$(grep -c ' /.bootstrap ' /proc/self/mountinfo)\"\n",
        &[Source::NineP],
        3000,
    );
    let share = dir.path().join("share");
    std::fs::create_dir_all(share.join("files")).expect("mkdir");
    std::fs::write(
        share.join("bootlace.toml"),
        "version = 1\n[[run]]\nname = \"squat\"\ncommand = [\"/bin/sh\", \"-c\", \"cd /.bootstrap && (sleep 600 &)\"]\n",
    )
    .expect("manifest");
    std::fs::write(share.join("files/data"), "bundle data").expect("write");
    let before = tree_snapshot(&share).expect("snapshot");
    let sh = share.clone();
    let o = boot_with("matrix_busy_cleanup", &img, &[], move |spec| {
        spec.shares.push(Share {
            dir: sh,
            tag: "bootlace".into(),
            read_only: true,
        })
    })
    .expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    let err: Vec<&str> = o
        .lines_with("bootlace: error: bootstrap: cleanup of /.bootstrap")
        .collect();
    assert_eq!(err.len(), 1, "{}", tail(&o, 40));
    assert!(
        err[0].contains("unmount /.bootstrap: Resource busy"),
        "{}",
        err[0]
    );
    // Still mounted, with everything in it: nothing was deleted.
    assert_eq!(probe(&o, "bootstrap_dir"), "present");
    assert_eq!(probe(&o, "bootstrap_mounts"), "1");
    assert_eq!(probe(&o, "bundle_left"), "bootlace.toml files ");
    assert_eq!(
        tree_snapshot(&share).expect("snapshot"),
        before,
        "the share changed"
    );
}

/// Bootstrap disks that are there but not the one: the error lists every device probed and
/// what it held (a wrong label, no filesystem).
#[test]
fn mislabelled_and_blank_bootstrap_disks_are_listed() {
    let dir = scratch().expect("scratch");
    let img = probe_image(dir.path(), "", &[Source::Disk], 1000);
    let wrong = dir.path().join("wrong.img");
    test_disk(&wrong, 8, TestDisk::Ext4("NOTBOOT")).expect("disk");
    let blank = dir.path().join("blank.img");
    test_disk(&blank, 1, TestDisk::Blank).expect("disk");
    let o = boot_with(
        "matrix_mislabelled",
        &img,
        &["bootlace.failure=poweroff"],
        |spec| {
            for path in [wrong, blank] {
                spec.disks.push(Disk {
                    path,
                    read_only: true,
                });
            }
        },
    )
    .expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert_eq!(o.exit_status, Some(71), "{}", tail(&o, 40));
    let err: Vec<&str> = o
        .lines_with("bootlace: error: bootstrap: not found; probed:")
        .collect();
    assert_eq!(err.len(), 1, "{}", tail(&o, 40));
    for want in [
        "disk (waited 1000 ms for label \"BOOTLACE\"; saw",
        "/dev/vda (ext4, label \"NOTBOOT\")",
        "/dev/vdb (no known filesystem)",
    ] {
        assert!(err[0].contains(want), "{want}: {}", err[0]);
    }
    assert!(
        probe_value(&o, "pid").is_none(),
        "handed off after a failure"
    );
}

/// A full data disk: the manifest mounts it and writes a file over one that is there; the
/// write fails with ENOSPC, the old file stays whole and no temporary file is left.
#[test]
fn a_full_data_disk_keeps_the_old_file() {
    let dir = scratch().expect("scratch");
    let img = probe_image(
        dir.path(),
        "echo \"PROBE keep=$(head -c 64 /data/keep)\"\necho \"PROBE data=$(ls -a /data | tr '\\n' ' ')\"\n",
        &[Source::NineP, Source::Disk],
        3000,
    );
    let data = dir.path().join("data.img");
    test_disk(&data, 16, TestDisk::Ext4Full("DATA")).expect("full disk");
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).expect("mkdir");
    let big = "x".repeat(900 * 1024);
    std::fs::write(
        share.join("bootlace.toml"),
        format!(
            "version = 1\n[[mounts]]\ntype = \"disk\"\npath = \"/data\"\nlabel = \"DATA\"\n\
             [[files]]\npath = \"/data/keep\"\ncontent = \"{big}\"\n"
        ),
    )
    .expect("manifest");
    let o = boot_with("matrix_disk_full", &img, &[], move |spec| {
        spec.shares.push(Share {
            dir: share,
            tag: "bootlace".into(),
            read_only: true,
        });
        spec.disks.push(Disk {
            path: data,
            read_only: false,
        });
    })
    .expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 40));
    assert!(
        o.console.contains(
            "bootlace: error: bootstrap: manifest: files: /data/keep: write: No space left on device"
        ),
        "{}",
        tail(&o, 40)
    );
    assert_eq!(probe(&o, "keep"), "old content");
    assert_eq!(probe(&o, "data"), ". .. filler keep lost+found ");
    assert_eq!(probe(&o, "bootstrap_dir"), "absent");
}
