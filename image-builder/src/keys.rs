//! Bundle signing keys: `bootlace-image keygen`, the private key `bundle --sign` reads, the
//! public keys `bake --trust-key` bakes, and the `<bundle>.sig` sidecar a signed bundle gets.
//! Formats (`bootlace_contract::signature`): a private key is PKCS#8 PEM, a public key SPKI PEM
//! or one line `ed25519:<base64>` — what `openssl genpkey -algorithm ed25519` and
//! `openssl pkey -pubout` write is accepted as it is.

use std::io::{self, Write as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::signature::{KeyFileError, PublicKey, Signature, SigningKey};

pub use bootlace_agent::bundle::signature_path;

/// Largest key file read (a PEM key is under 200 bytes).
const MAX_KEY_FILE: u64 = 16 * 1024;

/// Why a key could not be made, read or used. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file that would be overwritten.
    #[error("{}: exists (keygen never overwrites a key; remove it or choose another name)", .0.display())]
    Exists(PathBuf),
    /// Reading or writing a file failed.
    #[error("{what} {}", path.display())]
    Io {
        /// `read`, `write`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A key file is not a key of the kind wanted.
    #[error("{}", path.display())]
    Format {
        /// The file (or the value given on the command line).
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: KeyFileError,
    },
    /// The key file is larger than any key.
    #[error("{}: {size} bytes, not a key file (at most {MAX_KEY_FILE})", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// `KEY.pub` beside `KEY`.
pub fn public_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".pub");
    PathBuf::from(p)
}

/// Makes a new key pair: `out` (the private key, PKCS#8 PEM, mode 0600) and `out.pub` (SPKI
/// PEM). Neither may exist; on any error neither is left.
pub fn keygen(out: &Path) -> Result<PublicKey, KeyError> {
    let pub_path = public_path(out);
    for p in [out, pub_path.as_path()] {
        if p.symlink_metadata().is_ok() {
            return Err(KeyError::Exists(p.to_owned()));
        }
    }
    let key = bootlace_contract::signature::generate().map_err(|source| KeyError::Io {
        what: "read random bytes for",
        path: out.to_owned(),
        source,
    })?;
    write_new(out, key.to_pem().as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pub_path, key.public().to_pem().as_bytes(), 0o644) {
        let _ = std::fs::remove_file(out);
        return Err(e);
    }
    Ok(key.public())
}

/// Writes a new file atomically (a temporary file renamed into place, never over an existing
/// one) with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    let err = |source| KeyError::Io {
        what: "write",
        path: path.to_owned(),
        source,
    };
    let mut tmp = temp_beside(path).map_err(err)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist_noclobber(path).map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists(path.to_owned())
        } else {
            err(e.error)
        }
    })?;
    Ok(())
}

fn temp_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".bootlace-key.")
        .tempfile_in(parent)
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    use std::io::Read as _;
    let err = |source| KeyError::Io {
        what: "read",
        path: path.to_owned(),
        source,
    };
    let mut raw = Vec::new();
    std::fs::File::open(path)
        .map_err(err)?
        .take(MAX_KEY_FILE + 1)
        .read_to_end(&mut raw)
        .map_err(err)?;
    if raw.len() as u64 > MAX_KEY_FILE {
        return Err(KeyError::TooLarge {
            path: path.to_owned(),
            size: raw.len() as u64,
        });
    }
    String::from_utf8(raw).map_err(|_| KeyError::Format {
        path: path.to_owned(),
        source: KeyFileError::NotPrivateKey,
    })
}

/// Reads a private key file (PKCS#8 PEM).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = read_small(path)?;
    SigningKey::from_pem(&text).map_err(|source| KeyError::Format {
        path: path.to_owned(),
        source,
    })
}

/// A trusted key as given on the command line: `ed25519:<base64>` itself, or a file holding
/// an SPKI PEM public key or that line.
pub fn read_public_key(arg: &str) -> Result<PublicKey, KeyError> {
    if arg.starts_with(bootlace_contract::signature::PREFIX) {
        return arg.parse().map_err(|e| KeyError::Format {
            path: PathBuf::from(arg),
            source: KeyFileError::Format(e),
        });
    }
    let path = Path::new(arg);
    let text = read_small(path).map_err(|e| match e {
        KeyError::Format { path, .. } => KeyError::Format {
            path,
            source: KeyFileError::NotPublicKey,
        },
        other => other,
    })?;
    PublicKey::from_file_text(&text).map_err(|source| KeyError::Format {
        path: path.to_owned(),
        source,
    })
}

/// Writes `<bundle>.sig`: one line, `key`'s signature of `digest`, atomically.
pub fn write_signature(
    bundle: &Path,
    key: &SigningKey,
    digest: &Sha256Digest,
) -> Result<(PathBuf, Signature), KeyError> {
    let path = signature_path(bundle);
    let sig = key.sign(digest);
    let err = |source| KeyError::Io {
        what: "write",
        path: path.clone(),
        source,
    };
    let mut tmp = temp_beside(&path).map_err(err)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(err)?;
    writeln!(tmp, "{sig}").map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(&path).map_err(|e| err(e.error))?;
    Ok((path, sig))
}
