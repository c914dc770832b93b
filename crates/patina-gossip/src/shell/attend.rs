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

/// How one hold of an attendance stream ended.
#[derive(Debug, PartialEq, Eq)]
enum Held {
    /// The stream ended, failed, or never began.
    Ended,
    /// Another identity (a restart) answers at that address, or the member's server has no
    /// attendance (an older version): nothing to attend.
    Nothing,
}

/// Attend `member` until its process is found gone (reported to the node) or the task is
/// aborted (the node no longer attends it).
pub(super) async fn attend(g: Gossip, member: Identity) {
    let local = local_ip(g.advertised);
    let mut retry = ATTEND_RETRY_MIN;
    loop {
        let began = tokio::time::Instant::now();
        let held = hold(&g, member).await;
        if held == Held::Nothing {
            return;
        }
        if gone(local, member.api_addr()).await {
            let _ = g.inputs.send(Input::Unreachable(member)).await;
            return;
        }
        // The port answers: the server ended the stream (its connection age, its stop) or
        // refused it (slots full), or the host is out of reach (SWIM decides that).
        if began.elapsed() >= ATTEND_RETRY_MAX {
            retry = ATTEND_RETRY_MIN;
            continue;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(ATTEND_RETRY_MAX);
    }
}

/// Hold one attendance stream to `member` until it ends.
async fn hold(g: &Gossip, member: Identity) -> Held {
    let Ok(endpoint) = peer_endpoint(g.advertised, member, ATTEND_CONNECT) else {
        return Held::Nothing;
    };
    let began = async {
        let Ok(channel) = g.dial.connect_from(endpoint, local_ip(g.advertised)).await else {
            return Err(Held::Ended);
        };
        let call = SyncClient::new(channel)
            .attend(AttendRequest {
                cluster: g.cluster.to_string(),
            })
            .await;
        let mut stream = match call {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unimplemented => return Err(Held::Nothing),
            Err(_) => return Err(Held::Ended),
        };
        match stream.message().await {
            Ok(Some(notice)) => Ok((notice, stream)),
            _ => Err(Held::Ended),
        }
    };
    let (notice, mut stream) = match tokio::time::timeout(ATTEND_CONNECT, began).await {
        Ok(Ok(began)) => began,
        Ok(Err(held)) => return held,
        Err(_) => return Held::Ended,
    };
    if notice.node != member.node.0 || notice.epoch != member.epoch {
        return Held::Nothing;
    }
    // Idle until it ends; the server sends nothing more (anything it does send is ignored).
    while let Ok(Some(_)) = stream.message().await {}
    Held::Ended
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
    let connect = async {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(std::net::SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    };
    matches!(
        tokio::time::timeout(ATTEND_CONNECT, connect).await,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused
    )
}

/// The server side: say who we are, then hold the stream open until the agent stops or the
/// client goes away.
pub(super) fn serve(
    g: &Gossip,
    attended: &std::sync::Arc<tokio::sync::Semaphore>,
    per_peer: &patina_trust::per_address::PerAddress,
    request: Request<AttendRequest>,
) -> Result<Response<ReceiverStream<Result<AttendNotice, Status>>>, Status> {
    if request.get_ref().cluster != *g.cluster {
        return Err(Status::failed_precondition("another cluster"));
    }
    let permit = attended
        .clone()
        .try_acquire_owned()
        .map_err(|_| Status::resource_exhausted("too many attendance streams"))?;
    let slot = match patina_trust::server::remote_addr(&request).filter(|a| !a.ip().is_loopback()) {
        Some(addr) => Some(per_peer.take(addr.ip()).ok_or_else(|| {
            Status::resource_exhausted("too many attendance streams from this peer")
        })?),
        None => None,
    };
    let me = g.identity();
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(AttendNotice {
        node: me.node.0,
        epoch: me.epoch,
    }));
    let stop = g.stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            () = tx.closed() => {}
        }
        drop(slot);
        drop(permit);
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}
