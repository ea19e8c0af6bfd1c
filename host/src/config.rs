//! The VM configuration file (TOML).
//!
//! ```toml
//! ram = "64M"                 # guest RAM (bytes or K/M/G suffix)
//! vcpus = 1
//! program = "builtin:demo"    # or a path to a flat 64-bit binary
//! plugin-dirs = ["plugins"]   # searched besides the default directories
//! memory-slots = 8            # ACPI memory hotplug slots (PNP0C80), 1..=256
//! nfit-platform-capabilities = 3  # NFIT platform capabilities bits (0 = none)
//!
//! [regs]                      # registers preset at entry (optional)
//! r8 = 0xd0000000
//!
//! [[device]]
//! kind = "pc-dimm"
//! id = "dimm0"
//! config = { size = "2M" }    # handed to the plugin as JSON
//! # isolation = "process"     # run the plugin in its own process ("none": in the host)
//! # addr = "05.0"             # PCI slot of a PCI device (else the next free one)
//! ```
//!
//! Relative paths are relative to the config file's directory.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use dmhost_plugin_api::backend::parse_size;
use serde::Deserialize;

use crate::guest::RegPreset;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

/// A parsed, checked VM configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct VmFileConfig {
    pub ram_size: u64,
    pub vcpus: u32,
    pub program: String,
    pub plugin_dirs: Vec<PathBuf>,
    pub regs: RegPreset,
    pub devices: Vec<DeviceConfig>,
    /// Directory of the config file (for relative paths).
    pub base_dir: PathBuf,
    /// ACPI settings.
    pub acpi: crate::acpi_host::AcpiConfig,
}

/// One `[[device]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    pub kind: String,
    pub id: String,
    /// The plugin's config, as JSON text.
    pub config: String,
    pub isolation: Isolation,
    /// PCI slot on bus 0 (`addr = "05.0"`); PCI devices without one get
    /// the lowest free slot in plug order (see [`crate::pci`]).
    pub pci_slot: Option<u8>,
}

/// Where a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// In the host process.
    #[default]
    None,
    /// In a device process of its own (`dmhost device-runner`).
    Process,
}

impl Isolation {
    /// `"none"` or `"process"`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "process" => Ok(Self::Process),
            other => Err(format!("isolation {other:?} is not supported (\"none\" or \"process\")")),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    ram: Option<SizeValue>,
    vcpus: Option<u32>,
    program: String,
    #[serde(default)]
    plugin_dirs: Vec<PathBuf>,
    #[serde(default)]
    regs: BTreeMap<String, i64>,
    #[serde(default)]
    device: Vec<RawDevice>,
    memory_slots: Option<u32>,
    nfit_platform_capabilities: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDevice {
    kind: String,
    id: String,
    #[serde(default)]
    config: Option<toml::Value>,
    isolation: Option<String>,
    addr: Option<String>,
}

/// Default guest RAM.
pub const DEFAULT_RAM: u64 = 64 << 20;

impl VmFileConfig {
    /// Read and check `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &path.display().to_string(), &base)
    }

    /// Parse config text; `name` names it in errors.
    pub fn parse(text: &str, name: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid { path: name.to_owned(), message };
        let raw: Raw = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_owned(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        let ram_size = match raw.ram {
            None => DEFAULT_RAM,
            Some(SizeValue::Bytes(n)) => n,
            Some(SizeValue::Text(s)) => parse_size(&s).map_err(|e| invalid(format!("ram: {e}")))?,
        };
        let vcpus = raw.vcpus.unwrap_or(1);
        let regs = RegPreset(raw.regs.into_iter().map(|(k, v)| (k, v as u64)).collect());
        regs.validate().map_err(|e| invalid(e.to_string()))?;
        let mut devices = Vec::new();
        for d in raw.device {
            if devices.iter().any(|x: &DeviceConfig| x.id == d.id) {
                return Err(invalid(format!("device id {:?} appears twice", d.id)));
            }
            let config = match d.config {
                None => "{}".to_owned(),
                Some(v @ toml::Value::Table(_)) => {
                    serde_json::to_string(&v).map_err(|e| invalid(format!("device {}: config: {e}", d.id)))?
                }
                Some(_) => return Err(invalid(format!("device {}: config must be a table", d.id))),
            };
            let isolation = match d.isolation.as_deref() {
                None => Isolation::None,
                Some(s) => Isolation::parse(s).map_err(|e| invalid(format!("device {}: {e}", d.id)))?,
            };
            let pci_slot = match d.addr.as_deref() {
                None => None,
                Some(a) => Some(
                    crate::pci::parse_addr(a).map_err(|e| invalid(format!("device {}: addr: {e}", d.id)))?,
                ),
            };
            devices.push(DeviceConfig { kind: d.kind, id: d.id, config, isolation, pci_slot });
        }
        let mut acpi = crate::acpi_host::AcpiConfig::default();
        if let Some(n) = raw.memory_slots {
            if !(1..=crate::acpi_host::memory_hotplug::MAX_SLOTS).contains(&n) {
                return Err(invalid(format!("memory-slots must be 1..=256, got {n}")));
            }
            acpi.memory_slots = n;
        }
        acpi.nfit_platform_capabilities = raw.nfit_platform_capabilities.unwrap_or(0);
        let plugin_dirs =
            raw.plugin_dirs.into_iter().map(|p| if p.is_relative() { base_dir.join(p) } else { p }).collect();
        Ok(Self {
            ram_size,
            vcpus,
            program: raw.program,
            plugin_dirs,
            regs,
            devices,
            base_dir: base_dir.to_path_buf(),
            acpi,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_config() {
        let c = VmFileConfig::parse(
            r#"
ram = "32M"
vcpus = 2
program = "builtin:demo"
plugin-dirs = ["p"]
[regs]
r8 = 0xd0000000
[[device]]
kind = "pc-dimm"
id = "dimm0"
config = { size = "2M", share = false }
"#,
            "t.toml",
            Path::new("/etc/x"),
        )
        .unwrap();
        assert_eq!((c.ram_size, c.vcpus), (32 << 20, 2));
        assert_eq!(c.plugin_dirs, vec![PathBuf::from("/etc/x/p")]);
        assert_eq!(c.regs.0["r8"], 0xd000_0000);
        let v: serde_json::Value = serde_json::from_str(&c.devices[0].config).unwrap();
        assert_eq!(v, serde_json::json!({"size": "2M", "share": false}));
    }

    #[test]
    fn rejects_bad_configs_with_one_line() {
        for bad in [
            "",
            "program = 1",
            "program = \"x\"\nram = \"12Q\"",
            "program = \"x\"\nbogus = 1",
            "program = \"x\"\n[regs]\nrip = 1",
            "program = \"x\"\n[[device]]\nkind=\"a\"\nid=\"a\"\n[[device]]\nkind=\"a\"\nid=\"a\"",
            "program = \"x\"\n[[device]]\nkind=\"a\"\nid=\"a\"\nconfig = 3",
            "program = \"x\"\nmemory-slots = 0",
            "program = \"x\"\n[[device]]\nkind=\"a\"\nid=\"a\"\nisolation = \"vm\"",
            "program = \"x\"\n[[device]]\nkind=\"a\"\nid=\"a\"\naddr = \"05.1\"",
            "[[[",
        ] {
            let e = VmFileConfig::parse(bad, "t.toml", Path::new("")).unwrap_err().to_string();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.starts_with("t.toml: "), "{e}");
        }
    }
}
