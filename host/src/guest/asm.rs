//! Helpers for writing guest programs with iced-x86's assembler: serial
//! output, exit, and assembling at [`CODE_GPA`](super::CODE_GPA).

pub use iced_x86::code_asm::*;

use super::{GuestError, GuestProgram, CODE_GPA};
use crate::vm::vcpu::{PORT_EXIT, PORT_SERIAL};

/// A 64-bit assembler.
pub fn assembler() -> CodeAssembler {
    // 64 is a valid bitness, so this cannot fail.
    CodeAssembler::new(64).unwrap_or_else(|_| unreachable!("64-bit assembler"))
}

/// Assemble `build`'s code at [`CODE_GPA`] into a program named `name`.
pub fn program(
    name: &str,
    build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<GuestProgram, GuestError> {
    let mut a = assembler();
    let err = |e: IcedError| GuestError::Assemble { name: name.to_owned(), message: e.to_string() };
    build(&mut a).map_err(err)?;
    let code = a.assemble(CODE_GPA).map_err(err)?;
    Ok(GuestProgram { name: name.to_owned(), code })
}

/// Print `s` on the serial port. Clobbers `al`, `dx`.
pub fn print(a: &mut CodeAssembler, s: &str) -> Result<(), IcedError> {
    a.mov(dx, PORT_SERIAL as u32)?;
    for &b in s.as_bytes() {
        a.mov(al, b as u32)?;
        a.out(dx, al)?;
    }
    Ok(())
}

/// Print `rax` as 16 hex digits. Clobbers `rax`, `rcx`, `rdx`, `r11`.
pub fn print_hex_rax(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut next = a.create_label();
    let mut digit = a.create_label();
    a.mov(r11, rax)?;
    a.mov(ecx, 16u32)?;
    a.mov(dx, PORT_SERIAL as u32)?;
    a.set_label(&mut next)?;
    a.rol(r11, 4u32)?;
    a.mov(eax, r11d)?;
    a.and(eax, 0xfu32)?;
    a.cmp(eax, 10u32)?;
    a.jb(digit)?;
    a.add(eax, (b'a' - 10 - b'0') as u32)?;
    a.set_label(&mut digit)?;
    a.add(eax, b'0' as u32)?;
    a.out(dx, al)?;
    a.dec(ecx)?;
    a.jnz(next)?;
    Ok(())
}

/// Stop the VM with exit code `code`.
pub fn exit_with(a: &mut CodeAssembler, code: u32) -> Result<(), IcedError> {
    a.mov(eax, code)?;
    exit_with_eax(a)
}

/// Stop the VM with `eax` as the exit code.
pub fn exit_with_eax(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, PORT_EXIT as u32)?;
    a.out(dx, eax)
}
