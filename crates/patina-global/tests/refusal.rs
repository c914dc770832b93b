//! A bridge publishes for its own region only: a bridge (here, one with a bug that writes
//! straight into its store) that publishes a summary for another region, or moves its
//! registration to another region, is refused by every peer, through the replication engine
//! (pushes and anti-entropy), and lookups for that region keep the last good state.

use std::sync::Arc;
use std::time::Duration;

use patina_global::SummaryKind;
use patina_global::record::{BRIDGES_GROUP, bridge_key, decode_summary, summary_key};
use patina_gossip::sim::{Net, World};
use patina_gossip::{ClusterName, Config};
use patina_proto::v1::{BridgeRecord, SummaryRecord};
use prost::Message;

fn summary(region: &str, healthy: u32, view: u64) -> Vec<u8> {
    SummaryRecord {
        region: region.into(),
        healthy,
        total: healthy,
        view_hlc: view,
        ..Default::default()
    }
    .encode_to_vec()
}

fn heartbeat(region: &str, view: u64) -> Vec<u8> {
    BridgeRecord {
        region: region.into(),
        view_hlc: view,
        ..Default::default()
    }
    .encode_to_vec()
}

/// What node `i` holds for a summary key: its healthy count.
fn held(w: &World, i: usize, key: &str) -> Option<u32> {
    let e = w.store(i).get_live(key)?;
    decode_summary(e.value()?).ok().map(|s| s.healthy)
}

#[test]
fn summaries_for_another_region_and_moved_registrations_are_refused_by_every_peer() {
    let cfg = Config::lan(ClusterName::new("global").unwrap());
    let mut w = World::with_kind(4, cfg, Net::lan(), 7, Arc::new(SummaryKind::default()));
    w.run_for(Duration::from_secs(3));
    let (ord_bridge, fra_bridge) = (2, 3);
    let ord_key = bridge_key(w.node_id(ord_bridge));
    let fra_key = bridge_key(w.node_id(fra_bridge));
    // Summaries written before the registration that follows them: a peer that receives
    // both in one batch (newest first) takes the registration and then the summary.
    assert!(w.write(ord_bridge, "web/ord", "web", &summary("ord", 2, 10)));
    assert!(w.write(ord_bridge, &ord_key, BRIDGES_GROUP, &heartbeat("ord", 10)));
    assert!(w.write(fra_bridge, &fra_key, BRIDGES_GROUP, &heartbeat("fra", 10)));
    assert!(w.write(fra_bridge, "web/fra", "web", &summary("fra", 3, 10)));
    w.run_for(Duration::from_secs(5));
    for edge in [0, 1] {
        assert_eq!(held(&w, edge, "web/ord"), Some(2));
        assert_eq!(held(&w, edge, "web/fra"), Some(3));
    }
    // The ord bridge goes wrong: a summary for fra with a newer view, a new app in fra, and
    // a registration that moves it to fra.
    assert!(w.write(ord_bridge, "web/fra", "web", &summary("fra", 0, 99)));
    assert!(w.write(
        ord_bridge,
        &summary_key("api", "fra"),
        "api",
        &summary("fra", 5, 99)
    ));
    assert!(w.write(ord_bridge, &ord_key, BRIDGES_GROUP, &heartbeat("fra", 99)));
    w.run_for(Duration::from_secs(10));
    for edge in [0, 1, fra_bridge] {
        assert_eq!(
            held(&w, edge, "web/fra"),
            Some(3),
            "node {edge} kept fra's own summary"
        );
        assert_eq!(held(&w, edge, "api/fra"), None, "node {edge}");
        let registered = w.store(edge).get_live(&ord_key).unwrap();
        let hb = BridgeRecord::decode(registered.value().unwrap()).unwrap();
        assert_eq!(hb.region, "ord", "node {edge}: a bridge's region is fixed");
        let refused = w
            .store(edge)
            .refusals()
            .get(&w.node_id(ord_bridge))
            .map_or(0, |r| r.count);
        assert!(refused >= 3, "node {edge} counted {refused} refusals");
    }
    // fra's own bridge still publishes for fra, and it lands.
    assert!(w.write(fra_bridge, "web/fra", "web", &summary("fra", 1, 200)));
    w.run_for(Duration::from_secs(3));
    assert_eq!(held(&w, 0, "web/fra"), Some(1));
}

/// A bridge's first registration reaches a peer in one batch, newest first: its summary,
/// then its heartbeat, then its certificate (each needs the one after it). The peer takes all
/// three and counts no refusal (a refusal is what operators are alerted on).
#[tokio::test]
async fn a_registration_sent_newest_first_is_taken_whole_without_refusals() {
    use patina_edge::signed::{certificate_message, heartbeat_message, summary_message};
    use patina_global::record::bridge_cert_key;
    use patina_proto::v1::BridgeCertRecord;
    use patina_store::{ApplyOutcome, Hlc, NodeId, Record, RemoteBatch, Store, Version};
    use patina_trust::certs::Authority;
    use patina_trust::{Grant, Role, Scope, Tier, Trust, Verifier};

    const HOUR: Duration = Duration::from_secs(3600);
    let ca = Authority::generate("ca", HOUR).unwrap();
    let agent = ca
        .issue_set(vec![Grant::new(Tier::Global, "global", Role::Agent)], HOUR)
        .unwrap();
    let bridge = ca
        .issue_set(
            vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge("ord".into()),
            )],
            HOUR,
        )
        .unwrap();
    let kind = SummaryKind::signed(
        Arc::new(Verifier::new(Trust::fixed(agent))),
        Scope::new(Tier::Global, "global"),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        patina_store::StoreOptions {
            kind: Arc::new(kind),
            ..Default::default()
        },
    )
    .unwrap();
    let origin = NodeId(0x0b0b);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let hlc = Hlc::from_physical_ms(now_ms);
    let view = hlc.0;
    let record = |key: String, group: &str, value: Vec<u8>, seq: u64| Record {
        key: key.into(),
        group: group.into(),
        value: Some(value.into()),
        version: Version { hlc, origin, seq },
    };
    let cert = BridgeCertRecord {
        certificate: bridge.certificate().to_vec(),
        published_hlc: view,
        signature: bridge
            .sign(&certificate_message(origin.0, view, bridge.certificate()))
            .unwrap(),
    };
    let heartbeat = BridgeRecord {
        region: "ord".into(),
        view_hlc: view,
        signature: bridge
            .sign(&heartbeat_message(origin.0, "ord", view))
            .unwrap(),
    };
    let summary = SummaryRecord {
        region: "ord".into(),
        healthy: 2,
        total: 2,
        view_hlc: view,
        signature: bridge
            .sign(&summary_message("web", "ord", 2, 2, view))
            .unwrap(),
    };
    let report = store
        .apply(RemoteBatch {
            records: vec![
                record(summary_key("web", "ord"), "web", summary.encode_to_vec(), 3),
                record(
                    bridge_key(origin),
                    BRIDGES_GROUP,
                    heartbeat.encode_to_vec(),
                    2,
                ),
                record(
                    bridge_cert_key(origin),
                    BRIDGES_GROUP,
                    cert.encode_to_vec(),
                    1,
                ),
            ],
            covered: Vec::new(),
        })
        .await
        .unwrap();
    assert!(
        report
            .records
            .iter()
            .all(|o| matches!(o, ApplyOutcome::Applied)),
        "{:?}",
        report.records
    );
    assert!(store.refusals().is_empty(), "{:?}", store.refusals());
    let held = decode_summary(store.get_live("web/ord").unwrap().value().unwrap()).unwrap();
    assert_eq!(held.healthy, 2);
}
