//! `cargo xtask bench store`: what one region agent's store sustains, through its real gRPC
//! API on loopback, with the client in the same 2-core machine.
//!
//! 1. `latency`: write-to-watcher and ack latency of upserts paced at 100/s, beside the
//!    same disk's `fdatasync` latency at the same pace (see `latency.rs`).
//! 2. `upserts`: acknowledged single-machine upserts per second with 1, 16 and 128
//!    concurrent clients.
//! 3. `loaded`: a fresh agent loaded with batched upserts (1000 per call) to `--records`
//!    machines: records per second, and resident memory per machine at 100k and at the end
//!    (1M); then ListInstances latency through gRPC on it; then the agent stopped, its store
//!    opened in this process: lookup latency from the index.
//!
//! `--only a,b` runs some of them; the latency phase runs first, on a quiet disk.

pub(crate) mod latency;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{
    Health, ListInstancesRequest, Machine, MachineState, UpsertMachineRequest,
    UpsertMachinesRequest,
};
use tonic::transport::Channel;

use patina_testkit::{Agent, rss_of};

use crate::harness::{build_patina, percentile_us};

/// A `patina region` on loopback for the benchmark.
fn start(bin: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<Agent> {
    Ok(Agent::start(bin, dir, "127.0.0.1", "")?)
}

/// Machines per app in the loaded store: a typical app runs a handful to a few dozen.
const INSTANCES_PER_APP: u64 = 20;
/// Machines per UpsertMachines call.
const BATCH: u64 = 1000;
/// Concurrent batch writers while loading.
const BATCH_WRITERS: u64 = 4;
/// Connections shared by the concurrent single-upsert clients (HTTP/2 multiplexes the rest).
const MAX_CONNECTIONS: usize = 16;

/// Fewest latency samples: the p99 of 500 is the fifth worst, not the worst.
const MIN_SAMPLES: u64 = 500;

/// The benchmark's phases, as `--only` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Latency,
    Upserts,
    Loaded,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Latency, Phase::Upserts, Phase::Loaded];

    fn name(self) -> &'static str {
        match self {
            Phase::Latency => "latency",
            Phase::Upserts => "upserts",
            Phase::Loaded => "loaded",
        }
    }
}

pub struct Options {
    secs: u64,
    records: u64,
    /// Measured writes in the latency phase (and fdatasyncs in its baseline).
    samples: u64,
    phases: Vec<Phase>,
    /// A `patina` binary to measure instead of building this tree's: two builds compared in
    /// one session (copy the first aside, then check out the second).
    patina: Option<std::path::PathBuf>,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            secs: 5,
            records: 1_000_000,
            samples: 0,
            phases: Phase::ALL.to_vec(),
            patina: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let value = it.next().with_context(|| format!("{a}: missing value"))?;
            let v = || -> anyhow::Result<u64> { Ok(value.parse()?) };
            match *a {
                "--secs" => o.secs = v()?,
                "--records" => o.records = v()?,
                "--samples" => o.samples = v()?,
                "--patina" => o.patina = Some(value.into()),
                "--only" => {
                    let names: Vec<&str> = value.split(',').collect();
                    if let Some(bad) = names
                        .iter()
                        .find(|n| !Phase::ALL.iter().any(|p| p.name() == **n))
                    {
                        bail!("--only: unknown phase {bad} (latency, upserts, loaded)");
                    }
                    // Always in the usual order: latency first, on a quiet disk.
                    o.phases = Phase::ALL
                        .into_iter()
                        .filter(|p| names.contains(&p.name()))
                        .collect();
                }
                other => bail!("unknown option {other}"),
            }
        }
        if o.records < 100_000 {
            bail!("--records must be at least 100000 (memory is measured at 100k)");
        }
        if o.samples == 0 {
            // As long as the other timed phases, at the pace.
            o.samples = (o.secs * latency::PACE_PER_S).max(MIN_SAMPLES);
        }
        if o.samples < MIN_SAMPLES {
            bail!("--samples must be at least {MIN_SAMPLES}");
        }
        Ok(o)
    }
}

type Json = serde_json::Map<String, serde_json::Value>;

fn machine(n: u64) -> Machine {
    Machine {
        id: format!("{:014x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 8),
        app: format!("app-{}", n / INSTANCES_PER_APP),
        addresses: vec![format!(
            "10.{}.{}.{}:8080",
            (n >> 16) & 0xff,
            (n >> 8) & 0xff,
            n & 0xff
        )],
        state: MachineState::Started as i32,
        health: Health::Passing as i32,
        ..Machine::default()
    }
}

async fn connect(url: &str) -> anyhow::Result<RegionClient<Channel>> {
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    Ok(RegionClient::new(channel))
}

/// Acknowledged single upserts per second with `clients` concurrent clients for `secs`.
async fn upserts(url: &str, clients: usize, secs: u64, base: u64) -> anyhow::Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..clients.min(MAX_CONNECTIONS) {
        conns.push(connect(url).await?);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut client = conns[c % conns.len()].clone();
        let (stop, done) = (stop.clone(), done.clone());
        tasks.spawn(async move {
            let mut n = base + c as u64 * 10_000_000;
            while !stop.load(Ordering::Relaxed) {
                let m = machine(n);
                n += 1;
                client
                    .upsert_machine(UpsertMachineRequest { machine: Some(m) })
                    .await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(n as f64 / elapsed)
}

/// Load machines `from..to` with batched upserts; returns records per second.
pub(crate) async fn load(url: &str, from: u64, to: u64) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(from));
    let mut tasks = tokio::task::JoinSet::new();
    let start = Instant::now();
    for _ in 0..BATCH_WRITERS {
        let mut client = connect(url).await?;
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= to {
                    break;
                }
                let machines = (first..(first + BATCH).min(to)).map(machine).collect();
                client
                    .upsert_machines(UpsertMachinesRequest { machines })
                    .await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((to - from) as f64 / start.elapsed().as_secs_f64())
}

/// Settle, then read the agent's resident memory.
async fn rss_settled(server: &Agent) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok(server.rss_bytes()?)
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What every phase needs.
struct Bench {
    options: Options,
    /// The release `patina` binary.
    bin: std::path::PathBuf,
    /// Scratch space on disk, one directory per agent.
    work: std::path::PathBuf,
    /// The clients' runtime: two workers, as many as the machine has cores.
    rt: tokio::runtime::Runtime,
}

/// What the phases measured: table rows, and the keys of the final JSON line.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
    json: Json,
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let b = Bench {
        bin: match &o.patina {
            Some(bin) => bin.clone(),
            None => build_patina()?,
        },
        work: tempdir()?,
        rt: tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?,
        options: o,
    };
    let mut report = Report::default();
    let result = b.options.phases.iter().try_for_each(|phase| match phase {
        Phase::Latency => latency_phase(&b, &mut report),
        Phase::Upserts => upserts_phase(&b, &mut report),
        Phase::Loaded => loaded_phase(&b, &mut report),
    });
    let _ = std::fs::remove_dir_all(&b.work);
    result?;
    let (o, Report { rows, json }) = (&b.options, report);

    let names: Vec<&str> = o.phases.iter().map(|p| p.name()).collect();
    println!(
        "\npatina store benchmark ({}; {} s per phase, {} records, {} latency samples)",
        names.join(", "),
        o.secs,
        o.records,
        o.samples
    );
    for (k, v) in &rows {
        println!("  {k:<56} {v:>16}");
    }
    println!("{}", serde_json::Value::Object(json));
    Ok(())
}

/// Write-to-watcher and ack latency at a steady pace, and the disk's fdatasync beside it.
fn latency_phase(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let (o, bin, work) = (&b.options, &b.bin, &b.work);
    let Report { rows, json } = report;
    let mut server = start(bin, &work.join("latency"))?;
    // The probe file sits beside the agent's database: same disk, same filesystem. Half the
    // baseline runs before the agent's writes and half after, so that a disk that drifts
    // during the run weighs on both figures alike.
    let data = server.dir.join("data");
    let mut fsync_ns = latency::fdatasync_baseline(&data, o.samples / 2)?;
    let agent = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(latency::write_to_watcher(&server.url, o.samples))?;
    fsync_ns.extend(latency::fdatasync_baseline(
        &data,
        o.samples - o.samples / 2,
    )?);
    fsync_ns.sort_unstable();
    server.stop()?;
    let wake_ns = latency::thread_wake_baseline(o.samples);
    latency::Latencies {
        agent,
        fsync_ns,
        wake_ns,
    }
    .report(rows, json);
    Ok(())
}

/// Acknowledged single upserts per second with 1, 16 and 128 clients.
fn upserts_phase(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let (o, bin, work, rt) = (&b.options, &b.bin, &b.work, &b.rt);
    let Report { rows, json } = report;
    let mut server = start(bin, &work.join("upserts"))?;
    for (i, clients) in [1usize, 16, 128].into_iter().enumerate() {
        let per_s = rt.block_on(upserts(
            &server.url,
            clients,
            o.secs,
            i as u64 * 1_000_000_000,
        ))?;
        rows.push((
            format!("acked upserts/s, {clients} clients"),
            format!("{per_s:.0}"),
        ));
        json.insert(
            format!("upserts_per_s_c{clients}"),
            (per_s.round() as u64).into(),
        );
    }
    server.stop()?;

    Ok(())
}

/// A fresh agent loaded to `--records` machines: load rate, memory per machine, ListInstances
/// through gRPC; then its store opened in this process: lookups from the rebuilt index.
fn loaded_phase(b: &Bench, report: &mut Report) -> anyhow::Result<()> {
    let (o, bin, work, rt) = (&b.options, &b.bin, &b.work, &b.rt);
    let Report { rows, json } = report;
    let apps = o.records / INSTANCES_PER_APP;
    let dir = work.join("loaded");
    let mut server = start(bin, &dir)?;
    let base = rt.block_on(rss_settled(&server))?;
    let batched_100k = rt.block_on(load(&server.url, 0, 100_000))?;
    let rss_100k = rt.block_on(rss_settled(&server))?;
    let (batched, rss_end) = if o.records > 100_000 {
        let batched_rest = rt.block_on(load(&server.url, 100_000, o.records))?;
        let total_s = 100_000.0 / batched_100k + (o.records - 100_000) as f64 / batched_rest;
        (
            o.records as f64 / total_s,
            rt.block_on(rss_settled(&server))?,
        )
    } else {
        (batched_100k, rss_100k)
    };
    let per_100k = (rss_100k - base) as f64 / 100_000.0;
    let per_end = (rss_end - base) as f64 / o.records as f64;
    rows.push((
        "batched records/s (1000 per call)".into(),
        format!("{batched:.0}"),
    ));
    rows.push((
        "agent RSS at start".into(),
        format!("{:.1} MiB", base as f64 / 1048576.0),
    ));
    rows.push(("bytes/machine at 100k".into(), format!("{per_100k:.0}")));
    rows.push((
        format!("bytes/machine at {}", o.records),
        format!("{per_end:.0}"),
    ));
    json.insert(
        "batched_records_per_s".into(),
        (batched.round() as u64).into(),
    );
    json.insert(
        "bytes_per_machine_100k".into(),
        (per_100k.round() as u64).into(),
    );
    let key = if o.records == 1_000_000 {
        "bytes_per_machine_1m".to_owned()
    } else {
        format!("bytes_per_machine_{}", o.records)
    };
    json.insert(key, (per_end.round() as u64).into());

    // ListInstances over gRPC, one client, random apps.
    let lat = rt.block_on(async {
        let mut client = connect(&server.url).await?;
        let mut rng = Rng(0x5eed);
        let mut ns = Vec::new();
        let until = Instant::now() + Duration::from_secs(o.secs);
        while Instant::now() < until {
            let app = format!("app-{}", rng.below(apps));
            let t = Instant::now();
            let got = client
                .list_instances(ListInstancesRequest {
                    app,
                    include_all: false,
                    ..Default::default()
                })
                .await?
                .into_inner();
            ns.push(t.elapsed().as_nanos() as u64);
            anyhow::ensure!(
                got.machines.len() as u64 == INSTANCES_PER_APP,
                "short listing"
            );
        }
        ns.sort_unstable();
        anyhow::Ok(ns)
    })?;
    let (g50, g99) = (percentile_us(&lat, 50.0), percentile_us(&lat, 99.0));
    rows.push((
        format!("ListInstances gRPC p50 / p99 ({INSTANCES_PER_APP} instances)"),
        format!("{g50:.0} / {g99:.0} µs"),
    ));
    json.insert("list_grpc_p50_us".into(), round2(g50));
    json.insert("list_grpc_p99_us".into(), round2(g99));
    server.stop()?;

    // In-process lookups from the index the agent rebuilt from SQLite.
    let before = rss_of(std::process::id())?;
    let t = Instant::now();
    let opts = patina_store::StoreOptions {
        kind: std::sync::Arc::new(patina_region::MachineKind::new("test")),
        ..Default::default()
    };
    let store = patina_store::Store::open(&dir.join("data"), opts)?;
    let open_s = t.elapsed().as_secs_f64();
    let rebuilt = (rss_of(std::process::id())? - before) as f64 / o.records as f64;
    let mut rng = Rng(0x5eed);
    let names: Vec<String> = (0..4096)
        .map(|_| format!("app-{}", rng.below(apps)))
        .collect();
    let mut ns = Vec::with_capacity(1_000_000);
    for i in 0..1_000_000usize {
        let app = &names[i % names.len()];
        let t = Instant::now();
        let got = store.list(app, patina_store::Filter::RoutableOnly);
        ns.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(&got);
        drop(got);
    }
    ns.sort_unstable();
    let (l50, l99) = (percentile_us(&ns, 50.0), percentile_us(&ns, 99.0));
    rows.push((
        format!("in-process lookup p50 / p99 ({INSTANCES_PER_APP} instances)"),
        format!("{l50:.2} / {l99:.2} µs"),
    ));
    rows.push((
        "store open + index rebuild".into(),
        format!("{open_s:.1} s"),
    ));
    rows.push((
        "bytes/machine, index rebuilt in-process".into(),
        format!("{rebuilt:.0}"),
    ));
    json.insert("lookup_in_process_p50_us".into(), round2(l50));
    json.insert("lookup_in_process_p99_us".into(), round2(l99));
    json.insert(
        "bytes_per_machine_rebuilt".into(),
        (rebuilt.round() as u64).into(),
    );
    json.insert("instances_per_app".into(), INSTANCES_PER_APP.into());

    // The view a region agent keeps for xDS and DNS (on by default) of the same store: every
    // live machine, its endpoint decoded when routable, and the apps announced to xDS
    // streams. Taken from a whole-store watch as the agent does.
    let before = rss_of(std::process::id())?;
    let t = Instant::now();
    let view = rt.block_on(async {
        use patina_xds::Source as _;
        let source = patina_xds::region::RegionSource::new("test");
        let hub = std::sync::Arc::new(patina_xds::Hub::new(patina_xds::hub::DEFAULT_LOG));
        let mut synced = source.synced().expect("a region source starts unsynced");
        let follower = tokio::spawn(patina_xds::region::follow(
            store.clone(),
            source.clone(),
            hub,
            std::time::Duration::from_millis(100),
            None,
            None,
        ));
        let r = tokio::time::timeout(std::time::Duration::from_secs(120), synced.wait_for(|s| *s))
            .await;
        let rss = rss_of(std::process::id());
        follower.abort();
        let _ = follower.await;
        anyhow::ensure!(
            matches!(r, Ok(Ok(_))),
            "the xDS view did not take the store in 120 s"
        );
        let held = source.apps().len() as u64;
        anyhow::ensure!(held == apps, "the view holds {held} apps, not {apps}");
        drop(source);
        Ok(rss?)
    })?;
    let view_s = t.elapsed().as_secs_f64();
    let view_per = (view.saturating_sub(before)) as f64 / o.records as f64;
    rows.push((
        "region xDS/DNS view: built from the store, bytes/machine".into(),
        format!("{view_s:.1} s, {view_per:.0}"),
    ));
    json.insert(
        "xds_view_bytes_per_machine".into(),
        (view_per.round() as u64).into(),
    );
    json.insert("xds_view_build_s".into(), round2(view_s));
    store.close();
    drop(store);
    Ok(())
}

fn round2(x: f64) -> serde_json::Value {
    serde_json::json!((x * 100.0).round() / 100.0)
}

/// A scratch directory on disk (not tmpfs: fsync must be real) under the target directory.
pub fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::harness::root().join("target"));
    let dir = base.join(format!("bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
