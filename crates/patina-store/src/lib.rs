//! patina-store: the durable record store and the in-memory serving index.
//!
//! Records are small and independent: a key, a group (the app), an opaque encoded value, and
//! a [`Version`]. What a value means belongs to the store's [`Kind`]. SQLite (WAL,
//! `synchronous=FULL`) is written by one dedicated thread with group commit; nothing is
//! acknowledged, served or published before it is durable. Per-origin knowledge (the digest
//! anti-entropy exchanges) is persisted with the records. The serving index ([`dashmap`]) is
//! rebuilt from SQLite at start, and the change feed gives watchers every change by store
//! revision. [`Store::in_memory`] runs the same rules without SQLite, for simulations.
//!
//! Architecture invariant: only this crate opens SQLite, and only its writer thread writes
//! it. Nothing here knows what a machine is.

#![forbid(unsafe_code)]

mod entry;
mod error;
mod feed;
mod index;
mod kind;
mod knowledge;
mod lean;
mod mem;
mod merge;
mod overlay;
mod queue;
mod sqlite;
pub mod timing;
mod version;
mod watch;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::oneshot;

pub use entry::{ByKey, Entry, MAX_KEY_LEN};
pub use error::StoreError;
pub use feed::{Behind, Change, Feed, LeftGroups, MAX_LEFT_GROUPS};
pub use index::Filter;
pub use kind::{Candidate, Flags, GroupChange, Kind, KindRef, OpaqueKind};
pub use knowledge::{Digest, MAX_GAPS_PER_ORIGIN, MAX_SEQ, OriginKnowledge, SeqRange};
pub use merge::{
    ApplyOutcome, ApplyReport, IdSource, LocalWrite, MAX_CLOCK_AHEAD_MS, MAX_ORIGINS,
    MAX_VALUE_LEN, Record, Refusal, RemoteBatch,
};
pub use overlay::{MAX_DOWN_OWNERS, OverlayChange};
pub use queue::QueueDepth;
pub use version::{Clock, Hlc, HlcClock, ManualClock, NodeId, SystemClock, Version};
pub use watch::{BadToken, Cursor, ResumeToken, WatchItem};

use index::Index;
use mem::{MemBackend, MemRows};
use merge::{Core, Meta};
use overlay::DownSet;
use queue::{Class, Queue};
use writer::{Request, Writer};

/// Tunables of a store. Every one is bounded: see the field docs for why each default.
#[derive(Clone)]
pub struct StoreOptions {
    /// Local write requests that may wait for the writer thread. Past this, writers wait
    /// (backpressure); as many again may wait, and past that a write fails at once with
    /// [`StoreError::Overloaded`]. 4096 covers many thousands of concurrent clients' bursts.
    pub write_queue: NonZeroUsize,
    /// Bytes of local write requests queued (keys, groups, values, plus 64 bytes per op);
    /// as many again may wait. 64 MiB holds 8 full 1000-machine batches of 4 KiB records, or
    /// hundreds of thousands of typical ones.
    pub write_queue_bytes: NonZeroUsize,
    /// Most local records in one group commit. Bounds the transaction (and the latency of the
    /// writes at its end); 4096 small records commit in a few milliseconds.
    pub max_batch_ops: NonZeroUsize,
    /// Batches from peers that may wait for the writer; a separate queue, so that a sync
    /// flood never delays local writes.
    pub remote_queue: NonZeroUsize,
    /// Bytes of batches from peers queued (and as many waiting).
    pub remote_queue_bytes: NonZeroUsize,
    /// Most records and covered ranges from peers in one group commit: what a local write
    /// may have to wait behind. 1024 small records commit in about a millisecond.
    pub max_remote_batch_ops: NonZeroUsize,
    /// Changes the feed keeps for watchers to resume from.
    pub watch_log_capacity: NonZeroUsize,
    /// Bytes of the records the feed keeps (each change holds its record, which may also be
    /// the index's current one). 32 MiB is 65,536 changes of 500 bytes, or 8,192 of 4 KiB.
    pub watch_log_bytes: NonZeroUsize,
    /// The rules of the records this store holds. Persisted: a store is opened with the
    /// kind it was made with.
    pub kind: KindRef,
    /// Where wall-clock time comes from.
    pub clock: Arc<dyn Clock>,
    /// Faults to inject, for tests.
    pub failpoints: Arc<Failpoints>,
    /// The agent's watchdog: the writer thread stamps its beat (`store_writer`) on every
    /// group and at least every `patina_watchdog::STAMP_EVERY` while idle.
    pub watchdog: Option<patina_watchdog::Watchdog>,
    /// Start under a fresh origin: for a data directory restored from a backup (or copied),
    /// whose origin may already have issued, elsewhere, the sequence numbers it would issue
    /// next. See `docs/replication.md`.
    pub renew_origin: bool,
    /// A lean store (global agents' and bridges'): for the keys its kind holds lean
    /// (`Kind::lean_key`), the in-memory index holds a key hash and a revision per key, and
    /// records are read from SQLite when needed (`lean.rs`). Point reads of such keys go
    /// through [`Store::read_live`] and [`Store::read_owned_by`]; listings by group
    /// ([`Store::list`], [`Store::list_page`]) do not return them (no group index is kept).
    /// Watches' snapshots and catch-ups, anti-entropy, and the change log rebuilt at open read
    /// their rows. Only for stores opened on disk (`Store::in_memory` ignores it).
    pub lean: bool,
    /// How far ahead of this host's wall clock a timestamp may be taken: the clock never
    /// adopts a peer's timestamp beyond it (a record stamped further ahead is applied, and
    /// the clock moves to the bound only), and a local write is refused while the clock is
    /// ahead of the wall clock by more ([`StoreError::HlcAhead`]). CockroachDB's default.
    pub max_clock_offset_ms: u64,
}

/// The default [`StoreOptions::max_clock_offset_ms`].
pub const DEFAULT_MAX_CLOCK_OFFSET_MS: u64 = 500;

/// Why this agent refuses local writes for its clock: its offset from its peers, as its
/// gossip node measured it ([`Store::set_clock_fence`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClockFence {
    /// Peers' clocks minus this host's (the median over recent samples), in ms.
    pub offset_ms: i64,
    pub bound_ms: u64,
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("write_queue", &self.write_queue)
            .field("write_queue_bytes", &self.write_queue_bytes)
            .field("max_batch_ops", &self.max_batch_ops)
            .field("remote_queue", &self.remote_queue)
            .field("remote_queue_bytes", &self.remote_queue_bytes)
            .field("max_remote_batch_ops", &self.max_remote_batch_ops)
            .field("watch_log_capacity", &self.watch_log_capacity)
            .field("watch_log_bytes", &self.watch_log_bytes)
            .field("kind", &self.kind.name())
            .finish()
    }
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("nonzero")
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write_queue: nz(4096),
            write_queue_bytes: nz(64 << 20),
            max_batch_ops: nz(4096),
            remote_queue: nz(256),
            remote_queue_bytes: nz(64 << 20),
            max_remote_batch_ops: nz(1024),
            watch_log_capacity: nz(65536),
            watch_log_bytes: nz(32 << 20),
            kind: Arc::new(OpaqueKind),
            clock: Arc::new(SystemClock),
            failpoints: Arc::new(Failpoints::default()),
            watchdog: None,
            renew_origin: false,
            lean: false,
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
        }
    }
}

/// Largest byte budget of a queue: one request's permits are counted in a `u32`.
const MAX_QUEUE_BYTES: usize = u32::MAX as usize;

impl StoreOptions {
    fn queue_limits(&self) -> (queue::Limits, queue::Limits) {
        let limits = |requests: NonZeroUsize, bytes: NonZeroUsize| {
            let bytes = bytes.get().min(MAX_QUEUE_BYTES);
            queue::Limits {
                requests: requests.get(),
                bytes,
                waiters: requests.get(),
                waiting_bytes: bytes,
            }
        };
        (
            limits(self.write_queue, self.write_queue_bytes),
            limits(self.remote_queue, self.remote_queue_bytes),
        )
    }
}

/// A fault the next group commit suffers, for tests of the failure paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// The commit fails with `SQLITE_FULL`, as on a full disk.
    DiskFull,
    /// The commit fails with `SQLITE_IOERR_FSYNC`, as when fsync reports an I/O error.
    FsyncError,
    /// The writer thread panics.
    Panic,
    /// The writer thread stops for this long (then commits as usual): a stuck loop.
    Stall(std::time::Duration),
}

/// Faults to inject into commits. Production code never arms one; tests do.
#[derive(Debug, Default)]
pub struct Failpoints {
    next_commit: Mutex<Option<InjectedFault>>,
}

impl Failpoints {
    /// The next group commit suffers `fault` (once).
    pub fn arm(&self, fault: InjectedFault) {
        *self.next_commit.lock().expect("failpoints lock") = Some(fault);
    }

    pub(crate) fn check_commit(&self) -> Result<(), rusqlite::Error> {
        let fault = self.next_commit.lock().expect("failpoints lock").take();
        let code = match fault {
            None => return Ok(()),
            Some(InjectedFault::Panic) => panic!("injected fault: writer panic"),
            Some(InjectedFault::Stall(d)) => {
                // A stuck writer (a lock it waits for, a disk that hangs): what the
                // watchdog must notice.
                std::thread::sleep(d);
                return Ok(());
            }
            Some(InjectedFault::DiskFull) => rusqlite::ffi::SQLITE_FULL,
            Some(InjectedFault::FsyncError) => rusqlite::ffi::SQLITE_IOERR_FSYNC,
        };
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(code),
            Some(format!("injected fault {fault:?}")),
        ))
    }
}

/// Refused records from one origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusals {
    pub count: u64,
    /// Of them, refused for a timestamp too far ahead ([`Refusal::ClockAhead`]): its
    /// writer's clock is fast.
    pub clock_ahead: u64,
    pub last: Refusal,
}

/// Where readers find rows that memory does not index: by origin and sequence number, and by
/// revision.
pub(crate) enum Rows {
    Sqlite(sqlite::Readers),
    Memory(Arc<Mutex<MemRows>>),
}

/// What readers share with the writer.
pub(crate) struct State {
    /// Latencies for operators.
    pub timings: Arc<timing::Timings>,
    /// This store's origin; changes only when the store moves to a fresh origin.
    node: AtomicU64,
    pub index: Index,
    pub feed: Feed,
    pub rows: Rows,
    /// The digest as of the latest commit.
    knowledge: RwLock<Digest>,
    /// The liveness overlay's down set as of the latest commit that changed it. Readers
    /// clone the `Arc` out in a one-line scope.
    down: RwLock<DownSet>,
    /// `Meta::overlay_rev` as of that commit: a watcher below it cannot catch up from rows.
    overlay_rev: AtomicU64,
    /// `Meta::collected_rev` as of that commit: a watcher below it cannot catch up from rows.
    collected_rev: AtomicU64,
    /// `Meta::retired` as of the latest commit.
    retired: RwLock<merge::Retired>,
    refusals: Mutex<BTreeMap<NodeId, Refusals>>,
    /// The hybrid logical clock as of the latest commit: at or above every version the
    /// readers can see. Watch messages are stamped from it (`Store::view_hlc`).
    hlc: AtomicU64,
    /// Where wall-clock time comes from.
    wall: Arc<dyn Clock>,
    /// Set once, when the store fails for good.
    failure: tokio::sync::watch::Sender<Option<Arc<str>>>,
    /// Set while this agent's clock is off its peers' ([`Store::set_clock_fence`]).
    clock_fence: tokio::sync::watch::Sender<Option<ClockFence>>,
    commits: AtomicU64,
    /// The revision of the latest commit that reached the disk: above it, changes were
    /// applied in memory only (the disk was full) and a crash may lose them.
    durable_rev: AtomicU64,
    /// This opening of the store (random): tokens issued above `durable_rev` carry it.
    pub incarnation: u64,
    /// The opening that made the latest commit before this one opened, and the revision
    /// it had reached (all durable): its tokens up to there resume.
    pub previous: (u64, u64),
}

/// Most origins whose refusals are counted one by one; the rest are counted under origin 0.
/// Bounds what a peer inventing origins can grow.
const MAX_REFUSAL_ORIGINS: usize = 1024;

impl State {
    pub fn node(&self) -> NodeId {
        NodeId(self.node.load(Ordering::Acquire))
    }

    /// See `durable_rev`.
    pub fn durable_rev(&self) -> u64 {
        self.durable_rev.load(Ordering::Acquire)
    }

    pub(crate) fn set_durable_rev(&self, rev: u64) {
        self.durable_rev.store(rev, Ordering::Release);
    }

    fn set_node(&self, node: NodeId) {
        self.node.store(node.0, Ordering::Release);
    }

    /// The owners whose live records readers do not see.
    pub fn down(&self) -> DownSet {
        self.down.read().expect("overlay lock").clone()
    }

    /// The revision of the latest change the overlay published (0: none).
    pub fn overlay_rev(&self) -> u64 {
        self.overlay_rev.load(Ordering::Acquire)
    }

    /// The highest revision of a collected tombstone (0: none).
    pub fn collected_rev(&self) -> u64 {
        self.collected_rev.load(Ordering::Acquire)
    }

    /// Take retired origins out of the published knowledge and publish the retired set.
    fn publish_retired(&self, retired: merge::Retired, forgotten: &[NodeId]) {
        {
            let mut k = self.knowledge.write().expect("knowledge lock");
            for origin in forgotten {
                k.remove(origin);
            }
        }
        *self.retired.write().expect("retired lock") = retired;
    }

    /// Raise the published clock to the writer's (after a commit, before the feed).
    pub(crate) fn publish_hlc(&self, hlc: Hlc) {
        self.hlc.fetch_max(hlc.0, Ordering::AcqRel);
    }

    /// A reading of this store's clock for a view of it: the later of the wall clock and the
    /// clock as of the latest commit. Not a tick: nothing is persisted.
    pub(crate) fn view_hlc(&self) -> Hlc {
        Hlc(self.hlc.load(Ordering::Acquire)).max(Hlc::from_physical_ms(self.wall.now_ms()))
    }

    fn publish_collected(&self, rev: u64) {
        self.collected_rev.store(rev, Ordering::Release);
    }

    /// Raise the collected revision ahead of a commit that deletes rows (see `watch.rs`).
    fn raise_collected(&self, rev: u64) {
        self.collected_rev.fetch_max(rev, Ordering::AcqRel);
    }

    fn publish_overlay(&self, down: DownSet, overlay_rev: u64) {
        *self.down.write().expect("overlay lock") = down;
        self.overlay_rev.store(overlay_rev, Ordering::Release);
    }

    fn publish_knowledge(&self, changed: BTreeMap<NodeId, OriginKnowledge>) {
        if changed.is_empty() {
            return;
        }
        let mut k = self.knowledge.write().expect("knowledge lock");
        for (origin, known) in changed {
            k.insert(origin, known);
        }
    }

    fn count_refusals(&self, refused: Vec<(NodeId, Refusal)>) {
        if refused.is_empty() {
            return;
        }
        let mut per_origin: BTreeMap<NodeId, (u64, u64, Refusal)> = BTreeMap::new();
        for (origin, why) in refused {
            let e = per_origin.entry(origin).or_insert((0, 0, why.clone()));
            e.0 += 1;
            e.1 += u64::from(matches!(why, Refusal::ClockAhead { .. }));
            e.2 = why;
        }
        let mut all = self.refusals.lock().expect("refusals lock");
        for (origin, (count, clock_ahead, last)) in per_origin {
            let origin = if all.contains_key(&origin) || all.len() < MAX_REFUSAL_ORIGINS {
                origin
            } else {
                NodeId(0)
            };
            let e = all.entry(origin).or_insert(Refusals {
                count: 0,
                clock_ahead: 0,
                last: last.clone(),
            });
            let before = e.count;
            e.count += count;
            e.clock_ahead += clock_ahead;
            // Logged when the total crosses a power of two: the first refusal at once, a
            // steady stream without flooding the log.
            if before.checked_ilog2() != e.count.checked_ilog2() {
                tracing::warn!(origin = %origin, total = e.count, last = %last, "refused records from a peer");
            }
            e.last = last;
        }
    }

    fn set_failed(&self, reason: String) {
        self.failure.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(Arc::from(reason));
            true
        });
    }

    pub fn failure(&self) -> Option<Arc<str>> {
        self.failure.borrow().clone()
    }

    fn failure_error(&self) -> StoreError {
        match self.failure() {
            Some(why) => StoreError::Failed(why),
            None => StoreError::Closed,
        }
    }
}

/// How much one range read may return.
#[derive(Clone, Copy, Debug)]
pub struct ReadBudget {
    pub max_records: usize,
    /// Bytes of keys, groups and values; at least one record is returned when any is left.
    pub max_bytes: usize,
}

/// One origin's records in a range of sequence numbers, as anti-entropy sends them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OriginRange {
    /// Current records of the origin in the part read, highest sequence number first.
    pub records: Vec<Record>,
    /// Known sequence numbers of the part read that have no record left (superseded):
    /// "covered, nothing left".
    pub covered: Vec<SeqRange>,
    /// The lower part of the range not read yet, when the budget ran out.
    pub rest: Option<SeqRange>,
}

/// Counts, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub node: NodeId,
    /// Keys known, tombstones included.
    pub keys: usize,
    /// Live records, those the liveness overlay hides included.
    pub live: usize,
    pub groups: usize,
    pub revision: u64,
    /// Group commits since the store opened (each one transaction, one fsync).
    pub commits: u64,
}

enum Engine {
    /// The durable store: a writer thread fed through bounded queues.
    Thread {
        queue: Arc<Queue>,
        handle: Mutex<Option<std::thread::JoinHandle<()>>>,
    },
    /// The in-memory store: requests commit inline, under one lock, in the caller's task.
    Inline(Mutex<Inline>),
}

struct Inline {
    core: Core,
    backend: MemBackend,
}

impl Drop for Engine {
    /// The last handle is gone: let the writer finish what is queued and stop.
    fn drop(&mut self) {
        if let Engine::Thread { queue, .. } = self {
            queue.close(true);
        }
    }
}

/// A handle on an open store. Cheap to clone; the writer thread stops when [`Store::close`]
/// is called or the store fails.
#[derive(Clone)]
pub struct Store {
    state: Arc<State>,
    engine: Arc<Engine>,
    kind: KindRef,
    /// Most items of one batch from a peer (one group commit's share).
    max_remote_ops: usize,
    /// [`StoreOptions::max_clock_offset_ms`].
    max_offset_ms: u64,
}

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "patina.db";
/// Tombstones per collection request to the writer.
const COLLECT_CHUNK: usize = 1024;
const LOCK_FILE: &str = "LOCK";

fn new_state(
    meta: &Meta,
    index: Index,
    feed: Feed,
    rows: Rows,
    knowledge: Digest,
    wall: Arc<dyn Clock>,
    incarnation: NodeId,
) -> Arc<State> {
    Arc::new(State {
        timings: Arc::default(),
        hlc: AtomicU64::new(meta.hlc.0),
        wall,
        node: AtomicU64::new(meta.node.0),
        index,
        feed,
        rows,
        knowledge: RwLock::new(knowledge),
        down: RwLock::new(meta.down.clone()),
        overlay_rev: AtomicU64::new(meta.overlay_rev),
        collected_rev: AtomicU64::new(meta.collected_rev),
        retired: RwLock::new(meta.retired.clone()),
        refusals: Mutex::new(BTreeMap::new()),
        failure: tokio::sync::watch::Sender::new(None),
        clock_fence: tokio::sync::watch::Sender::new(None),
        commits: AtomicU64::new(0),
        durable_rev: AtomicU64::new(meta.revision),
        incarnation: incarnation.0,
        previous: (meta.incarnation, meta.revision),
    })
}

impl Store {
    /// Open (or create) the store in `dir`, load it into memory and start the writer thread.
    /// Blocking: call it before the runtime starts or from `spawn_blocking`.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store, StoreError> {
        let io = |source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        let path = dir.join(DB_FILE);
        let mut conn = sqlite::open(&path)?;
        let mut ids = IdSource::Os;
        sqlite::prepare(&mut conn, &opts.kind, ids.next())?;
        let mut meta = sqlite::load_meta(&conn)?;
        let mut knowledge = sqlite::load_knowledge(&conn)?;
        // Our own origin is known exactly up to what it issued.
        knowledge.insert(meta.node, OriginKnowledge::dense(meta.local_seq));
        if opts.renew_origin {
            // Above the old origin and every former one, as a move draws: renames win ties.
            let floor = meta.former.keys().copied().fold(meta.node, NodeId::max);
            let new = merge::fresh_origin_above(&mut ids, floor, &knowledge);
            // What the old origin wrote elsewhere (the original after this backup) is adopted
            // when it arrives, as after a move.
            let bound =
                Hlc::from_physical_ms(opts.clock.now_ms() + opts.max_clock_offset_ms).max(meta.hlc);
            sqlite::renew_origin(&mut conn, &mut meta, &mut knowledge, new, bound)?;
        }
        let index = if opts.lean {
            Index::lean(opts.kind.clone())
        } else {
            Index::default()
        };
        let stale = sqlite::load_index(&conn, &index, &opts.kind)?;
        if !stale.is_empty() {
            tracing::warn!(rows = stale.len(), "deleting superseded rows found at load");
            sqlite::delete_revs(&conn, &stale)?;
        }
        let (floor, mut recent) =
            sqlite::recent_changes(&conn, &index, opts.watch_log_capacity.get())?;
        // The overlay's changes are not rows, so the rebuilt log lacks them: a position below
        // the latest one must not resume from it (it gets a reset instead, see watch.rs). This
        // also keeps the feed's invariant that every revision above the floor is in the log
        // (or superseded there): the revisions without a row are all at or below it.
        // Collected tombstones left no rows either.
        let floor = floor.max(meta.overlay_rev).max(meta.collected_rev);
        recent.retain(|c| c.rev() > floor);
        for c in &mut recent {
            c.entry = overlay::watch_view(c.entry.clone(), &meta.down);
        }
        let feed = Feed::new(
            opts.watch_log_capacity.get(),
            opts.watch_log_bytes.get(),
            floor,
            meta.revision,
            recent,
        );
        let state = new_state(
            &meta,
            index,
            feed,
            Rows::Sqlite(sqlite::Readers::new(path)),
            knowledge.clone(),
            opts.clock.clone(),
            ids.next(),
        );
        // Every commit from now on records this opening.
        meta.incarnation = state.incarnation;
        let (local, remote) = opts.queue_limits();
        let queue = Arc::new(Queue::new(local, remote));
        let writer = Writer {
            backend: sqlite::SqliteBackend {
                conn,
                failpoints: opts.failpoints.clone(),
                timings: state.timings.clone(),
            },
            core: Core {
                moved: false,
                meta: meta.clone(),
                clock: HlcClock::starting_after(meta.hlc),
                knowledge,
                kind: opts.kind.clone(),
                wall: opts.clock.clone(),
                ids,
                max_offset_ms: opts.max_clock_offset_ms,
                overlay_unpersisted: false,
            },
            state: state.clone(),
            queue: queue.clone(),
            max_local_ops: opts.max_batch_ops.get(),
            max_remote_ops: opts.max_remote_batch_ops.get(),
            beat: opts
                .watchdog
                .as_ref()
                .map_or_else(patina_watchdog::Beat::detached, |w| {
                    w.register("store_writer")
                }),
            _lock: lock,
        };
        let handle = std::thread::Builder::new()
            .name("patina-store-writer".into())
            .spawn(move || writer.run())
            .map_err(io)?;
        tracing::info!(
            node = %meta.node,
            kind = opts.kind.name(),
            records = state.index.len_live(),
            revision = meta.revision,
            local_seq = meta.local_seq,
            down_owners = meta.down.len(),
            "store opened"
        );
        Ok(Store {
            state,
            engine: Arc::new(Engine::Thread {
                queue,
                handle: Mutex::new(Some(handle)),
            }),
            kind: opts.kind,
            max_remote_ops: opts.max_remote_batch_ops.get(),
            max_offset_ms: opts.max_clock_offset_ms,
        })
    }

    /// A store that keeps everything in memory, with the same rules, index, feed and
    /// interface as a durable one: for simulations of many nodes in one process. Requests
    /// commit inline in the caller's task, so a single-threaded simulation is deterministic.
    /// `seed` chooses the identities of fresh origins, should the store need one.
    pub fn in_memory(node: NodeId, seed: u64, opts: StoreOptions) -> Store {
        let meta = Meta {
            node,
            local_seq: 0,
            hlc: Hlc::default(),
            revision: 0,
            down: DownSet::default(),
            overlay_rev: 0,
            collected_rev: 0,
            retired: Default::default(),
            former: Default::default(),
            incarnation: 0,
        };
        let mut knowledge = Digest::new();
        knowledge.insert(node, OriginKnowledge::dense(0));
        let rows = Arc::new(Mutex::new(MemRows::default()));
        let feed = Feed::new(
            opts.watch_log_capacity.get(),
            opts.watch_log_bytes.get(),
            0,
            0,
            Vec::new(),
        );
        let state = new_state(
            &meta,
            Index::default(),
            feed,
            Rows::Memory(rows.clone()),
            knowledge.clone(),
            opts.clock.clone(),
            IdSource::Seeded(seed ^ 0x1).next(),
        );
        let mut meta = meta;
        meta.incarnation = state.incarnation;
        let inline = Inline {
            core: Core {
                moved: false,
                meta,
                clock: HlcClock::default(),
                knowledge,
                kind: opts.kind.clone(),
                wall: opts.clock.clone(),
                ids: IdSource::Seeded(seed),
                max_offset_ms: opts.max_clock_offset_ms,
                overlay_unpersisted: false,
            },
            backend: MemBackend::new(rows, opts.failpoints.clone()),
        };
        Store {
            state,
            engine: Arc::new(Engine::Inline(Mutex::new(inline))),
            kind: opts.kind,
            max_remote_ops: opts.max_remote_batch_ops.get(),
            max_offset_ms: opts.max_clock_offset_ms,
        }
    }

    /// This store's identity: the origin of every local write.
    pub fn node(&self) -> NodeId {
        self.state.node()
    }

    /// The kind of records this store holds.
    pub fn kind(&self) -> &KindRef {
        &self.kind
    }

    async fn submit(
        &self,
        class: Class,
        request: Request,
        ops: usize,
        bytes: usize,
    ) -> Result<(), StoreError> {
        if self.state.failure().is_some() {
            request.fail(&self.state.failure_error());
            return Ok(());
        }
        match &*self.engine {
            Engine::Thread { queue, .. } => match queue.push(class, request, ops, bytes).await {
                Ok(()) => Ok(()),
                Err(StoreError::Closed) => Err(self.state.failure_error()),
                Err(e) => Err(e),
            },
            Engine::Inline(inline) => {
                let mut inline = inline.lock().expect("inline store lock");
                let Inline { core, backend } = &mut *inline;
                let work = [request.work()];
                match core.commit_group(&self.state, &work, backend) {
                    Ok((outcomes, staged)) => {
                        writer::finish_group(&self.state, core, vec![request], outcomes, staged)
                    }
                    // As the writer thread does: down news does not wait for disk space.
                    Err(e)
                        if writer::is_disk_full(&e)
                            && matches!(request, Request::Overlay { .. }) =>
                    {
                        writer::commit_in_memory(&self.state, core, vec![request], None);
                    }
                    Err(e) if writer::is_disk_full(&e) => request.fail(&StoreError::DiskFull),
                    Err(e) => {
                        self.state.set_failed(format!("commit failed: {e}"));
                        self.state.feed.close();
                        request.fail(&self.state.failure_error());
                    }
                }
                Ok(())
            }
        }
    }

    /// The error for a request the writer dropped without an answer: every path that stops
    /// the writer answers what it holds, except a panic unwinding through it.
    fn unanswered(&self) -> StoreError {
        match self.state.failure() {
            Some(why) => StoreError::Failed(why),
            None => StoreError::Failed("the store's writer thread panicked".into()),
        }
    }

    /// Apply local writes, all or nothing, and return once they are durable.
    pub async fn write(&self, ops: Vec<LocalWrite>) -> Result<Vec<Version>, StoreError> {
        if let Some(f) = *self.state.clock_fence.borrow() {
            return Err(StoreError::ClockOffset {
                offset_ms: f.offset_ms,
                bound_ms: f.bound_ms,
            });
        }
        let bytes = ops.iter().map(LocalWrite::queued_bytes).sum();
        let n = ops.len();
        let started = std::time::Instant::now();
        let (reply, rx) = oneshot::channel();
        self.submit(Class::Local, Request::Local { ops, reply }, n, bytes)
            .await?;
        let answer = rx.await.map_err(|_| self.unanswered())?;
        self.state.timings.write.observe(started.elapsed());
        answer
    }

    /// Refuse local writes (`Some`) while this agent's clock is off its peers' by more than
    /// the bound, as its gossip node measures it; `None` lifts it. Reads go on either way.
    pub fn set_clock_fence(&self, fence: Option<ClockFence>) {
        self.state.clock_fence.send_if_modified(|f| {
            let changed = *f != fence;
            *f = fence;
            changed
        });
    }

    /// The fence on local writes, if any ([`Store::set_clock_fence`]).
    pub fn clock_fence(&self) -> Option<ClockFence> {
        *self.state.clock_fence.borrow()
    }

    /// Changes of the fence on local writes (for the agent's readiness).
    pub fn clock_fence_changes(&self) -> tokio::sync::watch::Receiver<Option<ClockFence>> {
        self.state.clock_fence.subscribe()
    }

    /// This store's wall clock (milliseconds since the Unix epoch): the one it stamps with.
    pub fn wall_ms(&self) -> u64 {
        self.state.wall.now_ms()
    }

    /// Merge records and covered ranges from a peer. Returns what became of each; refusals
    /// are also logged and counted per origin ([`Store::refusals`]).
    /// A batch may hold at most `max_remote_batch_ops` records and ranges (one group commit's
    /// share, so that local writes never wait behind more); a larger one is refused whole.
    pub async fn apply(&self, batch: RemoteBatch) -> Result<ApplyReport, StoreError> {
        let bytes = batch.queued_bytes();
        let n = batch.ops();
        if n > self.max_remote_ops {
            return Err(StoreError::BatchTooLarge {
                ops: n,
                limit: self.max_remote_ops,
            });
        }
        let started = std::time::Instant::now();
        let (reply, rx) = oneshot::channel();
        self.submit(Class::Remote, Request::Remote { batch, reply }, n, bytes)
            .await?;
        let answer = rx.await.map_err(|_| self.unanswered())?;
        self.state.timings.apply.observe(started.elapsed());
        answer
    }

    /// Mark `owner` down (`true`: hide every live record it owns, see [`Entry::owner`]) or up
    /// again, without a replicated write: listings and watch snapshots skip its records from
    /// the commit on, and watchers get each as a removal (a hidden view, [`Entry::is_hidden`])
    /// or, when it is up again, as the record. Committed through the writer, so the change and
    /// the revisions it takes are durable and ordered with the records'. Asking for the state
    /// the owner is already in changes nothing and publishes nothing. This store's own node is
    /// refused ([`StoreError::OwnNode`]): it is alive as long as it answers.
    pub async fn set_owner_down(
        &self,
        owner: NodeId,
        down: bool,
    ) -> Result<OverlayChange, StoreError> {
        if owner == self.node() {
            return Err(StoreError::OwnNode(owner));
        }
        let (reply, rx) = oneshot::channel();
        let request = Request::Overlay { owner, down, reply };
        self.submit(Class::Overlay, request, 1, merge::OP_OVERHEAD)
            .await?;
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Collect up to `limit` tombstones whose timestamps are older than `before_ms` (wall
    /// milliseconds) and that this store committed at or below revision `max_rev`: the
    /// caller says which revision it held long enough ago, because a timestamp alone can be
    /// old on arrival (a slow clock, a forged record). Their rows and index entries go;
    /// their numbers stay known, so a peer that lacks one is told it is covered and an older
    /// version of the key with a known number is still refused. Returns how many went.
    /// Watch tokens from below the highest collected revision that fell behind the log get a
    /// reset (the rows cannot replay the deletions any more).
    ///
    /// Safe once every live member has the tombstone, which anti-entropy gives within
    /// seconds: the age is the margin. A member cut off for longer than that age, holding an
    /// older version of such a key, can bring that version back (as with Cassandra's
    /// `gc_grace_seconds`); see docs/replication.md.
    pub async fn collect_tombstones(
        &self,
        before_ms: u64,
        max_rev: u64,
        limit: usize,
    ) -> Result<usize, StoreError> {
        let state = self.state.clone();
        let tombstones =
            tokio::task::spawn_blocking(move || match (&state.index.lean_kind, &state.rows) {
                (Some(kind), Rows::Sqlite(readers)) => {
                    readers.with(|c| sqlite::tombstones_before(c, before_ms, max_rev, limit, kind))
                }
                _ => Ok(state.index.tombstones_before(before_ms, max_rev, limit)),
            })
            .await
            .map_err(|_| self.unanswered())??;
        let mut collected = 0;
        // One walk of the index, then requests of bounded size to the writer.
        for chunk in tombstones.chunks(COLLECT_CHUNK) {
            collected += self.collect_exact(chunk.to_vec()).await?;
        }
        Ok(collected)
    }

    /// Collect exactly these tombstones, each only if it is still its key's state.
    pub(crate) async fn collect_exact(&self, tombstones: Vec<Entry>) -> Result<usize, StoreError> {
        if tombstones.is_empty() {
            return Ok(0);
        }
        let n = tombstones.len();
        let bytes = tombstones
            .iter()
            .map(|t| t.key().len() + merge::OP_OVERHEAD)
            .sum();
        let (reply, rx) = oneshot::channel();
        let request = Request::Collect { tombstones, reply };
        self.submit(Class::Local, request, n, bytes).await?;
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Retire `origin`: long gone, it leaves the digest (and every hello) and whatever still
    /// arrives from it at or below its head is covered; a number above takes it back. Only
    /// when its owner is held down here, this store knows every number it issued (no gaps),
    /// and holds no record of it (all superseded, tombstones collected); otherwise nothing
    /// changes. Returns whether it was retired now. See docs/replication.md, "Origin
    /// retirement".
    pub async fn retire_origin(&self, origin: NodeId) -> Result<bool, StoreError> {
        self.retire_request(origin, true).await
    }

    /// Take a retired origin back: it is known again up to the head it retired at, and
    /// anti-entropy brings what it issued after. (A record above that head does the same by
    /// itself.) Returns whether it was retired.
    pub async fn unretire_origin(&self, origin: NodeId) -> Result<bool, StoreError> {
        if !self.is_retired(origin) {
            return Ok(false);
        }
        self.retire_request(origin, false).await
    }

    async fn retire_request(&self, origin: NodeId, retire: bool) -> Result<bool, StoreError> {
        let (reply, rx) = oneshot::channel();
        let request = Request::Retire {
            origin,
            retire,
            reply,
        };
        self.submit(Class::Local, request, 1, merge::OP_OVERHEAD)
            .await?;
        rx.await.map_err(|_| self.unanswered())?
    }

    /// Is `origin` retired (as of the latest commit)?
    pub fn is_retired(&self, origin: NodeId) -> bool {
        self.state
            .retired
            .read()
            .expect("retired lock")
            .contains_key(&origin)
    }

    /// The owners whose records the liveness overlay hides, as of the latest commit.
    pub fn down_owners(&self) -> BTreeSet<NodeId> {
        (*self.state.down()).clone()
    }

    /// A live record, from memory. A point lookup for operators: it returns the record even
    /// when the liveness overlay hides it (its owner is down), unlike listings and watches.
    /// In a lean store, only for the keys its kind keeps in memory (`Kind::lean_key` false):
    /// [`Store::read_live`] reads any key.
    pub fn get_live(&self, key: &str) -> Option<Entry> {
        debug_assert!(
            !self.state.index.is_lean(key),
            "get_live({key:?}) in a lean store: use read_live"
        );
        self.state.index.live(key)
    }

    /// A key's live record, wherever it is held (hidden ones too, as [`Store::get_live`]):
    /// from memory, or in a lean store from SQLite on a blocking thread.
    pub async fn read_live(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.read_latest_entry(key).await?.filter(Entry::is_live))
    }

    /// A key's latest state (tombstone included), wherever it is held: from memory, or in a
    /// lean store from SQLite on a blocking thread.
    pub async fn read_latest_entry(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        if !self.state.index.is_lean(key) {
            return Ok(self.state.index.latest(key));
        }
        let state = self.state.clone();
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || lean_read(&state, &key))
            .await
            .map_err(|_| self.unanswered())?
    }

    /// Every key whose latest state (live or tombstone) is owned by `owner`, wherever it is
    /// held: a scan of the index, or in a lean store a query by origin on a blocking thread.
    /// For rare operator actions (forgetting a member, re-signing a bridge's summaries).
    pub async fn read_owned_by(&self, owner: NodeId) -> Result<Vec<Entry>, StoreError> {
        let state = self.state.clone();
        let read = move || match (&state.index.lean_kind, &state.rows) {
            (Some(kind), Rows::Sqlite(readers)) => {
                readers.with(|c| sqlite::entries_of_origin(c, owner, kind))
            }
            _ => Ok(state.index.of_origin(owner)),
        };
        tokio::task::spawn_blocking(read)
            .await
            .map_err(|_| self.unanswered())?
    }

    /// Tests: every key of this (fresh, lean) store's compact index hashes alike, so that
    /// every key after the first goes through the exact map and every read meets rows of
    /// other keys.
    #[cfg(test)]
    pub(crate) fn lean_collide_all(&self) {
        let lean = self.state.index.lean.as_ref().expect("a lean store");
        let mut lean = lean.lock().expect("lean index");
        assert_eq!(lean.len(), 0, "only before any key is held");
        lean.collide_all = true;
    }

    /// A key's latest state as the index holds it (tests).
    #[cfg(test)]
    pub(crate) fn get_latest_entry(&self, key: &str) -> Option<Entry> {
        self.state.index.latest(key)
    }

    /// A key's latest record, tombstone included, as it would travel to another node.
    pub fn get_latest(&self, key: &str) -> Option<Record> {
        debug_assert!(
            !self.state.index.is_lean(key),
            "get_latest({key:?}) in a lean store: use read_latest_entry"
        );
        self.state.index.latest(key).map(|e| Record::from_entry(&e))
    }

    /// Move this store to a fresh origin now, because another live agent writes as this
    /// origin (the membership saw it: a copy of this data directory runs there). Takes the
    /// same path as a peer's record of our own origin that we never wrote: records held under
    /// the old origin are renamed under the new one (timestamps kept), at most once while the
    /// store runs; the probe itself is refused (`Refusal::OwnOriginConflict`). Returns the
    /// origin the store writes as after.
    pub async fn leave_origin(&self) -> Result<NodeId, StoreError> {
        let me = self.node();
        // A number above anything this origin issued: certainly not ours.
        let probe = Record {
            key: Arc::from(""),
            group: Arc::from(""),
            value: None,
            version: Version {
                hlc: Hlc::default(),
                origin: me,
                seq: MAX_SEQ,
            },
        };
        self.apply(RemoteBatch {
            records: vec![probe],
            covered: Vec::new(),
        })
        .await?;
        Ok(self.node())
    }

    /// Every key whose latest state (live or tombstone) is owned by `owner`: a scan of the
    /// whole index, for rare operator actions (forgetting a member). Not for a lean store,
    /// whose index lists no lean keys: [`Store::read_owned_by`] reads either.
    pub fn owned_by(&self, owner: NodeId) -> Vec<Entry> {
        debug_assert!(
            self.state.index.lean.is_none(),
            "owned_by in a lean store: use read_owned_by"
        );
        self.state.index.of_origin(owner)
    }

    /// A group's live records, from memory, in key order, except those of owners the
    /// liveness overlay hides.
    pub fn list(&self, group: &str, filter: Filter) -> Vec<Entry> {
        let down = self.state.down();
        self.state
            .index
            .page(group, filter, &down, None, usize::MAX, usize::MAX)
            .0
    }

    /// One page of a group's live records with keys after `after`, in key order, except those
    /// of owners the liveness overlay hides (they count as looked at): at most `limit`
    /// records, looking at no more than `max_scan` of the group's records (a filter may skip
    /// many), so a page costs what it is bounded to. Returns the records and the key after
    /// which the next page starts (`None`: nothing follows).
    pub fn list_page(
        &self,
        group: &str,
        filter: Filter,
        after: Option<&str>,
        limit: usize,
        max_scan: usize,
    ) -> (Vec<Entry>, Option<String>) {
        let down = self.state.down();
        self.state
            .index
            .page(group, filter, &down, after, limit, max_scan)
    }

    /// Test-only fault injection (the watchdog's tests): a thread of its own holds the
    /// change log's write lock for `d`, as a deadlock would. The writer thread stops at its
    /// next commit, and every reader of the log with it. Production code never calls this.
    #[doc(hidden)]
    pub fn hold_feed_lock(&self, d: std::time::Duration) {
        let state = self.state.clone();
        std::thread::spawn(move || state.feed.hold_log_for(d));
    }

    /// The change feed.
    pub fn feed(&self) -> &Feed {
        &self.state.feed
    }

    /// A watch cursor over one group (or every group, with `None`).
    pub fn watch(
        &self,
        group: Option<Arc<str>>,
        resume: Option<ResumeToken>,
        max_batch: usize,
    ) -> Cursor {
        Cursor::new(self.state.clone(), group, resume, max_batch)
    }

    /// A reading of this store's hybrid logical clock for a view of its state: at or above
    /// the version of everything readers can see now (the later of the wall clock and the
    /// clock as of the latest commit). Watch messages carry it; nothing is persisted.
    pub fn view_hlc(&self) -> Hlc {
        self.state.view_hlc()
    }

    /// How far this store's clock leads its wall clock, when by more than the bound: local
    /// writes are refused meanwhile ([`StoreError::HlcAhead`]), and the agent is not ready.
    /// It ends by itself when the wall clock catches up; a data directory whose clock ran
    /// far ahead can instead be wiped (the agent then catches up from its peers).
    pub fn clock_ahead_ms(&self) -> Option<u64> {
        let lead = Hlc(self.state.hlc.load(Ordering::Acquire))
            .physical_ms()
            .saturating_sub(self.state.wall.now_ms());
        (lead > self.max_offset_ms).then_some(lead)
    }

    /// What this store knows, per origin, as of the latest commit.
    pub fn digest(&self) -> Digest {
        self.state.knowledge.read().expect("knowledge lock").clone()
    }

    /// Records refused from peers, per origin, since the store opened.
    pub fn refusals(&self) -> BTreeMap<NodeId, Refusals> {
        self.state.refusals.lock().expect("refusals lock").clone()
    }

    /// Read one origin's records with sequence numbers in `range`, highest first, within
    /// `budget`, with the known numbers that have nothing left marked covered. Reads SQLite
    /// on a blocking thread, never the writer's.
    pub async fn read_origin(
        &self,
        origin: NodeId,
        range: SeqRange,
        budget: ReadBudget,
    ) -> Result<OriginRange, StoreError> {
        let state = self.state.clone();
        match &self.state.rows {
            Rows::Sqlite(_) => {
                tokio::task::spawn_blocking(move || read_origin(&state, origin, range, budget))
                    .await
                    .map_err(|e| StoreError::Failed(format!("range read: {e}").into()))?
            }
            Rows::Memory(_) => read_origin(&state, origin, range, budget),
        }
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            node: self.state.node(),
            keys: self.state.index.len_keys(),
            live: self.state.index.len_live(),
            groups: self.state.index.len_groups(),
            revision: self.state.feed.revision(),
            commits: self.state.commits.load(Ordering::Relaxed),
        }
    }

    /// The store's latency histograms (writes, peers' batches, fsyncs).
    pub fn timings(&self) -> &timing::Timings {
        &self.state.timings
    }

    /// How full the write queues are: (local writes, peers' batches); `None` for the
    /// in-memory store, which has none.
    pub fn queue_depths(&self) -> Option<(QueueDepth, QueueDepth)> {
        match &*self.engine {
            Engine::Thread { queue, .. } => Some(queue.depths()),
            Engine::Inline(_) => None,
        }
    }

    /// Why the store failed for good, if it did.
    pub fn failure(&self) -> Option<Arc<str>> {
        self.state.failure()
    }

    /// Resolves when the store fails for good (never, for a healthy store), with the reason.
    pub async fn failed(&self) -> Arc<str> {
        let mut rx = self.state.failure.subscribe();
        loop {
            // The borrow ends in this statement: a watch `Ref` is a lock guard.
            let failure = rx.borrow_and_update().clone();
            if let Some(why) = failure {
                return why;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as the state we hold.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Finish the writes already queued, stop the writer thread and wait for it. Writes sent
    /// after this fail with [`StoreError::Closed`]. Blocking: call from `spawn_blocking`.
    pub fn close(&self) {
        match &*self.engine {
            Engine::Thread { queue, handle } => {
                queue.close(true);
                let handle = handle.lock().expect("writer handle lock").take();
                if let Some(handle) = handle
                    && handle.join().is_err()
                {
                    tracing::error!("store writer thread panicked");
                }
            }
            Engine::Inline(_) => self.state.feed.close(),
        }
    }
}

/// How long a point read of a lean key retries: each retry means the writer replaced the
/// key's row between the index's answer and the read (it installs the new revision a moment
/// after its commit), so the read waits a little, longer each time, and asks again.
const LEAN_READ_PATIENCE: std::time::Duration = std::time::Duration::from_secs(2);

/// The blocking part of [`Store::read_latest_entry`] for a lean key: the revision from the
/// lean index, then the row at it (a row of another key that shares the hash: the key has
/// none; a row gone: superseded meanwhile, ask the index again).
fn lean_read(state: &State, key: &str) -> Result<Option<Entry>, StoreError> {
    let (Some(lean), Some(kind), Rows::Sqlite(readers)) =
        (&state.index.lean, &state.index.lean_kind, &state.rows)
    else {
        return Ok(state.index.latest(key));
    };
    let deadline = std::time::Instant::now() + LEAN_READ_PATIENCE;
    let mut pause = std::time::Duration::from_micros(50);
    loop {
        let Some((rev, _)) = lean.lock().expect("lean index").candidate(key) else {
            return Ok(None);
        };
        match readers.with(|c| sqlite::entry_at(c, rev, kind))? {
            Some(e) if e.key() == key => return Ok(Some(e)),
            Some(_) => return Ok(None),
            None if std::time::Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(std::time::Duration::from_millis(10));
            }
            None => return Err(StoreError::Changed(Arc::from(key))),
        }
    }
}

/// The blocking part of [`Store::read_origin`].
fn read_origin(
    state: &State,
    origin: NodeId,
    range: SeqRange,
    budget: ReadBudget,
) -> Result<OriginRange, StoreError> {
    // Knowledge first: every number it calls known was durable before the rows are read, so
    // a known number without a row was superseded, never merely not yet written.
    let known = state
        .knowledge
        .read()
        .expect("knowledge lock")
        .get(&origin)
        .cloned()
        .unwrap_or_default();
    let limit = budget.max_records.max(1);
    // Rows found, before any is dropped for having moved on: whether the limit was reached.
    let raw;
    let rows: Vec<Record> = match &state.rows {
        Rows::Sqlite(readers) => {
            let rows = readers.with(|conn| sqlite::origin_rows(conn, origin, range, limit))?;
            raw = rows.len();
            rows.into_iter()
                .map(|r| Record {
                    key: Arc::from(r.key),
                    group: Arc::from(r.group),
                    value: r.value.map(Arc::from),
                    version: r.version,
                })
                .collect()
        }
        Rows::Memory(rows) => {
            let keys = rows
                .lock()
                .expect("rows lock")
                .origin_keys(origin, range, limit);
            raw = keys.len();
            keys.iter()
                .filter_map(|k| state.index.latest(k))
                .filter(|e| e.version().origin == origin && range.contains(e.version().seq))
                .map(|e| Record::from_entry(&e))
                .collect()
        }
    };
    let full = raw >= limit;
    let mut records = Vec::new();
    let mut bytes = 0;
    let mut cut = false;
    for r in rows {
        let size = r.key.len() + r.group.len() + r.value.as_ref().map_or(0, |v| v.len());
        if !records.is_empty() && bytes + size > budget.max_bytes {
            cut = true;
            break;
        }
        bytes += size;
        records.push(r);
    }
    let lowest = records.last().map(|r| r.version.seq);
    let (scanned, rest) = match lowest {
        Some(low) if cut || full => (
            SeqRange::new(low, range.hi()).expect("low is in the range"),
            SeqRange::new(range.lo(), low - 1),
        ),
        _ => (range, None),
    };
    let mut held: Vec<u64> = records.iter().map(|r| r.version.seq).collect();
    held.sort_unstable();
    let mut covered = Vec::new();
    for k in known.known_within(scanned) {
        // Every number here is at most MAX_SEQ, so `+ 1` cannot overflow.
        let mut next = k.lo();
        for &s in held.iter().filter(|&&s| k.contains(s)) {
            covered.extend(SeqRange::new(next, s.saturating_sub(1)));
            next = s + 1;
        }
        covered.extend(SeqRange::new(next, k.hi()));
    }
    Ok(OriginRange {
        records,
        covered,
        rest,
    })
}
