//! End-to-end tests of the VM with real KVM, real memfd RAM and plugins
//! loaded from their built shared libraries. Each states its guest code
//! (iced-x86) next to its assertions.

mod common;

use std::time::Duration;

use common::*;
use dmhost::{
    guest::{asm::*, programs, RegPreset, BOOT_INFO_ENTRIES, BOOT_INFO_GPA},
    testing::kvm_or_skip,
    vm::{vcpu::VmExit, Vm, VmConfig},
};
use testdev::regs;

const MMIO: u64 = 0xd000_0000;
/// Guest RAM where test programs leave results for the host.
const RESULTS: u64 = 0x30_0000;

fn run(vm: &Vm) -> VmExit {
    vm.start().unwrap();
    match vm.control().wait_timeout(Duration::from_secs(60)) {
        Some(_) => vm.wait(),
        None => {
            vm.stop(VmExit::Failed("test timeout".into()));
            panic!("guest did not finish in 60 s");
        }
    }
}

/// `r8` = region GPA of boot-info entry `n`.
fn region_of_entry(a: &mut CodeAssembler, n: u64, reg: AsmRegister64) -> Result<(), IcedError> {
    a.mov(reg, qword_ptr(BOOT_INFO_GPA + BOOT_INFO_ENTRIES + n * 0x40 + 0x28))
}

#[test]
fn guest_reads_and_writes_pc_dimm_region_from_plugin() {
    if !kvm_or_skip("guest_reads_and_writes_pc_dimm_region_from_plugin") {
        return;
    }
    let reg = registry();
    let (vm, serial) = vm_with_serial(16 << 20);
    let info = add(&vm, &reg, "pc-dimm", "dimm0", r#"{"size":"2M"}"#);
    let (gpa, size) = info.region.unwrap();
    assert_eq!(size, 2 << 20);
    assert!(gpa >= 4 << 30, "placed in the hotplug window: {gpa:#x}");
    // The host puts a value in the DIMM; the guest must see it and write another.
    vm.write_guest(gpa + 0x1000, &0x1234_5678_9abc_def0u64.to_le_bytes()).unwrap();
    let prog = program("dimm", |a| {
        region_of_entry(a, 0, r8)?;
        a.mov(rax, qword_ptr(r8 + 0x1000))?; // host-written value
        a.mov(qword_ptr(RESULTS), rax)?;
        a.mov(rax, 0xfeed_face_cafe_beefu64)?;
        a.mov(qword_ptr(r8 + 0x2000), rax)?; // for the host to read
        a.mov(qword_ptr(r8 + 0x1f_fff8), rax)?; // last qword of the DIMM
        print(a, "dimm ok\n")?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0));
    assert_eq!(serial.text(), "dimm ok\n");
    assert_eq!(vm.ram().read_u64(RESULTS).unwrap(), 0x1234_5678_9abc_def0);
    let mut b = [0u8; 8];
    vm.read_guest(gpa + 0x2000, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xfeed_face_cafe_beef);
    vm.read_guest(gpa + 0x1f_fff8, &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0xfeed_face_cafe_beef);
    // The DIMM's RAM is registered for migration next to guest RAM.
    let blocks = vm.ram_blocks();
    assert!(blocks.iter().any(|b| b.name == "ram" && b.size == 16 << 20));
    assert!(blocks.iter().any(|b| b.name == "dimm0/ram" && b.size == 2 << 20 && b.fd >= 0));
}

#[test]
fn demo_program_checksum_matches() {
    if !kvm_or_skip("demo_program_checksum_matches") {
        return;
    }
    let reg = registry();
    let (vm, serial) = vm_with_serial(16 << 20);
    add(&vm, &reg, "pc-dimm", "dimm0", r#"{"size":"4M"}"#);
    vm.load_program(&programs::demo().unwrap(), &RegPreset::default()).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0));
    let want = format!("demo: checksum=0x{:016x}\n", programs::demo_checksum(4 << 20));
    assert!(serial.text().ends_with(&want), "{}", serial.text());
}

#[test]
fn guest_mmio_reaches_plugin_device_and_reply_reaches_guest() {
    if !kvm_or_skip("guest_mmio_reaches_plugin_device_and_reply_reaches_guest") {
        return;
    }
    let reg = registry();
    let (vm, _serial) = vm_with_serial(16 << 20);
    let info = add(&vm, &reg, "testdev", "t0", &format!(r#"{{"mmio-base":{MMIO}}}"#));
    assert_eq!(info.mmio, vec![(MMIO, regs::BANK_SIZE)]);
    let prog = program("mmio", |a| {
        a.mov(rbx, MMIO)?;
        a.mov(rax, qword_ptr(rbx + regs::ID as i32))?;
        a.mov(qword_ptr(RESULTS), rax)?;
        a.mov(dword_ptr(rbx + regs::ECHO as i32), 0x1234_5678)?;
        a.mov(eax, dword_ptr(rbx + regs::ECHO as i32))?;
        a.mov(dword_ptr(RESULTS + 8), eax)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(rbx + regs::SCRATCH as i32), rax)?;
        a.mov(al, byte_ptr(rbx + regs::SCRATCH as i32 + 1))?; // sub-register read
        a.mov(byte_ptr(RESULTS + 16), al)?;
        a.mov(rax, qword_ptr(rbx + regs::COUNTER as i32))?;
        a.mov(qword_ptr(RESULTS + 24), rax)?;
        a.mov(rax, qword_ptr(rbx + 0x2000))?; // past the bank: nobody claims it
        a.mov(qword_ptr(RESULTS + 32), rax)?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0));
    let r = |o| vm.ram().read_u64(RESULTS + o).unwrap();
    assert_eq!(r(0), regs::ID_VALUE);
    assert_eq!(r(8) as u32, !0x1234_5678u32, "echo reply came from the device");
    assert_eq!(r(16) as u8, 0x77);
    assert_eq!(r(24), 2, "two MMIO writes counted by the plugin");
    assert_eq!(r(32), u64::MAX, "unclaimed MMIO reads all ones");
}

#[test]
fn physmap_ownership_between_two_plugins() {
    if !kvm_or_skip("physmap_ownership_between_two_plugins") {
        return;
    }
    capture_logs();
    let reg = registry();
    let (vm, _serial) = vm_with_serial(16 << 20);
    // Device a: testdev with registers and its own 2 MiB region; device b: a pc-dimm.
    let a_info = add(&vm, &reg, "testdev", "a", &format!(r#"{{"mmio-base":{MMIO},"mem-size":"2M"}}"#));
    let b_info = add(&vm, &reg, "pc-dimm", "b", r#"{"size":"2M"}"#);
    let (a_gpa, _) = a_info.region.unwrap();
    let (b_gpa, _) = b_info.region.unwrap();
    let slots_before = vm.mappings().len();
    vm.write_guest(a_gpa + 0x5000, &0xa5a5_a5a5_a5a5_a5a5u64.to_le_bytes()).unwrap();
    vm.write_guest(b_gpa, &0xb0b0_b0b0_b0b0_b0b0u64.to_le_bytes()).unwrap();

    // Issue a physmap request through the device: remove (1) or add (2).
    let request =
        |a: &mut CodeAssembler, cmd: u64, gpa: u64, size: u64, result: u64| -> Result<(), IcedError> {
            a.mov(rax, gpa)?;
            a.mov(qword_ptr(rbx + regs::PM_GPA as i32), rax)?;
            a.mov(rax, size)?;
            a.mov(qword_ptr(rbx + regs::PM_SIZE as i32), rax)?;
            a.mov(rax, gpa - a_gpa)?;
            a.mov(qword_ptr(rbx + regs::PM_OFFSET as i32), rax)?;
            a.mov(qword_ptr(rbx + regs::PM_CMD as i32), cmd as i32)?;
            a.mov(rax, qword_ptr(rbx + regs::PM_STATUS as i32))?;
            a.mov(qword_ptr(RESULTS + result), rax)
        };
    let prog = program("physmap", |a| {
        a.mov(rbx, MMIO)?;
        a.mov(r8, a_gpa)?;
        a.mov(r9, b_gpa)?;
        // 1. a removes b's page: denied, b still readable.
        request(a, regs::PM_CMD_REMOVE, b_gpa, 4096, 0)?;
        a.mov(rax, qword_ptr(r9))?;
        a.mov(qword_ptr(RESULTS + 8), rax)?;
        // 2. a removes its own page: ok; the page now reads all ones (MMIO).
        request(a, regs::PM_CMD_REMOVE, a_gpa + 0x5000, 4096, 16)?;
        a.mov(rax, qword_ptr(r8 + 0x5000))?;
        a.mov(qword_ptr(RESULTS + 24), rax)?;
        // 3. removing it again is a no-op: ok.
        request(a, regs::PM_CMD_REMOVE, a_gpa + 0x5000, 4096, 32)?;
        // 4. a maps it back: the data is there again.
        request(a, regs::PM_CMD_ADD, a_gpa + 0x5000, 4096, 40)?;
        a.mov(rax, qword_ptr(r8 + 0x5000))?;
        a.mov(qword_ptr(RESULTS + 48), rax)?;
        // 5. a maps its memory over b's range: denied.
        a.mov(rax, b_gpa)?;
        a.mov(qword_ptr(rbx + regs::PM_GPA as i32), rax)?;
        a.mov(qword_ptr(rbx + regs::PM_SIZE as i32), 4096)?;
        a.mov(qword_ptr(rbx + regs::PM_OFFSET as i32), 0)?;
        a.mov(qword_ptr(rbx + regs::PM_CMD as i32), regs::PM_CMD_ADD as i32)?;
        a.mov(rax, qword_ptr(rbx + regs::PM_STATUS as i32))?;
        a.mov(qword_ptr(RESULTS + 56), rax)?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0));
    let r = |o| vm.ram().read_u64(RESULTS + o).unwrap();
    assert_eq!(r(0), regs::STATUS_DENIED, "removing another owner's range is refused");
    assert_eq!(r(8), 0xb0b0_b0b0_b0b0_b0b0, "b's page stays mapped");
    assert_eq!(r(16), regs::STATUS_OK);
    assert_eq!(r(24), u64::MAX, "the removed page faults to MMIO and reads all ones");
    assert_eq!(r(32), regs::STATUS_OK, "removing an unmapped page is a no-op");
    assert_eq!(r(40), regs::STATUS_OK);
    assert_eq!(r(48), 0xa5a5_a5a5_a5a5_a5a5, "re-added page shows the device's memory");
    assert_eq!(r(56), regs::STATUS_DENIED, "mapping over another owner's range is refused");
    // The hole was split out of a's slot and mapped again: one slot more.
    assert_eq!(vm.mappings().len(), slots_before + 2);
    let denied = warnings_containing("device a: physmap_remove denied");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert!(denied[0].contains("owned by device b"), "{denied:?}");
    assert_eq!(warnings_containing("device a: physmap_add denied").len(), 1);
}

#[test]
fn pause_save_and_restore_into_fresh_vm() {
    if !kvm_or_skip("pause_save_and_restore_into_fresh_vm") {
        return;
    }
    const N: u64 = 3_000_000_000;
    // Counts in r12, xmm0 and memory; reports xmm0 and memory through RAM.
    let prog = program("counter", |a| {
        let mut l = a.create_label();
        a.mov(rbx, RESULTS)?;
        a.mov(eax, 1)?;
        a.movq(xmm1, rax)?;
        a.pxor(xmm0, xmm0)?;
        a.xor(r12d, r12d)?;
        a.mov(r13, N)?;
        a.set_label(&mut l)?;
        a.inc(r12)?;
        a.paddq(xmm0, xmm1)?;
        a.add(qword_ptr(rbx), 1)?;
        a.cmp(r12, r13)?;
        a.jne(l)?;
        a.movq(rax, xmm0)?;
        a.mov(qword_ptr(rbx + 8), rax)?;
        a.mov(qword_ptr(rbx + 16), r12)?;
        exit_with(a, 0)
    })
    .unwrap();
    let (vm_a, _) = vm_with_serial(8 << 20);
    vm_a.load_program(&prog, &RegPreset::default()).unwrap();
    vm_a.start().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm_a.pause().unwrap();
    let c1 = vm_a.ram().read_u64(RESULTS).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(vm_a.ram().read_u64(RESULTS).unwrap(), c1, "paused vCPUs do not run");
    assert!(c1 > 0 && c1 < N, "{c1}");
    // Resume and pause again: it went on.
    vm_a.resume();
    std::thread::sleep(Duration::from_millis(50));
    vm_a.pause().unwrap();
    let c2 = vm_a.ram().read_u64(RESULTS).unwrap();
    assert!(c2 > c1, "{c2} > {c1}");
    let states = vm_a.save_vcpu_state().unwrap();
    let vm_state = vm_a.save_vm_state().unwrap();
    // r12 is incremented just before the memory counter.
    let saved_r12 = states[0].regs.r12;
    assert!(saved_r12 == c2 || saved_r12 == c2 + 1, "r12 {saved_r12} vs memory {c2}");
    let json = serde_json::to_vec(&states).unwrap();
    let mut ram = vec![0u8; 8 << 20];
    vm_a.ram().read(0, &mut ram).unwrap();
    vm_a.stop(VmExit::Requested);
    assert_eq!(vm_a.wait(), VmExit::Requested);
    drop(vm_a);

    let (vm_b, _) = vm_with_serial(8 << 20);
    vm_b.ram().write(0, &ram).unwrap();
    vm_b.restore_vm_state(&vm_state).unwrap();
    let states: Vec<dmhost::vm::vcpu::VcpuState> = serde_json::from_slice(&json).unwrap();
    vm_b.restore_vcpu_state(&states).unwrap();
    assert_eq!(run(&vm_b), VmExit::Guest(0));
    let r = |o| vm_b.ram().read_u64(RESULTS + o).unwrap();
    assert_eq!(r(0), N, "memory counter");
    assert_eq!(r(8), N, "xmm0 survived (XSAVE state)");
    assert_eq!(r(16), N, "r12");
}

#[test]
fn dirty_log_reports_guest_writes_per_block() {
    if !kvm_or_skip("dirty_log_reports_guest_writes_per_block") {
        return;
    }
    let reg = registry();
    let (vm, _) = vm_with_serial(8 << 20);
    let (gpa, _) = add(&vm, &reg, "pc-dimm", "d", r#"{"size":"2M"}"#).region.unwrap();
    vm.enable_dirty_logging(true).unwrap();
    let _ = vm.get_and_clear_block_dirty("ram").unwrap();
    let prog = program("dirty", |a| {
        a.mov(rax, 1u64)?;
        a.mov(qword_ptr(0x40_0000u64), rax)?; // RAM page 0x400
        a.mov(r8, gpa)?;
        a.mov(qword_ptr(r8 + 0x3000), rax)?; // DIMM page 3
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    let _ = vm.get_and_clear_block_dirty("ram").unwrap();
    let _ = vm.get_and_clear_block_dirty("d/ram").unwrap();
    // A host write (as device DMA does) is tracked in software.
    vm.write_guest(gpa + 0x7000, &[1]).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0));
    let bit = |bm: &[u64], p: u64| bm[(p / 64) as usize] & (1 << (p % 64)) != 0;
    let ram = vm.get_and_clear_block_dirty("ram").unwrap();
    assert!(bit(&ram, 0x400), "guest RAM write logged");
    let dimm = vm.get_and_clear_block_dirty("d/ram").unwrap();
    assert!(bit(&dimm, 3) && bit(&dimm, 7), "{:x?}", &dimm[..1]);
    assert!(!bit(&dimm, 4));
    let again = vm.get_and_clear_block_dirty("d/ram").unwrap();
    assert!(again.iter().all(|&w| w == 0), "cleared by the read");
}

#[test]
fn bad_device_requests_fail_cleanly() {
    if !kvm_or_skip("bad_device_requests_fail_cleanly") {
        return;
    }
    let reg = registry();
    let vm = Vm::new(VmConfig::new(8 << 20, 1)).unwrap();
    add(&vm, &reg, "testdev", "t", &format!(r#"{{"mmio-base":{MMIO}}}"#));
    let create = |kind: &str, id: &str, cfg: &str| {
        vm.add_device(kind, id, |h| dmhost::devices::DeviceFactory::create(&*reg, kind, id, cfg, h))
    };
    // Overlapping MMIO with another device: plug fails, nothing left behind.
    assert!(create("testdev", "t2", &format!(r#"{{"mmio-base":{MMIO}}}"#)).is_err());
    assert!(create("testdev", "t", "{}").is_err(), "duplicate id");
    assert!(create("testdev", "bad id!", "{}").is_err());
    assert!(create("nosuch", "x", "{}").is_err());
    assert!(create("pc-dimm", "p", r#"{"size":"3K"}"#).is_err());
    // A requested address that collides with guest RAM.
    assert!(create("pc-dimm", "p", r#"{"size":"2M","addr":0}"#).is_err());
    assert_eq!(vm.devices().len(), 1);
    assert!(vm.remove_device("nosuch").is_err());
    vm.remove_device("t").unwrap();
    assert!(vm.devices().is_empty());
    // Only the PCI host bridge's ports remain.
    assert!(vm.bus().ranges().iter().all(|r| r.owner == dmhost::pci::BUS_OWNER), "{:?}", vm.bus().ranges());
    // The id and the range can be used again.
    create("testdev", "t", &format!(r#"{{"mmio-base":{MMIO}}}"#)).unwrap();
}

/// A device whose 4-page region has its second page cut out and trapped,
/// as vfio-pci does around an MSI-X table: reads there return `HOLE`.
struct HoleDevice {
    memory: dmhost_plugin_api::backend::MemoryBackend,
    host: dmhost_plugin_api::Host,
    gpa: u64,
}

const HOLE: u64 = 0x4d53_4958_7461_626c;

impl dmhost_plugin_api::DeviceModel for HoleDevice {
    fn memory_region(&self) -> Option<dmhost_plugin_api::GuestRegion> {
        let memory = self.memory.whole();
        Some(dmhost_plugin_api::GuestRegion { memory, requested_gpa: None.into(), align: 4096 })
    }
    fn plug(&mut self, info: dmhost_plugin_api::PlugInfo) -> Result<(), dmhost_plugin_api::PluginError> {
        self.gpa = info.region_gpa.into_option().expect("the host placed the region");
        let hole = self.gpa + 0x1000;
        self.host.physmap_remove(hole, 0x1000).into_result()?;
        self.host.register_io(dmhost::vm::bus::IoSpace::Mmio, hole, 0x1000).into_result()?;
        // A page still mapped cannot be trapped; nor another's range.
        assert!(self.host.register_io(dmhost::vm::bus::IoSpace::Mmio, self.gpa + 0x2000, 0x1000).is_err());
        Ok(())
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Result<(), dmhost_plugin_api::PluginError> {
        let v = HOLE ^ (addr - self.gpa);
        data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        Ok(())
    }
}

#[test]
fn a_device_traps_a_hole_it_cut_in_its_own_mapped_region() {
    if !kvm_or_skip("a_device_traps_a_hole_it_cut_in_its_own_mapped_region") {
        return;
    }
    let (vm, serial) = vm_with_serial(8 << 20);
    let memory = dmhost_plugin_api::backend::MemoryBackend::memfd("holes", 0x4000).unwrap();
    let info = vm
        .add_device("holes", "h", |host| {
            let model = HoleDevice { memory, host, gpa: 0 };
            Ok(dmhost::devices::DeviceImpl::Builtin(Box::new(model)))
        })
        .unwrap();
    let (gpa, _) = info.region.unwrap();
    assert_eq!(info.mmio, vec![(gpa + 0x1000, 0x1000)], "{info:?}");
    vm.write_guest(gpa + 0x8, &0x1111u64.to_le_bytes()).unwrap();
    vm.write_guest(gpa + 0x2008, &0x2222u64.to_le_bytes()).unwrap();
    let prog = program("holes", |a| {
        region_of_entry(a, 0, r8)?;
        a.mov(rax, qword_ptr(r8 + 0x8))?; // mapped memory
        a.mov(qword_ptr(RESULTS), rax)?;
        a.mov(rax, qword_ptr(r8 + 0x1008))?; // the hole: an MMIO exit to the device
        a.mov(qword_ptr(RESULTS + 8), rax)?;
        a.mov(rax, qword_ptr(r8 + 0x2008))?; // mapped memory past the hole
        a.mov(qword_ptr(RESULTS + 16), rax)?;
        print(a, "holes ok\n")?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    assert_eq!(run(&vm), VmExit::Guest(0), "{}", serial.text());
    let r = |i: u64| vm.ram().read_u64(RESULTS + 8 * i).unwrap();
    assert_eq!((r(0), r(1), r(2)), (0x1111, HOLE ^ 0x1008, 0x2222));
    vm.remove_device("h").unwrap();
    assert!(vm.bus().ranges().iter().all(|r| r.owner != "h"), "the trapped hole went with the device");
}
