//! The migration handlers of a device, whichever way it is implemented
//! (a plugin behind the ABI, a model linked into the host, or a plugin in
//! its own process, to which every handler is forwarded).

use dmhost_plugin_api::{PendingSize, PluginError, RSlice, SaveChunk};

use crate::devices::DeviceImpl;

/// QEMU's SaveVMHandlers, as the engine calls them on one device.
pub trait MigrationOps {
    fn state_version(&mut self) -> u32;
    fn save_setup(&mut self) -> Result<(), PluginError>;
    fn state_pending_estimate(&mut self) -> Result<PendingSize, PluginError>;
    fn state_pending_exact(&mut self) -> Result<PendingSize, PluginError>;
    fn is_active_iterate(&mut self) -> bool;
    fn save_live_iterate(&mut self) -> Result<SaveChunk, PluginError>;
    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError>;
    fn save_cleanup(&mut self);
    fn load_setup(&mut self) -> Result<(), PluginError>;
    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError>;
    fn load_cleanup(&mut self) -> Result<(), PluginError>;
    fn vm_state_changed(&mut self, running: bool) -> Result<(), PluginError>;
}

impl MigrationOps for DeviceImpl {
    fn state_version(&mut self) -> u32 {
        match self {
            DeviceImpl::Plugin(d) => d.state_version(),
            DeviceImpl::Builtin(d) => d.state_version(),
            DeviceImpl::Remote(d) => d.state_version().unwrap_or_else(|e| {
                log::warn!("migration: device process state version: {e}");
                0
            }),
        }
    }
    fn save_setup(&mut self) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.save_setup().into_result(),
            DeviceImpl::Builtin(d) => d.save_setup(),
            DeviceImpl::Remote(d) => d.save_setup(),
        }
    }
    fn state_pending_estimate(&mut self) -> Result<PendingSize, PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.state_pending_estimate().into_result(),
            DeviceImpl::Builtin(d) => Ok(d.state_pending_estimate()),
            DeviceImpl::Remote(d) => d.state_pending_estimate(),
        }
    }
    fn state_pending_exact(&mut self) -> Result<PendingSize, PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.state_pending_exact().into_result(),
            DeviceImpl::Builtin(d) => Ok(d.state_pending_exact()),
            DeviceImpl::Remote(d) => d.state_pending_exact(),
        }
    }
    fn is_active_iterate(&mut self) -> bool {
        match self {
            DeviceImpl::Plugin(d) => d.is_active_iterate(),
            DeviceImpl::Builtin(d) => d.is_active_iterate(),
            DeviceImpl::Remote(d) => d.is_active_iterate().unwrap_or_else(|e| {
                log::warn!("migration: device process is_active_iterate: {e}");
                false
            }),
        }
    }
    fn save_live_iterate(&mut self) -> Result<SaveChunk, PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.save_live_iterate().into_result(),
            DeviceImpl::Builtin(d) => d.save_live_iterate(),
            DeviceImpl::Remote(d) => d.save_live_iterate(),
        }
    }
    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.save_live_complete_precopy().into_result().map(|v| v.into_vec()),
            DeviceImpl::Builtin(d) => d.save_live_complete_precopy(),
            DeviceImpl::Remote(d) => d.save_complete(),
        }
    }
    fn save_cleanup(&mut self) {
        match self {
            DeviceImpl::Plugin(d) => d.save_cleanup(),
            DeviceImpl::Builtin(d) => d.save_cleanup(),
            DeviceImpl::Remote(d) => {
                if let Err(e) = d.save_cleanup() {
                    log::warn!("migration: device process save_cleanup: {e}");
                }
            }
        }
    }
    fn load_setup(&mut self) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.load_setup().into_result(),
            DeviceImpl::Builtin(d) => d.load_setup(),
            DeviceImpl::Remote(d) => d.load_setup(),
        }
    }
    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.load_state(version, RSlice::from_slice(data)).into_result(),
            DeviceImpl::Builtin(d) => d.load_state(version, data),
            DeviceImpl::Remote(d) => d.load_state(version, data),
        }
    }
    fn load_cleanup(&mut self) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.load_cleanup().into_result(),
            DeviceImpl::Builtin(d) => d.load_cleanup(),
            DeviceImpl::Remote(d) => d.load_cleanup(),
        }
    }
    fn vm_state_changed(&mut self, running: bool) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.vm_state_changed(running).into_result(),
            DeviceImpl::Builtin(d) => d.vm_state_changed(running),
            DeviceImpl::Remote(d) => d.vm_state_changed(running),
        }
    }
}
