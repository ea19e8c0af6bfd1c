//! The PCI host bridge: configuration mechanism #1 on ports `0xCF8`
//! (CONFIG_ADDRESS, a 32-bit latch) and `0xCFC..0xCFF` (CONFIG_DATA), one
//! bus (0), 32 slots, function 0 only.
//!
//! - Slot 0 is the host bridge itself ([`HOST_BRIDGE_VENDOR`]:[`HOST_BRIDGE_DEVICE`],
//!   class 06/00/00), emulated here, read-only.
//! - **Which devices are PCI functions**: a device is one when, right after
//!   it is plugged, a 2-byte config read of offset 0 (vendor ID) through
//!   the ABI answers something other than `0xffff` (or `0x0000`). The
//!   `DeviceModel` default for `pci_config_read` fills all ones, so a
//!   plugin that does not implement config space is never put on the bus;
//!   nothing needs to list device kinds. It gets the slot the config asked
//!   for (`addr = "05.0"` on the `[[device]]`, see [`parse_addr`] and
//!   [`PciBus::reserve`]) or the lowest free slot, in plug order.
//! - Config cycles go to the owning device's `pci_config_read/write`
//!   (the plugin checks writes: the guest is untrusted); unclaimed slots,
//!   other buses, functions other than 0 and a disabled CONFIG_ADDRESS read
//!   as all ones and drop writes. Errors from a device read as all ones and
//!   are logged, rate-limited.
//! - The CONFIG_ADDRESS latch is VM state: it migrates with the irqchips
//!   ([`crate::vm::VmState`]).
//!
//! BARs are placed by the guest in the MMIO window
//! [`MMIO_WINDOW_BASE`]..[`MMIO_WINDOW_END`] below 4 GiB (above guest RAM,
//! below the IOAPIC).

pub mod irq;
pub mod msi;
pub mod vfio;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, RwLock},
    time::Duration,
};

use dmhost_plugin_api::{IoSpace, PluginError, RSlice, RSliceMut};

use crate::{
    devices::{DeviceImpl, HostDevice},
    vm::bus::{BusDevice, RateLimiter},
};

/// CONFIG_ADDRESS.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// CONFIG_DATA (4 ports).
pub const CONFIG_DATA_PORT: u16 = 0xcfc;
/// Ports the bridge claims: `0xCF8..0xD00`.
pub const PORTS: u64 = 8;
/// Slots on bus 0.
pub const SLOTS: u8 = 32;
/// The host bridge at 00.0 (Red Hat, "QEMU PCIe host bridge").
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Where guests place BARs: above guest RAM (which ends by `0xC000_0000`),
/// below the IOAPIC.
pub const MMIO_WINDOW_BASE: u64 = 0xC000_0000;
pub const MMIO_WINDOW_END: u64 = 0xFEC0_0000;
/// Bus owner name of the bridge's ports (not a valid device id).
pub const BUS_OWNER: &str = "<pci-host>";
/// CONFIG_ADDRESS enable bit.
pub const ENABLE: u32 = 1 << 31;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    #[error("PCI address {0:?} is not a slot (0x01..=0x1f, optionally \".0\")")]
    BadAddr(String),
    #[error("PCI slot {slot:#04x} is taken by {id}")]
    SlotTaken { slot: u8, id: String },
}

/// Parse a device's PCI address: `"5"`, `"0x5"`, `"05"` or `"05.0"` (hex
/// slot, function 0; slot 0 is the host bridge).
pub fn parse_addr(s: &str) -> Result<u8, PciError> {
    let bad = || PciError::BadAddr(s.to_owned());
    let t = s.trim();
    let slot = match t.split_once('.') {
        Some((slot, "0")) => slot,
        Some(_) => return Err(bad()),
        None => t,
    };
    let slot = slot.strip_prefix("0x").unwrap_or(slot);
    let n = u8::from_str_radix(slot, 16).map_err(|_| bad())?;
    if n == 0 || n >= SLOTS {
        return Err(bad());
    }
    Ok(n)
}

/// What a CONFIG_DATA access reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigTarget {
    pub slot: u8,
    /// Config-space offset of the first byte.
    pub offset: u32,
}

/// Decode a CONFIG_DATA access of `len` bytes at `0xCFC + port_offset`
/// under CONFIG_ADDRESS `address`; `None` when it reaches no function
/// (disabled, another bus, function != 0, or straddling the data port).
pub fn decode(address: u32, port_offset: u64, len: usize) -> Option<ConfigTarget> {
    if address & ENABLE == 0
        || !matches!(len, 1 | 2 | 4)
        || port_offset.checked_add(len as u64).is_none_or(|end| end > 4)
    {
        return None;
    }
    let bus = (address >> 16) & 0xff;
    let slot = ((address >> 11) & 0x1f) as u8;
    let function = (address >> 8) & 0x7;
    if bus != 0 || function != 0 {
        return None;
    }
    Some(ConfigTarget { slot, offset: (address & 0xfc) + port_offset as u32 })
}

struct Slot {
    id: String,
    device: Arc<HostDevice>,
}

/// A PCI function as listed by [`PciBus::functions`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PciFunction {
    pub slot: u8,
    pub id: String,
    pub vendor: u16,
    pub device: u16,
}

/// The host bridge and bus 0.
pub struct PciBus {
    address: Mutex<u32>,
    slots: RwLock<BTreeMap<u8, Slot>>,
    reserved: Mutex<BTreeMap<String, u8>>,
    host_config: [u8; 256],
    errors: RateLimiter,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn host_bridge_config() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
    c[2..4].copy_from_slice(&HOST_BRIDGE_DEVICE.to_le_bytes());
    c[4..6].copy_from_slice(&0x0006u16.to_le_bytes()); // memory + master
    c[0x0a] = 0x00; // subclass: host bridge
    c[0x0b] = 0x06; // class: bridge
    c[0x2c..0x2e].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&0x1100u16.to_le_bytes());
    c
}

/// Config read through the device's ABI object (or host-linked model).
pub fn device_config_read(dev: &HostDevice, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
    match &mut *dev.lock() {
        DeviceImpl::Plugin(d) => d.pci_config_read(offset, RSliceMut::from_mut_slice(data)).into_result(),
        DeviceImpl::Builtin(d) => d.pci_config_read(offset, data),
        DeviceImpl::Remote(d) => d.pci_config_read(offset, data),
    }
}

/// Config write through the device's ABI object (or host-linked model).
pub fn device_config_write(dev: &HostDevice, offset: u32, data: &[u8]) -> Result<(), PluginError> {
    match &mut *dev.lock() {
        DeviceImpl::Plugin(d) => d.pci_config_write(offset, RSlice::from_slice(data)).into_result(),
        DeviceImpl::Builtin(d) => d.pci_config_write(offset, data),
        DeviceImpl::Remote(d) => d.pci_config_write(offset, data),
    }
}

impl PciBus {
    pub fn new() -> Self {
        Self {
            address: Mutex::new(0),
            slots: RwLock::new(BTreeMap::new()),
            reserved: Mutex::new(BTreeMap::new()),
            host_config: host_bridge_config(),
            errors: RateLimiter::new(5, Duration::from_secs(1)),
        }
    }

    /// The CONFIG_ADDRESS latch (migrates with the VM state).
    pub fn config_address(&self) -> u32 {
        *lock(&self.address)
    }

    pub fn set_config_address(&self, v: u32) {
        *lock(&self.address) = v;
    }

    /// Ask for `slot` for device `id`, plugged later. Refused when another
    /// device has or asked for it.
    pub fn reserve(&self, id: &str, slot: u8) -> Result<(), PciError> {
        if slot == 0 || slot >= SLOTS {
            return Err(PciError::BadAddr(format!("{slot:#x}")));
        }
        if let Some(s) = self.slots.read().unwrap_or_else(|p| p.into_inner()).get(&slot) {
            return Err(PciError::SlotTaken { slot, id: s.id.clone() });
        }
        let mut r = lock(&self.reserved);
        if let Some((other, _)) = r.iter().find(|(o, &s)| s == slot && o.as_str() != id) {
            return Err(PciError::SlotTaken { slot, id: other.clone() });
        }
        r.insert(id.to_owned(), slot);
        Ok(())
    }

    /// Put a just-plugged device on the bus if it is a PCI function (see
    /// the module docs); returns its slot.
    pub fn attach(&self, device: &Arc<HostDevice>) -> Option<u8> {
        let reserved = lock(&self.reserved).remove(&device.id);
        let mut id = [0u8; 2];
        if device_config_read(device, 0, &mut id).is_err() {
            return None;
        }
        let vendor = u16::from_le_bytes(id);
        if vendor == 0xffff || vendor == 0 {
            return None;
        }
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let taken: Vec<u8> = lock(&self.reserved).values().copied().collect();
        let slot = match reserved {
            Some(s) if !slots.contains_key(&s) => s,
            Some(s) => {
                log::warn!("pci: slot {s:#04x} asked for by {} is taken; using a free one", device.id);
                (1..SLOTS).find(|s| !slots.contains_key(s) && !taken.contains(s))?
            }
            None => match (1..SLOTS).find(|s| !slots.contains_key(s) && !taken.contains(s)) {
                Some(s) => s,
                None => {
                    log::warn!("pci: no free slot on bus 0 for {}", device.id);
                    return None;
                }
            },
        };
        slots.insert(slot, Slot { id: device.id.clone(), device: Arc::clone(device) });
        log::info!("pci: {} ({vendor:04x}) at 00:{slot:02x}.0", device.id);
        Some(slot)
    }

    /// Take device `id` off the bus (before it is unplugged).
    pub fn detach(&self, id: &str) {
        lock(&self.reserved).remove(id);
        self.slots.write().unwrap_or_else(|p| p.into_inner()).retain(|_, s| s.id != id);
    }

    /// The slot of device `id`.
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).iter().find(|(_, s)| s.id == id).map(|(&n, _)| n)
    }

    fn device_at(&self, slot: u8) -> Option<Arc<HostDevice>> {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).get(&slot).map(|s| Arc::clone(&s.device))
    }

    /// The functions on bus 0, the host bridge first.
    pub fn functions(&self) -> Vec<PciFunction> {
        let mut v = vec![PciFunction {
            slot: 0,
            id: BUS_OWNER.to_owned(),
            vendor: HOST_BRIDGE_VENDOR,
            device: HOST_BRIDGE_DEVICE,
        }];
        let list: Vec<(u8, String, Arc<HostDevice>)> = self
            .slots
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&n, s)| (n, s.id.clone(), Arc::clone(&s.device)))
            .collect();
        for (slot, id, dev) in list {
            let mut b = [0xffu8; 4];
            let _ = device_config_read(&dev, 0, &mut b);
            v.push(PciFunction {
                slot,
                id,
                vendor: u16::from_le_bytes([b[0], b[1]]),
                device: u16::from_le_bytes([b[2], b[3]]),
            });
        }
        v
    }

    /// A config read of `slot` (host API; the guest goes through the ports).
    pub fn config_read(&self, slot: u8, offset: u32, data: &mut [u8]) {
        if slot == 0 {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.host_config.get(offset as usize + i).copied().unwrap_or(0xff);
            }
            return;
        }
        let Some(dev) = self.device_at(slot) else {
            data.fill(0xff);
            return;
        };
        if let Err(e) = device_config_read(&dev, offset, data) {
            data.fill(0xff);
            self.report(&dev.id, "read", offset, &e);
        }
    }

    /// A config write to `slot`; the device checks it.
    pub fn config_write(&self, slot: u8, offset: u32, data: &[u8]) {
        if slot == 0 {
            return; // the host bridge's config space is read-only
        }
        let Some(dev) = self.device_at(slot) else {
            return;
        };
        if let Err(e) = device_config_write(&dev, offset, data) {
            self.report(&dev.id, "write", offset, &e);
        }
    }

    fn report(&self, id: &str, what: &str, offset: u32, e: &PluginError) {
        self.errors.log(|suppressed| {
            let more =
                if suppressed > 0 { format!(" ({suppressed} more suppressed)") } else { String::new() };
            log::warn!("pci: {id}: config {what} at {offset:#x}: {e}{more}");
        });
    }
}

impl BusDevice for PciBus {
    fn read(&self, space: IoSpace, addr: u64, data: &mut [u8]) {
        let Some(off) = addr.checked_sub(u64::from(CONFIG_ADDRESS_PORT)).filter(|_| space == IoSpace::Pio)
        else {
            data.fill(0xff);
            return;
        };
        if off < 4 {
            if off == 0 && data.len() == 4 {
                data.copy_from_slice(&self.config_address().to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        match decode(self.config_address(), off - 4, data.len()) {
            Some(t) => self.config_read(t.slot, t.offset, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, space: IoSpace, addr: u64, data: &[u8]) {
        let Some(off) = addr.checked_sub(u64::from(CONFIG_ADDRESS_PORT)).filter(|_| space == IoSpace::Pio)
        else {
            return;
        };
        if off < 4 {
            // Only a full dword write to 0xCF8 sets the latch (as i440FX).
            if let (0, Ok(b)) = (off, <[u8; 4]>::try_from(data)) {
                self.set_config_address(u32::from_le_bytes(b));
            }
            return;
        }
        if let Some(t) = decode(self.config_address(), off - 4, data.len()) {
            self.config_write(t.slot, t.offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_and_refuse() {
        assert_eq!(parse_addr("5"), Ok(5));
        assert_eq!(parse_addr("0x1f"), Ok(0x1f));
        assert_eq!(parse_addr("0a.0"), Ok(10));
        for bad in ["0", "20", "05.1", "x", "", "-1", "05.", "1234"] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn decoding_follows_mechanism_1() {
        let a = ENABLE | (3 << 11) | 0x10;
        assert_eq!(decode(a, 0, 4), Some(ConfigTarget { slot: 3, offset: 0x10 }));
        assert_eq!(decode(a, 2, 2), Some(ConfigTarget { slot: 3, offset: 0x12 }));
        assert_eq!(decode(a | 3, 3, 1), Some(ConfigTarget { slot: 3, offset: 0x13 }));
        assert_eq!(decode(a, 2, 4), None, "straddles the data port");
        assert_eq!(decode(a & !ENABLE, 0, 4), None);
        assert_eq!(decode(a | (1 << 16), 0, 4), None, "bus 1");
        assert_eq!(decode(a | (1 << 8), 0, 4), None, "function 1");
        assert_eq!(decode(a, 0, 3), None);
    }

    #[test]
    fn empty_bus_shows_only_the_host_bridge() {
        let bus = PciBus::new();
        let rd = |addr: u32| {
            bus.write(IoSpace::Pio, 0xcf8, &addr.to_le_bytes());
            let mut b = [0u8; 4];
            bus.read(IoSpace::Pio, 0xcfc, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(rd(ENABLE), u32::from(HOST_BRIDGE_DEVICE) << 16 | u32::from(HOST_BRIDGE_VENDOR));
        assert_eq!(rd(ENABLE | 8) >> 16, 0x0600, "class code");
        for slot in 1..32u32 {
            assert_eq!(rd(ENABLE | slot << 11), 0xffff_ffff);
        }
        let mut b = [0u8; 4];
        bus.read(IoSpace::Pio, 0xcf8, &mut b);
        assert_eq!(u32::from_le_bytes(b), ENABLE | 31 << 11);
        // A byte write to 0xCF8 does not touch the latch.
        bus.write(IoSpace::Pio, 0xcf8, &[0]);
        assert_eq!(bus.config_address(), ENABLE | 31 << 11);
        // Writes to the bridge are ignored.
        bus.write(IoSpace::Pio, 0xcf8, &ENABLE.to_le_bytes());
        bus.write(IoSpace::Pio, 0xcfc, &[0; 4]);
        assert_eq!(rd(ENABLE) & 0xffff, u32::from(HOST_BRIDGE_VENDOR));
    }

    #[test]
    fn reservations_conflict() {
        let bus = PciBus::new();
        bus.reserve("a", 5).unwrap();
        bus.reserve("a", 5).unwrap();
        assert!(matches!(bus.reserve("b", 5), Err(PciError::SlotTaken { .. })));
        assert!(bus.reserve("b", 0).is_err());
        assert!(bus.reserve("b", 32).is_err());
    }
}
