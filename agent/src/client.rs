//! The guest side of the conversation, independent of the transport: the init gives it a
//! function that opens a connection (AF_VSOCK to CID 2 in a guest; a Unix socket in tests).
//!
//! - Connecting retries with exponential backoff until a total deadline, so the boot never
//!   waits forever for an absent host.
//! - Up to READY, every message is acknowledged. A message whose ack does not come (the
//!   connection broke, or the per-read timeout of the transport fired) is sent again on a new
//!   connection, with the same sequence number, a bounded number of times; the host drops
//!   duplicates.
//! - Once READY is acknowledged the hand-off must not wait for the host: a later report is
//!   written without waiting for its ack (a host that is there still acks it; the ack is
//!   skipped later, like a duplicate), a write that the host does not take within
//!   [`AFTER_READY_WRITE_LIMIT`] is given up, and nothing is resent. Only FAILED and EXIT, the
//!   guest's last words before it powers off, wait up to [`FINAL_ACK_WAIT`] for their ack.
//! - A bundle is streamed into a sink while its sha256 is computed over the bytes as
//!   received. [`Client::fetch_trusted_bundle`] first decides on the `BUNDLE` header whether
//!   the guest trusts it ([`bootlace_contract::trust`]: a pinned or out-of-band digest, a
//!   signature by a trusted key, or trust in the host): an untrusted bundle is refused before
//!   a byte of it reaches the sink.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use bootlace_contract::digest::{HashingReader, Sha256Digest};
use bootlace_contract::protocol::{
    read_frame, write_frame, BundleHeader, Decoder, Frame, Kind, ProtocolError, VERSION,
};
use bootlace_contract::trust::{Policy, TrustError, Trusted};

/// After READY: the longest a report's write may block. A write waits only when the socket has
/// no room left, that is when the host stopped reading; then the report is lost, not the
/// guest's hand-off.
pub const AFTER_READY_WRITE_LIMIT: Duration = Duration::from_millis(5);

/// After READY: how long FAILED and EXIT wait for their ack. They precede a power-off, and the
/// ack is the only sign the host has them before the VM ends (a frame still queued when the VM
/// powers off may never reach the host). A host that is there acks as soon as it reads the
/// frame, so 1 s leaves a wide margin for a loaded host, while a hung host delays the
/// power-off by 1 s at most. A host that is gone costs nothing: its closed connection ends the
/// wait at once.
pub const FINAL_ACK_WAIT: Duration = Duration::from_secs(1);

/// A connection to the host: a socket (AF_VSOCK in a guest, a Unix socket in tests). Its file
/// descriptor lets the client bound its writes and reads after READY without changing the
/// socket's own timeouts.
pub trait Stream: Read + Write + Send + AsFd {}
impl<T: Read + Write + Send + AsFd> Stream for T {}

/// Opens a new connection, within the time given (what is left of the connect deadline).
pub type Connector = Box<dyn FnMut(Duration) -> io::Result<Box<dyn Stream>> + Send>;

/// How hard to try to reach the host.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Give up connecting after this long in total.
    pub give_up_after: Duration,
    /// First pause between attempts; doubled after each failure.
    pub first_backoff: Duration,
    /// Longest pause between attempts.
    pub max_backoff: Duration,
    /// How many times an unacknowledged message is sent again.
    pub resends: u32,
    /// Wait for the host's ACK of every message. Off for a plain listener (notify mode:
    /// messages are written and not confirmed; no bundle can be fetched).
    pub acks: bool,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            give_up_after: Duration::from_secs(10),
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            resends: 3,
            acks: true,
        }
    }
}

/// Why talking to the host failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made within the deadline.
    #[error("host unreachable after {attempts} attempts in {} ms", elapsed.as_millis())]
    Unreachable {
        /// Attempts made.
        attempts: u32,
        /// Time spent.
        elapsed: Duration,
        /// The last error.
        #[source]
        last: io::Error,
    },
    /// A message was never acknowledged.
    #[error("{kind} was not acknowledged after {tries} tries")]
    NotAcknowledged {
        /// The message.
        kind: Kind,
        /// Tries made.
        tries: u32,
        /// The last error.
        #[source]
        last: ProtocolError,
    },
    /// The host has no bundle for this guest.
    #[error("the host has no bundle: {0}")]
    NoBundle(String),
    /// The bundle is bigger than the guest accepts.
    #[error("bundle of {size} bytes is over the {max}-byte limit")]
    BundleTooLarge {
        /// Announced size.
        size: u64,
        /// Limit.
        max: u64,
    },
    /// The received bytes do not hash to what the host announced.
    #[error("bundle corrupted in transit: sha256 {got}, the host announced {announced}")]
    Corrupted {
        /// Computed.
        got: String,
        /// Announced.
        announced: String,
    },
    /// A report after READY was not delivered (it is not resent: the hand-off does not wait).
    #[error("{kind} after READY")]
    AfterReady {
        /// The message.
        kind: Kind,
        /// What went wrong.
        #[source]
        source: AfterReadyError,
    },
    /// The guest does not trust the bundle the host announces (nothing of it was stored).
    #[error("the bundle is not trusted")]
    Untrusted(#[source] TrustError),
    /// The bundle transfer failed.
    #[error("bundle transfer")]
    Transfer(#[source] ProtocolError),
    /// Writing the received bytes failed.
    #[error("storing the bundle")]
    Sink(#[source] io::Error),
}

/// Why a report after READY was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum AfterReadyError {
    /// The connection was lost before (an earlier report after READY failed).
    #[error("the connection to the host was lost earlier")]
    Lost,
    /// The host has closed the connection.
    #[error("the host has closed the connection (as `bootlace-agent wait-ready` does at READY)")]
    HostGone,
    /// The host took nothing of the frame within the limit: it is not reading.
    #[error("the host took none of it within {} ms: it is not reading", limit.as_millis())]
    Stalled {
        /// The limit ([`AFTER_READY_WRITE_LIMIT`]).
        limit: Duration,
    },
    /// Writing failed (the host hung up, or the frame could not be encoded).
    #[error("writing it")]
    Write(#[source] ProtocolError),
    /// No ack came within the wait ([`FINAL_ACK_WAIT`]).
    #[error("no ACK within {} ms", waited.as_millis())]
    NoAck {
        /// How long it waited.
        waited: Duration,
    },
    /// Reading the ack failed (the host hung up, or sent something else).
    #[error("waiting for its ACK")]
    Ack(#[source] ProtocolError),
}

/// A received bundle.
#[derive(Debug, Clone)]
pub struct Received {
    /// What the host announced.
    pub header: BundleHeader,
    /// sha256 of the bytes as received (equal to the announced one).
    pub sha256: String,
    /// How long the transfer took.
    pub elapsed: Duration,
    /// Why the guest trusted it ([`Client::fetch_trusted_bundle`]; `None` from
    /// [`Client::fetch_bundle`], which checks the bytes only against the announced digest).
    pub trusted: Option<Trusted>,
}

/// A guest's session with its host.
pub struct Client {
    connect: Connector,
    stream: Option<Box<dyn Stream>>,
    dec: Decoder,
    seq: u64,
    hello: Frame,
    retry: Retry,
    /// READY was acknowledged (or, without acks, written): nothing may hold the hand-off now.
    after_ready: bool,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.stream.is_some())
            .field("seq", &self.seq)
            .field("after_ready", &self.after_ready)
            .finish()
    }
}

impl Client {
    /// Connects (with retries) and introduces itself with HELLO carrying `hello` fields plus
    /// `PROTOCOL`.
    pub fn connect(
        connect: Connector,
        hello: &[(&str, String)],
        retry: Retry,
    ) -> Result<Client, ClientError> {
        let mut frame = Frame::new(Kind::Hello, 0).with("PROTOCOL", VERSION);
        for (k, v) in hello {
            frame = frame.with(k, v);
        }
        let mut c = Client {
            connect,
            stream: None,
            dec: Decoder::new(),
            seq: 0,
            hello: frame,
            retry,
            after_ready: false,
        };
        c.reconnect()?;
        Ok(c)
    }

    /// The sequence number of the last message sent (0: none after HELLO).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Numbers the next messages after `seq`: a newer init that took over PID 1 goes on with
    /// the session of the one before it (same boot id), whose reports the host has up to
    /// `seq`.
    pub fn resume_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Opens a connection and says HELLO, retrying until the deadline.
    fn reconnect(&mut self) -> Result<(), ClientError> {
        self.stream = None;
        let started = Instant::now();
        let mut backoff = self.retry.first_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = self.retry.give_up_after.saturating_sub(started.elapsed());
            let err = match (self.connect)(left.max(Duration::from_millis(1))) {
                Ok(mut s) => {
                    let mut dec = Decoder::new();
                    match write_frame(&mut s, &self.hello).and_then(|()| {
                        if self.retry.acks {
                            expect_ack(&mut s, &mut dec, 0)
                        } else {
                            Ok(())
                        }
                    }) {
                        Ok(()) => {
                            self.stream = Some(s);
                            self.dec = dec;
                            return Ok(());
                        }
                        Err(ProtocolError::Io(e)) => e,
                        Err(e) => io::Error::other(e.to_string()),
                    }
                }
                Err(e) => e,
            };
            let elapsed = started.elapsed();
            if elapsed + backoff > self.retry.give_up_after {
                return Err(ClientError::Unreachable {
                    attempts,
                    elapsed,
                    last: err,
                });
            }
            log::debug!(
                "host connection attempt {attempts} failed: {err}; retrying in {backoff:?}"
            );
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.retry.max_backoff);
        }
    }

    /// Sends a message. Up to READY: waits for its ack, resending (on a new connection, same
    /// sequence number) when the ack does not come. After READY: see [`Client::send_after_ready`].
    pub fn send(&mut self, kind: Kind, fields: &[(&str, String)]) -> Result<(), ClientError> {
        self.seq += 1;
        let mut frame = Frame::new(kind, self.seq);
        for (k, v) in fields {
            frame = frame.with(k, v);
        }
        if self.after_ready {
            return self.send_after_ready(&frame);
        }
        self.send_acknowledged(&frame)?;
        if kind == Kind::Ready {
            self.after_ready = true;
        }
        Ok(())
    }

    /// Writes `frame` and waits for its ack, resending it on a new connection when the ack
    /// does not come.
    fn send_acknowledged(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let kind = frame.kind;
        let mut last = None;
        for attempt in 0..=self.retry.resends {
            if self.stream.is_none() {
                if let Err(e) = self.reconnect() {
                    last = Some(ProtocolError::Io(io::Error::other(e.to_string())));
                    continue;
                }
            }
            let Some(s) = self.stream.as_mut() else {
                continue;
            };
            let acks = self.retry.acks;
            match write_frame(s, frame).and_then(|()| {
                if acks {
                    expect_ack(s, &mut self.dec, frame.seq)
                } else {
                    Ok(())
                }
            }) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    log::debug!("{kind} try {}: {e}", attempt + 1);
                    self.stream = None;
                    last = Some(e);
                }
            }
        }
        Err(ClientError::NotAcknowledged {
            kind,
            tries: self.retry.resends + 1,
            last: last.unwrap_or(ProtocolError::Closed { mid_frame: false }),
        })
    }

    /// After READY nothing may hold the hand-off, whether the host is still there or not: the
    /// frame is written on the open connection within [`AFTER_READY_WRITE_LIMIT`], never on a
    /// new one, and never resent. Its ack is not awaited (a host that is there still sends it;
    /// a later wait skips it like a duplicate), except for FAILED and EXIT, which precede a
    /// power-off and wait up to [`FINAL_ACK_WAIT`] for it. Any failure drops the connection.
    fn send_after_ready(&mut self, frame: &Frame) -> Result<(), ClientError> {
        let failed = |source| ClientError::AfterReady {
            kind: frame.kind,
            source,
        };
        let Some(s) = self.stream.as_mut() else {
            return Err(failed(AfterReadyError::Lost));
        };
        let wait_ack = self.retry.acks && matches!(frame.kind, Kind::Failed | Kind::Exit);
        let result = frame
            .encode()
            .map_err(AfterReadyError::Write)
            .and_then(|bytes| write_within(s.as_mut(), &bytes, AFTER_READY_WRITE_LIMIT))
            .and_then(|()| {
                if wait_ack {
                    ack_within(s.as_mut(), &mut self.dec, frame.seq, FINAL_ACK_WAIT)
                } else {
                    Ok(())
                }
            });
        if let Err(e) = &result {
            log::debug!("{} after READY: {e}", frame.kind);
            self.stream = None;
            self.dec = Decoder::new();
        }
        result.map_err(failed)
    }

    /// Asks for the bundle and streams it into `sink` (at most `max_size` bytes), hashing the
    /// bytes as received. Fails, with `sink` holding a partial copy the caller must discard,
    /// when the transfer breaks or the bytes do not match the announced sha256. Trust is the
    /// caller's: see [`Client::fetch_trusted_bundle`].
    pub fn fetch_bundle(
        &mut self,
        sink: &mut dyn Write,
        max_size: u64,
    ) -> Result<Received, ClientError> {
        self.fetch(sink, max_size, None)
    }

    /// [`Client::fetch_bundle`], deciding first, on the `BUNDLE` header, whether `policy`
    /// trusts the bundle: an untrusted one is [`ClientError::Untrusted`] before any of its
    /// bytes is read or written to `sink` (the connection is then dropped). A trusted one's
    /// bytes must hash to the digest it is trusted by ([`Trusted::digest`]).
    pub fn fetch_trusted_bundle(
        &mut self,
        sink: &mut dyn Write,
        max_size: u64,
        policy: &Policy<'_>,
    ) -> Result<Received, ClientError> {
        self.fetch(sink, max_size, Some(policy))
    }

    fn fetch(
        &mut self,
        sink: &mut dyn Write,
        max_size: u64,
        policy: Option<&Policy<'_>>,
    ) -> Result<Received, ClientError> {
        if self.stream.is_none() {
            self.reconnect()?;
        }
        self.seq += 1;
        let seq = self.seq;
        let started = Instant::now();
        let s = self
            .stream
            .as_mut()
            .ok_or(ClientError::Transfer(ProtocolError::Closed {
                mid_frame: false,
            }))?;
        let result = receive_bundle(s, &mut self.dec, seq, max_size, policy).and_then(
            |(header, trusted)| {
                receive_body(s, &mut self.dec, sink, &header).map(|sha| (header, sha, trusted))
            },
        );
        if result.is_err() {
            self.stream = None;
            self.dec = Decoder::new();
        }
        let (header, sha256, trusted) = result?;
        Ok(Received {
            header,
            sha256,
            elapsed: started.elapsed(),
            trusted,
        })
    }
}

/// Asks for the bundle and reads its header: refused when it is too large or, with a policy,
/// not trusted.
fn receive_bundle(
    s: &mut Box<dyn Stream>,
    dec: &mut Decoder,
    seq: u64,
    max_size: u64,
    policy: Option<&Policy<'_>>,
) -> Result<(BundleHeader, Option<Trusted>), ClientError> {
    write_frame(s, &Frame::new(Kind::GetBundle, seq)).map_err(ClientError::Transfer)?;
    let f = read_reply(s, dec, seq).map_err(ClientError::Transfer)?;
    let header = match f.kind {
        Kind::Bundle => BundleHeader::from_frame(&f).map_err(ClientError::Transfer)?,
        Kind::NoBundle => {
            return Err(ClientError::NoBundle(
                f.get("STATUS").unwrap_or("no reason given").to_owned(),
            ))
        }
        got => {
            return Err(ClientError::Transfer(ProtocolError::Unexpected {
                got,
                expected: "BUNDLE",
            }))
        }
    };
    let trusted = match policy {
        Some(p) => {
            // The header's SHA256 is 64 hex digits (checked by from_frame).
            let announced = Sha256Digest::try_from(format!("sha256:{}", header.sha256))
                .map_err(|e| ClientError::Transfer(ProtocolError::Malformed(e.to_string())))?;
            Some(
                p.decide(&announced, header.signature.as_deref())
                    .map_err(ClientError::Untrusted)?,
            )
        }
        None => None,
    };
    if header.size > max_size {
        return Err(ClientError::BundleTooLarge {
            size: header.size,
            max: max_size,
        });
    }
    Ok((header, trusted))
}

/// Streams the bundle's bytes into `sink`, hashing them; they must hash to the announced
/// digest.
fn receive_body(
    s: &mut Box<dyn Stream>,
    dec: &mut Decoder,
    sink: &mut dyn Write,
    header: &BundleHeader,
) -> Result<String, ClientError> {
    let first = dec.take_buffered();
    let take = usize::try_from(header.size)
        .unwrap_or(usize::MAX)
        .min(first.len());
    let (now, extra) = first.split_at(take);
    dec.push(extra);
    // What the decoder had buffered first, then the rest from the connection (never past the
    // bundle's end: the frames after it stay unread).
    let rest = header.size - now.len() as u64;
    let mut body = HashingReader::new(now.chain(Read::take(&mut *s, rest)));
    let mut buf = vec![0u8; 256 * 1024];
    while HashingReader::bytes(&body) < header.size {
        let n = match body.read(&mut buf) {
            Ok(0) => {
                return Err(ClientError::Transfer(ProtocolError::Closed {
                    mid_frame: true,
                }))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ClientError::Transfer(ProtocolError::Io(e))),
        };
        sink.write_all(buf.get(..n).unwrap_or(&[]))
            .map_err(ClientError::Sink)?;
    }
    let sha256 = body.finish().0.hex().to_owned();
    if sha256 != header.sha256 {
        return Err(ClientError::Corrupted {
            got: sha256,
            announced: header.sha256.clone(),
        });
    }
    Ok(sha256)
}

/// Reads frames up to the ack of `seq`. An ack of an earlier message is a duplicate (the host
/// acks a resent message again) and is skipped; anything else is an error.
fn expect_ack(s: &mut dyn Stream, dec: &mut Decoder, seq: u64) -> Result<(), ProtocolError> {
    loop {
        if is_ack_of(&read_frame(s, dec)?, seq)? {
            return Ok(());
        }
    }
}

/// Whether `f` is the ack of `seq`: `false` for an ack of an earlier message (a duplicate, or
/// the ack of a report after READY that nobody waited for), an error for anything else.
fn is_ack_of(f: &Frame, seq: u64) -> Result<bool, ProtocolError> {
    match f.kind {
        Kind::Ack if f.seq == seq => Ok(true),
        Kind::Ack if f.seq < seq => {
            log::debug!("skipped the ACK {} of an earlier message", f.seq);
            Ok(false)
        }
        got => Err(ProtocolError::Unexpected {
            got,
            expected: "ACK",
        }),
    }
}

/// Writes all of `bytes` without blocking past `limit` (non-blocking sends, polling for room
/// in between), whatever timeouts the socket itself has.
fn write_within(s: &mut dyn Stream, bytes: &[u8], limit: Duration) -> Result<(), AfterReadyError> {
    use rustix::io::Errno;
    use rustix::net::SendFlags;
    let deadline = Instant::now() + limit;
    let mut rest = bytes;
    while !rest.is_empty() {
        match rustix::net::send(s.as_fd(), rest, SendFlags::DONTWAIT | SendFlags::NOSIGNAL) {
            Ok(n) => rest = rest.get(n..).unwrap_or_default(),
            Err(Errno::INTR) => {}
            Err(Errno::AGAIN) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(AfterReadyError::Stalled { limit });
                }
                ready_within(s.as_fd(), rustix::event::PollFlags::OUT, left)
                    .map_err(|e| AfterReadyError::Write(ProtocolError::Io(e)))?;
            }
            Err(Errno::PIPE | Errno::CONNRESET | Errno::NOTCONN) => {
                return Err(AfterReadyError::HostGone)
            }
            Err(e) => return Err(AfterReadyError::Write(ProtocolError::Io(e.into()))),
        }
    }
    Ok(())
}

/// Reads frames up to the ack of `seq` (skipping acks of earlier messages) for at most
/// `limit`: each read follows a poll, so a silent host cannot hold it longer.
fn ack_within(
    s: &mut dyn Stream,
    dec: &mut Decoder,
    seq: u64,
    limit: Duration,
) -> Result<(), AfterReadyError> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame().map_err(AfterReadyError::Ack)? {
            if is_ack_of(&f, seq).map_err(AfterReadyError::Ack)? {
                return Ok(());
            }
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(AfterReadyError::NoAck { waited: limit });
        }
        let io_err = |e| AfterReadyError::Ack(ProtocolError::Io(e));
        if !ready_within(s.as_fd(), rustix::event::PollFlags::IN, left).map_err(io_err)? {
            continue;
        }
        let want = dec.wanted().min(buf.len());
        match s.read(buf.get_mut(..want).unwrap_or_default()) {
            Ok(0) => return Err(AfterReadyError::HostGone),
            Ok(n) => dec.push(buf.get(..n).unwrap_or_default()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(AfterReadyError::HostGone)
            }
            Err(e) => return Err(io_err(e)),
        }
    }
}

/// Polls `fd` for `events` up to `left`: whether it is ready (`false` on a timeout or a
/// signal; the caller checks its deadline and polls again). Hang-ups and errors count as ready:
/// the next read or write reports them.
fn ready_within(
    fd: BorrowedFd<'_>,
    events: rustix::event::PollFlags,
    left: Duration,
) -> io::Result<bool> {
    let ts = rustix::time::Timespec {
        tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(left.subsec_nanos()),
    };
    let mut pfd = [rustix::event::PollFd::new(&fd, events)];
    match rustix::event::poll(&mut pfd, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Reads the next frame that is not a duplicate ack of a message before `seq`.
fn read_reply(s: &mut dyn Stream, dec: &mut Decoder, seq: u64) -> Result<Frame, ProtocolError> {
    loop {
        let f = read_frame(s, dec)?;
        if f.kind == Kind::Ack && f.seq < seq {
            log::debug!("skipped a duplicate ACK {}", f.seq);
            continue;
        }
        return Ok(f);
    }
}
