//! Which guest is this, and what is its configuration: the resolver the host asks at every
//! HELLO and GET-BUNDLE.
//!
//! The host agent's own resolver reads a fleet file ([`crate::fleet`]); an orchestrator that
//! embeds the host implements [`Resolve`] over its own records and hands it to
//! [`Host::with_resolver`](crate::host::Host::with_resolver). It is asked again on every
//! request, so an answer that changes applies from the next request on, without a restart.

use std::path::PathBuf;
use std::sync::Arc;

use crate::bundle::BundleSource;

/// How a connection reached the host: what the host knows of a guest without believing it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Transport {
    /// A hybrid-vsock Unix socket (`<uds_path>_<port>`): one per VM, so the socket is the VM.
    Unix(PathBuf),
    /// AF_VSOCK: the peer's context id, assigned by the VMM.
    Vsock {
        /// The peer CID.
        cid: u32,
    },
    /// An in-memory connection (tests, the fuzz harness): a name only.
    Memory(String),
}

impl Transport {
    /// How events and the status table name the connection: the socket path, `vsock:<cid>`,
    /// or the name.
    pub fn label(&self) -> String {
        match self {
            Transport::Unix(p) => p.display().to_string(),
            Transport::Vsock { cid } => format!("vsock:{cid}"),
            Transport::Memory(name) => name.clone(),
        }
    }
}

/// A guest as the resolver sees it: the transport (the host's own knowledge) and what the
/// guest said in its HELLO (its claims).
#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// How it connected.
    pub transport: &'a Transport,
    /// HELLO's `INSTANCE_ID` (the SMBIOS UUID the VMM gave the VM), `None` before HELLO or
    /// when empty.
    pub instance_id: Option<&'a str>,
    /// HELLO's `BOOT_ID`.
    pub boot_id: Option<&'a str>,
    /// HELLO's `INIT_VERSION`.
    pub init_version: Option<&'a str>,
    /// HELLO's `IMAGE`: the image the guest's init was baked into (`name@version`).
    pub image: Option<&'a str>,
}

/// The resolver's answer for one guest.
#[derive(Debug, Clone, Default)]
pub struct Assignment {
    /// The guest's name in the fleet (`None`: not a known guest).
    pub name: Option<String>,
    /// Its bundle, or why it gets none (sent to the guest as NO-BUNDLE's `STATUS` and logged).
    pub bundle: Option<Arc<BundleSource>>,
    /// Why there is no bundle, when [`Assignment::bundle`] is `None`.
    pub reason: Option<String>,
    /// The image it should be running: `name@version`, or `name` for any version of it. A
    /// guest that reports another in HELLO (`IMAGE`) gets no bundle; shown in the status table.
    pub image: Option<String>,
}

impl Assignment {
    /// An unknown guest: no name, no bundle, `reason`.
    pub fn refused(reason: impl Into<String>) -> Assignment {
        Assignment {
            reason: Some(reason.into()),
            ..Assignment::default()
        }
    }

    /// The reason NO-BUNDLE gives.
    pub fn why_none(&self) -> String {
        self.reason
            .clone()
            .unwrap_or_else(|| NO_BUNDLE_CONFIGURED.to_owned())
    }
}

/// NO-BUNDLE's `STATUS` when nothing more specific is known.
pub const NO_BUNDLE_CONFIGURED: &str = "no bundle is configured for this guest";

/// Maps a guest to its configuration. Called on the host's event loop for every HELLO and
/// GET-BUNDLE, so it must answer from memory without blocking (load and watch files on a
/// thread of your own, as [`crate::fleet::Fleet`] does).
pub trait Resolve: Send + Sync {
    /// The configuration of the guest `who`.
    fn resolve(&self, who: &Identity<'_>) -> Assignment;
}

/// One bundle (or none) for every guest: `bootlace-agent serve --bundle`.
#[derive(Debug, Clone, Default)]
pub struct Single(pub Option<Arc<BundleSource>>);

impl Resolve for Single {
    fn resolve(&self, _who: &Identity<'_>) -> Assignment {
        Assignment {
            bundle: self.0.clone(),
            ..Assignment::default()
        }
    }
}

impl<F> Resolve for F
where
    F: Fn(&Identity<'_>) -> Assignment + Send + Sync,
{
    fn resolve(&self, who: &Identity<'_>) -> Assignment {
        self(who)
    }
}
