//! The synthetic device: PCI config space, BAR0 registers, INTx/MSI/MSI-X
//! through eventfds, and the migration v2 state machine over [`crate::stream`].
//!
//! BAR0 (4 KiB, 32-bit memory), little-endian 32-bit registers:
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0x000 | ID (device << 16 \| vendor) | RO |
//! | 0x004 | VERSION | RO |
//! | 0x008 | CONTROL: bit0 IRQ enable, bit1 freeze state changes | RW |
//! | 0x00c | STATUS: bit0 interrupt pending | RW1C |
//! | 0x010 | DOORBELL: raises the interrupt (if enabled); with MSI-X on vector (value % 2) | WO |
//! | 0x014 | DOORBELL_COUNT | RO |
//! | 0x018/0x01c | GENERATION lo/hi: page changes so far | RO |
//! | 0x020 | STATE_PAGES | RO |
//! | 0x024 | PAGE_SELECT | RW |
//! | 0x028/0x02c | PAGE_GEN lo/hi of the selected page | RO |
//! | 0x030/0x034 | DIGEST lo/hi of the whole state (lo computes) | RO |
//! | 0x038 | TOUCH: writing N advances page N % pages | WO |
//! | 0x100–0x13c | SCRATCH[16] | RW |
//!
//! Config space has a PCI Express capability at [`EXP_CAP`] whose DevCap
//! advertises Function Level Reset: setting DevCtl bit 15 resets the
//! device as `reset` does (registers and config space to defaults).
//! | 0x800–0x81f | MSI-X table, [`MSIX_VECTORS`] entries | (emulated by vfio-pci) |
//! | 0xc00–0xc07 | MSI-X PBA | (emulated by vfio-pci) |
//!
//! Interrupts: MSI-X when its enable bit is set in config space, else MSI
//! when enabled, else INTx. As behind the kernel's vfio-pci, the MSI-X
//! table, the PBA and masking belong to the host: the device signals the
//! vector's eventfd and reads its table range as zeros.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
    time::Duration,
};

use dmhost_plugin_api::{
    vfio::{
        errno, is_arc, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_IRQ_INFO_AUTOMASKED,
        VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_INFO_MASKABLE, VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_MASK,
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY,
        VFIO_MIGRATION_STOP_COPY, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_INTX_IRQ_INDEX,
        VFIO_PCI_MSIX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_NUM_IRQS, VFIO_PCI_NUM_REGIONS,
        VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    },
    MigState, VfioDataStream, VfioDeviceInfo, VfioDriver, VfioError, VfioIrqInfo, VfioPrecopyInfo,
    VfioRegionInfo,
};

use crate::{
    config::SampleConfig,
    pages::Pages,
    stream::{full_stream_len, ReadOutcome, ResumeSession, SaveSession},
    DEVICE_ID, VENDOR_ID,
};

pub const BAR0_SIZE: u64 = 4096;
pub const CONFIG_SIZE: usize = 256;
pub const MSI_CAP: usize = 0x40;
pub const VENDOR_CAP: usize = 0x50;
pub const MSIX_CAP: usize = 0x60;
/// PCI Express capability (endpoint): DevCap advertises FLR, DevCtl bit 15
/// initiates it.
pub const EXP_CAP: usize = 0x70;
pub const EXP_DEVCAP_FLR: u32 = 1 << 28;
pub const EXP_DEVCTL_BCR_FLR: u16 = 1 << 15;
pub const MSIX_VECTORS: usize = 2;
pub const MSIX_TABLE_OFFSET: u32 = 0x800;
pub const MSIX_PBA_OFFSET: u32 = 0xc00;

pub const REG_ID: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_CONTROL: u64 = 0x008;
pub const REG_STATUS: u64 = 0x00c;
pub const REG_DOORBELL: u64 = 0x010;
pub const REG_DOORBELL_COUNT: u64 = 0x014;
pub const REG_GENERATION: u64 = 0x018;
pub const REG_STATE_PAGES: u64 = 0x020;
pub const REG_PAGE_SELECT: u64 = 0x024;
pub const REG_PAGE_GEN: u64 = 0x028;
pub const REG_DIGEST: u64 = 0x030;
pub const REG_TOUCH: u64 = 0x038;
pub const REG_SCRATCH: u64 = 0x100;
pub const SCRATCH_COUNT: usize = 16;

pub const CONTROL_IRQ_ENABLE: u32 = 1 << 0;
pub const CONTROL_FREEZE: u32 = 1 << 1;
pub const STATUS_IRQ_PENDING: u32 = 1 << 0;

/// Registers and config space: the non-page state, sent as the REGS record.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Regs {
    control: u32,
    status: u32,
    doorbells: u64,
    generation: u64,
    page_select: u32,
    digest_hi: u32,
    scratch: [u32; SCRATCH_COUNT],
    config: [u8; CONFIG_SIZE],
}

const REGS_LEN: usize = 4 + 4 + 8 + 8 + 4 + 4 + 4 * SCRATCH_COUNT + CONFIG_SIZE;

impl Regs {
    fn new() -> Self {
        Self {
            control: 0,
            status: 0,
            doorbells: 0,
            generation: 0,
            page_select: 0,
            digest_hi: 0,
            scratch: [0; SCRATCH_COUNT],
            config: initial_config(),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(REGS_LEN);
        v.extend_from_slice(&self.control.to_le_bytes());
        v.extend_from_slice(&self.status.to_le_bytes());
        v.extend_from_slice(&self.doorbells.to_le_bytes());
        v.extend_from_slice(&self.generation.to_le_bytes());
        v.extend_from_slice(&self.page_select.to_le_bytes());
        v.extend_from_slice(&self.digest_hi.to_le_bytes());
        for s in self.scratch {
            v.extend_from_slice(&s.to_le_bytes());
        }
        v.extend_from_slice(&self.config);
        v
    }

    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != REGS_LEN {
            return None;
        }
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        let mut scratch = [0u32; SCRATCH_COUNT];
        for (i, s) in scratch.iter_mut().enumerate() {
            *s = u32_at(32 + 4 * i);
        }
        let mut config = [0u8; CONFIG_SIZE];
        config.copy_from_slice(&b[32 + 4 * SCRATCH_COUNT..]);
        Some(Self {
            control: u32_at(0),
            status: u32_at(4),
            doorbells: u64_at(8),
            generation: u64_at(16),
            page_select: u32_at(24),
            digest_hi: u32_at(28),
            scratch,
            config,
        })
    }
}

/// The device's own config space (what a physical function would show).
fn initial_config() -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[6..8].copy_from_slice(&0x0010u16.to_le_bytes()); // status: capability list
    c[8] = 1; // revision
    c[9..12].copy_from_slice(&[0x00, 0x80, 0x11]); // class 0x118000: other data acquisition
    c[0x0e] = 0; // header type 0
    c[0x10..0x14].copy_from_slice(&0u32.to_le_bytes()); // BAR0: 32-bit memory
    c[0x2c..0x2e].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[0x34] = MSI_CAP as u8;
    c[0x3d] = 1; // INTA#
                 // MSI: 64-bit capable, one vector.
    c[MSI_CAP] = 0x05;
    c[MSI_CAP + 1] = VENDOR_CAP as u8;
    c[MSI_CAP + 2..MSI_CAP + 4].copy_from_slice(&0x0080u16.to_le_bytes());
    // A vendor-specific capability vfio-pci shows read-only.
    c[VENDOR_CAP..VENDOR_CAP + 8].copy_from_slice(&[0x09, MSIX_CAP as u8, 0x08, b'D', b'M', b'V', b'S', 1]);
    // MSI-X: table and PBA in BAR0 (BIR 0).
    c[MSIX_CAP] = 0x11;
    c[MSIX_CAP + 2..MSIX_CAP + 4].copy_from_slice(&(MSIX_VECTORS as u16 - 1).to_le_bytes());
    c[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&MSIX_TABLE_OFFSET.to_le_bytes());
    c[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&MSIX_PBA_OFFSET.to_le_bytes());
    c[MSIX_CAP + 1] = EXP_CAP as u8;
    // PCI Express v2 endpoint, 128-byte payload, FLR capable; the last
    // capability. DevCtl: relaxed ordering, no snoop (the defaults).
    c[EXP_CAP] = 0x10;
    c[EXP_CAP + 2..EXP_CAP + 4].copy_from_slice(&0x0002u16.to_le_bytes());
    c[EXP_CAP + 4..EXP_CAP + 8].copy_from_slice(&EXP_DEVCAP_FLR.to_le_bytes());
    c[EXP_CAP + 8..EXP_CAP + 10].copy_from_slice(&0x0810u16.to_le_bytes());
    c
}

/// Bits of config space the device lets software write (dword granular).
fn config_write_mask(offset: usize) -> u8 {
    match offset {
        0x04 => 0x47, // command: IO, MEM, MASTER, parity, (SERR in byte 1)
        0x05 => 0x05, // SERR, INTx disable
        0x10 => 0x00, // BAR0 low bits: type/size
        0x11 => 0xf0, // 4 KiB: bits 12+ writable
        0x12 | 0x13 => 0xff,
        0x3c => 0xff,
        o if o == MSI_CAP + 2 => 0x71, // enable, multiple message enable
        o if (MSI_CAP + 4..MSI_CAP + 14).contains(&o) => 0xff,
        o if o == MSIX_CAP + 3 => 0xc0, // enable, function mask
        _ => 0,
    }
}

#[derive(Default)]
struct Irqs {
    intx: Option<OwnedFd>,
    intx_unmask: Option<OwnedFd>,
    intx_masked: bool,
    msi: Option<OwnedFd>,
    msix: [Option<OwnedFd>; MSIX_VECTORS],
}

enum Session {
    None,
    Save(SaveSession),
    Resume(ResumeSession),
}

struct Inner {
    state: MigState,
    pages: Pages,
    regs: Regs,
    irqs: Irqs,
    session: Session,
    next_stream: u64,
    rng: u64,
    /// Resets so far (VFIO_DEVICE_RESET and FLR).
    resets: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    stop: AtomicBool,
    config: SampleConfig,
    migration_flags: u64,
}

/// The sample vendor device.
pub struct SampleDevice {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

fn dup_fd(fd: i32) -> Result<OwnedFd, VfioError> {
    if fd < 0 {
        return Err(VfioError::new(errno::EBADF, format!("fd {fd} is not a descriptor")));
    }
    // SAFETY: F_DUPFD_CLOEXEC on a caller-provided descriptor; the kernel
    // checks it and returns a new descriptor we own, or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(VfioError::new(errno::EBADF, format!("fd {fd}: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `new` is a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

fn signal(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if r != 8 {
        log::warn!("vendor-sample: interrupt eventfd write failed: {}", std::io::Error::last_os_error());
    }
}

/// Consume a pending count on an eventfd without blocking.
fn poll_eventfd(fd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready <= 0 || pfd.revents & libc::POLLIN == 0 {
        return false;
    }
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from an fd we own.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    r == 8
}

impl Inner {
    fn mutate(&mut self, i: usize) {
        self.pages.bump(i);
        self.regs.generation = self.regs.generation.wrapping_add(1);
        if let Session::Save(s) = &mut self.session {
            s.page_changed(i);
        }
    }

    fn next_random_page(&mut self) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % self.pages.count() as u64) as usize
    }

    /// Raise the device interrupt: MSI-X `vector` or MSI when enabled in
    /// config space, else INTx.
    fn raise_irq(&mut self, vector: usize) {
        self.regs.status |= STATUS_IRQ_PENDING;
        if self.regs.control & CONTROL_IRQ_ENABLE == 0 || !self.state.is_running() {
            return;
        }
        if self.regs.config[MSIX_CAP + 3] & 0x80 != 0 {
            if let Some(fd) = self.irqs.msix.get(vector).and_then(Option::as_ref) {
                signal(fd);
            }
            return;
        }
        let msi_enabled = self.regs.config[MSI_CAP + 2] & 1 != 0;
        if msi_enabled {
            if let Some(fd) = &self.irqs.msi {
                signal(fd);
            }
            return;
        }
        let intx_disabled = self.regs.config[0x05] & 0x04 != 0;
        if let (Some(fd), false, false) = (&self.irqs.intx, self.irqs.intx_masked, intx_disabled) {
            signal(fd);
            self.irqs.intx_masked = true; // automasked until unmask
        }
    }

    fn unmask_intx(&mut self) {
        self.irqs.intx_masked = false;
        // Level-triggered: still pending means it fires again.
        if self.regs.status & STATUS_IRQ_PENDING != 0 {
            self.raise_irq(0);
        }
    }

    fn bar0_read32(&mut self, off: u64) -> u32 {
        let lo = |v: u64| v as u32;
        let hi = |v: u64| (v >> 32) as u32;
        match off {
            REG_ID => (u32::from(DEVICE_ID) << 16) | u32::from(VENDOR_ID),
            REG_VERSION => 1,
            REG_CONTROL => self.regs.control,
            REG_STATUS => self.regs.status,
            REG_DOORBELL_COUNT => self.regs.doorbells as u32,
            REG_GENERATION => lo(self.regs.generation),
            o if o == REG_GENERATION + 4 => hi(self.regs.generation),
            REG_STATE_PAGES => self.pages.count() as u32,
            REG_PAGE_SELECT => self.regs.page_select,
            REG_PAGE_GEN | 0x2c => {
                let i = self.regs.page_select as usize;
                let g = if i < self.pages.count() { self.pages.generation(i) } else { u64::MAX };
                if off == REG_PAGE_GEN {
                    lo(g)
                } else {
                    hi(g)
                }
            }
            REG_DIGEST => {
                let d = self.pages.digest();
                self.regs.digest_hi = hi(d);
                lo(d)
            }
            o if o == REG_DIGEST + 4 => self.regs.digest_hi,
            o if (REG_SCRATCH..REG_SCRATCH + 4 * SCRATCH_COUNT as u64).contains(&o) => {
                self.regs.scratch[((o - REG_SCRATCH) / 4) as usize]
            }
            _ => 0,
        }
    }

    fn bar0_write32(&mut self, off: u64, v: u32) {
        match off {
            REG_CONTROL => self.regs.control = v & (CONTROL_IRQ_ENABLE | CONTROL_FREEZE),
            REG_STATUS => self.regs.status &= !v,
            REG_DOORBELL => {
                self.regs.doorbells = self.regs.doorbells.wrapping_add(1);
                self.raise_irq(v as usize % MSIX_VECTORS);
            }
            REG_PAGE_SELECT => self.regs.page_select = v,
            REG_TOUCH => {
                let i = v as usize % self.pages.count();
                self.mutate(i);
            }
            o if (REG_SCRATCH..REG_SCRATCH + 4 * SCRATCH_COUNT as u64).contains(&o) => {
                self.regs.scratch[((o - REG_SCRATCH) / 4) as usize] = v;
            }
            _ => {}
        }
    }

    /// Registers and config space back to defaults, migration back to
    /// RUNNING (VFIO_DEVICE_RESET, or an FLR through config space).
    fn reset(&mut self) {
        self.session = Session::None;
        self.state = MigState::Running;
        let generation = self.regs.generation;
        self.regs = Regs { generation, ..Regs::new() };
        self.irqs.intx_masked = false;
        self.resets = self.resets.wrapping_add(1);
        log::info!("vendor-sample: reset");
    }

    fn check_range(index: u32, size: u64, offset: u64, len: usize) -> Result<(), VfioError> {
        if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(VfioError::invalid(format!(
                "region {index}: access {offset:#x}+{len} outside its {size} bytes"
            )));
        }
        Ok(())
    }

    fn stream_mismatch(&self, stream: VfioDataStream) -> VfioError {
        VfioError::bad_stream(format!("no open migration session {} in state {}", stream.id, self.state))
    }
}

impl SampleDevice {
    pub fn new(config: SampleConfig) -> Self {
        let mut flags = VFIO_MIGRATION_STOP_COPY;
        if config.pre_copy {
            flags |= VFIO_MIGRATION_PRE_COPY;
        }
        if config.p2p {
            flags |= VFIO_MIGRATION_P2P;
        }
        let inner = Inner {
            state: MigState::Running,
            pages: Pages::new(config.pages()),
            regs: Regs::new(),
            irqs: Irqs::default(),
            session: Session::None,
            next_stream: 1,
            rng: config.seed | 1,
            resets: 0,
        };
        let background = config.background;
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            stop: AtomicBool::new(false),
            config,
            migration_flags: flags,
        });
        let thread = background.then(|| {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vendor-sample".into())
                .spawn(move || background_loop(&s))
                .map_err(|e| log::warn!("vendor-sample: no background thread: {e}"))
                .ok()
        });
        Self { shared, thread: thread.flatten() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Digest of the internal state (for tests and the DIGEST register).
    pub fn state_digest(&self) -> u64 {
        self.lock().pages.digest()
    }

    /// A copy of the internal state and the register block.
    pub fn snapshot(&self) -> (Vec<u8>, Vec<u8>) {
        let g = self.lock();
        (g.pages.bytes().to_vec(), g.regs.encode())
    }

    /// Resets so far (VFIO_DEVICE_RESET and FLR through config space).
    pub fn resets(&self) -> u64 {
        self.lock().resets
    }

    /// Change page `i` now (as the background thread does).
    pub fn touch(&self, i: usize) {
        let mut g = self.lock();
        let i = i % g.pages.count();
        g.mutate(i);
    }

    /// MSI-X TRIGGER: `fds[i]` signals vector `start + i` (-1 releases
    /// it); no fds release every vector. The range is checked by the caller.
    fn set_msix_triggers(&self, start: usize, fds: &[i32]) -> Result<(), VfioError> {
        let mut new = Vec::with_capacity(fds.len());
        for &fd in fds {
            new.push(if fd >= 0 { Some(dup_fd(fd)?) } else { None });
        }
        let mut g = self.lock();
        if fds.is_empty() {
            g.irqs.msix = Default::default();
        }
        for (slot, fd) in g.irqs.msix.iter_mut().skip(start).zip(new) {
            *slot = fd;
        }
        Ok(())
    }

    fn arc(&self, g: &mut Inner, to: MigState) -> Result<Option<VfioDataStream>, VfioError> {
        use MigState::*;
        let from = g.state;
        let id = g.next_stream;
        let opened = match (from, to) {
            (Running, PreCopy) | (RunningP2p, PreCopyP2p) | (Stop, StopCopy) => {
                g.session = Session::Save(SaveSession::new(id, g.pages.count(), REGS_LEN));
                true
            }
            (Stop, Resuming) => {
                g.session = Session::Resume(ResumeSession::new(id, REGS_LEN));
                true
            }
            (Resuming, Stop) => {
                let session = std::mem::replace(&mut g.session, Session::None);
                if let Session::Resume(r) = session {
                    if r.received() > 0 {
                        let applied = r
                            .finish(&g.pages)
                            .map_err(|e| e.to_string())
                            .and_then(|b| Regs::decode(&b).ok_or_else(|| "bad register block".to_owned()));
                        match applied {
                            Ok(regs) => {
                                g.regs = regs;
                                log::info!(
                                    "vendor-sample: loaded state digest {:#018x} ({} pages), verified against the source's",
                                    g.pages.digest(),
                                    g.pages.count()
                                );
                            }
                            Err(e) => {
                                g.state = Error;
                                log::warn!("vendor-sample: resume failed: {e}");
                                return Err(VfioError::invalid(format!("RESUMING -> STOP: {e}")));
                            }
                        }
                    }
                }
                false
            }
            (StopCopy, Stop) => {
                g.session = Session::None;
                log::info!(
                    "vendor-sample: saved state digest {:#018x} ({} pages)",
                    g.pages.digest(),
                    g.pages.count()
                );
                false
            }
            (PreCopy | PreCopyP2p, Running | RunningP2p) => {
                g.session = Session::None;
                false
            }
            _ => false,
        };
        g.state = to;
        if opened {
            g.next_stream += 1;
            return Ok(Some(VfioDataStream { id }));
        }
        Ok(None)
    }
}

fn background_loop(shared: &Shared) {
    let tick = Duration::from_micros(shared.config.tick_us);
    while !shared.stop.load(Ordering::Relaxed) {
        std::thread::sleep(tick);
        let mut g = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = &g.irqs.intx_unmask {
            if poll_eventfd(fd) {
                g.unmask_intx();
            }
        }
        if g.state.is_running() && g.regs.control & CONTROL_FREEZE == 0 {
            for _ in 0..shared.config.dirty_pages_per_tick {
                let i = g.next_random_page();
                g.mutate(i);
            }
        }
    }
}

impl Drop for SampleDevice {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl VfioDriver for SampleDevice {
    fn device_info(&self) -> VfioDeviceInfo {
        VfioDeviceInfo {
            flags: VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET,
            num_regions: VFIO_PCI_NUM_REGIONS,
            num_irqs: VFIO_PCI_NUM_IRQS,
            migration_flags: self.shared.migration_flags,
        }
    }

    fn region_info(&self, index: u32) -> Result<VfioRegionInfo, VfioError> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let (flags, size) = match index {
            0 => (rw, BAR0_SIZE),
            VFIO_PCI_CONFIG_REGION_INDEX => (rw, CONFIG_SIZE as u64),
            i if i < VFIO_PCI_NUM_REGIONS => (0, 0),
            _ => return Err(VfioError::invalid(format!("no region {index}"))),
        };
        Ok(VfioRegionInfo { index, flags, size })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<(), VfioError> {
        let mut g = self.lock();
        match index {
            0 => {
                Inner::check_range(index, BAR0_SIZE, offset, data.len())?;
                if g.state == MigState::Error {
                    return Err(VfioError::io("device is in ERROR"));
                }
                // Each dword the access touches is read once (DIGEST computes).
                let first = offset & !3;
                let last = (offset + data.len() as u64 - 1) & !3;
                let mut bytes = Vec::with_capacity(data.len() + 8);
                for dword in (first..=last).step_by(4) {
                    bytes.extend_from_slice(&g.bar0_read32(dword).to_le_bytes());
                }
                let skip = (offset - first) as usize;
                data.copy_from_slice(&bytes[skip..skip + data.len()]);
                Ok(())
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                Inner::check_range(index, CONFIG_SIZE as u64, offset, data.len())?;
                let o = offset as usize;
                data.copy_from_slice(&g.regs.config[o..o + data.len()]);
                Ok(())
            }
            _ => Err(VfioError::invalid(format!("region {index} is not readable"))),
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        let mut g = self.lock();
        match index {
            0 => {
                Inner::check_range(index, BAR0_SIZE, offset, data.len())?;
                if !matches!(
                    g.state,
                    MigState::Running | MigState::PreCopy | MigState::RunningP2p | MigState::PreCopyP2p
                ) {
                    return Err(VfioError::io(format!("device is in {}: BAR writes refused", g.state)));
                }
                if !offset.is_multiple_of(4) || !data.len().is_multiple_of(4) {
                    return Err(VfioError::invalid(format!(
                        "BAR0 write {offset:#x}+{}: registers take aligned 32-bit writes",
                        data.len()
                    )));
                }
                for (i, w) in data.chunks_exact(4).enumerate() {
                    let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                    g.bar0_write32(offset + 4 * i as u64, v);
                }
                Ok(())
            }
            VFIO_PCI_CONFIG_REGION_INDEX => {
                Inner::check_range(index, CONFIG_SIZE as u64, offset, data.len())?;
                let mut flr = false;
                for (i, &b) in data.iter().enumerate() {
                    let o = offset as usize + i;
                    let mask = config_write_mask(o);
                    g.regs.config[o] = (g.regs.config[o] & !mask) | (b & mask);
                    flr |= o == EXP_CAP + 9 && b & (EXP_DEVCTL_BCR_FLR >> 8) as u8 != 0;
                }
                if flr {
                    log::info!("vendor-sample: function level reset");
                    g.reset();
                }
                Ok(())
            }
            _ => Err(VfioError::invalid(format!("region {index} is not writable"))),
        }
    }

    fn irq_info(&self, index: u32) -> Result<VfioIrqInfo, VfioError> {
        let (flags, count) = match index {
            VFIO_PCI_INTX_IRQ_INDEX => {
                (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED, 1)
            }
            VFIO_PCI_MSI_IRQ_INDEX => (VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE, 1),
            // Vectors are set one by one (dynamic allocation): no NORESIZE.
            VFIO_PCI_MSIX_IRQ_INDEX => (VFIO_IRQ_INFO_EVENTFD, MSIX_VECTORS as u32),
            i if i < VFIO_PCI_NUM_IRQS => (0, 0),
            _ => return Err(VfioError::invalid(format!("no irq index {index}"))),
        };
        Ok(VfioIrqInfo { index, flags, count })
    }

    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[i32]) -> Result<(), VfioError> {
        let count = self.irq_info(index)?.count;
        if count == 0 {
            return Err(VfioError::invalid(format!("irq index {index} has no vectors")));
        }
        if u64::from(start) + fds.len() as u64 > u64::from(count) {
            return Err(VfioError::invalid(format!(
                "irq index {index}: vectors {start}+{} beyond {count}",
                fds.len()
            )));
        }
        if (index, action) == (VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) {
            return self.set_msix_triggers(start as usize, fds);
        }
        let fd = match fds.first() {
            Some(&fd) if fd >= 0 => Some(dup_fd(fd)?),
            _ => None,
        };
        let mut g = self.lock();
        match (index, action) {
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) => {
                g.irqs.intx = fd;
                g.irqs.intx_masked = false;
            }
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK) => {
                if fds.is_empty() {
                    g.unmask_intx();
                } else {
                    g.irqs.intx_unmask = fd;
                }
            }
            (VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_MASK) if fds.is_empty() => {
                g.irqs.intx_masked = true;
            }
            (VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER) => g.irqs.msi = fd,
            _ => {
                return Err(VfioError::invalid(format!(
                    "irq index {index}: action {action:#x} with {} fds is not supported",
                    fds.len()
                )))
            }
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), VfioError> {
        self.lock().reset();
        Ok(())
    }

    fn set_state(&self, target: u32) -> Result<Option<VfioDataStream>, VfioError> {
        let to = MigState::from_raw(target)
            .ok_or_else(|| VfioError::invalid(format!("{target} is not a migration state")))?;
        let mut g = self.lock();
        let from = g.state;
        if !is_arc(from, to, self.shared.migration_flags) {
            return Err(VfioError::invalid(format!("{from} -> {to} is not an arc of this device")));
        }
        let r = self.arc(&mut g, to);
        log::debug!("vendor-sample: {from} -> {to}: {r:?}");
        r
    }

    fn get_state(&self) -> u32 {
        self.lock().state.raw()
    }

    fn stop_copy_size(&self) -> Result<u64, VfioError> {
        let g = self.lock();
        Ok(match &g.session {
            Session::Save(s) => s.remaining_stop_copy(),
            _ => full_stream_len(g.pages.count(), REGS_LEN),
        })
    }

    fn precopy_info(&self, stream: VfioDataStream) -> Result<VfioPrecopyInfo, VfioError> {
        let g = self.lock();
        if !matches!(g.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(VfioError::invalid(format!("precopy info in state {}", g.state)));
        }
        match &g.session {
            Session::Save(s) if s.id == stream.id => {
                let (initial_bytes, dirty_bytes) = s.precopy_info();
                Ok(VfioPrecopyInfo { initial_bytes, dirty_bytes })
            }
            _ => Err(g.stream_mismatch(stream)),
        }
    }

    fn read_migration_data(&self, stream: VfioDataStream, buf: &mut [u8]) -> Result<usize, VfioError> {
        let mut g = self.lock();
        let stop_copy = g.state == MigState::StopCopy;
        let inner = &mut *g;
        let (pages, regs) = (&inner.pages, &inner.regs);
        match &mut inner.session {
            Session::Save(s) if s.id == stream.id => match s.read(buf, pages, stop_copy, || regs.encode()) {
                ReadOutcome::Data(n) => Ok(n),
                ReadOutcome::End => Ok(0),
                ReadOutcome::NothingNow => Err(VfioError::no_data()),
            },
            _ => Err(inner.stream_mismatch(stream)),
        }
    }

    fn write_migration_data(&self, stream: VfioDataStream, buf: &[u8]) -> Result<usize, VfioError> {
        let mut g = self.lock();
        let inner = &mut *g;
        match &mut inner.session {
            Session::Resume(r) if r.id == stream.id && inner.state == MigState::Resuming => {
                r.write(buf, &mut inner.pages).map_err(|e| VfioError::invalid(format!("migration data: {e}")))
            }
            _ => Err(inner.stream_mismatch(stream)),
        }
    }
}
