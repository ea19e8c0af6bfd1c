//! The source side of pre-copy live migration.
//!
//! Round 0 sends every populated page of every RAM block (holes of the
//! memfds are skipped without being read); each later round sends the pages
//! dirtied meanwhile (KVM's dirty log plus pages devices and the host wrote)
//! and lets devices with live state iterate. When what is left fits the
//! downtime budget at the measured bandwidth (or after `max_rounds`), the
//! vCPUs stop, the last pages, every device's final state and the vCPU
//! state go out, and the destination's acknowledgement completes it.
//! Any failure before that acknowledgement resumes the guest here: the
//! source loses nothing.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, ErrorKind, Read},
    sync::Arc,
    time::{Duration, Instant},
};

use dmhost_plugin_api::PluginError;

use crate::{
    devices::HostDevice,
    vm::{ramblocks::RamBlock, Vm, VmError},
};

use super::{
    connect,
    device_ops::MigrationOps,
    extents::{dirty_pages, populated},
    machine::{block_bytes, config_section, devices, VcpuPayload},
    postcopy::{
        retpath::{read_line_rest, RetMsg, RetPathError},
        source::{self as pc_source, PcBlock},
        AtomicBitmap,
    },
    progress::{Progress, Status},
    DeviceStage, MigrationStream, MigrationUri, StreamError, StreamWriter, TransportError, PAGE_SIZE,
};

/// Why a migration failed. The source VM keeps running after any of them.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("migration stream: {0}")]
    Stream(#[from] StreamError),
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    #[error("device {id}: {what} failed: {source}")]
    Device { id: String, what: &'static str, source: PluginError },
    #[error("cancelled")]
    Cancelled,
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("no acknowledgement from the destination: {0}")]
    NoAck(String),
    #[error("dirty pages of {block}: {source}")]
    Scan { block: String, source: std::io::Error },
    #[error("vCPU state encoding: {0}")]
    Encode(String),
    #[error("{0}")]
    Incoming(String),
}

/// What a finished migration measured.
#[derive(Debug, Clone)]
pub struct Summary {
    pub rounds: u32,
    pub bytes: u64,
    pub total_time: Duration,
    pub downtime: Duration,
}

/// Pages sent per stream call: the granularity of progress, bandwidth
/// limiting and cancellation.
const PAGES_PER_STEP: u64 = 1024;
/// Longest a device iterates in one pre-copy round.
const ITERATE_BUDGET: Duration = Duration::from_millis(250);
/// Longest wait for the destination to load and acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);
/// The acknowledgement line a destination sends once it has loaded
/// everything, before it resumes the guest.
pub const ACK_OK: &str = "loaded";
/// The destination's answer to a sync section: `synced TOKEN`.
pub const SYNCED: &str = "synced";
/// Longest wait, with the guest running, for the destination to load what
/// was sent before the switch-over. A 1.1 destination skips the sync
/// section and never answers: it costs this wait and nothing else.
const SYNC_TIMEOUT: Duration = Duration::from_secs(3);

fn dev_err<'a>(d: &'a HostDevice, what: &'static str) -> impl FnOnce(PluginError) -> MigrationError + 'a {
    move |source| MigrationError::Device { id: d.id.clone(), what, source }
}

struct Sender<'a> {
    vm: &'a Vm,
    progress: &'a Progress,
    out: StreamWriter<MigrationStream>,
    blocks: Vec<RamBlock>,
    devices: Vec<Arc<HostDevice>>,
    /// Bytes written in the current rate window and its start.
    window: (u64, Instant),
    pages: Vec<u64>,
    uri: MigrationUri,
    /// Pages left unsent when a round was cut short by the switch to
    /// post-copy, per block: they join the post-copy pending set.
    carry: HashMap<String, Vec<u64>>,
    /// The destination may have resumed the guest: never resume it here.
    committed: bool,
    /// The destination left a sync unanswered (format 1.1): no more.
    sync_unanswered: bool,
    /// Time the last round spent fetching (and re-arming) the dirty logs:
    /// the switch-over spends it again with the guest stopped.
    log_sync: Duration,
}

/// Migrate `vm` to `uri`. On success the source VM stays paused (QEMU's
/// "postmigrate"); on failure it runs again.
pub fn migrate(vm: &Vm, uri: &MigrationUri, progress: &Progress) -> Result<Summary, MigrationError> {
    let started = Instant::now();
    let stream = connect(uri)?;
    let ack = match stream.try_clone() {
        Ok(s) => Some(s),
        Err(TransportError::NoReturnPath) => None,
        Err(e) => return Err(e.into()),
    };
    let mut s = Sender {
        vm,
        progress,
        out: StreamWriter::new(stream)?,
        blocks: vm.ram_blocks(),
        devices: devices(vm),
        window: (0, Instant::now()),
        pages: Vec::new(),
        uri: uri.clone(),
        carry: HashMap::new(),
        committed: false,
        sync_unanswered: false,
        log_sync: Duration::ZERO,
    };
    let total: u64 = s.blocks.iter().map(|b| b.size).sum();
    progress.update(|st| st.total = total);
    vm.enable_dirty_logging(true)?;
    let refusal = ack.as_ref().and_then(|a| a.try_clone().ok());
    let result = s.run(ack, started).map_err(|e| explain(e, refusal));
    if let Err(e) = vm.enable_dirty_logging(false) {
        log::warn!("migration: turning dirty logging off: {e}");
    }
    for d in &s.devices {
        d.lock().save_cleanup();
    }
    if result.is_err() && vm.paused() && !s.committed {
        for d in &s.devices {
            if let Err(e) = d.lock().vm_state_changed(true) {
                log::warn!("migration: device {} on resume: {e}", d.id);
            }
        }
        vm.resume();
        log::warn!("migration failed; the guest runs on here");
    }
    result
}

impl Sender<'_> {
    fn run(&mut self, mut ack: Option<MigrationStream>, started: Instant) -> Result<Summary, MigrationError> {
        let params = self.progress.params();
        self.out.write_config(&config_section(self.vm))?;
        // Start from a clean log: everything is sent in round 0 anyway.
        for b in &self.blocks {
            self.vm.get_and_clear_block_dirty(&b.name)?;
        }
        for d in &self.devices {
            d.lock().save_setup().map_err(dev_err(d, "save_setup"))?;
        }
        self.progress.set_status(Status::Active);

        // Round 0: every populated page.
        let round_start = Instant::now();
        for b in self.blocks.clone() {
            let extents = populated(b.fd, b.fd_offset, b.size)
                .map_err(|source| MigrationError::Scan { block: b.name.clone(), source })?;
            for e in extents {
                self.send_range(&b, e.start / PAGE_SIZE as u64..e.end / PAGE_SIZE as u64)?;
            }
        }
        if self.postcopy_now(ack.is_some()) {
            return self.postcopy_switch(ack, 0, started);
        }
        self.iterate_devices()?;
        let mut last_round = round_start.elapsed();
        log::info!(
            "migration: round 0 sent {} bytes in {:.3} s",
            self.out.bytes_written(),
            last_round.as_secs_f64()
        );

        let mut round = 0;
        // The destination had loaded everything when this round started.
        let mut caught_up = false;
        let mut steady_bw = u64::MAX;
        loop {
            round += 1;
            let t = Instant::now();
            let dirty = self.send_dirty()?;
            if self.postcopy_now(ack.is_some()) {
                return self.postcopy_switch(ack, round, started);
            }
            self.iterate_devices()?;
            let elapsed = t.elapsed().max(Duration::from_micros(1));
            let pending_devices = self.pending_devices(false)?;
            // A round right after a sync starts with empty socket buffers
            // and fills them faster than the destination loads: its own
            // rate overstates the link, so the round before it counts.
            let measured = self.bandwidth();
            let bw = if caught_up { measured.min(steady_bw) } else { measured };
            steady_bw = bw;
            // What would be left to send with the VM stopped: the pages
            // dirtied during this round, at the rate they were dirtied.
            let pending = dirty * PAGE_SIZE as u64 + pending_devices;
            let expected = self.log_sync + Duration::from_secs_f64(pending as f64 / bw.max(1) as f64);
            let rate = (dirty as f64 / last_round.max(elapsed).as_secs_f64()) as u64;
            last_round = elapsed;
            self.progress.update(|st| {
                st.round = round;
                st.remaining = pending;
                st.dirty_rate = rate;
                st.bandwidth = bw;
                st.expected_downtime_ms = expected.as_millis() as u64;
            });
            log::info!(
                "migration: round {round}: {dirty} dirty pages, {pending} bytes pending, {:.0} MB/s, \
                 expected downtime {} ms ({:.1} ms of it re-arming the dirty log)",
                bw as f64 / 1e6,
                expected.as_millis(),
                self.log_sync.as_secs_f64() * 1e3
            );
            let mut converged = false;
            if expected <= params.max_downtime {
                // Devices confirm with their exact figure before we stop.
                let exact = self.pending_devices(true)?;
                let budget = params.max_downtime.saturating_sub(self.log_sync);
                converged = dirty * PAGE_SIZE as u64 + exact <= (bw as f64 * budget.as_secs_f64()) as u64;
            }
            if converged && caught_up {
                break;
            }
            // Close to the end, let the destination load what is still in
            // flight (the guest runs meanwhile) and judge again after one
            // more round, which sends what the guest dirtied in that wait.
            if converged {
                self.sync_destination(ack.as_mut())?;
            }
            caught_up = converged;
            if round >= params.max_rounds {
                log::warn!("migration: not converged after {round} rounds; forcing the switch-over");
                break;
            }
        }
        let summary = self.switch_over(ack, round, started)?;
        Ok(summary)
    }

    /// Wait, with the guest still running, until the destination has
    /// loaded everything sent so far: what is in flight (socket buffers
    /// here grow to tens of MiB) would otherwise be loaded while the guest
    /// is stopped, and count as downtime. Without a return path (a file)
    /// there is nobody to wait for.
    fn sync_destination(&mut self, ret: Option<&mut MigrationStream>) -> Result<(), MigrationError> {
        let Some(ret) = ret.filter(|_| !self.sync_unanswered) else {
            return Ok(());
        };
        let token = self.out.sections();
        self.out.write_sync(token)?;
        let want = format!("{SYNCED} {token}");
        let started = Instant::now();
        let result = loop {
            let left = SYNC_TIMEOUT.saturating_sub(started.elapsed());
            if left.is_zero() {
                break Ok(false);
            }
            ret.set_read_timeout(Some(left));
            let mut first = [0u8; 1];
            match ret.read(&mut first) {
                Ok(0) => break Err(MigrationError::NoAck("the destination closed the connection".into())),
                Ok(_) => match read_line_rest(ret, first.to_vec()) {
                    Ok(line) if line == want => break Ok(true),
                    Ok(line) if line.starts_with(SYNCED) => continue,
                    Ok(line) => break Err(refused(&line)),
                    Err(e) => break Err(MigrationError::NoAck(e.to_string())),
                },
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => break Err(MigrationError::NoAck(e.to_string())),
            }
        };
        ret.set_read_timeout(None);
        match result? {
            true => log::debug!("migration: destination in sync after {:?}", started.elapsed()),
            false => {
                log::warn!(
                    "migration: the destination did not answer the sync section in {SYNC_TIMEOUT:?} \
                     (format 1.1, or far behind); going on without syncs"
                );
                self.sync_unanswered = true;
            }
        }
        Ok(())
    }

    /// Stop the guest, send what is left, wait for the destination.
    fn switch_over(
        &mut self,
        mut ack: Option<MigrationStream>,
        rounds: u32,
        started: Instant,
    ) -> Result<Summary, MigrationError> {
        self.sync_destination(ack.as_mut())?;
        let stop = Instant::now();
        self.vm.pause()?;
        let paused = stop.elapsed();
        self.progress.set_status(Status::Device);
        for d in &self.devices {
            d.lock().vm_state_changed(false).map_err(dev_err(d, "vm_state_changed(stop)"))?;
        }
        let pages = self.send_dirty()?;
        let dirty = stop.elapsed();
        self.send_final_state()?;
        let bytes = self.out.bytes_written();
        self.out.write_end()?;
        let sent = stop.elapsed();
        if let Some(ack) = ack {
            wait_ack(ack)?;
        }
        let downtime = stop.elapsed();
        log::debug!(
            "migration: switch-over: vCPUs paused after {paused:?}, {pages} dirty pages sent by {dirty:?}, \
             device and vCPU state by {sent:?}, destination loaded by {downtime:?}"
        );
        self.progress.update(|st| {
            st.transferred = bytes;
            st.remaining = 0;
            st.downtime_ms = Some(downtime.as_millis() as u64);
        });
        log::info!("migration: completed, {bytes} bytes, downtime {:.1} ms", downtime.as_secs_f64() * 1e3);
        Ok(Summary { rounds, bytes, total_time: started.elapsed(), downtime })
    }

    /// The pages of `b` dirtied since the last call (KVM's log and
    /// `mark_dirty`), plus those a cut-short round left for later; the
    /// time the dirty log took is added to `log_sync`.
    fn take_dirty(&mut self, b: &RamBlock) -> Result<Vec<u64>, MigrationError> {
        let t = Instant::now();
        let mut bitmap = self.vm.get_and_clear_block_dirty(&b.name)?;
        self.log_sync += t.elapsed();
        if let Some(c) = self.carry.remove(&b.name) {
            for (w, x) in bitmap.iter_mut().zip(c) {
                *w |= x;
            }
        }
        Ok(bitmap)
    }

    /// Send the pages dirtied since the last call; returns how many.
    fn send_dirty(&mut self) -> Result<u64, MigrationError> {
        let mut count = 0;
        self.log_sync = Duration::ZERO;
        for b in self.blocks.clone() {
            let bitmap = self.take_dirty(&b)?;
            let mut pages = std::mem::take(&mut self.pages);
            pages.clear();
            dirty_pages(&bitmap, &mut pages);
            count += pages.len() as u64;
            for (n, chunk) in pages.chunks(PAGES_PER_STEP as usize).enumerate() {
                self.check_cancel()?;
                if self.progress.postcopy_requested() {
                    let rest = pages[n * PAGES_PER_STEP as usize..].to_vec();
                    self.carry_pages(&b, rest);
                    break;
                }
                // SAFETY: the block stays registered for the migration (its
                // device cannot be removed while the VM's device list is
                // held by the engine); concurrent guest writes are re-sent.
                let mem = unsafe { block_bytes(&b) };
                let st = self.out.write_ram_pages(&b.name, mem, chunk)?;
                self.account(st);
            }
            self.pages = pages;
        }
        Ok(count)
    }

    fn send_range(&mut self, b: &RamBlock, pages: std::ops::Range<u64>) -> Result<(), MigrationError> {
        let mut at = pages.start;
        while at < pages.end {
            self.check_cancel()?;
            if self.progress.postcopy_requested() {
                self.carry_pages(b, at..pages.end);
                return Ok(());
            }
            let end = (at + PAGES_PER_STEP).min(pages.end);
            // SAFETY: as in `send_dirty`.
            let mem = unsafe { block_bytes(b) };
            let st = self.out.write_ram_range(&b.name, mem, at..end)?;
            self.account(st);
            at = end;
        }
        Ok(())
    }

    fn carry_pages(&mut self, b: &RamBlock, pages: impl IntoIterator<Item = u64>) {
        let words = (b.size / PAGE_SIZE as u64).div_ceil(64) as usize;
        let bm = self.carry.entry(b.name.clone()).or_insert_with(|| vec![0; words]);
        for p in pages {
            if let Some(w) = bm.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// Whether to switch to post-copy now: asked for, possible, and not
    /// blocked by a device (which says why in `query-migrate`).
    fn postcopy_now(&mut self, return_path: bool) -> bool {
        if !self.progress.postcopy_requested() {
            return false;
        }
        let blocked = if !return_path {
            Some("post-copy needs a return path (tcp: or unix:, not file:)".to_owned())
        } else {
            let bw = self.progress.stats().bandwidth;
            postcopy_blocker(&self.devices, bw, self.progress.params().max_downtime)
        };
        self.progress.set_extra("postcopy-devices", device_report(&self.devices));
        if let Some(why) = blocked {
            log::warn!("migration: post-copy blocked: {why}; pre-copy goes on");
            self.progress.set_extra("postcopy-blocked", serde_json::json!(why));
            self.progress.request_postcopy(false);
            // Pages carried over for post-copy go in the next round.
            return false;
        }
        true
    }

    /// Stop the guest, send device and vCPU state and the pages still to
    /// come, let the destination run, and serve its pages until all are
    /// there. From the run section on, the guest never runs here again.
    fn postcopy_switch(
        &mut self,
        ack: Option<MigrationStream>,
        rounds: u32,
        started: Instant,
    ) -> Result<Summary, MigrationError> {
        let mut ret = ack.ok_or_else(|| MigrationError::Incoming("post-copy needs a return path".into()))?;
        // The pages dirty so far go pending while the guest still runs here,
        // and the sync waits for the destination to discard them (tens of
        // ms for 128 MiB on this host): only what the guest dirties in the
        // last moments is discarded while it is stopped.
        let mut early = Vec::new();
        for b in self.blocks.clone() {
            let mut bitmap = self.take_dirty(&b)?;
            bitmap.resize((b.size / PAGE_SIZE as u64).div_ceil(64) as usize, 0);
            self.out.write_postcopy_pending(&b.name, &bitmap)?;
            early.push(bitmap);
        }
        self.sync_destination(Some(&mut ret))?;
        let stop = Instant::now();
        self.vm.pause()?;
        self.progress.set_status(Status::Device);
        for d in &self.devices {
            d.lock().vm_state_changed(false).map_err(dev_err(d, "vm_state_changed(stop)"))?;
        }
        let mut pc_blocks = Vec::new();
        for (b, mut pending) in self.blocks.clone().into_iter().zip(early) {
            let mut last = self.take_dirty(&b)?;
            let pages = b.size / PAGE_SIZE as u64;
            last.resize(pending.len(), 0);
            self.out.write_postcopy_pending(&b.name, &last)?;
            for (w, x) in pending.iter_mut().zip(&last) {
                *w |= x;
            }
            pc_blocks.push(PcBlock { unsent: AtomicBitmap::from_words(&pending, pages), pending, block: b });
        }
        let pending: u64 = pc_blocks.iter().map(|b| b.unsent.count()).sum();
        let bitmaps = stop.elapsed();
        self.send_final_state()?;
        self.out.flush()?;
        let sent = stop.elapsed();
        ret.set_read_timeout(Some(pc_source::HANDSHAKE_TIMEOUT));
        let config = config_section(self.vm);
        match RetMsg::read(&mut ret, &config) {
            Ok(RetMsg::Ready) => {}
            Ok(other) => {
                return Err(MigrationError::Refused(format!("expected post-copy readiness, got {other:?}")))
            }
            Err(RetPathError::Remote(m)) => return Err(MigrationError::Refused(m)),
            Err(e) => return Err(MigrationError::NoAck(e.to_string())),
        }
        ret.set_read_timeout(None);
        let ready = stop.elapsed();
        let urgent = pc_source::connect_urgent(&self.uri, &config)?;
        // From here on the destination may run the guest.
        self.committed = true;
        self.out.write_postcopy_run()?;
        let downtime = stop.elapsed();
        log::debug!(
            "migration: post-copy switch: pending bitmaps sent by {bitmaps:?}, device and vCPU state by \
             {sent:?}, destination ready by {ready:?}, run sent by {downtime:?}"
        );
        self.progress.update(|st| st.downtime_ms = Some(downtime.as_millis() as u64));
        log::info!(
            "migration: post-copy after {rounds} rounds: guest stopped for {:.1} ms, {pending} pages still to send",
            downtime.as_secs_f64() * 1e3
        );
        // The main stream moves to the post-copy session; what stays here
        // is a writer to nowhere (nothing writes to it any more).
        let out = std::mem::replace(
            &mut self.out,
            StreamWriter::new(MigrationStream::FileWrite(std::io::BufWriter::new(null_file()?)))?,
        );
        let session = pc_source::Session { main: out, ret, urgent };
        let requests = pc_source::run(&pc_blocks, &config, session, self.progress)?;
        let bytes = self.progress.stats().transferred;
        self.progress.update(|st| st.remaining = 0);
        log::info!(
            "migration: post-copy completed, {requests} pages requested, {:.3} s in all",
            started.elapsed().as_secs_f64()
        );
        Ok(Summary { rounds, bytes, total_time: started.elapsed(), downtime })
    }

    /// Every device's final state and the vCPU and VM state (VM stopped).
    fn send_final_state(&mut self) -> Result<(), MigrationError> {
        for d in &self.devices {
            let mut dev = d.lock();
            let version = dev.state_version();
            let data = dev.save_live_complete_precopy().map_err(dev_err(d, "save_live_complete_precopy"))?;
            self.out.write_device(&d.kind, &d.id, version, DeviceStage::Complete, &data)?;
        }
        let mut vm_state = Some(self.vm.save_vm_state()?);
        for (i, vcpu) in self.vm.save_vcpu_state()?.into_iter().enumerate() {
            let payload = VcpuPayload { vcpu, vm: vm_state.take() };
            let data = serde_json::to_vec(&payload).map_err(|e| MigrationError::Encode(e.to_string()))?;
            self.out.write_vcpu(i as u32, &data)?;
        }
        Ok(())
    }

    /// Let every device with live state iterate: block after block until
    /// it has nothing more for now, or for at most [`ITERATE_BUDGET`] per
    /// device and round (a device dirtying faster than the link must not
    /// hold the RAM rounds up).
    fn iterate_devices(&mut self) -> Result<(), MigrationError> {
        for d in &self.devices {
            let mut dev = d.lock();
            let started = Instant::now();
            while dev.is_active_iterate() && started.elapsed() < ITERATE_BUDGET {
                self.check_cancel()?;
                let version = dev.state_version();
                let chunk = dev.save_live_iterate().map_err(dev_err(d, "save_live_iterate"))?;
                if !chunk.data.is_empty() {
                    self.out.write_device(&d.kind, &d.id, version, DeviceStage::Iterate, &chunk.data)?;
                    self.window.0 += chunk.data.len() as u64;
                }
                if chunk.complete || chunk.data.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }

    fn pending_devices(&mut self, exact: bool) -> Result<u64, MigrationError> {
        let mut sum = 0u64;
        for d in &self.devices {
            let mut dev = d.lock();
            let p = if exact {
                dev.state_pending_exact().map_err(dev_err(d, "state_pending_exact"))?
            } else {
                dev.state_pending_estimate().map_err(dev_err(d, "state_pending_estimate"))?
            };
            sum = sum.saturating_add(p.must_precopy).saturating_add(p.can_postcopy);
        }
        Ok(sum)
    }

    fn account(&mut self, st: super::RamStats) {
        let transferred = self.out.bytes_written();
        self.progress.update(|s| {
            s.transferred = transferred;
            s.pages_sent += st.pages - st.zero_pages;
            s.zero_pages += st.zero_pages;
        });
        self.window.0 += st.bytes;
        let limit = self.progress.params().max_bandwidth;
        if limit > 0 {
            // Sleep off any excess over the limit in this window.
            let due = Duration::from_secs_f64(self.window.0 as f64 / limit as f64);
            let elapsed = self.window.1.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
    }

    /// Measured bytes per second since the last call (at least one page per
    /// millisecond, so a quiet round does not divide by zero).
    fn bandwidth(&mut self) -> u64 {
        let (bytes, since) = self.window;
        let secs = since.elapsed().as_secs_f64().max(1e-3);
        self.window = (0, Instant::now());
        ((bytes as f64 / secs) as u64).max(PAGE_SIZE as u64 * 1000)
    }

    fn check_cancel(&self) -> Result<(), MigrationError> {
        if self.progress.cancelled() {
            Err(MigrationError::Cancelled)
        } else {
            Ok(())
        }
    }
}

fn null_file() -> Result<std::fs::File, MigrationError> {
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .map_err(|e| MigrationError::Incoming(format!("/dev/null: {e}")))
}

/// The first device that keeps post-copy from starting, and why: one
/// whose state must go before the switch-over (`must_precopy`) and would
/// not fit the downtime budget at the measured bandwidth, or one that
/// cannot say how much it has.
pub fn postcopy_blocker(
    devices: &[Arc<HostDevice>],
    bandwidth: u64,
    max_downtime: Duration,
) -> Option<String> {
    let budget = (bandwidth as f64 * max_downtime.as_secs_f64()) as u64;
    for d in devices {
        match d.lock().state_pending_exact() {
            Err(e) => return Some(format!("device {} cannot report its pending state: {e}", d.id)),
            Ok(p) if bandwidth > 0 && p.must_precopy > budget => {
                return Some(format!(
                    "device {} has {} bytes that must be sent before the switch-over (must_precopy), more than the {} ms downtime limit allows at {} bytes/s",
                    d.id,
                    p.must_precopy,
                    max_downtime.as_millis(),
                    bandwidth
                ))
            }
            Ok(_) => {}
        }
    }
    None
}

/// What each device does at the switch to post-copy, for `query-migrate`.
pub fn device_report(devices: &[Arc<HostDevice>]) -> serde_json::Value {
    let list: Vec<_> = devices
        .iter()
        .map(|d| {
            let p = d.lock().state_pending_estimate();
            let (must, can) = p.map(|p| (p.must_precopy, p.can_postcopy)).unwrap_or((0, 0));
            serde_json::json!({
                "id": d.id,
                "kind": d.kind,
                "must-precopy": must,
                "can-postcopy": can,
                "postcopy": if can == 0 {
                    "no: finishes in pre-copy (its state goes with the vCPU state at the switch-over)"
                } else {
                    "its post-copy state goes at the switch-over"
                },
            })
        })
        .collect();
    serde_json::Value::Array(list)
}

/// A write that failed because the destination hung up may have a reason
/// waiting on the return path (it says why before closing): prefer it.
fn explain(e: MigrationError, ret: Option<MigrationStream>) -> MigrationError {
    let (MigrationError::Stream(StreamError::Io(_)), Some(ret)) = (&e, ret) else {
        return e;
    };
    let timeout = Some(Duration::from_secs(2));
    match &ret {
        MigrationStream::Tcp(s) => drop(s.set_read_timeout(timeout)),
        MigrationStream::Unix(s) => drop(s.set_read_timeout(timeout)),
        _ => {}
    }
    let mut line = String::new();
    match BufReader::new(ret).read_line(&mut line) {
        Ok(_) if line.starts_with("error: ") => refused(line.trim_end()),
        _ => e,
    }
}

/// Wait for the destination's "loaded" line on the return path (a late
/// answer to a sync that timed out may come first).
fn wait_ack(stream: MigrationStream) -> Result<(), MigrationError> {
    stream.set_read_timeout(Some(ACK_TIMEOUT));
    let mut r = BufReader::new(stream);
    loop {
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| MigrationError::NoAck(e.to_string()))?;
        return match line.trim_end() {
            ACK_OK => Ok(()),
            "" => Err(MigrationError::NoAck("the connection closed".into())),
            other if other.starts_with(SYNCED) => continue,
            other => Err(refused(other)),
        };
    }
}

/// A line the destination sent instead of the expected one: its reason
/// (`error: REASON`), or the line itself.
fn refused(line: &str) -> MigrationError {
    MigrationError::Refused(line.strip_prefix("error: ").unwrap_or(line).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ack_after(lines: &[u8]) -> Result<(), MigrationError> {
        let (mut dst, src) = std::os::unix::net::UnixStream::pair().unwrap();
        dst.write_all(lines).unwrap();
        drop(dst);
        wait_ack(MigrationStream::Unix(src))
    }

    #[test]
    fn the_ack_wait_skips_late_sync_answers_only() {
        ack_after(b"synced 7\nloaded\n").unwrap();
        match ack_after(b"synced 7\nerror: disk full\n") {
            Err(MigrationError::Refused(why)) => assert_eq!(why, "disk full"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ack_after(b"synced 7\n"), Err(MigrationError::NoAck(_))));
        assert!(matches!(ack_after(b"weird\n"), Err(MigrationError::Refused(_))));
    }
}
