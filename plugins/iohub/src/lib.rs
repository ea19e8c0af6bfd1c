//! iohub: the PCI host bridge's INTx hub. Only the export lives here.
//!
//! Four PCI IRQ lines (PIRQ A..D), each a KVM irqfd + resamplefd on an
//! IOAPIC GSI (`gsi-base + line` unless the guest re-routes it through the
//! PIRQ route registers at config offsets 0x60..0x63). A device function
//! `devfn` driving pin `pin` (1 = INTA) lands on line
//! `(slot + pin - 1) % 4` (the standard swizzle, `slot = devfn >> 3`).
//! Levels are counted per line (a line is high while any source holds it);
//! a resample (guest EOI) re-raises a line whose level is still held. See
//! [`lines`] and [`device`]; [`migration`] holds the saved state.

pub mod device;
pub mod lines;
pub mod migration;

use dmhost_plugin_api::{export_plugin, DeviceKind, DeviceModel, Host, Plugin, PluginError};

pub const KIND: &str = "iohub";

pub struct IohubPlugin;

impl Plugin for IohubPlugin {
    const NAME: &'static str = "iohub";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn kinds() -> Vec<DeviceKind> {
        vec![DeviceKind {
            name: KIND.into(),
            description: "PCI INTx hub: PIRQ A-D through KVM irqfd + resamplefd, level counting".into(),
            default_config: r#"{"gsi-base": 16}"#.into(),
        }]
    }

    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError> {
        if kind != KIND {
            return Err(PluginError::unsupported(format!("iohub plugin has no kind {kind:?}")));
        }
        let config = device::IohubConfig::parse(config)?;
        Ok(Box::new(device::Iohub::new(id, config, host)))
    }
}

export_plugin!(IohubPlugin);
