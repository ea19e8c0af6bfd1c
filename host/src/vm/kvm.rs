//! The KVM VM: the VM fd, its in-kernel irqchip and PIT, and the memory
//! slots (allocation, add/delete, dirty logging).

use std::{
    collections::BTreeMap,
    mem::ManuallyDrop,
    os::fd::{FromRawFd, RawFd},
    sync::Mutex,
};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

/// Where KVM puts its TSS pages (below 4 GiB, out of the way).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// Number of IOAPIC pins (GSIs a device may drive).
pub const NUM_GSIS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm is not available")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_VM failed")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up the VM ({what})")]
    Setup { what: &'static str, source: kvm_ioctls::Error },
    #[error("no free KVM memory slot (limit {0})")]
    NoFreeSlot(usize),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {gpa:#x} (+{size:#x}) failed")]
    SetSlot { slot: u32, gpa: u64, size: u64, source: kvm_ioctls::Error },
    #[error("memory slot {0} does not exist")]
    NoSuchSlot(u32),
    #[error("KVM_GET_DIRTY_LOG for slot {slot} failed")]
    DirtyLog { slot: u32, source: kvm_ioctls::Error },
    #[error("GSI {0} is out of range (0..{NUM_GSIS})")]
    BadGsi(u32),
    #[error("interrupt request failed ({what})")]
    Irq { what: &'static str, source: kvm_ioctls::Error },
}

/// One KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub slot: u32,
    pub gpa: u64,
    pub size: u64,
    pub host_addr: u64,
    pub read_only: bool,
}

struct Slots {
    used: BTreeMap<u32, Slot>,
    limit: usize,
    dirty_logging: bool,
}

/// A KVM VM with an in-kernel irqchip.
pub struct KvmVm {
    kvm: Kvm,
    fd: VmFd,
    slots: Mutex<Slots>,
}

impl KvmVm {
    /// Open /dev/kvm and create a VM with an in-kernel IOAPIC/PIC/LAPIC and PIT.
    pub fn new() -> Result<Self, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let fd = kvm.create_vm().map_err(KvmError::CreateVm)?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(|source| KvmError::Setup { what: "set_tss_address", source })?;
        fd.create_irq_chip().map_err(|source| KvmError::Setup { what: "create_irq_chip", source })?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|source| KvmError::Setup { what: "create_pit2", source })?;
        let limit = kvm.get_nr_memslots();
        Ok(Self { kvm, fd, slots: Mutex::new(Slots { used: BTreeMap::new(), limit, dirty_logging: false }) })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Map `[host_addr, host_addr+size)` at `gpa` in a new slot.
    ///
    /// # Safety
    ///
    /// The host range must be a live mapping that stays valid until the
    /// slot is removed with [`KvmVm::remove_slot`].
    pub unsafe fn add_slot(
        &self,
        gpa: u64,
        size: u64,
        host_addr: u64,
        read_only: bool,
    ) -> Result<Slot, KvmError> {
        let mut slots = self.lock();
        let id = (0..slots.limit as u32)
            .find(|s| !slots.used.contains_key(s))
            .ok_or(KvmError::NoFreeSlot(slots.limit))?;
        let slot = Slot { slot: id, gpa, size, host_addr, read_only };
        // SAFETY: the caller guarantees the host range outlives the slot.
        unsafe { self.set_slot(&slot, slots.dirty_logging) }?;
        slots.used.insert(id, slot);
        log::debug!("kvm: slot {id} = gpa {gpa:#x} +{size:#x} (host {host_addr:#x})");
        Ok(slot)
    }

    /// Delete a slot: guest accesses to its range become MMIO exits.
    pub fn remove_slot(&self, id: u32) -> Result<Slot, KvmError> {
        let mut slots = self.lock();
        let slot = *slots.used.get(&id).ok_or(KvmError::NoSuchSlot(id))?;
        let empty = Slot { size: 0, ..slot };
        // SAFETY: a zero-sized region deletes the slot; no memory is mapped.
        unsafe { self.set_slot(&empty, false) }?;
        slots.used.remove(&id);
        log::debug!("kvm: slot {id} removed (gpa {:#x})", slot.gpa);
        Ok(slot)
    }

    /// # Safety
    ///
    /// As for [`KvmVm::add_slot`].
    unsafe fn set_slot(&self, s: &Slot, log_dirty: bool) -> Result<(), KvmError> {
        let mut flags = 0;
        if s.read_only {
            flags |= KVM_MEM_READONLY;
        }
        if log_dirty && !s.read_only {
            flags |= KVM_MEM_LOG_DIRTY_PAGES;
        }
        let region = kvm_userspace_memory_region {
            slot: s.slot,
            flags,
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped while the slot exists.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| KvmError::SetSlot {
            slot: s.slot,
            gpa: s.gpa,
            size: s.size,
            source,
        })
    }

    /// All slots, by slot number.
    pub fn slots(&self) -> Vec<Slot> {
        self.lock().used.values().copied().collect()
    }

    /// Turn dirty-page logging on or off for every slot (and later ones).
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), KvmError> {
        let mut slots = self.lock();
        for s in slots.used.values() {
            // SAFETY: re-registering an existing slot with the same live range.
            unsafe { self.set_slot(s, on) }?;
        }
        slots.dirty_logging = on;
        Ok(())
    }

    pub fn dirty_logging(&self) -> bool {
        self.lock().dirty_logging
    }

    /// The dirty bitmap of `slot` (one bit per page), cleared by the read.
    pub fn get_and_clear_dirty_bitmap(&self, slot: u32) -> Result<Vec<u64>, KvmError> {
        let slots = self.lock();
        let s = slots.used.get(&slot).ok_or(KvmError::NoSuchSlot(slot))?;
        self.fd.get_dirty_log(slot, s.size as usize).map_err(|source| KvmError::DirtyLog { slot, source })
    }

    /// Drive GSI `gsi` to `level`.
    pub fn set_irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        if gsi >= NUM_GSIS {
            return Err(KvmError::BadGsi(gsi));
        }
        self.fd.set_irq_line(gsi, level).map_err(|source| KvmError::Irq { what: "KVM_IRQ_LINE", source })
    }

    /// Attach eventfd `fd` to `gsi` (with a resample eventfd for
    /// level-triggered lines). The fds stay owned by the caller.
    pub fn register_irqfd(&self, gsi: u32, fd: RawFd, resample_fd: Option<RawFd>) -> Result<(), KvmError> {
        if gsi >= NUM_GSIS {
            return Err(KvmError::BadGsi(gsi));
        }
        let efd = borrow_eventfd(fd);
        let r = match resample_fd {
            Some(rfd) => {
                let rfd = borrow_eventfd(rfd);
                self.fd.register_irqfd_with_resample(&efd, &rfd, gsi)
            }
            None => self.fd.register_irqfd(&efd, gsi),
        };
        r.map_err(|source| KvmError::Irq { what: "KVM_IRQFD", source })
    }

    pub fn unregister_irqfd(&self, gsi: u32, fd: RawFd) -> Result<(), KvmError> {
        if gsi >= NUM_GSIS {
            return Err(KvmError::BadGsi(gsi));
        }
        let efd = borrow_eventfd(fd);
        self.fd
            .unregister_irqfd(&efd, gsi)
            .map_err(|source| KvmError::Irq { what: "KVM_IRQFD deassign", source })
    }
}

/// View a descriptor someone else owns as an `EventFd` without closing it.
fn borrow_eventfd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the EventFd is never dropped (ManuallyDrop), so the caller's
    // descriptor is not closed; KVM validates that it is an eventfd.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}
