//! `cargo xtask bench global [--regions R] [--edges E] [--events N] [--lookup-secs S]
//! [--summaries N] [--checked N] [--edge-only]`: the global tier with real processes on loopback (release build).
//!
//! - region to edge: from the acknowledged stop of an app's last instance in a region until
//!   every global agent's LookupApp leaves that region out (and back up: until all list it
//!   again), over N events; baseline: one LookupApp round trip on an idle agent;
//! - LookupApp over gRPC: requests/s and p99 on one global agent with 64 concurrent clients
//!   (64 connections); baseline: the standard gRPC health check, same clients, same agent,
//!   the two (and LookupApps) taking turns of 0.5 s;
//! - the edge library's lookup, in process, on a table of N summaries (100 regions' worth
//!   of apps x 10 regions): p50 and p99; baseline: the cost of the two clock reads around
//!   each timed call;
//! - an edge's signature checks on a snapshot of `--checked` signed summaries (what a
//!   failover costs an edge following over TLS), on the threads the checks use; baseline: the same snapshot's
//!   apply without checks;
//! - memory per summary at N summaries: the resident memory the table adds, divided by N;
//!   baseline: the payload (the app's name and 12 bytes); and beside it, what a global
//!   agent's own store (SQLite, index, change log) adds per summary at N;
//! - a real `patina global` started on that store: seconds to open it (its compact index
//!   rebuilt) and to rebuild its lookup table, its resident bytes per summary then (store and
//!   table; baseline: the same agent on an empty store), the store's bytes per summary on disk;
//! - an edge's snapshot of that store's N summaries from that agent (what a global agent's
//!   death costs each edge that followed it); baseline: the store's write time.
//!
//! `--edge-only`: these figures only, not the worlds of agents above.
//!
//! Last line: one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::{LookupAppRequest, MachineState, MembersRequest, UpsertMachineRequest};
use patina_testkit::{Agent, machine};
use tonic::transport::Channel;

use crate::harness::{build_patina, percentile_us};
use crate::world::{Shape, World, region_name};

pub struct Options {
    regions: usize,
    edges: usize,
    events: usize,
    lookup_secs: u64,
    summaries: usize,
    /// Signed summaries in the edge's signature-check figure.
    checked: usize,
    /// Only the figures of the edge library and of one global agent on N summaries (no
    /// worlds of agents).
    edge_only: bool,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            regions: 3,
            edges: 3,
            events: 200,
            lookup_secs: 10,
            summaries: 1_000_000,
            checked: 100_000,
            edge_only: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if *a == "--edge-only" {
                o.edge_only = true;
                continue;
            }
            let v: u64 = it.next().context("missing value")?.parse()?;
            match *a {
                "--regions" => o.regions = v as usize,
                "--edges" => o.edges = v as usize,
                "--events" => o.events = v as usize,
                "--lookup-secs" => o.lookup_secs = v,
                "--summaries" => o.summaries = v as usize,
                "--checked" => o.checked = v as usize,
                other => bail!("unknown option {other}"),
            }
        }
        if o.regions < 2 || o.edges < 1 || o.events < 1 || o.summaries < 10 || o.checked < 10 {
            bail!(
                "--regions at least 2, --edges and --events at least 1, --summaries and --checked at least 10"
            );
        }
        Ok(o)
    }
}

const APP: &str = "lat";
const CLIENTS: usize = 64;

async fn connect(a: &Agent) -> anyhow::Result<GlobalClient<Channel>> {
    Ok(GlobalClient::new(a.channel().await))
}

async fn lists(c: &mut GlobalClient<Channel>, from: &str, region: &str) -> anyhow::Result<bool> {
    let answer = c
        .lookup_app(LookupAppRequest {
            app: APP.into(),
            from_region: from.into(),
            include_empty: false,
        })
        .await?
        .into_inner();
    Ok(answer.regions.iter().any(|r| r.region == region))
}

/// Poll every edge (1 ms apart) until each one's answer about `region` is `want`; returns
/// when the last one got there, or `None` after 10 s.
async fn until_all(
    edges: &mut [GlobalClient<Channel>],
    from: &str,
    region: &str,
    want: bool,
) -> anyhow::Result<Option<Instant>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = vec![false; edges.len()];
    let mut last = Instant::now();
    while done.iter().any(|d| !d) {
        if Instant::now() > deadline {
            return Ok(None);
        }
        for (e, c) in edges.iter_mut().enumerate() {
            if !done[e] && lists(c, from, region).await? == want {
                done[e] = true;
                last = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(Some(last))
}

struct Figures {
    down_ms: Vec<f64>,
    up_ms: Vec<f64>,
    rtt_us: f64,
    lookup_per_s: f64,
    lookup_p99_us: f64,
    health_per_s: f64,
    health_p99_us: f64,
    /// LookupApps of [`BATCH`] apps: lookups (not calls) per second, and a call's p99.
    batch_lookups_per_s: f64,
    batch_p99_us: f64,
}

/// Apps per LookupApps call in the batched load.
const BATCH: usize = 100;

async fn region_to_edge(w: &World, events: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, f64)> {
    let regions = w.regions.len();
    let mut edges = Vec::new();
    for g in &w.globals {
        edges.push(connect(g).await?);
    }
    // Every bridge and global agent sees every other one.
    let members = w.globals.len() + regions * w.bridges[0].len() - 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    for g in &w.globals {
        while g
            .admin()
            .await
            .members(MembersRequest {})
            .await?
            .into_inner()
            .members
            .iter()
            .filter(|m| m.state == "alive")
            .count()
            < members
        {
            if Instant::now() > deadline {
                bail!("the global cluster did not form within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut writers = Vec::new();
    for r in 0..regions {
        let mut c = w.regions[r][0].client().await;
        c.upsert_machine(UpsertMachineRequest {
            machine: Some(machine(&format!("{APP}-{r}"), APP, 80)),
        })
        .await?;
        writers.push(c);
    }
    for r in 0..regions {
        let from = region_name((r + 1) % regions);
        if until_all(&mut edges, &from, &region_name(r), true)
            .await?
            .is_none()
        {
            bail!("the edges never listed {APP} in {}", region_name(r));
        }
    }
    // Baseline: one LookupApp round trip on an idle agent.
    let mut rtts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        lists(&mut edges[0], "ord", "ord").await?;
        rtts.push(t.elapsed().as_nanos() as u64);
    }
    rtts.sort_unstable();
    let rtt_us = percentile_us(&rtts, 50.0);
    let (mut down, mut up) = (Vec::new(), Vec::new());
    let bar = crate::harness::progress(events as u64, "region to every edge");
    for k in 0..events {
        bar.inc(1);
        let r = k % regions;
        let (region, from) = (region_name(r), region_name((r + 1) % regions));
        for started in [false, true] {
            let mut m = machine(&format!("{APP}-{r}"), APP, 80);
            if !started {
                m.state = MachineState::Stopped as i32;
            }
            writers[r]
                .upsert_machine(UpsertMachineRequest { machine: Some(m) })
                .await?;
            let acked = Instant::now();
            let Some(last) = until_all(&mut edges, &from, &region, started).await? else {
                bail!("event {k}: the edges did not follow within 10 s");
            };
            let ms = last.duration_since(acked).as_secs_f64() * 1000.0;
            if started { &mut up } else { &mut down }.push(ms);
        }
    }
    bar.finish_and_clear();
    Ok((down, up, rtt_us))
}

/// One kind of call a [`load`] makes: its name, and the call (an error says what failed).
type Call = (
    &'static str,
    Arc<
        dyn Fn(Channel) -> std::pin::Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
            + Send
            + Sync,
    >,
);

/// How long each kind of call runs before the next takes its turn. The kinds alternate so
/// that the machine's drift over the run weighs on each alike: run one after the other for
/// S seconds each, the ratio of LookupApp to the health check moved by more than 10 % from
/// one run to the next.
const SLICE: Duration = Duration::from_millis(500);

/// [`CLIENTS`] tasks, each on a connection of its own (opened once, before any timing), make
/// each kind of call in turn for [`SLICE`], for `secs` seconds of each kind in all, after one
/// untimed turn of each (the connections' first calls); the kinds' order rotates each turn.
/// Per kind: calls per second and p99 (µs). A failed call is an error: a rate of failures is
/// no rate.
async fn load(a: &Agent, secs: u64, calls: &[Call]) -> anyhow::Result<Vec<(f64, f64)>> {
    let mut channels = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        channels.push(a.channel().await);
    }
    let turns = (Duration::from_secs(secs).as_millis() / SLICE.as_millis()).max(1) as usize;
    let mut lat: Vec<Vec<u64>> = vec![Vec::new(); calls.len()];
    let mut took = vec![Duration::ZERO; calls.len()];
    for turn in 0..=turns {
        for i in 0..calls.len() {
            let k = (i + turn) % calls.len();
            let (name, call) = &calls[k];
            let name = *name;
            let start = Instant::now();
            let end = start + SLICE;
            let tasks: Vec<_> = channels
                .iter()
                .map(|channel| {
                    let (channel, call) = (channel.clone(), call.clone());
                    tokio::spawn(async move {
                        let mut lat = Vec::new();
                        while Instant::now() < end {
                            let t = Instant::now();
                            if let Err(e) = call(channel.clone()).await {
                                bail!("{name} failed under load: {e}");
                            }
                            lat.push(t.elapsed().as_nanos() as u64);
                        }
                        anyhow::Ok(lat)
                    })
                })
                .collect();
            let mut slice = Vec::new();
            for t in tasks {
                slice.extend(t.await??);
            }
            // The first turn warms the connections up: not counted.
            if turn > 0 {
                lat[k].extend(slice);
                took[k] += start.elapsed();
            }
        }
    }
    Ok(lat
        .into_iter()
        .zip(took)
        .map(|(mut l, took)| {
            l.sort_unstable();
            (l.len() as f64 / took.as_secs_f64(), percentile_us(&l, 99.0))
        })
        .collect())
}

async fn grpc_load(w: &World, secs: u64) -> anyhow::Result<GrpcLoad> {
    let a = &w.globals[0];
    let lookup: Call = (
        "LookupApp",
        Arc::new(|ch| {
            Box::pin(async move {
                GlobalClient::new(ch)
                    .lookup_app(LookupAppRequest {
                        app: APP.into(),
                        from_region: "fra".into(),
                        include_empty: false,
                    })
                    .await
                    .map(drop)
                    .map_err(|s| s.to_string())
            })
        }),
    );
    let health: Call = (
        "the health check",
        Arc::new(|ch| {
            Box::pin(async move {
                tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map(drop)
                    .map_err(|s| s.to_string())
            })
        }),
    );
    let batch: Call = (
        "LookupApps",
        Arc::new(|ch| {
            Box::pin(async move {
                let r = GlobalClient::new(ch)
                    .lookup_apps(patina_proto::v1::LookupAppsRequest {
                        apps: vec![APP.into(); BATCH],
                        from_region: "fra".into(),
                        include_empty: false,
                    })
                    .await
                    .map_err(|s| s.to_string())?;
                let n = r.get_ref().apps.len();
                if n == BATCH {
                    Ok(())
                } else {
                    Err(format!("{n} answers to {BATCH} apps"))
                }
            })
        }),
    );
    let rates = load(a, secs, &[lookup, health, batch]).await?;
    let [
        (lookup_per_s, lookup_p99),
        (health_per_s, health_p99),
        (batch_calls_per_s, batch_p99),
    ] = rates[..]
    else {
        bail!("three kinds of call, three rates");
    };
    Ok(GrpcLoad {
        lookup_per_s,
        lookup_p99,
        health_per_s,
        health_p99,
        batch_lookups_per_s: batch_calls_per_s * BATCH as f64,
        batch_p99,
    })
}

struct GrpcLoad {
    lookup_per_s: f64,
    lookup_p99: f64,
    health_per_s: f64,
    health_p99: f64,
    batch_lookups_per_s: f64,
    batch_p99: f64,
}

/// A global agent's store (SQLite, the serving index, the change log) holding `n` summaries
/// (apps x 10 regions), written in group commits: resident bytes it adds per summary, and
/// the seconds the writes took.
///
/// `bridge`: the summaries are one region's (`r00`), and the store's origin publishes a
/// bridge heartbeat for it last, as a bridge does: other global agents then take its
/// records from anti-entropy (they take a summary only from a bridge of its region).
pub(crate) fn agent_store(
    n: usize,
    dir: &std::path::Path,
    bridge: bool,
) -> anyhow::Result<(f64, f64, f64)> {
    use patina_proto::v1::{BridgeRecord, SummaryRecord};
    use patina_store::{LocalWrite, Store, StoreOptions};
    use prost::Message;
    let regions: usize = if bridge { 1 } else { 10 };
    let before = rss_bytes();
    let opts = StoreOptions {
        kind: Arc::new(patina_global::SummaryKind::default()),
        lean: std::env::var_os("PATINA_BENCH_FULL_STORE").is_none(),
        ..StoreOptions::default()
    };
    let store = Store::open(dir, opts)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let view = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64)
        << 16;
    let mut batch = Vec::with_capacity(4096);
    // Bytes of keys, groups and values written: the payload the disk holds at least.
    let mut payload = 0usize;
    for i in 0..n {
        let (app, r) = (format!("app-{:07}", i / regions), region_name(i % regions));
        let value = SummaryRecord {
            region: r.clone(),
            healthy: (i % 4) as u32,
            total: 3,
            view_hlc: view,
            // As long as a real Ed25519 signature (the store does not check it here).
            signature: vec![0x5a; 64],
        }
        .encode_to_vec();
        let key = patina_global::record::summary_key(&app, &r);
        payload += key.len() + app.len() + value.len();
        batch.push(LocalWrite::Put {
            key,
            group: app,
            value,
        });
        if batch.len() == 4096 || i + 1 == n {
            rt.block_on(store.write(std::mem::take(&mut batch)))?;
        }
    }
    if bridge {
        let heartbeat = BridgeRecord {
            region: region_name(0),
            view_hlc: view,
            signature: vec![0x5a; 64],
        };
        rt.block_on(store.write(vec![LocalWrite::Put {
            key: patina_global::record::bridge_key(store.node()),
            group: patina_global::record::BRIDGES_GROUP.to_owned(),
            value: heartbeat.encode_to_vec(),
        }]))?;
    }
    let took = started.elapsed().as_secs_f64();
    let bytes = rss_bytes().saturating_sub(before) as f64 / n as f64;
    store.close();
    Ok((bytes, took, payload as f64 / n as f64))
}

/// What a real `patina global` costs on a store of N summaries.
struct AgentFigures {
    /// From spawn to its API's announcement (the store opened: its index rebuilt from rows).
    open_secs: f64,
    /// From spawn until its own lookup table holds every summary (`patina_table_summaries`).
    rebuild_secs: f64,
    /// Its resident memory then.
    rss: u64,
    /// Baseline: the resident memory of the same agent on an empty store, same run.
    empty_rss: u64,
    /// An edge's snapshot of every summary from it, following it with the edge library.
    snapshot_secs: f64,
}

/// The value of the first sample of `metric` (no labels) in `/metrics` at `url`.
pub(crate) fn scrape(url: &str, metric: &str) -> Option<f64> {
    let (code, body) = patina_testkit::http_get(&format!("{url}/metrics")).ok()?;
    if code != 200 {
        return None;
    }
    body.lines().find_map(|l| {
        l.strip_prefix(metric)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

const AGENT_CONFIG: &str = "region = \"r00\"\nhost = \"snapshot\"\nlisten = \"127.0.0.1:0\"\nlog = \"warn\"\n[gossip]\nlisten = \"127.0.0.1:0\"\n";

/// Start `patina global` on the store in `dir` (its `data/`): how long it takes to open and
/// to rebuild its table of the `n` summaries, its resident memory then (and an empty agent's,
/// same run), and an edge's snapshot of every summary from it.
fn agent_on_store(
    bin: &std::path::Path,
    dir: &std::path::Path,
    n: usize,
) -> anyhow::Result<AgentFigures> {
    use patina_edge::{RegionSpec, RegionTable, Table};
    let empty_rss = {
        let empty = crate::bench_store::tempdir()?.join("empty-global");
        let _remove = RemoveOnDrop(empty.clone());
        let agent = Agent::start_role(bin, "global", &empty, AGENT_CONFIG)
            .context("starting an empty global agent")?;
        std::thread::sleep(Duration::from_secs(1));
        agent.rss_bytes().unwrap_or(0)
    };
    let started = Instant::now();
    let agent =
        Agent::start_role(bin, "global", dir, AGENT_CONFIG).context("starting a global agent")?;
    let open_secs = started.elapsed().as_secs_f64();
    let metrics = agent.metrics_url();
    // Bounded: a table that never fills ends the benchmark.
    let deadline = started + Duration::from_secs(1800);
    loop {
        if scrape(&metrics, "patina_table_summaries").is_some_and(|v| v as usize >= n) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the agent's table never held {n} summaries"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rebuild_secs = started.elapsed().as_secs_f64();
    let rss = agent.rss_bytes().unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let snapshot_secs = rt.block_on(async {
        let specs = (0..10)
            .map(|r| RegionSpec {
                name: region_name(r),
                ..RegionSpec::default()
            })
            .collect();
        let table = Arc::new(Table::new(RegionTable::new(specs).expect("a table"), None));
        let started = Instant::now();
        let edge = patina_edge::follow(
            vec![agent.url.clone()],
            table.clone(),
            patina_trust::Dial::Plain,
        );
        let mut synced = edge.synced.clone();
        let ok = tokio::time::timeout(Duration::from_secs(1800), synced.wait_for(|s| *s)).await;
        let secs = started.elapsed().as_secs_f64();
        anyhow::ensure!(ok.is_ok(), "the edge never synced");
        let held = table.stats().summaries;
        anyhow::ensure!(held as usize == n, "the edge holds {held} of {n} summaries");
        Ok::<_, anyhow::Error>(secs)
    })?;
    Ok(AgentFigures {
        open_secs,
        rebuild_secs,
        rss,
        empty_rss,
        snapshot_secs,
    })
}

/// Bytes of the files under `dir` (a store's SQLite database and its WAL).
fn disk_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    patina_testkit::rss_of(std::process::id()).unwrap_or(0)
}

/// The edge library on `n` summaries: (lookup p50 µs, p99 µs, clock-pair overhead ns,
/// bytes per summary, payload bytes per summary).
fn edge(n: usize) -> (f64, f64, f64, f64, f64) {
    use patina_edge::{RegionSpec, RegionTable, SummaryUpdate, Table};
    const REGIONS: usize = 10;
    let specs = (0..REGIONS)
        .map(|r| RegionSpec {
            name: region_name(r),
            ..RegionSpec::default()
        })
        .collect();
    let apps = n.div_ceil(REGIONS);
    let names: Vec<String> = (0..apps).map(|a| format!("app-{a:07}")).collect();
    let payload = names.iter().map(|s| s.len()).sum::<usize>() as f64 / n as f64 + 12.0;
    let before = rss_bytes();
    let table = Table::new(
        RegionTable::new(specs).expect("a valid table"),
        Some(Duration::from_secs(30)),
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for r in 0..REGIONS {
        table
            .apply_bridge(r as u64, &region_name(r), now_ms + 3_600_000)
            .expect("a bridge");
    }
    let mut added = 0;
    'fill: for (a, app) in names.iter().enumerate() {
        for r in 0..REGIONS {
            if added == n {
                break 'fill;
            }
            table
                .apply_summary(SummaryUpdate {
                    app,
                    region: &region_name(r),
                    healthy: ((a + r) % 4) as u32,
                    total: 3,
                    bridge: r as u64,
                })
                .expect("a summary");
            added += 1;
        }
    }
    let bytes = rss_bytes().saturating_sub(before) as f64 / n as f64;
    // Lookups of random apps from random regions, each timed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(REGIONS);
    let samples = 1_000_000;
    let mut lat = Vec::with_capacity(samples);
    let froms: Vec<String> = (0..REGIONS).map(region_name).collect();
    for _ in 0..samples {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let app = &names[(x % apps as u64) as usize];
        let from = &froms[((x >> 32) % REGIONS as u64) as usize];
        let t = Instant::now();
        table.lookup_into(app, from, false, &mut out);
        lat.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(&out);
    }
    lat.sort_unstable();
    let mut clock = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        clock.push(t.elapsed().as_nanos() as u64);
    }
    clock.sort_unstable();
    let overhead_ns = percentile_us(&clock, 50.0) * 1000.0;
    drop(table);
    (
        percentile_us(&lat, 50.0),
        percentile_us(&lat, 99.0),
        overhead_ns,
        bytes,
        payload,
    )
}

/// An edge's signature checks on a snapshot of `n` signed summaries (10 regions, a bridge
/// each, Ed25519 as `patina certs` issues): (seconds to check them all, the
/// same snapshot's apply without checks, seconds; the threads the checks used).
fn edge_checks(n: usize) -> anyhow::Result<(f64, f64, usize)> {
    use patina_edge::signed::{EdgeChecks, heartbeat_message, summary_message};
    use patina_edge::{RegionSpec, RegionTable, Replica, Table};
    use patina_proto::v1::watch_apps_response::Kind;
    use patina_proto::v1::{AppSummary, BridgeState, WatchAppsResponse};
    use patina_trust::{Grant, Role, Scope, Tier, Trust, Verifier};
    const REGIONS: usize = 10;
    const HOUR: Duration = Duration::from_secs(3600);
    let ca = patina_trust::certs::Authority::generate("bench", HOUR)?;
    let agent = ca.issue_set(vec![Grant::new(Tier::Global, "global", Role::Agent)], HOUR)?;
    let view = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64)
        << 16;
    let mut bridges = Vec::with_capacity(REGIONS);
    let mut keys = Vec::with_capacity(REGIONS);
    for r in 0..REGIONS {
        let region = region_name(r);
        let m = ca.issue_set(
            vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge(region.clone()),
            )],
            HOUR,
        )?;
        bridges.push(BridgeState {
            bridge: r as u64,
            region: region.clone(),
            view_hlc: view,
            removed: false,
            certificate: m.certificate().to_vec(),
            signature: m.sign(&heartbeat_message(r as u64, &region, view))?,
        });
        keys.push(m);
    }
    let mut summaries = Vec::with_capacity(n);
    for i in 0..n {
        let r = i % REGIONS;
        let (app, region) = (format!("app-{:07}", i / REGIONS), region_name(r));
        let healthy = (i % 4) as u32;
        summaries.push(AppSummary {
            signature: keys[r].sign(&summary_message(&app, &region, healthy, 3, view))?,
            app,
            region,
            healthy,
            total: 3,
            view_hlc: view,
            bridge: r as u64,
            removed: false,
        });
    }
    let snapshot = WatchAppsResponse {
        kind: Kind::SnapshotDone as i32,
        reset: true,
        bridges,
        summaries,
        resume_token: String::new(),
    };
    let table = || {
        let specs = (0..REGIONS)
            .map(|r| RegionSpec {
                name: region_name(r),
                ..RegionSpec::default()
            })
            .collect();
        Arc::new(Table::new(
            RegionTable::new(specs).expect("a valid table"),
            Some(Duration::from_secs(30)),
        ))
    };
    let mut checks = EdgeChecks::new(
        Arc::new(Verifier::new(Trust::fixed(agent))),
        Scope::new(Tier::Global, "global"),
    );
    let threads = checks.threads_for(n);
    let mut msg = snapshot.clone();
    let t = Instant::now();
    checks.filter(&mut msg);
    let check_secs = t.elapsed().as_secs_f64();
    if msg.summaries.len() != n || checks.refusals().get() != (0, 0) {
        bail!(
            "the edge refused good summaries: {:?}",
            checks.refusals().get()
        );
    }
    let mut replica = Replica::new(table());
    let t = Instant::now();
    replica.apply_checked(&snapshot);
    let apply_secs = t.elapsed().as_secs_f64();
    Ok((check_secs, apply_secs, threads))
}

pub fn run(o: Options) -> anyhow::Result<()> {
    // In process first, while this process is small: the table's memory is its RSS growth.
    let (edge_p50, edge_p99, clock_ns, bytes, payload) = edge(o.summaries);
    println!(
        "edge library, {} summaries: lookup p50 {edge_p50:.3} µs, p99 {edge_p99:.3} µs \
         (clock reads around each call: {clock_ns:.0} ns); {bytes:.1} bytes per summary \
         (payload {payload:.1})",
        o.summaries
    );
    let (check_secs, apply_secs, threads) = edge_checks(o.checked)?;
    println!(
        "an edge's signature checks on a snapshot of {} signed summaries: {check_secs:.2} s on \
         {threads} threads ({:.1} µs each); the same snapshot applied without checks: {apply_secs:.2} s",
        o.checked,
        check_secs * 1e6 / o.checked as f64
    );
    let agent_dir = crate::bench_store::tempdir()?.join("global-store");
    // Removed however this ends (a failed step returns early with `?`): 1M summaries are
    // hundreds of MiB.
    let _remove = RemoveOnDrop(agent_dir.clone());
    let (store_bytes, store_secs, row_payload) =
        agent_store(o.summaries, &agent_dir.join("data"), false)?;
    let disk = disk_bytes(&agent_dir.join("data")) as f64 / o.summaries as f64;
    println!(
        "a global agent's store, {} summaries: {store_bytes:.0} bytes per summary resident \
         (index, change log, SQLite cache), written in {store_secs:.1} s; {disk:.0} bytes per \
         summary on disk (key, app and signed value: {row_payload:.0})",
        o.summaries
    );
    // The same store under a real `patina global`: what it takes to start on N summaries and
    // what it holds resident then (store and table), and what a global agent's death costs
    // its edges (each that follows it takes a snapshot of the whole map from the next one).
    let a = agent_on_store(&build_patina()?, &agent_dir, o.summaries)?;
    drop(_remove);
    let agent_bytes = a.rss.saturating_sub(a.empty_rss) as f64 / o.summaries as f64;
    println!(
        "a global agent started on {} summaries: store open {:.1} s, its table rebuilt {:.1} s \
         after start; RSS {:.0} MiB against {:.0} MiB empty (same run): {agent_bytes:.0} bytes \
         per summary (store and table)",
        o.summaries,
        a.open_secs,
        a.rebuild_secs,
        a.rss as f64 / (1 << 20) as f64,
        a.empty_rss as f64 / (1 << 20) as f64,
    );
    println!(
        "an edge's snapshot of {} summaries from that agent: {:.2} s ({:.0} summaries/s)",
        o.summaries,
        a.snapshot_secs,
        o.summaries as f64 / a.snapshot_secs,
    );
    let edge_json = serde_json::json!({
        "edge_lookup_p50_us": edge_p50,
        "edge_lookup_p99_us": edge_p99,
        "baseline_clock_pair_ns": clock_ns,
        "summaries": o.summaries,
        "bytes_per_summary_1m": bytes,
        "baseline_payload_bytes_per_summary": payload,
        "agent_store_bytes_per_summary": store_bytes,
        "agent_store_disk_bytes_per_summary": disk,
        "baseline_row_payload_bytes_per_summary": row_payload,
        "agent_open_secs": a.open_secs,
        "agent_rebuild_secs": a.rebuild_secs,
        "agent_rss_bytes": a.rss,
        "baseline_empty_agent_rss_bytes": a.empty_rss,
        "agent_bytes_per_summary": agent_bytes,
        "edge_snapshot_secs": a.snapshot_secs,
        "baseline_store_write_secs": store_secs,
        "edge_checked_summaries": o.checked,
        "edge_check_secs": check_secs,
        "edge_check_threads": threads,
        "edge_check_us_per_summary": check_secs * 1e6 / o.checked as f64,
        "baseline_edge_apply_unchecked_secs": apply_secs,
    });
    if o.edge_only {
        println!("{edge_json}");
        return Ok(());
    }
    let bin = build_patina()?;
    // Security on (mTLS, encrypted gossip, signed summaries: as agents run by default), then
    // the same world in plaintext, in the same run.
    let f = world_figures(&bin, &o, true, true)?;
    let plain = world_figures(&bin, &o, false, true)?;
    // And the same secure world with the operator's listener off: what metrics cost (the
    // first world's every agent is scraped every second meanwhile, as a busy Prometheus
    // would).
    let off = world_figures(&bin, &o, true, false)?;
    let pct = |v: &[f64], p: f64| {
        let mut ns: Vec<u64> = v.iter().map(|ms| (ms * 1e6) as u64).collect();
        ns.sort_unstable();
        percentile_us(&ns, p) / 1000.0
    };
    let (down50, down99) = (pct(&f.down_ms, 50.0), pct(&f.down_ms, 99.0));
    let (up50, up99) = (pct(&f.up_ms, 50.0), pct(&f.up_ms, 99.0));
    let (plain_down99, plain_up99) = (pct(&plain.down_ms, 99.0), pct(&plain.up_ms, 99.0));
    println!(
        "world: {} regions x 2 agents, 2 bridges each, {} global agents (release build, loopback); \
         security on (mTLS, encrypted gossip, signed summaries), and the same world in plaintext",
        o.regions, o.edges
    );
    println!(
        "region to every edge, {} events: down p50 {down50:.1} ms, p99 {down99:.1} ms; \
         up p50 {up50:.1} ms, p99 {up99:.1} ms (one LookupApp round trip: {:.0} µs); \
         plaintext: down p99 {plain_down99:.1} ms, up p99 {plain_up99:.1} ms",
        f.down_ms.len(),
        f.rtt_us
    );
    println!(
        "LookupApp, {CLIENTS} clients on one global agent: {:.0}/s, p99 {:.0} µs \
         (gRPC health check, same clients: {:.0}/s, p99 {:.0} µs); plaintext: {:.0}/s, p99 {:.0} µs \
         (health {:.0}/s): with mTLS {:.2}x plaintext",
        f.lookup_per_s,
        f.lookup_p99_us,
        f.health_per_s,
        f.health_p99_us,
        plain.lookup_per_s,
        plain.lookup_p99_us,
        plain.health_per_s,
        f.lookup_per_s / plain.lookup_per_s
    );
    println!(
        "LookupApp over the health check's rate (same clients, same agent): {:.2}x; \
         LookupApps of {BATCH} apps: {:.0} lookups/s ({:.1}x the health check's calls/s), a call's p99 {:.0} µs",
        f.lookup_per_s / f.health_per_s,
        f.batch_lookups_per_s,
        f.batch_lookups_per_s / f.health_per_s,
        f.batch_p99_us
    );
    let off_down99 = pct(&off.down_ms, 99.0);
    println!(
        "metrics on (every agent scraped every second) vs off: LookupApp {:.0}/s vs {:.0}/s ({:.3}x); region to every edge p99 {down99:.1} vs {off_down99:.1} ms",
        f.lookup_per_s,
        off.lookup_per_s,
        f.lookup_per_s / off.lookup_per_s
    );
    let mut json = serde_json::json!({
        "regions": o.regions,
        "edges": o.edges,
        "events": f.down_ms.len(),
        "region_to_edge_p50_ms": down50,
        "region_to_edge_p99_ms": down99,
        "region_to_edge_up_p50_ms": up50,
        "region_to_edge_up_p99_ms": up99,
        "baseline_lookup_rtt_us": f.rtt_us,
        "lookup_grpc_per_s": f.lookup_per_s,
        "lookup_grpc_p99_us": f.lookup_p99_us,
        "baseline_health_grpc_per_s": f.health_per_s,
        "baseline_health_grpc_p99_us": f.health_p99_us,
        "lookup_over_health": f.lookup_per_s / f.health_per_s,
        "batch_apps": BATCH,
        "batch_lookups_per_s": f.batch_lookups_per_s,
        "batch_call_p99_us": f.batch_p99_us,
        "plaintext_region_to_edge_p99_ms": plain_down99,
        "plaintext_region_to_edge_up_p99_ms": plain_up99,
        "plaintext_lookup_grpc_per_s": plain.lookup_per_s,
        "plaintext_lookup_grpc_p99_us": plain.lookup_p99_us,
        "plaintext_health_grpc_per_s": plain.health_per_s,
        "lookup_tls_over_plaintext": f.lookup_per_s / plain.lookup_per_s,
        "metrics_off_lookup_grpc_per_s": off.lookup_per_s,
        "metrics_off_region_to_edge_p99_ms": off_down99,
        "lookup_metrics_on_over_off": f.lookup_per_s / off.lookup_per_s,
    });
    if let (Some(all), serde_json::Value::Object(edge)) = (json.as_object_mut(), edge_json) {
        all.extend(edge);
    }
    println!("{json}");
    Ok(())
}

/// The world's figures (region to edge, LookupApp and health under load), with security on
/// or in plaintext, and metrics on (scraped every second) or off.
fn world_figures(
    bin: &std::path::Path,
    o: &Options,
    secure: bool,
    metrics: bool,
) -> anyhow::Result<Figures> {
    let root = crate::bench_store::tempdir()?.join("global");
    let _ = std::fs::remove_dir_all(&root);
    let shape = Shape {
        regions: o.regions,
        agents: 2,
        bridges: 2,
        globals: o.edges,
        stale_after_secs: 30,
        secure,
        metrics,
    };
    let mut world = World::start(bin, &root, shape)?;
    // Scraped every second while it is measured, when its metrics are on.
    let scraper = metrics
        .then(|| crate::harness::Scraper::start(world.metrics_urls(), Duration::from_secs(1)));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let figures = rt.block_on(async {
        let (down_ms, up_ms, rtt_us) = region_to_edge(&world, o.events).await?;
        let g = grpc_load(&world, o.lookup_secs).await?;
        anyhow::Ok(Figures {
            down_ms,
            up_ms,
            rtt_us,
            lookup_per_s: g.lookup_per_s,
            lookup_p99_us: g.lookup_p99,
            health_per_s: g.health_per_s,
            health_p99_us: g.health_p99,
            batch_lookups_per_s: g.batch_lookups_per_s,
            batch_p99_us: g.batch_p99,
        })
    });
    if let Some(scraper) = scraper {
        println!(
            "  (metrics on: {} scrapes answered while measuring)",
            scraper.scrapes()
        );
    }
    world.stop();
    let _ = std::fs::remove_dir_all(&root);
    figures
}

/// A directory removed when this goes out of scope.
pub(crate) struct RemoveOnDrop(pub(crate) std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
