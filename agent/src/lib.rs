//! bootlace-agent: both ends of the host <-> guest conversation over vsock.
//!
//! The wire protocol itself (frames, the decoder, the bundle header) and every other contract
//! live in `bootlace-contract`; this crate holds the two programs' halves of the conversation:
//! - [`client`]: the guest side (retries, acks, bundle fetch), used by the init without the
//!   `host` feature;
//! - `host` (feature `host`): the host configuration manager (listeners, bundles, events);
//! - `fault` (feature `host`): the host's fault injection as `--fault KIND[=ARG]` flags.
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

#[cfg(feature = "host")]
pub mod bundle;
pub mod client;
#[cfg(feature = "host")]
pub mod fault;
#[cfg(feature = "host")]
pub mod fleet;
#[cfg(feature = "host")]
pub mod host;
#[cfg(feature = "host")]
pub mod resolve;
#[cfg(feature = "host")]
mod server;
#[cfg(feature = "host")]
pub mod status;
