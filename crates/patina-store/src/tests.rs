//! Unit and property tests of the store: merge laws, durability across reopen, group commit,
//! all-or-nothing requests, and watch cursors.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

/// Fixed seed for the tests that shuffle: failures replay.
const SEED: u64 = 0x05ee_d0f9_a71a;

fn opts() -> StoreOptions {
    StoreOptions::default()
}

fn small_log(n: usize) -> StoreOptions {
    StoreOptions {
        watch_log_capacity: NonZeroUsize::new(n).unwrap(),
        ..StoreOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn put(key: &str, group: &str, value: &str, routable: bool) -> LocalWrite {
    LocalWrite::Put {
        key: key.into(),
        group: group.into(),
        value: value.as_bytes().to_vec(),
        routable,
    }
}

fn del(key: &str) -> LocalWrite {
    LocalWrite::Delete { key: key.into() }
}

fn version(hlc: u64, origin: u64, seq: u64) -> Version {
    Version {
        hlc: Hlc(hlc),
        origin: NodeId(origin),
        seq,
    }
}

/// A record whose content is a function of its version, as it is for a correct origin: one
/// origin never issues one version twice.
fn remote_v(key: &str, v: Version) -> Record {
    remote(key, v, (v.hlc.0 + v.seq).is_multiple_of(3))
}

fn remote(key: &str, v: Version, tombstone: bool) -> Record {
    Record {
        key: Arc::from(key),
        group: Arc::from("app"),
        body: (!tombstone).then(|| {
            let value = format!("{}/{}/{}", v.hlc.0, v.origin.0, v.seq);
            (Arc::from(value.as_bytes()), v.seq.is_multiple_of(2))
        }),
        version: v,
    }
}

fn merge(a: Option<Record>, b: Record) -> Option<Record> {
    match a {
        Some(a) if !supersedes(&b.version, Some(&a.version)) => Some(a),
        _ => Some(b),
    }
}

fn arb_version() -> impl Strategy<Value = Version> {
    // Small ranges so that ties on hlc (and on hlc and origin) are common.
    (0u64..6, 1u64..4, 1u64..4).prop_map(|(h, o, s)| version(h, o, s))
}

fn arb_records() -> impl Strategy<Value = Vec<Record>> {
    prop::collection::vec(
        (0usize..4, arb_version()).prop_map(|(k, v)| remote_v(&format!("k{k}"), v)),
        1..24,
    )
}

proptest! {
    #[test]
    fn merge_is_commutative(a in arb_version(), b in arb_version()) {
        let (a, b) = (remote_v("k", a), remote_v("k", b));
        prop_assert_eq!(merge(merge(None, a.clone()), b.clone()), merge(merge(None, b), a));
    }

    #[test]
    fn merge_is_associative(a in arb_version(), b in arb_version(), c in arb_version()) {
        let (a, b, c) = (remote_v("k", a), remote_v("k", b), remote_v("k", c));
        let left = merge(merge(merge(None, a.clone()), b.clone()), c.clone());
        let bc = merge(merge(None, b), c).unwrap();
        let right = merge(merge(None, a), bc);
        prop_assert_eq!(left, right);
    }

    #[test]
    fn merge_is_idempotent(a in arb_version()) {
        let a = remote_v("k", a);
        let once = merge(None, a.clone());
        prop_assert_eq!(merge(once.clone(), a), once);
    }

    #[test]
    fn any_delivery_order_converges_to_the_highest_version(
        records in arb_records(),
        perm in any::<prop::sample::Index>(),
    ) {
        let mut shuffled = records.clone();
        // A deterministic permutation chosen by proptest.
        let n = shuffled.len();
        shuffled.rotate_left(perm.index(n));
        shuffled.reverse();
        let fold = |rs: &[Record]| {
            let mut state: BTreeMap<Arc<str>, Record> = BTreeMap::new();
            for r in rs {
                let merged = merge(state.remove(&r.key), r.clone()).unwrap();
                state.insert(r.key.clone(), merged);
            }
            state
        };
        let a = fold(&records);
        let b = fold(&shuffled);
        prop_assert_eq!(&a, &b);
        for (key, rec) in &a {
            let max = records.iter().filter(|r| &r.key == key).map(|r| r.version).max();
            prop_assert_eq!(Some(rec.version), max);
        }
    }
}

proptest! {
    // Each case opens real SQLite stores with fsync: keep the count modest.
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn real_stores_converge_whatever_the_order_and_batching(
        records in arb_records(),
        split in 0usize..24,
    ) {
        let rt = rt();
        let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (Store::open(da.path(), opts()).unwrap(), Store::open(db.path(), opts()).unwrap());
        let mut reversed = records.clone();
        reversed.reverse();
        let split = split.min(reversed.len());
        rt.block_on(async {
            a.apply(records.clone()).await.unwrap();
            b.apply(reversed[..split].to_vec()).await.unwrap();
            b.apply(reversed[split..].to_vec()).await.unwrap();
            // Applying everything again changes nothing.
            prop_assert_eq!(b.apply(records.clone()).await.unwrap(), 0);
            Ok(())
        })?;
        let keys: HashSet<Arc<str>> = records.iter().map(|r| r.key.clone()).collect();
        for key in keys {
            prop_assert_eq!(a.record(&key), b.record(&key));
            let max = records.iter().filter(|r| r.key == key).max_by_key(|r| r.version).unwrap();
            prop_assert_eq!(a.record(&key).unwrap(), max.clone());
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
    assert_eq!(store.get("m1").unwrap().value(), Some(&b"a"[..]));
    assert!(store.get("m1").unwrap().routable());
    assert!(!store.get("m2").unwrap().routable());
    assert!(store.get("m3").is_none(), "tombstone survives");
    assert!(store.record("m3").unwrap().body.is_none());
    let mut web: Vec<String> = store
        .list("web", Filter::All)
        .into_iter()
        .map(|e| e.key().to_owned())
        .collect();
    web.sort();
    assert_eq!(web, vec!["m1", "m2"]);
    assert_eq!(store.list("web", Filter::RoutableOnly).len(), 1);
    let next = rt
        .block_on(store.write(vec![put("m4", "web", "d", true)]))
        .unwrap()[0];
    assert_eq!(next.seq, last.seq + 1);
    assert!(next.hlc > last.hlc);
    assert_eq!(store.stats().revision, rev + 1);
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
    assert_eq!(store.stats(), before);
    assert!(store.get("m2").is_none());
    // The sequence did not move for the rejected requests.
    let v = rt
        .block_on(store.write(vec![put("m2", "web", "b", true)]))
        .unwrap();
    assert_eq!(v[0].seq, 2);
    // A key can be deleted and then reused in another group.
    rt.block_on(store.write(vec![del("m1"), put("m1", "db", "x", true)]))
        .unwrap();
    assert_eq!(store.get("m1").unwrap().group(), "db");
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
    let seqs: HashSet<u64> = acked.iter().map(|(_, v)| v.seq).collect();
    assert_eq!(seqs.len(), 640, "every write has its own sequence number");
    assert_eq!(*seqs.iter().max().unwrap(), 640, "and none is skipped");
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    for (key, v) in &acked {
        let e = store.get(key).unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(e.version(), *v);
    }
}

fn next(rt: &tokio::runtime::Runtime, cursor: &mut Cursor) -> WatchItem {
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), cursor.next())
            .await
            .expect("watch item within 5 s")
            .expect("store open")
    })
}

fn delta_keys(item: &WatchItem) -> (Vec<(String, bool)>, Option<ResumeToken>) {
    match item {
        WatchItem::Delta { changes, token } => (
            changes
                .iter()
                .map(|c| (c.entry.key().to_string(), c.entry.is_live()))
                .collect(),
            *token,
        ),
        other => panic!("expected a delta, got {other:?}"),
    }
}

#[test]
fn watch_gives_a_snapshot_then_deltas_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![
        put("a1", "web", "1", true),
        put("b1", "db", "1", true),
    ]))
    .unwrap();
    let mut cursor = store.watch(Some(Arc::from("web")), None, 100);
    let WatchItem::Snapshot {
        reset: true,
        entries,
    } = next(&rt, &mut cursor)
    else {
        panic!("expected a snapshot")
    };
    assert_eq!(entries.len(), 1);
    let WatchItem::SnapshotDone { token } = next(&rt, &mut cursor) else {
        panic!("expected the end of the snapshot")
    };
    rt.block_on(store.write(vec![put("a2", "web", "2", true)]))
        .unwrap();
    rt.block_on(store.write(vec![put("b2", "db", "2", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("a1")])).unwrap();
    let (keys, _) = delta_keys(&next(&rt, &mut cursor));
    assert_eq!(keys, vec![("a2".into(), true), ("a1".into(), false)]);
    drop(cursor);

    // Resuming from the snapshot's token gives exactly what came after it, no reset.
    let mut resumed = store.watch(Some(Arc::from("web")), Some(token), 100);
    let (keys, last) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(keys, vec![("a2".into(), true), ("a1".into(), false)]);
    // And from the newest token: nothing until the next change.
    let mut caught_up = store.watch(Some(Arc::from("web")), last, 100);
    rt.block_on(store.write(vec![put("a3", "web", "3", true)]))
        .unwrap();
    let (keys, _) = delta_keys(&next(&rt, &mut caught_up));
    assert_eq!(keys, vec![("a3".into(), true)]);

    // A token of another store gets a reset and a snapshot.
    let foreign = ResumeToken {
        store: NodeId(store.node().0 ^ 1),
        rev: 1,
    };
    let mut reset = store.watch(Some(Arc::from("web")), Some(foreign), 100);
    assert!(matches!(
        next(&rt, &mut reset),
        WatchItem::Snapshot { reset: true, .. }
    ));
    let token: ResumeToken = token.to_string().parse().unwrap();
    assert_eq!(token.store, store.node());
    assert!("garbage".parse::<ResumeToken>().is_err());
}

#[test]
fn a_token_older_than_the_log_gets_a_reset_and_a_slow_cursor_catches_up_coalesced() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    let mut slow = store.watch(None, None, 100);
    assert!(matches!(
        next(&rt, &mut slow),
        WatchItem::Snapshot { reset: true, .. }
    ));
    let WatchItem::SnapshotDone { token: old } = next(&rt, &mut slow) else {
        panic!()
    };
    for i in 0..10 {
        rt.block_on(store.write(vec![put("hot", "web", &i.to_string(), true)]))
            .unwrap();
        rt.block_on(store.write(vec![put(&format!("m{i}"), "web", "x", true)]))
            .unwrap();
    }
    rt.block_on(store.write(vec![del("m0")])).unwrap();
    // The slow cursor fell behind the 4-entry log: it gets one change per key, no reset.
    let (keys, token) = delta_keys(&next(&rt, &mut slow));
    assert!(token.is_some());
    let mut names: Vec<_> = keys.iter().map(|(k, _)| k.clone()).collect();
    names.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    expected.push("hot".into());
    expected.sort();
    assert_eq!(names, expected);
    assert!(keys.contains(&("m0".into(), false)));
    // A resume token from before the floor is refused with a reset.
    let mut resumed = store.watch(None, Some(old), 100);
    assert!(matches!(
        next(&rt, &mut resumed),
        WatchItem::Snapshot { reset: true, .. }
    ));
    // The log survives a restart: a recent token still resumes without a reset.
    let recent = token.unwrap();
    store.close();
    drop((slow, resumed, store));
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    rt.block_on(store.write(vec![put("after", "web", "y", true)]))
        .unwrap();
    let mut again = store.watch(None, Some(recent), 100);
    let (keys, _) = delta_keys(&next(&rt, &mut again));
    assert_eq!(keys, vec![("after".into(), true)]);
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
            remote_v(
                &format!("k{}", i % 7),
                version(i * 7919 % 101, 1 + i % 3, i),
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
    rt.block_on(store.apply(records.clone())).unwrap();
    for k in 0..7 {
        let key = format!("k{k}");
        let max = records
            .iter()
            .filter(|r| *r.key == *key)
            .max_by_key(|r| r.version)
            .unwrap();
        assert_eq!(store.record(&key).unwrap(), *max);
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
    rt.block_on(store.apply(vec![older])).unwrap();
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
fn a_scoped_watch_sees_a_key_leave_its_group_live_after_restart_and_when_behind() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), small_log(8)).unwrap();
    rt.block_on(store.write(vec![put("m1", "web", "1", true)]))
        .unwrap();
    let mut live = store.watch(Some(Arc::from("web")), None, 100);
    assert!(matches!(
        next(&rt, &mut live),
        WatchItem::Snapshot { reset: true, .. }
    ));
    let WatchItem::SnapshotDone { token } = next(&rt, &mut live) else {
        panic!()
    };
    // Delete, then reuse the id in another app: the tombstone row is superseded.
    rt.block_on(store.write(vec![del("m1")])).unwrap();
    rt.block_on(store.write(vec![put("m1", "db", "2", true)]))
        .unwrap();
    let (keys, _) = delta_keys(&next(&rt, &mut live));
    assert_eq!(keys, vec![("m1".into(), false)], "live: m1 left web");
    drop(live);

    // After a restart the log is rebuilt without the tombstone: still a deletion for web.
    store.close();
    drop(store);
    let store = Store::open(dir.path(), small_log(8)).unwrap();
    let mut resumed = store.watch(Some(Arc::from("web")), Some(token), 100);
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(
        keys,
        vec![("m1".into(), false)],
        "resumed after restart: m1 left web"
    );

    // A scoped cursor left behind by the log starts over with a reset snapshot.
    rt.block_on(store.write(vec![put("w1", "web", "x", true)]))
        .unwrap();
    for i in 0..20 {
        rt.block_on(store.write(vec![put(&format!("d{i}"), "db", "y", true)]))
            .unwrap();
    }
    let WatchItem::Snapshot {
        reset: true,
        entries,
    } = next(&rt, &mut resumed)
    else {
        panic!("expected a reset snapshot")
    };
    let keys: Vec<&str> = entries.iter().map(Entry::key).collect();
    assert_eq!(keys, vec!["w1"]);
}

#[test]
fn a_cursor_ends_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    let mut cursor = store.watch(None, None, 100);
    assert!(matches!(next(&rt, &mut cursor), WatchItem::Snapshot { .. }));
    assert!(matches!(
        next(&rt, &mut cursor),
        WatchItem::SnapshotDone { .. }
    ));
    store.close();
    let end = rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), cursor.next()).await
    });
    assert_eq!(end, Ok(None));
}

#[test]
fn remote_timestamps_far_ahead_of_the_wall_clock_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    let future = remote_v("k", version(u64::MAX - 1, 1, 1));
    assert_eq!(rt.block_on(store.apply(vec![future])).unwrap(), 0);
    assert!(store.record("k").is_none());
    // Local writes still get timestamps near the wall clock.
    let v = rt
        .block_on(store.write(vec![put("m", "web", "x", true)]))
        .unwrap()[0];
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(v.hlc.physical_ms().abs_diff(now_ms) < 60_000);
}
