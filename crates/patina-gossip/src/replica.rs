//! What a node learns from its store, shared by the shell and the simulator: the store's own
//! durable changes (read from its feed, to be pushed), and, after a batch from peers is
//! committed, the knowledge of the origins it touched and the versions it settled.

use patina_store::{Behind, Digest, NodeId, OriginKnowledge, Record, RemoteBatch, Store};

/// The store's own changes after feed revision `after` (at most `max`), as records to push,
/// and the revision read up to.
pub fn local_changes(store: &Store, after: u64, max: usize) -> Result<(Vec<Record>, u64), Behind> {
    let me = store.node();
    let (changes, upto) = store
        .feed()
        .read_since(after, max, |c| c.entry.version().origin == me)?;
    let records = changes
        .iter()
        .map(|c| Record::from_entry(&c.entry))
        .collect();
    Ok((records, upto))
}

/// What a batch from peers touches: its origins, and the versions of its records (pending at
/// the node until the commit settles them).
pub struct Touched {
    pub origins: Vec<NodeId>,
    pub settled: Vec<(NodeId, u64)>,
}

impl Touched {
    pub fn of(batch: &RemoteBatch) -> Touched {
        let settled: Vec<(NodeId, u64)> = batch
            .records
            .iter()
            .map(|r| (r.version.origin, r.version.seq))
            .collect();
        let mut origins: Vec<NodeId> = settled.iter().map(|(o, _)| *o).collect();
        origins.extend(batch.covered.iter().map(|(o, _)| *o));
        origins.sort();
        origins.dedup();
        Touched { origins, settled }
    }

    /// The knowledge of the touched origins in `digest` (the store's, after the commit).
    pub fn known(&self, digest: &Digest) -> Vec<(NodeId, OriginKnowledge)> {
        self.origins
            .iter()
            .filter_map(|o| digest.get(o).map(|k| (*o, k.clone())))
            .collect()
    }
}
