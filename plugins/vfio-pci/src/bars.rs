//! BAR access: which guest ranges the device's BARs (and ROM) occupy, and
//! routing the MMIO/PIO accesses the host dispatches to the device to the
//! backend's regions. An mmap-able BAR the device exposes as its guest
//! region is mapped directly through the host physmap instead; if the host
//! refuses the new address (ownership), it falls back to trapping.
//! Pages that must stay trapped (the MSI-X table and PBA) are cut out of a
//! direct mapping, as the kernel's sparse mmap does: the rest of the BAR is
//! mapped around them and they are registered as MMIO.

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
    /// In a direct mapping, the page-aligned (offset, length) that is
    /// trapped instead.
    pub trap: Option<(u64, u64)>,
}

/// The BAR whose host memory is the device's guest region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectBar {
    pub index: u32,
    pub size: u64,
    /// Pages never mapped directly: (offset, length), page aligned.
    pub trap: Option<(u64, u64)>,
}

/// The parts of a BAR of `size` bytes around `trap`, as (offset, length).
fn around(size: u64, trap: Option<(u64, u64)>) -> Vec<(u64, u64)> {
    let Some((off, len)) = trap else {
        return vec![(0, size)];
    };
    let end = (off + len).min(size);
    [(0, off.min(size)), (end, size - end)].into_iter().filter(|&(_, n)| n > 0).collect()
}

/// Map a direct BAR at `gpa` except its trapped pages, which are
/// registered as MMIO. Undoes what it did on failure.
fn map_direct(host: &Host, gpa: u64, d: DirectBar) -> Result<(), String> {
    let mut done = Vec::new();
    for (off, len) in around(d.size, d.trap) {
        if let Err(e) = host.physmap_add(gpa + off, len, off).into_result() {
            for (o, l) in done {
                let _ = host.physmap_remove(gpa + o, l);
            }
            return Err(format!("mapping +{off:#x}: {e}"));
        }
        done.push((off, len));
    }
    if let Some((off, len)) = d.trap {
        if let Err(e) = host.register_io(IoSpace::Mmio, gpa + off, len).into_result() {
            let _ = host.physmap_remove(gpa, d.size);
            return Err(format!("trapping +{off:#x}+{len:#x}: {e}"));
        }
    }
    Ok(())
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

    /// Record the direct mapping the host made of the whole BAR at plug
    /// time, and cut its trapped pages (`m.trap`) out of it; if that is
    /// refused, the whole BAR is trapped instead.
    pub fn adopt(&mut self, mut m: Mapping, host: &Host, id: &str) {
        self.maps.retain(|x| x.index != m.index);
        if let (true, Some((off, len))) = (m.direct, m.trap) {
            let gpa = m.gpa + off;
            let carved = host
                .physmap_remove(gpa, len)
                .into_result()
                .and_then(|()| host.register_io(IoSpace::Mmio, gpa, len).into_result());
            if let Err(e) = carved {
                log::info!("vfio-pci {id}: BAR{} +{off:#x}+{len:#x} not trapped in place ({e}); trapping the whole BAR", m.index);
                let _ = host.physmap_remove(m.gpa, m.size);
                (m.direct, m.trap) = (false, None);
                if let Err(e) = host.register_io(m.space, m.gpa, m.size).into_result() {
                    log::warn!("vfio-pci {id}: BAR{} at {:#x}: {e}; left unmapped", m.index, m.gpa);
                    return;
                }
            }
        }
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
            let mut mapping = Mapping { index, space, gpa, size, direct: false, trap: None };
            if let Some(d) = direct.filter(|d| d.index == index && d.size == size) {
                match map_direct(host, gpa, d) {
                    Ok(()) => (mapping.direct, mapping.trap) = (true, d.trap),
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
            let end = off.checked_add(len as u64)?;
            let trapped = !m.direct || m.trap.is_some_and(|(t, n)| off >= t && end <= t + n);
            let fits = m.space == space && trapped && end <= m.size;
            fits.then_some((m.index, off))
        })
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.maps
    }
}

fn remove(host: &Host, m: &Mapping, id: &str) {
    if let (true, Some((off, len))) = (m.direct, m.trap) {
        if let Err(e) = host.unregister_io(IoSpace::Mmio, m.gpa + off, len).into_result() {
            log::warn!("vfio-pci {id}: removing BAR{} trap at {:#x}: {e}", m.index, m.gpa + off);
        }
    }
    let r = if m.direct {
        host.physmap_remove(m.gpa, m.size)
    } else {
        host.unregister_io(m.space, m.gpa, m.size)
    };
    if let Err(e) = r.into_result() {
        log::warn!("vfio-pci {id}: removing BAR{} at {:#x}: {e}", m.index, m.gpa);
    }
}
