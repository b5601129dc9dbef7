//! vsock end to end, without the project's init: the Debian kernel boots a hand-made initramfs
//! (busybox, the virtio-pci and vsock modules, a tiny static dialer built here with rustc for
//! musl) whose guest dials host CID 2, port 1024, which must reach a listener on
//! `DIR/vsock_1024`; afterwards the daemon and QEMU are gone and their sockets removed.
//! Needs what `make setup` installs (QEMU, the kernel, busybox-static, the musl target,
//! vhost-device-vsock).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bootlace_vm::{kernel, vsock, End, VmSpec, VsockDaemon, VsockSpec};

const PORT: u32 = 1024;

/// The guest side: connect to (CID 2, argv[1]), send a line, print the reply.
const DIALER: &str = r#"
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
#[repr(C)]
struct SockaddrVm { family: u16, reserved: u16, port: u32, cid: u32, pad: [u8; 4] }
extern "C" {
    fn socket(domain: i32, ty: i32, proto: i32) -> i32;
    fn connect(fd: i32, addr: *const SockaddrVm, len: u32) -> i32;
}
fn main() {
    let port = std::env::args().nth(1).and_then(|p| p.parse().ok()).unwrap_or(1024);
    let addr = SockaddrVm { family: 40, reserved: 0, port, cid: 2, pad: [0; 4] };
    let fd = unsafe { socket(40, 1, 0) }; // AF_VSOCK, SOCK_STREAM
    if fd < 0 || unsafe { connect(fd, &addr, 16) } != 0 {
        println!("VDIAL_FAIL {}", std::io::Error::last_os_error());
        return;
    }
    let mut s = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut reply = String::new();
    match s.write_all(b"ping from guest\n").and_then(|_| s.read_to_string(&mut reply)) {
        Ok(_) => println!("VDIAL_REPLY {}", reply.trim()),
        Err(e) => println!("VDIAL_FAIL {e}"),
    }
}
"#;

/// Appends one newc entry (the output starts 4-aligned, so aligning on its length works).
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
    let ino = out.len() as u32 + 1;
    let size = data.len() as u32;
    let namesize = name.len() as u32 + 1;
    out.extend_from_slice(b"070701");
    for f in [
        ino, mode, 0, 0, 1, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
    ] {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len().next_multiple_of(4), 0);
    out.extend_from_slice(data);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// `wanted` and their dependencies from `modules.dep`, in load order, as paths under `moddir`.
fn modules_in_order(moddir: &Path, wanted: &[&str]) -> Vec<String> {
    let dep = std::fs::read_to_string(moddir.join("modules.dep")).expect("modules.dep");
    let deps_of = |m: &str| -> Vec<String> {
        let line = dep
            .lines()
            .find(|l| {
                l.split(':')
                    .next()
                    .is_some_and(|p| p.ends_with(&format!("/{m}.ko")))
            })
            .unwrap_or_else(|| panic!("{m} is not in modules.dep (built in?)"));
        let (path, deps) = line.split_once(':').expect("colon");
        // modprobe loads the listed dependencies last to first.
        let mut order: Vec<String> = deps.split_whitespace().rev().map(str::to_owned).collect();
        order.push(path.to_owned());
        order
    };
    let mut all: Vec<String> = Vec::new();
    for m in wanted.iter().flat_map(|m| deps_of(m)) {
        if !all.contains(&m) {
            all.push(m);
        }
    }
    all
}

/// Processes whose command line mentions `needle` (the daemon and QEMU name the socket dir).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) && e.file_name() != "self" && e.file_name() != "thread-self" {
                found.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    found
}

#[test]
fn a_guest_connection_reaches_the_host_listener() {
    let k = kernel::find().expect("a kernel (make setup)");
    let work = tempfile::tempdir().expect("tempdir");
    let dialer = work.path().join("vdial");
    std::fs::write(work.path().join("vdial.rs"), DIALER).expect("write dialer");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let built = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "-O",
            "--target",
            "x86_64-unknown-linux-musl",
        ])
        .args(["-C", "panic=abort", "-C", "strip=symbols", "-o"])
        .arg(&dialer)
        .arg(work.path().join("vdial.rs"))
        .status()
        .expect("rustc");
    assert!(
        built.success(),
        "building the guest dialer (make setup adds the musl target)"
    );

    let moddir = Path::new("/lib/modules").join(&k.release);
    let modules = modules_in_order(&moddir, &["virtio_pci", "vmw_vsock_virtio_transport"]);
    let mut cpio = Vec::new();
    for d in ["bin", "dev", "m", "proc", "sys"] {
        cpio_entry(&mut cpio, d, 0o040755, (0, 0), &[]);
    }
    cpio_entry(&mut cpio, "dev/console", 0o020600, (5, 1), &[]);
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    cpio_entry(
        &mut cpio,
        "bin/busybox",
        0o100755,
        (0, 0),
        &read(Path::new("/bin/busybox")),
    );
    cpio_entry(&mut cpio, "bin/vdial", 0o100755, (0, 0), &read(&dialer));
    let mut init = String::from("#!/bin/busybox sh\n/bin/busybox mount -t sysfs sys /sys\n");
    for (i, m) in modules.iter().enumerate() {
        cpio_entry(
            &mut cpio,
            &format!("m/{i}.ko"),
            0o100644,
            (0, 0),
            &read(&moddir.join(m)),
        );
        init += &format!("/bin/busybox insmod /m/{i}.ko || echo 'insmod {m} failed'\n");
    }
    init += "echo VIRTIO_DEVICES: $(/bin/busybox cat /sys/bus/virtio/devices/*/device)\n";
    init += &format!("/bin/vdial {PORT}\n/bin/busybox poweroff -f\n");
    cpio_entry(&mut cpio, "init", 0o100755, (0, 0), init.as_bytes());
    cpio_entry(&mut cpio, "TRAILER!!!", 0, (0, 0), &[]);
    let initrd = work.path().join("initrd.cpio");
    std::fs::write(&initrd, &cpio).expect("write initrd");

    // The host listener goes up before the VM: its path follows from the spec alone.
    let vsock = VsockSpec::new(work.path().join("vsock"));
    std::fs::create_dir_all(&vsock.dir).expect("mkdir");
    let listener = UnixListener::bind(vsock.port_path(PORT)).expect("bind the port listener");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line).expect("read");
        conn.write_all(b"pong from host\n").expect("reply");
        let _ = tx.send(line);
    });

    let mut spec = VmSpec::new(&k.image);
    spec.initrd = Some(initrd);
    spec.timeout = Duration::from_secs(60);
    spec.console_log = Some(Path::new(env!("CARGO_TARGET_TMPDIR")).join("vsock.console.log"));
    spec.vsock = Some(vsock.clone());
    let o = bootlace_vm::run(&spec).expect("run");
    let lines: Vec<&str> = o.console.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");

    assert_eq!(
        o.end,
        End::PoweredOff,
        "{}; console tail:\n{tail}",
        o.summary()
    );
    let devices = o.lines_with("VIRTIO_DEVICES:").next().unwrap_or_default();
    assert!(
        devices.contains("0x0013"),
        "no virtio vsock device: {devices:?}\n{tail}"
    );
    assert_eq!(
        o.lines_with("VDIAL_REPLY pong from host").count(),
        1,
        "{tail}"
    );
    let got = rx
        .recv_timeout(Duration::from_secs(1))
        .expect("the host got no connection");
    assert_eq!(got, "ping from guest\n");

    // Cleaned up: the daemon's sockets are gone, the listener's socket is the caller's, and no
    // process (daemon or QEMU) still names the directory.
    assert!(!vsock.control_socket().exists() && !vsock.uds_path().exists());
    assert!(vsock.port_path(PORT).exists());
    let left = processes_mentioning(&vsock.dir.to_string_lossy());
    assert!(left.is_empty(), "still running: {left:?}");
}

#[test]
fn the_daemon_listens_then_goes_away_with_its_sockets() {
    let work = tempfile::tempdir().expect("tempdir");
    let spec = VsockSpec::new(work.path());
    let caller_socket = UnixListener::bind(spec.port_path(PORT)).expect("bind");
    let daemon = VsockDaemon::start(&spec).expect("start vhost-device-vsock (make setup)");
    assert_eq!(daemon.uds_path(), work.path().join("vsock"));
    assert!(daemon.control_socket().exists() && daemon.uds_path().exists());
    let proc_dir = Path::new("/proc").join(daemon.pid().to_string());
    assert!(proc_dir.exists());
    // A second daemon on the same directory is refused, not allowed to steal the sockets.
    let err = VsockDaemon::start(&spec).expect_err("second daemon");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    drop(daemon);
    assert!(!proc_dir.exists(), "the daemon was not reaped");
    assert!(!spec.control_socket().exists() && !spec.uds_path().exists());
    assert!(
        spec.port_path(PORT).exists(),
        "the caller's socket must stay"
    );
    drop(caller_socket);
    assert!(vsock::find_daemon().is_ok());
}
