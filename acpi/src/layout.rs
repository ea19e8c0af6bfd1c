//! Lay a set of tables out into one guest-memory image.
//!
//! Image layout from `base_gpa` (16-byte aligned):
//!
//! ```text
//! base + 0    RSDP (36 bytes, revision 2) -> XSDT
//! base + 64   XSDT -> FADT, then every added table in order
//!             FADT -> DSDT (X_DSDT)
//!             DSDT
//!             added tables (MADT, SSDTs, NFIT, ...)
//! ```
//!
//! Every table starts on a 16-byte boundary. Where the RSDP goes: a legacy
//! (BIOS-style) guest finds it by scanning 0xE0000..=0xFFFFF on 16-byte
//! boundaries, so place the image at [`RSDP_DEFAULT_GPA`] (0xE0000); it must
//! then end below 1 MiB (128 KiB of room). A guest told the RSDP address
//! (e.g. a Linux boot protocol `acpi_rsdp_addr`) may use any base:
//! [`AcpiImage::rsdp_gpa`] is the address to hand over.

use std::{io, path::Path};

use crate::tables::{self, fix_checksum, Table};

/// Where the RSDP goes by default: the start of the BIOS area the guest scans.
pub const RSDP_DEFAULT_GPA: u64 = 0xe0000;
/// End of the BIOS read-only area the RSDP scan covers.
pub const BIOS_AREA_END: u64 = 0x10_0000;
/// Alignment of every table in the image.
pub const TABLE_ALIGN: u64 = 16;
/// Bytes reserved for the RSDP at the image base.
const RSDP_SLOT: u64 = 64;

/// Why a layout was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("image base {0:#x} is not 16-byte aligned")]
    Unaligned(u64),
    #[error("image at {base:#x} ({len} bytes) does not fit below {limit:#x}")]
    TooLarge { base: u64, len: u64, limit: u64 },
    #[error("table {0:?} is not a complete ACPI table")]
    BadTable(String),
    #[error("table {0} is built by the layout and cannot be added")]
    Reserved(String),
}

/// The tables to lay out: a DSDT and any number of tables the XSDT lists.
#[derive(Debug, Clone)]
pub struct TableSet {
    dsdt: Table,
    tables: Vec<Table>,
}

/// One table in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacedTable {
    /// Signature, with SSDTs numbered from 1 ("SSDT1", "SSDT2", ...).
    pub name: String,
    pub gpa: u64,
    pub len: usize,
}

/// The laid-out tables, ready to copy into guest memory at `base_gpa`.
#[derive(Debug, Clone)]
pub struct AcpiImage {
    pub base_gpa: u64,
    pub bytes: Vec<u8>,
    /// Address of the RSDP (= `base_gpa`).
    pub rsdp_gpa: u64,
    /// RSDP first, then XSDT, FADT, DSDT and the added tables.
    pub tables: Vec<PlacedTable>,
}

impl TableSet {
    pub fn new(dsdt: Table) -> Self {
        Self { dsdt, tables: Vec::new() }
    }

    /// Add a table the XSDT lists (MADT, SSDT, NFIT, ...), in order.
    pub fn add(&mut self, table: Table) -> &mut Self {
        self.tables.push(table);
        self
    }

    /// Lay the tables out at `base_gpa` and fill in every pointer and
    /// checksum.
    pub fn layout(&self, base_gpa: u64) -> Result<AcpiImage, LayoutError> {
        if base_gpa & (TABLE_ALIGN - 1) != 0 {
            return Err(LayoutError::Unaligned(base_gpa));
        }
        for t in std::iter::once(&self.dsdt).chain(&self.tables) {
            let name = String::from_utf8_lossy(&t.signature()).into_owned();
            if t.len() < tables::HEADER_LEN {
                return Err(LayoutError::BadTable(name));
            }
            if matches!(&t.signature(), b"XSDT" | b"FACP" | b"RSDT") {
                return Err(LayoutError::Reserved(name));
            }
        }
        if &self.dsdt.signature() != b"DSDT" {
            return Err(LayoutError::BadTable("DSDT".into()));
        }

        let align = |x: u64| x.div_ceil(TABLE_ALIGN) * TABLE_ALIGN;
        let xsdt_off = RSDP_SLOT;
        let xsdt_len = (tables::HEADER_LEN + 8 * (1 + self.tables.len())) as u64;
        let fadt_off = align(xsdt_off + xsdt_len);
        let fadt_len = tables::fadt(0).len() as u64;
        let dsdt_off = align(fadt_off + fadt_len);
        let mut off = align(dsdt_off + self.dsdt.len() as u64);
        let mut offsets = Vec::with_capacity(self.tables.len());
        for t in &self.tables {
            offsets.push(off);
            off = align(off + t.len() as u64);
        }
        let total = off;
        let limit = if base_gpa < BIOS_AREA_END { BIOS_AREA_END } else { u64::MAX };
        if base_gpa.checked_add(total).is_none_or(|end| end > limit) {
            return Err(LayoutError::TooLarge { base: base_gpa, len: total, limit });
        }

        let gpa = |o: u64| base_gpa + o;
        let mut entries = vec![gpa(fadt_off)];
        entries.extend(offsets.iter().map(|&o| gpa(o)));
        let xsdt = tables::xsdt(&entries);
        let fadt = tables::fadt(gpa(dsdt_off));
        let rsdp = tables::rsdp(gpa(xsdt_off));

        let mut bytes = vec![0u8; total as usize];
        let mut placed = Vec::new();
        let mut put = |name: String, o: u64, b: &[u8]| {
            bytes[o as usize..o as usize + b.len()].copy_from_slice(b);
            placed.push(PlacedTable { name, gpa: gpa(o), len: b.len() });
        };
        put("RSDP".into(), 0, &rsdp);
        put("XSDT".into(), xsdt_off, xsdt.bytes());
        put("FACP".into(), fadt_off, fadt.bytes());
        put("DSDT".into(), dsdt_off, self.dsdt.bytes());
        let mut ssdts = 0;
        for (t, &o) in self.tables.iter().zip(&offsets) {
            let mut name = String::from_utf8_lossy(&t.signature()).into_owned();
            if name == "SSDT" {
                ssdts += 1;
                name = format!("SSDT{ssdts}");
            }
            let mut b = t.bytes().to_vec();
            fix_checksum(&mut b);
            put(name, o, &b);
        }
        Ok(AcpiImage { base_gpa, bytes, rsdp_gpa: base_gpa, tables: placed })
    }
}

impl AcpiImage {
    /// The bytes of the table called `name` ("RSDP", "DSDT", "SSDT2", ...).
    pub fn table(&self, name: &str) -> Option<&[u8]> {
        let t = self.tables.iter().find(|t| t.name == name)?;
        let o = (t.gpa - self.base_gpa) as usize;
        self.bytes.get(o..o + t.len)
    }

    /// Write every table to `dir/<NAME>.dat` (RSDP.dat, XSDT.dat, FACP.dat,
    /// DSDT.dat, APIC.dat, SSDT1.dat, ..., NFIT.dat), the form `iasl -d`
    /// and `acpiexec` read.
    pub fn dump(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)?;
        for t in &self.tables {
            if let Some(b) = self.table(&t.name) {
                std::fs::write(dir.join(format!("{}.dat", t.name)), b)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{checksum_ok, dsdt, madt, nfit, ssdt, MadtConfig};

    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn set() -> TableSet {
        let mut s = TableSet::new(dsdt(&[], Some(0xfeff_0000)));
        s.add(madt(&MadtConfig::with_cpus(1)))
            .add(ssdt(*b"NVDIMM00", "\\_SB_.NVDR", &[]))
            .add(ssdt(*b"NVDIMM01", "\\_SB_.NVDR", &[]))
            .add(nfit(&[]));
        s
    }

    #[test]
    fn pointers_and_checksums() {
        let img = set().layout(RSDP_DEFAULT_GPA).unwrap();
        let names: Vec<_> = img.tables.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "SSDT1", "SSDT2", "NFIT"]);
        let rsdp = img.table("RSDP").unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]) && checksum_ok(rsdp));
        let xsdt_gpa = u64_at(rsdp, 24);
        assert_eq!(xsdt_gpa, img.tables[1].gpa);
        let xsdt = img.table("XSDT").unwrap();
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(xsdt, o)).collect();
        let want: Vec<u64> = img.tables[2..].iter().filter(|t| t.name != "DSDT").map(|t| t.gpa).collect();
        assert_eq!(entries, want);
        let fadt = img.table("FACP").unwrap();
        assert_eq!(u64_at(fadt, 140), img.tables[3].gpa); // X_DSDT
        for t in &img.tables[1..] {
            let b = img.table(&t.name).unwrap();
            assert!(checksum_ok(b), "{}", t.name);
            assert_eq!(t.gpa % 16, 0);
            assert_eq!(&b[..4], &t.name.as_bytes()[..4]);
        }
        assert!(img.base_gpa + img.bytes.len() as u64 <= BIOS_AREA_END);
    }

    #[test]
    fn layout_errors() {
        assert_eq!(set().layout(0xe0008).unwrap_err(), LayoutError::Unaligned(0xe0008));
        assert!(matches!(set().layout(0xffff0).unwrap_err(), LayoutError::TooLarge { .. }));
        assert!(matches!(set().layout(u64::MAX - 15).unwrap_err(), LayoutError::TooLarge { .. }));
        let mut s = set();
        s.add(crate::tables::xsdt(&[]));
        assert!(matches!(s.layout(0x1000).unwrap_err(), LayoutError::Reserved(_)));
        let mut s = set();
        s.add(Table::from_bytes(vec![1, 2, 3]));
        assert!(matches!(s.layout(0x1000).unwrap_err(), LayoutError::BadTable(_)));
        // Above 1 MiB any size goes.
        assert!(set().layout(0x1_0000_0000).is_ok());
    }

    #[test]
    fn dump_writes_numbered_files() {
        let dir = tempfile::tempdir().unwrap();
        let img = set().layout(RSDP_DEFAULT_GPA).unwrap();
        img.dump(dir.path()).unwrap();
        for n in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "SSDT1", "SSDT2", "NFIT"] {
            let b = std::fs::read(dir.path().join(format!("{n}.dat"))).unwrap();
            assert_eq!(b, img.table(n).unwrap());
        }
    }
}
