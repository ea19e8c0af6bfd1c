//! The `HostServices` object each device gets: every request is checked
//! against what that device owns. A refusal is an `ErrorKind::Denied` error
//! to the plugin and a warning in the host log, never a silent success.

use std::{
    os::fd::RawFd,
    sync::{Arc, Mutex, OnceLock, Weak},
};

use dmhost_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RArc},
    ErrorKind, Host, HostServices, HostServices_TO, IoSpace, MemoryRegion, PluginError, RResult, RSlice,
    RSliceMut, RStr, VfioDriverBox,
};

use crate::{
    devices::{as_bus_device, DeviceRef},
    vm::{
        physmap::{Owner, PhysmapError, RangeUse},
        ramblocks::{RamBlock, RamRegistryError},
        vcpu::{PORT_EXIT, PORT_SERIAL},
        VmShared,
    },
};

/// Ports the host itself serves: COM1 (0x3f8..0x3ff) and the exit port.
const RESERVED_PORTS: [(u64, u64); 2] = [(PORT_SERIAL as u64, 8), (PORT_EXIT as u64, 1)];

struct Inner {
    id: String,
    owner: Owner,
    vm: Weak<VmShared>,
    device: OnceLock<std::sync::Weak<crate::devices::HostDevice>>,
    irqfds: Mutex<Vec<(u32, RawFd)>>,
}

/// Host services for one device.
#[derive(Clone)]
pub struct DeviceServices(Arc<Inner>);

fn denied(id: &str, what: &str, e: impl std::fmt::Display) -> PluginError {
    log::warn!("device {id}: {what} denied: {e}");
    PluginError::new(ErrorKind::Denied, format!("{what}: {e}"))
}

fn physmap_error(id: &str, what: &str, e: PhysmapError) -> PluginError {
    match e {
        PhysmapError::Denied { .. } => denied(id, what, e),
        PhysmapError::Slot(_) => PluginError::io(format!("{what}: {e}")),
        other => PluginError::new(ErrorKind::InvalidState, format!("{what}: {other}")),
    }
}

fn ram_error(id: &str, what: &str, e: RamRegistryError) -> PluginError {
    match e {
        RamRegistryError::NotOwner { .. } => denied(id, what, e),
        other => PluginError::new(ErrorKind::InvalidState, format!("{what}: {other}")),
    }
}

impl DeviceServices {
    pub fn new(vm: Weak<VmShared>, id: &str) -> Self {
        Self(Arc::new(Inner {
            id: id.to_owned(),
            owner: Owner::Device(id.to_owned()),
            vm,
            device: OnceLock::new(),
            irqfds: Mutex::new(Vec::new()),
        }))
    }

    /// The ABI object to hand the plugin.
    pub fn host(&self) -> Host {
        HostServices_TO::from_ptr(RArc::new(self.clone()), TD_Opaque)
    }

    /// Tell the services which device they serve (for bus registration).
    pub fn bind(&self, device: &DeviceRef) {
        let _ = self.0.device.set(Arc::downgrade(device));
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }

    fn vm(&self) -> Result<Arc<VmShared>, PluginError> {
        self.0.vm.upgrade().ok_or_else(|| PluginError::state("the VM is gone"))
    }

    /// Undo the irqfds this device registered (unplug).
    pub fn release_irqfds(&self) {
        let fds = std::mem::take(&mut *self.0.irqfds.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(vm) = self.vm() {
            for (gsi, fd) in fds {
                if let Err(e) = vm.kvm.unregister_irqfd(gsi, fd) {
                    log::debug!("device {}: irqfd gsi {gsi} fd {fd}: {e}", self.0.id);
                }
            }
            vm.msi.release_owner(vm.kvm.fd(), &self.0.id);
        }
    }

    fn do_open_vfio_driver(&self, matching: &str, config: &str) -> Result<VfioDriverBox, PluginError> {
        let vm = self.vm()?;
        let source = vm.vfio_drivers.get().ok_or_else(|| {
            PluginError::unsupported(format!(
                "no vendor VFIO drivers are available to this VM (asked for {matching:?})"
            ))
        })?;
        source.open_vfio_driver(matching, config, self.host())
    }

    fn do_register_msi_irqfd(&self, fd: i32, address: u64, data: u32) -> Result<(), PluginError> {
        let vm = self.vm()?;
        vm.msi
            .register(vm.kvm.fd(), &self.0.id, fd, address, data)
            .map(|_| ())
            .map_err(|e| PluginError::io(format!("register_msi_irqfd: {}", crate::run::chain(&e))))
    }

    fn do_unregister_msi_irqfd(&self, fd: i32) -> Result<(), PluginError> {
        let vm = self.vm()?;
        vm.msi.unregister(vm.kvm.fd(), &self.0.id, fd).map_err(|e| match e {
            crate::pci::msi::MsiError::NotOwner { .. } => denied(&self.0.id, "unregister_msi_irqfd", e),
            other => PluginError::io(format!("unregister_msi_irqfd: {}", crate::run::chain(&other))),
        })
    }

    fn do_register_io(&self, space: IoSpace, base: u64, size: u64) -> Result<(), PluginError> {
        let id = &self.0.id;
        let vm = self.vm()?;
        let device =
            self.0.device.get().and_then(|w| w.upgrade()).ok_or_else(|| {
                PluginError::state("register I/O ranges in plug(), not while being created")
            })?;
        let end = base.checked_add(size).filter(|_| size > 0).ok_or_else(|| {
            PluginError::new(
                ErrorKind::InvalidState,
                format!("{space:?} range {base:#x}+{size:#x} is empty or wraps"),
            )
        })?;
        match space {
            IoSpace::Pio => {
                if end > 0x1_0000 {
                    return Err(PluginError::new(
                        ErrorKind::InvalidState,
                        format!("port range {base:#x}+{size:#x} is past 0xffff"),
                    ));
                }
                if let Some((b, s)) = RESERVED_PORTS.iter().find(|(b, s)| base < b + s && end > *b) {
                    return Err(denied(id, "register_io", format!("ports {b:#x}+{s} are the host's")));
                }
            }
            IoSpace::Mmio => {
                let mut pm = vm.physmap.lock().unwrap_or_else(|p| p.into_inner());
                // Pages the device unmapped from its own memory are
                // trapped without a claim of their own.
                if !pm.is_unmapped_own_memory(&self.0.owner, base, size) {
                    pm.claim(base, size, self.0.owner.clone(), RangeUse::Mmio).map_err(|e| match e {
                        PhysmapError::Overlap { .. } => denied(id, "register_io", e),
                        other => PluginError::new(ErrorKind::InvalidState, other.to_string()),
                    })?;
                }
            }
        }
        if let Err(e) = vm.bus.insert(space, base, size, id, as_bus_device(&device)) {
            if space == IoSpace::Mmio {
                vm.physmap.lock().unwrap_or_else(|p| p.into_inner()).unclaim(base, &self.0.owner);
            }
            return Err(denied(id, "register_io", e));
        }
        log::debug!("device {id}: {space:?} {base:#x}+{size:#x} registered");
        Ok(())
    }

    fn do_unregister_io(&self, space: IoSpace, base: u64, size: u64) -> Result<(), PluginError> {
        let vm = self.vm()?;
        vm.bus.remove(space, base, size, &self.0.id).map_err(|e| denied(&self.0.id, "unregister_io", e))?;
        if space == IoSpace::Mmio {
            vm.physmap.lock().unwrap_or_else(|p| p.into_inner()).unclaim(base, &self.0.owner);
        }
        Ok(())
    }

    fn do_physmap_add(&self, gpa: u64, size: u64, offset: u64) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let mut pm = vm.physmap.lock().unwrap_or_else(|p| p.into_inner());
        pm.map(&vm.kvm, &self.0.owner, gpa, size, offset)
            .map_err(|e| physmap_error(&self.0.id, "physmap_add", e))
    }

    fn do_physmap_remove(&self, gpa: u64, size: u64) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let mut pm = vm.physmap.lock().unwrap_or_else(|p| p.into_inner());
        pm.unmap(&vm.kvm, &self.0.owner, gpa, size)
            .map_err(|e| physmap_error(&self.0.id, "physmap_remove", e))
    }

    fn do_register_irqfd(&self, gsi: u32, fd: i32, resample_fd: i32) -> Result<(), PluginError> {
        let vm = self.vm()?;
        if fd < 0 {
            return Err(PluginError::new(ErrorKind::InvalidState, "irqfd: negative descriptor"));
        }
        let resample = (resample_fd >= 0).then_some(resample_fd);
        vm.kvm
            .register_irqfd(gsi, fd, resample)
            .map_err(|e| PluginError::io(format!("register_irqfd: {e}")))?;
        self.0.irqfds.lock().unwrap_or_else(|p| p.into_inner()).push((gsi, fd));
        Ok(())
    }

    fn do_unregister_irqfd(&self, gsi: u32, fd: i32) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let mut fds = self.0.irqfds.lock().unwrap_or_else(|p| p.into_inner());
        let Some(pos) = fds.iter().position(|&x| x == (gsi, fd)) else {
            return Err(denied(
                &self.0.id,
                "unregister_irqfd",
                format!("gsi {gsi} fd {fd} is not this device's"),
            ));
        };
        fds.remove(pos);
        vm.kvm.unregister_irqfd(gsi, fd).map_err(|e| PluginError::io(format!("unregister_irqfd: {e}")))
    }

    fn do_register_ram(&self, name: &str, region: MemoryRegion) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let block = RamBlock {
            name: name.to_owned(),
            owner: self.0.owner.clone(),
            host_addr: region.host_addr,
            size: region.size,
            fd: region.fd,
            fd_offset: region.fd_offset,
        };
        let r = vm.ram_blocks.lock().unwrap_or_else(|p| p.into_inner()).register(block);
        r.map_err(|e| ram_error(&self.0.id, "register_ram", e))
    }

    fn do_unregister_ram(&self, name: &str) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let r = vm.ram_blocks.lock().unwrap_or_else(|p| p.into_inner()).unregister(name, &self.0.owner);
        r.map(|_| ()).map_err(|e| ram_error(&self.0.id, "unregister_ram", e))
    }

    fn do_mark_dirty(&self, name: &str, offset: u64, len: u64) -> Result<(), PluginError> {
        let vm = self.vm()?;
        let r = vm.ram_blocks.lock().unwrap_or_else(|p| p.into_inner()).mark_dirty(
            name,
            &self.0.owner,
            offset,
            len,
        );
        r.map_err(|e| ram_error(&self.0.id, "mark_dirty", e))
    }

    /// Where this device's `devfn` pin is wired (claims the devfn), for a
    /// device process that raises the line's irqfd itself.
    pub fn intx_route(&self, devfn: u32, pin: u32) -> Result<dmhost_plugin_api::IntxRoute, PluginError> {
        self.vm()?.intx.route(&self.0.id, devfn, pin)
    }

    fn do_read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PluginError> {
        self.vm()?.read_guest(gpa, buf).map_err(|e| PluginError::io(format!("read_guest: {e}")))
    }

    fn do_write_guest(&self, gpa: u64, buf: &[u8]) -> Result<(), PluginError> {
        self.vm()?.write_guest(gpa, buf).map_err(|e| PluginError::io(format!("write_guest: {e}")))
    }
}

impl HostServices for DeviceServices {
    fn register_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.do_register_io(space, base, size).into()
    }
    fn unregister_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.do_unregister_io(space, base, size).into()
    }
    fn physmap_add(&self, gpa: u64, size: u64, region_offset: u64) -> RResult<(), PluginError> {
        self.do_physmap_add(gpa, size, region_offset).into()
    }
    fn physmap_remove(&self, gpa: u64, size: u64) -> RResult<(), PluginError> {
        self.do_physmap_remove(gpa, size).into()
    }
    fn set_irq_line(&self, gsi: u32, level: bool) -> RResult<(), PluginError> {
        self.vm()
            .and_then(|vm| {
                vm.kvm.set_irq_line(gsi, level).map_err(|e| PluginError::io(format!("set_irq_line: {e}")))
            })
            .into()
    }
    fn register_irqfd(&self, gsi: u32, fd: i32, resample_fd: i32) -> RResult<(), PluginError> {
        self.do_register_irqfd(gsi, fd, resample_fd).into()
    }
    fn unregister_irqfd(&self, gsi: u32, fd: i32) -> RResult<(), PluginError> {
        self.do_unregister_irqfd(gsi, fd).into()
    }
    fn register_ram(&self, name: RStr<'_>, region: MemoryRegion) -> RResult<(), PluginError> {
        self.do_register_ram(name.as_str(), region).into()
    }
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError> {
        self.do_unregister_ram(name.as_str()).into()
    }
    fn mark_dirty(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<(), PluginError> {
        self.do_mark_dirty(name.as_str(), offset, len).into()
    }
    fn read_guest(&self, gpa: u64, mut buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.do_read_guest(gpa, buf.as_mut_slice()).into()
    }
    fn write_guest(&self, gpa: u64, buf: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.do_write_guest(gpa, buf.as_slice()).into()
    }
    fn open_vfio_driver(&self, matching: RStr<'_>, config: RStr<'_>) -> RResult<VfioDriverBox, PluginError> {
        self.do_open_vfio_driver(matching.as_str(), config.as_str()).into()
    }
    fn register_msi_irqfd(&self, fd: i32, address: u64, data: u32) -> RResult<(), PluginError> {
        self.do_register_msi_irqfd(fd, address, data).into()
    }
    fn unregister_msi_irqfd(&self, fd: i32) -> RResult<(), PluginError> {
        self.do_unregister_msi_irqfd(fd).into()
    }
    fn set_intx(&self, devfn: u32, pin: u32, level: bool) -> RResult<(), PluginError> {
        self.vm().and_then(|vm| vm.intx.set(&self.0.id, devfn, pin, level)).into()
    }
}
