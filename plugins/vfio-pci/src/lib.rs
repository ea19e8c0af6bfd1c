//! vfio-pci: PCI device passthrough over kernel VFIO (vfio-ioctls) or a
//! user-space vendor driver plugin found through the host. Only the export
//! lives here.

pub mod backend;
pub mod bars;
pub mod config;
pub mod config_space;
pub mod device;
pub mod kernel;
pub mod migration;
pub mod msix;
pub mod state;
pub mod vendor;

use dmhost_plugin_api::{export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError};

pub const KIND: &str = "vfio-pci";

pub struct VfioPciPlugin;

impl Plugin for VfioPciPlugin {
    const NAME: &'static str = "vfio-pci";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        vec![DeviceKind {
            name: KIND.into(),
            description:
                "PCI passthrough: kernel VFIO (host=DDDD:BB:DD.F) or a vendor driver plugin (driver=NAME)"
                    .into(),
            // A vendor driver is the only device this machine has (no
            // IOMMU); the sample driver ships beside this plugin.
            default_config:
                r#"{"driver": "vendor-sample", "driver-config": {"state-size": "2M"}, "intx-gsi": 10}"#.into(),
        }]
    }

    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError> {
        if kind != KIND {
            return Err(PluginError::unsupported(format!("vfio-pci plugin has no kind {kind:?}")));
        }
        let config = config::VfioPciConfig::parse(config)?;
        Ok(Box::new(device::VfioPci::open(id, config, host)?))
    }
}

export_plugin!(VfioPciPlugin);
