//! `bootlace-probe`: stands in for the real init in VM tests. It prints, one `PROBE key=value`
//! line each, what bootlace handed it — PID, argv, environment, signal mask and ignored
//! signals, open fds, hostname, mounts — runs `/probe.sh` if the image has one, then powers
//! off (as PID 1) or exits 0.
//!
//! It has its own C `main` (`no_main`): Rust's runtime start-up would set SIGPIPE to
//! SIG_IGN before `main`, which would hide what the init handed over (stable Rust has no way
//! to keep the inherited disposition). That entry point reads nothing through its raw
//! pointers: argv comes from `/proc/self/cmdline`, since `std::env::args_os` is empty without
//! Rust's start-up on musl (glibc alone hands argv to std through `.init_array`).

#![no_main]

use std::io::Write;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// The process entry point, called by the C runtime. Exporting the symbol `main` is what the
/// `unsafe_code` lint flags; the function itself does nothing unsafe (it never reads `argv`).
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn main(_argc: i32, _argv: *const *const std::ffi::c_char) -> i32 {
    probe(&argv());
    0
}

/// The exec'd argv, from `/proc/self/cmdline` (NUL-terminated arguments).
fn argv() -> Vec<String> {
    let raw = std::fs::read("/proc/self/cmdline").unwrap_or_default();
    let raw = raw.strip_suffix(&[0]).unwrap_or(&raw);
    if raw.is_empty() {
        return Vec::new();
    }
    raw.split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn probe(argv: &[String]) {
    let mut out = Vec::new();
    let mut say = |k: &str, v: &str| {
        let _ = writeln!(out, "PROBE {k}={v}");
    };
    say("pid", &std::process::id().to_string());
    say("argv", &argv.join("|"));
    let mut env: Vec<String> = std::env::vars().map(|(k, v)| format!("{k}={v}")).collect();
    env.sort();
    say("env", &env.join("|"));
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    say("sigblk", &status_field(&status, "SigBlk:"));
    say("sigign", &status_field(&status, "SigIgn:"));
    // List fds before opening anything else; the listing's own fd is the highest one.
    let mut fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds.pop();
    say(
        "fds",
        &fds.iter().map(i32::to_string).collect::<Vec<_>>().join(","),
    );
    let uname = rustix::system::uname();
    say("hostname", &uname.nodename().to_string_lossy());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .collect();
    say("mounts", &points.join(","));
    say(
        "bootstrap_dir",
        if std::path::Path::new("/.bootstrap").exists() {
            "present"
        } else {
            "absent"
        },
    );
    let _ = std::io::stdout().write_all(&out);
    let _ = std::io::stdout().flush();
    if std::path::Path::new("/probe.sh").exists() {
        let status = std::process::Command::new("/bin/sh")
            .arg("/probe.sh")
            .status();
        println!("PROBE script={status:?}");
    }
    println!("PROBE done");
    if rustix::process::getpid().is_init() {
        rustix::fs::sync();
        let _ = rustix::system::reboot(rustix::system::RebootCommand::PowerOff);
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
}
