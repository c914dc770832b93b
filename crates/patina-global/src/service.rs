//! `patina.v1.Global`: LookupApp from the agent's in-memory table (the same code an edge
//! proxy links, fed from the agent's own store), WatchApps from the store's change feed.

use std::sync::Arc;

use patina_edge::{Hit, Replica, Table};
use patina_proto::v1::global_server::Global;
use patina_proto::v1::{
    AppSummary, BridgeState, LookupAppRequest, LookupAppResponse, LookupAppsRequest,
    LookupAppsResponse, RegionInstances, WatchAppsRequest, WatchAppsResponse, watch_apps_response,
};
use patina_region::service::{
    MessageStream, WatchOpen, Watches, invalid, resume_token, watch_stream,
};
use patina_region::validate;
use patina_store::{Entry, Store, WatchItem};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::record::{Key, bridge_cert_key, decode_bridge, decode_cert, decode_summary, parse_key};

/// Most summaries and heartbeats in one WatchApps message.
const WATCH_BATCH: usize = 1024;

pub struct GlobalService {
    store: Store,
    table: Arc<Table>,
    region: String,
    watches: Watches,
    stopping: watch::Receiver<bool>,
}

impl GlobalService {
    /// `region`: where this agent is, the default `from_region` of lookups.
    pub fn new(
        store: Store,
        table: Arc<Table>,
        region: &str,
        watches: Watches,
        stopping: watch::Receiver<bool>,
    ) -> GlobalService {
        GlobalService {
            store,
            table,
            region: region.to_owned(),
            watches,
            stopping,
        }
    }
}

/// A store entry as WatchApps shows it (`None`: not a record of the global tier).
enum Shown {
    Summary(AppSummary),
    Bridge(BridgeState),
}

/// A bridge's heartbeat as WatchApps shows it, with the certificate its origin published
/// (so that an edge can check the signatures itself).
fn bridge_state(
    store: &Store,
    node: patina_store::NodeId,
    heartbeat: Option<&[u8]>,
) -> Option<BridgeState> {
    let mut b = BridgeState {
        bridge: node.0,
        removed: true,
        ..BridgeState::default()
    };
    if let Some(v) = heartbeat {
        let r = decode_bridge(v).ok()?;
        b.region = r.region;
        b.view_hlc = r.view_hlc;
        b.signature = r.signature;
        b.removed = false;
        b.certificate = store
            .get_live(&bridge_cert_key(node))
            .and_then(|c| c.value().and_then(|v| decode_cert(v).ok()))
            .map(|c| c.certificate)
            .unwrap_or_default();
    }
    Some(b)
}

fn show(store: &Store, e: &Entry) -> Option<Shown> {
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
                s.signature = r.signature;
                s.removed = false;
            }
            Some(Shown::Summary(s))
        }
        Key::Bridge(node) => bridge_state(store, node, e.value()).map(Shown::Bridge),
        // A new certificate comes to edges with the heartbeat the bridge writes after it
        // (signed with its key): the held heartbeat's signature would not verify under it.
        Key::BridgeCert(_) => None,
    }
}

fn fill<'a>(store: &Store, msg: &mut WatchAppsResponse, entries: impl Iterator<Item = &'a Entry>) {
    for e in entries {
        match show(store, e) {
            Some(Shown::Summary(s)) => msg.summaries.push(s),
            Some(Shown::Bridge(b)) => msg.bridges.push(b),
            None => {}
        }
    }
}

/// One store cursor item as a WatchApps message.
pub fn watch_apps_response(store: &Store, item: WatchItem) -> WatchAppsResponse {
    use watch_apps_response::Kind;
    let mut msg = WatchAppsResponse::default();
    match item {
        WatchItem::Snapshot { reset, entries } => {
            msg.kind = Kind::Snapshot as i32;
            msg.reset = reset;
            fill(store, &mut msg, entries.iter());
        }
        WatchItem::SnapshotDone { token } => {
            msg.kind = Kind::SnapshotDone as i32;
            msg.resume_token = token.to_string();
        }
        WatchItem::Delta { changes, token } => {
            msg.kind = Kind::Delta as i32;
            fill(store, &mut msg, changes.iter().map(|c| &c.entry));
            msg.resume_token = token.to_string();
        }
    }
    msg
}

/// Keep `table` current from `store`'s own feed, as a remote edge does through WatchApps.
/// Ends when the store closes.
pub async fn follow_store(store: Store, table: Arc<Table>, beat: patina_watchdog::Beat) {
    let mut replica = Replica::new(table);
    // Heartbeats (empty deltas) wake an idle follower, so that it stamps its beat.
    let mut cursor = store
        .watch(None, None, WATCH_BATCH)
        .with_heartbeat(patina_watchdog::STAMP_EVERY);
    beat.stamp();
    while let Some(item) = cursor.next().await {
        replica.apply(&watch_apps_response(&store, item));
        beat.stamp();
    }
}

/// Most apps in one LookupApps call.
pub const MAX_LOOKUP_APPS: usize = 1000;
/// Most regions listed in one LookupApps answer (about 40 bytes each: well under the API's
/// message limit).
pub const MAX_LOOKUP_REGIONS: usize = 100_000;

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

impl GlobalService {
    /// The region a lookup orders from: the caller's, else the agent's own.
    fn ordered_from<'a>(&'a self, from_region: &'a str) -> Result<&'a str, Status> {
        if from_region.is_empty() {
            return Ok(self.region.as_str());
        }
        validate::region_name(from_region).map_err(|e| invalid(e.at("from_")))?;
        Ok(from_region)
    }

    /// One app's answer, from the table (`hits`: scratch space).
    fn lookup(
        &self,
        app: String,
        from: &str,
        include_empty: bool,
        hits: &mut Vec<Hit>,
    ) -> LookupAppResponse {
        self.table.lookup_into(&app, from, include_empty, hits);
        let regions = hits.iter().map(|h| to_instances(&self.table, h)).collect();
        LookupAppResponse { app, regions }
    }
}

#[tonic::async_trait]
impl Global for GlobalService {
    async fn lookup_app(
        &self,
        request: Request<LookupAppRequest>,
    ) -> Result<Response<LookupAppResponse>, Status> {
        let req = request.into_inner();
        validate::app_name(&req.app).map_err(invalid)?;
        let from = self.ordered_from(&req.from_region)?;
        Ok(Response::new(self.lookup(
            req.app,
            from,
            req.include_empty,
            &mut Vec::new(),
        )))
    }

    async fn lookup_apps(
        &self,
        request: Request<LookupAppsRequest>,
    ) -> Result<Response<LookupAppsResponse>, Status> {
        let req = request.into_inner();
        if req.apps.len() > MAX_LOOKUP_APPS {
            return Err(Status::invalid_argument(format!(
                "{} apps in one LookupApps; at most {MAX_LOOKUP_APPS}",
                req.apps.len()
            )));
        }
        for (i, app) in req.apps.iter().enumerate() {
            validate::app_name(app).map_err(|e| invalid(e.at(&format!("apps[{i}]."))))?;
        }
        let from = self.ordered_from(&req.from_region)?;
        let mut hits = Vec::new();
        let mut listed = 0usize;
        let mut apps = Vec::with_capacity(req.apps.len());
        for app in req.apps {
            let answer = self.lookup(app, from, req.include_empty, &mut hits);
            listed += answer.regions.len();
            if listed > MAX_LOOKUP_REGIONS {
                return Err(Status::resource_exhausted(format!(
                    "more than {MAX_LOOKUP_REGIONS} regions to list in one LookupApps: ask for fewer apps"
                )));
            }
            apps.push(answer);
        }
        Ok(Response::new(LookupAppsResponse { apps }))
    }

    type WatchAppsStream = MessageStream<WatchAppsResponse>;

    async fn watch_apps(
        &self,
        request: Request<WatchAppsRequest>,
    ) -> Result<Response<Self::WatchAppsStream>, Status> {
        let accepted = patina_trust::server::accepted_at(&request);
        let req = request.into_inner();
        let stream = watch_stream(
            &self.store,
            &self.watches,
            self.stopping.clone(),
            WatchOpen {
                rpc: "WatchApps",
                accepted,
                scope: None,
                resume: resume_token(&req.resume_token)?,
                heartbeat_ms: req.heartbeat_ms,
                batch: WATCH_BATCH,
            },
            {
                let store = self.store.clone();
                move |item, _| Ok(watch_apps_response(&store, item))
            },
        )?;
        Ok(Response::new(stream))
    }
}
