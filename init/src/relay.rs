//! systemd's readiness, relayed to the host after the hand-off. When the real init is systemd
//! and a host is connected, bootlace binds a datagram socket at [`NOTIFY_SOCKET`], forks a
//! relay that keeps the boot's host connection, and hands systemd `NOTIFY_SOCKET` pointing
//! there. systemd, as PID 1, sends `READY=1` to it once start-up has finished; the relay reports
//! that to the host on the same connection, after bootlace's own READY, as
//! `STEP STEP=systemd_ready STATE=finished STATUS=<systemd's STATUS>` (a STEP: a version-1
//! host reads it as one more report), then exits. It also exits at `STOPPING=1`, when the host
//! cannot be written to, and after [`RELAY_TIMEOUT`]. It starts with the signals of a fresh
//! program, so systemd's shutdown ends it like any other process.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use bootlace_agent::client::Client;
use bootlace_contract::protocol::{Kind, SYSTEMD_READY_STEP};

use crate::sys;

/// Where systemd's notifications arrive.
pub const NOTIFY_SOCKET: &str = "/run/bootlace/notify";

/// How long the relay waits for systemd's `READY=1`.
pub const RELAY_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Binds [`NOTIFY_SOCKET`] and forks the relay, which takes `client` (the parent's copy is
/// closed at its exec). Returns in the parent only, with the relay's pid.
pub fn start(client: &mut Client) -> io::Result<u32> {
    std::fs::create_dir_all("/run/bootlace")?;
    match std::fs::remove_file(NOTIFY_SOCKET) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let socket = UnixDatagram::bind(NOTIFY_SOCKET)?;
    match sys::fork_single_threaded()? {
        Some(pid) => Ok(pid),
        None => {
            let code = relay(&socket, client, RELAY_TIMEOUT);
            // The forked relay, never PID 1: it ends here, without returning into the boot.
            #[allow(clippy::exit)]
            std::process::exit(code)
        }
    }
}

/// What a notification says: `READY=1` (with systemd's `STATUS`), `STOPPING=1`, or
/// something else.
#[derive(Debug, PartialEq, Eq)]
pub enum Notice {
    /// Start-up finished.
    Ready(String),
    /// Shutting down.
    Stopping,
    /// Anything else (`STATUS=` alone, `WATCHDOG=1`, …).
    Other,
}

/// Reads one datagram of `KEY=VALUE` lines (sd_notify).
pub fn parse(datagram: &[u8]) -> Notice {
    let text = String::from_utf8_lossy(datagram);
    let mut status = String::new();
    let mut ready = false;
    for line in text.lines() {
        match line.split_once('=') {
            Some(("READY", "1")) => ready = true,
            Some(("STOPPING", "1")) => return Notice::Stopping,
            Some(("STATUS", s)) => s.clone_into(&mut status),
            _ => {}
        }
    }
    if ready {
        Notice::Ready(status)
    } else {
        Notice::Other
    }
}

/// The relay's life: returns its exit status.
fn relay(socket: &UnixDatagram, client: &mut Client, timeout: Duration) -> i32 {
    if let Err(e) = sys::reset_signals() {
        log::warn!("relay: reset signals: {e}");
    }
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            log::warn!(
                "relay: systemd sent no READY=1 to {NOTIFY_SOCKET} within {} s",
                timeout.as_secs()
            );
            return 1;
        }
        if let Err(e) = socket.set_read_timeout(Some(left)) {
            log::warn!("relay: {NOTIFY_SOCKET}: {e}");
            return 1;
        }
        let n = match socket.recv(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("relay: {NOTIFY_SOCKET}: {e}");
                return 1;
            }
        };
        match parse(buf.get(..n).unwrap_or_default()) {
            Notice::Ready(status) => {
                let fields = [
                    ("STEP", SYSTEMD_READY_STEP.to_owned()),
                    ("STATE", "finished".to_owned()),
                    ("STATUS", status.clone()),
                ];
                return match client.send(Kind::Step, &fields) {
                    Ok(()) => {
                        log::info!("relay: systemd is ready ({status}): reported to the host");
                        0
                    }
                    Err(e) => {
                        log::warn!("relay: {}", bootlace_contract::chain(&e));
                        1
                    }
                };
            }
            Notice::Stopping => return 0,
            Notice::Other => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_are_read_as_sd_notify_writes_them() {
        assert_eq!(
            parse(b"READY=1\nSTATUS=Startup finished in 9.1s."),
            Notice::Ready("Startup finished in 9.1s.".to_owned())
        );
        assert_eq!(parse(b"READY=1"), Notice::Ready(String::new()));
        assert_eq!(
            parse(b"STOPPING=1\nSTATUS=Shutting down."),
            Notice::Stopping
        );
        assert_eq!(parse(b"STATUS=Reached basic.target."), Notice::Other);
        assert_eq!(parse(b"READY=0\n\xff\xfe"), Notice::Other);
    }
}
