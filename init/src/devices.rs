//! Finding the devices a boot needs — a block device by filesystem label, GPT partition
//! (unique GUID or name) or node, a virtio 9p share by mount tag — waiting a bounded time for them to appear, and saying what was there
//! when they do not. The bootstrap disk, a manifest's `disk` mounts and stage 1's root all find
//! their device here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bootlace_contract::gpt::Guid;

use crate::blkprobe::{self, Candidate, FsType};

/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(5);

/// Where the kernel lists block devices.
const SYS_CLASS_BLOCK: &str = "/sys/class/block";

/// Where the 9p transport lists its shares.
const NINEP_DRIVER: &str = "/sys/bus/virtio/drivers/9pnet_virtio";

/// The block device wanted.
#[derive(Debug, Clone, Copy)]
pub enum Want<'a> {
    /// The one whose filesystem has this label.
    Label(&'a str),
    /// The GPT partition with this unique GUID.
    PartUuid(&'a Guid),
    /// The GPT partition with this name.
    PartLabel(&'a str),
    /// This device node.
    Node(&'a Path),
}

/// A block device that was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Its node, e.g. `/dev/vdb`.
    pub dev: PathBuf,
    /// Its filesystem.
    pub fstype: FsType,
}

/// What the block devices held when the one wanted was not among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenBlocks(Vec<Candidate>);

impl fmt::Display for SeenBlocks {
    /// `/dev/vda (ext4, label "ROOT"), /dev/vdb (no known filesystem)`, or `no block devices`;
    /// a partition adds its GPT entry (`/dev/vdc2 (erofs, label none, partition 2 "root"
    /// <guid>)`), a disk its GPT (`/dev/vdc (GPT, 2 partitions)`, or
    /// `/dev/vdc (GPT: the GPT header is damaged …)`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no block devices");
        }
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} ({})", c.dev.display(), describe(c))?;
        }
        Ok(())
    }
}

/// What `c` holds, for [`SeenBlocks`]: its filesystem, its GPT entry, its GPT.
fn describe(c: &Candidate) -> String {
    let mut what = Vec::new();
    match &c.probed {
        Some(p) => what.push(format!(
            "{}, label {}",
            p.fstype.as_str(),
            p.label
                .as_deref()
                .map_or("none".to_owned(), |l| format!("{l:?}"))
        )),
        // A partitioned disk usually holds no filesystem itself: its table says more.
        None if c.gpt.is_some() => {}
        None => what.push("no known filesystem".to_owned()),
    }
    if let Some(part) = &c.part {
        what.push(format!(
            "partition {} {:?} {}",
            part.number, part.name, part.unique
        ));
    }
    match &c.gpt {
        Some(Ok(t)) => what.push(format!("GPT, {} partitions", t.partitions.len())),
        Some(Err(e)) => what.push(format!("GPT: {e}")),
        None => {}
    }
    what.join(", ")
}

/// Looks once through the block devices for the one wanted.
pub fn find_block(want: Want<'_>) -> Result<Block, SeenBlocks> {
    let candidates = blkprobe::scan(Path::new(SYS_CLASS_BLOCK), Path::new("/dev"));
    pick(&candidates, want).ok_or(SeenBlocks(candidates))
}

/// The first of `candidates` that is the device wanted and holds a known filesystem.
fn pick(candidates: &[Candidate], want: Want<'_>) -> Option<Block> {
    candidates.iter().find_map(|c| {
        let p = c.probed.as_ref()?;
        let matches = match want {
            Want::Label(l) => p.label.as_deref() == Some(l),
            Want::PartUuid(g) => c.part.as_ref().is_some_and(|part| part.unique == *g),
            Want::PartLabel(n) => c.part.as_ref().is_some_and(|part| part.name == n),
            Want::Node(d) => c.dev == d,
        };
        matches.then(|| Block {
            dev: c.dev.clone(),
            fstype: p.fstype,
        })
    })
}

/// The mount tags of the virtio 9p shares present, sorted.
pub fn ninep_tags() -> Vec<String> {
    ninep_tags_in(Path::new(NINEP_DRIVER))
}

/// The mount tags of the 9p shares bound to the driver directory `driver_dir`.
pub fn ninep_tags_in(driver_dir: &Path) -> Vec<String> {
    let mut tags: Vec<String> = std::fs::read_dir(driver_dir)
        .map(|d| {
            d.filter_map(|e| {
                let e = e.ok()?;
                let tag = std::fs::read(e.path().join("mount_tag")).ok()?;
                let tag = String::from_utf8_lossy(&tag);
                Some(tag.trim_end_matches(['\0', '\n']).to_owned())
            })
            .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags
}

/// What the 9p shares were when the one wanted was not among them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeenShares(Vec<String>);

impl fmt::Display for SeenShares {
    /// `9p tags ["a", "b"]`, or `no 9p shares`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("no 9p shares")
        } else {
            write!(f, "9p tags {:?}", self.0)
        }
    }
}

/// Looks once for the 9p share tagged `tag`.
pub fn find_share(tag: &str) -> Result<(), SeenShares> {
    let tags = ninep_tags();
    if tags.iter().any(|t| t == tag) {
        Ok(())
    } else {
        Err(SeenShares(tags))
    }
}

/// Calls `look` until it succeeds or `wait` has passed (devices appear shortly after their
/// driver loads); the last failure says what was seen.
pub fn wait_for<T, E>(wait: Duration, mut look: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = Instant::now() + wait;
    loop {
        match look() {
            Ok(found) => return Ok(found),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blkprobe::{PartInfo, Probed};
    use bootlace_contract::gpt;

    #[test]
    fn what_was_seen_reads_well() {
        assert_eq!(SeenBlocks::default().to_string(), "no block devices");
        let seen = SeenBlocks(vec![
            Candidate {
                name: "vda".into(),
                dev: "/dev/vda".into(),
                probed: Some(Probed {
                    fstype: FsType::Ext4,
                    label: Some("NOTBOOT".into()),
                }),
                part: None,
                gpt: None,
            },
            Candidate {
                name: "vdb".into(),
                dev: "/dev/vdb".into(),
                probed: None,
                part: None,
                gpt: None,
            },
            Candidate {
                name: "vdc".into(),
                dev: "/dev/vdc".into(),
                probed: Some(Probed {
                    fstype: FsType::Squashfs,
                    label: None,
                }),
                part: None,
                gpt: None,
            },
        ]);
        assert_eq!(
            seen.to_string(),
            "/dev/vda (ext4, label \"NOTBOOT\"), /dev/vdb (no known filesystem), \
             /dev/vdc (squashfs, label none)"
        );
        assert_eq!(SeenShares::default().to_string(), "no 9p shares");
        assert_eq!(SeenShares(vec!["a".into()]).to_string(), "9p tags [\"a\"]");
    }

    const ROOT_GUID: &str = "5c1b6f2e-0a3d-4e8f-9b7a-1d2c3e4f5a6b";

    /// A GPT disk `vda` (no filesystem of its own) with partition 1 "esp" (no known
    /// filesystem) and partition 2 "root" (erofs), and a plain disk `vdb` (ext4, label "root").
    fn gpt_disk() -> Vec<Candidate> {
        let guid = |s: &str| s.parse::<Guid>().expect("guid");
        let part = |number, name: &str, unique| {
            Some(PartInfo {
                number,
                unique,
                name: name.into(),
                type_guid: Guid::LINUX_DATA,
            })
        };
        let table = gpt::Table {
            disk_guid: Guid::from_hash([9; 16]),
            sector_size: 512,
            disk_sectors: 8192,
            partitions: Vec::new(),
        };
        let fs = |fstype, label: Option<&str>| {
            Some(Probed {
                fstype,
                label: label.map(Into::into),
            })
        };
        vec![
            Candidate {
                name: "vda".into(),
                dev: "/dev/vda".into(),
                probed: None,
                part: None,
                gpt: Some(Ok(table)),
            },
            Candidate {
                name: "vda1".into(),
                dev: "/dev/vda1".into(),
                probed: None,
                part: part(1, "esp", guid("c0ffee00-0000-4000-8000-000000000001")),
                gpt: None,
            },
            Candidate {
                name: "vda2".into(),
                dev: "/dev/vda2".into(),
                probed: fs(FsType::Erofs, Some("bootlace-root")),
                part: part(2, "root", guid(ROOT_GUID)),
                gpt: None,
            },
            Candidate {
                name: "vdb".into(),
                dev: "/dev/vdb".into(),
                probed: fs(FsType::Ext4, Some("root")),
                part: None,
                gpt: None,
            },
        ]
    }

    #[test]
    fn partitions_are_found_by_unique_guid_and_name() {
        let c = gpt_disk();
        let erofs = |dev: &str| {
            Some(Block {
                dev: dev.into(),
                fstype: FsType::Erofs,
            })
        };
        let root: Guid = ROOT_GUID.to_uppercase().parse().expect("guid");
        assert_eq!(pick(&c, Want::PartUuid(&root)), erofs("/dev/vda2"));
        assert_eq!(pick(&c, Want::PartLabel("root")), erofs("/dev/vda2"));
        assert_eq!(pick(&c, Want::Label("bootlace-root")), erofs("/dev/vda2"));
        assert_eq!(
            pick(&c, Want::Node(Path::new("/dev/vda2"))),
            erofs("/dev/vda2")
        );
        // PARTLABEL= is a partition's name, never a filesystem label (vdb's is "root").
        assert_eq!(pick(&c[3..], Want::PartLabel("root")), None);
        assert_eq!(
            pick(&c, Want::PartLabel("Root")),
            None,
            "names are case-sensitive"
        );
        assert_eq!(pick(&c, Want::PartUuid(&Guid::from_hash([2; 16]))), None);
        // The partition is there but holds no known filesystem: not found.
        let esp: Guid = "c0ffee00-0000-4000-8000-000000000001"
            .parse()
            .expect("guid");
        assert_eq!(pick(&c, Want::PartUuid(&esp)), None);
        assert_eq!(pick(&c, Want::PartLabel("esp")), None);
        // ... and what was seen says why.
        let seen = SeenBlocks(c).to_string();
        assert!(
            seen.contains(
                "/dev/vda1 (no known filesystem, partition 1 \"esp\" \
                 c0ffee00-0000-4000-8000-000000000001)"
            ),
            "{seen}"
        );
    }

    #[test]
    fn what_was_seen_names_partitions_and_damaged_tables() {
        let mut c = gpt_disk();
        assert_eq!(
            SeenBlocks(c.clone()).to_string(),
            format!(
                "/dev/vda (GPT, 0 partitions), \
                 /dev/vda1 (no known filesystem, partition 1 \"esp\" \
                 c0ffee00-0000-4000-8000-000000000001), \
                 /dev/vda2 (erofs, label \"bootlace-root\", partition 2 \"root\" {ROOT_GUID}), \
                 /dev/vdb (ext4, label \"root\")"
            )
        );
        // The kernel shows no partitions of a disk whose table is damaged: the disk says why.
        c.truncate(1);
        c[0].gpt = Some(Err(gpt::ParseError::HeaderCrc {
            got: 0x1234_5678,
            want: 0x9abc_def0,
        }));
        assert_eq!(
            SeenBlocks(c.clone()).to_string(),
            "/dev/vda (GPT: the GPT header is damaged (CRC32 0x12345678, the header says \
             0x9abcdef0))"
        );
        // A filesystem on the whole disk comes first (an iso9660 hybrid, say).
        c[0].probed = Some(Probed {
            fstype: FsType::Iso9660,
            label: None,
        });
        assert!(SeenBlocks(c)
            .to_string()
            .starts_with("/dev/vda (iso9660, label none, GPT: the GPT header is damaged"),);
    }

    #[test]
    fn waits_a_bounded_time() {
        let mut n = 0;
        let r: Result<(), u32> = wait_for(Duration::from_millis(30), || {
            n += 1;
            Err(n)
        });
        assert!(matches!(r, Err(k) if k >= 2), "{r:?}");
        let mut n = 0;
        let r = wait_for(Duration::from_secs(5), || {
            n += 1;
            if n == 3 {
                Ok(n)
            } else {
                Err(())
            }
        });
        assert_eq!(r, Ok(3));
    }

    #[test]
    fn ninep_tags_are_read_from_sysfs() {
        let d = tempfile::tempdir().expect("tempdir");
        for (dev, tag) in [("virtio3", "b\0"), ("virtio1", "a\n")] {
            std::fs::create_dir(d.path().join(dev)).expect("mkdir");
            std::fs::write(d.path().join(dev).join("mount_tag"), tag).expect("write");
        }
        std::fs::create_dir(d.path().join("module")).expect("mkdir");
        assert_eq!(ninep_tags_in(d.path()), ["a", "b"]);
        assert!(ninep_tags_in(&d.path().join("absent")).is_empty());
    }
}
