//! The destination in post-copy: RAM blocks registered with userfaultfd,
//! a fault thread that requests missing pages on the return path, two
//! receivers (main and urgent connections) that place pages with
//! `UFFDIO_COPY`, and a controller that completes, or pauses and recovers.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::json;

use super::{retpath::RetMsg, AtomicBitmap, Latencies};
use crate::{
    migration::{
        progress::{Progress, Resume, Status},
        ConfigSection, MigrationListener, MigrationStream, Page, Section, StreamReader, PAGE_SIZE,
    },
    uffd::{Placed, UffdError, Userfault},
    vm::Vm,
};

static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Why post-copy failed on the destination.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyDestError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("RAM block {0:?} has no memfd: post-copy needs shared memory")]
    NoFd(String),
    #[error("RAM block {0:?} is not known here")]
    UnknownBlock(String),
    #[error("punching the pending pages out of RAM block {block:?}: {source}")]
    Discard { block: String, source: io::Error },
    #[error("eventfd: {0}")]
    EventFd(io::Error),
    #[error("the urgent-page connection: {0}")]
    Urgent(String),
    #[error("return path: {0}")]
    RetPath(String),
}

struct DestBlock {
    name: String,
    host_addr: u64,
    size: u64,
    fd: i32,
    fd_offset: u64,
    /// Pages the source still sends.
    pending: AtomicBitmap,
    /// Pages asked for on the current connection.
    requested: AtomicBitmap,
}

enum Event {
    /// A receiver read its end section.
    End,
    /// A receiver failed (connection lost or bad data).
    Broken(bool, String),
    AllPlaced,
}

/// Post-copy state shared by the destination's threads.
pub struct Shared {
    blocks: Vec<DestBlock>,
    config: ConfigSection,
    uffd: Userfault,
    remaining: AtomicU64,
    total: AtomicU64,
    ret: Mutex<Option<MigrationStream>>,
    /// Fault address (page) → when the fault thread read it.
    faults: Mutex<HashMap<u64, Instant>>,
    latencies: Mutex<Latencies>,
    requests: AtomicU64,
    fault_count: AtomicU64,
    zero_fills: AtomicU64,
    quit: OwnedFd,
    progress: Arc<Progress>,
    events: Mutex<Option<mpsc::Sender<Event>>>,
}

impl Shared {
    /// Post-copy state for `vm` (not running yet) receiving `config`.
    pub fn new(vm: &Vm, config: &ConfigSection, progress: Arc<Progress>) -> Result<Self, PostcopyDestError> {
        let mut blocks: Vec<DestBlock> = vm
            .ram_blocks()
            .into_iter()
            .map(|b| DestBlock {
                pending: AtomicBitmap::new(b.size / PAGE_SIZE as u64),
                requested: AtomicBitmap::new(b.size / PAGE_SIZE as u64),
                name: b.name,
                host_addr: b.host_addr,
                size: b.size,
                fd: b.fd,
                fd_offset: b.fd_offset,
            })
            .collect();
        blocks.sort_by_key(|b| b.host_addr);
        if let Some(b) = blocks.iter().find(|b| b.fd < 0) {
            return Err(PostcopyDestError::NoFd(b.name.clone()));
        }
        // SAFETY: eventfd with valid flags returns a new descriptor or -1.
        let quit = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if quit < 0 {
            return Err(PostcopyDestError::EventFd(io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor we own.
        let quit = unsafe { OwnedFd::from_raw_fd(quit) };
        Ok(Self {
            blocks,
            config: config.clone(),
            uffd: Userfault::new()?,
            remaining: AtomicU64::new(0),
            total: AtomicU64::new(0),
            ret: Mutex::new(None),
            faults: Mutex::new(HashMap::new()),
            latencies: Mutex::new(Latencies::default()),
            requests: AtomicU64::new(0),
            fault_count: AtomicU64::new(0),
            zero_fills: AtomicU64::new(0),
            quit,
            progress,
            events: Mutex::new(None),
        })
    }

    /// A post-copy pending section: these pages will come; the copies
    /// received in pre-copy are stale and are punched out of the memfd,
    /// so that the guest faults on them.
    pub fn apply_pending(&self, block: &str, bitmap: &[u64]) -> Result<(), PostcopyDestError> {
        let b = self
            .blocks
            .iter()
            .find(|b| b.name == block)
            .ok_or_else(|| PostcopyDestError::UnknownBlock(block.into()))?;
        let pages = b.size / PAGE_SIZE as u64;
        let mut run: Option<(u64, u64)> = None;
        let mut count = 0;
        for p in 0..pages {
            let set = bitmap.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0);
            if set && b.pending.set(p) {
                count += 1;
            }
            run = match (run, set) {
                (Some((s, e)), true) if e == p => Some((s, p + 1)),
                (r, true) => {
                    if let Some(r) = r {
                        punch(b, r)?;
                    }
                    Some((p, p + 1))
                }
                (r, false) => r,
            };
            if !set {
                if let Some(r) = run.take() {
                    punch(b, r)?;
                }
            }
        }
        if let Some(r) = run {
            punch(b, r)?;
        }
        self.remaining.fetch_add(count, Ordering::AcqRel);
        self.total.fetch_add(count, Ordering::AcqRel);
        log::info!("migration: post-copy: {count} pages of {block} will arrive after the guest resumes");
        Ok(())
    }

    /// Register every RAM block with userfaultfd (before the vCPUs run).
    pub fn register(&self) -> Result<(), PostcopyDestError> {
        for b in &self.blocks {
            self.uffd.register(b.host_addr, b.size)?;
        }
        Ok(())
    }

    fn block_of(&self, addr: u64) -> Option<(usize, u64)> {
        let i = self.blocks.partition_point(|b| b.host_addr <= addr).checked_sub(1)?;
        let b = &self.blocks[i];
        (addr < b.host_addr + b.size).then(|| (i, (addr - b.host_addr) / PAGE_SIZE as u64))
    }

    /// Place page `index` of block `bi` (from either connection).
    fn place(&self, bi: usize, index: u64, page: Page<'_>) -> io::Result<()> {
        let b = &self.blocks[bi];
        if !b.pending.get(index) {
            return Ok(()); // a duplicate (requested and streamed)
        }
        let data = match page {
            Page::Zero => &ZERO[..],
            Page::Data(d) => d,
        };
        let addr = b.host_addr + index * PAGE_SIZE as u64;
        match self.uffd.copy(addr, data) {
            Ok(Placed::Copied | Placed::AlreadyPresent) => {}
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
        if b.pending.clear(index) {
            if let Some(t) = lock(&self.faults).remove(&addr) {
                lock(&self.latencies).samples.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
            }
            if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.event(Event::AllPlaced);
            }
        }
        Ok(())
    }

    fn event(&self, e: Event) {
        if let Some(tx) = lock(&self.events).as_ref() {
            let _ = tx.send(e);
        }
    }

    /// Handle faults read from the userfaultfd.
    fn on_faults(&self, addrs: &[u64], reqs: &mut HashMap<usize, Vec<u64>>) {
        reqs.clear();
        let now = Instant::now();
        for &a in addrs {
            let page = a & !(PAGE_SIZE as u64 - 1);
            let Some((bi, index)) = self.block_of(page) else {
                log::warn!("migration: post-copy fault at {a:#x} outside guest RAM");
                continue;
            };
            self.fault_count.fetch_add(1, Ordering::Relaxed);
            let b = &self.blocks[bi];
            lock(&self.faults).entry(page).or_insert(now);
            if !b.pending.get(index) {
                // Never coming: a hole on the source (zero), or placed
                // just now (EEXIST wakes the waiter).
                lock(&self.faults).remove(&page);
                if let Ok(Placed::Copied) = self.uffd.copy(page, &ZERO) {
                    self.zero_fills.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            if b.requested.set(index) {
                reqs.entry(bi).or_default().push(index);
            }
        }
        self.send_requests(reqs);
    }

    fn send_requests(&self, reqs: &HashMap<usize, Vec<u64>>) {
        let mut ret = lock(&self.ret);
        let Some(w) = ret.as_mut() else { return };
        for (bi, pages) in reqs {
            for chunk in pages.chunks(crate::migration::MAX_PAGES_PER_BATCH) {
                let m = RetMsg::Request { block: self.blocks[*bi].name.clone(), pages: chunk.to_vec() };
                if let Err(e) = m.send(w) {
                    log::warn!("migration: post-copy page request failed: {e}");
                    return;
                }
                self.requests.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
    }

    /// After a reconnection: forget what was asked on the old connection
    /// and ask again for the pages guests wait on.
    fn rerequest(&self) {
        for b in &self.blocks {
            b.requested.clear_all();
        }
        let waiting: Vec<u64> = lock(&self.faults).keys().copied().collect();
        let mut reqs: HashMap<usize, Vec<u64>> = HashMap::new();
        for page in waiting {
            if let Some((bi, index)) = self.block_of(page) {
                if self.blocks[bi].pending.get(index) && self.blocks[bi].requested.set(index) {
                    reqs.entry(bi).or_default().push(index);
                }
            }
        }
        self.send_requests(&reqs);
    }

    /// Figures for `query-migrate` (and the log).
    pub fn stats_json(&self) -> serde_json::Value {
        let l = lock(&self.latencies);
        json!({
            "postcopy-requests": self.requests.load(Ordering::Relaxed),
            "faults": self.fault_count.load(Ordering::Relaxed),
            "zero-fills": self.zero_fills.load(Ordering::Relaxed),
            "pages-remaining": self.remaining.load(Ordering::Relaxed),
            "pages-postcopy": self.total.load(Ordering::Relaxed),
            "fault-latency-samples": l.samples.len(),
            "fault-latency-p50-us": l.percentile(0.5),
            "fault-latency-p99-us": l.percentile(0.99),
        })
    }

    fn report(&self) {
        let left = self.remaining.load(Ordering::Relaxed);
        self.progress.update(|s| s.remaining = left * PAGE_SIZE as u64);
        self.progress.set_extra("postcopy", self.stats_json());
    }

    /// The fault latencies measured so far (µs).
    pub fn latencies(&self) -> Latencies {
        lock(&self.latencies).clone()
    }

    fn stop_fault_thread(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes to our eventfd.
        let _ = unsafe { libc::write(self.quit.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn punch(b: &DestBlock, (s, e): (u64, u64)) -> Result<(), PostcopyDestError> {
    let off = b.fd_offset + s * PAGE_SIZE as u64;
    let len = (e - s) * PAGE_SIZE as u64;
    // SAFETY: fallocate on the block's memfd, within its range; it only
    // frees pages (which read back as zero).
    let r = unsafe {
        libc::fallocate(
            b.fd,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        return Err(PostcopyDestError::Discard { block: b.name.clone(), source: io::Error::last_os_error() });
    }
    Ok(())
}

/// The connections of one post-copy session on the destination.
pub struct Session {
    pub main: StreamReader<MigrationStream>,
    pub urgent: StreamReader<MigrationStream>,
    pub ret: MigrationStream,
}

/// Accept the urgent connection on `listener` and check its header and
/// configuration against the main stream's.
pub fn accept_urgent(
    listener: &MigrationListener,
    config: &ConfigSection,
) -> Result<StreamReader<MigrationStream>, PostcopyDestError> {
    let s = listener.accept_next().map_err(|e| PostcopyDestError::Urgent(e.to_string()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)));
    let mut r = StreamReader::new(s).map_err(|e| PostcopyDestError::Urgent(e.to_string()))?;
    match r.next_section() {
        Ok(Section::Config(c)) if &c == config => {}
        Ok(_) => {
            return Err(PostcopyDestError::Urgent("its configuration differs from the main stream's".into()))
        }
        Err(e) => return Err(PostcopyDestError::Urgent(e.to_string())),
    }
    r.get_mut().set_read_timeout(None);
    Ok(r)
}

/// Start post-copy: the fault thread, the receivers and the controller,
/// which runs until every page is in place (recovering from breaks).
/// The caller resumes the vCPUs right after.
pub fn start(shared: Arc<Shared>, session: Session) -> JoinHandle<()> {
    let fault = {
        let s = Arc::clone(&shared);
        std::thread::Builder::new().name("postcopy-fault".into()).spawn(move || fault_thread(&s))
    };
    let s = Arc::clone(&shared);
    let h = std::thread::Builder::new().name("postcopy-dest".into()).spawn(move || {
        controller(&s, session);
        s.stop_fault_thread();
        if let Ok(f) = fault {
            let _ = f.join();
        }
    });
    match h {
        Ok(h) => h,
        Err(e) => {
            log::error!("migration: cannot start the post-copy thread: {e}");
            std::thread::spawn(|| {})
        }
    }
}

fn fault_thread(s: &Shared) {
    let mut faults = Vec::new();
    let mut reqs = HashMap::new();
    let mut last_report = Instant::now();
    loop {
        match s.uffd.wait(s.quit.as_raw_fd(), 100) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                log::error!("migration: post-copy fault thread: {e}");
                break;
            }
        }
        faults.clear();
        if let Err(e) = s.uffd.read_faults(&mut faults) {
            log::error!("migration: post-copy fault thread: {e}");
            break;
        }
        if !faults.is_empty() {
            s.on_faults(&faults, &mut reqs);
        }
        if last_report.elapsed() > Duration::from_millis(200) {
            last_report = Instant::now();
            s.report();
        }
    }
}

fn receiver(s: &Shared, mut r: StreamReader<MigrationStream>, urgent: bool) {
    let blocks: HashMap<String, usize> =
        s.blocks.iter().enumerate().map(|(i, b)| (b.name.clone(), i)).collect();
    let ev = loop {
        match r.next_section() {
            Ok(Section::Ram(batch)) => {
                let Some(&bi) = blocks.get(&batch.block) else {
                    break Event::Broken(urgent, format!("RAM of unknown block {:?}", batch.block));
                };
                if let Err(e) = r.read_ram_with(&batch, |i, p| s.place(bi, i, p)) {
                    break Event::Broken(urgent, e.to_string());
                }
            }
            Ok(Section::End { .. }) => break Event::End,
            Ok(other) => {
                break Event::Broken(
                    urgent,
                    format!(
                        "unexpected {} section in post-copy",
                        crate::migration::section_name(other.type_code())
                    ),
                )
            }
            Err(e) => break Event::Broken(urgent, e.to_string()),
        }
    };
    s.event(ev);
}

fn controller(s: &Arc<Shared>, mut session: Session) {
    let resume = s.progress.resume_channel();
    let started = Instant::now();
    loop {
        let (tx, rx) = mpsc::channel();
        *lock(&s.events) = Some(tx);
        let Session { main, urgent, ret } = session;
        let mut handles = Vec::new();
        for h in [main_stream(&main), main_stream(&urgent), Some(&ret)].into_iter().flatten() {
            if let Ok(c) = h.try_clone() {
                handles.push(c);
            }
        }
        s.progress.set_sockets(handles);
        *lock(&s.ret) = Some(ret);
        s.rerequest();
        s.progress.set_status(Status::PostcopyActive);
        let recv: Vec<_> = [(main, false), (urgent, true)]
            .into_iter()
            .filter_map(|(r, u)| {
                let s = Arc::clone(s);
                std::thread::Builder::new()
                    .name(if u { "postcopy-urgent-rx" } else { "postcopy-main-rx" }.into())
                    .spawn(move || receiver(&s, r, u))
                    .ok()
            })
            .collect();
        let (mut ends, mut broken) = (0, None);
        let mut alive = recv.len();
        while alive > 0 && broken.is_none() {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::End) => {
                    ends += 1;
                    alive -= 1;
                }
                Ok(Event::Broken(u, e)) => {
                    alive -= 1;
                    broken = Some(format!("{} connection: {e}", if u { "urgent" } else { "main" }));
                }
                Ok(Event::AllPlaced) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => s.report(),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let left = s.remaining.load(Ordering::Acquire);
        if broken.is_none() && ends == 2 && left == 0 {
            let complete = lock(&s.ret).as_mut().map(|w| RetMsg::Complete.send(w));
            if let Some(Err(e)) = complete {
                log::warn!("migration: cannot tell the source post-copy completed: {e}");
            }
            for r in recv {
                let _ = r.join();
            }
            s.stop_fault_thread();
            for b in &s.blocks {
                if let Err(e) = s.uffd.unregister(b.host_addr, b.size) {
                    log::warn!("migration: userfaultfd unregister of {}: {e}", b.name);
                }
            }
            s.report();
            let st = s.stats_json();
            log::info!(
                "migration: post-copy completed in {:.3} s: {} faults, {} pages requested, fault latency p50 {} µs, p99 {} µs",
                started.elapsed().as_secs_f64(),
                st["faults"],
                st["postcopy-requests"],
                st["fault-latency-p50-us"],
                st["fault-latency-p99-us"]
            );
            s.progress.set_status(Status::Completed);
            s.progress.set_sockets(Vec::new());
            return;
        }
        let why = broken.unwrap_or_else(|| format!("the source ended with {left} pages still missing"));
        log::warn!(
            "migration: post-copy paused: {why}; the guest waits on its faults until `migrate-recover`"
        );
        s.progress.break_sockets();
        *lock(&s.ret) = None;
        for r in recv {
            let _ = r.join();
        }
        s.progress.set_extra("postcopy-paused-reason", json!(why));
        s.progress.set_status(Status::PostcopyPaused);
        s.report();
        session = loop {
            let listener = match resume.recv() {
                Ok(Resume::Accept(l)) => l,
                Ok(Resume::Connect(_)) => continue,
                Err(_) => return,
            };
            match recover(s, &listener) {
                Ok(sess) => {
                    listener.close();
                    break sess;
                }
                Err(e) => {
                    log::warn!("migration: post-copy recovery failed: {e}; still paused");
                    s.progress.set_extra("postcopy-paused-reason", json!(format!("recovery failed: {e}")));
                    s.progress.set_status(Status::PostcopyPaused);
                    listener.close();
                }
            }
        };
    }
}

fn main_stream(r: &StreamReader<MigrationStream>) -> Option<&MigrationStream> {
    Some(r.get_ref())
}

/// Accept a resuming source: check its stream, tell it which pages are
/// here, then accept its urgent connection.
fn recover(s: &Shared, listener: &MigrationListener) -> Result<Session, PostcopyDestError> {
    let err = |e: &dyn std::fmt::Display| PostcopyDestError::RetPath(e.to_string());
    let stream = listener.accept_next().map_err(|e| err(&e))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut ret = stream.try_clone().map_err(|e| err(&e))?;
    ret.set_nodelay();
    let mut main = StreamReader::new(stream).map_err(|e| err(&e))?;
    match main.next_section() {
        Ok(Section::Config(c)) if c == s.config => {}
        Ok(_) => {
            return Err(PostcopyDestError::RetPath("the resuming stream has another configuration".into()))
        }
        Err(e) => return Err(err(&e)),
    }
    match main.next_section() {
        Ok(Section::PostcopyResume) => {}
        Ok(other) => {
            return Err(PostcopyDestError::RetPath(format!(
                "expected a resume section, got {}",
                crate::migration::section_name(other.type_code())
            )))
        }
        Err(e) => return Err(err(&e)),
    }
    for b in &s.blocks {
        let have: Vec<u64> = b.pending.snapshot().iter().map(|w| !w).collect();
        let pages = b.size / PAGE_SIZE as u64;
        let mut have = have;
        if !pages.is_multiple_of(64) {
            if let Some(last) = have.last_mut() {
                *last &= (1u64 << (pages % 64)) - 1;
            }
        }
        RetMsg::Received { block: b.name.clone(), bitmap: have }.send(&mut ret).map_err(|e| err(&e))?;
    }
    RetMsg::ResumeReady.send(&mut ret).map_err(|e| err(&e))?;
    let urgent = accept_urgent(listener, &s.config)?;
    main.get_mut().set_read_timeout(None);
    log::info!(
        "migration: post-copy recovered on {}: {} pages still to come",
        listener.uri(),
        s.remaining.load(Ordering::Relaxed)
    );
    Ok(Session { main, urgent, ret })
}
