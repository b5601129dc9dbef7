//! Bundles as the host serves them: the exact bytes, their digest and compression, read from a
//! tarball or a directory tarred deterministically, and the signature of a signed bundle (the
//! `<bundle>.sig` sidecar `bootlace-image bundle --sign` writes).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bootlace_contract::compression::Compression;
use bootlace_contract::protocol::BundleHeader;

/// A bundle ready to serve: the exact bytes, their digest and compression.
#[derive(Debug, Clone)]
pub struct BundleSource {
    /// The bytes.
    pub bytes: Arc<Vec<u8>>,
    /// sha256, hex.
    pub sha256: String,
    /// How the bytes are compressed (sniffed from their magic number).
    pub compression: Compression,
    /// `ed25519:<base64>`: a signature of the digest, sent as the header's `SIGNATURE`.
    pub signature: Option<String>,
}

/// The sidecar that holds a bundle's signature: `<bundle>.sig` (one line `ed25519:<base64>`).
pub fn signature_path(bundle: &Path) -> PathBuf {
    let mut p = bundle.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

/// Largest signature sidecar read: a signature is 96 bytes; a bigger file is not one.
const MAX_SIDECAR: u64 = 4096;

/// Why a bundle could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum BundleSourceError {
    /// Reading failed.
    #[error("read {}", path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The signature sidecar is not one line `ed25519:<base64 of 64 bytes>`.
    #[error("signature file {}", path.display())]
    Signature {
        /// The sidecar.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: SidecarError,
    },
}

/// What is wrong with a signature sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Bigger than any signature.
    #[error("is {0} bytes: not a signature (one line ed25519:<base64>)")]
    TooLarge(u64),
    /// Not UTF-8.
    #[error("is not text: not a signature (one line ed25519:<base64>)")]
    NotText,
    /// Not a signature.
    #[error(transparent)]
    Format(#[from] bootlace_contract::signature::FormatError),
}

impl BundleSource {
    /// Bytes as they are; the compression is sniffed from the magic number.
    pub fn from_bytes(bytes: Vec<u8>) -> BundleSource {
        BundleSource {
            sha256: bootlace_contract::digest::of_bytes(&bytes).hex().to_owned(),
            compression: bootlace_contract::compression::sniff(&bytes),
            bytes: Arc::new(bytes),
            signature: None,
        }
    }

    /// These bytes served with `signature` (`ed25519:<base64>`, checked for form).
    pub fn with_signature(
        mut self,
        signature: &str,
    ) -> Result<BundleSource, bootlace_contract::signature::FormatError> {
        let sig: bootlace_contract::signature::Signature = signature.trim().parse()?;
        self.signature = Some(sig.to_string());
        Ok(self)
    }

    /// `<N> bytes, <compression>, sha256:<hex>[, signed]`: what a person needs to pin it.
    pub fn summary(&self) -> String {
        format!(
            "{} bytes, {}, sha256:{}{}",
            self.bytes.len(),
            self.compression,
            self.sha256,
            if self.signature.is_some() {
                ", signed"
            } else {
                ""
            }
        )
    }

    /// A prebuilt tarball (tar, tar.gz, tar.zst), or a directory tarred deterministically
    /// (sorted entries, mtime 0, root owner; see [`tar_dir`]). A tarball's signature is read
    /// from its sidecar `<path>.sig` when there is one ([`signature_path`]); a sidecar that is
    /// there but not a signature is an error naming it.
    pub fn from_path(path: &Path) -> Result<BundleSource, BundleSourceError> {
        let err = |source| BundleSourceError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(err)?;
        let bytes = if meta.is_dir() {
            tar_dir(path, 0).map_err(err)?
        } else {
            std::fs::read(path).map_err(err)?
        };
        let source = BundleSource::from_bytes(bytes);
        if meta.is_dir() {
            return Ok(source);
        }
        match read_sidecar(&signature_path(path))? {
            Some(sig) => Ok(BundleSource {
                signature: Some(sig),
                ..source
            }),
            None => Ok(source),
        }
    }
}

/// The signature in a sidecar, `None` when there is no sidecar.
fn read_sidecar(path: &Path) -> Result<Option<String>, BundleSourceError> {
    use std::io::Read as _;
    let read_err = |source| BundleSourceError::Read {
        path: path.to_owned(),
        source,
    };
    let bad = |source| BundleSourceError::Signature {
        path: path.to_owned(),
        source,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut raw = Vec::new();
    file.take(MAX_SIDECAR + 1)
        .read_to_end(&mut raw)
        .map_err(read_err)?;
    if raw.len() as u64 > MAX_SIDECAR {
        return Err(bad(SidecarError::TooLarge(raw.len() as u64)));
    }
    let text = String::from_utf8(raw).map_err(|_| bad(SidecarError::NotText))?;
    let sig: bootlace_contract::signature::Signature = text
        .strip_suffix('\n')
        .unwrap_or(&text)
        .parse()
        .map_err(|e| bad(SidecarError::Format(e)))?;
    Ok(Some(sig.to_string()))
}

/// A deterministic uncompressed tar of a directory: entries sorted by path, mtime `mtime`,
/// uid/gid 0, modes kept, symlinks kept as links.
pub fn tar_dir(dir: &Path, mtime: u64) -> io::Result<Vec<u8>> {
    fn walk(dir: &Path, rel: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let full = e.path();
            let r = rel.join(e.file_name());
            let is_dir = e.file_type()?.is_dir();
            out.push((full.clone(), r.clone()));
            if is_dir {
                walk(&full, &r, out)?;
            }
        }
        Ok(())
    }
    let mut list = Vec::new();
    walk(dir, Path::new(""), &mut list)?;
    let mut b = tar::Builder::new(Vec::new());
    b.mode(tar::HeaderMode::Deterministic);
    b.follow_symlinks(false);
    for (full, rel) in list {
        let meta = std::fs::symlink_metadata(&full)?;
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Deterministic);
        h.set_mtime(mtime);
        h.set_uid(0);
        h.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&full)?;
            b.append_link(&mut h, &rel, target)?;
        } else if meta.is_dir() {
            h.set_size(0);
            b.append_data(&mut h, &rel, io::empty())?;
        } else if meta.is_file() {
            b.append_data(&mut h, &rel, std::fs::File::open(&full)?)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: only files, directories and symlinks go in a bundle",
                    full.display()
                ),
            ));
        }
    }
    b.into_inner()
}

impl BundleSource {
    /// The header announcing these bytes (`size`: what to announce, the true size unless a
    /// fault says otherwise).
    pub fn header(&self, size: u64) -> BundleHeader {
        BundleHeader {
            size,
            sha256: self.sha256.clone(),
            compression: self.compression.to_string(),
            signature: self.signature.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_sidecar_is_read_checked_and_sent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bundle = dir.path().join("b.tar");
        std::fs::write(&bundle, b"not really a tarball").expect("write");
        let plain = BundleSource::from_path(&bundle).expect("plain");
        assert_eq!(plain.signature, None);
        assert_eq!(plain.header(20).to_frame(1).get("SIGNATURE"), None);

        let sig = format!("ed25519:{}==", "A".repeat(86));
        std::fs::write(signature_path(&bundle), format!("{sig}\n")).expect("sidecar");
        let signed = BundleSource::from_path(&bundle).expect("signed");
        assert_eq!(signed.signature.as_deref(), Some(sig.as_str()));
        assert_eq!(signed.sha256, plain.sha256);
        assert!(signed.summary().ends_with(", signed"));
        let f = signed.header(20).to_frame(1);
        assert_eq!(f.get("SIGNATURE"), Some(sig.as_str()));

        for (content, want) in [
            (
                b"ed25519:AAAA\n".to_vec(),
                "must be ed25519:<base64 of 64 bytes>",
            ),
            (
                format!("{sig}\n{sig}\n").into_bytes(),
                "must be ed25519:<base64 of 64 bytes>",
            ),
            (b"\xff\xfe".to_vec(), "is not text"),
            (vec![b'a'; 5000], "is 4097 bytes"),
            (Vec::new(), "must start with"),
        ] {
            std::fs::write(signature_path(&bundle), &content).expect("sidecar");
            let e = BundleSource::from_path(&bundle).expect_err(want);
            let text = bootlace_contract::chain(&e);
            assert!(
                text.starts_with(&format!(
                    "signature file {}/b.tar.sig: ",
                    dir.path().display()
                )) && text.contains(want),
                "{text}"
            );
        }
    }
}
