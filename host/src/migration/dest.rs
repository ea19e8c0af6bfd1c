//! The destination side: receive a migration stream into a VM built from
//! the same configuration, then resume the guest.
//!
//! Nothing runs until the whole stream has been read and checked: a bad
//! stream (wrong version, unknown device, bad checksum, truncation) leaves
//! this VM unstarted and the error says what was wrong; the source, which
//! gets no acknowledgement, keeps running.
//!
//! A post-copy stream (format 1.1) is different: at its run section the
//! guest resumes here while [`super::postcopy::dest`] brings the rest of
//! its RAM in.

use std::{collections::BTreeMap, io::Write, sync::Arc, time::Instant};

use crate::{
    devices::HostDevice,
    vm::{ramblocks::RamBlock, DetachedSlots, Vm},
};

use super::{
    check_compatibility,
    device_ops::MigrationOps,
    machine::{block_bytes_mut, config_section, devices, VcpuPayload},
    postcopy::{
        self,
        dest::{accept_urgent, PostcopyDestError, Shared as PcShared},
        retpath::RetMsg,
    },
    progress::{Progress, Status},
    source::{MigrationError, ACK_OK, SYNCED},
    MigrationListener, MigrationStream, Section, StreamReader, PAGE_SIZE,
};

/// What an incoming migration loaded.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub bytes: u64,
    pub ram_batches: u64,
    pub device_sections: u64,
    /// The guest may run while post-copy brings the rest of its RAM.
    pub postcopy: bool,
}

/// Accept one migration on `listener` and load it into `vm` (created with
/// the same configuration, not started). On success the vCPU state is
/// restored and the caller starts the VM.
pub fn incoming(vm: &Vm, listener: MigrationListener) -> Result<Received, MigrationError> {
    incoming_with(vm, listener, Arc::new(Progress::default()))
}

/// [`incoming`], reporting to `progress` (the destination's
/// `query-migrate`). A post-copy migration returns as soon as the guest
/// may run; its pages keep arriving on threads that `progress` reports on.
pub fn incoming_with(
    vm: &Vm,
    listener: MigrationListener,
    progress: Arc<Progress>,
) -> Result<Received, MigrationError> {
    let stream = listener.accept_next()?;
    let _ = progress.begin();
    progress.set_status(Status::Active);
    let started = Instant::now();
    let ack = stream.try_clone().ok();
    let result = load(vm, stream, &listener, &progress);
    match (&result, ack) {
        (Ok(r), _) if r.postcopy => {
            log::info!(
                "migration: switched to post-copy after {} bytes in {:.3} s; the guest resumes",
                r.bytes,
                started.elapsed().as_secs_f64()
            );
        }
        (Ok(_), Some(mut ack)) => {
            // Resume only if the source heard us: otherwise it resumes too.
            reply(&mut ack, ACK_OK)
                .map_err(|e| MigrationError::NoAck(format!("cannot acknowledge to the source: {e}")))?;
            progress.set_status(Status::Completed);
        }
        (Err(e), Some(mut ack)) => {
            progress.fail(e.to_string(), false);
            let _ = reply(&mut ack, &format!("error: {e}"));
        }
        (Ok(_), None) => progress.set_status(Status::Completed),
        (Err(e), None) => progress.fail(e.to_string(), false),
    }
    if let Some(r) = result.as_ref().ok().filter(|r| !r.postcopy) {
        log::info!(
            "migration: received {} bytes ({} RAM batches, {} device sections) in {:.3} s",
            r.bytes,
            r.ram_batches,
            r.device_sections,
            started.elapsed().as_secs_f64()
        );
    }
    listener.close();
    result
}

/// One line to the source on the return path, sent at once in one
/// segment: the stream socket has Nagle on, and a line split over several
/// writes could be held back until the close, whose RST (the source's
/// data is still unread) would discard it.
fn reply(ack: &mut MigrationStream, line: &str) -> std::io::Result<()> {
    ack.set_nodelay();
    ack.write_all(format!("{line}\n").as_bytes())?;
    ack.flush()
}

/// RAM data after which the destination loads with the KVM memory slots
/// detached ([`crate::vm::kvm::KvmVm::detach_slots`]: fresh pages fill
/// faster so). Below it the detach and the re-attach (about 1 ms each here
/// for GiB-sized slots, the re-attach inside the downtime) cost more than
/// they save.
const DETACH_AFTER: u64 = 64 << 20;

fn load(
    vm: &Vm,
    stream: MigrationStream,
    listener: &MigrationListener,
    progress: &Arc<Progress>,
) -> Result<Received, MigrationError> {
    let mut ret = stream.try_clone().ok();
    let mut reader = StreamReader::new(stream)?;
    let local = config_section(vm);
    let incoming = match reader.next_section()? {
        Section::Config(incoming) => {
            check_compatibility(&local, &incoming)
                .map_err(|e| MigrationError::Incoming(format!("incompatible configuration: {e}")))?;
            incoming
        }
        other => {
            return Err(MigrationError::Incoming(format!(
                "stream starts with a {} section, not the configuration",
                super::section_name(other.type_code())
            )))
        }
    };
    // Taken out once much RAM arrives, back before the guest runs.
    let mut slots: Option<DetachedSlots<'_>> = None;
    let mut ram_bytes = 0u64;
    let blocks: BTreeMap<String, _> = vm.ram_blocks().into_iter().map(|b| (b.name.clone(), b)).collect();
    let devs: BTreeMap<String, Arc<HostDevice>> =
        devices(vm).into_iter().map(|d| (d.id.clone(), d)).collect();
    for d in devs.values() {
        d.lock().load_setup().map_err(|source| MigrationError::Device {
            id: d.id.clone(),
            what: "load_setup",
            source,
        })?;
    }
    let mut got = Received::default();
    let mut vcpus = Vec::new();
    let mut vm_state = None;
    let mut postcopy: Option<Arc<PcShared>> = None;
    let pc_err = |e: PostcopyDestError| MigrationError::Incoming(format!("post-copy: {e}"));
    loop {
        match reader.next_section()? {
            Section::Config(_) => {
                return Err(MigrationError::Incoming("a second configuration section".into()))
            }
            Section::Ram(batch) => {
                ram_bytes += (batch.data_pages() * PAGE_SIZE) as u64;
                if slots.is_none() && ram_bytes > DETACH_AFTER {
                    slots = Some(vm.detach_memory_slots()?);
                    log::info!(
                        "migration: {} MiB of RAM data so far: loading the rest with the KVM memory slots detached",
                        ram_bytes >> 20
                    );
                }
                let block = blocks.get(&batch.block).ok_or_else(|| {
                    MigrationError::Incoming(format!("RAM of unknown block {:?}", batch.block))
                })?;
                // SAFETY: the VM is not running and the block is registered
                // for the VM's lifetime; nothing else touches it meanwhile.
                let mem = unsafe { block_bytes_mut(block) };
                match memfd_of(block) {
                    Some(file) => reader.read_ram_into_file(&batch, mem, &file, block.fd_offset)?,
                    None => reader.read_ram_into(&batch, mem)?,
                }
                got.ram_batches += 1;
                if got.ram_batches % 64 == 0 {
                    let n = reader.offset();
                    progress.update(|s| s.transferred = n);
                }
            }
            Section::Device(s) => {
                let d = devs.get(&s.id).filter(|d| d.kind == s.kind).ok_or_else(|| {
                    MigrationError::Incoming(format!("state for unknown device {} ({})", s.id, s.kind))
                })?;
                d.lock().load_state(s.version, &s.data).map_err(|source| MigrationError::Device {
                    id: d.id.clone(),
                    what: "load_state",
                    source,
                })?;
                got.device_sections += 1;
            }
            Section::Vcpu(s) => {
                let p: VcpuPayload = serde_json::from_slice(&s.data)
                    .map_err(|e| MigrationError::Incoming(format!("vCPU {} state: {e}", s.index)))?;
                if let Some(v) = p.vm {
                    vm_state = Some(v);
                }
                vcpus.push((s.index, p.vcpu));
                if let (Some(pc), true) = (&postcopy, vcpus.len() == vm.vcpu_count() as usize) {
                    // Everything but RAM is here: load it, catch faults,
                    // and tell the source we are ready to run.
                    let t = Instant::now();
                    finish_load(vm, &devs, std::mem::take(&mut vcpus), vm_state.take())?;
                    let loaded = t.elapsed();
                    pc.register().map_err(pc_err)?;
                    log::debug!(
                        "migration: post-copy: state loaded in {loaded:?}, RAM registered by {:?}",
                        t.elapsed()
                    );
                    let w = ret
                        .as_mut()
                        .ok_or_else(|| MigrationError::Incoming("post-copy needs a return path".into()))?;
                    w.set_nodelay();
                    RetMsg::Ready.send(w).map_err(|e| MigrationError::NoAck(e.to_string()))?;
                }
            }
            Section::PostcopyPending { block, bitmap } => {
                let pc = match &postcopy {
                    Some(pc) => Arc::clone(pc),
                    None => {
                        let pc =
                            Arc::new(PcShared::new(vm, &incoming, Arc::clone(progress)).map_err(pc_err)?);
                        postcopy = Some(Arc::clone(&pc));
                        pc
                    }
                };
                let t = Instant::now();
                pc.apply_pending(&block, &bitmap).map_err(pc_err)?;
                log::debug!("migration: post-copy: pending pages of {block} discarded in {:?}", t.elapsed());
            }
            Section::PostcopyRun => {
                let pc = postcopy.take().ok_or_else(|| {
                    MigrationError::Incoming("post-copy run without pending sections".into())
                })?;
                if !vcpus.is_empty() || vm_state.is_some() {
                    return Err(MigrationError::Incoming("post-copy run before every vCPU state".into()));
                }
                let urgent = accept_urgent(listener, &incoming).map_err(pc_err)?;
                let ret = ret
                    .take()
                    .ok_or_else(|| MigrationError::Incoming("post-copy needs a return path".into()))?;
                slots.take().map_or(Ok(()), DetachedSlots::attach)?;
                got.bytes = reader.offset();
                got.postcopy = true;
                progress.set_status(Status::PostcopyActive);
                // The thread runs until every page is in place.
                drop(postcopy::dest::start(pc, postcopy::dest::Session { main: reader, urgent, ret }));
                return Ok(got);
            }
            Section::PostcopyResume => {
                return Err(MigrationError::Incoming(
                    "a post-copy resume stream, but no post-copy migration is paused here".into(),
                ))
            }
            Section::Sync { token } => {
                // Without a return path (a file) nobody waits for the answer.
                if let Some(w) = ret.as_mut() {
                    reply(w, &format!("{SYNCED} {token}")).map_err(|e| {
                        MigrationError::NoAck(format!("cannot answer the source's sync: {e}"))
                    })?;
                }
            }
            Section::End { .. } => break,
        }
    }
    if postcopy.is_some() {
        return Err(MigrationError::Incoming("post-copy was announced but the stream ended".into()));
    }
    slots.take().map_or(Ok(()), DetachedSlots::attach)?;
    finish_load(vm, &devs, vcpus, vm_state)?;
    got.bytes = reader.offset();
    Ok(got)
}

/// Restore the VM and vCPU state and finish the devices' loads.
fn finish_load(
    vm: &Vm,
    devs: &BTreeMap<String, Arc<HostDevice>>,
    mut vcpus: Vec<(u32, crate::vm::vcpu::VcpuState)>,
    vm_state: Option<crate::vm::VmState>,
) -> Result<(), MigrationError> {
    vcpus.sort_by_key(|(i, _)| *i);
    let want = vm.vcpu_count() as usize;
    if vcpus.len() != want || vcpus.iter().enumerate().any(|(n, (i, _))| *i as usize != n) {
        return Err(MigrationError::Incoming(format!(
            "stream has {} vCPU states for {want} vCPUs",
            vcpus.len()
        )));
    }
    let vm_state = vm_state.ok_or_else(|| MigrationError::Incoming("stream has no VM state".into()))?;
    vm.restore_vm_state(&vm_state)?;
    let states: Vec<_> = vcpus.into_iter().map(|(_, s)| s).collect();
    vm.restore_vcpu_state(&states)?;
    for d in devs.values() {
        let mut dev = d.lock();
        dev.load_cleanup().map_err(|source| MigrationError::Device {
            id: d.id.clone(),
            what: "load_cleanup",
            source,
        })?;
        dev.vm_state_changed(true).map_err(|source| MigrationError::Device {
            id: d.id.clone(),
            what: "vm_state_changed(run)",
            source,
        })?;
    }
    Ok(())
}

/// The memfd behind a RAM block, borrowed (not closed on drop), when the
/// block is one: then its mapping is shared and `pwrite` to the file is a
/// store to the memory. Only memfds answer `F_GET_SEALS`; a file backend
/// (possibly mapped private) gets `None` and is written through its mapping.
fn memfd_of(block: &RamBlock) -> Option<std::mem::ManuallyDrop<std::fs::File>> {
    use std::os::fd::FromRawFd;
    if block.fd < 0 {
        return None;
    }
    // SAFETY: F_GET_SEALS only queries the descriptor.
    if unsafe { libc::fcntl(block.fd, libc::F_GET_SEALS) } < 0 {
        return None;
    }
    // SAFETY: the descriptor stays open while the block is registered (for
    // this whole load); ManuallyDrop never closes it.
    Some(std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(block.fd) }))
}
