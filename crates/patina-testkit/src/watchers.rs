//! The stalled-watchers scenario: a region of many machines, whole-region watchers that stop
//! reading while every machine is updated twice, the agent's memory meanwhile, and whether
//! every watcher converges once it reads again. Shared by an integration test (small) and
//! `cargo xtask bench watchers` (at full size).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::watch_response::Kind;
use patina_proto::v1::{
    Machine, UpsertMachinesRequest, WatchRequest, WatchResponse, machine_change,
};
use tonic::transport::Channel;

use crate::{Agent, machine};

/// The size of the scenario.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub machines: usize,
    pub watchers: usize,
    /// Machines per app.
    pub per_app: usize,
}

/// What was measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Agent RSS once loaded, before any watcher: the baseline.
    pub rss_loaded: u64,
    /// Highest agent RSS sampled while the watchers were stalled and every machine was
    /// updated twice.
    pub rss_stalled_peak: u64,
    /// Agent RSS when the stalled phase ended.
    pub rss_stalled_end: u64,
    /// Watchers whose view equals the region once they read again.
    pub converged: usize,
    /// Messages each watcher read before it stalled.
    pub read_before_stall: usize,
    pub load_secs: f64,
    pub update_secs: f64,
    pub converge_secs: f64,
}

impl Report {
    /// The bound: at most 1.3 × the RSS without watchers, plus 32 MiB.
    pub fn bound(&self) -> u64 {
        self.rss_loaded * 13 / 10 + (32 << 20)
    }
}

/// Machines per UpsertMachines call.
const BATCH: usize = 1000;
/// Concurrent writers while loading and updating.
const WRITERS: usize = 4;
/// How often the agent's memory is sampled while the watchers are stalled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// The machine written last: a watcher that has seen it has seen everything before it.
const SENTINEL: &str = "zz-sentinel";

fn id(n: usize) -> String {
    format!("m{n:07}")
}

/// Machine `n` at generation `generation` (its port says which).
fn versioned(n: usize, per_app: usize, generation: u16) -> Machine {
    machine(&id(n), &format!("app-{}", n / per_app), 1000 + generation)
}

fn generation_of(m: &Machine) -> u8 {
    m.addresses
        .first()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse::<u16>().ok())
        .map_or(0, |p| p.saturating_sub(1000) as u8)
}

async fn write_all(url: &str, spec: Spec, generation: u16) -> Result<(), String> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WRITERS {
        let mut client = connect(url).await?;
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(BATCH as u64, Ordering::Relaxed) as usize;
                if first >= spec.machines {
                    return Ok::<(), String>(());
                }
                let machines = (first..(first + BATCH).min(spec.machines))
                    .map(|n| versioned(n, spec.per_app, generation))
                    .collect();
                client
                    .upsert_machines(UpsertMachinesRequest { machines })
                    .await
                    .map_err(|e| format!("upsert: {e}"))?;
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn connect(url: &str) -> Result<RegionClient<Channel>, String> {
    let channel = Channel::from_shared(url.to_owned())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(RegionClient::new(channel).max_decoding_message_size(64 << 20))
}

/// Read a watch until the sentinel has arrived; returns whether the view then holds every
/// machine at generation `want`, and nothing else.
async fn converge(
    first: WatchResponse,
    mut stream: tonic::Streaming<WatchResponse>,
    spec: Spec,
    want: u8,
) -> Result<bool, String> {
    let mut view = vec![0u8; spec.machines];
    let mut sentinel = false;
    let mut extra = 0usize;
    let mut first = Some(first);
    // Bounded: a snapshot plus a catch-up of every machine, many times over.
    for _ in 0..(spec.machines * 4 + 10_000) {
        let msg = match first.take() {
            Some(msg) => msg,
            None => match stream.message().await.map_err(|e| format!("watch: {e}"))? {
                Some(msg) => msg,
                None => return Err("the watch ended".into()),
            },
        };
        if msg.reset {
            view.fill(0);
        }
        for c in msg.changes.iter().filter_map(|c| c.change.as_ref()) {
            let (key, generation) = match c {
                machine_change::Change::Upserted(m) => (m.id.as_str(), generation_of(m)),
                machine_change::Change::Deleted(d) => (d.id.as_str(), 0),
            };
            if key == SENTINEL {
                sentinel = true;
                continue;
            }
            match key.strip_prefix('m').and_then(|n| n.parse::<usize>().ok()) {
                Some(n) if n < spec.machines => view[n] = generation,
                _ => extra += 1,
            }
        }
        if sentinel && msg.kind != Kind::Snapshot as i32 {
            return Ok(extra == 0 && view.iter().all(|&g| g == want));
        }
    }
    Err("the watch never delivered the sentinel".into())
}

/// Run the scenario against a fresh agent.
pub async fn run(agent: &Agent, spec: Spec) -> Result<Report, String> {
    let mut report = Report::default();
    let t = std::time::Instant::now();
    write_all(&agent.url, spec, 1).await?;
    report.load_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_loaded = agent.rss_bytes().map_err(|e| e.to_string())?;

    // Whole-region watchers, each on its own connection, that read one message and stop.
    let mut streams = Vec::with_capacity(spec.watchers);
    for _ in 0..spec.watchers {
        let mut client = connect(&agent.url).await?;
        let mut stream = client
            .watch(WatchRequest::default())
            .await
            .map_err(|e| format!("watch: {e}"))?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(|e| format!("watch: {e}"))?
            .ok_or("the watch ended")?;
        streams.push((client, first, stream));
    }
    report.read_before_stall = 1;

    // Every machine updated twice while nobody reads; memory sampled meanwhile.
    let pid = agent.child.id();
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (stop, peak) = (stop.clone(), peak.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(rss) = crate::rss_of(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        }
    });
    let t = std::time::Instant::now();
    write_all(&agent.url, spec, 2).await?;
    write_all(&agent.url, spec, 3).await?;
    report.update_secs = t.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    report.rss_stalled_end = agent.rss_bytes().map_err(|e| e.to_string())?;
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    report.rss_stalled_peak = peak.load(Ordering::Relaxed).max(report.rss_stalled_end);

    // The sentinel, then every watcher reads again.
    let mut client = connect(&agent.url).await?;
    client
        .upsert_machines(UpsertMachinesRequest {
            machines: vec![machine(SENTINEL, "app-sentinel", 1000)],
        })
        .await
        .map_err(|e| format!("sentinel: {e}"))?;
    let t = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (client, first, stream) in streams {
        tasks.spawn(async move {
            let _keep = client;
            converge(first, stream, spec, 3).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        if r.map_err(|e| e.to_string())?? {
            report.converged += 1;
        }
    }
    report.converge_secs = t.elapsed().as_secs_f64();
    Ok(report)
}
