//! `cargo xtask cluster [--nodes N]`: a region of N real `patina region` processes (release
//! build) on loopback addresses 127.0.1.1..N, with generated configs, seeded through the
//! first two; prints their addresses and stops them all on Ctrl-C.
//!
//! `cargo xtask cluster --regions R [--nodes N] [--bridges B] [--globals G]`: the world of
//! `patina dev` as real processes: R regions of N agents (default 3), B bridges per region
//! (default 2), G global agents (default 3). See `world.rs` for the addresses.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use patina_testkit::Agent;

use crate::harness::build_patina;

/// The gossip port of every agent (each has its own loopback IP).
pub const GOSSIP_PORT: u16 = 7946;

pub fn ip(i: usize) -> String {
    format!("127.0.1.{}", i + 1)
}

/// Start agent `i` of a cluster in `root`, with `extra` config (TOML) appended.
pub fn start_agent(bin: &Path, root: &Path, i: usize, extra: &str) -> anyhow::Result<Agent> {
    let gossip = format!(
        "[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [\"{s0}:{GOSSIP_PORT}\", \"{s1}:{GOSSIP_PORT}\"]\n{extra}",
        ip = ip(i),
        s0 = ip(0),
        s1 = ip(1),
    );
    Agent::start_host(
        bin,
        &root.join(format!("agent-{}", i + 1)),
        &ip(i),
        &format!("worker-{}", i + 1),
        &gossip,
    )
    .with_context(|| format!("starting agent {}", i + 1))
}

pub struct Options {
    nodes: Option<usize>,
    regions: Option<usize>,
    bridges: usize,
    globals: usize,
}

impl Options {
    pub fn parse(args: &[&str]) -> anyhow::Result<Options> {
        let mut o = Options {
            nodes: None,
            regions: None,
            bridges: 2,
            globals: 3,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let v: usize = it.next().context("missing value")?.parse()?;
            match *a {
                "--nodes" => o.nodes = Some(v),
                "--regions" => o.regions = Some(v),
                "--bridges" => o.bridges = v,
                "--globals" => o.globals = v,
                other => bail!("unknown option {other}"),
            }
        }
        if !(1..=250).contains(&o.nodes.unwrap_or(1)) {
            bail!("--nodes must be between 1 and 250");
        }
        Ok(o)
    }
}

fn wait_for_ctrl_c() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    Ok(())
}

/// The world of regions, bridges and global agents, until Ctrl-C.
fn run_world(o: &Options, regions: usize) -> anyhow::Result<()> {
    let bin = build_patina()?;
    let root: PathBuf = crate::bench_store::tempdir()?.join("world");
    let shape = crate::world::Shape {
        regions,
        agents: o.nodes.unwrap_or(3),
        bridges: o.bridges,
        globals: o.globals,
        stale_after_secs: 30,
        // In plaintext, so that the client commands it prints need no certificate (`patina
        // dev` runs a world with security on).
        secure: false,
        metrics: true,
    };
    let mut world = crate::world::World::start(&bin, &root, shape)?;
    world.print();
    let g = world.globals[0].host_port().to_owned();
    let r = world.regions[0][0].host_port().to_owned();
    println!(
        "Try:
  patina machine put --server {r} --app web --id web-1 --addr 10.0.0.1:8080
  patina lookup --server {g} web --from {}
  patina members --server {g}
Ctrl-C stops them all.",
        crate::world::region_name(regions - 1)
    );
    wait_for_ctrl_c()?;
    world.stop();
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

pub fn run(o: Options) -> anyhow::Result<()> {
    if let Some(regions) = o.regions {
        return run_world(&o, regions);
    }
    let nodes = o.nodes.unwrap_or(5);
    let bin = build_patina()?;
    let root: PathBuf = crate::bench_store::tempdir()?.join("cluster");
    let mut agents = Vec::new();
    let bar = crate::harness::progress(nodes as u64, "starting agents");
    for i in 0..nodes {
        let a = start_agent(&bin, &root, i, "")?;
        bar.inc(1);
        agents.push(a);
    }
    bar.finish_and_clear();
    for (i, a) in agents.iter().enumerate() {
        println!(
            "agent {:>3}: region API {}  gossip udp {}:{GOSSIP_PORT}  data {}",
            i + 1,
            a.url,
            ip(i),
            a.dir.display()
        );
    }
    println!(
        "a region of {} agents is running. Try:\n  patina members --server {}\n  patina machine put --server {} --app web --id web-1 --addr 10.0.0.1:8080\n  patina instances --server {} web\nCtrl-C stops them all.",
        nodes,
        agents[0].host_port(),
        agents[0].host_port(),
        agents[nodes - 1].host_port(),
    );
    wait_for_ctrl_c()?;
    println!("stopping {} agents", agents.len());
    for a in &mut agents {
        let _ = a.stop();
    }
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}
