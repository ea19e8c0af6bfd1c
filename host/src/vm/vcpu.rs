//! vCPU threads: the run loop (serial and exit ports, bus dispatch), the
//! kick that interrupts `KVM_RUN` (a real-time signal whose handler sets
//! `immediate_exit`), pause/resume, and the vCPU state for migration.

use std::{
    cell::Cell,
    io::Write,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Condvar, Mutex, MutexGuard, Once,
    },
    thread::JoinHandle,
};

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_run, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};

use super::bus::{IoBus, IoSpace};

/// Serial output port (COM1 data register): bytes written are printed.
pub const PORT_SERIAL: u16 = 0x3f8;
/// COM1 line status register: reads say "transmitter empty".
pub const PORT_SERIAL_LSR: u16 = 0x3fd;
/// Exit port: a write stops the VM; the value is the exit code.
pub const PORT_EXIT: u16 = 0x501;
/// Idle port, the CPL-3 guest's `hlt`: a write parks the vCPU for the
/// value in microseconds (at most [`MAX_IDLE`]), or until the VM is paused
/// or stopped, instead of spinning on a host core.
pub const PORT_IDLE: u16 = 0x502;
/// Longest nap one write to [`PORT_IDLE`] buys.
pub const MAX_IDLE: std::time::Duration = std::time::Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM_CREATE_VCPU {index} failed")]
    Create { index: u32, source: kvm_ioctls::Error },
    #[error("vCPU {index}: {what} failed")]
    Ioctl { index: u32, what: &'static str, source: kvm_ioctls::Error },
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot spawn the thread of vCPU {index}")]
    Spawn { index: u32, source: std::io::Error },
    #[error("MSR list has too many entries")]
    Msrs,
}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote its exit code to [`PORT_EXIT`].
    Guest(u32),
    /// The host asked it to stop (`quit`, drop).
    Requested,
    /// A vCPU hit something it cannot go on from (triple fault, KVM error).
    Failed(String),
}

impl VmExit {
    /// The process exit code this outcome maps to.
    pub fn code(&self) -> i32 {
        match self {
            VmExit::Guest(c) => *c as i32,
            VmExit::Requested => 0,
            VmExit::Failed(_) => 1,
        }
    }
}

/// Where guest serial output goes.
pub type SerialSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// A serial sink that prints to stdout.
pub fn stdout_serial() -> SerialSink {
    Arc::new(|bytes: &[u8]| {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(bytes);
        let _ = out.flush();
    })
}

#[derive(Default)]
struct Ctl {
    pause: bool,
    /// vCPUs parked because of `pause`.
    parked: usize,
    /// vCPU threads that returned.
    finished: usize,
    exit: Option<VmExit>,
}

/// Run state shared by the vCPU threads and the controller.
pub struct RunControl {
    ctl: Mutex<Ctl>,
    cv: Condvar,
    /// Exits handled (IO and MMIO), for statistics and benches.
    pub exits: AtomicU64,
}

impl Default for RunControl {
    fn default() -> Self {
        Self { ctl: Mutex::new(Ctl::default()), cv: Condvar::new(), exits: AtomicU64::new(0) }
    }
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Record the outcome (the first one wins) and wake everyone.
    pub fn stop(&self, exit: VmExit) {
        let mut c = self.lock();
        if c.exit.is_none() {
            c.exit = Some(exit);
        }
        self.cv.notify_all();
    }

    pub fn exit(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    /// Block until the VM stopped.
    pub fn wait(&self) -> VmExit {
        let mut c = self.lock();
        loop {
            if let Some(e) = &c.exit {
                return e.clone();
            }
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Like [`RunControl::wait`] with a timeout.
    pub fn wait_timeout(&self, timeout: std::time::Duration) -> Option<VmExit> {
        let c = self.lock();
        let (c, _) =
            self.cv.wait_timeout_while(c, timeout, |c| c.exit.is_none()).unwrap_or_else(|p| p.into_inner());
        c.exit.clone()
    }

    pub(crate) fn request_pause(&self, on: bool) {
        let mut c = self.lock();
        c.pause = on;
        self.cv.notify_all();
    }

    /// Wait until `n` vCPU threads are parked or finished.
    pub(crate) fn wait_parked(&self, n: usize) {
        let mut c = self.lock();
        while c.parked + c.finished < n {
            c = self.cv.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    pub fn paused(&self) -> bool {
        self.lock().pause
    }

    /// Sleep up to `d` unless a pause or stop is (or becomes) pending.
    fn idle(&self, d: std::time::Duration) {
        let c = self.lock();
        let _ = self
            .cv
            .wait_timeout_while(c, d.min(MAX_IDLE), |c| !c.pause && c.exit.is_none())
            .unwrap_or_else(|p| p.into_inner());
    }
}

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: a const-initialised thread-local and one store.
    // `immediate_exit` also covers a signal that lands just before KVM_RUN.
    let p = KVM_RUN.with(Cell::get);
    if !p.is_null() {
        // SAFETY: the pointer is the live kvm_run mapping of this thread's
        // vCPU; it is cleared before the vCPU is dropped.
        unsafe { (*p).immediate_exit = 1 };
    }
}

fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .map_err(VcpuError::Signal);
    });
    result
}

/// One vCPU: its fd (locked by its thread while running) and its thread.
pub struct Vcpu {
    pub index: u32,
    fd: Arc<Mutex<VcpuFd>>,
    thread: Option<(JoinHandle<()>, libc::pthread_t)>,
}

/// What the run loop needs.
#[derive(Clone)]
pub struct VcpuContext {
    pub bus: Arc<IoBus>,
    pub serial: SerialSink,
    pub control: Arc<RunControl>,
}

impl Vcpu {
    pub fn new(vm: &kvm_ioctls::VmFd, kvm: &Kvm, index: u32) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let fd = vm.create_vcpu(index as u64).map_err(|source| VcpuError::Create { index, source })?;
        let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(|source| VcpuError::Ioctl {
            index,
            what: "KVM_GET_SUPPORTED_CPUID",
            source,
        })?;
        fd.set_cpuid2(&cpuid).map_err(|source| VcpuError::Ioctl { index, what: "KVM_SET_CPUID2", source })?;
        Ok(Self { index, fd: Arc::new(Mutex::new(fd)), thread: None })
    }

    /// Lock the vCPU fd (the vCPU must not be running: paused or not started).
    pub fn fd(&self) -> MutexGuard<'_, VcpuFd> {
        self.fd.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Start the run loop in its own thread.
    pub fn start(&mut self, ctx: VcpuContext) -> Result<(), VcpuError> {
        let fd = Arc::clone(&self.fd);
        let index = self.index;
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let _ = tx.send(unsafe { libc::pthread_self() });
                run_loop(index, &fd, &ctx);
                let mut c = ctx.control.lock();
                c.finished += 1;
                ctx.control.cv.notify_all();
            })
            .map_err(|source| VcpuError::Spawn { index, source })?;
        let tid = rx.recv().unwrap_or(0);
        self.thread = Some((handle, tid));
        Ok(())
    }

    /// Interrupt `KVM_RUN` so the thread looks at the run control.
    pub fn kick(&self) {
        if let Some((h, tid)) = &self.thread {
            if !h.is_finished() {
                // SAFETY: `tid` is a thread of this process that has not been
                // joined yet; the signal's handler is installed.
                unsafe { libc::pthread_kill(*tid, kick_signal()) };
            }
        }
    }

    /// Wait for the thread to return.
    pub fn join(&mut self) {
        if let Some((h, _)) = self.thread.take() {
            let _ = h.join();
        }
    }

    pub fn started(&self) -> bool {
        self.thread.is_some()
    }
}

fn le_value(d: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = d.len().min(8);
    b[..n].copy_from_slice(&d[..n]);
    u64::from_le_bytes(b)
}

fn run_loop(index: u32, fd: &Mutex<VcpuFd>, ctx: &VcpuContext) {
    let control = &ctx.control;
    let mut vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
    KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
    loop {
        {
            let mut c = control.lock();
            if c.exit.is_some() {
                break;
            }
            if c.pause {
                // Park with the fd unlocked so the controller can read state.
                c.parked += 1;
                control.cv.notify_all();
                drop(vcpu);
                while c.pause && c.exit.is_none() {
                    c = control.cv.wait(c).unwrap_or_else(|p| p.into_inner());
                }
                c.parked -= 1;
                drop(c);
                vcpu = fd.lock().unwrap_or_else(|p| p.into_inner());
                continue;
            }
        }
        let outcome = match vcpu.run() {
            Ok(exit) => handle_exit(index, exit, ctx),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VmExit::Failed(format!("vCPU {index}: KVM_RUN failed: {e}"))),
        };
        vcpu.set_kvm_immediate_exit(0);
        if let Some(outcome) = outcome {
            let outcome = match outcome {
                VmExit::Failed(msg) => VmExit::Failed(format!("{msg}; {}", describe(&vcpu))),
                other => other,
            };
            control.stop(outcome);
            break;
        }
    }
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
}

/// Handle one exit; `Some` stops the VM.
fn handle_exit(index: u32, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Option<VmExit> {
    ctx.control.exits.fetch_add(1, Ordering::Relaxed);
    match exit {
        VcpuExit::IoOut(PORT_SERIAL, data) => (ctx.serial)(data),
        VcpuExit::IoOut(PORT_EXIT, data) => return Some(VmExit::Guest(le_value(data) as u32)),
        VcpuExit::IoOut(PORT_IDLE, data) => {
            ctx.control.idle(std::time::Duration::from_micros(le_value(data)))
        }
        VcpuExit::IoIn(PORT_SERIAL_LSR, data) => data.fill(0x60),
        VcpuExit::IoOut(port, data) => {
            ctx.bus.write(IoSpace::Pio, port.into(), data);
        }
        VcpuExit::IoIn(port, data) => {
            ctx.bus.read(IoSpace::Pio, port.into(), data);
        }
        VcpuExit::MmioRead(addr, data) => {
            ctx.bus.read(IoSpace::Mmio, addr, data);
        }
        VcpuExit::MmioWrite(addr, data) => {
            ctx.bus.write(IoSpace::Mmio, addr, data);
        }
        VcpuExit::Intr => {}
        other => return Some(VmExit::Failed(format!("vCPU {index}: unexpected exit {other:?}"))),
    }
    None
}

fn describe(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cs={:#x} cr0={:#x} cr3={:#x}",
            r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3
        ),
        _ => "registers unavailable".to_owned(),
    }
}

/// The architectural state of one vCPU, as KVM gives it (migration).
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// XSAVE area (KVM_GET_FPU alone loses the SSE state on this host).
    pub xsave: XsaveArea,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debug_regs: kvm_debugregs,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// `kvm_xsave` with `Clone` (the binding has none).
#[derive(Serialize, Deserialize)]
pub struct XsaveArea(pub kvm_xsave);

impl Clone for XsaveArea {
    fn clone(&self) -> Self {
        Self(kvm_xsave { region: self.0.region, ..Default::default() })
    }
}

/// MSRs KVM lets us read on this vCPU (probed one at a time).
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    let Ok(list) = kvm.get_msr_index_list() else { return Vec::new() };
    list.as_slice()
        .iter()
        .copied()
        .filter(|&index| {
            Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
                .ok()
                .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                == Some(1)
        })
        .collect()
}

fn ioctl_err(index: u32, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Ioctl { index, what, source }
}

/// Read the whole state of a stopped vCPU.
pub fn save_state(index: u32, vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
    let entries: Vec<kvm_msr_entry> =
        msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs)?;
    let n = vcpu.get_msrs(&mut msrs).map_err(ioctl_err(index, "KVM_GET_MSRS"))?;
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(ioctl_err(index, "KVM_GET_REGS"))?,
        sregs: vcpu.get_sregs().map_err(ioctl_err(index, "KVM_GET_SREGS"))?,
        xsave: XsaveArea(vcpu.get_xsave().map_err(ioctl_err(index, "KVM_GET_XSAVE"))?),
        xcrs: vcpu.get_xcrs().map_err(ioctl_err(index, "KVM_GET_XCRS"))?,
        msrs: msrs.as_slice()[..n].to_vec(),
        lapic: vcpu.get_lapic().map_err(ioctl_err(index, "KVM_GET_LAPIC"))?,
        events: vcpu.get_vcpu_events().map_err(ioctl_err(index, "KVM_GET_VCPU_EVENTS"))?,
        mp_state: vcpu.get_mp_state().map_err(ioctl_err(index, "KVM_GET_MP_STATE"))?,
        debug_regs: vcpu.get_debug_regs().map_err(ioctl_err(index, "KVM_GET_DEBUGREGS"))?,
    })
}

/// Load a saved state into a vCPU that has not run yet (PVM only accepts a
/// CPL change through KVM_SET_SREGS before the first run). MSRs KVM refuses
/// are skipped one by one and returned.
pub fn restore_state(index: u32, vcpu: &VcpuFd, s: &VcpuState) -> Result<Vec<u32>, VcpuError> {
    vcpu.set_sregs(&s.sregs).map_err(ioctl_err(index, "KVM_SET_SREGS"))?;
    vcpu.set_xcrs(&s.xcrs).map_err(ioctl_err(index, "KVM_SET_XCRS"))?;
    // SAFETY: the area came from KVM_GET_XSAVE of a vCPU of the same host,
    // so its size matches what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(&s.xsave.0) }.map_err(ioctl_err(index, "KVM_SET_XSAVE"))?;
    let mut refused = Vec::new();
    for e in &s.msrs {
        let one = Msrs::from_entries(&[*e]).map_err(|_| VcpuError::Msrs)?;
        if vcpu.set_msrs(&one).unwrap_or(0) != 1 {
            refused.push(e.index);
        }
    }
    if !refused.is_empty() {
        log::debug!("vCPU {index}: MSRs refused on restore: {refused:#x?}");
    }
    vcpu.set_lapic(&s.lapic).map_err(ioctl_err(index, "KVM_SET_LAPIC"))?;
    vcpu.set_vcpu_events(&s.events).map_err(ioctl_err(index, "KVM_SET_VCPU_EVENTS"))?;
    vcpu.set_mp_state(s.mp_state).map_err(ioctl_err(index, "KVM_SET_MP_STATE"))?;
    vcpu.set_debug_regs(&s.debug_regs).map_err(ioctl_err(index, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_regs(&s.regs).map_err(ioctl_err(index, "KVM_SET_REGS"))?;
    Ok(refused)
}
