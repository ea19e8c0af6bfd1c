//! The conformance checks run against every device kind of a plugin.

use std::panic::{catch_unwind, AssertUnwindSafe};

use dmhost_plugin_api::{DeviceBox, DsmRequest, ErrorKind, PlugInfo, PluginError, RSlice, RSliceMut, RStr};

use crate::{
    fuzz::Rng,
    nfit::check_nfit,
    suite_host::{SuiteHost, SUITE_REGION_GPA},
    CheckResult, Target,
};

type Check = Result<(), String>;

/// Run every check on `module`.
pub fn run_all(module: Target<'_>) -> Vec<CheckResult> {
    let mut results = vec![run("metadata", || metadata(module))];
    results.extend(crate::vfio::run_all(module));
    results.push(run("unknown-kind", || unknown_kind(module)));
    let kinds = catch_unwind(|| (module.module.kinds())().into_vec()).unwrap_or_default();
    for kind in kinds {
        let k = kind.name.to_string();
        let cfg = kind.default_config.to_string();
        let checks: [(&str, &dyn Fn() -> Check); 7] = [
            ("create-default", &|| create(module, &k, &cfg).map(drop)),
            ("malformed-config", &|| malformed_config(module, &k)),
            ("memory-region", &|| memory_region(module, &k, &cfg)),
            ("plug-unplug", &|| plug_unplug(module, &k, &cfg)),
            ("migration-round-trip", &|| migration_round_trip(module, &k, &cfg)),
            ("acpi-fragments", &|| acpi_fragments(module, &k, &cfg)),
            ("untrusted-input", &|| untrusted_input(module, &k, &cfg)),
        ];
        for (name, check) in checks {
            results.push(run(&format!("{k}/{name}"), check));
        }
    }
    results
}

pub(crate) fn run(name: &str, check: impl FnOnce() -> Check) -> CheckResult {
    let outcome = catch_unwind(AssertUnwindSafe(check))
        .unwrap_or_else(|_| Err("the check itself panicked (see stderr)".into()));
    CheckResult { name: name.to_owned(), passed: outcome.is_ok(), detail: outcome.err().unwrap_or_default() }
}

fn err_text(e: &PluginError) -> String {
    format!("{:?}: {}", e.kind, e.message)
}

/// A device and the host double it was given.
struct Dut {
    dev: DeviceBox,
    host: SuiteHost,
}

fn create(module: Target<'_>, kind: &str, config: &str) -> Result<Dut, String> {
    let host = SuiteHost::with_drivers(module.drivers);
    let dev = (module.module.create())(RStr::from(kind), RStr::from("dut0"), RStr::from(config), host.host())
        .into_result()
        .map_err(|e| format!("create with config {config}: {}", err_text(&e)))?;
    Ok(Dut { dev, host })
}

/// Create and plug, with the device's region "placed" at the suite's GPA.
fn plugged(module: Target<'_>, kind: &str, config: &str) -> Result<Dut, String> {
    let mut d = create(module, kind, config)?;
    let region = d.dev.memory_region().into_option();
    if let Some(r) = region {
        d.host.state.lock().unwrap().owned = Some((SUITE_REGION_GPA, r.memory.size));
    }
    let info = PlugInfo { region_gpa: region.map(|_| SUITE_REGION_GPA).into() };
    d.dev.plug(info).into_result().map_err(|e| format!("plug: {}", err_text(&e)))?;
    Ok(d)
}

fn metadata(module: Target<'_>) -> Check {
    let name = module.module.name();
    if name.is_empty() {
        return Err("plugin name is empty".into());
    }
    let version = module.module.version();
    let parts: Vec<&str> = version.split(['.', '-', '+']).take(3).collect();
    if parts.len() < 3 || parts.iter().any(|p| p.parse::<u64>().is_err()) {
        return Err(format!("version {version:?} is not semver (x.y.z)"));
    }
    let kinds = catch_unwind(|| (module.module.kinds())().into_vec()).map_err(|_| "kinds() panicked")?;
    let drivers = crate::vfio::drivers_of(module.module);
    if kinds.is_empty() && drivers.is_empty() {
        return Err("plugin provides neither device kinds nor VFIO drivers".into());
    }
    let mut driver_names = std::collections::BTreeSet::new();
    for d in &drivers {
        let n = d.name.as_str();
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(format!("VFIO driver name {n:?} must be non-empty lowercase [a-z0-9-]"));
        }
        if !driver_names.insert(n.to_owned()) {
            return Err(format!("VFIO driver {n:?} listed twice"));
        }
        serde_json::from_str::<serde_json::Value>(d.default_config.as_str())
            .map_err(|e| format!("VFIO driver {n}: default config is not JSON: {e}"))?;
    }
    let mut names = std::collections::BTreeSet::new();
    for k in &kinds {
        let n = k.name.as_str();
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') {
            return Err(format!("kind name {n:?} must be non-empty lowercase [a-z0-9-]"));
        }
        if !names.insert(n.to_owned()) {
            return Err(format!("kind {n:?} listed twice"));
        }
        serde_json::from_str::<serde_json::Value>(k.default_config.as_str())
            .map_err(|e| format!("kind {n}: default config is not JSON: {e}"))?;
    }
    Ok(())
}

fn unknown_kind(module: Target<'_>) -> Check {
    match create(module, "no-such-kind-for-conformance", "{}") {
        Ok(_) => Err("creating an unknown kind succeeded".into()),
        Err(e) if e.contains("Panicked") => Err(e),
        Err(_) => Ok(()),
    }
}

fn malformed_config(module: Target<'_>, kind: &str) -> Check {
    for bad in ["{", "[1, 2", "42", "\"text\"", "{\"size\": {\"nested\": []}}"] {
        let host = SuiteHost::with_drivers(module.drivers);
        let r = (module.module.create())(RStr::from(kind), RStr::from("dut0"), RStr::from(bad), host.host());
        match r.into_result() {
            Ok(_) => return Err(format!("malformed config {bad:?} was accepted")),
            Err(e) if e.kind == ErrorKind::Panicked => {
                return Err(format!("config {bad:?} made create panic: {}", e.message))
            }
            Err(e) if e.message.is_empty() => {
                return Err(format!("config {bad:?} gave an error without a message"))
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn memory_region(module: Target<'_>, kind: &str, config: &str) -> Check {
    let d = create(module, kind, config)?;
    let Some(region) = d.dev.memory_region().into_option() else {
        return Ok(());
    };
    let backend =
        d.dev.backend_memory().into_option().ok_or("device has a guest region but no backend memory")?;
    let (r, b) = (region.memory, backend);
    let page = 4096;
    if r.size == 0 || r.size % page != 0 || r.host_addr % page != 0 {
        return Err(format!("guest region size {:#x} / address {:#x} not page aligned", r.size, r.host_addr));
    }
    if !region.align.is_power_of_two() || region.align < page {
        return Err(format!("alignment {:#x} is not a power of two >= 4 KiB", region.align));
    }
    if let Some(gpa) = region.requested_gpa.into_option() {
        if gpa % region.align != 0 {
            return Err(format!("requested address {gpa:#x} breaks the device's own alignment"));
        }
    }
    let inside = r.host_addr >= b.host_addr
        && r.host_addr.checked_add(r.size).is_some_and(|end| end <= b.host_addr + b.size);
    if !inside {
        return Err(format!(
            "guest region {:#x}+{:#x} is not inside the backend {:#x}+{:#x}",
            r.host_addr, r.size, b.host_addr, b.size
        ));
    }
    if r.fd == b.fd && r.fd >= 0 && r.fd_offset - b.fd_offset != r.host_addr - b.host_addr {
        return Err("guest region fd offset disagrees with its address in the backend".into());
    }
    if r.fd >= 0 {
        // SAFETY: F_GETFD only queries the descriptor table.
        if unsafe { libc::fcntl(r.fd, libc::F_GETFD) } < 0 {
            return Err(format!("region fd {} is not an open descriptor", r.fd));
        }
    }
    // The mapping must be readable where the device says it is.
    for addr in [r.host_addr, r.host_addr + r.size - 1] {
        // SAFETY: the device asserts the region is mapped for its lifetime;
        // reading one byte checks that claim.
        let _ = unsafe { std::ptr::read_volatile(addr as *const u8) };
    }
    Ok(())
}

fn plug_unplug(module: Target<'_>, kind: &str, config: &str) -> Check {
    let mut d = plugged(module, kind, config)?;
    let info = PlugInfo { region_gpa: d.dev.memory_region().into_option().map(|_| SUITE_REGION_GPA).into() };
    match d.dev.plug(info).into_result() {
        Ok(()) => return Err("a second plug was accepted".into()),
        Err(e) if e.kind == ErrorKind::Panicked => {
            return Err(format!("second plug panicked: {}", e.message))
        }
        Err(_) => {}
    }
    if d.dev.backend_memory().is_some() && d.host.state.lock().unwrap().ram.is_empty() {
        return Err("device has backend memory but registered no RAM for migration on plug".into());
    }
    d.dev.unplug().into_result().map_err(|e| format!("unplug: {}", err_text(&e)))?;
    let leftovers = d.host.state.lock().unwrap().leftovers();
    if !leftovers.is_empty() {
        return Err(format!("unplug left registered: {}", leftovers.join(", ")));
    }
    if d.dev.unplug().into_result().is_ok() {
        return Err("unplug of an unplugged device was accepted".into());
    }
    d.dev.plug(info).into_result().map_err(|e| format!("re-plug after unplug: {}", err_text(&e)))?;
    d.dev.unplug().into_result().map_err(|e| format!("second unplug: {}", err_text(&e)))
}

/// Sections a source device produced: (version, bytes).
fn save_all(dev: &mut DeviceBox) -> Result<Vec<Vec<u8>>, String> {
    let e = |what: &str, err: PluginError| format!("{what}: {}", err_text(&err));
    dev.save_setup().into_result().map_err(|x| e("save_setup", x))?;
    let mut sections = Vec::new();
    for _ in 0..10_000 {
        if !dev.is_active_iterate() {
            break;
        }
        let chunk = dev.save_live_iterate().into_result().map_err(|x| e("save_live_iterate", x))?;
        if !chunk.data.is_empty() {
            sections.push(chunk.data.into_vec());
        }
        if chunk.complete {
            break;
        }
    }
    dev.vm_state_changed(false).into_result().map_err(|x| e("vm_state_changed(false)", x))?;
    let last =
        dev.save_live_complete_precopy().into_result().map_err(|x| e("save_live_complete_precopy", x))?;
    sections.push(last.into_vec());
    dev.save_cleanup();
    Ok(sections)
}

fn migration_round_trip(module: Target<'_>, kind: &str, config: &str) -> Check {
    let mut src = plugged(module, kind, config)?;
    let version = src.dev.state_version();
    let sections = save_all(&mut src.dev)?;

    let mut dst = plugged(module, kind, config)?;
    let e = |what: &str, err: PluginError| format!("{what}: {}", err_text(&err));
    dst.dev.load_setup().into_result().map_err(|x| e("load_setup", x))?;
    for s in &sections {
        dst.dev.load_state(version, RSlice::from(&s[..])).into_result().map_err(|x| e("load_state", x))?;
    }
    dst.dev.load_cleanup().into_result().map_err(|x| e("load_cleanup", x))?;
    // Both sides are stopped now: saving each again must give the same
    // final state (a device that pre-copied sent only its remainder last
    // time, so compare re-saves rather than the first save).
    let again = save_all(&mut dst.dev)?;
    let again_src = save_all(&mut src.dev)?;
    if again.last() != again_src.last() {
        return Err("state saved from the destination differs from the source's".into());
    }

    let mut fresh = plugged(module, kind, config)?;
    let last = sections.last().cloned().unwrap_or_default();
    fresh.dev.load_setup().into_result().map_err(|x| e("load_setup", x))?;
    match fresh.dev.load_state(version + 1, RSlice::from(&last[..])).into_result() {
        Ok(()) => Err(format!("state version {} (newer than {version}) was accepted", version + 1)),
        Err(err) if err.kind == ErrorKind::Panicked => {
            Err(format!("newer version panicked: {}", err.message))
        }
        Err(_) => Ok(()),
    }
}

fn acpi_fragments(module: Target<'_>, kind: &str, config: &str) -> Check {
    let mut d = plugged(module, kind, config)?;
    let nfit =
        d.dev.nfit_structures().into_result().map_err(|e| format!("nfit_structures: {}", err_text(&e)))?;
    check_nfit(&nfit)?;
    d.dev.aml().into_result().map_err(|e| format!("aml: {}", err_text(&e)))?;
    for handle in d.dev.dsm_handles().into_vec() {
        let req = DsmRequest { handle, revision: 1, function: 0, arg3: Default::default() };
        let reply = d.dev.dsm(&req).into_result().map_err(|e| format!("dsm: {}", err_text(&e)))?;
        if reply.status != 0 || reply.data.is_empty() {
            return Err(format!(
                "_DSM function 0 on handle {handle:#x} gave status {} with {} bytes",
                reply.status,
                reply.data.len()
            ));
        }
    }
    Ok(())
}

fn untrusted_input(module: Target<'_>, kind: &str, config: &str) -> Check {
    let mut d = plugged(module, kind, config)?;
    let mut rng = Rng::new(0x5eed_1234_abcd);
    let mut handles = d.dev.dsm_handles().into_vec();
    handles.extend([0, 0xffff_ffff]);
    let panicked = |what: &str, r: Result<(), PluginError>| match r {
        Err(e) if matches!(e.kind, ErrorKind::Panicked | ErrorKind::Fenced) => {
            Err(format!("{what} panicked: {}", e.message))
        }
        _ => Ok(()),
    };
    for i in 0..2000 {
        let len = [1usize, 2, 4, 8][rng.below(4) as usize];
        let addr = if rng.below(2) == 0 { SUITE_REGION_GPA + rng.below(1 << 16) } else { rng.next_u64() };
        let mut buf = vec![0u8; len];
        let data = rng.bytes(len);
        let r = match i % 7 {
            0 => d.dev.pio_read(addr & 0xffff, RSliceMut::from(&mut buf[..])).into_result(),
            1 => d.dev.pio_write(addr & 0xffff, RSlice::from(&data[..])).into_result(),
            2 => d.dev.mmio_read(addr, RSliceMut::from(&mut buf[..])).into_result(),
            3 => d.dev.mmio_write(addr, RSlice::from(&data[..])).into_result(),
            4 => d.dev.pci_config_read(rng.below(4096) as u32, RSliceMut::from(&mut buf[..])).into_result(),
            5 => d.dev.pci_config_write(rng.below(4096) as u32, RSlice::from(&data[..])).into_result(),
            _ => {
                let n = rng.below(64) as usize;
                let req = DsmRequest {
                    handle: handles[rng.below(handles.len() as u64) as usize],
                    revision: rng.below(3) as u32,
                    function: rng.below(10) as u32,
                    arg3: rng.bytes(n).into(),
                };
                d.dev.dsm(&req).into_result().map(drop)
            }
        };
        panicked(&format!("guest access #{i}"), r)?;
    }
    let version = d.dev.state_version();
    for n in [0usize, 1, 7, 64, 1000] {
        let mut fresh = plugged(module, kind, config)?;
        let _ = fresh.dev.load_setup();
        let junk = rng.bytes(n);
        panicked(
            &format!("load_state of {n} random bytes"),
            fresh.dev.load_state(version, RSlice::from(&junk[..])).into_result(),
        )?;
    }
    if d.dev.is_fenced() {
        return Err("device fenced itself during untrusted input".into());
    }
    Ok(())
}
