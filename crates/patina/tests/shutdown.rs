//! A client that stops reading cannot hold the agent up: SIGTERM with a stalled whole-region
//! watch open still ends the agent, cleanly, within the drain grace.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use patina_proto::v1::{UpsertMachinesRequest, WatchRequest};

/// Machines enough that a whole-region snapshot (~4 MB) overfills the client's HTTP/2 window
/// (2 MiB by default) and the agent's send buffer.
const MACHINES: usize = 60_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_agent_even_with_a_watcher_that_stopped_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    for first in (0..MACHINES).step_by(1000) {
        let machines = (first..first + 1000)
            .map(|n| common::machine(&format!("m{n:06}"), "web", 8080))
            .collect();
        client
            .upsert_machines(UpsertMachinesRequest { machines })
            .await
            .unwrap();
    }
    let mut stalled = agent.client().await;
    let mut watch = stalled
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().unwrap().reset);
    // The watcher reads no more: its window fills and the agent's stream stops.
    tokio::time::sleep(Duration::from_millis(500)).await;

    Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent still runs 20 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    drop(watch);
}
