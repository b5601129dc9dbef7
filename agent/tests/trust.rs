//! The guest decides whether it trusts a bundle on the host's `BUNDLE` header, before a byte of
//! the bundle reaches its sink: a signed bundle against the image's keys, an out-of-band
//! digest, trust in the host, over a real hybrid-vsock Unix socket and a real host agent.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bootlace_agent::client::{Client, ClientError, Connector, Retry};
use bootlace_agent::host::{hybrid_path, BundleSource, Host};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::signature::{PublicKey, SigningKey};
use bootlace_contract::trust::{Channel, OutOfBand, Policy, TrustError, Trusted};

fn serve(dir: &Path, bundle: BundleSource) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let host = Arc::new(Host::new(Some(bundle), |_| {}));
    let path = hybrid_path(&dir.join("vm.vsock"), 1024);
    host.serve_unix(&path).expect("listen");
    path
}

fn client(path: PathBuf) -> Client {
    let connect: Connector = Box::new(move |_left| {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_millis(2000)))?;
        Ok(Box::new(s) as Box<dyn bootlace_agent::client::Stream>)
    });
    let retry = Retry {
        give_up_after: Duration::from_secs(2),
        ..Retry::default()
    };
    Client::connect(connect, &[("BOOT_ID", "b".to_owned())], retry).expect("connect")
}

fn bundle_bytes() -> Vec<u8> {
    (0..100_000u32).map(|i| (i % 253) as u8).collect()
}

fn digest_of(bytes: &[u8]) -> Sha256Digest {
    bootlace_contract::digest::of_bytes(bytes)
}

/// Fetches with `policy`; returns the outcome and what reached the sink.
fn fetch(path: &Path, policy: &Policy<'_>) -> (Result<Option<Trusted>, ClientError>, Vec<u8>) {
    let mut c = client(path.to_owned());
    let mut sink = Vec::new();
    let r = c
        .fetch_trusted_bundle(&mut sink, 1 << 20, policy)
        .map(|r| r.trusted);
    (r, sink)
}

#[test]
fn signed_bundles_are_checked_on_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = bundle_bytes();
    let d = digest_of(&bytes);
    let signer = SigningKey::from_seed([5; 32]);
    let stranger = SigningKey::from_seed([6; 32]);
    let old = SigningKey::from_seed([7; 32]);
    let signed = BundleSource::from_bytes(bytes.clone())
        .with_signature(&signer.sign(&d).to_string())
        .expect("signature");
    let path = serve(&dir.path().join("a"), signed);

    // Rotation: the old and the new key are both trusted; the new one signed.
    let keys: Vec<PublicKey> = vec![old.public(), signer.public()];
    let policy = Policy {
        pinned: None,
        out_of_band: None,
        keys: &keys,
        trust_host: false,
    };
    let (r, sink) = fetch(&path, &policy);
    assert_eq!(
        r.expect("trusted"),
        Some(Trusted::Signed {
            digest: d.clone(),
            key: signer.public()
        })
    );
    assert_eq!(sink, bytes);

    // Only keys that did not sign: refused, and not a byte stored.
    let keys = vec![stranger.public(), old.public()];
    let policy = Policy {
        keys: &keys,
        ..policy
    };
    let (r, sink) = fetch(&path, &policy);
    match r {
        Err(ClientError::Untrusted(TrustError::UnknownKey { keys: k, .. })) => assert_eq!(k, keys),
        other => panic!("{other:?}"),
    }
    assert!(sink.is_empty(), "{} bytes stored", sink.len());

    // An unsigned bundle to an image with keys: refused; with trust_host and no keys: taken.
    let path = serve(
        &dir.path().join("b"),
        BundleSource::from_bytes(bytes.clone()),
    );
    let (r, sink) = fetch(&path, &policy);
    assert!(
        matches!(
            r,
            Err(ClientError::Untrusted(TrustError::Unsigned { keys: 2 }))
        ),
        "{r:?}"
    );
    assert!(sink.is_empty());
    let host_policy = Policy {
        keys: &[],
        trust_host: true,
        ..policy
    };
    let (r, sink) = fetch(&path, &host_policy);
    assert_eq!(r.expect("trusted"), Some(Trusted::Host(d.clone())));
    assert_eq!(sink, bytes);
}

#[test]
fn an_out_of_band_digest_decides_before_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = bundle_bytes();
    let d = digest_of(&bytes);
    let path = serve(dir.path(), BundleSource::from_bytes(bytes.clone()));
    let keys = vec![SigningKey::from_seed([5; 32]).public()];
    let good = OutOfBand {
        digest: d.clone(),
        channel: Channel::FwCfg,
    };
    let policy = Policy {
        pinned: None,
        out_of_band: Some(&good),
        keys: &keys,
        trust_host: false,
    };
    let (r, sink) = fetch(&path, &policy);
    assert_eq!(r.expect("trusted"), Some(Trusted::OutOfBand(good.clone())));
    assert_eq!(sink, bytes);

    let wrong = OutOfBand {
        digest: digest_of(b"other bytes"),
        channel: Channel::Smbios,
    };
    let policy = Policy {
        out_of_band: Some(&wrong),
        ..policy
    };
    let (r, sink) = fetch(&path, &policy);
    let e = r.expect_err("mismatch");
    assert!(
        bootlace_contract::chain(&e).contains(&format!(
            "bundle digest mismatch: the host announces {d}, the out-of-band digest (SMBIOS \
             type 11 io.bootlace.digest) is {}",
            wrong.digest
        )),
        "{e:?}"
    );
    assert!(sink.is_empty());
}
