//! patina-xds: an xDS control plane for stock clients (Envoy, proxyless gRPC): the
//! Aggregated Discovery Service in both its state-of-the-world and delta variants, on region
//! agents (an app's routable instances in the region) and global agents (an app's regions,
//! nearest first, through their ingress).
//!
//! - [`resources`]: the cluster, endpoints and listener of an app;
//! - [`hub`]: the change log every stream reads from its own position;
//! - [`protocol`]: one stream's subscriptions, nonces, ACKs and NACKs (sans I/O);
//! - [`service`]: the gRPC service, a task per stream;
//! - [`region`] and [`global`]: where the resources come from, and the followers that
//!   publish their changes, debounced.

#![forbid(unsafe_code)]

pub mod global;
pub mod hub;
pub mod protocol;
pub mod region;
pub mod resources;
pub mod service;

pub use hub::Hub;
pub use protocol::Stats;
pub use service::{Ads, Config, Source};

/// Apps are DNS labels: any other name is a resource that does not exist.
pub fn is_app_name(name: &str) -> bool {
    patina_edge::regions::is_dns_label(name)
}
