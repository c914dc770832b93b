//! The `patina.v1.Region` gRPC service: the edge where prost types meet the store.

use std::pin::Pin;
use std::sync::Arc;

use patina_proto::v1::region_server::Region;
use patina_proto::v1::{
    DeleteMachineRequest, DeleteMachineResponse, GetMachineRequest, GetMachineResponse, Health,
    ListInstancesRequest, ListInstancesResponse, Machine, MachineChange, MachineDeleted,
    UpsertMachineRequest, UpsertMachineResponse, UpsertMachinesRequest, UpsertMachinesResponse,
    ViewStatus, WatchRequest, WatchResponse, machine_change, watch_response,
};
use patina_store::{Change, Entry, Filter, LocalWrite, ResumeToken, Store, StoreError, WatchItem};
use prost::Message;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::validate::{self, Invalid, ValidMachine, echo};

/// Most machines per Watch message: bounds each message (4 KiB records: at most ~2 MiB).
pub const WATCH_BATCH: usize = 512;
/// ListInstances page size when the client asks for none: most apps fit in one page.
pub const DEFAULT_PAGE_SIZE: usize = 500;
/// Largest ListInstances page: 1000 records of at most 4 KiB fit the 8 MiB response cap.
pub const MAX_PAGE_SIZE: usize = 1000;
/// Prefix of the page tokens this version issues; another prefix is not ours. Changing the
/// token's contents means a new prefix.
const PAGE_TOKEN_PREFIX: &str = "p1.";

#[derive(Clone)]
pub struct RegionService {
    store: Store,
    region: Arc<str>,
    host: Arc<str>,
    /// Becomes true when the agent shuts down: open Watch streams end with `UNAVAILABLE`
    /// (they never end by themselves, and a graceful shutdown waits for open streams).
    stopping: tokio::sync::watch::Receiver<bool>,
    /// One permit per open Watch stream, held by the stream: a new Watch is refused with
    /// `RESOURCE_EXHAUSTED` when none is left.
    watches: Watches,
    /// The agent's gossip, whose view stamps every Watch message (`None`: an agent without a
    /// cluster, whose view never stands).
    gossip: Option<patina_gossip::shell::Gossip>,
    /// The cluster callers' grants are checked in (`None`: a listener without TLS, whose
    /// callers are not known).
    scope: Option<Arc<patina_trust::Scope>>,
}

impl RegionService {
    /// A machine with checks written without a health gets the health its checks gave the
    /// stored machine (when that one has checks too), or starts critical until its checks
    /// pass (`checks.rs`). Any other machine is taken as it is.
    fn with_checked_health<'a>(&self, m: &'a Machine) -> std::borrow::Cow<'a, Machine> {
        if m.checks.is_empty() || m.health != Health::Unspecified as i32 {
            return std::borrow::Cow::Borrowed(m);
        }
        let held = self
            .store
            .get_live(&m.id)
            .and_then(|e| e.value().and_then(|v| Machine::decode(v).ok()))
            .filter(|s| !s.checks.is_empty() && s.health != Health::Unspecified as i32);
        let mut m = m.clone();
        m.health = held.map_or(Health::Critical as i32, |s| s.health);
        std::borrow::Cow::Owned(m)
    }
}

/// The view of an agent that runs no cluster: it does not stand.
fn no_cluster_view() -> ViewStatus {
    ViewStatus {
        stands: false,
        reasons: vec![patina_proto::v1::ViewReason::NoCluster as i32],
        ..Default::default()
    }
}

impl RegionService {
    pub fn new(
        store: Store,
        region: &str,
        host: &str,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> RegionService {
        RegionService {
            store,
            region: Arc::from(region),
            host: Arc::from(host),
            stopping,
            watches: Watches::new(&crate::Limits::default()),
            gossip: None,
            scope: None,
        }
    }

    /// The agent's gossip: its view stamps every Watch message.
    pub fn with_gossip(mut self, gossip: Option<patina_gossip::shell::Gossip>) -> RegionService {
        self.gossip = gossip;
        self
    }

    /// Check the hosts a writer's certificate names against the machines it writes, in
    /// `scope` (the agent's listener has TLS).
    pub fn with_scope(mut self, scope: Option<patina_trust::Scope>) -> RegionService {
        self.scope = scope.map(Arc::new);
        self
    }

    /// A writer whose certificate names hosts may write only machines of those hosts: the
    /// one it sends, and the one the stored machine of that id is on (no taking over another
    /// host's machine by its id). `None` for a write that sends no host (a deletion).
    fn check_hosts<'a, T>(
        &self,
        request: &Request<T>,
        writes: impl IntoIterator<Item = (&'a str, Option<&'a str>)>,
    ) -> Result<(), Status> {
        let (Some(scope), Some(principal)) = (
            self.scope.as_deref(),
            patina_trust::server::principal(request),
        ) else {
            return Ok(());
        };
        for (id, host) in writes {
            // A machine sent without a host is on this agent's.
            let sent = host.map(|h| if h.is_empty() { &*self.host } else { h });
            let stored = self
                .store
                .get_live(id)
                .and_then(|e| e.value().and_then(|v| Machine::decode(v).ok()))
                .map(|m| m.host);
            for h in sent.into_iter().chain(stored.as_deref()) {
                if !principal.may_write_host(scope, h) {
                    return Err(Status::permission_denied(format!(
                        "machine {}: the certificate of {principal} may not write machines of host {}",
                        echo(id),
                        echo(h)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Watch streams within `limits` (how many at once, and how long each).
    pub fn with_limits(mut self, limits: &crate::Limits) -> RegionService {
        self.watches = Watches::new(limits);
        self
    }
}

/// An input error as the gRPC status it maps to.
pub fn invalid(e: Invalid) -> Status {
    match e {
        Invalid::Argument(m) => Status::invalid_argument(m),
        Invalid::TooLarge(m) => Status::resource_exhausted(m),
    }
}

pub(crate) fn store_error(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(key) => Status::not_found(format!("no machine {}", echo(&key))),
        StoreError::GroupChange { key, existing } => Status::failed_precondition(format!(
            "machine {} belongs to app {}; delete it before reusing its id",
            echo(&key),
            echo(&existing)
        )),
        StoreError::Closed => Status::unavailable("the agent is shutting down"),
        StoreError::Failed(why) => Status::unavailable(format!(
            "the agent's store failed and the agent is stopping: {why}"
        )),
        StoreError::Stale(key) => Status::failed_precondition(format!(
            "machine {}: the agent holds a newer version",
            echo(&key)
        )),
        StoreError::DiskFull => Status::resource_exhausted(
            "the agent's disk is full: the write was not applied; retry once space is freed",
        ),
        StoreError::Overloaded => {
            Status::resource_exhausted("the agent's write queue is full: retry later")
        }
        e @ (StoreError::ClockOffset { .. } | StoreError::HlcAhead { .. }) => {
            Status::unavailable(e.to_string())
        }
        StoreError::TooLarge { bytes, limit } => Status::resource_exhausted(format!(
            "a request of {bytes} bytes exceeds the write queue's {limit} bytes"
        )),
        other => {
            tracing::error!(error = %other, "store write failed");
            Status::internal(format!("store: {other}"))
        }
    }
}

/// A validated machine as a store write: keyed by id, grouped by app.
fn put(v: ValidMachine) -> LocalWrite {
    LocalWrite::Put {
        key: v.id,
        group: v.app,
        value: v.encoded,
    }
}

fn version(v: &patina_store::Version) -> patina_proto::v1::Version {
    patina_proto::v1::Version {
        origin: v.origin.0,
        seq: v.seq,
        hlc: v.hlc.0,
    }
}

fn timestamp(v: &patina_store::Version) -> prost_types::Timestamp {
    let ms = v.hlc.physical_ms();
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The stored record as a client sees it: its value plus version and update time.
pub fn machine_from_entry(value: &[u8], v: &patina_store::Version) -> Result<Machine, Status> {
    let mut m = Machine::decode(value).map_err(|e| {
        tracing::error!(error = %e, "undecodable stored machine");
        Status::internal("a stored machine record could not be decoded")
    })?;
    m.version = Some(version(v));
    m.updated_at = Some(timestamp(v));
    Ok(m)
}

fn entry_to_machine(e: &Entry) -> Result<Machine, Status> {
    let value = e
        .value()
        .ok_or_else(|| Status::internal("a tombstone was served as a machine"))?;
    machine_from_entry(value, &e.version())
}

fn change_to_proto(c: &Change) -> Result<MachineChange, Status> {
    let e = &c.entry;
    let change = match e.value() {
        Some(value) => machine_change::Change::Upserted(machine_from_entry(value, &e.version())?),
        None => machine_change::Change::Deleted(MachineDeleted {
            id: e.key().to_owned(),
            app: e.group().to_owned(),
            version: Some(version(&e.version())),
        }),
    };
    Ok(MachineChange {
        change: Some(change),
    })
}

/// Bounds of `WatchRequest.heartbeat_ms` (values outside are taken as the nearest bound).
const MIN_HEARTBEAT_MS: u32 = 100;
const MAX_HEARTBEAT_MS: u32 = 60_000;

/// What stamps a Watch message, read after its item was made: the store's clock, the region
/// the agent serves, and whether its view stands.
pub struct Stamp {
    pub view_hlc: u64,
    pub region: String,
    pub view: Option<ViewStatus>,
}

/// One cursor item as a Watch message, stamped.
pub fn watch_response(item: WatchItem, stamp: Stamp) -> Result<WatchResponse, Status> {
    use watch_response::Kind;
    let Stamp {
        view_hlc,
        region,
        view,
    } = stamp;
    Ok(match item {
        WatchItem::Snapshot { reset, entries } => WatchResponse {
            kind: Kind::Snapshot as i32,
            reset,
            changes: entries
                .iter()
                .map(|e| {
                    Ok(MachineChange {
                        change: Some(machine_change::Change::Upserted(entry_to_machine(e)?)),
                    })
                })
                .collect::<Result<_, Status>>()?,
            resume_token: String::new(),
            view_hlc,
            region,
            view,
        },
        WatchItem::SnapshotDone { token } => WatchResponse {
            kind: Kind::SnapshotDone as i32,
            reset: false,
            changes: Vec::new(),
            resume_token: token.to_string(),
            view_hlc,
            region,
            view,
        },
        WatchItem::Delta { changes, token } => WatchResponse {
            kind: Kind::Delta as i32,
            reset: false,
            changes: changes
                .iter()
                .map(change_to_proto)
                .collect::<Result<_, _>>()?,
            resume_token: token.to_string(),
            view_hlc,
            region,
            view,
        },
    })
}

/// Which ListInstances page a request asks for.
struct PageRequest {
    /// The page starts after this id (none: from the first).
    after: Option<String>,
    /// At most this many machines: the request's size, defaulted and capped.
    size: usize,
}

/// Read `page_size` and `page_token`: size 0 is the default, above the maximum is the
/// maximum, negative is refused; a token must be one [`page`] wrote.
fn page_request(page_size: i32, page_token: &str) -> Result<PageRequest, Status> {
    let size = match usize::try_from(page_size) {
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "page_size: {page_size} is negative (0 asks for the default of {DEFAULT_PAGE_SIZE})"
            )));
        }
        Ok(0) => DEFAULT_PAGE_SIZE,
        Ok(n) => n.min(MAX_PAGE_SIZE),
    };
    if page_token.is_empty() {
        return Ok(PageRequest { after: None, size });
    }
    let after = page_token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(hex_decode)
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .filter(|id| validate::machine_id(id).is_ok())
        .ok_or_else(|| {
            Status::invalid_argument(
                "page_token: not a token this API issued (send the next_page_token of the previous page, or none)",
            )
        })?;
    Ok(PageRequest {
        after: Some(after),
        size,
    })
}

/// One ListInstances page.
struct Page {
    /// In id order.
    entries: Vec<Entry>,
    /// Empty on the last page.
    next_page_token: String,
}

/// Machines a page may look at per machine it may hold: a page of routable machines in an app
/// of mostly stopped ones ends short (with a next token) instead of scanning the whole app.
const MAX_SCAN_PER_MACHINE: usize = 8;

/// The page `req` asks for: the first `req.size` ids after `req.after`, read in order from
/// the store's index (the cost is bounded by the page's size, not the app's).
fn page(store: &Store, app: &str, filter: Filter, req: &PageRequest) -> Page {
    let (entries, next) = store.list_page(
        app,
        filter,
        req.after.as_deref(),
        req.size,
        req.size * MAX_SCAN_PER_MACHINE,
    );
    let next_page_token = next
        .map(|after| format!("{PAGE_TOKEN_PREFIX}{}", hex_encode(&after)))
        .unwrap_or_default();
    Page {
        entries,
        next_page_token,
    }
}

/// Page tokens carry the last id in hex, so that clients treat them as opaque.
fn hex_encode(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    // Only what hex_encode writes: `from_str_radix` alone would also take '+' and capitals.
    let ours = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
    if s.is_empty() || !s.len().is_multiple_of(2) || !s.bytes().all(ours) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

type WatchStream = MessageStream<WatchResponse>;

/// A stream of watch messages, as both tiers' services return it.
pub type MessageStream<T> =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A resume token from a request (empty: none); a malformed one is `INVALID_ARGUMENT`.
pub fn resume_token(token: &str) -> Result<Option<ResumeToken>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    token
        .parse::<ResumeToken>()
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("resume_token: {e}")))
}

/// An agent's Watch streams: slots (`limits.max_watches`) and the age at which each ends
/// (about `limits.max_connection_age`, each a little earlier at random so that they do not
/// all end together), after which its client resumes with its token on a new connection.
#[derive(Clone)]
pub struct Watches {
    slots: Arc<Semaphore>,
    max_age: std::time::Duration,
    occupancy: crate::limits::Occupancy,
    count: fn(&crate::limits::Counts) -> &std::sync::atomic::AtomicI64,
}

/// A stream's slot among an agent's [`Watches`]: held until dropped.
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _held: crate::limits::Held,
}

impl Watches {
    pub fn new(limits: &crate::Limits) -> Watches {
        Watches::with_capacity(limits, limits.max_watches, |c| &c.watches)
    }

    /// Slots for another kind of long-lived stream (`count`: where they are counted), ended
    /// by age like Watch streams.
    pub fn with_capacity(
        limits: &crate::Limits,
        slots: std::num::NonZeroUsize,
        count: fn(&crate::limits::Counts) -> &std::sync::atomic::AtomicI64,
    ) -> Watches {
        Watches {
            slots: Arc::new(Semaphore::new(slots.get())),
            max_age: limits.max_connection_age,
            occupancy: limits.occupancy,
            count,
        }
    }

    /// A slot for one more stream, or `RESOURCE_EXHAUSTED` naming `what` (the limit).
    pub fn acquire(&self, rpc: &str, what: &str) -> Result<Slot, Status> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many open {rpc} streams on this agent ({what}); retry later"
            ))
        })?;
        Ok(Slot {
            _permit: permit,
            _held: self.occupancy.hold(self.count),
        })
    }

    /// When a stream opened now ends: at 90 to 100 % of the maximum age from now, and no
    /// later than its connection's maximum age plus the same spread (the connection gets its
    /// GOAWAY at that age, so a stream opened just before then ends soon after it, not a
    /// whole age later), but never sooner than a tenth of the age from now. `accepted`: when
    /// the connection was accepted, if known.
    pub fn deadline(&self, accepted: Option<std::time::Instant>) -> tokio::time::Instant {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0);
        let tenth = self.max_age / 10;
        let spread = tenth.as_millis().max(1) as u64;
        let jitter = std::time::Duration::from_millis(h.finish() % spread);
        let now = std::time::Instant::now();
        let own = now + (self.max_age - tenth + jitter);
        // Never sooner than a tenth of the age from now: over TLS the connection's GOAWAY
        // timer starts after its handshake, so a stream may open a little past the accept
        // time plus the age; it must not end at once (its client would reopen it on the
        // same connection, again and again, until the GOAWAY).
        let end = match accepted {
            Some(at) => own.min((at + self.max_age + jitter).max(now + tenth)),
            None => own,
        };
        tokio::time::Instant::from_std(end)
    }
}

/// What a watch RPC asks for.
pub struct WatchOpen {
    /// The RPC's name, for the error when no watch slot is free.
    pub rpc: &'static str,
    pub scope: Option<Arc<str>>,
    pub resume: Option<ResumeToken>,
    /// When the request's connection was accepted ([`patina_trust::server::accepted_at`]):
    /// the stream ends by the connection's age.
    pub accepted: Option<std::time::Instant>,
    /// The request's `heartbeat_ms` (0: none; others taken within 100..=60000).
    pub heartbeat_ms: u32,
    /// Most records in one message.
    pub batch: usize,
}

/// A watch stream over `store` for either tier: a slot from `watches` (`RESOURCE_EXHAUSTED`
/// when none is free; the slot is held until the stream is dropped), heartbeats when asked,
/// each cursor item made into a message by `make` (given the store, e.g. to stamp its
/// clock), and `UNAVAILABLE` once the store closes or fails or the agent begins to stop.
///
/// The stream is polled only when the client has room (HTTP/2 flow control), so a slow
/// client simply stops its cursor; the cursor catches up later without buffering.
pub fn watch_stream<T, F>(
    store: &Store,
    watches: &Watches,
    stopping: tokio::sync::watch::Receiver<bool>,
    open: WatchOpen,
    make: F,
) -> Result<MessageStream<T>, Status>
where
    T: Send + 'static,
    F: Fn(WatchItem, &Store) -> Result<T, Status> + Send + Sync + 'static,
{
    let permit = watches.acquire(open.rpc, "limits.max_watches")?;
    let mut cursor = store.watch(open.scope, open.resume, open.batch);
    if open.heartbeat_ms > 0 {
        let ms = open.heartbeat_ms.clamp(MIN_HEARTBEAT_MS, MAX_HEARTBEAT_MS);
        cursor = cursor.with_heartbeat(std::time::Duration::from_millis(ms.into()));
    }
    let make = Arc::new(make);
    let deadline = watches.deadline(open.accepted);
    let stream = futures_util::stream::unfold(
        (cursor, stopping, store.clone(), false),
        move |(mut cursor, mut stopping, store, ended)| {
            let make = make.clone();
            async move {
                if ended {
                    return None;
                }
                let response = tokio::select! {
                    item = cursor.next() => match item {
                        Some(item) => make(item, &store),
                        None => Err(match store.failure() {
                            Some(why) => Status::unavailable(format!(
                                "the agent's store failed and the agent is stopping: {why}"
                            )),
                            None => Status::unavailable(
                                "the watch ended: the agent's store closed or could not be read; resume with the last token",
                            ),
                        }),
                    },
                    _ = stopping.wait_for(|s| *s) => Err(Status::unavailable(
                        "the agent is shutting down; resume elsewhere",
                    )),
                    _ = tokio::time::sleep_until(deadline) => Err(Status::unavailable(
                        "this stream reached its maximum age (limits.max_connection_age_secs): resume with the last token",
                    )),
                };
                let ended = response.is_err();
                Some((response, (cursor, stopping, store, ended)))
            }
        },
    );
    // The closure owns the permit, so it is released when the stream is dropped: when it
    // ends or the client goes away.
    let stream = futures_util::StreamExt::map(stream, move |item| {
        let _held = &permit;
        item
    });
    Ok(Box::pin(stream))
}

#[tonic::async_trait]
impl Region for RegionService {
    async fn upsert_machine(
        &self,
        request: Request<UpsertMachineRequest>,
    ) -> Result<Response<UpsertMachineResponse>, Status> {
        let m = request
            .get_ref()
            .machine
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("machine: required"))?;
        let m = &*self.with_checked_health(m);
        let valid = validate::machine(m, &self.region, &self.host).map_err(invalid)?;
        self.check_hosts(&request, [(m.id.as_str(), Some(m.host.as_str()))])?;
        let versions = self
            .store
            .write(vec![put(valid.clone())])
            .await
            .map_err(store_error)?;
        let machine = machine_from_entry(&valid.encoded, &versions[0])?;
        Ok(Response::new(UpsertMachineResponse {
            machine: Some(machine),
        }))
    }

    async fn upsert_machines(
        &self,
        request: Request<UpsertMachinesRequest>,
    ) -> Result<Response<UpsertMachinesResponse>, Status> {
        let ms = &request.get_ref().machines;
        let settled: Vec<Machine>;
        let ms = if ms.iter().any(|m| !m.checks.is_empty()) {
            settled = ms
                .iter()
                .map(|m| self.with_checked_health(m).into_owned())
                .collect();
            &settled
        } else {
            ms
        };
        let valid = validate::batch(ms, &self.region, &self.host).map_err(invalid)?;
        self.check_hosts(
            &request,
            ms.iter().map(|m| (m.id.as_str(), Some(m.host.as_str()))),
        )?;
        let ops = valid.into_iter().map(put).collect();
        let versions = self.store.write(ops).await.map_err(store_error)?;
        Ok(Response::new(UpsertMachinesResponse {
            versions: versions.iter().map(version).collect(),
        }))
    }

    async fn delete_machine(
        &self,
        request: Request<DeleteMachineRequest>,
    ) -> Result<Response<DeleteMachineResponse>, Status> {
        let id = &request.get_ref().id;
        validate::machine_id(id).map_err(invalid)?;
        // The stored machine's host only: a deletion sends none.
        self.check_hosts(&request, [(id.as_str(), None)])?;
        let versions = self
            .store
            .write(vec![LocalWrite::Delete { key: id.clone() }])
            .await
            .map_err(store_error)?;
        Ok(Response::new(DeleteMachineResponse {
            version: Some(version(&versions[0])),
        }))
    }

    async fn get_machine(
        &self,
        request: Request<GetMachineRequest>,
    ) -> Result<Response<GetMachineResponse>, Status> {
        let id = request.into_inner().id;
        validate::machine_id(&id).map_err(invalid)?;
        let entry = self
            .store
            .get_live(&id)
            .ok_or_else(|| Status::not_found(format!("no machine {}", echo(&id))))?;
        Ok(Response::new(GetMachineResponse {
            machine: Some(entry_to_machine(&entry)?),
        }))
    }

    async fn list_instances(
        &self,
        request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let req = request.into_inner();
        validate::app_name(&req.app).map_err(invalid)?;
        let filter = if req.include_all {
            Filter::All
        } else {
            Filter::RoutableOnly
        };
        let wanted = page_request(req.page_size, &req.page_token)?;
        let page = page(&self.store, &req.app, filter, &wanted);
        let machines = page
            .entries
            .iter()
            .map(entry_to_machine)
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListInstancesResponse {
            machines,
            next_page_token: page.next_page_token,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let accepted = patina_trust::server::accepted_at(&request);
        let req = request.into_inner();
        let scope = if req.app.is_empty() {
            None
        } else {
            validate::app_name(&req.app).map_err(invalid)?;
            Some(Arc::from(req.app))
        };
        let resume = resume_token(&req.resume_token)?;
        let region = self.region.clone();
        let gossip = self.gossip.clone();
        let stream = watch_stream(
            &self.store,
            &self.watches,
            self.stopping.clone(),
            WatchOpen {
                rpc: "Watch",
                accepted,
                scope,
                resume,
                heartbeat_ms: req.heartbeat_ms,
                batch: WATCH_BATCH,
            },
            // The clock and the view are read after the item is made: the clock is at or
            // above every change in it, and a hide comes with the view judged before it.
            move |item, store| {
                watch_response(
                    item,
                    Stamp {
                        view_hlc: store.view_hlc().0,
                        region: region.to_string(),
                        view: Some(match &gossip {
                            Some(g) => g.view_message(),
                            None => no_cluster_view(),
                        }),
                    },
                )
            },
        )?;
        Ok(Response::new(stream))
    }
}
