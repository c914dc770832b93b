//! Clocks are bounded, not trusted. One agent of three has its wall clock stepped 5 minutes
//! ahead (the test-only `PATINA_FAULT=clock-step-ms=...`): it fences itself at once (its
//! writes get `UNAVAILABLE` with a clear message, its reads go on, its readiness turns
//! NOT_SERVING, its view stops standing), while the other two go on replicating, and their
//! clocks never move past their wall clock plus `max_clock_offset` (500 ms): every Watch
//! message they send is stamped within it. Before, the fast agent acked writes no peer would
//! take, and any timestamp it got through dragged every clock ahead.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, machine};
use patina_proto::v1::{UpsertMachineRequest, WatchRequest, WhoamiRequest};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const STEP_MS: i64 = 300_000;

fn ip(i: usize) -> String {
    format!("127.0.0.{}", 141 + i)
}

fn start(root: &std::path::Path, i: usize, seeds: &[usize], env: &[(&str, &str)]) -> Agent {
    let seeds: Vec<String> = seeds.iter().map(|s| ip(*s)).collect();
    common::start_member_env(root, i, &ip(i), &seeds, env)
}

async fn put(agent: &Agent, id: &str) -> Result<(), tonic::Status> {
    agent
        .client()
        .await
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine(id, "web", 80)),
        })
        .await
        .map(|_| ())
}

async fn has(agent: &Agent, id: &str) -> bool {
    agent
        .client()
        .await
        .get_machine(patina_proto::v1::GetMachineRequest { id: id.into() })
        .await
        .is_ok()
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Follow `agent`'s Watch (heartbeats every 100 ms) for `d`: the largest lead of a message's
/// stamp over this host's wall clock as the message arrived, and how many messages.
async fn largest_lead(agent: &Agent, d: Duration) -> (i64, usize) {
    let mut stream = agent
        .client()
        .await
        .watch(WatchRequest {
            heartbeat_ms: 100,
            ..Default::default()
        })
        .await
        .expect("Watch")
        .into_inner();
    let end = Instant::now() + d;
    let (mut lead, mut n) = (i64::MIN, 0);
    while let Ok(Ok(Some(m))) = tokio::time::timeout_at(end.into(), stream.message()).await {
        let stamped = (m.view_hlc >> 16) as i64;
        lead = lead.max(stamped - wall_ms() as i64);
        n += 1;
    }
    (lead, n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_clock_jumps_five_minutes_ahead_fences_itself_and_spreads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let step = format!("clock-step-ms={STEP_MS},after-ms=6000");
    let fast = start(dir.path(), 0, &[1, 2], &[("PATINA_FAULT", &step)]);
    let started = Instant::now();
    let b = start(dir.path(), 1, &[0], &[]);
    let c = start(dir.path(), 2, &[0], &[]);
    // Before the step, the three replicate.
    put(&fast, "before").await.expect("a write before the step");
    let replicated = common::eventually(Duration::from_secs(20), || async {
        has(&b, "before").await && has(&c, "before").await
    })
    .await;
    assert!(replicated.is_some(), "replicated before the step");
    // The step (6 s after the fast agent started): its writes are refused, with a message.
    tokio::time::sleep_until((started + Duration::from_millis(6_000)).into()).await;
    let refused = common::eventually(Duration::from_secs(10), || async {
        matches!(put(&fast, "after").await, Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("clock"))
    })
    .await;
    assert!(
        refused.is_some(),
        "the fast agent refuses writes with UNAVAILABLE naming its clock"
    );
    eprintln!("writes refused {refused:?} after the step");
    // And it stays fenced while its clock is off: sessions with its peers (which confirm the
    // step) must not lift it. Every write for 10 s is refused; none is acknowledged.
    let until = Instant::now() + Duration::from_secs(10);
    let mut tries = 0;
    while Instant::now() < until {
        let r = put(&fast, &format!("after-{tries}")).await;
        assert!(
            matches!(&r, Err(s) if s.code() == tonic::Code::Unavailable),
            "write {tries} after the step was not refused: {r:?}"
        );
        tries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(has(&fast, "before").await, "its reads go on");
    let health = HealthClient::new(fast.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(health, ServingStatus::NotServing as i32, "not ready");
    let me = fast
        .admin()
        .await
        .whoami(WhoamiRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        me.view.is_some_and(|v| !v.stands),
        "its view does not stand"
    );
    // The others go on, and their clocks stay within the bound of their wall clocks.
    put(&b, "b-after")
        .await
        .expect("a healthy agent takes writes");
    let (lead_b, lead_c) = tokio::join!(
        largest_lead(&b, Duration::from_secs(5)),
        largest_lead(&c, Duration::from_secs(5))
    );
    assert!(
        lead_b.1 >= 20 && lead_c.1 >= 20,
        "watched: {lead_b:?} {lead_c:?}"
    );
    assert!(
        lead_b.0 <= 500 + 100 && lead_c.0 <= 500 + 100,
        "a healthy agent's clock ran ahead of its wall clock: b {lead_b:?}, c {lead_c:?}"
    );
    assert!(
        has(&c, "b-after").await || {
            tokio::time::sleep(Duration::from_secs(2)).await;
            has(&c, "b-after").await
        }
    );
    eprintln!("healthy agents' largest lead over their wall clocks: b {lead_b:?}, c {lead_c:?}");
}

/// A region of two, one of them started with a clock 30 s fast (within the 60 s its peer
/// still takes): with one peer neither can tell which clock is off, so neither fences, and
/// the fast one's writes replicate. Its peer's clock still never runs more than the bound
/// ahead of its own wall clock: it takes the fast timestamps only up to the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_fast_timestamps_do_not_drag_a_healthy_clock_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let fast = start(
        dir.path(),
        3,
        &[4],
        &[("PATINA_FAULT", "clock-step-ms=30000,after-ms=0")],
    );
    let b = start(dir.path(), 4, &[3], &[]);
    for i in 0..20 {
        put(&fast, &format!("fast-{i}"))
            .await
            .expect("the fast agent is not fenced by one peer");
    }
    let replicated = common::eventually(Duration::from_secs(20), || async {
        has(&b, "fast-19").await
    })
    .await;
    assert!(replicated.is_some(), "its writes replicate");
    let (lead, n) = largest_lead(&b, Duration::from_secs(3)).await;
    assert!(n >= 10, "watched {n} messages");
    assert!(
        lead <= 500 + 100,
        "the healthy agent's clock was dragged {lead} ms ahead of its wall clock"
    );
    eprintln!("healthy agent's largest lead with a 30 s fast peer: {lead} ms");
}
