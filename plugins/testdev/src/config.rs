//! testdev configuration (JSON).

use dmhost_plugin_api::{backend::parse_size, parse_config, PluginError};
use serde::Deserialize;

use crate::{regs::BANK_SIZE, KIND};

/// `DeviceModel` methods `panic-on` may name.
pub const PANIC_POINTS: &[&str] = &[
    "create",
    "memory_region",
    "plug",
    "unplug",
    "pio_read",
    "pio_write",
    "mmio_read",
    "mmio_write",
    "save_live_complete_precopy",
    "load_state",
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestdevConfig {
    /// Base of the MMIO register bank (page aligned), or none.
    pub mmio_base: Option<u64>,
    /// Size of an optional RAM region (memfd).
    pub mem_size: Option<u64>,
    /// Requested guest-physical address of that region.
    pub mem_addr: Option<u64>,
    /// Panic inside this method (one of [`PANIC_POINTS`]).
    pub panic_on: Option<String>,
    /// PCI function number the device's INTx pin belongs to.
    pub devfn: u32,
    /// INTx pin (1 = INTA .. 4 = INTD), as config space offset 0x3d reports.
    pub intx_pin: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    mmio_base: Option<u64>,
    mem_size: Option<SizeValue>,
    mem_addr: Option<u64>,
    panic_on: Option<String>,
    devfn: Option<u32>,
    intx_pin: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl TestdevConfig {
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(KIND, text)?;
        if let Some(base) = raw.mmio_base {
            if base % 4096 != 0 || base.checked_add(BANK_SIZE).is_none() {
                return Err(PluginError::config(format!(
                    "{KIND} mmio-base {base:#x} must be 4 KiB aligned and leave room for the bank"
                )));
            }
        }
        let mem_size = match raw.mem_size {
            None => None,
            Some(SizeValue::Bytes(n)) => Some(n),
            Some(SizeValue::Text(s)) => {
                Some(parse_size(&s).map_err(|e| PluginError::config(format!("{KIND} mem-size: {e}")))?)
            }
        };
        if let Some(size) = mem_size {
            if size == 0 || size % 4096 != 0 {
                return Err(PluginError::config(format!(
                    "{KIND} mem-size {size} must be a non-zero multiple of 4096"
                )));
            }
        }
        if raw.mem_addr.is_some() && mem_size.is_none() {
            return Err(PluginError::config(format!("{KIND} mem-addr needs mem-size")));
        }
        if let Some(addr) = raw.mem_addr {
            if addr % 4096 != 0 {
                return Err(PluginError::config(format!("{KIND} mem-addr {addr:#x} is not 4 KiB aligned")));
            }
        }
        if let Some(p) = &raw.panic_on {
            if !PANIC_POINTS.contains(&p.as_str()) {
                return Err(PluginError::config(format!(
                    "{KIND} panic-on {p:?} is not one of {PANIC_POINTS:?}"
                )));
            }
        }
        let devfn = raw.devfn.unwrap_or(0x08);
        let intx_pin = raw.intx_pin.unwrap_or(1);
        if devfn > 0xff || !(1..=4).contains(&intx_pin) {
            return Err(PluginError::config(format!(
                "{KIND} devfn {devfn:#x} / intx-pin {intx_pin}: devfn must be below 0x100, intx-pin 1..=4"
            )));
        }
        Ok(Self {
            mmio_base: raw.mmio_base,
            mem_size,
            mem_addr: raw.mem_addr,
            panic_on: raw.panic_on,
            devfn,
            intx_pin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = TestdevConfig::parse(r#"{"mmio-base": 4096, "mem-size": "2M", "panic-on": "plug"}"#).unwrap();
        assert_eq!(c.mmio_base, Some(4096));
        assert_eq!(c.mem_size, Some(2 << 20));
        assert_eq!(c.panic_on.as_deref(), Some("plug"));
        assert_eq!(TestdevConfig::parse("").unwrap().mmio_base, None);
        for bad in [
            r#"{"mmio-base": 12}"#,
            r#"{"mem-size": "3K"}"#,
            r#"{"mem-addr": 4096}"#,
            r#"{"panic-on": "nowhere"}"#,
            r#"{"bogus": 1}"#,
            r#"{"intx-pin": 5}"#,
            r#"{"devfn": 256}"#,
            "[",
        ] {
            assert!(TestdevConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
