//! `bootlace-probe`: stands in for the real init in VM tests. It prints, one `PROBE key=value`
//! line each, what bootlace handed it — PID, argv, environment, signal mask and ignored
//! signals, open fds, hostname, mounts — runs `/probe.sh` if the image has one, then powers
//! off (as PID 1) or exits 0.
//!
//! It has its own C `main` (`no_main`): Rust's runtime start-up would set SIGPIPE to
//! SIG_IGN before `main`, which would hide what the init handed over.

#![no_main]

use std::io::Write;

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

/// The process entry point, called by the C runtime with the exec'd argv.
///
/// # Safety
/// `argv` must hold `argc` valid NUL-terminated strings, as the C runtime guarantees.
#[allow(unsafe_code)]
#[no_mangle]
pub unsafe extern "C" fn main(argc: i32, argv: *const *const std::ffi::c_char) -> i32 {
    let argc = usize::try_from(argc).unwrap_or(0);
    let args: Vec<String> = (0..argc)
        .map(|i| {
            // SAFETY: the C runtime passes argc valid, NUL-terminated strings in argv.
            let arg = unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) };
            arg.to_string_lossy().into_owned()
        })
        .collect();
    probe(&args);
    0
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
