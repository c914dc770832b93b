//! The global tier with real processes on loopback: region agents, bridges (`patina bridge`)
//! and global agents (`patina global`), each on an IP of its own.

mod common;

use std::time::Duration;

use common::{
    Agent, bin, eventually, lookup, machine, put_app_machine as put, start_bridge, start_global,
    start_region_agent,
};
use patina_proto::v1::{MachineState, UpsertMachineRequest};

fn lists(answer: &[(String, u32, u32)], region: &str) -> bool {
    answer.iter().any(|(r, _, _)| r == region)
}

/// Down news, end to end: the last healthy instance of an app in one region stops; every
/// global agent's lookup (from another region) stops listing that region; it starts again
/// and the region comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_instance_of_an_app_stopping_in_a_region_reaches_every_global_agent() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord1 = start_region_agent(root, "ord1", "127.0.0.81", "ord", &["127.0.0.82".into()]);
    let ord2 = start_region_agent(root, "ord2", "127.0.0.82", "ord", &["127.0.0.81".into()]);
    let fra1 = start_region_agent(root, "fra1", "127.0.0.83", "fra", &[]);
    let seeds = ["127.0.0.84".to_owned()];
    let g1 = start_global(root, "g1", "127.0.0.84", "fra", &[], None);
    let g2 = start_global(root, "g2", "127.0.0.85", "syd", &seeds, None);
    let _b_ord = start_bridge(root, "b-ord", "127.0.0.86", "ord", &[&ord1, &ord2], &seeds);
    let _b_fra = start_bridge(root, "b-fra", "127.0.0.87", "fra", &[&fra1], &seeds);
    put(&ord2, "web-1", "web", true).await;
    put(&fra1, "web-2", "web", true).await;
    let globals = [&g1, &g2];
    let both = eventually(Duration::from_secs(30), || async {
        for g in globals {
            let a = lookup(g, "web", "fra", false).await;
            if !(lists(&a, "ord") && lists(&a, "fra")) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(both.is_some(), "every global agent lists both regions");
    assert_eq!(
        lookup(&g1, "web", "fra", false).await,
        [("fra".to_owned(), 1, 1), ("ord".to_owned(), 1, 1)],
        "nearest first from fra"
    );
    // Many apps in one call: each as LookupApp answers it, in the order asked.
    let mut gc = patina_proto::v1::global_client::GlobalClient::new(g1.channel().await);
    let many = gc
        .lookup_apps(patina_proto::v1::LookupAppsRequest {
            apps: vec!["web".into(), "nope".into(), "web".into()],
            from_region: "ord".into(),
            include_empty: false,
        })
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(String, Vec<String>)> = many
        .apps
        .iter()
        .map(|a| {
            (
                a.app.clone(),
                a.regions.iter().map(|r| r.region.clone()).collect(),
            )
        })
        .collect();
    let web = vec!["ord".to_owned(), "fra".to_owned()];
    assert_eq!(
        got,
        [
            ("web".to_owned(), web.clone()),
            ("nope".to_owned(), vec![]),
            ("web".to_owned(), web)
        ]
    );
    for (apps, code) in [
        (
            vec!["web".to_owned(), "Bad App".to_owned()],
            tonic::Code::InvalidArgument,
        ),
        (vec!["web".to_owned(); 1001], tonic::Code::InvalidArgument),
    ] {
        let err = gc
            .lookup_apps(patina_proto::v1::LookupAppsRequest {
                apps,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
    }
    // The command line says the same.
    let json = common::cli_ok(&[
        "lookup",
        "--server",
        g2.host_port(),
        "web",
        "--from",
        "fra",
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let regions: Vec<&str> = doc["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["region"].as_str().unwrap())
        .collect();
    assert_eq!(regions, ["fra", "ord"]);
    assert_eq!(doc["regions"][0]["rtt_ms"], 0);
    let bad = common::cli(&["lookup", "--server", g2.host_port(), "Not An App"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("InvalidArgument") && err.contains("not a DNS label"),
        "{err}"
    );
    // Stop the last healthy instance in ord (through the other ord agent).
    put(&ord1, "web-1", "web", false).await;
    let gone = eventually(Duration::from_secs(10), || async {
        for g in globals {
            if lists(&lookup(g, "web", "fra", false).await, "ord") {
                return false;
            }
        }
        true
    })
    .await;
    let took = gone.expect("every global agent stops listing ord");
    eprintln!("down news reached every global agent in {took:?}");
    // It is still known, with none healthy.
    assert!(
        lookup(&g2, "web", "fra", true)
            .await
            .contains(&("ord".to_owned(), 0, 1))
    );
    put(&ord2, "web-1", "web", true).await;
    let back = eventually(Duration::from_secs(10), || async {
        for g in globals {
            if !lists(&lookup(g, "web", "fra", false).await, "ord") {
                return false;
            }
        }
        true
    })
    .await;
    assert!(back.is_some(), "ord comes back");
    // The global cluster spread these changes along trees (`dissemination = "tree"`): the
    // first change of each bridge flooded the links, and the duplicates were pruned.
    let mut prunes = 0;
    for g in globals {
        prunes += g.cluster_status().await.tree_prunes;
    }
    assert!(prunes > 0, "no global agent pruned a tree link");
}

/// A bridge configured for one region but pointed at another region's agents publishes
/// nothing (it refuses the stream); and a global agent never lists a region for an app the
/// region does not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_pointed_at_another_regions_agents_publishes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.91", "ord", &[]);
    let seeds = ["127.0.0.92".to_owned()];
    let g = start_global(root, "g", "127.0.0.92", "ord", &[], None);
    // Configured for fra, following ord's agent.
    let _wrong = start_bridge(root, "b-wrong", "127.0.0.93", "fra", &[&ord], &seeds);
    put(&ord, "web-1", "web", true).await;
    // A correct bridge of ord shows the summary path works meanwhile.
    let _right = start_bridge(root, "b-ord", "127.0.0.94", "ord", &[&ord], &seeds);
    let listed = eventually(Duration::from_secs(30), || async {
        lists(&lookup(&g, "web", "ord", true).await, "ord")
    })
    .await;
    assert!(listed.is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        lookup(&g, "web", "ord", true).await,
        [("ord".to_owned(), 1, 1)],
        "nothing for fra"
    );
}

/// A region whose agents are all down leaves lookups after `global.stale_after_secs`; it
/// comes back when an agent returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_whose_agents_are_all_down_ages_out_of_lookups() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut ord = start_region_agent(root, "ord", "127.0.0.101", "ord", &[]);
    let fra = start_region_agent(root, "fra", "127.0.0.102", "fra", &[]);
    let seeds = ["127.0.0.103".to_owned()];
    let table = common::REGION_TABLE.replace("stale_after_secs = 30", "stale_after_secs = 3");
    let g = start_global(root, "g", "127.0.0.103", "fra", &[], Some(&table));
    let _b_ord = start_bridge(root, "b-ord", "127.0.0.104", "ord", &[&ord], &seeds);
    let _b_fra = start_bridge(root, "b-fra", "127.0.0.105", "fra", &[&fra], &seeds);
    put(&ord, "web-1", "web", true).await;
    put(&fra, "web-2", "web", true).await;
    let both = eventually(Duration::from_secs(30), || async {
        lookup(&g, "web", "fra", false).await.len() == 2
    })
    .await;
    assert!(both.is_some());
    ord.kill9();
    let aged = eventually(Duration::from_secs(30), || async {
        lookup(&g, "web", "fra", false).await == [("fra".to_owned(), 1, 1)]
    })
    .await;
    let took = aged.expect("ord ages out of lookups");
    eprintln!("ord left lookups {took:?} after its only agent died (stale_after 3 s)");
    ord.restart(bin(), "region").unwrap();
    let back = eventually(Duration::from_secs(30), || async {
        lookup(&g, "web", "fra", false).await.len() == 2
    })
    .await;
    assert!(back.is_some(), "ord comes back with its agent");
}

/// (healthy, total) of every app in the region, from the region agent itself.
async fn truth(agent: &Agent, apps: &[String]) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for app in apps {
        let all: Vec<_> = patina_testkit::list_pages(&mut agent.client().await, app, true, 1000)
            .await
            .concat();
        let healthy = all
            .iter()
            .filter(|m| {
                m.state == MachineState::Started as i32
                    && m.health == patina_proto::v1::Health::Passing as i32
            })
            .count();
        out.push((healthy as u32, all.len() as u32));
    }
    out
}

/// What a global agent lists for each app in `region`: `(healthy, total)`, (0, 0) for none.
/// Panics on two entries for one region.
async fn listed(g: &Agent, apps: &[String], region: &str) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for app in apps {
        let answer = lookup(g, app, region, true).await;
        let mine: Vec<_> = answer.iter().filter(|(r, _, _)| r == region).collect();
        assert!(
            mine.len() <= 1,
            "two summaries of {app} in {region}: {answer:?}"
        );
        out.push(mine.first().map_or((0, 0), |(_, h, t)| (*h, *t)));
    }
    out
}

/// Two bridges for one region, one killed mid-stream and restarted, then the other killed for
/// good: the global tier ends with exactly the region's counts, one summary per app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_bridges_one_killed_mid_stream_and_restarted_leave_exactly_the_right_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.111", "ord", &[]);
    let seeds = ["127.0.0.112".to_owned()];
    let g = start_global(root, "g", "127.0.0.112", "fra", &[], None);
    let mut b1 = start_bridge(root, "b1", "127.0.0.113", "ord", &[&ord], &seeds);
    let _b2 = start_bridge(root, "b2", "127.0.0.114", "ord", &[&ord], &seeds);
    let apps: Vec<String> = (0..12).map(|i| format!("app-{i}")).collect();
    let mut client = ord.client().await;
    // A fixed pseudo-random stream of changes: machines start, stop, fail checks, go away.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    for op in 0..400u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let app = &apps[(x % apps.len() as u64) as usize];
        let id = format!("{app}-m{}", (x >> 8) % 6);
        match (x >> 16) % 5 {
            0 => {
                let _ = client
                    .delete_machine(patina_proto::v1::DeleteMachineRequest { id })
                    .await;
            }
            k => {
                let mut m = machine(&id, app, 80);
                m.state = if k == 1 {
                    MachineState::Stopped
                } else {
                    MachineState::Started
                } as i32;
                if k == 2 {
                    m.health = patina_proto::v1::Health::Critical as i32;
                }
                client
                    .upsert_machine(UpsertMachineRequest { machine: Some(m) })
                    .await
                    .unwrap();
            }
        }
        if op == 150 {
            b1.kill9();
        }
        if op == 300 {
            b1.restart(bin(), "bridge").unwrap();
        }
        if op % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // One app with instances and none healthy, for certain.
    for i in 0..6 {
        put(&ord, &format!("app-0-m{i}"), "app-0", false).await;
    }
    let want = truth(&ord, &apps).await;
    assert!(want.iter().any(|c| c.0 > 0) && want[0] == (0, 6));
    let converged = eventually(Duration::from_secs(30), || async {
        listed(&g, &apps, "ord").await == want
    })
    .await;
    assert!(
        converged.is_some(),
        "the global tier has {:?}, the region {want:?}",
        listed(&g, &apps, "ord").await
    );
    // The restarted bridge republished every app from its fresh snapshot, so its summaries
    // stand: kill it for good and change the region. The other one alone takes over every
    // summary (the dead one's are hidden by the liveness overlay, then replaced).
    b1.kill9();
    for app in &apps[..4] {
        for i in 0..6 {
            let _ = client
                .delete_machine(patina_proto::v1::DeleteMachineRequest {
                    id: format!("{app}-m{i}"),
                })
                .await;
        }
    }
    put(&ord, "app-5-new", "app-5", true).await;
    let want = truth(&ord, &apps).await;
    // Until the global agent declares the dead bridge down, its summaries still show.
    let down = eventually(Duration::from_secs(30), || async {
        g.alive_members().await == 1
    })
    .await;
    eprintln!("the killed bridge was declared down after {down:?}");
    assert!(
        down.is_some(),
        "the global agent sees the killed bridge down"
    );
    let converged = eventually(Duration::from_secs(30), || async {
        listed(&g, &apps, "ord").await == want
    })
    .await;
    assert!(
        converged.is_some(),
        "after the restarted bridge died: the global tier has {:?}, the region {want:?}",
        listed(&g, &apps, "ord").await
    );
}

/// The edge library: a proxy's table follows a global agent through WatchApps, answers from
/// memory what the agent answers, and when that agent dies, follows the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_library_follows_global_agents_and_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.121", "ord", &[]);
    let fra = start_region_agent(root, "fra", "127.0.0.122", "fra", &[]);
    let seeds = ["127.0.0.123".to_owned()];
    let mut g1 = start_global(root, "g1", "127.0.0.123", "ord", &[], None);
    let g2 = start_global(root, "g2", "127.0.0.124", "fra", &seeds, None);
    let _b_ord = start_bridge(root, "b-ord", "127.0.0.125", "ord", &[&ord], &seeds);
    let _b_fra = start_bridge(root, "b-fra", "127.0.0.126", "fra", &[&fra], &seeds);
    put(&ord, "web-1", "web", true).await;
    put(&fra, "web-2", "web", true).await;
    let table = std::sync::Arc::new(patina_edge::Table::new(
        patina_edge::RegionTable::new(vec![
            patina_edge::RegionSpec {
                name: "ord".into(),
                lat: Some(41.98),
                lon: Some(-87.90),
                ..Default::default()
            },
            patina_edge::RegionSpec {
                name: "fra".into(),
                lat: Some(50.03),
                lon: Some(8.57),
                ..Default::default()
            },
        ])
        .unwrap(),
        Some(Duration::from_secs(30)),
    ));
    let edge = patina_edge::follow(
        vec![g1.url.clone(), g2.url.clone()],
        table.clone(),
        patina_trust::Dial::Plain,
    );
    let names = |t: &patina_edge::Table, app: &str, from: &str| -> Vec<String> {
        t.lookup(app, from)
            .iter()
            .map(|h| t.region_name(h.region).unwrap().to_string())
            .collect()
    };
    let both = eventually(Duration::from_secs(30), || async {
        names(&table, "web", "fra") == ["fra", "ord"]
    })
    .await;
    assert!(both.is_some(), "the edge table lists both, nearest first");
    assert!(*edge.synced.borrow());
    // Down news reaches the proxy's memory.
    put(&ord, "web-1", "web", false).await;
    let gone = eventually(Duration::from_secs(10), || async {
        names(&table, "web", "fra") == ["fra"]
    })
    .await;
    assert!(gone.is_some(), "the edge table leaves ord out");
    // The agent it follows stalls (SIGSTOP: its connections stay open, nothing answers):
    // the edge notices the silence, follows the other one, and still learns.
    // It starts at a random one of its servers: stall the one it follows.
    let followed = edge.following.borrow().clone();
    let pid = if followed == g1.url {
        g1.child.id()
    } else {
        assert_eq!(followed, g2.url, "it follows one of its servers");
        g2.child.id()
    };
    let stop = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
    };
    assert!(stop("-STOP").success());
    put(&ord, "web-1", "web", true).await;
    let back = eventually(Duration::from_secs(20), || async {
        names(&table, "web", "ord") == ["ord", "fra"]
    })
    .await;
    assert!(stop("-CONT").success());
    let took = back.expect("the edge table follows the second agent");
    eprintln!("the edge followed the other agent {took:?} after its agent stalled");
    assert_eq!(table.stats().refused, 0);
    g1.kill9();
}

/// A bridge's region is fixed by its first heartbeat: its data directory started again as a
/// bridge of another region is refused at start with a clear error (peers would refuse its
/// summaries for ever otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_data_directory_cannot_change_region() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.131", "ord", &[]);
    let mut bridge = start_bridge(root, "b", "127.0.0.132", "ord", &[&ord], &[]);
    // Its registration is written at start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bridge.stop().unwrap(), "a clean stop");
    let config = root.join("b").join("patina.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("region = \"ord\"", "region = \"fra\""),
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["bridge", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a bridge of region ord (not fra)"), "{err}");
    // The remedy it names works on a bridge's data directory (summaries, not machines).
    let out = std::process::Command::new(bin())
        .args(["new-origin", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "new-origin on a bridge's directory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    bridge
        .restart(bin(), "bridge")
        .expect("the bridge starts for fra under its new origin");
    let stopping = std::time::Instant::now();
    assert!(bridge.stop().unwrap(), "a clean stop");
    eprintln!("stopped in {:?}", stopping.elapsed());
}
