//! INTx and device-process bench, ratios measured in one run:
//! (1) interrupt injection: writing a KVM irqfd (what a device process
//!     does) versus KVM_IRQ_LINE ioctls from the host (assert + deassert);
//! (2) a guest loop of N MMIO writes to testdev in its own process versus
//!     the same plugin in the host process.
//!
//! `cargo bench -p dmhost --bench intx` (N from DMHOST_BENCH_N).

use std::{os::fd::AsRawFd, time::Instant};

use dmhost::{
    config::Isolation,
    guest::{programs, RegPreset},
    loader::PluginRegistry,
    remote,
    testing::kvm_or_skip,
    vm::{vcpu::VmExit, Vm, VmConfig},
};
use vmm_sys_util::eventfd::EventFd;

const MMIO: u64 = 0xd000_0000;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn lib(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    [deps.parent().unwrap(), deps]
        .iter()
        .map(|d| d.join(format!("lib{name}.so")))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("lib{name}.so not built"))
}

fn vm() -> Vm {
    Vm::new(VmConfig { ram_size: 8 << 20, vcpus: 1, serial: std::sync::Arc::new(|_: &[u8]| {}) }).unwrap()
}

fn injection(n: u64) -> (f64, f64) {
    let vm = vm();
    let kvm = &vm.shared().kvm;
    let irqfd = EventFd::new(0).unwrap();
    let resample = EventFd::new(0).unwrap();
    kvm.register_irqfd(17, irqfd.as_raw_fd(), Some(resample.as_raw_fd())).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        irqfd.write(1).unwrap();
    }
    let fd_rate = n as f64 / t.elapsed().as_secs_f64();
    kvm.unregister_irqfd(17, irqfd.as_raw_fd()).unwrap();
    let t = Instant::now();
    for _ in 0..n {
        kvm.set_irq_line(18, true).unwrap();
        kvm.set_irq_line(18, false).unwrap();
    }
    (fd_rate, n as f64 / t.elapsed().as_secs_f64())
}

fn mmio(n: u64, reg: &PluginRegistry, iso: Isolation) -> f64 {
    let vm = vm();
    remote::add_device(&vm, reg, "testdev", "t", &format!(r#"{{"mmio-base":{MMIO}}}"#), iso).unwrap();
    let regs = [("rcx".to_owned(), n), ("r8".to_owned(), MMIO + testdev::regs::SCRATCH)];
    vm.load_program(&programs::mmio_loop().unwrap(), &RegPreset(regs.into_iter().collect())).unwrap();
    let t = Instant::now();
    vm.start().unwrap();
    assert_eq!(vm.wait(), VmExit::Guest(0));
    n as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if !kvm_or_skip("bench intx") {
        return;
    }
    std::env::set_var(remote::RUNNER_ENV, env!("CARGO_BIN_EXE_dmhost"));
    let n = env_u64("DMHOST_BENCH_N", if quick { 500 } else { 20_000 });
    let mut reg = PluginRegistry::default();
    reg.load(&lib("testdev")).unwrap();
    let (fd, ioctl) = injection(n * 10);
    println!("intx bench: {} injections", n * 10);
    println!("  irqfd write:            {fd:>12.0} /s");
    println!("  KVM_IRQ_LINE (1 then 0): {ioctl:>12.0} /s");
    println!("  ratio irqfd/ioctl:      {:.2}", fd / ioctl);
    mmio(n.min(500), &reg, Isolation::None);
    let (mut i, mut p) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        i.push(mmio(n, &reg, Isolation::None));
        p.push(mmio(n, &reg, Isolation::Process));
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (i, p) = (med(i), med(p));
    println!("mmio bench: {n} MMIO writes per run, 3 rounds (median)");
    println!("  in-process plugin:      {i:>10.0} exits/s {:>7.2} us/exit", 1e6 / i);
    println!("  device process:         {p:>10.0} exits/s {:>7.2} us/exit", 1e6 / p);
    println!("  cost ratio process/in-process: {:.2}", i / p);
}
