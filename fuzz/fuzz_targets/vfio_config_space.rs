//! Guest config writes to vfio-pci's emulated config space:
//! `cargo +nightly fuzz run vfio_config_space`. The first 256 bytes are
//! the device's own config space (capability list, MSI, MSI-X, PCI
//! Express with or without FLR, anything), with BAR0 4 KiB, BAR2 64 KiB
//! and a ROM; then each 13-byte record is one access (op, offset (u32),
//! width, 8 value bytes). A write that yields a Function Level Reset
//! resets config space, as the device does. Any input must be handled
//! without a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_pci::config_space::{ConfigEffect, ConfigSpace, CONFIG_LEN};

fuzz_target!(|data: &[u8]| {
    let Some(raw) = data.get(..CONFIG_LEN).and_then(|r| <[u8; CONFIG_LEN]>::try_from(r).ok()) else {
        return;
    };
    let mut c = ConfigSpace::build(raw, &[4096, 0, 64 << 10, 0, 0, 0], 64 << 10, true);
    for r in data[CONFIG_LEN..].chunks_exact(13) {
        let offset = u32::from_le_bytes([r[1], r[2], r[3], r[4]]) % 0x1100;
        let len = [1, 2, 4, 8][usize::from(r[5] % 4)];
        if r[0] & 1 == 0 {
            let mut buf = [0u8; 8];
            let _ = c.read(offset, &mut buf[..len]);
            continue;
        }
        if let Ok(fx) = c.write(offset, &r[6..6 + len]) {
            if fx.contains(&ConfigEffect::FunctionReset) {
                assert!(c.flr_capable(), "FLR without FLR in DevCap");
                c.reset();
                assert_eq!(c.command(), 0);
            }
        }
        if let Some(cap) = c.express() {
            assert_eq!(c.bytes()[cap + 9] & 0x80, 0, "the FLR bit reads back 0");
        }
        for bar in 0..7 {
            let _ = c.bar_address(bar);
        }
        let _ = (c.rom_address(), c.msi_state(), c.msix_control());
    }
});
