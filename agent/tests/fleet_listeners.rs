//! A large fleet's listeners follow its file: every guest's socket is listened on, and an edit
//! that drops some guests and adds others removes and adds exactly those listeners.
//!
//! Regression test for the fleet watcher's sync, which compared lists (a `Vec::contains` per
//! socket: 10^8 path comparisons per check with 10,000 guests, most of a core at idle) and now
//! compares sets; its cost is measured by `bench-fleet`, this checks it still does the same.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bootlace_agent::fleet::Fleet;
use bootlace_agent::host::{hybrid_path, Host};

const PORT: u32 = 1024;
/// Few enough for a default open-file limit of 1024.
const GUESTS: usize = 300;

fn write_fleet(dir: &Path, names: impl Iterator<Item = usize>) -> PathBuf {
    let mut toml = String::from("[defaults]\nbundle = \"bundle\"\n");
    for i in names {
        toml.push_str(&format!(
            "[guests.vm{i}]\nsocket = \"{}\"\n",
            dir.join("s").join(format!("vm{i}")).display()
        ));
    }
    let file = dir.join("fleet.toml");
    std::fs::write(&file, toml).expect("write the fleet file");
    file
}

fn socket(dir: &Path, i: usize) -> PathBuf {
    hybrid_path(&dir.join("s").join(format!("vm{i}")), PORT)
}

fn listeners(host: &Host) -> u64 {
    host.status()["counters"]["listeners"]
        .as_u64()
        .expect("counters.listeners in the status")
}

/// Waits (up to a minute: the watcher checks every 20 ms) until `done`.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_large_fleets_listeners_follow_its_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir_all(dir.path().join("bundle")).expect("bundle dir");
    std::fs::write(dir.path().join("bundle/manifest.toml"), "version = 1\n").expect("manifest");
    std::fs::create_dir(dir.path().join("s")).expect("sockets dir");
    let file = write_fleet(dir.path(), 0..GUESTS);
    let fleet = Fleet::open(&file, PORT).expect("open the fleet");
    let host = Arc::new(Host::with_resolver(
        Arc::clone(&fleet) as Arc<dyn bootlace_agent::host::Resolve>,
        |_| {},
    ));
    fleet
        .watch(&host, Duration::from_millis(20))
        .expect("watch the fleet");
    assert_eq!(listeners(&host), GUESTS as u64);
    assert!((0..GUESTS).all(|i| socket(dir.path(), i).exists()));

    // Drop the first third, keep the rest, add as many new ones.
    let third = GUESTS / 3;
    write_fleet(dir.path(), third..GUESTS + third);
    wait_until("the edited fleet's listeners", || {
        listeners(&host) == GUESTS as u64 && socket(dir.path(), GUESTS + third - 1).exists()
    });
    for i in 0..third {
        assert!(
            !socket(dir.path(), i).exists(),
            "vm{i} was dropped: its socket stays"
        );
    }
    for i in third..GUESTS + third {
        assert!(
            socket(dir.path(), i).exists(),
            "vm{i} is in the fleet: no socket"
        );
    }
}
