//! `dmhost acpi dump CONFIG DIR`: write every ACPI table a configuration
//! gets at boot as `DIR/<SIG>.dat` (RSDP, XSDT, FACP, DSDT, APIC,
//! SSDT1.., NFIT), the form `iasl -d` and `acpiexec` read. No KVM needed:
//! the devices are created from their plugins and placed offline.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::{
    acpi_host::offline::tables_for_config,
    cli::CliResult,
    config::VmFileConfig,
    loader::{plugin_dirs, PluginRegistry},
};

#[derive(Debug, Subcommand)]
pub enum AcpiCommand {
    /// Write every table of CONFIG to DIR as <SIG>.dat (SSDTs numbered).
    Dump {
        /// The VM configuration (TOML).
        config: PathBuf,
        /// Output directory (created when missing).
        dir: PathBuf,
    },
}

pub fn run(cmd: AcpiCommand, extra_dirs: &[PathBuf]) -> CliResult {
    match cmd {
        AcpiCommand::Dump { config, dir } => {
            let config = VmFileConfig::load(&config)?;
            let mut dirs = extra_dirs.to_vec();
            dirs.extend(config.plugin_dirs.iter().cloned());
            let (registry, errors) = PluginRegistry::discover(&plugin_dirs(&dirs));
            for e in errors {
                log::warn!("{e}");
            }
            let built = tables_for_config(&config, &registry).map_err(|e| crate::run::chain(&e))?;
            built
                .image
                .dump(&dir)
                .map_err(|e| format!("cannot write the tables to {}: {e}", dir.display()))?;
            for t in &built.image.tables {
                println!("{}.dat\t{:#x}\t{} bytes", t.name, t.gpa, t.len);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
