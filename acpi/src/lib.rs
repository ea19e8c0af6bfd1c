//! ACPI table assembly (RSDP/XSDT/FADT/MADT/DSDT/SSDT/NFIT) for dmhost.
//!
//! Build the tables with [`tables`], the NVDIMM root device and the DSM
//! page protocol with [`nvdimm`], then lay everything out into one
//! guest-memory image with [`TableSet`]:
//!
//! ```no_run
//! use dmhost_acpi::{nvdimm, tables, TableSet, RSDP_DEFAULT_GPA};
//! let dsdt = tables::dsdt(&[], Some(nvdimm::DSM_PAGE_DEFAULT_GPA));
//! let mut set = TableSet::new(dsdt);
//! set.add(tables::madt(&tables::MadtConfig::with_cpus(2)));
//! set.add(tables::ssdt(*b"NVDIMM00", "\\_SB_.NVDR", &[/* device AML */]));
//! set.add(tables::nfit(&[/* NFIT sub-structures */]));
//! let image = set.layout(RSDP_DEFAULT_GPA).unwrap();
//! // copy image.bytes to guest memory at image.base_gpa; the guest finds
//! // the RSDP at image.rsdp_gpa by scanning 0xE0000..0xFFFFF.
//! ```

pub mod layout;
pub mod nvdimm;
pub mod tables;

pub use layout::{AcpiImage, LayoutError, PlacedTable, TableSet, RSDP_DEFAULT_GPA};
pub use tables::Table;

/// OEM ID in every table header.
pub const OEM_ID: [u8; 6] = *b"DMHOST";
/// OEM table ID of the host's own tables.
pub const OEM_TABLE_ID: [u8; 8] = *b"DMHOSTVM";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
