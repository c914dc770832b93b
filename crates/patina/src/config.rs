//! Agent configuration: built-in defaults, then a TOML file, then `PATINA_*` environment
//! variables (nested keys with `__`, e.g. `PATINA_STORE__WATCH_LOG_CAPACITY`). Every key is
//! documented in `docs/configuration.md`.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Top-level keys; other `PATINA_*` variables (the CLI's own, such as `PATINA_SERVER`) are
/// not configuration and are ignored here.
const KEYS: &[&str] = &[
    "region", "host", "data_dir", "listen", "log", "store", "limits", "gossip", "global", "bridge",
    "tls", "metrics", "watchdog", "checks",
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The region this agent serves: a DNS label.
    pub region: String,
    /// This worker host's name, stamped on machines written here without one.
    pub host: String,
    /// Where the store keeps its SQLite database.
    pub data_dir: PathBuf,
    /// Address of the gRPC API (region service, health, reflection).
    pub listen: SocketAddr,
    /// Log filter, in `tracing_subscriber::EnvFilter` syntax (`RUST_LOG` overrides it).
    pub log: String,
    pub store: StoreConfig,
    pub limits: LimitsConfig,
    pub gossip: GossipConfig,
    /// The global tier (`patina global`, `patina bridge`): the region table and staleness.
    pub global: GlobalConfig,
    /// A bridge (`patina bridge`): the region agents it follows and its timings.
    pub bridge: BridgeSection,
    /// mTLS on every listener and every connection this agent makes: `"on"` (the default:
    /// the files in `<data_dir>/tls/`), `"off"` (plaintext; dev and tests), or a table naming
    /// the files (`ca`, `cert`, `key`).
    pub tls: TlsSetting,
    /// The operator's HTTP listener: metrics, `/livez`, `/readyz` (`docs/operations.md`).
    pub metrics: MetricsConfig,
    /// The watchdog over the agent's loops (`docs/operations.md`).
    pub watchdog: WatchdogConfig,
    /// Health checks this region agent runs for its host's machines (`docs/checks.md`).
    pub checks: ChecksConfig,
    /// The xDS control plane (ADS) on the API listener (`docs/frontends.md`).
    pub xds: XdsConfig,
    /// The DNS front end (`docs/frontends.md`): off unless `dns.listen` is given.
    pub dns: DnsConfig,
}

/// The DNS front end (`[dns]`): region and global agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// UDP and TCP address to answer on ("ip:port"), or "off" (the default).
    pub listen: Option<String>,
    /// The top of every name: a region agent answers for `REGION.DOMAIN.`, a global agent
    /// for `DOMAIN.`.
    pub domain: String,
    /// TTL of every record (0: resolvers ask again each time, as Consul's default).
    pub ttl_secs: u32,
    /// Most records in an answer section (and as many addresses in the additional one).
    pub max_answers: NonZeroUsize,
    /// Queries a second from one client address; past it UDP queries are dropped and TCP
    /// ones answered REFUSED.
    pub rate_per_client: NonZeroU32,
    /// Open TCP connections; one more is closed at once.
    pub max_tcp_connections: NonZeroUsize,
    /// A TCP connection idle this long is closed.
    pub tcp_idle_ms: NonZeroU64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        let d = patina_dns::Config::default();
        DnsConfig {
            listen: None,
            domain: "patina".into(),
            ttl_secs: 0,
            max_answers: NonZeroUsize::new(64).expect("non-zero"),
            rate_per_client: NonZeroU32::new(d.rate_per_client).expect("non-zero"),
            max_tcp_connections: NonZeroUsize::new(d.max_tcp_connections).expect("non-zero"),
            tcp_idle_ms: NonZeroU64::new(d.tcp_idle.as_millis() as u64).expect("non-zero"),
        }
    }
}

impl DnsConfig {
    /// The address to answer on (`None`: off).
    pub fn listen_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        match self.listen.as_deref().map(str::trim) {
            None | Some("off") => Ok(None),
            Some(a) => a.parse().map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "dns.listen = {a:?}: {e} (an address such as 127.0.0.1:8600, or \"off\")"
                )
            }),
        }
    }

    pub fn server(&self) -> anyhow::Result<patina_dns::Config> {
        anyhow::ensure!(
            !self.domain.is_empty()
                && self
                    .domain
                    .trim_end_matches('.')
                    .split('.')
                    .all(patina_edge::is_dns_label),
            "config: dns.domain must be DNS labels separated by dots (such as \"patina\")"
        );
        anyhow::ensure!(
            self.max_answers.get() <= 1000,
            "config: dns.max_answers must be at most 1000"
        );
        Ok(patina_dns::Config {
            rate_per_client: self.rate_per_client.get(),
            max_tcp_connections: self.max_tcp_connections.get(),
            tcp_idle: std::time::Duration::from_millis(self.tcp_idle_ms.get()),
        })
    }
}

/// The xDS server (`[xds]`): region and global agents.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct XdsConfig {
    /// Serve `envoy.service.discovery.v3.AggregatedDiscoveryService` on the API listener
    /// (behind the reader role when TLS is on).
    pub enabled: bool,
    /// Pushes wait this long after the first change, so that a burst is one push.
    pub debounce_ms: u64,
    /// Open ADS streams on the agent; one more is answered `RESOURCE_EXHAUSTED`.
    pub max_streams: NonZeroUsize,
    /// Resource names one stream may subscribe to by name (the wildcard is not bounded).
    pub max_names_per_stream: NonZeroUsize,
    /// Most bytes of resources in one response.
    pub max_response_bytes: NonZeroUsize,
}

impl Default for XdsConfig {
    fn default() -> Self {
        let d = patina_xds::Config::default();
        XdsConfig {
            enabled: true,
            debounce_ms: d.debounce.as_millis() as u64,
            max_streams: d.max_streams,
            max_names_per_stream: NonZeroUsize::new(d.max_names_per_stream).expect("non-zero"),
            max_response_bytes: NonZeroUsize::new(d.max_response_bytes).expect("non-zero"),
        }
    }
}

impl XdsConfig {
    pub fn server(&self) -> anyhow::Result<patina_xds::Config> {
        anyhow::ensure!(
            self.debounce_ms <= 10_000,
            "config: xds.debounce_ms must be at most 10000"
        );
        anyhow::ensure!(
            (64 * 1024..=patina_region::MAX_MESSAGE_BYTES / 2)
                .contains(&self.max_response_bytes.get()),
            "config: xds.max_response_bytes must be 65536 to {}",
            patina_region::MAX_MESSAGE_BYTES / 2
        );
        anyhow::ensure!(
            self.max_names_per_stream.get() <= 1_000_000,
            "config: xds.max_names_per_stream must be at most 1000000"
        );
        Ok(patina_xds::Config {
            debounce: std::time::Duration::from_millis(self.debounce_ms),
            max_streams: self.max_streams,
            max_names_per_stream: self.max_names_per_stream.get(),
            max_response_bytes: self.max_response_bytes.get(),
        })
    }
}

/// Checks run by the agent (`[checks]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChecksConfig {
    /// Checks running at once; more that are due wait their turn.
    pub max_in_flight: usize,
    /// Machines of this host whose checks the agent runs; more are counted and not checked.
    pub max_machines: usize,
    /// Whether checks may probe loopback addresses (off by default: a writer could aim them
    /// at the host's own services).
    pub allow_loopback: bool,
}

impl Default for ChecksConfig {
    fn default() -> Self {
        let d = patina_region::checks::CheckerConfig::default();
        ChecksConfig {
            max_in_flight: d.max_in_flight,
            max_machines: d.max_machines,
            allow_loopback: d.allow_loopback,
        }
    }
}

impl ChecksConfig {
    pub fn runner(&self) -> anyhow::Result<patina_region::checks::CheckerConfig> {
        anyhow::ensure!(
            (1..=4096).contains(&self.max_in_flight),
            "config: checks.max_in_flight must be 1 to 4096"
        );
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.max_machines),
            "config: checks.max_machines must be 1 to 1000000"
        );
        Ok(patina_region::checks::CheckerConfig {
            max_in_flight: self.max_in_flight,
            max_machines: self.max_machines,
            allow_loopback: self.allow_loopback,
        })
    }
}

/// The watchdog (`[watchdog]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    /// A loop silent this long is logged by name, and `/livez` fails.
    pub budget_ms: u64,
    /// A loop silent this long ends the agent: NOT_SERVING, a leave if gossip still turns,
    /// and an exit with status 70 so its supervisor restarts it.
    pub fatal_ms: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            budget_ms: 2000,
            fatal_ms: 2500,
        }
    }
}

impl WatchdogConfig {
    pub fn bounds(&self) -> anyhow::Result<patina_watchdog::Bounds> {
        anyhow::ensure!(
            self.budget_ms >= 500,
            "config: watchdog.budget_ms must be at least 500 (loops stamp every 250 ms)"
        );
        anyhow::ensure!(
            self.fatal_ms > self.budget_ms,
            "config: watchdog.fatal_ms must be above watchdog.budget_ms"
        );
        Ok(patina_watchdog::Bounds {
            budget: std::time::Duration::from_millis(self.budget_ms),
            fatal: std::time::Duration::from_millis(self.fatal_ms),
        })
    }
}

/// The operator's listener (`[metrics]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address of `/metrics`, `/livez`, `/readyz` and `/v1/health` (plain HTTP,
    /// read-only): an address, or `"off"`. Default: the API's IP, its port + 2 (any free
    /// port when the API's is 0, as in tests).
    pub listen: Option<String>,
}

impl MetricsConfig {
    /// The address to bind (`None`: off).
    pub fn listen_addr(&self, api: SocketAddr) -> anyhow::Result<Option<SocketAddr>> {
        match self.listen.as_deref().map(str::trim) {
            Some("off") => Ok(None),
            Some(a) => a.parse().map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "metrics.listen = {a:?}: {e} (an address such as 127.0.0.1:7602, or \"off\")"
                )
            }),
            None => {
                let port = match api.port() {
                    0 => 0,
                    p => p.wrapping_add(2),
                };
                Ok(Some(SocketAddr::new(api.ip(), port)))
            }
        }
    }
}

/// See [`GossipConfig::dissemination`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DisseminationSetting {
    Push,
    Tree,
}

/// See [`Config::tls`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TlsSetting {
    Mode(String),
    Files(TlsFiles),
}

/// The TLS files; each defaults to its name in `<data_dir>/tls/`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM CA bundle: the CAs whose certificates this agent trusts (old and new together
    /// while a CA rotates). Default `ca.pem`.
    pub ca: Option<PathBuf>,
    /// PEM certificate of this agent (then any intermediates). Default `cert.pem`.
    pub cert: Option<PathBuf>,
    /// PEM private key of that certificate. Default `key.pem`.
    pub key: Option<PathBuf>,
}

impl Config {
    /// The TLS files to use, or `None` when TLS is off.
    pub fn tls_paths(&self) -> anyhow::Result<Option<patina_trust::Paths>> {
        let files = match &self.tls {
            TlsSetting::Mode(m) if m == "off" => return Ok(None),
            TlsSetting::Mode(m) if m == "on" => TlsFiles::default(),
            TlsSetting::Mode(m) => {
                anyhow::bail!("config: tls must be \"on\", \"off\" or a table of files, not {m:?}")
            }
            TlsSetting::Files(f) => f.clone(),
        };
        Ok(Some(
            patina_trust::Paths::in_dir(&self.data_dir.join("tls")).or_given(
                files.ca.as_ref(),
                files.cert.as_ref(),
                files.key.as_ref(),
            ),
        ))
    }
}

/// The global tier's cluster name when `gossip.cluster` is not given.
pub const GLOBAL_CLUSTER: &str = "global";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GlobalConfig {
    /// Where regions are, for nearest-first answers: coordinates and/or measured RTTs.
    pub regions: Vec<patina_edge::RegionSpec>,
    /// A region none of whose live bridges has shown a view newer than this is left out of
    /// lookups (its agents are all down, or cut off from its bridges). 0: never.
    pub stale_after_secs: u64,
}

impl Default for GlobalConfig {
    fn default() -> Self {
        GlobalConfig {
            regions: Vec::new(),
            stale_after_secs: 30,
        }
    }
}

impl GlobalConfig {
    pub fn region_table(&self) -> anyhow::Result<patina_edge::RegionTable> {
        patina_edge::RegionTable::new(self.regions.clone())
            .map_err(|e| anyhow::anyhow!("config: global.regions: {e}"))
    }

    pub fn stale_after(&self) -> Option<std::time::Duration> {
        (self.stale_after_secs > 0).then(|| std::time::Duration::from_secs(self.stale_after_secs))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BridgeSection {
    /// gRPC addresses (`host:port`) of this region's agents, most preferred first. Give every
    /// bridge of a region the same list: they then follow the same agent.
    pub region_agents: Vec<String>,
    /// Count changes that keep an app above zero healthy wait at most this long (1 to 1000).
    pub coalesce_ms: u64,
    /// How much newer a bridge's view must be to replace a disagreeing summary that came
    /// with no news: more than replication takes inside the region.
    pub settle_ms: u64,
    /// How often the bridge's heartbeat is written while its view advances. Keep it well
    /// under `global.stale_after_secs`.
    pub heartbeat_ms: NonZeroU64,
    /// How often a quiet region agent still shows the bridge a current view.
    pub watch_heartbeat_ms: NonZeroU64,
    /// How long the followed agent's view may go on not standing before the bridge moves to
    /// the next agent (1000 to 600000; longer than the agents' `gossip.view_settle_ms`).
    pub unstanding_grace_ms: u64,
    /// The gossip cluster name of the region's agents (their `gossip.cluster`), which their
    /// certificates name: defaults to the region's name, as theirs does.
    pub region_cluster: Option<String>,
}

impl Default for BridgeSection {
    fn default() -> Self {
        let d = patina_global::bridge::BridgeConfig::new("x", Vec::new());
        let ms = |d: std::time::Duration| d.as_millis() as u64;
        BridgeSection {
            region_agents: Vec::new(),
            coalesce_ms: ms(d.timing.coalesce),
            settle_ms: ms(d.timing.settle),
            heartbeat_ms: NonZeroU64::new(ms(d.heartbeat)).expect("non-zero"),
            watch_heartbeat_ms: NonZeroU64::new(ms(d.watch_heartbeat)).expect("non-zero"),
            unstanding_grace_ms: ms(d.unstanding_grace),
            region_cluster: None,
        }
    }
}

impl BridgeSection {
    /// The bridge's configuration for `region`.
    pub fn bridge(&self, region: &str) -> anyhow::Result<patina_global::bridge::BridgeConfig> {
        anyhow::ensure!(
            !self.region_agents.is_empty(),
            "config: bridge.region_agents must list the region's agents"
        );
        anyhow::ensure!(
            (1..=1000).contains(&self.coalesce_ms),
            "config: bridge.coalesce_ms must be between 1 and 1000"
        );
        anyhow::ensure!(
            (100..=600_000).contains(&self.settle_ms),
            "config: bridge.settle_ms must be between 100 and 600000"
        );
        anyhow::ensure!(
            self.heartbeat_ms.get() <= 60_000 && self.watch_heartbeat_ms.get() <= 60_000,
            "config: bridge.heartbeat_ms and bridge.watch_heartbeat_ms must be at most 60000"
        );
        anyhow::ensure!(
            (1_000..=600_000).contains(&self.unstanding_grace_ms),
            "config: bridge.unstanding_grace_ms must be between 1000 and 600000"
        );
        let ms = std::time::Duration::from_millis;
        let mut b = patina_global::bridge::BridgeConfig::new(region, self.region_agents.clone());
        b.unstanding_grace = ms(self.unstanding_grace_ms);
        b.timing.coalesce = ms(self.coalesce_ms);
        b.timing.settle = ms(self.settle_ms);
        b.heartbeat = ms(self.heartbeat_ms.get());
        b.watch_heartbeat = ms(self.watch_heartbeat_ms.get());
        if let Some(c) = &self.region_cluster {
            anyhow::ensure!(
                patina_trust::principal::valid_name(c),
                "config: bridge.region_cluster: 1 to 63 characters of a-z, 0-9, '.', '_' and '-'"
            );
            b.region_cluster = c.clone();
        }
        Ok(b)
    }
}

/// Membership and replication between the agents of one region. See
/// `docs/configuration.md` for why each default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GossipConfig {
    /// Cluster name: agents of another cluster are ignored. Defaults to the region's name.
    pub cluster: Option<String>,
    /// UDP address of SWIM and pushes (default: the API's IP, its port + 1).
    pub listen: Option<SocketAddr>,
    /// UDP address other agents reach this one at (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// Gossip addresses of agents to join through (any few live ones).
    pub seeds: Vec<SocketAddr>,
    pub probe_period_ms: NonZeroU64,
    pub probe_rtt_ms: NonZeroU64,
    pub suspicion_min_ms: NonZeroU64,
    pub suspicion_max_ms: NonZeroU64,
    pub fanout: NonZeroUsize,
    /// Members this agent attends (holds an idle stream to, to find a killed process at
    /// once); 0: none.
    pub attend: usize,
    pub push_fanout: NonZeroUsize,
    pub forward_fanout: NonZeroUsize,
    pub push_hops: u8,
    /// How changes spread: `"push"` (random pushes, a LAN's) or `"tree"` (per-origin trees,
    /// a WAN's).
    pub dissemination: DisseminationSetting,
    pub max_transmissions: std::num::NonZeroU8,
    pub max_datagram_bytes: NonZeroUsize,
    pub sync_interval_ms: NonZeroU64,
    /// Age after which a tombstone (a deletion) is collected.
    pub tombstone_ttl_secs: NonZeroU64,
    /// This agent is its region's only agent: its view stands alone (without members, a
    /// majority or a completed session). Never on an agent of a region with others.
    pub standalone: bool,
    /// After this agent takes a member for down, its view stands again once it has heard from
    /// a majority since, or after this long.
    pub view_settle_ms: NonZeroU64,
    /// A gap in what this agent knows open this long keeps its view from standing.
    pub max_gap_age_ms: NonZeroU64,
    /// How far this agent's clock may be off its peers' (the median of its samples) before
    /// it refuses local writes, and how far ahead of its wall clock it takes a timestamp.
    pub max_clock_offset_ms: NonZeroU64,
    /// The gossip key this agent starts with (32 bytes, base64; `patina keyring generate`),
    /// or "off". Required while TLS is on; once the agent has a keyring file (written at its
    /// first start with a key, and at each `patina keyring` change) the file wins.
    pub encrypt: Option<String>,
}

impl Default for GossipConfig {
    fn default() -> Self {
        let d = patina_gossip::Config::lan(
            patina_gossip::ClusterName::new("default").expect("a valid name"),
        );
        let ms = |d: std::time::Duration| NonZeroU64::new(d.as_millis() as u64).expect("non-zero");
        GossipConfig {
            cluster: None,
            listen: None,
            advertise: None,
            seeds: Vec::new(),
            probe_period_ms: ms(d.probe_period),
            probe_rtt_ms: ms(d.probe_rtt),
            suspicion_min_ms: ms(d.suspicion_min),
            suspicion_max_ms: ms(d.suspicion_max),
            fanout: d.fanout,
            attend: d.attend,
            push_fanout: d.push_fanout,
            forward_fanout: d.forward_fanout,
            push_hops: d.push_hops,
            dissemination: DisseminationSetting::Push,
            max_transmissions: d.max_transmissions,
            max_datagram_bytes: NonZeroUsize::new(d.max_datagram).expect("non-zero"),
            sync_interval_ms: ms(d.sync_interval),
            tombstone_ttl_secs: NonZeroU64::new(
                patina_gossip::shell::DEFAULT_TOMBSTONE_TTL.as_secs(),
            )
            .expect("non-zero"),
            standalone: false,
            view_settle_ms: ms(d.view_settle),
            max_gap_age_ms: ms(d.max_gap_age),
            max_clock_offset_ms: ms(d.max_clock_offset),
            encrypt: None,
        }
    }
}

impl GossipConfig {
    /// The node's configuration for the region `region`.
    pub fn node(&self, region: &str) -> anyhow::Result<patina_gossip::Config> {
        let name = self.cluster.as_deref().unwrap_or(region);
        let cluster = patina_gossip::ClusterName::new(name)
            .map_err(|e| anyhow::anyhow!("config: gossip.cluster: {e}"))?;
        let ms = |v: NonZeroU64| std::time::Duration::from_millis(v.get());
        anyhow::ensure!(
            self.probe_rtt_ms < self.probe_period_ms,
            "config: gossip.probe_rtt_ms must be less than gossip.probe_period_ms"
        );
        anyhow::ensure!(
            self.suspicion_min_ms <= self.suspicion_max_ms,
            "config: gossip.suspicion_min_ms must be at most gossip.suspicion_max_ms"
        );
        anyhow::ensure!(
            (60..=315_360_000).contains(&self.tombstone_ttl_secs.get()),
            "config: gossip.tombstone_ttl_secs must be between 60 (anti-entropy must have run) and 315360000 (10 years)"
        );
        anyhow::ensure!(
            (10..=60_000).contains(&self.max_clock_offset_ms.get()),
            "config: gossip.max_clock_offset_ms must be between 10 and 60000"
        );
        anyhow::ensure!(
            !self.standalone || self.seeds.is_empty(),
            "config: gossip.standalone is for a region's only agent, which has no gossip.seeds"
        );
        anyhow::ensure!(
            self.attend <= 8,
            "config: gossip.attend must be at most 8 (each member is attended by that many others)"
        );
        anyhow::ensure!(
            (576..=65_000).contains(&self.max_datagram_bytes.get()),
            "config: gossip.max_datagram_bytes must be between 576 and 65000"
        );
        Ok(patina_gossip::Config {
            probe_period: ms(self.probe_period_ms),
            probe_rtt: ms(self.probe_rtt_ms),
            suspicion_min: ms(self.suspicion_min_ms),
            suspicion_max: ms(self.suspicion_max_ms),
            fanout: self.fanout,
            attend: self.attend,
            push_fanout: self.push_fanout,
            forward_fanout: self.forward_fanout,
            push_hops: self.push_hops,
            dissemination: match self.dissemination {
                DisseminationSetting::Push => patina_gossip::Dissemination::Push,
                DisseminationSetting::Tree => patina_gossip::Dissemination::Tree,
            },
            max_transmissions: self.max_transmissions,
            max_datagram: self.max_datagram_bytes.get(),
            sync_interval: ms(self.sync_interval_ms),
            retire_after: self.tombstone_ttl(),
            standalone: self.standalone,
            view_settle: ms(self.view_settle_ms),
            max_gap_age: ms(self.max_gap_age_ms),
            max_clock_offset: ms(self.max_clock_offset_ms),
            ..patina_gossip::Config::lan(cluster)
        })
    }

    /// The keyring to start with when the data directory holds none: `gossip.encrypt`'s key
    /// (in use, plaintext refused), or none when it is "off" or (with TLS off) unset.
    pub fn keyring(&self, tls_on: bool) -> anyhow::Result<patina_gossip::Keyring> {
        match self.encrypt.as_deref() {
            Some("off") => Ok(patina_gossip::Keyring::default()),
            Some(key) => {
                let key = patina_gossip::GossipKey::parse(key)
                    .map_err(|e| anyhow::anyhow!("config: gossip.encrypt: {e}"))?;
                Ok(patina_gossip::Keyring::with_key(key))
            }
            None if tls_on => anyhow::bail!(
                "config: gossip.encrypt: gossip is encrypted by default and this agent has no \
                 key: set gossip.encrypt to the cluster's key on every agent (`patina keyring \
                 generate` makes one), or gossip.encrypt = \"off\""
            ),
            None => Ok(patina_gossip::Keyring::default()),
        }
    }

    /// How old a tombstone must be before it is collected.
    pub fn tombstone_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.tombstone_ttl_secs.get())
    }

    /// The UDP address to bind: `listen`, else the API's IP with the API's configured port
    /// + 1 (any free port when the API's is 0, as in tests).
    pub fn listen_addr(&self, api: SocketAddr) -> SocketAddr {
        self.listen.unwrap_or_else(|| {
            let port = match api.port() {
                0 => 0,
                p => p.wrapping_add(1),
            };
            SocketAddr::new(api.ip(), port)
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub write_queue: NonZeroUsize,
    pub write_queue_bytes: NonZeroUsize,
    pub max_batch_ops: NonZeroUsize,
    pub remote_queue: NonZeroUsize,
    pub remote_queue_bytes: NonZeroUsize,
    pub max_remote_batch_ops: NonZeroUsize,
    pub watch_log_capacity: NonZeroUsize,
    pub watch_log_bytes: NonZeroUsize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let d = patina_store::StoreOptions::default();
        StoreConfig {
            write_queue: d.write_queue,
            write_queue_bytes: d.write_queue_bytes,
            max_batch_ops: d.max_batch_ops,
            remote_queue: d.remote_queue,
            remote_queue_bytes: d.remote_queue_bytes,
            max_remote_batch_ops: d.max_remote_batch_ops,
            watch_log_capacity: d.watch_log_capacity,
            watch_log_bytes: d.watch_log_bytes,
        }
    }
}

impl StoreConfig {
    /// Store options for a region agent's store of machines.
    pub fn options(&self, region: &str) -> patina_store::StoreOptions {
        self.options_of(std::sync::Arc::new(patina_region::MachineKind::new(region)))
    }

    /// Store options for a global agent's (or bridge's) store of summaries.
    pub fn global_options(&self) -> patina_store::StoreOptions {
        self.options_of(std::sync::Arc::new(patina_global::SummaryKind::default()))
    }

    fn options_of(&self, kind: patina_store::KindRef) -> patina_store::StoreOptions {
        patina_store::StoreOptions {
            write_queue: self.write_queue,
            write_queue_bytes: self.write_queue_bytes,
            max_batch_ops: self.max_batch_ops,
            remote_queue: self.remote_queue,
            remote_queue_bytes: self.remote_queue_bytes,
            max_remote_batch_ops: self.max_remote_batch_ops,
            watch_log_capacity: self.watch_log_capacity,
            watch_log_bytes: self.watch_log_bytes,
            kind,
            ..patina_store::StoreOptions::default()
        }
    }
}

/// What clients may hold open; see `patina_region::Limits` for why each default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: NonZeroUsize,
    pub handshake_timeout_ms: NonZeroU64,
    pub max_streams_per_connection: NonZeroU32,
    pub max_watches: NonZeroUsize,
    pub max_connection_age_secs: NonZeroU64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let d = patina_region::Limits::default();
        LimitsConfig {
            max_connections: d.max_connections,
            handshake_timeout_ms: NonZeroU64::new(d.handshake_timeout.as_millis() as u64)
                .expect("a non-zero default"),
            max_streams_per_connection: d.max_streams_per_connection,
            max_watches: d.max_watches,
            max_connection_age_secs: NonZeroU64::new(d.max_connection_age.as_secs())
                .expect("a non-zero default"),
        }
    }
}

impl From<&LimitsConfig> for patina_region::Limits {
    fn from(c: &LimitsConfig) -> Self {
        patina_region::Limits {
            max_connections: c.max_connections,
            handshake_timeout: std::time::Duration::from_millis(c.handshake_timeout_ms.get()),
            max_streams_per_connection: c.max_streams_per_connection,
            max_watches: c.max_watches,
            max_connection_age: std::time::Duration::from_secs(c.max_connection_age_secs.get()),
            occupancy: patina_region::limits::Occupancy::default(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            region: "local".into(),
            host: default_host(),
            data_dir: PathBuf::from("patina-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7600)),
            log: "info".into(),
            store: StoreConfig::default(),
            limits: LimitsConfig::default(),
            gossip: GossipConfig::default(),
            global: GlobalConfig::default(),
            bridge: BridgeSection::default(),
            tls: TlsSetting::Mode("on".into()),
            metrics: MetricsConfig::default(),
            watchdog: WatchdogConfig::default(),
            checks: ChecksConfig::default(),
            xds: XdsConfig::default(),
            dns: DnsConfig::default(),
        }
    }
}

/// The machine's host name when it is a valid DNS name, else `localhost`.
fn default_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_ascii_lowercase())
        .filter(|h| patina_region::validate::host_name(h).is_ok())
        .unwrap_or_else(|| "localhost".into())
}

impl Config {
    /// Defaults, then `file` (which must exist when given), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            anyhow::ensure!(
                file.exists(),
                "config file {} does not exist",
                file.display()
            );
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment.merge(Env::prefixed("PATINA_").split("__").filter(|k| {
            let top = k.as_str().split('.').next().unwrap_or_default();
            KEYS.iter().any(|known| known.eq_ignore_ascii_case(top))
        }));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        patina_region::validate::region_name(&self.region)
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        patina_region::validate::host_name(&self.host)
            .map_err(|e| anyhow::anyhow!("config: {e}"))?;
        self.gossip.node(&self.region)?;
        self.global.region_table()?;
        self.tls_paths()?;
        self.watchdog.bounds()?;
        self.checks.runner()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error.
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_env_overrides_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "patina.toml",
                r#"
                region = "ord"
                listen = "127.0.0.1:9000"
                [store]
                watch_log_capacity = 10
                [limits]
                max_connections = 100
                handshake_timeout_ms = 250
                "#,
            )?;
            jail.set_env("PATINA_LISTEN", "127.0.0.1:9100");
            jail.set_env("PATINA_STORE__MAX_BATCH_OPS", "7");
            jail.set_env("PATINA_LIMITS__MAX_WATCHES", "3");
            jail.set_env("PATINA_SERVER", "ignored: not a config key");
            let c = Config::load(Some(Path::new("patina.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.region, "ord");
            assert_eq!(c.listen, "127.0.0.1:9100".parse().unwrap());
            assert_eq!(c.store.watch_log_capacity.get(), 10);
            assert_eq!(c.store.max_batch_ops.get(), 7);
            assert_eq!(c.data_dir, PathBuf::from("patina-data"));
            let limits = patina_region::Limits::from(&c.limits);
            assert_eq!(limits.max_connections.get(), 100);
            assert_eq!(
                limits.handshake_timeout,
                std::time::Duration::from_millis(250)
            );
            assert_eq!(limits.max_watches.get(), 3);
            assert_eq!(limits.max_streams_per_connection.get(), 256, "the default");
            Ok(())
        });
    }

    #[test]
    fn the_example_config_loads_with_its_gossip_table() {
        // Read at run time: a test binary may run from another checkout's target directory.
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
        let path = Path::new(&dir).join("../../deploy/region.example.toml");
        let c = Config::load(Some(&path)).expect("the example config is valid");
        assert_eq!(c.region, "ord");
        assert_eq!(c.gossip.seeds.len(), 3);
        let node = c.gossip.node(&c.region).unwrap();
        assert_eq!(
            node.cluster.as_str(),
            "ord",
            "the cluster defaults to the region"
        );
        assert_eq!(
            c.gossip.listen_addr(c.listen),
            "10.0.0.17:7601".parse().unwrap()
        );
        assert_eq!(c.gossip.tombstone_ttl().as_secs(), 3600);
    }

    /// The examples and the systemd units agree on where the TLS files are: outside the data
    /// directory (which is private to the unit's dynamic user), in /etc/patina/tls.
    #[test]
    fn every_example_reads_its_tls_files_where_the_systemd_units_let_it() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
        for role in ["region", "global", "bridge"] {
            let path = Path::new(&dir).join(format!("../../deploy/{role}.example.toml"));
            let c = Config::load(Some(&path)).expect("the example is valid");
            let paths = c.tls_paths().unwrap().expect("TLS on");
            for file in [&paths.ca, &paths.cert, &paths.key] {
                assert!(
                    file.starts_with("/etc/patina/tls"),
                    "{role}: {}",
                    file.display()
                );
            }
            let unit = std::fs::read_to_string(
                Path::new(&dir).join(format!("../../deploy/systemd/patina-{role}.service")),
            )
            .unwrap();
            assert!(unit.contains("ReadOnlyPaths=/etc/patina"), "{role}");
            assert!(unit.contains("SupplementaryGroups=patina"), "{role}");
        }
    }

    #[test]
    fn the_global_and_bridge_examples_load() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
        let global = Path::new(&dir).join("../../deploy/global.example.toml");
        let c = Config::load(Some(&global)).expect("the global example is valid");
        let table = c.global.region_table().unwrap();
        assert_eq!(table.rtt_ms("ord", "fra"), Some(97), "measured");
        assert!(
            table.rtt_ms("fra", "syd").unwrap() > 100,
            "from coordinates"
        );
        let node = c.gossip.node(GLOBAL_CLUSTER).unwrap();
        assert_eq!(node.cluster.as_str(), "global");
        assert_eq!(
            node.probe_period,
            std::time::Duration::from_secs(1),
            "WAN timings"
        );
        let bridge = Path::new(&dir).join("../../deploy/bridge.example.toml");
        let c = Config::load(Some(&bridge)).expect("the bridge example is valid");
        let b = c.bridge.bridge(&c.region).unwrap();
        assert_eq!(b.region_agents.len(), 3);
        assert_eq!(b.timing.coalesce, std::time::Duration::from_millis(500));
    }

    #[test]
    fn bridge_settings_that_cannot_work_are_refused() {
        let mut b = BridgeSection {
            region_agents: vec!["10.0.0.1:7600".into()],
            ..BridgeSection::default()
        };
        assert_eq!(
            b.bridge("ord").unwrap().region_cluster,
            "ord",
            "the region's name"
        );
        b.region_cluster = Some("ord-prod".into());
        assert_eq!(b.bridge("ord").unwrap().region_cluster, "ord-prod");
        b.region_cluster = Some("Bad Name".into());
        assert!(b.bridge("ord").is_err());
        b.region_cluster = None;
        b.coalesce_ms = 5_000;
        assert!(b.bridge("ord").is_err(), "coalescing above 1 s");
        b.coalesce_ms = 500;
        b.settle_ms = 0;
        assert!(b.bridge("ord").is_err());
        b.settle_ms = 2_000;
        b.region_agents.clear();
        assert!(b.bridge("ord").is_err(), "no agents to follow");
    }

    #[test]
    fn gossip_timings_that_cannot_work_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "rtt.toml",
                "[gossip]\nprobe_rtt_ms = 500\nprobe_period_ms = 200\n",
            )?;
            assert!(Config::load(Some(Path::new("rtt.toml"))).is_err());
            jail.create_file("susp.toml", "[gossip]\nsuspicion_min_ms = 5000\n")?;
            assert!(Config::load(Some(Path::new("susp.toml"))).is_err());
            jail.create_file("name.toml", "[gossip]\ncluster = \"Bad Name\"\n")?;
            assert!(Config::load(Some(Path::new("name.toml"))).is_err());
            jail.create_file("mtu.toml", "[gossip]\nmax_datagram_bytes = 100\n")?;
            assert!(Config::load(Some(Path::new("mtu.toml"))).is_err());
            jail.create_file("ttl.toml", "[gossip]\ntombstone_ttl_secs = 0\n")?;
            assert!(Config::load(Some(Path::new("ttl.toml"))).is_err());
            jail.create_file("ttl1.toml", "[gossip]\ntombstone_ttl_secs = 1\n")?;
            assert!(Config::load(Some(Path::new("ttl1.toml"))).is_err());
            jail.create_file(
                "ok.toml",
                "[gossip]\nseeds = [\"127.0.0.1:7601\"]\nfanout = 4\n",
            )?;
            let c = Config::load(Some(Path::new("ok.toml"))).map_err(|e| e.to_string())?;
            assert_eq!(c.gossip.node("local").unwrap().fanout.get(), 4);
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "regoin = \"ord\"\n")?;
            assert!(Config::load(Some(Path::new("typo.toml"))).is_err());
            jail.create_file("bad.toml", "region = \"Not A Label\"\n")?;
            let err = Config::load(Some(Path::new("bad.toml"))).unwrap_err();
            assert!(format!("{err:#}").contains("region"), "{err:#}");
            jail.create_file("zero.toml", "[store]\nwrite_queue = 0\n")?;
            assert!(Config::load(Some(Path::new("zero.toml"))).is_err());
            jail.create_file("zero-limit.toml", "[limits]\nmax_watches = 0\n")?;
            assert!(Config::load(Some(Path::new("zero-limit.toml"))).is_err());
            jail.create_file("limit-typo.toml", "[limits]\nmax_conections = 5\n")?;
            assert!(Config::load(Some(Path::new("limit-typo.toml"))).is_err());
            assert!(Config::load(Some(Path::new("missing.toml"))).is_err());
            Ok(())
        });
    }
}
