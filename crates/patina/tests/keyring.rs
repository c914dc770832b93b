//! Encrypted gossip with real processes: a running plaintext region turned encrypted with
//! `patina keyring` (install, use, refuse plaintext) while writes go on, with no member ever
//! suspected; then an agent without the key (plaintext) and one with another key never
//! become members, their datagrams dropped and counted; a key in use cannot be removed; the
//! keyring outlives a restart.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Agent, GOSSIP_KEY, OTHER_GOSSIP_KEY, cli, cli_ok, eventually, gossip_table};
use patina_proto::v1::MembersRequest;

fn member(root: &Path, i: usize, seeds: &[usize], extra: &str) -> Agent {
    let ip = format!("127.0.0.{}", 191 + i);
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("127.0.0.{}", 191 + s))
        .collect();
    Agent::start_host(
        common::bin(),
        &root.join(format!("agent{i}")),
        &ip,
        &format!("worker-{i}"),
        &format!("{}{extra}", gossip_table(&ip, &seeds)),
    )
    .expect("start patina")
}

/// The gossip addresses an agent lists as members in any state.
async fn listed(agent: &Agent) -> Vec<(String, String)> {
    let Ok(r) = agent.admin().await.members(MembersRequest {}).await else {
        return Vec::new();
    };
    r.into_inner()
        .members
        .into_iter()
        .map(|m| (m.address, m.state))
        .collect()
}

/// Machines of app web the agent lists (0 when it does not answer).
async fn ids(agent: &Agent) -> usize {
    let mut client = agent.client().await;
    patina_testkit::list_pages(&mut client, "web", true, 1000)
        .await
        .iter()
        .map(Vec::len)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_enable_encrypts_gossip_and_keeps_outsiders_out() {
    let root = tempfile::tempdir().unwrap();
    let mut agents = vec![
        member(root.path(), 0, &[], ""),
        member(root.path(), 1, &[0], ""),
        member(root.path(), 2, &[0], ""),
    ];
    for a in &agents {
        assert!(
            eventually(Duration::from_secs(20), || async {
                a.alive_members().await == 2
            })
            .await
            .is_some(),
            "the plaintext region did not form"
        );
    }

    // Watch every agent's membership for the whole change: nobody may be suspected.
    let stop = Arc::new(AtomicBool::new(false));
    let mut watchers = Vec::new();
    for a in &agents {
        let (url, stop) = (a.url.clone(), stop.clone());
        watchers.push(tokio::spawn(async move {
            let mut admin = patina_proto::v1::admin_client::AdminClient::new(
                tonic::transport::Channel::from_shared(url)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap(),
            );
            let mut bad = Vec::new();
            // Bounded: at most five minutes of polls.
            for _ in 0..3000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(r) = admin.members(MembersRequest {}).await {
                    for m in r.into_inner().members {
                        if m.state != "alive" {
                            bad.push(format!("{} {}", m.address, m.state));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            bad
        }));
    }

    let server = agents[0].host_port().to_owned();
    // What would cut members off is refused on every agent before anything changes: using a
    // key one of them lacks, refusing plaintext while they send it.
    cli_ok(&[
        "keyring",
        "install",
        GOSSIP_KEY,
        "--local-only",
        "--server",
        &server,
    ]);
    for refused in [
        vec!["keyring", "use", GOSSIP_KEY],
        vec!["keyring", "plaintext", "refuse"],
    ] {
        let out = cli(&[&refused[..], &["--server", &server]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{refused:?}");
        assert!(err.contains("nothing was changed"), "{refused:?}: {err}");
    }
    let list = cli_ok(&["keyring", "list", "--server", &server]);
    assert!(list.contains("installed on 1, in use on 0"), "{list}");
    let mut written = 0;
    for step in [
        vec!["keyring", "install", GOSSIP_KEY],
        vec!["keyring", "use", GOSSIP_KEY],
        vec!["keyring", "plaintext", "refuse"],
    ] {
        let out = cli_ok(&[&step[..], &["--server", &server]].concat());
        assert!(out.contains("3 of 3 agents answered"), "{step:?}: {out}");
        // Writes go on and reach every agent.
        for (i, a) in agents.iter().enumerate() {
            common::put_app_machine(a, &format!("m{written}-{i}"), "web", true).await;
        }
        written += agents.len();
        for a in &agents {
            assert!(
                eventually(Duration::from_secs(10), || async {
                    ids(a).await == written
                })
                .await
                .is_some(),
                "after {step:?}: an agent lacks writes"
            );
        }
    }
    let list = cli_ok(&["keyring", "list", "--server", &server]);
    assert_eq!(list.matches("plaintext refused").count(), 3, "{list}");
    assert!(list.contains("installed on 3, in use on 3"), "{list}");
    assert!(
        !list.contains(GOSSIP_KEY),
        "a list shows fingerprints, never keys"
    );
    stop.store(true, Ordering::Relaxed);
    for w in watchers {
        let bad = w.await.unwrap();
        assert!(
            bad.is_empty(),
            "members were suspected during the change: {bad:?}"
        );
    }

    // A key in use cannot be removed; nothing changed anywhere.
    let out = cli(&["keyring", "remove", GOSSIP_KEY, "--server", &server]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    // A bad key is refused before it leaves the machine.
    assert!(
        !cli(&["keyring", "install", "short", "--server", &server])
            .status
            .success()
    );

    // Outsiders: one in plaintext, one with another key, both seeding through agent 0.
    let plain = member(root.path(), 3, &[0], "");
    let other = member(
        root.path(),
        4,
        &[0],
        &format!("encrypt = \"{OTHER_GOSSIP_KEY}\"\n"),
    );
    common::put_app_machine(&plain, "outsider-3", "web", true).await;
    common::put_app_machine(&other, "outsider-4", "web", true).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let outsiders = ["127.0.0.194", "127.0.0.195"];
    for a in &agents {
        let members = listed(a).await;
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(
            members
                .iter()
                .all(|(addr, _)| outsiders.iter().all(|o| !addr.starts_with(o))),
            "an outsider became a member: {members:?}"
        );
        assert_eq!(ids(a).await, written, "an outsider's write got in");
    }
    assert!(listed(&plain).await.is_empty() && listed(&other).await.is_empty());
    let status = agents[0].cluster_status().await;
    assert!(status.dropped_plaintext > 0, "{status:?}");
    assert!(status.dropped_no_key > 0, "{status:?}");

    // The keyring outlives a restart: agent 2 comes back sealing with the key.
    agents[2].stop().unwrap();
    agents[2].restart(common::bin(), "region").unwrap();
    let back = &agents[2];
    assert!(
        eventually(Duration::from_secs(20), || async {
            back.alive_members().await == 2
        })
        .await
        .is_some(),
        "the restarted agent did not rejoin"
    );
    let list = cli_ok(&[
        "keyring",
        "list",
        "--local-only",
        "--server",
        back.host_port(),
    ]);
    assert!(list.contains("(in use); plaintext refused"), "{list}");

    // Two more changes that would cut members off, refused when another member would be:
    // removing a key another member still seals with, and sending plaintext while other
    // members refuse it. Agent 0 alone would take both.
    let next = cli_ok(&["keyring", "generate"]).trim().to_owned();
    cli_ok(&["keyring", "install", &next, "--server", &server]);
    cli_ok(&["keyring", "use", &next, "--local-only", "--server", &server]);
    cli_ok(&[
        "keyring",
        "plaintext",
        "accept",
        "--local-only",
        "--server",
        &server,
    ]);
    for (refused, why) in [
        (vec!["keyring", "remove", GOSSIP_KEY], "still in use on"),
        (vec!["keyring", "stop-sealing"], "plaintext is refused by"),
    ] {
        let out = cli(&[&refused[..], &["--server", &server]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{refused:?}");
        assert!(
            err.contains(why) && err.contains("nothing was changed"),
            "{refused:?}: {err}"
        );
    }
    let list = cli_ok(&["keyring", "list", "--local-only", "--server", &server]);
    assert_eq!(list.matches("(in use)").count(), 1, "{list}");
    let list = cli_ok(&["keyring", "list", "--server", &server]);
    assert_eq!(list.matches("installed on 3").count(), 2, "{list}");
}
