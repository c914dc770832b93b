//! The operator's listener of a real agent: `/metrics` passes `promtool check metrics`
//! (Prometheus's own linter, installed by `cargo xtask test`), and carries the figures an
//! operator alerts on; `/livez`, `/readyz` and `/v1/health` answer with each check, and say
//! why when one fails.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::sample;
use patina_testkit::http_get;

/// `promtool check metrics` on `exposition`: its complaints (empty: none). Fails the test
/// when promtool is missing: `cargo xtask test` installs it (Debian's `prometheus`).
fn promtool(exposition: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is missing: run the tests with `cargo xtask test`, which installs it");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said.trim().to_owned()
    } else {
        format!("promtool failed: {said}")
    }
}

/// The agent's gRPC health (the whole server's).
async fn grpc_health(agent: &common::Agent) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(agent.channel().await)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status
}

fn eventually_get(url: &str, want: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http_get(url).expect("the operator's listener answers");
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: {status}, not {want}: {body}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `url`'s body passes `check` within 10 s.
fn eventually_get_until(url: &str, check: impl Fn(&str) -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((200, body)) = http_get(url)
            && check(&body)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_probes_say_why() {
    let dir = tempfile::tempdir().unwrap();
    // A region's only agent: its view stands alone. Its DNS front end on: its metrics too.
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        "[gossip]\nstandalone = true\n[dns]\nlisten = \"127.0.0.1:0\"\n",
    );
    let ops = agent.metrics_url();
    common::put_app_machine(&agent, "web-1", "web", true).await;

    let body = eventually_get(&format!("{ops}/readyz?verbose"), 200);
    for check in [
        "store",
        "gossip_loop",
        "gossip_joined",
        "view_standing",
        "caught_up",
        "write_queue",
        "clock",
        "certificates",
        "frontends",
    ] {
        assert!(body.contains(&format!("[+]{check} ok")), "{body}");
    }
    assert!(body.ends_with("readyz check ok\n"), "{body}");
    let (status, body) = http_get(&format!("{ops}/livez")).unwrap();
    assert_eq!((status, body.as_str()), (200, "livez check ok\n"));
    // gRPC health follows readiness (judged every second, a judgement taking up to 2 s when
    // the gossip loop is slow to answer: allow 10 s).
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let mut health = grpc_health(&agent).await;
    for _ in 0..100 {
        if health == serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        health = grpc_health(&agent).await;
    }
    assert_eq!(health, serving);

    // One Watch stream open, on a connection of its own.
    let mut watch = agent
        .client()
        .await
        .watch(patina_proto::v1::WatchRequest {
            app: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());

    let exposition = eventually_get(&format!("{ops}/metrics"), 200);
    assert_eq!(promtool(&exposition), "", "{exposition}");
    assert_eq!(
        sample(&exposition, "patina_watches"),
        Some(1.0),
        "{exposition}"
    );
    assert!(sample(&exposition, "patina_connections").is_some_and(|c| c >= 1.0));
    assert_eq!(sample(&exposition, "patina_xds_streams"), Some(0.0));
    // The xDS/DNS view holds the one machine (its follower may be a moment behind).
    assert_eq!(
        sample(&exposition, "patina_frontend_view_synced"),
        Some(1.0)
    );
    let held = eventually_get_until(&format!("{ops}/metrics"), |e| {
        sample(e, "patina_frontend_view_machines") == Some(1.0)
            && sample(e, "patina_frontend_view_apps") == Some(1.0)
    });
    assert!(held, "the view's sizes");
    assert_eq!(sample(&exposition, "patina_xds_responses_total"), Some(0.0));
    assert_eq!(
        sample(
            &exposition,
            "patina_dns_queries_total{outcome=\"nxdomain\"}"
        ),
        Some(0.0),
        "{exposition}"
    );
    drop(watch);
    assert!(
        exposition.contains("patina_build_info{version=\"")
            && exposition.contains("role=\"region\""),
        "{exposition}"
    );
    assert_eq!(sample(&exposition, "patina_ready"), Some(1.0));
    assert_eq!(
        sample(&exposition, "patina_store_records{kind=\"live\"}"),
        Some(1.0),
        "{exposition}"
    );
    assert!(sample(&exposition, "patina_store_commits_total").is_some_and(|c| c >= 1.0));
    assert_eq!(
        sample(&exposition, "patina_store_queue_requests{class=\"local\"}"),
        Some(0.0)
    );
    assert!(
        sample(
            &exposition,
            "patina_store_queue_requests_limit{class=\"local\"}"
        )
        .is_some_and(|l| l > 0.0)
    );
    assert_eq!(sample(&exposition, "patina_view_standing"), Some(1.0));
    // Latency histograms: the one write, and at least its commit's fsync.
    assert_eq!(
        sample(&exposition, "patina_store_write_seconds_count"),
        Some(1.0),
        "{exposition}"
    );
    assert_eq!(
        sample(
            &exposition,
            "patina_store_write_seconds_bucket{le=\"+Inf\"}"
        ),
        Some(1.0)
    );
    assert!(sample(&exposition, "patina_store_fsync_seconds_count").is_some_and(|n| n >= 1.0));
    assert!(sample(&exposition, "patina_store_fsync_seconds_sum").is_some_and(|s| s > 0.0));
    assert!(
        !exposition.contains("# EOF"),
        "the classic text format has no EOF line"
    );

    // Thresholds for load balancers; bad ones are refused.
    let (status, body) = http_get(&format!("{ops}/v1/health?gaps=0&lag=5")).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"ok\":true"), "{body}");
    let (status, body) = http_get(&format!("{ops}/v1/health?gaps=many")).unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("gaps=many"), "{body}");
}

/// An agent given seeds it cannot reach is live but not ready: `/readyz` says it has not
/// joined, and so do the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_cannot_join_is_live_but_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    // A seed where nobody listens (a port of loopback no agent uses).
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        "[gossip]\nseeds = [\"127.0.0.1:9\"]\n",
    );
    let ops = agent.metrics_url();
    let (status, body) = http_get(&format!("{ops}/livez")).unwrap();
    assert_eq!(status, 200, "{body}");
    let body = eventually_get(&format!("{ops}/readyz"), 503);
    assert!(body.contains("[-]gossip_joined failed: "), "{body}");
    assert!(body.contains("[+]store ok"), "{body}");
    assert!(body.ends_with("readyz check failed\n"), "{body}");
    // gRPC health follows readiness: load balancers that use it leave the agent out.
    assert_eq!(
        grpc_health(&agent).await,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );
    let (_, exposition) = http_get(&format!("{ops}/metrics")).unwrap();
    assert_eq!(sample(&exposition, "patina_ready"), Some(0.0));
    assert_eq!(
        sample(
            &exposition,
            "patina_readiness_check{check=\"gossip_joined\"}"
        ),
        Some(0.0)
    );
    let (status, body) = http_get(&format!("{ops}/v1/health")).unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("gossip_joined"), "{body}");
}

/// The operator's listener holds at most 64 connections: idle ones past that wait, and the
/// next request is served once one closes (its gRPC API never shares these slots).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_hold_at_most_the_listeners_slots() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(dir.path(), "127.0.0.1", "[gossip]\nstandalone = true\n");
    let ops = agent.metrics_url();
    let host = ops.trim_start_matches("http://").to_owned();
    let idle: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&host).unwrap())
        .collect();
    // The 65th: connected by the kernel's backlog, but not served while 64 are held.
    let url = format!("{ops}/livez");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(http_get(&url));
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(1500)).is_err(),
        "a 65th connection was served while 64 idle ones were held"
    );
    // The gRPC API is not affected (its readiness is judged every second: on a loaded
    // machine a judgement may still be on its way).
    let serving = common::eventually(Duration::from_secs(10), || async {
        grpc_health(&agent).await
            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    })
    .await;
    assert!(
        serving.is_some(),
        "the gRPC API serves while the listener is full"
    );
    drop(idle);
    let (status, _) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("served once the idle connections closed")
        .unwrap();
    assert_eq!(status, 200);
}
