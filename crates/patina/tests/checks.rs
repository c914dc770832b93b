//! Health checks run by the agent (`docs/checks.md`), with real processes and real servers on
//! loopback: a region of two agents, a bridge and two global agents. A machine's HTTP and TCP
//! servers are killed and started again; its host's agent writes each change of its health,
//! and every global agent follows, with no orchestrator action.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use common::{Agent, eventually, lookup, start_bridge, start_global, start_region_agent};
use patina_proto::v1::{
    Check, GetMachineRequest, Health, HttpCheck, Machine, MachineState, TcpCheck,
    UpsertMachineRequest, check,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A real HTTP server on `addr` answering every request with the status in `status`, until
/// the returned task is aborted (then connections are refused).
async fn http_server(addr: &str, status: Arc<AtomicU16>) -> tokio::task::JoinHandle<()> {
    let listener = bind(addr).await;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let status = status.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let answer = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    })
}

/// A TCP server on `addr` that accepts and drops connections, until aborted.
async fn tcp_server(addr: &str) -> tokio::task::JoinHandle<()> {
    let listener = bind(addr).await;
    tokio::spawn(async move {
        loop {
            let _ = listener.accept().await;
        }
    })
}

/// Bind `addr`, retrying while the port is still held by a socket just closed.
async fn bind(addr: &str) -> tokio::net::TcpListener {
    for _ in 0..100 {
        if let Ok(l) = tokio::net::TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr}");
}

fn checked(id: &str, app: &str, address: &str, check: check::Target) -> Machine {
    Machine {
        id: id.into(),
        app: app.into(),
        addresses: vec![address.into()],
        state: MachineState::Started as i32,
        // No health: its checks give it.
        health: Health::Unspecified as i32,
        checks: vec![Check {
            name: "up".into(),
            target: Some(check),
            interval_ms: 300,
            timeout_ms: 200,
            passes_before_passing: 1,
            failures_before_critical: 2,
        }],
        ..Machine::default()
    }
}

async fn upsert(agent: &Agent, m: Machine) -> Machine {
    agent
        .client()
        .await
        .upsert_machine(UpsertMachineRequest { machine: Some(m) })
        .await
        .expect("UpsertMachine")
        .into_inner()
        .machine
        .unwrap()
}

async fn get(agent: &Agent, id: &str) -> Option<Machine> {
    let mut client = agent.client().await;
    client
        .get_machine(GetMachineRequest { id: id.into() })
        .await
        .ok()
        .and_then(|r| r.into_inner().machine)
}

/// `(healthy, total)` of `app` in ord at every global agent, if all of them agree.
async fn at_every_global(globals: &[&Agent], app: &str) -> Option<(u32, u32)> {
    let mut seen = None;
    for g in globals {
        let answer = lookup(g, app, "ord", true).await;
        let here = answer
            .iter()
            .find(|(r, _, _)| r == "ord")
            .map_or((0, 0), |(_, h, t)| (*h, *t));
        if seen.is_some_and(|s| s != here) {
            return None;
        }
        seen = Some(here);
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_checks_fail_leaves_every_global_agent_and_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ord1 = start_region_agent(root, "ord1", "127.0.0.201", "ord", &["127.0.0.202".into()]);
    let ord2 = start_region_agent(root, "ord2", "127.0.0.202", "ord", &["127.0.0.201".into()]);
    let seeds = ["127.0.0.203".to_owned()];
    let g1 = start_global(root, "g1", "127.0.0.203", "fra", &[], None);
    let g2 = start_global(root, "g2", "127.0.0.204", "syd", &seeds, None);
    // The bridge follows the other agent: the checks' results travel the region first.
    let _bridge = start_bridge(root, "b-ord", "127.0.0.205", "ord", &[&ord2, &ord1], &seeds);
    let globals = [&g1, &g2];

    const WEB: &str = "127.0.0.206:18080";
    const DB: &str = "127.0.0.206:15432";
    let status = Arc::new(AtomicU16::new(200));
    let mut web = http_server(WEB, status.clone()).await;
    let db = tcp_server(DB).await;

    // Written without a health: critical until its first check passes, then passing.
    let web_machine = || {
        checked(
            "web-1",
            "web",
            WEB,
            check::Target::Http(HttpCheck {
                port: 0,
                path: "/health".into(),
                expect_status: 0,
            }),
        )
    };
    let first = upsert(&ord1, web_machine()).await;
    assert_eq!(first.health, Health::Critical as i32, "starts critical");
    upsert(
        &ord1,
        checked("db-1", "db", DB, check::Target::Tcp(TcpCheck { port: 0 })),
    )
    .await;
    let up = eventually(Duration::from_secs(30), || async {
        at_every_global(&globals, "web").await == Some((1, 1))
            && at_every_global(&globals, "db").await == Some((1, 1))
    })
    .await;
    assert!(up.is_some(), "both machines pass their checks everywhere");

    // The web server dies: out of routing at every global agent.
    web.abort();
    let died = Instant::now();
    let out = eventually(Duration::from_secs(10), || async {
        at_every_global(&globals, "web").await == Some((0, 1))
    })
    .await;
    assert!(out.is_some(), "a dead instance leaves every global agent");
    println!(
        "web server killed: excluded at every global agent after {} ms (interval 300 ms x 2 failures)",
        died.elapsed().as_millis()
    );
    let m = get(&ord2, "web-1").await.expect("web-1 at ord2");
    assert_eq!(m.health, Health::Critical as i32);
    assert_eq!(
        at_every_global(&globals, "db").await,
        Some((1, 1)),
        "db untouched"
    );

    // The orchestrator writes the machine again, without a health, while it is critical: its
    // change stands and the health its checks gave it is kept.
    let mut again = web_machine();
    again.metadata.insert("image".into(), "v2".into());
    let written = upsert(&ord1, again).await;
    assert_eq!(written.health, Health::Critical as i32, "kept critical");

    // Back: routable again everywhere, the orchestrator's change kept.
    web = http_server(WEB, status.clone()).await;
    let back = eventually(Duration::from_secs(10), || async {
        at_every_global(&globals, "web").await == Some((1, 1))
    })
    .await;
    assert!(back.is_some(), "a restarted instance comes back everywhere");
    let m = get(&ord2, "web-1").await.expect("web-1 at ord2");
    assert_eq!(m.health, Health::Passing as i32);
    assert_eq!(m.metadata.get("image").map(String::as_str), Some("v2"));

    // A wrong status is a failure too (any 2xx passes by default).
    status.store(503, Ordering::Relaxed);
    let failing = eventually(Duration::from_secs(10), || async {
        get(&ord2, "web-1")
            .await
            .is_some_and(|m| m.health == Health::Critical as i32)
    })
    .await;
    assert!(failing.is_some(), "503 turns the machine critical");
    status.store(200, Ordering::Relaxed);

    // The TCP server dies: the db machine turns critical at the other agent.
    db.abort();
    let db_out = eventually(Duration::from_secs(10), || async {
        at_every_global(&globals, "db").await == Some((0, 1))
    })
    .await;
    assert!(db_out.is_some(), "a refused TCP connect leaves routing");

    // A machine stopped by its orchestrator is no longer checked: the health it was
    // written with stands.
    let mut stopped = checked("db-1", "db", DB, check::Target::Tcp(TcpCheck { port: 0 }));
    stopped.state = MachineState::Stopped as i32;
    stopped.health = Health::Passing as i32;
    upsert(&ord1, stopped).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = get(&ord1, "db-1").await.unwrap();
    assert_eq!(
        (m.state, m.health),
        (MachineState::Stopped as i32, Health::Passing as i32),
        "a stopped machine's checks do not run"
    );

    // The runner's figures are in the metrics.
    let (code, body) =
        patina_testkit::http_get(&format!("{}/metrics", ord1.metrics_url())).unwrap();
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert!(value("patina_check_transitions_total") >= 5.0, "{body}");
    assert!(value("patina_check_runs_total{result=\"failed\"}") >= 4.0);
    assert_eq!(value("patina_checked_machines"), 1.0, "db-1 stopped");
    web.abort();
}
