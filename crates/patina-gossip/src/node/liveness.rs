//! Owner liveness: which owners' records the store must hide, from the membership (an owner
//! is down once none of its identities is active, or no member names it once the node has
//! been joined long enough), and fail static (with `Config::fail_static`, nothing is hidden
//! while the node sees fewer than half of the members it heard from lately).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use patina_store::NodeId;

use super::{Node, Output};
use crate::identity::{Identity, PeerAddr};

/// Sync intervals after joining before an origin that no member names counts as down.
pub const OWNERLESS_AFTER: u32 = 2;

/// Members heard from within this window count towards [`Config::fail_static`]'s majority:
/// long-gone members (churn) do not make a node think it is alone.
pub const QUORUM_WINDOW: Duration = Duration::from_secs(60);

impl Node {
    /// foca notifies MemberDown only for members it saw up: a member first learned as down
    /// (it died while we were away, or before we joined) must still go dark here. Owners
    /// with a down member and no active one are reported down once. So are origins we hold
    /// records of but no member names, once we have been part of the cluster for
    /// `OWNERLESS_AFTER` sync intervals (time for the membership to be complete): foca's
    /// feed carries only active members, so an owner that died long before we returned is
    /// not a member at all.
    pub(super) fn reconcile_liveness(&mut self) {
        let me = self.identity().node;
        let mut down: BTreeSet<NodeId> = BTreeSet::new();
        let mut up: BTreeSet<NodeId> = BTreeSet::new();
        for m in self.foca.iter_membership_state() {
            match m.state() {
                foca::State::Down => down.insert(m.id().node),
                _ => up.insert(m.id().node),
            };
        }
        let settled = self
            .active_since
            .is_some_and(|t| self.now >= t + self.cfg.sync_interval * OWNERLESS_AFTER);
        if settled {
            let s = self.shared.lock().expect("gossip shared state");
            down.extend(
                s.known
                    .iter()
                    .filter(|(_, k)| k.head() > 0)
                    .map(|(o, _)| *o),
            );
        }
        let newly: Vec<NodeId> = down
            .difference(&up)
            .filter(|node| **node != me && !self.live.contains_key(node))
            .copied()
            .collect();
        for node in newly {
            self.live.insert(node, LiveAddrs::None);
            self.liveness(node, true);
        }
        // Members leave the majority's window as time passes.
        self.gate_liveness();
        if settled && self.foca.num_members() > 0 {
            self.retire_gone(me, &up);
        } else {
            // Not in touch: time toward retirement does not count.
            self.gone_since.clear();
        }
    }

    /// Tell the shared state which origins have a member up (and ours): only theirs are
    /// noticed.
    pub(super) fn refresh_origins(&mut self) {
        let me = self.identity().node;
        let origins: BTreeSet<NodeId> = self
            .live
            .iter()
            .filter(|(_, addrs)| !addrs.is_empty())
            .map(|(o, _)| *o)
            .chain([me])
            .collect();
        self.shared.lock().expect("gossip shared state").origins = origins;
    }

    pub(super) fn member_up(&mut self, id: Identity) {
        let me = self.identity();
        if id.node == me.node {
            // Two live agents with one origin. Both see it; the newer one (higher epoch, then
            // address) yields, so exactly one moves.
            if id.addr != me.addr && (me.epoch, me.addr) > (id.epoch, id.addr) {
                self.out.push(Output::OriginConflict { other: id });
            }
            return;
        }
        self.forgotten.remove(&id.node);
        let set = self.live.or_default(id.node);
        let was_down = set.is_empty();
        set.insert(id.addr);
        if was_down {
            self.liveness(id.node, false);
        }
    }

    pub(super) fn member_down(&mut self, id: Identity) {
        self.held.remove(&id.addr());
        self.note_down(id);
        self.gossip_now = true;
        if id.node == self.identity().node {
            return;
        }
        let Some(set) = self.live.get_mut(&id.node) else {
            // Never seen up by us: its records (if any) must still go dark.
            self.live.insert(id.node, LiveAddrs::None);
            self.liveness(id.node, true);
            return;
        };
        set.remove(&id.addr);
        if set.is_empty() {
            self.liveness(id.node, true);
        } else {
            self.gate_liveness();
        }
    }

    /// An owner's records are to be hidden (`down`) or shown: at once, or through the
    /// fail-static gate.
    pub(super) fn liveness(&mut self, node: NodeId, down: bool) {
        if down {
            // The view settles again once a majority is heard from after this.
            self.last_down_at = Some(self.now);
        }
        if !self.cfg.fail_static {
            self.out.push(Output::Liveness { node, down });
            return;
        }
        if down {
            self.want_down.entry(node).or_insert(self.now);
        } else {
            self.want_down.remove(&node);
        }
        self.gate_liveness();
    }

    /// Does this node see a majority of the members heard from lately (itself included)?
    /// Counted per member (origin), not per identity: an agent that restarted has a down
    /// identity and a live one, and counts once, as alive.
    /// The last time this node heard from any other member: the window is measured back from
    /// there, not from now, so that a node cut off for longer than the window does not see
    /// its missing members age out and think itself a majority again.
    pub(super) fn heard_last(&self) -> Duration {
        let me = self.identity().addr;
        self.last_seen
            .iter()
            .filter(|(addr, _)| **addr != me)
            .map(|(_, t)| *t)
            .max()
            .unwrap_or(self.now)
    }

    pub(super) fn has_quorum(&self) -> bool {
        let (alive, total) = self.census(None);
        alive * 2 > total
    }

    /// The members counted for the majority (itself included: those alive, and those down
    /// but heard from within [`QUORUM_WINDOW`] before it last heard from anyone), and how
    /// many of them count as alive: all that are not down, or with `heard_since`, only those
    /// heard from since then. Per member (origin), not per identity.
    pub(super) fn census(&self, heard_since: Option<Duration>) -> (usize, usize) {
        let me = self.identity().node;
        let horizon = self.heard_last();
        let mut members: BTreeMap<NodeId, bool> = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            if m.id().node == me || self.forgotten.contains(&m.id().node) {
                continue;
            }
            let seen = self.last_seen.get(&m.id().addr).copied();
            if m.state() != foca::State::Down {
                let counts = heard_since.is_none_or(|t| seen.is_some_and(|s| s >= t));
                *members.entry(m.id().node).or_insert(false) |= counts;
            } else if seen.is_some_and(|t| horizon.saturating_sub(t) < QUORUM_WINDOW) {
                members.entry(m.id().node).or_insert(false);
            }
        }
        let alive = 1 + members.values().filter(|a| **a).count();
        (alive, 1 + members.len())
    }

    /// With `fail_static`: tell the store to hide what the membership says is down while this
    /// node sees a majority, and to hide nothing while it does not.
    pub(super) fn gate_liveness(&mut self) {
        if !self.cfg.fail_static {
            return;
        }
        let quorum = self.has_quorum();
        let target: BTreeSet<NodeId> = if quorum {
            self.want_down.keys().copied().collect()
        } else {
            // Alone: what went down around the time it stopped hearing from the others is
            // likely its own isolation, and shown; what was down well before stays hidden.
            let before = self.heard_last().saturating_sub(QUORUM_WINDOW);
            self.want_down
                .iter()
                .filter(|(_, since)| **since < before)
                .map(|(node, _)| *node)
                .collect()
        };
        if !quorum && !self.want_down.is_empty() && !self.shown_down.is_empty() {
            tracing::warn!(
                down = self.want_down.len(),
                "fewer than half of the members heard from lately are alive: this node is \
                 more likely cut off than they all dead, so it shows their records (fail static)"
            );
        }
        for node in target.difference(&self.shown_down) {
            self.out.push(Output::Liveness {
                node: *node,
                down: true,
            });
        }
        for node in self.shown_down.difference(&target) {
            self.out.push(Output::Liveness {
                node: *node,
                down: false,
            });
        }
        self.shown_down = target;
    }
}

/// The addresses under which one owner has an active identity: almost always one, so held
/// inline (a set of one allocated a whole B-tree node, about 370 bytes, per member of every
/// node's view: most of a 10,000-node simulation's memory). Empty: the owner is known and
/// down.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum LiveAddrs {
    #[default]
    None,
    One(PeerAddr),
    /// Two or more, sorted (a boxed slice: a set's 24 bytes would make every entry larger).
    Many(Box<[PeerAddr]>),
}

impl LiveAddrs {
    pub fn is_empty(&self) -> bool {
        matches!(self, LiveAddrs::None)
    }

    pub fn contains(&self, addr: &PeerAddr) -> bool {
        match self {
            LiveAddrs::None => false,
            LiveAddrs::One(a) => a == addr,
            LiveAddrs::Many(all) => all.binary_search(addr).is_ok(),
        }
    }

    pub fn insert(&mut self, addr: PeerAddr) {
        let mut all: Vec<PeerAddr> = match self {
            LiveAddrs::None => {
                *self = LiveAddrs::One(addr);
                return;
            }
            LiveAddrs::One(a) if *a == addr => return,
            LiveAddrs::One(a) => vec![*a],
            LiveAddrs::Many(all) if all.binary_search(&addr).is_ok() => return,
            LiveAddrs::Many(all) => all.to_vec(),
        };
        all.push(addr);
        all.sort();
        *self = LiveAddrs::Many(all.into_boxed_slice());
    }

    pub fn remove(&mut self, addr: &PeerAddr) {
        match self {
            LiveAddrs::None => {}
            LiveAddrs::One(a) => {
                if a == addr {
                    *self = LiveAddrs::None;
                }
            }
            LiveAddrs::Many(all) => {
                let left: Vec<PeerAddr> = all.iter().filter(|a| *a != addr).copied().collect();
                *self = match left.as_slice() {
                    [] => LiveAddrs::None,
                    [one] => LiveAddrs::One(*one),
                    _ => LiveAddrs::Many(left.into_boxed_slice()),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LiveAddrs;
    use crate::identity::PeerAddr;

    #[test]
    fn live_addresses_hold_one_inline_and_more_in_a_set() {
        let a: PeerAddr = "10.0.0.1:7000".parse().unwrap();
        let b: PeerAddr = "10.0.0.2:7000".parse().unwrap();
        let c: PeerAddr = "10.0.0.3:7000".parse().unwrap();
        let mut l = LiveAddrs::default();
        assert!(l.is_empty() && !l.contains(&a));
        l.insert(a);
        l.insert(a);
        assert_eq!(l, LiveAddrs::One(a));
        l.insert(b);
        assert!(l.contains(&a) && l.contains(&b));
        l.insert(c);
        l.insert(a);
        assert!(l.contains(&a) && l.contains(&b) && l.contains(&c));
        l.remove(&c);
        l.remove(&a);
        assert_eq!(l, LiveAddrs::One(b));
        l.remove(&a);
        assert_eq!(l, LiveAddrs::One(b));
        l.remove(&b);
        assert!(l.is_empty());
        assert!(std::mem::size_of::<LiveAddrs>() <= 24);
    }
}
