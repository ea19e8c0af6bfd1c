//! The guest-physical ownership map.
//!
//! Every guest-physical range that is in use has an owner: the host (guest
//! RAM) or a device (its memory region, its MMIO registers). A device may
//! map or unmap only inside ranges it owns as memory — the check Xen makes
//! through XSM before `guest_physmap_remove_page`. Unmapping what is not
//! mapped is a no-op; unmapping part of a mapping splits its KVM slot.
//!
//! KVM slot changes go through [`SlotOps`], so the logic is tested without
//! KVM.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::kvm::{KvmError, KvmVm, Slot};
use super::memory::PAGE_SIZE;

/// Who owns a guest-physical range.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The host (guest RAM, boot structures).
    Host,
    /// A device, by id.
    Device(String),
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Host => f.write_str("host"),
            Owner::Device(id) => write!(f, "device {id}"),
        }
    }
}

/// What an owned range is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeUse {
    /// Guest RAM.
    Ram,
    /// A device's memory region: the device may map and unmap inside it.
    DeviceMemory,
    /// A device's MMIO registers (dispatched through the bus).
    Mmio,
}

#[derive(Debug, thiserror::Error)]
pub enum PhysmapError {
    #[error("{owner} may not change the mapping of {gpa:#x}+{size:#x}: {reason}")]
    Denied { owner: Owner, gpa: u64, size: u64, reason: String },
    #[error("range {gpa:#x}+{size:#x} is empty, wraps or is not page aligned")]
    BadRange { gpa: u64, size: u64 },
    #[error("range {gpa:#x}+{size:#x} overlaps {other_gpa:#x}+{other_size:#x} owned by {owner}")]
    Overlap { gpa: u64, size: u64, other_gpa: u64, other_size: u64, owner: Owner },
    #[error("{owner} has no memory region to map")]
    NoBacking { owner: Owner },
    #[error("offset {offset:#x}+{size:#x} is outside the {region_size:#x}-byte region of {owner}")]
    OutsideBacking { owner: Owner, offset: u64, size: u64, region_size: u64 },
    #[error("{gpa:#x}+{size:#x} is already mapped")]
    AlreadyMapped { gpa: u64, size: u64 },
    #[error("no free {size:#x}-byte range (alignment {align:#x}) in the hotplug window {base:#x}..{end:#x}")]
    NoSpace { size: u64, align: u64, base: u64, end: u64 },
    #[error("KVM memory slot update failed")]
    Slot(#[from] KvmError),
}

impl PhysmapError {
    pub fn is_denied(&self) -> bool {
        matches!(self, PhysmapError::Denied { .. })
    }
}

/// Adds and removes KVM memory slots.
pub trait SlotOps {
    /// # Safety
    ///
    /// `[host_addr, host_addr+size)` must stay mapped until the slot is removed.
    unsafe fn add_slot(&self, gpa: u64, size: u64, host_addr: u64, read_only: bool)
        -> Result<Slot, KvmError>;
    fn remove_slot(&self, slot: u32) -> Result<Slot, KvmError>;
}

impl SlotOps for KvmVm {
    unsafe fn add_slot(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        read_only: bool,
    ) -> Result<Slot, KvmError> {
        // SAFETY: forwarded from the caller.
        unsafe { KvmVm::add_slot(self, gpa, size, host_addr, read_only) }
    }
    fn remove_slot(&self, slot: u32) -> Result<Slot, KvmError> {
        KvmVm::remove_slot(self, slot)
    }
}

/// The memory behind an owner's mappings: a host mapping of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    pub host_addr: u64,
    pub size: u64,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Claim {
    size: u64,
    owner: Owner,
    usage: RangeUse,
}

/// One guest-physical mapping (one KVM slot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub gpa: u64,
    pub size: u64,
    pub owner: Owner,
    /// Offset in the owner's backing.
    pub offset: u64,
    pub host_addr: u64,
    pub slot: u32,
    pub read_only: bool,
}

/// An owned range, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRange {
    pub gpa: u64,
    pub size: u64,
    pub owner: Owner,
    pub usage: RangeUse,
}

/// The ownership and mapping state of guest-physical space.
#[derive(Debug)]
pub struct Physmap {
    claims: BTreeMap<u64, Claim>,
    mappings: BTreeMap<u64, Mapping>,
    backings: HashMap<Owner, Backing>,
    window: (u64, u64),
}

fn check_range(gpa: u64, size: u64) -> Result<u64, PhysmapError> {
    match gpa.checked_add(size) {
        Some(end) if size > 0 && gpa.is_multiple_of(PAGE_SIZE) && size.is_multiple_of(PAGE_SIZE) => Ok(end),
        _ => Err(PhysmapError::BadRange { gpa, size }),
    }
}

impl Physmap {
    /// An empty map whose allocator places regions in `[window_base, window_end)`.
    pub fn new(window_base: u64, window_end: u64) -> Self {
        Self {
            claims: BTreeMap::new(),
            mappings: BTreeMap::new(),
            backings: HashMap::new(),
            window: (window_base, window_end),
        }
    }

    pub fn hotplug_window(&self) -> (u64, u64) {
        self.window
    }

    fn overlapping_claim(&self, gpa: u64, end: u64) -> Option<(u64, &Claim)> {
        self.claims.range(..end).next_back().filter(|(&b, c)| b + c.size > gpa).map(|(&b, c)| (b, c))
    }

    /// Record that `owner` owns `[gpa, gpa+size)`.
    pub fn claim(&mut self, gpa: u64, size: u64, owner: Owner, usage: RangeUse) -> Result<(), PhysmapError> {
        let end = gpa.checked_add(size).filter(|_| size > 0).ok_or(PhysmapError::BadRange { gpa, size })?;
        if let Some((b, c)) = self.overlapping_claim(gpa, end) {
            return Err(PhysmapError::Overlap {
                gpa,
                size,
                other_gpa: b,
                other_size: c.size,
                owner: c.owner.clone(),
            });
        }
        self.claims.insert(gpa, Claim { size, owner, usage });
        Ok(())
    }

    /// Whether `[gpa, gpa+size)` lies in `owner`'s device memory with
    /// nothing mapped there: a device may trap such pages as MMIO (the
    /// holes it cut in a mapping, e.g. an MSI-X table) without a claim.
    pub fn is_unmapped_own_memory(&self, owner: &Owner, gpa: u64, size: u64) -> bool {
        let Some(end) = gpa.checked_add(size).filter(|_| size > 0) else {
            return false;
        };
        matches!(owner, Owner::Device(_))
            && self.check_owner(owner, gpa, end).is_ok()
            && self.mappings.range(..end).next_back().is_none_or(|(&b, m)| b + m.size <= gpa)
    }

    /// Drop the MMIO claim `owner` made at exactly `gpa`.
    pub fn unclaim(&mut self, gpa: u64, owner: &Owner) -> bool {
        if self.claims.get(&gpa).is_some_and(|c| &c.owner == owner && c.usage == RangeUse::Mmio) {
            self.claims.remove(&gpa);
            true
        } else {
            false
        }
    }

    /// Find a free range of `size` bytes: at `requested` if given (it must be
    /// free), else the lowest `align`-aligned free range in the hotplug window.
    pub fn allocate(&self, size: u64, align: u64, requested: Option<u64>) -> Result<u64, PhysmapError> {
        let align = align.max(PAGE_SIZE).next_power_of_two();
        if let Some(gpa) = requested {
            let end = check_range(gpa, size)?;
            if let Some((b, c)) = self.overlapping_claim(gpa, end) {
                return Err(PhysmapError::Overlap {
                    gpa,
                    size,
                    other_gpa: b,
                    other_size: c.size,
                    owner: c.owner.clone(),
                });
            }
            return Ok(gpa);
        }
        check_range(0, size)?;
        let (base, wend) = self.window;
        let no_space = PhysmapError::NoSpace { size, align, base, end: wend };
        let mut cand = base.checked_next_multiple_of(align).ok_or(PhysmapError::NoSpace {
            size,
            align,
            base,
            end: wend,
        })?;
        loop {
            let Some(end) = cand.checked_add(size).filter(|&e| e <= wend) else {
                return Err(no_space);
            };
            match self.overlapping_claim(cand, end) {
                None => return Ok(cand),
                Some((b, c)) => {
                    cand = match (b + c.size).checked_next_multiple_of(align) {
                        Some(n) => n,
                        None => return Err(no_space),
                    }
                }
            }
        }
    }

    /// Set the memory `owner` maps from.
    pub fn set_backing(&mut self, owner: Owner, backing: Backing) {
        self.backings.insert(owner, backing);
    }

    /// Check that every byte of `[gpa, end)` is owned by `owner` as device
    /// memory (or RAM, for the host).
    fn check_owner(&self, owner: &Owner, gpa: u64, end: u64) -> Result<(), PhysmapError> {
        let denied =
            |reason: String| PhysmapError::Denied { owner: owner.clone(), gpa, size: end - gpa, reason };
        let mut at = gpa;
        while at < end {
            let Some((b, c)) = self.claims.range(..=at).next_back().filter(|(&b, c)| b + c.size > at) else {
                return Err(denied(format!("{at:#x} is not owned by anyone")));
            };
            if &c.owner != owner {
                return Err(denied(format!("{at:#x} is owned by {}", c.owner)));
            }
            let mappable = matches!(
                (owner, c.usage),
                (Owner::Host, RangeUse::Ram) | (Owner::Device(_), RangeUse::DeviceMemory)
            );
            if !mappable {
                return Err(denied(format!("{at:#x} is an MMIO range, not memory")));
            }
            at = b + c.size;
        }
        Ok(())
    }

    /// Map `size` bytes of `owner`'s backing from `offset` at `gpa`.
    /// Mapping exactly what is already mapped is a no-op.
    pub fn map(
        &mut self,
        ops: &impl SlotOps,
        owner: &Owner,
        gpa: u64,
        size: u64,
        offset: u64,
    ) -> Result<(), PhysmapError> {
        let end = check_range(gpa, size)?;
        self.check_owner(owner, gpa, end)?;
        let backing = *self.backings.get(owner).ok_or(PhysmapError::NoBacking { owner: owner.clone() })?;
        if !offset.is_multiple_of(PAGE_SIZE) || offset.checked_add(size).is_none_or(|e| e > backing.size) {
            return Err(PhysmapError::OutsideBacking {
                owner: owner.clone(),
                offset,
                size,
                region_size: backing.size,
            });
        }
        if let Some((_, m)) = self.mappings.range(..end).next_back().filter(|(&b, m)| b + m.size > gpa) {
            if m.gpa == gpa && m.size == size && m.offset == offset && &m.owner == owner {
                return Ok(());
            }
            return Err(PhysmapError::AlreadyMapped { gpa, size });
        }
        let host_addr = backing.host_addr + offset;
        // SAFETY: the backing is registered by its owner, which keeps it
        // mapped until it is unplugged; unplug removes its mappings first.
        let slot = unsafe { ops.add_slot(gpa, size, host_addr, backing.read_only) }?;
        self.mappings.insert(
            gpa,
            Mapping {
                gpa,
                size,
                owner: owner.clone(),
                offset,
                host_addr,
                slot: slot.slot,
                read_only: backing.read_only,
            },
        );
        Ok(())
    }

    /// Unmap `[gpa, gpa+size)` on behalf of `owner`: it must own the whole
    /// range. Parts that are not mapped are skipped (no-op); a mapping cut
    /// in the middle is split into new slots.
    pub fn unmap(
        &mut self,
        ops: &impl SlotOps,
        owner: &Owner,
        gpa: u64,
        size: u64,
    ) -> Result<(), PhysmapError> {
        let end = check_range(gpa, size)?;
        self.check_owner(owner, gpa, end)?;
        self.unmap_unchecked(ops, gpa, end)
    }

    fn unmap_unchecked(&mut self, ops: &impl SlotOps, gpa: u64, end: u64) -> Result<(), PhysmapError> {
        let hit: Vec<u64> =
            self.mappings.range(..end).filter(|(&b, m)| b + m.size > gpa).map(|(&b, _)| b).collect();
        for b in hit {
            let Some(m) = self.mappings.remove(&b) else { continue };
            if let Err(e) = ops.remove_slot(m.slot) {
                self.mappings.insert(b, m);
                return Err(e.into());
            }
            let m_end = m.gpa + m.size;
            let mut pieces = Vec::new();
            if m.gpa < gpa {
                pieces.push((m.gpa, gpa - m.gpa, m.offset));
            }
            if m_end > end {
                pieces.push((end, m_end - end, m.offset + (end - m.gpa)));
            }
            for (pgpa, psize, poff) in pieces {
                let host_addr = m.host_addr + (pgpa - m.gpa);
                // SAFETY: a sub-range of a mapping that was valid for a slot.
                let slot = unsafe { ops.add_slot(pgpa, psize, host_addr, m.read_only) }?;
                self.mappings.insert(
                    pgpa,
                    Mapping {
                        gpa: pgpa,
                        size: psize,
                        owner: m.owner.clone(),
                        offset: poff,
                        host_addr,
                        slot: slot.slot,
                        read_only: m.read_only,
                    },
                );
            }
        }
        Ok(())
    }

    /// Remove every mapping and claim of `owner` (unplug). Returns the
    /// claims that were dropped.
    pub fn release_owner(
        &mut self,
        ops: &impl SlotOps,
        owner: &Owner,
    ) -> Result<Vec<OwnedRange>, PhysmapError> {
        let maps: Vec<(u64, u64)> =
            self.mappings.values().filter(|m| &m.owner == owner).map(|m| (m.gpa, m.gpa + m.size)).collect();
        for (gpa, end) in maps {
            self.unmap_unchecked(ops, gpa, end)?;
        }
        self.backings.remove(owner);
        let mut dropped = Vec::new();
        self.claims.retain(|&gpa, c| {
            if &c.owner == owner {
                dropped.push(OwnedRange { gpa, size: c.size, owner: c.owner.clone(), usage: c.usage });
                false
            } else {
                true
            }
        });
        Ok(dropped)
    }

    /// All mappings, by address.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.mappings.values().cloned().collect()
    }

    /// All owned ranges, by address.
    pub fn owned(&self) -> Vec<OwnedRange> {
        self.claims
            .iter()
            .map(|(&gpa, c)| OwnedRange { gpa, size: c.size, owner: c.owner.clone(), usage: c.usage })
            .collect()
    }

    /// The owner of `gpa`.
    pub fn owner_of(&self, gpa: u64) -> Option<&Owner> {
        self.claims.range(..=gpa).next_back().filter(|(&b, c)| b + c.size > gpa).map(|(_, c)| &c.owner)
    }

    /// The mapping containing `gpa`.
    pub fn mapping_at(&self, gpa: u64) -> Option<&Mapping> {
        self.mappings.range(..=gpa).next_back().map(|(_, m)| m).filter(|m| m.gpa + m.size > gpa)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    #[derive(Default)]
    struct FakeSlots {
        next: RefCell<u32>,
        live: RefCell<BTreeMap<u32, Slot>>,
    }
    impl SlotOps for FakeSlots {
        unsafe fn add_slot(
            &self,
            gpa: u64,
            size: u64,
            host_addr: u64,
            read_only: bool,
        ) -> Result<Slot, KvmError> {
            let mut n = self.next.borrow_mut();
            *n += 1;
            let s = Slot { slot: *n, gpa, size, host_addr, read_only };
            self.live.borrow_mut().insert(*n, s);
            Ok(s)
        }
        fn remove_slot(&self, slot: u32) -> Result<Slot, KvmError> {
            self.live.borrow_mut().remove(&slot).ok_or(KvmError::NoSuchSlot(slot))
        }
    }

    const MB: u64 = 1 << 20;
    fn dev(s: &str) -> Owner {
        Owner::Device(s.into())
    }

    fn setup() -> (Physmap, FakeSlots) {
        let mut p = Physmap::new(4 << 30, 8 << 30);
        let slots = FakeSlots::default();
        for (name, host) in [("a", 0x7000_0000_0000u64), ("b", 0x7100_0000_0000)] {
            let gpa = p.allocate(2 * MB, 2 * MB, None).unwrap();
            p.claim(gpa, 2 * MB, dev(name), RangeUse::DeviceMemory).unwrap();
            p.set_backing(dev(name), Backing { host_addr: host, size: 2 * MB, read_only: false });
            p.map(&slots, &dev(name), gpa, 2 * MB, 0).unwrap();
        }
        (p, slots)
    }

    #[test]
    fn allocator_places_in_window_and_honours_requests() {
        let (p, _) = setup();
        let owned = p.owned();
        assert_eq!(owned[0].gpa, 4 << 30);
        assert_eq!(owned[1].gpa, (4 << 30) + 2 * MB);
        assert_eq!(p.allocate(MB, 2 * MB, None).unwrap(), (4 << 30) + 4 * MB);
        assert!(matches!(p.allocate(MB, MB, Some(4 << 30)), Err(PhysmapError::Overlap { .. })));
        assert_eq!(p.allocate(MB, MB, Some(1 << 30)).unwrap(), 1 << 30);
        assert!(matches!(p.allocate(8 << 30, MB, None), Err(PhysmapError::NoSpace { .. })));
        assert!(p.allocate(100, MB, None).is_err());
    }

    #[test]
    fn owner_checks_noop_and_split() {
        let (mut p, slots) = setup();
        let a = 4u64 << 30;
        let b = a + 2 * MB;
        // Denied: a removes b's range, a maps into b's range, a touches unowned space.
        assert!(p.unmap(&slots, &dev("a"), b, 4096).unwrap_err().is_denied());
        assert!(p.map(&slots, &dev("a"), b, 4096, 0).unwrap_err().is_denied());
        assert!(p.unmap(&slots, &dev("a"), 0x1000, 4096).unwrap_err().is_denied());
        assert!(p.unmap(&slots, &dev("a"), a, 4 * MB).unwrap_err().is_denied());
        assert_eq!(slots.live.borrow().len(), 2);
        // Own page in the middle: split into two slots.
        p.unmap(&slots, &dev("a"), a + MB, 4096).unwrap();
        let m = p.mappings();
        assert_eq!(m.len(), 3);
        assert_eq!((m[0].gpa, m[0].size), (a, MB));
        assert_eq!((m[1].gpa, m[1].size, m[1].offset), (a + MB + 4096, MB - 4096, MB + 4096));
        assert_eq!(m[1].host_addr, 0x7000_0000_0000 + MB + 4096);
        assert!(p.mapping_at(a + MB).is_none());
        // Removing the hole again is a no-op.
        p.unmap(&slots, &dev("a"), a + MB, 4096).unwrap();
        assert_eq!(p.mappings().len(), 3);
        // Re-map the hole; mapping it twice is a no-op; overlapping is refused.
        p.map(&slots, &dev("a"), a + MB, 4096, MB).unwrap();
        p.map(&slots, &dev("a"), a + MB, 4096, MB).unwrap();
        assert!(matches!(p.map(&slots, &dev("a"), a, 8192, 0), Err(PhysmapError::AlreadyMapped { .. })));
        assert!(matches!(
            p.map(&slots, &dev("a"), a + MB, 4096, 2 * MB),
            Err(PhysmapError::OutsideBacking { .. })
        ));
        // Release: every mapping and claim of a goes.
        let dropped = p.release_owner(&slots, &dev("a")).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(slots.live.borrow().len(), 1);
        assert_eq!(p.owner_of(b), Some(&dev("b")));
        assert_eq!(p.owner_of(a), None);
    }

    #[test]
    fn mmio_claims_are_not_mappable() {
        let (mut p, slots) = setup();
        p.claim(0xd000_0000, 4096, dev("a"), RangeUse::Mmio).unwrap();
        assert!(p.map(&slots, &dev("a"), 0xd000_0000, 4096, 0).unwrap_err().is_denied());
        assert!(matches!(
            p.claim(0xd000_0000, 4096, dev("b"), RangeUse::Mmio),
            Err(PhysmapError::Overlap { .. })
        ));
        assert!(p.unclaim(0xd000_0000, &dev("a")));
    }

    #[test]
    fn holes_in_own_device_memory_may_be_trapped() {
        let (mut p, slots) = (Physmap::new(4 << 30, 8 << 30), FakeSlots::default());
        let gpa = 0x1_0000_0000;
        p.claim(gpa, 4 * PAGE_SIZE, dev("a"), RangeUse::DeviceMemory).unwrap();
        p.set_backing(
            dev("a"),
            Backing { host_addr: 0x7000_0000_0000, size: 4 * PAGE_SIZE, read_only: false },
        );
        p.map(&slots, &dev("a"), gpa, 4 * PAGE_SIZE, 0).unwrap();
        let hole = gpa + PAGE_SIZE;
        assert!(!p.is_unmapped_own_memory(&dev("a"), hole, PAGE_SIZE), "still mapped");
        p.unmap(&slots, &dev("a"), hole, PAGE_SIZE).unwrap();
        assert!(p.is_unmapped_own_memory(&dev("a"), hole, PAGE_SIZE));
        assert!(!p.is_unmapped_own_memory(&dev("a"), hole, 2 * PAGE_SIZE), "runs into a mapping");
        assert!(!p.is_unmapped_own_memory(&dev("b"), hole, PAGE_SIZE), "another device's memory");
        assert!(!p.is_unmapped_own_memory(&dev("a"), gpa + 4 * PAGE_SIZE, PAGE_SIZE), "outside it");
        assert!(!p.is_unmapped_own_memory(&dev("a"), u64::MAX, 2), "wraps");
        assert!(!p.unclaim(gpa, &dev("a")), "device memory is not an MMIO claim");
        assert_eq!(p.owner_of(gpa), Some(&dev("a")));
    }
}
