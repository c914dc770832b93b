//! The change feed: a bounded log of recent changes, and the current revision.
//!
//! Every committed change gets the next store revision (a counter of this store alone,
//! persisted with the change). The log keeps the most recent changes, coalesced per key
//! where they were rebuilt from SQLite: it holds, for every key changed after `floor`, at
//! least its latest change. Watchers read it by revision; one that falls below `floor` must
//! catch up another way (a scan of the index, or a new snapshot).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::Entry;

/// One committed change: the key's new state (a tombstone for a deletion).
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    pub entry: Entry,
    /// The groups the key had left by this change, each with the revision at which it left:
    /// a scoped reader whose position is below that revision must see the key leave.
    pub left: LeftGroups,
}

/// Groups a key left, and when. Bounded: past [`MAX_LEFT_GROUPS`] the oldest are dropped and
/// `unknown_before` says below which positions a reader cannot tell where the key was.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeftGroups {
    /// A reader at a position below this cannot tell which groups the key left: it must
    /// treat the change as possibly leaving its own. 0: none dropped.
    pub unknown_before: u64,
    /// `(group, revision)`: the key left `group` with the change at `revision`.
    pub groups: Vec<(Arc<str>, u64)>,
}

/// Most groups a change lists as left, newest kept.
pub const MAX_LEFT_GROUPS: usize = 4;

impl LeftGroups {
    /// Unknown for every reader (rows written before moves were recorded).
    pub fn unknown() -> LeftGroups {
        LeftGroups {
            unknown_before: u64::MAX,
            groups: Vec::new(),
        }
    }

    /// Might a reader of `scope` at position `pos` have held the key in `scope`, which it
    /// has since left?
    pub fn may_have_left(&self, scope: &str, pos: u64) -> bool {
        pos < self.unknown_before
            || self
                .groups
                .iter()
                .any(|(g, rev)| &**g == scope && *rev > pos)
    }

    /// Add that the key left `group` at `rev`, keeping the newest within the bound.
    pub fn push(&mut self, group: &str, rev: u64) {
        self.groups.retain(|(g, _)| &**g != group);
        self.groups.push((Arc::from(group), rev));
        if self.groups.len() > MAX_LEFT_GROUPS {
            self.groups.sort_by_key(|(_, r)| std::cmp::Reverse(*r));
            for (_, dropped) in self.groups.drain(MAX_LEFT_GROUPS..) {
                self.unknown_before = self.unknown_before.max(dropped);
            }
        }
    }
}

impl Change {
    pub fn rev(&self) -> u64 {
        self.entry.rev()
    }
}

/// The caller's position is older than the log remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    pub floor: u64,
}

struct Log {
    /// Every change with a revision above `floor` is in `changes`, or was superseded by a
    /// later change of the same key that is.
    floor: u64,
    changes: VecDeque<Change>,
    capacity: usize,
    /// Heap bytes of the records `changes` holds, and their bound.
    bytes: usize,
    max_bytes: usize,
}

pub struct Feed {
    log: RwLock<Log>,
    revision: watch::Sender<u64>,
    /// Set when the writer thread stops: no change will come again.
    closed: AtomicBool,
}

/// At most this many log entries are examined per read, so a watcher of a quiet app never
/// holds the log's read lock for long while the region is busy.
const MAX_SCAN_PER_READ: usize = 8192;

impl Feed {
    pub(crate) fn new(
        capacity: usize,
        max_bytes: usize,
        floor: u64,
        revision: u64,
        recent: Vec<Change>,
    ) -> Feed {
        let capacity = capacity.max(1);
        let mut log = Log {
            floor,
            changes: VecDeque::with_capacity(capacity.min(recent.len() + 1024)),
            capacity,
            bytes: 0,
            max_bytes,
        };
        for change in recent {
            log.push(change);
        }
        Feed {
            log: RwLock::new(log),
            revision: watch::Sender::new(revision),
            closed: AtomicBool::new(false),
        }
    }

    /// Test-only: hold the log's write lock for `d` (blocking the calling thread), as a
    /// deadlock would; the writer (which appends to it) and every reader stop at it meanwhile.
    pub(crate) fn hold_log_for(&self, d: std::time::Duration) {
        let _held = self.log.write();
        std::thread::sleep(d);
    }

    /// The revision of the latest committed change.
    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// The oldest revision a reader may resume after.
    pub fn floor(&self) -> u64 {
        self.log.read().expect("feed lock poisoned").floor
    }

    /// No change will be published again (the store closed).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Mark the feed closed and wake every reader. Writer thread only, as it stops.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.revision.send_modify(|_| {});
    }

    /// A receiver that wakes whenever the revision moves (or the feed closes).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    /// Changes after revision `after` that `keep` selects, oldest first, at most `max`, and
    /// the revision read up to (resume from there next time).
    pub fn read_since(
        &self,
        after: u64,
        max: usize,
        keep: impl Fn(&Change) -> bool,
    ) -> Result<(Vec<Change>, u64), Behind> {
        let log = self.log.read().expect("feed lock poisoned");
        if after < log.floor {
            return Err(Behind { floor: log.floor });
        }
        // Revisions in the log are increasing, so binary search finds the start.
        let start = log.changes.partition_point(|c| c.rev() <= after);
        let mut out = Vec::new();
        let mut upto = after;
        for change in log.changes.iter().skip(start).take(MAX_SCAN_PER_READ) {
            if out.len() >= max {
                break;
            }
            upto = change.rev();
            if keep(change) {
                out.push(change.clone());
            }
        }
        if start + MAX_SCAN_PER_READ >= log.changes.len() && out.len() < max {
            // Read to the end: nothing between the last change and the current revision.
            upto = upto.max(log.changes.back().map_or(after, Change::rev));
        }
        Ok((out, upto))
    }

    /// Append committed changes and wake watchers. Writer thread only.
    pub(crate) fn publish(&self, changes: Vec<Change>) {
        let Some(last) = changes.last().map(Change::rev) else {
            return;
        };
        {
            let mut log = self.log.write().expect("feed lock poisoned");
            for change in changes {
                log.push(change);
            }
        }
        self.revision.send_replace(last);
    }
}

impl Log {
    /// Append, dropping the oldest changes while the log is over its count or byte bound.
    fn push(&mut self, change: Change) {
        debug_assert!(self.changes.back().is_none_or(|c| c.rev() < change.rev()));
        self.bytes += change.entry.heap_bytes();
        self.changes.push_back(change);
        while self.changes.len() > self.capacity
            || (self.bytes > self.max_bytes && self.changes.len() > 1)
        {
            let Some(old) = self.changes.pop_front() else {
                break;
            };
            self.bytes -= old.entry.heap_bytes();
            self.floor = old.rev();
        }
    }
}
