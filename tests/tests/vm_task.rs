//! VM test of task definitions (`bootlace-vm up`, through its library entry point
//! `bootlace_vm::up::up`): one busybox + probe initramfs baked as `probe@1.0` into an images
//! directory, a task of three guests of it with per-instance hostnames (`node-{n}`), one
//! in-process host agent serving each guest its own composed bundle (trusted by the digest
//! its VMM hands it out of band). Guests 1 and 2 run the probe and exit 0; guest 3's command,
//! replaced by the task (`[instance.3] command`), makes the app exit 3, and the policy `on-failure`, `max = 1` restarts it once and then
//! reports it. Each guest is READY with its hostname; the image file exists once on disk and
//! every guest booted it; the table; the exit code names the failure; the work directory is
//! gone afterwards.

use std::path::Path;

use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Source};
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_tests::{artifact, kernel_modules, probe_rootfs, scratch, test_kernel};
use bootlace_vm::task::Task;
use bootlace_vm::up::{self, UpOptions};

fn bake_image(d: &Path) -> std::path::PathBuf {
    let rootfs = d.join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let images = d.join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.connect_timeout_ms = 5000;
    let mut spec = BakeSpec::new(
        Format::Initramfs,
        images.join("probe-1.0.img"),
        Some(rootfs),
        artifact("bootlace-init").expect("init"),
    );
    spec.config = c;
    spec.modules = Some(kernel_modules(&[]).expect("modules"));
    spec.all_root = true;
    spec.name = Some("probe".to_owned());
    spec.version = "1.0".to_owned();
    bake::bake(&spec, &mut |_| {}).expect("bake");
    images
}

fn bundle(d: &Path, name: &str, command: &str) {
    let dir = d.join("bundles").join(name);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("bootlace.toml"),
        format!(
            "version = 1\n\n[handoff]\nmode = \"supervise\"\ncommand = [\"/bin/sh\", \"-c\", \"{command}\"]\n"
        ),
    )
    .expect("manifest");
}

const TASK: &str = r#"
name = "node"
image = "probe@1.0"
images = "images"
count = 3
bundle = "bundles/ok"
hostname = "node-{n}"
vars = { INDEX = "{n}" }
timeout = 180

[restart]
policy = "on-failure"
max = 1
delay_ms = 100

[instance.3]                  # the task replaces the bundle's command: exit {n} = 3
command = ["/bin/sh", "-c", "/sbin/probe; exit {n}"]
"#;

/// The value of `PROBE key=` in a console log.
fn probe_in(log: &Path, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let prefix = format!("PROBE {key}=");
    text.lines().find_map(|l| {
        l.trim_end_matches('\r')
            .strip_prefix(&prefix)
            .map(str::to_owned)
    })
}

/// Image files (not metadata) under `dir`, recursively.
fn image_files(dir: &Path, size: u64, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            image_files(&p, size, out);
        } else if m.is_file() && m.len() == size {
            out.push(p);
        }
    }
}

#[test]
fn three_guests_of_one_image_one_failing_and_restarted_once() {
    let dir = scratch().expect("scratch");
    let d = dir.path();
    let images = bake_image(d);
    bundle(d, "ok", "/sbin/probe");
    std::fs::write(d.join("node.toml"), TASK).expect("task");
    let task = Task::read(&d.join("node.toml")).expect("task");
    let mut opts = UpOptions::new(test_kernel().expect("kernel").image);
    opts.logs = Some(d.join("logs"));
    opts.work_base = d.join("tmp");
    std::fs::create_dir_all(&opts.work_base).expect("mkdir");
    let r = up::up(&task, &opts).expect("up");
    let table = r.table();
    eprintln!("{table}");

    assert_eq!(r.exit_code, up::EXIT_FAILED, "{table}");
    assert_eq!(r.failed, ["node-3"], "{table}");
    assert_eq!(r.image, "probe@1.0");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    for (i, g) in r.guests.iter().enumerate() {
        let n = i + 1;
        let log = g.console_log.as_deref().expect("console log");
        assert_eq!(g.hostname, format!("node-{n}"));
        assert!(g.ready_s.is_some(), "{} not READY: {table}", g.guest);
        assert_eq!(
            probe_in(log, "hostname").as_deref(),
            Some(g.hostname.as_str()),
            "{}",
            log.display()
        );
        let env = probe_in(log, "env").unwrap_or_default();
        assert!(env.contains(&format!("INDEX={n}")), "{env}");
        let text = std::fs::read_to_string(log).expect("log");
        assert!(
            text.contains("trusted by the out-of-band digest"),
            "{}",
            log.display()
        );
    }
    let (g1, g3) = (&r.guests[0], &r.guests[2]);
    assert_eq!(
        (g1.state, g1.runs, g1.exit_code, g1.exit_status),
        ("exited", 1, Some(0), Some(0))
    );
    assert_eq!(r.guests[1].state, "exited");
    assert_eq!(
        (g3.state, g3.runs, g3.restarts, g3.exit_code),
        ("failed", 2, 1, Some(3)),
        "{table}"
    );
    assert!(
        g3.console_log
            .as_deref()
            .is_some_and(|p| p.ends_with("node-3.2.console.log")),
        "{table}"
    );

    // One image file on disk, the one every guest booted.
    assert_eq!(r.image_file, images.join("probe-1.0.img"));
    let size = std::fs::metadata(&r.image_file).expect("image").len();
    let mut copies = Vec::new();
    image_files(d, size, &mut copies);
    assert_eq!(copies, std::slice::from_ref(&r.image_file));
    // The work directory (sockets) is gone.
    assert_eq!(
        std::fs::read_dir(&opts.work_base).expect("tmp").count(),
        0,
        "work directory left behind"
    );

    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("GUEST   HOSTNAME  STATE   RUNS  READY"),
        "{table}"
    );
    assert!(
        lines[3].starts_with("node-3  node-3    failed  2") && lines[3].ends_with("  3"),
        "{table}"
    );
}

/// `probe@VERSION` in `images`, its root marked with its version (`/etc/image-version`, which
/// the probe script prints).
fn bake_version(d: &Path, images: &Path, version: &str) {
    let rootfs = d.join(format!("rootfs-{version}"));
    probe_rootfs(
        &rootfs,
        Some("echo \"PROBE image_version=$(cat /etc/image-version)\"\n"),
    )
    .expect("rootfs");
    std::fs::write(rootfs.join("etc/image-version"), version).expect("marker");
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.connect_timeout_ms = 5000;
    let mut spec = BakeSpec::new(
        Format::Initramfs,
        images.join(format!("probe-{version}.img")),
        Some(rootfs),
        artifact("bootlace-init").expect("init"),
    );
    spec.config = c;
    spec.modules = Some(kernel_modules(&[]).expect("modules"));
    spec.all_root = true;
    spec.name = Some("probe".to_owned());
    spec.version = version.to_owned();
    bake::bake(&spec, &mut |_| {}).expect("bake");
}

#[test]
fn a_guest_moves_between_versions_by_its_task_and_a_missing_one_falls_back() {
    let dir = scratch().expect("scratch");
    let d = dir.path();
    let images = d.join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    bake_version(d, &images, "1.0");
    bake_version(d, &images, "2.0");
    bundle(d, "ok", "/sbin/probe");
    let mut opts = UpOptions::new(test_kernel().expect("kernel").image);
    opts.logs = Some(d.join("logs"));
    opts.work_base = d.join("tmp");
    std::fs::create_dir_all(&opts.work_base).expect("mkdir");
    let file = d.join("app.toml");
    // The same task, its image changed between runs: 1.0, then 2.0, then a 3.0 that is not
    // there (the default, the highest, boots, with a warning).
    let mut seen = Vec::new();
    for asked in ["1.0", "2.0", "3.0"] {
        std::fs::write(
            &file,
            format!(
                "name = \"app\"\nimage = \"probe@{asked}\"\nimages = \"images\"\ncount = 1\n\
                 bundle = \"bundles/ok\"\ntimeout = 120\n"
            ),
        )
        .expect("task");
        let task = Task::read(&file).expect("task");
        let r = up::up(&task, &opts).expect("up");
        let table = r.table();
        assert_eq!(r.exit_code, 0, "{table}");
        let log = r.guests[0].console_log.clone().expect("log");
        let ran = probe_in(&log, "image_version").unwrap_or_default();
        seen.push((asked, r.image.clone(), ran, r.warnings.clone()));
    }
    assert_eq!(seen[0].1, "probe@1.0");
    assert_eq!(seen[0].2, "1.0");
    assert!(seen[0].3.is_empty(), "{:?}", seen[0].3);
    assert_eq!(seen[1].1, "probe@2.0");
    assert_eq!(seen[1].2, "2.0");
    assert_eq!(
        seen[2].1, "probe@2.0",
        "a missing version falls back to the default"
    );
    assert_eq!(seen[2].2, "2.0");
    assert!(
        seen[2].3.iter().any(|w| w.contains("3.0")),
        "no warning about the missing version: {:?}",
        seen[2].3
    );
}
