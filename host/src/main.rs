//! The `dmhost` command line.

use std::process::ExitCode;

use clap::Parser;

use dmhost::cli::{self, Cli};

fn main() -> ExitCode {
    let args = Cli::parse();
    // A device process forwards its log records to the host instead.
    if !matches!(args.command, cli::Command::DeviceRunner { .. }) {
        cli::init_logging(args.verbose);
    }
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("dmhost: {e}");
            ExitCode::FAILURE
        }
    }
}
