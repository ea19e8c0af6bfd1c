//! `dmhost migrate --control SOCKET --to URI`: drive a migration of a
//! running `dmhost run --control SOCKET`, with a progress bar.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::{cli::CliResult, control_client::ControlClient};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Control socket of the source VM.
    #[arg(long)]
    pub control: PathBuf,
    /// Destination: tcp:HOST:PORT, unix:PATH or file:PATH (a snapshot).
    #[arg(long)]
    pub to: String,
    /// Longest acceptable guest pause, in milliseconds.
    #[arg(long)]
    pub max_downtime: Option<u64>,
    /// Bandwidth limit in bytes per second (0 = none).
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy rounds before the switch-over is forced.
    #[arg(long)]
    pub max_rounds: Option<u64>,
    /// Leave the source VM (paused) running after success instead of
    /// telling it to quit.
    #[arg(long)]
    pub keep_source: bool,
}

pub fn run(args: MigrateArgs) -> CliResult {
    let mut c = ControlClient::connect(&args.control)?;
    let mut params = serde_json::Map::new();
    for (k, v) in [("downtime-limit", args.max_downtime), ("max-bandwidth", args.max_bandwidth), ("max-rounds", args.max_rounds)] {
        if let Some(v) = v {
            params.insert(k.into(), json!(v));
        }
    }
    if !params.is_empty() {
        c.execute("migrate-set-parameters", Value::Object(params))?;
    }
    c.execute("migrate", json!({"uri": args.to}))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let last = loop {
        let q = c.execute("query-migrate", json!({}))?;
        let status = q["status"].as_str().unwrap_or("?").to_owned();
        let ram = &q["ram"];
        bar.set_length(ram["total"].as_u64().unwrap_or(0));
        bar.set_position(ram["transferred"].as_u64().unwrap_or(0).min(bar.length().unwrap_or(0)));
        bar.set_message(format!("{status} r{}", q["round"]));
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            break q;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let ram = &last["ram"];
    let status = last["status"].as_str().unwrap_or("?");
    println!(
        "migration {status}: {} bytes in {} ms, {} rounds, downtime {} ms",
        ram["transferred"], last["total-time"], last["round"], last.get("downtime").cloned().unwrap_or(Value::Null)
    );
    if status != "completed" {
        eprintln!("dmhost migrate: {}", last["error-desc"].as_str().unwrap_or("migration did not complete"));
        return Ok(ExitCode::FAILURE);
    }
    if !args.keep_source {
        c.execute("quit", json!({}))?;
    }
    Ok(ExitCode::SUCCESS)
}
