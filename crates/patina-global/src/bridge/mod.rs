//! Bridges: a bridge is a global agent (its own store and membership in the global cluster)
//! that also follows its region's Watch stream and publishes the region's (app, region)
//! summaries under its own origin. [`core`] decides; [`run`] does the I/O.

pub mod core;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{BridgeRecord, SummaryRecord, WatchRequest, WatchResponse, machine_change};
use patina_store::{LocalWrite, NodeId, Store, StoreError, WatchItem};
use patina_trust::Material;
use prost::Message;
use tokio::sync::mpsc;

pub use self::core::{BridgeCore, Counts, Held, Publish, Standing, Timing};
use crate::record::{
    BRIDGES_GROUP, Key, bridge_cert_key, bridge_key, decode_cert, decode_summary, parse_key,
    summary_key,
};

/// What a bridge is told.
#[derive(Clone, Debug)]
pub struct BridgeConfig {
    /// The region it serves; it publishes summaries for this region only.
    pub region: String,
    /// gRPC addresses of the region's agents, most preferred first: it follows the first that
    /// answers, so the bridges of a region given the same list follow the same agent.
    pub region_agents: Vec<String>,
    pub timing: Timing,
    /// How often the bridge writes its heartbeat while its view of the region advances.
    pub heartbeat: Duration,
    /// The Watch heartbeat asked of the region agent: how often a quiet region still shows
    /// the bridge a current view.
    pub watch_heartbeat: Duration,
    /// How long the followed agent's view may go on not standing before the bridge moves to
    /// the next agent (a stream whose first message does not stand is left at once). Longer
    /// than the agents' `gossip.view_settle_ms`, so that an agent settling after a real death
    /// is waited for rather than left (a move costs a snapshot).
    pub unstanding_grace: Duration,
    /// How it reaches the region's agents: TLS expecting agents of its region's cluster, or
    /// plaintext.
    pub dial: patina_trust::Dial,
    /// The gossip cluster of the region's agents (their certificates name it): the region's
    /// name unless they were given another.
    pub region_cluster: String,
    /// The set whose key signs its heartbeats and summaries, and whose certificate it
    /// publishes (`None`: TLS off, nothing signed, and peers with TLS on refuse it all).
    pub signer: Option<patina_trust::Trust>,
    /// The agent's watchdog: the bridge's loop stamps its beat (`bridge`) on every turn.
    pub watchdog: Option<patina_watchdog::Watchdog>,
    /// What it published, for the agent's metrics.
    pub stats: Arc<BridgeStats>,
}

/// What a bridge published, for operators.
#[derive(Debug, Default)]
pub struct BridgeStats {
    /// Summaries written (and deleted).
    pub published: std::sync::atomic::AtomicU64,
    /// From the region view a summary reflects (its agent's clock) to its write here.
    pub publish_delay: patina_store::timing::Histogram,
}

impl BridgeConfig {
    pub fn new(region: &str, region_agents: Vec<String>) -> BridgeConfig {
        BridgeConfig {
            region: region.to_owned(),
            region_agents,
            timing: Timing::default(),
            heartbeat: Duration::from_secs(2),
            watch_heartbeat: Duration::from_secs(1),
            unstanding_grace: Duration::from_secs(6),
            dial: patina_trust::Dial::Plain,
            region_cluster: region.to_owned(),
            signer: None,
            watchdog: None,
            stats: Arc::default(),
        }
    }
}

enum RegionEvent {
    Message(WatchResponse),
    Interrupted,
}

/// Most region Watch messages (and store changes) waiting for the bridge's loop: a full
/// channel holds the stream (HTTP/2 flow control does the rest).
const CHANNEL: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Run the bridge over `store` (the bridge's own global-tier store, whose gossip carries what
/// it writes) until `shutdown` resolves or the store fails.
pub async fn run(store: Store, cfg: BridgeConfig, shutdown: impl Future<Output = ()>) {
    let start = tokio::time::Instant::now();
    let now = || start.elapsed();
    let (region_tx, mut region_rx) = mpsc::channel(CHANNEL);
    let (global_tx, mut global_rx) = mpsc::channel(CHANNEL);
    let follower = tokio::spawn(follow_region(cfg.clone(), region_tx));
    let watcher = tokio::spawn(watch_global(store.clone(), cfg.region.clone(), global_tx));
    let mut core = BridgeCore::new(cfg.timing);
    // The last heartbeat written: when, and with which view.
    let mut heartbeat_at = now();
    let mut heartbeat_view = 0u64;
    let signer = Signer(cfg.signer.clone());
    // Summaries a previous run left signed by a replaced key (it may have stopped between
    // the new certificate and signing them again) are looked for once at start.
    let beat = cfg
        .watchdog
        .as_ref()
        .map_or_else(patina_watchdog::Beat::detached, |w| w.register("bridge"));
    let mut registration = Registration {
        resign_pending: cfg.signer.is_some(),
        ..Registration::default()
    };
    register(&store, &cfg.region, &signer, 0, &mut registration, &beat).await;
    tokio::pin!(shutdown);
    loop {
        // A heartbeat is due only when there is a complete view newer than the last one
        // written; otherwise the loop sleeps until the next input.
        let heartbeat_due = (core.publishing() && core.view_hlc() > heartbeat_view)
            .then_some(heartbeat_at + cfg.heartbeat);
        beat.stamp();
        // Awake at least every STAMP_EVERY, so an idle bridge still stamps its beat.
        let wake = [core.next_due(), heartbeat_due]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now() + Duration::from_secs(1))
            .min(now() + patina_watchdog::STAMP_EVERY);
        let sleep = wake.saturating_sub(now());
        tokio::select! {
            ev = region_rx.recv() => match ev {
                Some(RegionEvent::Message(msg)) => core.region_message(now(), &msg),
                Some(RegionEvent::Interrupted) => core.region_interrupted(),
                None => break,
            },
            ev = global_rx.recv() => match ev {
                Some((app, standing)) => core.global_summary(now(), &app, standing),
                None => break,
            },
            _ = tokio::time::sleep(sleep) => {}
            _ = &mut shutdown => break,
        }
        // Registered again whenever the store lacks its registration under the origin it
        // writes as now: a rotated certificate, a move to a fresh origin, or a record a peer
        // deleted.
        if register(
            &store,
            &cfg.region,
            &signer,
            core.view_hlc(),
            &mut registration,
            &beat,
        )
        .await
        {
            heartbeat_at = now();
            heartbeat_view = heartbeat_view.max(core.view_hlc());
        }
        publish(&store, &cfg.region, &mut core, now(), &signer, &cfg.stats).await;
        if core.publishing()
            && core.view_hlc() > heartbeat_view
            && now() >= heartbeat_at + cfg.heartbeat
        {
            let view = core.view_hlc();
            // Tried once per interval whatever the outcome (a failed write is retried then).
            heartbeat_at = now();
            if heartbeat(&store, &cfg.region, view, &signer).await {
                heartbeat_view = view;
            }
        }
        if store.failure().is_some() {
            break;
        }
    }
    follower.abort();
    watcher.abort();
}

/// Check, before the bridge starts, that its store was not a bridge of another region: a
/// bridge's region is fixed by its first heartbeat (peers refuse a change), so a data
/// directory moved to another region must get a fresh origin (`patina new-origin`).
pub fn check_registration(store: &Store, region: &str) -> Result<(), String> {
    let Some(e) = store.get_live(&bridge_key(store.node())) else {
        return Ok(());
    };
    match e.value().map(crate::record::decode_bridge) {
        Some(Ok(b)) if b.region != region => Err(format!(
            "this data directory is a bridge of region {} (not {region}): a bridge's region is fixed; \
             give it a fresh origin with `patina new-origin` or use another data directory",
            b.region
        )),
        _ => Ok(()),
    }
}

/// Signs with the bridge's current TLS key (`None`: TLS off, signs nothing).
struct Signer(Option<patina_trust::Trust>);

/// `message` signed with `key` (nothing without TLS; an error is logged, and what carries the
/// empty signature is refused by peers).
fn sign_with(key: Option<&Material>, message: &[u8]) -> Vec<u8> {
    let Some(key) = key else {
        return Vec::new();
    };
    key.sign(message).unwrap_or_else(|e| {
        tracing::error!(error = %e, "the bridge's key cannot sign: its records will be refused");
        Vec::new()
    })
}

impl Signer {
    /// The key and certificate as they stand now (one snapshot: a reload between a signature
    /// and the certificate it is checked against cannot split them).
    fn key(&self) -> Option<Arc<Material>> {
        self.0.as_ref().map(patina_trust::Trust::current)
    }

    fn summary(&self, app: &str, region: &str, counts: Counts, view_hlc: u64) -> SummaryRecord {
        let message = patina_edge::signed::summary_message(
            app,
            region,
            counts.healthy,
            counts.total,
            view_hlc,
        );
        SummaryRecord {
            region: region.to_owned(),
            healthy: counts.healthy,
            total: counts.total,
            view_hlc,
            signature: sign_with(self.key().as_deref(), &message),
        }
    }
}

/// The write of the bridge's certificate record under `origin`, signed with its key for that
/// origin and publication.
fn cert_op(origin: NodeId, key: &Material, held_hlc: u64) -> LocalWrite {
    // Stamped with the wall clock (its field 4, which orders records of the global tier):
    // a newer publication beats an older one, and a deletion older than it.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // Never at or before the one held (a clock stepped back would make every write stale,
    // and the bridge retry on every pass).
    let published_hlc = patina_store::Hlc::from_physical_ms(now_ms)
        .0
        .max(held_hlc.saturating_add(1));
    let certificate = key.certificate().to_vec();
    let message = patina_edge::signed::certificate_message(origin.0, published_hlc, &certificate);
    let value = patina_proto::v1::BridgeCertRecord {
        signature: sign_with(Some(key), &message),
        certificate,
        published_hlc,
    }
    .encode_to_vec();
    LocalWrite::Put {
        key: bridge_cert_key(origin),
        group: BRIDGES_GROUP.to_owned(),
        value,
    }
}

/// The write of a heartbeat of `origin` for `region` at `view_hlc`, signed with `key`.
fn heartbeat_op(origin: NodeId, region: &str, view_hlc: u64, key: Option<&Material>) -> LocalWrite {
    let message = patina_edge::signed::heartbeat_message(origin.0, region, view_hlc);
    let value = BridgeRecord {
        region: region.to_owned(),
        view_hlc,
        signature: sign_with(key, &message),
    }
    .encode_to_vec();
    LocalWrite::Put {
        key: bridge_key(origin),
        group: BRIDGES_GROUP.to_owned(),
        value,
    }
}

/// What registration remembers between passes of the bridge's loop.
#[derive(Default)]
struct Registration {
    /// The certificate record last found signed by the current key, as (origin, publication
    /// time, signature): checked again only when the held record changes.
    checked: Option<(NodeId, u64, Vec<u8>)>,
    /// Summaries still to be signed again with a replaced certificate's successor.
    resign_pending: bool,
    /// After a failed write, registration waits until then (a full write queue or a fenced
    /// clock is not hammered once per region message).
    retry_at: Option<std::time::Instant>,
}

/// How long registration waits after a failed write.
const REGISTER_RETRY: Duration = Duration::from_secs(1);

/// Make sure the store holds the bridge's registration under the origin it writes as now:
/// its certificate record (the certificate the bridge holds now, signed by its key for this
/// origin) and a heartbeat (the region it serves), which every peer needs before it takes
/// the bridge's summaries. A new record is written in one batch with a fresh heartbeat
/// signed with its key (both or neither); a held record with the same certificate but no
/// valid signature (written before records were signed) is published again. When the
/// certificate replaced another, every summary the bridge holds that its new key did not sign
/// is signed again, retried after [`REGISTER_RETRY`] until every one is. Returns whether it
/// wrote a heartbeat.
async fn register(
    store: &Store,
    region: &str,
    signer: &Signer,
    view_hlc: u64,
    reg: &mut Registration,
    beat: &patina_watchdog::Beat,
) -> bool {
    if reg.retry_at.is_some_and(|t| std::time::Instant::now() < t) {
        return false;
    }
    let me = store.node();
    let held_view = store
        .get_live(&bridge_key(me))
        .and_then(|e| e.value().and_then(|v| crate::record::decode_bridge(v).ok()))
        .map(|b| b.view_hlc);
    let key = signer.key();
    let mut ops = Vec::with_capacity(2);
    let mut replaces = false;
    if let Some(key) = &key {
        let held = store
            .get_live(&bridge_cert_key(me))
            .and_then(|e| e.value().and_then(|v| decode_cert(v).ok()));
        let held_hlc = held.as_ref().map_or(0, |c| c.published_hlc);
        match held {
            Some(c) if c.certificate == key.certificate() => {
                let id = (me, c.published_hlc, c.signature);
                if reg.checked.as_ref() != Some(&id) {
                    let message =
                        patina_edge::signed::certificate_message(me.0, id.1, key.certificate());
                    if key.signed(&message, &id.2).is_ok() {
                        reg.checked = Some(id);
                    } else if key.sign(&message).is_ok() {
                        ops.push(cert_op(me, key, held_hlc));
                    } else {
                        // A key that cannot sign (logged as its records are made): publishing
                        // again would write the same unsigned record on every pass.
                        reg.checked = Some(id);
                    }
                }
            }
            Some(_) => {
                ops.push(cert_op(me, key, held_hlc));
                replaces = true;
            }
            None => ops.push(cert_op(me, key, held_hlc)),
        }
    }
    let mut wrote = false;
    if !ops.is_empty() || held_view.is_none() {
        // Never an older view than the heartbeat held: the same view signed again wins by
        // its version.
        let view = view_hlc.max(held_view.unwrap_or(0));
        let with_cert = !ops.is_empty();
        ops.push(heartbeat_op(me, region, view, key.as_deref()));
        match store.write(ops).await {
            Ok(_) => {
                if with_cert {
                    tracing::info!(origin = %me, "published the bridge's certificate");
                }
                wrote = true;
                reg.resign_pending |= replaces;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not register the bridge (retried)");
                reg.retry_at = Some(std::time::Instant::now() + REGISTER_RETRY);
                return false;
            }
        }
    }
    if reg.resign_pending {
        if resign(store, region, key.clone(), beat).await {
            reg.resign_pending = false;
        } else {
            reg.retry_at = Some(std::time::Instant::now() + REGISTER_RETRY);
        }
    }
    wrote
}

/// Sign again, with `key`, every summary the bridge holds under its origin that `key` did
/// not sign (after its certificate changed: a peer that meets them later checks them
/// against the new one). Returns whether every one is signed now (or a newer one stands);
/// stops at the first write that fails otherwise.
async fn resign(
    store: &Store,
    region: &str,
    key: Option<Arc<Material>>,
    beat: &patina_watchdog::Beat,
) -> bool {
    let Some(key) = key else { return true };
    let Ok(owned) = store.read_owned_by(store.node()).await else {
        return false;
    };
    let mine: Vec<(String, String, SummaryRecord)> = owned
        .iter()
        .filter_map(|e| {
            let Some(Key::Summary { app, .. }) = parse_key(e.key()) else {
                return None;
            };
            let s = decode_summary(e.value()?).ok()?;
            Some((e.key().to_owned(), app.to_owned(), s))
        })
        .collect();
    // Which of them the key did not sign: a signature check each, off the runtime's threads.
    let (checker, region_name) = (key.clone(), region.to_owned());
    let stale = tokio::task::spawn_blocking(move || {
        mine.into_iter()
            .filter(|(_, app, s)| {
                let message = patina_edge::signed::summary_message(
                    app,
                    &region_name,
                    s.healthy,
                    s.total,
                    s.view_hlc,
                );
                checker.signed(&message, &s.signature).is_err()
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (key_name, app, s) in stale {
        let message =
            patina_edge::signed::summary_message(&app, region, s.healthy, s.total, s.view_hlc);
        let value = SummaryRecord {
            signature: sign_with(Some(&key), &message),
            ..s
        }
        .encode_to_vec();
        let op = LocalWrite::Put {
            key: key_name,
            group: app,
            value,
        };
        // One write at a time, each a turn of the loop for the watchdog.
        beat.stamp();
        match store.write(vec![op]).await {
            Ok(_) => {}
            Err(StoreError::Stale(_)) => {
                tracing::debug!("a summary was not signed again: a newer one stands");
            }
            Err(e) => {
                tracing::warn!(error = %e, "summaries were not all signed again (retried)");
                return false;
            }
        }
    }
    true
}

async fn heartbeat(store: &Store, region: &str, view_hlc: u64, signer: &Signer) -> bool {
    let op = heartbeat_op(store.node(), region, view_hlc, signer.key().as_deref());
    match store.write(vec![op]).await {
        Ok(_) => true,
        Err(StoreError::Stale(_)) => false,
        Err(e) => {
            tracing::warn!(error = %e, "could not write the bridge's heartbeat");
            false
        }
    }
}

/// Write what the core says is due, each on its own (a write that loses to a fresher
/// summary must not take others with it); concurrent, so they share group commits.
async fn publish(
    store: &Store,
    region: &str,
    core: &mut BridgeCore,
    now: Duration,
    signer: &Signer,
    stats: &BridgeStats,
) {
    let due = core.due(now);
    if due.is_empty() {
        return;
    }
    let writes = due.iter().map(|p| {
        let key = summary_key(&p.app, region);
        if p.delete {
            return store.write(vec![LocalWrite::Delete { key }]);
        }
        let value = signer
            .summary(&p.app, region, p.counts, p.view_hlc)
            .encode_to_vec();
        store.write(vec![LocalWrite::Put {
            key,
            group: p.app.to_string(),
            value,
        }])
    });
    let results = futures_util::future::join_all(writes).await;
    for (p, r) in due.iter().zip(results) {
        match r {
            Ok(_) => {
                tracing::debug!(app = %p.app, healthy = p.counts.healthy, total = p.counts.total, "published");
                stats
                    .published
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let view_ms = patina_store::Hlc(p.view_hlc).physical_ms();
                stats.publish_delay.observe(Duration::from_millis(
                    store.wall_ms().saturating_sub(view_ms),
                ));
                core.published(now, p);
            }
            // A summary from a newer view stands (perhaps hidden): not again at this view.
            Err(StoreError::Stale(_)) => core.lost(p),
            Err(e) => {
                tracing::warn!(app = %p.app, error = %e, "could not publish a summary: retrying");
                core.retry(now, &p.app);
            }
        }
    }
}

/// Follow the global tier's summaries of `region` in the bridge's own store, and tell the
/// loop what stands for each app (`None`: nothing, or hidden).
async fn watch_global(store: Store, region: String, tx: mpsc::Sender<(String, Standing)>) {
    let mut cursor = store.watch(None, None, 1024);
    while let Some(item) = cursor.next().await {
        let entries: Vec<patina_store::Entry> = match item {
            WatchItem::Snapshot { entries, .. } => entries,
            WatchItem::Delta { changes, .. } => changes.into_iter().map(|c| c.entry).collect(),
            WatchItem::SnapshotDone { .. } => continue,
        };
        for e in entries {
            let Some(Key::Summary { app, region: r }) = parse_key(e.key()) else {
                continue;
            };
            if r != region {
                continue;
            }
            let standing = if e.is_hidden() {
                Standing::Hidden
            } else {
                match e.value().map(decode_summary) {
                    Some(Ok(s)) => Standing::Summary(Held {
                        counts: Counts {
                            healthy: s.healthy,
                            total: s.total,
                        },
                        view_hlc: s.view_hlc,
                    }),
                    // Checked before it was stored; a tombstone is nothing.
                    Some(Err(_)) | None => Standing::Nothing,
                }
            };
            if tx.send((app.to_owned(), standing)).await.is_err() {
                return;
            }
        }
    }
}

/// Follow the region's Watch stream at the first agent that answers and whose view stands,
/// resuming after reconnects; a stream from an agent of another region is refused, and one
/// whose view stops standing is left after `unstanding_grace`. While no agent stands the
/// bridge publishes nothing: the edges keep the last good state (and the region goes stale
/// after `global.stale_after_secs` if it lasts).
async fn follow_region(cfg: BridgeConfig, tx: mpsc::Sender<RegionEvent>) {
    let mut token = String::new();
    let mut retry = RETRY_MIN;
    loop {
        // Always from the most preferred agent: the bridges of a region given the same list
        // come back to the same agent after a blip, which keeps their views comparable (a
        // token from another agent's store only costs a snapshot).
        for agent in &cfg.region_agents {
            let started = tokio::time::Instant::now();
            match stream_region(agent, &cfg, &mut token, &tx).await {
                Ok(()) => {}
                Err(e) => tracing::info!(%agent, error = %e, "region Watch stream ended"),
            }
            if tx.send(RegionEvent::Interrupted).await.is_err() {
                return;
            }
            if started.elapsed() >= HEALTHY_STREAM {
                retry = RETRY_MIN;
                break;
            }
        }
        tokio::time::sleep(patina_edge::follow::jitter(retry)).await;
        retry = (retry * 2).min(RETRY_MAX);
    }
}

/// Why a view does not stand, for logs.
fn view_reasons(view: Option<&patina_proto::v1::ViewStatus>) -> String {
    let Some(v) = view else {
        return "the agent does not say (an older version?)".into();
    };
    let reasons: Vec<String> = v
        .reasons()
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("VIEW_REASON_")
                .to_lowercase()
        })
        .collect();
    if reasons.is_empty() {
        "no reason given".into()
    } else {
        reasons.join(", ")
    }
}

/// A stream that lasted this long was healthy: the next failure starts the backoff over.
const HEALTHY_STREAM: Duration = Duration::from_secs(10);

/// How far ahead of this host's clock a region view may be: a region agent whose clock is
/// further ahead (an NTP step) would otherwise stamp summaries that no later view could
/// replace until real time caught up.
const MAX_VIEW_AHEAD_MS: u64 = 1_000;

fn wall_ms() -> u64 {
    patina_store::Clock::now_ms(&patina_store::SystemClock)
}

async fn stream_region(
    agent: &str,
    cfg: &BridgeConfig,
    token: &mut String,
    tx: &mpsc::Sender<RegionEvent>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let uri = if agent.contains("://") {
        agent.to_owned()
    } else {
        format!("http://{agent}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
    let channel = cfg.dial.connect(endpoint).await?;
    let mut client = RegionClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let mut stream = client
        .watch(WatchRequest {
            app: String::new(),
            resume_token: token.clone(),
            heartbeat_ms: cfg.watch_heartbeat.as_millis().min(u32::MAX as u128) as u32,
        })
        .await?
        .into_inner();
    // The Watch heartbeat bounds silence: a stream quiet for much longer is dead.
    let silence = cfg.watch_heartbeat * 5 + Duration::from_secs(2);
    let mut first = true;
    // Since when the agent's view has not stood.
    let mut unstanding: Option<tokio::time::Instant> = None;
    loop {
        let msg = match tokio::time::timeout(silence, stream.message()).await {
            Ok(msg) => msg?,
            Err(_) => return Err(format!("no message for {silence:?}").into()),
        };
        let Some(msg) = msg else { return Ok(()) };
        // The agent says which region it serves: one of another region (even one with no
        // machine, which no check of machines would catch) is refused before anything of it
        // is counted.
        if msg.region != cfg.region {
            return Err(format!(
                "this agent serves region {:?}, not the bridge's {:?}",
                msg.region, cfg.region
            )
            .into());
        }
        if msg.view.as_ref().is_some_and(|v| v.stands) {
            unstanding = None;
        } else {
            let why = view_reasons(msg.view.as_ref());
            if first {
                return Err(format!("its view does not stand ({why})").into());
            }
            let since = *unstanding.get_or_insert_with(|| {
                tracing::warn!(%agent, reasons = %why, "the region agent's view no longer stands: publishing nothing from it");
                tokio::time::Instant::now()
            });
            if since.elapsed() >= cfg.unstanding_grace {
                return Err(format!(
                    "its view has not stood for {:?} ({why})",
                    cfg.unstanding_grace
                )
                .into());
            }
        }
        first = false;
        for c in &msg.changes {
            if let Some(machine_change::Change::Upserted(m)) = &c.change
                && m.region != cfg.region
            {
                return Err(format!(
                    "this agent serves region {:?}, not the bridge's {:?}",
                    m.region, cfg.region
                )
                .into());
            }
        }
        if !msg.resume_token.is_empty() {
            token.clone_from(&msg.resume_token);
        }
        let mut msg = msg;
        let limit = (wall_ms() + MAX_VIEW_AHEAD_MS) << 16;
        if msg.view_hlc > limit {
            tracing::warn!(%agent, ahead_ms = (msg.view_hlc >> 16).saturating_sub(wall_ms()), "the region agent's clock is ahead of this host's: its view is taken as of now");
            msg.view_hlc = limit;
        }
        if tx.send(RegionEvent::Message(msg)).await.is_err() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod registration_tests {
    use std::time::Duration;

    use patina_trust::certs::Authority;
    use patina_trust::{Grant, Role, Tier, Trust};

    use super::*;
    use crate::SummaryKind;

    const HOUR: Duration = Duration::from_secs(3600);

    fn bridge(ca: &Authority) -> Material {
        ca.issue_set(
            vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge("ord".into()),
            )],
            HOUR,
        )
        .unwrap()
    }

    fn held_cert(store: &Store) -> patina_proto::v1::BridgeCertRecord {
        let e = store.get_live(&bridge_cert_key(store.node())).unwrap();
        decode_cert(e.value().unwrap()).unwrap()
    }

    fn held_summary(store: &Store, key: &str) -> SummaryRecord {
        decode_summary(store.get_live(key).unwrap().value().unwrap()).unwrap()
    }

    /// One registration pass of a bridge of ord whose view is at 5, unwatched.
    async fn register_at_view_5(store: &Store, signer: &Signer, reg: &mut Registration) -> bool {
        register(
            store,
            "ord",
            signer,
            5,
            reg,
            &patina_watchdog::Beat::detached(),
        )
        .await
    }

    /// A certificate record written before records were signed is published again, signed;
    /// a signed one is left alone; after a rotation, the summaries the old key signed are
    /// signed again with the new one.
    #[tokio::test]
    async fn registration_signs_what_it_holds_with_the_key_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            patina_store::StoreOptions {
                kind: Arc::new(SummaryKind::default()),
                ..Default::default()
            },
        )
        .unwrap();
        let me = store.node();
        let ca = Authority::generate("ca", HOUR).unwrap();
        let signer = Signer(Some(Trust::fixed(bridge(&ca))));
        let first = signer.key().unwrap();
        let next = Signer(Some(Trust::fixed(bridge(&ca))));
        let second = next.key().unwrap();
        // As a bridge of the previous release left it: its certificate unsigned, a heartbeat
        // and a summary.
        let unsigned = patina_proto::v1::BridgeCertRecord {
            certificate: first.certificate().to_vec(),
            published_hlc: 1,
            signature: Vec::new(),
        };
        let summary = SummaryRecord {
            region: "ord".into(),
            healthy: 2,
            total: 3,
            view_hlc: 5,
            signature: first
                .sign(&patina_edge::signed::summary_message("web", "ord", 2, 3, 5))
                .unwrap(),
        };
        store
            .write(vec![
                LocalWrite::Put {
                    key: bridge_cert_key(me),
                    group: BRIDGES_GROUP.into(),
                    value: unsigned.encode_to_vec(),
                },
                heartbeat_op(me, "ord", 5, Some(&first)),
                LocalWrite::Put {
                    key: summary_key("web", "ord"),
                    group: "web".into(),
                    value: summary.encode_to_vec(),
                },
                // One signed by another key (a run that stopped mid-rotation).
                LocalWrite::Put {
                    key: summary_key("api", "ord"),
                    group: "api".into(),
                    value: SummaryRecord {
                        signature: second
                            .sign(&patina_edge::signed::summary_message("api", "ord", 2, 3, 5))
                            .unwrap(),
                        ..summary.clone()
                    }
                    .encode_to_vec(),
                },
            ])
            .await
            .unwrap();

        // As at start: summaries another key signed are looked for.
        let mut reg = Registration {
            resign_pending: true,
            ..Registration::default()
        };
        let version = |key: &str| store.get_live(key).unwrap().version();
        let web_version = version("web/ord");
        assert!(register_at_view_5(&store, &signer, &mut reg).await);
        assert!(!reg.resign_pending);
        let cert = held_cert(&store);
        assert!(cert.published_hlc > 1);
        let message =
            patina_edge::signed::certificate_message(me.0, cert.published_hlc, &cert.certificate);
        assert_eq!(first.signed(&message, &cert.signature), Ok(()));
        // Signed now: the next pass writes nothing.
        assert!(!register_at_view_5(&store, &signer, &mut reg).await);
        assert_eq!(held_cert(&store), cert);
        // The summary the key signed was left alone; the other one was signed again.
        assert_eq!(version("web/ord"), web_version);
        assert_eq!(held_summary(&store, "web/ord"), summary);
        let api = held_summary(&store, "api/ord");
        let message = patina_edge::signed::summary_message("api", "ord", 2, 3, 5);
        assert_eq!(first.signed(&message, &api.signature), Ok(()));

        // A rotated leaf: a new record and heartbeat, then the summaries signed again.
        let signer = next;
        assert!(register_at_view_5(&store, &signer, &mut reg).await);
        assert!(!reg.resign_pending);
        assert_eq!(held_cert(&store).certificate, second.certificate());
        let resigned = held_summary(&store, "web/ord");
        assert_eq!(
            (resigned.healthy, resigned.total, resigned.view_hlc),
            (2, 3, 5)
        );
        let message = patina_edge::signed::summary_message("web", "ord", 2, 3, 5);
        assert_eq!(second.signed(&message, &resigned.signature), Ok(()));
        assert!(first.signed(&message, &resigned.signature).is_err());
        let api = held_summary(&store, "api/ord");
        let message = patina_edge::signed::summary_message("api", "ord", 2, 3, 5);
        assert_eq!(second.signed(&message, &api.signature), Ok(()));
    }
}
