//! Built-in guest programs that use the host's ACPI: `nvdimm-acpi` (finds
//! the RSDP by scanning, walks XSDT → NFIT, uses DIMM 0's persistent
//! memory and runs the `_DSM` label protocol on the DSM page) and
//! `memory-hotplug` (watches the ACPI memory hotplug registers).
//!
//! They cannot run AML (CPL 3, no interpreter), so they do what the AML
//! does: `NCAL`'s page writes and doorbell, `MSTA`/`MCRS`'s register reads.

use super::{
    asm::*, GuestError, GuestProgram, ACPI_END, ACPI_GPA, BOOT_INFO_DSM_PAGE, BOOT_INFO_MAGIC,
    BOOT_INFO_MHP_PORT, BOOT_INFO_MHP_SLOTS, BOOT_INFO_RSDP,
};

/// `r12` at entry selects what `nvdimm-acpi` does.
pub const MODE_FULL: u64 = 0;
/// Write `r13` to the first pmem qword and a label block derived from
/// `r13`, read it back (run 1 of the persistence test).
pub const MODE_PERSIST_WRITE: u64 = 1;
/// Check what [`MODE_PERSIST_WRITE`] wrote with the same `r13` (run 2).
pub const MODE_PERSIST_VERIFY: u64 = 2;
/// `r13` Get Namespace Label Size calls, then exit 0 (timing).
pub const MODE_BENCH: u64 = 3;

/// Where the label block goes in the label area, and its size.
pub const LABEL_OFFSET: u32 = 0x100;
pub const LABEL_BLOCK: u32 = 256;
/// Label block qword `j` is `seed ^ (j * LABEL_MULT)`.
pub const LABEL_MULT: u64 = 0x9E37_79B9_7F4A_7C15;

const DOORBELL: u16 = 0x0a18;
/// NFIT SPA range index of slot 0 (QEMU `nvdimm_slot_to_spa_index(0)`).
const SPA_INDEX_SLOT0: u32 = 2;

/// Failure exits, emitted at the end of the program.
struct Fails(Vec<(CodeLabel, u32, &'static str)>);

impl Fails {
    fn get(&mut self, a: &mut CodeAssembler, code: u32, msg: &'static str) -> CodeLabel {
        if let Some((l, _, _)) = self.0.iter().find(|(_, c, _)| *c == code) {
            return *l;
        }
        let l = a.create_label();
        self.0.push((l, code, msg));
        l
    }

    fn emit(self, a: &mut CodeAssembler, prefix: &str) -> Result<(), IcedError> {
        for (mut l, code, msg) in self.0 {
            a.set_label(&mut l)?;
            print(a, &format!("{prefix}: FAIL {msg}\n"))?;
            exit_with(a, code)?;
        }
        Ok(())
    }
}

/// `checksum`: `al` = byte sum of `rcx` (> 0) bytes at `rdi`. Clobbers rdi, rcx.
fn emit_checksum(a: &mut CodeAssembler, entry: &mut CodeLabel) -> Result<(), IcedError> {
    let mut l = a.create_label();
    a.set_label(entry)?;
    a.xor(eax, eax)?;
    a.set_label(&mut l)?;
    a.add(al, byte_ptr(rdi))?;
    a.inc(rdi)?;
    a.dec(rcx)?;
    a.jnz(l)?;
    a.ret()
}

/// `dsm`: one `_DSM` call, function in `eax`, handle `ebx`, page `r14`:
/// write the request header, ring the doorbell with the page address;
/// returns the status word in `eax`. Clobbers `edx`.
fn emit_dsm(a: &mut CodeAssembler, entry: &mut CodeLabel) -> Result<(), IcedError> {
    a.set_label(entry)?;
    a.mov(dword_ptr(r14), ebx)?;
    a.mov(dword_ptr(r14 + 4), 1u32)?;
    a.mov(dword_ptr(r14 + 8), eax)?;
    a.mov(dx, DOORBELL as u32)?;
    a.mov(eax, r14d)?;
    a.out(dx, eax)?;
    a.mov(eax, dword_ptr(r14 + 4))?;
    a.ret()
}

/// Arg3 of Get/Set Namespace Label Data: `{offset, length}` at page+12.
fn set_rw_args(a: &mut CodeAssembler, offset: u32, length: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(r14 + 12), offset)?;
    a.mov(dword_ptr(r14 + 16), length)
}

/// `rax` = label qword `rcx` for seed `r13`. Clobbers rdx.
fn pattern(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(rdx, LABEL_MULT)?;
    a.mov(rax, rcx)?;
    a.imul_2(rax, rdx)?;
    a.xor(rax, r13)
}

/// Set Namespace Label Data of the pattern block; status must be 0.
fn write_label(a: &mut CodeAssembler, dsm: CodeLabel, fail: CodeLabel) -> Result<(), IcedError> {
    let mut fill = a.create_label();
    set_rw_args(a, LABEL_OFFSET, LABEL_BLOCK)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    pattern(a)?;
    a.mov(qword_ptr(r14 + rcx * 8 + 20), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, LABEL_BLOCK / 8)?;
    a.jne(fill)?;
    a.mov(eax, 6u32)?;
    a.call(dsm)?;
    a.test(eax, eax)?;
    a.jnz(fail)
}

/// Get Namespace Label Data of the block and compare it with the pattern.
fn verify_label(a: &mut CodeAssembler, dsm: CodeLabel, fail: CodeLabel) -> Result<(), IcedError> {
    let mut clear = a.create_label();
    let mut cmp = a.create_label();
    // Poison the reply area first so a reply that never came cannot pass.
    a.xor(ecx, ecx)?;
    a.mov(rax, 0x5a5a_5a5a_5a5a_5a5au64)?;
    a.set_label(&mut clear)?;
    a.mov(qword_ptr(r14 + rcx * 8 + 8), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, LABEL_BLOCK / 8 + 1)?;
    a.jne(clear)?;
    set_rw_args(a, LABEL_OFFSET, LABEL_BLOCK)?;
    a.mov(eax, 5u32)?;
    a.call(dsm)?;
    a.test(eax, eax)?;
    a.jnz(fail)?;
    a.cmp(dword_ptr(r14), 8 + LABEL_BLOCK)?;
    a.jne(fail)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut cmp)?;
    pattern(a)?;
    a.cmp(qword_ptr(r14 + rcx * 8 + 8), rax)?;
    a.jne(fail)?;
    a.inc(ecx)?;
    a.cmp(ecx, LABEL_BLOCK / 8)?;
    a.jne(cmp)
}

/// Function 5 or 6 with `{offset, length}` must answer status 3.
fn expect_invalid(
    a: &mut CodeAssembler,
    dsm: CodeLabel,
    function: u32,
    offset: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    length: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
    fail: CodeLabel,
) -> Result<(), IcedError> {
    offset(a)?;
    length(a)?;
    a.mov(eax, function)?;
    a.call(dsm)?;
    a.cmp(eax, 3u32)?;
    a.jne(fail)
}

/// `nvdimm-acpi`; see the module docs and [`MODE_FULL`]..[`MODE_BENCH`].
/// Prints `nvdimm-acpi: ok` (full), `label written`, `label verified` or
/// `bench done` and exits 0; on a mismatch prints `nvdimm-acpi: FAIL ...`
/// and exits with a code from 2 to 31.
pub fn nvdimm_acpi() -> Result<GuestProgram, GuestError> {
    program("nvdimm-acpi", |a| {
        let mut f = Fails(Vec::new());
        let mut checksum = a.create_label();
        let mut dsm = a.create_label();
        let mut scan = a.create_label();
        let mut next = a.create_label();
        let mut found = a.create_label();
        let mut xsdt_loop = a.create_label();
        let mut got_nfit = a.create_label();
        let mut walk = a.create_label();
        let mut not_spa = a.create_label();
        let mut not_memdev = a.create_label();
        let mut walked = a.create_label();
        let mut full = a.create_label();
        let mut persist_write = a.create_label();
        let mut persist_verify = a.create_label();
        let mut bench = a.create_label();

        a.mov(r15, rdi)?;
        let bad_magic = f.get(a, 2, "no boot info");
        a.cmp(dword_ptr(r15), BOOT_INFO_MAGIC as i32)?;
        a.jne(bad_magic)?;

        // 1. The RSDP: "RSD PTR " on a 16-byte boundary in 0xE0000..0xFFFFF,
        //    with valid 20-byte and extended checksums.
        let no_rsdp = f.get(a, 10, "no RSDP in 0xE0000..0xFFFFF");
        a.mov(rsi, ACPI_GPA)?;
        a.set_label(&mut scan)?;
        a.mov(rax, u64::from_le_bytes(*b"RSD PTR "))?;
        a.cmp(qword_ptr(rsi), rax)?;
        a.jne(next)?;
        a.mov(rdi, rsi)?;
        a.mov(ecx, 20u32)?;
        a.call(checksum)?;
        a.test(al, al)?;
        a.jnz(next)?;
        a.mov(ecx, dword_ptr(rsi + 20))?;
        a.cmp(ecx, 36u32)?;
        a.jb(next)?;
        a.mov(rdi, rsi)?;
        a.call(checksum)?;
        a.test(al, al)?;
        a.jz(found)?;
        a.set_label(&mut next)?;
        a.add(rsi, 16)?;
        a.cmp(rsi, ACPI_END as i32)?;
        a.jb(scan)?;
        a.jmp(no_rsdp)?;
        a.set_label(&mut found)?;
        let mismatch = f.get(a, 11, "the RSDP found differs from the boot-info pointer");
        a.cmp(rsi, qword_ptr(r15 + BOOT_INFO_RSDP as i32))?;
        a.jne(mismatch)?;
        print(a, "nvdimm-acpi: RSDP at 0x")?;
        a.mov(rax, rsi)?;
        print_hex_rax(a)?;
        print(a, "\n")?;

        // 2. XSDT (checked), then its entry whose signature is NFIT (checked).
        let bad_xsdt = f.get(a, 12, "bad XSDT");
        a.mov(r10, qword_ptr(rsi + 24))?;
        a.cmp(dword_ptr(r10), u32::from_le_bytes(*b"XSDT") as i32)?;
        a.jne(bad_xsdt)?;
        a.mov(ecx, dword_ptr(r10 + 4))?;
        a.cmp(ecx, 36u32)?;
        a.jb(bad_xsdt)?;
        a.lea(rbp, qword_ptr(r10 + rcx))?;
        a.mov(rdi, r10)?;
        a.call(checksum)?;
        a.test(al, al)?;
        a.jnz(bad_xsdt)?;
        let no_nfit = f.get(a, 13, "no valid NFIT in the XSDT");
        a.lea(r11, qword_ptr(r10 + 36))?;
        a.set_label(&mut xsdt_loop)?;
        a.cmp(r11, rbp)?;
        a.jae(no_nfit)?;
        a.mov(rdi, qword_ptr(r11))?;
        a.add(r11, 8)?;
        a.cmp(dword_ptr(rdi), u32::from_le_bytes(*b"NFIT") as i32)?;
        a.jne(xsdt_loop)?;
        a.set_label(&mut got_nfit)?;
        a.mov(r10, rdi)?;
        a.mov(ecx, dword_ptr(r10 + 4))?;
        a.cmp(ecx, 40u32)?;
        a.jb(no_nfit)?;
        a.lea(rbp, qword_ptr(r10 + rcx))?;
        a.call(checksum)?;
        a.test(al, al)?;
        a.jnz(no_nfit)?;

        // 3. Walk the sub-structures: SPA range of slot 0 (r8 base, r9
        //    length) and the memory device mapped to it (ebx handle).
        let bad_nfit = f.get(a, 14, "NFIT has no SPA range / memory device for DIMM 0");
        a.xor(r8d, r8d)?;
        a.xor(r9d, r9d)?;
        a.xor(ebx, ebx)?;
        a.lea(r11, qword_ptr(r10 + 40))?;
        a.set_label(&mut walk)?;
        a.lea(rax, qword_ptr(r11 + 4))?;
        a.cmp(rax, rbp)?;
        a.ja(walked)?;
        a.movzx(eax, word_ptr(r11))?;
        a.movzx(ecx, word_ptr(r11 + 2))?;
        a.cmp(ecx, 4u32)?;
        a.jb(bad_nfit)?;
        a.cmp(eax, 0u32)?;
        a.jne(not_spa)?;
        a.cmp(word_ptr(r11 + 4), SPA_INDEX_SLOT0 as i32)?;
        a.jne(not_spa)?;
        a.mov(r8, qword_ptr(r11 + 32))?;
        a.mov(r9, qword_ptr(r11 + 40))?;
        a.set_label(&mut not_spa)?;
        a.cmp(eax, 1u32)?;
        a.jne(not_memdev)?;
        a.cmp(word_ptr(r11 + 12), SPA_INDEX_SLOT0 as i32)?;
        a.jne(not_memdev)?;
        a.mov(ebx, dword_ptr(r11 + 4))?;
        a.set_label(&mut not_memdev)?;
        a.add(r11, rcx)?;
        a.jmp(walk)?;
        a.set_label(&mut walked)?;
        a.test(r9, r9)?;
        a.jz(bad_nfit)?;
        a.test(ebx, ebx)?;
        a.jz(bad_nfit)?;
        print(a, "nvdimm-acpi: DIMM 0 at 0x")?;
        a.mov(rax, r8)?;
        print_hex_rax(a)?;
        print(a, " size 0x")?;
        a.mov(rax, r9)?;
        print_hex_rax(a)?;
        print(a, " handle 0x")?;
        a.mov(eax, ebx)?;
        print_hex_rax(a)?;
        print(a, "\n")?;

        // The DSM page: a real guest reads it from NVDR's MEMA; this one
        // from the boot-info page.
        let no_page = f.get(a, 15, "no DSM page in the boot info");
        a.mov(r14, qword_ptr(r15 + BOOT_INFO_DSM_PAGE as i32))?;
        a.test(r14, r14)?;
        a.jz(no_page)?;

        a.cmp(r12, MODE_PERSIST_WRITE as i32)?;
        a.je(persist_write)?;
        a.cmp(r12, MODE_PERSIST_VERIFY as i32)?;
        a.je(persist_verify)?;
        a.cmp(r12, MODE_BENCH as i32)?;
        a.je(bench)?;

        // 4. Full: persistent memory, then the label protocol.
        a.set_label(&mut full)?;
        {
            let mut w = a.create_label();
            let mut r = a.create_label();
            let pmem_bad = f.get(a, 16, "persistent memory read-back mismatch");
            a.mov(rdx, LABEL_MULT)?;
            a.xor(ecx, ecx)?;
            a.set_label(&mut w)?;
            a.mov(rax, rcx)?;
            a.xor(rax, rdx)?;
            a.mov(qword_ptr(r8 + rcx), rax)?;
            a.mov(qword_ptr(r8 + rcx + 4088), rax)?;
            a.add(rcx, 4096)?;
            a.cmp(rcx, r9)?;
            a.jb(w)?;
            a.xor(ecx, ecx)?;
            a.set_label(&mut r)?;
            a.mov(rax, rcx)?;
            a.xor(rax, rdx)?;
            a.cmp(qword_ptr(r8 + rcx), rax)?;
            a.jne(pmem_bad)?;
            a.cmp(qword_ptr(r8 + rcx + 4088), rax)?;
            a.jne(pmem_bad)?;
            a.add(rcx, 4096)?;
            a.cmp(rcx, r9)?;
            a.jb(r)?;
            print(a, "nvdimm-acpi: pmem write/read ok\n")?;
        }
        let f4 = f.get(a, 20, "Get Namespace Label Size");
        a.mov(eax, 4u32)?;
        a.call(dsm)?;
        a.test(eax, eax)?;
        a.jnz(f4)?;
        a.cmp(dword_ptr(r14), 16u32)?;
        a.jne(f4)?;
        a.mov(ebp, dword_ptr(r14 + 8))?;
        a.mov(r10d, dword_ptr(r14 + 12))?;
        a.cmp(ebp, LABEL_OFFSET + LABEL_BLOCK)?;
        a.jb(f4)?;
        print(a, "nvdimm-acpi: label size 0x")?;
        a.mov(eax, ebp)?;
        print_hex_rax(a)?;
        print(a, " max xfer 0x")?;
        a.mov(eax, r10d)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        let f6 = f.get(a, 21, "Set Namespace Label Data");
        write_label(a, dsm, f6)?;
        let f5 = f.get(a, 22, "Get Namespace Label Data read-back");
        verify_label(a, dsm, f5)?;
        print(a, "nvdimm-acpi: label write/read ok\n")?;
        // Out of bounds: each must be status 3 (invalid input).
        let past = f.get(a, 23, "offset past the label area not refused");
        expect_invalid(
            a,
            dsm,
            5,
            |a| a.mov(dword_ptr(r14 + 12), ebp),
            |a| a.mov(dword_ptr(r14 + 16), 8u32),
            past,
        )?;
        let wrap = f.get(a, 24, "offset+length overflow not refused");
        expect_invalid(
            a,
            dsm,
            5,
            |a| a.mov(dword_ptr(r14 + 12), 0xffff_fff0u32),
            |a| a.mov(dword_ptr(r14 + 16), 0x20u32),
            wrap,
        )?;
        let long = f.get(a, 25, "length above the max transfer not refused");
        expect_invalid(
            a,
            dsm,
            5,
            |a| a.mov(dword_ptr(r14 + 12), 0u32),
            |a| {
                a.lea(eax, dword_ptr(r10 + 1))?;
                a.mov(dword_ptr(r14 + 16), eax)
            },
            long,
        )?;
        let wpast = f.get(a, 26, "write across the end of the label area not refused");
        expect_invalid(
            a,
            dsm,
            6,
            |a| {
                a.lea(eax, dword_ptr(rbp - 4))?;
                a.mov(dword_ptr(r14 + 12), eax)
            },
            |a| a.mov(dword_ptr(r14 + 16), 8u32),
            wpast,
        )?;
        print(a, "nvdimm-acpi: out-of-bounds requests refused with status 3\n")?;
        print(a, "nvdimm-acpi: ok\n")?;
        exit_with(a, 0)?;

        // Persistence, run 1: pmem qword and label block from the seed.
        a.set_label(&mut persist_write)?;
        a.mov(qword_ptr(r8), r13)?;
        let pw = f.get(a, 21, "Set Namespace Label Data");
        write_label(a, dsm, pw)?;
        let pr = f.get(a, 22, "Get Namespace Label Data read-back");
        verify_label(a, dsm, pr)?;
        print(a, "nvdimm-acpi: label written\n")?;
        exit_with(a, 0)?;

        // Persistence, run 2: both must be what run 1 left.
        a.set_label(&mut persist_verify)?;
        let pm = f.get(a, 30, "pmem lost the previous run's data");
        a.cmp(qword_ptr(r8), r13)?;
        a.jne(pm)?;
        let lm = f.get(a, 31, "label area lost the previous run's block");
        verify_label(a, dsm, lm)?;
        print(a, "nvdimm-acpi: label verified\n")?;
        exit_with(a, 0)?;

        // Timing: r13 calls of function 4.
        a.set_label(&mut bench)?;
        {
            let mut l = a.create_label();
            let mut done = a.create_label();
            let bad = f.get(a, 20, "Get Namespace Label Size");
            a.test(r13, r13)?;
            a.jz(done)?;
            a.set_label(&mut l)?;
            a.mov(eax, 4u32)?;
            a.call(dsm)?;
            a.test(eax, eax)?;
            a.jnz(bad)?;
            a.dec(r13)?;
            a.jnz(l)?;
            a.set_label(&mut done)?;
            print(a, "nvdimm-acpi: bench done\n")?;
            exit_with(a, 0)?;
        }

        emit_checksum(a, &mut checksum)?;
        emit_dsm(a, &mut dsm)?;
        f.emit(a, "nvdimm-acpi")
    })
}

/// `memory-hotplug`: waits for the ACPI GED's memory event (as an OS's
/// `_EVT` would on the GED interrupt: reading the GED register returns and
/// clears the events) and prints `mhp: GED events 0x..`, finds the first
/// enabled slot through the ACPI memory hotplug registers, prints
/// `mhp: slot N status 0x.. base 0x.. size 0x..`, clears the insert event
/// (checks it is cleared), with `r9 = 1` requests ejection itself (the
/// `_EJ0` bit), waits for the next GED memory event (the device was
/// unplugged), prints the same slot again and exits 0 when it is no longer enabled. Exit codes: 40 no hotplug interface, 41 no enabled
/// slot, 42 insert event not cleared, 43 slot still enabled.
pub fn memory_hotplug() -> Result<GuestProgram, GuestError> {
    program("memory-hotplug", |a| {
        let mut f = Fails(Vec::new());
        let mut report = a.create_label();
        let mut ged = a.create_label();
        let mut wait1 = a.create_label();
        let mut wait2 = a.create_label();
        let mut find = a.create_label();
        let mut found = a.create_label();
        a.mov(r15, rdi)?;
        let none = f.get(a, 40, "no memory hotplug interface in the boot info");
        a.movzx(esi, word_ptr(r15 + BOOT_INFO_MHP_PORT as i32))?;
        a.test(esi, esi)?;
        a.jz(none)?;
        a.movzx(edi, word_ptr(r15 + BOOT_INFO_MHP_SLOTS as i32))?;
        print(a, "mhp: waiting for a DIMM\n")?;
        a.set_label(&mut wait1)?;
        a.call(ged)?;
        a.jz(wait1)?;
        // First enabled slot (MSTA's loop).
        let no_slot = f.get(a, 41, "no enabled slot after the plug");
        a.xor(r12d, r12d)?;
        a.set_label(&mut find)?;
        a.cmp(r12d, edi)?;
        a.jae(no_slot)?;
        a.mov(edx, esi)?;
        a.mov(eax, r12d)?;
        a.out(dx, eax)?;
        a.add(edx, 0x14u32)?;
        a.in_(al, dx)?;
        a.test(al, 1u32)?;
        a.jnz(found)?;
        a.inc(r12d)?;
        a.jmp(find)?;
        a.set_label(&mut found)?;
        a.call(report)?;
        // Clear the insert event: status must read enabled only.
        let stuck = f.get(a, 42, "insert event not cleared");
        a.lea(edx, dword_ptr(rsi + 0x14))?;
        a.mov(al, 2u32)?;
        a.out(dx, al)?;
        a.in_(al, dx)?;
        a.cmp(al, 1u32)?;
        a.jne(stuck)?;
        print(a, "mhp: insert event cleared\n")?;
        // r9 = 1: the guest ejects the DIMM itself (_EJ0: flags bit 3).
        a.test(r9, r9)?;
        a.jz(wait2)?;
        print(a, "mhp: ejecting\n")?;
        a.lea(edx, dword_ptr(rsi + 0x14))?;
        a.mov(al, 8u32)?;
        a.out(dx, al)?;
        a.set_label(&mut wait2)?;
        a.call(ged)?;
        a.jz(wait2)?;
        a.call(report)?;
        let still = f.get(a, 43, "slot still enabled after the unplug");
        a.test(r13b, 1u32)?;
        a.jnz(still)?;
        exit_with(a, 0)?;

        // ged: read (and so clear) the GED events; with the memory event,
        // print them and return NZ, else pause and return ZF set.
        let mut ged_none = a.create_label();
        a.set_label(&mut ged)?;
        a.mov(edx, u32::from(crate::acpi_host::ged::GED_PORT))?;
        a.in_(eax, dx)?;
        a.test(eax, crate::acpi_host::ged::EVT_MEMORY)?;
        a.jz(ged_none)?;
        a.mov(r14d, eax)?;
        print(a, "mhp: GED events 0x")?;
        a.mov(eax, r14d)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        a.test(r14d, crate::acpi_host::ged::EVT_MEMORY)?;
        a.ret()?;
        a.set_label(&mut ged_none)?;
        a.pause()?;
        a.ret()?;

        // report: select slot r12d, read flags (r13), base (rbx), size (rbp), print.
        a.set_label(&mut report)?;
        a.mov(edx, esi)?;
        a.mov(eax, r12d)?;
        a.out(dx, eax)?;
        a.lea(edx, dword_ptr(rsi + 0x14))?;
        a.in_(al, dx)?;
        a.movzx(r13d, al)?;
        a.lea(edx, dword_ptr(rsi + 4))?;
        a.in_(eax, dx)?;
        a.mov(ebx, eax)?;
        a.shl(rbx, 32u32)?;
        a.mov(edx, esi)?;
        a.in_(eax, dx)?;
        a.or(rbx, rax)?;
        a.lea(edx, dword_ptr(rsi + 0xc))?;
        a.in_(eax, dx)?;
        a.mov(ebp, eax)?;
        a.shl(rbp, 32u32)?;
        a.lea(edx, dword_ptr(rsi + 8))?;
        a.in_(eax, dx)?;
        a.or(rbp, rax)?;
        print(a, "mhp: slot ")?;
        a.mov(eax, r12d)?;
        a.add(eax, b'0' as u32)?;
        a.mov(dx, super::super::vm::vcpu::PORT_SERIAL as u32)?;
        a.out(dx, al)?;
        print(a, " status 0x")?;
        a.mov(rax, r13)?;
        print_hex_rax(a)?;
        print(a, " base 0x")?;
        a.mov(rax, rbx)?;
        print_hex_rax(a)?;
        print(a, " size 0x")?;
        a.mov(rax, rbp)?;
        print_hex_rax(a)?;
        print(a, "\n")?;
        a.ret()?;
        f.emit(a, "mhp")
    })
}
