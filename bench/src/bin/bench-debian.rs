//! A Debian bookworm root with systemd (`scripts/debian-root.sh`) booted two ways, side by
//! side, `--runs 3` boots each in a 512 MiB TCG guest:
//!
//! - **bootlace**: baked as erofs, booted by name through bootlace's stage-1 initramfs;
//!   bootlace-init makes /etc, /var, /tmp and /home writable (overlays), fetches a digest-pinned
//!   bundle over vsock from a host agent, applies its manifest (host name, a file, `env`),
//!   reports READY and hands off to systemd, whose readiness it relays to the host;
//! - **systemd alone**: the same root baked as ext4 (read-write, so systemd needs nothing
//!   more), the same stage-1 initramfs handing straight to `/lib/systemd/systemd`, and the
//!   manifest's work done by a oneshot unit baked into the image (host name, the file, the
//!   environment as a `system.conf.d` drop-in).
//!
//! Each boot ends with a service that waits for `systemctl is-system-running --wait` and prints
//! the guest's uptime, then powers off. Figures, in the guest's own clock (seconds since the
//! kernel started): bootlace's READY (its timeline), systemd ready (the uptime when systemd
//! says the system is running), and the host's wall time from QEMU's start to the host agent
//! hearing systemd's readiness (bootlace only: the baseline has no host link). Prints a
//! markdown table of medians and the bootlace/systemd-alone ratio.
//!
//! Run with `make bench` or `./target/release/bench-debian [--runs 3]`; `--help` lists the
//! options and the exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_bench::EXIT_CODES_HELP;
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Sha256Digest, Source};
use bootlace_contract::protocol::{Kind, SYSTEMD_READY_STEP};
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{artifact, bake_stage1, debian_root, kernel_modules, scratch, test_kernel};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{images, Outcome, VmSpec};

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-debian",
    about = "A Debian root with systemd: bootlace (erofs, vsock bundle) against systemd alone",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Boots per way.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const PROBE: &str = r#"#!/bin/sh
exec > /dev/console 2>&1
systemctl is-system-running --wait > /dev/null
echo "BENCH systemd_ready=$(cut -d' ' -f1 /proc/uptime) host=$(cat /proc/sys/kernel/hostname) env=$APP_MODE"
systemctl poweroff
"#;

const PROBE_UNIT: &str = "[Unit]\nDescription=bench probe\n[Service]\nType=simple\n\
    ExecStart=/etc/bench-probe.sh\n[Install]\nWantedBy=multi-user.target\n";

const MANIFEST: &str = r#"version = 1
hostname = "guest-1"

[env]
APP_MODE = "production"

[[files]]
path = "/etc/app.conf"
content = "from the manifest\n"

[[files]]
path = "/etc/bench-probe.sh"
source = "probe.sh"
mode = 0o755

[[files]]
path = "/etc/systemd/system/bench-probe.service"
source = "probe.service"

[[symlinks]]
path = "/etc/systemd/system/multi-user.target.wants/bench-probe.service"
target = "/etc/systemd/system/bench-probe.service"
"#;

/// The same work as a oneshot unit of the image.
const WORK_UNIT: &str = "[Unit]\nDescription=the manifest's work\nDefaultDependencies=no\n\
    Before=sysinit.target\n[Service]\nType=oneshot\n\
    ExecStart=/bin/sh -c 'echo guest-1 > /etc/hostname; echo guest-1 > /proc/sys/kernel/hostname; \
    echo from the manifest > /etc/app.conf'\n[Install]\nWantedBy=sysinit.target\n";

const MEMORY_MIB: u32 = 512;

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-debian", measure(&args)),
        Err(code) => code.into(),
    }
}

struct Images {
    dir: PathBuf,
    bundle: Vec<u8>,
}

/// The stage-1 initramfs in `images`, handing to `init` in the real root.
fn stage1(images: &Path, init: &str, read_write: bool) -> Result<()> {
    bake_stage1(
        images,
        bootlace_contract::config::Stage1 {
            init: Argv::try_from(vec![init.to_owned()])?,
            read_write,
            ..bootlace_contract::config::Stage1::default()
        },
    )?;
    Ok(())
}

fn bake_images(dir: &Path) -> Result<Images> {
    let root = debian_root()?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    stage1(&images, "/sbin/bootlace-init", false)?;
    // The bundle and the bootlace image.
    let bdir = dir.join("bundle");
    std::fs::create_dir_all(&bdir)?;
    std::fs::write(bdir.join("bootlace.toml"), MANIFEST)?;
    std::fs::write(bdir.join("probe.sh"), PROBE)?;
    std::fs::write(bdir.join("probe.service"), PROBE_UNIT)?;
    let tarball = dir.join("bundle.tar.gz");
    bundle::build(&bdir, BundleFormat::TarGz, "BOOTLACE", 0, &tarball)?;
    let bundle = std::fs::read(&tarball)?;
    let mut cfg = InitConfig::default();
    cfg.handoff.command = Argv::try_from(vec!["/sbin/init".to_owned()])?;
    cfg.bootstrap.sources = vec![Source::Vsock];
    cfg.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned())?);
    cfg.host.digest = Some(Sha256Digest::try_from(
        bootlace_contract::digest::of_bytes(&bundle).to_string(),
    )?);
    let mut spec = BakeSpec::new(
        Format::Erofs,
        images.join("bootlace.erofs"),
        Some(root.clone()),
        artifact("bootlace-init")?,
    );
    spec.config = cfg;
    spec.name = Some("bootlace".to_owned());
    spec.modules = Some(kernel_modules(&[])?);
    bake::bake(&spec, &mut |_| {}).context("bake the bootlace image")?;
    // systemd alone: a copy of the root with the work unit, the probe and the environment.
    let plain = dir.join("plain-root");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&root)
        .arg(&plain)
        .status()?;
    if !cp.success() {
        bail!("cp -a {} {}", root.display(), plain.display());
    }
    let etc = plain.join("etc");
    std::fs::write(etc.join("bench-probe.sh"), PROBE)?;
    std::fs::set_permissions(
        etc.join("bench-probe.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let units = etc.join("systemd/system");
    std::fs::write(units.join("bench-probe.service"), PROBE_UNIT)?;
    std::fs::write(units.join("bench-work.service"), WORK_UNIT)?;
    for (target, unit) in [
        ("multi-user.target.wants", "bench-probe.service"),
        ("sysinit.target.wants", "bench-work.service"),
    ] {
        std::fs::create_dir_all(units.join(target))?;
        std::os::unix::fs::symlink(
            format!("/etc/systemd/system/{unit}"),
            units.join(target).join(unit),
        )?;
    }
    std::fs::create_dir_all(etc.join("systemd/system.conf.d"))?;
    std::fs::write(
        etc.join("systemd/system.conf.d/bench-env.conf"),
        "[Manager]\nDefaultEnvironment=\"APP_MODE=production\"\n",
    )?;
    let plain_images = dir.join("plain-images");
    std::fs::create_dir_all(&plain_images)?;
    stage1(&plain_images, "/lib/systemd/systemd", true)?;
    let mut spec = BakeSpec::new(
        Format::Ext4,
        plain_images.join("plain.ext4"),
        Some(plain),
        artifact("bootlace-init")?,
    );
    spec.name = Some("plain".to_owned());
    spec.modules = Some(kernel_modules(&[])?);
    bake::bake(&spec, &mut |_| {}).context("bake the systemd-alone image")?;
    Ok(Images {
        dir: dir.to_owned(),
        bundle,
    })
}

/// One boot's figures, in seconds.
struct Sample {
    ready: Option<f64>,
    systemd_ready: f64,
    host_heard: Option<f64>,
}

fn boot(images: &Images, bootlace: bool, run: usize) -> Result<Sample> {
    let (dir, name) = if bootlace {
        (images.dir.join("images"), "bootlace")
    } else {
        (images.dir.join("plain-images"), "plain")
    };
    let chosen = images::choose(&dir, name, None)?;
    let mut spec = VmSpec::new(test_kernel()?.image);
    let stage1 = images::stage1(&dir)?.path();
    bootlace_vm::boot_image(&mut spec, &chosen.entry, Some(&stage1))?;
    spec.memory_mib = MEMORY_MIB;
    spec.timeout = Duration::from_secs(240);
    let heard: Arc<Mutex<Option<Instant>>> = Arc::default();
    if bootlace {
        let vdir = images.dir.join(format!("vsock-{run}"));
        std::fs::create_dir_all(&vdir)?;
        let sink = Arc::clone(&heard);
        let host = Arc::new(Host::new(
            Some(BundleSource::from_bytes(images.bundle.clone())),
            move |e: GuestEvent| {
                if let Event::Report(f) = &e.event {
                    if f.kind == Kind::Step && f.get("STEP") == Some(SYSTEMD_READY_STEP) {
                        *sink.lock().expect("lock") = Some(Instant::now());
                    }
                }
            },
        ));
        host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))?;
        spec.vsock = Some(VsockSpec::new(vdir));
    }
    let started = Instant::now();
    let o = bootlace_vm::run(&spec)?;
    let systemd_ready = bench_value(&o, "systemd_ready")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{name}: no BENCH line:\n{}", o.console))?;
    let ready = o
        .timeline()
        .next()
        .and_then(|t| t.split_whitespace().find_map(|w| w.strip_prefix("ready=")))
        .and_then(|v| v.trim_end_matches('s').parse().ok());
    let host_heard = heard
        .lock()
        .expect("lock")
        .map(|t| t.duration_since(started).as_secs_f64());
    Ok(Sample {
        ready,
        systemd_ready,
        host_heard,
    })
}

fn bench_value(o: &Outcome, key: &str) -> Option<String> {
    let needle = format!("{key}=");
    o.console.lines().find_map(|l| {
        let at = l.find("BENCH ")?;
        l[at..]
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&needle))
            .map(str::to_owned)
    })
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

fn fmt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.2}"))
}

fn measure(args: &Args) -> Result<bool> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = scratch()?;
    let images = bake_images(dir.path())?;
    let mut rows = Vec::new();
    for bootlace in [true, false] {
        let mut samples = Vec::new();
        for run in 0..args.runs {
            eprintln!(
                "bench-debian: {}, boot {}",
                if bootlace {
                    "bootlace"
                } else {
                    "systemd alone"
                },
                run + 1
            );
            samples.push(boot(&images, bootlace, run)?);
        }
        rows.push((
            bootlace,
            median(samples.iter().filter_map(|s| s.ready).collect()),
            median(samples.iter().map(|s| s.systemd_ready).collect()),
            median(samples.iter().filter_map(|s| s.host_heard).collect()),
        ));
    }
    println!(
        "\nA Debian bookworm root with systemd, {MEMORY_MIB} MiB TCG guest, median of {} boots; \
         guest clock (s since the kernel started) and host wall time (s since QEMU started):\n",
        args.runs
    );
    println!("| boot | bootlace READY | systemd ready | host heard systemd ready |");
    println!("|---|---|---|---|");
    for (bootlace, ready, systemd, heard) in &rows {
        println!(
            "| {} | {} | {} | {} |",
            if *bootlace {
                "bootlace (erofs, vsock bundle)"
            } else {
                "systemd alone (ext4, oneshot unit)"
            },
            fmt(*ready),
            fmt(*systemd),
            fmt(*heard)
        );
    }
    if let (Some(a), Some(b)) = (rows[0].2, rows[1].2) {
        println!("\nsystemd ready, bootlace / systemd alone: {:.2}", a / b);
    }
    Ok(true)
}
