//! Guest RAM: one memfd, mapped shared, wrapped in a vm-memory
//! `GuestMemoryMmap` at guest-physical 0.

use std::{
    ffi::CString,
    fs::File,
    os::fd::{AsFd, BorrowedFd, FromRawFd},
};

use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// Page size of guest memory.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest RAM size {0:#x} is not a non-zero multiple of {PAGE_SIZE}")]
    BadSize(u64),
    #[error("memfd_create for guest RAM failed")]
    Memfd(#[source] std::io::Error),
    #[error("cannot size the guest RAM memfd to {size:#x} bytes")]
    Truncate { size: u64, source: std::io::Error },
    #[error("cannot map guest RAM")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot build the guest memory map")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("guest access at {gpa:#x} (+{len}) is outside guest RAM")]
    OutOfRange { gpa: u64, len: usize },
}

/// Guest RAM, backed by a memfd so it can be shared with another process
/// (migration by fd passing, vhost-user style back ends).
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: File,
    size: u64,
    host_addr: u64,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("size", &self.size)
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .finish()
    }
}

impl GuestRam {
    /// Allocate `size` bytes of zeroed guest RAM at GPA 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || usize::try_from(size).is_err() {
            return Err(MemoryError::BadSize(size));
        }
        let file = memfd("dmhost-guest-ram")?;
        file.set_len(size).map_err(|source| MemoryError::Truncate { size, source })?;
        let clone = file.try_clone().map_err(MemoryError::Memfd)?;
        let region =
            GuestRegionMmap::from_range(GuestAddress(0), size as usize, Some(FileOffset::new(clone, 0)))
                .map_err(MemoryError::Map)?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Regions)?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::OutOfRange { gpa: 0, len: 0 })? as u64;
        Ok(Self { mem, file, size, host_addr })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Address of guest-physical 0 in this process.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// The memfd backing guest RAM.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The vm-memory view, for `Bytes` access.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Whether `[gpa, gpa+len)` lies inside RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len: buf.len() })
    }

    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), MemoryError> {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| MemoryError::OutOfRange { gpa, len: buf.len() })
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), MemoryError> {
        self.write(gpa, &v.to_le_bytes())
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

fn memfd(name: &str) -> Result<File, MemoryError> {
    let cname = CString::new(name).map_err(|_| {
        MemoryError::Memfd(std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))
    })?;
    // SAFETY: `cname` is a valid NUL-terminated string and the flags are valid.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_is_memfd_backed_and_bounds_checked() {
        let ram = GuestRam::new(2 * PAGE_SIZE).unwrap();
        ram.write_u64(8, 0xdead_beef).unwrap();
        assert_eq!(ram.read_u64(8).unwrap(), 0xdead_beef);
        assert!(ram.write_u64(2 * PAGE_SIZE - 4, 1).is_err());
        let link = std::fs::read_link(format!("/proc/self/fd/{}", {
            use std::os::fd::AsRawFd;
            ram.fd().as_raw_fd()
        }))
        .unwrap();
        assert!(link.to_string_lossy().contains("memfd:dmhost-guest-ram"), "{link:?}");
        assert!(GuestRam::new(100).is_err());
        assert!(GuestRam::new(0).is_err());
    }
}
