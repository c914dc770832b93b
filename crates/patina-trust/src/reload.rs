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

/// Seconds before expiry at which a certificate is reported as a warning (Consul's 30 days)
/// and as degraded (7 days).
pub const WARN_BEFORE: i64 = 30 * 86_400;
pub const DEGRADED_BEFORE: i64 = 7 * 86_400;

/// How near a certificate is to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Expiry {
    Ok,
    /// Under 30 days left.
    Warning,
    /// Under 7 days left.
    Degraded,
    Expired,
}

impl Expiry {
    pub fn of(seconds_left: i64) -> Expiry {
        if seconds_left <= 0 {
            Expiry::Expired
        } else if seconds_left < DEGRADED_BEFORE {
            Expiry::Degraded
        } else if seconds_left < WARN_BEFORE {
            Expiry::Warning
        } else {
            Expiry::Ok
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::Ok => "ok",
            Expiry::Warning => "warning",
            Expiry::Degraded => "degraded",
            Expiry::Expired => "expired",
        }
    }
}

/// Peers (agents and bridges of its cluster) that called this agent: when each one's
/// certificate expires, for the report of the soonest.
#[derive(Debug, Default)]
pub struct PeerExpiry {
    seen: std::sync::Mutex<std::collections::HashMap<String, (i64, i64)>>,
}

/// Peers remembered at most (the one seen longest ago goes first).
pub const MAX_PEERS_TRACKED: usize = 1024;
/// A peer not seen for this long is left out of the report (it left, or was rotated).
pub const PEER_FORGET_AFTER: i64 = 86_400;

impl PeerExpiry {
    /// A call from `p`, a peer at `from`: remembered when it is an agent or a bridge (by its
    /// name and address: agents of a cluster may share a name).
    pub fn record(&self, p: &crate::Principal, from: Option<std::net::IpAddr>) {
        use crate::Role;
        if !p
            .grants
            .iter()
            .any(|g| matches!(g.role, Role::Agent | Role::Bridge(_)))
        {
            return;
        }
        let now = now_secs();
        let who = match from {
            Some(ip) => format!("{} at {ip}", p.name),
            None => p.name.clone(),
        };
        let mut seen = self.seen.lock().expect("peer expiry");
        if seen.len() >= MAX_PEERS_TRACKED
            && !seen.contains_key(&who)
            && let Some(oldest) = seen
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(n, _)| n.clone())
        {
            seen.remove(&oldest);
        }
        seen.insert(who, (p.not_after, now));
    }

    /// The peer whose certificate ends first, among those seen in the last day: its name
    /// and seconds left.
    pub fn soonest(&self) -> Option<(String, i64)> {
        let now = now_secs();
        self.seen
            .lock()
            .expect("peer expiry")
            .iter()
            .filter(|(_, (_, at))| now - at < PEER_FORGET_AFTER)
            .min_by_key(|(_, (not_after, _))| *not_after)
            .map(|(n, (not_after, _))| (n.clone(), not_after - now))
    }
}

/// What an agent reports of its certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpiryReport {
    pub own_secs: i64,
    pub ca_secs: i64,
    pub soonest_peer: Option<(String, i64)>,
    /// The worst of its own certificate's and the bundle's.
    pub state: Expiry,
}

/// The current material, shared by every listener and client of an agent.
#[derive(Clone)]
pub struct Trust {
    rx: watch::Receiver<Arc<Material>>,
    pub counters: Arc<ReloadCounters>,
    /// Peers' certificates met in handshakes.
    pub peers: Arc<PeerExpiry>,
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
            peers: Arc::default(),
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
            peers: Arc::default(),
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

    /// Its own certificate's, the bundle's and the soonest peer's time left.
    pub fn expiry(&self) -> ExpiryReport {
        let (own_secs, ca_secs) = (self.own_expires_in(), self.ca_expires_in());
        ExpiryReport {
            own_secs,
            ca_secs,
            soonest_peer: self.peers.soonest(),
            state: Expiry::of(own_secs).max(Expiry::of(ca_secs)),
        }
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

#[cfg(test)]
mod expiry_tests {
    use super::*;
    use crate::{Grant, Principal, Role, Tier};

    #[test]
    fn thresholds_are_consuls_and_the_soonest_peer_is_reported() {
        let day = 86_400;
        assert_eq!(Expiry::of(31 * day), Expiry::Ok);
        assert_eq!(Expiry::of(29 * day), Expiry::Warning);
        assert_eq!(Expiry::of(6 * day), Expiry::Degraded);
        assert_eq!(Expiry::of(0), Expiry::Expired);
        let now = now_secs();
        let peers = PeerExpiry::default();
        let principal = |name: &str, role: Role, days: i64| Principal {
            grants: vec![Grant::new(Tier::Region, "ord", role)],
            not_after: now + days * day,
            name: name.into(),
        };
        let ip = |n: u8| Some(std::net::IpAddr::from([10, 0, 0, n]));
        peers.record(&principal("a", Role::Agent, 90), ip(1));
        peers.record(&principal("b", Role::Agent, 20), ip(2));
        // Another agent under the same name elsewhere is another peer.
        peers.record(&principal("b", Role::Agent, 60), ip(3));
        // A reader is not a peer: not tracked however soon it ends.
        peers.record(&principal("r", Role::Reader, 1), ip(4));
        let (name, left) = peers.soonest().unwrap();
        assert_eq!(name, "b at 10.0.0.2");
        assert!((left - 20 * day).abs() < 5);
        // Renewed: the same peer's new certificate replaces the old.
        peers.record(&principal("b", Role::Agent, 80), ip(2));
        assert_eq!(peers.soonest().unwrap().0, "b at 10.0.0.3");
        for i in 0..(MAX_PEERS_TRACKED + 10) {
            peers.record(&principal(&format!("p{i}"), Role::Agent, 100), None);
        }
        assert!(peers.seen.lock().unwrap().len() <= MAX_PEERS_TRACKED);
    }
}
