//! Block device identification without blkid: the filesystem type and label of a device,
//! read from its superblocks. [`probe`] is pure and panic-free on any input; [`scan`] walks
//! `/sys/class/block` and probes each device node.
//!
//! Recognised: ext2/3/4, erofs, vfat (FAT12/16/32), iso9660 and squashfs.

use std::io::Read;
use std::path::{Path, PathBuf};

/// How much of the start of a device [`probe`] needs (iso9660's primary volume descriptor
/// is at 32768).
pub const PROBE_BYTES: usize = 64 * 1024;

pub use bootlace_contract::fs::FsType;

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

/// Reads up to [`PROBE_BYTES`] from the start of `path` (a short device is fine) and
/// [`probe`]s them.
pub fn probe_device(path: &Path) -> std::io::Result<Option<Probed>> {
    let mut head = Vec::with_capacity(PROBE_BYTES);
    std::fs::File::open(path)?
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(probe(&head))
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
}

/// Lists the block devices in `sys_class_block` (normally `/sys/class/block`), sorted by
/// name, and probes `dev_dir/<name>` for each. Loop, ram and zram devices and devices whose
/// `size` is 0 sectors are skipped. An unreadable directory gives an empty list.
pub fn scan(sys_class_block: &Path, dev_dir: &Path) -> Vec<Candidate> {
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
        .into_iter()
        .map(|name| {
            let dev = dev_dir.join(&name);
            let probed = probe_device(&dev).unwrap_or_else(|e| {
                log::debug!("cannot probe {}: {e}", dev.display());
                None
            });
            Candidate { name, dev, probed }
        })
        .collect()
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
            },
            Candidate {
                name: "vdb".into(),
                dev: vdb,
                probed: Some(Probed {
                    fstype: Ext4,
                    label: Some("root".into()),
                }),
            },
        ];
        assert_eq!(got, want);
        assert!(scan(&tmp.path().join("missing"), &dev).is_empty());
    }
}
