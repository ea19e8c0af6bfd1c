//! `dmhost run` as a child process, with its stdout and stderr lines
//! collected: the harness of the two-process migration tests.

use dmhost::control_client::ControlClient;
use serde_json::{json, Value};
use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

/// The dmhost binary, finding plugins in the target directory.
pub fn dmhost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dmhost"));
    c.arg("--plugin-dir").arg(super::target_dir());
    c
}

/// A running `dmhost run`, killed when dropped.
pub struct VmProcess {
    pub child: Child,
    pub out: Arc<Mutex<Vec<String>>>,
    pub err: Arc<Mutex<Vec<String>>>,
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `query-migrate` until its status is one of `want`; that reply.
pub fn wait_status(c: &mut ControlClient, want: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let q = c.execute("query-migrate", json!({})).unwrap();
        if want.iter().any(|w| q["status"] == *w) {
            return q;
        }
        assert!(Instant::now() < deadline, "status not in {want:?}: {q}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn collect(
    r: impl std::io::Read + Send + 'static,
    sink: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if let Some(tx) = &tx {
                let _ = tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
}

impl VmProcess {
    /// `dmhost run CONFIG ARGS...`; stderr lines also go to the receiver.
    pub fn spawn(args: &[&str], config: &Path) -> (Self, mpsc::Receiver<String>) {
        Self::spawn_logged(args, config, "info")
    }

    /// [`spawn`](Self::spawn) with `RUST_LOG=rust_log`.
    pub fn spawn_logged(args: &[&str], config: &Path, rust_log: &str) -> (Self, mpsc::Receiver<String>) {
        let mut child = dmhost()
            .arg("run")
            .arg(config)
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (out, err) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let (tx, rx) = mpsc::channel();
        collect(child.stdout.take().unwrap(), out.clone(), None);
        collect(child.stderr.take().unwrap(), err.clone(), Some(tx));
        (Self { child, out, err }, rx)
    }

    /// A destination waiting on `uri` (`tcp:…:0` picks a port); returns it
    /// and the URI it listens on.
    pub fn destination(config: &Path, uri: &str, extra: &[&str]) -> (Self, String) {
        let mut args = vec!["--incoming", uri];
        args.extend_from_slice(extra);
        let (vm, rx) = Self::spawn(&args, config);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("destination did not listen");
            if let Some(u) = line.strip_prefix("dmhost: waiting for an incoming migration on ") {
                return (vm, u.to_owned());
            }
        }
    }

    /// A source with a control socket in `dir`, once its guest has run 16
    /// rounds of `migrate-verify`.
    pub fn source(dir: &Path, config: &Path) -> (Self, PathBuf) {
        let sock = dir.join("src.sock");
        let (vm, _) = Self::spawn(&["--control", sock.to_str().unwrap()], config);
        vm.wait_stdout("round 0x0000000000000010", Duration::from_secs(30));
        (vm, sock)
    }

    pub fn wait_stdout(&self, needle: &str, timeout: Duration) {
        self.wait_line(false, needle, timeout);
    }

    /// The first line of stdout (or stderr) containing `needle`, waiting
    /// up to `timeout` for it.
    pub fn wait_line(&self, stderr: bool, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = if stderr { &self.err } else { &self.out };
            if let Some(l) = lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?}: stdout {:?} stderr {:?}",
                self.out.lock().unwrap(),
                self.err.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What follows `needle` in the first line of stdout (or stderr) that
    /// contains it.
    pub fn wait_after(&self, stderr: bool, needle: &str, timeout: Duration) -> String {
        let line = self.wait_line(stderr, needle, timeout);
        line.split_once(needle).map(|(_, rest)| rest.to_owned()).unwrap_or_default()
    }

    /// Wait for the exit: (code, stdout lines, stderr lines).
    pub fn finish(mut self, timeout: Duration) -> (i32, Vec<String>, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let code = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "VM did not exit; stdout {:?} stderr {:?}",
                    self.out.lock().unwrap(),
                    self.err.lock().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        std::thread::sleep(Duration::from_millis(100));
        let out = self.out.lock().unwrap().clone();
        let err = self.err.lock().unwrap().clone();
        (code, out, err)
    }
}

/// The migrate-verify guest finished `rounds` verified rounds and exited 0.
pub fn assert_verified(code: i32, out: &[String], err: &[String], rounds: u64) {
    let want = format!("migrate-verify: 0x{rounds:016x} rounds verified");
    assert_eq!(code, 0, "stdout {out:?}\nstderr {err:?}");
    assert!(out.contains(&want), "no {want:?} in {out:?}");
}

/// Size of the NVDIMM the label-area tests use, and of its label area.
pub const NV_SIZE: usize = 4 << 20;
pub const NV_LABEL: usize = 128 << 10;

/// A 4 MiB NVDIMM backing file in `dir` whose label area (its last
/// 128 KiB) holds a pattern; returns the file and the CRC32C of that area.
pub fn nvdimm_label_image(dir: &Path) -> (PathBuf, u32) {
    let mut image = vec![0u8; NV_SIZE];
    for (i, b) in image[NV_SIZE - NV_LABEL..].iter_mut().enumerate() {
        *b = (i * 7 + 3) as u8;
    }
    let file = dir.join("nv0.img");
    std::fs::write(&file, &image).unwrap();
    (file, crc32c::crc32c(&image[NV_SIZE - NV_LABEL..]))
}

/// CRC32C of device `nv0`'s label area, asked of the VM at `sock`.
pub fn label_area_digest(sock: &Path) -> u32 {
    let mut c = dmhost::control_client::ControlClient::connect(sock).unwrap();
    let r = c
        .execute(
            "x-query-ram-digest",
            serde_json::json!({"block": "nv0/ram", "offset": NV_SIZE - NV_LABEL, "length": NV_LABEL}),
        )
        .unwrap();
    r["crc32c"].as_u64().unwrap() as u32
}
