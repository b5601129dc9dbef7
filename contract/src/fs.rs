//! The filesystems bootlace finds, mounts and makes: their kernel names and the labels they
//! can carry.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A filesystem type bootlace recognises on a block device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    /// ext2, ext3 or ext4: they share the superblock and the ext4 driver mounts all three.
    Ext4,
    /// EROFS.
    Erofs,
    /// FAT12, FAT16 or FAT32.
    Vfat,
    /// ISO 9660.
    Iso9660,
    /// squashfs (which has no label).
    Squashfs,
}

impl FsType {
    /// Every type.
    pub const ALL: [FsType; 5] = [
        FsType::Ext4,
        FsType::Erofs,
        FsType::Vfat,
        FsType::Iso9660,
        FsType::Squashfs,
    ];

    /// The kernel's name for the type, as given to mount(2).
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Erofs => "erofs",
            FsType::Vfat => "vfat",
            FsType::Iso9660 => "iso9660",
            FsType::Squashfs => "squashfs",
        }
    }

    /// The longest label the filesystem stores, in bytes (0: it has none). ext4 keeps 16
    /// bytes, erofs 16 with a NUL, FAT 11, an ISO 9660 volume id 32.
    pub fn max_label_bytes(self) -> usize {
        match self {
            FsType::Ext4 => 16,
            FsType::Erofs => 15,
            FsType::Vfat => 11,
            FsType::Iso9660 => 32,
            FsType::Squashfs => 0,
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A filesystem name bootlace does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown filesystem {0:?} (expected ext4, erofs, vfat, iso9660 or squashfs)")]
pub struct UnknownFsType(pub String);

impl FromStr for FsType {
    type Err = UnknownFsType;
    fn from_str(s: &str) -> Result<FsType, UnknownFsType> {
        FsType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownFsType(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for t in FsType::ALL {
            assert_eq!(t.as_str().parse::<FsType>(), Ok(t));
        }
        assert!("btrfs".parse::<FsType>().is_err());
    }
}
