//! Built-in guest programs (`program = "builtin:NAME"`), assembled with
//! iced-x86 at run time since dmhost ships no assembler toolchain.

use super::{asm::*, GuestError, GuestProgram, BOOT_INFO_ENTRIES, BOOT_INFO_MAGIC};

/// Names of the built-in programs.
pub const NAMES: &[&str] = &[
    "demo",
    "fill-idle",
    "hello",
    "hotplug",
    "idle",
    "memory-hotplug",
    "migrate-verify",
    "mmio-loop",
    "nvdimm-acpi",
    "vfio-demo",
    "vfio-flr",
    "vfio-msix",
    "vfio-verify",
];

/// The multiplier of the demo pattern (qword `i` holds `i * DEMO_MULT`).
pub const DEMO_MULT: u64 = 0x9E37_79B9_7F4A_7C15;

/// Build built-in program `name`.
pub fn builtin(name: &str) -> Result<GuestProgram, GuestError> {
    match name {
        "demo" => demo(),
        "hello" => hello(),
        "hotplug" => hotplug(),
        "mmio-loop" => mmio_loop(),
        "nvdimm-acpi" => super::acpi_programs::nvdimm_acpi(),
        "memory-hotplug" => super::acpi_programs::memory_hotplug(),
        "migrate-verify" => super::migrate_verify::program(),
        "idle" => super::bench_programs::idle(),
        "fill-idle" => super::bench_programs::fill_idle(),
        "vfio-demo" => super::vfio_programs::vfio_demo(),
        "vfio-verify" => super::vfio_programs::vfio_verify(),
        "vfio-msix" => super::vfio_programs::vfio_msix(),
        "vfio-flr" => super::vfio_programs::vfio_flr(),
        other => Err(GuestError::UnknownBuiltin(other.to_owned())),
    }
}

/// The checksum `builtin:demo` prints for a region of `size` bytes:
/// `h = rol(h, 5) ^ (i * DEMO_MULT)` over every qword `i`.
pub fn demo_checksum(size: u64) -> u64 {
    (0..size / 8).fold(0u64, |h, i| h.rotate_left(5) ^ i.wrapping_mul(DEMO_MULT))
}

/// `hello`: prints a line, exits 0.
pub fn hello() -> Result<GuestProgram, GuestError> {
    program("hello", |a| {
        print(a, "hello from the guest\n")?;
        exit_with(a, 0)
    })
}

/// Emit: find the first boot-info entry with a memory region; `r8` = its
/// GPA, `r9` = its size. Jumps to `none` when there is none. Expects the
/// boot-info page in `r15`. Clobbers `rbx`, `rcx`.
fn find_first_region(a: &mut CodeAssembler, none: CodeLabel) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut found = a.create_label();
    a.mov(ecx, dword_ptr(r15 + 0x14))?;
    a.lea(rbx, qword_ptr(r15 + BOOT_INFO_ENTRIES as i32))?;
    a.set_label(&mut next)?;
    a.test(ecx, ecx)?;
    a.jz(none)?;
    a.mov(r8, qword_ptr(rbx + 0x28))?;
    a.mov(r9, qword_ptr(rbx + 0x30))?;
    a.test(r9, r9)?;
    a.jnz(found)?;
    a.add(rbx, 0x40)?;
    a.dec(ecx)?;
    a.jmp(next)?;
    a.set_label(&mut found)?;
    Ok(())
}

/// `demo`: writes `i * DEMO_MULT` into every qword of the first device
/// region (pc-dimm in `examples/demo.toml`), reads it back, prints
/// `demo: checksum=0x...` ([`demo_checksum`]) and exits 0. Exit codes:
/// 2 no boot info, 3 no device region, 4 read-back mismatch.
pub fn demo() -> Result<GuestProgram, GuestError> {
    program("demo", |a| {
        let mut bad_magic = a.create_label();
        let mut no_region = a.create_label();
        let mut mismatch = a.create_label();
        let mut wloop = a.create_label();
        let mut rloop = a.create_label();
        a.mov(r15, rdi)?;
        a.cmp(dword_ptr(r15), BOOT_INFO_MAGIC as i32)?;
        a.jne(bad_magic)?;
        find_first_region(a, no_region)?;
        print(a, "demo: device region at 0x")?;
        a.mov(rax, r8)?;
        print_hex_rax(a)?;
        print(a, ", size 0x")?;
        a.mov(rax, r9)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        // Write the pattern.
        a.mov(r10, DEMO_MULT)?;
        a.mov(r11, r9)?;
        a.shr(r11, 3)?;
        a.xor(ecx, ecx)?;
        a.set_label(&mut wloop)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r10)?;
        a.mov(qword_ptr(r8 + rcx * 8), rax)?;
        a.inc(rcx)?;
        a.cmp(rcx, r11)?;
        a.jne(wloop)?;
        // Read it back into the checksum.
        a.xor(ecx, ecx)?;
        a.xor(r12d, r12d)?;
        a.set_label(&mut rloop)?;
        a.mov(rax, rcx)?;
        a.imul_2(rax, r10)?;
        a.mov(rdx, qword_ptr(r8 + rcx * 8))?;
        a.cmp(rdx, rax)?;
        a.jne(mismatch)?;
        a.rol(r12, 5u32)?;
        a.xor(r12, rdx)?;
        a.inc(rcx)?;
        a.cmp(rcx, r11)?;
        a.jne(rloop)?;
        print(a, "demo: checksum=0x")?;
        a.mov(rax, r12)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut bad_magic)?;
        print(a, "demo: no boot info\n")?;
        exit_with(a, 2)?;
        a.set_label(&mut no_region)?;
        print(a, "demo: no device with a memory region\n")?;
        exit_with(a, 3)?;
        a.set_label(&mut mismatch)?;
        print(a, "demo: read-back mismatch\n")?;
        exit_with(a, 4)
    })
}

/// `hotplug`: waits for the boot-info generation to change (a device was
/// plugged), checks that the newest device's region reads back what it
/// writes, prints `hotplug: region at 0x... works`, then waits for the next
/// change (the device was unplugged) and checks that the same address now
/// reads all ones (an MMIO exit nobody claims): prints
/// `hotplug: region gone, reads all ones` and exits 0. Exit codes: 6 no
/// region, 7 read-back mismatch, 8 the region still reads data.
pub fn hotplug() -> Result<GuestProgram, GuestError> {
    program("hotplug", |a| {
        let mut wait1 = a.create_label();
        let mut wait2 = a.create_label();
        let mut no_region = a.create_label();
        let mut mismatch = a.create_label();
        let mut stale = a.create_label();
        a.mov(r15, rdi)?;
        a.mov(r14d, dword_ptr(r15 + 0x10))?;
        print(a, "hotplug: waiting for a device\n")?;
        a.set_label(&mut wait1)?;
        a.pause()?;
        a.mov(eax, dword_ptr(r15 + 0x10))?;
        a.cmp(eax, r14d)?;
        a.je(wait1)?;
        a.mov(r14d, eax)?;
        // Newest entry: the last one.
        a.mov(ecx, dword_ptr(r15 + 0x14))?;
        a.test(ecx, ecx)?;
        a.jz(no_region)?;
        a.lea(eax, dword_ptr(rcx - 1))?;
        a.shl(rax, 6u32)?;
        a.lea(rbx, qword_ptr(r15 + rax + BOOT_INFO_ENTRIES as i32))?;
        a.mov(r8, qword_ptr(rbx + 0x28))?;
        a.mov(r9, qword_ptr(rbx + 0x30))?;
        a.test(r9, r9)?;
        a.jz(no_region)?;
        a.mov(rax, 0x1122_3344_5566_7788u64)?;
        a.mov(qword_ptr(r8), rax)?;
        a.mov(qword_ptr(r8 + r9 - 8), rax)?;
        a.cmp(qword_ptr(r8), rax)?;
        a.jne(mismatch)?;
        a.cmp(qword_ptr(r8 + r9 - 8), rax)?;
        a.jne(mismatch)?;
        print(a, "hotplug: region at 0x")?;
        a.mov(rax, r8)?;
        print_hex_rax(a)?;
        print(a, " works\n")?;
        a.set_label(&mut wait2)?;
        a.pause()?;
        a.mov(eax, dword_ptr(r15 + 0x10))?;
        a.cmp(eax, r14d)?;
        a.je(wait2)?;
        a.mov(rax, qword_ptr(r8))?;
        a.cmp(rax, -1)?;
        a.jne(stale)?;
        print(a, "hotplug: region gone, reads all ones\n")?;
        exit_with(a, 0)?;

        a.set_label(&mut no_region)?;
        print(a, "hotplug: no region\n")?;
        exit_with(a, 6)?;
        a.set_label(&mut mismatch)?;
        print(a, "hotplug: read-back mismatch\n")?;
        exit_with(a, 7)?;
        a.set_label(&mut stale)?;
        print(a, "hotplug: region still reads data after unplug\n")?;
        exit_with(a, 8)
    })
}

/// `mmio-loop`: `rcx` 32-bit MMIO writes to the address in `r8`, then exit 0
/// (set both through the config's `[regs]`).
pub fn mmio_loop() -> Result<GuestProgram, GuestError> {
    program("mmio-loop", |a| {
        let mut l = a.create_label();
        let mut done = a.create_label();
        a.test(rcx, rcx)?;
        a.jz(done)?;
        a.set_label(&mut l)?;
        a.mov(dword_ptr(r8), ecx)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        a.set_label(&mut done)?;
        exit_with(a, 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_assemble() {
        for name in NAMES {
            let p = builtin(name).unwrap();
            assert!(!p.code.is_empty(), "{name}");
        }
        assert!(matches!(builtin("nope"), Err(GuestError::UnknownBuiltin(_))));
    }

    #[test]
    fn checksum_is_stable() {
        assert_eq!(demo_checksum(0), 0);
        assert_eq!(demo_checksum(16), DEMO_MULT);
    }
}
