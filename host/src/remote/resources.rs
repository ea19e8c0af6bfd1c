//! What the host holds on behalf of a device process: its memory shared
//! with the host (the guest region and RAM it registered for migration,
//! each mapped from the descriptor it sent) and the irqfds it registered.
//!
//! Memory of one file is mapped once: a RAM block that lies in the file
//! range already mapped for the guest region is registered at that
//! mapping's address, so KVM's dirty log of the guest slot lands in the
//! block (the dirty scan matches slots and blocks by host address).
//!
//! A RAM mapping the device unregisters (or leaves behind when its process
//! dies) is not unmapped at once: a migration may be reading it. Its pages
//! are dropped (the range is replaced by an anonymous read-only reservation
//! that reads as zeros) and the reservation is unmapped with the device.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd},
};

/// Largest memory a device process may share (per mapping).
pub const MAX_MAPPING: u64 = 1 << 40;
/// Most RAM registrations (live and retired) per device process.
pub const MAX_RAM: usize = 64;
/// Most irqfds per device process.
pub const MAX_IRQFDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("size {size:#x} at offset {offset:#x} is empty, unaligned or too large")]
    BadRange { size: u64, offset: u64 },
    #[error("the descriptor is not a regular file or memfd")]
    NotAFile,
    #[error("the file holds {file_size:#x} bytes, less than {offset:#x}+{size:#x}")]
    FileTooSmall { file_size: u64, offset: u64, size: u64 },
    #[error("fstat failed")]
    Stat(#[source] std::io::Error),
    #[error("mmap failed")]
    Map(#[source] std::io::Error),
    #[error("RAM block {0:?} is already registered by this device")]
    DuplicateRam(String),
    #[error("RAM block {0:?} was not registered by this device")]
    UnknownRam(String),
    #[error("too many RAM registrations (at most {MAX_RAM})")]
    TooManyRam,
    #[error("too many irqfds (at most {MAX_IRQFDS})")]
    TooManyIrqfds,
    #[error("irqfd {fd} on GSI {gsi} is already registered")]
    DuplicateIrqfd { gsi: u32, fd: i64 },
}

/// Identity of a file: (device, inode).
type FileId = (u64, u64);

fn file_id_and_size(fd: &OwnedFd) -> Result<(FileId, u64), ResourceError> {
    // SAFETY: a zeroed `stat` is a valid output buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open descriptor we own; `st` is a valid buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(ResourceError::Stat(std::io::Error::last_os_error()));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(ResourceError::NotAFile);
    }
    Ok(((st.st_dev as u64, st.st_ino as u64), st.st_size.max(0) as u64))
}

/// A shared mapping of part of a file the device process sent.
pub struct SharedMapping {
    addr: u64,
    size: u64,
    file: FileId,
    fd_offset: u64,
    read_only: bool,
    /// `None` once retired (the file's pages are dropped).
    fd: Option<OwnedFd>,
}

impl std::fmt::Debug for SharedMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedMapping({:#x}+{:#x} @ {:#x})", self.addr, self.size, self.fd_offset)
    }
}

impl SharedMapping {
    /// Map `[fd_offset, fd_offset+size)` of `fd` shared (untrusted input:
    /// every argument is checked).
    pub fn map(fd: OwnedFd, fd_offset: u64, size: u64, read_only: bool) -> Result<Self, ResourceError> {
        let page = 4096;
        if size == 0
            || !size.is_multiple_of(page)
            || !fd_offset.is_multiple_of(page)
            || size > MAX_MAPPING
            || fd_offset > i64::MAX as u64
        {
            return Err(ResourceError::BadRange { size, offset: fd_offset });
        }
        // A device process that shrank the file under our mapping would
        // make the host's next access a SIGBUS: seal first (memfds from
        // plugin-api's backends allow it), then check the size.
        // SAFETY: F_ADD_SEALS on a descriptor we own; failure is harmless.
        let sealed = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) } == 0;
        if !sealed {
            log::debug!("device memory descriptor cannot be sealed (a file backend): its size is trusted");
        }
        let (file, file_size) = file_id_and_size(&fd)?;
        if fd_offset.checked_add(size).is_none_or(|end| end > file_size) {
            return Err(ResourceError::FileTooSmall { file_size, offset: fd_offset, size });
        }
        let prot = if read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a fresh shared mapping of a descriptor we own, at an
        // address the kernel picks; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                fd_offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(ResourceError::Map(std::io::Error::last_os_error()));
        }
        Ok(Self { addr: addr as u64, size, file, fd_offset, read_only, fd: Some(fd) })
    }

    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The host's descriptor of the file (-1 once retired).
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |f| f.as_raw_fd())
    }

    /// Host address of file range `[offset, offset+size)` of `file`, when
    /// this mapping covers it.
    fn covers(&self, file: FileId, offset: u64, size: u64, read_only: bool) -> Option<u64> {
        let end = offset.checked_add(size)?;
        (self.fd.is_some()
            && self.file == file
            && (read_only || !self.read_only)
            && offset >= self.fd_offset
            && end <= self.fd_offset + self.size)
            .then(|| self.addr + (offset - self.fd_offset))
    }

    /// Drop the file's pages but keep the address range reserved (reads as
    /// zeros) until the mapping is dropped.
    fn retire(&mut self) {
        if self.fd.take().is_none() {
            return;
        }
        // SAFETY: replaces exactly our own mapping with an anonymous one at
        // the same address (MAP_FIXED over a range we own).
        let r = unsafe {
            libc::mmap(
                self.addr as *mut libc::c_void,
                self.size as usize,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if r == libc::MAP_FAILED {
            log::warn!("retiring a device mapping: {}", std::io::Error::last_os_error());
        }
    }
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the range `map` mapped, once.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// Where a registered RAM block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamPlace {
    pub host_addr: u64,
    /// The host's descriptor of the file (for hole scans).
    pub fd: i32,
}

enum RamMap {
    /// In the guest-region mapping.
    Guest,
    /// Its own mapping (index into `Resources::owned`).
    Own(usize),
}

/// An irqfd registered for the device process: the host's copies of its
/// descriptors, kept open while KVM uses them.
pub struct Irqfd {
    pub fd: OwnedFd,
    pub resample: Option<OwnedFd>,
}

/// Everything the host holds for one device process.
#[derive(Default)]
pub struct Resources {
    guest: Option<SharedMapping>,
    owned: Vec<SharedMapping>,
    ram: BTreeMap<String, RamMap>,
    /// Keyed by GSI and the device process's own descriptor number.
    irqfds: BTreeMap<(u32, i64), Irqfd>,
}

impl Resources {
    /// Set the mapping the guest region lives in.
    pub fn set_guest(&mut self, m: SharedMapping) {
        self.guest = Some(m);
    }

    /// Map RAM block `name` from `fd` (or find it in the guest mapping).
    pub fn map_ram(
        &mut self,
        name: &str,
        fd: OwnedFd,
        fd_offset: u64,
        size: u64,
        read_only: bool,
    ) -> Result<RamPlace, ResourceError> {
        if self.ram.contains_key(name) {
            return Err(ResourceError::DuplicateRam(name.to_owned()));
        }
        if self.owned.len() >= MAX_RAM || self.ram.len() >= MAX_RAM {
            return Err(ResourceError::TooManyRam);
        }
        let (file, _) = file_id_and_size(&fd)?;
        if let Some(g) = &self.guest {
            if let Some(host_addr) = g.covers(file, fd_offset, size, read_only) {
                self.ram.insert(name.to_owned(), RamMap::Guest);
                return Ok(RamPlace { host_addr, fd: g.raw_fd() });
            }
        }
        let m = SharedMapping::map(fd, fd_offset, size, read_only)?;
        let place = RamPlace { host_addr: m.addr(), fd: m.raw_fd() };
        self.owned.push(m);
        self.ram.insert(name.to_owned(), RamMap::Own(self.owned.len() - 1));
        Ok(place)
    }

    /// Whether `name` was mapped here.
    pub fn has_ram(&self, name: &str) -> bool {
        self.ram.contains_key(name)
    }

    /// Forget RAM block `name` (registered or not: a failed registration
    /// is undone with this too), retiring its own mapping.
    pub fn unmap_ram(&mut self, name: &str) -> Result<(), ResourceError> {
        match self.ram.remove(name) {
            None => Err(ResourceError::UnknownRam(name.to_owned())),
            Some(RamMap::Guest) => Ok(()),
            Some(RamMap::Own(i)) => {
                if let Some(m) = self.owned.get_mut(i) {
                    m.retire();
                }
                Ok(())
            }
        }
    }

    /// Names of the RAM blocks mapped here.
    pub fn ram_names(&self) -> Vec<String> {
        self.ram.keys().cloned().collect()
    }

    pub fn add_irqfd(&mut self, gsi: u32, remote_fd: i64, irqfd: Irqfd) -> Result<(), ResourceError> {
        if self.irqfds.len() >= MAX_IRQFDS {
            return Err(ResourceError::TooManyIrqfds);
        }
        if self.irqfds.contains_key(&(gsi, remote_fd)) {
            return Err(ResourceError::DuplicateIrqfd { gsi, fd: remote_fd });
        }
        self.irqfds.insert((gsi, remote_fd), irqfd);
        Ok(())
    }

    pub fn irqfd(&self, gsi: u32, remote_fd: i64) -> Option<&Irqfd> {
        self.irqfds.get(&(gsi, remote_fd))
    }

    pub fn remove_irqfd(&mut self, gsi: u32, remote_fd: i64) -> Option<Irqfd> {
        self.irqfds.remove(&(gsi, remote_fd))
    }

    /// Take every irqfd: (GSI, descriptors).
    pub fn take_irqfds(&mut self) -> Vec<(u32, Irqfd)> {
        std::mem::take(&mut self.irqfds).into_iter().map(|((gsi, _), f)| (gsi, f)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    #[test]
    fn a_mapped_plugin_memfd_can_no_longer_shrink() {
        let backend = dmhost_plugin_api::backend::MemoryBackend::memfd("sealed", 8192).unwrap();
        let region = backend.whole();
        // SAFETY: duplicating the backend's descriptor, as SCM_RIGHTS would.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(region.fd)) };
        let _m = SharedMapping::map(dup, 0, 8192, false).unwrap();
        // SAFETY: an ftruncate the seal must refuse.
        assert_ne!(unsafe { libc::ftruncate(region.fd, 4096) }, 0, "shrinking a mapped memfd must fail");
    }

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a valid descriptor.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) }, 0);
        fd
    }

    #[test]
    fn ram_in_the_guest_mapping_shares_its_address() {
        let fd = memfd(64 << 10);
        let mut r = Resources::default();
        let g = SharedMapping::map(fd.try_clone().unwrap(), 0, 64 << 10, false).unwrap();
        let base = g.addr();
        r.set_guest(g);
        let p = r.map_ram("a/ram", fd.try_clone().unwrap(), 4096, 8192, false).unwrap();
        assert_eq!(p.host_addr, base + 4096);
        assert!(matches!(
            r.map_ram("a/ram", fd.try_clone().unwrap(), 0, 4096, false),
            Err(ResourceError::DuplicateRam(_))
        ));
        // Another file: its own mapping.
        let other = memfd(8192);
        let q = r.map_ram("b/ram", other, 0, 8192, false).unwrap();
        assert_ne!(q.host_addr, base);
        // SAFETY: the mapping is live (registered above) and 8 KiB long.
        unsafe { *(q.host_addr as *mut u8) = 7 };
        r.unmap_ram("b/ram").unwrap();
        // Retired: still readable (zeros), no longer the file.
        // SAFETY: the reservation stays mapped until `r` is dropped.
        assert_eq!(unsafe { *(q.host_addr as *const u8) }, 0);
        assert!(r.unmap_ram("b/ram").is_err());
    }

    #[test]
    fn bad_ranges_and_descriptors_are_refused() {
        let fd = memfd(8192);
        assert!(matches!(
            SharedMapping::map(fd.try_clone().unwrap(), 0, 16384, false),
            Err(ResourceError::FileTooSmall { .. })
        ));
        assert!(matches!(
            SharedMapping::map(fd.try_clone().unwrap(), 1, 4096, false),
            Err(ResourceError::BadRange { .. })
        ));
        assert!(matches!(
            SharedMapping::map(fd.try_clone().unwrap(), 0, 0, false),
            Err(ResourceError::BadRange { .. })
        ));
        assert!(matches!(
            SharedMapping::map(fd.try_clone().unwrap(), !4095, 4096, false),
            Err(ResourceError::BadRange { .. })
        ));
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: a duplicate we own.
        let e = unsafe { OwnedFd::from_raw_fd(libc::dup(efd.as_raw_fd())) };
        assert!(matches!(SharedMapping::map(e, 0, 4096, false), Err(ResourceError::NotAFile)));
    }
}
