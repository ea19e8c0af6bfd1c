//! The host side of the DSM page protocol (`dmhost_acpi::nvdimm` documents
//! the page layout): decode the guest's page, route the call by NFIT handle
//! to the device that listed it in `dsm_handles()`, and return the reply
//! bytes to write over the page. Root-device calls and `_FIT` reads are
//! served here ([`serve_page`]); every guest field is checked there and by
//! the device (`plugins/nvdimm/src/labels.rs`).

use std::{collections::BTreeMap, sync::Arc};

use dmhost_acpi::nvdimm::{serve_page, FitBuffer};
use dmhost_plugin_api::{DsmReply, DsmRequest};

use crate::{
    devices::{DeviceImpl, HostDevice},
    vm::bus::RateLimiter,
};

/// Serve one doorbell for `page` (the DSM page as the guest left it).
/// Never panics on guest data; the reply is at most one page.
pub fn serve(
    page: &[u8],
    fit: &mut FitBuffer,
    handles: &BTreeMap<u32, Arc<HostDevice>>,
    log: &RateLimiter,
) -> Vec<u8> {
    let handle = page.get(0..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let device = handles.get(&handle);
    let reply = serve_page(page, fit, |req| device.map(|d| call(d, req, log)));
    match reply {
        Ok(r) => r,
        Err(e) => {
            log.log(|_| log::warn!("ACPI: bad DSM page: {e}"));
            // A length below 4: the AML reports "not supported".
            vec![0; 4]
        }
    }
}

/// Hand `req` to `device`; a device error (fenced after a panic, ...)
/// answers "not supported".
fn call(device: &HostDevice, req: &DsmRequest, log: &RateLimiter) -> DsmReply {
    let result = match &mut *device.lock() {
        DeviceImpl::Plugin(d) => d.dsm(req).into_result(),
        DeviceImpl::Builtin(d) => Ok(d.dsm(req)),
        DeviceImpl::Remote(d) => d.dsm(req),
    };
    result.unwrap_or_else(|e| {
        log.log(|suppressed| {
            log::warn!(
                "ACPI: device {} _DSM function {} failed: {e} ({suppressed} suppressed)",
                device.id,
                req.function
            )
        });
        DsmReply::status(DsmReply::UNSUPPORTED)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmhost_acpi::nvdimm::{DSM_PAGE_SIZE, FIT_HANDLE};
    use dmhost_plugin_api::DeviceModel;
    use std::time::Duration;

    /// A label area of 256 bytes with QEMU's bounds checks, as a built-in device.
    struct Labels {
        handle: u32,
        area: Vec<u8>,
    }

    impl DeviceModel for Labels {
        fn dsm_handles(&self) -> Vec<u32> {
            vec![self.handle]
        }
        fn dsm(&mut self, r: &DsmRequest) -> DsmReply {
            let word = |o: usize| r.arg3.get(o..o + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            match r.function {
                0 => DsmReply::ok(0x71u32.to_le_bytes().to_vec()),
                4 => DsmReply::ok([256u32.to_le_bytes(), 4000u32.to_le_bytes()].concat()),
                5 => match (word(0), word(4)) {
                    (Some(o), Some(l)) if o.checked_add(l).is_some_and(|e| e as usize <= self.area.len()) => {
                        DsmReply::ok(self.area[o as usize..(o + l) as usize].to_vec())
                    }
                    _ => DsmReply::status(3),
                },
                _ => DsmReply::status(1),
            }
        }
        fn nfit_structures(&self) -> Vec<u8> {
            panic!("not called by serve")
        }
    }

    fn page(handle: u32, function: u32, arg3: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; DSM_PAGE_SIZE];
        p[0..4].copy_from_slice(&handle.to_le_bytes());
        p[4..8].copy_from_slice(&1u32.to_le_bytes());
        p[8..12].copy_from_slice(&function.to_le_bytes());
        p[12..12 + arg3.len()].copy_from_slice(arg3);
        p
    }

    fn setup() -> (FitBuffer, BTreeMap<u32, Arc<HostDevice>>, RateLimiter) {
        let area: Vec<u8> = (0..=255u8).collect();
        let dev = HostDevice::new("nv0", "nvdimm", DeviceImpl::Builtin(Box::new(Labels { handle: 1, area })));
        let mut fit = FitBuffer::default();
        fit.set(vec![7; 100]);
        (fit, BTreeMap::from([(1, Arc::new(dev))]), RateLimiter::new(5, Duration::from_secs(1)))
    }

    #[test]
    fn routes_by_handle() {
        let (mut fit, handles, log) = setup();
        let r = serve(&page(1, 4, &[]), &mut fit, &handles, &log);
        assert_eq!(r, [16, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0xa0, 0x0f, 0, 0]);
        let r = serve(
            &page(1, 5, &[[16u32.to_le_bytes(), 4u32.to_le_bytes()].concat(), vec![]].concat()),
            &mut fit,
            &handles,
            &log,
        );
        assert_eq!(r, [12, 0, 0, 0, 0, 0, 0, 0, 16, 17, 18, 19]);
        // Unknown handle: no such device; the FIT is served by the host.
        assert_eq!(serve(&page(9, 4, &[]), &mut fit, &handles, &log), [8, 0, 0, 0, 2, 0, 0, 0]);
        let r = serve(&page(FIT_HANDLE, 1, &0u32.to_le_bytes()), &mut fit, &handles, &log);
        assert_eq!((r.len(), &r[8..]), (108, &[7u8; 100][..]));
        // A short page is refused without a panic.
        assert_eq!(serve(&[1, 0], &mut fit, &handles, &log), [0; 4]);
    }

    #[test]
    fn random_pages_never_panic_and_replies_fit_the_page() {
        let (mut fit, handles, log) = setup();
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for i in 0..5000 {
            let mut p = vec![0u8; DSM_PAGE_SIZE];
            for b in p.iter_mut().take(32) {
                *b = next() as u8;
            }
            // Bias towards the interesting handles, revision 1 and the label functions.
            let r = next();
            if r & 1 == 0 {
                let h = [1u32, 0, FIT_HANDLE, 2][(r >> 1) as usize % 4];
                p[0..4].copy_from_slice(&h.to_le_bytes());
                p[4..8].copy_from_slice(&1u32.to_le_bytes());
                p[8..12].copy_from_slice(&((r >> 8) as u32 % 8).to_le_bytes());
            }
            if i % 97 == 0 {
                fit.set(vec![(i % 251) as u8; (r % 9000) as usize]);
            }
            let reply = serve(&p, &mut fit, &handles, &log);
            let len = u32::from_le_bytes(reply[0..4].try_into().unwrap()) as usize;
            assert!(reply.len() <= DSM_PAGE_SIZE, "{}", reply.len());
            assert_eq!(len, reply.len());
        }
    }
}
