//! The guest side of the conversation, independent of the transport: the init gives it a
//! function that opens a connection (AF_VSOCK to CID 2 in a guest; anything `Read + Write` in
//! tests).
//!
//! - Connecting retries with exponential backoff until a total deadline, so the boot never
//!   waits forever for an absent host.
//! - Every message is acknowledged. A message whose ack does not come (the connection broke,
//!   or the per-read timeout of the transport fired) is sent again on a new connection, with
//!   the same sequence number, a bounded number of times; the host drops duplicates.
//! - A bundle is streamed into a sink while its sha256 is computed over the bytes as
//!   received; the caller compares it with the pinned digest before extracting anything.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use bootlace_contract::digest::HashingReader;
use bootlace_contract::protocol::{
    read_frame, write_frame, BundleHeader, Decoder, Frame, Kind, ProtocolError, VERSION,
};

/// A connection to the host.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

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
    /// The bundle transfer failed.
    #[error("bundle transfer")]
    Transfer(#[source] ProtocolError),
    /// Writing the received bytes failed.
    #[error("storing the bundle")]
    Sink(#[source] io::Error),
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
}

/// A guest's session with its host.
pub struct Client {
    connect: Connector,
    stream: Option<Box<dyn Stream>>,
    dec: Decoder,
    seq: u64,
    hello: Frame,
    retry: Retry,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("connected", &self.stream.is_some())
            .field("seq", &self.seq)
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
        };
        c.reconnect()?;
        Ok(c)
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

    /// Sends a message and waits for its ack, resending (on a new connection, same sequence
    /// number) when the ack does not come.
    pub fn send(&mut self, kind: Kind, fields: &[(&str, String)]) -> Result<(), ClientError> {
        self.seq += 1;
        let mut frame = Frame::new(kind, self.seq);
        for (k, v) in fields {
            frame = frame.with(k, v);
        }
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
            match write_frame(s, &frame).and_then(|()| {
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

    /// Asks for the bundle and streams it into `sink` (at most `max_size` bytes), hashing the
    /// bytes as received. Fails, with `sink` holding a partial copy the caller must discard,
    /// when the transfer breaks or the bytes do not match the announced sha256.
    pub fn fetch_bundle(
        &mut self,
        sink: &mut dyn Write,
        max_size: u64,
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
        let result = receive_bundle(s, &mut self.dec, seq, sink, max_size);
        if result.is_err() {
            self.stream = None;
            self.dec = Decoder::new();
        }
        let (header, sha256) = result?;
        Ok(Received {
            header,
            sha256,
            elapsed: started.elapsed(),
        })
    }
}

fn receive_bundle(
    s: &mut Box<dyn Stream>,
    dec: &mut Decoder,
    seq: u64,
    sink: &mut dyn Write,
    max_size: u64,
) -> Result<(BundleHeader, String), ClientError> {
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
    if header.size > max_size {
        return Err(ClientError::BundleTooLarge {
            size: header.size,
            max: max_size,
        });
    }
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
            announced: header.sha256,
        });
    }
    Ok((header, sha256))
}

/// Reads frames up to the ack of `seq`. An ack of an earlier message is a duplicate (the host
/// acks a resent message again) and is skipped; anything else is an error.
fn expect_ack(s: &mut dyn Stream, dec: &mut Decoder, seq: u64) -> Result<(), ProtocolError> {
    loop {
        let f = read_frame(s, dec)?;
        match f.kind {
            Kind::Ack if f.seq == seq => return Ok(()),
            Kind::Ack if f.seq < seq => log::debug!("skipped a duplicate ACK {}", f.seq),
            got => {
                return Err(ProtocolError::Unexpected {
                    got,
                    expected: "ACK",
                })
            }
        }
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
