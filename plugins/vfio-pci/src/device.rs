//! The PCI front end: config space, BAR access, interrupts and migration
//! of one VFIO device, over any [`VfioBackend`].

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use dmhost_plugin_api::{
    vfio::{
        VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_ACTION_UNMASK, VFIO_PCI_CONFIG_REGION_INDEX,
        VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX,
    },
    DeviceModel, ErrorKind, GuestRegion, Host, IoSpace, MemoryRegion, PendingSize, PlugInfo, PluginError,
    RStr, SaveChunk,
};

use crate::{
    backend::VfioBackend,
    bars::{BarMap, DirectBar, Mapping},
    config::{Source, VfioPciConfig},
    config_space::{ConfigEffect, ConfigSpace},
    kernel::KernelBackend,
    migration::{Migration, STATE_VERSION},
    msix::{Control, Hit, MsixVectors},
    vendor::VendorBackend,
};

/// A non-blocking eventfd for an interrupt vector.
pub(crate) fn eventfd() -> Result<OwnedFd, PluginError> {
    // SAFETY: plain eventfd creation; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(PluginError::io(format!("eventfd: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

struct Intx {
    gsi: u32,
    trigger: OwnedFd,
    _resample: OwnedFd,
}

struct DirectRegion {
    index: u32,
    region: MemoryRegion,
    /// Pages of it that stay trapped (MSI-X), page aligned.
    trap: Option<(u64, u64)>,
}

pub struct VfioPci {
    id: String,
    host: Host,
    backend: Box<dyn VfioBackend>,
    config: ConfigSpace,
    bars: BarMap,
    direct: Option<DirectRegion>,
    migration: Migration,
    intx_gsi: Option<u32>,
    intx: Option<Intx>,
    /// MSI vectors enabled in the backend, with whether the host routes them.
    msi: Vec<(OwnedFd, bool)>,
    msi_warned: bool,
    /// MSI-X: the shadow table and its vectors (when the device has it).
    msix: Option<MsixVectors>,
    plugged: bool,
}

impl VfioPci {
    /// Open the configured backend and build the front end over it.
    pub fn open(id: &str, config: VfioPciConfig, host: Host) -> Result<Self, PluginError> {
        let backend: Box<dyn VfioBackend> = match &config.source {
            Source::Kernel { sysfs, cdev } => Box::new(
                KernelBackend::open(sysfs, *cdev)
                    .map_err(|e| PluginError::io(format!("vfio-pci {id}: {e}")))?,
            ),
            Source::Driver { matching, config } => {
                let driver = host
                    .open_vfio_driver(RStr::from(matching.as_str()), RStr::from(config.as_str()))
                    .into_result()
                    .map_err(|e| {
                        PluginError::new(e.kind, format!("vfio-pci {id}: driver {matching:?}: {}", e.message))
                    })?;
                Box::new(VendorBackend::new(matching, driver))
            }
        };
        Self::with_backend(id, backend, config.intx_gsi, config.allow_precopy, host)
    }

    /// Build over an already-open backend (tests use a double).
    pub fn with_backend(
        id: &str,
        backend: Box<dyn VfioBackend>,
        intx_gsi: Option<u32>,
        allow_precopy: bool,
        host: Host,
    ) -> Result<Self, PluginError> {
        let info = backend.device_info();
        if info.flags & dmhost_plugin_api::vfio::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(PluginError::unsupported(format!(
                "vfio-pci {id}: {} is not a PCI device",
                backend.describe()
            )));
        }
        let config = ConfigSpace::from_backend(&*backend)
            .map_err(|e| PluginError::io(format!("vfio-pci {id}: {e}")))?;
        // The first mmap-able BAR is the device's guest region.
        let mut direct = None;
        let mut direct_trap = None;
        for bar in config.bars() {
            match backend.region_mmap(bar.index) {
                Ok(Some(region)) if region.size == bar.size && region.host_addr % 4096 == 0 => {
                    direct = Some(DirectRegion { index: bar.index, region, trap: None });
                    break;
                }
                Ok(_) => {}
                Err(e) => log::debug!("vfio-pci {id}: BAR{} mmap: {e}", bar.index),
            }
        }
        let msix = config.msix().map(|cap| MsixVectors::new(cap, &*backend));
        if let (Some(d), Some(m)) = (direct.as_ref(), msix.as_ref()) {
            direct_trap = m.table.trap_in(d.index);
            if let Some((off, len)) = direct_trap {
                log::info!("vfio-pci {id}: BAR{} +{off:#x}+{len:#x} (MSI-X) stays trapped", d.index);
            }
        }
        let migration = Migration::new(&*backend, allow_precopy);
        let (vendor, device) = config.ids();
        log::info!(
            "vfio-pci {id}: {} {vendor:04x}:{device:04x}, migration flags {:#x}",
            backend.describe(),
            info.migration_flags
        );
        Ok(Self {
            id: id.to_owned(),
            host,
            backend,
            config,
            bars: BarMap::default(),
            direct: direct.map(|d| DirectRegion { trap: direct_trap, ..d }),
            migration,
            intx_gsi,
            intx: None,
            msi: Vec::new(),
            msi_warned: false,
            msix,
            plugged: false,
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> PluginError {
        PluginError::io(format!("vfio-pci {}: {e}", self.id))
    }

    fn mig_err(&self, e: crate::migration::MigrationError) -> PluginError {
        PluginError::migration(format!("vfio-pci {}: {e}", self.id))
    }

    fn direct_bar(&self) -> Option<DirectBar> {
        self.direct.as_ref().map(|d| DirectBar { index: d.index, size: d.region.size, trap: d.trap })
    }

    fn sync_bars(&mut self) {
        if self.plugged {
            let direct = self.direct_bar();
            self.bars.sync(&self.config, &self.host, direct, &self.id);
        }
    }

    fn setup_intx(&mut self) -> Result<(), PluginError> {
        let Some(gsi) = self.intx_gsi else {
            return Ok(());
        };
        let count = self.backend.irq_info(VFIO_PCI_INTX_IRQ_INDEX).map(|i| i.count).unwrap_or(0);
        if count == 0 {
            log::info!("vfio-pci {}: device has no INTx; intx-gsi {gsi} unused", self.id);
            return Ok(());
        }
        let (trigger, resample) = (eventfd()?, eventfd()?);
        let b = &self.backend;
        b.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[trigger.as_raw_fd()])
            .map_err(|e| self.err(format!("INTx trigger: {e}")))?;
        if let Err(e) =
            b.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_UNMASK, 0, &[resample.as_raw_fd()])
        {
            let _ = b.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]);
            return Err(self.err(format!("INTx unmask: {e}")));
        }
        if let Err(e) = self.host.register_irqfd(gsi, trigger.as_raw_fd(), resample.as_raw_fd()).into_result()
        {
            let _ = b.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]);
            return Err(e);
        }
        self.intx = Some(Intx { gsi, trigger, _resample: resample });
        Ok(())
    }

    fn teardown_intx(&mut self) {
        if let Some(intx) = self.intx.take() {
            if let Err(e) = self.host.unregister_irqfd(intx.gsi, intx.trigger.as_raw_fd()).into_result() {
                log::warn!("vfio-pci {}: INTx irqfd: {e}", self.id);
            }
            let _ = self.backend.set_irqs(VFIO_PCI_INTX_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]);
        }
    }

    fn teardown_msi(&mut self) {
        if self.msi.is_empty() {
            return;
        }
        for (fd, routed) in self.msi.drain(..) {
            if routed {
                if let Err(e) = self.host.unregister_msi_irqfd(fd.as_raw_fd()).into_result() {
                    log::warn!("vfio-pci {}: MSI irqfd: {e}", self.id);
                }
            }
        }
        let _ = self.backend.set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &[]);
    }

    /// Follow the guest's MSI enable/address/data.
    fn update_msi(&mut self) -> Result<(), PluginError> {
        let Some((enabled, vectors, address, data)) = self.config.msi_state() else {
            return Ok(());
        };
        if !enabled || !self.plugged {
            self.teardown_msi();
            return Ok(());
        }
        let max = self.backend.irq_info(VFIO_PCI_MSI_IRQ_INDEX).map(|i| i.count).unwrap_or(0);
        let count = vectors.min(max) as usize;
        if count == 0 {
            return Ok(());
        }
        if self.msi.len() != count {
            self.teardown_msi();
            let mut fds = Vec::with_capacity(count);
            for _ in 0..count {
                fds.push((eventfd()?, false));
            }
            let raw: Vec<RawFd> = fds.iter().map(|(f, _)| f.as_raw_fd()).collect();
            self.backend
                .set_irqs(VFIO_PCI_MSI_IRQ_INDEX, VFIO_IRQ_SET_ACTION_TRIGGER, 0, &raw)
                .map_err(|e| self.err(format!("MSI: {e}")))?;
            self.msi = fds;
        }
        for (vector, (fd, routed)) in self.msi.iter_mut().enumerate() {
            let vdata = data | vector as u32;
            match self.host.register_msi_irqfd(fd.as_raw_fd(), address, vdata).into_result() {
                Ok(()) => *routed = true,
                Err(e) if e.kind == ErrorKind::Unsupported => {
                    if !self.msi_warned {
                        log::warn!("vfio-pci {}: MSI enabled but {}", self.id, e.message);
                        self.msi_warned = true;
                    }
                }
                Err(e) => log::warn!("vfio-pci {}: MSI vector {vector}: {e}", self.id),
            }
        }
        Ok(())
    }

    fn apply_effects(&mut self, effects: &[ConfigEffect]) -> Result<(), PluginError> {
        let mut bars = false;
        let mut msi = false;
        let mut msix = false;
        if effects.contains(&ConfigEffect::FunctionReset) {
            // Everything config space drives is re-derived by the reset.
            return self.function_reset();
        }
        for fx in effects {
            match *fx {
                ConfigEffect::FunctionReset => {}
                ConfigEffect::Decode | ConfigEffect::BarWritten(_) => bars = true,
                ConfigEffect::MsiControl | ConfigEffect::MsiRoute => msi = true,
                ConfigEffect::MsixControl => msix = true,
                ConfigEffect::IntxDisable => {}
                ConfigEffect::Forward { offset, len } => {
                    let bytes = self.config.bytes()[offset..offset + len].to_vec();
                    if let Err(e) =
                        self.backend.region_write(VFIO_PCI_CONFIG_REGION_INDEX, offset as u64, &bytes)
                    {
                        log::debug!("vfio-pci {}: forwarding config {offset:#x}: {e}", self.id);
                    }
                }
            }
        }
        if bars {
            self.sync_bars();
        }
        if msi {
            self.update_msi()?;
        }
        if msix {
            self.update_msix()?;
        }
        Ok(())
    }

    fn msix_control(&self) -> Control {
        let (enabled, function_masked) = self.config.msix_control();
        Control { enabled: enabled && self.plugged, function_masked }
    }

    /// Follow the guest's MSI-X enable and function mask.
    fn update_msix(&mut self) -> Result<(), PluginError> {
        let ctl = self.msix_control();
        match self.msix.as_mut() {
            Some(m) => m.sync_all(ctl, &self.host, &*self.backend, &self.id),
            None => Ok(()),
        }
    }

    fn teardown_msix(&mut self) {
        if let Some(m) = self.msix.as_mut() {
            m.teardown(&self.host, &*self.backend, &self.id);
        }
    }

    /// A guest access to the MSI-X table or PBA; `false` when it is not one.
    fn msix_access(
        &mut self,
        index: u32,
        offset: u64,
        read: Option<&mut [u8]>,
        write: &[u8],
    ) -> Result<bool, PluginError> {
        let ctl = self.msix_control();
        let len = read.as_ref().map_or(write.len(), |b| b.len());
        let Some(m) = self.msix.as_mut() else {
            return Ok(false);
        };
        let Some(hit) = m.table.hit(index, offset, len) else {
            return Ok(false);
        };
        match read {
            Some(buf) => {
                if hit == Hit::Pba {
                    m.collect_pending();
                }
                m.table.read(hit, offset, buf);
            }
            None => {
                if let Some(vector) = m.table.write(hit, offset, write) {
                    m.sync_vector(vector, ctl, &self.host, &*self.backend, &self.id)?;
                }
            }
        }
        Ok(true)
    }

    /// Function reset, as QEMU's vfio_pci_reset: interrupts off (MSI,
    /// MSI-X; the table back to all vectors masked), then the device reset.
    pub fn reset(&mut self) -> Result<(), PluginError> {
        self.teardown_msi();
        self.teardown_msix();
        if let Some(m) = self.msix.as_mut() {
            m.table.reset();
        }
        let mut fx = Vec::new();
        if let Some(cap) = self.config.msix() {
            fx.extend(self.config.write(cap.offset as u32 + 2, &[0, 0]).map_err(|e| self.err(e))?);
        }
        if let Some(cap) = self.config.msi() {
            fx.extend(self.config.write(cap.offset as u32 + 2, &[0, 0]).map_err(|e| self.err(e))?);
        }
        self.apply_effects(&fx)?;
        self.backend.reset().map_err(|e| self.err(format!("reset: {e}")))
    }

    /// A guest-initiated Function Level Reset, as QEMU's FLR path
    /// (pcie_cap_flr_write_config -> vfio_pci_reset, pci_do_device_reset):
    /// interrupts off and the device reset as [`Self::reset`], and the
    /// emulated config space back to its reset state, so decoding stops and
    /// every BAR mapping and trap goes away. INTx routing is kept.
    pub fn function_reset(&mut self) -> Result<(), PluginError> {
        log::info!("vfio-pci {}: function level reset", self.id);
        self.config.reset();
        // As vfio_pci_pre_reset: stop decode and bus mastering in the device.
        let cmd = self.config.bytes()[0x04..0x06].to_vec();
        if let Err(e) = self.backend.region_write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, &cmd) {
            log::debug!("vfio-pci {}: clearing the device's command register: {e}", self.id);
        }
        self.sync_bars();
        self.reset()
    }

    /// The MSI-X vectors (for tests and diagnostics).
    pub fn msix(&self) -> Option<&MsixVectors> {
        self.msix.as_ref()
    }

    fn bar_access(
        &mut self,
        space: IoSpace,
        addr: u64,
        read: Option<&mut [u8]>,
        write: &[u8],
    ) -> Result<(), PluginError> {
        let len = read.as_ref().map_or(write.len(), |b| b.len());
        let Some((index, offset)) = self.bars.lookup(space, addr, len) else {
            if let Some(buf) = read {
                buf.fill(0xff);
            }
            return Ok(());
        };
        let mut read = read;
        if self.msix_access(index, offset, read.as_deref_mut(), write)? {
            return Ok(());
        }
        let r = match read {
            Some(buf) => self.backend.region_read(index, offset, buf),
            None if index == dmhost_plugin_api::vfio::VFIO_PCI_ROM_REGION_INDEX => Ok(()),
            None => self.backend.region_write(index, offset, write),
        };
        r.map_err(|e| self.err(format!("BAR{index}+{offset:#x}: {e}")))
    }

    /// The migration state as tracked (for tests and diagnostics).
    pub fn migration_state(&self) -> dmhost_plugin_api::MigState {
        self.migration.state()
    }

    pub fn bar_mappings(&self) -> &[Mapping] {
        self.bars.mappings()
    }
}

impl DeviceModel for VfioPci {
    fn memory_region(&self) -> Option<GuestRegion> {
        self.direct.as_ref().map(|d| GuestRegion {
            memory: d.region,
            requested_gpa: None.into(),
            align: d.region.size.max(4096),
        })
    }

    /// Device memory migrates through the VFIO data stream, not as RAM.
    fn backend_memory(&self) -> Option<MemoryRegion> {
        None
    }

    fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        self.plugged = true;
        if let (Some(d), Some(gpa)) = (&self.direct, info.region_gpa.into_option()) {
            // The host mapped the BAR's memory at `gpa`: that is where the
            // BAR decodes until the guest moves it.
            let (index, size, trap) = (d.index, d.region.size, d.trap);
            let at = 0x10 + 4 * index;
            let mut fx = self.config.write(at, &(gpa as u32).to_le_bytes()).map_err(|e| self.err(e))?;
            if self.config.bar(index).is_some_and(|b| b.kind == crate::config_space::BarKind::Mem64) {
                fx.extend(
                    self.config
                        .write(at + 4, &((gpa >> 32) as u32).to_le_bytes())
                        .map_err(|e| self.err(e))?,
                );
            }
            // As firmware would: the placed BAR decodes from the start.
            let cmd = self.config.command() | crate::config_space::CMD_MEM;
            fx.extend(self.config.write(0x04, &cmd.to_le_bytes()).map_err(|e| self.err(e))?);
            let forward: Vec<_> =
                fx.into_iter().filter(|f| matches!(f, ConfigEffect::Forward { .. })).collect();
            self.apply_effects(&forward)?;
            self.bars.adopt(
                Mapping { index, space: IoSpace::Mmio, gpa, size, direct: true, trap },
                &self.host,
                &self.id,
            );
        }
        if let Err(e) = self.setup_intx() {
            self.plugged = false;
            return Err(e);
        }
        self.sync_bars();
        self.update_msi()?;
        self.update_msix()?;
        log::info!("vfio-pci {} plugged", self.id);
        Ok(())
    }

    fn unplug(&mut self) -> Result<(), PluginError> {
        self.bars.clear(&self.host, &self.id);
        self.teardown_msi();
        self.teardown_msix();
        self.teardown_intx();
        self.plugged = false;
        log::info!("vfio-pci {} unplugged", self.id);
        Ok(())
    }

    fn pio_read(&mut self, port: u64, data: &mut [u8]) -> Result<(), PluginError> {
        self.bar_access(IoSpace::Pio, port, Some(data), &[])
    }
    fn pio_write(&mut self, port: u64, data: &[u8]) -> Result<(), PluginError> {
        self.bar_access(IoSpace::Pio, port, None, data)
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        self.bar_access(IoSpace::Mmio, addr, Some(data), &[])
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<(), PluginError> {
        self.bar_access(IoSpace::Mmio, addr, None, data)
    }

    fn pci_config_read(&mut self, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        self.config.read(offset, data).map_err(|e| self.err(e))
    }
    fn pci_config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), PluginError> {
        let fx = self.config.write(offset, data).map_err(|e| self.err(e))?;
        self.apply_effects(&fx)
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }
    fn save_setup(&mut self) -> Result<(), PluginError> {
        let r = self.migration.save_setup(&mut *self.backend);
        r.map_err(|e| self.mig_err(e))
    }
    fn state_pending_estimate(&mut self) -> PendingSize {
        self.migration.pending_estimate()
    }
    fn state_pending_exact(&mut self) -> PendingSize {
        self.migration.pending_exact(&*self.backend)
    }
    fn is_active_iterate(&self) -> bool {
        self.migration.is_active_iterate()
    }
    fn save_live_iterate(&mut self) -> Result<SaveChunk, PluginError> {
        let r = self.migration.save_iterate(&mut *self.backend);
        r.map_err(|e| self.mig_err(e))
    }
    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        // Config space, then the MSI-X table and pending bits.
        let mut config = self.config.save();
        if let Some(m) = &mut self.msix {
            m.collect_pending();
            config.extend(m.table.save());
        }
        let r = self.migration.save_complete(&mut *self.backend, &config);
        r.map_err(|e| self.mig_err(e))
    }
    fn save_cleanup(&mut self) {
        self.migration.save_cleanup(&mut *self.backend);
    }
    fn load_setup(&mut self) -> Result<(), PluginError> {
        let r = self.migration.load_setup(&mut *self.backend);
        r.map_err(|e| self.mig_err(e))
    }
    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        let r = self.migration.load_state(&mut *self.backend, version, data);
        let Some(saved) = r.map_err(|e| self.mig_err(e))? else {
            return Ok(());
        };
        let mig_err =
            |e: &dyn std::fmt::Display| PluginError::migration(format!("vfio-pci {}: {e}", self.id));
        let (config, msix) = saved.split_at(saved.len().min(crate::config_space::CONFIG_LEN));
        match &mut self.msix {
            // A stream without the table (an older source) leaves it reset.
            Some(m) if !msix.is_empty() => m.table.restore(msix).map_err(|e| mig_err(&e))?,
            None if !msix.is_empty() => {
                return Err(mig_err(&format_args!(
                    "{} bytes of MSI-X state for a device without MSI-X",
                    msix.len()
                )))
            }
            _ => {}
        }
        self.config.restore(config).map_err(|e| mig_err(&e))?;
        // Re-derive everything config space drives.
        let forward = [
            ConfigEffect::Forward { offset: 0x04, len: 2 },
            ConfigEffect::Decode,
            ConfigEffect::MsiControl,
            ConfigEffect::MsixControl,
        ];
        self.apply_effects(&forward)
    }
    fn load_cleanup(&mut self) -> Result<(), PluginError> {
        let r = self.migration.load_cleanup(&mut *self.backend);
        r.map_err(|e| self.mig_err(e))
    }
    fn vm_state_changed(&mut self, running: bool) -> Result<(), PluginError> {
        let r = self.migration.vm_state_changed(&mut *self.backend, running);
        r.map_err(|e| self.mig_err(e))
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        if self.plugged {
            let _ = self.unplug();
        }
    }
}
