//! `_DSM` for one NVDIMM: the namespace-label functions of the Intel DSM
//! spec Rev1 (functions 0, 4, 5, 6), as QEMU `hw/acpi/nvdimm.c` serves them.
//!
//! Every field of the guest's buffer is untrusted: a short Arg3, an
//! `offset + length` that overflows or passes the label area, or a length
//! above the maximum transfer size is status 3 (invalid input), never an
//! out-of-bounds access.
//!
//! Reply shape ([`DsmReply`]): for function 0, `data` is the 4-byte
//! supported-function mask (the page carries no status word); for every
//! other function the page carries `status` then `data`.

use dmhost_plugin_api::{DsmReply, DsmRequest};

/// Size of the DSM page shared with the AML (QEMU `NVDIMM_DSM_MEMORY_SIZE`).
pub const DSM_PAGE_SIZE: u32 = 4096;
/// Input page header: handle, revision, function (QEMU `NvdimmDsmIn`).
pub const DSM_IN_HEADER: u32 = 12;
/// Output header of Get Namespace Label Data: length, status.
const GET_LABEL_OUT_HEADER: u32 = 8;
/// Input header of Set Namespace Label Data: offset, length.
const SET_LABEL_IN_HEADER: u32 = 8;

/// QEMU `nvdimm_get_max_xfer_label_size`: the most one Get or Set Namespace
/// Label Data call can move through the page.
pub const MAX_XFER: u32 = {
    let max_get = DSM_PAGE_SIZE - GET_LABEL_OUT_HEADER;
    let max_set = DSM_PAGE_SIZE - DSM_IN_HEADER - SET_LABEL_IN_HEADER;
    if max_get < max_set {
        max_get
    } else {
        max_set
    }
};

/// The only DSM revision served (QEMU: "DSM Spec Rev1").
pub const DSM_REVISION: u32 = 1;

pub const FN_QUERY: u32 = 0;
pub const FN_GET_LABEL_SIZE: u32 = 4;
pub const FN_GET_LABEL_DATA: u32 = 5;
pub const FN_SET_LABEL_DATA: u32 = 6;

/// Why a label call was refused (logged; the guest sees a status code).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("arg3 is {got} bytes, need {need}")]
    ArgTooShort { need: usize, got: usize },
    #[error("offset {offset:#x} + length {length:#x} overflows")]
    Overflow { offset: u32, length: u32 },
    #[error("offset {offset:#x} + length {length:#x} is beyond the {size:#x}-byte label area")]
    PastEnd { offset: u32, length: u32, size: u32 },
    #[error("length {0:#x} is above the maximum transfer size {MAX_XFER:#x}")]
    TooLong(u32),
    #[error("the label area is read-only")]
    ReadOnly,
    #[error("backend access failed at {offset:#x}+{length:#x}")]
    Backend { offset: u32, length: u32 },
}

/// The label storage of one DIMM.
pub trait LabelArea {
    /// Size in bytes; 0 means the DIMM has no labels.
    fn size(&self) -> u32;
    fn writable(&self) -> bool;
    /// Read `buf.len()` bytes at `offset` (already bounds checked).
    fn read(&self, offset: u32, buf: &mut [u8]) -> Result<(), LabelError>;
    /// Write `data` at `offset` (already bounds checked).
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), LabelError>;
}

/// The function-0 mask (QEMU `nvdimm_dsm_device`): bit 0 plus the label
/// functions when there are labels, else nothing. A read-only area does not
/// offer Set Namespace Label Data.
pub fn supported_functions(area: &dyn LabelArea) -> u32 {
    if area.size() == 0 {
        return 0;
    }
    let mut mask = 1 | 1 << FN_GET_LABEL_SIZE | 1 << FN_GET_LABEL_DATA;
    if area.writable() {
        mask |= 1 << FN_SET_LABEL_DATA;
    }
    mask
}

/// Serve a `_DSM` call addressed to the DIMM with NFIT handle `handle`.
pub fn serve(area: &mut dyn LabelArea, handle: u32, req: &DsmRequest) -> DsmReply {
    if req.revision != DSM_REVISION {
        return DsmReply::status(DsmReply::UNSUPPORTED);
    }
    if req.function == FN_QUERY {
        let mask = if req.handle == handle { supported_functions(area) } else { 0 };
        return DsmReply::ok(mask.to_le_bytes().to_vec());
    }
    if req.handle != handle {
        return DsmReply::status(DsmReply::NO_SUCH_DEVICE);
    }
    let mask = supported_functions(area);
    if req.function >= 32 || mask & (1 << req.function) == 0 {
        return DsmReply::status(DsmReply::UNSUPPORTED);
    }
    let result = match req.function {
        FN_GET_LABEL_SIZE => Ok(label_size(area)),
        FN_GET_LABEL_DATA => get_label_data(area, &req.arg3),
        FN_SET_LABEL_DATA => set_label_data(area, &req.arg3),
        _ => return DsmReply::status(DsmReply::UNSUPPORTED),
    };
    result.unwrap_or_else(|e| {
        log::debug!("nvdimm handle {handle}: _DSM function {} refused: {e}", req.function);
        DsmReply::status(match e {
            LabelError::ReadOnly => DsmReply::UNSUPPORTED,
            _ => DsmReply::INVALID_INPUT,
        })
    })
}

/// Function 4: label area size and maximum transfer size.
fn label_size(area: &dyn LabelArea) -> DsmReply {
    let mut data = area.size().to_le_bytes().to_vec();
    data.extend_from_slice(&MAX_XFER.to_le_bytes());
    DsmReply::ok(data)
}

/// `offset`, `length` from the first 8 bytes of Arg3.
fn offset_length(arg3: &[u8]) -> Result<(u32, u32), LabelError> {
    let too_short = || LabelError::ArgTooShort { need: 8, got: arg3.len() };
    let offset = arg3.get(0..4).ok_or_else(too_short)?;
    let length = arg3.get(4..8).ok_or_else(too_short)?;
    let word = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    Ok((word(offset), word(length)))
}

/// QEMU `nvdimm_rw_label_data_check`, with checked arithmetic.
fn check(area: &dyn LabelArea, offset: u32, length: u32) -> Result<(), LabelError> {
    let end = offset.checked_add(length).ok_or(LabelError::Overflow { offset, length })?;
    if end > area.size() {
        return Err(LabelError::PastEnd { offset, length, size: area.size() });
    }
    if length > MAX_XFER {
        return Err(LabelError::TooLong(length));
    }
    Ok(())
}

/// Function 5: `{offset, length}` in, the label bytes out.
fn get_label_data(area: &dyn LabelArea, arg3: &[u8]) -> Result<DsmReply, LabelError> {
    let (offset, length) = offset_length(arg3)?;
    check(area, offset, length)?;
    let mut data = vec![0u8; length as usize];
    area.read(offset, &mut data)?;
    Ok(DsmReply::ok(data))
}

/// Function 6: `{offset, length, data[length]}` in, status out.
fn set_label_data(area: &mut dyn LabelArea, arg3: &[u8]) -> Result<DsmReply, LabelError> {
    let (offset, length) = offset_length(arg3)?;
    check(&*area, offset, length)?;
    let need = SET_LABEL_IN_HEADER as usize + length as usize;
    let data = arg3
        .get(SET_LABEL_IN_HEADER as usize..need)
        .ok_or(LabelError::ArgTooShort { need, got: arg3.len() })?;
    if !area.writable() {
        return Err(LabelError::ReadOnly);
    }
    area.write(offset, data)?;
    Ok(DsmReply::status(DsmReply::SUCCESS))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An in-memory label area.
    pub(crate) struct VecArea {
        pub bytes: Vec<u8>,
        pub writable: bool,
    }

    impl LabelArea for VecArea {
        fn size(&self) -> u32 {
            self.bytes.len() as u32
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn read(&self, offset: u32, buf: &mut [u8]) -> Result<(), LabelError> {
            let o = offset as usize;
            buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
            Ok(())
        }
        fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), LabelError> {
            let o = offset as usize;
            self.bytes[o..o + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    pub(crate) fn req(handle: u32, function: u32, arg3: Vec<u8>) -> DsmRequest {
        DsmRequest { handle, revision: 1, function, arg3: arg3.into() }
    }

    pub(crate) fn rw_arg(offset: u32, length: u32, data: &[u8]) -> Vec<u8> {
        let mut v = offset.to_le_bytes().to_vec();
        v.extend_from_slice(&length.to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn area(size: usize) -> VecArea {
        VecArea { bytes: vec![0; size], writable: true }
    }

    #[test]
    fn max_xfer_matches_qemu() {
        // min(4096 - 8, 4096 - 12 - 8)
        assert_eq!(MAX_XFER, 4076);
    }

    #[test]
    fn function0_masks() {
        let mut a = area(128 << 10);
        let r = serve(&mut a, 1, &req(1, 0, vec![]));
        assert_eq!((r.status, r.data.as_slice()), (0, &0x71u32.to_le_bytes()[..]));
        let mut ro = VecArea { bytes: vec![0; 4096], writable: false };
        assert_eq!(serve(&mut ro, 1, &req(1, 0, vec![])).data.as_slice(), 0x31u32.to_le_bytes());
        let mut none = area(0);
        assert_eq!(serve(&mut none, 1, &req(1, 0, vec![])).data.as_slice(), [0; 4]);
        // Another handle: no functions.
        assert_eq!(serve(&mut a, 1, &req(2, 0, vec![])).data.as_slice(), [0; 4]);
    }

    #[test]
    fn status_codes() {
        let mut a = area(128 << 10);
        assert_eq!(serve(&mut a, 1, &req(2, 4, vec![])).status, DsmReply::NO_SUCH_DEVICE);
        for f in [1, 2, 3, 7, 31, 32, 1000, u32::MAX] {
            assert_eq!(serve(&mut a, 1, &req(1, f, vec![])).status, DsmReply::UNSUPPORTED, "{f}");
        }
        let mut r = req(1, 4, vec![]);
        r.revision = 2;
        assert_eq!(serve(&mut a, 1, &r).status, DsmReply::UNSUPPORTED);
        let mut none = area(0);
        for f in [4, 5, 6] {
            assert_eq!(serve(&mut none, 1, &req(1, f, rw_arg(0, 0, &[]))).status, 1);
        }
        let mut ro = VecArea { bytes: vec![0; 4096], writable: false };
        assert_eq!(serve(&mut ro, 1, &req(1, 6, rw_arg(0, 1, &[1]))).status, 1);
        assert_eq!(ro.bytes[0], 0);
    }

    #[test]
    fn label_size_reply() {
        let mut a = area(128 << 10);
        let r = serve(&mut a, 1, &req(1, 4, vec![]));
        assert_eq!(r.status, 0);
        assert_eq!(r.data.as_slice(), [rw_arg(128 << 10, 4076, &[])].concat());
    }

    #[test]
    fn write_then_read_back() {
        let mut a = area(128 << 10);
        let data: Vec<u8> = (0..MAX_XFER).map(|i| i as u8 ^ 0x5a).collect();
        let off = (128 << 10) - MAX_XFER;
        assert_eq!(serve(&mut a, 1, &req(1, 6, rw_arg(off, MAX_XFER, &data))).status, 0);
        let r = serve(&mut a, 1, &req(1, 5, rw_arg(off, MAX_XFER, &[])));
        assert_eq!((r.status, r.data.as_slice()), (0, data.as_slice()));
        // Zero-length transfers are valid, also at the very end.
        let r = serve(&mut a, 1, &req(1, 5, rw_arg(128 << 10, 0, &[])));
        assert_eq!((r.status, r.data.len()), (0, 0));
    }

    #[test]
    fn every_out_of_bounds_case_is_status_3() {
        let size = 128u32 << 10;
        let mut a = area(size as usize);
        let cases: Vec<(u32, Vec<u8>)> = vec![
            (5, vec![]),                              // arg3 empty
            (5, vec![0; 7]),                          // arg3 too short
            (6, vec![0; 4]),                          // arg3 too short
            (5, rw_arg(u32::MAX, 2, &[])),            // overflow
            (6, rw_arg(2, u32::MAX, &[])),            // overflow
            (5, rw_arg(size - 1, 2, &[])),            // past end
            (6, rw_arg(size, 1, &[0])),               // past end
            (5, rw_arg(size + 1, 0, &[])),            // offset past end
            (5, rw_arg(0, MAX_XFER + 1, &[])),        // above max xfer
            (6, rw_arg(0, MAX_XFER + 1, &[0; 4077])), // above max xfer
            (6, rw_arg(0, 16, &[1; 15])),             // data shorter than length
        ];
        for (f, arg3) in cases {
            let r = serve(&mut a, 1, &req(1, f, arg3.clone()));
            assert_eq!(
                r.status,
                DsmReply::INVALID_INPUT,
                "function {f} arg3 {:?}",
                &arg3[..arg3.len().min(8)]
            );
            assert!(r.data.is_empty());
        }
        assert!(a.bytes.iter().all(|&b| b == 0), "a refused write changed the labels");
    }

    #[test]
    fn fuzz_like_random_arg3_never_panics() {
        // xorshift: deterministic, no dependency.
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let size = 128u32 << 10;
        let mut a = area(size as usize);
        for i in 0..20_000 {
            let len = (next() % 40) as usize + if i % 7 == 0 { 4100 } else { 0 };
            let mut arg3: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias half of the cases toward the interesting edges.
            if arg3.len() >= 8 && i % 2 == 0 {
                let edges = [0, 1, size - 1, size, size + 1, MAX_XFER, MAX_XFER + 1, u32::MAX];
                let o = edges[(next() % 8) as usize];
                let l = edges[(next() % 8) as usize];
                arg3[0..4].copy_from_slice(&o.to_le_bytes());
                arg3[4..8].copy_from_slice(&l.to_le_bytes());
            }
            let f = [0, 4, 5, 6, (next() % 64) as u32][(next() % 5) as usize];
            let r = serve(&mut a, 1, &req(1, f, arg3.clone()));
            if (f == 5 || f == 6) && r.status != 0 {
                assert_eq!(r.status, DsmReply::INVALID_INPUT);
            }
            if r.status == 0 && f == 5 {
                let (o, l) = offset_length(&arg3).unwrap();
                assert!(u64::from(o) + u64::from(l) <= u64::from(size) && l <= MAX_XFER);
                assert_eq!(r.data.len(), l as usize);
            }
            if arg3.len() < 8 && (f == 5 || f == 6) {
                assert_eq!(r.status, DsmReply::INVALID_INPUT);
            }
        }
    }
}
