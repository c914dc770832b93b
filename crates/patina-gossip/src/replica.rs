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

    /// What the node must be told once the store answered `applied` (did the batch commit?),
    /// with `digest` read after that answer.
    pub fn outcome(self, applied: bool, digest: &Digest) -> ApplyOutcome {
        if applied {
            ApplyOutcome::Learned {
                known: self.known(digest),
                settled: self.settled,
            }
        } else {
            ApplyOutcome::Dropped(self.settled)
        }
    }
}

/// What a node learns from one apply of a batch from peers.
#[derive(Debug)]
pub enum ApplyOutcome {
    /// The batch committed: the new knowledge of the origins it touched, and its versions,
    /// settled (a settled version that is not known was refused by the store's rules, and
    /// the node remembers it so that its copies do not circulate:
    /// [`crate::Node::handle_learned`]).
    Learned {
        known: Vec<(NodeId, OriginKnowledge)>,
        settled: Vec<(NodeId, u64)>,
    },
    /// The store did not take the batch at all (overloaded, a full disk, closing): nothing in
    /// it was refused, and the node must take its copies again
    /// ([`crate::Node::handle_dropped`]; anti-entropy brings them too).
    Dropped(Vec<(NodeId, u64)>),
}
