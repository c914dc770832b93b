//! `patina`: the one binary. Runs agents (`patina region`, `patina dev`) and is the
//! command-line client of any agent.

#![forbid(unsafe_code)]

mod certs;
mod client;
mod config;
mod dev;
mod keyring;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use patina_region::AgentIdentity;
use patina_store::Store;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::Config;

#[derive(Parser)]
#[command(name = "patina", version, about = "Routing state for an edge network")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    tls: client::ClientTls,
}

/// Default agent address for client commands.
const DEFAULT_SERVER: &str = "127.0.0.1:7600";
/// Default global agent address for `patina lookup`.
const DEFAULT_GLOBAL_SERVER: &str = "127.0.0.1:7700";

#[derive(Subcommand)]
enum Command {
    /// Run a region agent.
    Region {
        /// TOML configuration file (see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a global agent (one per edge proxy): the global map of apps to regions.
    Global {
        /// TOML configuration file (see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a bridge: a global agent that follows its region's agents and publishes the
    /// region's (app, region) summaries.
    Bridge {
        /// TOML configuration file (see docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Make certificates for small deployments and tests: a CA, then certificates it issues
    /// with Patina's grants (docs/security.md).
    Certs {
        #[command(subcommand)]
        command: certs::CertsCommand,
    },
    /// The gossip keyring of a whole cluster: generate, list, install, use, remove keys, and
    /// take or refuse plaintext datagrams (docs/security.md).
    Keyring {
        #[command(subcommand)]
        command: keyring::KeyringCommand,
    },
    /// Move a stopped agent's store to a fresh origin identity: once, after restoring its
    /// data directory from a backup or copying it (docs/replication.md).
    NewOrigin {
        /// The agent's TOML configuration file (its data_dir and region).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run a small world on embedded defaults until Ctrl-C: three regions of three agents,
    /// two bridges per region, three global agents.
    Dev {
        /// Keep data here (default: a new temporary directory, removed on exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Address of the region API of the first region's first agent.
        #[arg(long, default_value = DEFAULT_SERVER)]
        listen: SocketAddr,
    },
    /// The regions with healthy instances of an app, nearest first (asks a global agent).
    Lookup {
        #[arg(long, env = "PATINA_GLOBAL_SERVER", default_value = DEFAULT_GLOBAL_SERVER)]
        server: String,
        app: String,
        /// The region to order from (default: the global agent's own).
        #[arg(long)]
        from: Option<String>,
        /// Also list regions whose instances are all unhealthy.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// Write, read or delete one machine.
    Machine {
        #[command(subcommand)]
        command: MachineCommand,
    },
    /// List an app's instances (started and passing only, unless --all).
    Instances {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        app: String,
        /// Include machines that are not started or not passing.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// The cluster's members as an agent sees them.
    Members {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        #[arg(long)]
        json: bool,
    },
    /// An agent's replication status: records, per-origin digest, gossip counters.
    Status {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a down member for good: its machines are deleted cluster-wide.
    Forget {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        /// The member's id (hex) or gossip address.
        member: String,
    },
    /// Stream an app's (or the whole region's) machines: a snapshot, then changes.
    Watch {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        app: Option<String>,
        /// Resume from a token an earlier watch printed.
        #[arg(long)]
        resume: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum MachineCommand {
    /// Create or replace a machine.
    Put {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        #[command(flatten)]
        args: client::PutArgs,
    },
    /// Show one machine.
    Get {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete one machine.
    Rm {
        #[arg(long, env = "PATINA_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        id: String,
    },
}

/// Set once the watchdog ended the agent: the process exits with [`WATCHDOG_EXIT_CODE`]
/// however the teardown ends.
static WATCHDOG_FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The exit status of an agent the watchdog ended (a stuck loop), for its supervisor.
const WATCHDOG_EXIT_CODE: u8 = 70;

fn main() -> std::process::ExitCode {
    let ran = run(Cli::parse());
    if WATCHDOG_FIRED.load(std::sync::atomic::Ordering::Relaxed) {
        return std::process::ExitCode::from(WATCHDOG_EXIT_CODE);
    }
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("patina: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The client commands' TLS (agents read theirs from their configuration).
    cli.tls.install()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("patina-rt")
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Region { config } => {
                let config = Config::load(config.as_deref())?;
                init_logs(&config.log);
                run_agent(config, Role::Region, None, None, shutdown_signal()).await
            }
            Command::Global { config } => {
                let config = Config::load(config.as_deref())?;
                init_logs(&config.log);
                run_agent(config, Role::Global, None, None, shutdown_signal()).await
            }
            Command::Bridge { config } => {
                let config = Config::load(config.as_deref())?;
                init_logs(&config.log);
                let bridge = config.bridge.bridge(&config.region)?;
                run_agent(
                    config,
                    Role::Bridge(Box::new(bridge)),
                    None,
                    None,
                    shutdown_signal(),
                )
                .await
            }
            Command::Certs { command } => certs::run(&command),
            Command::Keyring { command } => keyring::run(command).await,
            Command::NewOrigin { config } => {
                let config = Config::load(config.as_deref())?;
                init_logs(&config.log);
                new_origin(config).await
            }
            Command::Dev { data_dir, listen } => {
                let config = Config::load(None)?;
                init_logs(&config.log);
                let temp = data_dir.is_none();
                let root = data_dir.unwrap_or_else(|| {
                    std::env::temp_dir().join(format!("patina-dev-{}", std::process::id()))
                });
                let result = dev::run(config, &root, listen).await;
                if temp {
                    let _ = std::fs::remove_dir_all(&root);
                }
                result
            }
            Command::Machine { command } => match command {
                MachineCommand::Put { server, args } => client::machine_put(&server, args).await,
                MachineCommand::Get { server, id, json } => {
                    client::machine_get(&server, id, json).await
                }
                MachineCommand::Rm { server, id } => client::machine_rm(&server, id).await,
            },
            Command::Instances {
                server,
                app,
                all,
                json,
            } => client::instances(&server, app, all, json).await,
            Command::Watch {
                server,
                app,
                resume,
                json,
            } => client::watch(&server, app, resume, json).await,
            Command::Members { server, json } => client::members(&server, json).await,
            Command::Status { server, json } => client::status(&server, json).await,
            Command::Forget { server, member } => client::forget(&server, member).await,
            Command::Lookup {
                server,
                app,
                from,
                all,
                json,
            } => client::lookup(&server, app, from, all, json).await,
        }
    })
}

fn init_logs(filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The announcement prefix scripts and `patina-testkit` look for.
const ANNOUNCE: &str = "region API: ";

/// Descriptors the agent needs besides client connections: the store's SQLite files
/// (database, WAL, shared memory, lock), the listener, stdio, the refused-connection path
/// (`patina_region::listener::MAX_OVERFLOW_CONNECTIONS`) and headroom.
const FD_RESERVE: u64 = 256;

/// Raise the soft open-file limit towards the hard one when it cannot hold
/// `limits.max_connections` connections plus [`FD_RESERVE`]; warn when even that is short,
/// since connections beyond the limit then fail at accept instead of being refused cleanly.
fn raise_open_file_limit(config: &Config) {
    let want = config.limits.max_connections.get() as u64 + FD_RESERVE;
    let result = rlimit::getrlimit(rlimit::Resource::NOFILE).and_then(|(soft, _)| {
        if soft >= want {
            Ok(soft)
        } else {
            rlimit::increase_nofile_limit(want).inspect(|now| {
                tracing::info!(from = soft, to = now, "raised the open-file limit");
            })
        }
    });
    match result {
        Ok(now) if now >= want => {}
        Ok(now) => tracing::warn!(
            open_file_limit = now,
            needed = want,
            "the open-file limit is below limits.max_connections plus a reserve: raise the hard \
             limit (LimitNOFILE= under systemd) or lower limits.max_connections"
        ),
        Err(e) => tracing::warn!(error = %e, "could not read or raise the open-file limit"),
    }
}

/// Connections the kernel may hold ready for the agent to accept. The usual 128 overflows when
/// many clients (re)connect at once, e.g. every proxy of a region after an agent restart: the
/// kernel then drops their SYNs and each waits a whole second to retry. The kernel caps it at
/// `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with [`LISTEN_BACKLOG`].
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As TcpListener::bind does: a restarted agent can rebind while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// `patina new-origin`: open the (stopped) agent's store under a fresh origin and close it.
/// Any agent's data directory: a region agent's (machines), a global agent's or a bridge's
/// (summaries), whichever it holds.
async fn new_origin(config: Config) -> anyhow::Result<()> {
    let dir = config.data_dir.clone();
    let machines = patina_store::StoreOptions {
        renew_origin: true,
        ..config.store.options(&config.region)
    };
    let summaries = patina_store::StoreOptions {
        renew_origin: true,
        ..config.store.global_options()
    };
    let node = tokio::task::spawn_blocking(move || {
        let store = match Store::open(&dir, machines) {
            Err(patina_store::StoreError::WrongKind { .. }) => Store::open(&dir, summaries)?,
            opened => opened?,
        };
        let node = store.node();
        store.close();
        anyhow::Ok(node)
    })
    .await?
    .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    println!(
        "the store in {} now writes as origin {node}",
        config.data_dir.display()
    );
    Ok(())
}

/// What an agent runs as.
pub(crate) enum Role {
    /// A region agent: machines of its region.
    Region,
    /// A global agent: the global map, for an edge proxy.
    Global,
    /// A bridge: a global agent that also publishes its region's summaries.
    Bridge(Box<patina_global::bridge::BridgeConfig>),
}

impl Role {
    /// The announcement line's prefix: scripts and tests read it to find the agent.
    fn announce(&self) -> &'static str {
        match self {
            Role::Region => ANNOUNCE,
            Role::Global => "global API: ",
            Role::Bridge(_) => "bridge API: ",
        }
    }
}

/// Where a started agent is reached.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ready {
    pub api: SocketAddr,
    /// The operator's listener (metrics, probes, the status page), unless off.
    pub metrics: Option<SocketAddr>,
}

/// The gossip keyring to start with. A keyring file in the data directory wins (the shell
/// reads it again); without one, `gossip.encrypt` decides, and TLS on without a key is an
/// error. Warns at every start while gossip is not fully encrypted.
async fn start_keyring(config: &Config, tls_on: bool) -> anyhow::Result<patina_gossip::Keyring> {
    let path = config.data_dir.join(patina_gossip::shell::KEYRING_FILE);
    let kept = tokio::task::spawn_blocking(move || patina_gossip::shell::read_keyring(&path))
        .await?
        .map_err(|e| anyhow::anyhow!("the gossip keyring file does not load: {e}"))?;
    let ring = match kept {
        Some(ring) => ring,
        None => config.gossip.keyring(tls_on)?,
    };
    if ring.primary().is_none() {
        tracing::warn!(
            "gossip is not encrypted: anyone who reaches this agent's UDP ports can join its \
             cluster and push records (set gossip.encrypt, or `patina keyring`)"
        );
    } else if ring.accepts_plaintext() {
        tracing::warn!(
            "gossip takes plaintext datagrams: finish the rolling enable with \
             `patina keyring plaintext refuse`"
        );
    }
    Ok(ring)
}

/// A task that ends when this handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Log the certificates' time left every hour while it is short: a warning under 30 days,
/// an error under 7 (and once expired), naming the peer whose certificate ends first.
fn watch_expiry(trust: patina_trust::Trust) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            every.tick().await;
            let r = trust.expiry();
            let days = |s: i64| s / 86_400;
            let peer = r.soonest_peer.clone().unwrap_or_default();
            match r.state {
                patina_trust::Expiry::Ok => {}
                patina_trust::Expiry::Warning => tracing::warn!(
                    own_days = days(r.own_secs),
                    ca_days = days(r.ca_secs),
                    soonest_peer = %peer.0,
                    "a certificate expires within 30 days: rotate it (docs/security.md)"
                ),
                patina_trust::Expiry::Degraded | patina_trust::Expiry::Expired => tracing::error!(
                    own_days = days(r.own_secs),
                    ca_days = days(r.ca_secs),
                    soonest_peer = %peer.0,
                    state = r.state.as_str(),
                    "a certificate expires within 7 days or has expired: rotate it now (docs/security.md)"
                ),
            }
        }
    })
}

/// This agent's TLS material, or `None` when TLS is off (warned at every start). The
/// certificate must grant what the agent's role needs, or every peer would refuse it.
async fn load_trust(
    config: &Config,
    role: &Role,
    scope: &patina_trust::Scope,
) -> anyhow::Result<Option<patina_trust::Trust>> {
    let Some(paths) = config.tls_paths()? else {
        tracing::warn!(
            "TLS is off (tls = \"off\"): anyone who reaches this agent's ports can read, write, \
             forget members and join its cluster; for development and tests only"
        );
        return Ok(None);
    };
    let p = paths.clone();
    let first = tokio::task::spawn_blocking(move || patina_trust::Material::load(&p))
        .await?
        .with_context(|| {
            format!(
                "TLS is on (the default) and its files do not load: {}, {}, {} \
                 (`patina certs` makes them; tls = \"off\" turns TLS off)",
                paths.ca.display(),
                paths.cert.display(),
                paths.key.display()
            )
        })?;
    use patina_trust::{Grant, Role as R, Tier};
    let needed = match role {
        Role::Region | Role::Global => vec![Grant {
            scope: scope.clone(),
            role: R::Agent,
        }],
        Role::Bridge(b) => vec![
            Grant {
                scope: scope.clone(),
                role: R::Bridge(b.region.clone()),
            },
            Grant::new(Tier::Region, &b.region_cluster, R::Reader),
        ],
    };
    for g in needed {
        let held = first.own.grants.contains(&g)
            || (g.role == R::Reader && first.own.allows(&g.scope, patina_trust::Need::Reader));
        anyhow::ensure!(
            held,
            "the certificate {} does not grant {} (this agent's role needs it; every peer would refuse it)",
            paths.cert.display(),
            g.uri()
        );
    }
    let days = (first.own.not_after - patina_trust::reload::now_secs()) / 86_400;
    if days < 30 {
        tracing::warn!(days, "this agent's certificate expires soon");
    }
    Ok(Some(patina_trust::Trust::start(
        first,
        paths,
        patina_trust::reload::CHECK_INTERVAL,
    )))
}

/// Run one agent: open the store, bind, start gossip, serve until `shutdown`, leave the
/// cluster, then close the store cleanly. `label` replaces the announcement line's prefix
/// (the agents of `patina dev` after the first, so that scripts find the first one);
/// `ready` is told where the agent is once it serves.
pub(crate) async fn run_agent(
    config: Config,
    role: Role,
    label: Option<String>,
    ready: Option<tokio::sync::oneshot::Sender<Ready>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    raise_open_file_limit(&config);
    // Every long-lived loop stamps a beat; a thread outside the runtimes watches them.
    let watchdog = patina_watchdog::Watchdog::new();
    let bounds = config.watchdog.bounds()?;
    let budget = bounds.budget;
    let dir = config.data_dir.clone();
    let (mut opts, cluster_default) = match role {
        Role::Region => (config.store.options(&config.region), config.region.as_str()),
        Role::Global | Role::Bridge(_) => (config.store.global_options(), config::GLOBAL_CLUSTER),
    };
    let mut node = config.gossip.node(cluster_default)?;
    opts.max_clock_offset_ms = node.max_clock_offset.as_millis() as u64;
    opts.watchdog = Some(watchdog.clone());
    if let Some(after) = store_stall_from_env() {
        let failpoints = opts.failpoints.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            failpoints.arm(patina_store::InjectedFault::Stall(
                std::time::Duration::from_secs(3600),
            ));
        });
    }
    if let Some((name, after)) = loop_block_from_env() {
        patina_watchdog::block_loop_after(&name, after);
    }
    if let Some(clock) = stepped_clock_from_env() {
        opts.clock = clock;
    }
    // An edge cut off from the world answers from its last known state (docs/global.md).
    node.fail_static = !matches!(role, Role::Region);
    let scope = match role {
        Role::Region => patina_trust::Scope::new(patina_trust::Tier::Region, node.cluster.as_str()),
        Role::Global | Role::Bridge(_) => {
            patina_trust::Scope::new(patina_trust::Tier::Global, node.cluster.as_str())
        }
    };
    let trust = load_trust(&config, &role, &scope).await?;
    // Ends with the agent (aborted when this function returns).
    let _expiry = trust.clone().map(watch_expiry).map(AbortOnDrop);
    node.keyring = start_keyring(&config, trust.is_some()).await?;
    let dial = match &trust {
        Some(t) => patina_trust::Dial::tls(t.clone(), scope.clone()),
        None => patina_trust::Dial::Plain,
    };
    let mut role = role;
    if let Role::Bridge(bridge) = &mut role {
        // Its region's agents: of the region's cluster (named after the region unless
        // `bridge.region_cluster` says otherwise).
        bridge.dial = dial.to(patina_trust::Scope::new(
            patina_trust::Tier::Region,
            bridge.region_cluster.as_str(),
        ));
        // It signs what it publishes with its certificate's key.
        bridge.signer = trust.clone();
        bridge.watchdog = Some(watchdog.clone());
    }
    // Global agents and bridges hold every summary of the tier: their stores keep them lean
    // (a key hash and a revision each in memory; a global agent's lookups read the service's
    // table, a bridge reads only its own records back, by origin).
    opts.lean = matches!(role, Role::Global | Role::Bridge(_));
    if let (Role::Global | Role::Bridge(_), Some(trust)) = (&role, &trust) {
        // A peer's heartbeats and summaries are taken only when a bridge of their region
        // signed them.
        let verifier = Arc::new(patina_trust::Verifier::new(trust.clone()));
        opts.kind = Arc::new(patina_global::SummaryKind::signed(verifier, scope.clone()));
    }
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, opts))
        .await?
        .with_context(|| format!("opening the store in {}", config.data_dir.display()))?;
    if let Some(after) = feed_lock_from_env() {
        let held = store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            held.hold_feed_lock(std::time::Duration::from_secs(3600));
        });
    }
    if let Role::Bridge(bridge) = &role
        && let Err(why) = patina_global::bridge::check_registration(&store, &bridge.region)
    {
        let closing = store.clone();
        tokio::task::spawn_blocking(move || closing.close()).await?;
        anyhow::bail!("{why}");
    }
    let mut limits: patina_region::Limits = (&config.limits).into();
    // What clients hold open, counted for the metrics.
    limits.occupancy = patina_region::limits::Occupancy::new();
    // Gossip leaves the cluster when the agent shuts down, and only then does the server stop.
    let gossip_addr = config.gossip.listen_addr(config.listen);
    // One signal stops the agent: `stop`, cancelled by a signal or when a part of the agent
    // ends before it was asked to (then `failed` says which, and the agent reports
    // NOT_SERVING, ends its watches and exits non-zero, as for a failed store). The teardown
    // is ordered: the bridge stops publishing, then gossip leaves the cluster, and only then
    // does the server stop.
    let stop = CancellationToken::new();
    let failed: Arc<std::sync::OnceLock<Arc<str>>> = Arc::default();
    let gossip_stop = CancellationToken::new();
    let mut attempt = 0;
    let (listener, addr, gossip, shell) = loop {
        attempt += 1;
        let listener = bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        let shell = patina_gossip::shell::ShellConfig {
            node: node.clone(),
            listen: gossip_addr,
            advertise: config.gossip.advertise,
            api_port: addr.port(),
            seeds: config.gossip.seeds.clone(),
            epoch_file: config.data_dir.join("gossip-epoch"),
            seed: None,
            tombstone_ttl: config.gossip.tombstone_ttl(),
            region: match role {
                Role::Region => config.region.clone(),
                Role::Global | Role::Bridge(_) => String::new(),
            },
            fault: fault_from_env(),
            dial: dial.clone(),
            watchdog: Some(watchdog.clone()),
            stream_max_age: limits.max_connection_age,
        };
        let started =
            patina_gossip::shell::Gossip::start(store.clone(), shell, gossip_stop.clone()).await;
        match started {
            Ok((gossip, shell)) => break (listener, addr, gossip, shell),
            // Pushes arrive on UDP at the API's port number. A port the OS picked for the
            // API (`--listen ...:0`, as in tests) can be in use as a UDP port already (by
            // another agent's gossip socket): pick another one.
            Err(e)
                if config.listen.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < 5 =>
            {
                tracing::warn!(port = addr.port(), error = %e, "the API's port is taken as a UDP port: picking another");
            }
            Err(e) => {
                return Err(
                    anyhow::Error::from(e).context(format!("starting gossip on udp {gossip_addr}"))
                );
            }
        }
    };
    // Scripts and tests read this line to find the agent.
    println!(
        "{}http://{addr}",
        label.as_deref().unwrap_or(role.announce())
    );
    // Scripts and tests read this line to find the agent's gossip address.
    println!("gossip: udp {}", gossip.advertised);
    // systemd (`Type=notify`): ready now, and `WATCHDOG=1` while every loop is fresh.
    let notify = patina_watchdog::Notify::from_env().map(Arc::new);
    if let Some(n) = &notify {
        n.send("READY=1");
    }
    // The runtime's own beat: a task that stamps it, so a runtime whose workers are all
    // blocked is seen.
    let _runtime_beat = {
        let beat = watchdog.register("runtime");
        AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(patina_watchdog::STAMP_EVERY);
            loop {
                every.tick().await;
                beat.stamp();
            }
        }))
    };
    // Past the fatal bound: the agent turns NOT_SERVING and stops (leaving the cluster if
    // gossip still turns), and whatever its runtime does, the process exits with 70 soon
    // after, for its supervisor to restart it.
    {
        let (stop, failed, notify, leave) = (
            stop.clone(),
            failed.clone(),
            notify.clone(),
            gossip_stop.clone(),
        );
        watchdog.spawn_monitor(
            bounds,
            move || {
                if let Some(n) = &notify {
                    n.send("WATCHDOG=1");
                }
            },
            move |why| {
                WATCHDOG_FIRED.store(true, std::sync::atomic::Ordering::Relaxed);
                let _ = failed.set(Arc::from(format!("watchdog: {why}")));
                // Everything at once, not the ordered teardown: leave the cluster now (if
                // gossip turns), stop serving; the process exits within the grace anyway.
                leave.cancel();
                stop.cancel();
                let _ = std::thread::Builder::new()
                    .name("patina-watchdog-exit".into())
                    .spawn(|| {
                        std::thread::sleep(WATCHDOG_EXIT_GRACE);
                        std::process::exit(i32::from(WATCHDOG_EXIT_CODE));
                    });
            },
        )?;
    }
    // The operator's listener is bound now, so that `ready` can say where it is.
    let metrics_listener = match config.metrics.listen_addr(addr)? {
        Some(at) => Some(bind(at).with_context(|| format!("binding metrics.listen {at}"))?),
        None => None,
    };
    let metrics = metrics_listener
        .as_ref()
        .map(tokio::net::TcpListener::local_addr)
        .transpose()?;
    if let Some(ready) = ready {
        let _ = ready.send(Ready { api: addr, metrics });
    }
    // The agent's readiness (`/readyz`), judged every second: gRPC health follows it.
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let mut cluster = patina_region::ClusterServices {
        sync: gossip.sync_service().into_server(),
        admin: gossip.admin_service().into_server(),
        gossip: gossip.clone(),
        ready: Some(ready_rx),
        extra: None,
    };
    // The parts that must run as long as the agent, each named; the first to end before
    // `stop` is the agent's failure.
    let mut parts: JoinSet<Result<(), Arc<str>>> = JoinSet::new();
    // The gossip shell's end is awaited twice: by the supervisor and by the teardown.
    let shell_done = CancellationToken::new();
    {
        let done = shell_done.clone();
        parts.spawn(async move {
            let ended = match shell.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(Arc::from(format!("gossip: {e}"))),
                Err(e) => Err(Arc::from(format!("gossip: its supervisor failed: {e}"))),
            };
            done.cancel();
            ended.and(Err(Arc::from("gossip ended")))
        });
    }
    let role_name = match &role {
        Role::Region => "region",
        Role::Global => "global",
        Role::Bridge(_) => "bridge",
    };
    let bridge_stop = CancellationToken::new();
    let bridge_done = CancellationToken::new();
    let mut has_bridge = false;
    let mut bridge_stats = None;
    // A region agent runs the checks of its host's machines (docs/checks.md).
    let check_stats = match role {
        Role::Region => {
            let stats = Arc::new(patina_region::checks::CheckStats::default());
            let run = patina_region::checks::run(
                store.clone(),
                config.host.clone(),
                config.checks.runner()?,
                stats.clone(),
                watchdog.register("checks"),
            );
            parts.spawn(async move {
                run.await;
                Err(Arc::from("the check runner ended"))
            });
            Some(stats)
        }
        Role::Global | Role::Bridge(_) => None,
    };
    let table = match role {
        Role::Region => None,
        Role::Global | Role::Bridge(_) => {
            let table = Arc::new(patina_edge::Table::new(
                config.global.region_table()?,
                config.global.stale_after(),
            ));
            let follower = patina_global::service::follow_store(
                store.clone(),
                table.clone(),
                watchdog.register("table_follower"),
            );
            parts.spawn(async move {
                follower.await;
                Err(Arc::from("the table's follower ended"))
            });
            // Regions the table gives no measured round trip are ordered by the global
            // tier's network coordinates.
            let nearness = patina_global::nearness::follow_coordinates(
                gossip.clone(),
                table.clone(),
                config.region.clone(),
            );
            parts.spawn(async move {
                nearness.await;
                Err(Arc::from("the coordinates' follower ended"))
            });
            if let Role::Bridge(cfg) = role {
                has_bridge = true;
                bridge_stats = Some(cfg.stats.clone());
                tracing::info!(region = %cfg.region, agents = ?cfg.region_agents, "bridging the region into the global tier");
                let run = patina_global::bridge::run(
                    store.clone(),
                    *cfg,
                    bridge_stop.clone().cancelled_owned(),
                );
                let done = bridge_done.clone();
                parts.spawn(async move {
                    run.await;
                    done.cancel();
                    Err(Arc::from("the bridge ended"))
                });
            }
            Some(table)
        }
    };
    if !has_bridge {
        bridge_done.cancel();
    }
    // The front ends for stock clients (docs/frontends.md): the xDS server joins the API; the
    // DNS front end listens on its own. Both read one source, kept by a follower (a part).
    let xds_stats = Arc::new(patina_xds::Stats::default());
    // The readiness judge sets it once the agent has caught up with its peers; a region
    // agent's xDS/DNS view waits for it (a fresh or wiped agent's store alone would tell
    // clients that no app exists) when its store started empty and it has peers to catch up
    // with: seeds, and not standalone (an agent without seeds is a cluster's first, or alone).
    // An agent restarted on its data answers from it at once, as it serves ListInstances.
    let (caught_up_once, caught_up_rx) = tokio::sync::watch::channel(false);
    let wait_for_peers =
        !config.gossip.seeds.is_empty() && !config.gossip.standalone && store.stats().keys == 0;
    let mut view = None;
    let dns_stats = Arc::new(patina_dns::Stats::default());
    let dns_listen = config.dns.listen_addr()?;
    if config.xds.enabled || dns_listen.is_some() {
        let settings = config.xds.server()?;
        let hub = Arc::new(patina_xds::Hub::new(patina_xds::hub::DEFAULT_LOG));
        let debounce = settings.debounce;
        // xDS streams see an app once announced (after the debounce); DNS sees the latest.
        type Src = Arc<dyn patina_xds::Source>;
        let (source, latest, tier): (Src, Src, patina_dns::Tier) = match &table {
            None => {
                let source = patina_xds::region::RegionSource::new(&config.region);
                let follower = patina_xds::region::follow(
                    store.clone(),
                    source.clone(),
                    hub.clone(),
                    debounce,
                    wait_for_peers.then(|| caught_up_rx.clone()),
                    Some(watchdog.register("xds_follower")),
                );
                view = Some(source.clone());
                parts.spawn(async move {
                    follower.await;
                    Err(Arc::from("the xDS follower ended"))
                });
                let latest = source.latest();
                (
                    source,
                    latest,
                    patina_dns::Tier::Region(config.region.clone()),
                )
            }
            Some(table) => {
                let source = patina_xds::global::GlobalSource::new(table.clone(), &config.region);
                let follower = patina_xds::global::follow(table.clone(), hub.clone(), debounce);
                parts.spawn(async move {
                    follower.await;
                    Err(Arc::from("the xDS follower ended"))
                });
                (source.clone(), source, patina_dns::Tier::Global)
            }
        };
        if let Some(addr) = dns_listen {
            let (udp, tcp) = bind_dns(addr).await?;
            // Scripts and tests read this line to find the DNS front end.
            println!("dns: {}", udp.local_addr()?);
            let zone = Arc::new(patina_dns::Zone::new(
                tier,
                &config.dns.domain,
                latest,
                config.dns.ttl_secs,
                config.dns.max_answers.get(),
            ));
            tracing::info!(addr = %udp.local_addr()?, zone = zone.origin(), "answering DNS");
            let served = patina_dns::serve(
                udp,
                tcp,
                zone,
                config.dns.server()?,
                dns_stats.clone(),
                stop.clone().cancelled_owned(),
            );
            let stopped = stop.clone();
            parts.spawn(async move {
                let r = served.await;
                if stopped.is_cancelled() {
                    return Ok(());
                }
                Err(Arc::from(match r {
                    Ok(()) => "the DNS front end ended".to_owned(),
                    Err(e) => format!("the DNS front end failed: {e}"),
                }))
            });
        }
        if config.xds.enabled {
            let stats = xds_stats.clone();
            cluster.extra = Some(Box::new(move |router, stopping| {
                router.add_service(
                    patina_xds::Ads::new(source, hub, settings, &limits, stopping, stats)
                        .into_server(),
                )
            }));
        }
    }
    let sources = Arc::new(patina_ops::Sources {
        role: role_name,
        store: store.clone(),
        gossip: gossip.clone(),
        table: table.clone(),
        expects_peers: !config.gossip.seeds.is_empty(),
        watchdog: Some((watchdog.clone(), budget)),
        checks: check_stats,
        occupancy: limits.occupancy,
        bridge: bridge_stats,
        started: std::time::SystemTime::now(),
        xds: config.xds.enabled.then(|| xds_stats.clone()),
        dns: dns_listen.map(|_| dns_stats.clone()),
        caught_up_once,
        view,
    });
    {
        let sources = sources.clone();
        parts.spawn(async move {
            patina_ops::ready::judge(&sources, ready_tx).await;
            Err(Arc::from("the readiness checks ended"))
        });
    }
    // The operator's listener: metrics, /livez, /readyz (a part: it must run as long as
    // the agent).
    if let Some(listener) = metrics_listener {
        // Scripts and tests read this line to find the operator's listener.
        println!("metrics: http://{}", listener.local_addr()?);
        let stopped = stop.clone();
        parts.spawn(async move {
            let served =
                patina_ops::serve(listener, sources, stopped.clone().cancelled_owned()).await;
            if stopped.is_cancelled() {
                // Asked to stop: parts are not awaited past the stop.
                return Ok(());
            }
            Err(Arc::from(match served {
                Ok(()) => "the metrics listener ended".to_owned(),
                Err(e) => format!("the metrics listener failed: {e}"),
            }))
        });
    }
    // The supervisor: the signal, or the first part to end.
    let served_done = CancellationToken::new();
    let supervisor = {
        let (stop, failed, served_done) = (stop.clone(), failed.clone(), served_done.clone());
        let stop_watching = watchdog.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => {
                    tracing::info!("asked to stop");
                    // Loops end one by one now: not a stall.
                    stop_watching.disarm();
                }
                Some(ended) = parts.join_next() => {
                    let why = match ended {
                        Ok(Err(why)) => why,
                        Ok(Ok(())) => Arc::from("a part of the agent ended"),
                        Err(e) => Arc::from(format!("a part of the agent panicked: {e}")),
                    };
                    if !stop.is_cancelled() {
                        tracing::error!(part = %why, "a part of the agent ended: stopping");
                        let _ = failed.set(why);
                    }
                }
                () = stop.cancelled() => {}
            }
            stop.cancel();
            // The teardown awaits the parts it must (the bridge, gossip) through their
            // tokens; the rest (the table's follower) is aborted once the server has stopped.
            served_done.cancelled().await;
            parts.shutdown().await;
        })
    };
    // What the teardown cancels, also cancelled after the server stopped however it did (a
    // failed store drops the teardown): the bridge stops and gossip leaves in every case.
    let (after_bridge, after_gossip, after_shell) =
        (bridge_stop.clone(), gossip_stop.clone(), shell_done.clone());
    let teardown = {
        let (stop, failed) = (stop.clone(), failed.clone());
        async move {
            stop.cancelled().await;
            bridge_stop.cancel();
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, bridge_done.cancelled()).await;
            gossip_stop.cancel();
            let _ = tokio::time::timeout(LEAVE_TIMEOUT, shell_done.cancelled()).await;
            match failed.get() {
                Some(why) => patina_region::Stopped::Failed(why.clone()),
                None => patina_region::Stopped::Asked,
            }
        }
    };
    let server_tls = trust.map(|trust| patina_region::ServerTls { trust, scope });
    let served = match table {
        None => {
            let id = AgentIdentity {
                region: config.region.clone(),
                host: config.host.clone(),
            };
            patina_region::serve(
                listener,
                store.clone(),
                &id,
                limits,
                Some(cluster),
                server_tls,
                teardown,
            )
            .await
        }
        Some(table) => {
            patina_global::serve(
                listener,
                store.clone(),
                table,
                &config.region,
                limits,
                Some(cluster),
                server_tls,
                teardown,
            )
            .await
        }
    };
    // However the server stopped (a failed store too), every part stops.
    stop.cancel();
    after_bridge.cancel();
    after_gossip.cancel();
    let _ = tokio::time::timeout(LEAVE_TIMEOUT, after_shell.cancelled()).await;
    served_done.cancel();
    let _ = supervisor.await;
    drop(gossip);
    let closing = store.clone();
    tokio::task::spawn_blocking(move || closing.close()).await?;
    tracing::info!("stopped");
    served.map_err(anyhow::Error::from)
}

/// The DNS front end's sockets: UDP and TCP on `addr` (with port 0, one free port for both).
async fn bind_dns(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    for _ in 0..32 {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("dns.listen {addr}: binding UDP"))?;
        let at = udp.local_addr()?;
        match tokio::net::TcpListener::bind(at).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() != 0 => {
                return Err(anyhow::anyhow!("dns.listen {addr}: binding TCP: {e}"));
            }
            Err(_) => continue,
        }
    }
    anyhow::bail!("dns.listen {addr}: no port free for both UDP and TCP")
}

/// How long a watchdog's fatal action gives the agent to stop on its own before the
/// process exits with status 70.
const WATCHDOG_EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(1000);

/// How long each step of the teardown may take (the bridge's stop, gossip's leave).
const LEAVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A wall clock that steps: the system's, plus `step_ms` from `after` on. For tests of clock
/// bounds only (`PATINA_FAULT=clock-step-ms=N,after-ms=M`).
struct SteppedClock {
    start: std::time::Instant,
    after: std::time::Duration,
    step_ms: i64,
}

impl patina_store::Clock for SteppedClock {
    fn now_ms(&self) -> u64 {
        let now = patina_store::SystemClock.now_ms();
        if self.start.elapsed() >= self.after {
            now.saturating_add_signed(self.step_ms)
        } else {
            now
        }
    }
}

/// `PATINA_FAULT=clock-step-ms=N,after-ms=M`: this agent's wall clock jumps by N ms M ms
/// after it starts. Said loudly.
fn stepped_clock_from_env() -> Option<Arc<dyn patina_store::Clock>> {
    let v = std::env::var("PATINA_FAULT").ok()?;
    let (step, after) = v.strip_prefix("clock-step-ms=")?.split_once(",after-ms=")?;
    let (step_ms, after_ms): (i64, u64) = (step.parse().ok()?, after.parse().ok()?);
    tracing::warn!(fault = %v, "PATINA_FAULT: fault injection is on (tests only)");
    Some(Arc::new(SteppedClock {
        start: std::time::Instant::now(),
        after: std::time::Duration::from_millis(after_ms),
        step_ms,
    }))
}

/// A fault to inject, for tests of the agent's supervision only: `PATINA_FAULT` set to
/// `gossip-panic-after-ms=N` makes the gossip loop panic N ms after it starts. Said loudly.
fn fault_from_env() -> Option<patina_gossip::shell::Fault> {
    use patina_gossip::shell::Fault;
    let v = std::env::var("PATINA_FAULT").ok()?;
    let after = |prefix: &str| {
        v.strip_prefix(prefix)?
            .parse()
            .ok()
            .map(std::time::Duration::from_millis)
    };
    let fault = after("gossip-panic-after-ms=")
        .map(Fault::GossipPanicAfter)
        .or_else(|| after("gossip-block-after-ms=").map(Fault::GossipBlockAfter))?;
    tracing::warn!(fault = %v, "PATINA_FAULT: fault injection is on (tests only)");
    Some(fault)
}

/// `PATINA_FAULT=store-stall-after-ms=N`: N ms after the start, the store's next group
/// commit stalls its writer thread for an hour (a stuck loop, for the watchdog's tests).
fn store_stall_from_env() -> Option<std::time::Duration> {
    let v = std::env::var("PATINA_FAULT").ok()?;
    let ms = v.strip_prefix("store-stall-after-ms=")?.parse().ok()?;
    tracing::warn!(fault = %v, "PATINA_FAULT: fault injection is on (tests only)");
    Some(std::time::Duration::from_millis(ms))
}

/// `PATINA_FAULT=loop-block=NAME,after-ms=N`: N ms after the start, the watched loop NAME
/// (`docs/operations.md`, "The watchdog") blocks its thread for good at its next stamp (a
/// stuck loop, for the watchdog's tests).
fn loop_block_from_env() -> Option<(String, std::time::Duration)> {
    let v = std::env::var("PATINA_FAULT").ok()?;
    let (name, after) = v.strip_prefix("loop-block=")?.split_once(",after-ms=")?;
    let after = std::time::Duration::from_millis(after.parse().ok()?);
    tracing::warn!(fault = %v, "PATINA_FAULT: fault injection is on (tests only)");
    Some((name.to_owned(), after))
}

/// `PATINA_FAULT=feed-lock-after-ms=N`: N ms after the start, a thread takes the store's
/// change-log lock and keeps it for an hour (a lock a loop needs, held: the writer stops at
/// its next commit).
fn feed_lock_from_env() -> Option<std::time::Duration> {
    let v = std::env::var("PATINA_FAULT").ok()?;
    let ms = v.strip_prefix("feed-lock-after-ms=")?.parse().ok()?;
    tracing::warn!(fault = %v, "PATINA_FAULT: fault injection is on (tests only)");
    Some(std::time::Duration::from_millis(ms))
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not when the future is
/// first polled: a signal that arrives while the agent starts (before anything awaits this)
/// must stop it cleanly, not kill it.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).expect("installing the SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
