//! Guest accesses to the ACPI memory hotplug registers:
//! `cargo +nightly fuzz run memory_hotplug_regs`. Each 4-byte record is
//! one access (offset, width, read/write, value byte); plugs and unplugs
//! are interleaved. Must never panic.
#![no_main]

use dmhost::acpi_host::memory_hotplug::{MemoryDevice, MemoryHotplug};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut m = MemoryHotplug::new(u32::from(data.first().copied().unwrap_or(8)));
    let devs: Vec<MemoryDevice> =
        (0..4u64).map(|i| MemoryDevice { id: format!("d{i}"), base: (4 + i) << 30, size: 2 << 20 }).collect();
    for rec in data.chunks(4) {
        let [op, off, w, v] =
            [rec[0], *rec.get(1).unwrap_or(&0), *rec.get(2).unwrap_or(&0), *rec.get(3).unwrap_or(&0)];
        let width = [1usize, 2, 4][usize::from(w) % 3];
        match op % 4 {
            0 => {
                let mut b = vec![0u8; width];
                m.read(u64::from(off), &mut b);
            }
            1 => {
                m.write(u64::from(off), &[v, v, 0, 0][..width]);
            }
            2 => {
                m.update(&devs[..usize::from(v) % 5], true);
            }
            _ => {
                m.write(0, &u32::from(v).to_le_bytes());
            }
        }
    }
});
