//! bootlace-init: the PID-1 init of a bootlace guest.
//!
//! The binary is a thin `main` ([`boot::pid1`] when it is PID 1, a config checker otherwise);
//! everything else is in this library so that tests use the same code. Its contracts with the
//! other programs (init.toml, the manifest, the wire protocol, driver tables, exit statuses)
//! are in `bootlace-contract`.
//!
//! Modules, from the top down — each uses only modules below it:
//! - [`boot`]: the boot, top to bottom: the order of the steps, the failure policy, what is
//!   reported to the host and what is cleaned up;
//! - [`machine`]: every effect of the boot behind one trait ([`machine::Machine`]), and PID 1's
//!   implementation of it over the toolbox below;
//! - [`stage1`]: stage 1 of a disk-root boot (mount the real root, switch to it);
//! - [`bootstrap`]: finding, mounting, applying and cleaning up the bootstrap filesystem;
//! - [`apply`]: applying a bootstrap manifest, confined to the root;
//! - [`hostlink`]: reporting to the host configuration manager over vsock;
//! - [`supervise`]: the hand-off command, supervise mode (reaping, signals, shutdown) and
//!   bounded commands;
//! - [`extract`]: extracting a bundle tarball (tar, gzip, zstd) into a confined root, with
//!   limits;
//! - [`devices`]: finding block devices by label, GPT partition or node and 9p shares by tag,
//!   with bounded waits;
//! - [`blkprobe`]: filesystem type and label of block devices, read from their superblocks,
//!   and the GPT entries of partitions, read from their disks' tables;
//! - [`takeover`]: a newer bootlace-init from the bundle taking over PID 1;
//! - [`oob`]: a per-VM bundle digest given out of band by the VMM (SMBIOS type 11, fw_cfg);
//! - [`memory`]: the guest's memory (`/proc/meminfo`) and what a bootstrap may take of it;
//! - [`relay`]: systemd's readiness relayed to the host after the hand-off;
//! - [`modload`]: loading modules with their dependencies;
//! - [`mounts`]: the early mounts;
//! - [`timeline`]: the boot's milestones;
//! - [`unpacked`]: whether the kernel unpacked the initramfs whole;
//! - [`writable`]: the writable locations of a read-only root (overlays, else copies);
//! - [`identity`]: the machine ID, the persisted host name and systemd's environment of a guest;
//! - [`logger`]: console logging with CLOCK_BOOTTIME stamps;
//! - [`sys`]: the syscall fence, the only module with `unsafe`.

#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented
    )
)]

pub mod apply;
pub mod blkprobe;
pub mod boot;
pub mod bootstrap;
pub mod devices;
pub mod extract;
pub mod hostlink;
pub mod identity;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod modload;
pub mod mounts;
pub mod oob;
pub mod relay;
pub mod stage1;
pub mod supervise;
pub mod sys;
pub mod takeover;
pub mod timeline;
pub mod unpacked;
pub mod writable;

/// The init's version, printed at start and said in HELLO: the package's, unless the build
/// names its own (`BOOTLACE_INIT_VERSION=0.1.0+site.3 cargo build …`, for a build that must be
/// told apart, as a newer init taking over is).
pub const VERSION: &str = match option_env!("BOOTLACE_INIT_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};
