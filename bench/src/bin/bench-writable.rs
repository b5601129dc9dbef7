//! The writable locations of a read-only root: how long the init takes to make them writable
//! when the image's `/var` holds 1 MiB or 100 MiB, as overlays (the image has overlayfs) and
//! as tmpfs copies (it has not), side by side.
//!
//! The busybox fixture and the probe, with `/var/data` holding `--var` MiB in 64 KiB files of
//! random bytes, baked as erofs twice — with the kernel's modules (overlayfs among them) and
//! without — and booted through a stage-1 initramfs in a 512 MiB guest (the default writable
//! size, 25%, holds a 100 MiB copy), `--runs 3` times each. The figure is the init's own
//! (`root: writable: 4 locations in N us`: /etc, /var, /tmp and /home), so the guest's boot
//! around it does not count. Prints a markdown table of medians and the copy/overlay ratio.
//!
//! Run with `make bench` or `./target/release/bench-writable [--var 1,100] [--runs 3]`;
//! `--help` lists the options and the exit codes.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bootlace_bench::EXIT_CODES_HELP;
use bootlace_contract::config::{Command as Argv, HandoffMode, InitConfig};
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_tests::{artifact, bake_stage1, kernel_modules, probe_rootfs, scratch, test_kernel};
use bootlace_vm::{images, VmSpec};

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-writable",
    about = "Writable locations of a read-only root: overlay against copy, by the size of /var",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Sizes of the image's /var/data, in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,100")]
    var: Vec<u64>,
    /// Boots per image.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

const MEMORY_MIB: u32 = 512;

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-writable", measure(&args)),
        Err(code) => code.into(),
    }
}

/// The rootfs with `mib` MiB of 64 KiB files under var/data.
fn rootfs(dir: &Path, mib: u64) -> Result<PathBuf> {
    let root = dir.join(format!("rootfs-{mib}"));
    probe_rootfs(&root, None)?;
    let data = root.join("var/data");
    std::fs::create_dir_all(&data)?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ mib;
    let mut chunk = vec![0u8; 64 << 10];
    for i in 0..(mib << 4) {
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        std::fs::File::create(data.join(format!("f{i:05}")))?.write_all(&chunk)?;
    }
    Ok(root)
}

/// Bakes the stage-1 initramfs and, per size, an erofs root with and without overlayfs.
fn bake_images(dir: &Path, sizes: &[u64]) -> Result<PathBuf> {
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    bake_stage1(&images, bootlace_contract::config::Stage1::default())?;
    let mut cfg = InitConfig::default();
    cfg.handoff.mode = HandoffMode::Supervise;
    cfg.handoff.command = Argv::try_from(vec!["/bin/true".to_owned()])?;
    for &mib in sizes {
        let root = rootfs(dir, mib)?;
        for overlay in [true, false] {
            let name = name(mib, overlay);
            let mut spec = BakeSpec::new(
                Format::Erofs,
                images.join(format!("{name}.erofs")),
                Some(root.clone()),
                artifact("bootlace-init")?,
            );
            spec.config = cfg.clone();
            spec.name = Some(name.clone());
            spec.all_root = true;
            if overlay {
                spec.modules = Some(kernel_modules(&[])?);
            }
            bake::bake(&spec, &mut |_| {}).with_context(|| format!("bake {name}"))?;
        }
    }
    Ok(images)
}

fn name(mib: u64, overlay: bool) -> String {
    format!("var{mib}-{}", if overlay { "overlay" } else { "copy" })
}

/// Boots `name` once: the init's `root: writable` time.
fn boot(images: &Path, name: &str) -> Result<Duration> {
    let chosen = images::choose(images, name, None)?;
    let mut spec = VmSpec::new(test_kernel()?.image);
    let stage1 = images::stage1(images)?.path();
    bootlace_vm::boot_image(&mut spec, &chosen.entry, Some(&stage1))?;
    spec.memory_mib = MEMORY_MIB;
    spec.timeout = Duration::from_secs(180);
    let o = bootlace_vm::run(&spec)?;
    let line = o
        .lines_with("root: writable: 4 locations in ")
        .next()
        .map(str::to_owned);
    match (o.exit_status, line) {
        (Some(0), Some(line)) => {
            let us: u64 = line
                .rsplit_once(" in ")
                .and_then(|(_, v)| v.trim().strip_suffix(" us"))
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("cannot read {line:?}"))?;
            Ok(Duration::from_micros(us))
        }
        (status, _) => bail!(
            "{name}: the guest ended with {status:?} and no writable time:\n{}",
            o.console
        ),
    }
}

fn median_ms(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v.get(v.len() / 2)
        .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

fn measure(args: &Args) -> Result<bool> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = scratch()?;
    let images = bake_images(dir.path(), &args.var)?;
    println!(
        "\nMaking the writable locations of an erofs root writable (/etc, /var, /tmp, /home), \
         by the size of the image's /var; median of {} boots, the init's own time, {MEMORY_MIB} \
         MiB guest:\n",
        args.runs
    );
    println!("| /var MiB | overlay ms | copy ms | copy / overlay |");
    println!("|---|---|---|---|");
    for &mib in &args.var {
        let mut ms = [0.0f64; 2];
        for (i, overlay) in [true, false].into_iter().enumerate() {
            let name = name(mib, overlay);
            let mut times = Vec::new();
            for run in 0..args.runs {
                eprintln!("bench-writable: {name}, boot {}", run + 1);
                times.push(boot(&images, &name)?);
            }
            ms[i] = median_ms(times);
        }
        println!(
            "| {mib} | {:.2} | {:.2} | {:.1} |",
            ms[0],
            ms[1],
            ms[1] / ms[0]
        );
    }
    Ok(true)
}
