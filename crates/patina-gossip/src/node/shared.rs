//! State the node shares with foca's broadcast handler (foca owns the handler): the mirror
//! of the store's digest, pending and refused versions, the piggyback inbox and counters,
//! and what decides which queued piggyback item replaces which.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{BroadcastHandler, Invalidates};
use patina_store::{NodeId, OriginKnowledge};

use super::{Counters, MAX_PENDING};
use crate::identity::Identity;
use crate::wire::{self, Item, WireError};

/// State shared with foca's broadcast handler (foca owns the handler).
#[derive(Default)]
pub(super) struct Shared {
    pub(super) known: BTreeMap<NodeId, OriginKnowledge>,
    pub(super) pending: BTreeSet<(NodeId, u64)>,
    /// Versions received and refused by the store (a record its kind refused), newest last:
    /// a pushed or piggybacked copy of one is not taken again. Otherwise every copy would
    /// count as new, be forwarded and queued for piggybacking again, and one refused record
    /// would circulate through the cluster for ever. Anti-entropy still fetches them (with
    /// its backoff), so a refusal that depended on a record that arrived later heals.
    pub(super) refused: BTreeSet<(NodeId, u64)>,
    pub(super) refused_order: VecDeque<(NodeId, u64)>,
    pub(super) inbox: Vec<Item>,
    pub(super) backlog_full: bool,
    pub(super) counters: Counters,
    /// The highest sequence number heard of per origin through notices (records too large
    /// for a datagram) and applies that were dropped, not yet known here: what a session must
    /// fetch. Only origins of members seen up are noticed (a UDP sender cannot make this
    /// grow with origins it invents), at most [`MAX_NOTICED`], and an entry nothing filled
    /// within `Config::notice_ttl` goes ([`Shared::prune_noticed`]).
    pub(super) noticed: BTreeMap<NodeId, Noticed>,
    /// Origins of the members this node sees up, itself included.
    pub(super) origins: BTreeSet<NodeId>,
    /// The node's time at its latest input: when an item was noticed.
    pub(super) now: Duration,
}

/// A noticed version (see [`Shared::noticed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Noticed {
    pub(super) seq: u64,
    /// When the highest number was first heard of.
    pub(super) since: Duration,
}

/// Most origins noticed at once: a backstop for [`Shared::origins`] (members can be many,
/// a notice per member is one entry).
pub(super) const MAX_NOTICED: usize = 65_536;

/// Most refused versions remembered (16 bytes each, twice: about 1 MiB at most). More refused
/// versions in flight at once than this (a peer with a bug writing many) start circulating
/// again as the oldest are forgotten.
const MAX_REFUSED: usize = 32_768;

impl Shared {
    pub(super) fn knows(&self, origin: NodeId, seq: u64) -> bool {
        self.known.get(&origin).is_some_and(|k| k.knows(seq))
            || self.pending.contains(&(origin, seq))
            || self.refused.contains(&(origin, seq))
    }

    /// Does this node hold `item`'s version already (known, pending or refused; for a
    /// notice, noticed at or past it)? Unlike `!take`, not true of an item refused for want
    /// of room.
    pub(super) fn holds(&self, item: &Item) -> bool {
        self.knows(item.origin(), item.seq())
            || (matches!(item, Item::Notice { .. })
                && self
                    .noticed
                    .get(&item.origin())
                    .is_some_and(|n| n.seq >= item.seq()))
    }

    pub(super) fn remember_refused(&mut self, v: (NodeId, u64)) {
        if self.refused.insert(v) {
            self.refused_order.push_back(v);
            while self.refused_order.len() > MAX_REFUSED {
                if let Some(old) = self.refused_order.pop_front() {
                    self.refused.remove(&old);
                }
            }
        }
    }

    /// Take an item received from a peer: `true` if it is new (a record now pending; a
    /// notice now noticed). A notice is never pending: nothing applies it, and a pending entry
    /// only a session could settle was how forged notices filled `pending` until every push
    /// was dropped.
    pub(super) fn take(&mut self, item: &Item) -> bool {
        if self.knows(item.origin(), item.seq()) {
            self.counters.items_seen += 1;
            return false;
        }
        if let Item::Notice { origin, seq } = *item {
            return self.notice(origin, seq);
        }
        if let Item::Announce { .. } = *item {
            // Announcements travel in tree pushes (`tree.rs`), never piggybacked.
            self.counters.dropped_decode += 1;
            return false;
        }
        if self.pending.len() >= MAX_PENDING {
            self.counters.items_dropped += 1;
            return false;
        }
        self.counters.items_new += 1;
        self.pending.insert((item.origin(), item.seq()));
        true
    }

    /// Note that `origin` has issued `seq`, which a session must fetch: `true` if it is news.
    /// Origins no member names are not noticed (counted): their numbers come with the
    /// periodic sessions, if they are real.
    pub(super) fn notice(&mut self, origin: NodeId, seq: u64) -> bool {
        if self.noticed.get(&origin).is_some_and(|n| n.seq >= seq) {
            self.counters.items_seen += 1;
            return false;
        }
        if !self.origins.contains(&origin)
            || (self.noticed.len() >= MAX_NOTICED && !self.noticed.contains_key(&origin))
        {
            self.counters.notices_refused += 1;
            return false;
        }
        self.counters.items_new += 1;
        let since = self.now;
        self.noticed
            .entry(origin)
            .and_modify(|n| n.seq = seq)
            .or_insert(Noticed { seq, since });
        true
    }

    /// The lowest number of `origin` below its head that this node lacks and has not
    /// refused: a number it refused (its record broke the kind's rules) is a gap nothing
    /// will fill, and must not keep the view from standing for ever.
    pub(super) fn first_gap(&self, origin: NodeId, k: &OriginKnowledge) -> Option<u64> {
        for g in k.gaps() {
            let mut seq = g.lo();
            while seq <= g.hi() && self.refused.contains(&(origin, seq)) {
                seq += 1;
            }
            if seq <= g.hi() {
                return Some(seq);
            }
        }
        None
    }

    /// Does this node lack a version it noticed?
    pub(super) fn lacks_noticed(&self) -> bool {
        self.noticed
            .iter()
            .any(|(o, n)| !self.known.get(o).is_some_and(|k| k.knows(n.seq)))
    }

    /// Forget noticed versions now known, those of origins no member names any more, and
    /// those nothing filled within `ttl` (a forged or lost notice must not keep sessions
    /// going for ever; the periodic round still fetches a real one).
    pub(super) fn prune_noticed(&mut self, now: Duration, ttl: Duration) {
        let Shared {
            noticed,
            known,
            origins,
            ..
        } = self;
        noticed.retain(|o, n| {
            !known.get(o).is_some_and(|k| k.knows(n.seq))
                && origins.contains(o)
                && now.saturating_sub(n.since) < ttl
        });
    }
}

/// What decides which queued piggyback item replaces which: a newer change of one key from
/// one origin replaces an older one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemKey {
    pub(super) origin: NodeId,
    pub(super) seq: u64,
    /// 0 for notices (which replace nothing).
    pub(super) key: u64,
}

impl Invalidates for ItemKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.key != 0
            && self.key == other.key
            && self.origin == other.origin
            && self.seq > other.seq
    }
}

pub(super) struct Handler(pub(super) Arc<Mutex<Shared>>);

impl BroadcastHandler<Identity> for Handler {
    type Key = ItemKey;
    type Error = WireError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&Identity>,
    ) -> Result<Option<ItemKey>, WireError> {
        let item = Item::decode(data)?;
        let key = ItemKey {
            origin: item.origin(),
            seq: item.seq(),
            key: match &item {
                Item::Record(r) => wire::key_hash(&r.key),
                Item::Notice { .. } | Item::Announce { .. } => 0,
            },
        };
        let mut s = self.0.lock().expect("gossip shared state");
        if sender.is_none() {
            // Our own change, queued by `handle_local`.
            return Ok(Some(key));
        }
        if !s.take(&item) {
            return Ok(None);
        }
        s.inbox.push(item);
        Ok((!s.backlog_full).then_some(key))
    }
}
