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
                self.majority_since.get_or_insert(now);
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
        ViewStatus {
            stands: reasons.is_empty(),
            reasons,
            members_recent: total as u32,
            members_alive: alive as u32,
            syncs_completed: self.syncs_completed,
            oldest_gap,
        }
    }

    /// How long the oldest gap (a missing number below an origin's head, or a noticed number
    /// not known) has been open.
    fn oldest_gap(&self, now: Duration) -> Duration {
        let s = self.shared.lock().expect("gossip shared state");
        let noticed = s
            .noticed
            .iter()
            .filter(|(o, n)| !s.known.get(o).is_some_and(|k| k.knows(n.seq)))
            .map(|(_, n)| n.since);
        self.gap_first
            .values()
            .map(|(_, since)| *since)
            .chain(noticed)
            .min()
            .map_or(Duration::ZERO, |since| now.saturating_sub(since))
    }
}
