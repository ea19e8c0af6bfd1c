//! A sample user-space vendor VFIO driver: a synthetic PCI device with
//! BAR0 registers, INTx/MSI/MSI-X through eventfds and a large internal state
//! that keeps changing while it runs, migrated with VFIO migration v2
//! (PRE_COPY with dirty tracking, STOP_COPY, RESUMING). Only the export
//! lives here; `vfio-pci` opens it through the host as "vendor-sample" or
//! "1de5:0001".

pub mod config;
pub mod device;
pub mod pages;
pub mod stream;

use dmhost_plugin_api::{
    export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError, VfioDriver, VfioDriverInfo,
};

pub const DRIVER_NAME: &str = "vendor-sample";
pub const VENDOR_ID: u16 = 0x1de5;
pub const DEVICE_ID: u16 = 0x0001;

pub struct VendorSamplePlugin;

impl Plugin for VendorSamplePlugin {
    const NAME: &'static str = "vfio-vendor-sample";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        Vec::new()
    }

    fn create(
        kind: &str,
        _id: &str,
        _config: &str,
        _host: Host,
    ) -> Result<Box<dyn DeviceModel>, PluginError> {
        Err(PluginError::unsupported(format!(
            "vfio-vendor-sample provides VFIO drivers, not device kinds (asked for {kind:?})"
        )))
    }

    fn vfio_drivers() -> Vec<VfioDriverInfo> {
        vec![VfioDriverInfo {
            name: DRIVER_NAME.into(),
            vendor_id: VENDOR_ID,
            device_id: DEVICE_ID,
            description: "Synthetic device with live-migratable state (PRE_COPY, P2P)".into(),
            default_config: r#"{"state-size": "2M"}"#.into(),
        }]
    }

    fn open_vfio_driver(name: &str, config: &str, _host: Host) -> Result<Box<dyn VfioDriver>, PluginError> {
        if name != DRIVER_NAME {
            return Err(PluginError::unsupported(format!("vfio-vendor-sample has no driver {name:?}")));
        }
        let config = config::SampleConfig::parse(config)?;
        log::info!("vendor-sample: open, {} state pages", config.pages());
        Ok(Box::new(device::SampleDevice::new(config)))
    }
}

export_plugin!(VendorSamplePlugin);
