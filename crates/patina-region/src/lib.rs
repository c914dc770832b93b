//! patina-region: the region agent. It validates machine records, serves the
//! `patina.v1.Region` gRPC service from a [`patina_store::Store`], and adds the standard gRPC
//! health and reflection services.
//!
//! Architecture invariant: prost types stop here; the store below sees keys, groups and
//! encoded bytes only.

#![forbid(unsafe_code)]

pub mod checks;
pub mod kind;
pub mod limits;
pub mod listener;
pub mod service;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;

use patina_proto::v1::region_server::RegionServer;
use patina_store::Store;
use tokio::net::TcpListener;
use tonic::transport::server::Router;

/// The layers every agent's API sits behind: the role check of each call.
pub type ApiLayers = tower_layer::Stack<patina_trust::AuthorizeLayer, tower_layer::Identity>;
/// The router an agent's API is added to.
pub type ApiRouter = Router<ApiLayers>;

/// TLS on an agent's listener: its material, and the cluster its callers' roles must be in.
#[derive(Clone, Debug)]
pub struct ServerTls {
    pub trust: patina_trust::Trust,
    pub scope: patina_trust::Scope,
}

pub use kind::MachineKind;
pub use limits::Limits;
pub use service::RegionService;

/// Largest gRPC message accepted or sent: a full UpsertMachines batch or ListInstances page
/// (1000 records of at most 4 KiB) plus framing.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Who this agent is, as its records say.
#[derive(Clone, Debug)]
pub struct AgentIdentity {
    /// The region this agent serves (a DNS label).
    pub region: String,
    /// The worker host it runs on (a DNS name).
    pub host: String,
}

/// Errors from running the agent's server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The server failed while running; it has stopped.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built (a broken embedded descriptor set).
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The store failed for good (a failed fsync, a writer panic): the agent reported
    /// NOT_SERVING, ended every watch and stopped serving. It must exit.
    #[error("the store failed: {0}")]
    StoreFailed(std::sync::Arc<str>),
    /// A part of the agent ended before it was asked to stop (its gossip shell, its bridge,
    /// its table's follower): the agent reported NOT_SERVING, ended every watch and stopped
    /// serving, as for a failed store. It must exit.
    #[error("{0}")]
    PartFailed(std::sync::Arc<str>),
}

/// Why a server stopped on its own.
enum Failure {
    Store(std::sync::Arc<str>),
    Part(std::sync::Arc<str>),
}

/// How an agent's shutdown future ends: asked to stop (a signal), or because a part of the
/// agent failed (reported as [`ServeError::PartFailed`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    Asked,
    Failed(std::sync::Arc<str>),
}

/// How long a failed agent keeps answering (health NOT_SERVING, writes UNAVAILABLE) before it
/// stops, so that health checkers and clients see why rather than a refused connection.
pub const FAILED_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// HTTP/2 pings on idle connections, and how long an answer may take before the connection
/// is dropped: a client whose host died stops holding a slot within a minute.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// How long open connections may take to finish after shutdown begins. A client that stopped
/// reading (its HTTP/2 window is shut) would otherwise hold a graceful shutdown, or the exit
/// after a store failure, for ever.
pub const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The services of a clustered agent, served beside the region API: anti-entropy between
/// agents and the operators' admin service.
pub struct ClusterServices {
    pub sync: patina_proto::v1::sync_server::SyncServer<patina_gossip::shell::SyncService>,
    pub admin: patina_proto::v1::admin_server::AdminServer<patina_gossip::shell::AdminService>,
    /// The gossip handle: whether the agent's view stands stamps every Watch message.
    pub gossip: patina_gossip::shell::Gossip,
    /// The agent's readiness (`/readyz`), which gRPC health follows: NOT_SERVING while it is
    /// false (`None`: health follows the clock alone).
    pub ready: Option<tokio::sync::watch::Receiver<bool>>,
    /// More services on the API listener (the xDS server), given the agent's stopping
    /// signal.
    pub extra: Option<AddService>,
}

/// Adds a service to the API's router; given the signal that the agent is stopping.
pub type AddService =
    Box<dyn FnOnce(ApiRouter, tokio::sync::watch::Receiver<bool>) -> ApiRouter + Send>;

/// Serve the region API, health and reflection (and the cluster's services, when given) on
/// `listener`, within `limits`, until `shutdown` resolves or the store fails.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    id: &AgentIdentity,
    limits: Limits,
    cluster: Option<ClusterServices>,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = Stopped> + Send,
) -> Result<(), ServeError> {
    let scope = tls.as_ref().map(|t| t.scope.clone());
    let (region, host) = (id.region.clone(), id.host.clone());
    let served = store.clone();
    let gossip = cluster.as_ref().map(|c| c.gossip.clone());
    tracing::info!(region = %id.region, host = %id.host, "serving the region API");
    serve_with(
        listener,
        store,
        limits,
        <RegionServer<RegionService> as tonic::server::NamedService>::NAME,
        cluster,
        tls,
        move |router, stopping| {
            let service = RegionService::new(served, &region, &host, stopping)
                .with_limits(&limits)
                .with_gossip(gossip)
                .with_scope(scope);
            router.add_service(
                RegionServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        },
        shutdown,
    )
    .await
}

/// Serve a tier's API (added to the router by `add`, which is given the receiver that turns
/// true when the server begins to stop), health (`name` and the whole server) and
/// reflection, and the cluster's services when given, on `listener` within `limits`, until
/// `shutdown` resolves or the store fails. Shared by the region and global agents. With
/// `tls`, every connection is a TLS one whose client certificate the bundle signs, and every
/// call is checked against its caller's role ([`patina_trust::server::need_of`]).
#[allow(clippy::too_many_arguments)]
pub async fn serve_with(
    listener: TcpListener,
    store: Store,
    limits: Limits,
    name: &'static str,
    cluster: Option<ClusterServices>,
    tls: Option<ServerTls>,
    add: impl FnOnce(ApiRouter, tokio::sync::watch::Receiver<bool>) -> ApiRouter,
    shutdown: impl Future<Output = Stopped> + Send,
) -> Result<(), ServeError> {
    let (sync, admin, ready, extra) = match cluster {
        Some(c) => (Some(c.sync), Some(c.admin), c.ready, c.extra),
        None => (None, None, None, None),
    };
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let watched = store.clone();
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_service_status(name, tonic_health::ServingStatus::Serving)
        .await;
    // Health follows readiness: NOT_SERVING while this agent's clock is off its peers', or
    // its store's clock leads its wall clock (its writes are refused; reads go on), or the
    // agent's readiness checks fail (`ready`, as `/readyz`), SERVING again once all hold.
    // Checked on every change of either and every second.
    let readiness = {
        let reporter = health_reporter.clone();
        let mut fence = store.clock_fence_changes();
        let store = store.clone();
        let mut ready = ready;
        tokio::spawn(async move {
            let mut last = None;
            // Once the readiness task ended (the agent stops), its last word stands.
            let mut last_unready = false;
            loop {
                if let Some(r) = ready.as_mut() {
                    last_unready = !*r.borrow_and_update();
                }
                let unready = last_unready;
                let off = fence.borrow_and_update().is_some()
                    || store.clock_ahead_ms().is_some()
                    || unready;
                let status = if off {
                    tonic_health::ServingStatus::NotServing
                } else {
                    tonic_health::ServingStatus::Serving
                };
                if last != Some(status) {
                    reporter.set_service_status(name, status).await;
                    reporter.set_service_status("", status).await;
                    last = Some(status);
                }
                let ready_changed = async {
                    match ready.as_mut() {
                        Some(r) => r.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    changed = fence.changed() => if changed.is_err() { return },
                    // The readiness task ended (the agent stops): keep the last status.
                    live = ready_changed => if !live { ready = None },
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        })
    };
    let stop_readiness = readiness.abort_handle();
    let mut readiness = readiness;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(patina_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(addr = ?local, service = name, "serving");
    // Admission sets TCP_NODELAY on each accepted socket: the server's own setting applies
    // only to listeners it binds.
    let (incoming, overflow) = listener::admit(listener, &limits);
    let failure: std::sync::Arc<std::sync::OnceLock<Failure>> = Default::default();
    let failed = failure.clone();
    // Without TLS the layer has no principal to check and lets every call through.
    let authorize = match tls.as_ref() {
        None => patina_trust::AuthorizeLayer::new(patina_trust::Scope::new(
            patina_trust::Tier::Region,
            "plaintext",
        )),
        Some(t) => patina_trust::AuthorizeLayer::new(t.scope.clone())
            .reporting_peers(t.trust.peers.clone()),
    };
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection.get())
        // A peer that vanished (host down, cable cut) frees its connection and watches.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        // GOAWAY at the age: calls in flight finish, the next ones go on a new connection.
        // (No grace: tonic's grace drops the connection at age + grace with no GOAWAY at
        // all.) Watch streams end by themselves at about the same age (`Watches`).
        .max_connection_age(limits.max_connection_age)
        .layer(authorize)
        .add_service(health)
        .add_service(reflection)
        .add_optional_service(sync)
        .add_optional_service(admin);
    let router = add(served, stopping.clone());
    let router = match extra {
        Some(extra) => extra(router, stopping.clone()),
        None => router,
    };
    let shutdown = async move {
        let mut not_serving = async || {
            // Ended before the status is set: a readiness check running on another
            // thread could otherwise set SERVING after it.
            readiness.abort();
            let _ = (&mut readiness).await;
            health_reporter
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
            health_reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        tokio::select! {
            stopped = shutdown => {
                if let Stopped::Failed(why) = stopped {
                    tracing::error!(reason = %why, "a part of the agent failed: reporting NOT_SERVING and stopping");
                    not_serving().await;
                    let _ = failed.set(Failure::Part(why));
                    stop_tx.send_replace(true);
                    tokio::time::sleep(FAILED_GRACE).await;
                }
            }
            why = watched.failed() => {
                tracing::error!(reason = %why, "the store failed: reporting NOT_SERVING and stopping");
                not_serving().await;
                let _ = failed.set(Failure::Store(why));
                // Watches end now (their cursors closed with the store); the rest is
                // answered for a moment so that clients learn why.
                stop_tx.send_replace(true);
                tokio::time::sleep(FAILED_GRACE).await;
            }
        }
        stop_tx.send_replace(true);
    };
    let handshake_timeout = limits.handshake_timeout;
    let served: std::pin::Pin<
        Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>,
    > = match &tls {
        None => Box::pin(router.serve_with_incoming_shutdown(incoming, shutdown)),
        Some(t) => Box::pin(router.serve_with_incoming_shutdown(
            patina_trust::TlsIncoming::new(incoming, t.trust.clone(), handshake_timeout),
            shutdown,
        )),
    };
    let mut draining = stopping.clone();
    let served = async move {
        tokio::select! {
            r = served => r,
            _ = async {
                let _ = draining.wait_for(|s| *s).await;
                tokio::time::sleep(DRAIN_GRACE).await;
            } => {
                tracing::warn!(
                    grace = ?DRAIN_GRACE,
                    "connections still open after shutdown began (clients that stopped reading): closing them"
                );
                Ok(())
            }
        }
    };
    let mut stopping = stopping;
    let refusing = overflow.serve(
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        },
        tls.map(|t| t.trust),
    );
    let (served, ()) = tokio::join!(served, refusing);
    stop_readiness.abort();
    served?;
    match failure.get() {
        Some(Failure::Store(why)) => Err(ServeError::StoreFailed(why.clone())),
        Some(Failure::Part(why)) => Err(ServeError::PartFailed(why.clone())),
        None => Ok(()),
    }
}
