//! This crate's integration tests run the `patina` binary cargo built for them through the
//! shared harness, `patina-testkit`.

#![allow(dead_code, unused_imports)]

use std::path::Path;

pub use patina_testkit::{Agent, machine};

/// Start `patina region` on a fresh port of `ip` with its data in `dir`.
pub fn start(dir: &Path, ip: &str) -> Agent {
    start_with(dir, ip, "")
}

/// [`start`], with `extra` appended to the config file (e.g. a `[limits]` table).
pub fn start_with(dir: &Path, ip: &str, extra: &str) -> Agent {
    Agent::start(Path::new(env!("CARGO_BIN_EXE_patina")), dir, ip, extra).expect("start patina")
}

/// The gossip port of the agents of a loopback region (each agent has an IP of its own).
pub const GOSSIP_PORT: u16 = 7946;

/// Start agent `i` of a loopback region: host `worker-{i}`, data under `root/agent{i}`, the
/// API on a fresh port of `ip`, gossip on `ip:GOSSIP_PORT`, joined through the agents at
/// `seeds` (IPs).
pub fn start_member(root: &Path, i: usize, ip: &str, seeds: &[String]) -> Agent {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("\"{s}:{GOSSIP_PORT}\""))
        .collect();
    let extra = format!(
        "[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [{}]\n",
        seeds.join(", ")
    );
    Agent::start_host(
        Path::new(env!("CARGO_BIN_EXE_patina")),
        &root.join(format!("agent{i}")),
        ip,
        &format!("worker-{i}"),
        &extra,
    )
    .expect("start patina")
}

/// Run the `patina` command line (without `PATINA_SERVER` from the environment).
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_patina"))
        .args(args)
        .env_remove("PATINA_SERVER")
        .output()
        .expect("run patina")
}

/// [`cli`], which must succeed; its standard output.
pub fn cli_ok(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "patina {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Whether the tests run as root (CI does): mounts and network namespaces need it.
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
