//! Errors of the store. Each says what it means for the store's state.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed outside a group commit (opening, loading, a read); nothing was written.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Opening the data directory failed; nothing was written.
    #[error("data directory {path}: {source}")]
    DataDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the data directory's lock; nothing was opened.
    #[error("data directory {0} is in use by another process")]
    Locked(String),
    /// The database exists but is of a schema version this code can't read (a newer one);
    /// nothing was changed.
    #[error("unsupported store schema version {0}")]
    Schema(i64),
    /// The database holds records of another kind; nothing was changed.
    #[error("the store holds {stored:?} records, not {wanted:?}")]
    WrongKind {
        stored: String,
        wanted: &'static str,
    },
    /// Persisted state that can't be read back; nothing was changed.
    #[error("corrupt store: {0}")]
    Corrupt(String),
    /// A delete named a key that has no live record; nothing was written.
    #[error("no record with key {0:?}")]
    NotFound(Arc<str>),
    /// A key or group is longer than `MAX_KEY_LEN` bytes; nothing was written.
    #[error("key or group of {0} bytes is too long")]
    KeyTooLong(usize),
    /// A value is larger than `MAX_VALUE_LEN`; nothing was written.
    #[error("value of {0} bytes is too large")]
    ValueTooLarge(usize),
    /// The store holds a version of the key that the kind's merge rule ranks above this
    /// write; nothing was written.
    #[error("key {0:?}: a newer version is held")]
    Stale(Arc<str>),
    /// A batch from a peer holds more records and ranges than one group commit takes;
    /// nothing was applied. Split it.
    #[error("a batch of {ops} items exceeds the {limit} one commit takes")]
    BatchTooLarge { ops: usize, limit: usize },
    /// A write would move a live key to another group; nothing was written.
    #[error("key {key:?} belongs to {existing:?}; delete it before reusing it elsewhere")]
    GroupChange { key: Arc<str>, existing: Arc<str> },
    /// One request is larger than its whole queue's byte budget; nothing was written.
    #[error("a request of {bytes} bytes exceeds the write queue's {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// The write queue and its waiting room are full; nothing was written. Retry later.
    #[error("the write queue is full; retry later")]
    Overloaded,
    /// The liveness overlay was asked to hide this store's own node, which is alive as long
    /// as it answers; nothing changed.
    #[error("node {0} is this store's own node: it is never marked down")]
    OwnNode(crate::NodeId),
    /// The liveness overlay already hides `limit` owners; nothing changed.
    #[error("the liveness overlay already hides {limit} owners")]
    TooManyDown { limit: usize },
    /// The disk is full: the group commit this write was part of was rolled back, nothing of
    /// it was applied and no counter moved. Writes succeed again once there is space.
    /// This agent's clock is off its peers' by more than `max_clock_offset` (measured by the
    /// gossip node, [`crate::Store::set_clock_fence`]): local writes are refused, nothing was
    /// written; reads go on.
    #[error(
        "this agent's clock is {offset_ms:+} ms off its peers' (bound {bound_ms} ms): writes are refused until it is within the bound; reads go on"
    )]
    ClockOffset { offset_ms: i64, bound_ms: u64 },
    /// The store's hybrid logical clock is ahead of this host's wall clock by more than the
    /// bound (the wall clock stepped back after timestamps were issued, or the store was
    /// restored on a host whose clock is behind): a local write would be stamped in the
    /// future, so it is refused until the wall clock catches up; nothing was written.
    #[error(
        "this store's clock is {lead_ms} ms ahead of this host's wall clock (bound {bound_ms} ms; did the clock step back?): writes are refused until the wall clock catches up"
    )]
    HlcAhead { lead_ms: u64, bound_ms: u64 },
    /// A conditional deletion ([`crate::LocalWrite::DeleteIf`]) found the key written since
    /// it was read; nothing of the request was written.
    #[error("key {0:?} changed since it was read; nothing was written")]
    Changed(Arc<str>),
    #[error("the disk is full; the write was not applied")]
    DiskFull,
    /// The store hit a fault it cannot recover from (a failed fsync, a writer panic) and
    /// stopped: this write was not applied and none will be. The message says what failed.
    #[error("the store failed: {0}")]
    Failed(Arc<str>),
    /// The store has been closed (the agent is shutting down). The write was not applied.
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// The same error for another waiter of the same commit (SQLite's errors are not `Clone`).
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::DiskFull => StoreError::DiskFull,
            StoreError::Failed(why) => StoreError::Failed(why.clone()),
            StoreError::Closed => StoreError::Closed,
            StoreError::Overloaded => StoreError::Overloaded,
            other => StoreError::Failed(other.to_string().into()),
        }
    }
}
