//! bootlace-agent: the contracts between a bootlace guest and its host, and the host side.
//!
//! The library is used by the init (without the `host` feature), by the image builder and by
//! the harness, so each contract has exactly one implementation:
//! - [`report`]: the power-off console line and its exit statuses.
//!
//! The `bootlace-agent` binary (feature `host`) is the host side.

#![deny(unsafe_code)]

pub mod report;
