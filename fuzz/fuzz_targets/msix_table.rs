//! Guest accesses to vfio-pci's emulated MSI-X table and PBA:
//! `cargo +nightly fuzz run msix_table`. The first 12 bytes are the
//! device's MSI-X capability (control, table and PBA dwords), checked
//! against BAR0 (16 KiB, 32-bit memory) and BAR2 (64 KiB, 64-bit memory)
//! as config space checks it; then each 15-byte record is one access (op,
//! BAR, offset in the BAR (u32), width, 8 value bytes). Any layout, offset
//! and width must be handled without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_pci::{
    config_space::{Bar, BarKind, MsixCap},
    msix::MsixTable,
};

fn bars() -> [Option<Bar>; 6] {
    let bar = |index, kind, size| Some(Bar { index, kind, size, prefetch: false });
    [bar(0, BarKind::Mem32, 16 << 10), None, bar(2, BarKind::Mem64, 64 << 10), None, None, None]
}

fuzz_target!(|data: &[u8]| {
    let Some(cap) = MsixCap::parse(data, 0) else {
        return;
    };
    if cap.check(&bars()).is_err() {
        return;
    }
    let mut table = MsixTable::new(cap);
    let _ = table.trap_ranges();
    for r in data[12..].chunks_exact(15) {
        let bar = u32::from(r[1] % 6);
        let offset = u64::from(u32::from_le_bytes([r[2], r[3], r[4], r[5]]));
        let len = [1, 2, 4, 8][usize::from(r[6] % 4)];
        let Some(hit) = table.hit(bar, offset, len) else {
            continue;
        };
        if r[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            table.read(hit, offset, &mut buf[..len]);
        } else {
            table.write(hit, offset, &r[7..7 + len]);
        }
        if r[0] & 2 != 0 {
            table.set_pending(usize::from(r[7]) * 8, r[8] & 1 != 0);
        }
    }
    let saved = table.save();
    let _ = table.restore(&saved);
});
