//! Origin retirement: an origin no member names, known here in full with nothing of it
//! pending or noticed, is retired in the store once it has been so for `retire_after`.

use std::collections::BTreeSet;
use std::time::Duration;

use patina_store::NodeId;

use super::{Node, Output};

/// Retirements asked of the store per sync round at most (each is one writer request).
const MAX_RETIRE_PER_ROUND: usize = 16;

impl Node {
    /// Ask the store to retire origins that no member names and that this node knows in
    /// full, once they have been so for `retire_after` (asked again each `retire_after` while
    /// the store keeps one, e.g. its records are still current somewhere).
    pub(super) fn retire_gone(&mut self, me: NodeId, up: &BTreeSet<NodeId>) {
        let candidates: BTreeSet<NodeId> = {
            let s = self.shared.lock().expect("gossip shared state");
            s.known
                .iter()
                .filter(|(o, k)| **o != me && !up.contains(o) && k.gap_count() == 0)
                .filter(|(o, _)| s.pending.range((**o, 0)..=(**o, u64::MAX)).next().is_none())
                .filter(|(o, _)| !s.noticed.contains_key(o))
                .map(|(o, _)| *o)
                .collect()
        };
        self.gone_since.retain(|o, _| candidates.contains(o));
        let mut asked = 0;
        for origin in candidates {
            let since = *self.gone_since.entry(origin).or_insert(self.now);
            if self.now >= since + self.cfg.retire_after && asked < MAX_RETIRE_PER_ROUND {
                asked += 1;
                self.gone_since.insert(origin, self.now);
                self.out.push(Output::Retire { origin });
            }
        }
    }

    /// The store retired `origin`: it leaves this node's mirror of the digest.
    pub fn handle_retired(&mut self, now: Duration, origin: NodeId) {
        self.now = now;
        self.gone_since.remove(&origin);
        self.gap_first.remove(&origin);
        let mut s = self.shared.lock().expect("gossip shared state");
        s.known.remove(&origin);
        s.noticed.remove(&origin);
        let stale: Vec<(NodeId, u64)> = s
            .pending
            .range((origin, 0)..=(origin, u64::MAX))
            .copied()
            .collect();
        for v in stale {
            s.pending.remove(&v);
        }
    }
}
