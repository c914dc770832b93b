//! The agent's clock against its peers'. Timestamps decide merges, so a clock far ahead wins
//! everything: the node measures its offset from samples the shell takes in anti-entropy
//! hellos (NTP's four timestamps, [`Node::handle_clock_sample`]), takes the median over
//! recent samples and itself (0), and fences the store's local writes while the median is
//! beyond `Config::max_clock_offset`. A fence is lifted once the median is back within half
//! the bound and a sample says so: peers that go quiet or leave (their samples age out) leave
//! the fence standing, they do not vote the node back in. A step of the wall clock against
//! the node's monotonic time ([`Node::handle_wall`]) fences at once, until a sample taken
//! after it finds the clock within the bound (or the median rule fences it): the first seconds after a step are when a fast clock would stamp writes
//! no peer will take.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use patina_store::ClockFence;

use super::{Node, Output};
use crate::identity::Identity;

/// How long a sample counts.
pub const CLOCK_SAMPLE_TTL: Duration = Duration::from_secs(60);
/// A step detected with no member to sample stops fencing after this long (a region of one
/// agent has no peer to compare with).
const STEP_ALONE: Duration = Duration::from_secs(10);

/// What the node knows of its clock.
#[derive(Debug, Default)]
pub(super) struct ClockWatch {
    /// Per member address: its clock minus ours (ms), and when the sample was taken.
    samples: BTreeMap<SocketAddr, (i64, Duration)>,
    /// This host's wall clock minus the node's time, at the last reading.
    wall_base: Option<i64>,
    /// A step of the wall clock was seen then (and by how much), and no sample taken since has
    /// found the clock within the bound.
    stepped: Option<(Duration, i64)>,
    /// When the wall clock last stepped (kept after the step is judged): a sample from a
    /// hello that left before then measured the clock before it.
    last_step: Option<Duration>,
    /// The fence stands on the median rule (not only on an unjudged step): it lifts only
    /// within half the bound, on a sample that says so.
    median_fenced: bool,
    pub(super) fence: Option<ClockFence>,
}

impl Node {
    /// This host's wall clock read `wall_ms` at `now`: a change of the wall clock against
    /// the node's time by more than half the bound is a step, and fences at once.
    pub fn handle_wall(&mut self, now: Duration, wall_ms: u64) {
        self.now = now;
        let base = wall_ms as i64 - now.as_millis() as i64;
        let bound = self.cfg.max_clock_offset.as_millis() as i64;
        if let Some(prev) = self.clock.wall_base
            && (base - prev).abs() > bound / 2
        {
            tracing::warn!(
                step_ms = base - prev,
                "this host's wall clock stepped: local writes are refused until a peer's clock is sampled"
            );
            // Steps add up until samples judge them.
            let step = self.clock.stepped.map_or(0, |(_, s)| s) + (base - prev);
            self.clock.stepped = Some((now, step));
            self.clock.last_step = Some(now);
            self.clock.samples.clear();
        }
        self.clock.wall_base = Some(base);
        self.judge_clock();
    }

    /// A sample from an anti-entropy hello with `peer`, whose hello left at `sent`: its clock
    /// minus ours is `offset_ms`, within `err_ms` (half the round trip). Samples less precise
    /// than half the bound are not taken, nor ones from hellos that left before the last step
    /// (they measured the clock before it). After a step, a sample that finds the clock
    /// within the bound ends the step's own fence (the step was a correction); samples that
    /// find it off fence it by the median rule.
    pub fn handle_clock_sample(
        &mut self,
        now: Duration,
        peer: Identity,
        offset_ms: i64,
        err_ms: u64,
        sent: Duration,
    ) {
        self.now = now;
        let bound = self.cfg.max_clock_offset.as_millis() as u64;
        if err_ms > bound / 2 || self.clock.last_step.is_some_and(|at| sent < at) {
            return;
        }
        self.clock.samples.insert(peer.addr, (offset_ms, now));
        if offset_ms.unsigned_abs() <= bound {
            self.clock.stepped = None;
        }
        self.judge_clock();
    }

    /// Samples of members only, and recent ones (called each sync round).
    pub(super) fn prune_clock_samples(&mut self) {
        let now = self.now;
        let members: std::collections::BTreeSet<SocketAddr> =
            self.foca.iter_members().map(|m| m.id().addr).collect();
        self.clock.samples.retain(|addr, (_, at)| {
            members.contains(addr) && now.saturating_sub(*at) < CLOCK_SAMPLE_TTL
        });
        self.judge_clock();
    }

    /// The median of the peers' offsets and our own (0): past the bound, the node is the
    /// one off (a majority of clocks agree against it); with one peer, the lower-magnitude
    /// middle wins, so a region of two never fences on one sample.
    pub(super) fn clock_offset(&self) -> (i64, usize) {
        let mut all: Vec<i64> = self.clock.samples.values().map(|(o, _)| *o).collect();
        let n = all.len();
        all.push(0);
        all.sort_unstable();
        let mid = all.len() / 2;
        let median = if all.len() % 2 == 1 {
            all[mid]
        } else if all[mid - 1].abs() <= all[mid].abs() {
            all[mid - 1]
        } else {
            all[mid]
        };
        (median, n)
    }

    fn judge_clock(&mut self) {
        let bound = self.cfg.max_clock_offset.as_millis() as u64;
        let (offset, _) = self.clock_offset();
        let fenced_before = self.clock.fence.is_some();
        // The median rule. A fence it made lifts within half the bound, and only on a sample
        // that says so: no samples (aged out, peers unreachable) or only samples that agree
        // the clock is off keep it, whatever our own vote makes of the median.
        let median_fence = if self.clock.median_fenced {
            let supported = self
                .clock
                .samples
                .values()
                .any(|(o, _)| o.unsigned_abs() <= bound / 2);
            !(offset.unsigned_abs() <= bound / 2 && supported)
        } else {
            offset.unsigned_abs() > bound
        };
        if let Some((at, _)) = self.clock.stepped
            && self.foca.num_members() == 0
            && self.now >= at + STEP_ALONE
        {
            // Nobody to sample: an unjudged step stops fencing (a fence the median rule
            // made stays).
            self.clock.stepped = None;
        }
        self.clock.median_fenced = median_fence;
        let fence = match self.clock.stepped {
            _ if median_fence => Some(ClockFence {
                offset_ms: offset,
                bound_ms: bound,
            }),
            // The offset the step made, as peers would see it.
            Some((_, step)) => Some(ClockFence {
                offset_ms: -step,
                bound_ms: bound,
            }),
            None => None,
        };
        if fence.is_some() != fenced_before {
            match fence {
                Some(f) => tracing::error!(
                    offset_ms = f.offset_ms,
                    bound_ms = bound,
                    "this agent's clock is off its peers': refusing local writes"
                ),
                None => tracing::warn!(
                    offset_ms = offset,
                    "this agent's clock is within the bound of its peers' again: taking writes"
                ),
            }
        }
        if fence != self.clock.fence {
            self.clock.fence = fence;
            self.out.push(Output::ClockFence(fence));
        }
    }

    /// The fence on local writes, if the clock is off.
    pub fn clock_fence(&self) -> Option<ClockFence> {
        self.clock.fence
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testing::{member, node};

    fn peer(i: u8) -> Identity {
        member(i + 1)
    }

    fn fences(n: &mut Node) -> Vec<Option<ClockFence>> {
        n.drain()
            .into_iter()
            .filter_map(|o| match o {
                Output::ClockFence(f) => Some(f),
                _ => None,
            })
            .collect()
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_node_whose_clock_is_five_minutes_ahead_of_two_peers_fences_its_writes() {
        let mut n = node();
        n.handle_clock_sample(ms(1), peer(2), -300_000, 1, ms(1));
        assert!(
            fences(&mut n).is_empty(),
            "one peer against itself: the median is 0"
        );
        n.handle_clock_sample(ms(2), peer(3), -300_001, 1, ms(2));
        let f = fences(&mut n);
        assert_eq!(
            f,
            [Some(ClockFence {
                offset_ms: -300_000,
                bound_ms: 500
            })]
        );
        assert!(
            n.view_status(ms(3))
                .reasons
                .contains(&super::super::ViewReason::ClockOff)
        );
        // Back within half the bound: lifted (not at 400 ms: hysteresis).
        n.handle_clock_sample(ms(4), peer(2), -400, 1, ms(4));
        n.handle_clock_sample(ms(5), peer(3), -400, 1, ms(5));
        assert!(
            fences(&mut n).iter().all(Option::is_some) && n.clock_fence().is_some(),
            "still beyond half the bound"
        );
        n.handle_clock_sample(ms(6), peer(2), -10, 1, ms(6));
        n.handle_clock_sample(ms(7), peer(3), -10, 1, ms(7));
        assert_eq!(fences(&mut n), [None]);
    }

    #[test]
    fn a_healthy_node_with_one_fast_peer_takes_writes() {
        let mut n = node();
        n.handle_clock_sample(ms(1), peer(2), 300_000, 1, ms(1));
        n.handle_clock_sample(ms(2), peer(3), 3, 1, ms(2));
        n.handle_clock_sample(ms(3), peer(4), -2, 1, ms(3));
        assert!(fences(&mut n).is_empty());
        assert_eq!(n.clock_fence(), None);
        // A sample with a round trip of more than the bound says nothing.
        n.handle_clock_sample(ms(4), peer(3), -300_000, 400, ms(4));
        n.handle_clock_sample(ms(5), peer(4), -300_000, 400, ms(5));
        assert_eq!(n.clock_fence(), None);
    }

    #[test]
    fn a_step_of_the_wall_clock_fences_at_once_until_a_sample_says_otherwise() {
        let mut n = node();
        n.handle_wall(ms(0), 1_000_000);
        n.handle_wall(ms(50), 1_000_050);
        assert!(fences(&mut n).is_empty(), "no step");
        n.handle_wall(ms(100), 1_300_100);
        assert_eq!(
            fences(&mut n),
            [Some(ClockFence {
                offset_ms: -300_000,
                bound_ms: 500
            })]
        );
        // A sample from a hello that left before the step says nothing; one after it that
        // finds the clock 5 minutes off keeps the fence (one peer against our 0 would not);
        // one that finds it within the bound (the step was a correction) lifts it.
        n.handle_clock_sample(ms(150), peer(2), 2, 1, ms(90));
        assert!(n.clock_fence().is_some(), "a pre-step sample lifts nothing");
        n.handle_clock_sample(ms(200), peer(2), -300_000, 1, ms(150));
        assert!(
            n.clock_fence().is_some(),
            "a sample that confirms the step keeps it"
        );
        n.handle_clock_sample(ms(300), peer(2), 5, 1, ms(250));
        assert_eq!(n.clock_fence(), None);
        fences(&mut n);
    }

    fn join(n: &mut Node, peers: &[u8]) {
        let members = peers.iter().map(|i| foca::Member::alive(peer(*i)));
        n.foca.apply_many(members, true, &mut n.rt).unwrap();
        n.drain();
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_fence_stands_when_the_peers_that_made_it_go_quiet() {
        let mut n = node();
        join(&mut n, &[2, 3]);
        n.handle_clock_sample(s(1), peer(2), -300_000, 1, s(1));
        n.handle_clock_sample(s(40), peer(3), -300_001, 1, s(40));
        assert!(n.clock_fence().is_some());
        // Peer 2's sample ages out: peer 3's alone against our own 0 would make a median of
        // 0, but nothing says the clock is back.
        n.now = s(62);
        n.prune_clock_samples();
        assert_eq!(n.clock_offset().1, 1);
        assert!(n.clock_fence().is_some(), "one peer leaving lifts nothing");
        n.now = s(120);
        n.prune_clock_samples();
        assert!(n.clock_fence().is_some(), "nor all of them");
        // A peer that finds the clock right lifts it.
        n.handle_clock_sample(s(121), peer(2), -10, 1, s(121));
        assert_eq!(n.clock_fence(), None);
    }

    #[test]
    fn after_a_step_a_sample_within_the_bound_ends_the_fence() {
        let mut n = node();
        n.handle_wall(ms(0), 1_000_000);
        n.handle_wall(ms(100), 1_300_100);
        assert!(n.clock_fence().is_some());
        // 400 ms off against a bound of 500: within it, though not within half of it (a
        // fence the median rule made would stay until then).
        n.handle_clock_sample(ms(300), peer(2), -400, 1, ms(250));
        assert_eq!(n.clock_fence(), None);
    }

    #[test]
    fn a_late_sample_from_before_a_step_is_never_taken() {
        let mut n = node();
        n.handle_wall(ms(0), 1_000_000);
        n.handle_wall(ms(100), 1_300_100);
        // One peer's clock stepped too (it says we are right); three say we are 5 min ahead.
        n.handle_clock_sample(ms(200), peer(5), 5, 1, ms(150));
        for i in 2..=4 {
            n.handle_clock_sample(ms(200 + u64::from(i)), peer(i), -300_000, 1, ms(150));
        }
        assert!(n.clock_fence().is_some(), "the median is 5 min");
        // A hello that left before the step answers late: it measured the clock before it.
        n.handle_clock_sample(ms(400), peer(2), 0, 1, ms(90));
        assert!(n.clock_fence().is_some(), "a pre-step sample is not taken");
    }

    #[test]
    fn alone_an_unjudged_step_stops_fencing_but_a_judged_clock_stays_fenced() {
        let mut n = node();
        n.handle_wall(s(0), 1_000_000);
        n.handle_wall(s(1), 1_301_000);
        assert!(n.clock_fence().is_some());
        n.handle_wall(s(12), 1_312_000);
        assert_eq!(
            n.clock_fence(),
            None,
            "nobody to ask: the step was not judged"
        );
        // Judged off by two peers, then a step (which clears the samples), then alone.
        n.handle_clock_sample(s(13), peer(2), -300_000, 1, s(13));
        n.handle_clock_sample(s(13), peer(3), -300_000, 1, s(13));
        assert!(n.clock_fence().is_some());
        n.handle_wall(s(14), 1_614_000);
        n.handle_wall(s(30), 1_630_000);
        assert!(
            n.clock_fence().is_some(),
            "the median's fence stays when the step's alone would end"
        );
    }
}
