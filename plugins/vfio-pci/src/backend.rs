//! The seam between the PCI front end and a VFIO device: the kernel
//! (`kernel.rs`, over vfio-ioctls) or a user-space vendor driver plugin
//! (`vendor.rs`), like Cloud Hypervisor's `trait Vfio`.

use std::os::fd::RawFd;

use dmhost_plugin_api::{
    vfio::errno, MemoryRegion, MigState, VfioDeviceInfo, VfioError, VfioIrqInfo, VfioPrecopyInfo,
    VfioRegionInfo,
};
use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// Pre-copy has no data for now (ENOMSG).
    #[error("no migration data available for now")]
    NoData,
    #[error("refused: {0}")]
    Invalid(String),
    #[error("not supported: {0}")]
    Unsupported(String),
    #[error("device I/O failed: {0}")]
    Io(String),
}

impl From<VfioError> for BackendError {
    fn from(e: VfioError) -> Self {
        let msg = e.message.to_string();
        match e.errno {
            errno::ENOMSG => Self::NoData,
            errno::EINVAL | errno::EBADF | errno::EFAULT => Self::Invalid(msg),
            errno::ENOTTY => Self::Unsupported(msg),
            _ => Self::Io(msg),
        }
    }
}

pub type BackendResult<T> = Result<T, BackendError>;

/// A VFIO device as the PCI front end sees it.
pub trait VfioBackend: Send {
    /// What the backend is (for messages), e.g. "kernel 0000:01:00.0".
    fn describe(&self) -> String;
    fn device_info(&self) -> VfioDeviceInfo;
    fn region_info(&self, index: u32) -> BackendResult<VfioRegionInfo>;
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()>;
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()>;
    /// Host memory backing an mmap-able region, if the backend offers it.
    fn region_mmap(&self, index: u32) -> BackendResult<Option<MemoryRegion>>;
    fn irq_info(&self, index: u32) -> BackendResult<VfioIrqInfo>;
    /// `VFIO_DEVICE_SET_IRQS` with eventfds (see `VfioDriver::set_irqs`).
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[RawFd]) -> BackendResult<()>;
    fn reset(&self) -> BackendResult<()>;

    /// `VFIO_MIGRATION_*` flags; 0 when the device cannot migrate.
    fn migration_flags(&self) -> u64 {
        self.device_info().migration_flags
    }
    fn mig_state(&self) -> BackendResult<MigState>;
    /// Move to `target`, walking the arcs; a session opened on the way is
    /// kept for the data calls, one closed on the way is dropped.
    fn set_mig_state(&mut self, target: MigState) -> BackendResult<()>;
    fn stop_copy_size(&self) -> BackendResult<u64>;
    fn precopy_info(&self) -> BackendResult<VfioPrecopyInfo>;
    /// Read migration data: bytes read, 0 at the end of STOP_COPY data,
    /// [`BackendError::NoData`] in PRE_COPY when there is nothing now.
    fn read_mig_data(&mut self, buf: &mut [u8]) -> BackendResult<usize>;
    /// Write all of `data` in RESUMING.
    fn write_mig_data(&mut self, data: &[u8]) -> BackendResult<()>;
}
