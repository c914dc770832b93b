//! The DNS front end of real agents, asked by a stock client (`dig`, Debian's
//! bind9-dnsutils, which `cargo xtask test` installs): A, AAAA and SRV, an unknown app, a
//! name outside the zone, over UDP and TCP, truncation with the fallback to TCP, and answers
//! before and after an instance goes down (docs/frontends.md).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Agent, eventually, machine, start_bridge, start_region_agent, start_with};
use patina_proto::v1::Health;

/// What `dig` said: the header's status and flags, and the answer section's data.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answers: Vec<String>,
    additionals: usize,
}

fn dig(server: &str, name: &str, qtype: &str, extra: &[&str]) -> Dig {
    let (ip, port) = server.rsplit_once(':').unwrap();
    let out = Command::new("dig")
        .arg(format!("@{ip}"))
        .args([
            "-p",
            port,
            name,
            qtype,
            "+time=2",
            "+tries=1",
            "+noall",
            "+comments",
            "+answer",
            "+additional",
        ])
        .args(extra)
        .output()
        .expect("dig (Debian's bind9-dnsutils; `cargo xtask test` installs it)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("")
        .to_owned();
    let flags: Vec<String> = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let mut section = "";
    let mut answers = Vec::new();
    let mut additionals = 0;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            section = "answer";
        } else if line.starts_with(";; ADDITIONAL SECTION") {
            section = "additional";
        } else if line.is_empty() || line.starts_with(';') {
            if line.is_empty() {
                section = "";
            }
        } else if section == "answer" {
            let fields: Vec<&str> = line.split_whitespace().collect();
            answers.push(fields[4..].join(" "));
        } else if section == "additional" && !line.contains("OPT") {
            additionals += 1;
        }
    }
    answers.sort();
    Dig {
        status,
        flags,
        answers,
        additionals,
    }
}

/// The DNS address an agent printed.
fn dns_addr(agent: &Agent) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        if let Ok(line) = agent.stdout.recv_timeout(Duration::from_millis(200))
            && let Some(at) = line.strip_prefix("dns: ")
        {
            return at.trim().to_owned();
        }
    }
    panic!("the agent did not print its DNS address");
}

async fn put(agent: &Agent, id: &str, app: &str, addr: &str, health: Health) {
    let mut m = machine(id, app, 0);
    m.addresses = vec![addr.to_owned()];
    m.health = health as i32;
    common::upsert(agent, m).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_region_agent_answers_dig_over_udp_and_tcp() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_with(
        dir.path(),
        "127.0.0.151",
        "[dns]\nlisten = \"127.0.0.151:0\"\n",
    );
    let dns = dns_addr(&agent);
    put(&agent, "web-1", "web", "10.0.0.1:8080", Health::Passing).await;
    put(&agent, "web-2", "web", "[fd00::2]:8081", Health::Passing).await;
    put(&agent, "web-3", "web", "10.0.0.3:8082", Health::Critical).await;
    let name = "web.app.test.patina";
    let a = eventually(Duration::from_secs(10), || async {
        dig(&dns, name, "A", &[]).answers == ["10.0.0.1"]
    })
    .await;
    assert!(
        a.is_some(),
        "A of the routable instance: {:?}",
        dig(&dns, name, "A", &[])
    );

    for transport in [&[][..], &["+tcp"][..]] {
        let r = dig(&dns, name, "A", transport);
        assert_eq!(r.status, "NOERROR");
        assert!(r.flags.contains(&"aa".to_owned()), "authoritative: {r:?}");
        assert_eq!(r.answers, ["10.0.0.1"], "{transport:?}");
        assert_eq!(dig(&dns, name, "AAAA", transport).answers, ["fd00::2"]);
        let srv = dig(&dns, name, "SRV", transport);
        assert_eq!(
            srv.answers,
            [
                "0 1 8080 0a000001.addr.test.patina.",
                "0 1 8081 fd000000000000000000000000000002.addr.test.patina."
            ],
            "{transport:?}"
        );
        assert_eq!(srv.additionals, 2, "the targets' addresses: {srv:?}");
        assert_eq!(
            dig(&dns, "0a000001.addr.test.patina", "A", transport).answers,
            ["10.0.0.1"]
        );
        assert_eq!(
            dig(&dns, "nope.app.test.patina", "A", transport).status,
            "NXDOMAIN"
        );
        assert_eq!(dig(&dns, "example.com", "A", transport).status, "REFUSED");
        assert_eq!(
            dig(&dns, "web.app.fra.patina", "A", transport).status,
            "REFUSED",
            "another region's zone"
        );
    }

    // The instance goes down: the name stays (NOERROR), its address leaves.
    put(&agent, "web-1", "web", "10.0.0.1:8080", Health::Critical).await;
    let gone = eventually(Duration::from_secs(10), || async {
        dig(&dns, name, "A", &[]).answers.is_empty()
    })
    .await;
    assert!(gone.is_some(), "{:?}", dig(&dns, name, "A", &[]));
    assert_eq!(dig(&dns, name, "A", &[]).status, "NOERROR");

    // 50 instances: over 512 bytes without EDNS, so UDP is truncated (TC) and dig asks again
    // over TCP, where the whole answer comes.
    for i in 0..50 {
        put(
            &agent,
            &format!("big-{i}"),
            "big",
            &format!("10.1.0.{i}:80"),
            Health::Passing,
        )
        .await;
    }
    let big = "big.app.test.patina";
    let all = eventually(Duration::from_secs(10), || async {
        dig(&dns, big, "A", &["+tcp"]).answers.len() == 50
    })
    .await;
    assert!(all.is_some());
    let udp = dig(&dns, big, "A", &["+noedns", "+ignore"]);
    assert!(udp.flags.contains(&"tc".to_owned()), "truncated: {udp:?}");
    assert!(udp.answers.len() < 50);
    let fallback = dig(&dns, big, "A", &["+noedns"]);
    assert_eq!(fallback.answers.len(), 50, "dig retried over TCP");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_global_agent_answers_the_regions_ingress_nearest_first() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord = start_region_agent(root, "ord", "127.0.0.161", "ord", &[]);
    let fra = start_region_agent(root, "fra", "127.0.0.162", "fra", &[]);
    let table = "[global]\nstale_after_secs = 30\n\
         [[global.regions]]\nname = \"ord\"\nlat = 41.98\nlon = -87.90\ningress = [\"192.0.2.1:443\", \"[2001:db8::1]:443\"]\n\
         [[global.regions]]\nname = \"fra\"\nlat = 50.03\nlon = 8.57\ningress = [\"192.0.2.2:8443\"]\n\
         [dns]\nlisten = \"127.0.0.163:0\"\nttl_secs = 5\n";
    let g = common::start_global(root, "g", "127.0.0.163", "ord", &[], Some(table));
    let dns = dns_addr(&g);
    let seeds = vec!["127.0.0.163".to_owned()];
    let _b_ord = start_bridge(root, "b-ord", "127.0.0.164", "ord", &[&ord], &seeds);
    let _b_fra = start_bridge(root, "b-fra", "127.0.0.165", "fra", &[&fra], &seeds);
    put(&ord, "shop-1", "shop", "10.0.0.1:80", Health::Passing).await;
    put(&fra, "shop-2", "shop", "10.0.0.2:80", Health::Passing).await;
    put(&fra, "shop-3", "shop", "10.0.0.3:80", Health::Passing).await;
    let name = "shop.app.patina";
    let both = eventually(Duration::from_secs(30), || async {
        dig(&dns, name, "SRV", &[]).answers.len() == 3
    })
    .await;
    assert!(both.is_some(), "{:?}", dig(&dns, name, "SRV", &[]));
    // The agent is in ord: ord first (priority 0, weight its 1 healthy instance), then fra.
    let srv = dig(&dns, name, "SRV", &[]);
    assert_eq!(
        srv.answers,
        [
            "0 1 443 20010db8000000000000000000000001.addr.patina.",
            "0 1 443 c0000201.addr.patina.",
            "1 2 8443 c0000202.addr.patina."
        ]
    );
    assert_eq!(dig(&dns, name, "A", &["+tcp"]).answers, ["192.0.2.1"]);
    assert_eq!(dig(&dns, name, "AAAA", &[]).answers, ["2001:db8::1"]);
    let out = Command::new("dig")
        .args([
            "@127.0.0.163",
            "-p",
            dns.rsplit_once(':').unwrap().1,
            name,
            "A",
            "+noall",
            "+answer",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\t5\tIN\tA"),
        "ttl_secs = 5: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(dig(&dns, "nope.app.patina", "SRV", &[]).status, "NXDOMAIN");
    // ord's only instance goes down: fra is the nearest with healthy instances.
    put(&ord, "shop-1", "shop", "10.0.0.1:80", Health::Critical).await;
    let moved = eventually(Duration::from_secs(30), || async {
        dig(&dns, name, "A", &[]).answers == ["192.0.2.2"]
    })
    .await;
    assert!(moved.is_some(), "{:?}", dig(&dns, name, "A", &[]));
}

/// A fresh agent with seeds it cannot reach has never caught up with its peers: its store
/// alone might lack every app (a fresh or wiped agent), so DNS answers SERVFAIL for app names
/// (not NXDOMAIN, which resolvers cache as "no such app") and readiness says why. Restarted
/// on the data it then holds, it answers from it.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_never_caught_up_answers_servfail() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start_with(
        dir.path(),
        "127.0.0.152",
        "[gossip]\nseeds = [\"127.0.0.1:9\"]\n[dns]\nlisten = \"127.0.0.152:0\"\n",
    );
    let dns = dns_addr(&agent);
    let ops = agent.metrics_url();
    put(&agent, "web-1", "web", "10.0.0.1:8080", Health::Passing).await;
    // Its store holds the machine; the answer still waits for its peers.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for name in ["web.app.test.patina", "nope.app.test.patina"] {
        let d = dig(&dns, name, "A", &[]);
        assert_eq!(d.status, "SERVFAIL", "{name}: {d:?}");
    }
    let (status, body) = patina_testkit::http_get(&format!("{ops}/readyz?verbose")).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("[-]frontends failed: "), "{body}");
    let (_, metrics) = patina_testkit::http_get(&format!("{ops}/metrics")).unwrap();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("patina_dns_queries_total{outcome=\"not_ready\"} ")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );

    // Restarted on its data (the seeds still unreachable): it answers from what it holds at
    // once, as it serves ListInstances.
    let mut agent = agent;
    agent.stop().unwrap();
    agent
        .restart(Path::new(env!("CARGO_BIN_EXE_patina")), "region")
        .unwrap();
    let dns = dns_addr(&agent);
    let a = eventually(Duration::from_secs(10), || async {
        dig(&dns, "web.app.test.patina", "A", &[]).answers == ["10.0.0.1"]
    })
    .await;
    assert!(
        a.is_some(),
        "{:?}",
        dig(&dns, "web.app.test.patina", "A", &[])
    );
}
