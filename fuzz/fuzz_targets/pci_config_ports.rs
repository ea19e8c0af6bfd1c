//! Guest accesses to the PCI host bridge's ports (0xCF8 CONFIG_ADDRESS,
//! 0xCFC..0xCFF CONFIG_DATA): `cargo +nightly fuzz run pci_config_ports`.
//! Each 7-byte record is one access (op, port offset, width, 4 value
//! bytes) to a bus holding the host bridge and one device with a config
//! space; any port, width and latch value must be handled without a panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use dmhost::{
    devices::{DeviceImpl, HostDevice},
    pci::{decode, PciBus},
    vm::bus::{BusDevice, IoSpace},
};
use dmhost_plugin_api::{DeviceModel, PluginError};
use libfuzzer_sys::fuzz_target;

/// A function with a 256-byte config space; out-of-range accesses error.
struct Func([u8; 256]);

impl DeviceModel for Func {
    fn pci_config_read(&mut self, offset: u32, data: &mut [u8]) -> Result<(), PluginError> {
        let o = offset as usize;
        let src = self.0.get(o..o + data.len()).ok_or_else(|| PluginError::io("out of range"))?;
        data.copy_from_slice(src);
        Ok(())
    }
    fn pci_config_write(&mut self, offset: u32, data: &[u8]) -> Result<(), PluginError> {
        let o = offset as usize;
        if o < 4 {
            return Err(PluginError::denied("read-only IDs"));
        }
        let dst = self.0.get_mut(o..o + data.len()).ok_or_else(|| PluginError::io("out of range"))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

fn device() -> Arc<HostDevice> {
    static DEV: OnceLock<Arc<HostDevice>> = OnceLock::new();
    Arc::clone(DEV.get_or_init(|| {
        let mut c = [0u8; 256];
        c[..4].copy_from_slice(&[0xe5, 0x1d, 0x01, 0x00]);
        Arc::new(HostDevice::new("f0", "func", DeviceImpl::Builtin(Box::new(Func(c)))))
    }))
}

fuzz_target!(|data: &[u8]| {
    let bus = PciBus::new();
    let _ = bus.reserve("f0", 1 + data.first().copied().unwrap_or(0) % 31);
    bus.attach(&device());
    for rec in data.chunks(7) {
        let b = |i: usize| rec.get(i).copied().unwrap_or(0);
        let value = [b(3), b(4), b(5), b(6)];
        let width = [1usize, 2, 4, 3][usize::from(b(2)) % 4];
        // Ports 0xCF6..0xD01: inside and just outside the bridge's range.
        let port = 0xcf6 + u64::from(b(1) % 11);
        match b(0) % 4 {
            0 => {
                let mut d = vec![0u8; width];
                bus.read(IoSpace::Pio, port, &mut d);
            }
            1 => bus.write(IoSpace::Pio, port, &value[..width]),
            2 => bus.set_config_address(u32::from_le_bytes(value)),
            _ => {
                let _ = decode(u32::from_le_bytes(value), u64::from(b(1)), width);
            }
        }
    }
    bus.detach("f0");
});
