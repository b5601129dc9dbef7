//! Finding the devices a boot needs — a block device by filesystem label or by node, a virtio
//! 9p share by mount tag — waiting a bounded time for them to appear, and saying what was there
//! when they do not. The bootstrap disk, a manifest's `disk` mounts and stage 1's root all find
//! their device here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
    /// `/dev/vda (ext4, label "ROOT"), /dev/vdb (no known filesystem)`, or `no block devices`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("no block devices");
        }
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match &c.probed {
                Some(p) => write!(
                    f,
                    "{} ({}, label {})",
                    c.dev.display(),
                    p.fstype.as_str(),
                    p.label
                        .as_deref()
                        .map_or("none".to_owned(), |l| format!("{l:?}"))
                )?,
                None => write!(f, "{} (no known filesystem)", c.dev.display())?,
            }
        }
        Ok(())
    }
}

/// Looks once through the block devices for the one wanted.
pub fn find_block(want: Want<'_>) -> Result<Block, SeenBlocks> {
    let candidates = blkprobe::scan(Path::new(SYS_CLASS_BLOCK), Path::new("/dev"));
    let hit = candidates.iter().find_map(|c| {
        let p = c.probed.as_ref()?;
        let matches = match want {
            Want::Label(l) => p.label.as_deref() == Some(l),
            Want::Node(d) => c.dev == d,
        };
        matches.then(|| Block {
            dev: c.dev.clone(),
            fstype: p.fstype,
        })
    });
    hit.ok_or(SeenBlocks(candidates))
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
    use crate::blkprobe::Probed;

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
            },
            Candidate {
                name: "vdb".into(),
                dev: "/dev/vdb".into(),
                probed: None,
            },
            Candidate {
                name: "vdc".into(),
                dev: "/dev/vdc".into(),
                probed: Some(Probed {
                    fstype: FsType::Squashfs,
                    label: None,
                }),
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
