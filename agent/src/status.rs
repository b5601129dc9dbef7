//! The table of guests the host keeps for tools: each guest's state, boot id, image, timeline
//! and last error, from the events it caused. `bootlace-agent status` reads it as JSON over
//! the agent's status socket; `metrics` gives the same in Prometheus' text format.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bootlace_contract::protocol::Kind;

use crate::host::Event;

/// Guests remembered at most: past it the longest-idle disconnected guest is forgotten, so
/// that guests the host does not know (AF_VSOCK peers of every CID) cannot grow it forever.
pub const MAX_GUESTS: usize = 65_536;

/// Timeline entries kept per guest (the latest).
pub const MAX_TIMELINE: usize = 32;

/// Longest text kept from a guest (an error, a status): longer is cut, marked `…`.
pub const MAX_TEXT: usize = 512;

/// What the host knows of one guest.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GuestStatus {
    /// How it connects (socket path or `vsock:<cid>`).
    pub guest: String,
    /// Its name in the fleet, if known.
    pub name: Option<String>,
    /// `connected`, `hello`, `configured` (bundle sent), `no-bundle`, `ready`, `failed`,
    /// `exited`, `systemd-ready`, `disconnected`.
    pub state: &'static str,
    /// Connections open now.
    pub connections: u32,
    /// The boot id of its latest HELLO.
    pub boot_id: Option<String>,
    /// Its instance id (SMBIOS UUID) as it reported it.
    pub instance_id: Option<String>,
    /// The bootlace-init version it reported.
    pub init_version: Option<String>,
    /// The image the fleet says it should run.
    pub image: Option<String>,
    /// The image its init says it was baked into (HELLO's `IMAGE`).
    pub running_image: Option<String>,
    /// sha256 of the last bundle sent to it.
    pub bundle_sha256: Option<String>,
    /// Its steps, `STEP=STATE (DURATION_MS ms)`, the latest [`MAX_TIMELINE`].
    pub timeline: Vec<String>,
    /// READY's `TIMELINE`, as the guest sent it.
    pub ready_timeline: Option<String>,
    /// READY's, FAILED's or EXIT's `STATUS`.
    pub status: Option<String>,
    /// EXIT's or FAILED's `EXIT_STATUS`.
    pub exit_status: Option<String>,
    /// The last error of one of its connections.
    pub last_error: Option<String>,
    /// Unix time, milliseconds, of its first and latest event.
    pub first_seen_ms: u64,
    /// See `first_seen_ms`.
    pub last_seen_ms: u64,
}

/// The host's counters (connections, refusals), kept by the event loop.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Counters {
    /// Connections open.
    pub connections_open: u64,
    /// Connections accepted since the start.
    pub connections_accepted: u64,
    /// Connections closed at accept: a guest over its cap.
    pub refused_per_guest: u64,
    /// Connections closed at accept: the host at its global cap with none to evict.
    pub refused_global: u64,
    /// Connections closed before HELLO to make room (oldest first).
    pub evicted: u64,
    /// accept() failures (EMFILE, ENFILE, ENOMEM, …).
    pub accept_errors: u64,
    /// Listeners open.
    pub listeners: u64,
}

/// Every guest the host has heard of.
#[derive(Debug, Default)]
pub struct Table {
    guests: BTreeMap<String, GuestStatus>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `s`, cut to [`MAX_TEXT`] bytes on a character boundary.
fn bounded(s: &str) -> String {
    if s.len() <= MAX_TEXT {
        return s.to_owned();
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", s.get(..end).unwrap_or(""))
}

impl Table {
    /// Updates `guest`'s row with `event`.
    pub fn record(&mut self, guest: &str, name: Option<&str>, event: &Event) {
        if matches!(event, Event::Notice(_)) {
            return;
        }
        if !self.guests.contains_key(guest) && self.guests.len() >= MAX_GUESTS {
            self.forget_one();
        }
        let now = now_ms();
        // The key is allocated for a new guest only: every event of a known one is a lookup.
        if !self.guests.contains_key(guest) {
            self.guests.insert(
                guest.to_owned(),
                GuestStatus {
                    guest: guest.to_owned(),
                    first_seen_ms: now,
                    state: "connected",
                    ..GuestStatus::default()
                },
            );
        }
        let Some(g) = self.guests.get_mut(guest) else {
            return;
        };
        g.last_seen_ms = now;
        if let Some(n) = name {
            if g.name.as_deref() != Some(n) {
                g.name = Some(bounded(n));
            }
        }
        match event {
            Event::Connected => {
                g.connections += 1;
                if g.state == "disconnected" {
                    g.state = "connected";
                }
            }
            Event::Disconnected => {
                g.connections = g.connections.saturating_sub(1);
                if g.connections == 0 && matches!(g.state, "connected" | "hello") {
                    g.state = "disconnected";
                }
            }
            Event::Hello(f) => {
                let boot = f.get("BOOT_ID").map(bounded);
                if boot != g.boot_id {
                    g.timeline.clear();
                    g.ready_timeline = None;
                    g.status = None;
                    g.exit_status = None;
                    g.state = "hello";
                }
                let version = f.get("INIT_VERSION").map(bounded);
                if boot == g.boot_id && g.init_version.is_some() && version != g.init_version {
                    // A newer init took over PID 1 within the boot.
                    let line = format!(
                        "init_takeover={} -> {}",
                        g.init_version.as_deref().unwrap_or("?"),
                        version.as_deref().unwrap_or("?")
                    );
                    if g.timeline.len() >= MAX_TIMELINE {
                        g.timeline.remove(0);
                    }
                    g.timeline.push(bounded(&line));
                }
                g.boot_id = boot;
                g.instance_id = f.get("INSTANCE_ID").map(bounded);
                g.init_version = version;
                g.running_image = f.get("IMAGE").map(bounded);
            }
            Event::BundleSent { sha256, .. } => {
                g.state = "configured";
                g.bundle_sha256 = Some(sha256.clone());
            }
            Event::NoBundle { reason } => {
                g.state = "no-bundle";
                g.last_error = Some(bounded(reason));
            }
            Event::Error(e) => g.last_error = Some(bounded(e)),
            Event::Report(f) => Self::report(g, f),
            Event::Notice(_) => {}
        }
    }

    fn report(g: &mut GuestStatus, f: &bootlace_contract::protocol::Frame) {
        match f.kind {
            Kind::Step => {
                let step = f.get("STEP").unwrap_or("?");
                if step == bootlace_contract::protocol::SYSTEMD_READY_STEP {
                    g.state = "systemd-ready";
                }
                let mut line = format!("{step}={}", f.get("STATE").unwrap_or("finished"));
                if let Some(ms) = f.get("DURATION_MS") {
                    line.push_str(&format!(" ({ms} ms)"));
                }
                if g.timeline.len() >= MAX_TIMELINE {
                    g.timeline.remove(0);
                }
                g.timeline.push(bounded(&line));
            }
            Kind::Ready => {
                g.state = "ready";
                g.ready_timeline = f.get("TIMELINE").map(bounded);
                g.status = f.get("STATUS").map(bounded);
            }
            Kind::Failed => {
                g.state = "failed";
                g.status = f.get("STATUS").map(bounded);
                g.exit_status = f.get("EXIT_STATUS").map(bounded);
                g.last_error = g.status.clone();
            }
            Kind::Exit => {
                g.state = "exited";
                g.status = f.get("STATUS").map(bounded);
                g.exit_status = f.get("EXIT_STATUS").map(bounded);
            }
            _ => {}
        }
    }

    /// Records the image the fleet expects `guest` to run.
    pub fn expect_image(&mut self, guest: &str, image: Option<&str>) {
        if let Some(g) = self.guests.get_mut(guest) {
            g.image = image.map(bounded);
        }
    }

    /// Forgets the longest-idle guest without an open connection (or, if every one is
    /// connected, the longest-idle one).
    fn forget_one(&mut self) {
        let victim = self
            .guests
            .values()
            .filter(|g| g.connections == 0)
            .min_by_key(|g| g.last_seen_ms)
            .or_else(|| self.guests.values().min_by_key(|g| g.last_seen_ms))
            .map(|g| g.guest.clone());
        if let Some(v) = victim {
            self.guests.remove(&v);
        }
    }

    /// `{"guests":[…],"counters":{…}}`.
    pub fn to_json(&self, counters: &Counters) -> serde_json::Value {
        serde_json::json!({
            "guests": self.guests.values().collect::<Vec<_>>(),
            "counters": counters,
        })
    }

    /// The table in Prometheus' text exposition format.
    pub fn to_prometheus(&self, c: &Counters) -> String {
        let mut states: BTreeMap<&str, u64> = BTreeMap::new();
        for g in self.guests.values() {
            *states.entry(g.state).or_default() += 1;
        }
        let mut out = String::new();
        out.push_str("# HELP bootlace_agent_guests Guests the agent knows, by state.\n");
        out.push_str("# TYPE bootlace_agent_guests gauge\n");
        for (state, n) in states {
            out.push_str(&format!("bootlace_agent_guests{{state=\"{state}\"}} {n}\n"));
        }
        let counters = [
            ("connections_open", "gauge", c.connections_open),
            (
                "connections_accepted_total",
                "counter",
                c.connections_accepted,
            ),
            ("refused_per_guest_total", "counter", c.refused_per_guest),
            ("refused_global_total", "counter", c.refused_global),
            ("evicted_total", "counter", c.evicted),
            ("accept_errors_total", "counter", c.accept_errors),
            ("listeners", "gauge", c.listeners),
        ];
        for (name, kind, v) in counters {
            out.push_str(&format!(
                "# TYPE bootlace_agent_{name} {kind}\nbootlace_agent_{name} {v}\n"
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bootlace_contract::protocol::Frame;

    #[test]
    fn a_boot_is_followed_and_a_new_boot_starts_afresh() {
        let mut t = Table::default();
        let g = "/run/vm/a_1024";
        t.record(g, Some("web-1"), &Event::Connected);
        t.record(
            g,
            Some("web-1"),
            &Event::Hello(Frame::new(Kind::Hello, 0).with("BOOT_ID", "b1")),
        );
        t.record(
            g,
            None,
            &Event::Report(
                Frame::new(Kind::Step, 1)
                    .with("STEP", "bootstrap")
                    .with("DURATION_MS", 12),
            ),
        );
        t.record(
            g,
            None,
            &Event::Report(Frame::new(Kind::Ready, 2).with("STATUS", "up")),
        );
        let v = t.to_json(&Counters::default());
        let row = &v["guests"][0];
        assert_eq!(row["name"], "web-1");
        assert_eq!(row["state"], "ready");
        assert_eq!(row["timeline"][0], "bootstrap=finished (12 ms)");
        t.record(g, None, &Event::Disconnected);
        assert_eq!(
            t.to_json(&Counters::default())["guests"][0]["state"],
            "ready"
        );
        t.record(
            g,
            None,
            &Event::Hello(Frame::new(Kind::Hello, 0).with("BOOT_ID", "b2")),
        );
        let v = t.to_json(&Counters::default());
        assert_eq!(v["guests"][0]["state"], "hello");
        assert_eq!(v["guests"][0]["timeline"].as_array().map(Vec::len), Some(0));
        assert!(t
            .to_prometheus(&Counters::default())
            .contains("state=\"hello\"} 1"));
    }

    #[test]
    fn a_newer_init_taking_over_within_a_boot_keeps_the_row_and_is_noted() {
        let mut t = Table::default();
        let g = "vsock:7";
        let hello = |v: &str| {
            Event::Hello(
                Frame::new(Kind::Hello, 0)
                    .with("BOOT_ID", "b1")
                    .with("INIT_VERSION", v),
            )
        };
        t.record(g, None, &hello("0.1.0"));
        t.record(
            g,
            None,
            &Event::Report(Frame::new(Kind::Step, 1).with("STEP", "bootstrap_mounted")),
        );
        t.record(g, None, &hello("0.2.0"));
        let v = t.to_json(&Counters::default());
        let row = &v["guests"][0];
        assert_eq!(row["init_version"], "0.2.0");
        assert_eq!(row["timeline"][0], "bootstrap_mounted=finished");
        assert_eq!(row["timeline"][1], "init_takeover=0.1.0 -> 0.2.0");
        // The same version again (a reconnect) notes nothing.
        t.record(g, None, &hello("0.2.0"));
        let v = t.to_json(&Counters::default());
        assert_eq!(v["guests"][0]["timeline"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn the_table_and_its_text_are_bounded() {
        let mut t = Table::default();
        for i in 0..MAX_GUESTS + 10 {
            let g = format!("vsock:{i}");
            t.record(&g, None, &Event::Connected);
            t.record(&g, None, &Event::Disconnected);
        }
        assert_eq!(t.guests.len(), MAX_GUESTS);
        let long = "x".repeat(10_000);
        t.record("vsock:1", None, &Event::Error(long));
        let kept = t.guests.get("vsock:1").and_then(|g| g.last_error.clone());
        assert!(kept.is_some_and(|e| e.len() <= MAX_TEXT + '…'.len_utf8()));
        for i in 0..100 {
            t.record(
                "vsock:1",
                None,
                &Event::Report(Frame::new(Kind::Step, i + 1).with("STEP", "s")),
            );
        }
        assert_eq!(
            t.guests.get("vsock:1").map(|g| g.timeline.len()),
            Some(MAX_TIMELINE)
        );
    }
}
