//! The writer thread: the only code that writes SQLite or the serving index.
//!
//! Group commit: the thread blocks for one request, then takes every request already queued
//! (up to a bound), runs them all in one transaction and commits with one fsync. Only then
//! does it update the index and the feed and acknowledge each request. When idle, a lone
//! write commits at once; under load, batches grow by themselves while an fsync is running.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::entry::{ByKey, MAX_KEY_LEN};
use crate::feed::Change;
use crate::sqlite::{self, Meta};
use crate::{Entry, HlcClock, Record, State, StoreError, Version, supersedes};

/// A write from this node's own clients.
#[derive(Clone, Debug)]
pub enum LocalWrite {
    Put {
        key: String,
        group: String,
        value: Vec<u8>,
        routable: bool,
    },
    Delete {
        key: String,
    },
}

impl LocalWrite {
    fn key(&self) -> &str {
        match self {
            LocalWrite::Put { key, .. } | LocalWrite::Delete { key } => key,
        }
    }
}

pub(crate) enum Request {
    /// Applied all or nothing; acknowledged with the versions given, in order.
    Local {
        ops: Vec<LocalWrite>,
        reply: oneshot::Sender<Result<Vec<Version>, StoreError>>,
    },
    /// Records from other nodes, merged by the merge rule; acknowledged with how many won.
    Remote {
        records: Vec<Record>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// Stop after the requests already queued before it.
    Shutdown,
}

impl Request {
    fn ops(&self) -> usize {
        match self {
            Request::Local { ops, .. } => ops.len(),
            Request::Remote { records, .. } => records.len(),
            Request::Shutdown => 0,
        }
    }
}

enum Outcome {
    Local(Result<Vec<Version>, StoreError>),
    Remote(Result<usize, StoreError>),
}

pub(crate) struct Writer {
    pub conn: Connection,
    pub state: Arc<State>,
    pub meta: Meta,
    pub clock: HlcClock,
    pub max_batch_ops: usize,
}

/// How far ahead of our wall clock a remote record's timestamp may be. A peer with a clock
/// (or a bug) far in the future would otherwise drag every later local write with it, up to
/// an HLC that can no longer advance.
const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// States of keys written earlier in the current group, not yet in the index.
type Pending = HashSet<ByKey>;

/// A key's state as of this point in the group: pending, else the index's.
fn current(state: &State, pending: &Pending, key: &str) -> Option<Entry> {
    pending
        .get(key)
        .map(|e| e.0.clone())
        .or_else(|| state.index.state(key))
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut batch = Vec::new();
        let mut stop = false;
        while !stop {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            let mut ops = first.ops();
            batch.push(first);
            while ops < self.max_batch_ops {
                match rx.try_recv() {
                    Ok(next) => {
                        ops += next.ops();
                        batch.push(next);
                    }
                    Err(_) => break,
                }
            }
            if let Some(pos) = batch.iter().position(|r| matches!(r, Request::Shutdown)) {
                stop = true;
                batch.truncate(pos);
            }
            self.commit_group(std::mem::take(&mut batch));
        }
        self.state.feed.close();
        tracing::debug!("store writer stopped");
    }

    fn commit_group(&mut self, batch: Vec<Request>) {
        if batch.is_empty() {
            return;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let saved_meta = self.meta;
        let saved_clock = self.clock.last();
        let mut changes: Vec<Change> = Vec::new();
        let result = self.stage(&batch, now_ms, &mut changes);
        let outcomes = match result {
            Ok(outcomes) => outcomes,
            Err(err) => {
                // Nothing of this group is durable: restore the counters so that no sequence
                // number or revision is skipped, and fail every request in it.
                self.meta = saved_meta;
                self.clock.reset_to(saved_clock);
                tracing::error!(error = %err, requests = batch.len(), "group commit failed");
                let msg = err.to_string();
                for req in batch {
                    match req {
                        Request::Local { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Commit(msg.clone())));
                        }
                        Request::Remote { reply, .. } => {
                            let _ = reply.send(Err(StoreError::Commit(msg.clone())));
                        }
                        Request::Shutdown => {}
                    }
                }
                return;
            }
        };
        // Durable: now, and only now, readers may see it.
        for change in &changes {
            self.state.index.install(change.entry.clone());
        }
        self.state.feed.publish(changes);
        for (req, outcome) in batch.into_iter().zip(outcomes) {
            match (req, outcome) {
                (Request::Local { reply, .. }, Outcome::Local(r)) => {
                    let _ = reply.send(r);
                }
                (Request::Remote { reply, .. }, Outcome::Remote(r)) => {
                    let _ = reply.send(r);
                }
                _ => unreachable!("one outcome per request, in order"),
            }
        }
    }

    /// Run every request of the group in one transaction and commit it.
    fn stage(
        &mut self,
        batch: &[Request],
        now_ms: u64,
        changes: &mut Vec<Change>,
    ) -> Result<Vec<Outcome>, rusqlite::Error> {
        let state = self.state.clone();
        let tx = self.conn.transaction()?;
        let mut pending = Pending::new();
        let mut outcomes = Vec::with_capacity(batch.len());
        for req in batch {
            match req {
                Request::Local { ops, .. } => {
                    if let Err(e) = check_local(&state, ops, &pending) {
                        outcomes.push(Outcome::Local(Err(e)));
                        continue;
                    }
                    let mut versions = Vec::with_capacity(ops.len());
                    for op in ops {
                        self.meta.local_seq += 1;
                        self.meta.revision += 1;
                        let version = Version {
                            hlc: self.clock.tick(now_ms),
                            origin: self.meta.node,
                            seq: self.meta.local_seq,
                        };
                        let prev = current(&state, &pending, op.key());
                        let entry = match op {
                            LocalWrite::Put {
                                key,
                                group,
                                value,
                                routable,
                            } => Entry::new(
                                key,
                                group,
                                Some((value, *routable)),
                                version,
                                self.meta.revision,
                            ),
                            LocalWrite::Delete { key } => {
                                let prev = prev.as_ref().expect("checked: deletes name live keys");
                                Entry::new(key, prev.group(), None, version, self.meta.revision)
                            }
                        };
                        sqlite::put_record(&tx, &entry, prev.as_ref())?;
                        versions.push(version);
                        stage_change(&mut pending, changes, entry, prev);
                    }
                    outcomes.push(Outcome::Local(Ok(versions)));
                }
                Request::Remote { records, .. } => {
                    let mut won = 0;
                    for record in records {
                        if record.key.len() > MAX_KEY_LEN
                            || record.group.len() > MAX_KEY_LEN
                            || record.version.hlc.physical_ms() > now_ms + MAX_CLOCK_AHEAD_MS
                        {
                            continue;
                        }
                        let prev = current(&state, &pending, &record.key);
                        if !supersedes(&record.version, prev.as_ref().map(|p| p.version()).as_ref())
                        {
                            continue;
                        }
                        self.clock.observe(record.version.hlc);
                        self.meta.revision += 1;
                        let entry = Entry::new(
                            &record.key,
                            &record.group,
                            record.body.as_ref().map(|(v, r)| (&v[..], *r)),
                            record.version,
                            self.meta.revision,
                        );
                        sqlite::put_record(&tx, &entry, prev.as_ref())?;
                        stage_change(&mut pending, changes, entry, prev);
                        won += 1;
                    }
                    outcomes.push(Outcome::Remote(Ok(won)));
                }
                Request::Shutdown => {}
            }
        }
        self.meta.hlc = self.clock.last();
        sqlite::put_meta(&tx, &self.meta)?;
        tx.commit()?;
        Ok(outcomes)
    }
}

fn stage_change(
    pending: &mut Pending,
    changes: &mut Vec<Change>,
    entry: Entry,
    prev: Option<Entry>,
) {
    let moved_from = prev
        .filter(|p| p.is_live() && p.group() != entry.group())
        .map(|p| Arc::from(p.group()));
    pending.replace(ByKey(entry.clone()));
    changes.push(Change {
        entry,
        moved_from,
        prior_unknown: false,
    });
}

/// Check a local request against the state it would apply to, all ops in order, before any
/// of them is written: one failing op rejects the whole request.
fn check_local(state: &State, ops: &[LocalWrite], pending: &Pending) -> Result<(), StoreError> {
    // The live group each key will have after the ops checked so far (None: not live).
    let mut local: HashMap<&str, Option<&str>> = HashMap::new();
    for op in ops {
        let key = op.key();
        if key.len() > MAX_KEY_LEN {
            return Err(StoreError::KeyTooLong(key.len()));
        }
        let prev = current(state, pending, key);
        let live_group: Option<&str> = match local.get(key) {
            Some(g) => *g,
            None => prev.as_ref().filter(|p| p.is_live()).map(|p| p.group()),
        };
        match op {
            LocalWrite::Put { group, .. } => {
                if group.len() > MAX_KEY_LEN {
                    return Err(StoreError::KeyTooLong(group.len()));
                }
                if let Some(existing) = live_group.filter(|g| g != group) {
                    return Err(StoreError::GroupChange {
                        key: Arc::from(key),
                        existing: Arc::from(existing),
                    });
                }
                local.insert(key, Some(group));
            }
            LocalWrite::Delete { .. } => {
                if live_group.is_none() {
                    return Err(StoreError::NotFound(Arc::from(key)));
                }
                local.insert(key, None);
            }
        }
    }
    Ok(())
}
