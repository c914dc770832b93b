//! Watch cursors: snapshots in chunks, deltas, resume tokens, catch-up, scopes, progress.

use std::sync::Arc;

use super::*;

fn next(rt: &tokio::runtime::Runtime, cursor: &mut Cursor) -> WatchItem {
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), cursor.next())
            .await
            .expect("watch item within 5 s")
            .expect("store open")
    })
}

fn delta_keys(item: &WatchItem) -> (Vec<(String, bool)>, ResumeToken) {
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
    let mut caught_up = store.watch(Some(Arc::from("web")), Some(last), 100);
    rt.block_on(store.write(vec![put("a3", "web", "3", true)]))
        .unwrap();
    let (keys, _) = delta_keys(&next(&rt, &mut caught_up));
    assert_eq!(keys, vec![("a3".into(), true)]);

    // A token of another store gets a reset and a snapshot.
    let foreign = ResumeToken {
        store: NodeId(store.node().0 ^ 1),
        ..token
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
    let recent = token;
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
