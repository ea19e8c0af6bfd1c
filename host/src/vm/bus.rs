//! The I/O bus: port and MMIO ranges, each claimed by one device, kept in a
//! `BTreeMap` keyed by base. Overlapping claims are rejected; accesses
//! nobody claimed read as all ones and are logged at debug level,
//! rate-limited (a guest can trigger them at will).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

pub use dmhost_plugin_api::IoSpace;

/// A device on the bus. Addresses are absolute (port or guest-physical).
pub trait BusDevice: Send + Sync {
    fn read(&self, space: IoSpace, addr: u64, data: &mut [u8]);
    fn write(&self, space: IoSpace, addr: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("{space:?} range {base:#x}+{size:#x} is empty or wraps")]
    BadRange { space: IoSpace, base: u64, size: u64 },
    #[error("{space:?} range {base:#x}+{size:#x} overlaps {other_base:#x}+{other_size:#x} of {owner}")]
    Overlap { space: IoSpace, base: u64, size: u64, other_base: u64, other_size: u64, owner: String },
    #[error("{space:?} range {base:#x}+{size:#x} is not registered by {owner}")]
    NotRegistered { space: IoSpace, base: u64, size: u64, owner: String },
}

#[derive(Clone)]
struct Entry {
    size: u64,
    owner: String,
    device: Arc<dyn BusDevice>,
}

type Ranges = BTreeMap<u64, Entry>;

/// Port and MMIO dispatch.
pub struct IoBus {
    pio: RwLock<Ranges>,
    mmio: RwLock<Ranges>,
    unclaimed: RateLimiter,
}

impl Default for IoBus {
    fn default() -> Self {
        Self::new()
    }
}

/// A registered range, for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusRange {
    pub space: IoSpace,
    pub base: u64,
    pub size: u64,
    pub owner: String,
}

impl IoBus {
    pub fn new() -> Self {
        Self {
            pio: RwLock::new(BTreeMap::new()),
            mmio: RwLock::new(BTreeMap::new()),
            unclaimed: RateLimiter::new(10, Duration::from_secs(1)),
        }
    }

    fn map(&self, space: IoSpace) -> &RwLock<Ranges> {
        match space {
            IoSpace::Pio => &self.pio,
            IoSpace::Mmio => &self.mmio,
        }
    }

    /// Claim `[base, base+size)` for `owner`'s `device`.
    pub fn insert(
        &self,
        space: IoSpace,
        base: u64,
        size: u64,
        owner: &str,
        device: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(size).filter(|_| size > 0);
        let Some(end) = end else {
            return Err(BusError::BadRange { space, base, size });
        };
        let mut map = self.map(space).write().unwrap_or_else(|p| p.into_inner());
        // The first range starting before `end` is the only one that can overlap
        // (ranges never overlap each other).
        if let Some((&b, e)) = map.range(..end).next_back() {
            if b + e.size > base {
                return Err(BusError::Overlap {
                    space,
                    base,
                    size,
                    other_base: b,
                    other_size: e.size,
                    owner: e.owner.clone(),
                });
            }
        }
        map.insert(base, Entry { size, owner: owner.to_owned(), device });
        Ok(())
    }

    /// Release exactly the range `owner` registered at `base` with `size`.
    pub fn remove(&self, space: IoSpace, base: u64, size: u64, owner: &str) -> Result<(), BusError> {
        let mut map = self.map(space).write().unwrap_or_else(|p| p.into_inner());
        match map.get(&base) {
            Some(e) if e.size == size && e.owner == owner => {
                map.remove(&base);
                Ok(())
            }
            _ => Err(BusError::NotRegistered { space, base, size, owner: owner.to_owned() }),
        }
    }

    /// Release every range of `owner`; returns how many.
    pub fn remove_owner(&self, owner: &str) -> usize {
        let mut n = 0;
        for space in [IoSpace::Pio, IoSpace::Mmio] {
            let mut map = self.map(space).write().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, e| e.owner != owner);
            n += before - map.len();
        }
        n
    }

    /// Every registered range.
    pub fn ranges(&self) -> Vec<BusRange> {
        let mut out = Vec::new();
        for space in [IoSpace::Pio, IoSpace::Mmio] {
            let map = self.map(space).read().unwrap_or_else(|p| p.into_inner());
            out.extend(map.iter().map(|(&base, e)| BusRange {
                space,
                base,
                size: e.size,
                owner: e.owner.clone(),
            }));
        }
        out
    }

    fn find(&self, space: IoSpace, addr: u64, len: usize) -> Option<Arc<dyn BusDevice>> {
        let map = self.map(space).read().unwrap_or_else(|p| p.into_inner());
        let (&base, e) = map.range(..=addr).next_back()?;
        let end = addr.checked_add(len as u64)?;
        (end <= base + e.size).then(|| Arc::clone(&e.device))
    }

    /// Dispatch a read; unclaimed reads return all ones. Returns whether a
    /// device claimed it.
    pub fn read(&self, space: IoSpace, addr: u64, data: &mut [u8]) -> bool {
        // The lock is released before calling the device, which may itself
        // (un)register ranges.
        match self.find(space, addr, data.len()) {
            Some(dev) => {
                dev.read(space, addr, data);
                true
            }
            None => {
                data.fill(0xff);
                self.unclaimed.log(|suppressed| {
                    log::debug!(
                        "unclaimed {space:?} read at {addr:#x} len {}{}",
                        data.len(),
                        suppressed_note(suppressed)
                    )
                });
                false
            }
        }
    }

    /// Dispatch a write; unclaimed writes are dropped.
    pub fn write(&self, space: IoSpace, addr: u64, data: &[u8]) -> bool {
        match self.find(space, addr, data.len()) {
            Some(dev) => {
                dev.write(space, addr, data);
                true
            }
            None => {
                self.unclaimed.log(|suppressed| {
                    log::debug!(
                        "unclaimed {space:?} write at {addr:#x} len {}{}",
                        data.len(),
                        suppressed_note(suppressed)
                    )
                });
                false
            }
        }
    }
}

fn suppressed_note(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} similar messages suppressed)")
    }
}

/// Allows `burst` log lines per `period`; counts the rest.
pub struct RateLimiter {
    state: Mutex<(Instant, u32, u64)>,
    burst: u32,
    period: Duration,
}

impl RateLimiter {
    pub fn new(burst: u32, period: Duration) -> Self {
        Self { state: Mutex::new((Instant::now(), 0, 0)), burst, period }
    }

    /// Call `emit(suppressed_since_last)` unless over the limit.
    pub fn log(&self, emit: impl FnOnce(u64)) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(st.0) >= self.period {
            *st = (now, 0, st.2);
        }
        if st.1 < self.burst {
            st.1 += 1;
            let suppressed = std::mem::take(&mut st.2);
            drop(st);
            emit(suppressed);
            true
        } else {
            st.2 += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Dev(AtomicU64);
    impl BusDevice for Dev {
        fn read(&self, _: IoSpace, addr: u64, data: &mut [u8]) {
            data.fill(addr as u8);
        }
        fn write(&self, _: IoSpace, _: u64, _: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn overlaps_rejected_and_dispatch() {
        let bus = IoBus::new();
        let d = Arc::new(Dev(AtomicU64::new(0)));
        bus.insert(IoSpace::Mmio, 0x1000, 0x100, "a", d.clone()).unwrap();
        for (b, s) in [(0x1000, 1), (0xfff, 2), (0x10ff, 0x10), (0x800, 0x1000)] {
            assert!(matches!(bus.insert(IoSpace::Mmio, b, s, "b", d.clone()), Err(BusError::Overlap { .. })));
        }
        assert!(bus.insert(IoSpace::Mmio, 0, 0, "b", d.clone()).is_err());
        assert!(bus.insert(IoSpace::Mmio, u64::MAX, 2, "b", d.clone()).is_err());
        bus.insert(IoSpace::Mmio, 0x1100, 0x100, "b", d.clone()).unwrap();
        bus.insert(IoSpace::Pio, 0x1000, 0x100, "b", d.clone()).unwrap();

        let mut buf = [0u8; 4];
        assert!(bus.read(IoSpace::Mmio, 0x1004, &mut buf));
        assert_eq!(buf, [4; 4]);
        // Straddling the end of a range is not claimed.
        assert!(!bus.read(IoSpace::Mmio, 0x11fe, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.read(IoSpace::Mmio, 0x5000, &mut buf));
        assert!(bus.write(IoSpace::Mmio, 0x1100, &buf));
        assert!(!bus.write(IoSpace::Mmio, 0x10, &buf));
        assert_eq!(d.0.load(Ordering::Relaxed), 1);

        assert!(bus.remove(IoSpace::Mmio, 0x1000, 0x100, "b").is_err());
        bus.remove(IoSpace::Mmio, 0x1000, 0x100, "a").unwrap();
        assert_eq!(bus.remove_owner("b"), 2);
        assert!(bus.ranges().is_empty());
    }

    #[test]
    fn rate_limiter_counts_suppressed() {
        let rl = RateLimiter::new(2, Duration::from_secs(3600));
        let mut seen = Vec::new();
        for _ in 0..5 {
            rl.log(|s| seen.push(s));
        }
        assert_eq!(seen, vec![0, 0]);
        let rl = RateLimiter::new(1, Duration::ZERO);
        rl.log(|_| {});
        let mut got = None;
        rl.log(|s| got = Some(s));
        assert_eq!(got, Some(0));
    }
}
