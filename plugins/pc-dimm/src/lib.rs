//! pc-dimm: hot-pluggable RAM. Only the export lives here.

pub mod config;
pub mod device;
pub mod migration;

use dmhost_plugin_api::{export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError};

pub const KIND: &str = "pc-dimm";

pub struct PcDimmPlugin;

impl Plugin for PcDimmPlugin {
    const NAME: &'static str = "pc-dimm";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        vec![DeviceKind {
            name: KIND.into(),
            description: "Hot-pluggable RAM (memfd or file backend)".into(),
            default_config: r#"{"size": "128M"}"#.into(),
        }]
    }

    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError> {
        if kind != KIND {
            return Err(PluginError::unsupported(format!("pc-dimm plugin has no kind {kind:?}")));
        }
        let config = config::PcDimmConfig::parse(config)?;
        Ok(Box::new(device::PcDimm::new(id, config, host)?))
    }
}

export_plugin!(PcDimmPlugin);
