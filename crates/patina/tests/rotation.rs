//! Certificates rotate under load with no restart, no failed call and no member going down
//! (real processes, TLS on, encrypted gossip): every agent's leaf is renewed in place, then
//! the CA is rotated in the three documented steps (trust both, issue from the new one, drop
//! the old), while a writer keeps writing through fresh and long-lived connections.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, certs, issue, machine, tls_channel as channel, tls_dir};
use patina_proto::v1::admin_client::AdminClient;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{ClusterStatusRequest, MembersRequest, UpsertMachineRequest};
use patina_trust::{Dial, Paths, Trust};
use tonic::transport::{Channel, Endpoint};

const AGENTS: usize = 3;
const BASE: usize = 201;

/// Write `pem` as the bundle every agent and the client trust (whole, then renamed).
fn set_bundles(root: &Path, client: &Path, pem: &str) {
    let dirs = (0..AGENTS)
        .map(|i| tls_dir(&root.join(format!("agent{i}"))))
        .chain([client.to_path_buf()]);
    for d in dirs {
        patina_trust::certs::write_file(&Paths::in_dir(&d).ca, pem.as_bytes(), false).unwrap();
    }
}

/// Renew every agent's leaf and the client's from the CA in `ca`, keeping their bundles.
fn renew_leaves(root: &Path, client: &Path, ca: &Path) {
    for i in 0..AGENTS {
        let ip = format!("127.0.0.{}", BASE + i);
        let dir = tls_dir(&root.join(format!("agent{i}")));
        issue(
            ca,
            &dir,
            &["--region-agent", "test", "--ip", &ip, "--keep-ca"],
        );
    }
    issue(
        ca,
        client,
        &["--writer", "test", "--region-agent", "test", "--keep-ca"],
    );
}

/// Reloads each agent reports (sets loaded since start).
async fn reloads(dial: &Dial, agents: &[Agent]) -> Vec<u64> {
    let mut out = Vec::new();
    for a in agents {
        let ch = channel(dial, a).await.unwrap();
        let s = AdminClient::new(ch)
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        out.push(s.tls.map_or(0, |t| t.reloads));
    }
    out
}

/// Wait until every agent has loaded at least `n` sets (the files are checked every 2 s).
async fn await_reloads(dial: &Dial, agents: &[Agent], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = reloads(dial, agents).await;
        if r.iter().all(|x| *x >= n) {
            return;
        }
        assert!(Instant::now() < deadline, "agents did not reload: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaves_and_the_ca_rotate_under_load_with_no_failed_call() {
    let root = tempfile::tempdir().unwrap();
    let (ca1, ca2) = (root.path().join("ca1"), root.path().join("ca2"));
    certs(&["ca", "--dir", ca1.to_str().unwrap()]);
    let agents: Vec<Agent> = (0..AGENTS)
        .map(|i| {
            let seeds: Vec<usize> = if i == 0 { vec![] } else { vec![0] };
            common::start_tls_agent(root.path(), i, BASE, &ca1, &seeds, 90)
        })
        .collect();
    // The client follows its files as agents do (a writer, and a peer to read status).
    let client: PathBuf = root.path().join("client");
    issue(
        &ca1,
        &client,
        &["--writer", "test", "--region-agent", "test"],
    );
    let trust = Trust::follow_every(Paths::in_dir(&client), Duration::from_millis(200)).unwrap();
    let dial = Dial::tls_any(trust);
    let deadline = Instant::now() + Duration::from_secs(20);
    for a in &agents {
        loop {
            let ch = channel(&dial, a).await.unwrap();
            let alive = AdminClient::new(ch)
                .members(MembersRequest {})
                .await
                .map(|r| {
                    r.into_inner()
                        .members
                        .iter()
                        .filter(|m| m.state == "alive")
                        .count()
                })
                .unwrap_or(0);
            if alive == AGENTS - 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the region did not form");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Load: writes round-robin over the agents, a fresh connection every 20th call, the
    // others on long-lived ones; and every agent's membership watched throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = agents.iter().map(|a| a.url.clone()).collect();
    let writer = {
        let (stop, dial, urls) = (stop.clone(), dial.clone(), urls.clone());
        tokio::spawn(async move {
            let mut channels: Vec<Option<Channel>> = vec![None; urls.len()];
            let (mut ok, mut failed) = (0u64, Vec::new());
            // Bounded: at most 20,000 writes.
            for i in 0..20_000usize {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let k = i % urls.len();
                if i % 20 == 0 {
                    channels[k] = None;
                }
                if channels[k].is_none() {
                    let endpoint = Endpoint::from_shared(urls[k].clone()).unwrap();
                    match dial.connect(endpoint).await {
                        Ok(ch) => channels[k] = Some(ch),
                        Err(e) => {
                            failed.push(format!("connect {}: {e:?}", urls[k]));
                            continue;
                        }
                    }
                }
                let mut m = machine(&format!("m{}", i % 50), "web", 8080);
                m.host = format!("worker-{k}");
                let ch = channels[k].clone().unwrap();
                match RegionClient::new(ch)
                    .upsert_machine(UpsertMachineRequest { machine: Some(m) })
                    .await
                {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("write at {}: {e:?}", urls[k])),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    };
    let mut watchers = Vec::new();
    for url in &urls {
        let (stop, dial, url) = (stop.clone(), dial.clone(), url.clone());
        watchers.push(tokio::spawn(async move {
            let ch = dial
                .connect(Endpoint::from_shared(url).unwrap())
                .await
                .unwrap();
            let mut admin = AdminClient::new(ch);
            let mut bad = Vec::new();
            // Bounded: at most five minutes of polls.
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                match admin.members(MembersRequest {}).await {
                    Ok(r) => bad.extend(
                        r.into_inner()
                            .members
                            .into_iter()
                            .filter(|m| m.state != "alive")
                            .map(|m| format!("{} {}", m.address, m.state)),
                    ),
                    Err(e) => bad.push(format!("members: {e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bad
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    // A leaf renewed in place on every agent and on the client.
    renew_leaves(root.path(), &client, &ca1);
    await_reloads(&dial, &agents, 2).await;

    // The CA rotated in three steps: trust both; issue from the new one; drop the old.
    certs(&["ca", "--dir", ca2.to_str().unwrap()]);
    let pem = |ca: &Path| std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    set_bundles(root.path(), &client, &format!("{}{}", pem(&ca1), pem(&ca2)));
    await_reloads(&dial, &agents, 3).await;
    renew_leaves(root.path(), &client, &ca2);
    await_reloads(&dial, &agents, 4).await;
    set_bundles(root.path(), &client, &pem(&ca2));
    await_reloads(&dial, &agents, 5).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = writer.await.unwrap();
    assert!(
        failed.is_empty(),
        "calls failed during the rotation: {failed:?}"
    );
    assert!(ok > 100, "the load ran: {ok} writes");
    for w in watchers {
        let bad = w.await.unwrap();
        assert!(
            bad.is_empty(),
            "members suspected during the rotation: {bad:?}"
        );
    }

    // The old CA is gone: a client holding a leaf of it, trusting it alone, is refused.
    let old_client = root.path().join("old-client");
    issue(&ca1, &old_client, &["--writer", "test"]);
    let old = common::tls_dial(&old_client);
    for a in &agents {
        let refused = match channel(&old, a).await {
            Err(_) => true,
            Ok(ch) => RegionClient::new(ch)
                .upsert_machine(UpsertMachineRequest {
                    machine: Some(machine("x", "web", 1)),
                })
                .await
                .is_err(),
        };
        assert!(refused, "a leaf of the dropped CA was served by {}", a.url);
    }
}
