//! patina-store: the durable record store and the in-memory serving index.
//!
//! Records are small and independent: a key, a group (the app), an opaque encoded value, a
//! routable flag, and a [`Version`]. SQLite (WAL, `synchronous=FULL`) is written by one
//! dedicated thread with group commit; nothing is acknowledged, served or published before
//! it is durable. The serving index ([`dashmap`]) is rebuilt from SQLite at start, and the
//! change feed gives watchers every change by store revision.
//!
//! Architecture invariant: only this crate opens SQLite, and only its writer thread writes
//! it. Nothing here knows what a machine is.

#![forbid(unsafe_code)]

mod entry;
mod error;
mod feed;
mod index;
mod sqlite;
mod version;
mod watch;
mod writer;

#[cfg(test)]
mod tests;

use std::fs::File;
use std::num::NonZeroUsize;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

pub use entry::{Entry, MAX_KEY_LEN};
pub use error::StoreError;
pub use feed::{Behind, Change, Feed};
pub use index::Filter;
pub use version::{Hlc, HlcClock, NodeId, Version, supersedes};
pub use watch::{BadToken, Cursor, ResumeToken, WatchItem};
pub use writer::LocalWrite;

use index::Index;
use writer::{Request, Writer};

/// A record as it travels between nodes: `body` is `None` for a tombstone.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub key: Arc<str>,
    pub group: Arc<str>,
    pub body: Option<(Arc<[u8]>, bool)>,
    pub version: Version,
}

/// Tunables of a store. Every one is bounded: see the field docs for why each default.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Requests that may wait for the writer thread. Past this, writers wait (backpressure)
    /// instead of growing memory. 4096 covers many thousands of concurrent clients' bursts.
    pub write_queue: NonZeroUsize,
    /// Most records in one group commit. Bounds the transaction (and the latency of the
    /// writes at its end); 4096 small records commit in a few milliseconds.
    pub max_batch_ops: NonZeroUsize,
    /// Changes the feed keeps for watchers to resume from. 65536 changes take a few MiB.
    pub watch_log_capacity: NonZeroUsize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            write_queue: NonZeroUsize::new(4096).expect("nonzero"),
            max_batch_ops: NonZeroUsize::new(4096).expect("nonzero"),
            watch_log_capacity: NonZeroUsize::new(65536).expect("nonzero"),
        }
    }
}

/// What readers share with the writer thread.
pub(crate) struct State {
    pub node: NodeId,
    pub index: Index,
    pub feed: Feed,
}

/// Counts, for status pages and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    pub node: NodeId,
    /// Keys known, tombstones included.
    pub keys: usize,
    /// Live records.
    pub live: usize,
    pub groups: usize,
    pub revision: u64,
}

/// A handle on an open store. Cheap to clone; the writer thread stops when [`Store::close`]
/// is called or every handle is dropped.
#[derive(Clone)]
pub struct Store {
    state: Arc<State>,
    tx: mpsc::Sender<Request>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    _lock: Arc<File>,
}

/// Name of the database file inside the data directory.
pub const DB_FILE: &str = "patina.db";
const LOCK_FILE: &str = "LOCK";

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
        let conn = sqlite::open(&dir.join(DB_FILE))?;
        let meta = sqlite::load_meta(&conn)?;
        let index = Index::default();
        let stale = sqlite::load_index(&conn, &index)?;
        if !stale.is_empty() {
            tracing::warn!(rows = stale.len(), "deleting superseded rows found at load");
            sqlite::delete_revs(&conn, &stale)?;
        }
        let (floor, recent) = sqlite::recent_changes(&conn, &index, opts.watch_log_capacity.get())?;
        let feed = Feed::new(opts.watch_log_capacity.get(), floor, meta.revision, recent);
        let state = Arc::new(State {
            node: meta.node,
            index,
            feed,
        });
        let (tx, rx) = mpsc::channel(opts.write_queue.get());
        let writer = Writer {
            conn,
            state: state.clone(),
            meta,
            clock: HlcClock::starting_after(meta.hlc),
            max_batch_ops: opts.max_batch_ops.get(),
        };
        let handle = std::thread::Builder::new()
            .name("patina-store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(io)?;
        tracing::info!(
            node = %meta.node,
            records = state.index.len_live(),
            revision = meta.revision,
            local_seq = meta.local_seq,
            "store opened"
        );
        Ok(Store {
            state,
            tx,
            writer: Arc::new(Mutex::new(Some(handle))),
            _lock: Arc::new(lock),
        })
    }

    /// This store's identity: the origin of every local write.
    pub fn node(&self) -> NodeId {
        self.state.node
    }

    /// Apply local writes, all or nothing, and return once they are durable.
    pub async fn write(&self, ops: Vec<LocalWrite>) -> Result<Vec<Version>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Local { ops, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Merge records from elsewhere; returns how many superseded what was held.
    pub async fn apply(&self, records: Vec<Record>) -> Result<usize, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Remote { records, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// A live record, from memory.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.state.index.get(key)
    }

    /// A group's live records, from memory, in no particular order.
    pub fn list(&self, group: &str, filter: Filter) -> Vec<Entry> {
        self.state.index.list(group, filter)
    }

    /// A key's current record, tombstone included, as it would travel to another node.
    pub fn record(&self, key: &str) -> Option<Record> {
        let e = self.state.index.state(key)?;
        Some(Record {
            key: Arc::from(e.key()),
            group: Arc::from(e.group()),
            body: e.value().map(|v| (Arc::from(v), e.routable())),
            version: e.version(),
        })
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

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            node: self.state.node,
            keys: self.state.index.len_keys(),
            live: self.state.index.len_live(),
            groups: self.state.index.len_groups(),
            revision: self.state.feed.revision(),
        }
    }

    /// Finish the writes already queued, stop the writer thread and wait for it. Writes sent
    /// after this fail with [`StoreError::Closed`]. Blocking: call from `spawn_blocking`.
    pub fn close(&self) {
        // A full queue still takes the shutdown in turn; a closed one means it stopped.
        let _ = self.tx.blocking_send(Request::Shutdown);
        let handle = self.writer.lock().expect("writer handle lock").take();
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("store writer thread panicked");
        }
    }
}
