//! GUID partition tables (UEFI 2.10, chapter 5): the builder writes one for a bootable disk
//! (`bootlace-image bake --format disk`), stage 1 reads it to find the root partition by its
//! unique GUID (`PARTUUID=`) or name (`PARTLABEL=`). [`parse`] is pure and panic-free on any
//! input; [`Table::write`] gives the exact bytes of both copies, so a bake is reproducible.

use std::fmt;
use std::str::FromStr;

/// The bytes of one GPT partition entry this code writes (the smallest the spec allows).
pub const ENTRY_SIZE: usize = 128;

/// The entries this code writes (16 KiB of entries: the spec's minimum).
pub const ENTRIES: usize = 128;

/// The most entries [`parse`] takes (a header claiming more is refused, not allocated).
pub const MAX_ENTRIES: u32 = 1024;

/// A GPT partition name holds at most 36 UTF-16 code units.
pub const MAX_NAME_UNITS: usize = 36;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;

/// A GUID as it is stored on disk: the first three fields little-endian (UEFI's "mixed-endian"
/// layout), printed in the usual lowercase form `c12a7328-f81f-11d2-ba4b-00a0c93ec93b`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Guid([u8; 16]);

impl Guid {
    /// The EFI system partition.
    pub const ESP: Guid = Guid::from_fields(0xC12A_7328, 0xF81F, 0x11D2, 0xBA4B_00A0_C93E_C93B);
    /// An x86-64 root partition (the Discoverable Partitions Specification's type).
    pub const ROOT_X86_64: Guid =
        Guid::from_fields(0x4F68_BCE3, 0xE8CD, 0x4DB1, 0x96E7_FBCA_F984_B709);
    /// Generic Linux data.
    pub const LINUX_DATA: Guid =
        Guid::from_fields(0x0FC6_3DAF, 0x8483, 0x4772, 0x8E79_3D69_D847_7DE4);
    /// The unused entry.
    pub const NIL: Guid = Guid([0; 16]);

    /// From the four fields of its text form (the last 8 bytes as one big-endian number).
    pub const fn from_fields(a: u32, b: u16, c: u16, d: u64) -> Guid {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        let d = d.to_be_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }

    /// From its 16 on-disk bytes.
    pub const fn from_disk_bytes(b: [u8; 16]) -> Guid {
        Guid(b)
    }

    /// Its 16 on-disk bytes.
    pub const fn disk_bytes(&self) -> [u8; 16] {
        self.0
    }

    /// A version-4-shaped GUID made from 16 bytes of a hash, so the same input gives the same
    /// GUID (a reproducible bake) and different inputs practically never collide.
    pub fn from_hash(h: [u8; 16]) -> Guid {
        // The text-form bytes: version 4 in the high nibble of the 7th, RFC 4122 variant.
        let mut t = h;
        t[6] = (t[6] & 0x0F) | 0x40;
        t[8] = (t[8] & 0x3F) | 0x80;
        Guid::from_text_bytes(t)
    }

    fn from_text_bytes(t: [u8; 16]) -> Guid {
        Guid([
            t[3], t[2], t[1], t[0], t[5], t[4], t[7], t[6], t[8], t[9], t[10], t[11], t[12], t[13],
            t[14], t[15],
        ])
    }

    fn text_bytes(&self) -> [u8; 16] {
        let b = self.0;
        [
            b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15],
        ]
    }

    /// Whether this is the unused entry's type.
    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.text_bytes().iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// Text that is not a GUID (`xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a GUID (expected 8-4-4-4-12 hex digits, e.g. 4f68bce3-e8cd-4db1-96e7-fbcaf984b709)")]
pub struct BadGuid(pub String);

impl FromStr for Guid {
    type Err = BadGuid;
    fn from_str(s: &str) -> Result<Guid, BadGuid> {
        let bad = || BadGuid(s.to_owned());
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        let mut t = [0u8; 16];
        for (i, out) in t.iter_mut().enumerate() {
            let pair = hex.get(i * 2..i * 2 + 2).ok_or_else(bad)?;
            *out = u8::from_str_radix(pair, 16).map_err(|_| bad())?;
        }
        Ok(Guid::from_text_bytes(t))
    }
}

/// One partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// Its number as the kernel counts it (the 1-based index of its entry).
    pub number: u32,
    /// Its type.
    pub type_guid: Guid,
    /// Its unique GUID (`PARTUUID=`).
    pub unique: Guid,
    /// Its first sector.
    pub first_lba: u64,
    /// Its last sector (inclusive).
    pub last_lba: u64,
    /// Attribute bits.
    pub attributes: u64,
    /// Its name (`PARTLABEL=`), at most [`MAX_NAME_UNITS`] UTF-16 code units.
    pub name: String,
}

impl Partition {
    /// Its size in sectors.
    pub fn sectors(&self) -> u64 {
        self.last_lba
            .saturating_sub(self.first_lba)
            .saturating_add(1)
    }
}

/// A partition table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The disk's GUID.
    pub disk_guid: Guid,
    /// Bytes per sector (512 or 4096).
    pub sector_size: u32,
    /// The disk's size in sectors.
    pub disk_sectors: u64,
    /// The partitions, in entry order (numbers 1, 2, …).
    pub partitions: Vec<Partition>,
}

/// Why a partition table cannot be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// More partitions than entries.
    #[error("{0} partitions: a GPT written here holds at most {ENTRIES}")]
    TooMany(usize),
    /// A partition outside the usable sectors or overlapping another.
    #[error("partition {number} ({name:?}) spans sectors {first}..={last}, outside {usable_first}..={usable_last} or over another partition")]
    Placement {
        /// The partition.
        number: u32,
        /// Its name.
        name: String,
        /// Its first sector.
        first: u64,
        /// Its last sector.
        last: u64,
        /// The first usable sector.
        usable_first: u64,
        /// The last usable sector.
        usable_last: u64,
    },
    /// A name longer than an entry holds.
    #[error("partition name {0:?} is longer than {MAX_NAME_UNITS} UTF-16 code units")]
    Name(String),
    /// A sector size other than 512 or 4096.
    #[error("sector size {0}: only 512 and 4096 are written")]
    SectorSize(u32),
}

impl Table {
    /// Sectors taken by the entry array.
    fn entry_sectors(sector_size: u32) -> u64 {
        ((ENTRIES * ENTRY_SIZE) as u64).div_ceil(u64::from(sector_size))
    }

    /// The first sector a partition may use.
    pub fn first_usable(sector_size: u32) -> u64 {
        2 + Table::entry_sectors(sector_size)
    }

    /// The last sector a partition may use on a disk of `disk_sectors`.
    pub fn last_usable(sector_size: u32, disk_sectors: u64) -> u64 {
        disk_sectors.saturating_sub(2 + Table::entry_sectors(sector_size))
    }

    fn check(&self) -> Result<(), WriteError> {
        if !matches!(self.sector_size, 512 | 4096) {
            return Err(WriteError::SectorSize(self.sector_size));
        }
        if self.partitions.len() > ENTRIES {
            return Err(WriteError::TooMany(self.partitions.len()));
        }
        let (lo, hi) = (
            Table::first_usable(self.sector_size),
            Table::last_usable(self.sector_size, self.disk_sectors),
        );
        for p in &self.partitions {
            if p.name.encode_utf16().count() > MAX_NAME_UNITS {
                return Err(WriteError::Name(p.name.clone()));
            }
            let overlaps = self.partitions.iter().any(|o| {
                o.number != p.number && o.first_lba <= p.last_lba && p.first_lba <= o.last_lba
            });
            if p.first_lba < lo || p.last_lba > hi || p.first_lba > p.last_lba || overlaps {
                return Err(WriteError::Placement {
                    number: p.number,
                    name: p.name.clone(),
                    first: p.first_lba,
                    last: p.last_lba,
                    usable_first: lo,
                    usable_last: hi,
                });
            }
        }
        Ok(())
    }

    fn entries(&self) -> Vec<u8> {
        let mut out = vec![0u8; ENTRIES * ENTRY_SIZE];
        for (slot, p) in out.chunks_exact_mut(ENTRY_SIZE).zip(&self.partitions) {
            put(slot, 0, &p.type_guid.disk_bytes());
            put(slot, 16, &p.unique.disk_bytes());
            put(slot, 32, &p.first_lba.to_le_bytes());
            put(slot, 40, &p.last_lba.to_le_bytes());
            put(slot, 48, &p.attributes.to_le_bytes());
            for (i, unit) in p.name.encode_utf16().take(MAX_NAME_UNITS).enumerate() {
                put(slot, 56 + 2 * i, &unit.to_le_bytes());
            }
        }
        out
    }

    fn header(&self, entries_crc: u32, backup: bool) -> Vec<u8> {
        let last = self.disk_sectors - 1;
        let entry_sectors = Table::entry_sectors(self.sector_size);
        let (my_lba, alt_lba, entries_lba) = if backup {
            (last, 1, last - entry_sectors)
        } else {
            (1, last, 2)
        };
        let mut h = vec![0u8; self.sector_size as usize];
        put(&mut h, 0, SIGNATURE);
        put(&mut h, 8, &REVISION.to_le_bytes());
        put(&mut h, 12, &HEADER_SIZE.to_le_bytes());
        put(&mut h, 24, &my_lba.to_le_bytes());
        put(&mut h, 32, &alt_lba.to_le_bytes());
        put(
            &mut h,
            40,
            &Table::first_usable(self.sector_size).to_le_bytes(),
        );
        put(
            &mut h,
            48,
            &Table::last_usable(self.sector_size, self.disk_sectors).to_le_bytes(),
        );
        put(&mut h, 56, &self.disk_guid.disk_bytes());
        put(&mut h, 72, &entries_lba.to_le_bytes());
        put(&mut h, 80, &(ENTRIES as u32).to_le_bytes());
        put(&mut h, 84, &(ENTRY_SIZE as u32).to_le_bytes());
        put(&mut h, 88, &entries_crc.to_le_bytes());
        let crc = crc32fast::hash(h.get(..HEADER_SIZE as usize).unwrap_or_default());
        put(&mut h, 16, &crc.to_le_bytes());
        h
    }

    /// The protective MBR: one partition of type 0xEE over the whole disk (capped at 2^32-1
    /// sectors), so tools that know only MBR leave the disk alone.
    fn protective_mbr(&self) -> Vec<u8> {
        let mut m = vec![0u8; self.sector_size as usize];
        // Entry 1 at 446: CHS of LBA 1, type 0xEE, CHS "beyond", LBA 1, size.
        put(&mut m, 447, &[0x00, 0x02, 0x00, 0xEE, 0xFF, 0xFF, 0xFF]);
        put(&mut m, 454, &1u32.to_le_bytes());
        let size = u32::try_from(self.disk_sectors - 1).unwrap_or(u32::MAX);
        put(&mut m, 458, &size.to_le_bytes());
        put(&mut m, 510, &[0x55, 0xAA]);
        m
    }

    /// The table's bytes: `head` goes at offset 0 (protective MBR, primary header, entries),
    /// `tail` ends at the disk's last byte (entries, backup header).
    pub fn write(&self) -> Result<(Vec<u8>, Vec<u8>), WriteError> {
        self.check()?;
        let entries = self.entries();
        let crc = crc32fast::hash(&entries);
        let mut head = self.protective_mbr();
        head.extend(self.header(crc, false));
        head.extend(&entries);
        pad_to_sector(&mut head, self.sector_size);
        let mut tail = entries;
        pad_to_sector(&mut tail, self.sector_size);
        tail.extend(self.header(crc, true));
        Ok((head, tail))
    }
}

/// Copies `bytes` into `buf` at `at` (nothing when it does not fit: the callers' offsets are
/// within their fixed-size buffers).
fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = buf.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

fn pad_to_sector(v: &mut Vec<u8>, sector: u32) {
    let s = sector as usize;
    v.resize(v.len().div_ceil(s) * s, 0);
}

/// Why bytes are not a GPT that can be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No `EFI PART` signature where the primary header belongs.
    #[error("no GPT header (no \"EFI PART\" signature in sector 1)")]
    NoHeader,
    /// The header's CRC does not match.
    #[error("the GPT header is damaged (CRC32 {got:#010x}, the header says {want:#010x})")]
    HeaderCrc {
        /// Computed.
        got: u32,
        /// Recorded.
        want: u32,
    },
    /// The entry array's CRC does not match.
    #[error(
        "the GPT partition entries are damaged (CRC32 {got:#010x}, the header says {want:#010x})"
    )]
    EntriesCrc {
        /// Computed.
        got: u32,
        /// Recorded.
        want: u32,
    },
    /// A field has a value this reader does not take.
    #[error("unusable GPT header: {0}")]
    Header(&'static str),
    /// The entries are not within the bytes given.
    #[error("the GPT entries end at byte {end}, past the {have} bytes read")]
    Short {
        /// Where they end.
        end: u64,
        /// Bytes given.
        have: usize,
    },
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Reads the primary GPT from `head`, the first bytes of a disk whose sectors are
/// `sector_size` bytes: its header (signature, size, CRC) and entries (CRC), which must lie
/// within `head`. Unused entries are left out; names end at the first NUL.
pub fn parse(head: &[u8], sector_size: u32) -> Result<Table, ParseError> {
    let ss = sector_size as usize;
    let h = head.get(ss..ss * 2).ok_or(ParseError::NoHeader)?;
    if h.get(0..8) != Some(SIGNATURE.as_slice()) {
        return Err(ParseError::NoHeader);
    }
    let size = le32(h, 12).ok_or(ParseError::NoHeader)? as usize;
    if size < HEADER_SIZE as usize || size > ss {
        return Err(ParseError::Header("header size outside 92..sector size"));
    }
    let want = le32(h, 16).ok_or(ParseError::NoHeader)?;
    let mut copy = h.get(..size).ok_or(ParseError::NoHeader)?.to_vec();
    copy.get_mut(16..20).ok_or(ParseError::NoHeader)?.fill(0);
    let got = crc32fast::hash(&copy);
    if got != want {
        return Err(ParseError::HeaderCrc { got, want });
    }
    let field = |at| le64(h, at).ok_or(ParseError::NoHeader);
    let alt_lba = field(32)?;
    let entries_lba = field(72)?;
    let count = le32(h, 80).ok_or(ParseError::NoHeader)?;
    let entry_size = le32(h, 84).ok_or(ParseError::NoHeader)?;
    let entries_crc = le32(h, 88).ok_or(ParseError::NoHeader)?;
    if count > MAX_ENTRIES {
        return Err(ParseError::Header("more than 1024 partition entries"));
    }
    if entry_size < ENTRY_SIZE as u32 || entry_size % 8 != 0 || entry_size > 4096 {
        return Err(ParseError::Header(
            "entry size not a multiple of 8 in 128..=4096",
        ));
    }
    let start = entries_lba
        .checked_mul(u64::from(sector_size))
        .ok_or(ParseError::Header("entry array sector out of range"))?;
    let len = u64::from(count) * u64::from(entry_size);
    let end = start.saturating_add(len);
    let array = usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(s, e)| head.get(s..e))
        .ok_or(ParseError::Short {
            end,
            have: head.len(),
        })?;
    let got = crc32fast::hash(array);
    if got != entries_crc {
        return Err(ParseError::EntriesCrc {
            got,
            want: entries_crc,
        });
    }
    let mut partitions = Vec::new();
    for (i, e) in array.chunks_exact(entry_size as usize).enumerate() {
        if let Some(p) = entry(e, i) {
            partitions.push(p);
        }
    }
    Ok(Table {
        disk_guid: guid_at(h, 56).ok_or(ParseError::NoHeader)?,
        sector_size,
        disk_sectors: alt_lba.saturating_add(1),
        partitions,
    })
}

fn guid_at(b: &[u8], at: usize) -> Option<Guid> {
    Some(Guid(b.get(at..at + 16)?.try_into().ok()?))
}

fn entry(e: &[u8], index: usize) -> Option<Partition> {
    let type_guid = guid_at(e, 0)?;
    if type_guid.is_nil() {
        return None;
    }
    let units: Vec<u16> = e
        .get(56..56 + 2 * MAX_NAME_UNITS)?
        .chunks_exact(2)
        .filter_map(|c| c.try_into().ok().map(u16::from_le_bytes))
        .take_while(|&u| u != 0)
        .collect();
    Some(Partition {
        number: u32::try_from(index).ok()?.checked_add(1)?,
        type_guid,
        unique: guid_at(e, 16)?,
        first_lba: le64(e, 32)?,
        last_lba: le64(e, 40)?,
        attributes: le64(e, 48)?,
        name: String::from_utf16_lossy(&units),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Table {
        Table {
            disk_guid: Guid::from_hash([7; 16]),
            sector_size: 512,
            disk_sectors: 8192,
            partitions: vec![
                Partition {
                    number: 1,
                    type_guid: Guid::ESP,
                    unique: Guid::from_hash([1; 16]),
                    first_lba: 2048,
                    last_lba: 4095,
                    attributes: 0,
                    name: "esp".into(),
                },
                Partition {
                    number: 2,
                    type_guid: Guid::ROOT_X86_64,
                    unique: Guid::from_hash([2; 16]),
                    first_lba: 4096,
                    last_lba: 8158,
                    attributes: 1 << 60,
                    name: "root — ünïcode".into(),
                },
            ],
        }
    }

    #[test]
    fn guids_print_and_parse_in_the_usual_form() {
        assert_eq!(
            Guid::ESP.to_string(),
            "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
        );
        assert_eq!(
            Guid::ESP.disk_bytes()[..4],
            [0x28, 0x73, 0x2A, 0xC1],
            "first field little-endian on disk"
        );
        let g: Guid = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
            .parse()
            .expect("parse");
        assert_eq!(g, Guid::ROOT_X86_64);
        for bad in [
            "",
            "4f68bce3e8cd4db196e7fbcaf984b709",
            "4f68bce3-e8cd-4db1-96e7-fbcaf984b70g",
        ] {
            assert!(bad.parse::<Guid>().is_err(), "{bad}");
        }
        let h = Guid::from_hash([0xFF; 16]).to_string();
        assert_eq!(&h[14..15], "4", "version 4: {h}");
        assert!(matches!(&h[19..20], "8" | "9" | "a" | "b"), "variant: {h}");
    }

    #[test]
    fn a_written_table_reads_back() {
        let t = table();
        let (head, tail) = t.write().expect("write");
        assert_eq!(head.len(), 34 * 512);
        assert_eq!(tail.len(), 33 * 512);
        assert_eq!(&head[510..512], &[0x55, 0xAA]);
        assert_eq!(head[446 + 4], 0xEE);
        let back = parse(&head, 512).expect("parse");
        assert_eq!(back, t);
        // The backup header names the primary and its own entries.
        let backup = &tail[32 * 512..];
        assert_eq!(&backup[..8], b"EFI PART");
        assert_eq!(le64(backup, 24), Some(8191));
        assert_eq!(le64(backup, 32), Some(1));
        assert_eq!(le64(backup, 72), Some(8191 - 32));
    }

    #[test]
    fn damage_is_named() {
        let (head, _) = table().write().expect("write");
        let mut h = head.clone();
        h[512 + 40] ^= 1;
        assert!(matches!(parse(&h, 512), Err(ParseError::HeaderCrc { .. })));
        let mut e = head.clone();
        e[1024 + 60] ^= 1;
        assert!(matches!(parse(&e, 512), Err(ParseError::EntriesCrc { .. })));
        let short = parse(&head[..4096], 512).expect_err("short");
        assert!(
            short.to_string().contains("past the 4096 bytes read"),
            "{short}"
        );
        assert_eq!(parse(&[0u8; 1024], 512), Err(ParseError::NoHeader));
        assert_eq!(parse(&[], 512), Err(ParseError::NoHeader));
    }

    #[test]
    fn bad_tables_are_not_written() {
        let mut t = table();
        t.partitions[1].first_lba = 4000;
        assert!(matches!(t.write(), Err(WriteError::Placement { .. })));
        let mut t = table();
        t.partitions[1].last_lba = 8191;
        assert!(matches!(t.write(), Err(WriteError::Placement { .. })));
        let mut t = table();
        t.partitions[0].name = "x".repeat(37);
        assert!(matches!(t.write(), Err(WriteError::Name(_))));
        let mut t = table();
        t.sector_size = 1024;
        assert!(matches!(t.write(), Err(WriteError::SectorSize(1024))));
    }

    #[test]
    fn garbage_never_panics() {
        let (head, _) = table().write().expect("write");
        let mut x: u32 = 0x1234_5678;
        for _ in 0..2000 {
            let mut h = head.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let at = (x as usize) % h.len();
                h[at] = (x >> 8) as u8;
            }
            let _ = parse(&h, 512);
            let _ = parse(&h[..(x as usize) % h.len()], 512);
            let _ = parse(&h, 4096);
        }
    }
}
