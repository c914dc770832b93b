//! Down news carried by anti-entropy (`Config::down_news`). Each session's hellos list the members the sender's
//! membership declared down in the last [`DOWN_NEWS_AGE`] (at most [`MAX_DOWN_NEWS`]). SWIM's
//! gossip sends a piece of news a bounded number of times per node (foca's
//! `max_transmissions`); a member that missed every copy (loss, a pause, a burst of other
//! news) would otherwise keep a dead member until its own probe of it. Sessions run every
//! sync interval with a random peer, so such a member repairs within a few seconds.
//!
//! A receiver does not take the news as final: it suspects the identities it still holds
//! alive or suspect under that identity or an earlier epoch of it (news of an earlier epoch
//! than the one held says nothing: the member restarted since; a held earlier epoch is stale,
//! this node never learned of the restart) and holds each suspicion as its own, corroborated. A dead
//! member's port refuses and it goes down `suspicion_min` later; a healthy one answers or
//! refutes. News can be stale: a node cut off from everyone takes every member for dead, and
//! after the partition heals its hellos would list them (it also forgets its news when it
//! comes back under a new identity). Its own identity a node leaves to SWIM. A suspicion is
//! what any member's gossip can already cause; with TLS on, only members reach a session.

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
            .filter(|(_, at)| self.cfg.down_news && self.now.saturating_sub(*at) <= DOWN_NEWS_AGE)
    }

    /// Bumped whenever [`Node::recent_downs`] gains an identity (the shell republishes it).
    pub fn down_news_gen(&self) -> u64 {
        self.down_news_gen
    }

    /// A session's peer listed these members as down lately: suspect those this node still
    /// holds alive or suspect, under that identity or an earlier epoch of it (not already
    /// held corroborated), and hold each suspicion as one of its own,
    /// corroborated (`suspicion.rs`): a dead member's port refuses, and it goes down after
    /// `suspicion_min`; a healthy one answers, or refutes, and stays (the news may be stale:
    /// its sender was cut off and took healthy members for dead). Returns how many it
    /// suspected.
    pub fn handle_down_news(&mut self, now: Duration, members: &[Identity]) -> usize {
        self.now = now;
        if !self.cfg.down_news {
            return 0;
        }
        let me = self.identity().node;
        // Cheap filters first (at thousands of members, one pass of the membership per
        // listed identity would cost): not this node, not news it holds itself, and an
        // address this node holds active for that origin.
        let candidates: Vec<Identity> = members
            .iter()
            .take(MAX_DOWN_NEWS)
            .filter(|m| m.node != me)
            .filter(|m| !self.recent_downs.iter().any(|(d, _)| d == *m))
            .filter(|m| self.live.get(&m.node).is_some_and(|a| a.contains(&m.addr)))
            .copied()
            .collect();
        if candidates.is_empty() {
            return 0;
        }
        let Some(token) = self.swim_token else {
            return 0;
        };
        // One pass: those alive or suspect here, at the incarnation held. A suspect learned
        // from others' gossip is held with the long timeout of a learned suspicion; news that
        // it went down makes the suspicion this node's own, corroborated (short). An identity
        // held here of an earlier epoch than the news's (this node never learned that the
        // member restarted, and the restarted one died) is stale either way: suspected too.
        let news_of = |held: &Identity| {
            candidates
                .iter()
                .any(|m| m.node == held.node && m.addr == held.addr && m.epoch >= held.epoch)
        };
        let alive: Vec<(Identity, foca::Incarnation, bool)> = self
            .foca
            .iter_membership_state()
            .filter(|s| s.state() != foca::State::Down && news_of(s.id()))
            // A suspicion already held corroborated here needs nothing more.
            .filter(|s| {
                s.state() == foca::State::Alive
                    || !self
                        .held
                        .get(&s.id().addr())
                        .is_some_and(|h| h.corroborated)
            })
            .map(|s| (*s.id(), s.incarnation(), s.state() == foca::State::Suspect))
            .collect();
        for (member, incarnation, suspect) in &alive {
            tracing::info!(member = %member, "a session's peer saw this member go down: suspected here");
            self.suspect_corroborated(*member, *incarnation, *suspect, token);
        }
        if alive.is_empty() {
            return 0;
        }
        self.count(|c| c.down_news_applied += alive.len() as u64);
        self.after_foca();
        alive.len()
    }

    /// This node was declared down and comes back under a new identity: what it took for
    /// dead meanwhile (cut off, every member looked dead) is not news for anyone.
    pub(super) fn forget_down_news(&mut self) {
        self.recent_downs.clear();
        self.down_news_gen += 1;
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
    fn news_of_a_held_member_makes_it_a_corroborated_suspect_and_nothing_else_moves() {
        let mut n = node();
        n.cfg.down_news = true;
        let (b, c) = (member(2), member(3));
        n.foca
            .apply_many([b, c].map(foca::Member::alive).into_iter(), true, &mut n.rt)
            .unwrap();
        n.after_foca();
        n.drain();
        let now = Duration::from_secs(5);
        // An older identity of `c` (it restarted since: epoch 1 here), a member never seen,
        // and this node itself: none moves.
        let c_before = Identity { epoch: 0, ..c };
        let stranger = member(9);
        let me = n.identity();
        assert_eq!(n.handle_down_news(now, &[c_before, stranger, me]), 0);
        assert_eq!(state_of(&n, c), Some(foca::State::Alive));
        assert_eq!(n.counters().down_news_applied, 0);
        // `b` is suspected by the news, and its port is to be checked (a dead one's refuses:
        // down after suspicion_min; a healthy one's answers); repeating the news changes
        // nothing more.
        assert_eq!(n.handle_down_news(now, &[b]), 1);
        assert_eq!(state_of(&n, b), Some(foca::State::Suspect));
        assert_eq!(state_of(&n, c), Some(foca::State::Alive));
        assert!(
            n.drain()
                .iter()
                .any(|o| matches!(o, crate::node::Output::Corroborate { member } if *member == b)),
            "the suspicion is corroborated"
        );
        assert_eq!(n.handle_down_news(now, &[b]), 0);
        assert_eq!(n.counters().down_news_applied, 1);
        // News of a later epoch of `c` (it restarted, this node never learned it, and the
        // restarted one died): the identity held here is stale, suspected too.
        assert_eq!(n.handle_down_news(now, &[Identity { epoch: 2, ..c }]), 1);
        assert_eq!(state_of(&n, c), Some(foca::State::Suspect));
    }

    #[test]
    fn recent_downs_keep_the_newest_sixteen_of_the_last_minute() {
        let mut n = node();
        n.cfg.down_news = true;
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
