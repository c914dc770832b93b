//! Whether this node's view stands: what a follower of the agent (a bridge) may count. A
//! view that does not stand can be fresh and still wrong: a node cut off from its peers takes
//! them for down one after another and its store hides their records; one restarted on an
//! empty data directory shows nothing until it has synced. The view stands when the node is
//! joined, sees a majority of the members it heard from in the last minute alive, is settled
//! since the latest owner it took for down (it heard from a majority since, or
//! `Config::view_settle` passed: an isolated node takes its peers for down one probe period
//! or so apart, so it never settles, and loses its majority), has completed an anti-entropy
//! session since it last gained its majority, and has no gap older than
//! `Config::max_gap_age`. A node configured `standalone` (its region's only agent) stands
//! alone.

use std::time::Duration;

use super::Node;

/// Why a view does not stand (see the module's doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ViewReason {
    NotJoined,
    NoMajority,
    Settling,
    NotSynced,
    OldGap,
    /// The node's clock is off its peers' (it refuses writes).
    ClockOff,
}

/// The node's view, as [`Node::view_status`] last judged it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ViewStatus {
    pub stands: bool,
    /// Empty when it stands.
    pub reasons: Vec<ViewReason>,
    /// Members counted for the majority (itself included), and those of them alive.
    pub members_recent: u32,
    pub members_alive: u32,
    pub syncs_completed: u64,
    pub oldest_gap: Duration,
    /// Peers' clocks minus this node's (the median, with itself as 0), and how many peers
    /// were sampled.
    pub clock_offset_ms: i64,
    pub clock_samples: u32,
}

impl Node {
    /// Judge the view at `now` (the shell calls this before it carries out a liveness change,
    /// so that no hide reaches the store before the view that explains it is published).
    pub fn view_status(&mut self, now: Duration) -> ViewStatus {
        let (alive, total) = self.census(None);
        let majority = alive * 2 > total;
        let oldest_gap = self.oldest_gap(now);
        let mut reasons = Vec::new();
        if !self.cfg.standalone {
            if self.foca.num_members() == 0 {
                reasons.push(ViewReason::NotJoined);
            }
            if majority {
                if self.majority_since.is_none() {
                    self.majority_since = Some(now);
                    // Regained: catch up at once rather than at the next round (the view
                    // stands only after a session).
                    if let Some(peer) = self.random_active() {
                        self.start_sync(peer);
                    }
                }
            } else {
                self.majority_since = None;
                reasons.push(ViewReason::NoMajority);
            }
            if let Some(down) = self.last_down_at
                && now < down + self.cfg.view_settle
            {
                let (heard, total) = self.census(Some(down));
                if heard * 2 <= total {
                    reasons.push(ViewReason::Settling);
                }
            }
            let synced = matches!(
                (self.synced_at, self.majority_since),
                (Some(s), Some(m)) if s >= m
            );
            if majority && !synced {
                reasons.push(ViewReason::NotSynced);
            }
        }
        if oldest_gap > self.cfg.max_gap_age {
            reasons.push(ViewReason::OldGap);
        }
        if self.clock.fence.is_some() {
            reasons.push(ViewReason::ClockOff);
        }
        let (clock_offset_ms, clock_samples) = self.clock_offset();
        ViewStatus {
            clock_offset_ms,
            clock_samples: clock_samples as u32,
            stands: reasons.is_empty(),
            reasons,
            members_recent: total as u32,
            members_alive: alive as u32,
            syncs_completed: self.syncs_completed,
            oldest_gap,
        }
    }

    /// How long the oldest gap (a missing number below an origin's head that this node did
    /// not refuse) has been open. Noticed numbers do not count: a notice is an unchecked
    /// datagram's word (a forged one must not keep the view from standing); a real one
    /// brings its session, and its record, soon.
    fn oldest_gap(&self, now: Duration) -> Duration {
        self.gap_first
            .values()
            .map(|(_, since)| *since)
            .min()
            .map_or(Duration::ZERO, |since| now.saturating_sub(since))
    }
}

#[cfg(test)]
mod tests {
    use patina_store::{NodeId, OriginKnowledge, SeqRange};

    use super::*;
    use crate::node::SyncEnd;
    use crate::node::testing::{member, node};

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_gap_of_refused_numbers_never_ages_and_a_missing_one_does() {
        let mut n = node();
        let o = NodeId(7);
        let gap = |ranges: &[(u64, u64)], head| {
            let r: Vec<SeqRange> = ranges
                .iter()
                .map(|&(lo, hi)| SeqRange::new(lo, hi).unwrap())
                .collect();
            OriginKnowledge::from_parts(head, &r).unwrap()
        };
        // Number 2 arrived and was refused (settled, not known): nothing will fill it.
        n.handle_learned(s(1), vec![(o, gap(&[(2, 2)], 3))], &[(o, 2)]);
        assert_eq!(n.view_status(s(100)).oldest_gap, Duration::ZERO);
        // Number 4 was never received: that gap ages from when it opened.
        n.handle_learned(s(101), vec![(o, gap(&[(2, 2), (4, 4)], 5))], &[]);
        let v = n.view_status(s(120));
        assert_eq!(v.oldest_gap, s(19));
        assert!(v.reasons.contains(&ViewReason::OldGap), "{v:?}");
        // Filled: no gap left but the refused one.
        n.handle_learned(s(121), vec![(o, gap(&[(2, 2)], 5))], &[]);
        assert_eq!(n.view_status(s(122)).oldest_gap, Duration::ZERO);
    }

    #[test]
    fn only_a_session_the_peer_did_not_cut_short_counts_as_caught_up() {
        let mut n = node();
        let peer = member(2);
        assert!(n.view_status(s(1)).reasons.contains(&ViewReason::NotSynced));
        n.handle_sync_done(s(2), peer, SyncEnd::Partial);
        assert!(
            n.view_status(s(3)).reasons.contains(&ViewReason::NotSynced),
            "a truncated session leaves origins unsent"
        );
        n.handle_sync_done(s(4), peer, SyncEnd::Complete);
        let v = n.view_status(s(5));
        assert!(!v.reasons.contains(&ViewReason::NotSynced), "{v:?}");
        assert_eq!(v.syncs_completed, 2);
    }
}
