//! A bake killed in the middle (Ctrl-C, `kill -9`) leaves no overlay mounted on the host: run as
//! root, `bootlace-image` mounts its overlay in a mount namespace of its own, which goes away
//! with the process. The image tool here is a stand-in that waits, so the kill lands while the
//! overlay is mounted, every time.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write_exe(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The mount points in a mountinfo file that lie under `dir`.
fn mounts_under(mountinfo: &str, dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| p.starts_with(dir.as_ref()))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs root"]
fn a_killed_bake_leaves_no_overlay_on_the_host() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let input = tmp.path().join("input");
    std::fs::create_dir_all(input.join("etc")).expect("mkdir");
    std::fs::write(input.join("etc/hostname"), "x\n").expect("write");
    let init = tmp.path().join("bootlace-init");
    write_exe(&init, "#!/bin/sh\necho bootlace-init 9.9.9\n");
    // A stand-in mkfs.erofs that waits for the kill.
    let tools = tmp.path().join("tools");
    std::fs::create_dir(&tools).expect("mkdir");
    write_exe(&tools.join("mkfs.erofs"), "#!/bin/sh\nexec sleep 60\n");
    let out_dir = tmp.path().join("out");
    std::fs::create_dir(&out_dir).expect("mkdir");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut bake = Command::new(env!("CARGO_BIN_EXE_bootlace-image"))
        .args(["bake", "--format", "erofs", "--quiet", "--input"])
        .arg(&input)
        .arg("--init")
        .arg(&init)
        .arg("--out")
        .arg(out_dir.join("root.erofs"))
        .env("PATH", path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bootlace-image");
    // Wait until the bake's own namespace has its overlay mounted.
    let theirs = format!("/proc/{}/mountinfo", bake.id());
    let deadline = Instant::now() + Duration::from_secs(60);
    let mounted = loop {
        let info = std::fs::read_to_string(&theirs).unwrap_or_default();
        let m = mounts_under(&info, &out_dir);
        if !m.is_empty() || Instant::now() > deadline {
            break m;
        }
        if let Ok(Some(status)) = bake.try_wait() {
            panic!("the bake ended ({status}) before its overlay was seen");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !mounted.is_empty(),
        "no overlay under {} within 60 s",
        out_dir.display()
    );
    // The host never saw it.
    let ours = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert_eq!(mounts_under(&ours, &out_dir), Vec::<String>::new());
    bake.kill().expect("kill");
    bake.wait().expect("wait");
    let ours = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert_eq!(
        mounts_under(&ours, &out_dir),
        Vec::<String>::new(),
        "an overlay outlived the killed bake"
    );
    // What is left is a work directory that can simply be removed (no mount is in the way).
    for entry in std::fs::read_dir(&out_dir).expect("read_dir") {
        let p = entry.expect("entry").path();
        std::fs::remove_dir_all(&p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
    }
    assert!(!out_dir.join("root.erofs").exists());
}
