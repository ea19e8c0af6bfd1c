//! Memory backends for plugins: a memfd (default) or a file, mapped once.
//!
//! A helper for plugin authors, not part of the ABI: it produces the
//! [`MemoryRegion`]s the ABI carries.

use std::{
    ffi::CString,
    fs::OpenOptions,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    ptr::NonNull,
};

use crate::MemoryRegion;

/// Page size the backends assume (x86-64).
pub const PAGE_SIZE: u64 = 4096;

/// A mapped memory backend that lives as long as the device.
#[derive(Debug)]
pub struct MemoryBackend {
    fd: OwnedFd,
    addr: NonNull<u8>,
    size: u64,
    read_only: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; access
// through the raw pointer is synchronised by the guest/host protocol, as for
// any guest RAM.
unsafe impl Send for MemoryBackend {}
// SAFETY: as above; `&MemoryBackend` only hands out the address.
unsafe impl Sync for MemoryBackend {}

impl MemoryBackend {
    /// An anonymous memfd of `size` bytes, zero filled.
    pub fn memfd(name: &str, size: u64) -> io::Result<Self> {
        check_size(size)?;
        let cname = CString::new(name).map_err(|_| invalid("memfd name contains NUL"))?;
        // SAFETY: `cname` is a valid NUL-terminated string; flags are valid.
        // Sealing allowed: a host that maps this memfd from another process
        // seals it against shrinking (a shrunk mapping would SIGBUS it).
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is a valid descriptor; ftruncate has no memory effects.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Self::map(fd, size, false, true)
    }

    /// A file backend (`mem-path`), created or extended to `size`.
    /// `share` maps it shared so guest writes reach the file; `read_only`
    /// opens and maps it read-only.
    pub fn file(path: &Path, size: u64, share: bool, read_only: bool) -> io::Result<Self> {
        check_size(size)?;
        let file =
            OpenOptions::new().read(true).write(!read_only).create(!read_only).truncate(false).open(path)?;
        let len = file.metadata()?.len();
        if len < size {
            if read_only {
                return Err(invalid(format!("{} is {len} bytes, smaller than size {size}", path.display())));
            }
            file.set_len(size)?;
        }
        Self::map(file.into(), size, read_only, share)
    }

    fn map(fd: OwnedFd, size: u64, read_only: bool, shared: bool) -> io::Result<Self> {
        let prot = if read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        let flags = if shared { libc::MAP_SHARED } else { libc::MAP_PRIVATE };
        // SAFETY: a fresh mapping of a valid descriptor; the result is checked.
        let addr = unsafe { libc::mmap(std::ptr::null_mut(), size as usize, prot, flags, fd.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| invalid("mmap returned null"))?;
        Ok(Self { fd, addr, size, read_only })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The region `[offset, offset+len)` of this backend, for the ABI.
    pub fn region(&self, offset: u64, len: u64) -> MemoryRegion {
        assert!(offset.checked_add(len).is_some_and(|end| end <= self.size));
        MemoryRegion {
            host_addr: self.addr.as_ptr() as u64 + offset,
            size: len,
            fd: self.fd.as_raw_fd(),
            fd_offset: offset,
            read_only: self.read_only,
        }
    }

    /// The whole backend.
    pub fn whole(&self) -> MemoryRegion {
        self.region(0, self.size)
    }

    /// Copy out `buf.len()` bytes at `offset`; `None` when out of bounds.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Option<()> {
        let end = offset.checked_add(buf.len() as u64)?;
        if end > self.size {
            return None;
        }
        // SAFETY: bounds checked above; the mapping lives as long as `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr.as_ptr().add(offset as usize),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Some(())
    }

    /// Copy `buf` in at `offset`; `None` when out of bounds or read-only.
    pub fn write(&self, offset: u64, buf: &[u8]) -> Option<()> {
        let end = offset.checked_add(buf.len() as u64)?;
        if end > self.size || self.read_only {
            return None;
        }
        // SAFETY: bounds checked above; the mapping is writable and lives
        // as long as `self`.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), self.addr.as_ptr().add(offset as usize), buf.len())
        };
        Some(())
    }

    /// Flush a file backend to disk.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: the range is exactly our mapping.
        let r = unsafe { libc::msync(self.addr.as_ptr().cast(), self.size as usize, libc::MS_SYNC) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for MemoryBackend {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`.
        unsafe { libc::munmap(self.addr.as_ptr().cast(), self.size as usize) };
    }
}

fn check_size(size: u64) -> io::Result<()> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(invalid(format!("size {size} is not a non-zero multiple of {PAGE_SIZE}")));
    }
    Ok(())
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

/// A size in a plugin's JSON config: a number of bytes or a string such as
/// `"128M"` ([`parse_size`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum ConfigSize {
    Bytes(u64),
    Text(String),
}

impl ConfigSize {
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            ConfigSize::Bytes(n) => Ok(*n),
            ConfigSize::Text(s) => parse_size(s),
        }
    }
}

/// Parse a size such as `128M`, `1G`, `4096` or `64K` (JSON configs may also
/// give a number).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?}")),
            };
            (&s[..i], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits.parse().map_err(|_| format!("invalid size {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} overflows"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("128M"), Ok(128 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn memfd_backend_reads_back_and_bounds() {
        let b = MemoryBackend::memfd("t", 2 * PAGE_SIZE).unwrap();
        b.write(100, b"hello").unwrap();
        let mut out = [0u8; 5];
        b.read(100, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(b.write(2 * PAGE_SIZE - 2, b"abc").is_none());
        assert!(b.read(u64::MAX, &mut out).is_none());
        assert!(MemoryBackend::memfd("t", 100).is_err());
    }
}
