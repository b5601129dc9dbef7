//! How a tarball, an OCI layer, a bundle or an initramfs is compressed: one enum for every
//! place that reads or writes one, and the magic bytes that tell them apart.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A compression.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not compressed.
    None,
    /// gzip (concatenated members are accepted when reading, as `gunzip` does).
    Gzip,
    /// Zstandard (several frames and skippable frames are accepted when reading).
    Zstd,
}

impl Compression {
    /// Every compression, in the order they are listed in messages.
    pub const ALL: [Compression; 3] = [Compression::None, Compression::Gzip, Compression::Zstd];

    /// The name: `none`, `gzip` or `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compression name that is not `none`, `gzip` or `zstd`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?} (expected none, gzip or zstd)")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;
    fn from_str(s: &str) -> Result<Compression, UnknownCompression> {
        Compression::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| UnknownCompression(s.to_owned()))
    }
}

/// The compression the first bytes of a stream show: gzip (`1f 8b`), zstd (`28 b5 2f fd`, or
/// a skippable frame `5x 2a 4d 18` as `pzstd` writes first), otherwise [`Compression::None`].
pub fn sniff(first_bytes: &[u8]) -> Compression {
    match first_bytes {
        [0x1f, 0x8b, ..] => Compression::Gzip,
        [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
        [m, 0x2a, 0x4d, 0x18, ..] if m & 0xf0 == 0x50 => Compression::Zstd,
        _ => Compression::None,
    }
}

/// Whether the first bytes of an uncompressed stream are a tar header (`ustar` at 257).
pub fn is_tar(first_bytes: &[u8]) -> bool {
    first_bytes.get(257..262) == Some(b"ustar".as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_magic_is_sniffed() {
        for c in Compression::ALL {
            assert_eq!(c.as_str().parse::<Compression>(), Ok(c));
        }
        let e = "xz".parse::<Compression>().expect_err("xz");
        assert!(e.to_string().contains("\"xz\""), "{e}");
        assert_eq!(sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(sniff(&[0x50, 0x2a, 0x4d, 0x18]), Compression::Zstd);
        assert_eq!(sniff(b"hello"), Compression::None);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(is_tar(&tar) && !is_tar(b"short"));
    }
}
