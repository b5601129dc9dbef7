//! The host configuration manager: serves bundles to guests and collects what they report.
//!
//! Listeners: hybrid-vsock Unix sockets (`<uds_path>_<port>`, as vhost-device-vsock and other
//! hybrid-vsock VMMs expose a guest's connection to host port P: one socket per VM, so the
//! socket is the guest's identity) and AF_VSOCK (vhost-vsock hosts: the peer CID is
//! the identity). Never what the guest claims. One thread per connection; a bad or slow guest
//! affects only its own thread.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootlace_contract::compression::Compression;
use bootlace_contract::protocol::{read_frame, BundleHeader, Decoder, Frame, Kind, ProtocolError};

/// A bundle ready to serve: the exact bytes, their digest and compression.
#[derive(Debug, Clone)]
pub struct BundleSource {
    /// The bytes.
    pub bytes: Arc<Vec<u8>>,
    /// sha256, hex.
    pub sha256: String,
    /// How the bytes are compressed (sniffed from their magic number).
    pub compression: Compression,
}

/// Why a bundle could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BundleSourceError {
    /// Reading failed.
    #[error("read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl BundleSource {
    /// Bytes as they are; the compression is sniffed from the magic number.
    pub fn from_bytes(bytes: Vec<u8>) -> BundleSource {
        BundleSource {
            sha256: bootlace_contract::digest::of_bytes(&bytes).hex().to_owned(),
            compression: bootlace_contract::compression::sniff(&bytes),
            bytes: Arc::new(bytes),
        }
    }

    /// `<N> bytes, <compression>, sha256:<hex>`: what a person needs to pin it.
    pub fn summary(&self) -> String {
        format!(
            "{} bytes, {}, sha256:{}",
            self.bytes.len(),
            self.compression,
            self.sha256
        )
    }

    /// A prebuilt tarball (tar, tar.gz, tar.zst), or a directory tarred deterministically
    /// (sorted entries, mtime 0, root owner; see [`tar_dir`]).
    pub fn from_path(path: &Path) -> Result<BundleSource, BundleSourceError> {
        let err = |source| BundleSourceError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        let bytes = if meta.is_dir() {
            tar_dir(path, 0).map_err(err)?
        } else {
            std::fs::read(path).map_err(err)?
        };
        Ok(BundleSource::from_bytes(bytes))
    }
}

/// A deterministic uncompressed tar of a directory: entries sorted by path, mtime `mtime`,
/// uid/gid 0, modes kept, symlinks kept as links.
pub fn tar_dir(dir: &Path, mtime: u64) -> io::Result<Vec<u8>> {
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let full = e.path();
            let r = rel.join(e.file_name());
            let is_dir = e.file_type()?.is_dir();
            out.push((full.clone(), r.clone()));
            if is_dir {
                walk(&full, &r, out)?;
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    walk(dir, Path::new(""), &mut list)?;
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for (full, rel) in list {
        let meta = std::fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            b.append_link(&mut h, &rel, target)?;
        } else if meta.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
        } else if meta.is_file() {
            b.append_data(&mut h, &rel, std::fs::File::open(&full)?)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: only files, directories and symlinks go in a bundle",
                    full.display()
                ),
            ));
        }
    }
    b.into_inner()
}

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
        /// Time to write them.
        elapsed: Duration,
    },
    /// The guest asked for a bundle there is none of.
    NoBundle,
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

/// The host side of every guest conversation.
pub struct Host {
    bundle: Option<BundleSource>,
    /// Highest sequence number reported, per guest and boot id (for dropping duplicates).
    seen: Mutex<HashMap<(String, String), u64>>,
    sink: Box<dyn Fn(GuestEvent) + Send + Sync>,
    faults: Faults,
    /// Connections refused and acks dropped so far (fault injection budgets).
    refused: AtomicU32,
    acks_dropped: AtomicU32,
    /// How long one write to a guest may block before the connection is given up.
    write_timeout: Duration,
}

/// Default [`Host::with_write_timeout`]: a guest that reads nothing for this long while the
/// host is sending (a bundle, an ack) loses its connection and frees its thread.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("bundle", &self.bundle.as_ref().map(|b| &b.sha256))
            .finish()
    }
}

impl Host {
    /// A host serving `bundle` (if any) and passing every event to `sink`.
    pub fn new(
        bundle: Option<BundleSource>,
        sink: impl Fn(GuestEvent) + Send + Sync + 'static,
    ) -> Host {
        Host {
            bundle,
            seen: Mutex::new(HashMap::new()),
            sink: Box::new(sink),
            faults: Faults::default(),
            refused: AtomicU32::new(0),
            acks_dropped: AtomicU32::new(0),
            write_timeout: WRITE_TIMEOUT,
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

    fn emit(&self, guest: &str, event: Event) {
        (self.sink)(GuestEvent {
            guest: guest.to_owned(),
            event,
        });
    }

    fn pause(&self) {
        if let Some(d) = self.faults.delay {
            std::thread::sleep(d);
        }
    }

    /// Runs one connection to its end.
    pub fn handle<S: Read + Write>(&self, mut stream: S, guest: &str) {
        self.emit(guest, Event::Connected);
        let result = if take_one(&self.refused, self.faults.refuse_connections) {
            Err(ConnectionError::Fault("connection refused"))
        } else {
            self.converse(&mut stream, guest)
        };
        if let Err(e) = result {
            self.emit(guest, Event::Error(bootlace_contract::chain(&e)));
        }
        self.emit(guest, Event::Disconnected);
    }

    /// Answers the guest's frames until it hangs up (`Ok`) or the conversation breaks.
    fn converse<S: Read + Write>(
        &self,
        stream: &mut S,
        guest: &str,
    ) -> Result<(), ConnectionError> {
        let mut dec = Decoder::new();
        // `Some` once the guest said HELLO on this connection: before it, nothing is believed.
        let mut boot_id: Option<String> = None;
        loop {
            let f = match read_frame(stream, &mut dec) {
                Ok(f) => f,
                Err(ProtocolError::Closed { mid_frame: false }) => return Ok(()),
                Err(e) => return Err(ConnectionError::Read(e)),
            };
            if boot_id.is_none() && f.kind != Kind::Hello {
                return Err(ConnectionError::BeforeHello { got: f.kind });
            }
            match f.kind {
                Kind::Hello => {
                    boot_id = Some(f.get("BOOT_ID").unwrap_or("").to_owned());
                    // Ack before telling anyone: a caller that exits on an event (wait-ready)
                    // must not leave the guest without its ack.
                    let r = self.ack(stream, &f, false);
                    self.emit(guest, Event::Hello(f));
                    r?;
                }
                Kind::GetBundle => self.send_bundle(stream, guest, f.seq)?,
                Kind::Step | Kind::Log | Kind::Ready | Kind::Failed | Kind::Exit => {
                    let fresh = self.first_time(guest, boot_id.as_deref().unwrap_or(""), f.seq);
                    let r = self.ack(stream, &f, true);
                    if fresh {
                        self.emit(guest, Event::Report(f));
                    }
                    r?;
                }
                Kind::Ack | Kind::Bundle | Kind::NoBundle => {
                    return Err(ConnectionError::HostOnly { got: f.kind })
                }
            }
        }
    }

    /// Whether report `seq` of this guest and boot is new (a resend is not); records it.
    fn first_time(&self, guest: &str, boot_id: &str, seq: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let last = seen
            .entry((guest.to_owned(), boot_id.to_owned()))
            .or_insert(0);
        let fresh = seq > *last;
        if fresh {
            *last = seq;
        }
        fresh
    }

    /// Acknowledges `f` (unless a fault says not to; `droppable`: the drop-acks fault applies).
    fn ack<S: Write>(
        &self,
        stream: &mut S,
        f: &Frame,
        droppable: bool,
    ) -> Result<(), ConnectionError> {
        if self.faults.stall_acks
            || (droppable && take_one(&self.acks_dropped, self.faults.drop_acks))
        {
            return Ok(());
        }
        self.pause();
        let what = Writing::Ack {
            kind: f.kind,
            seq: f.seq,
        };
        let ack = Frame::new(Kind::Ack, f.seq);
        self.write_frame(stream, &ack, &what)?;
        if self.faults.duplicate_acks {
            self.write_frame(stream, &ack, &what)?;
        }
        Ok(())
    }

    fn write_frame<S: Write>(
        &self,
        stream: &mut S,
        frame: &Frame,
        what: &Writing,
    ) -> Result<(), ConnectionError> {
        let bytes = frame.encode().map_err(|e| ConnectionError::Write {
            what: what.clone(),
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
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
        let failed = |written, source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::WriteDeadline {
                what: what(written),
                deadline: self.write_timeout,
            },
            _ => ConnectionError::Write {
                what: what(written),
                source,
            },
        };
        while !rest.is_empty() {
            match stream.write(rest) {
                Ok(0) => return Err(failed(written, io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    written += n as u64;
                    rest = rest.get(n..).unwrap_or_default();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(failed(written, e)),
            }
        }
        stream.flush().map_err(|e| failed(written, e))
    }

    fn send_bundle<S: Write>(
        &self,
        stream: &mut S,
        guest: &str,
        seq: u64,
    ) -> Result<(), ConnectionError> {
        let Some(b) = &self.bundle else {
            self.emit(guest, Event::NoBundle);
            let none = Frame::new(Kind::NoBundle, seq)
                .with("STATUS", "no bundle is configured for this guest");
            return self.write_frame(stream, &none, &Writing::NoBundle);
        };
        let header = BundleHeader {
            size: self.faults.announce_size.unwrap_or(b.bytes.len() as u64),
            sha256: b.sha256.clone(),
            compression: b.compression.to_string(),
        };
        self.pause();
        let started = Instant::now();
        self.write_frame(stream, &header.to_frame(seq), &Writing::BundleHeader)?;
        let mut bytes: &[u8] = &b.bytes;
        let owned;
        if self.faults.corrupt_bundle && !bytes.is_empty() {
            let mut v = bytes.to_vec();
            let mid = v.len() / 2;
            if let Some(x) = v.get_mut(mid) {
                *x ^= 0xff;
            }
            owned = v;
            bytes = &owned;
        }
        let size = bytes.len() as u64;
        let what = |written| Writing::BundleBytes { written, size };
        if let Some(n) = self.faults.drop_bundle_after {
            let cut = usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len());
            self.write_bytes(stream, bytes.get(..cut).unwrap_or_default(), what)?;
            return Err(ConnectionError::Fault("dropped mid-bundle"));
        }
        self.write_bytes(stream, bytes, what)?;
        self.emit(
            guest,
            Event::BundleSent {
                bytes: size,
                elapsed: started.elapsed(),
            },
        );
        Ok(())
    }

    /// Listens on the hybrid-vsock Unix socket `path` (`<uds_path>_<port>`), one thread per
    /// connection. A stale socket file is replaced. The guest is identified by `path`.
    pub fn serve_unix(self: &Arc<Self>, path: &Path) -> io::Result<std::thread::JoinHandle<()>> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let host = Arc::clone(self);
        let guest = path.display().to_string();
        Ok(std::thread::spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(stream) => {
                        let host = Arc::clone(&host);
                        let guest = guest.clone();
                        if let Err(e) = stream.set_write_timeout(Some(host.write_timeout)) {
                            host.emit(&guest, Event::Error(format!("write deadline: {e}")));
                            continue;
                        }
                        std::thread::spawn(move || host.handle(stream, &guest));
                    }
                    Err(e) => host.emit(&guest, Event::Error(format!("accept: {e}"))),
                }
            }
        }))
    }
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
        Event::BundleSent { bytes, elapsed } => {
            let secs = elapsed.as_secs_f64().max(1e-9);
            format!(
                "bundle sent: {bytes} bytes in {} ms ({:.1} MB/s)",
                elapsed.as_millis(),
                *bytes as f64 / secs / 1e6
            )
        }
        Event::NoBundle => "asked for a bundle; none is configured".to_owned(),
        Event::Error(e) => format!("error: {e}"),
        Event::Disconnected => "disconnected".to_owned(),
    }
}

/// One JSON object for tools: `{"guest":…,"event":"report","kind":"READY","fields":{…}}`.
pub fn to_json(e: &GuestEvent) -> String {
    let mut v = serde_json::json!({ "guest": e.guest });
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
        Event::BundleSent { bytes, elapsed } => (
            "bundle_sent",
            serde_json::json!({ "bytes": bytes, "ms": elapsed.as_secs_f64() * 1000.0 }),
        ),
        Event::NoBundle => ("no_bundle", serde_json::json!({})),
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

/// Listens on AF_VSOCK port `port` (hosts with vhost-vsock), one thread per connection; the
/// guest is identified by its peer CID (`vsock:<cid>`), never by what it says.
pub fn serve_vsock(host: &Arc<Host>, port: u32) -> io::Result<std::thread::JoinHandle<()>> {
    let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)?;
    let host = Arc::clone(host);
    Ok(std::thread::spawn(move || loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let guest = format!("vsock:{}", peer.cid());
                if let Err(e) = stream.set_write_timeout(Some(host.write_timeout)) {
                    host.emit(&guest, Event::Error(format!("write deadline: {e}")));
                    continue;
                }
                let host = Arc::clone(&host);
                std::thread::spawn(move || host.handle(stream, &guest));
            }
            Err(e) => host.emit(
                &format!("vsock:*:{port}"),
                Event::Error(format!("accept: {e}")),
            ),
        }
    }))
}
