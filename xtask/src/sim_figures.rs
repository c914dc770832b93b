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
        .flat_map(|(_, ts)| ts.iter().map(|t| *t - start))
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
/// crashed each; milliseconds until no other node lists its machine. Returns (p50, p99, max).
pub fn crash_to_excluded(n: usize, runs: u64) -> (f64, f64, f64) {
    let mut all = Vec::new();
    for seed in 0..runs {
        let cfg = Config::lan(ClusterName::new("sim").expect("name"));
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
