//! What the shell keeps in the data directory beside the store: the epoch file (bumped at
//! every start, so a restarted agent's identity is newer than its old one) and the members
//! file (members remembered between runs, so an agent whose seeds are all down still finds
//! its region).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Gossip;
use crate::keyring::Keyring;

/// The epoch of this start: more than the one persisted and at least the wall clock's
/// seconds, so a restarted agent's identity wins over its old one even when the file could
/// not be written last time (a full disk must not keep an agent from starting). Written back
/// durably; a failed write is reported and the start goes on.
pub(super) async fn bump_epoch(path: PathBuf) -> std::io::Result<u64> {
    tokio::task::spawn_blocking(move || {
        let old = match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let new = (old + 1).max(wall);
        if let Err(e) = write_epoch(&path, new) {
            tracing::warn!(path = %path.display(), error = %e, "could not persist the gossip epoch");
        }
        Ok(new)
    })
    .await
    .map_err(std::io::Error::other)?
}

pub(super) fn write_epoch(path: &std::path::Path, epoch: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{epoch}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The file in the data directory that remembers the region's members between runs.
pub const MEMBERS_FILE: &str = "gossip-members";

/// Members remembered at most.
const MAX_REMEMBERED: usize = 256;

/// Remembered members announced to at start, besides the configured seeds.
pub(super) const MAX_REMEMBERED_SEEDS: usize = 16;

/// The gossip addresses remembered from the last run (none if the file is missing or
/// unreadable; lines that do not parse are skipped).
pub(super) async fn read_members(path: PathBuf) -> Vec<SocketAddr> {
    tokio::task::spawn_blocking(move || match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .take(MAX_REMEMBERED)
            .collect(),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not read the remembered members");
            }
            Vec::new()
        }
    })
    .await
    .unwrap_or_default()
}

/// Write the alive members' gossip addresses to `path` whenever they change (checked each
/// second; at most `MAX_REMEMBERED`), by a temporary file and a rename.
pub(super) async fn remember_members(gossip: Gossip, path: PathBuf) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut written: std::collections::BTreeSet<SocketAddr> = Default::default();
    loop {
        tick.tick().await;
        let Some(snap) = gossip.snapshot().await else {
            return;
        };
        let alive: std::collections::BTreeSet<SocketAddr> = snap
            .members
            .iter()
            .filter(|m| m.state == crate::node::MemberState::Alive)
            .map(|m| m.identity.addr())
            .take(MAX_REMEMBERED)
            .collect();
        if alive.is_empty() || alive == written {
            continue;
        }
        let text: String = alive.iter().map(|a| format!("{a}\n")).collect();
        let target = path.clone();
        let result = tokio::task::spawn_blocking(move || {
            let tmp = target.with_extension("tmp");
            std::fs::write(&tmp, text)?;
            std::fs::rename(&tmp, &target)
        })
        .await;
        match result {
            Ok(Ok(())) => written = alive,
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remember the members")
            }
            Err(_) => return,
        }
    }
}

/// The file in the data directory that holds the gossip keyring (see [`crate::keyring`]).
/// Once written it wins over the configured key, so keys changed through `Admin.Keyring`
/// outlive restarts.
pub const KEYRING_FILE: &str = "gossip-keyring";

/// The keyring persisted at `path`: `None` when there is no file. A file that does not
/// parse is an error (an agent must not run with keys other than the ones it was given).
/// Blocking: call it from a blocking thread or before the runtime runs.
pub fn read_keyring(path: &std::path::Path) -> Result<Option<Keyring>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Keyring::from_text(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Write the keyring durably (a temporary file, fsynced, renamed, the directory fsynced),
/// readable by the agent's user only. Blocking.
pub fn write_keyring(path: &std::path::Path, keyring: &Keyring) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(keyring.to_text().as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
