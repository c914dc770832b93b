//! The writer thread's input: bounded queues for liveness changes, local writes and records
//! from peers, each with its own budget in requests and in bytes. Liveness changes (a dead
//! member's records hidden) come first in every group: down news never waits behind writes.
//!
//! Separate budgets keep a sync flood from delaying local writes: the writer takes local
//! requests first and only a bounded number of remote records per group commit. A caller
//! waits (backpressure) while its queue is full, but the waiting room is bounded too, in
//! callers and in bytes: past it a write fails at once with [`StoreError::Overloaded`]
//! instead of parking unbounded memory in waiting tasks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::StoreError;
use crate::writer::Request;

/// The bounds of one queue.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub requests: usize,
    pub bytes: usize,
    pub waiters: usize,
    pub waiting_bytes: usize,
}

struct Budget {
    limits: Limits,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    waiters: AtomicUsize,
    waiting_bytes: AtomicUsize,
}

impl Budget {
    fn new(limits: Limits) -> Budget {
        Budget {
            limits,
            requests: Arc::new(Semaphore::new(limits.requests)),
            bytes: Arc::new(Semaphore::new(limits.bytes)),
            waiters: AtomicUsize::new(0),
            waiting_bytes: AtomicUsize::new(0),
        }
    }
}

/// The budget a queued request holds until the writer is done with it.
pub(crate) type Permits = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// A request in a queue, with its budget.
pub(crate) struct Queued {
    pub request: Request,
    pub ops: usize,
    permits: Permits,
}

impl Queued {
    pub fn into_parts(self) -> (Request, Permits) {
        (self.request, self.permits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Changes of the liveness overlay: taken before anything else.
    Overlay,
    Local,
    Remote,
}

/// The overlay's queue: the liveness task sends one change at a time, so a few suffice.
const OVERLAY_LIMITS: Limits = Limits {
    requests: 64,
    bytes: 64 << 10,
    waiters: 64,
    waiting_bytes: 64 << 10,
};

#[derive(Default)]
struct Lists {
    overlay: VecDeque<Queued>,
    local: VecDeque<Queued>,
    remote: VecDeque<Queued>,
    /// No request is taken any more; the writer drains what is queued, then stops.
    closed: bool,
}

pub(crate) struct Queue {
    lists: Mutex<Lists>,
    ready: Condvar,
    overlay: Budget,
    local: Budget,
    remote: Budget,
}

/// Releases a caller's place in the waiting room.
struct Waiting<'a> {
    budget: &'a Budget,
    bytes: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.budget.waiters.fetch_sub(1, Ordering::Relaxed);
        self.budget
            .waiting_bytes
            .fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// How full one class of the write queue is: requests and bytes queued (waiting for the
/// writer or being written), their limits, and callers waiting for a place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueDepth {
    pub requests: usize,
    pub requests_limit: usize,
    pub bytes: usize,
    pub bytes_limit: usize,
    pub waiters: usize,
}

impl Budget {
    fn depth(&self) -> QueueDepth {
        QueueDepth {
            requests: self
                .limits
                .requests
                .saturating_sub(self.requests.available_permits()),
            requests_limit: self.limits.requests,
            bytes: self
                .limits
                .bytes
                .saturating_sub(self.bytes.available_permits()),
            bytes_limit: self.limits.bytes,
            waiters: self.waiters.load(Ordering::Relaxed),
        }
    }
}

impl Queue {
    /// How full the local writes' and peers' batches' queues are.
    pub fn depths(&self) -> (QueueDepth, QueueDepth) {
        (self.local.depth(), self.remote.depth())
    }

    pub fn new(local: Limits, remote: Limits) -> Queue {
        Queue {
            lists: Mutex::new(Lists::default()),
            ready: Condvar::new(),
            overlay: Budget::new(OVERLAY_LIMITS),
            local: Budget::new(local),
            remote: Budget::new(remote),
        }
    }

    fn budget(&self, class: Class) -> &Budget {
        match class {
            Class::Overlay => &self.overlay,
            Class::Local => &self.local,
            Class::Remote => &self.remote,
        }
    }

    /// Queue a request for the writer, waiting while its queue is full.
    pub async fn push(
        &self,
        class: Class,
        request: Request,
        ops: usize,
        bytes: usize,
    ) -> Result<(), StoreError> {
        let budget = self.budget(class);
        if bytes > budget.limits.bytes {
            return Err(StoreError::TooLarge {
                bytes,
                limit: budget.limits.bytes,
            });
        }
        let permits = {
            let waiters = budget.waiters.fetch_add(1, Ordering::Relaxed);
            let waiting = budget.waiting_bytes.fetch_add(bytes, Ordering::Relaxed);
            let _waiting = Waiting { budget, bytes };
            if waiters >= budget.limits.waiters || waiting + bytes > budget.limits.waiting_bytes {
                return Err(StoreError::Overloaded);
            }
            let one = budget.requests.clone().acquire_owned().await;
            // `bytes` fits in u32: it is at most `limits.bytes`, checked at configuration.
            let many = budget.bytes.clone().acquire_many_owned(bytes as u32).await;
            match (one, many) {
                (Ok(one), Ok(many)) => (one, many),
                _ => return Err(StoreError::Closed),
            }
        };
        let queued = Queued {
            request,
            ops,
            permits,
        };
        {
            let mut lists = self.lists.lock().expect("queue lock");
            if lists.closed {
                return Err(StoreError::Closed);
            }
            match class {
                Class::Overlay => lists.overlay.push_back(queued),
                Class::Local => lists.local.push_back(queued),
                Class::Remote => lists.remote.push_back(queued),
            }
        }
        self.ready.notify_one();
        Ok(())
    }

    /// Block until there is work, then take local requests up to `max_local_ops` and remote
    /// ones up to `max_remote_ops` (at least one request when any is queued). `None` once
    /// the queue is closed and drained.
    pub fn next_group(
        &self,
        max_local_ops: usize,
        max_remote_ops: usize,
        idle_every: std::time::Duration,
        idle: &dyn Fn(),
    ) -> Option<Vec<Queued>> {
        let mut lists = self.lists.lock().expect("queue lock");
        while lists.overlay.is_empty() && lists.local.is_empty() && lists.remote.is_empty() {
            if lists.closed {
                return None;
            }
            // Wakes at least every `idle_every` to say it is idle, not stuck.
            lists = self
                .ready
                .wait_timeout(lists, idle_every)
                .expect("queue lock")
                .0;
            idle();
        }
        let mut group = Vec::new();
        let Lists {
            overlay,
            local,
            remote,
            ..
        } = &mut *lists;
        for (list, max) in [
            (overlay, usize::MAX),
            (local, max_local_ops),
            (remote, max_remote_ops),
        ] {
            let mut ops = 0;
            while let Some(next) = list.front() {
                if ops > 0 && ops + next.ops > max {
                    break;
                }
                ops += next.ops;
                group.push(list.pop_front().expect("front exists"));
            }
        }
        Some(group)
    }

    /// Is any request queued for the writer?
    pub fn has_work(&self) -> bool {
        let lists = self.lists.lock().expect("queue lock");
        !lists.overlay.is_empty() || !lists.local.is_empty() || !lists.remote.is_empty()
    }

    /// Take no more requests. With `drain`, the writer still gets what is queued; without,
    /// what is queued is returned to be failed.
    pub fn close(&self, drain: bool) -> Vec<Queued> {
        let mut lists = self.lists.lock().expect("queue lock");
        lists.closed = true;
        let dropped = if drain {
            Vec::new()
        } else {
            let mut all: Vec<Queued> = lists.overlay.drain(..).collect();
            all.extend(lists.local.drain(..));
            all.extend(lists.remote.drain(..));
            all
        };
        drop(lists);
        self.overlay.requests.close();
        self.overlay.bytes.close();
        self.local.requests.close();
        self.local.bytes.close();
        self.remote.requests.close();
        self.remote.bytes.close();
        self.ready.notify_all();
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::RemoteBatch;
    use crate::writer::Request;

    fn limits(requests: usize) -> Limits {
        Limits {
            requests,
            bytes: 1 << 20,
            waiters: requests,
            waiting_bytes: 1 << 20,
        }
    }

    fn local() -> Request {
        Request::Local {
            ops: Vec::new(),
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn remote() -> Request {
        Request::Remote {
            batch: RemoteBatch::default(),
            reply: tokio::sync::oneshot::channel().0,
        }
    }

    fn is_local(q: &Queued) -> bool {
        matches!(q.request, Request::Local { .. })
    }

    #[tokio::test]
    async fn a_group_takes_local_writes_first_and_bounds_what_comes_from_peers() {
        let q = Queue::new(limits(16), limits(16));
        for _ in 0..3 {
            q.push(Class::Remote, remote(), 600, 100).await.unwrap();
        }
        q.push(Class::Local, local(), 1, 100).await.unwrap();
        let group = q
            .next_group(4096, 1024, std::time::Duration::from_secs(1), &|| {})
            .unwrap();
        assert!(is_local(&group[0]), "the local write is in the first group");
        assert_eq!(
            group.len(),
            2,
            "and only as much of the sync flood as 1024 ops allow"
        );
        assert_eq!(
            q.next_group(4096, 1024, std::time::Duration::from_secs(1), &|| {})
                .unwrap()
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn a_liveness_change_never_waits_behind_local_writes() {
        let q = Arc::new(Queue::new(limits(1), limits(1)));
        q.push(Class::Local, local(), 1, 10).await.unwrap();
        // The local queue is full; a liveness change has its own budget, and goes first.
        // (A request of another shape, to tell them apart.)
        q.push(Class::Overlay, remote(), 1, 10).await.unwrap();
        let group = q
            .next_group(10, 10, std::time::Duration::from_secs(1), &|| {})
            .unwrap();
        assert_eq!(group.len(), 2);
        assert!(
            !is_local(&group[0]) && is_local(&group[1]),
            "the liveness change comes first"
        );
    }

    #[tokio::test]
    async fn past_the_waiting_room_a_write_fails_at_once() {
        let q = Arc::new(Queue::new(limits(1), limits(1)));
        q.push(Class::Local, local(), 1, 10).await.unwrap();
        // The queue is full: the next caller waits...
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.push(Class::Local, local(), 1, 10).await }
        });
        tokio::task::yield_now().await;
        while q.local.waiters.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        // ...and the waiting room (one caller) is full too: refused, not parked.
        let third = q.push(Class::Local, local(), 1, 10).await;
        assert!(matches!(third, Err(StoreError::Overloaded)), "{third:?}");
        // Remote writes have their own budget.
        q.push(Class::Remote, remote(), 1, 10).await.unwrap();
        // The writer takes the first; the waiter gets its place.
        drop(
            q.next_group(10, 10, std::time::Duration::from_secs(1), &|| {})
                .unwrap(),
        );
        waiting.await.unwrap().unwrap();
        // A request larger than the whole budget is refused outright.
        let huge = q.push(Class::Local, local(), 1, 2 << 20).await;
        assert!(matches!(huge, Err(StoreError::TooLarge { .. })), "{huge:?}");
    }
}
