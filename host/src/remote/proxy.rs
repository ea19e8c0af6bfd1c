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
    ErrorKind, GuestRegion, Host, IoSpace, MemoryRegion, PlugInfo, PluginError, RSlice, RSliceMut, RStr,
};

use super::proto::{encode_reply, Channel, Op, ProtoError, Request, MAX_DATA};
use crate::vm::VmShared;

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

/// A mapping of the device process's memory backend into the host.
struct SharedMapping {
    addr: u64,
    size: u64,
    _fd: OwnedFd,
}

impl Drop for SharedMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map_shared`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.size as usize) };
    }
}

/// A device running in its own process.
pub struct RemoteDevice {
    id: String,
    io: Channel,
    child: Mutex<Child>,
    failed: Arc<AtomicBool>,
    svc: Option<JoinHandle<()>>,
    region: Option<GuestRegion>,
    _mapping: Option<SharedMapping>,
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
        let id = spec.id.clone();
        let svc_failed = Arc::clone(&failed);
        let svc_id = id.clone();
        let thread = std::thread::Builder::new()
            .name(format!("svc-{id}"))
            .spawn(move || serve(&svc, &svc_id, &host, &vm, &svc_failed))
            .map_err(|e| PluginError::io(format!("device {id}: service thread: {e}")))?;
        let mut dev = Self {
            id,
            io,
            child: Mutex::new(child),
            failed,
            svc: Some(thread),
            region: None,
            _mapping: None,
        };
        let hello = serde_json::json!({
            "library": spec.library, "kind": spec.kind, "id": spec.id, "config": spec.config,
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

    fn call_fds(&self, op: Op, a0: u64, a1: u64, payload: &[u8]) -> Result<(Vec<u8>, Vec<OwnedFd>), PluginError> {
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

    fn fetch_region(&mut self) -> Result<(), PluginError> {
        let (data, mut fds) = self.call_fds(Op::MemoryRegion, 0, 0, &[])?;
        if data.is_empty() {
            return Ok(());
        }
        let bad = |what: &str| {
            let e = PluginError::io(format!("device {}: memory region reply: {what}", self.id));
            self.fail(&e);
            e
        };
        if data.len() != 34 || fds.len() != 1 {
            return Err(bad("malformed"));
        }
        let w = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap_or([0; 8]));
        let (size, fd_offset, align, gpa) = (w(0), w(8), w(16), w(24));
        let (read_only, has_gpa) = (data[32] != 0, data[33] != 0);
        if size == 0 || size % 4096 != 0 || fd_offset % 4096 != 0 || size > 1 << 40 {
            return Err(bad("bad size or offset"));
        }
        let fd = fds.remove(0);
        let prot = if read_only { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a fresh shared mapping of a descriptor we own; checked below.
        let addr = unsafe {
            libc::mmap(std::ptr::null_mut(), size as usize, prot, libc::MAP_SHARED, fd.as_raw_fd(), fd_offset as libc::off_t)
        };
        if addr == libc::MAP_FAILED {
            return Err(bad(&format!("mmap: {}", std::io::Error::last_os_error())));
        }
        let memory = MemoryRegion { host_addr: addr as u64, size, fd: fd.as_raw_fd(), fd_offset, read_only };
        self.region = Some(GuestRegion {
            memory,
            requested_gpa: if has_gpa { Some(gpa) } else { None }.into(),
            align: align.max(4096),
        });
        self._mapping = Some(SharedMapping { addr: addr as u64, size, _fd: fd });
        Ok(())
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
                let e = PluginError::io(format!("read of {} bytes answered with {}", data.len(), reply.len()));
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
        let r = self.call(Op::StateVersion, 0, 0, &[])?;
        r.try_into().map(u32::from_le_bytes).map_err(|_| PluginError::io("bad state version reply"))
    }

    pub fn save_complete(&mut self) -> Result<Vec<u8>, PluginError> {
        self.call(Op::SaveComplete, 0, 0, &[])
    }

    pub fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        if data.len() > MAX_DATA {
            return Err(PluginError::migration("device state too large for the device-process protocol"));
        }
        self.call(Op::LoadState, u64::from(version), data.len() as u64, data).map(drop)
    }

    pub fn vm_state_changed(&mut self, running: bool) -> Result<(), PluginError> {
        self.call(Op::VmStateChanged, u64::from(running), 0, &[]).map(drop)
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
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

/// Serve the device process's host-service requests until it goes away.
fn serve(svc: &Channel, id: &str, host: &Host, vm: &Weak<VmShared>, failed: &AtomicBool) {
    loop {
        let (msg, _fds) = match svc.recv() {
            Ok(m) => m,
            Err(ProtoError::Closed) => return,
            Err(e) => {
                log::warn!("device {id}: service socket: {e}");
                return;
            }
        };
        if failed.load(Ordering::Acquire) {
            return;
        }
        let (reply, fds) = match Request::decode(&msg) {
            Ok(req) => handle(&req, id, host, vm),
            Err(e) => {
                log::warn!("device {id}: malformed service request: {e}");
                (Err(PluginError::new(ErrorKind::InvalidState, format!("malformed request: {e}"))), Vec::new())
            }
        };
        let raw: Vec<i32> = fds.to_vec();
        if let Err(e) = svc.send(&encode_reply(&reply), &raw) {
            log::debug!("device {id}: service reply: {e}");
            return;
        }
    }
}

type Reply = (Result<Vec<u8>, PluginError>, Vec<i32>);

fn handle(req: &Request, id: &str, host: &Host, vm: &Weak<VmShared>) -> Reply {
    let bad = |what: &str| PluginError::new(ErrorKind::InvalidState, format!("{what}: malformed request"));
    let u32_arg = |v: u64, what: &str| u32::try_from(v).map_err(|_| bad(what));
    let unit = |r: dmhost_plugin_api::RResult<(), PluginError>| r.into_result().map(|()| Vec::new());
    let space = || match req.payload.first() {
        Some(0) => Ok(IoSpace::Pio),
        Some(1) => Ok(IoSpace::Mmio),
        _ => Err(bad("I/O space")),
    };
    let r: Result<Vec<u8>, PluginError> = match req.op {
        Op::RegisterIo => space().and_then(|s| unit(host.register_io(s, req.a0, req.a1))),
        Op::UnregisterIo => space().and_then(|s| unit(host.unregister_io(s, req.a0, req.a1))),
        Op::PhysmapAdd => match <[u8; 8]>::try_from(req.payload.as_slice()) {
            Ok(off) => unit(host.physmap_add(req.a0, req.a1, u64::from_le_bytes(off))),
            Err(_) => Err(bad("physmap_add")),
        },
        Op::PhysmapRemove => unit(host.physmap_remove(req.a0, req.a1)),
        Op::SetIrqLine => u32_arg(req.a0, "set_irq_line").and_then(|g| unit(host.set_irq_line(g, req.a1 != 0))),
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
        other => Err(PluginError::unsupported(format!("{other:?} is not a host service"))),
    };
    (r, Vec::new())
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
            svc: None,
            region: None,
            _mapping: None,
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

    #[test]
    fn malformed_service_requests_get_errors() {
        let host = DeviceServices::new(Weak::new(), "x").host();
        let vm = Weak::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for op in [64u8, 65, 66, 67, 68, 69, 70, 71, 72, 73, 1, 5, 255] {
            for _ in 0..50 {
                let n = (rnd() % 24) as usize;
                let payload: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
                let mut raw = vec![op];
                raw.extend_from_slice(&rnd().to_le_bytes());
                raw.extend_from_slice(&rnd().to_le_bytes());
                raw.extend_from_slice(&payload);
                if let Ok(req) = Request::decode(&raw) {
                    let (r, fds) = handle(&req, "x", &host, &vm);
                    assert!(r.is_err(), "{req:?} succeeded without a VM");
                    assert!(fds.is_empty());
                }
            }
        }
    }
}
