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

#[derive(Debug)]
pub(super) struct Place {
    pub(super) vivaldi: Vivaldi<NodeId>,
    /// Peers' coordinates as their last hello gave them, and when. Members only (pruned
    /// each sync round), so bounded by the membership.
    pub(super) peers: BTreeMap<NodeId, (Coordinate, Duration)>,
}

impl Place {
    pub(super) fn new(seed: u64) -> Place {
        Place {
            vivaldi: Vivaldi::new(seed),
            peers: BTreeMap::new(),
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
    }
}
