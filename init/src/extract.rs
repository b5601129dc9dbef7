//! Extracting a bundle tarball (tar, tar.gz, tar.zst) from the host into a confined root (in the
//! guest: a fresh tmpfs at `/.bootstrap`), hardened against a hostile archive.
//!
//! Policy, per entry and before anything is written for it:
//! - the path must be relative and normalised: a single leading `./` is stripped (and a single
//!   trailing `/` on a directory); absolute paths, `..`, `.` and empty components, NUL bytes,
//!   non-UTF-8, components over 255 bytes and paths over [`Limits::max_path`] are rejected;
//!   a directory entry for the root itself (`./`) is skipped;
//! - regular files and directories are created owned by root (the archive's uid/gid and owner
//!   names are never used) with the permission bits only: setuid, setgid and sticky bits are
//!   stripped (neutralised and counted in [`Summary::stripped_modes`]); mtimes are not kept;
//! - symlinks are created as they are, whatever they point at: every later resolution in the
//!   root (including the next entries of this archive) goes through [`Root`], which resolves
//!   `..` and symlinks inside the root, never outside it;
//! - hard links, character and block devices, FIFOs, sparse files (GNU `S` entries and pax
//!   `GNU.sparse.*` ones) and any other entry type are rejected, not neutralised: the whole
//!   extraction fails with an error naming the entry.
//!
//! Limits ([`Limits`]): the number of entries and the total bytes of regular files, checked as
//! each entry comes; the decompressed tar stream (headers included) is capped at the smaller of
//! `compressed_len * max_ratio` and [`Limits::max_stream`]; the input may not be longer than
//! `compressed_len`. GNU long names/links and pax headers are parsed here (not by the tar
//! crate) so that their size is bounded before they are read into memory.
//!
//! The caller discards the whole root on any error, so partial output inside the root is
//! acceptable; nothing is ever written outside it, since every write goes through [`Root`] (the
//! tar crate's own `unpack` is never used). After the end-of-archive marker the rest of the
//! decompressed stream is read (within the limits) so that the gzip CRC and the zstd checksum
//! are verified; an archive that ends without the marker is an error.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};
use tar::EntryType;

use crate::sys::root::{Root, RootError};

pub use bootlace_contract::compression::{sniff, Compression};

/// Allowance per entry, in the decompressed stream, for what is not file data: the header, the
/// padding to 512 bytes, GNU long name/link and pax headers.
pub const ENTRY_OVERHEAD: u64 = 4096;

/// Allowance for the end-of-archive marker and the padding to a tar record (up to `-b 128`).
pub const END_OVERHEAD: u64 = 64 * 1024;

/// Largest pax extended header (`x`) accepted for one entry.
pub const MAX_PAX_HEADER: u64 = 64 * 1024;

/// Largest zstd window accepted (`zstd -19` uses 8 MiB, `--ultra -20` 32 MiB); bounds memory.
pub const MAX_ZSTD_WINDOW: u64 = 32 * 1024 * 1024;

/// Longest path component, in bytes (Linux NAME_MAX).
const NAME_MAX: usize = 255;

/// What an extraction may produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of regular files unpacked (default 256 MiB).
    pub max_bytes: u64,
    /// Entries in the archive (default 10 000); GNU long name/link and pax headers belong to
    /// their entry and are not counted, pax global headers are.
    pub max_entries: u64,
    /// Decompressed stream bytes per compressed byte (default 200).
    pub max_ratio: u64,
    /// Longest entry path or symlink target, in bytes (default 4095).
    pub max_path: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 256 * 1024 * 1024,
            max_entries: 10_000,
            max_ratio: 200,
            max_path: 4095,
        }
    }
}

impl Limits {
    /// The most decompressed tar stream bytes accepted, whatever the ratio:
    /// `max_bytes + max_entries * ENTRY_OVERHEAD + END_OVERHEAD`.
    pub fn max_stream(&self) -> u64 {
        self.max_bytes
            .saturating_add(self.max_entries.saturating_mul(ENTRY_OVERHEAD))
            .saturating_add(END_OVERHEAD)
    }
}

/// What was extracted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Entries seen (including a skipped `./` and pax global headers).
    pub entries: u64,
    /// Regular files written.
    pub files: u64,
    /// Directories created (not counting the root itself).
    pub dirs: u64,
    /// Symlinks created.
    pub symlinks: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Files and directories whose setuid, setgid or sticky bits were stripped.
    pub stripped_modes: u64,
}

/// Why an extraction failed. Messages name the entry (as the archive wrote it) and the cause.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The entry is refused by the policy: its path, its type or its link target.
    #[error("bundle entry {path:?}: {reason}")]
    Rejected {
        /// The path as the archive wrote it (lossily decoded).
        path: String,
        /// Why.
        reason: Refused,
    },
    /// Creating the entry inside the root failed.
    #[error("bundle entry {path:?}")]
    Write {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: RootError,
    },
    /// Over [`Limits::max_entries`].
    #[error("bundle: over the {limit}-entry limit")]
    TooManyEntries {
        /// The limit.
        limit: u64,
    },
    /// A file would take the unpacked bytes over [`Limits::max_bytes`].
    #[error(
        "bundle entry {path:?}: {size} more bytes would take the files over the {limit}-byte limit"
    )]
    TooManyBytes {
        /// The entry.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The decompressed stream is longer than allowed.
    #[error("bundle: decompressed more than {limit} bytes ({which} limit)")]
    Decompressed {
        /// The cap that was hit.
        limit: u64,
        /// `ratio` (compressed length × max_ratio) or `size` ([`Limits::max_stream`]).
        which: &'static str,
    },
    /// The input is longer than the length the caller declared.
    #[error("bundle: the input is longer than the {declared} bytes declared")]
    InputTooLong {
        /// The declared length.
        declared: u64,
    },
    /// Reading the input failed.
    #[error("bundle: reading the archive")]
    Read {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A header that is well-formed but over a limit or of an unsupported kind.
    #[error("bundle: {message}")]
    Unsupported {
        /// What.
        message: String,
    },
    /// The archive or its compression is malformed or truncated.
    #[error("bundle: corrupt archive: {message}")]
    Corrupt {
        /// What is wrong.
        message: String,
    },
    /// The archive is malformed or truncated inside an entry.
    #[error("bundle entry {path:?}: corrupt archive: {message}")]
    CorruptEntry {
        /// The entry.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// A cap that was hit while reading.
#[derive(Debug, Clone, Copy)]
enum Hit {
    Ratio(u64),
    Size(u64),
    Input(u64),
}

/// What the readers saw, for telling a limit or an input failure from a corrupt archive (the
/// tar crate and the decoders pass errors on, but not always unchanged).
#[derive(Debug, Default)]
struct Status {
    hit: Cell<Option<Hit>>,
    input_failed: Cell<bool>,
    eof: Cell<bool>,
}

impl Status {
    fn error(&self, e: io::Error, path: Option<&str>) -> ExtractError {
        if let Some(hit) = self.hit.get() {
            return match hit {
                Hit::Ratio(limit) => ExtractError::Decompressed {
                    limit,
                    which: "ratio",
                },
                Hit::Size(limit) => ExtractError::Decompressed {
                    limit,
                    which: "size",
                },
                Hit::Input(declared) => ExtractError::InputTooLong { declared },
            };
        }
        if self.input_failed.get() {
            return ExtractError::Read { source: e };
        }
        let message = if self.eof.get() {
            format!("truncated: {e}")
        } else {
            e.to_string()
        };
        match path {
            Some(path) => ExtractError::CorruptEntry {
                path: path.to_owned(),
                message,
            },
            None => ExtractError::Corrupt { message },
        }
    }
}

fn len64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// The caller's input, which may not be longer than declared.
struct InputCap<'a> {
    inner: &'a mut dyn Read,
    left: u64,
    declared: u64,
    status: &'a Status,
}

impl Read for InputCap<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = match (&mut *self.inner)
            .take(self.left.saturating_add(1))
            .read(buf)
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => {
                self.status.input_failed.set(true);
                return Err(e);
            }
        };
        if len64(n) > self.left {
            self.status.hit.set(Some(Hit::Input(self.declared)));
            return Err(io::Error::other("input longer than declared"));
        }
        self.left -= len64(n);
        Ok(n)
    }
}

/// The decompressed stream, capped.
struct OutputCap<'a, R> {
    inner: R,
    left: u64,
    hit: Hit,
    status: &'a Status,
}

impl<R: Read> Read for OutputCap<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = (&mut self.inner)
            .take(self.left.saturating_add(1))
            .read(buf)?;
        if n == 0 {
            self.status.eof.set(true);
            return Ok(0);
        }
        if len64(n) > self.left {
            self.status.hit.set(Some(self.hit));
            return Err(io::Error::other("decompression limit"));
        }
        self.left -= len64(n);
        Ok(n)
    }
}

/// A Zstandard stream of one or more frames (skippable frames skipped), checksums verified.
struct ZstdReader<R> {
    src: R,
    dec: FrameDecoder,
    state: ZState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZState {
    /// Before the first frame: one is required.
    Start,
    InFrame,
    /// After a frame: another may follow, or the end.
    Between,
    Done,
}

fn zstd_error(e: FrameDecoderError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

impl<R: BufRead> ZstdReader<R> {
    fn new(src: R) -> ZstdReader<R> {
        let mut dec = FrameDecoder::new();
        dec.set_max_window_size(MAX_ZSTD_WINDOW);
        ZstdReader {
            src,
            dec,
            state: ZState::Start,
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                ZState::Done => return Ok(0),
                ZState::InFrame => {
                    if self.dec.can_collect() > 0 {
                        return self.dec.read(buf);
                    }
                    if self.dec.is_finished() {
                        if let (Some(want), Some(got)) = (
                            self.dec.get_checksum_from_data(),
                            self.dec.get_calculated_checksum(),
                        ) {
                            if want != got {
                                return Err(io::Error::new(
                                    io::ErrorKind::InvalidData,
                                    "zstd: content checksum mismatch",
                                ));
                            }
                        }
                        self.state = ZState::Between;
                        continue;
                    }
                    self.dec
                        .decode_blocks(&mut self.src, BlockDecodingStrategy::UptoBlocks(1))
                        .map_err(zstd_error)?;
                }
                ZState::Start | ZState::Between => {
                    if self.state == ZState::Between && self.src.fill_buf()?.is_empty() {
                        self.state = ZState::Done;
                        continue;
                    }
                    match self.dec.reset(&mut self.src) {
                        Ok(()) => self.state = ZState::InFrame,
                        Err(FrameDecoderError::ReadFrameHeaderError(
                            ReadFrameHeaderError::SkipFrame { length, .. },
                        )) => {
                            let length = u64::from(length);
                            let skipped =
                                io::copy(&mut (&mut self.src).take(length), &mut io::sink())?;
                            if skipped != length {
                                return Err(io::Error::new(
                                    io::ErrorKind::UnexpectedEof,
                                    "zstd: skippable frame cut short",
                                ));
                            }
                            self.state = ZState::Between;
                        }
                        Err(e) => return Err(zstd_error(e)),
                    }
                }
            }
        }
    }
}

/// An entry's data, which must be exactly as long as its header says. A read failure is kept
/// here so that it can be told from a failure of the write side.
struct EntryData<'a, R> {
    inner: &'a mut R,
    left: u64,
    failure: Option<io::Error>,
}

impl<R: Read> Read for EntryData<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 || buf.is_empty() {
            return Ok(0);
        }
        match (&mut *self.inner).take(self.left).read(buf) {
            Ok(0) => {
                self.failure = Some(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the archive ends inside this file",
                ));
                Err(io::Error::other("bundle entry data cut short"))
            }
            Ok(n) => {
                self.left = self.left.saturating_sub(len64(n));
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.failure = Some(e);
                Err(io::Error::other("reading the bundle entry failed"))
            }
        }
    }
}

/// GNU long name/link and pax headers waiting for the entry they describe.
#[derive(Debug, Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    fn is_empty(&self) -> bool {
        self.long_name.is_none() && self.long_link.is_none() && self.pax.is_none()
    }
}

/// What the pax header says about an entry (only what is used or checked).
#[derive(Debug, Default)]
struct Pax<'a> {
    path: Option<&'a [u8]>,
    linkpath: Option<&'a [u8]>,
    size: Option<&'a [u8]>,
    sparse: bool,
}

fn parse_pax(data: &[u8]) -> Result<Pax<'_>, ExtractError> {
    let mut pax = Pax::default();
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| ExtractError::Corrupt {
            message: format!("pax header: {e}"),
        })?;
        match ext.key_bytes() {
            b"path" => pax.path = Some(ext.value_bytes()),
            b"linkpath" => pax.linkpath = Some(ext.value_bytes()),
            b"size" => pax.size = Some(ext.value_bytes()),
            k if k.starts_with(b"GNU.sparse.") => pax.sparse = true,
            _ => {}
        }
    }
    Ok(pax)
}

/// Strips the NUL GNU tar puts after a long name.
fn strip_nul(v: &[u8]) -> &[u8] {
    v.strip_suffix(b"\0").unwrap_or(v)
}

/// Why the policy refuses an entry (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The path has a NUL byte.
    #[error("path contains a NUL byte")]
    PathNul,
    /// The path is not UTF-8.
    #[error("path is not UTF-8")]
    PathNotUtf8,
    /// The path is over [`Limits::max_path`].
    #[error("path is {len} bytes, over the {max}-byte limit")]
    PathTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The path is absolute.
    #[error("path is absolute")]
    PathAbsolute,
    /// A file with an empty path.
    #[error("path is empty")]
    PathEmpty,
    /// `//` or a trailing `/` on a file.
    #[error("path has an empty component (// or a trailing /)")]
    PathEmptyComponent,
    /// A `.` or `..` component.
    #[error("path has a {0:?} component")]
    PathDots(&'static str),
    /// A component over NAME_MAX.
    #[error("path has a component over {NAME_MAX} bytes")]
    PathLongComponent,
    /// A symlink without a target.
    #[error("symlink target is empty")]
    TargetEmpty,
    /// A symlink target with a NUL byte.
    #[error("symlink target contains a NUL byte")]
    TargetNul,
    /// A symlink target that is not UTF-8.
    #[error("symlink target is not UTF-8")]
    TargetNotUtf8,
    /// A symlink target over [`Limits::max_path`].
    #[error("symlink target is {len} bytes, over the {max}-byte limit")]
    TargetTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A hard link.
    #[error("hard link to {0:?}: hard links are not allowed")]
    HardLink(String),
    /// A character or block device.
    #[error("{0} device: device nodes are not allowed")]
    Device(&'static str),
    /// A FIFO.
    #[error("FIFO: FIFOs are not allowed")]
    Fifo,
    /// A GNU sparse entry.
    #[error("GNU sparse file: sparse files are not allowed")]
    GnuSparse,
    /// A pax sparse entry.
    #[error("pax sparse file (GNU.sparse.*): sparse files are not allowed")]
    PaxSparse,
    /// Any other entry type.
    #[error("entry type {0:?}: not supported")]
    Type(char),
}

/// Validates an entry path; `Ok(None)` is the root itself (only for a directory).
fn validate_path(raw: &[u8], is_dir: bool, max_path: usize) -> Result<Option<&str>, Refused> {
    if raw.contains(&0) {
        return Err(Refused::PathNul);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Refused::PathNotUtf8)?;
    if s.len() > max_path {
        return Err(Refused::PathTooLong {
            len: s.len(),
            max: max_path,
        });
    }
    if s.starts_with('/') {
        return Err(Refused::PathAbsolute);
    }
    let s = s.strip_prefix("./").unwrap_or(s);
    let s = if is_dir {
        s.strip_suffix('/').unwrap_or(s)
    } else {
        s
    };
    if s.is_empty() || s == "." {
        return if is_dir {
            Ok(None)
        } else {
            Err(Refused::PathEmpty)
        };
    }
    for comp in s.split('/') {
        match comp {
            "" => return Err(Refused::PathEmptyComponent),
            "." => return Err(Refused::PathDots(".")),
            ".." => return Err(Refused::PathDots("..")),
            c if c.len() > NAME_MAX => return Err(Refused::PathLongComponent),
            _ => {}
        }
    }
    Ok(Some(s))
}

/// Validates a symlink target: any place (it resolves inside the root), but a sane string.
fn validate_target(raw: &[u8], max_path: usize) -> Result<&str, Refused> {
    if raw.is_empty() {
        return Err(Refused::TargetEmpty);
    }
    if raw.contains(&0) {
        return Err(Refused::TargetNul);
    }
    let s = std::str::from_utf8(raw).map_err(|_| Refused::TargetNotUtf8)?;
    if s.len() > max_path {
        return Err(Refused::TargetTooLong {
            len: s.len(),
            max: max_path,
        });
    }
    Ok(s)
}

/// Why an entry type is refused.
fn refused_type(kind: EntryType, link: Option<&[u8]>) -> Refused {
    match kind {
        EntryType::Link => {
            Refused::HardLink(String::from_utf8_lossy(link.unwrap_or_default()).into_owned())
        }
        EntryType::Char => Refused::Device("character"),
        EntryType::Block => Refused::Device("block"),
        EntryType::Fifo => Refused::Fifo,
        EntryType::GNUSparse => Refused::GnuSparse,
        other => Refused::Type(char::from(other.as_byte())),
    }
}

/// Reads an extension header's data, refusing it when it is over `max` bytes.
fn read_extension<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    what: &str,
    max: u64,
    status: &Status,
) -> Result<Vec<u8>, ExtractError> {
    let size = entry
        .header()
        .entry_size()
        .map_err(|e| status.error(e, None))?;
    if size > max {
        return Err(ExtractError::Unsupported {
            message: format!("{what} of {size} bytes is over the {max}-byte limit"),
        });
    }
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    entry
        .read_to_end(&mut data)
        .map_err(|e| status.error(e, None))?;
    if len64(data.len()) != size {
        return Err(ExtractError::Corrupt {
            message: format!("truncated: the archive ends inside a {what}"),
        });
    }
    Ok(data)
}

fn unpack<R: Read>(
    archive: &mut tar::Archive<R>,
    root: &Root,
    limits: &Limits,
    status: &Status,
) -> Result<Summary, ExtractError> {
    let mut summary = Summary::default();
    let mut pending = Extensions::default();
    let entries = archive.entries().map_err(|e| status.error(e, None))?;
    for entry in entries.raw(true) {
        let mut entry = entry.map_err(|e| status.error(e, None))?;
        let kind = entry.header().entry_type();
        if pending.take(&mut entry, kind, limits, status)? {
            continue;
        }
        summary.entries += 1;
        if summary.entries > limits.max_entries {
            return Err(ExtractError::TooManyEntries {
                limit: limits.max_entries,
            });
        }
        let ext = std::mem::take(&mut pending);
        if kind == EntryType::XGlobalHeader {
            // Archive-wide metadata (`git archive` writes one); never applied. Its data is
            // skipped through the caps.
            if !ext.is_empty() {
                return Err(ExtractError::Corrupt {
                    message: "extension headers before a pax global header".to_owned(),
                });
            }
            continue;
        }
        place(&mut entry, kind, &ext, root, limits, status, &mut summary)?;
    }
    if !pending.is_empty() {
        return Err(ExtractError::Corrupt {
            message: "truncated: extension headers without their entry".to_owned(),
        });
    }
    if status.eof.get() {
        return Err(ExtractError::Corrupt {
            message: "truncated: the archive ends without an end-of-archive marker".to_owned(),
        });
    }
    Ok(summary)
}

impl Extensions {
    /// Keeps a GNU long name/link or pax header for the entry it describes; `Ok(false)` for
    /// any other entry.
    fn take<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        limits: &Limits,
        status: &Status,
    ) -> Result<bool, ExtractError> {
        let name_max = len64(limits.max_path).saturating_add(1);
        let (slot, what, max) = match kind {
            EntryType::GNULongName => (&mut self.long_name, "GNU long name", name_max),
            EntryType::GNULongLink => (&mut self.long_link, "GNU long link", name_max),
            EntryType::XHeader => (&mut self.pax, "pax header", MAX_PAX_HEADER),
            _ => return Ok(false),
        };
        if slot.is_some() {
            let what = what.strip_suffix(" header").unwrap_or(what);
            return Err(ExtractError::Corrupt {
                message: format!("two {what} headers for one entry"),
            });
        }
        *slot = Some(read_extension(entry, what, max, status)?);
        Ok(true)
    }
}

/// One entry's path, link and size as its headers and extensions give them, checked.
struct Described<'a> {
    raw_path: &'a [u8],
    raw_link: Option<&'a [u8]>,
    shown: String,
    size: u64,
    pax_sparse: bool,
}

impl<'a> Described<'a> {
    fn new(
        header: &'a tar::Header,
        header_path: &'a [u8],
        header_link: Option<&'a [u8]>,
        ext: &'a Extensions,
        pax: &Pax<'a>,
        status: &Status,
    ) -> Result<Self, ExtractError> {
        let raw_path: &[u8] = match (&ext.long_name, pax.path) {
            (Some(long), _) => strip_nul(long),
            (None, Some(p)) => p,
            (None, None) => header_path,
        };
        let raw_link = match (&ext.long_link, pax.linkpath) {
            (Some(long), _) => Some(strip_nul(long)),
            (None, Some(l)) => Some(l),
            (None, None) => header_link,
        };
        let shown = String::from_utf8_lossy(raw_path).into_owned();
        let size = header
            .entry_size()
            .map_err(|e| status.error(e, Some(&shown)))?;
        if let Some(pax_size) = pax.size {
            // The tar crate moves on by the header's size here; a pax size that disagrees
            // would make other readers see a different archive.
            let agrees = std::str::from_utf8(pax_size)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                == Some(size);
            if !agrees {
                return Err(ExtractError::CorruptEntry {
                    path: shown,
                    message: format!(
                        "pax size {:?} disagrees with the header size {size}",
                        String::from_utf8_lossy(pax_size)
                    ),
                });
            }
        }
        Ok(Described {
            raw_path,
            raw_link,
            shown,
            size,
            pax_sparse: pax.sparse,
        })
    }

    fn rejected(&self, reason: Refused) -> ExtractError {
        ExtractError::Rejected {
            path: self.shown.clone(),
            reason,
        }
    }

    fn write_err(&self) -> impl FnOnce(RootError) -> ExtractError + '_ {
        move |source| ExtractError::Write {
            path: self.shown.clone(),
            source,
        }
    }
}

/// Places one entry in the root under the policy: a file, a directory or a symlink; anything
/// else is refused.
fn place<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    kind: EntryType,
    ext: &Extensions,
    root: &Root,
    limits: &Limits,
    status: &Status,
    summary: &mut Summary,
) -> Result<(), ExtractError> {
    let pax = match &ext.pax {
        Some(data) => parse_pax(data)?,
        None => Pax::default(),
    };
    let header = entry.header().clone();
    let header_path = header.path_bytes().into_owned();
    let header_link = header.link_name_bytes().map(|l| l.into_owned());
    let d = Described::new(
        &header,
        &header_path,
        header_link.as_deref(),
        ext,
        &pax,
        status,
    )?;
    let is_dir = kind == EntryType::Directory;
    let path = validate_path(d.raw_path, is_dir, limits.max_path).map_err(|r| d.rejected(r))?;
    let Some(path) = path else {
        // `./`: the root itself, which is the caller's.
        return Ok(());
    };
    match kind {
        EntryType::Regular | EntryType::Continuous => {
            place_file(entry, &d, path, root, limits, status, summary)
        }
        EntryType::Directory => {
            let mode = header.mode().map_err(|e| status.error(e, Some(&d.shown)))?;
            if mode & 0o7000 != 0 {
                summary.stripped_modes += 1;
            }
            root.make_dir(path, mode & 0o777, 0, 0)
                .map_err(d.write_err())?;
            summary.dirs += 1;
            Ok(())
        }
        EntryType::Symlink => {
            let target = validate_target(d.raw_link.unwrap_or_default(), limits.max_path)
                .map_err(|r| d.rejected(r))?;
            root.make_symlink(path, target).map_err(d.write_err())?;
            summary.symlinks += 1;
            Ok(())
        }
        other => Err(d.rejected(refused_type(other, d.raw_link))),
    }
}

/// Writes a regular file's data (exactly its header's size) with its permission bits only.
fn place_file<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    d: &Described<'_>,
    path: &str,
    root: &Root,
    limits: &Limits,
    status: &Status,
    summary: &mut Summary,
) -> Result<(), ExtractError> {
    if d.pax_sparse {
        return Err(d.rejected(Refused::PaxSparse));
    }
    let size = d.size;
    let mode = entry
        .header()
        .mode()
        .map_err(|e| status.error(e, Some(&d.shown)))?;
    if summary.bytes.saturating_add(size) > limits.max_bytes {
        return Err(ExtractError::TooManyBytes {
            path: d.shown.clone(),
            size,
            limit: limits.max_bytes,
        });
    }
    if mode & 0o7000 != 0 {
        summary.stripped_modes += 1;
    }
    let mut data = EntryData {
        inner: entry,
        left: size,
        failure: None,
    };
    match root.write_file(path, &mut data, mode & 0o777, 0, 0) {
        Ok(n) if n == size => {}
        Ok(n) => {
            return Err(ExtractError::CorruptEntry {
                path: d.shown.clone(),
                message: format!("{n} bytes of data, the header says {size}"),
            })
        }
        Err(source) => {
            return Err(match data.failure.take() {
                Some(e) => status.error(e, Some(&d.shown)),
                None => d.write_err()(source),
            })
        }
    }
    summary.files += 1;
    summary.bytes = summary.bytes.saturating_add(size);
    Ok(())
}

/// Extracts a bundle into `root`. `compressed_len` is the length of the input (it may not be
/// longer); the decompressed stream is capped at `min(compressed_len * max_ratio,
/// limits.max_stream())` (for [`Compression::None`], at `max_stream`). See the module
/// documentation for what is accepted, neutralised and rejected.
pub fn extract(
    compressed: &mut dyn Read,
    compressed_len: u64,
    compression: Compression,
    root: &Root,
    limits: &Limits,
) -> Result<Summary, ExtractError> {
    let status = Status::default();
    let stream = capped_stream(compressed, compressed_len, compression, limits, &status);
    let mut archive = tar::Archive::new(stream);
    let summary = unpack(&mut archive, root, limits, &status)?;
    // The rest (end-of-archive padding) is read so that the gzip CRC and the zstd checksum
    // are checked; it is bounded by the same caps.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|e| status.error(e, None))?;
    Ok(summary)
}

/// The most decompressed bytes [`extract`] and [`decompress`] accept for an input of
/// `compressed_len` bytes: `min(compressed_len * max_ratio, limits.max_stream())`, or
/// `max_stream` alone for [`Compression::None`].
pub fn stream_cap(compressed_len: u64, compression: Compression, limits: &Limits) -> u64 {
    stream_cap_hit(compressed_len, compression, limits).0
}

fn stream_cap_hit(compressed_len: u64, compression: Compression, limits: &Limits) -> (u64, Hit) {
    let stream_cap = limits.max_stream();
    let ratio_cap = compressed_len.saturating_mul(limits.max_ratio);
    match compression {
        Compression::None => (stream_cap, Hit::Size(stream_cap)),
        _ if ratio_cap < stream_cap => (ratio_cap, Hit::Ratio(ratio_cap)),
        _ => (stream_cap, Hit::Size(stream_cap)),
    }
}

/// The input, decompressed and capped (see [`stream_cap`]), as [`extract`] reads it.
fn capped_stream<'a>(
    compressed: &'a mut dyn Read,
    compressed_len: u64,
    compression: Compression,
    limits: &Limits,
    status: &'a Status,
) -> OutputCap<'a, Box<dyn Read + 'a>> {
    let input = InputCap {
        inner: compressed,
        left: compressed_len,
        declared: compressed_len,
        status,
    };
    let (cap, hit) = stream_cap_hit(compressed_len, compression, limits);
    let decoder: Box<dyn Read + 'a> = match compression {
        Compression::None => Box::new(input),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(input)),
        Compression::Zstd => Box::new(ZstdReader::new(BufReader::new(input))),
    };
    OutputCap {
        inner: decoder,
        left: cap,
        hit,
        status,
    }
}

/// Decompresses a bundle through exactly the capped path [`extract`] reads (declared input
/// length, ratio and size caps, zstd window limit, gzip CRC and zstd checksum checks) without
/// unpacking it, handing each decompressed piece to `out`; returns the number of decompressed
/// bytes. For tests, fuzzing and tools that look inside a bundle with the guest's limits.
pub fn decompress(
    compressed: &mut dyn Read,
    compressed_len: u64,
    compression: Compression,
    limits: &Limits,
    out: &mut dyn FnMut(&[u8]),
) -> Result<u64, ExtractError> {
    let status = Status::default();
    let mut stream = capped_stream(compressed, compressed_len, compression, limits, &status);
    let mut buf = [0u8; 8192];
    let mut total = 0u64;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(status.error(e, None)),
        };
        out(buf.get(..n).unwrap_or_default());
        total = total.saturating_add(len64(n));
    }
}
