//! The ACPI Generic Event Device (`ACPI0013`): how a hardware-reduced
//! platform (no GPE block, no SCI) tells the OS about hot-plug, as QEMU's
//! `hw/acpi/generic_event_device.c` and Cloud Hypervisor's GED do.
//!
//! The host sets event bits and raises a level-triggered interrupt on
//! [`GED_GSI`]; the OS runs `\_SB.GED_._EVT`, which reads the event
//! register at port [`GED_PORT`] (the read returns and clears the pending
//! bits, and the host drops the line) and then:
//! - [`EVT_MEMORY`]: `\_SB.MHPC.MSCN`, which notifies every memory slot with
//!   an insert (`Notify (Mxxx, 1)`) or remove (`Notify (Mxxx, 3)`) event;
//! - [`EVT_NVDIMM`]: `Notify (\_SB.NVDR, 0x80)`, so the OS re-reads `_FIT`.

use acpi_tables::{
    aml::{
        And, Device, Equal, FieldAccessType, FieldEntry, FieldLockRule, FieldUpdateRule, If, Interrupt,
        Local, Method, MethodCall, Name, Notify, OpRegion, OpRegionSpace, Path, ResourceTemplate, Store,
        ZERO,
    },
    Aml,
};

/// The event register: a 32-bit read returns the pending events and
/// clears them. Right after the DSM doorbell (0x0a18..0x0a1c).
pub const GED_PORT: u16 = 0x0a1c;
pub const GED_LEN: u16 = 4;
/// The GED's interrupt: IOAPIC pin 9 (the SCI's usual pin; a
/// hardware-reduced platform has no SCI). Level-triggered, active high.
pub const GED_GSI: u32 = 9;

/// A memory-hotplug slot has an insert or remove event.
pub const EVT_MEMORY: u32 = 1 << 0;
/// The NVDIMM FIT changed (a hot-plug or unplug of an NVDIMM).
pub const EVT_NVDIMM: u32 = 1 << 1;

/// Pending events: what the host raised and the OS has not read yet.
#[derive(Debug, Default)]
pub struct Ged {
    pending: u32,
}

impl Ged {
    /// Add `events`; true when the interrupt line must be raised.
    pub fn raise(&mut self, events: u32) -> bool {
        self.pending |= events;
        self.pending != 0
    }

    /// A guest read of the register at `offset` (any width 1..=4): the
    /// pending events, cleared by a read of byte 0. Returns whether the
    /// line must drop.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) -> bool {
        let bytes = self.pending.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = usize::try_from(offset).ok().and_then(|o| o.checked_add(i));
            *b = at.and_then(|k| bytes.get(k)).copied().unwrap_or(0);
        }
        if offset != 0 || data.is_empty() {
            return false;
        }
        self.pending = 0;
        true
    }

    pub fn pending(&self) -> u32 {
        self.pending
    }
}

/// The AML for `Device (GED_)` in `\_SB`.
pub fn aml() -> Vec<u8> {
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &ZERO);
    let irq = Interrupt::new(true, false, false, false, GED_GSI);
    let crs_t = ResourceTemplate::new(vec![&irq]);
    let crs = Name::new("_CRS".into(), &crs_t);
    let region = OpRegion::new("GEDR".into(), OpRegionSpace::SystemIO, &GED_PORT, &GED_LEN);
    let field = acpi_tables::aml::Field::new(
        "GEDR".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"ESEL", 32)],
    );
    let esel = Path::new("ESEL");
    let read = Store::new(&Local(0), &esel);
    let mem_bit = And::new(&Local(1), &Local(0), &EVT_MEMORY);
    let mem_set = Equal::new(&Local(1), &EVT_MEMORY);
    let scan = MethodCall::new("\\_SB_.MHPC.MSCN".into(), vec![]);
    let if_mem = If::new(&mem_set, vec![&scan]);
    let nv_bit = And::new(&Local(2), &Local(0), &EVT_NVDIMM);
    let nv_set = Equal::new(&Local(2), &EVT_NVDIMM);
    let nvdr = Path::new("\\_SB_.NVDR");
    let notify = Notify::new(&nvdr, &0x80u8);
    let if_nv = If::new(&nv_set, vec![&notify]);
    let evt = Method::new("_EVT".into(), 1, true, vec![&read, &mem_bit, &if_mem, &nv_bit, &if_nv]);
    let mut v = Vec::new();
    Device::new("GED_".into(), vec![&hid, &uid, &crs, &region, &field, &evt]).to_aml_bytes(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_accumulate_until_a_read_of_byte_0_clears_them() {
        let mut g = Ged::default();
        assert!(!g.raise(0));
        assert!(g.raise(EVT_MEMORY));
        assert!(g.raise(EVT_NVDIMM));
        let mut b = [0u8; 1];
        // A read of another byte reports and keeps.
        assert!(!g.read(1, &mut b));
        assert_eq!((b[0], g.pending()), (0, EVT_MEMORY | EVT_NVDIMM));
        let mut w = [0u8; 4];
        assert!(g.read(0, &mut w));
        assert_eq!(u32::from_le_bytes(w), EVT_MEMORY | EVT_NVDIMM);
        assert_eq!(g.pending(), 0);
        assert!(g.read(0, &mut w) && w == [0; 4]);
        // Out-of-range offsets read zeroes.
        let mut far = [0xffu8; 4];
        g.raise(EVT_MEMORY);
        assert!(!g.read(u64::MAX, &mut far));
        assert_eq!(far, [0; 4]);
    }
}
