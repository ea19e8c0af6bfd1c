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
    /// Switch to post-copy after this long in pre-copy: seconds (`2s`,
    /// `0.5s`) or pre-copy rounds (`3r`).
    #[arg(long)]
    pub postcopy_after: Option<PostcopyAfter>,
    /// Bandwidth limit of the background stream in post-copy, bytes per
    /// second (0 = none; requested pages are never limited).
    #[arg(long)]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Resume a paused post-copy migration on a new connection to `--to`
    /// (after `migrate-recover` on the destination).
    #[arg(long)]
    pub resume: bool,
}

/// When `--postcopy-after` switches to post-copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PostcopyAfter {
    Seconds(f64),
    Rounds(u32),
}

impl std::str::FromStr for PostcopyAfter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected seconds (2s, 0.5s) or rounds (3r)");
        if let Some(n) = s.strip_suffix('r') {
            return n.parse().map(Self::Rounds).map_err(|_| bad());
        }
        let n = s.strip_suffix('s').unwrap_or(s);
        match n.parse::<f64>() {
            Ok(x) if x.is_finite() && x >= 0.0 => Ok(Self::Seconds(x)),
            _ => Err(bad()),
        }
    }
}

pub fn run(args: MigrateArgs) -> CliResult {
    let mut c = ControlClient::connect(&args.control)?;
    let mut params = serde_json::Map::new();
    for (k, v) in [
        ("downtime-limit", args.max_downtime),
        ("max-bandwidth", args.max_bandwidth),
        ("max-rounds", args.max_rounds),
        ("max-postcopy-bandwidth", args.max_postcopy_bandwidth),
    ] {
        if let Some(v) = v {
            params.insert(k.into(), json!(v));
        }
    }
    if !params.is_empty() {
        c.execute("migrate-set-parameters", Value::Object(params))?;
    }
    let started = std::time::Instant::now();
    c.execute("migrate", json!({"uri": args.to, "resume": args.resume}))?;
    let mut postcopy_asked = false;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {msg:12} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
        )
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
        if status == "postcopy-paused" {
            bar.finish_and_clear();
            eprintln!(
                "dmhost migrate: post-copy paused ({}); the guest waits on the destination: run `migrate-recover` there, then `dmhost migrate --resume`",
                q["postcopy-paused-reason"].as_str().unwrap_or("connection lost")
            );
            return Ok(ExitCode::from(2));
        }
        let due = match args.postcopy_after {
            Some(PostcopyAfter::Seconds(s)) => started.elapsed().as_secs_f64() >= s,
            Some(PostcopyAfter::Rounds(r)) => q["round"].as_u64().unwrap_or(0) >= u64::from(r),
            None => false,
        };
        if due && !postcopy_asked && status == "active" {
            postcopy_asked = true;
            match c.execute("migrate-start-postcopy", json!({})) {
                Ok(_) => bar.println(format!("switching to post-copy after round {}", q["round"])),
                Err(e) => bar.println(format!("post-copy not started: {e}")),
            }
        }
        if let Some(pc) = q.get("postcopy") {
            bar.set_message(format!("{status} {} left", pc["pages-remaining"]));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    bar.finish_and_clear();
    let ram = &last["ram"];
    let status = last["status"].as_str().unwrap_or("?");
    println!(
        "migration {status}: {} bytes in {} ms, {} rounds, downtime {} ms",
        ram["transferred"],
        last["total-time"],
        last["round"],
        last.get("downtime").cloned().unwrap_or(Value::Null)
    );
    if let Some(pc) = last.get("postcopy") {
        println!("post-copy: {} pages requested by the destination", pc["postcopy-requests"]);
    }
    if status != "completed" {
        eprintln!("dmhost migrate: {}", last["error-desc"].as_str().unwrap_or("migration did not complete"));
        return Ok(ExitCode::FAILURE);
    }
    if !args.keep_source {
        c.execute("quit", json!({}))?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::PostcopyAfter;

    #[test]
    fn postcopy_after_parses_seconds_and_rounds() {
        assert_eq!("2s".parse(), Ok(PostcopyAfter::Seconds(2.0)));
        assert_eq!("0.5".parse(), Ok(PostcopyAfter::Seconds(0.5)));
        assert_eq!("3r".parse(), Ok(PostcopyAfter::Rounds(3)));
        for bad in ["", "r", "-1s", "xs", "1.5r", "nans", "infs"] {
            assert!(bad.parse::<PostcopyAfter>().is_err(), "{bad}");
        }
    }
}
