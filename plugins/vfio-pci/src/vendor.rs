//! A vendor driver plugin as a VFIO backend: the same contract as the
//! kernel, in user space, reached through `HostServices::open_vfio_driver`.

use std::os::fd::RawFd;

use dmhost_plugin_api::{
    MemoryRegion, MigState, RSlice, RSliceMut, VfioDataStream, VfioDeviceInfo, VfioDriverBox, VfioIrqInfo,
    VfioPrecopyInfo, VfioRegionInfo,
};

use crate::{
    backend::{BackendError, BackendResult, VfioBackend},
    state::{decode, next_state},
};

pub struct VendorBackend {
    name: String,
    driver: VfioDriverBox,
    info: VfioDeviceInfo,
    stream: Option<VfioDataStream>,
}

impl VendorBackend {
    pub fn new(name: &str, driver: VfioDriverBox) -> Self {
        let info = driver.device_info();
        Self { name: name.to_owned(), driver, info, stream: None }
    }

    fn stream(&self) -> BackendResult<VfioDataStream> {
        self.stream.ok_or_else(|| BackendError::Invalid("no migration data session is open".into()))
    }
}

impl VfioBackend for VendorBackend {
    fn describe(&self) -> String {
        format!("vendor driver {}", self.name)
    }
    fn device_info(&self) -> VfioDeviceInfo {
        self.info
    }
    fn region_info(&self, index: u32) -> BackendResult<VfioRegionInfo> {
        Ok(self.driver.region_info(index).into_result()?)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        Ok(self.driver.region_read(index, offset, RSliceMut::from(data)).into_result()?)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        Ok(self.driver.region_write(index, offset, RSlice::from(data)).into_result()?)
    }
    fn region_mmap(&self, index: u32) -> BackendResult<Option<MemoryRegion>> {
        Ok(self.driver.region_mmap(index).into_result()?.into_option())
    }
    fn irq_info(&self, index: u32) -> BackendResult<VfioIrqInfo> {
        Ok(self.driver.irq_info(index).into_result()?)
    }
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[RawFd]) -> BackendResult<()> {
        Ok(self.driver.set_irqs(index, action, start, RSlice::from(fds)).into_result()?)
    }
    fn reset(&self) -> BackendResult<()> {
        self.driver.reset().into_result()?;
        Ok(())
    }

    fn mig_state(&self) -> BackendResult<MigState> {
        decode(self.driver.get_state()).map_err(|e| BackendError::Io(e.to_string()))
    }

    fn set_mig_state(&mut self, target: MigState) -> BackendResult<()> {
        let flags = self.info.migration_flags;
        let mut cur = self.mig_state()?;
        // Walk the arcs one at a time, as the VFIO core does for a kernel
        // driver (vfio_mig_get_next_state).
        while cur != target {
            let next = next_state(cur, target, flags)
                .ok_or_else(|| BackendError::Invalid(format!("{cur} -> {target} is not allowed")))?;
            match self.driver.set_state(next.raw()).into_result() {
                Ok(opened) => {
                    if let Some(s) = opened.into_option() {
                        self.stream = Some(s);
                    } else if !next.has_stream() {
                        self.stream = None;
                    }
                }
                Err(e) => {
                    if !self.mig_state().is_ok_and(|s| s.has_stream()) {
                        self.stream = None;
                    }
                    return Err(BackendError::from(e));
                }
            }
            cur = next;
        }
        Ok(())
    }

    fn stop_copy_size(&self) -> BackendResult<u64> {
        Ok(self.driver.stop_copy_size().into_result()?)
    }
    fn precopy_info(&self) -> BackendResult<VfioPrecopyInfo> {
        Ok(self.driver.precopy_info(self.stream()?).into_result()?)
    }
    fn read_mig_data(&mut self, buf: &mut [u8]) -> BackendResult<usize> {
        let len = buf.len();
        let n = self.driver.read_migration_data(self.stream()?, RSliceMut::from(buf)).into_result()?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= len)
            .ok_or_else(|| BackendError::Io(format!("driver read {n} bytes into {len}")))
    }
    fn write_mig_data(&mut self, mut data: &[u8]) -> BackendResult<()> {
        let stream = self.stream()?;
        while !data.is_empty() {
            let n = self.driver.write_migration_data(stream, RSlice::from(data)).into_result()?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            if n == 0 || n > data.len() {
                return Err(BackendError::Io(format!("driver consumed {n} of {} bytes", data.len())));
            }
            data = &data[n..];
        }
        Ok(())
    }
}
