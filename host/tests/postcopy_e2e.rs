//! Post-copy migration between two real `dmhost` processes, with real
//! userfaultfd and sockets: a `builtin:migrate-verify` guest that dirties
//! every page of its memory each round (stride 1, tiny delay) cannot
//! converge in pre-copy over a limited link; after the switch to post-copy
//! it runs on the destination while its pages arrive, and verifies all of
//! them. The recovery test cuts the connections in the middle of
//! post-copy and resumes on new ones.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::process::{self, dmhost, wait_status, VmProcess};

use dmhost::{control_client::ControlClient, testing::kvm_or_skip};
use serde_json::json;

/// 64 MiB RAM and a 16 MiB pc-dimm, every page written each round.
fn write_config(dir: &Path, rounds: u64) -> PathBuf {
    common::plugin_path("pc_dimm");
    let cfg = format!(
        "ram = \"64M\"\nprogram = \"builtin:migrate-verify\"\n[regs]\nr12 = {rounds}\nr13 = 1000\nr14 = 1\n\
         [[device]]\nkind = \"pc-dimm\"\nid = \"dimm0\"\nconfig = {{ size = \"16M\" }}\n"
    );
    let p = dir.join("vm.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn assert_verified(code: i32, out: &[String], err: &[String], rounds: u64) {
    process::assert_verified(code, out, err, rounds);
    assert!(
        !out.iter().any(|l| l.contains("migrate-verify: start")),
        "the destination continued the source's run: {out:?}"
    );
}

/// A destination (with a control socket too) and a source running the
/// `rounds`-round migrate-verify guest.
struct Pair {
    dst: VmProcess,
    uri: String,
    dst_sock: PathBuf,
    src: VmProcess,
    sock: PathBuf,
}

impl Pair {
    fn start(dir: &Path, rounds: u64) -> Self {
        let cfg = write_config(dir, rounds);
        let dst_sock = dir.join("dst.sock");
        let (dst, uri) =
            VmProcess::destination(&cfg, "tcp:127.0.0.1:0", &["--control", dst_sock.to_str().unwrap()]);
        let (src, sock) = VmProcess::source(dir, &cfg);
        Self { dst, uri, dst_sock, src, sock }
    }
}

#[test]
fn postcopy_migrates_a_guest_that_outruns_the_link() {
    if !kvm_or_skip("postcopy_migrates_a_guest_that_outruns_the_link") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 40000;
    let Pair { dst, uri, dst_sock, src, sock } = Pair::start(dir.path(), rounds);
    // 40 MB/s: one round dirties 80 MiB, so pre-copy never converges.
    let out = dmhost()
        .args(["migrate", "--control", sock.to_str().unwrap(), "--to", &uri])
        .args(["--max-bandwidth", "40000000", "--postcopy-after", "1r", "--keep-source"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("migration completed"), "{stdout}");
    assert!(stdout.contains("post-copy:"), "{stdout}");
    // The source never runs the guest again, and says how it went.
    let mut c = ControlClient::connect(&sock).unwrap();
    let q = c.execute("query-migrate", json!({})).unwrap();
    assert_eq!(q["status"], "completed", "{q}");
    assert!(q["postcopy"]["postcopy-requests"].as_u64().unwrap() > 0, "{q}");
    assert_eq!(q["postcopy"]["pages-remaining"], 0, "{q}");
    let devs = q["postcopy-devices"].as_array().unwrap();
    assert!(
        devs.iter().any(|d| d["id"] == "dimm0" && d["postcopy"].as_str().unwrap().starts_with("no")),
        "{q}"
    );
    let st = c.execute("query-status", json!({})).unwrap();
    assert_ne!(st["status"], "running", "{st}");
    c.execute("quit", json!({})).unwrap();
    drop(c);
    // The destination's own figures.
    let mut d = ControlClient::connect(&dst_sock).unwrap();
    let q = wait_status(&mut d, &["completed"], Duration::from_secs(60));
    let pc = &q["postcopy"];
    assert!(pc["faults"].as_u64().unwrap() > 0, "{q}");
    assert!(
        pc["fault-latency-p50-us"].as_u64().is_some() && pc["fault-latency-p99-us"].as_u64().is_some(),
        "{q}"
    );
    assert_eq!(pc["pages-remaining"], 0, "{q}");
    drop(d);
    let (code, src_out, _) = src.finish(Duration::from_secs(20));
    assert_eq!(code, 0);
    assert!(!src_out.iter().any(|l| l.contains("rounds verified")), "{src_out:?}");
    let (code, out, err) = dst.finish(Duration::from_secs(120));
    assert_verified(code, &out, &err, rounds);
    assert!(
        err.iter().any(|l| l.contains("post-copy completed") && l.contains("p99")),
        "latency logged: {err:?}"
    );
}

#[test]
fn postcopy_recovers_after_the_connection_breaks() {
    if !kvm_or_skip("postcopy_recovers_after_the_connection_breaks") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 40000;
    let Pair { dst, uri, dst_sock, src, sock } = Pair::start(dir.path(), rounds);
    let mut c = ControlClient::connect(&sock).unwrap();
    // A slow background stream keeps post-copy going long enough to cut it.
    c.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 40_000_000, "max-postcopy-bandwidth": 8_000_000}),
    )
    .unwrap();
    c.execute("migrate", json!({"uri": uri})).unwrap();
    wait_status(&mut c, &["active"], Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    c.execute("migrate-start-postcopy", json!({})).unwrap();
    wait_status(&mut c, &["postcopy-active"], Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(300));
    let n = c.execute("x-postcopy-break", json!({})).unwrap();
    assert!(n["connections"].as_u64().unwrap() >= 2, "{n}");
    // Both sides pause; the source does not resume its guest.
    let q = wait_status(&mut c, &["postcopy-paused"], Duration::from_secs(10));
    assert!(q["postcopy"]["pages-remaining"].as_u64().unwrap() > 0, "cut before the end: {q}");
    let mut d = ControlClient::connect(&dst_sock).unwrap();
    wait_status(&mut d, &["postcopy-paused"], Duration::from_secs(10));
    assert_ne!(c.execute("query-status", json!({})).unwrap()["status"], "running");
    // Recover on a new port and resume the source there.
    let r = d.execute("migrate-recover", json!({"uri": "tcp:127.0.0.1:0"})).unwrap();
    let new_uri = r["uri"].as_str().unwrap().to_owned();
    c.execute("migrate-set-parameters", json!({"max-postcopy-bandwidth": 0})).unwrap();
    let out = dmhost()
        .args(["migrate", "--control", sock.to_str().unwrap(), "--to", &new_uri, "--resume"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "resume: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("migration completed"), "{stdout}");
    let q = wait_status(&mut d, &["completed"], Duration::from_secs(60));
    assert_eq!(q["postcopy"]["pages-remaining"], 0, "{q}");
    drop((c, d));
    let (code, _, _) = src.finish(Duration::from_secs(20));
    assert_eq!(code, 0);
    let (code, out, err) = dst.finish(Duration::from_secs(120));
    assert_verified(code, &out, &err, rounds);
    assert!(err.iter().any(|l| l.contains("post-copy recovered")), "{err:?}");
}
