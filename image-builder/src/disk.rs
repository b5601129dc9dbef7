//! Bootable disks (`bake --format disk`): a GPT disk that UEFI firmware boots with no
//! `-kernel`, as a cloud boots a machine image.
//!
//! ```text
//! LBA 0        protective MBR
//! LBA 1..33    GPT header and 128 entries
//! 1 MiB        1: EFI system partition (FAT32, "esp"): \EFI\BOOT\BOOTX64.EFI, a unified
//!                 kernel image (systemd's EFI stub + kernel + stage-1 initramfs + command line)
//! ...          2: root partition (x86-64 root type, "root"): the erofs or ext4 root, found by
//!                 stage 1 through bootlace.root=PARTUUID=<its unique GUID>
//! ...          3: data partition, if asked (Linux data type, "data", blank)
//! end - 33     backup entries and header
//! ```
//!
//! Every partition starts on a MiB boundary and every GUID, the FAT volume ID and every FAT
//! timestamp derive from the root filesystem's bytes and SOURCE_DATE_EPOCH: the same inputs
//! give the same disk. The raw disk is converted with `qemu-img` (qcow2, stream-optimised VMDK,
//! fixed VHD); what `qemu-img` makes up per run (the VMDK content ID, the VHD footer's time
//! and unique ID) is set from the same seed afterwards.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use bootlace_contract::fs::FsType;
use bootlace_contract::gpt::{Guid, Partition, Table};
use bootlace_contract::image::{Container, DiskPartition};

/// One mebibyte: partitions are aligned to it.
pub const MIB: u64 = 1 << 20;

/// The EFI system partition's default size: room for two unified kernel images (a kernel
/// update written beside the running one) and FAT32's least cluster count.
pub const DEFAULT_ESP_SIZE: u64 = 64 * MIB;

/// The least EFI system partition FAT32 can be made on (65,525 clusters of 512 bytes).
pub const MIN_ESP_SIZE: u64 = 34 * MIB;

/// Where the unified kernel image goes: the removable-media path firmware boots with no boot
/// entries in its NVRAM (a fresh cloud instance has none).
pub const BOOT_PATH: &str = "EFI/BOOT/BOOTX64.EFI";

/// The GPT names of the partitions.
pub const ESP_NAME: &str = "esp";
/// See [`ESP_NAME`].
pub const ROOT_NAME: &str = "root";
/// See [`ESP_NAME`].
pub const DATA_NAME: &str = "data";

/// The FAT label of the EFI system partition.
pub const ESP_LABEL: &[u8; 11] = b"ESP        ";

const SECTOR: u64 = 512;

/// What a bootable disk is made of, beyond the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    /// The root filesystem (erofs or ext4).
    pub fs: FsType,
    /// The output's file format.
    pub container: Container,
    /// The kernel image (`None`: `/boot/vmlinuz-<release>` of the modules' kernel release).
    pub kernel: Option<PathBuf>,
    /// The EFI stub (`None`: [`crate::uki::DEFAULT_STUB`]).
    pub stub: Option<PathBuf>,
    /// Kernel parameters after bootlace's (`console=… panic=-1 quiet bootlace.root=…`).
    pub kernel_args: Vec<String>,
    /// The EFI system partition's size (`None`: [`DEFAULT_ESP_SIZE`], more if the image
    /// needs it).
    pub esp_size: Option<u64>,
    /// A blank data partition of this size, if any.
    pub data_size: Option<u64>,
}

impl Default for DiskOptions {
    fn default() -> DiskOptions {
        DiskOptions {
            fs: FsType::Erofs,
            container: Container::Raw,
            kernel: None,
            stub: None,
            kernel_args: Vec::new(),
            esp_size: None,
            data_size: None,
        }
    }
}

/// The identifiers of one disk, derived from a seed (the root filesystem's sha256).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ids {
    /// The GPT disk GUID.
    pub disk: Guid,
    /// The EFI system partition's unique GUID.
    pub esp: Guid,
    /// The root partition's unique GUID (`PARTUUID=` on the command line).
    pub root: Guid,
    /// The data partition's unique GUID.
    pub data: Guid,
    /// The FAT volume ID of the EFI system partition.
    pub fat_volume: u32,
    /// 16 bytes for what a container tool makes up (VMDK content ID, VHD unique ID).
    pub container: [u8; 16],
}

fn derive(seed: &[u8; 32], what: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"bootlace disk v1\0");
    h.update(what.as_bytes());
    h.update([0]);
    h.update(seed);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(d.get(..16).unwrap_or(&[0; 16]));
    out
}

impl Ids {
    /// The identifiers of the disk whose root filesystem has sha256 `seed`.
    pub fn from_seed(seed: &[u8; 32]) -> Ids {
        let fat = derive(seed, "fat-volume-id");
        Ids {
            disk: Guid::from_hash(derive(seed, "disk")),
            esp: Guid::from_hash(derive(seed, "esp")),
            root: Guid::from_hash(derive(seed, "root")),
            data: Guid::from_hash(derive(seed, "data")),
            fat_volume: u32::from_le_bytes([fat[0], fat[1], fat[2], fat[3]]),
            container: derive(seed, "container"),
        }
    }
}

/// The kernel command line baked into the unified kernel image: both consoles (the serial
/// one last, so it is `/dev/console`, where bootlace reports), reboot at once on panic, only
/// warnings from the kernel, the root partition, then `extra`.
pub fn cmdline(root: Guid, extra: &[String]) -> String {
    let mut words = vec![
        "console=tty0".to_owned(),
        "console=ttyS0".to_owned(),
        "panic=-1".to_owned(),
        "quiet".to_owned(),
        format!("bootlace.root=PARTUUID={root}"),
    ];
    words.extend(extra.iter().cloned());
    words.join(" ")
}

/// Where each partition goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The partition table.
    pub table: Table,
}

impl Layout {
    /// The disk's bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.table.disk_sectors * SECTOR
    }

    /// The partition of GPT name `name`.
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.table.partitions.iter().find(|p| p.name == name)
    }

    /// The metadata's description of the partitions.
    pub fn describe(&self, root_fs: FsType) -> Vec<DiskPartition> {
        self.table
            .partitions
            .iter()
            .map(|p| {
                let (role, fstype) = match p.name.as_str() {
                    ESP_NAME => ("esp", Some("vfat".to_owned())),
                    ROOT_NAME => ("root", Some(root_fs.as_str().to_owned())),
                    _ => ("data", None),
                };
                DiskPartition {
                    number: p.number,
                    role: role.to_owned(),
                    name: p.name.clone(),
                    type_guid: p.type_guid.to_string(),
                    partuuid: p.unique.to_string(),
                    offset: p.first_lba * SECTOR,
                    size: p.sectors() * SECTOR,
                    fstype,
                }
            })
            .collect()
    }
}

fn round_mib(n: u64) -> u64 {
    n.div_ceil(MIB) * MIB
}

/// The layout of a disk with an EFI system partition of `esp_size`, a root partition that
/// holds `root_len` bytes and, if asked, a data partition of `data_size` (sizes rounded up to
/// whole MiB), with 1 MiB free at each end for the tables.
pub fn layout(ids: &Ids, esp_size: u64, root_len: u64, data_size: Option<u64>) -> Layout {
    let mut parts = vec![
        (ESP_NAME, Guid::ESP, ids.esp, round_mib(esp_size)),
        (
            ROOT_NAME,
            Guid::ROOT_X86_64,
            ids.root,
            round_mib(root_len.max(1)),
        ),
    ];
    if let Some(size) = data_size {
        parts.push((
            DATA_NAME,
            Guid::LINUX_DATA,
            ids.data,
            round_mib(size.max(1)),
        ));
    }
    let mut at = MIB;
    let mut partitions = Vec::new();
    for (i, (name, type_guid, unique, size)) in parts.into_iter().enumerate() {
        partitions.push(Partition {
            number: i as u32 + 1,
            type_guid,
            unique,
            first_lba: at / SECTOR,
            last_lba: (at + size) / SECTOR - 1,
            attributes: 0,
            name: name.to_owned(),
        });
        at += size;
    }
    Layout {
        table: Table {
            disk_guid: ids.disk,
            sector_size: SECTOR as u32,
            disk_sectors: (at + MIB) / SECTOR,
            partitions,
        },
    }
}

/// Why a disk could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Reading an input or writing the disk failed.
    #[error("{what} {}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The partition table could not be written.
    #[error("partition table")]
    Table(#[from] bootlace_contract::gpt::WriteError),
    /// No kernel release to take the kernel and modules of.
    #[error("a bootable disk needs the kernel's modules: give --kernel-release (or a --modules-root with one release)")]
    NoKernelRelease,
    /// The kernel is not the release whose modules are baked in.
    #[error("kernel {} is release {found}, but the modules baked in are {release}'s: give --kernel for {release} or --kernel-release {found}", path.display())]
    KernelRelease {
        /// The kernel.
        path: PathBuf,
        /// Its release.
        found: String,
        /// The modules' release.
        release: String,
    },
    /// The file given as the kernel is no x86 bzImage.
    #[error("kernel {}: not an x86 bzImage (no HdrS setup header)", .0.display())]
    NotAKernel(PathBuf),
    /// The EFI stub cannot take the sections.
    #[error("EFI stub {}", path.display())]
    Stub {
        /// The stub.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: crate::uki::UkiError,
    },
    /// The EFI stub is missing.
    #[error("EFI stub {} is missing: install {package} or give --efi-stub", path.display())]
    NoStub {
        /// Where it was looked for.
        path: PathBuf,
        /// The package that has it.
        package: &'static str,
    },
    /// The stage-1 initramfs could not be baked.
    #[error("stage-1 initramfs of the disk")]
    Stage1(#[source] Box<crate::bake::BakeError>),
    /// Converting the raw disk failed.
    #[error("convert the disk to {0}")]
    Convert(Container, #[source] crate::fsimage::FsImageError),
    /// The root filesystem is neither erofs nor ext4.
    #[error("--disk-fs {0}: a bootable disk's root is erofs or ext4")]
    RootFs(FsType),
    /// A tool is not installed.
    #[error("{tool} is missing: install {package}")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// Its Debian package.
        package: &'static str,
    },
    /// A tool failed.
    #[error("{tool} failed ({status}): {stderr}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// How it ended.
        status: String,
        /// What it said.
        stderr: String,
    },
    /// The EFI system partition is too small for what it must hold.
    #[error(
        "the EFI system partition ({esp} bytes) cannot hold the unified kernel image ({uki} \
         bytes): give --esp-size {need} or more"
    )]
    EspTooSmall {
        /// The partition's size.
        esp: u64,
        /// The image's size.
        uki: u64,
        /// The least size that holds it.
        need: u64,
    },
}

fn io_err<'p>(what: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> DiskError + 'p {
    move |source| DiskError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The EFI system partition's size for a unified kernel image of `uki_len` bytes: `asked`, or
/// the default, or twice the image and 8 MiB when that is more (a kernel update fits beside).
pub fn esp_size(asked: Option<u64>, uki_len: u64) -> Result<u64, DiskError> {
    let need = round_mib(uki_len + uki_len / 16 + MIB).max(MIN_ESP_SIZE);
    match asked {
        Some(size) if size < need => Err(DiskError::EspTooSmall {
            esp: size,
            uki: uki_len,
            need,
        }),
        Some(size) => Ok(round_mib(size)),
        None => Ok(DEFAULT_ESP_SIZE.max(round_mib(2 * uki_len + 8 * MIB))),
    }
}

/// Runs one of the tools that make the EFI system partition with a clean environment
/// (`PATH`, `LC_ALL=C`, SOURCE_DATE_EPOCH for every timestamp, mtools' geometry check off).
fn run(
    tool: &'static str,
    package: &'static str,
    args: &[&std::ffi::OsStr],
    epoch: u64,
) -> Result<String, DiskError> {
    let out = std::process::Command::new(tool)
        .args(args)
        .env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("LC_ALL", "C")
        .env("SOURCE_DATE_EPOCH", epoch.to_string())
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => DiskError::ToolMissing { tool, package },
            _ => DiskError::Io {
                what: "run",
                path: PathBuf::from(tool),
                source,
            },
        })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    Err(DiskError::Tool {
        tool,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr)
            .trim()
            .chars()
            .take(2000)
            .collect(),
    })
}

/// Writes the EFI system partition at `path` (`size` bytes, FAT32, label `ESP`):
/// `\EFI\BOOT\BOOTX64.EFI` holding the file `uki`, every timestamp `epoch` — `mkfs.vfat
/// --invariant` and mtools' `mmd`/`mcopy -m`, which take SOURCE_DATE_EPOCH. Returns the
/// version line `mkfs.vfat` printed (`mkfs.fat 4.2 (2021-01-31)`).
pub fn write_esp(
    path: &Path,
    size: u64,
    uki: &Path,
    volume_id: u32,
    epoch: u64,
) -> Result<String, DiskError> {
    use std::ffi::OsStr;
    let err = |what| io_err(what, path);
    let file = File::create(path).map_err(err("create the EFI system partition"))?;
    file.set_len(size)
        .map_err(err("size the EFI system partition"))?;
    drop(file);
    let set_mtime = File::options().write(true).open(uki).and_then(|f| {
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch))
    });
    set_mtime.map_err(io_err("set the time of", uki))?;
    let id = format!("{volume_id:08x}");
    let img = path.as_os_str();
    let said = run(
        "mkfs.vfat",
        "dosfstools",
        &[
            OsStr::new("--invariant"),
            OsStr::new("-F"),
            OsStr::new("32"),
            OsStr::new("-i"),
            OsStr::new(&id),
            OsStr::new("-n"),
            OsStr::new("ESP"),
            img,
        ],
        epoch,
    )?;
    run(
        "mmd",
        "mtools",
        &[
            OsStr::new("-i"),
            img,
            OsStr::new("::/EFI"),
            OsStr::new("::/EFI/BOOT"),
        ],
        epoch,
    )?;
    let target = format!("::/{BOOT_PATH}");
    run(
        "mcopy",
        "mtools",
        &[
            OsStr::new("-m"),
            OsStr::new("-i"),
            img,
            uki.as_os_str(),
            OsStr::new(&target),
        ],
        epoch,
    )?;
    Ok(said.lines().next().unwrap_or_default().trim().to_owned())
}

/// Reads `\EFI\BOOT\BOOTX64.EFI` back from an EFI system partition image (`mtype`).
pub fn read_boot_file(esp: &Path) -> Result<Vec<u8>, DiskError> {
    let target = format!("::/{BOOT_PATH}");
    let out = std::process::Command::new("mtype")
        .args([
            std::ffi::OsStr::new("-i"),
            esp.as_os_str(),
            std::ffi::OsStr::new(&target),
        ])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .map_err(io_err("run mtype on", esp))?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            tool: "mtype",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}

/// Writes the raw disk at `out`: the tables, the EFI system partition from `esp` and the root
/// partition from `root_fs` (zero blocks skipped: the file stays sparse).
pub fn write_raw(layout: &Layout, esp: &Path, root_fs: &Path, out: &Path) -> Result<(), DiskError> {
    let (head, tail) = layout.table.write()?;
    let err = |what| io_err(what, out);
    let disk = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(err("create the disk"))?;
    disk.set_len(layout.disk_bytes())
        .map_err(err("size the disk"))?;
    disk.write_all_at(&head, 0)
        .map_err(err("write the partition table to"))?;
    let tail_at = layout.disk_bytes() - tail.len() as u64;
    disk.write_all_at(&tail, tail_at)
        .map_err(err("write the backup partition table to"))?;
    for (name, src) in [(ESP_NAME, esp), (ROOT_NAME, root_fs)] {
        if let Some(p) = layout.partition(name) {
            copy_sparse(src, &disk, p.first_lba * SECTOR, out)?;
        }
    }
    disk.sync_all().map_err(err("sync the disk"))?;
    Ok(())
}

/// Copies `src` into `disk` at `offset`, leaving holes where `src` has zero blocks.
fn copy_sparse(src: &Path, disk: &File, offset: u64, out: &Path) -> Result<(), DiskError> {
    let mut f = File::open(src).map_err(io_err("read", src))?;
    let mut buf = vec![0u8; MIB as usize];
    let mut at = offset;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(io_err("read", src))?;
        if n == 0 {
            return Ok(());
        }
        for (i, block) in buf.get(..n).unwrap_or_default().chunks(4096).enumerate() {
            if block.iter().any(|&b| b != 0) {
                disk.write_all_at(block, at + (i * 4096) as u64)
                    .map_err(io_err("write the disk", out))?;
            }
        }
        at += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(buf.get_mut(n..).unwrap_or_default()) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `qemu-img convert` options for a container.
pub fn qemu_img_options(c: Container) -> &'static str {
    match c {
        Container::Raw => "",
        Container::Qcow2 => "compat=1.1,cluster_size=65536",
        Container::Vmdk => "subformat=streamOptimized",
        Container::Vhd => "subformat=fixed,force_size=on",
    }
}

/// Sets what `qemu-img` made up per run from `ids`: a VMDK's content ID (`CID=` in its
/// descriptor), a fixed VHD footer's time stamp (`epoch`) and unique ID (and its checksum).
pub fn normalise(
    container: Container,
    path: &Path,
    ids: &Ids,
    epoch: u64,
) -> Result<(), DiskError> {
    match container {
        Container::Raw | Container::Qcow2 => Ok(()),
        Container::Vmdk => normalise_vmdk(path, ids),
        Container::Vhd => normalise_vhd(path, ids, epoch),
    }
}

fn normalise_vmdk(path: &Path, ids: &Ids) -> Result<(), DiskError> {
    let err = |what| io_err(what, path);
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err("open the VMDK"))?;
    // The embedded descriptor of a stream-optimised VMDK starts at sector 1.
    let mut head = vec![0u8; 4096];
    let n = f.read_at(&mut head, 0).map_err(err("read the VMDK"))?;
    head.truncate(n);
    let cid = format!(
        "{:08x}",
        u32::from_le_bytes([
            ids.container[0],
            ids.container[1],
            ids.container[2],
            ids.container[3]
        ])
    );
    let Some(at) = find(&head, b"\nCID=") else {
        return Err(DiskError::Io {
            what: "find the content ID in",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "no CID= in the descriptor"),
        });
    };
    f.write_all_at(cid.as_bytes(), (at + 5) as u64)
        .map_err(err("write the VMDK"))?;
    f.sync_all().map_err(err("sync the VMDK"))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Seconds from 1970-01-01 to 2000-01-01, VHD's epoch.
const VHD_EPOCH: u64 = 946_684_800;

fn normalise_vhd(path: &Path, ids: &Ids, epoch: u64) -> Result<(), DiskError> {
    let err = |what| io_err(what, path);
    let f = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(err("open the VHD"))?;
    let len = f.metadata().map_err(err("read the VHD"))?.len();
    let at = len.checked_sub(512).ok_or_else(|| DiskError::Io {
        what: "read the VHD footer of",
        path: path.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidData, "shorter than a footer"),
    })?;
    let mut footer = [0u8; 512];
    f.read_exact_at(&mut footer, at)
        .map_err(err("read the VHD footer of"))?;
    if footer.get(..8) != Some(b"conectix") {
        return Err(DiskError::Io {
            what: "read the VHD footer of",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidData, "no conectix cookie"),
        });
    }
    let stamp = u32::try_from(epoch.saturating_sub(VHD_EPOCH)).unwrap_or(u32::MAX);
    footer[24..28].copy_from_slice(&stamp.to_be_bytes());
    footer[68..84].copy_from_slice(&ids.container);
    footer[64..68].fill(0);
    let sum: u32 = footer
        .iter()
        .map(|&b| u32::from(b))
        .fold(0, u32::wrapping_add);
    footer[64..68].copy_from_slice(&(!sum).to_be_bytes());
    f.write_all_at(&footer, at)
        .map_err(err("write the VHD footer of"))?;
    f.sync_all().map_err(err("sync the VHD"))
}

/// What [`make`] needs from the bake.
#[derive(Debug)]
pub(crate) struct Job<'a> {
    /// The bake.
    pub spec: &'a crate::bake::BakeSpec,
    /// The bake's work directory.
    pub work: &'a Path,
    /// The root filesystem image.
    pub root_fs: &'a Path,
    /// The output's final file name (a VMDK's descriptor names its file).
    pub out_name: &'a str,
    /// Where the finished disk goes.
    pub out: &'a Path,
    /// The image's name and version, for the unified kernel image's os-release.
    pub image: (&'a str, &'a str),
    /// Progress to count into.
    pub progress: &'a crate::progress::Progress,
}

/// The disk made by [`make`].
#[derive(Debug)]
pub(crate) struct Made {
    /// Its metadata.
    pub info: bootlace_contract::image::DiskInfo,
    /// The tools that made it.
    pub tools: Vec<&'static str>,
    /// `mkfs.vfat`'s version line.
    pub mkfs_vfat: String,
}

fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, DiskError> {
    std::fs::read(path).map_err(io_err(what, path))
}

fn sha256_hex(b: &[u8]) -> String {
    bootlace_contract::digest::hex(&Sha256::digest(b))
}

/// The sha256 and length of a file.
fn hash_file(path: &Path) -> Result<([u8; 32], u64), DiskError> {
    let mut f = File::open(path).map_err(io_err("read", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut len = 0u64;
    loop {
        let n = read_full(&mut f, &mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            return Ok((h.finalize().into(), len));
        }
        h.update(buf.get(..n).unwrap_or_default());
        len += n as u64;
    }
}

/// The kernel: the one given, else `/boot/vmlinuz-<release>`; it must be a bzImage of
/// `release`.
fn kernel(opts: &DiskOptions, release: &str) -> Result<(PathBuf, Vec<u8>), DiskError> {
    let path = opts
        .kernel
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/boot/vmlinuz-{release}")));
    let bytes = read_file(&path, "read the kernel")?;
    match crate::uki::kernel_release(&bytes) {
        None => Err(DiskError::NotAKernel(path)),
        Some(found) if found != release => Err(DiskError::KernelRelease {
            path,
            found,
            release: release.to_owned(),
        }),
        Some(_) => Ok((path, bytes)),
    }
}

fn stub(opts: &DiskOptions) -> Result<(PathBuf, Vec<u8>), DiskError> {
    let path = opts
        .stub
        .clone()
        .unwrap_or_else(|| PathBuf::from(crate::uki::DEFAULT_STUB));
    match std::fs::read(&path) {
        Ok(b) => Ok((path, b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(DiskError::NoStub {
            path,
            package: crate::uki::STUB_PACKAGE,
        }),
        Err(source) => Err(DiskError::Io {
            what: "read the EFI stub",
            path,
            source,
        }),
    }
}

/// The stage-1 initramfs that finds the root partition by `root`: the bake's init, the
/// block and filesystem modules of `modules`' release.
fn stage1(
    job: &Job<'_>,
    modules: &crate::initramfs::Modules,
    root: Guid,
) -> Result<Vec<u8>, DiskError> {
    use crate::bake::{bake, BakeSpec, Format};
    let out = job.work.join("stage1.img");
    let mut s1 = BakeSpec::new(Format::Initramfs, out.clone(), None, job.spec.init.clone());
    s1.stage1 = true;
    s1.stage1_root = Some(format!("PARTUUID={root}"));
    s1.modules = Some(crate::initramfs::Modules {
        root: modules.root.clone(),
        release: modules.release.clone(),
        extra: Vec::new(),
    });
    s1.config.log = job.spec.config.log;
    s1.name = Some("stage1".to_owned());
    s1.all_root = true;
    s1.mtime = job.spec.mtime;
    bake(&s1, &mut |_| {}).map_err(|e| DiskError::Stage1(Box::new(e)))?;
    read_file(&out, "read the stage-1 initramfs")
}

fn os_release(name: &str, version: &str) -> String {
    let clean = |s: &str| s.replace(['"', '\\', '\n', '$', '`'], "_");
    format!(
        "ID=bootlace\nNAME=\"{n}\"\nVERSION_ID=\"{v}\"\nPRETTY_NAME=\"{n} {v} (bootlace)\"\n",
        n = clean(name),
        v = clean(version)
    )
}

/// Makes the bootable disk of `job.root_fs` at `job.out`: the stage-1 initramfs, the unified
/// kernel image, the EFI system partition, the raw disk, then its container.
pub(crate) fn make(job: &Job<'_>) -> Result<Made, DiskError> {
    let opts = &job.spec.disk;
    if !matches!(opts.fs, FsType::Erofs | FsType::Ext4) {
        return Err(DiskError::RootFs(opts.fs));
    }
    let modules = job
        .spec
        .modules
        .as_ref()
        .ok_or(DiskError::NoKernelRelease)?;
    let (_, kernel) = kernel(opts, &modules.release)?;
    let (stub_path, stub) = stub(opts)?;
    job.progress.phase("disk (stage 1)");
    let (seed, root_len) = hash_file(job.root_fs)?;
    let ids = Ids::from_seed(&seed);
    let initrd = stage1(job, modules, ids.root)?;
    job.progress.phase("disk (unified kernel image)");
    let line = cmdline(ids.root, &opts.kernel_args);
    let mut line_nul = line.clone().into_bytes();
    line_nul.push(0);
    let osrel = os_release(job.image.0, job.image.1);
    let sections = [
        crate::uki::Section {
            name: ".osrel",
            data: osrel.as_bytes(),
        },
        crate::uki::Section {
            name: ".cmdline",
            data: &line_nul,
        },
        crate::uki::Section {
            name: ".linux",
            data: &kernel,
        },
        crate::uki::Section {
            name: ".initrd",
            data: &initrd,
        },
    ];
    let uki = crate::uki::build(&stub, &sections).map_err(|source| DiskError::Stub {
        path: stub_path.clone(),
        source,
    })?;
    job.progress.phase("disk (partitions)");
    let esp_bytes = esp_size(opts.esp_size, uki.len() as u64)?;
    let esp = job.work.join("esp");
    let uki_path = job.work.join("BOOTX64.EFI");
    std::fs::write(&uki_path, &uki).map_err(io_err("write", &uki_path))?;
    let mkfs_vfat = write_esp(&esp, esp_bytes, &uki_path, ids.fat_volume, job.spec.mtime)?;
    let _ = std::fs::remove_file(&uki_path);
    let layout = layout(&ids, esp_bytes, root_len, opts.data_size);
    let raw = job.work.join("disk.raw");
    write_raw(&layout, &esp, job.root_fs, &raw)?;
    let _ = std::fs::remove_file(&esp);
    let mut tools = vec!["mcopy"];
    if opts.container == Container::Raw {
        std::fs::rename(&raw, job.out).map_err(io_err("move the disk to", job.out))?;
    } else {
        job.progress
            .phase(format!("disk ({} with qemu-img)", opts.container));
        let named = job.work.join(job.out_name);
        let fs_opts = crate::fsimage::FsOptions {
            keep_owners: true,
            xattrs: true,
            skip_sync: false,
            write_back: false,
        };
        crate::fsimage::convert_image(
            &raw,
            opts.container.qemu_format(),
            qemu_img_options(opts.container),
            fs_opts,
            Some(job.progress),
            &named,
        )
        .map_err(|e| DiskError::Convert(opts.container, e))?;
        let _ = std::fs::remove_file(&raw);
        normalise(opts.container, &named, &ids, job.spec.mtime)?;
        std::fs::rename(&named, job.out).map_err(io_err("move the disk to", job.out))?;
        tools.push("qemu-img");
    }
    Ok(Made {
        info: bootlace_contract::image::DiskInfo {
            container: opts.container,
            firmware: bootlace_contract::image::Firmware::Uefi,
            virtual_size: layout.disk_bytes(),
            disk_guid: ids.disk.to_string(),
            partitions: layout.describe(opts.fs),
            cmdline: line,
            kernel: bootlace_contract::image::KernelInfo {
                release: modules.release.clone(),
                sha256: sha256_hex(&kernel),
            },
            stub_sha256: sha256_hex(&stub),
            stage1_sha256: sha256_hex(&initrd),
        },
        tools,
        mkfs_vfat,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_aligned_and_the_root_named() {
        let ids = Ids::from_seed(&[9; 32]);
        let l = layout(&ids, 64 * MIB, 5 * MIB + 1, Some(10 * MIB));
        let (head, _) = l.table.write().expect("table");
        let back = bootlace_contract::gpt::parse(&head, 512).expect("parse");
        assert_eq!(back, l.table);
        let root = l.partition(ROOT_NAME).expect("root");
        assert_eq!(root.type_guid, Guid::ROOT_X86_64);
        assert_eq!(root.unique, ids.root);
        assert_eq!(root.sectors() * 512, 6 * MIB);
        for p in &l.table.partitions {
            assert_eq!(p.first_lba * 512 % MIB, 0, "{p:?}");
        }
        assert_eq!(l.disk_bytes(), (1 + 64 + 6 + 10 + 1) * MIB);
        assert_eq!(layout(&ids, 64 * MIB, 1, None).table.partitions.len(), 2);
        assert_ne!(Ids::from_seed(&[8; 32]).root, ids.root);
        assert_eq!(Ids::from_seed(&[9; 32]), ids);
    }

    #[test]
    fn the_kernel_must_be_the_modules_release() {
        let d = tempfile::tempdir().expect("tmp");
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        k[0x500..0x50E].copy_from_slice(b"9.9.9-other #1");
        let path = d.path().join("vmlinuz");
        std::fs::write(&path, &k).expect("write");
        let opts = DiskOptions {
            kernel: Some(path.clone()),
            ..DiskOptions::default()
        };
        let err = kernel(&opts, "6.1.0-57-amd64").expect_err("mismatch");
        assert!(matches!(err, DiskError::KernelRelease { .. }), "{err}");
        assert!(err.to_string().contains("9.9.9-other"), "{err}");
        assert_eq!(kernel(&opts, "9.9.9-other").expect("match").1, k);
    }

    #[test]
    fn esp_sizes() {
        assert_eq!(esp_size(None, 10 * MIB).expect("default"), 64 * MIB);
        assert_eq!(esp_size(None, 40 * MIB).expect("big"), 88 * MIB);
        assert!(matches!(
            esp_size(Some(MIB), 10 * MIB),
            Err(DiskError::EspTooSmall { .. })
        ));
        assert_eq!(
            esp_size(Some(100 * MIB + 1), 10 * MIB).expect("asked"),
            101 * MIB
        );
    }

    #[test]
    fn an_esp_holds_the_boot_file_and_is_reproducible() {
        let d = tempfile::tempdir().expect("tmp");
        let uki: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let src = d.path().join("uki");
        std::fs::write(&src, &uki).expect("write");
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        write_esp(&a, 64 * MIB, &src, 0x1234_5678, 1_700_000_000).expect("esp a");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        write_esp(&b, 64 * MIB, &src, 0x1234_5678, 1_700_000_000).expect("esp b");
        let (ba, bb) = (std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
        assert!(ba == bb, "two ESPs of the same inputs differ");
        assert_eq!(read_boot_file(&a).expect("read back"), uki);
        let out = std::process::Command::new("fsck.vfat")
            .arg("-n")
            .arg(&a)
            .output()
            .expect("fsck.vfat");
        assert!(out.status.success(), "fsck.vfat: {out:?}");
        let err = write_esp(
            &d.path().join("c"),
            64 * MIB,
            &d.path().join("missing"),
            1,
            0,
        )
        .expect_err("missing input");
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
