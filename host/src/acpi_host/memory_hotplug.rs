//! ACPI memory hotplug: `N` memory-device slots (`PNP0C80`) in the DSDT,
//! backed by a small port I/O interface with QEMU's register layout
//! (`hw/acpi/memory_hotplug.c`, `docs/specs/acpi_mem_hotplug.rst`) at
//! [`MHP_PORT`] (`0x0a00`, 24 bytes), and the controller device `MHPC`
//! with shared `MSTA`/`MCRS`/`MEJ0` methods the slots call (the shape of
//! Cloud Hypervisor's `vmm/src/memory_manager.rs`).
//!
//! # Registers (little endian)
//!
//! | offset | read | write |
//! |---|---|---|
//! | 0x00 | u32 base of the selected slot, low half | u32 slot selector |
//! | 0x04 | u32 base, high half | u32 `_OST` event (ignored) |
//! | 0x08 | u32 length, low half | u32 `_OST` status (ignored) |
//! | 0x0c | u32 length, high half | — |
//! | 0x10 | u32 proximity domain | — |
//! | 0x14 | u8 flags: bit 0 enabled, bit 1 insert event, bit 2 remove event | bit 1 clears the insert event, bit 2 the remove event, bit 3 requests ejection |
//!
//! Base and length read 0 while the slot is empty; a selector past the
//! last slot selects nothing (everything reads 0). A plug sets *enabled*
//! and the insert event, an unplug clears *enabled* and sets the remove
//! event. The host then raises the Generic Event Device's memory event
//! ([`super::ged`]); its `_EVT` calls `MSCN`, which notifies each slot
//! with an event (`MTFY`) and clears it, as QEMU's `MSCN`/`MTFY` do.

use acpi_tables::{
    aml::{
        Acquire, Add, AddressSpace, AddressSpaceCacheable, Arg, CreateQWordField, Device, EISAName, Equal,
        FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, LessThan, Local, Method, MethodCall,
        Mutex, Name, Notify, OpRegion, OpRegionSpace, Or, Path, Release, ResourceTemplate, Return, ShiftLeft,
        Store, Subtract, While, IO, ONE, ZERO,
    },
    Aml,
};

/// First port of the interface (QEMU `ACPI_MEMORY_HOTPLUG_BASE`).
pub const MHP_PORT: u16 = 0x0a00;
/// Length of the interface in ports.
pub const MHP_LEN: u16 = 24;
/// Default number of slots (config `memory-slots`).
pub const DEFAULT_SLOTS: u32 = 8;
/// Most slots (`M000`..`MFFF` names; QEMU allows 256 too).
pub const MAX_SLOTS: u32 = 256;

pub const REG_BASE_LO: u64 = 0x00;
pub const REG_BASE_HI: u64 = 0x04;
pub const REG_LEN_LO: u64 = 0x08;
pub const REG_LEN_HI: u64 = 0x0c;
pub const REG_PROXIMITY: u64 = 0x10;
pub const REG_FLAGS: u64 = 0x14;
pub const REG_SELECTOR: u64 = 0x00;

pub const FLAG_ENABLED: u8 = 1;
pub const FLAG_INSERT: u8 = 1 << 1;
pub const FLAG_REMOVE: u8 = 1 << 2;
pub const FLAG_EJECT: u8 = 1 << 3;

/// One memory device slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slot {
    /// The device in it (kept after unplug until the slot is reused, so a
    /// re-plug of the same id lands in the same slot).
    pub id: Option<String>,
    pub base: u64,
    pub size: u64,
    pub node: u32,
    pub enabled: bool,
    pub inserting: bool,
    pub removing: bool,
    pub eject_requested: bool,
}

/// A memory device as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryDevice {
    pub id: String,
    pub base: u64,
    pub size: u64,
}

/// The register file and slot table. Pure state: the bus glue is in
/// [`super`].
#[derive(Debug, Clone)]
pub struct MemoryHotplug {
    slots: Vec<Slot>,
    selector: u32,
}

impl MemoryHotplug {
    /// `slots` slots, clamped to 1..=[`MAX_SLOTS`].
    pub fn new(slots: u32) -> Self {
        let n = slots.clamp(1, MAX_SLOTS) as usize;
        Self { slots: vec![Slot::default(); n], selector: 0 }
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Bring the slots in line with the current memory devices. With
    /// `events`, newly present devices raise the insert event and vanished
    /// ones the remove event (hot-plug); without, the state is set quietly
    /// (devices present at boot). Returns the devices that found no slot.
    pub fn update(&mut self, devices: &[MemoryDevice], events: bool) -> Vec<String> {
        for s in &mut self.slots {
            let still = s.enabled && devices.iter().any(|d| Some(&d.id) == s.id.as_ref() && d.base == s.base);
            if s.enabled && !still {
                s.enabled = false;
                s.inserting = false;
                s.removing = events;
                s.base = 0;
                s.size = 0;
            }
        }
        let mut homeless = Vec::new();
        for d in devices {
            if self.slots.iter().any(|s| s.enabled && s.id.as_ref() == Some(&d.id)) {
                continue;
            }
            // The slot it had before, else the first never-used one, else any free one.
            let pos = self
                .slots
                .iter()
                .position(|s| !s.enabled && s.id.as_ref() == Some(&d.id))
                .or_else(|| self.slots.iter().position(|s| !s.enabled && s.id.is_none()))
                .or_else(|| self.slots.iter().position(|s| !s.enabled));
            match pos {
                Some(i) => {
                    self.slots[i] = Slot {
                        id: Some(d.id.clone()),
                        base: d.base,
                        size: d.size,
                        node: 0,
                        enabled: true,
                        inserting: events,
                        removing: false,
                        eject_requested: false,
                    };
                }
                None => homeless.push(d.id.clone()),
            }
        }
        homeless
    }

    fn selected(&self) -> Option<&Slot> {
        self.slots.get(self.selector as usize)
    }

    /// A guest read at `offset` into the interface (any width 1..=4; an
    /// access is served from the 32-bit register it starts in).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let s = self.selected().cloned().unwrap_or_default();
        let value: u32 = match offset & !3 {
            REG_BASE_LO => s.base as u32,
            REG_BASE_HI => (s.base >> 32) as u32,
            REG_LEN_LO => s.size as u32,
            REG_LEN_HI => (s.size >> 32) as u32,
            REG_PROXIMITY => s.node,
            REG_FLAGS => {
                let mut f = 0u8;
                for (on, bit) in
                    [(s.enabled, FLAG_ENABLED), (s.inserting, FLAG_INSERT), (s.removing, FLAG_REMOVE)]
                {
                    if on {
                        f |= bit;
                    }
                }
                u32::from(f)
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let shift = (offset & 3) as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    /// A guest write. Returns the id of a device whose ejection the guest
    /// requested (the caller unplugs it).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<String> {
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        match offset {
            REG_SELECTOR if data.len() == 4 => {
                self.selector = value;
                None
            }
            REG_FLAGS => {
                let flags = value as u8;
                let sel = self.selector as usize;
                let s = self.slots.get_mut(sel)?;
                if flags & FLAG_INSERT != 0 {
                    s.inserting = false;
                }
                if flags & FLAG_REMOVE != 0 {
                    s.removing = false;
                }
                if flags & FLAG_EJECT != 0 && s.enabled {
                    s.eject_requested = true;
                    return s.id.clone();
                }
                None
            }
            // _OST event/status, partial selector writes: ignored.
            _ => None,
        }
    }
}

/// Pre-rendered AML.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn render(items: &[&dyn Aml]) -> Raw {
    let mut v = Vec::new();
    for i in items {
        i.to_aml_bytes(&mut v);
    }
    Raw(v)
}

/// The AML for `Scope (\_SB)`: `Device (MHPC)` and `slots` memory devices
/// `M000`.. (`PNP0C80`) whose `_STA`, `_CRS` and `_EJ0` call MHPC's methods.
pub fn aml(slots: u32) -> Vec<u8> {
    let mut out = Vec::new();
    controller(slots.clamp(1, MAX_SLOTS)).to_aml_bytes(&mut out);
    for i in 0..slots.clamp(1, MAX_SLOTS) {
        slot_device(i).to_aml_bytes(&mut out);
    }
    out
}

/// Name of slot `i` in the AML.
pub fn slot_name(i: u32) -> String {
    format!("M{:03X}", i & 0xfff)
}

fn controller(slots: u32) -> Raw {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A06"));
    let uid = Name::new("_UID".into(), &"Memory Hotplug Controller");
    let io = IO::new(MHP_PORT, MHP_PORT, 1, MHP_LEN as u8);
    let crs_t = ResourceTemplate::new(vec![&io]);
    let crs = Name::new("_CRS".into(), &crs_t);
    let mlck = Mutex::new("MLCK".into(), 0);
    let region = OpRegion::new("HPMR".into(), OpRegionSpace::SystemIO, &MHP_PORT, &MHP_LEN);
    let field = |access, update, entries| {
        acpi_tables::aml::Field::new("HPMR".into(), access, FieldLockRule::NoLock, update, entries)
    };
    let f_read = field(
        FieldAccessType::DWord,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"MRBL", 32),
            FieldEntry::Named(*b"MRBH", 32),
            FieldEntry::Named(*b"MRLL", 32),
            FieldEntry::Named(*b"MRLH", 32),
            FieldEntry::Named(*b"MPX_", 32),
        ],
    );
    let f_flags = field(
        FieldAccessType::Byte,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Reserved(160),
            FieldEntry::Named(*b"MES_", 1),
            FieldEntry::Named(*b"MINS", 1),
            FieldEntry::Named(*b"MRMV", 1),
            FieldEntry::Named(*b"MEJ_", 1),
        ],
    );
    let f_write = field(
        FieldAccessType::DWord,
        FieldUpdateRule::Preserve,
        vec![
            FieldEntry::Named(*b"MSEL", 32),
            FieldEntry::Named(*b"MOEV", 32),
            FieldEntry::Named(*b"MOSC", 32),
        ],
    );
    let (msta, mcrs, mej0, mtfy, mscn) = (msta(), mcrs(), mej0(), mtfy(slots), mscn(slots));
    let mut v = Vec::new();
    Device::new(
        "MHPC".into(),
        vec![
            &hid, &uid, &crs, &mlck, &region, &f_read, &f_flags, &f_write, &msta, &mcrs, &mej0, &mtfy, &mscn,
        ],
    )
    .to_aml_bytes(&mut v);
    Raw(v)
}

/// `MSTA (slot)`: 0x0F when the slot holds an enabled DIMM, else 0.
fn msta() -> Raw {
    let acquire = Acquire::new("MLCK".into(), 0xffff);
    let (msel, mes) = (Path::new("MSEL"), Path::new("MES_"));
    let sel = Store::new(&msel, &Arg(0));
    let zero = Store::new(&Local(0), &ZERO);
    let enabled = Equal::new(&mes, &ONE);
    let set = Store::new(&Local(0), &0x0fu8);
    let if_en = If::new(&enabled, vec![&set]);
    let release = Release::new("MLCK".into());
    let ret = Return::new(&Local(0));
    render(&[&Method::new("MSTA".into(), 1, true, vec![&acquire, &sel, &zero, &if_en, &release, &ret])])
}

/// `MCRS (slot)`: a QWordMemory resource with the slot's base and length.
fn mcrs() -> Raw {
    let acquire = Acquire::new("MLCK".into(), 0xffff);
    let msel = Path::new("MSEL");
    let sel = Store::new(&msel, &Arg(0));
    let mem = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0,
        0xffff_ffff_ffff_fffe,
        None,
    );
    let tmpl = ResourceTemplate::new(vec![&mem]);
    let mr64 = Name::new("MR64".into(), &tmpl);
    let p = |s: &str| Path::new(s);
    let (minl, maxl, lenl, mr) = (p("MINL"), p("MAXL"), p("LENL"), p("MR64"));
    let c_min = CreateQWordField::new(&minl, &mr, &14u8);
    let c_max = CreateQWordField::new(&maxl, &mr, &22u8);
    let c_len = CreateQWordField::new(&lenl, &mr, &38u8);
    // MINL = (MRBH << 32) | MRBL; LENL = (MRLH << 32) | MRLL; MAXL = MINL + LENL - 1
    let (mrbh, mrbl, mrlh, mrll) = (p("MRBH"), p("MRBL"), p("MRLH"), p("MRLL"));
    let hi_b = ShiftLeft::new(&Local(0), &mrbh, &32u8);
    let base = Or::new(&minl, &Local(0), &mrbl);
    let hi_l = ShiftLeft::new(&Local(1), &mrlh, &32u8);
    let len = Or::new(&lenl, &Local(1), &mrll);
    let end = Add::new(&Local(2), &minl, &lenl);
    let max = Subtract::new(&maxl, &Local(2), &ONE);
    // An empty slot: a zero-length range is not valid, so report Min = Max = 0.
    let empty = LessThan::new(&lenl, &ONE);
    let zmax = Store::new(&maxl, &ZERO);
    let if_empty = If::new(&empty, vec![&zmax]);
    let release = Release::new("MLCK".into());
    let ret = Return::new(&mr);
    render(&[&Method::new(
        "MCRS".into(),
        1,
        true,
        vec![
            &acquire, &sel, &mr64, &c_min, &c_max, &c_len, &hi_b, &base, &hi_l, &len, &end, &max, &if_empty,
            &release, &ret,
        ],
    )])
}

/// `MTFY (slot, event)`: `Notify` the slot's device (a Notify target must
/// be a name, so one `If` per slot, as QEMU's).
fn mtfy(slots: u32) -> Raw {
    let (slot, event) = (Arg(0), Arg(1));
    let numbers: Vec<u32> = (0..slots).collect();
    let names: Vec<Path> = numbers.iter().map(|&i| Path::new(&slot_name(i))).collect();
    let notifies: Vec<Notify> = names.iter().map(|n| Notify::new(n, &event)).collect();
    let conds: Vec<Equal> = numbers.iter().map(|i| Equal::new(&slot, i)).collect();
    let ifs: Vec<If> = conds.iter().zip(&notifies).map(|(c, n)| If::new(c, vec![n])).collect();
    let body: Vec<&dyn Aml> = ifs.iter().map(|i| i as &dyn Aml).collect();
    render(&[&Method::new("MTFY".into(), 2, true, body)])
}

/// `MSCN ()`: the GED's memory event: for every slot with an insert event
/// `Notify (Mxxx, 1)` (device check), with a remove event
/// `Notify (Mxxx, 3)` (eject request), clearing each event it reports.
fn mscn(slots: u32) -> Raw {
    let acquire = Acquire::new("MLCK".into(), 0xffff);
    let start = Store::new(&Local(0), &ZERO);
    let more = LessThan::new(&Local(0), &slots);
    let (msel, mins, mrmv) = (Path::new("MSEL"), Path::new("MINS"), Path::new("MRMV"));
    let sel = Store::new(&msel, &Local(0));
    let inserted = Equal::new(&mins, &ONE);
    let check = MethodCall::new("MTFY".into(), vec![&Local(0), &ONE]);
    let clear_ins = Store::new(&mins, &ONE);
    let if_ins = If::new(&inserted, vec![&check, &clear_ins]);
    let removed = Equal::new(&mrmv, &ONE);
    let eject = MethodCall::new("MTFY".into(), vec![&Local(0), &3u8]);
    let clear_rmv = Store::new(&mrmv, &ONE);
    let if_rmv = If::new(&removed, vec![&eject, &clear_rmv]);
    let next = Add::new(&Local(0), &Local(0), &ONE);
    let scan = While::new(&more, vec![&sel, &if_ins, &if_rmv, &next]);
    let release = Release::new("MLCK".into());
    render(&[&Method::new("MSCN".into(), 0, true, vec![&acquire, &start, &scan, &release])])
}

/// `MEJ0 (slot)`: request ejection.
fn mej0() -> Raw {
    let acquire = Acquire::new("MLCK".into(), 0xffff);
    let (msel, mej) = (Path::new("MSEL"), Path::new("MEJ_"));
    let sel = Store::new(&msel, &Arg(0));
    let ej = Store::new(&mej, &ONE);
    let release = Release::new("MLCK".into());
    render(&[&Method::new("MEJ0".into(), 1, true, vec![&acquire, &sel, &ej, &release])])
}

fn slot_device(i: u32) -> Raw {
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C80"));
    let uid = Name::new("_UID".into(), &i);
    let sta_call = MethodCall::new("\\_SB_.MHPC.MSTA".into(), vec![&i]);
    let sta_ret = Return::new(&sta_call);
    let sta = Method::new("_STA".into(), 0, false, vec![&sta_ret]);
    let crs_call = MethodCall::new("\\_SB_.MHPC.MCRS".into(), vec![&i]);
    let crs_ret = Return::new(&crs_call);
    let crs = Method::new("_CRS".into(), 0, true, vec![&crs_ret]);
    let ej_call = MethodCall::new("\\_SB_.MHPC.MEJ0".into(), vec![&i]);
    let ej0 = Method::new("_EJ0".into(), 1, false, vec![&ej_call]);
    let mut v = Vec::new();
    Device::new(Path::new(&slot_name(i)), vec![&hid, &uid, &sta, &crs, &ej0]).to_aml_bytes(&mut v);
    Raw(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, base: u64, size: u64) -> MemoryDevice {
        MemoryDevice { id: id.into(), base, size }
    }

    fn reg(m: &MemoryHotplug, off: u64) -> u32 {
        let mut b = [0u8; 4];
        m.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn select(m: &mut MemoryHotplug, slot: u32) {
        m.write(REG_SELECTOR, &slot.to_le_bytes());
    }

    #[test]
    fn plug_unplug_events_and_registers() {
        let mut m = MemoryHotplug::new(4);
        assert!(m.update(&[dev("boot", 0x1_0000_0000, 2 << 20)], false).is_empty());
        select(&mut m, 0);
        assert_eq!(reg(&m, REG_FLAGS), 1, "boot DIMM: enabled, no event");
        assert_eq!((reg(&m, REG_BASE_LO), reg(&m, REG_BASE_HI), reg(&m, REG_LEN_LO)), (0, 1, 2 << 20));
        let both = [dev("boot", 0x1_0000_0000, 2 << 20), dev("hot", 0x1_0020_0000, 4 << 20)];
        m.update(&both, true);
        select(&mut m, 1);
        assert_eq!(reg(&m, REG_FLAGS), 3);
        assert_eq!(reg(&m, REG_BASE_LO), 0x0020_0000);
        m.write(REG_FLAGS, &[FLAG_INSERT]);
        assert_eq!(reg(&m, REG_FLAGS), 1);
        // A byte read of the high byte of base-low.
        let mut b = [0u8; 1];
        m.read(REG_BASE_LO + 2, &mut b);
        assert_eq!(b[0], 0x20);
        m.update(&both[..1], true);
        assert_eq!(reg(&m, REG_FLAGS), 4, "removed");
        assert_eq!(reg(&m, REG_LEN_LO), 0);
        m.write(REG_FLAGS, &[FLAG_REMOVE]);
        assert_eq!(reg(&m, REG_FLAGS), 0);
        // Re-plug of the same id: same slot.
        m.update(&both, true);
        assert_eq!(reg(&m, REG_FLAGS), 3);
        assert_eq!(m.write(REG_FLAGS, &[FLAG_EJECT]).as_deref(), Some("hot"));
        // Past the last slot: nothing.
        select(&mut m, 99);
        assert_eq!(reg(&m, REG_FLAGS), 0);
        assert_eq!(m.write(REG_FLAGS, &[0xff]), None);
    }

    #[test]
    fn full_slots_are_reported() {
        let mut m = MemoryHotplug::new(1);
        let left = m.update(&[dev("a", 1 << 32, 2 << 20), dev("b", 2 << 32, 2 << 20)], true);
        assert_eq!(left, vec!["b".to_owned()]);
    }

    #[test]
    fn random_register_traffic_never_panics() {
        let mut m = MemoryHotplug::new(8);
        m.update(&[dev("a", 1 << 32, 2 << 20)], true);
        let mut s: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let off = s % 32;
            let len = [1usize, 2, 4][(s >> 8) as usize % 3];
            let bytes = (s >> 16).to_le_bytes();
            if s & (1 << 40) != 0 {
                m.write(off, &bytes[..len]);
            } else {
                let mut b = vec![0u8; len];
                m.read(off, &mut b);
            }
        }
    }
}
