//! Attendance over gRPC (see the node's `attend` module): the client side holds an idle
//! `Sync.Attend` stream to each member the node attends and reports one whose stream ended
//! while its port refuses connections; the server side answers who it is and holds the
//! stream until it stops.

use std::time::Duration;

use patina_proto::v1::sync_client::SyncClient;
use patina_proto::v1::{AttendNotice, AttendRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{Gossip, Input, local_ip, peer_endpoint};
use crate::identity::Identity;

/// Attendance streams a server holds at once, and from one address (loopback exempt). Each
/// member is attended by `gossip.attend` others (2); more come only while views of the
/// membership differ.
pub const MAX_ATTENDED: usize = 64;
pub const MAX_ATTENDED_PER_PEER: usize = 4;
/// How long the connection and the server's notice may take.
const ATTEND_CONNECT: Duration = Duration::from_secs(1);
/// After a stream that ended early (or never began) while the port still answers, the next
/// try waits this long, doubling up to [`ATTEND_RETRY_MAX`]; a stream held longer than that
/// is tried again at once. Short at first: an agent that just started (its first tries
/// compete with its own start and its TLS handshakes on a busy host) attends within a
/// fraction of a second, not after the longest wait.
const ATTEND_RETRY_MIN: Duration = Duration::from_millis(100);
const ATTEND_RETRY_MAX: Duration = Duration::from_secs(2);
/// After the member's server said it has nothing to attend (another identity at that
/// address, an older version, another cluster), or after this node reported the member,
/// the next try waits this long: by then the membership has usually moved on (and the task
/// was aborted); if not (a member that refuted), attendance resumes.
const ATTEND_IDLE: Duration = Duration::from_secs(30);
/// HTTP/2 keepalive of the attendance connection while idle: a connection the server
/// dropped during a long partition (its own keepalive gave up) would otherwise stay
/// half-open here for ever, and a later kill go unseen. One PING frame each way per
/// interval.
const ATTEND_KEEPALIVE: Duration = Duration::from_secs(30);
const ATTEND_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The server ends a held stream after at most this long (jittered down to 90 %), or after
/// the API's connection age if shorter: authorization runs at a call's start, and a
/// certificate revoked or expired meanwhile must not keep a stream for longer. The client
/// holds a new one at once.
pub const ATTEND_MAX_AGE: Duration = Duration::from_secs(600);

/// How one hold of an attendance stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// No stream was established: no connection, no answer, a refusal (slots full) or a
    /// timeout. Says nothing of the member: SWIM judges it.
    NotEstablished,
    /// A stream that carried the member's notice ended after being held this long.
    Ended(Duration),
    /// Another identity (a restart) answers at that address, or the member's server has no
    /// attendance (an older version) or is of another cluster: nothing to attend.
    Nothing,
}

/// Attend `member` until the task is aborted (the node no longer attends it). Only a stream
/// that was established (the member's own notice arrived) and then ended, followed by a
/// refused connection, is reported: a connection refused from the start (a firewall that
/// rejects, a wrong address) says nothing SWIM's probes over UDP do not judge better.
pub(super) async fn attend(g: Gossip, member: Identity) {
    let local = local_ip(g.advertised);
    let mut retry = ATTEND_RETRY_MIN;
    loop {
        let pause = match hold(&g, member).await {
            Held::Nothing => ATTEND_IDLE,
            Held::NotEstablished => back_off(&mut retry),
            Held::Ended(_) if checked_gone(&g, local, member).await => ATTEND_IDLE,
            Held::Ended(held) if held >= ATTEND_RETRY_MAX => {
                // The server ended a long-held stream (its age, its stop): again at once.
                retry = ATTEND_RETRY_MIN;
                Duration::ZERO
            }
            Held::Ended(_) => back_off(&mut retry),
        };
        tokio::time::sleep(pause).await;
    }
}

/// After a held stream ended: is the member's process gone (reported to the node if so)? The
/// checks and the report run in a task of their own, which the attendance task's abort does
/// not cancel: when SWIM declares the member down first, the node chooses its attended
/// members again and aborts this task, and the report (what this attendant saw, counted) must
/// still arrive. Bounded: at most [`GONE_CHECKS`] connection attempts.
async fn checked_gone(g: &Gossip, local: Option<std::net::IpAddr>, member: Identity) -> bool {
    let inputs = g.inputs.clone();
    let check = tokio::spawn(async move {
        let gone = gone(local, member.api_addr()).await;
        if gone {
            let _ = inputs.send(Input::Unreachable(member)).await;
        }
        gone
    });
    check.await.unwrap_or(false)
}

/// The pause before the next try after a short one; the one after it doubles.
fn back_off(retry: &mut Duration) -> Duration {
    let pause = *retry;
    *retry = (*retry * 2).min(ATTEND_RETRY_MAX);
    pause
}

/// Hold one attendance stream to `member` until it ends.
async fn hold(g: &Gossip, member: Identity) -> Held {
    let Ok(endpoint) = peer_endpoint(g.advertised, member, ATTEND_CONNECT) else {
        return Held::Nothing;
    };
    let endpoint = endpoint
        .http2_keep_alive_interval(ATTEND_KEEPALIVE)
        .keep_alive_timeout(ATTEND_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    let began = async {
        let Ok(channel) = g.dial.connect_from(endpoint, local_ip(g.advertised)).await else {
            return Err(Held::NotEstablished);
        };
        let call = SyncClient::new(channel)
            .attend(AttendRequest {
                cluster: g.cluster.to_string(),
            })
            .await;
        let mut stream = match call {
            Ok(r) => r.into_inner(),
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unimplemented | tonic::Code::FailedPrecondition
                ) =>
            {
                return Err(Held::Nothing);
            }
            Err(_) => return Err(Held::NotEstablished),
        };
        match stream.message().await {
            Ok(Some(notice)) => Ok((notice, stream)),
            _ => Err(Held::NotEstablished),
        }
    };
    let (notice, mut stream) = match tokio::time::timeout(ATTEND_CONNECT, began).await {
        Ok(Ok(began)) => began,
        Ok(Err(held)) => return held,
        Err(_) => return Held::NotEstablished,
    };
    if notice.node != member.node.0 || notice.epoch != member.epoch {
        return Held::Nothing;
    }
    let established = tokio::time::Instant::now();
    // Idle until it ends; the server sends nothing more (anything it does send is ignored).
    while let Ok(Some(_)) = stream.message().await {}
    Held::Ended(established.elapsed())
}

/// Pauses between the checks of a port whose stream just ended. A killed process's
/// connections can close before its listening socket does: the first connection may then
/// still be accepted (by the kernel's backlog) and reset a moment later. Measured with 20
/// agents on two cores under mTLS: the first check answered in some kills, the check 100 ms
/// later was refused.
const GONE_CHECKS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(10),
    Duration::from_millis(20),
    Duration::from_millis(40),
];

/// Is the process behind `addr` gone: is a connection refused now or within the next
/// ~70 ms ([`GONE_CHECKS`])?
async fn gone(local: Option<std::net::IpAddr>, addr: std::net::SocketAddr) -> bool {
    for pause in GONE_CHECKS {
        tokio::time::sleep(pause).await;
        if port_refuses(local, addr).await {
            return true;
        }
    }
    false
}

/// Did a TCP connection to `addr` get refused? Unlike the corroboration's test, a timeout
/// does not count: a partitioned host is SWIM's to judge, not attendance's.
async fn port_refuses(local: Option<std::net::IpAddr>, addr: std::net::SocketAddr) -> bool {
    matches!(
        super::checks::connect(local, addr, ATTEND_CONNECT).await,
        Some(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The server side: say who we are, then hold the stream open until the agent stops or the
/// client goes away.
pub(super) fn serve(
    g: &Gossip,
    attended: &std::sync::Arc<tokio::sync::Semaphore>,
    per_peer: &patina_trust::per_address::PerAddress,
    max_age: Duration,
    request: Request<AttendRequest>,
) -> Result<Response<ReceiverStream<Result<AttendNotice, Status>>>, Status> {
    if request.get_ref().cluster != *g.cluster {
        return Err(Status::failed_precondition("another cluster"));
    }
    let permit = attended
        .clone()
        .try_acquire_owned()
        .map_err(|_| Status::resource_exhausted("too many attendance streams"))?;
    let slot = super::session::peer_slot(
        per_peer,
        &request,
        "too many attendance streams from this peer",
    )?;
    let me = g.identity();
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(AttendNotice {
        node: me.node.0,
        epoch: me.epoch,
    }));
    let stop = g.stop.clone();
    let store = g.store.clone();
    // Jittered, so that streams opened together do not all end together.
    let age = max_age.min(ATTEND_MAX_AGE);
    let age = age.mul_f64(0.9 + 0.1 * jitter());
    tokio::spawn(async move {
        // Also when the store fails: the agent then stops its server before gossip, and a
        // held stream would keep the server's drain waiting out its grace.
        tokio::select! {
            () = stop.cancelled() => {}
            () = tx.closed() => {}
            () = tokio::time::sleep(age) => {}
            _ = store.failed() => {}
        }
        drop(slot);
        drop(permit);
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}

/// A number in [0, 1), for jitter (0 if the OS's random source fails).
fn jitter() -> f64 {
    (getrandom::u64().unwrap_or(0) >> 11) as f64 / (1u64 << 53) as f64
}
