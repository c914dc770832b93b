//! Summaries signed by their region's bridges, with real processes and security on: a
//! region `ord` (one agent), its bridge, two global agents and an edge following one of them.
//! An attacker holding the global cluster's gossip key (a compromised global agent) pushes
//! forged records straight into both global agents: a summary with inflated counts under the
//! bridge's origin and a bad signature, the bridge's real signed summary replayed under
//! another app, and a summary for ord signed by a bridge of fra under an origin registered
//! for ord. Every global agent and the edge refuse them all and keep the true state.

mod common;

use std::net::UdpSocket;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Agent, REGION_TABLE, bin, put_app_machine};
use patina_edge::{RegionTable, Table};
use patina_gossip::wire::{Item, Push};
use patina_gossip::{ClusterName, Envelope, GossipKey, Keyring};
use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::{BridgeCertRecord, BridgeRecord, SummaryRecord, WatchAppsRequest};
use patina_store::{Hlc, NodeId, Record, Version};
use patina_testkit::secure::Secure;
use prost::Message;

fn gossip(ip: &str, seed: Option<&str>) -> String {
    let seeds = seed.map_or_else(String::new, |s| format!("\"{s}:7946\""));
    format!("[gossip]\nlisten = \"{ip}:7946\"\nseeds = [{seeds}]\n")
}

fn start(root: &Path, role: &str, name: &str, config: String, s: &Secure) -> Agent {
    Agent::start_role(bin(), role, &root.join(name), &config)
        .expect("start an agent")
        .with_dial(s.dial.clone())
}

/// Healthy instances of `app` in ord, as a global agent answers (`None`: ord not listed).
async fn healthy_at(agent: &Agent, app: &str) -> Option<u32> {
    common::lookup(agent, app, "ord", true)
        .await
        .into_iter()
        .find(|(region, _, _)| region == "ord")
        .map(|(_, healthy, _)| healthy)
}

/// Records a global agent refused from peers, over all origins.
async fn refused_at(agent: &Agent) -> u64 {
    let status = agent.cluster_status().await;
    status.origins.iter().map(|o| o.refused).sum()
}

/// Records a global agent refused from peers under `origin`.
async fn refused_from(agent: &Agent, origin: u64) -> u64 {
    let status = agent.cluster_status().await;
    let origin = format!("{origin:016x}");
    status
        .origins
        .iter()
        .filter(|o| o.origin == origin)
        .map(|o| o.refused)
        .sum()
}

/// Push each of `records` into every agent of `to` (its push port is its API port's number,
/// over UDP), one record per datagram, each sent a few times.
fn push(to: &[Agent], key: &str, records: &[Record]) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for g in to {
        for r in records {
            for _ in 0..3 {
                socket
                    .send_to(&datagram(key, vec![r.clone()]), g.host_port())
                    .unwrap();
            }
        }
    }
}

/// The bridge (origin) whose summary of `app` a global agent holds.
async fn bridge_of(agent: &Agent, app: &str) -> u64 {
    let mut watch = GlobalClient::new(agent.channel().await)
        .watch_apps(WatchAppsRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        let msg = watch.message().await.unwrap().expect("a snapshot");
        if let Some(s) = msg.summaries.into_iter().find(|s| s.app == app) {
            return s.bridge;
        }
    }
}

/// A push of `records`, sealed with the cluster's gossip key.
fn datagram(key: &str, records: Vec<Record>) -> Vec<u8> {
    let envelope = Envelope::with_keyring(
        &ClusterName::new("global").unwrap(),
        Keyring::with_key(GossipKey::parse(key).unwrap()),
    );
    let push = Push {
        sender: NodeId(0xbad),
        hops: 0,
        tree: false,
        items: records
            .iter()
            .map(|r| Item::Record(r.clone()).to_bytes())
            .collect(),
    };
    let mut payload = Vec::new();
    push.encode(&mut payload);
    let mut out = Vec::new();
    envelope.seal(&payload, &mut out);
    out
}

fn record(key: &str, group: &str, value: Vec<u8>, origin: u64, seq: u64) -> Record {
    Record {
        value: Some(value.into()),
        ..tombstone(key, group, origin, seq)
    }
}

fn tombstone(key: &str, group: &str, origin: u64, seq: u64) -> Record {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    Record {
        key: key.into(),
        group: group.into(),
        value: None,
        version: Version {
            hlc: Hlc::from_physical_ms(now_ms),
            origin: NodeId(origin),
            seq,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_summaries_pushed_into_global_agents_are_refused_everywhere() {
    let root = tempfile::tempdir().unwrap();
    let s = Secure::new(&["ord".to_owned()]);
    let (rip, bip, g1, g2) = ("127.0.0.221", "127.0.0.222", "127.0.0.223", "127.0.0.224");
    let dir = |n: &str| root.path().join(n);
    let region = start(
        root.path(),
        "region",
        "region",
        format!(
            "region = \"ord\"\nhost = \"ord-1\"\nlisten = \"{rip}:7600\"\nlog = \"warn\"\n{}standalone = true\n{}",
            gossip(rip, None),
            s.agent_config(&dir("region"), rip, Secure::region_agent("ord"))
        ),
        &s,
    );
    let global = |name: &str, ip: &str| {
        start(
            root.path(),
            "global",
            name,
            format!(
                "region = \"ord\"\nhost = \"{name}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}{}{REGION_TABLE}",
                gossip(ip, Some(g1)),
                s.agent_config(&dir(name), ip, Secure::global_agent())
            ),
            &s,
        )
    };
    let globals = [global("g1", g1), global("g2", g2)];
    let _bridge = start(
        root.path(),
        "bridge",
        "bridge",
        format!(
            "region = \"ord\"\nhost = \"bridge\"\nlisten = \"{bip}:0\"\nlog = \"warn\"\n{}{}{REGION_TABLE}[bridge]\nregion_agents = [\"{}\"]\n",
            gossip(bip, Some(g1)),
            s.agent_config(&dir("bridge"), bip, Secure::bridge("ord")),
            region.host_port()
        ),
        &s,
    );
    put_app_machine(&region, "web-1", "web", true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    for g in &globals {
        while healthy_at(g, "web").await != Some(1) {
            assert!(
                Instant::now() < deadline,
                "web never reached the global agents"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // An edge follows g1 over TLS, checking signatures itself.
    let regions = RegionTable::new(
        ["ord", "fra", "syd"]
            .iter()
            .map(|n| patina_edge::RegionSpec {
                name: (*n).into(),
                ..Default::default()
            })
            .collect(),
    )
    .unwrap();
    let table = Arc::new(Table::new(regions, None));
    let edge = patina_edge::follow(vec![globals[0].url.clone()], table.clone(), s.dial.clone());
    let edge_healthy = |app: &str| {
        table
            .lookup(app, "ord")
            .iter()
            .find(|h| table.region_name(h.region).as_deref() == Some("ord"))
            .map(|h| h.healthy)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge_healthy("web") != Some(1) {
        assert!(
            Instant::now() < deadline,
            "the edge never took the signed summary"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // What the attacker reads from any global agent: the bridge's origin and its signed
    // summary of web.
    let mut watch = GlobalClient::new(globals[0].channel().await)
        .watch_apps(WatchAppsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut msg_bridges = Vec::new();
    let real = loop {
        let msg = watch.message().await.unwrap().expect("a snapshot");
        msg_bridges.extend(msg.bridges);
        if let Some(s) = msg.summaries.into_iter().find(|s| s.app == "web") {
            break s;
        }
    };
    let bridge = real.bridge;
    let bridge_cert = loop {
        if let Some(b) = msg_bridges.iter().find(|b| b.bridge == bridge) {
            break b.certificate.clone();
        }
        let msg = watch.message().await.unwrap().expect("the bridge's state");
        msg_bridges.extend(msg.bridges);
    };
    assert!(
        !bridge_cert.is_empty(),
        "edges are sent the bridge's certificate"
    );
    let signed = SummaryRecord {
        region: "ord".into(),
        healthy: real.healthy,
        total: real.total,
        view_hlc: real.view_hlc,
        signature: real.signature.clone(),
    };
    assert!(!signed.signature.is_empty(), "the bridge signs");
    let mut inflated = signed.clone();
    inflated.healthy = 99;
    inflated.total = 99;
    inflated.view_hlc += 1 << 20;
    // A bridge of fra, with its real certificate and key, under a new origin whose heartbeat
    // says ord.
    let fra = s.issue(Secure::bridge("fra"));
    let forger = 0x0f0f_0f0f_0f0f_0f0f;
    let view = real.view_hlc + (1 << 20);
    let heartbeat = BridgeRecord {
        region: "ord".into(),
        view_hlc: view,
        signature: fra
            .sign(&patina_edge::signed::heartbeat_message(forger, "ord", view))
            .unwrap(),
    };
    let fra_summary = SummaryRecord {
        region: "ord".into(),
        healthy: 50,
        total: 50,
        view_hlc: view,
        signature: fra
            .sign(&patina_edge::signed::summary_message(
                "web", "ord", 50, 50, view,
            ))
            .unwrap(),
    };
    let forged = vec![
        record(
            "web/ord",
            "web",
            inflated.encode_to_vec(),
            bridge,
            1_000_000,
        ),
        record("api/ord", "api", signed.encode_to_vec(), bridge, 1_000_001),
        record(
            &format!("_bridgecert/{forger:016x}"),
            "_bridges",
            BridgeCertRecord {
                certificate: fra.certificate().to_vec(),
                published_hlc: view,
                signature: fra
                    .sign(&patina_edge::signed::certificate_message(
                        forger,
                        view,
                        fra.certificate(),
                    ))
                    .unwrap(),
            }
            .encode_to_vec(),
            forger,
            1,
        ),
        record(
            &format!("_bridge/{forger:016x}"),
            "_bridges",
            heartbeat.encode_to_vec(),
            forger,
            2,
        ),
        record("web/ord", "web", fra_summary.encode_to_vec(), forger, 3),
    ];
    push(&globals, &s.key, &forged);
    // Given time to spread (and anti-entropy to ask for them again), nothing changed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for g in &globals {
        assert_eq!(healthy_at(g, "web").await, Some(1), "{}", g.url);
        assert_eq!(healthy_at(g, "api").await, None, "{}", g.url);
        let status = g.cluster_status().await;
        let refused: u64 = status.origins.iter().map(|o| o.refused).sum();
        assert!(
            refused >= 3,
            "{} refused {refused}: {:?}",
            g.url,
            status.origins
        );
    }
    // Certificate records forged under the bridge's origin, to replace its certificate
    // with a later publication: its own certificate (as edges see it) unsigned, and another
    // ord bridge's signed by that bridge's key for this origin but dated again after
    // signing. Each is refused by every global agent, which keeps the bridge's own.
    let other = s.issue(Secure::bridge("ord"));
    let redated = BridgeCertRecord {
        certificate: other.certificate().to_vec(),
        published_hlc: view + 1,
        signature: other
            .sign(&patina_edge::signed::certificate_message(
                bridge,
                view,
                other.certificate(),
            ))
            .unwrap(),
    };
    let unsigned = BridgeCertRecord {
        certificate: bridge_cert.clone(),
        published_hlc: view + 1,
        signature: Vec::new(),
    };
    let mut before = Vec::new();
    for g in &globals {
        before.push(refused_from(g, bridge).await);
    }
    push(
        &globals,
        &s.key,
        &[
            record(
                &format!("_bridgecert/{bridge:016x}"),
                "_bridges",
                unsigned.encode_to_vec(),
                bridge,
                1_000_002,
            ),
            record(
                &format!("_bridgecert/{bridge:016x}"),
                "_bridges",
                redated.encode_to_vec(),
                bridge,
                1_000_003,
            ),
        ],
    );
    for (g, before) in globals.iter().zip(before) {
        let deadline = Instant::now() + Duration::from_secs(10);
        // Both records (each pushed several times) refused under the bridge's origin.
        while refused_from(g, bridge).await < before + 2 {
            assert!(
                Instant::now() < deadline,
                "{} did not refuse the forged certificate records",
                g.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for g in &globals {
        // Neither was taken: the origin's head stayed below their numbers.
        let status = g.cluster_status().await;
        let head = status
            .origins
            .iter()
            .find(|o| o.origin == format!("{bridge:016x}"))
            .map(|o| o.head);
        assert!(
            head.is_some_and(|h| h < 1_000_000),
            "{}: head {head:?}",
            g.url
        );
    }
    assert_eq!(edge_healthy("web"), Some(1));
    assert_eq!(edge_healthy("api"), None);
    // The edge refused nothing itself: the global agent it follows never passed a forgery on.
    assert_eq!(edge.refused(), (0, 0));
    // The true bridge still publishes: a second instance reaches the edge.
    put_app_machine(&region, "web-2", "web", true).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge_healthy("web") != Some(2) {
        assert!(
            Instant::now() < deadline,
            "the real bridge's next summary did not arrive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A deletion of the bridge's certificate, forged under its origin: refused by every
    // peer, which keeps the certificate and the bridge's summaries.
    let mut before = Vec::new();
    for g in &globals {
        before.push(refused_at(g).await);
    }
    push(
        &globals,
        &s.key,
        &[tombstone(
            &format!("_bridgecert/{bridge:016x}"),
            "_bridges",
            bridge,
            2_000_000,
        )],
    );
    for (g, before) in globals.iter().zip(before) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while refused_at(g).await <= before {
            assert!(
                Instant::now() < deadline,
                "{} never refused the certificate's deletion",
                g.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Not taken: the origin's head stayed below the forged number.
        let status = g.cluster_status().await;
        let head = status
            .origins
            .iter()
            .find(|o| o.origin == format!("{bridge:016x}"))
            .map(|o| o.head);
        assert!(
            head.is_some_and(|h| h < 2_000_000),
            "{}: head {head:?}",
            g.url
        );
        assert_eq!(healthy_at(g, "web").await, Some(2), "{}", g.url);
        assert_eq!(bridge_of(g, "web").await, bridge, "{}", g.url);
    }
    // A deletion of a number above the bridge's head. Peers take that one (deletions are not
    // signed), so the bridge must never issue that number itself: it moves to a fresh origin,
    // and registers again under it (certificate, heartbeat).
    push(
        &globals,
        &s.key,
        &[tombstone("nothing/ord", "nothing", bridge, 2_000_001)],
    );
    tokio::time::sleep(Duration::from_secs(2)).await;

    let deadline = Instant::now() + Duration::from_secs(20);
    while bridge_of(&globals[0], "web").await == bridge {
        assert!(
            Instant::now() < deadline,
            "the bridge never left its origin"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The bridge's certificate is rotated in place (a new key from the same CA): it publishes
    // it, a heartbeat and its summaries signed again, and both the global agents and the
    // edge take what it writes next, under its new origin.
    s.agent_config(&dir("bridge"), bip, Secure::bridge("ord"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    put_app_machine(&region, "web-3", "web", true).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while edge_healthy("web") != Some(3) {
        assert!(
            Instant::now() < deadline,
            "the rotated bridge's summary did not reach the edge"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for g in &globals {
        assert_eq!(healthy_at(g, "web").await, Some(3), "{}", g.url);
        assert_ne!(bridge_of(g, "web").await, bridge, "under the new origin");
    }
    drop(edge);
}
