//! Guests that drive the sample vendor device behind `vfio-pci` through
//! the PCI host bridge ([`crate::pci`]), at CPL 3:
//!
//! - `vfio-demo`: enumerates bus 0 through `0xCF8/0xCFC`, finds
//!   [`SAMPLE_VENDOR`]:[`SAMPLE_DEVICE`], sizes BAR0 (all ones, read the
//!   mask), places it at [`crate::pci::MMIO_WINDOW_BASE`], enables memory
//!   decode, reads the ID register, writes and checks the 16 scratch
//!   registers, enables the device interrupt, rings the doorbell and polls
//!   STATUS until the interrupt is pending (the guest cannot take it; the
//!   host sees the INTx line in the IOAPIC's IRR). Prints
//!   `vfio-demo: ok` and exits 0.
//! - `vfio-verify`: the same set-up, then rounds that check the ID
//!   register, check every scratch register holds what the previous round
//!   wrote and write this round's values, ring the doorbell and check the
//!   doorbell count, and touch a state page (the device's background
//!   thread changes its state too). A migration that loses or corrupts the
//!   device's registers is caught. `r12` rounds (0 = 400), `r13` delay
//!   iterations per round. Prints `vfio-verify: 0x... rounds verified`
//!   and exits 0.
//!
//! - `vfio-msix`: the same set-up, then finds the MSI-X capability, checks
//!   its table and PBA are in BAR0, programs vector 0 (64-bit address
//!   write) for local APIC vector [`MSIX_VECTOR_A`] unmasked and vector 1
//!   for [`MSIX_VECTOR_B`] masked, enables MSI-X, and rings the doorbell
//!   for vector 0 (the host sees `A` in the local APIC's IRR), then for
//!   vector 1, which only sets its PBA bit (read back). It waits (parking
//!   through port `0x502`) until the host writes 1 at [`MSIX_GO_GPA`],
//!   unmasks vector 1 and checks the PBA bit cleared: the host sees `B`.
//!   Prints `vfio-msix: ok` and exits 0.
//!
//! - `vfio-flr`: the same set-up, then writes SCRATCH\[0\] and CONTROL,
//!   finds the PCI Express capability (ID 0x10) with FLR in DevCap, sets
//!   DevCtl bit 15 (Function Level Reset), checks the bit reads back 0,
//!   the command register is cleared and BAR0 reads 0, re-programs BAR0
//!   and memory decode, and checks the ID register again and SCRATCH\[0\]
//!   and CONTROL back at their reset value 0. Prints `vfio-flr: ok` and
//!   exits 0.
//!
//! Exit codes: 2 device not found, 3 bad BAR, 4 bad ID register, 5
//! scratch mismatch, 6 interrupt already pending, 7 no interrupt, 8 bad
//! doorbell count, 9 a check failed in `vfio-verify`, 10 no usable MSI-X
//! capability, 11 the masked vector's PBA bit never set, 12 the host never
//! said go, 13 the PBA bit stayed set after unmasking, 14 no PCI Express
//! capability advertising FLR, 15 the FLR bit read back set, 16 the
//! command register survived the FLR, 17 BAR0 survived it, 18 a register
//! not at its reset value after it.

use super::{asm::*, GuestError, GuestProgram};
use crate::pci::{CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, ENABLE, MMIO_WINDOW_BASE};

/// PCI IDs of the sample vendor device.
pub const SAMPLE_VENDOR: u16 = 0x1de5;
pub const SAMPLE_DEVICE: u16 = 0x0001;
const ID: u32 = (SAMPLE_DEVICE as u32) << 16 | SAMPLE_VENDOR as u32;
const REG_ID: i32 = 0x000;
const REG_CONTROL: i32 = 0x008;
const REG_STATUS: i32 = 0x00c;
const REG_DOORBELL: i32 = 0x010;
const REG_DOORBELL_COUNT: i32 = 0x014;
const REG_TOUCH: i32 = 0x038;
const REG_SCRATCH: i32 = 0x100;
/// Local APIC vectors `vfio-msix` programs into MSI-X vectors 0 and 1.
pub const MSIX_VECTOR_A: u32 = 0x45;
pub const MSIX_VECTOR_B: u32 = 0x46;
/// Where the host writes 1 to let `vfio-msix` unmask vector 1 (guest RAM
/// past the program).
pub const MSIX_GO_GPA: u64 = 0x30_0000;
const MSI_ADDRESS: u32 = 0xfee0_0000;
/// Rounds of `vfio-verify` when `r12` is 0.
pub const DEFAULT_ROUNDS: u64 = 400;
const K_ROUND: u32 = 0x9E37_79B1;
const K_INDEX: u32 = 0x85EB_CA77;

/// The value `vfio-verify` keeps in scratch register `i` after `round`.
pub fn scratch_value(round: u32, i: u32) -> u32 {
    round.wrapping_mul(K_ROUND) ^ i.wrapping_mul(K_INDEX)
}

/// `eax` = config dword at address `eax`. Clobbers `dx`.
fn cfg_read(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, CONFIG_ADDRESS_PORT as u32)?;
    a.out(dx, eax)?;
    a.mov(dx, CONFIG_DATA_PORT as u32)?;
    a.in_(eax, dx)
}

/// Config dword at address `eax` = `ebx`. Clobbers `eax`, `dx`.
fn cfg_write(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, CONFIG_ADDRESS_PORT as u32)?;
    a.out(dx, eax)?;
    a.mov(dx, CONFIG_DATA_PORT as u32)?;
    a.mov(eax, ebx)?;
    a.out(dx, eax)
}

/// Print `msg`, then `rax` in hex. Clobbers `rax`, `rcx`, `rdx`, `r11`.
fn print_hex(a: &mut CodeAssembler, msg: &str) -> Result<(), IcedError> {
    a.push(rax)?;
    print(a, msg)?;
    a.pop(rax)?;
    print_hex_rax(a)
}

/// Find the device and program BAR0. Leaves `r13d` = its CONFIG_ADDRESS
/// base and `r14` = the BAR0 address; exits 2/3/4 on failure.
fn setup(a: &mut CodeAssembler, name: &str) -> Result<(), IcedError> {
    let mut scan = a.create_label();
    let mut next = a.create_label();
    let mut not_found = a.create_label();
    let mut bad_bar = a.create_label();
    let mut bad_id = a.create_label();
    let mut ready = a.create_label();
    print(a, &format!("{name}: scanning PCI bus 0\n"))?;
    a.xor(r12d, r12d)?;
    a.xor(r13d, r13d)?;
    a.set_label(&mut scan)?;
    a.mov(eax, r12d)?;
    a.shl(eax, 11u32)?;
    a.or(eax, ENABLE as i32)?;
    cfg_read(a)?;
    a.cmp(eax, -1i32)?;
    a.je(next)?;
    a.mov(r8d, eax)?;
    a.mov(eax, r12d)?;
    print_hex(a, &format!("{name}: 00:"))?;
    a.mov(eax, r8d)?;
    print_hex(a, " id ")?;
    print(a, "\n")?;
    a.cmp(r8d, ID as i32)?;
    a.jne(next)?;
    a.test(r13d, r13d)?;
    a.jnz(next)?;
    a.mov(r13d, r12d)?;
    a.shl(r13d, 11u32)?;
    a.or(r13d, ENABLE as i32)?;
    a.set_label(&mut next)?;
    a.inc(r12d)?;
    a.cmp(r12d, 32)?;
    a.jb(scan)?;
    a.test(r13d, r13d)?;
    a.jz(not_found)?;

    // Size BAR0: write all ones, read the mask back.
    a.mov(eax, r13d)?;
    a.or(eax, 0x10)?;
    a.mov(ebx, -1i32)?;
    cfg_write(a)?;
    a.mov(eax, r13d)?;
    a.or(eax, 0x10)?;
    cfg_read(a)?;
    a.test(eax, 1)?; // an I/O BAR is not what this device has
    a.jnz(bad_bar)?;
    a.and(eax, -16i32)?;
    a.jz(bad_bar)?;
    a.not(eax)?;
    a.inc(eax)?;
    a.cmp(eax, 0x4000_0000)?;
    a.ja(bad_bar)?;
    a.mov(r9d, eax)?;
    print_hex(a, &format!("{name}: BAR0 size "))?;
    print(a, "\n")?;
    // Place it at the start of the MMIO window (aligned to any size up to
    // 1 GiB), check it reads back, enable memory decode.
    a.mov(r14, MMIO_WINDOW_BASE)?;
    a.mov(eax, r13d)?;
    a.or(eax, 0x10)?;
    a.mov(ebx, r14d)?;
    cfg_write(a)?;
    a.mov(eax, r13d)?;
    a.or(eax, 0x10)?;
    cfg_read(a)?;
    a.and(eax, -16i32)?;
    a.cmp(eax, r14d)?;
    a.jne(bad_bar)?;
    a.mov(eax, r13d)?;
    a.or(eax, 0x04)?;
    cfg_read(a)?;
    a.or(eax, 0x2)?; // memory space
    a.and(eax, 0xfbff)?; // INTx enabled; status (RW1C) written as 0
    a.mov(ebx, eax)?;
    a.mov(eax, r13d)?;
    a.or(eax, 0x04)?;
    cfg_write(a)?;
    // The ID register through the BAR.
    a.mov(eax, dword_ptr(r14 + REG_ID))?;
    a.cmp(eax, ID as i32)?;
    a.jne(bad_id)?;
    a.mov(rax, r14)?;
    print_hex(a, &format!("{name}: BAR0 at "))?;
    a.mov(eax, dword_ptr(r14 + REG_ID))?;
    print_hex(a, ", ID register ")?;
    print(a, "\n")?;
    a.jmp(ready)?;

    a.set_label(&mut not_found)?;
    print(a, &format!("{name}: device {SAMPLE_VENDOR:04x}:{SAMPLE_DEVICE:04x} not found\n"))?;
    exit_with(a, 2)?;
    a.set_label(&mut bad_bar)?;
    print(a, &format!("{name}: BAR0 cannot be sized or placed\n"))?;
    exit_with(a, 3)?;
    a.set_label(&mut bad_id)?;
    print_hex(a, &format!("{name}: bad ID register "))?;
    print(a, "\n")?;
    exit_with(a, 4)?;
    a.set_label(&mut ready)?;
    Ok(())
}

/// Walk the capability list of the function at `r13d` for capability
/// `id`: `r12d` = its offset, or jump to `missing`. Clobbers `eax`, `dx`,
/// `r10d`.
fn find_capability(a: &mut CodeAssembler, id: u8, missing: CodeLabel) -> Result<(), IcedError> {
    let mut walk = a.create_label();
    let mut found = a.create_label();
    a.mov(eax, r13d)?;
    a.or(eax, 0x34)?;
    cfg_read(a)?;
    a.and(eax, 0xfc)?;
    a.mov(r12d, eax)?;
    a.mov(r10d, 48)?;
    a.set_label(&mut walk)?;
    a.test(r12d, r12d)?;
    a.jz(missing)?;
    a.mov(eax, r13d)?;
    a.or(eax, r12d)?;
    cfg_read(a)?;
    a.cmp(al, i32::from(id))?;
    a.je(found)?;
    a.shr(eax, 8u32)?;
    a.and(eax, 0xfc)?;
    a.mov(r12d, eax)?;
    a.dec(r10d)?;
    a.jnz(walk)?;
    a.jmp(missing)?;
    a.set_label(&mut found)
}

/// `vfio-demo` (see the module docs).
pub fn vfio_demo() -> Result<GuestProgram, GuestError> {
    program("vfio-demo", |a| {
        let mut wloop = a.create_label();
        let mut rloop = a.create_label();
        let mut poll = a.create_label();
        let mut got = a.create_label();
        let mut bad_scratch = a.create_label();
        let mut early = a.create_label();
        let mut no_irq = a.create_label();
        let mut bad_count = a.create_label();
        setup(a, "vfio-demo")?;
        // Scratch registers: write a pattern, read it back.
        a.xor(ecx, ecx)?;
        a.set_label(&mut wloop)?;
        a.imul_3(eax, ecx, K_INDEX as i32)?;
        a.xor(eax, 0xa5a5_a5a5u32 as i32)?;
        a.mov(dword_ptr(r14 + rcx * 4 + REG_SCRATCH), eax)?;
        a.inc(ecx)?;
        a.cmp(ecx, 16)?;
        a.jb(wloop)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut rloop)?;
        a.imul_3(eax, ecx, K_INDEX as i32)?;
        a.xor(eax, 0xa5a5_a5a5u32 as i32)?;
        a.cmp(dword_ptr(r14 + rcx * 4 + REG_SCRATCH), eax)?;
        a.jne(bad_scratch)?;
        a.inc(ecx)?;
        a.cmp(ecx, 16)?;
        a.jb(rloop)?;
        print(a, "vfio-demo: 16 scratch registers read back\n")?;
        // The interrupt: nothing pending yet; enable, ring, poll STATUS.
        a.mov(eax, dword_ptr(r14 + REG_STATUS))?;
        a.test(eax, 1)?;
        a.jnz(early)?;
        a.mov(dword_ptr(r14 + REG_CONTROL), 1)?;
        a.mov(dword_ptr(r14 + REG_DOORBELL), 1)?;
        a.mov(ecx, 100_000)?;
        a.set_label(&mut poll)?;
        a.mov(eax, dword_ptr(r14 + REG_STATUS))?;
        a.test(eax, 1)?;
        a.jnz(got)?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.jmp(no_irq)?;
        a.set_label(&mut got)?;
        a.mov(eax, dword_ptr(r14 + REG_DOORBELL_COUNT))?;
        a.cmp(eax, 1)?;
        a.jne(bad_count)?;
        a.mov(eax, dword_ptr(r14 + REG_STATUS))?;
        print_hex(a, "vfio-demo: doorbell rung, interrupt pending, status ")?;
        print(a, "\nvfio-demo: ok\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut bad_scratch)?;
        a.mov(eax, ecx)?;
        print_hex(a, "vfio-demo: scratch mismatch at register ")?;
        print(a, "\n")?;
        exit_with(a, 5)?;
        a.set_label(&mut early)?;
        print(a, "vfio-demo: interrupt pending before the doorbell\n")?;
        exit_with(a, 6)?;
        a.set_label(&mut no_irq)?;
        print(a, "vfio-demo: no interrupt after the doorbell\n")?;
        exit_with(a, 7)?;
        a.set_label(&mut bad_count)?;
        print_hex(a, "vfio-demo: doorbell count ")?;
        print(a, "\n")?;
        exit_with(a, 8)
    })
}

/// `vfio-verify` (see the module docs).
pub fn vfio_verify() -> Result<GuestProgram, GuestError> {
    program("vfio-verify", |a| {
        let mut rounds_set = a.create_label();
        let mut round = a.create_label();
        let mut sloop = a.create_label();
        let mut skip = a.create_label();
        let mut delay = a.create_label();
        let mut delay_done = a.create_label();
        let mut no_print = a.create_label();
        let mut bad = a.create_label();
        // r12/r13 are the config's; keep them in r15/rsi before `setup`.
        a.mov(r15, r12)?;
        a.mov(rsi, r13)?;
        a.test(r15, r15)?;
        a.jnz(rounds_set)?;
        a.mov(r15, DEFAULT_ROUNDS)?;
        a.set_label(&mut rounds_set)?;
        setup(a, "vfio-verify")?;
        a.mov(dword_ptr(r14 + REG_CONTROL), 0)?;
        // The doorbell count at the start (rounds add one each).
        a.mov(edi, dword_ptr(r14 + REG_DOORBELL_COUNT))?;
        a.mov(ebp, 1)?;
        print(a, "vfio-verify: start\n")?;

        a.set_label(&mut round)?;
        a.mov(eax, dword_ptr(r14 + REG_ID))?;
        a.cmp(eax, ID as i32)?;
        a.jne(bad)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut sloop)?;
        // r8d = value of the previous round, r9d = this round's.
        a.imul_3(r10d, ecx, K_INDEX as i32)?;
        a.lea(eax, dword_ptr(rbp - 1))?;
        a.imul_3(r8d, eax, K_ROUND as i32)?;
        a.xor(r8d, r10d)?;
        a.imul_3(r9d, ebp, K_ROUND as i32)?;
        a.xor(r9d, r10d)?;
        a.cmp(ebp, 1)?;
        a.je(skip)?;
        a.mov(eax, dword_ptr(r14 + rcx * 4 + REG_SCRATCH))?;
        a.cmp(eax, r8d)?;
        a.jne(bad)?;
        a.set_label(&mut skip)?;
        a.mov(dword_ptr(r14 + rcx * 4 + REG_SCRATCH), r9d)?;
        a.inc(ecx)?;
        a.cmp(ecx, 16)?;
        a.jb(sloop)?;
        // Doorbell: the count follows.
        a.mov(dword_ptr(r14 + REG_DOORBELL), 1)?;
        a.lea(eax, dword_ptr(rdi + rbp))?;
        a.cmp(dword_ptr(r14 + REG_DOORBELL_COUNT), eax)?;
        a.jne(bad)?;
        a.mov(dword_ptr(r14 + REG_TOUCH), ebp)?;
        // Throttle.
        a.mov(rcx, rsi)?;
        a.set_label(&mut delay)?;
        a.test(rcx, rcx)?;
        a.jz(delay_done)?;
        a.dec(rcx)?;
        a.jmp(delay)?;
        a.set_label(&mut delay_done)?;
        a.test(ebp, 15)?;
        a.jnz(no_print)?;
        a.mov(eax, ebp)?;
        print_hex(a, "vfio-verify: round 0x")?;
        print(a, "\n")?;
        a.set_label(&mut no_print)?;
        a.inc(ebp)?;
        a.cmp(rbp, r15)?;
        a.jbe(round)?;
        a.mov(rax, r15)?;
        print_hex(a, "vfio-verify: 0x")?;
        print(a, " rounds verified\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut bad)?;
        a.mov(eax, ebp)?;
        print_hex(a, "vfio-verify: MISMATCH in round 0x")?;
        print(a, "\n")?;
        exit_with(a, 9)
    })
}

/// `vfio-msix` (see the module docs).
pub fn vfio_msix() -> Result<GuestProgram, GuestError> {
    program("vfio-msix", |a| {
        let mut no_cap = a.create_label();
        let mut poll = a.create_label();
        let mut pending = a.create_label();
        let mut no_pba = a.create_label();
        let mut wait = a.create_label();
        let mut go = a.create_label();
        let mut no_go = a.create_label();
        let mut stuck = a.create_label();
        setup(a, "vfio-msix")?;
        // MSI-X (ID 0x11): r12d = its offset.
        find_capability(a, 0x11, no_cap)?;
        // Table (r15) and PBA (rbp), both in BAR0 (BIR 0).
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 4)?;
        cfg_read(a)?;
        a.test(eax, 7)?;
        a.jnz(no_cap)?;
        a.lea(r15, qword_ptr(r14 + rax))?;
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 8)?;
        cfg_read(a)?;
        a.test(eax, 7)?;
        a.jnz(no_cap)?;
        a.lea(rbp, qword_ptr(r14 + rax))?;
        a.mov(rax, r15)?;
        print_hex(a, "vfio-msix: table at ")?;
        a.mov(rax, rbp)?;
        print_hex(a, ", PBA at ")?;
        print(a, "\n")?;
        // Vector 0 -> A, unmasked (the address as one 64-bit write);
        // vector 1 -> B, masked.
        a.mov(eax, MSI_ADDRESS)?;
        a.mov(qword_ptr(r15), rax)?;
        a.mov(dword_ptr(r15 + 8), MSIX_VECTOR_A)?;
        a.mov(dword_ptr(r15 + 12), 0)?;
        a.mov(dword_ptr(r15 + 16), MSI_ADDRESS as i32)?;
        a.mov(dword_ptr(r15 + 20), 0)?;
        a.mov(dword_ptr(r15 + 24), MSIX_VECTOR_B)?;
        a.mov(dword_ptr(r15 + 28), 1)?;
        // Enable MSI-X (control bit 15), function mask (bit 14) clear.
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        cfg_read(a)?;
        a.or(eax, 0x8000_0000u32 as i32)?;
        a.and(eax, 0xbfff_ffffu32 as i32)?;
        a.mov(ebx, eax)?;
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        cfg_write(a)?;
        a.mov(dword_ptr(r14 + REG_CONTROL), 1)?;
        a.mov(dword_ptr(r14 + REG_DOORBELL), 0)?;
        print(a, "vfio-msix: vector 0 rung\n")?;
        // Vector 1 is masked: its PBA bit sets instead.
        a.mov(dword_ptr(r14 + REG_DOORBELL), 1)?;
        a.mov(ecx, 1000)?;
        a.set_label(&mut poll)?;
        a.mov(eax, dword_ptr(rbp))?;
        a.test(eax, 2)?;
        a.jnz(pending)?;
        a.dec(ecx)?;
        a.jnz(poll)?;
        a.jmp(no_pba)?;
        a.set_label(&mut pending)?;
        print_hex(a, "vfio-msix: vector 1 masked, PBA ")?;
        print(a, "\n")?;
        // Wait for the host's go (it checks that B did not arrive).
        a.mov(r10d, 30_000)?;
        a.set_label(&mut wait)?;
        a.mov(rax, MSIX_GO_GPA)?;
        a.cmp(dword_ptr(rax), 1)?;
        a.je(go)?;
        a.mov(dx, crate::vm::vcpu::PORT_IDLE as u32)?;
        a.mov(eax, 1000)?;
        a.out(dx, eax)?;
        a.dec(r10d)?;
        a.jnz(wait)?;
        a.jmp(no_go)?;
        a.set_label(&mut go)?;
        a.mov(dword_ptr(r15 + 28), 0)?;
        a.mov(eax, dword_ptr(rbp))?;
        a.test(eax, 2)?;
        a.jnz(stuck)?;
        print_hex(a, "vfio-msix: vector 1 unmasked, PBA ")?;
        print(a, "\nvfio-msix: ok\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut no_cap)?;
        print(a, "vfio-msix: no MSI-X capability with its table in BAR0\n")?;
        exit_with(a, 10)?;
        a.set_label(&mut no_pba)?;
        print(a, "vfio-msix: the masked vector's PBA bit never set\n")?;
        exit_with(a, 11)?;
        a.set_label(&mut no_go)?;
        print(a, "vfio-msix: the host never said go\n")?;
        exit_with(a, 12)?;
        a.set_label(&mut stuck)?;
        print_hex(a, "vfio-msix: PBA still pending after unmask: ")?;
        print(a, "\n")?;
        exit_with(a, 13)
    })
}

/// `vfio-flr` (see the module docs).
pub fn vfio_flr() -> Result<GuestProgram, GuestError> {
    const MARK: i32 = 0x5eed_f00d;
    program("vfio-flr", |a| {
        let mut no_cap = a.create_label();
        let mut bad_scratch = a.create_label();
        let mut bit_set = a.create_label();
        let mut cmd_kept = a.create_label();
        let mut bar_kept = a.create_label();
        let mut not_reset = a.create_label();
        setup(a, "vfio-flr")?;
        a.mov(dword_ptr(r14 + REG_SCRATCH), MARK)?;
        a.mov(dword_ptr(r14 + REG_CONTROL), 1)?;
        a.cmp(dword_ptr(r14 + REG_SCRATCH), MARK)?;
        a.jne(bad_scratch)?;
        print(a, "vfio-flr: SCRATCH[0] and CONTROL written\n")?;
        // PCI Express (ID 0x10): r12d = its offset.
        find_capability(a, 0x10, no_cap)?;
        // DevCap (cap + 4) bit 28: FLR capable.
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 4)?;
        cfg_read(a)?;
        a.test(eax, 1 << 28)?;
        a.jz(no_cap)?;
        a.mov(eax, r12d)?;
        print_hex(a, "vfio-flr: PCI Express capability at ")?;
        print(a, ", FLR capable\n")?;
        // DevCtl (cap + 8) bit 15: initiate FLR (DevSta written as 0).
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 8)?;
        cfg_read(a)?;
        a.and(eax, 0xffff)?;
        a.or(eax, 0x8000)?;
        a.mov(ebx, eax)?;
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 8)?;
        cfg_write(a)?;
        a.mov(eax, r13d)?;
        a.or(eax, r12d)?;
        a.add(eax, 8)?;
        cfg_read(a)?;
        a.test(eax, 0x8000)?;
        a.jnz(bit_set)?;
        // Command register and BAR0 are back at 0.
        a.mov(eax, r13d)?;
        a.or(eax, 0x04)?;
        cfg_read(a)?;
        a.test(eax, 0xffff)?;
        a.jnz(cmd_kept)?;
        a.mov(eax, r13d)?;
        a.or(eax, 0x10)?;
        cfg_read(a)?;
        a.and(eax, -16i32)?;
        a.jnz(bar_kept)?;
        print(a, "vfio-flr: FLR done, command 0, BAR0 0\n")?;
        // Re-program BAR0 and memory decode.
        a.mov(eax, r13d)?;
        a.or(eax, 0x10)?;
        a.mov(ebx, r14d)?;
        cfg_write(a)?;
        a.mov(eax, r13d)?;
        a.or(eax, 0x04)?;
        a.mov(ebx, 0x2)?;
        cfg_write(a)?;
        a.mov(eax, dword_ptr(r14 + REG_ID))?;
        a.cmp(eax, ID as i32)?;
        a.jne(not_reset)?;
        a.mov(eax, dword_ptr(r14 + REG_SCRATCH))?;
        a.test(eax, eax)?;
        a.jnz(not_reset)?;
        a.mov(eax, dword_ptr(r14 + REG_CONTROL))?;
        a.test(eax, eax)?;
        a.jnz(not_reset)?;
        print(a, "vfio-flr: BAR0 re-programmed, SCRATCH[0] and CONTROL at reset value 0\nvfio-flr: ok\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut bad_scratch)?;
        print(a, "vfio-flr: SCRATCH[0] did not keep its value\n")?;
        exit_with(a, 5)?;
        a.set_label(&mut no_cap)?;
        print(a, "vfio-flr: no PCI Express capability advertising FLR\n")?;
        exit_with(a, 14)?;
        a.set_label(&mut bit_set)?;
        print_hex(a, "vfio-flr: DevCtl reads back with the FLR bit set: ")?;
        print(a, "\n")?;
        exit_with(a, 15)?;
        a.set_label(&mut cmd_kept)?;
        print_hex(a, "vfio-flr: command register after FLR ")?;
        print(a, "\n")?;
        exit_with(a, 16)?;
        a.set_label(&mut bar_kept)?;
        print_hex(a, "vfio-flr: BAR0 after FLR ")?;
        print(a, "\n")?;
        exit_with(a, 17)?;
        a.set_label(&mut not_reset)?;
        print_hex(a, "vfio-flr: register not at its reset value after FLR: ")?;
        print(a, "\n")?;
        exit_with(a, 18)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assemble() {
        assert!(!vfio_demo().unwrap().code.is_empty());
        assert!(!vfio_verify().unwrap().code.is_empty());
        assert!(!vfio_msix().unwrap().code.is_empty());
        assert!(!vfio_flr().unwrap().code.is_empty());
        assert_ne!(scratch_value(1, 0), scratch_value(2, 0));
        assert_ne!(scratch_value(1, 0), scratch_value(1, 1));
    }
}
