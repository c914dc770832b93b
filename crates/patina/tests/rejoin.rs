//! Members are remembered between runs: an agent whose only seed is down when it restarts
//! finds its region through the members it knew (`gossip-members` in its data directory).
//! Three real agents on 127.0.0.61-63; agent 0 is everyone's only seed.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::Agent;

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 61 + i)
}

fn start(root: &Path, i: usize) -> Agent {
    common::start_member(root, i, &ip(i), &[ip(0)])
}

/// Poll (bounded) until `agent` sees `n` alive members.
async fn sees(agent: &Agent, n: usize, what: &str) {
    let start = Instant::now();
    while agent.alive_members().await != n {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_seed_is_down_rejoins_through_the_members_it_remembered() {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (0..3).map(|i| start(root.path(), i)).collect();
    for a in &agents {
        sees(a, 2, "every agent sees the two others").await;
    }
    // Written within a second of a change.
    let remembered = root.path().join("agent2/data/gossip-members");
    let start_wait = Instant::now();
    while !std::fs::read_to_string(&remembered)
        .is_ok_and(|t| t.contains(&ip(0)) && t.contains(&ip(1)))
    {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "agent 2 never remembered its members"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The seed goes away for good; agent 2 restarts with only that seed configured.
    assert!(agents[0].stop().unwrap(), "agent 0 stops cleanly");
    assert!(agents[2].stop().unwrap(), "agent 2 stops cleanly");
    sees(&agents[1], 0, "agent 1 sees both gone").await;
    agents[2] = start(root.path(), 2);
    sees(
        &agents[2],
        1,
        "the restarted agent found agent 1 without its seed",
    )
    .await;
    sees(&agents[1], 1, "agent 1 sees it back").await;
}
