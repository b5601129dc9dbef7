//! Block device identification without blkid: the filesystem type and label of a device,
//! read from its superblocks, and a partition's GPT entry (unique GUID, name), read from its
//! disk's partition table. [`probe`] is pure and panic-free on any input; [`scan`] walks
//! `/sys/class/block` and probes each device node once.
//!
//! Recognised: ext2/3/4, erofs, vfat (FAT12/16/32), iso9660 and squashfs.

use std::io::Read;
use std::path::{Path, PathBuf};

/// How much of the start of a device [`probe`] needs (iso9660's primary volume descriptor
/// is at 32768).
pub const PROBE_BYTES: usize = 64 * 1024;

pub use bootlace_contract::fs::FsType;
use bootlace_contract::gpt::{self, Guid};

/// What [`probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probed {
    /// The filesystem type.
    pub fstype: FsType,
    /// The volume label, trailing NULs and spaces trimmed; `None` when empty, not UTF-8,
    /// FAT's `NO NAME`, or the type has no label (squashfs).
    pub label: Option<String>,
}

fn bytes(head: &[u8], at: usize, len: usize) -> Option<&[u8]> {
    head.get(at..at.checked_add(len)?)
}

fn le16(head: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes(head, at, 2)?.try_into().ok()?))
}

fn le32(head: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes(head, at, 4)?.try_into().ok()?))
}

fn label(head: &[u8], at: usize, len: usize) -> Option<String> {
    let raw = bytes(head, at, len)?;
    let end = raw
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |i| i + 1);
    let text = std::str::from_utf8(raw.get(..end)?).ok()?;
    (!text.is_empty()).then(|| text.to_owned())
}

fn found(fstype: FsType, label: Option<String>) -> Option<Probed> {
    Some(Probed { fstype, label })
}

/// Identifies the filesystem whose first bytes are `head` ([`PROBE_BYTES`] is enough for
/// every type). `None` when no known superblock is found.
pub fn probe(head: &[u8]) -> Option<Probed> {
    if le32(head, 0) == Some(0x7371_7368) {
        return found(FsType::Squashfs, None);
    }
    if le16(head, 1024 + 56) == Some(0xEF53) {
        return found(FsType::Ext4, label(head, 1024 + 120, 16));
    }
    if le32(head, 1024) == Some(0xE0F5_E1E2) {
        // struct erofs_super_block: uuid[16] at 48, volume_name[16] at 64.
        return found(FsType::Erofs, label(head, 1024 + 64, 16));
    }
    if bytes(head, 32768, 6) == Some(b"\x01CD001") {
        return found(FsType::Iso9660, label(head, 32768 + 40, 32));
    }
    if bytes(head, 510, 2) == Some(&[0x55, 0xAA]) {
        let fat_label = if bytes(head, 0x52, 5) == Some(b"FAT32") {
            0x47
        } else if bytes(head, 0x36, 3) == Some(b"FAT") {
            0x2B
        } else {
            return None;
        };
        let name = label(head, fat_label, 11).filter(|l| l != "NO NAME");
        return found(FsType::Vfat, name);
    }
    None
}

/// Reads up to [`PROBE_BYTES`] from the start of `path` (fewer from a short device).
fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(PROBE_BYTES);
    std::fs::File::open(path)?
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Reads up to [`PROBE_BYTES`] from the start of `path` (a short device is fine) and
/// [`probe`]s them.
pub fn probe_device(path: &Path) -> std::io::Result<Option<Probed>> {
    Ok(probe(&read_head(path)?))
}

/// A partition's entry in its disk's GUID partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartInfo {
    /// Its number (the kernel's `partition` file, the 1-based index of its entry).
    pub number: u32,
    /// Its unique GUID (`PARTUUID=`).
    pub unique: Guid,
    /// Its name (`PARTLABEL=`).
    pub name: String,
    /// Its type.
    pub type_guid: Guid,
}

/// A block device seen by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The kernel name, e.g. `vdb`.
    pub name: String,
    /// The device node, e.g. `/dev/vdb`.
    pub dev: PathBuf,
    /// What is on it; `None` when unrecognised or unreadable.
    pub probed: Option<Probed>,
    /// For a partition of a disk with a GUID partition table: its entry there.
    pub part: Option<PartInfo>,
    /// For a whole disk: its GUID partition table, or why the one it has cannot be used
    /// (damaged); `None` for a partition, a disk without one, or an unreadable device.
    pub gpt: Option<Result<gpt::Table, gpt::ParseError>>,
}

/// Where a partition sits: its disk's kernel name and its number, from sysfs (`None` for a
/// whole disk, or when sysfs does not say).
fn partition_of(sys_dir: &Path) -> Option<(String, u32)> {
    let number = std::fs::read_to_string(sys_dir.join("partition")).ok()?;
    let number = number.trim().parse::<u32>().ok()?;
    // /sys/class/block/vda2 -> /sys/devices/.../block/vda/vda2
    let real = std::fs::canonicalize(sys_dir).ok()?;
    let disk = real.parent()?.file_name()?.to_str()?.to_owned();
    Some((disk, number))
}

/// The logical sector size of the whole disk `sys_dir` (512 when sysfs does not say).
fn sector_size(sys_dir: &Path) -> u32 {
    std::fs::read_to_string(sys_dir.join("queue/logical_block_size"))
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|s| s.is_power_of_two() && *s >= 512)
        .unwrap_or(512)
}

/// The GUID partition table in `head`, the first bytes of a whole disk: `None` when it has
/// none (no header), the reason when the one it has cannot be used.
fn disk_gpt(head: &[u8], sector_size: u32) -> Option<Result<gpt::Table, gpt::ParseError>> {
    match gpt::parse(head, sector_size) {
        Err(gpt::ParseError::NoHeader) => None,
        other => Some(other),
    }
}

/// The names in `sys_class_block` worth probing, sorted: not loop, ram or zram, and not of
/// size 0 sectors.
fn block_names(sys_class_block: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(sys_class_block) {
        Ok(entries) => entries,
        Err(e) => {
            log::debug!("cannot list {}: {e}", sys_class_block.display());
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !["loop", "ram", "zram"].iter().any(|p| n.starts_with(p)))
        .filter(|n| {
            let size = std::fs::read_to_string(sys_class_block.join(n).join("size"));
            size.ok().and_then(|s| s.trim().parse::<u64>().ok()) != Some(0)
        })
        .collect();
    names.sort();
    names
}

/// Lists the block devices in `sys_class_block` (normally `/sys/class/block`), sorted by
/// name, and probes `dev_dir/<name>` for each: its filesystem, for a whole disk its GUID
/// partition table, and for a partition of such a disk its entry there. Loop, ram and zram
/// devices and devices whose `size` is 0 sectors are skipped. An unreadable directory gives an
/// empty list; unreadable or odd sysfs files give a candidate without partition details.
pub fn scan(sys_class_block: &Path, dev_dir: &Path) -> Vec<Candidate> {
    let (mut candidates, places): (Vec<Candidate>, Vec<Option<(String, u32)>>) =
        block_names(sys_class_block)
            .into_iter()
            .map(|name| look_at(sys_class_block, dev_dir, name))
            .unzip();
    // Partitions take their entry from their disk's table, which the pass above read.
    let infos: Vec<Option<PartInfo>> = places
        .iter()
        .map(|place| {
            let (disk, number) = place.as_ref()?;
            part_info(&candidates, disk, *number)
        })
        .collect();
    for (c, info) in candidates.iter_mut().zip(infos) {
        c.part = info;
    }
    candidates
}

/// The device `name`, its first bytes read once: its filesystem and, for a whole disk, its
/// GPT; for a partition also its disk's name and its number (its entry is filled in later).
fn look_at(
    sys_class_block: &Path,
    dev_dir: &Path,
    name: String,
) -> (Candidate, Option<(String, u32)>) {
    let dev = dev_dir.join(&name);
    let sys_dir = sys_class_block.join(&name);
    let place = partition_of(&sys_dir);
    let head = read_head(&dev)
        .map_err(|e| log::debug!("cannot probe {}: {e}", dev.display()))
        .ok();
    let probed = head.as_deref().and_then(probe);
    let gpt = match (&place, &head) {
        (None, Some(head)) => disk_gpt(head, sector_size(&sys_dir)),
        _ => None,
    };
    let candidate = Candidate {
        name,
        dev,
        probed,
        part: None,
        gpt,
    };
    (candidate, place)
}

/// Partition `number` of the disk named `disk` among `candidates`, from its GPT.
fn part_info(candidates: &[Candidate], disk: &str, number: u32) -> Option<PartInfo> {
    let table = candidates
        .iter()
        .find(|c| c.name == disk)?
        .gpt
        .as_ref()?
        .as_ref()
        .ok()?;
    let p = table.partitions.iter().find(|p| p.number == number)?;
    Some(PartInfo {
        number,
        unique: p.unique,
        name: p.name.clone(),
        type_guid: p.type_guid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use FsType::{Erofs, Ext4, Iso9660, Squashfs, Vfat};

    fn run(cmd: &str, args: &[&str]) {
        let out = Command::new(cmd).args(args).output().expect(cmd);
        assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
    }

    fn label_of(p: &Probed) -> Option<&str> {
        p.label.as_deref()
    }

    /// Images made by the real tools: (name, script with `$IMG` and `$SRC`, type, label).
    const CASES: &[(&str, &str, FsType, Option<&str>)] = &[
        (
            "e4",
            r#"mke2fs -q -t ext4 -L BOOTLACE "$IMG" 4M"#,
            Ext4,
            Some("BOOTLACE"),
        ),
        (
            "e16",
            r#"mke2fs -q -t ext4 -L ABCDEFGHIJKLMNOP "$IMG" 4M"#,
            Ext4,
            Some("ABCDEFGHIJKLMNOP"),
        ),
        ("e2", r#"mke2fs -q -t ext2 "$IMG" 4M"#, Ext4, None),
        // mkfs.erofs 1.5 has no -L: the label case patches volume_name below.
        ("ero", r#"mkfs.erofs --quiet "$IMG" "$SRC""#, Erofs, None),
        (
            "fat",
            r#"mkfs.vfat -n BOOTLACE -C "$IMG" 2048"#,
            Vfat,
            Some("BOOTLACE"),
        ),
        // dosfstools 4.2 keeps lower case (with a warning).
        (
            "fatlc",
            r#"mkfs.vfat -n boot -C "$IMG" 2048"#,
            Vfat,
            Some("boot"),
        ),
        ("fat0", r#"mkfs.vfat -C "$IMG" 2048"#, Vfat, None),
        (
            "f32",
            r#"truncate -s 40M "$IMG" && mkfs.vfat -F 32 -n BOOTLACE "$IMG""#,
            Vfat,
            Some("BOOTLACE"),
        ),
        (
            "iso",
            r#"xorriso -as mkisofs -quiet -V BOOTLACE -o "$IMG" "$SRC""#,
            Iso9660,
            Some("BOOTLACE"),
        ),
        (
            "sq",
            r#"mksquashfs "$SRC" "$IMG" -quiet -noappend"#,
            Squashfs,
            None,
        ),
    ];

    #[test]
    fn real_filesystems() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("hello"), "hi\n").unwrap();
        for &(name, script, fstype, label) in CASES {
            let img = tmp.path().join(name);
            let out = Command::new("sh")
                .args(["-c", script])
                .env("IMG", &img)
                .env("SRC", &src)
                .output()
                .expect("sh");
            assert!(out.status.success(), "{script}: {out:?}");
            let p = probe_device(&img).unwrap().expect(name);
            assert_eq!((p.fstype, label_of(&p)), (fstype, label), "{name}");
        }

        // erofs label: volume_name is at 64 in the superblock, right after the uuid at 48
        // (checked with `mkfs.erofs -U`).
        let mut head = std::fs::read(tmp.path().join("ero")).unwrap();
        head[1024 + 48..1024 + 64].copy_from_slice(&[0xAB; 16]);
        head[1024 + 64..1024 + 72].copy_from_slice(b"BOOTLACE");
        let p = probe(&head).unwrap();
        assert_eq!((p.fstype, label_of(&p)), (Erofs, Some("BOOTLACE")));
        head[1024 + 64] = 0xFF;
        assert_eq!(probe(&head).unwrap().label, None, "non-UTF-8 label");
    }

    #[test]
    fn mount_type_names() {
        let all = [Ext4, Erofs, Vfat, Iso9660, Squashfs];
        let names: Vec<_> = all.iter().map(|t| t.as_str()).collect();
        assert_eq!(names, ["ext4", "erofs", "vfat", "iso9660", "squashfs"]);
    }

    #[test]
    fn garbage_is_none() {
        let noise: Vec<u8> = (0..PROBE_BYTES as u32)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        for head in [
            &[][..],
            &[0; 100],
            &[0; PROBE_BYTES],
            &noise,
            &[0x68, 0x73, 0x71],
        ] {
            assert_eq!(probe(head), None);
        }
        // A boot sector signature alone is not FAT.
        let mut mbr = vec![0; 512];
        mbr[510..].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(probe(&mbr), None);
        // A magic with the label cut off: the type, no label.
        let mut ext = vec![0; 1024 + 58];
        ext[1080..].copy_from_slice(&[0x53, 0xEF]);
        let p = probe(&ext).unwrap();
        assert_eq!((p.fstype, p.label), (Ext4, None));
    }

    #[test]
    fn scan_fake_sys() {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, dev) = (tmp.path().join("sys"), tmp.path().join("dev"));
        std::fs::create_dir(&dev).unwrap();
        for (name, size) in [
            ("vdb", "8192\n"),
            ("vda", "8\n"),
            ("loop0", "8192\n"),
            ("vdc", "0\n"),
        ] {
            std::fs::create_dir_all(sys.join(name)).unwrap();
            std::fs::write(sys.join(name).join("size"), size).unwrap();
        }
        let vdb = dev.join("vdb");
        run("mke2fs", &["-q", "-L", "root", vdb.to_str().unwrap(), "4M"]);
        for skipped in ["loop0", "vdc"] {
            std::fs::copy(&vdb, dev.join(skipped)).unwrap();
        }
        // vda has no device node: probed None.
        let got = scan(&sys, &dev);
        let want = vec![
            Candidate {
                name: "vda".into(),
                dev: dev.join("vda"),
                probed: None,
                part: None,
                gpt: None,
            },
            Candidate {
                name: "vdb".into(),
                dev: vdb,
                probed: Some(Probed {
                    fstype: Ext4,
                    label: Some("root".into()),
                }),
                part: None,
                gpt: None,
            },
        ];
        assert_eq!(got, want);
        assert!(scan(&tmp.path().join("missing"), &dev).is_empty());
    }

    /// A GPT disk of `sectors` sectors of `sector_size` bytes: partition 1 "esp", partition 2
    /// "root" (unique GUIDs from the hash bytes 1 and 2).
    fn gpt_table(sector_size: u32, sectors: u64) -> gpt::Table {
        let first = gpt::Table::first_usable(sector_size);
        let last = gpt::Table::last_usable(sector_size, sectors);
        let part = |number: u32, type_guid, name: &str, first_lba, last_lba| gpt::Partition {
            number,
            type_guid,
            unique: Guid::from_hash([number as u8; 16]),
            first_lba,
            last_lba,
            attributes: 0,
            name: name.into(),
        };
        gpt::Table {
            disk_guid: Guid::from_hash([9; 16]),
            sector_size,
            disk_sectors: sectors,
            partitions: vec![
                part(1, Guid::ESP, "esp", first, first + 15),
                part(2, Guid::ROOT_X86_64, "root", first + 16, last),
            ],
        }
    }

    /// Writes the disk image `path` holding `table` (its head at 0, its tail at the end).
    fn write_disk(path: &Path, table: &gpt::Table) -> Vec<u8> {
        let (head, tail) = table.write().unwrap();
        let size = table.disk_sectors as usize * table.sector_size as usize;
        let mut disk = vec![0u8; size];
        disk[..head.len()].copy_from_slice(&head);
        disk[size - tail.len()..].copy_from_slice(&tail);
        std::fs::write(path, &disk).unwrap();
        head
    }

    /// A fake sysfs block device: `devices/<path>` with `size` (and `partition` when given),
    /// linked from `class/<name>` as the kernel does.
    fn sys_dev(sys: &Path, path: &str, partition: Option<&str>) -> PathBuf {
        let real = sys.join("devices").join(path);
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("size"), "8192\n").unwrap();
        if let Some(n) = partition {
            std::fs::write(real.join("partition"), n).unwrap();
        }
        let name = Path::new(path).file_name().unwrap();
        std::os::unix::fs::symlink(&real, sys.join("class").join(name)).unwrap();
        real
    }

    #[test]
    fn scan_reads_gpt_partitions() {
        let tmp = tempfile::tempdir().unwrap();
        let (sys, dev) = (tmp.path().join("sys"), tmp.path().join("dev"));
        std::fs::create_dir_all(sys.join("class")).unwrap();
        std::fs::create_dir(&dev).unwrap();
        // vda: 512-byte sectors (no queue/logical_block_size: the default), partitions 1
        // (no device node) and 2 (ext4).
        let t512 = gpt_table(512, 8192);
        write_disk(&dev.join("vda"), &t512);
        sys_dev(&sys, "vda", None);
        sys_dev(&sys, "vda/vda1", Some("1\n"));
        sys_dev(&sys, "vda/vda2", Some("2\n"));
        let vda2 = dev.join("vda2");
        run(
            "mke2fs",
            &["-q", "-L", "rootfs", vda2.to_str().unwrap(), "1M"],
        );
        // vdb: 4096-byte sectors; its partition file is garbage: no entry, no panic.
        let t4k = gpt_table(4096, 1024);
        write_disk(&dev.join("vdb"), &t4k);
        let vdb = sys_dev(&sys, "vdb", None);
        std::fs::create_dir(vdb.join("queue")).unwrap();
        std::fs::write(vdb.join("queue/logical_block_size"), "4096\n").unwrap();
        sys_dev(&sys, "vdb/vdb1", Some("1\n"));
        sys_dev(&sys, "vdb/vdb2", Some("two\n"));
        // vdc: a damaged primary header; its partition has no entry.
        let mut head = write_disk(&dev.join("vdc"), &t512);
        head[512 + 40] ^= 1;
        let mut disk = std::fs::read(dev.join("vdc")).unwrap();
        disk[..head.len()].copy_from_slice(&head);
        std::fs::write(dev.join("vdc"), &disk).unwrap();
        sys_dev(&sys, "vdc", None);
        sys_dev(&sys, "vdc/vdc1", Some("1\n"));

        let got = scan(&sys.join("class"), &dev);
        let names: Vec<&str> = got.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["vda", "vda1", "vda2", "vdb", "vdb1", "vdb2", "vdc", "vdc1"]
        );
        let by = |n: &str| got.iter().find(|c| c.name == n).unwrap();
        assert_eq!(by("vda").gpt, Some(Ok(t512.clone())));
        assert_eq!(by("vda").probed, None, "a protective MBR is no filesystem");
        assert_eq!(
            by("vda1").part,
            Some(PartInfo {
                number: 1,
                unique: Guid::from_hash([1; 16]),
                name: "esp".into(),
                type_guid: Guid::ESP,
            })
        );
        assert_eq!(by("vda1").probed, None, "no device node");
        let vda2 = by("vda2");
        assert_eq!(vda2.part.as_ref().map(|p| p.name.as_str()), Some("root"));
        assert_eq!(
            vda2.part.as_ref().map(|p| p.unique),
            Some(Guid::from_hash([2; 16]))
        );
        assert_eq!(vda2.probed.as_ref().map(|p| p.fstype), Some(Ext4));
        assert_eq!(vda2.gpt, None, "a partition's own table is not read");

        assert_eq!(by("vdb").gpt, Some(Ok(t4k)));
        let vdb1 = by("vdb1").part.as_ref().unwrap();
        assert_eq!((vdb1.number, vdb1.name.as_str()), (1, "esp"));
        assert_eq!(by("vdb2").part, None);

        assert!(
            matches!(by("vdc").gpt, Some(Err(gpt::ParseError::HeaderCrc { .. }))),
            "{:?}",
            by("vdc").gpt
        );
        assert_eq!(by("vdc1").part, None);
    }
}
