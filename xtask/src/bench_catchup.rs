//! `cargo xtask bench catchup [--machines N] [--writes-per-s W]`: a cold agent joins a
//! region whose agent holds N machines (default 1,000,000) and catches up by anti-entropy.
//! Real processes (release build) on loopback.
//!
//! Prints the time from the cold agent's start until it holds every machine, its progress
//! (as `patina status` shows it: the versions still missing), the bytes the sessions moved
//! (both ends' counters), and the serving agent's write latency while it serves the catch-up
//! (W paced upserts a second, acknowledged) beside the same writes before the cold agent
//! started. Baseline in the same run: the time the serving agent took to take the same N
//! machines over gRPC in batches (`UpsertMachines`, 1,000 a call, 4 callers). Last line: one
//! JSON object.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, UpsertMachineRequest};
use patina_testkit::Agent;

use crate::cluster::start_agent;
use crate::harness::{build_patina, percentile as pct};

pub struct Options {
    machines: u64,
    writes_per_s: u64,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            machines: 1_000_000,
            writes_per_s: 100,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v: u64 = it.next().context("missing value")?.parse()?;
            match *a {
                "--machines" => o.machines = v,
                "--writes-per-s" => o.writes_per_s = v,
                other => bail!("unknown option {other}"),
            }
        }
        if o.machines < 1000 || !(1..=1000).contains(&o.writes_per_s) {
            bail!("--machines at least 1000, --writes-per-s between 1 and 1000");
        }
        Ok(o)
    }
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let root = crate::bench_store::tempdir()?.join("catchup");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(bench(&o, &bin, &root));
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn status(agent: &Agent) -> anyhow::Result<ClusterStatusResponse> {
    Ok(agent
        .admin()
        .await
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner())
}

/// Upserts paced at `per_s` into `agent` until `stop` is set (at most `max` of them);
/// returns each one's acknowledgement latency in microseconds, sorted.
async fn paced_writes(
    agent: &Agent,
    per_s: u64,
    max: u64,
    base: u64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<Vec<f64>> {
    let mut client = agent.client().await;
    let mut lat = Vec::new();
    let every = Duration::from_micros(1_000_000 / per_s);
    let mut next = Instant::now();
    for i in 0..max {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let started = Instant::now();
        client
            .upsert_machine(UpsertMachineRequest {
                machine: Some(patina_testkit::machine(
                    &format!("paced-{}", base + i),
                    "paced",
                    8080,
                )),
            })
            .await?;
        lat.push(started.elapsed().as_secs_f64() * 1e6);
        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

async fn bench(o: &Options, bin: &std::path::Path, root: &std::path::Path) -> anyhow::Result<()> {
    let n = o.machines;
    let mut serving = start_agent(bin, root, 0, "")?;
    println!("\npatina catch-up benchmark ({n} machines, a cold agent joins)");
    let loaded = Instant::now();
    crate::bench_store::load(&serving.url, 0, n).await?;
    let ingest = loaded.elapsed().as_secs_f64();
    println!(
        "  baseline: the serving agent took the {n} machines over gRPC in {ingest:.1} s ({:.0} records/s, batches of 1,000)",
        n as f64 / ingest
    );
    // The serving agent's write latency alone, paced, before anyone joins.
    let never = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let before = paced_writes(
        &serving,
        o.writes_per_s,
        o.writes_per_s * 3,
        0,
        never,
        std::sync::Arc::default(),
    )
    .await?;
    let held = status(&serving).await?.keys;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let mut cold = start_agent(bin, root, 1, "")?;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let during = {
        let (agent, per_s, stop) = (&serving, o.writes_per_s, stop.clone());
        paced_writes(agent, per_s, per_s * 600, 1_000_000, stop, acked.clone())
    };
    let watch = async {
        let mut progress: Vec<(f64, u64, u64)> = Vec::new();
        let mut last_print = 0.0;
        loop {
            let elapsed = started.elapsed().as_secs_f64();
            if elapsed > 600.0 {
                bail!("the cold agent did not catch up within 600 s");
            }
            let acked_before = acked.load(std::sync::atomic::Ordering::Relaxed);
            if let Ok(s) = status(&cold).await {
                let missing: u64 = s.origins.iter().map(|x| x.missing).sum();
                progress.push((elapsed, s.keys, missing));
                if elapsed - last_print >= 1.0 {
                    last_print = elapsed;
                    println!(
                        "    {elapsed:5.1} s: {} of {held} keys held, {missing} versions missing (patina status: MISSING)",
                        s.keys
                    );
                }
                // Caught up: nothing known to exist is missing, and every record the
                // serving agent held, plus the writes it acknowledged meanwhile (at least,
                // as of before this reading), is here. Sessions send newest first, so a
                // count alone would be reached before the oldest records arrive.
                let written = acked_before;
                if missing == 0 && s.keys >= held + written {
                    stop.store(true, std::sync::atomic::Ordering::Relaxed);
                    return anyhow::Ok((elapsed, progress));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (during, watched) = tokio::join!(during, watch);
    let (took, _progress) = watched?;
    let during = during?;
    let (s_cold, s_serving) = (status(&cold).await?, status(&serving).await?);
    let bytes_in = s_cold.sync_bytes_in;
    let bytes_out = s_serving.sync_bytes_out;
    println!(
        "  cold agent caught up with {held} records in {took:.1} s ({:.2}x the serving agent's own ingest of them); {} sessions; {:.0} MB in ({:.0} B/record), serving agent sent {:.0} MB",
        took / ingest,
        s_cold.syncs,
        bytes_in as f64 / 1e6,
        bytes_in as f64 / held as f64,
        bytes_out as f64 / 1e6
    );
    println!(
        "  serving agent's write ack at {}/s: before p50 {:.0} µs, p99 {:.0} µs; during the catch-up p50 {:.0} µs, p99 {:.0} µs ({} writes)",
        o.writes_per_s,
        pct(&before, 50.0),
        pct(&before, 99.0),
        pct(&during, 50.0),
        pct(&during, 99.0),
        during.len()
    );
    let json = serde_json::json!({
        "machines": n,
        "records": held,
        "catchup_s": took,
        "ingest_s": ingest,
        "catchup_over_ingest": took / ingest,
        "catchup_bytes_in": bytes_in,
        "catchup_bytes_per_record": bytes_in as f64 / held as f64,
        "catchup_sessions": s_cold.syncs,
        "write_ack_before_p50_us": pct(&before, 50.0),
        "write_ack_before_p99_us": pct(&before, 99.0),
        "write_ack_during_p50_us": pct(&during, 50.0),
        "write_ack_during_p99_us": pct(&during, 99.0),
    });
    println!("{json}");
    cold.kill9();
    serving.kill9();
    Ok(())
}
