//! Post-copy against pre-copy for one high-dirty-rate guest, over loopback
//! TCP, both VMs in this process: `cargo bench -p dmhost --bench postcopy`.
//!
//! The guest is `builtin:migrate-verify` writing every page of its RAM each
//! round (stride 1, tiny delay): pre-copy cannot converge and is forced
//! after `max-rounds`; post-copy switches after one round. Printed from the
//! same run: total migration time and downtime of each, and the
//! destination's post-copy page-fault latency (fault read → `UFFDIO_COPY`
//! done: median, p99). `DMHOST_BENCH_RAM_MIB` sets the RAM (default 128). Both runs share a
//! 200 MB/s bandwidth limit (requested pages are not limited).

use std::{
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use dmhost::{
    guest::{GuestProgram, RegPreset},
    migration::{self, progress::Progress, MigrationUri},
    vm::{vcpu::VmExit, Vm, VmConfig},
};

/// The downtime limit both runs are given, and pre-copy's round limit.
const MAX_DOWNTIME: Duration = Duration::from_millis(20);
const MAX_ROUNDS: u32 = 10;
/// A link slower than the guest dirties its memory (requested pages in
/// post-copy are never limited; background pages are).
const BANDWIDTH: u64 = 200_000_000;

struct Outcome {
    total: Duration,
    downtime: Duration,
    rounds: u32,
    /// Destination figures (post-copy only).
    postcopy: Option<serde_json::Value>,
    verified: bool,
}

fn vm(ram: u64) -> Vm {
    let serial: dmhost::vm::vcpu::SerialSink = Arc::new(|_: &[u8]| {});
    Vm::new(VmConfig { ram_size: ram, vcpus: 1, serial }).expect("create VM")
}

fn run(ram: u64, postcopy: bool) -> Outcome {
    let program = GuestProgram::from_spec("builtin:migrate-verify", None).expect("guest program");
    let mut regs = std::collections::BTreeMap::new();
    regs.insert("r12".to_owned(), 1_000_000);
    regs.insert("r13".to_owned(), 1000);
    regs.insert("r14".to_owned(), 1);
    let src = vm(ram);
    src.load_program(&program, &RegPreset(regs)).expect("load");
    src.start().expect("start");
    std::thread::sleep(Duration::from_millis(300));

    let dst = Arc::new(vm(ram));
    let listener =
        migration::listen(&"tcp:127.0.0.1:0".parse::<MigrationUri>().expect("uri")).expect("listen");
    let uri = listener.uri();
    let dst_progress = Arc::new(Progress::default());
    let (tx, rx) = mpsc::channel();
    {
        let (dst, p) = (Arc::clone(&dst), Arc::clone(&dst_progress));
        std::thread::spawn(move || {
            let r = migration::dest::incoming_with(&dst, listener, p);
            let ok = r.is_ok() && dst.start().is_ok();
            let _ = tx.send(ok);
        });
    }
    let progress = Arc::new(Progress::default());
    progress.set_params(migration::progress::Parameters {
        max_downtime: MAX_DOWNTIME,
        max_rounds: MAX_ROUNDS,
        max_bandwidth: BANDWIDTH,
        max_postcopy_bandwidth: BANDWIDTH,
    });
    progress.begin().expect("begin");
    if postcopy {
        let p = Arc::clone(&progress);
        std::thread::spawn(move || {
            while p.stats().round < 1 && !p.status().finished() {
                std::thread::sleep(Duration::from_millis(1));
            }
            p.request_postcopy(true);
        });
    }
    let summary = migration::source::migrate(&src, &uri, &progress).expect("migration");
    let started = rx.recv_timeout(Duration::from_secs(60)).unwrap_or(false);
    assert!(started, "the destination did not start");
    // Post-copy: the destination completes when every page is in place.
    let deadline = Instant::now() + Duration::from_secs(120);
    while postcopy
        && dst_progress.status() != migration::progress::Status::Completed
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    let pc = postcopy.then(|| dst_progress.to_json()["postcopy"].clone());
    // Let the guest check its memory on the destination for a while.
    std::thread::sleep(Duration::from_millis(500));
    let verified = dst.control().exit().is_none_or(|e| matches!(e, VmExit::Guest(0)));
    dst.stop(VmExit::Requested);
    dst.wait();
    src.stop(VmExit::Requested);
    src.wait();
    Outcome {
        total: summary.total_time,
        downtime: summary.downtime,
        rounds: summary.rounds,
        postcopy: pc,
        verified,
    }
}

fn main() {
    if let Err(e) = dmhost::run::kvm_available() {
        eprintln!("postcopy bench SKIPPED: {e}");
        return;
    }
    let mib: u64 = std::env::var("DMHOST_BENCH_RAM_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(128);
    let ram = mib << 20;
    println!(
        "guest: migrate-verify, {mib} MiB RAM, every page written each round; loopback TCP limited to {} MB/s; \
         downtime limit {} ms, pre-copy forced after {MAX_ROUNDS} rounds",
        BANDWIDTH / 1_000_000,
        MAX_DOWNTIME.as_millis()
    );
    let pre = run(ram, false);
    let post = run(ram, true);
    println!(
        "pre-copy : total {:8.1} ms, downtime {:7.1} ms, {} rounds ({}), guest verified: {}",
        pre.total.as_secs_f64() * 1e3,
        pre.downtime.as_secs_f64() * 1e3,
        pre.rounds,
        if pre.rounds >= MAX_ROUNDS { "forced: never converged" } else { "converged" },
        pre.verified
    );
    println!(
        "post-copy: total {:8.1} ms, downtime {:7.1} ms, {} rounds before the switch, guest verified: {}",
        post.total.as_secs_f64() * 1e3,
        post.downtime.as_secs_f64() * 1e3,
        post.rounds,
        post.verified
    );
    if let Some(pc) = &post.postcopy {
        println!(
            "post-copy fault latency (fault read -> UFFDIO_COPY done), {} faults, {} samples: median {} us, p99 {} us (goals: < 100 us, < 1000 us)",
            pc["faults"], pc["fault-latency-samples"], pc["fault-latency-p50-us"], pc["fault-latency-p99-us"]
        );
        println!(
            "post-copy requested pages {}, zero-filled holes {}",
            pc["postcopy-requests"], pc["zero-fills"]
        );
    }
    println!(
        "ratio: post-copy total / pre-copy total = {:.2}, downtime ratio = {:.3}",
        post.total.as_secs_f64() / pre.total.as_secs_f64(),
        post.downtime.as_secs_f64() / pre.downtime.as_secs_f64().max(1e-9)
    );
}
