//! Errors of the store. Each says what it means for the store's state.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed. A failure inside a commit rolls back the whole group: none of its
    /// writes were applied or acknowledged, and the counters were restored.
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
    /// The database exists but is not one this version understands; nothing was changed.
    #[error("unsupported store schema version {0}")]
    Schema(i64),
    /// A delete named a key that has no live record; nothing was written.
    #[error("no record with key {0:?}")]
    NotFound(Arc<str>),
    /// A key or group is longer than `MAX_KEY_LEN` bytes; nothing was written.
    #[error("key or group of {0} bytes is too long")]
    KeyTooLong(usize),
    /// A write would move a live key to another group; nothing was written.
    #[error("key {key:?} belongs to {existing:?}; delete it before reusing it elsewhere")]
    GroupChange { key: Arc<str>, existing: Arc<str> },
    /// The group commit this write was part of failed and was rolled back: the write was not
    /// applied, and no counter moved.
    #[error("commit failed: {0}")]
    Commit(String),
    /// The writer thread has stopped (the store is closing or a fatal error stopped it). The
    /// write was not applied.
    #[error("the store is closed")]
    Closed,
}
