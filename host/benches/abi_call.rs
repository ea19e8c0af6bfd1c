//! The cost of one device call through the plugin ABI: a 4-byte
//! `mmio_write` to testdev's scratch register, (a) on the device created by
//! `libtestdev.so` loaded from disk (abi_stable vtable, `RSlice`, panic
//! fence, `RResult`), (b) on the same model linked in, as a plain
//! `Box<dyn DeviceModel>`. Criterion reports both; the ratio line is
//! measured in the same run. Goal: under 20 ns and under 3x the direct call.
//!
//! Run: `cargo build --release --workspace && cargo bench -p dmhost --bench abi_call`

use std::{hint::black_box, path::PathBuf, time::Instant};

use abi_suite::suite_host::SuiteHost;
use criterion::Criterion;
use dmhost::loader::load_library;
use dmhost_plugin_api::{DeviceModel, Plugin, RSlice};

const BASE: u64 = 0xd000_0000;
const SCRATCH: u64 = BASE + 0x08;
const CONFIG: &str = r#"{"mmio-base": 3489660928}"#;

fn main() {
    let lib = PathBuf::from(env!("CARGO_BIN_EXE_dmhost")).parent().unwrap().join("libtestdev.so");
    let plugin =
        load_library(&lib).unwrap_or_else(|e| panic!("{e}: cargo build --release --workspace first"));
    let host = SuiteHost::new();
    let mut abi = plugin.create("testdev", "bench-abi", CONFIG, host.host()).unwrap();
    let mut direct: Box<dyn DeviceModel> =
        testdev::TestdevPlugin::create("testdev", "bench-direct", CONFIG, host.host()).unwrap();
    let data = 0xfeed_beefu32.to_le_bytes();

    let mut c = Criterion::default().configure_from_args();
    c.bench_function("mmio_write 4 bytes through the ABI (.so)", |b| {
        b.iter(|| abi.mmio_write(black_box(SCRATCH), RSlice::from(black_box(&data[..]))).unwrap())
    });
    c.bench_function("mmio_write 4 bytes on the plain trait object", |b| {
        b.iter(|| direct.mmio_write(black_box(SCRATCH), black_box(&data[..])).unwrap())
    });
    c.final_summary();

    // The ratio, from interleaved timed loops in this run.
    const N: u32 = 5_000_000;
    let (mut t_abi, mut t_direct) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..N {
            abi.mmio_write(black_box(SCRATCH), RSlice::from(black_box(&data[..]))).unwrap();
        }
        t_abi.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(N));
        let t = Instant::now();
        for _ in 0..N {
            direct.mmio_write(black_box(SCRATCH), black_box(&data[..])).unwrap();
        }
        t_direct.push(t.elapsed().as_secs_f64() * 1e9 / f64::from(N));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, d) = (median(&mut t_abi), median(&mut t_direct));
    println!("abi_call: through the ABI {a:.2} ns/call, direct {d:.2} ns/call, ratio {:.2}x", a / d);
}
