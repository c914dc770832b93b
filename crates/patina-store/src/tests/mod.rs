//! Unit and property tests of the store: merge laws through the store's own `apply`,
//! durability across reopen, group commit, all-or-nothing requests. Watch cursors, the
//! replication surface (outcomes, knowledge, range reads, identity), the liveness overlay and
//! the failure paths have their own files.

mod collect;
mod failure;
mod lean;
mod overlay;
mod replication;
mod watch;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// Fixed seed for the tests that shuffle: failures replay.
const SEED: u64 = 0x05ee_d0f9_a71a;

pub(crate) fn opts() -> StoreOptions {
    StoreOptions::default()
}

pub(crate) fn small_log(n: usize) -> StoreOptions {
    StoreOptions {
        watch_log_capacity: NonZeroUsize::new(n).unwrap(),
        ..StoreOptions::default()
    }
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A local put. With `OpaqueKind`, a value is routable when it starts with '+'.
pub(crate) fn put(key: &str, group: &str, value: &str, routable: bool) -> LocalWrite {
    LocalWrite::Put {
        key: key.into(),
        group: group.into(),
        value: format!("{}{value}", if routable { "+" } else { "" }).into_bytes(),
    }
}

pub(crate) fn del(key: &str) -> LocalWrite {
    LocalWrite::Delete { key: key.into() }
}

pub(crate) fn version(hlc: u64, origin: u64, seq: u64) -> Version {
    Version {
        hlc: Hlc(hlc),
        origin: NodeId(origin),
        seq,
    }
}

/// A record from a peer whose content is a function of its version, as it is for a correct
/// origin: one origin never issues one version twice.
pub(crate) fn remote(key: &str, v: Version, tombstone: bool) -> Record {
    Record {
        key: Arc::from(key),
        group: Arc::from("app"),
        value: (!tombstone).then(|| {
            let routable = if v.seq.is_multiple_of(2) { "+" } else { "" };
            Arc::from(format!("{routable}{}/{}/{}", v.hlc.0, v.origin.0, v.seq).as_bytes())
        }),
        version: v,
    }
}

pub(crate) fn records(rs: Vec<Record>) -> RemoteBatch {
    RemoteBatch {
        records: rs,
        covered: Vec::new(),
    }
}

/// Writes of a few origins, each origin's numbered 1, 2, 3, ... with timestamps that never
/// go back, over a few keys: ties on timestamps across origins are common.
fn arb_history() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec((1u64..4, 0usize..4, 0u64..3, any::<bool>()), 1..32).prop_map(|events| {
        let mut seq: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
        events
            .into_iter()
            .map(|(origin, key, step, tombstone)| {
                let (s, hlc) = seq.entry(origin).or_insert((0, 0));
                *s += 1;
                *hlc += step;
                remote(&format!("k{key}"), version(*hlc, origin, *s), tombstone)
            })
            .collect()
    })
}

/// What every replica must end with: per key, the record with the highest version.
fn expected(history: &[Record]) -> BTreeMap<Arc<str>, Record> {
    let mut out: BTreeMap<Arc<str>, Record> = BTreeMap::new();
    for r in history {
        let keep = out.get(&r.key).is_some_and(|cur| cur.version > r.version);
        if !keep {
            out.insert(r.key.clone(), r.clone());
        }
    }
    out
}

fn mem_store(node: u64) -> Store {
    Store::in_memory(NodeId(node), node, opts())
}

/// Every key's latest record and the digest: what two converged replicas agree on.
fn replica_state(
    store: &Store,
    keys: &HashSet<Arc<str>>,
) -> (BTreeMap<Arc<str>, Option<Record>>, Digest) {
    let records = keys
        .iter()
        .map(|k| (k.clone(), store.get_latest(k)))
        .collect();
    let mut digest = store.digest();
    digest.remove(&store.node());
    (records, digest)
}

/// Feed `history` to a store in `order`, cut into batches at `cuts`, repeating the records
/// listed in `dups`; returns the store.
fn replay(node: u64, history: &[Record], order: &[usize], cuts: &[usize], dups: &[usize]) -> Store {
    let store = mem_store(node);
    let mut delivery: Vec<Record> = order.iter().map(|&i| history[i].clone()).collect();
    for &d in dups {
        let r = delivery[d % delivery.len()].clone();
        delivery.insert((d * 7) % (delivery.len() + 1), r);
    }
    let rt = rt();
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (delivery.len() + 1)).collect();
    cuts.push(delivery.len());
    cuts.sort_unstable();
    for cut in cuts {
        if cut > start {
            rt.block_on(store.apply(records(delivery[start..cut].to_vec())))
                .unwrap();
            start = cut;
        }
    }
    store
}

proptest! {
    // In-memory stores run the store's own merge and knowledge code: many cases are cheap.
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any permutation, duplication and batching of one history ends in the same state on
    /// every replica: the highest version of each key, and the same knowledge. This is the
    /// merge being commutative, associative and idempotent, through `apply`.
    #[test]
    fn any_order_duplication_and_batching_converges(
        (history, order) in arb_history().prop_flat_map(|h| {
            let n = h.len();
            (Just(h), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
        cuts in prop::collection::vec(0usize..40, 0..6),
        dups in prop::collection::vec(0usize..40, 0..6),
    ) {
        let keys: HashSet<Arc<str>> = history.iter().map(|r| r.key.clone()).collect();
        let in_order: Vec<usize> = (0..history.len()).collect();
        let a = replay(101, &history, &in_order, &[], &[]);
        let b = replay(102, &history, &order, &cuts, &dups);
        prop_assert_eq!(replica_state(&a, &keys), replica_state(&b, &keys));
        for (key, want) in expected(&history) {
            prop_assert_eq!(a.get_latest(&key), Some(want));
        }
        // Every sequence number of every origin is known, with no gap left.
        for (origin, k) in replica_state(&b, &keys).1 {
            let issued = history.iter().filter(|r| r.version.origin == origin).count() as u64;
            prop_assert_eq!((k.head(), k.gap_count()), (issued, 0));
        }
        // Applying everything again changes nothing.
        let again = rt().block_on(b.apply(records(history.clone()))).unwrap();
        prop_assert_eq!(again.applied(), 0);
        prop_assert!(again.records.iter().all(|o| *o == ApplyOutcome::Covered));
    }
}

proptest! {
    // Each case opens real SQLite stores with fsync: keep the count modest.
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn real_stores_converge_whatever_the_order_and_batching(
        (history, order) in arb_history().prop_flat_map(|h| {
            let n = h.len();
            (Just(h), Just((0..n).collect::<Vec<_>>()).prop_shuffle())
        }),
        split in 0usize..32,
    ) {
        let rt = rt();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (Store::open(da.path(), opts()).unwrap(), Store::open(db.path(), opts()).unwrap());
        let shuffled: Vec<Record> = order.iter().map(|&i| history[i].clone()).collect();
        let split = split.min(shuffled.len());
        rt.block_on(async {
            a.apply(records(history.clone())).await.unwrap();
            b.apply(records(shuffled[..split].to_vec())).await.unwrap();
            b.apply(records(shuffled[split..].to_vec())).await.unwrap();
            prop_assert_eq!(b.apply(records(history.clone())).await.unwrap().applied(), 0);
            Ok(())
        })?;
        let keys: HashSet<Arc<str>> = history.iter().map(|r| r.key.clone()).collect();
        prop_assert_eq!(replica_state(&a, &keys), replica_state(&b, &keys));
        for (key, want) in expected(&history) {
            prop_assert_eq!(a.get_latest(&key), Some(want));
        }
        a.close();
        b.close();
    }
}

#[test]
fn hlc_never_goes_backwards_when_the_wall_clock_does() {
    let mut clock = HlcClock::default();
    let a = clock.tick(1_000);
    let b = clock.tick(900);
    let c = clock.tick(900);
    assert!(a < b && b < c);
    assert_eq!(a.physical_ms(), 1_000);
    clock.observe(Hlc::from_physical_ms(5_000));
    assert!(clock.tick(1_000) > Hlc::from_physical_ms(5_000));
}

#[test]
fn acknowledged_writes_and_counters_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (node, last, rev) = {
        let store = Store::open(dir.path(), opts()).unwrap();
        let v1 = rt
            .block_on(store.write(vec![put("m1", "web", "a", true)]))
            .unwrap();
        let v2 = rt
            .block_on(store.write(vec![
                put("m2", "web", "b", false),
                put("m3", "db", "c", true),
            ]))
            .unwrap();
        let v3 = rt.block_on(store.write(vec![del("m3")])).unwrap();
        assert_eq!(v1[0].seq, 1);
        assert_eq!([v2[0].seq, v2[1].seq, v3[0].seq], [2, 3, 4]);
        assert!(v1[0].hlc < v2[0].hlc && v2[1].hlc < v3[0].hlc);
        let rev = store.stats().revision;
        store.close();
        (store.node(), v3[0], rev)
    };
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(
        store.node(),
        node,
        "identity is kept with the data directory"
    );
    assert_eq!(store.stats().revision, rev);
    assert_eq!(store.get_live("m1").unwrap().value(), Some(&b"+a"[..]));
    assert!(store.get_live("m1").unwrap().routable());
    assert!(!store.get_live("m2").unwrap().routable());
    assert!(store.get_live("m3").is_none(), "tombstone survives");
    assert!(store.get_latest("m3").unwrap().value.is_none());
    let web: Vec<String> = store
        .list("web", Filter::All)
        .into_iter()
        .map(|e| e.key().to_owned())
        .collect();
    assert_eq!(web, vec!["m1", "m2"], "listed in key order");
    assert_eq!(store.list("web", Filter::RoutableOnly).len(), 1);
    let next = rt
        .block_on(store.write(vec![put("m4", "web", "d", true)]))
        .unwrap()[0];
    assert_eq!(next.seq, last.seq + 1);
    assert!(next.hlc > last.hlc);
    assert_eq!(store.stats().revision, rev + 1);
}

#[test]
fn an_idle_writer_checkpoints_and_starts_the_wal_over_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    // One write at a time, so the writer idles after each: past the idle threshold (a few
    // frames per 3 KiB record), it checkpoints between two of them.
    let value = "x".repeat(3000);
    let writes = sqlite::CHECKPOINT_IDLE_FRAMES as usize / 2;
    for i in 0..writes {
        rt.block_on(store.write(vec![put(&format!("m{i}"), "web", &value, true)]))
            .unwrap();
    }
    let restarts: i64 = rusqlite::Connection::open_with_flags(
        dir.path().join(DB_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap()
    .query_row(
        "SELECT value FROM meta WHERE name = 'wal_restarts'",
        [],
        |r| r.get(0),
    )
    .unwrap();
    assert!(restarts >= 1, "the writer started the WAL over");
    store.close();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.stats().live, writes);
    assert_eq!(store.stats().revision, writes as u64);
}

#[test]
fn a_second_process_cannot_open_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path(), opts()).unwrap();
    match Store::open(dir.path(), opts()) {
        Err(StoreError::Locked(_)) => {}
        Err(other) => panic!("expected Locked, got {other}"),
        Ok(_) => panic!("expected Locked, got a second store"),
    }
}

#[test]
fn a_failing_op_rejects_its_whole_request_and_nothing_changes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("m1", "web", "a", true)]))
        .unwrap();
    let before = store.stats();
    let err = rt
        .block_on(store.write(vec![put("m2", "web", "b", true), del("nope")]))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound(ref k) if &**k == "nope"),
        "{err}"
    );
    let err = rt
        .block_on(store.write(vec![put("m1", "db", "a", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::GroupChange { .. }), "{err}");
    let after = store.stats();
    assert_eq!(
        (after.keys, after.live, after.revision),
        (before.keys, before.live, before.revision)
    );
    assert!(store.get_live("m2").is_none());
    // The sequence did not move for the rejected requests.
    let v = rt
        .block_on(store.write(vec![put("m2", "web", "b", true)]))
        .unwrap();
    assert_eq!(v[0].seq, 2);
    // A key can be deleted and then reused in another group.
    rt.block_on(store.write(vec![del("m1"), put("m1", "db", "x", true)]))
        .unwrap();
    assert_eq!(store.get_live("m1").unwrap().group(), "db");
    assert!(
        store
            .list("web", Filter::All)
            .iter()
            .all(|e| e.key() != "m1")
    );
}

#[test]
fn concurrent_writers_share_commits_and_every_ack_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let acked: Vec<(String, Version)> = rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for t in 0..64 {
            let store = store.clone();
            tasks.spawn(async move {
                let mut out = Vec::new();
                for i in 0..10 {
                    let key = format!("m{t}-{i}");
                    let v = store
                        .write(vec![put(&key, "web", &key, true)])
                        .await
                        .unwrap();
                    out.push((key, v[0]));
                }
                out
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.extend(r.unwrap());
        }
        all
    });
    let commits = store.stats().commits;
    assert!(
        commits < 640,
        "64 concurrent writers shared group commits: {commits} commits for 640 writes"
    );
    let seqs: HashSet<u64> = acked.iter().map(|(_, v)| v.seq).collect();
    assert_eq!(seqs.len(), 640, "every write has its own sequence number");
    assert_eq!(*seqs.iter().max().unwrap(), 640, "and none is skipped");
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    for (key, v) in &acked {
        let e = store.get_live(key).unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(e.version(), *v);
    }
}

#[test]
fn a_shuffled_batch_of_remote_records_lands_on_the_highest_versions() {
    // One batch holding many versions of a few keys, in a seeded shuffled order: each key
    // ends at its highest version, tombstone or not.
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    let mut records: Vec<Record> = (0..50u64)
        .map(|i| {
            // Origin 1 + i % 3 issues seq i / 3 + 1: one record per (origin, seq).
            remote(
                &format!("k{}", i % 7),
                version(i * 7919 % 101, 1 + i % 3, i / 3 + 1),
                i % 5 == 0,
            )
        })
        .collect();
    let mut x = SEED;
    for i in (1..records.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        records.swap(i, (x % (i as u64 + 1)) as usize);
    }
    rt.block_on(store.apply(super::tests::records(records.clone())))
        .unwrap();
    for k in 0..7 {
        let key = format!("k{k}");
        let max = records
            .iter()
            .filter(|r| *r.key == *key)
            .max_by_key(|r| r.version)
            .unwrap();
        assert_eq!(store.get_latest(&key).unwrap(), *max);
    }
}

#[test]
fn sqlite_keeps_one_row_per_key_however_often_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    for i in 0..5 {
        rt.block_on(store.write(vec![put("a", "web", &i.to_string(), true)]))
            .unwrap();
    }
    rt.block_on(store.write(vec![put("b", "web", "x", true), put("b", "web", "y", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("b")])).unwrap();
    let older = remote("a", version(1, 1, 1), false);
    rt.block_on(store.apply(records(vec![older]))).unwrap();
    store.close();
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let rows: Vec<(String, bool)> = conn
        .prepare("SELECT key, value IS NULL FROM records ORDER BY key")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows, vec![("a".to_owned(), false), ("b".to_owned(), true)]);
}

#[test]
fn a_page_looks_at_a_bounded_number_of_records_and_says_where_to_go_on() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, opts());
    // 100 machines that a routable-only listing skips, then one it returns.
    let mut ops: Vec<LocalWrite> = (0..100)
        .map(|i| put(&format!("a{i:03}"), "web", "x", false))
        .collect();
    ops.push(put("b", "web", "x", true));
    rt.block_on(store.write(ops)).unwrap();
    let mut after: Option<String> = None;
    let mut found = Vec::new();
    let mut pages = 0;
    loop {
        let (entries, next) =
            store.list_page("web", Filter::RoutableOnly, after.as_deref(), 10, 16);
        assert!(entries.len() <= 10);
        found.extend(entries.iter().map(|e| e.key().to_owned()));
        pages += 1;
        assert!(pages < 20, "paging never ended");
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(found, vec!["b"]);
    assert!(
        pages >= 7,
        "each page looked at no more than 16 records: {pages} pages"
    );
    // Without a filter, full pages.
    let (entries, next) = store.list_page("web", Filter::All, None, 10, 80);
    assert_eq!((entries.len(), next.as_deref()), (10, Some("a009")));
}
