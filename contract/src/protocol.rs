//! The host <-> guest wire protocol, version 1 (`docs/protocol.md` is the contract).
//!
//! A frame is one ASCII header line and a payload:
//!
//! ```text
//! BL1 READY 7 37\n
//! READY=1\nSTATUS=handing off to /sbin/init\n
//! ```
//!
//! `BL1 <KIND> <SEQ> <LEN>\n`: the kind, a sequence number (guest messages count up from 1; an
//! `ACK` carries the number it acknowledges), and the payload length. The payload is
//! `KEY=VALUE` lines in the sd_notify vocabulary (`READY=1`, `STATUS=`, `ERRNO=`,
//! `EXIT_STATUS=`), so a plain listener can read what a guest says. A header line is at most
//! [`MAX_HEADER`] bytes and a payload at most [`MAX_PAYLOAD`]: the [`Decoder`] refuses anything
//! longer before allocating for it, whatever the bytes and however they are split.
//! A `BUNDLE` frame is followed by exactly `SIZE` raw bytes of the bundle.

use std::fmt;
use std::io::{self, Read, Write};

/// The protocol version this code speaks.
pub const VERSION: u32 = 1;
/// The magic that starts every header line.
pub const MAGIC: &str = "BL1";
/// Longest header line, newline included.
pub const MAX_HEADER: usize = 64;
/// Largest payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// How many bytes of a refused header line an error quotes.
const HEADER_START_SHOWN: usize = 16;
/// The default vsock port of the host configuration manager.
pub const DEFAULT_PORT: u32 = 1024;

/// The `STEP` a guest reports after its READY when the real init is systemd and systemd
/// has said `READY=1` (start-up finished): `STEP=systemd_ready STATE=finished STATUS=…`.
pub const SYSTEMD_READY_STEP: &str = "systemd_ready";

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Guest: who it is (`PROTOCOL`, `INIT_VERSION`, `BOOT_ID`, `INSTANCE_ID`, `BOOTTIME_NS`).
    Hello,
    /// Guest: send me the bundle.
    GetBundle,
    /// Guest: a boot step started, finished or failed (`STEP`, `STATE`, `DURATION_MS`, `STATUS`).
    Step,
    /// Guest: a log line (`MESSAGE`).
    Log,
    /// Guest: ready (`READY=1`, `STATUS`, `TIMELINE`).
    Ready,
    /// Guest: the boot failed (`STATUS`, `ERRNO`, `EXIT_STATUS`).
    Failed,
    /// Guest: the supervised application ended (`EXIT_STATUS`, `STATUS`).
    Exit,
    /// Host: acknowledges the guest message whose SEQ it carries.
    Ack,
    /// Host: the bundle follows (`SIZE`, `SHA256`, `COMPRESSION`, optionally `SIGNATURE`).
    Bundle,
    /// Host: there is no bundle for this guest (`STATUS`).
    NoBundle,
}

const KINDS: &[(Kind, &str)] = &[
    (Kind::Hello, "HELLO"),
    (Kind::GetBundle, "GET-BUNDLE"),
    (Kind::Step, "STEP"),
    (Kind::Log, "LOG"),
    (Kind::Ready, "READY"),
    (Kind::Failed, "FAILED"),
    (Kind::Exit, "EXIT"),
    (Kind::Ack, "ACK"),
    (Kind::Bundle, "BUNDLE"),
    (Kind::NoBundle, "NO-BUNDLE"),
];

impl Kind {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        KINDS
            .iter()
            .find(|(k, _)| *k == self)
            .map_or("?", |(_, n)| *n)
    }

    fn parse(s: &str) -> Option<Kind> {
        KINDS.iter().find(|(_, n)| *n == s).map(|(k, _)| *k)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Its sequence number (or, for `ACK`, the one acknowledged).
    pub seq: u64,
    /// `KEY=VALUE` fields, in order.
    pub fields: Vec<(String, String)>,
}

impl Frame {
    /// A frame with no fields.
    pub fn new(kind: Kind, seq: u64) -> Frame {
        Frame {
            kind,
            seq,
            fields: Vec::new(),
        }
    }

    /// Adds a field (newlines in the value become spaces; `=` and newlines in the key are
    /// replaced by `_`).
    pub fn with(mut self, key: &str, value: impl fmt::Display) -> Frame {
        let key = key.replace(['=', '\n', '\r'], "_");
        let value = value.to_string().replace(['\n', '\r'], " ");
        self.fields.push((key, value));
        self
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The payload as it goes on the wire.
    pub fn payload(&self) -> String {
        let mut p = String::new();
        for (k, v) in &self.fields {
            p.push_str(k);
            p.push('=');
            p.push_str(v);
            p.push('\n');
        }
        p
    }

    /// The whole frame as bytes. Fails if the payload is over [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let payload = self.payload();
        if payload.len() > MAX_PAYLOAD {
            return Err(ProtocolError::TooLong {
                what: "payload",
                len: payload.len() as u64,
                max: MAX_PAYLOAD,
            });
        }
        let mut out =
            format!("{MAGIC} {} {} {}\n", self.kind, self.seq, payload.len()).into_bytes();
        out.extend_from_slice(payload.as_bytes());
        Ok(out)
    }
}

/// A protocol violation or a transport failure.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The peer sent bytes that are not a frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// No newline within the first [`MAX_HEADER`] bytes: no header line is that long, so the
    /// bytes are refused without reading further.
    #[error(
        "no frame header: no newline within the first {max} bytes (a header line is at most \
         {max} bytes, newline included); the bytes begin {start:?}"
    )]
    UnterminatedHeader {
        /// The limit ([`MAX_HEADER`]).
        max: usize,
        /// The first bytes, for a person to recognise what was sent (lossy UTF-8).
        start: String,
    },
    /// A payload over its limit (refused before allocating for it).
    #[error("{what} of {len} bytes is over the {max}-byte limit")]
    TooLong {
        /// What is too long (`payload`).
        what: &'static str,
        /// The length claimed or seen.
        len: u64,
        /// The limit.
        max: usize,
    },
    /// The connection ended before a whole frame.
    #[error("connection closed{}", if *.mid_frame { " in the middle of a frame" } else { "" })]
    Closed {
        /// Whether part of a frame had arrived.
        mid_frame: bool,
    },
    /// The peer sent a frame that does not fit the conversation.
    #[error("unexpected {got} (expected {expected})")]
    Unexpected {
        /// What arrived.
        got: Kind,
        /// What was expected.
        expected: &'static str,
    },
    /// The transport failed.
    #[error("transport")]
    Io(#[source] io::Error),
}

/// Incremental frame decoder: feed it bytes in any split, take whole frames out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// The parsed header of the frame whose payload is still arriving.
    pending: Option<(Kind, u64, usize)>,
}

impl Decoder {
    /// An empty decoder.
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// Adds received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Whether part of a frame is buffered.
    pub fn is_mid_frame(&self) -> bool {
        self.pending.is_some() || !self.buf.is_empty()
    }

    /// Bytes buffered beyond the frames taken so far (raw bundle bytes that followed a
    /// `BUNDLE` frame); the decoder is empty afterwards.
    pub fn take_buffered(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// How many more bytes the decoder wants before it can make progress (at most
    /// [`MAX_HEADER`] or the pending payload's remainder): a reader never needs to buffer more.
    pub fn wanted(&self) -> usize {
        match self.pending {
            Some((_, _, len)) => len.saturating_sub(self.buf.len()).max(1),
            None => MAX_HEADER.saturating_sub(self.buf.len()).max(1),
        }
    }

    /// The next whole frame, `Ok(None)` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        if self.pending.is_none() {
            let Some(nl) = self.buf.iter().take(MAX_HEADER).position(|b| *b == b'\n') else {
                if self.buf.len() >= MAX_HEADER {
                    let start = self.buf.get(..HEADER_START_SHOWN).unwrap_or(&self.buf);
                    return Err(ProtocolError::UnterminatedHeader {
                        max: MAX_HEADER,
                        start: String::from_utf8_lossy(start).into_owned(),
                    });
                }
                return Ok(None);
            };
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            self.pending = Some(parse_header(&line)?);
        }
        let Some((kind, seq, len)) = self.pending else {
            return Ok(None);
        };
        if self.buf.len() < len {
            return Ok(None);
        }
        self.pending = None;
        let payload: Vec<u8> = self.buf.drain(..len).collect();
        let text = String::from_utf8(payload)
            .map_err(|_| ProtocolError::Malformed(format!("{kind} payload is not UTF-8")))?;
        let mut fields = Vec::new();
        // Lines end in `\n` only: a `\r` belongs to the value, so that a frame decodes to the
        // same fields however it is re-encoded.
        for line in text.split('\n').filter(|l| !l.is_empty()) {
            let (k, v) = line.split_once('=').ok_or_else(|| {
                ProtocolError::Malformed(format!("{kind} payload line {line:?} is not KEY=VALUE"))
            })?;
            fields.push((k.to_owned(), v.to_owned()));
        }
        Ok(Some(Frame { kind, seq, fields }))
    }
}

fn parse_header(line: &[u8]) -> Result<(Kind, u64, usize), ProtocolError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ProtocolError::Malformed("header line is not ASCII".to_owned()))?;
    let bad = || ProtocolError::Malformed(format!("bad header line {:?}", text.trim_end()));
    let mut parts = text.trim_end_matches('\n').split(' ');
    if parts.next() != Some(MAGIC) {
        return Err(bad());
    }
    let kind = parts.next().and_then(Kind::parse).ok_or_else(bad)?;
    let seq: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let len: u64 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    if parts.next().is_some() {
        return Err(bad());
    }
    if len > MAX_PAYLOAD as u64 {
        return Err(ProtocolError::TooLong {
            what: "payload",
            len,
            max: MAX_PAYLOAD,
        });
    }
    Ok((kind, seq, len as usize))
}

/// Reads the next frame from a stream, through `dec` (which keeps what follows it).
pub fn read_frame(r: &mut dyn Read, dec: &mut Decoder) -> Result<Frame, ProtocolError> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        let want = dec.wanted().min(buf.len());
        let n = match r.read(buf.get_mut(..want).unwrap_or(&mut [])) {
            Ok(0) => {
                return Err(ProtocolError::Closed {
                    mid_frame: dec.is_mid_frame(),
                })
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ProtocolError::Io(e)),
        };
        dec.push(buf.get(..n).unwrap_or(&[]));
    }
}

/// Writes one frame.
pub fn write_frame(w: &mut dyn Write, frame: &Frame) -> Result<(), ProtocolError> {
    let bytes = frame.encode()?;
    w.write_all(&bytes).map_err(ProtocolError::Io)?;
    w.flush().map_err(ProtocolError::Io)
}

/// The header of a bundle transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleHeader {
    /// Bytes that follow.
    pub size: u64,
    /// Lower-case hex sha256 of those bytes.
    pub sha256: String,
    /// `none`, `gzip` or `zstd`.
    pub compression: String,
    /// `ed25519:<base64>`: a signature of the digest (see [`crate::signature`]), when the
    /// host has one. Optional: a host without it sends no field, and a guest that does not
    /// know it ignores it, as every decoder of version 1 ignores fields it does not know. The
    /// value is carried as sent; the guest's trust check parses it.
    pub signature: Option<String>,
}

impl BundleHeader {
    /// Reads it from a `BUNDLE` frame.
    pub fn from_frame(f: &Frame) -> Result<BundleHeader, ProtocolError> {
        let size = f
            .get("SIZE")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ProtocolError::Malformed("BUNDLE without a numeric SIZE".to_owned()))?;
        let sha256 = f
            .get("SHA256")
            .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                ProtocolError::Malformed("BUNDLE without a 64-hex-digit SHA256".to_owned())
            })?
            .to_ascii_lowercase();
        let compression = f.get("COMPRESSION").unwrap_or("none").to_owned();
        Ok(BundleHeader {
            size,
            sha256,
            compression,
            signature: f.get("SIGNATURE").map(str::to_owned),
        })
    }

    /// The frame announcing it.
    pub fn to_frame(&self, seq: u64) -> Frame {
        let f = Frame::new(Kind::Bundle, seq)
            .with("SIZE", self.size)
            .with("SHA256", &self.sha256)
            .with("COMPRESSION", &self.compression);
        match &self.signature {
            Some(sig) => f.with("SIGNATURE", sig),
            None => f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames() -> Vec<Frame> {
        vec![
            Frame::new(Kind::Hello, 1)
                .with("PROTOCOL", 1)
                .with("BOOT_ID", "b-1")
                .with("BOOTTIME_NS", 123),
            Frame::new(Kind::Step, 2)
                .with("STEP", "bootstrap")
                .with("STATE", "failed")
                .with("STATUS", "line one\nline two"),
            Frame::new(Kind::Ready, 3)
                .with("READY", 1)
                .with("STATUS", "ok=yes"),
            Frame::new(Kind::Ack, 3),
            Frame::new(Kind::Exit, 4).with("EXIT_STATUS", 3),
        ]
    }

    #[test]
    fn readable_on_the_wire() {
        let f = Frame::new(Kind::Ready, 7)
            .with("READY", 1)
            .with("STATUS", "up");
        let bytes = f.encode().expect("encode");
        assert_eq!(
            String::from_utf8(bytes).expect("utf8"),
            "BL1 READY 7 18\nREADY=1\nSTATUS=up\n"
        );
    }

    #[test]
    fn decodes_any_split() {
        let wire: Vec<u8> = frames()
            .iter()
            .flat_map(|f| f.encode().expect("encode"))
            .collect();
        let mut want = frames();
        want[1].fields[2].1 = "line one line two".to_owned();
        // Every split point, and byte by byte.
        for chunk in [1usize, 2, 3, 5, 7, 13, 64, wire.len()] {
            let mut d = Decoder::new();
            let mut got = Vec::new();
            for piece in wire.chunks(chunk) {
                d.push(piece);
                while let Some(f) = d.next_frame().expect("valid") {
                    got.push(f);
                }
            }
            assert_eq!(got, want, "chunk {chunk}");
            assert!(!d.is_mid_frame());
        }
        for cut in 0..wire.len() {
            let mut d = Decoder::new();
            d.push(&wire[..cut]);
            let mut n = 0;
            while d.next_frame().expect("valid").is_some() {
                n += 1;
            }
            d.push(&wire[cut..]);
            while d.next_frame().expect("valid").is_some() {
                n += 1;
            }
            assert_eq!(n, want.len(), "cut at {cut}");
        }
    }

    #[test]
    fn a_carriage_return_belongs_to_the_value() {
        for payload in ["A=x\r\nB=y\r", "A=x\r\nB=y\r\n"] {
            let wire = format!("BL1 LOG 1 {}\n{payload}", payload.len());
            let mut d = Decoder::new();
            d.push(wire.as_bytes());
            let f = d.next_frame().expect("valid").expect("a frame");
            assert_eq!(f.get("A"), Some("x\r"));
            assert_eq!(f.get("B"), Some("y\r"));
            let mut again = Decoder::new();
            again.push(&f.encode().expect("encode"));
            assert_eq!(again.next_frame().expect("valid"), Some(f));
        }
    }

    #[test]
    fn garbage_and_huge_lengths_are_refused_without_allocating() {
        let cases: &[(&[u8], &str)] = &[
            (b"GET / HTTP/1.1\r\n", "bad header line"),
            (b"BL1 READY 1 4294967296\n", "over the 65536-byte limit"),
            (
                b"BL1 READY 1 18446744073709551615\n",
                "over the 65536-byte limit",
            ),
            (b"BL1 READY 1 99999999999999999999999\n", "bad header line"),
            (b"BL1 NOPE 1 0\n", "bad header line"),
            (b"BL1 READY x 0\n", "bad header line"),
            (b"BL1 READY 1 0 extra\n", "bad header line"),
            (b"BL1 READY 1 3\nabc", "not KEY=VALUE"),
            (b"BL1 READY 1 2\n\xff\xfe", "not UTF-8"),
            (&[b'A'; 100], "no newline within the first 64 bytes"),
            (b"\xff\xff\xff\xff\n", "not ASCII"),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::new();
            d.push(bytes);
            let err = d.next_frame().expect_err("refused").to_string();
            assert!(err.contains(want), "{bytes:?}: {err} lacks {want}");
            assert!(
                d.buf.capacity() <= 4096,
                "decoder grew to {}",
                d.buf.capacity()
            );
        }
    }

    #[test]
    fn an_unterminated_header_says_what_was_refused_and_why() {
        // Exactly the limit without a newline (what a reader that takes `wanted()` bytes sees),
        // and far more, in one piece or byte by byte: the same message, quoting the start.
        let mut long = b"BL1 LOG 1 0".to_vec();
        long.extend_from_slice(&[b' '; 200]);
        for bytes in [&[b'A'; MAX_HEADER][..], &long] {
            for chunk in [1, bytes.len()] {
                let mut d = Decoder::new();
                let mut err = None;
                for piece in bytes.chunks(chunk) {
                    d.push(piece);
                    if let Err(e) = d.next_frame() {
                        err = Some(e);
                        break;
                    }
                }
                let err = err.expect("refused").to_string();
                let start = String::from_utf8_lossy(&bytes[..16]).into_owned();
                assert_eq!(
                    err,
                    format!(
                        "no frame header: no newline within the first 64 bytes (a header line \
                         is at most 64 bytes, newline included); the bytes begin {start:?}"
                    )
                );
            }
        }
        // Through a stream: refused after 64 bytes, whatever follows.
        let mut r: &[u8] = &[b'x'; 10_000];
        let err = read_frame(&mut r, &mut Decoder::new()).expect_err("refused");
        assert!(
            matches!(err, ProtocolError::UnterminatedHeader { max: 64, .. }),
            "{err}"
        );
        assert_eq!(r.len(), 10_000 - 64, "read past the limit");
    }

    #[test]
    fn stream_helpers_and_truncation() {
        let mut wire = Vec::new();
        for f in frames() {
            write_frame(&mut wire, &f).expect("write");
        }
        wire.extend_from_slice(b"raw bundle bytes");
        let mut r: &[u8] = &wire;
        let mut d = Decoder::new();
        for _ in 0..frames().len() {
            read_frame(&mut r, &mut d).expect("frame");
        }
        let mut rest = d.take_buffered();
        r.read_to_end(&mut rest).expect("rest");
        assert_eq!(rest, b"raw bundle bytes");

        let cut = &wire[..10];
        let mut r: &[u8] = cut;
        let err = read_frame(&mut r, &mut Decoder::new()).expect_err("truncated");
        assert!(
            matches!(err, ProtocolError::Closed { mid_frame: true }),
            "{err}"
        );
        let mut empty: &[u8] = b"";
        let err = read_frame(&mut empty, &mut Decoder::new()).expect_err("closed");
        assert!(matches!(err, ProtocolError::Closed { mid_frame: false }));
    }

    #[test]
    fn bundle_headers() {
        let mut h = BundleHeader {
            size: 42,
            sha256: "ab".repeat(32),
            compression: "zstd".to_owned(),
            signature: None,
        };
        assert_eq!(BundleHeader::from_frame(&h.to_frame(1)).expect("parse"), h);
        assert_eq!(h.to_frame(1).get("SIGNATURE"), None, "no field without one");
        h.signature = Some(format!("ed25519:{}=", "A".repeat(87)));
        assert_eq!(BundleHeader::from_frame(&h.to_frame(1)).expect("parse"), h);
        // Version 1 compatible both ways: a header with a field this code does not know (as
        // an older guest sees SIGNATURE) decodes, through the wire, to the fields it knows.
        let mut wire = h
            .to_frame(3)
            .with("FUTURE_FIELD", "x")
            .encode()
            .expect("encode");
        let mut d = Decoder::new();
        d.push(&wire);
        let f = d.next_frame().expect("valid").expect("a frame");
        assert_eq!(BundleHeader::from_frame(&f).expect("parse"), h);
        wire.clear();
        let bad = Frame::new(Kind::Bundle, 1)
            .with("SIZE", "x")
            .with("SHA256", "ab");
        assert!(BundleHeader::from_frame(&bad).is_err());
        let bad = Frame::new(Kind::Bundle, 1)
            .with("SIZE", 1)
            .with("SHA256", "zz".repeat(32));
        assert!(BundleHeader::from_frame(&bad).is_err());
    }
}
