//! The PCI front end over a test double backend with fault flags (as Cloud
//! Hypervisor tests its `Vfio` seam): direct BAR mapping and relocation,
//! MSI routing, and migration failures that leave the device in ERROR.

use std::{
    os::fd::RawFd,
    sync::{Arc, Mutex},
};

use abi_suite::suite_host::{SuiteHost, SUITE_REGION_GPA};
use dmhost_plugin_api::{
    backend::MemoryBackend,
    vfio::{
        is_arc, VFIO_DEVICE_FLAGS_PCI, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
        VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
        VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    },
    DeviceModel, IoSpace, MemoryRegion, MigState, PlugInfo, VfioDeviceInfo, VfioIrqInfo, VfioPrecopyInfo,
    VfioRegionInfo,
};
use vfio_pci::{
    backend::{BackendError, BackendResult, VfioBackend},
    device::VfioPci,
};

#[derive(Default)]
struct Faults {
    /// A transition to this state fails and leaves the device in ERROR.
    fail_to: Option<MigState>,
    resets: u32,
    set_irqs: Vec<(u32, u32, usize)>,
    state: Option<MigState>,
    precopy_left: usize,
    stop_copy_left: usize,
}

struct Mock {
    config: [u8; 256],
    bar2: MemoryBackend,
    f: Arc<Mutex<Faults>>,
}

const FLAGS: u64 = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;

impl Mock {
    fn new() -> (Self, Arc<Mutex<Faults>>) {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&[0x86, 0x80, 0x34, 0x12]);
        c[6] = 0x10;
        c[0x18] = 0x0c; // BAR2: mem64 prefetchable
        c[0x34] = 0x40;
        c[0x3d] = 1;
        c[0x40] = 0x05; // MSI, 32-bit, 1 vector
        let f = Arc::new(Mutex::new(Faults { state: Some(MigState::Running), ..Default::default() }));
        let bar2 = MemoryBackend::memfd("bar2", 64 << 10).unwrap();
        (Self { config: c, bar2, f: f.clone() }, f)
    }
}

impl VfioBackend for Mock {
    fn describe(&self) -> String {
        "mock".into()
    }
    fn device_info(&self) -> VfioDeviceInfo {
        VfioDeviceInfo { flags: VFIO_DEVICE_FLAGS_PCI, num_regions: 9, num_irqs: 5, migration_flags: FLAGS }
    }
    fn region_info(&self, index: u32) -> BackendResult<VfioRegionInfo> {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        Ok(match index {
            0 => VfioRegionInfo { index, flags: rw, size: 4096 },
            2 => VfioRegionInfo { index, flags: rw | VFIO_REGION_INFO_FLAG_MMAP, size: 64 << 10 },
            7 => VfioRegionInfo { index, flags: rw, size: 256 },
            _ => VfioRegionInfo { index, flags: 0, size: 0 },
        })
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> BackendResult<()> {
        match index {
            VFIO_PCI_CONFIG_REGION_INDEX => {
                let o = offset as usize;
                data.copy_from_slice(&self.config[o..o + data.len()]);
            }
            _ => data.fill(0x5a),
        }
        Ok(())
    }
    fn region_write(&self, _: u32, _: u64, _: &[u8]) -> BackendResult<()> {
        Ok(())
    }
    fn region_mmap(&self, index: u32) -> BackendResult<Option<MemoryRegion>> {
        Ok((index == 2).then(|| self.bar2.whole()))
    }
    fn irq_info(&self, index: u32) -> BackendResult<VfioIrqInfo> {
        Ok(VfioIrqInfo { index, flags: 1, count: u32::from(index <= 1) })
    }
    fn set_irqs(&self, index: u32, action: u32, _: u32, fds: &[RawFd]) -> BackendResult<()> {
        self.f.lock().unwrap().set_irqs.push((index, action, fds.len()));
        Ok(())
    }
    fn reset(&self) -> BackendResult<()> {
        let mut f = self.f.lock().unwrap();
        f.resets += 1;
        f.state = Some(MigState::Running);
        Ok(())
    }
    fn mig_state(&self) -> BackendResult<MigState> {
        Ok(self.f.lock().unwrap().state.unwrap_or(MigState::Error))
    }
    fn set_mig_state(&mut self, target: MigState) -> BackendResult<()> {
        let mut f = self.f.lock().unwrap();
        let cur = f.state.unwrap_or(MigState::Error);
        let path =
            vfio_pci::state::path(cur, target, FLAGS).map_err(|e| BackendError::Invalid(e.to_string()))?;
        for s in path {
            assert!(is_arc(f.state.unwrap(), s, FLAGS));
            if f.fail_to == Some(s) {
                f.state = Some(MigState::Error);
                return Err(BackendError::Io(format!("injected failure entering {s}")));
            }
            if s == MigState::PreCopy {
                f.precopy_left = 3000;
            }
            if s == MigState::StopCopy {
                f.stop_copy_left = 5000;
            }
            f.state = Some(s);
        }
        Ok(())
    }
    fn stop_copy_size(&self) -> BackendResult<u64> {
        Ok(5000)
    }
    fn precopy_info(&self) -> BackendResult<VfioPrecopyInfo> {
        Ok(VfioPrecopyInfo { initial_bytes: self.f.lock().unwrap().precopy_left as u64, dirty_bytes: 0 })
    }
    fn read_mig_data(&mut self, buf: &mut [u8]) -> BackendResult<usize> {
        let mut f = self.f.lock().unwrap();
        let left =
            if f.state == Some(MigState::StopCopy) { &mut f.stop_copy_left } else { &mut f.precopy_left };
        if *left == 0 {
            return if f.state == Some(MigState::StopCopy) { Ok(0) } else { Err(BackendError::NoData) };
        }
        let n = (*left).min(buf.len()).min(1000);
        *left -= n;
        buf[..n].fill(7);
        Ok(n)
    }
    fn write_mig_data(&mut self, _: &[u8]) -> BackendResult<()> {
        Ok(())
    }
}

fn front_end() -> (VfioPci, SuiteHost, Arc<Mutex<Faults>>) {
    let (mock, f) = Mock::new();
    let host = SuiteHost::new();
    let dev = VfioPci::with_backend("t0", Box::new(mock), None, true, host.host()).unwrap();
    (dev, host, f)
}

fn cfg_write(d: &mut VfioPci, off: u32, v: u32) {
    d.pci_config_write(off, &v.to_le_bytes()).unwrap();
}

#[test]
fn direct_bar_maps_relocates_and_falls_back_to_trapping() {
    let (mut d, host, _) = front_end();
    let region = d.memory_region().expect("mmap-able BAR2 is the guest region");
    assert_eq!(region.memory.size, 64 << 10);
    assert!(d.backend_memory().is_none(), "device memory migrates in the VFIO stream");
    host.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    d.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    let mut b = [0u8; 8];
    d.pci_config_read(0x18, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), SUITE_REGION_GPA | 0xc, "BAR2 placed where the host mapped it");
    assert!(d.bar_mappings().iter().any(|m| m.index == 2 && m.direct));

    // BAR0 (trapped) at 0xd000_0000 once decode is on.
    cfg_write(&mut d, 0x10, 0xd000_0000);
    cfg_write(&mut d, 0x04, 0x2);
    let mut data = [0u8; 4];
    d.mmio_read(0xd000_0010, &mut data).unwrap();
    assert_eq!(data, [0x5a; 4], "BAR0 read reaches the backend");
    d.mmio_read(0xd000_0ffe, &mut [0u8; 4]).unwrap_or_default();

    // Moving BAR2 outside the owned range: physmap denied -> trapped.
    cfg_write(&mut d, 0x1c, 0);
    cfg_write(&mut d, 0x18, 0xe000_0000);
    let m = *d.bar_mappings().iter().find(|m| m.index == 2).unwrap();
    assert!(!m.direct && m.gpa == 0xe000_0000, "{m:?}");
    assert!(host.state.lock().unwrap().io.contains(&(IoSpace::Mmio, 0xe000_0000, 64 << 10)));
    assert_eq!(host.state.lock().unwrap().physmap_denied, 1);
    d.mmio_read(0xe000_0100, &mut data).unwrap();
    assert_eq!(data, [0x5a; 4], "trapped BAR2 access goes to the region");
    // And back: direct again.
    cfg_write(&mut d, 0x18, 0);
    cfg_write(&mut d, 0x1c, (SUITE_REGION_GPA >> 32) as u32);
    assert!(d.bar_mappings().iter().any(|m| m.index == 2 && m.direct));
    // Sizing with decode on does not move anything.
    cfg_write(&mut d, 0x10, 0xffff_ffff);
    assert!(!d.bar_mappings().iter().any(|m| m.index == 0), "BAR0 unmapped while sized");
    d.unplug().unwrap();
    let left = host.state.lock().unwrap().leftovers();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn msi_enable_creates_routed_vectors() {
    let (mut d, host, f) = front_end();
    d.plug(PlugInfo { region_gpa: None.into() }).unwrap();
    cfg_write(&mut d, 0x44, 0xfee0_0000);
    d.pci_config_write(0x48, &0x41u16.to_le_bytes()).unwrap();
    d.pci_config_write(0x42, &[1]).unwrap();
    assert!(f.lock().unwrap().set_irqs.contains(&(VFIO_PCI_MSI_IRQ_INDEX, 1 << 5, 1)));
    let msi: Vec<_> = host.state.lock().unwrap().msi.values().copied().collect();
    assert_eq!(msi, [(0xfee0_0000, 0x41)]);
    cfg_write(&mut d, 0x44, 0xfee0_1000); // retarget while enabled
    let msi: Vec<_> = host.state.lock().unwrap().msi.values().copied().collect();
    assert_eq!(msi, [(0xfee0_1000, 0x41)]);
    d.pci_config_write(0x42, &[0]).unwrap();
    assert!(host.state.lock().unwrap().msi.is_empty());
    assert_eq!(f.lock().unwrap().set_irqs.last(), Some(&(VFIO_PCI_MSI_IRQ_INDEX, 1 << 5, 0)));
}

#[test]
fn precopy_iterates_until_enomsg_then_stop_copy_drains() {
    let (mut d, _host, f) = front_end();
    d.save_setup().unwrap();
    assert_eq!(d.migration_state(), MigState::PreCopy);
    assert_eq!(d.state_pending_estimate().must_precopy, 3000);
    assert_eq!(d.state_pending_exact().must_precopy, 8000, "stop-copy size + pre-copy info");
    let mut chunks = 0;
    while d.is_active_iterate() {
        let c = d.save_live_iterate().unwrap();
        chunks += 1;
        if c.complete {
            break;
        }
    }
    assert_eq!(chunks, 3, "1000-byte reads of 3000 initial bytes");
    let c = d.save_live_iterate().unwrap();
    assert!(c.data.is_empty() && c.complete, "ENOMSG: nothing for now");
    assert_eq!(d.state_pending_estimate().must_precopy, 0, "never underflows");
    d.vm_state_changed(false).unwrap();
    assert_eq!(d.migration_state(), MigState::StopCopy);
    let last = d.save_live_complete_precopy().unwrap();
    assert!(last.len() > 5000 + 256);
    assert!(!d.is_active_iterate());
    d.save_cleanup();
    assert_eq!(f.lock().unwrap().state, Some(MigState::Stop));
    d.vm_state_changed(true).unwrap();
    assert_eq!(f.lock().unwrap().state, Some(MigState::Running));
}

#[test]
fn failed_transition_to_error_resets_and_fails_cleanly() {
    let (mut d, _host, f) = front_end();
    d.save_setup().unwrap();
    f.lock().unwrap().fail_to = Some(MigState::StopCopy);
    let e = d.vm_state_changed(false).unwrap_err();
    assert!(e.message.contains("STOP_COPY"), "{e}");
    assert_eq!(f.lock().unwrap().resets, 1, "ERROR is left by reset");
    assert_eq!(d.migration_state(), MigState::Running);
    assert!(d.save_live_complete_precopy().is_err());
    d.save_cleanup();

    // x-allow-pre-copy=false: no PRE_COPY; and bad sections are refused.
    let (mock, f2) = Mock::new();
    let host = SuiteHost::new();
    let mut d = VfioPci::with_backend("t1", Box::new(mock), None, false, host.host()).unwrap();
    d.save_setup().unwrap();
    assert_eq!(f2.lock().unwrap().state, Some(MigState::Running));
    assert!(!d.is_active_iterate());
    d.save_cleanup();
    d.load_setup().unwrap();
    assert_eq!(f2.lock().unwrap().state, Some(MigState::Resuming));
    assert!(d.load_state(2, &[]).is_err(), "newer version refused");
    for junk in [
        &[1u8, 2, 3][..],
        &[0xff; 16],
        &[4, 0, 16, 239, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 255, 127],
    ] {
        assert!(d.load_state(1, junk).is_err(), "{junk:?}");
    }
    d.load_cleanup().unwrap();
    assert_eq!(f2.lock().unwrap().state, Some(MigState::Stop));
}
