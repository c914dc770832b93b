//! Watch over gRPC against the real binary: a client disconnects, writes happen, and it
//! resumes with its token to receive exactly the missed deltas, even across a restart.

mod common;

use std::time::Duration;

use common::machine;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::watch_response::Kind;
use patina_proto::v1::{
    DeleteMachineRequest, UpsertMachineRequest, WatchRequest, WatchResponse, machine_change,
};
use tonic::Streaming;
use tonic::transport::Channel;

async fn next(stream: &mut Streaming<WatchResponse>) -> WatchResponse {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a watch message within 10 s")
        .expect("stream ok")
        .expect("stream open")
}

/// (id, "up" | "del") for each change of a message.
fn changes(msg: &WatchResponse) -> Vec<(String, &'static str)> {
    msg.changes
        .iter()
        .map(|c| match c.change.as_ref().unwrap() {
            machine_change::Change::Upserted(m) => (m.id.clone(), "up"),
            machine_change::Change::Deleted(d) => (d.id.clone(), "del"),
        })
        .collect()
}

async fn put(client: &mut RegionClient<Channel>, id: &str, app: &str, port: u16) {
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine(id, app, port)),
        })
        .await
        .unwrap();
}

async fn watch(
    client: &mut RegionClient<Channel>,
    app: &str,
    token: &str,
) -> Streaming<WatchResponse> {
    client
        .watch(WatchRequest {
            app: app.into(),
            resume_token: token.into(),
            heartbeat_ms: 0,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Collect delta messages until `n` changes have arrived.
async fn deltas(
    stream: &mut Streaming<WatchResponse>,
    n: usize,
) -> (Vec<(String, &'static str)>, String) {
    let mut got = Vec::new();
    let mut token = String::new();
    while got.len() < n {
        let msg = next(stream).await;
        assert_eq!(msg.kind, Kind::Delta as i32, "{msg:?}");
        assert!(!msg.reset, "a resumed stream must not reset");
        got.extend(changes(&msg));
        token = msg.resume_token;
    }
    (got, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_watch_gets_exactly_the_missed_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    put(&mut client, "web-1", "web", 1).await;
    put(&mut client, "db-1", "db", 2).await;

    let mut stream = watch(&mut client, "web", "").await;
    let first = next(&mut stream).await;
    assert_eq!(first.kind, Kind::Snapshot as i32);
    assert!(first.reset);
    assert_eq!(changes(&first), vec![("web-1".into(), "up")]);
    let done = next(&mut stream).await;
    assert_eq!(done.kind, Kind::SnapshotDone as i32);
    let token = done.resume_token;
    assert!(!token.is_empty());
    drop(stream);

    // Missed while disconnected: two upserts, an update, a delete, and noise in another app.
    put(&mut client, "web-2", "web", 3).await;
    put(&mut client, "db-2", "db", 4).await;
    put(&mut client, "web-3", "web", 5).await;
    client
        .delete_machine(DeleteMachineRequest { id: "web-1".into() })
        .await
        .unwrap();
    put(&mut client, "web-2", "web", 6).await;

    let mut resumed = watch(&mut client, "web", &token).await;
    let (got, token2) = deltas(&mut resumed, 3).await;
    // One change per machine, in order of their latest change.
    assert_eq!(
        got,
        vec![
            ("web-3".into(), "up"),
            ("web-1".into(), "del"),
            ("web-2".into(), "up")
        ]
    );
    // Nothing else is pending: the next message is the next write.
    put(&mut client, "web-4", "web", 7).await;
    let (got, _) = deltas(&mut resumed, 1).await;
    assert_eq!(got, vec![("web-4".into(), "up")]);
    drop(resumed);

    // The token outlives a kill -9 and restart of the agent.
    drop(client);
    agent.kill9();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    put(&mut client, "web-5", "web", 8).await;
    let mut after_restart = watch(&mut client, "web", &token2).await;
    let (got, _) = deltas(&mut after_restart, 2).await;
    assert_eq!(got, vec![("web-4".into(), "up"), ("web-5".into(), "up")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_foreign_tokens_are_refused_or_reset() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start(dir.path(), "127.0.0.1");
    let mut client = agent.client().await;
    put(&mut client, "web-1", "web", 1).await;
    let err = client
        .watch(WatchRequest {
            app: "web".into(),
            resume_token: "not-a-token".into(),
            heartbeat_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .watch(WatchRequest {
            app: "Not_An_App".into(),
            resume_token: String::new(),
            heartbeat_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // A well-formed token of another store: an explicit reset and a full snapshot.
    let mut stream = watch(&mut client, "web", "00000000000000ff.1").await;
    let msg = next(&mut stream).await;
    assert!(msg.reset);
    assert_eq!(changes(&msg), vec![("web-1".into(), "up")]);
}
