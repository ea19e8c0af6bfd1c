//! vfio-pci configuration (JSON): which device, how its interrupts reach
//! the guest, and QEMU-style migration properties.

use std::path::PathBuf;

use dmhost_plugin_api::{parse_config, PluginError};
use serde::Deserialize;

use crate::KIND;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Kernel VFIO: the device's sysfs directory; `cdev` selects iommufd.
    Kernel { sysfs: PathBuf, cdev: bool },
    /// A vendor driver plugin: a driver name or "vvvv:dddd", and its config.
    Driver { matching: String, config: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioPciConfig {
    pub source: Source,
    /// The GSI the device's INTx pin drives (not wired when absent).
    pub intx_gsi: Option<u32>,
    /// QEMU's `x-allow-pre-copy`.
    pub allow_precopy: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    host: Option<String>,
    sysfsdev: Option<PathBuf>,
    driver: Option<String>,
    driver_config: Option<serde_json::Value>,
    iommu: Option<String>,
    intx_gsi: Option<u32>,
    #[serde(rename = "x-allow-pre-copy")]
    allow_pre_copy: Option<bool>,
}

impl VfioPciConfig {
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(KIND, text)?;
        let given = [raw.host.is_some(), raw.sysfsdev.is_some(), raw.driver.is_some()];
        if given.iter().filter(|&&g| g).count() != 1 {
            return Err(PluginError::config(format!(
                "{KIND}: give exactly one of \"host\" (PCI address), \"sysfsdev\" (sysfs path) or \"driver\" (vendor driver)"
            )));
        }
        let cdev = match raw.iommu.as_deref() {
            None | Some("container") => false,
            Some("cdev") => true,
            Some(other) => {
                return Err(PluginError::config(format!(
                    "{KIND}: iommu {other:?} must be \"container\" or \"cdev\""
                )))
            }
        };
        if raw.driver.is_none() && raw.driver_config.is_some() {
            return Err(PluginError::config(format!("{KIND}: driver-config needs \"driver\"")));
        }
        let source = match raw.driver {
            Some(matching) => {
                if matching.is_empty() {
                    return Err(PluginError::config(format!("{KIND}: driver name is empty")));
                }
                let config = match raw.driver_config {
                    None => "{}".to_owned(),
                    Some(v @ serde_json::Value::Object(_)) => v.to_string(),
                    Some(_) => {
                        return Err(PluginError::config(format!(
                            "{KIND}: driver-config must be a JSON object"
                        )))
                    }
                };
                Source::Driver { matching, config }
            }
            None => {
                let sysfs = crate::kernel::sysfs_path(raw.host.as_deref(), raw.sysfsdev.as_deref())
                    .map_err(|e| PluginError::config(format!("{KIND}: {e}")))?;
                Source::Kernel { sysfs, cdev }
            }
        };
        Ok(Self { source, intx_gsi: raw.intx_gsi, allow_precopy: raw.allow_pre_copy.unwrap_or(true) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources_and_refuses() {
        let c = VfioPciConfig::parse(r#"{"host":"0000:01:00.0","intx-gsi":10}"#).unwrap();
        assert_eq!(
            c.source,
            Source::Kernel { sysfs: "/sys/bus/pci/devices/0000:01:00.0".into(), cdev: false }
        );
        assert_eq!((c.intx_gsi, c.allow_precopy), (Some(10), true));
        let c = VfioPciConfig::parse(
            r#"{"driver":"1de5:0001","driver-config":{"state-size":"1M"},"x-allow-pre-copy":false}"#,
        )
        .unwrap();
        assert_eq!(
            c.source,
            Source::Driver { matching: "1de5:0001".into(), config: r#"{"state-size":"1M"}"#.into() }
        );
        assert!(!c.allow_precopy);
        for bad in [
            "{}",
            r#"{"host":"0000:01:00.0","driver":"x"}"#,
            r#"{"host":"01:00.0"}"#,
            r#"{"host":"0000:01:00.0","iommu":"magic"}"#,
            r#"{"driver":"x","driver-config":[1]}"#,
            r#"{"driver":""}"#,
            r#"{"sysfsdev":"/x","driver-config":{}}"#,
            r#"{"driver":"x","bogus":1}"#,
        ] {
            assert!(VfioPciConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
