//! `cargo xtask bench propagation [--nodes N] [--writes N] [--kills N] [--idle-secs S]
//! [--skip-sim | --sim-only | --wan-only] [--store-dir DIR]`: how fast a region of real agents (release build, loopback) spreads a write
//! and the news of a crash, how often healthy members are falsely declared down (idle, and
//! with one member starved by SIGSTOP/SIGCONT cycles), what gossip costs in bandwidth, and the
//! deterministic simulation's figures at 100 and 1,000 nodes.
//!
//! Baselines in the same run: the loopback round trip of one gRPC call (the floor of "write
//! to everywhere"), and the configured failure-detection budget (probe period + suspicion
//! minimum) beside "crash to excluded". The same region runs again in plaintext, and again
//! with the operator's listener off (`metrics.listen = "off"`) for what metrics cost: the
//! first pass scrapes every agent's `/metrics` every second while it writes. Last line: one
//! JSON object. With `--store-dir DIR` (a tmpfs), write to everywhere runs once more with
//! every agent's store in DIR, beside the shared disk's figure and its fdatasync p99.
//! `--wan-only`: only the simulated WAN world (2,000 edges, 19 regions' bridges), with tree
//! dissemination and plain gossip in one run (`PATINA_WAN_MODES=tree` or `plain` runs one).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::{
    ClusterStatusRequest, MembersRequest, UpsertMachineRequest, WatchRequest, machine_change,
};
use patina_testkit::secure::Secure;
use patina_testkit::{Agent, machine};
use tonic::transport::Channel;

use crate::cluster::start_agent;
use crate::harness::{build_patina, percentile as pct};

pub struct Options {
    nodes: usize,
    writes: usize,
    kills: usize,
    idle_secs: u64,
    sim: bool,
    /// Only the simulation's figures (no agents).
    sim_only: bool,
    /// Only the WAN world's simulation figures.
    wan_only: bool,
    /// Run write-to-everywhere once more with the agents' stores here (a tmpfs, to take the
    /// one shared disk out of the figure).
    store_dir: Option<std::path::PathBuf>,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            nodes: 20,
            writes: 1000,
            kills: 10,
            idle_secs: 300,
            sim: true,
            sim_only: false,
            wan_only: false,
            store_dir: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if *a == "--skip-sim" {
                o.sim = false;
                continue;
            }
            if *a == "--sim-only" {
                o.sim_only = true;
                continue;
            }
            if *a == "--wan-only" {
                o.wan_only = true;
                continue;
            }
            if *a == "--store-dir" {
                let dir = it.next().context("--store-dir needs a directory")?;
                o.store_dir = Some(std::path::PathBuf::from(dir));
                continue;
            }
            let v: u64 = it.next().context("missing value")?.parse()?;
            match *a {
                "--nodes" => o.nodes = v as usize,
                "--writes" => o.writes = v as usize,
                "--kills" => o.kills = v as usize,
                "--idle-secs" => o.idle_secs = v,
                other => bail!("unknown option {other}"),
            }
        }
        if o.nodes < 3 || o.nodes > 250 {
            bail!("--nodes must be between 3 and 250");
        }
        Ok(o)
    }
}

/// What one agent's whole-region watch has seen: first upsert and first removal per id.
#[derive(Default)]
struct Seen {
    upserted: HashMap<String, Instant>,
    removed: HashMap<String, Instant>,
}

type SeenRef = Arc<Mutex<Seen>>;

/// A channel to `url`, through `dial` (TLS with the harness's certificate) when given.
async fn channel(dial: &Option<patina_trust::Dial>, url: &str) -> anyhow::Result<Channel> {
    let endpoint = Channel::from_shared(url.to_owned())?;
    Ok(match dial {
        Some(d) => d.connect(endpoint).await?,
        None => endpoint.connect().await?,
    })
}

async fn watch_all(url: String, seen: SeenRef, dial: Option<patina_trust::Dial>) {
    let Ok(channel) = channel(&dial, &url).await else {
        return;
    };
    let mut client = patina_proto::v1::region_client::RegionClient::new(channel);
    let Ok(stream) = client
        .watch(WatchRequest {
            app: "bench".into(),
            resume_token: String::new(),
            heartbeat_ms: 0,
        })
        .await
    else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(msg)) = stream.message().await {
        let now = Instant::now();
        let mut s = seen.lock().expect("seen lock");
        for c in msg.changes {
            match c.change {
                Some(machine_change::Change::Upserted(m)) => {
                    s.upserted.entry(m.id).or_insert(now);
                }
                Some(machine_change::Change::Deleted(d)) => {
                    s.removed.entry(d.id).or_insert(now);
                }
                None => {}
            }
        }
    }
}

struct Cluster {
    bin: std::path::PathBuf,
    root: std::path::PathBuf,
    agents: Vec<Option<Agent>>,
    seen: Vec<SeenRef>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    /// The CA and client when security is on.
    secure: Option<Secure>,
    /// The operator's listener on (scraped while writes run) or off.
    metrics: bool,
}

impl Cluster {
    /// Start agent `i` (again): with its certificate and the gossip key when secure.
    fn start(&self, i: usize) -> anyhow::Result<Agent> {
        let metrics = crate::world::metrics_off(self.metrics);
        let Some(s) = &self.secure else {
            return start_agent(&self.bin, &self.root, i, metrics);
        };
        let dir = self.root.join(format!("agent-{}", i + 1));
        let extra =
            s.agent_config(&dir, &crate::cluster::ip(i), Secure::region_agent("test")) + metrics;
        Ok(start_agent(&self.bin, &self.root, i, &extra)?.with_dial(s.dial.clone()))
    }

    fn dial(&self) -> Option<patina_trust::Dial> {
        self.secure.as_ref().map(|s| s.dial.clone())
    }

    fn agent(&self, i: usize) -> &Agent {
        self.agents[i].as_ref().expect("running")
    }

    fn watch(&mut self, i: usize) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        self.seen[i] = seen.clone();
        let url = self.agent(i).url.clone();
        self.watchers[i] = tokio::spawn(watch_all(url, seen, self.dial()));
    }

    async fn wait_joined(&self, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let n = self.agents.len();
        loop {
            let mut ok = true;
            for i in 0..n {
                if self.agents[i].is_some() && self.agent(i).alive_members().await != n - 1 {
                    ok = false;
                    break;
                }
            }
            if ok {
                return Ok(());
            }
            if start.elapsed() > within {
                bail!("the cluster did not form within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Bytes sent and received by every agent's gossip (datagrams) so far.
    async fn bytes(&self) -> (u64, u64) {
        let (mut out, mut inn) = (0, 0);
        for a in self.agents.iter().flatten() {
            let mut admin = a.admin().await;
            if let Ok(r) = admin.cluster_status(ClusterStatusRequest {}).await {
                let r = r.into_inner();
                out += r.bytes_out;
                inn += r.bytes_in;
            }
        }
        (out, inn)
    }

    /// Anti-entropy sessions ended so far over every live agent (each session counts at both
    /// its ends): (all, failed after they began, never began).
    async fn sync_counts(&self) -> (u64, u64, u64) {
        let (mut all, mut failed, mut unstarted) = (0, 0, 0);
        for a in self.agents.iter().flatten() {
            let mut admin = a.admin().await;
            if let Ok(r) = admin.cluster_status(ClusterStatusRequest {}).await {
                let r = r.into_inner();
                all += r.syncs;
                failed += r.sync_failures;
                unstarted += r.sync_unstarted;
            }
        }
        (all, failed, unstarted)
    }

    /// The highest local-health score of any agent.
    async fn max_health(&self) -> u32 {
        let mut h = 0;
        for a in self.agents.iter().flatten() {
            let mut admin = a.admin().await;
            if let Ok(r) = admin.cluster_status(ClusterStatusRequest {}).await {
                h = h.max(r.into_inner().health);
            }
        }
        h
    }

    /// Epochs of every member as every agent sees them: a member falsely declared down
    /// rejoins under a higher epoch.
    async fn epochs(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for a in self.agents.iter().flatten() {
            let mut admin = a.admin().await;
            if let Ok(r) = admin.members(MembersRequest {}).await {
                let r = r.into_inner();
                for m in r.members.iter().chain(r.this.iter()) {
                    let e = out.entry(m.address.clone()).or_insert(0);
                    *e = (*e).max(m.epoch);
                }
            }
        }
        out
    }

    /// Count members seen down or suspect by any agent, polling for `secs`; returns the
    /// distinct (observer, member, epoch) downs and the epochs that rose (renewals).
    async fn false_downs(&self, secs: u64, exclude: Option<&str>) -> (usize, usize) {
        let before = self.epochs().await;
        let mut downs = std::collections::BTreeSet::new();
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            for (i, a) in self.agents.iter().enumerate() {
                let Some(a) = a else { continue };
                let mut admin = a.admin().await;
                let Ok(Ok(r)) =
                    tokio::time::timeout(Duration::from_secs(2), admin.members(MembersRequest {}))
                        .await
                else {
                    continue;
                };
                for m in r.into_inner().members {
                    if m.state == "down" && Some(m.address.as_str()) != exclude {
                        downs.insert((i, m.address, m.epoch));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let after = self.epochs().await;
        let renewed = after
            .iter()
            .filter(|(addr, e)| {
                Some(addr.as_str()) != exclude && before.get(*addr).is_some_and(|b| *e > b)
            })
            .count();
        (downs.len(), renewed)
    }
}

/// The loopback round trip of one gRPC call to an agent (a list of an empty app).
async fn grpc_rtt_us(agent: &Agent) -> f64 {
    let mut client = agent.client().await;
    let mut samples = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let _ = client
            .list_instances(patina_proto::v1::ListInstancesRequest {
                app: "none".into(),
                ..Default::default()
            })
            .await;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    samples.sort_by(f64::total_cmp);
    pct(&samples, 50.0)
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if o.wan_only {
        let mut json = serde_json::json!({});
        wan_figures(&mut json);
        println!("{json}");
        return Ok(());
    }
    if o.sim_only {
        let mut json = serde_json::json!({});
        sim_figures(&mut json);
        println!("{json}");
        return Ok(());
    }
    let bin = build_patina()?;
    let root = crate::bench_store::tempdir()?.join("propagation");
    let _ = std::fs::remove_dir_all(&root);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Security on (mTLS and encrypted gossip, as agents run by default); then, in the same
    // run, the same region in plaintext for the figures security could cost: write to
    // everywhere, crash to excluded, idle bandwidth.
    let result = rt.block_on(bench(&o, bin.clone(), root.clone(), true, true));
    let _ = std::fs::remove_dir_all(&root);
    let mut json = result?;
    let plain = rt.block_on(bench(&o, bin.clone(), root.clone(), false, true));
    let _ = std::fs::remove_dir_all(&root);
    let plain = plain?;
    // And with the operator's listener off, for what metrics cost (the first pass scraped
    // every agent every second while it wrote).
    let off = rt.block_on(bench(&o, bin.clone(), root.clone(), true, false));
    let _ = std::fs::remove_dir_all(&root);
    let off = off?;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let (on99, off99) = (
        f(&json, "write_to_all_p99_ms"),
        f(&off, "write_to_all_p99_ms"),
    );
    println!(
        "metrics on (every agent scraped every second) vs off: write to everywhere p99 {on99:.2} vs {off99:.2} ms ({:.3}x), p50 {:.2} vs {:.2} ms",
        on99 / off99,
        f(&json, "write_to_all_p50_ms"),
        f(&off, "write_to_all_p50_ms"),
    );
    json["metrics_off_write_to_all_p50_ms"] = off["write_to_all_p50_ms"].clone();
    json["metrics_off_write_to_all_p99_ms"] = off["write_to_all_p99_ms"].clone();
    // The same pass (security on, metrics off) with every store on --store-dir: on a tmpfs,
    // what the agents themselves take, without 20 agents' fsyncs queued on one disk.
    if let Some(dir) = &o.store_dir {
        let root = dir.join("patina-propagation");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)?;
        println!(
            "the same pass with every agent's store in {}:",
            dir.display()
        );
        let t = rt.block_on(bench(&o, bin, root.clone(), true, false));
        let _ = std::fs::remove_dir_all(&root);
        let t = t?;
        let (disk99, dir99) = (f(&off, "write_to_all_p99_ms"), f(&t, "write_to_all_p99_ms"));
        let fsync99 = f(&json, "fsync_p99_us") / 1000.0;
        let modelled = dir99 + 2.0 * fsync99;
        println!(
            "write to everywhere p99, {} agents: one shared disk {disk99:.2} ms; stores in {} {dir99:.2} ms; \
             fdatasync p99 of the disk {fsync99:.2} ms; one disk per host (that + 2 fdatasyncs, one per hop) {modelled:.2} ms (goal <= 20 ms)",
            o.nodes,
            dir.display()
        );
        json["store_dir_write_to_all_p50_ms"] = t["write_to_all_p50_ms"].clone();
        json["store_dir_write_to_all_p99_ms"] = t["write_to_all_p99_ms"].clone();
        json["one_disk_per_host_write_to_all_p99_ms"] = modelled.into();
    }
    println!(
        "security on vs plaintext: write to everywhere p99 {:.2} vs {:.2} ms; crash to excluded p50 {:.0} vs {:.0} ms; idle gossip {:.0} vs {:.0} B/s per node",
        json["write_to_all_p99_ms"].as_f64().unwrap_or(f64::NAN),
        plain["write_to_all_p99_ms"].as_f64().unwrap_or(f64::NAN),
        json["crash_to_excluded_p50_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        plain["crash_to_excluded_p50_ms"]
            .as_f64()
            .unwrap_or(f64::NAN),
        json["idle_bytes_per_s_per_node"]
            .as_f64()
            .unwrap_or(f64::NAN),
        plain["idle_bytes_per_s_per_node"]
            .as_f64()
            .unwrap_or(f64::NAN),
    );
    for k in [
        "write_to_all_p50_ms",
        "write_to_all_p99_ms",
        "crash_to_excluded_p50_ms",
        "crash_to_excluded_p99_ms",
        "idle_bytes_per_s_per_node",
        "grpc_rtt_us",
    ] {
        json[format!("plaintext_{k}")] = plain[k].clone();
    }
    if o.sim {
        sim_figures(&mut json);
    }
    if !o.sim {
        json["sim_rounds_10000"] = serde_json::Value::Null;
    }
    println!("{json}");
    Ok(())
}

/// The WAN world's figures (issue 20, item 6), printed and added to `json`.
fn wan_figures(json: &mut serde_json::Value) {
    let edges = 2000;
    let t = std::time::Instant::now();
    println!(
        "simulation, WAN world ({edges} edges and 19 regions' bridges, one-way 4 ms + km/75 per ms), one change from each bridge:"
    );
    // `PATINA_WAN_MODES=tree` (or `plain`) runs one of the two (each takes minutes).
    let only = std::env::var("PATINA_WAN_MODES").ok();
    for (name, mode) in [
        ("tree", patina_gossip::Dissemination::Tree),
        ("plain", patina_gossip::Dissemination::Push),
    ] {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|m| m == name))
        {
            continue;
        }
        let cfg = patina_gossip::Config {
            dissemination: mode,
            ..crate::sim_figures::wan_config()
        };
        let f = crate::sim_figures::wan_spread(edges, cfg, 7, 0);
        let r = crate::sim_figures::ratios(&f.changes);
        let r1 = crate::sim_figures::ratios(&f.first);
        println!(
            "  {name}: 99.9 % of edges within {:.2}x (median) / {:.2}x (worst) the one-way floor to the farthest edge ({:.2}x / {:.2}x for each bridge's first change); {:.0} B per change per node; idle {:.0} B/s per node; {} prunes and {} grafts sent, {} inbound links replaced; membership {}/{} ({:.0} s)",
            r[r.len() / 2],
            r[r.len() - 1],
            r1[r1.len() / 2],
            r1[r1.len() - 1],
            f.bytes_per_change_per_node,
            f.idle_bytes_per_s,
            f.prunes,
            f.grafts,
            f.inbound_replaced,
            f.converged,
            f.nodes,
            t.elapsed().as_secs_f64()
        );
        for (b, c) in f.changes.iter().enumerate() {
            println!(
                "    {}: 99.9 % {:.1} ms (50 % {:.1}, 90 % {:.1}), floor {:.1} ms; first change 99.9 % {:.1} ms",
                crate::sim_figures::WAN_REGIONS[b].0,
                c.p999,
                c.p50,
                c.p90,
                c.floor,
                f.first[b].p999
            );
        }
        json[format!("wan_{name}_ratio_median")] = r[r.len() / 2].into();
        json[format!("wan_{name}_ratio_worst")] = r[r.len() - 1].into();
        json[format!("wan_{name}_bytes_per_change_per_node")] = f.bytes_per_change_per_node.into();
        json[format!("wan_{name}_first_ratio_worst")] = r1[r1.len() - 1].into();
        json[format!("wan_{name}_inbound_replaced")] = f.inbound_replaced.into();
    }
}

/// The simulation's figures, printed and added to `json`.
fn sim_figures(json: &mut serde_json::Value) {
    let (r100, t100, b100) = crate::sim_figures::spread(100, 1);
    let (r1000, t1000, b1000) = crate::sim_figures::spread(1000, 1);
    println!(
        "simulation (LAN model, 50-250 µs one way), time until 99.9 % of nodes hold a change:"
    );
    println!("  100 nodes: {t100:.1} ms ({r100} probe periods), {b100:.0} B/s per node");
    println!("  1000 nodes: {t1000:.1} ms ({r1000} probe periods), {b1000:.0} B/s per node");
    // 10,000 nodes: the dissemination model (the full simulation would hold 10^8
    // members), checked against the full simulation at 100 and 1,000.
    let (m100, mt100, _) = crate::sim_figures::dissemination_model(100, 1);
    let (m1000, mt1000, _) = crate::sim_figures::dissemination_model(1000, 1);
    let (m10000, mt10000, md10000) = crate::sim_figures::dissemination_model(10_000, 1);
    println!(
        "  10000 nodes (dissemination model, converged membership): {mt10000:.1} ms ({m10000} probe periods), {md10000:.1} datagrams per node for one change; the model gives {mt100:.1} ms ({m100}) at 100 and {mt1000:.1} ms ({m1000}) at 1000, beside the full simulation's figures above"
    );
    json["sim_rounds_10000"] = m10000.into();
    json["sim_ms_10000"] = mt10000.into();
    json["sim_10000_source"] = "dissemination model".into();
    json["sim_model_ms_100"] = mt100.into();
    json["sim_model_ms_1000"] = mt1000.into();
    let attend =
        patina_gossip::Config::lan(patina_gossip::ClusterName::new("sim").expect("name")).attend;
    let (d50, d99, dmax) = crate::sim_figures::crash_to_excluded(20, 100, attend);
    let (u50, u99, umax) = crate::sim_figures::crash_to_excluded(20, 100, 0);
    println!(
        "  crash to excluded, 20 nodes, 100 seeds (10 ms steps): p50 {d50:.0} ms, p99 {d99:.0} ms, max {dmax:.0} ms; without attendance (SWIM probes alone) p50 {u50:.0} ms, p99 {u99:.0} ms, max {umax:.0} ms"
    );
    json["sim_crash_to_excluded_p50_ms"] = d50.into();
    json["sim_crash_to_excluded_p99_ms"] = d99.into();
    json["sim_crash_to_excluded_unattended_p50_ms"] = u50.into();
    json["sim_crash_to_excluded_unattended_p99_ms"] = u99.into();
    json["sim_rounds_100"] = r100.into();
    json["sim_ms_100"] = t100.into();
    json["sim_rounds_1000"] = r1000.into();
    json["sim_ms_1000"] = t1000.into();
    json["sim_bytes_per_s_per_node_1000"] = b1000.into();
}

/// The benchmark over a region of real agents, security on (`secure`) or in plaintext. The
/// plaintext pass stops after crash to excluded (what security could change); the secure
/// one goes on to the false-down phases.
async fn bench(
    o: &Options,
    bin: std::path::PathBuf,
    root: std::path::PathBuf,
    secure: bool,
    metrics: bool,
) -> anyhow::Result<serde_json::Value> {
    let n = o.nodes;
    println!(
        "{}",
        match (secure, metrics) {
            (true, true) => "security on: mTLS and encrypted gossip",
            (false, _) => "plaintext, for comparison",
            (true, false) =>
                "security on, metrics off (the operator's listener off), for comparison",
        }
    );
    let mut c = Cluster {
        bin,
        root,
        agents: Vec::new(),
        seen: (0..n).map(|_| Arc::default()).collect(),
        watchers: (0..n).map(|_| tokio::spawn(async {})).collect(),
        secure: secure.then(|| Secure::new(&["test".to_owned()])),
        metrics,
    };
    for i in 0..n {
        let agent = c.start(i)?;
        c.agents.push(Some(agent));
    }
    c.wait_joined(Duration::from_secs(60)).await?;
    println!("{n} agents joined");
    for i in 0..n {
        c.watch(i);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rtt = grpc_rtt_us(c.agent(0)).await;
    // The other baseline of "write to everywhere": one fdatasync on the agents' disk (each
    // agent commits every write with one before its watchers see it).
    let mut fsync_ns = {
        let dir = c.root.clone();
        tokio::task::spawn_blocking(move || {
            crate::bench_store::latency::fdatasync_baseline(&dir, 200)
        })
        .await??
    };
    fsync_ns.sort_unstable();
    let fsync_us: Vec<f64> = fsync_ns.iter().map(|n| *n as f64 / 1e3).collect();
    let (fsync_p50, fsync_p99) = (pct(&fsync_us, 50.0), pct(&fsync_us, 99.0));
    // Idle bandwidth, before any write: probes, acks and periodic gossip only.
    let (o0, i0) = c.bytes().await;
    let idle_window = Duration::from_secs(10);
    tokio::time::sleep(idle_window).await;
    let (o1, i1) = c.bytes().await;
    let idle = (o1 - o0 + i1 - i0) as f64 / 2.0 / idle_window.as_secs_f64() / n as f64;

    // Renewals while writes and load run: a member falsely declared down rejoins under a
    // higher epoch (counted after the load, below).
    let epochs_before_load = c.epochs().await;
    // The highest local-health score any agent reports while writes and load run: how late
    // the agents' own loops are (they share two cores here).
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let urls: Vec<String> = c.agents.iter().flatten().map(|a| a.url.clone()).collect();
        let sampling = sampling.clone();
        let dial = c.dial();
        tokio::spawn(async move {
            let mut worst = 0u32;
            let mut refuted = 0u64;
            let mut clients = Vec::new();
            for u in urls {
                if let Ok(ch) = channel(&dial, &u).await {
                    clients.push(patina_proto::v1::admin_client::AdminClient::new(ch));
                }
            }
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                for c in &mut clients {
                    if let Ok(Ok(r)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        c.cluster_status(ClusterStatusRequest {}),
                    )
                    .await
                    {
                        let r = r.into_inner();
                        worst = worst.max(r.health);
                        refuted = refuted.max(r.refuted_for_others);
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (worst, refuted)
        })
    };

    // With metrics on, every agent is scraped every second while writes run, as a busy
    // Prometheus would.
    let scraper = metrics.then(|| {
        let urls: Vec<String> = c.agents.iter().flatten().map(Agent::metrics_url).collect();
        crate::harness::Scraper::start(urls, Duration::from_secs(1))
    });
    // Write to everywhere: writers at random agents; latency from the acknowledgement to
    // the last agent's watch showing it.
    let writers = 4;
    let per = o.writes.div_ceil(writers);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let urls: Vec<String> = c.agents.iter().flatten().map(|a| a.url.clone()).collect();
        let dial = c.dial();
        tasks.spawn(async move {
            let mut clients = Vec::new();
            for u in &urls {
                let ch = channel(&dial, u).await.expect("connect");
                clients.push(patina_proto::v1::region_client::RegionClient::new(ch));
            }
            let mut acks = Vec::new();
            for k in 0..per {
                let i = (w * 7919 + k * 31) % clients.len();
                let id = format!("w{w}-{k}");
                let r = clients[i]
                    .upsert_machine(UpsertMachineRequest {
                        machine: Some(machine(&id, "bench", 8080)),
                    })
                    .await;
                if r.is_ok() {
                    acks.push((id, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            acks
        });
    }
    let mut acks = Vec::new();
    while let Some(r) = tasks.join_next().await {
        acks.extend(r?);
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut lat = Vec::new();
    let mut lost = 0usize;
    for (id, acked) in &acks {
        let mut last = Duration::ZERO;
        let mut missing = false;
        for s in &c.seen {
            match s.lock().expect("seen").upserted.get(id) {
                Some(t) => last = last.max(t.saturating_duration_since(*acked)),
                None => missing = true,
            }
        }
        if missing {
            lost += 1;
        } else {
            lat.push(last.as_secs_f64() * 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "write to everywhere ({} writes, {n} agents): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, lost {lost} (baselines: one gRPC round trip {:.0} µs; one fdatasync on the agents' disk, idle, p50 {:.0} µs, p99 {:.0} µs, and every write costs one per agent on that one disk)",
        acks.len(),
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        pct(&lat, 100.0),
        rtt,
        fsync_p50,
        fsync_p99
    );

    if let Some(scraper) = scraper {
        println!(
            "  (metrics on: {} scrapes answered while writing)",
            scraper.scrapes()
        );
    }
    if !metrics {
        sampling.store(false, std::sync::atomic::Ordering::Relaxed);
        let _ = sampler.await;
        for w in &c.watchers {
            w.abort();
        }
        return Ok(serde_json::json!({
            "write_to_all_p50_ms": pct(&lat, 50.0),
            "write_to_all_p99_ms": pct(&lat, 99.0),
        }));
    }
    // Bandwidth under load (idle was measured before any write).
    let loaded_secs = 5u64;
    let rate = 1000u64;
    let url = c.agent(2).url.clone();
    let dial = c.dial();
    let load = tokio::spawn(async move {
        let ch = channel(&dial, &url).await.expect("connect");
        let mut client = patina_proto::v1::region_client::RegionClient::new(ch);
        let start = Instant::now();
        for k in 0..rate * loaded_secs {
            let due = start + Duration::from_micros(k * 1_000_000 / rate);
            tokio::time::sleep_until(due.into()).await;
            let _ = client
                .upsert_machine(UpsertMachineRequest {
                    machine: Some(machine(&format!("load-{}", k % 500), "load", 8080)),
                })
                .await;
        }
    });
    let (o2, i2) = c.bytes().await;
    let (s2, f2, u2) = c.sync_counts().await;
    let t = Instant::now();
    load.await?;
    let (o3, i3) = c.bytes().await;
    // Sessions still running at the end of the load finish within a second or two.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (s3, f3, u3) = c.sync_counts().await;
    let (sync_sessions, sync_failed, sync_unstarted) = (s3 - s2, f3 - f2, u3 - u2);
    println!(
        "anti-entropy sessions under {rate} writes/s (ends at both sides, over {n} agents): {sync_sessions} ended, {sync_failed} failed, {sync_unstarted} never began"
    );
    let loaded = (o3 - o2 + i3 - i2) as f64 / 2.0 / t.elapsed().as_secs_f64() / n as f64;
    println!(
        "gossip bandwidth per node (mean of sent and received): idle {idle:.0} B/s, under {rate} writes/s {loaded:.0} B/s"
    );

    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let (health_under_load, most_refuted) = sampler.await.unwrap_or((0, 0));
    println!(
        "highest local-health score while writing and under load: {health_under_load} (0 is healthy; each point is a late timer or a missed ack, and stretches this agent's timers); most suspicions one agent refuted for members that answered its last check: {most_refuted}"
    );
    // Let local health settle after the load (agents share two cores here, so the load
    // made their timers late), and report it: it stretches failure detection.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let health = c.max_health().await;
    let epochs_after_load = c.epochs().await;
    let false_downs_loaded = epochs_after_load
        .iter()
        .filter(|(addr, e)| epochs_before_load.get(*addr).is_some_and(|b| *e > b))
        .count();
    println!(
        "false downs while writing and under {rate} writes/s: {false_downs_loaded} members renewed (declared down and rejoined)"
    );
    println!(
        "highest local-health score before the kills: {health} (0 is healthy; timers stretch by 1 + score)"
    );
    // Crash to excluded.
    let mut crash = Vec::new();
    let bar = crate::harness::progress(o.kills as u64, "kills");
    for k in 0..o.kills {
        bar.inc(1);
        let victim = 2 + k % (n - 2);
        let id = format!("own-{k}");
        {
            let mut client = c.agent(victim).client().await;
            client
                .upsert_machine(UpsertMachineRequest {
                    machine: Some(machine(&id, "bench", 9090)),
                })
                .await?;
        }
        let visible = Instant::now();
        while c
            .seen
            .iter()
            .any(|s| !s.lock().expect("seen").upserted.contains_key(&id))
        {
            if visible.elapsed() > Duration::from_secs(10) {
                bail!("{id} never reached every agent");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.watchers[victim].abort();
        if let Some(mut a) = c.agents[victim].take() {
            a.kill9();
        }
        let killed = Instant::now();
        loop {
            let done = (0..n)
                .filter(|i| *i != victim)
                .all(|i| c.seen[i].lock().expect("seen").removed.contains_key(&id));
            if done {
                break;
            }
            if killed.elapsed() > Duration::from_secs(30) {
                bail!("agents still list {id} 30 s after its agent was killed");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut last = Duration::ZERO;
        for i in (0..n).filter(|i| *i != victim) {
            let t = c.seen[i].lock().expect("seen").removed[&id];
            last = last.max(t.saturating_duration_since(killed));
        }
        crash.push(last.as_secs_f64() * 1e3);
        crate::harness::note(
            &bar,
            &format!(
                "  kill {k}: agent {} excluded everywhere after {:.0} ms",
                victim + 1,
                last.as_secs_f64() * 1e3
            ),
        );
        c.agents[victim] = Some(c.start(victim)?);
        c.wait_joined(Duration::from_secs(30)).await?;
        c.watch(victim);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bar.finish_and_clear();
    crash.sort_by(f64::total_cmp);
    println!(
        "crash to excluded ({} SIGKILLs): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (budget: the attendants see the stream end and a refused connection, then the suspicion minimum, 50 ms; a member nobody attends: a probe period more, or more until a probe picks it)",
        crash.len(),
        pct(&crash, 50.0),
        pct(&crash, 99.0),
        pct(&crash, 100.0)
    );

    if !secure {
        for w in &c.watchers {
            w.abort();
        }
        return Ok(serde_json::json!({
            "write_to_all_p50_ms": pct(&lat, 50.0),
            "write_to_all_p99_ms": pct(&lat, 99.0),
            "crash_to_excluded_p50_ms": pct(&crash, 50.0),
            "crash_to_excluded_p99_ms": pct(&crash, 99.0),
            "idle_bytes_per_s_per_node": idle,
            "grpc_rtt_us": rtt,
        }));
    }
    // False downs: idle, then with one member starved by SIGSTOP/SIGCONT cycles.
    let (downs, renewed) = c.false_downs(o.idle_secs, None).await;
    println!(
        "false downs in {} s idle: {downs} down observations, {renewed} renewals",
        o.idle_secs
    );
    let starved = n - 1;
    let pid = c.agent(starved).child.id();
    let starved_addr = format!(
        "{}:{}",
        crate::cluster::ip(starved),
        crate::cluster::GOSSIP_PORT
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cycler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // Bounded: stops when told, and after an hour at most.
            let end = Instant::now() + Duration::from_secs(3600);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                let _ = std::process::Command::new("kill")
                    .args(["-STOP", &pid.to_string()])
                    .status();
                std::thread::sleep(Duration::from_millis(150));
                let _ = std::process::Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                std::thread::sleep(Duration::from_millis(350));
            }
            let _ = std::process::Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        })
    };
    let (downs_starved, renewed_starved) = c.false_downs(o.idle_secs, Some(&starved_addr)).await;
    let (starved_itself, _) = {
        // Was the starved member itself declared down? (Reported, not counted as false.)
        let e = c.epochs().await;
        (e.get(&starved_addr).copied().unwrap_or(0), 0)
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = cycler.join();
    println!(
        "false downs of healthy members in {} s with agent {} stopped 150 ms of every 500 ms: {downs_starved} down observations, {renewed_starved} renewals (the starved agent's epoch is now {starved_itself})",
        o.idle_secs,
        starved + 1
    );
    // A CPU quota instead of stops: the same agent gets 10 ms of CPU per 100 ms (a cgroup's
    // cpu.max "10000 100000"), as a host with an overcommitted container would.
    let throttled = match Throttle::new(pid, 10_000, 100_000) {
        Ok(t) => {
            let (d, r) = c.false_downs(o.idle_secs, Some(&starved_addr)).await;
            drop(t);
            println!(
                "false downs of healthy members in {} s with agent {} held to 10 % of a CPU (cgroup CPU quota, 10 ms per 100 ms): {d} down observations, {r} renewals",
                o.idle_secs,
                starved + 1
            );
            Some(d + r)
        }
        Err(e) => {
            println!("CPU-quota phase not run: {e:#}");
            None
        }
    };
    for w in &c.watchers {
        w.abort();
    }
    Ok(serde_json::json!({
        "nodes": n,
        "writes": acks.len(),
        "write_to_all_p50_ms": pct(&lat, 50.0),
        "write_to_all_p99_ms": pct(&lat, 99.0),
        "writes_lost": lost,
        "grpc_rtt_us": rtt,
        "fsync_p50_us": fsync_p50,
        "fsync_p99_us": fsync_p99,
        "crash_to_excluded_p50_ms": pct(&crash, 50.0),
        "crash_to_excluded_p99_ms": pct(&crash, 99.0),
        "false_downs": downs + renewed,
        "false_downs_starved": downs_starved + renewed_starved,
        "false_downs_loaded": false_downs_loaded,
        "false_downs_throttled": throttled,
        "health_under_load": health_under_load,
        "idle_secs": o.idle_secs,
        "idle_bytes_per_s_per_node": idle,
        "loaded_bytes_per_s_per_node": loaded,
        "sync_sessions": sync_sessions,
        "sync_sessions_failed": sync_failed,
        "sync_sessions_unstarted": sync_unstarted,
    }))
}

/// A process held to a CPU quota in a cgroup of its own (v2 `cpu.max`, or v1 `cpu` with the
/// CFS quota); the process goes back to the root cgroup when this is dropped. Root only.
struct Throttle {
    dir: std::path::PathBuf,
    root: std::path::PathBuf,
    pid: u32,
}

impl Throttle {
    fn new(pid: u32, quota_us: u64, period_us: u64) -> anyhow::Result<Throttle> {
        let v2 = std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let root = if v2 {
            std::path::PathBuf::from("/sys/fs/cgroup")
        } else {
            std::path::PathBuf::from("/sys/fs/cgroup/cpu")
        };
        let dir = root.join(format!("patina-bench-{pid}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let t = Throttle { dir, root, pid };
        if v2 {
            let _ = std::fs::write(t.root.join("cgroup.subtree_control"), "+cpu");
            std::fs::write(t.dir.join("cpu.max"), format!("{quota_us} {period_us}"))
                .context("writing cpu.max")?;
        } else {
            std::fs::write(t.dir.join("cpu.cfs_period_us"), period_us.to_string())
                .context("writing cpu.cfs_period_us")?;
            std::fs::write(t.dir.join("cpu.cfs_quota_us"), quota_us.to_string())
                .context("writing cpu.cfs_quota_us")?;
        }
        std::fs::write(t.dir.join("cgroup.procs"), pid.to_string())
            .context("moving the agent into the cgroup")?;
        Ok(t)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::write(self.root.join("cgroup.procs"), self.pid.to_string());
        let _ = std::fs::remove_dir(&self.dir);
    }
}
