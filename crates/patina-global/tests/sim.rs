//! The global tier in the engine's seeded simulator: many regions, two or three bridges each
//! that see their region with random lag, crash and restart; edges that only listen. Every
//! edge must end with exactly the summaries that the regions' true states give, and the
//! summary standing for a key must never go back to an older view.
//!
//! `PATINA_SIM_SEED=N` replays one seed; `PATINA_SIM_RUNS=N` runs that many (default 3).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use patina_global::SummaryKind;
use patina_global::bridge::{BridgeCore, Held, Standing, Timing};
use patina_global::record::{BRIDGES_GROUP, bridge_key, decode_summary, summary_key};
use patina_gossip::sim::{Net, World};
use patina_gossip::{ClusterName, Config};
use patina_proto::v1::watch_response::Kind;
use patina_proto::v1::{
    BridgeRecord, Health, Machine, MachineChange, MachineDeleted, MachineState, SummaryRecord,
    WatchResponse, machine_change,
};
use patina_store::Filter;
use prost::Message;
use rand::RngExt;

const EDGES: usize = 8;
const REGIONS: usize = 6;
const APPS: usize = 6;
const MACHINES_PER_APP: usize = 4;
const STEP: Duration = Duration::from_millis(20);

fn seeds() -> Vec<u64> {
    patina_gossip::sim::seeds(3, 0x610b_0000)
}

fn region_name(r: usize) -> String {
    format!("r{r}")
}

fn app_name(a: usize) -> String {
    format!("app{a}")
}

/// The region agents' clock at virtual time `now` (the stores' wall clock too).
fn region_hlc(now: Duration) -> u64 {
    (patina_gossip::sim::SIM_EPOCH_MS + now.as_millis() as u64) << 16
}

/// One region's true state: machine id -> (app, routable).
#[derive(Default)]
struct Region {
    machines: BTreeMap<String, (usize, bool)>,
}

impl Region {
    fn truth(&self, app: usize) -> (u32, u32) {
        let mine = self.machines.values().filter(|(a, _)| *a == app);
        let total = mine.clone().count() as u32;
        let healthy = mine.filter(|(_, r)| *r).count() as u32;
        (healthy, total)
    }

    fn snapshot(&self, region: &str, now: Duration) -> Vec<WatchResponse> {
        let changes = self
            .machines
            .iter()
            .map(|(id, (app, routable))| upsert(id, *app, region, *routable))
            .collect();
        vec![
            WatchResponse {
                kind: Kind::Snapshot as i32,
                reset: true,
                changes,
                resume_token: String::new(),
                view_hlc: region_hlc(now),
                region: region.to_owned(),
                view: stands(),
            },
            WatchResponse {
                kind: Kind::SnapshotDone as i32,
                view_hlc: region_hlc(now),
                region: region.to_owned(),
                view: stands(),
                ..WatchResponse::default()
            },
        ]
    }
}

/// The view of a simulated region agent: it stands (the simulation's regions are the truth).
fn stands() -> Option<patina_proto::v1::ViewStatus> {
    Some(patina_proto::v1::ViewStatus {
        stands: true,
        ..Default::default()
    })
}

fn upsert(id: &str, app: usize, region: &str, routable: bool) -> MachineChange {
    MachineChange {
        change: Some(machine_change::Change::Upserted(Machine {
            id: id.to_owned(),
            app: app_name(app),
            region: region.to_owned(),
            host: "h".into(),
            state: MachineState::Started as i32,
            health: if routable {
                Health::Passing as i32
            } else {
                Health::Critical as i32
            },
            ..Machine::default()
        })),
    }
}

struct Bridge {
    node: usize,
    region: usize,
    core: Option<BridgeCore>,
    inbox: VecDeque<(Duration, WatchResponse)>,
    /// Most lag this bridge sees its region with.
    max_lag: Duration,
    last_heartbeat: Duration,
    seen: BTreeMap<usize, Standing>,
}

struct Sim {
    w: World,
    regions: Vec<Region>,
    bridges: Vec<Bridge>,
    /// Per edge and key: the newest view that stood (it must never go back).
    stood: Vec<BTreeMap<String, u64>>,
    /// Zero summaries deleted by bridges.
    deletes: usize,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim::with_config(seed, true)
    }

    fn with_config(seed: u64, fail_static: bool) -> Sim {
        let mut layout = Vec::new();
        for r in 0..REGIONS {
            for _ in 0..(2 + r % 2) {
                layout.push(r);
            }
        }
        let n = EDGES + layout.len();
        let cfg = Config {
            fail_static,
            ..Config::lan(ClusterName::new("global").unwrap())
        };
        // A WAN: 5 to 80 ms one way, some loss and duplication.
        let net = Net {
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(80),
            loss: 0.02,
            duplicate: 0.01,
            latency: None,
        };
        let mut w = World::with_kind(n, cfg, net, seed, Arc::new(SummaryKind::default()));
        let bridges = layout
            .into_iter()
            .enumerate()
            .map(|(i, region)| {
                let max_lag = Duration::from_millis(w.rng().random_range(0..800));
                Bridge {
                    node: EDGES + i,
                    region,
                    core: None,
                    inbox: VecDeque::new(),
                    max_lag,
                    last_heartbeat: Duration::ZERO,
                    seen: BTreeMap::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            w,
            regions: (0..REGIONS).map(|_| Region::default()).collect(),
            bridges,
            stood: vec![BTreeMap::new(); EDGES],
            deletes: 0,
        };
        for b in 0..sim.bridges.len() {
            sim.boot_bridge(b);
        }
        sim
    }

    /// A (re)started bridge: register, then a snapshot of its region arrives with its lag.
    fn boot_bridge(&mut self, b: usize) {
        let now = self.w.now;
        let (node, region) = (self.bridges[b].node, self.bridges[b].region);
        let name = region_name(region);
        let key = bridge_key(self.w.node_id(node));
        if self.w.store(node).get_live(&key).is_none() {
            let hb = BridgeRecord {
                region: name.clone(),
                view_hlc: 0,
                ..Default::default()
            };
            self.w.write(node, &key, BRIDGES_GROUP, &hb.encode_to_vec());
        }
        let lag = self.lag(b);
        let snapshot = self.regions[region].snapshot(&name, now);
        let bridge = &mut self.bridges[b];
        // Zero summaries are deleted after 62 s here (the least that beats the deletion's
        // one-minute set-back), so that deletions happen in the run.
        bridge.core = Some(BridgeCore::new(Timing {
            zero_retain: Duration::from_secs(62),
            ..Timing::default()
        }));
        bridge.inbox.clear();
        bridge.seen.clear();
        for msg in snapshot {
            bridge.inbox.push_back((now + lag, msg));
        }
    }

    fn lag(&mut self, b: usize) -> Duration {
        let max = self.bridges[b].max_lag.as_millis() as u64;
        Duration::from_millis(self.w.rng().random_range(0..=max))
    }

    /// A change in region `r`, streamed to its live bridges with their lags (in order).
    fn change(&mut self, r: usize, change: MachineChange) {
        let now = self.w.now;
        let msg = WatchResponse {
            kind: Kind::Delta as i32,
            changes: vec![change],
            view_hlc: region_hlc(now),
            region: region_name(r),
            view: stands(),
            ..WatchResponse::default()
        };
        self.send(r, msg);
    }

    fn send(&mut self, r: usize, msg: WatchResponse) {
        let now = self.w.now;
        for b in 0..self.bridges.len() {
            if self.bridges[b].region != r || self.bridges[b].core.is_none() {
                continue;
            }
            let lag = self.lag(b);
            let inbox = &mut self.bridges[b].inbox;
            let at = inbox.back().map_or(now + lag, |(t, _)| (*t).max(now + lag));
            inbox.push_back((at, msg.clone()));
        }
    }

    fn random_change(&mut self) {
        let r = self.w.rng().random_range(0..REGIONS);
        let app = self.w.rng().random_range(0..APPS);
        if (r, app) == (0, 0) {
            return; // decommissioned in `run`
        }
        let m = self.w.rng().random_range(0..MACHINES_PER_APP);
        let id = format!("{}-m{m}", app_name(app));
        let name = region_name(r);
        let change = if self.w.rng().random_bool(0.25) {
            self.regions[r].machines.remove(&id);
            MachineChange {
                change: Some(machine_change::Change::Deleted(MachineDeleted {
                    id,
                    app: app_name(app),
                    version: None,
                })),
            }
        } else {
            let routable = self.w.rng().random_bool(0.6);
            self.regions[r].machines.insert(id.clone(), (app, routable));
            upsert(&id, app, &name, routable)
        };
        self.change(r, change);
    }

    /// Drive every live bridge one step: deliver what is due, tell it what stands, publish.
    fn drive_bridges(&mut self) {
        let now = self.w.now;
        if now.as_millis() % 1000 < STEP.as_millis() {
            // Each region's Watch heartbeat.
            for r in 0..REGIONS {
                let msg = WatchResponse {
                    kind: Kind::Delta as i32,
                    view_hlc: region_hlc(now),
                    region: region_name(r),
                    view: stands(),
                    ..WatchResponse::default()
                };
                self.send(r, msg);
            }
        }
        for b in 0..self.bridges.len() {
            let node = self.bridges[b].node;
            if self.bridges[b].core.is_none() || !self.w.is_up(node) {
                continue;
            }
            let region = region_name(self.bridges[b].region);
            while self.bridges[b]
                .inbox
                .front()
                .is_some_and(|(t, _)| *t <= now)
            {
                let (_, msg) = self.bridges[b].inbox.pop_front().unwrap();
                self.bridges[b]
                    .core
                    .as_mut()
                    .unwrap()
                    .region_message(now, &msg);
            }
            for app in 0..APPS {
                let standing = self.standing_at(node, app, &region);
                if self.bridges[b].seen.get(&app) != Some(&standing) {
                    self.bridges[b].seen.insert(app, standing);
                    let core = self.bridges[b].core.as_mut().unwrap();
                    core.global_summary(now, &app_name(app), standing);
                }
            }
            let due = self.bridges[b].core.as_mut().unwrap().due(now);
            for p in due {
                let value = SummaryRecord {
                    region: region.clone(),
                    healthy: p.counts.healthy,
                    total: p.counts.total,
                    view_hlc: p.view_hlc,
                    ..Default::default()
                };
                let key = summary_key(&p.app, &region);
                let written = if p.delete {
                    self.w.delete(node, &key)
                } else {
                    self.w.write(node, &key, &p.app, &value.encode_to_vec())
                };
                if written {
                    self.deletes += usize::from(p.delete);
                    self.bridges[b].core.as_mut().unwrap().published(now, &p);
                } else {
                    self.bridges[b].core.as_mut().unwrap().lost(&p);
                }
            }
            let core = self.bridges[b].core.as_ref().unwrap();
            if core.synced() && now >= self.bridges[b].last_heartbeat + Duration::from_secs(2) {
                let hb = BridgeRecord {
                    region: region.clone(),
                    view_hlc: core.view_hlc(),
                    ..Default::default()
                };
                let key = bridge_key(self.w.node_id(node));
                self.w.write(node, &key, BRIDGES_GROUP, &hb.encode_to_vec());
                self.bridges[b].last_heartbeat = now;
            }
        }
    }

    /// What stands at node `i` for (app, region), as a bridge's watch of its store says.
    fn standing_at(&self, i: usize, app: usize, region: &str) -> Standing {
        let key = summary_key(&app_name(app), region);
        match (
            self.w.store(i).get_live(&key),
            self.standing(i, app, region),
        ) {
            (_, Some((s, _))) => Standing::Summary(Held {
                counts: patina_global::bridge::Counts {
                    healthy: s.healthy,
                    total: s.total,
                },
                view_hlc: s.view_hlc,
            }),
            (Some(_), None) => Standing::Hidden,
            (None, None) => Standing::Nothing,
        }
    }

    /// The summary node `i` serves for (app, region), if one stands and its owner is up there.
    fn standing(&self, i: usize, app: usize, region: &str) -> Option<(SummaryRecord, u64)> {
        let key = summary_key(&app_name(app), region);
        self.w
            .store(i)
            .list(&app_name(app), Filter::All)
            .into_iter()
            .find(|e| e.key() == key)
            .and_then(|e| {
                let s = decode_summary(e.value()?).ok()?;
                let v = s.view_hlc;
                Some((s, v))
            })
    }

    /// Record what every edge serves; a key's view must never go back.
    fn check_monotone(&mut self) {
        for edge in 0..EDGES {
            for app in 0..APPS {
                for r in 0..REGIONS {
                    let Some((_, view)) = self.standing(edge, app, &region_name(r)) else {
                        continue;
                    };
                    let key = summary_key(&app_name(app), &region_name(r));
                    let best = self.stood[edge].entry(key.clone()).or_insert(0);
                    assert!(
                        view >= *best,
                        "edge {edge}: {key} went back from view {best} to {view}"
                    );
                    *best = view;
                }
            }
        }
    }

    fn step(&mut self) {
        self.drive_bridges();
        self.w.run_for(STEP);
        self.check_monotone();
    }

    /// Every edge's summaries, as (app, region) -> (healthy, total), those with instances.
    fn served(&self, edge: usize) -> BTreeMap<(usize, usize), (u32, u32)> {
        let mut out = BTreeMap::new();
        for app in 0..APPS {
            for r in 0..REGIONS {
                if let Some((s, _)) = self.standing(edge, app, &region_name(r))
                    && s.total > 0
                {
                    out.insert((app, r), (s.healthy, s.total));
                }
            }
        }
        out
    }

    fn truth(&self) -> BTreeMap<(usize, usize), (u32, u32)> {
        let mut out = BTreeMap::new();
        for app in 0..APPS {
            for (r, region) in self.regions.iter().enumerate() {
                let (h, t) = region.truth(app);
                if t > 0 {
                    out.insert((app, r), (h, t));
                }
            }
        }
        out
    }
}

fn run(seed: u64) {
    let mut sim = Sim::new(seed);
    // Let membership form.
    for _ in 0..100 {
        sim.step();
    }
    // An app leaves a region altogether: its summary goes to zero, then (62 s later, well
    // before the end) is deleted. The random changes leave that app and region alone.
    sim.regions[0].machines.insert("app0-x".into(), (0, true));
    sim.change(0, upsert("app0-x", 0, "r0", true));
    for _ in 0..100 {
        sim.step();
    }
    let gone: Vec<String> = sim.regions[0]
        .machines
        .iter()
        .filter(|(_, (app, _))| *app == 0)
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        sim.regions[0].machines.remove(&id);
        let change = MachineChange {
            change: Some(machine_change::Change::Deleted(MachineDeleted {
                id,
                app: app_name(0),
                version: None,
            })),
        };
        sim.change(0, change);
    }
    let mut down_until: BTreeMap<usize, Duration> = BTreeMap::new();
    let mut healed_at: Option<Duration> = None;
    // 40 s of changes (about 10 a second over all regions), crashes and restarts.
    for _ in 0..2_000 {
        if sim.w.rng().random_bool(0.2) {
            sim.random_change();
        }
        let now = sim.w.now;
        if sim.w.rng().random_bool(0.004) {
            let b = sim.w.rng().random_range(0..sim.bridges.len());
            let region = sim.bridges[b].region;
            let alive = sim
                .bridges
                .iter()
                .filter(|x| x.region == region && x.core.is_some())
                .count();
            // Crash it unless it is its region's last bridge, or one of the region whose
            // decommissioned app's zero must stand long enough to be deleted (a takeover
            // stamps it anew).
            if sim.bridges[b].core.is_some() && alive > 1 && region != 0 {
                sim.w.crash(sim.bridges[b].node);
                sim.bridges[b].core = None;
                let back = Duration::from_millis(sim.w.rng().random_range(500..8_000));
                down_until.insert(b, now + back);
            }
        }
        let due: Vec<usize> = down_until
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(b, _)| *b)
            .collect();
        for b in due {
            down_until.remove(&b);
            sim.w.restart(sim.bridges[b].node);
            sim.boot_bridge(b);
        }
        // Now and then one bridge is cut off from everyone for a few seconds: it goes on
        // publishing what it sees (with its lag) while the others take over its summaries,
        // and the two sides' summaries meet when it heals.
        match healed_at {
            Some(t) if t <= now => {
                sim.w.heal();
                healed_at = None;
            }
            None if sim.w.rng().random_bool(0.003) => {
                let b = sim.w.rng().random_range(0..sim.bridges.len());
                let node = sim.bridges[b].node;
                if sim.bridges[b].region == 0 {
                    sim.step();
                    continue; // as above: region 0's zero must stand
                }
                let others: Vec<usize> = (0..sim.w.len()).filter(|i| *i != node).collect();
                sim.w.partition(&[node], &others);
                healed_at =
                    Some(now + Duration::from_millis(sim.w.rng().random_range(1_000..4_000)));
            }
            _ => {}
        }
        sim.step();
    }
    sim.w.heal();
    // Bridges still down stay down: their summaries must be taken over. Quiet time.
    for _ in 0..1_500 {
        sim.step();
    }
    let truth = sim.truth();
    assert!(truth.len() > REGIONS, "the scenario made apps: {truth:?}");
    assert!(
        sim.deletes > 0,
        "zero summaries were deleted during the run"
    );
    for edge in 0..EDGES {
        assert_eq!(
            sim.served(edge),
            truth,
            "edge {edge} differs from the regions' true state (seed {seed})"
        );
    }
}

#[test]
fn every_edge_converges_to_the_regions_true_state() {
    for seed in seeds() {
        if let Err(e) = std::panic::catch_unwind(|| run(seed)) {
            eprintln!(
                "global simulation failed; rerun with PATINA_SIM_SEED={seed} cargo test -p patina-global --test sim"
            );
            std::panic::resume_unwind(e);
        }
    }
}

/// Fail static: an edge cut off from the whole cluster for 80 s keeps every summary it had
/// (the membership declares every bridge down, but it is the one alone); once healed it
/// follows again. Without `fail_static` it hides them.
fn cut_off_edge(seed: u64, fail_static: bool) -> (usize, usize) {
    let mut sim = Sim::with_config(seed, fail_static);
    for _ in 0..100 {
        sim.step();
    }
    for _ in 0..60 {
        sim.random_change();
        sim.step();
    }
    for _ in 0..300 {
        sim.step();
    }
    let before = sim.served(0);
    assert_eq!(before, sim.truth(), "converged before the cut");
    let others: Vec<usize> = (1..sim.w.len()).collect();
    sim.w.partition(&[0], &others);
    // 80 s alone: longer than failure detection takes to declare every member down, and
    // longer than the minute over which members count towards a majority.
    for _ in 0..4_000 {
        sim.step();
    }
    let alone = sim.served(0).len();
    sim.w.heal();
    for _ in 0..20 {
        sim.random_change();
        sim.step();
    }
    for _ in 0..1_500 {
        sim.step();
    }
    assert_eq!(
        sim.served(0),
        sim.truth(),
        "edge 0 follows again once healed"
    );
    (before.len(), alone)
}

#[test]
fn an_edge_cut_off_from_everyone_keeps_answering_from_its_last_known_state() {
    let seed = seeds()[0];
    let (before, alone) = cut_off_edge(seed, true);
    assert_eq!(alone, before, "seed {seed}: summaries served while cut off");
    // The same cut without fail static hides the summaries of every bridge declared down
    // meanwhile (its probes slow down as its own health drops, so not all of them in 20 s):
    // the test can tell.
    let (before, alone) = cut_off_edge(seeds()[0], false);
    assert!(alone < before, "without fail static: {alone} of {before}");
}
