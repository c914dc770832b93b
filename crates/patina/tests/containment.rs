//! Containment with real processes: a faulty region agent never pushes wrong counts past the
//! bridges to the edges. A region of three agents (ord1, ord2, ord3) holds a fixed set of
//! machines, all owned by ord2 and ord3; two bridges follow [ord1, ord2, ord3]; two global
//! agents are the edges, polled every 100 ms for the region's true counts throughout:
//!
//! - ord1, the agent the bridges follow, is cut off from ord2 and ord3 (every packet between
//!   them refused by the kernel, TCP and UDP): it takes them for down and hides all their
//!   machines, from a view that does not stand;
//! - ord1 is killed, its data directory wiped, and restarted while it cannot reach its peers
//!   and the bridges cannot reach the others: it shows an empty region;
//! - a bridge configured for ord is pointed at fra's only agent, which has no machines.
//!
//! The agents run in a network namespace this test creates (root only), so that paths
//! between loopback addresses can be cut: the test binary runs itself inside it.

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    Agent, eventually, put_app_machine as put, start_bridge, start_global, start_region_agent,
};
use patina_proto::v1::{ListInstancesRequest, LookupAppRequest, WhoamiRequest};

const IN_NETNS: &str = "PATINA_CONTAINMENT_IN_NETNS";
const INNER: &str = "inside_a_namespace_faulty_agents_never_reach_the_edges";

/// The region's true counts, (app, healthy, total), which never change during the test.
const TRUTH: [(&str, u32, u32); 3] = [("web", 3, 4), ("api", 1, 1), ("batch", 0, 2)];

#[test]
fn a_bridge_publishes_only_standing_views_of_its_own_region() {
    if !common::is_root() {
        eprintln!("SKIPPED: cutting paths in a network namespace needs root (CI runs as root)");
        return;
    }
    let name = format!("patina-contain-{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "create a network namespace");
    let ns = Netns(name);
    ns.setup();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(&exe)
        .args([
            INNER,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(IN_NETNS, "1")
        .output()
        .expect("run the scenario in the namespace");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed"),
        "the scenario failed inside its network namespace:\n{text}"
    );
    for line in text.lines().filter(|l| l.starts_with("containment:")) {
        eprintln!("{line}");
    }
}

/// A network namespace (deleted on drop).
struct Netns(String);

impl Netns {
    /// Loopback up, and the local routing table behind rule 100, so that rules before it can
    /// refuse traffic between loopback addresses.
    fn setup(&self) {
        for args in [
            &["link", "set", "lo", "up"][..],
            &["rule", "add", "pref", "100", "lookup", "local"],
            &["rule", "del", "pref", "0"],
        ] {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.0, "ip"])
                .args(args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?} in the namespace");
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Refuse (or, with `heal`, allow again) every packet between the addresses of `a` and `b`,
/// both ways. Run inside the namespace.
fn cut(a: &[&str], b: &[&str], heal: bool) {
    for x in a {
        for y in b {
            for (from, to) in [(x, y), (y, x)] {
                let verb = if heal { "del" } else { "add" };
                let ok = Command::new("ip")
                    .args([
                        "rule", verb, "pref", "10", "from", from, "to", to, "prohibit",
                    ])
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "ip rule {verb} {from} -> {to}");
            }
        }
    }
}

/// `(healthy, total)` of `app` in ord as edge `g` answers; `None` when ord is not listed
/// (or the call failed).
async fn ord_counts(g: &str, app: &str) -> Option<(u32, u32)> {
    let channel = tonic::transport::Channel::from_shared(g.to_owned())
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .ok()?;
    let answer = patina_proto::v1::global_client::GlobalClient::new(channel)
        .lookup_app(LookupAppRequest {
            app: app.into(),
            from_region: "ord".into(),
            include_empty: true,
        })
        .await
        .ok()?
        .into_inner();
    answer
        .regions
        .into_iter()
        .find(|r| r.region == "ord")
        .map(|r| (r.healthy, r.total))
}

async fn shows_truth(g: &str) -> bool {
    for (app, healthy, total) in TRUTH {
        if ord_counts(g, app).await != Some((healthy, total)) {
            return false;
        }
    }
    true
}

/// Whether `agent`'s view stands, by Whoami.
async fn stands(agent: &Agent) -> bool {
    let Ok(mut admin) = tokio::time::timeout(Duration::from_secs(1), agent.admin()).await else {
        return false;
    };
    admin
        .whoami(WhoamiRequest {})
        .await
        .ok()
        .and_then(|m| m.into_inner().view)
        .is_some_and(|v| v.stands)
}

/// Machines of `app` `agent` lists (routable or not).
async fn listed(agent: &Agent, app: &str) -> usize {
    let mut client = agent.client().await;
    client
        .list_instances(ListInstancesRequest {
            app: app.into(),
            include_all: true,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().machines.len())
        .unwrap_or(0)
}

/// Polls every edge every 100 ms and records every answer that is not the truth.
struct Recorder {
    wrong: Arc<Mutex<Vec<String>>>,
    polls: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    fn start(edges: Vec<String>) -> Recorder {
        let wrong: Arc<Mutex<Vec<String>>> = Arc::default();
        let polls: Arc<Mutex<u64>> = Arc::default();
        let (w, p) = (wrong.clone(), polls.clone());
        let started = Instant::now();
        let task = tokio::spawn(async move {
            // Bounded: the test stops it long before (about 15 minutes at most).
            for _ in 0..9_000 {
                for g in &edges {
                    for (app, healthy, total) in TRUTH {
                        let got = ord_counts(g, app).await;
                        if got != Some((healthy, total)) {
                            let mut w = w.lock().unwrap();
                            if w.len() < 100 {
                                w.push(format!(
                                    "{:?}: {g} says {app} in ord is {got:?}, not ({healthy}, {total})",
                                    started.elapsed()
                                ));
                            }
                        }
                    }
                }
                *p.lock().unwrap() += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Recorder { wrong, polls, task }
    }

    /// Stop; the wrong answers seen, and the number of polls.
    fn stop(self) -> (Vec<String>, u64) {
        self.task.abort();
        let wrong = self.wrong.lock().unwrap().clone();
        let polls = *self.polls.lock().unwrap();
        (wrong, polls)
    }

    fn wrong_so_far(&self) -> Vec<String> {
        self.wrong.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run inside a network namespace by a_bridge_publishes_only_standing_views_of_its_own_region"]
async fn inside_a_namespace_faulty_agents_never_reach_the_edges() {
    assert!(
        std::env::var_os(IN_NETNS).is_some(),
        "run by a_bridge_publishes_only_standing_views_of_its_own_region, inside its namespace"
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ords = ["127.0.1.1", "127.0.1.2", "127.0.1.3"];
    let bridges = ["127.0.2.1", "127.0.2.2"];
    let mut ord1 = start_region_agent(
        root,
        "ord1",
        ords[0],
        "ord",
        &[ords[1].into(), ords[2].into()],
    );
    let ord2 = start_region_agent(root, "ord2", ords[1], "ord", &[ords[0].into()]);
    let ord3 = start_region_agent(root, "ord3", ords[2], "ord", &[ords[0].into()]);
    let g1 = start_global(root, "g1", "127.0.3.1", "ord", &[], None);
    let seeds = ["127.0.3.1".to_owned()];
    let g2 = start_global(root, "g2", "127.0.3.2", "fra", &seeds, None);
    let followed = [&ord1, &ord2, &ord3];
    let _b1 = start_bridge(root, "b1", bridges[0], "ord", &followed, &seeds);
    let _b2 = start_bridge(root, "b2", bridges[1], "ord", &followed, &seeds);
    // Every machine is owned by ord2 or ord3: nothing that happens to ord1 changes the truth.
    put(&ord2, "web-1", "web", true).await;
    put(&ord2, "web-2", "web", true).await;
    put(&ord2, "api-1", "api", true).await;
    put(&ord3, "web-3", "web", true).await;
    put(&ord3, "web-4", "web", false).await;
    put(&ord3, "batch-1", "batch", false).await;
    put(&ord3, "batch-2", "batch", false).await;
    let edges = vec![g1.url.clone(), g2.url.clone()];
    let ready = eventually(Duration::from_secs(60), || async {
        shows_truth(&edges[0]).await && shows_truth(&edges[1]).await && stands(&ord1).await
    })
    .await;
    assert!(ready.is_some(), "every edge shows ord's true counts");
    let recorder = Recorder::start(edges.clone());

    // 1. The followed agent is cut off from its peers.
    cut(&ords[..1], &ords[1..], false);
    let fault = eventually(Duration::from_secs(20), || async {
        !stands(&ord1).await && listed(&ord1, "web").await == 0
    })
    .await;
    assert!(
        fault.is_some(),
        "cut off, ord1 hides its peers' machines and its view does not stand"
    );
    eprintln!("containment: ord1 cut off; it hid every machine within {fault:?}");
    tokio::time::sleep(Duration::from_secs(15)).await;
    cut(&ords[..1], &ords[1..], true);
    let healed = eventually(Duration::from_secs(60), || async {
        stands(&ord1).await && listed(&ord1, "web").await == 4
    })
    .await;
    assert!(healed.is_some(), "healed, ord1's view stands again");
    assert_eq!(recorder.wrong_so_far(), Vec::<String>::new(), "cut off");

    // 2. ord1 is wiped and restarted empty, cut off from its peers, and the bridges can
    //    reach no other agent.
    cut(&ords[..1], &ords[1..], false);
    cut(&bridges, &ords[1..], false);
    ord1.kill9();
    std::fs::remove_dir_all(root.join("ord1").join("data")).unwrap();
    ord1.restart(common::bin(), "region").unwrap();
    assert_eq!(listed(&ord1, "web").await, 0, "restarted empty");
    assert!(
        !stands(&ord1).await,
        "an empty agent that cannot reach its peers does not stand"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    cut(&bridges, &ords[1..], true);
    cut(&ords[..1], &ords[1..], true);
    let synced = eventually(Duration::from_secs(60), || async {
        stands(&ord1).await && listed(&ord1, "web").await == 4
    })
    .await;
    assert!(synced.is_some(), "ord1 catches up and stands");
    eprintln!("containment: wiped ord1 caught up and stood {synced:?} after the heal");
    assert_eq!(recorder.wrong_so_far(), Vec::<String>::new(), "wiped");

    // 3. A bridge configured for ord, pointed at fra's only agent (no machines, a view that
    //    stands): refused by region.
    let fra1 = start_region_agent(root, "fra1", "127.0.4.1", "fra", &[]);
    let _wrong = start_bridge(root, "b-wrong", "127.0.4.2", "ord", &[&fra1], &seeds);
    assert!(
        eventually(Duration::from_secs(20), || stands(&fra1))
            .await
            .is_some(),
        "fra's agent stands"
    );
    tokio::time::sleep(Duration::from_secs(12)).await;

    let (wrong, polls) = recorder.stop();
    assert!(
        polls >= 300,
        "the edges were polled throughout ({polls} rounds)"
    );
    assert_eq!(
        wrong,
        Vec::<String>::new(),
        "every edge kept ord's true counts"
    );
    eprintln!("containment: {polls} rounds of polls of 2 edges x 3 apps, every answer true");
    drop((ord2, ord3));
}
