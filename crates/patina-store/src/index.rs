//! The in-memory serving index: every record by key, and every live record by group (an app).
//!
//! Only the writer thread mutates it, after the change is durable; readers on any thread see
//! committed state only. Lock scopes are a few lines in plain blocks that cannot hold an
//! `.await`; readers clone `Arc`s out.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use crate::Version;

/// A live record, as readers get it.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub key: Arc<str>,
    pub group: Arc<str>,
    /// The encoded value (for machines: a `patina.v1.Machine` without version or time).
    pub value: Arc<[u8]>,
    pub version: Version,
    /// Whether the record may be routed to (for machines: started and passing).
    pub routable: bool,
    /// The store revision of the write that produced this state.
    pub rev: u64,
}

/// What the index holds for every key, live or deleted: enough for the merge rule, for
/// moving between groups, and for catch-up scans by revision.
#[derive(Clone, Debug)]
pub(crate) struct KeyState {
    pub group: Arc<str>,
    pub version: Version,
    pub rev: u64,
    pub live: bool,
}

/// A live record inside its group.
#[derive(Clone, Debug)]
struct Slot {
    value: Arc<[u8]>,
    version: Version,
    routable: bool,
    rev: u64,
}

/// Which of a group's live records a listing returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    All,
    RoutableOnly,
}

#[derive(Default)]
pub(crate) struct Index {
    keys: DashMap<Arc<str>, KeyState>,
    groups: DashMap<Arc<str>, HashMap<Arc<str>, Slot>>,
}

impl Index {
    pub fn key_state(&self, key: &str) -> Option<KeyState> {
        self.keys.get(key).map(|s| s.clone())
    }

    /// The interned group name, so that every record of a group shares one allocation.
    pub fn intern_group(&self, group: &str) -> Option<Arc<str>> {
        self.groups.get(group).map(|r| r.key().clone())
    }

    /// The interned key, when the key is known.
    pub fn intern_key(&self, key: &str) -> Option<Arc<str>> {
        self.keys.get(key).map(|r| r.key().clone())
    }

    pub fn get(&self, key: &str) -> Option<Entry> {
        let group = {
            let state = self.keys.get(key)?;
            if !state.live {
                return None;
            }
            state.group.clone()
        };
        let groups = self.groups.get(&group)?;
        let (key, slot) = groups.get_key_value(key)?;
        Some(entry(key, &group, slot))
    }

    pub fn list(&self, group: &str, filter: Filter) -> Vec<Entry> {
        let Some(records) = self.groups.get(group) else {
            return Vec::new();
        };
        let (group, records) = records.pair();
        records
            .iter()
            .filter(|(_, slot)| filter == Filter::All || slot.routable)
            .map(|(key, slot)| entry(key, group, slot))
            .collect()
    }

    /// Every live record of one group, or of all groups.
    pub fn snapshot(&self, group: Option<&str>) -> Vec<Entry> {
        match group {
            Some(group) => self.list(group, Filter::All),
            None => {
                let mut out = Vec::with_capacity(self.keys.len());
                for records in self.groups.iter() {
                    let (group, records) = records.pair();
                    out.extend(records.iter().map(|(key, slot)| entry(key, group, slot)));
                }
                out
            }
        }
    }

    /// Keys of one group (or all groups) whose last change has a revision above `after`,
    /// with that state, oldest first. Deleted keys come back with `live == false`.
    pub fn changed_since(&self, after: u64, group: Option<&str>) -> Vec<(Arc<str>, KeyState)> {
        let mut out: Vec<(Arc<str>, KeyState)> = self
            .keys
            .iter()
            .filter(|s| s.rev > after && group.is_none_or(|g| *s.group == *g))
            .map(|s| (s.key().clone(), s.value().clone()))
            .collect();
        out.sort_by_key(|(_, s)| s.rev);
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

    /// Install a new state for `key`. Called by the writer thread only, after commit.
    pub fn install(
        &self,
        key: Arc<str>,
        group: Arc<str>,
        body: Option<(Arc<[u8]>, bool)>,
        version: Version,
        rev: u64,
    ) {
        let previous = self.keys.insert(
            key.clone(),
            KeyState {
                group: group.clone(),
                version,
                rev,
                live: body.is_some(),
            },
        );
        if let Some(prev) = previous.filter(|p| p.live && p.group != group) {
            self.remove_from_group(&prev.group, &key);
        }
        match body {
            Some((value, routable)) => {
                let slot = Slot {
                    value,
                    version,
                    routable,
                    rev,
                };
                self.groups.entry(group).or_default().insert(key, slot);
            }
            None => self.remove_from_group(&group, &key),
        }
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

fn entry(key: &Arc<str>, group: &Arc<str>, slot: &Slot) -> Entry {
    Entry {
        key: key.clone(),
        group: group.clone(),
        value: slot.value.clone(),
        version: slot.version,
        routable: slot.routable,
        rev: slot.rev,
    }
}
