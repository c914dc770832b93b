//! The sans-IO replication node: SWIM membership (foca) with Lifeguard-style local health,
//! eager pushes of changes, piggybacked dissemination, and the decisions of anti-entropy
//! (when to sync, with whom). Inputs are method calls with the time passed in; outputs are
//! [`Output`] values the shell (or the simulator) carries out, in order.
//!
//! What the node knows about the store is a mirror of its digest, fed by
//! [`Node::handle_learned`] after each commit: a change counts as known only once it is
//! durable. Changes received but not committed yet are *pending*: they are forwarded at once
//! (the origin already holds them durably) but never reported as known.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, OwnedNotification};
use patina_store::{NodeId, OriginKnowledge, Record};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::envelope::{ClusterName, Envelope, EnvelopeError};
use crate::identity::{Codec, Identity};
use crate::wire::{
    KIND_GRAFT, KIND_LINK, KIND_PRUNE, KIND_PUSH, KIND_SWIM, KIND_TREE_PUSH, Push, TreeControl,
};

mod antientropy;
mod attend;
mod clock;
mod dissemination;
mod down_news;
mod liveness;
mod place;
mod retire;
mod shared;
mod suspicion;
mod tree;
mod vecmap;
mod view;

pub use antientropy::{GAP_GRACE, MAX_SYNCS_IN_FLIGHT, SyncEnd};
pub use attend::ATTEND_REFRESH;
pub use clock::CLOCK_SAMPLE_TTL;
pub use down_news::{DOWN_NEWS_AGE, MAX_DOWN_NEWS};
pub use liveness::{OWNERLESS_AFTER, QUORUM_WINDOW};
pub use place::SHARED_COORDINATES;
pub use shared::ItemKey;
use shared::{Handler, Shared};
use suspicion::Held;
pub use suspicion::{CONFIRM_ASK, CONFIRM_BACKSTOP};
pub use tree::{
    MAX_GRAFT_ANSWERS, MAX_INBOUND, MAX_MISSING, MAX_RECENT_BYTES, MAX_TREE_ORIGINS, RECENT_AGE,
    TREE_NEAR, TREE_RANDOM, TreeSizes,
};
pub use view::{ViewReason, ViewStatus};

/// The highest local-health score: probe timers stretch to at most 9x.
pub const MAX_HEALTH: u32 = 8;
/// Changes received and not yet committed that a node tracks; past it, new ones are left to
/// anti-entropy. Bounds memory a flood of pushes can take.
pub const MAX_PENDING: usize = 65_536;
/// Piggyback items queued in foca past which new ones are not queued (they still travel by
/// push and anti-entropy). Bounds foca's queue under a write storm.
pub const MAX_PIGGYBACK_BACKLOG: usize = 1_024;
/// Sync intervals a noticed version may stay unfilled before it is forgotten (the periodic
/// rounds still fetch it if it is real).
pub const NOTICE_TTL_ROUNDS: u32 = 4;

/// Tunables. Defaults suit a LAN where agents are one hop apart.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster: ClusterName,
    /// How often a random member is probed.
    pub probe_period: Duration,
    /// How long a direct probe waits for an ack before asking others to probe.
    pub probe_rtt: Duration,
    /// A suspicion corroborated (the member's gRPC port refuses or times out) becomes down
    /// after this long; uncorroborated, after `suspicion_max`. Both stretch with local health.
    pub suspicion_min: Duration,
    pub suspicion_max: Duration,
    /// Members asked to probe indirectly, and members periodic SWIM gossip goes to.
    pub fanout: NonZeroUsize,
    /// Members this node attends: it holds an idle stream open to the next `attend` members
    /// on the ring of gossip addresses and suspects one at once when its stream ends and its
    /// port refuses (a killed process). 0: none (only SWIM's probes find dead members).
    pub attend: usize,
    /// Members a local change is pushed to at once (the first hop).
    pub push_fanout: NonZeroUsize,
    /// Members a node forwards a pushed change to when it first receives it. With forward
    /// fanout f, a node is missed by the eager phase with probability about e^-f; the
    /// piggyback phase (every receiver queues the change on its SWIM traffic) repairs those
    /// within a probe period or two.
    pub forward_fanout: NonZeroUsize,
    /// Times a pushed change is forwarded onward.
    pub push_hops: u8,
    /// Times a membership update or a piggybacked item is sent by each node that learns it.
    /// Down news is passed on at once to `fanout` members and then rides on later packets:
    /// with 8 sends per node a member misses it with probability about e^-8 (at 4, one
    /// member in 20 kept routing to a dead one until it probed it itself).
    pub max_transmissions: NonZeroU8,
    /// Largest datagram, envelope included: under the path MTU.
    pub max_datagram: usize,
    /// Mean time between periodic anti-entropy rounds (jittered by 25%).
    pub sync_interval: Duration,
    /// An origin no member names, whose numbers this node all knows, is retired after this
    /// long (see [`Output::Retire`]).
    pub retire_after: Duration,
    /// How often a node with no members announces itself to the seeds.
    pub announce_interval: Duration,
    /// How long a down member is remembered (and announced to, so partitions heal).
    pub remove_down_after: Duration,
    /// Fail static: while this node sees fewer than half of the members it heard from in the
    /// last [`QUORUM_WINDOW`] alive (itself included), it is more likely cut off than they
    /// all dead, so it hides no owner's records (and shows again those it hid) until it sees
    /// a majority again. For the global tier, where an edge cut off from the world must go on
    /// answering from its last known state; a region's agents hide at once (`false`).
    pub fail_static: bool,
    /// This node is its cluster's only member (a region of one agent): its view stands
    /// without members, majority or sessions ([`ViewStatus`]). Never set it on an agent of a
    /// region with others: restarted on an empty data directory, it would stand empty.
    pub standalone: bool,
    /// After this node took an owner for down, its view stands again once it has heard from
    /// a majority since, or after this long: longer than the time between two members an
    /// isolated node takes for down (a probe period, stretched by local health up to 9x).
    pub view_settle: Duration,
    /// A gap open this long (a change known to exist and not received) keeps the view from
    /// standing.
    pub max_gap_age: Duration,
    /// Past this offset from its peers' clocks (the median of its samples), the node fences
    /// its store's local writes ([`Output::ClockFence`]); also how far ahead of the wall
    /// clock the store may take a timestamp (`StoreOptions::max_clock_offset_ms`).
    pub max_clock_offset: Duration,
    /// The gossip keys this node starts with (see [`crate::keyring`]); changed while it runs
    /// by [`Node::set_keyring`].
    pub keyring: crate::keyring::Keyring,
    /// Whether sessions' hellos carry down news and this node heeds it (`down_news.rs`).
    /// On in agents; tests turn it off to compare.
    pub down_news: bool,
    /// How changes spread: random pushes (a LAN's default) or per-origin trees (a WAN's).
    pub dissemination: Dissemination,
}

/// How changes spread between members.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Dissemination {
    /// Pushed at once to `push_fanout` random members, forwarded `push_hops` times, and
    /// piggybacked on SWIM traffic (`dissemination.rs`): the fewest hops on a LAN.
    #[default]
    Push,
    /// Pushed along a tree per origin that converges to the fastest paths, announced to a
    /// few other links, repaired by grafts (`tree.rs`): near the one-way floor on a WAN,
    /// with fewer bytes.
    Tree,
}

impl Config {
    pub fn lan(cluster: ClusterName) -> Config {
        Config {
            cluster,
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(80),
            // A refused connection is near-proof that the process is gone, and a silent port
            // has already waited out the 500 ms connect timeout: the wait after it is short.
            suspicion_min: Duration::from_millis(50),
            suspicion_max: Duration::from_millis(3_000),
            fanout: NonZeroUsize::new(3).expect("3"),
            attend: 2,
            push_fanout: NonZeroUsize::new(16).expect("16"),
            forward_fanout: NonZeroUsize::new(6).expect("6"),
            push_hops: 3,
            max_transmissions: NonZeroU8::new(8).expect("8"),
            max_datagram: 1_400,
            sync_interval: Duration::from_secs(5),
            retire_after: Duration::from_secs(3600),
            announce_interval: Duration::from_secs(1),
            remove_down_after: Duration::from_secs(24 * 3600),
            fail_static: false,
            standalone: false,
            view_settle: Duration::from_secs(4),
            max_gap_age: Duration::from_secs(10),
            max_clock_offset: Duration::from_millis(500),
            keyring: crate::keyring::Keyring::default(),
            down_news: true,
            dissemination: Dissemination::Push,
        }
    }

    fn foca(&self, envelope: &Envelope) -> foca::Config {
        let mut c = foca::Config::new_lan(NonZeroU32::new(16).expect("16"));
        c.probe_period = self.probe_period;
        c.probe_rtt = self.probe_rtt;
        c.num_indirect_probes = self.fanout;
        c.max_transmissions = self.max_transmissions;
        // The node holds and re-times this timer (see `Held`); foca's value is the longest.
        c.suspect_to_down_after = self.suspicion_max;
        c.remove_down_after = Some(self.remove_down_after);
        c.max_packet_size = NonZeroUsize::new(self.foca_packet(envelope)).expect("packet room");
        c.notify_down_members = true;
        c.periodic_announce = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(30),
            num_members: NonZeroUsize::new(1).expect("1"),
        });
        c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_secs(10),
            num_members: NonZeroUsize::new(2).expect("2"),
        });
        c.periodic_gossip = Some(foca::PeriodicParams {
            frequency: self.probe_period,
            num_members: self.fanout,
        });
        c
    }

    fn foca_packet(&self, envelope: &Envelope) -> usize {
        self.max_datagram
            .saturating_sub(envelope.overhead() + 1)
            .max(256)
    }

    /// Largest item: what fits a push or a SWIM packet with its headers and a few updates.
    pub fn max_item(&self, envelope: &Envelope) -> usize {
        // Two identities and a message with a third (PingReq) in the header, a couple of
        // member updates, and the item's own length prefix.
        self.foca_packet(envelope)
            .saturating_sub(3 * 37 + 8 + 2 * 40 + 2)
    }
}

/// A timer the shell must deliver back through [`Node::handle_timer`] at `due` (it may be
/// late, never dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimerEvent {
    pub due: Duration,
    pub kind: TimerKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TimerKind {
    Swim(foca::Timer<Identity>),
    /// Deliver a held suspicion timeout early: it was corroborated.
    SuspicionCut(SocketAddr),
    /// The last check of this round brought no answer at all (the shell always answers
    /// within [`CONFIRM_ASK`]; this is the backstop): deliver the held timeout.
    ConfirmTimeout(SocketAddr, u64),
    Announce,
    SyncRound,
    GapCheck,
    /// Awaited announced versions are due a graft (`tree.rs`).
    TreeCheck,
}

/// What the node asks of its shell.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send a datagram (envelope included) on `lane`.
    Send {
        to: SocketAddr,
        bytes: Vec<u8>,
        lane: Lane,
    },
    /// Deliver `timer` back after `after`.
    Schedule { after: Duration, timer: TimerEvent },
    /// Merge records from a peer into the store; report what became known through
    /// [`Node::handle_learned`].
    Apply { records: Vec<Record> },
    /// An owner's records must be hidden (`down`) or shown again.
    Liveness { node: NodeId, down: bool },
    /// Check whether a suspect is really gone (its gRPC port): answer with
    /// [`Node::handle_corroboration`].
    Corroborate { member: Identity },
    /// A long suspicion ran out: ask the suspect itself, over gRPC and through its gossip
    /// loop, whether it runs and at which incarnation; answer with
    /// [`Node::handle_confirmation`] with `round`, within [`CONFIRM_ASK`] (`None` when the
    /// suspect did not answer by then).
    Confirm { member: Identity, round: u64 },
    /// `origin` has been gone (no member names it) and fully known here for `retire_after`:
    /// retire it in the store ([`patina_store::Store::retire_origin`], which also checks that
    /// nothing of it is held) and answer with [`Node::handle_retired`] if it went.
    Retire { origin: NodeId },
    /// Run an anti-entropy session with `peer`; answer with [`Node::handle_sync_done`].
    Sync { peer: Identity },
    /// Attend exactly these members from now on (stop attending any other): hold an idle
    /// stream open to each, and when one ends and the member's port refuses a connection,
    /// tell [`Node::handle_unreachable`].
    Attend { members: Vec<Identity> },
    /// This node's identity changed (renewed after being declared down): persist its epoch.
    Renewed { identity: Identity },
    /// Another live member writes as our origin (a copy of our data directory): the store
    /// must move to a fresh origin before the two issue more numbers under one name.
    OriginConflict { other: Identity },
    /// This node's clock is off its peers' (`Some`: refuse local writes, readiness false) or
    /// within the bound again (`None`): [`patina_store::Store::set_clock_fence`].
    ClockFence(Option<patina_store::ClockFence>),
}

/// Which socket a datagram leaves from and arrives at. Pushes travel apart from SWIM (to the
/// UDP port numbered like the member's gRPC port), so a flood of pushes that overflows a
/// receive buffer never takes the pings, acks and refutations with it: under load, that was
/// how healthy members got declared down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// SWIM: probes, acks, membership updates (and what rides on them).
    Swim,
    /// Pushed changes: to [`Identity::push_addr`].
    Push,
}

/// Counts for status pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    /// Datagrams dropped by the envelope (garbage, other versions, other clusters).
    pub dropped_envelope: u64,
    /// Sealed datagrams no installed key opened (another key, forged, damaged).
    pub dropped_no_key: u64,
    /// Plaintext datagrams dropped because the keyring refuses plaintext.
    pub dropped_plaintext: u64,
    /// Datagrams dropped while decoding SWIM or pushes.
    pub dropped_decode: u64,
    pub items_new: u64,
    pub items_seen: u64,
    /// New items dropped because too many were pending (anti-entropy brings them).
    pub items_dropped: u64,
    /// Notices (and dropped applies) of origins no member names, not noticed.
    pub notices_refused: u64,
    /// Suspicions this node refuted for members that answered its last check.
    pub refuted_for_others: u64,
    /// Attended members suspected at once: their stream ended and their port refused.
    pub attend_unreachable: u64,
    /// Members suspected here (corroborated) because a session's peer listed them as down
    /// lately while this node held them alive.
    pub down_news_applied: u64,
    pub syncs_started: u64,
    pub syncs_for_gaps: u64,
    pub late_timers: u64,
    /// Tree dissemination (`tree.rs`): announcements of versions this node lacked, prunes
    /// and grafts sent and received, and tree messages from non-members (dropped).
    pub announces_new: u64,
    pub tree_prunes_sent: u64,
    pub tree_prunes_received: u64,
    pub tree_grafts_sent: u64,
    pub tree_grafts_received: u64,
    /// Grafts not answered: more than `MAX_GRAFT_ANSWERS` arrived in one probe period.
    pub tree_grafts_refused: u64,
    pub tree_from_strangers: u64,
    /// Inbound links that gave their slot, all taken, to a member that asked, after
    /// `tree::INBOUND_IDLE` of silence.
    pub tree_inbound_replaced: u64,
}

/// How many entries the node holds in each structure a peer's datagrams reach: for status
/// pages, and for tests that check each stays bounded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateSizes {
    pub pending: usize,
    pub noticed: usize,
    pub refused: usize,
    pub last_seen: usize,
    pub held_suspicions: usize,
}

/// A member as the node sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberInfo {
    pub identity: Identity,
    pub incarnation: u16,
    pub state: MemberState,
    /// When a datagram from it last arrived (node time), if ever.
    pub last_seen: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

type Swim = Foca<Identity, Codec, StdRng, Handler>;

pub struct Node {
    cfg: Config,
    envelope: Envelope,
    foca: Swim,
    rt: AccumulatingRuntime<Identity>,
    shared: Arc<Mutex<Shared>>,
    rng: StdRng,
    now: Duration,
    out: Vec<Output>,
    /// Local health (Lifeguard's awareness score), 0..=MAX_HEALTH.
    health: u32,
    last_health_bump: Option<Duration>,
    incarnation: u16,
    held: BTreeMap<SocketAddr, Held>,
    /// foca's current timer token (carried by every timer it schedules): a suspicion this node
    /// holds of its own accord must carry it for foca to take it.
    swim_token: Option<foca::TimerToken>,
    /// Numbers the rounds of the last check.
    confirm_round: u64,
    /// Live identities per owner: an owner is down once none is left.
    live: vecmap::VecMap<NodeId, liveness::LiveAddrs>,
    /// With `fail_static`: the owners the membership says are down (and since when), and those
    /// the store was told to hide (while this node lacks a majority, only those down well
    /// before it stopped hearing from the others).
    want_down: BTreeMap<NodeId, Duration>,
    shown_down: BTreeSet<NodeId>,
    /// When a datagram from each member's address last arrived: members only (pruned to
    /// foca's membership each sync round), so forged sources do not pile up.
    last_seen: vecmap::VecMap<crate::identity::PeerAddr, Duration>,
    syncing: BTreeSet<SocketAddr>,
    gap_armed: bool,
    /// Who sent the latest change that we lacked: the best peer to sync a gap with.
    gap_hint: Option<Identity>,
    seeds: Vec<SocketAddr>,
    leaving: bool,
    max_item: usize,
    /// Down news arrived this turn: pass it on at once rather than at the next gossip tick.
    gossip_now: bool,
    /// Consecutive gap-driven sessions that brought nothing (their delay doubles), and how
    /// much was known when the last one ended.
    gap_backoff: u32,
    known_at_last_sync: u128,
    /// When this node first became part of a cluster.
    active_since: Option<Duration>,
    /// Origins no member names and whose numbers are all known here, since when.
    gone_since: BTreeMap<NodeId, Duration>,
    /// When this node last took an owner for down ([`ViewStatus`]'s settling).
    last_down_at: Option<Duration>,
    /// When an anti-entropy session last completed, and how many have.
    synced_at: Option<Duration>,
    syncs_completed: u64,
    /// Since when this node has seen a majority (as [`Node::view_status`] last judged).
    majority_since: Option<Duration>,
    /// Per origin, the lowest number missing below its head and since when.
    gap_first: BTreeMap<NodeId, (u64, Duration)>,
    /// Members an operator forgot (gone for good): they leave the majority's count, so that a
    /// region that lost most of its agents can stand again without them. Bounded by members.
    forgotten: BTreeSet<NodeId>,
    /// This node's clock against its peers'.
    clock: clock::ClockWatch,
    /// This node's network coordinate and its peers'.
    place: place::Place,
    /// The members this node attends, whether the membership changed since they were
    /// chosen, and when they were.
    attending: Vec<Identity>,
    attend_stale: bool,
    attend_chosen_at: Option<Duration>,
    /// Members this node saw go down lately, with when (`down_news.rs`), and a counter of
    /// additions.
    recent_downs: std::collections::VecDeque<(Identity, Duration)>,
    down_news_gen: u64,
    /// foca's sends per update now, and the membership size it was chosen for.
    transmissions: NonZeroU8,
    scaled_for: usize,
    /// Tree dissemination's links, recent changes and awaited versions (`tree.rs`).
    tree: tree::Tree,
    /// A membership notification came in this batch (`after_foca` acts on it once).
    membership_moved: bool,
}

/// Items foca's runtime queues may have held in one batch before their capacity is given
/// back.
const RUNTIME_KEEP: usize = 256;

/// Sends per update for `members` others: at least `least`, and `ceil(4 × log10(N + 1))`.
pub fn transmissions_for(least: NonZeroU8, members: usize) -> NonZeroU8 {
    let scaled = (4.0 * (members.saturating_add(1) as f64).log10()).ceil();
    let scaled = scaled.clamp(1.0, f64::from(u8::MAX)) as u8;
    least.max(NonZeroU8::new(scaled).unwrap_or(least))
}

impl Node {
    /// A node with `identity`, what its store knows, and the seeds to join through. `seed`
    /// drives every random choice (probing order, peers), so a simulation replays exactly.
    pub fn new(
        identity: Identity,
        cfg: Config,
        known: BTreeMap<NodeId, OriginKnowledge>,
        seeds: Vec<SocketAddr>,
        seed: u64,
    ) -> Node {
        let envelope = Envelope::with_keyring(&cfg.cluster, cfg.keyring.clone());
        let shared = Arc::new(Mutex::new(Shared {
            known,
            origins: BTreeSet::from([identity.node]),
            ..Shared::default()
        }));
        let foca = Foca::with_custom_broadcast(
            identity,
            cfg.foca(&envelope),
            StdRng::seed_from_u64(seed),
            Codec,
            Handler(shared.clone()),
        );
        let max_item = cfg.max_item(&envelope);
        let cfg_transmissions = cfg.max_transmissions;
        Node {
            cfg,
            envelope,
            foca,
            rt: AccumulatingRuntime::new(),
            shared,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
            now: Duration::ZERO,
            out: Vec::new(),
            health: 0,
            last_health_bump: None,
            incarnation: 0,
            held: BTreeMap::new(),
            swim_token: None,
            confirm_round: 0,
            live: vecmap::VecMap::default(),
            want_down: BTreeMap::new(),
            shown_down: BTreeSet::new(),
            last_seen: vecmap::VecMap::default(),
            syncing: BTreeSet::new(),
            gap_armed: false,
            gap_hint: None,
            seeds: seeds
                .into_iter()
                .filter(|s| crate::identity::PeerAddr::from(*s) != identity.addr)
                .collect(),
            leaving: false,
            max_item,
            gossip_now: false,
            gap_backoff: 0,
            known_at_last_sync: 0,
            active_since: None,
            gone_since: BTreeMap::new(),
            last_down_at: None,
            synced_at: None,
            syncs_completed: 0,
            majority_since: None,
            gap_first: BTreeMap::new(),
            forgotten: BTreeSet::new(),
            clock: clock::ClockWatch::default(),
            place: place::Place::new(seed ^ 0xc00d),
            attending: Vec::new(),
            attend_stale: false,
            attend_chosen_at: None,
            recent_downs: std::collections::VecDeque::new(),
            down_news_gen: 0,
            transmissions: cfg_transmissions,
            scaled_for: 0,
            tree: tree::Tree::default(),
            membership_moved: false,
        }
    }

    pub fn identity(&self) -> Identity {
        *self.foca.identity()
    }

    pub fn health(&self) -> u32 {
        self.health
    }

    pub fn counters(&self) -> Counters {
        self.shared
            .lock()
            .expect("gossip shared state")
            .counters
            .clone()
    }

    pub fn sizes(&self) -> StateSizes {
        let s = self.shared.lock().expect("gossip shared state");
        StateSizes {
            pending: s.pending.len(),
            noticed: s.noticed.len(),
            refused: s.refused.len(),
            last_seen: self.last_seen.len(),
            held_suspicions: self.held.len(),
        }
    }

    /// Start: announce to the seeds and arm the periodic timers.
    pub fn start(&mut self, now: Duration) {
        self.now = now;
        self.announce();
        self.schedule(self.cfg.announce_interval, TimerKind::Announce);
        let first = self.jittered(self.cfg.sync_interval);
        self.schedule(first, TimerKind::SyncRound);
    }

    /// Everything the node asks of its shell since the last call.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// Members as foca sees them (down ones included until forgotten), ourselves excluded.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.foca
            .iter_membership_state()
            .map(|m| MemberInfo {
                identity: *m.id(),
                incarnation: m.incarnation(),
                state: match m.state() {
                    foca::State::Alive => MemberState::Alive,
                    foca::State::Suspect => MemberState::Suspect,
                    foca::State::Down => MemberState::Down,
                },
                last_seen: self.last_seen.get(&m.id().addr).copied(),
            })
            .collect()
    }

    /// Active members (alive or suspect).
    pub fn active(&self) -> Vec<Identity> {
        self.foca.iter_members().map(|m| *m.id()).collect()
    }

    /// A datagram arrived (on the SWIM socket, or wherever a simulation delivers it).
    pub fn handle_datagram(&mut self, now: Duration, bytes: &[u8]) {
        self.handle_datagram_on(now, bytes, Lane::Swim);
    }

    /// A datagram arrived on `lane`'s socket. The push socket takes pushes only: SWIM
    /// packets there are dropped and counted. The SWIM socket takes both, so that pushes
    /// from agents of the previous version (which pushed to the gossip address) still land
    /// during a rolling upgrade.
    pub fn handle_datagram_on(&mut self, now: Duration, bytes: &[u8], lane: Lane) {
        self.now = now;
        {
            let mut s = self.shared.lock().expect("gossip shared state");
            s.now = now;
            s.counters.datagrams_in += 1;
            s.counters.bytes_in += bytes.len() as u64;
        }
        let payload = match self.envelope.open(bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "datagram dropped");
                self.count(|c| match e {
                    EnvelopeError::NoKey => c.dropped_no_key += 1,
                    EnvelopeError::Plaintext => c.dropped_plaintext += 1,
                    _ => c.dropped_envelope += 1,
                });
                return;
            }
        };
        match payload.split_first() {
            Some((&KIND_SWIM, _)) if lane == Lane::Push => {
                self.count(|c| c.dropped_decode += 1);
            }
            Some((&KIND_SWIM, swim)) => {
                if let Err(e) = self.foca.handle_data(swim, &mut self.rt) {
                    tracing::debug!(error = %e, "swim packet dropped");
                    self.count(|c| c.dropped_decode += 1);
                }
                self.after_foca();
                self.take_inbox(None);
            }
            Some((&KIND_PUSH, body)) => match Push::decode(body, false) {
                Ok(push) => self.handle_push(push),
                Err(e) => {
                    tracing::debug!(error = %e, "push dropped");
                    self.count(|c| c.dropped_decode += 1);
                }
            },
            Some((&KIND_TREE_PUSH, body)) => match Push::decode(body, true) {
                Ok(push) => self.handle_tree_push(push),
                Err(e) => {
                    tracing::debug!(error = %e, "tree push dropped");
                    self.count(|c| c.dropped_decode += 1);
                }
            },
            Some((&kind @ (KIND_PRUNE | KIND_GRAFT | KIND_LINK), body)) => {
                match TreeControl::decode(kind, body) {
                    Ok(msg) => self.handle_tree_control(msg),
                    Err(e) => {
                        tracing::debug!(error = %e, "prune or graft dropped");
                        self.count(|c| c.dropped_decode += 1);
                    }
                }
            }
            _ => self.count(|c| c.dropped_decode += 1),
        }
    }

    /// The gossip keys as they are now.
    pub fn keyring(&self) -> &crate::keyring::Keyring {
        self.envelope.keyring()
    }

    /// Seal and open datagrams with `keyring` from now on.
    pub fn set_keyring(&mut self, keyring: crate::keyring::Keyring) {
        self.envelope.set_keyring(keyring);
    }

    /// This node's incarnation, as its latest SWIM packet carried it.
    pub fn incarnation(&self) -> u16 {
        self.incarnation
    }

    /// A timer came due (possibly late).
    pub fn handle_timer(&mut self, now: Duration, timer: TimerEvent) {
        self.now = now;
        let late = now.saturating_sub(timer.due);
        if late > self.late_threshold() {
            self.count(|c| c.late_timers += 1);
            self.bump_health();
        }
        match timer.kind {
            TimerKind::Swim(t) => {
                if matches!(t, foca::Timer::ChangeSuspectToDown { .. }) {
                    self.suspicion_ran_out(t);
                    return;
                }
                let _ = self.foca.handle_timer(t, &mut self.rt);
                self.after_foca();
            }
            TimerKind::SuspicionCut(addr) => {
                if let Some(h) = self.held.remove(&addr) {
                    self.deliver_suspicion(h.timer);
                }
            }
            TimerKind::ConfirmTimeout(addr, round) => {
                if self.held.get(&addr).and_then(|h| h.confirming) == Some(round)
                    && let Some(h) = self.held.remove(&addr)
                {
                    self.deliver_suspicion(h.timer);
                }
            }
            TimerKind::Announce => {
                if self.foca.num_members() == 0 {
                    self.announce();
                }
                self.schedule(self.cfg.announce_interval, TimerKind::Announce);
            }
            TimerKind::SyncRound => self.sync_round(),
            TimerKind::GapCheck => self.gap_check(),
            TimerKind::TreeCheck => self.tree_check(),
        }
    }

    /// Our store moved to a fresh origin (its data directory was a copy of another agent's):
    /// take an identity that names the new origin, so that liveness maps to the records we
    /// now write. The old identity is declared down by foca; the agent whose origin it was
    /// keeps its own identity under its own address.
    pub fn handle_new_origin(&mut self, now: Duration, node: NodeId) {
        self.now = now;
        let old = *self.foca.identity();
        if old.node == node {
            return;
        }
        let new = Identity {
            node,
            epoch: old.epoch.saturating_add(1),
            ..old
        };
        if self.foca.change_identity(new, &mut self.rt).is_ok() {
            self.out.push(Output::Renewed { identity: new });
        }
        self.after_foca();
        self.refresh_origins();
    }

    /// Take `members` as alive without gossiping about them: a simulation's shortcut to a
    /// formed cluster (the membership a real one holds once its joins have settled), so that
    /// a simulation of thousands of nodes need not simulate their joins first.
    pub fn assume_members(&mut self, now: Duration, members: &[Identity]) {
        self.now = now;
        let me = self.identity();
        let updates = members
            .iter()
            .filter(|m| m.addr != me.addr)
            .map(|m| foca::Member::alive(*m));
        let _ = self.foca.apply_many(updates, false, &mut self.rt);
        self.after_foca();
    }

    /// Leave the cluster gracefully: tell a few members we are going.
    pub fn leave(&mut self, now: Duration) {
        self.now = now;
        self.leaving = true;
        self.attend_stale = true;
        self.attend_chosen_at = None;
        let _ = self.foca.leave_cluster(&mut self.rt);
        self.after_foca();
    }

    /// Forget a member for good (operator action): it is declared down everywhere.
    pub fn forget(&mut self, now: Duration, member: Identity) -> bool {
        self.now = now;
        let known = self.foca.iter_membership_state().any(|m| *m.id() == member);
        if known {
            self.forgotten.insert(member.node);
            let _ = self.foca.apply_many(
                std::iter::once(foca::Member::down(member)),
                true,
                &mut self.rt,
            );
            let _ = self.foca.gossip(&mut self.rt);
            self.after_foca();
        }
        known
    }

    fn random_active(&mut self) -> Option<Identity> {
        let members: Vec<Identity> = self.foca.iter_members().map(|m| *m.id()).collect();
        if members.is_empty() {
            return None;
        }
        Some(members[self.rng.random_range(0..members.len())])
    }

    fn announce(&mut self) {
        for seed in self.seeds.clone() {
            let placeholder = Identity {
                node: NodeId(0),
                addr: seed.into(),
                api_port: 0,
                epoch: 0,
            };
            let _ = self.foca.announce(placeholder, &mut self.rt);
        }
        self.after_foca();
    }

    fn jittered(&mut self, d: Duration) -> Duration {
        let ms = d.as_millis().max(4) as u64;
        Duration::from_millis(ms * 3 / 4 + self.rng.random_range(0..=ms / 2))
    }

    fn late_threshold(&self) -> Duration {
        (self.cfg.probe_period / 2).max(Duration::from_millis(50))
    }

    /// A duration stretched by local health (Lifeguard's awareness multiplier).
    fn stretch(&self, d: Duration) -> Duration {
        d * (1 + self.health)
    }

    fn bump_health(&mut self) {
        // At most once per probe period: one stall is one piece of evidence.
        if self
            .last_health_bump
            .is_some_and(|t| self.now < t + self.cfg.probe_period)
        {
            return;
        }
        self.last_health_bump = Some(self.now);
        self.health = (self.health + 1).min(MAX_HEALTH);
    }

    fn count(&self, f: impl FnOnce(&mut Counters)) {
        f(&mut self.shared.lock().expect("gossip shared state").counters);
    }

    fn schedule(&mut self, after: Duration, kind: TimerKind) {
        self.out.push(Output::Schedule {
            after,
            timer: TimerEvent {
                due: self.now + after,
                kind,
            },
        });
    }

    fn send(&mut self, to: SocketAddr, bytes: Vec<u8>, lane: Lane) {
        {
            let mut s = self.shared.lock().expect("gossip shared state");
            s.counters.datagrams_out += 1;
            s.counters.bytes_out += bytes.len() as u64;
        }
        self.out.push(Output::Send { to, bytes, lane });
    }

    fn update_backlog(&mut self) {
        let full = self.foca.custom_broadcast_backlog() >= MAX_PIGGYBACK_BACKLOG;
        self.shared
            .lock()
            .expect("gossip shared state")
            .backlog_full = full;
    }

    /// Carry out what foca asked for.
    fn after_foca(&mut self) {
        let mut handled = 0usize;
        while self.rt.backlog() > 0 {
            handled += self.rt.backlog();
            while let Some((to, data)) = self.rt.to_send() {
                let mut payload = Vec::with_capacity(data.len() + 1);
                payload.push(KIND_SWIM);
                payload.extend_from_slice(&data);
                let mut bytes = Vec::with_capacity(payload.len() + self.envelope.overhead());
                self.envelope.seal(&payload, &mut bytes);
                self.send(to.addr(), bytes, Lane::Swim);
            }
            while let Some((after, timer)) = self.rt.to_schedule() {
                self.schedule_swim(after, timer);
            }
            while let Some(n) = self.rt.to_notify() {
                self.notified(n);
            }
            if std::mem::take(&mut self.gossip_now) {
                // Down news is the hot path: every node that learns it passes it on at once,
                // so it spreads in a few network hops instead of a few gossip periods. Once
                // (to `fanout` members): each send spends one of `max_transmissions` of every
                // queued update and piggybacked item, and a larger burst (two or three
                // gossips were tried) left fewer sends for later packets, where members that
                // missed the burst get the news; the 100-node simulation under 5 % loss then
                // left a member listing a dead one for more than 30 s (1 seed in 12). With
                // down news in sessions' hellos (`down_news.rs`) that no longer happens, but
                // two gossips still trade the tail for the median: simulated crash to
                // excluded at 20 nodes, p50 60 / p99 650 / max 960 ms against 110 / 430 / 440
                // ms with one.
                let _ = self.foca.gossip(&mut self.rt);
            }
            if std::mem::take(&mut self.membership_moved) {
                self.hold_unheld_suspects();
                self.refresh_origins();
                self.live.fit();
            }
        }
        if handled > RUNTIME_KEEP {
            // The runtime's queues keep the capacity of their largest batch (every member's
            // notification after a join): give it back, they are empty now.
            self.rt = AccumulatingRuntime::new();
        }
        self.update_backlog();
        self.refresh_attendance();
        self.scale_transmissions();
    }

    /// Sends per update for the membership's size: at least `max_transmissions`, and
    /// `ceil(4 × log10(N + 1))` as memberlist's retransmit rule gives (12 at 1,000 members, 16
    /// at 10,000). A member misses an update that reaches it by piggybacked sends alone with
    /// a probability of about e^-sends: at 8 sends and 1,000 members one member in three
    /// runs missed a change and waited for its next session (the simulation's 2 s straggler).
    fn scale_transmissions(&mut self) {
        let members = self.foca.num_members();
        if members == self.scaled_for {
            return;
        }
        self.scaled_for = members;
        let want = transmissions_for(self.cfg.max_transmissions, members);
        if want == self.transmissions {
            return;
        }
        let mut c = self.cfg.foca(&self.envelope);
        c.max_transmissions = want;
        if self.foca.set_config(c).is_ok() {
            self.transmissions = want;
        }
    }

    fn schedule_swim(&mut self, after: Duration, timer: foca::Timer<Identity>) {
        if let Some(token) = timer_token(&timer) {
            self.swim_token = Some(token);
        }
        match &timer {
            foca::Timer::ProbeRandomMember(_) | foca::Timer::SendIndirectProbe { .. } => {
                // LHA-Probe: a node that misses acks or runs late probes more slowly, so its
                // own trouble does not make it accuse healthy members.
                let after = self.stretch(after);
                self.schedule(after, TimerKind::Swim(timer));
            }
            foca::Timer::ChangeSuspectToDown { .. } => self.hold_suspicion(timer),
            _ => self.schedule(after, TimerKind::Swim(timer)),
        }
    }

    /// A member came up, went down or was renamed (a new identity of one origin).
    fn notified_membership(&mut self, n: OwnedNotification<Identity>) {
        match n {
            OwnedNotification::MemberUp(id) => {
                self.member_up(id);
                // A member first learned as suspect: foca times out only its own probes'
                // suspicions, so this node holds one for it too (once per batch of
                // notifications, in `after_foca`: a scan of the membership each).
            }
            OwnedNotification::MemberDown(id) => self.member_down(id),
            OwnedNotification::Rename(old, new) => {
                let was_live = self
                    .live
                    .get(&old.node)
                    .is_some_and(|s| s.contains(&old.addr));
                if was_live && old.node == new.node {
                    // The same agent under a new epoch (a restart nobody had noticed yet): its
                    // records stay visible; no down-then-up flap for every watcher.
                    if let Some(set) = self.live.get_mut(&old.node) {
                        set.remove(&old.addr);
                        set.insert(new.addr);
                    }
                } else if was_live {
                    self.member_down(old);
                    self.member_up(new);
                }
            }
            _ => {}
        }
    }

    fn notified(&mut self, n: OwnedNotification<Identity>) {
        match n {
            n @ (OwnedNotification::MemberUp(_)
            | OwnedNotification::MemberDown(_)
            | OwnedNotification::Rename(..)) => {
                self.attend_stale = true;
                self.tree_members_changed();
                self.notified_membership(n);
                // Once per batch (`after_foca`): each is a pass over the membership, and a
                // batch can hold every member (a join, a formed simulation).
                self.membership_moved = true;
            }
            OwnedNotification::Active => {
                self.active_since.get_or_insert(self.now);
                self.reconcile_liveness();
                // Joined (or rejoined): catch up at once rather than at the next round.
                if let Some(peer) = self.random_active() {
                    self.start_sync(peer);
                }
            }
            OwnedNotification::Idle => {}
            OwnedNotification::Defunct => {
                self.forget_down_news();
                if !self.leaving {
                    // Declared down and not renewed by foca: come back under a new epoch.
                    if let Some(new) = foca::Identity::renew(self.foca.identity()) {
                        let _ = self.foca.change_identity(new, &mut self.rt);
                        self.out.push(Output::Renewed { identity: new });
                    }
                }
            }
            // A node on its way out does not come back (foca may renew it as others see it
            // leave).
            OwnedNotification::Rejoin(id) if !self.leaving => {
                self.forget_down_news();
                self.out.push(Output::Renewed { identity: id })
            }
            OwnedNotification::Rejoin(_) => {}
            OwnedNotification::DataReceived(header) => {
                self.last_seen.insert(header.src.addr, self.now);
                if matches!(
                    header.message,
                    foca::Message::Ack(_) | foca::Message::ForwardedAck { .. }
                ) && header.dst == *self.foca.identity()
                {
                    // A probe of ours succeeded: evidence that we are healthy.
                    self.health = self.health.saturating_sub(1);
                }
            }
            OwnedNotification::DataSent(header) => {
                // foca keeps its incarnation to itself; every packet's header carries it.
                if header.src_incarnation > self.incarnation {
                    // We refuted a suspicion of ourselves: others could not hear us.
                    self.bump_health();
                }
                // (Lower after a renewal: a new identity starts at 0.)
                self.incarnation = header.src_incarnation;
            }
            OwnedNotification::ProbeFailed(_, _) => self.bump_health(),
        }
    }
}

/// The token a foca timer carries, if any.
fn timer_token(timer: &foca::Timer<Identity>) -> Option<foca::TimerToken> {
    match timer {
        foca::Timer::ProbeRandomMember(t)
        | foca::Timer::PeriodicAnnounce(t)
        | foca::Timer::PeriodicAnnounceDown(t)
        | foca::Timer::PeriodicGossip(t) => Some(*t),
        foca::Timer::SendIndirectProbe { token, .. }
        | foca::Timer::ChangeSuspectToDown { token, .. } => Some(*token),
        foca::Timer::RemoveDown(_) => None,
    }
}

#[cfg(test)]
mod transmission_tests {
    use super::*;

    #[test]
    fn sends_per_update_grow_with_the_membership_as_memberlist_does() {
        let eight = NonZeroU8::new(8).unwrap();
        let sends = |n| transmissions_for(eight, n).get();
        assert_eq!(
            [sends(0), sends(20), sends(99), sends(999), sends(9_999)],
            [8, 8, 8, 12, 16]
        );
        assert_eq!(
            transmissions_for(NonZeroU8::new(20).unwrap(), 999).get(),
            20
        );
        assert_eq!(
            sends(usize::MAX),
            78,
            "log10 of the largest count, no overflow"
        );
    }
}

/// A node and members for the rooms' unit tests: member `i` at 10.0.0.`i`, this node is 1.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub fn member(i: u8) -> Identity {
        Identity {
            node: NodeId(u64::from(i)),
            addr: format!("10.0.0.{i}:7000").parse().expect("an address"),
            api_port: 7001,
            epoch: 1,
        }
    }

    pub fn node() -> Node {
        let cfg = Config::lan(ClusterName::new("unit").expect("a name"));
        Node::new(member(1), cfg, BTreeMap::new(), Vec::new(), 7)
    }
}
