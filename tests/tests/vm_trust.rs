//! VM tests of "trust without a rebake": one baked image, no pinned digest, a trusted key
//! baked in (`[host] trust_keys`), guests served by an in-process host agent over hybrid
//! vsock (vhost-device-vsock):
//! - a bundle signed by the trusted key is applied (READY);
//! - a bundle signed by an unknown key is refused on its header (FAILED naming the key
//!   problem, nothing applied, power-off with 71);
//! - an unsigned bundle is applied when its digest comes out of band, over SMBIOS type 11 or
//!   over fw_cfg (the `qemu_fw_cfg` module the bake added);
//! - an out-of-band digest that is not the bundle's is refused, even for a signed bundle.
//!
//! The two tests each boot their own image and run side by side.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bootlace_agent::host::{hybrid_path, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, InitConfig, Source};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::protocol::{Frame, Kind};
use bootlace_contract::signature::SigningKey;
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{bake, boot_with, probe_rootfs, probe_value, scratch, tail};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{End, OobDigest, OobVia, Outcome};

const MANIFEST: &str = r#"
version = 1
hostname = "trusted-guest"

[handoff]
mode = "supervise"
command = ["/bin/sh", "-c", "/sbin/probe; exit 3"]
"#;

/// The image: the vsock source, a host, the trusted keys, nothing pinned.
fn image(dir: &Path, keys: &[&SigningKey]) -> PathBuf {
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.connect_timeout_ms = 3000;
    c.host.trust_keys = keys.iter().map(|k| k.public()).collect();
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let img = dir.join("initrd.img");
    bake(&rootfs, c, &img).expect("bake");
    img
}

/// The bundle's tarball bytes and digest.
fn bundle_tarball(dir: &Path) -> (Vec<u8>, Sha256Digest) {
    let b = dir.join("bundle");
    std::fs::create_dir_all(&b).expect("mkdir");
    std::fs::write(b.join("bootlace.toml"), MANIFEST).expect("manifest");
    let out = dir.join("bundle.tar.gz");
    let s = bundle::build(&b, BundleFormat::TarGz, "BOOTLACE", 0, &out).expect("bundle");
    let digest = format!("sha256:{}", s.sha256.expect("digest"))
        .parse()
        .expect("digest");
    (std::fs::read(&out).expect("read"), digest)
}

/// Boots `img` against a host agent serving `bundle`, with `oob` given out of band; returns
/// the outcome and what the guest reported.
fn boot(
    name: &str,
    img: &Path,
    dir: &Path,
    bundle: BundleSource,
    oob: Option<OobDigest>,
) -> (Outcome, Vec<Frame>) {
    let vdir = dir.join(name);
    std::fs::create_dir_all(&vdir).expect("mkdir");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::new(Some(bundle), move |e| {
        sink.lock().expect("lock").push(e)
    }));
    host.serve_unix(&hybrid_path(&vdir.join("vsock"), 1024))
        .expect("listen");
    let o = boot_with(name, img, &[], move |spec| {
        spec.vsock = Some(VsockSpec::new(vdir));
        spec.oob_digest = oob;
    })
    .expect("boot");
    let reports = events
        .lock()
        .expect("lock")
        .iter()
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some(f.clone()),
            _ => None,
        })
        .collect();
    (o, reports)
}

/// The bundle was applied: READY, its hostname, the application's status.
fn assert_applied(o: &Outcome, reports: &[Frame], trusted_by: &str) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(o, 40));
    assert_eq!(
        probe_value(o, "hostname").as_deref(),
        Some("trusted-guest"),
        "{}",
        tail(o, 40)
    );
    assert!(reports.iter().any(|f| f.kind == Kind::Ready), "{reports:?}");
    assert!(
        o.console
            .contains(&format!("bootstrap: the bundle is trusted by {trusted_by}")),
        "{}",
        tail(o, 40)
    );
}

/// The bundle was refused: FAILED whose STATUS says `why`, power-off with 71, nothing applied.
fn assert_refused(o: &Outcome, reports: &[Frame], why: &str) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(71), "{}", tail(o, 40));
    let failed: Vec<&Frame> = reports.iter().filter(|f| f.kind == Kind::Failed).collect();
    assert_eq!(failed.len(), 1, "{reports:?}");
    let status = failed[0].get("STATUS").unwrap_or("");
    assert!(status.contains(why), "FAILED {status:?} lacks {why:?}");
    assert!(o.console.contains(why), "{}", tail(o, 40));
    assert!(
        !reports.iter().any(|f| f.kind == Kind::Ready),
        "{reports:?}"
    );
    assert!(
        !o.console.contains("bootstrap: unpacked") && !o.console.contains("manifest:"),
        "something was unpacked or applied:\n{}",
        tail(o, 40)
    );
    assert_eq!(probe_value(o, "hostname"), None, "the hand-off ran");
}

#[test]
fn signed_bundles_from_an_image_that_trusts_a_key() {
    let dir = scratch().expect("scratch");
    let (bytes, digest) = bundle_tarball(dir.path());
    let old = SigningKey::from_seed([11; 32]);
    let current = SigningKey::from_seed([12; 32]);
    let stranger = SigningKey::from_seed([13; 32]);
    // Two trusted keys: a rotation in progress; the current one signs.
    let img = image(dir.path(), &[&old, &current]);

    let signed = BundleSource::from_bytes(bytes.clone())
        .with_signature(&current.sign(&digest).to_string())
        .expect("signature");
    let (o, reports) = boot("trust_signed", &img, dir.path(), signed, None);
    assert_applied(&o, &reports, &format!("a signature of {digest}"));

    let unknown = BundleSource::from_bytes(bytes)
        .with_signature(&stranger.sign(&digest).to_string())
        .expect("signature");
    let (o, reports) = boot("trust_unknown_key", &img, dir.path(), unknown, None);
    assert_refused(
        &o,
        &reports,
        &format!(
            "bundle signature by an unknown key: none of the 2 trusted keys ({}, {}) verifies it",
            old.public().short(),
            current.public().short()
        ),
    );
}

#[test]
fn digests_given_out_of_band_over_smbios_and_fw_cfg() {
    let dir = scratch().expect("scratch");
    let (bytes, digest) = bundle_tarball(dir.path());
    let key = SigningKey::from_seed([21; 32]);
    let img = image(dir.path(), &[&key]);
    let oob = |digest: &Sha256Digest, via| {
        Some(OobDigest {
            digest: digest.clone(),
            via,
        })
    };

    // Unsigned: the image's key could not trust it; the VMM's digest does.
    let unsigned = || BundleSource::from_bytes(bytes.clone());
    let (o, reports) = boot(
        "trust_smbios",
        &img,
        dir.path(),
        unsigned(),
        oob(&digest, OobVia::Smbios),
    );
    assert_applied(
        &o,
        &reports,
        &format!("the out-of-band digest {digest} (SMBIOS type 11 io.bootlace.digest)"),
    );
    let (o, reports) = boot(
        "trust_fw_cfg",
        &img,
        dir.path(),
        unsigned(),
        oob(&digest, OobVia::FwCfg),
    );
    assert_applied(
        &o,
        &reports,
        &format!("the out-of-band digest {digest} (fw_cfg opt/io.bootlace/digest)"),
    );

    // Another digest out of band: refused, though the bundle is signed by the trusted key.
    let other = bootlace_contract::digest::of_bytes(b"another bundle");
    let signed = BundleSource::from_bytes(bytes.clone())
        .with_signature(&key.sign(&digest).to_string())
        .expect("signature");
    let (o, reports) = boot(
        "trust_oob_mismatch",
        &img,
        dir.path(),
        signed,
        oob(&other, OobVia::Both),
    );
    assert_refused(
        &o,
        &reports,
        &format!(
            "bundle digest mismatch: the host announces {digest}, the out-of-band digest \
             (SMBIOS type 11 and fw_cfg) is {other}; nothing was extracted"
        ),
    );
}
