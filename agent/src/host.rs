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
use bootlace_contract::protocol::{
    read_frame, write_frame, BundleHeader, Decoder, Frame, Kind, ProtocolError,
};

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
    /// The conversation broke (garbage, a dropped connection mid-frame, an I/O error).
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
        if take_one(&self.refused, self.faults.refuse_connections) {
            self.emit(
                guest,
                Event::Error("fault injection: connection refused".to_owned()),
            );
            self.emit(guest, Event::Disconnected);
            return;
        }
        let mut dec = Decoder::new();
        let mut boot_id = String::new();
        loop {
            let f = match read_frame(&mut stream, &mut dec) {
                Ok(f) => f,
                Err(ProtocolError::Closed { mid_frame: false }) => break,
                Err(e) => {
                    self.emit(guest, Event::Error(e.to_string()));
                    break;
                }
            };
            let ack = |stream: &mut S, seq, droppable: bool| -> Result<(), ProtocolError> {
                if self.faults.stall_acks
                    || (droppable && take_one(&self.acks_dropped, self.faults.drop_acks))
                {
                    return Ok(());
                }
                self.pause();
                write_frame(stream, &Frame::new(Kind::Ack, seq))?;
                if self.faults.duplicate_acks {
                    write_frame(stream, &Frame::new(Kind::Ack, seq))?;
                }
                Ok(())
            };
            let result = match f.kind {
                Kind::Hello => {
                    boot_id = f.get("BOOT_ID").unwrap_or("").to_owned();
                    // Ack before telling anyone: a caller that exits on an event (wait-ready)
                    // must not leave the guest without its ack.
                    let r = ack(&mut stream, f.seq, false);
                    self.emit(guest, Event::Hello(f));
                    r
                }
                Kind::GetBundle => self.send_bundle(&mut stream, guest, f.seq),
                Kind::Step | Kind::Log | Kind::Ready | Kind::Failed | Kind::Exit => {
                    let seq = f.seq;
                    let fresh = {
                        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
                        let last = seen.entry((guest.to_owned(), boot_id.clone())).or_insert(0);
                        let fresh = seq > *last;
                        if fresh {
                            *last = seq;
                        }
                        fresh
                    };
                    let r = ack(&mut stream, seq, true);
                    if fresh {
                        self.emit(guest, Event::Report(f));
                    }
                    r
                }
                Kind::Ack | Kind::Bundle | Kind::NoBundle => Err(ProtocolError::Unexpected {
                    got: f.kind,
                    expected: "a guest message",
                }),
            };
            if let Err(e) = result {
                self.emit(guest, Event::Error(e.to_string()));
                break;
            }
        }
        self.emit(guest, Event::Disconnected);
    }

    fn send_bundle<S: Write>(
        &self,
        stream: &mut S,
        guest: &str,
        seq: u64,
    ) -> Result<(), ProtocolError> {
        let Some(b) = &self.bundle else {
            self.emit(guest, Event::NoBundle);
            return write_frame(
                stream,
                &Frame::new(Kind::NoBundle, seq)
                    .with("STATUS", "no bundle is configured for this guest"),
            );
        };
        let header = BundleHeader {
            size: self.faults.announce_size.unwrap_or(b.bytes.len() as u64),
            sha256: b.sha256.clone(),
            compression: b.compression.to_string(),
        };
        self.pause();
        let started = Instant::now();
        write_frame(stream, &header.to_frame(seq))?;
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
        if let Some(n) = self.faults.drop_bundle_after {
            let cut = usize::try_from(n).unwrap_or(usize::MAX).min(bytes.len());
            stream
                .write_all(bytes.get(..cut).unwrap_or(&[]))
                .map_err(ProtocolError::Io)?;
            return Err(ProtocolError::Io(io::Error::other(
                "fault injection: dropped mid-bundle",
            )));
        }
        stream.write_all(bytes).map_err(ProtocolError::Io)?;
        stream.flush().map_err(ProtocolError::Io)?;
        self.emit(
            guest,
            Event::BundleSent {
                bytes: bytes.len() as u64,
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
