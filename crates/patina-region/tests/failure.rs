//! A region agent whose store fails for good (an fsync error) says so and stops: health
//! NOT_SERVING, writes UNAVAILABLE, open watches ended, and `serve` returns the failure so
//! the binary exits non-zero. In process, over real gRPC on loopback.

use std::sync::Arc;
use std::time::Duration;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::watch_response::Kind;
use patina_proto::v1::{Health, Machine, MachineState, UpsertMachineRequest, WatchRequest};
use patina_region::{AgentIdentity, MachineKind, ServeError};
use patina_store::{Failpoints, InjectedFault, Store, StoreOptions};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn machine(id: &str) -> Machine {
    Machine {
        id: id.into(),
        app: "web".into(),
        addresses: vec!["10.0.0.1:80".into()],
        state: MachineState::Started as i32,
        health: Health::Passing as i32,
        ..Machine::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_turns_the_agent_not_serving_ends_watches_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let failpoints = Arc::new(Failpoints::default());
    let opts = StoreOptions {
        kind: Arc::new(MachineKind::new("test")),
        failpoints: failpoints.clone(),
        ..StoreOptions::default()
    };
    let path = dir.path().to_path_buf();
    let store = tokio::task::spawn_blocking(move || Store::open(&path, opts))
        .await
        .unwrap()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let id = AgentIdentity {
        region: "test".into(),
        host: "worker-1".into(),
    };
    let server = tokio::spawn(async move {
        patina_region::serve(
            listener,
            store,
            &id,
            Default::default(),
            None,
            None,
            std::future::pending(),
        )
        .await
    });
    let channel = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut region = RegionClient::new(channel.clone());
    let mut health = HealthClient::new(channel);
    let status = |h: &tonic_health::pb::HealthCheckResponse| h.status;
    region
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("m1")),
        })
        .await
        .unwrap();
    let mut watch = region
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    loop {
        let msg = watch.message().await.unwrap().unwrap();
        if msg.kind == Kind::SnapshotDone as i32 {
            break;
        }
    }

    failpoints.arm(InjectedFault::FsyncError);
    let err = region
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("m2")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("failed"), "{}", err.message());

    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("the watch ends");
    let err = ended.expect_err("ended with a status");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    // For a moment (FAILED_GRACE, 2 s) the agent still answers, so that health checkers see
    // why. The watch ends with the store, the status is set a moment after by the agent's
    // shutdown task: within half a second of the watch's end, both say NOT_SERVING.
    for service in ["", "patina.v1.Region"] {
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        let last = loop {
            let h = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner();
            if status(&h) == ServingStatus::NotServing as i32
                || std::time::Instant::now() >= deadline
            {
                break status(&h);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(last, ServingStatus::NotServing as i32, "{service:?}");
    }
    let err = region
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("m3")),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);

    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve returns after the grace period")
        .unwrap();
    assert!(
        matches!(served, Err(ServeError::StoreFailed(_))),
        "{served:?}"
    );
}
