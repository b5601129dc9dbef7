//! The kernel drivers each part of a boot needs: what the init loads before it probes a
//! bootstrap source, mounts a filesystem or dials the host, and therefore what the image
//! builder must copy into an image. One table, read by both.

use crate::config::{InitConfig, Source};
use crate::fs::FsType;

/// The virtio PCI transport every virtio device sits on (a module in Debian's kernels).
const VIRTIO_PCI: &str = "virtio_pci";

/// The drivers a guest needs to reach its host over vsock.
pub const VSOCK: &[&str] = &[VIRTIO_PCI, "vmw_vsock_virtio_transport"];

/// The driver a guest reads a per-VM bundle digest from QEMU's fw_cfg with (the vsock source
/// without a pinned digest; loaded best effort, a kernel without it reads SMBIOS only).
pub const OUT_OF_BAND: &[&str] = &["qemu_fw_cfg"];

/// The drivers of virtio block devices (bootstrap disks, root disks).
const BLOCK: &[&str] = &[VIRTIO_PCI, "virtio_blk"];

/// The drivers of a virtio 9p share.
const NINEP: &[&str] = &[VIRTIO_PCI, "9pnet_virtio", "9p"];

/// The filesystem of the writable locations of a read-only root: an overlay over the image's
/// directory, with a tmpfs upper layer.
pub const OVERLAY: &str = "overlay";

/// The filesystems a root image is made in (stage 1 mounts one of them).
pub const ROOT_FILESYSTEMS: &[FsType] = &[FsType::Ext4, FsType::Erofs, FsType::Squashfs];

/// Drivers a bootstrap source needs before its devices can appear.
pub fn source(source: Source) -> &'static [&'static str] {
    match source {
        Source::Disk => BLOCK,
        Source::NineP => NINEP,
        Source::Vsock => VSOCK,
    }
}

/// Modules a filesystem type needs (none when built in: the loader skips built-in ones).
pub fn filesystem(fstype: FsType) -> &'static [&'static str] {
    match fstype {
        // ext4 and erofs (through libcrc32c) need the crc32c algorithm, a soft dependency
        // (`crypto-crc32c`) that modules.dep does not list: name its generic driver.
        FsType::Ext4 => &["crc32c_generic", "ext4"],
        FsType::Erofs => &["crc32c_generic", "erofs"],
        FsType::Vfat => &["vfat", "nls_cp437", "nls_ascii"],
        FsType::Iso9660 => &["isofs"],
        FsType::Squashfs => &["squashfs"],
    }
}

/// Everything a bootstrap from these sources may load: each source's drivers and, for a disk,
/// every filesystem a bootstrap disk may be in.
pub fn for_sources(sources: &[Source]) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    for s in sources {
        out.extend(source(*s));
        if *s == Source::Disk {
            for fs in FsType::ALL {
                out.extend(filesystem(fs));
            }
        }
    }
    dedup(out)
}

/// What a stage-1 initramfs loads: the block drivers, then the module of the root's filesystem.
pub fn for_stage1() -> Vec<&'static str> {
    let mut out = BLOCK.to_vec();
    for fs in ROOT_FILESYSTEMS {
        out.extend(filesystem(*fs));
    }
    dedup(out)
}

/// Every module a configuration may load at boot, besides the ones it names: the drivers of its
/// bootstrap sources, of its host link, overlayfs for its writable locations and, in stage 1,
/// of the root disk.
pub fn implied_by(config: &InitConfig) -> Vec<&'static str> {
    let mut out = for_sources(&config.bootstrap.sources);
    if !config.root.writable.is_empty() {
        out.push(OVERLAY);
    }
    if config.host.address.is_some() {
        out.extend(VSOCK);
    }
    if config.bootstrap.sources.contains(&Source::Vsock) && config.host.digest.is_none() {
        out.extend(OUT_OF_BAND);
    }
    if config.stage1.is_some() {
        out.extend(for_stage1());
    }
    dedup(out)
}

fn dedup(mut v: Vec<&'static str>) -> Vec<&'static str> {
    let mut seen = std::collections::BTreeSet::new();
    v.retain(|m| seen.insert(*m));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables() {
        assert_eq!(source(Source::NineP), ["virtio_pci", "9pnet_virtio", "9p"]);
        let disk = for_sources(&[Source::Disk, Source::NineP]);
        assert_eq!(disk.iter().filter(|m| **m == "virtio_pci").count(), 1);
        assert!(disk.contains(&"isofs") && disk.contains(&"9p"));
        assert_eq!(
            for_stage1(),
            [
                "virtio_pci",
                "virtio_blk",
                "crc32c_generic",
                "ext4",
                "erofs",
                "squashfs"
            ]
        );
        let mut c = InitConfig::default();
        assert!(implied_by(&c).is_empty());
        c.host.address = "vsock:2:1024".parse().ok();
        assert_eq!(implied_by(&c), VSOCK);
        c.root.writable = vec![crate::config::TargetPath::trusted("/etc")];
        assert_eq!(
            implied_by(&c),
            ["overlay", "virtio_pci", "vmw_vsock_virtio_transport"]
        );
        // The vsock source reads an out-of-band digest through fw_cfg unless one is pinned.
        c.bootstrap.sources = vec![Source::Vsock];
        assert_eq!(
            implied_by(&c),
            [
                "virtio_pci",
                "vmw_vsock_virtio_transport",
                "overlay",
                "qemu_fw_cfg"
            ]
        );
        c.host.digest = format!("sha256:{}", "0".repeat(64)).parse().ok();
        assert!(!implied_by(&c).contains(&"qemu_fw_cfg"));
    }
}
