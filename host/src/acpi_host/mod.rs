//! ACPI in the VM: the host builds RSDP/XSDT/FADT/DSDT/MADT/SSDTs/NFIT from
//! the plugged devices, places them in guest RAM at
//! [`ACPI_GPA`] (`0xE0000`, where a BIOS-style
//! guest scans for the RSDP), serves the NVDIMM `_DSM` doorbell and the
//! memory-hotplug registers, and rebuilds everything on every plug/unplug.
//!
//! - DSDT: `\_SB.NVDR` (the NVDIMM root device, DSM page at
//!   [`DSM_PAGE_GPA`]), the memory hotplug
//!   controller `\_SB.MHPC` and its `PNP0C80` slots ([`memory_hotplug`]).
//! - One SSDT per device with AML (`Device::aml()`); devices that serve
//!   `_DSM` handles (NVDIMMs) go in `Scope (\_SB.NVDR)`, others in `\_SB`.
//! - NFIT: every device's `nfit_structures()`, then the platform
//!   capabilities structure when `nfit-platform-capabilities` is set. The
//!   same structures feed `_FIT` ([`FitBuffer`]), kept current on every
//!   plug/unplug.
//! - Hot-plug events reach the OS through the Generic Event Device
//!   `\_SB.GED_` ([`ged`]): an interrupt on GSI 9 and an event register
//!   at port `0x0a1c` (memory slots changed, NVDIMM FIT changed).
//! - `_DSM`: a 4-byte write to port `0x0a18` makes the host read the DSM
//!   page, route the call by NFIT handle to the device listing it in
//!   `dsm_handles()`, and write the reply over the page ([`dsm`]).

pub mod dsm;
pub mod ged;
pub mod memory_hotplug;
pub mod offline;

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, Weak,
    },
    time::Duration,
};

use dmhost_acpi::{
    nvdimm::{FitBuffer, DSM_DOORBELL_LEN, DSM_DOORBELL_PORT},
    tables, AcpiImage, LayoutError, TableSet,
};
use dmhost_plugin_api::{IoSpace, PluginError};

use crate::{
    devices::{DeviceImpl, HostDevice},
    guest::{self, BootAcpi, GuestError, ACPI_END, ACPI_GPA, DSM_PAGE_GPA},
    vm::{
        bus::{BusDevice, BusError, RateLimiter},
        Vm, VmShared,
    },
};
use ged::{Ged, EVT_MEMORY, EVT_NVDIMM, GED_GSI, GED_LEN, GED_PORT};
use memory_hotplug::{MemoryDevice, MemoryHotplug, MHP_LEN, MHP_PORT};

/// Bus owner of the host's ACPI ports (not a valid device id).
pub const BUS_OWNER: &str = "host:acpi";
/// The device kind whose regions are ACPI hot-pluggable memory.
pub const MEMORY_DEVICE_KIND: &str = "pc-dimm";

/// ACPI settings of a VM (config keys `memory-slots`,
/// `nfit-platform-capabilities`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Memory hotplug slots (`PNP0C80` devices), 1..=256.
    pub memory_slots: u32,
    /// NFIT platform capabilities (bit 0 CPU cache flush on power loss,
    /// bit 1 memory controller flush); 0 = no structure.
    pub nfit_platform_capabilities: u32,
}

impl Default for AcpiConfig {
    fn default() -> Self {
        Self { memory_slots: memory_hotplug::DEFAULT_SLOTS, nfit_platform_capabilities: 0 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiHostError {
    #[error("cannot lay out the ACPI tables")]
    Layout(#[from] LayoutError),
    #[error("the ACPI tables ({0} bytes) do not fit in 0xE0000..0x100000")]
    TooLarge(usize),
    #[error("cannot write the ACPI tables into guest memory")]
    Guest(#[from] GuestError),
    #[error("device {id}: {what} failed: {source}")]
    Device { id: String, what: &'static str, source: PluginError },
    #[error("cannot claim the ACPI I/O ports")]
    Bus(#[from] BusError),
}

/// What the tables need from one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiDevice {
    pub id: String,
    pub kind: String,
    /// Guest-physical base and size of its region.
    pub region: Option<(u64, u64)>,
    pub nfit: Vec<u8>,
    pub aml: Vec<u8>,
    pub dsm_handles: Vec<u32>,
}

impl AcpiDevice {
    /// Ask a device (plugin or built-in) for its ACPI parts.
    pub fn query(
        id: &str,
        kind: &str,
        region: Option<(u64, u64)>,
        imp: &DeviceImpl,
    ) -> Result<Self, AcpiHostError> {
        let err = |what| move |source| AcpiHostError::Device { id: id.to_owned(), what, source };
        let (nfit, aml, dsm_handles) = match imp {
            DeviceImpl::Plugin(d) => (
                d.nfit_structures().into_result().map_err(err("nfit_structures"))?.into_vec(),
                d.aml().into_result().map_err(err("aml"))?.into_vec(),
                d.dsm_handles().into_vec(),
            ),
            DeviceImpl::Builtin(d) => (d.nfit_structures(), d.aml(), d.dsm_handles()),
            DeviceImpl::Remote(d) => (
                d.nfit_structures().map_err(err("nfit_structures"))?,
                d.aml().map_err(err("aml"))?,
                d.dsm_handles().map_err(err("dsm_handles"))?,
            ),
        };
        Ok(Self { id: id.to_owned(), kind: kind.to_owned(), region, nfit, aml, dsm_handles })
    }
}

/// Built tables and the FIT (the NFIT body) they carry.
#[derive(Debug, Clone)]
pub struct BuiltTables {
    pub image: AcpiImage,
    pub fit: Vec<u8>,
}

/// Build the whole table set for `devices` at [`ACPI_GPA`].
pub fn build_tables(
    devices: &[AcpiDevice],
    vcpus: u32,
    config: &AcpiConfig,
) -> Result<BuiltTables, AcpiHostError> {
    let mut sb = memory_hotplug::aml(config.memory_slots);
    sb.extend(ged::aml());
    let mut set = TableSet::new(tables::dsdt(&sb, Some(DSM_PAGE_GPA)));
    set.add(tables::madt(&tables::MadtConfig::with_cpus(vcpus.clamp(1, 255) as u8)));
    let (mut nvdimms, mut others) = (0u32, 0u32);
    for d in devices.iter().filter(|d| !d.aml.is_empty()) {
        let (id, scope) = if d.dsm_handles.is_empty() {
            others += 1;
            (format!("DMDEV{:03}", others % 1000), "\\_SB_")
        } else {
            nvdimms += 1;
            (format!("NVDIMM{:02}", (nvdimms - 1) % 100), "\\_SB_.NVDR")
        };
        let mut table_id = [b' '; 8];
        table_id.copy_from_slice(&id.as_bytes()[..8]);
        set.add(tables::ssdt(table_id, scope, std::slice::from_ref(&d.aml)));
    }
    let mut structures: Vec<Vec<u8>> =
        devices.iter().filter(|d| !d.nfit.is_empty()).map(|d| d.nfit.clone()).collect();
    if !structures.is_empty() {
        structures.push(tables::nfit_platform_capabilities(config.nfit_platform_capabilities));
        set.add(tables::nfit(&structures));
    }
    let fit = structures.concat();
    let image = set.layout(ACPI_GPA)?;
    if ACPI_GPA + image.bytes.len() as u64 > ACPI_END {
        return Err(AcpiHostError::TooLarge(image.bytes.len()));
    }
    Ok(BuiltTables { image, fit })
}

/// Drive the GED's interrupt line to `level`.
fn ged_line(vm: &VmShared, level: bool) {
    if let Err(e) = vm.kvm.set_irq_line(GED_GSI, level) {
        let what = if level { "raise" } else { "lower" };
        log::error!("ACPI: cannot {what} the GED interrupt (GSI {GED_GSI}): {e}");
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the doorbell needs: the FIT and who owns which handle.
pub(crate) struct DsmState {
    pub fit: FitBuffer,
    pub handles: BTreeMap<u32, Arc<HostDevice>>,
}

/// The host's ACPI for one VM: tables in guest RAM, the DSM doorbell and
/// the memory-hotplug ports.
pub struct AcpiHost {
    config: AcpiConfig,
    vcpus: u32,
    vm: Weak<VmShared>,
    dsm: Mutex<DsmState>,
    mhp: Mutex<MemoryHotplug>,
    ged: Mutex<Ged>,
    image_len: Mutex<usize>,
    booted: AtomicBool,
    calls: AtomicU64,
    /// Guest-triggerable log lines.
    guest_log: RateLimiter,
    /// What a guest `_EJ0` does (unplug the device), set by the runner.
    ejector: std::sync::OnceLock<Ejector>,
}

/// Called with the id of a memory device the guest asked to eject.
pub type Ejector = Box<dyn Fn(String) + Send + Sync>;

impl AcpiHost {
    /// Claim the ports, build and place the tables for the devices plugged
    /// now (boot devices: no hotplug events), publish the addresses in the
    /// boot-info page, and follow every later plug/unplug.
    pub fn install(vm: &Vm, vcpus: u32, config: AcpiConfig) -> Result<Arc<Self>, AcpiHostError> {
        let host = Arc::new(Self {
            mhp: Mutex::new(MemoryHotplug::new(config.memory_slots)),
            ged: Mutex::new(Ged::default()),
            config,
            vcpus,
            vm: Arc::downgrade(vm.shared()),
            dsm: Mutex::new(DsmState { fit: FitBuffer::default(), handles: BTreeMap::new() }),
            image_len: Mutex::new(0),
            booted: AtomicBool::new(false),
            calls: AtomicU64::new(0),
            guest_log: RateLimiter::new(10, Duration::from_secs(1)),
            ejector: std::sync::OnceLock::new(),
        });
        vm.ram().write(DSM_PAGE_GPA, &[0u8; dmhost_acpi::nvdimm::DSM_PAGE_SIZE]).map_err(GuestError::from)?;
        let dev = Arc::clone(&host) as Arc<dyn BusDevice>;
        for (port, len) in
            [(MHP_PORT, MHP_LEN), (DSM_DOORBELL_PORT, DSM_DOORBELL_LEN.into()), (GED_PORT, GED_LEN)]
        {
            if let Err(e) =
                vm.bus().insert(IoSpace::Pio, port.into(), len.into(), BUS_OWNER, Arc::clone(&dev))
            {
                vm.bus().remove_owner(BUS_OWNER);
                return Err(e.into());
            }
        }
        if let Err(e) = host.refresh(vm) {
            vm.bus().remove_owner(BUS_OWNER);
            return Err(e);
        }
        host.booted.store(true, Ordering::Release);
        guest::write_boot_acpi(
            vm.ram(),
            &BootAcpi {
                rsdp_gpa: ACPI_GPA,
                dsm_page_gpa: DSM_PAGE_GPA,
                mhp_port: MHP_PORT,
                mhp_slots: lock(&host.mhp).slots().len() as u16,
            },
        )?;
        let h = Arc::clone(&host);
        vm.on_devices_changed(Arc::new(move |vm: &Vm| {
            if let Err(e) = h.refresh(vm) {
                log::error!("ACPI tables not updated: {}", crate::run::chain(&e));
            }
        }));
        log::info!("ACPI: tables at {ACPI_GPA:#x}, DSM page at {DSM_PAGE_GPA:#x}, doorbell port {DSM_DOORBELL_PORT:#x}");
        Ok(host)
    }

    /// Act on the guest's `_EJ0` (bit 3 of the memory-hotplug flags) with
    /// `f`, as QEMU unplugs the DIMM; without one, an eject is only logged.
    pub fn on_eject(&self, f: Ejector) {
        let _ = self.ejector.set(f);
    }

    /// The ACPI parts of every device plugged in `vm`.
    pub fn devices_of(vm: &Vm) -> Vec<(AcpiDevice, Arc<HostDevice>)> {
        let mut out = Vec::new();
        for info in vm.devices() {
            let Some(dev) = vm.device(&info.id) else { continue };
            let q = AcpiDevice::query(&info.id, &info.kind, info.region, &dev.lock());
            match q {
                Ok(v) => out.push((v, dev)),
                Err(e) => log::warn!("ACPI: leaving out {}", crate::run::chain(&e)),
            }
        }
        out
    }

    /// Rebuild the tables, the FIT, the handle map and the hotplug slots
    /// from the devices plugged now, and rewrite the tables in guest RAM.
    pub fn refresh(&self, vm: &Vm) -> Result<(), AcpiHostError> {
        let devices = Self::devices_of(vm);
        let mut handles = BTreeMap::new();
        let mut memory = Vec::new();
        for (d, dev) in &devices {
            for &h in &d.dsm_handles {
                if let Some(other) = handles.insert(h, Arc::clone(dev)) {
                    log::warn!(
                        "ACPI: NFIT handle {h:#x} of {} is also {}'s; {} serves it",
                        d.id,
                        other.id,
                        d.id
                    );
                }
            }
            if let (MEMORY_DEVICE_KIND, Some((base, size))) = (d.kind.as_str(), d.region) {
                memory.push(MemoryDevice { id: d.id.clone(), base, size });
            }
        }
        let views: Vec<AcpiDevice> = devices.into_iter().map(|(d, _)| d).collect();
        let built = build_tables(&views, self.vcpus, &self.config)?;
        {
            let mut len = lock(&self.image_len);
            let mut bytes = built.image.bytes.clone();
            if bytes.len() < *len {
                bytes.resize(*len, 0);
            }
            vm.ram().write(ACPI_GPA, &bytes).map_err(GuestError::from)?;
            *len = built.image.bytes.len();
        }
        let booted = self.booted.load(Ordering::Acquire);
        let mut events = 0;
        {
            let mut st = lock(&self.dsm);
            if st.fit.structures() != built.fit.as_slice() {
                st.fit.set(built.fit);
                events |= EVT_NVDIMM;
            }
            st.handles = handles;
        }
        {
            let mut mhp = lock(&self.mhp);
            let before = mhp.slots().to_vec();
            let homeless = mhp.update(&memory, booted);
            for id in homeless {
                log::warn!("ACPI: no free memory hotplug slot for {id} ({} slots)", self.config.memory_slots);
            }
            if mhp.slots() != before.as_slice() {
                events |= EVT_MEMORY;
            }
        }
        if booted && events != 0 && lock(&self.ged).raise(events) {
            log::debug!("ACPI: GED events {events:#x}, raising GSI {GED_GSI}");
            ged_line(vm.shared(), true);
        }
        log::debug!("ACPI: {} tables, {} bytes", built.image.tables.len(), built.image.bytes.len());
        Ok(())
    }

    /// `_DSM` doorbells served so far.
    pub fn dsm_calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The memory-hotplug slots (for tests and queries).
    pub fn memory_slots(&self) -> Vec<memory_hotplug::Slot> {
        lock(&self.mhp).slots().to_vec()
    }

    fn guest_note(&self, msg: impl FnOnce() -> String) {
        self.guest_log.log(|suppressed| {
            let more =
                if suppressed > 0 { format!(" ({suppressed} more suppressed)") } else { String::new() };
            log::warn!("ACPI: {}{more}", msg())
        });
    }

    fn doorbell(&self, data: &[u8]) {
        if data.len() != usize::from(DSM_DOORBELL_LEN) {
            self.guest_note(|| format!("{}-byte write to the DSM doorbell ignored (want 4)", data.len()));
            return;
        }
        let written = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        if u64::from(written) != DSM_PAGE_GPA {
            // QEMU trusts this value; the host uses its own page.
            self.guest_note(|| {
                format!("DSM doorbell rung with {written:#x}; serving the page at {DSM_PAGE_GPA:#x}")
            });
        }
        let Some(vm) = self.vm.upgrade() else { return };
        let mut page = vec![0u8; dmhost_acpi::nvdimm::DSM_PAGE_SIZE];
        if let Err(e) = vm.ram.read(DSM_PAGE_GPA, &mut page) {
            log::error!("ACPI: cannot read the DSM page: {e}");
            return;
        }
        let reply = {
            let mut st = lock(&self.dsm);
            let st = &mut *st;
            dsm::serve(&page, &mut st.fit, &st.handles, &self.guest_log)
        };
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = vm.write_guest(DSM_PAGE_GPA, &reply) {
            log::error!("ACPI: cannot write the DSM reply: {e}");
        }
    }
}

impl BusDevice for AcpiHost {
    fn read(&self, _space: IoSpace, addr: u64, data: &mut [u8]) {
        if let Some(off) = addr.checked_sub(GED_PORT.into()).filter(|&o| o < u64::from(GED_LEN)) {
            let cleared = lock(&self.ged).read(off, data);
            if let (true, Some(vm)) = (cleared, self.vm.upgrade()) {
                ged_line(&vm, false);
            }
            return;
        }
        match addr.checked_sub(MHP_PORT.into()) {
            Some(off) if off < u64::from(MHP_LEN) => lock(&self.mhp).read(off, data),
            // The doorbell is write-only (QEMU reads 0 too).
            _ => data.fill(0),
        }
    }

    fn write(&self, _space: IoSpace, addr: u64, data: &[u8]) {
        if addr == u64::from(DSM_DOORBELL_PORT) {
            self.doorbell(data);
            return;
        }
        match addr.checked_sub(MHP_PORT.into()) {
            Some(off) if off < u64::from(MHP_LEN) => {
                let eject = lock(&self.mhp).write(off, data);
                match (eject, self.ejector.get()) {
                    (Some(id), Some(f)) => {
                        log::info!("ACPI: the guest ejects {id}");
                        f(id)
                    }
                    (Some(id), None) => {
                        self.guest_note(|| format!("the guest asked to eject {id}; use device_del"))
                    }
                    (None, _) => {}
                }
            }
            _ => self.guest_note(|| format!("write to ACPI port {addr:#x} ignored")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvdimm_like(id: &str, handle: u32) -> AcpiDevice {
        AcpiDevice {
            id: id.into(),
            kind: "nvdimm".into(),
            region: Some((1 << 32, 4 << 20)),
            nfit: vec![0, 0, 8, 0, 1, 2, 3, 4],
            aml: vec![0xa3],
            dsm_handles: vec![handle],
        }
    }

    #[test]
    fn tables_list_ssdts_and_nfit() {
        let devs = [
            nvdimm_like("a", 1),
            nvdimm_like("b", 2),
            AcpiDevice {
                id: "p".into(),
                kind: "pc-dimm".into(),
                region: None,
                nfit: vec![],
                aml: vec![],
                dsm_handles: vec![],
            },
        ];
        let config = AcpiConfig { memory_slots: 4, nfit_platform_capabilities: 3 };
        let t = build_tables(&devs, 2, &config).unwrap();
        let names: Vec<_> = t.image.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "SSDT1", "SSDT2", "NFIT"]);
        assert_eq!(t.image.rsdp_gpa, ACPI_GPA);
        assert_eq!(t.fit.len(), 8 + 8 + 16);
        let dsdt = t.image.table("DSDT").unwrap();
        for name in [&b"MHPC"[..], b"M003", b"NVDR"] {
            assert!(dsdt.windows(4).any(|w| w == name), "{:?}", std::str::from_utf8(name));
        }
        assert!(!dsdt.windows(4).any(|w| w == b"M004"));
        // No NFIT device: no NFIT table, empty FIT.
        let t = build_tables(&devs[2..], 1, &AcpiConfig::default()).unwrap();
        assert!(t.image.table("NFIT").is_none() && t.fit.is_empty());
    }
}
