//! `bootlace-agent`: the host side of the bootstrap conversation.
//!
//! Today: `bootlace-agent exit-status CONSOLE_LOG` prints the status a guest reported on its
//! console (exit 0), or exits 1 when the log has none. The vsock configuration manager
//! (`serve`, `wait-ready`) comes with the vsock protocol.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
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

#[derive(Subcommand, Debug)]
enum Cmd {
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
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::ExitStatus { log } => {
            let bytes = std::fs::read(&log).with_context(|| format!("read {}", log.display()))?;
            match bootlace_agent::report::parse_exit_status(&String::from_utf8_lossy(&bytes)) {
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
