//! A seeded, deterministic simulation of a cluster: many [`Node`]s with in-memory stores in
//! one thread, on virtual time, over a network model that loses, delays, duplicates and
//! reorders datagrams and can partition nodes; nodes crash, restart and pause (a SIGSTOPped
//! or CPU-starved member). Anti-entropy sessions run as the shell runs them, in steps a
//! network delay apart (the client's hello; the server's hello and plan; the client's plan;
//! each side's batches, checked against the sender's claim), so writes, pushes and applies
//! land between a hello and its plan; a session fails across a partition or a crash, as a
//! TCP session would.
//!
//! Everything that could make two runs differ is ordered: one RNG, an event queue ordered by
//! (time, insertion), `BTreeMap`s where order reaches an output. A run's trace hash covers
//! every event, so two runs of one seed can be compared (`trace`).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use patina_store::{
    Digest, Entry, Filter, LocalWrite, ManualClock, NodeId, ReadBudget, Record, RemoteBatch, Store,
    StoreOptions,
};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::identity::Identity;
use crate::node::{Config, Node, Output, TimerEvent};
use crate::replica::{ApplyOutcome, Touched, local_changes};
use crate::sync::{BATCH_OPS, Claim, within_claim};

/// Run a future that the in-memory store completes without waiting (its commits are inline).
fn now_or_never<T>(f: impl Future<Output = T>) -> T {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory store operation did not complete inline"),
    }
}

/// The network's behaviour.
#[derive(Clone, Debug)]
pub struct Net {
    /// One-way latency range.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// Probability that a datagram is lost, and that it is delivered twice.
    pub loss: f64,
    pub duplicate: f64,
    /// A known one-way latency between each pair of nodes (by index), added to the range
    /// above (then its jitter): a world of places, for network coordinates. `None`: the
    /// range alone.
    pub latency: Option<Latency>,
}

/// One-way latency from node `from` to node `to` (by index): computed per datagram, so that a
/// world of thousands of places holds no N x N matrix.
#[derive(Clone)]
pub struct Latency(pub Arc<dyn Fn(usize, usize) -> Duration + Send + Sync>);

impl Latency {
    pub fn new(f: impl Fn(usize, usize) -> Duration + Send + Sync + 'static) -> Latency {
        Latency(Arc::new(f))
    }

    /// A matrix of latencies (rows by sender); pairs outside it have none.
    pub fn matrix(m: Vec<Vec<Duration>>) -> Latency {
        Latency::new(move |from, to| {
            m.get(from)
                .and_then(|row| row.get(to))
                .copied()
                .unwrap_or_default()
        })
    }

    pub fn between(&self, from: usize, to: usize) -> Duration {
        (self.0)(from, to)
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency(..)")
    }
}

impl Net {
    /// A LAN: 50-250 µs one way, nothing lost.
    pub fn lan() -> Net {
        Net {
            min_delay: Duration::from_micros(50),
            max_delay: Duration::from_micros(250),
            loss: 0.0,
            duplicate: 0.0,
            latency: None,
        }
    }
}

#[derive(Debug)]
enum Event {
    Datagram {
        to: usize,
        bytes: Vec<u8>,
    },
    Timer {
        node: usize,
        life: u64,
        timer: TimerEvent,
    },
    Corroborated {
        node: usize,
        life: u64,
        member: Identity,
        gone: bool,
    },
    /// An attended member's stream ended and its port refused (see `Output::Attend`).
    Unreachable {
        node: usize,
        life: u64,
        member: Identity,
    },
    SyncDone {
        node: usize,
        life: u64,
        peer: Identity,
        ok: bool,
    },
    /// A session's client hello reaches its server (`node`), which answers with its own
    /// hello and plans its half.
    SessionHello {
        node: usize,
        session: u64,
    },
    /// The server's hello reaches the client (`node`), which plans its half.
    SessionPlan {
        node: usize,
        session: u64,
    },
    /// One side's batches reach the other (`node`), checked against the sender's claim.
    SessionBatches {
        node: usize,
        session: u64,
        batches: Vec<RemoteBatch>,
        claim: Digest,
    },
    /// The last check of a suspect reaches it (`node`): it answers if it runs as `member`.
    Ask {
        node: usize,
        asker: usize,
        asker_life: u64,
        member: Identity,
        round: u64,
    },
    Confirmed {
        node: usize,
        life: u64,
        member: Identity,
        round: u64,
        incarnation: Option<u16>,
    },
}

/// A session under way, between the steps of [`Event::SessionHello`] and its done.
struct SimSession {
    client: usize,
    client_life: u64,
    server: usize,
    server_life: u64,
    /// The client's identity of the server, as the node asked for it.
    peer: Identity,
    claim_client: Claim,
    claim_server: Option<Claim>,
    /// Directions whose batches have arrived.
    delivered: u8,
    /// A batch fell outside its sender's claim (the receiver aborted).
    refused: bool,
    /// The coordinate the server's hello carried, and when the client's hello left.
    server_coordinate: Option<crate::coords::Coordinate>,
    /// Coordinates each hello shared: its sender's own and some of its peers'.
    client_shared: Vec<(NodeId, crate::coords::Coordinate)>,
    server_shared: Vec<(NodeId, crate::coords::Coordinate)>,
    started: Duration,
    /// The members each hello listed as down lately (`node/down_news.rs`).
    client_downs: Vec<Identity>,
    server_downs: Vec<Identity>,
}

/// How sessions ended: the simulator's version of `patina status`'s session counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionCounts {
    pub ok: u64,
    /// Ended by a batch outside its sender's claim: a bug, never the network's doing.
    pub refused: u64,
    /// Ended by a cut, a crash or a peer that was not there.
    pub broken: u64,
}

struct SimNode {
    node: Option<Node>,
    store: Store,
    identity: Identity,
    /// Bumped at each crash: events of an earlier life are dropped.
    life: u64,
    /// Position in the store's feed already handed to the node.
    feed_after: u64,
    /// Until when the node is paused (events for it wait).
    paused_until: Duration,
    /// Its gossip keys (kept across restarts, as the keyring file keeps them).
    keyring: crate::keyring::Keyring,
    /// The members it attends (its held streams: a crash of one ends its stream).
    attending: Vec<Identity>,
}

/// The seeds a simulation test runs: `PATINA_SIM_SEED=N` replays one; otherwise
/// `PATINA_SIM_RUNS` (default `default_runs`) seeds counted up from `base`.
pub fn seeds(default_runs: u64, base: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("PATINA_SIM_SEED") {
        return vec![s.parse().expect("PATINA_SIM_SEED is a number")];
    }
    let runs: u64 = std::env::var("PATINA_SIM_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_runs);
    (0..runs).map(|i| base + i).collect()
}

/// The wall clock's reading at virtual time zero (ms since the Unix epoch).
pub const SIM_EPOCH_MS: u64 = 1_700_000_000_000;

/// A simulated cluster.
pub struct World {
    /// Every store's wall clock: virtual time, from [`SIM_EPOCH_MS`].
    clock: Arc<ManualClock>,
    pub now: Duration,
    pub net: Net,
    cfg: Config,
    rng: StdRng,
    nodes: Vec<SimNode>,
    queue: BinaryHeap<Reverse<(Duration, u64, usize)>>,
    events: BTreeMap<usize, Event>,
    seq: u64,
    /// Pairs (a, b) where a cannot reach b.
    cut: BTreeSet<(usize, usize)>,
    /// One-way datagram cuts: (from, to) loses every datagram; gRPC still works.
    udp_cut: BTreeSet<(usize, usize)>,
    trace: u64,
    groups: BTreeSet<String>,
    pub datagrams: u64,
    pub datagram_bytes: u64,
    /// Per change (origin, seq): each node that committed it and did not write it, and when
    /// it first did.
    pub learned_at: BTreeMap<(NodeId, u64), Vec<(usize, Duration)>>,
    track_learning: bool,
    /// Per owner: how many times some node took it for down.
    pub downs: BTreeMap<NodeId, u64>,
    /// Per owner, with [`World::track_learning`]: each node that hid it, and when.
    pub down_at: BTreeMap<NodeId, Vec<(usize, Duration)>>,
    /// Per node: how many times it took itself for declared down and rejoined under a new
    /// epoch.
    pub renewals: BTreeMap<usize, u64>,
    sessions: BTreeMap<u64, SimSession>,
    next_session: u64,
    /// Nodes whose store takes nothing from peers, as a full disk refuses.
    disk_full: BTreeSet<usize>,
    /// Per node: owners it hid while its view (judged just before, as the shell does) stood.
    pub hides_standing: BTreeMap<usize, u64>,
    pub session_counts: SessionCounts,
}

fn addr_of(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
        7000,
    )
}

impl World {
    /// `n` nodes, each seeded through node 0 and 1, started at once.
    pub fn new(n: usize, cfg: Config, net: Net, seed: u64) -> World {
        World::with_kind(n, cfg, net, seed, Arc::new(patina_store::OpaqueKind))
    }

    /// [`World::new`] whose stores hold records of `kind` (a tier's own rules).
    pub fn with_kind(
        n: usize,
        cfg: Config,
        net: Net,
        seed: u64,
        kind: patina_store::KindRef,
    ) -> World {
        World::build(n, cfg, net, seed, kind, |_| None)
    }

    /// [`World::new`] where node `i` starts with `keyring(i)` when it gives one (others with
    /// the config's).
    pub fn with_keyrings(
        n: usize,
        cfg: Config,
        net: Net,
        seed: u64,
        keyring: impl Fn(usize) -> Option<crate::keyring::Keyring>,
    ) -> World {
        World::build(
            n,
            cfg,
            net,
            seed,
            Arc::new(patina_store::OpaqueKind),
            keyring,
        )
    }

    fn build(
        n: usize,
        cfg: Config,
        net: Net,
        seed: u64,
        kind: patina_store::KindRef,
        keyring: impl Fn(usize) -> Option<crate::keyring::Keyring>,
    ) -> World {
        let clock = Arc::new(ManualClock::new(SIM_EPOCH_MS));
        let mut w = World {
            clock: clock.clone(),
            now: Duration::ZERO,
            net,
            cfg,
            rng: StdRng::seed_from_u64(seed),
            nodes: Vec::with_capacity(n),
            queue: BinaryHeap::new(),
            events: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            udp_cut: BTreeSet::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            groups: BTreeSet::new(),
            datagrams: 0,
            datagram_bytes: 0,
            learned_at: BTreeMap::new(),
            track_learning: false,
            downs: BTreeMap::new(),
            down_at: BTreeMap::new(),
            renewals: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 0,
            disk_full: BTreeSet::new(),
            hides_standing: BTreeMap::new(),
            session_counts: SessionCounts::default(),
        };
        for i in 0..n {
            let node_id = NodeId(1000 + i as u64);
            let opts = StoreOptions {
                clock: clock.clone(),
                kind: kind.clone(),
                ..StoreOptions::default()
            };
            let store = Store::in_memory(node_id, seed ^ i as u64, opts);
            let identity = Identity {
                node: node_id,
                addr: addr_of(i).into(),
                api_port: 7001,
                epoch: 1,
            };
            w.nodes.push(SimNode {
                node: None,
                store,
                identity,
                life: 0,
                feed_after: 0,
                paused_until: Duration::ZERO,
                keyring: keyring(i).unwrap_or_else(|| w.cfg.keyring.clone()),
                attending: Vec::new(),
            });
            w.boot(i);
        }
        w
    }

    /// Give every running node every other as an alive member, as a formed cluster holds
    /// them ([`Node::assume_members`]), a few nodes at each moment of the first probe period
    /// (virtual time moves on by one period): for figures of a formed cluster of thousands
    /// of nodes, whose joins would take most of the simulation's time.
    pub fn form(&mut self) {
        let ids: Vec<Identity> = self
            .nodes
            .iter()
            .filter(|n| n.node.is_some())
            .map(|n| n.identity)
            .collect();
        // Each node takes the list on its own (on the machine's cores: foca finds each new
        // member by a scan of those it holds, N^2 per node); what they ask for is then queued
        // in node order, as one at a time would. A few nodes at a time, each few at a later
        // moment of the first probe period: real agents come up at different moments, and
        // nodes formed at one instant would probe and gossip in step, every one at the same
        // instants, so that a change written just after them waited a whole period everywhere.
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
        let block = 2 * threads;
        let blocks = self.nodes.len().div_ceil(block).max(1);
        let (start, period) = (self.now, self.cfg.probe_period);
        for (k, first) in (0..self.nodes.len()).step_by(block).enumerate() {
            self.run_until(start + period.mul_f64(k as f64 / blocks as f64));
            let now = self.now;
            let end = (first + block).min(self.nodes.len());
            let chunk = (end - first).div_ceil(threads).max(1);
            std::thread::scope(|s| {
                for part in self.nodes[first..end].chunks_mut(chunk) {
                    let ids = &ids;
                    s.spawn(move || {
                        for n in part {
                            if let Some(node) = n.node.as_mut() {
                                node.assume_members(now, ids);
                            }
                        }
                    });
                }
            });
            for i in first..end {
                self.pump(i);
            }
        }
    }

    /// Record, for every change, when each node learned it, and for every owner, when each
    /// node hid it (for propagation figures).
    pub fn track_learning(&mut self) {
        self.track_learning = true;
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    pub fn store(&self, i: usize) -> &Store {
        &self.nodes[i].store
    }

    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes[i].node.as_ref()
    }

    /// Node `i`'s view, judged now (`i` must be up).
    pub fn view(&mut self, i: usize) -> crate::node::ViewStatus {
        let now = self.now;
        self.nodes[i]
            .node
            .as_mut()
            .expect("a node that is up")
            .view_status(now)
    }

    pub fn node_id(&self, i: usize) -> NodeId {
        self.nodes[i].identity.node
    }

    /// A hash of every event so far: equal for two runs of one seed.
    pub fn trace(&self) -> u64 {
        self.trace
    }

    fn mix(&mut self, v: u64) {
        self.trace = (self.trace ^ v).wrapping_mul(0x0100_0000_01b3);
    }

    fn boot(&mut self, i: usize) {
        let seeds = vec![addr_of(0), addr_of(1)];
        let seed = self.rng.random::<u64>();
        let n = &mut self.nodes[i];
        n.identity.epoch += 1;
        let cfg = Config {
            keyring: n.keyring.clone(),
            ..self.cfg.clone()
        };
        let mut node = Node::new(n.identity, cfg, n.store.digest(), seeds, seed);
        n.feed_after = n.store.feed().revision();
        node.start(self.now);
        n.node = Some(node);
        self.pump(i);
    }

    fn push_event(&mut self, at: Duration, ev: Event) {
        self.seq += 1;
        let id = self.seq as usize;
        self.events.insert(id, ev);
        self.queue.push(Reverse((at, self.seq, id)));
    }

    /// The delay of one message from node `from` to node `to`.
    fn delay(&mut self, from: usize, to: usize) -> Duration {
        let lo = self.net.min_delay.as_nanos() as u64;
        let hi = self.net.max_delay.as_nanos() as u64;
        let jitter = Duration::from_nanos(self.rng.random_range(lo..=hi.max(lo)));
        let base = self
            .net
            .latency
            .as_ref()
            .map(|l| l.between(from, to))
            .unwrap_or_default();
        base + jitter
    }

    fn index_of(&self, addr: SocketAddr) -> Option<usize> {
        let o = match addr.ip() {
            IpAddr::V4(ip) => ip.octets(),
            IpAddr::V6(_) => return None,
        };
        let i = ((o[1] as usize) << 16) | ((o[2] as usize) << 8) | o[3] as usize;
        (o[0] == 10 && matches!(addr.port(), 7000 | 7001) && i < self.nodes.len()).then_some(i)
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cut.contains(&(a, b))
    }

    /// Carry out what node `i` asked for.
    fn pump(&mut self, i: usize) {
        loop {
            let Some(node) = self.nodes[i].node.as_mut() else {
                return;
            };
            let outs = node.drain();
            if outs.is_empty() {
                return;
            }
            // As the shell: the view is judged before a liveness change goes to the store.
            if outs.iter().any(|o| matches!(o, Output::Liveness { .. })) {
                let view = node.view_status(self.now);
                let hides = outs
                    .iter()
                    .filter(|o| matches!(o, Output::Liveness { down: true, .. }))
                    .count() as u64;
                if view.stands {
                    *self.hides_standing.entry(i).or_default() += hides;
                }
            }
            let life = self.nodes[i].life;
            for out in outs {
                match out {
                    Output::Send { to, bytes, .. } => {
                        self.datagrams += 1;
                        self.datagram_bytes += bytes.len() as u64;
                        let Some(j) = self.index_of(to) else { continue };
                        if !self.reachable(i, j)
                            || self.udp_cut.contains(&(i, j))
                            || self.rng.random_bool(self.net.loss)
                        {
                            continue;
                        }
                        let copies = if self.rng.random_bool(self.net.duplicate) {
                            2
                        } else {
                            1
                        };
                        for _ in 0..copies {
                            let at = self.now + self.delay(i, j);
                            self.push_event(
                                at,
                                Event::Datagram {
                                    to: j,
                                    bytes: bytes.clone(),
                                },
                            );
                        }
                    }
                    Output::Schedule { after, timer } => {
                        self.push_event(
                            self.now + after,
                            Event::Timer {
                                node: i,
                                life,
                                timer,
                            },
                        );
                    }
                    Output::Apply { records } => self.apply(i, records),
                    Output::Liveness { node, down } => {
                        if down {
                            *self.downs.entry(node).or_default() += 1;
                            if self.track_learning {
                                self.down_at.entry(node).or_default().push((i, self.now));
                            }
                        }
                        let _ = now_or_never(self.nodes[i].store.set_owner_down(node, down));
                    }
                    Output::Retire { origin } => {
                        let retired = now_or_never(self.nodes[i].store.retire_origin(origin));
                        if matches!(retired, Ok(true))
                            && let Some(node) = self.nodes[i].node.as_mut()
                        {
                            node.handle_retired(self.now, origin);
                        }
                    }
                    Output::Corroborate { member } => {
                        let j = self.index_of(member.addr());
                        let (gone, after) = match j {
                            Some(j) if self.nodes[j].node.is_some() && self.reachable(i, j) => {
                                (false, Duration::from_millis(1))
                            }
                            Some(j) if self.nodes[j].node.is_none() && self.reachable(i, j) => {
                                // Refused at once.
                                (true, Duration::from_millis(1))
                            }
                            _ => (true, Duration::from_millis(500)),
                        };
                        self.push_event(
                            self.now + after,
                            Event::Corroborated {
                                node: i,
                                life,
                                member,
                                gone,
                            },
                        );
                    }
                    Output::Confirm { member, round } => {
                        // As the shell: no answer within CONFIRM_ASK is answered `None`.
                        self.push_event(
                            self.now + crate::node::CONFIRM_ASK,
                            Event::Confirmed {
                                node: i,
                                life,
                                member,
                                round,
                                incarnation: None,
                            },
                        );
                        if let Some(j) = self
                            .index_of(member.addr())
                            .filter(|j| self.reachable(i, *j))
                        {
                            let at = self.now + self.delay(i, j);
                            self.push_event(
                                at,
                                Event::Ask {
                                    node: j,
                                    asker: i,
                                    asker_life: life,
                                    member,
                                    round,
                                },
                            );
                        }
                    }
                    Output::Sync { peer } => self.sync(i, peer),
                    // A stream to a member that is not running is never established:
                    // nothing is reported (SWIM judges it), as in the shell.
                    Output::Attend { members } => self.nodes[i].attending = members,
                    Output::Renewed { identity } => {
                        *self.renewals.entry(i).or_default() += 1;
                        self.nodes[i].identity = identity;
                    }
                    Output::ClockFence(fence) => self.nodes[i].store.set_clock_fence(fence),
                    Output::OriginConflict { .. } => {
                        let _ = now_or_never(self.nodes[i].store.leave_origin());
                        self.follow_feed(i);
                    }
                }
            }
        }
    }

    fn apply(&mut self, i: usize, records: Vec<Record>) {
        self.apply_batch(
            i,
            RemoteBatch {
                records,
                covered: Vec::new(),
            },
        );
    }

    /// Commit a batch from peers at node `i` and tell its node what became known, as the
    /// shell's reporter does. A node whose disk is full ([`World::set_disk_full`]) takes
    /// nothing: its store answers as a full disk does, and the batch is dropped.
    fn apply_batch(&mut self, i: usize, batch: RemoteBatch) -> bool {
        let touched = Touched::of(&batch);
        let before = if self.track_learning {
            Some(self.nodes[i].store.digest())
        } else {
            None
        };
        let applied =
            !self.disk_full.contains(&i) && now_or_never(self.nodes[i].store.apply(batch)).is_ok();
        let digest = self.nodes[i].store.digest();
        if let Some(before) = before {
            for r in &touched.settled {
                let was = before.get(&r.0).is_some_and(|k| k.knows(r.1));
                let is = digest.get(&r.0).is_some_and(|k| k.knows(r.1));
                if is && !was {
                    self.learned_at.entry(*r).or_default().push((i, self.now));
                }
            }
        }
        let now = self.now;
        let outcome = touched.outcome(applied, &digest);
        if let Some(node) = self.nodes[i].node.as_mut() {
            match outcome {
                ApplyOutcome::Learned { known, settled } => {
                    node.handle_learned(now, known, &settled)
                }
                ApplyOutcome::Dropped(versions) => node.handle_dropped(now, &versions),
            }
        }
        applied
    }

    /// What `from` sends in a session: everything its peer lacks by their claims, planned
    /// from `from`'s own claim (its hello), as the shell's `send_lacking` does.
    fn session_batches(&self, from: usize, ours: &Claim, theirs: &Digest) -> Vec<RemoteBatch> {
        let store = &self.nodes[from].store;
        let mut out = Vec::new();
        let mut batch = RemoteBatch::default();
        for (origin, range) in ours.plan(theirs) {
            let mut rest = Some(range);
            while let Some(r) = rest {
                let got = now_or_never(store.read_origin(
                    origin,
                    r,
                    ReadBudget {
                        max_records: BATCH_OPS,
                        max_bytes: 256 << 10,
                    },
                ))
                .expect("in-memory read");
                batch.records.extend(got.records);
                batch
                    .covered
                    .extend(got.covered.into_iter().map(|c| (origin, c)));
                if batch.records.len() + batch.covered.len() >= BATCH_OPS / 2 {
                    out.push(std::mem::take(&mut batch));
                }
                rest = got.rest;
            }
        }
        if !batch.records.is_empty() || !batch.covered.is_empty() {
            out.push(batch);
        }
        out
    }

    /// Node `i` starts a session with `peer`: its hello (and the claim it makes) leaves now;
    /// the rest happens a network delay per step later ([`Event::SessionHello`]). A peer that
    /// is not there fails it after a connect timeout.
    fn sync(&mut self, i: usize, peer: Identity) {
        let life = self.nodes[i].life;
        let j = self
            .index_of(peer.addr())
            .filter(|&j| self.nodes[j].node.is_some() && self.reachable(i, j));
        let Some(j) = j else {
            self.session_counts.broken += 1;
            self.push_event(
                self.now + Duration::from_millis(1000),
                Event::SyncDone {
                    node: i,
                    life,
                    peer,
                    ok: false,
                },
            );
            return;
        };
        let session = self.next_session;
        self.next_session += 1;
        let client_downs = self.down_news(i);
        let client_shared = self.shared_coordinates(i);
        self.sessions.insert(
            session,
            SimSession {
                client: i,
                client_life: life,
                server: j,
                server_life: self.nodes[j].life,
                peer,
                claim_client: Claim::of(self.nodes[i].store.digest()),
                claim_server: None,
                delivered: 0,
                refused: false,
                server_coordinate: None,
                client_shared,
                server_shared: Vec::new(),
                started: self.now,
                client_downs,
                server_downs: Vec::new(),
            },
        );
        let at = self.now + self.delay(i, j);
        self.push_event(at, Event::SessionHello { node: j, session });
    }

    /// The coordinates node `i`'s hello shares: its own, then some of its peers' (as the
    /// shell's `hello` does).
    fn shared_coordinates(&mut self, i: usize) -> Vec<(NodeId, crate::coords::Coordinate)> {
        let id = self.nodes[i].identity.node;
        match self.nodes[i].node.as_mut() {
            Some(node) => {
                let mut out = vec![(id, node.coordinate().clone())];
                out.extend(node.coordinates_to_share());
                out
            }
            None => Vec::new(),
        }
    }

    /// What node `i`'s hello lists as down lately (as the shell's `hello` does).
    fn down_news(&self, i: usize) -> Vec<Identity> {
        let Some(node) = self.nodes[i].node.as_ref() else {
            return Vec::new();
        };
        let mut news: Vec<Identity> = node.recent_downs().map(|(m, _)| m).collect();
        news.reverse();
        news.truncate(crate::node::MAX_DOWN_NEWS);
        news
    }

    /// Node `i` reads a hello's down news (and sends what declaring them down makes it send).
    fn hear_down_news(&mut self, i: usize, news: &[Identity]) {
        let now = self.now;
        if !news.is_empty()
            && self.nodes[i]
                .node
                .as_mut()
                .is_some_and(|n| n.handle_down_news(now, news) > 0)
        {
            self.pump(i);
        }
    }

    /// Is session `id` still possible: both ends alive in the lives it started with, and the
    /// path open both ways?
    fn session_holds(&self, s: &SimSession) -> bool {
        let up = |n: usize, life: u64| self.nodes[n].node.is_some() && self.nodes[n].life == life;
        up(s.client, s.client_life)
            && up(s.server, s.server_life)
            && self.reachable(s.client, s.server)
            && self.reachable(s.server, s.client)
    }

    /// End session `id`: its client hears how it went a network delay later.
    fn end_session(&mut self, id: u64, ok: bool) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        match (ok, s.refused) {
            (true, _) => self.session_counts.ok += 1,
            (false, true) => self.session_counts.refused += 1,
            (false, false) => self.session_counts.broken += 1,
        }
        let at = self.now + self.delay(s.server, s.client);
        self.push_event(
            at,
            Event::SyncDone {
                node: s.client,
                life: s.client_life,
                peer: s.peer,
                ok,
            },
        );
    }

    /// A step of session `id` at node `i`.
    fn session_step(&mut self, i: usize, id: u64, ev: Event) {
        let holds = self
            .sessions
            .get(&id)
            .is_some_and(|s| self.session_holds(s));
        if !holds {
            self.end_session(id, false);
            return;
        }
        match ev {
            Event::SessionHello { .. } => {
                // The server: the client's down news, then its hello, its claim, its plan
                // from that claim.
                let news =
                    std::mem::take(&mut self.sessions.get_mut(&id).expect("held").client_downs);
                self.hear_down_news(i, &news);
                let shared =
                    std::mem::take(&mut self.sessions.get_mut(&id).expect("held").client_shared);
                let now = self.now;
                if let Some(node) = self.nodes[i].node.as_mut() {
                    node.handle_shared_coordinates(now, &shared);
                }
                let server_shared = self.shared_coordinates(i);
                let server_downs = self.down_news(i);
                let claim = Claim::of(self.nodes[i].store.digest());
                let theirs = self.sessions[&id].claim_client.digest().clone();
                let batches = self.session_batches(i, &claim, &theirs);
                let client = self.sessions[&id].client;
                let at = self.now + self.delay(i, client);
                self.push_event(
                    at,
                    Event::SessionBatches {
                        node: client,
                        session: id,
                        batches,
                        claim: claim.digest().clone(),
                    },
                );
                self.push_event(
                    at,
                    Event::SessionPlan {
                        node: client,
                        session: id,
                    },
                );
                let coordinate = self.nodes[i].node.as_ref().map(|n| n.coordinate().clone());
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.claim_server = Some(claim);
                    s.server_coordinate = coordinate;
                    s.server_downs = server_downs;
                    s.server_shared = server_shared;
                }
            }
            Event::SessionPlan { .. } => {
                // The client, a round trip after its hello: it plans from that hello's claim.
                let s = &self.sessions[&id];
                let ours = s.claim_client.clone();
                let theirs = s
                    .claim_server
                    .as_ref()
                    .map(|c| c.digest().clone())
                    .unwrap_or_default();
                let server = s.server;
                let (peer, coordinate, started) = (s.peer, s.server_coordinate.clone(), s.started);
                let news = s.server_downs.clone();
                let shared = s.server_shared.clone();
                // The server's hello's down news, as the client reads that hello.
                self.hear_down_news(i, &news);
                // Its hello's round trip, and the coordinate the server's hello carried.
                if let (Some(c), Some(node)) = (coordinate, self.nodes[i].node.as_mut()) {
                    node.handle_coordinate_sample(self.now, peer, c, self.now - started);
                }
                if let Some(node) = self.nodes[i].node.as_mut() {
                    node.handle_shared_coordinates(self.now, &shared);
                }
                let batches = self.session_batches(i, &ours, &theirs);
                let at = self.now + self.delay(i, server);
                self.push_event(
                    at,
                    Event::SessionBatches {
                        node: server,
                        session: id,
                        batches,
                        claim: ours.digest().clone(),
                    },
                );
            }
            Event::SessionBatches { batches, claim, .. } => {
                for b in batches {
                    if let Err(e) = within_claim(&b, &claim) {
                        tracing::debug!(error = %e, "simulated session refused a batch");
                        if let Some(s) = self.sessions.get_mut(&id) {
                            s.refused = true;
                        }
                        self.end_session(id, false);
                        self.pump(i);
                        return;
                    }
                    if !self.apply_batch(i, b) {
                        // The receiver's store took nothing: the session fails there.
                        self.end_session(id, false);
                        self.pump(i);
                        return;
                    }
                }
                self.pump(i);
                let done = self.sessions.get_mut(&id).is_some_and(|s| {
                    s.delivered += 1;
                    s.delivered == 2
                });
                if done {
                    self.end_session(id, true);
                }
            }
            _ => unreachable!("a session step"),
        }
    }

    /// Hand node `i` its local changes from the store's feed, as the shell's follower does.
    fn follow_feed(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let Ok((records, upto)) = local_changes(&n.store, n.feed_after, usize::MAX) else {
            n.feed_after = n.store.feed().revision();
            return;
        };
        n.feed_after = upto;
        if records.is_empty() {
            return;
        }
        let now = self.now;
        if let Some(node) = self.nodes[i].node.as_mut() {
            node.handle_local(now, &records);
        }
        self.pump(i);
    }

    /// A local write at node `i` (a machine upsert). Returns whether it was accepted.
    pub fn write(&mut self, i: usize, key: &str, group: &str, value: &[u8]) -> bool {
        if self.nodes[i].node.is_none() {
            return false;
        }
        self.groups.insert(group.to_owned());
        let ok = now_or_never(self.nodes[i].store.write(vec![LocalWrite::Put {
            key: key.into(),
            group: group.into(),
            value: value.to_vec(),
        }]))
        .is_ok();
        self.mix(0x77 ^ i as u64);
        self.follow_feed(i);
        ok
    }

    pub fn delete(&mut self, i: usize, key: &str) -> bool {
        if self.nodes[i].node.is_none() {
            return false;
        }
        let ok = now_or_never(
            self.nodes[i]
                .store
                .write(vec![LocalWrite::Delete { key: key.into() }]),
        )
        .is_ok();
        self.follow_feed(i);
        ok
    }

    /// Node `i` seals and opens datagrams with `keyring` from now on (and after restarts).
    pub fn set_keyring(&mut self, i: usize, keyring: crate::keyring::Keyring) {
        let n = &mut self.nodes[i];
        n.keyring = keyring.clone();
        if let Some(node) = n.node.as_mut() {
            node.set_keyring(keyring);
        }
    }

    /// The keyring node `i` holds.
    pub fn keyring(&self, i: usize) -> &crate::keyring::Keyring {
        &self.nodes[i].keyring
    }

    /// Stop node `i` as kill -9 would: nothing more is sent, its timers die. Its store is
    /// kept (every commit was durable).
    pub fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.node = None;
        n.life += 1;
        n.attending.clear();
        let dead = n.identity;
        self.mix(0xc0 ^ i as u64);
        // Its host closes its connections: each member attending it sees its stream end
        // (one way), then a connection refused (a round trip). A cut path carries neither.
        for a in 0..self.nodes.len() {
            if self.nodes[a].node.is_some()
                && self.nodes[a].attending.contains(&dead)
                && self.reachable(i, a)
                && self.reachable(a, i)
            {
                let at = self.now + self.delay(i, a) + self.delay(a, i) + self.delay(i, a);
                let life = self.nodes[a].life;
                self.push_event(
                    at,
                    Event::Unreachable {
                        node: a,
                        life,
                        member: dead,
                    },
                );
            }
        }
    }

    /// Start node `i` again under a new epoch.
    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].node.is_none() {
            self.mix(0x5e ^ i as u64);
            self.boot(i);
        }
    }

    /// Freeze node `i` for `d` (SIGSTOP, or a starved CPU): its events wait until then.
    /// Node `i`'s disk fills up (`true`: its store takes nothing from peers, as a full disk
    /// refuses) or has room again.
    pub fn set_disk_full(&mut self, i: usize, full: bool) {
        if full {
            self.disk_full.insert(i);
        } else {
            self.disk_full.remove(&i);
        }
    }

    /// A datagram from outside the cluster (forged, garbage) reaches node `i` now.
    pub fn inject(&mut self, i: usize, bytes: Vec<u8>) {
        let now = self.now;
        self.push_event(now, Event::Datagram { to: i, bytes });
    }

    pub fn pause(&mut self, i: usize, d: Duration) {
        self.nodes[i].paused_until = self.now + d;
    }

    /// Cut the network between the two groups, both ways.
    pub fn partition(&mut self, a: &[usize], b: &[usize]) {
        for &x in a {
            for &y in b {
                self.cut.insert((x, y));
                self.cut.insert((y, x));
            }
        }
    }

    /// Lose every datagram `from` sends to `to` (one way); sessions and checks still work,
    /// as when a firewall drops UDP only.
    pub fn drop_datagrams(&mut self, from: usize, to: usize) {
        self.udp_cut.insert((from, to));
    }

    pub fn heal(&mut self) {
        self.cut.clear();
        self.udp_cut.clear();
    }

    /// Run events until `until`.
    pub fn run_until(&mut self, until: Duration) {
        while let Some(Reverse((at, _, _))) = self.queue.peek() {
            if *at > until {
                break;
            }
            let Some(Reverse((at, seq, id))) = self.queue.pop() else {
                break;
            };
            let ev = self.events.remove(&id).expect("queued event");
            let target = match &ev {
                Event::Datagram { to, .. } => *to,
                Event::Timer { node, .. }
                | Event::Corroborated { node, .. }
                | Event::Unreachable { node, .. }
                | Event::SyncDone { node, .. }
                | Event::SessionHello { node, .. }
                | Event::SessionPlan { node, .. }
                | Event::SessionBatches { node, .. }
                | Event::Ask { node, .. }
                | Event::Confirmed { node, .. } => *node,
            };
            if self.nodes[target].paused_until > at {
                // Frozen: the event waits, in order, until the node runs again.
                let resume = self.nodes[target].paused_until;
                self.events.insert(id, ev);
                self.queue.push(Reverse((resume, seq, id)));
                continue;
            }
            self.now = at;
            self.clock.set(SIM_EPOCH_MS + at.as_millis() as u64);
            self.mix(at.as_nanos() as u64);
            self.mix(seq);
            self.handle(target, ev);
        }
        self.now = self.now.max(until);
        self.clock.set(SIM_EPOCH_MS + self.now.as_millis() as u64);
    }

    /// Run for `d` more.
    pub fn run_for(&mut self, d: Duration) {
        self.run_until(self.now + d);
    }

    fn handle(&mut self, i: usize, ev: Event) {
        let life = self.nodes[i].life;
        let now = self.now;
        if let Event::Ask {
            asker,
            asker_life,
            member,
            round,
            ..
        } = ev
        {
            // The suspect answers if it runs under that identity, over a path that works.
            let Some(node) = self.nodes[i].node.as_ref() else {
                return;
            };
            if node.identity() == member && self.reachable(i, asker) {
                let incarnation = Some(node.incarnation());
                let at = now + self.delay(i, asker);
                self.push_event(
                    at,
                    Event::Confirmed {
                        node: asker,
                        life: asker_life,
                        member,
                        round,
                        incarnation,
                    },
                );
            }
            return;
        }
        if let Event::SessionHello { session, .. }
        | Event::SessionPlan { session, .. }
        | Event::SessionBatches { session, .. } = ev
        {
            self.session_step(i, session, ev);
            return;
        }
        let Some(node) = self.nodes[i].node.as_mut() else {
            return;
        };
        match ev {
            Event::Datagram { bytes, .. } => {
                self.trace = (self.trace ^ bytes.len() as u64).wrapping_mul(0x0100_0000_01b3);
                node.handle_datagram(now, &bytes);
            }
            Event::Timer { life: l, timer, .. } => {
                if l != life {
                    return;
                }
                node.handle_timer(now, timer);
            }
            Event::Corroborated {
                life: l,
                member,
                gone,
                ..
            } => {
                if l != life {
                    return;
                }
                node.handle_corroboration(now, member, gone);
            }
            Event::Unreachable {
                life: l, member, ..
            } => {
                if l == life {
                    node.handle_unreachable(now, member);
                }
            }
            Event::SyncDone {
                life: l, peer, ok, ..
            } => {
                if l != life {
                    return;
                }
                let end = if ok {
                    crate::node::SyncEnd::Complete
                } else {
                    crate::node::SyncEnd::Failed
                };
                node.handle_sync_done(now, peer, end);
            }
            Event::Confirmed {
                life: l,
                member,
                round,
                incarnation,
                ..
            } => {
                if l != life {
                    return;
                }
                node.handle_confirmation(now, member, round, incarnation);
            }
            Event::Ask { .. }
            | Event::SessionHello { .. }
            | Event::SessionPlan { .. }
            | Event::SessionBatches { .. } => unreachable!("handled above"),
        }
        self.pump(i);
    }

    /// Live records node `i` serves, by key, with their versions.
    pub fn served(&self, i: usize) -> BTreeMap<String, (NodeId, u64)> {
        let mut out = BTreeMap::new();
        for g in &self.groups {
            for e in self.nodes[i].store.list(g, Filter::All) {
                out.insert(e.key().to_owned(), (e.version().origin, e.version().seq));
            }
        }
        out
    }

    /// Every record node `i` holds (hidden ones too), by key: what must converge.
    pub fn held(&self, i: usize, keys: &BTreeSet<String>) -> BTreeMap<String, Option<Entry>> {
        keys.iter()
            .map(|k| {
                (
                    k.clone(),
                    self.nodes[i].store.get_latest(k).map(|r| {
                        Entry::new(
                            &r.key,
                            &r.group,
                            r.value.as_deref(),
                            Default::default(),
                            r.version,
                            0,
                        )
                    }),
                )
            })
            .collect()
    }

    /// The digest of node `i`.
    pub fn digest(&self, i: usize) -> Digest {
        self.nodes[i].store.digest()
    }

    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}
