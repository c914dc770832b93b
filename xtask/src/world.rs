//! A global world of real processes on loopback: regions of `patina region` agents, bridges
//! (`patina bridge`) per region, and global agents (`patina global`). Used by
//! `cargo xtask cluster --regions R` and `cargo xtask bench global`.
//!
//! Addresses: agent `i` of region `r` on 127.1.r.(i+1) (API port 7600), bridge `b` of region
//! `r` on 127.2.r.(b+1), global agent `g` on 127.3.0.(g+1); every process gossips on port
//! 7946 of its own IP. The first region agent (and the first global agent) of each cluster
//! is its seed.

use std::path::Path;

use anyhow::Context;
use patina_testkit::Agent;
use patina_testkit::secure::Secure;

pub const GOSSIP_PORT: u16 = 7946;
pub const REGION_API_PORT: u16 = 7600;

/// Regions with coordinates, in the order worlds use them; further regions are `rNN`
/// without coordinates (ordered by name after these).
const KNOWN: &[(&str, f64, f64)] = &[
    ("ord", 41.98, -87.90),
    ("fra", 50.03, 8.57),
    ("syd", -33.94, 151.18),
    ("iad", 38.95, -77.45),
    ("sin", 1.36, 103.99),
    ("gru", -23.43, -46.47),
    ("nrt", 35.77, 140.39),
    ("lhr", 51.47, -0.45),
    ("jnb", -26.14, 28.25),
    ("bom", 19.09, 72.87),
    ("sea", 47.45, -122.31),
    ("cdg", 49.01, 2.55),
];

pub fn region_name(r: usize) -> String {
    KNOWN
        .get(r)
        .map_or_else(|| format!("r{r:02}"), |(n, _, _)| (*n).to_owned())
}

/// The `[global]` table every global agent and bridge of a world gets.
pub fn region_table(regions: usize, stale_after_secs: u64) -> String {
    let mut t = format!("[global]\nstale_after_secs = {stale_after_secs}\n");
    for r in 0..regions {
        match KNOWN.get(r) {
            Some((name, lat, lon)) => {
                t += &format!("[[global.regions]]\nname = \"{name}\"\nlat = {lat}\nlon = {lon}\n")
            }
            None => t += &format!("[[global.regions]]\nname = \"{}\"\n", region_name(r)),
        }
        // Each region's ingress (what the global tier's xDS and DNS answers name).
        t += &format!("ingress = [\"{}\"]\n", ingress(r));
    }
    t
}

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub regions: usize,
    pub agents: usize,
    pub bridges: usize,
    pub globals: usize,
    pub stale_after_secs: u64,
    /// mTLS, encrypted gossip and signed summaries, as agents run by default (`false`:
    /// everything in plaintext, for comparison).
    pub secure: bool,
    /// The operator's listener (metrics, probes); `false`: `metrics.listen = "off"`, for the
    /// cost of metrics.
    pub metrics: bool,
}

pub struct World {
    pub regions: Vec<Vec<Agent>>,
    pub bridges: Vec<Vec<Agent>>,
    pub globals: Vec<Agent>,
}

/// What an agent's configuration adds when the world is secure (after its `[gossip]` keys),
/// and the agent started, reached with the world's client certificate.
fn secured(
    secure: Option<&Secure>,
    dir: &Path,
    ip: &str,
    grants: Vec<patina_trust::Grant>,
) -> String {
    secure.map_or_else(String::new, |s| s.agent_config(dir, ip, grants))
}

/// The configuration that turns the operator's listener off, when `metrics` is false.
pub fn metrics_off(metrics: bool) -> &'static str {
    if metrics {
        ""
    } else {
        "[metrics]\nlisten = \"off\"\n"
    }
}

fn reached(secure: Option<&Secure>, agent: Agent) -> Agent {
    match secure {
        Some(s) => agent.with_dial(s.dial.clone()),
        None => agent,
    }
}

fn gossip(ip: &str, seed: &str) -> String {
    format!("[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [\"{seed}:{GOSSIP_PORT}\"]\n")
}

/// A region's ingress address in a world (nothing listens there: xDS and DNS only name it).
pub fn ingress(r: usize) -> String {
    format!("127.9.{r}.1:443")
}

pub fn region_ip(r: usize, i: usize) -> String {
    format!("127.1.{r}.{}", i + 1)
}

fn bridge_ip(r: usize, b: usize) -> String {
    format!("127.2.{r}.{}", b + 1)
}

fn global_ip(g: usize) -> String {
    format!("127.3.0.{}", g + 1)
}

impl World {
    pub fn start(bin: &Path, root: &Path, shape: Shape) -> anyhow::Result<World> {
        anyhow::ensure!(
            (1..=200).contains(&shape.regions)
                && (1..=250).contains(&shape.agents)
                && (1..=250).contains(&shape.bridges)
                && (1..=250).contains(&shape.globals),
            "regions 1-200, agents, bridges and global agents 1-250"
        );
        let bar = crate::harness::progress(
            (shape.regions * (shape.agents + shape.bridges) + shape.globals) as u64,
            "starting agents",
        );
        let table = region_table(shape.regions, shape.stale_after_secs);
        let names: Vec<String> = (0..shape.regions).map(region_name).collect();
        let secure = shape.secure.then(|| Secure::new(&names));
        let sec = secure.as_ref();
        let mut regions = Vec::new();
        for r in 0..shape.regions {
            let name = region_name(r);
            let mut agents = Vec::new();
            for i in 0..shape.agents {
                let ip = region_ip(r, i);
                // A region of one agent: its view stands alone (bridges follow only a view
                // that stands).
                let standalone = if shape.agents == 1 {
                    "standalone = true\n"
                } else {
                    ""
                };
                let dir = root.join(&name).join(format!("agent-{}", i + 1));
                let config = format!(
                    "region = \"{name}\"\nhost = \"{name}-{}\"\nlisten = \"{ip}:{REGION_API_PORT}\"\nlog = \"warn\"\n{}{standalone}{}",
                    i + 1,
                    gossip(&ip, &region_ip(r, 0)),
                    secured(sec, &dir, &ip, Secure::region_agent(&name)),
                ) + metrics_off(shape.metrics);
                let agent = Agent::start_role(bin, "region", &dir, &config)
                    .with_context(|| format!("starting agent {} of {name}", i + 1))?;
                agents.push(reached(sec, agent));
                bar.inc(1);
            }
            regions.push(agents);
        }
        let mut globals = Vec::new();
        for g in 0..shape.globals {
            let ip = global_ip(g);
            let home = region_name(g % shape.regions);
            let dir = root.join("global").join(format!("agent-{}", g + 1));
            let config = format!(
                "region = \"{home}\"\nhost = \"edge-{}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}{}{table}",
                g + 1,
                gossip(&ip, &global_ip(0)),
                secured(sec, &dir, &ip, Secure::global_agent()),
            ) + metrics_off(shape.metrics);
            let agent = Agent::start_role(bin, "global", &dir, &config)
                .with_context(|| format!("starting global agent {}", g + 1))?;
            globals.push(reached(sec, agent));
            bar.inc(1);
        }
        let mut bridges = Vec::new();
        for (r, agents) in regions.iter().enumerate() {
            let name = region_name(r);
            let list: Vec<String> = agents
                .iter()
                .map(|a| format!("\"{}\"", a.host_port()))
                .collect();
            let mut mine = Vec::new();
            for b in 0..shape.bridges {
                let ip = bridge_ip(r, b);
                let dir = root.join(&name).join(format!("bridge-{}", b + 1));
                let config = format!(
                    "region = \"{name}\"\nhost = \"bridge-{name}-{}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}{}{table}[bridge]\nregion_agents = [{}]\n",
                    b + 1,
                    gossip(&ip, &global_ip(0)),
                    secured(sec, &dir, &ip, Secure::bridge(&name)),
                    list.join(", ")
                ) + metrics_off(shape.metrics);
                let agent = Agent::start_role(bin, "bridge", &dir, &config)
                    .with_context(|| format!("starting bridge {} of {name}", b + 1))?;
                mine.push(reached(sec, agent));
                bar.inc(1);
            }
            bridges.push(mine);
        }
        bar.finish_and_clear();
        Ok(World {
            regions,
            bridges,
            globals,
        })
    }

    pub fn print(&self) {
        for (r, agents) in self.regions.iter().enumerate() {
            let list: Vec<&str> = agents.iter().map(Agent::host_port).collect();
            println!("region {:<4} agents:  {}", region_name(r), list.join("  "));
            let list: Vec<&str> = self.bridges[r].iter().map(Agent::host_port).collect();
            println!("            bridges: {}", list.join("  "));
        }
        let list: Vec<&str> = self.globals.iter().map(Agent::host_port).collect();
        println!("global agents: {}", list.join("  "));
    }

    /// Every agent's operator listener (`http://ADDR`), read from their output: call once,
    /// on a world started with metrics on.
    pub fn metrics_urls(&self) -> Vec<String> {
        self.regions
            .iter()
            .flatten()
            .chain(self.bridges.iter().flatten())
            .chain(&self.globals)
            .map(Agent::metrics_url)
            .collect()
    }

    pub fn stop(&mut self) {
        let all = self
            .globals
            .iter_mut()
            .chain(self.bridges.iter_mut().flatten())
            .chain(self.regions.iter_mut().flatten());
        for a in all {
            let _ = a.stop();
        }
    }
}
