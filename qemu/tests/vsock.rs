//! vsock end to end, without the project's init: the Debian kernel boots a hand-made initramfs
//! (busybox, the virtio-pci and vsock modules, and socat with its libraries) whose guest dials
//! host CID 2, port 1024, which must reach a listener on `DIR/vsock_1024`; afterwards the daemon
//! and QEMU are gone and their sockets removed. Needs what `make setup` installs (QEMU, the
//! kernel, busybox-static, socat, vhost-device-vsock).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bootlace_contract::kmod::{ModuleIndex, Resolved};
use bootlace_image::cpio::{self, Header, Kind};
use bootlace_vm::{kernel, vsock, End, VmSpec, VsockDaemon, VsockSpec};

const PORT: u32 = 1024;

/// An initramfs under construction: bootlace-image's newc writer, with the parent directories
/// of every file added before it.
struct Initramfs {
    cpio: cpio::Writer<Vec<u8>>,
    dirs: BTreeSet<String>,
}

impl Initramfs {
    fn new() -> Self {
        Initramfs {
            cpio: cpio::Writer::new(Vec::new()),
            dirs: BTreeSet::new(),
        }
    }

    fn add(&mut self, name: &str, kind: Kind, perm: u32, data: Option<&[u8]>) {
        let mut at = 0;
        while let Some(i) = name[at..].find('/') {
            let dir = &name[..at + i];
            if self.dirs.insert(dir.to_owned()) {
                self.add(dir, Kind::Dir, 0o755, None);
            }
            at += i + 1;
        }
        let h = Header {
            name: name.to_owned(),
            kind,
            perm,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let mut data = data;
        let reader = data.as_mut().map(|d| d as &mut dyn std::io::Read);
        self.cpio.entry(&h, reader).expect("cpio entry");
    }

    fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_owned()) {
            self.add(name, Kind::Dir, 0o755, None);
        }
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        let size = data.len() as u64;
        self.add(name, Kind::File { size }, perm, Some(data));
    }

    /// A host file at the same path in the image.
    fn host_file(&mut self, path: &str, perm: u32) {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        self.file(path.trim_start_matches('/'), perm, &data);
    }

    fn finish(self) -> Vec<u8> {
        self.cpio.finish().expect("cpio trailer")
    }
}

/// The shared libraries `bin` needs, as `ldd` lists them (the loader included).
fn libraries(bin: &str) -> Vec<String> {
    let out = Command::new("ldd").arg(bin).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(str::to_owned)
        .collect()
}

/// `wanted` and their dependencies, in load order, as paths relative to `moddir`.
fn modules_in_order(moddir: &Path, wanted: &[&str]) -> Vec<String> {
    let index = ModuleIndex::read(moddir).expect("modules.dep");
    let resolved = index.resolve(wanted.iter().copied()).expect("resolve");
    resolved
        .into_iter()
        .filter_map(|r| match r {
            Resolved::Load(m) => Some(m.path),
            Resolved::Builtin(_) => None,
        })
        .collect()
}

/// The guest: load the modules, list the virtio devices, send a line to host port [`PORT`]
/// with socat and print the reply, power off.
fn initramfs(moddir: &Path, modules: &[String]) -> Vec<u8> {
    let mut img = Initramfs::new();
    for d in ["bin", "dev", "m", "proc", "sys"] {
        img.dir(d);
    }
    img.add(
        "dev/console",
        Kind::CharDev { major: 5, minor: 1 },
        0o600,
        None,
    );
    img.file(
        "bin/busybox",
        0o755,
        &std::fs::read("/bin/busybox").expect("/bin/busybox (make setup)"),
    );
    img.host_file("/usr/bin/socat", 0o755);
    for lib in libraries("/usr/bin/socat") {
        img.host_file(&lib, 0o755);
    }
    let mut init = String::from("#!/bin/busybox sh\n/bin/busybox mount -t sysfs sys /sys\n");
    for (i, m) in modules.iter().enumerate() {
        let ko = std::fs::read(moddir.join(m)).unwrap_or_else(|e| panic!("{m}: {e}"));
        img.file(&format!("m/{i}.ko"), 0o644, &ko);
        init += &format!("/bin/busybox insmod /m/{i}.ko || echo 'insmod {m} failed'\n");
    }
    init += "echo VIRTIO_DEVICES: $(/bin/busybox cat /sys/bus/virtio/devices/*/device)\n";
    // socat's own status is no use: the host closes right after its reply, which socat may
    // report as a read error. The reply is what counts; socat's errors reach the console.
    init += &format!(
        "reply=$(echo 'ping from guest' | /usr/bin/socat -t 5 - VSOCK-CONNECT:2:{PORT})\n\
         if [ -n \"$reply\" ]; then echo \"VDIAL_REPLY $reply\"; else echo VDIAL_FAIL; fi\n"
    );
    init += "/bin/busybox poweroff -f\n";
    img.file("init", 0o755, init.as_bytes());
    img.finish()
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
    let moddir = Path::new("/lib/modules").join(&k.release);
    let modules = modules_in_order(&moddir, &["virtio_pci", "vmw_vsock_virtio_transport"]);
    let initrd = work.path().join("initrd.cpio");
    std::fs::write(&initrd, initramfs(&moddir, &modules)).expect("write initrd");

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
