//! VM test of the fleet host: one baked image (a trusted key in it, nothing pinned), one host
//! agent resolving guests from a fleet file, three VMs booted from that same image file:
//! - `web-1`, known by its socket, gets its own bundle signed by the trusted key;
//! - `web-2`, known by its socket and the SMBIOS UUID it must report, gets the fleet's base
//!   bundle with its hostname and vars written in by the host (so unsigned), trusted by the
//!   digest its VMM hands it over SMBIOS type 11 (`bootlace-agent resolve` prints it);
//! - `rogue` gets a bundle signed by a key the image does not know: refused on its header,
//!   nothing applied.
//!
//! `web-1` and `web-2` boot side by side; the two get different hostnames from one agent.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bootlace_agent::fleet::Fleet;
use bootlace_agent::host::{Event, GuestEvent, Host};
use bootlace_contract::config::{Command as Argv, HostAddress, ImageRef, InitConfig, Source};
use bootlace_contract::digest::Sha256Digest;
use bootlace_contract::protocol::Kind;
use bootlace_contract::signature::SigningKey;
use bootlace_image::bundle::{self, BundleFormat};
use bootlace_tests::{bake, boot_with, probe_rootfs, probe_value, scratch, tail};
use bootlace_vm::vsock::VsockSpec;
use bootlace_vm::{End, OobDigest, OobVia, Outcome};

const WEB2_UUID: &str = "0b00f1ee-0000-4000-8000-0000000000b2";

fn manifest(hostname: &str) -> String {
    format!(
        r#"
version = 1
hostname = "{hostname}"
env = {{ FROM = "bundle" }}

[handoff]
mode = "supervise"
command = ["/bin/sh", "-c", "/sbin/probe; exit 3"]
"#
    )
}

/// A tar.gz bundle of `name` with `hostname`, and a `.sig` sidecar by `key` if given.
fn bundle_of(dir: &Path, name: &str, hostname: &str, key: Option<&SigningKey>) {
    let src = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&src).expect("mkdir");
    std::fs::write(src.join("bootlace.toml"), manifest(hostname)).expect("manifest");
    let out = dir.join(format!("{name}.tar.gz"));
    let s = bundle::build(&src, BundleFormat::TarGz, "BOOTLACE", 0, &out).expect("bundle");
    if let Some(k) = key {
        let digest: Sha256Digest = format!("sha256:{}", s.sha256.expect("digest"))
            .parse()
            .expect("digest");
        std::fs::write(
            dir.join(format!("{name}.tar.gz.sig")),
            format!("{}\n", k.sign(&digest)),
        )
        .expect("sig");
    }
}

fn image(dir: &Path, key: &SigningKey) -> std::path::PathBuf {
    let mut c = InitConfig::default();
    c.handoff.command = Argv::try_from(vec!["/sbin/probe".to_owned()]).expect("argv");
    c.bootstrap.sources = vec![Source::Vsock];
    c.host.address = Some(HostAddress::try_from("vsock:2:1024".to_owned()).expect("addr"));
    c.host.connect_timeout_ms = 5000;
    c.host.trust_keys = vec![key.public()];
    // As `bootlace-image bake --name probe --version 1` writes it.
    c.image = Some(ImageRef::new("probe", "1").expect("image"));
    let rootfs = dir.join("rootfs");
    probe_rootfs(&rootfs, None).expect("rootfs");
    let img = dir.join("initrd.img");
    bake(&rootfs, c, &img).expect("bake");
    img
}

fn boot(
    name: &str,
    img: &Path,
    dir: &Path,
    uuid: Option<&str>,
    oob: Option<Sha256Digest>,
) -> Outcome {
    let vdir = dir.join(name);
    let uuid = uuid.map(|u| u.parse().expect("uuid"));
    boot_with(&format!("fleet_{name}"), img, &[], move |spec| {
        spec.vsock = Some(VsockSpec::new(vdir));
        spec.uuid = uuid;
        spec.oob_digest = oob.map(|digest| OobDigest {
            digest,
            via: OobVia::Smbios,
        });
    })
    .expect("boot")
}

fn reports_of(events: &[GuestEvent], name: &str) -> Vec<(Kind, String)> {
    events
        .iter()
        .filter(|e| e.name.as_deref() == Some(name))
        .filter_map(|e| match &e.event {
            Event::Report(f) => Some((f.kind, f.get("STATUS").unwrap_or("").to_owned())),
            _ => None,
        })
        .collect()
}

fn assert_configured(o: &Outcome, hostname: &str, trusted_by: &str) {
    assert_eq!(o.end, End::PoweredOff, "{}", tail(o, 40));
    assert_eq!(o.exit_status, Some(3), "{}", tail(o, 40));
    assert_eq!(
        probe_value(o, "hostname").as_deref(),
        Some(hostname),
        "{}",
        tail(o, 40)
    );
    assert!(
        o.console
            .contains(&format!("bootstrap: the bundle is trusted by {trusted_by}")),
        "{}",
        tail(o, 40)
    );
}

/// The fleet: web-1 by socket, web-2 by socket and UUID (composed), rogue by socket.
fn write_fleet(d: &Path) {
    std::fs::write(
        d.join("fleet.toml"),
        format!(
            r#"
[defaults]
bundle = "base.tar.gz"
image = "probe"

[guests.web-1]
socket = "web-1/vsock"
bundle = "web-1.tar.gz"

[guests.web-2]
socket = "web-2/vsock"
uuid = "{WEB2_UUID}"
hostname = "web-2"
vars = {{ ROLE = "db" }}

[guests.rogue]
socket = "rogue/vsock"
bundle = "rogue.tar.gz"
"#
        ),
    )
    .expect("fleet");
}

/// The table names each guest, the bundle it got and where it ended.
fn assert_table(host: &Host, web2_sha256: &str) {
    let status = host.status();
    let row = |n: &str| {
        status["guests"]
            .as_array()
            .and_then(|g| g.iter().find(|r| r["name"] == n).cloned())
            .unwrap_or_else(|| panic!("{n} not in {status}"))
    };
    let (r1, r2, r3) = (row("web-1"), row("web-2"), row("rogue"));
    assert_eq!(r1["state"], "exited", "{r1}");
    assert_eq!(r2["instance_id"], WEB2_UUID, "{r2}");
    assert_eq!(r2["bundle_sha256"], web2_sha256, "{r2}");
    assert_ne!(r1["bundle_sha256"], r2["bundle_sha256"]);
    assert_eq!(r3["state"], "failed", "{r3}");
    // The image each runs, as its init reports it: the one file they share, named by the bake.
    assert_eq!(r1["image"], "probe");
    assert_eq!(r1["running_image"], "probe@1");
    assert_eq!(r2["running_image"], "probe@1");
}

#[test]
fn two_guests_of_one_image_configured_by_one_agent() {
    let dir = scratch().expect("scratch");
    let d = dir.path();
    let key = SigningKey::from_seed([41; 32]);
    let stranger = SigningKey::from_seed([42; 32]);
    let img = image(d, &key);
    bundle_of(d, "web-1", "web-1", Some(&key));
    bundle_of(d, "base", "base", None);
    bundle_of(d, "rogue", "rogue", Some(&stranger));
    for n in ["web-1", "web-2", "rogue"] {
        std::fs::create_dir_all(d.join(n)).expect("mkdir");
    }
    write_fleet(d);
    let fleet = Fleet::open(&d.join("fleet.toml"), 1024).expect("fleet");
    let events: Arc<Mutex<Vec<GuestEvent>>> = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(Host::with_resolver(
        Arc::clone(&fleet) as Arc<dyn bootlace_agent::resolve::Resolve>,
        move |e| sink.lock().expect("lock").push(e),
    ));
    fleet
        .watch(&host, std::time::Duration::from_secs(1))
        .expect("listen");
    // What the VMM hands web-2: the digest of the bundle the fleet composed for it.
    let web2 = fleet.current();
    let web2 = web2
        .assignment("web-2")
        .and_then(|a| a.bundle.clone())
        .expect("web-2 has a bundle");
    assert!(
        web2.signature.is_none(),
        "a composed bundle is not the signed one"
    );
    let web2_digest: Sha256Digest = format!("sha256:{}", web2.sha256).parse().expect("digest");

    let (o1, o2) = std::thread::scope(|s| {
        let one = s.spawn(|| boot("web-1", &img, d, None, None));
        let two = s.spawn(|| boot("web-2", &img, d, Some(WEB2_UUID), Some(web2_digest.clone())));
        (one.join().expect("web-1"), two.join().expect("web-2"))
    });
    assert_configured(&o1, "web-1", "a signature of");
    assert_configured(
        &o2,
        "web-2",
        &format!("the out-of-band digest {web2_digest} (SMBIOS type 11 io.bootlace.digest)"),
    );
    let env2 = probe_value(&o2, "env").unwrap_or_default();
    assert!(
        env2.contains("ROLE=db") && env2.contains("FROM=bundle"),
        "{env2}"
    );

    let o3 = boot("rogue", &img, d, None, None);
    assert_eq!(o3.exit_status, Some(71), "{}", tail(&o3, 40));
    assert!(
        o3.console.contains("bundle signature by an unknown key"),
        "{}",
        tail(&o3, 40)
    );
    assert_eq!(
        probe_value(&o3, "hostname"),
        None,
        "the rogue bundle was applied"
    );

    let all = events.lock().expect("lock").clone();
    for (name, kinds) in [
        ("web-1", [Kind::Ready, Kind::Exit]),
        ("web-2", [Kind::Ready, Kind::Exit]),
    ] {
        let got: Vec<Kind> = reports_of(&all, name).into_iter().map(|r| r.0).collect();
        for k in kinds {
            assert!(got.contains(&k), "{name}: {got:?}");
        }
    }
    let rogue = reports_of(&all, "rogue");
    assert!(
        rogue
            .iter()
            .any(|(k, s)| *k == Kind::Failed && s.contains("unknown key")),
        "{rogue:?}"
    );
    assert_table(&host, &web2.sha256);
}
