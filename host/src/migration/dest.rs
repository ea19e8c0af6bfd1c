//! The destination side: receive a migration stream into a VM built from
//! the same configuration, then resume the guest.
//!
//! Nothing runs until the whole stream has been read and checked: a bad
//! stream (wrong version, unknown device, bad checksum, truncation) leaves
//! this VM unstarted and the error says what was wrong; the source, which
//! gets no acknowledgement, keeps running.

use std::{
    collections::BTreeMap,
    io::Write,
    sync::Arc,
    time::Instant,
};

use crate::{devices::HostDevice, vm::Vm};

use super::{
    check_compatibility,
    device_ops::MigrationOps,
    machine::{block_bytes_mut, config_section, devices, VcpuPayload},
    source::{MigrationError, ACK_OK},
    MigrationListener, MigrationStream, Section, StreamReader,
};

/// What an incoming migration loaded.
#[derive(Debug, Clone, Default)]
pub struct Received {
    pub bytes: u64,
    pub ram_batches: u64,
    pub device_sections: u64,
}

/// Accept one migration on `listener` and load it into `vm` (created with
/// the same configuration, not started). On success the vCPU state is
/// restored and the caller starts the VM.
pub fn incoming(vm: &Vm, listener: MigrationListener) -> Result<Received, MigrationError> {
    let stream = listener.accept()?;
    let started = Instant::now();
    let ack = stream.try_clone().ok();
    let result = load(vm, stream);
    match (&result, ack) {
        (Ok(_), Some(mut ack)) => {
            // Resume only if the source heard us: otherwise it resumes too.
            writeln!(ack, "{ACK_OK}").and_then(|_| ack.flush()).map_err(|e| {
                MigrationError::NoAck(format!("cannot acknowledge to the source: {e}"))
            })?;
        }
        (Err(e), Some(mut ack)) => {
            let _ = writeln!(ack, "error: {e}");
        }
        _ => {}
    }
    if let Ok(r) = &result {
        log::info!(
            "migration: received {} bytes ({} RAM batches, {} device sections) in {:.3} s",
            r.bytes,
            r.ram_batches,
            r.device_sections,
            started.elapsed().as_secs_f64()
        );
    }
    result
}

fn load(vm: &Vm, stream: MigrationStream) -> Result<Received, MigrationError> {
    let mut reader = StreamReader::new(stream)?;
    let local = config_section(vm);
    match reader.next_section()? {
        Section::Config(incoming) => check_compatibility(&local, &incoming)
            .map_err(|e| MigrationError::Incoming(format!("incompatible configuration: {e}")))?,
        other => {
            return Err(MigrationError::Incoming(format!(
                "stream starts with a {} section, not the configuration",
                super::section_name(other.type_code())
            )))
        }
    }
    let blocks: BTreeMap<String, _> = vm.ram_blocks().into_iter().map(|b| (b.name.clone(), b)).collect();
    let devs: BTreeMap<String, Arc<HostDevice>> = devices(vm).into_iter().map(|d| (d.id.clone(), d)).collect();
    for d in devs.values() {
        d.lock().load_setup().map_err(|source| MigrationError::Device { id: d.id.clone(), what: "load_setup", source })?;
    }
    let mut got = Received::default();
    let mut vcpus = Vec::new();
    let mut vm_state = None;
    loop {
        match reader.next_section()? {
            Section::Config(_) => return Err(MigrationError::Incoming("a second configuration section".into())),
            Section::Ram(batch) => {
                let block = blocks.get(&batch.block).ok_or_else(|| {
                    MigrationError::Incoming(format!("RAM of unknown block {:?}", batch.block))
                })?;
                // SAFETY: the VM is not running and the block is registered
                // for the VM's lifetime; nothing else touches it meanwhile.
                let mem = unsafe { block_bytes_mut(block) };
                reader.read_ram_into(&batch, mem)?;
                got.ram_batches += 1;
            }
            Section::Device(s) => {
                let d = devs.get(&s.id).filter(|d| d.kind == s.kind).ok_or_else(|| {
                    MigrationError::Incoming(format!("state for unknown device {} ({})", s.id, s.kind))
                })?;
                d.lock()
                    .load_state(s.version, &s.data)
                    .map_err(|source| MigrationError::Device { id: d.id.clone(), what: "load_state", source })?;
                got.device_sections += 1;
            }
            Section::Vcpu(s) => {
                let p: VcpuPayload = serde_json::from_slice(&s.data)
                    .map_err(|e| MigrationError::Incoming(format!("vCPU {} state: {e}", s.index)))?;
                if let Some(v) = p.vm {
                    vm_state = Some(v);
                }
                vcpus.push((s.index, p.vcpu));
            }
            Section::End { .. } => break,
        }
    }
    vcpus.sort_by_key(|(i, _)| *i);
    let want = vm.vcpu_count() as usize;
    if vcpus.len() != want || vcpus.iter().enumerate().any(|(n, (i, _))| *i as usize != n) {
        return Err(MigrationError::Incoming(format!("stream has {} vCPU states for {want} vCPUs", vcpus.len())));
    }
    let vm_state = vm_state.ok_or_else(|| MigrationError::Incoming("stream has no VM state".into()))?;
    vm.restore_vm_state(&vm_state)?;
    let states: Vec<_> = vcpus.into_iter().map(|(_, s)| s).collect();
    vm.restore_vcpu_state(&states)?;
    for d in devs.values() {
        let mut dev = d.lock();
        dev.load_cleanup().map_err(|source| MigrationError::Device { id: d.id.clone(), what: "load_cleanup", source })?;
        dev.vm_state_changed(true).map_err(|source| MigrationError::Device { id: d.id.clone(), what: "vm_state_changed(run)", source })?;
    }
    got.bytes = reader.offset();
    Ok(got)
}
