//! The PCI front end over a test double backend with fault flags (as Cloud
//! Hypervisor tests its `Vfio` seam): direct BAR mapping and relocation,
//! MSI and MSI-X routing (the MSI-X table cut out of the direct BAR), and
//! migration failures that leave the device in ERROR.

use std::{
    os::fd::RawFd,
    sync::{Arc, Mutex},
};

use abi_suite::suite_host::{eventfd_count, eventfd_signal, SuiteHost, SUITE_REGION_GPA};
use dmhost_plugin_api::{
    backend::MemoryBackend,
    vfio::{
        is_arc, VFIO_DEVICE_FLAGS_PCI, VFIO_IRQ_INFO_NORESIZE, VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY,
        VFIO_MIGRATION_STOP_COPY, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_PCI_MSI_IRQ_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
        VFIO_REGION_INFO_FLAG_WRITE,
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
    /// The eventfd the backend holds for each MSI-X vector.
    msix: std::collections::BTreeMap<u32, RawFd>,
    /// MSI-X irq info says NORESIZE (no vectors added while enabled).
    msix_noresize: bool,
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
        c[0x41] = 0x50;
        // MSI-X, 4 vectors: table at BAR2+0x2000, PBA at BAR2+0x3000.
        c[0x50] = 0x11;
        c[0x52] = 3;
        c[0x54..0x58].copy_from_slice(&0x2002u32.to_le_bytes());
        c[0x58..0x5c].copy_from_slice(&0x3002u32.to_le_bytes());
        c[0x51] = 0x60;
        // PCI Express endpoint advertising Function Level Reset.
        c[0x60] = 0x10;
        c[0x62] = 0x02;
        c[0x64..0x68].copy_from_slice(&(1u32 << 28).to_le_bytes());
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
        let count = match index {
            0 | 1 => 1,
            VFIO_PCI_MSIX_IRQ_INDEX => 4,
            _ => 0,
        };
        let noresize = index == VFIO_PCI_MSIX_IRQ_INDEX && self.f.lock().unwrap().msix_noresize;
        Ok(VfioIrqInfo { index, flags: 1 | if noresize { VFIO_IRQ_INFO_NORESIZE } else { 0 }, count })
    }
    fn set_irqs(&self, index: u32, action: u32, start: u32, fds: &[RawFd]) -> BackendResult<()> {
        let mut f = self.f.lock().unwrap();
        f.set_irqs.push((index, action, fds.len()));
        if index == VFIO_PCI_MSIX_IRQ_INDEX {
            if fds.is_empty() {
                f.msix.clear();
            }
            for (v, &fd) in (start..).zip(fds) {
                if fd >= 0 {
                    f.msix.insert(v, fd);
                } else {
                    f.msix.remove(&v);
                }
            }
        }
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
    front_end_with(false)
}

fn front_end_with(msix_noresize: bool) -> (VfioPci, SuiteHost, Arc<Mutex<Faults>>) {
    let (mock, f) = Mock::new();
    f.lock().unwrap().msix_noresize = msix_noresize;
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
    let m = *d.bar_mappings().iter().find(|m| m.index == 2).unwrap();
    assert!(m.direct && m.trap == Some((0x2000, 0x2000)), "MSI-X pages cut out: {m:?}");
    assert!(host.state.lock().unwrap().io.contains(&(IoSpace::Mmio, SUITE_REGION_GPA + 0x2000, 0x2000)));

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
    d.mmio_read(0xe000_200c, &mut data).unwrap();
    assert_eq!(data, 1u32.to_le_bytes(), "the MSI-X table, not the region");
    // And back: direct again, around the MSI-X pages.
    cfg_write(&mut d, 0x18, 0);
    cfg_write(&mut d, 0x1c, (SUITE_REGION_GPA >> 32) as u32);
    assert!(d.bar_mappings().iter().any(|m| m.index == 2 && m.direct && m.trap.is_some()));
    d.mmio_read(SUITE_REGION_GPA + 0x200c, &mut data).unwrap();
    assert_eq!(data, 1u32.to_le_bytes());
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

fn signal(fd: RawFd) {
    eventfd_signal(fd).unwrap();
}

const TABLE: u64 = SUITE_REGION_GPA + 0x2000;
const PBA: u64 = SUITE_REGION_GPA + 0x3000;

fn mmio32(d: &mut VfioPci, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    d.mmio_read(addr, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn msix_routes(host: &SuiteHost) -> Vec<(u64, u32)> {
    host.state.lock().unwrap().msi.values().copied().collect()
}

#[test]
fn msix_vectors_route_mask_into_the_pba_and_deliver_on_unmask() {
    let (mut d, host, f) = front_end();
    host.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    d.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    // Vector 0: address, data, then unmask; nothing happens until enabled.
    d.mmio_write(TABLE, &0xfee0_0000u64.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 8, &0x45u32.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 12, &0u32.to_le_bytes()).unwrap();
    assert!(msix_routes(&host).is_empty() && f.lock().unwrap().msix.is_empty());
    d.pci_config_write(0x53, &[0x80]).unwrap();
    assert_eq!(msix_routes(&host), [(0xfee0_0000, 0x45)]);
    let fd0 = *f.lock().unwrap().msix.get(&0).expect("vector 0 handed to the backend");
    assert_eq!(f.lock().unwrap().msix.len(), 1, "unprogrammed vectors get no eventfd");
    // Rewriting the entry re-routes it.
    d.mmio_write(TABLE + 8, &0x46u32.to_le_bytes()).unwrap();
    assert_eq!(msix_routes(&host), [(0xfee0_0000, 0x46)]);

    // Masked: unrouted but kept; the device's signal shows in the PBA.
    d.mmio_write(TABLE + 12, &1u32.to_le_bytes()).unwrap();
    assert!(msix_routes(&host).is_empty());
    assert_eq!(f.lock().unwrap().msix.get(&0), Some(&fd0));
    assert_eq!(mmio32(&mut d, PBA), 0);
    signal(fd0);
    assert_eq!(mmio32(&mut d, PBA), 1, "pending while masked");
    assert_eq!(eventfd_count(fd0), 0, "the PBA read consumed the signal");
    // Unmask: routed again and the pending message delivered once.
    d.mmio_write(TABLE + 12, &0u32.to_le_bytes()).unwrap();
    assert_eq!(msix_routes(&host), [(0xfee0_0000, 0x46)]);
    assert_eq!(mmio32(&mut d, PBA), 0);
    assert_eq!(eventfd_count(fd0), 1, "delivered through the routed eventfd");
    // Function mask: the same, for every vector.
    d.pci_config_write(0x53, &[0xc0]).unwrap();
    assert!(msix_routes(&host).is_empty());
    signal(fd0);
    d.pci_config_write(0x53, &[0x80]).unwrap();
    assert_eq!(msix_routes(&host), [(0xfee0_0000, 0x46)]);
    assert_eq!(eventfd_count(fd0), 1, "what came under the function mask is delivered");
    // Vector 3 by a 64-bit access pair; vector 4 does not exist.
    d.mmio_write(TABLE + 0x30, &0xfee0_1000u32.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 0x38, &0x0000_0000_0000_0050u64.to_le_bytes()).unwrap();
    assert_eq!(msix_routes(&host).len(), 2);
    assert!(d.msix().unwrap().has_eventfd(3));
    // Bad accesses: all ones, nothing written, no error to the guest.
    let mut b2 = [0u8; 2];
    d.mmio_read(TABLE + 8, &mut b2).unwrap();
    assert_eq!(b2, [0xff; 2]);
    d.mmio_write(TABLE + 2, &[1, 2, 3, 4]).unwrap();
    d.mmio_write(PBA, &u64::MAX.to_le_bytes()).unwrap();
    assert_eq!(mmio32(&mut d, TABLE), 0xfee0_0000);
    assert_eq!(mmio32(&mut d, TABLE + 0x40), 0x5a5a_5a5a, "past the table: the device's BAR");
    assert_eq!(mmio32(&mut d, PBA + 4), 0);

    // Disable: every route and eventfd goes; the table stays.
    d.pci_config_write(0x53, &[0]).unwrap();
    assert!(msix_routes(&host).is_empty() && f.lock().unwrap().msix.is_empty());
    assert_eq!(f.lock().unwrap().set_irqs.last(), Some(&(VFIO_PCI_MSIX_IRQ_INDEX, 1 << 5, 0)));
    assert_eq!(mmio32(&mut d, TABLE + 8), 0x46);
    // Reset: vectors masked and cleared, MSI-X off.
    d.pci_config_write(0x53, &[0x80]).unwrap();
    assert_eq!(msix_routes(&host).len(), 2);
    d.reset().unwrap();
    assert!(msix_routes(&host).is_empty() && f.lock().unwrap().msix.is_empty());
    assert_eq!((mmio32(&mut d, TABLE), mmio32(&mut d, TABLE + 12)), (0, 1));
    let mut ctl = [0u8; 2];
    d.pci_config_read(0x52, &mut ctl).unwrap();
    assert_eq!(ctl, [3, 0], "disabled, table size kept");
    assert_eq!(f.lock().unwrap().resets, 1);
    // Unplug leaves nothing behind.
    d.mmio_write(TABLE, &0xfee0_0000u32.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 12, &0u32.to_le_bytes()).unwrap();
    d.pci_config_write(0x53, &[0x80]).unwrap();
    assert_eq!(msix_routes(&host).len(), 1);
    d.unplug().unwrap();
    let left = host.state.lock().unwrap().leftovers();
    assert!(left.is_empty(), "{left:?}");
    assert!(f.lock().unwrap().msix.is_empty());
}

#[test]
fn msix_on_a_noresize_backend_reenables_every_vector_to_grow() {
    let (mut d, host, f) = front_end_with(true);
    host.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    d.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    d.pci_config_write(0x53, &[0x80]).unwrap();
    let calls = |f: &Arc<Mutex<Faults>>| -> Vec<(u32, u32, usize)> {
        f.lock().unwrap().set_irqs.iter().copied().filter(|c| c.0 == VFIO_PCI_MSIX_IRQ_INDEX).collect()
    };
    for (vector, data) in [(0u64, 0x45u32), (2, 0x47)] {
        d.mmio_write(TABLE + 16 * vector, &0xfee0_0000u32.to_le_bytes()).unwrap();
        d.mmio_write(TABLE + 16 * vector + 8, &data.to_le_bytes()).unwrap();
        d.mmio_write(TABLE + 16 * vector + 12, &0u32.to_le_bytes()).unwrap();
    }
    const T: u32 = 1 << 5;
    assert_eq!(calls(&f), [(2, T, 1), (2, T, 0), (2, T, 3)], "vector 2: disable, then 0..=2");
    let held: Vec<u32> = f.lock().unwrap().msix.keys().copied().collect();
    assert_eq!(held, [0, 2], "vector 1 has no eventfd (-1)");
    assert_eq!(msix_routes(&host).len(), 2);
    // Inside the enabled range: one vector at a time.
    d.mmio_write(TABLE + 16, &0xfee0_0000u32.to_le_bytes()).unwrap();
    assert_eq!(calls(&f).last(), Some(&(2, T, 1)));
    assert_eq!(f.lock().unwrap().msix.len(), 3);
    d.unplug().unwrap();
    assert!(host.state.lock().unwrap().leftovers().is_empty());
}

#[test]
fn msix_table_and_pending_bits_migrate_with_config_space() {
    let (mut src, shost, sf) = front_end();
    shost.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    src.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    src.mmio_write(TABLE + 16, &0x0000_0000_fee0_2000u64.to_le_bytes()).unwrap();
    src.mmio_write(TABLE + 24, &0x0000_0000_0000_0051u64.to_le_bytes()).unwrap(); // data, unmasked
    src.mmio_write(TABLE + 32, &0xfee0_3000u32.to_le_bytes()).unwrap(); // vector 2 stays masked
    src.pci_config_write(0x53, &[0x80]).unwrap();
    let fd2 = *sf.lock().unwrap().msix.get(&2).unwrap();
    signal(fd2); // masked vector 2 fires: pending
    src.save_setup().unwrap();
    src.vm_state_changed(false).unwrap();
    let section = src.save_live_complete_precopy().unwrap();
    src.save_cleanup();

    let (mut dst, dhost, f) = front_end();
    dhost.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    dst.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    dst.load_setup().unwrap();
    dst.load_state(1, &section).unwrap();
    dst.load_cleanup().unwrap();
    assert_eq!(msix_routes(&dhost), [(0xfee0_2000, 0x51)], "enabled on load, vector 1 routed");
    assert_eq!(mmio32(&mut dst, TABLE + 32), 0xfee0_3000);
    assert_eq!(mmio32(&mut dst, TABLE + 44), 1, "vector 2 still masked");
    assert_eq!(mmio32(&mut dst, PBA), 0b100, "its pending bit came along");
    assert_eq!(f.lock().unwrap().msix.keys().copied().collect::<Vec<_>>(), [1, 2]);
    // A config record whose MSI-X part is the wrong size is refused; one
    // without it (an older source) loads with the table reset.
    let mut cfg = [0u8; 256];
    dst.pci_config_read(0, &mut cfg[..4]).unwrap();
    let config_record = |extra: usize| {
        let payload: Vec<u8> = cfg.iter().copied().chain(std::iter::repeat_n(0, extra)).collect();
        let mut v = vfio_pci::migration::FLAG_DEV_CONFIG_STATE.to_le_bytes().to_vec();
        v.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        v.extend_from_slice(&payload);
        v
    };
    let (short, none) = (config_record(4 * 17 - 1), config_record(0));
    let (mut other, _h, _) = front_end();
    other.load_setup().unwrap();
    let e = other.load_state(1, &short).unwrap_err();
    assert!(e.message.contains("MSI-X"), "{e}");
    other.load_state(1, &none).unwrap();
    assert_eq!(other.msix().unwrap().table.entry(0).map(|e| e.masked()), Some(true));
}

#[test]
fn guest_flr_resets_the_device_and_drops_interrupts_and_bar_mappings() {
    let (mut d, host, f) = front_end();
    host.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, 64 << 10));
    d.plug(PlugInfo { region_gpa: Some(SUITE_REGION_GPA).into() }).unwrap();
    cfg_write(&mut d, 0x10, 0xd000_0000);
    cfg_write(&mut d, 0x04, 0x2);
    d.mmio_write(TABLE, &0xfee0_0000u64.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 8, &0x45u32.to_le_bytes()).unwrap();
    d.mmio_write(TABLE + 12, &0u32.to_le_bytes()).unwrap();
    d.pci_config_write(0x53, &[0x80]).unwrap();
    assert_eq!(msix_routes(&host), [(0xfee0_0000, 0x45)]);
    assert_eq!(d.bar_mappings().len(), 2, "{:?}", d.bar_mappings());
    let sets_before = f.lock().unwrap().set_irqs.len();

    // Other DevCtl bits do nothing.
    d.pci_config_write(0x68, &0x7fffu16.to_le_bytes()).unwrap();
    assert_eq!(f.lock().unwrap().resets, 0);
    assert_eq!(msix_routes(&host).len(), 1);

    // Initiate FLR.
    d.pci_config_write(0x68, &0x8000u16.to_le_bytes()).unwrap();
    assert_eq!(f.lock().unwrap().resets, 1, "VFIO_DEVICE_RESET through the backend");
    assert!(msix_routes(&host).is_empty() && f.lock().unwrap().msix.is_empty(), "MSI-X torn down");
    assert!(f.lock().unwrap().set_irqs.len() > sets_before);
    assert!(d.bar_mappings().is_empty(), "decode off: {:?}", d.bar_mappings());
    let mut b = [0u8; 4];
    d.pci_config_read(0x68, &mut b[..2]).unwrap();
    assert_eq!(b[..2], [0, 0], "FLR bit reads back 0");
    d.pci_config_read(0x04, &mut b[..2]).unwrap();
    assert_eq!(b[..2], [0, 0], "command cleared");
    for bar in [0x10, 0x18, 0x1c] {
        d.pci_config_read(bar, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b) & !0xf, 0, "BAR at {bar:#x} cleared");
    }
    let mut ctl = [0u8; 2];
    d.pci_config_read(0x52, &mut ctl).unwrap();
    assert_eq!(ctl, [3, 0], "MSI-X off, table size kept");
    let io = host.state.lock().unwrap().io.clone();
    assert!(io.is_empty(), "no trapped ranges left: {io:?}");
    let mut data = [0u8; 4];
    d.mmio_read(0xd000_0010, &mut data).unwrap();
    assert_eq!(data, [0xff; 4], "BAR0 no longer decodes");

    // Re-programmed, the BAR decodes again and the table starts masked.
    cfg_write(&mut d, 0x18, 0);
    cfg_write(&mut d, 0x1c, (SUITE_REGION_GPA >> 32) as u32);
    cfg_write(&mut d, 0x18, SUITE_REGION_GPA as u32);
    cfg_write(&mut d, 0x04, 0x2);
    assert!(d.bar_mappings().iter().any(|m| m.index == 2));
    assert_eq!((mmio32(&mut d, TABLE), mmio32(&mut d, TABLE + 12)), (0, 1));
    d.unplug().unwrap();
    let left = host.state.lock().unwrap().leftovers();
    assert!(left.is_empty(), "{left:?}");
}
