//! The VFIO device contract for user-space vendor drivers (ABI 1.1).
//!
//! A vendor driver plugin implements, in user space, what a kernel VFIO
//! variant driver offers through the VFIO uAPI (`include/uapi/linux/vfio.h`):
//! device/region/irq info, region access, interrupt eventfds, reset and the
//! migration v2 state machine with its data stream. The `vfio-pci` plugin
//! drives either the kernel (through `vfio-ioctls`) or such a driver, found
//! through [`HostServices::open_vfio_driver`](crate::HostServices), so it
//! never links a vendor driver.
//!
//! Plugin authors implement the plain [`VfioDriver`] trait and list their
//! drivers through [`Plugin::vfio_drivers`](crate::Plugin); the export
//! wraps each driver in [`VfioDriverDevice`], catching panics.
//!
//! Differences from the kernel uAPI, on purpose:
//! - `set_state` accepts **single arcs only** (as a kernel driver's
//!   `migration_set_state` op does: the VFIO core walks combination
//!   transitions with `vfio_mig_get_next_state`, and so does `vfio-pci`
//!   here, with [`next_state`]). A non-arc is refused with `EINVAL` and the
//!   state is unchanged.
//! - The data "fd" is a [`VfioDataStream`] token returned by the arcs that
//!   open a session; reads, writes and `precopy_info` name it, and a token
//!   of a finished session is refused with `EBADF`.
//! - Errors carry a Linux errno ([`VfioError`]): `ENOMSG` is the pre-copy
//!   "no data for now", `EINVAL` a refused request, `EBADF` a stale or
//!   missing stream, `EIO` a device failure.
//!
//! The FSM below (states, flags, [`next_state`]) is the uAPI's and is pure:
//! drivers, the conformance suite and `vfio-pci` share it.

use std::fmt;

use abi_stable::{
    sabi_trait,
    std_types::{RBox, ROption, RResult, RSlice, RSliceMut, RString},
    StableAbi,
};

use crate::MemoryRegion;

// ---------------------------------------------------------------------------
// uAPI constants

/// `VFIO_DEVICE_FLAGS_RESET`.
pub const VFIO_DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const VFIO_DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const VFIO_REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const VFIO_REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`.
pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

/// `VFIO_PCI_*_REGION_INDEX`: BARs 0–5, then ROM, config space, VGA.
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
pub const VFIO_PCI_BAR5_REGION_INDEX: u32 = 5;
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const VFIO_PCI_VGA_REGION_INDEX: u32 = 8;
pub const VFIO_PCI_NUM_REGIONS: u32 = 9;

/// `VFIO_PCI_*_IRQ_INDEX`.
pub const VFIO_PCI_INTX_IRQ_INDEX: u32 = 0;
pub const VFIO_PCI_MSI_IRQ_INDEX: u32 = 1;
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;
pub const VFIO_PCI_ERR_IRQ_INDEX: u32 = 3;
pub const VFIO_PCI_REQ_IRQ_INDEX: u32 = 4;
pub const VFIO_PCI_NUM_IRQS: u32 = 5;

/// `VFIO_IRQ_INFO_*`.
pub const VFIO_IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const VFIO_IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const VFIO_IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const VFIO_IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `VFIO_IRQ_SET_ACTION_*` (the `action` of [`VfioDriverDevice::set_irqs`]).
pub const VFIO_IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const VFIO_IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// `VFIO_MIGRATION_*` (the device's `migration_flags`).
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// errno values a driver reports (Linux, x86-64).
pub mod errno {
    pub const EIO: i32 = 5;
    pub const EBADF: i32 = 9;
    pub const EFAULT: i32 = 14;
    pub const EINVAL: i32 = 22;
    pub const ENOTTY: i32 = 25;
    pub const ENOMSG: i32 = 42;
}

// ---------------------------------------------------------------------------
// The migration v2 FSM

/// `enum vfio_device_mig_state`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, in uAPI order.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The uAPI value.
    pub fn raw(self) -> u32 {
        self as u32
    }

    /// The state for a uAPI value; `None` for values the uAPI does not define.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Self::ALL.get(raw as usize).copied()
    }

    /// The `VFIO_MIGRATION_*` flags a device needs to support this state
    /// (the kernel's `state_flags_table`; ERROR needs "all").
    pub fn required_flags(self) -> u64 {
        match self {
            MigState::Stop | MigState::Running | MigState::StopCopy | MigState::Resuming => {
                VFIO_MIGRATION_STOP_COPY
            }
            MigState::PreCopy => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            MigState::PreCopyP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY,
            MigState::RunningP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
            MigState::Error => u64::MAX,
        }
    }

    /// Whether a device with `flags` supports this state.
    pub fn supported(self, flags: u64) -> bool {
        self.required_flags() & flags == self.required_flags()
    }

    /// PRE_COPY, PRE_COPY_P2P and STOP_COPY share one saving session.
    pub fn is_saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy)
    }

    /// The states with an open data session.
    pub fn has_stream(self) -> bool {
        self.is_saving() || self == MigState::Resuming
    }

    /// Whether the device may change its internal state and raise
    /// interrupts in this state.
    pub fn is_running(self) -> bool {
        matches!(self, MigState::Running | MigState::PreCopy)
    }
}

impl fmt::Display for MigState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        })
    }
}

/// The kernel's `vfio_from_fsm_table`: the next state on the shortest path
/// from `cur` to `new` when every optional state is supported.
fn fsm_table(cur: MigState, new: MigState) -> MigState {
    use MigState::*;
    match (cur, new) {
        (Error, _) | (_, Error) => Error,
        (a, b) if a == b => a,
        (Stop, Running | PreCopy | PreCopyP2p | RunningP2p) => RunningP2p,
        (Stop, StopCopy) => StopCopy,
        (Stop, Resuming) => Resuming,
        (Running, Stop | PreCopyP2p | StopCopy | Resuming | RunningP2p) => RunningP2p,
        (Running, PreCopy) => PreCopy,
        (PreCopy, Stop | Running | Resuming | RunningP2p) => Running,
        (PreCopy, PreCopyP2p | StopCopy) => PreCopyP2p,
        (PreCopyP2p, Stop | Running | Resuming | RunningP2p) => RunningP2p,
        (PreCopyP2p, PreCopy) => PreCopy,
        (PreCopyP2p, StopCopy) => StopCopy,
        (StopCopy, Stop | Running | Resuming | RunningP2p) => Stop,
        (StopCopy, PreCopy | PreCopyP2p) => Error,
        (Resuming, _) => Stop,
        (RunningP2p, Stop | StopCopy | Resuming) => Stop,
        (RunningP2p, Running | PreCopy) => Running,
        (RunningP2p, PreCopyP2p) => PreCopyP2p,
        // Every (x, x) pair is handled above.
        (_, _) => Error,
    }
}

/// Port of the kernel's `vfio_mig_get_next_state`: the first arc on the
/// path from `cur` to `new` for a device with `flags`, skipping optional
/// states it does not support. `None` when the transition is not allowed
/// (unsupported endpoints, ERROR, STOP_COPY → PRE_COPY*).
pub fn next_state(cur: MigState, new: MigState, flags: u64) -> Option<MigState> {
    if !cur.supported(flags) || !new.supported(flags) || flags & VFIO_MIGRATION_STOP_COPY == 0 {
        return None;
    }
    let mut next = fsm_table(cur, new);
    // At most a few hops: each step moves along the full table's path.
    for _ in 0..MigState::ALL.len() {
        if next.supported(flags) {
            break;
        }
        next = fsm_table(next, new);
    }
    (next != MigState::Error && next.supported(flags)).then_some(next)
}

/// Whether `cur → new` is a single arc a driver with `flags` implements:
/// what [`VfioDriverDevice::set_state`] must accept (and refuse otherwise).
pub fn is_arc(cur: MigState, new: MigState, flags: u64) -> bool {
    cur != new && next_state(cur, new, flags) == Some(new)
}

/// Whether the arc `cur → new` opens a new data session (returns a stream).
pub fn arc_opens_stream(cur: MigState, new: MigState) -> bool {
    new.has_stream() && !cur.is_saving() && cur != MigState::Resuming
}

// ---------------------------------------------------------------------------
// ABI types

/// An error from a VFIO driver: an errno as the kernel would return it.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct VfioError {
    pub errno: i32,
    pub message: RString,
}

impl VfioError {
    pub fn new(errno: i32, message: impl fmt::Display) -> Self {
        Self { errno, message: message.to_string().into() }
    }
    /// `EINVAL`: the request is not valid now (illegal arc, bad index/range).
    pub fn invalid(message: impl fmt::Display) -> Self {
        Self::new(errno::EINVAL, message)
    }
    /// `ENOMSG`: pre-copy has no data for now.
    pub fn no_data() -> Self {
        Self::new(errno::ENOMSG, "no pre-copy data available for now")
    }
    /// `EBADF`: no such data session (never opened, or finished).
    pub fn bad_stream(message: impl fmt::Display) -> Self {
        Self::new(errno::EBADF, message)
    }
    /// `EIO`: the device failed.
    pub fn io(message: impl fmt::Display) -> Self {
        Self::new(errno::EIO, message)
    }
    /// Whether this is the pre-copy "no data for now".
    pub fn is_no_data(&self) -> bool {
        self.errno == errno::ENOMSG
    }
}

impl fmt::Display for VfioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (errno {})", self.message, self.errno)
    }
}

impl std::error::Error for VfioError {}

/// `struct vfio_device_info` plus the `VFIO_DEVICE_FEATURE_MIGRATION` flags
/// (0 when the device cannot migrate).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfioDeviceInfo {
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
    pub migration_flags: u64,
}

/// `struct vfio_region_info`, without the fd offset (meaningless here).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfioRegionInfo {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
}

/// `struct vfio_irq_info`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfioIrqInfo {
    pub index: u32,
    pub flags: u32,
    pub count: u32,
}

/// `struct vfio_precopy_info`'s payload.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VfioPrecopyInfo {
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
}

/// A migration data session: the user-space stand-in for the `data_fd`.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VfioDataStream {
    pub id: u64,
}

/// A vendor driver a plugin library provides.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, PartialEq, Eq)]
pub struct VfioDriverInfo {
    /// Name to open it by (e.g. "vendor-sample").
    pub name: RString,
    /// PCI IDs of the device it drives: it is also found as "vvvv:dddd".
    pub vendor_id: u16,
    pub device_id: u16,
    pub description: RString,
    /// A configuration (JSON) that opens a working driver.
    pub default_config: RString,
}

impl VfioDriverInfo {
    /// Whether `matching` names this driver: its name, or "vvvv:dddd" (hex).
    pub fn matches(&self, matching: &str) -> bool {
        if matching == self.name.as_str() {
            return true;
        }
        let Some((v, d)) = matching.split_once(':') else {
            return false;
        };
        let parse = |s: &str| u16::from_str_radix(s.trim_start_matches("0x"), 16).ok();
        parse(v) == Some(self.vendor_id) && parse(d) == Some(self.device_id)
    }
}

// ---------------------------------------------------------------------------
// The contract

/// A VFIO device implemented in user space, as a plugin author writes it.
///
/// Every argument is untrusted (it comes from the guest through `vfio-pci`,
/// or from a migration stream): return an error, never panic. Methods take
/// `&self`: the driver synchronises internally (it may run its own threads).
pub trait VfioDriver: Send + Sync + 'static {
    fn device_info(&self) -> VfioDeviceInfo;
    fn region_info(&self, index: u32) -> Result<VfioRegionInfo, VfioError>;
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError>;
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError>;
    /// Memory backing an mmap-able region, mapped for the driver's lifetime.
    fn region_mmap(&self, _index: u32) -> Result<Option<MemoryRegion>, VfioError> {
        Ok(None)
    }
    fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, VfioError>;
    /// `VFIO_DEVICE_SET_IRQS` with eventfd data: `action` is one
    /// `VFIO_IRQ_SET_ACTION_*`; for TRIGGER, `fds[i]` (or -1 to disable)
    /// signals vector `start + i` and no fds disables the index; for UNMASK
    /// an fd is an unmask (resample) eventfd, no fds unmasks now; for MASK
    /// no fds masks now. The driver dups the fds it keeps.
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[i32]) -> Result<(), VfioError>;
    /// `VFIO_DEVICE_RESET`: also returns the migration state to RUNNING.
    fn reset(&self) -> Result<(), VfioError>;

    /// Take the single arc to `target` (a `MigState` value); returns the new
    /// session when the arc opens one. Refuses non-arcs with `EINVAL`,
    /// leaving the state unchanged; a failed arc may leave it in ERROR.
    fn set_state(&self, target: u32) -> Result<Option<VfioDataStream>, VfioError>;
    fn get_state(&self) -> u32;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: estimated STOP_COPY data size.
    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        Err(VfioError::new(errno::ENOTTY, "stop-copy size is not reported"))
    }
    /// `VFIO_MIG_GET_PRECOPY_INFO`: only in PRE_COPY states, else `EINVAL`.
    fn precopy_info(&self, stream: VfioDataStream) -> Result<VfioPrecopyInfo, VfioError>;
    /// `read()` on the data fd: bytes read, 0 at the end of a STOP_COPY
    /// stream; `ENOMSG` in PRE_COPY when there is nothing for now.
    fn read_migration_data(&self, stream: VfioDataStream, buf: &mut [u8]) -> Result<usize, VfioError>;
    /// `write()` on the data fd in RESUMING: bytes consumed.
    fn write_migration_data(&self, stream: VfioDataStream, buf: &[u8]) -> Result<usize, VfioError>;
}

/// The ABI-stable VFIO driver object. Plugin authors implement
/// [`VfioDriver`]; the export wraps it in this (with a panic fence).
///
/// Methods may only be appended, each with a default body.
#[sabi_trait]
pub trait VfioDriverDevice: Send + Sync {
    fn device_info(&self) -> VfioDeviceInfo;
    fn region_info(&self, index: u32) -> RResult<VfioRegionInfo, VfioError>;
    fn region_read(&self, index: u32, offset: u64, data: RSliceMut<'_, u8>) -> RResult<(), VfioError>;
    fn region_write(&self, index: u32, offset: u64, data: RSlice<'_, u8>) -> RResult<(), VfioError>;
    fn region_mmap(&self, index: u32) -> RResult<ROption<MemoryRegion>, VfioError>;
    fn irq_info(&self, index: u32) -> RResult<VfioIrqInfo, VfioError>;
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: RSlice<'_, i32>) -> RResult<(), VfioError>;
    fn reset(&self) -> RResult<(), VfioError>;
    fn set_state(&self, target: u32) -> RResult<ROption<VfioDataStream>, VfioError>;
    fn get_state(&self) -> u32;
    fn stop_copy_size(&self) -> RResult<u64, VfioError>;
    fn precopy_info(&self, stream: VfioDataStream) -> RResult<VfioPrecopyInfo, VfioError>;
    fn read_migration_data(&self, stream: VfioDataStream, buf: RSliceMut<'_, u8>) -> RResult<u64, VfioError>;
    #[sabi(last_prefix_field)]
    fn write_migration_data(&self, stream: VfioDataStream, buf: RSlice<'_, u8>) -> RResult<u64, VfioError>;
}

/// The VFIO driver object type that crosses the ABI.
pub type VfioDriverBox = VfioDriverDevice_TO<'static, RBox<()>>;
