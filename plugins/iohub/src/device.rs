//! The iohub device: a PCI host-bridge function with four INTx lines.
//!
//! Config space (the guest's view, read-only but for the routes):
//! vendor 0x1b36, device 0x0008, class 0x0600 (host bridge); offsets
//! 0x60..0x63 are the PIRQ A..D route registers, PIIX style: the GSI of the
//! line, or bit 7 set for "not routed". Writing one re-registers that
//! line's irqfd on the new GSI.

use std::sync::Arc;

use dmhost_plugin_api::{parse_config, DeviceModel, Host, IntxRoute, PlugInfo, PluginError};
use serde::Deserialize;

use crate::{
    lines::{IrqfdHost, Line, Resampler, Source, NUM_LINES},
    migration::{self, LineSnapshot},
    KIND,
};

/// IOAPIC pins: GSIs a line may be routed to.
pub const MAX_GSI: u32 = 24;
/// Config-space offset of the PIRQ A route register.
pub const PIRQ_ROUTE: u32 = 0x60;
/// Route register value: the line goes nowhere.
pub const ROUTE_DISABLED: u8 = 0x80;

const VENDOR_ID: u16 = 0x1b36;
const DEVICE_ID: u16 = 0x0008;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IohubConfig {
    /// GSI of PIRQ A; B..D follow.
    pub gsi_base: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    gsi_base: Option<u32>,
}

impl IohubConfig {
    pub fn parse(text: &str) -> Result<Self, PluginError> {
        let raw: Raw = parse_config(KIND, text)?;
        let gsi_base = raw.gsi_base.unwrap_or(16);
        if gsi_base.checked_add(NUM_LINES as u32).is_none_or(|end| end > MAX_GSI) {
            return Err(PluginError::config(format!(
                "{KIND} gsi-base {gsi_base}: lines {gsi_base}..{} must be below {MAX_GSI}",
                gsi_base.saturating_add(NUM_LINES as u32)
            )));
        }
        Ok(Self { gsi_base })
    }
}

/// The line a device function's pin lands on: the standard PCI swizzle.
pub fn swizzle(devfn: u32, pin: u32) -> Result<usize, PluginError> {
    if devfn > 0xff || !(1..=4).contains(&pin) {
        return Err(PluginError::state(format!(
            "INTx devfn {devfn:#x} pin {pin}: devfn must be < 256, pin 1..=4"
        )));
    }
    let slot = devfn >> 3;
    Ok(((slot + pin - 1) % NUM_LINES as u32) as usize)
}

pub struct Iohub {
    id: String,
    host: Host,
    /// Route of each line (GSI or none); survives unplug, migrates.
    routes: [Option<u32>; NUM_LINES],
    /// Held sources kept across unplug / before plug (migration).
    lines: Arc<Vec<Line>>,
    resampler: Option<Resampler>,
    plugged: bool,
}

impl Iohub {
    pub fn new(id: &str, config: IohubConfig, host: Host) -> Self {
        let routes = std::array::from_fn(|i| Some(config.gsi_base + i as u32));
        Self { id: id.to_owned(), host, routes, lines: Arc::new(Vec::new()), resampler: None, plugged: false }
    }

    fn irq_host(&self) -> &dyn IrqfdHost {
        &self.host
    }

    fn line(&self, devfn: u32, pin: u32) -> Result<&Line, PluginError> {
        let i = swizzle(devfn, pin)?;
        self.lines
            .get(i)
            .filter(|_| self.plugged)
            .ok_or_else(|| PluginError::state(format!("iohub {} is not plugged", self.id)))
    }

    fn snapshot(&self) -> Vec<LineSnapshot> {
        (0..NUM_LINES)
            .map(|i| LineSnapshot {
                gsi: self.routes[i],
                held: self.lines.get(i).map(|l| l.held().into_iter().collect()).unwrap_or_default(),
            })
            .collect()
    }

    fn config_byte(&self, offset: u32) -> u8 {
        let id = (u32::from(DEVICE_ID) << 16) | u32::from(VENDOR_ID);
        match offset {
            0..=3 => id.to_le_bytes()[offset as usize],
            0x0a => 0x00, // subclass: host bridge
            0x0b => 0x06, // class: bridge
            o if (PIRQ_ROUTE..PIRQ_ROUTE + NUM_LINES as u32).contains(&o) => {
                self.routes[(o - PIRQ_ROUTE) as usize].map_or(ROUTE_DISABLED, |g| g as u8)
            }
            _ => 0,
        }
    }

    fn set_route(&mut self, line: usize, value: u8) -> Result<(), PluginError> {
        let gsi = if value & ROUTE_DISABLED != 0 {
            None
        } else if u32::from(value) < MAX_GSI {
            Some(u32::from(value))
        } else {
            return Err(PluginError::state(format!(
                "iohub {}: PIRQ {line} route {value} is not a GSI",
                self.id
            )));
        };
        self.routes[line] = gsi;
        if let Some(l) = self.lines.get(line).filter(|_| self.plugged) {
            l.reroute(self.irq_host(), gsi)?;
        }
        Ok(())
    }
}

impl DeviceModel for Iohub {
    fn plug(&mut self, _info: PlugInfo) -> Result<(), PluginError> {
        let held: Vec<Vec<Source>> =
            (0..NUM_LINES).map(|i| self.lines.get(i).map(Line::held).unwrap_or_default()).collect();
        let mut lines = Vec::with_capacity(NUM_LINES);
        for (i, h) in held.into_iter().enumerate() {
            let l = Line::new(i as u32, self.routes[i])?;
            l.restore(h.into_iter().collect(), self.routes[i]);
            lines.push(l);
        }
        let lines = Arc::new(lines);
        for (i, l) in lines.iter().enumerate() {
            if let Err(e) = l.attach(self.irq_host()) {
                for l in &lines[..i] {
                    let _ = l.detach(self.irq_host());
                }
                return Err(e.into());
            }
        }
        match Resampler::start(&format!("iohub-{}", self.id), Arc::clone(&lines)) {
            Ok(r) => self.resampler = Some(r),
            Err(e) => {
                for l in lines.iter() {
                    let _ = l.detach(self.irq_host());
                }
                return Err(e.into());
            }
        }
        self.lines = lines;
        self.plugged = true;
        log::info!("iohub {} plugged: PIRQ A-D on GSIs {:?}", self.id, self.routes);
        Ok(())
    }

    fn unplug(&mut self) -> Result<(), PluginError> {
        if let Some(mut r) = self.resampler.take() {
            r.stop();
        }
        let mut first = None;
        for l in self.lines.iter() {
            if let Err(e) = l.detach(self.irq_host()) {
                log::warn!("iohub {}: {e}", self.id);
                first.get_or_insert(e);
            }
        }
        self.plugged = false;
        first.map_or(Ok(()), |e| Err(e.into()))
    }

    fn pci_config_read(&mut self, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset.checked_add(i as u32).filter(|&o| o < 256).map_or(0xff, |o| self.config_byte(o));
        }
        Ok(())
    }

    fn pci_config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), PluginError> {
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u32) else { break };
            if (PIRQ_ROUTE..PIRQ_ROUTE + NUM_LINES as u32).contains(&o) {
                self.set_route((o - PIRQ_ROUTE) as usize, b)?;
            }
        }
        Ok(())
    }

    fn state_version(&self) -> u32 {
        migration::STATE_VERSION
    }

    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        Ok(migration::encode(&self.snapshot()))
    }

    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        let lines =
            migration::decode(version, data, MAX_GSI).map_err(|e| PluginError::migration(e.to_string()))?;
        for (i, snap) in lines.into_iter().enumerate() {
            self.routes[i] = snap.gsi;
            match self.lines.get(i).filter(|_| self.plugged) {
                Some(l) => {
                    l.reroute(self.irq_host(), snap.gsi)?;
                    // A line held on the source is held here: raise it again.
                    l.detach(self.irq_host())?;
                    l.restore(snap.held, snap.gsi);
                    l.attach(self.irq_host())?;
                }
                None => {
                    if self.lines.len() != NUM_LINES {
                        let mut v = Vec::with_capacity(NUM_LINES);
                        for j in 0..NUM_LINES {
                            v.push(Line::new(j as u32, self.routes[j])?);
                        }
                        self.lines = Arc::new(v);
                    }
                    self.lines[i].restore(snap.held, snap.gsi);
                }
            }
        }
        Ok(())
    }

    fn intx_set(&mut self, devfn: u32, pin: u32, level: bool) -> Result<(), PluginError> {
        let line = self.line(devfn, pin)?;
        let source = Source { devfn: devfn as u8, pin: pin as u8 };
        let count = line.set(self.irq_host(), source, level)?;
        log::trace!(
            "iohub {}: devfn {devfn:#x} pin {pin} -> {level}: line {} count {count}",
            self.id,
            line.index
        );
        Ok(())
    }

    fn intx_route(&mut self, devfn: u32, pin: u32) -> Result<IntxRoute, PluginError> {
        let line = self.line(devfn, pin)?;
        let gsi = line.gsi().ok_or_else(|| {
            PluginError::state(format!("iohub {}: PIRQ {} is not routed", self.id, line.index))
        })?;
        Ok(IntxRoute { line: line.index, gsi, irqfd: line.irqfd(), resamplefd: line.resamplefd() })
    }
}

impl Drop for Iohub {
    fn drop(&mut self) {
        if self.plugged {
            let _ = self.unplug();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swizzle_follows_slot_and_pin() {
        assert_eq!(swizzle(0, 1).unwrap(), 0);
        assert_eq!(swizzle(1 << 3, 1).unwrap(), 1);
        assert_eq!(swizzle(3 << 3, 2).unwrap(), 0);
        assert_eq!(swizzle((2 << 3) | 5, 4).unwrap(), 1);
        assert!(swizzle(256, 1).is_err());
        assert!(swizzle(0, 0).is_err());
        assert!(swizzle(0, 5).is_err());
    }

    #[test]
    fn config_parses_and_rejects() {
        assert_eq!(IohubConfig::parse("").unwrap().gsi_base, 16);
        assert_eq!(IohubConfig::parse(r#"{"gsi-base": 20}"#).unwrap().gsi_base, 20);
        for bad in [r#"{"gsi-base": 21}"#, r#"{"gsi-base": 4294967295}"#, r#"{"x": 1}"#, "["] {
            assert!(IohubConfig::parse(bad).is_err(), "{bad}");
        }
    }
}
