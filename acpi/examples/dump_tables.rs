//! Dump a sample table set (two NVDIMMs) to a directory:
//! `cargo run -p dmhost-acpi --example dump_tables -- /tmp/acpi`.

use ::nvdimm::acpi::{device_aml, nfit_structures, DimmInfo};
use dmhost_acpi::{nvdimm as nvdr, tables, TableSet, RSDP_DEFAULT_GPA};

fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "acpi-tables".into());
    let mut set = TableSet::new(tables::dsdt(&[], Some(nvdr::DSM_PAGE_DEFAULT_GPA)));
    set.add(tables::madt(&tables::MadtConfig::with_cpus(2)));
    let mut nfit = Vec::new();
    for slot in 0..2u32 {
        let id = format!("NVDIMM{slot:02}");
        let mut table_id = [b' '; 8];
        table_id.copy_from_slice(id.as_bytes());
        set.add(tables::ssdt(table_id, "\\_SB_.NVDR", &[device_aml(slot, slot == 0)]));
        nfit.push(nfit_structures(&DimmInfo {
            slot,
            node: 0,
            base: 0x1_0000_0000 + u64::from(slot) * (128 << 20),
            size: 128 << 20,
            unarmed: false,
        }));
    }
    nfit.push(tables::nfit_platform_capabilities(0b11));
    set.add(tables::nfit(&nfit));
    let image = set.layout(RSDP_DEFAULT_GPA).expect("layout");
    image.dump(std::path::Path::new(&dir)).expect("dump");
    for t in &image.tables {
        println!("{:6} at {:#x}, {} bytes", t.name, t.gpa, t.len);
    }
}
