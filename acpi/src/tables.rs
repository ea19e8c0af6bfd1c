//! Builders for the individual tables. Each returns a [`Table`] whose bytes
//! are a complete table with a valid checksum; tables that point at other
//! tables (RSDP, XSDT, FADT) are built by [`crate::TableSet::layout`] once
//! addresses are known.

use acpi_tables::{
    aml::{Path, Scope},
    fadt::{FADTBuilder, Flags},
    madt::{EnabledStatus, IoApic, ProcessorLocalApic},
    rsdp::Rsdp,
    sdt::Sdt,
    Aml,
};

use crate::{nvdimm, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Offset of the checksum byte in a system description table header.
pub const CHECKSUM_OFFSET: usize = 9;
/// Length of a system description table header.
pub const HEADER_LEN: usize = 36;

/// One complete ACPI table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    bytes: Vec<u8>,
}

impl Table {
    /// Wrap the bytes of a complete table (header included); the length
    /// field and checksum are fixed up.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        if bytes.len() >= HEADER_LEN {
            let len = bytes.len() as u32;
            bytes[4..8].copy_from_slice(&len.to_le_bytes());
            fix_checksum(&mut bytes);
        }
        Self { bytes }
    }

    fn from_sdt(sdt: &Sdt) -> Self {
        Self { bytes: sdt.as_slice().to_vec() }
    }

    fn from_aml(aml: &dyn Aml) -> Self {
        let mut bytes = Vec::new();
        aml.to_aml_bytes(&mut bytes);
        Self { bytes }
    }

    /// The four-character signature ("DSDT", "SSDT", ...).
    pub fn signature(&self) -> [u8; 4] {
        let mut s = [0; 4];
        if let Some(b) = self.bytes.get(0..4) {
            s.copy_from_slice(b);
        }
        s
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Set byte 9 so the bytes of a table sum to zero.
pub fn fix_checksum(table: &mut [u8]) {
    if table.len() <= CHECKSUM_OFFSET {
        return;
    }
    table[CHECKSUM_OFFSET] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[CHECKSUM_OFFSET] = sum.wrapping_neg();
}

/// Whether the bytes sum to zero (what the guest checks).
pub fn checksum_ok(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

fn sdt(signature: [u8; 4], revision: u8, table_id: [u8; 8], body: &[u8]) -> Table {
    let mut sdt = Sdt::new(signature, HEADER_LEN as u32, revision, OEM_ID, table_id, OEM_REVISION);
    sdt.append_slice(body);
    Table::from_sdt(&sdt)
}

/// RSDP (revision 2, 36 bytes) pointing at the XSDT.
pub fn rsdp(xsdt_gpa: u64) -> Vec<u8> {
    let mut v = Vec::new();
    Rsdp::new(OEM_ID, xsdt_gpa).to_aml_bytes(&mut v);
    v
}

/// XSDT listing `entries` (every table but the DSDT, which the FADT names).
pub fn xsdt(entries: &[u64]) -> Table {
    let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    sdt(*b"XSDT", 1, OEM_TABLE_ID, &body)
}

/// A hardware-reduced FADT (ACPI 6.5 layout) pointing at the DSDT through
/// `X_DSDT`. Hardware-reduced: no PM1/GPE blocks, no SCI, no FACS needed.
pub fn fadt(dsdt_gpa: u64) -> Table {
    Table::from_aml(
        &FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
            .dsdt_64(dsdt_gpa)
            .flag(Flags::HwReducedAcpi)
            .flag(Flags::PwrButton)
            .flag(Flags::SlpButton)
            .finalize(),
    )
}

/// An interrupt source override (MADT type 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InterruptOverride {
    pub source_irq: u8,
    pub gsi: u32,
    /// MPS INTI flags: bits 0-1 polarity, 2-3 trigger mode.
    pub flags: u16,
}

/// What the MADT describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MadtConfig {
    /// APIC IDs of the CPUs (processor UID = index).
    pub apic_ids: Vec<u8>,
    pub lapic_addr: u32,
    pub ioapic_id: u8,
    pub ioapic_addr: u32,
    pub ioapic_gsi_base: u32,
    pub overrides: Vec<InterruptOverride>,
}

/// Local APIC base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// MPS INTI flags: active high, level triggered.
pub const INTI_LEVEL_HIGH: u16 = 0b01 | 0b11 << 2;

impl MadtConfig {
    /// `cpus` CPUs with APIC IDs 0.., one IOAPIC at 0xfec00000 with GSI base
    /// 0, and the usual PC overrides: IRQ0 → GSI2 (the PIT on the IOAPIC's
    /// pin 2), IRQ9 → GSI9 level/active high (the SCI line, as QEMU does).
    pub fn with_cpus(cpus: u8) -> Self {
        Self {
            apic_ids: (0..cpus).collect(),
            lapic_addr: LAPIC_ADDR,
            ioapic_id: 0,
            ioapic_addr: IOAPIC_ADDR,
            ioapic_gsi_base: 0,
            overrides: vec![
                InterruptOverride { source_irq: 0, gsi: 2, flags: 0 },
                InterruptOverride { source_irq: 9, gsi: 9, flags: INTI_LEVEL_HIGH },
            ],
        }
    }
}

/// MADT ("APIC"): local APICs, one IOAPIC, interrupt source overrides and
/// a local APIC NMI on LINT1 for all processors. PCAT_COMPAT is set (the
/// dual 8259s are present and must be masked by an APIC-mode OS).
pub fn madt(c: &MadtConfig) -> Table {
    let mut body = Vec::new();
    body.extend_from_slice(&c.lapic_addr.to_le_bytes());
    body.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT
    for (uid, &apic_id) in c.apic_ids.iter().enumerate() {
        ProcessorLocalApic::new(uid as u8, apic_id, EnabledStatus::Enabled).to_aml_bytes(&mut body);
    }
    IoApic::new(c.ioapic_id, c.ioapic_addr, c.ioapic_gsi_base).to_aml_bytes(&mut body);
    for o in &c.overrides {
        body.extend_from_slice(&[2, 10, 0, o.source_irq]); // type, length, bus ISA
        body.extend_from_slice(&o.gsi.to_le_bytes());
        body.extend_from_slice(&o.flags.to_le_bytes());
    }
    // Local APIC NMI: all processors (0xff), flags 0 (bus default), LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    sdt(*b"APIC", 4, OEM_TABLE_ID, &body)
}

/// DSDT (revision 2: 64-bit integers): `Scope (\_SB) { NVDR?, sb_aml }`.
/// With `nvdimm_dsm_page`, the NVDIMM root device `\_SB.NVDR` is included,
/// its DSM page at that guest-physical address.
pub fn dsdt(sb_aml: &[u8], nvdimm_dsm_page: Option<u64>) -> Table {
    let mut children = Vec::new();
    if let Some(page) = nvdimm_dsm_page {
        children.extend_from_slice(&nvdimm::root_device_aml(page));
    }
    children.extend_from_slice(sb_aml);
    let body = Scope::raw(Path::new("\\_SB_"), children);
    sdt(*b"DSDT", 2, OEM_TABLE_ID, &body)
}

/// An SSDT holding `fragments` inside `Scope (scope)`, e.g. NVDIMM device
/// AML inside `\_SB_.NVDR`. `scope` must be a valid ACPI path of 4-character
/// segments.
pub fn ssdt(table_id: [u8; 8], scope: &str, fragments: &[Vec<u8>]) -> Table {
    let body = Scope::raw(Path::new(scope), fragments.concat());
    sdt(*b"SSDT", 2, table_id, &body)
}

/// NFIT: header, 4 reserved bytes, then the sub-structures in order.
pub fn nfit(structures: &[Vec<u8>]) -> Table {
    let mut body = vec![0u8; 4];
    for s in structures {
        body.extend_from_slice(s);
    }
    sdt(*b"NFIT", 1, OEM_TABLE_ID, &body)
}

/// NFIT NVDIMM Platform Capabilities structure (type 7, 16 bytes; ACPI 6.2
/// Errata A 5.2.25.9), as QEMU `nvdimm_build_structure_caps`: bit 0 CPU
/// cache flush to NVDIMM on power loss, bit 1 memory controller flush.
/// `capabilities == 0` yields no structure.
pub fn nfit_platform_capabilities(capabilities: u32) -> Vec<u8> {
    if capabilities == 0 {
        return Vec::new();
    }
    let highest = 31 - capabilities.leading_zeros() as u8;
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&7u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(&[highest, 0, 0, 0]);
    v.extend_from_slice(&capabilities.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_have_valid_headers() {
        for t in [
            xsdt(&[0x1000, 0x2000]),
            fadt(0x1234_5678),
            madt(&MadtConfig::with_cpus(2)),
            dsdt(&[], Some(0x7fff_0000)),
            ssdt(*b"NVDIMM00", "\\_SB_.NVDR", &[vec![0x5b, 0x82, 0x02, 0x41]]),
            nfit(&[nfit_platform_capabilities(3)]),
        ] {
            assert!(checksum_ok(t.bytes()), "{:?}", t.signature());
            let len = u32::from_le_bytes(t.bytes()[4..8].try_into().unwrap());
            assert_eq!(len as usize, t.len());
        }
        assert!(checksum_ok(&rsdp(0x1000)[..20]) && checksum_ok(&rsdp(0x1000)));
        assert_eq!(xsdt(&[1, 2]).len(), 36 + 16);
        // 2 LAPICs (8) + IOAPIC (12) + 2 ISOs (10) + NMI (6)
        assert_eq!(madt(&MadtConfig::with_cpus(2)).len(), 36 + 8 + 16 + 12 + 20 + 6);
        assert_eq!(nfit(&[]).len(), 40);
    }

    #[test]
    fn platform_capabilities_layout() {
        let c = nfit_platform_capabilities(0b11);
        assert_eq!(c, [7, 0, 16, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert!(nfit_platform_capabilities(0).is_empty());
    }

    #[test]
    fn from_bytes_fixes_length_and_checksum() {
        let mut raw = ssdt(*b"X0000000", "\\_SB_", &[]).bytes().to_vec();
        raw.push(0xa3); // Noop
        raw[9] = 0x55;
        let t = Table::from_bytes(raw);
        assert!(checksum_ok(t.bytes()));
        assert_eq!(u32::from_le_bytes(t.bytes()[4..8].try_into().unwrap()) as usize, t.len());
    }
}
