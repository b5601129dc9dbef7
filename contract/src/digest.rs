//! SHA-256 as bootlace writes it everywhere: lower-case hex, `sha256:<hex>` when pinned, and a
//! reader that hashes what passes through it.

use std::fmt;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A pinned sha256: `sha256:<64 hex digits>` (stored lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Digest(String);

impl Sha256Digest {
    /// The 64 hex digits.
    pub fn hex(&self) -> &str {
        &self.0
    }

    /// The digest of finished hasher output.
    pub fn from_bytes(bytes: &[u8]) -> Sha256Digest {
        Sha256Digest(hex(bytes))
    }

    /// Whether `hex` (any case) is this digest.
    pub fn matches_hex(&self, hex: &str) -> bool {
        self.0.eq_ignore_ascii_case(hex)
    }
}

/// A digest that is not `sha256:` and 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("digest {0:?} must be sha256:<64 hex digits>")]
pub struct BadDigest(pub String);

impl TryFrom<String> for Sha256Digest {
    type Error = BadDigest;
    fn try_from(s: String) -> Result<Self, BadDigest> {
        let hex = s.strip_prefix("sha256:").unwrap_or("");
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadDigest(s));
        }
        Ok(Sha256Digest(hex.to_ascii_lowercase()))
    }
}

impl std::str::FromStr for Sha256Digest {
    type Err = BadDigest;
    fn from_str(s: &str) -> Result<Self, BadDigest> {
        Sha256Digest::try_from(s.to_owned())
    }
}

impl From<Sha256Digest> for String {
    fn from(d: Sha256Digest) -> String {
        format!("sha256:{}", d.0)
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

/// A reader that hashes (SHA-256) and counts every byte read through it.
#[derive(Debug)]
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R> HashingReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    /// The reader inside.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes read so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The digest of what was read, and how many bytes that was.
    pub fn finish(self) -> (Sha256Digest, u64) {
        (Sha256Digest::from_bytes(&self.hash.finalize()), self.bytes)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.hash.update(read);
        self.bytes = self.bytes.saturating_add(read.len() as u64);
        Ok(n)
    }
}

/// The sha256 of a byte slice.
pub fn of_bytes(bytes: &[u8]) -> Sha256Digest {
    Sha256Digest::from_bytes(&Sha256::digest(bytes))
}

/// The sha256 and size of everything `r` yields.
pub fn of_reader(r: impl Read) -> io::Result<(Sha256Digest, u64)> {
    let mut h = HashingReader::new(r);
    io::copy(&mut h, &mut io::sink())?;
    Ok(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_digests() {
        assert_eq!(hex(&[0, 0x0f, 0xa5, 0xff]), "000fa5ff");
        let (d, n) = of_reader(&b"abc"[..]).expect("hash");
        assert_eq!(n, 3);
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let upper = format!("sha256:{}", d.hex().to_ascii_uppercase());
        assert_eq!(Sha256Digest::try_from(upper).expect("valid"), d);
        assert!(d.matches_hex(&d.hex().to_ascii_uppercase()));
        for bad in [
            "",
            "sha256:",
            "md5:abc",
            &format!("sha256:{}", "g".repeat(64)),
        ] {
            assert!(bad.parse::<Sha256Digest>().is_err(), "{bad}");
        }
    }
}
