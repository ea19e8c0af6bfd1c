//! userfaultfd for post-copy: register guest RAM in missing-page mode, read
//! faults, place pages atomically with `UFFDIO_COPY`.
//!
//! Written against the uAPI directly (`linux/userfaultfd.h`): the crates
//! that wrap it generate bindings with bindgen at build time, which would
//! make libclang a build requirement for six ioctls.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `USERFAULTFD_IOC_NEW` on /dev/userfaultfd (Linux 6.1+).
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;

// _IOWR/_IOR(0xAA, nr, struct): the sizes are those of the structs below.
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_aa01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_aa02;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg`: 32 bytes; for a page fault, `flags` then `address`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    flags: u64,
    address: u64,
    _feat: u64,
}

/// Why a userfaultfd operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("cannot open userfaultfd (syscall and /dev/userfaultfd): {0}")]
    Open(io::Error),
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(io::Error),
    #[error("kernel lacks userfaultfd on shared memory (UFFD_FEATURE_MISSING_SHMEM)")]
    NoShmem,
    #[error("UFFDIO_REGISTER of {start:#x}+{len:#x} failed: {source}")]
    Register { start: u64, len: u64, source: io::Error },
    #[error("UFFDIO_COPY to {dst:#x} failed: {source}")]
    Copy { dst: u64, source: io::Error },
    #[error("reading fault events failed: {0}")]
    Read(io::Error),
}

/// What placing a page did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placed {
    /// The page was copied in and waiters woken.
    Copied,
    /// Someone placed it first (EEXIST): a race two faults or a fault and
    /// the background stream can both win; the page is there either way.
    AlreadyPresent,
}

/// A userfaultfd with guest RAM registered in missing-page mode.
#[derive(Debug)]
pub struct Userfault {
    fd: OwnedFd,
}

impl Userfault {
    /// Open a non-blocking userfaultfd that reports shmem/memfd faults.
    pub fn new() -> Result<Self, UffdError> {
        let fd = open_uffd().map_err(UffdError::Open)?;
        let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_MISSING_SHMEM, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes exactly a `uffdio_api`.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } < 0 {
            let e = io::Error::last_os_error();
            return Err(if e.raw_os_error() == Some(libc::EINVAL) {
                UffdError::NoShmem
            } else {
                UffdError::Api(e)
            });
        }
        Ok(Self { fd })
    }

    /// Register `[start, start+len)` (page aligned) for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes exactly a `uffdio_register`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) } < 0 {
            return Err(UffdError::Register { start, len, source: io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Stop catching faults in a range (after every page has arrived).
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads exactly a `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Atomically place `page` at `dst` and wake whoever waits on it.
    pub fn copy(&self, dst: u64, page: &[u8]) -> Result<Placed, UffdError> {
        let mut copy =
            UffdioCopy { dst, src: page.as_ptr() as u64, len: page.len() as u64, mode: 0, copy: 0 };
        // SAFETY: UFFDIO_COPY reads `page` (valid for its length) and writes
        // the result into `copy`; the kernel checks `dst` is registered.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut copy) } < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EEXIST) {
                // The page is in place; make sure nobody sleeps on it.
                self.wake(dst, page.len() as u64).map_err(|source| UffdError::Copy { dst, source })?;
                return Ok(Placed::AlreadyPresent);
            }
            return Err(UffdError::Copy { dst, source: e });
        }
        Ok(Placed::Copied)
    }

    /// Wake threads waiting on `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> io::Result<()> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads exactly a `uffdio_range`.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &range) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Drain pending page-fault addresses into `out` (non-blocking).
    pub fn read_faults(&self, out: &mut Vec<u64>) -> Result<(), UffdError> {
        let mut msgs = [UffdMsg::default(); 16];
        loop {
            // SAFETY: reading into a buffer of `uffd_msg`-sized records.
            let n = unsafe {
                libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), std::mem::size_of_val(&msgs))
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(UffdError::Read(e)),
                };
            }
            let count = n as usize / std::mem::size_of::<UffdMsg>();
            out.extend(msgs[..count].iter().filter(|m| m.event == UFFD_EVENT_PAGEFAULT).map(|m| m.address));
            if count < msgs.len() {
                return Ok(());
            }
        }
    }

    /// Block until a fault is pending or `quit` becomes readable; returns
    /// false when asked to quit.
    pub fn wait(&self, quit: RawFd, timeout_ms: i32) -> io::Result<bool> {
        let mut fds = [
            libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: quit, events: libc::POLLIN, revents: 0 },
        ];
        loop {
            // SAFETY: polling two valid pollfd records.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(e);
            }
            return Ok(fds[1].revents == 0);
        }
    }
}

fn open_uffd() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd syscall takes only flags.
    let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) } as RawFd;
    if raw >= 0 {
        // SAFETY: a fresh descriptor we own.
        return Ok(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    let syscall_err = io::Error::last_os_error();
    let dev = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .map_err(|_| syscall_err)?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd.
    let raw = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const PAGE: usize = 4096;

    fn memfd_map(pages: usize) -> (OwnedFd, *mut u8) {
        // SAFETY: valid name and flags.
        let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: resizing our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), (pages * PAGE) as i64) }, 0);
        // SAFETY: a fresh shared mapping of the memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                pages * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (fd, p.cast())
    }

    /// Two threads fault on every page (so both race for the same pages);
    /// a fault thread serves each page once with a pattern naming it.
    #[test]
    fn faults_are_served_and_races_resolved() {
        let pages = 64;
        let (_fd, base) = memfd_map(pages);
        let base = base as u64;
        let uffd = Arc::new(Userfault::new().unwrap());
        uffd.register(base, (pages * PAGE) as u64).unwrap();
        // SAFETY: eventfd with valid flags.
        let quit = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(quit >= 0);

        let server = {
            let uffd = uffd.clone();
            std::thread::spawn(move || {
                let (mut served, mut raced) = (0, 0);
                let mut faults = Vec::new();
                while uffd.wait(quit, 5000).unwrap() {
                    faults.clear();
                    uffd.read_faults(&mut faults).unwrap();
                    for &addr in &faults {
                        let page_addr = addr & !(PAGE as u64 - 1);
                        let index = (page_addr - base) / PAGE as u64;
                        let page = vec![index as u8 ^ 0x5a; PAGE];
                        match uffd.copy(page_addr, &page).unwrap() {
                            Placed::Copied => served += 1,
                            Placed::AlreadyPresent => raced += 1,
                        }
                    }
                }
                (served, raced)
            })
        };
        let readers: Vec<_> = (0..2)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..pages {
                        let i = if t == 0 { i } else { pages - 1 - i };
                        // SAFETY: inside the registered mapping; the read
                        // blocks until the fault thread places the page.
                        let v = unsafe { std::ptr::read_volatile((base as *const u8).add(i * PAGE + 17)) };
                        assert_eq!(v, i as u8 ^ 0x5a, "page {i}");
                    }
                })
            })
            .collect();
        for r in readers {
            r.join().unwrap();
        }
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd.
        assert_eq!(unsafe { libc::write(quit, (&one as *const u64).cast(), 8) }, 8);
        let (served, raced) = server.join().unwrap();
        assert_eq!(served, pages, "every page placed exactly once (races: {raced})");
        // SAFETY: closing our eventfd.
        unsafe { libc::close(quit) };
    }
}
