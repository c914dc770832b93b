//! Bad input over gRPC: each validation rule answers with the right status code and a
//! message naming the field, and changes nothing.

mod common;

use common::machine;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{
    DeleteMachineRequest, GetMachineRequest, ListInstancesRequest, Machine, UpsertMachineRequest,
    UpsertMachinesRequest, WatchRequest,
};
use tonic::Code;
use tonic::transport::Channel;

/// Everything a client can observe of the region: every app's machines with versions, and
/// the whole-region watch position.
async fn observe(client: &mut RegionClient<Channel>) -> (Vec<Machine>, String) {
    let mut all = Vec::new();
    for app in ["web", "db"] {
        all.extend(
            client
                .list_instances(ListInstancesRequest {
                    app: app.into(),
                    include_all: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .machines,
        );
    }
    let mut stream = client
        .watch(WatchRequest {
            app: String::new(),
            resume_token: String::new(),
            heartbeat_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let token = loop {
        let msg = stream.message().await.unwrap().unwrap();
        if !msg.resume_token.is_empty() {
            break msg.resume_token;
        }
    };
    (all, token)
}

fn with(f: impl FnOnce(&mut Machine)) -> Machine {
    let mut m = machine("web-1", "web", 8080);
    f(&mut m);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_rejects_with_a_clear_status_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("web-1", "web", 8080)),
        })
        .await
        .unwrap();
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("db-1", "db", 5432)),
        })
        .await
        .unwrap();
    let before = observe(&mut client).await;

    let cases: Vec<(&str, Machine, Code, &str)> = vec![
        (
            "empty id",
            with(|m| m.id.clear()),
            Code::InvalidArgument,
            "id",
        ),
        (
            "bad id",
            with(|m| m.id = "web 1".into()),
            Code::InvalidArgument,
            "id",
        ),
        (
            "long id",
            with(|m| m.id = "a".repeat(65)),
            Code::InvalidArgument,
            "id",
        ),
        (
            "app not a label",
            with(|m| m.app = "Web_App".into()),
            Code::InvalidArgument,
            "app",
        ),
        (
            "empty app",
            with(|m| m.app.clear()),
            Code::InvalidArgument,
            "app",
        ),
        (
            "other region",
            with(|m| m.region = "ams".into()),
            Code::InvalidArgument,
            "region",
        ),
        (
            "bad host",
            with(|m| m.host = "bad host".into()),
            Code::InvalidArgument,
            "host",
        ),
        (
            "no state",
            with(|m| m.state = 0),
            Code::InvalidArgument,
            "state",
        ),
        (
            "unknown state",
            with(|m| m.state = 42),
            Code::InvalidArgument,
            "state",
        ),
        (
            "no health",
            with(|m| m.health = 0),
            Code::InvalidArgument,
            "health",
        ),
        (
            "address without port",
            with(|m| m.addresses = vec!["10.0.0.1".into()]),
            Code::InvalidArgument,
            "addresses[0]",
        ),
        (
            "address not an ip",
            with(|m| m.addresses = vec!["example.com:80".into()]),
            Code::InvalidArgument,
            "addresses[0]",
        ),
        (
            "port zero",
            with(|m| m.addresses = vec!["10.0.0.1:0".into()]),
            Code::InvalidArgument,
            "addresses[0]",
        ),
        (
            "duplicate address",
            with(|m| m.addresses = vec!["10.0.0.1:1".into(), "10.0.0.1:1".into()]),
            Code::InvalidArgument,
            "addresses[1]",
        ),
        (
            "started without address",
            with(|m| m.addresses.clear()),
            Code::InvalidArgument,
            "addresses",
        ),
        (
            "too many addresses",
            with(|m| m.addresses = (1..=17).map(|p| format!("10.0.0.1:{p}")).collect()),
            Code::ResourceExhausted,
            "addresses",
        ),
        (
            "bad metadata key",
            with(|m| {
                m.metadata.insert("bad key".into(), "v".into());
            }),
            Code::InvalidArgument,
            "metadata",
        ),
        (
            "metadata value too big",
            with(|m| {
                m.metadata.insert("k".into(), "v".repeat(1025));
            }),
            Code::ResourceExhausted,
            "metadata",
        ),
        (
            "too many metadata entries",
            with(|m| m.metadata = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()),
            Code::ResourceExhausted,
            "metadata",
        ),
        (
            "record too big",
            with(|m| {
                m.metadata = (0..8)
                    .map(|i| (format!("k{i}"), "v".repeat(1000)))
                    .collect()
            }),
            Code::ResourceExhausted,
            "bytes encoded",
        ),
        (
            "moves to another app",
            with(|m| m.app = "db".into()),
            Code::FailedPrecondition,
            "belongs to app",
        ),
    ];
    for (name, m, code, needle) in cases {
        let err = client
            .upsert_machine(UpsertMachineRequest { machine: Some(m) })
            .await
            .expect_err(name);
        assert_eq!(err.code(), code, "{name}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{name}: message {:?} lacks {needle:?}",
            err.message()
        );
    }
    let err = client
        .upsert_machine(UpsertMachineRequest { machine: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Batches are all or nothing, and name the bad index.
    let mut batch: Vec<Machine> = (0..5)
        .map(|i| machine(&format!("b{i}"), "web", 9000 + i))
        .collect();
    batch[3].addresses = vec!["nope".into()];
    let err = client
        .upsert_machines(UpsertMachinesRequest { machines: batch })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("machines[3].addresses[0]"),
        "{}",
        err.message()
    );
    let twice = vec![machine("b1", "web", 1), machine("b1", "web", 2)];
    let err = client
        .upsert_machines(UpsertMachinesRequest { machines: twice })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let huge: Vec<Machine> = (0..1001)
        .map(|i| machine(&format!("h{i}"), "web", 1))
        .collect();
    let err = client
        .upsert_machines(UpsertMachinesRequest { machines: huge })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let err = client
        .upsert_machines(UpsertMachinesRequest { machines: vec![] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Reads and deletes validate too.
    let err = client
        .get_machine(GetMachineRequest {
            id: "bad id".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .get_machine(GetMachineRequest { id: "b1".into() })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "nothing of the rejected batch was written"
    );
    let err = client
        .delete_machine(DeleteMachineRequest { id: "nope".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .delete_machine(DeleteMachineRequest { id: "-x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .list_instances(ListInstancesRequest {
            app: "-bad".into(),
            include_all: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    let after = observe(&mut client).await;
    assert_eq!(before, after, "a rejected request changed the region");
}

/// Bytes as the message: a codec that sends what it is given and reads back raw bytes.
#[derive(Clone, Default)]
struct RawCodec;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use bytes::Buf;
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// A body that is not a protobuf message at all is the caller's mistake: `INVALID_ARGUMENT`
/// (tonic's own codec says `INTERNAL`), and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_protobuf_body_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    let before = observe(&mut client).await;
    let mut grpc = tonic::client::Grpc::new(agent.channel().await);
    grpc.ready().await.unwrap();
    // Field 1 (machine) as a length-delimited field claiming 100 bytes, with 2 present.
    let body = vec![0x0a, 100, 1, 2];
    let err = grpc
        .unary(
            tonic::Request::new(body),
            "/patina.v1.Region/UpsertMachine".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed"), "{}", err.message());
    assert_eq!(observe(&mut client).await, before, "nothing changed");
}
