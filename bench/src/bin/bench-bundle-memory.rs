//! What a vsock bundle takes of a guest: bundles of 1, 16, 64 and 200 MiB (plain tar, random
//! bytes, digest-pinned) fetched and unpacked by guests of 256 MiB and 1 GiB. For each: how the
//! boot ended (READY, or FAILED with the reason), the guest's peak memory use during the boot
//! (`MEM_PEAK_KB` of `MEM_TOTAL_KB`, reported by the init with READY or FAILED) and the wall
//! time. A guest must never end in the OOM killer or a kernel panic: a row that does is marked
//! and the run fails (exit 1).
//!
//! Run with `make bench` or `./target/release/bench-bundle-memory [--sizes 1,16] [--memory
//! 256]`; `--help` lists the options and the exit codes.

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_bench::EXIT_CODES_HELP;
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Sha256Digest, Source};
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_tests::{bake, boot_with, probe_rootfs, scratch};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::Outcome;

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-bundle-memory",
    about = "What a vsock bundle takes of a 256 MiB and a 1 GiB guest, by bundle size",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Bundle sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,200")]
    sizes: Vec<u64>,
    /// Guest memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    memory: Vec<u32>,
}

const MANIFEST: &str = "version = 1\n[handoff]\nmode = \"supervise\"\ncommand = [\"/bin/true\"]\n";

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-bundle-memory", measure(&args)),
        Err(code) => code.into(),
    }
}

/// One row: how the boot went.
struct Row {
    size_mib: u64,
    memory_mib: u32,
    outcome: String,
    peak: String,
    wall_s: f64,
    clean: bool,
}

fn measure(args: &Args) -> Result<bool> {
    let dir = scratch()?;
    let rootfs = dir.path().join("rootfs");
    probe_rootfs(&rootfs, None)?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        let bundle = plain_tar(size << 20)?;
        for &memory in &args.memory {
            eprintln!("bench-bundle-memory: {size} MiB bundle, {memory} MiB guest");
            rows.push(one(dir.path(), &rootfs, &bundle, size, memory)?);
        }
    }
    println!(
        "\nA vsock bundle (plain tar of random bytes, pinned) per guest size; peak: the guest's \
         peak memory use during the boot (MemTotal less the lowest MemAvailable the init saw):\n"
    );
    println!("| bundle MiB | guest MiB | outcome | peak of MemTotal | wall s |");
    println!("|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {:.1} |",
            r.size_mib, r.memory_mib, r.outcome, r.peak, r.wall_s
        );
    }
    Ok(rows.iter().all(|r| r.clean))
}

/// A plain tar of `bootlace.toml` and one file of random bytes, `total` bytes in all.
fn plain_tar(total: u64) -> Result<Vec<u8>> {
    let size = total.saturating_sub(4096);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(MANIFEST.len() as u64);
    h.set_cksum();
    b.append_data(&mut h, "bootlace.toml", MANIFEST.as_bytes())?;
    let mut data = vec![0u8; usize::try_from(size)?];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for byte in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = (x >> 24) as u8;
    }
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    b.append_data(&mut h, "files/data", &data[..])?;
    Ok(b.into_inner()?)
}

fn one(dir: &Path, rootfs: &Path, bundle: &[u8], size: u64, memory: u32) -> Result<Row> {
    let work = tempfile::tempdir_in(dir)?;
    let digest = bootlace_contract::digest::of_bytes(bundle);
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()])?;
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned())?);
    c.host.digest = Some(Sha256Digest::try_from(digest.to_string())?);
    let img = work.path().join("initrd.img");
    bake(rootfs, c, &img)?;
    let vdir = work.path().join("vsock");
    std::fs::create_dir_all(&vdir)?;
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::default();
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(
        Some(BundleSource::from_bytes(bundle.to_vec())),
        move |e| {
            if let Ok(mut v) = sink.lock() {
                v.push(e);
            }
        },
    ));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))
        .context("listen")?;
    let started = Instant::now();
    let o = boot_with(
        &format!("bundle-memory-{size}-{memory}"),
        &img,
        &[],
        |spec| {
            spec.vsock = Some(VsockSpec::new(vdir.clone()));
            spec.memory_mib = memory;
            spec.timeout = std::time::Duration::from_secs(600);
        },
    )?;
    let wall_s = started.elapsed().as_secs_f64();
    let reports: Vec<Frame> = events
        .lock()
        .map_err(|_| anyhow::anyhow!("event lock"))?
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    Ok(row(size, memory, &o, &reports, wall_s))
}

fn row(size: u64, memory: u32, o: &Outcome, reports: &[Frame], wall_s: f64) -> Row {
    let ended_badly = [
        "Kernel panic",
        "Out of memory",
        "oom-kill",
        "deadlocked on memory",
    ]
    .iter()
    .find(|bad| o.console.contains(*bad));
    let last = reports
        .iter()
        .rev()
        .find(|f| matches!(f.kind, Kind::Ready | Kind::Failed));
    let outcome = match (ended_badly, last) {
        (Some(bad), _) => format!("**{bad}**"),
        (None, Some(f)) if f.kind == Kind::Ready => "READY".to_owned(),
        (None, Some(f)) => format!(
            "FAILED: {}",
            f.get("STATUS")
                .unwrap_or("")
                .split("; nothing of it is kept")
                .next()
                .unwrap_or("")
        ),
        (None, None) => format!("no report ({})", o.summary()),
    };
    let peak = last
        .and_then(|f| Some((f.get("MEM_PEAK_KB")?, f.get("MEM_TOTAL_KB")?)))
        .and_then(|(p, t)| Some((p.parse::<u64>().ok()?, t.parse::<u64>().ok()?)))
        .map_or("-".to_owned(), |(p, t)| {
            format!("{} of {} MiB", p >> 10, t >> 10)
        });
    Row {
        size_mib: size,
        memory_mib: memory,
        outcome,
        peak,
        wall_s,
        clean: ended_badly.is_none(),
    }
}
