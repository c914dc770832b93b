//! A partition between real agents heals to one converged state with no operator action.
//!
//! Five agents run in a network namespace this test creates (root only), on its loopback
//! addresses. Policy-routing rules inside the namespace cut every packet from one group's
//! addresses to the other's, both ways (the kernel refuses them), and are deleted to heal.
//! During the cut each side writes; each side stops listing the other side's machines (their
//! owners are down to it); after the heal every agent lists everything and sees every member
//! alive. The test talks to the agents with the `patina` CLI run inside the namespace.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use patina_testkit::Agent;

const BIN: &str = env!("CARGO_BIN_EXE_patina");
const AGENTS: usize = 5;
const GOSSIP_PORT: u16 = 7946;
const CONVERGE: Duration = Duration::from_secs(30);

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 41 + i)
}

/// A network namespace with loopback up and the local routing table moved behind rule 100,
/// so that rules before it can refuse traffic between loopback addresses. Deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("patina-part-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns(name);
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["rule", "add", "pref", "100", "lookup", "local"]);
        ns.ip(&["rule", "del", "pref", "0"]);
        Some(ns)
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &self.0, "ip"])
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    fn wrapper(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.0]
    }

    /// Run the CLI inside the namespace; its stdout.
    fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, BIN])
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Cut (or, with `heal`, restore) every path between the two groups, both ways.
    fn cut(&self, a: &[usize], b: &[usize], heal: bool) {
        for &x in a {
            for &y in b {
                for (from, to) in [(ip(x), ip(y)), (ip(y), ip(x))] {
                    let verb = if heal { "del" } else { "add" };
                    self.ip(&[
                        "rule", verb, "pref", "10", "from", &from, "to", &to, "prohibit",
                    ]);
                }
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn listed(ns: &Netns, server: &str, app: &str) -> Vec<String> {
    let Some(out) = ns.cli(&["instances", "--server", server, app, "--json"]) else {
        return Vec::new();
    };
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut ids: Vec<String> = doc["machines"]
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn alive(ns: &Netns, server: &str) -> usize {
    let Some(out) = ns.cli(&["members", "--server", server, "--json"]) else {
        return 0;
    };
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    doc.as_array()
        .map(|ms| ms.iter().filter(|m| m["state"] == "alive").count())
        .unwrap_or(0)
        .saturating_sub(1) // the agent itself is listed first
}

fn put(ns: &Netns, server: &str, id: &str) {
    ns.cli(&[
        "machine",
        "put",
        "--server",
        server,
        "--app",
        "web",
        "--id",
        id,
        "--addr",
        "10.0.0.1:8080",
    ])
    .unwrap_or_else(|| panic!("put {id} at {server}"));
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < CONVERGE, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_partition_heals_to_one_converged_state() {
    if !common::is_root() {
        eprintln!("SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let Some(ns) = Netns::create() else {
        eprintln!("SKIPPED: `ip netns add` failed");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let wrapper = ns.wrapper();
    let agents: Vec<Agent> = (0..AGENTS)
        .map(|i| {
            let extra = format!(
                "[gossip]\nlisten = \"{}:{GOSSIP_PORT}\"\nseeds = [\"{}:{GOSSIP_PORT}\", \"{}:{GOSSIP_PORT}\"]\n",
                ip(i),
                ip(0),
                ip(AGENTS - 1),
            );
            Agent::start_wrapped(
                &wrapper,
                Path::new(BIN),
                &root.path().join(format!("agent{i}")),
                &ip(i),
                &format!("worker-{i}"),
                &extra,
            )
            .expect("start patina in the namespace")
        })
        .collect();
    let s: Vec<String> = agents.iter().map(|a| a.host_port().to_owned()).collect();
    eventually("every agent sees four alive members", || {
        s.iter().all(|x| alive(&ns, x) == AGENTS - 1)
    });
    for (i, x) in s.iter().enumerate() {
        put(&ns, x, &format!("web-{i}"));
    }
    let every: Vec<String> = (0..AGENTS).map(|i| format!("web-{i}")).collect();
    eventually("every agent lists every machine", || {
        s.iter().all(|x| listed(&ns, x, "web") == every)
    });

    let (left, right) = ([0usize, 1], [2usize, 3, 4]);
    ns.cut(&left, &right, false);
    put(&ns, &s[0], "left-side");
    put(&ns, &s[3], "right-side");
    let mut left_view: Vec<String> = vec!["left-side".into(), "web-0".into(), "web-1".into()];
    left_view.sort();
    let mut right_view: Vec<String> = vec![
        "right-side".into(),
        "web-2".into(),
        "web-3".into(),
        "web-4".into(),
    ];
    right_view.sort();
    eventually("each side lists only its own side's machines", || {
        left.iter().all(|&i| listed(&ns, &s[i], "web") == left_view)
            && right
                .iter()
                .all(|&i| listed(&ns, &s[i], "web") == right_view)
    });

    ns.cut(&left, &right, true);
    let mut all = every.clone();
    all.extend(["left-side".to_string(), "right-side".to_string()]);
    all.sort();
    eventually("after the heal every agent lists everything", || {
        s.iter().all(|x| listed(&ns, x, "web") == all)
    });
    eventually("after the heal every agent sees every member alive", || {
        s.iter().all(|x| alive(&ns, x) == AGENTS - 1)
    });
    drop(agents);
}
