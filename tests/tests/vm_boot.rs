//! VM tests of the foundation: real QEMU guests booting the Debian kernel with bootlace-init as
//! PID 1 from a baked initramfs.

use bootlace_contract::config::{
    Command, EnvName, ExecString, HandoffMode, InitConfig, ModuleName,
};
use bootlace_tests::{artifact, bake, boot, busybox_rootfs, probe_value, scratch, tail};
use bootlace_vm::End;

fn command(words: &[&str]) -> Command {
    Command::try_from(words.iter().map(|w| (*w).to_owned()).collect::<Vec<_>>()).expect("command")
}

fn assert_no_kernel_panic(o: &bootlace_vm::Outcome) {
    for bad in ["Attempted to kill init", "Kernel panic"] {
        assert!(
            !o.console.contains(bad),
            "console shows {bad:?}:\n{}",
            tail(o, 30)
        );
    }
}

/// (a) supervise mode: the app's exit status reaches the harness, modules named in the config
/// are loaded with their dependencies, and the VM powers off cleanly.
#[test]
fn supervise_reports_the_app_exit_status() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let mut config = InitConfig::default();
    config.handoff.mode = HandoffMode::Supervise;
    // Exit 7 only if virtio_blk (and so its dependencies) is loaded and the app started with
    // an empty signal mask; leave an orphan behind that must go at SIGTERM.
    config.handoff.command = command(&[
        "/bin/sh",
        "-c",
        "(sleep 600 &); grep SigBlk /proc/self/status; \
         grep -q '^SigBlk:.0000000000000000$' /proc/self/status || exit 2; \
         grep -q '^virtio_blk ' /proc/modules && grep -q '^virtio_ring ' /proc/modules && exit 7; \
         cat /proc/modules; exit 1",
    ]);
    config.modules = vec![ModuleName::try_from("virtio-blk".to_owned()).expect("name")];
    let img = dir.path().join("initrd.img");
    bake(&rootfs, config, &img).expect("bake");

    let o = boot("supervise_exit_7", &img, &[]).expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_eq!(o.exit_status, Some(7), "{}", tail(&o, 30));
    assert_eq!(o.exit_code(), 7);
    assert_no_kernel_panic(&o);
    let loaded: Vec<&str> = o.lines_with("bootlace: loaded").collect();
    assert!(
        loaded
            .iter()
            .any(|l| l.ends_with("loaded 3 modules: virtio_ring virtio virtio_blk")),
        "{loaded:?}"
    );
    assert!(o
        .console
        .contains("STATUS=app /bin/sh exited with status 7"));
    // The orphan ended at the SIGTERM that follows the app's exit, not at the SIGKILL after
    // the grace period.
    assert_eq!(o.lines_with("grace period").count(), 0, "{}", tail(&o, 30));
}

/// (b) exec mode hands PID 1 to the real init with an empty signal mask, no ignored signals,
/// only fds 0-2 and only the intended environment.
#[test]
fn exec_hands_a_clean_pid1_to_the_real_init() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    std::fs::copy(
        artifact("bootlace-probe").expect("probe"),
        rootfs.join("sbin/probe"),
    )
    .expect("copy probe");
    let mut config = InitConfig::default();
    config.handoff.command = command(&["/sbin/probe", "first arg"]);
    config.handoff.env.insert(
        EnvName::try_from("APP_MODE".to_owned()).expect("name"),
        ExecString::try_from("test run".to_owned()).expect("value"),
    );
    let img = dir.path().join("initrd.img");
    bake(&rootfs, config, &img).expect("bake");

    let o = boot("exec_probe", &img, &["bootlace.log=debug"]).expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_no_kernel_panic(&o);
    let probe =
        |k: &str| probe_value(&o, k).unwrap_or_else(|| panic!("no PROBE {k}:\n{}", tail(&o, 30)));
    assert_eq!(probe("pid"), "1");
    assert_eq!(probe("argv"), "/sbin/probe|first arg");
    assert_eq!(probe("sigblk"), "0000000000000000");
    assert_eq!(probe("sigign"), "0000000000000000");
    assert_eq!(probe("fds"), "0,1,2");
    assert_eq!(
        probe("env"),
        "APP_MODE=test run|HOME=/|PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|TERM=linux"
    );
    assert_eq!(
        o.exit_status, None,
        "bootlace must not report a status after exec"
    );
    assert!(o
        .console
        .contains("bootlace: hand-off: exec /sbin/probe first arg"));
}

/// (c) a bad `bootlace.*` key is a clear console error and a non-zero reported status under
/// the default policy — never a kernel panic. (d) an exec hand-off to a missing program is
/// reported as 127 and the VM powers off cleanly.
#[test]
fn bad_input_is_reported_then_powered_off() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    let img = dir.path().join("initrd.img");
    bake(&rootfs, InitConfig::default(), &img).expect("bake");

    let o = boot("bad_key", &img, &["bootlace.bogus=1"]).expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_no_kernel_panic(&o);
    assert!(
        o.console.contains(
            "bootlace: error: config: unknown kernel command line key \"bootlace.bogus\""
        ),
        "{}",
        tail(&o, 30)
    );
    assert_eq!(o.exit_status, Some(78), "{}", tail(&o, 30));

    let o = boot("exec_missing", &img, &["bootlace.exec=/sbin/nonexistent"]).expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_no_kernel_panic(&o);
    assert!(
        o.console
            .contains("bootlace: error: hand-off: cannot execute /sbin/nonexistent: No such file or directory"),
        "{}",
        tail(&o, 30)
    );
    assert_eq!(o.exit_status, Some(127));
}

/// PID-1 duties in supervise mode: 1000 orphaned grandchildren are all reaped (no zombie left
/// while the app still runs), and SIGTERM to PID 1 is forwarded to the app, whose exit status
/// is the one reported.
#[test]
fn supervise_reaps_orphans_and_forwards_sigterm() {
    let dir = scratch().expect("scratch");
    let rootfs = dir.path().join("rootfs");
    busybox_rootfs(&rootfs).expect("rootfs");
    std::fs::write(
        rootfs.join("app.sh"),
        r#"
i=0
while [ $i -lt 1000 ]; do (true &) ; i=$((i+1)); done
sleep 1
z=0
for s in /proc/[0-9]*/stat; do
  case "$(cut -d' ' -f3 "$s" 2>/dev/null)" in Z) z=$((z+1));; esac
done
echo "ZOMBIES=$z"
trap 'echo "APP got TERM"; exit 5' TERM
kill -TERM 1
sleep 30 &
wait
echo "APP was not signalled"
exit 1
"#,
    )
    .expect("app");
    let config = InitConfig {
        handoff: bootlace_contract::config::Handoff {
            mode: HandoffMode::Supervise,
            command: command(&["/bin/sh", "/app.sh"]),
            shutdown_grace_ms: 3000,
            ..Default::default()
        },
        ..InitConfig::default()
    };
    let img = dir.path().join("initrd.img");
    bake(&rootfs, config, &img).expect("bake");
    let o = boot("supervise_orphans_sigterm", &img, &[]).expect("boot");
    assert_eq!(o.end, End::PoweredOff, "{}", tail(&o, 30));
    assert_no_kernel_panic(&o);
    assert_eq!(
        o.lines_with("ZOMBIES=").collect::<Vec<_>>(),
        ["ZOMBIES=0"],
        "{}",
        tail(&o, 30)
    );
    assert!(
        o.console
            .contains("bootlace: forwarding SIGTERM to app pid"),
        "{}",
        tail(&o, 30)
    );
    assert!(o.console.contains("APP got TERM"), "{}", tail(&o, 30));
    assert_eq!(o.exit_status, Some(5), "{}", tail(&o, 30));
}
