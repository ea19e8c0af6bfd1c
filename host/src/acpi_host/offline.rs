//! Build a configuration's ACPI tables without KVM (`dmhost acpi dump`):
//! create the devices from their plugins with stand-in host services,
//! place their regions with the same allocator the VM uses, plug them and
//! build the tables exactly as a running VM does at boot.

use dmhost_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RArc},
    Host, HostServices, HostServices_TO, IoSpace, MemoryRegion, PlugInfo, PluginError, RResult, RSlice,
    RSliceMut, RStr,
};

use super::{build_tables, AcpiDevice, AcpiHostError, BuiltTables};
use crate::{
    config::VmFileConfig,
    devices::DeviceFactory,
    guest::{HOTPLUG_BASE, HOTPLUG_END},
    vm::physmap::{Owner, Physmap, PhysmapError, RangeUse},
};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("device {id} ({kind}): cannot create: {source}")]
    Create { id: String, kind: String, source: PluginError },
    #[error("device {id}: cannot place its region")]
    Place { id: String, source: PhysmapError },
    #[error("device {id}: plug failed: {source}")]
    Plug { id: String, source: PluginError },
    #[error(transparent)]
    Acpi(#[from] AcpiHostError),
}

/// Host services with no VM behind them: registrations succeed and do
/// nothing; guest memory access fails.
#[derive(Clone)]
struct Offline;

impl HostServices for Offline {
    fn register_io(&self, _: IoSpace, _: u64, _: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn unregister_io(&self, _: IoSpace, _: u64, _: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn physmap_add(&self, _: u64, _: u64, _: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn physmap_remove(&self, _: u64, _: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn set_irq_line(&self, _: u32, _: bool) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn register_irqfd(&self, _: u32, _: i32, _: i32) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn unregister_irqfd(&self, _: u32, _: i32) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn register_ram(&self, _: RStr<'_>, _: MemoryRegion) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn unregister_ram(&self, _: RStr<'_>) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn mark_dirty(&self, _: RStr<'_>, _: u64, _: u64) -> RResult<(), PluginError> {
        RResult::ROk(())
    }
    fn read_guest(&self, _: u64, _: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::io("no guest memory: building tables offline"))
    }
    fn write_guest(&self, _: u64, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
        RResult::RErr(PluginError::io("no guest memory: building tables offline"))
    }
}

fn offline_host() -> Host {
    HostServices_TO::from_ptr(RArc::new(Offline), TD_Opaque)
}

/// The tables `config` gets at boot.
pub fn tables_for_config(
    config: &VmFileConfig,
    factory: &dyn DeviceFactory,
) -> Result<BuiltTables, OfflineError> {
    let mut physmap = Physmap::new(HOTPLUG_BASE, HOTPLUG_END);
    physmap
        .claim(0, config.ram_size, Owner::Host, RangeUse::Ram)
        .map_err(|source| OfflineError::Place { id: "ram".into(), source })?;
    let mut devices = Vec::new();
    let mut views = Vec::new();
    for d in &config.devices {
        let mut imp = factory
            .create(&d.kind, &d.id, &d.config, offline_host())
            .map_err(|source| OfflineError::Create { id: d.id.clone(), kind: d.kind.clone(), source })?;
        let mut region = None;
        if let Some(r) = imp.memory_region() {
            let place = |pm: &mut Physmap| {
                let gpa = pm.allocate(r.memory.size, r.align, r.requested_gpa.into_option())?;
                pm.claim(gpa, r.memory.size, Owner::Device(d.id.clone()), RangeUse::DeviceMemory)?;
                Ok(gpa)
            };
            let gpa =
                place(&mut physmap).map_err(|source| OfflineError::Place { id: d.id.clone(), source })?;
            region = Some((gpa, r.memory.size));
        }
        imp.plug(PlugInfo { region_gpa: region.map(|(g, _)| g).into() })
            .map_err(|source| OfflineError::Plug { id: d.id.clone(), source })?;
        views.push(AcpiDevice::query(&d.id, &d.kind, region, &imp)?);
        devices.push(imp);
    }
    let built = build_tables(&views, config.vcpus, &config.acpi)?;
    for mut d in devices {
        let _ = d.unplug();
    }
    Ok(built)
}
