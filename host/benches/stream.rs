//! Migration stream throughput over loopback, with its baselines.
//!
//! `cargo bench -p dmhost --bench stream`; `DMHOST_BENCH_MIB=N` sets the
//! amount of RAM moved (default 1024).

fn main() {
    let mib: u64 = std::env::var("DMHOST_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let block = (256u64 << 20).min(mib << 20) as usize;
    match dmhost::migration::bench::run(mib << 20, block) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg += &format!(": {s}");
                src = s.source();
            }
            eprintln!("stream bench failed: {msg}");
            std::process::exit(1);
        }
    }
}
