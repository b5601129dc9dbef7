//! The `newc` cpio format the kernel unpacks into its initramfs: a writer that produces the
//! same bytes for the same entries, and a reader used by tests and `bootlace-image list`.

use std::io::{self, Read, Write};

/// The kind of an archive entry, with what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A directory.
    Dir,
    /// A regular file of `size` bytes (the data follows the header).
    File {
        /// Byte count.
        size: u64,
    },
    /// A symbolic link to `target`.
    Symlink {
        /// Link target.
        target: String,
    },
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A FIFO.
    Fifo,
}

impl Kind {
    fn type_bits(&self) -> u32 {
        match self {
            Kind::Dir => 0o040000,
            Kind::File { .. } => 0o100000,
            Kind::Symlink { .. } => 0o120000,
            Kind::CharDev { .. } => 0o020000,
            Kind::BlockDev { .. } => 0o060000,
            Kind::Fifo => 0o010000,
        }
    }
}

/// One entry's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Path inside the archive, relative (`bin/sh`), no leading `/`.
    pub name: String,
    /// What it is.
    pub kind: Kind,
    /// Permission bits (including setuid/setgid/sticky), without the type.
    pub perm: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: u32,
}

/// Writes a newc archive. Inode numbers are assigned in write order, so the same sequence of
/// entries always gives the same bytes.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

fn hex8(v: u32) -> String {
    format!("{v:08x}")
}

const MAGIC: &str = "070701";
const HEADER_LEN: u64 = 110;
const TRAILER: &str = "TRAILER!!!";

impl<W: Write> Writer<W> {
    /// A writer on `out`.
    pub fn new(out: W) -> Self {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4)) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    fn header(&mut self, h: &Header, ino: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: {size} bytes is over the 4 GiB newc limit", h.name),
            )
        })?;
        let (rmaj, rmin) = match h.kind {
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => (major, minor),
            _ => (0, 0),
        };
        let namesize = u32::try_from(h.name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        let fields = [
            ino,
            h.kind.type_bits() | (h.perm & 0o7777),
            h.uid,
            h.gid,
            nlink,
            h.mtime,
            size,
            0,
            0,
            rmaj,
            rmin,
            namesize,
            0,
        ];
        let mut head = String::with_capacity(HEADER_LEN as usize);
        head.push_str(MAGIC);
        for f in fields {
            head.push_str(&hex8(f));
        }
        self.put(head.as_bytes())?;
        self.put(h.name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// Writes an entry. For a file, `data` must yield exactly `size` bytes.
    pub fn entry(&mut self, h: &Header, data: Option<&mut dyn Read>) -> io::Result<()> {
        if h.name.is_empty() || h.name.starts_with('/') || h.name == TRAILER {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid archive name {:?}", h.name),
            ));
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        match &h.kind {
            Kind::File { size } => {
                self.header(h, ino, 1, *size)?;
                let data = data.ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("{}: no data", h.name))
                })?;
                let copied = io::copy(&mut data.take(*size), &mut self.out)?;
                if copied != *size {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{}: expected {size} bytes, read {copied}", h.name),
                    ));
                }
                self.offset += copied;
                self.pad()
            }
            Kind::Symlink { target } => {
                self.header(h, ino, 1, target.len() as u64)?;
                self.put(target.as_bytes())?;
                self.pad()
            }
            Kind::Dir => self.header(h, ino, 2, 0),
            _ => self.header(h, ino, 1, 0),
        }
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        let trailer = Header {
            name: TRAILER.to_owned(),
            kind: Kind::File { size: 0 },
            perm: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        self.header(&trailer, 0, 1, 0)?;
        // The kernel reads the archive in 512-byte blocks; pad like cpio(1) does.
        let n = (512 - (self.offset % 512)) % 512;
        self.put(&vec![0u8; n as usize])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// An entry read back from an archive, with its data (file contents or link target).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The header (for files, `size` is the data length).
    pub header: Header,
    /// File contents; empty for other kinds.
    pub data: Vec<u8>,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads every entry of an uncompressed newc archive (up to the trailer).
pub fn read_all(bytes: &[u8]) -> io::Result<Vec<Entry>> {
    let mut pos = 0usize;
    let mut out = Vec::new();
    let align = |p: usize| (p + 3) & !3;
    loop {
        let head = bytes
            .get(pos..pos + HEADER_LEN as usize)
            .ok_or_else(|| bad(format!("truncated header at offset {pos}")))?;
        let head = std::str::from_utf8(head).map_err(|_| bad("header is not ASCII"))?;
        if !head.starts_with(MAGIC) {
            return Err(bad(format!("bad magic at offset {pos}")));
        }
        let field = |i: usize| -> io::Result<u32> {
            let s = head
                .get(6 + i * 8..14 + i * 8)
                .ok_or_else(|| bad("short header"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad(format!("bad header field {s:?}")))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let namesize = field(11)? as usize;
        let name_start = pos + HEADER_LEN as usize;
        let name = bytes
            .get(name_start..name_start + namesize.saturating_sub(1))
            .ok_or_else(|| bad("truncated name"))?;
        let name = String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8"))?;
        let data_start = align(name_start + namesize);
        let data = bytes
            .get(data_start..data_start + size)
            .ok_or_else(|| bad(format!("{name}: truncated data")))?
            .to_vec();
        pos = align(data_start + size);
        if name == TRAILER {
            return Ok(out);
        }
        let kind = match mode & 0o170000 {
            0o040000 => Kind::Dir,
            0o100000 => Kind::File { size: size as u64 },
            0o120000 => Kind::Symlink {
                target: String::from_utf8(data.clone()).map_err(|_| bad("bad link target"))?,
            },
            0o020000 => Kind::CharDev {
                major: field(9)?,
                minor: field(10)?,
            },
            0o060000 => Kind::BlockDev {
                major: field(9)?,
                minor: field(10)?,
            },
            0o010000 => Kind::Fifo,
            other => return Err(bad(format!("{name}: unknown file type {other:o}"))),
        };
        let is_file = matches!(kind, Kind::File { .. });
        out.push(Entry {
            header: Header {
                name,
                kind,
                perm: mode & 0o7777,
                uid: field(2)?,
                gid: field(3)?,
                mtime: field(5)?,
            },
            data: if is_file { data } else { Vec::new() },
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str, kind: Kind, perm: u32) -> Header {
        Header {
            name: name.to_owned(),
            kind,
            perm,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let mut w = Writer::new(Vec::new());
        let entries = vec![
            (h("bin", Kind::Dir, 0o755), Vec::new()),
            (
                h("bin/hello", Kind::File { size: 5 }, 0o4755),
                b"hello".to_vec(),
            ),
            (
                h(
                    "bin/sh",
                    Kind::Symlink {
                        target: "busybox".into(),
                    },
                    0o777,
                ),
                Vec::new(),
            ),
            (
                h("dev/console", Kind::CharDev { major: 5, minor: 1 }, 0o600),
                Vec::new(),
            ),
            (h("empty", Kind::File { size: 0 }, 0o644), Vec::new()),
        ];
        for (hd, data) in &entries {
            let mut r: &[u8] = data;
            w.entry(hd, Some(&mut r)).expect("write");
        }
        let bytes = w.finish().expect("finish");
        assert_eq!(bytes.len() % 512, 0);
        let back = read_all(&bytes).expect("read back");
        assert_eq!(back.len(), entries.len());
        for (got, (hd, data)) in back.iter().zip(&entries) {
            assert_eq!(&got.header, hd);
            if matches!(hd.kind, Kind::File { .. }) {
                assert_eq!(&got.data, data);
            }
        }
    }

    #[test]
    fn refuses_bad_names_and_short_data() {
        let mut w = Writer::new(Vec::new());
        for name in ["", "/abs", "TRAILER!!!"] {
            assert!(
                w.entry(&h(name, Kind::Dir, 0o755), None).is_err(),
                "{name:?}"
            );
        }
        let mut short: &[u8] = b"abc";
        let err = w
            .entry(&h("f", Kind::File { size: 10 }, 0o644), Some(&mut short))
            .expect_err("short data");
        assert!(err.to_string().contains("expected 10 bytes, read 3"));
    }

    #[test]
    fn reader_rejects_garbage() {
        for bytes in [&b""[..], b"070701zz", &[b'x'; 200]] {
            assert!(read_all(bytes).is_err());
        }
    }
}
