//! Devices as the host holds them: a plugin's ABI object or a device model
//! linked into the host, behind one lock, on the I/O bus.

use std::sync::{Arc, Mutex, MutexGuard};

use dmhost_plugin_api::{
    DeviceBox, DeviceModel, GuestRegion, IoSpace, PlugInfo, PluginError, RSlice, RSliceMut,
};

use crate::vm::bus::{BusDevice, RateLimiter};

/// The implementation behind a device.
pub enum DeviceImpl {
    /// Loaded from a plugin library (through the stable ABI).
    Plugin(DeviceBox),
    /// A device model linked into the host (benches, built-in devices).
    Builtin(Box<dyn DeviceModel>),
    /// A plugin device running in its own process (`isolation = "process"`).
    Remote(Box<crate::remote::RemoteDevice>),
}

impl DeviceImpl {
    pub fn memory_region(&self) -> Option<GuestRegion> {
        match self {
            DeviceImpl::Plugin(d) => d.memory_region().into_option(),
            DeviceImpl::Builtin(d) => d.memory_region(),
            DeviceImpl::Remote(d) => d.memory_region(),
        }
    }

    pub fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.plug(info).into_result(),
            DeviceImpl::Builtin(d) => d.plug(info),
            DeviceImpl::Remote(d) => d.plug(info),
        }
    }

    pub fn unplug(&mut self) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.unplug().into_result(),
            DeviceImpl::Builtin(d) => d.unplug(),
            DeviceImpl::Remote(d) => d.unplug(),
        }
    }

    pub fn is_fenced(&self) -> bool {
        match self {
            DeviceImpl::Plugin(d) => d.is_fenced(),
            DeviceImpl::Builtin(_) => false,
            DeviceImpl::Remote(d) => d.failed(),
        }
    }

    /// Whether the device's process died or misbehaved (in-process: never).
    pub fn is_failed(&self) -> bool {
        matches!(self, DeviceImpl::Remote(d) if d.failed())
    }

    /// INTx router: `devfn`'s pin `pin` to `level` (see `crate::intx`).
    pub fn intx_set(&mut self, devfn: u32, pin: u32, level: bool) -> Result<(), PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.intx_set(devfn, pin, level).into_result(),
            DeviceImpl::Builtin(d) => d.intx_set(devfn, pin, level),
            DeviceImpl::Remote(_) => {
                Err(PluginError::unsupported("an INTx router must run in the host process"))
            }
        }
    }

    /// INTx router: where `devfn`'s pin `pin` is wired.
    pub fn intx_route(&mut self, devfn: u32, pin: u32) -> Result<dmhost_plugin_api::IntxRoute, PluginError> {
        match self {
            DeviceImpl::Plugin(d) => d.intx_route(devfn, pin).into_result(),
            DeviceImpl::Builtin(d) => d.intx_route(devfn, pin),
            DeviceImpl::Remote(_) => {
                Err(PluginError::unsupported("an INTx router must run in the host process"))
            }
        }
    }

    fn read(&mut self, space: IoSpace, addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        match (self, space) {
            (DeviceImpl::Plugin(d), IoSpace::Mmio) => {
                d.mmio_read(addr, RSliceMut::from_mut_slice(data)).into_result()
            }
            (DeviceImpl::Plugin(d), IoSpace::Pio) => {
                d.pio_read(addr, RSliceMut::from_mut_slice(data)).into_result()
            }
            (DeviceImpl::Builtin(d), IoSpace::Mmio) => d.mmio_read(addr, data),
            (DeviceImpl::Builtin(d), IoSpace::Pio) => d.pio_read(addr, data),
            (DeviceImpl::Remote(d), space) => d.read(space, addr, data),
        }
    }

    fn write(&mut self, space: IoSpace, addr: u64, data: &[u8]) -> Result<(), PluginError> {
        match (self, space) {
            (DeviceImpl::Plugin(d), IoSpace::Mmio) => {
                d.mmio_write(addr, RSlice::from_slice(data)).into_result()
            }
            (DeviceImpl::Plugin(d), IoSpace::Pio) => {
                d.pio_write(addr, RSlice::from_slice(data)).into_result()
            }
            (DeviceImpl::Builtin(d), IoSpace::Mmio) => d.mmio_write(addr, data),
            (DeviceImpl::Builtin(d), IoSpace::Pio) => d.pio_write(addr, data),
            (DeviceImpl::Remote(d), space) => d.write(space, addr, data),
        }
    }
}

/// A device on the VM: id, kind and its implementation.
pub struct HostDevice {
    pub id: String,
    pub kind: String,
    imp: Mutex<DeviceImpl>,
    errors: RateLimiter,
}

impl HostDevice {
    pub fn new(id: &str, kind: &str, imp: DeviceImpl) -> Self {
        Self {
            id: id.to_owned(),
            kind: kind.to_owned(),
            imp: Mutex::new(imp),
            errors: RateLimiter::new(5, std::time::Duration::from_secs(1)),
        }
    }

    /// Lock the implementation (never while holding a host lock the device
    /// may need through its services).
    pub fn lock(&self) -> MutexGuard<'_, DeviceImpl> {
        self.imp.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, what: &str, addr: u64, e: &PluginError) {
        self.errors.log(|suppressed| {
            log::warn!(
                "device {} {what} at {addr:#x}: {e}{}",
                self.id,
                if suppressed > 0 { format!(" ({suppressed} more suppressed)") } else { String::new() }
            )
        });
    }
}

impl BusDevice for HostDevice {
    fn read(&self, space: IoSpace, addr: u64, data: &mut [u8]) {
        if let Err(e) = self.lock().read(space, addr, data) {
            data.fill(0xff);
            self.report("read", addr, &e);
        }
    }

    fn write(&self, space: IoSpace, addr: u64, data: &[u8]) {
        if let Err(e) = self.lock().write(space, addr, data) {
            self.report("write", addr, &e);
        }
    }
}

/// What `query-devices` reports about a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    pub id: String,
    pub kind: String,
    /// Guest-physical base and size of its memory region.
    pub region: Option<(u64, u64)>,
    /// MMIO ranges it registered (base, size).
    pub mmio: Vec<(u64, u64)>,
    /// Port ranges it registered (base, size).
    pub pio: Vec<(u64, u64)>,
    pub fenced: bool,
    /// The device's process died or misbehaved (`isolation = "process"`).
    pub failed: bool,
}

pub(crate) struct DeviceEntry {
    pub device: Arc<HostDevice>,
    pub region: Option<(u64, u64)>,
}

/// A shared handle to a device, as the bus holds it.
pub type DeviceRef = Arc<HostDevice>;

pub(crate) fn as_bus_device(d: &DeviceRef) -> Arc<dyn BusDevice> {
    Arc::clone(d) as Arc<dyn BusDevice>
}

/// Creates devices by kind (the plugin registry, or a test's own factory).
pub trait DeviceFactory: Send + Sync {
    fn create(
        &self,
        kind: &str,
        id: &str,
        config: &str,
        host: dmhost_plugin_api::Host,
    ) -> Result<DeviceImpl, PluginError>;

    /// The plugin library providing `kind`, to load in a device process.
    fn library_path(&self, _kind: &str) -> Option<std::path::PathBuf> {
        None
    }
}
