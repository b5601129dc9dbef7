//! Bake time: bootlace's bakers next to the raw tools on the same large tree, as ratios.
//!
//! A deterministic tree (`--files 5000 --mib 100` by default: mixed sizes from a few hundred
//! bytes to a few MiB, in nested directories, content from a seeded PRNG that compresses about
//! like binaries do) is written to a temporary directory. Then, per format, one warm-up and
//! `--runs 5` timed runs (bootlace and raw alternating, outputs removed between runs, the tree
//! in the page cache) of:
//!
//! - ext4: `bootlace_image::fsimage::make_image` vs `mke2fs -q -F -t ext4 -b 4096 -d DIR -L X
//!   OUT SIZE` (SIZE: bootlace's image size plus a quarter, room for the journal, resize inode
//!   and 5% reserved blocks the host defaults add; `-b 4096` because the host profile picks
//!   1 KiB blocks below 512 MiB and bootlace uses 4 KiB);
//! - erofs: `make_image` vs `mkfs.erofs -T0 --all-root OUT DIR`;
//! - initramfs (gzip): `bootlace_image::bake::bake` with `--format initramfs --all-root` (the
//!   tree as input, the init, the default config) vs `find . | cpio -o -H newc | gzip > OUT`
//!   run in the tree.
//!
//! bootlace's extra work is in its column: its census or name walks, the ext4 debugfs pass that
//! normalises owners and times, the erofs label patch, the fsync of the output and the atomic
//! rename; for the initramfs, the additions (the init — the real `bootlace-init` when found:
//! `--init`, `$BOOTLACE_INIT`, `target/bootlace/bootlace-init`; else this binary as a
//! stand-in —, config, mount points), the input's digest, compressing with flate2, the sha256
//! and fsync of the archive and its metadata. The raw tools use the host's defaults (the raw
//! ext4 has a journal; nothing is synced).
//!
//! ```text
//! cargo run --release -p bootlace-bench --bin bench-bake -- --files 5000 --mib 100 --runs 5
//! ```
//!
//! Then `bootlace-image bake` itself (the library call: validation, staging — a read-only
//! overlay of the additions over the input when run as root, else a mirror of hard links;
//! `--bake-staging mirror` forces the mirror —, mount points, init, config, the image, the
//! input's digest, sha256, fsync, metadata), per format (`--bake-formats`), on the busybox
//! fixture and on a large tree of this machine (`--bake-tree`, default `/usr/share`),
//! `--bake-runs 3` after a warm-up, next to the raw tool alone on the same tree: `mkfs.erofs
//! -T0`, `mke2fs -d`, `mksquashfs`, `find | cpio | gzip`, `mkfs.erofs` + `qemu-img convert`;
//! with bake's own split into staging, image and hash+sync. `--skip-generated` /
//! `--skip-bake` run one part only.
//!
//! Prints markdown tables (median seconds and bootlace/raw ratio per format). Exit status 0
//! when every run finished, 1 when a bake fails or a tool is missing (e2fsprogs, erofs-utils,
//! squashfs-tools, qemu-utils, cpio, gzip), 2 for a usage error.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_bench::median_p95;
use bootlace_contract::fs::FsType;
use bootlace_image::bake::{bake, BakeSpec, Format, Staging, StagingMode};
use bootlace_image::fsimage::{make_image, FsSpec};

#[derive(clap::Parser)]
#[command(
    name = "bench-bake",
    about = "Bake time per format against the raw tools (markdown tables on stdout)",
    after_help = "Exit status:\n  0  every run finished\n  1  a bake or a raw tool failed, \
                  or a tool is missing\n  2  usage error"
)]
struct Args {
    /// Files in the generated tree.
    #[arg(long, default_value_t = 5000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    files: usize,
    /// Total size of the tree in MiB.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    mib: u64,
    /// Timed runs per format (after one warm-up).
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    runs: usize,
    /// The bootlace-init binary to bake (default: target/bootlace/bootlace-init).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Skip the generated tree (the fsimage/initramfs builders against the raw tools).
    #[arg(long)]
    skip_generated: bool,
    /// Skip `bootlace-image bake` per format (busybox fixture and --bake-tree).
    #[arg(long)]
    skip_bake: bool,
    /// The large tree `bake` is timed on (a directory of this machine).
    #[arg(long, default_value = "/usr/share")]
    bake_tree: PathBuf,
    /// The formats `bake` is timed in, comma-separated (default: all).
    #[arg(long, default_value = "initramfs,erofs,ext4,squashfs,qcow2")]
    bake_formats: String,
    /// Timed runs per format and tree for `bake` (after one warm-up).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    bake_runs: usize,
    /// How `bake` stages a directory input: auto (an overlay when root) or mirror.
    #[arg(long, default_value = "auto", value_name = "auto|mirror")]
    bake_staging: StagingMode,
}

/// splitmix64.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias does not matter here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Writes the tree; returns (files, bytes, directories).
fn make_tree(root: &Path, files: usize, total: u64) -> anyhow::Result<(usize, u64, usize)> {
    let mut rng = Rng(0xb007_1ace);
    // Sizes: mostly small, some medium, a few large (log-uniform within each class), then
    // scaled so that they add up to `total`.
    let raw: Vec<f64> = (0..files)
        .map(|_| {
            let class = rng.below(100);
            let (lo, hi): (f64, f64) = match class {
                0..=69 => (256.0, 16.0 * 1024.0),
                70..=96 => (16.0 * 1024.0, 512.0 * 1024.0),
                _ => (512.0 * 1024.0, 8.0 * 1024.0 * 1024.0),
            };
            let u = rng.below(1 << 20) as f64 / f64::from(1u32 << 20);
            (lo.ln() + u * (hi.ln() - lo.ln())).exp()
        })
        .collect();
    let scale = total as f64 / raw.iter().sum::<f64>();
    // Content: 4 KiB of shared "vocabulary" chunks and fresh random words mixed, so gzip finds
    // matches (about 2-3x) without the data being trivial.
    let vocab: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
    let mut dirs = std::collections::BTreeSet::new();
    let mut bytes = 0u64;
    let mut buf = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let size = ((r * scale) as usize).max(1);
        let dir = root.join(format!("d{:02}/s{}", i % 40, (i / 40) % 8));
        if dirs.insert(dir.clone()) {
            std::fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        }
        buf.clear();
        while buf.len() < size {
            let x = rng.next();
            if x.is_multiple_of(2) {
                buf.extend_from_slice(&x.to_le_bytes());
                buf.extend_from_slice(&rng.next().to_le_bytes());
            } else {
                let at = ((x >> 8) % 4000) as usize;
                let len = 16 + ((x >> 20) % 33) as usize;
                buf.extend_from_slice(&vocab[at..at + len]);
            }
        }
        buf.truncate(size);
        let path = dir.join(format!("f{i:06}.bin"));
        std::fs::write(&path, &buf).with_context(|| format!("write {}", path.display()))?;
        bytes += size as u64;
    }
    Ok((files, bytes, dirs.len()))
}

fn init_binary(args: &Args) -> anyhow::Result<(PathBuf, &'static str)> {
    if let Some(p) = &args.init {
        return Ok((p.clone(), "given"));
    }
    if let Some(p) = std::env::var_os("BOOTLACE_INIT") {
        return Ok((PathBuf::from(p), "$BOOTLACE_INIT"));
    }
    let exe = std::env::current_exe().context("current exe")?;
    // target/release/bench-bake -> target/bootlace/bootlace-init
    if let Some(target) = exe.parent().and_then(Path::parent) {
        let p = target.join("bootlace/bootlace-init");
        if p.is_file() {
            return Ok((p, "target/bootlace"));
        }
    }
    let p = PathBuf::from("target/bootlace/bootlace-init");
    if p.is_file() {
        return Ok((p, "target/bootlace"));
    }
    Ok((exe, "stand-in: this binary"))
}

/// Runs a command to completion, failing with its stderr on a non-zero status.
fn run_cmd(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A program in PATH or the sbin directories.
fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found in PATH, /usr/sbin or /sbin"))
}

type Bake<'a> = Box<dyn FnMut() -> anyhow::Result<()> + 'a>;

struct Row {
    format: &'static str,
    bootlace: Vec<Duration>,
    raw: Vec<Duration>,
    bootlace_bytes: u64,
    raw_bytes: u64,
}

/// One warm-up of each, then `runs` timed runs alternating bootlace and raw; `out_b`/`out_r`
/// are removed before every run (untimed).
fn measure(
    format: &'static str,
    runs: usize,
    (out_b, mut bootlace): (&Path, Bake<'_>),
    (out_r, mut raw): (&Path, Bake<'_>),
) -> anyhow::Result<Row> {
    let time = |out: &Path, f: &mut Bake<'_>| -> anyhow::Result<Duration> {
        let _ = std::fs::remove_file(out);
        let t = Instant::now();
        f()?;
        Ok(t.elapsed())
    };
    time(out_b, &mut bootlace).with_context(|| format!("{format}: bootlace warm-up"))?;
    time(out_r, &mut raw).with_context(|| format!("{format}: raw warm-up"))?;
    let mut row = Row {
        format,
        bootlace: Vec::new(),
        raw: Vec::new(),
        bootlace_bytes: 0,
        raw_bytes: 0,
    };
    for i in 0..runs {
        row.bootlace
            .push(time(out_b, &mut bootlace).with_context(|| format!("{format}: bootlace"))?);
        row.raw
            .push(time(out_r, &mut raw).with_context(|| format!("{format}: raw"))?);
        eprintln!(
            "bench-bake: {format} run {}/{runs}: bootlace {:.2} s, raw {:.2} s",
            i + 1,
            row.bootlace.last().map_or(0.0, Duration::as_secs_f64),
            row.raw.last().map_or(0.0, Duration::as_secs_f64),
        );
    }
    row.bootlace_bytes = std::fs::metadata(out_b).map(|m| m.len()).unwrap_or(0);
    row.raw_bytes = std::fs::metadata(out_r).map(|m| m.len()).unwrap_or(0);
    Ok(row)
}

/// Files, bytes and directories under a tree (symlinks not followed).
fn census(root: &Path) -> anyhow::Result<(u64, u64, u64)> {
    let (mut files, mut bytes, mut dirs) = (0, 0, 0);
    let mut stack = vec![root.to_owned()];
    while let Some(d) = stack.pop() {
        dirs += 1;
        for e in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                files += 1;
                bytes += m.len();
            }
        }
    }
    Ok((files, bytes, dirs))
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-bake: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> anyhow::Result<()> {
    for t in [
        "mke2fs",
        "mkfs.erofs",
        "debugfs",
        "cpio",
        "gzip",
        "find",
        "sh",
    ] {
        tool(t)?;
    }
    let (init, init_from) = init_binary(args)?;
    if !args.skip_generated {
        generated(args, &init, init_from)?;
    }
    if !args.skip_bake {
        bake_section(args, &init, init_from)?;
    }
    Ok(())
}

/// The generated tree: the fsimage builders and the initramfs bake against the raw tools.
fn generated(args: &Args, init: &Path, init_from: &str) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("bl-bake.")
        .tempdir()
        .context("temp dir")?;
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).context("mkdir tree")?;
    let t = Instant::now();
    let (files, bytes, dirs) = make_tree(&tree, args.files, args.mib * 1024 * 1024)?;
    eprintln!(
        "bench-bake: tree of {files} files in {dirs} directories, {:.1} MiB, written in {:.1} s",
        bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let rows = vec![
        fs_row(args, FsType::Ext4, &tree, work.path())?,
        fs_row(args, FsType::Erofs, &tree, work.path())?,
        initramfs_row(args, &tree, work.path(), init)?,
    ];
    let mut o = std::io::stdout().lock();
    writeln!(
        o,
        "Bake time: {files} files in {dirs} directories, {:.1} MiB; median of {} runs after one \
         warm-up; {} CPUs; init for the initramfs: {} ({init_from}).\n",
        bytes as f64 / 1048576.0,
        args.runs,
        cpus(),
        init.display(),
    )?;
    generated_table(&mut o, &rows)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// `fsimage::make_image` against the raw mkfs tool.
fn fs_row(args: &Args, fs: FsType, tree: &Path, work: &Path) -> anyhow::Result<Row> {
    let (ob, or) = (
        work.join(format!("bootlace.{fs}")),
        work.join(format!("raw.{fs}")),
    );
    let spec = FsSpec {
        dir: tree,
        label: "benchroot",
        mtime: 0,
        format: fs,
        progress: None,
    };
    let raw: Bake<'_> = if fs == FsType::Ext4 {
        // Raw mke2fs gets bootlace's image size plus a quarter (rounded up to MiB): with the
        // host defaults it also holds a journal, a resize inode and 5% reserved blocks.
        make_image(&spec, &ob).context("ext4: bootlace sizing run")?;
        let bytes = std::fs::metadata(&ob).context("ext4 image")?.len();
        let kib = (bytes + bytes / 4).div_ceil(1 << 20) * 1024;
        let mke2fs = tool("mke2fs")?;
        Box::new(move || {
            run_cmd(
                Command::new(&mke2fs)
                    .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
                    .arg(tree)
                    .args(["-L", "benchroot"])
                    .arg(&or)
                    .arg(format!("{kib}k")),
            )
        })
    } else {
        let mkfs_erofs = tool("mkfs.erofs")?;
        Box::new(move || {
            run_cmd(
                Command::new(&mkfs_erofs)
                    .args(["-T0", "--all-root"])
                    .arg(&or)
                    .arg(tree),
            )
        })
    };
    let or = work.join(format!("raw.{fs}"));
    let name = if fs == FsType::Ext4 { "ext4" } else { "erofs" };
    measure(
        name,
        args.runs,
        (
            &ob,
            Box::new(|| make_image(&spec, &ob).map(drop).map_err(Into::into)),
        ),
        (&or, raw),
    )
}

/// `find | cpio | gzip` in `tree` into `out`.
fn raw_initramfs<'a>(tree: &'a Path, out: &'a Path) -> Bake<'a> {
    Box::new(move || {
        run_cmd(
            Command::new("sh")
                .arg("-c")
                .arg("find . | cpio -o -H newc --quiet | gzip > \"$1\"")
                .arg("sh")
                .arg(out)
                .current_dir(tree),
        )
    })
}

/// The initramfs bake (gzip, every file root's) against `find | cpio | gzip`.
fn initramfs_row(args: &Args, tree: &Path, work: &Path, init: &Path) -> anyhow::Result<Row> {
    let (ob, or) = (work.join("bootlace.cpio.gz"), work.join("raw.cpio.gz"));
    let mut spec = BakeSpec::new(
        Format::Initramfs,
        ob.clone(),
        Some(tree.to_owned()),
        init.to_owned(),
    );
    spec.all_root = true;
    measure(
        "initramfs (gzip)",
        args.runs,
        (
            &ob,
            Box::new(|| bake(&spec, &mut |_| {}).map(drop).map_err(Into::into)),
        ),
        (&or, raw_initramfs(tree, &or)),
    )
}

fn generated_table(o: &mut impl std::io::Write, rows: &[Row]) -> anyhow::Result<()> {
    writeln!(o, "| format | bootlace median s | raw median s | ratio |")?;
    writeln!(o, "|---|---:|---:|---:|")?;
    for r in rows {
        let (b, _) = median_p95(&r.bootlace);
        let (w, _) = median_p95(&r.raw);
        writeln!(
            o,
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.format,
            b / 1000.0,
            w / 1000.0,
            b / w
        )?;
    }
    writeln!(o)?;
    for r in rows {
        let (b95, w95) = (median_p95(&r.bootlace).1, median_p95(&r.raw).1);
        writeln!(
            o,
            "- {}: output {:.1} MiB (bootlace) vs {:.1} MiB (raw); p95 {:.2} s vs {:.2} s",
            r.format,
            r.bootlace_bytes as f64 / 1048576.0,
            r.raw_bytes as f64 / 1048576.0,
            b95 / 1000.0,
            w95 / 1000.0,
        )?;
    }
    writeln!(
        o,
        "- raw commands: `mke2fs -q -F -t ext4 -b 4096 -d TREE -L benchroot OUT <1.25 x bootlace \
         image size>`; `mkfs.erofs -T0 --all-root OUT TREE`; `find . | cpio -o -H newc --quiet | \
         gzip > OUT` (in TREE)"
    )?;
    Ok(())
}

/// One format's `bake` runs: the row, the median staging/image/finish split, the staging.
struct BakeRow {
    row: Row,
    split: (f64, f64, f64),
    staging: Option<Staging>,
}

/// `bootlace-image bake` (directory input, no cache) per format against the raw tool alone on
/// the same tree, for the busybox fixture and a large tree.
fn bake_section(args: &Args, init: &Path, init_from: &str) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("bl-bake2.")
        .tempdir()
        .context("temp dir")?;
    let fixture = work.path().join("fixture");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/busybox-rootfs.sh");
    run_cmd(Command::new("bash").arg(&script).arg(&fixture)).context("busybox fixture")?;
    let formats: Vec<Format> = args
        .bake_formats
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    for (tree_name, tree) in [
        ("busybox fixture", fixture.clone()),
        ("large tree", args.bake_tree.clone()),
    ] {
        let (files, bytes, dirs) = census(&tree)?;
        eprintln!(
            "bench-bake: bake on {} ({files} files, {dirs} directories, {:.1} MiB)",
            tree.display(),
            bytes as f64 / 1048576.0
        );
        let rows = formats
            .iter()
            .map(|f| bake_row(args, *f, &tree, work.path(), init))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut o = std::io::stdout().lock();
        writeln!(
            o,
            "\n`bootlace-image bake` on the {tree_name} `{}` ({files} files, {dirs} directories, \
             {:.1} MiB): median of {} runs after one warm-up; {} CPUs; init: {} ({init_from}).\n",
            tree.display(),
            bytes as f64 / 1048576.0,
            args.bake_runs,
            cpus(),
            init.display(),
        )?;
        bake_table(&mut o, &rows)?;
    }
    writeln!(
        std::io::stdout(),
        "- raw commands: `find . | cpio -o -H newc --quiet | gzip > OUT`; `mkfs.erofs -T0 OUT \
         TREE`; `mke2fs -q -F -t ext4 -b 4096 -d TREE OUT <1.25 x bake's image>`; `mksquashfs \
         TREE OUT -noappend -no-progress -quiet`; qcow2: `mkfs.erofs -T0 RAW TREE && qemu-img \
         convert -f raw -O qcow2 RAW OUT`"
    )?;
    Ok(())
}

/// The raw tool alone for `format` on `tree` into `out` (`kib`: the ext4 size).
fn raw_tool<'a>(
    format: Format,
    tree: &'a Path,
    out: &'a Path,
    kib: u64,
) -> anyhow::Result<Bake<'a>> {
    Ok(match format {
        Format::Initramfs => raw_initramfs(tree, out),
        Format::Erofs => {
            let mkfs = tool("mkfs.erofs")?;
            Box::new(move || run_cmd(Command::new(&mkfs).arg("-T0").arg(out).arg(tree)))
        }
        Format::Ext4 => {
            let mke2fs = tool("mke2fs")?;
            Box::new(move || {
                run_cmd(
                    Command::new(&mke2fs)
                        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
                        .arg(tree)
                        .arg(out)
                        .arg(format!("{kib}k")),
                )
            })
        }
        Format::Squashfs => {
            let mksquashfs = tool("mksquashfs")?;
            Box::new(move || {
                run_cmd(Command::new(&mksquashfs).arg(tree).arg(out).args([
                    "-noappend",
                    "-no-progress",
                    "-quiet",
                ]))
            })
        }
        Format::Qcow2 => {
            let (mkfs, qemu_img) = (tool("mkfs.erofs")?, tool("qemu-img")?);
            Box::new(move || {
                let raw = out.with_extension("raw");
                run_cmd(Command::new(&mkfs).arg("-T0").arg(&raw).arg(tree))?;
                run_cmd(
                    Command::new(&qemu_img)
                        .args(["convert", "-f", "raw", "-O", "qcow2"])
                        .arg(&raw)
                        .arg(out),
                )?;
                std::fs::remove_file(&raw).context("remove raw")
            })
        }
        Format::Disk => anyhow::bail!(
            "no single raw tool makes a bootable disk: bench-disk-boot measures its boot"
        ),
    })
}

/// `bake` in one format against its raw tool.
fn bake_row(
    args: &Args,
    format: Format,
    tree: &Path,
    work: &Path,
    init: &Path,
) -> anyhow::Result<BakeRow> {
    let ob = work.join(format!("bootlace.{format}"));
    let or = work.join(format!("raw.{format}"));
    let mut spec = BakeSpec::new(format, ob.clone(), Some(tree.to_owned()), init.to_owned());
    spec.version = "bench".into();
    spec.staging = args.bake_staging;
    let mut phases: Vec<(Duration, Duration, Duration)> = Vec::new();
    let mut staging = None;
    let mut run_bake = |spec: &BakeSpec| -> anyhow::Result<()> {
        let r = bake(spec, &mut |_| {})?;
        phases.push((r.staging_time, r.image_time, r.finish_time));
        staging = Some(r.staging);
        Ok(())
    };
    // ext4: raw mke2fs gets bootlace's image size plus a quarter (journal, reserve).
    let mut kib = 0;
    if format == Format::Ext4 {
        run_bake(&spec).context("ext4 sizing run")?;
        let len = std::fs::metadata(&ob)?.len();
        kib = (len + len / 4).div_ceil(1 << 20) * 1024;
    }
    let raw = raw_tool(format, tree, &or, kib)?;
    let row = measure(
        format.as_str(),
        args.bake_runs,
        (&ob, Box::new(|| run_bake(&spec))),
        (&or, raw),
    )?;
    let median = |f: fn(&(Duration, Duration, Duration)) -> Duration| {
        median_p95(&phases.iter().map(f).collect::<Vec<_>>()).0
    };
    let split = (median(|p| p.0), median(|p| p.1), median(|p| p.2));
    let _ = std::fs::remove_file(&ob);
    let _ = std::fs::remove_file(bootlace_contract::image::ImageMeta::path_for(&ob));
    let _ = std::fs::remove_file(&or);
    Ok(BakeRow {
        row,
        split,
        staging,
    })
}

fn bake_table(o: &mut impl std::io::Write, rows: &[BakeRow]) -> anyhow::Result<()> {
    writeln!(
        o,
        "| format | bake median s | raw tool median s | ratio | staging | bake: staging s | bake: image s | bake: hash+sync s |"
    )?;
    writeln!(o, "|---|---:|---:|---:|---|---:|---:|---:|")?;
    for BakeRow {
        row: r,
        split,
        staging,
    } in rows
    {
        let (b, _) = median_p95(&r.bootlace);
        let (w, _) = median_p95(&r.raw);
        writeln!(
            o,
            "| {} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} | {:.2} |",
            r.format,
            b / 1000.0,
            w / 1000.0,
            b / w,
            staging.map_or("?", Staging::as_str),
            split.0 / 1000.0,
            split.1 / 1000.0,
            split.2 / 1000.0
        )?;
    }
    writeln!(o)?;
    for BakeRow { row: r, .. } in rows {
        writeln!(
            o,
            "- {}: output {:.1} MiB (bake) vs {:.1} MiB (raw)",
            r.format,
            r.bootlace_bytes as f64 / 1048576.0,
            r.raw_bytes as f64 / 1048576.0,
        )?;
    }
    Ok(())
}
