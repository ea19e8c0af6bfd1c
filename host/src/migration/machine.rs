//! What the migration needs from the VM, gathered in one place: its RAM
//! blocks as byte slices, its devices, its configuration section and the
//! vCPU/VM state payload.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{
    devices::HostDevice,
    vm::{ramblocks::RamBlock, vcpu::VcpuState, Vm, VmState},
};

use super::{device_ops::MigrationOps, ConfigSection, DeviceInfo, RamBlockInfo};

/// The configuration section describing `vm` (both sides build it the
/// same way: the destination compares the incoming one against its own).
pub fn config_section(vm: &Vm) -> ConfigSection {
    ConfigSection {
        ram_size: vm.ram().size(),
        vcpus: vm.vcpu_count(),
        ram_blocks: vm
            .ram_blocks()
            .iter()
            .map(|b| RamBlockInfo { id: b.name.clone(), size: b.size })
            .collect(),
        devices: devices(vm)
            .iter()
            .map(|d| DeviceInfo {
                id: d.id.clone(),
                kind: d.kind.clone(),
                plugin_version: String::new(),
                section_version: d.lock().state_version(),
            })
            .collect(),
    }
}

/// The VM's devices, in plug order.
pub fn devices(vm: &Vm) -> Vec<Arc<HostDevice>> {
    vm.devices().iter().filter_map(|d| vm.device(&d.id)).collect()
}

/// The bytes of a RAM block.
///
/// # Safety
///
/// The block must stay registered (its mapping alive) while the slice is
/// used. The guest may write the memory concurrently: readers must treat
/// the content as a snapshot that can change under them, which migration
/// does (pages written during a round are dirty and sent again).
pub unsafe fn block_bytes(block: &RamBlock) -> &'static [u8] {
    // SAFETY: per the contract above, `host_addr..+size` is a live mapping.
    unsafe { std::slice::from_raw_parts(block.host_addr as *const u8, block.size as usize) }
}

/// Writable bytes of a RAM block (destination, VM not running).
///
/// # Safety
///
/// As [`block_bytes`], and nothing else may access the block meanwhile.
#[allow(clippy::mut_from_ref)]
pub unsafe fn block_bytes_mut(block: &RamBlock) -> &'static mut [u8] {
    // SAFETY: per the contract above.
    unsafe { std::slice::from_raw_parts_mut(block.host_addr as *mut u8, block.size as usize) }
}

/// One vCPU section's payload; the first vCPU also carries the VM-wide
/// state (irqchips, PIT, clock).
#[derive(Serialize, Deserialize)]
pub struct VcpuPayload {
    pub vcpu: VcpuState,
    pub vm: Option<VmState>,
}
