//! testdev: a device for host tests and benches. Only the export lives here.
//!
//! It has a small MMIO register bank (see [`regs`]), an optional RAM region,
//! a way for the guest to make the device call `physmap_remove` /
//! `physmap_add` (so tests can observe the host's ownership checks), and a
//! `panic-on` option that panics inside one `DeviceModel` method (so the
//! conformance suite can check the panic fence).

pub mod config;
pub mod device;
pub mod regs;

use dmhost_plugin_api::{export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError};

pub const KIND: &str = "testdev";

pub struct TestdevPlugin;

impl Plugin for TestdevPlugin {
    const NAME: &'static str = "testdev";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        vec![DeviceKind {
            name: KIND.into(),
            description: "Test device: MMIO registers (scratch/echo/counter/physmap requests), optional RAM"
                .into(),
            default_config: r#"{"mmio-base": 3489660928}"#.into(),
        }]
    }

    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError> {
        if kind != KIND {
            return Err(PluginError::unsupported(format!("testdev plugin has no kind {kind:?}")));
        }
        let config = config::TestdevConfig::parse(config)?;
        if config.panic_on.as_deref() == Some("create") {
            panic!("testdev {id}: panic-on create");
        }
        Ok(Box::new(device::Testdev::new(id, config, host)?))
    }
}

export_plugin!(TestdevPlugin);
