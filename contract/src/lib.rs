//! bootlace-contract: everything two bootlace programs must agree on, in one place.
//!
//! The init (`bootlace-init`), the image builder (`bootlace-image`), the host agent
//! (`bootlace-agent`) and the QEMU harness (`bootlace-vm`) all depend on this crate and on no
//! other's internals, so a contract has exactly one definition and one validation:
//! - [`config`]: `init.toml` (schema 1), the `bootlace.*` kernel command line overrides, and
//!   the validation a boot and a bake both apply;
//! - [`cmdline`]: kernel command line tokenising and command splitting;
//! - [`manifest`]: the bootstrap manifest (`bootlace.toml`) and its validation;
//! - [`protocol`]: the host <-> guest wire protocol (frames, decoder, bundle header);
//! - [`image`]: the metadata written beside every baked image, the image formats;
//! - [`compression`]: the one compression enum (tarballs, layers, bundles, initramfs);
//! - [`fs`]: filesystem types and their label limits;
//! - [`gpt`]: GUID partition tables (a bootable disk's, which stage 1 reads);
//! - [`drivers`]: the kernel modules each source, filesystem and host link needs;
//! - [`kmod`]: `modules.dep` / `modules.builtin`, which the builder writes and the init reads;
//! - [`status`]: the exit statuses a guest reports and the power-off console line;
//! - [`digest`]: SHA-256 digests (`sha256:<hex>`) and a hashing reader;
//! - [`signature`]: ed25519 bundle signatures, keys and their text forms (key files and
//!   signing with the `sign` feature);
//! - [`trust`]: the rule that decides whether a vsock bundle is trusted (pinned digest,
//!   out-of-band digest, signature, trust in the host);
//! - [`takeover`]: handing PID 1 over to a newer bootlace-init (self-check, state file);
//! - [`types`]: validated value types (module and environment names, commands, paths).
//!
//! It runs inside PID 1 (the init links it): no panicking shortcuts outside tests.

#![deny(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable
    )
)]

pub mod cmdline;
pub mod compression;
pub mod config;
pub mod digest;
pub mod drivers;
pub mod fs;
pub mod gpt;
pub mod image;
pub mod kmod;
pub mod manifest;
pub mod protocol;
pub mod signature;
pub mod status;
pub mod takeover;
pub mod trust;
pub mod types;

/// An error and its sources on one line: `modules: load x from y: No such file or directory`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(src) = cur {
        s.push_str(": ");
        s.push_str(&src.to_string());
        cur = src.source();
    }
    s
}
