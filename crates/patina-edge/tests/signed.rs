//! An edge's replica with signature checks: what a faulty or compromised global agent streams
//! (a summary with a bad signature, one signed by another region's bridge, a valid one
//! replayed under another app, a heartbeat under a certificate of another CA) is refused,
//! and lookups keep answering from the last good state.

use std::sync::Arc;
use std::time::Duration;

use patina_edge::signed::{EdgeChecks, heartbeat_message, summary_message};
use patina_edge::{RegionSpec, RegionTable, Replica, Table};
use patina_proto::v1::watch_apps_response::Kind;
use patina_proto::v1::{AppSummary, BridgeState, WatchAppsResponse};
use patina_trust::certs::Authority;
use patina_trust::{Grant, Material, Role, Scope, Tier, Trust, Verifier};

const HOUR: Duration = Duration::from_secs(3600);

fn bridge(ca: &Authority, region: &str) -> Material {
    ca.issue_set(
        vec![Grant::new(
            Tier::Global,
            "global",
            Role::Bridge(region.into()),
        )],
        HOUR,
    )
    .unwrap()
}

fn now_hlc() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    ms << 16
}

fn heartbeat(m: &Material, id: u64, region: &str, view: u64) -> BridgeState {
    BridgeState {
        bridge: id,
        region: region.into(),
        view_hlc: view,
        removed: false,
        certificate: m.certificate().to_vec(),
        signature: m.sign(&heartbeat_message(id, region, view)).unwrap(),
    }
}

fn summary(m: &Material, id: u64, app: &str, region: &str, healthy: u32, view: u64) -> AppSummary {
    AppSummary {
        app: app.into(),
        region: region.into(),
        healthy,
        total: healthy,
        view_hlc: view,
        bridge: id,
        removed: false,
        signature: m
            .sign(&summary_message(app, region, healthy, healthy, view))
            .unwrap(),
    }
}

fn delta(bridges: Vec<BridgeState>, summaries: Vec<AppSummary>) -> WatchAppsResponse {
    WatchAppsResponse {
        kind: Kind::Delta as i32,
        bridges,
        summaries,
        ..Default::default()
    }
}

fn healthy(table: &Table, app: &str, region: &str) -> Option<u32> {
    table
        .lookup(app, region)
        .into_iter()
        .find(|h| table.region_name(h.region).as_deref() == Some(region))
        .map(|h| h.healthy)
}

#[test]
fn an_edge_takes_only_what_a_bridge_of_the_region_signed() {
    let ca = Authority::generate("ca", HOUR).unwrap();
    let edge = ca
        .issue_set(vec![Grant::new(Tier::Global, "global", Role::Reader)], HOUR)
        .unwrap();
    let regions = ["ord", "fra"]
        .iter()
        .map(|n| RegionSpec {
            name: (*n).into(),
            ..Default::default()
        })
        .collect();
    let table = Arc::new(Table::new(RegionTable::new(regions).unwrap(), None));
    let checks = EdgeChecks::new(
        Arc::new(Verifier::new(Trust::fixed(edge))),
        Scope::new(Tier::Global, "global"),
    );
    let mut replica = Replica::checked(table.clone(), checks);
    let (ord, fra) = (bridge(&ca, "ord"), bridge(&ca, "fra"));
    let view = now_hlc();

    // The good state: ord's bridge (1) and fra's (2), signed.
    replica.apply(&delta(
        vec![
            heartbeat(&ord, 1, "ord", view),
            heartbeat(&fra, 2, "fra", view),
        ],
        vec![summary(&ord, 1, "web", "ord", 3, view)],
    ));
    assert_eq!(healthy(&table, "web", "ord"), Some(3));
    assert_eq!(replica.refused(), (0, 0));

    // Inflated counts under the real signature; unsigned; signed by fra's bridge for ord;
    // a valid summary of web replayed as api's.
    let mut inflated = summary(&ord, 1, "web", "ord", 3, view + 1);
    inflated.healthy = 9;
    inflated.total = 9;
    let mut unsigned = summary(&ord, 1, "web", "ord", 7, view + 1);
    unsigned.signature.clear();
    let mut foreign = summary(&fra, 2, "web", "ord", 8, view + 1);
    foreign.bridge = 2;
    let mut replayed = summary(&ord, 1, "web", "ord", 3, view);
    replayed.app = "api".into();
    replica.apply(&delta(
        Vec::new(),
        vec![inflated, unsigned, foreign, replayed],
    ));
    assert_eq!(
        healthy(&table, "web", "ord"),
        Some(3),
        "the last good state stands"
    );
    assert_eq!(healthy(&table, "api", "ord"), None);
    assert_eq!(replica.refused(), (1, 3));

    // A heartbeat under another CA's certificate, or ord's heartbeat claimed for fra: refused,
    // and the summaries they would vouch for with it.
    let other = Authority::generate("other", HOUR).unwrap();
    let stranger = bridge(&other, "ord");
    let mut moved = heartbeat(&ord, 1, "ord", view + 2);
    moved.region = "fra".into();
    replica.apply(&delta(
        vec![heartbeat(&stranger, 3, "ord", view + 2), moved],
        vec![summary(&stranger, 3, "web", "ord", 50, view + 2)],
    ));
    assert_eq!(healthy(&table, "web", "ord"), Some(3));
    assert_eq!(replica.refused().1, 6);

    // The real bridge's next summary is taken.
    replica.apply(&delta(
        vec![heartbeat(&ord, 1, "ord", view + 3)],
        vec![summary(&ord, 1, "web", "ord", 4, view + 3)],
    ));
    assert_eq!(healthy(&table, "web", "ord"), Some(4));
}

/// A snapshot large enough to be checked on several threads: every verdict lands on its own
/// summary (the good ones are taken, each bad one is refused and counted), whatever thread
/// checked it.
#[test]
fn a_large_snapshot_checked_on_several_threads_keeps_each_verdict_with_its_summary() {
    let ca = Authority::generate("ca", HOUR).unwrap();
    let edge = ca
        .issue_set(vec![Grant::new(Tier::Global, "global", Role::Reader)], HOUR)
        .unwrap();
    let regions = ["ord", "fra"]
        .iter()
        .map(|n| RegionSpec {
            name: (*n).into(),
            ..Default::default()
        })
        .collect();
    let table = Arc::new(Table::new(RegionTable::new(regions).unwrap(), None));
    // Four threads, whatever the machine has.
    let checks = EdgeChecks::new(
        Arc::new(Verifier::new(Trust::fixed(edge))),
        Scope::new(Tier::Global, "global"),
    )
    .with_threads(4);
    let mut replica = Replica::checked(table.clone(), checks);
    let (ord, fra) = (bridge(&ca, "ord"), bridge(&ca, "fra"));
    let view = now_hlc();
    // More than four threads' worth (the checks split at 1,024 per thread), the bad ones
    // spread over every part.
    let n = 5_000;
    let mut summaries = Vec::with_capacity(n);
    let mut bad = 0;
    for i in 0..n {
        let app = format!("app-{i}");
        let (m, id, region) = if i % 2 == 0 {
            (&ord, 1, "ord")
        } else {
            (&fra, 2, "fra")
        };
        let mut s = summary(m, id, &app, region, 1 + (i % 5) as u32, view);
        if i % 7 == 3 {
            s.healthy += 10;
            bad += 1;
        }
        summaries.push(s);
    }
    let mut snapshot = delta(
        vec![
            heartbeat(&ord, 1, "ord", view),
            heartbeat(&fra, 2, "fra", view),
        ],
        summaries,
    );
    snapshot.kind = Kind::SnapshotDone as i32;
    snapshot.reset = true;
    replica.apply(&snapshot);
    assert_eq!(replica.refused(), (0, bad));
    for i in 0..n {
        let region = if i % 2 == 0 { "ord" } else { "fra" };
        let expected = (i % 7 != 3).then_some(1 + (i % 5) as u32);
        assert_eq!(
            healthy(&table, &format!("app-{i}"), region),
            expected,
            "app-{i}"
        );
    }
}
