//! bootlace-image: bakes `bootlace-init` into images.
//!
//! Modules:
//! - [`bundle`]: bootstrap bundles (validated) as disk images or directories;
//! - [`cpio`]: the newc archive format (writer and reader);
//! - [`tree`]: the in-memory file tree being baked, with in-tree path resolution;
//! - [`initramfs`]: rootfs + init + config + modules -> a reproducible initramfs;
//! - [`fsimage`]: a directory -> a reproducible, labelled ext4 or erofs image (mke2fs, mkfs.erofs).

#![deny(unsafe_code)]

pub mod bundle;
pub mod cpio;
pub mod fsimage;
pub mod initramfs;
pub mod tree;
