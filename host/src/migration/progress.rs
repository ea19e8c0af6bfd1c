//! What a migration reports while it runs (`query-migrate`), the knobs it
//! obeys (`migrate-set-parameters`) and its cancel flag.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{json, Value};

/// QMP's MigrationStatus values that this host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    None,
    Setup,
    Active,
    /// VM stopped, device state and the last pages in flight.
    Device,
    PostcopyActive,
    PostcopyPaused,
    /// A paused post-copy is reconnecting.
    PostcopyRecover,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn finished(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// Tunables, as QEMU's migrate-set-parameters names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Parameters {
    /// Longest acceptable pause of the guest.
    pub max_downtime: Duration,
    /// Bytes per second; 0 = unlimited.
    pub max_bandwidth: u64,
    /// Pre-copy rounds before the switch-over is forced.
    pub max_rounds: u32,
    /// Bytes per second of the background stream in post-copy; 0 = none
    /// (requested pages are never limited).
    pub max_postcopy_bandwidth: u64,
}

impl Default for Parameters {
    fn default() -> Self {
        Self {
            max_downtime: Duration::from_millis(300),
            max_bandwidth: 0,
            max_rounds: 30,
            max_postcopy_bandwidth: 0,
        }
    }
}

/// Counters of one migration.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Bytes of every RAM block.
    pub total: u64,
    /// Stream bytes written so far.
    pub transferred: u64,
    /// Bytes of RAM still dirty (last measured).
    pub remaining: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    /// Pages dirtied per second in the last round.
    pub dirty_rate: u64,
    pub round: u32,
    /// Measured throughput, bytes per second.
    pub bandwidth: u64,
    pub expected_downtime_ms: u64,
    pub downtime_ms: Option<u64>,
    pub total_time_ms: u64,
}

/// Shared between the migration thread and the control socket.
#[derive(Debug)]
pub struct Progress {
    inner: Mutex<Inner>,
    cancel: AtomicBool,
    /// `migrate-start-postcopy` was asked.
    postcopy: AtomicBool,
    /// Post-copy: where a paused migration continues (`migrate` with
    /// `resume` on the source, `migrate-recover` on the destination).
    resume: Mutex<Option<mpsc::Sender<Resume>>>,
    /// Post-copy: handles on the live connections, for `x-postcopy-break`.
    sockets: Mutex<Vec<super::MigrationStream>>,
}

/// How a paused post-copy migration continues.
#[derive(Debug)]
pub enum Resume {
    /// Source: connect here.
    Connect(super::MigrationUri),
    /// Destination: accept on this listener.
    Accept(super::MigrationListener),
}

#[derive(Debug)]
struct Inner {
    status: Status,
    stats: Stats,
    error: Option<String>,
    started: Option<Instant>,
    params: Parameters,
    extra: serde_json::Map<String, Value>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                status: Status::None,
                stats: Stats::default(),
                error: None,
                started: None,
                params: Parameters::default(),
                extra: Default::default(),
            }),
            cancel: AtomicBool::new(false),
            postcopy: AtomicBool::new(false),
            resume: Mutex::new(None),
            sockets: Mutex::new(Vec::new()),
        }
    }
}

impl Progress {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Begin a migration; refused while one is running.
    pub fn begin(&self) -> Result<Parameters, String> {
        let mut g = self.lock();
        if matches!(
            g.status,
            Status::Setup
                | Status::Active
                | Status::Device
                | Status::PostcopyActive
                | Status::PostcopyPaused
                | Status::PostcopyRecover
        ) {
            return Err(format!("a migration is already {:?}", g.status).to_lowercase());
        }
        g.status = Status::Setup;
        g.stats = Stats::default();
        g.error = None;
        g.started = Some(Instant::now());
        g.extra.clear();
        self.cancel.store(false, Ordering::SeqCst);
        self.postcopy.store(false, Ordering::SeqCst);
        Ok(g.params)
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    pub fn set_status(&self, status: Status) {
        let mut g = self.lock();
        g.status = status;
        if let Some(t) = g.started {
            g.stats.total_time_ms = t.elapsed().as_millis() as u64;
        }
    }

    pub fn fail(&self, error: String, cancelled: bool) {
        let mut g = self.lock();
        g.status = if cancelled { Status::Cancelled } else { Status::Failed };
        g.error = Some(error);
    }

    pub fn update(&self, f: impl FnOnce(&mut Stats)) {
        let mut g = self.lock();
        f(&mut g.stats);
        if let Some(t) = g.started {
            g.stats.total_time_ms = t.elapsed().as_millis() as u64;
        }
    }

    /// Extra fields for `query-migrate` (post-copy adds its own).
    pub fn set_extra(&self, key: &str, value: Value) {
        self.lock().extra.insert(key.to_owned(), value);
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    pub fn error(&self) -> Option<String> {
        self.lock().error.clone()
    }

    pub fn params(&self) -> Parameters {
        self.lock().params
    }

    pub fn set_params(&self, p: Parameters) {
        self.lock().params = p;
    }

    pub fn request_cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Ask the running migration to switch to post-copy (or clear it).
    pub fn request_postcopy(&self, on: bool) {
        self.postcopy.store(on, Ordering::SeqCst);
    }

    pub fn postcopy_requested(&self) -> bool {
        self.postcopy.load(Ordering::SeqCst)
    }

    /// A paused post-copy migration waits on the returned channel.
    pub fn resume_channel(&self) -> mpsc::Receiver<Resume> {
        let (tx, rx) = mpsc::channel();
        *self.resume.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        rx
    }

    /// Hand a paused post-copy migration where to continue.
    pub fn resume(&self, r: Resume) -> Result<(), String> {
        if self.status() != Status::PostcopyPaused {
            return Err(
                format!("no post-copy migration is paused (status {:?})", self.status()).to_lowercase()
            );
        }
        let g = self.resume.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref()
            .ok_or("no post-copy migration is paused")?
            .send(r)
            .map_err(|_| "the migration is gone".to_owned())?;
        self.set_status(Status::PostcopyRecover);
        Ok(())
    }

    /// Remember the live post-copy connections (replacing older ones).
    pub fn set_sockets(&self, s: Vec<super::MigrationStream>) {
        *self.sockets.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Shut every live post-copy connection down (`x-postcopy-break`, and
    /// each side when it pauses); returns how many there were.
    pub fn break_sockets(&self) -> usize {
        let g = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
        for s in g.iter() {
            s.shutdown();
        }
        g.len()
    }

    /// The `query-migrate` reply.
    pub fn to_json(&self) -> Value {
        let g = self.lock();
        let s = &g.stats;
        let mut v = json!({
            "status": g.status,
            "total-time": s.total_time_ms,
            "expected-downtime": s.expected_downtime_ms,
            "round": s.round,
            "ram": {
                "total": s.total,
                "transferred": s.transferred,
                "remaining": s.remaining,
                "normal": s.pages_sent,
                "duplicate": s.zero_pages,
                "dirty-pages-rate": s.dirty_rate,
                "mbps": s.bandwidth as f64 * 8.0 / 1e6,
            },
        });
        if let Some(d) = s.downtime_ms {
            v["downtime"] = json!(d);
        }
        if let Some(e) = &g.error {
            v["error-desc"] = json!(e);
        }
        for (k, x) in &g.extra {
            v[k] = x.clone();
        }
        v
    }
}
