//! bootlace-image: bakes `bootlace-init` into images.
//!
//! Modules:
//! - [`bake`]: `bootlace-image bake` in five steps: validate, stage the input, add the init
//!   payload, make the image, publish;
//! - [`additions`]: what a bake adds (mount points, init, config, modules), resolved through
//!   the input's own symlinks;
//! - [`stage`]: a root filesystem staged on disk from a tarball, layers or a directory mirror,
//!   confined; a directory input's digest;
//! - [`overlay`]: the read-only overlay mount of the additions over a directory input;
//! - [`oci`]: OCI image layouts (index, manifest, layers; digests checked) and the layer cache;
//! - [`ociconfig`]: an OCI image's Entrypoint, Cmd, Env, WorkingDir and User, and the rules that
//!   make them the hand-off;
//! - [`initramfs`]: the kernel modules an image gets; the newc archive written from the input
//!   and the additions merged;
//! - [`need`]: the least guest memory an image boots in;
//! - [`cpio`]: the newc archive format (writer and reader);
//! - [`depmod`]: the image's module indexes, its own modules kept, rewritten by depmod;
//! - [`fsimage`]: a directory -> a reproducible, labelled ext4 or erofs image (mke2fs,
//!   mkfs.erofs), a squashfs image (mksquashfs), a qcow2 of a raw image (qemu-img);
//! - [`capture`]: `bootlace-image capture`: a base image booted with a bundle, the configured
//!   root baked into the next version;
//! - [`bundle`]: bootstrap bundles (validated) as disk images, directories or tarballs;
//! - [`keys`]: bundle signing keys (keygen, key files) and the `.sig` sidecar of a signed
//!   bundle;
//! - [`limits`]: the bake limits (JSON document size, entries, bytes, compression ratio) and
//!   their counters;
//! - [`progress`]: counters of long work and the once-a-second progress line;
//! - [`path`]: the one path normaliser;
//! - [`dirnames`]: a directory's names, sorted, packed in one buffer.

#![deny(unsafe_code)]

pub mod additions;
pub mod bake;
pub mod bundle;
pub mod capture;
pub mod cpio;
pub mod depmod;
pub mod dirnames;
pub mod disk;
pub mod fsimage;
pub mod initramfs;
pub mod keys;
pub mod limits;
pub mod need;
pub mod oci;
pub mod ociconfig;
pub mod overlay;
pub mod path;
pub mod progress;
pub mod stage;
pub mod uki;
