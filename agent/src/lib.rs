//! bootlace-agent: both ends of the host <-> guest conversation.
//!
//! This crate will hold the manifest model, the bundle format, the vsock wire protocol and its
//! guest-side client, and the host configuration manager. Today it carries only the console
//! contract the host reads when no vsock host is configured: the power-off status line, defined
//! with the init ([`bootlace_init::report`]) and re-exported here for host tooling.

#![deny(unsafe_code)]

pub use bootlace_init::report::{parse_exit_status, MARKER as STATUS_MARKER};
