//! PCI IRQ lines: one KVM irqfd and one resamplefd per line, a level count
//! per line under a per-line lock, and the resample thread.
//!
//! As QEMU's remote IOHub (`hw/remote/iohub.c`): a source raising a line
//! whose count goes 0 → 1 signals the irqfd; on resample (the kernel
//! signals the resamplefd after the guest's EOI lowered the line) the line
//! is raised again while its level is still held.
//!
//! One difference: when the count goes 1 → 0 the line is lowered at once,
//! as the wire of a real IOAPIC pin would be. KVM's resample irqfd keeps the
//! level until an EOI, so the line re-arms its irqfd (deassign + assign):
//! the kernel drops the resampler's level when its last irqfd goes. That
//! costs two ioctls on a falling edge only.

use std::{
    collections::BTreeSet,
    os::fd::{AsRawFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
};

use dmhost_plugin_api::{Host, PluginError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Number of lines (PIRQ A..D).
pub const NUM_LINES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum LineError {
    #[error("cannot create an eventfd for line {line}")]
    EventFd { line: u32, source: std::io::Error },
    #[error("line {line}: signalling its irqfd failed")]
    Signal { line: u32, source: std::io::Error },
    #[error("line {line}: {what} GSI {gsi} refused by the host: {message}")]
    Host { line: u32, what: &'static str, gsi: u32, message: String },
    #[error("cannot start the resample thread")]
    Thread(#[source] std::io::Error),
}

impl From<LineError> for PluginError {
    fn from(e: LineError) -> Self {
        match e {
            LineError::Host { .. } => PluginError::denied(e.to_string()),
            other => PluginError::io(other.to_string()),
        }
    }
}

/// What a line needs from the host: KVM irqfd registration.
pub trait IrqfdHost: Send + Sync {
    fn register(&self, gsi: u32, fd: RawFd, resample_fd: RawFd) -> Result<(), String>;
    fn unregister(&self, gsi: u32, fd: RawFd) -> Result<(), String>;
}

impl IrqfdHost for Host {
    fn register(&self, gsi: u32, fd: RawFd, resample_fd: RawFd) -> Result<(), String> {
        self.register_irqfd(gsi, fd, resample_fd).into_result().map_err(|e| e.message.to_string())
    }
    fn unregister(&self, gsi: u32, fd: RawFd) -> Result<(), String> {
        self.unregister_irqfd(gsi, fd).into_result().map_err(|e| e.message.to_string())
    }
}

/// Who holds a line: a device function's pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub devfn: u8,
    /// 1 = INTA .. 4 = INTD.
    pub pin: u8,
}

#[derive(Debug)]
struct LineState {
    /// The GSI the line is wired to; `None` when routed nowhere.
    gsi: Option<u32>,
    /// Whether the irqfd is registered with KVM on `gsi`.
    registered: bool,
    /// The sources holding the line high: the level count is its size.
    held: BTreeSet<Source>,
}

/// One PCI IRQ line.
#[derive(Debug)]
pub struct Line {
    pub index: u32,
    irqfd: EventFd,
    resamplefd: EventFd,
    state: Mutex<LineState>,
}

impl Line {
    pub fn new(index: u32, gsi: Option<u32>) -> Result<Self, LineError> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(|source| LineError::EventFd { line: index, source });
        Ok(Self {
            index,
            irqfd: efd()?,
            resamplefd: efd()?,
            state: Mutex::new(LineState { gsi, registered: false, held: BTreeSet::new() }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LineState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn irqfd(&self) -> RawFd {
        self.irqfd.as_raw_fd()
    }

    pub fn resamplefd(&self) -> RawFd {
        self.resamplefd.as_raw_fd()
    }

    pub fn gsi(&self) -> Option<u32> {
        self.lock().gsi
    }

    /// The level count.
    pub fn level(&self) -> usize {
        self.lock().held.len()
    }

    pub fn held(&self) -> Vec<Source> {
        self.lock().held.iter().copied().collect()
    }

    fn signal(&self) -> Result<(), LineError> {
        self.irqfd.write(1).map_err(|source| LineError::Signal { line: self.index, source })
    }

    fn register(&self, host: &dyn IrqfdHost, st: &mut LineState) -> Result<(), LineError> {
        if let (Some(gsi), false) = (st.gsi, st.registered) {
            host.register(gsi, self.irqfd(), self.resamplefd()).map_err(|message| LineError::Host {
                line: self.index,
                what: "register irqfd on",
                gsi,
                message,
            })?;
            st.registered = true;
            log::debug!(
                "iohub line {}: irqfd {} + resamplefd {} on GSI {gsi}",
                self.index,
                self.irqfd(),
                self.resamplefd()
            );
        }
        Ok(())
    }

    fn unregister(&self, host: &dyn IrqfdHost, st: &mut LineState) -> Result<(), LineError> {
        if let (Some(gsi), true) = (st.gsi, st.registered) {
            st.registered = false;
            host.unregister(gsi, self.irqfd()).map_err(|message| LineError::Host {
                line: self.index,
                what: "unregister irqfd from",
                gsi,
                message,
            })?;
        }
        Ok(())
    }

    /// Register the irqfd on the line's GSI; raise it if a level is held
    /// (after a migration or a re-plug).
    pub fn attach(&self, host: &dyn IrqfdHost) -> Result<(), LineError> {
        let mut st = self.lock();
        self.register(host, &mut st)?;
        if st.registered && !st.held.is_empty() {
            self.signal()?;
        }
        Ok(())
    }

    /// Unregister the irqfd (unplug); the held levels are kept.
    pub fn detach(&self, host: &dyn IrqfdHost) -> Result<(), LineError> {
        let mut st = self.lock();
        self.unregister(host, &mut st)
    }

    /// Wire the line to another GSI (or none): the irqfd moves, and a held
    /// level is raised on the new GSI.
    pub fn reroute(&self, host: &dyn IrqfdHost, gsi: Option<u32>) -> Result<(), LineError> {
        let mut st = self.lock();
        if st.gsi == gsi {
            return Ok(());
        }
        let was = st.registered;
        self.unregister(host, &mut st)?;
        log::info!("iohub line {}: routed from GSI {:?} to {gsi:?}", self.index, st.gsi);
        st.gsi = gsi;
        if was {
            self.register(host, &mut st)?;
            if st.registered && !st.held.is_empty() {
                self.signal()?;
            }
        }
        Ok(())
    }

    /// `source` drives the line to `level`. Returns the new count.
    pub fn set(&self, host: &dyn IrqfdHost, source: Source, level: bool) -> Result<usize, LineError> {
        let mut st = self.lock();
        if level {
            if st.held.insert(source) && st.held.len() == 1 && st.registered {
                self.signal()?;
            }
        } else if st.held.remove(&source) && st.held.is_empty() && st.registered {
            // Lower now: re-arm the irqfd so KVM drops the resampler level.
            self.unregister(host, &mut st)?;
            self.register(host, &mut st)?;
        }
        Ok(st.held.len())
    }

    /// Replace the held sources (migration load); the caller re-attaches.
    pub fn restore(&self, held: BTreeSet<Source>, gsi: Option<u32>) {
        let mut st = self.lock();
        st.held = held;
        st.gsi = gsi;
    }

    /// The resamplefd fired (guest EOI): raise again while still held.
    /// Returns whether it re-raised.
    pub fn resample(&self) -> Result<bool, LineError> {
        // Drain the counter; EAGAIN means a spurious wake-up.
        let _ = self.resamplefd.read();
        let st = self.lock();
        if !st.held.is_empty() && st.registered {
            self.signal()?;
            return Ok(true);
        }
        Ok(false)
    }
}

/// The resample thread: polls every line's resamplefd and a quit eventfd.
pub struct Resampler {
    quit: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl Resampler {
    pub fn start(name: &str, lines: Arc<Vec<Line>>) -> Result<Self, LineError> {
        let quit = Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(|source| LineError::EventFd { line: u32::MAX, source })?,
        );
        let q = Arc::clone(&quit);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-resample"))
            .spawn(move || resample_loop(&lines, &q))
            .map_err(LineError::Thread)?;
        Ok(Self { quit, thread: Some(thread) })
    }

    /// Stop and join the thread.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.quit.write(1);
            let _ = t.join();
        }
    }
}

impl Drop for Resampler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn resample_loop(lines: &[Line], quit: &EventFd) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(quit.as_raw_fd())
        .chain(lines.iter().map(Line::resamplefd))
        .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
        .collect();
    loop {
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds that lives
        // across the call; every descriptor outlives this thread.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("iohub resample thread: poll failed: {e}");
            return;
        }
        if fds[0].revents != 0 {
            return;
        }
        for (pfd, line) in fds[1..].iter_mut().zip(lines) {
            if pfd.revents != 0 {
                pfd.revents = 0;
                match line.resample() {
                    Ok(true) => log::trace!("iohub line {}: re-raised on resample", line.index),
                    Ok(false) => {}
                    Err(e) => log::warn!("{e}"),
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Records registrations; checks each irqfd is registered once.
    #[derive(Default)]
    pub struct FakeHost {
        pub regs: Mutex<Vec<(u32, RawFd)>>,
        pub log: Mutex<Vec<String>>,
    }

    impl IrqfdHost for FakeHost {
        fn register(&self, gsi: u32, fd: RawFd, _r: RawFd) -> Result<(), String> {
            let mut r = self.regs.lock().unwrap();
            if r.contains(&(gsi, fd)) {
                return Err("twice".into());
            }
            r.push((gsi, fd));
            self.log.lock().unwrap().push(format!("reg {gsi}"));
            Ok(())
        }
        fn unregister(&self, gsi: u32, fd: RawFd) -> Result<(), String> {
            let mut r = self.regs.lock().unwrap();
            let p = r.iter().position(|x| *x == (gsi, fd)).ok_or("not registered")?;
            r.remove(p);
            self.log.lock().unwrap().push(format!("unreg {gsi}"));
            Ok(())
        }
    }

    fn pending(fd: &EventFd) -> u64 {
        fd.read().unwrap_or(0)
    }

    #[test]
    fn count_signals_on_first_raise_and_lowers_on_last() {
        let host = FakeHost::default();
        let line = Line::new(0, Some(16)).unwrap();
        line.attach(&host).unwrap();
        let a = Source { devfn: 8, pin: 1 };
        let b = Source { devfn: 16, pin: 4 };
        assert_eq!(line.set(&host, a, true).unwrap(), 1);
        assert_eq!(pending(&line.irqfd), 1, "0 -> 1 signals the irqfd");
        assert_eq!(line.set(&host, a, true).unwrap(), 1, "a source counts once");
        assert_eq!(line.set(&host, b, true).unwrap(), 2);
        assert_eq!(pending(&line.irqfd), 0, "1 -> 2 does not signal");
        host.log.lock().unwrap().clear();
        assert_eq!(line.set(&host, a, false).unwrap(), 1);
        assert!(host.log.lock().unwrap().is_empty(), "still held by b: not lowered");
        assert_eq!(line.set(&host, b, false).unwrap(), 0);
        assert_eq!(*host.log.lock().unwrap(), ["unreg 16", "reg 16"], "lowered by re-arming");
        assert_eq!(line.set(&host, b, false).unwrap(), 0, "lowering twice is harmless");
    }

    #[test]
    fn resample_reraises_only_while_held() {
        let host = FakeHost::default();
        let line = Line::new(1, Some(17)).unwrap();
        line.attach(&host).unwrap();
        let a = Source { devfn: 0, pin: 2 };
        line.set(&host, a, true).unwrap();
        pending(&line.irqfd);
        line.resamplefd.write(1).unwrap();
        assert!(line.resample().unwrap());
        assert_eq!(pending(&line.irqfd), 1);
        line.set(&host, a, false).unwrap();
        line.resamplefd.write(1).unwrap();
        assert!(!line.resample().unwrap());
        assert_eq!(pending(&line.irqfd), 0);
    }

    #[test]
    fn reroute_moves_the_irqfd_and_reraises() {
        let host = FakeHost::default();
        let line = Line::new(2, Some(18)).unwrap();
        line.attach(&host).unwrap();
        line.set(&host, Source { devfn: 1, pin: 1 }, true).unwrap();
        pending(&line.irqfd);
        line.reroute(&host, Some(5)).unwrap();
        assert_eq!(*host.regs.lock().unwrap(), [(5, line.irqfd())]);
        assert_eq!(pending(&line.irqfd), 1, "held level raised on the new GSI");
        line.reroute(&host, None).unwrap();
        assert!(host.regs.lock().unwrap().is_empty());
        line.detach(&host).unwrap();
    }

    #[test]
    fn resample_thread_reraises_and_stops() {
        let host = FakeHost::default();
        let lines = Arc::new(vec![Line::new(0, Some(16)).unwrap(), Line::new(1, Some(17)).unwrap()]);
        for l in lines.iter() {
            l.attach(&host).unwrap();
        }
        lines[1].set(&host, Source { devfn: 0, pin: 2 }, true).unwrap();
        pending(&lines[1].irqfd);
        let mut r = Resampler::start("t", Arc::clone(&lines)).unwrap();
        lines[1].resamplefd.write(1).unwrap();
        let t = std::time::Instant::now();
        let mut got = 0;
        while got == 0 && t.elapsed() < std::time::Duration::from_secs(5) {
            got = pending(&lines[1].irqfd);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(got, 1, "the thread re-raised the held line");
        r.stop();
    }
}
