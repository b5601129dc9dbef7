//! A per-VM bundle digest given out of band by the VMM, read from sysfs:
//!
//! - SMBIOS type 11 (OEM strings) entries, `/sys/firmware/dmi/entries/11-*/raw`
//!   (`CONFIG_DMI_SYSFS`), holding a string `io.bootlace.digest=sha256:<hex>` (QEMU:
//!   `-smbios type=11,value=io.bootlace.digest=sha256:…`);
//! - the QEMU fw_cfg file `opt/io.bootlace/digest`,
//!   `/sys/firmware/qemu_fw_cfg/by_name/opt/io.bootlace/digest/raw` (the `qemu_fw_cfg`
//!   module, which the caller loads first; QEMU: `-fw_cfg name=opt/io.bootlace/digest,string=…`).
//!
//! Both are firmware tables the guest cannot be handed by the host agent or over vsock: only
//! whoever configures the VM sets them. Every structure is parsed with bounds checks; a
//! malformed digest, or two channels that disagree, is an error (never silently skipped: the
//! digest is what the bundle is trusted by).

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::trust::{Channel, OutOfBand, FW_CFG_DIGEST_NAME, SMBIOS_DIGEST_KEY};

/// The SMBIOS structure type of OEM strings.
pub const SMBIOS_OEM_STRINGS: u8 = 11;

/// Where the kernel shows the SMBIOS structures, one directory per structure (`<type>-<n>`).
pub const DMI_ENTRIES: &str = "/sys/firmware/dmi/entries";

/// Where the kernel shows QEMU's fw_cfg files by name.
pub const FW_CFG_BY_NAME: &str = "/sys/firmware/qemu_fw_cfg/by_name";

/// The most bytes read of one SMBIOS structure or fw_cfg file (an SMBIOS structure's
/// formatted area is at most 255 bytes; its strings are short).
const MAX_READ: u64 = 64 * 1024;

/// Why the out-of-band digest could not be had. The guest refuses its vsock bundle then.
#[derive(Debug, thiserror::Error)]
pub enum OobError {
    /// A file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An SMBIOS type 11 structure is not one.
    #[error("{}: {why}", path.display())]
    Smbios {
        /// Its `raw` file.
        path: PathBuf,
        /// What is wrong.
        why: SmbiosError,
    },
    /// The digest given is not `sha256:<64 hex digits>`.
    #[error("{}: {what} {value:?} is not sha256:<64 hex digits>", path.display())]
    BadDigest {
        /// The file it is in.
        path: PathBuf,
        /// Which channel's value.
        what: &'static str,
        /// The value (at most 100 characters of it).
        value: String,
    },
    /// Two out-of-band digests that differ.
    #[error(
        "the out-of-band digests disagree: {first} ({first_from}) and {second} ({second_from})"
    )]
    Disagree {
        /// One digest.
        first: Sha256Digest,
        /// Where it came from.
        first_from: String,
        /// The other.
        second: Sha256Digest,
        /// Where it came from.
        second_from: String,
    },
}

/// What is wrong with an SMBIOS structure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmbiosError {
    /// Shorter than its 4-byte header.
    #[error("{0} bytes: shorter than an SMBIOS structure header")]
    Short(usize),
    /// Not type 11.
    #[error("type {0}, not {SMBIOS_OEM_STRINGS} (OEM strings)")]
    Type(u8),
    /// The formatted area's length is below 5 (header and count) or past the data.
    #[error("formatted length {length} does not fit (at least 5, at most the {len} bytes read)")]
    Length {
        /// The length byte.
        length: u8,
        /// The bytes there are.
        len: usize,
    },
}

/// The strings of an SMBIOS type 11 structure: a 4-byte header (type, length, handle), the
/// count byte, then the string set: NUL-terminated strings, ended by an empty one (a double
/// NUL). At most `count` strings are taken; a string not terminated within the data (a
/// truncated structure) is dropped; strings that are not UTF-8 are skipped.
pub fn oem_strings(data: &[u8]) -> Result<Vec<String>, SmbiosError> {
    let (&kind, rest) = data.split_first().ok_or(SmbiosError::Short(0))?;
    if data.len() < 4 {
        return Err(SmbiosError::Short(data.len()));
    }
    if kind != SMBIOS_OEM_STRINGS {
        return Err(SmbiosError::Type(kind));
    }
    let length = rest.first().copied().unwrap_or(0);
    let bad_length = SmbiosError::Length {
        length,
        len: data.len(),
    };
    if length < 5 {
        return Err(bad_length);
    }
    let count = data.get(4).copied().ok_or(bad_length.clone())?;
    let strings = data.get(usize::from(length)..).ok_or(bad_length)?;
    let mut out = Vec::new();
    let mut parts = strings.split(|b| *b == 0);
    // The last piece has no terminator: it is dropped (a whole set ends in NUL).
    let mut pending = parts.next();
    for (taken, next) in parts.enumerate() {
        let Some(s) = pending.take() else { break };
        if s.is_empty() || taken == usize::from(count) {
            break;
        }
        if let Ok(s) = std::str::from_utf8(s) {
            out.push(s.to_owned());
        }
        pending = Some(next);
    }
    Ok(out)
}

/// A digest from a channel's text: `sha256:<hex>`, surrounding white space and NULs ignored.
fn parse_digest(text: &str, path: &Path, what: &'static str) -> Result<Sha256Digest, OobError> {
    let t = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    t.parse().map_err(|_| OobError::BadDigest {
        path: path.to_owned(),
        what,
        value: t.chars().take(100).collect(),
    })
}

/// Reads at most [`MAX_READ`] bytes of `path`; `None` when it does not exist.
fn read_capped(path: &Path) -> Result<Option<Vec<u8>>, OobError> {
    let err = |source| OobError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut out = Vec::new();
    file.take(MAX_READ).read_to_end(&mut out).map_err(err)?;
    Ok(Some(out))
}

/// The digests in the SMBIOS type 11 structures under `entries` (a `DMI_ENTRIES` directory),
/// each with the file it came from.
pub fn smbios_digests(entries: &Path) -> Result<Vec<(Sha256Digest, PathBuf)>, OobError> {
    let dir = match std::fs::read_dir(entries) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(OobError::Read {
                path: entries.to_owned(),
                source,
            })
        }
    };
    let mut raws: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("11-"))
        .map(|e| e.path().join("raw"))
        .collect();
    raws.sort();
    let prefix = format!("{SMBIOS_DIGEST_KEY}=");
    let mut out = Vec::new();
    for raw in raws {
        let Some(data) = read_capped(&raw)? else {
            continue;
        };
        let strings = oem_strings(&data).map_err(|why| OobError::Smbios {
            path: raw.clone(),
            why,
        })?;
        for value in strings.iter().filter_map(|s| s.strip_prefix(&prefix)) {
            out.push((parse_digest(value, &raw, SMBIOS_DIGEST_KEY)?, raw.clone()));
        }
    }
    Ok(out)
}

/// The digest in the fw_cfg file `opt/io.bootlace/digest` under `by_name` (a
/// `FW_CFG_BY_NAME` directory), if there is one.
pub fn fw_cfg_digest(by_name: &Path) -> Result<Option<(Sha256Digest, PathBuf)>, OobError> {
    let raw = by_name.join(FW_CFG_DIGEST_NAME).join("raw");
    let Some(data) = read_capped(&raw)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&data);
    Ok(Some((parse_digest(&text, &raw, FW_CFG_DIGEST_NAME)?, raw)))
}

/// The one out-of-band digest of this VM, from SMBIOS and fw_cfg together: `None` when neither
/// gives one; an error when one is malformed or two differ.
pub fn read(dmi_entries: &Path, fw_cfg_by_name: &Path) -> Result<Option<OutOfBand>, OobError> {
    let smbios = smbios_digests(dmi_entries)?;
    let fw_cfg = fw_cfg_digest(fw_cfg_by_name)?;
    let mut all = smbios.clone();
    all.extend(fw_cfg.clone());
    let Some((first, first_from)) = all.first() else {
        return Ok(None);
    };
    if let Some((second, second_from)) = all.iter().find(|(d, _)| d != first) {
        return Err(OobError::Disagree {
            first: first.clone(),
            first_from: first_from.display().to_string(),
            second: second.clone(),
            second_from: second_from.display().to_string(),
        });
    }
    let channel = match (smbios.is_empty(), fw_cfg.is_some()) {
        (false, true) => Channel::Both,
        (false, false) => Channel::Smbios,
        _ => Channel::FwCfg,
    };
    Ok(Some(OutOfBand {
        digest: first.clone(),
        channel,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SMBIOS type 11 structure holding `strings`.
    fn structure(strings: &[&str]) -> Vec<u8> {
        let mut v = vec![11, 5, 0x2a, 0x00, strings.len() as u8];
        for s in strings {
            v.extend_from_slice(s.as_bytes());
            v.push(0);
        }
        if strings.is_empty() {
            v.push(0);
        }
        v.push(0);
        v
    }

    #[test]
    fn oem_strings_of_good_and_hostile_structures() {
        let good = structure(&["io.bootlace.digest=sha256:ab", "other=1"]);
        assert_eq!(
            oem_strings(&good).expect("good"),
            ["io.bootlace.digest=sha256:ab", "other=1"]
        );
        assert!(oem_strings(&structure(&[])).expect("empty").is_empty());
        // A longer formatted area (a newer SMBIOS) is skipped over by its length.
        let mut longer = vec![11, 8, 0, 0, 1, 0xff, 0xff, 0xff];
        longer.extend_from_slice(b"x=1\0\0");
        assert_eq!(oem_strings(&longer).expect("longer"), ["x=1"]);

        let cases: &[(&[u8], SmbiosError)] = &[
            (b"", SmbiosError::Short(0)),
            (&[11, 5, 0], SmbiosError::Short(3)),
            (&[1, 5, 0, 0, 1, 0, 0], SmbiosError::Type(1)),
            (
                &[11, 4, 0, 0, 1, b'a', 0, 0],
                SmbiosError::Length { length: 4, len: 8 },
            ),
            (&[11, 0, 0, 0], SmbiosError::Length { length: 0, len: 4 }),
            (&[11, 5, 0, 0], SmbiosError::Length { length: 5, len: 4 }),
            (
                &[11, 200, 0, 0, 1, b'a', 0, 0],
                SmbiosError::Length {
                    length: 200,
                    len: 8,
                },
            ),
        ];
        for (data, want) in cases {
            assert_eq!(oem_strings(data).as_ref(), Err(want), "{data:?}");
        }
        // Truncated: the unterminated last string is dropped, the rest kept; nothing panics.
        let mut cut = structure(&["a=1", "io.bootlace.digest=sha256:abcdef"]);
        cut.truncate(cut.len() - 10);
        assert_eq!(oem_strings(&cut).expect("cut"), ["a=1"]);
        // No string set at all, and a set without its final NUL.
        assert!(oem_strings(&[11, 5, 0, 0, 3]).expect("none").is_empty());
        assert_eq!(
            oem_strings(&[11, 5, 0, 0, 2, b'a', 0, b'b', 0]).expect("x"),
            ["a", "b"]
        );
        // The count bounds what is taken, whatever follows; bad UTF-8 is skipped.
        assert_eq!(
            oem_strings(&[11, 5, 0, 0, 1, b'a', 0, b'b', 0, 0]).expect("count"),
            ["a"]
        );
        assert_eq!(
            oem_strings(&[11, 5, 0, 0, 2, 0xff, 0, b'b', 0, 0]).expect("utf8"),
            ["b"]
        );
        // Every prefix and every byte flipped of a good structure: an answer, never a panic.
        for n in 0..good.len() {
            let _ = oem_strings(&good[..n]);
            for bit in 0..8 {
                let mut bent = good.clone();
                bent[n] ^= 1 << bit;
                let _ = oem_strings(&bent);
            }
        }
    }

    fn digest(fill: char) -> String {
        format!("sha256:{}", fill.to_string().repeat(64))
    }

    /// A sysfs-like tree: SMBIOS entries (each a list of strings) and a fw_cfg value.
    fn tree(dir: &Path, smbios: &[Vec<String>], fw_cfg: Option<&str>) -> (PathBuf, PathBuf) {
        let entries = dir.join("dmi/entries");
        std::fs::create_dir_all(entries.join("1-0")).expect("mkdir");
        std::fs::write(entries.join("1-0/raw"), [1u8, 4, 0, 0]).expect("type 1");
        for (i, strings) in smbios.iter().enumerate() {
            let e = entries.join(format!("11-{i}"));
            std::fs::create_dir_all(&e).expect("mkdir");
            let strings: Vec<&str> = strings.iter().map(String::as_str).collect();
            std::fs::write(e.join("raw"), structure(&strings)).expect("raw");
        }
        let by_name = dir.join("fw_cfg/by_name");
        if let Some(v) = fw_cfg {
            let f = by_name.join(FW_CFG_DIGEST_NAME);
            std::fs::create_dir_all(&f).expect("mkdir");
            std::fs::write(f.join("raw"), v).expect("raw");
        }
        (entries, by_name)
    }

    #[test]
    fn the_out_of_band_digest_from_either_channel_or_both() {
        let a = digest('a');
        let b = digest('b');
        let key = |d: &str| format!("io.bootlace.digest={d}");
        let ka = key(&a);
        let kb = key(&b);
        let o = |v: &[&[&String]]| -> Vec<Vec<String>> {
            v.iter()
                .map(|e| e.iter().map(|s| (*s).clone()).collect())
                .collect()
        };
        let x1 = "x=1".to_owned();
        let other = "other=1".to_owned();
        let md5 = "io.bootlace.digest=md5:00".to_owned();
        let upper = format!("{}\n", a.to_uppercase().replace("SHA256", "sha256"));
        type Case = (
            Vec<Vec<String>>,
            Option<String>,
            Result<Option<(String, Channel)>, &'static str>,
        );
        let cases: Vec<Case> = vec![
            (o(&[]), None, Ok(None)),
            (o(&[&[&other]]), None, Ok(None)),
            (o(&[&[&x1, &ka]]), None, Ok(Some((a.clone(), Channel::Smbios)))),
            (o(&[]), Some(a.clone()), Ok(Some((a.clone(), Channel::FwCfg)))),
            (o(&[]), Some(upper), Ok(Some((a.clone(), Channel::FwCfg)))),
            (o(&[&[&ka], &[&ka]]), Some(a.clone()), Ok(Some((a.clone(), Channel::Both)))),
            (o(&[&[&ka]]), Some(b.clone()), Err("the out-of-band digests disagree")),
            (o(&[&[&ka], &[&kb]]), None, Err("the out-of-band digests disagree")),
            (o(&[&[&ka, &kb]]), None, Err("disagree")),
            (o(&[&[&md5]]), None, Err("11-0/raw: io.bootlace.digest \"md5:00\" is not sha256:<64 hex digits>")),
            (o(&[]), Some("sha256:xyz".to_owned()), Err("opt/io.bootlace/digest/raw: opt/io.bootlace/digest \"sha256:xyz\" is not sha256")),
        ];
        for (i, (smbios, fw_cfg, want)) in cases.into_iter().enumerate() {
            let dir = tempfile::tempdir().expect("tempdir");
            let (entries, by_name) = tree(dir.path(), &smbios, fw_cfg.as_deref());
            let got = read(&entries, &by_name);
            match (want, got) {
                (Ok(want), Ok(got)) => assert_eq!(
                    got.map(|o| (o.digest.to_string(), o.channel)),
                    want,
                    "case {i}"
                ),
                (Err(want), Err(e)) => {
                    assert!(e.to_string().contains(want), "case {i}: {e}")
                }
                (want, got) => panic!("case {i}: want {want:?}, got {got:?}"),
            }
        }
        // A hostile SMBIOS structure is an error naming its file, not a panic.
        let dir = tempfile::tempdir().expect("tempdir");
        let (entries, by_name) = tree(dir.path(), &[], None);
        std::fs::create_dir_all(entries.join("11-7")).expect("mkdir");
        std::fs::write(entries.join("11-7/raw"), [11u8, 250, 0, 0, 9]).expect("raw");
        let e = read(&entries, &by_name).expect_err("hostile").to_string();
        assert!(e.contains("11-7/raw: formatted length 250"), "{e}");
        // Neither directory there (no DMI in sysfs, no fw_cfg module): no digest.
        let none = read(&dir.path().join("absent"), &dir.path().join("absent2"));
        assert!(matches!(none, Ok(None)));
    }
}
