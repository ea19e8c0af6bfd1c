//! The nvdimm's ACPI: its NFIT sub-structures (ACPI 6.x 5.2.25, laid out as
//! QEMU `nvdimm_build_structure_{spa,memdev,dcr}`) and the AML of its
//! `NVxx` device, which the host places in `Scope (\_SB.NVDR)`.
//!
//! The device methods forward to the root device's shared method
//! `\_SB.NVDR.NCAL (UUID, Revision, Function, Arg3, Handle)` (built by the
//! `dmhost-acpi` crate), which runs the DSM page protocol with the host and
//! returns the reply payload as a buffer.

use acpi_tables::{
    aml::{
        Arg, BufferData, CreateDWordField, Device, GreaterEqual, If, Index, Local, Method, MethodCall, Mid,
        Name, Package, Path, Return, SizeOf, Store, Subtract, Uuid, ZERO,
    },
    Aml,
};

use crate::labels::DSM_REVISION;

/// SPA range type GUID "Persistent Memory Region" 66F0D379-B4F3-4074-AC43-0D3318B78CDB,
/// in its mixed-endian (EFI GUID) byte form.
pub const PMEM_REGION_GUID: [u8; 16] =
    [0x79, 0xd3, 0xf0, 0x66, 0xf3, 0xb4, 0x74, 0x40, 0xac, 0x43, 0x0d, 0x33, 0x18, 0xb7, 0x8c, 0xdb];
/// `_DSM` UUID of an NVDIMM device (Intel DSM interface).
pub const DIMM_DSM_UUID: &str = "4309AC30-0D11-11E4-9191-0800200C9A66";
/// The root device's shared call method.
pub const NCAL_PATH: &str = "\\_SB_.NVDR.NCAL";

pub const NFIT_SPA_TYPE: u16 = 0;
pub const NFIT_SPA_LEN: u16 = 56;
pub const NFIT_MEMDEV_TYPE: u16 = 1;
pub const NFIT_MEMDEV_LEN: u16 = 48;
pub const NFIT_DCR_TYPE: u16 = 4;
pub const NFIT_DCR_LEN: u16 = 80;

const EFI_MEMORY_WB: u64 = 0x8;
const EFI_MEMORY_NV: u64 = 0x8000;
/// SPA flags: control region only for hot add/online (bit 0), proximity
/// domain valid (bit 1).
const SPA_FLAGS: u16 = 1 | 2;
/// Memory device flags: ACPI_NFIT_MEM_NOT_ARMED.
const MEMDEV_NOT_ARMED: u16 = 1 << 3;
/// Format interface code: byte addressable, not energy backed (JEDEC Annex L
/// 0x0301), stored as QEMU and Linux (`NFIT_FIC_BYTEN`) do: `cpu_to_le16(0x301)`.
const FIC_BYTEN: u16 = 0x301;

/// What the NFIT says about one DIMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DimmInfo {
    pub slot: u32,
    pub node: u32,
    /// Guest-physical base of the mapped region.
    pub base: u64,
    /// Size of the mapped region (not the backend).
    pub size: u64,
    pub unarmed: bool,
}

/// QEMU `nvdimm_slot_to_handle`: 0 is the root device.
pub fn slot_to_handle(slot: u32) -> u32 {
    slot + 1
}

/// QEMU `nvdimm_slot_to_spa_index`. Slots are at most 255, so this fits.
pub fn slot_to_spa_index(slot: u32) -> u16 {
    ((slot + 1) << 1) as u16
}

/// QEMU `nvdimm_slot_to_dcr_index`.
pub fn slot_to_dcr_index(slot: u32) -> u16 {
    slot_to_spa_index(slot) + 1
}

/// QEMU `nvdimm_slot_to_sn`.
pub fn slot_to_serial(slot: u32) -> u32 {
    0x123456 + slot
}

/// SPA range, memory-device-to-SPA map and control region, in that order.
pub fn nfit_structures(d: &DimmInfo) -> Vec<u8> {
    let mut v = Vec::with_capacity(usize::from(NFIT_SPA_LEN + NFIT_MEMDEV_LEN + NFIT_DCR_LEN));
    spa(&mut v, d);
    memdev(&mut v, d);
    dcr(&mut v, d);
    v
}

fn spa(v: &mut Vec<u8>, d: &DimmInfo) {
    let start = v.len();
    v.extend_from_slice(&NFIT_SPA_TYPE.to_le_bytes());
    v.extend_from_slice(&NFIT_SPA_LEN.to_le_bytes());
    v.extend_from_slice(&slot_to_spa_index(d.slot).to_le_bytes());
    v.extend_from_slice(&SPA_FLAGS.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // reserved
    v.extend_from_slice(&d.node.to_le_bytes()); // proximity domain
    v.extend_from_slice(&PMEM_REGION_GUID);
    v.extend_from_slice(&d.base.to_le_bytes());
    v.extend_from_slice(&d.size.to_le_bytes());
    v.extend_from_slice(&(EFI_MEMORY_WB | EFI_MEMORY_NV).to_le_bytes());
    debug_assert_eq!(v.len() - start, usize::from(NFIT_SPA_LEN));
}

fn memdev(v: &mut Vec<u8>, d: &DimmInfo) {
    let start = v.len();
    v.extend_from_slice(&NFIT_MEMDEV_TYPE.to_le_bytes());
    v.extend_from_slice(&NFIT_MEMDEV_LEN.to_le_bytes());
    v.extend_from_slice(&slot_to_handle(d.slot).to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes()); // physical id
    v.extend_from_slice(&0u16.to_le_bytes()); // region id
    v.extend_from_slice(&slot_to_spa_index(d.slot).to_le_bytes());
    v.extend_from_slice(&slot_to_dcr_index(d.slot).to_le_bytes());
    v.extend_from_slice(&d.size.to_le_bytes()); // region length
    v.extend_from_slice(&0u64.to_le_bytes()); // region offset
    v.extend_from_slice(&0u64.to_le_bytes()); // region DPA: starts at 0
    v.extend_from_slice(&0u16.to_le_bytes()); // interleave index
    v.extend_from_slice(&1u16.to_le_bytes()); // interleave ways
    let flags = if d.unarmed { MEMDEV_NOT_ARMED } else { 0 };
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes()); // reserved
    debug_assert_eq!(v.len() - start, usize::from(NFIT_MEMDEV_LEN));
}

fn dcr(v: &mut Vec<u8>, d: &DimmInfo) {
    let start = v.len();
    v.extend_from_slice(&NFIT_DCR_TYPE.to_le_bytes());
    v.extend_from_slice(&NFIT_DCR_LEN.to_le_bytes());
    v.extend_from_slice(&slot_to_dcr_index(d.slot).to_le_bytes());
    v.extend_from_slice(&0x8086u16.to_le_bytes()); // vendor: Intel
    v.extend_from_slice(&1u16.to_le_bytes()); // device
    v.extend_from_slice(&1u16.to_le_bytes()); // revision (ACPI 6.0: 1)
    v.extend_from_slice(&[0; 6]); // subsystem vendor, device, revision
    v.extend_from_slice(&[0; 6]); // valid fields, location, date, reserved
    v.extend_from_slice(&slot_to_serial(d.slot).to_le_bytes());
    v.extend_from_slice(&FIC_BYTEN.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes()); // number of block control windows
    v.extend_from_slice(&[0; 40]); // BCW size, command/status offsets and sizes
    v.extend_from_slice(&0u16.to_le_bytes()); // flags
    v.extend_from_slice(&[0; 6]); // reserved
    debug_assert_eq!(v.len() - start, usize::from(NFIT_DCR_LEN));
}

/// The AML name of the device in `slot` (`NV00`..`NVFF`).
pub fn device_name(slot: u32) -> String {
    format!("NV{:02X}", slot & 0xff)
}

/// `Device (NVxx)` for the DIMM in `slot`: `_ADR` (its NFIT handle), `_DSM`
/// forwarding to `\_SB.NVDR.NCAL`, and with labels ACPI 6.2's `_LSI`,
/// `_LSR`, `_LSW` built on DSM functions 4, 5 and 6.
pub fn device_aml(slot: u32, labels: bool) -> Vec<u8> {
    let handle = slot_to_handle(slot);
    let name = device_name(slot);

    let adr = Name::new("_ADR".into(), &handle);
    let call = MethodCall::new(NCAL_PATH.into(), vec![&Arg(0), &Arg(1), &Arg(2), &Arg(3), &handle]);
    let ret = Return::new(&call);
    let dsm = Method::new("_DSM".into(), 4, false, vec![&ret]);

    let lsi = lsi(handle);
    let lsr = lsr(handle);
    let lsw = lsw(handle);
    let mut children: Vec<&dyn Aml> = vec![&adr, &dsm];
    if labels {
        children.extend([&lsi as &dyn Aml, &lsr, &lsw]);
    }
    let mut out = Vec::new();
    Device::new(Path::new(&name), children).to_aml_bytes(&mut out);
    out
}

/// Render a method whose body is built by `body` (lifetimes of the AML
/// temporaries stay inside the closure).
struct Rendered(Vec<u8>);

impl Aml for Rendered {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn render(aml: &dyn Aml) -> Rendered {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    Rendered(v)
}

/// `Local<n> = NCAL (DimmUUID, 1, function, arg3, handle)`.
fn ncal_into(local: u8, function: u32, arg3: &dyn Aml, handle: u32) -> Rendered {
    let uuid = Uuid::new(DIMM_DSM_UUID);
    let call = MethodCall::new(NCAL_PATH.into(), vec![&uuid, &DSM_REVISION, &function, arg3, &handle]);
    render(&Store::new(&Local(local), &call))
}

/// `_LSI`: Package {Status, SizeOfLabelStorageArea, MaxTransferLength}.
///
/// ```text
/// Local0 = NCAL (UUID, 1, 4, Zero, handle)
/// Local4 = Package (3) {1, 0, 0}
/// If (SizeOf (Local0) >= 4)  { CreateDWordField (Local0, 0, STTS); Local4[0] = STTS }
/// If (SizeOf (Local0) >= 12) { CreateDWordField (Local0, 4, SLSA)
///                              CreateDWordField (Local0, 8, MAXT)
///                              Local4[1] = SLSA; Local4[2] = MAXT }
/// Return (Local4)
/// ```
fn lsi(handle: u32) -> Rendered {
    let call = ncal_into(0, 4, &ZERO, handle);
    let pkg = Package::new(vec![&1u8, &0u8, &0u8]);
    let init = Store::new(&Local(4), &pkg);
    let size = SizeOf::new(&Local(0));

    let stts = dword_field(&Local(0), &0u8, "STTS");
    let stts_p = Path::new("STTS");
    let idx0 = Index::new(&ZERO, &Local(4), &0u8);
    let set0 = Store::new(&idx0, &stts_p);
    let ge4 = GreaterEqual::new(&size, &4u8);
    let if4 = If::new(&ge4, vec![&stts, &set0]);

    let slsa = dword_field(&Local(0), &4u8, "SLSA");
    let maxt = dword_field(&Local(0), &8u8, "MAXT");
    let (slsa_p, maxt_p) = (Path::new("SLSA"), Path::new("MAXT"));
    let idx1 = Index::new(&ZERO, &Local(4), &1u8);
    let idx2 = Index::new(&ZERO, &Local(4), &2u8);
    let set1 = Store::new(&idx1, &slsa_p);
    let set2 = Store::new(&idx2, &maxt_p);
    let ge12 = GreaterEqual::new(&size, &12u8);
    let if12 = If::new(&ge12, vec![&slsa, &maxt, &set1, &set2]);

    let ret = Return::new(&Local(4));
    render(&Method::new("_LSI".into(), 0, true, vec![&call, &init, &if4, &if12, &ret]))
}

/// `_LSR (Offset, Length)`: Package {Status, Buffer}.
///
/// ```text
/// Local0 = Buffer (8) {}
/// CreateDWordField (Local0, 0, OFST); CreateDWordField (Local0, 4, TLEN)
/// OFST = Arg0; TLEN = Arg1
/// Local1 = Package (1) {0}; Local1[0] = Local0
/// Local2 = NCAL (UUID, 1, 5, Local1, handle)
/// Local4 = Package (2) {1, Buffer (0) {}}
/// Local3 = SizeOf (Local2)
/// If (Local3 >= 4) {
///     CreateDWordField (Local2, 0, STTS); Local4[0] = STTS
///     Local3 -= 4; Mid (Local2, 4, Local3, Local5); Local4[1] = Local5
/// }
/// Return (Local4)
/// ```
fn lsr(handle: u32) -> Rendered {
    let prologue = offset_length_prologue();
    let call = ncal_into(2, 5, &Local(1), handle);
    let empty = BufferData::new(vec![]);
    let pkg = Package::new(vec![&1u8, &empty]);
    let init = Store::new(&Local(4), &pkg);
    let size = SizeOf::new(&Local(2));
    let get_size = Store::new(&Local(3), &size);

    let stts = dword_field(&Local(2), &0u8, "STTS");
    let stts_p = Path::new("STTS");
    let idx0 = Index::new(&ZERO, &Local(4), &0u8);
    let set0 = Store::new(&idx0, &stts_p);
    let sub = Subtract::new(&Local(3), &Local(3), &4u8);
    let mid = Mid::new(&Local(2), &4u8, &Local(3), &Local(5));
    let idx1 = Index::new(&ZERO, &Local(4), &1u8);
    let set1 = Store::new(&idx1, &Local(5));
    let ge4 = GreaterEqual::new(&Local(3), &4u8);
    let if4 = If::new(&ge4, vec![&stts, &set0, &sub, &mid, &set1]);

    let ret = Return::new(&Local(4));
    render(&Method::new("_LSR".into(), 2, true, vec![&prologue, &call, &init, &get_size, &if4, &ret]))
}

/// `_LSW (Offset, Length, Data)`: Integer status.
///
/// ```text
/// (the _LSR prologue, then) Concatenate (Local0, Arg2, Local0); Local1[0] = Local0
/// Local2 = NCAL (UUID, 1, 6, Local1, handle)
/// If (SizeOf (Local2) >= 4) { CreateDWordField (Local2, 0, STTS); Return (STTS) }
/// Return (1)
/// ```
fn lsw(handle: u32) -> Rendered {
    let prologue = offset_length_prologue();
    let concat = acpi_tables::aml::Concat::new(&Local(0), &Local(0), &Arg(2));
    let idx = Index::new(&ZERO, &Local(1), &0u8);
    let set = Store::new(&idx, &Local(0));
    let call = ncal_into(2, 6, &Local(1), handle);
    let size = SizeOf::new(&Local(2));
    let stts = dword_field(&Local(2), &0u8, "STTS");
    let stts_p = Path::new("STTS");
    let ret_stts = Return::new(&stts_p);
    let ge4 = GreaterEqual::new(&size, &4u8);
    let if4 = If::new(&ge4, vec![&stts, &ret_stts]);
    let ret1 = Return::new(&1u8);
    render(&Method::new("_LSW".into(), 3, true, vec![&prologue, &concat, &set, &call, &if4, &ret1]))
}

/// `CreateDWordField (source, byte, name)`.
fn dword_field(source: &dyn Aml, byte: &u8, name: &str) -> Rendered {
    let path = Path::new(name);
    render(&CreateDWordField::new(&path, source, byte))
}

/// `Local0 = {Arg0 as u32, Arg1 as u32}` and `Local1 = Package (1) {Local0}`.
fn offset_length_prologue() -> Rendered {
    let buf = BufferData::new(vec![0; 8]);
    let init = Store::new(&Local(0), &buf);
    let ofst = dword_field(&Local(0), &0u8, "OFST");
    let tlen = dword_field(&Local(0), &4u8, "TLEN");
    let (ofst_p, tlen_p) = (Path::new("OFST"), Path::new("TLEN"));
    let set_o = Store::new(&ofst_p, &Arg(0));
    let set_l = Store::new(&tlen_p, &Arg(1));
    let pkg = Package::new(vec![&ZERO]);
    let set_pkg = Store::new(&Local(1), &pkg);
    let idx = Index::new(&ZERO, &Local(1), &0u8);
    let set_el = Store::new(&idx, &Local(0));
    let mut v = Vec::new();
    for a in [&init as &dyn Aml, &ofst, &tlen, &set_o, &set_l, &set_pkg, &set_el] {
        a.to_aml_bytes(&mut v);
    }
    Rendered(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn guid_matches_aml_touuid_encoding() {
        let mut v = Vec::new();
        Uuid::new("66F0D379-B4F3-4074-AC43-0D3318B78CDB").to_aml_bytes(&mut v);
        assert_eq!(&v[v.len() - 16..], &PMEM_REGION_GUID);
    }

    #[test]
    fn nfit_layout_matches_qemu() {
        let d = DimmInfo { slot: 2, node: 1, base: 0x1_0000_0000, size: 128 << 20, unarmed: true };
        let b = nfit_structures(&d);
        assert_eq!(b.len(), 56 + 48 + 80);
        // SPA
        assert_eq!((u16_at(&b, 0), u16_at(&b, 2), u16_at(&b, 4), u16_at(&b, 6)), (0, 56, 6, 3));
        assert_eq!(u32_at(&b, 12), 1);
        assert_eq!(&b[16..32], &PMEM_REGION_GUID);
        assert_eq!((u64_at(&b, 32), u64_at(&b, 40), u64_at(&b, 48)), (1 << 32, 128 << 20, 0x8008));
        // Memory device to SPA map
        let m = &b[56..104];
        assert_eq!((u16_at(m, 0), u16_at(m, 2), u32_at(m, 4)), (1, 48, 3));
        assert_eq!((u16_at(m, 12), u16_at(m, 14)), (6, 7));
        assert_eq!((u64_at(m, 16), u64_at(m, 24), u64_at(m, 32)), (128 << 20, 0, 0));
        assert_eq!((u16_at(m, 42), u16_at(m, 44)), (1, 8));
        // Control region
        let c = &b[104..];
        assert_eq!((u16_at(c, 0), u16_at(c, 2), u16_at(c, 4)), (4, 80, 7));
        assert_eq!((u16_at(c, 6), u16_at(c, 8), u16_at(c, 10)), (0x8086, 1, 1));
        assert_eq!(u32_at(c, 24), 0x123458);
        assert_eq!(&c[28..30], &[0x01, 0x03]);
        let armed = nfit_structures(&DimmInfo { unarmed: false, ..d });
        assert_eq!(u16_at(&armed, 56 + 44), 0);
    }

    #[test]
    fn device_aml_shape() {
        let with = device_aml(0, true);
        let without = device_aml(0x1f, false);
        assert_eq!(&with[0..2], &[0x5b, 0x82]); // DeviceOp
        let has = |b: &[u8], s: &[u8]| b.windows(s.len()).any(|w| w == s);
        assert!(has(&with, b"NV00") && has(&with, b"_LSI") && has(&with, b"_LSW"));
        assert!(has(&without, b"NV1F") && has(&without, b"_DSM") && !has(&without, b"_LSR"));
        assert!(has(&with, b"NVDRNCAL"));
    }
}
