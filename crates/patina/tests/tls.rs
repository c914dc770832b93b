//! Who may speak, with real processes: certificates made by `patina certs`, two region agents
//! with TLS on (as by default) replicating over it, and callers refused with the right code
//! while nothing changes: no certificate, another CA's, a reader writing, a host-bound writer
//! writing another host's machine, another cluster's agent opening a Sync session or
//! forgetting a member.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, certs, issue, machine, tls_channel as channel, tls_dial as dial};
use patina_proto::v1::admin_client::AdminClient;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::sync_client::SyncClient;
use patina_proto::v1::{
    ClusterStatusRequest, ForgetRequest, GetMachineRequest, ListInstancesRequest, SyncMessage,
    UpsertMachineRequest,
};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn start(root: &Path, i: usize, ca: &Path, seeds: &[usize]) -> Agent {
    // Agent 1's certificate ends in 20 days: its status warns, and its peers report it.
    let days = if i == 1 { 20 } else { 90 };
    common::start_tls_agent(root, i, 171, ca, seeds, days)
}

fn put(id: &str, host: &str) -> UpsertMachineRequest {
    let mut m = machine(id, "web", 8080);
    m.host = host.into();
    UpsertMachineRequest { machine: Some(m) }
}

async fn count(ch: &Channel) -> usize {
    count_result(ch).await.expect("list")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_roles_certificates_grant_may_speak() {
    let root = tempfile::tempdir().unwrap();
    let ca = root.path().join("ca");
    certs(&["ca", "--dir", ca.to_str().unwrap()]);
    let other_ca = root.path().join("other-ca");
    certs(&["ca", "--dir", other_ca.to_str().unwrap()]);

    let a = start(root.path(), 0, &ca, &[]);
    let b = start(root.path(), 1, &ca, &[0]);

    let writer = dial(&issue(
        &ca,
        &root.path().join("writer"),
        &["--writer", "test"],
    ));
    let host_writer = dial(&issue(
        &ca,
        &root.path().join("host-writer"),
        &["--writer", "test/worker-1"],
    ));
    let reader = dial(&issue(
        &ca,
        &root.path().join("reader"),
        &["--reader", "region/test"],
    ));
    let stranger = dial(&issue(
        &other_ca,
        &root.path().join("stranger"),
        &["--region-agent", "test"],
    ));
    let fra_agent = dial(&issue(
        &ca,
        &root.path().join("fra"),
        &["--region-agent", "fra"],
    ));

    // A writer writes through A; B, a peer over TLS, gets it.
    let wa = channel(&writer, &a).await.expect("writer connects");
    RegionClient::new(wa.clone())
        .upsert_machine(put("m1", "worker-0"))
        .await
        .expect("the writer writes");
    let rb = channel(&reader, &b).await.expect("reader connects");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = RegionClient::new(rb.clone())
            .get_machine(GetMachineRequest { id: "m1".into() })
            .await;
        if got.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "m1 never reached B over TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(count(&rb).await, 1);

    // A reader may not write.
    let ra = channel(&reader, &a).await.unwrap();
    let err = RegionClient::new(ra.clone())
        .upsert_machine(put("m2", "worker-0"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("writer role"), "{}", err.message());

    // A writer bound to worker-1 writes worker-1's machines only (through worker-1's agent,
    // B), and cannot take over another host's machine by its id.
    let ha = channel(&host_writer, &a).await.unwrap();
    let hb = channel(&host_writer, &b).await.unwrap();
    RegionClient::new(hb.clone())
        .upsert_machine(put("m7", "worker-1"))
        .await
        .expect("its own host");
    for (ch, id, host) in [(&ha, "m3", "worker-0"), (&hb, "m1", "worker-1")] {
        let err = RegionClient::new(ch.clone())
            .upsert_machine(put(id, host))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{id}: {err:?}");
    }

    // Another cluster's agent may neither open a Sync session nor forget a member.
    let fa = channel(&fra_agent, &a).await.unwrap();
    let hello = tokio_stream::iter(vec![SyncMessage::default()]);
    let err = SyncClient::new(fa.clone())
        .exchange(hello)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = AdminClient::new(fa)
        .forget(ForgetRequest {
            member: "anything".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // No certificate, or one of another CA: no connection at all.
    let plain = Channel::from_shared(a.url.clone()).unwrap().connect().await;
    let refused = match plain {
        Err(_) => true,
        Ok(ch) => RegionClient::new(ch)
            .list_instances(ListInstancesRequest {
                app: "web".into(),
                ..Default::default()
            })
            .await
            .is_err(),
    };
    assert!(refused, "a plaintext client was served");
    let strange = match channel(&stranger, &a).await {
        Err(_) => true,
        Ok(ch) => count_result(&ch).await.is_err(),
    };
    assert!(strange, "another CA's certificate was served");

    // Expiry is reported: B's own certificate warns (under 30 days); A reports B, which it met
    // in B's sessions, as its soonest peer.
    let peer = dial(&issue(
        &ca,
        &root.path().join("peer"),
        &["--region-agent", "test"],
    ));
    let status = |agent: &Agent| {
        let peer = peer.clone();
        let url = agent.url.clone();
        async move {
            let ch = peer
                .connect(Endpoint::from_shared(url).unwrap())
                .await
                .unwrap();
            AdminClient::new(ch)
                .cluster_status(ClusterStatusRequest {})
                .await
                .unwrap()
                .into_inner()
                .tls
                .expect("TLS status")
        }
    };
    // B's next anti-entropy session (every 5 s or so) calls A.
    let deadline = Instant::now() + Duration::from_secs(20);
    let ta = loop {
        let ta = status(&a).await;
        if ta.soonest_peer_expires_in_secs < 30 * 86_400 || Instant::now() > deadline {
            break ta;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let tb = status(&b).await;
    assert_eq!((ta.state.as_str(), tb.state.as_str()), ("ok", "warning"));
    let day = 86_400;
    assert!(
        (89 * day..=90 * day).contains(&ta.own_expires_in_secs),
        "{ta:?}"
    );
    assert!(
        (19 * day..=20 * day).contains(&tb.own_expires_in_secs),
        "{tb:?}"
    );
    assert!(
        (19 * day..=20 * day).contains(&ta.soonest_peer_expires_in_secs)
            && ta
                .soonest_peer
                .ends_with("region/test/agent at 127.0.0.172"),
        "{ta:?}"
    );

    // The command-line client checks the server's cluster when told which to expect.
    let peer_dir = root.path().join("peer");
    let status_cli = |cluster: &str| {
        common::cli(&[
            "status",
            "--server",
            a.host_port(),
            "--tls-dir",
            peer_dir.to_str().unwrap(),
            "--cluster",
            cluster,
        ])
    };
    let wrong = status_cli("region/fra");
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("not an agent of region/fra"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(status_cli("region/test").status.success());

    // Nothing of the refused calls changed anything: m1 and m7 only, m1 still worker-0's.
    assert_eq!(count(&rb).await, 2);
    let m1 = RegionClient::new(rb)
        .get_machine(GetMachineRequest { id: "m1".into() })
        .await
        .unwrap()
        .into_inner()
        .machine
        .unwrap();
    assert_eq!(m1.host, "worker-0");
}

async fn count_result(ch: &Channel) -> Result<usize, tonic::Status> {
    Ok(RegionClient::new(ch.clone())
        .list_instances(ListInstancesRequest {
            app: "web".into(),
            include_all: true,
            ..Default::default()
        })
        .await?
        .into_inner()
        .machines
        .len())
}
