//! `dmhost plugins list|check`.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use clap::Subcommand;

use crate::{
    cli::CliResult,
    loader::{load_library, plugin_dirs, PluginRegistry},
};

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List the plugins found in the plugin directories.
    List,
    /// Run the ABI conformance suite against plugin libraries.
    Check {
        /// Shared libraries to check.
        #[arg(required = true)]
        libraries: Vec<PathBuf>,
    },
}

pub fn run(cmd: PluginsCommand, extra_dirs: &[PathBuf], verbose: u8) -> CliResult {
    match cmd {
        PluginsCommand::List => list(extra_dirs, verbose),
        PluginsCommand::Check { libraries } => check(&libraries),
    }
}

fn list(extra_dirs: &[PathBuf], verbose: u8) -> CliResult {
    let dirs = plugin_dirs(extra_dirs);
    let start = Instant::now();
    let (registry, errors) = PluginRegistry::discover(&dirs);
    let elapsed = start.elapsed();
    for p in registry.plugins() {
        println!(
            "{:<12} {:<8} kinds={:<20} {}",
            p.name,
            p.version,
            p.kind_names().join(","),
            p.path.display()
        );
        for d in &p.vfio_drivers {
            println!("{:>12} vfio driver {} ({:04x}:{:04x})", "", d.name, d.vendor_id, d.device_id);
        }
        if verbose > 0 {
            println!("{:>12} loaded and ABI-checked in {:.3} ms", "", p.load_time.as_secs_f64() * 1e3);
        }
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    if verbose > 0 {
        println!(
            "{} plugins loaded in {:.3} ms from {}",
            registry.plugins().len(),
            elapsed.as_secs_f64() * 1e3,
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
        );
    }
    Ok(if errors.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn check(libraries: &[PathBuf]) -> CliResult {
    let (mut passed, mut failed) = (0, 0);
    for lib in libraries {
        let target = lib.display().to_string();
        let report = match load_library(lib) {
            Ok(plugin) => {
                // Vendor VFIO drivers the library's devices may open come
                // from the libraries beside it, as a host would load them.
                let dir = match lib.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                    _ => PathBuf::from("."),
                };
                let (siblings, _) = PluginRegistry::discover(&[dir]);
                let mut drivers = vec![plugin.module];
                drivers.extend(siblings.plugins().iter().map(|p| p.module));
                abi_suite::check_module_with(&target, plugin.module, &drivers)
            }
            Err(e) => abi_suite::Report::load_failure(&target, &e.to_string()),
        };
        print!("{report}");
        passed += report.passed();
        failed += report.failed();
    }
    println!("summary: {passed} passed, {failed} failed");
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
