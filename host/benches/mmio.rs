//! MMIO exit bench: a guest loop of N MMIO writes to a testdev register,
//! (a) with testdev loaded from its shared library through the plugin ABI,
//! (b) with the same device model linked into this binary (the testdev
//! rlib) and called directly, (c) to an address nobody claims. Runs are
//! interleaved in one process; prints exits/s of each and the ratio a/b.
//! Separate VMs swing by ±10% on this nested host, far more than the two
//! paths differ, so the bench also runs both devices in one VM, the guest
//! alternating blocks of 64 writes between them and timing each block with
//! `rdtsc`: that ratio is the one to read (its spread is under ±1%).
//!
//! `cargo bench -p dmhost --bench mmio` (N from DMHOST_BENCH_N, rounds
//! from DMHOST_BENCH_ROUNDS).

use std::time::Instant;

use dmhost::{
    devices::DeviceImpl,
    guest::{asm::*, RegPreset},
    loader::PluginRegistry,
    testing::kvm_or_skip,
    vm::{vcpu::VmExit, Vm, VmConfig},
};
use dmhost_plugin_api::Plugin;

const MMIO: u64 = 0xd000_0000;
const RESULT: u64 = 0x30_0000;

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Plugin,
    Builtin,
    Unclaimed,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn plugin_lib() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    for dir in [deps.parent().unwrap(), deps] {
        let p = dir.join("libtestdev.so");
        if p.is_file() {
            return p;
        }
    }
    panic!("libtestdev.so not found next to {}: build the workspace first", exe.display());
}

fn bench_vm() -> Vm {
    Vm::new(VmConfig { ram_size: 8 << 20, vcpus: 1, serial: std::sync::Arc::new(|_: &[u8]| {}) }).unwrap()
}

/// Plug testdev `id` at `base`: from its `.so` through the ABI (`Plugin`)
/// or the linked model (`Builtin`).
fn add_testdev(vm: &Vm, path: Path, id: &str, base: u64, registry: &PluginRegistry) {
    let config = format!(r#"{{"mmio-base":{base}}}"#);
    match path {
        Path::Plugin => vm.add_device("testdev", id, |h| {
            registry
                .create("testdev", id, &config, h)
                .map(DeviceImpl::Plugin)
                .map_err(dmhost_plugin_api::PluginError::unsupported)
        }),
        Path::Builtin => vm.add_device("testdev", id, |h| {
            testdev::TestdevPlugin::create("testdev", id, &config, h).map(DeviceImpl::Builtin)
        }),
        Path::Unclaimed => return,
    }
    .unwrap();
}

/// One run: returns exits per second.
fn run(path: Path, n: u64, registry: &PluginRegistry) -> f64 {
    let vm = bench_vm();
    add_testdev(&vm, path, "t", MMIO, registry);
    let prog = program("bench", |a| {
        let mut l = a.create_label();
        a.mov(rbx, MMIO)?;
        a.mov(rcx, n)?;
        a.set_label(&mut l)?;
        a.mov(dword_ptr(rbx + testdev::regs::SCRATCH as i32), ecx)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        a.mov(rax, qword_ptr(rbx + testdev::regs::COUNTER as i32))?;
        a.mov(qword_ptr(RESULT), rax)?;
        exit_with(a, 0)
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    let t = Instant::now();
    vm.start().unwrap();
    assert_eq!(vm.wait(), VmExit::Guest(0));
    let secs = t.elapsed().as_secs_f64();
    let counted = vm.ram().read_u64(RESULT).unwrap();
    match path {
        Path::Unclaimed => assert_eq!(counted, u64::MAX),
        _ => assert_eq!(counted, n, "the device saw every write"),
    }
    n as f64 / secs
}

/// Second testdev of the paired run, the built-in one.
const MMIO_B: u64 = MMIO + 0x10_0000;
/// Writes per block of the paired run.
const BLOCK: u64 = 64;

/// One VM with both devices: testdev from its `.so` at [`MMIO`], the linked
/// one at [`MMIO_B`]. The guest alternates blocks of [`BLOCK`] writes to
/// each (which goes first alternates too) and times every block with
/// `rdtsc`, so drift in the host's speed hits both paths alike. Returns
/// TSC cycles spent on (plugin, built-in) writes.
fn paired(blocks: u64, registry: &PluginRegistry) -> (u64, u64) {
    let vm = bench_vm();
    add_testdev(&vm, Path::Plugin, "p", MMIO, registry);
    add_testdev(&vm, Path::Builtin, "b", MMIO_B, registry);
    let prog = program("bench-paired", |a| {
        let (mut outer, mut timed, mut l, mut swap, mut go) =
            (a.create_label(), a.create_label(), a.create_label(), a.create_label(), a.create_label());
        // r8/r9: cycles for the plugin/built-in; r10: blocks left.
        a.xor(r8, r8)?;
        a.xor(r9, r9)?;
        a.mov(r10, blocks)?;
        a.set_label(&mut outer)?;
        // Even blocks: plugin first; odd blocks: built-in first.
        a.test(r10d, 1u32)?;
        a.jnz(swap)?;
        a.mov(rbx, MMIO)?;
        a.call(timed)?;
        a.add(r8, rax)?;
        a.mov(rbx, MMIO_B)?;
        a.call(timed)?;
        a.add(r9, rax)?;
        a.jmp(go)?;
        a.set_label(&mut swap)?;
        a.mov(rbx, MMIO_B)?;
        a.call(timed)?;
        a.add(r9, rax)?;
        a.mov(rbx, MMIO)?;
        a.call(timed)?;
        a.add(r8, rax)?;
        a.set_label(&mut go)?;
        a.dec(r10)?;
        a.jnz(outer)?;
        a.mov(qword_ptr(RESULT), r8)?;
        a.mov(qword_ptr(RESULT + 8), r9)?;
        exit_with(a, 0)?;
        // timed: BLOCK writes to [rbx + SCRATCH]; rax = cycles taken.
        a.set_label(&mut timed)?;
        a.rdtsc()?;
        a.shl(rdx, 32u32)?;
        a.or(rax, rdx)?;
        a.mov(rsi, rax)?;
        a.mov(rcx, BLOCK)?;
        a.set_label(&mut l)?;
        a.mov(dword_ptr(rbx + testdev::regs::SCRATCH as i32), ecx)?;
        a.dec(rcx)?;
        a.jnz(l)?;
        a.rdtsc()?;
        a.shl(rdx, 32u32)?;
        a.or(rax, rdx)?;
        a.sub(rax, rsi)?;
        a.ret()
    })
    .unwrap();
    vm.load_program(&prog, &RegPreset::default()).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait(), VmExit::Guest(0));
    for base in [MMIO, MMIO_B] {
        let mut c = [0u8; 8];
        vm.bus().read(dmhost_plugin_api::IoSpace::Mmio, base + testdev::regs::COUNTER, &mut c);
        assert_eq!(u64::from_le_bytes(c), blocks * BLOCK, "the device at {base:#x} saw every write");
    }
    (vm.ram().read_u64(RESULT).unwrap(), vm.ram().read_u64(RESULT + 8).unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this too: keep it short then.
    let quick = !std::env::args().any(|a| a == "--bench");
    if !kvm_or_skip("bench mmio") {
        return;
    }
    let n = env_u64("DMHOST_BENCH_N", if quick { 500 } else { 20_000 });
    let rounds = env_u64("DMHOST_BENCH_ROUNDS", if quick { 1 } else { 9 });
    let mut registry = PluginRegistry::default();
    registry.load(&plugin_lib()).unwrap();
    let (mut p, mut b, mut u) = (Vec::new(), Vec::new(), Vec::new());
    run(Path::Builtin, n.min(1000), &registry); // warm up
                                                // Rotate the order each round, so no path always runs first (right
                                                // after the previous VM's teardown) or last.
    let order = [Path::Plugin, Path::Builtin, Path::Unclaimed];
    for round in 0..rounds as usize {
        for k in 0..order.len() {
            let path = order[(round + k) % order.len()];
            let rate = run(path, n, &registry);
            match path {
                Path::Plugin => p.push(rate),
                Path::Builtin => b.push(rate),
                Path::Unclaimed => u.push(rate),
            }
        }
    }
    // Per round, plugin against the built-in run next to it: the host's
    // speed drifts between rounds far more than the two paths differ.
    let ratios: Vec<f64> = p.iter().zip(&b).map(|(p, b)| p / b).collect();
    let (lo, hi) = ratios.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
    let ratio = median(ratios);
    let (p, b, u) = (median(p), median(b), median(u));
    println!("mmio bench: {n} MMIO writes per run, {rounds} rounds (median)");
    println!("  plugin (.so via ABI):  {p:>10.0} exits/s  {:>6.2} us/exit", 1e6 / p);
    println!("  built-in (linked):     {b:>10.0} exits/s  {:>6.2} us/exit", 1e6 / b);
    println!("  unclaimed (no device): {u:>10.0} exits/s  {:>6.2} us/exit", 1e6 / u);
    println!("  ratio plugin/built-in: {ratio:.4} (median of per-round ratios; range {lo:.4}-{hi:.4})");
    // Both paths in one VM, interleaved every 64 writes.
    let blocks = if quick { 4 } else { 200 };
    let paired: Vec<f64> = (0..rounds)
        .map(|_| {
            let (p, b) = paired(blocks, &registry);
            b as f64 / p as f64
        })
        .collect();
    let (lo, hi) = paired.iter().fold((f64::MAX, f64::MIN), |(l, h), &r| (l.min(r), h.max(r)));
    println!(
        "  paired (one VM, both devices, {} writes each, blocks of {BLOCK} alternating): \
         plugin/built-in {:.4} (median of {rounds} VMs; range {lo:.4}-{hi:.4})",
        blocks * BLOCK,
        median(paired)
    );
}
