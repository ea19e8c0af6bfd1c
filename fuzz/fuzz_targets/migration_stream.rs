//! Arbitrary bytes into the migration stream reader: it must return an
//! error or finish, never panic, and never allocate beyond its bounds.
#![no_main]

use dmhost::migration::{Page, Section, StreamReader, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut r) = StreamReader::new(data) else { return };
    let mut mem = vec![0u8; 16 * PAGE_SIZE];
    let mut n = 0u32;
    loop {
        let Ok(section) = r.next_section() else { return };
        let res = match section {
            // Alternate the two ways of taking page data, and skipping it.
            Section::Ram(b) => match n % 3 {
                0 => r.read_ram_into(&b, &mut mem),
                1 => r.read_ram_with(&b, |_, p| {
                    if let Page::Data(d) = p {
                        assert_eq!(d.len(), PAGE_SIZE);
                    }
                    Ok(())
                }),
                _ => Ok(()),
            },
            Section::End { .. } => return,
            _ => Ok(()),
        };
        if res.is_err() {
            return;
        }
        n += 1;
    }
});
