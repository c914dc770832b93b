//! A region agent's xDS resources: per app with a live machine in the region, its routable
//! instances (started and passing) as one locality named after the region.
//!
//! [`follow`] keeps them from a watch over the whole store, change by change: it holds every
//! live machine of the region (its app and, when routable, its decoded endpoint), so a change
//! costs what it touches (one machine decoded, its app's endpoints copied once per batch), not
//! a read of its whole app. The DNS front end answers from what it holds at once; apps whose
//! existence or endpoints changed are published to the [`Hub`] at most once per debounce
//! period.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use patina_proto::v1::Machine;
use patina_store::{Entry, Store, WatchItem};
use prost::Message;

use crate::hub::{Change, Hub};
use crate::protocol::Client;
use crate::resources::{Addr, Host, Locality};
use crate::service::Source;

/// The region's apps and their endpoints: as the store has them now (`apps`, what DNS
/// answers from), and as last published to the xDS streams (`published`: a stream that
/// subscribes between a change and its publication is not sent the same state twice).
pub struct RegionSource {
    region: Arc<str>,
    apps: RwLock<HashMap<Arc<str>, Arc<[Locality]>>>,
    published: RwLock<HashMap<Arc<str>, Arc<[Locality]>>>,
}

/// [`RegionSource`] as the store has it now (not waiting for the debounce).
pub struct Latest(Arc<RegionSource>);

impl RegionSource {
    pub fn new(region: &str) -> Arc<RegionSource> {
        Arc::new(RegionSource {
            region: region.into(),
            apps: RwLock::new(HashMap::new()),
            published: RwLock::new(HashMap::new()),
        })
    }

    /// The same apps, as the store has them now: for the DNS front end.
    pub fn latest(self: &Arc<Self>) -> Arc<Latest> {
        Arc::new(Latest(self.clone()))
    }
}

/// Every live machine of the region as the follower last saw it: by key, the app it is in;
/// per app, how many live machines it has and the endpoints of its routable ones, by key
/// (so in key order, as a listing gives them). Bounded by the region's live machines.
#[derive(Default)]
struct Machines {
    by_key: HashMap<Arc<str>, Arc<str>>,
    apps: HashMap<Arc<str>, App>,
}

#[derive(Default)]
struct App {
    live: usize,
    /// Routable machines whose first address parses.
    hosts: BTreeMap<Arc<str>, Host>,
}

/// What a batch did to one app: whether it existed before the batch, and whether its
/// endpoints may have changed.
#[derive(Clone, Copy)]
struct Touch {
    existed: bool,
    changed: bool,
}

/// A routable machine's endpoint: its first address that parses, and the others that do.
fn endpoint(e: &Entry) -> Option<Host> {
    let m = Machine::decode(e.value()?).ok()?;
    let mut addrs = m.addresses.iter().filter_map(|a| Addr::parse(a));
    addrs.next().map(|addr| Host {
        addr,
        more: addrs.collect(),
    })
}

impl Machines {
    fn touch<'a>(
        apps: &HashMap<Arc<str>, App>,
        touched: &'a mut HashMap<Arc<str>, Touch>,
        app: &Arc<str>,
    ) -> &'a mut Touch {
        touched.entry(app.clone()).or_insert_with(|| Touch {
            existed: apps.contains_key(app),
            changed: false,
        })
    }

    /// Take one change (the key's state now: live in its group, or not live at all: deleted,
    /// or hidden by the liveness overlay). A key seen live before leaves the app it was in.
    fn apply(&mut self, e: &Entry, touched: &mut HashMap<Arc<str>, Touch>) {
        let key = e.key();
        let mut old: Option<(Arc<str>, Option<Host>)> = None;
        let mut key_arc = None;
        if let Some((k, app_name)) = self.by_key.remove_entry(key) {
            Self::touch(&self.apps, touched, &app_name);
            if let Some(app) = self.apps.get_mut(&app_name) {
                app.live -= 1;
                let host = app.hosts.remove(key);
                if app.live == 0 {
                    self.apps.remove(&app_name);
                }
                old = Some((app_name, host));
            }
            key_arc = Some(k);
        }
        let new = if e.is_live() {
            let group = e.group();
            // The app's own name, shared, when it is known.
            let app_name = match self.apps.get_key_value(group) {
                Some((name, _)) => name.clone(),
                None => match &old {
                    Some((name, _)) if &**name == group => name.clone(),
                    _ => Arc::from(group),
                },
            };
            Self::touch(&self.apps, touched, &app_name);
            let key_arc = key_arc.unwrap_or_else(|| Arc::from(key));
            let host = if e.routable() { endpoint(e) } else { None };
            let app = self.apps.entry(app_name.clone()).or_default();
            app.live += 1;
            if let Some(h) = &host {
                app.hosts.insert(key_arc.clone(), h.clone());
            }
            self.by_key.insert(key_arc, app_name.clone());
            Some((app_name, host))
        } else {
            None
        };
        match (old, new) {
            (Some((a, before)), Some((b, now))) if a == b => {
                if before != now {
                    touched.get_mut(&a).expect("touched").changed = true;
                }
            }
            (old, new) => {
                for (app, host) in old.into_iter().chain(new) {
                    if host.is_some() {
                        touched.get_mut(&app).expect("touched").changed = true;
                    }
                }
            }
        }
    }

    /// The app's endpoints: `None` when it has no live machine.
    fn localities(&self, region: &str, app: &str) -> Option<Arc<[Locality]>> {
        let a = self.apps.get(app)?;
        if a.hosts.is_empty() {
            return Some(Arc::from(Vec::new()));
        }
        Some(Arc::from(vec![Locality {
            region: region.to_string(),
            priority: 0,
            weight: a.hosts.len() as u32,
            hosts: a.hosts.values().cloned().collect(),
        }]))
    }
}

/// The follower's state, moved into each blocking step and back.
#[derive(Default)]
struct Follower {
    now: Machines,
    /// A snapshot being received after a reset: it replaces `now` once complete, so that no
    /// reader sees an app half listed.
    building: Option<Machines>,
}

impl Follower {
    /// Take one watch item; the apps whose state readers see changed, each with whether it
    /// existed before and whether its endpoints changed.
    fn take(&mut self, source: &RegionSource, item: WatchItem) -> Vec<(Arc<str>, bool, bool)> {
        let mut touched: HashMap<Arc<str>, Touch> = HashMap::new();
        match item {
            WatchItem::Snapshot { reset, entries } => {
                if reset || self.building.is_none() {
                    self.building = Some(Machines::default());
                }
                let b = self.building.as_mut().expect("building");
                let mut ignored = HashMap::new();
                for e in &entries {
                    b.apply(e, &mut ignored);
                }
                return Vec::new();
            }
            WatchItem::SnapshotDone { .. } => {
                let Some(fresh) = self.building.take() else {
                    return Vec::new();
                };
                let old = std::mem::replace(&mut self.now, fresh);
                // Every app either side: its endpoints are compared when published below.
                for app in old.apps.keys().chain(self.now.apps.keys()) {
                    touched.entry(app.clone()).or_insert(Touch {
                        existed: old.apps.contains_key(app),
                        changed: true,
                    });
                }
            }
            WatchItem::Delta { changes, .. } => {
                for c in &changes {
                    self.now.apply(&c.entry, &mut touched);
                }
            }
        }
        self.install(source, touched)
    }

    /// Put the touched apps' state where readers see it.
    fn install(
        &self,
        source: &RegionSource,
        touched: HashMap<Arc<str>, Touch>,
    ) -> Vec<(Arc<str>, bool, bool)> {
        let mut out = Vec::with_capacity(touched.len());
        for (app, t) in touched {
            let exists = self.now.apps.contains_key(&app);
            if !t.changed && exists == t.existed {
                // Live machines came or went, or changed, and no endpoint with them: nothing
                // a reader sees.
                continue;
            }
            let now = self.now.localities(&source.region, &app);
            let mut map = source.apps.write().expect("apps lock");
            let before = map.get(&app).cloned();
            let changed = match (&before, now) {
                (None, None) => false,
                (Some(_), None) => {
                    map.remove(&app);
                    true
                }
                (None, Some(l)) => {
                    map.insert(app.clone(), l);
                    true
                }
                (Some(b), Some(l)) => {
                    let differs = **b != *l;
                    if differs {
                        map.insert(app.clone(), l);
                    }
                    differs
                }
            };
            drop(map);
            out.push((app, before.is_some(), changed));
        }
        out
    }
}

impl RegionSource {
    /// The app's endpoints as last read (`None`: no live machine of it).
    pub fn endpoints(&self, app: &str) -> Option<Arc<[Locality]>> {
        self.apps.read().expect("apps lock").get(app).cloned()
    }

    /// The app's state as read now becomes what xDS streams see.
    fn publish(&self, app: &Arc<str>) {
        let now = self.endpoints(app);
        let mut p = self.published.write().expect("published lock");
        match now {
            Some(l) => p.insert(app.clone(), l),
            None => p.remove(app),
        };
    }
}

fn apps_of(map: &RwLock<HashMap<Arc<str>, Arc<[Locality]>>>) -> Vec<Arc<str>> {
    map.read().expect("apps lock").keys().cloned().collect()
}

fn localities_of(
    map: &RwLock<HashMap<Arc<str>, Arc<[Locality]>>>,
    app: &str,
    out: &mut Vec<Locality>,
) {
    if let Some(l) = map.read().expect("apps lock").get(app) {
        out.extend(l.iter().cloned());
    }
}

impl Source for RegionSource {
    fn apps(&self) -> Vec<Arc<str>> {
        apps_of(&self.published)
    }

    fn exists(&self, app: &str) -> bool {
        self.published
            .read()
            .expect("published lock")
            .contains_key(app)
    }

    fn localities(&self, app: &str, _client: &Client, out: &mut Vec<Locality>) {
        localities_of(&self.published, app, out);
    }
}

impl Source for Latest {
    fn apps(&self) -> Vec<Arc<str>> {
        apps_of(&self.0.apps)
    }

    fn exists(&self, app: &str) -> bool {
        self.0.apps.read().expect("apps lock").contains_key(app)
    }

    fn localities(&self, app: &str, _client: &Client, out: &mut Vec<Locality>) {
        localities_of(&self.0.apps, app, out);
    }
}

/// Keep `source` current from `store` and publish its changes to `hub`, until the store
/// closes. The source follows every change at once (DNS answers read it); the hub hears of
/// them at most once per `debounce` (each push to every stream costs a message). `beat`:
/// stamped on every turn (a stuck follower stops xDS pushes).
pub async fn follow(
    store: Store,
    source: Arc<RegionSource>,
    hub: Arc<Hub>,
    debounce: Duration,
    beat: Option<patina_watchdog::Beat>,
) {
    // The whole store: the follower sees every key's every state, so it knows which app a
    // key leaves without the change naming it.
    let mut cursor = store
        .watch(None, None, 1024)
        .with_heartbeat(patina_watchdog::STAMP_EVERY);
    let mut state = Some(Follower::default());
    // App -> (whether it existed at the last publication, whether its endpoints changed).
    let mut pending: HashMap<Arc<str>, (bool, bool)> = HashMap::new();
    let mut flush_at: Option<tokio::time::Instant> = None;
    loop {
        if let Some(b) = &beat {
            b.stamp();
        }
        let due = async {
            match flush_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            item = cursor.next() => {
                let Some(item) = item else { return };
                if matches!(&item, WatchItem::Delta { changes, .. } if changes.is_empty()) {
                    continue;
                }
                let (mut st, src) = (state.take().expect("state"), source.clone());
                // Decoding machines and copying endpoints: off the async threads.
                let Ok((st, updated)) = tokio::task::spawn_blocking(move || {
                    let updated = st.take(&src, item);
                    (st, updated)
                })
                .await
                else {
                    tracing::error!("the xDS follower's step panicked: xDS and DNS stop following the store");
                    return;
                };
                state = Some(st);
                for (app, existed, changed) in updated {
                    let e = pending.entry(app).or_insert((existed, false));
                    e.1 |= changed;
                }
                if !pending.is_empty() && flush_at.is_none() {
                    flush_at = Some(tokio::time::Instant::now() + debounce);
                }
            }
            () = due => {
                flush_at = None;
                let mut changes = Vec::with_capacity(pending.len());
                for (app, (existed, changed)) in pending.drain() {
                    source.publish(&app);
                    let now = source.exists(&app);
                    let change = match (existed, now) {
                        (false, false) => continue,
                        (false, true) => Change::Added,
                        (true, false) => Change::Removed,
                        (true, true) if changed => Change::Endpoints,
                        (true, true) => continue,
                    };
                    changes.push((Some(app), change));
                }
                hub.publish(changes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_proto::v1::Health;
    use patina_store::{Filter, Flags, Kind, LocalWrite, NodeId, StoreOptions};

    /// Routable when passing, as the region's machine kind has it (the state left aside).
    struct Passing;

    impl Kind for Passing {
        fn name(&self) -> &'static str {
            "passing"
        }

        fn flags(&self, value: &[u8]) -> Flags {
            let health = Machine::decode(value).map(|m| m.health).unwrap_or(0);
            Flags {
                routable: health == Health::Passing as i32,
            }
        }

        // Moves between apps happen (a peer's record of another app may win), so the
        // follower must take them: the test makes them with local writes.
        fn group_change(&self) -> patina_store::GroupChange {
            patina_store::GroupChange::Allow
        }
    }

    fn machine(id: &str, app: &str, addr: &str, passing: bool, note: u64) -> LocalWrite {
        let m = Machine {
            id: id.to_owned(),
            app: app.to_owned(),
            addresses: vec![addr.to_owned()],
            health: if passing {
                Health::Passing as i32
            } else {
                Health::Critical as i32
            },
            metadata: [("note".to_owned(), note.to_string())]
                .into_iter()
                .collect(),
            ..Machine::default()
        };
        LocalWrite::Put {
            key: id.to_owned(),
            group: app.to_owned(),
            value: m.encode_to_vec(),
        }
    }

    const APPS: [&str; 3] = ["shop", "cart", "mail"];

    /// What a read of the store's index gives for every app: the reference the follower's
    /// incremental view must equal.
    fn from_index(store: &Store) -> HashMap<String, Option<Vec<Host>>> {
        APPS.iter()
            .map(|app| {
                let entries = store.list(app, Filter::All);
                let view = (!entries.is_empty()).then(|| {
                    entries
                        .iter()
                        .filter(|e| e.routable())
                        .filter_map(endpoint)
                        .collect()
                });
                (app.to_string(), view)
            })
            .collect()
    }

    fn from_source(source: &RegionSource) -> HashMap<String, Option<Vec<Host>>> {
        APPS.iter()
            .map(|app| {
                let view = source.endpoints(app).map(|l| {
                    l.iter()
                        .flat_map(|l| l.hosts.iter().cloned())
                        .collect::<Vec<_>>()
                });
                (app.to_string(), view)
            })
            .collect()
    }

    async fn converge(store: &Store, source: &RegionSource, step: usize) {
        let want = from_index(store);
        for _ in 0..500 {
            if from_source(source) == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "step {step}: the follower's view {:?} is not the index's {want:?}",
            from_source(source)
        );
    }

    /// Random writes, moves between apps, health flips, address changes, deletes and
    /// metadata-only updates, some in one batch: after each, the follower's view (kept change by
    /// change) is what a read of the whole index gives. Part of the region is written before
    /// the follower starts, so its first snapshot is taken as well as its deltas.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_incremental_view_equals_a_read_of_the_index() {
        let opts = StoreOptions {
            kind: Arc::new(Passing),
            ..StoreOptions::default()
        };
        let store = Store::in_memory(NodeId(1), 1, opts);
        let source = RegionSource::new("r1");
        let hub = Arc::new(Hub::new(crate::hub::DEFAULT_LOG));
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let op = |next: &mut dyn FnMut(u64) -> u64, k: u64, live: &dyn Fn(&str) -> bool| {
            let id = format!("m{}", next(12));
            match next(10) {
                0 | 1 if live(&id) => LocalWrite::Delete { key: id },
                r => machine(
                    &id,
                    APPS[next(3) as usize],
                    // A few addresses that do not parse: live, routable, no endpoint.
                    &if r == 9 {
                        "not-an-address".to_owned()
                    } else {
                        format!("10.0.0.{}:{}", next(4), 80 + next(2))
                    },
                    next(3) > 0,
                    k,
                ),
            }
        };
        let live = |store: &Store, id: &str| {
            APPS.iter()
                .any(|a| store.list(a, Filter::All).iter().any(|e| e.key() == id))
        };
        for k in 0..20 {
            let w = op(&mut next, k, &|id| live(&store, id));
            store.write(vec![w]).await.unwrap();
        }
        let follower = tokio::spawn(follow(
            store.clone(),
            source.clone(),
            hub,
            Duration::from_millis(5),
            None,
        ));
        converge(&store, &source, 0).await;
        let mut seen_changed = 0;
        for step in 1..300 {
            // One to three writes at once, each to another machine (a batch is all or
            // nothing and names a key once).
            let mut batch: Vec<LocalWrite> = Vec::new();
            for _ in 0..1 + next(3) {
                let w = op(&mut next, step as u64, &|id| live(&store, id));
                let key = match &w {
                    LocalWrite::Put { key, .. } | LocalWrite::Delete { key } => key.clone(),
                    #[allow(unreachable_patterns)]
                    _ => continue,
                };
                if batch.iter().all(|b| match b {
                    LocalWrite::Put { key: k, .. } | LocalWrite::Delete { key: k } => *k != key,
                    #[allow(unreachable_patterns)]
                    _ => true,
                }) {
                    batch.push(w);
                }
            }
            let before = from_index(&store);
            store.write(batch).await.unwrap();
            converge(&store, &source, step).await;
            if from_index(&store) != before {
                seen_changed += 1;
            }
        }
        // The run changed what readers see often, and also left it alone at times.
        assert!(seen_changed > 100, "{seen_changed}");
        assert!(seen_changed < 299, "{seen_changed}");
        follower.abort();
    }

    /// A change that leaves an app's endpoints as they were (metadata only, a machine that
    /// is not routable) is not an endpoint change; one that moves an endpoint is, and a move
    /// to another app changes both.
    #[tokio::test]
    async fn only_endpoint_changes_count_as_changed() {
        let store = Store::in_memory(
            NodeId(1),
            1,
            StoreOptions {
                kind: Arc::new(Passing),
                ..StoreOptions::default()
            },
        );
        let mut held = Machines::default();
        let mut step = async |w: LocalWrite, key: &str| {
            store.write(vec![w]).await.unwrap();
            let e = store
                .read_latest_entry(key)
                .await
                .unwrap()
                .expect("a state");
            let mut touched = HashMap::new();
            held.apply(&e, &mut touched);
            let mut t: Vec<(String, bool, bool)> = touched
                .into_iter()
                .map(|(a, t)| (a.to_string(), t.existed, t.changed))
                .collect();
            t.sort();
            t
        };
        let s = |a: &str, existed, changed| (a.to_owned(), existed, changed);
        let m = |app, addr, passing, note| machine("a", app, addr, passing, note);
        assert_eq!(
            step(m("shop", "10.0.0.1:80", true, 0), "a").await,
            [s("shop", false, true)]
        );
        assert_eq!(
            step(m("shop", "10.0.0.1:80", true, 1), "a").await,
            [s("shop", true, false)]
        );
        assert_eq!(
            step(m("shop", "10.0.0.2:80", true, 2), "a").await,
            [s("shop", true, true)]
        );
        assert_eq!(
            step(m("cart", "10.0.0.2:80", true, 3), "a").await,
            [s("cart", false, true), s("shop", true, true)]
        );
        assert_eq!(
            step(m("cart", "10.0.0.2:80", false, 4), "a").await,
            [s("cart", true, true)]
        );
        assert_eq!(
            step(m("cart", "10.0.0.3:80", false, 5), "a").await,
            [s("cart", true, false)]
        );
        assert_eq!(
            step(LocalWrite::Delete { key: "a".into() }, "a").await,
            [s("cart", true, false)]
        );
        assert!(held.apps.is_empty() && held.by_key.is_empty());
    }
}
