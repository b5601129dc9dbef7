//! Target `decompress`: the capped decompression path of the extraction
//! ([`extract::decompress`]), gzip, zstd or none, on arbitrary bytes.
//!
//! The first byte chooses the compression and the limits (as in the `extract` target), and
//! whether the declared length is the true one or shorter. Checked:
//! - the output never exceeds [`extract::stream_cap`] for the declared length (the ratio and
//!   size caps), and the count returned is the bytes handed out;
//! - an input longer than declared is refused, never read past the declared length plus one
//!   byte;
//! - gzip output, when accepted, is exactly what an independent uncapped decoder gives, and
//!   when that decoder's output is over the cap, the capped path fails.
//!
//! Large allocations are caught by the fuzzer's `-malloc_limit_mb` (see `docs/fuzzing.md`):
//! the zstd window is limited to [`extract::MAX_ZSTD_WINDOW`].

use std::io::Read;

use bootlace_contract::compression::Compression;
use bootlace_init::extract::{self, ExtractError};

/// A reader that counts what is taken from it.
struct Counting<'a> {
    inner: &'a [u8],
    taken: usize,
}

impl Read for Counting<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.taken += n;
        Ok(n)
    }
}

/// The check.
pub fn run(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let limits = crate::extract::limits(sel);
    let compression = crate::extract::compression(sel >> 2, input);
    let short = sel & 0x10 != 0 && !input.is_empty();
    let declared = if short {
        input.len() as u64 / 2
    } else {
        input.len() as u64
    };
    let cap = extract::stream_cap(declared, compression, &limits);

    let mut out = Vec::new();
    let mut reader = Counting {
        inner: input,
        taken: 0,
    };
    let result = extract::decompress(&mut reader, declared, compression, &limits, &mut |b| {
        out.extend_from_slice(b)
    });
    assert!(
        out.len() as u64 <= cap,
        "{} bytes out, over the cap of {cap}",
        out.len()
    );
    assert!(
        reader.taken as u64 <= declared + 1,
        "read {} bytes of an input declared as {declared}",
        reader.taken
    );
    match &result {
        Ok(n) => {
            assert_eq!(*n, out.len() as u64, "count and output disagree");
            assert!(
                reader.taken as u64 <= declared,
                "accepted an input longer than declared"
            );
        }
        Err(ExtractError::Decompressed { limit, .. }) => assert_eq!(*limit, cap),
        Err(_) => {}
    }

    if compression == Compression::Gzip && !short {
        // An independent decoder, uncapped but bounded by what a few KiB of deflate can give.
        let mut reference = Vec::new();
        let full = flate2::read::MultiGzDecoder::new(input)
            .take(cap.saturating_add(1))
            .read_to_end(&mut reference);
        match (&result, full) {
            (Ok(_), Ok(_)) => assert_eq!(out, reference, "gzip output differs"),
            (Ok(_), Err(e)) => panic!("accepted gzip that flate2 refuses: {e}"),
            (Err(e), Ok(_)) if reference.len() as u64 <= cap => {
                panic!("refused gzip that flate2 decodes within the cap: {e}")
            }
            _ => {}
        }
        if reference.len() as u64 > cap {
            assert!(result.is_err(), "over the cap and accepted");
        }
    }
}
