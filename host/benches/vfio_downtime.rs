//! Downtime of a live migration of a VM with vfio-pci over the sample
//! vendor driver (a 64 MiB device state that its background thread keeps
//! changing, the `vfio-verify` guest poking its registers), between two
//! `dmhost` processes over loopback TCP: pre-copy on (the device state
//! goes through `save_live_iterate` while the guest runs) against
//! `x-allow-pre-copy = false` (all of it in stop-copy), measured in one
//! run, with the ratio. Goal: pre-copy downtime at most 20% of
//! stop-copy-only.
//!
//! Run: `cargo build --release --workspace && cargo bench -p dmhost --bench vfio_downtime`

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::{
    process::{wait_status, VmProcess},
    target_dir,
};
use dmhost::control_client::ControlClient;
use serde_json::json;

const RUNS: usize = 3;
/// The source logs its stop-copy size and downtime at these levels.
const SOURCE_LOG: &str = "warn,dmhost::migration::source=info,vfio_pci=debug";

#[derive(Debug, Clone, Copy)]
struct Outcome {
    downtime_ms: f64,
    stop_copy_bytes: u64,
    total_ms: u64,
}

fn config(dir: &Path, precopy: bool) -> PathBuf {
    let cfg = format!(
        "ram = \"64M\"\nprogram = \"builtin:vfio-verify\"\n[regs]\nr12 = 100000\nr13 = 1000000\n\
         [[device]]\nkind = \"vfio-pci\"\nid = \"vfio0\"\n\
         config = {{ driver = \"vendor-sample\", driver-config = {{ state-size = \"64M\" }}, intx-gsi = 10, x-allow-pre-copy = {precopy} }}\n"
    );
    let p = dir.join(format!("vfio-{precopy}.toml"));
    std::fs::write(&p, cfg).unwrap();
    p
}

fn migrate_once(dir: &Path, precopy: bool, n: usize) -> Outcome {
    let cfg = config(dir, precopy);
    let t = Duration::from_secs(60);
    let (_dst, uri) = VmProcess::destination(&cfg, "tcp:127.0.0.1:0", &[]);
    let sock = dir.join(format!("src-{precopy}-{n}.sock"));
    let (src, _) = VmProcess::spawn_logged(&["--control", sock.to_str().unwrap()], &cfg, SOURCE_LOG);
    src.wait_stdout("vfio-verify: round 0x0000000000000040", t);
    let mut c = ControlClient::connect(&sock).unwrap();
    c.execute("migrate", json!({ "uri": uri })).unwrap();
    let q = wait_status(&mut c, &["completed", "failed", "cancelled"], t);
    assert_eq!(q["status"], "completed", "migration failed: {q}");
    let stop_copy: u64 =
        src.wait_after(true, "stop-copy sent ", t).split_whitespace().next().unwrap().parse().unwrap();
    let done = src.wait_after(true, "migration: completed, ", t);
    let downtime: f64 =
        done.split("downtime ").nth(1).and_then(|d| d.split_whitespace().next()).unwrap().parse().unwrap();
    Outcome {
        downtime_ms: downtime,
        stop_copy_bytes: stop_copy,
        total_ms: q["total-time"].as_u64().unwrap_or(0),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if let Err(why) = dmhost::run::kvm_available() {
        eprintln!("SKIPPED vfio_downtime: {why}");
        return;
    }
    for lib in ["libvfio_pci.so", "libvfio_vendor_sample.so"] {
        assert!(target_dir().join(lib).is_file(), "{lib} missing: cargo build --release --workspace first");
    }
    let dir = tempfile::tempdir().unwrap();
    let mut results = Vec::new();
    for precopy in [true, false] {
        let mut runs = Vec::new();
        for n in 0..RUNS {
            let o = migrate_once(dir.path(), precopy, n);
            println!(
                "vfio_downtime/{}: run {n}: downtime {:.1} ms, stop-copy {:.1} MiB, total {} ms",
                if precopy { "pre-copy" } else { "stop-copy-only" },
                o.downtime_ms,
                o.stop_copy_bytes as f64 / (1 << 20) as f64,
                o.total_ms
            );
            runs.push(o);
        }
        results.push(median(runs.iter().map(|o| o.downtime_ms).collect()));
    }
    let (pre, stop) = (results[0], results[1]);
    let ratio = pre / stop;
    println!("vfio_downtime: 64 MiB device state, median of {RUNS}: pre-copy {pre:.1} ms, stop-copy-only {stop:.1} ms, ratio {:.1}% (goal <= 20%: {})",
        ratio * 100.0,
        if ratio <= 0.2 { "met" } else { "NOT met" });
}
