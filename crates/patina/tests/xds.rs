//! The xDS server of a real region agent, over real gRPC: state-of-the-world and delta ADS
//! streams, ACK/NACK, stale nonces, subscriptions by name and wildcard, removal, and what a
//! change to instances sends, and a client that stops reading (docs/frontends.md).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{machine, start};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc;
use patina_proto::v1::{DeleteMachineRequest, Health};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const WAIT: Duration = Duration::from_secs(10);
/// Long enough for a push that should not come: the debounce is 100 ms.
const QUIET: Duration = Duration::from_millis(600);

/// One ADS stream of either variant: requests go in through `tx`, responses come out of `rx`.
struct Ads<Req, Resp> {
    tx: mpsc::Sender<Req>,
    rx: tonic::Streaming<Resp>,
}

type Sotw = Ads<DiscoveryRequest, DiscoveryResponse>;
type Delta = Ads<DeltaDiscoveryRequest, DeltaDiscoveryResponse>;

impl<Req, Resp: std::fmt::Debug> Ads<Req, Resp> {
    async fn next(&mut self) -> Resp {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("a response in time")
            .expect("the stream is fine")
            .expect("the stream is open")
    }

    async fn quiet(&mut self) {
        if let Ok(r) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("nothing should have been sent, got {r:?}");
        }
    }
}

impl Sotw {
    async fn open(agent: &common::Agent) -> Sotw {
        let mut client = AggregatedDiscoveryServiceClient::new(agent.channel().await);
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("StreamAggregatedResources")
            .into_inner();
        Ads { tx, rx }
    }

    async fn send(&self, url: &str, names: &[&str], version: &str, nonce: &str) {
        self.tx
            .send(DiscoveryRequest {
                type_url: url.into(),
                resource_names: names.iter().map(|s| s.to_string()).collect(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) {
        self.send(&r.type_url, names, &r.version_info, &r.nonce)
            .await;
    }
}

fn endpoints_of(r: &DiscoveryResponse) -> HashMap<String, Vec<String>> {
    r.resources
        .iter()
        .map(|a| {
            let cla = ClusterLoadAssignment::decode(&*a.value).unwrap();
            let addrs = cla
                .endpoints
                .iter()
                .flat_map(|l| l.lb_endpoints.iter())
                .filter_map(|e| match &e.host_identifier {
                    Some(HostIdentifier::Endpoint(ep)) => ep.address.as_ref(),
                    _ => None,
                })
                .map(|a| format!("{a:?}"))
                .collect();
            (cla.cluster_name, addrs)
        })
        .collect()
}

fn cluster_names(r: &DiscoveryResponse) -> Vec<String> {
    let mut v: Vec<String> = r
        .resources
        .iter()
        .map(|a| Cluster::decode(&*a.value).unwrap().name)
        .collect();
    v.sort();
    v
}

async fn put(agent: &common::Agent, id: &str, app: &str, port: u16, health: Health) {
    let mut m = machine(id, app, port);
    m.health = health as i32;
    common::upsert(agent, m).await;
}

#[tokio::test]
async fn state_of_the_world_acks_nacks_stale_nonces_and_changes() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "127.0.0.81");
    put(&agent, "web-1", "web", 8080, Health::Passing).await;
    put(&agent, "api-1", "api", 9090, Health::Passing).await;

    let mut s = Sotw::open(&agent).await;
    // CDS, legacy wildcard: every app's cluster (the follower may still be on its way).
    s.send(CDS, &[], "", "").await;
    let mut cds = s.next().await;
    while cluster_names(&cds) != ["api", "web"] {
        s.ack(&cds, &[]).await;
        cds = s.next().await;
    }
    s.ack(&cds, &[]).await;
    // LDS by name: the API listener of `web`.
    s.send(LDS, &["web"], "", "").await;
    let lds = s.next().await;
    assert_eq!(lds.resources.len(), 1);
    let l = Listener::decode(&*lds.resources[0].value).unwrap();
    assert_eq!(l.name, "web");
    assert!(
        l.api_listener.is_some(),
        "proxyless gRPC needs the API listener"
    );
    s.ack(&lds, &["web"]).await;
    // EDS by name.
    s.send(EDS, &["web"], "", "").await;
    let eds = s.next().await;
    let e = endpoints_of(&eds);
    assert_eq!(e.len(), 1);
    assert!(e["web"][0].contains("8080"), "{e:?}");
    s.ack(&eds, &["web"]).await;
    s.quiet().await;

    // A change to `api` (not subscribed by EDS) sends nothing; `web` critical: its endpoints.
    put(&agent, "api-1", "api", 9090, Health::Critical).await;
    s.quiet().await;
    put(&agent, "web-1", "web", 8080, Health::Critical).await;
    let eds2 = s.next().await;
    assert_eq!(eds2.type_url, EDS);
    assert_eq!(endpoints_of(&eds2)["web"], Vec::<String>::new());
    assert_ne!(eds2.version_info, eds.version_info);

    // NACK it: nothing is sent again until something changes.
    s.tx.send(DiscoveryRequest {
        type_url: EDS.into(),
        resource_names: vec!["web".into()],
        version_info: eds.version_info.clone(),
        response_nonce: eds2.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "refused for the test".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    s.quiet().await;
    put(&agent, "web-2", "web", 8081, Health::Passing).await;
    let eds3 = s.next().await;
    assert_eq!(endpoints_of(&eds3)["web"].len(), 1);

    // A request answering an older nonce is stale: even a new name in it is ignored.
    s.send(EDS, &["web", "api"], &eds.version_info, &eds2.nonce)
        .await;
    s.quiet().await;
    // Answering the newest nonce, the new name is sent (only it).
    s.send(EDS, &["web", "api"], &eds3.version_info, &eds3.nonce)
        .await;
    let eds4 = s.next().await;
    assert_eq!(
        endpoints_of(&eds4).keys().collect::<Vec<_>>(),
        ["api"],
        "only what was added"
    );
    s.ack(&eds4, &["web", "api"]).await;

    // A new app: the whole CDS set again (state of the world), and not EDS (not subscribed).
    put(&agent, "db-1", "db", 5432, Health::Passing).await;
    let cds2 = s.next().await;
    assert_eq!(cds2.type_url, CDS);
    assert_eq!(cluster_names(&cds2), ["api", "db", "web"]);
    s.ack(&cds2, &[]).await;
    // Removed: CDS without it.
    agent
        .client()
        .await
        .delete_machine(DeleteMachineRequest { id: "db-1".into() })
        .await
        .unwrap();
    let cds3 = s.next().await;
    assert_eq!(cluster_names(&cds3), ["api", "web"]);

    // The operator sees the NACK and the stale request.
    let (_, metrics) =
        patina_testkit::http_get(&format!("{}/metrics", agent.metrics_url())).unwrap();
    assert_eq!(
        common::sample(&metrics, "patina_xds_acks_total{outcome=\"nack\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        common::sample(&metrics, "patina_xds_stale_nonces_total"),
        Some(1.0)
    );
    assert_eq!(common::sample(&metrics, "patina_xds_streams"), Some(1.0));
}

impl Delta {
    async fn open(agent: &common::Agent) -> Delta {
        let mut client = AggregatedDiscoveryServiceClient::new(agent.channel().await);
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("DeltaAggregatedResources")
            .into_inner();
        Ads { tx, rx }
    }

    async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

#[tokio::test]
async fn delta_subscribes_unsubscribes_removes_and_resumes_from_held_versions() {
    let dir = tempfile::tempdir().unwrap();
    let agent = start(dir.path(), "127.0.0.82");
    put(&agent, "web-1", "web", 8080, Health::Passing).await;
    put(&agent, "api-1", "api", 9090, Health::Passing).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Wildcard CDS: both clusters, with versions.
    let mut d = Delta::open(&agent).await;
    d.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        ..Default::default()
    })
    .await;
    let r = d.next().await;
    assert_eq!(names(&r), ["api", "web"]);
    let versions: HashMap<String, String> = r
        .resources
        .iter()
        .map(|x| (x.name.clone(), x.version.clone()))
        .collect();
    d.ack(&r).await;
    // Named EDS: one that exists, one that does not (said removed).
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_subscribe: vec!["web".into(), "nope".into()],
        ..Default::default()
    })
    .await;
    let r = d.next().await;
    assert_eq!(names(&r), ["web"]);
    assert_eq!(r.removed_resources, ["nope"]);
    d.ack(&r).await;

    // One app's instances change: one message about that app's endpoints, nothing else.
    put(&agent, "web-2", "web", 8081, Health::Passing).await;
    let r = d.next().await;
    assert_eq!(r.type_url, EDS);
    assert_eq!(names(&r), ["web"]);
    let cla =
        ClusterLoadAssignment::decode(&*r.resources[0].resource.as_ref().unwrap().value).unwrap();
    assert_eq!(cla.endpoints[0].lb_endpoints.len(), 2);
    d.ack(&r).await;
    d.quiet().await;

    // Unsubscribed from web's endpoints: its next change sends nothing.
    d.send(DeltaDiscoveryRequest {
        type_url: EDS.into(),
        resource_names_unsubscribe: vec!["web".into()],
        ..Default::default()
    })
    .await;
    put(&agent, "web-3", "web", 8082, Health::Passing).await;
    d.quiet().await;

    // The app goes: CDS says it is removed.
    for id in ["api-1"] {
        agent
            .client()
            .await
            .delete_machine(DeleteMachineRequest { id: id.into() })
            .await
            .unwrap();
    }
    let r = d.next().await;
    assert_eq!(r.type_url, CDS);
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, ["api"]);
    d.ack(&r).await;

    // A new stream that holds the old versions: only what differs (api is gone; web is
    // the same cluster, so it is not sent).
    let mut d2 = Delta::open(&agent).await;
    d2.send(DeltaDiscoveryRequest {
        type_url: CDS.into(),
        initial_resource_versions: versions,
        ..Default::default()
    })
    .await;
    let r = d2.next().await;
    assert!(r.resources.is_empty(), "web is unchanged: {:?}", names(&r));
    assert_eq!(r.removed_resources, ["api"]);
}

#[tokio::test]
async fn streams_are_bounded_and_bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.83",
        "[xds]\nmax_streams = 2\nmax_names_per_stream = 3\n",
    );
    let mut a = Sotw::open(&agent).await;
    let _b = Sotw::open(&agent).await;
    // The third stream: RESOURCE_EXHAUSTED.
    let mut client = AggregatedDiscoveryServiceClient::new(agent.channel().await);
    let (_tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
    let third = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await;
    let status = match third {
        Err(s) => s,
        Ok(mut r) => r.get_mut().message().await.unwrap_err(),
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    // Too many names on one stream: RESOURCE_EXHAUSTED, the stream ends.
    a.send(EDS, &["a", "b", "c", "d"], "", "").await;
    let err = tokio::time::timeout(WAIT, a.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // A name too long: INVALID_ARGUMENT.
    let mut c = Sotw::open(&agent).await;
    let long = "x".repeat(300);
    c.send(EDS, &[&long], "", "").await;
    let err = tokio::time::timeout(WAIT, c.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

/// A client that subscribes and then never reads: its stream blocks on a full HTTP/2 window,
/// and still ends at its maximum age, freeing its slot for another client.
#[tokio::test]
async fn a_stream_whose_client_stops_reading_still_ends_at_its_age() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.84",
        "[limits]\nmax_connection_age_secs = 3\n[xds]\nmax_streams = 1\ndebounce_ms = 10\n",
    );
    // A client's HTTP/2 window as small as the protocol allows for a stream (hyper's default
    // is 2 MiB), so that a few pushes fill it.
    let channel = tonic::transport::Channel::from_shared(agent.url.clone())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let (stalled_tx, rx) = mpsc::channel(16);
    let stalled = AggregatedDiscoveryServiceClient::new(channel)
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .expect("StreamAggregatedResources")
        .into_inner();
    stalled_tx
        .send(DiscoveryRequest {
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Every app is a change, and each push carries every cluster: far more than the
    // client's window, which it never opens again since it never reads.
    let opened = std::time::Instant::now();
    for i in 0..80 {
        let app = format!("{:x<60}{i:02}", "app");
        put(&agent, &format!("m-{i}"), &app, 80, Health::Passing).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its one slot frees once the stalled stream reaches its age (3 s, and no later than
    // 110 % of it from its connection's acceptance).
    let mut freed = None;
    for _ in 0..30 {
        let mut c = AggregatedDiscoveryServiceClient::new(agent.channel().await);
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(1);
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        if let Ok(r) = c.stream_aggregated_resources(ReceiverStream::new(rx)).await {
            let mut rx = r.into_inner();
            if let Ok(Ok(Some(_))) = tokio::time::timeout(WAIT, rx.message()).await {
                freed = Some(opened.elapsed());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let freed = freed.expect("the stalled stream's slot was never freed");
    assert!(freed < Duration::from_secs(12), "freed after {freed:?}");
    drop((stalled, stalled_tx));
}

/// A fresh agent (empty store, seeds, not standalone) serves no ADS stream before it has
/// caught up with its peers: its store alone might lack every app, and a proxy told "no
/// clusters" would drop its routes. The stream's request waits; once its peer is back and a
/// session has brought the peer's machines, the first answer holds them.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_waits_until_a_fresh_agent_has_caught_up_with_its_peers() {
    let root = tempfile::tempdir().unwrap();
    let (fresh_ip, peer_ip) = ("127.0.0.181", "127.0.0.182");
    // The peer holds an app, then goes down.
    let mut peer = common::start_member(root.path(), 2, peer_ip, &[fresh_ip.to_owned()]);
    put(&peer, "web-1", "web", 8080, Health::Passing).await;
    peer.stop().unwrap();
    let fresh = common::start_member(root.path(), 1, fresh_ip, &[peer_ip.to_owned()]);
    let mut s = Sotw::open(&fresh).await;
    s.send(CDS, &[], "", "").await;
    // Its only seed is down: nothing, not an empty set of clusters.
    if let Ok(r) = tokio::time::timeout(Duration::from_millis(2000), s.rx.message()).await {
        panic!("a fresh agent answered before catching up: {r:?}");
    }
    peer.restart(common::bin(), "region").unwrap();
    // 10 s for the answer: ample for a join, a session and the readiness judge's next turn.
    let cds = s.next().await;
    assert_eq!(cds.type_url, CDS);
    assert_eq!(cluster_names(&cds), ["web"], "{cds:?}");
}
