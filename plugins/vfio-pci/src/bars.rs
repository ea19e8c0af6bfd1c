//! BAR access: which guest ranges the device's BARs (and ROM) occupy, and
//! routing the MMIO/PIO accesses the host dispatches to the device to the
//! backend's regions. An mmap-able BAR the device exposes as its guest
//! region is mapped directly through the host physmap instead; if the host
//! refuses the new address (ownership), it falls back to trapping.

use dmhost_plugin_api::{vfio::VFIO_PCI_ROM_REGION_INDEX, Host, IoSpace};

use crate::config_space::{BarKind, ConfigSpace};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub index: u32,
    pub space: IoSpace,
    pub gpa: u64,
    pub size: u64,
    /// Mapped through physmap (no exits) rather than trapped.
    pub direct: bool,
}

/// The BAR whose host memory is the device's guest region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectBar {
    pub index: u32,
    pub size: u64,
}

#[derive(Debug, Default)]
pub struct BarMap {
    maps: Vec<Mapping>,
}

impl BarMap {
    /// Where each BAR (and the ROM) should be now, per config space.
    pub fn wanted(cfg: &ConfigSpace) -> Vec<(u32, IoSpace, u64, u64)> {
        let mut v: Vec<_> = cfg
            .bars()
            .filter_map(|b| {
                let space = if b.kind == BarKind::Io { IoSpace::Pio } else { IoSpace::Mmio };
                cfg.bar_address(b.index).map(|gpa| (b.index, space, gpa, b.size))
            })
            .collect();
        if let Some(gpa) = cfg.rom_address() {
            v.push((VFIO_PCI_ROM_REGION_INDEX, IoSpace::Mmio, gpa, cfg.rom_size()));
        }
        v
    }

    /// Record a direct mapping the host made at plug time.
    pub fn adopt(&mut self, m: Mapping) {
        self.maps.retain(|x| x.index != m.index);
        self.maps.push(m);
    }

    /// Bring the host's view in line with config space.
    pub fn sync(&mut self, cfg: &ConfigSpace, host: &Host, direct: Option<DirectBar>, id: &str) {
        let wanted = Self::wanted(cfg);
        let current = std::mem::take(&mut self.maps);
        for m in current {
            let keep = wanted.iter().any(|&(i, s, g, z)| (i, s, g, z) == (m.index, m.space, m.gpa, m.size));
            if keep {
                self.maps.push(m);
            } else {
                remove(host, &m, id);
            }
        }
        for (index, space, gpa, size) in wanted {
            if self.maps.iter().any(|m| m.index == index) {
                continue;
            }
            let mut mapping = Mapping { index, space, gpa, size, direct: false };
            if direct.is_some_and(|d| d.index == index && d.size == size) {
                match host.physmap_add(gpa, size, 0).into_result() {
                    Ok(()) => mapping.direct = true,
                    Err(e) => log::info!(
                        "vfio-pci {id}: BAR{index} at {gpa:#x} not mapped directly ({e}); trapping it"
                    ),
                }
            }
            if !mapping.direct {
                if let Err(e) = host.register_io(space, gpa, size).into_result() {
                    log::warn!("vfio-pci {id}: BAR{index} at {gpa:#x}+{size:#x}: {e}; left unmapped");
                    continue;
                }
            }
            log::debug!("vfio-pci {id}: {mapping:?}");
            self.maps.push(mapping);
        }
    }

    /// Undo every mapping (unplug).
    pub fn clear(&mut self, host: &Host, id: &str) {
        for m in std::mem::take(&mut self.maps) {
            remove(host, &m, id);
        }
    }

    /// The trapped BAR and offset an access of `len` bytes at `addr` hits.
    pub fn lookup(&self, space: IoSpace, addr: u64, len: usize) -> Option<(u32, u64)> {
        self.maps.iter().find_map(|m| {
            let off = addr.checked_sub(m.gpa)?;
            let fits = m.space == space && !m.direct && off.checked_add(len as u64)? <= m.size;
            fits.then_some((m.index, off))
        })
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }
}

fn remove(host: &Host, m: &Mapping, id: &str) {
    let r = if m.direct {
        host.physmap_remove(m.gpa, m.size)
    } else {
        host.unregister_io(m.space, m.gpa, m.size)
    };
    if let Err(e) = r.into_result() {
        log::warn!("vfio-pci {id}: removing BAR{} at {:#x}: {e}", m.index, m.gpa);
    }
}
