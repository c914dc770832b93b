//! Nothing of an agent runs unsupervised: when a part that must run as long as the agent ends
//! early (here its gossip loop panics, by the test-only `PATINA_FAULT`), the agent does not
//! go on acknowledging writes that never replicate with a frozen liveness overlay: it reports
//! NOT_SERVING and exits non-zero, as for a failed store.

mod common;

use std::time::{Duration, Instant};

use common::{Agent, machine};
use patina_proto::v1::UpsertMachineRequest;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_gossip_loop_dies_reports_not_serving_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = "region = \"test\"\nhost = \"worker-1\"\nlisten = \"127.0.0.1:0\"\nlog = \"warn\"\n[gossip]\nlisten = \"127.0.0.1:0\"\nstandalone = true\n";
    let mut agent = Agent::start_role_env(
        common::bin(),
        "region",
        dir.path(),
        config,
        &[("PATINA_FAULT", "gossip-panic-after-ms=1500")],
    )
    .expect("start the agent");
    let started = Instant::now();
    let mut client = agent.client().await;
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("m-1", "web", 80)),
        })
        .await
        .expect("a write before the fault");
    let mut health = HealthClient::new(agent.channel().await);
    let mut saw_not_serving = false;
    let status = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the agent still runs 18 s after its gossip loop died"
        );
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        if let Ok(h) = health.check(HealthCheckRequest::default()).await {
            saw_not_serving |= h.into_inner().status == ServingStatus::NotServing as i32;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "the agent exits non-zero: {status:?}");
    assert!(
        saw_not_serving,
        "the agent reported NOT_SERVING before it exited"
    );
    eprintln!(
        "gossip died at 1.5 s; the agent exited {status:?} after {:?}",
        started.elapsed()
    );
}
