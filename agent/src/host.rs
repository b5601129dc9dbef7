//! The host configuration manager: serves bundles to guests and collects what they report.
//!
//! Listeners: hybrid-vsock Unix sockets (`<uds_path>_<port>`, as vhost-device-vsock and other
//! hybrid-vsock VMMs expose a guest's connection to host port P: one socket per VM, so the
//! socket is the guest's identity) and AF_VSOCK (vhost-vsock hosts: the peer CID is
//! the identity). Which configuration a guest gets is the [`Resolve`]r's answer. The
//! conversation itself is a state machine ([`Host::step`]) driven by one event loop for every
//! guest ([`crate::server`]); a bad or slow guest affects only its own session.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootlace_contract::protocol::{read_frame, Decoder, Frame, Kind, ProtocolError};

pub use crate::bundle::{tar_dir, BundleSource, BundleSourceError};
pub use crate::resolve::{Assignment, Identity, Resolve, Single, Transport};
use crate::status::Table;

/// Something a guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A connection opened.
    Connected,
    /// HELLO (its fields).
    Hello(Frame),
    /// STEP, LOG, READY, FAILED, EXIT (each once, duplicates dropped).
    Report(Frame),
    /// The bundle was sent.
    BundleSent {
        /// Bytes.
        bytes: u64,
        /// Their sha256 (hex).
        sha256: String,
        /// Time to write them.
        elapsed: Duration,
    },
    /// The guest asked for a bundle and gets none: why (the resolver's reason, also sent to
    /// the guest as NO-BUNDLE's `STATUS`).
    NoBundle {
        /// Why.
        reason: String,
    },
    /// Something about the host itself: a listener's accept errors, a cap reached, a fleet
    /// reload (reported once per interval when it repeats).
    Notice(String),
    /// The conversation broke (garbage, a dropped connection mid-frame, a write deadline): the
    /// [`ConnectionError`] with its causes, in words.
    Error(String),
    /// The connection closed.
    Disconnected,
}

/// An event and the guest it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestEvent {
    /// The guest, as the host knows it (its socket or `vsock:<cid>`).
    pub guest: String,
    /// Its name in the fleet, when the resolver knows it.
    pub name: Option<String>,
    /// What happened.
    pub event: Event,
}

/// What the host was writing to a guest when a write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Writing {
    /// The ack of a guest message.
    Ack {
        /// The message's kind.
        kind: Kind,
        /// Its sequence number.
        seq: u64,
    },
    /// The answer to GET-BUNDLE when there is no bundle.
    NoBundle,
    /// The BUNDLE frame announcing the bytes.
    BundleHeader,
    /// The bundle's bytes.
    BundleBytes {
        /// Bytes the guest had taken when the write failed.
        written: u64,
        /// The bundle's size.
        size: u64,
    },
}

impl std::fmt::Display for Writing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writing::Ack { kind, seq } => write!(f, "the ACK of {kind} {seq}"),
            Writing::NoBundle => f.write_str("NO-BUNDLE"),
            Writing::BundleHeader => f.write_str("the BUNDLE header"),
            Writing::BundleBytes { written, size } => {
                write!(f, "the bundle ({written} of {size} bytes taken)")
            }
        }
    }
}

/// Why the host ended a guest's connection (the text of an [`Event::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The guest sent something that is not a frame, or hung up mid-frame, or reading failed.
    #[error("reading from the guest")]
    Read(#[source] ProtocolError),
    /// The guest sent a frame only a host sends.
    #[error("the guest sent {got}, which only a host sends")]
    HostOnly {
        /// The frame's kind.
        got: Kind,
    },
    /// The guest sent something before its HELLO: nothing of it is believed.
    #[error("the guest sent {got} before HELLO (every connection starts with HELLO): dropped")]
    BeforeHello {
        /// The frame's kind.
        got: Kind,
    },
    /// A write blocked for the whole write deadline: the guest stopped reading.
    #[error(
        "dropped the guest at the write deadline: it took nothing for {} while the host wrote {what}",
        human(*deadline)
    )]
    WriteDeadline {
        /// What was being written.
        what: Writing,
        /// The deadline ([`Host::with_write_timeout`]).
        deadline: Duration,
    },
    /// A write failed otherwise (the guest hung up).
    #[error("writing {what} to the guest")]
    Write {
        /// What was being written.
        what: Writing,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection said nothing whole within the HELLO deadline.
    #[error("no HELLO within {} of connecting: closed", human(*after))]
    NoHello {
        /// The deadline ([`Limits::hello_timeout`]).
        after: Duration,
    },
    /// The host needed the descriptor for another guest: connections that have not said
    /// HELLO are closed first, oldest first.
    #[error("closed before HELLO: the host is at its connection limit and closes those first")]
    Evicted,
    /// Fault injection closed the connection.
    #[error("fault injection: {0}")]
    Fault(&'static str),
}

/// `30 s`, `300 ms`.
fn human(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// Fault injection for tests of the guest: what the host does wrong on purpose. Parsed from
/// `--fault KIND[=ARG]` flags by [`Faults::add`] (see `crate::fault`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    /// Flip a byte of the bundle on the wire (the announced sha256 stays the true one).
    pub corrupt_bundle: bool,
    /// Close the connection after this many bundle bytes.
    pub drop_bundle_after: Option<u64>,
    /// Never acknowledge (the guest's per-read timeout must fire).
    pub stall_acks: bool,
    /// Close this many new connections at once, reading nothing (a host refusing guests).
    pub refuse_connections: u32,
    /// Wait this long before every frame the host writes (a slow host).
    pub delay: Option<Duration>,
    /// Announce this `SIZE` in the bundle header; the true bytes are sent (a lying length).
    pub announce_size: Option<u64>,
    /// Send every ack twice.
    pub duplicate_acks: bool,
    /// Leave this many guest messages unacknowledged (HELLO excepted): lost acks.
    pub drop_acks: u32,
}

/// Takes one from a budget of `max` (false once it is spent).
fn take_one(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

/// The host side of every guest conversation: the protocol state of each connection, the
/// resolver that says which guest is which, the table of guests, and the listeners (one event
/// loop for all of them, see [`crate::server`]).
pub struct Host {
    resolver: Arc<dyn Resolve>,
    /// Highest sequence number reported, per guest and boot id (for dropping duplicates); a
    /// guest's last [`BOOTS_REMEMBERED`] boots only.
    seen: Mutex<HashMap<String, Vec<(String, u64)>>>,
    sink: Box<dyn Fn(GuestEvent) + Send + Sync>,
    pub(crate) faults: Faults,
    /// Connections refused and acks dropped so far (fault injection budgets).
    refused: AtomicU32,
    acks_dropped: AtomicU32,
    /// How long one write to a guest may block before the connection is given up.
    pub(crate) write_timeout: Duration,
    pub(crate) limits: Limits,
    pub(crate) table: Mutex<Table>,
    pub(crate) server: crate::server::Server,
    /// The listeners a fleet asked for (see [`crate::fleet::Fleet::watch`]).
    pub(crate) fleet_sockets: Mutex<Vec<PathBuf>>,
}

/// Boots per guest whose report sequence numbers are remembered (a guest that reboots in a
/// loop cannot grow the host's memory).
pub const BOOTS_REMEMBERED: usize = 4;

/// Default [`Host::with_write_timeout`]: a guest that reads nothing for this long while the
/// host is sending (a bundle, an ack) loses its connection.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What one guest, and all of them, may hold of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once, all guests together; `0`: as many as the open-file limit
    /// allows, less a reserve ([`FD_RESERVE`]) and the listeners.
    pub max_connections: usize,
    /// Connections open at once from one guest (one socket, one CID).
    pub max_per_guest: u32,
    /// A connection that has not said HELLO within this long is closed.
    pub hello_timeout: Duration,
    /// How often a repeated problem (accept errors, caps) is reported: once per interval,
    /// with the count of the ones not reported.
    pub report_interval: Duration,
}

/// File descriptors kept free of guest connections (the status socket, bundle reloads, logs).
pub const FD_RESERVE: usize = 64;

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 0,
            max_per_guest: 8,
            hello_timeout: Duration::from_secs(10),
            report_interval: Duration::from_secs(10),
        }
    }
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("limits", &self.limits)
            .field("faults", &self.faults)
            .finish_non_exhaustive()
    }
}

/// The protocol state of one connection.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) transport: Transport,
    /// [`Transport::label`].
    pub(crate) guest: String,
    /// The guest's name in the fleet, once the resolver knows it.
    pub(crate) name: Option<String>,
    /// `Some` once the guest said HELLO on this connection: before it, nothing is believed.
    pub(crate) boot_id: Option<String>,
    instance_id: Option<String>,
    init_version: Option<String>,
    /// HELLO's `IMAGE`: the image the guest's init was baked into.
    image: Option<String>,
}

impl Session {
    pub(crate) fn new(transport: Transport) -> Session {
        Session {
            guest: transport.label(),
            transport,
            name: None,
            boot_id: None,
            instance_id: None,
            init_version: None,
            image: None,
        }
    }

    fn identity(&self) -> Identity<'_> {
        Identity {
            transport: &self.transport,
            instance_id: self.instance_id.as_deref().filter(|s| !s.is_empty()),
            boot_id: self.boot_id.as_deref(),
            init_version: self.init_version.as_deref(),
            image: self.image.as_deref(),
        }
    }
}

/// What the host does next on a connection, in order (the drivers, blocking or event-driven,
/// carry it out; a failed write skips the writes after it, never the events).
#[derive(Debug)]
pub(crate) enum Out {
    /// Write a frame (after the delay fault, if any).
    Frame(Frame, Writing),
    /// Write the BUNDLE header and the bytes (faults applied), then report `BundleSent`.
    Bundle(Arc<BundleSource>, Frame),
    /// Report an event.
    Emit(Event),
}

impl Host {
    /// A host serving `bundle` (if any) to every guest and passing every event to `sink`.
    pub fn new(
        bundle: Option<BundleSource>,
        sink: impl Fn(GuestEvent) + Send + Sync + 'static,
    ) -> Host {
        Host::with_resolver(Arc::new(Single(bundle.map(Arc::new))), sink)
    }

    /// A host that asks `resolver` which guest is which and what each gets.
    pub fn with_resolver(
        resolver: Arc<dyn Resolve>,
        sink: impl Fn(GuestEvent) + Send + Sync + 'static,
    ) -> Host {
        Host {
            resolver,
            seen: Mutex::new(HashMap::new()),
            sink: Box::new(sink),
            faults: Faults::default(),
            refused: AtomicU32::new(0),
            acks_dropped: AtomicU32::new(0),
            write_timeout: WRITE_TIMEOUT,
            limits: Limits::default(),
            table: Mutex::new(Table::default()),
            server: crate::server::Server::default(),
            fleet_sockets: Mutex::new(Vec::new()),
        }
    }

    /// The same host, giving up a connection whose guest blocks one write for longer than
    /// `timeout` (default [`WRITE_TIMEOUT`]).
    pub fn with_write_timeout(mut self, timeout: Duration) -> Host {
        self.write_timeout = timeout;
        self
    }

    /// The same host, misbehaving as told.
    pub fn with_faults(mut self, faults: Faults) -> Host {
        self.faults = faults;
        self
    }

    /// The same host with these connection limits.
    pub fn with_limits(mut self, limits: Limits) -> Host {
        self.limits = limits;
        self
    }

    /// The table of guests, as JSON (what `bootlace-agent status` prints).
    pub fn status(&self) -> serde_json::Value {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.to_json(&self.server.counters())
    }

    /// The table in Prometheus' text format.
    pub fn metrics(&self) -> String {
        let table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        table.to_prometheus(&self.server.counters())
    }

    pub(crate) fn emit(&self, session_name: Option<&str>, guest: &str, event: Event) {
        {
            let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
            table.record(guest, session_name, &event);
        }
        (self.sink)(GuestEvent {
            guest: guest.to_owned(),
            name: session_name.map(str::to_owned),
            event,
        });
    }

    /// Whether this connection is refused by the `refuse` fault (which counts it).
    pub(crate) fn refuse_fault(&self) -> bool {
        take_one(&self.refused, self.faults.refuse_connections)
    }

    /// Records a new connection's resolution (by transport alone) and reports it.
    pub(crate) fn open(&self, s: &mut Session) {
        s.name = self.resolver.resolve(&s.identity()).name;
        self.emit(s.name.as_deref(), &s.guest, Event::Connected);
    }

    /// The answer to one guest frame: what to write and report, in order.
    pub(crate) fn step(&self, s: &mut Session, f: Frame) -> Result<Vec<Out>, ConnectionError> {
        if s.boot_id.is_none() && f.kind != Kind::Hello {
            return Err(ConnectionError::BeforeHello { got: f.kind });
        }
        let mut out = Vec::new();
        match f.kind {
            Kind::Hello => {
                s.boot_id = Some(f.get("BOOT_ID").unwrap_or("").to_owned());
                s.instance_id = f.get("INSTANCE_ID").map(str::to_owned);
                s.init_version = f.get("INIT_VERSION").map(str::to_owned);
                s.image = f.get("IMAGE").map(str::to_owned);
                let a = self.resolver.resolve(&s.identity());
                s.name = a.name.clone();
                {
                    let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
                    table.expect_image(&s.guest, a.image.as_deref());
                }
                // Ack before telling anyone: a caller that exits on an event (wait-ready)
                // must not leave the guest without its ack.
                self.ack(&mut out, &f, false);
                out.push(Out::Emit(Event::Hello(f)));
            }
            Kind::GetBundle => {
                let mut a = self.resolver.resolve(&s.identity());
                s.name = a.name.clone().or(s.name.take());
                if let Some(why) = wrong_image(s, &a) {
                    a.bundle = None;
                    a.reason = Some(why);
                }
                match a.bundle {
                    Some(b) => {
                        let size = self.faults.announce_size.unwrap_or(b.bytes.len() as u64);
                        let header = b.header(size).to_frame(f.seq);
                        out.push(Out::Bundle(b, header));
                    }
                    None => {
                        let reason = a.why_none();
                        out.push(Out::Emit(Event::NoBundle {
                            reason: reason.clone(),
                        }));
                        let none = Frame::new(Kind::NoBundle, f.seq).with("STATUS", reason);
                        out.push(Out::Frame(none, Writing::NoBundle));
                    }
                }
            }
            Kind::Step | Kind::Log | Kind::Ready | Kind::Failed | Kind::Exit => {
                let fresh = self.first_time(&s.guest, s.boot_id.as_deref().unwrap_or(""), f.seq);
                self.ack(&mut out, &f, true);
                if fresh {
                    out.push(Out::Emit(Event::Report(f)));
                }
            }
            Kind::Ack | Kind::Bundle | Kind::NoBundle => {
                return Err(ConnectionError::HostOnly { got: f.kind })
            }
        }
        Ok(out)
    }

    /// Whether report `seq` of this guest and boot is new (a resend is not); records it.
    fn first_time(&self, guest: &str, boot_id: &str, seq: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let boots = seen.entry(guest.to_owned()).or_default();
        let i = match boots.iter().position(|(b, _)| b == boot_id) {
            Some(i) => i,
            None => {
                if boots.len() >= BOOTS_REMEMBERED {
                    boots.remove(0);
                }
                boots.push((boot_id.to_owned(), 0));
                boots.len() - 1
            }
        };
        let Some((_, last)) = boots.get_mut(i) else {
            return true;
        };
        let fresh = seq > *last;
        if fresh {
            *last = seq;
        }
        fresh
    }

    /// Acknowledges `f` (unless a fault says not to; `droppable`: the drop-acks fault applies).
    fn ack(&self, out: &mut Vec<Out>, f: &Frame, droppable: bool) {
        if self.faults.stall_acks
            || (droppable && take_one(&self.acks_dropped, self.faults.drop_acks))
        {
            return;
        }
        let what = Writing::Ack {
            kind: f.kind,
            seq: f.seq,
        };
        let ack = Frame::new(Kind::Ack, f.seq);
        if self.faults.duplicate_acks {
            out.push(Out::Frame(ack.clone(), what.clone()));
        }
        out.push(Out::Frame(ack, what));
    }

    /// The bytes of the bundle as the faults would have them: corrupted, and cut short
    /// (`Some(n)`: the connection closes after `n` bytes).
    pub(crate) fn bundle_bytes<'a>(&self, b: &'a BundleSource) -> (Cow<'a, [u8]>, Option<usize>) {
        let mut bytes: Cow<'a, [u8]> = Cow::Borrowed(&b.bytes);
        if self.faults.corrupt_bundle && !bytes.is_empty() {
            let mid = bytes.len() / 2;
            if let Some(x) = bytes.to_mut().get_mut(mid) {
                *x ^= 0xff;
            }
        }
        let cut = self
            .faults
            .drop_bundle_after
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len()));
        (bytes, cut)
    }

    /// Runs one connection to its end, blocking (the event loop in [`crate::server`] runs
    /// the same conversation without a thread per connection; this is for in-memory streams,
    /// tests and the fuzz harness).
    pub fn handle<S: Read + Write>(&self, mut stream: S, guest: &str) {
        let mut s = Session::new(Transport::Memory(guest.to_owned()));
        self.open(&mut s);
        let result = if self.refuse_fault() {
            Err(ConnectionError::Fault("connection refused"))
        } else {
            self.converse(&mut stream, &mut s)
        };
        if let Err(e) = result {
            self.emit(
                s.name.as_deref(),
                &s.guest,
                Event::Error(bootlace_contract::chain(&e)),
            );
        }
        self.emit(s.name.as_deref(), &s.guest, Event::Disconnected);
    }

    fn converse<S: Read + Write>(
        &self,
        stream: &mut S,
        s: &mut Session,
    ) -> Result<(), ConnectionError> {
        let mut dec = Decoder::new();
        loop {
            let f = match read_frame(stream, &mut dec) {
                Ok(f) => f,
                Err(ProtocolError::Closed { mid_frame: false }) => return Ok(()),
                Err(e) => return Err(ConnectionError::Read(e)),
            };
            let mut failed = None;
            for o in self.step(s, f)? {
                match o {
                    Out::Emit(e) => self.emit(s.name.as_deref(), &s.guest, e),
                    _ if failed.is_some() => {}
                    Out::Frame(frame, what) => {
                        self.pause();
                        failed = self.write_frame(stream, &frame, &what).err();
                    }
                    Out::Bundle(b, header) => {
                        failed = self.send_bundle(stream, s, &b, &header).err();
                    }
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
    }

    fn pause(&self) {
        if let Some(d) = self.faults.delay {
            std::thread::sleep(d);
        }
    }

    fn write_frame<S: Write>(
        &self,
        stream: &mut S,
        frame: &Frame,
        what: &Writing,
    ) -> Result<(), ConnectionError> {
        let bytes = encode(frame, what)?;
        self.write_bytes(stream, &bytes, |_| what.clone())
    }

    /// Writes all of `bytes`; a failure names what was written (`what` is given the count of
    /// bytes the guest had taken) and, when the write deadline passed, says so.
    fn write_bytes<S: Write>(
        &self,
        stream: &mut S,
        bytes: &[u8],
        what: impl Fn(u64) -> Writing,
    ) -> Result<(), ConnectionError> {
        let mut written = 0u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            match stream.write(rest) {
                Ok(0) => {
                    return Err(self.write_failed(what(written), io::ErrorKind::WriteZero.into()))
                }
                Ok(n) => {
                    written += n as u64;
                    rest = rest.get(n..).unwrap_or_default();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.write_failed(what(written), e)),
            }
        }
        stream
            .flush()
            .map_err(|e| self.write_failed(what(written), e))
    }

    /// The error of a failed write: the deadline when it passed, else the cause.
    pub(crate) fn write_failed(&self, what: Writing, source: io::Error) -> ConnectionError {
        match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::WriteDeadline {
                what,
                deadline: self.write_timeout,
            },
            _ => ConnectionError::Write { what, source },
        }
    }

    fn send_bundle<S: Write>(
        &self,
        stream: &mut S,
        s: &Session,
        b: &BundleSource,
        header: &Frame,
    ) -> Result<(), ConnectionError> {
        self.pause();
        let started = Instant::now();
        self.write_frame(stream, header, &Writing::BundleHeader)?;
        let (bytes, cut) = self.bundle_bytes(b);
        let size = bytes.len() as u64;
        let what = |written| Writing::BundleBytes { written, size };
        if let Some(n) = cut {
            self.write_bytes(stream, bytes.get(..n).unwrap_or_default(), what)?;
            return Err(ConnectionError::Fault("dropped mid-bundle"));
        }
        self.write_bytes(stream, &bytes, what)?;
        self.bundle_sent(s, b, size, started);
        Ok(())
    }

    /// Reports a bundle written whole (`size` bytes, started at `started`).
    pub(crate) fn bundle_sent(&self, s: &Session, b: &BundleSource, size: u64, started: Instant) {
        self.emit(
            s.name.as_deref(),
            &s.guest,
            Event::BundleSent {
                bytes: size,
                sha256: b.sha256.clone(),
                elapsed: started.elapsed(),
            },
        );
    }

    /// Listens on the hybrid-vsock Unix socket `path` (`<uds_path>_<port>`) on the host's
    /// event loop. A stale socket file is replaced. The guest is identified by `path`.
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        crate::server::listen_unix(self, path)
    }

    /// Stops listening on `path` (a [`Host::serve_unix`] socket) and removes its socket file;
    /// connections already open go on. An orchestrator calls it when the VM is gone.
    pub fn unserve_unix(&self, path: &Path) {
        crate::server::unlisten(self, path)
    }

    /// Listens on AF_VSOCK port `port` (hosts with vhost-vsock) on the host's event loop; the
    /// guest is identified by its peer CID (`vsock:<cid>`), never by what it says.
    pub fn serve_vsock(self: &Arc<Self>, port: u32) -> io::Result<()> {
        crate::server::listen_vsock(self, port)
    }

    /// Serves `GET /metrics` in Prometheus' text format over HTTP on `addr` (port 0: any);
    /// the address bound.
    pub fn serve_metrics(
        self: &Arc<Self>,
        addr: std::net::SocketAddr,
    ) -> io::Result<std::net::SocketAddr> {
        crate::server::listen_metrics(self, addr)
    }

    /// Answers `bootlace-agent status` on the Unix socket `path`: the table as JSON, or in
    /// Prometheus' text format when the request line is `metrics`.
    pub fn serve_status(self: &Arc<Self>, path: &Path) -> io::Result<()> {
        crate::server::listen_status(self, path)
    }
}

/// Why a guest that runs another image than its assignment says gets no bundle, if it does:
/// the assignment's `name@version` must be the one the guest reported, or its `name` alone
/// the name of it (any version). A guest that reports no image (an init before `IMAGE`) is
/// not checked.
fn wrong_image(s: &Session, a: &Assignment) -> Option<String> {
    let (want, got) = (a.image.as_deref()?, s.image.as_deref()?);
    let same = if want.contains('@') {
        want == got
    } else {
        got.split_once('@').is_some_and(|(name, _)| name == want)
    };
    (!same).then(|| {
        format!(
            "{} runs image {got}; the fleet says {want}{}",
            s.guest,
            a.name
                .as_deref()
                .map(|n| format!(" for guest {n:?}"))
                .unwrap_or_default()
        )
    })
}

/// A frame's bytes, or the error of writing it.
pub(crate) fn encode(frame: &Frame, what: &Writing) -> Result<Vec<u8>, ConnectionError> {
    frame.encode().map_err(|e| ConnectionError::Write {
        what: what.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// The hybrid-vsock listener path for `port` under `uds_path`: `<uds_path>_<port>` (the
/// path's bytes kept as they are, UTF-8 or not).
pub fn hybrid_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut s = uds_path.as_os_str().to_owned();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// One line for people: `READY STATUS=up`, `bundle sent: 1048576 bytes in 12 ms (87.4 MB/s)`.
pub fn describe(event: &Event) -> String {
    escape_controls(&describe_raw(event))
}

/// Control characters (escape sequences, carriage returns, …) as Rust escapes, so that text a
/// guest sends cannot drive the terminal that shows it: `\u{1b}[2J`, `\r`.
pub fn escape_controls(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn describe_raw(event: &Event) -> String {
    match event {
        Event::Connected => "connected".to_owned(),
        Event::Hello(f) | Event::Report(f) => {
            let fields: Vec<String> = f.fields.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{} {}", f.kind, fields.join(" "))
                .trim_end()
                .to_owned()
        }
        Event::BundleSent { bytes, elapsed, .. } => {
            let secs = elapsed.as_secs_f64().max(1e-9);
            format!(
                "bundle sent: {bytes} bytes in {} ms ({:.1} MB/s)",
                elapsed.as_millis(),
                *bytes as f64 / secs / 1e6
            )
        }
        Event::NoBundle { reason } => format!("asked for a bundle; none sent: {reason}"),
        Event::Notice(m) => format!("notice: {m}"),
        Event::Error(e) => format!("error: {e}"),
        Event::Disconnected => "disconnected".to_owned(),
    }
}

/// One JSON object for tools: `{"guest":…,"event":"report","kind":"READY","fields":{…}}`.
pub fn to_json(e: &GuestEvent) -> String {
    let mut v = serde_json::json!({ "guest": e.guest });
    if let (Some(name), Some(obj)) = (&e.name, v.as_object_mut()) {
        obj.insert("name".to_owned(), serde_json::Value::String(name.clone()));
    }
    let fields = |f: &Frame| {
        serde_json::Value::Object(
            f.fields
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect(),
        )
    };
    let (event, extra) = match &e.event {
        Event::Connected => ("connected", serde_json::json!({})),
        Event::Hello(f) => ("hello", serde_json::json!({ "fields": fields(f) })),
        Event::Report(f) => (
            "report",
            serde_json::json!({ "kind": f.kind.as_str(), "seq": f.seq, "fields": fields(f) }),
        ),
        Event::BundleSent {
            bytes,
            sha256,
            elapsed,
        } => (
            "bundle_sent",
            serde_json::json!({ "bytes": bytes, "sha256": sha256, "ms": elapsed.as_secs_f64() * 1000.0 }),
        ),
        Event::NoBundle { reason } => ("no_bundle", serde_json::json!({ "reason": reason })),
        Event::Notice(m) => ("notice", serde_json::json!({ "message": m })),
        Event::Error(m) => ("error", serde_json::json!({ "message": m })),
        Event::Disconnected => ("disconnected", serde_json::json!({})),
    };
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        obj.insert(
            "event".to_owned(),
            serde_json::Value::String(event.to_owned()),
        );
        for (k, x) in extra {
            obj.insert(k.clone(), x.clone());
        }
    }
    v.to_string()
}
