//! `dmhost device-runner`: the device process. Loads one plugin, creates
//! its device with a `HostServices` object that forwards every request to
//! the host, and serves the host's I/O requests.
//!
//! INTx: when the device raises its pin, the runner writes the line's irqfd
//! itself (received once from the host over SCM_RIGHTS), so KVM asserts the
//! line without a host round trip; it then tells the host's INTx router,
//! which keeps the level count of the line (shared with other devices) and
//! re-raises it on resample.

use std::{
    collections::BTreeMap,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    path::PathBuf,
    sync::{Arc, Mutex},
};

use dmhost_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RArc},
    DeviceBox, DsmRequest, ErrorKind, HostServices, HostServices_TO, IoSpace, MemoryRegion, PlugInfo,
    PluginError, RResult, RSlice, RSliceMut, RStr,
};
use serde::Deserialize;

use super::proto::{
    encode_big, encode_log, encode_reply, Channel, Op, ProtoError, RegionReply, Request, MAX_DATA,
};
use crate::migration::MAX_DEVICE_DATA;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("device process protocol")]
    Proto(#[from] ProtoError),
    #[error("bad hello: {0}")]
    Hello(String),
}

#[derive(Deserialize)]
struct Hello {
    library: PathBuf,
    kind: String,
    id: String,
    config: String,
    /// The host's `log::max_level()` (0 off .. 5 trace).
    #[serde(default)]
    log_level: usize,
}

struct Line {
    irqfd: OwnedFd,
    level: bool,
}

/// The services object handed to the plugin in the device process.
#[derive(Clone)]
struct RunnerHost {
    svc: Arc<Mutex<Channel>>,
    lines: Arc<Mutex<BTreeMap<(u32, u32), Line>>>,
}

impl RunnerHost {
    fn call(&self, op: Op, a0: u64, a1: u64, payload: &[u8]) -> Result<(Vec<u8>, Vec<OwnedFd>), PluginError> {
        self.call_fds(op, a0, a1, payload, &[])
    }

    fn call_fds(
        &self,
        op: Op,
        a0: u64,
        a1: u64,
        payload: &[u8],
        fds: &[RawFd],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), PluginError> {
        let svc = self.svc.lock().unwrap_or_else(|p| p.into_inner());
        match svc.call(&Request::new(op, a0, a1, payload), fds) {
            Ok((r, fds)) => r.map(|d| (d, fds)),
            Err(e) => Err(PluginError::io(format!("host unreachable: {e}"))),
        }
    }

    fn unit(&self, op: Op, a0: u64, a1: u64, payload: &[u8]) -> RResult<(), PluginError> {
        self.call(op, a0, a1, payload).map(drop).into()
    }

    fn do_set_intx(&self, devfn: u32, pin: u32, level: bool) -> Result<(), PluginError> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if level && !lines.get(&(devfn, pin)).is_some_and(|l| l.level) {
            if let std::collections::btree_map::Entry::Vacant(slot) = lines.entry((devfn, pin)) {
                let (_, mut fds) = self.call(Op::IntxRoute, u64::from(devfn), u64::from(pin), &[])?;
                if fds.is_empty() {
                    return Err(PluginError::io("INTx route came without its irqfd"));
                }
                slot.insert(Line { irqfd: fds.remove(0), level: false });
            }
            if let Some(l) = lines.get(&(devfn, pin)) {
                // Raise directly: KVM asserts the GSI now.
                let one = 1u64.to_le_bytes();
                // SAFETY: writing 8 bytes from a live buffer to an eventfd we own.
                let n = unsafe { libc::write(l.irqfd.as_raw_fd(), one.as_ptr().cast(), 8) };
                if n != 8 {
                    log::warn!(
                        "INTx devfn {devfn:#x}: irqfd write failed: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        // The router counts the level (the line may be shared).
        self.call(Op::SetIntx, u64::from(devfn), u64::from(pin), &[u8::from(level)])?;
        if let Some(l) = lines.get_mut(&(devfn, pin)) {
            l.level = level;
        }
        Ok(())
    }
}

fn space_byte(s: IoSpace) -> u8 {
    match s {
        IoSpace::Pio => 0,
        IoSpace::Mmio => 1,
    }
}

impl HostServices for RunnerHost {
    fn register_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.unit(Op::RegisterIo, base, size, &[space_byte(space)])
    }
    fn unregister_io(&self, space: IoSpace, base: u64, size: u64) -> RResult<(), PluginError> {
        self.unit(Op::UnregisterIo, base, size, &[space_byte(space)])
    }
    fn physmap_add(&self, gpa: u64, size: u64, region_offset: u64) -> RResult<(), PluginError> {
        self.unit(Op::PhysmapAdd, gpa, size, &region_offset.to_le_bytes())
    }
    fn physmap_remove(&self, gpa: u64, size: u64) -> RResult<(), PluginError> {
        self.unit(Op::PhysmapRemove, gpa, size, &[])
    }
    fn set_irq_line(&self, gsi: u32, level: bool) -> RResult<(), PluginError> {
        self.unit(Op::SetIrqLine, u64::from(gsi), u64::from(level), &[])
    }
    fn register_irqfd(&self, gsi: u32, fd: i32, resample_fd: i32) -> RResult<(), PluginError> {
        if fd < 0 {
            return RResult::RErr(PluginError::new(ErrorKind::InvalidState, "irqfd: negative descriptor"));
        }
        // The eventfds travel as SCM_RIGHTS; our descriptor number is the key.
        let (fds, has_resample) = if resample_fd >= 0 { (vec![fd, resample_fd], 1) } else { (vec![fd], 0) };
        self.call_fds(Op::RegisterIrqfd, u64::from(gsi), fd as u64, &[has_resample], &fds).map(drop).into()
    }
    fn unregister_irqfd(&self, gsi: u32, fd: i32) -> RResult<(), PluginError> {
        self.unit(Op::UnregisterIrqfd, u64::from(gsi), i64::from(fd) as u64, &[])
    }
    fn register_ram(&self, name: RStr<'_>, region: MemoryRegion) -> RResult<(), PluginError> {
        if region.fd < 0 {
            return RResult::RErr(PluginError::unsupported(format!(
                "RAM {name} of a device process must be backed by a file or memfd"
            )));
        }
        // The host maps the backing file itself: our address means nothing there.
        let mut p = vec![u8::from(region.read_only)];
        p.extend_from_slice(name.as_str().as_bytes());
        self.call_fds(Op::RegisterRam, region.size, region.fd_offset, &p, &[region.fd]).map(drop).into()
    }
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError> {
        self.unit(Op::UnregisterRam, 0, 0, name.as_str().as_bytes())
    }
    fn mark_dirty(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<(), PluginError> {
        self.unit(Op::MarkDirty, offset, len, name.as_str().as_bytes())
    }
    fn read_guest(&self, gpa: u64, mut buf: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        let out = buf.as_mut_slice();
        for (i, chunk) in out.chunks_mut(MAX_DATA).enumerate() {
            let at = gpa.wrapping_add((i * MAX_DATA) as u64);
            match self.call(Op::ReadGuest, at, chunk.len() as u64, &[]) {
                Ok((d, _)) if d.len() == chunk.len() => chunk.copy_from_slice(&d),
                Ok(_) => return RResult::RErr(PluginError::io("short guest read")),
                Err(e) => return RResult::RErr(e),
            }
        }
        RResult::ROk(())
    }
    fn write_guest(&self, gpa: u64, buf: RSlice<'_, u8>) -> RResult<(), PluginError> {
        for (i, chunk) in buf.as_slice().chunks(MAX_DATA).enumerate() {
            let at = gpa.wrapping_add((i * MAX_DATA) as u64);
            if let Err(e) = self.call(Op::WriteGuest, at, chunk.len() as u64, chunk) {
                return RResult::RErr(e);
            }
        }
        RResult::ROk(())
    }
    fn set_intx(&self, devfn: u32, pin: u32, level: bool) -> RResult<(), PluginError> {
        self.do_set_intx(devfn, pin, level).into()
    }
}

/// Run the device process on inherited sockets `io_fd` and `svc_fd`.
pub fn run(io_fd: RawFd, svc_fd: RawFd) -> Result<(), RunnerError> {
    // SAFETY: the host passed these two socket descriptors to this process
    // for it alone; nothing else in the process owns them.
    let (io, svc) = unsafe { (Channel::from_raw(io_fd), Channel::from_raw(svc_fd)) };
    ForwardLogger::install(&svc);
    let host = RunnerHost { svc: Arc::new(Mutex::new(svc)), lines: Default::default() };
    let (msg, _) = io.recv()?;
    let hello = Request::decode(&msg)?;
    if hello.op != Op::Hello {
        return Err(RunnerError::Hello(format!("expected Hello, got {:?}", hello.op)));
    }
    let hello: Hello =
        serde_json::from_slice(&hello.payload).map_err(|e| RunnerError::Hello(e.to_string()))?;
    log::set_max_level(level_filter(hello.log_level));
    let created = create(&hello, host);
    let device = match created {
        Ok(d) => {
            io.send(&encode_reply(&Ok(Vec::new())), &[])?;
            d
        }
        Err(e) => {
            io.send(&encode_reply(&Err(e)), &[])?;
            return Ok(());
        }
    };
    log::debug!("device process for {} ({}) ready", hello.id, hello.kind);
    let mut session = Session { device, out: Vec::new(), input: Vec::new() };
    loop {
        let (msg, _) = match io.recv() {
            Ok(m) => m,
            Err(ProtoError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (reply, fds) = match Request::decode(&msg) {
            Ok(req) => session.serve(&req),
            Err(e) => (Err(PluginError::new(ErrorKind::InvalidState, e.to_string())), Vec::new()),
        };
        io.send(&encode_reply(&reply), &fds)?;
    }
}

fn create(h: &Hello, host: RunnerHost) -> Result<DeviceBox, PluginError> {
    let plugin = crate::loader::load_library(&h.library).map_err(|e| PluginError::io(e.to_string()))?;
    let host = HostServices_TO::from_ptr(RArc::new(host), TD_Opaque);
    plugin.create(&h.kind, &h.id, &h.config, host).map_err(|e| match e {
        crate::loader::CreateError::Plugin { source, .. } => source,
        other => PluginError::unsupported(other),
    })
}

/// The device and the staging buffers of replies and sections that do not
/// fit one message.
struct Session {
    device: DeviceBox,
    /// The last big reply, read in parts with `ReadChunk`.
    out: Vec<u8>,
    /// The section being loaded, sent in parts with `LoadChunk`.
    input: Vec<u8>,
}

fn invalid(what: impl std::fmt::Display) -> PluginError {
    PluginError::new(ErrorKind::InvalidState, what.to_string())
}

impl Session {
    /// Stage `data` and answer with its first part.
    fn big(&mut self, data: Vec<u8>, flag: u8, limit: usize) -> Result<Vec<u8>, PluginError> {
        if data.len() > limit {
            return Err(PluginError::migration(format!(
                "{} bytes is more than the {limit} the host takes",
                data.len()
            )));
        }
        let first = encode_big(&data, flag);
        self.out = data;
        Ok(first)
    }

    fn serve(&mut self, req: &Request) -> (Result<Vec<u8>, PluginError>, Vec<RawFd>) {
        let small = |req: &Request| req.len_arg(8).map_err(invalid);
        let unit = |r: RResult<(), PluginError>| r.into_result().map(|()| Vec::new());
        let state_limit = MAX_DEVICE_DATA as usize;
        let d = &mut self.device;
        let r = match req.op {
            Op::MemoryRegion => {
                return match d.memory_region().into_option() {
                    None => (Ok(Vec::new()), Vec::new()),
                    Some(r) => {
                        let m = r.memory;
                        let reply = RegionReply {
                            size: m.size,
                            fd_offset: m.fd_offset,
                            align: r.align,
                            requested_gpa: r.requested_gpa.into_option(),
                            read_only: m.read_only,
                            // The whole backend, when the region is part of
                            // the same file: the host maps it once.
                            backend: d
                                .backend_memory()
                                .into_option()
                                .filter(|b| b.fd == m.fd)
                                .map(|b| (b.size, b.fd_offset)),
                        };
                        (Ok(reply.encode()), vec![m.fd])
                    }
                };
            }
            Op::Plug => {
                let gpa = if req.a0 != 0 { Some(req.a1) } else { None };
                unit(d.plug(PlugInfo { region_gpa: gpa.into() }))
            }
            Op::Unplug => unit(d.unplug()),
            Op::PioRead | Op::MmioRead | Op::CfgRead => small(req).and_then(|n| {
                let mut buf = vec![0u8; n];
                let s = RSliceMut::from(&mut buf[..]);
                let r = match req.op {
                    Op::PioRead => d.pio_read(req.a0, s),
                    Op::MmioRead => d.mmio_read(req.a0, s),
                    _ => d.pci_config_read(req.a0 as u32, s),
                };
                r.into_result().map(|()| buf)
            }),
            Op::PioWrite => unit(d.pio_write(req.a0, RSlice::from(&req.payload[..]))),
            Op::MmioWrite => unit(d.mmio_write(req.a0, RSlice::from(&req.payload[..]))),
            Op::CfgWrite => unit(d.pci_config_write(req.a0 as u32, RSlice::from(&req.payload[..]))),
            Op::StateVersion => Ok(d.state_version().to_le_bytes().to_vec()),
            Op::SaveSetup => unit(d.save_setup()),
            Op::PendingEstimate | Op::PendingExact => {
                let p = if req.op == Op::PendingEstimate {
                    d.state_pending_estimate()
                } else {
                    d.state_pending_exact()
                };
                p.into_result().map(|p| [p.must_precopy.to_le_bytes(), p.can_postcopy.to_le_bytes()].concat())
            }
            Op::IsActiveIterate => Ok(vec![u8::from(d.is_active_iterate())]),
            Op::SaveIterate => match d.save_live_iterate().into_result() {
                Ok(c) => self.big(c.data.into_vec(), u8::from(c.complete), state_limit),
                Err(e) => Err(e),
            },
            Op::SaveComplete => match d.save_live_complete_precopy().into_result() {
                Ok(v) => self.big(v.into_vec(), 0, state_limit),
                Err(e) => Err(e),
            },
            Op::ReadChunk => {
                let part = usize::try_from(req.a0)
                    .ok()
                    .zip(req.len_arg(MAX_DATA).ok())
                    .and_then(|(off, n)| self.out.get(off..off.checked_add(n)?));
                part.map(<[u8]>::to_vec).ok_or_else(|| invalid("ReadChunk outside the staged reply"))
            }
            Op::SaveCleanup => {
                d.save_cleanup();
                self.out = Vec::new();
                Ok(Vec::new())
            }
            Op::LoadSetup => unit(d.load_setup()),
            Op::LoadChunk => {
                if req.a0 == 0 {
                    self.input.clear();
                }
                if req.a0 != self.input.len() as u64 || self.input.len() + req.payload.len() > state_limit {
                    self.input.clear();
                    Err(invalid("LoadChunk out of order or too large"))
                } else {
                    self.input.extend_from_slice(&req.payload);
                    Ok(Vec::new())
                }
            }
            Op::LoadState => {
                let mut data = std::mem::take(&mut self.input);
                data.extend_from_slice(&req.payload);
                if data.len() as u64 != req.a1 {
                    Err(invalid(format!("LoadState of {} bytes, {} delivered", req.a1, data.len())))
                } else {
                    unit(d.load_state(req.a0 as u32, RSlice::from(&data[..])))
                }
            }
            Op::LoadCleanup => {
                self.input = Vec::new();
                unit(d.load_cleanup())
            }
            Op::VmStateChanged => unit(d.vm_state_changed(req.a0 != 0)),
            Op::Nfit => match d.nfit_structures().into_result() {
                Ok(v) => self.big(v.into_vec(), 0, super::proxy::MAX_ACPI),
                Err(e) => Err(e),
            },
            Op::Aml => match d.aml().into_result() {
                Ok(v) => self.big(v.into_vec(), 0, super::proxy::MAX_ACPI),
                Err(e) => Err(e),
            },
            Op::DsmHandles => Ok(d.dsm_handles().iter().flat_map(|h| h.to_le_bytes()).collect()),
            Op::Dsm => match req.payload.split_first_chunk::<8>() {
                Some((head, arg3)) => {
                    let word =
                        |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
                    let request = DsmRequest {
                        handle: req.a0 as u32,
                        revision: word(0),
                        function: word(4),
                        arg3: arg3.to_vec().into(),
                    };
                    d.dsm(&request).into_result().map(|r| {
                        let mut v = r.status.to_le_bytes().to_vec();
                        v.extend_from_slice(&r.data[..r.data.len().min(MAX_DATA - 4)]);
                        v
                    })
                }
                None => Err(invalid("malformed _DSM request")),
            },
            other => Err(PluginError::unsupported(format!("{other:?} is not a device request"))),
        };
        (r, Vec::new())
    }
}

fn level_filter(n: usize) -> log::LevelFilter {
    match n {
        0 => log::LevelFilter::Off,
        1 => log::LevelFilter::Error,
        2 => log::LevelFilter::Warn,
        3 => log::LevelFilter::Info,
        4 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// The device process's logger: every record goes to the host as a one-way
/// `Log` message on its own descriptor of the service socket (a packet per
/// record, so records never interleave with requests).
struct ForwardLogger {
    chan: Channel,
}

impl ForwardLogger {
    fn install(svc: &Channel) {
        // SAFETY: duplicating a descriptor we own; the result is checked.
        let dup = unsafe { libc::fcntl(svc.raw(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            eprintln!("device-runner: no log channel: {}", std::io::Error::last_os_error());
            return;
        }
        // SAFETY: `dup` is a fresh socket descriptor only this logger owns.
        let chan = unsafe { Channel::from_raw(dup) };
        if log::set_boxed_logger(Box::new(Self { chan })).is_ok() {
            log::set_max_level(log::LevelFilter::Info);
        }
    }
}

impl log::Log for ForwardLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        let p = encode_log(record.target(), &msg);
        let req = Request::new(Op::Log, record.level() as u64, 0, &p);
        if self.chan.send(&req.encode(), &[]).is_err() {
            eprintln!("device-runner: {}: {msg}", record.level());
        }
    }

    fn flush(&self) {}
}
