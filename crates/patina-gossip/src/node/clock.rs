//! The agent's clock against its peers'. Timestamps decide merges, so a clock far ahead wins
//! everything: the node measures its offset from samples the shell takes in anti-entropy
//! hellos (NTP's four timestamps, [`Node::handle_clock_sample`]), takes the median of the
//! recent samples (its peers' votes; its own is not one), and fences the store's local writes
//! while that median is beyond `Config::max_clock_offset` on at least two samples (a region of
//! two cannot tell which clock is off). The fence lifts once the median of at least two
//! samples (one when the node has a single peer) is back within half the bound: peers that go
//! quiet or leave (their samples age out) leave it standing; they do not vote the node back
//! in. A step of the wall clock against the node's monotonic time ([`Node::handle_wall`])
//! fences at once, until samples taken after it judge the clock: the first seconds after a
//! step are when a fast clock would stamp writes no peer will take.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use patina_store::ClockFence;

use super::{Node, Output};
use crate::identity::Identity;

/// How long a sample counts.
pub const CLOCK_SAMPLE_TTL: Duration = Duration::from_secs(60);
/// A step stops fencing unjudged after this long with no member to sample (a region of one
/// agent has no peer to compare with).
const STEP_ALONE: Duration = Duration::from_secs(10);
/// ... or after this long with members but no sample from any of them (peers whose hellos
/// carry no clock, or whose round trips are too long to measure by): a fence nobody can lift
/// would take the agent out for good.
const STEP_UNSAMPLED: Duration = Duration::from_secs(60);

/// What the node knows of its clock.
#[derive(Debug, Default)]
pub(super) struct ClockWatch {
    /// Per member address: its clock minus ours (ms), and when the sample was taken.
    samples: BTreeMap<SocketAddr, (i64, Duration)>,
    /// This host's wall clock minus the node's time, at the last reading.
    wall_base: Option<i64>,
    /// A step of the wall clock was seen then (and by how much), and samples taken since have
    /// not yet judged the clock.
    stepped: Option<(Duration, i64)>,
    /// When the wall clock last stepped (kept after the step is judged): a sample from a
    /// hello that left before then measured the clock before it.
    last_step: Option<Duration>,
    /// The fence stands on the samples (not only on an unjudged step): it lifts only when
    /// enough samples put the clock within half the bound.
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
                "this host's wall clock stepped: local writes are refused until peers' clocks are sampled"
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
    /// (they measured the clock before it).
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
        self.clock.samples.insert(peer.addr(), (offset_ms, now));
        self.judge_clock();
    }

    /// Samples of members only, and recent ones (called each sync round).
    pub(super) fn prune_clock_samples(&mut self) {
        let now = self.now;
        let members: std::collections::BTreeSet<SocketAddr> =
            self.foca.iter_members().map(|m| m.id().addr()).collect();
        self.clock.samples.retain(|addr, (_, at)| {
            members.contains(addr) && now.saturating_sub(*at) < CLOCK_SAMPLE_TTL
        });
        self.judge_clock();
    }

    /// The median of the peers' recent offsets (0 with none) and how many there are. Of an
    /// even count, the middle value of lower magnitude.
    pub(super) fn clock_offset(&self) -> (i64, usize) {
        let (near, _, n) = self.clock_middle();
        (near, n)
    }

    /// The middle values of the peers' recent offsets, nearer to 0 first (the same value
    /// twice for an odd count; 0 with none), and how many there are. A tie between them
    /// neither fences nor lifts: the fence needs both past the bound, a lift both within.
    fn clock_middle(&self) -> (i64, i64, usize) {
        let mut all: Vec<i64> = self.clock.samples.values().map(|(o, _)| *o).collect();
        let n = all.len();
        if n == 0 {
            return (0, 0, 0);
        }
        all.sort_unstable();
        let (a, b) = if n % 2 == 1 {
            (all[n / 2], all[n / 2])
        } else {
            (all[n / 2 - 1], all[n / 2])
        };
        if a.unsigned_abs() <= b.unsigned_abs() {
            (a, b, n)
        } else {
            (b, a, n)
        }
    }

    fn judge_clock(&mut self) {
        let bound = self.cfg.max_clock_offset.as_millis() as u64;
        let (near, far, n) = self.clock_middle();
        let members = self.foca.num_members();
        // Samples enough to say the clock is right: two, or the one peer there is.
        let enough = n >= 2 || (n == 1 && members == 1);
        let within = |limit: u64| enough && far.unsigned_abs() <= limit;
        // Off: the median of two samples or more, both middle values, past the bound.
        let off = n >= 2 && near.unsigned_abs() > bound;
        if let Some((at, _)) = self.clock.stepped {
            let alone = members == 0 && self.now >= at + STEP_ALONE;
            let unsampled = n == 0 && self.now >= at + STEP_UNSAMPLED;
            if off || within(bound) || alone || unsampled {
                // Judged (or nobody to judge it): the samples' rule alone from now on.
                self.clock.stepped = None;
            }
        }
        let median_fence = if self.clock.median_fenced {
            !within(bound / 2)
        } else {
            off
        };
        self.clock.median_fenced = median_fence;
        let fence = match self.clock.stepped {
            _ if median_fence => Some(ClockFence {
                // What enough samples said when they last said anything.
                offset_ms: if enough {
                    near
                } else {
                    self.clock.fence.map_or(near, |f| f.offset_ms)
                },
                bound_ms: bound,
            }),
            // The offset the step made, as peers would see it.
            Some((_, step)) => Some(ClockFence {
                offset_ms: -step,
                bound_ms: bound,
            }),
            None => None,
        };
        if fence.is_some() != self.clock.fence.is_some() {
            match fence {
                Some(f) => tracing::error!(
                    offset_ms = f.offset_ms,
                    bound_ms = bound,
                    "this agent's clock is off its peers': refusing local writes"
                ),
                None => tracing::warn!(
                    offset_ms = near,
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
        assert!(fences(&mut n).is_empty(), "one sample never fences");
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
        // One sample within it is a tie with one beyond: it lifts nothing.
        n.handle_clock_sample(ms(6), peer(2), -10, 1, ms(6));
        assert!(n.clock_fence().is_some(), "a tie lifts nothing");
        n.handle_clock_sample(ms(7), peer(3), -10, 1, ms(7));
        assert_eq!(fences(&mut n).last(), Some(&None));
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
        join(&mut n, &[2]);
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
        // Peers that find the clock right lift it: two of them (one could be as wrong).
        n.handle_clock_sample(s(121), peer(2), -10, 1, s(121));
        assert!(n.clock_fence().is_some(), "one sample of two members");
        assert_eq!(
            n.clock_fence().unwrap().offset_ms,
            -300_000,
            "what they last said"
        );
        n.handle_clock_sample(s(122), peer(3), -5, 1, s(122));
        assert_eq!(n.clock_fence(), None);
    }

    #[test]
    fn after_a_step_a_sample_within_the_bound_ends_the_fence() {
        let mut n = node();
        join(&mut n, &[2]);
        n.handle_wall(ms(0), 1_000_000);
        n.handle_wall(ms(100), 1_300_100);
        assert!(n.clock_fence().is_some());
        // 400 ms off against a bound of 500: within it, though not within half of it (a
        // fence the samples made would stay until then). The only peer's word is enough.
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

    #[test]
    fn one_wrong_peer_neither_shields_a_fast_clock_nor_lifts_its_fence() {
        let mut n = node();
        join(&mut n, &[2, 3, 4, 5]);
        // Three peers find the clock 30 s ahead; one, as fast (or lying), finds it right.
        n.handle_clock_sample(s(2), peer(2), -30_000, 1, s(2));
        n.handle_clock_sample(s(2), peer(5), 0, 1, s(2));
        assert!(n.clock_fence().is_none(), "a tie fences nothing");
        n.handle_clock_sample(s(3), peer(3), -30_000, 1, s(3));
        assert!(n.clock_fence().is_some(), "two of three");
        n.handle_clock_sample(s(40), peer(4), -30_000, 1, s(40));
        n.handle_clock_sample(s(41), peer(5), 0, 1, s(41));
        // One of the three goes unsampled for a minute: two against one, still off.
        n.now = s(62);
        n.prune_clock_samples();
        assert_eq!(n.clock_offset().1, 3);
        assert!(n.clock_fence().is_some(), "the wrong peer cannot lift it");
        // The next loses its sample too: a tie, which lifts nothing either.
        n.now = s(63);
        n.prune_clock_samples();
        assert_eq!(n.clock_offset().1, 2);
        assert!(n.clock_fence().is_some(), "a tie lifts nothing");
    }

    #[test]
    fn after_a_step_one_peer_of_several_cannot_judge_it() {
        let mut n = node();
        join(&mut n, &[2, 3, 4]);
        n.handle_wall(ms(0), 1_000_000);
        n.handle_wall(ms(100), 1_030_100);
        assert!(n.clock_fence().is_some());
        // A peer stepped by the same bad source finds the clock right: one of three.
        n.handle_clock_sample(ms(300), peer(2), 0, 1, ms(200));
        assert!(n.clock_fence().is_some(), "one sample of three members");
        n.handle_clock_sample(ms(400), peer(3), -30_000, 1, ms(300));
        assert!(n.clock_fence().is_some(), "a tie judges nothing");
        n.handle_clock_sample(ms(500), peer(4), -30_000, 1, ms(400));
        assert_eq!(n.clock_fence().map(|f| f.offset_ms), Some(-30_000));
    }

    #[test]
    fn a_step_no_peer_can_measure_stops_fencing_after_a_minute() {
        let mut n = node();
        join(&mut n, &[2, 3]);
        n.handle_wall(s(0), 1_000_000);
        n.handle_wall(s(1), 1_031_000);
        assert!(n.clock_fence().is_some());
        // Their hellos carry no clock (or their round trips are too long): no sample.
        n.handle_clock_sample(s(5), peer(2), 0, 400, s(4));
        n.handle_wall(s(30), 1_060_000);
        assert!(n.clock_fence().is_some(), "not yet");
        n.handle_wall(s(62), 1_092_000);
        assert_eq!(n.clock_fence(), None);
    }
}
