//! `bootlace-floor`: the benchmark's floor — the least a PID 1 can do for the host to learn
//! it is up. It loads the kernel modules listed (paths, in order) in `/floor-modules` (or the
//! file `floor.modules=PATH` on the kernel command line names), dials
//! the host (vsock CID 2, port 1024), says `READY=1` with its CLOCK_BOOTTIME stamps, waits
//! for the ack, and powers off. With `floor.raw=N` on the kernel command line it first reads N
//! raw bytes from host port 1025 (the transport's own throughput) and reports the time taken;
//! with `floor.hash=1` as well it also computes their sha256 (the digest's own cost).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};

fn boottime_ns() -> u128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    (t.tv_sec as u128) * 1_000_000_000 + t.tv_nsec as u128
}

fn dial(port: u32) -> std::fs::File {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(fd) = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        ) {
            if connect(fd.as_raw_fd(), &VsockAddr::new(2, port)).is_ok() {
                return std::fs::File::from(fd);
            }
        }
        if Instant::now() > deadline {
            off();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn off() -> ! {
    rustix::fs::sync();
    let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

fn main() {
    let entry = boottime_ns();
    let _ = rustix::mount::mount(
        "proc",
        "/proc",
        "proc",
        rustix::mount::MountFlags::empty(),
        None,
    );
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let list = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("floor.modules="))
        .unwrap_or("/floor-modules");
    for path in std::fs::read_to_string(list).unwrap_or_default().lines() {
        if let Ok(f) = std::fs::File::open(path) {
            let _ = rustix::system::finit_module(&f, c"", 0);
        }
    }
    let raw: Option<u64> = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("floor.raw=")?.parse().ok());
    let hash = cmdline.split_whitespace().any(|w| w == "floor.hash=1");
    let mut payload = format!("READY=1\nENTRY_NS={entry}\n");
    if let Some(n) = raw {
        let mut s = dial(1025);
        let started = Instant::now();
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = n;
        let mut hasher = sha2::Sha256::default();
        while left > 0 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    if hash {
                        sha2::Digest::update(&mut hasher, buf.get(..k).unwrap_or(&[]));
                    }
                    left = left.saturating_sub(k as u64);
                }
            }
        }
        payload.push_str(&format!(
            "RAW_BYTES={}\nRAW_NS={}\n",
            n - left,
            started.elapsed().as_nanos()
        ));
    }
    let mut s = dial(1024);
    payload.push_str(&format!("BOOTTIME_NS={}\n", boottime_ns()));
    // Every connection starts with HELLO (a host believes nothing before it).
    let hello = "PROTOCOL=1\n";
    let frame = format!(
        "BL1 HELLO 0 {}\n{hello}BL1 READY 1 {}\n{payload}",
        hello.len(),
        payload.len()
    );
    let _ = s.write_all(frame.as_bytes());
    // Until READY's ack (after HELLO's), so READY is not lost in the power-off.
    let mut acks = Vec::new();
    let mut buf = [0u8; 64];
    while !String::from_utf8_lossy(&acks).contains("ACK 1 ") && acks.len() < 4096 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => acks.extend_from_slice(buf.get(..k).unwrap_or(&[])),
        }
    }
    off()
}
