//! The checks of a suspect: a TCP connection to its gRPC port (corroboration: refused or
//! silent means gone), and the last check, which asks the suspect itself over gRPC (through
//! its gossip loop) which incarnation it runs. Both leave from the advertised address, so a
//! partition cuts them as it cuts the datagrams.

use std::net::SocketAddr;
use std::time::Duration;

use super::CORROBORATE_TIMEOUT;
use crate::identity::Identity;

/// A TCP connection to `addr` from `local` (when it is of the same family), given at most
/// `within`: `None` when it timed out. Shared by the corroboration and attendance's check.
pub(super) async fn connect(
    local: Option<std::net::IpAddr>,
    addr: SocketAddr,
    within: Duration,
) -> Option<std::io::Result<tokio::net::TcpStream>> {
    let connect = async {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        if let Some(ip) = local.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        socket.connect(addr).await
    };
    tokio::time::timeout(within, connect).await.ok()
}

/// Does anything accept connections on `addr`? A refused connection or a timeout says the
/// process (or its host) is gone; a stopped or starved process still has its socket accepted
/// by the kernel, so it is given the long suspicion.
pub(super) async fn port_answers(local: Option<std::net::IpAddr>, addr: SocketAddr) -> bool {
    matches!(connect(local, addr, CORROBORATE_TIMEOUT).await, Some(Ok(_)))
}

/// Ask a suspect itself for its incarnation: its Admin service answers through its gossip
/// loop, so an answer says that loop runs. `None`: no answer within the node's wait (less a
/// margin), or another identity answered (a restart under a new epoch).
pub(super) async fn ask_incarnation(
    advertised: SocketAddr,
    dial: patina_trust::Dial,
    member: Identity,
) -> Option<u16> {
    use patina_proto::v1::WhoamiRequest;
    use patina_proto::v1::admin_client::AdminClient;
    let ask = async {
        let endpoint = peer_endpoint(advertised, member, crate::node::CONFIRM_ASK)
            .ok()?
            .timeout(crate::node::CONFIRM_ASK);
        let channel = dial
            .connect_from(endpoint, local_ip(advertised))
            .await
            .ok()?;
        let this = AdminClient::new(channel)
            .whoami(WhoamiRequest {})
            .await
            .ok()?
            .into_inner();
        (this.id == member.node.to_string() && this.epoch == member.epoch)
            .then(|| u16::try_from(this.incarnation).ok())
            .flatten()
    };
    tokio::time::timeout(crate::node::CONFIRM_ASK, ask)
        .await
        .ok()
        .flatten()
}

/// A peer's gRPC server, reached from our advertised address: on a multi-homed host the call
/// leaves by the interface the cluster knows us by (and a partition cuts it as it cuts our
/// datagrams). Anti-entropy sessions and the last check of a suspect both use it.
pub(super) fn peer_endpoint(
    advertised: SocketAddr,
    peer: Identity,
    connect_timeout: Duration,
) -> Result<tonic::transport::Endpoint, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{}", peer.api_addr()))?
            .connect_timeout(connect_timeout)
            .local_address(local_ip(advertised)),
    )
}

/// The IP to send from: the advertised one, unless it is a wildcard.
pub(super) fn local_ip(advertised: SocketAddr) -> Option<std::net::IpAddr> {
    Some(advertised.ip()).filter(|ip| !ip.is_unspecified())
}
