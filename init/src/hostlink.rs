//! The init's link to the host configuration manager: HELLO at connect, STEP events, READY,
//! FAILED and EXIT — each acknowledged. Without a configured host every call is a no-op;
//! with one, a host that cannot be reached at boot is a boot failure (the failure policy
//! applies), and a host lost later is a warning (the boot is not held hostage to it).

use std::time::Duration;

use bootlace_agent::client::{Client, ClientError, Connector, Retry, Stream};
use bootlace_contract::protocol::Kind;

use crate::modload::ModuleLoader;
use crate::sys;
use bootlace_contract::config::{Host, ImageRef};

/// The link (possibly absent).
#[derive(Debug, Default)]
pub struct HostLink {
    client: Option<Client>,
}

/// Going on with the session of the init this one took over PID 1 from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resume {
    /// The sequence number of its last report.
    pub after_seq: u64,
    /// Its version (HELLO says `TAKEOVER_FROM`).
    pub from_version: String,
}

/// The boot id the kernel made up for this boot.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The instance identity the hypervisor gives (DMI product UUID), if any.
pub fn instance_id() -> String {
    std::fs::read_to_string("/sys/class/dmi/id/product_uuid")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl HostLink {
    /// No host configured.
    pub fn none() -> HostLink {
        HostLink::default()
    }

    /// Whether a host is connected.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// Connects to the configured host (loading the vsock drivers first) and says HELLO as
    /// `bootlace-init` `init_version`. `Ok(none)` when no host is configured.
    pub fn connect(
        cfg: &Host,
        loader: &mut ModuleLoader,
        init_version: &str,
        image: Option<&ImageRef>,
        resume: Option<&Resume>,
    ) -> Result<HostLink, ClientError> {
        let Some(addr) = cfg.address else {
            return Ok(HostLink::none());
        };
        loader.load_best_effort(bootlace_contract::drivers::VSOCK);
        let io_timeout = Duration::from_millis(cfg.io_timeout_ms.max(1));
        let connector: Connector = Box::new(move |left: Duration| {
            sys::vsock_connect(addr.cid, addr.port, left.min(io_timeout), io_timeout)
                .map(|f| Box::new(f) as Box<dyn Stream>)
        });
        let t = sys::boottime();
        let mut hello = vec![
            ("INIT_VERSION", init_version.to_owned()),
            ("BOOT_ID", boot_id()),
            ("INSTANCE_ID", instance_id()),
            ("BOOTTIME_NS", t.as_nanos().to_string()),
        ];
        if let Some(i) = image {
            hello.push(("IMAGE", i.to_string()));
        }
        if let Some(r) = resume {
            hello.push(("TAKEOVER_FROM", r.from_version.clone()));
        }
        let retry = Retry {
            give_up_after: Duration::from_millis(cfg.connect_timeout_ms),
            acks: !addr.notify,
            ..Retry::default()
        };
        let mut client = Client::connect(connector, &hello, retry)?;
        if let Some(r) = resume {
            client.resume_after(r.after_seq);
        }
        log::info!("host: connected to {}", String::from(addr));
        Ok(HostLink {
            client: Some(client),
        })
    }

    /// The session's last sequence number, when connected.
    pub fn seq(&self) -> Option<u64> {
        self.client.as_ref().map(Client::seq)
    }

    /// The client, for a bundle fetch.
    pub fn client(&mut self) -> Option<&mut Client> {
        self.client.as_mut()
    }

    /// Sends a report; a failure is logged and the link dropped (later reports are skipped).
    pub fn report(&mut self, kind: Kind, fields: &[(&str, String)]) {
        let Some(c) = self.client.as_mut() else {
            return;
        };
        if let Err(e) = c.send(kind, fields) {
            log::warn!(
                "host: {}; no more reports will be sent",
                bootlace_contract::chain(&e)
            );
            self.client = None;
        }
    }
}
