//! The host's ACPI, end to end: `dmhost acpi dump` of `examples/nvdimm.toml`
//! checked by ACPICA (`iasl -d` + recompile, `acpiexec` running the
//! NVDIMM `_DSM`s of the tables the host built), the `nvdimm-acpi` guest on
//! real KVM with the real nvdimm and pc-dimm `.so` plugins, label
//! persistence across two host processes, and memory hotplug seen through
//! the ACPI registers after `device_add`/`device_del` on the control socket,
//! announced by the Generic Event Device.

mod common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{mpsc, Arc, OnceLock},
    time::{Duration, Instant},
};

use dmhost::{
    acpi_host::{
        ged::{EVT_MEMORY, EVT_NVDIMM, GED_GSI, GED_PORT},
        AcpiConfig, AcpiHost,
    },
    control_client::ControlClient,
    guest::{acpi_programs, asm::*, RegPreset, DSM_PAGE_GPA},
    loader::PluginRegistry,
    testing::kvm_or_skip,
    vm::vcpu::VmExit,
};
use serde_json::json;

fn dmhost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmhost"));
    c.arg("--plugin-dir").arg(common::target_dir());
    c
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ensure_acpica() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let out = Command::new("sh")
            .arg(workspace().join("scripts/ensure-acpica.sh"))
            .output()
            .map_err(|e| format!("cannot run ensure-acpica.sh: {e}"))?;
        out.status.success().then_some(()).ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
    });
    if let Err(e) = r {
        panic!("acpica-tools (iasl, acpiexec) missing and not installable: {e}");
    }
}

fn run_in(dir: &Path, cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

/// `dmhost acpi dump examples/nvdimm.toml DIR`.
fn dump_example() -> tempfile::TempDir {
    common::plugin_path("nvdimm");
    common::plugin_path("pc_dimm");
    let dir = tempfile::tempdir().unwrap();
    let out = dmhost()
        .args(["acpi", "dump"])
        .arg(workspace().join("examples/nvdimm.toml"))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    dir
}

#[test]
fn acpi_dump_of_the_example_disassembles_and_recompiles() {
    ensure_acpica();
    let dir = dump_example();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["APIC.dat", "DSDT.dat", "FACP.dat", "NFIT.dat", "RSDP.dat", "SSDT1.dat", "SSDT2.dat", "XSDT.dat"]
    );
    // The RSDP (not an SDT: iasl cannot read it): signature, both checksums, XSDT pointer.
    let rsdp = std::fs::read(dir.path().join("RSDP.dat")).unwrap();
    let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
    assert_eq!((&rsdp[..8], sum(&rsdp[..20]), sum(&rsdp)), (&b"RSD PTR "[..], 0, 0));
    assert_eq!(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()), 0xe0040);
    for name in ["XSDT", "FACP", "DSDT", "APIC", "SSDT1", "SSDT2", "NFIT"] {
        let dat = format!("{name}.dat");
        let mut args = vec![];
        if name.starts_with("SSDT") {
            args.extend(["-e", "DSDT.dat"]);
        }
        args.extend(["-d", dat.as_str()]);
        let (ok, out) = run_in(dir.path(), "iasl", &args);
        assert!(ok && !out.contains("Error"), "iasl -d {dat}:\n{out}");
        let (ok, out) = run_in(dir.path(), "iasl", &["-p", &format!("re-{name}"), &format!("{name}.dsl")]);
        assert!(ok && out.contains("0 Errors, 0 Warnings"), "iasl {name}.dsl:\n{out}");
    }
    let dsdt = std::fs::read_to_string(dir.path().join("DSDT.dsl")).unwrap();
    for want in [
        "OperationRegion (NRAM, SystemMemory, 0xB000, 0x1000)",
        "OperationRegion (NPIO, SystemIO, 0x0A18, 0x04)",
        "OperationRegion (HPMR, SystemIO, 0x0A00, 0x18)",
        "Device (MHPC)",
        "Device (M000)",
        "Device (M007)",
        "Name (_HID, EisaId (\"PNP0C80\")",
        "Method (_EJ0, 1, NotSerialized)",
    ] {
        assert!(dsdt.contains(want), "DSDT lacks {want:?}:\n{dsdt}");
    }
    assert!(!dsdt.contains("Device (M008)"), "memory-slots = 8");
    let nfit: String = std::fs::read_to_string(dir.path().join("NFIT.dsl"))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for want in [
        "Device Handle : 00000001",
        "Device Handle : 00000002",
        "Address Range Base : 0000000100000000",
        "[Platform Capabilities]",
    ] {
        assert!(nfit.contains(want), "NFIT lacks {want:?}:\n{nfit}");
    }
    let ssdt1 = std::fs::read_to_string(dir.path().join("SSDT1.dsl")).unwrap();
    assert!(ssdt1.contains("Device (NV00)") && ssdt1.contains("Method (_LSW, 3"), "{ssdt1}");
}

/// A test SSDT over the host's DSM page: calls NV00._DSM and dumps the
/// request the AML wrote (nothing answers the doorbell under acpiexec).
fn test_ssdt() -> String {
    format!(
        r#"DefinitionBlock ("", "SSDT", 2, "DMHOST", "DSMTEST", 1)
{{
    External (\_SB.NVDR.NV00._DSM, MethodObj)
    External (\_SB.M000._STA, MethodObj)
    External (\_SB.M001._CRS, MethodObj)
    External (\_SB.GED_._EVT, MethodObj)
    External (\_SB.GED_.ESEL, FieldUnitObj)
    External (\_SB.MHPC.MINS, FieldUnitObj)
    OperationRegion (TRAM, SystemMemory, {DSM_PAGE_GPA:#x}, 0x1000)
    Field (TRAM, DWordAcc, NoLock, Preserve) {{ THDL, 32, TREV, 32, TFUN, 32, TA0, 32, TA1, 32, TA2, 32 }}
    Method (PKG, 1, Serialized) {{ Local1 = Package (1) {{0}} Local1 [0] = Arg0 Return (Local1) }}
    Method (DIMM, 2, Serialized)
    {{
        Debug = \_SB.NVDR.NV00._DSM (ToUUID ("4309AC30-0D11-11E4-9191-0800200C9A66"), 1, Arg0, PKG (Arg1))
        Debug = THDL
        Debug = TREV
        Debug = TFUN
        Debug = TA0
        Debug = TA1
        Debug = TA2
    }}
    Method (TF4, 0) {{ DIMM (4, Buffer (0) {{}}) }}
    Method (TF5, 0) {{ DIMM (5, Buffer (8) {{0x10, 0, 0, 0, 0x20, 0, 0, 0}}) }}
    Method (TF6, 0) {{ DIMM (6, Buffer (12) {{0x10, 0, 0, 0, 0x04, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef}}) }}
    Method (TMEM, 0) {{ Debug = \_SB.M000._STA () Debug = \_SB.M001._CRS () }}
    Method (TGED, 0) {{ \_SB.MHPC.MINS = 1 \_SB.GED_.ESEL = 3 \_SB.GED_._EVT (0) }}
}}
"#
    )
}

#[test]
fn acpiexec_runs_the_dsm_methods_of_the_host_built_tables() {
    ensure_acpica();
    let dir = dump_example();
    std::fs::write(dir.path().join("TEST.asl"), test_ssdt()).unwrap();
    let (ok, out) = run_in(dir.path(), "iasl", &["TEST.asl"]);
    assert!(ok && out.contains("0 Errors"), "test SSDT:\n{out}");
    let (ok, out) = run_in(
        dir.path(),
        "acpiexec",
        &[
            "-b",
            "execute \\TF4; execute \\TF5; execute \\TF6; execute \\TMEM; execute \\TGED",
            "DSDT.dat",
            "SSDT1.dat",
            "SSDT2.dat",
            "TEST.aml",
        ],
    );
    assert!(ok, "acpiexec:\n{out}");
    for bad in ["AE_", "Exception", "Error"] {
        assert!(!out.contains(bad), "acpiexec reported {bad}:\n{out}");
    }
    // Per method: the returned buffer, then handle, revision, function and
    // the first three Arg3 dwords as the AML left them in the DSM page.
    let debug: Vec<String> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ACPI Debug:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let q = |v: u64| format!("0x{v:016X}");
    let req = |f: u64, a: [u64; 3]| vec![q(1), q(1), q(f), q(a[0]), q(a[1]), q(a[2])];
    let mut want = Vec::new();
    for (f, a) in [(4, [0, 0, 0]), (5, [0x10, 0x20, 0]), (6, [0x10, 4, 0xefbe_adde])] {
        // No host answers: the page's first word (the handle, 1) is too
        // short a length, so _DSM returns status 1.
        want.push("Buffer [0x04]".to_owned());
        want.extend(req(f, a));
    }
    // acpiexec's SystemIO is plain zeroed memory: slot 0 is empty (_STA 0);
    // _CRS returns a QWordMemory template (46 bytes + end tag). Reads and
    // writes share offset 0 there, so its base reads back the selector (1).
    want.push(q(0));
    want.push("Buffer [0x30]".to_owned());
    let got: Vec<&str> = debug.iter().map(String::as_str).collect();
    assert_eq!(got, want, "{out}");
    // The GED's _EVT with both events: MSCN notifies the slots whose insert
    // bit reads set (under acpiexec, every slot: its I/O is plain memory,
    // so the bit reads back as written) and the NVDIMM root its FIT change.
    let notifies: Vec<&str> = out.lines().filter(|l| l.contains("Notify on [")).collect();
    // (acpiexec runs notify handlers on threads: any order.)
    let slots = notifies.iter().filter(|l| l.contains("[M0") && l.contains("Value 0x01 (Device Check)"));
    assert_eq!(slots.count(), 8, "{out}");
    assert!(notifies.iter().any(|l| l.contains("[NVDR]") && l.contains("Value 0x80")), "{out}");
    // The status word of the "not supported" answers.
    assert_eq!(out.matches("0000: 01 00 00 00 ").count(), 3, "{out}");
    assert!(out.contains("0000: 8A 2B 00 00 0C 03 00 00 00 00 00 00 00 00 01 00"), "{out}");
}

#[test]
fn nvdimm_acpi_guest_passes_on_kvm() {
    if !kvm_or_skip("nvdimm_acpi_guest_passes_on_kvm") {
        return;
    }
    common::plugin_path("nvdimm");
    common::plugin_path("pc_dimm");
    let out = dmhost()
        .args(["run", "--timeout", "60"])
        .arg(workspace().join("examples/nvdimm.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let want = [
        "nvdimm-acpi: RSDP at 0x00000000000e0000",
        "nvdimm-acpi: DIMM 0 at 0x0000000100000000 size 0x0000000000400000 handle 0x0000000000000001",
        "nvdimm-acpi: pmem write/read ok",
        "nvdimm-acpi: label size 0x0000000000020000 max xfer 0x0000000000000fec",
        "nvdimm-acpi: label write/read ok",
        "nvdimm-acpi: out-of-bounds requests refused with status 3",
        "nvdimm-acpi: ok",
    ];
    assert_eq!(stdout.lines().collect::<Vec<_>>(), want, "{}", text(&out));
}

fn persist_config(dir: &Path, image: &Path, mode: u64, seed: i64) -> PathBuf {
    let cfg = dir.join(format!("persist-{mode}.toml"));
    std::fs::write(
        &cfg,
        format!(
            r#"ram = "8M"
program = "builtin:nvdimm-acpi"
[regs]
r12 = {mode}
r13 = {seed}
[[device]]
kind = "nvdimm"
id = "pmem0"
config = {{ size = "4224K", mem-path = {image:?}, share = true }}
"#
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn labels_and_pmem_persist_across_two_host_processes() {
    if !kvm_or_skip("labels_and_pmem_persist_across_two_host_processes") {
        return;
    }
    common::plugin_path("nvdimm");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("pmem0.img");
    let seed = 0x0123_4567_89ab_cdefu64 as i64;
    let run = |mode: u64, seed: i64| {
        let cfg = persist_config(dir.path(), &image, mode, seed);
        dmhost().args(["run", "--timeout", "60"]).arg(&cfg).output().unwrap()
    };
    let first = run(acpi_programs::MODE_PERSIST_WRITE, seed);
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(
        String::from_utf8_lossy(&first.stdout).contains("nvdimm-acpi: label written"),
        "{}",
        text(&first)
    );
    // The label block is in the file itself, at the end (the label area).
    let file = std::fs::read(&image).unwrap();
    let at = file.len() - (128 << 10) + acpi_programs::LABEL_OFFSET as usize;
    assert_eq!(
        u64::from_le_bytes(file[at + 8..at + 16].try_into().unwrap()),
        seed as u64 ^ acpi_programs::LABEL_MULT
    );

    let second = run(acpi_programs::MODE_PERSIST_VERIFY, seed);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
    assert!(
        String::from_utf8_lossy(&second.stdout).contains("nvdimm-acpi: label verified"),
        "{}",
        text(&second)
    );
    // The check can fail: another seed does not match what is stored.
    let wrong = run(acpi_programs::MODE_PERSIST_VERIFY, seed ^ 1);
    assert_eq!(wrong.status.code(), Some(30), "{}", text(&wrong));
}

/// `dmhost run` of the `memory-hotplug` guest (config `extra` appended)
/// with a control socket; its stdout lines arrive on the receiver.
fn spawn_memory_hotplug_guest(
    dir: &std::path::Path,
    extra: &str,
) -> (std::process::Child, mpsc::Receiver<String>, std::path::PathBuf) {
    common::plugin_path("pc_dimm");
    let cfg = dir.join("mhp.toml");
    let text = format!("program = \"builtin:memory-hotplug\"\nram = \"8M\"\nmemory-slots = 4\n{extra}");
    std::fs::write(&cfg, text).unwrap();
    let sock = dir.join("ctl.sock");
    let mut child = dmhost()
        .args(["run", "--timeout", "60", "--control"])
        .arg(&sock)
        .arg(&cfg)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx, sock)
}

/// The `memory-hotplug` guest with a 4 MiB pc-dimm hot-plugged once it
/// waits, the plug announced by the GED.
struct HotplugRun {
    child: std::process::Child,
    rx: mpsc::Receiver<String>,
    client: ControlClient,
    /// Guest-physical base of the DIMM.
    gpa: u64,
}

impl HotplugRun {
    fn start(dir: &Path, extra: &str) -> Self {
        let (child, rx, sock) = spawn_memory_hotplug_guest(dir, extra);
        let first = rx.recv_timeout(Duration::from_secs(30)).expect("guest output");
        assert_eq!(first, "mhp: waiting for a DIMM");
        let mut client = ControlClient::connect(&sock).unwrap();
        let r =
            client.execute("device_add", json!({"driver": "pc-dimm", "id": "hot0", "size": "4M"})).unwrap();
        let gpa = r["region"][0].as_u64().unwrap_or_else(|| panic!("{r}"));
        let run = Self { child, rx, client, gpa };
        assert_eq!(run.next(), "mhp: GED events 0x0000000000000001");
        run
    }

    fn next(&self) -> String {
        self.rx.recv_timeout(Duration::from_secs(30)).expect("guest output")
    }

    /// The GED announces the removal, the guest sees the slot empty and
    /// exits 0; its stderr.
    fn finish_removed(mut self) -> String {
        assert_eq!(self.next(), "mhp: GED events 0x0000000000000001");
        assert_eq!(
            self.next(),
            "mhp: slot 0 status 0x0000000000000004 base 0x0000000000000000 size 0x0000000000000000"
        );
        let status = self.child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(0), "stderr: {err}");
        err
    }
}

#[test]
fn memory_hotplug_is_visible_through_the_acpi_registers() {
    if !kvm_or_skip("memory_hotplug_is_visible_through_the_acpi_registers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut run = HotplugRun::start(dir.path(), "");
    assert_eq!(
        run.next(),
        format!("mhp: slot 0 status 0x0000000000000003 base 0x{:016x} size 0x0000000000400000", run.gpa)
    );
    assert_eq!(run.next(), "mhp: insert event cleared");
    assert_eq!(run.client.execute("device_del", json!({"id": "hot0"})).unwrap(), json!({}));
    run.finish_removed();
}

/// The guest's `_EJ0` (the eject bit of the hotplug registers) unplugs the
/// DIMM, as QEMU's does: the slot empties without any `device_del`.
#[test]
fn guest_eject_unplugs_the_dimm() {
    if !kvm_or_skip("guest_eject_unplugs_the_dimm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = HotplugRun::start(dir.path(), "[regs]\nr9 = 1\n");
    assert!(run.next().starts_with("mhp: slot 0 status 0x0000000000000003"));
    assert_eq!(run.next(), "mhp: insert event cleared");
    assert_eq!(run.next(), "mhp: ejecting");
    let err = run.finish_removed();
    assert!(err.contains("the guest ejects hot0") && err.contains("device hot0 removed"), "{err}");
}

/// The cost of one `_DSM` round trip (Get Namespace Label Size: page
/// writes, doorbell exit, host routing to the plugin through the ABI,
/// reply) against a plain port write nobody claims, in one run.
#[test]
fn dsm_round_trip_cost_against_a_plain_port_exit() {
    if !kvm_or_skip("dsm_round_trip_cost_against_a_plain_port_exit") {
        return;
    }
    const N: u64 = 2000;
    let mut reg = PluginRegistry::default();
    reg.load(&common::plugin_path("nvdimm")).unwrap();
    let reg = Arc::new(reg);
    let time = |program: &dmhost::guest::GuestProgram, regs: &[(&str, u64)]| {
        let (vm, serial) = common::vm_with_serial(8 << 20);
        common::add(&vm, &reg, "nvdimm", "nv0", r#"{"size":"4224K"}"#);
        let acpi = AcpiHost::install(&vm, 1, AcpiConfig::default()).unwrap();
        let preset = RegPreset(regs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect());
        vm.load_program(program, &preset).unwrap();
        let t = Instant::now();
        vm.start().unwrap();
        let exit = vm.control().wait_timeout(Duration::from_secs(60)).map(|_| vm.wait());
        let elapsed = t.elapsed();
        assert_eq!(exit, Some(VmExit::Guest(0)), "{}", serial.text());
        (elapsed, acpi.dsm_calls(), vm)
    };
    let nv = acpi_programs::nvdimm_acpi().unwrap();
    let bench = [("r12", acpi_programs::MODE_BENCH), ("r13", N)];
    let (t_dsm, calls, _vm) = time(&nv, &bench);
    assert_eq!(calls, N);
    let (t_dsm0, calls0, _vm) = time(&nv, &[("r12", acpi_programs::MODE_BENCH), ("r13", 0)]);
    assert_eq!(calls0, 0);
    let plain = program("port-loop", |a| {
        let mut l = a.create_label();
        a.mov(rcx, N)?;
        a.mov(dx, 0x80u32)?;
        a.set_label(&mut l)?;
        a.out(dx, eax)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        exit_with(a, 0)
    })
    .unwrap();
    let (t_plain, _, _vm) = time(&plain, &[]);
    let per_dsm = t_dsm.saturating_sub(t_dsm0).as_secs_f64() / N as f64;
    let per_exit = t_plain.as_secs_f64() / N as f64;
    eprintln!(
        "_DSM round trip: {:.1} µs per call; plain port exit: {:.1} µs; ratio {:.2}",
        per_dsm * 1e6,
        per_exit * 1e6,
        per_dsm / per_exit
    );
    // One exit per call plus page copies: a few exits' worth at most.
    assert!(per_dsm / per_exit < 10.0, "{per_dsm} vs {per_exit}");
}

/// A hot-plug raises the GED's interrupt line (level, GSI 9) with the event
/// bit of what changed, and a read of the GED register returns the events,
/// clears them and drops the line, as the OS's `_EVT` does.
#[test]
fn hotplug_raises_the_ged_line_until_the_events_are_read() {
    if !kvm_or_skip("hotplug_raises_the_ged_line_until_the_events_are_read") {
        return;
    }
    let mut reg = PluginRegistry::default();
    reg.load(&common::plugin_path("pc_dimm")).unwrap();
    reg.load(&common::plugin_path("nvdimm")).unwrap();
    let (vm, _serial) = common::vm_with_serial(8 << 20);
    common::add(&vm, &reg, "pc-dimm", "boot0", r#"{"size":"2M"}"#);
    let _acpi = AcpiHost::install(&vm, 1, AcpiConfig::default()).unwrap();
    let line = || dmhost::pci::irq::ioapic_lines(&vm).unwrap().asserted(GED_GSI);
    let events = || {
        let mut b = [0u8; 4];
        assert!(vm.bus().read(dmhost_plugin_api::IoSpace::Pio, GED_PORT.into(), &mut b));
        u32::from_le_bytes(b)
    };
    assert!(!line(), "boot devices raise nothing");
    assert_eq!(events(), 0);

    common::add(&vm, &reg, "pc-dimm", "hot0", r#"{"size":"4M"}"#);
    assert!(line(), "a DIMM plug raises the line");
    assert_eq!(events(), EVT_MEMORY);
    assert!(!line(), "the read dropped it");
    assert_eq!(events(), 0, "and cleared the events");

    common::add(&vm, &reg, "nvdimm", "nv0", r#"{"size":"4224K"}"#);
    assert!(line());
    assert_eq!(events(), EVT_NVDIMM, "a new FIT, no memory slot");

    vm.remove_device("hot0").unwrap();
    vm.remove_device("nv0").unwrap();
    assert!(line());
    assert_eq!(events(), EVT_MEMORY | EVT_NVDIMM, "events accumulate until read");
    assert!(!line());
}
