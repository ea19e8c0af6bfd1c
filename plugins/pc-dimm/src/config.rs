//! pc-dimm configuration (JSON), with QEMU's property names.

use std::path::PathBuf;

use dmhost_plugin_api::{backend::ConfigSize as Size, parse_config, PluginError};
use serde::Deserialize;

use crate::KIND;

/// Alignment of a DIMM in guest-physical space and of its size.
pub const DIMM_ALIGN: u64 = 2 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcDimmConfig {
    pub size: u64,
    pub mem_path: Option<PathBuf>,
    pub share: bool,
    pub node: u32,
    pub slot: Option<u32>,
    pub addr: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    size: Size,
    mem_path: Option<PathBuf>,
    #[serde(default)]
    share: bool,
    #[serde(default)]
    node: u32,
    slot: Option<u32>,
    addr: Option<u64>,
}

impl PcDimmConfig {
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(KIND, text)?;
        let size = raw.size.bytes().map_err(|e| PluginError::config(format!("{KIND} size: {e}")))?;
        if size == 0 || size % DIMM_ALIGN != 0 {
            return Err(PluginError::config(format!(
                "{KIND} size {size} must be a non-zero multiple of {DIMM_ALIGN} (2 MiB)"
            )));
        }
        if let Some(addr) = raw.addr {
            if addr % DIMM_ALIGN != 0 || addr.checked_add(size).is_none() {
                return Err(PluginError::config(format!(
                    "{KIND} addr {addr:#x} must be 2 MiB aligned and addr+size must not overflow"
                )));
            }
        }
        Ok(Self {
            size,
            mem_path: raw.mem_path,
            share: raw.share,
            node: raw.node,
            slot: raw.slot,
            addr: raw.addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = PcDimmConfig::parse(r#"{"size":"4M","slot":2,"addr":4294967296}"#).unwrap();
        assert_eq!((c.size, c.slot, c.addr), (4 << 20, Some(2), Some(1 << 32)));
        for bad in [
            r#"{"size":"3K"}"#,
            r#"{"size":0}"#,
            r#"{}"#,
            r#"{"size":"4M","bogus":1}"#,
            r#"{"size":"4M","addr":12345}"#,
            "not json",
        ] {
            let e = PcDimmConfig::parse(bad).unwrap_err();
            assert_eq!(e.kind, dmhost_plugin_api::ErrorKind::InvalidConfig, "{bad}");
        }
    }
}
