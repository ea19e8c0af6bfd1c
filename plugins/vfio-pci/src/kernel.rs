//! The kernel VFIO backend, over the `vfio-ioctls` crate: legacy
//! container/group (`/dev/vfio/vfio` + `/dev/vfio/<group>`), selected by
//! `host=0000:01:00.0` or a sysfs path.
//!
//! vfio-ioctls covers device/region/irq discovery and the migration v2
//! feature calls; region access, `VFIO_DEVICE_SET_IRQS` with the
//! MASK/UNMASK actions, and reset are issued here so their errors reach the
//! caller (vfio-ioctls logs and swallows them). The argument structs below
//! mirror `include/uapi/linux/vfio.h`; their layout is unit-tested against
//! the uAPI and vfio-bindings.
//!
//! There is no VFIO hardware on the build machine: opening fails with an
//! error naming the missing sysfs path or device node.

use std::{
    mem::size_of,
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use dmhost_plugin_api::{
    vfio::{
        VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_SET_ACTION_MASK,
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
        VFIO_REGION_INFO_FLAG_MMAP,
    },
    MemoryRegion, MigState, VfioDeviceInfo, VfioIrqInfo, VfioPrecopyInfo, VfioRegionInfo,
};
use thiserror::Error;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError as IoctlError, VfioRegionInfoCap};

use crate::{
    backend::{BackendError, BackendResult, VfioBackend},
    state::{decode, path},
};

// ---------------------------------------------------------------------------
// uAPI argument layouts and ioctl numbers

/// `VFIO_TYPE` (';') and `VFIO_BASE`.
const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

/// `_IO(type, nr)` on x86-64: no direction, no size.
pub const fn vfio_io(nr: u32) -> u32 {
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}

pub const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(10);
pub const VFIO_DEVICE_RESET: u32 = vfio_io(11);
pub const VFIO_DEVICE_FEATURE: u32 = vfio_io(17);
pub const VFIO_MIG_GET_PRECOPY_INFO: u32 = vfio_io(21);

pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;

/// `struct vfio_irq_set` (header; `data[]` follows).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioIrqSet {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

/// `struct vfio_device_feature` (header; `data[]` follows).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeature {
    pub argsz: u32,
    pub flags: u32,
}

/// `struct vfio_device_feature_mig_state`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioDeviceFeatureMigState {
    pub device_state: u32,
    pub data_fd: i32,
}

/// `struct vfio_precopy_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VfioPrecopyInfoArg {
    pub argsz: u32,
    pub flags: u32,
    pub initial_bytes: u64,
    pub dirty_bytes: u64,
}

/// The `VFIO_DEVICE_SET_IRQS` argument: header plus `count` eventfds
/// (or none for `DATA_NONE`), built as the kernel reads it.
pub fn irq_set_arg(index: u32, action: u32, start: u32, fds: &[RawFd]) -> Vec<u8> {
    let (data_flag, count) = if fds.is_empty() {
        // TRIGGER with no data and count 0 disables the index; MASK/UNMASK
        // with no data act on one vector now.
        (VFIO_IRQ_SET_DATA_NONE, u32::from(action != VFIO_IRQ_SET_ACTION_TRIGGER))
    } else {
        (VFIO_IRQ_SET_DATA_EVENTFD, fds.len() as u32)
    };
    let argsz = size_of::<VfioIrqSet>() + std::mem::size_of_val(fds);
    let header = VfioIrqSet { argsz: argsz as u32, flags: data_flag | action, index, start, count };
    let mut buf = Vec::with_capacity(argsz);
    for field in [header.argsz, header.flags, header.index, header.start, header.count] {
        buf.extend_from_slice(&field.to_ne_bytes());
    }
    for fd in fds {
        buf.extend_from_slice(&fd.to_ne_bytes());
    }
    buf
}

// ---------------------------------------------------------------------------
// Opening

#[derive(Debug, Error)]
pub enum KernelError {
    #[error("host device {0:?} is not a PCI address (expected DDDD:BB:DD.F)")]
    BadAddress(String),
    #[error("no such PCI device: {} does not exist", .0.display())]
    NoDevice(PathBuf),
    #[error("{} has no IOMMU group ({} is missing): is an IOMMU enabled and the device bound to vfio-pci?", .0.display(), .0.join("iommu_group").display())]
    NoIommuGroup(PathBuf),
    #[error("opening the VFIO container (/dev/vfio/vfio)")]
    Container(#[source] IoctlError),
    #[error("opening VFIO device {}", .0.display())]
    Device(PathBuf, #[source] IoctlError),
    #[error("iommufd/cdev mode is not built into this plugin (vfio-ioctls feature vfio_cdev); use \"iommu\": \"container\"")]
    CdevNotBuilt,
}

/// The sysfs directory of `host` (a PCI address) or `sysfs` (a path).
pub fn sysfs_path(host: Option<&str>, sysfs: Option<&Path>) -> Result<PathBuf, KernelError> {
    if let Some(p) = sysfs {
        return Ok(p.to_path_buf());
    }
    let host = host.unwrap_or_default();
    let valid = {
        let parts: Vec<&str> = host.split([':', '.']).collect();
        parts.len() == 4
            && [4, 2, 2, 1]
                .iter()
                .zip(&parts)
                .all(|(n, p)| p.len() == *n && p.chars().all(|c| c.is_ascii_hexdigit()))
    };
    if !valid {
        return Err(KernelError::BadAddress(host.to_owned()));
    }
    Ok(Path::new("/sys/bus/pci/devices").join(host))
}

pub struct KernelBackend {
    path: PathBuf,
    device: VfioDevice,
    _container: Arc<VfioContainer>,
    /// Mappings made by `region_mmap`, unmapped on drop.
    maps: std::sync::Mutex<Vec<(u32, MemoryRegion)>>,
}

impl KernelBackend {
    /// Open `path` (a sysfs PCI device directory) through a new container.
    pub fn open(path: &Path, cdev: bool) -> Result<Self, KernelError> {
        if !path.exists() {
            return Err(KernelError::NoDevice(path.to_path_buf()));
        }
        if !path.join("iommu_group").exists() {
            return Err(KernelError::NoIommuGroup(path.to_path_buf()));
        }
        if cdev {
            return Err(KernelError::CdevNotBuilt);
        }
        // The KVM VFIO pseudo-device (coherency, group tracking) is the
        // host's to create and pass; none here.
        let container = Arc::new(VfioContainer::new(None).map_err(KernelError::Container)?);
        let device = VfioDevice::new(path, container.clone(), false)
            .map_err(|e| KernelError::Device(path.to_path_buf(), e))?;
        log::info!("vfio-pci: opened kernel VFIO device {}", path.display());
        Ok(Self { path: path.to_path_buf(), device, _container: container, maps: Default::default() })
    }

    fn region(&self, index: u32, offset: u64, len: usize) -> BackendResult<u64> {
        let size = self.device.get_region_size(index);
        if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(BackendError::Invalid(format!(
                "region {index}: access {offset:#x}+{len} outside its {size} bytes"
            )));
        }
        Ok(self.device.get_region_offset(index) + offset)
    }

    fn ioctl_arg(&self, request: u32, arg: *mut libc::c_void, what: &str) -> BackendResult<()> {
        // SAFETY: `request` is a VFIO device ioctl whose argument the caller
        // built with its argsz covering the buffer at `arg`; the kernel
        // reads/writes at most argsz bytes.
        let r = unsafe { libc::ioctl(self.device.as_raw_fd(), request as libc::c_ulong, arg) };
        if r < 0 {
            return Err(BackendError::Io(format!("{what}: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }
}

fn ioctl_err(what: &str, e: IoctlError) -> BackendError {
    let errno = match &e {
        IoctlError::VfioMigrationDataIo(io) => io.raw_os_error(),
        IoctlError::VfioDeviceFeature(sys) => Some(sys.errno()),
        _ => None,
    };
    match errno {
        Some(libc::ENOMSG) => BackendError::NoData,
        Some(libc::EINVAL) => BackendError::Invalid(format!("{what}: {e}")),
        Some(libc::ENOTTY) => BackendError::Unsupported(format!("{what}: {e}")),
        _ => BackendError::Io(format!("{what}: {e}")),
    }
}

impl VfioBackend for KernelBackend {
    fn describe(&self) -> String {
        format!("kernel VFIO {}", self.path.display())
    }

    fn device_info(&self) -> VfioDeviceInfo {
        let migration_flags = match self.device.query_migration_support() {
            Ok(Some(flags)) => flags,
            Ok(None) => 0,
            Err(e) => {
                log::warn!("vfio-pci {}: migration support query: {e}", self.path.display());
                0
            }
        };
        VfioDeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
            migration_flags,
        }
    }

    fn region_info(&self, index: u32) -> BackendResult<VfioRegionInfo> {
        if index >= VFIO_PCI_NUM_REGIONS {
            return Err(BackendError::Invalid(format!("no region {index}")));
        }
        Ok(VfioRegionInfo {
            index,
            flags: self.device.get_region_flags(index),
            size: self.device.get_region_size(index),
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        let at = self.region(index, offset, data.len())?;
        // SAFETY: pread into a live buffer of `data.len()` bytes from the
        // device fd; the result is checked.
        let n = unsafe {
            libc::pread(self.device.as_raw_fd(), data.as_mut_ptr().cast(), data.len(), at as libc::off_t)
        };
        if n != data.len() as isize {
            return Err(BackendError::Io(format!(
                "region {index} read at {offset:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> BackendResult<()> {
        let at = self.region(index, offset, data.len())?;
        // SAFETY: pwrite from a live buffer of `data.len()` bytes to the
        // device fd; the result is checked.
        let n = unsafe {
            libc::pwrite(self.device.as_raw_fd(), data.as_ptr().cast(), data.len(), at as libc::off_t)
        };
        if n != data.len() as isize {
            return Err(BackendError::Io(format!(
                "region {index} write at {offset:#x}: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }

    fn region_mmap(&self, index: u32) -> BackendResult<Option<MemoryRegion>> {
        let flags = self.device.get_region_flags(index);
        let size = self.device.get_region_size(index);
        let sparse =
            self.device.get_region_caps(index).iter().any(|c| matches!(c, VfioRegionInfoCap::SparseMmap(_)));
        // Sparse areas (e.g. around an MSI-X table) stay trapped.
        if flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || size == 0 || sparse {
            return Ok(None);
        }
        let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, r)) = maps.iter().find(|(i, _)| *i == index) {
            return Ok(Some(*r));
        }
        let offset = self.device.get_region_offset(index);
        // SAFETY: a fresh shared mapping of a device region; the kernel
        // checks offset/size against the region; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(BackendError::Io(format!(
                "mmap region {index}: {}",
                std::io::Error::last_os_error()
            )));
        }
        let region = MemoryRegion {
            host_addr: addr as u64,
            size,
            fd: self.device.as_raw_fd(),
            fd_offset: offset,
            read_only: false,
        };
        maps.push((index, region));
        Ok(Some(region))
    }

    fn irq_info(&self, index: u32) -> BackendResult<VfioIrqInfo> {
        let irq = self
            .device
            .get_irq_info(index)
            .ok_or_else(|| BackendError::Invalid(format!("no irq index {index}")))?;
        Ok(VfioIrqInfo { index, flags: irq.flags, count: irq.count })
    }

    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[RawFd]) -> BackendResult<()> {
        if ![VFIO_IRQ_SET_ACTION_MASK, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_IRQ_SET_ACTION_TRIGGER]
            .contains(&action)
        {
            return Err(BackendError::Invalid(format!("irq action {action:#x}")));
        }
        let mut arg = irq_set_arg(index, action, start, fds);
        self.ioctl_arg(VFIO_DEVICE_SET_IRQS, arg.as_mut_ptr().cast(), "VFIO_DEVICE_SET_IRQS")
    }

    fn reset(&self) -> BackendResult<()> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument.
        let r = unsafe { libc::ioctl(self.device.as_raw_fd(), VFIO_DEVICE_RESET as libc::c_ulong) };
        if r < 0 {
            return Err(BackendError::Io(format!("VFIO_DEVICE_RESET: {}", std::io::Error::last_os_error())));
        }
        Ok(())
    }

    fn mig_state(&self) -> BackendResult<MigState> {
        let raw = self.device.get_migration_state().map_err(|e| ioctl_err("get migration state", e))?;
        decode(raw).map_err(|e| BackendError::Io(e.to_string()))
    }

    fn set_mig_state(&mut self, target: MigState) -> BackendResult<()> {
        // The kernel walks combination arcs itself; refuse what it would
        // refuse before asking, with a clearer message.
        let cur = self.mig_state()?;
        path(cur, target, self.migration_flags()).map_err(|e| BackendError::Invalid(e.to_string()))?;
        self.device.set_migration_state(target.raw()).map_err(|e| ioctl_err(&format!("{cur} -> {target}"), e))
    }

    fn stop_copy_size(&self) -> BackendResult<u64> {
        self.device.get_mig_data_size().map_err(|e| ioctl_err("stop-copy size", e))
    }

    fn precopy_info(&self) -> BackendResult<VfioPrecopyInfo> {
        let i = self.device.mig_get_precopy_info().map_err(|e| ioctl_err("precopy info", e))?;
        Ok(VfioPrecopyInfo { initial_bytes: i.initial_bytes, dirty_bytes: i.dirty_bytes })
    }

    fn read_mig_data(&mut self, buf: &mut [u8]) -> BackendResult<usize> {
        self.device.read_migration_data(buf).map_err(|e| ioctl_err("migration data read", e))
    }

    fn write_mig_data(&mut self, data: &[u8]) -> BackendResult<()> {
        self.device.write_migration_data(data).map_err(|e| ioctl_err("migration data write", e))
    }
}

impl Drop for KernelBackend {
    fn drop(&mut self) {
        for (_, r) in self.maps.get_mut().unwrap_or_else(|e| e.into_inner()).drain(..) {
            // SAFETY: unmapping exactly a mapping made in `region_mmap`.
            unsafe { libc::munmap(r.host_addr as *mut libc::c_void, r.size as usize) };
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{align_of, offset_of};

    use vfio_bindings::bindings::vfio as uapi;

    use super::*;

    #[test]
    fn ioctl_numbers_match_the_uapi() {
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
        assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
        assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3b79);
        assert_eq!(VFIO_IRQ_SET_DATA_NONE, uapi::VFIO_IRQ_SET_DATA_NONE);
        assert_eq!(VFIO_IRQ_SET_DATA_EVENTFD, uapi::VFIO_IRQ_SET_DATA_EVENTFD);
        assert_eq!(VFIO_IRQ_SET_ACTION_TRIGGER, uapi::VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(VFIO_IRQ_SET_ACTION_UNMASK, uapi::VFIO_IRQ_SET_ACTION_UNMASK);
        assert_eq!(VFIO_IRQ_SET_ACTION_MASK, uapi::VFIO_IRQ_SET_ACTION_MASK);
        use dmhost_plugin_api::vfio::*;
        assert_eq!(VFIO_MIGRATION_STOP_COPY, u64::from(uapi::VFIO_MIGRATION_STOP_COPY));
        assert_eq!(VFIO_MIGRATION_P2P, u64::from(uapi::VFIO_MIGRATION_P2P));
        assert_eq!(VFIO_MIGRATION_PRE_COPY, u64::from(uapi::VFIO_MIGRATION_PRE_COPY));
        assert_eq!(VFIO_PCI_CONFIG_REGION_INDEX, uapi::VFIO_PCI_CONFIG_REGION_INDEX);
        assert_eq!(VFIO_PCI_NUM_REGIONS, uapi::VFIO_PCI_NUM_REGIONS);
        assert_eq!(VFIO_PCI_MSI_IRQ_INDEX, uapi::VFIO_PCI_MSI_IRQ_INDEX);
        assert_eq!(VFIO_PCI_NUM_IRQS, uapi::VFIO_PCI_NUM_IRQS);
        assert_eq!(VFIO_REGION_INFO_FLAG_MMAP, uapi::VFIO_REGION_INFO_FLAG_MMAP);
        assert_eq!(VFIO_IRQ_INFO_AUTOMASKED, uapi::VFIO_IRQ_INFO_AUTOMASKED);
        for s in MigState::ALL {
            let u = match s {
                MigState::Error => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
                MigState::Stop => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
                MigState::Running => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
                MigState::StopCopy => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
                MigState::Resuming => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
                MigState::RunningP2p => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
                MigState::PreCopy => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
                MigState::PreCopyP2p => uapi::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
            };
            assert_eq!(s.raw(), u, "{s}");
        }
    }

    #[test]
    fn argument_layouts_match_the_uapi() {
        // Sizes and offsets from include/uapi/linux/vfio.h (x86-64).
        assert_eq!(size_of::<VfioIrqSet>(), 20);
        assert_eq!(size_of::<VfioIrqSet>(), size_of::<uapi::vfio_irq_set>());
        assert_eq!(offset_of!(VfioIrqSet, count), offset_of!(uapi::vfio_irq_set, count));
        assert_eq!(offset_of!(VfioIrqSet, start), 12);

        assert_eq!(size_of::<VfioDeviceFeature>(), 8);
        assert_eq!(size_of::<VfioDeviceFeature>(), size_of::<uapi::vfio_device_feature>());
        assert_eq!(size_of::<VfioDeviceFeatureMigState>(), 8);
        assert_eq!(size_of::<VfioDeviceFeatureMigState>(), size_of::<uapi::vfio_device_feature_mig_state>());
        assert_eq!(offset_of!(VfioDeviceFeatureMigState, data_fd), 4);

        assert_eq!(size_of::<VfioPrecopyInfoArg>(), 24);
        assert_eq!(size_of::<VfioPrecopyInfoArg>(), size_of::<uapi::vfio_precopy_info>());
        assert_eq!(offset_of!(VfioPrecopyInfoArg, initial_bytes), 8);
        assert_eq!(
            offset_of!(VfioPrecopyInfoArg, dirty_bytes),
            offset_of!(uapi::vfio_precopy_info, dirty_bytes)
        );
        assert_eq!(align_of::<VfioPrecopyInfoArg>(), 8);
        assert_eq!(size_of::<uapi::vfio_device_feature_migration>(), 8);
        assert_eq!(size_of::<uapi::vfio_device_feature_mig_data_size>(), 8);
    }

    #[test]
    fn irq_set_argument_bytes() {
        let a = irq_set_arg(0, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[7, 9]);
        assert_eq!(a.len(), 28);
        let word = |i: usize| u32::from_ne_bytes(a[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 28, "argsz covers header and fds");
        assert_eq!(word(1), VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!((word(2), word(3), word(4)), (0, 0, 2));
        assert_eq!((word(5), word(6)), (7, 9));

        let off = irq_set_arg(1, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]);
        assert_eq!(off.len(), 20);
        let word = |i: usize| u32::from_ne_bytes(off[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(1), VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER);
        assert_eq!(word(4), 0, "count 0 with DATA_NONE disables the index");

        let unmask = irq_set_arg(0, VFIO_IRQ_SET_ACTION_UNMASK, 0, &[]);
        assert_eq!(u32::from_ne_bytes(unmask[16..20].try_into().unwrap()), 1);
    }

    #[test]
    fn opening_without_hardware_names_the_missing_path() {
        let p = sysfs_path(Some("0000:01:00.0"), None).unwrap();
        assert_eq!(p, Path::new("/sys/bus/pci/devices/0000:01:00.0"));
        let e = KernelBackend::open(&p, false).err().expect("no VFIO hardware here");
        let msg = e.to_string();
        assert!(msg.contains("/sys/bus/pci/devices/0000:01:00.0"), "{msg}");
        for bad in ["", "01:00.0", "0000:01:00", "0000:zz:00.0", "0000:01:00.0/../x"] {
            assert!(matches!(sysfs_path(Some(bad), None), Err(KernelError::BadAddress(_))), "{bad}");
        }
        // A sysfs path that exists but has no IOMMU group.
        let dir = std::env::temp_dir();
        let e = KernelBackend::open(&dir, false).err().unwrap();
        assert!(matches!(e, KernelError::NoIommuGroup(_)), "{e}");
        assert!(e.to_string().contains("iommu_group"));
    }
}
