//! The guest's DSM page as the host's `_DSM` doorbell reads it:
//! `cargo +nightly fuzz run dsm_page`. The page is routed through the
//! host's `acpi_host::dsm::serve` (root device, FIT reads, a DIMM handle
//! owned by a device with bounds-checked label data); the reply must be a
//! well-formed `{length, payload}` of at most one page, never a panic.
#![no_main]

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use dmhost::{
    acpi_host::dsm::serve,
    devices::{DeviceImpl, HostDevice},
    vm::bus::RateLimiter,
};
use dmhost_acpi::nvdimm::{FitBuffer, DSM_PAGE_SIZE};
use dmhost_plugin_api::{DeviceModel, DsmReply, DsmRequest};
use libfuzzer_sys::fuzz_target;

/// 4 KiB of labels with the checks the nvdimm plugin makes.
struct Labels(Vec<u8>);

impl DeviceModel for Labels {
    fn dsm(&mut self, r: &DsmRequest) -> DsmReply {
        let word = |o: usize| r.arg3.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let (Some(off), Some(len)) = (word(0), word(4)) else { return DsmReply::status(3) };
        match off.checked_add(len) {
            Some(end) if end as usize <= self.0.len() && len <= 4084 => match r.function {
                5 => DsmReply::ok(self.0[off as usize..end as usize].to_vec()),
                6 => match r.arg3.get(8..8 + len as usize) {
                    Some(d) => {
                        self.0[off as usize..end as usize].copy_from_slice(d);
                        DsmReply::ok(vec![])
                    }
                    None => DsmReply::status(3),
                },
                _ => DsmReply::status(1),
            },
            _ => DsmReply::status(3),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (fit_len, page) = match data.split_first() {
        Some((n, rest)) => (usize::from(*n) * 37, rest),
        None => return,
    };
    let mut fit = FitBuffer::default();
    fit.set(vec![0xa5; fit_len]);
    let dev = HostDevice::new("nv0", "nvdimm", DeviceImpl::Builtin(Box::new(Labels(vec![0; 4096]))));
    let handles = BTreeMap::from([(1u32, Arc::new(dev))]);
    let log = RateLimiter::new(1, Duration::from_secs(60));
    // Short inputs are padded to a page (the host always reads 4 KiB);
    // raw short slices go through too.
    let mut full = page.to_vec();
    full.resize(DSM_PAGE_SIZE, 0);
    for p in [&full[..], page] {
        let reply = serve(p, &mut fit, &handles, &log);
        assert!(reply.len() >= 4 && reply.len() <= DSM_PAGE_SIZE);
        let len = u32::from_le_bytes([reply[0], reply[1], reply[2], reply[3]]) as usize;
        assert!(len == reply.len() || len == 0);
    }
});
