//! Bake limits: how much of an input a bake reads before it refuses it. A root filesystem from
//! elsewhere (a tarball, an OCI layout) may be built to exhaust the builder: a huge `index.json`,
//! millions of tiny entries, a gzip bomb. Each limit has a default and a flag that raises it:
//!
//! | limit | default | flag |
//! | --- | --- | --- |
//! | a JSON document of an OCI layout (`oci-layout`, `index.json`, an index, manifest or config blob) | 4 MiB | `--max-json-bytes` |
//! | entries, over every input of the bake | 1,000,000 | `--max-entries` |
//! | bytes of file contents unpacked, over every input | 16 GiB | `--max-bytes` |
//! | compression ratio of a gzip or zstd stream (tarball or layer), checked once past 1 MiB unpacked | 200 | `--max-ratio` |
//!
//! `0` means no limit. A refusal is a [`LimitError`] naming the input, the limit, its value and
//! the flag; the bake then removes everything it made, as on any error.
//!
//! [`Budget`] counts entries and bytes as they are placed; [`RatioGuard`] counts the bytes
//! going into a decompressor and coming out of it; [`count_dir`] counts a directory input
//! before any work.

use std::cell::Cell;
use std::fmt;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bootlace_contract::types::InvalidValue;

/// The default largest JSON document: 4 MiB.
pub const DEFAULT_JSON_BYTES: u64 = 4 << 20;
/// The default most entries: 1,000,000.
pub const DEFAULT_ENTRIES: u64 = 1_000_000;
/// The default most bytes unpacked: 16 GiB.
pub const DEFAULT_BYTES: u64 = 16 << 30;
/// The default highest compression ratio: 200.
pub const DEFAULT_RATIO: u64 = 200;
/// The ratio is only checked once a stream has unpacked this much (1 MiB): small inputs
/// compress as they like.
pub const RATIO_FLOOR: u64 = 1 << 20;

/// What a bake reads at most; `0` in a field: no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bytes of one JSON document of an OCI layout (`--max-json-bytes`).
    pub json_bytes: u64,
    /// Entries over every input (`--max-entries`).
    pub entries: u64,
    /// Bytes of file contents over every input (`--max-bytes`).
    pub bytes: u64,
    /// Bytes out of a decompressor per byte into it (`--max-ratio`).
    pub ratio: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            json_bytes: DEFAULT_JSON_BYTES,
            entries: DEFAULT_ENTRIES,
            bytes: DEFAULT_BYTES,
            ratio: DEFAULT_RATIO,
        }
    }
}

impl Limits {
    /// No limit at all.
    pub fn none() -> Limits {
        Limits {
            json_bytes: 0,
            entries: 0,
            bytes: 0,
            ratio: 0,
        }
    }
}

/// A byte count as the messages show it: `4194304 bytes (4 MiB)`, or `1000 bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        write!(f, "{n} bytes")?;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n >= 1 << shift && n.is_multiple_of(1 << shift) {
                return write!(f, " ({} {unit})", n >> shift);
            }
        }
        Ok(())
    }
}

/// A limit reached. Each names the input (`tarball rootfs.tar.gz`, `layer sha256:…`,
/// `directory ./rootfs`, `OCI layout ./img: index.json`), the limit and the flag that raises it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// A JSON document over `--max-json-bytes`.
    #[error("{input}: {} is over the {} limit of a JSON document (--max-json-bytes raises it)", Size(*size), Size(*max))]
    Json {
        /// The document.
        input: String,
        /// Its size (at least what was read of it).
        size: u64,
        /// The limit.
        max: u64,
    },
    /// More entries than `--max-entries`.
    #[error("{input}: over {max} entries (--max-entries raises it)")]
    Entries {
        /// The input the last entry came from.
        input: String,
        /// The limit.
        max: u64,
    },
    /// More bytes unpacked than `--max-bytes`.
    #[error("{input}: over {} unpacked (--max-bytes raises it)", Size(*max))]
    Bytes {
        /// The input the last bytes came from.
        input: String,
        /// The limit.
        max: u64,
    },
    /// A compressed stream that unpacks to more than `--max-ratio` times what was read of it.
    #[error(
        "{input}: unpacks to over {max} times its compressed size ({unpacked} bytes from \
         {compressed}): a compression bomb? (--max-ratio raises it)"
    )]
    Ratio {
        /// The tarball or layer.
        input: String,
        /// The limit.
        max: u64,
        /// Bytes out of the decompressor so far.
        unpacked: u64,
        /// Bytes into it so far.
        compressed: u64,
    },
}

impl LimitError {
    /// The flag that raises the limit.
    pub fn flag(&self) -> &'static str {
        match self {
            LimitError::Json { .. } => "--max-json-bytes",
            LimitError::Entries { .. } => "--max-entries",
            LimitError::Bytes { .. } => "--max-bytes",
            LimitError::Ratio { .. } => "--max-ratio",
        }
    }
}

/// The entries and bytes a bake has placed, against its limits. Not shared between threads.
#[derive(Debug)]
pub struct Budget {
    limits: Limits,
    entries: Cell<u64>,
    bytes: Cell<u64>,
}

impl Budget {
    /// Nothing counted yet.
    pub fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            entries: Cell::new(0),
            bytes: Cell::new(0),
        }
    }

    /// The limits counted against.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Entries and bytes counted so far.
    pub fn counted(&self) -> (u64, u64) {
        (self.entries.get(), self.bytes.get())
    }

    /// One more entry from `input`, with `bytes` of contents; refused over a limit.
    pub fn charge(&self, input: &str, bytes: u64) -> Result<(), LimitError> {
        let entries = self.entries.get() + 1;
        self.entries.set(entries);
        let max = self.limits.entries;
        if max != 0 && entries > max {
            return Err(LimitError::Entries {
                input: input.to_owned(),
                max,
            });
        }
        let total = self.bytes.get().saturating_add(bytes);
        self.bytes.set(total);
        let max = self.limits.bytes;
        if max != 0 && total > max {
            return Err(LimitError::Bytes {
                input: input.to_owned(),
                max,
            });
        }
        Ok(())
    }
}

/// Watches one compressed stream: [`RatioGuard::compressed`] goes under the decompressor,
/// [`RatioGuard::unpacked`] over it. Once past [`RATIO_FLOOR`] unpacked, a read that brings the
/// stream above `max` bytes out per byte in fails; [`RatioGuard::error`] then says why (the
/// archive reader above only sees an I/O error).
#[derive(Debug)]
pub struct RatioGuard {
    max: u64,
    compressed: Cell<u64>,
    tripped: Cell<Option<(u64, u64)>>,
}

/// The compressed side of a [`RatioGuard`]: counts what the decompressor reads.
#[derive(Debug)]
pub struct CompressedIn<'g, R> {
    inner: R,
    guard: &'g RatioGuard,
}

/// The unpacked side of a [`RatioGuard`]: checks the ratio on every read.
#[derive(Debug)]
pub struct UnpackedOut<'g, R> {
    inner: R,
    guard: &'g RatioGuard,
    unpacked: u64,
}

impl RatioGuard {
    /// A guard for at most `max` bytes out per byte in (`0`: no limit).
    pub fn new(max: u64) -> RatioGuard {
        RatioGuard {
            max,
            compressed: Cell::new(0),
            tripped: Cell::new(None),
        }
    }

    /// Wraps the compressed stream (read by the decompressor).
    pub fn compressed<R: Read>(&self, inner: R) -> CompressedIn<'_, R> {
        CompressedIn { inner, guard: self }
    }

    /// Wraps the decompressor's output.
    pub fn unpacked<R: Read>(&self, inner: R) -> UnpackedOut<'_, R> {
        UnpackedOut {
            inner,
            guard: self,
            unpacked: 0,
        }
    }

    /// Why reading stopped, when the ratio did it.
    pub fn error(&self, input: &str) -> Option<LimitError> {
        self.tripped
            .get()
            .map(|(unpacked, compressed)| LimitError::Ratio {
                input: input.to_owned(),
                max: self.max,
                unpacked,
                compressed,
            })
    }
}

impl<R: Read> Read for CompressedIn<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let c = &self.guard.compressed;
        c.set(c.get() + n as u64);
        Ok(n)
    }
}

impl<R: Read> Read for UnpackedOut<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let g = self.guard;
        let over = || io::Error::other("over the compression ratio limit");
        if g.tripped.get().is_some() {
            return Err(over());
        }
        let n = self.inner.read(buf)?;
        self.unpacked += n as u64;
        let compressed = g.compressed.get();
        if g.max != 0
            && self.unpacked > RATIO_FLOOR
            && u128::from(self.unpacked) > u128::from(g.max) * u128::from(compressed)
        {
            g.tripped.set(Some((self.unpacked, compressed)));
            return Err(over());
        }
        Ok(n)
    }
}

/// Why a directory could not be counted.
#[derive(Debug, thiserror::Error)]
pub enum CountError {
    /// Over a limit.
    #[error(transparent)]
    Limit(#[from] LimitError),
    /// A directory or an entry could not be read.
    #[error("{}", path.display())]
    Io {
        /// The directory or entry.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Counts the entries of the tree at `dir` (not `dir` itself) and the bytes of its regular
/// files into `budget`, as `input`; a walk of names and `lstat`s, no file read. A file with
/// several hard links counts `size / links` (rounded up) at each: its size once when all its
/// links are in the tree, with nothing remembered per file. Memory: one open directory per
/// level of depth.
pub fn count_dir(dir: &Path, budget: &Budget, input: &str) -> Result<(), CountError> {
    use std::os::unix::fs::MetadataExt;
    let err = |path: &Path| {
        let path = path.to_owned();
        move |source| CountError::Io { path, source }
    };
    for entry in std::fs::read_dir(dir).map_err(err(dir))? {
        let entry = entry.map_err(err(dir))?;
        let meta = entry.metadata().map_err(err(&entry.path()))?;
        let bytes = if meta.is_file() {
            meta.size().div_ceil(meta.nlink().max(1))
        } else {
            0
        };
        budget.charge(input, bytes)?;
        if meta.is_dir() {
            count_dir(&entry.path(), budget, input)?;
        }
    }
    Ok(())
}

/// Parses a byte count: digits, optionally followed by `K`, `M`, `G` or `T` (powers of 1024,
/// either case, optionally `KiB`, `MB`, …): `4096`, `4M`, `16GiB`. `0` is no limit.
pub fn parse_size(s: &str) -> Result<u64, InvalidValue> {
    let bad = || InvalidValue::new("size", s, "is not a byte count (4096, 64K, 4M, 16G, 1T)");
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    let n: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| InvalidValue::new("size", s, "does not fit in 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4M"), Ok(4 << 20));
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "M", "4X", "-1", "1.5G", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert_eq!(Size(4 << 20).to_string(), "4194304 bytes (4 MiB)");
        assert_eq!(Size(1000).to_string(), "1000 bytes");
    }

    #[test]
    fn budget_counts_and_refuses() {
        let b = Budget::new(Limits {
            entries: 2,
            bytes: 10,
            ..Limits::default()
        });
        assert!(b.charge("tarball t", 4).is_ok());
        assert!(b.charge("tarball t", 6).is_ok());
        let e = b.charge("tarball t", 0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "tarball t: over 2 entries (--max-entries raises it)"
        );
        let b = Budget::new(Limits {
            bytes: 10,
            ..Limits::default()
        });
        let e = b.charge("layer x", 11).unwrap_err();
        assert_eq!(e.flag(), "--max-bytes");
        assert!(e.to_string().contains("over 10 bytes unpacked"), "{e}");
        let b = Budget::new(Limits::none());
        for _ in 0..10 {
            assert!(b.charge("x", u64::MAX).is_ok());
        }
    }

    #[test]
    fn ratio_guard_trips_on_a_bomb_only() {
        let zeros = vec![0u8; 8 << 20];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        io::Write::write_all(&mut gz, &zeros).unwrap();
        let packed = gz.finish().unwrap();
        let run = |max| {
            let g = RatioGuard::new(max);
            let dec = flate2::read::GzDecoder::new(g.compressed(&packed[..]));
            let r = io::copy(&mut g.unpacked(dec), &mut io::sink());
            (r.is_ok(), g.error("tarball bomb.tar.gz"))
        };
        let (ok, e) = run(200);
        assert!(!ok);
        let e = e.expect("tripped").to_string();
        assert!(
            e.contains("tarball bomb.tar.gz: unpacks to over 200 times"),
            "{e}"
        );
        assert!(e.contains("--max-ratio"), "{e}");
        assert_eq!(run(0), (true, None));
        assert_eq!(run(100_000), (true, None));
    }
}
