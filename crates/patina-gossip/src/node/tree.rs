//! Tree dissemination for a WAN ([`Dissemination::Tree`]): Plumtree's eager and lazy push
//! (Leitão, Pereira and Rodrigues, "Epidemic Broadcast Trees", 2007), one tree per origin.
//!
//! - **Eager push along the tree.** A node sends each change it first receives (or writes)
//!   to that origin's eager peers: its view (the [`TREE_NEAR`] members nearest by network
//!   coordinates or measured round trips, and [`TREE_RANDOM`] random ones) and the members
//!   that hold it in their views (they say so when they add it, and any member that pushes
//!   to it counts: links go both ways, as Plumtree's do, at most [`MAX_INBOUND`]), less those that pruned it,
//!   plus those that grafted onto it. The first change of an origin floods that graph.
//! - **Prune.** A node that receives a copy it already holds tells the sender to stop
//!   pushing that origin's changes to it (links are one-way: each node decides only whom it
//!   hears an origin from). So each node keeps, per origin, the peer whose copy came first: the tree converges to the fastest paths from that origin (per origin, so an
//!   origin on another continent is not routed through this one's parent).
//! - **Lazy push.** Each node announces each new change (an [`Item::Announce`]: 17 bytes,
//!   not the record) to [`LAZY_FANOUT`] of its links the change did not take, in a tree push
//!   of announcements (hops 0).
//! - **Graft.** A node that hears an announcement of a change it still lacks after
//!   `Config::probe_rtt` asks the announcer for it (a graft): the announcer sends it from its
//!   recent changes and pushes that origin's changes to the node from then on. A node whose
//!   announcers all failed falls back to anti-entropy (the change is noticed; its gap opens).
//!
//! Everything is bounded: origins ([`MAX_TREE_ORIGINS`], members only), links per origin,
//! the recent changes kept for grafts ([`MAX_RECENT_BYTES`], [`RECENT_AGE`]), and the
//! missing changes awaited ([`MAX_MISSING`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use patina_store::NodeId;
use rand::RngExt;

use super::{Lane, Node, TimerKind};
use crate::identity::Identity;
use crate::wire::{Item, MAX_TREE_ENTRIES, PUSH_OVERHEAD, Push, TreeControl};

/// View members chosen by network coordinates (nearest first).
pub const TREE_NEAR: usize = 4;
/// View members chosen at random (the long links that reach other continents at once).
pub const TREE_RANDOM: usize = 4;
/// Origins whose links a node keeps (each a member's: prunes and grafts that name another
/// origin are ignored). Above the largest membership a cluster is built for.
pub const MAX_TREE_ORIGINS: usize = 65_536;
/// Pruned or grafted peers kept per origin.
const MAX_LINKS: usize = 64;
/// Members that pushed to this node and are pushed to in turn (the view's other direction).
pub const MAX_INBOUND: usize = 16;
/// How long an inbound link must have been silent before, all slots taken, it gives its slot
/// to a member that asks (it goes on getting the origins it has not pruned, as a grafted
/// link: see `Node::heard_from`).
pub const INBOUND_IDLE: Duration = Duration::from_secs(60);
/// How often a node tells its view members again that it links to them (at its first sync
/// round on or after each multiple of this): a member that still holds a node in its view
/// keeps its inbound slot there alive, and one that asked while all slots were taken asks
/// again. With the default sync interval (5 s, jittered by a quarter) two refreshes are at
/// most 26.25 s apart, so one lost link fits in [`INBOUND_IDLE`]; a much longer
/// `sync_interval` stretches them. Costs each node its view's 8 small datagrams per period.
pub const LINK_REFRESH: Duration = Duration::from_secs(20);
/// Bytes of recent changes kept to answer grafts, and for how long.
pub const MAX_RECENT_BYTES: usize = 1 << 20;
pub const RECENT_AGE: Duration = Duration::from_secs(30);
/// Announced changes awaited at once, and announcers remembered per change.
pub const MAX_MISSING: usize = 4096;
const MAX_ANNOUNCERS: usize = 3;
/// Links (view and inbound, not those a change took) told of each new change.
pub const LAZY_FANOUT: usize = 8;
/// Graft answers a node sends per probe period, to all peers together, and to one peer.
pub const MAX_GRAFT_ANSWERS: u32 = 64;
pub const MAX_GRAFT_ANSWERS_PER_PEER: u32 = 8;
/// Hops a tree push may take (a backstop: a tree push is forwarded only on first receipt).
pub(super) const TREE_HOPS: u8 = 64;

/// A node's tree state.
#[derive(Debug, Default)]
pub(super) struct Tree {
    /// The base view: where an origin's changes go until a peer prunes.
    view: Vec<Identity>,
    /// The view's members chosen by coordinates.
    near: Vec<Identity>,
    /// Members that hold this node in their views (they said so, or pushed to it): links
    /// are made both ways, as Plumtree's are, so that a member that is nobody's nearest
    /// still hears its neighbours' changes first. At most [`MAX_INBOUND`], each with when it
    /// was last heard from; the first come stay while they speak; members only (pruned each
    /// sync round, in tree mode; a push-mode node ignores tree control and keeps none).
    inbound: VecDeque<(NodeId, Duration)>,
    links: BTreeMap<NodeId, Links>,
    recent: BTreeMap<(NodeId, u64), Vec<u8>>,
    recent_order: VecDeque<((NodeId, u64), Duration)>,
    recent_bytes: usize,
    missing: BTreeMap<(NodeId, u64), Missing>,
    check_armed: bool,
    /// When this node last told its whole view that it links to them ([`LINK_REFRESH`]).
    links_told_at: Option<Duration>,
    /// Active members by store origin ([`Node::member_by_node`]), rebuilt when not
    /// `members_fresh` (after a membership change, and at first).
    members: BTreeMap<NodeId, Identity>,
    members_fresh: bool,
    /// The probe period (numbered from 0) graft answers are being counted for, and how many
    /// went out in it.
    graft_window: u128,
    graft_answers: u32,
    /// Answers per member in this probe period (members only; cleared each period).
    graft_answers_to: BTreeMap<NodeId, u32>,
}

#[derive(Debug, Default)]
struct Links {
    /// Peers not to push this origin's changes to (they, or we, pruned the link).
    pruned: BTreeSet<NodeId>,
    /// Peers outside the view to push them to (they grafted).
    grafted: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct Missing {
    announcers: VecDeque<NodeId>,
    due: Duration,
}

/// Sizes of the tree state, for tests and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSizes {
    pub view: usize,
    pub origins: usize,
    pub pruned: usize,
    pub grafted: usize,
    pub recent: usize,
    pub missing: usize,
}

impl Node {
    fn tree_on(&self) -> bool {
        self.cfg.dissemination == super::Dissemination::Tree
    }

    /// Local changes, or changes first received: keep them for grafts, push them to their
    /// origins' eager peers (not `from`), and announce them to a few other links.
    pub(super) fn tree_spread(
        &mut self,
        items: Vec<(Item, Vec<u8>)>,
        from: Option<NodeId>,
        hops: u8,
    ) {
        let now = self.now;
        // Per origin: the encoded items, and the announcements of its records.
        type Encoded = Vec<Vec<u8>>;
        let mut by_origin: BTreeMap<NodeId, (Encoded, Encoded)> = BTreeMap::new();
        for (item, bytes) in items {
            let id = (item.origin(), item.seq());
            self.tree.missing.remove(&id);
            self.tree.remember(id, &bytes, now);
            let entry = by_origin.entry(id.0).or_default();
            // Only a record is announced: a notice's holder lacks the record too.
            if matches!(item, Item::Record(_)) {
                entry.1.push(
                    Item::Announce {
                        origin: id.0,
                        seq: id.1,
                    }
                    .to_bytes(),
                );
            }
            entry.0.push(bytes);
        }
        if self.tree.view.is_empty() {
            self.refresh_tree_view();
        }
        self.refresh_tree_members();
        for (origin, (items, announces)) in by_origin {
            // Every member's origin spread has its links, so that a view change keeps its
            // children.
            if self.member_origin(origin) {
                let _ = self.tree.link(origin);
            }
            let targets: Vec<Identity> = self
                .tree
                .eager(origin, &self.tree.members)
                .into_iter()
                .filter(|t| Some(t.node) != from && t.node != origin)
                .collect();
            if hops > 0 {
                self.send_tree_push(items, &targets, hops);
            } else {
                // No hops left (a backstop, or a sender that set them so): records would be
                // dropped there; the eager peers hear of them and graft instead.
                self.send_tree_push(announces.clone(), &targets, 0);
            }
            // The lazy path: a few of the links this origin's changes do not take (those
            // that pruned) hear that this node holds them, so that one whose parent is gone
            // grafts onto it.
            let mut lazy: Vec<Identity> = self
                .tree
                .links(&self.tree.members)
                .into_iter()
                .filter(|m| {
                    Some(m.node) != from && m.node != origin && !targets.iter().any(|t| t == m)
                })
                .collect();
            for i in 0..LAZY_FANOUT.min(lazy.len()) {
                let j = self.rng.random_range(i..lazy.len());
                lazy.swap(i, j);
            }
            lazy.truncate(LAZY_FANOUT);
            self.send_tree_push(announces, &lazy, 0);
        }
    }

    /// Pack `items` (of one origin) into tree pushes to `targets`.
    fn send_tree_push(&mut self, items: Vec<Vec<u8>>, targets: &[Identity], hops: u8) {
        if targets.is_empty() || items.is_empty() {
            return;
        }
        let room = self
            .cfg
            .max_datagram
            .saturating_sub(self.envelope.overhead() + PUSH_OVERHEAD);
        let me = self.identity().node;
        let mut packets = vec![Vec::new()];
        let mut used = 0;
        for item in items {
            if item.len() + 2 > room {
                continue; // cannot happen: items are sized by `max_item`
            }
            if used + item.len() + 2 > room {
                packets.push(Vec::new());
                used = 0;
            }
            used += item.len() + 2;
            packets.last_mut().expect("one packet").push(item);
        }
        for items in packets.into_iter().filter(|p| !p.is_empty()) {
            let mut payload = Vec::new();
            Push {
                sender: me,
                hops,
                tree: true,
                items,
            }
            .encode(&mut payload);
            let mut bytes = Vec::with_capacity(payload.len() + self.envelope.overhead());
            self.envelope.seal(&payload, &mut bytes);
            for t in targets {
                self.send(t.push_addr(), bytes.clone(), Lane::Push);
            }
        }
    }

    /// A tree push arrived: new items spread on; a copy we already held prunes its sender
    /// for that origin.
    pub(super) fn handle_tree_push(&mut self, push: Push) {
        let Some(sender) = self.member_by_node(push.sender) else {
            self.count(|c| c.tree_from_strangers += 1);
            return;
        };
        let mut fresh = Vec::new();
        let mut announced = Vec::new();
        let mut stale_origins = BTreeSet::new();
        let mut readable = false;
        let me = self.identity().node;
        {
            let mut s = self.shared.lock().expect("gossip shared state");
            for bytes in push.items {
                match Item::decode(&bytes) {
                    Err(_) => s.counters.dropped_decode += 1,
                    // The lazy path: the sender holds this version.
                    Ok(Item::Announce { origin, seq }) => {
                        readable = true;
                        if origin != me && !s.knows(origin, seq) && s.origins.contains(&origin) {
                            s.counters.announces_new += 1;
                            announced.push((origin, seq));
                        }
                    }
                    // Only announcements travel with no hops left: a record there would be
                    // taken and not passed on, and its honest copy, arriving second, would
                    // prune this node's real parent.
                    Ok(_) if push.hops == 0 => s.counters.dropped_decode += 1,
                    // Our own change come back: a copy we hold (the mirror of the store's
                    // digest learns our own changes only through sessions).
                    Ok(item) if item.origin() == me => {
                        stale_origins.insert(item.origin());
                    }
                    // A record, or a notice of one too large for a datagram (taking it
                    // notes the version; `deliver` opens its gap).
                    Ok(item) => {
                        if s.take(&item) {
                            fresh.push((item, bytes));
                        } else if s.holds(&item) {
                            // A duplicate. Not one refused for want of room (pending full, an
                            // origin no member names): its sender may be our only parent.
                            stale_origins.insert(item.origin());
                        }
                    }
                }
            }
        }
        // A sender whose push held anything this node could read links to it.
        if readable || !fresh.is_empty() || !stale_origins.is_empty() {
            self.heard_from(sender.node, false);
        }
        for (origin, seq) in announced {
            self.tree_announced(origin, seq, Some(sender));
        }
        let origins: Vec<NodeId> = stale_origins
            .into_iter()
            .filter(|o| !fresh.iter().any(|(i, _)| i.origin() == *o))
            .collect();
        if !origins.is_empty() {
            // Only the sender stops: it may be our child in that origin's tree (its copy came
            // to it first by another path, and it passed it on to us), and it prunes us
            // itself if ours reaches it second. Unlinking it here too once left such a child
            // with no parent at all.
            self.count(|c| c.tree_prunes_sent += 1);
            let me = self.identity().node;
            self.send_control(
                sender,
                TreeControl::Prune {
                    sender: me,
                    origins: origins.into_iter().take(MAX_TREE_ENTRIES).collect(),
                },
            );
        }
        if fresh.is_empty() {
            return;
        }
        let items: Vec<Item> = fresh.iter().map(|(i, _)| i.clone()).collect();
        if self.tree_on() {
            self.tree_spread(fresh, Some(sender.node), push.hops.saturating_sub(1));
        } else {
            // A member spreading by random pushes (a cluster being switched over): pass the
            // changes on its own way, so that its push-mode peers get them too.
            let queue = !self
                .shared
                .lock()
                .expect("gossip shared state")
                .backlog_full;
            let bytes: Vec<Vec<u8>> = fresh.into_iter().map(|(_, b)| b).collect();
            if queue {
                for b in &bytes {
                    let _ = self.foca.add_broadcast(b);
                }
            }
            self.push(
                bytes,
                self.cfg.push_hops,
                self.cfg.forward_fanout.get(),
                Some(sender.addr()),
            );
            self.update_backlog();
        }
        self.deliver(items, Some(sender));
    }

    /// A prune or a graft arrived.
    pub(super) fn handle_tree_control(&mut self, msg: TreeControl) {
        if !self.tree_on() {
            // No trees here (a member spreading by random pushes): nothing to link, prune or
            // answer from, and no state for a peer to fill.
            self.count(|c| c.dropped_decode += 1);
            return;
        }
        match msg {
            TreeControl::Prune { sender, origins } => {
                if self.member_by_node(sender).is_none() {
                    self.count(|c| c.tree_from_strangers += 1);
                    return;
                }
                self.count(|c| c.tree_prunes_received += 1);
                for o in origins {
                    if !self.member_origin(o) {
                        continue;
                    }
                    if let Some(l) = self.tree.link(o) {
                        l.unlink(sender);
                    }
                }
            }
            TreeControl::Link { sender } => {
                if self.member_by_node(sender).is_none() {
                    self.count(|c| c.tree_from_strangers += 1);
                    return;
                }
                self.heard_from(sender, true);
            }
            TreeControl::Graft { sender, versions } => {
                let Some(peer) = self.member_by_node(sender) else {
                    self.count(|c| c.tree_from_strangers += 1);
                    return;
                };
                self.count(|c| c.tree_grafts_received += 1);
                // A graft costs its sender one small datagram: the answer is one datagram of
                // changes (whatever origins they are of), and at most MAX_GRAFT_ANSWERS
                // answers go out per probe period, MAX_GRAFT_ANSWERS_PER_PEER to one member,
                // counted only when something is sent: no member can turn this node into an
                // amplifier, nor spend the budget others' repairs need.
                let period = self.cfg.probe_period.as_nanos().max(1);
                let window = self.now.as_nanos() / period;
                if self.tree.graft_window != window {
                    self.tree.graft_window = window;
                    self.tree.graft_answers = 0;
                    self.tree.graft_answers_to.clear();
                }
                let to_peer = self
                    .tree
                    .graft_answers_to
                    .get(&sender)
                    .copied()
                    .unwrap_or(0);
                if self.tree.graft_answers >= MAX_GRAFT_ANSWERS
                    || to_peer >= MAX_GRAFT_ANSWERS_PER_PEER
                {
                    self.count(|c| c.tree_grafts_refused += 1);
                    return;
                }
                let room = self
                    .cfg
                    .max_datagram
                    .saturating_sub(self.envelope.overhead() + PUSH_OVERHEAD);
                let mut items: Vec<Vec<u8>> = Vec::new();
                let mut used = 0;
                let mut seen = BTreeSet::new();
                for (o, seq) in versions {
                    if !self.member_origin(o) || !seen.insert((o, seq)) {
                        continue;
                    }
                    if let Some(l) = self.tree.link(o) {
                        l.graft(sender);
                    }
                    if let Some(bytes) = self.tree.recent.get(&(o, seq))
                        && used + bytes.len() + 2 <= room
                    {
                        used += bytes.len() + 2;
                        items.push(bytes.clone());
                    }
                }
                if !items.is_empty() {
                    self.tree.graft_answers += 1;
                    *self.tree.graft_answers_to.entry(sender).or_default() += 1;
                    self.send_tree_push(items, &[peer], TREE_HOPS);
                }
            }
        }
    }

    /// An announcement of a version we lack arrived from `from`: wait a round trip for the
    /// tree to bring it, then graft.
    pub(super) fn tree_announced(&mut self, origin: NodeId, seq: u64, from: Option<Identity>) {
        let Some(from) = from else { return };
        if origin == self.identity().node {
            return;
        }
        let due = self.now + self.cfg.probe_rtt;
        let tree = &mut self.tree;
        let room = tree.missing.len() < MAX_MISSING;
        match tree.missing.get_mut(&(origin, seq)) {
            Some(m) => {
                if m.announcers.len() < MAX_ANNOUNCERS && !m.announcers.contains(&from.node) {
                    m.announcers.push_back(from.node);
                }
            }
            None if room => {
                tree.missing.insert(
                    (origin, seq),
                    Missing {
                        announcers: VecDeque::from([from.node]),
                        due,
                    },
                );
            }
            None => {
                // Too many awaited: anti-entropy fetches it.
                let mut s = self.shared.lock().expect("gossip shared state");
                s.notice(origin, seq);
                drop(s);
                self.arm_gap_check();
            }
        }
        if !self.tree.check_armed && !self.tree.missing.is_empty() {
            self.tree.check_armed = true;
            self.schedule(self.cfg.probe_rtt, TimerKind::TreeCheck);
        }
    }

    /// Graft for awaited versions whose wait ran out; re-arm for the rest.
    pub(super) fn tree_check(&mut self) {
        self.tree.check_armed = false;
        let now = self.now;
        let due: Vec<(NodeId, u64)> = {
            let s = self.shared.lock().expect("gossip shared state");
            self.tree.missing.retain(|(o, seq), _| !s.knows(*o, *seq));
            self.tree
                .missing
                .iter()
                .filter(|(_, m)| m.due <= now)
                .map(|(k, _)| *k)
                .collect()
        };
        let mut grafts: BTreeMap<NodeId, Vec<(NodeId, u64)>> = BTreeMap::new();
        let mut exhausted = Vec::new();
        for id in due {
            let Some(m) = self.tree.missing.get_mut(&id) else {
                continue;
            };
            match m.announcers.pop_front() {
                Some(peer) => {
                    m.due = now + self.cfg.probe_rtt;
                    grafts.entry(peer).or_default().push(id);
                }
                None => exhausted.push(id),
            }
        }
        if !exhausted.is_empty() {
            let mut s = self.shared.lock().expect("gossip shared state");
            for id in &exhausted {
                self.tree.missing.remove(id);
                s.notice(id.0, id.1);
            }
            drop(s);
            self.arm_gap_check();
        }
        let me = self.identity().node;
        for (peer, versions) in grafts {
            let Some(peer) = self.member_by_node(peer) else {
                continue;
            };
            for chunk in versions.chunks(MAX_TREE_ENTRIES) {
                self.count(|c| c.tree_grafts_sent += 1);
                self.send_control(
                    peer,
                    TreeControl::Graft {
                        sender: me,
                        versions: chunk.to_vec(),
                    },
                );
            }
        }
        if let Some(next) = self.tree.missing.values().map(|m| m.due).min() {
            self.tree.check_armed = true;
            self.schedule(next.saturating_sub(now), TimerKind::TreeCheck);
        }
    }

    fn send_control(&mut self, to: Identity, msg: TreeControl) {
        let mut payload = Vec::new();
        msg.encode(&mut payload);
        let mut bytes = Vec::with_capacity(payload.len() + self.envelope.overhead());
        self.envelope.seal(&payload, &mut bytes);
        self.send(to.push_addr(), bytes, Lane::Push);
    }

    /// Is `origin` the store origin of a member this node sees up (itself included)?
    fn member_origin(&self, origin: NodeId) -> bool {
        self.shared
            .lock()
            .expect("gossip shared state")
            .origins
            .contains(&origin)
    }

    /// The active member whose store origin is `node` (from the index, not a scan).
    fn member_by_node(&mut self, node: NodeId) -> Option<Identity> {
        self.refresh_tree_members();
        self.tree.members.get(&node).copied()
    }

    /// Rebuild the index of active members by origin if the membership changed since: one
    /// pass per membership change, not one per datagram (10,000 members are 10,000
    /// comparisons).
    fn refresh_tree_members(&mut self) {
        if !self.tree.members_fresh {
            self.tree.members = self
                .foca
                .iter_members()
                .map(|m| (m.id().node, *m.id()))
                .collect();
            self.tree.members_fresh = true;
        }
    }

    /// The membership changed: the index of members by origin is rebuilt when next used.
    pub(super) fn tree_members_changed(&mut self) {
        self.tree.members_fresh = false;
    }

    /// `peer` pushed to this node, or (`linked`) said it holds it in its view: push to it in
    /// turn. All [`MAX_INBOUND`] slots taken, a member that says it holds this node in its
    /// view (a push alone does not) takes the slot of the longest silent link if that one
    /// has been silent for [`INBOUND_IDLE`], and the replacement is counted; otherwise the
    /// first come stay (a member cannot churn out links that speak by naming new ones).
    ///
    /// A link given up goes on getting every origin it has not pruned, as a grafted link
    /// (as a member leaving the view does): it may have taken this node as its parent for
    /// some origins and pruned the others, so dropping it outright would leave it waiting
    /// for grafts. It prunes the grafts it does not need as before, on their first duplicate;
    /// its prunes, of a member no longer a link, are forgotten.
    fn heard_from(&mut self, peer: NodeId, linked: bool) {
        if !self.tree_on() {
            return;
        }
        let now = self.now;
        if self.tree.view.iter().any(|m| m.node == peer) {
            return;
        }
        if let Some(slot) = self.tree.inbound.iter_mut().find(|(p, _)| *p == peer) {
            slot.1 = now;
            return;
        }
        if self.tree.inbound.len() >= MAX_INBOUND {
            if !linked {
                return;
            }
            let Some((i, _)) = self
                .tree
                .inbound
                .iter()
                .enumerate()
                .filter(|(_, (_, at))| now.saturating_sub(*at) >= INBOUND_IDLE)
                .min_by_key(|(_, (_, at))| *at)
            else {
                return;
            };
            let Some((old, _)) = self.tree.inbound.remove(i) else {
                return;
            };
            self.tree.demote(old);
            self.count(|c| c.tree_inbound_replaced += 1);
        }
        self.tree.inbound.push_back((peer, now));
    }

    /// Choose the view again (each sync round): the nearest members by coordinates, then
    /// the random ones chosen before that are still members, topped up at random. Links of
    /// origins and peers that are no longer members are forgotten, and old recent changes.
    pub(super) fn refresh_tree_view(&mut self) {
        if !self.tree_on() {
            return;
        }
        let members: Vec<Identity> = self.foca.iter_members().map(|m| *m.id()).collect();
        let nodes: BTreeSet<NodeId> = members.iter().map(|m| m.node).collect();
        let me = self.place.vivaldi.coordinate().clone();
        // A round trip this node measured (its sessions' hellos) beats one its coordinates
        // estimate: coordinates take many samples to settle, and rank near peers poorly until
        // they have.
        let mut near: Vec<(f64, Identity)> = members
            .iter()
            .filter_map(|m| {
                let measured = self.place.vivaldi.measured(&m.node);
                let estimated = self.coordinate_of(&m.node).map(|c| me.distance_to(c));
                measured.or(estimated).map(|d| (d, *m))
            })
            .collect();
        near.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.node.cmp(&b.1.node)));
        // Hysteresis: a near member stays while it is among the 2 × TREE_NEAR nearest, so
        // that coordinates drifting by a few milliseconds do not keep changing the view (each
        // new link costs a duplicate and a prune per origin).
        let keep: Vec<Identity> = near
            .iter()
            .take(2 * TREE_NEAR)
            .map(|(_, m)| *m)
            .filter(|m| self.tree.near.contains(m))
            .take(TREE_NEAR)
            .collect();
        let mut view = keep;
        for (_, m) in &near {
            if view.len() >= TREE_NEAR {
                break;
            }
            if !view.contains(m) {
                view.push(*m);
            }
        }
        let old_near = std::mem::replace(&mut self.tree.near, view.clone());
        let old_random: Vec<Identity> = self
            .tree
            .view
            .iter()
            .filter(|m| members.contains(m) && !view.contains(m) && !old_near.contains(m))
            .copied()
            .collect();
        for m in old_random {
            if view.len() < TREE_NEAR + TREE_RANDOM {
                view.push(m);
            }
        }
        let mut pool: Vec<Identity> = members
            .iter()
            .filter(|m| !view.contains(m))
            .copied()
            .collect();
        while view.len() < TREE_NEAR + TREE_RANDOM && !pool.is_empty() {
            let i = self.rng.random_range(0..pool.len());
            view.push(pool.swap_remove(i));
        }
        // A member leaving the view may be a child in some origin's tree (it pruned every
        // other parent): it stays linked, as if it had grafted, until it prunes.
        let left: Vec<NodeId> = self
            .tree
            .view
            .iter()
            .filter(|m| nodes.contains(&m.node) && !view.contains(m))
            .map(|m| m.node)
            .collect();
        for p in left {
            self.tree.demote(p);
        }
        // New view members hear that this node links to them, so that they link back at once
        // (a member nobody holds in its view would miss every origin's first change).
        let added: Vec<Identity> = view
            .iter()
            .filter(|m| !self.tree.view.contains(m))
            .copied()
            .collect();
        self.tree.view = view;
        let me = self.identity().node;
        let now = self.now;
        let tell = match self.tree.links_told_at {
            Some(at) if now.saturating_sub(at) < LINK_REFRESH => added,
            told => {
                // The next one is due a period after this one was, not after this round:
                // the rounds' delays do not add up (unless a whole period was missed).
                let due = told
                    .map(|at| at + LINK_REFRESH)
                    .filter(|d| now < *d + LINK_REFRESH);
                self.tree.links_told_at = Some(due.unwrap_or(now));
                self.tree.view.clone()
            }
        };
        for m in tell {
            self.send_control(m, TreeControl::Link { sender: me });
        }
        // A member now in the view needs no inbound slot.
        let in_view: BTreeSet<NodeId> = self.tree.view.iter().map(|m| m.node).collect();
        self.tree
            .inbound
            .retain(|(p, _)| nodes.contains(p) && !in_view.contains(p));
        self.tree.links.retain(|o, _| nodes.contains(o));
        // A prune only takes a link (view or inbound) out of an origin's pushes: one by a
        // member that is no link (any more) does nothing, and would take the room of those
        // that do (MAX_LINKS).
        let linked: BTreeSet<NodeId> = in_view
            .iter()
            .copied()
            .chain(self.tree.inbound.iter().map(|(p, _)| *p))
            .collect();
        for l in self.tree.links.values_mut() {
            l.pruned.retain(|p| linked.contains(p));
            l.grafted.retain(|p| nodes.contains(p));
        }
        self.tree.expire_recent(now);
    }

    /// Whom this node pushes `origin`'s changes to now (its children in that origin's tree,
    /// once the tree has formed).
    pub fn tree_targets(&self, origin: NodeId) -> Vec<Identity> {
        let members: BTreeMap<NodeId, Identity> = self
            .foca
            .iter_members()
            .map(|m| (m.id().node, *m.id()))
            .collect();
        self.tree
            .eager(origin, &members)
            .into_iter()
            .filter(|m| m.node != origin)
            .collect()
    }

    pub fn tree_sizes(&self) -> TreeSizes {
        TreeSizes {
            view: self.tree.view.len(),
            origins: self.tree.links.len(),
            pruned: self.tree.links.values().map(|l| l.pruned.len()).sum(),
            grafted: self.tree.links.values().map(|l| l.grafted.len()).sum(),
            recent: self.tree.recent.len(),
            missing: self.tree.missing.len(),
        }
    }
}

impl Tree {
    /// This origin's links, made if there is room.
    fn link(&mut self, origin: NodeId) -> Option<&mut Links> {
        if !self.links.contains_key(&origin) && self.links.len() >= MAX_TREE_ORIGINS {
            return None;
        }
        Some(self.links.entry(origin).or_default())
    }

    /// Whom `origin`'s changes go to: the view less the pruned, plus the grafted (members
    /// only).
    fn eager(&self, origin: NodeId, members: &BTreeMap<NodeId, Identity>) -> Vec<Identity> {
        let links = self.links.get(&origin);
        let mut out = self.links(members);
        out.retain(|m| !links.is_some_and(|l| l.pruned.contains(&m.node)));
        if let Some(l) = links {
            for p in &l.grafted {
                if let Some(m) = members.get(p)
                    && !out.contains(m)
                {
                    out.push(*m);
                }
            }
        }
        out
    }

    /// Every link of this node (view and inbound), members only.
    fn links(&self, members: &BTreeMap<NodeId, Identity>) -> Vec<Identity> {
        let mut out: Vec<Identity> = self
            .view
            .iter()
            .map(|m| m.node)
            .chain(self.inbound.iter().map(|(p, _)| *p))
            .filter_map(|m| members.get(&m).copied())
            .collect();
        out.sort_by_key(|m| m.node);
        out.dedup();
        out
    }

    /// `peer` is a link no more (it left the view, or gave its inbound slot up): it goes on
    /// getting every origin whose links this node keeps and that it has not pruned, as a
    /// grafted link (it may be a child there); its prunes, of a link no more, are forgotten.
    fn demote(&mut self, peer: NodeId) {
        for l in self.links.values_mut() {
            if !l.pruned.remove(&peer) {
                l.graft(peer);
            }
        }
    }

    fn remember(&mut self, id: (NodeId, u64), bytes: &[u8], now: Duration) {
        if self.recent.contains_key(&id) {
            return;
        }
        self.recent.insert(id, bytes.to_vec());
        self.recent_order.push_back((id, now));
        self.recent_bytes += bytes.len();
        self.expire_recent(now);
    }

    fn expire_recent(&mut self, now: Duration) {
        while let Some((id, at)) = self.recent_order.front().copied() {
            if self.recent_bytes <= MAX_RECENT_BYTES && now.saturating_sub(at) < RECENT_AGE {
                break;
            }
            self.recent_order.pop_front();
            if let Some(b) = self.recent.remove(&id) {
                self.recent_bytes -= b.len();
            }
        }
    }
}

impl Links {
    fn unlink(&mut self, peer: NodeId) {
        self.grafted.remove(&peer);
        if self.pruned.len() < MAX_LINKS {
            self.pruned.insert(peer);
        }
    }

    fn graft(&mut self, peer: NodeId) {
        self.pruned.remove(&peer);
        if self.grafted.len() < MAX_LINKS {
            self.grafted.insert(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use patina_store::{Hlc, Record, Version};

    use super::*;
    use crate::envelope::ClusterName;
    use crate::node::testing::member;
    use crate::node::{Config, Dissemination, Output};

    /// A tree node (member 1) with members 2 to 40.
    fn tree_node() -> Node {
        let cfg = Config {
            dissemination: Dissemination::Tree,
            ..Config::lan(ClusterName::new("unit").expect("a name"))
        };
        let mut n = Node::new(member(1), cfg, BTreeMap::new(), Vec::new(), 7);
        let others: Vec<Identity> = (2..=40).map(member).collect();
        n.assume_members(Duration::ZERO, &others);
        let _ = n.drain();
        n
    }

    fn record(origin: u64, seq: u64) -> Record {
        Record {
            key: format!("m{origin}-{seq}").into(),
            group: "web".into(),
            value: Some(Arc::from(&b"+v"[..])),
            version: Version {
                hlc: Hlc(seq),
                origin: NodeId(origin),
                seq,
            },
        }
    }

    /// A datagram from `payload` (encoded without its envelope) arrives on the push socket.
    fn arrive(n: &mut Node, ms: u64, payload: Vec<u8>) {
        let mut bytes = Vec::new();
        n.envelope.seal(&payload, &mut bytes);
        n.handle_datagram_on(Duration::from_millis(ms), &bytes, Lane::Push);
    }

    fn tree_push(from: u8, hops: u8, items: Vec<Item>) -> Vec<u8> {
        let mut out = Vec::new();
        Push {
            sender: member(from).node,
            hops,
            tree: true,
            items: items.iter().map(Item::to_bytes).collect(),
        }
        .encode(&mut out);
        out
    }

    fn control(msg: TreeControl) -> Vec<u8> {
        let mut out = Vec::new();
        msg.encode(&mut out);
        out
    }

    /// The datagrams the node sent since the last call, by destination.
    fn sent(n: &mut Node) -> Vec<(SocketAddr, Vec<u8>)> {
        n.drain()
            .into_iter()
            .filter_map(|o| match o {
                Output::Send { to, bytes, .. } => Some((to, bytes)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_duplicate_prunes_its_sender_and_one_refused_for_want_of_room_does_not() {
        let mut n = tree_node();
        arrive(&mut n, 1, tree_push(3, 5, vec![Item::Record(record(2, 1))]));
        let first = sent(&mut n);
        assert!(!first.is_empty(), "a fresh change is passed on");
        assert_eq!(n.counters().tree_prunes_sent, 0);
        arrive(&mut n, 2, tree_push(4, 5, vec![Item::Record(record(2, 1))]));
        let _ = sent(&mut n);
        assert_eq!(
            n.counters().tree_prunes_sent,
            1,
            "the duplicate's sender is pruned"
        );
        // Pending full: a new version is refused, and its sender (maybe our only parent)
        // is not pruned.
        {
            let mut s = n.shared.lock().unwrap();
            for i in 0..crate::node::MAX_PENDING as u64 {
                s.pending.insert((NodeId(9), i + 1));
            }
        }
        arrive(&mut n, 3, tree_push(5, 5, vec![Item::Record(record(2, 2))]));
        let _ = sent(&mut n);
        assert_eq!(n.counters().tree_prunes_sent, 1);
    }

    #[test]
    fn records_in_a_tree_push_with_no_hops_left_are_dropped() {
        let mut n = tree_node();
        arrive(&mut n, 1, tree_push(3, 0, vec![Item::Record(record(2, 1))]));
        let out = n.drain();
        assert!(
            !out.iter().any(|o| matches!(o, Output::Apply { .. })),
            "taken: {out:?}"
        );
        assert!(!n.shared.lock().unwrap().knows(NodeId(2), 1));
        // An announcement with no hops left is what such a push is for.
        arrive(
            &mut n,
            2,
            tree_push(
                3,
                0,
                vec![Item::Announce {
                    origin: NodeId(2),
                    seq: 1,
                }],
            ),
        );
        assert_eq!(n.tree_sizes().missing, 1);
    }

    /// The view members a node sent a link to since the last call.
    fn links_sent(n: &mut Node) -> BTreeSet<SocketAddr> {
        let out = sent(n);
        out.into_iter()
            .filter(|(_, b)| {
                n.envelope
                    .open(b)
                    .is_ok_and(|p| p.first() == Some(&crate::wire::KIND_LINK))
            })
            .map(|(a, _)| a)
            .collect()
    }

    #[test]
    fn a_node_tells_its_view_again_every_link_refresh() {
        let mut n = tree_node();
        n.now = Duration::from_secs(1);
        n.refresh_tree_view();
        let view: BTreeSet<SocketAddr> = n.tree.view.iter().map(|m| m.push_addr()).collect();
        assert_eq!(view.len(), TREE_NEAR + TREE_RANDOM);
        assert_eq!(links_sent(&mut n), view, "a new view is told at once");
        // The same view, rounds later: nothing until LINK_REFRESH has passed.
        for s in [6, 11, 16, 20] {
            n.now = Duration::from_secs(s);
            n.refresh_tree_view();
            assert!(links_sent(&mut n).is_empty(), "at {s} s");
        }
        // A round a little late: every view member is told again, and the next is due a
        // period after this one was due, not after the late round.
        n.now = Duration::from_secs(4) + LINK_REFRESH;
        n.refresh_tree_view();
        let kept: BTreeSet<SocketAddr> = n.tree.view.iter().map(|m| m.push_addr()).collect();
        assert_eq!(links_sent(&mut n), kept, "every view member is told again");
        n.now = Duration::from_secs(9) + LINK_REFRESH;
        n.refresh_tree_view();
        assert!(links_sent(&mut n).is_empty(), "once per period");
        n.now = Duration::from_secs(1) + 2 * LINK_REFRESH;
        n.refresh_tree_view();
        assert_eq!(links_sent(&mut n), kept, "due two periods after the first");
    }

    #[test]
    fn inbound_links_are_first_come_and_bounded() {
        let mut n = tree_node();
        for from in 2..=40u8 {
            arrive(
                &mut n,
                u64::from(from),
                control(TreeControl::Link {
                    sender: member(from).node,
                }),
            );
        }
        let inbound: Vec<u64> = n.tree.inbound.iter().map(|(p, _)| p.0).collect();
        let first: Vec<u64> = (2..2 + MAX_INBOUND as u64).collect();
        assert_eq!(inbound, first, "the first come stay");
        // Strangers are not linked.
        arrive(
            &mut n,
            50,
            control(TreeControl::Link {
                sender: NodeId(999),
            }),
        );
        assert_eq!(n.counters().tree_from_strangers, 1);
    }

    #[test]
    fn a_silent_inbound_link_gives_its_slot_up_and_stays_linked_where_not_pruned() {
        let mut n = tree_node();
        n.refresh_tree_view();
        let outside: Vec<u8> = (2..=39u8)
            .filter(|m| !n.tree.view.contains(&member(*m)))
            .collect();
        let link = |n: &mut Node, ms: u64, from: u8| {
            arrive(
                n,
                ms,
                control(TreeControl::Link {
                    sender: member(from).node,
                }),
            )
        };
        let inbound =
            |n: &Node| -> Vec<u8> { n.tree.inbound.iter().map(|(p, _)| p.0 as u8).collect() };
        // Linked at 10, 11, ... ms.
        for (i, &m) in outside[..MAX_INBOUND].iter().enumerate() {
            link(&mut n, 10 + i as u64, m);
        }
        assert_eq!(inbound(&n), outside[..MAX_INBOUND]);
        // The second speaks again (a change of origin 40: the node keeps links for it); the
        // first prunes that origin.
        arrive(
            &mut n,
            30,
            tree_push(outside[1], 5, vec![Item::Record(record(40, 1))]),
        );
        arrive(
            &mut n,
            31,
            control(TreeControl::Prune {
                sender: member(outside[0]).node,
                origins: vec![NodeId(40)],
            }),
        );
        let _ = sent(&mut n);
        // Before a minute of silence, the first come stay.
        link(&mut n, 59_000, outside[16]);
        assert_eq!(inbound(&n), outside[..MAX_INBOUND]);
        // A push alone, even after a minute, takes no slot that is taken.
        let announce = vec![Item::Announce {
            origin: NodeId(40),
            seq: 1,
        }];
        arrive(&mut n, 60_010, tree_push(outside[18], 0, announce));
        assert_eq!(inbound(&n), outside[..MAX_INBOUND]);
        assert_eq!(n.counters().tree_inbound_replaced, 0);
        // A member that links to this node takes the slot of the longest silent (the first,
        // then the third: the second spoke at 30 ms), one per member that asks.
        link(&mut n, 60_015, outside[16]);
        link(&mut n, 60_016, outside[17]);
        let now = inbound(&n);
        assert_eq!(n.counters().tree_inbound_replaced, 2);
        assert_eq!(now.len(), MAX_INBOUND);
        assert!(now.contains(&outside[1]), "{now:?}");
        assert!(now.ends_with(&[outside[16], outside[17]]), "{now:?}");
        assert!(!now.contains(&outside[0]) && !now.contains(&outside[2]));
        assert!(
            !n.tree.links[&NodeId(40)]
                .pruned
                .contains(&member(outside[0]).node),
            "the prune of a member no longer a link is forgotten"
        );
        // The next change of origin 40 goes to the new links and, grafted, to the one given
        // up that had not pruned it; not to the one that had.
        arrive(
            &mut n,
            60_100,
            tree_push(outside[1], 5, vec![Item::Record(record(40, 2))]),
        );
        let out = sent(&mut n);
        let got = |m: u8| {
            pushes_to(&n, &out, m)
                .iter()
                .any(|(_, items)| items.iter().any(|i| matches!(i, Item::Record(_))))
        };
        assert!(got(outside[16]) && got(outside[17]));
        assert!(
            got(outside[2]),
            "a link given up stays grafted where it did not prune"
        );
        assert!(!got(outside[0]), "nor where it did");
        assert!(!got(outside[1]), "not back to its sender");
    }

    #[test]
    fn prunes_and_grafts_keep_link_state_only_for_members_origins() {
        let mut n = tree_node();
        arrive(
            &mut n,
            1,
            control(TreeControl::Prune {
                sender: member(3).node,
                origins: (500..564).map(NodeId).collect(),
            }),
        );
        arrive(
            &mut n,
            2,
            control(TreeControl::Graft {
                sender: member(3).node,
                versions: (600..664).map(|o| (NodeId(o), 1)).collect(),
            }),
        );
        assert_eq!(n.tree_sizes().origins, 0);
        arrive(
            &mut n,
            3,
            control(TreeControl::Prune {
                sender: member(3).node,
                origins: vec![member(2).node],
            }),
        );
        assert_eq!(n.tree_sizes().origins, 1);
    }

    /// The tree pushes `n` sent to `to` since the last call, opened: (hops, items).
    fn sent_to(n: &mut Node, to: u8) -> Vec<(u8, Vec<Item>)> {
        let out = sent(n);
        pushes_to(n, &out, to)
    }

    /// The tree pushes in `sent` to `to`, opened: (hops, items).
    fn pushes_to(n: &Node, sent: &[(SocketAddr, Vec<u8>)], to: u8) -> Vec<(u8, Vec<Item>)> {
        sent.iter()
            .filter(|(a, _)| *a == member(to).push_addr())
            .filter_map(|(_, b)| {
                let payload = n.envelope.open(b).ok()?;
                let (kind, body) = payload.split_first()?;
                (*kind == crate::wire::KIND_TREE_PUSH).then_some(())?;
                let push = Push::decode(body, true).ok()?;
                let items = push
                    .items
                    .iter()
                    .filter_map(|i| Item::decode(i).ok())
                    .collect();
                Some((push.hops, items))
            })
            .collect()
    }

    #[test]
    fn graft_answers_are_one_datagram_of_any_origins_and_bounded_per_peer_and_period() {
        let mut n = tree_node();
        n.handle_local(Duration::from_millis(1), &[record(1, 1), record(1, 2)]);
        for origin in 2..=6u64 {
            arrive(
                &mut n,
                1,
                tree_push(7, 5, vec![Item::Record(record(origin, 1))]),
            );
        }
        let _ = sent(&mut n);
        let versions: Vec<(NodeId, u64)> = [(1, 1), (1, 2), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1)]
            .iter()
            .map(|(o, s)| (NodeId(*o), *s))
            .collect();
        let graft = |from: u8, versions: &[(NodeId, u64)]| {
            control(TreeControl::Graft {
                sender: member(from).node,
                versions: versions.to_vec(),
            })
        };
        // Seven versions of six origins: one datagram.
        arrive(&mut n, 2, graft(3, &versions));
        let out = sent(&mut n);
        let answers = pushes_to(&n, &out, 3);
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0].1.len(), 7);
        // A graft of a version this node lacks costs it nothing, and spends no budget.
        arrive(&mut n, 3, graft(21, &[(NodeId(2), 9)]));
        assert!(sent_to(&mut n, 21).is_empty());
        // One member: at most MAX_GRAFT_ANSWERS_PER_PEER answers per probe period (200 ms).
        for i in 0..20 {
            arrive(&mut n, 4 + i, graft(3, &versions));
        }
        assert_eq!(
            sent_to(&mut n, 3).len(),
            MAX_GRAFT_ANSWERS_PER_PEER as usize - 1
        );
        // All members together: at most MAX_GRAFT_ANSWERS.
        let mut answered = MAX_GRAFT_ANSWERS_PER_PEER as usize;
        for from in 4..=20u8 {
            for i in 0..MAX_GRAFT_ANSWERS_PER_PEER {
                arrive(&mut n, 30 + u64::from(i), graft(from, &versions));
            }
            answered += sent_to(&mut n, from).len();
        }
        assert_eq!(answered, MAX_GRAFT_ANSWERS as usize);
        assert!(n.counters().tree_grafts_refused > 0);
        // The next period answers again.
        arrive(&mut n, 400, graft(3, &versions));
        assert_eq!(sent_to(&mut n, 3).len(), 1);
    }

    #[test]
    fn a_change_with_one_hop_left_goes_on_as_announcements() {
        let mut n = tree_node();
        arrive(&mut n, 1, tree_push(3, 1, vec![Item::Record(record(2, 1))]));
        let out = sent(&mut n);
        let pushes: Vec<(u8, Vec<Item>)> =
            (4..=40u8).flat_map(|to| pushes_to(&n, &out, to)).collect();
        assert!(!pushes.is_empty(), "passed on");
        for (hops, items) in &pushes {
            assert_eq!(*hops, 0);
            assert!(
                items.iter().all(|i| matches!(i, Item::Announce { .. })),
                "a record with no hops left: {items:?}"
            );
        }
    }
}
