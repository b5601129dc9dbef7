//! Target `host_session`: one guest session against the host side ([`Host::handle`]) with
//! arbitrary bytes from the guest, then well-behaved sessions on the same host.
//!
//! The connection is in memory: the guest's bytes come in fuzzer-chosen read sizes (with
//! `EINTR`s, and a read error instead of the end when asked), and the host's writes may fail
//! after a fuzzer-chosen number of bytes (a guest that went away). Input: a flags byte (bundle
//! configured, interrupted reads, read error at the end, write failure), a read-size byte, then
//! the guest's bytes. Checked:
//! - the session ends without a panic; its events start with `Connected`
//!   and end with `Disconnected`;
//! - what the host sends and reports is exactly what `docs/protocol.md` says, computed by an
//!   independent model of the conversation: an `ACK` for every guest message (duplicates
//!   acked again but reported once per guest and boot id), `BUNDLE` with the right size,
//!   sha256 and bytes (or `NO-BUNDLE`) for `GET-BUNDLE`, an error and the end of the session
//!   for garbage, a frame before HELLO, a host-only kind, a cut frame or a transport error;
//!   with a failing writer,
//!   what was sent is a prefix of that;
//! - afterwards the same host serves a well-behaved session from another guest, and a
//!   reconnect of the same guest, exactly as the model says.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use bootlace_agent::host::{BundleSource, Event, GuestEvent, Host};
use bootlace_contract::protocol::{BundleHeader, Decoder, Frame, Kind};

use crate::frames::decode_pieces;
use crate::Input;

/// The bundle served when one is configured.
pub fn bundle() -> BundleSource {
    let bytes: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
    BundleSource::from_bytes(bytes)
}

/// The guest's end of an in-memory connection.
struct Conn {
    input: Vec<u8>,
    pos: usize,
    chunk: usize,
    interrupt: bool,
    tick: bool,
    fail_at_end: bool,
    output: Vec<u8>,
    write_limit: Option<usize>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.interrupt {
            self.tick = !self.tick;
            if self.tick {
                return Err(io::ErrorKind::Interrupted.into());
            }
        }
        let left = self.input.len() - self.pos;
        if left == 0 {
            if self.fail_at_end {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            return Ok(0);
        }
        let n = buf.len().min(self.chunk).min(left);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let room = self
            .write_limit
            .map_or(usize::MAX, |l| l.saturating_sub(self.output.len()));
        if room == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let n = buf.len().min(room);
        self.output.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the host sends, message by message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sent {
    Ack(u64),
    Bundle {
        seq: u64,
        header: BundleHeader,
        bytes: Vec<u8>,
    },
    NoBundle(u64),
}

/// What the host reports, as far as it is deterministic.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Connected,
    Hello(Frame),
    Report(Frame),
    BundleSent(u64),
    NoBundle,
    Error,
    Disconnected,
}

fn seen(e: &Event) -> Seen {
    match e {
        Event::Connected => Seen::Connected,
        Event::Hello(f) => Seen::Hello(f.clone()),
        Event::Report(f) => Seen::Report(f.clone()),
        Event::BundleSent { bytes, .. } => Seen::BundleSent(*bytes),
        Event::NoBundle { .. } => Seen::NoBundle,
        Event::Notice(_) => Seen::Error,
        Event::Error(_) => Seen::Error,
        Event::Disconnected => Seen::Disconnected,
    }
}

/// The conversation as `docs/protocol.md` describes it.
#[derive(Debug, Default)]
struct Model {
    /// Highest report SEQ per (guest, boot id).
    last: HashMap<(String, String), u64>,
}

impl Model {
    fn session(
        &mut self,
        guest: &str,
        wire: &[u8],
        bundle: Option<&BundleSource>,
        fail_at_end: bool,
    ) -> (Vec<Sent>, Vec<Seen>) {
        let outcome = decode_pieces([wire]);
        let mut sent = Vec::new();
        let mut events = vec![Seen::Connected];
        let mut boot_id = String::new();
        let mut said_hello = false;
        let mut broken = false;
        for f in outcome.frames {
            // Nothing before HELLO is believed: the session ends with an error.
            if !said_hello && f.kind != Kind::Hello {
                events.push(Seen::Error);
                broken = true;
                break;
            }
            match f.kind {
                Kind::Hello => {
                    said_hello = true;
                    boot_id = f.get("BOOT_ID").unwrap_or("").to_owned();
                    sent.push(Sent::Ack(f.seq));
                    events.push(Seen::Hello(f));
                }
                Kind::GetBundle => match bundle {
                    Some(b) => {
                        sent.push(Sent::Bundle {
                            seq: f.seq,
                            header: BundleHeader {
                                size: b.bytes.len() as u64,
                                sha256: b.sha256.clone(),
                                compression: b.compression.to_string(),
                                signature: None,
                            },
                            bytes: b.bytes.to_vec(),
                        });
                        events.push(Seen::BundleSent(b.bytes.len() as u64));
                    }
                    None => {
                        events.push(Seen::NoBundle);
                        sent.push(Sent::NoBundle(f.seq));
                    }
                },
                Kind::Step | Kind::Log | Kind::Ready | Kind::Failed | Kind::Exit => {
                    let last = self
                        .last
                        .entry((guest.to_owned(), boot_id.clone()))
                        .or_insert(0);
                    sent.push(Sent::Ack(f.seq));
                    if f.seq > *last {
                        *last = f.seq;
                        events.push(Seen::Report(f));
                    }
                }
                Kind::Ack | Kind::Bundle | Kind::NoBundle => {
                    events.push(Seen::Error);
                    broken = true;
                    break;
                }
            }
        }
        if !broken && (outcome.error.is_some() || outcome.mid_frame || fail_at_end) {
            events.push(Seen::Error);
        }
        events.push(Seen::Disconnected);
        (sent, events)
    }
}

/// Parses what the host sent; `complete` is false when it ends inside a message.
fn parse_sent(mut out: &[u8]) -> (Vec<Sent>, bool) {
    let mut msgs = Vec::new();
    let mut dec = Decoder::new();
    loop {
        let f = match bootlace_contract::protocol::read_frame(&mut out, &mut dec) {
            Ok(f) => f,
            Err(bootlace_contract::protocol::ProtocolError::Closed { mid_frame }) => {
                return (msgs, !mid_frame)
            }
            Err(e) => panic!("the host sent something that is not a frame: {e}"),
        };
        match f.kind {
            Kind::Ack => {
                assert!(f.fields.is_empty(), "ACK with a payload: {f:?}");
                msgs.push(Sent::Ack(f.seq));
            }
            Kind::NoBundle => msgs.push(Sent::NoBundle(f.seq)),
            Kind::Bundle => {
                let header = BundleHeader::from_frame(&f)
                    .unwrap_or_else(|e| panic!("the host sent a bad BUNDLE {f:?}: {e}"));
                let mut bytes = dec.take_buffered();
                bytes.extend_from_slice(out);
                let size = header.size as usize;
                if bytes.len() < size {
                    return (msgs, false);
                }
                let rest = bytes.split_off(size);
                assert_eq!(
                    bootlace_contract::digest::of_bytes(&bytes).hex().to_owned(),
                    header.sha256,
                    "BUNDLE bytes and SHA256"
                );
                msgs.push(Sent::Bundle {
                    seq: f.seq,
                    header,
                    bytes,
                });
                dec.push(&rest);
                out = &[];
            }
            other => panic!("the host sent a guest message: {other}"),
        }
    }
}

/// One session on `host` as `guest`; returns what was sent and reported.
fn session(
    host: &Arc<Host>,
    events: &Arc<Mutex<Vec<GuestEvent>>>,
    guest: &str,
    conn: Conn,
) -> (Vec<u8>, Vec<Seen>) {
    // In the calling thread: a session that does not end is caught by the fuzzer's -timeout,
    // and by the replay test's per-input deadline.
    let mut conn = conn;
    host.handle(&mut conn, guest);
    let output = conn.output;
    let mut all = events.lock().unwrap_or_else(|p| p.into_inner());
    let mine: Vec<Seen> = all
        .iter()
        .filter(|e| e.guest == guest)
        .map(|e| seen(&e.event))
        .collect();
    all.retain(|e| e.guest != guest);
    (output, mine)
}

fn plain(input: &[u8]) -> Conn {
    Conn {
        input: input.to_vec(),
        pos: 0,
        chunk: usize::MAX,
        interrupt: false,
        tick: false,
        fail_at_end: false,
        output: Vec::new(),
        write_limit: None,
    }
}

fn wire(frames: &[Frame]) -> Vec<u8> {
    frames
        .iter()
        .flat_map(|f| f.encode().unwrap_or_else(|e| panic!("{e}")))
        .collect()
}

/// The check.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let chunk = usize::from(input.byte()).max(1);
    let guest_bytes = input.rest();
    let bundle = (flags & 1 != 0).then(bundle);
    let write_limit = match (flags >> 3) % 4 {
        0 => None,
        1 => Some(0),
        2 => Some(20),
        _ => Some(400),
    };

    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(bundle.clone(), move |e| {
        sink.lock().unwrap_or_else(|p| p.into_inner()).push(e)
    }));
    let mut model = Model::default();

    // The fuzzed session.
    let conn = Conn {
        chunk,
        interrupt: flags & 2 != 0,
        fail_at_end: flags & 4 != 0,
        write_limit,
        ..plain(guest_bytes)
    };
    let (out, got) = session(&host, &events, "guest-1", conn);
    let (want_sent, want_events) =
        model.session("guest-1", guest_bytes, bundle.as_ref(), flags & 4 != 0);
    assert_eq!(got.first(), Some(&Seen::Connected), "{got:?}");
    assert_eq!(got.last(), Some(&Seen::Disconnected), "{got:?}");
    let (sent, complete) = parse_sent(&out);
    match write_limit {
        None => {
            assert!(complete, "the host stopped inside a message");
            assert_eq!(sent, want_sent, "what the host sent");
            assert_eq!(got, want_events, "what the host reported");
        }
        Some(limit) => {
            assert!(out.len() <= limit);
            assert!(
                want_sent.starts_with(&sent),
                "sent {sent:?}, not a prefix of {want_sent:?}"
            );
        }
    }

    // Then a well-behaved guest, and the same guest reconnecting.
    let good = [
        Frame::new(Kind::Hello, 0)
            .with("PROTOCOL", 1)
            .with("BOOT_ID", "second"),
        Frame::new(Kind::Step, 1)
            .with("STEP", "host")
            .with("STATE", "finished"),
        Frame::new(Kind::GetBundle, 2),
        Frame::new(Kind::Ready, 3).with("READY", 1),
    ];
    let good = wire(&good);
    for guest in ["guest-2", "guest-1"] {
        let (out, got) = session(&host, &events, guest, plain(&good));
        let (want_sent, want_events) = model.session(guest, &good, bundle.as_ref(), false);
        let (sent, complete) = parse_sent(&out);
        assert!(complete, "{guest}: the host stopped inside a message");
        assert_eq!(sent, want_sent, "{guest}: what the host sent");
        assert_eq!(got, want_events, "{guest}: what the host reported");
        assert_eq!(sent.len(), 4, "{guest}: every message answered");
    }
}
