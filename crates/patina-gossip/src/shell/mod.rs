//! The tokio shell around [`Node`]: the UDP sockets (SWIM at the gossip address, pushes at
//! the gRPC port's number, read in that order), the one timer scheduler, the store, and
//! the gRPC sync and admin services. One task owns the node (SWIM never waits behind a sync
//! or a commit: those run on their own tasks and report back through a bounded channel).
//!
//! Timers: one min-heap ordered by (due, insertion), fired in that order; a timer is never
//! dropped, only late. After a stall, datagrams already received are handled before the
//! timers that came due meanwhile, so acks that did arrive are not taken for silence.

mod admin;
mod attend;
mod checks;
mod collector;
mod files;
mod keys;
mod parts;
mod session;
mod task;

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use patina_store::{NodeId, OriginKnowledge, Record, Store};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::identity::Identity;
use crate::node::{Config, Counters, MemberInfo, Node, ViewStatus};
use crate::replica::{ApplyOutcome, Touched, local_changes};
use checks::{ask_incarnation, local_ip, peer_endpoint, port_answers};
use collector::collect_tombstones;
pub use files::{KEYRING_FILE, MEMBERS_FILE, read_keyring, write_keyring};
use files::{MAX_REMEMBERED_SEEDS, bump_epoch, read_members, remember_members, write_epoch};
use parts::{spawn_liveness, supervise};
use task::{Sockets, Task};

pub use admin::AdminService;
pub use session::SyncService;

/// Inputs the node's task takes besides datagrams and timers. Bounded: see `INPUT_CAPACITY`.
enum Input {
    Local(Vec<Record>),
    Learned {
        known: Vec<(NodeId, OriginKnowledge)>,
        settled: Vec<(NodeId, u64)>,
    },
    /// Versions from peers the store did not take (see [`ApplyOutcome::Dropped`]).
    Dropped(Vec<(NodeId, u64)>),
    /// A session's hello from `peer` came back `rtt` after ours left, with its coordinate.
    CoordinateSample {
        peer: Identity,
        coordinate: crate::coords::Coordinate,
        rtt: Duration,
    },
    /// A session's hello shared these members' coordinates (its sender's own first).
    SharedCoordinates(Vec<(NodeId, crate::coords::Coordinate)>),
    /// A session's hellos measured `peer`'s clock minus ours.
    ClockSample {
        peer: Identity,
        offset_ms: i64,
        err_ms: u64,
        /// When the session's hello left (a sample from before a step says nothing of it).
        sent: std::time::Instant,
    },
    SyncDone {
        peer: Identity,
        end: crate::node::SyncEnd,
    },
    Corroborated {
        member: Identity,
        gone: bool,
    },
    /// A session's peer listed these members as down lately.
    DownNews(Vec<Identity>),
    /// An attended member's stream ended and its port refused a connection.
    Unreachable(Identity),
    Confirmed {
        member: Identity,
        round: u64,
        incarnation: Option<u16>,
    },
    NewOrigin(NodeId),
    Retired(NodeId),
    Members(oneshot::Sender<Snapshot>),
    Forget(Identity, oneshot::Sender<bool>),
    /// Apply a keyring operation (`None`: read only); answered with the keyring after it
    /// and its generation (each change bumps it; the file is written in that order).
    Keyring(
        Option<crate::keyring::KeyringOp>,
        oneshot::Sender<Result<(u64, crate::keyring::Keyring), crate::keyring::KeyringError>>,
    ),
}

/// Inputs waiting for the node's task. Senders wait when it is full (back-pressure on the
/// feed follower and on sessions), except datagrams, which the task reads itself.
const INPUT_CAPACITY: usize = 1024;
/// Largest datagram read; longer ones are truncated by the kernel and fail to decode.
const RECV_BUFFER: usize = 65_536;
/// How often the view is judged at least (and before every liveness change).
const VIEW_EVERY: Duration = Duration::from_millis(50);
/// Applies of pushed changes running at once; past it, pushed changes are left to
/// anti-entropy (the node stops tracking them as pending).
const MAX_APPLIES: usize = 8;
/// How long a suspect's gRPC port gets to accept a connection before it counts as gone.
const CORROBORATE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the shell keeps running after a graceful leave, so the news gets out.
pub const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// Where and how the shell runs.
#[derive(Clone, Debug)]
pub struct ShellConfig {
    pub node: Config,
    /// UDP address to bind.
    pub listen: SocketAddr,
    /// UDP address other members reach us at; `None`: the bound socket's address.
    pub advertise: Option<SocketAddr>,
    /// The gRPC port on the advertised IP (sync, admin, the region API).
    pub api_port: u16,
    pub seeds: Vec<SocketAddr>,
    /// File that holds the epoch, bumped at every start.
    pub epoch_file: PathBuf,
    /// Seeds the node's random choices (the shell uses the OS's randomness when `None`).
    pub seed: Option<u64>,
    /// Age after which tombstones are collected (see [`Store::collect_tombstones`]).
    pub tombstone_ttl: Duration,
    /// The region this agent serves, as Whoami reports it (empty for the global tier).
    pub region: String,
    /// A fault to inject, for tests of what supervises the shell (`None` in production).
    pub fault: Option<Fault>,
    /// How sessions and last checks reach peers' gRPC servers (TLS with this agent's
    /// certificate, or plaintext).
    pub dial: patina_trust::Dial,
    /// The agent's watchdog: the gossip loop stamps its beat (`gossip`) on every turn.
    pub watchdog: Option<patina_watchdog::Watchdog>,
    /// The API's connection age (`limits.max_connection_age_secs`): a held attendance stream
    /// ends by then at the latest.
    pub stream_max_age: Duration,
}

/// A fault the shell injects into itself, for tests (the binary sets one only from
/// `PATINA_FAULT`, and says so loudly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The gossip loop panics this long after it starts.
    GossipPanicAfter(Duration),
    /// The gossip loop blocks its thread this long after it starts (for an hour): a stuck
    /// loop, for the watchdog.
    GossipBlockAfter(Duration),
}

/// Why the shell ended before it was asked to stop: the part that ended. The agent must
/// stop too: without the node, writes are acknowledged and never replicated, and the
/// liveness overlay freezes.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct ShellFailed(pub String);

/// The default age after which tombstones are collected: far beyond the seconds
/// anti-entropy takes to give every live member a deletion, and short enough that a region
/// with steady machine churn holds an hour of deletions, not its whole history.
pub const DEFAULT_TOMBSTONE_TTL: Duration = Duration::from_secs(3600);

/// Membership and counters as the node's task last saw them.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub me: Identity,
    /// This node's SWIM incarnation.
    pub incarnation: u16,
    pub members: Vec<MemberInfo>,
    pub counters: Counters,
    pub health: u32,
    pub now: Duration,
}

/// Counters of the sessions (both directions).
#[derive(Default, Debug)]
pub struct SyncCounters {
    /// The latest session with each peer, by IP (at most `MAX_PEER_RECORDS`).
    pub peers: std::sync::Mutex<std::collections::BTreeMap<std::net::IpAddr, PeerSync>>,
    pub sessions: AtomicU64,
    /// Sessions that ran to the end (both directions).
    pub completed: AtomicU64,
    /// Sessions that began (both hellos exchanged) and did not end well.
    pub failures: AtomicU64,
    /// Sessions this agent asked for that never began: no connection, no hello, or the peer
    /// answered `RESOURCE_EXHAUSTED` (its session slots were taken).
    pub unstarted: AtomicU64,
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// Encoded bytes of the record batches received and sent.
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
}

/// The latest anti-entropy session with one peer (either side started it).
#[derive(Clone, Debug)]
pub struct PeerSync {
    pub at: std::time::Instant,
    /// Sequence numbers the peer knew and this agent lacked at the session's hello: how far
    /// behind that peer this agent was (its sync lag, in versions).
    pub lacking: u64,
    /// Records received in that session.
    pub records_in: u64,
    pub ok: bool,
    /// Sessions with that peer since this agent started.
    pub sessions: u64,
}

/// Peers whose latest session is kept; the oldest goes first.
pub const MAX_PEER_RECORDS: usize = 1024;

impl SyncCounters {
    pub(crate) fn record_peer(
        &self,
        ip: std::net::IpAddr,
        lacking: u64,
        records_in: u64,
        ok: bool,
    ) {
        let mut peers = self.peers.lock().expect("peer records");
        let sessions = peers.get(&ip).map_or(0, |p| p.sessions) + 1;
        peers.insert(
            ip,
            PeerSync {
                at: std::time::Instant::now(),
                lacking,
                records_in,
                ok,
                sessions,
            },
        );
        if peers.len() > MAX_PEER_RECORDS
            && let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.at).map(|(ip, _)| *ip)
        {
            peers.remove(&oldest);
        }
    }
}

/// A handle on a running shell.
#[derive(Clone)]
pub struct Gossip {
    inputs: mpsc::Sender<Input>,
    store: Store,
    cluster: Arc<str>,
    sync_counters: Arc<SyncCounters>,
    reporter: Reporter,
    /// The gossip address other members reach this agent at.
    pub advertised: SocketAddr,
    /// Whether the node's view stands, as its task last judged (before every liveness change
    /// it carries out, and at least every [`VIEW_EVERY`]). Closed when the task ends.
    view: tokio::sync::watch::Receiver<ViewStatus>,
    region: Arc<str>,
    dial: patina_trust::Dial,
    /// Where the keyring is kept, and the generation last written there.
    keyring_file: Arc<std::path::Path>,
    keyring_saved: Arc<std::sync::Mutex<u64>>,
    /// The node's network coordinate and its peers', as its task last published them.
    place: Arc<std::sync::RwLock<PlaceView>>,
    /// The node's identity now (a renewal changes its epoch).
    identity: Arc<std::sync::RwLock<Identity>>,
    /// Members the node saw go down lately, with when, as its task last published them: what
    /// a session's hello lists (`node/down_news.rs`).
    recent_downs: Arc<std::sync::RwLock<DownNews>>,
    /// Cancelled when the shell stops (held attendance streams end).
    stop: CancellationToken,
    /// See [`ShellConfig::stream_max_age`].
    stream_max_age: Duration,
}

/// Members that went down lately, with when, and the node's count of additions when published.
#[derive(Default)]
pub(crate) struct DownNews {
    pub members: Vec<(Identity, std::time::Instant)>,
    pub generation: u64,
}

/// Where this agent and its peers are on the network (Vivaldi coordinates).
#[derive(Clone, Debug, Default)]
pub struct PlaceView {
    pub own: crate::coords::Coordinate,
    /// Peers by their store's origin.
    pub peers: Vec<(NodeId, crate::coords::Coordinate)>,
    /// The peers' coordinates hellos share ([`crate::Node::coordinates_to_share`]).
    pub shared: Vec<(NodeId, crate::coords::Coordinate)>,
}

/// What sessions and tasks use to tell the node what the store learned.
#[derive(Clone)]
struct Reporter {
    inputs: mpsc::Sender<Input>,
    store: Store,
}

impl Reporter {
    /// Apply a batch from a peer and report what became known. Returns the records applied.
    async fn apply(&self, mut batch: patina_store::RemoteBatch) -> Result<usize, String> {
        // The last number is the store's own probe for leaving its origin
        // (`Store::leave_origin`), never a record: from a peer it is forged.
        batch
            .records
            .retain(|r| r.version.seq < patina_store::MAX_SEQ);
        let touched = Touched::of(&batch);
        let result = self.store.apply(batch).await;
        // A batch the store did not take (overloaded, a full disk) is dropped, not refused:
        // reported settled, its versions would be remembered as refused and their pushed
        // copies ignored after space returns.
        let input = match touched.outcome(result.is_ok(), &self.store.digest()) {
            ApplyOutcome::Learned { known, settled } => Input::Learned { known, settled },
            ApplyOutcome::Dropped(versions) => Input::Dropped(versions),
        };
        let _ = self.inputs.send(input).await;
        match result {
            Ok(report) => Ok(report.applied()),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Gossip {
    /// This agent's identity now.
    pub fn identity(&self) -> Identity {
        *self.identity.read().expect("identity lock")
    }

    /// This agent's network coordinate and its peers' (what hellos measured).
    pub fn place(&self) -> PlaceView {
        self.place.read().expect("place lock").clone()
    }

    /// Bind the socket, start the node and its tasks. They stop when `stop` is cancelled
    /// (after a graceful leave). The handle returned ends when the shell has ended: `Ok` after
    /// `stop`, [`ShellFailed`] when a part of it (the node's thread, the feed follower, the
    /// liveness task, the tombstone collector, the members file writer) ended first; the shell
    /// then cancels `stop` itself (the node leaves) and the caller must stop the agent.
    pub async fn start(
        store: Store,
        cfg: ShellConfig,
        stop: CancellationToken,
    ) -> std::io::Result<(Gossip, tokio::task::JoinHandle<Result<(), ShellFailed>>)> {
        // Bound here (errors reach the caller), driven on the node's own thread.
        let socket = bind_udp(cfg.listen)?;
        let advertise = match cfg.advertise {
            Some(a) => a,
            None => socket.local_addr()?,
        };
        // Pushes arrive apart from SWIM: UDP on the gRPC port's number (see `Lane`).
        let push_listen = SocketAddr::new(cfg.listen.ip(), cfg.api_port);
        if cfg.api_port == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "gossip needs the gRPC server's bound port (api_port 0)",
            ));
        }
        let push_socket = bind_udp(push_listen).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "binding the push socket udp {push_listen} (UDP on the gRPC port's number): {e}"
                ),
            )
        })?;
        let epoch = bump_epoch(cfg.epoch_file.clone()).await?;
        let mut cfg = cfg;
        let keyring_file: Arc<std::path::Path> = cfg.epoch_file.with_file_name(KEYRING_FILE).into();
        cfg.node.keyring = start_keyring(keyring_file.clone(), cfg.node.keyring.clone()).await?;
        let identity = Identity {
            node: store.node(),
            addr: advertise.into(),
            api_port: cfg.api_port,
            epoch,
        };
        let seed = cfg.seed.unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("the OS random source failed");
            u64::from_le_bytes(b)
        });
        // Members remembered from the last run join the seeds, so an agent whose seeds are
        // all down can still find its region.
        let members_file = cfg.epoch_file.with_file_name(MEMBERS_FILE);
        let remembered = read_members(members_file.clone()).await;
        let mut seeds = cfg.seeds.clone();
        let start = (seed as usize) % remembered.len().max(1);
        for addr in remembered.iter().cycle().skip(start).take(remembered.len()) {
            if seeds.len() >= cfg.seeds.len() + MAX_REMEMBERED_SEEDS {
                break;
            }
            if *addr != advertise && !seeds.contains(addr) {
                seeds.push(*addr);
            }
        }
        let node = Node::new(identity, cfg.node.clone(), store.digest(), seeds, seed);
        let (inputs, rx) = mpsc::channel(INPUT_CAPACITY);
        let reporter = Reporter {
            inputs: inputs.clone(),
            store: store.clone(),
        };
        let (view_tx, view) = tokio::sync::watch::channel(ViewStatus::default());
        let (liveness_tx, liveness_task) = spawn_liveness(store.clone());
        let gossip = Gossip {
            inputs: inputs.clone(),
            store: store.clone(),
            cluster: cfg.node.cluster.as_str().into(),
            sync_counters: Arc::new(SyncCounters::default()),
            reporter: reporter.clone(),
            advertised: advertise,
            view,
            region: cfg.region.as_str().into(),
            dial: cfg.dial.clone(),
            keyring_file,
            keyring_saved: Arc::new(std::sync::Mutex::new(0)),
            place: Arc::default(),
            identity: Arc::new(std::sync::RwLock::new(identity)),
            recent_downs: Arc::default(),
            stop: stop.clone(),
            stream_max_age: cfg.stream_max_age,
        };
        let main = tokio::runtime::Handle::current();
        let task = Task {
            node,
            main: main.clone(),
            rx,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            base: Instant::now(),
            store: store.clone(),
            reporter,
            applies: Arc::new(tokio::sync::Semaphore::new(MAX_APPLIES)),
            liveness: liveness_tx,
            gossip: gossip.clone(),
            epoch_file: cfg.epoch_file.clone(),
            tasks: JoinSet::new(),
            view_tx,
            view_at: None,
            keyring_gen: 0,
            attending: std::collections::HashMap::new(),
        };
        tracing::info!(identity = %identity, seeds = ?cfg.seeds, "gossip starting");
        let rememberer = tokio::spawn(remember_members(gossip.clone(), members_file));
        let beat_of = |name: &str| {
            cfg.watchdog
                .as_ref()
                .map_or_else(patina_watchdog::Beat::detached, |w| w.register(name))
        };
        let collector = tokio::spawn(collect_tombstones(
            gossip.clone(),
            cfg.tombstone_ttl,
            cfg.seeds.is_empty(),
            beat_of("tombstone_collector"),
        ));
        let follower = tokio::spawn(follow_feed(store, inputs, beat_of("feed_follower")));
        let fault = cfg.fault;
        let beat = cfg
            .watchdog
            .as_ref()
            .map_or_else(patina_watchdog::Beat::detached, |w| w.register("gossip"));
        let shutdown = stop.clone().cancelled_owned();
        // The node runs on a thread of its own with a runtime of its own: a busy API, a sync
        // flood or a slow commit on the agent's runtime never delays a probe or an ack.
        // Sessions, applies and checks it starts run on the agent's runtime (`main`).
        let thread = std::thread::Builder::new()
            .name("patina-gossip".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "gossip: cannot build its runtime");
                        return;
                    }
                };
                rt.block_on(async move {
                    match (
                        UdpSocket::from_std(socket),
                        UdpSocket::from_std(push_socket),
                    ) {
                        (Ok(swim), Ok(push)) => {
                            task.run(Sockets { swim, push }, shutdown, fault, beat)
                                .await
                        }
                        (Err(e), _) | (_, Err(e)) => {
                            tracing::error!(error = %e, "gossip: cannot use its sockets")
                        }
                    }
                });
            })?;
        let thread = tokio::task::spawn_blocking(move || thread.join().is_ok());
        let handle = tokio::spawn(supervise(
            stop,
            thread,
            vec![
                ("the members file writer", rememberer),
                ("the tombstone collector", collector),
                ("the feed follower", follower),
                ("the liveness task", liveness_task),
            ],
        ));
        Ok((gossip, handle))
    }

    /// Membership as the node sees it now.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.inputs.send(Input::Members(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Whether this node's view stands, as its task last judged it; `None` once the task
    /// has ended (the gossip loop is gone: nothing stands).
    pub fn view(&self) -> Option<ViewStatus> {
        if self.view.has_changed().is_err() {
            return None;
        }
        Some(self.view.borrow().clone())
    }

    /// The view as a `patina.v1.ViewStatus` (the Watch stream and Whoami carry it).
    pub fn view_message(&self) -> patina_proto::v1::ViewStatus {
        admin::view_message(self.view().as_ref())
    }

    /// The region this agent serves (empty for the global tier).
    pub fn region(&self) -> &str {
        &self.region
    }

    pub fn sync_service(&self) -> SyncService {
        SyncService::new(self.clone())
    }

    pub fn admin_service(&self) -> AdminService {
        AdminService::new(self.clone())
    }
}

/// The keyring to start with: the file's if there is one (changes made through the Admin
/// API outlive restarts), else the configured one, written to the file when it holds keys.
async fn start_keyring(
    path: Arc<std::path::Path>,
    configured: crate::keyring::Keyring,
) -> std::io::Result<crate::keyring::Keyring> {
    tokio::task::spawn_blocking(move || match read_keyring(&path) {
        Ok(Some(kept)) => {
            if configured.primary().is_some_and(|k| !kept.keys().contains(k)) {
                tracing::warn!(
                    file = %path.display(),
                    "the configured gossip key is not in the keyring file, which wins: change keys with `patina keyring`"
                );
            }
            Ok(kept)
        }
        Ok(None) => {
            if !configured.keys().is_empty() {
                write_keyring(&path, &configured)?;
            }
            Ok(configured)
        }
        Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Socket buffer each gossip socket asks for, each way. A busy region sends an agent many
/// pushes while its loop is busy; with the kernel's default (about 200 KiB) they overflow
/// the receive buffer (pushes are repaired by anti-entropy; SWIM has a socket of its own,
/// which only agents of the previous version still push to). The kernel caps it at `net.core.rmem_max` /
/// `wmem_max`; raise those on hosts of a busy region.
const SOCKET_BUFFER: usize = 8 << 20;

/// The gossip socket: bound, non-blocking, with large buffers.
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(error = %e, "gossip: could not enlarge the receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(error = %e, "gossip: could not enlarge the send buffer");
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Follow the store's feed and hand the node every local change once it is durable.
async fn follow_feed(store: Store, inputs: mpsc::Sender<Input>, beat: patina_watchdog::Beat) {
    let mut wake = store.feed().subscribe();
    let mut after = store.feed().revision();
    let mut origin = store.node();
    loop {
        beat.stamp();
        let me = store.node();
        if me != origin {
            origin = me;
            if inputs.send(Input::NewOrigin(me)).await.is_err() {
                return;
            }
        }
        match local_changes(&store, after, 512) {
            Ok((records, upto)) => {
                after = upto;
                if !records.is_empty() {
                    if inputs.send(Input::Local(records)).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
            Err(behind) => {
                // Fell behind the log (a write storm): anti-entropy carries what we skip.
                tracing::warn!(floor = behind.floor, "feed follower skipped changes");
                after = behind.floor;
                continue;
            }
        }
        if after < store.feed().revision() {
            continue;
        }
        if store.feed().is_closed() {
            return;
        }
        // Awake at least every STAMP_EVERY, so an idle follower still stamps its beat.
        if let Ok(Err(_)) = tokio::time::timeout(patina_watchdog::STAMP_EVERY, wake.changed()).await
        {
            return;
        }
    }
}
