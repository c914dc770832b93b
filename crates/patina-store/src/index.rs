//! The in-memory serving index: every record by key (tombstones too), and every live record
//! by group (an app), in key order.
//!
//! Only the writer thread mutates it, after the change is durable; readers on any thread see
//! committed state only. Lock scopes are a few lines in plain blocks that cannot hold an
//! `.await`; readers clone [`Entry`] handles out.

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as Slot;

use crate::NodeId;
use crate::entry::{ByKey, Entry};

/// Which of a group's live records a listing returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    All,
    RoutableOnly,
}

#[derive(Default)]
pub(crate) struct Index {
    keys: DashMap<ByKey, ()>,
    /// Live records by group, ordered by key so that listings page and snapshots chunk
    /// without copying the group.
    groups: DashMap<Arc<str>, BTreeSet<ByKey>>,
    /// A lean store's index (`keys` and `groups` stay empty): see `lean.rs`.
    pub lean: Option<std::sync::Mutex<crate::lean::LeanKeys>>,
    /// A lean store's kind: readers that build entries from rows derive their flags with it.
    pub lean_kind: Option<crate::KindRef>,
    /// The lean index's key and live counts, copied out after each change (the writer's),
    /// so that stats never wait on the lean index's lock.
    lean_keys: AtomicUsize,
    lean_live: AtomicUsize,
}

impl Index {
    /// Is `key` held lean here (a lean store, and its kind says so)?
    pub fn is_lean(&self, key: &str) -> bool {
        self.lean_kind.as_ref().is_some_and(|k| k.lean_key(key))
    }

    /// The index of a lean store of `kind`.
    pub fn lean(kind: crate::KindRef) -> Index {
        Index {
            lean: Some(std::sync::Mutex::default()),
            lean_kind: Some(kind),
            ..Index::default()
        }
    }

    /// The latest state of `key`, tombstone or live.
    pub fn latest(&self, key: &str) -> Option<Entry> {
        self.keys.get(key).map(|e| e.key().0.clone())
    }

    /// The live record of `key`.
    pub fn live(&self, key: &str) -> Option<Entry> {
        self.latest(key).filter(Entry::is_live)
    }

    /// Up to `limit` live records of `group` with keys after `after`, in key order, hidden
    /// ones included (the caller applies the liveness overlay).
    pub fn list(
        &self,
        group: &str,
        filter: Filter,
        after: Option<&str>,
        limit: usize,
    ) -> Vec<Entry> {
        self.page(group, filter, &BTreeSet::new(), after, limit, usize::MAX)
            .0
    }

    /// Every key whose latest state (tombstone or live) was written by `origin`. A scan of
    /// the whole index: for rare events only (a move to a fresh origin, a change of the
    /// liveness overlay).
    pub fn of_origin(&self, origin: NodeId) -> Vec<Entry> {
        self.keys
            .iter()
            .map(|e| e.key().0.clone())
            .filter(|e| e.version().origin == origin)
            .collect()
    }

    /// Up to `limit` live records of `group` with keys after `after`, in key order, skipping
    /// those whose owner is in `down` (the liveness overlay), looking at no more than
    /// `max_scan` of the group's records (the filter and the overlay may skip many). Also
    /// returns where a next page starts: after the last key looked at, when more may follow.
    pub fn page(
        &self,
        group: &str,
        filter: Filter,
        down: &BTreeSet<NodeId>,
        after: Option<&str>,
        limit: usize,
        max_scan: usize,
    ) -> (Vec<Entry>, Option<String>) {
        let Some(records) = self.groups.get(group) else {
            return (Vec::new(), None);
        };
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out = Vec::with_capacity(records.len().min(limit));
        let mut scanned = records
            .range::<str, _>((lower, Bound::Unbounded))
            .peekable();
        let mut last = None;
        for e in scanned.by_ref().take(max_scan.max(1)) {
            last = Some(e);
            if (filter == Filter::All || e.0.routable()) && !down.contains(&e.0.owner()) {
                out.push(e.0.clone());
                if out.len() == limit {
                    break;
                }
            }
        }
        let next = match (last, scanned.peek()) {
            (Some(last), Some(_)) => Some(last.0.key().to_owned()),
            _ => None,
        };
        (out, next)
    }

    pub fn len_keys(&self) -> usize {
        self.lean_keys.load(Ordering::Relaxed) + self.keys.len()
    }

    pub fn len_live(&self) -> usize {
        self.lean_live.load(Ordering::Relaxed) + self.groups.iter().map(|g| g.len()).sum::<usize>()
    }

    /// Copy the lean index's counts out (after a change, with its lock held).
    pub fn lean_counted(&self, lean: &crate::lean::LeanKeys) {
        self.lean_keys.store(lean.len(), Ordering::Relaxed);
        self.lean_live.store(lean.live(), Ordering::Relaxed);
    }

    pub fn len_groups(&self) -> usize {
        self.groups.len()
    }

    /// Up to `limit` tombstones with timestamps older than `before_ms` (wall milliseconds)
    /// and revisions at or below `max_rev`. Walks every key: for the periodic collection,
    /// off the runtime's threads.
    pub fn tombstones_before(&self, before_ms: u64, max_rev: u64, limit: usize) -> Vec<Entry> {
        let mut out = Vec::new();
        for k in self.keys.iter() {
            if out.len() >= limit {
                break;
            }
            let e = &k.key().0;
            if !e.is_live() && e.version().hlc.physical_ms() < before_ms && e.rev() <= max_rev {
                out.push(e.clone());
            }
        }
        out
    }

    /// Drop a collected tombstone, if it is still its key's state. Writer thread only, after
    /// commit.
    pub fn remove_tombstone(&self, t: &Entry) {
        if let Some(lean) = self.lean.as_ref().filter(|_| self.is_lean(t.key())) {
            let mut lean = lean.lock().expect("lean index");
            lean.remove(t.key(), t.rev());
            self.lean_counted(&lean);
            return;
        }
        self.keys.remove_if(t.key(), |k, _| {
            !k.0.is_live() && k.0.version() == t.version()
        });
    }

    /// Install a key's new state; returns the state it replaced (never in a lean store).
    /// `prev`: the revision the key's state had as the writer read it. Writer thread only,
    /// after commit.
    pub fn install(&self, entry: Entry, prev: Option<u64>) -> Option<Entry> {
        if let Some(lean) = self.lean.as_ref().filter(|_| self.is_lean(entry.key())) {
            let mut lean = lean.lock().expect("lean index");
            lean.install(entry.key(), entry.rev(), entry.is_live(), prev);
            self.lean_counted(&lean);
            return None;
        }
        let previous = match self.keys.entry(ByKey(entry.clone())) {
            Slot::Occupied(o) => Some(o.replace_entry(()).0.0),
            Slot::Vacant(v) => {
                v.insert(());
                None
            }
        };
        if let Some(prev) = previous
            .as_ref()
            .filter(|p| p.is_live() && p.group() != entry.group())
        {
            self.remove_from_group(prev.group(), prev.key());
        }
        if entry.is_live() {
            match self.groups.get_mut(entry.group()) {
                Some(mut records) => {
                    records.replace(ByKey(entry));
                }
                None => {
                    let group: Arc<str> = Arc::from(entry.group());
                    self.groups.entry(group).or_default().replace(ByKey(entry));
                }
            }
        } else {
            self.remove_from_group(entry.group(), entry.key());
        }
        previous
    }

    fn remove_from_group(&self, group: &str, key: &str) {
        let emptied = match self.groups.get_mut(group) {
            Some(mut records) => {
                records.remove(key);
                records.is_empty()
            }
            None => false,
        };
        if emptied {
            self.groups
                .remove_if(group, |_, records| records.is_empty());
        }
    }
}
