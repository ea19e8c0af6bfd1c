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

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use dmhost::control_client::ControlClient;
use serde_json::json;

const RUNS: usize = 3;

fn target_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dmhost")).parent().unwrap().to_path_buf()
}

fn dmhost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmhost"));
    c.arg("--plugin-dir").arg(target_dir());
    c.env("RUST_LOG", "warn,dmhost::migration::source=info,vfio_pci=debug");
    c
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines of `r`, forwarded on a channel (drained to the end).
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    rx
}

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let l = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("no {needle:?}"));
        if let Some(pos) = l.find(needle) {
            return l[pos + needle.len()..].to_owned();
        }
    }
}

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
    let mut dst = dmhost()
        .arg("run")
        .arg(&cfg)
        .args(["--incoming", "tcp:127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let dst_err = lines(dst.stderr.take().unwrap());
    let uri = wait_for(&dst_err, "waiting for an incoming migration on ");
    let _dst = Killed(dst);
    let sock = dir.join(format!("src-{precopy}-{n}.sock"));
    let mut src = dmhost()
        .arg("run")
        .arg(&cfg)
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let src_out = lines(src.stdout.take().unwrap());
    let src_err = lines(src.stderr.take().unwrap());
    wait_for(&src_out, "vfio-verify: round 0x0000000000000040");
    let _src = Killed(src);
    let mut c = ControlClient::connect(&sock).unwrap();
    c.execute("migrate", json!({ "uri": uri })).unwrap();
    let q = loop {
        let q = c.execute("query-migrate", json!({})).unwrap();
        match q["status"].as_str() {
            Some("completed") => break q,
            Some("failed") | Some("cancelled") => panic!("migration failed: {q}"),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let stop_copy: u64 =
        wait_for(&src_err, "stop-copy sent ").split_whitespace().next().unwrap().parse().unwrap();
    let done = wait_for(&src_err, "migration: completed, ");
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
