//! patina-gossip: the replication engine both tiers share (membership with SWIM, push
//! dissemination, anti-entropy), built as a sans-IO core driven by a thin async shell.
//!
//! Architecture invariant: the core knows nothing of tokio, SQLite, gRPC or the wall clock:
//! inputs come in as method calls with the time passed in, outputs go out as values
//! (checked by `xtask/src/tidy.rs`). This crate is being built (the region-cluster issue);
//! so far it holds the datagram envelope.

#![forbid(unsafe_code)]

pub mod envelope;

pub use envelope::{ClusterName, Envelope, EnvelopeError};
