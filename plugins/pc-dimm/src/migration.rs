//! pc-dimm migration state: its geometry. The RAM itself migrates as
//! registered memory, not here.

use dmhost_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

use crate::device::PcDimm;

pub const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcDimmState {
    pub size: u64,
    pub addr: Option<u64>,
    pub slot: Option<u32>,
    pub node: u32,
}

impl PcDimmState {
    pub fn of(d: &PcDimm) -> Self {
        Self { size: d.config.size, addr: d.addr, slot: d.config.slot, node: d.config.node }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct serializes")
    }

    pub fn decode(version: u32, data: &[u8]) -> Result<Self, PluginError> {
        if version != STATE_VERSION {
            return Err(PluginError::migration(format!(
                "pc-dimm state version {version} is not supported (this plugin loads {STATE_VERSION})"
            )));
        }
        serde_json::from_slice(data).map_err(|e| PluginError::migration(format!("pc-dimm state: {e}")))
    }

    /// The destination was configured the same way: refuse a mismatch
    /// rather than load RAM of another size.
    pub fn check_and_apply(self, d: &mut PcDimm) -> Result<(), PluginError> {
        if self.size != d.config.size || self.node != d.config.node || self.slot != d.config.slot {
            return Err(PluginError::migration(format!(
                "pc-dimm state {self:?} does not match this device (size {}, slot {:?}, node {})",
                d.config.size, d.config.slot, d.config.node
            )));
        }
        d.addr = self.addr;
        Ok(())
    }
}
