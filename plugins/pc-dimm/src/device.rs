//! The pc-dimm device model: a RAM backend the guest maps whole.

use dmhost_plugin_api::{
    backend::MemoryBackend, DeviceModel, GuestRegion, Host, PlugInfo, PluginError, RStr,
};

use crate::{config::PcDimmConfig, config::DIMM_ALIGN, migration::PcDimmState};

pub struct PcDimm {
    id: String,
    pub(crate) config: PcDimmConfig,
    backend: MemoryBackend,
    host: Host,
    /// Guest-physical base while plugged.
    pub(crate) addr: Option<u64>,
}

impl PcDimm {
    pub fn new(id: &str, config: PcDimmConfig, host: Host) -> Result<Self, PluginError> {
        let backend = match &config.mem_path {
            Some(path) => MemoryBackend::file(path, config.size, config.share, false),
            None => MemoryBackend::memfd(&format!("pc-dimm-{id}"), config.size),
        }
        .map_err(|e| PluginError::io(format!("pc-dimm {id}: backend: {e}")))?;
        Ok(Self { id: id.to_owned(), addr: config.addr, config, backend, host })
    }

    fn ram_name(&self) -> String {
        format!("{}/ram", self.id)
    }
}

impl DeviceModel for PcDimm {
    fn memory_region(&self) -> Option<GuestRegion> {
        Some(GuestRegion {
            memory: self.backend.whole(),
            requested_gpa: self.config.addr.into(),
            align: DIMM_ALIGN,
        })
    }

    fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        let name = self.ram_name();
        self.host.register_ram(RStr::from(name.as_str()), self.backend.whole()).into_result()?;
        self.addr = info.region_gpa.into_option();
        log::info!("pc-dimm {} plugged at {:?}, {} bytes", self.id, self.addr, self.config.size);
        Ok(())
    }

    fn unplug(&mut self) -> Result<(), PluginError> {
        let name = self.ram_name();
        self.host.unregister_ram(RStr::from(name.as_str())).into_result()?;
        log::info!("pc-dimm {} unplugged", self.id);
        self.addr = self.config.addr;
        Ok(())
    }

    fn state_version(&self) -> u32 {
        crate::migration::STATE_VERSION
    }

    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        Ok(PcDimmState::of(self).encode())
    }

    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        PcDimmState::decode(version, data)?.check_and_apply(self)
    }
}
