//! Boot benchmark, side by side on the same kernel, QEMU, modules and bundle; only PID 1 changes:
//!
//! - `floor`: `bootlace-floor`, a minimal static init that loads the same modules, dials the
//!   host over vsock, says READY=1 and powers off;
//! - `bootlace-9p`, `bootlace-disk`, `bootlace-vsock`: bootlace-init applying a 10-step manifest
//!   (hostname, env, sysctl, a tmpfs /etc with defaults, a directory, three files, a symlink, one
//!   command) from each source, then READY over vsock;
//! - `script-9p`: busybox sh doing the same work the obvious way (mount, cp, run, socat).
//!
//! Each scenario runs `--runs` times (or `$BENCH_RUNS`; default 5) after one warm-up; reported: the host-side
//! time from QEMU start to READY received and the guest's CLOCK_BOOTTIME from PID-1 entry to
//! READY, median and p95, and bootlace's overhead over the floor. Then the vsock throughput: a
//! 64 MiB bundle fetched + verified + unpacked by bootlace against the floor reading the same
//! number of raw bytes from a host socket on the same VM setup.
//!
//! Run with `make bench` (which builds the guest binaries first); `--help` lists the options
//! and the exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, Host};
use bootlace_bench::{median_p95, EXIT_CODES_HELP};
use bootlace_contract::config::{
    Command as Argv, HandoffMode, HostAddress, InitConfig, Sha256Digest, Source,
};
use bootlace_contract::kmod::{ModuleIndex, Resolved};
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_image::bake::{BakeSpec, Format};
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_image::initramfs::Modules;
use bootlace_tests::{artifact, busybox_rootfs, test_kernel};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{Disk, Share, VmSpec};

const SCRIPT_INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc
ENTRY=$(cut -d' ' -f1 /proc/uptime)
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /floor-modules); do insmod "$m"; done
mkdir -p /.bootstrap
n=0; until mount -t 9p -o trans=virtio,version=9p2000.L,ro bootlace /.bootstrap 2>/dev/null; do
  n=$((n+1)); [ $n -gt 500 ] && break; sleep 0.01; done
hostname bench-host
export APP_MODE=bench
echo bench > /proc/sys/kernel/domainname
mkdir -p /run/etc-defaults && cp -a /etc/. /run/etc-defaults/
mount -t tmpfs tmpfs /etc && cp -a /run/etc-defaults/. /etc/
mkdir -p /var/lib/app && chmod 750 /var/lib/app
printf 'listen = 8080\n' > /etc/app.conf.tmp && mv /etc/app.conf.tmp /etc/app.conf
printf 'MODE=bench\n' > /etc/app.env.tmp && mv /etc/app.env.tmp /etc/app.env
cp /.bootstrap/files/app.key /etc/app.key && chmod 600 /etc/app.key
ln -sf app.conf /etc/app.current
/bin/true
umount /.bootstrap && rmdir /.bootstrap
NOW=$(cut -d' ' -f1 /proc/uptime)
printf 'READY=1\nENTRY_S=%s\nNOW_S=%s\n' "$ENTRY" "$NOW" > /run/payload
LEN=$(wc -c < /run/payload)
{ printf 'BL1 HELLO 0 11\nPROTOCOL=1\n'; printf 'BL1 READY 1 %s\n' "$LEN"; cat /run/payload; sleep 1; } | socat - VSOCK-CONNECT:2:1024 >/dev/null
poweroff -f
"#;

struct Scenario {
    name: &'static str,
    /// The floor this scenario is compared with (same modules and source).
    baseline: Option<&'static str>,
    img: PathBuf,
    append: Vec<String>,
    disks: Vec<Disk>,
    shares: Vec<Share>,
    bundle: Option<BundleSource>,
    raw_bytes: Option<u64>,
    memory_mib: u32,
}

#[derive(Debug)]
struct Sample {
    host_ready: Duration,
    guest_ready: Duration,
    ready: Frame,
    console: String,
}

fn secs_field(f: &Frame, key: &str) -> Option<f64> {
    f.get(key)?.parse().ok()
}

fn guest_ready(f: &Frame) -> Option<Duration> {
    let ns = |k: &str| f.get(k).and_then(|v| v.parse::<u128>().ok());
    if let (Some(entry), Some(now)) = (ns("ENTRY_NS"), ns("BOOTTIME_NS")) {
        return Some(Duration::from_nanos(
            u64::try_from(now.saturating_sub(entry)).ok()?,
        ));
    }
    if let (Some(now), Some(tl)) = (ns("BOOTTIME_NS"), f.get("TIMELINE")) {
        let entry_s: f64 = tl
            .split(' ')
            .find_map(|w| w.strip_prefix("entry="))?
            .trim_end_matches('s')
            .parse()
            .ok()?;
        let now_s = now as f64 / 1e9;
        return Some(Duration::from_secs_f64((now_s - entry_s).max(0.0)));
    }
    let (e, n) = (secs_field(f, "ENTRY_S")?, secs_field(f, "NOW_S")?);
    Some(Duration::from_secs_f64((n - e).max(0.0)))
}

fn run_once(s: &Scenario, logs: &Path, i: usize) -> Result<Sample> {
    let dir = tempfile::tempdir()?;
    let readies: Arc<Mutex<Vec<(Instant, Frame)>>> = Arc::default();
    let sink = Arc::clone(&readies);
    let host = Arc::new(Host::new(s.bundle.clone(), move |e| {
        if let Event::Report(f) = e.event {
            if f.kind == Kind::Ready {
                if let Ok(mut v) = sink.lock() {
                    v.push((Instant::now(), f));
                }
            }
        }
    }));
    host.serve_unix(&hybrid_path(&dir.path().join("vsock"), 1024))?;
    if let Some(n) = s.raw_bytes {
        let l =
            std::os::unix::net::UnixListener::bind(hybrid_path(&dir.path().join("vsock"), 1025))?;
        std::thread::spawn(move || {
            use std::io::Write;
            if let Ok((mut c, _)) = l.accept() {
                let chunk = vec![0x5au8; 1 << 20];
                let mut left = n;
                while left > 0 {
                    let k = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                    if c.write_all(&chunk[..k]).is_err() {
                        break;
                    }
                    left -= k as u64;
                }
            }
        });
    }
    let k = test_kernel()?;
    let mut spec = VmSpec::new(k.image);
    spec.initrd = Some(s.img.clone());
    spec.append = s.append.clone();
    spec.disks = s.disks.clone();
    spec.shares = s.shares.clone();
    spec.memory_mib = s.memory_mib;
    spec.timeout = Duration::from_secs(180);
    spec.console_log = Some(logs.join(format!("{}-{i}.console.log", s.name)));
    spec.vsock = Some(VsockSpec::new(dir.path().to_owned()));
    let started = Instant::now();
    let outcome = bootlace_vm::run(&spec)?;
    let Some((at, ready)) = readies.lock().ok().and_then(|v| v.first().cloned()) else {
        bail!(
            "{}: no READY; console tail:\n{}",
            s.name,
            outcome
                .console
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    let guest = guest_ready(&ready)
        .with_context(|| format!("{}: READY without stamps: {ready:?}", s.name))?;
    Ok(Sample {
        host_ready: at - started,
        guest_ready: guest,
        ready,
        console: outcome.console,
    })
}

/// Module files (paths, in load order with their dependencies) of the named modules: what a
/// floor loads to match one bootlace scenario module for module.
fn module_paths(names: &[&str], release: &str) -> Result<String> {
    let dir = Path::new("/lib/modules").join(release);
    let index = ModuleIndex::read(&dir)?;
    let mut names = names.to_vec();
    names.retain(|m| index.get(m).is_some() || index.is_builtin(m));
    let mut out = String::new();
    for r in index.resolve(names)? {
        if let Resolved::Load(m) = r {
            out.push_str(&format!("/lib/modules/{release}/{}\n", m.path));
        }
    }
    Ok(out)
}

fn bake(rootfs: &Path, init: &Path, cfg: InitConfig, release: &str, out: &Path) -> Result<()> {
    let mut spec = BakeSpec::new(
        Format::Initramfs,
        out.to_owned(),
        Some(rootfs.to_owned()),
        init.to_owned(),
    );
    spec.config = cfg;
    spec.modules = Some(Modules {
        root: PathBuf::from("/lib/modules"),
        release: release.to_owned(),
        extra: Vec::new(),
    });
    spec.all_root = true;
    bootlace_image::bake::bake(&spec, &mut |_| {})?;
    Ok(())
}

fn copy_with_libs(bin: &str, rootfs: &Path) -> Result<()> {
    let out = std::process::Command::new("ldd").arg(bin).output()?;
    let mut files = vec![bin.to_owned()];
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
            files.push(p.to_owned());
        }
    }
    for f in files {
        let dst = rootfs.join(f.trim_start_matches('/'));
        std::fs::create_dir_all(dst.parent().unwrap_or(rootfs))?;
        std::fs::copy(&f, &dst).with_context(|| format!("copy {f}"))?;
    }
    Ok(())
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-boot",
    about = "Boot to READY: a floor init, bootlace and a script init per source; vsock throughput",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Measured rounds, after one warm-up round (every scenario once per round).
    #[arg(long, env = "BENCH_RUNS", default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    runs: usize,
    /// Where to write the report (also printed on stdout) [default: target/bench/boot.md].
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-boot", bench(&args).map(|()| true)),
        Err(code) => code.into(),
    }
}

/// Everything the scenarios share: the work directory, the kernel, the rootfs, the bundle,
/// the init and floor binaries.
struct Setup {
    w: PathBuf,
    logs: PathBuf,
    release: String,
    rootfs: PathBuf,
    bundle_dir: PathBuf,
    init: PathBuf,
    floor: PathBuf,
}

impl Setup {
    /// Bakes `init` with `cfg` into an initramfs `<name>.img` of the work directory.
    fn img(&self, name: &str, init: &Path, cfg: InitConfig) -> Result<PathBuf> {
        let p = self.w.join(format!("{name}.img"));
        bake(&self.rootfs, init, cfg, &self.release, &p)?;
        Ok(p)
    }
}

fn bench(args: &Args) -> Result<()> {
    let work = tempfile::tempdir()?;
    let setup = prepare(work.path())?;
    let (scenarios, floor_img) = scenarios(&setup)?;
    let samples = rounds(&scenarios, &setup.logs, args.runs)?;
    let mut report = boot_report(&scenarios, &samples, args.runs, &setup.release);
    report.push_str(&takeover_report(&scenarios, &samples));
    report.push_str(&throughput(&setup, &floor_img)?);
    let out = args
        .report
        .clone()
        .unwrap_or_else(|| bootlace_tests::workspace().join("target/bench/boot.md"));
    std::fs::write(&out, &report).with_context(|| format!("write {}", out.display()))?;
    println!("{report}");
    eprintln!("bench: report in {}", out.display());
    Ok(())
}

/// The rootfs (busybox + socat), the bundle directory, and the module lists each floor loads.
fn prepare(w: &Path) -> Result<Setup> {
    let logs = bootlace_tests::workspace().join("target/bench/logs");
    std::fs::create_dir_all(&logs)?;
    let k = test_kernel()?;
    let rootfs = w.join("rootfs");
    busybox_rootfs(&rootfs)?;
    copy_with_libs("/usr/bin/socat", &rootfs)?;
    let bundle_dir = w.join("bundle");
    std::fs::create_dir_all(bundle_dir.join("files"))?;
    std::fs::write(bundle_dir.join("bootlace.toml"), bootlace_bench::MANIFEST)?;
    std::fs::write(bundle_dir.join("files/app.key"), "KEY")?;
    // Each floor loads exactly the modules bootlace loads for that source: the vsock
    // transport, then the source's stack (for the disk, the erofs the bundle is made in).
    use bootlace_contract::drivers::{self, VSOCK as VSOCK_MODULES};
    let ninep: Vec<&str> = [VSOCK_MODULES, drivers::source(Source::NineP)].concat();
    let disk_mods: Vec<&str> = [
        VSOCK_MODULES,
        drivers::source(Source::Disk),
        drivers::filesystem(bootlace_contract::fs::FsType::Erofs),
    ]
    .concat();
    // The script init reads /floor-modules too.
    for (file, modules) in [
        ("floor-modules", &ninep[..]),
        ("floor-modules-disk", &disk_mods[..]),
        ("floor-modules-vsock", VSOCK_MODULES),
    ] {
        std::fs::write(rootfs.join(file), module_paths(modules, &k.release)?)?;
    }
    Ok(Setup {
        w: w.to_owned(),
        logs,
        release: k.release,
        rootfs,
        bundle_dir,
        init: artifact("bootlace-init")?,
        floor: artifact("bootlace-floor")?,
    })
}

/// The init config every scenario starts from: supervise `/bin/true`, these sources, a host.
fn base_config(sources: &[Source]) -> InitConfig {
    let mut c = InitConfig::default();
    c.handoff.mode = HandoffMode::Supervise;
    c.handoff.command =
        Argv::try_from(vec!["/bin/true".to_owned()]).unwrap_or_else(|_| Argv::default_init());
    c.bootstrap.sources = sources.to_vec();
    c.host.address = HostAddress::try_from("vsock:2:1024".to_owned()).ok();
    c
}

/// A config for the vsock source with the bundle's digest pinned.
fn vsock_config(sum: bundle::BundleSummary) -> InitConfig {
    let mut c = base_config(&[Source::Vsock]);
    c.host.digest =
        Sha256Digest::try_from(format!("sha256:{}", sum.sha256.unwrap_or_default())).ok();
    c
}

/// A scenario with nothing attached, 256 MiB.
fn scenario(name: &'static str, baseline: Option<&'static str>, img: PathBuf) -> Scenario {
    Scenario {
        name,
        baseline,
        img,
        append: vec![],
        disks: vec![],
        shares: vec![],
        bundle: None,
        raw_bytes: None,
        memory_mib: 256,
    }
}

/// The boot scenarios, floors first, and the floor image (for the throughput runs).
fn scenarios(s: &Setup) -> Result<(Vec<Scenario>, PathBuf)> {
    let script = s.w.join("script-init");
    std::fs::write(&script, SCRIPT_INIT)?;
    let disk = s.w.join("bundle.img");
    bundle::build(&s.bundle_dir, BundleFormat::DiskErofs, "BOOTLACE", 0, &disk)?;
    let tgz = s.w.join("bundle.tar.gz");
    let sum = bundle::build(&s.bundle_dir, BundleFormat::TarGz, "BOOTLACE", 0, &tgz)?;
    let share = vec![Share {
        dir: s.bundle_dir.clone(),
        tag: "bootlace".into(),
        read_only: true,
    }];
    let erofs_disk = vec![Disk {
        path: disk,
        read_only: true,
    }];
    let ninep = base_config(&[Source::NineP]);
    let floor_img = s.img("floor", &s.floor, ninep.clone())?;
    let list = vec![
        Scenario {
            shares: share.clone(),
            ..scenario("floor-9p", None, floor_img.clone())
        },
        Scenario {
            shares: share.clone(),
            ..scenario(
                "bootlace-9p",
                Some("floor-9p"),
                s.img("bootlace-9p", &s.init, ninep.clone())?,
            )
        },
        Scenario {
            shares: share,
            ..scenario(
                "script-9p",
                Some("floor-9p"),
                s.img("script-9p", &script, ninep)?,
            )
        },
        Scenario {
            disks: erofs_disk.clone(),
            append: vec!["floor.modules=/floor-modules-disk".to_owned()],
            ..scenario("floor-disk", None, floor_img.clone())
        },
        Scenario {
            disks: erofs_disk,
            ..scenario(
                "bootlace-disk",
                Some("floor-disk"),
                s.img("bootlace-disk", &s.init, base_config(&[Source::Disk]))?,
            )
        },
        Scenario {
            append: vec!["floor.modules=/floor-modules-vsock".to_owned()],
            ..scenario("floor-vsock", None, floor_img.clone())
        },
        Scenario {
            bundle: Some(BundleSource::from_bytes(std::fs::read(&tgz)?)),
            ..scenario(
                "bootlace-vsock",
                Some("floor-vsock"),
                s.img("bootlace-vsock", &s.init, vsock_config(sum))?,
            )
        },
        takeover_scenario(s)?,
    ];
    Ok((list, floor_img))
}

/// The vsock scenario with a newer init in the bundle (`[init]`: bootlace-init-next), which
/// takes over PID 1 once the bundle is mounted; compared with the same boot without it.
fn takeover_scenario(s: &Setup) -> Result<Scenario> {
    let dir = s.w.join("bundle-takeover");
    std::fs::create_dir_all(dir.join("files"))?;
    std::fs::copy(
        s.bundle_dir.join("files/app.key"),
        dir.join("files/app.key"),
    )?;
    let next = std::fs::read(artifact("bootlace-init-next")?)?;
    std::fs::write(dir.join("bootlace-init"), &next)?;
    let manifest = format!(
        "{}\n[init]\npath = \"bootlace-init\"\nsha256 = \"{}\"\n",
        bootlace_bench::MANIFEST,
        bootlace_contract::digest::of_bytes(&next)
    );
    std::fs::write(dir.join("bootlace.toml"), manifest)?;
    let tgz = s.w.join("bundle-takeover.tar.gz");
    let sum = bundle::build(&dir, BundleFormat::TarGz, "BOOTLACE", 0, &tgz)?;
    Ok(Scenario {
        bundle: Some(BundleSource::from_bytes(std::fs::read(&tgz)?)),
        ..scenario(
            "bootlace-vsock-takeover",
            Some("bootlace-vsock"),
            s.img("bootlace-vsock-takeover", &s.init, vsock_config(sum))?,
        )
    })
}

/// Seconds of the stamp `name` in a READY's TIMELINE.
fn stamp_s(f: &Frame, name: &str) -> Option<f64> {
    f.get("TIMELINE")?
        .split(' ')
        .find_map(|w| w.strip_prefix(&format!("{name}=")))?
        .trim_end_matches('s')
        .parse()
        .ok()
}

/// The takeover's own times, from the newer init's READY timeline: from the bundle's arrival
/// (mounted) to the hand-over (copy, digest, self-check) and to the newer init's first line.
fn takeover_report(scenarios: &[Scenario], samples: &[Vec<Sample>]) -> String {
    let Some((_, runs)) = scenarios
        .iter()
        .zip(samples)
        .find(|(s, _)| s.name == "bootlace-vsock-takeover")
    else {
        return String::new();
    };
    let span = |from: &str, to: &str| -> Vec<Duration> {
        runs.iter()
            .filter_map(|x| Some(stamp_s(&x.ready, to)? - stamp_s(&x.ready, from)?))
            .map(|d| Duration::from_secs_f64(d.max(0.0)))
            .collect()
    };
    let mut out = String::from(
        "\nA newer init taking over (bootlace-vsock-takeover, guest ms from its READY timeline):\n\n| span | median ms | p95 ms |\n|---|---|---|\n",
    );
    for (what, from, to) in [
        (
            "arrival (bundle mounted) -> hand-over: copy, sha256, self-check",
            "bootstrap_mounted",
            "init_handover",
        ),
        (
            "hand-over -> the newer init's entry (exec)",
            "init_handover",
            "init_takeover",
        ),
        (
            "arrival -> the newer init's first line",
            "bootstrap_mounted",
            "init_takeover",
        ),
    ] {
        let (m, p) = median_p95(&span(from, to));
        out.push_str(&format!("| {what} | {m:.0} | {p:.0} |\n"));
    }
    out
}

/// `runs` rounds after one warm-up, round robin: run i of every scenario before run i+1 of
/// any, so that drift in the machine's speed (shared, noisy) falls on all of them alike.
fn rounds(scenarios: &[Scenario], logs: &Path, runs: usize) -> Result<Vec<Vec<Sample>>> {
    let mut samples: Vec<Vec<Sample>> = scenarios.iter().map(|_| Vec::new()).collect();
    for i in 0..=runs {
        for (s, out) in scenarios.iter().zip(samples.iter_mut()) {
            let sample = run_once(s, logs, i).with_context(|| format!("{} run {i}", s.name))?;
            if i > 0 {
                out.push(sample);
            }
        }
        eprintln!("bench: round {i} of {runs} done (round 0 is the warm-up)");
    }
    Ok(samples)
}

/// The boot table (medians and p95 per scenario) and the overhead over each floor.
fn boot_report(
    scenarios: &[Scenario],
    samples: &[Vec<Sample>],
    runs: usize,
    release: &str,
) -> String {
    let mut report = format!(
        "Boot to READY, {runs} rounds after 1 warm-up round (scenarios interleaved), kernel {release}, QEMU TCG, 1 vCPU, 256 MiB.\n\n"
    );
    report.push_str("| PID 1 | host: QEMU start -> READY, median ms | p95 ms | guest: PID-1 entry -> READY, median ms | p95 ms | init VmHWM KiB |\n|---|---|---|---|---|---|\n");
    let mut medians = Vec::new();
    for (s, samples) in scenarios.iter().zip(samples) {
        let (h50, h95) = median_p95(&samples.iter().map(|x| x.host_ready).collect::<Vec<_>>());
        let (g50, g95) = median_p95(&samples.iter().map(|x| x.guest_ready).collect::<Vec<_>>());
        let hwm = samples
            .iter()
            .filter_map(|x| x.ready.get("VMHWM_KB"))
            .max_by_key(|v| v.len())
            .unwrap_or("-")
            .to_owned();
        report.push_str(&format!(
            "| {} | {h50:.0} | {h95:.0} | {g50:.0} | {g95:.0} | {hwm} |\n",
            s.name
        ));
        medians.push((s.name, h50, g50));
    }
    report.push_str("\nOverhead over the matching floor (same modules and source; medians):\n\n| PID 1 | floor | guest +ms | guest ratio | host +ms | host ratio |\n|---|---|---|---|---|---|\n");
    for (s, (name, h, g)) in scenarios.iter().zip(&medians) {
        let Some(base) = s.baseline else { continue };
        let Some((_, fh, fg)) = medians.iter().find(|m| m.0 == base) else {
            continue;
        };
        report.push_str(&format!(
            "| {name} | {base} | {:+.0} | {:.2} | {:+.0} | {:.2} |\n",
            g - fg,
            g / fg,
            h - fh,
            h / fh
        ));
    }
    report
}

/// 64 MiB of deterministic pseudo-random bytes (xorshift), so nothing compresses.
fn random_blob() -> Vec<u8> {
    let mut blob = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in blob.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    blob
}

/// A floor scenario reading `n` raw bytes from host port 1025 (`floor.hash=1`: hashing them).
fn raw_scenario(name: &'static str, floor_img: &Path, n: u64, hash: bool) -> Scenario {
    let mut append = vec![format!("floor.raw={n}")];
    if hash {
        append.push("floor.hash=1".to_owned());
    }
    append.push("floor.modules=/floor-modules-vsock".to_owned());
    Scenario {
        append,
        raw_bytes: Some(n),
        memory_mib: 768,
        ..scenario(name, None, floor_img.to_owned())
    }
}

/// Throughput: 64 MiB through bootlace's fetch + verify + unpack, against raw bytes.
fn throughput(s: &Setup, floor_img: &Path) -> Result<String> {
    let big = s.w.join("big");
    std::fs::create_dir_all(big.join("files"))?;
    std::fs::write(big.join("bootlace.toml"), "version = 1\n")?;
    std::fs::write(big.join("files/blob"), random_blob())?;
    let big_tar = s.w.join("big.tar");
    let sum = bundle::build(&big, BundleFormat::Tar, "BOOTLACE", 0, &big_tar)?;
    let bytes = std::fs::read(&big_tar)?;
    let n = bytes.len() as u64;
    let fetch = Scenario {
        bundle: Some(BundleSource::from_bytes(bytes)),
        memory_mib: 768,
        ..scenario(
            "throughput-bootlace",
            None,
            s.img("big", &s.init, vsock_config(sum))?,
        )
    };
    let f = run_once(&fetch, &s.logs, 0)?;
    let (fetched_ms, whole_ms) = fetch_times(&f)?;
    let plain_ns = raw_ns(&run_once(
        &raw_scenario("throughput-raw", floor_img, n, false),
        &s.logs,
        0,
    )?)?;
    let hash_ns = raw_ns(&run_once(
        &raw_scenario("throughput-raw-sha256", floor_img, n, true),
        &s.logs,
        0,
    )?)?;
    let mbs = |secs: f64| n as f64 / secs / 1e6;
    let (raw_mbs, hash_mbs) = (mbs(plain_ns / 1e9), mbs(hash_ns / 1e9));
    let (fetch_mbs, whole_mbs) = (mbs(fetched_ms / 1e3), mbs(whole_ms / 1e3));
    Ok(format!(
        "\nvsock throughput, {n} bytes (64 MiB of random data, uncompressed tar), one run each:\n\n| path | MB/s | ratio to raw | ratio to raw + sha256 |\n|---|---|---|---|\n\
         | raw vsock stream (floor reads the bytes) | {raw_mbs:.1} | 1.00 | - |\n\
         | raw vsock stream + sha256 in the floor (the digest's own cost) | {hash_mbs:.1} | {:.2} | 1.00 |\n\
         | bootlace fetch + sha256 | {fetch_mbs:.1} | {:.2} | {:.2} |\n\
         | bootlace fetch + sha256 + unpack into tmpfs | {whole_mbs:.1} | {:.2} | {:.2} |\n",
        hash_mbs / raw_mbs,
        fetch_mbs / raw_mbs,
        fetch_mbs / hash_mbs,
        whole_mbs / raw_mbs,
        whole_mbs / hash_mbs
    ))
}

/// From bootlace's fetch run: the fetch time its console reports, and the time from the
/// bootstrap found to mounted (fetch + verify + unpack) from its READY timeline; ms.
fn fetch_times(f: &Sample) -> Result<(f64, f64)> {
    let fetched_ms = f
        .console
        .lines()
        .find_map(|l| {
            l.split(" in ")
                .nth(1)
                .filter(|_| l.contains("bootstrap: fetched"))?
                .split(' ')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .context("no fetch line")?;
    let tl = f.ready.get("TIMELINE").unwrap_or("").to_owned();
    let stamp = |k: &str| {
        tl.split(' ')
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.trim_end_matches('s').parse::<f64>().ok())
    };
    let whole_ms = match (stamp("bootstrap_found="), stamp("bootstrap_mounted=")) {
        (Some(a), Some(b)) => (b - a) * 1000.0,
        _ => f64::NAN,
    };
    Ok((fetched_ms, whole_ms))
}

/// The floor's `RAW_NS`: how long reading the raw bytes took.
fn raw_ns(r: &Sample) -> Result<f64> {
    r.ready
        .get("RAW_NS")
        .and_then(|v| v.parse().ok())
        .context("no RAW_NS")
}
