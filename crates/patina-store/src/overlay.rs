//! The liveness overlay: the records of owners that the membership layer declared down are
//! hidden from readers at once, with no replicated write.
//!
//! The down set is local state (each agent learns liveness for itself), changed through the
//! writer like any commit so that the feed revisions it uses are ordered with the records'
//! and persisted with the store's meta. The index keeps every record as it is; readers apply
//! the overlay at read time (listings and snapshots skip, catch-ups send hidden views), and
//! the feed carries each change of visibility as a change of its own. See
//! `docs/replication.md`, "Liveness overlay".

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::{Entry, NodeId};

/// Most owners the overlay hides at once. Every owner is an origin and a store tracks at most
/// [`crate::MAX_ORIGINS`] of them; the set is written whole (8 bytes an owner) with each change
/// of it, and read paths share it behind one `Arc`.
pub const MAX_DOWN_OWNERS: usize = crate::MAX_ORIGINS;

/// The owners whose records are hidden, as readers share it.
pub(crate) type DownSet = Arc<BTreeSet<NodeId>>;

/// What one [`crate::Store::set_owner_down`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverlayChange {
    /// The down set changed. `false`: the owner already was in the state asked for, and
    /// nothing was published.
    pub changed: bool,
    /// Records whose visibility changed (hidden, or shown again): one feed change each.
    pub records: usize,
}

/// Is this live record hidden by the overlay?
pub(crate) fn is_hidden_by(entry: &Entry, down: &BTreeSet<NodeId>) -> bool {
    entry.is_live() && down.contains(&entry.owner())
}

/// What a watcher is told of a record's state under the overlay: its hidden view (same
/// revision) when it is live and its owner is down; the state itself otherwise.
pub(crate) fn watch_view(entry: Entry, down: &BTreeSet<NodeId>) -> Entry {
    if is_hidden_by(&entry, down) {
        entry.hidden_view(entry.rev())
    } else {
        entry
    }
}

/// The down set as stored in the store's meta: owners as u64 little endian, ascending.
pub(crate) fn encode(down: &BTreeSet<NodeId>) -> Vec<u8> {
    down.iter().flat_map(|n| n.0.to_le_bytes()).collect()
}

/// The down set from its stored bytes; `None` when they are not what [`encode`] writes.
pub(crate) fn decode(bytes: &[u8]) -> Option<BTreeSet<NodeId>> {
    if !bytes.len().is_multiple_of(8) || bytes.len() / 8 > MAX_DOWN_OWNERS {
        return None;
    }
    Some(
        bytes
            .chunks_exact(8)
            .map(|c| NodeId(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stored_down_set_round_trips_and_bad_bytes_are_refused() {
        let down: BTreeSet<NodeId> = [NodeId(1), NodeId(u64::MAX), NodeId(0x0102_0304)].into();
        assert_eq!(decode(&encode(&down)), Some(down));
        assert_eq!(decode(&[]), Some(BTreeSet::new()));
        assert_eq!(decode(&[1, 2, 3]), None);
    }
}
