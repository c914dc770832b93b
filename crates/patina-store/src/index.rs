//! The in-memory serving index: every record by key (tombstones too), and every live record
//! by group (an app).
//!
//! Only the writer thread mutates it, after the change is durable; readers on any thread see
//! committed state only. Lock scopes are a few lines in plain blocks that cannot hold an
//! `.await`; readers clone [`Entry`] handles out.

use std::collections::HashSet;
use std::sync::Arc;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as Slot;

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
    groups: DashMap<Arc<str>, HashSet<ByKey>>,
}

impl Index {
    /// The current state of `key`, tombstone or live.
    pub fn state(&self, key: &str) -> Option<Entry> {
        self.keys.get(key).map(|e| e.key().0.clone())
    }

    /// The live record of `key`.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.state(key).filter(Entry::is_live)
    }

    pub fn list(&self, group: &str, filter: Filter) -> Vec<Entry> {
        let Some(records) = self.groups.get(group) else {
            return Vec::new();
        };
        // Sized up front: growing the vector would reallocate several times per lookup.
        let mut out = Vec::with_capacity(records.len());
        out.extend(
            records
                .iter()
                .filter(|e| filter == Filter::All || e.0.routable())
                .map(|e| e.0.clone()),
        );
        out
    }

    /// Every live record of one group, or of all groups.
    pub fn snapshot(&self, group: Option<&str>) -> Vec<Entry> {
        match group {
            Some(group) => self.list(group, Filter::All),
            None => {
                let mut out = Vec::with_capacity(self.keys.len());
                for records in self.groups.iter() {
                    out.extend(records.iter().map(|e| e.0.clone()));
                }
                // Shards are read one at a time, so a key moving between groups meanwhile
                // can be seen in both: keep its newest state only.
                out.sort_unstable_by(|a, b| a.key().cmp(b.key()).then(b.rev().cmp(&a.rev())));
                out.dedup_by(|later, first| later.key() == first.key());
                out
            }
        }
    }

    /// Keys of one group (or all groups) whose state has a revision above `after`, oldest
    /// first, tombstones included.
    pub fn changed_since(&self, after: u64, group: Option<&str>) -> Vec<Entry> {
        let mut out: Vec<Entry> = self
            .keys
            .iter()
            .map(|e| e.key().0.clone())
            .filter(|e| e.rev() > after && group.is_none_or(|g| e.group() == g))
            .collect();
        out.sort_by_key(Entry::rev);
        out
    }

    pub fn len_keys(&self) -> usize {
        self.keys.len()
    }

    pub fn len_live(&self) -> usize {
        self.groups.iter().map(|g| g.len()).sum()
    }

    pub fn len_groups(&self) -> usize {
        self.groups.len()
    }

    /// Install a key's new state; returns the state it replaced. Writer thread only, after
    /// commit.
    pub fn install(&self, entry: Entry) -> Option<Entry> {
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
