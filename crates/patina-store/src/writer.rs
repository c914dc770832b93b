//! The writer thread: the only code that writes SQLite or the serving index.
//!
//! Group commit: the thread blocks for one request, then takes every request already queued
//! (up to a bound), runs them all in one transaction and commits with one fsync. Only then
//! does it update the index and the feed and acknowledge each request. When idle, a lone
//! write commits at once; under load, batches grow by themselves while an fsync is running.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::feed::Change;
use crate::index::KeyState;
use crate::sqlite::{self, Meta};
use crate::{HlcClock, Record, State, StoreError, Version, supersedes};

/// A write from this node's own clients.
#[derive(Clone, Debug)]
pub enum LocalWrite {
    Put {
        key: Arc<str>,
        group: Arc<str>,
        value: Arc<[u8]>,
        routable: bool,
    },
    Delete {
        key: Arc<str>,
    },
}

impl LocalWrite {
    fn key(&self) -> &Arc<str> {
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

/// The state a key will have once the current group commits.
#[derive(Clone)]
struct Pending {
    group: Arc<str>,
    version: Version,
    live: bool,
}

impl From<KeyState> for Pending {
    fn from(s: KeyState) -> Self {
        Pending {
            group: s.group,
            version: s.version,
            live: s.live,
        }
    }
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
            self.state.index.install(
                change.key.clone(),
                change.group.clone(),
                change.body.clone(),
                change.version,
                change.rev,
            );
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
        let mut pending: HashMap<Arc<str>, Pending> = HashMap::new();
        let current = |pending: &HashMap<Arc<str>, Pending>, key: &str| -> Option<Pending> {
            pending
                .get(key)
                .cloned()
                .or_else(|| state.index.key_state(key).map(Pending::from))
        };
        let mut outcomes = Vec::with_capacity(batch.len());
        for req in batch {
            match req {
                Request::Local { ops, .. } => {
                    if let Err(e) = check_local(ops, &pending, &current) {
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
                        let prev = current(&pending, op.key());
                        let (key, group, body) = match op {
                            LocalWrite::Put {
                                key,
                                group,
                                value,
                                routable,
                            } => (
                                intern_key(&state, key),
                                intern_group(&state, group),
                                Some((value.clone(), *routable)),
                            ),
                            LocalWrite::Delete { key } => {
                                let group = prev.as_ref().map(|p| p.group.clone());
                                let group = group.expect("checked: deletes name live keys");
                                (intern_key(&state, key), group, None)
                            }
                        };
                        sqlite::put_record(
                            &tx,
                            &key,
                            &group,
                            body.as_ref().map(|(v, r)| (&v[..], *r)),
                            &version,
                            self.meta.revision,
                        )?;
                        let moved_from =
                            prev.filter(|p| p.live && p.group != group).map(|p| p.group);
                        pending.insert(
                            key.clone(),
                            Pending {
                                group: group.clone(),
                                version,
                                live: body.is_some(),
                            },
                        );
                        changes.push(Change {
                            rev: self.meta.revision,
                            key,
                            group,
                            moved_from,
                            body,
                            version,
                        });
                        versions.push(version);
                    }
                    outcomes.push(Outcome::Local(Ok(versions)));
                }
                Request::Remote { records, .. } => {
                    let mut won = 0;
                    for record in records {
                        let prev = current(&pending, &record.key);
                        if !supersedes(&record.version, prev.as_ref().map(|p| &p.version)) {
                            continue;
                        }
                        self.clock.observe(record.version.hlc);
                        self.meta.revision += 1;
                        let key = intern_key(&state, &record.key);
                        let group = intern_group(&state, &record.group);
                        sqlite::put_record(
                            &tx,
                            &key,
                            &group,
                            record.body.as_ref().map(|(v, r)| (&v[..], *r)),
                            &record.version,
                            self.meta.revision,
                        )?;
                        let moved_from =
                            prev.filter(|p| p.live && p.group != group).map(|p| p.group);
                        pending.insert(
                            key.clone(),
                            Pending {
                                group: group.clone(),
                                version: record.version,
                                live: record.body.is_some(),
                            },
                        );
                        changes.push(Change {
                            rev: self.meta.revision,
                            key,
                            group,
                            moved_from,
                            body: record.body.clone(),
                            version: record.version,
                        });
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

fn intern_key(state: &State, key: &Arc<str>) -> Arc<str> {
    state.index.intern_key(key).unwrap_or_else(|| key.clone())
}

fn intern_group(state: &State, group: &Arc<str>) -> Arc<str> {
    state
        .index
        .intern_group(group)
        .unwrap_or_else(|| group.clone())
}

/// Check a local request against the state it would apply to, all ops in order, before any
/// of them is written: one failing op rejects the whole request.
fn check_local(
    ops: &[LocalWrite],
    pending: &HashMap<Arc<str>, Pending>,
    current: &impl Fn(&HashMap<Arc<str>, Pending>, &str) -> Option<Pending>,
) -> Result<(), StoreError> {
    let mut local: HashMap<&str, Pending> = HashMap::new();
    for op in ops {
        let key = op.key();
        let prev = local.get(&**key).cloned().or_else(|| current(pending, key));
        let live_group = prev.filter(|p| p.live).map(|p| p.group);
        match op {
            LocalWrite::Put { group, .. } => {
                if let Some(existing) = live_group.filter(|g| g != group) {
                    return Err(StoreError::GroupChange {
                        key: key.clone(),
                        existing,
                    });
                }
                local.insert(key, pending_stub(group.clone(), true));
            }
            LocalWrite::Delete { .. } => {
                let Some(group) = live_group else {
                    return Err(StoreError::NotFound(key.clone()));
                };
                local.insert(key, pending_stub(group, false));
            }
        }
    }
    Ok(())
}

fn pending_stub(group: Arc<str>, live: bool) -> Pending {
    Pending {
        group,
        version: Version {
            hlc: crate::Hlc(0),
            origin: crate::NodeId(0),
            seq: 0,
        },
        live,
    }
}
