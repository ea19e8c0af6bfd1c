//! Conformance of vendor VFIO drivers (plugin API 1.1): the VFIO device
//! contract of include/uapi/linux/vfio.h as `VfioDriverDevice` states it.
//!
//! For every driver a library exports, opened with its default config:
//! - `info`: device/region/irq info is sane, config space carries the
//!   advertised IDs, bad indices and ranges are refused without a panic;
//! - `arcs`: from every supported state, every target: accepted exactly when
//!   it is a single arc for the device's flags, refused ones leave the state
//!   unchanged, sessions open exactly on the opening arcs, ERROR and
//!   STOP_COPY → PRE_COPY* are refused;
//! - `data-states`: reads/writes/precopy info in the wrong state or with a
//!   stale session are refused;
//! - `precopy` (with VFIO_MIGRATION_PRE_COPY): sizes stay sane (no
//!   underflowed huge values), initial_bytes never grows, the temporary end
//!   of stream is ENOMSG (never a 0-byte read), STOP_COPY ends with 0-byte
//!   reads, never ENOMSG;
//! - `resume`: a second instance accepts exactly what PRE_COPY + STOP_COPY
//!   produced (written in odd chunks), both then give the same STOP_COPY
//!   stream; a truncated stream fails RESUMING → STOP and reset recovers;
//! - `untrusted`: random region accesses and migration data do not panic.

use std::time::{Duration, Instant};

use dmhost_plugin_api::{
    vfio::{arc_opens_stream, is_arc, next_state, VFIO_MIGRATION_PRE_COPY, VFIO_PCI_CONFIG_REGION_INDEX},
    MigState, PluginModule_Ref, RSlice, RSliceMut, VfioDataStream, VfioDriverBox, VfioDriverInfo, VfioError,
};

use crate::{checks::run, fuzz::Rng, suite_host::SuiteHost, CheckResult, Target};

type Check = Result<(), String>;

/// The VFIO drivers a library lists (none for a 1.0 library).
pub fn drivers_of(module: PluginModule_Ref) -> Vec<VfioDriverInfo> {
    let Some(list) = module.vfio_drivers() else {
        return Vec::new();
    };
    std::panic::catch_unwind(|| list().into_vec()).unwrap_or_default()
}

pub fn run_all(t: Target<'_>) -> Vec<CheckResult> {
    let mut results = Vec::new();
    for d in drivers_of(t.module) {
        let name = d.name.to_string();
        let checks: [(&str, &dyn Fn() -> Check); 6] = [
            ("info", &|| info(t.module, &d)),
            ("arcs", &|| arcs(t.module, &d)),
            ("data-states", &|| data_states(t.module, &d)),
            ("precopy", &|| precopy(t.module, &d)),
            ("resume", &|| resume(t.module, &d)),
            ("untrusted", &|| untrusted(t.module, &d)),
        ];
        for (check, f) in checks {
            results.push(run(&format!("vfio/{name}/{check}"), f));
        }
    }
    results
}

fn open(module: PluginModule_Ref, d: &VfioDriverInfo) -> Result<VfioDriverBox, String> {
    let open = module.open_vfio_driver().ok_or("library lists VFIO drivers but has no open_vfio_driver")?;
    let host = SuiteHost::new();
    open(d.name.as_rstr(), d.default_config.as_rstr(), host.host())
        .into_result()
        .map_err(|e| format!("open {} with {}: {:?}: {}", d.name, d.default_config, e.kind, e.message))
}

fn e(what: &str, err: VfioError) -> String {
    format!("{what}: {err}")
}

fn panicked(what: &str, err: &VfioError) -> Check {
    if err.message.contains("panicked") || err.message.contains("fenced") {
        return Err(format!("{what} panicked: {err}"));
    }
    Ok(())
}

fn state(dev: &VfioDriverBox) -> Result<MigState, String> {
    let raw = dev.get_state();
    MigState::from_raw(raw).ok_or_else(|| format!("get_state returned {raw}, not a state"))
}

/// Walk single arcs from the current state to `to`, as vfio-pci does.
/// Leaving RESUMING goes through reset (the uAPI's way to abort it).
fn go(dev: &VfioDriverBox, to: MigState) -> Result<Option<VfioDataStream>, String> {
    let flags = dev.device_info().migration_flags;
    let mut opened = None;
    for _ in 0..8 {
        let cur = state(dev)?;
        if cur == to {
            return Ok(opened);
        }
        if cur == MigState::Resuming || cur == MigState::Error {
            dev.reset().into_result().map_err(|x| e("reset", x))?;
            if state(dev)? != MigState::Running {
                return Err(format!("reset from {cur} did not return to RUNNING"));
            }
            continue;
        }
        let Some(next) = next_state(cur, to, flags) else {
            // e.g. STOP_COPY -> PRE_COPY*: start over from RUNNING.
            dev.reset().into_result().map_err(|x| e("reset", x))?;
            continue;
        };
        if let Some(s) = dev
            .set_state(next.raw())
            .into_result()
            .map_err(|x| e(&format!("{cur} -> {next}"), x))?
            .into_option()
        {
            opened = Some(s);
        }
    }
    Err(format!("could not reach {to}"))
}

fn supported(flags: u64) -> Vec<MigState> {
    MigState::ALL.into_iter().filter(|s| s.supported(flags)).collect()
}

fn info(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let dev = open(module, d)?;
    let info = dev.device_info();
    if info.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
        return Err(format!("{} regions: no config space region", info.num_regions));
    }
    let cfg = dev
        .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
        .into_result()
        .map_err(|x| e("config region info", x))?;
    if cfg.size < 64 {
        return Err(format!("config space region is {} bytes", cfg.size));
    }
    let mut ids = [0u8; 4];
    dev.region_read(VFIO_PCI_CONFIG_REGION_INDEX, 0, RSliceMut::from(&mut ids[..]))
        .into_result()
        .map_err(|x| e("config read", x))?;
    let (v, dv) = (u16::from_le_bytes([ids[0], ids[1]]), u16::from_le_bytes([ids[2], ids[3]]));
    if (v, dv) != (d.vendor_id, d.device_id) {
        return Err(format!(
            "config space says {v:04x}:{dv:04x}, driver info {:04x}:{:04x}",
            d.vendor_id, d.device_id
        ));
    }
    for i in 0..info.num_irqs {
        dev.irq_info(i).into_result().map_err(|x| e(&format!("irq_info({i})"), x))?;
    }
    if dev.region_info(info.num_regions + 3).is_ok() || dev.irq_info(u32::MAX).is_ok() {
        return Err("out-of-range region/irq index accepted".into());
    }
    let mut b = [0u8; 4];
    if dev.region_read(VFIO_PCI_CONFIG_REGION_INDEX, cfg.size - 2, RSliceMut::from(&mut b[..])).is_ok() {
        return Err("config read past the end of the region accepted".into());
    }
    if info.migration_flags != 0 {
        if info.migration_flags & 1 == 0 {
            return Err(format!("migration flags {:#x} lack STOP_COPY", info.migration_flags));
        }
        if state(&dev)? != MigState::Running {
            return Err(format!("a new device is {}, not RUNNING", state(&dev)?));
        }
    }
    Ok(())
}

fn arcs(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let dev = open(module, d)?;
    let flags = dev.device_info().migration_flags;
    if flags == 0 {
        return Ok(());
    }
    let states = supported(flags);
    for &from in &states {
        for to in MigState::ALL {
            go(&dev, from)?;
            let r = dev.set_state(to.raw()).into_result();
            let now = state(&dev)?;
            let legal = is_arc(from, to, flags);
            match r {
                Ok(opened) if legal => {
                    if now != to {
                        return Err(format!("{from} -> {to} succeeded but the device is {now}"));
                    }
                    if opened.is_some() != arc_opens_stream(from, to) {
                        return Err(format!(
                            "{from} -> {to}: session opened {} (uAPI: {})",
                            opened.is_some(),
                            arc_opens_stream(from, to)
                        ));
                    }
                }
                // Leaving RESUMING with no data may be refused (nothing to
                // load), as long as the device says so and recovers by reset.
                Err(_) if (from, to) == (MigState::Resuming, MigState::Stop) => {}
                Err(x) if legal => return Err(e(&format!("legal arc {from} -> {to}"), x)),
                Ok(_) => {
                    return Err(format!("{from} -> {to} is not an arc for flags {flags:#x} but was accepted"))
                }
                Err(x) => {
                    panicked(&format!("{from} -> {to}"), &x)?;
                    if now != from {
                        return Err(format!("refused {from} -> {to} moved the device to {now}"));
                    }
                }
            }
        }
    }
    Ok(())
}

fn data_states(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let dev = open(module, d)?;
    let flags = dev.device_info().migration_flags;
    if flags == 0 {
        return Ok(());
    }
    let mut buf = vec![0u8; 4096];
    let bogus = VfioDataStream { id: u64::MAX - 7 };
    let mut last: Option<VfioDataStream> = None;
    for s in supported(flags) {
        let opened = go(&dev, s)?;
        let current = opened.or(if s.has_stream() { last } else { None });
        for stream in [Some(bogus), last, current].into_iter().flatten() {
            let is_current = Some(stream) == current && s.has_stream();
            let read = dev.read_migration_data(stream, RSliceMut::from(&mut buf[..])).into_result();
            let write = dev.write_migration_data(stream, RSlice::from(&buf[..0])).into_result();
            let info = dev.precopy_info(stream).into_result();
            if !(is_current && s.is_saving()) && read.is_ok() {
                return Err(format!("read accepted in {s} (session {} current {is_current})", stream.id));
            }
            if !(is_current && s == MigState::Resuming) && write.is_ok() {
                return Err(format!("write accepted in {s} (session {} current {is_current})", stream.id));
            }
            if !(is_current && matches!(s, MigState::PreCopy | MigState::PreCopyP2p)) && info.is_ok() {
                return Err(format!("precopy info accepted in {s} (session {})", stream.id));
            }
        }
        if s.has_stream() {
            last = current;
        }
    }
    Ok(())
}

const SANE: u64 = 1 << 62;

/// Read PRE_COPY data until the temporary end of stream; returns the bytes.
fn drain_precopy(dev: &VfioDriverBox, s: VfioDataStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut last_initial = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let info = dev.precopy_info(s).into_result().map_err(|x| e("precopy_info", x))?;
        if info.initial_bytes >= SANE || info.dirty_bytes >= SANE {
            return Err(format!("implausible pre-copy sizes (underflow?): {info:?}"));
        }
        if info.initial_bytes > last_initial {
            return Err(format!("initial_bytes grew from {last_initial} to {}", info.initial_bytes));
        }
        last_initial = info.initial_bytes;
        match dev.read_migration_data(s, RSliceMut::from(&mut buf[..])).into_result() {
            Ok(0) => return Err("PRE_COPY read returned 0 (end of stream) instead of ENOMSG".into()),
            Ok(n) => out.extend_from_slice(&buf[..n as usize]),
            Err(x) if x.is_no_data() => return Ok(out),
            Err(x) => return Err(e("PRE_COPY read", x)),
        }
    }
    Err("pre-copy never reached its temporary end of stream (ENOMSG) in 30 s".into())
}

fn drain_stop_copy(dev: &VfioDriverBox, s: VfioDataStream) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match dev.read_migration_data(s, RSliceMut::from(&mut buf[..])).into_result() {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n as usize]),
            Err(x) if x.is_no_data() => return Err("ENOMSG in STOP_COPY (not allowed by the uAPI)".into()),
            Err(x) => return Err(e("STOP_COPY read", x)),
        }
        if out.len() as u64 > 16 << 30 {
            return Err("STOP_COPY stream does not end".into());
        }
    }
    match dev.read_migration_data(s, RSliceMut::from(&mut buf[..])).into_result() {
        Ok(0) => Ok(out),
        other => Err(format!("read after STOP_COPY end of stream gave {other:?}, not 0")),
    }
}

fn precopy(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let dev = open(module, d)?;
    let flags = dev.device_info().migration_flags;
    if flags & VFIO_MIGRATION_PRE_COPY == 0 {
        return Ok(());
    }
    let s = go(&dev, MigState::PreCopy)?.ok_or("RUNNING -> PRE_COPY opened no session")?;
    let first = drain_precopy(&dev, s)?;
    if first.is_empty() {
        return Err("PRE_COPY produced no initial data".into());
    }
    let size = dev.stop_copy_size().into_result().unwrap_or(0);
    if size >= SANE {
        return Err(format!("implausible stop-copy size {size}"));
    }
    if go(&dev, MigState::StopCopy)?.is_some() {
        return Err("PRE_COPY -> STOP_COPY opened a new session (it must continue the old one)".into());
    }
    if dev.precopy_info(s).is_ok() {
        return Err("precopy info accepted in STOP_COPY".into());
    }
    drain_stop_copy(&dev, s)?;
    Ok(())
}

/// Save a full migration (pre-copy if supported, then stop-copy).
fn save(dev: &VfioDriverBox) -> Result<Vec<u8>, String> {
    let flags = dev.device_info().migration_flags;
    let mut stream = Vec::new();
    let s = if flags & VFIO_MIGRATION_PRE_COPY != 0 {
        let s = go(dev, MigState::PreCopy)?.ok_or("no pre-copy session")?;
        stream.extend(drain_precopy(dev, s)?);
        go(dev, MigState::StopCopy)?;
        s
    } else {
        go(dev, MigState::StopCopy)?.ok_or("no stop-copy session")?
    };
    stream.extend(drain_stop_copy(dev, s)?);
    go(dev, MigState::Stop)?;
    Ok(stream)
}

fn load(dev: &VfioDriverBox, data: &[u8], chunk: usize) -> Result<(), String> {
    let r = go(dev, MigState::Resuming)?.ok_or("STOP -> RESUMING opened no session")?;
    for c in data.chunks(chunk) {
        let n =
            dev.write_migration_data(r, RSlice::from(c)).into_result().map_err(|x| e("resume write", x))?;
        if n as usize != c.len() {
            return Err(format!("resume write took {n} of {} bytes", c.len()));
        }
    }
    dev.set_state(MigState::Stop.raw()).into_result().map_err(|x| e("RESUMING -> STOP", x))?;
    Ok(())
}

fn stop_copy_of(dev: &VfioDriverBox) -> Result<Vec<u8>, String> {
    let s = go(dev, MigState::StopCopy)?.ok_or("STOP -> STOP_COPY opened no session")?;
    let out = drain_stop_copy(dev, s)?;
    go(dev, MigState::Stop)?;
    Ok(out)
}

fn resume(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let src = open(module, d)?;
    if src.device_info().migration_flags == 0 {
        return Ok(());
    }
    let stream = save(&src)?;
    let dst = open(module, d)?;
    load(&dst, &stream, 4093)?;
    if stop_copy_of(&src)? != stop_copy_of(&dst)? {
        return Err("after resume, the destination's STOP_COPY stream differs from the source's".into());
    }
    // A truncated stream must not load.
    let bad = open(module, d)?;
    match load(&bad, &stream[..stream.len().saturating_sub(1)], 1 << 16) {
        Ok(()) => return Err("a stream missing its last byte was accepted".into()),
        Err(msg) if msg.contains("panicked") => return Err(msg),
        Err(_) => {}
    }
    bad.reset().into_result().map_err(|x| e("reset after failed resume", x))?;
    if state(&bad)? != MigState::Running {
        return Err(format!("reset left the device {}", state(&bad)?));
    }
    Ok(())
}

fn untrusted(module: PluginModule_Ref, d: &VfioDriverInfo) -> Check {
    let dev = open(module, d)?;
    let info = dev.device_info();
    let mut rng = Rng::new(0x0f10_5eed);
    for i in 0..2000 {
        let index = rng.below(u64::from(info.num_regions) + 2) as u32;
        let len = [1usize, 2, 4, 8][rng.below(4) as usize];
        let offset = if rng.below(4) == 0 { rng.next_u64() } else { rng.below(8192) };
        let data = rng.bytes(len);
        let mut buf = vec![0u8; len];
        let r = if i % 2 == 0 {
            dev.region_read(index, offset, RSliceMut::from(&mut buf[..])).into_result()
        } else {
            dev.region_write(index, offset, RSlice::from(&data[..])).into_result()
        };
        if let Err(x) = r {
            panicked(&format!("region access #{i}"), &x)?;
        }
    }
    if info.migration_flags != 0 {
        // Junk into a fresh RESUMING session, then leave it.
        for n in [1usize, 24, 100, 5000] {
            dev.reset().into_result().map_err(|x| e("reset", x))?;
            let r = go(&dev, MigState::Resuming)?.ok_or("no resume session")?;
            let junk = rng.bytes(n);
            if let Err(x) = dev.write_migration_data(r, RSlice::from(&junk[..])).into_result() {
                panicked("junk migration data", &x)?;
            }
            if let Err(x) = dev.set_state(MigState::Stop.raw()).into_result() {
                panicked("RESUMING -> STOP after junk", &x)?;
            }
        }
    }
    Ok(())
}
