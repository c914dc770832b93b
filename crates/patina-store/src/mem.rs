//! The in-memory backend: the same store, rules and index without SQLite, for simulations
//! of many nodes in one process. Nothing survives the process; commits never fail (unless a
//! failpoint says so).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::feed::LeftGroups;
use crate::knowledge::{OriginKnowledge, SeqRange};
use crate::merge::{Backend, Meta};
use crate::{Entry, Failpoints, NodeId};

/// What SQLite's tables and indexes give readers, kept in memory: the key of the current
/// row of every (origin, seq) and of every revision.
#[derive(Default)]
pub(crate) struct MemRows {
    pub by_origin: BTreeMap<(NodeId, u64), Arc<str>>,
    /// Each row's key and the groups the key had left (as SQLite's `left` column).
    pub by_rev: BTreeMap<u64, (Arc<str>, LeftGroups)>,
}

impl MemRows {
    fn put(&mut self, e: &Entry, previous: Option<&Entry>) {
        let mut left = LeftGroups::default();
        if let Some(p) = previous {
            let v = p.version();
            self.by_origin.remove(&(v.origin, v.seq));
            if let Some((_, was)) = self.by_rev.remove(&p.rev()) {
                left = was;
            }
            if p.group() != e.group() {
                left.push(p.group(), e.rev());
            }
        }
        let key: Arc<str> = Arc::from(e.key());
        let v = e.version();
        self.by_origin.insert((v.origin, v.seq), key.clone());
        self.by_rev.insert(e.rev(), (key, left));
    }

    fn delete(&mut self, e: &Entry) {
        let v = e.version();
        if self
            .by_origin
            .get(&(v.origin, v.seq))
            .is_some_and(|k| &**k == e.key())
        {
            self.by_origin.remove(&(v.origin, v.seq));
        }
        self.by_rev.remove(&e.rev());
    }

    /// Keys of one origin's rows in `range`, highest sequence number first.
    pub fn origin_keys(&self, origin: NodeId, range: SeqRange, limit: usize) -> Vec<Arc<str>> {
        self.by_origin
            .range((origin, range.lo())..=(origin, range.hi()))
            .rev()
            .take(limit)
            .map(|(_, k)| k.clone())
            .collect()
    }

    pub fn keys_by_rev(
        &self,
        after: u64,
        upto: u64,
        limit: usize,
    ) -> Vec<(String, u64, LeftGroups)> {
        if after >= upto {
            return Vec::new();
        }
        self.by_rev
            .range(after + 1..=upto)
            .take(limit)
            .map(|(rev, (k, left))| (k.to_string(), *rev, left.clone()))
            .collect()
    }
}

pub(crate) struct MemBackend {
    pub rows: Arc<Mutex<MemRows>>,
    pub failpoints: Arc<Failpoints>,
    /// Rows written (`Some(previous)` or `None`) and rows deleted, in order.
    staged: Vec<(Entry, Option<Option<Entry>>)>,
}

impl MemBackend {
    pub fn new(rows: Arc<Mutex<MemRows>>, failpoints: Arc<Failpoints>) -> MemBackend {
        MemBackend {
            rows,
            failpoints,
            staged: Vec::new(),
        }
    }
}

impl Backend for MemBackend {
    fn begin(&mut self) -> Result<(), rusqlite::Error> {
        self.staged.clear();
        Ok(())
    }

    fn put_record(
        &mut self,
        entry: &Entry,
        previous: Option<&Entry>,
    ) -> Result<(), rusqlite::Error> {
        self.staged.push((entry.clone(), Some(previous.cloned())));
        Ok(())
    }

    fn holds_origin(&mut self, origin: NodeId) -> Result<bool, rusqlite::Error> {
        let staged = self
            .staged
            .iter()
            .any(|(e, p)| p.is_some() && e.version().origin == origin);
        let rows = self.rows.lock().expect("rows lock");
        let stored = rows
            .by_origin
            .range((origin, 0)..=(origin, u64::MAX))
            .next()
            .is_some();
        Ok(staged || stored)
    }

    fn delete_knowledge(&mut self, _: NodeId) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn put_retired(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn put_former(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn delete_record(&mut self, entry: &Entry) -> Result<(), rusqlite::Error> {
        self.staged.push((entry.clone(), None));
        Ok(())
    }

    fn put_knowledge(&mut self, _: NodeId, _: &OriginKnowledge) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn put_meta(&mut self, _: &Meta, _: &str) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn put_overlay(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }

    fn commit(&mut self) -> Result<(), rusqlite::Error> {
        self.failpoints.check_commit()?;
        let mut rows = self.rows.lock().expect("rows lock");
        for (entry, previous) in self.staged.drain(..) {
            match previous {
                Some(previous) => rows.put(&entry, previous.as_ref()),
                None => rows.delete(&entry),
            }
        }
        Ok(())
    }

    fn rollback(&mut self) {
        self.staged.clear();
    }
}

/// A backend that stores nothing: for changes applied in memory only (the liveness overlay
/// while the disk is full), persisted by a later commit. It reads rows through `reads` (the
/// writer's own backend, whose reads work on a full disk): a lean store's liveness changes
/// read the owner's rows.
pub(crate) struct NullBackend<'a> {
    pub reads: Option<&'a dyn Backend>,
}

impl Backend for NullBackend<'_> {
    fn row_at(&self, rev: u64) -> Result<Option<(crate::sqlite::Row, bool)>, rusqlite::Error> {
        self.reads.map_or(Ok(None), |b| b.row_at(rev))
    }
    fn entries_of_origin(
        &self,
        origin: NodeId,
        kind: &crate::KindRef,
    ) -> Result<Vec<Entry>, rusqlite::Error> {
        self.reads
            .map_or(Ok(Vec::new()), |b| b.entries_of_origin(origin, kind))
    }
    fn begin(&mut self) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn put_record(&mut self, _: &Entry, _: Option<&Entry>) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn put_knowledge(&mut self, _: NodeId, _: &OriginKnowledge) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn put_meta(&mut self, _: &Meta, _: &str) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn delete_record(&mut self, _: &Entry) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn delete_knowledge(&mut self, _: NodeId) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn holds_origin(&mut self, _: NodeId) -> Result<bool, rusqlite::Error> {
        Ok(true)
    }
    fn put_retired(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn put_former(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn put_overlay(&mut self, _: &Meta) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn commit(&mut self) -> Result<(), rusqlite::Error> {
        Ok(())
    }
    fn rollback(&mut self) {}
}
