//! Which pages of a RAM block were ever written, without reading them.
//!
//! Guest RAM is a memfd (shmem): pages the guest never touched are holes
//! that `lseek(SEEK_DATA/SEEK_HOLE)` skips. The first pre-copy round sends
//! only the populated extents, so an idle 4 GiB guest does not make the
//! host read (and so allocate) 4 GiB.

use std::{io, ops::Range, os::fd::RawFd};

/// Page-granular byte ranges `[start, end)` of `fd` within
/// `[offset, offset+len)` that hold data, relative to `offset`.
///
/// A descriptor that does not support SEEK_DATA (or `fd < 0`) reports the
/// whole range as data: correct, just slower.
pub fn populated(fd: RawFd, offset: u64, len: u64) -> io::Result<Vec<Range<u64>>> {
    if fd < 0 {
        return Ok(whole(len));
    }
    let end = offset + len;
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let data = match seek(fd, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            // ENXIO: no data at or after `pos`.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(whole(len)),
            Err(e) => return Err(e),
        };
        if data >= end {
            break;
        }
        let hole = seek(fd, data, libc::SEEK_HOLE)?.min(end);
        out.push(data - offset..hole - offset);
        pos = hole;
    }
    Ok(out)
}

/// The whole range, as one extent.
fn whole(len: u64) -> Vec<Range<u64>> {
    std::iter::once(0..len).collect()
}

fn seek(fd: RawFd, pos: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor only moves its file offset; the
    // descriptors here are only used with positioned I/O or mmap.
    let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

/// The page indices of the set bits of a dirty bitmap (bit i = page i).
pub fn dirty_pages(bitmap: &[u64], out: &mut Vec<u64>) {
    for (w, &word) in bitmap.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let b = bits.trailing_zeros() as u64;
            out.push(w as u64 * 64 + b);
            bits &= bits - 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    #[test]
    fn only_touched_pages_are_populated() {
        // SAFETY: valid name and flags.
        let fd = unsafe { libc::memfd_create(c"extents".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let size = 64u64 << 20;
        // SAFETY: resizing our memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), size as i64) }, 0);
        for page in [3u64, 1000, 1001] {
            // SAFETY: positioned write of one byte to our memfd.
            let n = unsafe { libc::pwrite(fd.as_raw_fd(), b"x".as_ptr().cast(), 1, (page * 4096) as i64) };
            assert_eq!(n, 1);
        }
        let got = populated(fd.as_raw_fd(), 0, size).unwrap();
        assert_eq!(got, vec![3 * 4096..4 * 4096, 1000 * 4096..1002 * 4096]);
        // A window that starts inside the block.
        let got = populated(fd.as_raw_fd(), 512 * 4096, 1024 * 4096).unwrap();
        assert_eq!(got, vec![488 * 4096..490 * 4096]);
        assert_eq!(populated(-1, 0, 8192).unwrap(), vec![0..8192]);
    }

    #[test]
    fn bitmap_to_pages() {
        let mut out = Vec::new();
        dirty_pages(&[0b1010, 0, 1 << 63], &mut out);
        assert_eq!(out, vec![1, 3, 191]);
    }
}
