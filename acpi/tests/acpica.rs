//! Checks the tables with an independent tool, ACPICA: `iasl -d`
//! disassembles every table and `iasl` recompiles it; `acpiexec` loads the
//! DSDT and SSDTs (two NVDIMMs from the real nvdimm plugin) and runs the
//! `_DSM`, `_LSI`/`_LSR`/`_LSW` and `_FIT` methods.
//!
//! acpiexec simulates operation regions with host buffers, and nothing
//! answers the DSM doorbell. So the tests read the request the AML wrote
//! back through a second region over the same DSM page (a test SSDT), and
//! check what the methods return when no reply arrives. The reply path
//! (extracting `{length, payload}` from the page) is checked by calling
//! `NCAL` with handle 16: the page's first word then reads back as the
//! length 16, so NCAL must return the 12 bytes that follow it.
//!
//! acpica-tools is installed by `scripts/ensure-acpica.sh` when missing.
//! The RSDP is not an SDT and iasl cannot read it from a file; its
//! checksums and pointer are checked in `layout.rs`'s unit tests.

use std::{path::Path, process::Command, sync::OnceLock};

use dmhost_acpi::{nvdimm as nvdr, tables, AcpiImage, TableSet, RSDP_DEFAULT_GPA};
use nvdimm::acpi::{device_aml, nfit_structures, DimmInfo};

fn ensure_acpica() {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    let r = DONE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-acpica.sh");
        let out = Command::new("sh")
            .arg(&script)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "acpica-tools (iasl, acpiexec) are missing and {} could not install them:\n{}",
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    });
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// DSDT with `\_SB.NVDR`, MADT, one SSDT per NVDIMM (slot 0 with labels,
/// slot 1 without), and an NFIT with both DIMMs and platform capabilities.
fn image() -> AcpiImage {
    let mut set = TableSet::new(tables::dsdt(&[], Some(nvdr::DSM_PAGE_DEFAULT_GPA)));
    set.add(tables::madt(&tables::MadtConfig::with_cpus(2)));
    let mut nfit = Vec::new();
    for slot in 0..2u32 {
        let table_id: [u8; 8] = *format!("NVDIMM{slot:02}").as_bytes().first_chunk().unwrap();
        set.add(tables::ssdt(table_id, "\\_SB_.NVDR", &[device_aml(slot, slot == 0)]));
        nfit.push(nfit_structures(&DimmInfo {
            slot,
            node: slot,
            base: 0x1_0000_0000 + u64::from(slot) * (128 << 20),
            size: 128 << 20,
            unarmed: slot == 1,
        }));
    }
    nfit.push(tables::nfit_platform_capabilities(0b11));
    set.add(tables::nfit(&nfit));
    set.layout(RSDP_DEFAULT_GPA).unwrap()
}

fn dumped() -> (tempfile::TempDir, AcpiImage) {
    let dir = tempfile::tempdir().unwrap();
    let img = image();
    img.dump(dir.path()).unwrap();
    (dir, img)
}

fn run(dir: &Path, cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn every_table_disassembles_and_recompiles_cleanly() {
    ensure_acpica();
    let (dir, img) = dumped();
    let names: Vec<&str> = img.tables.iter().map(|t| t.name.as_str()).filter(|n| *n != "RSDP").collect();
    assert_eq!(names, ["XSDT", "FACP", "DSDT", "APIC", "SSDT1", "SSDT2", "NFIT"]);
    for name in names {
        let dat = format!("{name}.dat");
        // SSDTs call \_SB.NVDR.NCAL: the disassembler needs the DSDT to
        // know its argument count.
        let mut args = vec![];
        if name.starts_with("SSDT") {
            args.extend(["-e", "DSDT.dat"]);
        }
        args.extend(["-d", dat.as_str()]);
        let (ok, text) = run(dir.path(), "iasl", &args);
        assert!(ok && !text.contains("Error"), "iasl -d {dat}:\n{text}");
        let dsl = dir.path().join(format!("{name}.dsl"));
        assert!(dsl.exists(), "iasl -d {dat} wrote no {}", dsl.display());

        let out = format!("re-{name}");
        let (ok, text) = run(dir.path(), "iasl", &["-p", &out, &format!("{name}.dsl")]);
        assert!(ok, "iasl {name}.dsl failed:\n{text}");
        assert!(text.contains("0 Errors, 0 Warnings"), "iasl {name}.dsl:\n{text}");
    }
    let nfit = std::fs::read_to_string(dir.path().join("NFIT.dsl")).unwrap();
    for want in [
        "Region Type GUID : 66F0D379-B4F3-4074-AC43-0D3318B78CDB",
        "Device Handle : 00000001",
        "Device Handle : 00000002",
        "Serial Number : 00123457",
        "Device not armed : 1",
        "Memory Map Attribute : 0000000000008008",
        "[Platform Capabilities]",
    ] {
        let squeezed: String = nfit.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(squeezed.contains(want), "NFIT.dsl lacks {want:?}:\n{nfit}");
    }
    let dsdt = std::fs::read_to_string(dir.path().join("DSDT.dsl")).unwrap();
    assert!(dsdt.contains("Name (_HID, \"ACPI0012\""), "{dsdt}");
    assert!(dsdt.contains("OperationRegion (NPIO, SystemIO, 0x0A18, 0x04)"), "{dsdt}");
    assert!(dsdt.contains("OperationRegion (NRAM, SystemMemory, 0xFEFF0000, 0x1000)"), "{dsdt}");
}

/// Test-only SSDT: `TRAM` overlays the DSM page; each `T*` method calls one
/// NVDIMM method, prints its result, then the page's first six dwords.
fn test_ssdt(page: u64) -> String {
    format!(
        r#"DefinitionBlock ("", "SSDT", 2, "DMHOST", "DSMTEST", 1)
{{
    External (\_SB.NVDR.NV00._DSM, MethodObj)
    External (\_SB.NVDR.NV01._DSM, MethodObj)
    External (\_SB.NVDR.NV00._LSI, MethodObj)
    External (\_SB.NVDR.NV00._LSR, MethodObj)
    External (\_SB.NVDR.NV00._LSW, MethodObj)
    External (\_SB.NVDR._DSM, MethodObj)
    External (\_SB.NVDR._FIT, MethodObj)
    External (\_SB.NVDR.NCAL, MethodObj)
    OperationRegion (TRAM, SystemMemory, {page:#x}, 0x1000)
    Field (TRAM, DWordAcc, NoLock, Preserve) {{ THDL, 32, TREV, 32, TFUN, 32, TA0, 32, TA1, 32, TA2, 32 }}
    Method (DUMP, 0, NotSerialized)
    {{
        Debug = THDL
        Debug = TREV
        Debug = TFUN
        Debug = TA0
        Debug = TA1
        Debug = TA2
    }}
    Method (CLR, 0, NotSerialized) {{ THDL = 0xEE TREV = 0xEE TFUN = 0xEE TA0 = 0xEE TA1 = 0xEE TA2 = 0xEE }}
    Method (PKG, 1, Serialized) {{ Local1 = Package (1) {{0}} Local1 [0] = Arg0 Return (Local1) }}
    Method (DIMM, 2, Serialized)
    {{
        CLR ()
        Debug = \_SB.NVDR.NV00._DSM (ToUUID ("4309AC30-0D11-11E4-9191-0800200C9A66"), 1, Arg0, PKG (Arg1))
        DUMP ()
    }}
    Method (TF4, 0) {{ DIMM (4, Buffer (0) {{}}) }}
    Method (TF5, 0) {{ DIMM (5, Buffer (8) {{0x10, 0, 0, 0, 0x20, 0, 0, 0}}) }}
    Method (TF6, 0) {{ DIMM (6, Buffer (12) {{0x10, 0, 0, 0, 0x04, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef}}) }}
    Method (TNV1, 0)
    {{
        CLR ()
        Debug = \_SB.NVDR.NV01._DSM (ToUUID ("4309AC30-0D11-11E4-9191-0800200C9A66"), 1, 0, PKG (Buffer (0) {{}}))
        DUMP ()
    }}
    Method (TBAD, 0)
    {{
        CLR ()
        Debug = \_SB.NVDR.NV00._DSM (ToUUID ("2F10E7A4-9E91-11E4-89D3-123B93F75CBA"), 1, 4, PKG (Buffer (0) {{}}))
        DUMP ()
    }}
    Method (TROT, 0)
    {{
        CLR ()
        Debug = \_SB.NVDR._DSM (ToUUID ("2F10E7A4-9E91-11E4-89D3-123B93F75CBA"), 1, 0, PKG (Buffer (0) {{}}))
        DUMP ()
    }}
    Method (TLSI, 0) {{ CLR () Debug = \_SB.NVDR.NV00._LSI () DUMP () }}
    Method (TLSR, 0) {{ CLR () Debug = \_SB.NVDR.NV00._LSR (0x40, 0x80) DUMP () }}
    Method (TLSW, 0) {{ CLR () Debug = \_SB.NVDR.NV00._LSW (0x44, 2, Buffer (2) {{0xab, 0xcd}}) DUMP () }}
    Method (TFIT, 0) {{ CLR () Debug = \_SB.NVDR._FIT () DUMP () }}
    Method (TRPL, 0)
    {{
        Debug = \_SB.NVDR.NCAL (ToUUID ("4309AC30-0D11-11E4-9191-0800200C9A66"), 1, 5,
                                PKG (Buffer (8) {{0x11, 0x22, 0x33, 0x44, 0, 0, 0, 0}}), 0x10)
    }}
}}
"#
    )
}

/// `acpiexec` output split per evaluated method: the "ACPI Debug:" lines
/// (and their continuation lines), whitespace-squeezed.
fn debug_output(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(m) = line.strip_prefix("Evaluating ") {
            out.push((m.trim().to_owned(), Vec::new()));
        } else if let Some((_, lines)) = out.last_mut() {
            let l = line.trim();
            let squeezed = |t: &str| t.split_whitespace().collect::<Vec<_>>().join(" ");
            if let Some(d) = l.strip_prefix("ACPI Debug:").map(str::trim) {
                // Package elements come as their own "ACPI Debug: (nn) ..." lines.
                match lines.last_mut() {
                    Some(last) if d.starts_with('(') => {
                        last.push_str(" | ");
                        last.push_str(&squeezed(d));
                    }
                    _ => lines.push(squeezed(d)),
                }
            } else if l.starts_with("0000:") {
                if let Some(last) = lines.last_mut() {
                    last.push_str(" | ");
                    last.push_str(&squeezed(l));
                }
            }
        }
    }
    out
}

fn hex(v: u64) -> String {
    format!("0x{v:016X}")
}

#[test]
fn acpiexec_runs_the_nvdimm_methods_and_the_page_holds_the_request() {
    ensure_acpica();
    let (dir, _img) = dumped();
    let page = nvdr::DSM_PAGE_DEFAULT_GPA;
    std::fs::write(dir.path().join("TEST.asl"), test_ssdt(page)).unwrap();
    let (ok, text) = run(dir.path(), "iasl", &["TEST.asl"]);
    assert!(ok && text.contains("0 Errors"), "test SSDT:\n{text}");

    let methods = ["TF4", "TF5", "TF6", "TNV1", "TBAD", "TROT", "TLSI", "TLSR", "TLSW", "TFIT", "TRPL"];
    let batch: Vec<String> = methods.iter().map(|m| format!("execute \\{m}")).collect();
    let (ok, text) = run(
        dir.path(),
        "acpiexec",
        &["-b", &batch.join("; "), "DSDT.dat", "SSDT1.dat", "SSDT2.dat", "TEST.aml"],
    );
    assert!(ok, "acpiexec failed:\n{text}");
    for bad in ["AE_", "Exception", "Error"] {
        assert!(!text.contains(bad), "acpiexec reported {bad}:\n{text}");
    }
    let runs = debug_output(&text);
    let got: Vec<&str> = runs.iter().map(|(m, _)| m.trim_start_matches('\\')).collect();
    assert_eq!(got, methods, "{text}");
    let of = |m: &str| &runs.iter().find(|(n, _)| n.trim_start_matches('\\') == m).unwrap().1;
    // No host answers: the first page word (RLEN) reads back as the handle,
    // too short a reply, so NCAL returns status 1 (not supported) ...
    let unsupported = "Buffer [0x04] | 0000: 01 00 00 00 // ....";
    // ... and the page holds {handle, revision, function, arg3...}.
    let page =
        |h: u64, f: u64, a: [u64; 3]| [hex(h), hex(1), hex(f), hex(a[0]), hex(a[1]), hex(a[2])].to_vec();
    let expect = |m: &str, ret: &str, req: Vec<String>| {
        let mut want = vec![ret.to_owned()];
        want.extend(req);
        assert_eq!(of(m), &want, "{m}:\n{text}");
    };
    expect("TF4", unsupported, page(1, 4, [0, 0, 0]));
    expect("TF5", unsupported, page(1, 5, [0x10, 0x20, 0]));
    expect("TF6", unsupported, page(1, 6, [0x10, 4, 0xefbe_adde]));
    // Function 0 on NV01 (handle 2): the fallback mask is 0.
    expect("TNV1", "Buffer [0x04] | 0000: 00 00 00 00 // ....", page(2, 0, [0, 0, 0]));
    // The root UUID on a DIMM: refused before the page is touched.
    let untouched = vec![hex(0xee); 6];
    expect("TBAD", unsupported, untouched);
    expect("TROT", "Buffer [0x04] | 0000: 00 00 00 00 // ....", page(0, 0, [0, 0, 0]));
    // _LSI/_LSR/_LSW forward to functions 4, 5, 6 with {offset, length[, data]}.
    let lsi = "Package (Contains 0x03 Elements): | (00) 0x0000000000000001 | (01) 0x0000000000000000 | (02) 0x0000000000000000";
    // Function 4 takes no input: _LSI leaves Arg3 (the page's FARG) alone.
    let stale = 0xee;
    expect("TLSI", lsi, page(1, 4, [stale, stale, stale]));
    assert_eq!(
        of("TLSR")[0],
        "Package (Contains 0x02 Elements): | (00) 0x0000000000000001 | (01) Buffer [0x00]"
    );
    assert_eq!(&of("TLSR")[1..], page(1, 5, [0x40, 0x80, 0]).as_slice(), "{text}");
    expect("TLSW", &hex(1), page(1, 6, [0x44, 2, 0xcdab]));
    // _FIT asks for the FIT at offset 0 with the reserved handle, and
    // ends with an empty buffer when the read fails.
    assert_eq!(of("TFIT")[0], "Buffer [0x00]");
    assert_eq!(&of("TFIT")[1..], page(0x10000, 1, [0, 0, 0]).as_slice(), "{text}");
    // Reply path: a length of 16 yields the 12 bytes after it.
    assert_eq!(
        of("TRPL"),
        &vec!["Buffer [0x0C] | 0000: 01 00 00 00 05 00 00 00 11 22 33 44 // .........\"3D".to_owned()],
        "{text}"
    );
}
