//! bootlace-image: bakes `bootlace-init` into images.
//!
//! Modules:
//! - [`bundle`]: bootstrap bundles (validated) as disk images or directories;
//! - [`cpio`]: the newc archive format (writer and reader);
//! - [`tree`]: the in-memory file tree being baked, with in-tree path resolution;
//! - [`initramfs`]: rootfs + init + config + modules -> a reproducible initramfs;
//! - [`fsimage`]: a directory -> a reproducible, labelled ext4 or erofs image (mke2fs, mkfs.erofs),
//!   a squashfs image (mksquashfs), a qcow2 of a raw image (qemu-img);
//! - [`stage`]: a root filesystem staged on disk from a directory, tarballs or layers, confined;
//! - [`oci`]: OCI image layouts (index, manifest, layers; digests checked) and the layer cache;
//! - [`bake`]: `bootlace-image bake`: input -> staged root + init + config + modules -> image.

#![deny(unsafe_code)]

pub mod bake;
pub mod bundle;
pub mod cpio;
pub mod fsimage;
pub mod initramfs;
pub mod oci;
pub mod stage;
pub mod tree;
