//! A region agent's xDS resources: per app with a live machine in the region, its routable
//! instances (started and passing) as one locality named after the region.
//!
//! [`follow`] keeps them from a watch over the whole store, change by change: the
//! [`RegionSource`] holds every live machine of the region (its app and, when routable, its
//! decoded endpoint), and a change costs one machine decoded and a few map operations. DNS
//! answers and xDS responses read those machines as they are; the apps whose existence or
//! endpoints changed are announced to the xDS streams on the [`Hub`] at most once per debounce
//! period (every endpoint change, even one undone since), so a burst of changes wakes each
//! stream once.
//!
//! Until the follower holds a whole first snapshot of the store (and, when `follow` is given
//! `peers`, until the agent has caught up with its peers once), the source is not synced:
//! DNS answers SERVFAIL for app names and xDS streams wait, rather than tell clients that no
//! app exists (an Envoy would drop every cluster it had from an agent that just restarted).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use patina_proto::v1::Machine;
use patina_store::{ByKey, Entry, Store, WatchItem};
use prost::Message;
use tokio::sync::watch;

use crate::hub::{Change, Hub};
use crate::protocol::Client;
use crate::resources::{Addr, Host, Locality};
use crate::service::Source;

/// The region's apps and their endpoints: every live machine as the follower has applied the
/// store's changes, and the apps announced to the xDS streams. For xDS streams an app exists
/// once announced (a stream that subscribes between an app's creation and its announcement is
/// not sent it twice) and its endpoints are those held now; every endpoint change is announced
/// (after the debounce), even one undone since, so a stream that read a state in between is
/// always sent the state after. [`Latest`], for DNS, is every app as held now.
pub struct RegionSource {
    region: Arc<str>,
    now: RwLock<Machines>,
    announced: RwLock<HashSet<Arc<str>>>,
    /// Set once the first whole snapshot is held and announced (and the agent caught up
    /// with its peers, when `follow` is told to wait for that).
    synced: watch::Sender<bool>,
}

impl RegionSource {
    pub fn new(region: &str) -> Arc<RegionSource> {
        Arc::new(RegionSource {
            region: region.into(),
            now: RwLock::new(Machines::default()),
            announced: RwLock::new(HashSet::new()),
            synced: watch::Sender::new(false),
        })
    }

    /// The source the DNS front end reads: every app as held now (not as last announced).
    pub fn latest(self: &Arc<Self>) -> Arc<Latest> {
        Arc::new(Latest(self.clone()))
    }

    /// The app's endpoints as the follower holds them now (`None`: no live machine of it).
    pub fn endpoints(&self, app: &str) -> Option<Arc<[Locality]>> {
        let now = self.now.read().expect("machines lock");
        now.localities(&self.region, app).map(Arc::from)
    }

    /// Live machines and apps the view holds now (for metrics).
    pub fn sizes(&self) -> (usize, usize) {
        let now = self.now.read().expect("machines lock");
        (now.by_key.len(), now.apps.len())
    }

    /// Announce the app's state now to the xDS streams: what changed for them since its last
    /// announcement (`changed`: its endpoints changed since, maybe back again).
    fn publish(&self, app: &Arc<str>, changed: bool) -> Option<Change> {
        let exists = self
            .now
            .read()
            .expect("machines lock")
            .apps
            .contains_key(&**app);
        let mut announced = self.announced.write().expect("announced lock");
        match (announced.contains(&**app), exists) {
            (false, false) => None,
            (true, false) => {
                announced.remove(&**app);
                Some(Change::Removed)
            }
            (false, true) => {
                announced.insert(app.clone());
                Some(Change::Added)
            }
            (true, true) => changed.then_some(Change::Endpoints),
        }
    }
}

/// Every live machine of the region as the follower last saw it: its record (by key, the
/// index's own allocation: see [`Follower::canonical`]); per
/// app, how many live machines it has and the endpoints of its routable ones, by key (so in
/// key order, as a listing gives them). Bounded by the region's live machines; a machine costs
/// a pointer to the record the store's index holds anyway, plus its decoded endpoint when
/// routable (`docs/capacity.md`).
#[derive(Default)]
struct Machines {
    by_key: HashSet<ByKey>,
    apps: HashMap<Arc<str>, App>,
}

#[derive(Default)]
struct App {
    live: usize,
    /// Routable machines whose first address parses.
    hosts: Hosts,
}

/// Apps with at most this many routable machines keep them in a sorted vector.
const FEW_HOSTS: usize = 64;

/// An app's routable machines' endpoints, in key order: a sorted vector while the app is small
/// (64 bytes a machine, no tree nodes: most apps run a handful to a few dozen), a B-tree once
/// it is large (a change then costs O(log n), not a shift of n entries).
enum Hosts {
    Few(Vec<(ByKey, Host)>),
    Many(BTreeMap<ByKey, Host>),
}

impl Default for Hosts {
    fn default() -> Hosts {
        Hosts::Few(Vec::new())
    }
}

impl Hosts {
    fn len(&self) -> usize {
        match self {
            Hosts::Few(v) => v.len(),
            Hosts::Many(m) => m.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&mut self, held: ByKey, host: Host) {
        match self {
            Hosts::Few(v) => match v.binary_search_by(|(k, _)| k.0.key().cmp(held.0.key())) {
                Ok(i) => v[i] = (held, host),
                Err(i) if v.len() < FEW_HOSTS => {
                    // Grown one at a time: small apps hold no spare room.
                    v.reserve_exact(1);
                    v.insert(i, (held, host));
                }
                Err(_) => {
                    let mut m: BTreeMap<ByKey, Host> = std::mem::take(v).into_iter().collect();
                    m.insert(held, host);
                    *self = Hosts::Many(m);
                }
            },
            Hosts::Many(m) => {
                m.insert(held, host);
            }
        }
    }

    fn remove(&mut self, key: &str) -> Option<Host> {
        match self {
            Hosts::Few(v) => {
                let i = v.binary_search_by(|(k, _)| k.0.key().cmp(key)).ok()?;
                let (_, host) = v.remove(i);
                if v.capacity() > v.len() + 8 {
                    v.shrink_to_fit();
                }
                Some(host)
            }
            Hosts::Many(m) => {
                let host = m.remove(key)?;
                // Back to a vector well below the bound (not at it: no flapping).
                if m.len() < FEW_HOSTS / 2 {
                    let v: Vec<(ByKey, Host)> = std::mem::take(m).into_iter().collect();
                    *self = Hosts::Few(v);
                }
                Some(host)
            }
        }
    }

    fn to_vec(&self) -> Vec<Host> {
        match self {
            Hosts::Few(v) => v.iter().map(|(_, h)| h.clone()).collect(),
            Hosts::Many(m) => m.values().cloned().collect(),
        }
    }
}

/// What a batch did to one app: whether it existed before the batch, and whether its
/// endpoints may have changed.
#[derive(Clone, Copy)]
struct Touch {
    existed: bool,
    changed: bool,
}

type Touched = HashMap<Arc<str>, Touch>;

/// A routable machine's endpoint: its first address that parses, and the others that do.
fn endpoint(e: &Entry) -> Option<Host> {
    let m = Machine::decode(e.value()?).ok()?;
    let mut addrs = m.addresses.iter().filter_map(|a| Addr::parse(a));
    addrs.next().map(|addr| Host {
        addr,
        more: addrs.collect(),
    })
}

/// What a change makes of its machine in the view: its endpoint when it is live and
/// routable (decoding is the costly part of a change, done before any lock is taken).
fn host_of(e: &Entry) -> Option<Host> {
    if e.is_live() && e.routable() {
        endpoint(e)
    } else {
        None
    }
}

impl Machines {
    fn touch(apps: &HashMap<Arc<str>, App>, touched: &mut Option<&mut Touched>, app: &Arc<str>) {
        if let Some(t) = touched.as_deref_mut() {
            t.entry(app.clone()).or_insert_with(|| Touch {
                existed: apps.contains_key(app),
                changed: false,
            });
        }
    }

    fn mark_changed(touched: &mut Option<&mut Touched>, app: &Arc<str>) {
        if let Some(t) = touched.as_deref_mut().and_then(|t| t.get_mut(app)) {
            t.changed = true;
        }
    }

    /// Take one change (the key's state now: live in its group, or not live at all: deleted,
    /// or hidden by the liveness overlay), `host` being [`host_of`] it. A key seen live before
    /// leaves the app it was in. `touched`: where to note what the change did to each app.
    fn apply(&mut self, e: Entry, host: Option<Host>, mut touched: Option<&mut Touched>) {
        let mut old: Option<(Arc<str>, Option<Host>)> = None;
        if let Some(ByKey(before)) = self.by_key.take(e.key()) {
            let app_name = self
                .apps
                .get_key_value(before.group())
                .map(|(k, _)| k.clone());
            if let Some(app_name) = app_name {
                Self::touch(&self.apps, &mut touched, &app_name);
                let (mut host, mut emptied) = (None, false);
                if let Some(app) = self.apps.get_mut(&app_name) {
                    app.live = app.live.saturating_sub(1);
                    host = app.hosts.remove(e.key());
                    emptied = app.live == 0;
                }
                if emptied {
                    self.apps.remove(&app_name);
                }
                old = Some((app_name, host));
            }
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
            Self::touch(&self.apps, &mut touched, &app_name);
            let app = self.apps.entry(app_name.clone()).or_default();
            app.live += 1;
            if let Some(h) = &host {
                app.hosts.insert(ByKey(e.clone()), h.clone());
            }
            self.by_key.insert(ByKey(e));
            Some((app_name, host))
        } else {
            None
        };
        match (old, new) {
            (Some((a, before)), Some((b, now))) if a == b => {
                if before != now {
                    Self::mark_changed(&mut touched, &a);
                }
            }
            (old, new) => {
                for (app, host) in old.into_iter().chain(new) {
                    if host.is_some() {
                        Self::mark_changed(&mut touched, &app);
                    }
                }
            }
        }
    }

    /// The app's endpoints: `None` when it has no live machine.
    fn localities(&self, region: &str, app: &str) -> Option<Vec<Locality>> {
        let a = self.apps.get(app)?;
        if a.hosts.is_empty() {
            return Some(Vec::new());
        }
        Some(vec![Locality {
            region: region.to_string(),
            priority: 0,
            weight: u32::try_from(a.hosts.len()).unwrap_or(u32::MAX),
            hosts: a.hosts.to_vec(),
        }])
    }
}

/// Changes applied under one hold of the view's lock (readers wait at most that many map
/// operations; decoding is done before).
const APPLY_CHUNK: usize = 256;

/// What one watch item did.
#[derive(Default)]
struct Step {
    /// Apps whose existence or endpoints may have changed for readers, each with whether its
    /// endpoints did: to announce.
    apps: Vec<(Arc<str>, bool)>,
    /// A whole snapshot is now held.
    done: bool,
}

/// The follower's own state, moved into each blocking step and back.
#[derive(Default)]
struct Follower {
    /// A snapshot being received after a reset: it replaces the source's machines once
    /// complete, so that no reader sees an app half listed.
    building: Option<Machines>,
    /// The store whose index holds the records the view points to.
    store: Option<Store>,
}

impl Follower {
    /// The record to hold for a change: the index's own when it is the same state (a change
    /// the liveness overlay re-sent is a copy with another revision; holding the copy would
    /// keep a second allocation alive until the machine next changes).
    fn canonical(&self, e: Entry) -> Entry {
        if !e.is_live() {
            return e;
        }
        self.store
            .as_ref()
            .and_then(|s| s.get_live(e.key()))
            .filter(|i| i.version() == e.version() && i.group() == e.group())
            .unwrap_or(e)
    }

    fn take(&mut self, source: &RegionSource, item: WatchItem) -> Step {
        match item {
            WatchItem::Snapshot { reset, entries } => {
                // Every snapshot starts with a reset part (docs of `WatchItem`).
                debug_assert!(
                    reset || self.building.is_some(),
                    "a snapshot part before its reset"
                );
                if reset || self.building.is_none() {
                    self.building = Some(Machines::default());
                }
                if let Some(b) = self.building.as_mut() {
                    // (A snapshot's records are the index's own.)
                    for e in entries {
                        let host = host_of(&e);
                        b.apply(e, host, None);
                    }
                }
                Step::default()
            }
            WatchItem::SnapshotDone { .. } => {
                let Some(fresh) = self.building.take() else {
                    return Step {
                        apps: Vec::new(),
                        done: true,
                    };
                };
                // The new apps read under the same hold as the swap; the old view is
                // dropped after it.
                let (old, mut apps) = {
                    let mut now = source.now.write().expect("machines lock");
                    let old = std::mem::replace(&mut *now, fresh);
                    let apps: HashSet<Arc<str>> = now.apps.keys().cloned().collect();
                    (old, apps)
                };
                // Every app either side: each is compared with its last announcement.
                apps.extend(old.apps.into_keys());
                Step {
                    apps: apps.into_iter().map(|a| (a, true)).collect(),
                    done: true,
                }
            }
            WatchItem::Delta { changes, .. } => {
                // Decoded (and their records found in the index) before any lock is taken.
                let changes: Vec<(Entry, Option<Host>)> = changes
                    .into_iter()
                    .map(|c| {
                        let host = host_of(&c.entry);
                        (self.canonical(c.entry), host)
                    })
                    .collect();
                if let Some(b) = self.building.as_mut() {
                    // (A cursor sends none within a snapshot; were it to, they belong to it.)
                    for (e, host) in changes {
                        b.apply(e, host, None);
                    }
                    return Step::default();
                }
                let mut touched = Touched::new();
                let mut apps = Vec::new();
                let mut items = changes.into_iter().peekable();
                while items.peek().is_some() {
                    let mut now = source.now.write().expect("machines lock");
                    for (e, host) in items.by_ref().take(APPLY_CHUNK) {
                        now.apply(e, host, Some(&mut touched));
                    }
                    if items.peek().is_none() {
                        for (app, t) in touched.drain() {
                            // Live machines that came, went or changed with no endpoint
                            // among them, in an app that existed before and still does:
                            // nothing a reader sees.
                            if t.changed || now.apps.contains_key(&app) != t.existed {
                                apps.push((app, t.changed));
                            }
                        }
                    }
                }
                Step { apps, done: false }
            }
        }
    }
}

impl RegionSource {
    fn localities_now(&self, app: &str, out: &mut Vec<Locality>) {
        let now = self.now.read().expect("machines lock");
        if let Some(l) = now.localities(&self.region, app) {
            out.extend(l);
        }
    }
}

impl Source for RegionSource {
    fn apps(&self) -> Vec<Arc<str>> {
        let announced = self.announced.read().expect("announced lock");
        announced.iter().cloned().collect()
    }

    fn exists(&self, app: &str) -> bool {
        self.announced.read().expect("announced lock").contains(app)
    }

    fn localities(&self, app: &str, _client: &Client, out: &mut Vec<Locality>) {
        self.localities_now(app, out);
    }

    fn synced(&self) -> Option<watch::Receiver<bool>> {
        Some(self.synced.subscribe())
    }

    fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }
}

/// [`RegionSource`] as held now, every app (not waiting for the debounce): for DNS.
pub struct Latest(Arc<RegionSource>);

impl Source for Latest {
    fn apps(&self) -> Vec<Arc<str>> {
        let now = self.0.now.read().expect("machines lock");
        now.apps.keys().cloned().collect()
    }

    fn exists(&self, app: &str) -> bool {
        self.0
            .now
            .read()
            .expect("machines lock")
            .apps
            .contains_key(app)
    }

    fn localities(&self, app: &str, _client: &Client, out: &mut Vec<Locality>) {
        self.0.localities_now(app, out);
    }

    fn synced(&self) -> Option<watch::Receiver<bool>> {
        self.0.synced()
    }

    fn is_synced(&self) -> bool {
        self.0.is_synced()
    }
}

/// Keep `source` current from `store` and publish its changes to `hub`, until the store
/// closes. `peers`: when given, the source is synced only once it also reads true (the agent
/// has caught up with its peers once: a fresh agent's or a wiped one's store alone would have
/// DNS and xDS clients told that no app exists). The source follows every change at once (DNS
/// answers read it); the xDS streams hear of them at most once per `debounce` (each push to
/// every stream costs a message), and at once when a whole snapshot has been taken. `beat`: stamped on every turn (a stuck
/// follower is a stuck agent: the watchdog ends it).
pub async fn follow(
    store: Store,
    source: Arc<RegionSource>,
    hub: Arc<Hub>,
    debounce: Duration,
    peers: Option<watch::Receiver<bool>>,
    beat: Option<patina_watchdog::Beat>,
) {
    let mut peers = peers.unwrap_or_else(|| watch::Sender::new(true).subscribe());
    // The whole store: the follower sees every key's every state, so it knows which app a
    // key leaves without the change naming it.
    let mut cursor = store
        .watch(None, None, 1024)
        .with_heartbeat(patina_watchdog::STAMP_EVERY);
    let mut state = Some(Follower {
        building: None,
        store: Some(store.clone()),
    });
    // Apps to announce, each with whether its endpoints changed.
    let mut pending: HashMap<Arc<str>, bool> = HashMap::new();
    // A whole snapshot has been taken; the agent has caught up with its peers once.
    let mut whole = false;
    let mut caught_up = *peers.borrow();
    let mut peers_gone = false;
    // The store's revision when the agent was found caught up, and the revision the cursor
    // has read up to: what the catching up brought is committed by then, but the cursor may
    // not have read it yet, and a first answer without it is what the wait is for.
    let mut caught_up_rev = if caught_up {
        store.feed().revision()
    } else {
        0
    };
    let mut read_rev = 0;
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
        let flush_now = tokio::select! {
            item = cursor.next() => {
                let Some(item) = item else { return };
                if let WatchItem::Delta { token, .. } | WatchItem::SnapshotDone { token } = &item {
                    read_rev = read_rev.max(token.rev);
                }
                let empty = matches!(&item, WatchItem::Delta { changes, .. } if changes.is_empty());
                let mut done = false;
                if !empty {
                    let (mut st, src) = (state.take().unwrap_or_default(), source.clone());
                    // Decoding machines: off the async threads.
                    let (st, step) = match tokio::task::spawn_blocking(move || {
                        let step = st.take(&src, item);
                        (st, step)
                    })
                    .await
                    {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(
                                error = %e,
                                panicked = e.is_panic(),
                                "the xDS follower's step failed: the agent stops (its DNS and xDS answers would no longer follow the store)"
                            );
                            return;
                        }
                    };
                    state = Some(st);
                    for (app, changed) in step.apps {
                        *pending.entry(app).or_default() |= changed;
                    }
                    if !pending.is_empty() && flush_at.is_none() {
                        flush_at = Some(tokio::time::Instant::now() + debounce);
                    }
                    whole |= step.done;
                    done = step.done;
                }
                // A whole snapshot, or the read that reaches where the agent was caught up:
                // announce now (and sync, below).
                done || (caught_up && whole && read_rev >= caught_up_rev && !*source.synced.borrow())
            }
            () = due => true,
            ok = async { peers.wait_for(|p| *p).await.is_ok() }, if !caught_up && !peers_gone => {
                // Gone: the agent is stopping (its store ends the watch soon).
                peers_gone = !ok;
                caught_up = !peers_gone;
                caught_up_rev = store.feed().revision();
                whole && caught_up && read_rev >= caught_up_rev
            }
        };
        if !flush_now {
            continue;
        }
        flush_at = None;
        let src = source.clone();
        let apps = std::mem::take(&mut pending);
        // Every app after a whole snapshot: off the async threads too.
        let changes = match tokio::task::spawn_blocking(move || {
            apps.into_iter()
                .filter_map(|(app, changed)| src.publish(&app, changed).map(|c| (Some(app), c)))
                .collect::<Vec<_>>()
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the xDS follower's publication failed: the agent stops");
                return;
            }
        };
        hub.publish(changes);
        // After a whole snapshot is announced, and read up to where the agent was caught up:
        // streams and DNS answers may start.
        if whole && caught_up && read_rev >= caught_up_rev && !*source.synced.borrow() {
            source.synced.send_replace(true);
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

    /// A follower of `store` into `source`, announcing to a hub of its own after 5 ms.
    fn following(
        store: &Store,
        source: &Arc<RegionSource>,
        peers: Option<watch::Receiver<bool>>,
    ) -> tokio::task::JoinHandle<()> {
        let hub = Arc::new(Hub::new(crate::hub::DEFAULT_LOG));
        tokio::spawn(follow(
            store.clone(),
            source.clone(),
            hub,
            Duration::from_millis(5),
            peers,
            None,
        ))
    }

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

    /// The apps xDS streams see (announced) and the apps DNS sees (held now).
    fn apps_seen(source: &Arc<RegionSource>) -> (Vec<String>, Vec<String>) {
        let sorted = |mut v: Vec<Arc<str>>| {
            v.sort();
            v.into_iter().map(|a| a.to_string()).collect::<Vec<_>>()
        };
        (
            sorted(Source::apps(&**source)),
            sorted(Source::apps(&*source.latest())),
        )
    }

    /// The view equals the index's, and once announced (the debounce is short), both the apps
    /// streams see and those DNS sees are the apps with a live machine.
    async fn converge(store: &Store, source: &Arc<RegionSource>, step: usize) {
        let want = from_index(store);
        let mut apps: Vec<String> = want
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(a, _)| a.clone())
            .collect();
        apps.sort();
        let want_apps = (apps.clone(), apps);
        for _ in 0..500 {
            if from_source(source) == want && apps_seen(source) == want_apps {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "step {step}: the follower's view {:?} and apps {:?} are not the index's {want:?}",
            from_source(source),
            apps_seen(source)
        );
    }

    /// A store holding one passing machine of "shop", and a source following it that waits
    /// for its peers (the sender says when they are caught up with), its first snapshot held.
    async fn waiting_for_peers() -> (
        Store,
        Arc<RegionSource>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let store = Store::in_memory(
            NodeId(1),
            1,
            StoreOptions {
                kind: Arc::new(Passing),
                ..StoreOptions::default()
            },
        );
        store
            .write(vec![machine("m0", "shop", "10.0.0.1:80", true, 0)])
            .await
            .unwrap();
        let source = RegionSource::new("r1");
        let (peers, rx) = watch::channel(false);
        let follower = following(&store, &source, Some(rx));
        for _ in 0..500 {
            if source.endpoints("shop").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            source.endpoints("shop").is_some(),
            "the first snapshot is held"
        );
        (store, source, peers, follower)
    }

    /// Until `source` is synced (5 s at most).
    async fn until_synced(source: &RegionSource) {
        let mut synced = source.synced().unwrap();
        tokio::time::timeout(Duration::from_secs(5), synced.wait_for(|s| *s))
            .await
            .expect("synced once caught up")
            .unwrap();
    }

    /// Told to wait for the agent to catch up with its peers, the source is not synced after
    /// its first snapshot until then; it is the moment after.
    #[tokio::test]
    async fn a_source_waits_for_its_peers_before_it_is_synced() {
        let (_store, source, peers, follower) = waiting_for_peers().await;
        // The snapshot is taken (DNS's view holds it) but nothing is synced.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!source.is_synced() && !source.latest().is_synced());
        peers.send_replace(true);
        until_synced(&source).await;
        assert!(source.latest().is_synced());
        follower.abort();
    }

    /// What the catching up brought is in the view once it is synced: the signal may come
    /// while the follower has yet to read the last writes (its select finds both ready), and
    /// the source must not sync before it has read up to them. Twenty rounds: without the
    /// wait for the read, an early sync showed by the third.
    #[tokio::test]
    async fn a_synced_source_holds_what_was_written_before_the_signal() {
        for round in 0..20 {
            let (store, source, peers, follower) = waiting_for_peers().await;
            // An in-memory store commits within the call: the follower has not run since.
            store
                .write(vec![machine("m1", "cart", "10.0.0.2:80", true, 0)])
                .await
                .unwrap();
            peers.send_replace(true);
            until_synced(&source).await;
            assert!(
                source.endpoints("cart").is_some(),
                "round {round}: synced without the last write"
            );
            follower.abort();
        }
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
        let follower = following(&store, &source, None);
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
            let host = host_of(&e);
            held.apply(e, host, Some(&mut touched));
            let mut t: Vec<(String, bool, bool)> = touched
                .into_iter()
                .map(|(a, t)| (a.to_string(), t.existed, t.changed))
                .collect();
            t.sort();
            t
        };
        let s = |a: &str, existed, changed| (a.to_owned(), existed, changed);
        let m = |app, addr, passing, note| machine("a", app, addr, passing, note);
        // Each write, and what it did to each app: (app, existed before, endpoints changed).
        let cases = [
            (
                m("shop", "10.0.0.1:80", true, 0),
                vec![s("shop", false, true)],
            ),
            // Metadata only.
            (
                m("shop", "10.0.0.1:80", true, 1),
                vec![s("shop", true, false)],
            ),
            (
                m("shop", "10.0.0.2:80", true, 2),
                vec![s("shop", true, true)],
            ),
            // A move: both apps.
            (
                m("cart", "10.0.0.2:80", true, 3),
                vec![s("cart", false, true), s("shop", true, true)],
            ),
            // No longer routable: its endpoint leaves.
            (
                m("cart", "10.0.0.2:80", false, 4),
                vec![s("cart", true, true)],
            ),
            // Not routable: its address is nobody's endpoint.
            (
                m("cart", "10.0.0.3:80", false, 5),
                vec![s("cart", true, false)],
            ),
            (
                LocalWrite::Delete { key: "a".into() },
                vec![s("cart", true, false)],
            ),
        ];
        for (i, (write, want)) in cases.into_iter().enumerate() {
            assert_eq!(step(write, "a").await, want, "write {i}");
        }
        assert!(held.apps.is_empty() && held.by_key.is_empty());
    }

    /// What the hub announced after `seen`: (app, change).
    fn announced(hub: &Hub, seen: u64) -> Vec<(String, Change)> {
        hub.since(seen)
            .unwrap()
            .into_iter()
            .map(|e| (e.app.map(|a| a.to_string()).unwrap_or_default(), e.change))
            .collect()
    }

    /// Until the hub announces something after `seen` (5 s at most).
    async fn wait_past(hub: &Hub, seen: u64) {
        for _ in 0..500 {
            if hub.newest() != seen {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Nothing is synced (DNS would SERVFAIL, streams wait) before the first snapshot is held;
    /// then every app is announced at once (not after a debounce) as added; a change of
    /// endpoints is announced once per debounce (even one undone within it), and a change
    /// nobody sees (metadata only) is not announced at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publication_follows_the_view_and_waits_for_the_first_snapshot() {
        let store = Store::in_memory(
            NodeId(1),
            1,
            StoreOptions {
                kind: Arc::new(Passing),
                ..StoreOptions::default()
            },
        );
        for (i, app) in APPS.iter().enumerate() {
            let w = machine(&format!("m{i}"), app, &format!("10.0.0.{i}:80"), true, 0);
            store.write(vec![w]).await.unwrap();
        }
        let source = RegionSource::new("r1");
        let latest = source.latest();
        let hub = Arc::new(Hub::new(crate::hub::DEFAULT_LOG));
        assert!(!source.is_synced() && !latest.is_synced());
        let (start, _rx) = hub.subscribe();
        let mut synced = source.synced().expect("a region source starts unsynced");
        // A debounce far longer than the test: only a whole snapshot publishes at once.
        let follower = tokio::spawn(follow(
            store.clone(),
            source.clone(),
            hub.clone(),
            Duration::from_secs(3600),
            None,
            None,
        ));
        tokio::time::timeout(Duration::from_secs(10), synced.wait_for(|s| *s))
            .await
            .expect("synced after the first snapshot")
            .unwrap();
        assert!(latest.is_synced());
        let mut published = Source::apps(&*source);
        published.sort();
        let mut want: Vec<Arc<str>> = APPS.iter().map(|a| Arc::from(*a)).collect();
        want.sort();
        assert_eq!(published, want);
        let events = hub.since(start).unwrap();
        let mut added: Vec<_> = events
            .iter()
            .map(|e| (e.app.clone().unwrap(), e.change))
            .collect();
        added.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            added,
            want.iter()
                .map(|a| (a.clone(), Change::Added))
                .collect::<Vec<_>>()
        );
        follower.abort();

        // A shorter debounce now, on a second follower of the same store (a fresh source).
        let source = RegionSource::new("r1");
        let hub = Arc::new(Hub::new(crate::hub::DEFAULT_LOG));
        let follower = tokio::spawn(follow(
            store.clone(),
            source.clone(),
            hub.clone(),
            Duration::from_millis(1000),
            None,
            None,
        ));
        let mut synced = source.synced().unwrap();
        synced.wait_for(|s| *s).await.unwrap();
        let after_sync = hub.newest();
        let endpoints = |s: &RegionSource, app: &str| {
            let mut out = Vec::new();
            Source::localities(s, app, &Client::default(), &mut out);
            out.into_iter()
                .flat_map(|l| l.hosts)
                .map(|h| std::net::SocketAddr::new(h.addr.ip, h.addr.port).to_string())
                .collect::<Vec<_>>()
        };
        // Metadata only: the view takes it, nothing is announced.
        store
            .write(vec![machine("m0", APPS[0], "10.0.0.0:80", true, 1)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(hub.newest(), after_sync, "{:?}", hub.since(after_sync));
        // A new address: announced once, and what streams read changes with it.
        store
            .write(vec![machine("m0", APPS[0], "10.0.9.9:80", true, 2)])
            .await
            .unwrap();
        wait_past(&hub, after_sync).await;
        assert_eq!(
            announced(&hub, after_sync),
            [(APPS[0].into(), Change::Endpoints)]
        );
        assert_eq!(endpoints(&source, APPS[0]), ["10.0.9.9:80"]);
        // An address that changes and changes back within one debounce: announced once all
        // the same (a stream may have read the address in between: it must hear again).
        let seen = hub.newest();
        store
            .write(vec![machine("m0", APPS[0], "10.0.7.7:80", true, 3)])
            .await
            .unwrap();
        // A reader sees the address in between (a watch may also fold both changes into
        // one: then nobody could have, and nothing need be announced).
        for _ in 0..500 {
            if endpoints(&source, APPS[0]) == ["10.0.7.7:80"] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(endpoints(&source, APPS[0]), ["10.0.7.7:80"]);
        assert_eq!(hub.newest(), seen, "within the debounce");
        store
            .write(vec![machine("m0", APPS[0], "10.0.9.9:80", true, 4)])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(announced(&hub, seen), [(APPS[0].into(), Change::Endpoints)]);
        // The last machine of an app deleted: removed for streams, gone for DNS.
        store
            .write(vec![LocalWrite::Delete { key: "m1".into() }])
            .await
            .unwrap();
        let seen = hub.newest();
        wait_past(&hub, seen).await;
        assert_eq!(announced(&hub, seen), [(APPS[1].into(), Change::Removed)]);
        assert!(!source.exists(APPS[1]) && !source.latest().exists(APPS[1]));
        follower.abort();
    }

    /// A reset snapshot over a view that holds machines: the view is the new snapshot's once
    /// it is done (not before: readers never see half of it), and every app either side is
    /// to be compared for publication.
    #[tokio::test]
    async fn a_reset_snapshot_replaces_the_view_whole() {
        let opts = || StoreOptions {
            kind: Arc::new(Passing),
            ..StoreOptions::default()
        };
        let first = Store::in_memory(NodeId(1), 1, opts());
        let second = Store::in_memory(NodeId(2), 2, opts());
        for i in 0..30 {
            let w = machine(
                &format!("m{i}"),
                APPS[i % 2],
                &format!("10.0.0.{i}:80"),
                true,
                0,
            );
            first.write(vec![w]).await.unwrap();
        }
        for i in 0..25 {
            let app = APPS[1 + i % 2];
            let w = machine(
                &format!("m{i}"),
                app,
                &format!("10.1.0.{i}:80"),
                i % 3 > 0,
                0,
            );
            second.write(vec![w]).await.unwrap();
        }
        let source = RegionSource::new("r1");
        let mut f = Follower::default();
        // Small chunks, so that the snapshot comes in several parts.
        let snapshot = |store: &Store| {
            let mut cursor = store.watch(None, None, 7);
            async move {
                let mut items = Vec::new();
                loop {
                    let item = cursor.next().await.expect("an item");
                    let done = matches!(item, WatchItem::SnapshotDone { .. });
                    items.push(item);
                    if done {
                        return items;
                    }
                }
            }
        };
        for item in snapshot(&first).await {
            f.take(&source, item);
        }
        assert_eq!(from_source(&source), from_index(&first));
        let items = snapshot(&second).await;
        assert!(items.len() > 3, "{}", items.len());
        let n = items.len();
        let mut step = Step::default();
        for (i, item) in items.into_iter().enumerate() {
            step = f.take(&source, item);
            if i + 1 < n {
                // Until the snapshot is done, readers see the first store's view.
                assert_eq!(from_source(&source), from_index(&first), "part {i}");
            }
        }
        assert!(step.done);
        assert_eq!(from_source(&source), from_index(&second));
        let mut apps: Vec<String> = step.apps.iter().map(|(a, _)| a.to_string()).collect();
        apps.sort();
        assert_eq!(apps, ["cart", "mail", "shop"]);
    }

    /// Machines of another agent, hidden while it is down and shown again: the overlay re-sends
    /// them as copies (another revision, another allocation), and the view holds the index's
    /// own records again, not the copies (which would double their memory until each machine
    /// next changes).
    #[tokio::test]
    async fn a_record_re_sent_by_the_overlay_is_held_as_the_index_s_own() {
        use patina_store::{Hlc, Record, RemoteBatch, Version};
        let store = Store::in_memory(
            NodeId(1),
            1,
            StoreOptions {
                kind: Arc::new(Passing),
                ..StoreOptions::default()
            },
        );
        // The owner is the origin of a record's version: records from a peer are its own.
        let owner = NodeId(5);
        let records = (0..3u64)
            .map(|i| {
                let w = machine(&format!("m{i}"), "shop", &format!("10.0.0.{i}:80"), true, 0);
                let LocalWrite::Put { key, group, value } = w else {
                    unreachable!("a machine is a put")
                };
                Record {
                    key: key.into(),
                    group: group.into(),
                    value: Some(value.into()),
                    version: Version {
                        hlc: Hlc::from_physical_ms(store.wall_ms()),
                        origin: owner,
                        seq: i + 1,
                    },
                }
            })
            .collect();
        let report = store
            .apply(RemoteBatch {
                records,
                covered: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(report.applied(), 3);
        let source = RegionSource::new("r1");
        let follower = following(&store, &source, None);
        converge(&store, &source, 0).await;
        assert!(source.endpoints("shop").is_some());
        assert_eq!(store.set_owner_down(owner, true).await.unwrap().records, 3);
        converge(&store, &source, 1).await;
        assert!(source.endpoints("shop").is_none(), "hidden while down");
        // Shown again: the feed carries each record as a copy under a new revision (the
        // index keeps the record it had, with its old one).
        assert_eq!(store.set_owner_down(owner, false).await.unwrap().records, 3);
        converge(&store, &source, 2).await;
        let now = source.now.read().expect("machines lock");
        let Hosts::Few(hosts) = &now.apps["shop"].hosts else {
            panic!("three machines are few")
        };
        // Every record the view holds: by key, and as an app's host.
        let held: Vec<&Entry> = now
            .by_key
            .iter()
            .chain(hosts.iter().map(|(k, _)| k))
            .map(|ByKey(e)| e)
            .collect();
        assert_eq!(held.len(), 6);
        for held in held {
            let index = store.get_live(held.key()).expect("live in the index");
            // An entry is one allocation with its key in it: the same key address is the same
            // allocation. Were `Follower::canonical` to keep the change it is given, the view
            // would hold the overlay's copy (equal but for its revision) and this fails.
            assert!(
                std::ptr::eq(held.key(), index.key()),
                "the view holds {held:?}, the index {index:?}"
            );
        }
        drop(now);
        follower.abort();
    }

    /// An app's endpoints through random inserts, updates and removals that cross the
    /// vector/tree bound both ways: always the reference map's, in key order.
    #[test]
    fn hosts_stay_in_key_order_across_the_vector_and_tree_forms() {
        use patina_store::{Hlc, Version};
        let entry = |k: u64| {
            ByKey(Entry::new(
                &format!("m{k:03}"),
                "shop",
                Some(b"x"),
                Flags { routable: true },
                Version {
                    hlc: Hlc(k + 1),
                    origin: NodeId(1),
                    seq: k + 1,
                },
                k + 1,
            ))
        };
        let host = |n: u64| Host {
            addr: Addr::parse(&format!("10.0.{}.{}:80", n / 256, n % 256)).unwrap(),
            more: Vec::new(),
        };
        let mut hosts = Hosts::default();
        let mut want: BTreeMap<String, Host> = BTreeMap::new();
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let (mut many, mut few_again) = (false, false);
        for step in 0..20_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Grow for a while, then shrink, then grow again.
            let phase = (step / 5_000) % 2 == 0;
            let k = rng % 150;
            // Growing: two inserts or updates in three; shrinking: one in four.
            let insert = if phase {
                !(rng >> 20).is_multiple_of(3)
            } else {
                (rng >> 20).is_multiple_of(4)
            };
            let key = format!("m{k:03}");
            if insert {
                hosts.insert(entry(k), host(step));
                want.insert(key, host(step));
            } else {
                assert_eq!(hosts.remove(&key), want.remove(&key), "step {step}");
            }
            assert_eq!(hosts.len(), want.len());
            many |= matches!(hosts, Hosts::Many(_));
            few_again |= many && matches!(hosts, Hosts::Few(_));
        }
        assert_eq!(hosts.to_vec(), want.values().cloned().collect::<Vec<_>>());
        assert!(
            many && few_again,
            "both forms and both conversions were taken"
        );
    }
}
