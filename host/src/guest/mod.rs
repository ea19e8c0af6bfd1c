//! Guest programs: flat 64-bit code started at CPL 3 on identity-mapped
//! page tables, and the boot-info page that tells them where devices are.
//!
//! # Guest-physical layout (in guest RAM)
//!
//! | GPA | what |
//! |---|---|
//! | `0x1000` | PML4 (`[0]` → PDPT), all entries with the user bit |
//! | `0x2000` | PDPT, 16 entries → 16 page directories |
//! | `0x5000` | GDT, Linux layout (user code 0x33, user data 0x2b, TSS 0x40) |
//! | `0x6000` | IDT (empty: interrupts cannot be delivered on this host) |
//! | `0x7000` | 64-bit TSS with an all-zero I/O bitmap (port I/O allowed) |
//! | `0xA000` | [boot info page](BOOT_INFO_GPA) |
//! | `0xB000` | [NVDIMM DSM page](DSM_PAGE_GPA) (4 KiB, reserved: shared by the `_DSM` AML and the host) |
//! | `0x10000` | 16 page directories, 2 MiB pages: identity map of 0..16 GiB |
//! | `..0xE0000` | stacks (vCPU 0 grows down from [`STACK_TOP`] = `0xE0000`, each further vCPU 64 KiB lower) |
//! | `0xE0000..0x100000` | [ACPI tables](ACPI_GPA): RSDP at `0xE0000` (where a BIOS-style guest scans for it), then XSDT, FADT, DSDT, MADT, SSDTs, NFIT |
//! | `0x100000` | the program, entry at its first byte |
//!
//! Device regions are placed in the hotplug window `4 GiB..16 GiB`, MMIO
//! registers usually in `0xC000_0000..4 GiB`; all of it is identity mapped.
//! The ACPI tables and the DSM page are only written when the host runs
//! with ACPI (`dmhost run`; [`crate::acpi_host`]); until then they are
//! plain RAM.
//!
//! # Boot info page (`BOOT_INFO_GPA`, little endian)
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | u32 magic `0x42484d44` ("DMHB") |
//! | 0x04 | u32 version (1) |
//! | 0x08 | u64 guest RAM size |
//! | 0x10 | u32 generation: incremented after every plug/unplug, once the table is updated |
//! | 0x14 | u32 number of device entries |
//! | 0x18 | u64 hotplug window base, 0x20 u64 its end |
//! | 0x28 | u64 RSDP address (0 = no ACPI tables) |
//! | 0x30 | u64 NVDIMM DSM page address (0 = none); the doorbell is port `0x0a18` |
//! | 0x38 | u16 memory-hotplug I/O base port (0 = none), 0x3a u16 its slot count |
//! | 0x40 | entries, [`BOOT_INFO_ENTRY_SIZE`] bytes each, at most [`BOOT_INFO_MAX_DEVICES`] |
//!
//! Entry: `+0x00` id (24 bytes, NUL padded, truncated), `+0x18` kind (16
//! bytes), `+0x28` u64 region GPA (0 = no region), `+0x30` u64 region size,
//! `+0x38` u64 base of the first MMIO range (0 = none).
//!
//! # Registers at entry
//!
//! `rip` = program start, `rsp` = stack top (each extra vCPU gets 64 KiB
//! less), `rdi` = [`BOOT_INFO_GPA`], `rsi` = vCPU index, `rflags` = IOPL 3
//! with IF clear; everything else 0 unless the config presets it.
//!
//! # Ports
//!
//! `out 0x3f8` prints a byte on the host's stdout; `out 0x501` stops the VM
//! with the value written as the exit code; `out 0x502` parks the vCPU for
//! the value in microseconds (at most 10 ms): the CPL-3 guest's `hlt`.

pub mod acpi_programs;
pub mod asm;
pub mod bench_programs;
pub mod migrate_verify;
pub mod programs;
pub mod vfio_programs;

use std::{collections::BTreeMap, path::Path};

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment};
use kvm_ioctls::VcpuFd;

use crate::vm::memory::{GuestRam, MemoryError};

pub const PML4_GPA: u64 = 0x1000;
pub const PDPT_GPA: u64 = 0x2000;
pub const GDT_GPA: u64 = 0x5000;
pub const IDT_GPA: u64 = 0x6000;
pub const TSS_GPA: u64 = 0x7000;
/// The TSS (0x68 bytes), then an 8 KiB I/O bitmap, then its 0xff terminator.
pub const TSS_LIMIT: u64 = 0x68 + 8192;
pub const BOOT_INFO_GPA: u64 = 0xA000;
pub const PD_GPA: u64 = 0x10000;
/// The NVDIMM DSM page: guest RAM the guest must not use otherwise.
pub const DSM_PAGE_GPA: u64 = 0xB000;
/// Where the ACPI image (RSDP first) goes: the BIOS area a guest scans.
pub const ACPI_GPA: u64 = 0xE0000;
/// End of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// Top of vCPU 0's stack, just below the ACPI area.
pub const STACK_TOP: u64 = ACPI_GPA;
/// Where the program is loaded and entered.
pub const CODE_GPA: u64 = 0x10_0000;
/// Guest-physical space the page tables map (identity, 2 MiB pages).
pub const MAPPED_LIMIT: u64 = 16 << 30;
/// Guest RAM must end below the MMIO hole.
pub const MAX_RAM: u64 = 0xC000_0000;
/// Guest RAM must hold the boot structures, stack and some code.
pub const MIN_RAM: u64 = 2 << 20;
/// The hotplug window for device regions.
pub const HOTPLUG_BASE: u64 = 4 << 30;
pub const HOTPLUG_END: u64 = MAPPED_LIMIT;

pub const BOOT_INFO_MAGIC: u32 = 0x4248_4d44;
pub const BOOT_INFO_VERSION: u32 = 1;
pub const BOOT_INFO_ENTRIES: u64 = 0x40;
pub const BOOT_INFO_ENTRY_SIZE: u64 = 0x40;
pub const BOOT_INFO_MAX_DEVICES: usize = 63;
/// Boot-info offsets of the ACPI fields (see the module docs).
pub const BOOT_INFO_RSDP: u64 = 0x28;
pub const BOOT_INFO_DSM_PAGE: u64 = 0x30;
pub const BOOT_INFO_MHP_PORT: u64 = 0x38;
pub const BOOT_INFO_MHP_SLOTS: u64 = 0x3a;

/// Selectors: PVM hard-wires Linux's `__USER_CS`/`__USER_DS`.
pub const SEL_USER_DATA: u16 = 0x2b;
pub const SEL_USER_CODE: u16 = 0x33;
pub const SEL_TSS: u16 = 0x40;
const GDT_ENTRIES: u64 = 10;

/// Stack given to each vCPU after the first.
pub const STACK_PER_VCPU: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("guest program {name} is {size} bytes; it must fit in guest RAM above {CODE_GPA:#x} ({room} bytes free)")]
    TooBig { name: String, size: usize, room: u64 },
    #[error("guest program {0} is empty")]
    Empty(String),
    #[error("cannot read guest program {path}")]
    Read { path: String, source: std::io::Error },
    #[error("unknown built-in guest program {0:?} (built-ins: {list})", list = programs::NAMES.join(", "))]
    UnknownBuiltin(String),
    #[error("cannot assemble guest program {name}: {message}")]
    Assemble { name: String, message: String },
    #[error("cannot write guest boot structures")]
    Memory(#[from] MemoryError),
    #[error("vCPU setup failed ({what})")]
    Vcpu { what: &'static str, source: kvm_ioctls::Error },
    #[error("unknown register {0:?} in the register preset")]
    BadRegister(String),
    #[error("vCPU {0}'s stack would overlap the page tables (too many vCPUs for this guest layout)")]
    StackSpace(u32),
}

/// A flat 64-bit program, loaded at [`CODE_GPA`] and entered at its start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProgram {
    pub name: String,
    pub code: Vec<u8>,
}

impl GuestProgram {
    /// `builtin:NAME` or a path to a flat binary.
    pub fn from_spec(spec: &str, base_dir: Option<&Path>) -> Result<Self, GuestError> {
        if let Some(name) = spec.strip_prefix("builtin:") {
            return programs::builtin(name);
        }
        let mut path = std::path::PathBuf::from(spec);
        if path.is_relative() {
            if let Some(base) = base_dir {
                path = base.join(path);
            }
        }
        let code = std::fs::read(&path)
            .map_err(|source| GuestError::Read { path: path.display().to_string(), source })?;
        if code.is_empty() {
            return Err(GuestError::Empty(path.display().to_string()));
        }
        Ok(Self { name: path.display().to_string(), code })
    }
}

/// Registers preset from the config (`rax`..`r15`, `rsp`, `rip` offsets are not allowed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegPreset(pub BTreeMap<String, u64>);

pub const PRESET_REGS: &[&str] = &[
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

impl RegPreset {
    pub fn validate(&self) -> Result<(), GuestError> {
        match self.0.keys().find(|k| !PRESET_REGS.contains(&k.as_str())) {
            Some(bad) => Err(GuestError::BadRegister(bad.clone())),
            None => Ok(()),
        }
    }

    fn apply(&self, r: &mut kvm_regs) -> Result<(), GuestError> {
        for (name, &v) in &self.0 {
            let slot = match name.as_str() {
                "rax" => &mut r.rax,
                "rbx" => &mut r.rbx,
                "rcx" => &mut r.rcx,
                "rdx" => &mut r.rdx,
                "rsi" => &mut r.rsi,
                "rdi" => &mut r.rdi,
                "rbp" => &mut r.rbp,
                "rsp" => &mut r.rsp,
                "r8" => &mut r.r8,
                "r9" => &mut r.r9,
                "r10" => &mut r.r10,
                "r11" => &mut r.r11,
                "r12" => &mut r.r12,
                "r13" => &mut r.r13,
                "r14" => &mut r.r14,
                "r15" => &mut r.r15,
                other => return Err(GuestError::BadRegister(other.to_owned())),
            };
            *slot = v;
        }
        Ok(())
    }
}

/// Write page tables, GDT, TSS, an empty boot-info page and the program.
pub fn load(ram: &GuestRam, program: &GuestProgram) -> Result<(), GuestError> {
    if program.code.is_empty() {
        return Err(GuestError::Empty(program.name.clone()));
    }
    let room = ram.size().saturating_sub(CODE_GPA);
    if program.code.len() as u64 > room {
        return Err(GuestError::TooBig { name: program.name.clone(), size: program.code.len(), room });
    }
    // Page tables: PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries: 2 MiB pages.
    const FLAGS: u64 = 0x7; // present | writable | user
    const LARGE: u64 = 0x80;
    ram.write_u64(PML4_GPA, PDPT_GPA | FLAGS)?;
    let pds = MAPPED_LIMIT >> 30;
    let mut pd = vec![0u8; 4096];
    for i in 0..pds {
        let pd_gpa = PD_GPA + i * 4096;
        ram.write_u64(PDPT_GPA + i * 8, pd_gpa | FLAGS)?;
        for j in 0..512u64 {
            let e = (i << 30) | (j << 21) | FLAGS | LARGE;
            pd[(j * 8) as usize..(j * 8 + 8) as usize].copy_from_slice(&e.to_le_bytes());
        }
        ram.write(pd_gpa, &pd)?;
    }
    // GDT, Linux layout.
    let gdt: [u64; GDT_ENTRIES as usize] = [
        0,
        0,
        0x00af_9b00_0000_ffff, // 0x10 kernel code64
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x23 user code32
        0x00cf_f300_0000_ffff, // 0x2b user data
        0x00af_fb00_0000_ffff, // 0x33 user code64
        0,
        tss_descriptor_low(TSS_GPA, TSS_LIMIT),
        TSS_GPA >> 32,
    ];
    for (i, e) in gdt.iter().enumerate() {
        ram.write_u64(GDT_GPA + i as u64 * 8, *e)?;
    }
    // TSS: rsp0, I/O map base right after the TSS, all-zero bitmap, 0xff end.
    ram.write(TSS_GPA, &[0u8; 0x68])?;
    ram.write_u64(TSS_GPA + 4, STACK_TOP - 0x8000)?;
    ram.write(TSS_GPA + 0x66, &0x68u16.to_le_bytes())?;
    ram.write(TSS_GPA + 0x68, &vec![0u8; 8192])?;
    ram.write(TSS_GPA + TSS_LIMIT, &[0xff])?;
    ram.write(IDT_GPA, &[0u8; 4096])?;
    ram.write(CODE_GPA, &program.code)?;
    Ok(())
}

fn tss_descriptor_low(base: u64, limit: u64) -> u64 {
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89u64 << 40) // present, type 9: available 64-bit TSS
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56)
}

fn user_segment(selector: u16, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Put a vCPU (CPUID already set) at the program's entry, at CPL 3.
pub fn setup_vcpu(vcpu: &VcpuFd, index: u32, preset: &RegPreset) -> Result<(), GuestError> {
    let err = |what| move |source| GuestError::Vcpu { what, source };
    let mut s = vcpu.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    s.cs = user_segment(SEL_USER_CODE, 0xb, 1, 0);
    let data = user_segment(SEL_USER_DATA, 0x3, 0, 1);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = kvm_segment {
        base: TSS_GPA,
        limit: TSS_LIMIT as u32,
        selector: SEL_TSS,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable { base: GDT_GPA, limit: (GDT_ENTRIES * 8 - 1) as u16, padding: [0; 3] };
    s.idt = kvm_dtable { base: IDT_GPA, limit: 0xfff, padding: [0; 3] };
    s.cr0 = 0x8005_0033; // PG | AM | WP | NE | ET | MP | PE
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
    s.efer = 0x500 | 0x1; // LMA | LME | SCE
    vcpu.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
    let rsp = STACK_TOP
        .checked_sub(u64::from(index) * STACK_PER_VCPU)
        .filter(|&sp| sp >= PD_GPA + (MAPPED_LIMIT >> 30) * 4096 + STACK_PER_VCPU)
        .ok_or(GuestError::StackSpace(index))?;
    let mut regs = kvm_regs {
        rip: CODE_GPA,
        rsp,
        rdi: BOOT_INFO_GPA,
        rsi: index.into(),
        // IOPL 3, IF clear (this host cannot deliver interrupts to the guest).
        rflags: 0x3002,
        ..Default::default()
    };
    preset.apply(&mut regs)?;
    vcpu.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    Ok(())
}

/// One device as the boot-info page lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDevice {
    pub id: String,
    pub kind: String,
    pub region_gpa: u64,
    pub region_size: u64,
    pub mmio_base: u64,
}

fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut b = [0u8; N];
    let n = s.len().min(N - 1);
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b
}

/// Rewrite the boot-info page: entries, count, then the bumped generation.
pub fn write_boot_info(ram: &GuestRam, devices: &[BootDevice], generation: u32) -> Result<(), GuestError> {
    let mut page = vec![0u8; 4096];
    page[0..4].copy_from_slice(&BOOT_INFO_MAGIC.to_le_bytes());
    page[4..8].copy_from_slice(&BOOT_INFO_VERSION.to_le_bytes());
    page[8..16].copy_from_slice(&ram.size().to_le_bytes());
    let n = devices.len().min(BOOT_INFO_MAX_DEVICES);
    page[0x14..0x18].copy_from_slice(&(n as u32).to_le_bytes());
    page[0x18..0x20].copy_from_slice(&HOTPLUG_BASE.to_le_bytes());
    page[0x20..0x28].copy_from_slice(&HOTPLUG_END.to_le_bytes());
    for (i, d) in devices.iter().take(n).enumerate() {
        let o = (BOOT_INFO_ENTRIES + i as u64 * BOOT_INFO_ENTRY_SIZE) as usize;
        page[o..o + 24].copy_from_slice(&padded::<24>(&d.id));
        page[o + 0x18..o + 0x28].copy_from_slice(&padded::<16>(&d.kind));
        page[o + 0x28..o + 0x30].copy_from_slice(&d.region_gpa.to_le_bytes());
        page[o + 0x30..o + 0x38].copy_from_slice(&d.region_size.to_le_bytes());
        page[o + 0x38..o + 0x40].copy_from_slice(&d.mmio_base.to_le_bytes());
    }
    // Everything but the generation first; x86 keeps store order, so a guest
    // that sees the new generation sees the new table. 0x28..0x40 (the ACPI
    // fields, [`write_boot_acpi`]) are left alone.
    ram.write(BOOT_INFO_GPA + 0x18, &page[0x18..0x28])?;
    ram.write(BOOT_INFO_GPA + BOOT_INFO_ENTRIES, &page[BOOT_INFO_ENTRIES as usize..])?;
    ram.write(BOOT_INFO_GPA, &page[..0x10])?;
    ram.write(BOOT_INFO_GPA + 0x14, &page[0x14..0x18])?;
    ram.write(BOOT_INFO_GPA + 0x10, &generation.to_le_bytes())?;
    Ok(())
}

/// The ACPI fields of the boot-info page.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootAcpi {
    pub rsdp_gpa: u64,
    pub dsm_page_gpa: u64,
    pub mhp_port: u16,
    pub mhp_slots: u16,
}

/// Write the ACPI fields of the boot-info page (kept by [`write_boot_info`]).
pub fn write_boot_acpi(ram: &GuestRam, acpi: &BootAcpi) -> Result<(), GuestError> {
    let mut b = [0u8; 0x18];
    b[0..8].copy_from_slice(&acpi.rsdp_gpa.to_le_bytes());
    b[8..16].copy_from_slice(&acpi.dsm_page_gpa.to_le_bytes());
    b[16..18].copy_from_slice(&acpi.mhp_port.to_le_bytes());
    b[18..20].copy_from_slice(&acpi.mhp_slots.to_le_bytes());
    ram.write(BOOT_INFO_GPA + BOOT_INFO_RSDP, &b)?;
    Ok(())
}
