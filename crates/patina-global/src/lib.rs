//! patina-global: the global tier. Every edge proxy runs a global agent (`patina global`);
//! every region runs two or more bridges (`patina bridge`), which are global agents too and
//! publish their region's (app, region) summaries under their own origin.
//!
//! - [`record`]: the records (summaries, bridges' heartbeats) and their rules
//!   ([`record::SummaryKind`]): the newer region view wins; a bridge publishes for its own
//!   region only;
//! - [`service`]: `patina.v1.Global` (LookupApp from the in-memory table that
//!   [`patina_edge`] provides, WatchApps from the store's feed);
//! - [`bridge`]: folding a region's Watch stream into summaries, and publishing them.
//!
//! The replication engine (membership, pushes, anti-entropy, the liveness overlay that hides
//! a dead bridge's summaries) is `patina-gossip`'s, as in a region.

#![forbid(unsafe_code)]

pub mod bridge;
pub mod nearness;
pub mod record;
pub mod service;

use std::future::Future;
use std::sync::Arc;

use patina_edge::Table;
use patina_proto::v1::global_server::GlobalServer;
use patina_region::{ClusterServices, Limits, MAX_MESSAGE_BYTES, ServeError};
use patina_store::Store;
use tokio::net::TcpListener;

pub use record::SummaryKind;
pub use service::GlobalService;

/// Serve `patina.v1.Global` (lookups from `table`, which [`service::follow_store`] keeps
/// current), health, reflection and the cluster's services on `listener`, until `shutdown`
/// resolves or the store fails. `region`: where this agent is (the default `from_region`).
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listener: TcpListener,
    store: Store,
    table: Arc<Table>,
    region: &str,
    limits: Limits,
    cluster: Option<ClusterServices>,
    tls: Option<patina_region::ServerTls>,
    shutdown: impl Future<Output = patina_region::Stopped> + Send,
) -> Result<(), ServeError> {
    let watches = patina_region::service::Watches::new(&limits);
    let region = region.to_owned();
    let served = store.clone();
    patina_region::serve_with(
        listener,
        store,
        limits,
        <GlobalServer<GlobalService> as tonic::server::NamedService>::NAME,
        cluster,
        tls,
        move |router, stopping| {
            let service = GlobalService::new(served, table, &region, watches, stopping);
            router.add_service(
                GlobalServer::new(service)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
        },
        shutdown,
    )
    .await
}
