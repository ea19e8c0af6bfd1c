//! `migrate-verify`: a guest that keeps dirtying its memory and checks it,
//! so a migration that loses or corrupts a page is caught by the guest.
//!
//! The memory it uses is guest RAM above [`WORK_BASE`] and every device
//! region listed in the boot-info page. Round `r` writes, into the first
//! qword of every `M`-th page of each area (starting at page `r mod M`),
//! the value [`expected`]`(gpa, r)`; before overwriting it checks the value
//! that page got `M` rounds earlier. So every page is dirtied and verified
//! once every `M` rounds. A wrong value stops the VM with exit code 9 after
//! printing the address. After the configured rounds (plus `M` more, so the
//! last writes are verified too) it prints `migrate-verify: N rounds
//! verified` and exits 0.
//!
//! Registers (the config's `[regs]`): `r12` rounds (0 = 200), `r13` delay
//! loop iterations after each round (~0.3 ns each here), `r14` the stride
//! `M` (0 = 64). Dirty rate = area / M per round.

use super::{asm::*, GuestError, GuestProgram, BOOT_INFO_ENTRIES};

/// Guest RAM below this holds page tables, boot info, ACPI and the
/// program: the guest leaves it alone.
pub const WORK_BASE: u64 = 4 << 20;
const K_ADDR: u64 = 0x9E37_79B9_7F4A_7C15;
const K_ROUND: u64 = 0xD6E8_FEB8_6659_FD93;
/// Rounds when `r12` is 0.
pub const DEFAULT_ROUNDS: u64 = 200;
/// Stride `M` when `r14` is 0.
pub const DEFAULT_STRIDE: u64 = 64;

/// Emit calls of `routine` (`r8` = start, `r9` = size) for guest RAM above
/// [`WORK_BASE`] and for every device region in the boot-info page (in
/// `r15`). Clobbers `rbx` and `rsi` besides what `routine` does; `routine`
/// may clobber `rsi`.
pub fn for_each_memory_area(a: &mut CodeAssembler, routine: CodeLabel) -> Result<(), IcedError> {
    let mut no_ram = a.create_label();
    let mut dev_loop = a.create_label();
    let mut dev_done = a.create_label();
    a.mov(r8, WORK_BASE)?;
    a.mov(r9, qword_ptr(r15 + 0x08))?;
    a.cmp(r9, r8)?;
    a.jbe(no_ram)?;
    a.sub(r9, r8)?;
    a.call(routine)?;
    a.set_label(&mut no_ram)?;
    a.mov(ebx, dword_ptr(r15 + 0x14))?;
    a.lea(rsi, qword_ptr(r15 + BOOT_INFO_ENTRIES as i32))?;
    a.set_label(&mut dev_loop)?;
    a.test(ebx, ebx)?;
    a.jz(dev_done)?;
    a.mov(r8, qword_ptr(rsi + 0x28))?;
    a.mov(r9, qword_ptr(rsi + 0x30))?;
    a.push(rsi)?;
    a.call(routine)?;
    a.pop(rsi)?;
    a.add(rsi, 0x40)?;
    a.dec(ebx)?;
    a.jmp(dev_loop)?;
    a.set_label(&mut dev_done)?;
    // The caller's next instruction may carry a label of its own.
    a.nop()
}

/// The qword the guest keeps at `gpa` after `round`.
pub fn expected(gpa: u64, round: u64) -> u64 {
    gpa.wrapping_mul(K_ADDR).wrapping_add(round.wrapping_mul(K_ROUND))
}

pub fn program() -> Result<GuestProgram, GuestError> {
    super::asm::program("migrate-verify", |a| {
        let mut pass = a.create_label();
        let mut round_loop = a.create_label();
        let mut delay = a.create_label();
        let mut delay_done = a.create_label();
        let mut no_print = a.create_label();
        let mut rounds_set = a.create_label();
        let mut bad = a.create_label();

        // Setup: r15 boot info, rbp round, r12 last round (+1 for the
        // final check), r10/r11 constants.
        a.mov(r15, rdi)?;
        a.test(r12, r12)?;
        a.jnz(rounds_set)?;
        a.mov(r12, DEFAULT_ROUNDS)?;
        a.set_label(&mut rounds_set)?;
        let mut stride_set = a.create_label();
        a.test(r14, r14)?;
        a.jnz(stride_set)?;
        a.mov(r14, DEFAULT_STRIDE)?;
        a.set_label(&mut stride_set)?;
        a.add(r12, r14)?;
        a.mov(ebp, 1u32)?;
        print(a, "migrate-verify: start\n")?;

        a.set_label(&mut round_loop)?;
        a.mov(r10, K_ADDR)?;
        a.mov(r11, K_ROUND)?;
        for_each_memory_area(a, pass)?;
        // Throttle.
        a.mov(rcx, r13)?;
        a.set_label(&mut delay)?;
        a.test(rcx, rcx)?;
        a.jz(delay_done)?;
        a.dec(rcx)?;
        a.jmp(delay)?;
        a.set_label(&mut delay_done)?;
        // Progress every 16 rounds.
        a.test(ebp, 15u32)?;
        a.jnz(no_print)?;
        print(a, "migrate-verify: round 0x")?;
        a.mov(rax, rbp)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        a.set_label(&mut no_print)?;
        a.inc(rbp)?;
        a.cmp(rbp, r12)?;
        a.jbe(round_loop)?;
        print(a, "migrate-verify: 0x")?;
        a.mov(rax, r12)?;
        a.sub(rax, r14)?;
        print_hex_rax(a)?;
        print(a, " rounds verified\n")?;
        exit_with(a, 0)?;

        // pass(r8 = start, r9 = size): pages rbp mod M, M+..., of the area:
        // check round rbp-M (when there was one), write round rbp.
        let mut ploop = a.create_label();
        let mut pdone = a.create_label();
        let mut skip = a.create_label();
        a.set_label(&mut pass)?;
        a.lea(rsi, qword_ptr(r8 + r9))?;
        a.mov(rax, rbp)?;
        a.xor(edx, edx)?;
        a.div(r14)?;
        a.shl(rdx, 12u32)?;
        a.lea(rdi, qword_ptr(r8 + rdx))?;
        a.mov(r9, r14)?;
        a.shl(r9, 12u32)?;
        a.set_label(&mut ploop)?;
        a.cmp(rdi, rsi)?;
        a.jae(pdone)?;
        a.mov(rax, rdi)?;
        a.imul_2(rax, r10)?;
        a.mov(rdx, rbp)?;
        a.imul_2(rdx, r11)?;
        a.add(rax, rdx)?;
        a.cmp(rbp, r14)?;
        a.jbe(skip)?;
        a.mov(rcx, rbp)?;
        a.sub(rcx, r14)?;
        a.imul_2(rcx, r11)?;
        a.mov(rdx, rdi)?;
        a.imul_2(rdx, r10)?;
        a.add(rcx, rdx)?;
        a.cmp(qword_ptr(rdi), rcx)?;
        a.jne(bad)?;
        a.set_label(&mut skip)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rdi, r9)?;
        a.jmp(ploop)?;
        a.set_label(&mut pdone)?;
        a.ret()?;

        a.set_label(&mut bad)?;
        a.mov(r13, rdi)?;
        print(a, "migrate-verify: MISMATCH at 0x")?;
        a.mov(rax, r13)?;
        print_hex_rax(a)?;
        print(a, " in round 0x")?;
        a.mov(rax, rbp)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        exit_with(a, 9)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_and_pattern_changes_per_round() {
        assert!(!program().unwrap().code.is_empty());
        assert_ne!(expected(0x40_0000, 1), expected(0x40_0000, 2));
        assert_ne!(expected(0x40_0000, 1), expected(0x40_1000, 1));
        assert_eq!(expected(0x40_0000, 66).wrapping_sub(64u64.wrapping_mul(K_ROUND)), expected(0x40_0000, 2));
    }
}
