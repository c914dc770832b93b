//! `patina dev`: a whole small world in one process on embedded defaults. Three regions of
//! three agents, two bridges per region, three global agents (one "edge" per region), and a
//! few demo apps spread over the regions. Every agent gossips and serves on loopback.

use std::net::SocketAddr;
use std::path::Path;

use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{Health, Machine, MachineState, UpsertMachineRequest};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;

use patina_trust::{Grant, Role as R, Tier};

use crate::config::{Config, GLOBAL_CLUSTER as GLOBAL};
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
    /// The world's throwaway CA (`None`: the world runs without TLS, `tls = "off"`).
    ca: Option<DevCa>,
}

/// The dev world's certificate authority, kept in `<root>/tls/`, and what it issues.
struct DevCa {
    authority: patina_trust::certs::Authority,
    root: std::path::PathBuf,
    ip: std::net::IpAddr,
}

/// How long the dev world's certificates last.
const DEV_CERT_DAYS: u64 = 90;

impl DevCa {
    /// The CA in `<root>/tls/` (made there on first use), blocking.
    fn open(root: &Path, ip: std::net::IpAddr) -> anyhow::Result<DevCa> {
        use anyhow::Context as _;
        let dir = root.join("tls");
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        let authority = if cert.exists() {
            patina_trust::certs::Authority::from_pem(
                &std::fs::read_to_string(&cert)?,
                &std::fs::read_to_string(&key)?,
            )
            .with_context(|| format!("the dev world's CA in {}", dir.display()))?
        } else {
            let a = patina_trust::certs::Authority::generate(
                "patina dev CA",
                std::time::Duration::from_secs(365 * 86_400),
            )?;
            std::fs::create_dir_all(&dir)?;
            patina_trust::certs::write_file(&key, a.key_pem().as_bytes(), true)?;
            patina_trust::certs::write_file(&cert, a.cert_pem().as_bytes(), false)?;
            a
        };
        Ok(DevCa {
            authority,
            root: root.to_path_buf(),
            ip,
        })
    }

    /// Issue a certificate with `grants` into `dir` (ca.pem, cert.pem, key.pem).
    fn issue(
        &self,
        dir: &Path,
        name: &str,
        grants: Vec<patina_trust::Grant>,
    ) -> anyhow::Result<()> {
        let issued = self.authority.issue(&patina_trust::certs::Leaf {
            name: name.into(),
            grants,
            dns: vec!["localhost".into()],
            ips: vec![self.ip],
            valid_for: std::time::Duration::from_secs(DEV_CERT_DAYS * 86_400),
            ..Default::default()
        })?;
        patina_trust::certs::write_set(dir, self.authority.cert_pem(), &issued)?;
        Ok(())
    }

    /// The operator's client certificate: writer and reader of every region, reader of the
    /// global cluster.
    fn client_dir(&self) -> std::path::PathBuf {
        self.root.join("tls").join("client")
    }
}

/// How long one agent of the dev world, or one demo write, may take before `patina dev`
/// gives up with an error naming it.
const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(40);

impl World {
    /// Start one agent with `grants` (when the world runs with TLS); returns where it is
    /// once it serves.
    async fn start(
        &mut self,
        config: Config,
        role: Role,
        label: String,
        grants: Vec<patina_trust::Grant>,
    ) -> anyhow::Result<Ready> {
        if let Some(ca) = &self.ca {
            // Files: off the runtime's other tasks.
            tokio::task::block_in_place(|| ca.issue(&config.data_dir.join("tls"), &label, grants))?;
        }
        let (tx, rx) = oneshot::channel();
        let mut stopped = self.stopped.clone();
        let shutdown = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        let host = config.host.clone();
        tracing::info!(%host, "dev world: starting an agent");
        self.tasks
            .spawn(async move { run_agent(config, role, Some(label), Some(tx), shutdown).await });
        // A start that never ends is named, not waited on forever.
        let Ok(ready) = tokio::time::timeout(START_DEADLINE, rx).await else {
            anyhow::bail!(
                "the dev world's agent {host} did not serve within {} s",
                START_DEADLINE.as_secs()
            );
        };
        match ready {
            Ok(ready) => Ok(ready),
            // The agent ended before it served: its error is the answer.
            Err(_) => match self.tasks.join_next().await {
                Some(Ok(Err(e))) => Err(e),
                _ => Err(anyhow::anyhow!("an agent of the dev world failed to start")),
            },
        }
    }
}

/// A port of `ip` free for both UDP and TCP (a DNS front end's, fixed before it starts).
fn free_dns(ip: std::net::IpAddr) -> anyhow::Result<SocketAddr> {
    for _ in 0..32 {
        let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
        let at = udp.local_addr()?;
        if std::net::TcpListener::bind(at).is_ok() {
            return Ok(at);
        }
    }
    anyhow::bail!("no port of {ip} free for both UDP and TCP")
}

/// Where the dev world's regions say their ingress is: documentation addresses (TEST-NET-1)
/// standing for each region's load balancers, so that the global tier's xDS endpoints and
/// DNS answers have something to name.
fn dev_ingress(r: usize) -> Vec<String> {
    vec![format!("192.0.2.{}:443", 10 * (r + 1))]
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
    let ca = match &base.tls {
        crate::config::TlsSetting::Mode(m) if m == "off" => None,
        crate::config::TlsSetting::Mode(m) if m == "on" => {
            Some(tokio::task::block_in_place(|| DevCa::open(root, ip))?)
        }
        _ => anyhow::bail!(
            "patina dev makes its own certificates: give tls = \"on\" (the default) or \"off\", not files"
        ),
    };
    let mut world = World {
        tasks: JoinSet::new(),
        stopped,
        ca,
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
    // Everything in the dev world serves on this host: machines' checks may probe loopback.
    base.checks.allow_loopback = true;
    base.global.regions = REGIONS
        .iter()
        .enumerate()
        .map(|(r, (name, lat, lon))| patina_edge::RegionSpec {
            name: (*name).into(),
            lat: Some(*lat),
            lon: Some(*lon),
            ingress: dev_ingress(r),
            ..Default::default()
        })
        .collect();
    // The DNS front end of the first agent of each region and of each global agent.
    let mut dns: Vec<(String, SocketAddr)> = Vec::new();
    let any = SocketAddr::new(ip, 0);
    // With TLS on, each cluster's gossip is sealed under a key of its own (kept in each
    // agent's keyring file), unless the configuration gives one.
    let (tls_on, given) = (world.ca.is_some(), base.gossip.encrypt.clone());
    let gossip_key = move || match (tls_on, &given) {
        (true, None) => Some(patina_gossip::GossipKey::generate().encode()),
        (_, given) => given.clone(),
    };
    let mut region_apis: Vec<Vec<SocketAddr>> = Vec::new();
    let mut status_pages: Vec<(String, SocketAddr)> = Vec::new();
    for (r, (region, _, _)) in REGIONS.iter().enumerate() {
        let region_key = gossip_key();
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
            c.gossip.encrypt = region_key.clone();
            if i == 0 {
                let at = free_dns(ip)?;
                c.dns.listen = Some(at.to_string());
                dns.push((format!("{region}.patina"), at));
            }
            // The first agent of the first region announces itself as a lone region agent
            // would, so that scripts find it.
            let label = if r == 0 && i == 0 {
                crate::ANNOUNCE.to_owned()
            } else {
                format!("region {region} agent {} API: ", i + 1)
            };
            let cluster = c.gossip.cluster.clone().unwrap_or_else(|| (*region).into());
            let grants = vec![Grant::new(Tier::Region, &cluster, R::Agent)];
            let ready = world.start(c, Role::Region, label, grants).await?;
            apis.push(ready.api);
            if let Some(page) = ready.metrics.filter(|_| i == 0) {
                status_pages.push((format!("region {region} agent 1"), page));
            }
        }
        region_apis.push(apis);
    }
    let dial = match &world.ca {
        None => patina_trust::Dial::Plain,
        Some(ca) => {
            // The operator may do anything, `patina keyring` (an agent's call) included.
            let mut grants = vec![
                Grant::new(Tier::Global, GLOBAL, R::Reader),
                Grant::new(Tier::Global, GLOBAL, R::Agent),
            ];
            for (region, _, _) in REGIONS {
                grants.push(Grant::new(Tier::Region, region, R::Writer(None)));
                grants.push(Grant::new(Tier::Region, region, R::Reader));
                grants.push(Grant::new(Tier::Region, region, R::Agent));
            }
            let dir = ca.client_dir();
            let paths = patina_trust::Paths::in_dir(&dir);
            let material = tokio::task::block_in_place(|| {
                ca.issue(&dir, "operator", grants)?;
                anyhow::Ok(patina_trust::Material::load(&paths)?)
            })?;
            patina_trust::Dial::tls_any(patina_trust::Trust::fixed(material))
        }
    };
    write_demo(&region_apis, &dial).await?;
    let global_seed = free_udp(ip)?;
    let global_key = gossip_key();
    let mut globals = Vec::new();
    for (g, (region, _, _)) in REGIONS.iter().enumerate() {
        let mut c = base.clone();
        c.region = (*region).into();
        c.host = format!("edge-{region}");
        c.data_dir = root.join("global").join(format!("agent-{}", g + 1));
        c.listen = any;
        c.gossip.seeds = vec![global_seed];
        c.gossip.listen = Some(if g == 0 { global_seed } else { any });
        c.gossip.encrypt = global_key.clone();
        let at = free_dns(ip)?;
        c.dns.listen = Some(at.to_string());
        dns.push((format!("patina (global agent {}, {region})", g + 1), at));
        let ready = world
            .start(
                c,
                Role::Global,
                format!("global agent {} ({region}) API: ", g + 1),
                vec![Grant::new(Tier::Global, GLOBAL, R::Agent)],
            )
            .await?;
        globals.push(ready.api);
        if let Some(page) = ready.metrics.filter(|_| g == 0) {
            status_pages.push(("global agent 1".to_owned(), page));
        }
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
            c.gossip.encrypt = global_key.clone();
            c.bridge.region_agents = region_apis[r].iter().map(|a| a.to_string()).collect();
            let bridge = c.bridge.bridge(region)?;
            let ready = world
                .start(
                    c,
                    Role::Bridge(Box::new(bridge)),
                    format!("bridge {region} {} API: ", b + 1),
                    vec![
                        Grant::new(Tier::Global, GLOBAL, R::Bridge((*region).into())),
                        Grant::new(Tier::Region, region, R::Reader),
                    ],
                )
                .await?;
            bridges.push(ready.api);
        }
    }
    print_banner(
        root,
        &region_apis,
        &globals,
        &bridges,
        &status_pages,
        &dns,
        world.ca.as_ref().map(DevCa::client_dir),
    );
    Ok(())
}

/// Write the demo machines, each through an agent of its region.
async fn write_demo(
    region_apis: &[Vec<SocketAddr>],
    dial: &patina_trust::Dial,
) -> anyhow::Result<()> {
    for (n, (app, r, healthy)) in DEMO.iter().enumerate() {
        let agents = &region_apis[*r];
        let agent = agents[n % agents.len()];
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{agent}"))?;
        tracing::info!(%agent, app = %app, "dev world: writing a demo machine");
        let mut client = RegionClient::new(
            tokio::time::timeout(START_DEADLINE, dial.connect(endpoint))
                .await
                .map_err(|_| anyhow::anyhow!("dev world: no connection to {agent}"))??,
        );
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
        tokio::time::timeout(
            START_DEADLINE,
            client.upsert_machine(UpsertMachineRequest {
                machine: Some(machine),
            }),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!("dev world: the demo write to {agent} was not acknowledged")
        })??;
    }
    Ok(())
}

fn print_banner(
    root: &Path,
    region_apis: &[Vec<SocketAddr>],
    globals: &[SocketAddr],
    bridges: &[SocketAddr],
    status_pages: &[(String, SocketAddr)],
    dns: &[(String, SocketAddr)],
    client_tls: Option<std::path::PathBuf>,
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
    // Scripts and tests read these lines to find the status pages.
    for (what, at) in status_pages {
        println!("  status page of {what}: http://{at}/");
    }
    // Scripts and tests read these lines to find the DNS front ends.
    for (zone, at) in dns {
        println!("  dns for {zone}: {at}");
    }
    let (ord, global) = (region_apis[0][0], globals[0]);
    println!("demo apps: web (every region), api (ord, fra), batch (syd, none healthy)");
    match &client_tls {
        Some(dir) => {
            println!(
                "mTLS is on (a throwaway CA in {}); the client commands need the operator's certificate:",
                root.join("tls").display()
            );
            println!("  export PATINA_TLS_DIR={}", dir.display());
            println!(
                "  grpcurl -cacert {d}/ca.pem -cert {d}/cert.pem -key {d}/key.pem {ord} list",
                d = dir.display()
            );
        }
        None => println!("TLS is off (tls = \"off\"): anyone on this host can call the agents"),
    }
    if client_tls.is_some() {
        println!(
            "gossip is encrypted, a key per cluster: patina keyring list --server {ord} (and --server {global})"
        );
    }
    println!("try:");
    println!("  patina lookup --server {global} web --from syd");
    println!("  patina lookup --server {global} batch --all");
    println!("  patina instances --server {ord} web");
    println!("  patina machine put --server {ord} --app shop --id shop-1 --addr 127.0.0.1:8080");
    println!("  patina lookup --server {global} shop");
    println!("  patina watch --server {ord} web");
    println!("  patina members --server {global}");
    if let (Some((_, region_dns)), Some((_, global_dns))) = (dns.first(), dns.get(REGIONS.len())) {
        println!(
            "  dig @{} -p {} web.app.ord.patina SRV",
            region_dns.ip(),
            region_dns.port()
        );
        println!(
            "  dig @{} -p {} web.app.patina SRV   (regions' ingress, nearest first; TEST-NET addresses in dev)",
            global_dns.ip(),
            global_dns.port()
        );
    }
    println!(
        "  xDS (ADS, SotW and delta) on every agent's API: GRPC_XDS_BOOTSTRAP naming {ord} and target xds:///web"
    );
    println!("Ctrl-C stops.");
}
