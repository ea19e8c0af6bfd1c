//! Shared helpers for the VM end-to-end tests: plugin paths, a capturing
//! logger, a serial sink that collects output.

#![allow(dead_code)]

pub mod process;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use dmhost::{
    devices::{DeviceFactory, DeviceImpl},
    loader::PluginRegistry,
    vm::{vcpu::SerialSink, Vm, VmConfig},
};

/// target/<profile>, where cargo puts the plugin .so files.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// Path of a built plugin library; fails clearly when it is not built.
pub fn plugin_path(lib: &str) -> PathBuf {
    let p = target_dir().join(format!("lib{lib}.so"));
    assert!(p.is_file(), "{} is missing: build the plugins first (cargo build --workspace)", p.display());
    p
}

/// A registry holding the real pc-dimm and testdev shared libraries.
pub fn registry() -> Arc<PluginRegistry> {
    let mut r = PluginRegistry::default();
    r.load(&plugin_path("pc_dimm")).unwrap();
    r.load(&plugin_path("testdev")).unwrap();
    Arc::new(r)
}

/// Create a device of `kind` from the registry (a real .so).
pub fn add(vm: &Vm, reg: &PluginRegistry, kind: &str, id: &str, config: &str) -> dmhost::devices::DeviceInfo {
    vm.add_device(kind, id, |host| DeviceFactory::create(reg, kind, id, config, host)).unwrap()
}

pub fn builtin_factory() -> impl DeviceFactory {
    struct F;
    impl DeviceFactory for F {
        fn create(
            &self,
            kind: &str,
            id: &str,
            config: &str,
            host: dmhost_plugin_api::Host,
        ) -> Result<DeviceImpl, dmhost_plugin_api::PluginError> {
            use dmhost_plugin_api::Plugin;
            testdev::TestdevPlugin::create(kind, id, config, host).map(DeviceImpl::Builtin)
        }
    }
    F
}

/// Serial output collected in memory.
#[derive(Clone, Default)]
pub struct Serial(pub Arc<Mutex<Vec<u8>>>);

impl Serial {
    pub fn sink(&self) -> SerialSink {
        let buf = Arc::clone(&self.0);
        Arc::new(move |b: &[u8]| buf.lock().unwrap().extend_from_slice(b))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub fn vm_with_serial(ram: u64) -> (Vm, Serial) {
    let serial = Serial::default();
    let vm = Vm::new(VmConfig { ram_size: ram, vcpus: 1, serial: serial.sink() }).unwrap();
    (vm, serial)
}

/// Log records seen by this test binary (host and plugins).
pub static LOGS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        if r.level() <= log::Level::Info {
            LOGS.lock().unwrap().push((r.level(), r.args().to_string()));
        }
    }
    fn flush(&self) {}
}
static CAPTURE: Capture = Capture;

pub fn capture_logs() {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}

pub fn warnings_containing(s: &str) -> Vec<String> {
    LOGS.lock()
        .unwrap()
        .iter()
        .filter(|(l, m)| *l == log::Level::Warn && m.contains(s))
        .map(|(_, m)| m.clone())
        .collect()
}

/// Poll `f` until it holds; fail naming `what` after `timeout`. For state
/// KVM updates asynchronously (an irqfd injects from a kernel worker).
pub fn wait_until(what: &str, timeout: std::time::Duration, mut f: impl FnMut() -> bool) {
    let t = std::time::Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
