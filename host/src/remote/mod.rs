//! Devices in their own process (`isolation = "process"`).
//!
//! The host spawns `dmhost device-runner`, which loads the plugin and
//! creates the device there. Guest I/O and config-space accesses go to it
//! over a UNIX socket ([`proto`]); host services the device calls come back
//! over a second socket and are checked by the device's own host services
//! in the host, so the device process can touch only what its device owns.
//! A device memory backend is shared as its memfd (SCM_RIGHTS), and so is
//! RAM the device registers for migration: the host maps the file itself
//! ([`resources`]); INTx lines are raised directly through the line's irqfd
//! ([`runner`]), other irqfds are registered by the host from descriptors
//! the device sends. Migration handlers and ACPI parts are forwarded
//! (sections larger than a message in parts); the device process's `log`
//! records reach the host's logger, rate-limited.

pub mod proto;
pub mod proxy;
pub mod resources;
pub mod runner;

use std::path::PathBuf;

use dmhost_plugin_api::{Host, PluginError};

pub use proxy::{RemoteDevice, RemoteSpec};

use crate::{
    config::Isolation,
    devices::{DeviceFactory, DeviceImpl, DeviceInfo},
    vm::{Vm, VmError},
};

/// Overrides where the runner executable is (default: the `dmhost` binary).
pub const RUNNER_ENV: &str = "DMHOST_DEVICE_RUNNER";

/// The executable that runs `device-runner`: `$DMHOST_DEVICE_RUNNER`, this
/// binary when it is `dmhost`, or a `dmhost` beside it (or one directory up,
/// for test binaries in `target/*/deps`).
pub fn runner_path() -> Result<PathBuf, PluginError> {
    if let Some(p) = std::env::var_os(RUNNER_ENV) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().map_err(|e| PluginError::io(format!("current executable: {e}")))?;
    if exe.file_name().is_some_and(|n| n == "dmhost") {
        return Ok(exe);
    }
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    [dir.join("dmhost"), dir.join("../dmhost")].into_iter().find(|p| p.is_file()).ok_or_else(|| {
        PluginError::io(format!("no dmhost runner found near {}; set {RUNNER_ENV}", exe.display()))
    })
}

/// Create device `id` with `factory` in this process, or in its own
/// process for `Isolation::Process`, and add it to `vm`.
pub fn add_device(
    vm: &Vm,
    factory: &dyn DeviceFactory,
    kind: &str,
    id: &str,
    config: &str,
    isolation: Isolation,
) -> Result<DeviceInfo, VmError> {
    let shared = std::sync::Arc::downgrade(vm.shared());
    vm.add_device(kind, id, |host: Host| match isolation {
        Isolation::None => factory.create(kind, id, config, host),
        Isolation::Process => {
            let library = factory
                .library_path(kind)
                .ok_or_else(|| PluginError::unsupported(format!("no plugin library provides {kind:?}")))?;
            let spec = RemoteSpec {
                runner: runner_path()?,
                library,
                kind: kind.to_owned(),
                id: id.to_owned(),
                config: config.to_owned(),
            };
            RemoteDevice::spawn(&spec, host, shared).map(|d| DeviceImpl::Remote(Box::new(d)))
        }
    })
}
