//! `envoy.service.discovery.v3.AggregatedDiscoveryService` over a [`Source`]: each stream
//! is a task holding a [`Protocol`] that reads the client's requests and the [`Hub`]'s
//! changes and sends what they call for through a one-message channel (a slow client holds
//! its task back; nothing queues up), in responses of at most `max_response_bytes`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::Stream;
use patina_region::service::Watches;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::hub::Hub;
use crate::protocol::{Client, Names, Plan, Protocol, Stats};
use crate::resources::{self, Locality, Type};

/// Where an agent's resources come from: a region's machines or the global map.
pub trait Source: Send + Sync + 'static {
    /// Every app that exists now (for wildcard subscriptions).
    fn apps(&self) -> Vec<Arc<str>>;
    /// Whether the app exists: it has resources (its endpoints may be none).
    fn exists(&self, app: &str) -> bool;
    /// The app's localities as `client` should see them (empty: no endpoints now).
    fn localities(&self, app: &str, client: &Client, out: &mut Vec<Locality>);
    /// Whether the source holds its whole first state yet, for a source that starts empty
    /// (`None`: always). Before, streams wait and DNS answers SERVFAIL: an empty source would
    /// tell clients that no app exists.
    fn synced(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
    fn is_synced(&self) -> bool {
        self.synced().is_none_or(|r| *r.borrow())
    }
}

/// The resource of type `ty` named `app`, if it exists. `empty_endpoints`: a missing app's
/// endpoints are an empty assignment (state of the world cannot delete them otherwise).
fn build<S: Source + ?Sized>(
    source: &S,
    ty: Type,
    app: &str,
    client: &Client,
    empty_endpoints: bool,
    scratch: &mut Vec<Locality>,
) -> Option<Any> {
    if !crate::is_app_name(app) || !source.exists(app) {
        return (empty_endpoints && ty == Type::Endpoints).then(|| resources::endpoints(app, &[]));
    }
    Some(match ty {
        Type::Cluster => resources::cluster(app),
        Type::Listener => resources::listener(app),
        Type::Endpoints => {
            scratch.clear();
            source.localities(app, client, scratch);
            resources::endpoints(app, scratch)
        }
        Type::Route => return None,
    })
}

/// The ADS server's settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Pushes wait this long after a change, so that a burst is one push.
    pub debounce: Duration,
    /// Open ADS streams on the agent.
    pub max_streams: std::num::NonZeroUsize,
    /// Resource names one stream may subscribe to by name (the wildcard has no bound).
    pub max_names_per_stream: usize,
    /// Most bytes of resources in one response; a state-of-the-world cluster or listener
    /// response that would be larger ends the stream with `RESOURCE_EXHAUSTED`.
    pub max_response_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            debounce: Duration::from_millis(100),
            max_streams: std::num::NonZeroUsize::new(4096).expect("non-zero"),
            max_names_per_stream: 10_000,
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

/// The ADS service of one agent.
pub struct Ads<S: ?Sized> {
    source: Arc<S>,
    hub: Arc<Hub>,
    config: Config,
    slots: Watches,
    stopping: watch::Receiver<bool>,
    stats: Arc<Stats>,
}

impl<S: Source + ?Sized> Ads<S> {
    pub fn new(
        source: Arc<S>,
        hub: Arc<Hub>,
        config: Config,
        limits: &patina_region::Limits,
        stopping: watch::Receiver<bool>,
        stats: Arc<Stats>,
    ) -> Ads<S> {
        let slots = Watches::with_capacity(limits, config.max_streams, |c| &c.xds_streams);
        Ads {
            source,
            hub,
            config,
            slots,
            stopping,
            stats,
        }
    }

    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(patina_region::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(patina_region::MAX_MESSAGE_BYTES)
    }

    fn open<Req, Resp>(
        &self,
        request: Request<Streaming<Req>>,
        delta: bool,
    ) -> Result<ResponseStream<Resp>, Status>
    where
        Req: Message + Default + Send + 'static,
        Resp: Send + 'static,
        Driver<S>: Wire<Req, Resp>,
    {
        let slot = self.slots.acquire("ADS", "xds.max_streams")?;
        let deadline = self
            .slots
            .deadline(patina_trust::server::accepted_at(&request));
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<Resp, Status>>(1);
        let mut driver = Driver {
            source: self.source.clone(),
            hub: self.hub.clone(),
            config: self.config.clone(),
            proto: Protocol::new(delta, self.config.max_names_per_stream, self.stats.clone()),
            stats: self.stats.clone(),
            nonce: 0,
            seq: 0,
            scratch: Vec::new(),
            last_full: [None; 4],
        };
        let stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(status) = driver.run(inbound, &tx, stopping, deadline).await {
                // A client that does not read gets no status: the stream just ends.
                let _ = tokio::time::timeout(Duration::from_secs(1), tx.send(Err(status))).await;
            }
        });
        Ok(Box::pin(futures_util::stream::unfold(rx, |mut rx| async {
            rx.recv().await.map(|item| (item, rx))
        })))
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// One stream's task.
pub struct Driver<S: ?Sized> {
    source: Arc<S>,
    hub: Arc<Hub>,
    config: Config,
    proto: Protocol,
    stats: Arc<Stats>,
    nonce: u64,
    /// The last change of the hub this stream has taken into account.
    seq: u64,
    scratch: Vec<Locality>,
    /// State of the world: a hash of the last full-state response of each type, so that the
    /// same set is not sent twice (a change the stream already saw when it subscribed).
    last_full: [Option<u64>; 4],
}

/// The two variants' requests and responses.
pub trait Wire<Req, Resp> {
    fn request(&mut self, req: &Req) -> Result<Vec<Plan>, Status>;
    /// Build the plan's responses and send each (awaiting room) through `tx`.
    fn emit(
        &mut self,
        plan: Plan,
        tx: &mpsc::Sender<Result<Resp, Status>>,
    ) -> impl std::future::Future<Output = Result<(), Ended>> + Send;
    /// Fell behind the change log.
    fn behind(&mut self) -> Result<Vec<Plan>, Status>;
}

/// The client went away.
pub struct Ended;

impl<S: Source + ?Sized> Driver<S> {
    async fn run<Req, Resp>(
        &mut self,
        mut inbound: Streaming<Req>,
        tx: &mpsc::Sender<Result<Resp, Status>>,
        mut stopping: watch::Receiver<bool>,
        deadline: tokio::time::Instant,
    ) -> Result<(), Status>
    where
        Req: Message + Default + Send + 'static,
        Resp: Send + 'static,
        Self: Wire<Req, Resp>,
    {
        // A source still taking its first state: nothing is read or sent until it holds it
        // (requests wait in the stream; changes until then are in the state sent after).
        if let Some(mut synced) = self.source.synced() {
            tokio::select! {
                // A client that went away while it waited frees its slot.
                () = tx.closed() => return Ok(()),
                r = synced.wait_for(|s| *s) => {
                    if r.is_err() {
                        return Err(Status::unavailable("the agent is stopping"));
                    }
                }
                _ = stopping.wait_for(|s| *s) => {
                    return Err(Status::unavailable("the agent is shutting down; reconnect elsewhere"));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Status::unavailable(
                        "this stream reached its maximum age (limits.max_connection_age_secs): reconnect",
                    ));
                }
            }
        }
        let (seq, mut changes) = self.hub.subscribe();
        self.seq = seq;
        loop {
            let (plans, asked) = tokio::select! {
                _ = stopping.wait_for(|s| *s) => {
                    return Err(Status::unavailable("the agent is shutting down; reconnect elsewhere"));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Status::unavailable(
                        "this stream reached its maximum age (limits.max_connection_age_secs): reconnect",
                    ));
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => (self.request(&req)?, true),
                    Ok(None) | Err(_) => return Ok(()),
                },
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Err(Status::unavailable("the agent is stopping"));
                    }
                    changes.borrow_and_update();
                    match self.hub.since(self.seq) {
                        Ok(events) => {
                            if let Some(last) = events.last() {
                                self.seq = last.seq;
                            }
                            (self.proto.changes(&events), false)
                        }
                        Err(crate::hub::Behind) => {
                            self.seq = self.hub.newest();
                            (self.behind()?, false)
                        }
                    }
                }
            };
            // Sending waits for the client to read: the stream's age and the agent's shutdown
            // still end it (a client that stops reading holds its slot no longer than that).
            let emitting = async {
                for plan in plans {
                    // A request is always answered, even with the set it already has (a name
                    // it asks for that does not exist is told by its absence).
                    if asked && let Some(ty) = plan.ty {
                        self.last_full[ty.index()] = None;
                    }
                    self.emit(plan, tx).await?;
                }
                Ok::<(), Ended>(())
            };
            tokio::select! {
                sent = emitting => {
                    if sent.is_err() {
                        return Ok(());
                    }
                }
                _ = stopping.wait_for(|s| *s) => {
                    return Err(Status::unavailable("the agent is shutting down; reconnect elsewhere"));
                }
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Status::unavailable(
                        "this stream reached its maximum age (limits.max_connection_age_secs): reconnect",
                    ));
                }
            }
        }
    }

    /// The names a plan covers, sorted.
    fn resolve(&self, plan: &Plan) -> Vec<Arc<str>> {
        let Some(ty) = plan.ty else {
            return match &plan.names {
                Names::List(v) => v.clone(),
                Names::Subscribed => Vec::new(),
            };
        };
        let mut names = match &plan.names {
            Names::List(v) => v.clone(),
            Names::Subscribed => {
                let sub = self.proto.sub(ty);
                let mut v: Vec<Arc<str>> = if sub.wildcard {
                    let mut all = self.source.apps();
                    let have: HashSet<&str> = all.iter().map(|a| &**a).collect();
                    let extra: Vec<Arc<str>> = sub
                        .names
                        .iter()
                        .filter(|n| !have.contains(&***n))
                        .cloned()
                        .collect();
                    all.extend(extra);
                    all
                } else {
                    sub.names.iter().cloned().collect()
                };
                // Delta, first request: what the client holds is compared too (held and
                // gone: reported removed; held and subscribed: sent if it differs).
                v.extend(
                    plan.have
                        .keys()
                        .filter(|k| sub.has(k) || !self.source.exists(k))
                        .map(|k| Arc::from(k.as_str())),
                );
                v
            }
        };
        names.sort_unstable();
        names.dedup();
        names
    }
}

impl<S: Source + ?Sized> Wire<DiscoveryRequest, DiscoveryResponse> for Driver<S> {
    fn request(&mut self, req: &DiscoveryRequest) -> Result<Vec<Plan>, Status> {
        self.proto.sotw_request(req)
    }

    fn behind(&mut self) -> Result<Vec<Plan>, Status> {
        self.stats.resyncs.fetch_add(1, Ordering::Relaxed);
        Ok(self.proto.resync())
    }

    async fn emit(
        &mut self,
        plan: Plan,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Ended> {
        let names = self.resolve(&plan);
        let version = self.hub.newest().to_string();
        let client = self.proto.client().clone();
        let mut resources = Vec::new();
        let mut bytes = 0usize;
        let mut sent_one = false;
        let mut scratch = std::mem::take(&mut self.scratch);
        for name in &names {
            let Some(ty) = plan.ty else { break };
            let Some(r) = build(&*self.source, ty, name, &client, true, &mut scratch) else {
                continue;
            };
            let size = r.encoded_len();
            if bytes + size > self.config.max_response_bytes && !resources.is_empty() {
                if plan.full {
                    self.scratch = scratch;
                    let _ = tx
                        .send(Err(Status::resource_exhausted(format!(
                            "the {} resources of type {} exceed one response ({} bytes, xds.max_response_bytes): subscribe by name or use the delta protocol",
                            names.len(),
                            plan.url,
                            self.config.max_response_bytes
                        ))))
                        .await;
                    return Err(Ended);
                }
                let chunk = std::mem::take(&mut resources);
                bytes = 0;
                self.send_sotw(&plan, &version, chunk, tx).await?;
                sent_one = true;
            }
            bytes += size;
            resources.push(r);
        }
        self.scratch = scratch;
        if plan.full
            && let Some(ty) = plan.ty
        {
            let hash = set_hash(&resources);
            if self.last_full[ty.index()] == Some(hash) {
                return Ok(());
            }
            self.last_full[ty.index()] = Some(hash);
        }
        if !resources.is_empty() || !sent_one {
            self.send_sotw(&plan, &version, resources, tx).await?;
        }
        Ok(())
    }
}

/// A hash of a set of resources (their types and encodings, in order).
fn set_hash(resources: &[Any]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for r in resources {
        for b in r
            .type_url
            .bytes()
            .chain(r.value.iter().copied())
            .chain([0xff])
        {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

impl<S: Source + ?Sized> Driver<S> {
    /// A response of `plan` is about to go: its nonce, now the last sent for its type.
    fn stamp(&mut self, plan: &Plan) -> u64 {
        self.nonce += 1;
        let nonce = self.nonce;
        if let Some(ty) = plan.ty {
            self.proto.sent(ty, nonce);
        }
        self.stats.responses.fetch_add(1, Ordering::Relaxed);
        nonce
    }

    async fn send_sotw(
        &mut self,
        plan: &Plan,
        version: &str,
        resources: Vec<Any>,
        tx: &mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Result<(), Ended> {
        let nonce = self.stamp(plan);
        tx.send(Ok(DiscoveryResponse {
            version_info: version.to_owned(),
            resources,
            type_url: plan.url.clone(),
            nonce: nonce.to_string(),
            ..Default::default()
        }))
        .await
        .map_err(|_| Ended)
    }

    async fn send_delta(
        &mut self,
        plan: &Plan,
        resources: Vec<Resource>,
        removed: Vec<String>,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Result<(), Ended> {
        let nonce = self.stamp(plan);
        tx.send(Ok(DeltaDiscoveryResponse {
            system_version_info: self.hub.newest().to_string(),
            resources,
            type_url: plan.url.clone(),
            removed_resources: removed,
            nonce: nonce.to_string(),
            ..Default::default()
        }))
        .await
        .map_err(|_| Ended)
    }
}

impl<S: Source + ?Sized> Wire<DeltaDiscoveryRequest, DeltaDiscoveryResponse> for Driver<S> {
    fn request(&mut self, req: &DeltaDiscoveryRequest) -> Result<Vec<Plan>, Status> {
        self.proto.delta_request(req)
    }

    fn behind(&mut self) -> Result<Vec<Plan>, Status> {
        self.stats.ended_behind.fetch_add(1, Ordering::Relaxed);
        Err(Status::unavailable(
            "this stream fell behind the agent's change log: reconnect with the versions you hold (initial_resource_versions)",
        ))
    }

    async fn emit(
        &mut self,
        plan: Plan,
        tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Result<(), Ended> {
        let names = self.resolve(&plan);
        let client = self.proto.client().clone();
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut bytes = 0usize;
        let mut sent_one = false;
        let mut scratch = std::mem::take(&mut self.scratch);
        for name in &names {
            let built = plan
                .ty
                .and_then(|ty| build(&*self.source, ty, name, &client, false, &mut scratch));
            let size = match built {
                None => {
                    removed.push(name.to_string());
                    name.len() + 2
                }
                Some(any) => {
                    let version = resources::version_of(&any);
                    if plan.have.get(&**name) == Some(&version) {
                        continue;
                    }
                    let r = Resource {
                        name: name.to_string(),
                        version,
                        resource: Some(any),
                        ..Default::default()
                    };
                    let size = r.encoded_len();
                    resources.push(r);
                    size
                }
            };
            bytes += size;
            if bytes > self.config.max_response_bytes {
                let chunk = std::mem::take(&mut resources);
                let gone = std::mem::take(&mut removed);
                bytes = 0;
                self.send_delta(&plan, chunk, gone, tx).await?;
                sent_one = true;
            }
        }
        self.scratch = scratch;
        if !resources.is_empty() || !removed.is_empty() || !sent_one {
            self.send_delta(&plan, resources, removed, tx).await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl<S: Source + ?Sized> AggregatedDiscoveryService for Ads<S> {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open(request, false).map(Response::new)
    }

    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.open(request, true).map(Response::new)
    }
}
