//! `bootlace-init`: as PID 1 it boots the guest and never returns; run by hand it checks a
//! configuration (`bootlace-init check [--config FILE] [--cmdline LINE]`).
//!
//! Exit codes when run by hand: 0 the configuration is valid (it is printed), 1 it is refused
//! (the reason is printed), 2 the command line is wrong.

#![deny(
    unsafe_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use bootlace_contract::config::{self, IfMissing};
use bootlace_init::boot;

const USAGE: &str = "\
usage: bootlace-init                 as PID 1: boot this machine
       bootlace-init check [--config FILE] [--cmdline LINE]
                                     print the effective configuration, or why it is refused
                                     (FILE defaults to /etc/bootlace/init.toml, where a missing
                                     file means the built-in defaults; a FILE named that does
                                     not exist is an error)
       bootlace-init takeover-check      the self-check of a newer init about to take over PID 1:
                                     prints `bootlace-init VERSION takeover STATE-VERSIONS`
                                     when it accepts this machine's configuration
       bootlace-init --version
       bootlace-init --help

exit codes: 0 valid, 1 refused, 2 usage error";

/// A command line that is not one of the forms in [`USAGE`].
#[derive(Debug)]
struct Usage(String);

/// What was asked for.
#[derive(Debug)]
enum Request {
    Help,
    Version,
    TakeoverCheck,
    Check {
        config: Option<PathBuf>,
        /// Raw bytes, as /proc/cmdline has them (only `bootlace.*` keys must be UTF-8).
        cmdline: Vec<u8>,
    },
}

fn main() -> ExitCode {
    if bootlace_init::sys::is_pid1() {
        boot::pid1();
    }
    match parse(std::env::args_os().skip(1).collect()) {
        Ok(Request::Help) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Ok(Request::Version) => {
            println!("bootlace-init {}", bootlace_init::VERSION);
            ExitCode::SUCCESS
        }
        Ok(Request::Check { config, cmdline }) => check(config, &cmdline),
        Ok(Request::TakeoverCheck) => takeover_check(),
        Err(Usage(why)) => {
            eprintln!("bootlace-init: {why}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn parse(args: Vec<OsString>) -> Result<Request, Usage> {
    let utf8 = |a: OsString| {
        a.into_string()
            .map_err(|a| Usage(format!("argument {a:?} is not UTF-8")))
    };
    let mut it = args.into_iter();
    let first = match it.next() {
        None => return Err(Usage("not PID 1: nothing to do".to_owned())),
        Some(a) => utf8(a)?,
    };
    match first.as_str() {
        "--help" | "-h" | "help" => return Ok(Request::Help),
        "--version" | "-V" => return Ok(Request::Version),
        "check" => {}
        bootlace_contract::takeover::CHECK_COMMAND => return Ok(Request::TakeoverCheck),
        other => return Err(Usage(format!("unknown command {other:?}"))),
    }
    let (mut config, mut cmdline) = (None, Vec::new());
    while let Some(flag) = it.next() {
        let flag = utf8(flag)?;
        if flag == "--help" || flag == "-h" {
            return Ok(Request::Help);
        }
        let value = it
            .next()
            .ok_or_else(|| Usage(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--config" => config = Some(PathBuf::from(value)),
            "--cmdline" => cmdline = std::os::unix::ffi::OsStringExt::into_vec(value),
            _ => return Err(Usage(format!("unknown option {flag:?}"))),
        }
    }
    Ok(Request::Check { config, cmdline })
}

/// The self-check a running init asks of this one before handing PID 1 over to it: this build
/// runs here, and takes the machine's configuration (the file and the kernel command line).
fn takeover_check() -> ExitCode {
    let cmdline = std::fs::read("/proc/cmdline").unwrap_or_default();
    let loaded = config::load(
        std::path::Path::new(config::CONFIG_PATH),
        &cmdline,
        IfMissing::Defaults,
    );
    if let Some(e) = loaded.error {
        eprintln!("bootlace-init: {}", bootlace_contract::chain(&e));
        return ExitCode::FAILURE;
    }
    println!(
        "{}",
        bootlace_contract::takeover::check_line(bootlace_init::VERSION)
    );
    ExitCode::SUCCESS
}

fn check(path: Option<PathBuf>, cmdline: &[u8]) -> ExitCode {
    let (path, if_missing) = match path {
        Some(p) => (p, IfMissing::Error),
        None => (PathBuf::from(config::CONFIG_PATH), IfMissing::Defaults),
    };
    let loaded = config::load(&path, cmdline, if_missing);
    match loaded.error {
        Some(e) => {
            eprintln!("bootlace-init: {}", bootlace_contract::chain(&e));
            ExitCode::FAILURE
        }
        None => {
            if loaded.config.vsock_trusts_only_boot_digests() {
                eprintln!(
                    "bootlace-init: warning: the vsock source has nothing to trust a bundle by \
                     but a digest given at boot (bootlace.digest=, SMBIOS type 11 \
                     io.bootlace.digest, fw_cfg opt/io.bootlace/digest): without one the boot \
                     fails (docs/security.md)"
                );
            }
            print!("{}", loaded.config.to_toml());
            ExitCode::SUCCESS
        }
    }
}
