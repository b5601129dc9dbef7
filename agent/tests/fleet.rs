//! The host as a fleet's configuration manager: guests told apart by their socket or UUID,
//! each given its own bundle; unknown guests refused with a reason; the fleet changed
//! without a restart; what one guest may hold of the host; the status table.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootlace_agent::client::{Client, ClientError, Connector, Retry, Stream};
use bootlace_agent::fleet::Fleet;
use bootlace_agent::host::{hybrid_path, Event, GuestEvent, Host, Limits};

type Events = Arc<Mutex<Vec<GuestEvent>>>;

fn bundle_dir(root: &Path, name: &str, hostname: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(d.join("etc")).expect("mkdir");
    std::fs::write(
        d.join("bootlace.toml"),
        format!("version = 1\nhostname = \"{hostname}\"\n[env]\nKEEP = \"base\"\n"),
    )
    .expect("manifest");
    std::fs::write(d.join("etc/motd"), "hello\n").expect("motd");
    d
}

fn connector(path: PathBuf) -> Connector {
    Box::new(move |_left| {
        let s = UnixStream::connect(&path)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Box::new(s) as Box<dyn Stream>)
    })
}

fn retry() -> Retry {
    Retry {
        give_up_after: Duration::from_secs(5),
        first_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
        resends: 2,
        acks: true,
    }
}

/// A guest on `path` saying `uuid`: the bundle's manifest, or the NO-BUNDLE reason.
fn fetch(path: &Path, uuid: &str) -> Result<String, String> {
    fetch_as(path, uuid, None)
}

/// [`fetch`] from a guest that says it runs `image`.
fn fetch_as(path: &Path, uuid: &str, image: Option<&str>) -> Result<String, String> {
    let mut hello = vec![
        ("BOOT_ID", "boot-1".to_owned()),
        ("INSTANCE_ID", uuid.to_owned()),
    ];
    if let Some(i) = image {
        hello.push(("IMAGE", i.to_owned()));
    }
    let mut c = Client::connect(connector(path.to_owned()), &hello, retry())
        .map_err(|e| format!("connect: {e}"))?;
    let mut bytes = Vec::new();
    match c.fetch_bundle(&mut bytes, 1 << 20) {
        Ok(_) => Ok(manifest_of(&bytes)),
        Err(ClientError::NoBundle(reason)) => Err(reason),
        Err(e) => Err(format!("fetch: {e}")),
    }
}

/// bootlace.toml of a tar (plain or gzip).
fn manifest_of(bytes: &[u8]) -> String {
    entries_of(bytes)
        .into_iter()
        .find(|(p, _, _)| p.ends_with("bootlace.toml"))
        .map(|(_, _, data)| String::from_utf8(data).expect("UTF-8 manifest"))
        .expect("no bootlace.toml in the bundle")
}

fn host_on(fleet: &Arc<Fleet>, limits: Limits) -> (Arc<Host>, Events) {
    let events: Events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let host = Arc::new(
        Host::with_resolver(
            Arc::clone(fleet) as Arc<dyn bootlace_agent::resolve::Resolve>,
            move |e| sink.lock().expect("lock").push(e),
        )
        .with_limits(limits),
    );
    fleet
        .watch(&host, Duration::from_millis(100))
        .expect("watch");
    (host, events)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "waited 10 s for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn each_guest_gets_its_own_bundle_and_an_unknown_one_gets_a_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bundle_dir(d, "base", "base");
    bundle_dir(d, "db", "db-from-bundle");
    std::fs::write(
        d.join("fleet.toml"),
        format!(
            r#"
[defaults]
bundle = "base"
image = "web@1.0"
vars = {{ REGION = "eu" }}

[guests.web-1]
socket = "{d}/web-1"
hostname = "web-1"
vars = {{ ROLE = "web" }}

[guests.web-2]
socket = "{d}/web-2"
hostname = "web-2"

[guests.db]
socket = "{d}/db"
uuid = "6F1C0000-0000-0000-0000-0000000000DB"
bundle = "db"

[guests.batch]
uuid = "5b000000-0000-0000-0000-000000000001"
hostname = "batch"
"#,
            d = d.display()
        ),
    )
    .expect("fleet");
    let fleet = Fleet::open(&d.join("fleet.toml"), 1024).expect("fleet loads");
    let (host, events) = host_on(&fleet, Limits::default());
    // A socket the fleet does not name: shared by guests known by UUID only.
    let shared = hybrid_path(&d.join("shared"), 1024);
    host.serve_unix(&shared).expect("listen");

    let web1 = fetch(&hybrid_path(&d.join("web-1"), 1024), "").expect("web-1");
    let web2 = fetch(&hybrid_path(&d.join("web-2"), 1024), "").expect("web-2");
    assert!(web1.contains("hostname = \"web-1\""), "{web1}");
    assert!(
        web1.contains("ROLE = \"web\"") && web1.contains("REGION = \"eu\""),
        "{web1}"
    );
    assert!(
        web1.contains("KEEP = \"base\""),
        "the base env stays: {web1}"
    );
    assert!(
        web2.contains("hostname = \"web-2\"") && !web2.contains("ROLE"),
        "{web2}"
    );

    // Known by socket and UUID: both must hold (the UUID compared without case).
    let db = fetch(
        &hybrid_path(&d.join("db"), 1024),
        "6f1c0000-0000-0000-0000-0000000000db",
    )
    .expect("db");
    assert!(
        db.contains("db-from-bundle") && db.contains("REGION"),
        "{db}"
    );
    let wrong = fetch(
        &hybrid_path(&d.join("db"), 1024),
        "6f1c0000-0000-0000-0000-00000000beef",
    )
    .expect_err("a guest on db's socket reporting another UUID");
    assert!(
        wrong.contains("the fleet expects 6f1c0000-0000-0000-0000-0000000000db"),
        "{wrong}"
    );

    // Known by UUID only, on a shared socket.
    let batch = fetch(&shared, "5B000000-0000-0000-0000-000000000001").expect("batch");
    assert!(batch.contains("hostname = \"batch\""), "{batch}");
    let unknown = fetch(&shared, "00000000-0000-0000-0000-000000000000")
        .expect_err("an unknown guest gets no bundle");
    assert!(
        unknown.contains("unknown guest")
            && unknown.contains("INSTANCE_ID 00000000-0000-0000-0000-000000000000")
            && unknown.contains("fleet.toml"),
        "{unknown}"
    );
    // The host logged it, and named the guests it knows.
    let ev = events.lock().expect("lock").clone();
    assert!(ev.iter().any(
        |e| matches!(&e.event, Event::NoBundle { reason } if reason.contains("unknown guest"))
    ));
    assert!(ev.iter().any(|e| e.name.as_deref() == Some("web-1")));
    let status = host.status();
    let names: Vec<&str> = status["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    for n in ["web-1", "web-2", "db", "batch"] {
        assert!(names.contains(&n), "{n} not in {status}");
    }
    let web1_row = status["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|r| r["name"] == "web-1"))
        .expect("web-1 row");
    assert_eq!(web1_row["image"], "web@1.0");
    assert_eq!(web1_row["state"], "configured", "{web1_row}");
}

#[test]
fn fleet_changes_apply_without_a_restart_and_a_broken_one_keeps_the_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fleet_file = d.join("fleet.toml");
    let write = |guests: &str| std::fs::write(&fleet_file, guests).expect("write");
    write(&format!(
        "[guests.a]\nsocket = \"{}/a\"\nhostname = \"a-1\"\n",
        d.display()
    ));
    let fleet = Fleet::open(&fleet_file, 1024).expect("fleet");
    let (_host, events) = host_on(&fleet, Limits::default());
    let a = hybrid_path(&d.join("a"), 1024);
    let b = hybrid_path(&d.join("b"), 1024);
    assert!(fetch(&a, "").expect("a").contains("a-1"));

    // A new hostname for a, and a new guest b: a listener appears for b.
    std::thread::sleep(Duration::from_millis(20));
    write(&format!(
        "[guests.a]\nsocket = \"{d}/a\"\nhostname = \"a-2\"\n\n[guests.b]\nsocket = \"{d}/b\"\nhostname = \"b-1\"\n",
        d = d.display()
    ));
    wait_for("a's new hostname", || {
        fetch(&a, "").is_ok_and(|m| m.contains("a-2"))
    });
    wait_for("b's listener", || b.exists());
    assert!(fetch(&b, "").expect("b").contains("b-1"));

    // A broken file: reported once, the previous fleet stays.
    write("[guests.a\nsocket = ");
    wait_for("the refusal notice", || {
        events.lock().expect("lock").iter().any(|e| {
            matches!(&e.event, Event::Notice(m) if m.contains("fleet not reloaded") && m.contains("fleet.toml"))
        })
    });
    assert!(fetch(&a, "").expect("a still served").contains("a-2"));
    std::thread::sleep(Duration::from_millis(400));
    let refusals = events
        .lock()
        .expect("lock")
        .iter()
        .filter(|e| matches!(&e.event, Event::Notice(m) if m.contains("fleet not reloaded")))
        .count();
    assert_eq!(refusals, 1, "the same broken file is reported once");

    // b removed: its socket goes, a stays.
    write(&format!(
        "[guests.a]\nsocket = \"{}/a\"\nhostname = \"a-3\"\n",
        d.display()
    ));
    wait_for("b's socket removed", || !b.exists());
    assert!(fetch(&a, "").expect("a").contains("a-3"));
}

#[test]
fn bad_fleets_are_refused_naming_the_file_and_the_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let cases = [
        (
            "[guests.x]\nhostname = \"x\"\n",
            "guest \"x\": give socket, cid or uuid",
        ),
        (
            "[guests.x]\nsocket = \"/s\"\nsokcet = 1\n",
            "unknown field `sokcet`",
        ),
        (
            "[guests.x]\nsocket = \"/s\"\n[guests.y]\nsocket = \"/s\"\n",
            "have the same socket",
        ),
        (
            "[guests.x]\ncid = 3\nbundle = \"missing\"\n",
            "guest x: bundle",
        ),
    ];
    for (text, want) in cases {
        let f = d.join("fleet.toml");
        std::fs::write(&f, text).expect("write");
        let e = Fleet::open(&f, 1024).expect_err(text);
        let msg = bootlace_contract::chain(&e);
        assert!(msg.contains(want), "{text}: {msg}");
    }
    // A directory of fleet files: a guest in two of them is named with both files.
    let fd = d.join("fleet.d");
    std::fs::create_dir(&fd).expect("mkdir");
    std::fs::write(fd.join("a.toml"), "[guests.x]\ncid = 3\nhostname = \"x\"\n").expect("a");
    std::fs::write(fd.join("b.toml"), "[guests.x]\ncid = 4\nhostname = \"x\"\n").expect("b");
    let msg = Fleet::open(&fd, 1024).expect_err("duplicate").to_string();
    assert!(msg.contains("a.toml") && msg.contains("b.toml"), "{msg}");
    std::fs::remove_file(fd.join("b.toml")).expect("rm");
    assert_eq!(Fleet::open(&fd, 1024).expect("one file").current().len(), 1);
}

/// `n` connections to `path` that never say anything.
fn idle(path: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|_| UnixStream::connect(path).expect("connect"))
        .collect()
}

/// Whether the host closed `s` (reads end of file).
fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0))
}

#[test]
fn one_guest_cannot_hold_the_host_and_silent_connections_go_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bundle_dir(d, "b", "x");
    let mut text = String::from("[defaults]\nbundle = \"b\"\n");
    for n in ["greedy", "good", "s1", "s2", "s3"] {
        text.push_str(&format!("[guests.{n}]\nsocket = \"{}/{n}\"\n", d.display()));
    }
    std::fs::write(d.join("fleet.toml"), text).expect("fleet");
    let fleet = Fleet::open(&d.join("fleet.toml"), 1024).expect("fleet");
    let (host, events) = host_on(
        &fleet,
        Limits {
            max_connections: 6,
            max_per_guest: 3,
            hello_timeout: Duration::from_secs(1),
            report_interval: Duration::from_secs(60),
        },
    );
    let sock = |n: &str| hybrid_path(&d.join(n), 1024);
    wait_for("listeners", || sock("s3").exists());

    // The per-guest cap: the 4th and later connections of one guest are closed at once.
    let mut greedy = idle(&sock("greedy"), 10);
    for s in greedy.iter_mut().skip(3) {
        assert!(closed(s), "a connection past the per-guest cap stays open");
    }
    // Silent connections of other guests fill the global cap (3 + 3 = 6)...
    let mut silent: Vec<UnixStream> = ["s1", "s2", "s3"]
        .iter()
        .flat_map(|n| idle(&sock(n), 1))
        .collect();
    // ... and a well-behaved guest is still served: the oldest silent one makes room.
    let started = Instant::now();
    let m = fetch(&sock("good"), "").expect("a good guest is served at the cap");
    assert!(m.contains("hostname"), "{m}");
    eprintln!("good guest served at the cap in {:?}", started.elapsed());
    assert!(
        closed(&mut greedy[0]),
        "the oldest silent connection is closed first"
    );
    // The HELLO deadline closes the rest.
    for s in silent.iter_mut() {
        assert!(
            closed(s),
            "a connection silent past the HELLO deadline stays open"
        );
    }
    let ev = events.lock().expect("lock").clone();
    let notices: Vec<&String> = ev
        .iter()
        .filter_map(|e| match &e.event {
            Event::Notice(m) => Some(m),
            _ => None,
        })
        .collect();
    let per_guest = notices
        .iter()
        .filter(|m| m.contains("per-guest cap"))
        .count();
    assert_eq!(
        per_guest, 1,
        "7 refusals, one report per interval: {notices:?}"
    );
    assert!(ev
        .iter()
        .any(|e| matches!(&e.event, Event::Error(m) if m.contains("no HELLO within 1 s"))));
    assert!(ev
        .iter()
        .any(|e| matches!(&e.event, Event::Error(m) if m.contains("connection limit"))));
    let c = &host.status()["counters"];
    assert_eq!(c["refused_per_guest"], 7, "{c}");
    assert!(c["evicted"].as_u64() >= Some(1), "{c}");
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bootlace-agent"))
}

fn spawn_serve(fleet: &Path, status: &Path) -> Child {
    agent()
        .args(["serve", "--json", "--fleet"])
        .arg(fleet)
        .arg("--status-socket")
        .arg(status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// A guest that fetches its bundle and says READY, its connection kept open.
fn ready_guest(path: &Path, boot: &str) -> Client {
    let mut c = Client::connect(
        connector(path.to_owned()),
        &[("BOOT_ID", boot.to_owned())],
        retry(),
    )
    .expect("connect");
    let mut b = Vec::new();
    c.fetch_bundle(&mut b, 1 << 20).expect("bundle");
    c.send(
        bootlace_contract::protocol::Kind::Ready,
        &[("READY", "1".into()), ("STATUS", "up".into())],
    )
    .expect("ready");
    c
}

#[test]
fn wait_ready_waits_for_every_named_guest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let fleet = d.join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[guests.alpha]\nsocket = \"{d}/alpha\"\nhostname = \"a\"\n[guests.beta]\nsocket = \"{d}/beta\"\nhostname = \"b\"\n",
            d = d.display()
        ),
    )
    .expect("fleet");
    let sock = |n: &str| hybrid_path(&d.join(n), 1024);
    let waiter = agent()
        .args([
            "wait-ready",
            "--json",
            "--timeout",
            "30",
            "--guest",
            "alpha",
            "--guest",
            "beta",
            "--fleet",
        ])
        .arg(&fleet)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_for("wait-ready's listeners", || sock("beta").exists());
    let _a = ready_guest(&sock("alpha"), "ba");
    std::thread::sleep(Duration::from_millis(300));
    let _b = ready_guest(&sock("beta"), "bb");
    let out = waiter.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("JSON");
    assert_eq!(
        last["guest"], "beta",
        "ends with the last of the two: {stdout}"
    );
    assert!(stdout.contains("\"name\":\"alpha\""), "{stdout}");
}

#[test]
fn the_status_table_over_the_status_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bundle_dir(d, "b", "x");
    std::fs::write(
        d.join("fleet.toml"),
        format!(
            "[defaults]\nbundle = \"b\"\nimage = \"app@2\"\n[guests.one]\nsocket = \"{d}/one\"\n[guests.two]\nsocket = \"{d}/two\"\n",
            d = d.display()
        ),
    )
    .expect("fleet");
    let status_sock = d.join("agent.sock");
    let mut serve = spawn_serve(&d.join("fleet.toml"), &status_sock);
    let sock = |n: &str| hybrid_path(&d.join(n), 1024);
    wait_for("the agent", || status_sock.exists() && sock("two").exists());
    let _one = ready_guest(&sock("one"), "b1");
    let json = agent()
        .args(["status", "--json", "--socket"])
        .arg(&status_sock)
        .output()
        .expect("status");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("status JSON");
    let one = v["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|r| r["name"] == "one"))
        .unwrap_or_else(|| panic!("one in {v}"));
    assert_eq!(one["state"], "ready");
    assert_eq!(one["boot_id"], "b1");
    assert_eq!(one["image"], "app@2");
    assert_eq!(one["connections"], 1);
    assert!(one["bundle_sha256"].as_str().is_some_and(|s| s.len() == 64));
    let human = agent()
        .args(["status", "--socket"])
        .arg(&status_sock)
        .output()
        .expect("status");
    let table = String::from_utf8_lossy(&human.stdout);
    assert!(
        table.starts_with("GUEST") && table.contains("one") && table.contains("ready"),
        "{table}"
    );
    let metrics = agent()
        .args(["status", "--metrics", "--socket"])
        .arg(&status_sock)
        .output()
        .expect("metrics");
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("bootlace_agent_guests{state=\"ready\"} 1"),
        "{text}"
    );
    assert!(text.contains("bootlace_agent_connections_open 1"), "{text}");
    // The same over HTTP, for Prometheus.
    let host = Arc::new(Host::new(None, |_| {}));
    let addr = host
        .serve_metrics("127.0.0.1:0".parse().expect("addr"))
        .expect("metrics");
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect");
    std::io::Write::write_all(&mut tcp, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("ask");
    let mut http = String::new();
    tcp.read_to_string(&mut http).expect("read");
    assert!(
        http.starts_with("HTTP/1.0 200 OK") && http.contains("bootlace_agent_connections_open 0"),
        "{http}"
    );
    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&status_sock)
        .expect("stat")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let _ = serve.kill();
    let _ = serve.wait();
    let mut rest = String::new();
    if let Some(mut o) = serve.stdout.take() {
        let _ = o.read_to_string(&mut rest);
    }
    assert!(
        rest.contains("\"event\":\"report\""),
        "JSON lines on stdout: {rest}"
    );
}

#[test]
fn resolve_prints_what_each_guest_gets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    std::fs::write(
        d.join("fleet.toml"),
        "[guests.a]\ncid = 3\nhostname = \"a\"\n[guests.b]\ncid = 4\n",
    )
    .expect("fleet");
    let out = agent()
        .args(["resolve", "--json", "--fleet"])
        .arg(d.join("fleet.toml"))
        .output()
        .expect("resolve");
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(lines.len(), 2);
    // The digest printed is the digest served.
    let fleet = Fleet::open(&d.join("fleet.toml"), 1024).expect("fleet");
    let served = fleet
        .current()
        .assignment("a")
        .and_then(|a| a.bundle.clone())
        .expect("a has a bundle");
    assert_eq!(lines[0]["bundle"]["sha256"], served.sha256.as_str());
    assert!(lines[1]["bundle"].is_null());
    assert!(lines[1]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("no bundle")));
    let missing = agent()
        .args(["resolve", "--fleet"])
        .arg(d.join("fleet.toml"))
        .arg("zz")
        .output()
        .expect("resolve");
    assert_eq!(missing.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("guest \"zz\" is not in the fleet"));
}

#[test]
fn a_guest_running_another_image_gets_no_bundle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bundle_dir(d, "base", "base");
    std::fs::write(
        d.join("fleet.toml"),
        format!(
            "[defaults]\nbundle = \"base\"\n[guests.pinned]\nsocket = \"{d}/pinned\"\nimage = \"web@1.0\"\n[guests.any]\nsocket = \"{d}/any\"\nimage = \"web\"\n",
            d = d.display()
        ),
    )
    .expect("fleet");
    let fleet = Fleet::open(&d.join("fleet.toml"), 1024).expect("fleet");
    let (host, _events) = host_on(&fleet, Limits::default());
    let pinned = hybrid_path(&d.join("pinned"), 1024);
    let any = hybrid_path(&d.join("any"), 1024);
    wait_for("listeners", || pinned.exists() && any.exists());
    assert!(fetch_as(&pinned, "", Some("web@1.0")).is_ok());
    // An init that does not report its image (before IMAGE) is not checked.
    assert!(fetch_as(&pinned, "", None).is_ok());
    let other = fetch_as(&pinned, "", Some("web@0.9")).expect_err("another version");
    assert!(
        other.contains("runs image web@0.9; the fleet says web@1.0 for guest \"pinned\""),
        "{other}"
    );
    // A name alone: any version of it.
    assert!(fetch_as(&any, "", Some("web@0.9")).is_ok());
    let wrong = fetch_as(&any, "", Some("db@1.0")).expect_err("another image");
    assert!(
        wrong.contains("runs image db@1.0; the fleet says web"),
        "{wrong}"
    );
    let status = host.status();
    let row = status["guests"]
        .as_array()
        .and_then(|g| g.iter().find(|r| r["name"] == "any").cloned())
        .expect("row");
    assert_eq!(row["running_image"], "db@1.0");
    assert_eq!(row["state"], "no-bundle");
}

#[test]
fn a_command_replaces_the_bundles_and_is_supervised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let base = bundle_dir(d, "base", "base");
    std::fs::write(
        base.join("bootlace.toml"),
        "version = 1\nhostname = \"base\"\n[handoff]\nmode = \"exec\"\ncommand = [\"/sbin/init\"]\n",
    )
    .expect("manifest");
    let c = bootlace_agent::fleet::Customize {
        command: Some(vec!["/bin/app".to_owned(), "--serve".to_owned()]),
        ..Default::default()
    };
    let b = bootlace_agent::fleet::compose_with(Some(&base), &c).expect("compose");
    let m = manifest_of(&b.bytes);
    let doc: toml::Table = toml::from_str(&m).expect("TOML");
    assert_eq!(doc["handoff"]["mode"].as_str(), Some("supervise"), "{m}");
    assert_eq!(
        doc["handoff"]["command"].as_array().map(Vec::len),
        Some(2),
        "{m}"
    );
    assert_eq!(
        doc["hostname"].as_str(),
        Some("base"),
        "the rest stays: {m}"
    );
    // In a fleet file too; an empty command is refused naming the guest.
    std::fs::write(
        d.join("fleet.toml"),
        "[guests.x]\ncid = 3\nbundle = \"base\"\ncommand = []\n",
    )
    .expect("fleet");
    let e = Fleet::open(&d.join("fleet.toml"), 1024).expect_err("empty command");
    assert!(
        e.to_string().contains("guest \"x\": command is empty"),
        "{e}"
    );
}

/// The entries of a bundle tarball (gzip or not): path, mode, bytes.
fn entries_of(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
    let plain = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .expect("gunzip");
        out
    } else {
        bytes.to_vec()
    };
    let mut a = tar::Archive::new(plain.as_slice());
    let mut v = Vec::new();
    for e in a.entries().expect("tar") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").display().to_string();
        let mode = e.header().mode().expect("mode");
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read");
        v.push((path, mode, data));
    }
    v
}

#[test]
fn the_host_carries_a_newer_init_in_a_guests_bundle_and_changes_it_without_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    bundle_dir(d, "base", "base");
    let init = d.join("bootlace-init-0.2.0");
    std::fs::write(&init, b"\x7fELF a newer init").expect("init");
    let fleet_file = d.join("fleet.toml");
    let write = |text: &str| std::fs::write(&fleet_file, text).expect("write");
    write(&format!(
        "[defaults]\nbundle = \"base\"\ninit = \"bootlace-init-0.2.0\"\n\n\
         [guests.a]\nsocket = \"{d}/a\"\nhostname = \"a\"\n\n\
         [guests.b]\nsocket = \"{d}/b\"\ninit = \"missing-init\"\n",
        d = d.display()
    ));
    // b's init does not exist: the fleet is refused, naming the guest and the file.
    let e = bootlace_contract::chain(&Fleet::open(&fleet_file, 1024).expect_err("missing init"));
    assert!(
        e.contains("guest b") && e.contains("the init") && e.contains("missing-init: No such file"),
        "{e}"
    );

    write(&format!(
        "[defaults]\nbundle = \"base\"\ninit = \"bootlace-init-0.2.0\"\n\n\
         [guests.a]\nsocket = \"{d}/a\"\nhostname = \"a\"\n",
        d = d.display()
    ));
    let fleet = Fleet::open(&fleet_file, 1024).expect("fleet");
    let (_host, _events) = host_on(&fleet, Limits::default());
    let a = hybrid_path(&d.join("a"), 1024);
    let m = fetch(&a, "").expect("a");
    let doc: toml::Table = toml::from_str(&m).expect("TOML");
    let digest = bootlace_contract::digest::of_bytes(b"\x7fELF a newer init");
    assert_eq!(doc["init"]["path"].as_str(), Some("bootlace/init"), "{m}");
    assert_eq!(
        doc["init"]["sha256"].as_str(),
        Some(digest.to_string().as_str()),
        "{m}"
    );
    assert_eq!(doc["hostname"].as_str(), Some("a"), "{m}");
    let loaded = fleet.current();
    let bundle = loaded
        .assignment("a")
        .and_then(|a| a.bundle.clone())
        .expect("a's bundle");
    let entries = entries_of(&bundle.bytes);
    let carried = entries
        .iter()
        .find(|(p, _, _)| p == "bootlace/init")
        .expect("the init in the bundle");
    assert_eq!(carried.1 & 0o7777, 0o755);
    assert_eq!(carried.2, b"\x7fELF a newer init");
    assert!(
        entries.iter().any(|(p, _, _)| p == "etc/motd"),
        "the base stays"
    );

    // A new build of the init on the host: the next guest gets it, no restart.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&init, b"\x7fELF newer still").expect("init");
    let newer = bootlace_contract::digest::of_bytes(b"\x7fELF newer still").to_string();
    wait_for("the new init's digest", || {
        fetch(&a, "").is_ok_and(|m| m.contains(&newer))
    });

    // A base that already has bootlace/init cannot carry the fleet's.
    let clash = bundle_dir(d, "clash", "c");
    std::fs::create_dir_all(clash.join("bootlace")).expect("mkdir");
    std::fs::write(clash.join("bootlace/init"), b"x").expect("write");
    let c = bootlace_agent::fleet::Customize {
        init: Some(init.clone()),
        ..Default::default()
    };
    let e = bootlace_agent::fleet::compose_with(Some(&clash), &c).expect_err("clash");
    assert!(e.to_string().contains("already has bootlace/init"), "{e}");
}
