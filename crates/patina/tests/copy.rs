//! A data directory copied to a second agent that then joins the cluster: the two see one
//! origin in two live members and one moves to a fresh origin; afterwards no `(origin, seq)`
//! names two records anywhere, and every write of both agents is served by every agent.
//! (Writes that both make under the shared origin before they meet are not covered: see
//! docs/replication.md, "Not yet".)

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use patina_proto::v1::{ListInstancesRequest, MembersRequest, UpsertMachineRequest};
use patina_testkit::{Agent, machine};

const GOSSIP_PORT: u16 = 7946;
const CONVERGE: Duration = Duration::from_secs(30);

fn start(root: &Path, name: &str, ip: &str) -> Agent {
    let extra = format!(
        "[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [\"127.0.0.51:{GOSSIP_PORT}\", \"127.0.0.52:{GOSSIP_PORT}\"]\n"
    );
    Agent::start_host(
        Path::new(env!("CARGO_BIN_EXE_patina")),
        &root.join(name),
        ip,
        &format!("worker-{name}"),
        &extra,
    )
    .expect("start patina")
}

async fn put(agent: &Agent, id: &str) {
    agent
        .client()
        .await
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine(id, "web", 8080)),
        })
        .await
        .expect("upsert");
}

/// (id, origin, seq) of every machine an agent serves.
async fn versions(agent: &Agent) -> Vec<(String, u64, u64)> {
    let machines = agent
        .client()
        .await
        .list_instances(ListInstancesRequest {
            app: "web".into(),
            include_all: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .machines;
    let mut out: Vec<(String, u64, u64)> = machines
        .into_iter()
        .map(|m| {
            let v = m.version.unwrap_or_default();
            (m.id, v.origin, v.seq)
        })
        .collect();
    out.sort();
    out
}

/// The origin an agent writes as, as its admin service reports it.
async fn this_id(agent: &Agent) -> String {
    let Ok(r) = agent.admin().await.members(MembersRequest {}).await else {
        return String::new();
    };
    r.into_inner().this.map(|m| m.id).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_data_dir_never_makes_one_version_name_two_records() {
    let root = tempfile::tempdir().unwrap();
    let mut a = start(root.path(), "a", "127.0.0.51");
    let b = start(root.path(), "b", "127.0.0.52");
    let deadline = Instant::now() + CONVERGE;
    while a.alive_members().await < 1 || b.alive_members().await < 1 {
        assert!(Instant::now() < deadline, "a and b never met");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 1..=3 {
        put(&a, &format!("a-{i}")).await;
    }
    // Copy a's data directory while a is stopped, then run both.
    assert!(a.stop().unwrap(), "a stopped cleanly");
    let copy = root.path().join("c").join("data");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(root.path().join("a").join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    let a = start(root.path(), "a", "127.0.0.51");
    let c = start(root.path(), "c", "127.0.0.53");
    // They meet, see one origin in two live members, and the newer one moves to a fresh
    // origin before either writes again.
    let deadline = Instant::now() + CONVERGE;
    while this_id(&a).await == this_id(&c).await {
        assert!(
            Instant::now() < deadline,
            "the copy never left the shared origin"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 4..=5 {
        put(&a, &format!("a-{i}")).await;
        put(&c, &format!("c-{i}")).await;
    }
    let want: Vec<String> = ["a-1", "a-2", "a-3", "a-4", "a-5", "c-4", "c-5"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let agents = [&a, &b, &c];
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut all = Vec::new();
        for x in agents {
            all.push(versions(x).await);
        }
        let ids_ok = all
            .iter()
            .all(|v| v.iter().map(|(id, _, _)| id.clone()).collect::<Vec<_>>() == want);
        let same = all.windows(2).all(|w| w[0] == w[1]);
        if ids_ok && same {
            // One version, one record, across the whole cluster.
            let mut named: BTreeMap<(u64, u64), String> = BTreeMap::new();
            for v in &all {
                for (id, origin, seq) in v {
                    let prev = named.insert((*origin, *seq), id.clone());
                    assert!(
                        prev.as_ref().is_none_or(|p| p == id),
                        "({origin:x}, {seq}) names both {prev:?} and {id}"
                    );
                }
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the agents never converged: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
