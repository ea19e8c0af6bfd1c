//! Arbitrary text as a VM configuration file: a clear error or a checked
//! configuration, never a panic.
#![no_main]

use dmhost::config::VmFileConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = VmFileConfig::parse(text, "fuzz.toml", std::path::Path::new("/nonexistent"));
});
