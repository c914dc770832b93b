//! Material that follows its files: certificates rotate without a restart. The files are
//! checked every [`CHECK_INTERVAL`] (their size, modification time and inode) and read again
//! whole when any changed, and every [`FULL_RELOAD`] regardless (a replacement that kept the
//! old time). A set that does not load (a half-written file, a key of another certificate, a
//! certificate the bundle does not sign) leaves the last good set in use; the failure is
//! logged once per change of the files and counted.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::material::{Material, MaterialError, Paths};

/// How often the files are looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// How often they are read again even when they look unchanged.
pub const FULL_RELOAD: Duration = Duration::from_secs(300);

/// What identifies a file's version without reading it.
type Stamp = Option<(u64, SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Some((m.len(), m.modified().ok()?, ino))
}

fn stamps(paths: &Paths) -> [Stamp; 3] {
    [stamp(&paths.ca), stamp(&paths.cert), stamp(&paths.key)]
}

/// Counts of what the reloader did.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    pub loaded: AtomicU64,
    pub failed: AtomicU64,
}

/// The current material, shared by every listener and client of an agent.
#[derive(Clone)]
pub struct Trust {
    rx: watch::Receiver<Arc<Material>>,
    pub counters: Arc<ReloadCounters>,
    /// Fixed material's sender (a following task holds its own).
    _fixed: Option<Arc<watch::Sender<Arc<Material>>>>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("current", &*self.current())
            .finish()
    }
}

impl Trust {
    /// The set in use now.
    pub fn current(&self) -> Arc<Material> {
        self.rx.borrow().clone()
    }

    /// Fixed material that never reloads (tests, and clients that run for one call).
    pub fn fixed(material: Material) -> Trust {
        let (tx, rx) = watch::channel(Arc::new(material));
        Trust {
            rx,
            counters: Arc::default(),
            _fixed: Some(Arc::new(tx)),
        }
    }

    /// Load the files now (blocking: call it before the runtime starts or from
    /// `spawn_blocking`), then follow them from a task on the current runtime until every
    /// handle is dropped.
    pub fn follow(paths: Paths) -> Result<Trust, MaterialError> {
        Trust::follow_every(paths, CHECK_INTERVAL)
    }

    /// [`Trust::follow`], checking every `interval` (tests).
    pub fn follow_every(paths: Paths, interval: Duration) -> Result<Trust, MaterialError> {
        let first = Material::load(&paths)?;
        Ok(Trust::start(first, paths, interval))
    }

    /// Follow the files from `first`, a set just loaded from them, on a task of the current
    /// runtime until every handle is dropped. Not blocking.
    pub fn start(first: Material, paths: Paths, interval: Duration) -> Trust {
        log_loaded(&first, "loaded");
        let (tx, rx) = watch::channel(Arc::new(first));
        let counters = Arc::new(ReloadCounters::default());
        counters.loaded.fetch_add(1, Ordering::Relaxed);
        let trust = Trust {
            rx,
            counters: counters.clone(),
            _fixed: None,
        };
        tokio::spawn(follow(paths, tx, counters, interval));
        trust
    }

    /// Seconds until this agent's own certificate expires (negative once it has).
    pub fn own_expires_in(&self) -> i64 {
        self.current().own.not_after - now_secs()
    }

    /// Seconds until the first CA of the bundle expires.
    pub fn ca_expires_in(&self) -> i64 {
        self.current().ca_not_after - now_secs()
    }

    /// Changes of the material, for tasks that rebuild something from it.
    pub fn changes(&self) -> watch::Receiver<Arc<Material>> {
        self.rx.clone()
    }
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn log_loaded(m: &Material, what: &str) {
    tracing::info!(
        principal = %m.own,
        expires_in_days = (m.own.not_after - now_secs()) / 86_400,
        cas = m.cas,
        "{what} TLS certificate and CA bundle"
    );
}

async fn follow(
    paths: Paths,
    tx: watch::Sender<Arc<Material>>,
    counters: Arc<ReloadCounters>,
    interval: Duration,
) {
    // Unknown: the first check reads the files again, and takes them only if they changed
    // since the first set was read (a change in between is not missed).
    let mut seen: [Stamp; 3] = [None, None, None];
    let mut failed_at: Option<[Stamp; 3]> = None;
    let mut last_full = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = tx.closed() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let p = paths.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || stamps(&p)).await else {
            return;
        };
        let full = last_full.elapsed() >= FULL_RELOAD;
        if now == seen && !full {
            continue;
        }
        if failed_at == Some(now) && !full {
            // Already tried and logged: wait for the files to change again.
            continue;
        }
        let p = paths.clone();
        let Ok(loaded) = tokio::task::spawn_blocking(move || Material::load(&p)).await else {
            return;
        };
        if full {
            last_full = tokio::time::Instant::now();
        }
        match loaded {
            Ok(m) => {
                seen = now;
                failed_at = None;
                if m.source == tx.borrow().source {
                    continue;
                }
                log_loaded(&m, "reloaded");
                counters.loaded.fetch_add(1, Ordering::Relaxed);
                tx.send_replace(Arc::new(m));
            }
            Err(e) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                if failed_at != Some(now) {
                    tracing::warn!(error = %e, "the TLS files changed but do not load: the last good set stays in use");
                }
                failed_at = Some(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Authority;
    use crate::material::tests::{leaf, write};
    use crate::principal::{Grant, Role, Tier};

    #[tokio::test]
    async fn a_rotated_certificate_is_taken_and_a_broken_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("ca", Duration::from_secs(7200)).unwrap();
        let first = leaf(&ca, vec![Grant::new(Tier::Region, "ord", Role::Agent)]);
        let paths = write(dir.path(), ca.cert_pem(), &first);
        let trust = Trust::follow_every(paths.clone(), Duration::from_millis(20)).unwrap();
        assert_eq!(trust.current().own.grants[0].role, Role::Agent);
        let mut changes = trust.changes();
        changes.borrow_and_update();

        // A half-written certificate: the first set stays.
        let second = leaf(&ca, vec![Grant::new(Tier::Region, "ord", Role::Reader)]);
        std::fs::write(&paths.cert, &second.cert_pem[..100]).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while trust.counters.failed.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "never tried");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(trust.current().own.grants[0].role, Role::Agent);
        // The rest of it (and its key) arrive: taken.
        std::fs::write(&paths.key, &second.key_pem).unwrap();
        std::fs::write(&paths.cert, &second.cert_pem).unwrap();
        tokio::time::timeout(Duration::from_secs(5), changes.changed())
            .await
            .expect("reloaded within 5 s")
            .unwrap();
        assert_eq!(trust.current().own.grants[0].role, Role::Reader);
    }
}
