//! The guest's view of the device's PCI configuration space.
//!
//! Built from the device's own config space (IDs, class, capabilities)
//! and its region info (BAR sizes), then fully emulated with per-byte write
//! masks: the guest sizes and moves BARs here (the device's BARs are never
//! written), command and MSI/MSI-X control are virtualised and forwarded,
//! everything else is read-only. Writes report their side effects for the
//! device to act on (decode changes, BAR moves, MSI enable/route changes).

use thiserror::Error;

use crate::backend::{BackendError, VfioBackend};
use dmhost_plugin_api::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_ROM_REGION_INDEX,
};

/// Conventional config space; the extended space (to 4 KiB) reads as zero.
pub const CONFIG_LEN: usize = 256;
pub const EXT_CONFIG_LEN: u32 = 4096;

pub const PCI_COMMAND: usize = 0x04;
pub const PCI_STATUS: usize = 0x06;
pub const PCI_BAR0: usize = 0x10;
pub const PCI_ROM: usize = 0x30;
pub const PCI_CAP_PTR: usize = 0x34;
pub const PCI_INT_LINE: usize = 0x3c;
pub const PCI_INT_PIN: usize = 0x3d;

pub const CMD_IO: u16 = 1 << 0;
pub const CMD_MEM: u16 = 1 << 1;
pub const CMD_INTX_DISABLE: u16 = 1 << 10;
const CMD_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
const STATUS_CAP_LIST: u16 = 1 << 4;

const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_MSIX: u8 = 0x11;
const CAP_ID_EXP: u8 = 0x10;

/// PCI Express capability: Device Capabilities (cap + 4) and Device
/// Control (cap + 8).
pub const EXP_DEVCAP: usize = 4;
pub const EXP_DEVCTL: usize = 8;
/// DevCap: Function Level Reset capable.
pub const EXP_DEVCAP_FLR: u32 = 1 << 28;
/// DevCtl: initiate Function Level Reset (always reads 0).
pub const EXP_DEVCTL_BCR_FLR: u16 = 1 << 15;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config access at {offset:#x} of {len} bytes is outside config space")]
    OutOfRange { offset: u32, len: usize },
    #[error("reading the device's config space: {0}")]
    Device(#[source] BackendError),
    #[error("saved config space is {0} bytes, expected {CONFIG_LEN}")]
    SavedLength(usize),
    #[error(
        "saved config space is for {saved:04x}:{saved_dev:04x}, this device is {ours:04x}:{ours_dev:04x}"
    )]
    Identity { saved: u16, saved_dev: u16, ours: u16, ours_dev: u16 },
}

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub index: u32,
    pub kind: BarKind,
    pub size: u64,
    pub prefetch: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    pub offset: usize,
    pub is64: bool,
    pub per_vector_mask: bool,
}

/// The MSI-X capability: where its table and PBA live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: usize,
    /// Vectors (the encoded N-1 plus one): 1..=2048.
    pub table_size: u16,
    pub table_bar: u32,
    pub table_offset: u64,
    pub pba_bar: u32,
    pub pba_offset: u64,
}

/// Bytes of one MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// MSI-X message control: enable, function mask.
pub const MSIX_CTRL_ENABLE: u16 = 1 << 15;
pub const MSIX_CTRL_MASKALL: u16 = 1 << 14;

impl MsixCap {
    /// Decode the capability at `offset` of `bytes`: message control, then
    /// the table and PBA dwords (BAR indicator in bits 2:0, offset above).
    pub fn parse(bytes: &[u8], offset: usize) -> Option<Self> {
        let b = bytes.get(offset..offset.checked_add(12)?)?;
        let ctl = rd16(b, 2);
        let (table, pba) = (rd32(b, 4), rd32(b, 8));
        Some(Self {
            offset,
            table_size: (ctl & 0x7ff) + 1,
            table_bar: table & 7,
            table_offset: u64::from(table & !7),
            pba_bar: pba & 7,
            pba_offset: u64::from(pba & !7),
        })
    }

    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size) * MSIX_ENTRY_SIZE
    }

    /// One pending bit per vector, in whole qwords.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.table_size).div_ceil(64) * 8
    }

    /// Why the table or PBA cannot live where the capability says, given
    /// each BAR's kind and size.
    pub fn check(&self, bars: &[Option<Bar>; 6]) -> Result<(), String> {
        for (what, bar, off, len) in [
            ("table", self.table_bar, self.table_offset, self.table_len()),
            ("PBA", self.pba_bar, self.pba_offset, self.pba_len()),
        ] {
            let b = bars.get(bar as usize).copied().flatten();
            match b {
                Some(b) if b.kind != BarKind::Io && off + len <= b.size => {}
                Some(b) => {
                    return Err(format!(
                        "MSI-X {what} at BAR{bar}+{off:#x} ({len} bytes) does not fit the {:?} BAR of {:#x} bytes",
                        b.kind, b.size
                    ))
                }
                None => return Err(format!("MSI-X {what} is in BAR{bar}, which the device does not have")),
            }
        }
        let (t, p) = (self.table_offset, self.pba_offset);
        if self.table_bar == self.pba_bar && t < p + self.pba_len() && p < t + self.table_len() {
            return Err(format!("MSI-X table at {t:#x} and PBA at {p:#x} overlap"));
        }
        Ok(())
    }
}

/// A side effect of a config write the device must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEffect {
    /// IO or memory decode toggled.
    Decode,
    /// BAR `index` (or the ROM, index 6) was written.
    BarWritten(u32),
    MsiControl,
    /// MSI address/data changed.
    MsiRoute,
    MsixControl,
    IntxDisable,
    /// The guest initiated a Function Level Reset (PCIe DevCtl bit 15 with
    /// FLR advertised in DevCap), as QEMU's pcie_cap_flr_write_config.
    FunctionReset,
    /// These bytes should reach the device's own config space.
    Forward {
        offset: usize,
        len: usize,
    },
}

#[derive(Debug, Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_LEN],
    wmask: [u8; CONFIG_LEN],
    bars: [Option<Bar>; 6],
    rom_size: u64,
    msi: Option<MsiCap>,
    msix: Option<MsixCap>,
    /// Offset of the PCI Express capability.
    exp: Option<usize>,
}

fn rd16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl ConfigSpace {
    /// Build from the device through `backend`.
    pub fn from_backend(backend: &dyn VfioBackend) -> Result<Self, ConfigError> {
        let mut raw = [0u8; CONFIG_LEN];
        backend.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, &mut raw).map_err(ConfigError::Device)?;
        let sizes: Vec<u64> = (0..7).map(|i| backend.region_info(i).map(|r| r.size).unwrap_or(0)).collect();
        let rom = sizes[VFIO_PCI_ROM_REGION_INDEX as usize];
        let intx = backend.irq_info(VFIO_PCI_INTX_IRQ_INDEX).map(|i| i.count).unwrap_or(0);
        Ok(Self::build(raw, &sizes[..6], rom, intx > 0))
    }

    /// Build from raw device config bytes and region sizes.
    pub fn build(raw: [u8; CONFIG_LEN], bar_sizes: &[u64], rom_size: u64, has_intx: bool) -> Self {
        let mut c = Self {
            bytes: raw,
            wmask: [0; CONFIG_LEN],
            bars: [None; 6],
            rom_size: 0,
            msi: None,
            msix: None,
            exp: None,
        };
        c.bytes[0x0e] &= 0x80; // header type 0 (keep the multifunction bit)
        c.set16(PCI_COMMAND, 0);
        c.wmask[PCI_COMMAND..PCI_COMMAND + 2].copy_from_slice(&CMD_WRITABLE.to_le_bytes());
        c.wmask[0x0c] = 0xff; // cache line size
        c.wmask[0x0d] = 0xff; // latency timer
        c.wmask[PCI_INT_LINE] = 0xff;
        c.bytes[PCI_INT_PIN] = if has_intx { c.bytes[PCI_INT_PIN].clamp(1, 4) } else { 0 };

        // BARs: kind from the device's low bits, size from region info.
        let mut i = 0;
        while i < 6 {
            let at = PCI_BAR0 + 4 * i;
            let low = rd32(&raw, at);
            let size = bar_sizes.get(i).copied().unwrap_or(0);
            c.set32(at, 0);
            if size == 0 {
                i += 1;
                continue;
            }
            let kind = if low & 1 == 1 {
                BarKind::Io
            } else if (low >> 1) & 3 == 2 && i < 5 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            };
            let min = if kind == BarKind::Io { 4 } else { 16 };
            let size = size.max(min).checked_next_power_of_two().unwrap_or(1 << 63);
            let prefetch = kind != BarKind::Io && low & 8 != 0;
            let flags = match kind {
                BarKind::Io => 1,
                BarKind::Mem32 => u32::from(prefetch) << 3,
                BarKind::Mem64 => 4 | (u32::from(prefetch) << 3),
            };
            let addr_mask = !(size - 1);
            let low_bits = if kind == BarKind::Io { 0x3 } else { 0xf };
            c.set32(at, flags);
            c.wmask[at..at + 4].copy_from_slice(&((addr_mask as u32) & !low_bits).to_le_bytes());
            c.bars[i] = Some(Bar { index: i as u32, kind, size, prefetch });
            if kind == BarKind::Mem64 {
                c.set32(at + 4, 0);
                c.wmask[at + 4..at + 8].copy_from_slice(&((addr_mask >> 32) as u32).to_le_bytes());
                i += 1;
            }
            i += 1;
        }

        // Expansion ROM: sized by region info, enable bit writable.
        c.set32(PCI_ROM, 0);
        if rom_size > 0 {
            let size = rom_size.max(2048).checked_next_power_of_two().unwrap_or(1 << 31);
            c.rom_size = size;
            let mask = (!(size - 1) as u32 & 0xffff_f800) | 1;
            c.wmask[PCI_ROM..PCI_ROM + 4].copy_from_slice(&mask.to_le_bytes());
        }

        c.walk_capabilities();
        c
    }

    /// Follow the capability list, dropping it where it is malformed, and
    /// virtualise MSI and MSI-X control.
    fn walk_capabilities(&mut self) {
        let status = rd16(&self.bytes, PCI_STATUS);
        if status & STATUS_CAP_LIST == 0 {
            self.bytes[PCI_CAP_PTR] = 0;
            return;
        }
        let mut link = PCI_CAP_PTR;
        let mut seen = 0;
        loop {
            let ptr = (self.bytes[link] & 0xfc) as usize;
            if ptr == 0 {
                break;
            }
            if ptr < 0x40 || ptr + 4 > CONFIG_LEN || seen >= 48 {
                log::warn!("vfio-pci: capability list breaks at {ptr:#x}; truncated");
                self.bytes[link] = 0;
                break;
            }
            seen += 1;
            match self.bytes[ptr] {
                CAP_ID_MSI => self.virtualise_msi(ptr),
                CAP_ID_MSIX => self.virtualise_msix(ptr),
                CAP_ID_EXP if ptr + EXP_DEVCTL + 2 <= CONFIG_LEN && self.exp.is_none() => {
                    self.exp = Some(ptr)
                }
                _ => {}
            }
            link = ptr + 1;
        }
        if let Some(cap) = self.exp {
            // Emulated, never forwarded nor writable (even under another
            // capability's mask when malformed ones overlap): reads 0.
            let flr = (EXP_DEVCTL_BCR_FLR >> 8) as u8;
            self.bytes[cap + EXP_DEVCTL + 1] &= !flr;
            self.wmask[cap + EXP_DEVCTL + 1] &= !flr;
        }
    }

    fn virtualise_msix(&mut self, at: usize) {
        let Some(cap) = MsixCap::parse(&self.bytes, at) else {
            return;
        };
        let ctl = rd16(&self.bytes, at + 2);
        self.set16(at + 2, ctl & 0x07ff); // disabled, unmasked
        match cap.check(&self.bars) {
            Ok(()) => {
                self.wmask[at + 3] = 0xc0; // enable, function mask
                self.msix = Some(cap);
            }
            Err(e) => log::warn!("vfio-pci: {e}; MSI-X left read-only (disabled)"),
        }
    }

    fn virtualise_msi(&mut self, at: usize) {
        let ctl = rd16(&self.bytes, at + 2);
        let is64 = ctl & (1 << 7) != 0;
        let per_vector_mask = ctl & (1 << 8) != 0;
        let len = 10 + if is64 { 4 } else { 0 } + if per_vector_mask { 10 } else { 0 };
        if at + len > CONFIG_LEN {
            return;
        }
        self.set16(at + 2, ctl & !0x0071); // disabled, one message enabled
        self.wmask[at + 2] = 0x71; // enable, multiple message enable
        self.wmask[at + 4..at + 8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        let data = if is64 {
            self.wmask[at + 8..at + 12].fill(0xff);
            at + 12
        } else {
            at + 8
        };
        self.wmask[data..data + 2].fill(0xff);
        if per_vector_mask {
            let mmc = (ctl >> 1) & 7;
            let vectors = 1u32 << mmc;
            let mask = if vectors >= 32 { u32::MAX } else { (1 << vectors) - 1 };
            self.wmask[data + 4..data + 8].copy_from_slice(&mask.to_le_bytes());
        }
        self.msi = Some(MsiCap { offset: at, is64, per_vector_mask });
    }

    fn set16(&mut self, at: usize, v: u16) {
        self.bytes[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, at: usize, v: u32) {
        self.bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn check(offset: u32, len: usize) -> Result<(), ConfigError> {
        let ok = matches!(len, 1 | 2 | 4 | 8)
            && offset.checked_add(len as u32).is_some_and(|end| end <= EXT_CONFIG_LEN);
        if ok {
            Ok(())
        } else {
            Err(ConfigError::OutOfRange { offset, len })
        }
    }

    pub fn read(&self, offset: u32, data: &mut [u8]) -> Result<(), ConfigError> {
        Self::check(offset, data.len())?;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
        Ok(())
    }

    /// Apply a guest write through the masks; returns the effects.
    pub fn write(&mut self, offset: u32, data: &[u8]) -> Result<Vec<ConfigEffect>, ConfigError> {
        Self::check(offset, data.len())?;
        let start = offset as usize;
        if start >= CONFIG_LEN {
            return Ok(Vec::new()); // extended space: nothing writable
        }
        let flr = self.flr_requested(start, data);
        let before = self.bytes;
        for (i, &v) in data.iter().enumerate() {
            let at = start + i;
            if at < CONFIG_LEN {
                let m = self.wmask[at];
                self.bytes[at] = (self.bytes[at] & !m) | (v & m);
            }
        }
        let mut fx = self.effects(&before, start, data.len().min(CONFIG_LEN - start));
        if flr {
            fx.push(ConfigEffect::FunctionReset);
        }
        Ok(fx)
    }

    /// Whether a write of `data` at `start` sets DevCtl's "initiate FLR"
    /// on a function whose DevCap advertises FLR. The bit itself is never
    /// writable, so it reads back 0.
    fn flr_requested(&self, start: usize, data: &[u8]) -> bool {
        let Some(cap) = self.exp else {
            return false;
        };
        let high = cap + EXP_DEVCTL + 1; // the byte holding bit 15
        let Some(&v) = high.checked_sub(start).and_then(|i| data.get(i)) else {
            return false;
        };
        v & (EXP_DEVCTL_BCR_FLR >> 8) as u8 != 0 && self.flr_capable()
    }

    /// The PCI Express capability's offset, if the device has one.
    pub fn express(&self) -> Option<usize> {
        self.exp
    }

    /// DevCap advertises Function Level Reset.
    pub fn flr_capable(&self) -> bool {
        self.exp.is_some_and(|cap| rd32(&self.bytes, cap + EXP_DEVCAP) & EXP_DEVCAP_FLR != 0)
    }

    /// Back to the state after a reset, as QEMU's pci_do_device_reset:
    /// every guest-writable bit cleared (command, interrupt line, cache
    /// line size, BAR and ROM addresses, MSI control/address/data/mask,
    /// MSI-X control); read-only bits (IDs, BAR types, table size) and the
    /// latency timer stay.
    pub fn reset(&mut self) {
        for (at, (b, m)) in self.bytes.iter_mut().zip(self.wmask.iter()).enumerate() {
            if at != 0x0d {
                *b &= !m;
            }
        }
    }

    fn effects(&self, before: &[u8; CONFIG_LEN], start: usize, len: usize) -> Vec<ConfigEffect> {
        let changed = |at: usize, n: usize| before[at..at + n] != self.bytes[at..at + n];
        let touches = |at: usize, n: usize| start < at + n && at < start + len;
        let mut fx = Vec::new();
        if touches(PCI_COMMAND, 2) {
            let (old, new) = (rd16(before, PCI_COMMAND), self.command());
            if (old ^ new) & (CMD_IO | CMD_MEM) != 0 {
                fx.push(ConfigEffect::Decode);
            }
            if (old ^ new) & CMD_INTX_DISABLE != 0 {
                fx.push(ConfigEffect::IntxDisable);
            }
            fx.push(ConfigEffect::Forward { offset: PCI_COMMAND, len: 2 });
        }
        for bar in 0..6u32 {
            let at = PCI_BAR0 + 4 * bar as usize;
            if touches(at, 4) && self.bar_register_owner(bar).is_some() {
                fx.push(ConfigEffect::BarWritten(self.bar_register_owner(bar).unwrap_or(bar)));
            }
        }
        if touches(PCI_ROM, 4) && self.rom_size > 0 {
            fx.push(ConfigEffect::BarWritten(VFIO_PCI_ROM_REGION_INDEX));
        }
        if let Some(msi) = self.msi {
            let end = msi.offset + if msi.is64 { 14 } else { 10 };
            if touches(msi.offset + 2, 2) && changed(msi.offset + 2, 2) {
                fx.push(ConfigEffect::MsiControl);
                fx.push(ConfigEffect::Forward { offset: msi.offset + 2, len: 2 });
            }
            if touches(msi.offset + 4, end - msi.offset - 4) && changed(msi.offset + 4, end - msi.offset - 4)
            {
                fx.push(ConfigEffect::MsiRoute);
            }
        }
        if let Some(msix) = self.msix {
            if touches(msix.offset + 2, 2) && changed(msix.offset + 2, 2) {
                fx.push(ConfigEffect::MsixControl);
                fx.push(ConfigEffect::Forward { offset: msix.offset + 2, len: 2 });
            }
        }
        fx.dedup();
        fx
    }

    /// The BAR a BAR register belongs to (the upper half of a 64-bit BAR
    /// belongs to the BAR below it).
    fn bar_register_owner(&self, reg: u32) -> Option<u32> {
        if let Some(b) = self.bars.get(reg as usize).copied().flatten() {
            return Some(b.index);
        }
        let below = reg.checked_sub(1)?;
        self.bars[below as usize].filter(|b| b.kind == BarKind::Mem64).map(|b| b.index)
    }

    pub fn command(&self) -> u16 {
        rd16(&self.bytes, PCI_COMMAND)
    }

    pub fn bars(&self) -> impl Iterator<Item = Bar> + '_ {
        self.bars.iter().flatten().copied()
    }

    pub fn bar(&self, index: u32) -> Option<Bar> {
        self.bars.get(index as usize).copied().flatten()
    }

    /// The address BAR `index` decodes at, or `None` while unassigned,
    /// being sized (all writable bits set) or with its decode disabled.
    pub fn bar_address(&self, index: u32) -> Option<u64> {
        let bar = self.bar(index)?;
        let at = PCI_BAR0 + 4 * index as usize;
        let cmd = self.command();
        let enabled = match bar.kind {
            BarKind::Io => cmd & CMD_IO != 0,
            _ => cmd & CMD_MEM != 0,
        };
        let lo_mask = rd32(&self.wmask, at);
        let lo = rd32(&self.bytes, at) & lo_mask;
        let (addr, sizing) = match bar.kind {
            BarKind::Mem64 => {
                let hi_mask = rd32(&self.wmask, at + 4);
                let hi = rd32(&self.bytes, at + 4) & hi_mask;
                (u64::from(lo) | (u64::from(hi) << 32), lo == lo_mask && hi == hi_mask)
            }
            _ => (u64::from(lo), lo == lo_mask),
        };
        (enabled && addr != 0 && !sizing && addr.checked_add(bar.size).is_some()).then_some(addr)
    }

    /// The ROM's address while enabled (and memory decode on).
    pub fn rom_address(&self) -> Option<u64> {
        let v = rd32(&self.bytes, PCI_ROM);
        let mask = rd32(&self.wmask, PCI_ROM) & !1;
        let addr = u64::from(v & mask);
        let on = self.rom_size > 0 && v & 1 != 0 && self.command() & CMD_MEM != 0;
        (on && addr != 0 && (v & mask) != mask).then_some(addr)
    }

    pub fn rom_size(&self) -> u64 {
        self.rom_size
    }

    pub fn msi(&self) -> Option<MsiCap> {
        self.msi
    }

    /// MSI enabled, the number of vectors enabled, address and data.
    pub fn msi_state(&self) -> Option<(bool, u32, u64, u32)> {
        let m = self.msi?;
        let ctl = rd16(&self.bytes, m.offset + 2);
        let lo = u64::from(rd32(&self.bytes, m.offset + 4));
        let (addr, data_at) = if m.is64 {
            (lo | (u64::from(rd32(&self.bytes, m.offset + 8)) << 32), m.offset + 12)
        } else {
            (lo, m.offset + 8)
        };
        let vectors = 1u32 << ((ctl >> 4) & 7).min(5);
        Some((ctl & 1 != 0, vectors, addr, u32::from(rd16(&self.bytes, data_at))))
    }

    pub fn msix(&self) -> Option<MsixCap> {
        self.msix
    }

    /// MSI-X message control: (enabled, function mask).
    pub fn msix_control(&self) -> (bool, bool) {
        let ctl = self.msix.map_or(0, |m| rd16(&self.bytes, m.offset + 2));
        (ctl & MSIX_CTRL_ENABLE != 0, ctl & MSIX_CTRL_MASKALL != 0)
    }

    pub fn msix_enabled(&self) -> bool {
        self.msix_control().0
    }

    pub fn intx_disabled(&self) -> bool {
        self.command() & CMD_INTX_DISABLE != 0
    }

    pub fn ids(&self) -> (u16, u16) {
        (rd16(&self.bytes, 0), rd16(&self.bytes, 2))
    }

    pub fn bytes(&self) -> &[u8; CONFIG_LEN] {
        &self.bytes
    }

    /// Migration: the guest-visible bytes.
    pub fn save(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// Migration: take the saved bytes through the write masks (so a stream
    /// cannot set read-only bits) for a device with the same identity.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), ConfigError> {
        if saved.len() != CONFIG_LEN {
            return Err(ConfigError::SavedLength(saved.len()));
        }
        let (ours, ours_dev) = self.ids();
        let (saved_id, saved_dev) = (rd16(saved, 0), rd16(saved, 2));
        if (saved_id, saved_dev) != (ours, ours_dev) {
            return Err(ConfigError::Identity { saved: saved_id, saved_dev, ours, ours_dev });
        }
        for (at, &v) in saved.iter().enumerate() {
            let m = self.wmask[at];
            self.bytes[at] = (self.bytes[at] & !m) | (v & m);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device with BAR0 4 KiB mem32, BAR2 64-bit prefetchable 1 MiB,
    /// BAR4 I/O 32 bytes, a 64 KiB ROM, MSI (64-bit, PVM) and MSI-X.
    fn sample() -> ConfigSpace {
        let mut raw = [0u8; CONFIG_LEN];
        raw[0..4].copy_from_slice(&[0xe5, 0x1d, 0x01, 0x00]);
        raw[PCI_COMMAND] = 0x07; // the device's own command: ignored
        raw[PCI_STATUS] = 0x10;
        raw[0x10..0x14].copy_from_slice(&0xfebf_0000u32.to_le_bytes()); // host address: hidden
        raw[0x18..0x1c].copy_from_slice(&0x0000_000cu32.to_le_bytes()); // 64-bit, prefetch
        raw[0x20..0x24].copy_from_slice(&0x0000_e001u32.to_le_bytes()); // I/O
        raw[PCI_CAP_PTR] = 0x40;
        raw[PCI_INT_PIN] = 1;
        raw[0x40] = CAP_ID_MSI;
        raw[0x41] = 0x60;
        raw[0x42..0x44].copy_from_slice(&((1u16 << 7) | (1 << 8) | (2 << 1)).to_le_bytes());
        raw[0x60] = CAP_ID_MSIX;
        raw[0x61] = 0x70;
        raw[0x62..0x64].copy_from_slice(&0x0007u16.to_le_bytes());
        raw[0x64..0x68].copy_from_slice(&0x0000_0800u32.to_le_bytes()); // table: BAR0+0x800
        raw[0x68..0x6c].copy_from_slice(&0x0000_0c02u32.to_le_bytes()); // PBA: BAR2+0xc00
        raw[0x70] = 0x09; // vendor specific
        raw[0x71] = 0x00;
        ConfigSpace::build(raw, &[4096, 0, 1 << 20, 0, 32, 0], 65536, true)
    }

    fn r32(c: &ConfigSpace, off: u32) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn w32(c: &mut ConfigSpace, off: u32, v: u32) -> Vec<ConfigEffect> {
        c.write(off, &v.to_le_bytes()).unwrap()
    }

    #[test]
    fn bar_sizing_protocol() {
        let mut c = sample();
        assert_eq!(r32(&c, 0x10), 0, "host BAR address hidden, mem32");
        w32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(r32(&c, 0x10), 0xffff_f000, "4 KiB mem32");
        // 64-bit prefetchable BAR2/3.
        w32(&mut c, 0x18, 0xffff_ffff);
        w32(&mut c, 0x1c, 0xffff_ffff);
        assert_eq!(r32(&c, 0x18), 0xfff0_000c, "1 MiB, 64-bit, prefetchable");
        assert_eq!(r32(&c, 0x1c), 0xffff_ffff);
        // I/O BAR4.
        w32(&mut c, 0x20, 0xffff_ffff);
        assert_eq!(r32(&c, 0x20), 0xffff_ffe1, "32 bytes of I/O");
        // Absent BARs read zero whatever is written.
        w32(&mut c, 0x14, 0xffff_ffff);
        w32(&mut c, 0x24, 0xffff_ffff);
        assert_eq!((r32(&c, 0x14), r32(&c, 0x24)), (0, 0));
        // ROM.
        w32(&mut c, 0x30, 0xffff_ffff);
        assert_eq!(r32(&c, 0x30), 0xffff_0001, "64 KiB ROM, enable bit writable");
        assert_eq!(c.rom_address(), None, "sizing value is not an address");
    }

    #[test]
    fn bar_addresses_follow_decode_and_sizing() {
        let mut c = sample();
        let fx = w32(&mut c, 0x10, 0xc000_0000);
        assert_eq!(fx, [ConfigEffect::BarWritten(0)]);
        assert_eq!(c.bar_address(0), None, "memory decode off");
        let fx = c.write(0x04, &CMD_MEM.to_le_bytes()).unwrap();
        assert!(fx.contains(&ConfigEffect::Decode));
        assert_eq!(c.bar_address(0), Some(0xc000_0000));
        w32(&mut c, 0x18, 0x0000_0000);
        let fx = w32(&mut c, 0x1c, 0x0000_0001);
        assert_eq!(fx, [ConfigEffect::BarWritten(2)], "upper half belongs to BAR2");
        assert_eq!(c.bar_address(2), Some(0x1_0000_0000), "64-bit address above 4 GiB");
        w32(&mut c, 0x18, 0x1000_0000);
        assert_eq!(c.bar_address(2), Some(0x1_1000_0000));
        w32(&mut c, 0x10, 0xffff_ffff);
        assert_eq!(c.bar_address(0), None, "being sized");
        assert_eq!(c.bar_address(4), None, "I/O decode off");
        c.write(0x04, &(CMD_MEM | CMD_IO).to_le_bytes()).unwrap();
        w32(&mut c, 0x20, 0xc040);
        assert_eq!(c.bar_address(4), Some(0xc040));
    }

    #[test]
    fn read_only_bits_stay() {
        let mut c = sample();
        let ids = r32(&c, 0);
        w32(&mut c, 0, 0x1234_5678);
        assert_eq!(r32(&c, 0), ids, "IDs read-only");
        w32(&mut c, 0x08, 0xffff_ffff);
        assert_eq!(r32(&c, 0x08), 0, "class/revision read-only");
        c.write(0x04, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(c.command(), CMD_WRITABLE, "only defined command bits");
        c.write(0x06, &0xffffu16.to_le_bytes()).unwrap();
        let mut st = [0u8; 2];
        c.read(0x06, &mut st).unwrap();
        assert_eq!(u16::from_le_bytes(st), STATUS_CAP_LIST);
        c.write(PCI_INT_PIN as u32, &[3]).unwrap();
        let mut pin = [0u8];
        c.read(PCI_INT_PIN as u32, &mut pin).unwrap();
        assert_eq!(pin, [1], "pin read-only");
        c.write(PCI_INT_LINE as u32, &[11]).unwrap();
        c.read(PCI_INT_LINE as u32, &mut pin).unwrap();
        assert_eq!(pin, [11], "line read-write");
        c.write(0x70, &[0xff, 0xff]).unwrap();
        assert_eq!(r32(&c, 0x70) & 0xffff, 0x0009, "other capabilities read-only");
        w32(&mut c, 0x34, 0);
        assert_eq!(r32(&c, 0x34) & 0xff, 0x40, "capability pointer read-only");
        // Extended space reads zero and ignores writes; beyond it is refused.
        assert!(c.write(0x100, &[1, 2, 3, 4]).unwrap().is_empty());
        assert_eq!(r32(&c, 0x100), 0);
        assert!(c.read(4094, &mut [0u8; 4]).is_err());
        assert!(c.read(0, &mut [0u8; 3]).is_err());
        assert!(c.write(u32::MAX, &[0]).is_err());
    }

    #[test]
    fn msi_and_msix_are_virtualised() {
        let mut c = sample();
        let msi = c.msi().unwrap();
        assert!(msi.is64 && msi.per_vector_mask);
        assert_eq!(c.msi_state(), Some((false, 1, 0, 0)));
        let base = msi.offset as u32;
        assert!(w32(&mut c, base + 4, 0xfee0_1003).contains(&ConfigEffect::MsiRoute));
        w32(&mut c, base + 8, 0);
        c.write(base + 12, &0x4041u16.to_le_bytes()).unwrap();
        let fx = c.write(base + 2, &[0x21]).unwrap();
        assert!(fx.contains(&ConfigEffect::MsiControl));
        assert_eq!(c.msi_state(), Some((true, 4, 0xfee0_1000, 0x4041)), "low address bits masked");
        // Mask bits: 4 vectors capable -> 4 writable bits.
        w32(&mut c, base + 16, 0xffff_ffff);
        assert_eq!(r32(&c, base + 16), 0xf);
        // MSI-X: enable and function mask only.
        let fx = c.write(0x63, &[0xff]).unwrap();
        assert!(fx.contains(&ConfigEffect::MsixControl));
        assert!(c.msix_enabled());
        assert_eq!(r32(&c, 0x60) >> 16, 0xc007, "table size read-only");
    }

    #[test]
    fn msix_capability_layout_is_parsed_and_checked() {
        let c = sample();
        let m = c.msix().unwrap();
        assert_eq!(
            (m.offset, m.table_size, m.table_bar, m.table_offset, m.pba_bar, m.pba_offset),
            (0x60, 8, 0, 0x800, 2, 0xc00)
        );
        assert_eq!((m.table_len(), m.pba_len()), (128, 8));
        assert_eq!(c.msix_control(), (false, false));
        // 2048 vectors: 32 KiB of table, 256 bytes of PBA.
        let mut raw = [0u8; 16];
        raw[2..4].copy_from_slice(&0x07ffu16.to_le_bytes());
        raw[4..8].copy_from_slice(&0x1000_0003u32.to_le_bytes());
        raw[8..12].copy_from_slice(&0x0000_4005u32.to_le_bytes());
        let big = MsixCap::parse(&raw, 0).unwrap();
        assert_eq!((big.table_size, big.table_len(), big.pba_len()), (2048, 32768, 256));
        assert_eq!(
            (big.table_bar, big.table_offset, big.pba_bar, big.pba_offset),
            (3, 0x1000_0000, 5, 0x4000)
        );
        assert!(MsixCap::parse(&raw, 5).is_none(), "runs past the end");
        assert!(MsixCap::parse(&raw, usize::MAX).is_none());

        // Where the structures may not live: each refused, MSI-X left off.
        let layouts: [(u32, u32, &str); 6] = [
            (0x0000_0800, 0x0000_0806, "BAR6"),         // PBA BIR 6
            (0x0000_0801, 0x0000_0c00, "BAR1"),         // upper half of nothing
            (0x0000_0804, 0x0000_0c00, "Io"),           // I/O BAR
            (0x0000_0fc0, 0x0000_0800, "does not fit"), // 0xfc0 + 128 > 4 KiB
            (0x0000_0800, 0x0000_0840, "overlap"),
            (0xffff_fff8, 0x0000_0800, "does not fit"),
        ];
        for (table, pba, why) in layouts {
            let mut raw = [0u8; CONFIG_LEN];
            raw[PCI_STATUS] = 0x10;
            raw[PCI_CAP_PTR] = 0x60;
            raw[0x20] = 1; // BAR4: I/O
            raw[0x60] = CAP_ID_MSIX;
            raw[0x62..0x64].copy_from_slice(&0x0007u16.to_le_bytes());
            raw[0x64..0x68].copy_from_slice(&table.to_le_bytes());
            raw[0x68..0x6c].copy_from_slice(&pba.to_le_bytes());
            let mut c = ConfigSpace::build(raw, &[4096, 0, 0, 0, 4096, 0], 0, false);
            let m = MsixCap::parse(&raw, 0x60).unwrap();
            let e = m.check(&c.bars).unwrap_err();
            assert!(e.contains(why), "{table:#x}/{pba:#x}: {e}");
            assert!(c.msix().is_none());
            c.write(0x63, &[0xff]).unwrap();
            assert_eq!(c.msix_control(), (false, false), "control stays read-only");
        }
    }

    #[test]
    fn malformed_capability_lists_are_truncated() {
        let mut raw = [0u8; CONFIG_LEN];
        raw[PCI_STATUS] = 0x10;
        raw[PCI_CAP_PTR] = 0x40;
        raw[0x40] = 0x01;
        raw[0x41] = 0x40; // loops onto itself
        let c = ConfigSpace::build(raw, &[0; 6], 0, false);
        assert_eq!(r32(&c, 0x3c) >> 8 & 0xff, 0, "no INTx: pin 0");
        let mut raw2 = raw;
        raw2[0x41] = 0x20; // into the header
        let c2 = ConfigSpace::build(raw2, &[0; 6], 0, false);
        assert_eq!(c2.bytes()[0x41], 0);
        // A loop is bounded.
        assert!(c.msi().is_none());
    }

    #[test]
    fn save_restore_keeps_read_only_bits() {
        let mut a = sample();
        w32(&mut a, 0x10, 0xd000_0000);
        a.write(0x04, &CMD_MEM.to_le_bytes()).unwrap();
        let saved = a.save();
        let mut b = sample();
        b.restore(&saved).unwrap();
        assert_eq!(a.bytes(), b.bytes());
        let mut evil = saved.clone();
        evil[0x08] = 0x99; // revision: read-only
        b.restore(&evil).unwrap();
        assert_eq!(b.bytes()[0x08], 0);
        let mut other = saved.clone();
        other[0] = 0x86;
        assert!(matches!(b.restore(&other), Err(ConfigError::Identity { .. })));
        assert!(b.restore(&saved[..100]).is_err());
    }

    /// BAR0 4 KiB mem32, MSI-X in it, then a PCI Express capability at
    /// 0x80 whose DevCap is `devcap` and whose DevCtl has bits set.
    fn express(devcap: u32) -> ConfigSpace {
        let mut raw = [0u8; CONFIG_LEN];
        raw[0..4].copy_from_slice(&[0xe5, 0x1d, 0x02, 0x00]);
        raw[PCI_STATUS] = 0x10;
        raw[PCI_CAP_PTR] = 0x60;
        raw[PCI_INT_PIN] = 1;
        raw[0x60] = CAP_ID_MSIX;
        raw[0x61] = 0x80;
        raw[0x62..0x64].copy_from_slice(&0x0001u16.to_le_bytes());
        raw[0x64..0x68].copy_from_slice(&0x0000_0800u32.to_le_bytes());
        raw[0x68..0x6c].copy_from_slice(&0x0000_0c00u32.to_le_bytes());
        raw[0x80] = CAP_ID_EXP;
        raw[0x82] = 0x02; // version 2, endpoint
        raw[0x84..0x88].copy_from_slice(&devcap.to_le_bytes());
        raw[0x88..0x8a].copy_from_slice(&0x8010u16.to_le_bytes()); // FLR "in progress", relaxed ordering
        ConfigSpace::build(raw, &[4096, 0, 0, 0, 0, 0], 0, true)
    }

    fn r16(c: &ConfigSpace, off: u32) -> u16 {
        let mut b = [0u8; 2];
        c.read(off, &mut b).unwrap();
        u16::from_le_bytes(b)
    }

    #[test]
    fn flr_is_an_effect_only_when_advertised_and_reads_back_zero() {
        let mut c = express(EXP_DEVCAP_FLR);
        assert_eq!(c.express(), Some(0x80));
        assert!(c.flr_capable());
        assert_eq!(r16(&c, 0x88), 0x0010, "FLR bit hidden, other bits kept");
        // Word, byte and dword writes that set bit 15 all initiate it.
        let fx = c.write(0x88, &0x8000u16.to_le_bytes()).unwrap();
        assert_eq!(fx, [ConfigEffect::FunctionReset]);
        assert_eq!(c.write(0x89, &[0x80]).unwrap(), [ConfigEffect::FunctionReset]);
        assert_eq!(w32(&mut c, 0x88, 0xffff_ffff), [ConfigEffect::FunctionReset]);
        assert_eq!(w32(&mut c, 0x84, 0), [], "a dword below DevCtl does not reach bit 15");
        assert_eq!(r16(&c, 0x88), 0x0010, "reads back 0; the rest of DevCtl stays read-only");
        assert_eq!(r32(&c, 0x84), EXP_DEVCAP_FLR, "DevCap read-only");
        // Other DevCtl bits: no effect, and not writable.
        assert!(c.write(0x88, &0x7fffu16.to_le_bytes()).unwrap().is_empty());
        assert!(c.write(0x88, &[0xff]).unwrap().is_empty());
        assert_eq!(r16(&c, 0x88), 0x0010);
        // An 8-byte write covering DevCtl.
        assert_eq!(c.write(0x84, &[0, 0, 0, 0, 0, 0x80, 0, 0]).unwrap(), [ConfigEffect::FunctionReset]);

        // Without FLR in DevCap the bit is ignored.
        let mut c = express(0x0000_8000);
        assert!(!c.flr_capable());
        assert!(c.write(0x88, &0x8000u16.to_le_bytes()).unwrap().is_empty());
        assert_eq!(r16(&c, 0x88), 0x0010);
        // A device with no PCIe capability: nothing at all.
        let mut s = sample();
        assert_eq!(s.express(), None);
        assert!(!s.write(0x89, &[0x80]).unwrap().contains(&ConfigEffect::FunctionReset));
        // A capability too close to the end of config space is not used.
        let mut raw = [0u8; CONFIG_LEN];
        raw[PCI_STATUS] = 0x10;
        raw[PCI_CAP_PTR] = 0xf8;
        raw[0xf8] = CAP_ID_EXP;
        raw[0xfc..0x100].copy_from_slice(&EXP_DEVCAP_FLR.to_le_bytes());
        let mut edge = ConfigSpace::build(raw, &[0; 6], 0, false);
        assert_eq!(edge.express(), None);
        assert!(edge.write(0xfc, &u32::MAX.to_le_bytes()).unwrap().is_empty());
    }

    #[test]
    fn reset_clears_what_pci_do_device_reset_clears() {
        let mut c = sample();
        w32(&mut c, 0x10, 0xc000_0000);
        w32(&mut c, 0x18, 0x1000_0000);
        w32(&mut c, 0x1c, 0x1);
        w32(&mut c, 0x20, 0xc040);
        w32(&mut c, 0x30, 0xd000_0001);
        c.write(0x04, &(CMD_MEM | CMD_IO | CMD_INTX_DISABLE | 0x4).to_le_bytes()).unwrap();
        c.write(0x0c, &[0x10, 0x40]).unwrap();
        c.write(PCI_INT_LINE as u32, &[11]).unwrap();
        let msi = c.msi().unwrap().offset as u32;
        w32(&mut c, msi + 4, 0xfee0_0000);
        c.write(msi + 12, &0x41u16.to_le_bytes()).unwrap();
        w32(&mut c, msi + 16, 0x3);
        c.write(msi + 2, &[0x21]).unwrap();
        c.write(0x63, &[0xc0]).unwrap();
        assert!(c.bar_address(0).is_some() && c.rom_address().is_some() && c.msix_enabled());

        c.reset();
        assert_eq!(c.command(), 0, "decoding stops");
        assert_eq!((r32(&c, 0x10), r32(&c, 0x18), r32(&c, 0x1c)), (0, 0xc, 0), "addresses gone, types kept");
        assert_eq!((r32(&c, 0x20), r32(&c, 0x30)), (1, 0));
        assert_eq!((c.bar_address(0), c.bar_address(2), c.rom_address()), (None, None, None));
        assert_eq!(r32(&c, 0x0c) & 0xffff, 0x4000, "cache line size cleared, latency timer kept");
        assert_eq!(c.bytes()[PCI_INT_LINE], 0);
        assert_eq!(c.msi_state(), Some((false, 1, 0, 0)));
        assert_eq!(r32(&c, msi + 16), 0, "MSI mask bits cleared");
        assert_eq!(c.msix_control(), (false, false));
        assert_eq!(r32(&c, 0x60) >> 16, 0x0007, "table size kept");
        assert_eq!(r32(&c, 0), 0x0001_1de5, "IDs kept");
        assert_eq!(r32(&c, 0x3c) >> 8 & 0xff, 1, "pin kept");
    }
}
