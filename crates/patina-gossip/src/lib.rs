//! patina-gossip: the replication engine both tiers share (membership with SWIM, push
//! dissemination, anti-entropy), built as a sans-IO core driven by a thin async shell.
//!
//! - [`envelope`]: the frame around every datagram (magic, version, cluster name), sealed
//!   with the [`keyring`]'s key in use;
//! - [`keyring`]: gossip keys (install, use, remove; plaintext accepted or refused);
//! - [`identity`]: a member's identity and foca's codec for it;
//! - [`wire`]: pushes and the items that carry changes;
//! - [`node`]: the sans-IO node (membership, Lifeguard-style health, dissemination, when to
//!   sync);
//! - [`sync`]: what anti-entropy sends, from two digests;
//! - [`replica`]: what the node learns from its store (its own changes, a commit's knowledge);
//! - [`coords`]: network coordinates (Vivaldi) from measured round trips.
//!
//! Architecture invariant: the core knows nothing of tokio, SQLite, gRPC or the wall clock:
//! inputs come in as method calls with the time passed in, outputs go out as values
//! (checked by `xtask/src/tidy.rs`).

#![forbid(unsafe_code)]

pub mod coords;
pub mod envelope;
pub mod identity;
pub mod keyring;
pub mod node;
pub mod replica;
pub mod shell;
pub mod sim;
pub mod sync;
pub mod wire;

pub use envelope::{ClusterName, Envelope, EnvelopeError};
pub use identity::{Identity, PeerAddr};
pub use keyring::{GossipKey, Keyring, KeyringError, KeyringOp};
pub use node::{
    Config, Dissemination, Lane, MemberInfo, MemberState, Node, Output, StateSizes, TimerEvent,
    TimerKind, TreeSizes, ViewReason, ViewStatus,
};
