//! Interrupt lines as the in-kernel IOAPIC sees them (`KVM_GET_IRQCHIP`),
//! and the control commands that report them and the PCI bus:
//! `x-query-irq-lines` and `x-query-pci`.
//!
//! The test guests run with interrupts off (this host cannot deliver them
//! to a CPL-3 guest), and every IOAPIC pin stays masked as KVM resets it,
//! so a raised line shows up as its IOAPIC IRR bit and stays there.

use std::sync::Arc;

use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use serde_json::json;

use crate::{
    control::{CommandError, CommandRegistry},
    vm::Vm,
};

#[derive(Debug, thiserror::Error)]
pub enum IrqQueryError {
    #[error("KVM_GET_IRQCHIP (IOAPIC) failed")]
    GetIrqchip(#[source] kvm_ioctls::Error),
}

/// The IOAPIC's state of its 24 pins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoapicLines {
    /// Interrupt request register: bit `n` = pin `n` asserted/latched.
    pub irr: u32,
    /// Bit `n` = pin `n` masked in its redirection entry.
    pub masked: u32,
}

impl IoapicLines {
    /// Whether pin `gsi`'s IRR bit is set.
    pub fn asserted(&self, gsi: u32) -> bool {
        gsi < 32 && self.irr & (1 << gsi) != 0
    }
}

/// Read the IOAPIC's IRR and masks.
pub fn ioapic_lines(vm: &Vm) -> Result<IoapicLines, IrqQueryError> {
    let mut chip = kvm_irqchip { chip_id: KVM_IRQCHIP_IOAPIC, ..Default::default() };
    vm.shared().kvm.fd().get_irqchip(&mut chip).map_err(IrqQueryError::GetIrqchip)?;
    // SAFETY: for chip_id IOAPIC, KVM filled the `ioapic` member of the union.
    let ioapic = unsafe { chip.chip.ioapic };
    let mut masked = 0u32;
    for (pin, e) in ioapic.redirtbl.iter().enumerate() {
        // SAFETY: `bits` covers the whole 8-byte redirection entry.
        let bits = unsafe { e.bits };
        if bits & (1 << 16) != 0 {
            masked |= 1 << pin;
        }
    }
    Ok(IoapicLines { irr: ioapic.irr, masked })
}

/// Register `x-query-irq-lines` (IOAPIC IRR bits and masks, the MSI
/// routes) and `x-query-pci` (the functions on bus 0).
pub fn register_commands(registry: &CommandRegistry, vm: Arc<Vm>) {
    let v = Arc::clone(&vm);
    registry.register("x-query-irq-lines", move |_| {
        let l = ioapic_lines(&v).map_err(|e| CommandError::generic(crate::run::chain(&e)))?;
        let asserted: Vec<u32> = (0..24).filter(|&g| l.asserted(g)).collect();
        Ok(json!({
            "ioapic-irr": l.irr,
            "ioapic-masked": l.masked,
            "asserted": asserted,
            "msi-routes": v.shared().msi.list(),
        }))
    });
    let v = vm;
    registry.register("x-query-pci", move |_| {
        serde_json::to_value(v.shared().pci.functions()).map_err(CommandError::generic)
    });
}
