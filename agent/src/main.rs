//! `bootlace-agent`: the host configuration manager.
//!
//! - `serve`: serve a bundle to guests and print what each reports, until killed;
//! - `wait-ready`: the same, ending with exit 0 when a guest reports READY, 1 on FAILED
//!   (its reason printed), 2 when the timeout passes;
//! - `exit-status LOG`: the EXIT_STATUS a guest printed on its console.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bootlace_agent::host::{self, BundleSource, Event, GuestEvent, Host};
use bootlace_contract::protocol::{Kind, DEFAULT_PORT};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bootlace-agent",
    version,
    about = "Host side of the bootlace guest conversation"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug)]
struct Listen {
    /// Hybrid-vsock base path (vhost-device-vsock `uds-path`); listens on `<PATH>_<port>`.
    #[arg(long)]
    uds: Vec<PathBuf>,
    /// The port guests dial (CID 2).
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u32,
    /// Also listen on AF_VSOCK at --port (hosts with /dev/vhost-vsock).
    #[arg(long)]
    vsock: bool,
    /// Bundle to serve: a tarball (tar, tar.gz, tar.zst) or a directory tarred on the fly.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// One JSON object per event instead of text.
    #[arg(long)]
    json: bool,
    /// Misbehave on purpose to test guests (repeatable); `--help` lists the kinds.
    #[arg(long = "fault", value_name = "KIND[=ARG]", value_parser = parse_fault,
          long_help = bootlace_agent::fault::FAULT_LONG_HELP)]
    faults: Vec<String>,
}

fn parse_fault(s: &str) -> Result<String, String> {
    host::Faults::default().add(s)?;
    Ok(s.to_owned())
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve guests until killed.
    Serve(Listen),
    /// Serve until a guest is READY (exit 0), FAILED (exit 1) or the timeout passes (exit 2).
    WaitReady {
        #[command(flatten)]
        listen: Listen,
        /// Seconds to wait.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Print the EXIT_STATUS a guest reported on its console (exit 1 when there is none).
    ExitStatus {
        /// A console log (as written by `bootlace-vm run --console-log`).
        log: PathBuf,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bootlace-agent: error: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn start(l: &Listen) -> anyhow::Result<mpsc::Receiver<GuestEvent>> {
    if l.uds.is_empty() && !l.vsock {
        bail!("nothing to listen on: give --uds PATH and/or --vsock");
    }
    let bundle = match &l.bundle {
        Some(p) => {
            let b = BundleSource::from_path(p)?;
            eprintln!("bootlace-agent: serving {} ({})", p.display(), b.summary());
            Some(b)
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let faults = host::Faults::parse_all(&l.faults).map_err(anyhow::Error::msg)?;
    if faults.any() {
        eprintln!("bootlace-agent: injecting faults: {}", l.faults.join(" "));
    }
    let host = Arc::new(
        Host::new(bundle, move |e| {
            let _ = tx.lock().map(|t| t.send(e));
        })
        .with_faults(faults),
    );
    for uds in &l.uds {
        let path = host::hybrid_path(uds, l.port);
        host.serve_unix(&path)
            .with_context(|| format!("listen on {}", path.display()))?;
        eprintln!("bootlace-agent: listening on {}", path.display());
    }
    if l.vsock {
        host::serve_vsock(&host, l.port)
            .with_context(|| format!("listen on AF_VSOCK port {}", l.port))?;
        eprintln!("bootlace-agent: listening on vsock port {}", l.port);
    }
    Ok(rx)
}

fn print(l: &Listen, e: &GuestEvent) {
    if l.json {
        println!("{}", host::to_json(e));
    } else {
        println!("[{}] {}", e.guest, host::describe(&e.event));
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::Serve(l) => {
            let rx = start(&l)?;
            for e in rx {
                print(&l, &e);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::WaitReady { listen, timeout } => {
            let rx = start(&listen)?;
            let deadline = Instant::now() + Duration::from_secs(timeout);
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let e = match rx.recv_timeout(left) {
                    Ok(e) => e,
                    Err(_) => {
                        eprintln!("bootlace-agent: no guest was ready within {timeout} s");
                        return Ok(ExitCode::from(2));
                    }
                };
                print(&listen, &e);
                if let Event::Report(f) = &e.event {
                    match f.kind {
                        Kind::Ready => return Ok(ExitCode::SUCCESS),
                        Kind::Failed => {
                            eprintln!(
                                "bootlace-agent: {} failed: {}",
                                e.guest,
                                f.get("STATUS").unwrap_or("no reason given")
                            );
                            return Ok(ExitCode::from(1));
                        }
                        _ => {}
                    }
                }
            }
        }
        Cmd::ExitStatus { log } => {
            let bytes = std::fs::read(&log).with_context(|| format!("read {}", log.display()))?;
            match bootlace_contract::status::parse_exit_status(&String::from_utf8_lossy(&bytes)) {
                Some(s) => {
                    println!("{s}");
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!(
                        "bootlace-agent: {} has no power-off status line",
                        log.display()
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}
