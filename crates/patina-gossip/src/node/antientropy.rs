//! The decisions of anti-entropy: what the node knows (its mirror of the store's digest,
//! changed only after a commit), which versions are pending or refused, when a gap or a
//! noticed version calls for a session, with whom, and the backoff while sessions bring
//! nothing.

use std::time::Duration;

use patina_store::{NodeId, OriginKnowledge};

use super::{Node, Output, TimerKind};
use crate::identity::Identity;

/// How long a gap may stay open before it triggers a sync: long enough for the reordering
/// of two pushes on a LAN, short enough to be "at once" for routing.
pub const GAP_GRACE: Duration = Duration::from_millis(20);

/// Most anti-entropy sessions this node starts at a time.
pub const MAX_SYNCS_IN_FLIGHT: usize = 2;

impl Node {
    /// The store committed changes from peers: `known` is the new knowledge of the origins
    /// touched, `settled` the versions that were pending (applied, covered or refused).
    pub fn handle_learned(
        &mut self,
        now: Duration,
        known: Vec<(NodeId, OriginKnowledge)>,
        settled: &[(NodeId, u64)],
    ) {
        self.now = now;
        let gaps = {
            let mut s = self.shared.lock().expect("gossip shared state");
            for v in settled {
                s.pending.remove(v);
            }
            // Settled but not known: refused.
            for &(origin, seq) in settled {
                let known_now = known.iter().find(|(o, _)| *o == origin).map_or_else(
                    || s.known.get(&origin).is_some_and(|k| k.knows(seq)),
                    |(_, k)| k.knows(seq),
                );
                if !known_now {
                    s.remember_refused((origin, seq));
                }
            }
            let mut gaps = false;
            for (origin, k) in known {
                gaps |= k.gap_count() > 0;
                match s.first_gap(origin, &k) {
                    Some(first) => {
                        let at = self.gap_first.entry(origin).or_insert((first, now));
                        if at.0 != first {
                            *at = (first, now);
                        }
                    }
                    None => {
                        self.gap_first.remove(&origin);
                    }
                }
                // Pending versions now known some other way (a covered range, a sync, a
                // notice's record) are settled too: pending never outlives knowledge.
                let first = (origin, 0);
                let settled: Vec<(NodeId, u64)> = s
                    .pending
                    .range(first..=(origin, u64::MAX))
                    .filter(|(_, seq)| k.knows(*seq))
                    .copied()
                    .collect();
                for v in settled {
                    s.pending.remove(&v);
                }
                s.known.insert(origin, k);
            }
            gaps
        };
        if gaps || self.lacks_noticed() {
            self.arm_gap_check();
        }
    }

    /// The shell or the store did not take these versions from peers (too many applies in
    /// flight, the store overloaded or its disk full): they are no longer pending, nothing
    /// refused them, and they count as noticed (for origins of members seen up) so that a
    /// sync fetches them soon rather than at the next periodic round.
    pub fn handle_dropped(&mut self, now: Duration, versions: &[(NodeId, u64)]) {
        self.now = now;
        {
            let mut s = self.shared.lock().expect("gossip shared state");
            s.now = now;
            for v in versions {
                s.pending.remove(v);
            }
            for (origin, seq) in versions {
                s.notice(*origin, *seq);
            }
        }
        if !versions.is_empty() {
            self.arm_gap_check();
        }
    }

    pub(super) fn lacks_noticed(&self) -> bool {
        self.shared
            .lock()
            .expect("gossip shared state")
            .lacks_noticed()
    }

    pub(super) fn has_gaps(&self) -> bool {
        let s = self.shared.lock().expect("gossip shared state");
        let me = self.identity().node;
        s.known.iter().any(|(o, k)| *o != me && k.gap_count() > 0)
    }

    pub(super) fn arm_gap_check(&mut self) {
        if !self.gap_armed {
            self.gap_armed = true;
            self.schedule(GAP_GRACE, TimerKind::GapCheck);
        }
    }

    /// An anti-entropy session ended.
    pub fn handle_sync_done(&mut self, now: Duration, peer: Identity, end: SyncEnd) {
        self.now = now;
        self.syncing.remove(&peer.addr());
        match end {
            // Only a session the peer did not cut short counts as caught up: one that ran out
            // of budget may have left whole origins unsent, with no gap to show for them.
            SyncEnd::Complete => {
                self.synced_at = Some(now);
                self.syncs_completed += 1;
            }
            SyncEnd::Partial => self.syncs_completed += 1,
            SyncEnd::Failed => tracing::debug!(peer = %peer, "sync failed"),
        }
        // Clear notices we now know (and those too old to wait for).
        let ttl = self.cfg.sync_interval * super::NOTICE_TTL_ROUNDS;
        self.shared
            .lock()
            .expect("gossip shared state")
            .prune_noticed(now, ttl);
        // Still lacking (a session cut short by its budget, or a peer that lacked it too):
        // go on soon, backing off while sessions bring nothing (a gap nobody can fill, such
        // as a refused record or a forged notice, must not keep sessions running back to
        // back).
        if self.has_gaps() || self.lacks_noticed() {
            let known = self.known_total();
            if known > self.known_at_last_sync {
                self.gap_backoff = 0;
            } else {
                self.gap_backoff = (self.gap_backoff + 1).min(8);
            }
            self.known_at_last_sync = known;
            if !self.gap_armed {
                self.gap_armed = true;
                let delay = (GAP_GRACE * (1u32 << self.gap_backoff)).min(self.cfg.sync_interval);
                self.schedule(delay, TimerKind::GapCheck);
            }
        } else {
            self.gap_backoff = 0;
        }
    }

    /// Sequence numbers known across every origin: grows whenever a session brings anything.
    pub(super) fn known_total(&self) -> u128 {
        let s = self.shared.lock().expect("gossip shared state");
        s.known
            .values()
            .map(|k| {
                let missing: u64 = k.gaps().map(|r| r.hi() - r.lo() + 1).sum();
                u128::from(k.head().saturating_sub(missing))
            })
            .sum()
    }

    /// The periodic round: reconcile liveness and sync with a random member.
    pub(super) fn sync_round(&mut self) {
        self.reconcile_liveness();
        self.hold_unheld_suspects();
        self.prune_peer_state();
        self.refresh_tree_view();
        if let Some(peer) = self.random_active() {
            self.start_sync(peer);
        }
        let next = self.jittered(self.cfg.sync_interval);
        self.schedule(next, TimerKind::SyncRound);
    }

    /// A gap (or a noticed version we lack) stayed open past the grace: sync for it.
    pub(super) fn gap_check(&mut self) {
        self.gap_armed = false;
        if self.has_gaps() || self.lacks_noticed() {
            let peer = self
                .gap_hint
                .filter(|h| self.foca.iter_members().any(|m| m.id() == h))
                .or_else(|| self.random_active());
            match peer {
                Some(peer)
                    if !self.syncing.contains(&peer.addr())
                        && self.syncing.len() < MAX_SYNCS_IN_FLIGHT =>
                {
                    self.count(|c| c.syncs_for_gaps += 1);
                    self.start_sync(peer);
                }
                // Busy: `handle_sync_done` checks again when a session ends.
                _ => {}
            }
        }
    }

    pub(super) fn start_sync(&mut self, peer: Identity) {
        if self.syncing.len() >= MAX_SYNCS_IN_FLIGHT || self.syncing.contains(&peer.addr()) {
            return;
        }
        self.syncing.insert(peer.addr());
        self.count(|c| c.syncs_started += 1);
        self.out.push(Output::Sync { peer });
    }

    /// What datagrams can make this node hold, bounded by members and time: notices nothing
    /// filled, and arrival times of addresses that are not members (a forged source).
    pub(super) fn prune_peer_state(&mut self) {
        self.prune_clock_samples();
        self.prune_coordinates();
        let ttl = self.cfg.sync_interval * super::NOTICE_TTL_ROUNDS;
        let now = self.now;
        self.shared
            .lock()
            .expect("gossip shared state")
            .prune_noticed(now, ttl);
        let members: std::collections::BTreeSet<crate::identity::PeerAddr> = self
            .foca
            .iter_membership_state()
            .map(|m| m.id().addr)
            .collect();
        self.last_seen.retain(|addr, _| members.contains(addr));
    }
}

/// How an anti-entropy session ended, as [`Node::handle_sync_done`] is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncEnd {
    /// Both halves ran to their done, and the peer sent all it had for us.
    Complete,
    /// Both halves ran to their done, but the peer's budget ran out (`truncated`): more
    /// remains, for the next session.
    Partial,
    /// The session failed or never began.
    Failed,
}
