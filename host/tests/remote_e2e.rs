//! Memory devices in their own process (`isolation = "process"`) on real
//! KVM: their RAM registered from the device process migrates between two
//! `dmhost` processes (every page checked by `migrate-verify`, the NVDIMM
//! label area by digest), their log records reach the host's log, a killed
//! one is fenced and its RAM block unregistered, and the NVDIMM `_DSM`
//! label protocol works through the proxy.

mod common;

use std::{
    path::{Path, PathBuf},
    process::Output,
    sync::Arc,
    time::{Duration, Instant},
};

use common::process::{assert_verified, dmhost, label_area_digest, nvdimm_label_image, VmProcess};
use dmhost::{
    config::Isolation, control_client::ControlClient, devices::DeviceImpl, loader::PluginRegistry,
    migration::machine::block_bytes, remote, testing::kvm_or_skip, vm::vcpu::VmExit,
};
use serde_json::json;

fn config(dir: &Path, name: &str, rounds: u64, nvdimm: &str) -> PathBuf {
    common::plugin_path("pc_dimm");
    common::plugin_path("nvdimm");
    let cfg = format!(
        "ram = \"64M\"\nprogram = \"builtin:migrate-verify\"\n[regs]\nr12 = {rounds}\nr13 = 20000000\nr14 = 16\n\
         [[device]]\nkind = \"pc-dimm\"\nid = \"dimm0\"\nisolation = \"process\"\nconfig = {{ size = \"16M\" }}\n\
         [[device]]\nkind = \"nvdimm\"\nid = \"nv0\"\nisolation = \"process\"\nconfig = {nvdimm}\n"
    );
    let p = dir.join(name);
    std::fs::write(&p, cfg).unwrap();
    p
}

#[test]
fn isolated_pc_dimm_and_nvdimm_migrate_every_page_and_the_label_area() {
    if !kvm_or_skip("isolated_pc_dimm_and_nvdimm_migrate_every_page_and_the_label_area") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rounds = 400;
    // The source's NVDIMM is a shared file with a pattern in its label area
    // (the guest cannot see it); the destination's is a fresh memfd.
    let (file, want) = nvdimm_label_image(dir.path());
    let src_cfg = config(
        dir.path(),
        "src.toml",
        rounds,
        &format!("{{ size = \"4M\", mem-path = \"{}\", share = true }}", file.display()),
    );
    let dst_cfg = config(dir.path(), "dst.toml", rounds, "{ size = \"4M\" }");
    let dsock = dir.path().join("dst.sock");
    let (dst, uri) =
        VmProcess::destination(&dst_cfg, "tcp:127.0.0.1:0", &["--control", dsock.to_str().unwrap()]);
    let (src, sock) = VmProcess::source(dir.path(), &src_cfg);
    let out = dmhost()
        .args(["migrate", "--control", sock.to_str().unwrap(), "--to", &uri, "--keep-source"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(label_area_digest(&sock), want, "source label area");
    assert_eq!(label_area_digest(&dsock), want, "destination label area");
    // Both devices run in their own process on both sides.
    let devices = ControlClient::connect(&dsock).unwrap().execute("query-devices", json!({})).unwrap();
    assert_eq!(devices.as_array().map(Vec::len), Some(2), "{devices}");
    ControlClient::connect(&sock).unwrap().execute("quit", json!({})).unwrap();
    let (code, _, src_err) = src.finish(Duration::from_secs(20));
    assert_eq!(code, 0);
    // The plugins' `log::info!` in the device processes reached the host's
    // logger, tagged with the device id.
    for want in ["device dimm0: pc-dimm dimm0 plugged", "device nv0: nvdimm nv0"] {
        assert!(src_err.iter().any(|l| l.contains(want)), "no {want:?} in the host log: {src_err:?}");
    }
    let (code, out, err) = dst.finish(Duration::from_secs(60));
    assert_verified(code, &out, &err, rounds);
    assert!(err.iter().any(|l| l.contains("device dimm0: pc-dimm dimm0 plugged")), "{err:?}");
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_isolated_pc_dimm_is_fenced_and_its_ram_block_unregistered() {
    if !kvm_or_skip("killed_isolated_pc_dimm_is_fenced_and_its_ram_block_unregistered") {
        return;
    }
    std::env::set_var(remote::RUNNER_ENV, env!("CARGO_BIN_EXE_dmhost"));
    let mut reg = PluginRegistry::default();
    reg.load(&common::plugin_path("pc_dimm")).unwrap();
    let reg = Arc::new(reg);
    let (vm, _serial) = common::vm_with_serial(16 << 20);
    let info =
        remote::add_device(&vm, &*reg, "pc-dimm", "dimm0", r#"{"size":"2M"}"#, Isolation::Process).unwrap();
    let (gpa, size) = info.region.expect("the DIMM is mapped");
    let block =
        vm.ram_blocks().into_iter().find(|b| b.name == "dimm0/ram").expect("RAM registered from its process");
    assert_eq!(block.size, size);
    // The block is the guest's memory: the same host mapping as its slot
    // (so KVM's dirty log of the slot lands in the block) and the same bytes.
    let slot = vm.mappings().into_iter().find(|m| m.gpa == gpa).expect("the DIMM's slot");
    assert_eq!(slot.host_addr, block.host_addr);
    vm.write_guest(gpa + 0x1234, b"same memory").unwrap();
    // SAFETY: the block stays registered (its mapping alive) while read here.
    let bytes = unsafe { block_bytes(&block) };
    assert_eq!(&bytes[0x1234..0x1234 + 11], b"same memory");

    let pid = match &*vm.device("dimm0").unwrap().lock() {
        DeviceImpl::Remote(d) => d.pid(),
        _ => unreachable!("dimm0 runs in its own process"),
    };
    // SAFETY: sending SIGKILL to the device process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    wait_until("its RAM block is unregistered", Duration::from_secs(10), || {
        !vm.ram_blocks().iter().any(|b| b.name == "dimm0/ram")
    });
    let d = vm.device_info("dimm0").unwrap();
    assert!(d.failed && d.fenced, "{d:?}");
    // The guest mapping stays (the memfd lives on in the host) until removal.
    let mut buf = [0u8; 11];
    vm.read_guest(gpa + 0x1234, &mut buf).unwrap();
    assert_eq!(&buf, b"same memory");
    vm.remove_device("dimm0").unwrap();
    assert!(vm.devices().is_empty());
    assert!(!vm.mappings().iter().any(|m| m.gpa == gpa), "its slot is gone");
    vm.stop(VmExit::Requested);
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn nvdimm_example_with_isolated_nvdimms_serves_dsm_through_the_proxy() {
    if !kvm_or_skip("nvdimm_example_with_isolated_nvdimms_serves_dsm_through_the_proxy") {
        return;
    }
    common::plugin_path("nvdimm");
    common::plugin_path("pc_dimm");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/nvdimm.toml");
    let cfg = std::fs::read_to_string(example)
        .unwrap()
        .replace("kind = \"nvdimm\"\n", "kind = \"nvdimm\"\nisolation = \"process\"\n");
    assert_eq!(cfg.matches("isolation = \"process\"").count(), 2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nvdimm-isolated.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = dmhost().args(["run", "--timeout", "60"]).arg(&path).env("RUST_LOG", "info").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in [
        "nvdimm-acpi: DIMM 0 at 0x0000000100000000 size 0x0000000000400000 handle 0x0000000000000001",
        "nvdimm-acpi: pmem write/read ok",
        "nvdimm-acpi: label size 0x0000000000020000 max xfer 0x0000000000000fec",
        "nvdimm-acpi: label write/read ok",
        "nvdimm-acpi: out-of-bounds requests refused with status 3",
        "nvdimm-acpi: ok",
    ] {
        assert!(stdout.lines().any(|l| l == want), "no {want:?}: {}", text(&out));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("device process"), "the NVDIMMs ran in their own processes: {stderr}");
}
