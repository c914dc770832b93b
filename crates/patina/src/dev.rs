//! `patina dev`: a whole small world in one process on embedded defaults. Three regions of
//! three agents, two bridges per region, three global agents (one "edge" per region), and a
//! few demo apps spread over the regions. Every agent gossips and serves on loopback.

use std::net::SocketAddr;
use std::path::Path;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{Health, Machine, MachineState, UpsertMachineRequest};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::{Ready, Role, run_agent, shutdown_signal};

/// The regions of the dev world, with coordinates (Chicago, Frankfurt, Sydney).
const REGIONS: [(&str, f64, f64); 3] = [
    ("ord", 41.98, -87.90),
    ("fra", 50.03, 8.57),
    ("syd", -33.94, 151.18),
];
const AGENTS_PER_REGION: usize = 3;
const BRIDGES_PER_REGION: usize = 2;

/// Demo machines: (app, region index, healthy).
const DEMO: &[(&str, usize, bool)] = &[
    ("web", 0, true),
    ("web", 0, true),
    ("web", 1, true),
    ("web", 2, true),
    ("api", 0, true),
    ("api", 1, true),
    ("api", 1, false),
    ("batch", 2, false),
];

struct World {
    tasks: JoinSet<anyhow::Result<()>>,
    stopped: watch::Receiver<bool>,
}

impl World {
    /// Start one agent; returns where it is once it serves.
    async fn start(&mut self, config: Config, role: Role, label: String) -> anyhow::Result<Ready> {
        let (tx, rx) = oneshot::channel();
        let mut stopped = self.stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        self.tasks
            .spawn(async move { run_agent(config, role, Some(label), Some(tx), shutdown).await });
        match rx.await {
            Ok(ready) => Ok(ready),
            // The agent ended before it served: its error is the answer.
            Err(_) => match self.tasks.join_next().await {
                Some(Ok(Err(e))) => Err(e),
                _ => Err(anyhow::anyhow!("an agent of the dev world failed to start")),
            },
        }
    }
}

/// A free UDP port on `ip` (for a seed's gossip address, fixed before it starts).
fn free_udp(ip: std::net::IpAddr) -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?.local_addr()?)
}

pub(crate) async fn run(base: Config, root: &Path, listen: SocketAddr) -> anyhow::Result<()> {
    let ip = listen.ip();
    let (stop, stopped) = watch::channel(false);
    // One signal stops every agent (a handler installed after the signal would miss it).
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_stop.send_replace(true);
    });
    let mut world = World {
        tasks: JoinSet::new(),
        stopped,
    };
    let started = start_world(&mut world, &base, root, listen, ip).await;
    if let Err(e) = started {
        stop.send_replace(true);
        while world.tasks.join_next().await.is_some() {}
        return Err(e);
    }
    let mut result = Ok(());
    while let Some(r) = world.tasks.join_next().await {
        if let Err(e) = r? {
            // One agent failed: stop the rest rather than run a partial world.
            stop.send_replace(true);
            result = Err(e);
        }
    }
    result
}

async fn start_world(
    world: &mut World,
    base: &Config,
    root: &Path,
    listen: SocketAddr,
    ip: std::net::IpAddr,
) -> anyhow::Result<()> {
    let mut base = base.clone();
    base.global.regions = REGIONS
        .iter()
        .map(|(name, lat, lon)| patina_edge::RegionSpec {
            name: (*name).into(),
            lat: Some(*lat),
            lon: Some(*lon),
            ..Default::default()
        })
        .collect();
    let any = SocketAddr::new(ip, 0);
    let mut region_apis: Vec<Vec<SocketAddr>> = Vec::new();
    for (r, (region, _, _)) in REGIONS.iter().enumerate() {
        let seed = match (r, listen.port()) {
            (0, p) if p != 0 => SocketAddr::new(ip, p.wrapping_add(1)),
            _ => free_udp(ip)?,
        };
        let mut apis = Vec::new();
        for i in 0..AGENTS_PER_REGION {
            let mut c = base.clone();
            c.region = (*region).into();
            c.host = format!("{region}-{}", i + 1);
            c.data_dir = root.join(region).join(format!("agent-{}", i + 1));
            c.gossip.seeds = vec![seed];
            c.listen = if r == 0 && i == 0 { listen } else { any };
            c.gossip.listen = Some(if i == 0 { seed } else { any });
            // The first agent of the first region announces itself as a lone region agent
            // would, so that scripts find it.
            let label = if r == 0 && i == 0 {
                crate::ANNOUNCE.to_owned()
            } else {
                format!("region {region} agent {} API: ", i + 1)
            };
            let ready = world.start(c, Role::Region, label).await?;
            apis.push(ready.api);
        }
        region_apis.push(apis);
    }
    write_demo(&region_apis).await?;
    let global_seed = free_udp(ip)?;
    let mut globals = Vec::new();
    for (g, (region, _, _)) in REGIONS.iter().enumerate() {
        let mut c = base.clone();
        c.region = (*region).into();
        c.host = format!("edge-{region}");
        c.data_dir = root.join("global").join(format!("agent-{}", g + 1));
        c.listen = any;
        c.gossip.seeds = vec![global_seed];
        c.gossip.listen = Some(if g == 0 { global_seed } else { any });
        let ready = world
            .start(
                c,
                Role::Global,
                format!("global agent {} ({region}) API: ", g + 1),
            )
            .await?;
        globals.push(ready.api);
    }
    let mut bridges = Vec::new();
    for (r, (region, _, _)) in REGIONS.iter().enumerate() {
        for b in 0..BRIDGES_PER_REGION {
            let mut c = base.clone();
            c.region = (*region).into();
            c.host = format!("bridge-{region}-{}", b + 1);
            c.data_dir = root.join(region).join(format!("bridge-{}", b + 1));
            c.listen = any;
            c.gossip.seeds = vec![global_seed];
            c.gossip.listen = Some(any);
            c.bridge.region_agents = region_apis[r].iter().map(|a| a.to_string()).collect();
            let bridge = c.bridge.bridge(region)?;
            let ready = world
                .start(
                    c,
                    Role::Bridge(bridge),
                    format!("bridge {region} {} API: ", b + 1),
                )
                .await?;
            bridges.push(ready.api);
        }
    }
    print_banner(root, &region_apis, &globals, &bridges);
    Ok(())
}

/// Write the demo machines, each through an agent of its region.
async fn write_demo(region_apis: &[Vec<SocketAddr>]) -> anyhow::Result<()> {
    for (n, (app, r, healthy)) in DEMO.iter().enumerate() {
        let agents = &region_apis[*r];
        let agent = agents[n % agents.len()];
        let mut client = RegionClient::connect(format!("http://{agent}")).await?;
        let machine = Machine {
            id: format!("{app}-{}-{n}", REGIONS[*r].0),
            app: (*app).into(),
            addresses: vec![format!("10.{r}.0.{}:8080", n + 1)],
            state: MachineState::Started as i32,
            health: if *healthy {
                Health::Passing as i32
            } else {
                Health::Critical as i32
            },
            ..Machine::default()
        };
        client
            .upsert_machine(UpsertMachineRequest {
                machine: Some(machine),
            })
            .await?;
    }
    Ok(())
}

fn print_banner(
    root: &Path,
    region_apis: &[Vec<SocketAddr>],
    globals: &[SocketAddr],
    bridges: &[SocketAddr],
) {
    println!(
        "patina dev: {} regions of {AGENTS_PER_REGION} agents, {BRIDGES_PER_REGION} bridges each, {} global agents; data in {}",
        REGIONS.len(),
        globals.len(),
        root.display()
    );
    for (r, apis) in region_apis.iter().enumerate() {
        let list: Vec<String> = apis.iter().map(|a| a.to_string()).collect();
        println!("  region {}: {}", REGIONS[r].0, list.join(", "));
    }
    let list: Vec<String> = globals.iter().map(|a| a.to_string()).collect();
    println!("  global agents: {}", list.join(", "));
    let list: Vec<String> = bridges.iter().map(|a| a.to_string()).collect();
    println!("  bridges (global agents too): {}", list.join(", "));
    let (ord, global) = (region_apis[0][0], globals[0]);
    println!("demo apps: web (every region), api (ord, fra), batch (syd, none healthy)");
    println!("try:");
    println!("  patina lookup --server {global} web --from syd");
    println!("  patina lookup --server {global} batch --all");
    println!("  patina instances --server {ord} web");
    println!("  patina machine put --server {ord} --app shop --id shop-1 --addr 127.0.0.1:8080");
    println!("  patina lookup --server {global} shop");
    println!("  patina watch --server {ord} web");
    println!("  patina members --server {global}");
    println!("Ctrl-C stops.");
}
