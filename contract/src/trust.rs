//! Whether a guest may use the bundle the host announces over vsock: the one rule, decided on
//! the `BUNDLE` header before a byte of the bundle is stored (`docs/security.md`, "Trusting a
//! vsock bundle").
//!
//! The rule, first match wins:
//!
//! 1. **A pinned digest** (`[host] digest` in the image, or `bootlace.digest=` on the kernel
//!    command line) alone decides: the bundle must be exactly those bytes. Nothing else
//!    (an out-of-band digest, a signature, `trust_host`) is looked at.
//! 2. Else **an out-of-band digest** (SMBIOS type 11 `io.bootlace.digest=sha256:…`, QEMU
//!    fw_cfg `opt/io.bootlace/digest`), when the VMM gave one, decides: the bundle must be
//!    exactly those bytes; a mismatch is refused, whatever the bundle's signature says.
//! 3. Else, when the image has **trusted keys** (`[host] trust_keys`), the announced digest
//!    must carry a valid signature (`SIGNATURE`) by one of them: unsigned, malformed or signed
//!    by another key is refused. The bytes must then hash to the signed digest.
//! 4. Else, when the image says **`trust_host = true`**, the bundle is taken as the host
//!    serves it (its bytes checked only against the digest the host announces: transit, not
//!    trust).
//! 5. Else it is refused.
//!
//! The init verifies the signature, and compares the announced digest with a pinned or an
//! out-of-band one, on the header; the bytes are hashed as they arrive and checked against the
//! announced digest at the end, before anything is unpacked.

use std::fmt;

use crate::digest::Sha256Digest;
use crate::signature::{FormatError, PublicKey, Signature};

/// The SMBIOS type 11 (OEM strings) entry that carries a per-VM digest:
/// `io.bootlace.digest=sha256:<hex>` (QEMU: `-smbios type=11,value=io.bootlace.digest=…`).
pub const SMBIOS_DIGEST_KEY: &str = "io.bootlace.digest";

/// The QEMU fw_cfg file that carries a per-VM digest, `sha256:<hex>` (QEMU:
/// `-fw_cfg name=opt/io.bootlace/digest,string=sha256:…`).
pub const FW_CFG_DIGEST_NAME: &str = "opt/io.bootlace/digest";

/// Most trusted keys an image may list (each is tried in turn on a signature).
pub const MAX_TRUST_KEYS: usize = 32;

/// Where an out-of-band digest came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// An SMBIOS type 11 OEM string.
    Smbios,
    /// A QEMU fw_cfg file.
    FwCfg,
    /// Both, with the same digest.
    Both,
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Channel::Smbios => "SMBIOS type 11 io.bootlace.digest",
            Channel::FwCfg => "fw_cfg opt/io.bootlace/digest",
            Channel::Both => "SMBIOS type 11 and fw_cfg",
        })
    }
}

/// A digest the VMM gave this VM out of band.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfBand {
    /// The digest.
    pub digest: Sha256Digest,
    /// Where it came from.
    pub channel: Channel,
}

/// What the guest trusts a vsock bundle by, from its configuration and its VMM.
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// `[host] digest` or `bootlace.digest=`.
    pub pinned: Option<&'a Sha256Digest>,
    /// From SMBIOS or fw_cfg (read only when nothing is pinned).
    pub out_of_band: Option<&'a OutOfBand>,
    /// `[host] trust_keys`.
    pub keys: &'a [PublicKey],
    /// `[host] trust_host`.
    pub trust_host: bool,
}

/// Why a bundle was trusted: what its bytes must hash to is [`Trusted::digest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trusted {
    /// The pinned digest.
    Pinned(Sha256Digest),
    /// An out-of-band digest.
    OutOfBand(OutOfBand),
    /// A trusted key's signature of this digest.
    Signed {
        /// The digest signed (the one announced).
        digest: Sha256Digest,
        /// The key that signed it.
        key: PublicKey,
    },
    /// The image trusts the host; the digest is the announced one.
    Host(Sha256Digest),
}

impl Trusted {
    /// The digest the bundle's bytes must have.
    pub fn digest(&self) -> &Sha256Digest {
        match self {
            Trusted::Pinned(d) | Trusted::Host(d) => d,
            Trusted::OutOfBand(o) => &o.digest,
            Trusted::Signed { digest, .. } => digest,
        }
    }
}

impl fmt::Display for Trusted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Trusted::Pinned(d) => write!(f, "the pinned digest {d}"),
            Trusted::OutOfBand(o) => {
                write!(f, "the out-of-band digest {} ({})", o.digest, o.channel)
            }
            Trusted::Signed { digest, key } => {
                write!(f, "a signature of {digest} by {}", key.short())
            }
            Trusted::Host(d) => write!(f, "the host (trust_host = true), as announced: {d}"),
        }
    }
}

/// Why a bundle is not trusted. Nothing of it is stored or unpacked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrustError {
    /// The host announces other bytes than the pinned ones.
    #[error(
        "bundle digest mismatch: the host announces {announced}, pinned {pinned}; nothing was \
         extracted"
    )]
    Pinned {
        /// The digest in the `BUNDLE` header.
        announced: Sha256Digest,
        /// The pinned one.
        pinned: Sha256Digest,
    },
    /// The host announces other bytes than the VMM's out-of-band digest.
    #[error(
        "bundle digest mismatch: the host announces {announced}, the out-of-band digest ({}) \
         is {}; nothing was extracted", expected.channel, expected.digest
    )]
    OutOfBand {
        /// The digest in the `BUNDLE` header.
        announced: Sha256Digest,
        /// The out-of-band one.
        expected: OutOfBand,
    },
    /// Keys are trusted and the bundle is not signed.
    #[error(
        "unsigned vsock bundle: the image trusts only bundles signed by one of its {keys} \
         trusted keys, and no pinned or out-of-band digest names it"
    )]
    Unsigned {
        /// How many keys are trusted.
        keys: usize,
    },
    /// The host's `SIGNATURE` is not a signature.
    #[error("bundle SIGNATURE from the host")]
    Malformed(#[source] FormatError),
    /// No trusted key verifies the signature (another key, or another digest).
    #[error(
        "bundle signature by an unknown key: none of the {} trusted keys ({}) verifies it over {digest}",
        keys.len(), KeyList(keys)
    )]
    UnknownKey {
        /// The announced digest.
        digest: Sha256Digest,
        /// The trusted keys.
        keys: Vec<PublicKey>,
    },
    /// Nothing trusts the bundle.
    #[error(
        "no trust for the vsock bundle: no pinned digest, no out-of-band digest ({}, {}), no \
         trusted signature (no [host] trust_keys), and the image does not trust the host \
         ([host] trust_host)",
        Channel::Smbios,
        Channel::FwCfg
    )]
    NoTrust,
}

/// Keys in short form, comma-separated.
struct KeyList<'a>(&'a [PublicKey]);

impl fmt::Display for KeyList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, k) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(&k.short())?;
        }
        Ok(())
    }
}

impl Policy<'_> {
    /// Whether this policy refuses every bundle, whatever the host announces (then the guest
    /// need not even ask for one).
    pub fn refuses_all(&self) -> bool {
        self.pinned.is_none()
            && self.out_of_band.is_none()
            && self.keys.is_empty()
            && !self.trust_host
    }

    /// Decides on a `BUNDLE` header: its `announced` digest and its `SIGNATURE`, if any.
    pub fn decide(
        &self,
        announced: &Sha256Digest,
        signature: Option<&str>,
    ) -> Result<Trusted, TrustError> {
        if let Some(pinned) = self.pinned {
            if pinned != announced {
                return Err(TrustError::Pinned {
                    announced: announced.clone(),
                    pinned: pinned.clone(),
                });
            }
            return Ok(Trusted::Pinned(pinned.clone()));
        }
        if let Some(oob) = self.out_of_band {
            if &oob.digest != announced {
                return Err(TrustError::OutOfBand {
                    announced: announced.clone(),
                    expected: oob.clone(),
                });
            }
            return Ok(Trusted::OutOfBand(oob.clone()));
        }
        if !self.keys.is_empty() {
            let sig: Signature = signature
                .ok_or(TrustError::Unsigned {
                    keys: self.keys.len(),
                })?
                .parse()
                .map_err(TrustError::Malformed)?;
            return match self.keys.iter().find(|k| k.verifies(announced, &sig)) {
                Some(key) => Ok(Trusted::Signed {
                    digest: announced.clone(),
                    key: *key,
                }),
                None => Err(TrustError::UnknownKey {
                    digest: announced.clone(),
                    keys: self.keys.to_vec(),
                }),
            };
        }
        if self.trust_host {
            return Ok(Trusted::Host(announced.clone()));
        }
        Err(TrustError::NoTrust)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(fill: &str) -> Sha256Digest {
        format!("sha256:{}", fill.repeat(32))
            .parse()
            .expect("digest")
    }

    fn key(seed: u8) -> (PublicKey, ed25519_compact::KeyPair) {
        let kp = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([seed; 32]));
        (PublicKey::from_bytes(*kp.pk).expect("key"), kp)
    }

    fn sign(kp: &ed25519_compact::KeyPair, digest: &Sha256Digest) -> String {
        let sig = kp.sk.sign(crate::signature::message(digest), None);
        Signature::from_bytes(*sig).to_string()
    }

    /// Every row of the rule, in order: (pinned, out of band, keys, trust_host, announced,
    /// signature) -> what decides, or the refusal's message.
    #[test]
    fn the_decision_table() {
        let (k1, kp1) = key(1);
        let (k2, kp2) = key(2);
        let (_, kp3) = key(3);
        let (a, b) = (d("aa"), d("bb"));
        let oob = |digest: &Sha256Digest| OutOfBand {
            digest: digest.clone(),
            channel: Channel::Smbios,
        };
        let (oob_a, oob_b) = (oob(&a), oob(&b));
        let good = sign(&kp2, &a);
        let by_stranger = sign(&kp3, &a);
        let other_digest = sign(&kp1, &b);
        let keys = [k1, k2];
        let none: [PublicKey; 0] = [];
        type Row<'a> = (
            Option<&'a Sha256Digest>,
            Option<&'a OutOfBand>,
            &'a [PublicKey],
            bool,
            Option<&'a str>,
            Result<&'a str, &'a str>,
        );
        let rows: Vec<Row<'_>> = vec![
            // 1. A pin alone decides: a good signature, an out-of-band digest, trust_host are
            //    not looked at.
            (Some(&a), None, &none, false, None, Ok("pinned")),
            (Some(&a), Some(&oob_b), &keys, true, Some("junk"), Ok("pinned")),
            (Some(&b), None, &keys, true, Some(&good), Err("pinned sha256:bbbb")),
            (Some(&b), Some(&oob_a), &none, true, None, Err("bundle digest mismatch")),
            // 2. An out-of-band digest decides next; its mismatch is refused even when signed.
            (None, Some(&oob_a), &keys, false, None, Ok("out-of-band")),
            (None, Some(&oob_a), &none, false, Some("junk"), Ok("out-of-band")),
            (None, Some(&oob_b), &keys, true, Some(&good), Err("the out-of-band digest (SMBIOS type 11 io.bootlace.digest) is sha256:bbbb")),
            // 3. Keys: a valid signature by any of them, else refused.
            (None, None, &keys, false, Some(&good), Ok("signed by 2")),
            (None, None, &keys, true, Some(&good), Ok("signed by 2")),
            (None, None, &keys, true, None, Err("unsigned vsock bundle: the image trusts only bundles signed by one of its 2 trusted keys")),
            (None, None, &keys, false, Some(&by_stranger), Err("bundle signature by an unknown key: none of the 2 trusted keys (ed25519:")),
            (None, None, &keys, false, Some(&other_digest), Err("none of the 2 trusted keys")),
            (None, None, &keys, false, Some("ed25519:AAAA"), Err("bundle SIGNATURE from the host")),
            (None, None, &keys, false, Some("rsa:xyz"), Err("bundle SIGNATURE from the host")),
            // 4. trust_host.
            (None, None, &none, true, None, Ok("host")),
            (None, None, &none, true, Some(&by_stranger), Ok("host")),
            // 5. Nothing.
            (None, None, &none, false, None, Err("no trust for the vsock bundle: no pinned digest, no out-of-band digest (SMBIOS type 11 io.bootlace.digest, fw_cfg opt/io.bootlace/digest), no trusted signature")),
            (None, None, &none, false, Some(&good), Err("no trust for the vsock bundle")),
        ];
        for (i, (pinned, out_of_band, keys, trust_host, sig, want)) in rows.into_iter().enumerate()
        {
            let p = Policy {
                pinned,
                out_of_band,
                keys,
                trust_host,
            };
            let got = p.decide(&a, sig);
            match (want, &got) {
                (Ok("pinned"), Ok(Trusted::Pinned(x))) => assert_eq!(x, &a, "row {i}"),
                (Ok("out-of-band"), Ok(Trusted::OutOfBand(o))) => assert_eq!(o, &oob_a, "row {i}"),
                (Ok("signed by 2"), Ok(Trusted::Signed { digest, key })) => {
                    assert_eq!((digest, key), (&a, &k2), "row {i}")
                }
                (Ok("host"), Ok(Trusted::Host(x))) => assert_eq!(x, &a, "row {i}"),
                (Err(want), Err(e)) => {
                    let text = crate::chain(e);
                    assert!(text.contains(want), "row {i}: {text:?} lacks {want:?}");
                }
                _ => panic!("row {i}: want {want:?}, got {got:?}"),
            }
            if let Ok(t) = &got {
                assert_eq!(
                    t.digest(),
                    &a,
                    "row {i}: the bytes must hash to the announced"
                );
            }
            assert_eq!(
                p.refuses_all(),
                pinned.is_none() && out_of_band.is_none() && keys.is_empty() && !trust_host,
                "row {i}"
            );
        }
        let e = TrustError::UnknownKey {
            digest: a.clone(),
            keys: vec![k1, k2],
        }
        .to_string();
        assert!(
            e.contains(&format!("({}, {})", k1.short(), k2.short())),
            "{e}"
        );
    }
}
