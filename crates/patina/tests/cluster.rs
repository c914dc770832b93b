//! A region of five real agents on loopback: a write at one is served by all; SIGKILL one and
//! the other four stop listing its machines with no write (found by the agents attending it);
//! restart it and it catches up by
//! anti-entropy while its machines return everywhere.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, machine};
use patina_proto::v1::{ListInstancesRequest, UpsertMachineRequest};

const AGENTS: usize = 5;
/// Generous bounds for a loaded CI machine; the benchmark measures the real figures.
const CONVERGE: Duration = Duration::from_secs(20);

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 31 + i)
}

fn start(root: &Path, i: usize) -> Agent {
    common::start_member(root, i, &ip(i), &[ip(0), ip(1)])
}

/// Ids of an app's instances as an agent serves them.
async fn listed(agent: &Agent, app: &str) -> Vec<String> {
    let mut client = agent.client().await;
    let mut ids: Vec<String> = client
        .list_instances(ListInstancesRequest {
            app: app.into(),
            ..Default::default()
        })
        .await
        .expect("ListInstances")
        .into_inner()
        .machines
        .into_iter()
        .map(|m| m.id)
        .collect();
    ids.sort();
    ids
}

/// Poll until `check` holds for every agent in `agents`, or fail with `what`.
async fn eventually(
    agents: &[&Agent],
    what: &str,
    check: impl AsyncFn(&Agent) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for a in agents {
            if !check(a).await {
                all = false;
                break;
            }
        }
        if all {
            return start.elapsed();
        }
        assert!(start.elapsed() < CONVERGE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster_status(agent: &Agent) -> patina_proto::v1::ClusterStatusResponse {
    agent
        .admin()
        .await
        .cluster_status(patina_proto::v1::ClusterStatusRequest {})
        .await
        .expect("ClusterStatus")
        .into_inner()
}

async fn put(agent: &Agent, id: &str, app: &str) {
    let mut client = agent.client().await;
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine(id, app, 8080)),
        })
        .await
        .expect("upsert");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_of_five_converges_hides_the_dead_and_catches_up_the_returning() {
    let root = tempfile::tempdir().unwrap();
    let mut agents: Vec<Agent> = (0..AGENTS).map(|i| start(root.path(), i)).collect();
    let all: Vec<&Agent> = agents.iter().collect();
    eventually(&all, "every agent sees four alive members", async |a| {
        a.alive_members().await == AGENTS - 1
    })
    .await;
    // Whoami (what the last check of a suspect asks) names the agent as Members does.
    for a in &all {
        let mut admin = a.admin().await;
        let me = admin
            .whoami(patina_proto::v1::WhoamiRequest {})
            .await
            .unwrap()
            .into_inner();
        let this = admin
            .members(patina_proto::v1::MembersRequest {})
            .await
            .unwrap()
            .into_inner()
            .this
            .unwrap();
        assert_eq!(
            (&me.id, me.epoch, &me.address),
            (&this.id, this.epoch, &this.address)
        );
    }

    // Each agent runs one machine of app "web" (it owns it).
    for (i, a) in agents.iter().enumerate() {
        put(a, &format!("web-{i}"), "web").await;
    }
    let every: Vec<String> = (0..AGENTS).map(|i| format!("web-{i}")).collect();
    let took = eventually(&all, "every agent serves every machine", async |a| {
        listed(a, "web").await == every
    })
    .await;
    eprintln!("write to everywhere: {took:?}");
    // Status shows the latest session with each peer (joins start one at once), through the
    // CLI's JSON too.
    let status = cluster_status(&agents[0]).await;
    assert!(
        status.peers.iter().any(|p| p.ok && p.sessions >= 1),
        "no completed session in {:?}",
        status.peers
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(["status", "--json", "--server", agents[0].host_port()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        json["peers"].as_array().is_some_and(|p| !p.is_empty()),
        "{json}"
    );
    assert_eq!(
        (&json["view"]["stands"], &json["view"]["region"]),
        (&serde_json::json!(true), &serde_json::json!("test")),
        "a joined, synced agent's view stands: {json}"
    );

    // SIGKILL the last agent: the others stop listing its machine, with no write.
    agents[AGENTS - 1].kill9();
    let killed = Instant::now();
    let survivors: Vec<&Agent> = agents[..AGENTS - 1].iter().collect();
    let without: Vec<String> = every[..AGENTS - 1].to_vec();
    eventually(
        &survivors,
        "the survivors stop listing the dead agent's machine",
        async |a| listed(a, "web").await == without,
    )
    .await;
    eprintln!("crash to excluded: {:?}", killed.elapsed());
    // The agents attending it (each agent attends the next two on the ring of gossip
    // addresses) saw its stream end and its port refuse: they suspected it at once.
    // (A report can land after the survivors excluded it: under load SWIM's news may come
    // first, while an attendant still makes its connection checks. Read for up to 3 s.)
    let mut reported = 0;
    let read_until = Instant::now() + Duration::from_secs(3);
    while reported == 0 && Instant::now() < read_until {
        reported = 0;
        for a in &survivors {
            reported += cluster_status(a).await.attend_unreachable;
        }
        if reported == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        (1..=2).contains(&reported),
        "attendants that found the killed agent gone: {reported}"
    );
    // Having hidden it, the survivors' views stand again once each has heard from a majority
    // since (a bridge following one publishes the loss then).
    eventually(&survivors, "the survivors' views stand again", async |a| {
        stands(a).await
    })
    .await;
    eprintln!("crash to standing again: {:?}", killed.elapsed());

    // While it is down, a write happens elsewhere; it returns and catches up, and its own
    // machine comes back everywhere.
    put(&agents[0], "api-0", "api").await;
    agents[AGENTS - 1] = start(root.path(), AGENTS - 1);
    let all: Vec<&Agent> = agents.iter().collect();
    eventually(
        &all,
        "the returned agent's machine is listed again everywhere",
        async |a| listed(a, "web").await == every,
    )
    .await;
    eventually(&all, "the returned agent caught up", async |a| {
        listed(a, "api").await == ["api-0"]
    })
    .await;
    // What its sessions brought is counted, records and bytes.
    let back = cluster_status(&agents[AGENTS - 1]).await;
    // A machine record is more than 40 bytes encoded (its id, app, address and version).
    assert!(
        back.sync_records_in >= 1 && back.sync_bytes_in >= 40 * back.sync_records_in,
        "records {} and bytes {} in",
        back.sync_records_in,
        back.sync_bytes_in
    );
}

/// Whether `agent`'s view stands, by Whoami.
async fn stands(agent: &Agent) -> bool {
    let Ok(me) = agent
        .admin()
        .await
        .whoami(patina_proto::v1::WhoamiRequest {})
        .await
    else {
        return false;
    };
    me.into_inner().view.is_some_and(|v| v.stands)
}
