//! Command-line parsing and dispatch; each subcommand lives in its own module.

mod acpi;
mod migrate;
mod plugins;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// A plugin-based virtual-machine device-model host.
#[derive(Debug, Parser)]
#[command(name = "dmhost", version, about)]
pub struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Extra plugin directories (also DMHOST_PLUGIN_PATH, `:`-separated).
    #[arg(long = "plugin-dir", global = true)]
    pub plugin_dirs: Vec<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Inspect and check plugin libraries.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
    /// Run a VM from a configuration file; exits with the guest's exit code.
    Run(crate::run::RunArgs),
    /// ACPI tables of a configuration.
    #[command(subcommand)]
    Acpi(acpi::AcpiCommand),
    /// Migrate a running VM (through its control socket) to another host process.
    Migrate(migrate::MigrateArgs),
    /// Internal: run one plugin device in this process, for a host that
    /// spawned it (`isolation = "process"`).
    #[command(hide = true)]
    DeviceRunner {
        #[arg(long)]
        io_fd: i32,
        #[arg(long)]
        svc_fd: i32,
    },
}

/// Errors a subcommand reports before exiting non-zero.
pub type CliResult = Result<ExitCode, Box<dyn std::error::Error>>;

pub fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let env = env_logger::Env::default().default_filter_or(level);
    let _ = env_logger::Builder::from_env(env).format_timestamp_millis().try_init();
}

pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Plugins(cmd) => plugins::run(cmd, &cli.plugin_dirs, cli.verbose),
        Command::Run(args) => crate::run::run(args, &cli.plugin_dirs),
        Command::Acpi(cmd) => acpi::run(cmd, &cli.plugin_dirs),
        Command::Migrate(args) => migrate::run(args),
        Command::DeviceRunner { io_fd, svc_fd } => {
            crate::remote::runner::run(io_fd, svc_fd)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
