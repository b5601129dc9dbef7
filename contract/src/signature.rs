//! Signed bundles: ed25519 signatures over a bundle's sha256, the keys that make and check
//! them, and their text forms.
//!
//! **What is signed** is not the bundle but a short, domain-separated message naming its
//! digest ([`message`]):
//!
//! ```text
//! bootlace bundle signature v1\nsha256:<64 lower-case hex digits>\n
//! ```
//!
//! so a signature made for a bundle can never be taken for a signature of anything else (a
//! key used elsewhere signs other messages), and checking it needs only the digest the host
//! announces before the first byte of the bundle arrives.
//!
//! **Text forms.** A public key in `init.toml` (`[host] trust_keys`) is `ed25519:<base64 of
//! the 32 key bytes>`; a signature (the `.sig` sidecar beside a bundle, the `SIGNATURE` field
//! of a `BUNDLE` frame) is `ed25519:<base64 of the 64 signature bytes>` (standard base64 with
//! padding). With the `sign` feature (the image builder): private keys as PKCS#8 PEM and
//! public keys as SPKI PEM, the forms `openssl genpkey -algorithm ed25519` and
//! `openssl pkey -pubout` write, and signing. The init links only the verifying half.

use std::fmt;

use ct_codecs::{Base64, Decoder as _, Encoder as _};
use serde::{Deserialize, Serialize};

use crate::digest::Sha256Digest;

/// The prefix of every key and signature in text form.
pub const PREFIX: &str = "ed25519:";

/// The first line of the signed message: the domain and its version.
pub const DOMAIN: &str = "bootlace bundle signature v1";

/// The message a bundle's signature is made over: [`DOMAIN`], a newline, the digest as
/// `sha256:<hex>` and a newline.
pub fn message(digest: &Sha256Digest) -> String {
    format!("{DOMAIN}\n{digest}\n")
}

/// A key or signature in text form that is not what it should be. Each variant says which
/// value (a key, a signature) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The text does not start with `ed25519:`.
    #[error("{what} {shown:?} must start with \"ed25519:\"")]
    Prefix {
        /// `public key` or `signature`.
        what: &'static str,
        /// The start of the text as given.
        shown: String,
    },
    /// What follows the prefix is not standard base64 of the right length.
    #[error("{what} {shown:?} must be ed25519:<base64 of {bytes} bytes>")]
    Base64 {
        /// `public key` or `signature`.
        what: &'static str,
        /// The start of the text as given.
        shown: String,
        /// The bytes it must hold.
        bytes: usize,
    },
    /// The 32 bytes are not a point on the curve (no signature can ever verify with them).
    #[error("public key {shown:?} is not a valid ed25519 key")]
    NotAKey {
        /// The text as given.
        shown: String,
    },
}

/// At most this many characters of a bad value are quoted in an error.
const SHOWN: usize = 100;

fn shown(s: &str) -> String {
    s.chars().take(SHOWN).collect()
}

/// Decodes `ed25519:<base64>` into exactly `N` bytes; the base64 must be canonical (the form
/// this module writes), so that one key has one text form.
fn decode<const N: usize>(what: &'static str, s: &str) -> Result<[u8; N], FormatError> {
    let b64 = s.strip_prefix(PREFIX).ok_or_else(|| FormatError::Prefix {
        what,
        shown: shown(s),
    })?;
    let bad = || FormatError::Base64 {
        what,
        shown: shown(s),
        bytes: N,
    };
    let mut out = [0u8; N];
    // One byte more than wanted: a longer value decodes past N and is refused.
    let mut buf = vec![0u8; N + 1];
    let got = Base64::decode(&mut buf, b64.as_bytes(), None).map_err(|_| bad())?;
    if got.len() != N {
        return Err(bad());
    }
    out.copy_from_slice(got);
    if encode(&out) != b64 {
        return Err(bad());
    }
    Ok(out)
}

fn encode(bytes: &[u8]) -> String {
    // 64 bytes encode to 88 characters; room for any key or signature here.
    let mut buf = [0u8; 128];
    Base64::encode_to_str(&mut buf, bytes)
        .map(str::to_owned)
        .unwrap_or_default()
}

/// An ed25519 public key: `ed25519:<base64 of 32 bytes>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key's 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Result<PublicKey, FormatError> {
        let key = PublicKey(bytes);
        match key.inner().validate() {
            Ok(()) => Ok(key),
            Err(_) => Err(FormatError::NotAKey {
                shown: key.to_string(),
            }),
        }
    }

    /// The key's 32 bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn inner(&self) -> ed25519_compact::PublicKey {
        ed25519_compact::PublicKey::new(self.0)
    }

    /// Whether `signature` is this key's signature of `digest` (over [`message`]).
    pub fn verifies(&self, digest: &Sha256Digest, signature: &Signature) -> bool {
        let sig = ed25519_compact::Signature::new(signature.0);
        self.inner().verify(message(digest), &sig).is_ok()
    }

    /// A short form for messages: `ed25519:` and the first 12 base64 characters, then `…`.
    pub fn short(&self) -> String {
        let full = encode(&self.0);
        format!("{PREFIX}{}…", full.get(..12).unwrap_or(&full))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", encode(&self.0))
    }
}

impl TryFrom<String> for PublicKey {
    type Error = FormatError;
    fn try_from(s: String) -> Result<Self, FormatError> {
        PublicKey::from_bytes(decode("public key", &s)?)
    }
}

impl std::str::FromStr for PublicKey {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        PublicKey::try_from(s.to_owned())
    }
}

impl From<PublicKey> for String {
    fn from(k: PublicKey) -> String {
        k.to_string()
    }
}

/// An ed25519 signature: `ed25519:<base64 of 64 bytes>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signature([u8; 64]);

impl Signature {
    /// The signature's 64 bytes.
    pub fn from_bytes(bytes: [u8; 64]) -> Signature {
        Signature(bytes)
    }

    /// The signature's 64 bytes.
    pub fn bytes(&self) -> &[u8; 64] {
        &self.0
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", encode(&self.0))
    }
}

impl std::str::FromStr for Signature {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, FormatError> {
        decode("signature", s).map(Signature)
    }
}

#[cfg(feature = "sign")]
pub use signing::{generate, KeyFileError, SigningKey};

/// Key files and signing (the image builder; not in the init).
#[cfg(feature = "sign")]
mod signing {
    use super::*;

    /// A key file that cannot be used. The path is named by the caller.
    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum KeyFileError {
        /// Not a PKCS#8 PEM ed25519 private key.
        #[error(
            "not an ed25519 private key in PKCS#8 PEM (\"-----BEGIN PRIVATE KEY-----\", as \
             `bootlace-image keygen` or `openssl genpkey -algorithm ed25519` write)"
        )]
        NotPrivateKey,
        /// Neither an SPKI PEM ed25519 public key nor `ed25519:<base64>`.
        #[error(
            "not an ed25519 public key: neither SPKI PEM (\"-----BEGIN PUBLIC KEY-----\", as \
             `openssl pkey -pubout` writes) nor ed25519:<base64 of 32 bytes>"
        )]
        NotPublicKey,
        /// An `ed25519:` value that is malformed.
        #[error(transparent)]
        Format(#[from] FormatError),
    }

    /// A private key that signs bundles.
    #[derive(Clone)]
    pub struct SigningKey(ed25519_compact::KeyPair);

    impl fmt::Debug for SigningKey {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "SigningKey(public {})", self.public())
        }
    }

    impl SigningKey {
        /// Reads a PKCS#8 PEM private key (what `openssl genpkey -algorithm ed25519` writes).
        pub fn from_pem(pem: &str) -> Result<SigningKey, KeyFileError> {
            ed25519_compact::KeyPair::from_pem(pem)
                .map(SigningKey)
                .map_err(|_| KeyFileError::NotPrivateKey)
        }

        /// The key from a 32-byte seed.
        pub fn from_seed(seed: [u8; 32]) -> SigningKey {
            SigningKey(ed25519_compact::KeyPair::from_seed(
                ed25519_compact::Seed::new(seed),
            ))
        }

        /// The private key as PKCS#8 PEM.
        pub fn to_pem(&self) -> String {
            self.0.sk.to_pem()
        }

        /// Its public key.
        pub fn public(&self) -> PublicKey {
            PublicKey(*self.0.pk)
        }

        /// Signs `digest` (deterministic: the same key and digest give the same signature).
        pub fn sign(&self, digest: &Sha256Digest) -> Signature {
            Signature(*self.0.sk.sign(message(digest), None))
        }
    }

    impl PublicKey {
        /// The key as SPKI PEM (what `openssl pkey -pubout` writes).
        pub fn to_pem(&self) -> String {
            self.inner().to_pem()
        }

        /// A public key file's text: SPKI PEM, or one line `ed25519:<base64>`.
        pub fn from_file_text(text: &str) -> Result<PublicKey, KeyFileError> {
            let t = text.trim();
            if t.starts_with("-----BEGIN PUBLIC KEY-----") {
                let k = ed25519_compact::PublicKey::from_pem(t)
                    .map_err(|_| KeyFileError::NotPublicKey)?;
                return Ok(PublicKey::from_bytes(*k)?);
            }
            if t.starts_with(PREFIX) {
                return Ok(t.parse()?);
            }
            Err(KeyFileError::NotPublicKey)
        }
    }

    /// A new signing key from the operating system's random source.
    pub fn generate() -> std::io::Result<SigningKey> {
        use std::io::Read as _;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Ok(SigningKey::from_seed(seed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(fill: &str) -> Sha256Digest {
        format!("sha256:{}", fill.repeat(64 / fill.len()))
            .parse()
            .expect("digest")
    }

    /// RFC 8032, test 1: its public key (for a key whose bytes are known).
    const RFC_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn the_message_is_domain_separated() {
        assert_eq!(
            message(&digest("ab")),
            format!("bootlace bundle signature v1\nsha256:{}\n", "ab".repeat(32))
        );
    }

    #[test]
    fn key_and_signature_text_forms() {
        let bytes: [u8; 32] = unhex(RFC_PUBLIC).try_into().expect("32");
        let k = PublicKey::from_bytes(bytes).expect("valid");
        let text = k.to_string();
        assert_eq!(text, "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=");
        assert_eq!(text.parse::<PublicKey>().expect("parses"), k);
        assert!(k.short().starts_with("ed25519:11qYAYKxCrfV") && k.short().ends_with('…'));
        let sig = Signature::from_bytes([7; 64]);
        assert_eq!(sig.to_string().parse::<Signature>().expect("parses"), sig);

        let cases: &[(&str, &str)] = &[
            (
                "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
                "must start with \"ed25519:\"",
            ),
            ("ed25519:", "base64 of 32 bytes"),
            (
                "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHUR=",
                "base64 of 32 bytes",
            ),
            (
                "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURoA",
                "base64 of 32 bytes",
            ),
            (
                "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                "base64 of 32 bytes",
            ),
            (
                "ed25519:!!qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=",
                "base64 of 32 bytes",
            ),
            (
                "ed25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                "base64 of 32",
            ),
            // Not canonical: the last character carries bits that are not part of the key.
            (
                "ed25519:11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURr=",
                "base64 of 32 bytes",
            ),
        ];
        for (text, want) in cases {
            let e = text.parse::<PublicKey>().expect_err(text).to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("public key"), "{text}: {e}");
        }
        let e = format!("ed25519:{}", "A".repeat(86))
            .parse::<Signature>()
            .expect_err("short")
            .to_string();
        assert!(e.contains("signature") && e.contains("64 bytes"), "{e}");
        // A long bad value is quoted, not copied whole.
        let e = "x".repeat(10_000).parse::<Signature>().expect_err("long");
        assert!(e.to_string().len() < 300, "{e}");
    }

    #[test]
    fn a_small_order_point_is_not_a_key() {
        // The identity point: every "signature" would verify under some implementations.
        let mut id = [0u8; 32];
        id[0] = 1;
        let e = PublicKey::from_bytes(id).expect_err("weak");
        assert!(e.to_string().contains("not a valid ed25519 key"), "{e}");
    }

    /// A key pair from a seed, and its signature of `d` (what `SigningKey` does, without the
    /// `sign` feature).
    fn signed(seed: u8, d: &Sha256Digest) -> (PublicKey, Signature) {
        let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([seed; 32]));
        (PublicKey(*kp.pk), Signature(*kp.sk.sign(message(d), None)))
    }

    #[test]
    fn verify_good_wrong_key_wrong_digest_bent() {
        let d = digest("ab");
        let (key, sig) = signed(1, &d);
        let (other, _) = signed(2, &d);
        assert!(key.verifies(&d, &sig));
        assert!(!other.verifies(&d, &sig), "wrong key");
        assert!(!key.verifies(&digest("cd"), &sig), "wrong digest");
        let mut bent = *sig.bytes();
        bent[10] ^= 1;
        assert!(!key.verifies(&d, &Signature::from_bytes(bent)), "bent");
        assert!(!key.verifies(&d, &Signature::from_bytes([0; 64])), "zeros");
        // A signature of the bare digest (no domain) is not a bundle signature.
        let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([1; 32]));
        let bare = Signature(*kp.sk.sign(d.to_string(), None));
        assert!(!key.verifies(&d, &bare), "undomained");
        // Through the text forms, as the sidecar and the frame carry them.
        let text = sig.to_string();
        assert!(key.verifies(&d, &text.parse().expect("signature")));
        let key_text = key.to_string();
        assert_eq!(key_text.parse::<PublicKey>().expect("key"), key);
    }

    #[cfg(feature = "sign")]
    #[test]
    fn key_files_and_signing() {
        let key = SigningKey::from_seed([1; 32]);
        let d = digest("ab");
        assert_eq!(key.sign(&d), signed(1, &d).1);
        let pem = key.to_pem();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_eq!(
            SigningKey::from_pem(&pem).expect("pem").public(),
            key.public()
        );
        let pubpem = key.public().to_pem();
        assert_eq!(
            PublicKey::from_file_text(&pubpem).expect("spki"),
            key.public()
        );
        assert_eq!(
            PublicKey::from_file_text(&format!("{}\n", key.public())).expect("text"),
            key.public()
        );
        assert_eq!(
            PublicKey::from_file_text(&pem),
            Err(KeyFileError::NotPublicKey)
        );
        assert_eq!(
            SigningKey::from_pem(&pubpem).map(|k| k.public()),
            Err(KeyFileError::NotPrivateKey)
        );
        assert!(generate().expect("random").public() != key.public());
    }
}
