//! A region agent's xDS resources: per app with a live machine in the region, its routable
//! instances (started and passing) as one locality named after the region.
//!
//! [`follow`] keeps them: a cursor over the whole store names the apps each change touches,
//! which are read again from the store's index at once (the DNS front end answers from
//! them; only the machines whose revision changed are decoded again); those whose existence
//! or endpoints changed are published to the [`Hub`] at most once per debounce period.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use patina_proto::v1::Machine;
use patina_store::{Filter, Store, WatchItem};
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
    /// Per app, its routable machines as last decoded, by key, with the store revision they
    /// were decoded at: a change to one machine of a large app decodes that machine alone,
    /// not all of them again (at 1,000 writes/s into a 1,000-machine app, decoding every
    /// machine of the app per change was a large share of an agent's CPU). Bounded by the
    /// region's machines; only [`follow`]'s reads (one at a time) use it. A source follows
    /// one store for its life: revisions are that store's, never reused.
    decoded: Mutex<HashMap<Arc<str>, Decoded>>,
}

/// An app's routable machines as decoded: key -> (store revision, endpoint, `None` when no
/// address of it parses, so that such a machine is not decoded again on every read).
type Decoded = HashMap<Box<str>, (u64, Option<Host>)>;

fn decoded_lock(
    m: &Mutex<HashMap<Arc<str>, Decoded>>,
) -> MutexGuard<'_, HashMap<Arc<str>, Decoded>> {
    // A panic elsewhere while holding it leaves a cache that is still consistent per entry.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// [`RegionSource`] as the store has it now (not waiting for the debounce).
pub struct Latest(Arc<RegionSource>);

impl RegionSource {
    pub fn new(region: &str) -> Arc<RegionSource> {
        Arc::new(RegionSource {
            region: region.into(),
            apps: RwLock::new(HashMap::new()),
            published: RwLock::new(HashMap::new()),
            decoded: Mutex::new(HashMap::new()),
        })
    }

    /// The same apps, as the store has them now: for the DNS front end.
    pub fn latest(self: &Arc<Self>) -> Arc<Latest> {
        Arc::new(Latest(self.clone()))
    }

    /// The app's endpoints now, read from the store's index: `None` when it has no live
    /// machine.
    fn read(&self, store: &Store, app: &str) -> Option<Arc<[Locality]>> {
        let entries = store.list(app, Filter::All);
        let mut before = decoded_lock(&self.decoded).remove(app).unwrap_or_default();
        if entries.is_empty() {
            return None;
        }
        let mut hosts = Vec::new();
        let mut now: Decoded = HashMap::new();
        for e in entries.iter().filter(|e| e.routable()) {
            let host = match before.remove(e.key()) {
                Some((rev, host)) if rev == e.rev() => host,
                _ => e
                    .value()
                    .and_then(|v| Machine::decode(v).ok())
                    .and_then(|m| {
                        let mut addrs = m.addresses.iter().filter_map(|a| Addr::parse(a));
                        addrs.next().map(|addr| Host {
                            addr,
                            more: addrs.collect(),
                        })
                    }),
            };
            if let Some(host) = &host {
                hosts.push(host.clone());
            }
            now.insert(e.key().into(), (e.rev(), host));
        }
        if !now.is_empty() {
            decoded_lock(&self.decoded).insert(Arc::from(app), now);
        }
        if hosts.is_empty() {
            return Some(Arc::from(Vec::new()));
        }
        Some(Arc::from(vec![Locality {
            region: self.region.to_string(),
            priority: 0,
            weight: hosts.len() as u32,
            hosts,
        }]))
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
    let mut cursor = store
        .watch(None, None, 1024)
        .with_heartbeat(patina_watchdog::STAMP_EVERY);
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
                let mut dirty: HashSet<Arc<str>> = HashSet::new();
                let mut everything = false;
                match item {
                    WatchItem::Snapshot { reset, entries } => {
                        everything |= reset;
                        dirty.extend(entries.iter().map(|e| Arc::from(e.group())));
                    }
                    WatchItem::SnapshotDone { .. } => {}
                    WatchItem::Delta { changes, .. } => {
                        for c in &changes {
                            dirty.insert(Arc::from(c.entry.group()));
                            dirty.extend(c.left.groups.iter().map(|(g, _)| g.clone()));
                            // Groups it left that the log no longer names: any of them.
                            everything |= c.left.unknown_before > 0;
                        }
                    }
                }
                if everything {
                    dirty.extend(apps_of(&source.apps));
                }
                if dirty.is_empty() {
                    continue;
                }
                let (st, src) = (store.clone(), source.clone());
                // Reading the index and decoding machines: off the async threads.
                let updated = tokio::task::spawn_blocking(move || update(&st, &src, dirty))
                    .await
                    .unwrap_or_default();
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

/// Read `apps` again into the source: each with whether it existed before and whether its
/// endpoints changed.
fn update(
    store: &Store,
    source: &RegionSource,
    apps: HashSet<Arc<str>>,
) -> Vec<(Arc<str>, bool, bool)> {
    let mut out = Vec::with_capacity(apps.len());
    for app in apps {
        let now = source.read(store, &app);
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

#[cfg(test)]
mod tests {
    use super::*;
    use patina_store::{Flags, Kind, LocalWrite, NodeId, StoreOptions};

    /// Every record routable: the test's machines are started and passing.
    struct Routable;

    impl Kind for Routable {
        fn name(&self) -> &'static str {
            "routable"
        }

        fn flags(&self, _value: &[u8]) -> Flags {
            Flags { routable: true }
        }
    }

    fn machine(id: &str, addr: &str) -> LocalWrite {
        let m = Machine {
            id: id.to_owned(),
            app: "shop".to_owned(),
            addresses: vec![addr.to_owned()],
            ..Machine::default()
        };
        LocalWrite::Put {
            key: id.to_owned(),
            group: "shop".to_owned(),
            value: m.encode_to_vec(),
        }
    }

    fn addrs(l: &Option<Arc<[Locality]>>) -> Vec<String> {
        let mut out: Vec<String> = l
            .iter()
            .flat_map(|l| l.iter())
            .flat_map(|l| l.hosts.iter())
            .map(|h| format!("{:?}", h.addr))
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn a_read_decodes_changed_machines_and_keeps_the_others() {
        let opts = StoreOptions {
            kind: Arc::new(Routable),
            ..StoreOptions::default()
        };
        let store = Store::in_memory(NodeId(1), 1, opts);
        let source = RegionSource::new("r1");
        store
            .write(vec![
                machine("a", "10.0.0.1:80"),
                machine("b", "10.0.0.2:80"),
                machine("c", "10.0.0.3:80"),
            ])
            .await
            .unwrap();
        let first = source.read(&store, "shop");
        assert_eq!(addrs(&first).len(), 3);
        // A machine unchanged since the last read is taken from the cache, not decoded: a
        // planted endpoint at its current revision is what the next read shows.
        let planted = Host {
            addr: Addr::parse("10.9.9.9:99").expect("an address"),
            more: Vec::new(),
        };
        {
            let mut d = source.decoded.lock().unwrap();
            let a = d
                .get_mut("shop")
                .and_then(|m| m.get_mut("a"))
                .expect("a cached");
            a.1 = Some(planted.clone());
        }
        assert!(
            addrs(&source.read(&store, "shop"))
                .iter()
                .any(|a| a.contains("10.9.9.9"))
        );
        {
            // The same endpoint under a stale revision is decoded again.
            let mut d = source.decoded.lock().unwrap();
            let a = d
                .get_mut("shop")
                .and_then(|m| m.get_mut("a"))
                .expect("a cached");
            a.0 = a.0.wrapping_sub(1);
        }
        let again = addrs(&source.read(&store, "shop"));
        assert!(again.iter().any(|a| a.contains("10.0.0.1")), "{again:?}");
        assert!(!again.iter().any(|a| a.contains("10.9.9.9")), "{again:?}");
        // One machine moves, one goes: the read shows both, and the third as it was.
        store
            .write(vec![machine("b", "10.0.0.9:81")])
            .await
            .unwrap();
        store
            .write(vec![LocalWrite::Delete { key: "c".into() }])
            .await
            .unwrap();
        let second = addrs(&source.read(&store, "shop"));
        assert_eq!(second.len(), 2, "{second:?}");
        assert!(second.iter().any(|a| a.contains("10.0.0.9")), "{second:?}");
        assert!(second.iter().any(|a| a.contains("10.0.0.1")), "{second:?}");
        assert!(!second.iter().any(|a| a.contains("10.0.0.2")), "{second:?}");
        // The cache holds what the app has now, no more.
        let cached = source.decoded.lock().unwrap().get("shop").map(HashMap::len);
        assert_eq!(cached, Some(2));
        // The app gone: nothing read, nothing kept.
        store
            .write(vec![
                LocalWrite::Delete { key: "a".into() },
                LocalWrite::Delete { key: "b".into() },
            ])
            .await
            .unwrap();
        let gone = source.read(&store, "shop");
        assert!(addrs(&gone).is_empty(), "{gone:?}");
        assert!(source.decoded.lock().unwrap().get("shop").is_none());
    }
}
