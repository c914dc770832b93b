//! The status page (`/`) and the JSON it renders (`/v1/status`): the cluster's members and
//! their state, origins and what this agent lacks of them, anti-entropy sessions per peer,
//! readiness with each check, and for a global agent or bridge the regions with their
//! freshness and bridges. The page is one static HTML file with a little JavaScript, no build
//! step; it asks for the JSON every 2 s.
//!
//! Bounded: each list holds at most [`MAX_ROWS`] entries (`truncated` says when more were
//! left out), so a response stays under a few hundred KiB whatever the cluster's size.

use std::sync::atomic::Ordering;

use patina_gossip::MemberState;
use serde_json::{Value, json};

use crate::{Sources, ready};

/// Most entries of each list in one answer.
pub const MAX_ROWS: usize = 1000;

/// The page: static, the same for every agent.
pub const PAGE: &str = include_str!("status.html");

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

/// The status as of now.
pub async fn status(s: &Sources) -> Value {
    let cluster = ready::status(s).await;
    let snapshot = ready::snapshot(s).await;
    let view = s.gossip.view();
    let checks = ready::evaluate(s, cluster.as_ref(), view.as_ref());
    let view = s.gossip.view_message();
    let mut truncated = Vec::new();

    let mut members = Vec::new();
    if let Some(snap) = &snapshot {
        members.push(json!({
            "node": snap.me.node.to_string(),
            "address": snap.me.addr.to_string(),
            "api_port": snap.me.api_port,
            "state": "alive",
            "incarnation": snap.incarnation,
            "self": true,
            "last_seen_ms_ago": 0,
        }));
        // Members that are not alive first: a cut list shows those in trouble before the
        // rest (all of them while fewer than MAX_ROWS are).
        let mut others: Vec<&patina_gossip::MemberInfo> = snap.members.iter().collect();
        others.sort_by_key(|m| m.state == MemberState::Alive);
        for m in others.into_iter().take(MAX_ROWS - 1) {
            members.push(json!({
                "node": m.identity.node.to_string(),
                "address": m.identity.addr.to_string(),
                "api_port": m.identity.api_port,
                "state": state_name(m.state),
                "incarnation": m.incarnation,
                "self": false,
                "last_seen_ms_ago": m.last_seen.map(|t| snap.now.saturating_sub(t).as_millis() as u64),
            }));
        }
        if snap.members.len() >= MAX_ROWS {
            truncated.push("members");
        }
    }

    let (mut origins, mut peers, mut sync, mut store) = (vec![], vec![], json!(null), json!(null));
    if let Some(c) = &cluster {
        for o in c.origins.iter().take(MAX_ROWS) {
            origins.push(json!({
                "origin": o.origin,
                "head": o.head,
                "gaps": o.gaps,
                "missing": o.missing,
                "refused": o.refused,
                "hidden": o.hidden,
            }));
        }
        if c.origins.len() > MAX_ROWS {
            truncated.push("origins");
        }
        for p in c.peers.iter().take(MAX_ROWS) {
            peers.push(json!({
                "peer": p.peer,
                "last_ms_ago": p.last_ms_ago,
                "lacking": p.lacking,
                "records_in": p.records_in,
                "ok": p.ok,
                "sessions": p.sessions,
            }));
        }
        if c.peers.len() > MAX_ROWS {
            truncated.push("peers");
        }
        sync = json!({
            "sessions": c.syncs,
            "failed": c.sync_failures,
            "unstarted": c.sync_unstarted,
            "records_in": c.sync_records_in,
            "records_out": c.sync_records_out,
        });
        store = json!({
            "keys": c.keys,
            "live": c.live,
            "revision": c.revision,
        });
    }

    let mut regions = Vec::new();
    let mut table = json!(null);
    if let Some(t) = &s.table {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let states = t.region_states();
        for r in states.iter().take(MAX_ROWS) {
            regions.push(json!({
                "region": &*r.name,
                "view_age_secs": (r.view_ms > 0).then(|| now_ms.saturating_sub(r.view_ms) as f64 / 1000.0),
                "bridges": r.bridges,
                "stale": r.stale,
            }));
        }
        if states.len() > MAX_ROWS {
            truncated.push("regions");
        }
        let st = t.stats();
        table = json!({
            "apps": st.apps,
            "summaries": st.summaries,
            "bridges": st.bridges,
            "refused": st.refused,
        });
    }

    let health_checks = s.checks.as_ref().map(|c| {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "machines": get(&c.machines),
            "checks": get(&c.checks),
            "unchecked_machines": get(&c.untracked),
            "runs_passed": get(&c.passed),
            "runs_failed": get(&c.failed),
            "transitions": get(&c.transitions),
        })
    });

    let (members_total, members_alive) = snapshot.as_ref().map_or((0, 0), |snap| {
        (
            snap.members.len() + 1,
            snap.members
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .count()
                + 1,
        )
    });
    json!({
        "role": s.role,
        "members_total": members_total,
        "members_alive": members_alive,
        "version": env!("CARGO_PKG_VERSION"),
        "region": s.gossip.region(),
        "ready": checks.iter().all(|c| c.ok),
        "checks": checks.iter().map(|c| json!({"name": c.name, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
        "view": {
            "stands": view.stands,
            "reasons": view.reasons.iter().map(|r| {
                patina_proto::v1::ViewReason::try_from(*r)
                    .map_or("UNKNOWN", |r| r.as_str_name())
                    .trim_start_matches("VIEW_REASON_")
                    .to_owned()
            }).collect::<Vec<_>>(),
            "members_alive": view.members_alive,
            "members_recent": view.members_recent,
            "clock_offset_ms": view.clock_offset_ms,
        },
        "gossip_loop_answered": cluster.is_some() && snapshot.is_some(),
        "store": store,
        "members": members,
        "origins": origins,
        "peers": peers,
        "sync": sync,
        "regions": regions,
        "table": table,
        "health_checks": health_checks,
        "truncated": truncated,
    })
}
