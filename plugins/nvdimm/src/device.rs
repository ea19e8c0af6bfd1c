//! The nvdimm device model: a backend whose last `label-size` bytes hold the
//! namespace labels and whose aligned front part the guest maps.

use dmhost_plugin_api::{
    backend::MemoryBackend, DeviceModel, DsmReply, DsmRequest, GuestRegion, Host, MemoryRegion, PlugInfo,
    PluginError, RStr,
};

use crate::{
    acpi::{self, DimmInfo},
    config::{NvdimmConfig, NVDIMM_ALIGN},
    labels::{self, LabelArea, LabelError},
    migration::{NvdimmState, STATE_VERSION},
};

pub struct Nvdimm {
    id: String,
    config: NvdimmConfig,
    backend: MemoryBackend,
    host: Host,
    /// Guest-physical base of the region while plugged (or from migration).
    base: Option<u64>,
    plugged: bool,
}

impl Nvdimm {
    pub fn new(id: &str, config: NvdimmConfig, host: Host) -> Result<Self, PluginError> {
        let backend = match &config.mem_path {
            Some(path) => MemoryBackend::file(path, config.size, config.share, config.readonly),
            None => MemoryBackend::memfd(&format!("nvdimm-{id}"), config.size),
        }
        .map_err(|e| PluginError::io(format!("nvdimm {id}: backend: {e}")))?;
        Ok(Self { id: id.to_owned(), base: config.addr, config, backend, host, plugged: false })
    }

    pub fn config(&self) -> &NvdimmConfig {
        &self.config
    }

    pub fn base(&self) -> Option<u64> {
        self.base
    }

    pub(crate) fn set_base(&mut self, base: Option<u64>) {
        self.base = base;
    }

    /// The name the whole backend is registered under for migration.
    pub fn ram_name(&self) -> String {
        format!("{}/ram", self.id)
    }

    fn labels(&self) -> BackendLabels<'_> {
        BackendLabels { dimm: self }
    }
}

/// The label area: the tail of the backend.
struct BackendLabels<'a> {
    dimm: &'a Nvdimm,
}

impl LabelArea for BackendLabels<'_> {
    fn size(&self) -> u32 {
        // Validated to fit in 32 bits by the config.
        u32::try_from(self.dimm.config.label_size).unwrap_or(0)
    }

    fn writable(&self) -> bool {
        !self.dimm.backend.read_only()
    }

    fn read(&self, offset: u32, buf: &mut [u8]) -> Result<(), LabelError> {
        let at = self.dimm.config.label_offset() + u64::from(offset);
        self.dimm.backend.read(at, buf).ok_or(LabelError::Backend { offset, length: buf.len() as u32 })
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), LabelError> {
        let d = self.dimm;
        let at = d.config.label_offset() + u64::from(offset);
        let length = data.len() as u32;
        d.backend.write(at, data).ok_or(LabelError::Backend { offset, length })?;
        if d.plugged {
            let name = d.ram_name();
            if let Err(e) = d.host.mark_dirty(RStr::from(name.as_str()), at, data.len() as u64).into_result()
            {
                log::warn!("nvdimm {}: label write not marked dirty: {e}", d.id);
            }
        }
        // A shared file backend persists its labels: flush them now.
        if d.config.mem_path.is_some() && d.config.share {
            if let Err(e) = d.backend.sync() {
                log::error!("nvdimm {}: label write not flushed to the file: {e}", d.id);
            }
        }
        Ok(())
    }
}

impl DeviceModel for Nvdimm {
    fn memory_region(&self) -> Option<GuestRegion> {
        Some(GuestRegion {
            memory: self.backend.region(0, self.config.region_size()),
            requested_gpa: self.config.addr.into(),
            align: NVDIMM_ALIGN,
        })
    }

    fn backend_memory(&self) -> Option<MemoryRegion> {
        Some(self.backend.whole())
    }

    fn plug(&mut self, info: PlugInfo) -> Result<(), PluginError> {
        if self.plugged {
            return Err(PluginError::state(format!("nvdimm {} is already plugged", self.id)));
        }
        let name = self.ram_name();
        self.host.register_ram(RStr::from(name.as_str()), self.backend.whole()).into_result()?;
        self.plugged = true;
        self.base = info.region_gpa.into_option().or(self.config.addr);
        log::info!(
            "nvdimm {} plugged at {:x?}: region {} bytes, labels {} bytes, handle {}",
            self.id,
            self.base,
            self.config.region_size(),
            self.config.label_size,
            self.config.handle()
        );
        Ok(())
    }

    fn unplug(&mut self) -> Result<(), PluginError> {
        if !self.plugged {
            return Err(PluginError::state(format!("nvdimm {} is not plugged", self.id)));
        }
        let name = self.ram_name();
        self.host.unregister_ram(RStr::from(name.as_str())).into_result()?;
        self.plugged = false;
        self.base = self.config.addr;
        log::info!("nvdimm {} unplugged", self.id);
        Ok(())
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn save_live_complete_precopy(&mut self) -> Result<Vec<u8>, PluginError> {
        Ok(NvdimmState::of(self).encode())
    }

    fn load_state(&mut self, version: u32, data: &[u8]) -> Result<(), PluginError> {
        Ok(NvdimmState::decode(version, data)?.check_and_apply(self)?)
    }

    fn nfit_structures(&self) -> Vec<u8> {
        match self.base {
            Some(base) => acpi::nfit_structures(&DimmInfo {
                slot: self.config.slot,
                node: self.config.node,
                base,
                size: self.config.region_size(),
                unarmed: self.config.unarmed,
            }),
            None => Vec::new(),
        }
    }

    fn aml(&self) -> Vec<u8> {
        acpi::device_aml(self.config.slot, self.config.label_size != 0)
    }

    fn dsm_handles(&self) -> Vec<u32> {
        vec![self.config.handle()]
    }

    fn dsm(&mut self, request: &DsmRequest) -> DsmReply {
        let handle = self.config.handle();
        labels::serve(&mut self.labels(), handle, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        labels::tests::{req, rw_arg},
        test_host::{Call, RecordingHost},
    };
    use dmhost_plugin_api::ErrorKind;

    const SIZE: u64 = (4 << 20) + (128 << 10);

    fn dimm(config: &str) -> (Nvdimm, RecordingHost) {
        let (rec, host) = RecordingHost::new();
        let d = Nvdimm::new("nv0", NvdimmConfig::parse(config).unwrap(), host).unwrap();
        (d, rec)
    }

    fn plug(d: &mut Nvdimm, gpa: u64) {
        d.plug(PlugInfo { region_gpa: Some(gpa).into() }).unwrap();
    }

    #[test]
    fn regions_and_plug_bookkeeping() {
        let (mut d, rec) = dimm(&format!(r#"{{"size":{SIZE},"slot":3}}"#));
        let r = d.memory_region().unwrap();
        assert_eq!((r.memory.size, r.align, r.memory.fd_offset), (4 << 20, 2 << 20, 0));
        assert_eq!(d.backend_memory().unwrap().size, SIZE);
        assert!(d.nfit_structures().is_empty(), "no NFIT before the base is known");
        assert_eq!(d.dsm_handles(), vec![4]);
        plug(&mut d, 0x1_0000_0000);
        assert_eq!(d.nfit_structures().len(), 184);
        assert_eq!(d.plug(PlugInfo { region_gpa: None.into() }).unwrap_err().kind, ErrorKind::InvalidState);
        d.unplug().unwrap();
        assert!(d.nfit_structures().is_empty());
        assert_eq!(d.unplug().unwrap_err().kind, ErrorKind::InvalidState);
        assert_eq!(
            rec.calls(),
            vec![
                Call::RegisterRam { name: "nv0/ram".into(), size: SIZE },
                Call::UnregisterRam { name: "nv0/ram".into() },
            ]
        );
    }

    #[test]
    fn label_write_lands_in_backend_tail_and_is_marked_dirty() {
        let (mut d, rec) = dimm(&format!(r#"{{"size":{SIZE}}}"#));
        plug(&mut d, 0x1_0000_0000);
        let r = d.dsm(&req(1, 6, rw_arg(16, 4, b"LABL")));
        assert_eq!(r.status, 0);
        let at = SIZE - (128 << 10) + 16;
        let mut out = [0u8; 4];
        d.backend.read(at, &mut out).unwrap();
        assert_eq!(&out, b"LABL");
        assert_eq!(rec.calls().last(), Some(&Call::MarkDirty { name: "nv0/ram".into(), offset: at, len: 4 }));
        let r = d.dsm(&req(1, 5, rw_arg(16, 4, &[])));
        assert_eq!(r.data.as_slice(), b"LABL");
        // The mapped region does not reach the labels.
        assert!(d.memory_region().unwrap().memory.size <= SIZE - (128 << 10));
    }

    #[test]
    fn no_labels_means_no_label_functions_and_no_lsx_methods() {
        let (mut d, _) = dimm(r#"{"size":"4M","label-size":0}"#);
        plug(&mut d, 0x1_0000_0000);
        assert_eq!(d.dsm(&req(1, 0, vec![])).data.as_slice(), [0; 4]);
        assert_eq!(d.dsm(&req(1, 4, vec![])).status, DsmReply::UNSUPPORTED);
        assert!(!d.aml().windows(4).any(|w| w == b"_LSI"));
    }

    #[test]
    fn labels_persist_in_a_shared_file_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pmem.img");
        let cfg = format!(r#"{{"size":{SIZE},"mem-path":{:?},"share":true}}"#, path);
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        {
            let (mut d, _) = dimm(&cfg);
            plug(&mut d, 0x1_0000_0000);
            let r = d.dsm(&req(1, 6, rw_arg(1000, 300, &data)));
            assert_eq!(r.status, 0);
        }
        let (mut d, _) = dimm(&cfg);
        plug(&mut d, 0x1_0000_0000);
        let r = d.dsm(&req(1, 5, rw_arg(1000, 300, &[])));
        assert_eq!((r.status, r.data.as_slice()), (0, data.as_slice()));
        // The bytes are at the end of the file itself.
        let file = std::fs::read(&path).unwrap();
        let at = (SIZE - (128 << 10) + 1000) as usize;
        assert_eq!(&file[at..at + 300], data.as_slice());
    }

    #[test]
    fn readonly_file_backend_refuses_label_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.img");
        std::fs::write(&path, vec![0xabu8; SIZE as usize]).unwrap();
        let cfg = format!(r#"{{"size":{SIZE},"mem-path":{:?},"readonly":true,"unarmed":true}}"#, path);
        let (mut d, _) = dimm(&cfg);
        plug(&mut d, 0x1_0000_0000);
        assert_eq!(d.dsm(&req(1, 0, vec![])).data.as_slice(), 0x31u32.to_le_bytes());
        assert_eq!(d.dsm(&req(1, 6, rw_arg(0, 1, &[0]))).status, DsmReply::UNSUPPORTED);
        assert_eq!(d.dsm(&req(1, 5, rw_arg(0, 2, &[]))).data.as_slice(), [0xab, 0xab]);
        assert!(d.memory_region().unwrap().memory.read_only);
    }

    #[test]
    fn migration_round_trip_and_refusals() {
        let cfg = format!(r#"{{"size":{SIZE},"slot":1,"node":0}}"#);
        let (mut src, _) = dimm(&cfg);
        plug(&mut src, 0x2_0000_0000);
        let blob = src.save_live_complete_precopy().unwrap();
        let (mut dst, _) = dimm(&cfg);
        dst.load_state(src.state_version(), &blob).unwrap();
        assert_eq!(dst.base(), Some(0x2_0000_0000));
        assert_eq!(dst.nfit_structures(), src.nfit_structures());

        let e = dst.load_state(2, &blob).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Migration);
        assert!(e.message.contains("version 2"), "{}", e.message);
        let e = dst.load_state(1, b"{\"size\":").unwrap_err();
        assert!(e.message.contains("malformed"), "{}", e.message);
        let (mut other, _) = dimm(&format!(r#"{{"size":{SIZE},"slot":2}}"#));
        let e = other.load_state(1, &blob).unwrap_err();
        assert!(e.message.contains("does not match"), "{}", e.message);
        assert_eq!(other.base(), None);
    }
}

#[cfg(test)]
mod abi_tests {
    use dmhost_plugin_api::{wrap, DsmRequest, ErrorKind, PlugInfo, Plugin};

    use crate::{labels::tests::rw_arg, test_host::RecordingHost, NvdimmPlugin, KIND};

    #[test]
    fn default_config_creates_a_working_device_through_the_abi() {
        let kinds = NvdimmPlugin::kinds();
        assert_eq!(kinds[0].name.as_str(), KIND);
        let (_, host) = RecordingHost::new();
        let model = NvdimmPlugin::create(KIND, "nv9", kinds[0].default_config.as_str(), host).unwrap();
        let mut dev = wrap(model, "nv9");
        let region = dev.memory_region().unwrap();
        assert_eq!(region.memory.size, 128 << 20);
        assert_eq!(dev.backend_memory().unwrap().size, 130 << 20);
        dev.plug(PlugInfo { region_gpa: Some(1u64 << 32).into() }).unwrap();
        assert_eq!(dev.dsm_handles().as_slice(), [1]);
        let req = DsmRequest { handle: 1, revision: 1, function: 5, arg3: rw_arg(u32::MAX, 9, &[]).into() };
        assert_eq!(dev.dsm(&req).unwrap().status, 3);
        assert_eq!(dev.nfit_structures().unwrap().len(), 184);
        assert!(!dev.aml().unwrap().is_empty());

        let (_, host) = RecordingHost::new();
        let e = NvdimmPlugin::create("pc-dimm", "x", "{}", host).err().unwrap();
        assert_eq!(e.kind, ErrorKind::Unsupported);
    }
}
