//! `cargo xtask bench watchdog [--trials N]`: how long a stuck loop keeps an agent in the
//! cluster. N times (default 10), a region of three real agents (release build, loopback)
//! forms and each writes a machine; then the third agent's gossip thread blocks, or its
//! store's writer stalls (the test-only `PATINA_FAULT`), and the time from the fault until
//! both peers have it out of their membership and its machine hidden is measured.
//! Baseline, in the same run: the same region, the third agent killed with SIGKILL (what
//! SWIM's detection alone takes). Last line: one JSON object.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patina_proto::v1::{ListInstancesRequest, UpsertMachineRequest};
use patina_testkit::Agent;

use crate::harness::{build_patina, percentile_us};

pub struct Options {
    trials: usize,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        Ok(Options {
            trials: crate::harness::parse_trials(args, 10)?,
        })
    }
}

const IPS: [&str; 3] = ["127.0.0.201", "127.0.0.202", "127.0.0.203"];
const GOSSIP_PORT: u16 = 7946;
/// When the fault strikes, after the faulty agent announced itself.
const FAULT_AFTER: Duration = Duration::from_millis(3000);

#[derive(Clone, Copy, PartialEq)]
enum Trial {
    GossipBlock,
    StoreStall,
    Kill,
}

fn member(
    bin: &std::path::Path,
    root: &std::path::Path,
    i: usize,
    env: &[(&str, &str)],
) -> anyhow::Result<Agent> {
    let seeds = if i == 0 {
        String::new()
    } else {
        format!("\"{}:{GOSSIP_PORT}\"", IPS[0])
    };
    let config = format!(
        "region = \"bench\"\nhost = \"worker-{i}\"\nlisten = \"{ip}:0\"\nlog = \"error\"\ntls = \"off\"\n[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [{seeds}]\n",
        ip = IPS[i]
    );
    let mut all = vec![
        // The defaults (the harness raises them for tests).
        ("PATINA_WATCHDOG__BUDGET_MS", "2000"),
        ("PATINA_WATCHDOG__FATAL_MS", "2500"),
    ];
    all.extend_from_slice(env);
    Agent::start_role_env(
        bin,
        "region",
        &root.join(format!("agent{i}")),
        &config,
        &all,
    )
    .context("starting an agent")
}

async fn listed(agent: &Agent) -> usize {
    let Ok(mut client) = tokio::time::timeout(Duration::from_secs(2), agent.client()).await else {
        return usize::MAX;
    };
    client
        .list_instances(ListInstancesRequest {
            app: "web".into(),
            ..Default::default()
        })
        .await
        .map_or(usize::MAX, |r| r.into_inner().machines.len())
}

/// One trial: milliseconds from the fault until both peers dropped the third agent.
async fn trial(bin: &std::path::Path, kind: Trial) -> anyhow::Result<f64> {
    let root = crate::bench_store::tempdir()?.join("watchdog");
    let _ = std::fs::remove_dir_all(&root);
    let fault = match kind {
        Trial::GossipBlock => Some(format!("gossip-block-after-ms={}", FAULT_AFTER.as_millis())),
        Trial::StoreStall => Some(format!("store-stall-after-ms={}", FAULT_AFTER.as_millis())),
        Trial::Kill => None,
    };
    let a = member(bin, &root, 0, &[])?;
    let b = member(bin, &root, 1, &[])?;
    let env: Vec<(&str, &str)> = fault
        .as_deref()
        .map(|f| vec![("PATINA_FAULT", f)])
        .unwrap_or_default();
    let mut victim = member(bin, &root, 2, &env)?;
    let fault_at = Instant::now() + FAULT_AFTER;
    for (i, agent) in [&a, &b, &victim].into_iter().enumerate() {
        agent
            .client()
            .await
            .upsert_machine(UpsertMachineRequest {
                machine: Some(patina_testkit::machine(&format!("m-{i}"), "web", 80)),
            })
            .await
            .context("a write before the fault")?;
    }
    let joined = Instant::now() + Duration::from_secs(3);
    loop {
        let mut ok = true;
        for agent in [&a, &b] {
            ok &= agent.alive_members().await == 2 && listed(agent).await == 3;
        }
        if ok {
            break;
        }
        if Instant::now() > joined {
            bail!("the region did not form before the fault");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep_until(fault_at.into()).await;
    match kind {
        Trial::Kill => victim.child.kill()?,
        Trial::StoreStall => {
            // The stall strikes the next group commit: a write gives it one.
            let url = victim.url.clone();
            tokio::spawn(async move {
                if let Ok(ch) = tonic::transport::Channel::from_shared(url)
                    .expect("a URL")
                    .connect()
                    .await
                {
                    let _ = patina_proto::v1::region_client::RegionClient::new(ch)
                        .upsert_machine(UpsertMachineRequest {
                            machine: Some(patina_testkit::machine("m-stuck", "web", 80)),
                        })
                        .await;
                }
            });
        }
        Trial::GossipBlock => {}
    }
    // Bounded: 30 s after the fault.
    let deadline = fault_at + Duration::from_secs(30);
    let mut dropped = [false, false];
    loop {
        for (i, peer) in [&a, &b].into_iter().enumerate() {
            dropped[i] |= peer.alive_members().await == 1 && listed(peer).await == 2;
        }
        if dropped == [true, true] {
            return Ok(fault_at.elapsed().as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            bail!("30 s after the fault, the peers still had the agent");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn run(o: Options) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let kinds = [
        ("gossip thread blocked", Trial::GossipBlock),
        ("store writer stalled", Trial::StoreStall),
        ("baseline: killed (SIGKILL)", Trial::Kill),
    ];
    let mut figures = Vec::new();
    for (name, kind) in kinds {
        let mut ms = Vec::with_capacity(o.trials);
        let bar = crate::harness::progress(o.trials as u64, name);
        for t in 0..o.trials {
            let took = rt.block_on(trial(&bin, kind))?;
            crate::harness::note(
                &bar,
                &format!("  {name}, trial {}/{}: {took:.0} ms", t + 1, o.trials),
            );
            bar.inc(1);
            ms.push((took * 1e6) as u64);
        }
        bar.finish_and_clear();
        ms.sort_unstable();
        let (p50, p99, max) = (
            percentile_us(&ms, 50.0) / 1000.0,
            percentile_us(&ms, 99.0) / 1000.0,
            *ms.last().expect("a trial") as f64 / 1e6,
        );
        println!(
            "{name}: out of the cluster at both peers, its machine hidden, after p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms ({} trials)",
            o.trials
        );
        figures.push((name, p50, p99, max));
    }
    let json = serde_json::json!({
        "trials": o.trials,
        "gossip_block_to_out_p50_ms": figures[0].1,
        "gossip_block_to_out_p99_ms": figures[0].2,
        "store_stall_to_out_p50_ms": figures[1].1,
        "store_stall_to_out_p99_ms": figures[1].2,
        "baseline_kill_to_out_p50_ms": figures[2].1,
        "baseline_kill_to_out_p99_ms": figures[2].2,
    });
    println!("{json}");
    Ok(())
}
