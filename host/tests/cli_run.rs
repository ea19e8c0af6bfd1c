//! `dmhost run` as a user runs it: the real binary, the plugins found as
//! .so files beside it, the control socket driven over a UNIX socket.

mod common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use dmhost::{guest::programs, testing::kvm_or_skip};
use serde_json::{json, Value};

fn dmhost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmhost"));
    c.arg("--plugin-dir").arg(common::target_dir());
    c
}

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn demo_example_prints_checksum_and_exits_0() {
    if !kvm_or_skip("demo_example_prints_checksum_and_exits_0") {
        return;
    }
    common::plugin_path("pc_dimm");
    let out = dmhost().arg("run").arg(workspace().join("examples/demo.toml")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout {stdout} stderr {}", String::from_utf8_lossy(&out.stderr));
    let want = format!("demo: checksum=0x{:016x}", programs::demo_checksum(2 << 20));
    assert!(stdout.lines().any(|l| l == want), "{stdout}");
}

#[test]
fn bad_config_is_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "program = \"builtin:demo\"\nram = \"lots\"\n").unwrap();
    let out = dmhost().arg("run").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dmhost:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("ram"), "{err}");
}

#[test]
fn guest_exit_code_is_the_process_exit_code() {
    if !kvm_or_skip("guest_exit_code_is_the_process_exit_code") {
        return;
    }
    // The demo without any device exits 3 ("no device with a memory region").
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("nodev.toml");
    std::fs::write(&cfg, "program = \"builtin:demo\"\nram = \"4M\"\n").unwrap();
    let out = dmhost().arg("run").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no device"));
}

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &std::path::Path) -> Self {
        let mut tries = 0;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if tries < 200 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(25));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = Self { reader: BufReader::new(s.try_clone().unwrap()), writer: s };
        let greeting = c.line();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        c
    }
    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.reader.read_line(&mut l).unwrap();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("reply {l:?}: {e}"))
    }
    fn raw(&mut self, text: &str) -> Value {
        writeln!(self.writer, "{text}").unwrap();
        self.line()
    }
    fn cmd(&mut self, execute: &str, args: Value) -> Value {
        self.raw(&json!({"execute": execute, "arguments": args}).to_string())
    }
}

#[test]
fn hotplug_and_unplug_through_control_socket_seen_by_guest() {
    if !kvm_or_skip("hotplug_and_unplug_through_control_socket_seen_by_guest") {
        return;
    }
    common::plugin_path("pc_dimm");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("hotplug.toml");
    std::fs::write(&cfg, "program = \"builtin:hotplug\"\nram = \"8M\"\n").unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut child = dmhost()
        .arg("run")
        .arg("--timeout")
        .arg("60")
        .arg("--control")
        .arg(&sock)
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let expect = |prefix: &str| {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("waiting for {prefix:?}: {e}"));
        assert!(line.starts_with(prefix), "expected {prefix:?}, got {line:?}");
        line
    };
    expect("hotplug: waiting for a device");
    let mut c = Client::connect(&sock);

    // Invalid input: error objects, the server and the VM go on.
    for bad in [
        "not json",
        "{}",
        r#"{"execute":"nope"}"#,
        r#"{"execute":"device_add","arguments":{"id":"x"}}"#,
        r#"{"execute":"device_del","arguments":{"id":"ghost"}}"#,
        r#"{"execute":"device_add","arguments":{"driver":"pc-dimm","id":"x","size":"3K"}}"#,
        r#"{"execute":"device_add","arguments":{"driver":"nosuch","id":"x"}}"#,
    ] {
        let r = c.raw(bad);
        assert!(r["error"]["class"].is_string() && r["error"]["desc"].is_string(), "{bad}: {r}");
    }
    assert_eq!(c.cmd("device_del", json!({"id": "ghost"}))["error"]["class"], "DeviceNotFound");
    assert_eq!(c.cmd("query-status", json!({}))["return"]["status"], "running");

    let r = c.cmd("device_add", json!({"driver": "pc-dimm", "id": "dimm1", "size": "2M"}));
    let gpa = r["return"]["region"][0].as_u64().unwrap_or_else(|| panic!("{r}"));
    let line = expect("hotplug: region at 0x");
    assert_eq!(line, format!("hotplug: region at 0x{gpa:016x} works"));
    let devs = c.cmd("query-devices", json!({}));
    assert_eq!(devs["return"][0]["id"], "dimm1", "{devs}");
    assert_eq!(devs["return"][0]["kind"], "pc-dimm");

    assert_eq!(c.cmd("device_del", json!({"id": "dimm1"})), json!({"return": {}}));
    expect("hotplug: region gone, reads all ones");
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(!sock.exists(), "control socket removed on exit");
}

#[test]
fn quit_over_control_socket_stops_vm() {
    if !kvm_or_skip("quit_over_control_socket_stops_vm") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("wait.toml");
    std::fs::write(&cfg, "program = \"builtin:hotplug\"\nram = \"4M\"\n").unwrap();
    let sock = dir.path().join("ctl.sock");
    let mut child = dmhost()
        .args(["run", "--timeout", "60", "--control"])
        .arg(&sock)
        .arg(&cfg)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut c = Client::connect(&sock);
    assert_eq!(c.cmd("quit", json!({})), json!({"return": {}}));
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn without_kvm_run_fails_with_one_clear_line() {
    let out = dmhost()
        .env(dmhost::run::KVM_DEVICE_ENV, "/nonexistent/kvm")
        .arg("run")
        .arg(workspace().join("examples/demo.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("dmhost:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("/nonexistent/kvm is not available") && lines[0].contains("needs KVM"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}
