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
//!
//! `--summaries N`: the global tier instead. A global agent's store is written with N signed
//! summaries of one region and that region's bridge heartbeat (in process, as `bench global`
//! does: its write time is the baseline), a
//! `patina global` serves it, and a cold one joins it and catches up by anti-entropy: time
//! until its store holds every summary with nothing missing and its table holds them all,
//! the bytes moved, and both agents' resident memory. (Global agents take no writes from
//! clients, bridges write: no write latency is measured beside it.)

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, UpsertMachineRequest};
use patina_testkit::Agent;

use crate::cluster::start_agent;
use crate::harness::{build_patina, percentile as pct};

pub struct Options {
    machines: u64,
    writes_per_s: u64,
    /// The global tier instead: a cold global agent joins one that holds this many summaries.
    summaries: Option<u64>,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            machines: 1_000_000,
            writes_per_s: 100,
            summaries: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v: u64 = it.next().context("missing value")?.parse()?;
            match *a {
                "--machines" => o.machines = v,
                "--writes-per-s" => o.writes_per_s = v,
                "--summaries" => o.summaries = Some(v),
                other => bail!("unknown option {other}"),
            }
        }
        if o.machines < 1000
            || !(1..=1000).contains(&o.writes_per_s)
            || o.summaries.is_some_and(|n| n < 1000)
        {
            bail!("--machines and --summaries at least 1000, --writes-per-s between 1 and 1000");
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
    let result = match o.summaries {
        Some(n) => global(n, &bin, &root),
        None => rt.block_on(bench(&o, &bin, &root)),
    };
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

/// A global agent at `i` (loopback address `ip(i)`) with its data under `dir`, in the gossip
/// cluster seeded by agents 0 and 1.
fn start_global(bin: &std::path::Path, dir: &std::path::Path, i: usize) -> anyhow::Result<Agent> {
    use crate::cluster::{GOSSIP_PORT, ip};
    let config = format!(
        "region = \"r00\"\nhost = \"global-{i}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [\"{s0}:{GOSSIP_PORT}\", \"{s1}:{GOSSIP_PORT}\"]\n",
        ip = ip(i),
        s0 = ip(0),
        s1 = ip(1),
    );
    Agent::start_role(bin, "global", dir, &config)
        .with_context(|| format!("starting global agent {i}"))
}

fn global(n: u64, bin: &std::path::Path, root: &std::path::Path) -> anyhow::Result<()> {
    use crate::bench_global::{agent_store, scrape};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    println!("\npatina catch-up benchmark, global tier ({n} summaries, a cold global agent joins)");
    let serving_dir = root.join("global-0");
    let (_, write_secs, _) = agent_store(n as usize, &serving_dir.join("data"), true)?;
    println!(
        "  baseline: the serving agent's store took the {n} summaries in {write_secs:.1} s ({:.0} records/s, group commits of 4,096, in process)",
        n as f64 / write_secs
    );
    let serving = start_global(bin, &serving_dir, 0)?;
    let serving_metrics = serving.metrics_url();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while scrape(&serving_metrics, "patina_table_summaries").is_none_or(|v| (v as u64) < n) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the serving agent's table never filled"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let started = Instant::now();
    let cold = start_global(bin, &root.join("global-1"), 1)?;
    let cold_metrics = cold.metrics_url();
    let mut last_print = 0.0;
    let (stored, tabled) = loop {
        let elapsed = started.elapsed().as_secs_f64();
        anyhow::ensure!(
            elapsed < 1800.0,
            "the cold agent did not catch up within 1,800 s"
        );
        if let Ok(s) = rt.block_on(status(&cold)) {
            let missing: u64 = s.origins.iter().map(|x| x.missing).sum();
            let table = scrape(&cold_metrics, "patina_table_summaries").unwrap_or(0.0) as u64;
            if elapsed - last_print >= 2.0 {
                last_print = elapsed;
                println!(
                    "    {elapsed:5.1} s: {} of {n} summaries stored, {table} in its table, {missing} versions missing",
                    s.keys
                );
            }
            // Caught up: nothing known is missing, every summary is stored (the serving
            // agent's records and its bridge-less origin's only), and the table holds them.
            if s.keys >= n && missing == 0 && s.sync_bytes_in > 0 {
                if table >= n {
                    break (elapsed, elapsed);
                }
                // Stored: the table follows the store's feed a moment later.
                let at = elapsed;
                loop {
                    let t = scrape(&cold_metrics, "patina_table_summaries").unwrap_or(0.0) as u64;
                    if t >= n {
                        break;
                    }
                    anyhow::ensure!(
                        started.elapsed().as_secs_f64() < 1800.0,
                        "the cold agent's table never filled"
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
                break (at, started.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (s_cold, s_serving) = (rt.block_on(status(&cold))?, rt.block_on(status(&serving))?);
    let (rss_cold, rss_serving) = (
        cold.rss_bytes().unwrap_or(0),
        serving.rss_bytes().unwrap_or(0),
    );
    println!(
        "  cold global agent caught up with {n} summaries: stored in {stored:.1} s ({:.2}x the serving store's own write of them), its table full at {tabled:.1} s; {} sessions; {:.0} MB in ({:.0} B/summary), serving agent sent {:.0} MB",
        stored / write_secs,
        s_cold.syncs,
        s_cold.sync_bytes_in as f64 / 1e6,
        s_cold.sync_bytes_in as f64 / n as f64,
        s_serving.sync_bytes_out as f64 / 1e6,
    );
    println!(
        "  resident memory: cold agent {:.0} MiB, serving agent {:.0} MiB ({:.0} / {:.0} B/summary)",
        rss_cold as f64 / (1 << 20) as f64,
        rss_serving as f64 / (1 << 20) as f64,
        rss_cold as f64 / n as f64,
        rss_serving as f64 / n as f64,
    );
    let json = serde_json::json!({
        "summaries": n,
        "catchup_stored_s": stored,
        "catchup_table_s": tabled,
        "baseline_store_write_s": write_secs,
        "catchup_over_write": stored / write_secs,
        "catchup_bytes_in": s_cold.sync_bytes_in,
        "catchup_bytes_per_summary": s_cold.sync_bytes_in as f64 / n as f64,
        "catchup_sessions": s_cold.syncs,
        "cold_rss_bytes": rss_cold,
        "serving_rss_bytes": rss_serving,
    });
    println!("{json}");
    Ok(())
}
