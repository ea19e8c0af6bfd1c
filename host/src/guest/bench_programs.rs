//! Guests for the migration benchmark: one that never touches its memory
//! and one that fills it with non-zero data once, then idles. Idling is
//! writes to the idle port, the CPL-3 `hlt`: the vCPU thread sleeps
//! instead of spinning on a host core.

use super::{asm::*, migrate_verify::for_each_memory_area, GuestError, GuestProgram};
use crate::vm::vcpu::PORT_IDLE;

/// Emit an idle loop that never ends: 1 ms naps on the idle port.
fn idle_forever(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut spin = a.create_label();
    a.mov(dx, PORT_IDLE as u32)?;
    a.mov(eax, 1000u32)?;
    a.set_label(&mut spin)?;
    a.out(dx, eax)?;
    a.jmp(spin)
}

/// `idle`: prints `idle: running` and idles until stopped.
pub fn idle() -> Result<GuestProgram, GuestError> {
    program("idle", |a| {
        print(a, "idle: running\n")?;
        idle_forever(a)
    })
}

/// `fill-idle`: writes a non-zero qword (its own address, inverted) at the
/// start of every page of guest RAM above
/// [`WORK_BASE`](super::migrate_verify::WORK_BASE) and of every
/// device region, prints `fill-idle: filled`, then idles until stopped.
pub fn fill_idle() -> Result<GuestProgram, GuestError> {
    program("fill-idle", |a| {
        let mut fill = a.create_label();
        a.mov(r15, rdi)?;
        for_each_memory_area(a, fill)?;
        print(a, "fill-idle: filled\n")?;
        idle_forever(a)?;

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
