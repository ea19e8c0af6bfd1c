//! Live migration between two real `dmhost` processes: the guest
//! (`builtin:migrate-verify`) keeps dirtying and checking its RAM, the
//! pc-dimm and the NVDIMM region; it must finish its rounds on the
//! destination with every page verified.

mod common;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use common::process::{
    assert_verified, dmhost, label_area_digest, nvdimm_label_image, wait_status, VmProcess,
};

use dmhost::{control_client::ControlClient, testing::kvm_or_skip};
use serde_json::json;

/// A small migrate-verify VM: 64 MiB RAM, a 16 MiB pc-dimm, a 4 MiB NVDIMM.
fn write_config(dir: &Path, rounds: u64, with_nvdimm: bool) -> PathBuf {
    let name = if with_nvdimm { "vm.toml" } else { "vm-no-nvdimm.toml" };
    write_config_with(dir, name, rounds, with_nvdimm.then_some("{ size = \"4M\" }"))
}

fn write_config_with(dir: &Path, name: &str, rounds: u64, nvdimm: Option<&str>) -> PathBuf {
    common::plugin_path("pc_dimm");
    common::plugin_path("nvdimm");
    let mut cfg = format!(
        "ram = \"64M\"\nprogram = \"builtin:migrate-verify\"\n[regs]\nr12 = {rounds}\nr13 = 20000000\nr14 = 16\n\
         [[device]]\nkind = \"pc-dimm\"\nid = \"dimm0\"\nconfig = {{ size = \"16M\" }}\n"
    );
    if let Some(nv) = nvdimm {
        cfg.push_str(&format!("[[device]]\nkind = \"nvdimm\"\nid = \"nv0\"\nconfig = {nv}\n"));
    }
    let p = dir.join(name);
    std::fs::write(&p, cfg).unwrap();
    p
}

fn migrate(sock: &Path, to: &str, extra: &[&str]) -> std::process::Output {
    dmhost().args(["migrate", "--control", sock.to_str().unwrap(), "--to", to]).args(extra).output().unwrap()
}

#[test]
fn live_migration_over_tcp_keeps_every_page() {
    if !kvm_or_skip("live_migration_over_tcp_keeps_every_page") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 500;
    let cfg = write_config(dir.path(), rounds, true);
    let (dst, uri) = VmProcess::destination(&cfg, "tcp:127.0.0.1:0", &[]);
    let (src, sock) = VmProcess::source(dir.path(), &cfg);
    let out = migrate(&sock, &uri, &["--max-downtime", "50"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("migration completed"), "{stdout}");

    let (code, src_out, _) = src.finish(Duration::from_secs(20));
    assert_eq!(code, 0, "source quits after the migration");
    assert!(
        !src_out.iter().any(|l| l.contains("rounds verified")),
        "the source must not finish: {src_out:?}"
    );
    let (code, out, err) = dst.finish(Duration::from_secs(60));
    assert_verified(code, &out, &err, rounds);
    // The destination continued where the source stopped, not from round 1.
    assert!(!out.iter().any(|l| l.contains("migrate-verify: start")), "{out:?}");
    // Over 64 MiB of pages: the destination loaded them with the KVM slots
    // detached, and the guest ran on with them attached again.
    assert!(err.iter().any(|l| l.contains("with the KVM memory slots detached")), "{err:?}");
}

#[test]
fn snapshot_to_file_and_restore_in_a_new_process() {
    if !kvm_or_skip("snapshot_to_file_and_restore_in_a_new_process") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Enough rounds (~7 s) that the source cannot finish before the
    // snapshot, even on a loaded machine.
    let rounds = 1000;
    let cfg = write_config(dir.path(), rounds, true);
    let snap = dir.path().join("vm.snap");
    let (src, sock) = VmProcess::source(dir.path(), &cfg);
    let out = migrate(&sock, &format!("file:{}", snap.display()), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(src.finish(Duration::from_secs(20)).0, 0);
    assert!(std::fs::metadata(&snap).unwrap().len() > 16 << 20, "the snapshot holds the touched memory");

    let (dst, _) = VmProcess::destination(&cfg, &format!("file:{}", snap.display()), &[]);
    let (code, out, err) = dst.finish(Duration::from_secs(60));
    assert_verified(code, &out, &err, rounds);
}

#[test]
fn killing_the_destination_mid_stream_leaves_the_source_running() {
    if !kvm_or_skip("killing_the_destination_mid_stream_leaves_the_source_running") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 1500;
    let cfg = write_config(dir.path(), rounds, true);
    let (mut dst, uri) = VmProcess::destination(&cfg, "tcp:127.0.0.1:0", &[]);
    let (src, sock) = VmProcess::source(dir.path(), &cfg);
    // Slow the stream so the kill lands in the middle of it.
    let mut c = ControlClient::connect(&sock).unwrap();
    c.execute("migrate-set-parameters", json!({"max-bandwidth": 20_000_000})).unwrap();
    c.execute("migrate", json!({"uri": uri})).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let q = c.execute("query-migrate", json!({})).unwrap();
    assert_eq!(q["status"], "active", "{q}");
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let q = wait_status(&mut c, &["failed", "completed", "cancelled"], Duration::from_secs(20));
    assert_eq!(q["status"], "failed", "{q}");
    assert!(q["error-desc"].as_str().unwrap().contains("stream"), "{q}");
    let status = c.execute("query-status", json!({})).unwrap();
    assert_eq!(status["status"], "running", "the source guest runs on: {status}");
    drop(c);

    // A second attempt, to a fresh destination, succeeds.
    let (dst2, uri2) = VmProcess::destination(&cfg, "tcp:127.0.0.1:0", &[]);
    let out = migrate(&sock, &uri2, &["--max-bandwidth", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(src.finish(Duration::from_secs(20)).0, 0);
    let (code, out, err) = dst2.finish(Duration::from_secs(90));
    assert_verified(code, &out, &err, rounds);
}

#[test]
fn incompatible_destination_refuses_and_the_source_runs_on() {
    if !kvm_or_skip("incompatible_destination_refuses_and_the_source_runs_on") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 300;
    let cfg = write_config(dir.path(), rounds, true);
    let other = write_config(dir.path(), rounds, false);
    let (dst, uri) = VmProcess::destination(&other, "tcp:127.0.0.1:0", &[]);
    let (src, sock) = VmProcess::source(dir.path(), &cfg);
    let out = migrate(&sock, &uri, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nv0"), "the refusal names the missing device: {stderr}");
    let (code, _, err) = dst.finish(Duration::from_secs(20));
    assert_ne!(code, 0);
    assert!(err.iter().any(|l| l.contains("incompatible configuration")), "{err:?}");
    // The source guest finishes its own rounds.
    let (code, out, err) = src.finish(Duration::from_secs(60));
    assert_verified(code, &out, &err, rounds);
}

#[test]
fn nvdimm_label_area_migrates_though_the_guest_cannot_see_it() {
    if !kvm_or_skip("nvdimm_label_area_migrates_though_the_guest_cannot_see_it") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 400;
    // The source's NVDIMM is a shared file whose label area (its last
    // 128 KiB) holds a pattern; the destination's is a fresh memfd, so only
    // the migration can bring the labels over.
    let (file, want) = nvdimm_label_image(dir.path());
    let src_cfg = write_config_with(
        dir.path(),
        "src.toml",
        rounds,
        Some(&format!("{{ size = \"4M\", mem-path = \"{}\", share = true }}", file.display())),
    );
    let dst_cfg = write_config_with(dir.path(), "dst.toml", rounds, Some("{ size = \"4M\" }"));
    let dsock = dir.path().join("dst.sock");
    let (dst, uri) =
        VmProcess::destination(&dst_cfg, "tcp:127.0.0.1:0", &["--control", dsock.to_str().unwrap()]);
    let (src, sock) = VmProcess::source(dir.path(), &src_cfg);
    let out = migrate(&sock, &uri, &["--keep-source"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(label_area_digest(&sock), want, "source label area");
    assert_eq!(label_area_digest(&dsock), want, "destination label area");
    ControlClient::connect(&sock).unwrap().execute("quit", json!({})).unwrap();
    assert_eq!(src.finish(Duration::from_secs(20)).0, 0);
    let (code, out, err) = dst.finish(Duration::from_secs(60));
    assert_verified(code, &out, &err, rounds);
}

/// A destination of format 1.1 skips sync sections and never answers them:
/// the source waits its 3 s once, warns, goes on without syncs, and the
/// migration completes. The destination here is a plain reader of the
/// stream that acknowledges at the end, as a 1.1 dmhost does.
#[test]
fn a_destination_that_never_answers_syncs_still_gets_the_migration() {
    use std::io::Write;
    if !kvm_or_skip("a_destination_that_never_answers_syncs_still_gets_the_migration") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), 1000, false);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let uri = format!("tcp:{}", listener.local_addr().unwrap());
    let old_destination = std::thread::spawn(move || {
        let (sock, _) = listener.accept().unwrap();
        let mut ack = sock.try_clone().unwrap();
        let mut r = dmhost::migration::StreamReader::new(sock).unwrap();
        let mut syncs = 0;
        loop {
            match r.next_section().unwrap() {
                dmhost::migration::Section::Ram(b) => r.read_ram_with(&b, |_, _| Ok(())).unwrap(),
                dmhost::migration::Section::Sync { .. } => syncs += 1,
                dmhost::migration::Section::End { .. } => break,
                _ => {}
            }
        }
        ack.write_all(b"loaded\n").unwrap();
        syncs
    });
    let (src, sock) = VmProcess::source(dir.path(), &cfg);
    let out = migrate(&sock, &uri, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(old_destination.join().unwrap(), 1, "one sync, then none after it went unanswered");
    let warned = src.wait_line(true, "did not answer the sync section", Duration::from_secs(5));
    assert!(warned.contains("going on without syncs"), "{warned}");
}
