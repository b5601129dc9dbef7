//! bootlace-init: the PID-1 init of a bootlace guest.
//!
//! The binary is a thin `main` ([`boot::pid1`] when it is PID 1, a config checker otherwise);
//! everything else is in this library so that tests and the image builder use the same code.
//!
//! Modules:
//! - [`blkprobe`]: filesystem type and label of block devices, read from their superblocks;
//! - [`apply`]: applying a bootstrap manifest, confined to the root;
//! - [`boot`]: the boot sequence, failure policy and hand-off;
//! - [`bootstrap`]: finding, mounting and cleaning up the bootstrap filesystem;
//! - [`extract`]: extracting a bundle tarball (tar, gzip, zstd) into a confined root, with limits;
//! - [`hostlink`]: reporting to the host configuration manager over vsock;
//! - [`logger`]: console logging with CLOCK_BOOTTIME stamps;
//! - [`modload`]: loading modules with their dependencies;
//! - [`mounts`]: the early mounts;
//! - [`stage1`]: stage 1 of a disk-root boot (mount the real root, switch to it);
//! - [`supervise`]: supervise mode (reaping, signal forwarding, shutdown);
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
pub mod extract;
pub mod hostlink;
pub mod logger;
pub mod modload;
pub mod mounts;
pub mod stage1;
pub mod supervise;
pub mod sys;
