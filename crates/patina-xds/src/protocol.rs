//! The ADS protocol's per-stream state, sans I/O: subscriptions per type, nonces, ACKs and
//! NACKs, for both variants. A request or a batch of changes becomes a list of [`Plan`]s
//! (what to send); the stream's driver (`service.rs`) builds and sends them, in pieces
//! bounded in bytes.
//!
//! State of the world: a request whose nonce is not the last one sent for its type is stale
//! and ignored; an ACK records the version; a NACK is logged and counted and nothing is sent
//! again until something changes (a change of the resources or of the subscription).
//! Cluster and listener responses hold every subscribed resource; endpoint responses hold
//! what changed.
//!
//! Delta: subscriptions change by name (`*` for the wildcard); the first request of a type
//! says which versions the client holds, and only what differs is sent; a change sends the
//! changed resources and the names of removed ones.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tonic::Status;

use crate::hub::{Change, Event};
use crate::resources::Type;

/// Who the client is, from its xDS node: its region orders a global agent's localities.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    pub region: Option<Arc<str>>,
    pub id: Option<Arc<str>>,
}

impl Client {
    fn from_node(node: &Node) -> Client {
        let region = node
            .locality
            .as_ref()
            .map(|l| l.region.as_str())
            .filter(|r| patina_edge::regions::is_dns_label(r))
            .map(Arc::from);
        let id = (!node.id.is_empty() && node.id.len() <= 256).then(|| Arc::from(&*node.id));
        Client { region, id }
    }
}

/// Counters of every stream of an agent.
#[derive(Debug, Default)]
pub struct Stats {
    pub responses: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub stale_nonces: AtomicU64,
    /// State-of-the-world streams that fell behind the change log and were sent everything.
    pub resyncs: AtomicU64,
    /// Delta streams ended for falling behind the change log.
    pub ended_behind: AtomicU64,
    pub unknown_types: AtomicU64,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct Sub {
    pub(crate) wildcard: bool,
    pub(crate) names: HashSet<Arc<str>>,
}

impl Sub {
    pub(crate) fn has(&self, app: &str) -> bool {
        self.wildcard || self.names.contains(app)
    }
}

#[derive(Debug, Default)]
pub(crate) struct TypeState {
    pub(crate) sub: Sub,
    pub(crate) started: bool,
    /// The nonce of the last response sent (0: none).
    pub(crate) last_nonce: u64,
    /// The last version the client acknowledged (at most [`MAX_LOGGED_BYTES`] of it).
    pub(crate) acked: Option<String>,
    /// The nonce of the last NACK logged: a client repeating one is counted, not logged again.
    pub(crate) nack_logged: String,
}

/// Most bytes of a client's string (an error, a type URL, a version) that the agent logs or
/// keeps: a client cannot grow the log or a stream's state with them.
pub const MAX_LOGGED_BYTES: usize = 256;

/// `s` cut to at most [`MAX_LOGGED_BYTES`], at a character boundary.
fn clip(s: &str) -> &str {
    if s.len() <= MAX_LOGGED_BYTES {
        return s;
    }
    let mut end = MAX_LOGGED_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Log a NACK once per (type, nonce) of a stream.
fn log_nack(st: &mut TypeState, client: &Client, type_url: &str, nonce: &str, error: &str) {
    if st.nack_logged == clip(nonce) {
        return;
    }
    st.nack_logged = clip(nonce).to_owned();
    tracing::warn!(
        client = clip(client.id.as_deref().unwrap_or("")),
        type_url = clip(type_url),
        nonce = clip(nonce),
        error = clip(error),
        "an xDS client refused (NACK) a response; not sent again until something changes"
    );
}

/// Which resources a plan sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Names {
    /// Every resource the type's subscription covers (the wildcard: every app).
    Subscribed,
    List(Vec<Arc<str>>),
}

/// One response to build and send (or several, when it is large and may be split).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The type's URL as the client wrote it.
    pub url: String,
    /// `None`: a type Patina does not serve (answered with nothing).
    pub ty: Option<Type>,
    pub names: Names,
    /// State of the world, clusters and listeners: one response with every subscribed
    /// resource.
    pub full: bool,
    /// Delta, first request: the versions the client holds (what equals them is not sent).
    pub have: HashMap<String, String>,
}

impl Plan {
    fn new(ty: Type, names: Names, full: bool) -> Plan {
        Plan {
            url: ty.url().to_owned(),
            ty: Some(ty),
            names,
            full,
            have: HashMap::new(),
        }
    }
}

/// The state of one ADS stream.
pub struct Protocol {
    delta: bool,
    types: [TypeState; 4],
    client: Client,
    max_names: usize,
    stats: Arc<Stats>,
}

/// A name longer than this is refused (apps are DNS labels; this leaves room for clients
/// that ask for other names, which simply do not exist).
pub const MAX_NAME_BYTES: usize = 256;

impl Protocol {
    pub fn new(delta: bool, max_names: usize, stats: Arc<Stats>) -> Protocol {
        Protocol {
            delta,
            types: Default::default(),
            client: Client::default(),
            max_names,
            stats,
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn sub(&self, ty: Type) -> &Sub {
        &self.types[ty.index()].sub
    }

    /// A response of this type went out with this nonce.
    pub fn sent(&mut self, ty: Type, nonce: u64) {
        self.types[ty.index()].last_nonce = nonce;
    }

    pub fn acked(&self, ty: Type) -> Option<&str> {
        self.types[ty.index()].acked.as_deref()
    }

    fn take_node(&mut self, node: Option<&Node>) {
        if let Some(node) = node
            && self.client == Client::default()
        {
            self.client = Client::from_node(node);
        }
    }

    fn names_held(&self) -> usize {
        self.types.iter().map(|t| t.sub.names.len()).sum()
    }

    fn check_names<'a>(&self, names: impl Iterator<Item = &'a String>) -> Result<(), Status> {
        for n in names {
            if n.len() > MAX_NAME_BYTES {
                return Err(Status::invalid_argument(format!(
                    "a resource name of {} bytes; at most {MAX_NAME_BYTES}",
                    n.len()
                )));
            }
        }
        Ok(())
    }

    fn over_names(&self) -> Status {
        Status::resource_exhausted(format!(
            "more than {} resource names subscribed on one stream (xds.max_names_per_stream): subscribe to the wildcard instead",
            self.max_names
        ))
    }

    /// A state-of-the-world request.
    pub fn sotw_request(&mut self, req: &DiscoveryRequest) -> Result<Vec<Plan>, Status> {
        self.take_node(req.node.as_ref());
        self.check_names(req.resource_names.iter())?;
        let Some(ty) = Type::from_url(&req.type_url) else {
            self.stats.unknown_types.fetch_add(1, Ordering::Relaxed);
            // Answered once per request that opens it, with nothing: the client learns
            // that nothing of the type exists and does not wait.
            if req.response_nonce.is_empty() {
                return Ok(vec![Plan {
                    url: req.type_url.clone(),
                    ty: None,
                    names: Names::List(Vec::new()),
                    full: true,
                    have: HashMap::new(),
                }]);
            }
            return Ok(Vec::new());
        };
        let max_names = self.max_names;
        let held_elsewhere = self.names_held() - self.types[ty.index()].sub.names.len();
        let st = &mut self.types[ty.index()];
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.last_nonce.to_string() {
                // Stale: answered already by a newer response the client has not seen yet.
                self.stats.stale_nonces.fetch_add(1, Ordering::Relaxed);
                return Ok(Vec::new());
            }
            match &req.error_detail {
                Some(e) => {
                    self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                    log_nack(
                        st,
                        &self.client,
                        &req.type_url,
                        &req.response_nonce,
                        &e.message,
                    );
                }
                None => {
                    self.stats.acks.fetch_add(1, Ordering::Relaxed);
                    st.acked = Some(clip(&req.version_info).to_owned());
                }
            }
        }
        let explicit = req.resource_names.iter().any(|n| n == "*");
        let wildcard = explicit
            || (req.resource_names.is_empty()
                && ty.full_state()
                && (!st.started || st.sub.wildcard));
        let names: HashSet<Arc<str>> = req
            .resource_names
            .iter()
            .filter(|n| *n != "*")
            .map(|n| Arc::from(n.as_str()))
            .collect();
        if held_elsewhere + names.len() > max_names {
            return Err(self.over_names());
        }
        let added: Vec<Arc<str>> = {
            let mut a: Vec<Arc<str>> = names
                .iter()
                .filter(|n| !st.sub.names.contains(*n))
                .cloned()
                .collect();
            a.sort();
            a
        };
        let newly_wild = wildcard && !st.sub.wildcard;
        let first = !st.started;
        st.started = true;
        st.sub = Sub { wildcard, names };
        if !(first || newly_wild || !added.is_empty()) {
            return Ok(Vec::new());
        }
        Ok(vec![if ty.full_state() {
            Plan::new(ty, Names::Subscribed, true)
        } else if first || newly_wild {
            Plan::new(ty, Names::Subscribed, false)
        } else {
            Plan::new(ty, Names::List(added), false)
        }])
    }

    /// A delta request.
    pub fn delta_request(&mut self, req: &DeltaDiscoveryRequest) -> Result<Vec<Plan>, Status> {
        self.take_node(req.node.as_ref());
        self.check_names(
            req.resource_names_subscribe
                .iter()
                .chain(req.resource_names_unsubscribe.iter())
                .chain(req.initial_resource_versions.keys()),
        )?;
        // What the client holds (`initial_resource_versions`) is not bounded by the names
        // limit: a wildcard subscriber holds every app, and must be able to say so when it
        // reconnects. The request's size bounds it (the API's message limit).
        if !req.response_nonce.is_empty() {
            match &req.error_detail {
                Some(e) => {
                    self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                    if let Some(ty) = Type::from_url(&req.type_url) {
                        log_nack(
                            &mut self.types[ty.index()],
                            &self.client,
                            &req.type_url,
                            &req.response_nonce,
                            &e.message,
                        );
                    }
                }
                None => {
                    self.stats.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let Some(ty) = Type::from_url(&req.type_url) else {
            self.stats.unknown_types.fetch_add(1, Ordering::Relaxed);
            let names: Vec<Arc<str>> = req
                .resource_names_subscribe
                .iter()
                .filter(|n| *n != "*")
                .map(|n| Arc::from(n.as_str()))
                .collect();
            if names.is_empty() && !req.response_nonce.is_empty() {
                return Ok(Vec::new());
            }
            return Ok(vec![Plan {
                url: req.type_url.clone(),
                ty: None,
                names: Names::List(names),
                full: false,
                have: HashMap::new(),
            }]);
        };
        let max_names = self.max_names;
        let held = self.names_held();
        let st = &mut self.types[ty.index()];
        let first = !st.started;
        st.started = true;
        let was_wild = st.sub.wildcard;
        if first && req.resource_names_subscribe.is_empty() {
            st.sub.wildcard = true;
        }
        let mut added = BTreeSet::new();
        for n in &req.resource_names_subscribe {
            if n == "*" {
                st.sub.wildcard = true;
            } else if !st.sub.names.contains(n.as_str()) {
                added.insert(Arc::<str>::from(n.as_str()));
            }
        }
        for n in &req.resource_names_unsubscribe {
            if n == "*" {
                st.sub.wildcard = false;
            } else {
                st.sub.names.remove(n.as_str());
                added.remove(n.as_str());
            }
        }
        if held + added.len() > max_names {
            return Err(self.over_names());
        }
        st.sub.names.extend(added.iter().cloned());
        let newly_wild = st.sub.wildcard && !was_wild;
        if first {
            let mut plan = Plan::new(ty, Names::Subscribed, false);
            plan.have = req.initial_resource_versions.clone();
            // Held but neither wildcard nor subscribed: nothing to say about them.
            return Ok(vec![plan]);
        }
        if newly_wild {
            return Ok(vec![Plan::new(ty, Names::Subscribed, false)]);
        }
        if added.is_empty() {
            return Ok(Vec::new());
        }
        Ok(vec![Plan::new(
            ty,
            Names::List(added.into_iter().collect()),
            false,
        )])
    }

    /// Changes from the hub: what to send about them, in type order.
    pub fn changes(&self, events: &[Event]) -> Vec<Plan> {
        let mut all_endpoints = false;
        let mut touched: [BTreeSet<Arc<str>>; 4] = Default::default();
        for e in events {
            let Some(app) = &e.app else {
                all_endpoints = true;
                continue;
            };
            for ty in Type::ALL {
                let st = &self.types[ty.index()];
                if !st.started || ty == Type::Route || !st.sub.has(app) {
                    continue;
                }
                if e.change != Change::Endpoints || ty.follows_endpoints() {
                    touched[ty.index()].insert(app.clone());
                }
            }
        }
        let mut plans = Vec::new();
        for ty in Type::ALL {
            let st = &self.types[ty.index()];
            if !st.started || ty == Type::Route {
                continue;
            }
            let names = std::mem::take(&mut touched[ty.index()]);
            if ty.follows_endpoints() && all_endpoints {
                plans.push(Plan::new(ty, Names::Subscribed, false));
            } else if !names.is_empty() {
                if !self.delta && ty.full_state() {
                    plans.push(Plan::new(ty, Names::Subscribed, true));
                } else {
                    plans.push(Plan::new(
                        ty,
                        Names::List(names.into_iter().collect()),
                        false,
                    ));
                }
            }
        }
        plans
    }

    /// State of the world, after falling behind the change log: everything subscribed.
    pub fn resync(&self) -> Vec<Plan> {
        Type::ALL
            .into_iter()
            .filter(|ty| *ty != Type::Route && self.types[ty.index()].started)
            .map(|ty| Plan::new(ty, Names::Subscribed, ty.full_state()))
            .collect()
    }

    pub fn is_delta(&self) -> bool {
        self.delta
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{CLUSTER, ENDPOINTS, LISTENER};
    use envoy_types::pb::google::rpc;

    fn sotw(url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        }
    }

    fn proto(delta: bool) -> Protocol {
        Protocol::new(delta, 3, Arc::default())
    }

    fn ev(seq: u64, app: &str, change: Change) -> Event {
        Event {
            seq,
            app: Some(app.into()),
            change,
        }
    }

    #[test]
    fn sotw_ack_nack_and_stale_nonces() {
        let mut p = proto(false);
        let plans = p.sotw_request(&sotw(CLUSTER, &[], "", "")).unwrap();
        assert_eq!(
            plans,
            vec![Plan::new(Type::Cluster, Names::Subscribed, true)]
        );
        assert!(
            p.sub(Type::Cluster).wildcard,
            "empty names on a first CDS request"
        );
        p.sent(Type::Cluster, 1);
        // ACK of nonce 1: nothing to send, version recorded.
        assert!(
            p.sotw_request(&sotw(CLUSTER, &[], "7", "1"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(p.acked(Type::Cluster), Some("7"));
        p.sent(Type::Cluster, 2);
        // A request answering nonce 1 is stale now: ignored, even with new names.
        assert!(
            p.sotw_request(&sotw(CLUSTER, &["x"], "7", "1"))
                .unwrap()
                .is_empty()
        );
        assert!(p.sub(Type::Cluster).wildcard);
        // NACK of nonce 2: counted, nothing resent, the acked version stays.
        let mut nack = sotw(CLUSTER, &[], "7", "2");
        nack.error_detail = Some(rpc::Status {
            code: 3,
            message: "bad cluster".into(),
            details: vec![],
        });
        assert!(p.sotw_request(&nack).unwrap().is_empty());
        assert_eq!(p.acked(Type::Cluster), Some("7"));
        assert_eq!(p.stats.nacks.load(Ordering::Relaxed), 1);
        assert_eq!(p.stats.stale_nonces.load(Ordering::Relaxed), 1);
        // The next change is sent again.
        let plans = p.changes(&[ev(1, "web", Change::Added)]);
        assert_eq!(
            plans,
            vec![Plan::new(Type::Cluster, Names::Subscribed, true)]
        );
    }

    #[test]
    fn sotw_named_endpoints_send_what_was_added_and_what_changed() {
        let mut p = proto(false);
        let plans = p.sotw_request(&sotw(ENDPOINTS, &["a"], "", "")).unwrap();
        assert_eq!(
            plans,
            vec![Plan::new(Type::Endpoints, Names::Subscribed, false)]
        );
        assert!(
            !p.sub(Type::Endpoints).wildcard,
            "EDS is never a legacy wildcard"
        );
        p.sent(Type::Endpoints, 1);
        let plans = p
            .sotw_request(&sotw(ENDPOINTS, &["a", "b"], "1", "1"))
            .unwrap();
        assert_eq!(
            plans,
            vec![Plan::new(
                Type::Endpoints,
                Names::List(vec!["b".into()]),
                false
            )]
        );
        p.sent(Type::Endpoints, 2);
        // Dropping a name sends nothing.
        assert!(
            p.sotw_request(&sotw(ENDPOINTS, &["b"], "1", "2"))
                .unwrap()
                .is_empty()
        );
        let plans = p.changes(&[
            ev(1, "a", Change::Endpoints),
            ev(2, "b", Change::Endpoints),
            ev(3, "c", Change::Added),
        ]);
        assert_eq!(
            plans,
            vec![Plan::new(
                Type::Endpoints,
                Names::List(vec!["b".into()]),
                false
            )]
        );
        // Too many names: refused.
        p.sent(Type::Endpoints, 3);
        let err = p
            .sotw_request(&sotw(ENDPOINTS, &["a", "b", "c", "d"], "1", "3"))
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn changes_to_existence_resend_full_state_types_and_endpoint_changes_only_endpoints() {
        let mut p = proto(false);
        p.sotw_request(&sotw(LISTENER, &["web"], "", "")).unwrap();
        p.sotw_request(&sotw(CLUSTER, &["web"], "", "")).unwrap();
        p.sotw_request(&sotw(ENDPOINTS, &["web"], "", "")).unwrap();
        assert!(
            p.changes(&[ev(1, "api", Change::Added)]).is_empty(),
            "not subscribed"
        );
        let plans = p.changes(&[ev(1, "web", Change::Endpoints)]);
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].ty, Some(Type::Endpoints));
        let plans = p.changes(&[ev(2, "web", Change::Removed)]);
        let tys: Vec<_> = plans.iter().map(|p| p.ty.unwrap()).collect();
        assert_eq!(tys, [Type::Cluster, Type::Endpoints, Type::Listener]);
        let plans = p.changes(&[Event {
            seq: 3,
            app: None,
            change: Change::Endpoints,
        }]);
        assert_eq!(
            plans,
            vec![Plan::new(Type::Endpoints, Names::Subscribed, false)]
        );
    }

    #[test]
    fn a_wildcard_client_holding_more_than_the_names_limit_can_reconnect() {
        // The limit is 3 names; a wildcard subscriber reconnects holding 10 apps.
        let mut p = proto(true);
        let mut req = DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            ..Default::default()
        };
        for i in 0..10 {
            req.initial_resource_versions
                .insert(format!("app{i}"), "v".into());
        }
        let plans = p
            .delta_request(&req)
            .expect("held versions are not subscriptions");
        assert_eq!(plans[0].have.len(), 10);
        assert!(p.sub(Type::Cluster).wildcard);
        // Naming more than the limit is still refused.
        let mut named = proto(true);
        let req = DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            resource_names_subscribe: (0..4).map(|i| format!("app{i}")).collect(),
            ..Default::default()
        };
        assert_eq!(
            named.delta_request(&req).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    #[test]
    fn what_a_client_sends_is_kept_and_logged_only_in_part() {
        let mut p = proto(false);
        let first = DiscoveryRequest {
            type_url: CLUSTER.into(),
            ..Default::default()
        };
        p.sotw_request(&first).unwrap();
        p.sent(Type::Cluster, 1);
        let ack = DiscoveryRequest {
            type_url: CLUSTER.into(),
            response_nonce: "1".into(),
            version_info: "é".repeat(100_000),
            ..Default::default()
        };
        p.sotw_request(&ack).unwrap();
        let kept = p.acked(Type::Cluster).unwrap();
        assert!(
            kept.len() <= MAX_LOGGED_BYTES && kept.starts_with('é'),
            "{}",
            kept.len()
        );
    }

    #[test]
    fn delta_subscribe_unsubscribe_wildcard_and_initial_versions() {
        let mut p = proto(true);
        let mut req = DeltaDiscoveryRequest {
            type_url: CLUSTER.into(),
            ..Default::default()
        };
        req.initial_resource_versions
            .insert("web".into(), "abc".into());
        let plans = p.delta_request(&req).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].names, Names::Subscribed);
        assert_eq!(plans[0].have.get("web").map(String::as_str), Some("abc"));
        assert!(
            p.sub(Type::Cluster).wildcard,
            "first request, no names: wildcard"
        );
        let plans = p.changes(&[ev(1, "web", Change::Removed), ev(2, "api", Change::Added)]);
        assert_eq!(
            plans,
            vec![Plan::new(
                Type::Cluster,
                Names::List(vec!["api".into(), "web".into()]),
                false
            )],
            "delta: the changed names, not a snapshot"
        );
        // Named EDS: subscribe two, unsubscribe one.
        let sub = |names: &[&str], unsub: &[&str], nonce: &str| DeltaDiscoveryRequest {
            type_url: ENDPOINTS.into(),
            resource_names_subscribe: names.iter().map(|s| s.to_string()).collect(),
            resource_names_unsubscribe: unsub.iter().map(|s| s.to_string()).collect(),
            response_nonce: nonce.into(),
            ..Default::default()
        };
        let plans = p.delta_request(&sub(&["a", "b"], &[], "")).unwrap();
        assert_eq!(plans[0].names, Names::Subscribed);
        assert!(!p.sub(Type::Endpoints).wildcard);
        let plans = p.delta_request(&sub(&["c"], &["a"], "5")).unwrap();
        assert_eq!(plans[0].names, Names::List(vec!["c".into()]));
        assert!(p.sub(Type::Endpoints).has("b") && !p.sub(Type::Endpoints).has("a"));
        assert!(p.changes(&[ev(3, "a", Change::Endpoints)]).is_empty());
        // Subscribing again to what is held sends nothing; the wildcard sends everything.
        assert!(p.delta_request(&sub(&["b"], &[], "6")).unwrap().is_empty());
        let plans = p.delta_request(&sub(&["*"], &[], "7")).unwrap();
        assert_eq!(plans[0].names, Names::Subscribed);
        assert!(
            p.delta_request(&sub(&["x", "y"], &[], "8")).is_err(),
            "past 3 names"
        );
    }

    #[test]
    fn unknown_types_are_answered_with_nothing_once() {
        let mut p = proto(false);
        let plans = p
            .sotw_request(&sotw("type.googleapis.com/x.Y", &[], "", ""))
            .unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].ty, None);
        assert!(
            p.sotw_request(&sotw("type.googleapis.com/x.Y", &[], "", "1"))
                .unwrap()
                .is_empty()
        );
    }
}
