//! INTx through the iohub and devices in their own process, on real KVM
//! with the built plugin libraries and real device processes.
//!
//! Interrupts cannot be delivered to this CPL-3 guest, so the tests read
//! the IOAPIC through KVM_GET_IRQCHIP: its `irr` bit of a GSI is the line.
//! The pins are set level-triggered and masked (as a guest driver would
//! leave them until it is ready).

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use dmhost::{
    config::Isolation,
    control::{register_vm_commands, CommandRegistry},
    devices::{DeviceFactory, DeviceImpl},
    guest::{asm::*, RegPreset},
    loader::PluginRegistry,
    remote,
    testing::kvm_or_skip,
    vm::{vcpu::VmExit, Vm},
};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use serde_json::json;
use testdev::regs;

const MMIO0: u64 = 0xd000_0000;
const MMIO1: u64 = 0xd000_1000;
const STEP: u64 = 0x30_0000;
const GO: u64 = 0x30_0008;
const STATUS: u64 = 0x30_0100;
/// Both testdevs land on PIRQ B: devfn 0x08 pin A (slot 1) and devfn 0x00 pin B.
const GSI: u32 = 17;

fn setup() -> Arc<PluginRegistry> {
    std::env::set_var(remote::RUNNER_ENV, env!("CARGO_BIN_EXE_dmhost"));
    let mut r = PluginRegistry::default();
    for lib in ["pc_dimm", "testdev", "iohub"] {
        r.load(&plugin_path(lib)).unwrap();
    }
    Arc::new(r)
}

fn add_dev(vm: &Vm, reg: &PluginRegistry, kind: &str, id: &str, config: &str, iso: Isolation) {
    remote::add_device(vm, reg, kind, id, config, iso).unwrap();
}

fn ioapic(vm: &Vm) -> kvm_irqchip {
    let mut c = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.shared().kvm.fd().get_irqchip(&mut c).unwrap();
    c
}

fn irr(vm: &Vm) -> u32 {
    let c = ioapic(vm);
    // SAFETY: chip_id is the IOAPIC, so the union holds `ioapic`.
    unsafe { c.chip.ioapic.irr }
}

/// Pins 16..24 level-triggered and masked.
fn level_masked_pins(vm: &Vm) {
    let mut c = ioapic(vm);
    for gsi in 16..24 {
        // SAFETY: chip_id is the IOAPIC, so the union holds `ioapic`;
        // `bits` covers the whole redirection entry.
        unsafe { c.chip.ioapic.redirtbl[gsi].bits |= (1 << 15) | (1 << 16) };
    }
    vm.shared().kvm.fd().set_irqchip(&c).unwrap();
}

/// What the kernel does at the guest's EOI of a level-triggered pin: drop
/// the IOAPIC's irr bit (the resampler's level goes with it), then signal
/// the line's resamplefd.
fn simulate_eoi(vm: &Vm, resamplefd: i32) {
    let mut c = ioapic(vm);
    // SAFETY: chip_id is the IOAPIC, so the union holds `ioapic`.
    unsafe { c.chip.ioapic.irr &= !(1 << GSI) };
    vm.shared().kvm.fd().set_irqchip(&c).unwrap();
    assert_eq!(irr(vm) & (1 << GSI), 0, "irr cleared by the simulated EOI");
    let one = 1u64.to_le_bytes();
    // SAFETY: 8 bytes from a live buffer to the line's resample eventfd.
    assert_eq!(unsafe { libc::write(resamplefd, one.as_ptr().cast(), 8) }, 8);
}

/// Guest: for each (device base, IRQ value): write IRQ, record IRQ_STATUS,
/// publish the step number, wait for the host's go.
fn irq_steps(steps: &[(u64, u64)]) -> dmhost::guest::GuestProgram {
    let steps = steps.to_vec();
    program("irq-steps", move |a| {
        for (i, &(base, value)) in steps.iter().enumerate() {
            let n = i as u64 + 1;
            a.mov(rbx, base)?;
            a.mov(rax, value)?;
            a.mov(qword_ptr(rbx + regs::IRQ as i32), rax)?;
            a.mov(rax, qword_ptr(rbx + regs::IRQ_STATUS as i32))?;
            a.mov(qword_ptr(STATUS + n * 8), rax)?;
            a.mov(rax, n)?;
            a.mov(qword_ptr(STEP), rax)?;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.pause()?;
            a.mov(rax, qword_ptr(GO))?;
            a.cmp(rax, n as i32)?;
            a.jne(spin)?;
        }
        print(a, "irq steps done\n")?;
        exit_with(a, 0)
    })
    .unwrap()
}

fn shared_line(isolation: Isolation) {
    let reg = setup();
    let (vm, serial) = vm_with_serial(16 << 20);
    add_dev(&vm, &reg, "iohub", "hub", r#"{"gsi-base":16}"#, Isolation::None);
    add_dev(
        &vm,
        &reg,
        "testdev",
        "t0",
        &format!(r#"{{"mmio-base":{MMIO0},"devfn":8,"intx-pin":1}}"#),
        isolation,
    );
    add_dev(
        &vm,
        &reg,
        "testdev",
        "t1",
        &format!(r#"{{"mmio-base":{MMIO1},"devfn":0,"intx-pin":2}}"#),
        Isolation::None,
    );
    level_masked_pins(&vm);
    let route = match &mut *vm.device("hub").unwrap().lock() {
        DeviceImpl::Plugin(d) => d.intx_route(8, 1).unwrap(),
        _ => unreachable!(),
    };
    assert_eq!((route.line, route.gsi), (1, GSI));
    let prog = irq_steps(&[(MMIO0, 1), (MMIO1, 1), (MMIO0, 0), (MMIO1, 0)]);
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    let line = || irr(&vm) & (1 << GSI) != 0;
    assert!(!line(), "line low before the guest runs");
    vm.start().unwrap();
    let step = |n: u64| {
        wait_until(&format!("guest step {n}"), Duration::from_secs(20), || {
            vm.ram().read_u64(STEP).unwrap() == n
        })
    };
    let go = |n: u64| vm.write_guest(GO, &n.to_le_bytes()).unwrap();

    // KVM injects a resample irqfd from a work item: wait for it.
    step(1);
    wait_until("t0 raised: asserted", Duration::from_secs(5), line);
    go(1);
    step(2);
    wait_until("t0 and t1 hold it", Duration::from_secs(5), line);
    go(2);
    step(3);
    assert!(line(), "t0 lowered, t1 still holds: still asserted");
    // Resample while held: the iohub raises the line again.
    simulate_eoi(&vm, route.resamplefd);
    wait_until("re-raise on resample", Duration::from_secs(5), line);
    go(3);
    step(4);
    assert!(!line(), "both lowered: de-asserted");
    // Resample with no level held: stays low.
    simulate_eoi(&vm, route.resamplefd);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!line(), "no re-raise without a held level");
    go(4);
    assert_eq!(vm.control().wait_timeout(Duration::from_secs(20)), Some(VmExit::Guest(0)));
    vm.wait();
    assert_eq!(serial.text(), "irq steps done\n");
    for n in 1..=4 {
        assert_eq!(vm.ram().read_u64(STATUS + n * 8).unwrap(), regs::STATUS_OK, "step {n} status");
    }
}

#[test]
fn intx_shared_line_levels_and_resample_in_process() {
    if !kvm_or_skip("intx_shared_line_levels_and_resample_in_process") {
        return;
    }
    shared_line(Isolation::None);
}

#[test]
fn intx_shared_line_levels_and_resample_out_of_process() {
    if !kvm_or_skip("intx_shared_line_levels_and_resample_out_of_process") {
        return;
    }
    shared_line(Isolation::Process);
}

#[test]
fn iohub_reroute_and_migrated_levels() {
    if !kvm_or_skip("iohub_reroute_and_migrated_levels") {
        return;
    }
    let reg = setup();
    let (vm, _serial) = vm_with_serial(16 << 20);
    add_dev(&vm, &reg, "iohub", "hub", "{}", Isolation::None);
    level_masked_pins(&vm);
    let hub = vm.device("hub").unwrap();
    let mut guard = hub.lock();
    let DeviceImpl::Plugin(d) = &mut *guard else { unreachable!() };
    d.intx_set(8, 1, true).unwrap();
    // KVM injects a resample irqfd from a work item: wait for it.
    let bit = |vm: &Vm, gsi: u32| {
        wait_until(&format!("GSI {gsi} asserted"), Duration::from_secs(5), || irr(vm) & (1 << gsi) != 0)
    };
    bit(&vm, 17);
    // The guest re-routes PIRQ B to GSI 20: the held level moves with it.
    use dmhost_plugin_api::{RSlice, RSliceMut};
    d.pci_config_write(0x61, RSlice::from(&[20u8][..])).unwrap();
    let mut b = [0u8; 1];
    d.pci_config_read(0x61, RSliceMut::from(&mut b[..])).unwrap();
    assert_eq!(b[0], 20);
    bit(&vm, 20); // raised on the new GSI
    let state = d.save_live_complete_precopy().unwrap();
    drop(guard);

    // Destination: a fresh VM; after load the held line is held there too.
    let (vm2, _s) = vm_with_serial(16 << 20);
    add_dev(&vm2, &reg, "iohub", "hub", "{}", Isolation::None);
    level_masked_pins(&vm2);
    assert_eq!(irr(&vm2), 0);
    let hub2 = vm2.device("hub").unwrap();
    let mut g2 = hub2.lock();
    let DeviceImpl::Plugin(d2) = &mut *g2 else { unreachable!() };
    d2.load_state(1, RSlice::from(&state[..])).unwrap();
    bit(&vm2, 20); // the held line is re-raised after load
    d2.intx_set(8, 1, false).unwrap();
    assert_eq!(irr(&vm2) & (1 << 20), 0);
    drop(g2);
    // Unplug tears the lines down (irqfds unregistered, thread joined).
    vm2.remove_device("hub").unwrap();
}

#[test]
fn device_process_cannot_touch_other_owners() {
    if !kvm_or_skip("device_process_cannot_touch_other_owners") {
        return;
    }
    let reg = setup();
    let (vm, _serial) = vm_with_serial(16 << 20);
    add_dev(&vm, &reg, "iohub", "hub", "{}", Isolation::None);
    let dimm = remote::add_device(&vm, &*reg, "pc-dimm", "b", r#"{"size":"2M"}"#, Isolation::None).unwrap();
    let (b_gpa, _) = dimm.region.unwrap();
    // t1 (in the host) drives devfn 8 first; t0 (its own process) claims the same devfn.
    add_dev(&vm, &reg, "testdev", "t1", &format!(r#"{{"mmio-base":{MMIO1},"devfn":8}}"#), Isolation::None);
    add_dev(
        &vm,
        &reg,
        "testdev",
        "t0",
        &format!(r#"{{"mmio-base":{MMIO0},"devfn":8,"mem-size":"2M"}}"#),
        Isolation::Process,
    );
    let t0 = vm.device_info("t0").unwrap();
    let (a_gpa, _) = t0.region.expect("the device process's memfd is mapped into the guest");
    vm.write_guest(b_gpa, &0xb0b0u64.to_le_bytes()).unwrap();
    let maps_before = vm.mappings().len();
    let prog = program("evil", |a| {
        a.mov(rbx, MMIO1)?;
        a.mov(qword_ptr(rbx + regs::IRQ as i32), 1)?;
        a.mov(rbx, MMIO0)?;
        for (i, (cmd, gpa)) in
            [(regs::PM_CMD_REMOVE, b_gpa), (regs::PM_CMD_ADD, b_gpa), (regs::PM_CMD_REMOVE, a_gpa)]
                .into_iter()
                .enumerate()
        {
            a.mov(rax, gpa)?;
            a.mov(qword_ptr(rbx + regs::PM_GPA as i32), rax)?;
            a.mov(rax, 0x1000u64)?;
            a.mov(qword_ptr(rbx + regs::PM_SIZE as i32), rax)?;
            a.mov(rax, 0u64)?;
            a.mov(qword_ptr(rbx + regs::PM_OFFSET as i32), rax)?;
            a.mov(rax, cmd)?;
            a.mov(qword_ptr(rbx + regs::PM_CMD as i32), rax)?;
            a.mov(rax, qword_ptr(rbx + regs::PM_STATUS as i32))?;
            a.mov(qword_ptr(STATUS + i as u64 * 8), rax)?;
        }
        a.mov(rax, 1u64)?;
        a.mov(qword_ptr(rbx + regs::IRQ as i32), rax)?;
        a.mov(rax, qword_ptr(rbx + regs::IRQ_STATUS as i32))?;
        a.mov(qword_ptr(STATUS + 0x20), rax)?;
        a.mov(r8, b_gpa)?;
        a.mov(rax, qword_ptr(r8))?;
        a.mov(qword_ptr(STATUS + 0x28), rax)?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.control().wait_timeout(Duration::from_secs(30)), Some(VmExit::Guest(0)));
    vm.wait();
    let r = |o: u64| vm.ram().read_u64(STATUS + o).unwrap();
    assert_eq!(r(0), regs::STATUS_DENIED, "device process removing the DIMM's page: denied");
    assert_eq!(r(8), regs::STATUS_DENIED, "device process mapping over the DIMM: denied");
    assert_eq!(r(16), regs::STATUS_OK, "its own page: allowed");
    assert_eq!(r(0x20), regs::STATUS_DENIED, "another device's devfn: denied");
    assert_eq!(r(0x28), 0xb0b0, "the DIMM is still mapped and intact");
    let maps = vm.mappings();
    assert_eq!(maps.len(), maps_before, "its own first page unmapped (slot shrunk), nothing else changed");
    assert!(maps.iter().any(|m| m.gpa == b_gpa), "the DIMM's slot is untouched");
    assert!(!maps.iter().any(|m| m.gpa <= a_gpa && a_gpa < m.gpa + m.size), "its own page is gone");
}

#[test]
fn killed_device_process_is_fenced_and_restartable() {
    if !kvm_or_skip("killed_device_process_is_fenced_and_restartable") {
        return;
    }
    let reg = setup();
    let (vm, serial) = vm_with_serial(16 << 20);
    let vm = Arc::new(vm);
    let commands = CommandRegistry::new();
    register_vm_commands(&commands, Arc::clone(&vm), Arc::clone(&reg) as Arc<dyn DeviceFactory>);
    let exec = |v: serde_json::Value| commands.dispatch(&v);
    let cfg = json!({"execute": "device_add", "arguments": {"driver": "testdev", "id": "t0", "mmio-base": MMIO0, "isolation": "process"}});
    assert!(exec(cfg.clone()).get("return").is_some(), "device_add");
    // Guest: forever read the ID register into RAM, print a dot every ~1M spins.
    let prog = program("alive", |a| {
        let mut top = a.create_label();
        let mut spin = a.create_label();
        a.set_label(&mut top)?;
        a.mov(rbx, MMIO0)?;
        a.mov(rax, qword_ptr(rbx + regs::ID as i32))?;
        a.mov(qword_ptr(STATUS), rax)?;
        a.mov(dx, 0x3f8u32)?;
        a.mov(al, b'.' as u32)?;
        a.out(dx, al)?;
        a.mov(rcx, 1_000_000u64)?;
        a.set_label(&mut spin)?;
        a.dec(rcx)?;
        a.jnz(spin)?;
        a.jmp(top)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    vm.start().unwrap();
    let id = || vm.ram().read_u64(STATUS).unwrap();
    wait_until("device answers", Duration::from_secs(10), || id() == regs::ID_VALUE);
    let pid = match &*vm.device("t0").unwrap().lock() {
        DeviceImpl::Remote(d) => d.pid(),
        _ => unreachable!("t0 runs in its own process"),
    };
    // SAFETY: sending SIGKILL to the device process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until("reads all ones", Duration::from_secs(10), || id() == u64::MAX);
    let failed = || {
        let list = exec(json!({"execute": "query-devices"}));
        list["return"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["id"] == "t0" && d["failed"] == true && d["fenced"] == true)
    };
    wait_until("query-devices reports t0 failed", Duration::from_secs(10), failed);
    let dots = serial.text().len();
    wait_until("guest keeps printing", Duration::from_secs(10), || serial.text().len() > dots + 3);
    assert_eq!(exec(json!({"execute": "query-status"}))["return"]["status"], "running");
    // Restart: device_del + device_add.
    assert!(exec(json!({"execute": "device_del", "arguments": {"id": "t0"}})).get("return").is_some());
    assert!(exec(cfg).get("return").is_some(), "device_add after a crash");
    wait_until("restarted device answers", Duration::from_secs(10), || id() == regs::ID_VALUE);
    let list = exec(json!({"execute": "query-devices"}));
    assert_eq!(list["return"][0]["failed"], false);
    vm.stop(VmExit::Requested);
    vm.wait();
}
