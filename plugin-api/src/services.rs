//! What the host offers a device: the `HostServices` object a device gets
//! when it is created, and the log sink a plugin library gets when loaded.
//!
//! Every request is checked by the host against the ranges the device owns;
//! a refusal is an `ErrorKind::Denied` error, never a silent success.

use abi_stable::{
    sabi_trait,
    std_types::{RArc, RBox, RResult, RSlice, RSliceMut, RStr},
    StableAbi,
};

use crate::{LogLevel, MemoryRegion, PluginError, VfioDriverBox};

/// Port or memory-mapped I/O.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IoSpace {
    Pio,
    Mmio,
}

/// Host services handed to one device; the host knows which device calls.
#[sabi_trait]
pub trait HostServices: Send + Sync + Clone {
    /// Claim an I/O range: guest accesses in it are dispatched to this device.
    fn register_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError>;
    /// Release an I/O range this device claimed.
    fn unregister_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError>;

    /// Map `size` bytes of this device's guest region, from `region_offset`,
    /// at `gpa`. The range must be owned by this device.
    fn physmap_add(&self, gpa: u64, size: u64, region_offset: u64) -> RResult<(), PluginError>;
    /// Unmap `[gpa, gpa+size)`. The range must be owned by this device;
    /// unmapping what is not mapped is a no-op.
    fn physmap_remove(&self, gpa: u64, size: u64) -> RResult<(), PluginError>;

    /// Drive a legacy interrupt line (GSI) to `level`.
    fn set_irq_line(&self, gsi: u32, level: bool) -> RResult<(), PluginError>;
    /// Register an eventfd that raises `gsi` when written; `resample_fd`
    /// (or -1) is signalled when the guest EOIs a level-triggered line.
    fn register_irqfd(&self, gsi: u32, fd: i32, resample_fd: i32) -> RResult<(), PluginError>;
    /// Undo `register_irqfd`.
    fn unregister_irqfd(&self, gsi: u32, fd: i32) -> RResult<(), PluginError>;

    /// Register memory that migrates with the VM (the whole backend).
    fn register_ram(&self, name: RStr<'_>, region: MemoryRegion) -> RResult<(), PluginError>;
    /// Undo `register_ram`.
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError>;
    /// The device wrote `[offset, offset+len)` of registered RAM itself
    /// (not through the guest), so migration must send it again.
    fn mark_dirty(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<(), PluginError>;

    /// Read guest memory (DMA).
    fn read_guest(&self, gpa: u64, buf: RSliceMut<'_, u8>) -> RResult<(), PluginError>;
    /// Write guest memory (DMA).
    #[sabi(last_prefix_field)]
    fn write_guest(&self, gpa: u64, buf: RSlice<'_, u8>) -> RResult<(), PluginError>;

    // ---- 1.1: appended after the last prefix field. Each has a default
    // body, which is also what a caller gets from a host built before it.

    /// Open a vendor VFIO driver from the loaded plugins: `matching` is a
    /// driver name or "vvvv:dddd" (PCI vendor:device, hex); `config` is the
    /// driver's JSON configuration. The driver gets this device's services.
    fn open_vfio_driver(&self, matching: RStr<'_>, config: RStr<'_>) -> RResult<VfioDriverBox, PluginError> {
        let _ = config;
        RResult::RErr(PluginError::unsupported(format!(
            "this host cannot open vendor VFIO drivers (asked for {matching:?})"
        )))
    }

    /// Deliver the MSI message (`address`, `data`) whenever `fd` (an
    /// eventfd) is written: on KVM an MSI route plus an irqfd. Registering
    /// the same `fd` again updates its message.
    fn register_msi_irqfd(&self, fd: i32, address: u64, data: u32) -> RResult<(), PluginError> {
        let _ = (address, data);
        RResult::RErr(PluginError::unsupported(format!("this host has no MSI routing (eventfd {fd})")))
    }

    /// Undo `register_msi_irqfd`.
    fn unregister_msi_irqfd(&self, fd: i32) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!("this host has no MSI routing (eventfd {fd})")))
    }

    // ---- 1.1 (iohub): the same rules.

    /// Drive PCI INTx pin `pin` (1 = INTA .. 4 = INTD) of function `devfn`
    /// to `level`, through the VM's INTx router (the iohub). The first
    /// device to drive a `devfn` owns it; another device is refused.
    fn set_intx(&self, devfn: u32, pin: u32, level: bool) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!(
            "this host has no INTx router (devfn {devfn:#x} pin {pin} level {level})"
        )))
    }
}

/// The host-services object type a device holds.
pub type Host = HostServices_TO<'static, RArc<()>>;

/// Where a plugin's `log` records go: the host's logger.
#[sabi_trait]
pub trait LogSink: Send + Sync {
    #[sabi(last_prefix_field)]
    fn log(&self, level: LogLevel, target: RStr<'_>, message: RStr<'_>);
}

/// The log-sink object type passed to a plugin library.
pub type LogSinkBox = LogSink_TO<'static, RBox<()>>;
