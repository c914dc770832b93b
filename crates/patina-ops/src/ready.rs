//! Liveness, readiness and threshold checks, each named, each with why it failed.

use std::time::Duration;

use patina_gossip::{ViewReason, ViewStatus};
use patina_proto::v1::ClusterStatusResponse;
use patina_xds::Source as _;

use crate::{LOOP_ANSWER, Sources};

/// One named check: `detail` says why it failed (empty when it passed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn pass(name: &'static str) -> Check {
        Check {
            name,
            ok: true,
            detail: String::new(),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            ok: false,
            detail: detail.into(),
        }
    }

    fn of(name: &'static str, failure: Option<String>) -> Check {
        failure.map_or_else(|| Check::pass(name), |why| Check::fail(name, why))
    }
}

/// Share of the local write queue (requests or bytes) above which the agent is not ready:
/// writes sent now would wait, or be refused with `RESOURCE_EXHAUSTED`.
pub const QUEUE_SATURATED: f64 = 0.9;

/// The gossip loop's status, if it answers within [`LOOP_ANSWER`].
pub async fn status(s: &Sources) -> Option<ClusterStatusResponse> {
    tokio::time::timeout(LOOP_ANSWER, s.gossip.cluster_status())
        .await
        .ok()
        .flatten()
}

/// The gossip loop's membership, if it answers within [`LOOP_ANSWER`].
pub async fn snapshot(s: &Sources) -> Option<patina_gossip::shell::Snapshot> {
    tokio::time::timeout(LOOP_ANSWER, s.gossip.snapshot())
        .await
        .ok()
        .flatten()
}

/// Whether the agent's loops turn: each loop the watchdog sees stamped within its budget,
/// the gossip loop answers, the store has not failed.
pub async fn live(s: &Sources) -> Vec<Check> {
    let gossip = status(s).await;
    vec![
        Check::of("loops", late_loops(s)),
        Check::of(
            "gossip_loop",
            gossip
                .is_none()
                .then(|| format!("the gossip loop did not answer within {LOOP_ANSWER:?}")),
        ),
        Check::of(
            "store",
            s.store
                .failure()
                .map(|why| format!("the store failed: {why}")),
        ),
    ]
}

/// The loops the watchdog sees silent past their budget, if any.
fn late_loops(s: &Sources) -> Option<String> {
    s.watchdog.as_ref().and_then(|(dog, budget)| {
        let late: Vec<String> = dog
            .silences()
            .into_iter()
            .filter(|l| l.since > *budget)
            .map(|l| format!("{} silent for {} ms", l.name, l.since.as_millis()))
            .collect();
        (!late.is_empty()).then(|| late.join(", "))
    })
}

/// Whether the agent should be sent traffic, each condition a check.
pub async fn ready(s: &Sources) -> Vec<Check> {
    let status = status(s).await;
    let view = s.gossip.view();
    evaluate(s, status.as_ref(), view.as_ref())
}

/// The readiness checks over what was read (shared with the metrics, which read the same
/// snapshot once).
pub fn evaluate(
    s: &Sources,
    status: Option<&ClusterStatusResponse>,
    view: Option<&ViewStatus>,
) -> Vec<Check> {
    let mut checks = Vec::with_capacity(10);
    // A loop late past its budget: not ready (gRPC health turns NOT_SERVING) before the
    // watchdog's fatal bound ends the agent.
    checks.push(Check::of("loops", late_loops(s)));
    checks.push(Check::of(
        "store",
        s.store
            .failure()
            .map(|why| format!("the store failed: {why}")),
    ));
    checks.push(Check::of(
        "gossip_loop",
        status
            .is_none()
            .then(|| format!("the gossip loop did not answer within {LOOP_ANSWER:?}")),
    ));
    let joined = match view {
        None => Some("gossip has stopped".to_owned()),
        Some(v) if s.expects_peers && v.members_alive <= 1 => {
            Some("no other member is alive (the seeds were not reached yet)".to_owned())
        }
        Some(_) => None,
    };
    checks.push(Check::of("gossip_joined", joined));
    // The view's reasons split in two: catching up (not synced yet, an old gap), and the
    // rest (not joined, no majority, settling, clock off).
    let catching_up = |r: &ViewReason| matches!(r, ViewReason::NotSynced | ViewReason::OldGap);
    checks.push(Check::of(
        "view_standing",
        view.and_then(|v| {
            let reasons: Vec<String> = v
                .reasons
                .iter()
                .filter(|r| !catching_up(r))
                .map(|r| format!("{r:?}"))
                .collect();
            (!reasons.is_empty()).then(|| {
                format!(
                    "the view does not stand ({}); {} of {} recent members alive",
                    reasons.join(", "),
                    v.members_alive,
                    v.members_recent
                )
            })
        }),
    ));
    checks.push(Check::of(
        "caught_up",
        view.filter(|v| v.reasons.iter().any(catching_up)).map(|v| {
            format!(
                "not caught up with its peers (no completed session yet, or a version lacking for {:.1} s)",
                v.oldest_gap.as_secs_f64()
            )
        }),
    ));
    let queue = s.store.queue_depths().and_then(|(local, _)| {
        let share = |used: usize, limit: usize| used as f64 / limit.max(1) as f64;
        let full =
            share(local.requests, local.requests_limit).max(share(local.bytes, local.bytes_limit));
        (full > QUEUE_SATURATED).then(|| {
            format!(
                "the write queue is {:.0} % full ({} requests, {} bytes; {} waiting)",
                full * 100.0,
                local.requests,
                local.bytes,
                local.waiters
            )
        })
    });
    checks.push(Check::of("write_queue", queue));
    let clock = match (s.store.clock_fence(), s.store.clock_ahead_ms()) {
        (Some(f), _) => Some(format!(
            "this clock is {} ms off its peers' (bound {} ms): writes are refused",
            f.offset_ms, f.bound_ms
        )),
        (None, Some(ms)) => Some(format!(
            "the store's clock leads the wall clock by {ms} ms: writes are refused"
        )),
        (None, None) => None,
    };
    checks.push(Check::of("clock", clock));
    let certs = status
        .and_then(|st| st.tls.as_ref())
        .filter(|t| t.state == "expired")
        .map(|t| {
            format!(
                "a certificate has expired (own {} s, CA {} s, soonest peer {} s)",
                t.own_expires_in_secs, t.ca_expires_in_secs, t.soonest_peer_expires_in_secs
            )
        });
    checks.push(Check::of("certificates", certs));
    checks.push(Check::of(
        "frontends",
        s.view.as_ref().filter(|v| !v.is_synced()).map(|_| {
            "the xDS/DNS view does not hold the region yet (it waits for the store's first read and for catching up with peers)"
                .to_owned()
        }),
    ));
    checks
}

/// How often [`judge`] checks readiness.
pub const JUDGE_EVERY: Duration = Duration::from_secs(1);

/// Judge readiness every [`JUDGE_EVERY`] into `ready` (what gRPC health follows), logging
/// each change with the checks that failed. Returns once every receiver is gone.
pub async fn judge(s: &Sources, ready: tokio::sync::watch::Sender<bool>) {
    let mut last: Option<bool> = None;
    // The xDS/DNS view's first state is judged at once, not at the next tick (a fresh agent
    // would otherwise stay unready up to a tick longer than before the view waited).
    let mut frontends = s.view.as_ref().and_then(|v| v.synced());
    loop {
        let checks = self::ready(s).await;
        let ok = checks.iter().all(|c| c.ok);
        let passed = |name: &str| checks.iter().any(|c| c.name == name && c.ok);
        // And one anti-entropy session completed: without a majority in sight the view does
        // not say "not synced", so the checks alone could pass before any session.
        let session = s.gossip.view().is_some_and(|v| v.syncs_completed > 0);
        if !*s.caught_up_once.borrow() && passed("gossip_joined") && passed("caught_up") && session
        {
            s.caught_up_once.send_replace(true);
        }
        if last != Some(ok) {
            if ok {
                tracing::info!("ready");
            } else {
                let failed: Vec<String> = checks
                    .iter()
                    .filter(|c| !c.ok)
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect();
                tracing::info!(checks = ?failed, "not ready");
            }
            last = Some(ok);
        }
        if ready.is_closed() {
            return;
        }
        ready.send_if_modified(|r| std::mem::replace(r, ok) != ok);
        let synced = async {
            match frontends.as_mut() {
                Some(f) if !*f.borrow() => {
                    if f.wait_for(|s| *s).await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(JUDGE_EVERY) => {}
            () = synced => {}
        }
    }
}

/// What `/v1/health` answers.
pub struct Thresholds {
    pub ok: bool,
    /// Versions lacking, summed over origins.
    pub gaps: u64,
    /// Seconds since the last good anti-entropy session with any peer (`None`: never one).
    pub lag_secs: Option<f64>,
    /// The checks that failed, by name and why.
    pub failed: Vec<String>,
}

/// Readiness, plus at most `gaps` versions lacking and a good session within `lag` seconds
/// (each only when given).
pub async fn thresholds(s: &Sources, gaps: Option<u64>, lag: Option<f64>) -> Thresholds {
    let status = status(s).await;
    let view = s.gossip.view();
    let mut failed: Vec<String> = evaluate(s, status.as_ref(), view.as_ref())
        .into_iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    let lacking: u64 = status
        .as_ref()
        .map_or(0, |st| st.origins.iter().map(|o| o.missing).sum());
    let lag_secs = status.as_ref().and_then(|st| {
        st.peers
            .iter()
            .filter(|p| p.ok)
            .map(|p| p.last_ms_ago as f64 / 1000.0)
            .reduce(f64::min)
    });
    if let Some(max) = gaps
        && lacking > max
    {
        failed.push(format!("gaps: {lacking} versions lacking (at most {max})"));
    }
    if let Some(max) = lag {
        match lag_secs {
            Some(l) if l <= max => {}
            Some(l) => failed.push(format!(
                "lag: the last good session was {l:.1} s ago (at most {max} s)"
            )),
            // Alone, with nobody to sync with, it lags nobody.
            None if !s.expects_peers => {}
            None => failed.push("lag: no good session yet".to_owned()),
        }
    }
    Thresholds {
        ok: failed.is_empty(),
        gaps: lacking,
        lag_secs,
        failed,
    }
}
