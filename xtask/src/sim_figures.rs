//! The deterministic simulation's figures for `bench propagation`: how long a change takes to
//! reach 99.9 % of a cluster of N simulated nodes, in milliseconds of virtual time and in
//! probe periods (SWIM's rounds), and what gossip costs per node when idle.

use std::time::Duration;

use patina_gossip::sim::{Net, World};
use patina_gossip::{ClusterName, Config};

/// (rounds, milliseconds, idle bytes per second per node) for `n` nodes; `seed` fixes the run.
pub fn spread(n: usize, seed: u64) -> (u64, f64, f64) {
    let cfg = Config::lan(ClusterName::new("sim").expect("name"));
    let period = cfg.probe_period;
    let mut w = World::new(n, cfg, Net::lan(), seed);
    // Let the membership form (everyone joins through two seeds).
    w.run_for(Duration::from_secs(if n > 500 { 30 } else { 10 }));
    let b0 = w.datagram_bytes;
    let idle = Duration::from_secs(5);
    w.run_for(idle);
    let idle_bytes = (w.datagram_bytes - b0) as f64 / idle.as_secs_f64() / n as f64;
    w.track_learning();
    let writer = n / 2;
    let start = w.now;
    w.write(writer, "probe", "app", b"+v");
    w.run_for(Duration::from_secs(10));
    let origin = w.node_id(writer);
    let mut times: Vec<Duration> = w
        .learned_at
        .iter()
        .filter(|((o, _), _)| *o == origin)
        .flat_map(|(_, ts)| ts.iter().map(|(_, t)| *t - start))
        .collect();
    times.sort();
    let need = ((n - 1) as f64 * 0.999).ceil() as usize;
    let t = if times.len() >= need {
        times[need - 1]
    } else {
        Duration::MAX
    };
    let ms = t.as_secs_f64() * 1e3;
    let rounds = (t.as_nanos() / period.as_nanos()) as u64 + 1;
    (rounds, ms, idle_bytes)
}

/// Crash to excluded in the simulation: `runs` seeds of an `n`-node cluster, one node
/// crashed each (kill -9: its host closes its connections), each node attending `attend`
/// others; milliseconds until no other node lists its machine. Returns (p50, p99, max).
pub fn crash_to_excluded(n: usize, runs: u64, attend: usize) -> (f64, f64, f64) {
    let mut all = Vec::new();
    for seed in 0..runs {
        let mut cfg = Config::lan(ClusterName::new("sim").expect("name"));
        cfg.attend = attend;
        let mut w = World::new(n, cfg, Net::lan(), 0xc4a5 + seed);
        w.run_for(Duration::from_secs(5));
        let victim = n / 3;
        w.write(victim, "victim", "app", b"+up");
        w.run_for(Duration::from_millis(500));
        w.crash(victim);
        let start = w.now;
        let mut t = f64::INFINITY;
        // Bounded: 20 s of virtual time in 10 ms steps.
        for step in 1..=2000u64 {
            w.run_until(start + Duration::from_millis(step * 10));
            if (0..n)
                .filter(|i| *i != victim)
                .all(|i| !w.served(i).contains_key("victim"))
            {
                t = (step * 10) as f64;
                break;
            }
        }
        all.push(t);
    }
    all.sort_by(f64::total_cmp);
    let at = |p: f64| all[((p / 100.0) * (all.len() - 1) as f64).round() as usize];
    (at(50.0), at(99.0), at(100.0))
}

/// The dissemination model behind the 10,000-node figure. The full simulation gives every
/// simulated node the whole membership (foca's member list, the node's maps): O(N^2) memory
/// in one process, about 10^8 members at 10,000 nodes. This model keeps what decides how
/// fast a change spreads once the membership has converged, with the node's own parameters:
/// the origin's push to `push_fanout` members (hops 0 if that reaches everyone), forwarding
/// to `forward_fanout` members on first receipt while hops are left, and the piggybacked
/// copies (each holder sends the item on its probe and its gossip to `fanout` members once
/// per probe period, at a random phase, `max_transmissions` sends in all; a node that first
/// hears it piggybacked passes it on to `fanout` members at once), over the LAN delays of
/// `Net::lan()`, and the periodic anti-entropy session of every node with a random member
/// every `sync_interval` (jittered as the node does), which brings the change to the few
/// the gossip missed. Members are picked uniformly among all others. It is checked against the
/// full simulation at 100 and 1,000 nodes by `bench propagation`, which prints both.
/// Returns (rounds, milliseconds to 99.9 % of the others, datagrams per node).
pub fn dissemination_model(n: usize, seed: u64) -> (u64, f64, f64) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let cfg = Config::lan(ClusterName::new("sim").expect("name"));
    let net = Net::lan();
    let period = cfg.probe_period.as_nanos() as u64;
    let mut rng = SplitMix(seed);
    #[derive(PartialEq, Eq, PartialOrd, Ord)]
    enum Ev {
        /// Delivery to `to` from `from`; `hops`: a push with that many hops left, or
        /// `None`: a piggybacked copy.
        Deliver {
            to: usize,
            from: usize,
            hops: Option<u8>,
        },
        Tick {
            node: usize,
        },
        /// A periodic anti-entropy session of `node` with a random member.
        Sync {
            node: usize,
        },
    }
    let mut queue: BinaryHeap<Reverse<(u64, u64, Ev)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut has = vec![false; n];
    let mut left = vec![0u32; n];
    let mut learned: Vec<u64> = Vec::with_capacity(n);
    let mut datagrams = 0u64;
    let (lo, hi) = (
        net.min_delay.as_nanos() as u64,
        net.max_delay.as_nanos() as u64,
    );
    let mut send = |queue: &mut BinaryHeap<Reverse<(u64, u64, Ev)>>,
                    rng: &mut SplitMix,
                    now: u64,
                    from: usize,
                    k: usize,
                    exclude: Option<usize>,
                    hops: Option<u8>| {
        for to in rng.sample_others(n, from, exclude, k) {
            datagrams += 1;
            seq += 1;
            let at = now + lo + rng.below(hi - lo + 1);
            queue.push(Reverse((at, seq, Ev::Deliver { to, from, hops })));
        }
    };
    let origin = 0usize;
    has[origin] = true;
    left[origin] = u32::from(cfg.max_transmissions.get());
    let first = cfg.push_fanout.get().min(n - 1);
    let hops = if first >= n - 1 { 0 } else { cfg.push_hops };
    send(&mut queue, &mut rng, 0, origin, first, None, Some(hops));
    queue.push(Reverse((
        rng.below(period),
        u64::MAX,
        Ev::Tick { node: origin },
    )));
    let need = ((n - 1) as f64 * 0.999).ceil() as usize;
    let sync = cfg.sync_interval.as_nanos() as u64;
    let mut sessions = 0u64;
    for node in 1..n {
        let at = rng.below(sync);
        queue.push(Reverse((at, u64::MAX / 2 + node as u64, Ev::Sync { node })));
    }
    while let Some(Reverse((now, _, ev))) = queue.pop() {
        if learned.len() >= need {
            break;
        }
        match ev {
            Ev::Deliver { to, from, hops } => {
                if has[to] {
                    continue;
                }
                has[to] = true;
                learned.push(now);
                left[to] = u32::from(cfg.max_transmissions.get());
                match hops {
                    Some(h) if h > 0 => send(
                        &mut queue,
                        &mut rng,
                        now,
                        to,
                        cfg.forward_fanout.get(),
                        Some(from),
                        Some(h - 1),
                    ),
                    Some(_) => {}
                    None => {
                        let k = cfg.fanout.get();
                        left[to] = left[to].saturating_sub(k as u32);
                        send(&mut queue, &mut rng, now, to, k, Some(from), None);
                    }
                }
                let at = now + rng.below(period);
                queue.push(Reverse((at, u64::MAX - to as u64, Ev::Tick { node: to })));
            }
            Ev::Sync { node } => {
                if has[node] {
                    continue;
                }
                let peer = rng.sample_others(n, node, None, 1)[0];
                if has[peer] {
                    // Hellos both ways, then the record: about two round trips.
                    sessions += 1;
                    let at = now + 4 * (lo + rng.below(hi - lo + 1));
                    queue.push(Reverse((
                        at,
                        u64::MAX / 4 + sessions,
                        Ev::Deliver {
                            to: node,
                            from: peer,
                            hops: Some(0),
                        },
                    )));
                }
                let next = now + sync * 3 / 4 + rng.below(sync / 2);
                queue.push(Reverse((
                    next,
                    u64::MAX / 2 + node as u64,
                    Ev::Sync { node },
                )));
            }
            Ev::Tick { node } => {
                if left[node] == 0 {
                    continue;
                }
                let k = (1 + cfg.fanout.get()).min(left[node] as usize);
                left[node] -= k as u32;
                send(&mut queue, &mut rng, now, node, k, None, None);
                queue.push(Reverse((
                    now + period,
                    u64::MAX - node as u64,
                    Ev::Tick { node },
                )));
            }
        }
    }
    let t = if learned.len() >= need {
        learned[need - 1]
    } else {
        u64::MAX
    };
    let rounds = t / period + 1;
    (rounds, t as f64 / 1e6, datagrams as f64 / n as f64)
}

/// A small deterministic generator (splitmix64) for the model.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, bound: u64) -> u64 {
        if bound == 0 { 0 } else { self.next() % bound }
    }

    /// `k` distinct members other than `me` and `exclude`, uniformly (fewer if there are
    /// not that many).
    fn sample_others(
        &mut self,
        n: usize,
        me: usize,
        exclude: Option<usize>,
        k: usize,
    ) -> Vec<usize> {
        let avail = n - 1 - usize::from(exclude.is_some_and(|e| e != me));
        let k = k.min(avail);
        let mut out: Vec<usize> = Vec::with_capacity(k);
        while out.len() < k {
            let c = self.below(n as u64) as usize;
            if c != me && Some(c) != exclude && !out.contains(&c) {
                out.push(c);
            }
        }
        out
    }
}

/// The regions of the WAN world (name, latitude, longitude): 19 cities on five continents.
pub const WAN_REGIONS: [(&str, f64, f64); 19] = [
    ("iad", 38.9, -77.4),
    ("ord", 41.98, -87.9),
    ("dfw", 32.9, -97.0),
    ("lax", 33.9, -118.4),
    ("sea", 47.4, -122.3),
    ("yyz", 43.7, -79.6),
    ("mia", 25.8, -80.3),
    ("gru", -23.4, -46.5),
    ("scl", -33.4, -70.8),
    ("lhr", 51.5, -0.45),
    ("fra", 50.0, 8.6),
    ("ams", 52.3, 4.8),
    ("mad", 40.5, -3.6),
    ("waw", 52.2, 21.0),
    ("jnb", -26.1, 28.2),
    ("bom", 19.1, 72.9),
    ("sin", 1.36, 103.99),
    ("nrt", 35.8, 140.4),
    ("syd", -33.9, 151.2),
];

/// Great-circle distance in km.
fn km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (la1, lo1, la2, lo2) = (
        a.0.to_radians(),
        a.1.to_radians(),
        b.0.to_radians(),
        b.1.to_radians(),
    );
    let h = ((la2 - la1) / 2.0).sin().powi(2)
        + la1.cos() * la2.cos() * ((lo2 - lo1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().asin()
}

/// What [`wan_spread`] measured.
#[derive(Debug)]
pub struct WanFigures {
    /// Per change (one from each region's bridge, its origin's tree formed).
    pub changes: Vec<ChangeFigures>,
    /// Per bridge, its first change (the flood that forms its tree).
    pub first: Vec<ChangeFigures>,
    /// Tree dissemination's prunes and grafts sent, summed over the nodes.
    pub prunes: u64,
    pub grafts: u64,
    /// Inbound tree links that gave their slot to a member asking for one (silent 60 s).
    pub inbound_replaced: u64,
    /// Datagram bytes the changes added, per change and per node (idle traffic taken out).
    pub bytes_per_change_per_node: f64,
    /// Idle datagram bytes per second per node.
    pub idle_bytes_per_s: f64,
    /// Nodes whose membership held every other node when the changes were written.
    pub converged: usize,
    pub nodes: usize,
    /// Per crashed edge (after the changes; `crashes` of them, one at a time): milliseconds
    /// until every other node took it for down (infinite if some never did in 20 s).
    pub crash_to_excluded: Vec<f64>,
    /// Times some node took a member for down before any crash, and renewals (a member that
    /// found itself declared down and came back under a new epoch): false downs.
    pub false_downs: u64,
    pub renewals: u64,
}

/// One change in the WAN world: milliseconds until 50 %, 90 % and 99.9 % of the edges held
/// it, and the one-way latency from its bridge to the farthest edge.
#[derive(Debug, Clone, Copy)]
pub struct ChangeFigures {
    pub p50: f64,
    pub p90: f64,
    pub p999: f64,
    pub floor: f64,
}

/// Ratios of each change's 99.9 % time to its floor, sorted.
pub fn ratios(changes: &[ChangeFigures]) -> Vec<f64> {
    let mut r: Vec<f64> = changes.iter().map(|c| c.p999 / c.floor).collect();
    r.sort_by(f64::total_cmp);
    r
}

/// The WAN world of issue 20: one bridge at each of 19 regions' cities and `edges` edges
/// spread over them (edge `e` near region `e % 19`, up to 2 degrees away each way), one-way
/// latency 4 ms + great-circle distance / 75 km per ms, plus 0-200 µs of jitter. Every node
/// is a member of one gossip cluster with `cfg`, formed at the start. After a minute
/// (`PATINA_WAN_SETTLE_SECS` sets another) and 10 s of idle traffic measured, each bridge
/// writes a first change (0.5 s apart), then, after 20 s of quiet, one more each, 3 s apart,
/// and 20 s more for their bytes; each change's time to 99.9 % of the edges is compared with
/// the one-way latency from its bridge to the farthest edge.
pub fn wan_spread(edges: usize, cfg: Config, seed: u64, crashes: usize) -> WanFigures {
    let regions = WAN_REGIONS.len();
    let mut rng = SplitMix(seed ^ 0x3a7);
    let mut places: Vec<(f64, f64)> = WAN_REGIONS.iter().map(|(_, la, lo)| (*la, *lo)).collect();
    for e in 0..edges {
        let (_, la, lo) = WAN_REGIONS[e % regions];
        let d = |rng: &mut SplitMix| (rng.below(4001) as f64 - 2000.0) / 1000.0;
        places.push((la + d(&mut rng), lo + d(&mut rng)));
    }
    let n = places.len();
    let places = std::sync::Arc::new(places);
    let one_way = {
        let places = places.clone();
        move |i: usize, j: usize| match (places.get(i), places.get(j)) {
            (Some(a), Some(b)) if i != j => {
                Duration::from_secs_f64((4.0 + km(*a, *b) / 75.0) / 1e3)
            }
            _ => Duration::ZERO,
        }
    };
    let net = Net {
        min_delay: Duration::ZERO,
        max_delay: Duration::from_micros(200),
        loss: 0.0,
        duplicate: 0.0,
        latency: Some(patina_gossip::sim::Latency::new(one_way.clone())),
    };
    let mut w = World::new(n, cfg, net, seed);
    // A formed cluster (joins are not what is measured), then a minute of sessions: each
    // node's coordinate settles and it learns its peers'.
    w.form();
    let settle: u64 = std::env::var("PATINA_WAN_SETTLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    w.run_for(Duration::from_secs(settle));
    let converged = (0..n)
        .filter(|i| w.node(*i).is_some_and(|nd| nd.active().len() == n - 1))
        .count();
    let need = ((edges as f64) * 0.999).ceil() as usize;
    // One change's figures: ms until 50 %, 90 % and 99.9 % of the edges held it, and the
    // one-way floor from its bridge to the farthest edge.
    let figures = |w: &World, b: usize, at: Duration| -> ChangeFigures {
        let origin = w.node_id(b);
        let mut times: Vec<f64> = w
            .learned_at
            .iter()
            .filter(|((o, _), _)| *o == origin)
            .flat_map(|(_, ts)| ts.iter())
            .filter(|(i, _)| *i >= regions)
            .map(|(_, t)| (*t - at).as_secs_f64() * 1e3)
            .collect();
        times.sort_by(f64::total_cmp);
        let at_count = |k: usize| times.get(k - 1).copied().unwrap_or(f64::INFINITY);
        ChangeFigures {
            p50: at_count(edges.div_ceil(2)),
            p90: at_count((edges * 9).div_ceil(10)),
            p999: at_count(need),
            floor: (regions..n)
                .map(|e| one_way(b, e))
                .max()
                .unwrap_or_default()
                .as_secs_f64()
                * 1e3,
        }
    };
    // Idle traffic, before any change (after one, its piggybacked copies go on for up to
    // `max_transmissions` probe periods and would count as idle).
    let idle = Duration::from_secs(10);
    let b0 = w.datagram_bytes;
    w.run_for(idle);
    let idle_rate = (w.datagram_bytes - b0) as f64 / idle.as_secs_f64();
    // A first change from each bridge: its flood forms its origin's tree (measured apart).
    w.track_learning();
    let mut first_at = Vec::new();
    for b in 0..regions {
        first_at.push((b, w.now));
        w.write(b, &format!("first-{b}"), "app", b"+v");
        w.run_for(Duration::from_millis(500));
    }
    // Quiet until the first changes' piggybacked copies are spent (16 sends at most, one per
    // probe period), so that they do not count toward the next changes' bytes.
    w.run_for(Duration::from_secs(20));
    let first: Vec<ChangeFigures> = first_at
        .iter()
        .map(|(b, at)| figures(&w, *b, *at))
        .collect();
    w.learned_at.clear();
    let spacing = Duration::from_secs(3);
    let start = w.now;
    let b1 = w.datagram_bytes;
    let mut written = Vec::new();
    for b in 0..regions {
        written.push((b, w.now));
        w.write(b, &format!("change-{b}"), "app", b"+v");
        w.run_for(spacing);
    }
    w.run_for(Duration::from_secs(20));
    let window = (w.now - start).as_secs_f64();
    let added = (w.datagram_bytes - b1) as f64 - idle_rate * window;
    let changes: Vec<ChangeFigures> = written.iter().map(|(b, at)| figures(&w, *b, *at)).collect();
    let (prunes, grafts, inbound_replaced) =
        (0..n)
            .filter_map(|i| w.node(i))
            .fold((0, 0, 0), |(p, g, r), nd| {
                let c = nd.counters();
                (
                    p + c.tree_prunes_sent,
                    g + c.tree_grafts_sent,
                    r + c.tree_inbound_replaced,
                )
            });
    let false_downs: u64 = w.downs.values().sum();
    let renewals: u64 = w.renewals.values().sum();
    // Crashed edges, spread over the regions, one at a time.
    let mut crash_to_excluded = Vec::new();
    let mut down = std::collections::BTreeSet::new();
    for k in 0..crashes {
        let victim = regions + (k * 7919 + 13) % edges;
        if !down.insert(victim) {
            continue;
        }
        crash_to_excluded.push(crash_and_wait(&mut w, victim, &down));
    }
    WanFigures {
        changes,
        first,
        prunes,
        grafts,
        inbound_replaced,
        bytes_per_change_per_node: added / regions as f64 / n as f64,
        idle_bytes_per_s: idle_rate / n as f64,
        converged,
        nodes: n,
        crash_to_excluded,
        false_downs,
        renewals,
    }
}

/// Crash node `victim` (kill -9: its host refuses connections) and run until every running
/// node other than those in `down` took its owner for down, in 10 ms steps for at most 20 s
/// of virtual time: milliseconds, or infinite. Needs [`World::track_learning`].
pub fn crash_and_wait(
    w: &mut World,
    victim: usize,
    down: &std::collections::BTreeSet<usize>,
) -> f64 {
    let owner = w.node_id(victim);
    w.down_at.remove(&owner);
    w.crash(victim);
    let start = w.now;
    let others = (0..w.len()).filter(|i| !down.contains(i)).count();
    for step in 1..=2000u64 {
        w.run_until(start + Duration::from_millis(step * 10));
        let hid: std::collections::BTreeSet<usize> = w
            .down_at
            .get(&owner)
            .map(|v| v.iter().map(|(i, _)| *i).collect())
            .unwrap_or_default();
        if hid.iter().filter(|i| !down.contains(i)).count() >= others {
            let last = w.down_at[&owner]
                .iter()
                .map(|(_, t)| *t)
                .max()
                .unwrap_or(start);
            return (last - start).as_secs_f64() * 1e3;
        }
    }
    f64::INFINITY
}

/// The WAN timings of `deploy/global.example.toml` on the LAN defaults.
pub fn wan_config() -> Config {
    Config {
        probe_period: Duration::from_secs(1),
        probe_rtt: Duration::from_millis(600),
        suspicion_min: Duration::from_secs(1),
        suspicion_max: Duration::from_secs(10),
        ..Config::lan(ClusterName::new("sim").expect("name"))
    }
}
