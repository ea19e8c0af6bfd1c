//! `dmhost run CONFIG`: build the VM from a config file, plug its devices
//! (found by the plugin loader), load the guest program, print the guest's
//! serial output and exit with the guest's exit code.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use clap::Args;

use crate::{
    cli::CliResult,
    config::{ConfigError, VmFileConfig},
    control::{register_vm_commands, CommandRegistry, ControlError, ControlServer},
    guest::{GuestError, GuestProgram},
    loader::{plugin_dirs, PluginRegistry},
    vm::{
        vcpu::{stdout_serial, VmExit},
        Vm, VmConfig, VmError,
    },
};

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VM configuration (TOML).
    pub config: PathBuf,
    /// Serve the control socket (JSON lines, QMP commands) at this path.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Stop the VM (exit status 124) if it is still running after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Wait for an incoming migration (tcp:HOST:PORT, unix:PATH, or
    /// file:PATH to restore a snapshot) instead of loading the program.
    #[arg(long)]
    pub incoming: Option<crate::migration::MigrationUri>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}; dmhost run needs KVM")]
    NoKvm(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Program(#[from] GuestError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("{0}")]
    Vm(String),
    #[error("the guest failed: {0}")]
    GuestFailed(String),
    #[error(transparent)]
    Acpi(#[from] crate::acpi_host::AcpiHostError),
    #[error("incoming migration: {0}")]
    Incoming(String),
}

/// One line: the error and its sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = c.source();
    }
    s
}

impl From<VmError> for RunError {
    fn from(e: VmError) -> Self {
        RunError::Vm(chain(&e))
    }
}

/// Overrides the KVM device checked by [`kvm_available`] (tests use it to
/// see the no-KVM error).
pub const KVM_DEVICE_ENV: &str = "DMHOST_KVM_DEVICE";

/// Whether KVM can be used here; `Err` says why not, in one line.
pub fn kvm_available() -> Result<(), String> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".to_owned());
    match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{path} is not available ({e})")),
    }
}

/// Load the VM from an incoming migration; the guest resumes where the
/// source stopped it.
fn receive(
    vm: &Vm,
    uri: &crate::migration::MigrationUri,
    progress: Arc<crate::migration::progress::Progress>,
) -> Result<(), RunError> {
    let incoming = |e: &dyn std::error::Error| RunError::Incoming(chain(e));
    let listener = crate::migration::listen(uri).map_err(|e| incoming(&e))?;
    // Scripts and tests read this line to learn the port of `tcp:…:0`.
    eprintln!("dmhost: waiting for an incoming migration on {}", listener.uri());
    crate::migration::dest::incoming_with(vm, listener, progress).map_err(|e| incoming(&e))?;
    Ok(())
}

pub fn run(args: RunArgs, extra_dirs: &[PathBuf]) -> CliResult {
    match run_vm(&args, extra_dirs) {
        Ok(code) => Ok(code),
        Err(e) => Err(chain(&e).into()),
    }
}

fn run_vm(args: &RunArgs, extra_dirs: &[PathBuf]) -> Result<ExitCode, RunError> {
    let config = VmFileConfig::load(&args.config)?;
    kvm_available().map_err(RunError::NoKvm)?;
    let program = GuestProgram::from_spec(&config.program, Some(&config.base_dir))?;

    let mut dirs: Vec<PathBuf> = extra_dirs.to_vec();
    dirs.extend(config.plugin_dirs.iter().cloned());
    let (registry, errors) = PluginRegistry::discover(&plugin_dirs(&dirs));
    for e in errors {
        log::warn!("{e}");
    }
    let registry: Arc<PluginRegistry> = Arc::new(registry);

    let vm = Arc::new(Vm::new(VmConfig {
        ram_size: config.ram_size,
        vcpus: config.vcpus,
        serial: stdout_serial(),
    })?);
    vm.set_vfio_drivers(Arc::clone(&registry) as _);
    for d in &config.devices {
        if let Some(slot) = d.pci_slot {
            vm.shared()
                .pci
                .reserve(&d.id, slot)
                .map_err(|e| RunError::Vm(format!("device {}: {e}", d.id)))?;
        }
        crate::remote::add_device(&vm, &*registry, &d.kind, &d.id, &d.config, d.isolation)?;
    }
    // ACPI tables for the boot devices; rebuilt on every hot-plug.
    let acpi = crate::acpi_host::AcpiHost::install(&vm, config.vcpus, config.acpi.clone())?;
    // A guest _EJ0 unplugs the DIMM. Not on the vCPU thread that made the
    // request (it holds the bus), and through a weak reference: the VM
    // owns the ACPI host.
    let weak = Arc::downgrade(&vm);
    acpi.on_eject(Box::new(move |id| {
        let weak = weak.clone();
        std::thread::spawn(move || {
            if let Some(vm) = weak.upgrade() {
                if let Err(e) = vm.remove_device(&id) {
                    log::warn!("ACPI eject of {id}: {e}");
                }
            }
        });
    }));
    let commands = Arc::new(CommandRegistry::new());
    register_vm_commands(
        &commands,
        Arc::clone(&vm),
        Arc::clone(&registry) as Arc<dyn crate::devices::DeviceFactory>,
    );
    let migration = crate::migration::commands::register(&commands, Arc::clone(&vm));
    crate::migration::debug_commands::register(&commands, Arc::clone(&vm));
    crate::pci::irq::register_commands(&commands, Arc::clone(&vm));
    let _server = match &args.control {
        Some(path) => Some(ControlServer::start(path, Arc::clone(&commands))?),
        None => None,
    };
    match &args.incoming {
        Some(uri) => receive(&vm, uri, migration)?,
        None => vm.load_program(&program, &config.regs)?,
    }

    vm.start()?;
    let exit = match args.timeout {
        Some(secs) if secs.is_finite() && secs > 0.0 => {
            match vm.control().wait_timeout(Duration::from_secs_f64(secs.min(1e9))) {
                Some(e) => e,
                None => {
                    vm.stop(VmExit::Failed(format!("timed out after {secs} s")));
                    vm.wait();
                    return Ok(ExitCode::from(124));
                }
            }
        }
        _ => vm.control().wait(),
    };
    let exit = match exit {
        VmExit::Failed(_) => exit,
        _ => vm.wait(),
    };
    log::info!("vm stopped: {exit:?} after {} exits", vm.exit_count());
    match exit {
        VmExit::Guest(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(255))),
        VmExit::Requested => Ok(ExitCode::SUCCESS),
        VmExit::Failed(msg) => {
            vm.wait();
            Err(RunError::GuestFailed(msg))
        }
    }
}
