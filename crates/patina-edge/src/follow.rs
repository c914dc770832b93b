//! Keeping a [`Table`] current: [`Replica`] applies `WatchApps` messages (from a global agent
//! over gRPC, or from a global agent's own store in process), and [`follow`] runs the gRPC
//! stream: it reconnects, resumes with the last token, and moves to the next agent when one
//! fails.

use std::sync::Arc;
use std::time::Duration;

use patina_proto::v1::global_client::GlobalClient;
use patina_proto::v1::watch_apps_response::Kind;
use patina_proto::v1::{WatchAppsRequest, WatchAppsResponse};
use tokio::sync::watch;

use crate::table::{SummaryUpdate, Table};

/// Applies a `WatchApps` stream to a table: snapshots are swept when complete, so lookups
/// answer from the last good state until then; refused summaries are counted and skipped.
pub struct Replica {
    table: Arc<Table>,
    /// Bridges seen in the snapshot being applied (`None`: no snapshot under way); at most
    /// one per heartbeat record, so bounded by the snapshot.
    snapshot: Option<std::collections::HashSet<u64>>,
    token: String,
    /// Signature checks on what arrives (`None`: taken as it comes, from a store that
    /// checked it already, or where TLS is off). Shared with the blocking thread [`follow`]
    /// checks on; never locked across an await.
    checks: Option<Arc<std::sync::Mutex<crate::signed::EdgeChecks>>>,
    /// The checks' counts, read without their lock.
    refusals: Option<Arc<crate::signed::Refusals>>,
}

impl Replica {
    pub fn new(table: Arc<Table>) -> Replica {
        Replica {
            table,
            snapshot: None,
            token: String::new(),
            checks: None,
            refusals: None,
        }
    }

    /// A replica that takes a heartbeat or summary only when its bridge signed it (see
    /// [`crate::signed::EdgeChecks`]); what fails is dropped and the table keeps what it held.
    pub fn checked(table: Arc<Table>, checks: crate::signed::EdgeChecks) -> Replica {
        Replica {
            refusals: Some(checks.refusals()),
            checks: Some(Arc::new(std::sync::Mutex::new(checks))),
            ..Replica::new(table)
        }
    }

    /// Records refused for want of a signature, and for a bad one (wrong key, another
    /// region's bridge, an untrusted certificate).
    pub fn refused(&self) -> (u64, u64) {
        self.refusals.as_ref().map_or((0, 0), |r| r.get())
    }

    /// The shared counts behind [`Replica::refused`] (`None` without checks).
    pub fn refusals(&self) -> Option<Arc<crate::signed::Refusals>> {
        self.refusals.clone()
    }

    pub fn table(&self) -> &Arc<Table> {
        &self.table
    }

    /// Where to resume after a disconnect (empty: from a snapshot).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Apply one message, checking its signatures first when the replica checks them.
    /// Returns whether the replica is complete (not inside a snapshot). The checks run on the
    /// caller's thread (and a few of its own for a large message), taking tens of
    /// microseconds per summary: on an async runtime, run them on a blocking thread with
    /// [`Replica::checks`] and then call [`Replica::apply_checked`], as [`follow`] does.
    pub fn apply(&mut self, msg: &WatchAppsResponse) -> bool {
        match &self.checks {
            Some(checks) => {
                let mut msg = msg.clone();
                checks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .filter(&mut msg);
                self.apply_checked(&msg)
            }
            None => self.apply_checked(msg),
        }
    }

    /// The checks to run on a message before [`Replica::apply_checked`], if any: on a
    /// blocking thread, as [`follow`] does (a snapshot's signatures take milliseconds).
    pub fn checks(&self) -> Option<Arc<std::sync::Mutex<crate::signed::EdgeChecks>>> {
        self.checks.clone()
    }

    /// Apply a message whose signatures were checked already (or need none).
    pub fn apply_checked(&mut self, msg: &WatchAppsResponse) -> bool {
        if msg.reset {
            self.table.begin_snapshot();
            self.snapshot = Some(std::collections::HashSet::new());
        }
        // Heartbeats first: a summary is checked against its bridge's region.
        for b in &msg.bridges {
            if b.removed {
                self.table.remove_bridge(b.bridge);
                continue;
            }
            let view_ms = b.view_hlc >> 16;
            match self.table.apply_bridge(b.bridge, &b.region, view_ms) {
                Ok(()) => {
                    if let Some(seen) = &mut self.snapshot {
                        seen.insert(b.bridge);
                    }
                }
                Err(why) => {
                    tracing::warn!(bridge = %format_args!("{:016x}", b.bridge), region = %b.region.escape_debug(), %why, "refused a bridge heartbeat");
                }
            }
        }
        for s in &msg.summaries {
            if s.removed {
                self.table.remove_summary(&s.app, &s.region);
                continue;
            }
            let update = SummaryUpdate {
                app: &s.app,
                region: &s.region,
                healthy: s.healthy,
                total: s.total,
                bridge: s.bridge,
            };
            if let Err(why) = self.table.apply_summary(update) {
                tracing::warn!(app = %s.app.escape_debug(), region = %s.region.escape_debug(), %why, "refused a summary: keeping the last good state");
            }
        }
        match Kind::try_from(msg.kind) {
            Ok(Kind::SnapshotDone) => {
                if let Some(seen) = self.snapshot.take() {
                    self.table.end_snapshot(&seen);
                }
            }
            Ok(Kind::Snapshot) => {}
            _ => {}
        }
        if !msg.resume_token.is_empty() {
            self.token.clone_from(&msg.resume_token);
        }
        self.snapshot.is_none()
    }

    /// The stream broke: a snapshot under way restarts from scratch on the next one (which
    /// has no token to resume from, so it resets).
    pub fn interrupted(&mut self) {
        self.snapshot = None;
    }
}

/// How often a broken stream is retried, at first and at most.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The agent did not answer, or its stream went silent, for [`SILENCE`]: it is stalled.
#[derive(Debug)]
struct Stalled;

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "nothing from the agent for {SILENCE:?}")
    }
}

impl std::error::Error for Stalled {}

/// The heartbeat asked of the agent, and the silence after which its stream counts as dead.
const HEARTBEAT: Duration = Duration::from_secs(1);
const SILENCE: Duration = Duration::from_secs(5);
/// A stream that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY_STREAM: Duration = Duration::from_secs(10);

/// Largest WatchApps message accepted.
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// A running follower: its table, and whether the table is complete.
pub struct Edge {
    pub table: Arc<Table>,
    /// `true` once a snapshot has completed and while the stream is up.
    pub synced: watch::Receiver<bool>,
    /// The server it follows now (or tries to).
    pub following: watch::Receiver<String>,
    /// The signature checks' counts (following over TLS).
    refusals: Option<Arc<crate::signed::Refusals>>,
    task: tokio::task::JoinHandle<()>,
}

impl Edge {
    /// Records refused for want of a signature, and for a bad one (wrong key, another
    /// region's bridge, an untrusted or expired certificate): `(0, 0)` without TLS.
    pub fn refused(&self) -> (u64, u64) {
        self.refusals.as_ref().map_or((0, 0), |r| r.get())
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follow `WatchApps` at one of `servers` (gRPC addresses such as `http://127.0.0.1:7700`),
/// starting at a random one, keeping `table` current; on failures, the next.
/// Runs on the current tokio runtime until the returned [`Edge`] is dropped.
/// `dial`: TLS with the proxy's certificate, expecting agents of the global cluster (or
/// plaintext where TLS is off). With TLS, every heartbeat and summary is checked against the
/// CA bundle before it is taken: its bridge's certificate must name its region in the
/// global cluster the dial expects (`global` when it names none), and its signature must
/// hold ([`crate::signed`]).
pub fn follow(servers: Vec<String>, table: Arc<Table>, dial: patina_trust::Dial) -> Edge {
    let (tx, synced) = watch::channel(false);
    let (following_tx, following) = watch::channel(String::new());
    let replica = match &dial {
        patina_trust::Dial::Plain => Replica::new(table.clone()),
        patina_trust::Dial::Tls { trust, scope } => {
            let scope = scope
                .as_deref()
                .cloned()
                .unwrap_or_else(|| patina_trust::Scope::new(patina_trust::Tier::Global, "global"));
            let verifier = Arc::new(patina_trust::Verifier::new(trust.clone()));
            Replica::checked(
                table.clone(),
                crate::signed::EdgeChecks::new(verifier, scope),
            )
        }
    };
    let refusals = replica.refusals();
    let task = tokio::spawn(run(servers, replica, tx, following_tx, dial));
    Edge {
        table,
        synced,
        following,
        refusals,
        task,
    }
}

/// A random number from the standard library's per-process keys: enough to spread retries
/// and starting points, with no dependency.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// `d` jittered to between half and one and a half of it: clients that lost one server at
/// once do not all come back in step.
pub fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis().max(2) as u64;
    Duration::from_millis(ms / 2 + random() % ms)
}

async fn run(
    servers: Vec<String>,
    mut replica: Replica,
    synced: watch::Sender<bool>,
    following: watch::Sender<String>,
    dial: patina_trust::Dial,
) {
    let mut retry = RETRY_MIN;
    // Edges start at a random one of their servers, so that a fleet given the same list
    // spreads over it (and a server's death sends its edges to different next ones).
    let mut i = (random() % servers.len().max(1) as u64) as usize;
    let mut failures_here = 0;
    loop {
        let Some(server) = servers.get(i % servers.len().max(1)) else {
            return;
        };
        following.send_replace(server.clone());
        let started = tokio::time::Instant::now();
        let mut stalled = false;
        match stream_once(server, &mut replica, &synced, &dial).await {
            Ok(()) => {}
            Err(e) => {
                stalled = e.is::<Stalled>();
                tracing::debug!(%server, error = %e, "WatchApps stream ended");
            }
        }
        synced.send_replace(false);
        replica.interrupted();
        if started.elapsed() >= HEALTHY_STREAM {
            retry = RETRY_MIN;
            failures_here = 0;
        }
        // The same agent again first (its token resumes without a snapshot of the whole
        // map); after two failures in a row, the next one (a token from another agent's
        // store costs a snapshot).
        // A stalled agent is left at once; another failure gets one more try.
        failures_here += if stalled { 2 } else { 1 };
        if failures_here >= 2 {
            i += 1;
            failures_here = 0;
            retry = RETRY_MIN;
        }
        tokio::time::sleep(jitter(retry)).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

async fn stream_once(
    server: &str,
    replica: &mut Replica,
    synced: &watch::Sender<bool>,
    dial: &patina_trust::Dial,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let endpoint = tonic::transport::Endpoint::from_shared(server.to_owned())?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10));
    // A stalled agent still accepts TCP connections (the kernel does): bound the whole
    // opening, not only the connect.
    let token = replica.token().to_owned();
    let opened = tokio::time::timeout(SILENCE, async move {
        let channel = dial.connect(endpoint).await?;
        let mut client = GlobalClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let stream = client
            .watch_apps(WatchAppsRequest {
                resume_token: token,
                heartbeat_ms: HEARTBEAT.as_millis() as u32,
            })
            .await?
            .into_inner();
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(stream)
    })
    .await;
    let mut stream = match opened {
        Ok(stream) => stream?,
        Err(_) => return Err(Box::new(Stalled)),
    };
    // The agent sends at least a heartbeat every HEARTBEAT: a stream silent for much longer
    // is a stalled agent (its connection may still answer pings), so move on.
    loop {
        let msg = match tokio::time::timeout(SILENCE, stream.message()).await {
            Ok(msg) => msg?,
            Err(_) => return Err(Box::new(Stalled)),
        };
        let Some(mut msg) = msg else { break };
        // Signatures are checked off the proxy's runtime threads.
        if let Some(checks) = replica.checks() {
            msg = tokio::task::spawn_blocking(move || {
                checks
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .filter(&mut msg);
                msg
            })
            .await?;
        }
        let complete = replica.apply_checked(&msg);
        synced.send_if_modified(|s| {
            let changed = *s != complete;
            *s = complete;
            changed
        });
    }
    Ok(())
}

#[cfg(test)]
mod jitter_tests {
    use super::*;

    #[test]
    fn retries_are_spread_between_half_and_one_and_a_half_of_the_delay() {
        let d = Duration::from_millis(1_000);
        let draws: Vec<Duration> = (0..1_000).map(|_| jitter(d)).collect();
        assert!(draws.iter().all(|j| *j >= d / 2 && *j < d * 3 / 2));
        let distinct: std::collections::BTreeSet<_> = draws.iter().collect();
        assert!(distinct.len() > 100, "spread: {} distinct", distinct.len());
    }
}
