//! The host services the suite hands a device under test.
//!
//! It implements the same contract as the real host for everything a device
//! can do without a VM: it records what the device registers, owner-checks
//! physmap requests against the device's own region, and reads/writes a
//! small private "guest memory". After `unplug` the suite checks that every
//! registration was undone.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use dmhost_plugin_api::{
    abi_stable::{
        sabi_trait::TD_Opaque,
        std_types::{RArc, RResult, RSlice, RSliceMut, RStr},
    },
    Host, HostServices, HostServices_TO, IoSpace, MemoryRegion, PluginError, PluginModule_Ref, VfioDriverBox,
};

/// Guest-physical base the suite plugs device regions at.
pub const SUITE_REGION_GPA: u64 = 0x1_0000_0000;
const GUEST_MEM: usize = 64 * 1024;

#[derive(Debug, Default)]
pub struct Recorded {
    pub io: BTreeSet<(IoSpace, u64, u64)>,
    pub ram: BTreeMap<String, MemoryRegion>,
    pub irqfds: BTreeSet<(u32, i32)>,
    /// MSI eventfds and their (address, data).
    pub msi: BTreeMap<i32, (u64, u32)>,
    pub dirty: Vec<(String, u64, u64)>,
    pub physmap_denied: u32,
    /// The device's own guest range, set by the suite before plug.
    pub owned: Option<(u64, u64)>,
    pub guest: Vec<u8>,
}

impl Recorded {
    /// What is still registered, for the "unplug undoes plug" check.
    pub fn leftovers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.io.iter().map(|r| format!("I/O range {r:?}")).collect();
        v.extend(self.ram.keys().map(|k| format!("RAM {k:?}")));
        v.extend(self.irqfds.iter().map(|r| format!("irqfd {r:?}")));
        v.extend(self.msi.keys().map(|fd| format!("MSI irqfd {fd}")));
        v
    }
}

#[derive(Clone, Default)]
pub struct SuiteHost {
    pub state: Arc<Mutex<Recorded>>,
    /// Libraries whose VFIO drivers `open_vfio_driver` may open.
    pub drivers: Arc<Vec<PluginModule_Ref>>,
}

impl SuiteHost {
    pub fn new() -> Self {
        let s = Self::default();
        s.state.lock().unwrap().guest = vec![0; GUEST_MEM];
        s
    }

    /// A host double that opens vendor VFIO drivers from `drivers`, as the
    /// real host does from every loaded plugin.
    pub fn with_drivers(drivers: &[PluginModule_Ref]) -> Self {
        Self { drivers: Arc::new(drivers.to_vec()), ..Self::new() }
    }

    pub fn host(&self) -> Host {
        HostServices_TO::from_ptr(RArc::new(self.clone()), TD_Opaque)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Recorded) -> Result<T, PluginError>) -> RResult<T, PluginError> {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner())).into()
    }
}

fn guest_range(len: usize, gpa: u64) -> Result<std::ops::Range<usize>, PluginError> {
    let start = usize::try_from(gpa).map_err(|_| PluginError::denied("gpa out of range"))?;
    let end = start.checked_add(len).filter(|&e| e <= GUEST_MEM);
    end.map(|e| start..e)
        .ok_or_else(|| PluginError::denied(format!("guest access {gpa:#x}+{len} outside guest memory")))
}

impl HostServices for SuiteHost {
    fn register_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.with(|s| {
            if size == 0 || base.checked_add(size).is_none() {
                return Err(PluginError::denied(format!("bad I/O range {base:#x}+{size:#x}")));
            }
            if !s.io.insert((space, base, size)) {
                return Err(PluginError::denied(format!("I/O range {base:#x} already registered")));
            }
            Ok(())
        })
    }
    fn unregister_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.with(|s| {
            s.io.remove(&(space, base, size))
                .then_some(())
                .ok_or_else(|| PluginError::denied(format!("I/O range {base:#x} not registered")))
        })
    }
    fn physmap_add(&self, gpa: u64, size: u64, region_offset: u64) -> RResult<(), PluginError> {
        self.check_owned(gpa, size, region_offset)
    }
    fn physmap_remove(&self, gpa: u64, size: u64) -> RResult<(), PluginError> {
        self.check_owned(gpa, size, 0)
    }
    fn set_irq_line(&self, _gsi: u32, _level: bool) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn register_irqfd(&self, gsi: u32, fd: i32, _resample_fd: i32) -> RResult<(), PluginError> {
        self.with(|s| {
            s.irqfds.insert((gsi, fd));
            Ok(())
        })
    }
    fn unregister_irqfd(&self, gsi: u32, fd: i32) -> RResult<(), PluginError> {
        self.with(|s| {
            s.irqfds
                .remove(&(gsi, fd))
                .then_some(())
                .ok_or_else(|| PluginError::denied(format!("irqfd {fd} on GSI {gsi} not registered")))
        })
    }
    fn register_ram(&self, name: RStr<'_>, region: MemoryRegion) -> RResult<(), PluginError> {
        self.with(|s| {
            if s.ram.contains_key(name.as_str()) {
                return Err(PluginError::denied(format!("RAM {name} already registered")));
            }
            s.ram.insert(name.to_string(), region);
            Ok(())
        })
    }
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError> {
        self.with(|s| {
            s.ram
                .remove(name.as_str())
                .map(|_| ())
                .ok_or_else(|| PluginError::denied(format!("RAM {name} not registered")))
        })
    }
    fn mark_dirty(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<(), PluginError> {
        self.with(|s| {
            let region = s
                .ram
                .get(name.as_str())
                .ok_or_else(|| PluginError::denied(format!("RAM {name} not registered")))?;
            if offset.checked_add(len).is_none_or(|end| end > region.size) {
                return Err(PluginError::denied(format!("dirty range {offset}+{len} outside {name}")));
            }
            s.dirty.push((name.to_string(), offset, len));
            Ok(())
        })
    }
    fn read_guest(&self, gpa: u64, mut buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.with(|s| {
            let r = guest_range(buf.len(), gpa)?;
            buf.as_mut_slice().copy_from_slice(&s.guest[r]);
            Ok(())
        })
    }
    fn write_guest(&self, gpa: u64, buf: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.with(|s| {
            let r = guest_range(buf.len(), gpa)?;
            s.guest[r].copy_from_slice(buf.as_slice());
            Ok(())
        })
    }
    fn open_vfio_driver(&self, matching: RStr<'_>, config: RStr<'_>) -> RResult<VfioDriverBox, PluginError> {
        for module in self.drivers.iter() {
            for d in crate::vfio::drivers_of(*module) {
                if !d.matches(matching.as_str()) {
                    continue;
                }
                let Some(open) = module.open_vfio_driver() else { continue };
                return open(d.name.as_rstr(), config, self.host());
            }
        }
        RResult::RErr(PluginError::unsupported(format!(
            "no library beside the one under test provides VFIO driver {matching:?}"
        )))
    }
    fn register_msi_irqfd(&self, fd: i32, address: u64, data: u32) -> RResult<(), PluginError> {
        self.with(|s| {
            if fd < 0 {
                return Err(PluginError::denied(format!("MSI irqfd {fd} is not a descriptor")));
            }
            s.msi.insert(fd, (address, data));
            Ok(())
        })
    }
    fn unregister_msi_irqfd(&self, fd: i32) -> RResult<(), PluginError> {
        self.with(|s| {
            s.msi
                .remove(&fd)
                .map(drop)
                .ok_or_else(|| PluginError::denied(format!("MSI irqfd {fd} not registered")))
        })
    }
}

impl SuiteHost {
    fn check_owned(&self, gpa: u64, size: u64, offset: u64) -> RResult<(), PluginError> {
        self.with(|s| {
            let inside = s.owned.is_some_and(|(base, len)| {
                gpa >= base
                    && gpa.checked_add(size).is_some_and(|end| end <= base + len)
                    && offset.checked_add(size).is_some_and(|end| end <= len)
            });
            if inside {
                Ok(())
            } else {
                s.physmap_denied += 1;
                Err(PluginError::denied(format!("range {gpa:#x}+{size:#x} is not owned by this device")))
            }
        })
    }
}

/// Drain an eventfd without blocking: its count, 0 when it was not
/// signalled (the fd must be non-blocking, as devices create them).
pub fn eventfd_count(fd: std::os::fd::RawFd) -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: an 8-byte read into a live buffer; the caller names an
    // eventfd that stays open for the call.
    let r = unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) };
    if r == 8 {
        u64::from_ne_bytes(b)
    } else {
        0
    }
}

/// Signal an eventfd once, as a device raising its interrupt would.
pub fn eventfd_signal(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: an 8-byte write from a live buffer; the caller names an
    // eventfd that stays open for the call.
    let r = unsafe { libc::write(fd, 1u64.to_ne_bytes().as_ptr().cast(), 8) };
    if r == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
