//! patina-edge: what an edge proxy links to answer "which regions have healthy instances of
//! app X, nearest first?" from its own memory.
//!
//! ```no_run
//! # async fn demo() {
//! use std::sync::Arc;
//! use patina_edge::{RegionTable, Table, follow};
//! let table = Arc::new(Table::new(RegionTable::default(), Some(std::time::Duration::from_secs(30))));
//! // TLS with the proxy's certificate in production (`patina_trust::Dial::tls`).
//! let edge = follow(
//!     vec!["http://127.0.0.1:7700".into()],
//!     table.clone(),
//!     patina_trust::Dial::Plain,
//! );
//! // ... on every request:
//! for hit in table.lookup("web", "ord") {
//!     let _region = table.region_name(hit.region);
//! }
//! # drop(edge);
//! # }
//! ```
//!
//! - [`regions`]: the region table (coordinates, measured round trips) and the order it gives;
//! - [`table`]: the compact replica lookups read (about 12 bytes a summary plus the app's
//!   name), with per-region freshness from the bridges' heartbeats;
//! - [`follow`]: keeping it current through `patina.v1.Global.WatchApps`;
//! - [`signed`]: what bridges sign, and the checks an edge makes before it takes a record.

#![forbid(unsafe_code)]

pub mod follow;
pub mod regions;
pub mod signed;
pub mod table;

pub use follow::{Edge, Replica, follow};
pub use regions::{RegionSpec, RegionTable, is_dns_label};
pub use table::{Hit, Refused, RegionId, RegionState, SummaryUpdate, Table, TableStats};
