//! The host side of a device in its own process: spawns the runner, forwards
//! guest I/O to it, and serves the host services it asks for (through the
//! device's own `HostServices`, so every owner check stays in the host).
//!
//! A device process that dies, hangs or answers nonsense is fenced: reads
//! return all ones, writes are dropped, the failure is logged once and
//! `query-devices` reports the device failed.

use std::{
    os::fd::{AsRawFd, OwnedFd},
    path::PathBuf,
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, Weak,
    },
    thread::JoinHandle,
    time::Duration,
};

use dmhost_plugin_api::{
    DsmReply, DsmRequest, ErrorKind, GuestRegion, Host, IoSpace, MemoryRegion, PendingSize, PlugInfo,
    PluginError, RSlice, RSliceMut, RStr, SaveChunk,
};

use super::{
    proto::{decode_big, decode_log, encode_reply, Channel, Op, ProtoError, RegionReply, Request, MAX_DATA},
    resources::{Irqfd, Resources, SharedMapping},
};
use crate::{migration::MAX_DEVICE_DATA, vm::bus::RateLimiter, vm::VmShared};

/// Largest NFIT or AML a device process may return.
pub const MAX_ACPI: usize = 1 << 20;
/// Most `_DSM` handles a device process may serve.
pub const MAX_DSM_HANDLES: usize = 1024;
/// Log records forwarded per device per second (the rest are counted).
pub const LOG_BURST: u32 = 50;

/// How long the host waits for the device process to answer one request.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// What to run in the device process.
#[derive(Debug, Clone)]
pub struct RemoteSpec {
    /// The runner executable (`dmhost`, run as `dmhost device-runner`).
    pub runner: PathBuf,
    /// The plugin library providing `kind`.
    pub library: PathBuf,
    pub kind: String,
    pub id: String,
    pub config: String,
}

/// A device running in its own process.
pub struct RemoteDevice {
    id: String,
    io: Channel,
    child: Mutex<Child>,
    failed: Arc<AtomicBool>,
    /// Set when the host drops the device (removal, VM teardown): the VM
    /// releases what the device holds itself, the service thread only
    /// closes and unmaps.
    removing: Arc<AtomicBool>,
    svc: Option<JoinHandle<()>>,
    region: Option<GuestRegion>,
    resources: Arc<Mutex<Resources>>,
}

fn fenced(id: &str) -> PluginError {
    PluginError::new(ErrorKind::Fenced, format!("device {id}: its process failed; the device is fenced"))
}

impl RemoteDevice {
    /// Start the device process and create the device in it.
    pub fn spawn(spec: &RemoteSpec, host: Host, vm: Weak<VmShared>) -> Result<Self, PluginError> {
        let (io, io_child) = Channel::pair()?;
        let (svc, svc_child) = Channel::pair()?;
        let (a, b) = (io_child.raw(), svc_child.raw());
        let mut cmd = Command::new(&spec.runner);
        cmd.arg("device-runner").arg("--io-fd").arg(a.to_string()).arg("--svc-fd").arg(b.to_string());
        // SAFETY: the closure only calls fcntl (async-signal-safe) on two
        // descriptors that are open in the child.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                for fd in [a, b] {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            PluginError::io(format!("device {}: cannot start {}: {e}", spec.id, spec.runner.display()))
        })?;
        drop((io_child, svc_child));
        log::info!("device {}: device process {} started ({})", spec.id, child.id(), spec.library.display());
        io.set_recv_timeout(IO_TIMEOUT)?;
        let failed = Arc::new(AtomicBool::new(false));
        let removing = Arc::new(AtomicBool::new(false));
        let resources = Arc::new(Mutex::new(Resources::default()));
        let id = spec.id.clone();
        let ctx = ServiceCtx {
            id: id.clone(),
            host,
            vm,
            failed: Arc::clone(&failed),
            removing: Arc::clone(&removing),
            resources: Arc::clone(&resources),
            log_limit: RateLimiter::new(LOG_BURST, Duration::from_secs(1)),
        };
        let thread = std::thread::Builder::new()
            .name(format!("svc-{id}"))
            .spawn(move || serve(&svc, &ctx))
            .map_err(|e| PluginError::io(format!("device {id}: service thread: {e}")))?;
        let mut dev = Self {
            id,
            io,
            child: Mutex::new(child),
            failed,
            removing,
            svc: Some(thread),
            region: None,
            resources,
        };
        let hello = serde_json::json!({
            "library": spec.library, "kind": spec.kind, "id": spec.id, "config": spec.config,
            "log_level": log::max_level() as usize,
        })
        .to_string();
        dev.call(Op::Hello, 0, 0, hello.as_bytes())?;
        dev.fetch_region()?;
        Ok(dev)
    }

    fn fail(&self, why: &dyn std::fmt::Display) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!("device {}: device process failed ({why}); device fenced", self.id);
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.kill();
        }
    }

    /// Whether the device process is gone or was fenced.
    pub fn failed(&self) -> bool {
        if self.failed.load(Ordering::Acquire) {
            return true;
        }
        let exited = self.child.lock().unwrap_or_else(|p| p.into_inner()).try_wait();
        match exited {
            Ok(Some(status)) => {
                self.fail(&format!("exited: {status}"));
                true
            }
            _ => false,
        }
    }

    /// The device process id.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).id()
    }

    fn call_fds(
        &self,
        op: Op,
        a0: u64,
        a1: u64,
        payload: &[u8],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), PluginError> {
        if self.failed.load(Ordering::Acquire) {
            return Err(fenced(&self.id));
        }
        match self.io.call(&Request::new(op, a0, a1, payload), &[]) {
            Ok((Ok(data), fds)) => Ok((data, fds)),
            Ok((Err(e), _)) => Err(e),
            Err(e) => {
                self.fail(&e);
                Err(fenced(&self.id))
            }
        }
    }

    fn call(&self, op: Op, a0: u64, a1: u64, payload: &[u8]) -> Result<Vec<u8>, PluginError> {
        self.call_fds(op, a0, a1, payload).map(|(d, _)| d)
    }

    /// Fail the device for a reply that breaks the protocol.
    fn violation(&self, what: &str) -> PluginError {
        let e = PluginError::io(format!("device {}: {what}", self.id));
        self.fail(&e);
        e
    }

    fn fetch_region(&mut self) -> Result<(), PluginError> {
        let (data, mut fds) = self.call_fds(Op::MemoryRegion, 0, 0, &[])?;
        if data.is_empty() {
            return Ok(());
        }
        let r = match RegionReply::decode(&data) {
            Ok(r) if fds.len() == 1 => r,
            _ => return Err(self.violation("memory region reply: malformed")),
        };
        // The whole backend when the region lies in it (the same file), so
        // RAM the device registers for migration shares the guest's
        // mapping; otherwise the region alone.
        let (map_off, map_size) = r.mapping();
        let fd = fds.remove(0);
        let m = match SharedMapping::map(fd, map_off, map_size, r.read_only) {
            Ok(m) => m,
            Err(e) => return Err(self.violation(&format!("memory region: {e}"))),
        };
        let memory = MemoryRegion {
            host_addr: m.addr() + (r.fd_offset - map_off),
            size: r.size,
            fd: m.raw_fd(),
            fd_offset: r.fd_offset,
            read_only: r.read_only,
        };
        self.region =
            Some(GuestRegion { memory, requested_gpa: r.requested_gpa.into(), align: r.align.max(4096) });
        self.resources.lock().unwrap_or_else(|p| p.into_inner()).set_guest(m);
        Ok(())
    }

    /// A reply that may span several messages (`limit` bytes at most):
    /// the data and the flag byte.
    fn call_big(&self, op: Op, a0: u64, limit: usize) -> Result<(Vec<u8>, u8), PluginError> {
        let first = self.call(op, a0, 0, &[])?;
        let (total, flag, part) = match decode_big(&first, limit) {
            Ok(x) => x,
            Err(e) => return Err(self.violation(&format!("{op:?} reply: {e}"))),
        };
        let mut out = Vec::with_capacity(total.min(1 << 20));
        out.extend_from_slice(part);
        while out.len() < total {
            let n = (total - out.len()).min(MAX_DATA);
            let chunk = self.call(Op::ReadChunk, out.len() as u64, n as u64, &[])?;
            if chunk.len() != n {
                return Err(
                    self.violation(&format!("{op:?}: chunk of {n} bytes answered with {}", chunk.len()))
                );
            }
            out.extend_from_slice(&chunk);
        }
        Ok((out, flag))
    }

    /// Reply of exactly `N` bytes.
    fn call_fixed<const N: usize>(&self, op: Op) -> Result<[u8; N], PluginError> {
        let r = self.call(op, 0, 0, &[])?;
        <[u8; N]>::try_from(r.as_slice())
            .map_err(|_| self.violation(&format!("{op:?} reply of {} bytes", r.len())))
    }

    pub fn memory_region(&self) -> Option<GuestRegion> {
        self.region
    }

    pub fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        let gpa = info.region_gpa.into_option();
        self.call(Op::Plug, u64::from(gpa.is_some()), gpa.unwrap_or(0), &[]).map(drop)
    }

    pub fn unplug(&mut self) -> Result<(), PluginError> {
        self.call(Op::Unplug, 0, 0, &[]).map(drop)
    }

    fn read_op(&self, op: Op, addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        let r = self.call(op, addr, data.len() as u64, &[]);
        match r {
            Ok(reply) if reply.len() == data.len() => {
                data.copy_from_slice(&reply);
                Ok(())
            }
            Ok(reply) => {
                let e =
                    PluginError::io(format!("read of {} bytes answered with {}", data.len(), reply.len()));
                self.fail(&e);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    pub fn read(&mut self, space: IoSpace, addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        let op = if space == IoSpace::Mmio { Op::MmioRead } else { Op::PioRead };
        self.read_op(op, addr, data)
    }

    pub fn write(&mut self, space: IoSpace, addr: u64, data: &[u8]) -> Result<(), PluginError> {
        let op = if space == IoSpace::Mmio { Op::MmioWrite } else { Op::PioWrite };
        self.call(op, addr, data.len() as u64, data).map(drop)
    }

    pub fn pci_config_read(&mut self, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        self.read_op(Op::CfgRead, u64::from(offset), data)
    }

    pub fn pci_config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), PluginError> {
        self.call(Op::CfgWrite, u64::from(offset), data.len() as u64, data).map(drop)
    }

    pub fn state_version(&mut self) -> Result<u32, PluginError> {
        self.call_fixed::<4>(Op::StateVersion).map(u32::from_le_bytes)
    }

    pub fn save_setup(&mut self) -> Result<(), PluginError> {
        self.call(Op::SaveSetup, 0, 0, &[]).map(drop)
    }

    fn pending(&mut self, op: Op) -> Result<PendingSize, PluginError> {
        let r = self.call_fixed::<16>(op)?;
        let w = |i: usize| u64::from_le_bytes(r[i..i + 8].try_into().unwrap_or([0; 8]));
        Ok(PendingSize { must_precopy: w(0), can_postcopy: w(8) })
    }

    pub fn state_pending_estimate(&mut self) -> Result<PendingSize, PluginError> {
        self.pending(Op::PendingEstimate)
    }

    pub fn state_pending_exact(&mut self) -> Result<PendingSize, PluginError> {
        self.pending(Op::PendingExact)
    }

    pub fn is_active_iterate(&mut self) -> Result<bool, PluginError> {
        self.call_fixed::<1>(Op::IsActiveIterate).map(|[b]| b != 0)
    }

    pub fn save_live_iterate(&mut self) -> Result<SaveChunk, PluginError> {
        let (data, complete) = self.call_big(Op::SaveIterate, 0, MAX_DEVICE_DATA as usize)?;
        Ok(SaveChunk { data: data.into(), complete: complete != 0 })
    }

    pub fn save_complete(&mut self) -> Result<Vec<u8>, PluginError> {
        self.call_big(Op::SaveComplete, 0, MAX_DEVICE_DATA as usize).map(|(d, _)| d)
    }

    pub fn save_cleanup(&mut self) -> Result<(), PluginError> {
        self.call(Op::SaveCleanup, 0, 0, &[]).map(drop)
    }

    pub fn load_setup(&mut self) -> Result<(), PluginError> {
        self.call(Op::LoadSetup, 0, 0, &[]).map(drop)
    }

    /// Load one section: sent in parts when it does not fit a message.
    pub fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        if data.len() > MAX_DEVICE_DATA as usize {
            return Err(PluginError::migration(format!("device state of {} bytes is too large", data.len())));
        }
        let mut sent = 0;
        while data.len() - sent > MAX_DATA {
            self.call(Op::LoadChunk, sent as u64, MAX_DATA as u64, &data[sent..sent + MAX_DATA])?;
            sent += MAX_DATA;
        }
        self.call(Op::LoadState, u64::from(version), data.len() as u64, &data[sent..]).map(drop)
    }

    pub fn load_cleanup(&mut self) -> Result<(), PluginError> {
        self.call(Op::LoadCleanup, 0, 0, &[]).map(drop)
    }

    pub fn vm_state_changed(&mut self, running: bool) -> Result<(), PluginError> {
        self.call(Op::VmStateChanged, u64::from(running), 0, &[]).map(drop)
    }

    pub fn nfit_structures(&self) -> Result<Vec<u8>, PluginError> {
        self.call_big(Op::Nfit, 0, MAX_ACPI).map(|(d, _)| d)
    }

    pub fn aml(&self) -> Result<Vec<u8>, PluginError> {
        self.call_big(Op::Aml, 0, MAX_ACPI).map(|(d, _)| d)
    }

    pub fn dsm_handles(&self) -> Result<Vec<u32>, PluginError> {
        let r = self.call(Op::DsmHandles, 0, 0, &[])?;
        if r.len() % 4 != 0 || r.len() / 4 > MAX_DSM_HANDLES {
            return Err(self.violation(&format!("_DSM handles reply of {} bytes", r.len())));
        }
        Ok(r.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// Serve a guest `_DSM` call in the device process.
    pub fn dsm(&mut self, req: &DsmRequest) -> Result<DsmReply, PluginError> {
        if req.arg3.len() > MAX_DATA - 8 {
            return Ok(DsmReply::status(DsmReply::INVALID_INPUT));
        }
        let mut p = Vec::with_capacity(8 + req.arg3.len());
        p.extend_from_slice(&req.revision.to_le_bytes());
        p.extend_from_slice(&req.function.to_le_bytes());
        p.extend_from_slice(&req.arg3);
        let r = self.call(Op::Dsm, u64::from(req.handle), p.len() as u64, &p)?;
        match r.split_first_chunk::<4>() {
            Some((status, data)) => {
                Ok(DsmReply { status: u32::from_le_bytes(*status), data: data.to_vec().into() })
            }
            None => Err(self.violation(&format!("_DSM reply of {} bytes", r.len()))),
        }
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.removing.store(true, Ordering::Release);
        {
            let mut c = self.child.lock().unwrap_or_else(|p| p.into_inner());
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(t) = self.svc.take() {
            let _ = t.join();
        }
        log::debug!("device {}: device process reaped", self.id);
    }
}

/// What the service thread of one device process works with.
struct ServiceCtx {
    id: String,
    host: Host,
    vm: Weak<VmShared>,
    failed: Arc<AtomicBool>,
    removing: Arc<AtomicBool>,
    resources: Arc<Mutex<Resources>>,
    log_limit: RateLimiter,
}

impl ServiceCtx {
    fn resources(&self) -> std::sync::MutexGuard<'_, Resources> {
        self.resources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device process is gone: fence the device and release what it
    /// registered through this channel (RAM blocks, irqfds). When the host
    /// itself drops the device, the VM has released them already.
    fn release(&self) {
        if self.removing.load(Ordering::Acquire) {
            return;
        }
        if !self.failed.swap(true, Ordering::AcqRel) {
            log::error!("device {}: device process exited; device fenced", self.id);
        }
        let names = self.resources().ram_names();
        for name in names {
            if let Err(e) = self.host.unregister_ram(RStr::from(name.as_str())).into_result() {
                log::debug!("device {}: RAM {name}: {e}", self.id);
            }
            let _ = self.resources().unmap_ram(&name);
            log::info!("device {}: RAM block {name} unregistered", self.id);
        }
        let irqfds = self.resources().take_irqfds();
        for (gsi, f) in irqfds {
            if let Err(e) = self.host.unregister_irqfd(gsi, f.fd.as_raw_fd()).into_result() {
                log::debug!("device {}: irqfd on GSI {gsi}: {e}", self.id);
            }
        }
    }

    /// Forward a log record of the device process to the host's logger.
    fn log(&self, req: &Request) {
        let level = match req.a0 {
            1 => log::Level::Error,
            2 => log::Level::Warn,
            3 => log::Level::Info,
            4 => log::Level::Debug,
            _ => log::Level::Trace,
        };
        if level > log::max_level() {
            return;
        }
        let (target, msg) = decode_log(&req.payload);
        let target = if target.is_empty() { "device".to_owned() } else { target };
        self.log_limit.log(|suppressed| {
            let more =
                if suppressed > 0 { format!(" ({suppressed} records suppressed)") } else { String::new() };
            log::logger().log(
                &log::Record::builder()
                    .level(level)
                    .target(&target)
                    .args(format_args!("device {}: {msg}{more}", self.id))
                    .build(),
            );
        });
    }
}

/// Serve the device process's host-service requests until it goes away.
fn serve(svc: &Channel, ctx: &ServiceCtx) {
    loop {
        let (msg, fds) = match svc.recv() {
            Ok(m) => m,
            Err(ProtoError::Closed) => break,
            Err(e) => {
                log::warn!("device {}: service socket: {e}", ctx.id);
                break;
            }
        };
        if ctx.failed.load(Ordering::Acquire) {
            break;
        }
        let req = match Request::decode(&msg) {
            Ok(req) if req.op == Op::Log => {
                ctx.log(&req);
                continue;
            }
            Ok(req) => Ok(req),
            Err(e) => Err(e),
        };
        let (reply, fds) = match req {
            Ok(req) => handle(&req, fds, ctx),
            Err(e) => {
                log::warn!("device {}: malformed service request: {e}", ctx.id);
                (
                    Err(PluginError::new(ErrorKind::InvalidState, format!("malformed request: {e}"))),
                    Vec::new(),
                )
            }
        };
        if let Err(e) = svc.send(&encode_reply(&reply), &fds) {
            log::debug!("device {}: service reply: {e}", ctx.id);
            break;
        }
    }
    ctx.release();
}

type Reply = (Result<Vec<u8>, PluginError>, Vec<i32>);

fn handle(req: &Request, fds: Vec<OwnedFd>, ctx: &ServiceCtx) -> Reply {
    let (id, host, vm) = (ctx.id.as_str(), &ctx.host, &ctx.vm);
    let bad = |what: &str| PluginError::new(ErrorKind::InvalidState, format!("{what}: malformed request"));
    let u32_arg = |v: u64, what: &str| u32::try_from(v).map_err(|_| bad(what));
    let unit = |r: dmhost_plugin_api::RResult<(), PluginError>| r.into_result().map(|()| Vec::new());
    let space = || match req.payload.first() {
        Some(0) => Ok(IoSpace::Pio),
        Some(1) => Ok(IoSpace::Mmio),
        _ => Err(bad("I/O space")),
    };
    let name_of = |b: &[u8], what: &str| match std::str::from_utf8(b) {
        Ok(n) if !n.is_empty() && n.len() <= 256 => Ok(n.to_owned()),
        _ => Err(bad(what)),
    };
    let r: Result<Vec<u8>, PluginError> = match req.op {
        Op::RegisterIo => space().and_then(|s| unit(host.register_io(s, req.a0, req.a1))),
        Op::UnregisterIo => space().and_then(|s| unit(host.unregister_io(s, req.a0, req.a1))),
        Op::PhysmapAdd => match <[u8; 8]>::try_from(req.payload.as_slice()) {
            Ok(off) => unit(host.physmap_add(req.a0, req.a1, u64::from_le_bytes(off))),
            Err(_) => Err(bad("physmap_add")),
        },
        Op::PhysmapRemove => unit(host.physmap_remove(req.a0, req.a1)),
        Op::SetIrqLine => {
            u32_arg(req.a0, "set_irq_line").and_then(|g| unit(host.set_irq_line(g, req.a1 != 0)))
        }
        Op::ReadGuest => match req.len_arg(MAX_DATA) {
            Ok(n) => {
                let mut buf = vec![0u8; n];
                host.read_guest(req.a0, RSliceMut::from(&mut buf[..])).into_result().map(|()| buf)
            }
            Err(_) => Err(bad("read_guest")),
        },
        Op::WriteGuest => unit(host.write_guest(req.a0, RSlice::from(&req.payload[..]))),
        Op::SetIntx => match (u32_arg(req.a0, "devfn"), u32_arg(req.a1, "pin"), req.payload.first()) {
            (Ok(devfn), Ok(pin), Some(&level)) => unit(host.set_intx(devfn, pin, level != 0)),
            _ => Err(bad("set_intx")),
        },
        Op::IntxRoute => {
            let route = match (u32_arg(req.a0, "devfn"), u32_arg(req.a1, "pin"), vm.upgrade()) {
                (Ok(devfn), Ok(pin), Some(vm)) => vm.intx.route(id, devfn, pin),
                (_, _, None) => Err(PluginError::state("the VM is gone")),
                _ => Err(bad("intx_route")),
            };
            return match route {
                Ok(r) => {
                    let mut v = r.line.to_le_bytes().to_vec();
                    v.extend_from_slice(&r.gsi.to_le_bytes());
                    // The line's irqfd and resamplefd travel as SCM_RIGHTS.
                    (Ok(v), vec![r.irqfd, r.resamplefd])
                }
                Err(e) => (Err(e), Vec::new()),
            };
        }
        Op::MarkDirty => match std::str::from_utf8(&req.payload) {
            Ok(name) => unit(host.mark_dirty(RStr::from_str(name), req.a0, req.a1)),
            Err(_) => Err(bad("mark_dirty")),
        },
        Op::RegisterRam => register_ram(req, fds, ctx),
        Op::UnregisterRam => name_of(&req.payload, "unregister_ram").and_then(|name| {
            if !ctx.resources().has_ram(&name) {
                return Err(PluginError::new(
                    ErrorKind::Denied,
                    format!("RAM {name} was not registered by this device"),
                ));
            }
            unit(host.unregister_ram(RStr::from(name.as_str())))?;
            let _ = ctx.resources().unmap_ram(&name);
            Ok(Vec::new())
        }),
        Op::RegisterIrqfd => register_irqfd(req, fds, ctx),
        Op::UnregisterIrqfd => u32_arg(req.a0, "unregister_irqfd").and_then(|gsi| {
            let key = req.a1 as i64;
            let fd = ctx.resources().irqfd(gsi, key).map(|f| f.fd.as_raw_fd());
            let Some(fd) = fd else {
                return Err(PluginError::new(
                    ErrorKind::Denied,
                    format!("no irqfd {key} registered on GSI {gsi}"),
                ));
            };
            unit(host.unregister_irqfd(gsi, fd))?;
            ctx.resources().remove_irqfd(gsi, key);
            Ok(Vec::new())
        }),
        other => Err(PluginError::unsupported(format!("{other:?} is not a host service"))),
    };
    (r, Vec::new())
}

/// `RegisterRam`: `a0` size, `a1` offset in the file, payload
/// `read_only: u8` + name, the file as the one descriptor.
fn register_ram(req: &Request, fds: Vec<OwnedFd>, ctx: &ServiceCtx) -> Result<Vec<u8>, PluginError> {
    let bad = || PluginError::new(ErrorKind::InvalidState, "register_ram: malformed request");
    let (Some((&ro, name)), Ok([fd])) = (req.payload.split_first(), <[OwnedFd; 1]>::try_from(fds)) else {
        return Err(bad());
    };
    let name = match std::str::from_utf8(name) {
        Ok(n) if !n.is_empty() && n.len() <= 256 => n,
        _ => return Err(bad()),
    };
    let (size, fd_offset, read_only) = (req.a0, req.a1, ro != 0);
    let place = ctx
        .resources()
        .map_ram(name, fd, fd_offset, size, read_only)
        .map_err(|e| PluginError::new(ErrorKind::Denied, format!("register_ram {name}: {e}")))?;
    let region = MemoryRegion { host_addr: place.host_addr, size, fd: place.fd, fd_offset, read_only };
    if let Err(e) = ctx.host.register_ram(RStr::from(name), region).into_result() {
        let _ = ctx.resources().unmap_ram(name);
        return Err(e);
    }
    log::debug!("device {}: RAM block {name} ({size:#x} bytes) shared at {:#x}", ctx.id, place.host_addr);
    Ok(Vec::new())
}

/// `RegisterIrqfd`: `a0` GSI, `a1` the descriptor's number in the device
/// process (its key), payload `has_resample: u8`; the eventfd (and the
/// resample eventfd) as descriptors.
fn register_irqfd(req: &Request, fds: Vec<OwnedFd>, ctx: &ServiceCtx) -> Result<Vec<u8>, PluginError> {
    let bad = || PluginError::new(ErrorKind::InvalidState, "register_irqfd: malformed request");
    let gsi = u32::try_from(req.a0).map_err(|_| bad())?;
    let key = req.a1 as i64;
    let mut fds = fds.into_iter();
    let irqfd = match (req.payload.as_slice(), fds.next(), fds.next(), fds.next()) {
        ([0], Some(fd), None, None) => Irqfd { fd, resample: None },
        ([1], Some(fd), Some(r), None) => Irqfd { fd, resample: Some(r) },
        _ => return Err(bad()),
    };
    let (fd, resample) = (irqfd.fd.as_raw_fd(), irqfd.resample.as_ref().map_or(-1, |r| r.as_raw_fd()));
    ctx.resources()
        .add_irqfd(gsi, key, irqfd)
        .map_err(|e| PluginError::new(ErrorKind::Denied, format!("register_irqfd: {e}")))?;
    if let Err(e) = ctx.host.register_irqfd(gsi, fd, resample).into_result() {
        ctx.resources().remove_irqfd(gsi, key);
        return Err(e);
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::DeviceServices;

    fn fake(io: Channel) -> RemoteDevice {
        let child = Command::new("sleep").arg("30").spawn().unwrap();
        io.set_recv_timeout(Duration::from_secs(2)).unwrap();
        RemoteDevice {
            id: "fake".into(),
            io,
            child: Mutex::new(child),
            failed: Arc::new(AtomicBool::new(false)),
            removing: Arc::new(AtomicBool::new(false)),
            svc: None,
            region: None,
            resources: Default::default(),
        }
    }

    #[test]
    fn garbage_replies_fence_the_device_without_panicking() {
        for garbage in [vec![], vec![99u8], vec![0u8; 3], vec![0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9]] {
            let (host_end, dev_end) = Channel::pair().unwrap();
            let mut d = fake(host_end);
            let g = garbage.clone();
            let t = std::thread::spawn(move || {
                let _ = dev_end.recv();
                let _ = dev_end.send(&g, &[]);
                dev_end
            });
            let mut buf = [0u8; 4];
            let r = d.read(IoSpace::Mmio, 0x1000, &mut buf);
            let _keep = t.join().unwrap();
            assert!(r.is_err(), "{garbage:?} accepted");
            assert!(d.failed(), "{garbage:?}: device not fenced");
            let again = d.write(IoSpace::Mmio, 0x1000, &[1]);
            assert_eq!(again.unwrap_err().kind, ErrorKind::Fenced);
        }
    }

    #[test]
    fn silent_device_process_times_out_and_is_fenced() {
        let (host_end, _dev_end) = Channel::pair().unwrap();
        let mut d = fake(host_end);
        let mut buf = [0u8; 8];
        assert!(d.read(IoSpace::Pio, 0x10, &mut buf).is_err());
        assert!(d.failed());
    }

    fn ctx() -> ServiceCtx {
        ServiceCtx {
            id: "x".into(),
            host: DeviceServices::new(Weak::new(), "x").host(),
            vm: Weak::new(),
            failed: Default::default(),
            removing: Default::default(),
            resources: Default::default(),
            log_limit: RateLimiter::new(LOG_BURST, Duration::from_secs(1)),
        }
    }

    fn memfd() -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own; then a valid ftruncate on it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 1 << 20) }, 0);
        fd
    }

    #[test]
    fn malformed_service_requests_get_errors() {
        let ctx = ctx();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for op in [64u8, 65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 1, 5, 19, 255] {
            for i in 0..60 {
                let n = (rnd() % 24) as usize;
                let payload: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                let mut raw = vec![op];
                // Small sizes and offsets now and then, so some requests get past the first checks.
                let (a0, a1) = if i % 3 == 0 { (rnd() % 3 * 4096, rnd() % 2 * 4096) } else { (rnd(), rnd()) };
                raw.extend_from_slice(&a0.to_le_bytes());
                raw.extend_from_slice(&a1.to_le_bytes());
                raw.extend_from_slice(&payload);
                let fds: Vec<OwnedFd> = (0..rnd() % 3).map(|_| memfd()).collect();
                if let Ok(req) = Request::decode(&raw) {
                    let (r, fds) = handle(&req, fds, &ctx);
                    assert!(r.is_err(), "{req:?} succeeded without a VM");
                    assert!(fds.is_empty());
                }
            }
        }
        // Nothing was left mapped or held for the failed registrations.
        assert!(ctx.resources().ram_names().is_empty());
        assert!(ctx.resources().take_irqfds().is_empty());
    }

    #[test]
    fn ram_and_irqfd_requests_check_their_descriptors() {
        let ctx = ctx();
        let req = |op, a0, a1, p: &[u8]| Request::new(op, a0, a1, p);
        // No descriptor, two descriptors, a name that is not UTF-8, no name.
        let cases: Vec<(Request, Vec<OwnedFd>)> = vec![
            (req(Op::RegisterRam, 4096, 0, b"\0a/ram"), vec![]),
            (req(Op::RegisterRam, 4096, 0, b"\0a/ram"), vec![memfd(), memfd()]),
            (req(Op::RegisterRam, 4096, 0, b"\0\xff"), vec![memfd()]),
            (req(Op::RegisterRam, 4096, 0, b"\0"), vec![memfd()]),
            (req(Op::RegisterRam, 4096, 0, b""), vec![memfd()]),
            // Beyond the file, or unaligned.
            (req(Op::RegisterRam, 2 << 20, 0, b"\0a/ram"), vec![memfd()]),
            (req(Op::RegisterRam, 4096, 17, b"\0a/ram"), vec![memfd()]),
            (req(Op::RegisterIrqfd, 5, 3, b"\x01"), vec![memfd()]),
            (req(Op::RegisterIrqfd, 1 << 40, 3, b"\0"), vec![memfd()]),
            (req(Op::UnregisterIrqfd, 5, 3, b""), vec![]),
            (req(Op::UnregisterRam, 0, 0, b"a/ram"), vec![]),
        ];
        for (r, fds) in cases {
            let (res, _) = handle(&r, fds, &ctx);
            let e = res.expect_err(&format!("{r:?} accepted"));
            assert_ne!(e.kind, ErrorKind::Panicked);
        }
        // Well-formed, but there is no VM: refused, and nothing kept.
        let (res, _) = handle(&req(Op::RegisterRam, 4096, 0, b"\0a/ram"), vec![memfd()], &ctx);
        assert!(res.is_err());
        assert!(ctx.resources().ram_names().is_empty(), "a refused registration leaves no mapping");
    }

    #[test]
    fn log_records_are_forwarded_without_trusting_their_bytes() {
        let ctx = ctx();
        for payload in [&b""[..], b"\xff", b"\x05ab", b"\x02abline\nforged", &[0xffu8; 5000][..]] {
            ctx.log(&Request::new(Op::Log, 3, 0, payload));
            ctx.log(&Request::new(Op::Log, u64::MAX, 0, payload));
        }
    }

    #[test]
    fn ram_and_irqfds_of_a_device_process_are_owned_and_released_on_kvm() {
        if !crate::testing::kvm_or_skip("ram_and_irqfds_of_a_device_process_are_owned_and_released_on_kvm") {
            return;
        }
        let sink: crate::vm::vcpu::SerialSink = Arc::new(|_: &[u8]| {});
        let vm =
            crate::vm::Vm::new(crate::vm::VmConfig { ram_size: 2 << 20, vcpus: 1, serial: sink }).unwrap();
        let on_vm = |id: &str| ServiceCtx {
            id: id.into(),
            host: DeviceServices::new(Arc::downgrade(vm.shared()), id).host(),
            vm: Arc::downgrade(vm.shared()),
            ..ctx()
        };
        let (a, b) = (on_vm("a"), on_vm("b"));
        let req = |op, a0, a1, p: &[u8]| Request::new(op, a0, a1, p);
        // RAM: registered under the device's own name, owned by it.
        let (r, _) = handle(&req(Op::RegisterRam, 8192, 4096, b"\0a/ram"), vec![memfd()], &a);
        r.unwrap();
        let block = vm.ram_blocks().into_iter().find(|x| x.name == "a/ram").unwrap();
        assert_eq!(
            (block.size, block.fd_offset, block.owner.clone()),
            (8192, 4096, crate::vm::physmap::Owner::Device("a".into()))
        );
        let (r, _) = handle(&req(Op::UnregisterRam, 0, 0, b"a/ram"), vec![], &b);
        assert_eq!(r.unwrap_err().kind, ErrorKind::Denied, "another device cannot unregister it");
        let (r, _) = handle(&req(Op::MarkDirty, 0, 4096, b"a/ram"), vec![], &b);
        assert_eq!(r.unwrap_err().kind, ErrorKind::Denied);
        // irqfds: registered from the descriptor sent, keyed by the sender's number.
        let efd = || {
            let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            // SAFETY: duplicating a live eventfd; the copy is ours alone.
            let dup = unsafe { libc::dup(e.as_raw_fd()) };
            assert!(dup >= 0);
            // SAFETY: a fresh descriptor we own.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) }
        };
        let (r, _) = handle(&req(Op::RegisterIrqfd, 5, 7, &[0]), vec![efd()], &a);
        r.unwrap();
        let (r, _) = handle(&req(Op::RegisterIrqfd, 5, 7, &[0]), vec![efd()], &a);
        assert!(r.is_err(), "the same key twice");
        let (r, _) = handle(&req(Op::UnregisterIrqfd, 5, 7, &[]), vec![], &b);
        assert_eq!(r.unwrap_err().kind, ErrorKind::Denied, "another device's irqfd");
        let (r, _) = handle(&req(Op::UnregisterIrqfd, 5, 7, &[]), vec![], &a);
        r.unwrap();
        let (r, _) = handle(&req(Op::RegisterIrqfd, 6, 8, &[0]), vec![efd()], &a);
        r.unwrap();
        // The process dies: everything it registered is released.
        a.release();
        assert!(a.failed.load(Ordering::Acquire));
        assert!(!vm.ram_blocks().iter().any(|x| x.name == "a/ram"));
        assert!(a.resources().take_irqfds().is_empty());
        assert!(a.resources().ram_names().is_empty());
    }

    /// The device end of a fake device process: answers `SaveComplete` with
    /// `state` in parts, and records what `LoadState` delivered.
    fn big_state_server(dev_end: Channel, state: Vec<u8>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut loaded = Vec::new();
            while let Ok((m, _)) = dev_end.recv() {
                let req = Request::decode(&m).unwrap();
                let reply = match req.op {
                    Op::SaveComplete => super::super::proto::encode_big(&state, 0),
                    Op::ReadChunk => state[req.a0 as usize..(req.a0 + req.a1) as usize].to_vec(),
                    Op::LoadChunk => {
                        assert_eq!(req.a0 as usize, loaded.len());
                        loaded.extend_from_slice(&req.payload);
                        Vec::new()
                    }
                    Op::LoadState => {
                        loaded.extend_from_slice(&req.payload);
                        assert_eq!(req.a1 as usize, loaded.len());
                        Vec::new()
                    }
                    _ => Vec::new(),
                };
                if dev_end.send(&encode_reply(&Ok(reply)), &[]).is_err() {
                    break;
                }
            }
            loaded
        })
    }

    #[test]
    fn device_state_larger_than_a_message_travels_in_parts() {
        let state: Vec<u8> = (0..(1 << 20) + 12345).map(|i: u32| (i * 31 + 7) as u8).collect();
        let (host_end, dev_end) = Channel::pair().unwrap();
        let t = big_state_server(dev_end, state.clone());
        let mut d = fake(host_end);
        assert_eq!(d.save_complete().unwrap(), state);
        d.load_state(1, &state).unwrap();
        drop(d);
        assert_eq!(t.join().unwrap(), state);
    }

    #[test]
    fn oversized_or_inconsistent_big_replies_fence_the_device() {
        let mut too_big = ((MAX_DEVICE_DATA as u64) + 1).to_le_bytes().to_vec();
        too_big.push(0);
        let mut short = 100u64.to_le_bytes().to_vec();
        short.extend_from_slice(&[0, 1, 2]);
        let mut long = 2u64.to_le_bytes().to_vec();
        long.extend_from_slice(&[0, 1, 2, 3]);
        for garbage in [too_big, short, long, vec![0u8; 4]] {
            let (host_end, dev_end) = Channel::pair().unwrap();
            let mut d = fake(host_end);
            let g = garbage.clone();
            let t = std::thread::spawn(move || {
                let _ = dev_end.recv();
                let _ = dev_end.send(&encode_reply(&Ok(g)), &[]);
                // A chunk request (if any) gets the wrong length.
                if dev_end.recv().is_ok() {
                    let _ = dev_end.send(&encode_reply(&Ok(vec![1])), &[]);
                }
                dev_end
            });
            assert!(d.save_complete().is_err(), "{garbage:?} accepted");
            assert!(d.failed(), "{garbage:?}: device not fenced");
            drop(t);
        }
    }
}
