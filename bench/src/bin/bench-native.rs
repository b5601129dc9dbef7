//! What bootlace's own boot work costs on the host CPU, without an emulator: the config parse,
//! the manifest parse + validation, and the manifest applied to a temporary root (a tmpfs over
//! its /etc seeded with defaults, a directory, three files, a symlink, one `/bin/true`) — the
//! same work as the boot benchmark's manifest, minus the hostname and sysctl, which would change
//! this machine. The first run of each (cold: code and data touched for the first time in this
//! process) is reported beside the median of the rest, since under TCG nearly every run in a
//! guest is a first run. Needs root (the tmpfs mount).
//!
//! Run with `make bench` or `./target/release/bench-native [--runs N]`; `--help` lists the
//! options and the exit codes.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bootlace_bench::{median_p95, EXIT_CODES_HELP};
use bootlace_contract::config::{HostAddress, InitConfig, Source};
use bootlace_contract::manifest::Manifest;
use bootlace_init::apply;
use bootlace_init::modload::ModuleLoader;
use bootlace_init::sys::root::Root;

#[derive(clap::Parser, Debug)]
#[command(
    name = "bench-native",
    about = "bootlace's own boot work (config, manifest, apply) on the host CPU; needs root",
    after_help = EXIT_CODES_HELP
)]
struct Args {
    /// Runs in one process: the first is reported apart (cold), the median and p95 are of the
    /// rest.
    #[arg(long, default_value_t = 30,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(2..))]
    runs: usize,
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

fn main() -> ExitCode {
    match bootlace_bench::parse_args::<Args>() {
        Ok(args) => bootlace_bench::finish("bench-native", measure(args.runs).map(|()| true)),
        Err(code) => code.into(),
    }
}

fn measure(runs: usize) -> Result<()> {
    let mut cfg = InitConfig::default();
    cfg.bootstrap.sources = vec![Source::NineP];
    cfg.host.address = HostAddress::try_from("vsock:2:1024".to_owned()).ok();
    let cfg_text = cfg.to_toml();
    let manifest = bootlace_bench::manifest_without_host_changes();

    let mut parse_cfg = Vec::new();
    let mut parse_manifest = Vec::new();
    let mut applied = Vec::new();
    for _ in 0..runs {
        let (d, _) =
            time(|| InitConfig::from_toml(&cfg_text, Path::new("init.toml")).context("config"))?;
        parse_cfg.push(d);
        let (d, m) =
            time(|| Manifest::parse(&manifest, Path::new("bootlace.toml")).context("manifest"))?;
        parse_manifest.push(d);

        let dir = tempfile::tempdir()?;
        let (root_dir, bundle_dir) = (dir.path().join("root"), dir.path().join("bundle"));
        std::fs::create_dir_all(root_dir.join("etc"))?;
        std::fs::write(root_dir.join("etc/motd"), "hello\n")?;
        std::fs::create_dir_all(bundle_dir.join("files"))?;
        std::fs::write(bundle_dir.join("files/app.key"), "KEY")?;
        let (d, _) = time(|| {
            let root = Root::open(&root_dir)?;
            let bundle = Root::open(&bundle_dir)?;
            apply::apply(&m, &root, &bundle, &mut ModuleLoader::new(), &cfg).context("apply")
        })?;
        applied.push(d);
        rustix::mount::unmount(root_dir.join("etc"), rustix::mount::UnmountFlags::empty())
            .context("unmount the tmpfs")?;
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "Native cost of bootlace's own boot work on this host ({runs} runs in one process; ms):\n"
    );
    println!("| step | first run | median of the rest | p95 |\n|---|---|---|---|");
    for (name, v) in [
        ("config parse + validation (init.toml)", &parse_cfg),
        ("manifest parse + validation", &parse_manifest),
        (
            "manifest applied (tmpfs + copy, dir, 3 files, symlink, /bin/true)",
            &applied,
        ),
    ] {
        let (m, p) = median_p95(v.get(1..).unwrap_or_default());
        println!(
            "| {name} | {:.3} | {m:.3} | {p:.3} |",
            v.first().copied().map_or(f64::NAN, ms)
        );
    }
    Ok(())
}
