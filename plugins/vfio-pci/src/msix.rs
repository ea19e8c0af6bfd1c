//! MSI-X emulation, after QEMU's hw/pci/msix.c and hw/vfio/pci.c.
//!
//! The guest's MSI-X table and PBA live in a BAR of the device, but the
//! device never sees them: like the kernel's vfio-pci, the front end keeps
//! a shadow table ([`MsixTable`]), traps every access to the pages that
//! hold it (they are never mapped directly), and turns the guest's
//! entries into host interrupts ([`MsixVectors`]): each vector the device
//! may signal gets an eventfd, handed to the backend with
//! `set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, TRIGGER, start = vector)`. While
//! the vector is unmasked (and the function is not masked) the eventfd is
//! routed to KVM as an MSI (`register_msi_irqfd`); while masked it stays
//! with the backend but unrouted, so a signal only counts up the eventfd.
//! PBA reads and unmasking drain that count into the pending bit, and an
//! unmask with the bit set delivers the message once.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use dmhost_plugin_api::{
    vfio::{VFIO_IRQ_INFO_NORESIZE, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_PCI_MSIX_IRQ_INDEX},
    ErrorKind, Host, PluginError,
};

use crate::{
    backend::{BackendResult, VfioBackend},
    config_space::{MsixCap, MSIX_ENTRY_SIZE},
};

const PAGE: u64 = 4096;
/// Vector control: bit 0 masks the vector; the other bits are reserved.
const VECTOR_MASKED: u32 = 1;

/// One table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub addr_lo: u32,
    pub addr_hi: u32,
    pub data: u32,
    pub ctrl: u32,
}

impl Default for Entry {
    /// After reset every vector is masked (PCI spec 6.8.2.9).
    fn default() -> Self {
        Self { addr_lo: 0, addr_hi: 0, data: 0, ctrl: VECTOR_MASKED }
    }
}

impl Entry {
    pub fn address(&self) -> u64 {
        u64::from(self.addr_lo) | (u64::from(self.addr_hi) << 32)
    }
    pub fn masked(&self) -> bool {
        self.ctrl & VECTOR_MASKED != 0
    }
    fn dword(&self, i: u64) -> u32 {
        [self.addr_lo, self.addr_hi, self.data, self.ctrl][(i & 3) as usize]
    }
    fn set_dword(&mut self, i: u64, v: u32) {
        match i & 3 {
            0 => self.addr_lo = v,
            1 => self.addr_hi = v,
            2 => self.data = v,
            _ => self.ctrl = v & VECTOR_MASKED,
        }
    }
}

/// Which structure an access hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Table,
    Pba,
}

/// The shadow MSI-X table and pending bits of one function.
#[derive(Debug, Clone)]
pub struct MsixTable {
    cap: MsixCap,
    entries: Vec<Entry>,
    pending: Vec<bool>,
}

impl MsixTable {
    pub fn new(cap: MsixCap) -> Self {
        let n = usize::from(cap.table_size);
        Self { cap, entries: vec![Entry::default(); n], pending: vec![false; n] }
    }

    pub fn cap(&self) -> MsixCap {
        self.cap
    }

    pub fn entry(&self, vector: usize) -> Option<Entry> {
        self.entries.get(vector).copied()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn pending(&self, vector: usize) -> bool {
        self.pending.get(vector).copied().unwrap_or(false)
    }

    pub fn set_pending(&mut self, vector: usize, on: bool) {
        if let Some(p) = self.pending.get_mut(vector) {
            *p = on;
        }
    }

    /// Back to the reset state: every vector masked and cleared, nothing pending.
    pub fn reset(&mut self) {
        self.entries.fill(Entry::default());
        self.pending.fill(false);
    }

    /// The structure `[offset, offset+len)` of BAR `bar` overlaps, if any.
    pub fn hit(&self, bar: u32, offset: u64, len: usize) -> Option<Hit> {
        let end = offset.saturating_add(len as u64);
        let overlaps = |b: u32, at: u64, n: u64| b == bar && offset < at + n && at < end;
        if overlaps(self.cap.table_bar, self.cap.table_offset, self.cap.table_len()) {
            Some(Hit::Table)
        } else if overlaps(self.cap.pba_bar, self.cap.pba_offset, self.cap.pba_len()) {
            Some(Hit::Pba)
        } else {
            None
        }
    }

    /// The page-aligned ranges of each BAR that must be trapped, as
    /// (BAR, offset, length); table and PBA sharing pages give one range.
    pub fn trap_ranges(&self) -> Vec<(u32, u64, u64)> {
        let page = |bar: u32, at: u64, n: u64| (bar, at & !(PAGE - 1), (at + n).next_multiple_of(PAGE));
        let (tb, ts, te) = page(self.cap.table_bar, self.cap.table_offset, self.cap.table_len());
        let (pb, ps, pe) = page(self.cap.pba_bar, self.cap.pba_offset, self.cap.pba_len());
        if tb == pb && ts <= pe && ps <= te {
            return vec![(tb, ts.min(ps), te.max(pe) - ts.min(ps))];
        }
        vec![(tb, ts, te - ts), (pb, ps, pe - ps)]
    }

    /// The one range of BAR `bar` a direct mapping leaves trapped: from
    /// the first to the last trapped page (one hole, however laid out).
    pub fn trap_in(&self, bar: u32) -> Option<(u64, u64)> {
        let ranges: Vec<_> = self.trap_ranges().into_iter().filter(|r| r.0 == bar).collect();
        let start = ranges.iter().map(|r| r.1).min()?;
        let end = ranges.iter().map(|r| r.1 + r.2).max()?;
        Some((start, end - start))
    }

    /// The offset into the structure, when the access is one the table
    /// serves: 4 or 8 bytes, naturally aligned, wholly inside it.
    fn inside(&self, hit: Hit, offset: u64, len: usize) -> Option<u64> {
        let (base, size) = match hit {
            Hit::Table => (self.cap.table_offset, self.cap.table_len()),
            Hit::Pba => (self.cap.pba_offset, self.cap.pba_len()),
        };
        let rel = offset.checked_sub(base)?;
        let ok = matches!(len, 4 | 8) && rel.is_multiple_of(len as u64) && rel + len as u64 <= size;
        ok.then_some(rel)
    }

    fn read_dword(&self, hit: Hit, rel: u64) -> u32 {
        match hit {
            Hit::Table => self.entries[(rel / MSIX_ENTRY_SIZE) as usize].dword(rel / 4),
            // Bits of vectors past the table size read as 0.
            Hit::Pba => (0..32).fold(0, |acc, bit| {
                let vector = (rel * 8 + bit) as usize;
                acc | (u32::from(self.pending(vector)) << bit)
            }),
        }
    }

    /// Serve a read the structures overlap: all ones for an access the
    /// table does not serve (wrong size, unaligned, straddling its end).
    pub fn read(&self, hit: Hit, offset: u64, data: &mut [u8]) {
        let Some(rel) = self.inside(hit, offset, data.len()) else {
            log::debug!("vfio-pci: MSI-X {hit:?} read of {} bytes at {offset:#x} refused", data.len());
            data.fill(0xff);
            return;
        };
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&self.read_dword(hit, rel + 4 * i as u64).to_le_bytes());
        }
    }

    /// Apply a write; returns the vector whose entry changed. The PBA is
    /// read-only, and accesses the table does not serve are dropped.
    pub fn write(&mut self, hit: Hit, offset: u64, data: &[u8]) -> Option<usize> {
        let Some(rel) = self.inside(hit, offset, data.len()).filter(|_| hit == Hit::Table) else {
            log::debug!("vfio-pci: MSI-X {hit:?} write of {} bytes at {offset:#x} ignored", data.len());
            return None;
        };
        let vector = (rel / MSIX_ENTRY_SIZE) as usize;
        let before = self.entries[vector];
        for (i, w) in data.chunks_exact(4).enumerate() {
            let dword = rel / 4 + i as u64;
            self.entries[vector].set_dword(dword, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
        (self.entries[vector] != before).then_some(vector)
    }

    /// Migration: the entries then the pending bits, little endian.
    pub fn save(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.entries.len() * 17);
        for e in &self.entries {
            for d in 0..4 {
                v.extend_from_slice(&e.dword(d).to_le_bytes());
            }
        }
        v.extend(self.pending.iter().map(|&p| u8::from(p)));
        v
    }

    /// Undo [`Self::save`] for a table of the same size.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), String> {
        let n = self.entries.len();
        if saved.len() != n * 17 {
            return Err(format!("saved MSI-X state is {} bytes, {n} vectors need {}", saved.len(), n * 17));
        }
        let (table, pending) = saved.split_at(n * 16);
        for (e, raw) in self.entries.iter_mut().zip(table.chunks_exact(16)) {
            for (d, w) in raw.chunks_exact(4).enumerate() {
                e.set_dword(d as u64, u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
            }
        }
        for (p, &b) in self.pending.iter_mut().zip(pending) {
            *p = b & 1 != 0;
        }
        Ok(())
    }
}

/// A vector's eventfd, held by the backend, and the message it is routed
/// with (`None` while masked).
struct Vector {
    fd: OwnedFd,
    routed: Option<(u64, u32)>,
}

/// Whether an eventfd was signalled since it was last drained (consumes
/// the count; never blocks: the eventfd is non-blocking).
fn drain(fd: &OwnedFd) -> bool {
    let mut buf = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live buffer from an eventfd we own.
    let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    r == 8 && u64::from_ne_bytes(buf) > 0
}

fn signal(fd: &OwnedFd) -> std::io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    let r = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if r == 8 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The shadow table and the host side of its vectors.
pub struct MsixVectors {
    pub table: MsixTable,
    vectors: Vec<Option<Vector>>,
    /// Vectors the backend can signal.
    usable: usize,
    /// The backend cannot add vectors while MSI-X is enabled
    /// (`VFIO_IRQ_INFO_NORESIZE`): growing re-enables them all, as QEMU
    /// does without dynamic MSI-X allocation.
    noresize: bool,
    /// Vectors `0..enabled` are enabled in a NORESIZE backend.
    enabled: usize,
    warned: bool,
}

/// What the function's MSI-X state asks of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Control {
    /// Enabled in config space and the device plugged.
    pub enabled: bool,
    pub function_masked: bool,
}

impl MsixVectors {
    pub fn new(cap: MsixCap, backend: &dyn VfioBackend) -> Self {
        let info = backend.irq_info(VFIO_PCI_MSIX_IRQ_INDEX).unwrap_or_default();
        let count = info.count;
        let usable = usize::from(cap.table_size).min(count as usize);
        if usable < usize::from(cap.table_size) {
            log::info!(
                "vfio-pci: {}: MSI-X table has {} vectors, the backend signals {usable}",
                backend.describe(),
                cap.table_size
            );
        }
        Self {
            table: MsixTable::new(cap),
            vectors: (0..usable).map(|_| None).collect(),
            usable,
            noresize: info.flags & VFIO_IRQ_INFO_NORESIZE != 0,
            enabled: 0,
            warned: false,
        }
    }

    /// Whether `vector` has an eventfd with the backend (for tests).
    pub fn has_eventfd(&self, vector: usize) -> bool {
        self.vectors.get(vector).is_some_and(|v| v.is_some())
    }

    /// Bring one vector in line with the table and `ctl`.
    pub fn sync_vector(
        &mut self,
        vector: usize,
        ctl: Control,
        host: &Host,
        backend: &dyn VfioBackend,
        id: &str,
    ) -> Result<(), PluginError> {
        let Some(entry) = self.table.entry(vector).filter(|_| vector < self.usable) else {
            return Ok(());
        };
        let wanted = ctl.enabled && entry.address() != 0;
        if !wanted {
            if let Some(v) = self.vectors[vector].take() {
                unroute(host, &v, id);
                if let Err(e) = backend.set_irqs(
                    VFIO_PCI_MSIX_IRQ_INDEX,
                    VFIO_IRQ_SET_ACTION_TRIGGER,
                    vector as u32,
                    &[-1],
                ) {
                    log::warn!("vfio-pci {id}: MSI-X vector {vector}: releasing its eventfd: {e}");
                }
            }
            return Ok(());
        }
        if self.vectors[vector].is_none() {
            let fd = crate::device::eventfd()?;
            self.give_backend(vector, &fd, backend).map_err(|e| {
                PluginError::io(format!("vfio-pci {id}: MSI-X vector {vector}: set_irqs: {e}"))
            })?;
            self.vectors[vector] = Some(Vector { fd, routed: None });
        }
        let Some(v) = self.vectors[vector].as_mut() else {
            return Ok(());
        };
        let message = (entry.address(), entry.data);
        if entry.masked() || ctl.function_masked {
            unroute(host, v, id);
            v.routed = None;
            return Ok(());
        }
        if v.routed == Some(message) {
            return Ok(());
        }
        let unmasking = v.routed.is_none();
        // A signal that came while masked is pending now.
        if unmasking && drain(&v.fd) {
            self.table.set_pending(vector, true);
        }
        match host.register_msi_irqfd(v.fd.as_raw_fd(), message.0, message.1).into_result() {
            Ok(()) => v.routed = Some(message),
            Err(e) if e.kind == ErrorKind::Unsupported => {
                if !self.warned {
                    log::warn!("vfio-pci {id}: MSI-X enabled but {}", e.message);
                    self.warned = true;
                }
                return Ok(());
            }
            Err(e) => {
                return Err(PluginError::new(
                    e.kind,
                    format!("vfio-pci {id}: MSI-X vector {vector}: {}", e.message),
                ))
            }
        }
        if unmasking && self.table.pending(vector) {
            self.table.set_pending(vector, false);
            signal(&v.fd).map_err(|e| {
                PluginError::io(format!(
                    "vfio-pci {id}: MSI-X vector {vector}: delivering the pending message: {e}"
                ))
            })?;
        }
        Ok(())
    }

    /// Hand `fd` to the backend as `vector`'s trigger. A NORESIZE backend
    /// that has fewer vectors enabled is disabled and re-enabled with all
    /// of them (vectors without an eventfd as -1).
    fn give_backend(&mut self, vector: usize, fd: &OwnedFd, backend: &dyn VfioBackend) -> BackendResult<()> {
        let set = |start: usize, fds: &[RawFd]| {
            backend.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, start as u32, fds)
        };
        if !self.noresize || vector < self.enabled {
            return set(vector, &[fd.as_raw_fd()]);
        }
        let mut fds: Vec<RawFd> =
            self.vectors[..=vector].iter().map(|v| v.as_ref().map_or(-1, |v| v.fd.as_raw_fd())).collect();
        fds[vector] = fd.as_raw_fd();
        if self.enabled > 0 {
            set(0, &[])?;
            self.enabled = 0;
        }
        set(0, &fds)?;
        self.enabled = fds.len();
        Ok(())
    }

    /// Bring every vector in line (control word changes, plug, restore).
    pub fn sync_all(
        &mut self,
        ctl: Control,
        host: &Host,
        backend: &dyn VfioBackend,
        id: &str,
    ) -> Result<(), PluginError> {
        if !ctl.enabled {
            self.teardown(host, backend, id);
            return Ok(());
        }
        let mut first_err = None;
        for vector in 0..self.usable {
            if let Err(e) = self.sync_vector(vector, ctl, host, backend, id) {
                // The first error goes to the host, which rate-limits it.
                log::debug!("{e}");
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Masked vectors: what the device signalled becomes pending (before
    /// the guest reads the PBA).
    pub fn collect_pending(&mut self) {
        for (vector, v) in self.vectors.iter().enumerate() {
            if let Some(v) = v.as_ref().filter(|v| v.routed.is_none()) {
                if drain(&v.fd) {
                    self.table.set_pending(vector, true);
                }
            }
        }
    }

    /// Drop every vector's route and eventfd (disable, unplug, reset).
    pub fn teardown(&mut self, host: &Host, backend: &dyn VfioBackend, id: &str) {
        if self.vectors.iter().all(Option::is_none) {
            return;
        }
        self.collect_pending();
        for v in self.vectors.iter_mut().filter_map(Option::take) {
            unroute(host, &v, id);
        }
        self.enabled = 0;
        if let Err(e) = backend.set_irqs(VFIO_PCI_MSIX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]) {
            log::warn!("vfio-pci {id}: disabling MSI-X: {e}");
        }
    }
}

fn unroute(host: &Host, v: &Vector, id: &str) {
    if v.routed.is_some() {
        if let Err(e) = host.unregister_msi_irqfd(v.fd.as_raw_fd()).into_result() {
            log::warn!("vfio-pci {id}: MSI-X irqfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 3 vectors: table at BAR0+0x1000 (48 bytes), PBA at BAR0+0x1800.
    fn table() -> MsixTable {
        MsixTable::new(MsixCap {
            offset: 0x60,
            table_size: 3,
            table_bar: 0,
            table_offset: 0x1000,
            pba_bar: 0,
            pba_offset: 0x1800,
        })
    }

    fn rd(t: &MsixTable, off: u64, len: usize) -> Vec<u8> {
        let hit = t.hit(0, off, len).expect("inside a structure");
        let mut b = vec![0u8; len];
        t.read(hit, off, &mut b);
        b
    }

    fn wr(t: &mut MsixTable, off: u64, data: &[u8]) -> Option<usize> {
        let hit = t.hit(0, off, data.len()).expect("inside a structure");
        t.write(hit, off, data)
    }

    #[test]
    fn entries_reset_masked_and_take_4_and_8_byte_accesses() {
        let mut t = table();
        assert_eq!((t.len(), t.is_empty()), (3, false));
        assert_eq!(rd(&t, 0x100c, 4), 1u32.to_le_bytes(), "masked after reset");
        assert_eq!(rd(&t, 0x1000, 8), [0; 8]);
        // Vector 1: a 64-bit address in one qword, data, then unmask.
        assert_eq!(wr(&mut t, 0x1010, &0x0000_0001_fee0_1000u64.to_le_bytes()), Some(1));
        assert_eq!(wr(&mut t, 0x1018, &0x4041u32.to_le_bytes()), Some(1));
        assert_eq!(wr(&mut t, 0x1018, &0x4041u32.to_le_bytes()), None, "unchanged");
        // Reserved vector-control bits do not stick.
        assert_eq!(wr(&mut t, 0x101c, &0xffff_fffeu32.to_le_bytes()), Some(1));
        let e = t.entry(1).unwrap();
        assert_eq!((e.address(), e.data, e.ctrl, e.masked()), (0x1_fee0_1000, 0x4041, 0, false));
        assert_eq!(rd(&t, 0x1018, 8), [0x41, 0x40, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rd(&t, 0x1010, 4), 0xfee0_1000u32.to_le_bytes());
        assert_eq!(rd(&t, 0x1014, 4), 1u32.to_le_bytes());
        assert!(t.entry(0).unwrap().masked() && t.entry(2).unwrap().masked(), "others untouched");
        assert_eq!(t.entry(3), None);
        t.reset();
        assert_eq!(t.entry(1), Some(Entry::default()));
    }

    #[test]
    fn bad_accesses_read_all_ones_and_write_nothing() {
        let mut t = table();
        wr(&mut t, 0x1000, &0xfee0_0000u32.to_le_bytes());
        let before = t.save();
        for (off, len) in [(0x1001, 4), (0x1002, 2), (0x1000, 1), (0x1004, 8), (0x102c, 8), (0x17fc, 8)] {
            let hit = t.hit(0, off, len).unwrap();
            let mut b = vec![0u8; len];
            t.read(hit, off, &mut b);
            assert!(b.iter().all(|&x| x == 0xff), "{off:#x}+{len}: {b:?}");
            assert_eq!(t.write(hit, off, &vec![0x55; len]), None, "{off:#x}+{len}");
        }
        assert_eq!(t.save(), before, "nothing written");
        // Outside both structures: not the table's; other BARs neither.
        assert_eq!(t.hit(0, 0x1030, 4), None);
        assert_eq!(t.hit(0, 0xffc, 4), None);
        assert_eq!(t.hit(0, 0x1808, 4), None);
        assert_eq!(t.hit(2, 0x1000, 4), None);
        assert_eq!(t.hit(0, u64::MAX - 2, 4), None, "no overflow");
        assert_eq!(t.hit(0, 0xffc, 8), Some(Hit::Table), "straddling the start");
        assert_eq!(rd(&t, 0xffc, 8), [0xff; 8]);
    }

    #[test]
    fn pba_reflects_pending_bits_and_is_read_only() {
        let mut t = table();
        assert_eq!(rd(&t, 0x1800, 8), [0; 8]);
        t.set_pending(0, true);
        t.set_pending(2, true);
        t.set_pending(70, true); // past the table: ignored
        assert_eq!(rd(&t, 0x1800, 8), [0b101, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(rd(&t, 0x1804, 4), [0; 4], "bits of vectors the table lacks read 0");
        assert_eq!(wr(&mut t, 0x1800, &[0; 8]), None);
        assert!(t.pending(0) && t.pending(2) && !t.pending(1));
        let saved = t.save();
        let mut u = table();
        u.restore(&saved).unwrap();
        assert_eq!(u.save(), saved);
        assert!(u.restore(&saved[1..]).is_err());
    }

    #[test]
    fn trap_ranges_cover_whole_pages() {
        let t = table();
        assert_eq!(t.trap_ranges(), [(0, 0x1000, 0x1000)], "table and PBA share a page");
        let mut cap = t.cap();
        cap.pba_offset = 0x9000;
        cap.table_size = 2048;
        let t2 = MsixTable::new(cap);
        assert_eq!(t2.trap_ranges(), [(0, 0x1000, 0x9000)], "32 KiB table, PBA on the next page: one range");
        cap.table_offset = 0x1800;
        cap.table_size = 1;
        cap.pba_offset = 0x3ff8;
        assert_eq!(MsixTable::new(cap).trap_ranges(), [(0, 0x1000, 0x1000), (0, 0x3000, 0x1000)]);
        assert_eq!(MsixTable::new(cap).trap_in(0), Some((0x1000, 0x3000)), "one hole over both");
        assert_eq!(MsixTable::new(cap).trap_in(2), None);
        cap.table_size = 3;
        cap.pba_bar = 2;
        cap.pba_offset = 0x10;
        assert_eq!(MsixTable::new(cap).trap_ranges(), [(0, 0x1000, 0x1000), (2, 0, 0x1000)]);
    }
}
