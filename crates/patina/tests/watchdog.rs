//! The watchdog sees each loop: a region of three real agents, one of which gets a stuck
//! loop (by the test-only `PATINA_FAULT`): its gossip thread blocked, or its store's writer
//! thread stalled. The agent's watchdog ends it: it exits with status 70 (for its supervisor
//! to restart it), and both peers take it out of the cluster and hide its machines.

mod common;

use std::time::{Duration, Instant};

use common::Agent;
use patina_proto::v1::{ListInstancesRequest, UpsertMachineRequest};

/// Machines of app `web` `agent` lists (hidden ones left out).
async fn listed(agent: &Agent) -> usize {
    let Ok(mut client) = tokio::time::timeout(Duration::from_secs(2), agent.client()).await else {
        return usize::MAX;
    };
    match client
        .list_instances(ListInstancesRequest {
            app: "web".into(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().machines.len(),
        Err(_) => usize::MAX,
    }
}

/// Start a region whose third agent gets `fault` (armed `after` its start); write a machine
/// on each agent; return once the stuck agent exited and both peers dropped it, with how long
/// after the fault each took.
async fn stuck_loop(ips: [&str; 3], fault: &str, write_to_trigger: bool) {
    let root = tempfile::tempdir().unwrap();
    let a = common::start_member(root.path(), 0, ips[0], &[]);
    let b = common::start_member(root.path(), 1, ips[1], &[ips[0].to_owned()]);
    // The fault is armed `after` the victim's own start, which is after this instant: times
    // measured from here plus `after` are upper bounds.
    let after: u64 = fault
        .rsplit('=')
        .next()
        .and_then(|ms| ms.parse().ok())
        .expect("the fault's after-ms");
    let spawned = Instant::now();
    let mut victim = common::start_member_env(
        root.path(),
        2,
        ips[2],
        &[ips[0].to_owned()],
        &[
            ("PATINA_FAULT", fault),
            // The defaults (the harness raises them for other tests).
            ("PATINA_WATCHDOG__BUDGET_MS", "2000"),
            ("PATINA_WATCHDOG__FATAL_MS", "2500"),
        ],
    );
    for (i, agent) in [&a, &b, &victim].into_iter().enumerate() {
        let mut client = agent.client().await;
        client
            .upsert_machine(UpsertMachineRequest {
                machine: Some(common::machine(&format!("m-{i}"), "web", 80)),
            })
            .await
            .expect("a write before the fault");
    }
    for agent in [&a, &b] {
        let joined = common::eventually(Duration::from_secs(3), || async {
            agent.alive_members().await == 2 && listed(agent).await == 3
        })
        .await;
        assert!(joined.is_some(), "the region did not form before the fault");
    }
    let mut fault_at = spawned + Duration::from_millis(after);
    assert!(
        Instant::now() < fault_at,
        "{fault}: the region took too long to form ({:?} after the victim's spawn)",
        spawned.elapsed()
    );
    tokio::time::sleep_until(fault_at.into()).await;
    if write_to_trigger {
        // The fault strikes at the next group commit once armed: a second past its arming,
        // a write gives it one, and the fault is then.
        tokio::time::sleep(Duration::from_secs(1)).await;
        fault_at = Instant::now();
        // The stall strikes the next group commit: a write gives it one (it never answers).
        let url = victim.url.clone();
        tokio::spawn(async move {
            if let Ok(ch) = tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect()
                .await
            {
                let _ = patina_proto::v1::region_client::RegionClient::new(ch)
                    .upsert_machine(UpsertMachineRequest {
                        machine: Some(common::machine("m-stuck", "web", 80)),
                    })
                    .await;
            }
        });
    }
    // Bounded: 20 s after the fault at most.
    let deadline = fault_at + Duration::from_secs(20);
    let mut exited = None;
    let mut dropped = [None, None];
    while exited.is_none() || dropped.iter().any(Option::is_none) {
        assert!(
            Instant::now() < deadline,
            "{fault}: 20 s after the fault, exited {exited:?}, dropped by peers {dropped:?}"
        );
        if exited.is_none()
            && let Some(status) = victim.child.try_wait().unwrap()
        {
            exited = Some((status, fault_at.elapsed()));
        }
        for (i, peer) in [&a, &b].into_iter().enumerate() {
            if dropped[i].is_none() && peer.alive_members().await == 1 && listed(peer).await == 2 {
                dropped[i] = Some(fault_at.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, exit_after) = exited.unwrap();
    assert_eq!(
        status.code(),
        Some(70),
        "{fault}: the watchdog's exit status"
    );
    // The bound: the stuck agent is gone within 5 s (its peers' view follows within
    // SWIM's detection; `cargo xtask bench watchdog` measures that, p50 and p99).
    assert!(
        exit_after < Duration::from_secs(5),
        "{fault}: exited {exit_after:?} after the fault"
    );
    eprintln!(
        "{fault}: the stuck agent exited after {exit_after:?}; out of the cluster, its machines hidden, at its peers after {:?} and {:?}",
        dropped[0].unwrap(),
        dropped[1].unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_gossip_loop_is_stuck_is_ended_and_dropped_by_its_peers() {
    stuck_loop(
        ["127.0.0.141", "127.0.0.142", "127.0.0.143"],
        "gossip-block-after-ms=4000",
        false,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_store_writer_is_stuck_is_ended_and_dropped_by_its_peers() {
    stuck_loop(
        ["127.0.0.144", "127.0.0.145", "127.0.0.146"],
        "store-stall-after-ms=3500",
        true,
    )
    .await;
}

/// Every other loop of a region agent, blocked in turn (`loop-block`), and a lock the
/// store's writer needs, held (`feed-lock`): each time, the agent exits with 70 and both peers
/// drop it and hide its machines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_loop_of_a_region_agent_stuck_in_turn_and_a_held_lock_end_it() {
    for name in ["checks", "feed_follower", "tombstone_collector", "runtime"] {
        stuck_loop(
            ["127.0.0.147", "127.0.0.148", "127.0.0.149"],
            &format!("loop-block={name},after-ms=4000"),
            false,
        )
        .await;
    }
    stuck_loop(
        ["127.0.0.147", "127.0.0.148", "127.0.0.149"],
        "feed-lock-after-ms=3500",
        true,
    )
    .await;
}

/// A pause of the whole process (SIGSTOP for 4 s, as a VM paused or a frozen cgroup) stops
/// every loop at once: none is stuck, and the watchdog must not end the agent for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_process_is_not_a_stuck_loop() {
    let dir = tempfile::tempdir().unwrap();
    let config = "region = \"test\"\nhost = \"worker-1\"\nlisten = \"127.0.0.1:0\"\nlog = \"warn\"\n[gossip]\nlisten = \"127.0.0.1:0\"\nstandalone = true\n";
    let mut agent = Agent::start_role_env(
        common::bin(),
        "region",
        dir.path(),
        config,
        &[
            ("PATINA_WATCHDOG__BUDGET_MS", "2000"),
            ("PATINA_WATCHDOG__FATAL_MS", "2500"),
        ],
    )
    .expect("start the agent");
    let pid = agent.child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    std::thread::sleep(Duration::from_secs(4));
    signal("-CONT");
    // Given twice the fatal bound to act, it does not.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the watchdog ended an agent that was only paused"
    );
    let mut client = agent.client().await;
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(common::machine("m-after", "web", 80)),
        })
        .await
        .expect("it serves after the pause");
}
