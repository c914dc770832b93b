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
