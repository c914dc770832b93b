//! `patina.v1.Global`: LookupApp from the agent's in-memory table (the same code an edge
//! proxy links, fed from the agent's own store), WatchApps from the store's change feed.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use patina_edge::{Hit, Replica, Table, is_dns_label};
use patina_proto::v1::global_server::Global;
use patina_proto::v1::{
    AppSummary, BridgeState, LookupAppRequest, LookupAppResponse, RegionInstances,
    WatchAppsRequest, WatchAppsResponse, watch_apps_response,
};
use patina_store::{Entry, ResumeToken, Store, WatchItem};
use tokio::sync::{Semaphore, watch};
use tonic::{Request, Response, Status};

use crate::record::{Key, decode_bridge, decode_summary, parse_key};

/// Most summaries and heartbeats in one WatchApps message.
const WATCH_BATCH: usize = 1024;

pub struct GlobalService {
    store: Store,
    table: Arc<Table>,
    region: String,
    watches: Arc<Semaphore>,
    stopping: watch::Receiver<bool>,
}

impl GlobalService {
    /// `region`: where this agent is, the default `from_region` of lookups.
    pub fn new(
        store: Store,
        table: Arc<Table>,
        region: &str,
        max_watches: usize,
        stopping: watch::Receiver<bool>,
    ) -> GlobalService {
        GlobalService {
            store,
            table,
            region: region.to_owned(),
            watches: Arc::new(Semaphore::new(max_watches)),
            stopping,
        }
    }
}

/// A store entry as WatchApps shows it (`None`: not a record of the global tier).
enum Shown {
    Summary(AppSummary),
    Bridge(BridgeState),
}

fn show(e: &Entry) -> Option<Shown> {
    let origin = e.version().origin.0;
    match parse_key(e.key())? {
        Key::Summary { app, region } => {
            let mut s = AppSummary {
                app: app.to_owned(),
                region: region.to_owned(),
                bridge: origin,
                removed: true,
                ..AppSummary::default()
            };
            // A tombstone or a hidden view (its bridge is down): removed.
            if let Some(v) = e.value() {
                let r = decode_summary(v).ok()?;
                s.healthy = r.healthy;
                s.total = r.total;
                s.view_hlc = r.view_hlc;
                s.removed = false;
            }
            Some(Shown::Summary(s))
        }
        Key::Bridge(node) => {
            let mut b = BridgeState {
                bridge: node.0,
                removed: true,
                ..BridgeState::default()
            };
            if let Some(v) = e.value() {
                let r = decode_bridge(v).ok()?;
                b.region = r.region;
                b.view_hlc = r.view_hlc;
                b.removed = false;
            }
            Some(Shown::Bridge(b))
        }
    }
}

fn fill<'a>(msg: &mut WatchAppsResponse, entries: impl Iterator<Item = &'a Entry>) {
    for e in entries {
        match show(e) {
            Some(Shown::Summary(s)) => msg.summaries.push(s),
            Some(Shown::Bridge(b)) => msg.bridges.push(b),
            None => {}
        }
    }
}

/// One store cursor item as a WatchApps message.
pub fn watch_apps_response(item: WatchItem) -> WatchAppsResponse {
    use watch_apps_response::Kind;
    let mut msg = WatchAppsResponse::default();
    match item {
        WatchItem::Snapshot { reset, entries } => {
            msg.kind = Kind::Snapshot as i32;
            msg.reset = reset;
            fill(&mut msg, entries.iter());
        }
        WatchItem::SnapshotDone { token } => {
            msg.kind = Kind::SnapshotDone as i32;
            msg.resume_token = token.to_string();
        }
        WatchItem::Delta { changes, token } => {
            msg.kind = Kind::Delta as i32;
            fill(&mut msg, changes.iter().map(|c| &c.entry));
            msg.resume_token = token.to_string();
        }
    }
    msg
}

/// Keep `table` current from `store`'s own feed, as a remote edge does through WatchApps.
/// Ends when the store closes.
pub async fn follow_store(store: Store, table: Arc<Table>) {
    let mut replica = Replica::new(table);
    let mut cursor = store.watch(None, None, WATCH_BATCH);
    while let Some(item) = cursor.next().await {
        replica.apply(&watch_apps_response(item));
    }
}

fn to_instances(table: &Table, h: &Hit) -> RegionInstances {
    RegionInstances {
        region: table
            .region_name(h.region)
            .map(|n| n.to_string())
            .unwrap_or_default(),
        healthy: h.healthy,
        total: h.total,
        rtt_ms: h.rtt_ms,
        view_time_ms: table.region_view_ms(h.region),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchAppsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Global for GlobalService {
    async fn lookup_app(
        &self,
        request: Request<LookupAppRequest>,
    ) -> Result<Response<LookupAppResponse>, Status> {
        let req = request.into_inner();
        if !is_dns_label(&req.app) {
            return Err(Status::invalid_argument(format!(
                "app: {:?} is not a DNS label (1 to 63 of a-z, 0-9, '-')",
                truncate(&req.app)
            )));
        }
        let from = if req.from_region.is_empty() {
            self.region.as_str()
        } else if is_dns_label(&req.from_region) {
            req.from_region.as_str()
        } else {
            return Err(Status::invalid_argument(format!(
                "from_region: {:?} is not a DNS label",
                truncate(&req.from_region)
            )));
        };
        let mut hits = Vec::new();
        self.table
            .lookup_into(&req.app, from, req.include_empty, &mut hits);
        let regions = hits.iter().map(|h| to_instances(&self.table, h)).collect();
        Ok(Response::new(LookupAppResponse {
            app: req.app,
            regions,
        }))
    }

    type WatchAppsStream = WatchStream;

    async fn watch_apps(
        &self,
        request: Request<WatchAppsRequest>,
    ) -> Result<Response<Self::WatchAppsStream>, Status> {
        let req = request.into_inner();
        let resume = if req.resume_token.is_empty() {
            None
        } else {
            Some(
                req.resume_token
                    .parse::<ResumeToken>()
                    .map_err(|e| Status::invalid_argument(format!("resume_token: {e}")))?,
            )
        };
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted("too many open WatchApps streams on this agent; retry later")
        })?;
        let mut cursor = self.store.watch(None, resume, WATCH_BATCH);
        if req.heartbeat_ms > 0 {
            let ms = req.heartbeat_ms.clamp(100, 60_000);
            cursor = cursor.with_heartbeat(std::time::Duration::from_millis(ms.into()));
        }
        let stopping = self.stopping.clone();
        // Polled only when the client has room (HTTP/2 flow control): a slow client stops its
        // cursor, which catches up later without buffering.
        let stream = futures_util::stream::unfold(
            (cursor, stopping, false, permit),
            |(mut cursor, mut stopping, ended, permit)| async move {
                if ended {
                    return None;
                }
                let response = tokio::select! {
                    item = cursor.next() => match item {
                        Some(item) => Ok(watch_apps_response(item)),
                        None => Err(Status::unavailable("the agent's store closed; resume elsewhere with the last token")),
                    },
                    _ = stopping.wait_for(|s| *s) => Err(Status::unavailable("the agent is shutting down; resume elsewhere")),
                };
                let ended = response.is_err();
                Some((response, (cursor, stopping, ended, permit)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
