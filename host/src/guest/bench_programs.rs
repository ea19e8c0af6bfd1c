//! Guests for the migration benchmark: one that never touches its memory
//! and one that fills it with non-zero data once, then idles.

use super::{asm::*, migrate_verify::WORK_BASE, GuestError, GuestProgram, BOOT_INFO_ENTRIES};

/// `idle`: prints `idle: running` and spins (`pause`) until stopped.
pub fn idle() -> Result<GuestProgram, GuestError> {
    program("idle", |a| {
        let mut spin = a.create_label();
        print(a, "idle: running\n")?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)
    })
}

/// `fill-idle`: writes a non-zero qword (its own address, inverted) at the
/// start of every page of guest RAM above [`WORK_BASE`] and of every
/// device region, prints `fill-idle: filled`, then spins until stopped.
pub fn fill_idle() -> Result<GuestProgram, GuestError> {
    program("fill-idle", |a| {
        let mut fill = a.create_label();
        let mut dev_loop = a.create_label();
        let mut dev_done = a.create_label();
        let mut no_ram = a.create_label();
        let mut spin = a.create_label();
        a.mov(r15, rdi)?;
        a.mov(r8, WORK_BASE)?;
        a.mov(r9, qword_ptr(r15 + 0x08))?;
        a.cmp(r9, r8)?;
        a.jbe(no_ram)?;
        a.sub(r9, r8)?;
        a.call(fill)?;
        a.set_label(&mut no_ram)?;
        a.mov(ebx, dword_ptr(r15 + 0x14))?;
        a.lea(rsi, qword_ptr(r15 + BOOT_INFO_ENTRIES as i32))?;
        a.set_label(&mut dev_loop)?;
        a.test(ebx, ebx)?;
        a.jz(dev_done)?;
        a.mov(r8, qword_ptr(rsi + 0x28))?;
        a.mov(r9, qword_ptr(rsi + 0x30))?;
        a.call(fill)?;
        a.add(rsi, 0x40)?;
        a.dec(ebx)?;
        a.jmp(dev_loop)?;
        a.set_label(&mut dev_done)?;
        print(a, "fill-idle: filled\n")?;
        a.set_label(&mut spin)?;
        a.pause()?;
        a.jmp(spin)?;

        // fill(r8 = start, r9 = size); clobbers rax, rcx, rdi.
        let mut l = a.create_label();
        let mut done = a.create_label();
        a.set_label(&mut fill)?;
        a.lea(rcx, qword_ptr(r8 + r9))?;
        a.mov(rdi, r8)?;
        a.set_label(&mut l)?;
        a.cmp(rdi, rcx)?;
        a.jae(done)?;
        a.mov(rax, rdi)?;
        a.not(rax)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.add(rdi, 4096)?;
        a.jmp(l)?;
        a.set_label(&mut done)?;
        a.ret()
    })
}
