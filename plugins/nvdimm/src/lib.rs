//! nvdimm: persistent memory with an NFIT, namespace labels and `_DSM`.
//! Only the export lives here.

pub mod acpi;
pub mod config;
pub mod device;
pub mod labels;
pub mod migration;
#[cfg(test)]
pub(crate) mod test_host;

use dmhost_plugin_api::{export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError};

pub const KIND: &str = "nvdimm";

pub struct NvdimmPlugin;

impl Plugin for NvdimmPlugin {
    const NAME: &'static str = "nvdimm";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        vec![DeviceKind {
            name: KIND.into(),
            description: "NVDIMM (persistent memory): NFIT, namespace labels at the end of the \
                          backend, label _DSM functions"
                .into(),
            // 128 MiB mapped region + the default 128 KiB label area.
            default_config: r#"{"size": "130M"}"#.into(),
        }]
    }

    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError> {
        if kind != KIND {
            return Err(PluginError::unsupported(format!("nvdimm plugin has no kind {kind:?}")));
        }
        let config = config::NvdimmConfig::parse(config)?;
        Ok(Box::new(device::Nvdimm::new(id, config, host)?))
    }
}

export_plugin!(NvdimmPlugin);
