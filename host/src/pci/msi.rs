//! MSI delivery through KVM: each MSI eventfd gets a GSI of its own above
//! the IOAPIC pins, an MSI route (address/data) in KVM's GSI routing table
//! and an irqfd. `KVM_SET_GSI_ROUTING` replaces the whole table, so every
//! update sends the default irqchip routes (PIC and IOAPIC, as KVM sets
//! them up with the in-kernel irqchip) plus every MSI route.

use std::{
    collections::BTreeMap,
    mem::ManuallyDrop,
    os::fd::{FromRawFd, RawFd},
    sync::{Mutex, MutexGuard},
};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::kvm::NUM_GSIS;

/// The first GSI handed to MSI routes (the IOAPIC has 0..24).
pub const FIRST_MSI_GSI: u32 = NUM_GSIS;
/// GSIs available to MSI routes (KVM allows 4096 routes; a few devices'
/// vectors fit well within this).
pub const MAX_MSI_ROUTES: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    #[error("eventfd {0} is negative")]
    BadFd(RawFd),
    #[error("no free GSI for an MSI route ({MAX_MSI_ROUTES} in use)")]
    NoGsi,
    #[error("eventfd {fd} has no MSI route of {owner}")]
    NotOwner { fd: RawFd, owner: String },
    #[error("KVM_SET_GSI_ROUTING failed")]
    Routing(#[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD for GSI {gsi} failed")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("routing table: {0}")]
    Table(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Route {
    owner: String,
    fd: RawFd,
    address: u64,
    data: u32,
}

/// The MSI routes of one VM.
#[derive(Default)]
pub struct MsiRoutes {
    routes: Mutex<BTreeMap<u32, Route>>,
}

/// An MSI route as listed for diagnostics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct MsiRouteInfo {
    pub gsi: u32,
    pub owner: String,
    pub address: u64,
    pub data: u32,
}

fn irqchip_entry(gsi: u32, irqchip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip, pin };
    e
}

/// KVM's default routes with an in-kernel irqchip: every GSI below 24 to
/// its IOAPIC pin, and 0..16 also to the PIC pair.
pub fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..NUM_GSIS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 { KVM_IRQCHIP_PIC_MASTER } else { KVM_IRQCHIP_PIC_SLAVE };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

fn msi_entry(gsi: u32, address: u64, data: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: address as u32,
        address_hi: (address >> 32) as u32,
        data,
        ..Default::default()
    };
    e
}

/// View a descriptor someone else owns as an `EventFd` without closing it.
fn borrow_eventfd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the EventFd is never dropped (ManuallyDrop), so the owner's
    // descriptor is not closed; KVM checks that it is an eventfd.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

impl MsiRoutes {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, Route>> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn commit(vm: &VmFd, routes: &BTreeMap<u32, Route>) -> Result<(), MsiError> {
        let mut entries = default_routes();
        entries.extend(routes.iter().map(|(&gsi, r)| msi_entry(gsi, r.address, r.data)));
        let table = KvmIrqRouting::from_entries(&entries).map_err(|e| MsiError::Table(format!("{e:?}")))?;
        vm.set_gsi_routing(&table).map_err(MsiError::Routing)
    }

    /// Deliver (`address`, `data`) whenever `fd` is written; registering
    /// the same fd of the same owner again updates its message. Returns
    /// the GSI.
    pub fn register(
        &self,
        vm: &VmFd,
        owner: &str,
        fd: RawFd,
        address: u64,
        data: u32,
    ) -> Result<u32, MsiError> {
        if fd < 0 {
            return Err(MsiError::BadFd(fd));
        }
        let mut routes = self.lock();
        if let Some((&gsi, _)) = routes.iter().find(|(_, r)| r.fd == fd && r.owner == owner) {
            let old = routes.insert(gsi, Route { owner: owner.to_owned(), fd, address, data });
            if let Err(e) = Self::commit(vm, &routes) {
                if let Some(old) = old {
                    routes.insert(gsi, old);
                }
                return Err(e);
            }
            return Ok(gsi);
        }
        let gsi = (FIRST_MSI_GSI..FIRST_MSI_GSI + MAX_MSI_ROUTES)
            .find(|g| !routes.contains_key(g))
            .ok_or(MsiError::NoGsi)?;
        routes.insert(gsi, Route { owner: owner.to_owned(), fd, address, data });
        if let Err(e) = Self::commit(vm, &routes) {
            routes.remove(&gsi);
            return Err(e);
        }
        if let Err(source) = vm.register_irqfd(&borrow_eventfd(fd), gsi) {
            routes.remove(&gsi);
            if let Err(e) = Self::commit(vm, &routes) {
                log::warn!("msi: restoring the routing table: {e}");
            }
            return Err(MsiError::Irqfd { gsi, source });
        }
        log::debug!("msi: {owner}: eventfd {fd} -> GSI {gsi} (address {address:#x}, data {data:#x})");
        Ok(gsi)
    }

    /// Undo [`MsiRoutes::register`] for `owner`'s `fd`.
    pub fn unregister(&self, vm: &VmFd, owner: &str, fd: RawFd) -> Result<(), MsiError> {
        let mut routes = self.lock();
        let gsi = routes
            .iter()
            .find(|(_, r)| r.fd == fd && r.owner == owner)
            .map(|(&g, _)| g)
            .ok_or_else(|| MsiError::NotOwner { fd, owner: owner.to_owned() })?;
        routes.remove(&gsi);
        let irqfd =
            vm.unregister_irqfd(&borrow_eventfd(fd), gsi).map_err(|source| MsiError::Irqfd { gsi, source });
        Self::commit(vm, &routes)?;
        irqfd
    }

    /// Drop every route of `owner` (unplug).
    pub fn release_owner(&self, vm: &VmFd, owner: &str) {
        let fds: Vec<RawFd> = self.lock().values().filter(|r| r.owner == owner).map(|r| r.fd).collect();
        for fd in fds {
            if let Err(e) = self.unregister(vm, owner, fd) {
                log::debug!("msi: {owner}: releasing eventfd {fd}: {e}");
            }
        }
    }

    /// Every MSI route.
    pub fn list(&self) -> Vec<MsiRouteInfo> {
        self.lock()
            .iter()
            .map(|(&gsi, r)| MsiRouteInfo { gsi, owner: r.owner.clone(), address: r.address, data: r.data })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_has_ioapic_and_pic_routes() {
        let v = default_routes();
        assert_eq!(v.len(), 24 + 16);
        assert!(v.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
        // SAFETY: every entry was built with its irqchip member.
        let pins: Vec<(u32, u32, u32)> =
            v.iter().map(|e| (e.gsi, unsafe { e.u.irqchip.irqchip }, unsafe { e.u.irqchip.pin })).collect();
        assert!(pins.contains(&(10, KVM_IRQCHIP_IOAPIC, 10)));
        assert!(pins.contains(&(10, KVM_IRQCHIP_PIC_SLAVE, 2)));
        assert!(pins.contains(&(23, KVM_IRQCHIP_IOAPIC, 23)));
        let e = msi_entry(30, 0x1_fee0_0000, 0x45);
        // SAFETY: built with its msi member.
        let m = unsafe { e.u.msi };
        assert_eq!(
            (e.type_, m.address_lo, m.address_hi, m.data),
            (KVM_IRQ_ROUTING_MSI, 0xfee0_0000, 1, 0x45)
        );
    }
}
