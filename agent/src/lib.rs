//! bootlace-agent: the contracts between a bootlace guest and its host, and the host side.
//!
//! The library is used by the init (without the `host` feature), by the image builder and by
//! the harness, so each contract has exactly one implementation:
//! - [`client`]: the guest side of the conversation (retries, acks, bundle fetch);
//! - `host` (feature `host`): the host configuration manager (listeners, bundles, events);
//! - `fault` (feature `host`): the host's fault injection as `--fault KIND[=ARG]` flags;
//! - [`manifest`]: the bootstrap manifest (`bootlace.toml`) and its validation;
//! - [`protocol`]: the host <-> guest wire protocol (frames, decoder);
//! - [`report`]: the power-off console line and its exit statuses;
//! - [`types`]: validated value types (module and environment names, commands).
//!
//! The `bootlace-agent` binary (feature `host`) is the host side.

#![deny(unsafe_code)]
// The library runs inside PID 1: no panicking shortcuts outside tests.
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

pub mod client;
#[cfg(feature = "host")]
pub mod fault;
#[cfg(feature = "host")]
pub mod host;
pub mod manifest;
pub mod protocol;
pub mod report;
pub mod types;
