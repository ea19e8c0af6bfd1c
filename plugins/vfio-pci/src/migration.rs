//! VFIO migration v2 for the PCI front end, shaped like QEMU's
//! hw/vfio/migration.c with its pre-copy support:
//!
//! - `save_setup` moves a RUNNING device to PRE_COPY when the device
//!   supports it and `x-allow-pre-copy` allows;
//! - `state_pending_estimate` answers from the cached pre-copy sizes,
//!   `state_pending_exact` asks the device (stop-copy size + pre-copy info);
//! - `save_live_iterate` reads one block in PRE_COPY; ENOMSG means "nothing
//!   for now";
//! - the VM stopping moves PRE_COPY (or RUNNING) to STOP_COPY while saving,
//!   to STOP otherwise; `save_live_complete_precopy` drains STOP_COPY data;
//! - `load_setup` → RESUMING, `load_state` writes data, `load_cleanup` →
//!   STOP (the device validates), and the VM starting → RUNNING.
//!
//! A failed transition that leaves the device in ERROR resets it (the only
//! way out, per the uAPI) and the migration fails with an error.
//!
//! Section format: records of `flag:u64 len:u64 payload`, flags as QEMU's
//! `VFIO_MIG_FLAG_*` delimiters.

use dmhost_plugin_api::{vfio::VFIO_MIGRATION_PRE_COPY, MigState, PendingSize, SaveChunk, VfioPrecopyInfo};
use thiserror::Error;

use crate::backend::{BackendError, VfioBackend};

pub const STATE_VERSION: u32 = 1;
/// Bytes read from the device per block (QEMU's default data buffer).
pub const DATA_BUFFER_SIZE: usize = 1 << 20;
pub const FLAG_END_OF_STATE: u64 = 0xffff_ffff_ef10_0001;
pub const FLAG_DEV_CONFIG_STATE: u64 = 0xffff_ffff_ef10_0002;
pub const FLAG_DEV_DATA_STATE: u64 = 0xffff_ffff_ef10_0004;
/// Upper bound on one STOP_COPY read-out, against a runaway driver.
const MAX_STOP_COPY: u64 = 64 << 30;

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("device cannot migrate (no VFIO migration v2 support)")]
    NotSupported,
    #[error("{what}")]
    Backend { what: String, source: BackendError },
    #[error("device state version {0} is not supported (this plugin loads {STATE_VERSION})")]
    Version(u32),
    #[error("malformed vfio-pci migration section: {0}")]
    Stream(String),
    #[error("migration data arrived while the device is {0}, not RESUMING")]
    NotResuming(MigState),
    #[error("STOP_COPY data exceeded {MAX_STOP_COPY} bytes")]
    Runaway,
}

impl MigrationError {
    fn backend(what: impl Into<String>, source: BackendError) -> Self {
        Self::Backend { what: format!("{}: {source}", what.into()), source }
    }
}

type Result<T> = std::result::Result<T, MigrationError>;

#[derive(Debug)]
pub struct Migration {
    flags: u64,
    allow_precopy: bool,
    state: MigState,
    saving: bool,
    precopy: VfioPrecopyInfo,
    buf: Vec<u8>,
}

fn record(out: &mut Vec<u8>, flag: u64, payload: &[u8]) {
    out.extend_from_slice(&flag.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
}

impl Migration {
    pub fn new(backend: &dyn VfioBackend, allow_precopy: bool) -> Self {
        let flags = backend.migration_flags();
        let state =
            if flags == 0 { MigState::Running } else { backend.mig_state().unwrap_or(MigState::Running) };
        Self { flags, allow_precopy, state, saving: false, precopy: Default::default(), buf: Vec::new() }
    }

    pub fn state(&self) -> MigState {
        self.state
    }

    pub fn supported(&self) -> bool {
        self.flags != 0
    }

    fn precopy_state(&self) -> bool {
        matches!(self.state, MigState::PreCopy | MigState::PreCopyP2p)
    }

    /// Move the device to `target`; on failure recover as the uAPI says.
    pub fn set_state(&mut self, backend: &mut dyn VfioBackend, target: MigState) -> Result<()> {
        if !self.supported() {
            return Err(MigrationError::NotSupported);
        }
        let from = self.state;
        match backend.set_mig_state(target) {
            Ok(()) => {
                log::debug!("vfio-pci: {} {from} -> {target}", backend.describe());
                self.state = target;
                Ok(())
            }
            Err(e) => {
                let now = backend.mig_state().unwrap_or(MigState::Error);
                log::warn!(
                    "vfio-pci: {} {from} -> {target} failed ({e}); device is {now}",
                    backend.describe()
                );
                self.state = now;
                if now == MigState::Error {
                    match backend.reset() {
                        Ok(()) => self.state = backend.mig_state().unwrap_or(MigState::Error),
                        Err(r) => {
                            log::error!("vfio-pci: {} reset after ERROR failed: {r}", backend.describe())
                        }
                    }
                }
                Err(MigrationError::backend(format!("{from} -> {target}"), e))
            }
        }
    }

    fn refresh_precopy(&mut self, backend: &dyn VfioBackend) {
        if self.precopy_state() {
            match backend.precopy_info() {
                Ok(info) => self.precopy = info,
                Err(e) => log::warn!("vfio-pci: precopy info: {e}"),
            }
        } else {
            self.precopy = VfioPrecopyInfo::default();
        }
    }

    pub fn save_setup(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        if !self.supported() {
            return Err(MigrationError::NotSupported);
        }
        self.saving = true;
        self.buf = vec![0; DATA_BUFFER_SIZE];
        let can_precopy = self.flags & VFIO_MIGRATION_PRE_COPY != 0 && self.allow_precopy;
        if can_precopy && self.state == MigState::Running {
            self.set_state(backend, MigState::PreCopy)?;
        }
        self.refresh_precopy(backend);
        Ok(())
    }

    pub fn pending_estimate(&self) -> PendingSize {
        let must = if self.precopy_state() {
            self.precopy.initial_bytes.saturating_add(self.precopy.dirty_bytes)
        } else {
            0
        };
        PendingSize { must_precopy: must, can_postcopy: 0 }
    }

    pub fn pending_exact(&mut self, backend: &dyn VfioBackend) -> PendingSize {
        if !self.supported() {
            return PendingSize::default();
        }
        let stop_copy = backend.stop_copy_size().unwrap_or_else(|e| {
            log::debug!("vfio-pci: stop-copy size: {e}");
            0
        });
        self.refresh_precopy(backend);
        let extra = self.pending_estimate().must_precopy;
        PendingSize { must_precopy: stop_copy.saturating_add(extra), can_postcopy: 0 }
    }

    pub fn is_active_iterate(&self) -> bool {
        self.saving && self.precopy_state()
    }

    /// One pre-copy block.
    pub fn save_iterate(&mut self, backend: &mut dyn VfioBackend) -> Result<SaveChunk> {
        if !self.is_active_iterate() {
            return Ok(SaveChunk { data: Default::default(), complete: true });
        }
        if self.buf.len() != DATA_BUFFER_SIZE {
            self.buf = vec![0; DATA_BUFFER_SIZE];
        }
        let n = match backend.read_mig_data(&mut self.buf) {
            Ok(n) => n,
            Err(BackendError::NoData) => 0,
            Err(e) => return Err(MigrationError::backend("pre-copy read", e)),
        };
        let mut out = Vec::new();
        if n == 0 {
            // Pre-copy emptied the device state for now.
            self.precopy = VfioPrecopyInfo::default();
        } else {
            record(&mut out, FLAG_DEV_DATA_STATE, &self.buf[..n]);
            let n = n as u64;
            let from_initial = self.precopy.initial_bytes.min(n);
            self.precopy.initial_bytes -= from_initial;
            self.precopy.dirty_bytes = self.precopy.dirty_bytes.saturating_sub(n - from_initial);
        }
        let complete = self.precopy.initial_bytes == 0 && self.precopy.dirty_bytes == 0;
        Ok(SaveChunk { data: out.into(), complete })
    }

    pub fn vm_state_changed(&mut self, backend: &mut dyn VfioBackend, running: bool) -> Result<()> {
        if !self.supported() {
            return Ok(());
        }
        use MigState::*;
        let target = match (running, self.state) {
            (false, Running | RunningP2p | PreCopy | PreCopyP2p) if self.saving => StopCopy,
            (false, Running | RunningP2p | PreCopy | PreCopyP2p) => Stop,
            (true, Stop | StopCopy | RunningP2p) => Running,
            _ => return Ok(()),
        };
        self.set_state(backend, target)
    }

    /// The final section: the rest of the device data, then `config`.
    pub fn save_complete(&mut self, backend: &mut dyn VfioBackend, config: &[u8]) -> Result<Vec<u8>> {
        if !self.supported() {
            return Err(MigrationError::NotSupported);
        }
        if self.state != MigState::StopCopy {
            self.set_state(backend, MigState::StopCopy)?;
        }
        if self.buf.len() != DATA_BUFFER_SIZE {
            self.buf = vec![0; DATA_BUFFER_SIZE];
        }
        let mut out = Vec::new();
        let mut total = 0u64;
        loop {
            let n = backend
                .read_mig_data(&mut self.buf)
                .map_err(|e| MigrationError::backend("stop-copy read", e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > MAX_STOP_COPY {
                return Err(MigrationError::Runaway);
            }
            record(&mut out, FLAG_DEV_DATA_STATE, &self.buf[..n]);
        }
        record(&mut out, FLAG_DEV_CONFIG_STATE, config);
        record(&mut out, FLAG_END_OF_STATE, &[]);
        log::debug!("vfio-pci: {} stop-copy sent {total} bytes", backend.describe());
        Ok(out)
    }

    pub fn save_cleanup(&mut self, backend: &mut dyn VfioBackend) {
        self.saving = false;
        self.buf = Vec::new();
        self.precopy = VfioPrecopyInfo::default();
        // STOP_COPY -> STOP after migration, off the downtime path; an
        // abandoned pre-copy goes back to RUNNING.
        let target = match self.state {
            MigState::StopCopy => MigState::Stop,
            MigState::PreCopy | MigState::PreCopyP2p => MigState::Running,
            _ => return,
        };
        if let Err(e) = self.set_state(backend, target) {
            log::warn!("vfio-pci: save cleanup: {e}");
        }
    }

    pub fn load_setup(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        if !self.supported() {
            return Err(MigrationError::NotSupported);
        }
        self.set_state(backend, MigState::Resuming)
    }

    /// Load one section; returns the config-space bytes when it carries them.
    pub fn load_state(
        &mut self,
        backend: &mut dyn VfioBackend,
        version: u32,
        mut data: &[u8],
    ) -> Result<Option<Vec<u8>>> {
        if version != STATE_VERSION {
            return Err(MigrationError::Version(version));
        }
        let mut config = None;
        while !data.is_empty() {
            if data.len() < 16 {
                return Err(MigrationError::Stream(format!("{} stray bytes", data.len())));
            }
            let flag = u64::from_le_bytes(data[0..8].try_into().unwrap_or_default());
            let len = u64::from_le_bytes(data[8..16].try_into().unwrap_or_default());
            let body = data.get(16..).unwrap_or_default();
            let len = usize::try_from(len).ok().filter(|&l| l <= body.len()).ok_or_else(|| {
                MigrationError::Stream(format!("record of {len} bytes, {} left", body.len()))
            })?;
            let (payload, rest) = body.split_at(len);
            match flag {
                FLAG_DEV_DATA_STATE => {
                    if self.state != MigState::Resuming {
                        return Err(MigrationError::NotResuming(self.state));
                    }
                    backend
                        .write_mig_data(payload)
                        .map_err(|e| MigrationError::backend("migration data write", e))?;
                }
                FLAG_DEV_CONFIG_STATE => config = Some(payload.to_vec()),
                FLAG_END_OF_STATE if payload.is_empty() => {}
                _ => return Err(MigrationError::Stream(format!("unknown record {flag:#x}"))),
            }
            data = rest;
        }
        Ok(config)
    }

    pub fn load_cleanup(&mut self, backend: &mut dyn VfioBackend) -> Result<()> {
        if self.state == MigState::Resuming {
            self.set_state(backend, MigState::Stop)?;
        }
        Ok(())
    }
}
