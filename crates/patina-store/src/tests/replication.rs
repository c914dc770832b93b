//! The surface the gossip layer stands on: apply outcomes and refusals, per-origin knowledge
//! (persisted, closed by covered ranges), range reads by origin, one `(origin, seq)` naming
//! one record, kinds, schema migration, and the injected clock.

use std::sync::Arc;

use super::*;

fn clock_at(ms: u64) -> (Arc<ManualClock>, StoreOptions) {
    let clock = Arc::new(ManualClock::new(ms));
    let opts = StoreOptions {
        clock: clock.clone(),
        ..opts()
    };
    (clock, opts)
}

fn known(store: &Store, origin: u64) -> (u64, Vec<(u64, u64)>) {
    let d = store.digest();
    let k = d.get(&NodeId(origin)).cloned().unwrap_or_default();
    (k.head(), k.gaps().map(|g| (g.lo(), g.hi())).collect())
}

fn range(lo: u64, hi: u64) -> SeqRange {
    SeqRange::new(lo, hi).unwrap()
}

#[test]
fn every_record_gets_an_outcome_and_refusals_are_counted_per_origin() {
    let rt = rt();
    let (_clock, opts) = clock_at(10_000_000);
    let store = Store::in_memory(NodeId(100), 1, opts);
    let first = remote(
        "k1",
        version(Hlc::from_physical_ms(9_000_000).0, 7, 1),
        false,
    );
    let older = remote(
        "k1",
        version(Hlc::from_physical_ms(8_000_000).0, 8, 1),
        false,
    );
    let ahead = remote(
        "k2",
        version(
            Hlc::from_physical_ms(10_000_000 + MAX_CLOCK_AHEAD_MS + 1).0,
            7,
            2,
        ),
        false,
    );
    let long = remote(&"x".repeat(MAX_KEY_LEN + 1), version(1, 9, 1), false);
    let zero = remote("k3", version(1, 9, 0), false);
    let report = rt
        .block_on(store.apply(records(vec![
            first.clone(),
            first.clone(),
            older,
            ahead,
            long,
            zero,
        ])))
        .unwrap();
    assert_eq!(
        report.records,
        vec![
            ApplyOutcome::Applied,
            ApplyOutcome::Covered, // the same version again
            ApplyOutcome::Covered, // an older version of a key held newer: known, not applied
            ApplyOutcome::Refused(Refusal::ClockAhead {
                ahead_ms: MAX_CLOCK_AHEAD_MS + 1
            }),
            ApplyOutcome::Refused(Refusal::KeyTooLong),
            ApplyOutcome::Refused(Refusal::BadSeq),
        ]
    );
    assert_eq!(store.get_latest("k1"), Some(first));
    assert!(store.get_latest("k2").is_none());
    // Origin 8's version is known although nothing of it is held; origin 7's refused seq 2
    // stays unknown, so anti-entropy will offer it again.
    assert_eq!(known(&store, 8), (1, vec![]));
    assert_eq!(known(&store, 7), (1, vec![]));
    let refusals = store.refusals();
    assert_eq!(refusals[&NodeId(7)].count, 1);
    assert!(matches!(
        refusals[&NodeId(7)].last,
        Refusal::ClockAhead { .. }
    ));
    assert_eq!(refusals[&NodeId(9)].count, 2);
    assert!(!refusals.contains_key(&NodeId(8)));
}

/// A kind that refuses values that are not UTF-8, to see refusals by the kind.
struct Utf8Kind;

impl Kind for Utf8Kind {
    fn name(&self) -> &'static str {
        "utf8"
    }

    fn flags(&self, _: &[u8]) -> Flags {
        Flags { routable: true }
    }

    fn check(&self, _: &str, _: &str, value: Option<&[u8]>) -> Result<(), String> {
        std::str::from_utf8(value.unwrap_or_default()).map_err(|e| e.to_string())?;
        Ok(())
    }
}

#[test]
fn the_kind_checks_values_from_peers_and_derives_their_flags() {
    let rt = rt();
    let opts = StoreOptions {
        kind: Arc::new(Utf8Kind),
        ..opts()
    };
    let store = Store::in_memory(NodeId(100), 1, opts);
    let mut bad = remote("k", version(5, 3, 1), false);
    bad.value = Some(Arc::from(&b"\xff\xfe"[..]));
    let good = remote("k", version(4, 3, 2), false);
    let report = rt.block_on(store.apply(records(vec![bad, good]))).unwrap();
    assert!(matches!(
        report.records[0],
        ApplyOutcome::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(report.records[1], ApplyOutcome::Applied);
    assert!(
        store.get_live("k").unwrap().routable(),
        "flags come from the kind"
    );
    // Seq 1 was refused: it stays a gap below the head.
    assert_eq!(known(&store, 3), (2, vec![(1, 1)]));
}

#[test]
fn out_of_order_versions_open_gaps_that_later_versions_and_covered_ranges_close() {
    let rt = rt();
    let store = Store::in_memory(NodeId(100), 1, opts());
    let apply = |batch: RemoteBatch| rt.block_on(store.apply(batch)).unwrap();
    apply(records(vec![remote("a", version(1, 5, 1), false)]));
    apply(records(vec![remote("b", version(9, 5, 9), false)]));
    assert_eq!(known(&store, 5), (9, vec![(2, 8)]));
    apply(records(vec![remote("c", version(4, 5, 4), false)]));
    assert_eq!(known(&store, 5), (9, vec![(2, 3), (5, 8)]));
    // "Covered, nothing left": seqs 2..=3 and 5..=8 were superseded at the peer.
    let report = apply(RemoteBatch {
        records: vec![],
        covered: vec![(NodeId(5), range(2, 3)), (NodeId(5), range(5, 8))],
    });
    assert_eq!(report.covered, vec![ApplyOutcome::Covered; 2]);
    assert_eq!(known(&store, 5), (9, vec![]));
    // A covered range above the head moves the head: those numbers are known to be empty.
    apply(RemoteBatch {
        records: vec![],
        covered: vec![(NodeId(6), range(3, 4))],
    });
    assert_eq!(known(&store, 6), (4, vec![(1, 2)]));
    assert_eq!(store.stats().live, 3, "covered ranges carry no record");
}

#[test]
fn knowledge_is_persisted_with_the_records_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let store = Store::open(dir.path(), opts()).unwrap();
        rt.block_on(store.apply(RemoteBatch {
            records: vec![
                remote("a", version(1, 5, 1), false),
                remote("b", version(2, 5, 7), false),
            ],
            covered: vec![(NodeId(6), range(1, 3))],
        }))
        .unwrap();
        rt.block_on(store.write(vec![put("m", "web", "x", true)]))
            .unwrap();
        store.close();
    }
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(known(&store, 5), (7, vec![(2, 6)]));
    assert_eq!(known(&store, 6), (3, vec![]));
    assert_eq!(known(&store, store.node().0), (1, vec![]));
}

#[test]
fn a_range_read_returns_records_newest_first_and_marks_superseded_numbers_covered() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    // Our own origin writes seq 1..=6: a1, b1, a2 (supersedes 1), c1, b2 (supersedes 2), d.
    for (key, value) in [
        ("a", "1"),
        ("b", "1"),
        ("a", "2"),
        ("c", "1"),
        ("b", "2"),
        ("d", "1"),
    ] {
        rt.block_on(store.write(vec![put(key, "g", value, true)]))
            .unwrap();
    }
    let me = store.node();
    let budget = ReadBudget {
        max_records: 100,
        max_bytes: 1 << 20,
    };
    let all = rt
        .block_on(store.read_origin(me, range(1, 6), budget))
        .unwrap();
    let seqs: Vec<u64> = all.records.iter().map(|r| r.version.seq).collect();
    assert_eq!(seqs, vec![6, 5, 4, 3], "current records, newest first");
    assert_eq!(
        all.covered,
        vec![range(1, 2)],
        "superseded: covered, nothing left"
    );
    assert_eq!(all.rest, None);
    // A budget of two records: the newest two, and the rest of the range to ask for next.
    let budget = ReadBudget {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    let part = rt
        .block_on(store.read_origin(me, range(1, 6), budget))
        .unwrap();
    assert_eq!(part.records.len(), 2);
    assert_eq!(part.covered, vec![]);
    assert_eq!(part.rest, Some(range(1, 4)));
    let next = rt
        .block_on(store.read_origin(me, range(1, 4), budget))
        .unwrap();
    let seqs: Vec<u64> = next.records.iter().map(|r| r.version.seq).collect();
    assert_eq!((seqs, next.rest), (vec![4, 3], Some(range(1, 2))));
    let last = rt
        .block_on(store.read_origin(me, range(1, 2), budget))
        .unwrap();
    assert_eq!(
        (last.records.len(), last.covered, last.rest),
        (0, vec![range(1, 2)], None)
    );
    // Numbers not known are never claimed covered.
    let beyond = rt
        .block_on(store.read_origin(me, range(5, 50), budget))
        .unwrap();
    assert_eq!(beyond.covered, vec![]);
    // The in-memory store answers the same.
    let mem = Store::in_memory(NodeId(100), 1, opts());
    for (key, value) in [
        ("a", "1"),
        ("b", "1"),
        ("a", "2"),
        ("c", "1"),
        ("b", "2"),
        ("d", "1"),
    ] {
        rt.block_on(mem.write(vec![put(key, "g", value, true)]))
            .unwrap();
    }
    let budget = ReadBudget {
        max_records: 100,
        max_bytes: 1 << 20,
    };
    let m = rt
        .block_on(mem.read_origin(NodeId(100), range(1, 6), budget))
        .unwrap();
    assert_eq!(
        m.records.iter().map(|r| r.version.seq).collect::<Vec<_>>(),
        vec![6, 5, 4, 3]
    );
    assert_eq!(m.covered, vec![range(1, 2)]);
}

#[test]
fn a_record_of_our_own_origin_that_we_never_wrote_moves_the_store_to_a_fresh_origin() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("a", "g", "1", true), put("b", "g", "1", true)]))
        .unwrap();
    let old = store.node();
    // Its copy, elsewhere, wrote seq 3 (and a different b at seq 2).
    let copy3 = remote("c", version(u64::from(u16::MAX), old.0, 3), false);
    let report = rt
        .block_on(store.apply(records(vec![copy3.clone()])))
        .unwrap();
    // Taken, as the copy's (the old origin is another's now), and adopted.
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    let new = store.node();
    assert_ne!(new, old, "moved to a fresh origin");
    assert!(
        new.0 > old.0,
        "a fresh origin above the old one: a rename wins its ties"
    );
    assert!(!store.refusals().contains_key(&old), "nothing refused");
    // Its records and the copy's were renamed under the new origin, each keeping its
    // timestamp (a stale one must never win over a newer write), and what it knew of the old
    // origin is forgotten but for the copy's number it took.
    for (key, hlc) in [("a", None), ("b", None), ("c", Some(copy3.version.hlc))] {
        let held = store.get_latest(key).unwrap();
        assert_eq!(held.version.origin, new, "{key}");
        if let Some(hlc) = hlc {
            assert_eq!(held.version.hlc, hlc, "{key} keeps its timestamp");
        }
    }
    assert_eq!(known(&store, old.0), (3, vec![(1, 2)]));
    let v = rt
        .block_on(store.write(vec![put("d", "g", "1", true)]))
        .unwrap()[0];
    assert_eq!((v.origin, v.seq), (new, 4));
    // The old origin is now just another origin: its copy's record coming again is known.
    let again = rt.block_on(store.apply(records(vec![copy3]))).unwrap();
    assert_eq!(again.records, vec![ApplyOutcome::Covered]);
    // Tokens of the old identity reset: its revisions may have diverged in the copy.
    store.close();
    drop(store);
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.node(), new, "the move is durable");
    assert_eq!(known(&store, old.0), (3, vec![(1, 2)]));
}

/// A record of our own origin the kind refuses (a forged one: a bad signature in the global
/// tier) is no evidence of a copy: the store does not move, and refuses it.
#[test]
fn a_forged_record_of_our_own_origin_is_refused_without_a_move() {
    let rt = rt();
    let opts = StoreOptions {
        kind: Arc::new(Utf8Kind),
        ..opts()
    };
    let store = Store::in_memory(NodeId(100), 1, opts);
    rt.block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap();
    let me = store.node();
    let mut forged = remote("c", version(u64::from(u16::MAX), me.0, 1_000), false);
    forged.value = Some(Arc::from(&b"\xff\xfe"[..]));
    let report = rt.block_on(store.apply(records(vec![forged]))).unwrap();
    assert!(matches!(
        report.records[0],
        ApplyOutcome::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(store.node(), me, "no move");
    assert!(store.get_latest("c").is_none());
    // A valid one still moves it (a real copy).
    let copy = remote("c", version(u64::from(u16::MAX), me.0, 1_001), false);
    let report = rt.block_on(store.apply(records(vec![copy]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    assert_ne!(store.node(), me);
}

#[test]
fn a_conflicting_version_below_our_head_is_detected_too() {
    let rt = rt();
    let store = Store::in_memory(NodeId(100), 1, opts());
    let v = rt
        .block_on(store.write(vec![put("a", "g", "mine", true)]))
        .unwrap()[0];
    // Same (origin, seq), another value and a later timestamp: we never wrote that.
    let mut theirs = remote(
        "a",
        Version {
            hlc: Hlc(v.hlc.0 + 1),
            ..v
        },
        false,
    );
    theirs.value = Some(Arc::from(&b"theirs"[..]));
    let report = rt.block_on(store.apply(records(vec![theirs]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    assert_ne!(store.node(), NodeId(100));
    // The later write (theirs) stands, renamed with its timestamp.
    let held = store.get_latest("a").unwrap();
    assert_eq!(held.value.as_deref(), Some(&b"theirs"[..]));
    assert_eq!(
        (held.version.origin, held.version.hlc),
        (store.node(), Hlc(v.hlc.0 + 1))
    );
    // Our own write coming back is simply covered.
    let store = Store::in_memory(NodeId(200), 1, opts());
    let v = rt
        .block_on(store.write(vec![put("a", "g", "x", true)]))
        .unwrap()[0];
    let back = store.get_latest("a").unwrap();
    assert_eq!(back.version, v);
    let report = rt.block_on(store.apply(records(vec![back]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Covered]);
    assert_eq!(store.node(), NodeId(200));
}

#[test]
fn remote_timestamps_far_ahead_of_the_wall_clock_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    let future = remote("k", version(u64::MAX - 1, 1, 1), false);
    let report = rt.block_on(store.apply(records(vec![future]))).unwrap();
    assert!(matches!(
        report.records[0],
        ApplyOutcome::Refused(Refusal::ClockAhead { .. })
    ));
    assert!(store.get_latest("k").is_none());
    assert_eq!(
        store.refusals()[&NodeId(1)].count,
        1,
        "visible in status, not silent"
    );
    // Local writes still get timestamps near the wall clock.
    let v = rt
        .block_on(store.write(vec![put("m", "web", "x", true)]))
        .unwrap()[0];
    let now_ms = SystemClock.now_ms();
    assert!(v.hlc.physical_ms().abs_diff(now_ms) < 60_000);
}

#[test]
fn the_injected_clock_stamps_local_writes() {
    let rt = rt();
    let (clock, opts) = clock_at(1_000_000);
    let store = Store::in_memory(NodeId(1), 1, opts);
    let a = rt
        .block_on(store.write(vec![put("a", "g", "1", true)]))
        .unwrap()[0];
    clock.advance(5_000);
    let b = rt
        .block_on(store.write(vec![put("b", "g", "1", true)]))
        .unwrap()[0];
    assert_eq!(
        (a.hlc.physical_ms(), b.hlc.physical_ms()),
        (1_000_000, 1_005_000)
    );
}

#[test]
fn a_store_is_opened_only_as_the_kind_it_was_made_with() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), opts()).unwrap().close();
    let as_utf8 = StoreOptions {
        kind: Arc::new(Utf8Kind),
        ..opts()
    };
    match Store::open(dir.path(), as_utf8) {
        Err(StoreError::WrongKind { stored, wanted }) => {
            assert_eq!((stored.as_str(), wanted), ("opaque", "utf8"));
        }
        Err(e) => panic!("expected WrongKind, got {e}"),
        Ok(_) => panic!("expected WrongKind, got a store"),
    }
}

#[test]
fn a_version_1_store_is_migrated_with_conservative_knowledge() {
    let dir = tempfile::tempdir().unwrap();
    {
        // The schema and rows exactly as version 1 wrote them.
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch(
            "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE records (rev INTEGER PRIMARY KEY, key TEXT NOT NULL, grp TEXT NOT NULL,
                 value BLOB, routable INTEGER NOT NULL, hlc INTEGER NOT NULL,
                 origin INTEGER NOT NULL, seq INTEGER NOT NULL);
             INSERT INTO meta VALUES ('schema_version', 1), ('node_id', 77), ('local_seq', 4),
                 ('hlc', 900), ('revision', 3);
             INSERT INTO records VALUES (1, 'm1', 'web', X'2b61', 1, 100, 77, 2);
             INSERT INTO records VALUES (2, 'm2', 'web', NULL, 0, 200, 77, 4);
             INSERT INTO records VALUES (3, 'r1', 'db', X'62', 0, 300, 9, 5);",
        )
        .unwrap();
    }
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.node(), NodeId(77));
    assert_eq!(store.get_live("m1").unwrap().value(), Some(&b"+a"[..]));
    assert!(store.get_live("m1").unwrap().routable());
    assert!(store.get_latest("m2").unwrap().value.is_none());
    assert_eq!(
        known(&store, 77),
        (4, vec![]),
        "our own origin: everything we issued"
    );
    assert_eq!(
        known(&store, 9),
        (5, vec![(1, 4)]),
        "others: only what we hold"
    );
    let v = rt
        .block_on(store.write(vec![put("m3", "web", "x", true)]))
        .unwrap()[0];
    assert_eq!(v.seq, 5);
    store.close();
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let version: i64 = conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, 2);
}

#[test]
fn a_newer_schema_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path(), opts()).unwrap().close();
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute(
        "UPDATE meta SET value = 99 WHERE name = 'schema_version'",
        [],
    )
    .unwrap();
    drop(conn);
    assert!(matches!(
        Store::open(dir.path(), opts()),
        Err(StoreError::Schema(99))
    ));
}

#[test]
fn a_restored_store_can_be_started_under_a_fresh_origin() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = Store::open(dir.path(), opts()).unwrap();
    rt.block_on(store.write(vec![put("a", "g", "1", true), put("b", "g", "1", true)]))
        .unwrap();
    let old = store.node();
    store.close();
    drop(store);
    let renew = StoreOptions {
        renew_origin: true,
        ..opts()
    };
    let store = Store::open(dir.path(), renew).unwrap();
    let new = store.node();
    assert_ne!(new, old);
    assert_eq!(
        known(&store, old.0),
        (2, vec![]),
        "what the old origin issued stays known"
    );
    let v = rt
        .block_on(store.write(vec![put("c", "g", "1", true)]))
        .unwrap()[0];
    assert_eq!((v.origin, v.seq), (new, 1));
    assert!(store.get_live("a").is_some(), "records are kept");
    store.close();
    drop(store);
    // Durable, and not renewed again unless asked.
    let store = Store::open(dir.path(), opts()).unwrap();
    assert_eq!(store.node(), new);
}

#[test]
fn sequence_numbers_past_the_largest_are_refused_and_wide_reads_miss_nothing() {
    let rt = rt();
    let dir = tempfile::tempdir().unwrap();
    let durable = Store::open(dir.path(), opts()).unwrap();
    let mem = Store::in_memory(NodeId(100), 1, opts());
    let batch = records(vec![
        remote("a", version(1, 7, 1), false),
        remote("b", version(2, 7, 2), false),
        remote("c", version(3, 7, 3), false),
        remote("d", version(4, 7, u64::MAX), false),
        remote("e", version(4, 7, MAX_SEQ + 1), false),
    ]);
    for store in [&durable, &mem] {
        let report = rt.block_on(store.apply(batch.clone())).unwrap();
        assert_eq!(report.records[3], ApplyOutcome::Refused(Refusal::BadSeq));
        assert_eq!(report.records[4], ApplyOutcome::Refused(Refusal::BadSeq));
        assert_eq!(known(store, 7), (3, vec![]));
        // "Everything of origin 7": the widest range there is. Both stores answer the same:
        // three records, nothing covered.
        let all = rt
            .block_on(store.read_origin(
                NodeId(7),
                range(1, MAX_SEQ),
                ReadBudget {
                    max_records: 100,
                    max_bytes: 1 << 20,
                },
            ))
            .unwrap();
        let seqs: Vec<u64> = all.records.iter().map(|r| r.version.seq).collect();
        assert_eq!((seqs, all.covered, all.rest), (vec![3, 2, 1], vec![], None));
    }
}

/// A kind whose merge rule puts freshness (the value's first byte) before the version, as the
/// global tier's summaries will.
struct FreshnessKind;

impl Kind for FreshnessKind {
    fn name(&self) -> &'static str {
        "freshness"
    }

    fn flags(&self, _: &[u8]) -> Flags {
        Flags::default()
    }

    fn wins(&self, incoming: &Candidate<'_>, current: &Candidate<'_>) -> bool {
        let fresh = |c: &Candidate<'_>| c.value.and_then(|v| v.first().copied()).unwrap_or(0);
        (fresh(incoming), incoming.version) > (fresh(current), current.version)
    }
}

#[test]
fn a_local_write_the_kinds_rule_ranks_below_what_is_held_is_refused() {
    let rt = rt();
    let opts = StoreOptions {
        kind: Arc::new(FreshnessKind),
        ..opts()
    };
    let store = Store::in_memory(NodeId(1), 1, opts);
    let write = |value: &[u8]| {
        rt.block_on(store.write(vec![LocalWrite::Put {
            key: "k".into(),
            group: "g".into(),
            value: value.to_vec(),
        }]))
    };
    write(b"\x09fresh").unwrap();
    let before = store.stats();
    let err = write(b"\x01stale").unwrap_err();
    assert!(
        matches!(err, StoreError::Stale(ref k) if &**k == "k"),
        "{err}"
    );
    assert_eq!(store.stats().revision, before.revision, "nothing written");
    assert_eq!(
        store.get_live("k").unwrap().value(),
        Some(&b"\x09fresh"[..])
    );
    // Within one request too: the second op must beat the first.
    let err = rt
        .block_on(store.write(vec![
            LocalWrite::Put {
                key: "j".into(),
                group: "g".into(),
                value: b"\x05".to_vec(),
            },
            LocalWrite::Put {
                key: "j".into(),
                group: "g".into(),
                value: b"\x04".to_vec(),
            },
        ]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Stale(_)), "{err}");
    assert!(store.get_live("j").is_none(), "all or nothing");
    write(b"\x09fresher").unwrap();
}

#[test]
fn oversized_values_and_batches_from_peers_are_refused() {
    let rt = rt();
    let store = Store::in_memory(NodeId(1), 1, opts());
    let mut big = remote("k", version(1, 5, 1), false);
    big.value = Some(Arc::from(vec![b'+'; MAX_VALUE_LEN + 1]));
    let report = rt.block_on(store.apply(records(vec![big]))).unwrap();
    assert_eq!(
        report.records,
        vec![ApplyOutcome::Refused(Refusal::ValueTooLarge)]
    );
    let limit = opts().max_remote_batch_ops.get();
    let huge = records(
        (1..=limit as u64 + 1)
            .map(|s| remote(&format!("k{s}"), version(1, 6, s), false))
            .collect(),
    );
    let err = rt.block_on(store.apply(huge)).unwrap_err();
    assert!(matches!(err, StoreError::BatchTooLarge { .. }), "{err}");
    assert_eq!(store.stats().keys, 0, "nothing of it applied");
}

#[test]
fn two_copies_of_one_data_directory_converge_once_one_moves() {
    let rt = rt();
    let base = tempfile::tempdir().unwrap();
    let (da, db) = (base.path().join("a"), base.path().join("b"));
    {
        let store = Store::open(&da, opts()).unwrap();
        rt.block_on(store.write(vec![put("shared", "g", "1", true)]))
            .unwrap();
        store.close();
    }
    std::fs::create_dir_all(&db).unwrap();
    for f in std::fs::read_dir(&da).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), db.join(f.file_name())).unwrap();
    }
    let (a, b) = (
        Store::open(&da, opts()).unwrap(),
        Store::open(&db, opts()).unwrap(),
    );
    assert_eq!(a.node(), b.node(), "a copy: one origin, two stores");
    // Each writes under the shared origin: seq 2 names two different records.
    rt.block_on(a.write(vec![put("ka", "g", "a", true)]))
        .unwrap();
    rt.block_on(b.write(vec![put("kb", "g", "b", true)]))
        .unwrap();
    rt.block_on(b.write(vec![put("kb2", "g", "b", true)]))
        .unwrap();
    let keys = ["shared", "ka", "kb", "kb2"];
    let everything = |s: &Store| records(keys.iter().filter_map(|k| s.get_latest(k)).collect());
    // Full exchanges, both ways, as anti-entropy would do.
    for _ in 0..3 {
        let (to_b, to_a) = (everything(&a), everything(&b));
        rt.block_on(b.apply(to_b)).unwrap();
        rt.block_on(a.apply(to_a)).unwrap();
    }
    assert_ne!(a.node(), b.node(), "one of them moved to a fresh origin");
    for k in keys {
        let (x, y) = (a.get_latest(k), b.get_latest(k));
        assert!(x.is_some(), "{k} missing");
        assert_eq!(x, y, "{k} differs");
    }
}

/// A peer's fast clock does not spread: a record stamped 30 s ahead (within the 60 s refusal
/// bound) is applied, but this store's clock moves only to its wall clock plus
/// `max_clock_offset_ms`, so its own next write is not stamped 30 s ahead. Without the bound,
/// the clock adopted the peer's timestamp and every write of this store, and of everyone who
/// saw them, carried the fast clock on.
#[test]
fn a_peers_fast_clock_is_taken_only_up_to_the_bound() {
    let rt = rt();
    let (clock, opts) = clock_at(10_000_000);
    let store = Store::in_memory(NodeId(100), 1, opts);
    let fast = remote(
        "k",
        version(Hlc::from_physical_ms(10_030_000).0, 7, 1),
        false,
    );
    let report = rt.block_on(store.apply(records(vec![fast]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    let bound = DEFAULT_MAX_CLOCK_OFFSET_MS;
    assert!(
        store.view_hlc().physical_ms() <= 10_000_000 + bound,
        "the clock stays within the bound: {}",
        store.view_hlc().physical_ms()
    );
    clock.advance(10);
    let v = rt
        .block_on(store.write(vec![put("m", "web", "x", true)]))
        .unwrap()[0];
    assert!(
        v.hlc.physical_ms() <= 10_000_010 + bound,
        "a local write is stamped near the wall clock, not the peer's: {}",
        v.hlc.physical_ms()
    );
}

/// A wall clock stepped back after timestamps were issued: local writes are refused (they
/// would be stamped in the future, as far as peers can tell) until the wall clock is within
/// the bound of the store's clock again; the fence the gossip node sets refuses them too,
/// and reads go on.
#[test]
fn local_writes_are_refused_while_the_clock_is_off() {
    let rt = rt();
    let (clock, opts) = clock_at(10_000_000);
    let store = Store::in_memory(NodeId(100), 1, opts);
    rt.block_on(store.write(vec![put("a", "web", "x", true)]))
        .unwrap();
    clock.set(9_990_000); // stepped back 10 s
    let err = rt
        .block_on(store.write(vec![put("b", "web", "x", true)]))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::HlcAhead { lead_ms, .. } if lead_ms >= 9_999),
        "{err:?}"
    );
    assert!(store.get_latest("a").is_some(), "reads go on");
    assert!(
        store.clock_ahead_ms().is_some_and(|lead| lead >= 9_999),
        "reported, for readiness and the view"
    );
    clock.set(10_000_400); // caught up within the bound
    assert_eq!(store.clock_ahead_ms(), None);
    rt.block_on(store.write(vec![put("b", "web", "x", true)]))
        .unwrap();
    store.set_clock_fence(Some(ClockFence {
        offset_ms: -300_000,
        bound_ms: 500,
    }));
    let err = rt
        .block_on(store.write(vec![put("c", "web", "x", true)]))
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::ClockOffset {
                offset_ms: -300_000,
                ..
            }
        ),
        "{err:?}"
    );
    store.set_clock_fence(None);
    rt.block_on(store.write(vec![put("c", "web", "x", true)]))
        .unwrap();
}

/// A deletion decided on a scan (forgetting a member) names the version it read: a key
/// written again since is left alone, and the whole request changes nothing.
#[test]
fn a_conditional_deletion_spares_a_key_written_since_it_was_read() {
    let rt = rt();
    let (_clock, opts) = clock_at(10_000_000);
    let store = Store::in_memory(NodeId(100), 1, opts);
    let read = rt
        .block_on(store.write(vec![put("a", "web", "1", true), put("b", "web", "1", true)]))
        .unwrap();
    // "a" is written again after the scan read it.
    rt.block_on(store.write(vec![put("a", "web", "2", true)]))
        .unwrap();
    let err = rt
        .block_on(store.write(vec![
            LocalWrite::DeleteIf {
                key: "b".into(),
                version: read[1],
            },
            LocalWrite::DeleteIf {
                key: "a".into(),
                version: read[0],
            },
        ]))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Changed(k) if &**k == "a"),
        "{err:?}"
    );
    assert!(store.get_live("a").is_some() && store.get_live("b").is_some());
    rt.block_on(store.write(vec![LocalWrite::DeleteIf {
        key: "b".into(),
        version: read[1],
    }]))
    .unwrap();
    assert!(
        store.get_live("b").is_none(),
        "the version it read is deleted"
    );
}

/// A judgement about a version (a machine's health from its checks) is written as that
/// version's successor: one tick after it, only while it is the live one. A write made after
/// it anywhere, and a deletion, win over it at every store, whatever order they arrive in.
#[test]
fn a_successor_write_never_beats_a_later_write_or_deletion() {
    let rt = rt();
    let (clock, opts_h) = clock_at(10_000_000);
    let host = Store::in_memory(NodeId(100), 1, opts_h);
    let (peer_clock, opts_p) = clock_at(10_000_000);
    let peer = Store::in_memory(NodeId(7), 2, opts_p);
    let judged = rt
        .block_on(host.write(vec![put("m1", "web", "1", false)]))
        .unwrap()[0];
    rt.block_on(peer.apply(records(vec![host.get_latest("m1").unwrap()])))
        .unwrap();
    // A millisecond later at least (a tie of timestamps is the kind's to break:
    // the region agents' kind ranks a judgement below any other write).
    clock.advance(5_000);
    peer_clock.advance(1);
    let after = |value: &str, version| LocalWrite::PutAfter {
        key: "m1".into(),
        group: "web".into(),
        value: format!("+{value}").into_bytes(),
        version,
    };
    // The orchestrator writes again at the peer, later; the judgement of the first version is
    // made at the host before that arrives.
    let newer = rt
        .block_on(peer.write(vec![put("m1", "web", "2", false)]))
        .unwrap()[0];
    let successor = rt.block_on(host.write(vec![after("1", judged)])).unwrap()[0];
    assert_eq!(
        successor.hlc,
        Hlc(judged.hlc.0 + 1),
        "one tick after what it judged"
    );
    assert!(successor < newer);
    assert!(host.get_live("m1").unwrap().routable());
    assert!(host.view_hlc() >= successor.hlc);
    // Both ways round: the later write stands everywhere.
    rt.block_on(peer.apply(records(vec![host.get_latest("m1").unwrap()])))
        .unwrap();
    rt.block_on(host.apply(records(vec![peer.get_latest("m1").unwrap()])))
        .unwrap();
    for s in [&host, &peer] {
        assert_eq!(s.get_live("m1").unwrap().version(), newer);
        assert_eq!(s.get_live("m1").unwrap().value(), Some(&b"2"[..]));
    }
    // A judgement of a version that is no longer the live one changes nothing.
    let err = rt
        .block_on(host.write(vec![after("1", judged)]))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Changed(k) if &**k == "m1"),
        "{err:?}"
    );
    // A deletion at the peer beats a judgement of the version it deleted.
    let judged = newer;
    peer_clock.advance(1);
    let deleted = rt.block_on(peer.write(vec![del("m1")])).unwrap()[0];
    rt.block_on(host.write(vec![after("2", judged)])).unwrap();
    rt.block_on(host.apply(records(vec![peer.get_latest("m1").unwrap()])))
        .unwrap();
    rt.block_on(peer.apply(records(vec![host.get_latest("m1").unwrap()])))
        .unwrap();
    for s in [&host, &peer] {
        assert!(s.get_live("m1").is_none(), "the deleted machine came back");
        assert_eq!(s.get_latest("m1").unwrap().version, deleted);
    }
    // A judgement of a version stamped ahead of this store's clock by more than the bound
    // (a peer's fast clock) is refused: it would drag the clock along and fence every local
    // write after it.
    let ahead = Record {
        key: "m2".into(),
        group: "web".into(),
        value: Some(Arc::from(&b"x"[..])),
        version: Version {
            hlc: Hlc::from_physical_ms(clock.now_ms() + 30_000),
            origin: NodeId(7),
            seq: 99,
        },
    };
    rt.block_on(host.apply(records(vec![ahead.clone()])))
        .unwrap();
    assert!(host.get_live("m2").is_some(), "the record ahead is held");
    let err = rt
        .block_on(host.write(vec![LocalWrite::PutAfter {
            key: "m2".into(),
            group: "web".into(),
            value: b"+judged".to_vec(),
            version: ahead.version,
        }]))
        .unwrap_err();
    assert!(matches!(err, StoreError::HlcAhead { .. }), "{err:?}");
    rt.block_on(host.write(vec![put("m3", "web", "1", true)]))
        .expect("local writes go on");
    // Of a tombstone, no judgement at all.
    let err = rt
        .block_on(host.write(vec![after("3", deleted)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::Changed(_)), "{err:?}");
}

/// A restored backup: the store holds `m1` as written before the backup; after it, the
/// original deleted `m1` and wrote `m3` (peers hold both), then died. The restored store
/// moves when it meets a number it never issued, and renames what it holds keeping the
/// timestamps: a peer that holds the deletion keeps it (the stale `m1` does not come back),
/// and the write it never held (`m3`) is adopted under the new origin (its old owner runs
/// nowhere). Before, the re-issued records carried new timestamps and beat the newer writes.
#[test]
fn a_restored_store_never_rolls_back_a_write_made_after_its_backup() {
    let rt = rt();
    let (clock, opts_r) = clock_at(10_000_000);
    let restored = Store::in_memory(NodeId(100), 1, opts_r);
    let m1 = rt
        .block_on(restored.write(vec![put("m1", "web", "1", true)]))
        .unwrap()[0];
    // What the original wrote after the backup, at a peer.
    let (_c, opts_p) = clock_at(10_000_000);
    let peer = Store::in_memory(NodeId(7), 2, opts_p);
    let m1_record = restored.get_latest("m1").unwrap();
    rt.block_on(peer.apply(records(vec![m1_record.clone()])))
        .unwrap();
    let deletion = Record {
        key: "m1".into(),
        group: "web".into(),
        value: None,
        version: Version {
            hlc: Hlc::from_physical_ms(10_000_500),
            origin: NodeId(100),
            seq: 2,
        },
    };
    let m3 = remote(
        "m3",
        Version {
            hlc: Hlc::from_physical_ms(10_000_600),
            origin: NodeId(100),
            seq: 3,
        },
        true,
    );
    rt.block_on(peer.apply(records(vec![deletion.clone(), m3.clone()])))
        .unwrap();
    clock.set(10_001_000);
    // The restored store first meets m3 (a number it never issued): it moves, renames m1
    // (stale, timestamp kept) and adopts m3.
    let report = rt
        .block_on(restored.apply(records(vec![m3.clone()])))
        .unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    let new = restored.node();
    assert!(new.0 > 100);
    let renamed_m1 = restored.get_latest("m1").unwrap();
    assert_eq!(
        (renamed_m1.version.origin, renamed_m1.version.hlc),
        (new, m1.hlc),
        "renamed, its timestamp kept"
    );
    let adopted = restored.get_latest("m3").unwrap();
    assert_eq!(
        (adopted.version.origin, adopted.version.hlc),
        (new, m3.version.hlc)
    );
    // The peer that holds the deletion takes the renames: the deletion stands (it is newer
    // than the stale m1), and m3 is owned by the new origin now.
    let report = rt
        .block_on(peer.apply(records(vec![renamed_m1, adopted])))
        .unwrap();
    assert_eq!(
        report.records,
        vec![ApplyOutcome::Covered, ApplyOutcome::Applied],
        "the stale m1 loses to the deletion; the adopted m3 replaces its original"
    );
    assert!(
        peer.get_live("m1").is_none(),
        "the deleted machine stays deleted"
    );
    assert_eq!(peer.get_latest("m3").unwrap().version.origin, new);
    // The deletion reaches the restored store too, and stands there.
    rt.block_on(restored.apply(records(vec![deletion])))
        .unwrap();
    assert!(restored.get_live("m1").is_none());
}

/// The copy's (or the original's) writes under the former origin that arrive after the move,
/// in later batches and stamped later than the one that revealed it, are adopted too: none
/// stays hidden under an origin nothing runs.
#[test]
fn a_former_origins_later_writes_arriving_later_are_adopted() {
    let rt = rt();
    let (clock, opts) = clock_at(10_000_000);
    let store = Store::in_memory(NodeId(100), 1, opts);
    rt.block_on(store.write(vec![put("m1", "web", "1", true)]))
        .unwrap();
    let at = |ms: u64, seq: u64| Version {
        hlc: Hlc::from_physical_ms(ms),
        origin: NodeId(100),
        seq,
    };
    clock.set(10_002_000);
    let first = remote("m2", at(10_000_500, 2), true);
    rt.block_on(store.apply(records(vec![first]))).unwrap();
    let new = store.node();
    assert_ne!(new, NodeId(100), "moved");
    // A later write of the former origin, in another batch.
    let later = remote("m3", at(10_001_500, 3), true);
    let report = rt.block_on(store.apply(records(vec![later]))).unwrap();
    assert_eq!(report.records, vec![ApplyOutcome::Applied]);
    let held = store.get_latest("m3").unwrap();
    assert_eq!(
        (held.version.origin, held.version.hlc),
        (new, Hlc::from_physical_ms(10_001_500)),
        "adopted, its timestamp kept"
    );
}
