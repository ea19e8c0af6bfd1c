//! INTx routing: which device is the VM's INTx router (the iohub) and
//! which device owns each PCI function number (`devfn`).
//!
//! A device drives its pin with `HostServices::set_intx(devfn, pin, level)`;
//! the host checks the device owns `devfn` (the first device to drive a
//! devfn claims it until it is removed) and hands the call to the router.
//! A device in another process gets the line's irqfd from
//! [`IntxRouting::route`] to raise it without a round trip.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard, Weak},
};

use dmhost_plugin_api::{ErrorKind, IntxRoute, PluginError};

use crate::devices::HostDevice;

#[derive(Default)]
struct State {
    router: Option<(String, Weak<HostDevice>)>,
    devfns: BTreeMap<u32, String>,
    /// Pins driven high, so a removed (or crashed) device's lines drop.
    high: std::collections::BTreeSet<(u32, u32)>,
}

/// The VM's INTx routing table.
#[derive(Default)]
pub struct IntxRouting(Mutex<State>);

impl IntxRouting {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make `device` the router if it answers as one (after it plugged).
    pub fn offer_router(&self, device: &Arc<HostDevice>) {
        let answers = match device.lock().intx_route(0, 1) {
            Ok(_) => true,
            Err(e) => e.kind != ErrorKind::Unsupported,
        };
        if !answers {
            return;
        }
        let mut st = self.lock();
        match &st.router {
            Some((other, w)) if w.strong_count() > 0 => {
                log::warn!("device {}: an INTx router ({other}) is already present; not used", device.id)
            }
            _ => {
                log::info!("device {} routes PCI INTx", device.id);
                st.router = Some((device.id.clone(), Arc::downgrade(device)));
            }
        }
    }

    /// Forget what device `id` held: the router role and its devfns.
    pub fn release(&self, id: &str) {
        let (router, dropped) = {
            let mut st = self.lock();
            if st.router.as_ref().is_some_and(|(r, _)| r == id) {
                st.router = None;
                st.high.clear();
            }
            let mine: Vec<u32> = st.devfns.iter().filter(|(_, o)| *o == id).map(|(d, _)| *d).collect();
            st.devfns.retain(|_, owner| owner != id);
            let dropped: Vec<(u32, u32)> =
                st.high.iter().filter(|(d, _)| mine.contains(d)).copied().collect();
            for p in &dropped {
                st.high.remove(p);
            }
            (st.router.as_ref().and_then(|(_, w)| w.upgrade()), dropped)
        };
        if let Some(router) = router {
            for (devfn, pin) in dropped {
                log::info!("device {id} removed holding INTx devfn {devfn:#x} pin {pin}: lowered");
                if let Err(e) = router.lock().intx_set(devfn, pin, false) {
                    log::warn!("device {id}: lowering INTx devfn {devfn:#x} pin {pin}: {e}");
                }
            }
        }
    }

    fn claim_and_router(&self, id: &str, devfn: u32) -> Result<Arc<HostDevice>, PluginError> {
        let mut st = self.lock();
        let (rid, router) = st
            .router
            .as_ref()
            .and_then(|(rid, w)| w.upgrade().map(|r| (rid.clone(), r)))
            .ok_or_else(|| PluginError::unsupported("the VM has no INTx router (add an iohub device)"))?;
        if rid == id {
            return Err(PluginError::denied("the INTx router cannot drive its own lines"));
        }
        if devfn > 0xff {
            return Err(PluginError::state(format!("devfn {devfn:#x} is not below 0x100")));
        }
        match st.devfns.get(&devfn) {
            Some(owner) if owner != id => {
                log::warn!("device {id}: INTx of devfn {devfn:#x} denied: it belongs to {owner}");
                Err(PluginError::denied(format!("devfn {devfn:#x} belongs to device {owner}")))
            }
            Some(_) => Ok(router),
            None => {
                st.devfns.insert(devfn, id.to_owned());
                Ok(router)
            }
        }
    }

    /// Device `id` drives `devfn`'s pin `pin` to `level`.
    pub fn set(&self, id: &str, devfn: u32, pin: u32, level: bool) -> Result<(), PluginError> {
        let router = self.claim_and_router(id, devfn)?;
        let r = router.lock().intx_set(devfn, pin, level);
        if r.is_ok() {
            let mut st = self.lock();
            if level {
                st.high.insert((devfn, pin));
            } else {
                st.high.remove(&(devfn, pin));
            }
        }
        r
    }

    /// The line `devfn`'s pin is wired to (with the router's fds).
    pub fn route(&self, id: &str, devfn: u32, pin: u32) -> Result<IntxRoute, PluginError> {
        let router = self.claim_and_router(id, devfn)?;
        let r = router.lock().intx_route(devfn, pin);
        r
    }
}
