//! Watch cursors: a snapshot of one group (or all), then every change, with resume tokens.
//!
//! A cursor reads the feed by revision. Its position is a revision of this store; a resume
//! token is that revision plus the store's identity and a hash of the cursor's scope, so a
//! token from another store, another scope, or from before the log's floor is refused with
//! an explicit reset and a new snapshot, never a silent skip.
//!
//! Memory per cursor is bounded by one message, whatever the store's size: snapshots and
//! catch-ups are read in chunks as the client takes them, never built whole. A group's
//! snapshot walks the index's ordered group from the last key sent; a whole-store snapshot,
//! and the catch-up of a whole-store cursor that fell behind the log, walk the stored rows by
//! revision. Either way a chunk holds only records at or below the revision the walk started
//! from (`r0`); anything newer comes from the log afterwards.
//!
//! The liveness overlay applies at read time: snapshots skip the records of down owners, and
//! a catch-up sends them as hidden views. The overlay's own changes are in the log only (they
//! are not rows), so a cursor that fell behind the log from below the latest of them gets a
//! reset, never a catch-up that would silently miss them.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::feed::{Change, LeftGroups};
use crate::overlay;
use crate::{Entry, NodeId, Rows, State, StoreError};

/// A position in one store's change history, for one scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumeToken {
    pub store: NodeId,
    pub rev: u64,
    /// A hash of the scope the token was issued for; `None` in tokens of the first format,
    /// which are honoured by a reset.
    pub scope: Option<u32>,
    /// Set in a token whose revision was not yet durable when it was issued (changes the
    /// store applied in memory while its disk was full): which opening of the store issued
    /// it. Another opening cannot honour it (those revisions may have been lost and issued
    /// again for other changes), so it gets a reset, never a silent skip.
    pub incarnation: Option<u64>,
}

/// A stored row a watch's scan read: its key, revision, the groups it had left, and (in a
/// lean store) its record.
type ScannedRow = (String, u64, LeftGroups, Option<Entry>);

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}.{}", self.store.0, self.rev)?;
        if let Some(scope) = self.scope {
            write!(f, ".{scope:08x}")?;
            if let Some(inc) = self.incarnation {
                write!(f, ".{inc:016x}")?;
            }
        }
        Ok(())
    }
}

/// The token is not one this code ever produced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed resume token (expected the opaque string a Watch response carried)")]
pub struct BadToken;

impl FromStr for ResumeToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split('.');
        let (Some(store), Some(rev)) = (parts.next(), parts.next()) else {
            return Err(BadToken);
        };
        let hex = |h: &str, len: usize| -> Result<u64, BadToken> {
            if h.len() != len || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(BadToken);
            }
            u64::from_str_radix(h, 16).map_err(|_| BadToken)
        };
        let scope = match parts.next() {
            None => None,
            Some(h) => Some(hex(h, 8)? as u32),
        };
        let incarnation = match parts.next() {
            None => None,
            Some(h) => Some(hex(h, 16)?),
        };
        if parts.next().is_some()
            || rev.is_empty()
            || rev.len() > 20
            || !rev.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(BadToken);
        }
        Ok(ResumeToken {
            store: NodeId(hex(store, 16)?),
            rev: rev.parse().map_err(|_| BadToken)?,
            scope,
            incarnation,
        })
    }
}

/// FNV-1a of a scope ("" for the whole store): tells a token of one scope from another's.
pub(crate) fn scope_hash(scope: Option<&str>) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in scope.unwrap_or("").bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// What a cursor yields next.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchItem {
    /// Part of a snapshot. `reset` is set on the first part: drop everything held before.
    Snapshot { reset: bool, entries: Vec<Entry> },
    /// The snapshot is complete.
    SnapshotDone { token: ResumeToken },
    /// Changes in revision order, at most one per key, and where to resume after them. An
    /// empty delta is a progress notification: nothing in scope changed up to `token`.
    Delta {
        changes: Vec<Change>,
        token: ResumeToken,
    },
}

/// Where a cursor is.
#[derive(Debug)]
enum Phase {
    /// Sending a group's snapshot from the index, in key order: keys after `after` whose
    /// state is at or below `r0`.
    GroupSnapshot {
        r0: u64,
        after: Option<String>,
        first: bool,
    },
    /// Walking the stored rows with revisions in `after+1..=r0`, in revision order: as a
    /// snapshot (live records, `reset` first) or as a catch-up from position `since` (every
    /// change in scope, tombstones too, and keys that left the scope after `since`; each
    /// chunk resumable).
    Scan {
        r0: u64,
        after: u64,
        snapshot: bool,
        first: bool,
        since: u64,
    },
    /// Following the log from `pos`.
    Live,
}

pub struct Cursor {
    state: Arc<State>,
    scope: Option<Arc<str>>,
    scope_hash: u32,
    /// Every change up to this revision has been yielded.
    pos: u64,
    /// The revision of the last token yielded: a quiet cursor sends a progress token before
    /// it falls into the older half of the log.
    last_token: u64,
    phase: Phase,
    rx: watch::Receiver<u64>,
    max_batch: usize,
    /// Once live and idle this long, yield an empty delta anyway (see [`Cursor::with_heartbeat`]).
    heartbeat: Option<std::time::Duration>,
    /// When the cursor last yielded: changes outside its scope do not put a heartbeat off.
    last_yield: tokio::time::Instant,
}

impl Cursor {
    /// Once the cursor is live, yield an empty delta (a heartbeat, with a token) whenever
    /// nothing in scope changed for `every`: its reader learns that its view is current as
    /// of now (`Store::view_hlc`), not only as of the last change.
    pub fn with_heartbeat(mut self, every: std::time::Duration) -> Cursor {
        self.heartbeat = Some(every);
        self
    }

    pub(crate) fn new(
        state: Arc<State>,
        scope: Option<Arc<str>>,
        resume: Option<ResumeToken>,
        max_batch: usize,
    ) -> Cursor {
        let rx = state.feed.subscribe();
        let hash = scope_hash(scope.as_deref());
        let mut cursor = Cursor {
            state,
            scope,
            scope_hash: hash,
            pos: 0,
            last_token: 0,
            phase: Phase::Live,
            rx,
            max_batch: max_batch.max(1),
            heartbeat: None,
            last_yield: tokio::time::Instant::now(),
        };
        match resume {
            Some(t) if cursor.can_resume(t) => {
                cursor.pos = t.rev;
                cursor.last_token = t.rev;
            }
            _ => cursor.start_snapshot(),
        }
        cursor
    }

    /// Can this cursor go on from `t` without a reset? The token must be of this store and
    /// scope and not from the future, and one issued above the durable revision must be of
    /// this opening of the store, or of the one that made the last commit before it and no
    /// higher than the revision that commit reached (a later commit persisted it). A token older than the log catches up by walking the
    /// stored rows (each row lists the groups its key left): exact as long as no tombstone
    /// was collected after `t`; one below a collected tombstone gets a snapshot instead (see
    /// `catch_up`).
    fn can_resume(&self, t: ResumeToken) -> bool {
        t.store == self.state.node()
            && t.scope == Some(self.scope_hash)
            && t.rev <= self.state.feed.revision()
            && t.incarnation.is_none_or(|i| {
                let (previous, reached) = self.state.previous;
                i == self.state.incarnation || (i == previous && t.rev <= reached)
            })
    }

    fn token(&mut self, rev: u64) -> ResumeToken {
        self.last_token = rev;
        ResumeToken {
            store: self.state.node(),
            rev,
            scope: Some(self.scope_hash),
            incarnation: (rev > self.state.durable_rev()).then_some(self.state.incarnation),
        }
    }

    fn start_snapshot(&mut self) {
        // Read the revision first: every change after it will also come from the log.
        let r0 = self.state.feed.revision();
        let lean = self.state.index.lean.is_some();
        self.phase = match self.scope {
            Some(_) if !lean => Phase::GroupSnapshot {
                r0,
                after: None,
                first: true,
            },
            _ => Phase::Scan {
                r0,
                after: 0,
                snapshot: true,
                first: true,
                since: 0,
            },
        };
    }

    /// Catch-up for a cursor the log has left behind: the current state of every key changed
    /// since its position, walking the stored rows by revision (coalesced, no reset). A
    /// scoped cursor takes the keys of its group, and, as deletions, those whose rows say
    /// they left the group after its position. A position below the overlay's latest change
    /// gets a new snapshot instead: the rows cannot tell which records it hid or showed. So
    /// does a position below a collected tombstone: its row, the deletion, is gone.
    fn catch_up(&mut self) {
        let overlay_rev = self.state.overlay_rev().max(self.state.collected_rev());
        if self.pos < overlay_rev {
            tracing::debug!(
                pos = self.pos,
                overlay_rev,
                "a watch behind the log and the liveness overlay restarts with a snapshot"
            );
            self.start_snapshot();
            return;
        }
        self.phase = Phase::Scan {
            r0: self.state.feed.revision(),
            after: self.pos,
            snapshot: false,
            first: false,
            since: self.pos,
        };
    }

    fn in_scope(&self, change: &Change) -> bool {
        match &self.scope {
            None => true,
            Some(g) => change.entry.group() == &**g || change.left.may_have_left(g, self.pos),
        }
    }

    /// Keys of stored rows with revisions in `after+1..=upto`, with the groups they had left,
    /// at most `limit`, lowest first; in a lean store, with the records themselves (its index
    /// holds none).
    async fn keys_by_rev(&self, after: u64, upto: u64) -> Result<Vec<ScannedRow>, StoreError> {
        let limit = self.max_batch;
        match &self.state.rows {
            Rows::Sqlite(_) => {
                let state = self.state.clone();
                tokio::task::spawn_blocking(move || match &state.rows {
                    Rows::Sqlite(readers) => readers.with(|c| match &state.index.lean_kind {
                        Some(kind) => {
                            Ok(crate::sqlite::entries_by_rev(c, after, upto, limit, kind)?
                                .into_iter()
                                .map(|(e, left)| (e.key().to_owned(), e.rev(), left, Some(e)))
                                .collect())
                        }
                        None => Ok(crate::sqlite::keys_by_rev(c, after, upto, limit)?
                            .into_iter()
                            .map(|(k, rev, left)| (k, rev, left, None))
                            .collect()),
                    }),
                    Rows::Memory(_) => unreachable!("matched above"),
                })
                .await
                .map_err(|e| StoreError::Failed(format!("watch scan: {e}").into()))?
            }
            Rows::Memory(rows) => Ok(rows
                .lock()
                .expect("rows lock")
                .keys_by_rev(after, upto, limit)
                .into_iter()
                .map(|(k, rev, left)| (k, rev, left, None))
                .collect()),
        }
    }

    /// The next item; waits for a change when there is none. `None` once the store closed
    /// (or a read of the stored rows failed, which only a failing disk does). Cancel-safe:
    /// dropping the future loses nothing.
    pub async fn next(&mut self) -> Option<WatchItem> {
        let item = self.next_item().await;
        self.last_yield = tokio::time::Instant::now();
        item
    }

    async fn next_item(&mut self) -> Option<WatchItem> {
        loop {
            if self.state.feed.is_closed() && !matches!(self.phase, Phase::Live) {
                return None;
            }
            match &mut self.phase {
                Phase::GroupSnapshot { r0, after, first } => {
                    let (r0, was_first) = (*r0, *first);
                    let scope = self.scope.clone().expect("a group snapshot has a scope");
                    let raw = self.state.index.list(
                        &scope,
                        crate::Filter::All,
                        after.as_deref(),
                        self.max_batch,
                    );
                    let Some(last) = raw.last() else {
                        if was_first {
                            *first = false;
                            return Some(WatchItem::Snapshot {
                                reset: true,
                                entries: Vec::new(),
                            });
                        }
                        self.phase = Phase::Live;
                        self.pos = r0;
                        return Some(WatchItem::SnapshotDone {
                            token: self.token(r0),
                        });
                    };
                    *after = Some(last.key().to_owned());
                    *first = false;
                    let down = self.state.down();
                    let entries: Vec<Entry> = raw
                        .into_iter()
                        .filter(|e| e.rev() <= r0 && !overlay::is_hidden_by(e, &down))
                        .collect();
                    if entries.is_empty() && !was_first {
                        continue;
                    }
                    return Some(WatchItem::Snapshot {
                        reset: was_first,
                        entries,
                    });
                }
                Phase::Scan {
                    r0,
                    after,
                    snapshot,
                    first,
                    since,
                } => {
                    let (r0, from, snapshot, was_first, since) =
                        (*r0, *after, *snapshot, *first, *since);
                    let keys = match self.keys_by_rev(from, r0).await {
                        Ok(keys) => keys,
                        Err(e) => {
                            tracing::error!(error = %e, "a watch could not read the store");
                            return None;
                        }
                    };
                    let Some(&(_, last, _, _)) = keys.last() else {
                        if snapshot && was_first {
                            self.phase = Phase::Scan {
                                r0,
                                after: from,
                                snapshot,
                                first: false,
                                since,
                            };
                            return Some(WatchItem::Snapshot {
                                reset: true,
                                entries: Vec::new(),
                            });
                        }
                        self.phase = Phase::Live;
                        self.pos = r0;
                        if snapshot {
                            return Some(WatchItem::SnapshotDone {
                                token: self.token(r0),
                            });
                        }
                        continue;
                    };
                    self.phase = Phase::Scan {
                        r0,
                        after: last,
                        snapshot,
                        first: false,
                        since,
                    };
                    // A row whose key has moved on since is skipped: its newer state comes
                    // later in this walk, or from the log.
                    let down = self.state.down();
                    // (A lean store's rows come with their records: a row still stored is
                    // its key's state as of that read.)
                    let current = keys.iter().filter_map(|(key, rev, left, read)| {
                        let entry = match read {
                            Some(e) => e.clone(),
                            None => self.state.index.latest(key).filter(|e| e.rev() == *rev)?,
                        };
                        Some((entry, left))
                    });
                    if snapshot {
                        // Scoped snapshots walk the rows only in a lean store, which has no
                        // group index: the scope filters them.
                        let scope = self.scope.clone();
                        let entries: Vec<Entry> = current
                            .map(|(e, _)| e)
                            .filter(|e| e.is_live() && !overlay::is_hidden_by(e, &down))
                            .filter(|e| scope.as_deref().is_none_or(|g| e.group() == g))
                            .collect();
                        if entries.is_empty() && !was_first {
                            continue;
                        }
                        return Some(WatchItem::Snapshot {
                            reset: was_first,
                            entries,
                        });
                    }
                    let scope = self.scope.clone();
                    let changes: Vec<Change> = current
                        .filter(|(e, left)| match &scope {
                            None => true,
                            Some(g) => e.group() == &**g || left.may_have_left(g, since),
                        })
                        .map(|(entry, _)| {
                            self.scoped(Change {
                                entry: overlay::watch_view(entry, &down),
                                left: LeftGroups::default(),
                            })
                        })
                        .collect();
                    // A catch-up starts only at or above every collected revision (see
                    // `catch_up`): one above `since` now means rows it had still to read (or
                    // just read) may be gone, and their deletions would be lost.
                    let now_collected = self.state.collected_rev();
                    if now_collected > since {
                        tracing::debug!(
                            since,
                            collected = now_collected,
                            "tombstones collected during a watch's catch-up: it restarts with a snapshot"
                        );
                        self.start_snapshot();
                        continue;
                    }
                    self.pos = last;
                    let token = self.token(last);
                    if changes.is_empty() {
                        continue;
                    }
                    return Some(WatchItem::Delta { changes, token });
                }
                Phase::Live => {}
            }
            let read = self
                .state
                .feed
                .read_since(self.pos, self.max_batch, |c| self.in_scope(c));
            match read {
                Ok((changes, upto)) => {
                    self.pos = upto;
                    let changes: Vec<Change> =
                        changes.into_iter().map(|c| self.scoped(c)).collect();
                    let changes = coalesce(changes);
                    if !changes.is_empty() || self.needs_progress(upto) {
                        return Some(WatchItem::Delta {
                            changes,
                            token: self.token(upto),
                        });
                    }
                    let current = *self.rx.borrow_and_update();
                    if current > self.pos {
                        continue;
                    }
                    if self.state.feed.is_closed() {
                        return None;
                    }
                    let changed = match self.heartbeat {
                        None => self.rx.changed().await,
                        Some(every) => match tokio::time::timeout_at(
                            self.last_yield + every,
                            self.rx.changed(),
                        )
                        .await
                        {
                            Ok(changed) => changed,
                            Err(_idle) => {
                                let token = self.token(self.pos);
                                return Some(WatchItem::Delta {
                                    changes: Vec::new(),
                                    token,
                                });
                            }
                        },
                    };
                    if changed.is_err() {
                        return None;
                    }
                }
                Err(_behind) => self.catch_up(),
            }
        }
    }

    /// Has the last token this cursor gave out fallen into the older half of the log? Then
    /// a progress notification keeps a quiet cursor resumable.
    fn needs_progress(&self, upto: u64) -> bool {
        if upto <= self.last_token {
            return false;
        }
        let floor = self.state.feed.floor();
        let revision = self.state.feed.revision();
        self.last_token <= floor + (revision.saturating_sub(floor)) / 2
    }

    /// A change that moved a key out of this cursor's group is, to this cursor, a deletion.
    fn scoped(&self, change: Change) -> Change {
        match &self.scope {
            Some(scope) if change.entry.group() != &**scope => {
                let e = &change.entry;
                Change {
                    entry: Entry::new(
                        e.key(),
                        scope,
                        None,
                        crate::Flags::default(),
                        e.version(),
                        e.rev(),
                    ),
                    left: LeftGroups::default(),
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
