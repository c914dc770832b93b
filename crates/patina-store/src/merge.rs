//! The merge: local writes and records from peers, staged against the index and the
//! per-origin knowledge, one group commit at a time.
//!
//! [`Core`] holds everything a commit changes besides the index (counters, clock, knowledge)
//! and stages a group of requests into a [`Backend`] (SQLite's transaction, or memory). It
//! does no I/O of its own and reads time from the injected clock, so the durable store and
//! the in-memory one share every rule. Nothing staged is visible until the caller installs
//! it after the backend committed ([`Staged`]); on failure the caller restores the core.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::entry::{ByKey, MAX_KEY_LEN};
use crate::feed::{Change, LeftGroups};
use crate::knowledge::{Digest, OriginKnowledge, SeqRange, TooManyGaps};
use crate::overlay::{self, DownSet, MAX_DOWN_OWNERS, OverlayChange};
use crate::{Candidate, Clock, Entry, Hlc, HlcClock, KindRef, NodeId, State, StoreError, Version};

/// A write from this node's own clients.
#[derive(Clone, Debug)]
pub enum LocalWrite {
    Put {
        key: String,
        group: String,
        value: Vec<u8>,
    },
    Delete {
        key: String,
    },
    /// Delete `key` only if its live version is still `version` (what the writer read):
    /// otherwise the whole request is refused with [`StoreError::Changed`]. For deletions
    /// decided on a scan (forgetting a member) that must not delete a newer write.
    DeleteIf {
        key: String,
        version: Version,
    },
    /// Put `value` as the successor of `version`, which must still be the key's live
    /// version (else the whole request is refused with [`StoreError::Changed`]): under this
    /// origin, one logical tick after `version`, so that every write made later anywhere (a
    /// deletion too) wins over it. For a judgement about what `version` holds (a machine's
    /// health, from its checks) that must never overwrite a newer write made elsewhere.
    PutAfter {
        key: String,
        group: String,
        value: Vec<u8>,
        version: Version,
    },
}

impl LocalWrite {
    pub(crate) fn key(&self) -> &str {
        match self {
            LocalWrite::Put { key, .. }
            | LocalWrite::PutAfter { key, .. }
            | LocalWrite::Delete { key }
            | LocalWrite::DeleteIf { key, .. } => key,
        }
    }

    /// Bytes this write holds while queued, for the queue's byte budget.
    pub(crate) fn queued_bytes(&self) -> usize {
        OP_OVERHEAD
            + match self {
                LocalWrite::Put { key, group, value }
                | LocalWrite::PutAfter {
                    key, group, value, ..
                } => key.len() + group.len() + value.len(),
                LocalWrite::Delete { key } | LocalWrite::DeleteIf { key, .. } => key.len(),
            }
    }
}

/// The least timestamp after `hlc`: one logical tick.
fn successor(hlc: Hlc) -> Hlc {
    Hlc(hlc.0.saturating_add(1))
}

/// A record as it travels between nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub key: Arc<str>,
    pub group: Arc<str>,
    /// The encoded value; `None` for a tombstone.
    pub value: Option<Arc<[u8]>>,
    pub version: Version,
}

impl Record {
    pub(crate) fn queued_bytes(&self) -> usize {
        OP_OVERHEAD + self.key.len() + self.group.len() + self.value.as_ref().map_or(0, |v| v.len())
    }

    /// The record of an entry as it travels between nodes.
    pub fn from_entry(e: &Entry) -> Record {
        Record {
            key: Arc::from(e.key()),
            group: Arc::from(e.group()),
            value: e.value().map(Arc::from),
            version: e.version(),
        }
    }
}

/// Per-op bookkeeping counted against a queue's byte budget besides keys and values.
pub(crate) const OP_OVERHEAD: usize = 64;

/// What a peer sends: records, and ranges of an origin's sequence numbers that it knows were
/// superseded and have nothing left ("covered, nothing left").
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RemoteBatch {
    pub records: Vec<Record>,
    pub covered: Vec<(NodeId, SeqRange)>,
}

impl RemoteBatch {
    pub(crate) fn queued_bytes(&self) -> usize {
        self.records.iter().map(Record::queued_bytes).sum::<usize>()
            + self.covered.len() * OP_OVERHEAD
    }

    pub(crate) fn ops(&self) -> usize {
        self.records.len() + self.covered.len()
    }
}

/// What became of one record (or covered range) from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    /// It superseded what the store held and is now durable and served.
    Applied,
    /// The store already knew that version, or holds a newer version of the key; it is now
    /// known (durably) and nothing else changed.
    Covered,
    /// Not applied, and its sequence number stays unknown. Counted and logged per origin.
    Refused(Refusal),
}

/// Why a record from a peer was refused. Each is counted per origin (`Store::refusals`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Key or group longer than the store allows.
    KeyTooLong,
    /// A value larger than [`MAX_VALUE_LEN`].
    ValueTooLarge,
    /// Sequence number 0 (never issued) or above [`crate::MAX_SEQ`].
    BadSeq,
    /// Its timestamp is further ahead of this node's wall clock than allowed: the origin's
    /// clock (or a bug) is off, and applying it would drag every later local write along.
    ClockAhead { ahead_ms: u64 },
    /// The record kind refused the value (see [`crate::Kind::check`]).
    Invalid(String),
    /// The record kind refused it against what this store holds (see
    /// [`crate::Kind::check_held`]), e.g. its origin's registration is not here (yet).
    Unmet(String),
    /// The origin already has [`crate::MAX_GAPS_PER_ORIGIN`] gaps here; this record would
    /// open another. It will come again, in order, through anti-entropy.
    TooManyGaps,
    /// The store already tracks [`MAX_ORIGINS`] origins.
    TooManyOrigins,
    /// A record of this store's own origin that this store never wrote: a copy of this data
    /// directory runs elsewhere (or this one was restored from a backup). This store moved
    /// to a fresh origin.
    OwnOriginConflict,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::KeyTooLong => write!(f, "key or group too long"),
            Refusal::ValueTooLarge => write!(f, "value too large"),
            Refusal::BadSeq => write!(f, "sequence number 0 or above 2^63-1"),
            Refusal::ClockAhead { ahead_ms } => {
                write!(f, "timestamp {ahead_ms} ms ahead of this node's clock")
            }
            Refusal::Invalid(why) => write!(f, "invalid value: {why}"),
            Refusal::Unmet(why) => write!(f, "refused against what is held: {why}"),
            Refusal::TooManyGaps => write!(f, "too many gaps for this origin"),
            Refusal::TooManyOrigins => write!(f, "too many origins"),
            Refusal::OwnOriginConflict => {
                write!(f, "a version of this store's own origin it never wrote")
            }
        }
    }
}

/// The outcome of applying a [`RemoteBatch`]: one entry per record and per covered range, in
/// the batch's order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub records: Vec<ApplyOutcome>,
    pub covered: Vec<ApplyOutcome>,
}

impl ApplyReport {
    /// How many records superseded what was held.
    pub fn applied(&self) -> usize {
        self.records
            .iter()
            .filter(|o| **o == ApplyOutcome::Applied)
            .count()
    }
}

/// Largest value a store takes, whatever its kind (kinds set tighter limits: machines 4 KiB).
/// Records are replicated to every node and served in bounded messages: one huge record
/// must not break every snapshot that contains it.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// Passes over a batch's records refused against what is held, each after the last took
/// one: the depth of the longest chain of records that need one another (a summary needs
/// its bridge's heartbeat, which needs its certificate) and then some.
const MAX_DEPENDENCY_PASSES: usize = 4;

/// How far ahead of our wall clock a remote record's timestamp may be. A peer with a clock
/// (or a bug) far in the future would otherwise drag every later local write with it, up to
/// an HLC that can no longer advance.
pub const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// Most origins a store tracks. A region has at most a few thousand agents over its life
/// (each data directory is one origin); a peer inventing origins must not grow the digest
/// without bound.
pub const MAX_ORIGINS: usize = 65_536;

/// What a store knows about itself, persisted with every commit (the overlay's part with
/// every commit that changes it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Meta {
    /// This store's origin: the identity of every local write.
    pub node: NodeId,
    /// The highest sequence number this origin ever committed.
    pub local_seq: u64,
    /// The highest HLC this store ever issued or stored.
    pub hlc: crate::Hlc,
    /// The store revision of the latest committed change.
    pub revision: u64,
    /// The liveness overlay: owners whose live records readers do not see.
    pub down: DownSet,
    /// The revision of the latest change the overlay published (0: none). Those changes are
    /// not rows: a watcher below it cannot catch up from the stored rows.
    pub overlay_rev: u64,
    /// The highest revision of a tombstone collected (0: none). Its row is gone: a watcher
    /// below it cannot catch up from the stored rows either.
    pub collected_rev: u64,
    /// Retired origins and their heads when they retired: long gone, everything they issued
    /// up to the head known and superseded. They are out of the digest (and so out of every
    /// hello); what arrives from them at or below the head is covered, and a number above it
    /// brings the origin back (see `Core::unretire`).
    pub retired: Retired,
    /// Origins this store wrote as before it moved to a fresh one, each with the timestamp
    /// it had reached when it moved: a record of such an origin at or below that timestamp
    /// (written by this store, or by the copy it moved away from, before the move) is adopted
    /// when it arrives: renamed under the current origin with its timestamp, so that its
    /// owner is an agent that runs. At most [`MAX_FORMER`], the newest kept.
    pub former: Former,
    /// The opening of the store that made the latest commit (0: none recorded). Every
    /// revision up to `revision` is durable under it, so a watch token of that opening at or
    /// below `revision` resumes after a restart (see `watch.rs`).
    pub incarnation: u64,
}

/// [`Meta::former`].
pub type Former = std::collections::BTreeMap<NodeId, crate::Hlc>;

/// Former origins remembered: a store moves at most once per start.
pub const MAX_FORMER: usize = 16;

/// Where new origin identities come from when a store must move to a fresh one.
#[derive(Debug)]
pub enum IdSource {
    /// The operating system's random source.
    Os,
    /// A deterministic sequence (simulations).
    Seeded(u64),
}

impl IdSource {
    pub(crate) fn next(&mut self) -> NodeId {
        loop {
            let id = match self {
                IdSource::Os => {
                    let mut buf = [0u8; 8];
                    getrandom::fill(&mut buf).expect("the OS random source failed");
                    u64::from_le_bytes(buf)
                }
                IdSource::Seeded(state) => {
                    // splitmix64
                    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = *state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    z ^ (z >> 31)
                }
            };
            if id != 0 {
                return NodeId(id);
            }
        }
    }
}

/// Retired origins, each with the head it retired at.
pub(crate) type Retired = Arc<BTreeMap<NodeId, u64>>;

/// The storage a group is staged into. Errors are SQLite's, also for the memory backend
/// (which fails only when a failpoint says so).
pub(crate) trait Backend {
    fn begin(&mut self) -> Result<(), rusqlite::Error>;
    /// A key's new state, replacing `previous`.
    fn put_record(
        &mut self,
        entry: &Entry,
        previous: Option<&Entry>,
    ) -> Result<(), rusqlite::Error>;
    fn put_knowledge(&mut self, origin: NodeId, k: &OriginKnowledge)
    -> Result<(), rusqlite::Error>;
    fn put_meta(&mut self, meta: &Meta, kind: &str) -> Result<(), rusqlite::Error>;
    /// A collected tombstone's row goes.
    fn delete_record(&mut self, entry: &Entry) -> Result<(), rusqlite::Error>;
    /// A retired origin's knowledge goes.
    fn delete_knowledge(&mut self, origin: NodeId) -> Result<(), rusqlite::Error>;
    /// Does any stored row (committed, or staged in this group) belong to `origin`?
    fn holds_origin(&mut self, origin: NodeId) -> Result<bool, rusqlite::Error>;
    /// The retired set (`Meta::retired`), only when a group changed it.
    fn put_retired(&mut self, meta: &Meta) -> Result<(), rusqlite::Error>;
    fn put_former(&mut self, meta: &Meta) -> Result<(), rusqlite::Error>;
    /// The overlay's part of the meta (`down`, `overlay_rev`), in the same transaction; only
    /// when a group changed it.
    fn put_overlay(&mut self, meta: &Meta) -> Result<(), rusqlite::Error>;
    /// The row stored at revision `rev` and whether it lists groups its key left (a lean
    /// store's merges read a key's state this way). Backends without rows have none.
    fn row_at(&self, _rev: u64) -> Result<Option<(crate::sqlite::Row, bool)>, rusqlite::Error> {
        Ok(None)
    }
    /// Every stored row of `origin` (a lean store's index has none to scan).
    fn entries_of_origin(
        &self,
        _origin: NodeId,
        _kind: &KindRef,
    ) -> Result<Vec<Entry>, rusqlite::Error> {
        Ok(Vec::new())
    }
    /// Make everything since `begin` durable.
    fn commit(&mut self) -> Result<(), rusqlite::Error>;
    /// Drop everything since `begin`.
    fn rollback(&mut self);
}

/// One request of a group, as the core sees it.
pub(crate) enum Work<'a> {
    Local(&'a [LocalWrite]),
    Remote(&'a RemoteBatch),
    /// Mark `owner` down (hide its records) or up (show them again).
    Overlay {
        owner: NodeId,
        down: bool,
    },
    /// Collect these tombstones (each only if it is still the key's state).
    Collect(&'a [Entry]),
    /// Retire an origin (or take it back: `retire` false).
    Retire {
        origin: NodeId,
        retire: bool,
    },
}

/// The result of one request of a group.
pub(crate) enum Outcome {
    Local(Result<Vec<Version>, StoreError>),
    Remote(ApplyReport),
    Overlay(Result<OverlayChange, StoreError>),
    /// How many tombstones went.
    Collect(usize),
    /// Whether the retired set changed.
    Retire(Result<bool, StoreError>),
}

/// What a staged group changes once its commit succeeds.
#[derive(Default)]
pub(crate) struct Staged {
    /// New states of keys, for the index, in revision order.
    /// New states, each with the revision its key had before (as the group read it).
    pub installs: Vec<(Entry, Option<u64>)>,
    /// What the feed publishes, in revision order: every install (as its hidden view when
    /// its owner is down), and the overlay's changes of visibility, which are not installed.
    pub changes: Vec<Change>,
    /// The group changed the overlay (`Meta::down`, `Meta::overlay_rev`).
    pub overlay: bool,
    /// Knowledge of the origins this group touched, as it is after the group.
    pub knowledge: BTreeMap<NodeId, OriginKnowledge>,
    pub refusals: Vec<(NodeId, Refusal)>,
    /// The origin this store left for a fresh one in this group.
    pub moved_from: Option<NodeId>,
    /// Tombstones collected: out of the index before `installs` go in.
    pub removals: Vec<Entry>,
    /// Origins retired in this group: out of the knowledge.
    pub forgotten: Vec<NodeId>,
    /// The group changed `Meta::retired`.
    pub retired: bool,
    /// The former origins changed (a move).
    pub former: bool,
}

/// What a group may change besides the index: restored as a whole when a commit fails.
#[derive(Clone)]
struct Saved {
    moved: bool,
    meta: Meta,
    clock: crate::Hlc,
    knowledge: BTreeMap<NodeId, Option<OriginKnowledge>>,
}

pub(crate) struct Core {
    /// Set once this store moved to a fresh origin since it opened: it moves at most once,
    /// so a peer (or bug) repeating a conflict cannot make it churn identities.
    pub moved: bool,
    pub meta: Meta,
    pub clock: HlcClock,
    /// The authoritative digest; readers see a copy published after each commit.
    pub knowledge: Digest,
    pub kind: KindRef,
    pub wall: Arc<dyn Clock>,
    pub ids: IdSource,
    /// [`crate::StoreOptions::max_clock_offset_ms`].
    pub max_offset_ms: u64,
    /// The overlay was changed in memory only (the disk was full): the next commit persists
    /// it.
    pub overlay_unpersisted: bool,
}

/// States of keys written earlier in the current group, not yet in the index.
type Pending = HashSet<ByKey>;

/// A key's state as of this point in the group: pending, else the index's.
fn current(state: &State, pending: &Pending, key: &str) -> Option<Entry> {
    pending
        .get(key)
        .map(|e| e.0.clone())
        .or_else(|| state.index.latest(key))
}

/// What staging one group works with besides the core: the readers' state, the group's time,
/// the backend, keys written earlier in the group, what it will change, and what to restore
/// if it fails.
struct Group<'g> {
    state: &'g State,
    now_ms: u64,
    backend: &'g mut dyn Backend,
    pending: Pending,
    staged: Staged,
    saved: Saved,
    kind: KindRef,
}

impl Group<'_> {
    /// The records of `origin`: a scan of the index (committed ones; the group's own writes
    /// are in `pending`), or in a lean store a query of the rows by origin on the writer's
    /// connection (which also sees rows staged in this group: callers prefer `pending`).
    fn of_origin(&self, origin: NodeId) -> Result<Vec<Entry>, rusqlite::Error> {
        match &self.state.index.lean {
            None => Ok(self.state.index.of_origin(origin)),
            Some(_) => self.backend.entries_of_origin(origin, &self.kind),
        }
    }

    /// A key's state as of this point in the group.
    fn current(&self, key: &str) -> Option<Entry> {
        let Some(lean) = self
            .state
            .index
            .lean
            .as_ref()
            .filter(|_| self.state.index.is_lean(key))
        else {
            return current(self.state, &self.pending, key);
        };
        if let Some(e) = self.pending.get(key) {
            return Some(e.0.clone());
        }
        // A lean store: the index gives the row's revision; the row itself is read from the
        // writer's own connection. A read that fails is a failing disk: fatal, as a failed
        // commit is (the writer thread's guard fails the store).
        let backend = &*self.backend;
        let row_at = |rev: u64| {
            backend
                .row_at(rev)
                .unwrap_or_else(|e| panic!("reading the stored row at revision {rev}: {e}"))
        };
        // The candidate under the lock, the row read after it (readers' stats and point reads
        // never wait on this thread's disk): the writer is the lean index's only mutator, so
        // the candidate cannot change meanwhile. A row of another key (sharing the hash):
        // this key has none.
        let candidate = lean.lock().expect("lean index").candidate(key);
        let (rev, _) = candidate?;
        let (row, moved) = row_at(rev)?;
        if row.key != key {
            return None;
        }
        Some(row.entry(rev, moved, &self.kind))
    }

    /// Stage a key's new state (already written to the backend). `down`: the overlay as of
    /// this point in the group.
    fn stage_change(&mut self, down: &BTreeSet<NodeId>, entry: Entry, prev: Option<Entry>) {
        stage_change(&mut self.pending, &mut self.staged, down, entry, prev);
    }
}

impl Core {
    /// Stage every request of a group into `backend` and commit it. On error nothing of the
    /// group is durable and the core is as it was before.
    pub fn commit_group(
        &mut self,
        state: &State,
        work: &[Work<'_>],
        backend: &mut dyn Backend,
    ) -> Result<(Vec<Outcome>, Staged), rusqlite::Error> {
        let mut g = Group {
            state,
            now_ms: self.wall.now_ms(),
            backend,
            pending: Pending::new(),
            staged: Staged::default(),
            saved: Saved {
                moved: self.moved,
                meta: self.meta.clone(),
                clock: self.clock.last(),
                knowledge: BTreeMap::new(),
            },
            kind: self.kind.clone(),
        };
        match self.run_group(&mut g, work) {
            Ok(outcomes) => Ok((outcomes, g.staged)),
            Err(e) => {
                g.backend.rollback();
                let saved = g.saved;
                self.moved = saved.moved;
                self.meta = saved.meta;
                self.clock.reset_to(saved.clock);
                for (origin, k) in saved.knowledge {
                    match k {
                        Some(k) => self.knowledge.insert(origin, k),
                        None => self.knowledge.remove(&origin),
                    };
                }
                Err(e)
            }
        }
    }

    fn run_group(
        &mut self,
        g: &mut Group<'_>,
        work: &[Work<'_>],
    ) -> Result<Vec<Outcome>, rusqlite::Error> {
        g.backend.begin()?;
        let outcomes = self.stage(g, work)?;
        self.meta.hlc = self.clock.last();
        for (origin, k) in &g.staged.knowledge {
            g.backend.put_knowledge(*origin, k)?;
        }
        if g.staged.overlay || self.overlay_unpersisted {
            g.backend.put_overlay(&self.meta)?;
        }
        for origin in &g.staged.forgotten {
            if !self.knowledge.contains_key(origin) {
                g.backend.delete_knowledge(*origin)?;
            }
        }
        if g.staged.retired {
            g.backend.put_retired(&self.meta)?;
        }
        if g.staged.former {
            g.backend.put_former(&self.meta)?;
        }
        if !g.staged.removals.is_empty() {
            // Before the rows go: a watch walking them must see that they may (a rollback
            // only costs it a needless snapshot).
            g.state.raise_collected(self.meta.collected_rev);
        }
        g.backend.put_meta(&self.meta, self.kind.name())?;
        g.backend.commit()?;
        self.overlay_unpersisted = false;
        Ok(outcomes)
    }

    /// Change one origin's knowledge, remembering its state before the group.
    fn knowledge_mut<'a>(
        knowledge: &'a mut Digest,
        g: &mut Group<'_>,
        origin: NodeId,
    ) -> &'a mut OriginKnowledge {
        g.saved
            .knowledge
            .entry(origin)
            .or_insert_with(|| knowledge.get(&origin).cloned());
        g.staged.knowledge.entry(origin).or_default();
        knowledge.entry(origin).or_default()
    }

    fn stage(
        &mut self,
        g: &mut Group<'_>,
        work: &[Work<'_>],
    ) -> Result<Vec<Outcome>, rusqlite::Error> {
        let mut outcomes = Vec::with_capacity(work.len());
        for w in work {
            let outcome = match w {
                Work::Local(ops) => Outcome::Local(self.stage_local(g, ops)?),
                Work::Remote(batch) => Outcome::Remote(self.stage_remote(g, batch)?),
                Work::Overlay { owner, down } => {
                    Outcome::Overlay(self.stage_overlay(g, *owner, *down))
                }
                Work::Collect(tombstones) => Outcome::Collect(self.stage_collect(g, tombstones)?),
                Work::Retire { origin, retire } => {
                    Outcome::Retire(self.stage_retire(g, *origin, *retire))
                }
            };
            outcomes.push(outcome);
        }
        if let Some(old) = g.staged.moved_from {
            self.rename_held(g, old)?;
        }
        // Publish the final state of every origin touched (a retired one is gone).
        for origin in &g.staged.forgotten {
            g.staged.knowledge.remove(origin);
        }
        for (origin, k) in g.staged.knowledge.iter_mut() {
            *k = self.knowledge.get(origin).cloned().unwrap_or_default();
        }
        Ok(outcomes)
    }

    /// The next version this origin issues, and the next revision: a local write's (or a
    /// re-issued record's).
    fn next_local_version(&mut self, now_ms: u64) -> Version {
        self.meta.local_seq += 1;
        self.meta.revision += 1;
        Version {
            hlc: self.clock.tick(now_ms),
            origin: self.meta.node,
            seq: self.meta.local_seq,
        }
    }

    /// The version a local write gets: the clock's next tick, or for
    /// [`LocalWrite::PutAfter`] the tick after the version it succeeds.
    fn version_of(&mut self, op: &LocalWrite, now_ms: u64) -> Version {
        match op {
            LocalWrite::PutAfter { version, .. } => {
                self.meta.local_seq += 1;
                self.meta.revision += 1;
                let hlc = successor(version.hlc);
                // Readers' view of this store (`view_hlc`) stays at or above it.
                self.clock.observe(hlc);
                Version {
                    hlc,
                    origin: self.meta.node,
                    seq: self.meta.local_seq,
                }
            }
            _ => self.next_local_version(now_ms),
        }
    }

    fn stage_local(
        &mut self,
        g: &mut Group<'_>,
        ops: &[LocalWrite],
    ) -> Result<Result<Vec<Version>, StoreError>, rusqlite::Error> {
        let flags = match self.check_local(g, ops) {
            Ok(flags) => flags,
            Err(e) => return Ok(Err(e)),
        };
        let mut versions = Vec::with_capacity(ops.len());
        for (op, flags) in ops.iter().zip(flags) {
            let version = self.version_of(op, g.now_ms);
            let prev = g.current(op.key());
            let entry = match op {
                LocalWrite::Put { key, group, value }
                | LocalWrite::PutAfter {
                    key, group, value, ..
                } => Entry::new(key, group, Some(value), flags, version, self.meta.revision),
                LocalWrite::Delete { key } | LocalWrite::DeleteIf { key, .. } => {
                    let prev = prev.as_ref().expect("checked: deletes name live keys");
                    Entry::new(key, prev.group(), None, flags, version, self.meta.revision)
                }
            };
            let entry = mark_moves(entry, prev.as_ref());
            g.backend.put_record(&entry, prev.as_ref())?;
            versions.push(version);
            g.stage_change(&self.meta.down, entry, prev);
        }
        let (node, seq) = (self.meta.node, self.meta.local_seq);
        *Self::knowledge_mut(&mut self.knowledge, g, node) = OriginKnowledge::dense(seq);
        Ok(Ok(versions))
    }

    /// Check a local request against the state it would apply to, all ops in order, before
    /// any of them is written: one failing op rejects the whole request. Returns each op's
    /// flags.
    fn check_local(
        &self,
        g: &Group<'_>,
        ops: &[LocalWrite],
    ) -> Result<Vec<crate::Flags>, StoreError> {
        /// A key's state after the ops checked so far.
        struct After<'a> {
            live_group: Option<&'a str>,
            version: Version,
            value: Option<&'a [u8]>,
        }
        let lead_ms = self.clock.last().physical_ms().saturating_sub(g.now_ms);
        if lead_ms > self.max_offset_ms {
            return Err(StoreError::HlcAhead {
                lead_ms,
                bound_ms: self.max_offset_ms,
            });
        }
        let mut local: HashMap<&str, After<'_>> = HashMap::new();
        let mut flags = Vec::with_capacity(ops.len());
        // The versions these ops will get, as `stage_local` will issue them.
        let mut clock = self.clock.clone();
        for (seq, op) in (self.meta.local_seq + 1..).zip(ops) {
            let key = op.key();
            if key.len() > MAX_KEY_LEN {
                return Err(StoreError::KeyTooLong(key.len()));
            }
            let version = Version {
                hlc: match op {
                    LocalWrite::PutAfter { version, .. } => {
                        // The successor of a version stamped ahead of this clock (a peer's
                        // fast clock, within what peers take) would drag this store's clock
                        // with it and fence every later local write: refused until the wall
                        // clock is within the bound of it.
                        let next = successor(version.hlc);
                        let lead_ms = next.physical_ms().saturating_sub(g.now_ms);
                        if lead_ms > self.max_offset_ms {
                            return Err(StoreError::HlcAhead {
                                lead_ms,
                                bound_ms: self.max_offset_ms,
                            });
                        }
                        clock.observe(next);
                        next
                    }
                    _ => clock.tick(g.now_ms),
                },
                origin: self.meta.node,
                seq,
            };
            let held = g.current(key);
            let (live_group, before) = match local.get(key) {
                Some(a) => (
                    a.live_group,
                    Some(Candidate {
                        version: a.version,
                        value: a.value,
                    }),
                ),
                None => (
                    held.as_ref().filter(|p| p.is_live()).map(|p| p.group()),
                    held.as_ref().map(|h| Candidate {
                        version: h.version(),
                        value: h.value(),
                    }),
                ),
            };
            let (group, value) = match op {
                LocalWrite::Put { group, value, .. }
                | LocalWrite::PutAfter { group, value, .. } => {
                    if let LocalWrite::PutAfter { version: seen, .. } = op
                        && (live_group.is_none()
                            || before.as_ref().map(|b| b.version) != Some(*seen))
                    {
                        return Err(StoreError::Changed(Arc::from(key)));
                    }
                    if group.len() > MAX_KEY_LEN {
                        return Err(StoreError::KeyTooLong(group.len()));
                    }
                    if value.len() > MAX_VALUE_LEN {
                        return Err(StoreError::ValueTooLarge(value.len()));
                    }
                    if self.kind.group_change() == crate::GroupChange::Refuse
                        && let Some(existing) = live_group.filter(|g| g != group)
                    {
                        return Err(StoreError::GroupChange {
                            key: Arc::from(key),
                            existing: Arc::from(existing),
                        });
                    }
                    flags.push(self.kind.flags(value));
                    (Some(group.as_str()), Some(value.as_slice()))
                }
                LocalWrite::Delete { .. } | LocalWrite::DeleteIf { .. } => {
                    if live_group.is_none() {
                        return Err(StoreError::NotFound(Arc::from(key)));
                    }
                    if let LocalWrite::DeleteIf { version: seen, .. } = op
                        && before.as_ref().map(|b| b.version) != Some(*seen)
                    {
                        return Err(StoreError::Changed(Arc::from(key)));
                    }
                    flags.push(crate::Flags::default());
                    (None, None)
                }
            };
            // A local write must win under the kind's rule, or every other node would keep
            // what this one replaced (and its echo would look like a copy's).
            let new = Candidate { version, value };
            if let Some(before) = before
                && !self.kind.wins(&new, &before)
            {
                return Err(StoreError::Stale(Arc::from(key)));
            }
            local.insert(
                key,
                After {
                    live_group: group,
                    version,
                    value,
                },
            );
        }
        Ok(flags)
    }

    fn stage_remote(
        &mut self,
        g: &mut Group<'_>,
        batch: &RemoteBatch,
    ) -> Result<ApplyReport, rusqlite::Error> {
        let mut report = ApplyReport {
            records: Vec::with_capacity(batch.records.len()),
            covered: Vec::with_capacity(batch.covered.len()),
        };
        for record in &batch.records {
            report.records.push(self.stage_record(g, record)?);
        }
        // A record refused against what is held may depend on one later in the batch (a
        // peer sends newest first: a bridge's summaries before its heartbeat, its heartbeat
        // before its certificate): again, while a pass takes one more, at most
        // MAX_DEPENDENCY_PASSES times (each pass only retries what is still unmet).
        for _ in 0..MAX_DEPENDENCY_PASSES {
            let mut took = false;
            for (record, outcome) in batch.records.iter().zip(report.records.iter_mut()) {
                if matches!(outcome, ApplyOutcome::Refused(Refusal::Unmet(_))) {
                    *outcome = self.stage_record(g, record)?;
                    took |= !matches!(outcome, ApplyOutcome::Refused(_));
                }
            }
            if !took {
                break;
            }
        }
        for (record, outcome) in batch.records.iter().zip(report.records.iter()) {
            if let ApplyOutcome::Refused(why) = outcome {
                g.staged.refusals.push((record.version.origin, why.clone()));
            }
        }
        for &(origin, range) in &batch.covered {
            let outcome = self.stage_covered(g, origin, range);
            if let ApplyOutcome::Refused(why) = &outcome {
                g.staged.refusals.push((origin, why.clone()));
            }
            report.covered.push(outcome);
        }
        Ok(report)
    }

    /// Why a record from a peer is refused on its own merits (its timestamp, size, the
    /// kind's checks, and what the kind requires held), if it is.
    fn refusal_of(&self, g: &Group<'_>, record: &Record) -> Option<Refusal> {
        let v = record.version;
        let ahead_ms = v.hlc.physical_ms().saturating_sub(g.now_ms);
        if ahead_ms > MAX_CLOCK_AHEAD_MS {
            return Some(Refusal::ClockAhead { ahead_ms });
        }
        if record
            .value
            .as_ref()
            .is_some_and(|v| v.len() > MAX_VALUE_LEN)
        {
            return Some(Refusal::ValueTooLarge);
        }
        if let Err(why) = self
            .kind
            .check(&record.key, &record.group, record.value.as_deref())
        {
            return Some(Refusal::Invalid(why));
        }
        if let Err(why) =
            self.kind
                .check_held(v.origin, &record.key, record.value.as_deref(), &|key| {
                    g.current(key)
                })
        {
            return Some(Refusal::Unmet(why));
        }
        None
    }

    /// Is a version of our own origin one we never issued? Above our head it certainly is.
    /// At or below it, it is when it would beat what we hold for its key: we hold our own
    /// write of that number or something newer. A key we hold nothing for proves nothing
    /// (its tombstone may have been collected), and neither does a tombstone.
    fn is_foreign_copy(&self, g: &Group<'_>, record: &Record) -> bool {
        if record.version.seq > self.meta.local_seq {
            return true;
        }
        let Some(value) = record.value.as_deref() else {
            return false;
        };
        let held = g.current(&record.key);
        let incoming = Candidate {
            version: record.version,
            value: Some(value),
        };
        held.is_some_and(|h| {
            h.version() != record.version
                && self.kind.wins(
                    &incoming,
                    &Candidate {
                        version: h.version(),
                        value: h.value(),
                    },
                )
        })
    }

    /// Leave this origin for a fresh one: a copy of this data directory (or the original
    /// of a restored backup) issues the same sequence numbers, and one `(origin, seq)` must
    /// never name two records. The records we hold under the old origin are renamed under the
    /// new one at the end of the group (`rename_held`), keeping their timestamps; what the
    /// copy wrote under the old origin up to `seen` is adopted as it arrives (`adopt`).
    /// Returns `false` if this store already moved since it opened (it moves once).
    fn move_to_fresh_origin(&mut self, g: &mut Group<'_>, seen: Hlc) -> bool {
        if self.moved {
            tracing::error!(
                origin = %self.meta.node,
                "another record of this store's own origin that it never wrote: refused; this \
                 store already moved to a fresh origin since it opened and does not move again"
            );
            return false;
        }
        self.moved = true;
        let old = self.meta.node;
        let floor = self.meta.former.keys().copied().fold(old, NodeId::max);
        let new = fresh_origin_above(&mut self.ids, floor, &self.knowledge);
        tracing::error!(
            old = %old,
            new = %new,
            issued = self.meta.local_seq,
            "a record of this store's own origin arrived that this store never wrote: a copy \
             of this data directory runs elsewhere, or it was restored from a backup; moving \
             to a fresh origin"
        );
        // Forget what we knew of the old origin: its copy wrote other records under some of
        // the numbers we issued, and those must be taken when they arrive, not called known.
        // Whatever we already hold merges as usual (and is renamed, below).
        *Self::knowledge_mut(&mut self.knowledge, g, old) = OriginKnowledge::default();
        self.meta.node = new;
        self.meta.local_seq = 0;
        *Self::knowledge_mut(&mut self.knowledge, g, new) = OriginKnowledge::dense(0);
        // Everything the old origin wrote up to now (and up to the bound ahead) is the copy's
        // or this store's own past: adopted whenever it arrives, in this group or later.
        let bound = self
            .clock
            .last()
            .max(seen)
            .max(Hlc::from_physical_ms(g.now_ms + self.max_offset_ms));
        self.meta.former.insert(old, bound);
        while self.meta.former.len() > MAX_FORMER {
            let oldest = self
                .meta
                .former
                .iter()
                .min_by_key(|(_, h)| **h)
                .map(|(o, _)| *o);
            if let Some(o) = oldest {
                self.meta.former.remove(&o);
            }
        }
        g.staged.former = true;
        g.staged.moved_from.get_or_insert(old);
        true
    }

    /// A version under the current origin for `prev`, renamed: the next sequence number,
    /// the same timestamp. The current origin is above the former one (`fresh_origin_above`),
    /// so the rename wins over the version it copies, and over nothing written after it: any
    /// later version has a later timestamp.
    fn rename(&mut self, prev: &Entry) -> Entry {
        self.meta.local_seq += 1;
        self.meta.revision += 1;
        let version = Version {
            hlc: prev.version().hlc,
            origin: self.meta.node,
            seq: self.meta.local_seq,
        };
        debug_assert!(
            version > prev.version(),
            "a rename wins over what it copies"
        );
        let entry = Entry::new(
            prev.key(),
            prev.group(),
            prev.value(),
            prev.flags(),
            version,
            self.meta.revision,
        );
        mark_moves(entry, Some(prev))
    }

    /// A record of a former origin was just applied (`key` holds it): if it was written
    /// before the move (at or below the former origin's bound), rename it under the current
    /// origin, so that it is owned by an agent that runs (nothing names the former origin).
    fn adopt(&mut self, g: &mut Group<'_>, key: &str) -> Result<(), rusqlite::Error> {
        if !self.kind.rename_on_move() {
            return Ok(());
        }
        let Some(prev) = g.current(key) else {
            return Ok(());
        };
        let origin = prev.version().origin;
        if self
            .meta
            .former
            .get(&origin)
            .is_none_or(|bound| prev.version().hlc > *bound)
        {
            return Ok(());
        }
        let entry = self.rename(&prev);
        g.backend.put_record(&entry, Some(&prev))?;
        g.stage_change(&self.meta.down, entry, Some(prev));
        let (node, seq) = (self.meta.node, self.meta.local_seq);
        *Self::knowledge_mut(&mut self.knowledge, g, node) = OriginKnowledge::dense(seq);
        Ok(())
    }

    /// After a move: rename every record held under the old origin (its own writes, and the
    /// copy's applied in this group) under the new one, in the same transaction, keeping
    /// their timestamps. Peers that kept either copy's version of a key then order the two
    /// as their timestamps say: a stale record of this store never wins over a newer write.
    fn rename_held(&mut self, g: &mut Group<'_>, old: NodeId) -> Result<(), rusqlite::Error> {
        if !self.kind.rename_on_move() {
            return Ok(());
        }
        let mut held: Vec<Entry> = g
            .of_origin(old)?
            .into_iter()
            .filter(|e| !g.pending.contains(e.key()))
            .collect();
        held.extend(
            g.pending
                .iter()
                .map(|p| p.0.clone())
                .filter(|e| e.version().origin == old),
        );
        held.sort_by_key(Entry::rev);
        tracing::warn!(records = held.len(), origin = %self.meta.node, "renaming this store's records under its new origin, timestamps kept");
        for prev in held {
            let entry = self.rename(&prev);
            g.backend.put_record(&entry, Some(&prev))?;
            g.stage_change(&self.meta.down, entry, Some(prev));
        }
        let (node, seq) = (self.meta.node, self.meta.local_seq);
        *Self::knowledge_mut(&mut self.knowledge, g, node) = OriginKnowledge::dense(seq);
        Ok(())
    }

    /// Mark `owner` down or up, and stage one feed change per live record it owns: its
    /// hidden view, or (shown again) the record itself, each under a new revision. Nothing is
    /// installed or written but the meta: the index keeps the real state, readers apply the
    /// overlay, and only the feed carries the views.
    fn stage_overlay(
        &mut self,
        g: &mut Group<'_>,
        owner: NodeId,
        down: bool,
    ) -> Result<OverlayChange, StoreError> {
        if owner == self.meta.node {
            return Err(StoreError::OwnNode(owner));
        }
        if down == self.meta.down.contains(&owner) {
            return Ok(OverlayChange::default());
        }
        if down && self.meta.down.len() >= MAX_DOWN_OWNERS {
            return Err(StoreError::TooManyDown {
                limit: MAX_DOWN_OWNERS,
            });
        }
        // Copied on write: the group's saved meta (and readers) keep the set as it was.
        let set = Arc::make_mut(&mut self.meta.down);
        if down {
            set.insert(owner);
        } else {
            set.remove(&owner);
        }
        g.staged.overlay = true;
        // The owner's live records as of this point in the group. A scan of the whole index
        // (liveness changes are rare), or in a lean store the rows by origin.
        let mut held: Vec<Entry> = g
            .of_origin(owner)?
            .into_iter()
            .filter(|e| !g.pending.contains(e.key()))
            .chain(g.pending.iter().map(|p| p.0.clone()))
            .filter(|e| e.is_live() && e.owner() == owner)
            .collect();
        // Revision order, as they were written: the same feed on every run (the index's own
        // iteration order is not).
        held.sort_by_key(Entry::rev);
        for e in &held {
            self.meta.revision += 1;
            let view = if down {
                e.hidden_view(self.meta.revision)
            } else {
                e.with_rev(self.meta.revision)
            };
            g.staged.changes.push(Change {
                entry: view,
                left: LeftGroups::default(),
            });
        }
        if !held.is_empty() {
            self.meta.overlay_rev = self.meta.revision;
        }
        tracing::info!(owner = %owner, down, records = held.len(), "liveness overlay changed");
        Ok(OverlayChange {
            changed: true,
            records: held.len(),
        })
    }

    /// Retire `origin` (or take it back). An origin retires only when its owner is held down
    /// here (the liveness overlay's down set: no live member names it), this store knows
    /// every number it issued up to its head (no gaps), and holds no record of it (every one
    /// superseded, and tombstones of it collected). Its knowledge goes, its head is kept in
    /// the retired set, and it leaves the down set (it hides nothing). From then on what
    /// arrives from it at or below that head is answered `Covered` without a trace; a number
    /// above it (its agent came back and wrote) takes it back. Returns whether it changed.
    fn stage_retire(
        &mut self,
        g: &mut Group<'_>,
        origin: NodeId,
        retire: bool,
    ) -> Result<bool, StoreError> {
        if !retire {
            return Ok(self.unretire(g, origin));
        }
        if origin == self.meta.node {
            return Err(StoreError::OwnNode(origin));
        }
        if self.meta.retired.contains_key(&origin) || !self.meta.down.contains(&origin) {
            return Ok(false);
        }
        let Some(k) = self.knowledge.get(&origin) else {
            return Ok(false);
        };
        if k.gap_count() > 0 {
            return Ok(false);
        }
        if self.meta.retired.len() >= MAX_ORIGINS {
            tracing::warn!(origin = %origin, "not retired: {MAX_ORIGINS} origins are retired already");
            return Ok(false);
        }
        let head = k.head();
        let holds = g.pending.iter().any(|e| e.0.version().origin == origin)
            || g.backend.holds_origin(origin).map_err(StoreError::from)?;
        if holds {
            return Ok(false);
        }
        g.saved
            .knowledge
            .entry(origin)
            .or_insert_with(|| self.knowledge.get(&origin).cloned());
        self.knowledge.remove(&origin);
        g.staged.forgotten.push(origin);
        Arc::make_mut(&mut self.meta.retired).insert(origin, head);
        Arc::make_mut(&mut self.meta.down).remove(&origin);
        g.staged.overlay = true;
        g.staged.retired = true;
        tracing::info!(origin = %origin, head, "origin retired: long gone and fully covered");
        Ok(true)
    }

    /// Take a retired origin back: it is known again up to the head it retired at. Returns
    /// whether it was retired.
    fn unretire(&mut self, g: &mut Group<'_>, origin: NodeId) -> bool {
        let Some(head) = Arc::make_mut(&mut self.meta.retired).remove(&origin) else {
            return false;
        };
        g.staged.retired = true;
        g.staged.forgotten.retain(|o| *o != origin);
        *Self::knowledge_mut(&mut self.knowledge, g, origin) = OriginKnowledge::dense(head);
        tracing::info!(origin = %origin, head, "a retired origin is back");
        true
    }

    /// Collect tombstones: each goes (its row and its index entry) if it is still its key's
    /// state. Its number stays known, so anti-entropy answers it as covered from then on, and
    /// an older version of its key whose number is known is still refused. No revision is
    /// taken and nothing is published: the key was already gone for readers.
    fn stage_collect(
        &mut self,
        g: &mut Group<'_>,
        tombstones: &[Entry],
    ) -> Result<usize, rusqlite::Error> {
        let mut collected = 0;
        for t in tombstones {
            let Some(current) = g.current(t.key()) else {
                continue;
            };
            if current.is_live() || current.version() != t.version() {
                continue;
            }
            if g.pending.contains(t.key()) {
                continue; // written earlier in this group: not installed yet, not ours to drop
            }
            g.backend.delete_record(&current)?;
            self.meta.collected_rev = self.meta.collected_rev.max(current.rev());
            g.staged.removals.push(current);
            collected += 1;
        }
        Ok(collected)
    }

    fn stage_record(
        &mut self,
        g: &mut Group<'_>,
        record: &Record,
    ) -> Result<ApplyOutcome, rusqlite::Error> {
        use ApplyOutcome::{Applied, Covered, Refused};
        let v = record.version;
        if record.key.len() > MAX_KEY_LEN || record.group.len() > MAX_KEY_LEN {
            return Ok(Refused(Refusal::KeyTooLong));
        }
        let Some(range) = SeqRange::single(v.seq) else {
            return Ok(Refused(Refusal::BadSeq));
        };
        match self.meta.retired.get(&v.origin) {
            Some(&head) if v.seq <= head => return Ok(Covered), // known and superseded
            Some(_) => {
                self.unretire(g, v.origin); // its agent is back and wrote
            }
            None => {}
        }
        if v.origin == self.meta.node {
            if !self.is_foreign_copy(g, record) {
                return Ok(Covered);
            }
            // Only a record this store would take from a peer is evidence of a copy: a forged
            // one (a bad signature, a value the kind refuses) must not make it move. (The last
            // number is `Store::leave_origin`'s own probe, which is no record; the gossip
            // shell drops it from peers.)
            if v.seq != crate::MAX_SEQ
                && let Some(why) = self.refusal_of(g, record)
            {
                return Ok(Refused(why));
            }
            // Another record under our origin: a copy of this store wrote it. Move, and take
            // it as the other origin's it now is (adopted below, like the rest of that
            // copy's writes before the move).
            let ceiling = Hlc::from_physical_ms(g.now_ms + self.max_offset_ms);
            if !self.move_to_fresh_origin(g, v.hlc.min(ceiling)) || v.seq == crate::MAX_SEQ {
                // Already moved once; or `Store::leave_origin`'s probe, which is no record.
                return Ok(Refused(Refusal::OwnOriginConflict));
            }
        }
        if self
            .knowledge
            .get(&v.origin)
            .is_some_and(|k| k.knows(v.seq))
        {
            return Ok(Covered);
        }
        if let Some(why) = self.refusal_of(g, record) {
            return Ok(Refused(why));
        }
        let flags = record
            .value
            .as_deref()
            .map_or(crate::Flags::default(), |v| self.kind.flags(v));
        if !self.knowledge.contains_key(&v.origin) && self.knowledge.len() >= MAX_ORIGINS {
            return Ok(Refused(Refusal::TooManyOrigins));
        }
        if Self::knowledge_mut(&mut self.knowledge, g, v.origin)
            .learn(range)
            .is_err()
        {
            return Ok(Refused(Refusal::TooManyGaps));
        }
        // Never adopt a timestamp beyond the bound: a peer with a fast clock must not drag
        // this one (and through it everyone's) ahead. The record is applied all the same.
        // (The ceiling's logical part is 0: ticks after it stay within the bound's millisecond.)
        let ceiling = Hlc::from_physical_ms(g.now_ms + self.max_offset_ms);
        self.clock.observe(v.hlc.min(ceiling));
        let prev = g.current(&record.key);
        let incoming = Candidate {
            version: v,
            value: record.value.as_deref(),
        };
        let wins = prev.as_ref().is_none_or(|p| {
            self.kind.wins(
                &incoming,
                &Candidate {
                    version: p.version(),
                    value: p.value(),
                },
            )
        });
        if !wins {
            return Ok(Covered);
        }
        self.meta.revision += 1;
        let entry = Entry::new(
            &record.key,
            &record.group,
            record.value.as_deref(),
            flags,
            v,
            self.meta.revision,
        );
        let entry = mark_moves(entry, prev.as_ref());
        g.backend.put_record(&entry, prev.as_ref())?;
        g.stage_change(&self.meta.down, entry, prev);
        if self.meta.former.contains_key(&v.origin) && g.staged.moved_from != Some(v.origin) {
            self.adopt(g, &record.key)?;
        }
        Ok(Applied)
    }

    fn stage_covered(
        &mut self,
        g: &mut Group<'_>,
        origin: NodeId,
        range: SeqRange,
    ) -> ApplyOutcome {
        if origin == self.meta.node {
            if range.hi() > self.meta.local_seq {
                self.move_to_fresh_origin(g, self.clock.last());
            }
            // Refused either way: the numbers of the old origin above what we issued are the
            // copy's, and they come as its records.
            return if range.hi() > self.meta.local_seq {
                ApplyOutcome::Refused(Refusal::OwnOriginConflict)
            } else {
                ApplyOutcome::Covered
            };
        }
        match self.meta.retired.get(&origin) {
            Some(&head) if range.hi() <= head => return ApplyOutcome::Covered,
            Some(_) => {
                self.unretire(g, origin);
            }
            None => {}
        }
        if !self.knowledge.contains_key(&origin) && self.knowledge.len() >= MAX_ORIGINS {
            return ApplyOutcome::Refused(Refusal::TooManyOrigins);
        }
        match Self::knowledge_mut(&mut self.knowledge, g, origin).learn(range) {
            Ok(()) => ApplyOutcome::Covered,
            Err(TooManyGaps) => ApplyOutcome::Refused(Refusal::TooManyGaps),
        }
    }
}

/// Stage a key's new state: for the index as it is, for the feed as watchers see it under
/// the overlay (a later write of a down owner's record is hidden too).
fn stage_change(
    pending: &mut Pending,
    staged: &mut Staged,
    down: &BTreeSet<NodeId>,
    entry: Entry,
    prev: Option<Entry>,
) {
    let mut left = LeftGroups::default();
    if let Some(p) = prev
        .as_ref()
        .filter(|p| p.is_live() && p.group() != entry.group())
    {
        left.push(p.group(), entry.rev());
    }
    pending.replace(ByKey(entry.clone()));
    staged
        .installs
        .push((entry.clone(), prev.as_ref().map(Entry::rev)));
    staged.changes.push(Change {
        entry: overlay::watch_view(entry, down),
        left,
    });
}

/// Mark a new state as having left other groups when its key was in another group before
/// (or its previous state was so marked): its stored row then lists those groups.
fn mark_moves(entry: Entry, prev: Option<&Entry>) -> Entry {
    if prev.is_some_and(|p| p.moved() || p.group() != entry.group()) {
        entry.with_moved()
    } else {
        entry
    }
}

/// A fresh origin above `old` (so that a record renamed from `old` to it, with the same
/// timestamp, wins over the original) and unknown to this store.
pub(crate) fn fresh_origin_above(ids: &mut IdSource, old: NodeId, known: &Digest) -> NodeId {
    let room = u64::MAX - old.0;
    loop {
        let draw = ids.next().0;
        let id = if room == 0 {
            draw // no origin is above u64::MAX: any fresh one (a rename may then lose a tie)
        } else {
            old.0 + 1 + draw % room
        };
        if id != old.0 && id != 0 && !known.contains_key(&NodeId(id)) {
            return NodeId(id);
        }
    }
}
