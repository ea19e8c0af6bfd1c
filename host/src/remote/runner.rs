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
    DeviceBox, ErrorKind, HostServices, HostServices_TO, IoSpace, MemoryRegion, PlugInfo, PluginError, RResult,
    RSlice, RSliceMut, RStr,
};
use serde::Deserialize;

use super::proto::{encode_reply, Channel, Op, ProtoError, Request, MAX_DATA};

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
        let svc = self.svc.lock().unwrap_or_else(|p| p.into_inner());
        match svc.call(&Request::new(op, a0, a1, payload), &[]) {
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
                    log::warn!("INTx devfn {devfn:#x}: irqfd write failed: {}", std::io::Error::last_os_error());
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
    fn register_irqfd(&self, gsi: u32, _fd: i32, _resample_fd: i32) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!(
            "irqfds of a device process cannot be registered (GSI {gsi}); use set_intx"
        )))
    }
    fn unregister_irqfd(&self, gsi: u32, _fd: i32) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!("no irqfd registered on GSI {gsi}")))
    }
    fn register_ram(&self, name: RStr<'_>, _region: MemoryRegion) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!("RAM {name} of a device process cannot migrate yet")))
    }
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::unsupported(format!("RAM {name} is not registered")))
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
    let host = RunnerHost { svc: Arc::new(Mutex::new(svc)), lines: Default::default() };
    let (msg, _) = io.recv()?;
    let hello = Request::decode(&msg)?;
    if hello.op != Op::Hello {
        return Err(RunnerError::Hello(format!("expected Hello, got {:?}", hello.op)));
    }
    let hello: Hello = serde_json::from_slice(&hello.payload).map_err(|e| RunnerError::Hello(e.to_string()))?;
    let created = create(&hello, host);
    let mut device = match created {
        Ok(d) => {
            io.send(&encode_reply(&Ok(Vec::new())), &[])?;
            d
        }
        Err(e) => {
            io.send(&encode_reply(&Err(e)), &[])?;
            return Ok(());
        }
    };
    log::info!("device process for {} ({}) ready", hello.id, hello.kind);
    loop {
        let (msg, _) = match io.recv() {
            Ok(m) => m,
            Err(ProtoError::Closed) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (reply, fds) = match Request::decode(&msg) {
            Ok(req) => serve(&mut device, &req),
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

fn serve(d: &mut DeviceBox, req: &Request) -> (Result<Vec<u8>, PluginError>, Vec<RawFd>) {
    let small = |req: &Request| req.len_arg(8).map_err(|e| PluginError::new(ErrorKind::InvalidState, e.to_string()));
    let unit = |r: RResult<(), PluginError>| r.into_result().map(|()| Vec::new());
    let r = match req.op {
        Op::MemoryRegion => {
            return match d.memory_region().into_option() {
                None => (Ok(Vec::new()), Vec::new()),
                Some(r) => {
                    let m = r.memory;
                    let mut v = Vec::with_capacity(34);
                    for w in [m.size, m.fd_offset, r.align, r.requested_gpa.into_option().unwrap_or(0)] {
                        v.extend_from_slice(&w.to_le_bytes());
                    }
                    v.extend([u8::from(m.read_only), u8::from(r.requested_gpa.is_some())]);
                    (Ok(v), vec![m.fd])
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
        Op::SaveComplete => d.save_live_complete_precopy().into_result().and_then(|v| {
            if v.len() > MAX_DATA {
                Err(PluginError::migration("device state too large for the device-process protocol"))
            } else {
                Ok(v.into_vec())
            }
        }),
        Op::LoadState => unit(d.load_state(req.a0 as u32, RSlice::from(&req.payload[..]))),
        Op::VmStateChanged => unit(d.vm_state_changed(req.a0 != 0)),
        other => Err(PluginError::unsupported(format!("{other:?} is not a device request"))),
    };
    (r, Vec::new())
}
