//! The write path's latency at a steady, light pace, beside the disk's own.
//!
//! One client watches an app; another upserts machines of that app at [`PACE_PER_S`], one at
//! a time, each tagged with its sequence number in its metadata. A write's latency to the
//! watcher runs from just before its UpsertMachine is sent until the Watch stream delivers
//! that change; its ack latency until UpsertMachine returns. The baseline, measured in the
//! same run at the same pace on the same disk, is one 4 KiB append plus `fdatasync` per tick
//! (`File::sync_data`): what a durable commit cannot avoid. What the agent adds is the rest.
//!
//! Two more baselines say what that rest is made of. Between writes, half a tick after each,
//! the writing client sends a gRPC health check on the same connection: a round trip through
//! the client library, HTTP/2, loopback and the agent's runtime with nothing done (the floor
//! any unary call pays). And, after the agent's phase, one thread wakes another sleeping on
//! a `Condvar` at the same pace: what each hand-over between threads costs on this machine
//! (a write crosses about four: client → agent, agent → writer thread, writer → agent, agent
//! → client).

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::{
    Health, Machine, MachineState, UpsertMachineRequest, WatchRequest, machine_change,
    watch_response,
};

use patina_proto::v1::region_client::RegionClient;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use crate::harness::percentile_us;

/// Writes per second: a steady trickle, like a region's orchestrator reporting state
/// changes; far below what group commit needs to batch, so each write pays its own commit.
pub const PACE_PER_S: u64 = 100;
/// Writes sent (and not measured) first: connections, HTTP/2 windows and the store's first
/// pages warm up.
const WARMUP: u64 = 50;
/// Distinct machines the writes cycle through: a typical app's size.
const MACHINES: u64 = 20;
/// The metadata key that carries a write's sequence number to the watcher.
const SEQ_KEY: &str = "bench-seq";
/// The app the writes go to.
const APP: &str = "latency-app";
/// Bytes appended per baseline tick: about what one small commit adds to SQLite's WAL (a
/// page or a few), and the size the fdatasync probe used.
const PROBE_BYTES: usize = 4096;
/// How long the watcher may go without the change it waits for before the phase fails: a
/// write that never reaches its watcher is a bug, not a slow sample.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the latency phase measured.
pub struct Latencies {
    pub agent: WriteLatencies,
    /// One `fdatasync` of a 4 KiB append, same pace, same disk; sorted nanoseconds.
    pub fsync_ns: Vec<u64>,
    /// One thread waking another sleeping on a `Condvar`, same pace; sorted nanoseconds.
    pub wake_ns: Vec<u64>,
}

impl Latencies {
    /// Table rows and JSON keys.
    pub fn report(&self, rows: &mut Vec<(String, String)>, json: &mut super::Json) {
        let n = self.agent.watch_ns.len();
        for (label, key, ns) in [
            (
                format!("disk: fdatasync of a 4 KiB append, {PACE_PER_S}/s,"),
                "fsync",
                &self.fsync_ns,
            ),
            (
                format!("gRPC round trip (health check), {PACE_PER_S}/s,"),
                "rpc_floor",
                &self.agent.rpc_ns,
            ),
            (
                format!("thread wake-up (Condvar), {PACE_PER_S}/s,"),
                "thread_wake",
                &self.wake_ns,
            ),
            (
                format!("upsert → watcher, {PACE_PER_S}/s, {n} writes,"),
                "watch_latency",
                &self.agent.watch_ns,
            ),
            (
                format!("upsert → ack, {PACE_PER_S}/s,"),
                "upsert_ack",
                &self.agent.ack_ns,
            ),
        ] {
            let (p50, p99) = (percentile_us(ns, 50.0), percentile_us(ns, 99.0));
            rows.push((
                format!("{label} p50 / p99"),
                format!("{p50:.0} / {p99:.0} µs"),
            ));
            json.insert(format!("{key}_p50_us"), super::round2(p50));
            json.insert(format!("{key}_p99_us"), super::round2(p99));
        }
        let over = percentile_us(&self.agent.watch_ns, 99.0) - percentile_us(&self.fsync_ns, 99.0);
        rows.push((
            "upsert → watcher p99 beyond fdatasync p99".into(),
            format!("{over:.0} µs"),
        ));
        // What is left at p50 once the disk and the round trip every call pays are taken off:
        // the writer thread's two hand-overs and the agent's own work.
        let own = percentile_us(&self.agent.watch_ns, 50.0)
            - percentile_us(&self.fsync_ns, 50.0)
            - percentile_us(&self.agent.rpc_ns, 50.0);
        rows.push((
            "upsert → watcher p50 beyond fdatasync p50 + round trip p50".into(),
            format!("{own:.0} µs"),
        ));
        json.insert("watch_beyond_floors_p50_us".into(), super::round2(own));
        json.insert("latency_samples".into(), (n as u64).into());
        if self.agent.missed > 0 {
            rows.push((
                "writes the watcher saw only coalesced".into(),
                self.agent.missed.to_string(),
            ));
        }
    }
}

/// The baseline: `samples` appends of [`PROBE_BYTES`] to a file in `dir`, each followed by
/// `fdatasync`, at [`PACE_PER_S`]. Unsorted nanoseconds. Blocking.
pub fn fdatasync_baseline(dir: &Path, samples: u64) -> anyhow::Result<Vec<u64>> {
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::File::options()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let block = vec![0x5a_u8; PROBE_BYTES];
    let tick = Duration::from_secs(1) / PACE_PER_S as u32;
    let start = Instant::now();
    let mut ns = Vec::with_capacity(samples as usize);
    for k in 0..WARMUP + samples {
        if let Some(wait) = (start + tick * k as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        file.write_all(&block)?;
        let t = Instant::now();
        file.sync_data()?;
        if k >= WARMUP {
            ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(ns)
}

/// The hand-over baseline: `samples` times, at [`PACE_PER_S`], this thread wakes another
/// that sleeps on a `Condvar`; the time from just before the notification until the other
/// thread runs. Sorted nanoseconds. Blocking.
pub fn thread_wake_baseline(samples: u64) -> Vec<u64> {
    // (the moment of the latest notification, if not yet taken; stop)
    let shared = Arc::new((Mutex::new((None::<Instant>, false)), Condvar::new()));
    let other = shared.clone();
    let sleeper = std::thread::spawn(move || {
        let (lock, cv) = &*other;
        let mut ns = Vec::with_capacity(samples as usize);
        let mut slot = lock.lock().expect("wake lock");
        loop {
            if let Some(t) = slot.0.take() {
                ns.push(t.elapsed().as_nanos() as u64);
            }
            if slot.1 {
                break;
            }
            slot = cv.wait(slot).expect("wake lock");
        }
        ns
    });
    let tick = Duration::from_secs(1) / PACE_PER_S as u32;
    let start = Instant::now();
    let (lock, cv) = &*shared;
    for k in 0..WARMUP + samples {
        if let Some(wait) = (start + tick * k as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let mut slot = lock.lock().expect("wake lock");
        // Warm-up notifications are taken but not stamped.
        slot.0 = (k >= WARMUP).then(Instant::now);
        cv.notify_one();
    }
    // Let the last one be taken before asking the thread to stop.
    std::thread::sleep(tick);
    lock.lock().expect("wake lock").1 = true;
    cv.notify_one();
    let mut ns = sleeper.join().expect("the sleeping thread panicked");
    ns.sort_unstable();
    ns
}

/// The agent's side of the phase, each sorted in nanoseconds.
pub struct WriteLatencies {
    /// From just before UpsertMachine is sent until the watcher receives the change.
    pub watch_ns: Vec<u64>,
    /// From just before UpsertMachine is sent until it returns.
    pub ack_ns: Vec<u64>,
    /// A health check on the writer's connection, half a tick after each write.
    pub rpc_ns: Vec<u64>,
    /// Writes the watcher never saw on their own (coalesced with a later write of the same
    /// machine, which only a watcher lagging by [`MACHINES`] writes can see).
    pub missed: u64,
}

fn machine(seq: u64) -> Machine {
    Machine {
        id: format!("lat-{:02}", seq % MACHINES),
        app: APP.into(),
        addresses: vec![format!("10.9.0.{}:8080", seq % MACHINES)],
        state: MachineState::Started as i32,
        health: Health::Passing as i32,
        metadata: [(SEQ_KEY.to_owned(), seq.to_string())]
            .into_iter()
            .collect(),
        ..Machine::default()
    }
}

/// Watch [`APP`] on `url` while another connection upserts `samples` machines of it at
/// [`PACE_PER_S`] (after [`WARMUP`] unmeasured ones). Returns the watch and ack latencies.
/// Run it on a current-thread runtime of its own: the clients' tasks (writer, watcher, both
/// connections) then hand over to each other without waking another thread, as a simple
/// client does, and a thread hop of the load generator is not measured as the agent's.
pub async fn write_to_watcher(url: &str, samples: u64) -> anyhow::Result<WriteLatencies> {
    let total = WARMUP + samples;
    let mut watcher = super::connect(url).await?;
    let channel = Channel::from_shared(url.to_owned())?.connect().await?;
    let mut writer = RegionClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let mut stream = watcher
        .watch(WatchRequest {
            app: APP.into(),
            resume_token: String::new(),
            heartbeat_ms: 0,
        })
        .await?
        .into_inner();
    // The snapshot (of nothing, or of a previous run's machines) first.
    loop {
        let msg = stream
            .message()
            .await?
            .context("watch ended in its snapshot")?;
        if msg.kind == watch_response::Kind::SnapshotDone as i32 {
            break;
        }
    }
    // The watcher stamps each change as it arrives and hands the stamps back at the end.
    let received = tokio::spawn(async move {
        let mut at: HashMap<u64, Instant> = HashMap::with_capacity(total as usize);
        // Changes arrive in revision order, so once the last write is in, every other one
        // is too (or was coalesced with a later write of its machine: counted as missed).
        while !at.contains_key(&(total - 1)) {
            let msg = tokio::time::timeout(DELIVERY_TIMEOUT, stream.message())
                .await
                .context("no change reached the watcher in time")??
                .context("watch ended")?;
            let now = Instant::now();
            for change in msg.changes {
                let Some(machine_change::Change::Upserted(m)) = change.change else {
                    continue;
                };
                if let Some(seq) = m.metadata.get(SEQ_KEY).and_then(|s| s.parse().ok()) {
                    at.entry(seq).or_insert(now);
                }
            }
        }
        anyhow::Ok(at)
    });
    let tick = Duration::from_secs(1) / PACE_PER_S as u32;
    let start = tokio::time::Instant::now();
    let mut sent = Vec::with_capacity(total as usize);
    let mut ack_ns = Vec::with_capacity(samples as usize);
    let mut rpc_ns = Vec::with_capacity(samples as usize);
    for seq in 0..total {
        tokio::time::sleep_until(start + tick * seq as u32).await;
        let request = UpsertMachineRequest {
            machine: Some(machine(seq)),
        };
        let t = Instant::now();
        writer.upsert_machine(request).await?;
        let acked = t.elapsed();
        sent.push(t);
        if seq >= WARMUP {
            ack_ns.push(acked.as_nanos() as u64);
        }
        // The floor, half a tick later (the write's watcher has long had it by then).
        tokio::time::sleep_until(start + tick * seq as u32 + tick / 2).await;
        let t = Instant::now();
        health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?;
        if seq >= WARMUP {
            rpc_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    let at = received.await??;
    let mut watch_ns = Vec::with_capacity(samples as usize);
    let mut missed = 0;
    for (seq, t) in sent.iter().enumerate().skip(WARMUP as usize) {
        match at.get(&(seq as u64)) {
            Some(r) => watch_ns.push(r.duration_since(*t).as_nanos() as u64),
            None => missed += 1,
        }
    }
    if watch_ns.is_empty() {
        bail!("no measured write reached the watcher");
    }
    watch_ns.sort_unstable();
    ack_ns.sort_unstable();
    rpc_ns.sort_unstable();
    Ok(WriteLatencies {
        watch_ns,
        ack_ns,
        rpc_ns,
        missed,
    })
}
