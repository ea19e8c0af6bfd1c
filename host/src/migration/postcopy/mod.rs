//! Post-copy migration (issue 7): the guest runs on the destination before
//! all of its RAM has arrived.
//!
//! After some pre-copy rounds the source stops the guest and sends, per
//! RAM block, the bitmap of pages it will still send (post-copy pending
//! sections), the device and vCPU state, waits for the destination to be
//! ready, opens a second connection for urgent pages (QEMU's preempt
//! channel) and sends the run section. From then on the source never runs
//! the guest again. The destination punches the pending pages out of its
//! memfds, registers every RAM block with userfaultfd (missing mode) and
//! resumes the vCPUs; a fault thread turns guest faults into page requests
//! on the return path ([`retpath`]), and the source answers them on the
//! urgent connection while the rest streams in the background on the main
//! one. A fault on a page that is not pending is a page the source never
//! had (a hole): it is answered with a zero page at once.
//!
//! If a connection breaks, both sides pause (`postcopy-paused`); the
//! destination's guest waits on its faults. `migrate-recover` on the
//! destination and `migrate {resume: true}` on the source reconnect: the
//! destination tells the source which pages it has and the source sends
//! the rest.

pub mod dest;
pub mod retpath;
pub mod source;

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap shared between threads, one bit per page.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Vec<AtomicU64>,
    bits: u64,
}

impl AtomicBitmap {
    pub fn new(bits: u64) -> Self {
        Self { words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), bits }
    }

    pub fn from_words(words: &[u64], bits: u64) -> Self {
        let b = Self::new(bits);
        for (a, w) in b.words.iter().zip(words) {
            a.store(*w, Ordering::Relaxed);
        }
        b
    }

    pub fn len(&self) -> u64 {
        self.bits
    }

    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    pub fn get(&self, i: u64) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Set bit `i`; returns whether it was clear.
    pub fn set(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.fetch_or(1 << (i % 64), Ordering::AcqRel) & (1 << (i % 64)) == 0)
    }

    /// Clear bit `i`; returns whether it was set.
    pub fn clear(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.fetch_and(!(1 << (i % 64)), Ordering::AcqRel) & (1 << (i % 64)) != 0)
    }

    pub fn clear_all(&self) {
        for w in &self.words {
            w.store(0, Ordering::Release);
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.load(Ordering::Relaxed).count_ones())).sum()
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.load(Ordering::Acquire)).collect()
    }

    pub fn store_words(&self, words: &[u64]) {
        for (a, w) in self.words.iter().zip(words) {
            a.store(*w, Ordering::Release);
        }
    }

    /// Take (clear and return) up to `max` set bits at or after `*cursor`,
    /// wrapping around once; `*cursor` moves past the last one taken.
    pub fn take_next(&self, cursor: &mut u64, max: usize, out: &mut Vec<u64>) {
        out.clear();
        let n = self.words.len() as u64;
        if n == 0 {
            return;
        }
        let start = (*cursor / 64) % n;
        for k in 0..=n {
            let wi = (start + k) % n;
            let w = &self.words[wi as usize];
            let mut bits = w.load(Ordering::Acquire);
            if k == 0 {
                // Bits before the cursor in its first word come last.
                bits &= u64::MAX.checked_shl((*cursor % 64) as u32).unwrap_or(0);
            }
            while bits != 0 && out.len() < max {
                let b = bits.trailing_zeros() as u64;
                bits &= bits - 1;
                let i = wi * 64 + b;
                if self.clear(i) {
                    out.push(i);
                }
            }
            if out.len() >= max {
                break;
            }
        }
        if let Some(&last) = out.last() {
            *cursor = last + 1;
        }
    }
}

/// Fault latencies (µs) and their percentiles.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    pub samples: Vec<u32>,
}

impl Latencies {
    /// The `q`-quantile (0..=1) in µs, or None without samples.
    pub fn percentile(&self, q: f64) -> Option<u32> {
        if self.samples.is_empty() {
            return None;
        }
        let mut v = self.samples.clone();
        v.sort_unstable();
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i.min(v.len() - 1)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::{
        ConfigSection, DeviceInfo, DeviceStage, RamBlockInfo, Section, StreamError, StreamReader,
        StreamWriter,
    };

    fn config() -> ConfigSection {
        ConfigSection {
            ram_size: 1 << 20,
            vcpus: 1,
            ram_blocks: vec![RamBlockInfo { id: "ram0".into(), size: 1 << 20 }],
            devices: vec![DeviceInfo {
                id: "d".into(),
                kind: "k".into(),
                plugin_version: String::new(),
                section_version: 1,
            }],
        }
    }

    /// Read the stream written by `f`; returns every section or the error.
    fn read(f: impl FnOnce(&mut StreamWriter<&mut Vec<u8>>)) -> Result<Vec<Section>, StreamError> {
        let mut buf = Vec::new();
        {
            let mut w = StreamWriter::new(&mut buf).unwrap();
            w.write_config(&config()).unwrap();
            f(&mut w);
            w.write_end().unwrap();
        }
        let mut r = StreamReader::new(&buf[..])?;
        let mut out = Vec::new();
        loop {
            let s = r.next_section()?;
            let end = matches!(s, Section::End { .. });
            out.push(s);
            if end {
                return Ok(out);
            }
        }
    }

    fn unexpected(r: Result<Vec<Section>, StreamError>) -> bool {
        matches!(r, Err(StreamError::Unexpected { .. }))
    }

    #[test]
    fn postcopy_sections_in_order_and_refused_out_of_it() {
        let mem = vec![7u8; 1 << 20];
        let mut bitmap = vec![0u64; 4];
        bitmap[0] = 0b1011;
        let ok = read(|w| {
            w.write_ram_pages("ram0", &mem, &[0, 1]).unwrap();
            w.write_postcopy_pending("ram0", &bitmap).unwrap();
            w.write_device("k", "d", 1, DeviceStage::Complete, b"x").unwrap();
            w.write_vcpu(0, b"v").unwrap();
            w.write_postcopy_run().unwrap();
            w.write_ram_pages("ram0", &mem, &[3]).unwrap();
        })
        .unwrap();
        assert_eq!(ok[2], Section::PostcopyPending { block: "ram0".into(), bitmap: bitmap.clone() });
        assert_eq!(ok[5], Section::PostcopyRun);
        // Run without pending; device state after run; RAM between
        // pending and run; pending after run; an end with post-copy
        // announced but not run.
        assert!(unexpected(read(|w| w.write_postcopy_run().unwrap())));
        assert!(unexpected(read(|w| {
            w.write_postcopy_pending("ram0", &bitmap).unwrap();
            w.write_postcopy_run().unwrap();
            w.write_vcpu(0, b"v").unwrap();
        })));
        assert!(unexpected(read(|w| {
            w.write_postcopy_pending("ram0", &bitmap).unwrap();
            w.write_ram_pages("ram0", &mem, &[3]).unwrap();
        })));
        assert!(unexpected(read(|w| {
            w.write_postcopy_pending("ram0", &bitmap).unwrap();
            w.write_postcopy_run().unwrap();
            w.write_postcopy_pending("ram0", &bitmap).unwrap();
        })));
        assert!(unexpected(read(|w| w.write_postcopy_pending("ram0", &bitmap).unwrap())));
        // Resume: only directly after the configuration, then only RAM.
        let ok = read(|w| {
            w.write_postcopy_resume().unwrap();
            w.write_ram_pages("ram0", &mem, &[3]).unwrap();
        })
        .unwrap();
        assert_eq!(ok[1], Section::PostcopyResume);
        assert!(unexpected(read(|w| {
            w.write_postcopy_resume().unwrap();
            w.write_device("k", "d", 1, DeviceStage::Complete, b"x").unwrap();
        })));
        // The writer keeps its own rules.
        let mut buf = Vec::new();
        let mut w = StreamWriter::new(&mut buf).unwrap();
        w.write_config(&config()).unwrap();
        w.write_ram_pages("ram0", &mem, &[3]).unwrap();
        assert!(w.write_postcopy_resume().is_err());
        assert!(w.write_postcopy_pending("ram0", &[0; 3]).is_err(), "bitmap of the wrong length");
        assert!(w.write_postcopy_pending("nope", &[0; 4]).is_err());
    }

    #[test]
    fn pending_bitmap_lengths_and_stray_bits_are_refused() {
        // A block of 100 pages: 2 words; bit 100 is beyond it.
        let mut c = config();
        c.ram_blocks[0].size = 100 * 4096;
        c.ram_size = 100 * 4096;
        let mut buf = Vec::new();
        {
            let mut w = StreamWriter::new(&mut buf).unwrap();
            w.write_config(&c).unwrap();
            w.write_postcopy_pending("ram0", &[0, 1 << 36]).unwrap();
        }
        let mut r = StreamReader::new(&buf[..]).unwrap();
        r.next_section().unwrap();
        assert!(matches!(r.next_section(), Err(StreamError::Malformed { .. })));
    }

    #[test]
    fn bitmap_take_wraps_and_clears() {
        let b = AtomicBitmap::new(200);
        for i in [1, 63, 64, 150, 199] {
            assert!(b.set(i));
        }
        assert!(!b.set(64));
        let mut cur = 100;
        let mut out = Vec::new();
        b.take_next(&mut cur, 2, &mut out);
        assert_eq!(out, vec![150, 199]);
        b.take_next(&mut cur, 10, &mut out);
        assert_eq!(out, vec![1, 63, 64]);
        assert_eq!(b.count(), 0);
        b.take_next(&mut cur, 10, &mut out);
        assert!(out.is_empty());
        let l = Latencies { samples: vec![5, 1, 3, 100, 2] };
        assert_eq!(l.percentile(0.5), Some(3));
        assert_eq!(l.percentile(0.99), Some(100));
    }
}
