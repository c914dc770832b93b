//! Down news carried by anti-entropy: each session's hellos list the members the sender's
//! membership declared down in the last [`DOWN_NEWS_AGE`] (at most [`MAX_DOWN_NEWS`]). SWIM's
//! gossip sends a piece of news a bounded number of times per node (foca's
//! `max_transmissions`); a member that missed every copy (loss, a pause, a burst of other
//! news) would otherwise keep a dead member until its own probe of it. Sessions run every
//! sync interval with a random peer, so such a member repairs within a few seconds.
//!
//! A receiver declares down only identities it holds active (alive or suspect): foca's Down
//! is final for that identity, and a member that restarted runs under a larger epoch (another
//! identity), which news of its old one does not touch. Its own identity it leaves to SWIM
//! (which refutes or renews). A peer could already gossip the same Down over SWIM, so the
//! news gives a peer no power it lacked; with TLS on, only members reach the session.

use std::time::Duration;

use super::Node;
use crate::identity::Identity;

/// Most identities a hello lists, and a receiver takes.
pub const MAX_DOWN_NEWS: usize = 16;
/// How long a member's going down stays news.
pub const DOWN_NEWS_AGE: Duration = Duration::from_secs(60);

impl Node {
    /// Note that `member` went down here (its news for later sessions' hellos).
    pub(super) fn note_down(&mut self, member: Identity) {
        if member.node == self.identity().node {
            return;
        }
        self.recent_downs.retain(|(m, _)| *m != member);
        if self.recent_downs.len() == MAX_DOWN_NEWS {
            self.recent_downs.pop_front();
        }
        self.recent_downs.push_back((member, self.now));
        self.down_news_gen += 1;
    }

    /// The members this node declared down in the last [`DOWN_NEWS_AGE`], newest last, with
    /// when: what a session's hello lists (the shell filters by age as it sends).
    pub fn recent_downs(&self) -> impl Iterator<Item = (Identity, Duration)> + '_ {
        self.recent_downs
            .iter()
            .copied()
            .filter(|(_, at)| self.now.saturating_sub(*at) <= DOWN_NEWS_AGE)
    }

    /// Bumped whenever [`Node::recent_downs`] gains an identity (the shell republishes it).
    pub fn down_news_gen(&self) -> u64 {
        self.down_news_gen
    }

    /// A session's peer listed these members as down lately: declare down those this node
    /// still holds active. Returns how many it declared down.
    pub fn handle_down_news(&mut self, now: Duration, members: &[Identity]) -> usize {
        self.now = now;
        let me = self.identity();
        let active: Vec<Identity> = members
            .iter()
            .take(MAX_DOWN_NEWS)
            .filter(|m| **m != me && m.node != me.node)
            .filter(|m| {
                self.foca
                    .iter_membership_state()
                    .any(|s| *s.id() == **m && s.state() != foca::State::Down)
            })
            .copied()
            .collect();
        if active.is_empty() {
            return 0;
        }
        for m in &active {
            tracing::info!(member = %m, "a session's peer saw this member go down: down here too");
        }
        self.count(|c| c.down_news_applied += active.len() as u64);
        let _ = self.foca.apply_many(
            active.iter().map(|m| foca::Member::down(*m)),
            true,
            &mut self.rt,
        );
        self.after_foca();
        active.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testing::{member, node};

    fn state_of(n: &Node, m: Identity) -> Option<foca::State> {
        n.foca
            .iter_membership_state()
            .find(|s| *s.id() == m)
            .map(|s| s.state())
    }

    #[test]
    fn news_of_a_held_member_takes_it_down_and_nothing_else_moves() {
        let mut n = node();
        let (b, c) = (member(2), member(3));
        n.foca
            .apply_many([b, c].map(foca::Member::alive).into_iter(), true, &mut n.rt)
            .unwrap();
        n.drain();
        let now = Duration::from_secs(5);
        // An older identity of `c` (it restarted since: epoch 2 here), a member never seen,
        // and this node itself: none moves.
        let c_before = Identity { epoch: 0, ..c };
        let stranger = member(9);
        let me = n.identity();
        assert_eq!(n.handle_down_news(now, &[c_before, stranger, me]), 0);
        assert_eq!(state_of(&n, c), Some(foca::State::Alive));
        assert_eq!(n.counters().down_news_applied, 0);
        // `b` is down by the news; repeating it changes nothing more.
        assert_eq!(n.handle_down_news(now, &[b]), 1);
        assert_eq!(state_of(&n, b), Some(foca::State::Down));
        assert_eq!(state_of(&n, c), Some(foca::State::Alive));
        assert_eq!(n.handle_down_news(now, &[b]), 0);
        assert_eq!(n.counters().down_news_applied, 1);
        // And it is this node's news now, for its own sessions' hellos.
        assert!(n.recent_downs().any(|(m, _)| m == b));
    }

    #[test]
    fn recent_downs_keep_the_newest_sixteen_of_the_last_minute() {
        let mut n = node();
        for i in 0..20u8 {
            n.now = Duration::from_secs(u64::from(i));
            n.note_down(member(i + 2));
        }
        let held: Vec<Identity> = n.recent_downs().map(|(m, _)| m).collect();
        assert_eq!(held.len(), MAX_DOWN_NEWS);
        assert_eq!(held[0], member(6), "the oldest four were dropped");
        // This node's own identity is never news.
        n.note_down(n.identity());
        assert!(n.recent_downs().all(|(m, _)| m != n.identity()));
        // A minute on, only what went down within it stays.
        n.now = Duration::from_secs(19) + DOWN_NEWS_AGE;
        let held: Vec<Identity> = n.recent_downs().map(|(m, _)| m).collect();
        assert_eq!(held, vec![member(21)]);
    }
}
