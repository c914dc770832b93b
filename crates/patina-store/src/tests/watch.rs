//! Watch cursors: snapshots in chunks, deltas, resume tokens, catch-up, scopes, progress.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::*;

pub(super) fn next(rt: &tokio::runtime::Runtime, cursor: &mut Cursor) -> WatchItem {
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), cursor.next())
            .await
            .expect("watch item within 5 s")
            .expect("store open")
    })
}

/// A whole-store watch from scratch: its snapshot (reset first), then the token at its end.
pub(super) fn snapshot_token(rt: &tokio::runtime::Runtime, store: &Store) -> ResumeToken {
    let mut cursor = store.watch(None, None, 100);
    assert!(matches!(
        next(rt, &mut cursor),
        WatchItem::Snapshot { reset: true, .. }
    ));
    let WatchItem::SnapshotDone { token } = next(rt, &mut cursor) else {
        panic!("expected the end of the snapshot")
    };
    token
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
    // A whole-store token from before the floor catches up the same way, without a reset.
    let mut resumed = store.watch(None, Some(old), 100);
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(keys.len(), 11);
    // So does a scoped token: its app's keys (m0 now deleted), from the stored rows.
    let scoped_old = ResumeToken {
        scope: Some(crate::watch::scope_hash(Some("web"))),
        ..old
    };
    let mut scoped = store.watch(Some(Arc::from("web")), Some(scoped_old), 100);
    let (keys, _) = delta_keys(&next(&rt, &mut scoped));
    assert_eq!(keys.len(), 11);
    // The log survives a restart: a recent token still resumes without a reset.
    let recent = token;
    store.close();
    drop((slow, resumed, scoped, store));
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

    // A scoped cursor left behind by the log catches up from the stored rows: its app's
    // changes only, without a reset.
    rt.block_on(store.write(vec![put("w1", "web", "x", true)]))
        .unwrap();
    for i in 0..20 {
        rt.block_on(store.write(vec![put(&format!("d{i}"), "db", "y", true)]))
            .unwrap();
    }
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(keys, vec![("w1".into(), true)]);
}

#[test]
fn a_slow_app_watcher_on_a_busy_store_converges_without_resets() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, small_log(50));
    for i in 0..200 {
        rt.block_on(store.write(vec![put(&format!("w{i:03}"), "web", "1", true)]))
            .unwrap();
    }
    let mut cursor = store.watch(Some(Arc::from("web")), None, 10);
    let mut view = View::default();
    // Between every message it reads, the rest of the region changes 30 times, and one of
    // its machines moves to another app (delete, then reuse the id elsewhere).
    for round in 0..60 {
        let item = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(50), cursor.next()).await
        });
        if let Ok(item) = item {
            view.apply(item.expect("store open"));
        }
        for i in 0..30 {
            rt.block_on(store.write(vec![put(&format!("o{round}-{i}"), "other", "1", true)]))
                .unwrap();
        }
        if round % 10 == 0 {
            let id = format!("w{:03}", round * 3);
            rt.block_on(store.write(vec![del(&id)])).unwrap();
            rt.block_on(store.write(vec![put(&id, "moved", "1", true)]))
                .unwrap();
        }
    }
    view.follow(&rt, &mut cursor, store.stats().revision);
    assert_eq!(view.resets, 1, "only the first snapshot reset");
    assert_eq!(view.keys(), truth(&store, Some("web"), &["web"]));
}

#[test]
fn a_scoped_watch_resumed_after_a_key_left_gets_no_deletion_for_it() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("x", "a", "1", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("x")])).unwrap();
    rt.block_on(store.write(vec![put("x", "b", "1", true)]))
        .unwrap();
    // A watch of a that starts after x left it.
    let mut cursor = store.watch(Some(Arc::from("a")), None, 100);
    let mut view = View::default();
    view.follow(&rt, &mut cursor, store.stats().revision);
    drop(cursor);
    rt.block_on(store.write(vec![put("x", "b", "2", true)]))
        .unwrap();
    rt.block_on(store.write(vec![put("y", "a", "1", true)]))
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    let mut resumed = store.watch(Some(Arc::from("a")), view.token, 100);
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(
        keys,
        vec![("y".into(), true)],
        "x left a before this watch began"
    );
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

/// A client's view: what applying a cursor's items gives, keyed by key.
#[derive(Default)]
pub(super) struct View {
    pub(super) held: BTreeMap<String, Entry>,
    pub(super) token: Option<ResumeToken>,
    pub(super) resets: usize,
}

impl View {
    pub(super) fn apply(&mut self, item: WatchItem) {
        match item {
            WatchItem::Snapshot { reset, entries } => {
                if reset {
                    self.held.clear();
                    self.resets += 1;
                }
                for e in entries {
                    self.held.insert(e.key().to_owned(), e);
                }
            }
            WatchItem::SnapshotDone { token } => self.token = Some(token),
            WatchItem::Delta { changes, token } => {
                for c in changes {
                    if c.entry.is_live() {
                        self.held.insert(c.entry.key().to_owned(), c.entry);
                    } else {
                        self.held.remove(c.entry.key());
                    }
                }
                self.token = Some(token);
            }
        }
    }

    /// Read items until the view is at `revision`.
    pub(super) fn follow(
        &mut self,
        rt: &tokio::runtime::Runtime,
        cursor: &mut Cursor,
        revision: u64,
    ) {
        for _ in 0..10_000 {
            if self.token.is_some_and(|t| t.rev >= revision) {
                return;
            }
            self.apply(next(rt, cursor));
        }
        panic!("the cursor never reached revision {revision}");
    }

    fn keys(&self) -> Vec<(String, u64)> {
        self.held
            .iter()
            .map(|(k, e)| (k.clone(), e.rev()))
            .collect()
    }
}

/// What a view of `group` (or everything) must hold: the store's live records.
fn truth(store: &Store, group: Option<&str>, groups: &[&str]) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = groups
        .iter()
        .filter(|g| group.is_none_or(|s| s == **g))
        .flat_map(|g| store.list(g, Filter::All))
        .map(|e| (e.key().to_owned(), e.rev()))
        .collect();
    out.sort();
    out
}

#[test]
fn snapshots_come_in_chunks_and_writes_racing_them_arrive_as_deltas() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    for i in 0..10 {
        rt.block_on(store.write(vec![
            put(&format!("w{i}"), "web", "1", true),
            put(&format!("d{i}"), "db", "1", true),
        ]))
        .unwrap();
    }
    for scope in [Some("web"), None] {
        let mut cursor = store.watch(scope.map(Arc::from), None, 3);
        let mut view = View::default();
        let first = next(&rt, &mut cursor);
        let WatchItem::Snapshot {
            reset: true,
            entries,
        } = &first
        else {
            panic!("expected the first chunk, got {first:?}")
        };
        assert_eq!(entries.len(), 3, "a chunk is bounded by the batch size");
        view.apply(first);
        // Writes while the snapshot is being read: an update of a key not sent yet, a
        // delete, a new key, and a key moving between groups.
        rt.block_on(store.write(vec![
            put("w9", "web", "2", true),
            del("w5"),
            put("w10", "web", "1", true),
            del("d0"),
        ]))
        .unwrap();
        rt.block_on(store.write(vec![put("d0", "web", "moved", true)]))
            .unwrap();
        let mut chunks = 1;
        loop {
            let item = next(&rt, &mut cursor);
            let done = matches!(item, WatchItem::SnapshotDone { .. });
            if let WatchItem::Snapshot { reset, entries } = &item {
                assert!(!reset && entries.len() <= 3);
                chunks += 1;
            }
            view.apply(item);
            if done {
                break;
            }
        }
        assert!(chunks >= 3, "{scope:?}: {chunks} chunks");
        view.follow(&rt, &mut cursor, store.stats().revision);
        assert_eq!(
            view.keys(),
            truth(&store, scope, &["web", "db"]),
            "{scope:?}"
        );
        assert_eq!(view.resets, 1);
        // Put it back for the next scope.
        rt.block_on(store.write(vec![del("d0"), del("w10")]))
            .unwrap();
        rt.block_on(store.write(vec![
            put("d0", "db", "1", true),
            put("w5", "web", "1", true),
        ]))
        .unwrap();
    }
}

#[test]
fn a_catch_up_is_resumable_at_every_chunk_and_converges() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), small_log(4)).unwrap();
    let mut cursor = store.watch(None, None, 5);
    let mut view = View::default();
    view.follow(&rt, &mut cursor, 0);
    for i in 0..40 {
        rt.block_on(store.write(vec![put(&format!("m{i}"), "g", "1", true)]))
            .unwrap();
    }
    rt.block_on(store.write(vec![del("m3"), put("m7", "g", "2", true)]))
        .unwrap();
    // Behind the 4-entry log: a catch-up in chunks, each with a token, no reset.
    let item = next(&rt, &mut cursor);
    let WatchItem::Delta { changes, token } = &item else {
        panic!("expected a catch-up delta, got {item:?}")
    };
    assert!(changes.len() <= 5);
    let mid = *token;
    view.apply(item);
    drop(cursor);
    // Resume from the middle of the catch-up: the rest arrives, still without a reset.
    let mut resumed = store.watch(None, Some(mid), 5);
    view.follow(&rt, &mut resumed, store.stats().revision);
    assert_eq!(view.resets, 1, "only the initial snapshot reset");
    assert_eq!(view.keys(), truth(&store, None, &["g"]));
}

#[test]
fn a_token_of_one_scope_used_on_another_gets_a_reset() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, opts());
    rt.block_on(store.write(vec![put("a", "web", "1", true), put("b", "db", "1", true)]))
        .unwrap();
    let mut web = store.watch(Some(Arc::from("web")), None, 10);
    let mut view = View::default();
    view.follow(&rt, &mut web, 1);
    let token = view.token.unwrap();
    for scope in [Some("db"), None] {
        let mut other = store.watch(scope.map(Arc::from), Some(token), 10);
        assert!(
            matches!(
                next(&rt, &mut other),
                WatchItem::Snapshot { reset: true, .. }
            ),
            "{scope:?}"
        );
    }
    // The first token format (no scope) is honoured with a reset, not refused.
    let old: ResumeToken = format!("{:016x}.{}", token.store.0, token.rev)
        .parse()
        .unwrap();
    let mut again = store.watch(Some(Arc::from("web")), Some(old), 10);
    assert!(matches!(
        next(&rt, &mut again),
        WatchItem::Snapshot { reset: true, .. }
    ));
    for bad in [
        "",
        "x.1",
        "0123456789abcdef.",
        "0123456789abcdef.1.zz",
        "0123456789abcdef.1.00000000.1",
        "0123456789abcdef.1.00000000.0123456789abcdef.0",
        "+123456789abcdef.1",
        "0123456789abcdef.+1",
    ] {
        assert!(bad.parse::<ResumeToken>().is_err(), "{bad:?}");
    }
}

#[test]
fn a_quiet_watcher_gets_progress_tokens_and_never_falls_behind_the_log() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, small_log(8));
    let mut quiet = store.watch(Some(Arc::from("quiet")), None, 10);
    let mut view = View::default();
    view.follow(&rt, &mut quiet, 0);
    let mut progress = 0;
    for round in 0..10 {
        for i in 0..4 {
            rt.block_on(store.write(vec![put(&format!("b{round}-{i}"), "busy", "1", true)]))
                .unwrap();
        }
        // The quiet cursor is read as a client would; nothing in its scope changes.
        while let Ok(Some(item)) = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(20), quiet.next()).await
        }) {
            let WatchItem::Delta { changes, token } = &item else {
                panic!("expected progress, got {item:?}")
            };
            assert!(changes.is_empty());
            assert!(
                token.rev >= store.feed().floor(),
                "the token is still in the log"
            );
            progress += 1;
            view.apply(item);
        }
    }
    assert!(progress >= 5, "{progress} progress notifications");
    // Its latest token still resumes without a reset.
    let mut resumed = store.watch(Some(Arc::from("quiet")), view.token, 10);
    rt.block_on(store.write(vec![put("q", "quiet", "1", true)]))
        .unwrap();
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(keys, vec![("q".into(), true)]);
}

#[test]
fn after_a_restart_a_resumed_scoped_watch_gets_no_spurious_deletions() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("a1", "a", "1", true), put("x", "a", "1", true)]))
        .unwrap();
    let mut cursor = store.watch(Some(Arc::from("a")), None, 100);
    let mut view = View::default();
    view.follow(&rt, &mut cursor, store.stats().revision);
    drop(cursor);
    // Other apps change; x leaves a for b, then b for c (the row of its stay in b is gone).
    for i in 0..5 {
        rt.block_on(store.write(vec![put(&format!("other{i}"), "z", "1", true)]))
            .unwrap();
    }
    rt.block_on(store.write(vec![del("x")])).unwrap();
    rt.block_on(store.write(vec![put("x", "b", "1", true)]))
        .unwrap();
    rt.block_on(store.write(vec![del("x")])).unwrap();
    rt.block_on(store.write(vec![put("x", "c", "1", true)]))
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    let mut resumed = store.watch(Some(Arc::from("a")), view.token, 100);
    let (keys, _) = delta_keys(&next(&rt, &mut resumed));
    assert_eq!(
        keys,
        vec![("x".into(), false)],
        "x left a; nothing else is news to a"
    );
}

#[test]
fn heartbeats_keep_coming_while_only_other_apps_change() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, opts());
    rt.block_on(store.write(vec![put("w1", "web", "1", true)]))
        .unwrap();
    let every = std::time::Duration::from_millis(100);
    let mut cursor = store
        .watch(Some(Arc::from("web")), None, 10)
        .with_heartbeat(every);
    while !matches!(
        rt.block_on(cursor.next()),
        Some(WatchItem::SnapshotDone { .. })
    ) {}
    // Another app changes every 20 ms for 3 s. Each change wakes the cursor and finds nothing
    // in its scope: that must not put its heartbeat off. (Progress notifications also come,
    // but ever further apart as the log grows: by the end, more than a second apart.)
    let writer = store.clone();
    let busy = rt.spawn(async move {
        for i in 0..150 {
            let _ = writer
                .write(vec![put(&format!("a{i}"), "api", "1", true)])
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    let started = std::time::Instant::now();
    let mut last = started;
    let mut longest = std::time::Duration::ZERO;
    while started.elapsed() < std::time::Duration::from_millis(2_500) {
        match next(&rt, &mut cursor) {
            WatchItem::Delta { changes, .. } => assert!(changes.is_empty(), "{changes:?}"),
            other => panic!("expected empty deltas, got {other:?}"),
        }
        if last.duration_since(started) > std::time::Duration::from_millis(300) {
            longest = longest.max(last.elapsed());
        }
        last = std::time::Instant::now();
    }
    assert!(
        longest < every * 9,
        "{longest:?} without a message while the watch's app was quiet"
    );
    busy.abort();
}
