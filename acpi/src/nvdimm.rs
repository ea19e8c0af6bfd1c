//! The NVDIMM root device `\_SB.NVDR` and the DSM page protocol between its
//! AML and the host (QEMU `docs/specs/acpi_nvdimm.rst`, `hw/acpi/nvdimm.c`).
//!
//! # Protocol
//!
//! A 4 KiB page of guest RAM (the *DSM page*, at a guest-physical address
//! the host chooses and passes to [`root_device_aml`]) is shared by AML and
//! host. `\_SB.NVDR.NCAL (UUID, Revision, Function, Arg3, Handle)`:
//!
//! 1. writes the request into the page (all little endian):
//!
//!    | offset | size | field                                            |
//!    |--------|------|--------------------------------------------------|
//!    | 0      | 4    | handle: 0 root, NFIT handle of a DIMM, 0x10000 FIT |
//!    | 4      | 4    | revision (Arg1)                                  |
//!    | 8      | 4    | function (Arg2)                                  |
//!    | 12     | 4084 | Arg3: the one Buffer (or Integer) of the Arg3 package |
//!
//! 2. rings the doorbell: a 4-byte write of the page address to I/O port
//!    [`DSM_DOORBELL_PORT`] (0x0a18). The host must serve the call before
//!    resuming the vCPU: read the page ([`parse_request`]), route it
//!    ([`serve_page`]) and write the reply over the page:
//!
//!    | offset | size     | field                                        |
//!    |--------|----------|----------------------------------------------|
//!    | 0      | 4        | length: 4 + payload length                   |
//!    | 4      | length-4 | payload: function 0 → supported mask (u32);  |
//!    |        |          | other functions → status (u32) then data     |
//!
//! 3. returns the payload as a Buffer. A reply length outside 4..=4096
//!    (nobody answered, or a broken host) returns a 4-byte buffer instead:
//!    mask 0 for function 0, status 1 (not supported) otherwise.
//!
//! The host must use its own DSM page address, never the value the guest
//! wrote to the port (QEMU trusts that value; a guest could point it at
//! any memory).
//!
//! `_FIT` reads the current NFIT structures through the same page with the
//! QEMU-reserved handle 0x10000, function 1 `{offset: u32}` →
//! `{status, fit[offset..]}` (at most 4088 bytes per call), looping until an
//! empty chunk; status 0x100 (FIT changed) restarts from offset 0.

use acpi_tables::{
    aml::{
        Add, Arg, BufferData, Concat, CreateDWordField, DeRefOf, Device, Else, Equal, FieldAccessType,
        FieldEntry, FieldLockRule, FieldUpdateRule, GreaterThan, If, Index, LessThan, Local, Method,
        MethodCall, Mid, Name, NotEqual, ObjectType, OpRegion, OpRegionSpace, Package, Path, Return, SizeOf,
        Store, Subtract, Uuid, While, ONE, ZERO,
    },
    Aml, AmlSink,
};
use dmhost_plugin_api::{DsmReply, DsmRequest};

/// Size of the DSM page.
pub const DSM_PAGE_SIZE: usize = 4096;
/// Bytes of the request header (handle, revision, function).
pub const DSM_IN_HEADER: usize = 12;
/// I/O port the AML writes (4 bytes) to hand a call to the host.
pub const DSM_DOORBELL_PORT: u16 = 0x0a18;
/// Width of the doorbell in bytes.
pub const DSM_DOORBELL_LEN: u8 = 4;
/// A suggested DSM page address (below 4 GiB, above typical low RAM); the
/// host must reserve it as RAM the guest OS does not otherwise use.
pub const DSM_PAGE_DEFAULT_GPA: u64 = 0xfeff_0000;

/// Handle of the root device.
pub const ROOT_HANDLE: u32 = 0;
/// QEMU's reserved handle for the FIT read by `_FIT`.
pub const FIT_HANDLE: u32 = 0x10000;
/// `_DSM` UUID of the root device.
pub const ROOT_DSM_UUID: &str = "2F10E7A4-9E91-11E4-89D3-123B93F75CBA";
/// `_DSM` UUID of a DIMM device.
pub const DIMM_DSM_UUID: &str = "4309AC30-0D11-11E4-9191-0800200C9A66";
/// QEMU's reserved UUID for the FIT read.
pub const FIT_DSM_UUID: &str = "648B9CF2-CDA1-4312-8AD9-49C4AF32BD62";
/// Status: the FIT changed while it was being read.
pub const STATUS_FIT_CHANGED: u32 = 0x100;
/// The DSM revision served.
pub const DSM_REVISION: u32 = 1;

/// Why a DSM page could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DsmPageError {
    #[error("DSM page is {0} bytes, expected {DSM_PAGE_SIZE}")]
    Size(usize),
}

/// Decode the request the AML wrote into the page.
pub fn parse_request(page: &[u8]) -> Result<DsmRequest, DsmPageError> {
    if page.len() != DSM_PAGE_SIZE {
        return Err(DsmPageError::Size(page.len()));
    }
    let word = |o: usize| u32::from_le_bytes([page[o], page[o + 1], page[o + 2], page[o + 3]]);
    Ok(DsmRequest {
        handle: word(0),
        revision: word(4),
        function: word(8),
        arg3: page[DSM_IN_HEADER..].to_vec().into(),
    })
}

/// Encode a reply into the page layout (`{length, payload}`); the host
/// writes these bytes at the start of the DSM page. A reply that does not
/// fit the page becomes status 1 (logged: a device bug).
pub fn encode_reply(function: u32, reply: &DsmReply) -> Vec<u8> {
    let payload: Vec<u8> = if function == 0 {
        // The mask alone; a failed query offers nothing.
        match reply.data.as_slice() {
            [a, b, c, d, ..] if reply.status == DsmReply::SUCCESS => vec![*a, *b, *c, *d],
            _ => vec![0; 4],
        }
    } else {
        let mut p = reply.status.to_le_bytes().to_vec();
        p.extend_from_slice(&reply.data);
        p
    };
    if payload.len() + 4 > DSM_PAGE_SIZE {
        log::error!("DSM reply of {} bytes does not fit the page", payload.len());
        return encode_reply(function, &DsmReply::status(DsmReply::UNSUPPORTED));
    }
    let mut out = ((payload.len() + 4) as u32).to_le_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

/// The NFIT structures `_FIT` returns, with QEMU's "changed during read"
/// flag.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FitBuffer {
    fit: Vec<u8>,
    dirty: bool,
}

impl FitBuffer {
    /// Most FIT bytes one read returns: the page minus `{length, status}`.
    pub const MAX_CHUNK: usize = DSM_PAGE_SIZE - 8;

    /// Replace the structures (NFIT body without header and reserved
    /// word) after a plug or unplug.
    pub fn set(&mut self, structures: Vec<u8>) {
        self.fit = structures;
        self.dirty = true;
    }

    pub fn structures(&self) -> &[u8] {
        &self.fit
    }

    /// QEMU `nvdimm_dsm_func_read_fit`.
    fn read(&mut self, arg3: &[u8]) -> DsmReply {
        let Some(offset) = arg3.get(0..4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])) else {
            return DsmReply::status(DsmReply::INVALID_INPUT);
        };
        let offset = offset as usize;
        if offset > self.fit.len() {
            return DsmReply::status(DsmReply::INVALID_INPUT);
        }
        if offset == 0 {
            self.dirty = false;
        } else if self.dirty {
            return DsmReply::status(STATUS_FIT_CHANGED);
        }
        let end = self.fit.len().min(offset + Self::MAX_CHUNK);
        DsmReply::ok(self.fit[offset..end].to_vec())
    }
}

/// Route one doorbell: decode `page`, serve the root device and the FIT
/// read here, hand DIMM calls to `dimm` (which returns `None` when no
/// device has that handle), and return the reply bytes to write at the
/// start of the page. Never panics on guest data.
pub fn serve_page(
    page: &[u8],
    fit: &mut FitBuffer,
    dimm: impl FnOnce(&DsmRequest) -> Option<DsmReply>,
) -> Result<Vec<u8>, DsmPageError> {
    let req = parse_request(page)?;
    Ok(encode_reply(req.function, &route(&req, fit, dimm)))
}

fn route(
    req: &DsmRequest,
    fit: &mut FitBuffer,
    dimm: impl FnOnce(&DsmRequest) -> Option<DsmReply>,
) -> DsmReply {
    let mask = |m: u32| DsmReply::ok(m.to_le_bytes().to_vec());
    if req.revision != DSM_REVISION {
        return DsmReply::status(DsmReply::UNSUPPORTED);
    }
    match (req.handle, req.function) {
        (FIT_HANDLE, 0) => mask(1 | 1 << 1),
        (FIT_HANDLE, 1) => fit.read(&req.arg3),
        (FIT_HANDLE, _) => DsmReply::status(DsmReply::UNSUPPORTED),
        // The root device offers no function but the query.
        (ROOT_HANDLE, 0) => mask(0),
        (ROOT_HANDLE, _) => DsmReply::status(DsmReply::UNSUPPORTED),
        (_, function) => dimm(req).unwrap_or_else(|| {
            if function == 0 {
                mask(0)
            } else {
                DsmReply::status(DsmReply::NO_SUCH_DEVICE)
            }
        }),
    }
}

/// Pre-rendered AML bytes (lets builders own their temporaries).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

fn raw(items: &[&dyn Aml]) -> Raw {
    let mut v = Vec::new();
    for i in items {
        i.to_aml_bytes(&mut v);
    }
    Raw(v)
}

/// `If (Arg2 == 0) { Return (Buffer (4) {0}) } Return (Buffer (4) {1, 0, 0, 0})`:
/// the answer when the call cannot be made or was not answered.
fn no_reply() -> Raw {
    let mask0 = BufferData::new(vec![0; 4]);
    let ret_mask = Return::new(&mask0);
    let is_query = Equal::new(&Arg(2), &ZERO);
    let if_query = If::new(&is_query, vec![&ret_mask]);
    let unsupported = BufferData::new(vec![1, 0, 0, 0]);
    let ret = Return::new(&unsupported);
    raw(&[&if_query, &ret])
}

/// `Device (NVDR)` for `Scope (\_SB)`: `_HID "ACPI0012"`, `MEMA` (the DSM
/// page address), `NCAL`, the root `_DSM`, `RFIT` and `_FIT`.
pub fn root_device_aml(dsm_page_gpa: u64) -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"ACPI0012");
    let mema = Name::new("MEMA".into(), &dsm_page_gpa);
    let rsta = Name::new("RSTA".into(), &ZERO);
    let regions = page_regions(dsm_page_gpa);
    let ncal = ncal();
    let call = MethodCall::new("NCAL".into(), vec![&Arg(0), &Arg(1), &Arg(2), &Arg(3), &ZERO]);
    let ret = Return::new(&call);
    let dsm = Method::new("_DSM".into(), 4, false, vec![&ret]);
    let rfit = rfit();
    let fit = fit_method();
    let mut out = Vec::new();
    Device::new("NVDR".into(), vec![&hid, &mema, &rsta, &regions, &ncal, &dsm, &rfit, &fit])
        .to_aml_bytes(&mut out);
    out
}

/// The doorbell port `NPIO.NTFI` and the DSM page `NRAM`, with its request
/// (`HDLE`, `REVS`, `FUNC`, `FARG`) and reply (`RLEN`, `ODAT`) views.
fn page_regions(dsm_page_gpa: u64) -> Raw {
    let page_bits = |bytes: usize| bytes * 8;
    let npio = OpRegion::new("NPIO".into(), OpRegionSpace::SystemIO, &DSM_DOORBELL_PORT, &DSM_DOORBELL_LEN);
    let page_len = DSM_PAGE_SIZE as u16;
    let nram = OpRegion::new("NRAM".into(), OpRegionSpace::SystemMemory, &dsm_page_gpa, &page_len);
    let field = |region: &str, entries: Vec<FieldEntry>| {
        acpi_tables::aml::Field::new(
            region.into(),
            FieldAccessType::DWord,
            FieldLockRule::NoLock,
            FieldUpdateRule::Preserve,
            entries,
        )
    };
    let f_io = field("NPIO", vec![FieldEntry::Named(*b"NTFI", 32)]);
    let f_in = field(
        "NRAM",
        vec![
            FieldEntry::Named(*b"HDLE", 32),
            FieldEntry::Named(*b"REVS", 32),
            FieldEntry::Named(*b"FUNC", 32),
            FieldEntry::Named(*b"FARG", page_bits(DSM_PAGE_SIZE - DSM_IN_HEADER)),
        ],
    );
    let f_out = field(
        "NRAM",
        vec![FieldEntry::Named(*b"RLEN", 32), FieldEntry::Named(*b"ODAT", page_bits(DSM_PAGE_SIZE - 4))],
    );
    raw(&[&npio, &nram, &f_io, &f_in, &f_out])
}

/// `Method (NCAL, 5, Serialized)`: QEMU's common DSM method, plus the
/// reply-length check of step 3 above.
fn ncal() -> Raw {
    let p_farg = Path::new("FARG");
    let p_func = Path::new("FUNC");
    let p_hdle = Path::new("HDLE");
    let p_mema = Path::new("MEMA");
    let p_ntfi = Path::new("NTFI");
    let p_revs = Path::new("REVS");
    let p_rlen = Path::new("RLEN");
    let p_odat = Path::new("ODAT");
    let page_len = DSM_PAGE_SIZE as u16;
    // Local0 = the UUID expected for this handle.
    let (root_uuid, fit_uuid, dimm_uuid) =
        (Uuid::new(ROOT_DSM_UUID), Uuid::new(FIT_DSM_UUID), Uuid::new(DIMM_DSM_UUID));
    let set_root = Store::new(&Local(0), &root_uuid);
    let set_fit = Store::new(&Local(0), &fit_uuid);
    let set_dimm = Store::new(&Local(0), &dimm_uuid);
    let is_root = Equal::new(&Arg(4), &ZERO);
    let is_fit = Equal::new(&Arg(4), &FIT_HANDLE);
    let if_fit = If::new(&is_fit, vec![&set_fit]);
    let else_dimm = Else::new(vec![&set_dimm]);
    let if_root = If::new(&is_root, vec![&set_root]);
    let else_root = Else::new(vec![&if_fit, &else_dimm]);

    let fail = no_reply();
    let unpatched = Equal::new(&p_mema, &ZERO);
    let if_unpatched = If::new(&unpatched, vec![&fail]);
    let bad_uuid = NotEqual::new(&Arg(0), &Local(0));
    let if_bad_uuid = If::new(&bad_uuid, vec![&fail]);

    let set_hdle = Store::new(&p_hdle, &Arg(4));
    let set_revs = Store::new(&p_revs, &Arg(1));
    let set_func = Store::new(&p_func, &Arg(2));

    // If (ObjectType (Arg3) == 4 /* Package */) { If (SizeOf (Arg3) == 1) {
    //     Local2 = Index (Arg3, 0); Local3 = DerefOf (Local2); FARG = Local3 } }
    let otype = ObjectType::new(&Arg(3));
    let is_pkg = Equal::new(&otype, &4u8);
    let size = SizeOf::new(&Arg(3));
    let one_el = Equal::new(&size, &ONE);
    let idx = Index::new(&ZERO, &Arg(3), &ZERO);
    let get_el = Store::new(&Local(2), &idx);
    let deref = DeRefOf::new(&Local(2));
    let get_val = Store::new(&Local(3), &deref);
    let set_farg = Store::new(&p_farg, &Local(3));
    let if_one = If::new(&one_el, vec![&get_el, &get_val, &set_farg]);
    let if_pkg = If::new(&is_pkg, vec![&if_one]);

    let ring = Store::new(&p_ntfi, &p_mema);

    // Local1 = RLEN; reject lengths outside 4..=4096.
    let get_len = Store::new(&Local(1), &p_rlen);
    let too_short = LessThan::new(&Local(1), &4u8);
    let if_short = If::new(&too_short, vec![&fail]);
    let too_long = GreaterThan::new(&Local(1), &page_len);
    let if_long = If::new(&too_long, vec![&fail]);
    let sub = Subtract::new(&Local(1), &Local(1), &4u8);
    let empty = BufferData::new(vec![]);
    let ret_empty = Return::new(&empty);
    let is_empty = Equal::new(&Local(1), &ZERO);
    let if_empty = If::new(&is_empty, vec![&ret_empty]);
    let payload = Mid::new(&p_odat, &ZERO, &Local(1), &Local(7));
    let ret = Return::new(&Local(7));

    raw(&[&Method::new(
        "NCAL".into(),
        5,
        true,
        vec![
            &if_root,
            &else_root,
            &if_unpatched,
            &if_bad_uuid,
            &set_hdle,
            &set_revs,
            &set_func,
            &if_pkg,
            &ring,
            &get_len,
            &if_short,
            &if_long,
            &sub,
            &if_empty,
            &payload,
            &ret,
        ],
    )])
}

/// `Method (RFIT, 1, Serialized)`: one FIT chunk at offset Arg0, or an
/// empty buffer at the end or on error; the status lands in `RSTA`.
fn rfit() -> Raw {
    let p_rsta = Path::new("RSTA");
    let pkg = Package::new(vec![&ZERO]);
    let init = Store::new(&Local(1), &pkg);
    let idx = Index::new(&ZERO, &Local(1), &ZERO);
    let set_off = Store::new(&idx, &Arg(0));
    let uuid = Uuid::new(FIT_DSM_UUID);
    let call = MethodCall::new("NCAL".into(), vec![&uuid, &DSM_REVISION, &ONE, &Local(1), &FIT_HANDLE]);
    let get = Store::new(&Local(0), &call);
    let empty = BufferData::new(vec![]);
    let ret_empty = Return::new(&empty);
    let size = SizeOf::new(&Local(0));
    let short = LessThan::new(&size, &4u8);
    let if_short = If::new(&short, vec![&ret_empty]);
    let stau = Path::new("STAU");
    let create = CreateDWordField::new(&stau, &Local(0), &ZERO);
    let set_rsta = Store::new(&p_rsta, &stau);
    let failed = NotEqual::new(&stau, &ZERO);
    let if_failed = If::new(&failed, vec![&ret_empty]);
    let len = Subtract::new(&Local(2), &size, &4u8);
    let none = Equal::new(&Local(2), &ZERO);
    let if_none = If::new(&none, vec![&ret_empty]);
    let mid = Mid::new(&Local(0), &4u8, &Local(2), &Local(3));
    let ret = Return::new(&Local(3));
    raw(&[&Method::new(
        "RFIT".into(),
        1,
        true,
        vec![&init, &set_off, &get, &if_short, &create, &set_rsta, &if_failed, &len, &if_none, &mid, &ret],
    )])
}

/// `Method (_FIT, 0, Serialized)`: concatenate RFIT chunks until an empty
/// one; restart when the FIT changed during the read (QEMU's loop).
fn fit_method() -> Raw {
    let p_rsta = Path::new("RSTA");
    let empty = BufferData::new(vec![]);
    let init_fit = Store::new(&Local(2), &empty);
    let init_off = Store::new(&Local(3), &ZERO);
    let call = MethodCall::new("RFIT".into(), vec![&Local(3)]);
    let get = Store::new(&Local(0), &call);
    let size = SizeOf::new(&Local(0));
    let get_size = Store::new(&Local(1), &size);
    let changed = Equal::new(&p_rsta, &STATUS_FIT_CHANGED);
    let if_changed = If::new(&changed, vec![&init_fit, &init_off]);
    let done = Equal::new(&Local(1), &ZERO);
    let ret = Return::new(&Local(2));
    let if_done = If::new(&done, vec![&ret]);
    let advance = Add::new(&Local(3), &Local(3), &Local(1));
    let append = Concat::new(&Local(2), &Local(2), &Local(0));
    let else_more = Else::new(vec![&if_done, &advance, &append]);
    let body = While::new(&ONE, vec![&get, &get_size, &if_changed, &else_more]);
    // Unreachable, but iasl wants every path of _FIT to return a Buffer.
    raw(&[&Method::new("_FIT".into(), 0, true, vec![&init_fit, &init_off, &body, &ret])])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(handle: u32, revision: u32, function: u32, arg3: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; DSM_PAGE_SIZE];
        p[0..4].copy_from_slice(&handle.to_le_bytes());
        p[4..8].copy_from_slice(&revision.to_le_bytes());
        p[8..12].copy_from_slice(&function.to_le_bytes());
        p[12..12 + arg3.len()].copy_from_slice(arg3);
        p
    }

    fn no_dimm(_: &DsmRequest) -> Option<DsmReply> {
        None
    }

    #[test]
    fn request_parsing() {
        let r = parse_request(&page(1, 1, 5, &[1, 2, 3])).unwrap();
        assert_eq!((r.handle, r.revision, r.function, r.arg3.len()), (1, 1, 5, 4084));
        assert_eq!(&r.arg3[..4], &[1, 2, 3, 0]);
        assert_eq!(parse_request(&[0; 12]), Err(DsmPageError::Size(12)));
    }

    #[test]
    fn reply_encoding() {
        assert_eq!(encode_reply(0, &DsmReply::ok(vec![0x71, 0, 0, 0])), [8, 0, 0, 0, 0x71, 0, 0, 0]);
        assert_eq!(encode_reply(0, &DsmReply::status(1)), [8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(encode_reply(4, &DsmReply::ok(vec![9, 9])), [10, 0, 0, 0, 0, 0, 0, 0, 9, 9]);
        assert_eq!(encode_reply(5, &DsmReply::status(3)), [8, 0, 0, 0, 3, 0, 0, 0]);
        let huge = DsmReply::ok(vec![0; 4090]);
        assert_eq!(encode_reply(5, &huge), [8, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn routing_matches_qemu() {
        let mut fit = FitBuffer::default();
        let serve = |p: &[u8], fit: &mut FitBuffer| serve_page(p, fit, no_dimm).unwrap();
        assert_eq!(serve(&page(0, 1, 0, &[]), &mut fit), [8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(serve(&page(0, 1, 3, &[]), &mut fit), [8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(serve(&page(5, 1, 4, &[]), &mut fit), [8, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(serve(&page(5, 1, 0, &[]), &mut fit), [8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(serve(&page(5, 2, 4, &[]), &mut fit), [8, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(serve(&page(FIT_HANDLE, 1, 0, &[]), &mut fit), [8, 0, 0, 0, 3, 0, 0, 0]);
        let r = serve_page(&page(1, 1, 4, &[]), &mut fit, |req| {
            assert_eq!(req.handle, 1);
            Some(DsmReply::ok(vec![7]))
        })
        .unwrap();
        assert_eq!(r, [9, 0, 0, 0, 0, 0, 0, 0, 7]);
    }

    #[test]
    fn fit_reads_in_chunks_and_detects_changes() {
        let mut fit = FitBuffer::default();
        let structures: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        fit.set(structures.clone());
        let read = |fit: &mut FitBuffer, off: u32| {
            serve_page(&page(FIT_HANDLE, 1, 1, &off.to_le_bytes()), fit, no_dimm).unwrap()
        };
        let first = read(&mut fit, 0);
        assert_eq!(u32::from_le_bytes(first[0..4].try_into().unwrap()) as usize, 8 + 4088);
        assert_eq!(&first[8..], &structures[..4088]);
        let second = read(&mut fit, 4088);
        assert_eq!(&second[8..], &structures[4088..]);
        assert_eq!(read(&mut fit, 5000), [8, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(read(&mut fit, 5001), [8, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(read(&mut fit, u32::MAX), [8, 0, 0, 0, 3, 0, 0, 0]);
        fit.set(structures);
        assert_eq!(read(&mut fit, 4088), [8, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn random_pages_never_panic() {
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut fit = FitBuffer::default();
        fit.set(vec![1; 300]);
        for _ in 0..2000 {
            let mut p = vec![0u8; DSM_PAGE_SIZE];
            for b in p.iter_mut().take(64) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                *b = s as u8;
            }
            if s & 3 == 0 {
                p[0..4].copy_from_slice(&FIT_HANDLE.to_le_bytes());
                p[4..8].copy_from_slice(&1u32.to_le_bytes());
            }
            let r = serve_page(&p, &mut fit, no_dimm).unwrap();
            let len = u32::from_le_bytes(r[0..4].try_into().unwrap()) as usize;
            assert_eq!(len, r.len());
            assert!(len <= DSM_PAGE_SIZE);
        }
    }
}
