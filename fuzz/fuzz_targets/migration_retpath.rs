//! Arbitrary bytes into the post-copy return path, as the source reads it
//! from the destination (untrusted), against a fixed configuration of two
//! RAM blocks: messages are read until an error, and every one that is
//! accepted is in range and encodes back to the bytes it was read from.
#![no_main]

use dmhost::migration::{
    bitmap_words,
    postcopy::retpath::{RetMsg, RetPathError},
    ConfigSection, RamBlockInfo, PAGE_SIZE,
};
use libfuzzer_sys::fuzz_target;

fn config() -> ConfigSection {
    ConfigSection {
        ram_size: 1 << 20,
        vcpus: 1,
        ram_blocks: vec![
            RamBlockInfo { id: "ram0".into(), size: 1 << 20 },
            // Not a multiple of 64 pages: the last bitmap word is partial.
            RamBlockInfo { id: "dev0/ram".into(), size: 5 * PAGE_SIZE as u64 },
        ],
        devices: vec![],
    }
}

fuzz_target!(|data: &[u8]| {
    let config = config();
    let mut r = data;
    loop {
        let before = r.len();
        let msg = match RetMsg::read(&mut r, &config) {
            Ok(m) => m,
            Err(RetPathError::Io(e)) => panic!("a slice cannot fail: {e}"),
            Err(_) => return,
        };
        let consumed = &data[data.len() - before..data.len() - r.len()];
        // Text lines may come before it; the message itself is canonical.
        let bytes = msg.encode().expect("an accepted message encodes");
        assert!(consumed.ends_with(&bytes), "{msg:?} does not encode back to its bytes");
        match &msg {
            RetMsg::Request { block, pages } => {
                let b = config.ram_block(block).expect("a known block");
                assert!(!pages.is_empty() && pages.iter().all(|&p| p < b.pages()));
            }
            RetMsg::Received { block, bitmap } => {
                let b = config.ram_block(block).expect("a known block");
                assert_eq!(bitmap.len() as u64, bitmap_words(b.pages()));
            }
            RetMsg::ResumeReady | RetMsg::Complete | RetMsg::Ready => {}
        }
    }
});
