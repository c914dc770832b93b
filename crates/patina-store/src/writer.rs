//! The writer thread: the only code that writes SQLite or the serving index.
//!
//! Group commit: the thread blocks for work, then takes every request already queued (up to
//! a bound per queue), runs them all in one transaction and commits with one fsync. Only then
//! does it update the index and the feed and acknowledge each request. When idle, a lone
//! write commits at once; under load, batches grow by themselves while an fsync is running.
//!
//! Checkpoints (copying the WAL into the database file) are the writer's too, between
//! groups: once the WAL holds `CHECKPOINT_IDLE_FRAMES` and no write is queued, or at
//! `CHECKPOINT_BUSY_FRAMES` whatever is queued (both in `sqlite.rs`). SQLite's own would run inside a commit,
//! after its fsync, and hold that group's acknowledgements for the copy and two more fsyncs.
//!
//! A failed commit is one of two things. A full disk (`SQLITE_FULL`) rolls the group back and
//! fails its requests with [`StoreError::DiskFull`]; the store goes on, and writes succeed
//! again once there is space. Anything else (an fsync error above all) is fatal: after a
//! failed fsync the page cache's state is unknown, so it is never retried. The store records
//! the failure, fails every queued and later request, ends every watch, and the thread stops.
//! A panic in the thread does the same.

use std::fs::File;
use std::sync::Arc;

use rusqlite::ErrorCode;
use tokio::sync::oneshot;

use crate::merge::{ApplyReport, Core, Outcome, RemoteBatch, Staged, Work};
use crate::queue::{Queue, Queued};
use crate::sqlite::SqliteBackend;
use crate::{LocalWrite, NodeId, OverlayChange, State, StoreError, Version};

pub(crate) enum Request {
    /// Applied all or nothing; acknowledged with the versions given, in order.
    Local {
        ops: Vec<LocalWrite>,
        reply: oneshot::Sender<Result<Vec<Version>, StoreError>>,
    },
    /// Records and covered ranges from peers, merged by the kind's rule.
    Remote {
        batch: RemoteBatch,
        reply: oneshot::Sender<Result<ApplyReport, StoreError>>,
    },
    /// A change of the liveness overlay: `owner` is down (hide its records) or up.
    Overlay {
        owner: NodeId,
        down: bool,
        reply: oneshot::Sender<Result<OverlayChange, StoreError>>,
    },
    /// Collect tombstones (each only if it is still its key's state).
    Collect {
        tombstones: Vec<crate::Entry>,
        reply: oneshot::Sender<Result<usize, StoreError>>,
    },
    /// Retire an origin, or take it back.
    Retire {
        origin: NodeId,
        retire: bool,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
}

impl Request {
    pub(crate) fn work(&self) -> Work<'_> {
        match self {
            Request::Local { ops, .. } => Work::Local(ops),
            Request::Remote { batch, .. } => Work::Remote(batch),
            Request::Overlay { owner, down, .. } => Work::Overlay {
                owner: *owner,
                down: *down,
            },
            Request::Collect { tombstones, .. } => Work::Collect(tombstones),
            Request::Retire { origin, retire, .. } => Work::Retire {
                origin: *origin,
                retire: *retire,
            },
        }
    }

    pub(crate) fn fail(self, err: &StoreError) {
        match self {
            Request::Local { reply, .. } => {
                let _ = reply.send(Err(err.duplicate()));
            }
            Request::Remote { reply, .. } => {
                let _ = reply.send(Err(err.duplicate()));
            }
            Request::Overlay { reply, .. } => {
                let _ = reply.send(Err(err.duplicate()));
            }
            Request::Collect { reply, .. } => {
                let _ = reply.send(Err(err.duplicate()));
            }
            Request::Retire { reply, .. } => {
                let _ = reply.send(Err(err.duplicate()));
            }
        }
    }

    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Request::Local { reply, .. }, Outcome::Local(r)) => {
                let _ = reply.send(r);
            }
            (Request::Remote { reply, .. }, Outcome::Remote(r)) => {
                let _ = reply.send(Ok(r));
            }
            (Request::Overlay { reply, .. }, Outcome::Overlay(r)) => {
                let _ = reply.send(r);
            }
            (Request::Collect { reply, .. }, Outcome::Collect(n)) => {
                let _ = reply.send(Ok(n));
            }
            (Request::Retire { reply, .. }, Outcome::Retire(r)) => {
                let _ = reply.send(r);
            }
            _ => unreachable!("one outcome per request, of its kind"),
        }
    }
}

/// Is this commit error a full disk (recoverable: nothing was written) rather than a fault
/// that leaves the database file's state unknown?
pub(crate) fn is_disk_full(e: &rusqlite::Error) -> bool {
    e.sqlite_error_code() == Some(ErrorCode::DiskFull)
}

/// Install a committed group and answer its requests. Shared by the writer thread and the
/// in-memory store.
pub(crate) fn finish_group(
    state: &State,
    core: &Core,
    requests: Vec<Request>,
    outcomes: Vec<Outcome>,
    staged: Staged,
) {
    // Durable: now, and only now, readers may see it.
    if let Some(old) = staged.moved_from {
        state.set_node(core.meta.node);
        tracing::error!(old = %old, new = %core.meta.node, "this store now writes as a new origin");
    }
    state
        .commits
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // The overlay before the feed: a reader that sees an overlay change's revision reads
    // with the down set it produced (and one that reads the new set early only finds its
    // view repeated by the feed).
    if staged.overlay {
        state.publish_overlay(core.meta.down.clone(), core.meta.overlay_rev);
    }
    state.publish_collected(core.meta.collected_rev);
    if staged.retired {
        state.publish_retired(core.meta.retired.clone(), &staged.forgotten);
    }
    for t in &staged.removals {
        state.index.remove_tombstone(t);
    }
    // The index first: a reader that sees a number known must find its record installed.
    // Only real states: the overlay's views live in the feed alone.
    for (entry, prev) in staged.installs {
        state.index.install(entry, prev);
    }
    state.publish_knowledge(staged.knowledge);
    state.count_refusals(staged.refusals);
    // The clock before the feed: a watch message made after a change is stamped above it.
    state.publish_hlc(core.clock.last());
    // Before the feed: a token for a revision the disk holds needs no incarnation.
    if !core.overlay_unpersisted {
        state.set_durable_rev(core.meta.revision);
    }
    state.feed.publish(staged.changes);
    for (req, outcome) in requests.into_iter().zip(outcomes) {
        req.answer(outcome);
    }
}

pub(crate) struct Writer {
    pub backend: SqliteBackend,
    pub core: Core,
    pub state: Arc<State>,
    pub queue: Arc<Queue>,
    pub max_local_ops: usize,
    pub max_remote_ops: usize,
    /// Stamped on every group and while idle: the watchdog sees a stuck writer.
    pub beat: patina_watchdog::Beat,
    /// The data directory's lock: held as long as this thread runs, so no other process
    /// opens the directory while a write may still be on its way to disk.
    pub _lock: File,
}

/// Marks the store failed if the writer thread unwinds, so nobody waits for it forever.
struct PanicGuard {
    state: Arc<State>,
    queue: Arc<Queue>,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            fail_store(
                &self.state,
                &self.queue,
                "the store's writer thread panicked".into(),
            );
        }
    }
}

/// Apply liveness changes without the disk (it is full): in memory, persisted by the next
/// commit that succeeds. A change that cannot be applied even so fails with `DiskFull`.
/// `reads`: where a lean store reads rows (the writer's backend; `None` for stores in memory).
pub(crate) fn commit_in_memory(
    state: &State,
    core: &mut Core,
    requests: Vec<Request>,
    reads: Option<&dyn crate::merge::Backend>,
) {
    let work: Vec<Work<'_>> = requests.iter().map(Request::work).collect();
    let result = core.commit_group(state, &work, &mut crate::mem::NullBackend { reads });
    drop(work);
    match result {
        Ok((outcomes, staged)) => {
            core.overlay_unpersisted = true;
            tracing::warn!(
                changes = requests.len(),
                "disk full: liveness changes applied in memory, persisted once space returns"
            );
            finish_group(state, core, requests, outcomes, staged);
        }
        Err(e) => {
            for req in requests {
                req.fail(&StoreError::DiskFull);
            }
            tracing::warn!(error = %e, "liveness changes could not be applied in memory");
        }
    }
}

/// The fatal path: record why, fail everything queued, end every watch.
pub(crate) fn fail_store(state: &State, queue: &Queue, reason: String) {
    tracing::error!(reason = %reason, "the store failed and stops: no write is accepted any more");
    state.set_failed(reason);
    let err = state.failure_error();
    for queued in queue.close(false) {
        queued.request.fail(&err);
    }
    state.feed.close();
}

impl Writer {
    pub fn run(mut self) {
        let _guard = PanicGuard {
            state: self.state.clone(),
            queue: self.queue.clone(),
        };
        self.backend.manage_checkpoints();
        loop {
            self.beat.stamp();
            let beat = &self.beat;
            let Some(group) = self.queue.next_group(
                self.max_local_ops,
                self.max_remote_ops,
                patina_watchdog::STAMP_EVERY,
                &|| beat.stamp(),
            ) else {
                break;
            };
            // Stamped between the commit and the checkpoint: each its own step.
            let done = self.commit_group(group).and_then(|()| {
                self.beat.stamp();
                self.checkpoint_if_due()
            });
            if let Err(reason) = done {
                fail_store(&self.state, &self.queue, reason);
                return;
            }
        }
        self.state.feed.close();
        tracing::debug!("store writer stopped");
    }

    /// Checkpoint if the WAL is large enough for the writer's state (idle or not). `Err` is
    /// fatal: a checkpoint that failed to sync leaves the database file's state unknown. A
    /// full disk is not: everything stays in the WAL, and the next checkpoint tries again.
    fn checkpoint_if_due(&mut self) -> Result<(), String> {
        if !self.backend.checkpoint_due(self.queue.has_work()) {
            return Ok(());
        }
        match self.backend.checkpoint() {
            Ok(done) => {
                tracing::debug!(?done, "checkpointed");
                Ok(())
            }
            Err(e) if is_disk_full(&e) => {
                tracing::warn!(error = %e, "disk full: checkpoint postponed");
                Ok(())
            }
            Err(e) => {
                let reason = format!("checkpoint failed: {e}");
                self.state.set_failed(reason.clone());
                Err(reason)
            }
        }
    }

    /// Commit one group. `Err` is fatal: the store must stop.
    fn commit_group(&mut self, group: Vec<Queued>) -> Result<(), String> {
        let (requests, permits): (Vec<Request>, Vec<_>) = group
            .into_iter()
            .map(|q| {
                let (request, permits) = q.into_parts();
                (request, permits)
            })
            .unzip();
        let work: Vec<Work<'_>> = requests.iter().map(Request::work).collect();
        let result = self
            .core
            .commit_group(&self.state, &work, &mut self.backend);
        drop(work);
        match result {
            Ok((outcomes, staged)) => {
                finish_group(&self.state, &self.core, requests, outcomes, staged);
                drop(permits);
                Ok(())
            }
            Err(e) if is_disk_full(&e) => {
                tracing::warn!(error = %e, requests = requests.len(), "disk full: group commit rolled back");
                let (overlay, rest): (Vec<Request>, Vec<Request>) = requests
                    .into_iter()
                    .partition(|r| matches!(r, Request::Overlay { .. }));
                for req in rest {
                    req.fail(&StoreError::DiskFull);
                }
                // Down news must not wait for disk space: the overlay is this agent's own view
                // (never replicated, recomputed from the membership after a restart), so its
                // changes are applied in memory now and persisted with the next commit that
                // succeeds. Its revisions are not durable meanwhile: a watcher's token above
                // what a crash leaves gets a reset, never a silent skip.
                if !overlay.is_empty() {
                    commit_in_memory(&self.state, &mut self.core, overlay, Some(&self.backend));
                }
                drop(permits);
                Ok(())
            }
            Err(e) => {
                let reason = format!("group commit failed: {e}");
                let err = StoreError::Failed(reason.clone().into());
                self.state.set_failed(reason.clone());
                for req in requests {
                    req.fail(&err);
                }
                Err(reason)
            }
        }
    }
}
