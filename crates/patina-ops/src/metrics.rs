//! The Prometheus exposition: read at each scrape from the agent's snapshots (the gossip
//! loop's status, its view, the store's counters and queues, the table), with no lock held
//! across an await.
//!
//! Conventions: `patina_` prefix, base units (seconds, bytes), `_total` counters, and labels
//! whose values the cluster bounds: member states, directions, reasons, queue classes, check
//! names, loops, and peers (the cluster's current members) — never apps or machines. A
//! scrape asks the gossip loop twice (its status, its membership).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::Sources;
use crate::ready;

type Labels = Vec<(&'static str, String)>;

/// A histogram the store kept, as read at the scrape.
#[derive(Debug)]
struct Latencies(patina_store::timing::HistogramSnapshot);

impl prometheus_client::encoding::EncodeMetric for Latencies {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        // Per bucket, the last past every bound (+Inf, which the encoder writes for f64::MAX).
        let buckets: Vec<(f64, u64)> = patina_store::timing::BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.0.counts.iter().copied())
            .collect();
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.0.sum_secs,
            self.0.count,
            &buckets,
            None,
        )
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        prometheus_client::metrics::MetricType::Histogram
    }
}
type FloatGauge = Gauge<f64, AtomicU64>;

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

fn float(v: f64) -> FloatGauge {
    let g = FloatGauge::default();
    g.set(v);
    g
}

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// A family of counters, one per label set given.
fn counters(values: &[(Labels, u64)]) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    for (l, v) in values {
        f.get_or_create(l).inc_by(*v);
    }
    f
}

fn gauges(values: &[(Labels, i64)]) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    for (l, v) in values {
        f.get_or_create(l).set(*v);
    }
    f
}

fn floats(values: &[(Labels, f64)]) -> Family<Labels, FloatGauge> {
    let f = Family::<Labels, FloatGauge>::default();
    for (l, v) in values {
        f.get_or_create(l).set(*v);
    }
    f
}

/// The same exposition in Prometheus's classic text format (version 0.0.4), which promtool
/// and scrapers that do not ask for OpenMetrics read: a counter's family is named with its
/// `_total` suffix, and the `# UNIT` and `# EOF` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The exposition as of now (OpenMetrics text).
pub async fn scrape(s: &Sources) -> String {
    let status = ready::status(s).await;
    let snapshot = ready::snapshot(s).await;
    let view = s.gossip.view();
    let mut r = Registry::with_prefix("patina");

    // A gauge of 1, as Prometheus's own `prometheus_build_info` (the text format that
    // promtool and older servers read has no info type).
    r.register(
        "build_info",
        "The agent's build and role (always 1)",
        gauges(&[(
            labels(&[("version", env!("CARGO_PKG_VERSION")), ("role", s.role)]),
            1,
        )]),
    );

    // When the agent started: a restart loop shows as its changes.
    r.register_with_unit(
        "start_time",
        "When the agent started, in seconds since the Unix epoch",
        Unit::Seconds,
        float(
            s.started
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        ),
    );

    // The watchdog: how long since each loop last turned.
    if let Some((dog, _)) = &s.watchdog {
        r.register_with_unit(
            "watchdog_silence",
            "Time since each of the agent's loops last turned (the watchdog's view; a loop past watchdog.budget_ms is late)",
            Unit::Seconds,
            floats(
                &dog.silences()
                    .iter()
                    .map(|l| (labels(&[("loop", &l.name)]), l.since.as_secs_f64()))
                    .collect::<Vec<_>>(),
            ),
        );
    }

    // Readiness, each check.
    let checks = ready::evaluate(s, status.as_ref(), view.as_ref());
    r.register(
        "ready",
        "1 when every readiness check passes (as /readyz)",
        gauge(i64::from(checks.iter().all(|c| c.ok))),
    );
    r.register(
        "readiness_check",
        "Each readiness check: 1 passing, 0 failing",
        gauges(
            &checks
                .iter()
                .map(|c| (labels(&[("check", c.name)]), i64::from(c.ok)))
                .collect::<Vec<_>>(),
        ),
    );

    // The store.
    let stats = s.store.stats();
    r.register(
        "store_records",
        "Records held, by kind: live, or tombstones (deletions kept until collected)",
        gauges(&[
            (labels(&[("kind", "live")]), stats.live as i64),
            (
                labels(&[("kind", "tombstone")]),
                stats.keys.saturating_sub(stats.live) as i64,
            ),
        ]),
    );
    r.register(
        "store_revision",
        "The store's revision: changes applied since it was created",
        gauge(stats.revision as i64),
    );
    r.register(
        "store_commits",
        "Group commits (one transaction, one fsync each) since the store opened",
        counter(stats.commits),
    );
    r.register(
        "store_failed",
        "1 when the store failed for good (the agent stops)",
        gauge(i64::from(s.store.failure().is_some())),
    );
    if let Some((local, remote)) = s.store.queue_depths() {
        let q = |f: fn(&patina_store::QueueDepth) -> usize| {
            gauges(&[
                (labels(&[("class", "local")]), f(&local) as i64),
                (labels(&[("class", "remote")]), f(&remote) as i64),
            ])
        };
        r.register(
            "store_queue_requests",
            "Requests queued for the store's writer, by class: local writes or peers' batches",
            q(|d| d.requests),
        );
        r.register(
            "store_queue_requests_limit",
            "Most requests each class may queue",
            q(|d| d.requests_limit),
        );
        r.register_with_unit(
            "store_queue",
            "Bytes queued for the store's writer, by class",
            Unit::Bytes,
            q(|d| d.bytes),
        );
        r.register_with_unit(
            "store_queue_limit",
            "Most bytes each class may queue",
            Unit::Bytes,
            q(|d| d.bytes_limit),
        );
        r.register(
            "store_queue_waiters",
            "Callers waiting for a place in a full queue, by class",
            q(|d| d.waiters),
        );
    }
    let t = s.store.timings();
    r.register_with_unit(
        "store_write",
        "Local writes, from the call to the answer (queueing, the group commit and its fsync)",
        Unit::Seconds,
        Latencies(t.write.snapshot()),
    );
    r.register_with_unit(
        "store_apply",
        "Batches from peers, from the call to the answer",
        Unit::Seconds,
        Latencies(t.apply.snapshot()),
    );
    r.register_with_unit(
        "store_fsync",
        "Group commits' COMMIT: the write-ahead log's write and fsync",
        Unit::Seconds,
        Latencies(t.fsync.snapshot()),
    );
    r.register_with_unit(
        "clock_ahead",
        "How far the store's clock leads this host's wall clock (0 when it does not)",
        Unit::Seconds,
        float(s.store.clock_ahead_ms().unwrap_or(0) as f64 / 1000.0),
    );

    // Membership and the view.
    if let Some(snap) = &snapshot {
        let count = |state: patina_gossip::MemberState| {
            snap.members.iter().filter(|m| m.state == state).count() as i64
        };
        r.register(
            "members",
            "Other members of the cluster as this agent sees them, by state",
            gauges(&[
                (
                    labels(&[("state", "alive")]),
                    count(patina_gossip::MemberState::Alive),
                ),
                (
                    labels(&[("state", "suspect")]),
                    count(patina_gossip::MemberState::Suspect),
                ),
                (
                    labels(&[("state", "down")]),
                    count(patina_gossip::MemberState::Down),
                ),
            ]),
        );
        let c = &snap.counters;
        r.register(
            "gossip_items",
            "Pushed items received, by outcome: new, seen before, or dropped (too many pending)",
            counters(&[
                (labels(&[("outcome", "new")]), c.items_new),
                (labels(&[("outcome", "seen")]), c.items_seen),
                (labels(&[("outcome", "dropped")]), c.items_dropped),
            ]),
        );
        r.register(
            "gossip_late_timers",
            "SWIM timers that fired late (the gossip loop was held up)",
            counter(c.late_timers),
        );
    }
    if let Some(v) = &view {
        r.register(
            "view_standing",
            "1 when this agent's view of the cluster stands (majority, settled, synced)",
            gauge(i64::from(v.stands)),
        );
        r.register_with_unit(
            "clock_offset",
            "Peers' clocks minus this agent's (the median)",
            Unit::Seconds,
            float(v.clock_offset_ms as f64 / 1000.0),
        );
        r.register_with_unit(
            "oldest_gap",
            "How long the oldest version lacking from any origin has been lacking",
            Unit::Seconds,
            float(v.oldest_gap.as_secs_f64()),
        );
    }

    if let Some(st) = &status {
        r.register(
            "gossip_health_score",
            "The local health score (0 healthy; higher: this agent probes and suspects slower, as memberlist's)",
            gauge(i64::from(st.health)),
        );
        r.register(
            "gossip_datagrams",
            "Gossip datagrams, by direction",
            counters(&[
                (labels(&[("direction", "in")]), st.datagrams_in),
                (labels(&[("direction", "out")]), st.datagrams_out),
            ]),
        );
        r.register_with_unit(
            "gossip",
            "Gossip bytes, by direction",
            Unit::Bytes,
            counters(&[
                (labels(&[("direction", "in")]), st.bytes_in),
                (labels(&[("direction", "out")]), st.bytes_out),
            ]),
        );
        let other = st
            .dropped_datagrams
            .saturating_sub(st.dropped_no_key + st.dropped_plaintext);
        r.register(
            "gossip_dropped_datagrams",
            "Datagrams dropped, by reason: no installed key opened it, plaintext refused, or malformed (envelope or decoding)",
            counters(&[
                (labels(&[("reason", "no_key")]), st.dropped_no_key),
                (labels(&[("reason", "plaintext")]), st.dropped_plaintext),
                (labels(&[("reason", "malformed")]), other),
            ]),
        );
        r.register(
            "gossip_refutations_for_others",
            "Suspicions of other members this agent refuted (they answered its last check)",
            counter(st.refuted_for_others),
        );
        r.register(
            "gossip_attended_unreachable",
            "Attended members this agent suspected at once: their attendance stream ended and their port refused (a killed process)",
            counter(st.attend_unreachable),
        );
        r.register(
            "gossip_down_news_applied",
            "Members this agent suspected (corroborated) because an anti-entropy session's peer listed them as down lately and it held them alive",
            counter(st.down_news_applied),
        );
        r.register(
            "gossip_tree_prunes",
            "Prunes this agent sent in tree dissemination: a duplicate copy arrived, and its sender left that origin's tree",
            counter(st.tree_prunes),
        );
        r.register(
            "gossip_tree_grafts",
            "Grafts this agent sent in tree dissemination: an announced change did not come down its tree in time, and it asked the announcer",
            counter(st.tree_grafts),
        );
        r.register(
            "gossip_tree_grafts_refused",
            "Grafts this agent left unanswered in tree dissemination: over its per-member or per-probe-period budget",
            counter(st.tree_grafts_refused),
        );
        r.register(
            "gossip_tree_from_strangers",
            "Tree dissemination messages (pushes, prunes, grafts, links) from senders that are not members, dropped",
            counter(st.tree_from_strangers),
        );
        r.register(
            "gossip_tree_inbound_replaced",
            "Inbound tree links that gave their slot, all taken and after a minute's silence, to a member saying it holds this agent in its view (each goes on getting the origins it has not pruned, as a grafted link)",
            counter(st.tree_inbound_replaced),
        );
        r.register(
            "sync_sessions",
            "Anti-entropy sessions, by outcome: begun, failed after beginning, or never begun",
            counters(&[
                (labels(&[("outcome", "begun")]), st.syncs),
                (labels(&[("outcome", "failed")]), st.sync_failures),
                (labels(&[("outcome", "unstarted")]), st.sync_unstarted),
            ]),
        );
        r.register(
            "sync_records",
            "Records carried by anti-entropy sessions, by direction",
            counters(&[
                (labels(&[("direction", "in")]), st.sync_records_in),
                (labels(&[("direction", "out")]), st.sync_records_out),
            ]),
        );
        r.register(
            "sync_bytes",
            "Encoded bytes of the record batches anti-entropy sessions carried, by direction",
            counters(&[
                (labels(&[("direction", "in")]), st.sync_bytes_in),
                (labels(&[("direction", "out")]), st.sync_bytes_out),
            ]),
        );
        // Only the cluster's members now: departed peers' records would make series (and
        // alerts) that never end.
        let members: std::collections::HashSet<String> = snapshot
            .as_ref()
            .map(|snap| {
                snap.members
                    .iter()
                    .map(|m| m.identity.addr.ip().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let peers: Vec<_> = st
            .peers
            .iter()
            .filter(|p| members.contains(&p.peer))
            .collect();
        r.register(
            "peer_versions_lacking",
            "Versions this agent lacked that each peer had, at their last session",
            gauges(
                &peers
                    .iter()
                    .map(|p| (labels(&[("peer", &p.peer)]), p.lacking as i64))
                    .collect::<Vec<_>>(),
            ),
        );
        r.register_with_unit(
            "peer_last_session_age",
            "Time since the last anti-entropy session with each peer",
            Unit::Seconds,
            floats(
                &peers
                    .iter()
                    .map(|p| (labels(&[("peer", &p.peer)]), p.last_ms_ago as f64 / 1000.0))
                    .collect::<Vec<_>>(),
            ),
        );
        let missing: u64 = st.origins.iter().map(|o| o.missing).sum();
        r.register(
            "versions_lacking",
            "Versions lacking from every origin this agent knows of, summed",
            gauge(missing as i64),
        );
        let refused: u64 = st.origins.iter().map(|o| o.refused).sum();
        let clock_ahead: u64 = st.origins.iter().map(|o| o.clock_ahead).sum();
        r.register(
            "refused_records",
            "Records refused from peers, by reason: stamped too far ahead of this clock, or failing the record checks",
            counters(&[
                (labels(&[("reason", "clock_ahead")]), clock_ahead),
                (
                    labels(&[("reason", "checks")]),
                    refused.saturating_sub(clock_ahead),
                ),
            ]),
        );
        if let Some(t) = &st.tls {
            r.register_with_unit(
                "certificate_expiry",
                "Time left on a certificate: this agent's own, its CA's, or the soonest of its peers' (negative once expired)",
                Unit::Seconds,
                floats(&[
                    (labels(&[("certificate", "own")]), t.own_expires_in_secs as f64),
                    (labels(&[("certificate", "ca")]), t.ca_expires_in_secs as f64),
                    (
                        labels(&[("certificate", "soonest_peer")]),
                        t.soonest_peer_expires_in_secs as f64,
                    ),
                ]),
            );
            r.register(
                "certificate_reloads",
                "Certificate and CA bundle reloads, by outcome",
                counters(&[
                    (labels(&[("outcome", "taken")]), t.reloads),
                    (labels(&[("outcome", "failed")]), t.reload_failures),
                ]),
            );
        }
    }

    // What clients hold open on the gRPC listener.
    if let Some(c) = s.occupancy.counts() {
        r.register(
            "connections",
            "Client connections open on the gRPC listener (within limits.max_connections)",
            gauge(c.connections.load(std::sync::atomic::Ordering::Relaxed)),
        );
        r.register(
            "watches",
            "Watch and WatchApps streams open (within limits.max_watches)",
            gauge(c.watches.load(std::sync::atomic::Ordering::Relaxed)),
        );
        r.register(
            "xds_streams",
            "xDS (ADS) streams open (within xds.max_streams)",
            gauge(c.xds_streams.load(std::sync::atomic::Ordering::Relaxed)),
        );
    }

    // A bridge's publishing.
    if let Some(b) = &s.bridge {
        r.register(
            "bridge_published",
            "Summaries this bridge wrote (or deleted)",
            counter(b.published.load(std::sync::atomic::Ordering::Relaxed)),
        );
        r.register_with_unit(
            "bridge_publish_delay",
            "From the region view a summary reflects (its region agent's clock) to the bridge's write of it",
            Unit::Seconds,
            Latencies(b.publish_delay.snapshot()),
        );
    }

    // The global tier's regions: fresh, or left out of lookups as stale.
    if let Some(table) = &s.table {
        let states = table.region_states();
        let stale = states.iter().filter(|r| r.stale).count() as i64;
        r.register(
            "table_regions",
            "Regions the table knows, by state (stale ones are left out of lookups)",
            gauges(&[
                (labels(&[("state", "fresh")]), states.len() as i64 - stale),
                (labels(&[("state", "stale")]), stale),
            ]),
        );
    }

    // Health checks run by this agent (docs/checks.md).
    if let Some(c) = &s.checks {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.register(
            "checked_machines",
            "Machines of this host whose checks this agent runs",
            gauge(get(&c.machines) as i64),
        );
        r.register(
            "checks",
            "Checks this agent runs",
            gauge(get(&c.checks) as i64),
        );
        r.register(
            "unchecked_machines",
            "Machines of this host with checks past checks.max_machines, not checked",
            gauge(get(&c.untracked) as i64),
        );
        r.register(
            "check_runs",
            "Check runs, by result",
            counters(&[
                (labels(&[("result", "passed")]), get(&c.passed)),
                (labels(&[("result", "failed")]), get(&c.failed)),
            ]),
        );
        r.register(
            "check_late_runs",
            "Check runs that started over a second after they were due (checks.max_in_flight too low)",
            counter(get(&c.late_runs)),
        );
        r.register(
            "check_transitions",
            "Changes of a machine's health written from its checks",
            counter(get(&c.transitions)),
        );
        r.register(
            "check_write_errors",
            "Writes of a machine's health from its checks that failed",
            counter(get(&c.write_errors)),
        );
    }

    // The front ends for stock clients (docs/frontends.md).
    if let Some(v) = &s.view {
        let (machines, apps) = v.sizes();
        r.register(
            "frontend_view_machines",
            "Live machines the region agent's xDS/DNS view holds",
            gauge(machines as i64),
        );
        r.register(
            "frontend_view_apps",
            "Apps the region agent's xDS/DNS view holds",
            gauge(apps as i64),
        );
        r.register(
            "frontend_view_synced",
            "1 once the xDS/DNS view holds the region (before: DNS SERVFAIL, xDS streams wait)",
            gauge(i64::from(patina_xds::Source::is_synced(&**v))),
        );
    }
    if let Some(x) = &s.xds {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.register(
            "xds_responses",
            "xDS responses sent",
            counter(get(&x.responses)),
        );
        r.register(
            "xds_acks",
            "xDS requests that acknowledged a response, by outcome (a NACK is logged with its error)",
            counters(&[
                (labels(&[("outcome", "ack")]), get(&x.acks)),
                (labels(&[("outcome", "nack")]), get(&x.nacks)),
            ]),
        );
        r.register(
            "xds_stale_nonces",
            "State-of-the-world xDS requests ignored for answering an older response",
            counter(get(&x.stale_nonces)),
        );
        r.register(
            "xds_behind",
            "xDS streams that fell behind the change log, by what followed",
            counters(&[
                (labels(&[("then", "resent")]), get(&x.resyncs)),
                (labels(&[("then", "ended")]), get(&x.ended_behind)),
            ]),
        );
    }
    if let Some(d) = &s.dns {
        let get = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        r.register(
            "dns_queries",
            "DNS queries, by outcome (not_ready: SERVFAIL before the xDS/DNS view held the region; other: NOTIMP, FORMERR)",
            counters(&[
                (labels(&[("outcome", "answered")]), get(&d.answered)),
                (labels(&[("outcome", "nxdomain")]), get(&d.nxdomain)),
                (labels(&[("outcome", "refused")]), get(&d.refused)),
                (labels(&[("outcome", "not_ready")]), get(&d.not_ready)),
                (labels(&[("outcome", "rate_limited")]), get(&d.rate_limited)),
                (labels(&[("outcome", "other")]), get(&d.other)),
            ]),
        );
        r.register(
            "dns_truncated",
            "DNS answers truncated to the client's UDP buffer (it asks again over TCP)",
            counter(get(&d.truncated)),
        );
        r.register(
            "dns_tcp_refused",
            "DNS TCP connections closed at once, over dns.max_tcp_connections",
            counter(get(&d.tcp_refused)),
        );
    }

    // The global tier's table.
    if let Some(table) = &s.table {
        let t = table.stats();
        r.register(
            "table_summaries",
            "Summaries (app, region) in the agent's table",
            gauge(t.summaries as i64),
        );
        r.register(
            "table_apps",
            "Apps in the agent's table",
            gauge(t.apps as i64),
        );
        r.register(
            "table_bridges",
            "Bridges whose heartbeats the table holds",
            gauge(t.bridges as i64),
        );
        r.register(
            "table_refused",
            "Summaries and heartbeats the table refused (bad names, counts, or regions)",
            counter(t.refused),
        );
    }

    let mut out = String::new();
    if let Err(e) = encode(&mut out, &r) {
        tracing::error!(error = %e, "could not encode the metrics");
    }
    out
}
