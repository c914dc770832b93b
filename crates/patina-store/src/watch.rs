//! Watch cursors: a snapshot of one group (or all), then every change, with resume tokens.
//!
//! A cursor reads the feed by revision. Its position is a revision of this store; a resume
//! token is that revision plus the store's identity, so a token from another store (or from
//! before the log's floor) is refused with an explicit reset and a new snapshot, never a
//! silent skip. A cursor that falls behind the log (a slow reader) is not disconnected and
//! buffers nothing: it catches up by scanning the index for keys changed since its position,
//! which coalesces what it missed to one change per key.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::feed::Change;
use crate::{Entry, NodeId, State};

/// A position in one store's change history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeToken {
    pub store: NodeId,
    pub rev: u64,
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{}", self.store.0, self.rev)
    }
}

/// The token is not one this code ever produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed resume token (expected the opaque string a Watch response carried)")]
pub struct BadToken;

impl FromStr for ResumeToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (store, rev) = s.split_once('.').ok_or(BadToken)?;
        if store.len() != 16 {
            return Err(BadToken);
        }
        Ok(ResumeToken {
            store: NodeId(u64::from_str_radix(store, 16).map_err(|_| BadToken)?),
            rev: rev.parse().map_err(|_| BadToken)?,
        })
    }
}

/// What a cursor yields next.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// Part of a snapshot. `reset` is set on the first part: drop everything held before.
    Snapshot { reset: bool, entries: Vec<Entry> },
    /// The snapshot is complete.
    SnapshotDone { token: ResumeToken },
    /// Changes in revision order, at most one per key. `token` is where to resume after
    /// them; `None` in the middle of a catch-up, which is only resumable at its end.
    Delta {
        changes: Vec<Change>,
        token: Option<ResumeToken>,
    },
}

pub struct Cursor {
    state: Arc<State>,
    scope: Option<Arc<str>>,
    /// Every change up to this revision has been yielded (or queued).
    pos: u64,
    /// Keys yielded by a snapshot or scan at a revision above `pos`: older log entries for
    /// them are stale and are skipped.
    seen: HashMap<String, u64>,
    rx: watch::Receiver<u64>,
    queue: VecDeque<WatchItem>,
    max_batch: usize,
}

impl Cursor {
    pub(crate) fn new(
        state: Arc<State>,
        scope: Option<Arc<str>>,
        resume: Option<ResumeToken>,
        max_batch: usize,
    ) -> Cursor {
        let rx = state.feed.subscribe();
        let mut cursor = Cursor {
            state,
            scope,
            pos: 0,
            seen: HashMap::new(),
            rx,
            queue: VecDeque::new(),
            max_batch: max_batch.max(1),
        };
        match resume {
            Some(t) if cursor.can_resume(t) => cursor.pos = t.rev,
            _ => cursor.start_snapshot(),
        }
        cursor
    }

    fn can_resume(&self, t: ResumeToken) -> bool {
        t.store == self.state.node
            && t.rev <= self.state.feed.revision()
            && t.rev >= self.state.feed.floor()
    }

    fn token(&self, rev: u64) -> ResumeToken {
        ResumeToken {
            store: self.state.node,
            rev,
        }
    }

    /// Remember entries read from the index at a revision above `r0`.
    fn note_seen<'a>(&mut self, r0: u64, entries: impl Iterator<Item = &'a Entry>) {
        for e in entries.filter(|e| e.rev() > r0) {
            self.seen.insert(e.key().to_owned(), e.rev());
        }
    }

    fn start_snapshot(&mut self) {
        // Read the revision first: every change after it will also come from the log.
        let r0 = self.state.feed.revision();
        let entries = self.state.index.snapshot(self.scope.as_deref());
        self.seen.clear();
        self.note_seen(r0, entries.iter());
        let mut reset = true;
        let mut entries = entries.into_iter().peekable();
        loop {
            let chunk: Vec<Entry> = entries.by_ref().take(self.max_batch).collect();
            if chunk.is_empty() && !reset {
                break;
            }
            self.queue.push_back(WatchItem::Snapshot {
                reset,
                entries: chunk,
            });
            reset = false;
            if entries.peek().is_none() {
                break;
            }
        }
        self.queue.push_back(WatchItem::SnapshotDone {
            token: self.token(r0),
        });
        self.pos = r0;
    }

    /// Catch-up for a cursor the log has left behind. Unscoped: the current state of every
    /// key changed since its position (coalesced, no reset). Scoped: a new snapshot. A key changed again after the scan still ends up
    /// right: that change has a revision above `r0` and comes from the log (or is skipped
    /// there as already seen).
    fn catch_up(&mut self) {
        if self.scope.is_some() {
            // The index only knows where each key is now, not that it left this group while
            // the cursor lagged: a scoped cursor starts over with a (small) new snapshot.
            self.start_snapshot();
            return;
        }
        let r0 = self.state.feed.revision();
        let changed = self
            .state
            .index
            .changed_since(self.pos, self.scope.as_deref());
        self.note_seen(r0, changed.iter());
        let total = changed.len();
        let mut changes = changed.into_iter().map(|entry| Change {
            entry,
            moved_from: None,
            prior_unknown: false,
        });
        let mut sent = 0;
        while sent < total {
            let chunk: Vec<Change> = changes.by_ref().take(self.max_batch).collect();
            sent += chunk.len();
            let token = (sent == total).then(|| self.token(r0));
            self.queue.push_back(WatchItem::Delta {
                changes: chunk,
                token,
            });
        }
        self.pos = r0;
    }

    fn in_scope(&self, change: &Change) -> bool {
        match &self.scope {
            None => true,
            Some(g) => {
                change.entry.group() == &**g
                    || change.moved_from.as_ref() == Some(g)
                    || change.prior_unknown
            }
        }
    }

    /// The next item; waits for a change when there is none. `None` once the store closed.
    /// Cancel-safe: dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<WatchItem> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Some(item);
            }
            let read = self
                .state
                .feed
                .read_since(self.pos, self.max_batch, |c| self.in_scope(c));
            match read {
                Ok((changes, upto)) => {
                    self.pos = upto;
                    let changes: Vec<Change> = changes
                        .into_iter()
                        .filter(|c| self.seen.get(c.entry.key()).is_none_or(|&s| c.rev() > s))
                        .map(|c| self.scoped(c))
                        .collect();
                    let changes = coalesce(changes);
                    self.seen.retain(|_, &mut s| s > upto);
                    if !changes.is_empty() {
                        return Some(WatchItem::Delta {
                            changes,
                            token: Some(self.token(upto)),
                        });
                    }
                    let current = *self.rx.borrow_and_update();
                    if current > self.pos {
                        continue;
                    }
                    if self.state.feed.is_closed() {
                        return None;
                    }
                    if self.rx.changed().await.is_err() {
                        return None;
                    }
                }
                Err(_behind) => self.catch_up(),
            }
        }
    }

    /// A change that moved a key out of this cursor's group is, to this cursor, a deletion.
    fn scoped(&self, change: Change) -> Change {
        match &self.scope {
            Some(scope) if change.entry.group() != &**scope => {
                let e = &change.entry;
                Change {
                    entry: Entry::new(e.key(), scope, None, e.version(), e.rev()),
                    moved_from: None,
                    prior_unknown: false,
                }
            }
            _ => change,
        }
    }
}

/// Keep only the latest change of each key, in revision order: a reader applying the batch
/// ends in the same state, with less to send.
fn coalesce(changes: Vec<Change>) -> Vec<Change> {
    if changes.len() < 2 {
        return changes;
    }
    let last: HashMap<&str, u64> = changes.iter().map(|c| (c.entry.key(), c.rev())).collect();
    let keep: Vec<bool> = changes
        .iter()
        .map(|c| last.get(c.entry.key()) == Some(&c.rev()))
        .collect();
    changes
        .into_iter()
        .zip(keep)
        .filter_map(|(c, k)| k.then_some(c))
        .collect()
}
