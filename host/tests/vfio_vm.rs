//! vfio-pci with the sample vendor driver in a real KVM VM, both loaded
//! from their .so files: a CPL-3 guest finds the device on the PCI bus
//! through 0xCF8/0xCFC, programs BAR0 and rings the doorbell (its INTx
//! line shows up in the IOAPIC's IRR); MSI routing delivers to the local
//! APIC, and so does MSI-X (a masked vector's signal waits in the PBA
//! until the guest unmasks it); and the VM migrates between two `dmhost`
//! processes with the device's 64 MiB state going in pre-copy.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use common::process::{dmhost, VmProcess};

use dmhost::{
    devices::DeviceFactory,
    guest::{
        vfio_programs::{MSIX_GO_GPA, MSIX_VECTOR_A, MSIX_VECTOR_B},
        GuestProgram, RegPreset,
    },
    loader::PluginRegistry,
    pci::{self, irq::ioapic_lines, ENABLE},
    testing::kvm_or_skip,
    vm::{bus::IoSpace, vcpu::VmExit, Vm},
};

const INTX_GSI: u32 = 10;
const VFIO_CONFIG: &str = r#"{"driver":"vendor-sample","driver-config":{"state-size":"4M"},"intx-gsi":10}"#;

fn registry() -> Arc<PluginRegistry> {
    // Before any plugin loads: a plugin takes the host's log level once.
    common::capture_logs();
    let mut r = PluginRegistry::default();
    r.load(&common::plugin_path("vfio_pci")).unwrap();
    r.load(&common::plugin_path("vfio_vendor_sample")).unwrap();
    Arc::new(r)
}

fn vm_with_vfio(reg: &Arc<PluginRegistry>) -> (Vm, common::Serial) {
    let (vm, serial) = common::vm_with_serial(64 << 20);
    vm.set_vfio_drivers(Arc::clone(reg) as _);
    vm.add_device("vfio-pci", "vfio0", |host| {
        DeviceFactory::create(&**reg, "vfio-pci", "vfio0", VFIO_CONFIG, host)
    })
    .unwrap();
    (vm, serial)
}

/// Run built-in `program` to a clean exit and check its serial output has
/// every line of `wants`.
fn run_to_exit_0(vm: &Vm, serial: &common::Serial, program: &str, wants: &[&str]) {
    vm.load_program(&GuestProgram::from_spec(program, None).unwrap(), &RegPreset::default()).unwrap();
    vm.start().unwrap();
    let exit = vm.control().wait_timeout(Duration::from_secs(30));
    let out = serial.text();
    assert_eq!(exit, Some(VmExit::Guest(0)), "{out}");
    for want in wants {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
}

#[test]
fn guest_enumerates_programs_and_interrupts_the_vendor_device() {
    if !kvm_or_skip("guest_enumerates_programs_and_interrupts_the_vendor_device") {
        return;
    }
    let reg = registry();
    let (vm, serial) = vm_with_vfio(&reg);
    let funcs = vm.shared().pci.functions();
    assert_eq!(funcs.len(), 2, "{funcs:?}");
    assert_eq!(
        (funcs[1].slot, funcs[1].id.as_str(), funcs[1].vendor, funcs[1].device),
        (1, "vfio0", 0x1de5, 0x0001)
    );
    let before = ioapic_lines(&vm).unwrap();
    assert!(!before.asserted(INTX_GSI), "INTx raised before the guest ran: {before:?}");

    run_to_exit_0(
        &vm,
        &serial,
        "builtin:vfio-demo",
        &[
            "vfio-demo: 00:0000000000000001 id 0000000000011de5",
            "vfio-demo: BAR0 size 0000000000001000",
            "vfio-demo: BAR0 at 00000000c0000000, ID register 0000000000011de5",
            "vfio-demo: doorbell rung, interrupt pending, status 0000000000000001",
            "vfio-demo: ok",
        ],
    );
    // The irqfd injects from a kernel worker: the line may lag the guest.
    common::wait_until(&format!("the doorbell to raise GSI {INTX_GSI}"), Duration::from_secs(5), || {
        ioapic_lines(&vm).unwrap().asserted(INTX_GSI)
    });
    let after = ioapic_lines(&vm).unwrap();
    assert!(after.masked & (1 << INTX_GSI) != 0, "the pin stays masked (no delivery to the guest)");
    // The BAR the guest placed is the device's MMIO range now.
    let info = vm.device_info("vfio0").unwrap();
    assert_eq!(info.mmio, vec![(pci::MMIO_WINDOW_BASE, 0x1000)], "{info:?}");
}

#[test]
fn guest_function_level_reset_resets_the_vendor_device_and_its_bars() {
    if !kvm_or_skip("guest_function_level_reset_resets_the_vendor_device_and_its_bars") {
        return;
    }
    let reg = registry();
    let (vm, serial) = vm_with_vfio(&reg);
    let resets = || {
        let logs = common::LOGS.lock().unwrap();
        let count = |s: &str| logs.iter().filter(|(_, m)| m.contains(s)).count();
        (count("vfio-pci vfio0: function level reset"), count("vendor-sample: reset"))
    };
    let before = resets();
    run_to_exit_0(
        &vm,
        &serial,
        "builtin:vfio-flr",
        &[
            "vfio-flr: PCI Express capability at 0000000000000070, FLR capable",
            "vfio-flr: FLR done, command 0, BAR0 0",
            "vfio-flr: BAR0 re-programmed, SCRATCH[0] and CONTROL at reset value 0",
            "vfio-flr: ok",
        ],
    );
    let after = resets();
    assert!(after.0 > before.0, "vfio-pci did not log the FLR: {before:?} -> {after:?}");
    assert!(after.1 > before.1, "the vendor driver was not reset: {before:?} -> {after:?}");
    // The re-programmed BAR is the device's MMIO range again.
    let info = vm.device_info("vfio0").unwrap();
    assert_eq!(info.mmio, vec![(pci::MMIO_WINDOW_BASE, 0x1000)], "{info:?}");
}

#[test]
fn config_cycles_reach_only_the_owning_slot_and_unplug_empties_it() {
    if !kvm_or_skip("config_cycles_reach_only_the_owning_slot_and_unplug_empties_it") {
        return;
    }
    let reg = registry();
    let (vm, _serial) = common::vm_with_serial(16 << 20);
    vm.set_vfio_drivers(Arc::clone(&reg) as _);
    vm.shared().pci.reserve("vfio0", 7).unwrap();
    vm.add_device("vfio-pci", "vfio0", |host| {
        DeviceFactory::create(&*reg, "vfio-pci", "vfio0", VFIO_CONFIG, host)
    })
    .unwrap();
    let bus = vm.bus();
    let rd = |addr: u32| {
        bus.write(IoSpace::Pio, 0xcf8, &addr.to_le_bytes());
        let mut b = [0u8; 4];
        bus.read(IoSpace::Pio, 0xcfc, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(rd(ENABLE | 7 << 11), 0x0001_1de5);
    assert_eq!(rd(ENABLE | 1 << 11), 0xffff_ffff, "slot 1 is empty: the device asked for 7");
    assert_eq!(rd(ENABLE | 7 << 11 | 1 << 8), 0xffff_ffff, "function 1");
    assert_eq!(rd(ENABLE | 1 << 16 | 7 << 11), 0xffff_ffff, "bus 1");
    // 16-bit read of the device ID through 0xCFE.
    bus.write(IoSpace::Pio, 0xcf8, &(ENABLE | 7 << 11).to_le_bytes());
    let mut w = [0u8; 2];
    bus.read(IoSpace::Pio, 0xcfe, &mut w);
    assert_eq!(u16::from_le_bytes(w), 0x0001);
    // A garbage write to the read-only ID is the plugin's to refuse.
    bus.write(IoSpace::Pio, 0xcfc, &0xdead_beefu32.to_le_bytes());
    assert_eq!(rd(ENABLE | 7 << 11), 0x0001_1de5);
    vm.remove_device("vfio0").unwrap();
    assert_eq!(rd(ENABLE | 7 << 11), 0xffff_ffff);
    assert_eq!(vm.shared().pci.functions().len(), 1);
}

/// Software-enable the local APIC of vCPU 0 (not started) so it accepts
/// fixed interrupts into its IRR.
fn enable_lapic(vm: &Vm) {
    let mut states = vm.save_vcpu_state().unwrap();
    states[0].lapic.regs[0xf1] |= 1; // SVR bit 8
    vm.restore_vcpu_state(&states).unwrap();
}

/// Whether `vector` is in vCPU 0's local APIC IRR (the VM paused or stopped).
fn lapic_irr(vm: &Vm, vector: u32) -> bool {
    let s = vm.save_vcpu_state().unwrap();
    let at = 0x200 + 0x10 * (vector as usize / 32);
    let b: Vec<u8> = s[0].lapic.regs[at..at + 4].iter().map(|&c| c as u8).collect();
    u32::from_le_bytes(b.try_into().unwrap()) & (1 << (vector % 32)) != 0
}

/// `lapic_irr` of a running VM: pauses it to look.
fn lapic_irr_running(vm: &Vm, vector: u32) -> bool {
    vm.pause().unwrap();
    let r = lapic_irr(vm, vector);
    vm.resume();
    r
}

#[test]
fn msix_from_the_guest_programmed_table_reaches_the_local_apic_and_waits_while_masked() {
    if !kvm_or_skip("msix_from_the_guest_programmed_table_reaches_the_local_apic_and_waits_while_masked") {
        return;
    }
    let reg = registry();
    let (vm, serial) = vm_with_vfio(&reg);
    enable_lapic(&vm);
    vm.load_program(&GuestProgram::from_spec("builtin:vfio-msix", None).unwrap(), &RegPreset::default())
        .unwrap();
    vm.start().unwrap();
    // The guest rang vector 0 (unmasked), then vector 1 (masked) and saw
    // its PBA bit; it waits for the go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !serial.text().contains("vfio-msix: vector 1 masked") {
        let out = serial.text();
        assert!(Instant::now() < deadline, "the guest did not get there:\n{out}");
        assert!(vm.control().wait_timeout(Duration::from_millis(20)).is_none(), "the guest stopped:\n{out}");
    }
    let mut routes: Vec<_> =
        vm.shared().msi.list().iter().map(|r| (r.address, r.data, r.owner.clone())).collect();
    assert_eq!(
        routes,
        [(0xfee0_0000, MSIX_VECTOR_A, "vfio0".to_owned())],
        "only the unmasked vector is routed"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lapic_irr_running(&vm, MSIX_VECTOR_A) {
        assert!(Instant::now() < deadline, "vector {MSIX_VECTOR_A:#x} never reached the local APIC");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Masked: give a stray delivery time to show, then check none came.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!lapic_irr_running(&vm, MSIX_VECTOR_B), "a masked vector was delivered");
    vm.write_guest(MSIX_GO_GPA, &1u32.to_le_bytes()).unwrap();
    let exit = vm.control().wait_timeout(Duration::from_secs(30));
    let out = serial.text();
    assert_eq!(exit, Some(VmExit::Guest(0)), "{out}");
    for want in [
        "vfio-msix: vector 0 rung",
        "vfio-msix: vector 1 masked, PBA 0000000000000002",
        "vfio-msix: vector 1 unmasked, PBA 0000000000000000",
        "vfio-msix: ok",
    ] {
        assert!(out.contains(want), "no {want:?} in:\n{out}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lapic_irr(&vm, MSIX_VECTOR_B) {
        assert!(
            Instant::now() < deadline,
            "the pending vector {MSIX_VECTOR_B:#x} was not delivered on unmask"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    routes = vm.shared().msi.list().iter().map(|r| (r.address, r.data, r.owner.clone())).collect();
    routes.sort();
    assert_eq!(
        routes,
        [(0xfee0_0000, MSIX_VECTOR_A, "vfio0".to_owned()), (0xfee0_0000, MSIX_VECTOR_B, "vfio0".to_owned())]
    );
    assert!(!ioapic_lines(&vm).unwrap().asserted(INTX_GSI), "MSI-X, not INTx");
    vm.remove_device("vfio0").unwrap();
    assert!(vm.shared().msi.list().is_empty(), "unplug drops the MSI-X routes");
}

#[test]
fn msi_from_the_device_reaches_the_local_apic_through_a_gsi_route() {
    if !kvm_or_skip("msi_from_the_device_reaches_the_local_apic_through_a_gsi_route") {
        return;
    }
    let reg = registry();
    let (vm, _serial) = vm_with_vfio(&reg);
    enable_lapic(&vm);
    let slot = vm.shared().pci.slot_of("vfio0").unwrap();
    let pci = &vm.shared().pci;
    let w32 = |off: u32, v: u32| pci.config_write(slot, off, &v.to_le_bytes());
    w32(0x10, 0xc000_0000);
    w32(0x04, 0x2);
    const VECTOR: u32 = 0x45;
    w32(0x44, 0xfee0_0000);
    w32(0x48, 0);
    pci.config_write(slot, 0x4c, &(VECTOR as u16).to_le_bytes());
    pci.config_write(slot, 0x42, &1u16.to_le_bytes()); // MSI enable
    let routes = vm.shared().msi.list();
    assert_eq!(routes.len(), 1, "{routes:?}");
    assert_eq!((routes[0].address, routes[0].data, routes[0].owner.as_str()), (0xfee0_0000, VECTOR, "vfio0"));
    assert!(routes[0].gsi >= pci::msi::FIRST_MSI_GSI);
    // The INTx route survives the table rewrite.
    let irr = |vm: &Vm| lapic_irr(vm, VECTOR);
    assert!(!irr(&vm));
    vm.bus().write(IoSpace::Mmio, 0xc000_0008, &1u32.to_le_bytes()); // CONTROL: IRQ enable
    vm.bus().write(IoSpace::Mmio, 0xc000_0010, &1u32.to_le_bytes()); // DOORBELL
    let deadline = Instant::now() + Duration::from_secs(5);
    while !irr(&vm) {
        assert!(Instant::now() < deadline, "vector {VECTOR:#x} never reached the local APIC");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!ioapic_lines(&vm).unwrap().asserted(INTX_GSI), "MSI, not INTx");
    // Unplug drops the route.
    vm.remove_device("vfio0").unwrap();
    assert!(vm.shared().msi.list().is_empty());
}

// ---- two processes -------------------------------------------------------

/// Log filter of the migration test: it reads the driver's digest lines.
const LOG: &str = "warn,dmhost::migration=info,vfio_pci=debug,vfio_vendor_sample=info";

/// The migration VM: vfio-verify over a 64 MiB device state that the
/// device keeps changing (background thread) while the guest runs.
pub fn write_config(dir: &Path, precopy: bool, rounds: u64) -> PathBuf {
    common::plugin_path("vfio_pci");
    common::plugin_path("vfio_vendor_sample");
    let cfg = format!(
        "ram = \"64M\"\nprogram = \"builtin:vfio-verify\"\n[regs]\nr12 = {rounds}\nr13 = 1000000\n\
         [[device]]\nkind = \"vfio-pci\"\nid = \"vfio0\"\naddr = \"04.0\"\n\
         config = {{ driver = \"vendor-sample\", driver-config = {{ state-size = \"64M\" }}, intx-gsi = 10, x-allow-pre-copy = {precopy} }}\n"
    );
    let p = dir.join(if precopy { "vfio-precopy.toml" } else { "vfio-stopcopy.toml" });
    std::fs::write(&p, cfg).unwrap();
    p
}

fn digest_in(lines: &[String], what: &str) -> String {
    let l = lines.iter().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no {what:?} in {lines:?}"));
    l.split(what).nth(1).unwrap().split_whitespace().next().unwrap().to_owned()
}

fn stop_copy_bytes(lines: &[String]) -> u64 {
    let l = lines
        .iter()
        .find(|l| l.contains("stop-copy sent"))
        .unwrap_or_else(|| panic!("no stop-copy line in {lines:?}"));
    l.split("stop-copy sent ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn vfio_vm_migrates_between_processes_with_device_state_in_precopy() {
    if !kvm_or_skip("vfio_vm_migrates_between_processes_with_device_state_in_precopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 4000;
    let cfg = write_config(dir.path(), true, rounds);
    let (dst, _) = VmProcess::spawn_logged(&["--incoming", "tcp:127.0.0.1:0"], &cfg, LOG);
    let line = dst.wait_line(true, "waiting for an incoming migration on ", Duration::from_secs(30));
    let uri = line.split("waiting for an incoming migration on ").nth(1).unwrap().trim().to_owned();
    let sock = dir.path().join("src.sock");
    let (src, _) = VmProcess::spawn_logged(&["--control", sock.to_str().unwrap()], &cfg, LOG);
    src.wait_line(false, "vfio-verify: round 0x0000000000000020", Duration::from_secs(30));

    let out = dmhost().args(["migrate", "--control", sock.to_str().unwrap(), "--to", &uri]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate: {stdout} {}", String::from_utf8_lossy(&out.stderr));

    let (code, src_out, src_err) = src.finish(Duration::from_secs(30));
    assert_eq!(code, 0, "source: {src_err:?}");
    assert!(
        !src_out.iter().any(|l| l.contains("rounds verified")),
        "the source must not finish: {src_out:?}"
    );
    let (code, out, err) = dst.finish(Duration::from_secs(120));
    let want = format!("vfio-verify: 0x{rounds:016x} rounds verified");
    assert_eq!(code, 0, "stdout {out:?}\nstderr {err:?}");
    assert!(out.contains(&want), "no {want:?} in {out:?}");
    assert!(
        !out.iter().any(|l| l.contains("vfio-verify: start")),
        "the destination continued, not restarted: {out:?}"
    );
    // The device's state: what the source saved is what the destination
    // loaded (the driver also checks the stream's digest itself).
    let saved = digest_in(&src_err, "saved state digest ");
    let loaded = digest_in(&err, "loaded state digest ");
    assert_eq!(saved, loaded);
    // Most of the 64 MiB went in pre-copy: stop-copy carried only what
    // changed since (and the registers).
    let stop_copy = stop_copy_bytes(&src_err);
    assert!(stop_copy < 16 << 20, "stop-copy sent {stop_copy} bytes of a 64 MiB state");
}
