//! The SQLite side of the store: schema, opening, loading at start, and the statements the
//! writer thread runs. Only the writer thread writes; loading happens before it starts.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use crate::feed::Change;
use crate::index::Index;
use crate::{Entry, Hlc, NodeId, StoreError, Version};

/// Bump when the schema changes in a way older code can't read.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
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
    seq      INTEGER NOT NULL
);
";

/// What the store knows about itself, persisted in `meta` with every commit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub node: NodeId,
    /// The highest sequence number this origin ever committed.
    pub local_seq: u64,
    /// The highest HLC this store ever issued or stored.
    pub hlc: Hlc,
    /// The store revision of the latest committed change.
    pub revision: u64,
}

pub(crate) fn open(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    // WAL with synchronous=FULL: a commit returns only after the WAL is fsynced, so an
    // acknowledged write survives power loss; readers (none yet at run time) never block it.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn meta_get(conn: &Connection, name: &str) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Read (or, for a new store, create) the store's meta.
pub(crate) fn load_meta(conn: &Connection) -> Result<Meta, StoreError> {
    match meta_get(conn, "schema_version")? {
        None => {
            let node = loop {
                let id = random_u64();
                if id != 0 {
                    break NodeId(id);
                }
            };
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?1), ('node_id', ?2)",
                params![SCHEMA_VERSION, node.0 as i64],
            )?;
        }
        Some(SCHEMA_VERSION) => {}
        Some(other) => return Err(StoreError::Schema(other)),
    }
    let node = meta_get(conn, "node_id")?.ok_or(StoreError::Schema(-1))?;
    Ok(Meta {
        node: NodeId(node as u64),
        local_seq: meta_get(conn, "local_seq")?.unwrap_or(0) as u64,
        // Written with every commit, so never below any stored record's timestamp.
        hlc: Hlc(meta_get(conn, "hlc")?.unwrap_or(0) as u64),
        revision: meta_get(conn, "revision")?.unwrap_or(0) as u64,
    })
}

fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    getrandom::fill(&mut buf).expect("the OS random source failed");
    u64::from_le_bytes(buf)
}

/// Load every record into the index, in revision order. Returns the revisions of rows that
/// a later row of the same key superseded (none, unless an older version left them).
pub(crate) fn load_index(conn: &Connection, index: &Index) -> Result<Vec<u64>, StoreError> {
    let mut stale = Vec::new();
    let mut stmt = conn.prepare(
        "SELECT key, grp, value, routable, hlc, origin, seq, rev FROM records ORDER BY rev",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let bad = |i: usize| {
            move |e: rusqlite::types::FromSqlError| {
                rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e.into())
            }
        };
        let key = row.get_ref(0)?.as_str().map_err(bad(0))?;
        let group = row.get_ref(1)?.as_str().map_err(bad(1))?;
        let value = row.get_ref(2)?.as_blob_or_null().map_err(bad(2))?;
        let routable: bool = row.get(3)?;
        let version = version_from_row(row.get(4)?, row.get(5)?, row.get(6)?);
        let rev = row.get::<_, i64>(7)? as u64;
        let body = value.map(|v| (v, routable));
        if let Some(old) = index.install(Entry::new(key, group, body, version, rev)) {
            stale.push(old.rev());
        }
    }
    Ok(stale)
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
    let mut stmt = conn.prepare("SELECT key, rev FROM records ORDER BY rev DESC LIMIT ?1")?;
    let rows = stmt
        .query_map([count as i64 + 1], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut floor = 0;
    let mut changes = Vec::with_capacity(rows.len().min(count));
    for (i, (key, rev)) in rows.into_iter().enumerate() {
        if i == count {
            floor = rev;
            break;
        }
        if let Some(entry) = index.state(&key) {
            changes.push(Change {
                entry,
                moved_from: None,
                prior_unknown: true,
            });
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

/// Write one record's new state, replacing the row of its previous state. Writer thread
/// only, inside its group-commit transaction.
pub(crate) fn put_record(
    tx: &Transaction<'_>,
    e: &Entry,
    previous: Option<&Entry>,
) -> Result<(), rusqlite::Error> {
    if let Some(previous) = previous {
        let mut stmt = tx.prepare_cached("DELETE FROM records WHERE rev = ?1")?;
        stmt.execute([previous.rev() as i64])?;
    }
    let mut stmt = tx.prepare_cached(
        "INSERT INTO records (key, grp, value, routable, hlc, origin, seq, rev)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let v = e.version();
    stmt.execute(params![
        e.key(),
        e.group(),
        e.value(),
        e.routable(),
        v.hlc.0 as i64,
        v.origin.0 as i64,
        v.seq as i64,
        e.rev() as i64,
    ])?;
    Ok(())
}

/// Persist the counters, in the same transaction as the records they cover.
pub(crate) fn put_meta(tx: &Transaction<'_>, meta: &Meta) -> Result<(), rusqlite::Error> {
    let mut stmt =
        tx.prepare_cached("INSERT OR REPLACE INTO meta (name, value) VALUES (?1, ?2)")?;
    stmt.execute(params!["local_seq", meta.local_seq as i64])?;
    stmt.execute(params!["hlc", meta.hlc.0 as i64])?;
    stmt.execute(params!["revision", meta.revision as i64])?;
    Ok(())
}
