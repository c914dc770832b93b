//! `cargo xtask bench sim-scale [--nodes N] [--edges E] [--crashes K] [--only region|global]`:
//! the deterministic simulation run directly at scale (issue 20): a region of N agents (10,000
//! by default) and a global tier of E edges (5,000) with the 19 regions' bridges. Per world:
//! the simulator's peak memory per node and per node pair, wall time of each phase, how long a
//! change takes to reach 99.9 % of the nodes, idle gossip per node, and crash to excluded at
//! every other node; the dissemination model's figure beside the region's.

use std::time::{Duration, Instant};

use anyhow::Context;
use patina_gossip::sim::World;
use patina_gossip::{ClusterName, Config};

pub struct Options {
    nodes: usize,
    edges: usize,
    crashes: usize,
    region: bool,
    global: bool,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            nodes: 10_000,
            edges: 5_000,
            crashes: 10,
            region: true,
            global: true,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v = it.next().context("missing value")?;
            match *a {
                "--nodes" => o.nodes = v.parse()?,
                "--edges" => o.edges = v.parse()?,
                "--crashes" => o.crashes = v.parse()?,
                "--only" => match *v {
                    "region" => o.global = false,
                    "global" => o.region = false,
                    _ => anyhow::bail!("--only region|global"),
                },
                _ => anyhow::bail!("unknown option {a}"),
            }
        }
        if o.nodes < 2 || o.edges < 1 {
            anyhow::bail!("--nodes needs at least 2, --edges at least 1");
        }
        Ok(o)
    }
}

/// This process's resident and peak resident bytes (0 where unreadable).
fn rss() -> (u64, u64) {
    let field = |name| patina_testkit::proc_status_bytes(None, name).unwrap_or(0);
    (field("VmRSS"), field("VmHWM"))
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if o.region && o.global {
        // Each world in a process of its own: the allocator keeps the first world's pages
        // after it is dropped, and the second's peak would hide under them.
        let mut json = serde_json::json!({});
        for only in ["region", "global"] {
            let out = std::process::Command::new(std::env::current_exe()?)
                .args(["bench", "sim-scale", "--only", only])
                .args(["--nodes", &o.nodes.to_string()])
                .args(["--edges", &o.edges.to_string()])
                .args(["--crashes", &o.crashes.to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let (lines, last) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
            println!("{lines}");
            if !out.status.success() {
                anyhow::bail!("the {only} world failed");
            }
            let part: serde_json::Value = serde_json::from_str(last.trim())?;
            if let (Some(all), Some(part)) = (json.as_object_mut(), part.as_object()) {
                all.extend(part.clone());
            }
        }
        println!("{json}");
        return Ok(());
    }
    let mut json = serde_json::json!({});
    if o.region {
        region(o.nodes, o.crashes, &mut json);
    }
    if o.global {
        global(o.edges, o.crashes, &mut json);
    }
    println!("{json}");
    Ok(())
}

/// 99.9 % of `others` nodes: the count that must hold a change (at least one).
fn need(others: usize) -> usize {
    (((others as f64) * 0.999).ceil() as usize).max(1)
}

/// Changes written in the region world, one after another.
const WRITES: usize = 5;

/// Start counting this process's peak resident memory (VmHWM) again from its current size.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn region(n: usize, crashes: usize, json: &mut serde_json::Value) {
    let cfg = Config::lan(ClusterName::new("sim").expect("name"));
    let period = cfg.probe_period;
    reset_peak();
    let (base, _) = rss();
    let t0 = Instant::now();
    let mut w = World::new(n, cfg, patina_gossip::sim::Net::lan(), 0x5ca1e);
    w.form();
    let formed = t0.elapsed();
    let (after_form, _) = rss();
    w.run_for(Duration::from_secs(10));
    let settled = t0.elapsed();
    let converged = (0..n)
        .filter(|i| w.node(*i).is_some_and(|nd| nd.active().len() == n - 1))
        .count();
    // Idle: gossip alone, per node.
    let idle = Duration::from_secs(10);
    let (b0, d0) = (w.datagram_bytes, w.datagrams);
    w.run_for(idle);
    let idle_rate = (w.datagram_bytes - b0) as f64 / idle.as_secs_f64() / n as f64;
    let idle_datagrams = (w.datagrams - d0) as f64 / idle.as_secs_f64() / n as f64;
    // Changes from different nodes, each at a random moment of a probe period (nodes' timers
    // run at their own phases), each until 99.9 % of the others hold it (at most 10 s of
    // virtual time).
    w.track_learning();
    let want = need(n - 1);
    let mut phase = crate::sim_figures::SplitMix(0x5eed);
    let mut spreads = Vec::new();
    let (mut change_bytes, mut change_datagrams) = (f64::NAN, f64::NAN);
    let mut writers = Vec::new();
    for k in 0..WRITES {
        w.run_for(Duration::from_nanos(phase.below(period.as_nanos() as u64)));
        let writer = (n / 2 + k * 997) % n;
        writers.push(writer);
        let origin = w.node_id(writer);
        let start = w.now;
        let (b1, d1) = (w.datagram_bytes, w.datagrams);
        let key = format!("probe-{k}");
        w.write(writer, &key, "app", b"+v");
        let seq = w.served(writer).get(&key).map_or(0, |(_, seq)| *seq);
        let mut spread = f64::INFINITY;
        for step in 1..=200u64 {
            w.run_until(start + Duration::from_millis(step * 50));
            if let Some(ts) = w.learned_at.get(&(origin, seq))
                && ts.len() >= want
            {
                let mut times: Vec<Duration> = ts.iter().map(|(_, t)| *t - start).collect();
                times.sort();
                spread = times[want - 1].as_secs_f64() * 1e3;
                break;
            }
        }
        spreads.push(spread);
        if k == 0 {
            // What the first change cost: datagrams and bytes from its write on, for at
            // least 5 s (its pushes, piggybacked copies, tree or gossip control; not the
            // anti-entropy sessions, which the simulation carries without encoding them),
            // less the idle traffic over the same time, per node.
            w.run_until(start + Duration::from_secs(5));
            let secs = (w.now - start).as_secs_f64();
            change_bytes = (w.datagram_bytes - b1) as f64 / n as f64 - idle_rate * secs;
            change_datagrams = (w.datagrams - d1) as f64 / n as f64 - idle_datagrams * secs;
        }
    }
    spreads.sort_by(f64::total_cmp);
    let spread = crate::harness::percentile(&spreads, 50.0);
    let spread_worst = crate::harness::percentile(&spreads, 100.0);
    let spread_wall = t0.elapsed();
    // Crashes, one at a time, spread over the region.
    let mut down = std::collections::BTreeSet::new();
    let mut excluded = Vec::new();
    for k in 0..crashes {
        let victim = (k * 7919 + 101) % n;
        if writers.contains(&victim) || !down.insert(victim) {
            continue;
        }
        excluded.push(crate::sim_figures::crash_and_wait(&mut w, victim, &down));
    }
    excluded.sort_by(f64::total_cmp);
    let done = t0.elapsed();
    let (_, peak) = rss();
    let grown = peak.saturating_sub(base);
    let (model_rounds, model_ms, _) = crate::sim_figures::dissemination_model(n, 1);
    let p = |q: f64| crate::harness::percentile(&excluded, q);
    println!(
        "simulated region of {n} agents (a formed membership, LAN 50-250 us one way): membership {converged}/{n} complete after 10 s"
    );
    println!(
        "  a change to 99.9 % of the others ({WRITES} changes, each at a random moment of a probe period): median {spread:.1} ms, worst {spread_worst:.1} ms (probe period {} ms; the dissemination model: {model_ms:.1} ms, {model_rounds} periods)",
        period.as_millis()
    );
    println!(
        "  what a change cost: {change_datagrams:.1} datagrams and {change_bytes:.0} B per node (UDP: pushes, piggybacked copies; over 5 s, idle traffic taken out)"
    );
    println!(
        "  idle gossip: {idle_rate:.0} B/s and {idle_datagrams:.1} datagrams/s per node (goal <= 2,048 B/s)"
    );
    println!(
        "  crash to excluded at every other agent ({} crashes, one at a time): p50 {:.0} / p99 {:.0} / max {:.0} ms (probe period {} ms + suspicion minimum {} ms)",
        excluded.len(),
        p(50.0),
        p(99.0),
        p(100.0),
        period.as_millis(),
        Config::lan(ClusterName::new("sim").expect("name"))
            .suspicion_min
            .as_millis()
    );
    println!(
        "  simulator: peak {} MB resident ({:.0} B per node pair, {:.0} kB per node), {} MB after forming; wall {:.0} s formed, {:.0} s settled, {:.0} s spread, {:.0} s crashes",
        grown / 1_000_000,
        grown as f64 / (n * n) as f64,
        grown as f64 / n as f64 / 1e3,
        after_form.saturating_sub(base) / 1_000_000,
        formed.as_secs_f64(),
        (settled - formed).as_secs_f64(),
        (spread_wall - settled).as_secs_f64(),
        (done - spread_wall).as_secs_f64(),
    );
    json["region_nodes"] = n.into();
    json["region_converged"] = converged.into();
    json["region_spread_ms"] = spread.into();
    json["region_spread_worst_ms"] = spread_worst.into();
    json["region_model_spread_ms"] = model_ms.into();
    json["region_idle_bytes_per_s_per_node"] = idle_rate.into();
    json["region_change_bytes_per_node"] = change_bytes.into();
    json["region_change_datagrams_per_node"] = change_datagrams.into();
    json["region_crash_to_excluded_p50_ms"] = p(50.0).into();
    json["region_crash_to_excluded_p99_ms"] = p(99.0).into();
    json["region_sim_peak_bytes"] = grown.into();
    json["region_sim_bytes_per_pair"] = (grown as f64 / (n * n) as f64).into();
}

fn global(edges: usize, crashes: usize, json: &mut serde_json::Value) {
    reset_peak();
    let (base, _) = rss();
    let t0 = Instant::now();
    let cfg = Config {
        dissemination: patina_gossip::Dissemination::Tree,
        ..crate::sim_figures::wan_config()
    };
    let f = crate::sim_figures::wan_spread(edges, cfg, 7, crashes);
    let (_, peak) = rss();
    let grown = peak.saturating_sub(base);
    let n = f.nodes;
    let r = crate::sim_figures::ratios(&f.changes);
    let worst_ms = f.changes.iter().map(|c| c.p999).fold(0.0, f64::max);
    let mut excluded = f.crash_to_excluded.clone();
    excluded.sort_by(f64::total_cmp);
    let p = |q: f64| crate::harness::percentile(&excluded, q);
    println!(
        "simulated global tier of {edges} edges and 19 regions' bridges (WAN: one-way 4 ms + km/75 per ms; tree dissemination): membership {}/{n} complete",
        f.converged
    );
    println!(
        "  a change from each bridge to 99.9 % of the edges: worst {worst_ms:.1} ms; {:.2}x (median) / {:.2}x (worst) the one-way floor to the farthest edge; {:.0} B per change per node",
        r[r.len() / 2],
        r[r.len() - 1],
        f.bytes_per_change_per_node
    );
    println!(
        "  idle gossip: {:.0} B/s per node (goal <= 2,048); {} prunes and {} grafts sent; {} false downs, {} renewals before the crashes",
        f.idle_bytes_per_s, f.prunes, f.grafts, f.false_downs, f.renewals
    );
    println!(
        "  crash of an edge to excluded at every other node ({} crashes): p50 {:.0} / p99 {:.0} / max {:.0} ms (probe period {} ms + suspicion minimum {} ms)",
        excluded.len(),
        p(50.0),
        p(99.0),
        p(100.0),
        crate::sim_figures::wan_config().probe_period.as_millis(),
        crate::sim_figures::wan_config().suspicion_min.as_millis()
    );
    println!(
        "  simulator: peak {} MB resident ({:.0} B per node pair, {:.0} kB per node); wall {:.0} s",
        grown / 1_000_000,
        grown as f64 / (n * n) as f64,
        grown as f64 / n as f64 / 1e3,
        t0.elapsed().as_secs_f64()
    );
    json["global_nodes"] = n.into();
    json["global_converged"] = f.converged.into();
    json["global_spread_worst_ms"] = worst_ms.into();
    json["global_ratio_median"] = r[r.len() / 2].into();
    json["global_ratio_worst"] = r[r.len() - 1].into();
    json["global_idle_bytes_per_s_per_node"] = f.idle_bytes_per_s.into();
    json["global_crash_to_excluded_p99_ms"] = p(99.0).into();
    json["global_sim_peak_bytes"] = grown.into();
}
