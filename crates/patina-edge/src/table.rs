//! [`Table`]: the compact in-memory replica of the global map that lookups read.
//!
//! Per app, a boxed slice of 12-byte slots `(region id, snapshot generation, healthy,
//! total)`; regions are interned to `u16` ids, and for each region the table keeps the order
//! of every other region by round trip from it, so a lookup is one map read, a filter and a
//! sort of a few slots, with no allocation when the caller reuses its output vector.
//!
//! Freshness: each bridge's heartbeat says how fresh its view of its region is (the region
//! agents' clock). A region whose freshest live bridge view is older than the freshest view
//! of any region by more than `stale_after` is left out of lookups, and so is one with no
//! live bridge at all. (Relative, not against the clock: an edge cut off from everything
//! keeps answering from its last known state rather than nothing.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;

use crate::regions::{RegionTable, is_dns_label};

/// A region as the table names it: an index into its interned names.
pub type RegionId = u16;

/// How often (in snapshots) slot generations are renormalized: half the 16-bit range.
const RENORMALIZE_EVERY: u64 = 1 << 15;

/// Most distinct regions a table interns. Each region keeps an order of all the others
/// (8 bytes a pair), so this bounds that to 8 MiB; the world has a few hundred regions.
pub const MAX_REGIONS: usize = 1024;

/// Most instances a summary may count (per app and region).
pub const MAX_INSTANCES: u32 = 10_000_000;

/// One region in a lookup's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub region: RegionId,
    pub healthy: u32,
    pub total: u32,
    /// Round trip from the caller's region, when the region table can tell.
    pub rtt_ms: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    region: RegionId,
    /// The snapshot that last wrote it: slots an ended snapshot did not write are swept.
    generation: u16,
    healthy: u32,
    total: u32,
}

/// A summary to apply (the fields of `patina.v1.AppSummary`).
#[derive(Clone, Copy, Debug)]
pub struct SummaryUpdate<'a> {
    pub app: &'a str,
    pub region: &'a str,
    pub healthy: u32,
    pub total: u32,
    pub bridge: u64,
}

/// Why a summary was not applied (the table keeps what it had).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refused {
    BadName,
    Counts,
    TooManyRegions,
    /// The bridge that made it serves another region.
    ForeignRegion,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::BadName => "an app or region name that is not a DNS label",
            Refused::Counts => "healthy above total, or a count out of range",
            Refused::TooManyRegions => "more distinct regions than the table holds",
            Refused::ForeignRegion => "a summary for a region its bridge does not serve",
        })
    }
}

#[derive(Default)]
struct Regions {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, RegionId, foldhash::fast::RandomState>,
    /// `rank[from][region]`: the region's place in the order from `from` (round trip, unknown
    /// last, then name).
    rank: Vec<Box<[u32]>>,
    /// `rtt[from][region]`, `u32::MAX` where unknown.
    rtt: Vec<Box<[u32]>>,
    /// The order by name, for callers in a region the table has never heard of.
    by_name: Box<[u32]>,
    /// Per region: the freshest view (ms) a live bridge showed of it; 0: none.
    fresh_ms: Vec<u64>,
    /// The freshest view of any region.
    newest_ms: u64,
    /// `estimated[from][to]`: round trips estimated from network coordinates (ms),
    /// `u32::MAX` where unknown; used where the region table has none.
    estimated: Vec<Vec<u32>>,
}

impl Regions {
    /// Add a region (below [`MAX_REGIONS`]); the orders are the caller's to recompute.
    fn push(&mut self, name: &str) -> RegionId {
        let id = self.names.len() as RegionId;
        let name: Arc<str> = name.into();
        self.names.push(name.clone());
        self.ids.insert(name, id);
        self.fresh_ms.push(0);
        for row in &mut self.estimated {
            row.push(u32::MAX);
        }
        self.estimated.push(vec![u32::MAX; self.names.len()]);
        id
    }
}

/// The replica lookups read. Shared behind an `Arc`; writers are the follower (one at a
/// time), readers any number of threads.
///
/// Locks: `bridges` before `regions` wherever both are taken, and neither is held while a
/// dashmap guard of `apps` is taken except `regions` (read) in lookups; writers never hold a
/// dashmap guard while they take `regions`.
pub struct Table {
    table: RegionTable,
    stale_after: Option<Duration>,
    /// foldhash: several times faster than SipHash on short names; the map is not keyed
    /// by anything an attacker picks freely (apps are the operators').
    apps: DashMap<Box<str>, Box<[Slot]>, foldhash::fast::RandomState>,
    regions: RwLock<Regions>,
    /// bridge -> (its region, its latest view in ms).
    bridges: Mutex<HashMap<u64, (RegionId, u64)>>,
    generation: AtomicU64,
    summaries: AtomicU64,
    refused: AtomicU64,
    /// Set once someone follows the table's changes (an xDS server); `None` costs nothing.
    changes: std::sync::OnceLock<Arc<Changes>>,
}

/// What changed in a [`Table`] since it was last taken: the apps whose regions changed (each
/// with whether it existed before the first of those changes), and whether every app's
/// answer may have changed (a region went stale or fresh, the regions' order changed).
/// Bounded by the number of apps in the table.
#[derive(Debug, Default)]
pub struct Changes {
    inner: Mutex<ChangedApps>,
    notify: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct ChangedApps {
    apps: HashMap<Box<str>, bool>,
    everything: bool,
}

/// One take of [`Changes`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Apps, each with whether it existed before it changed.
    pub apps: Vec<(Box<str>, bool)>,
    pub everything: bool,
}

impl Changes {
    fn app(&self, app: &str, existed: bool) {
        let mut c = self.inner.lock().expect("changes lock");
        if !c.apps.contains_key(app) {
            c.apps.insert(app.into(), existed);
        }
        drop(c);
        self.notify.notify_one();
    }

    fn everything(&self) {
        self.inner.lock().expect("changes lock").everything = true;
        self.notify.notify_one();
    }

    /// Wait until something changed (at once if something did since the last take).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }

    /// What changed since the last take.
    pub fn take(&self) -> Changed {
        let mut c = self.inner.lock().expect("changes lock");
        let taken = std::mem::take(&mut *c);
        Changed {
            apps: taken.apps.into_iter().collect(),
            everything: taken.everything,
        }
    }
}

/// A region as the table sees it ([`Table::region_states`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionState {
    pub name: Arc<str>,
    /// The freshest view (ms since the Unix epoch) a live bridge showed of it; 0: none.
    pub view_ms: u64,
    /// Live bridges that serve it.
    pub bridges: u32,
    /// Lookups leave it out: its view is older than the freshest region's by more than the
    /// staleness bound, or no live bridge showed one.
    pub stale: bool,
}

/// What a table holds and has refused.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub apps: u64,
    pub summaries: u64,
    pub regions: u64,
    pub bridges: u64,
    pub refused: u64,
}

impl Table {
    /// An empty table ordering regions by `table`. `stale_after`: regions whose freshest
    /// bridge view is older than the freshest region's by more are left out of lookups
    /// (`None`: never).
    pub fn new(table: RegionTable, stale_after: Option<Duration>) -> Table {
        let t = Table {
            table,
            stale_after,
            apps: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            regions: RwLock::new(Regions::default()),
            bridges: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            summaries: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            changes: std::sync::OnceLock::new(),
        };
        {
            // The configured regions at once, ordered once.
            let mut r = t.regions.write().expect("regions lock");
            for name in t.table.names().take(MAX_REGIONS) {
                r.push(name);
            }
            t.reorder(&mut r);
        }
        t
    }

    pub fn region_table(&self) -> &RegionTable {
        &self.table
    }

    /// Start keeping [`Changes`] (the same for every caller).
    pub fn track_changes(&self) -> Arc<Changes> {
        self.changes.get_or_init(Arc::default).clone()
    }

    /// Round trips between regions estimated from network coordinates (`est(from, to)` in
    /// ms): they order regions where the region table gives no measured round trip (before
    /// the great-circle estimate from the table's coordinates). An estimate replaces the one held only
    /// when it differs by more than 10 % and 2 ms (orders do not flap with measurement
    /// noise). Returns whether any region's order changed (every app's answer may have:
    /// followers of [`Changes`] hear of it).
    pub fn set_estimated_rtts(&self, est: &dyn Fn(&str, &str) -> Option<u32>) -> bool {
        let mut r = self.regions.write().expect("regions lock");
        let n = r.names.len();
        let mut moved = false;
        for from in 0..n {
            for to in 0..n {
                if from == to {
                    continue;
                }
                let Some(new) = est(&r.names[from], &r.names[to]) else {
                    continue;
                };
                let old = r.estimated[from][to];
                let differs = old == u32::MAX || {
                    let d = old.abs_diff(new);
                    d > 2 && u64::from(d) * 10 > u64::from(old)
                };
                if differs {
                    r.estimated[from][to] = new;
                    moved = true;
                }
            }
        }
        if !moved {
            return false;
        }
        let before = r.rank.clone();
        self.reorder(&mut r);
        let changed = before != r.rank;
        drop(r);
        if changed && let Some(c) = self.changes.get() {
            c.everything();
        }
        changed
    }

    /// Every live bridge the table knows, with its region.
    pub fn bridge_regions(&self) -> Vec<(u64, Arc<str>)> {
        let bridges: Vec<(u64, RegionId)> = {
            let b = self.bridges.lock().expect("bridges lock");
            b.iter().map(|(id, (region, _))| (*id, *region)).collect()
        };
        let regions = self.regions.read().expect("regions lock");
        bridges
            .into_iter()
            .filter_map(|(id, r)| regions.names.get(r as usize).map(|n| (id, n.clone())))
            .collect()
    }

    /// Whether the app has instances in some region (stale or not).
    pub fn app_exists(&self, app: &str) -> bool {
        self.apps
            .get(app)
            .is_some_and(|slots| slots.iter().any(|s| s.total > 0))
    }

    /// Every app with instances in some region.
    pub fn app_names(&self) -> Vec<Arc<str>> {
        self.apps
            .iter()
            .filter(|e| e.value().iter().any(|s| s.total > 0))
            .map(|e| Arc::from(&**e.key()))
            .collect()
    }

    /// A region's name.
    pub fn region_name(&self, id: RegionId) -> Option<Arc<str>> {
        self.regions
            .read()
            .expect("regions lock")
            .names
            .get(id as usize)
            .cloned()
    }

    /// A region's id, if the table knows it.
    pub fn region_id(&self, name: &str) -> Option<RegionId> {
        self.regions
            .read()
            .expect("regions lock")
            .ids
            .get(name)
            .copied()
    }

    /// The freshest view (ms since the Unix epoch, region agents' clock) a live bridge
    /// showed of a region; 0 when none did.
    pub fn region_view_ms(&self, id: RegionId) -> u64 {
        self.regions
            .read()
            .expect("regions lock")
            .fresh_ms
            .get(id as usize)
            .copied()
            .unwrap_or(0)
    }

    /// The regions of `app` with healthy instances (all with instances when `include_empty`),
    /// nearest to `from` first, ties by name; stale regions are left out. Clears `out` first.
    /// From memory: no I/O, no allocation once `out` has room.
    pub fn lookup_into(&self, app: &str, from: &str, include_empty: bool, out: &mut Vec<Hit>) {
        out.clear();
        let regions = self.regions.read().expect("regions lock");
        let from = regions.ids.get(from).copied();
        let (rank, rtt) = match from {
            Some(f) => (&regions.rank[f as usize], Some(&regions.rtt[f as usize])),
            None => (&regions.by_name, None),
        };
        // Stale: older than the freshest region's view by more than the bound. Measured
        // against the freshest view rather than the clock, so that an edge cut off from
        // everything (every view stops) answers from its last known state instead of nothing.
        let fresh_after = self
            .stale_after
            .map(|d| regions.newest_ms.saturating_sub(d.as_millis() as u64));
        {
            let Some(slots) = self.apps.get(app) else {
                return;
            };
            for s in slots.iter() {
                // A region with no instance at all is never listed (a bridge publishes zero
                // when an app leaves its region).
                if s.total == 0 || (s.healthy == 0 && !include_empty) {
                    continue;
                }
                if let Some(after) = fresh_after {
                    let fresh = regions.fresh_ms[s.region as usize];
                    if fresh == 0 || fresh < after {
                        continue;
                    }
                }
                out.push(Hit {
                    region: s.region,
                    healthy: s.healthy,
                    total: s.total,
                    rtt_ms: rtt
                        .map(|r| r[s.region as usize])
                        .filter(|&ms| ms != u32::MAX),
                });
            }
        }
        out.sort_unstable_by_key(|h| rank[h.region as usize]);
    }

    /// [`Table::lookup_into`] into a new vector.
    pub fn lookup(&self, app: &str, from: &str) -> Vec<Hit> {
        let mut out = Vec::new();
        self.lookup_into(app, from, false, &mut out);
        out
    }

    /// Apply one summary. Checked first: names, counts, and that its bridge (when its
    /// heartbeat is known) serves the summary's region.
    pub fn apply_summary(&self, s: SummaryUpdate<'_>) -> Result<(), Refused> {
        let r = self.check(&s).and_then(|()| self.intern(s.region));
        let region = match r {
            Ok(id) => id,
            Err(why) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return Err(why);
            }
        };
        let generation = self.generation.load(Ordering::Relaxed) as u16;
        let slot = Slot {
            region,
            generation,
            healthy: s.healthy,
            total: s.total,
        };
        let mut entry = self.apps.entry(s.app.into()).or_default();
        let slots = entry.value_mut();
        let existed = slots.iter().any(|x| x.total > 0);
        let changed = !slots
            .iter()
            .any(|x| x.region == region && x.healthy == s.healthy && x.total == s.total);
        match slots.iter().position(|x| x.region == region) {
            Some(i) => slots[i] = slot,
            None => {
                let mut v = Vec::with_capacity(slots.len() + 1);
                v.extend_from_slice(slots);
                v.push(slot);
                *slots = v.into_boxed_slice();
                self.summaries.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(entry);
        if changed && let Some(c) = self.changes.get() {
            c.app(s.app, existed);
        }
        Ok(())
    }

    /// Remove one summary (its bridge is down, or it was deleted).
    pub fn remove_summary(&self, app: &str, region: &str) {
        let Some(region) = self.region_id(region) else {
            return;
        };
        let mut existed = None;
        let emptied = match self.apps.get_mut(app) {
            Some(mut entry) => {
                let slots = entry.value_mut();
                if let Some(i) = slots.iter().position(|x| x.region == region) {
                    existed = Some(slots.iter().any(|x| x.total > 0));
                    let mut v = slots.to_vec();
                    v.swap_remove(i);
                    *slots = v.into_boxed_slice();
                    self.summaries.fetch_sub(1, Ordering::Relaxed);
                }
                slots.is_empty()
            }
            None => false,
        };
        if let (Some(existed), Some(c)) = (existed, self.changes.get()) {
            c.app(app, existed);
        }
        if emptied {
            self.apps.remove_if(app, |_, s| s.is_empty());
        }
    }

    /// A bridge's heartbeat: it serves `region`, and its view of it is as of `view_ms`.
    pub fn apply_bridge(&self, bridge: u64, region: &str, view_ms: u64) -> Result<(), Refused> {
        if !is_dns_label(region) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::BadName);
        }
        let id = self.intern(region).inspect_err(|_| {
            self.refused.fetch_add(1, Ordering::Relaxed);
        })?;
        // A view from the future (a clock stepped ahead) counts as now: it must still age.
        let view_ms = view_ms.min(wall_ms());
        let mut bridges = self.bridges.lock().expect("bridges lock");
        if let Some((old, _)) = bridges.get(&bridge)
            && *old != id
        {
            // A bridge's region is fixed: a heartbeat that moves it is refused.
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Err(Refused::ForeignRegion);
        }
        bridges.insert(bridge, (id, view_ms));
        self.refresh(&bridges, id);
        Ok(())
    }

    /// A bridge is down (or forgotten): its heartbeat no longer counts.
    pub fn remove_bridge(&self, bridge: u64) {
        let mut bridges = self.bridges.lock().expect("bridges lock");
        if let Some((region, _)) = bridges.remove(&bridge) {
            self.refresh(&bridges, region);
        }
    }

    /// Start applying a snapshot: what it does not write is swept by [`Table::end_snapshot`].
    /// Lookups keep answering from the previous state meanwhile (updated as the snapshot's
    /// summaries arrive).
    pub fn begin_snapshot(&self) {
        let generation = self
            .generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        // Slots carry the generation in 16 bits: one left from 65,536 snapshots ago (a run of
        // snapshots that never ended) would pass for this one's and never be swept. Every
        // 32,768 snapshots, before this one writes anything, every slot is marked as of the
        // previous one: no slot is then ever 65,536 behind. (Amortized: one pass over the
        // slots per 32,768 snapshots, each of which passes over every summary anyway.)
        if generation.is_multiple_of(RENORMALIZE_EVERY) {
            let previous = generation.wrapping_sub(1) as u16;
            for mut slots in self.apps.iter_mut() {
                for s in slots.value_mut().iter_mut() {
                    s.generation = previous;
                }
            }
        }
    }

    /// The snapshot is complete: remove the summaries it did not write, and the bridges not
    /// in `bridges` (the snapshot's heartbeats).
    pub fn end_snapshot(&self, bridges: &std::collections::HashSet<u64>) {
        let generation = self.generation.load(Ordering::Relaxed) as u16;
        let mut removed = 0u64;
        let mut touched = Vec::new();
        let tracking = self.changes.get().is_some();
        self.apps.retain(|app, slots| {
            if slots.iter().any(|s| s.generation != generation) {
                if tracking {
                    touched.push((app.clone(), slots.iter().any(|s| s.total > 0)));
                }
                let kept: Vec<Slot> = slots
                    .iter()
                    .copied()
                    .filter(|s| s.generation == generation)
                    .collect();
                removed += (slots.len() - kept.len()) as u64;
                *slots = kept.into_boxed_slice();
            }
            !slots.is_empty()
        });
        self.summaries.fetch_sub(removed, Ordering::Relaxed);
        if let Some(c) = self.changes.get() {
            for (app, existed) in touched {
                c.app(&app, existed);
            }
        }
        let gone: Vec<u64> = {
            let b = self.bridges.lock().expect("bridges lock");
            b.keys().filter(|k| !bridges.contains(k)).copied().collect()
        };
        for bridge in gone {
            self.remove_bridge(bridge);
        }
    }

    /// Every region the table knows, by name: its freshest view, its live bridges, and
    /// whether lookups leave it out as stale (for operators: the status page, metrics).
    pub fn region_states(&self) -> Vec<RegionState> {
        // Bridges, then regions: the order elsewhere.
        let per_region: HashMap<RegionId, u32> = {
            let bridges = self.bridges.lock().expect("bridges lock");
            let mut m = HashMap::new();
            for (region, _) in bridges.values() {
                *m.entry(*region).or_insert(0) += 1;
            }
            m
        };
        let regions = self.regions.read().expect("regions lock");
        let fresh_after = self
            .stale_after
            .map(|d| regions.newest_ms.saturating_sub(d.as_millis() as u64));
        let mut out: Vec<RegionState> = regions
            .names
            .iter()
            .enumerate()
            .map(|(id, name)| {
                let view_ms = regions.fresh_ms[id];
                RegionState {
                    name: name.clone(),
                    view_ms,
                    bridges: per_region.get(&(id as RegionId)).copied().unwrap_or(0),
                    stale: fresh_after.is_some_and(|after| view_ms == 0 || view_ms < after),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn stats(&self) -> TableStats {
        // One lock at a time (the order elsewhere is bridges, then regions).
        let bridges = self.bridges.lock().expect("bridges lock").len() as u64;
        let regions = self.regions.read().expect("regions lock").names.len() as u64;
        TableStats {
            apps: self.apps.len() as u64,
            summaries: self.summaries.load(Ordering::Relaxed),
            regions,
            bridges,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn check(&self, s: &SummaryUpdate<'_>) -> Result<(), Refused> {
        if !is_dns_label(s.app) || !is_dns_label(s.region) {
            return Err(Refused::BadName);
        }
        if s.healthy > s.total || s.total > MAX_INSTANCES {
            return Err(Refused::Counts);
        }
        let bridges = self.bridges.lock().expect("bridges lock");
        if let Some((region, _)) = bridges.get(&s.bridge) {
            let regions = self.regions.read().expect("regions lock");
            if &*regions.names[*region as usize] != s.region {
                return Err(Refused::ForeignRegion);
            }
        }
        Ok(())
    }

    /// Recompute a region's freshness from the live bridges.
    fn refresh(&self, bridges: &HashMap<u64, (RegionId, u64)>, region: RegionId) {
        let fresh = bridges
            .values()
            .filter(|(r, _)| *r == region)
            .map(|(_, ms)| *ms)
            .max()
            .unwrap_or(0);
        let newest = bridges.values().map(|(_, ms)| *ms).max().unwrap_or(0);
        let mut regions = self.regions.write().expect("regions lock");
        let before = self.changes.get().map(|_| self.stale_set(&regions));
        regions.fresh_ms[region as usize] = fresh;
        regions.newest_ms = newest;
        if let (Some(before), Some(c)) = (before, self.changes.get())
            && before != self.stale_set(&regions)
        {
            c.everything();
        }
    }

    /// Which regions lookups leave out as stale now.
    fn stale_set(&self, regions: &Regions) -> Vec<bool> {
        let Some(d) = self.stale_after else {
            return Vec::new();
        };
        let after = regions.newest_ms.saturating_sub(d.as_millis() as u64);
        regions
            .fresh_ms
            .iter()
            .map(|&f| f == 0 || f < after)
            .collect()
    }

    /// The id of `name`, interning it (and recomputing the orders) when it is new.
    fn intern(&self, name: &str) -> Result<RegionId, Refused> {
        if let Some(id) = self.region_id(name) {
            return Ok(id);
        }
        let mut r = self.regions.write().expect("regions lock");
        if let Some(id) = r.ids.get(name) {
            return Ok(*id);
        }
        if r.names.len() >= MAX_REGIONS {
            return Err(Refused::TooManyRegions);
        }
        let id = r.push(name);
        self.reorder(&mut r);
        Ok(id)
    }

    fn reorder(&self, r: &mut Regions) {
        let n = r.names.len();
        let mut by_name: Vec<usize> = (0..n).collect();
        by_name.sort_by(|&a, &b| r.names[a].cmp(&r.names[b]));
        r.by_name = ranks(&by_name, n);
        r.rank.clear();
        r.rtt.clear();
        for from in 0..n {
            let rtt: Box<[u32]> = (0..n)
                .map(|to| {
                    let (a, b) = (&r.names[from], &r.names[to]);
                    let gossip = Some(r.estimated[from][to]).filter(|ms| *ms != u32::MAX);
                    self.table
                        .measured_rtt_ms(a, b)
                        .or(gossip)
                        .or_else(|| self.table.geo_rtt_ms(a, b))
                        .unwrap_or(u32::MAX)
                })
                .collect();
            let mut order = by_name.clone();
            order.sort_by_key(|&to| rtt[to]); // stable: ties stay in name order
            r.rank.push(ranks(&order, n));
            r.rtt.push(rtt);
        }
    }
}

fn ranks(order: &[usize], n: usize) -> Box<[u32]> {
    let mut rank = vec![0u32; n];
    for (place, &region) in order.iter().enumerate() {
        rank[region] = place as u32;
    }
    rank.into_boxed_slice()
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regions::RegionSpec;

    fn table(stale: Option<Duration>) -> Table {
        let spec = |name: &str, lat: f64, lon: f64| RegionSpec {
            name: name.into(),
            lat: Some(lat),
            lon: Some(lon),
            ..RegionSpec::default()
        };
        Table::new(
            RegionTable::new(vec![
                spec("ord", 41.98, -87.90),
                spec("iad", 38.95, -77.45),
                spec("fra", 50.03, 8.57),
                spec("syd", -33.94, 151.18),
            ])
            .unwrap(),
            stale,
        )
    }

    fn put(t: &Table, app: &str, region: &str, healthy: u32, total: u32, bridge: u64) {
        t.apply_summary(SummaryUpdate {
            app,
            region,
            healthy,
            total,
            bridge,
        })
        .unwrap();
    }

    fn names(t: &Table, hits: &[Hit]) -> Vec<String> {
        hits.iter()
            .map(|h| t.region_name(h.region).unwrap().to_string())
            .collect()
    }

    #[test]
    fn lookups_answer_nearest_first_and_leave_out_empty_regions() {
        let t = table(None);
        for (i, r) in ["syd", "fra", "iad", "ord", "zzz", "aaa"]
            .iter()
            .enumerate()
        {
            put(&t, "web", r, 2, 3, i as u64);
        }
        put(&t, "web", "iad", 0, 3, 2);
        put(&t, "api", "iad", 0, 0, 2);
        let mut none = Vec::new();
        t.lookup_into("api", "ord", true, &mut none);
        assert!(none.is_empty(), "no instances at all: never listed");
        assert_eq!(
            names(&t, &t.lookup("web", "ord")),
            ["ord", "fra", "syd", "aaa", "zzz"],
            "iad has none healthy; regions outside the table come last, by name"
        );
        let mut all = Vec::new();
        t.lookup_into("web", "ord", true, &mut all);
        assert_eq!(names(&t, &all)[..3], ["ord", "iad", "fra"]);
        assert_eq!(all[0].rtt_ms, Some(0));
        assert!(all[3].rtt_ms.unwrap() > 100, "syd is far from ord");
        assert_eq!(all[4].rtt_ms, None, "aaa is not in the table");
        // From a region nobody knows: by name.
        assert_eq!(
            names(&t, &t.lookup("web", "mars")),
            ["aaa", "fra", "ord", "syd", "zzz"]
        );
        assert!(t.lookup("nope", "ord").is_empty());
        t.remove_summary("web", "ord");
        assert_eq!(names(&t, &t.lookup("web", "ord"))[0], "fra");
        assert_eq!(t.stats().summaries, 6);
    }

    #[test]
    fn gossip_estimates_order_regions_before_geography_and_after_measurements() {
        // No coordinates at all in this table: only gossip's estimates can order it.
        let t = Table::new(
            RegionTable::new(
                ["a", "b", "c"]
                    .iter()
                    .map(|n| RegionSpec {
                        name: (*n).into(),
                        ..RegionSpec::default()
                    })
                    .collect(),
            )
            .unwrap(),
            None,
        );
        let changes = t.track_changes();
        for r in ["a", "b", "c"] {
            put(&t, "web", r, 1, 1, 0);
        }
        changes.take();
        assert_eq!(names(&t, &t.lookup("web", "c")), ["c", "a", "b"], "by name");
        fn est(ms: &[(&'static str, &'static str, u32)]) -> impl Fn(&str, &str) -> Option<u32> {
            let ms = ms.to_vec();
            move |x: &str, y: &str| {
                ms.iter()
                    .find(|(a, b, _)| (*a == x && *b == y) || (*a == y && *b == x))
                    .map(|(_, _, v)| *v)
            }
        }
        assert!(t.set_estimated_rtts(&est(&[("c", "a", 90), ("c", "b", 20), ("a", "b", 70)])));
        assert_eq!(names(&t, &t.lookup("web", "c")), ["c", "b", "a"]);
        assert_eq!(t.lookup("web", "c")[1].rtt_ms, Some(20));
        assert!(
            changes.take().everything,
            "every app's order may have changed"
        );
        // Noise (within 10 % or 2 ms) moves nothing.
        assert!(!t.set_estimated_rtts(&est(&[("c", "a", 85), ("c", "b", 21), ("a", "b", 70)])));
        assert_eq!(t.lookup("web", "c")[1].rtt_ms, Some(20));
        assert!(!changes.take().everything);
        // A configured measurement wins over gossip's estimate.
        let mut a = RegionSpec {
            name: "a".into(),
            ..RegionSpec::default()
        };
        a.rtt_ms.insert("c".into(), 5);
        let t2 = Table::new(
            RegionTable::new(vec![
                a,
                RegionSpec {
                    name: "b".into(),
                    ..RegionSpec::default()
                },
                RegionSpec {
                    name: "c".into(),
                    ..RegionSpec::default()
                },
            ])
            .unwrap(),
            None,
        );
        for r in ["a", "b", "c"] {
            put(&t2, "web", r, 1, 1, 0);
        }
        t2.set_estimated_rtts(&est(&[("c", "a", 90), ("c", "b", 20)]));
        assert_eq!(names(&t2, &t2.lookup("web", "c")), ["c", "a", "b"]);
    }

    #[test]
    fn changes_name_each_app_once_with_whether_it_existed() {
        let t = table(None);
        let changes = t.track_changes();
        put(&t, "web", "ord", 1, 2, 0);
        put(&t, "web", "fra", 1, 1, 0);
        put(&t, "api", "ord", 0, 1, 0);
        let mut got = changes.take();
        got.apps.sort();
        assert_eq!(
            got.apps,
            vec![("api".into(), false), ("web".into(), false)],
            "new apps: did not exist before their first change"
        );
        // The same summary again changes nothing.
        put(&t, "web", "ord", 1, 2, 0);
        assert!(changes.take().apps.is_empty());
        t.remove_summary("api", "ord");
        assert_eq!(changes.take().apps, vec![("api".into(), true)]);
        assert!(!t.app_exists("api"));
        assert!(t.app_exists("web"));
    }

    #[test]
    fn bad_summaries_and_foreign_regions_are_refused_and_change_nothing() {
        let t = table(None);
        t.apply_bridge(7, "ord", 1).unwrap();
        put(&t, "web", "ord", 1, 1, 7);
        let bad = [
            ("Web", "ord", 1, 1, 7, Refused::BadName),
            ("web", "o rd", 1, 1, 7, Refused::BadName),
            ("web", "ord", 2, 1, 7, Refused::Counts),
            ("web", "fra", 1, 1, 7, Refused::ForeignRegion),
        ];
        for (app, region, healthy, total, bridge, why) in bad {
            let r = t.apply_summary(SummaryUpdate {
                app,
                region,
                healthy,
                total,
                bridge,
            });
            assert_eq!(r, Err(why));
        }
        assert_eq!(t.apply_bridge(7, "fra", 2), Err(Refused::ForeignRegion));
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["ord"]);
        assert_eq!(t.stats().refused, 5);
    }

    #[test]
    fn stale_regions_and_regions_without_a_live_bridge_are_left_out() {
        let t = table(Some(Duration::from_secs(10)));
        put(&t, "web", "ord", 1, 1, 1);
        put(&t, "web", "fra", 1, 1, 2);
        assert!(t.lookup("web", "ord").is_empty(), "no bridge heartbeat yet");
        let now = wall_ms();
        t.apply_bridge(1, "ord", now).unwrap();
        t.apply_bridge(2, "fra", now - 60_000).unwrap();
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["ord"], "fra is stale");
        let states: Vec<(String, u64, u32, bool)> = t
            .region_states()
            .into_iter()
            .map(|r| (r.name.to_string(), r.view_ms, r.bridges, r.stale))
            .collect();
        assert_eq!(
            states,
            [
                ("fra".to_owned(), now - 60_000, 1, true),
                ("iad".to_owned(), 0, 0, true),
                ("ord".to_owned(), now, 1, false),
                ("syd".to_owned(), 0, 0, true),
            ],
            "operators see the same"
        );
        t.apply_bridge(3, "fra", now).unwrap();
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["ord", "fra"]);
        t.remove_bridge(3);
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["ord"]);
        assert_eq!(t.region_view_ms(t.region_id("ord").unwrap()), now);
        // Every view stops (this edge is cut off from everything): nothing is stale relative
        // to the freshest, so it answers from its last known state.
        let cut = table(Some(Duration::from_secs(10)));
        put(&cut, "web", "ord", 1, 1, 1);
        put(&cut, "web", "fra", 1, 1, 2);
        cut.apply_bridge(1, "ord", now - 3_600_000).unwrap();
        cut.apply_bridge(2, "fra", now - 3_600_000).unwrap();
        assert_eq!(names(&cut, &cut.lookup("web", "ord")), ["ord", "fra"]);
    }

    #[test]
    fn a_snapshot_sweeps_what_it_did_not_write() {
        let t = table(None);
        put(&t, "web", "ord", 1, 1, 1);
        put(&t, "web", "fra", 1, 1, 2);
        put(&t, "api", "fra", 1, 1, 2);
        t.apply_bridge(1, "ord", 5).unwrap();
        t.apply_bridge(2, "fra", 5).unwrap();
        t.begin_snapshot();
        put(&t, "web", "fra", 3, 3, 2);
        // Lookups still see the old state of what the snapshot has not reached.
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["ord", "fra"]);
        t.end_snapshot(&[2].into());
        assert_eq!(names(&t, &t.lookup("web", "ord")), ["fra"]);
        assert!(t.lookup("api", "ord").is_empty());
        let s = t.stats();
        assert_eq!((s.apps, s.summaries, s.bridges), (1, 1, 1));
    }

    #[test]
    fn a_summary_from_65536_snapshots_ago_is_still_swept() {
        let t = table(None);
        put(&t, "web", "ord", 1, 1, 1);
        // Snapshots that began and never ended (streams cut mid-snapshot), enough for the
        // 16-bit generation to come round to the summary's.
        for _ in 0..u32::from(u16::MAX) {
            t.begin_snapshot();
        }
        t.begin_snapshot();
        put(&t, "api", "fra", 1, 1, 2);
        t.end_snapshot(&[2].into());
        assert!(
            t.lookup("web", "ord").is_empty(),
            "the stale summary was not swept"
        );
        assert_eq!(t.stats().summaries, 1);
    }
}
