//! Where device services find vendor VFIO drivers: the plugin registry,
//! handed to the VM once ([`crate::vm::Vm::set_vfio_drivers`]) so every
//! device created afterwards can open drivers through its
//! `HostServices::open_vfio_driver`.

use dmhost_plugin_api::{Host, PluginError, VfioDriverBox};

use crate::loader::{CreateError, PluginRegistry};

/// Opens vendor VFIO drivers by name or "vvvv:dddd".
pub trait VfioDriverSource: Send + Sync {
    fn open_vfio_driver(
        &self,
        matching: &str,
        config: &str,
        host: Host,
    ) -> Result<VfioDriverBox, PluginError>;
}

impl VfioDriverSource for PluginRegistry {
    fn open_vfio_driver(
        &self,
        matching: &str,
        config: &str,
        host: Host,
    ) -> Result<VfioDriverBox, PluginError> {
        PluginRegistry::open_vfio_driver(self, matching, config, host).map_err(|e| match &e {
            CreateError::VfioDriver { source, .. } => PluginError::new(source.kind, e.to_string()),
            _ => PluginError::unsupported(e.to_string()),
        })
    }
}
