//! The node's task: the one loop that owns the `Node`, on its own thread and runtime. It reads
//! SWIM, due timers, inputs and pushes, in that order, and after every input carries out
//! what the node asked (datagrams, timers, applies, liveness, checks, sessions), judging the
//! view before any liveness change leaves.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use patina_store::{NodeId, Record, Store};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{
    DownNews, Fault, Gossip, Input, LEAVE_GRACE, RECV_BUFFER, Reporter, Snapshot, VIEW_EVERY,
    ask_incarnation, local_ip, port_answers, session, write_epoch,
};
use crate::node::{Lane, Node, Output, TimerEvent, ViewReason, ViewStatus};
use crate::replica::Touched;

/// The node's two sockets: SWIM at the gossip address, pushes at the gRPC port's number.
pub(super) struct Sockets {
    pub(super) swim: UdpSocket,
    pub(super) push: UdpSocket,
}

pub(super) struct Task {
    pub(super) node: Node,
    /// The agent's runtime, where sessions, applies and checks run.
    pub(super) main: tokio::runtime::Handle,
    pub(super) rx: mpsc::Receiver<Input>,
    pub(super) timers: BinaryHeap<Reverse<(Duration, u64, TimerSlot)>>,
    pub(super) timer_seq: u64,
    pub(super) base: Instant,
    pub(super) store: Store,
    pub(super) reporter: Reporter,
    pub(super) applies: Arc<tokio::sync::Semaphore>,
    pub(super) liveness: mpsc::UnboundedSender<(NodeId, bool)>,
    pub(super) gossip: Gossip,
    pub(super) epoch_file: PathBuf,
    pub(super) tasks: JoinSet<()>,
    pub(super) view_tx: tokio::sync::watch::Sender<ViewStatus>,
    /// When the view was last judged.
    pub(super) view_at: Option<Duration>,
    /// Bumped at each keyring change (see [`Input::Keyring`]).
    pub(super) keyring_gen: u64,
    /// The members attended, each by a task of its own.
    pub(super) attending:
        std::collections::HashMap<crate::identity::Identity, tokio::task::AbortHandle>,
}

/// A timer in the heap; ordered by (due, insertion) only.
pub(super) struct TimerSlot(pub(super) TimerEvent);

impl PartialEq for TimerSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for TimerSlot {}
impl PartialOrd for TimerSlot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for TimerSlot {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

/// Datagrams taken in one turn of the loop beyond the first, before timers and inputs get
/// their turn.
const MAX_DATAGRAMS_PER_TURN: usize = 64;

/// A turn of the loop longer than this is reported: the seed of the stalled-loop watchdog.
const TURN_BUDGET: Duration = Duration::from_millis(100);

impl Task {
    fn now(&self) -> Duration {
        self.base.elapsed()
    }

    pub(super) async fn run(
        mut self,
        sockets: Sockets,
        shutdown: impl std::future::Future<Output = ()> + Send,
        fault: Option<Fault>,
        beat: patina_watchdog::Beat,
    ) {
        let fault = async move {
            match fault {
                Some(f @ (Fault::GossipPanicAfter(d) | Fault::GossipBlockAfter(d))) => {
                    tokio::time::sleep(d).await;
                    f
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(fault);
        let now = self.now();
        self.node.start(now);
        self.flush(&sockets);
        let mut buf = vec![0u8; RECV_BUFFER];
        let mut push_buf = vec![0u8; RECV_BUFFER];
        tokio::pin!(shutdown);
        loop {
            beat.stamp();
            let next = self.timers.peek().map(|Reverse((due, _, _))| *due);
            // Awake at least every STAMP_EVERY, so an idle loop still stamps its beat.
            let wake = self.now() + patina_watchdog::STAMP_EVERY;
            let sleep =
                tokio::time::sleep_until(self.base + next.map_or(wake, |due| due.min(wake)));
            // In this order: SWIM, due timers, inputs, and pushes last. A probe, an ack, a
            // refutation or a probe timer must never wait behind pushes (they arrive on a
            // socket of their own; see `Lane`): under a steady flood the push socket is never
            // empty, and a loop that took it first never got to its timers (healthy members
            // stopped probing and refuting, and were declared down). Pushes that overflow
            // meanwhile are repaired by anti-entropy.
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                f = &mut fault => match f {
                    Fault::GossipBlockAfter(_) => {
                        tracing::warn!("fault injection (PATINA_FAULT): the gossip loop blocks its thread");
                        std::thread::sleep(Duration::from_secs(3600));
                    }
                    _ => panic!("fault injection (PATINA_FAULT): the gossip loop panics as asked"),
                },
                r = sockets.swim.recv_from(&mut buf) => {
                    let started = std::time::Instant::now();
                    if let Ok((n, _)) = r {
                        let now = self.now();
                        self.node.handle_datagram(now, &buf[..n]);
                    }
                    // Drain what else is waiting before any timer: after a stall, acks that
                    // arrived must count before the timeouts that came due meanwhile.
                    // Bounded, so that a datagram flood cannot starve timers and inputs.
                    self.drain(&sockets.swim, &mut buf, Lane::Swim);
                    self.flush(&sockets);
                    report_turn(started, "datagrams");
                }
                () = sleep => {
                    let started = std::time::Instant::now();
                    self.drain(&sockets.swim, &mut buf, Lane::Swim);
                    let now = self.now();
                    while self.timers.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
                        let Some(Reverse((_, _, TimerSlot(ev)))) = self.timers.pop() else { break };
                        self.node.handle_timer(now, ev);
                        self.flush(&sockets);
                    }
                    report_turn(started, "timers");
                }
                Some(input) = self.rx.recv() => {
                    let started = std::time::Instant::now();
                    self.input(input);
                    self.flush(&sockets);
                    report_turn(started, "input");
                }
                r = sockets.push.recv_from(&mut push_buf) => {
                    let started = std::time::Instant::now();
                    if let Ok((n, _)) = r {
                        let now = self.now();
                        self.node.handle_datagram_on(now, &push_buf[..n], Lane::Push);
                    }
                    self.drain(&sockets.push, &mut push_buf, Lane::Push);
                    self.flush(&sockets);
                    report_turn(started, "pushes");
                }
            }
        }
        // Leave: tell a few members, keep answering briefly so the news gets out.
        let now = self.now();
        self.node.leave(now);
        self.flush(&sockets);
        let until = Instant::now() + LEAVE_GRACE;
        loop {
            tokio::select! {
                r = sockets.swim.recv_from(&mut buf) => {
                    if let Ok((n, _)) = r {
                        let now = self.now();
                        self.node.handle_datagram(now, &buf[..n]);
                        self.flush(&sockets);
                    }
                }
                () = tokio::time::sleep_until(until) => break,
            }
        }
        self.tasks.abort_all();
        tracing::info!("gossip stopped");
    }

    /// Handle up to `MAX_DATAGRAMS_PER_TURN` datagrams already waiting on `socket`.
    fn drain(&mut self, socket: &UdpSocket, buf: &mut [u8], lane: Lane) {
        for _ in 0..MAX_DATAGRAMS_PER_TURN {
            let Ok((n, _)) = socket.try_recv_from(buf) else {
                break;
            };
            let now = self.now();
            self.node.handle_datagram_on(now, &buf[..n], lane);
        }
    }

    fn input(&mut self, input: Input) {
        let now = self.now();
        match input {
            Input::Local(records) => self.node.handle_local(now, &records),
            Input::Learned { known, settled } => self.node.handle_learned(now, known, &settled),
            Input::Dropped(versions) => self.node.handle_dropped(now, &versions),
            Input::CoordinateSample {
                peer,
                coordinate,
                rtt,
            } => {
                self.node
                    .handle_coordinate_sample(now, peer, coordinate, rtt);
                self.publish_place();
            }
            Input::SharedCoordinates(shared) => {
                self.node.handle_shared_coordinates(now, &shared);
                self.publish_place();
            }
            Input::ClockSample {
                peer,
                offset_ms,
                err_ms,
                sent,
            } => {
                let sent =
                    tokio::time::Instant::from_std(sent).saturating_duration_since(self.base);
                self.node
                    .handle_clock_sample(now, peer, offset_ms, err_ms, sent)
            }
            Input::SyncDone { peer, end } => self.node.handle_sync_done(now, peer, end),
            Input::NewOrigin(node) => self.node.handle_new_origin(now, node),
            Input::Retired(origin) => self.node.handle_retired(now, origin),
            Input::Corroborated { member, gone } => {
                self.node.handle_corroboration(now, member, gone)
            }
            Input::Unreachable(member) => self.node.handle_unreachable(now, member),
            Input::DownNews(members) => {
                self.node.handle_down_news(now, &members);
            }
            Input::Confirmed {
                member,
                round,
                incarnation,
            } => self
                .node
                .handle_confirmation(now, member, round, incarnation),
            Input::Members(reply) => {
                let _ = reply.send(Snapshot {
                    me: self.node.identity(),
                    incarnation: self.node.incarnation(),
                    members: self.node.members(),
                    counters: self.node.counters(),
                    health: self.node.health(),
                    now,
                });
            }
            Input::Forget(member, reply) => {
                let _ = reply.send(self.node.forget(now, member));
            }
            Input::Keyring(op, reply) => {
                let mut ring = self.node.keyring().clone();
                let result = match op {
                    None => Ok(()),
                    Some(op) => ring.apply(&op).map(|()| {
                        tracing::info!(?op, "gossip keyring changed");
                        self.keyring_gen += 1;
                        self.node.set_keyring(ring.clone());
                    }),
                };
                let _ = reply.send(result.map(|()| (self.keyring_gen, ring)));
            }
        }
    }

    /// Publish the node's coordinate, its peers' and those its hellos share.
    fn publish_place(&mut self) {
        let view = super::PlaceView {
            own: self.node.coordinate().clone(),
            peers: self
                .node
                .peer_coordinates()
                .map(|(n, c)| (n, c.clone()))
                .collect(),
            shared: self.node.coordinates_to_share(),
        };
        *self.gossip.place.write().expect("place lock") = view;
    }

    /// Publish the node's recent downs for sessions' hellos, when it has new ones.
    fn publish_down_news(&self) {
        let generation = self.node.down_news_gen();
        if self
            .gossip
            .recent_downs
            .read()
            .expect("down news lock")
            .generation
            == generation
        {
            return;
        }
        let base = self.base.into_std();
        let members = self
            .node
            .recent_downs()
            .map(|(m, at)| (m, base + at))
            .collect();
        *self.gossip.recent_downs.write().expect("down news lock") = DownNews {
            members,
            generation,
        };
    }

    /// Carry out everything the node asked for.
    fn flush(&mut self, sockets: &Sockets) {
        // Reap finished helper tasks so the set stays small.
        while self.tasks.try_join_next().is_some() {}
        let now = self.now();
        let due = self.view_at.is_none_or(|at| now >= at + VIEW_EVERY);
        if due {
            // A step of the wall clock fences local writes in this very turn.
            self.node.handle_wall(now, self.store.wall_ms());
        }
        let outputs = self.node.drain();
        self.publish_down_news();
        // The view is judged before a liveness change goes to the store: a follower then
        // sees a hide only with the view that explains it (an isolated node's is not standing).
        let liveness = outputs.iter().any(|o| matches!(o, Output::Liveness { .. }));
        if liveness || due {
            self.view_at = Some(now);
            let mut judged = self.node.view_status(now);
            // A store whose clock leads its wall clock refuses writes: not a view to count.
            if self.store.clock_ahead_ms().is_some()
                && !judged.reasons.contains(&ViewReason::ClockOff)
            {
                judged.reasons.push(ViewReason::ClockOff);
                judged.stands = false;
            }
            self.view_tx.send_if_modified(|v| {
                let changed = *v != judged;
                if changed {
                    if v.stands != judged.stands {
                        tracing::info!(stands = judged.stands, reasons = ?judged.reasons, "this agent's view of its cluster");
                    }
                    *v = judged;
                }
                changed
            });
        }
        for out in outputs {
            match out {
                Output::Send { to, bytes, lane } => {
                    let socket = match lane {
                        Lane::Swim => &sockets.swim,
                        Lane::Push => &sockets.push,
                    };
                    // UDP: a full socket buffer drops, as the network would.
                    let _ = socket.try_send_to(&bytes, to);
                }
                Output::Schedule { timer, .. } => {
                    self.timer_seq += 1;
                    self.timers
                        .push(Reverse((timer.due, self.timer_seq, TimerSlot(timer))));
                }
                Output::Apply { records } => self.apply(records),
                Output::Liveness { node, down } => {
                    let _ = self.liveness.send((node, down));
                }
                Output::Corroborate { member } => {
                    let inputs = self.gossip.inputs.clone();
                    let local = local_ip(self.gossip.advertised);
                    self.tasks.spawn_on(
                        async move {
                            let gone = !port_answers(local, member.api_addr()).await;
                        if gone {
                            tracing::warn!(suspect = %member, "a suspect's port does not answer: it goes down soon");
                        } else {
                            tracing::warn!(suspect = %member, "a suspect's port answers: it gets the long suspicion");
                        }
                            let _ = inputs.send(Input::Corroborated { member, gone }).await;
                        },
                        &self.main,
                    );
                }
                Output::Confirm { member, round } => {
                    let inputs = self.gossip.inputs.clone();
                    let advertised = self.gossip.advertised;
                    let dial = self.gossip.dial.clone();
                    self.tasks.spawn_on(
                        async move {
                            let incarnation = ask_incarnation(advertised, dial, member).await;
                            if incarnation.is_none() {
                                tracing::warn!(suspect = %member, "a suspect did not answer the last check: it goes down");
                            }
                            let _ = inputs
                                .send(Input::Confirmed {
                                    member,
                                    round,
                                    incarnation,
                                })
                                .await;
                        },
                        &self.main,
                    );
                }
                Output::Retire { origin } => {
                    let inputs = self.gossip.inputs.clone();
                    let store = self.store.clone();
                    self.tasks.spawn_on(
                        async move {
                            match store.retire_origin(origin).await {
                                Ok(true) => {
                                    tracing::info!(origin = %origin, "origin retired: long gone and fully covered");
                                    let _ = inputs.send(Input::Retired(origin)).await;
                                }
                                Ok(false) => {
                                    tracing::debug!(origin = %origin, "origin not retired: something of it is still held")
                                }
                                Err(e) => {
                                    tracing::warn!(origin = %origin, error = %e, "origin retirement refused")
                                }
                            }
                        },
                        &self.main,
                    );
                }
                Output::Sync { peer } => {
                    let gossip = self.gossip.clone();
                    self.tasks.spawn_on(
                        async move {
                            let end = session::run_client(&gossip, peer).await;
                            let _ = gossip.inputs.send(Input::SyncDone { peer, end }).await;
                        },
                        &self.main,
                    );
                }
                Output::ClockFence(fence) => self.store.set_clock_fence(fence),
                Output::OriginConflict { other } => {
                    tracing::error!(other = %other, "another live agent writes as this store's origin (a copy of this data directory): moving to a fresh origin");
                    let store = self.store.clone();
                    self.tasks.spawn_on(
                        async move {
                            match store.leave_origin().await {
                                Ok(node) => {
                                    tracing::warn!(origin = %node, "now writing as a fresh origin")
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "could not move to a fresh origin")
                                }
                            }
                        },
                        &self.main,
                    );
                }
                Output::Attend { members } => {
                    self.attending.retain(|m, task| {
                        let keep = members.contains(m) && !task.is_finished();
                        if !keep {
                            task.abort();
                        }
                        keep
                    });
                    for m in members {
                        if !self.attending.contains_key(&m) {
                            let task = self.tasks.spawn_on(
                                super::attend::attend(self.gossip.clone(), m),
                                &self.main,
                            );
                            self.attending.insert(m, task);
                        }
                    }
                }
                Output::Renewed { identity } => {
                    *self.gossip.identity.write().expect("identity lock") = identity;
                    tracing::warn!(identity = %identity, "declared down by the cluster: rejoined under a new epoch");
                    let path = self.epoch_file.clone();
                    self.tasks.spawn_on(
                        async move {
                            let _ = tokio::task::spawn_blocking(move || {
                                write_epoch(&path, identity.epoch)
                            })
                            .await;
                        },
                        &self.main,
                    );
                }
            }
        }
    }

    fn apply(&mut self, records: Vec<Record>) {
        let batch = patina_store::RemoteBatch {
            records,
            covered: Vec::new(),
        };
        let Ok(permit) = self.applies.clone().try_acquire_owned() else {
            // Too many applies in flight: anti-entropy brings these, soon.
            let now = self.now();
            self.node.handle_dropped(now, &Touched::of(&batch).settled);
            return;
        };
        let reporter = self.reporter.clone();
        self.tasks.spawn_on(
            async move {
                if let Err(e) = reporter.apply(batch).await {
                    tracing::debug!(error = %e, "pushed changes not applied");
                }
                drop(permit);
            },
            &self.main,
        );
    }
}

fn report_turn(started: std::time::Instant, what: &'static str) {
    let took = started.elapsed();
    if took > TURN_BUDGET {
        tracing::warn!(
            took_ms = took.as_millis() as u64,
            what,
            "gossip loop turn over budget"
        );
    }
}
