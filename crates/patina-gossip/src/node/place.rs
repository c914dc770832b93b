//! Where this node is on the network: a Vivaldi coordinate ([`crate::coords`]) kept from the
//! round trips of anti-entropy hellos (each hello carries its sender's coordinate), and the
//! coordinates peers last sent. The global tier orders regions by them where its region table
//! has no measured round trip.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::coords::{Coordinate, Vivaldi};
use crate::identity::Identity;
use crate::node::Node;
use patina_store::NodeId;

/// A peer's coordinate is forgotten when no hello brought it for this long.
const PEER_COORDINATE_TTL: Duration = Duration::from_secs(600);

/// How long a second-hand coordinate stands before a later share may replace it.
pub const SHARE_REFRESH: Duration = Duration::from_secs(5);

/// Most peers' coordinates a hello shares (besides its sender's own).
pub const SHARED_COORDINATES: usize = 8;

#[derive(Debug)]
pub(super) struct Place {
    pub(super) vivaldi: Vivaldi<NodeId>,
    /// Peers' coordinates as their last hello gave them, and when. Members only (pruned
    /// each sync round), so bounded by the membership.
    pub(super) peers: BTreeMap<NodeId, (Coordinate, Duration)>,
    /// Coordinates other peers' hellos shared (second hand), of members this node has none
    /// of first hand, and when. Used only to find near members (tree dissemination's
    /// links): never shared onward, never in [`Node::peer_coordinates`] (the global tier's
    /// region order), forgotten like the others.
    pub(super) heard: BTreeMap<NodeId, (Coordinate, Duration)>,
}

impl Place {
    pub(super) fn new(seed: u64) -> Place {
        Place {
            vivaldi: Vivaldi::new(seed),
            peers: BTreeMap::new(),
            heard: BTreeMap::new(),
        }
    }
}

impl Node {
    /// A session's hello from `peer` came back `rtt` after ours left, carrying `coordinate`.
    /// A coordinate that is not valid, or a round trip out of range, changes nothing.
    pub fn handle_coordinate_sample(
        &mut self,
        now: Duration,
        peer: Identity,
        coordinate: Coordinate,
        rtt: Duration,
    ) {
        self.now = now;
        if peer.node == self.identity().node || !coordinate.is_valid() {
            return;
        }
        if self
            .place
            .vivaldi
            .observe(peer.node, &coordinate, rtt.as_secs_f64())
        {
            self.place.peers.insert(peer.node, (coordinate, now));
        }
    }

    /// Peers' coordinates to share in this node's hellos: the nearest half of
    /// [`SHARED_COORDINATES`] known (they help a peer in this area find its neighbours,
    /// which tree dissemination links to) and the rest at random.
    pub fn coordinates_to_share(&mut self) -> Vec<(NodeId, Coordinate)> {
        let me = self.place.vivaldi.coordinate().clone();
        let mut known: Vec<(f64, NodeId)> = self
            .place
            .peers
            .iter()
            .map(|(n, (c, _))| (me.distance_to(c), *n))
            .collect();
        known.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let near = SHARED_COORDINATES / 2;
        let mut chosen: Vec<NodeId> = known.iter().take(near).map(|(_, n)| *n).collect();
        let mut rest: Vec<NodeId> = known.iter().skip(near).map(|(_, n)| *n).collect();
        while chosen.len() < SHARED_COORDINATES && !rest.is_empty() {
            let i = rand::RngExt::random_range(&mut self.rng, 0..rest.len());
            chosen.push(rest.swap_remove(i));
        }
        chosen
            .into_iter()
            .filter_map(|n| self.place.peers.get(&n).map(|(c, _)| (n, c.clone())))
            .collect()
    }

    /// Coordinates a peer's hello shared (its own, and those of up to
    /// [`SHARED_COORDINATES`] others): kept second hand (`Place::heard`) for members this
    /// node has no coordinate of first hand, never for itself; invalid ones and those past
    /// the limit are skipped. A share stands for [`SHARE_REFRESH`] before a later one may
    /// replace it (so that one member cannot keep replacing what others shared).
    pub fn handle_shared_coordinates(&mut self, now: Duration, shared: &[(NodeId, Coordinate)]) {
        self.now = now;
        let me = self.identity().node;
        let members: std::collections::BTreeSet<NodeId> =
            self.foca.iter_members().map(|m| m.id().node).collect();
        for (n, c) in shared.iter().take(SHARED_COORDINATES + 1) {
            if *n == me || !members.contains(n) || !c.is_valid() || self.place.peers.contains_key(n)
            {
                continue;
            }
            // A share replaces one at least SHARE_REFRESH old: coordinates settle over
            // minutes, and no member can steer another's faster than that.
            match self.place.heard.get(n) {
                Some((_, at)) if now.saturating_sub(*at) < SHARE_REFRESH => {}
                _ => {
                    self.place.heard.insert(*n, (c.clone(), now));
                }
            }
        }
    }

    /// A member's coordinate: first hand, else second hand.
    pub(super) fn coordinate_of(&self, node: &NodeId) -> Option<&Coordinate> {
        self.place
            .peers
            .get(node)
            .or_else(|| self.place.heard.get(node))
            .map(|(c, _)| c)
    }

    /// This node's coordinate.
    pub fn coordinate(&self) -> &Coordinate {
        self.place.vivaldi.coordinate()
    }

    /// The coordinates peers last sent, by their store's origin.
    pub fn peer_coordinates(&self) -> impl Iterator<Item = (NodeId, &Coordinate)> {
        self.place.peers.iter().map(|(n, (c, _))| (*n, c))
    }

    /// Members' recent coordinates only (called each sync round).
    pub(super) fn prune_coordinates(&mut self) {
        let now = self.now;
        let members: std::collections::BTreeSet<NodeId> =
            self.foca.iter_members().map(|m| m.id().node).collect();
        let gone: Vec<NodeId> = self
            .place
            .peers
            .iter()
            .filter(|(n, (_, at))| {
                !members.contains(n) || now.saturating_sub(*at) >= PEER_COORDINATE_TTL
            })
            .map(|(n, _)| *n)
            .collect();
        for n in gone {
            self.place.peers.remove(&n);
            self.place.vivaldi.forget(&n);
        }
        let peers = &self.place.peers;
        self.place.heard.retain(|n, (_, at)| {
            members.contains(n)
                && !peers.contains_key(n)
                && now.saturating_sub(*at) < PEER_COORDINATE_TTL
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::testing::{member, node};

    fn at(x: f64) -> Coordinate {
        let mut c = Coordinate::default();
        c.vec[0] = x;
        c
    }

    #[test]
    fn shared_coordinates_fill_in_members_only_and_never_replace_a_first_hand_one() {
        let mut n = node();
        n.assume_members(Duration::ZERO, &[member(2), member(3), member(4)]);
        let now = Duration::from_secs(1);
        // Member 2's own hello measured it.
        n.handle_coordinate_sample(now, member(2), at(0.010), Duration::from_millis(20));
        let first_hand = n.place.peers.get(&NodeId(2)).map(|(c, _)| c.clone());
        let mut bad = at(0.0);
        bad.vec[1] = f64::NAN;
        n.handle_shared_coordinates(
            now,
            &[
                (NodeId(2), at(0.5)),  // has one already
                (NodeId(3), at(0.02)), // taken
                (NodeId(4), bad),      // invalid
                (NodeId(9), at(0.03)), // not a member
                (NodeId(1), at(0.04)), // this node
            ],
        );
        // First hand only in what the node reports and shares onward; 3 second hand.
        let known: Vec<NodeId> = n.peer_coordinates().map(|(p, _)| p).collect();
        assert_eq!(known, [NodeId(2)]);
        let heard: Vec<NodeId> = n.place.heard.keys().copied().collect();
        assert_eq!(heard, [NodeId(3)]);
        assert_eq!(
            n.place.peers.get(&NodeId(2)).map(|(c, _)| c.clone()),
            first_hand
        );
        assert_eq!(n.coordinate_of(&NodeId(3)), Some(&at(0.02)));
        let shared: Vec<NodeId> = n.coordinates_to_share().iter().map(|(p, _)| *p).collect();
        assert_eq!(shared, [NodeId(2)]);
    }
}
