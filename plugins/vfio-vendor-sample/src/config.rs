//! The sample driver's configuration (JSON, kebab-case).

use dmhost_plugin_api::{backend::ConfigSize as Size, parse_config, PluginError};
use serde::Deserialize;

use crate::{pages::PAGE_SIZE, DRIVER_NAME};

/// Largest internal state accepted.
pub const MAX_STATE_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SampleConfig {
    /// Size of the internal state that migrates (a multiple of 4 KiB).
    pub state_size: u64,
    /// Offer PRE_COPY (VFIO_MIGRATION_PRE_COPY).
    pub pre_copy: bool,
    /// Offer the P2P states (VFIO_MIGRATION_P2P).
    pub p2p: bool,
    /// Run the background thread that keeps changing state while RUNNING.
    pub background: bool,
    /// Pages the background thread changes per tick.
    pub dirty_pages_per_tick: u32,
    /// Tick period in microseconds.
    pub tick_us: u64,
    /// Seed of the deterministic page-choice sequence.
    pub seed: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    state_size: Option<Size>,
    pre_copy: Option<bool>,
    p2p: Option<bool>,
    background: Option<bool>,
    dirty_pages_per_tick: Option<u32>,
    tick_us: Option<u64>,
    seed: Option<u64>,
}

impl SampleConfig {
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(DRIVER_NAME, text)?;
        let state_size = match raw.state_size {
            None => 64 << 20,
            Some(s) => {
                s.bytes().map_err(|e| PluginError::config(format!("{DRIVER_NAME} state-size: {e}")))?
            }
        };
        if state_size == 0 || state_size % PAGE_SIZE as u64 != 0 || state_size > MAX_STATE_SIZE {
            return Err(PluginError::config(format!(
                "{DRIVER_NAME} state-size {state_size} must be a non-zero multiple of 4096 up to {MAX_STATE_SIZE}"
            )));
        }
        let tick_us = raw.tick_us.unwrap_or(1000);
        if !(50..=1_000_000).contains(&tick_us) {
            return Err(PluginError::config(format!(
                "{DRIVER_NAME} tick-us {tick_us} must be within 50..=1000000"
            )));
        }
        Ok(Self {
            state_size,
            pre_copy: raw.pre_copy.unwrap_or(true),
            p2p: raw.p2p.unwrap_or(true),
            background: raw.background.unwrap_or(true),
            dirty_pages_per_tick: raw.dirty_pages_per_tick.unwrap_or(8),
            tick_us,
            seed: raw.seed.unwrap_or(0x5eed),
        })
    }

    pub fn pages(&self) -> usize {
        (self.state_size / PAGE_SIZE as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        let c = SampleConfig::parse("{}").unwrap();
        assert_eq!(c.state_size, 64 << 20);
        assert!(c.pre_copy && c.p2p && c.background);
        let c = SampleConfig::parse(r#"{"state-size":"1M","p2p":false}"#).unwrap();
        assert_eq!((c.pages(), c.p2p), (256, false));
        for bad in [
            r#"{"state-size":"3K"}"#,
            r#"{"state-size":0}"#,
            r#"{"state-size":"2G"}"#,
            r#"{"tick-us":1}"#,
            r#"{"bogus":1}"#,
            "[",
        ] {
            assert!(SampleConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
