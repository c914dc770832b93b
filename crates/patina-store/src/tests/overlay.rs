//! The liveness overlay: hiding a down owner's records from listings and watches without a
//! write, showing them again, resets for watchers it leaves behind, and persistence.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::watch::{View, next};
use super::*;

/// The agent that goes down, and one that stays up.
const HOST: NodeId = NodeId(5);
const OTHER: NodeId = NodeId(6);

/// A live record of `owner` (routable), with timestamps growing with `seq`.
fn owned(key: &str, group: &str, owner: NodeId, seq: u64) -> Record {
    Record {
        key: Arc::from(key),
        group: Arc::from(group),
        value: Some(Arc::from(format!("+{key}/{}/{seq}", owner.0).as_bytes())),
        version: version(seq << 16, owner.0, seq),
    }
}

/// The durable store (in a temp dir, returned with it) and the in-memory one: the overlay
/// must behave the same in both.
fn both(opts: StoreOptions) -> Vec<(Store, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    let durable = Store::open(dir.path(), opts.clone()).unwrap();
    vec![
        (durable, Some(dir)),
        (Store::in_memory(NodeId(1), 1, opts), None),
    ]
}

/// Three records of HOST (a, b in web; c in db), one of OTHER (d in web), one local (e).
fn seed(rt: &tokio::runtime::Runtime, store: &Store) {
    let report = rt
        .block_on(store.apply(records(vec![
            owned("a", "web", HOST, 1),
            owned("b", "web", HOST, 2),
            owned("c", "db", HOST, 3),
            owned("d", "web", OTHER, 1),
        ])))
        .unwrap();
    assert_eq!(report.applied(), 4);
    rt.block_on(store.write(vec![put("e", "web", "1", true)]))
        .unwrap();
}

fn keys(entries: &[Entry]) -> Vec<&str> {
    entries.iter().map(Entry::key).collect()
}

fn held(view: &View) -> Vec<&str> {
    view.held.keys().map(String::as_str).collect()
}

fn hide(rt: &tokio::runtime::Runtime, store: &Store, owner: NodeId) -> OverlayChange {
    rt.block_on(store.set_owner_down(owner, true)).unwrap()
}

fn show(rt: &tokio::runtime::Runtime, store: &Store, owner: NodeId) -> OverlayChange {
    rt.block_on(store.set_owner_down(owner, false)).unwrap()
}

/// The changes of the next item, which must be a delta: (key, live, hidden).
fn delta(rt: &tokio::runtime::Runtime, cursor: &mut Cursor) -> Vec<(String, bool, bool)> {
    changes_of(&next(rt, cursor))
}

/// The changes of a delta: (key, live, hidden).
fn changes_of(item: &WatchItem) -> Vec<(String, bool, bool)> {
    match item {
        WatchItem::Delta { changes, .. } => changes
            .iter()
            .map(|c| {
                let e = &c.entry;
                (e.key().to_owned(), e.is_live(), e.is_hidden())
            })
            .collect(),
        other => panic!("expected a delta, got {other:?}"),
    }
}

fn hidden(key: &str) -> (String, bool, bool) {
    (key.to_owned(), false, true)
}

fn shown(key: &str) -> (String, bool, bool) {
    (key.to_owned(), true, false)
}

/// A fresh watch of `scope`, followed to the store's revision, in chunks of 2.
fn fresh_view(rt: &tokio::runtime::Runtime, store: &Store, scope: Option<&str>) -> View {
    let mut cursor = store.watch(scope.map(Arc::from), None, 2);
    let mut view = View::default();
    view.follow(rt, &mut cursor, store.stats().revision);
    view
}

#[test]
fn a_down_owners_records_leave_listings_and_watches_and_come_back_when_it_is_up() {
    let rt = rt();
    for (store, dir) in both(opts()) {
        let durable = dir.is_some();
        seed(&rt, &store);
        let mut web = store.watch(Some(Arc::from("web")), None, 100);
        let mut all = store.watch(None, None, 100);
        let (mut web_view, mut all_view) = (View::default(), View::default());
        web_view.follow(&rt, &mut web, store.stats().revision);
        all_view.follow(&rt, &mut all, store.stats().revision);
        assert_eq!(held(&web_view), ["a", "b", "d", "e"]);
        let before = store.stats().revision;

        let change = hide(&rt, &store, HOST);
        assert_eq!(
            change,
            OverlayChange {
                changed: true,
                records: 3
            }
        );
        assert_eq!(store.down_owners(), BTreeSet::from([HOST]));
        assert_eq!(
            store.stats().revision,
            before + 3,
            "one revision per record"
        );
        assert_eq!(keys(&store.list("web", Filter::All)), ["d", "e"]);
        assert_eq!(keys(&store.list("web", Filter::RoutableOnly)), ["d", "e"]);
        assert!(store.list("db", Filter::All).is_empty());
        assert!(
            store.get_live("a").is_some_and(|e| e.is_live()),
            "a point lookup still finds it"
        );
        assert_eq!(store.stats().live, 5, "the index keeps every record");

        // Watchers see removals, as hidden views, in the order the records were written.
        let item = next(&rt, &mut web);
        assert_eq!(changes_of(&item), [hidden("a"), hidden("b")], "{durable}");
        web_view.apply(item);
        assert_eq!(held(&web_view), ["d", "e"]);
        let item = next(&rt, &mut all);
        assert_eq!(changes_of(&item), [hidden("a"), hidden("b"), hidden("c")]);
        all_view.apply(item);
        assert_eq!(held(&all_view), ["d", "e"]);
        // New watchers' snapshots (group and whole store, in chunks) skip them.
        assert_eq!(held(&fresh_view(&rt, &store, Some("web"))), ["d", "e"]);
        assert_eq!(held(&fresh_view(&rt, &store, None)), ["d", "e"]);

        let change = show(&rt, &store, HOST);
        assert_eq!(change.records, 3);
        assert!(store.down_owners().is_empty());
        assert_eq!(keys(&store.list("web", Filter::All)), ["a", "b", "d", "e"]);
        assert_eq!(keys(&store.list("db", Filter::All)), ["c"]);
        let item = next(&rt, &mut web);
        assert_eq!(changes_of(&item), [shown("a"), shown("b")]);
        web_view.apply(item);
        assert_eq!(held(&web_view), ["a", "b", "d", "e"]);
        let item = next(&rt, &mut all);
        assert_eq!(changes_of(&item), [shown("a"), shown("b"), shown("c")]);
        all_view.apply(item);
        assert_eq!(held(&all_view), ["a", "b", "c", "d", "e"]);
        // Shown again as they are: same value and version, under the new revision.
        let back = &all_view.held["c"];
        let real = store.get_live("c").unwrap();
        assert_eq!(
            (back.value(), back.version()),
            (real.value(), real.version())
        );
        assert!(back.rev() > before + 3 && back.routable());
        assert_eq!(held(&fresh_view(&rt, &store, None)), held(&all_view));
    }
}

#[test]
fn a_page_counts_hidden_records_as_looked_at() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, opts());
    // k0..k9 in web: even ones owned by HOST, odd ones by OTHER.
    let batch = (0..10)
        .map(|i| {
            let owner = if i % 2 == 0 { HOST } else { OTHER };
            owned(&format!("k{i}"), "web", owner, i + 1)
        })
        .collect();
    rt.block_on(store.apply(records(batch))).unwrap();
    hide(&rt, &store, HOST);
    let (first, next_after) = store.list_page("web", Filter::All, None, 2, 4);
    assert_eq!(keys(&first), ["k1", "k3"]);
    assert_eq!(next_after.as_deref(), Some("k3"));
    let (page, after) = store.list_page("web", Filter::All, Some("k3"), 10, 3);
    assert_eq!(keys(&page), ["k5"], "looked at k4, k5, k6");
    assert_eq!(after.as_deref(), Some("k6"));
    let (page, after) = store.list_page("web", Filter::All, Some("k7"), 10, 10);
    assert_eq!((keys(&page), after), (vec!["k9"], None));
}

#[test]
fn a_watcher_resumes_across_overlay_changes_from_the_log() {
    let rt = rt();
    for (store, _dir) in both(opts()) {
        seed(&rt, &store);
        let mut cursor = store.watch(Some(Arc::from("web")), None, 100);
        let mut view = View::default();
        view.follow(&rt, &mut cursor, store.stats().revision);
        let token = view.token.unwrap();
        drop(cursor);
        hide(&rt, &store, HOST);
        let mut resumed = store.watch(Some(Arc::from("web")), Some(token), 100);
        assert_eq!(delta(&rt, &mut resumed), [hidden("a"), hidden("b")]);
        drop(resumed);
        show(&rt, &store, HOST);
        let mut resumed = store.watch(Some(Arc::from("web")), Some(token), 100);
        // Hidden, then shown: coalesced to the latest change of each key.
        assert_eq!(delta(&rt, &mut resumed), [shown("a"), shown("b")]);
    }
}

#[test]
fn a_token_behind_the_log_and_older_than_an_overlay_change_gets_a_reset() {
    let rt = rt();
    for (store, _dir) in both(small_log(4)) {
        seed(&rt, &store);
        let mut cursor = store.watch(None, None, 100);
        let mut view = View::default();
        view.follow(&rt, &mut cursor, store.stats().revision);
        let before = view.token.unwrap();
        hide(&rt, &store, HOST);
        view.follow(&rt, &mut cursor, store.stats().revision);
        let after = view.token.unwrap();
        drop(cursor);
        // A record of the down owner arrives, then enough writes to push the log past both
        // tokens.
        rt.block_on(store.apply(records(vec![owned("g", "web", HOST, 4)])))
            .unwrap();
        for i in 0..6 {
            rt.block_on(store.write(vec![put(&format!("f{i}"), "web", "1", true)]))
                .unwrap();
        }
        assert!(
            store.feed().floor() > after.rev,
            "both tokens are behind the log"
        );

        // From before the overlay change: the stored rows cannot tell what it hid.
        let mut old = store.watch(None, Some(before), 100);
        let mut view = View::default();
        view.apply(next(&rt, &mut old));
        assert_eq!(view.resets, 1, "a new snapshot, never a silent skip");
        view.follow(&rt, &mut old, store.stats().revision);
        assert_eq!(held(&view), ["d", "e", "f0", "f1", "f2", "f3", "f4", "f5"]);

        // From after it: a catch-up from the rows, the down owner's new record hidden.
        let mut recent = store.watch(None, Some(after), 100);
        let mut changes = delta(&rt, &mut recent);
        changes.sort();
        let mut expected = vec![hidden("g")];
        expected.extend((0..6).map(|i| shown(&format!("f{i}"))));
        expected.sort();
        assert_eq!(changes, expected);
    }
}

#[test]
fn the_down_set_survives_a_restart_and_tokens_from_before_its_change_reset() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), opts()).unwrap();
    seed(&rt, &store);
    let mut cursor = store.watch(None, None, 100);
    let mut view = View::default();
    view.follow(&rt, &mut cursor, store.stats().revision);
    let before = view.token.unwrap();
    hide(&rt, &store, HOST);
    view.follow(&rt, &mut cursor, store.stats().revision);
    let after = view.token.unwrap();
    drop(cursor);
    store.close();
    drop(store);

    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.down_owners(), BTreeSet::from([HOST]));
    assert_eq!(keys(&store.list("web", Filter::All)), ["d", "e"]);
    assert_eq!(held(&fresh_view(&rt, &store, None)), ["d", "e"]);
    // The rebuilt log lacks the overlay's changes: a token from before them resets...
    let mut old = store.watch(None, Some(before), 100);
    assert!(matches!(
        next(&rt, &mut old),
        WatchItem::Snapshot { reset: true, .. }
    ));
    // ...one from after them resumes, and the down owner's new record arrives hidden.
    let mut recent = store.watch(None, Some(after), 100);
    rt.block_on(store.apply(records(vec![owned("g", "web", HOST, 4)])))
        .unwrap();
    assert_eq!(delta(&rt, &mut recent), [hidden("g")]);
    drop(recent);
    store.close();
    drop(store);

    // Changes of the log rebuilt at open are views too.
    let store = Store::open(dir.path(), opts()).unwrap();
    let mut recent = store.watch(None, Some(after), 100);
    assert_eq!(delta(&rt, &mut recent), [hidden("g")]);
    assert_eq!(show(&rt, &store, HOST).records, 4);
    store.close();
    drop((recent, store));

    let store = Store::open(dir.path(), opts()).unwrap();
    assert!(store.down_owners().is_empty());
    assert_eq!(
        keys(&store.list("web", Filter::All)),
        ["a", "b", "d", "e", "g"]
    );
}

#[test]
fn the_own_node_is_refused_and_asking_twice_changes_nothing() {
    let rt = rt();
    for (store, _dir) in both(opts()) {
        seed(&rt, &store);
        let revision = store.stats().revision;
        let own = rt.block_on(store.set_owner_down(store.node(), true));
        assert!(
            matches!(own, Err(StoreError::OwnNode(n)) if n == store.node()),
            "{own:?}"
        );
        assert_eq!(keys(&store.list("web", Filter::All)), ["a", "b", "d", "e"]);
        assert_eq!(
            show(&rt, &store, OTHER),
            OverlayChange::default(),
            "already up"
        );
        assert!(store.down_owners().is_empty());
        assert_eq!(store.stats().revision, revision);

        assert!(hide(&rt, &store, HOST).changed);
        let revision = store.stats().revision;
        let mut cursor = store.watch(None, None, 100);
        let mut view = View::default();
        view.follow(&rt, &mut cursor, revision);
        assert_eq!(hide(&rt, &store, HOST), OverlayChange::default());
        assert_eq!(store.stats().revision, revision, "no revision taken");
        let quiet = rt.block_on(async {
            tokio::time::timeout(Duration::from_millis(100), cursor.next()).await
        });
        assert!(quiet.is_err(), "nothing published: {quiet:?}");
    }
}

#[test]
fn a_record_of_a_down_owner_stays_hidden_until_a_live_owner_overwrites_it() {
    let rt = rt();
    for (store, _dir) in both(opts()) {
        assert_eq!(
            hide(&rt, &store, HOST),
            OverlayChange {
                changed: true,
                records: 0
            }
        );
        let mut cursor = store.watch(Some(Arc::from("web")), None, 100);
        let mut view = View::default();
        view.follow(&rt, &mut cursor, store.stats().revision);
        let apply = |r: Record| {
            let report = rt.block_on(store.apply(records(vec![r]))).unwrap();
            assert_eq!(report.applied(), 1);
        };

        apply(owned("k1", "web", HOST, 1));
        assert_eq!(delta(&rt, &mut cursor), [hidden("k1")]);
        assert!(store.list("web", Filter::All).is_empty());
        assert!(store.get_live("k1").is_some());
        // Another owner's newer version: its owner is up, so it shows.
        apply(owned("k1", "web", OTHER, 2));
        assert_eq!(delta(&rt, &mut cursor), [shown("k1")]);
        assert_eq!(keys(&store.list("web", Filter::All)), ["k1"]);
        // And the other way: a visible record taken over by the down owner hides.
        apply(owned("k2", "web", OTHER, 3));
        assert_eq!(delta(&rt, &mut cursor), [shown("k2")]);
        apply(owned("k2", "web", HOST, 4));
        assert_eq!(delta(&rt, &mut cursor), [hidden("k2")]);
        assert_eq!(keys(&store.list("web", Filter::All)), ["k1"]);

        assert_eq!(
            show(&rt, &store, HOST).records,
            1,
            "k2 only: k1 is OTHER's now"
        );
        assert_eq!(delta(&rt, &mut cursor), [shown("k2")]);
        assert_eq!(keys(&store.list("web", Filter::All)), ["k1", "k2"]);
    }
}

#[test]
fn a_full_disk_does_not_hold_back_a_hide() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let fp = Arc::new(Failpoints::default());
    let opts = StoreOptions {
        failpoints: fp.clone(),
        ..opts()
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    hides_with_the_disk_full(&rt, &store, &fp);
    // The simulations' store (no writer thread) does the same.
    let fp = Arc::new(Failpoints::default());
    let opts = StoreOptions {
        failpoints: fp.clone(),
        ..opts
    };
    hides_with_the_disk_full(&rt, &Store::in_memory(NodeId(1), 1, opts.clone()), &fp);
    // A lean store reads the owner's rows to hide them, from the full disk.
    let dir = tempfile::tempdir().unwrap();
    let fp = Arc::new(Failpoints::default());
    let opts = StoreOptions {
        failpoints: fp.clone(),
        lean: true,
        ..opts
    };
    let store = Store::open(dir.path(), opts).unwrap();
    seed(&rt, &store);
    let revision = store.stats().revision;
    fp.arm(InjectedFault::DiskFull);
    assert_eq!(hide(&rt, &store, HOST).records, 3, "lean");
    assert_eq!(store.stats().revision, revision + 3, "lean");
    assert_eq!(show(&rt, &store, HOST).records, 3, "lean, shown again");
}

fn hides_with_the_disk_full(rt: &tokio::runtime::Runtime, store: &Store, fp: &Failpoints) {
    seed(rt, store);
    let revision = store.stats().revision;
    fp.arm(InjectedFault::DiskFull);
    // Applied in memory at once (persisted by the next commit that succeeds).
    assert_eq!(hide(rt, store, HOST).records, 3);
    assert!(store.down_owners().contains(&HOST));
    assert_eq!(store.stats().revision, revision + 3);
    assert_eq!(store.list("web", Filter::All).len(), 2, "a and b hidden");
    // Asked again once space returns: nothing left to change.
    assert_eq!(hide(rt, store, HOST).records, 0);
}
