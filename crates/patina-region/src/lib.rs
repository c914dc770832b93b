//! patina-region: the region agent. It validates machine records, serves the
//! `patina.v1.Region` gRPC service from a [`patina_store::Store`], and adds the standard gRPC
//! health and reflection services.
//!
//! Architecture invariant: prost types stop here; the store below sees keys, groups and
//! encoded bytes only.

#![forbid(unsafe_code)]

pub mod limits;
pub mod listener;
pub mod service;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;

use patina_proto::v1::region_server::RegionServer;
use patina_store::Store;
use tokio::net::TcpListener;

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
}

/// Serve the region API, health and reflection on `listener`, within `limits`, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    store: Store,
    id: &AgentIdentity,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let local: Option<SocketAddr> = listener.local_addr().ok();
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let service = RegionService::new(store, &id.region, &id.host, stopping.clone())
        .with_max_watches(limits.max_watches);
    let region = RegionServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<RegionServer<RegionService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(patina_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    tracing::info!(addr = ?local, region = %id.region, host = %id.host, "serving the region API");
    // Admission sets TCP_NODELAY on each accepted socket: the server's own setting applies
    // only to listeners it binds.
    let (incoming, overflow) = listener::admit(listener, &limits);
    let served = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection.get())
        .add_service(health)
        .add_service(reflection)
        .add_service(region)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stop_tx.send_replace(true);
        });
    let mut stopping = stopping;
    let refusing = overflow.serve(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    let (served, ()) = tokio::join!(served, refusing);
    served?;
    Ok(())
}
