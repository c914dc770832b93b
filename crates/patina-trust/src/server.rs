//! The server's end: TLS handshakes over accepted connections, the principal each client's
//! certificate names, and the check that a call's role is one the principal holds.
//!
//! Handshakes run as tasks, so a slow client never holds up the others, each bounded by a
//! deadline; at most as many run at once as the inner stream lets connections through (the
//! agent's connection slots). A connection whose certificate the CA bundle does not sign, or
//! that sends none, is closed in the handshake: nothing of it reaches a service.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;
use tokio_stream::Stream;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::principal::{Need, Principal, Scope, principal_of};
use crate::reload::Trust;

/// What a service learns of a TLS connection: the client's address and principal. Tonic
/// puts it in every request's extensions; [`remote_addr`] and [`principal`] read it.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub principal: Arc<Principal>,
    /// When its handshake completed and the server began serving it (its connection age
    /// counts from then).
    pub accepted: Instant,
}

/// What a listener that admits connections knows of one: its TCP addresses and when it was
/// accepted (so a service can bound what a connection does by its age).
#[derive(Clone, Debug)]
pub struct Accepted {
    pub tcp: TcpConnectInfo,
    pub at: Instant,
}

/// What a connection's info says of it, whichever listener made it.
pub trait AcceptInfo: Clone + Send + Sync + 'static {
    fn remote(&self) -> Option<SocketAddr>;
    /// When it was accepted, if the listener recorded it.
    fn accepted_at(&self) -> Option<Instant>;
}

impl AcceptInfo for TcpConnectInfo {
    fn remote(&self) -> Option<SocketAddr> {
        self.remote_addr()
    }

    fn accepted_at(&self) -> Option<Instant> {
        None
    }
}

impl AcceptInfo for Accepted {
    fn remote(&self) -> Option<SocketAddr> {
        self.tcp.remote_addr()
    }

    fn accepted_at(&self) -> Option<Instant> {
        Some(self.at)
    }
}

/// The client's address, over TLS or not.
pub fn remote_addr<T>(request: &tonic::Request<T>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<PeerInfo>()
        .and_then(|p| p.remote)
        .or_else(|| ext.get::<Accepted>().and_then(|a| a.tcp.remote_addr()))
        .or_else(|| request.remote_addr())
}

/// When the request's connection was accepted (`None`: a listener that does not say).
pub fn accepted_at<T>(request: &tonic::Request<T>) -> Option<Instant> {
    let ext = request.extensions();
    ext.get::<PeerInfo>()
        .map(|p| p.accepted)
        .or_else(|| ext.get::<Accepted>().map(|a| a.at))
}

/// The caller's principal (`None` on a listener without TLS).
pub fn principal<T>(request: &tonic::Request<T>) -> Option<Arc<Principal>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .map(|p| p.principal.clone())
}

/// A connection after its handshake.
pub struct TlsConn<IO> {
    inner: TlsStream<IO>,
    info: PeerInfo,
}

impl<IO> Connected for TlsConn<IO> {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsConn<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsConn<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Accepted connections in, authenticated ones out.
pub struct TlsIncoming<S, IO> {
    inner: Option<S>,
    trust: Trust,
    timeout: Duration,
    handshakes: JoinSet<Option<TlsConn<IO>>>,
}

impl<S, IO> TlsIncoming<S, IO> {
    /// Handshakes over the connections `inner` yields, each within `timeout`.
    pub fn new(inner: S, trust: Trust, timeout: Duration) -> Self {
        TlsIncoming {
            inner: Some(inner),
            trust,
            timeout,
            handshakes: JoinSet::new(),
        }
    }
}

async fn handshake<IO>(io: IO, trust: Trust, timeout: Duration) -> Option<TlsConn<IO>>
where
    IO: AsyncRead + AsyncWrite + Connected + Unpin,
    IO::ConnectInfo: AcceptInfo,
{
    let remote = io.connect_info().remote();
    let acceptor = tokio_rustls::TlsAcceptor::from(trust.current().server.clone());
    let stream = match tokio::time::timeout(timeout, acceptor.accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(peer = ?remote, error = %e, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            tracing::debug!(peer = ?remote, "TLS handshake timed out");
            return None;
        }
    };
    // Served from now: the server's connection age (its GOAWAY timer) starts here.
    let accepted = Instant::now();
    // The verifier required a certificate signed by the bundle: it is there.
    let cert = stream.get_ref().1.peer_certificates()?.first()?;
    match principal_of(cert) {
        Ok(p) => Some(TlsConn {
            info: PeerInfo {
                remote,
                principal: Arc::new(p),
                accepted,
            },
            inner: stream,
        }),
        Err(e) => {
            tracing::debug!(peer = ?remote, error = %e, "a client certificate without a principal");
            None
        }
    }
}

impl<S, IO, E> Stream for TlsIncoming<S, IO>
where
    S: Stream<Item = Result<IO, E>> + Unpin,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: AcceptInfo,
{
    type Item = Result<TlsConn<IO>, E>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        // Take every connection waiting, starting a handshake for each.
        while let Some(inner) = this.inner.as_mut() {
            match Pin::new(inner).poll_next(cx) {
                Poll::Ready(Some(Ok(io))) => {
                    this.handshakes
                        .spawn(handshake(io, this.trust.clone(), this.timeout));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.inner = None,
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(conn)))) => return Poll::Ready(Some(Ok(conn))),
                // Refused, timed out, or (never) panicked: the next one.
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) if this.inner.is_none() => return Poll::Ready(None),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Which role a method needs. Methods this code does not know need a peer: a new service
/// is closed until its line is added here.
pub fn need_of(path: &str) -> Option<Need> {
    let Some((service, _method)) = path.trim_start_matches('/').split_once('/') else {
        return Some(Need::Peer);
    };
    let need = match path {
        "/patina.v1.Sync/Exchange" | "/patina.v1.Sync/Attend" => Need::Peer,
        "/patina.v1.Admin/Forget" | "/patina.v1.Admin/Keyring" => Need::Agent,
        "/patina.v1.Region/UpsertMachine"
        | "/patina.v1.Region/UpsertMachines"
        | "/patina.v1.Region/DeleteMachine" => Need::Writer,
        "/patina.v1.Region/GetMachine"
        | "/patina.v1.Region/ListInstances"
        | "/patina.v1.Region/Watch"
        | "/patina.v1.Global/LookupApp"
        | "/patina.v1.Global/LookupApps"
        | "/patina.v1.Global/WatchApps"
        | "/patina.v1.Admin/Members"
        | "/patina.v1.Admin/Whoami"
        | "/patina.v1.Admin/ClusterStatus"
        | "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        | "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources" => {
            Need::Reader
        }
        // Health and reflection: any client the CA vouches for.
        _ if service == "grpc.health.v1.Health"
            || service == "grpc.reflection.v1.ServerReflection"
            || service == "grpc.reflection.v1alpha.ServerReflection" =>
        {
            return None;
        }
        _ => Need::Peer,
    };
    Some(need)
}

/// A layer that refuses calls outside the caller's role with `PERMISSION_DENIED`, naming the
/// role the call needed. Calls on a connection without TLS pass (the listener has none).
#[derive(Clone)]
pub struct AuthorizeLayer {
    scope: Arc<Scope>,
    peers: Option<Arc<crate::reload::PeerExpiry>>,
}

impl AuthorizeLayer {
    pub fn new(scope: Scope) -> Self {
        AuthorizeLayer {
            scope: Arc::new(scope),
            peers: None,
        }
    }

    /// Also remember when each peer's certificate (an agent or a bridge of this cluster
    /// making a call) expires, for [`crate::Trust::expiry`].
    pub fn reporting_peers(mut self, peers: Arc<crate::reload::PeerExpiry>) -> Self {
        self.peers = Some(peers);
        self
    }
}

impl<S> tower_layer::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            scope: self.scope.clone(),
            peers: self.peers.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Authorize<S> {
    inner: S,
    scope: Arc<Scope>,
    peers: Option<Arc<crate::reload::PeerExpiry>>,
}

/// Why `principal` may not make a call to `path` in `scope`, if it may not.
pub fn refusal(principal: &Principal, scope: &Scope, path: &str) -> Option<tonic::Status> {
    // A connection outlives its certificate: each call checks it is still valid.
    if principal.not_after < crate::reload::now_secs() {
        return Some(tonic::Status::unauthenticated(format!(
            "the certificate of {principal} has expired: reconnect with a current one"
        )));
    }
    let need = need_of(path)?;
    if principal.allows(scope, need) {
        return None;
    }
    Some(tonic::Status::permission_denied(format!(
        "{path} needs the {} role in {scope}; the certificate of {principal} does not grant it",
        need.as_str()
    )))
}

impl<S, B> tower_service::Service<http::Request<B>> for Authorize<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(info) = req.extensions().get::<PeerInfo>() {
            if let Some(status) = refusal(&info.principal, &self.scope, req.uri().path()) {
                tracing::debug!(peer = ?info.remote, %status, "call refused");
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            if let Some(peers) = &self.peers
                && info.principal.allows(&self.scope, Need::Peer)
            {
                peers.record(&info.principal, info.remote.map(|a| a.ip()));
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{Grant, Role, Tier};

    #[test]
    fn each_method_needs_its_role_and_unknown_ones_a_peer() {
        let ord = Scope::new(Tier::Region, "ord");
        let p = |role| Principal {
            grants: vec![Grant::new(Tier::Region, "ord", role)],
            not_after: i64::MAX,
            name: "t".into(),
        };
        let reader = p(Role::Reader);
        let writer = p(Role::Writer(None));
        let agent = p(Role::Agent);
        let none = Principal {
            grants: vec![],
            not_after: i64::MAX,
            name: "t".into(),
        };
        let expired = Principal {
            not_after: 1,
            ..agent.clone()
        };
        let status = refusal(&expired, &ord, "/grpc.health.v1.Health/Check").unwrap();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        let ok = |p: &Principal, path| refusal(p, &ord, path).is_none();
        assert!(ok(&reader, "/patina.v1.Region/Watch"));
        assert!(ok(
            &reader,
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
        ));
        assert!(!ok(&reader, "/patina.v1.Region/UpsertMachine"));
        assert!(ok(&writer, "/patina.v1.Region/UpsertMachine"));
        assert!(!ok(&writer, "/patina.v1.Sync/Exchange"));
        assert!(!ok(&writer, "/patina.v1.Admin/Forget"));
        assert!(!ok(&reader, "/patina.v1.Admin/Keyring"));
        assert!(ok(&agent, "/patina.v1.Admin/Keyring"));
        // A bridge is a peer of the global cluster (it syncs), never one that changes it.
        let global = Scope::new(Tier::Global, "global");
        let bridge = Principal {
            grants: vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge("ord".into()),
            )],
            not_after: i64::MAX,
            name: "b".into(),
        };
        assert!(refusal(&bridge, &global, "/patina.v1.Sync/Exchange").is_none());
        for path in ["/patina.v1.Admin/Forget", "/patina.v1.Admin/Keyring"] {
            let status = refusal(&bridge, &global, path).unwrap();
            assert!(status.message().contains("agent role"), "{status:?}");
        }
        assert!(ok(&agent, "/patina.v1.Sync/Exchange"));
        assert!(!ok(&agent, "/patina.v1.Unknown/Call") || agent.allows(&ord, Need::Peer));
        assert!(!ok(&reader, "/patina.v1.Unknown/Call"));
        assert!(ok(&none, "/grpc.health.v1.Health/Check"));
        assert!(!ok(&none, "/patina.v1.Region/GetMachine"));
        let status = refusal(&reader, &ord, "/patina.v1.Region/DeleteMachine").unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("writer role in region/ord"),
            "{}",
            status.message()
        );
    }
}
