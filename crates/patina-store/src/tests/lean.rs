//! A lean store (issue 20): writes, overwrites, deletions and merges of peers' records go
//! through the compact index and the rows it points at, and the store holds and reads what a
//! full store holds, across a reopen, also when every key shares a hash.

use super::*;

/// What a store holds, by the rows it would give a peer: key → (value, whether a peer wrote
/// it, its sequence number). Two stores' own origins and clocks differ; the rest must not.
fn rows_of(
    rt: &tokio::runtime::Runtime,
    store: &Store,
) -> BTreeMap<String, (Option<Vec<u8>>, bool, u64)> {
    let mut out = BTreeMap::new();
    for (origin, k) in store.digest() {
        if k.head() == 0 {
            continue;
        }
        let range = SeqRange::new(1, k.head()).unwrap();
        let got = rt
            .block_on(store.read_origin(
                origin,
                range,
                ReadBudget {
                    max_records: 1 << 20,
                    max_bytes: 1 << 30,
                },
            ))
            .unwrap();
        for r in got.records {
            out.insert(
                r.key.to_string(),
                (
                    r.value.map(|v| v.to_vec()),
                    r.version.origin == NodeId(99),
                    r.version.seq,
                ),
            );
        }
    }
    out
}

/// What point reads give for `keys`: each key's latest state (value, version), and the keys
/// each of `owners` holds by [`Store::read_owned_by`].
#[allow(clippy::type_complexity)]
fn point_reads(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    keys: &[String],
    owners: &[NodeId],
) -> (
    Vec<Option<Option<Vec<u8>>>>,
    Vec<Option<Vec<u8>>>,
    Vec<Vec<String>>,
) {
    let latest = keys
        .iter()
        .map(|k| {
            rt.block_on(store.read_latest_entry(k)).unwrap().map(|e| {
                assert_eq!(e.key(), k);
                e.value().map(<[u8]>::to_vec)
            })
        })
        .collect();
    let live = keys
        .iter()
        .map(|k| {
            rt.block_on(store.read_live(k))
                .unwrap()
                .map(|e| e.value().unwrap().to_vec())
        })
        .collect();
    let owned = owners
        .iter()
        .map(|o| {
            let mut keys: Vec<String> = rt
                .block_on(store.read_owned_by(*o))
                .unwrap()
                .iter()
                .map(|e| e.key().to_owned())
                .collect();
            keys.sort();
            keys
        })
        .collect();
    (latest, live, owned)
}

#[test]
fn a_lean_store_holds_what_a_full_store_holds_through_writes_merges_and_reopening() {
    history(false);
}

#[test]
fn a_lean_store_whose_keys_all_share_a_hash_still_holds_and_reads_each_exactly() {
    history(true);
}

fn history(collide: bool) {
    let rt = rt();
    let lean_dir = tempfile::tempdir().unwrap();
    let full_dir = tempfile::tempdir().unwrap();
    let lean_opts = || StoreOptions {
        lean: true,
        ..opts()
    };
    let lean = Store::open(lean_dir.path(), lean_opts()).unwrap();
    if collide {
        lean.lean_collide_all();
    }
    let full = Store::open(full_dir.path(), opts()).unwrap();
    // The same local history into both: new keys, overwrites (a key keeps its group:
    // the store refuses a move), deletions, and a key written twice in one group commit.
    let batches: Vec<Vec<LocalWrite>> = vec![
        (0..50)
            .map(|i| put(&format!("app-{i}/ord"), &format!("app-{i}"), "a", true))
            .collect(),
        (0..50)
            .step_by(3)
            .map(|i| put(&format!("app-{i}/ord"), &format!("app-{i}"), "b", false))
            .collect(),
        vec![
            put("app-1/ord", "app-1", "c", true),
            del("app-2/ord"),
            del("app-5/ord"),
        ],
        vec![put("x/ord", "x", "1", true), put("x/ord", "x", "2", true)],
    ];
    for b in &batches {
        rt.block_on(lean.write(b.clone())).unwrap();
        rt.block_on(full.write(b.clone())).unwrap();
    }
    // A peer's records merge by version: one newer than ours, one older, one new key.
    let peer = |key: &str, value: &str, hlc: u64, seq: u64| Record {
        key: key.into(),
        group: key.split('/').next().unwrap().into(),
        value: Some(value.as_bytes().to_vec().into()),
        version: version(hlc, 99, seq),
    };
    let now = lean.view_hlc().0;
    let batch = RemoteBatch {
        records: vec![
            peer("app-7/ord", "+peer-newer", now + (1 << 20), 1),
            peer("app-8/ord", "+peer-older", 1, 2),
            peer("peer-only/ord", "+p", now, 3),
        ],
        covered: Vec::new(),
    };
    rt.block_on(lean.apply(batch.clone())).unwrap();
    rt.block_on(full.apply(batch)).unwrap();
    let want = rows_of(&rt, &full);
    assert_eq!(rows_of(&rt, &lean), want, "lean and full stores differ");
    assert_eq!(want["app-7/ord"].0.as_deref(), Some(&b"+peer-newer"[..]));
    assert_ne!(want["app-8/ord"].0.as_deref(), Some(&b"+peer-older"[..]));
    assert_eq!(
        (lean.stats().keys, lean.stats().live),
        (full.stats().keys, full.stats().live)
    );
    // Point reads of every key (and of keys never written), and listings by owner.
    let mut keys: Vec<String> = want.keys().cloned().collect();
    keys.extend(["never/ord".to_owned(), "app-99/ord".to_owned()]);
    let owners = [lean.node(), NodeId(99), NodeId(12345)];
    let full_owners = [full.node(), NodeId(99), NodeId(12345)];
    let expected = point_reads(&rt, &full, &keys, &full_owners);
    assert_eq!(point_reads(&rt, &lean, &keys, &owners), expected);
    assert_eq!(
        expected.1.iter().filter(|v| v.is_some()).count(),
        full.stats().live
    );
    assert_eq!(expected.2[1].len(), 2, "the peer's two keys it took");
    // A deleted key: its latest state is a tombstone (no value), and it is not live.
    assert_eq!(
        expected.0[keys.iter().position(|k| k == "app-2/ord").unwrap()],
        Some(None)
    );
    assert!(expected.1[keys.iter().position(|k| k == "app-2/ord").unwrap()].is_none());
    // Reopened, the compact index is rebuilt from the rows; later writes still find them.
    lean.close();
    let lean = Store::open(lean_dir.path(), lean_opts()).unwrap();
    rt.block_on(lean.write(vec![put("app-9/ord", "app-9", "again", true)]))
        .unwrap();
    rt.block_on(full.write(vec![put("app-9/ord", "app-9", "again", true)]))
        .unwrap();
    assert_eq!(rows_of(&rt, &lean), rows_of(&rt, &full));
    assert_eq!(lean.stats().keys, full.stats().keys);
    let full_owners = [full.node(), NodeId(99), NodeId(12345)];
    let owners = [lean.node(), NodeId(99), NodeId(12345)];
    let expected = point_reads(&rt, &full, &keys, &full_owners);
    let got = point_reads(&rt, &lean, &keys, &owners);
    assert_eq!(got, expected, "after reopening");
}

/// Every live record a watch's snapshot gives, by key (chunks of 7).
fn watched(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    scope: Option<&str>,
) -> BTreeMap<String, Vec<u8>> {
    let mut cursor = store.watch(scope.map(Arc::from), None, 7);
    let mut out = BTreeMap::new();
    loop {
        match super::watch::next(rt, &mut cursor) {
            WatchItem::Snapshot { entries, .. } => {
                for e in entries {
                    out.insert(e.key().to_owned(), e.value().unwrap().to_vec());
                }
            }
            WatchItem::SnapshotDone { .. } => return out,
            other => panic!("unexpected {other:?} during a snapshot"),
        }
    }
}

/// A lean store and a full one, each in a directory of its own (kept while the stores are).
fn lean_and_full() -> ((tempfile::TempDir, tempfile::TempDir), Store, Store) {
    let (lean_dir, full_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let lean = Store::open(
        lean_dir.path(),
        StoreOptions {
            lean: true,
            ..opts()
        },
    )
    .unwrap();
    let full = Store::open(full_dir.path(), opts()).unwrap();
    ((lean_dir, full_dir), lean, full)
}

#[test]
fn a_lean_stores_watches_give_the_same_snapshots_as_a_full_stores() {
    let rt = rt();
    let (_dirs, lean, full) = lean_and_full();
    for store in [&lean, &full] {
        let writes: Vec<LocalWrite> = (0..40)
            .map(|i| {
                put(
                    &format!("app-{}/r{i}", i % 4),
                    &format!("app-{}", i % 4),
                    "v",
                    i % 2 == 0,
                )
            })
            .collect();
        rt.block_on(store.write(writes)).unwrap();
        rt.block_on(store.write(vec![del("app-1/r1"), put("app-2/r2", "app-2", "w", true)]))
            .unwrap();
    }
    let all = watched(&rt, &full, None);
    assert_eq!(all.len(), 39);
    assert_eq!(watched(&rt, &lean, None), all);
    let app2 = watched(&rt, &full, Some("app-2"));
    assert_eq!(app2.len(), 10);
    assert_eq!(watched(&rt, &lean, Some("app-2")), app2);
}

#[test]
fn a_lean_stores_liveness_changes_and_tombstone_collection_match_a_full_stores() {
    let rt = rt();
    let (_dirs, lean, full) = lean_and_full();
    let peer = |i: u64| Record {
        key: format!("app-{i}/fra").into(),
        group: format!("app-{i}").into(),
        value: Some(b"+peer".to_vec().into()),
        version: version(1 << 40, 99, i + 1),
    };
    let mut seen = Vec::new();
    for store in [&lean, &full] {
        rt.block_on(
            store.write(
                (0..5)
                    .map(|i| put(&format!("app-{i}/ord"), &format!("app-{i}"), "v", true))
                    .collect(),
            ),
        )
        .unwrap();
        rt.block_on(store.apply(RemoteBatch {
            records: (0..5).map(peer).collect(),
            covered: Vec::new(),
        }))
        .unwrap();
        rt.block_on(store.write(vec![del("app-0/ord"), del("app-1/ord")]))
            .unwrap();
        // A watch that is live, then the peer's owner goes down: its records leave.
        let mut cursor = store.watch(None, None, 100);
        loop {
            if let WatchItem::SnapshotDone { .. } = super::watch::next(&rt, &mut cursor) {
                break;
            }
        }
        rt.block_on(store.set_owner_down(NodeId(99), true)).unwrap();
        let WatchItem::Delta { changes, .. } = super::watch::next(&rt, &mut cursor) else {
            panic!("expected the overlay's delta")
        };
        let mut hidden: Vec<String> = changes
            .iter()
            .filter(|c| !c.entry.is_live())
            .map(|c| c.entry.key().to_owned())
            .collect();
        hidden.sort();
        // Tombstones older than the future are collected, both of them.
        let collected = rt
            .block_on(store.collect_tombstones(u64::MAX >> 20, u64::MAX, 100))
            .unwrap();
        seen.push((hidden, collected, store.stats().keys));
    }
    assert_eq!(seen[0], seen[1], "lean vs full");
    assert_eq!(seen[0].0.len(), 5, "the peer's five records hidden");
    assert_eq!(seen[0].1, 2, "two tombstones collected");
}

/// Opaque records whose keys under `pin/` stay in memory in a lean store.
struct Pinned;

impl Kind for Pinned {
    fn name(&self) -> &'static str {
        "opaque"
    }

    fn flags(&self, value: &[u8]) -> Flags {
        OpaqueKind.flags(value)
    }

    fn lean_key(&self, key: &str) -> bool {
        !key.starts_with("pin/")
    }
}

#[test]
fn a_kinds_pinned_keys_stay_readable_by_key_in_a_lean_store_and_the_rest_are_lean() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let lean_opts = || StoreOptions {
        lean: true,
        kind: Arc::new(Pinned),
        ..opts()
    };
    let store = Store::open(dir.path(), lean_opts()).unwrap();
    rt.block_on(store.write(vec![
        put("pin/a", "pins", "1", true),
        put("app/ord", "app", "2", true),
        put("pin/b", "pins", "3", false),
    ]))
    .unwrap();
    rt.block_on(store.write(vec![put("pin/a", "pins", "4", true), del("app/ord")]))
        .unwrap();
    let check = |store: &Store, when: &str| {
        assert_eq!(
            store
                .get_live("pin/a")
                .and_then(|e| e.value().map(<[u8]>::to_vec)),
            Some(b"+4".to_vec()),
            "{when}"
        );
        assert!(store.get_live("pin/b").is_some(), "{when}");
        // A lean key is read from its row: a tombstone, so not live.
        let latest = rt.block_on(store.read_latest_entry("app/ord")).unwrap();
        assert!(latest.is_some_and(|e| !e.is_live()), "{when}");
        assert!(rt.block_on(store.read_live("app/ord")).unwrap().is_none());
        let pin = rt.block_on(store.read_live("pin/b")).unwrap().unwrap();
        assert_eq!(pin.value(), Some(&b"3"[..]), "{when}");
        assert_eq!((store.stats().keys, store.stats().live), (3, 2), "{when}");
    };
    check(&store, "written");
    store.close();
    let store = Store::open(dir.path(), lean_opts()).unwrap();
    check(&store, "reopened");
    store.close();
}

#[test]
fn a_lean_stores_tombstone_collection_reads_the_tombstone_index_not_the_table() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreOptions {
            lean: true,
            ..opts()
        },
    )
    .unwrap();
    rt.block_on(store.write(vec![
        put("a/ord", "a", "1", true),
        put("b/ord", "b", "1", true),
    ]))
    .unwrap();
    rt.block_on(store.write(vec![del("a/ord")])).unwrap();
    store.close();
    let conn = rusqlite::Connection::open(dir.path().join(crate::DB_FILE)).unwrap();
    let plan: Vec<String> = conn
        .prepare(&format!(
            "EXPLAIN QUERY PLAN {}",
            crate::sqlite::TOMBSTONES_BEFORE
        ))
        .unwrap()
        .query_map(rusqlite::params![i64::MAX, i64::MAX, 10], |r| {
            r.get::<_, String>(3)
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(
        plan.iter().any(|step| step.contains("records_tombstones")),
        "{plan:?}"
    );
    let tombstones: i64 = conn
        .query_row(
            "SELECT count(*) FROM records INDEXED BY records_tombstones WHERE value IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(tombstones, 1);
}
