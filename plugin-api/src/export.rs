//! Wraps a plain [`Plugin`] and its [`DeviceModel`]s for the ABI.
//!
//! Every call into a device goes through `catch_unwind`: a panic becomes a
//! `Panicked` error and fences the device (every later call fails with
//! `Fenced`, reads return all ones), so the host keeps running.

use std::{
    any::Any,
    panic::{catch_unwind, AssertUnwindSafe},
    sync::atomic::{AtomicBool, Ordering},
};

use abi_stable::{
    prefix_type::PrefixTypeTrait,
    sabi_trait::TD_Opaque,
    std_types::{ROption, RResult, RSlice, RSliceMut, RStr, RVec},
};

use crate::{
    vfio::{errno, VfioDriver, VfioDriverDevice},
    Device, DeviceBox, DeviceKind, DeviceModel, Device_TO, DsmReply, DsmRequest, ErrorKind, GuestRegion,
    Host, IntxRoute, LogLevel, LogSinkBox, MemoryRegion, PendingSize, PlugInfo, PluginError, PluginModule,
    PluginModule_Ref, SaveChunk, VfioDataStream, VfioDeviceInfo, VfioDriverBox, VfioDriverDevice_TO,
    VfioDriverInfo, VfioError, VfioIrqInfo, VfioPrecopyInfo, VfioRegionInfo,
};

/// A plugin library, as its author writes it. Export it with
/// [`export_plugin!`](crate::export_plugin).
pub trait Plugin {
    /// The plugin's name.
    const NAME: &'static str;
    /// The plugin's version (use `env!("CARGO_PKG_VERSION")`).
    const VERSION: &'static str;
    /// The device kinds this plugin provides.
    fn kinds() -> Vec<DeviceKind>;
    /// Create a device; `config` is untrusted JSON text.
    fn create(kind: &str, id: &str, config: &str, host: Host) -> Result<Box<dyn DeviceModel>, PluginError>;

    /// The vendor VFIO drivers this library provides (ABI 1.1).
    fn vfio_drivers() -> Vec<VfioDriverInfo> {
        Vec::new()
    }
    /// Open one of [`Plugin::vfio_drivers`]; `config` is untrusted JSON text.
    fn open_vfio_driver(name: &str, _config: &str, _host: Host) -> Result<Box<dyn VfioDriver>, PluginError> {
        Err(PluginError::unsupported(format!("plugin {} provides no VFIO driver {name:?}", Self::NAME)))
    }
}

/// Builds the root module for `P`. Used by [`export_plugin!`](crate::export_plugin).
pub fn root_module<P: Plugin>() -> PluginModule_Ref {
    PluginModule {
        name: RStr::from_str(P::NAME),
        version: RStr::from_str(P::VERSION),
        kinds: kinds::<P>,
        init_logging,
        create: create::<P>,
        vfio_drivers: vfio_drivers::<P>,
        open_vfio_driver: open_vfio_driver::<P>,
    }
    .leak_into_prefix()
}

extern "C" fn vfio_drivers<P: Plugin>() -> RVec<VfioDriverInfo> {
    catch_unwind(P::vfio_drivers).map(RVec::from).unwrap_or_default()
}

extern "C" fn open_vfio_driver<P: Plugin>(
    name: RStr<'_>,
    config: RStr<'_>,
    host: Host,
) -> RResult<VfioDriverBox, PluginError> {
    let made = catch_unwind(AssertUnwindSafe(|| P::open_vfio_driver(name.as_str(), config.as_str(), host)));
    match made {
        Ok(Ok(driver)) => RResult::ROk(wrap_vfio_driver(driver, name.as_str())),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => RResult::RErr(panicked(&format!("open VFIO driver {name}"), &payload)),
    }
}

/// Wrap a VFIO driver in the ABI object (with the panic fence).
pub fn wrap_vfio_driver(driver: Box<dyn VfioDriver>, name: &str) -> VfioDriverBox {
    let guarded = GuardedVfio { inner: driver, name: name.to_owned(), fenced: AtomicBool::new(false) };
    VfioDriverDevice_TO::from_value(guarded, TD_Opaque)
}

/// A VFIO driver behind the panic fence: a panic answers `EIO` and fences
/// the driver (its migration state then reads as ERROR).
struct GuardedVfio {
    inner: Box<dyn VfioDriver>,
    name: String,
    fenced: AtomicBool,
}

impl GuardedVfio {
    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn VfioDriver) -> Result<T, VfioError>,
    ) -> RResult<T, VfioError> {
        if self.fenced.load(Ordering::Relaxed) {
            return RResult::RErr(VfioError::io(format!(
                "VFIO driver {} is fenced after a panic",
                self.name
            )));
        }
        match catch_unwind(AssertUnwindSafe(|| f(&*self.inner))) {
            Ok(r) => r.into(),
            Err(payload) => {
                self.fenced.store(true, Ordering::Relaxed);
                let e = panicked(&format!("VFIO driver {} {what}", self.name), &*payload);
                RResult::RErr(VfioError::new(errno::EIO, e.message))
            }
        }
    }
}

impl VfioDriverDevice for GuardedVfio {
    fn device_info(&self) -> VfioDeviceInfo {
        self.call("device_info", |d| Ok(d.device_info())).unwrap_or_default()
    }
    fn region_info(&self, index: u32) -> RResult<VfioRegionInfo, VfioError> {
        self.call("region_info", |d| d.region_info(index))
    }
    fn region_read(&self, index: u32, offset: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), VfioError> {
        let buf = data.as_mut_slice();
        self.call("region_read", |d| d.region_read(index, offset, buf))
    }
    fn region_write(&self, index: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), VfioError> {
        self.call("region_write", |d| d.region_write(index, offset, data.as_slice()))
    }
    fn region_mmap(&self, index: u32) -> RResult<ROption<MemoryRegion>, VfioError> {
        self.call("region_mmap", |d| d.region_mmap(index).map(ROption::from))
    }
    fn irq_info(&self, index: u32) -> RResult<VfioIrqInfo, VfioError> {
        self.call("irq_info", |d| d.irq_info(index))
    }
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: RSlice<'_, i32>) -> RResult<(), VfioError> {
        self.call("set_irqs", |d| d.set_irqs(index, action, start, fds.as_slice()))
    }
    fn reset(&self) -> RResult<(), VfioError> {
        self.call("reset", |d| d.reset())
    }
    fn set_state(&self, target: u32) -> RResult<ROption<VfioDataStream>, VfioError> {
        self.call("set_state", |d| d.set_state(target).map(ROption::from))
    }
    fn get_state(&self) -> u32 {
        self.call("get_state", |d| Ok(d.get_state())).unwrap_or(0)
    }
    fn stop_copy_size(&self) -> RResult<u64, VfioError> {
        self.call("stop_copy_size", |d| d.stop_copy_size())
    }
    fn precopy_info(&self, stream: VfioDataStream) -> RResult<VfioPrecopyInfo, VfioError> {
        self.call("precopy_info", |d| d.precopy_info(stream))
    }
    fn read_migration_data(
        &self,
        stream: VfioDataStream,
        mut buf: RSliceMut<'_, u8>,
    ) -> RResult<u64, VfioError> {
        let b = buf.as_mut_slice();
        self.call("read_migration_data", |d| {
            let n = d.read_migration_data(stream, b)?;
            if n > b.len() {
                return Err(VfioError::io(format!("driver claims {n} bytes read into {}", b.len())));
            }
            Ok(n as u64)
        })
    }
    fn write_migration_data(&self, stream: VfioDataStream, buf: RSlice<'_, u8>) -> RResult<u64, VfioError> {
        self.call("write_migration_data", |d| {
            d.write_migration_data(stream, buf.as_slice()).map(|n| n as u64)
        })
    }
}

extern "C" fn kinds<P: Plugin>() -> RVec<DeviceKind> {
    catch_unwind(P::kinds).map(RVec::from).unwrap_or_default()
}

extern "C" fn init_logging(sink: LogSinkBox, max_level: LogLevel) {
    crate::logging::install(sink, max_level);
}

extern "C" fn create<P: Plugin>(
    kind: RStr<'_>,
    id: RStr<'_>,
    config: RStr<'_>,
    host: Host,
) -> RResult<DeviceBox, PluginError> {
    let made =
        catch_unwind(AssertUnwindSafe(|| P::create(kind.as_str(), id.as_str(), config.as_str(), host)));
    match made {
        Ok(Ok(model)) => RResult::ROk(wrap(model, id.as_str())),
        Ok(Err(e)) => RResult::RErr(e),
        Err(payload) => RResult::RErr(panicked(&format!("create {kind} {id}"), &payload)),
    }
}

/// Wrap a device model in the ABI object (with the panic fence).
pub fn wrap(model: Box<dyn DeviceModel>, id: &str) -> DeviceBox {
    let guarded = Guarded { inner: model, id: id.to_owned(), fenced: AtomicBool::new(false), plugged: false };
    Device_TO::from_value(guarded, TD_Opaque)
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned())
}

fn panicked(what: &str, payload: &(dyn Any + Send)) -> PluginError {
    let msg = format!("{what} panicked: {}", panic_message(payload));
    log::error!("{msg}");
    PluginError::new(ErrorKind::Panicked, msg)
}

/// A device model behind the panic fence, with plug-state bookkeeping.
struct Guarded {
    inner: Box<dyn DeviceModel>,
    id: String,
    fenced: AtomicBool,
    plugged: bool,
}

impl Guarded {
    fn fenced_error(&self) -> PluginError {
        PluginError::new(ErrorKind::Fenced, format!("device {} is fenced after a panic", self.id))
    }

    /// Run `f` on the model unless fenced; a panic fences the device.
    fn call<T>(
        &self,
        what: &str,
        f: impl FnOnce(&dyn DeviceModel) -> Result<T, PluginError>,
    ) -> RResult<T, PluginError> {
        if self.fenced.load(Ordering::Relaxed) {
            return RResult::RErr(self.fenced_error());
        }
        match catch_unwind(AssertUnwindSafe(|| f(&*self.inner))) {
            Ok(r) => r.into(),
            Err(payload) => {
                self.fenced.store(true, Ordering::Relaxed);
                RResult::RErr(panicked(&format!("device {} {what}", self.id), &*payload))
            }
        }
    }

    fn call_mut<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut dyn DeviceModel) -> Result<T, PluginError>,
    ) -> RResult<T, PluginError> {
        if self.fenced.load(Ordering::Relaxed) {
            return RResult::RErr(self.fenced_error());
        }
        match catch_unwind(AssertUnwindSafe(|| f(&mut *self.inner))) {
            Ok(r) => r.into(),
            Err(payload) => {
                self.fenced.store(true, Ordering::Relaxed);
                RResult::RErr(panicked(&format!("device {} {what}", self.id), &*payload))
            }
        }
    }

    /// A read: on any failure the guest sees all ones.
    fn read(
        &mut self,
        what: &str,
        mut data: RSliceMut<'_, u8>,
        f: impl FnOnce(&mut dyn DeviceModel, &mut [u8]) -> Result<(), PluginError>,
    ) -> RResult<(), PluginError> {
        let buf = data.as_mut_slice();
        let r = self.call_mut(what, |d| f(d, buf));
        if r.is_err() {
            data.as_mut_slice().fill(0xff);
        }
        r
    }
}

impl Device for Guarded {
    fn memory_region(&self) -> ROption<GuestRegion> {
        self.call("memory_region", |d| Ok(d.memory_region())).into_result().ok().flatten().into()
    }
    fn backend_memory(&self) -> ROption<MemoryRegion> {
        self.call("backend_memory", |d| Ok(d.backend_memory())).into_result().ok().flatten().into()
    }
    fn plug(&mut self, info: PlugInfo) -> RResult<(), PluginError> {
        if self.plugged {
            return RResult::RErr(PluginError::state(format!("device {} is already plugged", self.id)));
        }
        let r = self.call_mut("plug", |d| d.plug(info));
        self.plugged = r.is_ok();
        r
    }
    fn unplug(&mut self) -> RResult<(), PluginError> {
        if !self.plugged {
            return RResult::RErr(PluginError::state(format!("device {} is not plugged", self.id)));
        }
        let r = self.call_mut("unplug", |d| d.unplug());
        // A device that failed to unplug cleanly is still considered gone:
        // the host removes its ranges either way.
        self.plugged = false;
        r
    }

    fn pio_read(&mut self, port: u64, data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.read("pio_read", data, |d, b| d.pio_read(port, b))
    }
    fn pio_write(&mut self, port: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.call_mut("pio_write", |d| d.pio_write(port, data.as_slice()))
    }
    fn mmio_read(&mut self, addr: u64, data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.read("mmio_read", data, |d, b| d.mmio_read(addr, b))
    }
    fn mmio_write(&mut self, addr: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.call_mut("mmio_write", |d| d.mmio_write(addr, data.as_slice()))
    }
    fn pci_config_read(&mut self, offset: u32, data: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.read("pci_config_read", data, |d, b| d.pci_config_read(offset, b))
    }
    fn pci_config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.call_mut("pci_config_write", |d| d.pci_config_write(offset, data.as_slice()))
    }

    fn state_version(&self) -> u32 {
        self.call("state_version", |d| Ok(d.state_version())).unwrap_or(0)
    }
    fn save_setup(&mut self) -> RResult<(), PluginError> {
        self.call_mut("save_setup", |d| d.save_setup())
    }
    fn state_pending_estimate(&mut self) -> RResult<PendingSize, PluginError> {
        self.call_mut("state_pending_estimate", |d| Ok(d.state_pending_estimate()))
    }
    fn state_pending_exact(&mut self) -> RResult<PendingSize, PluginError> {
        self.call_mut("state_pending_exact", |d| Ok(d.state_pending_exact()))
    }
    fn is_active_iterate(&self) -> bool {
        self.call("is_active_iterate", |d| Ok(d.is_active_iterate())).unwrap_or(false)
    }
    fn save_live_iterate(&mut self) -> RResult<SaveChunk, PluginError> {
        self.call_mut("save_live_iterate", |d| d.save_live_iterate())
    }
    fn save_live_complete_precopy(&mut self) -> RResult<RVec<u8>, PluginError> {
        self.call_mut("save_live_complete_precopy", |d| d.save_live_complete_precopy().map(RVec::from))
    }
    fn save_cleanup(&mut self) {
        let _ = self.call_mut("save_cleanup", |d| {
            d.save_cleanup();
            Ok(())
        });
    }
    fn load_setup(&mut self) -> RResult<(), PluginError> {
        self.call_mut("load_setup", |d| d.load_setup())
    }
    fn load_state(&mut self, version: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.call_mut("load_state", |d| d.load_state(version, data.as_slice()))
    }
    fn load_cleanup(&mut self) -> RResult<(), PluginError> {
        self.call_mut("load_cleanup", |d| d.load_cleanup())
    }
    fn vm_state_changed(&mut self, running: bool) -> RResult<(), PluginError> {
        self.call_mut("vm_state_changed", |d| d.vm_state_changed(running))
    }

    fn nfit_structures(&self) -> RResult<RVec<u8>, PluginError> {
        self.call("nfit_structures", |d| Ok(d.nfit_structures().into()))
    }
    fn aml(&self) -> RResult<RVec<u8>, PluginError> {
        self.call("aml", |d| Ok(d.aml().into()))
    }
    fn dsm_handles(&self) -> RVec<u32> {
        self.call("dsm_handles", |d| Ok(RVec::from(d.dsm_handles()))).unwrap_or_default()
    }
    fn dsm(&mut self, request: &DsmRequest) -> RResult<DsmReply, PluginError> {
        self.call_mut("dsm", |d| Ok(d.dsm(request)))
    }

    fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::Relaxed)
    }

    fn intx_set(&mut self, devfn: u32, pin: u32, level: bool) -> RResult<(), PluginError> {
        self.call_mut("intx_set", |d| d.intx_set(devfn, pin, level))
    }
    fn intx_route(&mut self, devfn: u32, pin: u32) -> RResult<IntxRoute, PluginError> {
        self.call_mut("intx_route", |d| d.intx_route(devfn, pin))
    }
}

/// Export a [`Plugin`] as this library's root module.
///
/// ```text
/// dmhost_plugin_api::export_plugin!(MyPlugin);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        fn __dmhost_plugin_root_module() -> $crate::PluginModule_Ref {
            $crate::export::root_module::<$plugin>()
        }

        // What abi_stable's `#[export_root_module]` expands to, spelled with
        // paths through this crate so plugins need not depend on abi_stable.
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn __erased() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__dmhost_plugin_root_module)
            }
            // SAFETY: the constructor returns the root module type named
            // here, and its layout is checked by the loader.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModule_Ref>(
                    __erased,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
