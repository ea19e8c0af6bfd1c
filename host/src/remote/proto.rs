//! The device-process protocol: compact binary messages on SOCK_SEQPACKET
//! UNIX sockets (one message per packet, descriptors as SCM_RIGHTS).
//!
//! Two socket pairs, each strictly request → response:
//! - `io`: the host asks (guest I/O, config space, plug, migration);
//! - `svc`: the device process asks (host services the device calls).
//!
//! Request: `op: u8, a0: u64, a1: u64, payload`. Response: `status: u8`
//! (0 ok, else `1 + ErrorKind`), then the payload (data, or the error
//! message). Everything received from a device process is untrusted:
//! decoding returns [`ProtoError`], never panics.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use dmhost_plugin_api::{ErrorKind, PluginError};

/// Largest message (header + payload).
pub const MAX_MSG: usize = 64 << 10;
/// Largest data payload of one request (guest memory access chunk).
pub const MAX_DATA: usize = MAX_MSG - 64;
/// Most descriptors in one message.
pub const MAX_FDS: usize = 4;
const HEADER: usize = 17;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("the device process closed its socket")]
    Closed,
    #[error("socket I/O failed")]
    Io(#[source] io::Error),
    #[error("message of {0} bytes is malformed")]
    Malformed(usize),
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("message is longer than {MAX_MSG} bytes or carries too many descriptors")]
    TooLong,
    #[error("reply status {0} is invalid")]
    BadStatus(u8),
}

/// Operations. `Io*` go host → device process; `Svc*` the other way.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    // io
    Hello = 1,
    MemoryRegion,
    Plug,
    Unplug,
    PioRead,
    PioWrite,
    MmioRead,
    MmioWrite,
    CfgRead,
    CfgWrite,
    StateVersion,
    SaveComplete,
    LoadState,
    VmStateChanged,
    SaveSetup,
    PendingEstimate,
    PendingExact,
    IsActiveIterate,
    SaveIterate,
    SaveCleanup,
    LoadSetup,
    LoadCleanup,
    /// Part of a device section being loaded (`a0` = its offset).
    LoadChunk,
    /// Part of the staged output of the last big reply (`a0` offset, `a1` length).
    ReadChunk,
    Nfit,
    Aml,
    DsmHandles,
    Dsm,
    // svc
    RegisterIo = 64,
    UnregisterIo,
    PhysmapAdd,
    PhysmapRemove,
    SetIrqLine,
    ReadGuest,
    WriteGuest,
    SetIntx,
    IntxRoute,
    MarkDirty,
    RegisterRam,
    UnregisterRam,
    RegisterIrqfd,
    UnregisterIrqfd,
    /// A log record (one way: the host sends no reply).
    Log,
    /// Not a real operation (tests of the unknown-op path).
    Unsupported = 255,
}

impl TryFrom<u8> for Op {
    type Error = ProtoError;
    fn try_from(v: u8) -> Result<Self, ProtoError> {
        use Op::*;
        Ok(match v {
            1 => Hello,
            2 => MemoryRegion,
            3 => Plug,
            4 => Unplug,
            5 => PioRead,
            6 => PioWrite,
            7 => MmioRead,
            8 => MmioWrite,
            9 => CfgRead,
            10 => CfgWrite,
            11 => StateVersion,
            12 => SaveComplete,
            13 => LoadState,
            14 => VmStateChanged,
            15 => SaveSetup,
            16 => PendingEstimate,
            17 => PendingExact,
            18 => IsActiveIterate,
            19 => SaveIterate,
            20 => SaveCleanup,
            21 => LoadSetup,
            22 => LoadCleanup,
            23 => LoadChunk,
            24 => ReadChunk,
            25 => Nfit,
            26 => Aml,
            27 => DsmHandles,
            28 => Dsm,
            64 => RegisterIo,
            65 => UnregisterIo,
            66 => PhysmapAdd,
            67 => PhysmapRemove,
            68 => SetIrqLine,
            69 => ReadGuest,
            70 => WriteGuest,
            71 => SetIntx,
            72 => IntxRoute,
            73 => MarkDirty,
            74 => RegisterRam,
            75 => UnregisterRam,
            76 => RegisterIrqfd,
            77 => UnregisterIrqfd,
            78 => Log,
            other => return Err(ProtoError::UnknownOp(other)),
        })
    }
}

/// Header of a reply that may not fit one message: the total length of
/// the data, a flag byte (e.g. "complete"), then its first part; the rest
/// is fetched with [`Op::ReadChunk`].
pub const BIG_HEADER: usize = 9;

/// Encode the first message of a big reply for `data` (the caller keeps
/// `data` staged for `ReadChunk`).
pub fn encode_big(data: &[u8], flag: u8) -> Vec<u8> {
    let first = data.len().min(MAX_DATA - BIG_HEADER);
    let mut v = Vec::with_capacity(BIG_HEADER + first);
    v.extend_from_slice(&(data.len() as u64).to_le_bytes());
    v.push(flag);
    v.extend_from_slice(&data[..first]);
    v
}

/// Decode the first message of a big reply: (total, flag, first part).
pub fn decode_big(b: &[u8], limit: usize) -> Result<(usize, u8, &[u8]), ProtoError> {
    if b.len() < BIG_HEADER {
        return Err(ProtoError::Malformed(b.len()));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    let total = usize::try_from(u64::from_le_bytes(w)).map_err(|_| ProtoError::TooLong)?;
    let first = &b[BIG_HEADER..];
    if total > limit {
        return Err(ProtoError::TooLong);
    }
    if first.len() > total || (first.len() < total && first.len() != MAX_DATA - BIG_HEADER) {
        return Err(ProtoError::Malformed(b.len()));
    }
    Ok((total, b[8], first))
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub a0: u64,
    pub a1: u64,
    pub payload: Vec<u8>,
}

impl Request {
    pub fn new(op: Op, a0: u64, a1: u64, payload: &[u8]) -> Self {
        Self { op, a0, a1, payload: payload.to_vec() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + self.payload.len());
        v.push(self.op as u8);
        v.extend_from_slice(&self.a0.to_le_bytes());
        v.extend_from_slice(&self.a1.to_le_bytes());
        v.extend_from_slice(&self.payload);
        v
    }

    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if b.len() < HEADER {
            return Err(ProtoError::Malformed(b.len()));
        }
        let op = Op::try_from(b[0])?;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        Ok(Self { op, a0: word(1), a1: word(9), payload: b[HEADER..].to_vec() })
    }

    /// `a1` as a length no larger than `max`.
    pub fn len_arg(&self, max: usize) -> Result<usize, ProtoError> {
        usize::try_from(self.a1)
            .ok()
            .filter(|&n| n <= max)
            .ok_or(ProtoError::Malformed(self.payload.len() + HEADER))
    }
}

/// A decoded reply: the data, or the device's (or host's) error.
pub type Reply = Result<Vec<u8>, PluginError>;

/// Encode a reply.
pub fn encode_reply(r: &Result<Vec<u8>, PluginError>) -> Vec<u8> {
    match r {
        Ok(data) => {
            let mut v = Vec::with_capacity(1 + data.len());
            v.push(0);
            v.extend_from_slice(data);
            v
        }
        Err(e) => {
            let mut v = vec![1 + e.kind as u8];
            let msg = e.message.as_str();
            let mut end = msg.len().min(1024);
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            v.extend_from_slice(&msg.as_bytes()[..end]);
            v
        }
    }
}

const KINDS: [ErrorKind; 9] = [
    ErrorKind::InvalidConfig,
    ErrorKind::Unsupported,
    ErrorKind::InvalidState,
    ErrorKind::Denied,
    ErrorKind::Io,
    ErrorKind::Migration,
    ErrorKind::Panicked,
    ErrorKind::Fenced,
    ErrorKind::Other,
];

/// Decode a reply (untrusted).
pub fn decode_reply(b: &[u8]) -> Result<Result<Vec<u8>, PluginError>, ProtoError> {
    let (&status, rest) = b.split_first().ok_or(ProtoError::Malformed(0))?;
    if status == 0 {
        return Ok(Ok(rest.to_vec()));
    }
    let kind = *KINDS.get(usize::from(status) - 1).ok_or(ProtoError::BadStatus(status))?;
    Ok(Err(PluginError::new(kind, String::from_utf8_lossy(rest))))
}

/// The reply to [`Op::MemoryRegion`] (when the device has a region; the
/// memory file travels as its one descriptor): `size, fd_offset, align,
/// gpa: u64 | read_only: u8 | has_gpa: u8`, then the whole backend `size,
/// offset: u64` when the region lies in the device's backend file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionReply {
    pub size: u64,
    pub fd_offset: u64,
    pub align: u64,
    pub requested_gpa: Option<u64>,
    pub read_only: bool,
    /// The backend's `(size, offset)` in the same file: the host maps it
    /// whole, so RAM the device registers shares the guest's mapping.
    pub backend: Option<(u64, u64)>,
}

/// Largest alignment a device region may ask for.
pub const MAX_REGION_ALIGN: u64 = 1 << 40;

impl RegionReply {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(50);
        for w in [self.size, self.fd_offset, self.align, self.requested_gpa.unwrap_or(0)] {
            v.extend_from_slice(&w.to_le_bytes());
        }
        v.extend([u8::from(self.read_only), u8::from(self.requested_gpa.is_some())]);
        if let Some((size, offset)) = self.backend {
            v.extend_from_slice(&size.to_le_bytes());
            v.extend_from_slice(&offset.to_le_bytes());
        }
        v
    }

    /// Decode a reply (untrusted): the size must be a non-zero multiple of
    /// 4 KiB and the alignment at most [`MAX_REGION_ALIGN`]; a backend that
    /// does not contain the region is ignored (the region alone is mapped).
    pub fn decode(b: &[u8]) -> Result<Self, ProtoError> {
        if b.len() != 34 && b.len() != 50 {
            return Err(ProtoError::Malformed(b.len()));
        }
        let w = |i: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(x)
        };
        let (size, fd_offset, align, gpa) = (w(0), w(8), w(16), w(24));
        if size == 0 || size % 4096 != 0 || align > MAX_REGION_ALIGN {
            return Err(ProtoError::Malformed(b.len()));
        }
        let backend = (b.len() == 50).then(|| (w(34), w(42))).filter(|&(b_size, b_off)| {
            fd_offset >= b_off
                && b_off
                    .checked_add(b_size)
                    .is_some_and(|e| fd_offset.checked_add(size).is_some_and(|r| r <= e))
        });
        Ok(Self {
            size,
            fd_offset,
            align,
            requested_gpa: (b[33] != 0).then_some(gpa),
            read_only: b[32] != 0,
            backend,
        })
    }

    /// What of the file to map, `(offset, size)`: the backend, or the
    /// region alone. It contains the region.
    pub fn mapping(&self) -> (u64, u64) {
        self.backend.map_or((self.fd_offset, self.size), |(size, offset)| (offset, size))
    }
}

/// Longest log target kept from a `Log` record (bytes).
pub const MAX_LOG_TARGET: usize = 128;
/// Longest log message kept from a `Log` record (bytes); longer ones are cut.
pub const MAX_LOG: usize = 2048;

/// Encode the payload of a `Log` record: `target_len: u8 | target |
/// message`, the target cut to 255 bytes and the message to what fits a
/// message.
pub fn encode_log(target: &str, message: &str) -> Vec<u8> {
    let target = &target.as_bytes()[..target.len().min(255)];
    let message = &message.as_bytes()[..message.len().min(MAX_DATA - 512)];
    let mut p = Vec::with_capacity(1 + target.len() + message.len());
    p.push(target.len() as u8);
    p.extend_from_slice(target);
    p.extend_from_slice(message);
    p
}

/// Decode the payload of a `Log` record (untrusted): its target (empty when
/// it has none, or a length past the end) and its message, cut to
/// [`MAX_LOG_TARGET`] and [`MAX_LOG`] bytes, invalid UTF-8 replaced and
/// control characters turned into spaces (a record cannot forge log lines).
pub fn decode_log(payload: &[u8]) -> (String, String) {
    let (target, message) = match payload.split_first() {
        Some((&n, rest)) if usize::from(n) <= rest.len() => rest.split_at(usize::from(n)),
        _ => (&b""[..], payload),
    };
    let clean = |b: &[u8], max: usize| -> String {
        let s = String::from_utf8_lossy(&b[..b.len().min(max)]);
        s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
    };
    (clean(target, MAX_LOG_TARGET), clean(message, MAX_LOG))
}

/// One end of a SOCK_SEQPACKET socket pair.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair (close-on-exec).
    pub fn pair() -> io::Result<(Self, Self)> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for the result.
        let r = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr())
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by us from here.
        Ok(unsafe { (Self { fd: OwnedFd::from_raw_fd(fds[0]) }, Self { fd: OwnedFd::from_raw_fd(fds[1]) }) })
    }

    /// Take ownership of an inherited descriptor (the device process).
    ///
    /// # Safety
    ///
    /// `fd` must be an open socket descriptor nothing else owns.
    pub unsafe fn from_raw(fd: RawFd) -> Self {
        // SAFETY: guaranteed by the caller.
        Self { fd: unsafe { OwnedFd::from_raw_fd(fd) } }
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fail receives that wait longer than `t`.
    pub fn set_recv_timeout(&self, t: std::time::Duration) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid timeval of the size given, for a socket we own.
        let r = unsafe {
            libc::setsockopt(
                self.raw(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Send one message with `fds` attached (never raises SIGPIPE).
    pub fn send(&self, data: &[u8], fds: &[RawFd]) -> Result<(), ProtoError> {
        if data.len() > MAX_MSG || fds.len() > MAX_FDS {
            return Err(ProtoError::TooLong);
        }
        let mut iov = libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() };
        let mut cmsg = [0u64; 8]; // room for CMSG_SPACE(4 fds), aligned
                                  // SAFETY: a zeroed msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE is a pure computation.
            let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points at `space` bytes (<= 64) we own.
            let c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            // SAFETY: `c` points into `cmsg`, which has room for the header
            // and `bytes` of data (checked by CMSG_SPACE above).
            unsafe {
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(c), bytes);
            }
        }
        loop {
            // SAFETY: `msg` describes live buffers for the whole call.
            let n = unsafe { libc::sendmsg(self.raw(), &msg, libc::MSG_NOSIGNAL) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(ProtoError::Closed),
                _ => return Err(ProtoError::Io(e)),
            }
        }
    }

    /// Receive one message and the descriptors that came with it.
    pub fn recv(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ProtoError> {
        let mut buf = vec![0u8; MAX_MSG];
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let mut cmsg = [0u64; 8];
        // SAFETY: a zeroed msghdr is a valid empty message.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cmsg);
        let n = loop {
            // SAFETY: `msg` describes live buffers for the whole call.
            let n = unsafe { libc::recvmsg(self.raw(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECONNRESET) => return Err(ProtoError::Closed),
                _ => return Err(ProtoError::Io(e)),
            }
        };
        let mut fds = Vec::new();
        // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk only
        // within msg_controllen.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !c.is_null() {
            // SAFETY: `c` is a valid header inside the control buffer.
            let (level, ty, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
            if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN is a pure computation.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = len.saturating_sub(header) / size_of::<RawFd>();
                for i in 0..count {
                    // SAFETY: the data holds `count` descriptors the kernel
                    // just installed for us; read unaligned.
                    let fd = unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>().add(i)) };
                    // SAFETY: a fresh descriptor now owned by us.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: as above.
            c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            return Err(ProtoError::TooLong);
        }
        if n == 0 {
            return Err(ProtoError::Closed);
        }
        buf.truncate(n);
        Ok((buf, fds))
    }

    /// Send a request and wait for its reply.
    pub fn call(&self, req: &Request, fds: &[RawFd]) -> Result<(Reply, Vec<OwnedFd>), ProtoError> {
        self.send(&req.encode(), fds)?;
        let (b, fds) = self.recv()?;
        Ok((decode_reply(&b)?, fds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let r = Request::new(Op::MmioWrite, 0xd000_0000, 4, &[1, 2, 3, 4]);
        assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        let ok: Result<Vec<u8>, PluginError> = Ok(vec![9, 8]);
        assert_eq!(decode_reply(&encode_reply(&ok)).unwrap(), ok);
        let err: Result<Vec<u8>, PluginError> = Err(PluginError::denied("no"));
        assert_eq!(decode_reply(&encode_reply(&err)).unwrap(), err);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        assert!(Request::decode(&[]).is_err());
        assert!(Request::decode(&[Op::MmioRead as u8; 16]).is_err());
        assert!(matches!(Request::decode(&[200; 20]), Err(ProtoError::UnknownOp(200))));
        assert!(decode_reply(&[]).is_err());
        assert!(matches!(decode_reply(&[77]), Err(ProtoError::BadStatus(77))));
        assert!(decode_reply(&[3, 0xff, 0xfe]).unwrap().is_err(), "bad UTF-8 message is lossy, not fatal");
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = Request::decode(&junk).map(|r| r.len_arg(MAX_DATA));
            let _ = decode_reply(&junk);
        }
    }

    #[test]
    fn region_replies_round_trip_and_a_foreign_backend_is_ignored() {
        let r = RegionReply {
            size: 1 << 20,
            fd_offset: 4096,
            align: 1 << 21,
            requested_gpa: Some(1 << 32),
            read_only: true,
            backend: Some((2 << 20, 0)),
        };
        assert_eq!(RegionReply::decode(&r.encode()).unwrap(), r);
        assert_eq!(r.mapping(), (0, 2 << 20));
        let alone = RegionReply { requested_gpa: None, backend: None, ..r };
        assert_eq!(RegionReply::decode(&alone.encode()).unwrap(), alone);
        assert_eq!(alone.mapping(), (4096, 1 << 20));
        // A backend that ends before the region, or wraps, is not mapped.
        for backend in [(1 << 20, 0), (u64::MAX, 4096), (1 << 30, 8192)] {
            let d = RegionReply::decode(&RegionReply { backend: Some(backend), ..r }.encode()).unwrap();
            assert_eq!(d.backend, None, "{backend:?}");
        }
        for bad in [
            RegionReply { size: 0, ..r },
            RegionReply { size: 100, ..r },
            RegionReply { align: 1 << 41, ..r },
        ] {
            assert!(RegionReply::decode(&bad.encode()).is_err());
        }
        assert!(RegionReply::decode(&r.encode()[..40]).is_err());
    }

    #[test]
    fn log_records_round_trip_and_untrusted_ones_are_cleaned() {
        assert_eq!(decode_log(&encode_log("dev", "hello")), ("dev".into(), "hello".into()));
        assert_eq!(decode_log(&[]), (String::new(), String::new()));
        // A target length past the end: the whole payload is the message.
        assert_eq!(decode_log(b"\x09ab"), (String::new(), " ab".into()));
        assert_eq!(decode_log(b"\x02a\nline\nforged").1, "line forged");
        let (t, m) = decode_log(&[0xff; 5000]);
        assert!(t.chars().count() <= MAX_LOG_TARGET && m.chars().count() <= MAX_LOG);
        let long = "é".repeat(MAX_DATA);
        assert!(encode_log(&long, &long).len() <= MAX_DATA);
    }

    #[test]
    fn channel_carries_messages_and_descriptors() {
        let (a, b) = Channel::pair().unwrap();
        let efd = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        a.send(b"hi", &[efd.as_raw_fd()]).unwrap();
        let (m, fds) = b.recv().unwrap();
        assert_eq!((m.as_slice(), fds.len()), (&b"hi"[..], 1));
        // The received descriptor is the same eventfd.
        // SAFETY: a valid eventfd descriptor and an 8-byte buffer.
        let w = unsafe { libc::write(fds[0].as_raw_fd(), 5u64.to_le_bytes().as_ptr().cast(), 8) };
        assert_eq!(w, 8);
        assert_eq!(efd.read().unwrap(), 5);
        assert!(matches!(a.send(&vec![0; MAX_MSG + 1], &[]), Err(ProtoError::TooLong)));
        drop(b);
        assert!(matches!(a.send(b"x", &[]), Err(ProtoError::Closed)), "no SIGPIPE, a clear error");
    }
}
