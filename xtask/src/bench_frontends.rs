//! `cargo xtask bench frontends [--trials N] [--streams N] [--dns-secs S]`: the front ends
//! for stock clients, on real processes (release build, loopback, mTLS on for xDS).
//!
//! 1. Instance down -> an xDS client's view updated: a delta ADS stream subscribed to an
//!    app's endpoints at a region agent, and one at a global agent (through bridges), N times
//!    (default 20). Baselines in the same run: a Region.Watch stream at the same agent (the
//!    write -> watcher time) and LookupApp polled at the global agent.
//! 2. `--streams` (default 1,000) concurrent ADS streams on one region agent: the agent's
//!    resident memory per idle stream, and the time from a write's acknowledgement until
//!    every stream holds the change (10 changes), beside one stream's in the same run.
//! 3. DNS queries per second at one region agent (A queries, 32 in flight from 16 sockets,
//!    `--dns-secs` each, default 5), beside the same load against a trivial UDP echo server
//!    (a process of its own, as the agent is).
//!
//! Last line: one JSON object.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::machine_change;
use patina_proto::v1::{
    Health, LookupAppRequest, Machine, MachineState, UpsertMachineRequest, WatchRequest,
};
use patina_testkit::Agent;
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::harness::{build_patina, percentile_us};
use crate::world::{Shape, World, region_name};

pub struct Options {
    trials: usize,
    streams: usize,
    dns_secs: u64,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            trials: 20,
            streams: 1000,
            dns_secs: 5,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> anyhow::Result<u64> {
                it.next()
                    .with_context(|| format!("{name} needs a value"))?
                    .parse()
                    .with_context(|| format!("{name} needs a number"))
            };
            match *a {
                "--trials" => o.trials = value("--trials")? as usize,
                "--streams" => o.streams = value("--streams")? as usize,
                "--dns-secs" => o.dns_secs = value("--dns-secs")?,
                other => bail!("bench frontends: unknown argument {other}"),
            }
        }
        anyhow::ensure!(
            (1..=1000).contains(&o.trials)
                && (1..=4000).contains(&o.streams)
                && (1..=120).contains(&o.dns_secs),
            "--trials 1-1000, --streams 1-4000, --dns-secs 1-120"
        );
        Ok(o)
    }
}

const APP: &str = "fe";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

fn machine(id: &str, addr: &str, health: Health) -> Machine {
    Machine {
        id: id.into(),
        app: APP.into(),
        addresses: vec![addr.into()],
        state: MachineState::Started as i32,
        health: health as i32,
        ..Machine::default()
    }
}

async fn put(agent: &Agent, m: Machine) -> anyhow::Result<()> {
    agent
        .client()
        .await
        .upsert_machine(UpsertMachineRequest { machine: Some(m) })
        .await?;
    Ok(())
}

/// One delta ADS stream subscribed to the app's endpoints.
struct Stream {
    _tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: tonic::Streaming<DeltaDiscoveryResponse>,
}

impl Stream {
    async fn open(channel: Channel, region: Option<&str>) -> anyhow::Result<Stream> {
        let (tx, rx) = mpsc::channel(4);
        tx.send(DeltaDiscoveryRequest {
            node: Some(Node {
                id: "bench".into(),
                locality: region.map(|r| Locality {
                    region: r.into(),
                    ..Locality::default()
                }),
                ..Node::default()
            }),
            type_url: EDS.into(),
            resource_names_subscribe: vec![APP.into()],
            ..Default::default()
        })
        .await?;
        let rx = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Stream { _tx: tx, rx })
    }

    /// The next endpoints of the app: (localities, endpoints).
    async fn next(&mut self, within: Duration) -> anyhow::Result<(usize, usize)> {
        loop {
            let r = tokio::time::timeout(within, self.rx.message())
                .await
                .context("no xDS update in time")??
                .context("the ADS stream ended")?;
            if let Some(res) = r.resources.iter().find(|x| x.name == APP) {
                let cla = ClusterLoadAssignment::decode(
                    &*res.resource.as_ref().context("a resource")?.value,
                )?;
                let endpoints = cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum();
                return Ok((cla.endpoints.len(), endpoints));
            }
            if r.removed_resources.iter().any(|n| n == APP) {
                return Ok((0, 0));
            }
        }
    }

    /// Wait until the view is `want`; ms since `since`.
    async fn until(&mut self, want: (usize, usize), since: Instant) -> anyhow::Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if self.next(left).await? == want {
                return Ok(since.elapsed().as_secs_f64() * 1000.0);
            }
        }
    }
}

fn summary(name: &str, ms: &[f64]) -> (f64, f64) {
    let mut ns: Vec<u64> = ms.iter().map(|m| (m * 1e6) as u64).collect();
    ns.sort_unstable();
    let (p50, p99) = (
        percentile_us(&ns, 50.0) / 1000.0,
        percentile_us(&ns, 99.0) / 1000.0,
    );
    println!(
        "{name}: p50 {p50:.1} ms, p99 {p99:.1} ms ({} samples)",
        ms.len()
    );
    (p50, p99)
}

/// Phase 1: instance down -> xDS views, at a region agent and through bridges.
async fn views(world: &World, trials: usize) -> anyhow::Result<serde_json::Value> {
    let (a0, a1) = (&world.regions[0][0], &world.regions[0][1]);
    let other = &world.regions[1][0];
    let g = &world.globals[0];
    put(a0, machine("fe-1", "10.0.0.1:80", Health::Passing)).await?;
    put(a1, machine("fe-2", "10.0.0.2:80", Health::Passing)).await?;
    put(other, machine("fe-3", "10.0.1.3:80", Health::Passing)).await?;
    let mut region = Stream::open(a0.channel().await, None).await?;
    let home = region_name(0);
    let mut global = Stream::open(g.channel().await, Some(&home)).await?;
    region.until((1, 2), Instant::now()).await?;
    global.until((2, 2), Instant::now()).await?;
    let mut watch = a0
        .client()
        .await
        .watch(WatchRequest {
            app: APP.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut lookup = GlobalClient::new(g.channel().await);
    let (mut r_ms, mut w_ms, mut g_ms, mut l_ms) = (vec![], vec![], vec![], vec![]);
    let bar = crate::harness::progress(trials as u64, "trials");
    for t in 0..trials {
        tokio::time::sleep(Duration::from_millis(200 + (t as u64 * 37) % 200)).await;
        // fe-2 (owned by the other agent of the region) goes critical.
        let wrote = Instant::now();
        put(a1, machine("fe-2", "10.0.0.2:80", Health::Critical)).await?;
        let watch_task = async {
            loop {
                let m = watch.message().await?.context("the watch ended")?;
                let seen = m.changes.iter().any(|c| {
                    matches!(&c.change, Some(machine_change::Change::Upserted(m))
                        if m.id == "fe-2" && m.health == Health::Critical as i32)
                });
                if seen {
                    return anyhow::Ok(wrote.elapsed().as_secs_f64() * 1000.0);
                }
            }
        };
        let (w, r) = tokio::join!(watch_task, region.until((1, 1), wrote));
        w_ms.push(w?);
        r_ms.push(r?);
        // fe-1 too: the region has no healthy instance left; the global view drops it.
        let wrote = Instant::now();
        put(a0, machine("fe-1", "10.0.0.1:80", Health::Critical)).await?;
        let poll = async {
            loop {
                let regions = lookup
                    .lookup_app(LookupAppRequest {
                        app: APP.into(),
                        from_region: home.clone(),
                        include_empty: false,
                    })
                    .await?
                    .into_inner()
                    .regions;
                if !regions.iter().any(|r| r.region == home) {
                    return anyhow::Ok(wrote.elapsed().as_secs_f64() * 1000.0);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        let (l, gx, _) = tokio::join!(
            poll,
            global.until((1, 1), wrote),
            region.until((1, 0), wrote)
        );
        l_ms.push(l?);
        g_ms.push(gx?);
        // Both back; everyone sees them.
        put(a0, machine("fe-1", "10.0.0.1:80", Health::Passing)).await?;
        put(a1, machine("fe-2", "10.0.0.2:80", Health::Passing)).await?;
        let now = Instant::now();
        let (a, b) = tokio::join!(region.until((1, 2), now), global.until((2, 2), now));
        a?;
        b?;
        // Drain the watch's events of the restore.
        while let Ok(Some(Ok(Some(_)))) =
            tokio::time::timeout(Duration::from_millis(50), watch.message())
                .await
                .map(Some)
        {}
        crate::harness::note(
            &bar,
            &format!(
                "  trial {}/{}: region xDS {:.1} ms (watch {:.1}); global xDS {:.1} ms (LookupApp {:.1})",
                t + 1,
                trials,
                r_ms[t],
                w_ms[t],
                g_ms[t],
                l_ms[t]
            ),
        );
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!("instance down -> xDS client's view (delta ADS, debounce 100 ms):");
    let r = summary("  at a region agent (written at another agent)", &r_ms);
    let w = summary("  baseline: Region.Watch at the same agent", &w_ms);
    let g = summary(
        "  at a global agent (the region's last healthy instance; through its bridge)",
        &g_ms,
    );
    let l = summary("  baseline: LookupApp polled at the global agent", &l_ms);
    Ok(serde_json::json!({
        "region_xds_p50_ms": r.0, "region_xds_p99_ms": r.1,
        "baseline_watch_p50_ms": w.0, "baseline_watch_p99_ms": w.1,
        "global_xds_p50_ms": g.0, "global_xds_p99_ms": g.1,
        "baseline_lookup_p50_ms": l.0, "baseline_lookup_p99_ms": l.1,
    }))
}

/// Phase 2: many ADS streams on one agent.
async fn many(world: &World, streams: usize) -> anyhow::Result<serde_json::Value> {
    let agent = &world.regions[1][0];
    let pid = agent.child.id();
    let settle = || tokio::time::sleep(Duration::from_secs(2));
    // One connection per 125 streams (under limits.max_streams_per_connection).
    let conns = streams.div_ceil(125);
    let mut channels = Vec::new();
    for _ in 0..conns {
        channels.push(agent.channel().await);
    }
    settle().await;
    let before = patina_testkit::rss_of(pid)?;
    let bar = crate::harness::progress(streams as u64, "opening ADS streams");
    let mut all = Vec::with_capacity(streams);
    for s in 0..streams {
        let mut st = Stream::open(channels[s % conns].clone(), None).await?;
        st.next(Duration::from_secs(30)).await?;
        all.push(st);
        bar.inc(1);
    }
    bar.finish_and_clear();
    settle().await;
    let after = patina_testkit::rss_of(pid)?;
    let per_stream = (after.saturating_sub(before)) as f64 / streams as f64;
    println!(
        "{streams} idle ADS streams on one region agent: {:.1} KiB resident each ({:.1} MiB in all)",
        per_stream / 1024.0,
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64
    );
    // Each stream in a task of its own, reporting when it sees each change.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, Instant)>();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut st) in all.into_iter().enumerate() {
        let tx = done_tx.clone();
        tasks.spawn(async move {
            let mut change = 0usize;
            while let Ok(view) = st.next(Duration::from_secs(120)).await {
                let _ = view;
                change += 1;
                if tx.send((i, Instant::now())).is_err() {
                    return;
                }
            }
            let _ = change;
        });
    }
    let (mut last_ms, mut every_ms) = (Vec::new(), Vec::new());
    for c in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let health = if c % 2 == 0 {
            Health::Critical
        } else {
            Health::Passing
        };
        let m = machine("fe-3", "10.0.1.3:80", health);
        put(agent, m).await?;
        let acked = Instant::now();
        let mut seen = 0;
        let deadline = acked + Duration::from_secs(30);
        let mut last = acked;
        while seen < streams {
            let left = deadline.saturating_duration_since(Instant::now());
            let (_, at) = tokio::time::timeout(left, done_rx.recv())
                .await
                .context("not every stream saw the change in 30 s")?
                .context("the streams ended")?;
            seen += 1;
            let ms = at.saturating_duration_since(acked).as_secs_f64() * 1000.0;
            every_ms.push(ms);
            last = last.max(at);
        }
        last_ms.push(last.saturating_duration_since(acked).as_secs_f64() * 1000.0);
    }
    tasks.abort_all();
    let l = summary(
        &format!("  write acknowledged -> all {streams} streams hold it (per change)"),
        &last_ms,
    );
    let e = summary(
        "  write acknowledged -> a stream holds it (every stream, every change)",
        &every_ms,
    );
    Ok(serde_json::json!({
        "streams": streams,
        "rss_per_idle_stream_bytes": per_stream,
        "change_to_all_streams_p50_ms": l.0,
        "change_to_all_streams_p99_ms": l.1,
        "change_to_a_stream_p50_ms": e.0,
        "change_to_a_stream_p99_ms": e.1,
    }))
}

/// A DNS query for `name` type A, id `id`.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Answers per second from `server` for `secs`: 16 sockets, 2 queries in flight each.
async fn load(server: SocketAddr, name: &str, secs: u64) -> anyhow::Result<f64> {
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..16u16 {
        let answered = answered.clone();
        let name = name.to_owned();
        tasks.spawn(async move {
            let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            sock.connect(server).await?;
            let mut buf = [0u8; 1500];
            let mut id = s.wrapping_mul(4096);
            // Two in flight: send two, then one more per answer.
            for _ in 0..2 {
                id = id.wrapping_add(1);
                sock.send(&query(id, &name)).await?;
            }
            while Instant::now() < stop {
                match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
                    Ok(Ok(n)) if n >= 12 => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    // A lost datagram: put another in flight.
                    _ => {}
                }
                id = id.wrapping_add(1);
                sock.send(&query(id, &name)).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(answered.load(Ordering::Relaxed) as f64 / secs as f64)
}

/// `cargo xtask udp-echo ADDR`: the baseline's server, a process of its own (as the agent is),
/// with the agent's two worker threads.
pub fn udp_echo(addr: &str) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let sock = Arc::new(tokio::net::UdpSocket::bind(addr).await?);
        let mut buf = [0u8; 1500];
        loop {
            let (n, from) = sock.recv_from(&mut buf).await?;
            // A DNS-shaped answer: the query back with the response bit set.
            if n >= 3 {
                buf[2] |= 0x80;
            }
            sock.send_to(&buf[..n], from).await?;
        }
    })
}

/// Phase 3: DNS queries per second against a trivial UDP echo.
async fn dns(
    bin: &std::path::Path,
    root: &std::path::Path,
    secs: u64,
) -> anyhow::Result<serde_json::Value> {
    let ip = "127.5.0.1";
    let port = 18600;
    let config = format!(
        "region = \"dns\"\nhost = \"dns-1\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n[gossip]\nstandalone = true\n[dns]\nlisten = \"{ip}:{port}\"\nrate_per_client = 4000000000\n"
    );
    let mut agent = Agent::start_role(bin, "region", &root.join("dns"), &config)?;
    for i in 0..3 {
        agent
            .client()
            .await
            .upsert_machine(UpsertMachineRequest {
                machine: Some(Machine {
                    id: format!("web-{i}"),
                    app: "web".into(),
                    addresses: vec![format!("10.0.0.{}:80", i + 1)],
                    state: MachineState::Started as i32,
                    health: Health::Passing as i32,
                    ..Machine::default()
                }),
            })
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let echo_addr = "127.5.0.2:18601";
    let exe = std::env::current_exe()?;
    let mut echo = std::process::Command::new(exe)
        .args(["udp-echo", echo_addr])
        .spawn()
        .context("starting the UDP echo server")?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let name = "web.app.dns.patina";
    // Warm both, then measure each twice, alternating.
    load(format!("{ip}:{port}").parse()?, name, 1).await?;
    load(echo_addr.parse()?, name, 1).await?;
    let mut d = Vec::new();
    let mut e = Vec::new();
    for _ in 0..2 {
        d.push(load(format!("{ip}:{port}").parse()?, name, secs).await?);
        e.push(load(echo_addr.parse()?, name, secs).await?);
    }
    let _ = echo.kill();
    let _ = echo.wait();
    agent.stop()?;
    let dns_qps = d.iter().sum::<f64>() / d.len() as f64;
    let echo_qps = e.iter().sum::<f64>() / e.len() as f64;
    println!(
        "DNS at one region agent: {dns_qps:.0} answers/s (A, 3 instances; 16 sockets, 2 in flight each); baseline: a trivial UDP echo {echo_qps:.0}/s, ratio {:.2}x",
        dns_qps / echo_qps
    );
    Ok(serde_json::json!({
        "dns_qps": dns_qps,
        "baseline_udp_echo_qps": echo_qps,
        "dns_to_echo": dns_qps / echo_qps,
    }))
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let root = crate::bench_store::tempdir()?.join("frontends");
    let _ = std::fs::remove_dir_all(&root);
    let shape = Shape {
        regions: 2,
        agents: 2,
        bridges: 1,
        globals: 1,
        stale_after_secs: 30,
        secure: true,
        metrics: true,
    };
    let mut world = World::start(&bin, &root, shape)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let v = views(&world, o.trials).await?;
        let m = many(&world, o.streams).await?;
        anyhow::Ok((v, m))
    });
    world.stop();
    let (v, m) = result?;
    let d = rt.block_on(dns(&bin, &root, o.dns_secs))?;
    let _ = std::fs::remove_dir_all(&root);
    let mut json = serde_json::json!({ "trials": o.trials });
    for part in [v, m, d] {
        if let (Some(all), serde_json::Value::Object(p)) = (json.as_object_mut(), part) {
            all.extend(p);
        }
    }
    println!("{json}");
    Ok(())
}
