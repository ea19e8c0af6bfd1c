//! nvdimm migration state: its geometry and placement. The backend (region
//! and label area) migrates as registered RAM, not here.

use dmhost_plugin_api::PluginError;
use serde::{Deserialize, Serialize};

use crate::device::Nvdimm;

pub const STATE_VERSION: u32 = 1;

/// Why a state section was refused.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("nvdimm state version {0} is not supported (this plugin loads {STATE_VERSION})")]
    Version(u32),
    #[error("nvdimm state is malformed")]
    Malformed(#[source] serde_json::Error),
    #[error("nvdimm state {got:?} does not match this device {want:?}")]
    Mismatch { got: NvdimmState, want: NvdimmState },
}

impl From<MigrationError> for PluginError {
    fn from(e: MigrationError) -> Self {
        let mut msg = e.to_string();
        if let MigrationError::Malformed(src) = &e {
            msg = format!("{msg}: {src}");
        }
        PluginError::migration(msg)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct NvdimmState {
    pub size: u64,
    pub label_size: u64,
    pub slot: u32,
    pub node: u32,
    /// Guest-physical base of the mapped region, when plugged.
    pub base: Option<u64>,
}

impl NvdimmState {
    pub fn of(d: &Nvdimm) -> Self {
        let c = d.config();
        Self { size: c.size, label_size: c.label_size, slot: c.slot, node: c.node, base: d.base() }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A struct of integers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(version: u32, data: &[u8]) -> Result<Self, MigrationError> {
        if version != STATE_VERSION {
            return Err(MigrationError::Version(version));
        }
        serde_json::from_slice(data).map_err(MigrationError::Malformed)
    }

    /// Refuse a source configured differently (other geometry would load
    /// RAM and labels at the wrong place); take the base from the source.
    pub fn check_and_apply(self, d: &mut Nvdimm) -> Result<(), MigrationError> {
        let want = Self::of(d);
        let same = self.size == want.size
            && self.label_size == want.label_size
            && self.slot == want.slot
            && self.node == want.node;
        if !same {
            return Err(MigrationError::Mismatch { got: self, want });
        }
        d.set_base(self.base);
        Ok(())
    }
}
