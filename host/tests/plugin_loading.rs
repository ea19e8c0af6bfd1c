//! The loader against real shared libraries: the shipped plugins, a plugin
//! built outside the workspace, and every negative fixture. All of them load
//! into this one process, which must survive every failure.

mod fixtures;

use std::{path::PathBuf, process::Command};

use abi_suite::suite_host::SuiteHost;
use dmhost::loader::{load_library, LoadError, PluginRegistry};
use dmhost_plugin_api::{ErrorKind, RSlice, RSliceMut};
use fixtures::{build_not_a_plugin, build_scratch_plugin, doctored_plugin_api, target_debug, workspace_root};

/// The plugin API version this host was built with.
fn api_version() -> String {
    <dmhost_plugin_api::PluginModule_Ref as abi_stable::library::RootModule>::VERSION_STRINGS
        .version
        .to_string()
}

/// Plugins this workspace ships (library stems).
const SHIPPED: &[&str] = &["pc_dimm", "nvdimm", "iohub", "testdev", "vfio_pci", "vfio_vendor_sample"];

fn shipped(stem: &str) -> PathBuf {
    let p = target_debug().join(format!("lib{stem}.so"));
    assert!(p.exists(), "{} missing: run `cargo build --workspace` first", p.display());
    p
}

fn dmhost(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dmhost")).args(args).output().expect("run dmhost")
}

#[test]
fn shipped_plugins_pass_the_conformance_suite() {
    for stem in SHIPPED {
        let lib = shipped(stem);
        let out = dmhost(&["plugins", "check", lib.to_str().unwrap()]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stem} failed conformance:\n{stdout}");
        assert!(stdout.contains(" 0 failed"), "{stdout}");
        // Every device kind gets the migration round trip (a library that
        // only provides VFIO drivers has no device kinds).
        let kinds = stdout.matches("/create-default").count();
        assert_eq!(stdout.matches("/migration-round-trip").count(), kinds, "{stdout}");
    }
}

#[test]
fn plugins_list_shows_the_shipped_plugins() {
    let out = dmhost(&["plugins", "list", "-v"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for (name, kind) in [("pc-dimm", "kinds=pc-dimm"), ("nvdimm", "kinds=nvdimm")] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("{name} not listed:\n{stdout}"));
        assert!(line.contains(kind), "{line}");
    }
    assert!(stdout.contains("plugins loaded in"), "{stdout}");
}

#[test]
fn plugin_built_outside_the_workspace_passes_check() {
    let api = workspace_root().join("plugin-api");
    let so = build_scratch_plugin("outside_plugin", &api);
    let out = dmhost(&["plugins", "check", so.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("outside-plugin/migration-round-trip"), "{stdout}");
    let dir = so.parent().unwrap().to_str().unwrap();
    let out = dmhost(&["plugins", "list", "--plugin-dir", dir]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("kinds=outside-plugin"));
}

#[test]
fn plugin_built_against_another_abi_layout_is_refused() {
    // One more field in a struct that crosses the boundary.
    // Same version as the real plugin-api: only the layout differs.
    let api = doctored_plugin_api("api_layout_changed", &api_version(), |src| {
        let p = src.join("types.rs");
        let s = std::fs::read_to_string(&p).unwrap();
        let s = s.replace(
            "pub region_gpa: ROption<u64>,",
            "pub region_gpa: ROption<u64>,\n    pub numa_hint: u32,",
        );
        assert!(s.contains("numa_hint"), "plugin-api changed: update this fixture");
        std::fs::write(p, s).unwrap();
    });
    let so = build_scratch_plugin("layout_mismatch", &api);
    let err = load_library(&so).unwrap_err();
    assert!(matches!(err, LoadError::AbiMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("liblayout_mismatch.so") && msg.contains("ABI layout mismatch"), "{msg}");
    assert!(msg.contains("PlugInfo"), "summary must name the type: {msg}");
    assert!(!msg.contains('\n'), "error must be one line: {msg}");
}

#[test]
fn plugin_built_against_another_major_version_is_refused() {
    let api = doctored_plugin_api("api_v2", "2.0.0", |_| {});
    let so = build_scratch_plugin("api_v2_plugin", &api);
    let err = load_library(&so).unwrap_err();
    assert!(matches!(err, LoadError::IncompatibleVersion { .. }), "{err}");
    assert!(err.to_string().contains("2.0.0"), "{err}");
}

#[test]
fn panicking_device_is_fenced_and_the_host_survives() {
    let api = workspace_root().join("plugin-api");
    let so = build_scratch_plugin("panicky", &api);
    let plugin = load_library(&so).unwrap();
    let host = SuiteHost::new();

    let Err(err) = plugin.create("panicky", "p0", r#"{"mode":"panic-on-create"}"#, host.host()) else {
        panic!("create that panics succeeded");
    };
    assert!(err.to_string().contains("panicked"), "{err}");

    let mut dev = plugin.create("panicky", "p1", r#"{"mode":"panic-on-write"}"#, host.host()).unwrap();
    let err = dev.mmio_write(0x1000, RSlice::from(&[1u8, 2, 3, 4][..])).into_result().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Panicked, "{err}");
    assert!(dev.is_fenced());
    let mut buf = [0u8; 4];
    let err = dev.mmio_read(0x1000, RSliceMut::from(&mut buf[..])).into_result().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Fenced);
    assert_eq!(buf, [0xff; 4], "a fenced device reads as all ones");

    // Another device of the same plugin is unaffected.
    let mut ok = plugin.create("panicky", "p2", r#"{"mode":"normal"}"#, host.host()).unwrap();
    ok.mmio_write(0, RSlice::from(&7u64.to_le_bytes()[..])).into_result().unwrap();
    let mut buf = [0u8; 8];
    ok.mmio_read(0, RSliceMut::from(&mut buf[..])).into_result().unwrap();
    assert_eq!(u64::from_le_bytes(buf), 7);
}

#[test]
fn shared_library_that_is_not_a_plugin_is_refused() {
    let so = build_not_a_plugin();
    let err = load_library(&so).unwrap_err();
    assert!(matches!(err, LoadError::NotAPlugin { .. }), "{err}");
    assert!(err.to_string().contains("libnot_a_plugin.so"));
}

#[test]
fn truncated_library_is_refused_before_dlopen() {
    let data = std::fs::read(shipped("pc_dimm")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for cut in [10, 64, 4096, data.len() / 2, data.len() - 100] {
        let p = dir.path().join(format!("libcut{cut}.so"));
        std::fs::write(&p, &data[..cut]).unwrap();
        let err = load_library(&p).unwrap_err();
        assert!(matches!(err, LoadError::NotALibrary { .. }), "cut {cut}: {err}");
        assert!(err.to_string().contains("truncated"), "cut {cut}: {err}");
    }
    let out = dmhost(&["plugins", "check", dir.path().join("libcut4096.so").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
}

#[test]
fn duplicate_device_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(shipped("pc_dimm"), dir.path().join("libpc_dimm_again.so")).unwrap();
    let (reg, errors) = PluginRegistry::discover(&[target_debug(), dir.path().to_path_buf()]);
    assert!(reg.plugin_for("pc-dimm").is_some());
    let dup = errors
        .iter()
        .find(|e| matches!(e, LoadError::DuplicateKind { .. }))
        .unwrap_or_else(|| panic!("no duplicate-kind error in {errors:?}"));
    let msg = dup.to_string();
    assert!(msg.contains("libpc_dimm_again.so") && msg.contains("\"pc-dimm\""), "{msg}");
}

#[test]
fn missing_file_is_reported_unreadable() {
    let err = load_library(&PathBuf::from("/nonexistent/libnothing.so")).unwrap_err();
    assert!(matches!(err, LoadError::Unreadable { .. }), "{err}");
}
