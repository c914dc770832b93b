//! Record kinds: what a store's records are, as far as the store must know.
//!
//! The store is generic: keys, groups, encoded values. What a value means (a machine in a
//! region, an (app, region) summary in the global tier) belongs to a [`Kind`], which the
//! store is opened with and which is persisted in its meta, so a store made for one kind is
//! never opened as another. A kind checks values that arrive from peers, derives the flags
//! the serving index needs (is it routable?), chooses the merge rule, and says whether a live
//! key may move to another group.

use std::sync::Arc;

use crate::{Entry, NodeId, Version};

/// What the index needs to know of a live value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    /// Whether lookups that ask for routable records only return it (a machine that is
    /// started and passing its checks; a summary with healthy instances).
    pub routable: bool,
}

/// One side of a merge: a version and its value (`None`: a tombstone).
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    pub version: Version,
    pub value: Option<&'a [u8]>,
}

/// Whether a local write may move a live key from one group to another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupChange {
    /// Refused with [`crate::StoreError::GroupChange`]: delete the key first.
    Refuse,
    Allow,
}

/// The rules of one kind of record. Implementations must be deterministic: every node
/// applies them to the same inputs and must reach the same answer.
pub trait Kind: Send + Sync + 'static {
    /// A stable name, persisted with the store (e.g. `"machine"`).
    fn name(&self) -> &'static str;

    /// The flags of a live value. Cheap: it runs on the writer thread for every write.
    fn flags(&self, value: &[u8]) -> Flags;

    /// Check a record from a peer before it is applied: its key and group, and its value
    /// (`None`: a tombstone). Local writes were validated by the service already; a refusal
    /// here is counted and logged per origin, never applied. The message says what is wrong,
    /// briefly.
    fn check(&self, key: &str, group: &str, value: Option<&[u8]>) -> Result<(), String> {
        let _ = (key, group, value);
        Ok(())
    }

    /// Check a record from a peer against what this store holds, knowing its origin (after
    /// [`Kind::check`] passed): for instance that the origin registered for the scope the
    /// record claims. `held` reads a key's current state, records staged earlier in the same
    /// group commit included. A refusal is counted like one of `check`'s; the record's number
    /// stays unknown, so anti-entropy asks for it again later (when its registration may
    /// have arrived).
    fn check_held(
        &self,
        origin: NodeId,
        key: &str,
        value: Option<&[u8]>,
        held: &dyn Fn(&str) -> Option<Entry>,
    ) -> Result<(), String> {
        let _ = (origin, key, value, held);
        Ok(())
    }

    /// The merge rule: does `incoming` replace `current`? It must be a strict total order
    /// over the candidates of one key (irreflexive, and for two distinct versions exactly
    /// one wins), so that every order of delivery converges. The default orders by version.
    /// A local write that would not win is refused ([`crate::StoreError::Stale`]).
    fn wins(&self, incoming: &Candidate<'_>, current: &Candidate<'_>) -> bool {
        incoming.version > current.version
    }

    /// Whether a local write may move a live key to another group.
    fn group_change(&self) -> GroupChange {
        GroupChange::Refuse
    }

    /// Whether a store that moves to a fresh origin renames the records of its former origin
    /// (its own and those it adopts) under the new one, each keeping its timestamp. `false`
    /// for a kind whose records are bound to the origin that wrote them (a bridge's summaries
    /// and heartbeat, which it publishes again under its new origin).
    fn rename_on_move(&self) -> bool {
        true
    }

    /// In a lean store (`StoreOptions::lean`), whether `key` is held lean (its record read
    /// from SQLite when needed) rather than in memory. A kind keeps in memory the few keys its
    /// readers look up by key (the global tier's bridge records); all are lean by default.
    fn lean_key(&self, _key: &str) -> bool {
        true
    }
}

/// A shareable kind.
pub type KindRef = Arc<dyn Kind>;

/// Records whose values the store takes as they are: routable when the value is non-empty
/// and starts with `+`. For tests, benchmarks and tools that need a store of opaque bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpaqueKind;

impl Kind for OpaqueKind {
    fn name(&self) -> &'static str {
        "opaque"
    }

    fn flags(&self, value: &[u8]) -> Flags {
        Flags {
            routable: value.first() == Some(&b'+'),
        }
    }
}
