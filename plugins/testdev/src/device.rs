//! The testdev device model.

use dmhost_plugin_api::{
    backend::MemoryBackend, DeviceModel, GuestRegion, Host, IoSpace, PlugInfo, PluginError,
};

use crate::{config::TestdevConfig, regs::*};

pub struct Testdev {
    id: String,
    config: TestdevConfig,
    host: Host,
    backend: Option<MemoryBackend>,
    region_gpa: u64,
    scratch: u64,
    echo: u64,
    counter: u64,
    pm_gpa: u64,
    pm_size: u64,
    pm_offset: u64,
    pm_status: u64,
    irq: u64,
    irq_status: u64,
}

impl Testdev {
    pub fn new(id: &str, config: TestdevConfig, host: Host) -> Result<Self, PluginError> {
        let backend = match config.mem_size {
            Some(size) => Some(
                MemoryBackend::memfd(&format!("testdev-{id}"), size)
                    .map_err(|e| PluginError::io(format!("testdev {id}: backend: {e}")))?,
            ),
            None => None,
        };
        Ok(Self {
            id: id.to_owned(),
            config,
            host,
            backend,
            region_gpa: 0,
            scratch: 0,
            echo: 0,
            counter: 0,
            pm_gpa: 0,
            pm_size: 0,
            pm_offset: 0,
            pm_status: STATUS_NONE,
            irq: 0,
            irq_status: STATUS_NONE,
        })
    }

    fn maybe_panic(&self, method: &str) {
        if self.config.panic_on.as_deref() == Some(method) {
            panic!("testdev {}: panic-on {method}", self.id);
        }
    }

    fn read_reg(&self, reg: u64) -> u64 {
        match reg {
            ID => ID_VALUE,
            SCRATCH => self.scratch,
            ECHO => !self.echo,
            COUNTER => self.counter,
            PM_GPA => self.pm_gpa,
            PM_SIZE => self.pm_size,
            PM_OFFSET => self.pm_offset,
            PM_STATUS => self.pm_status,
            REGION_GPA => self.region_gpa,
            REGION_SIZE => self.config.mem_size.unwrap_or(0),
            IRQ => self.irq,
            IRQ_STATUS => self.irq_status,
            _ => u64::MAX,
        }
    }

    fn write_reg(&mut self, reg: u64, value: u64) {
        match reg {
            SCRATCH => self.scratch = value,
            ECHO => self.echo = value,
            COUNTER => self.counter = value,
            PM_GPA => self.pm_gpa = value,
            PM_SIZE => self.pm_size = value,
            PM_OFFSET => self.pm_offset = value,
            PM_CMD => self.physmap_request(value),
            IRQ => self.set_irq(value != 0),
            _ => log::debug!("testdev {}: write to read-only/unknown register {reg:#x}", self.id),
        }
    }

    fn physmap_request(&mut self, cmd: u64) {
        let r = match cmd {
            PM_CMD_REMOVE => self.host.physmap_remove(self.pm_gpa, self.pm_size),
            PM_CMD_ADD => self.host.physmap_add(self.pm_gpa, self.pm_size, self.pm_offset),
            _ => {
                self.pm_status = 1 + dmhost_plugin_api::ErrorKind::Unsupported as u64;
                return;
            }
        };
        self.pm_status = match r.into_result() {
            Ok(()) => STATUS_OK,
            Err(e) => {
                log::info!("testdev {}: physmap request {cmd} refused: {e}", self.id);
                1 + e.kind as u64
            }
        };
    }

    fn set_irq(&mut self, level: bool) {
        let r = self.host.set_intx(self.config.devfn, self.config.intx_pin, level).into_result();
        self.irq_status = match r {
            Ok(()) => {
                self.irq = u64::from(level);
                STATUS_OK
            }
            Err(e) => {
                log::info!("testdev {}: INTx {level} refused: {e}", self.id);
                1 + e.kind as u64
            }
        };
    }

    /// Register and byte shift of an access, if it is inside the bank.
    fn decode(&self, addr: u64, len: usize) -> Option<(u64, u32)> {
        let base = self.config.mmio_base?;
        let off = addr.checked_sub(base)?;
        let shift = (off & 7) as usize;
        if off >= BANK_SIZE || !matches!(len, 1 | 2 | 4 | 8) || shift + len > 8 {
            return None;
        }
        Some((off & !7, (shift * 8) as u32))
    }
}

impl DeviceModel for Testdev {
    fn memory_region(&self) -> Option<GuestRegion> {
        self.maybe_panic("memory_region");
        self.backend.as_ref().map(|b| GuestRegion {
            memory: b.whole(),
            requested_gpa: self.config.mem_addr.into(),
            align: 4096,
        })
    }

    fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        self.maybe_panic("plug");
        if let Some(base) = self.config.mmio_base {
            self.host.register_io(IoSpace::Mmio, base, BANK_SIZE).into_result()?;
        }
        self.region_gpa = info.region_gpa.into_option().unwrap_or(0);
        log::info!(
            "testdev {} plugged (mmio {:?}, region {:#x})",
            self.id,
            self.config.mmio_base,
            self.region_gpa
        );
        Ok(())
    }

    fn unplug(&mut self) -> Result<(), PluginError> {
        self.maybe_panic("unplug");
        if let Some(base) = self.config.mmio_base {
            self.host.unregister_io(IoSpace::Mmio, base, BANK_SIZE).into_result()?;
        }
        self.region_gpa = 0;
        Ok(())
    }

    fn pio_read(&mut self, _port: u64, data: &mut [u8]) -> Result<(), PluginError> {
        self.maybe_panic("pio_read");
        data.fill(0xff);
        Ok(())
    }

    fn pio_write(&mut self, _port: u64, _data: &[u8]) -> Result<(), PluginError> {
        self.maybe_panic("pio_write");
        Ok(())
    }

    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), PluginError> {
        self.maybe_panic("mmio_read");
        let Some((reg, shift)) = self.decode(addr, data.len()) else {
            data.fill(0xff);
            return Err(PluginError::unsupported(format!(
                "testdev {}: bad MMIO read at {addr:#x} len {}",
                self.id,
                data.len()
            )));
        };
        let v = (self.read_reg(reg) >> shift).to_le_bytes();
        data.copy_from_slice(&v[..data.len()]);
        Ok(())
    }

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Result<(), PluginError> {
        self.maybe_panic("mmio_write");
        let Some((reg, shift)) = self.decode(addr, data.len()) else {
            return Err(PluginError::unsupported(format!(
                "testdev {}: bad MMIO write at {addr:#x} len {}",
                self.id,
                data.len()
            )));
        };
        self.counter = self.counter.wrapping_add(1);
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let value = if data.len() == 8 {
            v
        } else {
            let mask = ((1u64 << (data.len() * 8)) - 1) << shift;
            (self.read_reg(reg) & !mask) | ((v << shift) & mask)
        };
        self.write_reg(reg, value);
        Ok(())
    }

    fn pci_config_read(&mut self, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        for (i, b) in data.iter_mut().enumerate() {
            *b = match offset.checked_add(i as u32) {
                Some(0) => 0xf4,
                Some(1) => 0x1a,
                Some(0x3d) => self.config.intx_pin as u8,
                Some(o) if o < 256 => 0,
                _ => 0xff,
            };
        }
        Ok(())
    }

    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        self.maybe_panic("save_live_complete_precopy");
        let mut v = Vec::with_capacity(24);
        for r in [self.scratch, self.echo, self.counter] {
            v.extend_from_slice(&r.to_le_bytes());
        }
        Ok(v)
    }

    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        self.maybe_panic("load_state");
        if version != 1 || data.len() != 24 {
            return Err(PluginError::migration(format!(
                "testdev state: version {version}, {} bytes (want version 1, 24 bytes)",
                data.len()
            )));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        self.scratch = word(0);
        self.echo = word(1);
        self.counter = word(2);
        Ok(())
    }
}
