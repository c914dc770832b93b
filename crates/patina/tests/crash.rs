//! kill -9 mid-stream: every acknowledged write survives, and the sequence counter moves on
//! past every value used before.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::machine;
use patina_proto::v1::{GetMachineRequest, ListInstancesRequest, UpsertMachineRequest, Version};

/// Concurrent writers: enough for real group commits.
const WRITERS: usize = 16;
/// Kill once this many writes are acknowledged.
const KILL_AFTER: usize = 800;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = common::start(dir.path(), "127.0.0.1");
    let acked_count = Arc::new(AtomicUsize::new(0));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut client = agent.client().await;
        let acked_count = acked_count.clone();
        writers.spawn(async move {
            let mut acked: HashMap<String, Version> = HashMap::new();
            // Bounded: stops at the first failure (the kill) or after 100k writes.
            for i in 0..100_000u32 {
                let id = format!("w{w}-{i}");
                let m = machine(&id, &format!("app{}", w % 4), 1000 + (i % 60000) as u16);
                match client
                    .upsert_machine(UpsertMachineRequest { machine: Some(m) })
                    .await
                {
                    Ok(resp) => {
                        let v = resp.into_inner().machine.unwrap().version.unwrap();
                        acked.insert(id, v);
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
            acked
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked_count.load(Ordering::Relaxed) < KILL_AFTER {
        assert!(tokio::time::Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.kill9();
    let mut acked: HashMap<String, Version> = HashMap::new();
    while let Some(r) = writers.join_next().await {
        acked.extend(r.unwrap());
    }
    assert!(acked.len() >= KILL_AFTER, "{} acknowledged", acked.len());
    let max_seq = acked.values().map(|v| v.seq).max().unwrap();

    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    for (id, v) in &acked {
        let got = client
            .get_machine(GetMachineRequest { id: id.clone() })
            .await
            .unwrap_or_else(|s| panic!("acknowledged {id} lost after kill -9: {s}"))
            .into_inner()
            .machine
            .unwrap();
        assert_eq!(
            got.version.as_ref(),
            Some(v),
            "{id} came back with another version"
        );
    }
    let mut listed = 0;
    for app in 0..4 {
        listed += client
            .list_instances(ListInstancesRequest {
                app: format!("app{app}"),
                include_all: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .machines
            .len();
    }
    assert!(
        listed >= acked.len(),
        "index rebuilt with {listed} of {} machines",
        acked.len()
    );
    let next = client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("after", "app0", 9)),
        })
        .await
        .unwrap()
        .into_inner()
        .machine
        .unwrap()
        .version
        .unwrap();
    assert!(
        next.seq > max_seq,
        "seq {} reused (max acknowledged {max_seq})",
        next.seq
    );
    let origin = acked.values().next().unwrap().origin;
    assert_eq!(next.origin, origin, "the store kept its identity");
}
