//! `cargo xtask bench checks [--trials N]`: how long a dead instance stays routed when only
//! the agent's health checks notice it. A world of real processes (release build, loopback,
//! security on): one region of two agents, two bridges, three global agents. A machine with
//! an HTTP check (every 500 ms, critical after 2 failures) runs on its host's agent; its
//! server is a real HTTP listener in this process. N times (default 20): the server is killed
//! and the time until every global agent stops listing the region for the app is measured,
//! then it starts again and the time until every one lists it again.
//! Baseline, in the same run: the orchestrator writes the machine stopped (what an explicit
//! write takes to reach every global agent), then started again. Last line: one JSON object.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::{
    Check, Health, HttpCheck, LookupAppRequest, Machine, MachineState, UpsertMachineRequest, check,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

use crate::harness::{build_patina, percentile_us};
use crate::world::{Shape, World};

pub struct Options {
    trials: usize,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        Ok(Options {
            trials: crate::harness::parse_trials(args, 20)?,
        })
    }
}

const APP: &str = "chk";
/// The instance's address: its HTTP server is this process's.
const SERVER: &str = "127.4.0.1:18080";
const INTERVAL_MS: u32 = 500;
const FAILURES: u32 = 2;

/// A real HTTP server answering 200 to everything, until aborted.
async fn serve() -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let listener = loop {
        match tokio::net::TcpListener::bind(SERVER).await {
            Ok(l) => break l,
            Err(e) if Instant::now() > deadline => return Err(e).context("binding the server"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    Ok(tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    }))
}

fn machine(state: MachineState) -> Machine {
    Machine {
        id: "chk-1".into(),
        app: APP.into(),
        addresses: vec![SERVER.into()],
        state: state as i32,
        health: Health::Unspecified as i32,
        checks: vec![Check {
            name: "http".into(),
            target: Some(check::Target::Http(HttpCheck {
                port: 0,
                path: "/health".into(),
                expect_status: 0,
            })),
            interval_ms: INTERVAL_MS,
            timeout_ms: 250,
            passes_before_passing: 1,
            failures_before_critical: FAILURES,
        }],
        ..Machine::default()
    }
}

async fn routed(c: &mut GlobalClient<Channel>) -> anyhow::Result<bool> {
    let answer = c
        .lookup_app(LookupAppRequest {
            app: APP.into(),
            from_region: String::new(),
            include_empty: false,
        })
        .await?
        .into_inner();
    Ok(!answer.regions.is_empty())
}

/// Poll every global agent (1 ms apart) until each one's answer is `want`; milliseconds from
/// `since` until the last got there. Bounded: 20 s.
async fn until_all(
    edges: &mut [GlobalClient<Channel>],
    want: bool,
    since: Instant,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut done = vec![false; edges.len()];
    let mut last = Instant::now();
    while done.iter().any(|d| !d) {
        if Instant::now() > deadline {
            bail!(
                "20 s on, not every global agent {}",
                if want {
                    "routes to the instance"
                } else {
                    "stopped routing to it"
                }
            );
        }
        for (e, c) in edges.iter_mut().enumerate() {
            if !done[e] && routed(c).await? == want {
                done[e] = true;
                last = Instant::now();
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(last.duration_since(since).as_secs_f64() * 1000.0)
}

fn summary(name: &str, ms: &mut [f64]) -> (f64, f64) {
    let mut ns: Vec<u64> = ms.iter().map(|m| (m * 1e6) as u64).collect();
    ns.sort_unstable();
    let (p50, p99) = (
        percentile_us(&ns, 50.0) / 1000.0,
        percentile_us(&ns, 99.0) / 1000.0,
    );
    println!(
        "{name}: p50 {p50:.0} ms, p99 {p99:.0} ms ({} trials)",
        ms.len()
    );
    (p50, p99)
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let root = crate::bench_store::tempdir()?.join("checks");
    let _ = std::fs::remove_dir_all(&root);
    let shape = Shape {
        regions: 1,
        agents: 2,
        bridges: 2,
        globals: 3,
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
        let mut edges = Vec::new();
        for g in &world.globals {
            edges.push(GlobalClient::new(g.channel().await));
        }
        let mut host = world.regions[0][0].client().await;
        let mut server = serve().await?;
        host.upsert_machine(UpsertMachineRequest {
            machine: Some(machine(MachineState::Started)),
        })
        .await?;
        let first = until_all(&mut edges, true, Instant::now()).await?;
        eprintln!("  the instance is routed at every global agent after {first:.0} ms");
        let (mut down, mut up, mut base_down, mut base_up) = (vec![], vec![], vec![], vec![]);
        let bar = crate::harness::progress(o.trials as u64, "trials");
        for t in 0..o.trials {
            // Not in step with the check's runs.
            tokio::time::sleep(Duration::from_millis(300 + (t as u64 * 137) % 500)).await;
            server.abort();
            let _ = (&mut server).await;
            down.push(until_all(&mut edges, false, Instant::now()).await?);
            let started = Instant::now();
            server = serve().await?;
            up.push(until_all(&mut edges, true, started).await?);
            // Baseline: the orchestrator says it stopped, then started.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let wrote = Instant::now();
            host.upsert_machine(UpsertMachineRequest {
                machine: Some(machine(MachineState::Stopped)),
            })
            .await?;
            base_down.push(until_all(&mut edges, false, wrote).await?);
            let wrote = Instant::now();
            host.upsert_machine(UpsertMachineRequest {
                machine: Some(machine(MachineState::Started)),
            })
            .await?;
            base_up.push(until_all(&mut edges, true, wrote).await?);
            crate::harness::note(
                &bar,
                &format!(
                    "  trial {}/{}: killed -> out {:.0} ms, restarted -> in {:.0} ms; written stopped -> out {:.0} ms",
                    t + 1,
                    o.trials,
                    down[t],
                    up[t],
                    base_down[t]
                ),
            );
            bar.inc(1);
        }
        bar.finish_and_clear();
        server.abort();
        anyhow::Ok((down, up, base_down, base_up))
    });
    world.stop();
    let _ = std::fs::remove_dir_all(&root);
    let (mut down, mut up, mut base_down, mut base_up) = result?;
    println!(
        "HTTP check every {INTERVAL_MS} ms, critical after {FAILURES} failures; 2 region agents, 2 bridges, 3 global agents, mTLS and sealed gossip:"
    );
    let d = summary("instance killed -> no global agent routes to it", &mut down);
    let u = summary(
        "instance restarted -> every global agent routes to it",
        &mut up,
    );
    let bd = summary(
        "baseline: orchestrator writes it stopped -> no global agent routes to it",
        &mut base_down,
    );
    let bu = summary(
        "baseline: orchestrator writes it started -> every global agent routes to it",
        &mut base_up,
    );
    let json = serde_json::json!({
        "trials": o.trials,
        "interval_ms": INTERVAL_MS,
        "failures_before_critical": FAILURES,
        "killed_to_excluded_p50_ms": d.0,
        "killed_to_excluded_p99_ms": d.1,
        "restarted_to_routed_p50_ms": u.0,
        "restarted_to_routed_p99_ms": u.1,
        "baseline_written_stopped_to_excluded_p50_ms": bd.0,
        "baseline_written_stopped_to_excluded_p99_ms": bd.1,
        "baseline_written_started_to_routed_p50_ms": bu.0,
        "baseline_written_started_to_routed_p99_ms": bu.1,
    });
    println!("{json}");
    Ok(())
}
