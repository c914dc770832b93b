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

/// A gossip key for tests (`gossip.encrypt`): 32 bytes in base64.
pub const GOSSIP_KEY: &str = "cGF0aW5hLXRlc3QtZ29zc2lwLWtleS0zMi1ieXRlcyE=";
/// Another one: of another cluster, or an attacker's.
pub const OTHER_GOSSIP_KEY: &str = "YW5vdGhlci1jbHVzdGVyLWdvc3NpcC1rZXktMzItYiE=";

/// The gossip port of the agents of a loopback region (each agent has an IP of its own).
pub const GOSSIP_PORT: u16 = 7946;

/// Start agent `i` of a loopback region: host `worker-{i}`, data under `root/agent{i}`, the
/// API on a fresh port of `ip`, gossip on `ip:GOSSIP_PORT`, joined through the agents at
/// `seeds` (IPs).
pub fn start_member(root: &Path, i: usize, ip: &str, seeds: &[String]) -> Agent {
    start_member_env(root, i, ip, seeds, &[])
}

/// [`start_member`] with `env` added to the agent's environment.
pub fn start_member_env(
    root: &Path,
    i: usize,
    ip: &str,
    seeds: &[String],
    env: &[(&str, &str)],
) -> Agent {
    let config = format!(
        "region = \"test\"\nhost = \"worker-{i}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}",
        gossip_table(ip, seeds)
    );
    Agent::start_role_env(
        bin(),
        "region",
        &root.join(format!("agent{i}")),
        &config,
        env,
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

/// The `patina` binary cargo built for these tests.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_patina"))
}

/// The region table the global-tier tests use: ord, fra, syd with coordinates.
pub const REGION_TABLE: &str = "[global]\nstale_after_secs = 30\n\
[[global.regions]]\nname = \"ord\"\nlat = 41.98\nlon = -87.90\n\
[[global.regions]]\nname = \"fra\"\nlat = 50.03\nlon = 8.57\n\
[[global.regions]]\nname = \"syd\"\nlat = -33.94\nlon = 151.18\n";

/// The `[gossip]` table of an agent gossiping on `ip:GOSSIP_PORT`, joined through the agents
/// at `seeds` (IPs).
pub fn gossip_table(ip: &str, seeds: &[String]) -> String {
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("\"{s}:{GOSSIP_PORT}\""))
        .collect();
    format!(
        "[gossip]\nlisten = \"{ip}:{GOSSIP_PORT}\"\nseeds = [{}]\n",
        seeds.join(", ")
    )
}

/// The API port of region agents started by [`start_region_agent`]: fixed, so that bridges
/// find a restarted agent where they found it before.
pub const REGION_API_PORT: u16 = 7600;

/// A region agent of `region` on `ip` (API on `ip:REGION_API_PORT`, gossip on
/// `ip:GOSSIP_PORT`, joined through `seeds`).
pub fn start_region_agent(
    root: &Path,
    name: &str,
    ip: &str,
    region: &str,
    seeds: &[String],
) -> Agent {
    // With no seeds it is its region's only agent: its view stands alone.
    let standalone = if seeds.is_empty() {
        "standalone = true\n"
    } else {
        ""
    };
    let config = format!(
        "region = \"{region}\"\nhost = \"{name}\"\nlisten = \"{ip}:{REGION_API_PORT}\"\nlog = \"warn\"\n{}{standalone}",
        gossip_table(ip, seeds)
    );
    Agent::start_role(bin(), "region", &root.join(name), &config).expect("start a region agent")
}

/// The line of a `[gossip]` table that makes a member of the global cluster spread changes
/// along trees.
const TREE: &str = "dissemination = \"tree\"\n";

/// A global agent in `region` on `ip`, joined to the global cluster through `seeds`; `extra`
/// replaces [`REGION_TABLE`] when given.
pub fn start_global(
    root: &Path,
    name: &str,
    ip: &str,
    region: &str,
    seeds: &[String],
    table: Option<&str>,
) -> Agent {
    // The global cluster spreads changes along trees, as deploy/global.example.toml says.
    let config = format!(
        "region = \"{region}\"\nhost = \"{name}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}{TREE}{}",
        gossip_table(ip, seeds),
        table.unwrap_or(REGION_TABLE)
    );
    Agent::start_role(bin(), "global", &root.join(name), &config).expect("start a global agent")
}

/// A bridge of `region` following `agents` (most preferred first), joined to the global
/// cluster through `seeds`.
pub fn start_bridge(
    root: &Path,
    name: &str,
    ip: &str,
    region: &str,
    agents: &[&Agent],
    seeds: &[String],
) -> Agent {
    let agents: Vec<String> = agents
        .iter()
        .map(|a| format!("\"{}\"", a.host_port()))
        .collect();
    let config = format!(
        "region = \"{region}\"\nhost = \"{name}\"\nlisten = \"{ip}:0\"\nlog = \"warn\"\n{}{TREE}{REGION_TABLE}[bridge]\nregion_agents = [{}]\n",
        gossip_table(ip, seeds),
        agents.join(", ")
    );
    Agent::start_role(bin(), "bridge", &root.join(name), &config).expect("start a bridge")
}

/// `(region, healthy, total)` of an app as a global agent answers, nearest to `from` first.
pub async fn lookup(agent: &Agent, app: &str, from: &str, all: bool) -> Vec<(String, u32, u32)> {
    let mut client = patina_proto::v1::global_client::GlobalClient::new(agent.channel().await);
    client
        .lookup_app(patina_proto::v1::LookupAppRequest {
            app: app.into(),
            from_region: from.into(),
            include_empty: all,
        })
        .await
        .expect("LookupApp")
        .into_inner()
        .regions
        .into_iter()
        .map(|r| (r.region, r.healthy, r.total))
        .collect()
}

/// Poll `check` every 50 ms until it holds or `within` passes; returns how long it took.
pub async fn eventually<F, Fut>(
    within: std::time::Duration,
    mut check: F,
) -> Option<std::time::Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < within {
        if check().await {
            return Some(start.elapsed());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    None
}

/// Write `m` at `agent` (UpsertMachine, which must succeed).
pub async fn upsert(agent: &Agent, m: patina_proto::v1::Machine) {
    agent
        .client()
        .await
        .upsert_machine(patina_proto::v1::UpsertMachineRequest { machine: Some(m) })
        .await
        .expect("UpsertMachine");
}

/// Put a machine of `app` (port 80) at `agent`: started, or stopped.
pub async fn put_app_machine(agent: &Agent, id: &str, app: &str, started: bool) {
    let mut m = machine(id, app, 80);
    if !started {
        m.state = patina_proto::v1::MachineState::Stopped as i32;
    }
    upsert(agent, m).await;
}

/// `patina certs ARGS`, which must succeed.
pub fn certs(args: &[&str]) {
    let out = cli(&[&["certs"], args].concat());
    assert!(
        out.status.success(),
        "patina certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue a certificate with `grants` (`patina certs issue` flags) from the CA in `ca` into
/// `out`; returns `out`.
pub fn issue(ca: &Path, out: &Path, grants: &[&str]) -> std::path::PathBuf {
    let mut args = vec![
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--name",
        "test",
        "--ip",
        "127.0.0.1",
    ];
    args.extend_from_slice(grants);
    certs(&args);
    out.to_path_buf()
}

/// A client's TLS dial with the set in `dir` (fixed: read once).
pub fn tls_dial(dir: &Path) -> patina_trust::Dial {
    let m = patina_trust::Material::load(&patina_trust::Paths::in_dir(dir)).expect("client files");
    patina_trust::Dial::tls_any(patina_trust::Trust::fixed(m))
}

/// A channel to `agent` through `dial` (5 s to connect), or why not.
pub async fn tls_channel(
    dial: &patina_trust::Dial,
    agent: &Agent,
) -> Result<tonic::transport::Channel, String> {
    let endpoint = tonic::transport::Endpoint::from_shared(agent.url.clone())
        .unwrap()
        .connect_timeout(std::time::Duration::from_secs(5));
    dial.connect(endpoint).await.map_err(|e| format!("{e:?}"))
}

/// Where a harness agent started in `dir` reads its TLS files.
pub fn tls_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("data").join("tls")
}

/// Region agent `i` of cluster `test` with TLS on (a certificate from `ca` valid `days`) and
/// encrypted gossip: IP `127.0.0.{base + i}`, data in `root/agent{i}`, joined through the
/// agents numbered `seeds`.
pub fn start_tls_agent(
    root: &Path,
    i: usize,
    base: usize,
    ca: &Path,
    seeds: &[usize],
    days: u32,
) -> Agent {
    let ip = format!("127.0.0.{}", base + i);
    let dir = root.join(format!("agent{i}"));
    issue(
        ca,
        &tls_dir(&dir),
        &[
            "--region-agent",
            "test",
            "--ip",
            &ip,
            "--days",
            &days.to_string(),
        ],
    );
    let seeds: Vec<String> = seeds
        .iter()
        .map(|s| format!("127.0.0.{}", base + s))
        .collect();
    // TLS on needs a gossip key too (gossip is encrypted by default).
    let extra = format!(
        "tls = \"on\"\n{}encrypt = \"{GOSSIP_KEY}\"\n",
        gossip_table(&ip, &seeds)
    );
    Agent::start_host(bin(), &dir, &ip, &format!("worker-{i}"), &extra)
        .expect("start patina with TLS")
}

/// The Python of the tools' virtual environment (`cargo xtask test` makes it).
pub fn python() -> std::path::PathBuf {
    let dir = std::env::var_os("PATINA_TOOLS_VENV").map_or_else(
        || std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/patina/venv"),
        std::path::PathBuf::from,
    );
    let python = dir.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run the tests with `cargo xtask test`, which makes it",
        python.display()
    );
    python
}

/// The value of the first sample of `name` (with exactly `labels`, e.g. `{kind="live"}`).
pub fn sample(exposition: &str, name_and_labels: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        let rest = l.strip_prefix(name_and_labels)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
