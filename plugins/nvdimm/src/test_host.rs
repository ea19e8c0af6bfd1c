//! A `HostServices` test double that records every call.

use std::sync::{Arc, Mutex};

use dmhost_plugin_api::{
    abi_stable::{sabi_trait::TD_Opaque, std_types::RArc},
    Host, HostServices, HostServices_TO, IoSpace, MemoryRegion, PluginError, RResult, RSlice, RSliceMut,
    RStr,
};

/// One recorded host call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    RegisterRam { name: String, size: u64 },
    UnregisterRam { name: String },
    MarkDirty { name: String, offset: u64, len: u64 },
    Other(&'static str),
}

#[derive(Clone, Default)]
pub struct RecordingHost {
    pub calls: Arc<Mutex<Vec<Call>>>,
}

impl RecordingHost {
    pub fn new() -> (Self, Host) {
        let me = Self::default();
        let host = HostServices_TO::from_ptr(RArc::new(me.clone()), TD_Opaque);
        (me, host)
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }

    fn push(&self, c: Call) {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(c);
        }
    }
}

impl HostServices for RecordingHost {
    fn register_io(&self, _: IoSpace, _: u64, _: u64) -> RResult<(), PluginError> {
        self.push(Call::Other("register_io"));
        RResult::ROk(())
    }
    fn unregister_io(&self, _: IoSpace, _: u64, _: u64) -> RResult<(), PluginError> {
        self.push(Call::Other("unregister_io"));
        RResult::ROk(())
    }
    fn physmap_add(&self, _: u64, _: u64, _: u64) -> RResult<(), PluginError> {
        self.push(Call::Other("physmap_add"));
        RResult::ROk(())
    }
    fn physmap_remove(&self, _: u64, _: u64) -> RResult<(), PluginError> {
        self.push(Call::Other("physmap_remove"));
        RResult::ROk(())
    }
    fn set_irq_line(&self, _: u32, _: bool) -> RResult<(), PluginError> {
        self.push(Call::Other("set_irq_line"));
        RResult::ROk(())
    }
    fn register_irqfd(&self, _: u32, _: i32, _: i32) -> RResult<(), PluginError> {
        self.push(Call::Other("register_irqfd"));
        RResult::ROk(())
    }
    fn unregister_irqfd(&self, _: u32, _: i32) -> RResult<(), PluginError> {
        self.push(Call::Other("unregister_irqfd"));
        RResult::ROk(())
    }
    fn register_ram(&self, name: RStr<'_>, region: MemoryRegion) -> RResult<(), PluginError> {
        self.push(Call::RegisterRam { name: name.to_string(), size: region.size });
        RResult::ROk(())
    }
    fn unregister_ram(&self, name: RStr<'_>) -> RResult<(), PluginError> {
        self.push(Call::UnregisterRam { name: name.to_string() });
        RResult::ROk(())
    }
    fn mark_dirty(&self, name: RStr<'_>, offset: u64, len: u64) -> RResult<(), PluginError> {
        self.push(Call::MarkDirty { name: name.to_string(), offset, len });
        RResult::ROk(())
    }
    fn read_guest(&self, _: u64, _: RSliceMut<'_, u8>) -> RResult<(), PluginError> {
        self.push(Call::Other("read_guest"));
        RResult::ROk(())
    }
    fn write_guest(&self, _: u64, _: RSlice<'_, u8>) -> RResult<(), PluginError> {
        self.push(Call::Other("write_guest"));
        RResult::ROk(())
    }
}
