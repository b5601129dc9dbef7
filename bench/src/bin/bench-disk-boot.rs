//! A bootable disk booted through UEFI firmware against the same disk booted directly: how
//! much the firmware path (OVMF, the EFI stub loading the kernel and stage 1 from the EFI
//! system partition) adds before bootlace's READY.
//!
//! The busybox fixture baked once as a bootable disk (erofs root, raw; the image powers off as
//! its hand-off, right after READY). Each round boots it twice, side by side:
//! - firmware: `-bios OVMF.fd`, the disk's own boot path, no `-kernel`;
//! - direct: `-kernel` with the same kernel, `-initrd` with the very stage 1 inside the disk's
//!   unified kernel image (read back from its EFI system partition) and the same command line,
//!   the same disk attached.
//!
//! Reported per path, medians of `--runs` (default 5): the wall time from QEMU's start to its
//! exit after the guest's power-off (host clock: the firmware counts), the guest's `ready=`
//! (kernel clock: from the kernel's start, so the firmware does not count), and the ratio.
//!
//! Run with `make bench` or `./target/release/bench-disk-boot [--runs 5]`; `--help` lists the
//! options and the exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bootlace_bench::EXIT_CODES_HELP;
use bootlace_contract::config::{Command as Argv, InitConfig};
use bootlace_contract::image::DiskInfo;
use bootlace_image::bake::{self, BakeSpec, Format};
use bootlace_image::uki::Pe;
use bootlace_tests::{artifact, busybox_rootfs, kernel_modules, scratch, test_kernel};
use bootlace_vm::{images, Outcome, RootDisk, VmSpec};

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-disk-boot",
    about = "A bootable disk through UEFI firmware against direct kernel boot of the same disk",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Boots per path.
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-disk-boot", measure(&args)),
        Err(code) => code.into(),
    }
}

/// Bakes the disk; returns the images directory.
fn bake_disk(dir: &Path) -> Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let images = dir.join("images");
    std::fs::create_dir_all(&images)?;
    let mut spec = BakeSpec::new(
        Format::Disk,
        images.join("bb.img"),
        Some(rootfs),
        artifact("bootlace-init")?,
    );
    let mut cfg = InitConfig::default();
    cfg.handoff.command = Argv::try_from(vec!["/bin/poweroff".to_owned(), "-f".to_owned()])?;
    spec.config = cfg;
    spec.all_root = true;
    spec.name = Some("bb".to_owned());
    spec.modules = Some(kernel_modules(&[])?);
    bake::bake(&spec, &mut |_| {}).context("bake the disk")?;
    Ok(images)
}

/// The stage 1 inside the disk's unified kernel image, written to `out`.
fn stage1_of(disk: &Path, info: &DiskInfo, dir: &Path) -> Result<PathBuf> {
    use std::os::unix::fs::FileExt;
    let esp = info
        .partitions
        .iter()
        .find(|p| p.role == "esp")
        .context("no ESP")?;
    let mut bytes = vec![0u8; usize::try_from(esp.size)?];
    std::fs::File::open(disk)?.read_exact_at(&mut bytes, esp.offset)?;
    let esp_file = dir.join("esp.img");
    std::fs::write(&esp_file, &bytes)?;
    let uki = bootlace_image::disk::read_boot_file(&esp_file)?;
    let pe = Pe::read(&uki)?;
    let initrd = pe.section(&uki, ".initrd").context("no .initrd")?;
    let out = dir.join("stage1.img");
    std::fs::write(&out, initrd)?;
    Ok(out)
}

/// One boot; the wall time and the guest's `ready=`.
fn boot(spec: &VmSpec, what: &str) -> Result<(Duration, f64)> {
    let o: Outcome = bootlace_vm::run(spec)?;
    let ready = o
        .timeline()
        .find_map(|t| {
            t.split_whitespace()
                .find_map(|w| w.strip_prefix("ready="))
                .and_then(|v| v.trim_end_matches('s').parse::<f64>().ok())
        })
        .with_context(|| format!("{what}: no ready= in the timeline ({})", o.summary()))?;
    if o.end != bootlace_vm::End::PoweredOff {
        bail!("{what}: {}", o.summary());
    }
    Ok((o.wall, ready * 1000.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn measure(args: &Args) -> Result<bool> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = scratch()?;
    let images = bake_disk(dir.path())?;
    let chosen = images::choose(&images, "bb", None)?;
    let info = chosen
        .entry
        .meta
        .disk
        .clone()
        .context("not a bootable disk")?;
    let mut firmware = VmSpec::new("/nonexistent/vmlinuz");
    bootlace_vm::boot_image(&mut firmware, &chosen.entry, None)?;
    firmware.timeout = Duration::from_secs(180);
    let mut direct = VmSpec::new(test_kernel()?.image);
    direct.initrd = Some(stage1_of(&chosen.entry.path(), &info, dir.path())?);
    // bootlace-vm's own console=ttyS0 panic=-1 quiet, then the rest of the baked line.
    direct.append = info
        .cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("console=") && *w != "panic=-1" && *w != "quiet")
        .map(str::to_owned)
        .collect();
    direct.root_disk = Some(RootDisk {
        path: chosen.entry.path(),
        format: "raw",
        bootable: false,
        read_only: true,
        snapshot: false,
    });
    direct.timeout = Duration::from_secs(180);
    let (mut fw, mut dk) = ((Vec::new(), Vec::new()), (Vec::new(), Vec::new()));
    for run in 0..args.runs {
        eprintln!("bench-disk-boot: round {}", run + 1);
        let (w, r) = boot(&firmware, "firmware")?;
        fw.0.push(w.as_secs_f64() * 1000.0);
        fw.1.push(r);
        let (w, r) = boot(&direct, "direct")?;
        dk.0.push(w.as_secs_f64() * 1000.0);
        dk.1.push(r);
    }
    let size = std::fs::metadata(chosen.entry.path())?.len();
    println!(
        "\nA bootable disk ({} bytes, {} MiB ESP, erofs root) through UEFI firmware (OVMF) \
         against direct kernel boot of the same disk; medians of {} boots each, TCG, 256 MiB:\n",
        size,
        info.partitions.first().map_or(0, |p| p.size >> 20),
        args.runs
    );
    println!("| path | QEMU start -> power-off, ms | guest ready= (kernel clock), ms |");
    println!("|---|---|---|");
    let (fw_wall, fw_ready) = (median(fw.0), median(fw.1));
    let (dk_wall, dk_ready) = (median(dk.0), median(dk.1));
    println!("| firmware (OVMF, EFI stub) | {fw_wall:.0} | {fw_ready:.0} |");
    println!("| direct (-kernel/-initrd) | {dk_wall:.0} | {dk_ready:.0} |");
    println!(
        "| firmware / direct | {:.2} | {:.2} |",
        fw_wall / dk_wall,
        fw_ready / dk_ready
    );
    println!(
        "\nThe firmware path adds {:.0} ms of wall time (firmware and EFI stub before the \
         kernel's clock starts).",
        fw_wall - dk_wall
    );
    Ok(true)
}
