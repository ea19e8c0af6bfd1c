//! The built vfio-pci and vendor-sample libraries, loaded as a host loads
//! them: the conformance suite on both, and a live migration of a vfio-pci
//! device over the vendor driver while its state keeps changing.
//!
//! The .so files are found beside this test binary's directory (cargo
//! builds them as dev-dependencies, or `cargo build --workspace` does).

use std::{
    os::fd::RawFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use abi_stable::library::lib_header_from_path;
use abi_suite::suite_host::{eventfd_count, SuiteHost};
use dmhost_plugin_api::{DeviceBox, PlugInfo, PluginModule_Ref, RSlice, RSliceMut, RStr};

fn library(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("deps dir").to_path_buf();
    let candidates = [deps.parent().map(|d| d.join(name)), Some(deps.join(name))];
    candidates.into_iter().flatten().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!("{name} not found next to {} (run cargo build --workspace)", deps.display())
    })
}

fn load(name: &str) -> PluginModule_Ref {
    let path = library(name);
    lib_header_from_path(&path)
        .and_then(|h| h.init_root_module::<PluginModule_Ref>())
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

#[test]
fn conformance_suite_passes_on_the_built_libraries() {
    let vendor = load("libvfio_vendor_sample.so");
    let pci = load("libvfio_pci.so");
    let drivers = [vendor, pci];
    for (name, module) in [("vendor-sample", vendor), ("vfio-pci", pci)] {
        let report = abi_suite::check_module_with(name, module, &drivers);
        print!("{report}");
        assert_eq!(report.failed(), 0, "{report}");
        assert!(report.passed() >= 8, "{report}");
    }
    // Without the vendor library beside it, vfio-pci's default device
    // cannot be created, and the suite says so.
    let alone = abi_suite::check_module("vfio-pci", pci);
    let create = alone.results.iter().find(|r| r.name == "vfio-pci/create-default").unwrap();
    assert!(!create.passed && create.detail.contains("vendor-sample"), "{}", create.detail);
}

const BAR0: u64 = 0xc000_0000;
const REG_CONTROL: u64 = 0x008;
const REG_STATUS: u64 = 0x00c;
const REG_DOORBELL: u64 = 0x010;
const REG_DIGEST: u64 = 0x030;
const REG_TOUCH: u64 = 0x038;
const REG_SCRATCH: u64 = 0x100;

struct Dev {
    dev: DeviceBox,
    host: SuiteHost,
}

fn device(vendor: PluginModule_Ref, pci: PluginModule_Ref) -> Dev {
    let host = SuiteHost::with_drivers(&[vendor]);
    let cfg = r#"{"driver":"1de5:0001","driver-config":{"state-size":"4M","dirty-pages-per-tick":4,"tick-us":200},"intx-gsi":10}"#;
    let mut dev = (pci.create())(RStr::from("vfio-pci"), RStr::from("nic0"), RStr::from(cfg), host.host())
        .into_result()
        .expect("create vfio-pci over the vendor driver");
    dev.plug(PlugInfo { region_gpa: None.into() }).into_result().expect("plug");
    Dev { dev, host }
}

impl Dev {
    fn cfg_write(&mut self, off: u32, v: u32) {
        self.dev.pci_config_write(off, RSlice::from(&v.to_le_bytes()[..])).into_result().unwrap();
    }
    fn cfg_read(&mut self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.pci_config_read(off, RSliceMut::from(&mut b[..])).into_result().unwrap();
        u32::from_le_bytes(b)
    }
    fn mmio_write(&mut self, off: u64, v: u32) {
        self.dev.mmio_write(BAR0 + off, RSlice::from(&v.to_le_bytes()[..])).into_result().unwrap();
    }
    fn mmio_read(&mut self, off: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.mmio_read(BAR0 + off, RSliceMut::from(&mut b[..len])).into_result().unwrap();
        u64::from_le_bytes(b)
    }
    fn intx_fd(&self) -> RawFd {
        let s = self.host.state.lock().unwrap();
        s.irqfds.iter().find(|(gsi, _)| *gsi == 10).expect("INTx irqfd registered").1
    }
}

#[test]
fn vfio_pci_live_migration_over_the_vendor_driver() {
    let vendor = load("libvfio_vendor_sample.so");
    let pci = load("libvfio_pci.so");
    let mut src = device(vendor, pci);

    // Guest side: size BAR0, place it, enable memory decode.
    assert_eq!(src.cfg_read(0), 0x0001_1de5, "IDs from the driver");
    src.cfg_write(0x10, 0xffff_ffff);
    assert_eq!(src.cfg_read(0x10), 0xffff_f000, "BAR0 is 4 KiB");
    src.cfg_write(0x10, BAR0 as u32);
    src.cfg_write(0x04, 0x2);
    assert!(src.host.state.lock().unwrap().io.iter().any(|r| r.1 == BAR0), "BAR0 trapped at its address");
    assert_eq!(src.mmio_read(0, 4), 0x0001_1de5, "ID register through BAR0");
    src.mmio_write(REG_SCRATCH, 0xabcd_0123);
    for p in [1, 77, 900] {
        src.mmio_write(REG_TOUCH, p);
    }

    // INTx: the doorbell reaches the irqfd the host registered for GSI 10.
    src.mmio_write(REG_CONTROL, 1);
    src.mmio_write(REG_DOORBELL, 1);
    assert_eq!(eventfd_count(src.intx_fd()), 1, "doorbell raised INTx");
    src.mmio_write(REG_STATUS, 1);

    // Live migration with pre-copy while the device keeps dirtying pages.
    src.dev.save_setup().into_result().expect("save_setup");
    let estimate = src.dev.state_pending_estimate().into_result().unwrap().must_precopy;
    assert!(estimate >= 4 << 20, "pre-copy estimate covers the 4 MiB state: {estimate}");
    let exact = src.dev.state_pending_exact().into_result().unwrap().must_precopy;
    assert!(exact >= estimate, "exact {exact} includes the stop-copy size");
    let mut sections = Vec::new();
    let (mut iterations, mut completes) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while src.dev.is_active_iterate() && Instant::now() < deadline {
        let chunk = src.dev.save_live_iterate().into_result().expect("iterate");
        iterations += 1;
        if !chunk.data.is_empty() {
            sections.push(chunk.data.into_vec());
        }
        if chunk.complete {
            completes += 1;
            if completes == 3 {
                break;
            }
            // Let the device dirty more state, then go again.
            std::thread::sleep(Duration::from_millis(20));
            src.dev.state_pending_exact().into_result().unwrap();
        }
    }
    assert!(iterations > 4 && completes == 3, "{iterations} iterations, {completes} completes");
    src.dev.vm_state_changed(false).into_result().expect("VM stop -> STOP_COPY");
    let last = src.dev.save_live_complete_precopy().into_result().expect("complete").into_vec();
    src.dev.save_cleanup();
    sections.push(last);
    let sent: usize = sections.iter().map(Vec::len).sum();
    assert!(sent > 4 << 20, "sent {sent} bytes");

    let src_digest = src.mmio_read(REG_DIGEST, 8);

    let mut dst = device(vendor, pci);
    dst.dev.load_setup().into_result().expect("load_setup");
    let version = src.dev.state_version();
    for s in &sections {
        dst.dev.load_state(version, RSlice::from(&s[..])).into_result().expect("load_state");
    }
    dst.dev.load_cleanup().into_result().expect("load_cleanup (RESUMING -> STOP validates)");
    assert_eq!(dst.cfg_read(0x10), BAR0 as u32, "config space migrated");
    assert!(dst.host.state.lock().unwrap().io.iter().any(|r| r.1 == BAR0), "BAR0 re-registered");
    assert_eq!(dst.mmio_read(REG_DIGEST, 8), src_digest, "internal state identical");
    assert_eq!(dst.mmio_read(REG_SCRATCH, 4), 0xabcd_0123);

    // The destination runs: its doorbell works through its own INTx.
    dst.dev.vm_state_changed(true).into_result().expect("VM start -> RUNNING");
    dst.mmio_write(REG_DOORBELL, 1);
    assert_eq!(eventfd_count(dst.intx_fd()), 1);

    // A corrupted stream fails cleanly and the device recovers.
    let mut bad = device(vendor, pci);
    bad.dev.load_setup().into_result().unwrap();
    let mut first = sections[0].clone();
    // Section record header (16) + stream header (24) + page record
    // header (8): byte 200 of the first page.
    first[16 + 24 + 8 + 200] ^= 0xff;
    assert!(bad.dev.load_state(version, RSlice::from(&first[..])).into_result().is_err());
    assert!(bad.dev.load_cleanup().into_result().is_err(), "RESUMING -> STOP refuses bad data");
    assert!(!bad.dev.is_fenced());

    for d in [&mut src, &mut dst, &mut bad] {
        d.dev.unplug().into_result().unwrap();
        let left = d.host.state.lock().unwrap().leftovers();
        assert!(left.is_empty(), "{left:?}");
    }
}
