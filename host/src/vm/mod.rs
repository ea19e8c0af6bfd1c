//! The VM: KVM, guest RAM, the I/O bus, the ownership map, vCPUs and the
//! devices plugged into it.
//!
//! The public surface the rest of the host (run, control socket, migration,
//! ACPI/NVDIMM) uses is [`Vm`]; [`VmShared`] is what device services reach.

pub mod bus;
pub mod kvm;
pub mod memory;
pub mod physmap;
pub mod ramblocks;
pub mod vcpu;

use std::sync::{atomic::AtomicU32, atomic::Ordering, Arc, Mutex, MutexGuard};

use dmhost_plugin_api::{IoSpace, PlugInfo, PluginError};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use crate::{
    devices::{DeviceEntry, DeviceImpl, DeviceInfo, HostDevice},
    guest::{self, BootDevice, GuestError, GuestProgram, RegPreset},
    services::DeviceServices,
};
use bus::IoBus;
use kvm::{KvmError, KvmVm};
use memory::{GuestRam, MemoryError, PAGE_SIZE};
use physmap::{Backing, Owner, Physmap, PhysmapError, RangeUse};
use ramblocks::{RamBlock, RamRegistry};
use vcpu::{RunControl, SerialSink, Vcpu, VcpuContext, VcpuError, VcpuState, VmExit};

/// Name of guest RAM in the RAM registry.
pub const GUEST_RAM_BLOCK: &str = "ram";
/// Longest device id.
pub const MAX_ID_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Physmap(#[from] PhysmapError),
    #[error("guest RAM must be between {min:#x} and {max:#x} bytes, got {got:#x}", min = guest::MIN_RAM, max = guest::MAX_RAM)]
    RamSize { got: u64 },
    #[error("the number of vCPUs must be 1..={max}, got {got}")]
    Vcpus { got: u32, max: u32 },
    #[error("device id {0:?} is invalid (1..=64 characters of A-Z a-z 0-9 _ . -)")]
    BadId(String),
    #[error("a device with id {0:?} already exists")]
    DuplicateId(String),
    #[error("no device with id {0:?}")]
    NoSuchDevice(String),
    #[error("device {id} ({kind}): cannot create: {source}")]
    Create { id: String, kind: String, source: PluginError },
    #[error("device {id}: plug failed: {source}")]
    Plug { id: String, source: PluginError },
    #[error("device {id}: memory region at {host_addr:#x}+{size:#x} is empty or not page aligned")]
    BadRegion { id: String, host_addr: u64, size: u64 },
    #[error("the VM is already running")]
    AlreadyStarted,
    #[error("the VM is not running")]
    NotRunning,
    #[error("no guest program loaded and no vCPU state restored")]
    NotLoaded,
    #[error("{got} vCPU states for {want} vCPUs")]
    StateCount { got: usize, want: usize },
    #[error("VM state: {what} failed")]
    VmState { what: &'static str, source: kvm_ioctls::Error },
    #[error("guest memory access at {gpa:#x} (+{len}) is not backed by RAM")]
    Unbacked { gpa: u64, len: usize },
    #[error(transparent)]
    RamRegistry(#[from] ramblocks::RamRegistryError),
    #[error("PCI host bridge: {0}")]
    Pci(String),
}

/// What device services and vCPUs share.
pub struct VmShared {
    pub kvm: KvmVm,
    pub ram: GuestRam,
    pub bus: Arc<IoBus>,
    pub physmap: Mutex<Physmap>,
    pub ram_blocks: Mutex<RamRegistry>,
    /// PCI INTx: the router device and devfn ownership.
    pub intx: crate::intx::IntxRouting,
    /// The PCI host bridge and bus 0 (ports 0xCF8..0xD00).
    pub pci: Arc<crate::pci::PciBus>,
    /// MSI routes (GSIs above the IOAPIC pins).
    pub msi: crate::pci::msi::MsiRoutes,
    /// Where device services open vendor VFIO drivers ([`Vm::set_vfio_drivers`]).
    pub vfio_drivers: std::sync::OnceLock<Arc<dyn crate::pci::vfio::VfioDriverSource>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VmShared {
    /// Copy guest memory (RAM or a mapped device region) into `buf`.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.access(gpa, buf.len(), |host, off, len| {
            // SAFETY: `host` is a live mapping of at least `off+len` bytes
            // (checked by `access`, which holds the physmap lock).
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf[off..].as_mut_ptr(), len) }
        })
    }

    /// Copy `buf` into guest memory; marks the pages dirty for migration.
    pub fn write_guest(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
        let mut touched = Vec::new();
        self.access(gpa, buf.len(), |host, off, len| {
            // SAFETY: as in `read_guest`; the mapping is writable RAM.
            unsafe { std::ptr::copy_nonoverlapping(buf[off..].as_ptr(), host as *mut u8, len) };
            touched.push((host, len as u64));
        })?;
        let mut rb = lock(&self.ram_blocks);
        for (host, len) in touched {
            rb.mark_dirty_host(host, len);
        }
        Ok(())
    }

    /// Walk `[gpa, gpa+len)` through RAM and device mappings, calling
    /// `f(host_addr, offset_in_buf, chunk_len)`; fails without touching
    /// anything when a byte is not backed.
    fn access(&self, gpa: u64, len: usize, mut f: impl FnMut(u64, usize, usize)) -> Result<(), VmError> {
        let pm = lock(&self.physmap);
        let unbacked = VmError::Unbacked { gpa, len };
        let mut chunks = Vec::new();
        let mut at = gpa;
        let end = gpa.checked_add(len as u64).ok_or(VmError::Unbacked { gpa, len })?;
        while at < end {
            let m = pm.mapping_at(at).ok_or(VmError::Unbacked { gpa, len })?;
            if m.read_only {
                // Reads are fine; the caller decides for writes below.
            }
            let n = (m.gpa + m.size).min(end) - at;
            chunks.push((m.host_addr + (at - m.gpa), (at - gpa) as usize, n as usize));
            at += n;
        }
        if chunks.is_empty() && len > 0 {
            return Err(unbacked);
        }
        for (host, off, n) in chunks {
            f(host, off, n);
        }
        Ok(())
    }
}

/// VM-wide state KVM keeps outside the vCPUs (migration).
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// The PCI CONFIG_ADDRESS latch (0xCF8).
    #[serde(default)]
    pub pci_config_address: u32,
}

/// How to build a VM.
#[derive(Clone)]
pub struct VmConfig {
    pub ram_size: u64,
    pub vcpus: u32,
    pub serial: SerialSink,
}

impl VmConfig {
    pub fn new(ram_size: u64, vcpus: u32) -> Self {
        Self { ram_size, vcpus, serial: vcpu::stdout_serial() }
    }
}

/// Called after every plug/unplug (and program load), before the
/// boot-info generation is bumped: a guest that sees the new generation
/// sees what the listener updated (ACPI tables, memory-hotplug registers).
pub type DeviceListener = Arc<dyn Fn(&Vm) + Send + Sync>;

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u32 = 64;

/// Memory slots taken out of KVM by [`Vm::detach_memory_slots`]; they go
/// back with [`attach`](Self::attach), or on drop (logging a failure).
pub struct DetachedSlots<'a> {
    kvm: Option<&'a KvmVm>,
}

impl DetachedSlots<'_> {
    /// Give KVM the slots again, before the guest runs.
    pub fn attach(mut self) -> Result<(), VmError> {
        match self.kvm.take() {
            Some(k) => Ok(k.attach_slots()?),
            None => Ok(()),
        }
    }
}

impl Drop for DetachedSlots<'_> {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.kvm.take().map(KvmVm::attach_slots) {
            log::error!("kvm: cannot attach the memory slots again: {e}");
        }
    }
}

/// A VM with its devices.
pub struct Vm {
    shared: Arc<VmShared>,
    control: Arc<RunControl>,
    vcpus: Mutex<Vec<Vcpu>>,
    serial: SerialSink,
    devices: Mutex<Vec<DeviceEntry>>,
    services: Mutex<Vec<DeviceServices>>,
    generation: AtomicU32,
    loaded: std::sync::atomic::AtomicBool,
    msr_indices: Vec<u32>,
    listeners: Mutex<Vec<DeviceListener>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Vm {
    /// Create the VM: KVM with an irqchip, memfd guest RAM in slot 0, vCPUs.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        if !(guest::MIN_RAM..=guest::MAX_RAM).contains(&config.ram_size)
            || !config.ram_size.is_multiple_of(PAGE_SIZE)
        {
            return Err(VmError::RamSize { got: config.ram_size });
        }
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(VmError::Vcpus { got: config.vcpus, max: MAX_VCPUS });
        }
        let kvm = KvmVm::new()?;
        let ram = GuestRam::new(config.ram_size)?;
        let mut physmap = Physmap::new(guest::HOTPLUG_BASE, guest::HOTPLUG_END);
        physmap.claim(0, config.ram_size, Owner::Host, RangeUse::Ram)?;
        physmap.set_backing(
            Owner::Host,
            Backing { host_addr: ram.host_addr(), size: ram.size(), read_only: false },
        );
        physmap.map(&kvm, &Owner::Host, 0, config.ram_size, 0)?;
        let mut ram_blocks = RamRegistry::default();
        {
            use std::os::fd::AsRawFd;
            ram_blocks.register(RamBlock {
                name: GUEST_RAM_BLOCK.to_owned(),
                owner: Owner::Host,
                host_addr: ram.host_addr(),
                size: ram.size(),
                fd: ram.fd().as_raw_fd(),
                fd_offset: 0,
            })?;
        }
        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            vcpus.push(Vcpu::new(kvm.fd(), kvm.kvm(), i)?);
        }
        let msr_indices = vcpus.first().map(|v| vcpu::readable_msrs(kvm.kvm(), &v.fd())).unwrap_or_default();
        let bus = Arc::new(IoBus::new());
        let pci = Arc::new(crate::pci::PciBus::new());
        bus.insert(
            IoSpace::Pio,
            crate::pci::CONFIG_ADDRESS_PORT.into(),
            crate::pci::PORTS,
            crate::pci::BUS_OWNER,
            Arc::clone(&pci) as _,
        )
        .map_err(|e| VmError::Pci(e.to_string()))?;
        let shared = Arc::new(VmShared {
            kvm,
            ram,
            bus,
            physmap: Mutex::new(physmap),
            ram_blocks: Mutex::new(ram_blocks),
            intx: Default::default(),
            pci,
            msi: Default::default(),
            vfio_drivers: Default::default(),
        });
        let vm = Self {
            shared,
            control: Arc::new(RunControl::default()),
            vcpus: Mutex::new(vcpus),
            serial: config.serial,
            devices: Mutex::new(Vec::new()),
            services: Mutex::new(Vec::new()),
            generation: AtomicU32::new(0),
            loaded: false.into(),
            msr_indices,
            listeners: Mutex::new(Vec::new()),
        };
        vm.update_boot_info()?;
        Ok(vm)
    }

    /// Let devices created from now on open vendor VFIO drivers from
    /// `source` (the plugin registry) through their host services.
    pub fn set_vfio_drivers(&self, source: Arc<dyn crate::pci::vfio::VfioDriverSource>) {
        let _ = self.shared.vfio_drivers.set(source);
    }

    /// What device services and built-in host devices use (bus, physmap, RAM).
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    pub fn ram(&self) -> &GuestRam {
        &self.shared.ram
    }

    pub fn bus(&self) -> &Arc<IoBus> {
        &self.shared.bus
    }

    pub fn control(&self) -> &Arc<RunControl> {
        &self.control
    }

    /// Load a guest program and point every vCPU at it (before `start`).
    pub fn load_program(&self, program: &GuestProgram, preset: &RegPreset) -> Result<(), VmError> {
        preset.validate()?;
        let vcpus = lock(&self.vcpus);
        if vcpus.iter().any(Vcpu::started) {
            return Err(VmError::AlreadyStarted);
        }
        guest::load(&self.shared.ram, program)?;
        for v in vcpus.iter() {
            guest::setup_vcpu(&v.fd(), v.index, preset)?;
        }
        drop(vcpus);
        self.update_boot_info()?;
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Start the vCPU threads.
    pub fn start(&self) -> Result<(), VmError> {
        if !self.loaded.load(Ordering::Acquire) {
            return Err(VmError::NotLoaded);
        }
        let mut vcpus = lock(&self.vcpus);
        if vcpus.iter().any(Vcpu::started) {
            return Err(VmError::AlreadyStarted);
        }
        let ctx = VcpuContext {
            bus: Arc::clone(&self.shared.bus),
            serial: Arc::clone(&self.serial),
            control: Arc::clone(&self.control),
        };
        for v in vcpus.iter_mut() {
            v.start(ctx.clone())?;
        }
        Ok(())
    }

    /// Block until the VM stops.
    pub fn wait(&self) -> VmExit {
        let exit = self.control.wait();
        self.join_vcpus();
        exit
    }

    /// Stop the VM (as `quit` does).
    pub fn stop(&self, exit: VmExit) {
        self.control.stop(exit);
        for v in lock(&self.vcpus).iter() {
            v.kick();
        }
    }

    fn join_vcpus(&self) {
        for v in lock(&self.vcpus).iter() {
            v.kick();
        }
        for v in lock(&self.vcpus).iter_mut() {
            v.join();
        }
    }

    /// Pause every vCPU: kick them out of KVM_RUN and wait until they are
    /// parked. Their state can then be read.
    pub fn pause(&self) -> Result<(), VmError> {
        let vcpus = lock(&self.vcpus);
        let started = vcpus.iter().filter(|v| v.started()).count();
        if started == 0 {
            return Err(VmError::NotRunning);
        }
        self.control.request_pause(true);
        for v in vcpus.iter() {
            v.kick();
        }
        self.control.wait_parked(started);
        log::debug!("vm: {started} vCPUs paused");
        Ok(())
    }

    /// Resume after [`Vm::pause`].
    pub fn resume(&self) {
        self.control.request_pause(false);
    }

    pub fn paused(&self) -> bool {
        self.control.paused()
    }

    /// Save every vCPU's state (the VM must be paused or not started).
    pub fn save_vcpu_state(&self) -> Result<Vec<VcpuState>, VmError> {
        let vcpus = lock(&self.vcpus);
        vcpus
            .iter()
            .map(|v| vcpu::save_state(v.index, &v.fd(), &self.msr_indices).map_err(VmError::from))
            .collect()
    }

    /// Restore vCPU states into this VM's vCPUs, which must not have run.
    pub fn restore_vcpu_state(&self, states: &[VcpuState]) -> Result<(), VmError> {
        let vcpus = lock(&self.vcpus);
        if vcpus.iter().any(Vcpu::started) {
            return Err(VmError::AlreadyStarted);
        }
        if states.len() != vcpus.len() {
            return Err(VmError::StateCount { got: states.len(), want: vcpus.len() });
        }
        for (v, s) in vcpus.iter().zip(states) {
            vcpu::restore_state(v.index, &v.fd(), s)?;
        }
        self.loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Save the irqchip, PIT and clock.
    pub fn save_vm_state(&self) -> Result<VmState, VmError> {
        let fd = self.shared.kvm.fd();
        let mut irqchips = Vec::new();
        for chip_id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
            let mut c = kvm_irqchip { chip_id, ..Default::default() };
            fd.get_irqchip(&mut c).map_err(|source| VmError::VmState { what: "KVM_GET_IRQCHIP", source })?;
            irqchips.push(c);
        }
        Ok(VmState {
            irqchips,
            pit: fd.get_pit2().map_err(|source| VmError::VmState { what: "KVM_GET_PIT2", source })?,
            clock: fd.get_clock().map_err(|source| VmError::VmState { what: "KVM_GET_CLOCK", source })?,
            pci_config_address: self.shared.pci.config_address(),
        })
    }

    /// Restore what [`Vm::save_vm_state`] saved.
    pub fn restore_vm_state(&self, s: &VmState) -> Result<(), VmError> {
        let fd = self.shared.kvm.fd();
        for c in &s.irqchips {
            fd.set_irqchip(c).map_err(|source| VmError::VmState { what: "KVM_SET_IRQCHIP", source })?;
        }
        fd.set_pit2(&s.pit).map_err(|source| VmError::VmState { what: "KVM_SET_PIT2", source })?;
        let clock = kvm_clock_data { clock: s.clock.clock, flags: 0, ..Default::default() };
        fd.set_clock(&clock).map_err(|source| VmError::VmState { what: "KVM_SET_CLOCK", source })?;
        self.shared.pci.set_config_address(s.pci_config_address);
        Ok(())
    }

    /// Turn KVM dirty-page logging on or off for every memory slot.
    pub fn enable_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        Ok(self.shared.kvm.set_dirty_logging(on)?)
    }

    /// Take the memory slots out of KVM until the guard is attached or
    /// dropped (see [`KvmVm::detach_slots`] for why): for loading RAM
    /// before the guest runs. The guest must not run meanwhile.
    pub fn detach_memory_slots(&self) -> Result<DetachedSlots<'_>, VmError> {
        self.shared.kvm.detach_slots()?;
        Ok(DetachedSlots { kvm: Some(&self.shared.kvm) })
    }

    /// KVM's dirty bitmap of `slot` (one bit per page of the slot), cleared.
    pub fn get_and_clear_dirty_bitmap(&self, slot: u32) -> Result<Vec<u64>, VmError> {
        Ok(self.shared.kvm.get_and_clear_dirty_bitmap(slot)?)
    }

    /// The memory slots and what they map.
    pub fn mappings(&self) -> Vec<physmap::Mapping> {
        lock(&self.shared.physmap).mappings()
    }

    /// Every RAM block that migrates: guest RAM and device-registered RAM.
    pub fn ram_blocks(&self) -> Vec<RamBlock> {
        lock(&self.shared.ram_blocks).list()
    }

    /// The dirty pages of RAM block `name` since the last call, one bit per
    /// page of the block: KVM's log of every slot mapping part of it, plus
    /// pages the host or the device marked.
    pub fn get_and_clear_block_dirty(&self, name: &str) -> Result<Vec<u64>, VmError> {
        let mut bitmap = lock(&self.shared.ram_blocks).take_soft_dirty(name)?;
        let block = lock(&self.shared.ram_blocks)
            .get(name)
            .ok_or_else(|| ramblocks::RamRegistryError::Unknown(name.to_owned()))?;
        if !self.shared.kvm.dirty_logging() {
            return Ok(bitmap);
        }
        let maps = self.mappings();
        for m in maps.iter().filter(|m| {
            m.host_addr >= block.host_addr && m.host_addr + m.size <= block.host_addr + block.size
        }) {
            let slot_bits = self.get_and_clear_dirty_bitmap(m.slot)?;
            let first = (m.host_addr - block.host_addr) / PAGE_SIZE;
            for p in 0..m.size / PAGE_SIZE {
                if slot_bits.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0) {
                    let bp = first + p;
                    if let Some(w) = bitmap.get_mut((bp / 64) as usize) {
                        *w |= 1 << (bp % 64);
                    }
                }
            }
        }
        Ok(bitmap)
    }

    /// Create a device with `create` (given its host services), place and
    /// map its memory region, and plug it. On failure nothing is left behind.
    pub fn add_device(
        &self,
        kind: &str,
        id: &str,
        create: impl FnOnce(dmhost_plugin_api::Host) -> Result<DeviceImpl, PluginError>,
    ) -> Result<DeviceInfo, VmError> {
        if !valid_id(id) {
            return Err(VmError::BadId(id.to_owned()));
        }
        if lock(&self.devices).iter().any(|d| d.device.id == id) {
            return Err(VmError::DuplicateId(id.to_owned()));
        }
        let services = DeviceServices::new(Arc::downgrade(&self.shared), id);
        let imp = create(services.host()).map_err(|source| VmError::Create {
            id: id.to_owned(),
            kind: kind.to_owned(),
            source,
        })?;
        let device = Arc::new(HostDevice::new(id, kind, imp));
        services.bind(&device);
        let owner = Owner::Device(id.to_owned());
        let result = self.place_and_plug(&device, &owner);
        let region = match result {
            Ok(r) => r,
            Err(e) => {
                self.release(&services, &owner);
                return Err(e);
            }
        };
        {
            let mut devices = lock(&self.devices);
            if devices.iter().any(|d| d.device.id == id) {
                drop(devices);
                let _ = device.lock().unplug();
                self.release(&services, &owner);
                return Err(VmError::DuplicateId(id.to_owned()));
            }
            devices.push(DeviceEntry { device: Arc::clone(&device), region });
        }
        lock(&self.services).push(services);
        self.shared.intx.offer_router(&device);
        self.shared.pci.attach(&device);
        self.update_boot_info()?;
        log::info!(
            "device {id} ({kind}) added{}",
            match region {
                Some((gpa, size)) => format!(", region at {gpa:#x} (+{size:#x})"),
                None => String::new(),
            }
        );
        self.device_info(id).ok_or_else(|| VmError::NoSuchDevice(id.to_owned()))
    }

    fn place_and_plug(&self, device: &Arc<HostDevice>, owner: &Owner) -> Result<Option<(u64, u64)>, VmError> {
        let id = &device.id;
        let region = device.lock().memory_region();
        let mut placed = None;
        if let Some(r) = region {
            let m = r.memory;
            if m.size == 0 || m.size % PAGE_SIZE != 0 || m.host_addr % PAGE_SIZE != 0 {
                return Err(VmError::BadRegion { id: id.clone(), host_addr: m.host_addr, size: m.size });
            }
            let mut pm = lock(&self.shared.physmap);
            let gpa = pm.allocate(m.size, r.align, r.requested_gpa.into_option())?;
            pm.claim(gpa, m.size, owner.clone(), RangeUse::DeviceMemory)?;
            pm.set_backing(
                owner.clone(),
                Backing { host_addr: m.host_addr, size: m.size, read_only: m.read_only },
            );
            pm.map(&self.shared.kvm, owner, gpa, m.size, 0)?;
            placed = Some((gpa, m.size));
        }
        let info = PlugInfo { region_gpa: placed.map(|(g, _)| g).into() };
        device.lock().plug(info).map_err(|source| VmError::Plug { id: id.clone(), source })?;
        Ok(placed)
    }

    /// Drop everything `owner` holds: bus ranges, mappings (KVM slots),
    /// claims, RAM blocks, irqfds.
    fn release(&self, services: &DeviceServices, owner: &Owner) {
        let id = services.id();
        let n = self.shared.bus.remove_owner(id);
        if n > 0 {
            log::debug!("device {id}: {n} bus ranges released");
        }
        if let Err(e) = lock(&self.shared.physmap).release_owner(&self.shared.kvm, owner) {
            log::error!("device {id}: releasing its guest-physical ranges failed: {e}");
        }
        lock(&self.shared.ram_blocks).unregister_owner(owner);
        self.shared.intx.release(id);
        services.release_irqfds();
    }

    /// Unplug and remove device `id`. Its region disappears from the guest
    /// (accesses become MMIO exits nobody claims: all ones).
    pub fn remove_device(&self, id: &str) -> Result<(), VmError> {
        let entry = {
            let mut devices = lock(&self.devices);
            let pos = devices
                .iter()
                .position(|d| d.device.id == id)
                .ok_or_else(|| VmError::NoSuchDevice(id.to_owned()))?;
            devices.remove(pos)
        };
        self.shared.pci.detach(id);
        let services = {
            let mut s = lock(&self.services);
            s.iter().position(|s| s.id() == id).map(|p| s.remove(p))
        };
        if let Err(e) = entry.device.lock().unplug() {
            log::warn!("device {id}: unplug failed ({e}); removing its ranges anyway");
        }
        let owner = Owner::Device(id.to_owned());
        match services {
            Some(s) => self.release(&s, &owner),
            None => self.release(&DeviceServices::new(Arc::downgrade(&self.shared), id), &owner),
        }
        self.update_boot_info()?;
        log::info!("device {id} removed");
        Ok(())
    }

    /// The device `id`, to call it directly (migration, ACPI).
    pub fn device(&self, id: &str) -> Option<Arc<HostDevice>> {
        lock(&self.devices).iter().find(|d| d.device.id == id).map(|d| Arc::clone(&d.device))
    }

    pub fn device_info(&self, id: &str) -> Option<DeviceInfo> {
        self.devices().into_iter().find(|d| d.id == id)
    }

    /// Every device, in plug order.
    pub fn devices(&self) -> Vec<DeviceInfo> {
        let ranges = self.shared.bus.ranges();
        type Listed = (Arc<HostDevice>, Option<(u64, u64)>);
        let list: Vec<Listed> =
            lock(&self.devices).iter().map(|d| (Arc::clone(&d.device), d.region)).collect();
        list.into_iter()
            .map(|(d, region)| {
                let (fenced, failed) = {
                    let imp = d.lock();
                    (imp.is_fenced(), imp.is_failed())
                };
                let of = |space| {
                    ranges
                        .iter()
                        .filter(|r| r.space == space && r.owner == d.id)
                        .map(|r| (r.base, r.size))
                        .collect::<Vec<_>>()
                };
                DeviceInfo {
                    id: d.id.clone(),
                    kind: d.kind.clone(),
                    region,
                    mmio: of(IoSpace::Mmio),
                    pio: of(IoSpace::Pio),
                    fenced,
                    failed,
                }
            })
            .collect()
    }

    /// Boot-info generation (bumped on every plug/unplug).
    pub fn generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Add a [`DeviceListener`].
    pub fn on_devices_changed(&self, listener: DeviceListener) {
        lock(&self.listeners).push(listener);
    }

    fn update_boot_info(&self) -> Result<(), VmError> {
        let listeners = lock(&self.listeners).clone();
        for l in listeners {
            l(self);
        }
        let list: Vec<BootDevice> = self
            .devices()
            .into_iter()
            .map(|d| BootDevice {
                id: d.id,
                kind: d.kind,
                region_gpa: d.region.map_or(0, |r| r.0),
                region_size: d.region.map_or(0, |r| r.1),
                mmio_base: d.mmio.first().map_or(0, |r| r.0),
            })
            .collect();
        let generation = self.generation.fetch_add(1, Ordering::AcqRel).wrapping_add(1);
        guest::write_boot_info(&self.shared.ram, &list, generation)?;
        Ok(())
    }

    /// Guest memory access (RAM and mapped device regions).
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.shared.read_guest(gpa, buf)
    }

    pub fn write_guest(&self, gpa: u64, buf: &[u8]) -> Result<(), VmError> {
        self.shared.write_guest(gpa, buf)
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u32 {
        lock(&self.vcpus).len() as u32
    }

    /// Exits handled so far (port and MMIO), for statistics.
    pub fn exit_count(&self) -> u64 {
        self.control.exits.load(Ordering::Relaxed)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop(VmExit::Requested);
        self.join_vcpus();
        // Unplug devices so their services (which hold only a weak VM
        // reference) and bus entries go before the VM.
        let ids: Vec<String> = lock(&self.devices).iter().map(|d| d.device.id.clone()).collect();
        for id in ids {
            let _ = self.remove_device(&id);
        }
    }
}
