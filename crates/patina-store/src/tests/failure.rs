//! The failure paths: a full disk refuses writes and recovers; an fsync error or a writer
//! panic stops the store for good, fails every write and ends every watch.

use std::sync::Arc;
use std::time::Duration;

use super::*;

fn with_failpoints() -> (Arc<Failpoints>, StoreOptions) {
    let fp = Arc::new(Failpoints::default());
    let opts = StoreOptions {
        failpoints: fp.clone(),
        ..opts()
    };
    (fp, opts)
}

#[test]
fn a_full_disk_refuses_the_write_changes_nothing_and_writes_resume() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (fp, opts) = with_failpoints();
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    let before = (store.stats(), store.digest());
    fp.arm(InjectedFault::DiskFull);
    let err = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::DiskFull), "{err}");
    let after = store.stats();
    assert_eq!(
        (after.live, after.revision),
        (before.0.live, before.0.revision)
    );
    assert_eq!(store.digest(), before.1, "no knowledge moved");
    assert!(store.get_live("b").is_none());
    assert!(store.failure().is_none(), "a full disk is not fatal");
    // Space returns: the next write takes the next sequence number, none skipped.
    let v = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap()[0];
    assert_eq!(v.seq, 2);
    store.close();
    let store = Store::open(dir.path(), opts).unwrap();
    assert!(store.get_live("b").is_some());
}

fn assert_fails_for_good(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    cursor: &mut Cursor,
    what: &str,
) {
    let why = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), store.failed())
            .await
            .expect("the failure is reported")
    });
    assert!(why.contains(what), "{why}");
    // Every later write fails, with the reason, and changes nothing.
    let err = rt
        .block_on(store.write(vec![put("later", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    assert!(store.get_live("later").is_none());
    // Open watches end instead of waiting forever.
    let end =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), cursor.next()).await });
    assert_eq!(end, Ok(None));
    // Reads from memory go on.
    assert!(store.get_live("a").is_some());
}

fn watching(rt: &tokio::runtime::Runtime, store: &Store) -> Cursor {
    let mut cursor = store.watch(None, None, 100);
    while !matches!(
        rt.block_on(cursor.next()).expect("open"),
        WatchItem::SnapshotDone { .. }
    ) {}
    cursor
}

#[test]
fn an_fsync_error_stops_the_store_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (fp, opts) = with_failpoints();
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    let mut cursor = watching(&rt, &store);
    fp.arm(InjectedFault::FsyncError);
    let err = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    assert!(
        store.get_live("b").is_none(),
        "never visible: it was not durable"
    );
    assert_fails_for_good(&rt, &store, &mut cursor, "group commit failed");
    // The writer stopped and let the data directory go: it reopens, without the failed write.
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    assert!(store.get_live("a").is_some() && store.get_live("b").is_none());
}

#[test]
fn a_writer_panic_stops_the_store_instead_of_hanging_it() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (fp, opts) = with_failpoints();
    let store = Store::open(dir.path(), opts).unwrap();
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    let mut cursor = watching(&rt, &store);
    fp.arm(InjectedFault::Panic);
    let err = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    assert_fails_for_good(&rt, &store, &mut cursor, "panicked");
}

#[test]
fn the_in_memory_store_fails_the_same_way() {
    let rt = rt();
    let (fp, opts) = with_failpoints();
    let store = Store::in_memory(NodeId(1), 1, opts);
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    let mut cursor = watching(&rt, &store);
    fp.arm(InjectedFault::DiskFull);
    let err = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::DiskFull), "{err}");
    fp.arm(InjectedFault::FsyncError);
    let err = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    assert_fails_for_good(&rt, &store, &mut cursor, "commit failed");
}

/// Down news does not wait for disk space: with the disk full, hiding a dead owner's records
/// takes effect at once (in memory; listings skip them) while writes are refused, and it is
/// persisted by the first commit once space returns.
#[test]
fn a_full_disk_does_not_hold_back_down_news() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (fp, opts) = with_failpoints();
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let dead = NodeId(7);
    let theirs = remote("m", version(Hlc::from_physical_ms(1).0, dead.0, 1), false);
    rt.block_on(store.apply(records(vec![theirs]))).unwrap();
    assert_eq!(store.list("app", Filter::All).len(), 1);
    fp.arm(InjectedFault::DiskFull);
    let change = rt.block_on(store.set_owner_down(dead, true)).unwrap();
    assert!(change.changed, "applied although the disk is full");
    assert!(
        store.list("app", Filter::All).is_empty(),
        "the dead owner's machine is hidden at once"
    );
    // Space returns: the next commit persists the overlay with it.
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    assert!(
        store.down_owners().contains(&dead),
        "persisted once space returned"
    );
}

/// A store in `dir` holding a dead owner's machine, whose hide is applied in memory while the
/// disk is full. Returns the store, its options, a token the disk holds (just before the hide)
/// and the token of the hide (past what the disk holds).
fn hidden_while_the_disk_is_full(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (Store, StoreOptions, ResumeToken, ResumeToken) {
    let (fp, opts) = with_failpoints();
    let store = Store::open(dir, opts.clone()).unwrap();
    let dead = NodeId(7);
    let theirs = remote("m", version(Hlc::from_physical_ms(1).0, dead.0, 1), false);
    rt.block_on(store.apply(records(vec![theirs]))).unwrap();
    let durable = super::watch::snapshot_token(rt, &store);
    assert_eq!(durable.incarnation, None, "the disk holds its revision");
    let mut cursor = store.watch(None, Some(durable), 100);
    fp.arm(InjectedFault::DiskFull);
    assert!(
        rt.block_on(store.set_owner_down(dead, true))
            .unwrap()
            .changed
    );
    let WatchItem::Delta {
        token: volatile, ..
    } = super::watch::next(rt, &mut cursor)
    else {
        panic!("expected the hide as a delta")
    };
    assert_eq!(volatile.rev, durable.rev + 1);
    assert!(volatile.incarnation.is_some(), "{volatile}");
    (store, opts, durable, volatile)
}

/// A change applied in memory while the disk is full has a revision a crash (or a stop before
/// space returns) loses; the reopened store issues it again for another change. A watcher
/// holding a token past the durable revision must then get a reset, not resume and silently
/// miss the change that reused its number; within the same opening it resumes as usual.
#[test]
fn a_token_past_what_the_disk_holds_resumes_only_in_the_same_opening() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (store, _opts, durable, volatile) = hidden_while_the_disk_is_full(&rt, dir.path());
    let parsed: ResumeToken = volatile.to_string().parse().unwrap();
    assert_eq!(parsed, volatile, "the incarnation survives the wire");
    // The same opening resumes from it: nothing new to send.
    let mut same = store.watch(None, Some(volatile), 100);
    let item =
        rt.block_on(async { tokio::time::timeout(Duration::from_millis(300), same.next()).await });
    assert!(item.is_err(), "resumed quietly, got {item:?}");
    // Stopped before space returned: the hide is lost, its revision goes to another write.
    store.close();
    drop(store);
    let (_fp, opts) = with_failpoints();
    let store = Store::open(dir.path(), opts).unwrap();
    assert_eq!(
        store.stats().revision,
        durable.rev,
        "the hide never reached the disk"
    );
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    assert!(store.stats().revision >= volatile.rev);
    let mut after = store.watch(None, Some(volatile), 100);
    assert!(
        matches!(
            super::watch::next(&rt, &mut after),
            WatchItem::Snapshot { reset: true, .. }
        ),
        "a token of the lost revisions gets a reset"
    );
    // A token the disk held resumes across the restart.
    let mut old = store.watch(None, Some(durable), 100);
    let WatchItem::Delta { changes, .. } = super::watch::next(&rt, &mut old) else {
        panic!("expected the write as a delta")
    };
    assert_eq!(changes.len(), 1);
}

/// Once a commit reaches the disk after the full spell, the revisions applied in memory are
/// durable: a token of them resumes after a restart (no needless snapshot), until another
/// opening has committed.
#[test]
fn a_token_of_revisions_a_later_commit_persisted_resumes_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let (store, opts, _durable, volatile) = hidden_while_the_disk_is_full(&rt, dir.path());
    // Space returns: this commit persists the hide's revision with its own.
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    let mut resumed = store.watch(None, Some(volatile), 100);
    let WatchItem::Delta { changes, .. } = super::watch::next(&rt, &mut resumed) else {
        panic!("expected the write as a delta, not a reset")
    };
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].entry.key(), "a");
    // Another opening that commits makes it unknown: a reset, as for any token it cannot
    // vouch for.
    rt.block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap();
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts).unwrap();
    let mut reset = store.watch(None, Some(volatile), 100);
    assert!(matches!(
        super::watch::next(&rt, &mut reset),
        WatchItem::Snapshot { reset: true, .. }
    ));
}
