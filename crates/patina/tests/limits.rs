//! Connection and stream limits against the real binary on loopback: idle sockets neither
//! block clients nor stay open; a client over `max_connections` or `max_watches` is told
//! `RESOURCE_EXHAUSTED` at once (never left hanging), and is served again once a slot frees.

mod common;

use std::io;
use std::time::{Duration, Instant};

use common::{Agent, machine};
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{ListInstancesRequest, UpsertMachineRequest, WatchRequest};
use patina_region::listener::{MAX_OVERFLOW_CONNECTIONS, OVERFLOW_LINGER};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tonic::Code;
use tonic::transport::Channel;

/// How long any step that should be quick may take before the test fails: far above what
/// loopback needs, so that only a real hang fails.
const QUICK: Duration = Duration::from_secs(10);
/// Connections opened at once while building up idle ones: well under the agent's listen
/// backlog, so that no SYN is dropped and retried a second later.
const CONNECT_WAVE: usize = 128;

/// Raise this test process's soft open-file limit to hold `n` more sockets.
fn raise_open_file_limit(n: usize) {
    let want = n as u64 + 256;
    let got = rlimit::increase_nofile_limit(want).expect("raise RLIMIT_NOFILE");
    assert!(
        got >= want,
        "this test needs {want} open files; the hard limit allows {got}"
    );
}

/// Open `n` raw TCP connections that send nothing.
async fn open_idle(addr: &str, n: usize) -> Vec<TcpStream> {
    let mut idle = Vec::with_capacity(n);
    while idle.len() < n {
        let mut wave = JoinSet::new();
        for _ in 0..CONNECT_WAVE.min(n - idle.len()) {
            let addr = addr.to_owned();
            wave.spawn(async move { TcpStream::connect(addr).await });
        }
        while let Some(conn) = wave.join_next().await {
            idle.push(conn.unwrap().expect("connect"));
        }
    }
    idle
}

/// How a socket the test never writes to ended, as seen by reading it.
#[derive(Debug, PartialEq)]
enum Ended {
    /// Still open when last looked at.
    Open,
    /// Closed by the agent (end of stream or reset) after `bytes` bytes from it.
    Closed { bytes: usize },
}

/// Read `conn` until the agent closes it or `deadline` passes.
async fn read_until_closed(conn: &TcpStream, deadline: tokio::time::Instant) -> Ended {
    let mut bytes = 0;
    let mut buf = [0u8; 1024];
    loop {
        if tokio::time::timeout_at(deadline, conn.readable())
            .await
            .is_err()
        {
            return Ended::Open;
        }
        match conn.try_read(&mut buf) {
            Ok(0) => return Ended::Closed { bytes },
            Ok(n) => bytes += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Ended::Closed { bytes },
        }
    }
}

/// Whether the agent has closed `conn` yet, without waiting (draining what it sent).
fn still_open(conn: &TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match conn.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

async fn list(client: &mut RegionClient<Channel>) -> Result<usize, tonic::Status> {
    client
        .list_instances(ListInstancesRequest {
            app: "web".into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().machines.len())
}

/// A new connection and one call on it.
async fn connect_and_list(agent: &Agent) -> Result<usize, tonic::Status> {
    let mut client = agent.client().await;
    list(&mut client).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_do_not_block_a_client_and_are_closed_after_the_handshake_timeout()
 {
    const IDLE: usize = 10_000;
    const HANDSHAKE: Duration = Duration::from_secs(3);
    raise_open_file_limit(IDLE);
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        &format!(
            "[limits]\nhandshake_timeout_ms = {}\n",
            HANDSHAKE.as_millis()
        ),
    );

    let t0 = Instant::now();
    let idle = open_idle(agent.host_port(), IDLE).await;
    let connected = t0.elapsed();

    // A real client, while every idle socket is open, is served at once.
    let t1 = Instant::now();
    let mut client = tokio::time::timeout(QUICK, agent.client())
        .await
        .expect("a client connects despite the idle sockets");
    tokio::time::timeout(
        QUICK,
        client.upsert_machine(UpsertMachineRequest {
            machine: Some(machine("web-1", "web", 8080)),
        }),
    )
    .await
    .expect("upsert in time")
    .expect("upsert ok");
    let listed = tokio::time::timeout(QUICK, list(&mut client))
        .await
        .expect("list in time")
        .expect("list ok");
    assert_eq!(listed, 1);
    let served = t1.elapsed();
    let open = idle.iter().filter(|c| still_open(c)).count();
    eprintln!(
        "{IDLE} idle connections opened in {connected:?}; client served in {served:?} with {open} still open"
    );
    assert!(
        t0.elapsed() < HANDSHAKE,
        "setup took {:?}, longer than the handshake timeout: the machine is too slow for this test",
        t0.elapsed()
    );
    assert_eq!(open, IDLE, "an idle socket was closed before its timeout");

    // Then the agent closes every idle one, and only those: the client's works on.
    let deadline = tokio::time::Instant::now() + HANDSHAKE + QUICK;
    for (i, conn) in idle.iter().enumerate() {
        let ended = read_until_closed(conn, deadline).await;
        assert!(
            matches!(ended, Ended::Closed { .. }),
            "idle connection {i} still open {:?} after the handshake timeout",
            deadline.elapsed()
        );
    }
    let closed_after = t0.elapsed();
    assert!(
        closed_after >= HANDSHAKE,
        "closed after {closed_after:?}: before the timeout"
    );
    eprintln!("all idle connections closed {closed_after:?} after the first was opened");
    assert_eq!(list(&mut client).await.expect("client still served"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_max_connections_gets_resource_exhausted_until_one_disconnects() {
    const MAX: usize = 8;
    const FLOOD: usize = 100;
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        &format!("[limits]\nmax_connections = {MAX}\n"),
    );
    let mut held = Vec::new();
    for i in 0..MAX {
        let mut client = agent.client().await;
        assert_eq!(list(&mut client).await.map_err(|s| (i, s)).unwrap(), 0);
        held.push(client);
    }

    // The ninth is told, at once.
    let refused = tokio::time::timeout(QUICK, connect_and_list(&agent))
        .await
        .expect("the ninth client is answered, not left hanging")
        .expect_err("the ninth client is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("too many connections"),
        "{}",
        refused.message()
    );

    // A flood over the limit: each is closed soon, and only a bounded number are answered
    // (the rest are closed at once without a byte).
    let flood_at = Instant::now();
    let flood = open_idle(agent.host_port(), FLOOD).await;
    let deadline = tokio::time::Instant::now() + QUICK;
    let mut answered = 0;
    for (i, conn) in flood.iter().enumerate() {
        match read_until_closed(conn, deadline).await {
            Ended::Open => panic!("refused connection {i} was never closed"),
            Ended::Closed { bytes } => answered += usize::from(bytes > 0),
        }
    }
    let all_closed = flood_at.elapsed();
    eprintln!("{answered} of {FLOOD} refused connections answered; all closed in {all_closed:?}");
    assert!(
        (1..=MAX_OVERFLOW_CONNECTIONS).contains(&answered),
        "{answered} of {FLOOD} refused connections were answered"
    );
    assert!(
        all_closed < OVERFLOW_LINGER * 5,
        "refused connections lingered {all_closed:?}"
    );

    // The held clients were served throughout.
    for client in &mut held {
        assert_eq!(list(client).await.unwrap(), 0);
    }

    // One leaves: a new client is served again (once the agent has seen it go).
    drop(held.pop());
    let deadline = Instant::now() + QUICK;
    loop {
        match connect_and_list(&agent).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("no slot after a client left: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_over_max_watches_gets_resource_exhausted_until_one_ends() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(dir.path(), "127.0.0.1", "[limits]\nmax_watches = 2\n");
    let mut client = agent.client().await;
    client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine("web-1", "web", 8080)),
        })
        .await
        .unwrap();
    let watch = |app: &str| WatchRequest {
        app: app.into(),
        resume_token: String::new(),
        heartbeat_ms: 0,
    };

    let mut open = Vec::new();
    for app in ["web", ""] {
        let mut stream = client.watch(watch(app)).await.unwrap().into_inner();
        let first = tokio::time::timeout(QUICK, stream.message())
            .await
            .expect("a snapshot in time")
            .unwrap()
            .unwrap();
        assert!(first.reset, "{first:?}");
        open.push(stream);
    }
    let err = tokio::time::timeout(QUICK, client.watch(watch("web")))
        .await
        .expect("the third watch is answered at once")
        .expect_err("the third watch is refused");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // Other calls are not limited by it.
    assert_eq!(list(&mut client).await.unwrap(), 1);

    // One ends (the client goes away from it): a new watch is accepted.
    drop(open.remove(0));
    let deadline = Instant::now() + QUICK;
    let mut stream = loop {
        match client.watch(watch("web")).await {
            Ok(s) => break s.into_inner(),
            Err(s) if s.code() == Code::ResourceExhausted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(s) => panic!("no watch slot after one ended: {s:?}"),
        }
    };
    let first = tokio::time::timeout(QUICK, stream.message())
        .await
        .expect("a snapshot in time")
        .unwrap()
        .unwrap();
    assert!(first.reset);
    // Still two at most.
    let err = client.watch(watch("")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
}

/// At `limits.max_connection_age_secs` a Watch stream ends with `UNAVAILABLE` naming its age
/// (its client resumes with its token), and the connection is asked to go away: the same
/// client's next call is served on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_at_the_connection_age_and_its_client_is_served_again() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        "[limits]\nmax_connection_age_secs = 1\n",
    );
    let mut client = agent.client().await;
    let ended = watch_ended_by_age(&mut client).await;
    assert!(
        (Duration::from_millis(850)..Duration::from_secs(5)).contains(&ended),
        "ended after {ended:?}"
    );
    // The same client is served again (tonic reconnects after the GOAWAY).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match list(&mut client).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "not served again: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Watch opened late in its connection's life ends by the connection's age (its GOAWAY
/// comes then), not a whole age after it opened: a connection lives about its maximum age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_opened_late_ends_by_its_connections_age() {
    let dir = tempfile::tempdir().unwrap();
    let agent = common::start_with(
        dir.path(),
        "127.0.0.1",
        "[limits]\nmax_connection_age_secs = 2\n",
    );
    let mut client = agent.client().await;
    let connected = Instant::now();
    list(&mut client).await.unwrap();
    // Late in the connection's life: 60 % of its age gone.
    tokio::time::sleep(Duration::from_millis(1200).saturating_sub(connected.elapsed())).await;
    let ended = watch_ended_by_age(&mut client).await;
    // By the connection's age plus its spread (2.2 s after it was accepted), where a stream
    // timed from its own opening would run 1.8 to 2 s.
    assert!(
        ended < Duration::from_millis(1500),
        "ended {ended:?} after it opened"
    );
    assert!(
        connected.elapsed() >= Duration::from_millis(1900),
        "ended before the connection's age: {:?}",
        connected.elapsed()
    );
}

/// Open a Watch (heartbeats every 100 ms) and wait, 10 s at most, for it to end: it must end
/// `UNAVAILABLE` for its maximum age. How long after it opened.
async fn watch_ended_by_age(client: &mut RegionClient<Channel>) -> Duration {
    let mut stream = client
        .watch(WatchRequest {
            app: "web".into(),
            resume_token: String::new(),
            heartbeat_ms: 100,
        })
        .await
        .unwrap()
        .into_inner();
    let opened = Instant::now();
    // Bounded: the stream must end within 10 s.
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) if opened.elapsed() < Duration::from_secs(10) => continue,
            Ok(Err(status)) => break status,
            other => panic!("the watch did not end with its age: {other:?}"),
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("maximum age"), "{status:?}");
    opened.elapsed()
}
