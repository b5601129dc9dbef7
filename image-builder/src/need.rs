//! The least guest memory an image boots in (`min_memory_mib` in its metadata), from what the
//! Debian kernel does under QEMU, measured (docs/image.md, "Guest memory"):
//!
//! - before anything is unpacked the kernel keeps about [`KERNEL_MIB`] for itself (its image,
//!   its early allocations) plus a page map of 1/64 of the memory (64 bytes per 4 KiB page);
//! - the initramfs as loaded stays reserved until the kernel has unpacked it;
//! - it unpacks into its rootfs, a tmpfs whose size is half the memory the kernel manages then,
//!   so the unpacked files (each in whole pages) must fit in half of what is left: twice their
//!   size, which also leaves the guest as much again once the archive is freed; plus an inode
//!   and a dentry per entry ([`ENTRY_BYTES`]);
//! - whatever the image, a guest wants [`FLOOR_MIB`] to boot the init and a small application,
//!   and [`HEADROOM_MIB`] (or a tenth, when that is more) over what unpacking takes.

use crate::initramfs::ArchiveSummary;

/// MiB the kernel keeps before unpacking anything (measured: 54–57, with a 4 MiB step).
pub const KERNEL_MIB: u64 = 60;

/// What the kernel keeps per unpacked entry (inode, dentry), rounded up.
pub const ENTRY_BYTES: u64 = 1024;

/// The least memory of any guest: a small initramfs reached its init at 88 MiB, not at 84.
pub const FLOOR_MIB: u64 = 96;

/// MiB over the need, at the least.
pub const HEADROOM_MIB: u64 = 24;

const MIB: u64 = 1 << 20;

/// The least memory, in MiB, that boots an image of `image_size` bytes: an initramfs (with
/// what it holds) or a disk image (which the guest reads from its disk, not from memory).
pub fn min_memory_mib(image_size: u64, archive: Option<&ArchiveSummary>) -> u64 {
    let unpacking = archive.map_or(0, |a| {
        image_size
            .saturating_add(a.unpacked.saturating_mul(2))
            .saturating_add(a.entries.saturating_mul(ENTRY_BYTES))
    });
    // The page map grows with the memory: 64 of every 4096 bytes.
    let need = (KERNEL_MIB + unpacking.div_ceil(MIB))
        .saturating_mul(64)
        .div_ceil(63);
    let need = need.max(FLOOR_MIB);
    need + HEADROOM_MIB.max(need / 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(entries: u64, unpacked: u64) -> ArchiveSummary {
        ArchiveSummary {
            entries,
            bytes: unpacked,
            unpacked,
        }
    }

    #[test]
    fn grows_with_what_the_kernel_holds() {
        // A disk image or a tiny initramfs: the floor.
        assert_eq!(min_memory_mib(10 << 30, None), FLOOR_MIB + HEADROOM_MIB);
        assert_eq!(
            min_memory_mib(1 << 20, Some(&summary(100, 2 << 20))),
            FLOOR_MIB + HEADROOM_MIB
        );
        // Measured (docs/image.md): 64 MiB of random bytes, a 66 MiB archive unpacking to
        // 69 MiB, booted at 264 MiB and not at 260: 60 + 66 + 138 + 1 = 265, a 64th more
        // is 270, and a tenth over that.
        let m = min_memory_mib(66 << 20, Some(&summary(400, 69 << 20)));
        assert_eq!(m, 270 + 27);
        // 50,000 small files: 2 MiB of archive, 200 MiB unpacked (a page each), booted at
        // 464 MiB and not at 460.
        let m = min_memory_mib(2 << 20, Some(&summary(50_000, 200 << 20)));
        assert!(m > 464 && m < 600, "{m}");
        // Overflow-safe.
        assert!(min_memory_mib(u64::MAX, Some(&summary(u64::MAX, u64::MAX))) > 0);
    }
}
