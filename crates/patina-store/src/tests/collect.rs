//! Tombstone collection: rows and index entries go, numbers stay known, old tokens reset.

use super::watch::{next, snapshot_token};
use super::*;

/// Now, in wall milliseconds: tombstones written by these tests are older than `FUTURE`.
const FUTURE: u64 = u64::MAX >> 16;

/// A tombstone over a peer's record is collected; the peer's number and the tombstone's
/// stay known, so the old record, sent again, is covered instead of coming back.
fn collect_and_refuse_the_old_version(rt: &tokio::runtime::Runtime, store: &Store) {
    let old = remote("a", version(1 << 16, 7, 1), false);
    let report = rt
        .block_on(store.apply(records(vec![old.clone()])))
        .unwrap();
    assert_eq!(report.applied(), 1);
    rt.block_on(store.write(vec![put("b", "app", "1", true)]))
        .unwrap();
    let deleted = rt.block_on(store.write(vec![del("a")])).unwrap()[0];
    // A tombstone younger than the cutoff stays, and so does one committed above the
    // revision the caller held long enough ago (its timestamp alone says nothing of that).
    let young = deleted.hlc.physical_ms();
    let rev = store.get_latest_entry("a").unwrap().rev();
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, rev - 1, 16))
            .unwrap(),
        0
    );
    assert_eq!(
        rt.block_on(store.collect_tombstones(young, u64::MAX, 16))
            .unwrap(),
        0
    );
    assert!(store.get_latest("a").is_some());

    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 16))
            .unwrap(),
        1
    );
    assert!(
        store.get_latest("a").is_none(),
        "the tombstone left the index"
    );
    assert_eq!(store.stats().keys, 1, "only b is left");
    assert!(
        store.get_latest("b").is_some(),
        "live records are never collected"
    );
    let digest = store.digest();
    assert!(
        digest[&deleted.origin].knows(deleted.seq),
        "the number stays known"
    );
    assert!(digest[&NodeId(7)].knows(1));

    // The superseded record, arriving again, is covered: it does not come back.
    let report = rt.block_on(store.apply(records(vec![old]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Covered]);
    assert!(store.get_latest("a").is_none());
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 16))
            .unwrap(),
        0
    );

    // Anti-entropy answers the tombstone's number as covered, with no record.
    let read = rt
        .block_on(store.read_origin(
            deleted.origin,
            SeqRange::single(deleted.seq).unwrap(),
            ReadBudget {
                max_records: 16,
                max_bytes: 1 << 20,
            },
        ))
        .unwrap();
    assert!(read.records.is_empty());
    assert_eq!(read.covered, vec![SeqRange::single(deleted.seq).unwrap()]);
}

#[test]
fn a_collected_tombstone_leaves_rows_and_index_and_its_numbers_stay_known() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    collect_and_refuse_the_old_version(&rt, &store);
    // A tombstone that a later write superseded is not collected: the key is live.
    rt.block_on(store.write(vec![put("c", "app", "1", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("c")])).unwrap();
    rt.block_on(store.write(vec![put("c", "app", "2", true)]))
        .unwrap();
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 16))
            .unwrap(),
        0
    );
    assert!(store.get_latest("c").unwrap().value.is_some());
    // Durable: after a restart the row is still gone and the rest is intact.
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert!(store.get_latest("a").is_none());
    assert_eq!(store.stats().keys, 2, "b and c");
    assert!(store.digest()[&NodeId(7)].knows(1));
}

#[test]
fn the_memory_backend_collects_the_same_way() {
    let rt = rt();
    let store = Store::in_memory(NodeId(3), 3, opts());
    collect_and_refuse_the_old_version(&rt, &store);
}

#[test]
fn a_collection_takes_at_most_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    let puts = (0..10)
        .map(|i| put(&format!("m{i}"), "app", "x", true))
        .collect();
    rt.block_on(store.write(puts)).unwrap();
    let dels = (0..10).map(|i| del(&format!("m{i}"))).collect();
    rt.block_on(store.write(dels)).unwrap();
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 4))
            .unwrap(),
        4
    );
    assert_eq!(store.stats().keys, 6);
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 100))
            .unwrap(),
        6
    );
    assert_eq!(store.stats().keys, 0);
}

#[test]
fn a_token_from_below_a_collected_tombstone_gets_a_reset_once_behind_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    rt.block_on(store.write(vec![put("gone", "web", "1", true)]))
        .unwrap();
    let old = snapshot_token(&rt, &store);
    rt.block_on(store.write(vec![del("gone")])).unwrap();
    // Push the deletion out of the 4-entry log, so a resume must walk the rows.
    for i in 0..8 {
        rt.block_on(store.write(vec![put(&format!("m{i}"), "web", "x", true)]))
            .unwrap();
    }
    // Before collection, the rows replay the deletion: a catch-up without a reset.
    let mut before = store.watch(None, Some(old), 100);
    match next(&rt, &mut before) {
        WatchItem::Delta { changes, .. } => {
            assert!(
                changes
                    .iter()
                    .any(|c| c.entry.key() == "gone" && !c.entry.is_live())
            );
        }
        other => panic!("expected a catch-up, got {other:?}"),
    }
    // A token from after the deletion.
    let recent = snapshot_token(&rt, &store);
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 16))
            .unwrap(),
        1
    );
    // After it, the rows cannot: the old token gets a snapshot, which lacks the key.
    let mut after = store.watch(None, Some(old), 100);
    match next(&rt, &mut after) {
        WatchItem::Snapshot {
            reset: true,
            entries,
        } => assert!(entries.iter().all(|e| e.key() != "gone")),
        other => panic!("expected a reset, got {other:?}"),
    }
    // A token from above the collected tombstone still catches up from the rows.
    for i in 0..8 {
        rt.block_on(store.write(vec![put(&format!("n{i}"), "web", "x", true)]))
            .unwrap();
    }
    let mut fresh = store.watch(None, Some(recent), 100);
    assert!(matches!(next(&rt, &mut fresh), WatchItem::Delta { .. }));
    // And the same after a restart (the collected revision is durable).
    store.close();
    drop((before, after, fresh, store));
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    let mut again = store.watch(None, Some(old), 100);
    assert!(matches!(
        next(&rt, &mut again),
        WatchItem::Snapshot { reset: true, .. }
    ));
}

/// An origin retires only once its owner is held down, it is fully known and nothing of it
/// is held; then it leaves the digest (across restarts) and the down set, what arrives from
/// it up to its head is covered, and a number above the head brings it back, known up to
/// that head (so its old records stay covered).
#[test]
fn an_origin_retires_only_when_gone_and_fully_covered_and_a_new_number_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    let gone = NodeId(9);
    // Numbers 1 and 3 of origin 9 held, 2 unknown.
    let r1 = remote("a", version(1 << 16, 9, 1), false);
    let r3 = remote("b", version(2 << 16, 9, 3), false);
    rt.block_on(store.apply(records(vec![r1.clone(), r3])))
        .unwrap();
    rt.block_on(store.set_owner_down(gone, true)).unwrap();
    assert!(
        !rt.block_on(store.retire_origin(gone)).unwrap(),
        "a gap: 2 is unknown"
    );
    rt.block_on(store.apply(RemoteBatch {
        records: Vec::new(),
        covered: vec![(gone, SeqRange::single(2).unwrap())],
    }))
    .unwrap();
    assert!(
        !rt.block_on(store.retire_origin(gone)).unwrap(),
        "it still holds a and b"
    );
    // Our own writes (a put and a delete) supersede both.
    rt.block_on(store.write(vec![put("a", "app", "mine", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("b")])).unwrap();
    assert!(
        !rt.block_on(store.retire_origin(store.node()))
            .is_ok_and(|r| r),
        "never our own"
    );
    // Not while its owner is up here.
    rt.block_on(store.set_owner_down(gone, false)).unwrap();
    assert!(
        !rt.block_on(store.retire_origin(gone)).unwrap(),
        "its owner is up"
    );
    rt.block_on(store.set_owner_down(gone, true)).unwrap();
    assert!(rt.block_on(store.retire_origin(gone)).unwrap());
    assert!(!store.digest().contains_key(&gone), "out of the digest");
    assert!(store.is_retired(gone));
    assert!(!store.down_owners().contains(&gone), "out of the down set");
    // What still arrives from it up to its head is covered and leaves no trace.
    let report = rt
        .block_on(store.apply(RemoteBatch {
            records: vec![r1.clone(), remote("c", version(3 << 16, 9, 2), false)],
            covered: vec![(gone, SeqRange::new(1, 3).unwrap())],
        }))
        .unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Covered; 2]);
    assert_eq!(report.covered, vec![ApplyOutcome::Covered]);
    assert!(!store.digest().contains_key(&gone));
    assert!(store.get_latest("c").is_none());
    // Durable.
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert!(store.is_retired(gone));
    assert!(!store.digest().contains_key(&gone));
    // Its agent is back and writes number 4: the origin is back, known up to 3.
    let fresh = remote("d", version(4 << 16, 9, 4), false);
    let report = rt.block_on(store.apply(records(vec![fresh, r1]))).unwrap();
    assert_eq!(
        report.records,
        vec![ApplyOutcome::Applied, ApplyOutcome::Covered],
        "the new number applies; the old one stays covered"
    );
    assert!(!store.is_retired(gone));
    let k = &store.digest()[&gone];
    assert!(k.knows(1) && k.knows(3) && k.knows(4) && k.gap_count() == 0);
    assert_eq!(store.get_latest("a").unwrap().version.origin, store.node());
    // Taken back by hand, too (and only once).
    rt.block_on(store.set_owner_down(gone, true)).unwrap();
    rt.block_on(store.write(vec![put("d", "app", "mine", true)]))
        .unwrap();
    assert!(rt.block_on(store.retire_origin(gone)).unwrap());
    assert!(rt.block_on(store.unretire_origin(gone)).unwrap());
    assert!(!rt.block_on(store.unretire_origin(gone)).unwrap());
    assert!(store.digest()[&gone].knows(4));
}

/// The writer re-checks each tombstone it is handed: one superseded since the list was made
/// (a write in between, or earlier in the same group) is not collected.
#[test]
fn a_stale_tombstone_handed_to_the_writer_is_not_collected() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("k", "app", "1", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("k")])).unwrap();
    let tombstone = store.get_latest_entry("k").unwrap();
    assert!(!tombstone.is_live());
    rt.block_on(store.write(vec![put("k", "app", "2", true)]))
        .unwrap();
    assert_eq!(
        rt.block_on(store.collect_exact(vec![tombstone])).unwrap(),
        0
    );
    assert!(
        store.get_latest("k").unwrap().value.is_some(),
        "the live record stays"
    );
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert!(
        store.get_latest("k").unwrap().value.is_some(),
        "and its row too"
    );
}

/// A catch-up walking the stored rows restarts as a snapshot when tombstones above its start
/// are collected while it walks (their rows, the deletions, may be gone before it reads them).
#[test]
fn a_collection_during_a_catch_up_walk_turns_it_into_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    rt.block_on(store.write(vec![put("x", "web", "1", true)]))
        .unwrap();
    let token = snapshot_token(&rt, &store);
    for i in 0..6 {
        rt.block_on(store.write(vec![put(&format!("m{i}"), "web", "x", true)]))
            .unwrap();
    }
    rt.block_on(store.write(vec![del("x")])).unwrap();
    for i in 0..6 {
        rt.block_on(store.write(vec![put(&format!("n{i}"), "web", "x", true)]))
            .unwrap();
    }
    // Behind the 4-entry log: a catch-up walk, one change per message.
    let mut walk = store.watch(None, Some(token), 1);
    assert!(matches!(next(&rt, &mut walk), WatchItem::Delta { .. }));
    assert_eq!(
        rt.block_on(store.collect_tombstones(FUTURE, u64::MAX, 16))
            .unwrap(),
        1
    );
    // The rest of the walk would have skipped x's deletion: a snapshot instead, without x.
    loop {
        match next(&rt, &mut walk) {
            WatchItem::Delta { changes, .. } => assert!(
                changes.iter().all(|c| c.entry.key() != "x"),
                "the walk went on past the collection"
            ),
            WatchItem::Snapshot {
                reset: true,
                entries,
            } => {
                assert!(entries.iter().all(|e| e.key() != "x"));
                break;
            }
            other => panic!("expected a reset, got {other:?}"),
        }
    }
}
