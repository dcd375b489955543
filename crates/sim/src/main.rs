//! `licensing-sim`: the development licensing server (a simulator of the vendor's
//! CIC server / Voucher Center). See the crate's documentation and
//! docs/licensing-server.md.

use clap::Parser as _;
use licensing_sim::cli::{Cli, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Logs go to stderr: stdout carries the lines tests and scripts read.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("licensing-sim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
