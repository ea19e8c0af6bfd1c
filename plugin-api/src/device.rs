//! The device contract: `DeviceModel`, the plain trait plugin authors
//! implement, and `Device`, its ABI-stable form that crosses the boundary.

use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RVec},
};

use crate::{
    DsmReply, DsmRequest, GuestRegion, IntxRoute, MemoryRegion, PendingSize, PlugInfo, PluginError, SaveChunk,
};

/// A device model, as a plugin author writes it.
///
/// Only `plug`/`unplug` bookkeeping is mandatory in spirit; everything else
/// has a default that suits a device without that feature. All input from
/// the guest (I/O data, `_DSM` buffers) and from a migration stream is
/// untrusted: return an error, never panic (a panic fences the device).
pub trait DeviceModel: Send + 'static {
    /// The part of the backend the guest maps (pc-dimm: all of it; nvdimm:
    /// all but the label area).
    fn memory_region(&self) -> Option<GuestRegion> {
        None
    }
    /// The whole backend: what migrates.
    fn backend_memory(&self) -> Option<MemoryRegion> {
        self.memory_region().map(|r| r.memory)
    }

    /// Attach to the VM: register RAM for migration, I/O ranges, interrupts.
    fn plug(&mut self, _info: PlugInfo) -> Result<(), PluginError> {
        Ok(())
    }
    /// Detach: undo everything `plug` did.
    fn unplug(&mut self) -> Result<(), PluginError> {
        Ok(())
    }

    /// Port read at absolute port `port`; `data.len()` is 1, 2 or 4.
    fn pio_read(&mut self, _port: u64, data: &mut [u8]) -> Result<(), PluginError> {
        data.fill(0xff);
        Ok(())
    }
    fn pio_write(&mut self, _port: u64, _data: &[u8]) -> Result<(), PluginError> {
        Ok(())
    }
    /// MMIO read at absolute guest-physical `addr`.
    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        data.fill(0xff);
        Ok(())
    }
    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) -> Result<(), PluginError> {
        Ok(())
    }
    /// PCI configuration space read at `offset`.
    fn pci_config_read(&mut self, _offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        data.fill(0xff);
        Ok(())
    }
    fn pci_config_write(&mut self, _offset: u32, _data: &[u8]) -> Result<(), PluginError> {
        Ok(())
    }

    /// Version of the state this device saves; it loads any version up to it.
    fn state_version(&self) -> u32 {
        1
    }
    fn save_setup(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
    fn state_pending_estimate(&mut self) -> PendingSize {
        PendingSize::default()
    }
    fn state_pending_exact(&mut self) -> PendingSize {
        self.state_pending_estimate()
    }
    /// Whether `save_live_iterate` has something to do now.
    fn is_active_iterate(&self) -> bool {
        false
    }
    fn save_live_iterate(&mut self) -> Result<SaveChunk, PluginError> {
        Ok(SaveChunk { data: RVec::new(), complete: true })
    }
    /// The final device state, with the VM stopped.
    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        Ok(Vec::new())
    }
    fn save_cleanup(&mut self) {}
    fn load_setup(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
    /// Load one section (iterate chunk or final state) of `version`.
    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        if data.is_empty() {
            Ok(())
        } else {
            Err(PluginError::migration(format!(
                "device has no migratable state but got {} bytes (version {version})",
                data.len()
            )))
        }
    }
    fn load_cleanup(&mut self) -> Result<(), PluginError> {
        Ok(())
    }
    /// The VM stopped (`running == false`) or resumed.
    fn vm_state_changed(&mut self, _running: bool) -> Result<(), PluginError> {
        Ok(())
    }

    /// ACPI NFIT sub-structures (each with its type/length header).
    fn nfit_structures(&self) -> Vec<u8> {
        Vec::new()
    }
    /// AML for the device's part of the SSDT (a term list).
    fn aml(&self) -> Vec<u8> {
        Vec::new()
    }
    /// NFIT handles this device serves `_DSM` calls for.
    fn dsm_handles(&self) -> Vec<u32> {
        Vec::new()
    }
    /// Serve a `_DSM` call the guest made.
    fn dsm(&mut self, _request: &DsmRequest) -> DsmReply {
        DsmReply::status(DsmReply::UNSUPPORTED)
    }

    /// INTx router only (the iohub): device function `devfn` drives its
    /// pin `pin` (1..=4) to `level`. Other devices keep the default.
    fn intx_set(&mut self, devfn: u32, pin: u32, _level: bool) -> Result<(), PluginError> {
        Err(PluginError::unsupported(format!("not an INTx router (devfn {devfn:#x} pin {pin})")))
    }
    /// INTx router only: the line `devfn`'s pin `pin` is wired to, with its
    /// eventfds, so a device in another process can raise it directly.
    fn intx_route(&mut self, devfn: u32, pin: u32) -> Result<IntxRoute, PluginError> {
        Err(PluginError::unsupported(format!("not an INTx router (devfn {devfn:#x} pin {pin})")))
    }
}

/// The ABI-stable device object. Plugin authors do not implement this: the
/// export macro wraps a [`DeviceModel`] in it, catching panics.
///
/// Methods may only be appended (after the last one) in a minor version.
#[sabi_trait]
pub trait Device: Send {
    fn memory_region(&self) -> ROption<GuestRegion>;
    fn backend_memory(&self) -> ROption<MemoryRegion>;
    fn plug(&mut self, info: PlugInfo) -> RResult<(), PluginError>;
    fn unplug(&mut self) -> RResult<(), PluginError>;

    fn pio_read(&mut self, port: u64, data: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
    fn pio_write(&mut self, port: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError>;
    fn mmio_read(&mut self, addr: u64, data: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
    fn mmio_write(&mut self, addr: u64, data: RSlice<'_, u8>) -> RResult<(), PluginError>;
    fn pci_config_read(&mut self, offset: u32, data: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
    fn pci_config_write(&mut self, offset: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError>;

    fn state_version(&self) -> u32;
    fn save_setup(&mut self) -> RResult<(), PluginError>;
    fn state_pending_estimate(&mut self) -> RResult<PendingSize, PluginError>;
    fn state_pending_exact(&mut self) -> RResult<PendingSize, PluginError>;
    fn is_active_iterate(&self) -> bool;
    fn save_live_iterate(&mut self) -> RResult<SaveChunk, PluginError>;
    fn save_live_complete_precopy(&mut self) -> RResult<RVec<u8>, PluginError>;
    fn save_cleanup(&mut self);
    fn load_setup(&mut self) -> RResult<(), PluginError>;
    fn load_state(&mut self, version: u32, data: RSlice<'_, u8>) -> RResult<(), PluginError>;
    fn load_cleanup(&mut self) -> RResult<(), PluginError>;
    fn vm_state_changed(&mut self, running: bool) -> RResult<(), PluginError>;

    fn nfit_structures(&self) -> RResult<RVec<u8>, PluginError>;
    fn aml(&self) -> RResult<RVec<u8>, PluginError>;
    fn dsm_handles(&self) -> RVec<u32>;
    fn dsm(&mut self, request: &DsmRequest) -> RResult<DsmReply, PluginError>;

    /// Whether the device was fenced after a panic.
    #[sabi(last_prefix_field)]
    fn is_fenced(&self) -> bool;

    // ---- appended (iohub). Default bodies answer for plugins built
    // before these existed.

    /// See [`DeviceModel::intx_set`].
    fn intx_set(&mut self, devfn: u32, pin: u32, level: bool) -> RResult<(), PluginError> {
        let _ = level;
        RResult::RErr(PluginError::unsupported(format!("not an INTx router (devfn {devfn:#x} pin {pin})")))
    }
    /// See [`DeviceModel::intx_route`].
    fn intx_route(&mut self, devfn: u32, pin: u32) -> RResult<IntxRoute, PluginError> {
        RResult::RErr(PluginError::unsupported(format!("not an INTx router (devfn {devfn:#x} pin {pin})")))
    }
}

/// The device object type the host holds.
pub type DeviceBox = Device_TO<'static, RBox<()>>;
