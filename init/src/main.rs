//! `bootlace-init`: as PID 1 it boots the guest and never returns; run by hand it checks a
//! configuration (`bootlace-init check [--config FILE] [--cmdline LINE]`).

#![deny(
    unsafe_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::ExitCode;

use bootlace_init::{boot, config};

const USAGE: &str = "\
usage: bootlace-init                 (as PID 1: boot this machine)
       bootlace-init check [--config FILE] [--cmdline LINE]
                                     print the effective configuration, or why it is refused
       bootlace-init --version";

fn main() -> ExitCode {
    if bootlace_init::sys::is_pid1() {
        boot::pid1();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!("bootlace-init {}", boot::VERSION);
            ExitCode::SUCCESS
        }
        Some("check") => check(args.get(1..).unwrap_or_default()),
        _ => {
            eprintln!("bootlace-init: not PID 1\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn check(args: &[String]) -> ExitCode {
    let mut path = PathBuf::from(config::CONFIG_PATH);
    let mut cmdline = String::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--config", Some(v)) => path = PathBuf::from(v),
            ("--cmdline", Some(v)) => cmdline = v.clone(),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let loaded = config::load(&path, &cmdline);
    match loaded.error {
        Some(e) => {
            eprintln!("bootlace-init: {}", boot::chain(&e));
            ExitCode::FAILURE
        }
        None => {
            print!("{}", loaded.config.to_toml());
            ExitCode::SUCCESS
        }
    }
}
