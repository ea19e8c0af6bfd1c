//! nvdimm configuration (JSON, kebab-case), with QEMU's property names where
//! QEMU has one.
//!
//! Geometry (QEMU `nvdimm_prepare_memory_region`): the label area is the
//! last `label-size` bytes of the backend; the guest maps the part before
//! it, aligned down to [`NVDIMM_ALIGN`].

use std::path::PathBuf;

use dmhost_plugin_api::{backend::ConfigSize as Size, backend::PAGE_SIZE, parse_config, PluginError};
use serde::Deserialize;

use crate::KIND;

/// Alignment of the guest-visible region (size and guest-physical address).
pub const NVDIMM_ALIGN: u64 = 2 << 20;
/// QEMU's `MIN_NAMESPACE_LABEL_SIZE`: the smallest non-zero label area.
pub const MIN_LABEL_SIZE: u64 = 128 << 10;
/// Default label area (QEMU defaults to none; Linux needs one for namespaces).
pub const DEFAULT_LABEL_SIZE: u64 = MIN_LABEL_SIZE;
/// The highest slot: devices are named `NV00`..`NVFF` in the AML.
pub const MAX_SLOT: u32 = 0xff;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("size: {0}")]
    Size(String),
    #[error("size {0} must be a non-zero multiple of {PAGE_SIZE}")]
    SizeNotPageAligned(u64),
    #[error("label-size {0} must be 0 or at least {MIN_LABEL_SIZE} (128 KiB)")]
    LabelTooSmall(u64),
    #[error("label-size {0} must be a multiple of {PAGE_SIZE} and fit in 32 bits")]
    LabelUnaligned(u64),
    #[error(
        "size {size} is too small for a {label_size}-byte label area plus one \
         {NVDIMM_ALIGN}-byte (2 MiB) aligned block"
    )]
    TooSmall { size: u64, label_size: u64 },
    #[error("slot {0} is out of range (0..={MAX_SLOT})")]
    Slot(u32),
    #[error("readonly needs a file backend (mem-path)")]
    ReadonlyWithoutFile,
    #[error("a read-only backend needs \"unarmed\": true")]
    ReadonlyNotUnarmed,
    #[error("addr {0:#x} must be 2 MiB aligned and must not overflow with the region size")]
    Addr(u64),
}

impl From<ConfigError> for PluginError {
    fn from(e: ConfigError) -> Self {
        PluginError::config(format!("{KIND} config: {e}"))
    }
}

/// A validated nvdimm configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvdimmConfig {
    /// Whole backend size (region + gap + labels).
    pub size: u64,
    pub mem_path: Option<PathBuf>,
    pub share: bool,
    pub readonly: bool,
    /// Slot: the NFIT device handle is `slot + 1` (0 is the root device).
    pub slot: u32,
    /// NUMA node: the SPA range's proximity domain.
    pub node: u32,
    /// Label area at the end of the backend; 0 = no labels.
    pub label_size: u64,
    /// Tell the guest the DIMM cannot persist writes (NFIT "not armed").
    pub unarmed: bool,
    /// A fixed guest-physical address, or any.
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
    readonly: bool,
    #[serde(default)]
    slot: u32,
    #[serde(default)]
    node: u32,
    label_size: Option<Size>,
    #[serde(default)]
    unarmed: bool,
    addr: Option<u64>,
}

impl NvdimmConfig {
    /// Parse and validate untrusted JSON text.
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(KIND, text)?;
        Ok(Self::validate(raw)?)
    }

    fn validate(raw: Raw) -> Result<Self, ConfigError> {
        let size = raw.size.bytes().map_err(ConfigError::Size)?;
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(ConfigError::SizeNotPageAligned(size));
        }
        let label_size = match &raw.label_size {
            Some(s) => s.bytes().map_err(ConfigError::Size)?,
            None => DEFAULT_LABEL_SIZE,
        };
        if label_size != 0 && label_size < MIN_LABEL_SIZE {
            return Err(ConfigError::LabelTooSmall(label_size));
        }
        if label_size % PAGE_SIZE != 0 || label_size > u64::from(u32::MAX) {
            return Err(ConfigError::LabelUnaligned(label_size));
        }
        if region_size(size, label_size) == 0 {
            return Err(ConfigError::TooSmall { size, label_size });
        }
        if raw.slot > MAX_SLOT {
            return Err(ConfigError::Slot(raw.slot));
        }
        if raw.readonly && raw.mem_path.is_none() {
            return Err(ConfigError::ReadonlyWithoutFile);
        }
        if raw.readonly && !raw.unarmed {
            return Err(ConfigError::ReadonlyNotUnarmed);
        }
        if let Some(addr) = raw.addr {
            let end = addr.checked_add(region_size(size, label_size));
            if addr % NVDIMM_ALIGN != 0 || end.is_none() {
                return Err(ConfigError::Addr(addr));
            }
        }
        Ok(Self {
            size,
            mem_path: raw.mem_path,
            share: raw.share,
            readonly: raw.readonly,
            slot: raw.slot,
            node: raw.node,
            label_size,
            unarmed: raw.unarmed,
            addr: raw.addr,
        })
    }

    /// Bytes the guest maps: `align_down(size - label_size, 2 MiB)`.
    pub fn region_size(&self) -> u64 {
        region_size(self.size, self.label_size)
    }

    /// Offset of the label area in the backend.
    pub fn label_offset(&self) -> u64 {
        self.size - self.label_size
    }

    /// NFIT device handle (QEMU `nvdimm_slot_to_handle`).
    pub fn handle(&self) -> u32 {
        self.slot + 1
    }
}

/// `align_down(size - label_size, NVDIMM_ALIGN)`, 0 when nothing fits.
pub fn region_size(size: u64, label_size: u64) -> u64 {
    size.checked_sub(label_size).map_or(0, |rest| rest & !(NVDIMM_ALIGN - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmhost_plugin_api::ErrorKind;

    #[test]
    fn defaults_and_region_math() {
        let c = NvdimmConfig::parse(r#"{"size":"130M"}"#).unwrap();
        assert_eq!(c.label_size, 128 << 10);
        assert_eq!(c.region_size(), 128 << 20);
        assert_eq!(c.label_offset(), (130 << 20) - (128 << 10));
        assert_eq!((c.slot, c.handle(), c.node), (0, 1, 0));
        // Exactly region + labels.
        let c = NvdimmConfig::parse(&format!("{{\"size\":{}}}", (4 << 20) + (128 << 10))).unwrap();
        assert_eq!(c.region_size(), 4 << 20);
        // No labels: the whole (aligned) backend is mapped.
        let c = NvdimmConfig::parse(r#"{"size":"4M","label-size":0}"#).unwrap();
        assert_eq!((c.region_size(), c.label_offset()), (4 << 20, 4 << 20));
        // 3 MiB - 128 KiB aligns down to 2 MiB.
        let c = NvdimmConfig::parse(r#"{"size":"3M","label-size":"256K","slot":7}"#).unwrap();
        assert_eq!((c.region_size(), c.handle()), (2 << 20, 8));
        assert_eq!(region_size(1, 2), 0);
    }

    #[test]
    fn rejects_bad_configs() {
        for bad in [
            r#"{}"#,
            r#"{"size":0}"#,
            r#"{"size":"3K"}"#,
            r#"{"size":"12Q"}"#,
            r#"{"size":"2M"}"#,                     // no room for labels
            r#"{"size":"2M","label-size":"4K"}"#,   // label below 128 KiB
            r#"{"size":"4M","label-size":131073}"#, // label not page aligned
            r#"{"size":"8G","label-size":"4G"}"#,   // label beyond u32
            r#"{"size":"1M","label-size":0}"#,      // less than one 2 MiB block
            r#"{"size":"4M","slot":256}"#,
            r#"{"size":"4M","readonly":true,"unarmed":true}"#,
            r#"{"size":"4M","readonly":true,"mem-path":"/tmp/x"}"#,
            r#"{"size":"4M","addr":4096}"#,
            r#"{"size":"4M","addr":18446744073707454464}"#,
            r#"{"size":"4M","bogus":1}"#,
            r#"{"size":"4M","slot":-1}"#,
            "not json",
        ] {
            let e = NvdimmConfig::parse(bad).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidConfig, "{bad}");
            assert!(e.message.starts_with("nvdimm config"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn too_small_message_is_clear() {
        let e = NvdimmConfig::parse(r#"{"size":"2M"}"#).unwrap_err();
        assert!(e.message.contains("too small"), "{}", e.message);
    }
}
