//! [`LeanKeys`]: the compact key index of a lean store (meant for the global tier, where a
//! key is one app's summary in one region and there are millions of them). Per key it holds a
//! 64-bit hash of the key and the revision of the key's stored row, and whether that row is
//! live: 16 bytes a slot and a control byte, in a hash table at most 7/8 full whose bucket count
//! is a power of two, so 19-39 bytes a key (about 28 at 10M keys; while the table grows, the
//! old and the new table are held at once). Keys, groups, values and versions stay in SQLite,
//! read by revision (the table's rowid) when needed.
//!
//! Two keys may share a hash. Nothing is guessed: a key whose hash another key holds goes to a
//! small exact map. The writer knows which revision a key had (it read that row to merge), so
//! an install says which row it replaces; an install at open, when rows come in revision
//! order, reads the key of the row that holds the hash. The hash's key is drawn at random per
//! process, so that nobody can make keys collide on purpose (the index is rebuilt at each
//! open, so it need not be stable).
//!
//! How a lean store ([`crate::StoreOptions::lean`]) uses it, site by site:
//! - merge: `current(key)` reads the row at the revision `rev_of` gives (the writer's own
//!   connection, `sqlite::row_at`), and the group installs with the revision it read.
//! - open: `load_index` reads `key, rev, value IS NULL` only and calls `load`;
//!   `recent_changes` reads whole rows.
//! - watch: snapshots and catch-ups read whole rows by revision instead of taking records
//!   from the index (a row still there is the key's current state in that read); scoped
//!   watches walk the same scan with the group filter.
//! - readers: `Store::read_live` takes a `candidate` revision and reads its row on a pooled
//!   connection on a blocking thread (another key's row: absent; a row gone: superseded,
//!   ask again); `Store::read_owned_by`, liveness changes, origin moves and tombstone
//!   collection query the rows (`(origin, seq)` index, or a scan for tombstones).
//! - a kind keeps some keys out of it (`Kind::lean_key`): the global tier's bridge records and
//!   certificates stay whole in memory, read by key on hot paths.
//!
//! Not lean: a scoped watch's snapshot walks every row (there is no group index; nothing on
//! the global tier opens one: `WatchApps` watches the whole store), and listings by group
//! (`Store::list`, `list_page`) return no lean key. Stores in memory (`Store::in_memory`,
//! the simulations) ignore `lean`; the debug assertions that `get_live`, `get_latest` and
//! `owned_by` are not asked for lean keys hold in lean stores on disk, which the integration
//! tests' agents (debug builds) run.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

/// The key hash is already uniform: the table uses it as is.
#[derive(Default)]
struct Identity64(u64);

impl Hasher for Identity64 {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else still hashes (slowly) rather than panics.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A slot: the revision shifted left by one, with the live bit below it.
fn pack(rev: u64, live: bool) -> u64 {
    (rev << 1) | u64::from(live)
}

fn unpack(v: u64) -> (u64, bool) {
    (v >> 1, v & 1 == 1)
}

pub(crate) struct LeanKeys {
    hasher: std::collections::hash_map::RandomState,
    by_hash: HashMap<u64, u64, BuildHasherDefault<Identity64>>,
    /// Keys whose hash another key holds in `by_hash`.
    exact: BTreeMap<Box<str>, u64>,
    live: usize,
    /// Tests only: every key hashes alike (every second key then collides).
    #[cfg(test)]
    pub(crate) collide_all: bool,
}

impl Default for LeanKeys {
    fn default() -> Self {
        LeanKeys {
            hasher: std::collections::hash_map::RandomState::new(),
            by_hash: HashMap::default(),
            exact: BTreeMap::new(),
            live: 0,
            #[cfg(test)]
            collide_all: false,
        }
    }
}

impl LeanKeys {
    fn hash(&self, key: &str) -> u64 {
        #[cfg(test)]
        if self.collide_all {
            return 7;
        }
        self.hasher.hash_one(key)
    }

    /// The revision of `key`'s row and whether it is live, if the key has one. `row_key`
    /// reads the key stored at a revision (called at most once, for a hash match). Tests: the
    /// store takes a [`LeanKeys::candidate`] and checks the row it reads itself.
    #[cfg(test)]
    pub fn rev_of(
        &self,
        key: &str,
        row_key: impl FnOnce(u64) -> Option<String>,
    ) -> Option<(u64, bool)> {
        if let Some(v) = self.exact.get(key) {
            return Some(unpack(*v));
        }
        let (rev, live) = unpack(*self.by_hash.get(&self.hash(key))?);
        (row_key(rev).as_deref() == Some(key)).then_some((rev, live))
    }

    /// The revision a reader should look at for `key`, without reading any row: the exact
    /// map's, or the one holding the key's hash (its row may belong to another key, and may be
    /// superseded by the time it is read: the reader checks both).
    pub fn candidate(&self, key: &str) -> Option<(u64, bool)> {
        if let Some(v) = self.exact.get(key) {
            return Some(unpack(*v));
        }
        self.by_hash.get(&self.hash(key)).map(|v| unpack(*v))
    }

    /// Install `key`'s new row (writer, after its commit). `prev`: the revision the key's row
    /// had, as [`LeanKeys::rev_of`] found it (`None`: a new key).
    pub fn install(&mut self, key: &str, rev: u64, live: bool, prev: Option<u64>) {
        let h = self.hash(key);
        let slot = pack(rev, live);
        if let Some(v) = self.exact.get_mut(key) {
            let was_live = unpack(*v).1;
            *v = slot;
            self.count(was_live, live);
            return;
        }
        match self.by_hash.get_mut(&h) {
            None => {
                self.by_hash.insert(h, slot);
                self.count(false, live);
            }
            Some(v) if prev.is_some() && prev == Some(unpack(*v).0) => {
                let was_live = unpack(*v).1;
                *v = slot;
                self.count(was_live, live);
            }
            Some(_) => {
                // Another key holds this hash.
                self.exact.insert(key.into(), slot);
                self.count(false, live);
            }
        }
    }

    /// Install a row read at open, in revision order: returns the revision of an earlier row
    /// of the same key it supersedes (a stale row to delete). `row_key` reads the key at a
    /// revision (called only when the hash is already held).
    pub fn load(
        &mut self,
        key: &str,
        rev: u64,
        live: bool,
        row_key: impl FnOnce(u64) -> Option<String>,
    ) -> Option<u64> {
        if let Some(v) = self.exact.get(key).copied() {
            self.install(key, rev, live, None);
            return Some(unpack(v).0);
        }
        let held = self.by_hash.get(&self.hash(key)).copied();
        match held {
            Some(v) if row_key(unpack(v).0).as_deref() == Some(key) => {
                self.install(key, rev, live, Some(unpack(v).0));
                Some(unpack(v).0)
            }
            _ => {
                self.install(key, rev, live, None);
                None
            }
        }
    }

    /// Forget `key` if its row is still `rev` (a collected tombstone).
    pub fn remove(&mut self, key: &str, rev: u64) {
        if let Some(v) = self.exact.get(key).copied() {
            if unpack(v).0 == rev {
                self.exact.remove(key);
                self.count(unpack(v).1, false);
            }
            return;
        }
        let h = self.hash(key);
        if let Some(v) = self.by_hash.get(&h).copied()
            && unpack(v).0 == rev
        {
            self.by_hash.remove(&h);
            self.count(unpack(v).1, false);
        }
    }

    fn count(&mut self, was_live: bool, live: bool) {
        match (was_live, live) {
            (false, true) => self.live += 1,
            (true, false) => self.live -= 1,
            _ => {}
        }
    }

    /// Keys held (tombstones too).
    pub fn len(&self) -> usize {
        self.by_hash.len() + self.exact.len()
    }

    /// Keys whose row is live.
    pub fn live(&self) -> usize {
        self.live
    }

    /// Heap bytes of the table (its slots and control bytes) and the exact map, roughly
    /// (tests: the size figure above).
    #[cfg(test)]
    pub fn heap_bytes(&self) -> usize {
        self.by_hash.capacity() * 17 + self.exact.keys().map(|k| k.len() + 8 + 48).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap as Rows;

    /// A store's rows by revision, as SQLite would hold them.
    fn reader(rows: &Rows<u64, String>) -> impl Fn(u64) -> Option<String> + '_ {
        |rev| rows.get(&rev).cloned()
    }

    fn check(keys: &LeanKeys, rows: &Rows<u64, String>, expect: &[(&str, Option<(u64, bool)>)]) {
        for (key, want) in expect {
            assert_eq!(keys.rev_of(key, reader(rows)), *want, "{key}");
        }
    }

    fn scenario(collide_all: bool) {
        let mut keys = LeanKeys {
            collide_all,
            ..LeanKeys::default()
        };
        let mut rows: Rows<u64, String> = Rows::new();
        // Three new keys.
        for (rev, key) in [(1, "a/x"), (2, "b/x"), (3, "c/x")] {
            let prev = keys.rev_of(key, reader(&rows)).map(|(r, _)| r);
            assert_eq!(prev, None);
            rows.insert(rev, key.to_string());
            keys.install(key, rev, true, prev);
        }
        check(
            &keys,
            &rows,
            &[
                ("a/x", Some((1, true))),
                ("b/x", Some((2, true))),
                ("c/x", Some((3, true))),
                ("d/x", None),
            ],
        );
        assert_eq!((keys.len(), keys.live()), (3, 3));
        // b/x deleted (a tombstone replaces its row), a/x updated.
        for (rev, key, live) in [(4, "b/x", false), (5, "a/x", true)] {
            let prev = keys.rev_of(key, reader(&rows)).map(|(r, _)| r);
            assert!(prev.is_some());
            rows.remove(&prev.unwrap());
            rows.insert(rev, key.to_string());
            keys.install(key, rev, live, prev);
        }
        check(
            &keys,
            &rows,
            &[
                ("a/x", Some((5, true))),
                ("b/x", Some((4, false))),
                ("c/x", Some((3, true))),
            ],
        );
        assert_eq!((keys.len(), keys.live()), (3, 2));
        // The tombstone collected; a stale removal changes nothing.
        keys.remove("b/x", 3);
        keys.remove("b/x", 4);
        rows.remove(&4);
        check(&keys, &rows, &[("b/x", None), ("a/x", Some((5, true)))]);
        assert_eq!((keys.len(), keys.live()), (2, 2));
        // Rebuilt at open from the rows in revision order, with a stale duplicate row left
        // behind by an older version: found, and the index is the same.
        rows.insert(0, "c/x".to_string());
        let mut open = LeanKeys {
            collide_all,
            ..LeanKeys::default()
        };
        let mut revs: Vec<u64> = rows.keys().copied().collect();
        revs.sort_unstable();
        let mut stale = Vec::new();
        for rev in revs {
            let key = rows[&rev].clone();
            if let Some(old) = open.load(&key, rev, true, reader(&rows)) {
                stale.push(old);
            }
        }
        assert_eq!(stale, vec![0]);
        check(
            &open,
            &rows,
            &[
                ("a/x", Some((5, true))),
                ("c/x", Some((3, true))),
                ("b/x", None),
            ],
        );
    }

    #[test]
    fn keys_map_to_their_rows_through_updates_deletions_collection_and_reopening() {
        scenario(false);
    }

    #[test]
    fn keys_that_share_a_hash_are_told_apart_by_their_rows() {
        scenario(true);
    }

    #[test]
    fn a_slot_costs_about_seventeen_bytes() {
        let mut keys = LeanKeys::default();
        for i in 0..100_000u64 {
            keys.install(&format!("app-{i}/region"), i + 1, true, None);
        }
        let per_key = keys.heap_bytes() as f64 / keys.len() as f64;
        assert!(per_key < 40.0, "{per_key} bytes a key");
        assert_eq!(keys.len(), 100_000);
    }
}
