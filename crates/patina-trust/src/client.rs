//! The client's end: channels to agents over TLS with this process's current certificate,
//! checking that the server is an agent of the cluster the caller meant to reach (its chain
//! is checked in the handshake; its grant here). Each new connection takes the material in
//! use at that moment, so a rotated certificate is used from the next connection on.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::principal::{Need, Principal, Role, Scope, principal_of};
use crate::reload::Trust;

/// How a client reaches agents: over TLS with this material, expecting servers of `scope`;
/// or in plaintext (`tls = "off"`).
#[derive(Clone, Debug)]
pub enum Dial {
    Plain,
    /// `scope: None`: any agent the CA vouches for (the command-line client, which is
    /// pointed at one).
    Tls {
        trust: Trust,
        scope: Option<Arc<Scope>>,
    },
}

impl Dial {
    pub fn tls(trust: Trust, scope: Scope) -> Dial {
        Dial::Tls {
            trust,
            scope: Some(Arc::new(scope)),
        }
    }

    /// TLS to any agent the CA vouches for.
    pub fn tls_any(trust: Trust) -> Dial {
        Dial::Tls { trust, scope: None }
    }

    /// The same material, expecting servers of another cluster (a bridge reaches its region
    /// and the global cluster).
    pub fn to(&self, scope: Scope) -> Dial {
        match self {
            Dial::Plain => Dial::Plain,
            Dial::Tls { trust, .. } => Dial::tls(trust.clone(), scope),
        }
    }

    /// Connect `endpoint` now.
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        self.connect_from(endpoint, None).await
    }

    /// Connect `endpoint` now, from the local address `local` (an agent's peers are reached
    /// from its advertised address, so a partition cuts its calls as it cuts its datagrams).
    /// Over TLS the endpoint's own `local_address` is not seen: give it here.
    pub async fn connect_from(
        &self,
        endpoint: Endpoint,
        local: Option<std::net::IpAddr>,
    ) -> Result<Channel, tonic::transport::Error> {
        match self {
            Dial::Plain => endpoint.local_address(local).connect().await,
            Dial::Tls { trust, scope } => {
                endpoint
                    .connect_with_connector(Connector {
                        trust: trust.clone(),
                        scope: scope.clone(),
                        local,
                    })
                    .await
            }
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match self {
            Dial::Plain => endpoint.connect_lazy(),
            Dial::Tls { trust, scope } => endpoint.connect_with_connector_lazy(Connector {
                trust: trust.clone(),
                scope: scope.clone(),
                local: None,
            }),
        }
    }
}

/// Makes one TLS connection per call.
#[derive(Clone)]
struct Connector {
    trust: Trust,
    scope: Option<Arc<Scope>>,
    /// The local address to connect from (`None`: the OS picks).
    local: Option<std::net::IpAddr>,
}

/// Why a connection was not made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("bad address {0}")]
    Address(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the server at {addr} is not an agent of {scope} (its certificate names {principal})")]
    WrongServer {
        addr: String,
        scope: String,
        principal: String,
    },
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| DialError::Address(uri.to_string()))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri
                .port_u16()
                .ok_or_else(|| DialError::Address(uri.to_string()))?;
            {
                let tcp = match this.local {
                    None => TcpStream::connect((host.as_str(), port)).await?,
                    Some(local) => {
                        let to = tokio::net::lookup_host((host.as_str(), port))
                            .await?
                            .next()
                            .ok_or_else(|| DialError::Address(uri.to_string()))?;
                        let socket = if to.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        if local.is_ipv4() == to.is_ipv4() {
                            socket.bind(std::net::SocketAddr::new(local, 0))?;
                        }
                        socket.connect(to).await?
                    }
                };
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from(host.clone())
                    .map_err(|_| DialError::Address(uri.to_string()))?;
                let config = this.trust.current().client.clone();
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                let principal = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| principal_of(c).ok());
                let serves = |p: &Principal| match this.scope.as_deref() {
                    Some(scope) => p.allows(scope, Need::Peer),
                    None => p
                        .grants
                        .iter()
                        .any(|g| matches!(g.role, Role::Agent | Role::Bridge(_))),
                };
                match principal {
                    Some(p) if serves(&p) => Ok(TokioIo::new(tls)),
                    other => Err(DialError::WrongServer {
                        addr: format!("{host}:{port}"),
                        scope: this
                            .scope
                            .as_deref()
                            .map_or_else(|| "any cluster".into(), Scope::to_string),
                        principal: other.map_or_else(|| "nothing".into(), |p: Principal| p.name),
                    }),
                }
            }
        })
    }
}
