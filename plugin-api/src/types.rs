//! Plain data exchanged between host and plugins.

use abi_stable::{
    std_types::{ROption, RString, RVec},
    StableAbi,
};

/// A span of host memory that backs guest memory.
///
/// The plugin owns the mapping (`host_addr`) for the device's lifetime; the
/// host maps it into the guest and reads it for migration. `fd` (a memfd or a
/// file) lets the host share it with another process; it stays owned by the
/// plugin.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Address of the mapping in this process.
    pub host_addr: u64,
    /// Length in bytes; a multiple of the page size.
    pub size: u64,
    /// File descriptor backing the mapping, or -1.
    pub fd: i32,
    /// Offset of `host_addr` within `fd`.
    pub fd_offset: u64,
    /// The guest may only read it.
    pub read_only: bool,
}

/// Where the guest-visible region of a device should go.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    pub memory: MemoryRegion,
    /// A fixed guest-physical address (`addr=` in the config), or any.
    pub requested_gpa: ROption<u64>,
    /// Alignment of the guest-physical address.
    pub align: u64,
}

/// What the host tells a device when it plugs it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlugInfo {
    /// Guest-physical base of the device's memory region, when it has one.
    pub region_gpa: ROption<u64>,
}

/// Bytes a device still has to send, split as QEMU's
/// `state_pending_{estimate,exact}` do.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PendingSize {
    /// Must be sent before the VM can resume on the destination.
    pub must_precopy: u64,
    /// May be sent after the destination resumed (post-copy).
    pub can_postcopy: u64,
}

/// One chunk of device state produced by `save_live_iterate`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct SaveChunk {
    pub data: RVec<u8>,
    /// The device has nothing more to send in pre-copy for now.
    pub complete: bool,
}

/// A `_DSM` call the guest made, routed to the device that owns its handle.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct DsmRequest {
    /// NFIT device handle (0 is the root device).
    pub handle: u32,
    pub revision: u32,
    pub function: u32,
    /// The Arg3 package payload as the guest wrote it (untrusted).
    pub arg3: RVec<u8>,
}

/// The device's answer to a `_DSM` call: a status code and its output bytes.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq, Default)]
pub struct DsmReply {
    /// 0 success, 1 not supported, 2 non-existing memory device,
    /// 3 invalid input parameters (QEMU's `NVDIMM_DSM_RET_STATUS_*`).
    pub status: u32,
    pub data: RVec<u8>,
}

impl DsmReply {
    pub const SUCCESS: u32 = 0;
    pub const UNSUPPORTED: u32 = 1;
    pub const NO_SUCH_DEVICE: u32 = 2;
    pub const INVALID_INPUT: u32 = 3;

    pub fn status(status: u32) -> Self {
        Self { status, data: RVec::new() }
    }
    pub fn ok(data: Vec<u8>) -> Self {
        Self { status: Self::SUCCESS, data: data.into() }
    }
}

/// A device kind a plugin provides.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct DeviceKind {
    pub name: RString,
    pub description: RString,
    /// A configuration (JSON) that creates a working device.
    pub default_config: RString,
}

/// Log levels, as `log::Level` (1 = error … 5 = trace).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Error = 1,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<log::Level> for LogLevel {
    fn from(l: log::Level) -> Self {
        match l {
            log::Level::Error => Self::Error,
            log::Level::Warn => Self::Warn,
            log::Level::Info => Self::Info,
            log::Level::Debug => Self::Debug,
            log::Level::Trace => Self::Trace,
        }
    }
}

impl From<LogLevel> for log::Level {
    fn from(l: LogLevel) -> Self {
        match l {
            LogLevel::Error => Self::Error,
            LogLevel::Warn => Self::Warn,
            LogLevel::Info => Self::Info,
            LogLevel::Debug => Self::Debug,
            LogLevel::Trace => Self::Trace,
        }
    }
}

/// Where a PCI INTx pin is wired: the IOAPIC GSI of its line and the line's
/// KVM irqfd / resamplefd (descriptors of the router's process, owned by
/// the router; valid while the router is plugged).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntxRoute {
    /// Index of the line in the router (PIRQ A..D = 0..3).
    pub line: u32,
    pub gsi: u32,
    pub irqfd: i32,
    pub resamplefd: i32,
}
