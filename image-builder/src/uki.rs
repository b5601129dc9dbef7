//! Unified kernel images: systemd's EFI stub (`linuxx64.efi.stub`, a PE32+ program) with the
//! kernel, the stage-1 initramfs, the kernel command line and an os-release added as PE
//! sections (`.linux`, `.initrd`, `.cmdline`, `.osrel`). Firmware runs the one file as any EFI
//! program; the stub finds its sections and boots the kernel with them. No boot loader, no
//! loader configuration, one file to sign for Secure Boot.
//!
//! The sections are appended to the stub here (section headers into the stub's spare header
//! room, data after its last byte, each at the next section-aligned virtual address): the same
//! inputs give the same bytes.

use std::fmt;

/// Where Debian's `systemd-boot-efi` puts the stub.
pub const DEFAULT_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";

/// The package that has it.
pub const STUB_PACKAGE: &str = "systemd-boot-efi";

const SECTION_HEADER: usize = 40;
const PE32_PLUS: u16 = 0x20B;
const AMD64: u16 = 0x8664;
/// IMAGE_SCN_CNT_INITIALIZED_DATA | IMAGE_SCN_MEM_READ.
const DATA_READ: u32 = 0x4000_0040;

/// One section to add.
#[derive(Debug, Clone, Copy)]
pub struct Section<'a> {
    /// Its name, at most 8 bytes (`.linux`).
    pub name: &'static str,
    /// Its bytes.
    pub data: &'a [u8],
}

/// Why a stub cannot take the sections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UkiError {
    /// Not a PE32+ x86-64 program.
    #[error("the EFI stub is not a PE32+ x86-64 program: {0}")]
    NotPe(&'static str),
    /// No room for more section headers before the first section's data.
    #[error("the EFI stub has room for {room} more section headers, {want} are needed")]
    NoRoom {
        /// Headers that fit.
        room: usize,
        /// Headers wanted.
        want: usize,
    },
    /// A section name over 8 bytes, or one the stub already has.
    #[error("section {0:?}: names are at most 8 bytes and must not be in the stub already")]
    Name(String),
    /// The image would pass 4 GiB.
    #[error("the unified kernel image would be over 4 GiB")]
    TooBig,
}

/// A section header of a PE file, as read.
#[derive(Clone, PartialEq, Eq)]
pub struct SectionHeader {
    /// Its name, NULs trimmed.
    pub name: String,
    /// Bytes in memory.
    pub virtual_size: u32,
    /// Its address relative to the image base.
    pub virtual_address: u32,
    /// Bytes in the file.
    pub raw_size: u32,
    /// Where its bytes start in the file.
    pub raw_offset: u32,
}

impl fmt::Debug for SectionHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} va {:#x}+{:#x} file {:#x}+{:#x}",
            self.name, self.virtual_address, self.virtual_size, self.raw_offset, self.raw_size
        )
    }
}

/// The layout fields of a PE32+ file this module reads and writes.
#[derive(Debug, Clone)]
pub struct Pe {
    /// Offset of the COFF header (after `PE\0\0`).
    coff: usize,
    /// Offset of the optional header.
    opt: usize,
    /// Offset of the section table.
    table: usize,
    /// The sections.
    pub sections: Vec<SectionHeader>,
    /// Section alignment in memory.
    pub section_alignment: u32,
    /// Alignment of section data in the file.
    pub file_alignment: u32,
    /// Bytes of headers (the first section's data may not start before).
    pub size_of_headers: u32,
    /// Bytes of the loaded image.
    pub size_of_image: u32,
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn put(b: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = b.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

fn align(n: u64, to: u32) -> u64 {
    let to = u64::from(to.max(1));
    n.div_ceil(to) * to
}

impl Pe {
    /// Reads the headers of a PE32+ x86-64 file.
    pub fn read(b: &[u8]) -> Result<Pe, UkiError> {
        let bad = UkiError::NotPe;
        if b.get(..2) != Some(b"MZ") {
            return Err(bad("no MZ header"));
        }
        let pe = le32(b, 0x3C).ok_or(bad("truncated"))? as usize;
        if b.get(pe..pe + 4) != Some(b"PE\0\0") {
            return Err(bad("no PE signature"));
        }
        let coff = pe + 4;
        if le16(b, coff) != Some(AMD64) {
            return Err(bad("not x86-64"));
        }
        let count = le16(b, coff + 2).ok_or(bad("truncated"))? as usize;
        let opt_size = le16(b, coff + 16).ok_or(bad("truncated"))? as usize;
        let opt = coff + 20;
        if le16(b, opt) != Some(PE32_PLUS) {
            return Err(bad("not PE32+"));
        }
        let field = |at| le32(b, opt + at).ok_or(bad("truncated optional header"));
        let table = opt + opt_size;
        let mut sections = Vec::with_capacity(count);
        for i in 0..count {
            let s = table + i * SECTION_HEADER;
            let raw = b
                .get(s..s + SECTION_HEADER)
                .ok_or(bad("truncated section table"))?;
            let name = raw.get(..8).unwrap_or_default();
            let end = name.iter().position(|&c| c == 0).unwrap_or(8);
            let f = |at| le32(raw, at).ok_or(bad("truncated section table"));
            sections.push(SectionHeader {
                name: String::from_utf8_lossy(name.get(..end).unwrap_or_default()).into_owned(),
                virtual_size: f(8)?,
                virtual_address: f(12)?,
                raw_size: f(16)?,
                raw_offset: f(20)?,
            });
        }
        Ok(Pe {
            coff,
            opt,
            table,
            sections,
            section_alignment: field(32)?,
            file_alignment: field(36)?,
            size_of_image: field(56)?,
            size_of_headers: field(60)?,
        })
    }

    /// The bytes of the section named `name` in `file` (at most its virtual size).
    pub fn section<'f>(&self, file: &'f [u8], name: &str) -> Option<&'f [u8]> {
        let s = self.sections.iter().find(|s| s.name == name)?;
        let len = s.virtual_size.min(s.raw_size) as usize;
        let at = s.raw_offset as usize;
        file.get(at..at + len)
    }
}

/// The stub with `sections` added. The stub's own bytes are kept but for the header fields
/// that count sections and the image size, and the checksum (recomputed).
pub fn build(stub: &[u8], sections: &[Section<'_>]) -> Result<Vec<u8>, UkiError> {
    let pe = Pe::read(stub)?;
    for s in sections {
        if s.name.len() > 8 || pe.sections.iter().any(|o| o.name == s.name) {
            return Err(UkiError::Name(s.name.to_owned()));
        }
    }
    let first_data = pe
        .sections
        .iter()
        .map(|s| s.raw_offset)
        .filter(|&o| o > 0)
        .min()
        .unwrap_or(pe.size_of_headers)
        .min(pe.size_of_headers) as usize;
    let table_end = pe.table + pe.sections.len() * SECTION_HEADER;
    let room = first_data.saturating_sub(table_end) / SECTION_HEADER;
    if room < sections.len() {
        return Err(UkiError::NoRoom {
            room,
            want: sections.len(),
        });
    }
    let mut out = stub.to_vec();
    let mut va = pe
        .sections
        .iter()
        .map(|s| u64::from(s.virtual_address) + u64::from(s.virtual_size.max(s.raw_size)))
        .max()
        .unwrap_or(0);
    for (i, s) in sections.iter().enumerate() {
        va = align(va, pe.section_alignment);
        let offset = align(out.len() as u64, pe.file_alignment);
        let raw_size = align(s.data.len() as u64, pe.file_alignment);
        let len = s.data.len() as u64;
        let fits = |n: u64| u32::try_from(n).map_err(|_| UkiError::TooBig);
        let mut h = [0u8; SECTION_HEADER];
        put(&mut h, 0, s.name.as_bytes());
        put(&mut h, 8, &fits(len)?.to_le_bytes());
        put(&mut h, 12, &fits(va)?.to_le_bytes());
        put(&mut h, 16, &fits(raw_size)?.to_le_bytes());
        put(&mut h, 20, &fits(offset)?.to_le_bytes());
        put(&mut h, 36, &DATA_READ.to_le_bytes());
        put(&mut out, table_end + i * SECTION_HEADER, &h);
        out.resize(offset as usize, 0);
        out.extend_from_slice(s.data);
        out.resize((offset + raw_size) as usize, 0);
        va += len;
    }
    let count = u16::try_from(pe.sections.len() + sections.len()).map_err(|_| UkiError::TooBig)?;
    put(&mut out, pe.coff + 2, &count.to_le_bytes());
    let size_of_image =
        u32::try_from(align(va, pe.section_alignment)).map_err(|_| UkiError::TooBig)?;
    put(
        &mut out,
        pe.opt + 56,
        &size_of_image.max(pe.size_of_image).to_le_bytes(),
    );
    let sum = checksum(&out, pe.opt + 64);
    put(&mut out, pe.opt + 64, &sum.to_le_bytes());
    Ok(out)
}

/// The PE checksum: the 16-bit ones'-complement-style sum of the file's 16-bit words (the
/// checksum field counted as zero), plus the file's length.
fn checksum(file: &[u8], field: usize) -> u32 {
    let mut sum: u64 = 0;
    for (i, pair) in file.chunks(2).enumerate() {
        let at = i * 2;
        if at >= field && at < field + 4 {
            continue;
        }
        let word = u64::from(pair.first().copied().unwrap_or(0))
            | (u64::from(pair.get(1).copied().unwrap_or(0)) << 8);
        sum += word;
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum = (sum & 0xFFFF) + (sum >> 16);
    (sum as u32).wrapping_add(file.len() as u32)
}

/// The kernel release a bzImage names (`6.1.0-57-amd64`): the first word of the version string
/// its setup header points at (`kernel_version`, boot protocol 2.00+). `None` when the file is
/// not a bzImage or names none.
pub fn kernel_release(bzimage: &[u8]) -> Option<String> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return None;
    }
    let ptr = usize::from(le16(bzimage, 0x20E)?);
    if ptr == 0 {
        return None;
    }
    let at = ptr + 0x200;
    let text = bzimage.get(at..bzimage.len().min(at + 256))?;
    let end = text.iter().position(|&c| c == 0 || c == b' ')?;
    let release = std::str::from_utf8(text.get(..end)?).ok()?;
    (!release.is_empty()).then(|| release.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal PE32+ x86-64 file: headers up to 0x400, one `.text` section.
    fn tiny_stub() -> Vec<u8> {
        let mut b = vec![0u8; 0x600];
        b[..2].copy_from_slice(b"MZ");
        b[0x3C..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        b[0x80..0x84].copy_from_slice(b"PE\0\0");
        let coff = 0x84;
        b[coff..coff + 2].copy_from_slice(&AMD64.to_le_bytes());
        b[coff + 2..coff + 4].copy_from_slice(&1u16.to_le_bytes());
        b[coff + 16..coff + 18].copy_from_slice(&240u16.to_le_bytes());
        let opt = coff + 20;
        b[opt..opt + 2].copy_from_slice(&PE32_PLUS.to_le_bytes());
        b[opt + 32..opt + 36].copy_from_slice(&0x1000u32.to_le_bytes());
        b[opt + 36..opt + 40].copy_from_slice(&0x200u32.to_le_bytes());
        b[opt + 56..opt + 60].copy_from_slice(&0x2000u32.to_le_bytes());
        b[opt + 60..opt + 64].copy_from_slice(&0x400u32.to_le_bytes());
        let s = opt + 240;
        b[s..s + 5].copy_from_slice(b".text");
        b[s + 8..s + 12].copy_from_slice(&0x10u32.to_le_bytes());
        b[s + 12..s + 16].copy_from_slice(&0x1000u32.to_le_bytes());
        b[s + 16..s + 20].copy_from_slice(&0x200u32.to_le_bytes());
        b[s + 20..s + 24].copy_from_slice(&0x400u32.to_le_bytes());
        b[0x400..0x410].copy_from_slice(b"0123456789abcdef");
        b
    }

    #[test]
    fn sections_are_added_aligned_and_read_back() {
        let stub = tiny_stub();
        let linux = vec![0xAB; 5000];
        let out = build(
            &stub,
            &[
                Section {
                    name: ".osrel",
                    data: b"ID=bootlace\n",
                },
                Section {
                    name: ".cmdline",
                    data: b"console=ttyS0\0",
                },
                Section {
                    name: ".linux",
                    data: &linux,
                },
            ],
        )
        .expect("build");
        let pe = Pe::read(&out).expect("read");
        let names: Vec<&str> = pe.sections.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [".text", ".osrel", ".cmdline", ".linux"]);
        assert_eq!(pe.section(&out, ".cmdline"), Some(&b"console=ttyS0\0"[..]));
        assert_eq!(pe.section(&out, ".linux"), Some(&linux[..]));
        assert_eq!(pe.section(&out, ".text"), Some(&b"0123456789abcdef"[..]));
        let mut end = 0;
        for s in &pe.sections {
            assert_eq!(s.virtual_address % 0x1000, 0, "{s:?}");
            assert_eq!(s.raw_offset % 0x200, 0, "{s:?}");
            assert!(s.virtual_address >= end, "overlap: {s:?}");
            end = s.virtual_address + s.virtual_size;
        }
        assert_eq!(pe.size_of_image, end.div_ceil(0x1000) * 0x1000);
        assert_eq!(out.len() % 0x200, 0);
        assert_eq!(
            build(
                &stub,
                &[Section {
                    name: ".linux",
                    data: &linux
                }]
            )
            .expect("again")
            .len()
                % 0x200,
            0
        );
        let stored = le32(&out, pe.opt + 64).expect("checksum");
        assert_eq!(stored, checksum(&out, pe.opt + 64));
        assert_ne!(stored, 0);
    }

    #[test]
    fn bad_stubs_and_names_are_refused() {
        let stub = tiny_stub();
        assert!(matches!(build(b"nope", &[]), Err(UkiError::NotPe(_))));
        let dup = build(
            &stub,
            &[Section {
                name: ".text",
                data: b"x",
            }],
        );
        assert!(matches!(dup, Err(UkiError::Name(_))));
        let long = build(
            &stub,
            &[Section {
                name: ".toolongname",
                data: b"x",
            }],
        );
        assert!(matches!(long, Err(UkiError::Name(_))));
        let many = vec![
            Section {
                name: ".x",
                data: b"x"
            };
            40
        ];
        assert!(matches!(build(&stub, &many), Err(UkiError::NoRoom { .. })));
        let mut truncated = stub.clone();
        truncated.truncate(0x100);
        assert!(build(&truncated, &[]).is_err());
    }

    #[test]
    fn the_kernel_release_is_read_from_the_setup_header() {
        let mut k = vec![0u8; 0x1000];
        k[0x202..0x206].copy_from_slice(b"HdrS");
        k[0x20E..0x210].copy_from_slice(&0x300u16.to_le_bytes());
        k[0x500..0x520].copy_from_slice(b"6.1.0-57-amd64 (debian-kernel@l)");
        assert_eq!(kernel_release(&k).as_deref(), Some("6.1.0-57-amd64"));
        assert_eq!(kernel_release(b"not a kernel"), None);
        if let Some(real) = std::fs::read_dir("/boot").ok().and_then(|d| {
            d.flatten()
                .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        }) {
            let name = real.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(real.path()).expect("read kernel");
            assert_eq!(
                kernel_release(&bytes).as_deref(),
                name.strip_prefix("vmlinuz-")
            );
        }
    }
}
