//! The SQLite side of the store: schema and its migrations, opening, loading at start, the
//! writer's backend, and the readers' pool. Only the writer thread writes; loading happens
//! before it starts; readers use read-only connections from blocking threads.

use std::cell::Cell;
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::feed::{Change, LeftGroups};
use crate::index::Index;
use crate::knowledge::{Digest, OriginKnowledge, SeqRange};
use crate::merge::{Backend, Meta};
use crate::{Entry, Flags, Hlc, KindRef, NodeId, StoreError, Version};

/// The schema this code writes. Older versions are migrated at open (see [`MIGRATIONS`]);
/// newer ones are refused.
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// Added without a schema version: see its comment in [`SCHEMA`].
const TOMBSTONE_INDEX: &str =
    "CREATE INDEX IF NOT EXISTS records_tombstones ON records (hlc) WHERE value IS NULL;";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value NOT NULL             -- integers, the kind's name, the overlay's down set (a blob)
) WITHOUT ROWID;
-- One row per key: its latest state, stored under the revision of the change that made it.
-- The revision is the rowid, so every write appends at the end of the table; the row it
-- supersedes is found by the revision the in-memory index holds, not by a key index (keys
-- arrive in random order, and a B-tree keyed by them dirties a random page per write).
CREATE TABLE IF NOT EXISTS records (
    rev      INTEGER PRIMARY KEY,
    key      TEXT NOT NULL,
    grp      TEXT NOT NULL,
    value    BLOB,             -- NULL for a tombstone
    routable INTEGER NOT NULL,
    hlc      INTEGER NOT NULL, -- u64 bits stored as i64
    origin   INTEGER NOT NULL, -- u64 bits stored as i64
    seq      INTEGER NOT NULL,
    -- The groups the key left before this state, when it was in others (a scoped watcher
    -- resuming after a restart must see the key leave its group). NULL: none. See
    -- `encode_left`.
    left     BLOB
);
-- Anti-entropy reads one origin's sequence numbers in a range. Per origin, sequence numbers
-- grow, so this index is appended to as well.
CREATE INDEX IF NOT EXISTS records_by_origin ON records (origin, seq);
-- Tombstones by timestamp: a lean store's collection finds old ones without a scan of the
-- table (only tombstones are in it). Created at every open: stores made before it get it,
-- and a binary that predates it opens them still.
CREATE INDEX IF NOT EXISTS records_tombstones ON records (hlc) WHERE value IS NULL;
-- Per-origin knowledge (the digest): head and the gaps below it, written in the same
-- transaction as the records. See knowledge.rs.
CREATE TABLE IF NOT EXISTS knowledge (
    origin INTEGER PRIMARY KEY,
    head   INTEGER NOT NULL,
    gaps   BLOB NOT NULL       -- (lo, hi) pairs, u64 little endian
);
";

/// Schema upgrades, by the version they start from: `MIGRATIONS[v - 1]` takes a store at
/// version `v` to `v + 1`, inside the opening transaction.
const MIGRATIONS: &[Migration] = &[migrate_1_to_2];

/// One schema upgrade: the connection (inside the opening transaction) and the kind's name.
type Migration = fn(&Connection, &str) -> Result<(), rusqlite::Error>;

/// Version 1 had no knowledge table, no index by origin, and no kind. Its stores held one
/// kind (machines) and were written by one node; knowledge is rebuilt conservatively: the
/// store's own origin is known up to its counter, other origins only at the sequence numbers
/// it holds (anti-entropy learns the rest).
fn migrate_1_to_2(conn: &Connection, kind: &str) -> Result<(), rusqlite::Error> {
    conn.execute_batch("ALTER TABLE records ADD COLUMN left BLOB")?;
    conn.execute_batch(SCHEMA)?;
    // Version 1 did not record moves: its changes keep "previous group unknown".
    let revision = meta_int(conn, "revision")?.unwrap_or(0);
    conn.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('moves_known_after', ?1)",
        [revision],
    )?;
    let own = meta_int(conn, "node_id")?.unwrap_or(0) as u64;
    let local_seq = meta_int(conn, "local_seq")?.unwrap_or(0) as u64;
    let mut digest = Digest::new();
    digest.insert(NodeId(own), OriginKnowledge::dense(local_seq));
    {
        let mut stmt = conn.prepare("SELECT origin, seq FROM records ORDER BY origin, seq")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let (origin, seq) = (
                NodeId(row.get::<_, i64>(0)? as u64),
                row.get::<_, i64>(1)? as u64,
            );
            if origin.0 == own || seq == 0 {
                continue;
            }
            // Past the gap bound (or out of range) a number simply stays unknown: safe, it
            // is fetched again.
            if let Some(range) = SeqRange::single(seq) {
                let _ = digest.entry(origin).or_default().learn(range);
            }
        }
    }
    for (origin, k) in &digest {
        put_knowledge(conn, *origin, k)?;
    }
    conn.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('kind', ?1)",
        [kind],
    )?;
    Ok(())
}

pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // WAL with synchronous=FULL: a commit returns only after the WAL is fsynced, so an
    // acknowledged write survives power loss; readers never block the writer. Once the writer
    // thread runs, it takes checkpoints over from SQLite (see `manage_checkpoints`).
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(conn)
}

fn meta_int(conn: &Connection, name: &str) -> Result<Option<i64>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

fn meta_text(conn: &Connection, name: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
        r.get(0)
    })
    .optional()
}

fn has_table(conn: &Connection, name: &str) -> Result<bool, rusqlite::Error> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [name],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Create a new store, or check and migrate an existing one, for records of `kind`.
pub(crate) fn prepare(
    conn: &mut Connection,
    kind: &KindRef,
    new_node: NodeId,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let version = if has_table(&tx, "meta")? {
        meta_int(&tx, "schema_version")?
    } else {
        None
    };
    match version {
        None => {
            tx.execute_batch(SCHEMA)?;
            tx.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?1), ('node_id', ?2), ('kind', ?3)",
                params![SCHEMA_VERSION, new_node.0 as i64, kind.name()],
            )?;
        }
        Some(v) if !(1..=SCHEMA_VERSION).contains(&v) => return Err(StoreError::Schema(v)),
        Some(mut v) => {
            while v < SCHEMA_VERSION {
                tracing::info!(from = v, to = v + 1, "migrating the store's schema");
                MIGRATIONS[(v - 1) as usize](&tx, kind.name())?;
                v += 1;
                tx.execute(
                    "INSERT OR REPLACE INTO meta (name, value) VALUES ('schema_version', ?1)",
                    [v],
                )?;
            }
            tx.execute_batch(TOMBSTONE_INDEX)?;
            let stored = meta_text(&tx, "kind")?.unwrap_or_default();
            if stored != kind.name() {
                return Err(StoreError::WrongKind {
                    stored,
                    wanted: kind.name(),
                });
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// The retired set as stored: (origin u64 LE, head u64 LE) pairs.
fn encode_retired(retired: &std::collections::BTreeMap<NodeId, u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(retired.len() * 16);
    for (origin, head) in retired {
        out.extend_from_slice(&origin.0.to_le_bytes());
        out.extend_from_slice(&head.to_le_bytes());
    }
    out
}

fn decode_retired(bytes: &[u8]) -> Option<std::collections::BTreeMap<NodeId, u64>> {
    if !bytes.len().is_multiple_of(16) {
        return None;
    }
    let mut out = std::collections::BTreeMap::new();
    for pair in bytes.chunks_exact(16) {
        let origin = u64::from_le_bytes(pair[..8].try_into().ok()?);
        let head = u64::from_le_bytes(pair[8..].try_into().ok()?);
        out.insert(NodeId(origin), head);
    }
    Some(out)
}

/// Read the store's meta.
pub(crate) fn load_meta(conn: &Connection) -> Result<Meta, StoreError> {
    let node = meta_int(conn, "node_id")?.ok_or(StoreError::Schema(-1))?;
    let retired: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'retired_origins'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let retired = match retired {
        None => Default::default(),
        Some(bytes) => decode_retired(&bytes)
            .ok_or_else(|| StoreError::Corrupt("the retired origins".into()))?,
    };
    let former: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'former_origins'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let former = match former {
        None => Default::default(),
        Some(bytes) => decode_retired(&bytes)
            .ok_or_else(|| StoreError::Corrupt("the former origins".into()))?
            .into_iter()
            .map(|(o, h)| (o, Hlc(h)))
            .collect(),
    };
    let down: Option<Vec<u8>> = conn
        .query_row(
            "SELECT value FROM meta WHERE name = 'down_owners'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let down = match down {
        None => Default::default(),
        Some(bytes) => crate::overlay::decode(&bytes)
            .ok_or_else(|| StoreError::Corrupt("the liveness overlay's down set".into()))?,
    };
    Ok(Meta {
        node: NodeId(node as u64),
        local_seq: meta_int(conn, "local_seq")?.unwrap_or(0) as u64,
        // Written with every commit, so never below any stored record's timestamp.
        hlc: Hlc(meta_int(conn, "hlc")?.unwrap_or(0) as u64),
        revision: meta_int(conn, "revision")?.unwrap_or(0) as u64,
        down: std::sync::Arc::new(down),
        overlay_rev: meta_int(conn, "overlay_rev")?.unwrap_or(0) as u64,
        collected_rev: meta_int(conn, "collected_rev")?.unwrap_or(0) as u64,
        retired: std::sync::Arc::new(retired),
        former,
        incarnation: meta_int(conn, "incarnation")?.unwrap_or(0) as u64,
    })
}

/// Leave this store's origin for `new`, durably, before the writer starts: what the old
/// origin issued stays known, and new writes start at sequence number 1 under `new`.
pub(crate) fn renew_origin(
    conn: &mut Connection,
    meta: &mut Meta,
    knowledge: &mut Digest,
    new: NodeId,
    former_bound: Hlc,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let old = meta.node;
    let issued = OriginKnowledge::dense(meta.local_seq);
    put_knowledge(&tx, old, &issued)?;
    put_knowledge(&tx, new, &OriginKnowledge::dense(0))?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('node_id', ?1), ('local_seq', 0)",
        [new.0 as i64],
    )?;
    let mut former = meta.former.clone();
    former.insert(old, former_bound);
    while former.len() > crate::merge::MAX_FORMER {
        let oldest = former.iter().min_by_key(|(_, h)| **h).map(|(o, _)| *o);
        if let Some(o) = oldest {
            former.remove(&o);
        }
    }
    let pairs: std::collections::BTreeMap<NodeId, u64> =
        former.iter().map(|(o, h)| (*o, h.0)).collect();
    tx.execute(
        "INSERT OR REPLACE INTO meta (name, value) VALUES ('former_origins', ?1)",
        [encode_retired(&pairs)],
    )?;
    tx.commit()?;
    knowledge.insert(old, issued);
    knowledge.insert(new, OriginKnowledge::dense(0));
    tracing::warn!(old = %old, new = %new, "the store starts under a fresh origin, as asked");
    meta.node = new;
    meta.local_seq = 0;
    meta.former = former;
    Ok(())
}

/// Read the digest. Corrupt rows are an error: knowledge that can't be read can't be trusted.
pub(crate) fn load_knowledge(conn: &Connection) -> Result<Digest, StoreError> {
    let mut digest = Digest::new();
    let mut stmt = conn.prepare("SELECT origin, head, gaps FROM knowledge")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let origin = NodeId(row.get::<_, i64>(0)? as u64);
        let head = row.get::<_, i64>(1)? as u64;
        let blob: Vec<u8> = row.get(2)?;
        let gaps: Option<Vec<SeqRange>> = blob.len().is_multiple_of(16).then(|| {
            blob.chunks_exact(16)
                .filter_map(|c| {
                    SeqRange::new(
                        u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                        u64::from_le_bytes(c[8..].try_into().expect("8 bytes")),
                    )
                })
                .collect()
        });
        let k = gaps
            .and_then(|g| OriginKnowledge::from_parts(head, &g))
            .ok_or(StoreError::Corrupt(format!("knowledge of origin {origin}")))?;
        digest.insert(origin, k);
    }
    Ok(digest)
}

fn put_knowledge(
    conn: &Connection,
    origin: NodeId,
    k: &OriginKnowledge,
) -> Result<(), rusqlite::Error> {
    let mut gaps = Vec::with_capacity(k.gap_count() * 16);
    for g in k.gaps() {
        gaps.extend_from_slice(&g.lo().to_le_bytes());
        gaps.extend_from_slice(&g.hi().to_le_bytes());
    }
    conn.prepare_cached(
        "INSERT OR REPLACE INTO knowledge (origin, head, gaps) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![origin.0 as i64, k.head() as i64, gaps])?;
    Ok(())
}

/// Load every record into the index, in revision order. Returns the revisions of rows that
/// a later row of the same key superseded (none, unless an older version left them).
pub(crate) fn load_index(
    conn: &Connection,
    index: &Index,
    kind: &KindRef,
) -> Result<Vec<u64>, StoreError> {
    let mut stale = Vec::new();
    if let Some(lean) = &index.lean {
        // A lean store: keys and revisions only; an earlier row that holds a key's hash is
        // read to tell a stale row of the same key from another key's.
        let mut stmt =
            conn.prepare("SELECT key, rev, value IS NOT NULL FROM records ORDER BY rev")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let key = row.get_ref(0)?.as_str().map_err(bad(0))?;
            let rev = row.get::<_, i64>(1)? as u64;
            let live: bool = row.get(2)?;
            if !index.is_lean(key) {
                // One of the kind's few keys kept in memory: its whole row.
                if let Some((r, moved)) = row_at(conn, rev)? {
                    let flags = r
                        .value
                        .as_deref()
                        .map_or(Flags::default(), |v| kind.flags(v));
                    let mut entry =
                        Entry::new(&r.key, &r.group, r.value.as_deref(), flags, r.version, rev);
                    if moved {
                        entry = entry.with_moved();
                    }
                    if let Some(old) = index.install(entry, None) {
                        stale.push(old.rev());
                    }
                }
                continue;
            }
            let mut lean = lean.lock().expect("lean index");
            let mut failed = None;
            let old = lean.load(key, rev, live, |r| match row_at(conn, r) {
                Ok(found) => found.map(|(row, _)| row.key),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            });
            if let Some(e) = failed {
                return Err(e.into());
            }
            stale.extend(old);
            index.lean_counted(&lean);
        }
        return Ok(stale);
    }
    let mut stmt = conn.prepare(
        "SELECT key, grp, value, left IS NOT NULL, hlc, origin, seq, rev FROM records ORDER BY rev",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let key = row.get_ref(0)?.as_str().map_err(bad(0))?;
        let group = row.get_ref(1)?.as_str().map_err(bad(1))?;
        let value = row.get_ref(2)?.as_blob_or_null().map_err(bad(2))?;
        let moved: bool = row.get(3)?;
        let version = version_from_row(row.get(4)?, row.get(5)?, row.get(6)?);
        let rev = row.get::<_, i64>(7)? as u64;
        // Flags are the kind's to derive: a kind whose rules changed re-derives them here.
        let flags = value.map_or(Flags::default(), |v| kind.flags(v));
        let mut entry = Entry::new(key, group, value, flags, version, rev);
        if moved {
            entry = entry.with_moved();
        }
        if let Some(old) = index.install(entry, None) {
            stale.push(old.rev());
        }
    }
    Ok(stale)
}

fn bad(i: usize) -> impl Fn(rusqlite::types::FromSqlError) -> rusqlite::Error {
    move |e| rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
}

/// Delete superseded rows found at load.
pub(crate) fn delete_revs(conn: &Connection, revs: &[u64]) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("DELETE FROM records WHERE rev = ?1")?;
    for rev in revs {
        stmt.execute([*rev as i64])?;
    }
    Ok(())
}

/// The latest `count` changes by revision, oldest first, and the revision below them (the
/// log floor). Taken from the index, which already holds the records.
pub(crate) fn recent_changes(
    conn: &Connection,
    index: &Index,
    count: usize,
) -> Result<(u64, Vec<Change>), StoreError> {
    // Rows at or below this revision were written before moves were recorded.
    let moves_known_after = meta_int(conn, "moves_known_after")?.unwrap_or(0) as u64;
    if let Some(kind) = &index.lean_kind {
        // A lean store: the records come from the rows themselves.
        let mut stmt = conn.prepare(
            "SELECT key, grp, value, hlc, origin, seq, rev, left IS NOT NULL, left FROM records
             ORDER BY rev DESC LIMIT ?1",
        )?;
        let rows = stmt
            .query_map([count as i64 + 1], |r| {
                Ok((entry_of_row(r, kind)?, r.get::<_, Option<Vec<u8>>>(8)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut floor = 0;
        let mut changes = Vec::with_capacity(rows.len().min(count));
        for (i, (entry, left)) in rows.into_iter().enumerate() {
            if i == count {
                floor = entry.rev();
                break;
            }
            let left = left_groups(entry.rev(), moves_known_after, left.as_deref());
            changes.push(Change { entry, left });
        }
        changes.reverse();
        return Ok((floor, changes));
    }
    let mut stmt = conn.prepare("SELECT key, rev, left FROM records ORDER BY rev DESC LIMIT ?1")?;
    let rows = stmt
        .query_map([count as i64 + 1], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)? as u64,
                r.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut floor = 0;
    let mut changes = Vec::with_capacity(rows.len().min(count));
    for (i, (key, rev, left)) in rows.into_iter().enumerate() {
        if i == count {
            floor = rev;
            break;
        }
        if let Some(entry) = index.latest(&key) {
            let left = left_groups(rev, moves_known_after, left.as_deref());
            changes.push(Change { entry, left });
        }
    }
    changes.reverse();
    Ok((floor, changes))
}

fn version_from_row(hlc: i64, origin: i64, seq: i64) -> Version {
    Version {
        hlc: Hlc(hlc as u64),
        origin: NodeId(origin as u64),
        seq: seq as u64,
    }
}

/// A row's `left`: `unknown_before` (u64), then `(u16 length, group, u64 revision)` per
/// group, little endian.
fn encode_left(left: &LeftGroups) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + left.groups.len() * 32);
    out.extend_from_slice(&left.unknown_before.to_le_bytes());
    for (g, rev) in &left.groups {
        out.extend_from_slice(&(g.len() as u16).to_le_bytes());
        out.extend_from_slice(g.as_bytes());
        out.extend_from_slice(&rev.to_le_bytes());
    }
    out
}

/// What a row's `left` says; unreadable bytes say "unknown" (a reader then considers the
/// change, at worst a deletion of a key it does not hold).
/// The groups a row says its key left: unknown for rows written before moves were recorded
/// (`moves_known_after`), none when the row lists none.
fn left_groups(rev: u64, moves_known_after: u64, left: Option<&[u8]>) -> LeftGroups {
    if rev <= moves_known_after {
        LeftGroups::unknown()
    } else {
        left.map_or_else(LeftGroups::default, decode_left)
    }
}

pub(crate) fn decode_left(bytes: &[u8]) -> LeftGroups {
    fn parse(mut b: &[u8]) -> Option<LeftGroups> {
        let u64_at =
            |b: &[u8]| -> Option<u64> { Some(u64::from_le_bytes(b.get(..8)?.try_into().ok()?)) };
        let mut left = LeftGroups {
            unknown_before: u64_at(b)?,
            groups: Vec::new(),
        };
        b = &b[8..];
        while !b.is_empty() {
            let len = u16::from_le_bytes([*b.first()?, *b.get(1)?]) as usize;
            let group = std::str::from_utf8(b.get(2..2 + len)?).ok()?;
            let rev = u64_at(b.get(2 + len..)?)?;
            left.groups.push((std::sync::Arc::from(group), rev));
            b = &b[2 + len + 8..];
        }
        Some(left)
    }
    parse(bytes).unwrap_or_else(LeftGroups::unknown)
}

/// WAL frames (pages) past which the writer checkpoints as soon as its queue is empty: the
/// size at which SQLite's automatic checkpoint would have run (about 4 MiB of 4 KiB pages),
/// so the WAL and the cost of each checkpoint stay as they were; only the moment changes.
pub(crate) const CHECKPOINT_IDLE_FRAMES: u32 = 1000;
/// WAL frames past which the writer checkpoints after a group even with writes waiting: a
/// load that never empties the queue (128 clients do not) still bounds the WAL (16 MiB of
/// 4 KiB pages) and the time to replay it at open, and each such checkpoint, which every
/// queued write waits for, copies at most four times what an idle one does.
pub(crate) const CHECKPOINT_BUSY_FRAMES: u32 = 4000;

thread_local! {
    /// Frames in the WAL after the latest commit on this thread, as SQLite's WAL hook reports
    /// them. Per thread because each store's writer thread owns its one writing connection.
    static WAL_FRAMES: Cell<u32> = const { Cell::new(0) };
}

/// The WAL hook: runs inside every commit, on the committing thread, after the WAL is synced.
fn note_wal_frames(_wal: &rusqlite::hooks::Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(u32::try_from(frames).unwrap_or(0));
    Ok(())
}

/// Is a checkpoint due with `frames` in the WAL, given whether writes are waiting?
fn checkpoint_due(frames: u32, writes_waiting: bool) -> bool {
    frames >= CHECKPOINT_BUSY_FRAMES || (!writes_waiting && frames >= CHECKPOINT_IDLE_FRAMES)
}

/// What one checkpoint did, in WAL frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Checkpointed {
    /// Frames in the WAL.
    pub frames: u32,
    /// Frames copied into the database file (all of them, unless a reader still used some).
    pub copied: u32,
    /// The WAL was started over before any request could pay for it.
    pub restarted: bool,
}

/// The writer's backend: one explicit transaction per group commit.
pub(crate) struct SqliteBackend {
    pub conn: Connection,
    pub failpoints: std::sync::Arc<crate::Failpoints>,
    /// Where each COMMIT's duration (the WAL's write and fsync) is counted.
    pub timings: std::sync::Arc<crate::timing::Timings>,
}

impl SqliteBackend {
    /// Take checkpoints over from SQLite. Its automatic checkpoint runs inside the commit that
    /// crosses the threshold, after that commit's fsync: the writes of the whole group wait
    /// for the copy and a second fsync (of the database file) before they are acknowledged,
    /// and the next commit pays a third (the WAL header, rewritten when the WAL starts over).
    /// Registering a WAL hook turns the automatic checkpoint off; the writer thread then calls
    /// [`SqliteBackend::checkpoint`] between groups, when [`SqliteBackend::checkpoint_due`].
    /// Call it on the writer thread: the hook counts frames per thread.
    pub fn manage_checkpoints(&self) {
        self.conn.wal_hook(Some(note_wal_frames));
    }

    /// Is a checkpoint due, given whether writes are waiting?
    pub fn checkpoint_due(&self, writes_waiting: bool) -> bool {
        checkpoint_due(WAL_FRAMES.get(), writes_waiting)
    }

    /// Copy the WAL into the database file (PASSIVE: readers are never waited for; SQLite
    /// syncs the WAL before the copy and the database file after it, as its own checkpoints
    /// do). When everything was copied, start the WAL over at once with a one-row write (a
    /// count of restarts in `meta`; rewriting a row unchanged writes no page): the first
    /// commit after a restart syncs the rewritten WAL header by itself before its frames, and
    /// that extra fsync is better paid now than by the next request.
    pub fn checkpoint(&mut self) -> Result<Checkpointed, rusqlite::Error> {
        let (frames, copied): (i64, i64) =
            self.conn
                .query_row("PRAGMA main.wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get(1)?, r.get(2)?))
                })?;
        let frames = u32::try_from(frames).unwrap_or(0);
        let copied = u32::try_from(copied).unwrap_or(0);
        // Until the next commit reports the WAL again, only what is left to copy counts.
        WAL_FRAMES.set(frames.saturating_sub(copied));
        let restarted = frames > 0 && copied == frames;
        if restarted {
            let restart = self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 INSERT INTO meta (name, value) VALUES ('wal_restarts', 1)
                     ON CONFLICT (name) DO UPDATE SET value = value + 1;
                 COMMIT;",
            );
            if let Err(e) = restart {
                self.rollback();
                return Err(e);
            }
        }
        Ok(Checkpointed {
            frames,
            copied,
            restarted,
        })
    }

    /// The groups a key has left once `previous` is replaced by the change at `rev`: those
    /// `previous`'s row lists, plus `previous`'s own group when the key leaves it.
    fn left_after(&self, previous: &Entry, e: &Entry) -> Result<Vec<u8>, rusqlite::Error> {
        let mut left = LeftGroups::default();
        if previous.moved() {
            let stored: Option<Vec<u8>> = self
                .conn
                .prepare_cached("SELECT left FROM records WHERE rev = ?1")?
                .query_row([previous.rev() as i64], |r| r.get(0))
                .optional()?
                .flatten();
            if let Some(stored) = stored {
                left = decode_left(&stored);
            }
        }
        if previous.group() != e.group() {
            left.push(previous.group(), e.rev());
        }
        Ok(encode_left(&left))
    }
}

impl Backend for SqliteBackend {
    fn begin(&mut self) -> Result<(), rusqlite::Error> {
        self.conn.execute_batch("BEGIN")
    }

    fn row_at(&self, rev: u64) -> Result<Option<(Row, bool)>, rusqlite::Error> {
        row_at(&self.conn, rev)
    }

    fn entries_of_origin(
        &self,
        origin: NodeId,
        kind: &KindRef,
    ) -> Result<Vec<Entry>, rusqlite::Error> {
        entries_of_origin(&self.conn, origin, kind)
    }

    fn put_record(&mut self, e: &Entry, previous: Option<&Entry>) -> Result<(), rusqlite::Error> {
        // Read what the previous row lists before the row goes.
        let left = match previous.filter(|_| e.moved()) {
            Some(p) => Some(self.left_after(p, e)?),
            None => None,
        };
        if let Some(previous) = previous {
            self.conn
                .prepare_cached("DELETE FROM records WHERE rev = ?1")?
                .execute([previous.rev() as i64])?;
        }
        let v = e.version();
        self.conn
            .prepare_cached(
                "INSERT INTO records (key, grp, value, routable, hlc, origin, seq, rev, left)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                e.key(),
                e.group(),
                e.value(),
                e.routable(),
                v.hlc.0 as i64,
                v.origin.0 as i64,
                v.seq as i64,
                e.rev() as i64,
                left,
            ])?;
        Ok(())
    }

    fn put_knowledge(
        &mut self,
        origin: NodeId,
        k: &OriginKnowledge,
    ) -> Result<(), rusqlite::Error> {
        put_knowledge(&self.conn, origin, k)
    }

    fn put_meta(&mut self, meta: &Meta, _kind: &str) -> Result<(), rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
        stmt.execute(params!["node_id", meta.node.0 as i64])?;
        stmt.execute(params!["local_seq", meta.local_seq as i64])?;
        stmt.execute(params!["hlc", meta.hlc.0 as i64])?;
        stmt.execute(params!["revision", meta.revision as i64])?;
        stmt.execute(params!["collected_rev", meta.collected_rev as i64])?;
        stmt.execute(params!["incarnation", meta.incarnation as i64])?;
        Ok(())
    }

    fn holds_origin(&mut self, origin: NodeId) -> Result<bool, rusqlite::Error> {
        // Through the (origin, seq) index: one probe, whatever the table's size.
        self.conn
            .prepare_cached("SELECT 1 FROM records WHERE origin = ?1 LIMIT 1")?
            .query_row([origin.0 as i64], |_| Ok(()))
            .optional()
            .map(|r| r.is_some())
    }

    fn delete_knowledge(&mut self, origin: NodeId) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("DELETE FROM knowledge WHERE origin = ?1")?
            .execute([origin.0 as i64])?;
        Ok(())
    }

    fn put_former(&mut self, meta: &Meta) -> Result<(), rusqlite::Error> {
        let pairs: std::collections::BTreeMap<NodeId, u64> =
            meta.former.iter().map(|(o, h)| (*o, h.0)).collect();
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?
            .execute(params!["former_origins", encode_retired(&pairs)])?;
        Ok(())
    }

    fn put_retired(&mut self, meta: &Meta) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?
            .execute(params!["retired_origins", encode_retired(&meta.retired)])?;
        Ok(())
    }

    fn delete_record(&mut self, e: &Entry) -> Result<(), rusqlite::Error> {
        self.conn
            .prepare_cached("DELETE FROM records WHERE rev = ?1")?
            .execute([e.rev() as i64])?;
        Ok(())
    }

    fn put_overlay(&mut self, meta: &Meta) -> Result<(), rusqlite::Error> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
        stmt.execute(params!["down_owners", crate::overlay::encode(&meta.down)])?;
        stmt.execute(params!["overlay_rev", meta.overlay_rev as i64])?;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), rusqlite::Error> {
        self.failpoints.check_commit()?;
        let started = std::time::Instant::now();
        let committed = self.conn.execute_batch("COMMIT");
        self.timings.fsync.observe(started.elapsed());
        committed
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit()
            && let Err(e) = self.conn.execute_batch("ROLLBACK")
        {
            tracing::error!(error = %e, "rollback failed");
        }
    }
}

/// Read-only connections for readers that need more than memory holds (anti-entropy's range
/// reads, chunked whole-store scans). Used from blocking threads only.
pub(crate) struct Readers {
    path: PathBuf,
    pool: Mutex<Pool>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Connection>,
    /// Connections open, idle or in use.
    open: usize,
}

/// Most read connections open at once: more readers wait for one (each is a file handle and a
/// page cache; many watchers scanning at once must not open one each).
const MAX_READERS: usize = 8;

impl Readers {
    pub fn new(path: PathBuf) -> Readers {
        Readers {
            path,
            pool: Mutex::new(Pool::default()),
            freed: std::sync::Condvar::new(),
        }
    }

    /// Run `f` on a read connection, waiting for one when all are in use. Blocking.
    pub fn with<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let pooled = {
            let mut pool = self.pool.lock().expect("readers lock");
            loop {
                if let Some(c) = pool.idle.pop() {
                    break Some(c);
                }
                if pool.open < MAX_READERS {
                    pool.open += 1;
                    break None;
                }
                pool = self.freed.wait(pool).expect("readers lock");
            }
        };
        let conn = match pooled {
            Some(c) => c,
            None => match Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            ) {
                Ok(c) => c,
                Err(e) => {
                    self.pool.lock().expect("readers lock").open -= 1;
                    self.freed.notify_one();
                    return Err(e.into());
                }
            },
        };
        let result = f(&conn);
        self.pool.lock().expect("readers lock").idle.push(conn);
        self.freed.notify_one();
        Ok(result?)
    }
}

/// One stored row, as readers need it.
pub(crate) struct Row {
    pub key: String,
    pub group: String,
    pub value: Option<Vec<u8>>,
    pub version: Version,
}

fn row_of(r: &rusqlite::Row<'_>) -> Result<Row, rusqlite::Error> {
    Ok(Row {
        key: r.get(0)?,
        group: r.get(1)?,
        value: r.get(2)?,
        version: version_from_row(r.get(3)?, r.get(4)?, r.get(5)?),
    })
}

/// The row stored at revision `rev`, if it is still there (a lean store reads a key's state
/// this way: its index holds only the revision).
pub(crate) fn row_at(conn: &Connection, rev: u64) -> Result<Option<(Row, bool)>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, grp, value, hlc, origin, seq, left IS NOT NULL FROM records WHERE rev = ?1",
    )?;
    let mut rows = stmt.query([rev as i64])?;
    match rows.next()? {
        Some(r) => Ok(Some((row_of(r)?, r.get(6)?))),
        None => Ok(None),
    }
}

/// Rows of one origin with sequence numbers in `range`, highest first, at most `limit`.
pub(crate) fn origin_rows(
    conn: &Connection,
    origin: NodeId,
    range: SeqRange,
    limit: usize,
) -> Result<Vec<Row>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, grp, value, hlc, origin, seq FROM records
         WHERE origin = ?1 AND seq BETWEEN ?2 AND ?3 ORDER BY seq DESC LIMIT ?4",
    )?;
    stmt.query_map(
        params![
            origin.0 as i64,
            range.lo() as i64,
            range.hi() as i64,
            limit as i64
        ],
        row_of,
    )?
    .collect()
}

/// The rows with revisions in `after+1 ..= upto` as entries (flags derived by `kind`), with
/// the groups their keys had left, lowest first, at most `limit`: a lean store's watches
/// read records this way (a row still stored is its key's state as of this read).
pub(crate) fn entries_by_rev(
    conn: &Connection,
    after: u64,
    upto: u64,
    limit: usize,
    kind: &KindRef,
) -> Result<Vec<(Entry, LeftGroups)>, rusqlite::Error> {
    let moves_known_after = meta_int(conn, "moves_known_after")?.unwrap_or(0) as u64;
    let mut stmt = conn.prepare_cached(
        "SELECT key, grp, value, hlc, origin, seq, rev, left FROM records
         WHERE rev > ?1 AND rev <= ?2 ORDER BY rev LIMIT ?3",
    )?;
    stmt.query_map(params![after as i64, upto as i64, limit as i64], |r| {
        let row = row_of(r)?;
        let rev = r.get::<_, i64>(6)? as u64;
        let left: Option<Vec<u8>> = r.get(7)?;
        let entry = row.entry(rev, left.is_some(), kind);
        let left = left_groups(rev, moves_known_after, left.as_deref());
        Ok((entry, left))
    })?
    .collect()
}

impl Row {
    /// The entry this row is at revision `rev` (flags derived by `kind`; `moved`: the row
    /// lists groups its key left).
    pub(crate) fn entry(&self, rev: u64, moved: bool, kind: &KindRef) -> Entry {
        let flags = self
            .value
            .as_deref()
            .map_or(Flags::default(), |v| kind.flags(v));
        let entry = Entry::new(
            &self.key,
            &self.group,
            self.value.as_deref(),
            flags,
            self.version,
            rev,
        );
        if moved { entry.with_moved() } else { entry }
    }
}

/// The columns [`entry_of_row`] reads.
const ENTRY_COLUMNS: &str =
    "SELECT key, grp, value, hlc, origin, seq, rev, left IS NOT NULL FROM records";

/// An entry from a stored row's columns `key, grp, value, hlc, origin, seq, rev, left IS NOT
/// NULL` (flags derived by `kind`).
fn entry_of_row(r: &rusqlite::Row<'_>, kind: &KindRef) -> Result<Entry, rusqlite::Error> {
    let row = row_of(r)?;
    Ok(row.entry(r.get::<_, i64>(6)? as u64, r.get(7)?, kind))
}

/// The row stored at revision `rev` as an entry (flags derived by `kind`), if it is still
/// there: a lean store's point reads.
pub(crate) fn entry_at(
    conn: &Connection,
    rev: u64,
    kind: &KindRef,
) -> Result<Option<Entry>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(&format!("{ENTRY_COLUMNS} WHERE rev = ?1"))?;
    let mut rows = stmt.query([rev.min(i64::MAX as u64) as i64])?;
    match rows.next()? {
        Some(r) => Ok(Some(entry_of_row(r, kind)?)),
        None => Ok(None),
    }
}

/// Every stored row of `origin` (through the `(origin, seq)` index), as entries: a lean
/// store's liveness changes and moves read an owner's records this way.
pub(crate) fn entries_of_origin(
    conn: &Connection,
    origin: NodeId,
    kind: &KindRef,
) -> Result<Vec<Entry>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(&format!("{ENTRY_COLUMNS} WHERE origin = ?1"))?;
    stmt.query_map([origin.0 as i64], |r| entry_of_row(r, kind))?
        .collect()
}

/// [`tombstones_before`]'s query (through the `records_tombstones` index).
pub(crate) const TOMBSTONES_BEFORE: &str =
    "SELECT key, grp, value, hlc, origin, seq, rev, left IS NOT NULL FROM records
     WHERE value IS NULL AND rev <= ?1 AND hlc < ?2 LIMIT ?3";

/// Up to `limit` tombstones with timestamps older than `before_ms` and revisions at or below
/// `max_rev`: a lean store's collection reads them from the rows (through the index of
/// tombstones by timestamp, not a scan of the table).
pub(crate) fn tombstones_before(
    conn: &Connection,
    before_ms: u64,
    max_rev: u64,
    limit: usize,
    kind: &KindRef,
) -> Result<Vec<Entry>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(TOMBSTONES_BEFORE)?;
    stmt.query_map(
        // Bounds past i64 would wrap negative: clamp them (no revision or timestamp is).
        params![
            max_rev.min(i64::MAX as u64) as i64,
            crate::Hlc::from_physical_ms(before_ms)
                .0
                .min(i64::MAX as u64) as i64,
            limit.min(i64::MAX as usize) as i64
        ],
        |r| entry_of_row(r, kind),
    )?
    .collect()
}

/// Keys of the rows with revisions in `after+1 ..= upto`, with those revisions and the groups
/// the keys had left, lowest first, at most `limit`. Readers take the record itself from the
/// index (it is installed there before its revision is published).
pub(crate) fn keys_by_rev(
    conn: &Connection,
    after: u64,
    upto: u64,
    limit: usize,
) -> Result<Vec<(String, u64, LeftGroups)>, rusqlite::Error> {
    let moves_known_after = meta_int(conn, "moves_known_after")?.unwrap_or(0) as u64;
    let mut stmt = conn.prepare_cached(
        "SELECT key, rev, left FROM records WHERE rev > ?1 AND rev <= ?2 ORDER BY rev LIMIT ?3",
    )?;
    stmt.query_map(params![after as i64, upto as i64, limit as i64], |r| {
        let rev = r.get::<_, i64>(1)? as u64;
        let left: Option<Vec<u8>> = r.get(2)?;
        let left = left_groups(rev, moves_known_after, left.as_deref());
        Ok((r.get(0)?, rev, left))
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_is_read_by_its_revision_until_it_is_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = open(&dir.path().join(crate::DB_FILE)).unwrap();
        let kind: KindRef = std::sync::Arc::new(crate::OpaqueKind);
        prepare(&mut conn, &kind, NodeId(7)).unwrap();
        conn.execute(
            "INSERT INTO records (rev, key, grp, value, routable, hlc, origin, seq)
             VALUES (5, 'app/ord', 'app', x'01', 1, 9, 7, 3)",
            [],
        )
        .unwrap();
        let (row, moved) = row_at(&conn, 5).unwrap().expect("the row at 5");
        assert_eq!(
            (
                row.key.as_str(),
                row.group.as_str(),
                row.value.as_deref(),
                moved
            ),
            ("app/ord", "app", Some(&[1u8][..]), false)
        );
        assert_eq!((row.version.origin, row.version.seq), (NodeId(7), 3));
        conn.execute("DELETE FROM records WHERE rev = 5", [])
            .unwrap();
        assert!(row_at(&conn, 5).unwrap().is_none());
        assert!(row_at(&conn, 6).unwrap().is_none());
    }

    #[test]
    fn a_checkpoint_waits_for_an_idle_writer_unless_the_wal_is_past_its_bound() {
        let cases = [
            (0, false, false),
            (CHECKPOINT_IDLE_FRAMES - 1, false, false),
            (CHECKPOINT_IDLE_FRAMES, false, true),
            (CHECKPOINT_IDLE_FRAMES, true, false),
            (CHECKPOINT_BUSY_FRAMES - 1, true, false),
            (CHECKPOINT_BUSY_FRAMES, true, true),
            (CHECKPOINT_BUSY_FRAMES, false, true),
        ];
        for (frames, waiting, due) in cases {
            assert_eq!(
                checkpoint_due(frames, waiting),
                due,
                "{frames} frames, writes waiting: {waiting}"
            );
        }
    }

    #[test]
    fn commits_never_checkpoint_and_the_writers_checkpoint_starts_the_wal_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(crate::DB_FILE);
        let mut conn = open(&path).unwrap();
        let kind: KindRef = std::sync::Arc::new(crate::OpaqueKind);
        prepare(&mut conn, &kind, NodeId(7)).unwrap();
        let mut backend = SqliteBackend {
            conn,
            failpoints: Default::default(),
            timings: Default::default(),
        };
        backend.manage_checkpoints();
        // One 3 KiB row per commit: a page or two each. SQLite's automatic checkpoint would
        // have copied the WAL and started it over at 1000 frames.
        let mut rows = 0;
        let mut last = 0;
        while WAL_FRAMES.get() < CHECKPOINT_IDLE_FRAMES + 100 {
            rows += 1;
            backend
                .conn
                .execute(
                    "INSERT INTO records (rev, key, grp, value, routable, hlc, origin, seq)
                     VALUES (?1, ?2, 'g', ?3, 1, 0, 7, ?1)",
                    params![rows, format!("k{rows}"), vec![0x5a_u8; 3000]],
                )
                .unwrap();
            assert!(
                WAL_FRAMES.get() > last,
                "the WAL only grows between checkpoints"
            );
            last = WAL_FRAMES.get();
        }
        assert!(!backend.checkpoint_due(true), "writes are waiting");
        assert!(backend.checkpoint_due(false));

        let done = backend.checkpoint().unwrap();
        assert_eq!(
            done.copied, done.frames,
            "no reader held the WAL: all copied"
        );
        assert!(done.restarted);
        let frames = WAL_FRAMES.get();
        assert!(
            (1..=2).contains(&frames),
            "the restart write begins a new WAL: {frames} frames"
        );
        assert!(!backend.checkpoint_due(false));
        let stored: i64 = backend
            .conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, rows);
    }
}
