//! Target `frames`: the protocol [`Decoder`], fed the same bytes in fuzzer-chosen splits.
//!
//! Input: one byte `k`, then `k % 16` split lengths (one byte each; 0 is an empty push), then
//! the wire bytes, pushed in pieces of those lengths in turn. Checked:
//! - the outcome — the frames decoded, then the first error (by kind) or the partial frame
//!   left — is the same as for the whole input pushed at once, and as for the bytes read one
//!   `wanted()` at a time through [`read_frame`];
//! - what the decoder holds between frames stays within one header line or one payload
//!   ([`MAX_HEADER`], [`MAX_PAYLOAD`]) beyond the last push;
//! - every frame decoded re-encodes to a frame that decodes to itself.
//!
//! Large allocations are caught by the fuzzer's `-malloc_limit_mb` (see `docs/fuzzing.md`).

use bootlace_contract::protocol::{
    read_frame, Decoder, Frame, ProtocolError, MAX_HEADER, MAX_PAYLOAD,
};

use crate::Input;

/// What a decoder made of a byte stream.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Frames, in order.
    pub frames: Vec<Frame>,
    /// The first error, by kind (the byte counts in messages may depend on the split).
    pub error: Option<String>,
    /// Whether a partial frame was left (when there was no error).
    pub mid_frame: bool,
}

/// The kind of a protocol error, without split-dependent details.
pub fn error_kind(e: &ProtocolError) -> String {
    match e {
        ProtocolError::Malformed(m) => format!("malformed: {m}"),
        ProtocolError::UnterminatedHeader { max, .. } => {
            format!("too long: header line (max {max})")
        }
        ProtocolError::TooLong { what, max, .. } => format!("too long: {what} (max {max})"),
        ProtocolError::Closed { mid_frame } => format!("closed (mid frame: {mid_frame})"),
        ProtocolError::Unexpected { got, expected } => format!("unexpected {got} ({expected})"),
        ProtocolError::Io(e) => format!("io: {:?}", e.kind()),
    }
}

/// Decodes `pieces` pushed one after another, taking frames after each push.
pub fn decode_pieces<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    for piece in pieces {
        d.push(piece);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Outcome {
                        frames,
                        error: Some(error_kind(&e)),
                        mid_frame: false,
                    }
                }
            }
        }
        // Between frames, the decoder holds at most a partial header or a partial payload
        // (plus what the last push brought, which the caller chose to hand over).
        let held = d.take_buffered();
        assert!(
            held.len() <= MAX_HEADER + MAX_PAYLOAD + piece.len(),
            "decoder holds {} bytes",
            held.len()
        );
        d.push(&held);
    }
    Outcome {
        mid_frame: d.is_mid_frame(),
        frames,
        error: None,
    }
}

/// Decodes a stream the way a connection does: [`read_frame`] over a reader.
pub fn decode_stream(mut wire: &[u8]) -> Outcome {
    let mut d = Decoder::new();
    let mut frames = Vec::new();
    loop {
        match read_frame(&mut wire, &mut d) {
            Ok(f) => frames.push(f),
            Err(ProtocolError::Closed { mid_frame }) => {
                return Outcome {
                    frames,
                    error: None,
                    mid_frame,
                }
            }
            Err(e) => {
                return Outcome {
                    frames,
                    error: Some(error_kind(&e)),
                    mid_frame: false,
                }
            }
        }
    }
}

/// The check.
pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let k = usize::from(input.byte() % 16);
    let sizes: Vec<usize> = input.take(k).iter().map(|b| usize::from(*b)).collect();
    let wire = input.rest();

    let whole = decode_pieces([wire]);
    let mut pieces: Vec<&[u8]> = Vec::new();
    let mut rest = wire;
    if sizes.iter().all(|s| *s == 0) {
        pieces.extend(sizes.iter().map(|_| &[][..]));
        pieces.push(rest);
    } else {
        for n in sizes.iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let (piece, tail) = rest.split_at((*n).min(rest.len()));
            pieces.push(piece);
            rest = tail;
        }
    }
    let split = decode_pieces(pieces);
    assert_eq!(split, whole, "the outcome depends on the split");
    let streamed = decode_stream(wire);
    assert_eq!(streamed, whole, "read_frame disagrees with the decoder");

    for f in &whole.frames {
        // A decoded frame re-encodes (its payload came in under the limit) and decodes back
        // to itself.
        let bytes = match f.encode() {
            Ok(b) => b,
            // A payload without its last newline grows by one byte when re-encoded.
            Err(ProtocolError::TooLong { len, .. }) if len as usize > MAX_PAYLOAD => continue,
            Err(e) => panic!("{f:?} does not encode: {e}"),
        };
        let again = decode_pieces([&bytes[..]]);
        assert_eq!(again.frames, vec![f.clone()], "re-encoding changed {f:?}");
        assert!(again.error.is_none() && !again.mid_frame);
    }
}
