//! The command-line client: `patina machine ...`, `patina instances`, `patina watch`,
//! `patina members`, `patina status`, `patina forget`.
//! Human output by default; `--json` prints JSON a program can parse. Stored strings are
//! printed with their control characters escaped, so a value cannot drive the terminal.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use patina_proto::v1::admin_client::AdminClient;
use patina_proto::v1::region_client::RegionClient;
use patina_proto::v1::{
    ClusterStatusRequest, DeleteMachineRequest, ForgetRequest, GetMachineRequest, Health,
    ListInstancesRequest, Machine, MachineState, Member, MembersRequest, UpsertMachineRequest,
    WatchRequest, WhoamiRequest, machine_change, watch_response,
};
use serde::Serialize;
use tonic::transport::Channel;

/// Connect to an agent's admin service.
pub async fn connect_admin(server: &str) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(server).await?))
}

#[derive(Serialize)]
struct MemberJson {
    id: String,
    address: String,
    api_address: String,
    state: String,
    incarnation: u32,
    epoch: u64,
    last_seen_ms_ago: Option<u64>,
}

impl From<&Member> for MemberJson {
    fn from(m: &Member) -> Self {
        MemberJson {
            id: m.id.clone(),
            address: m.address.clone(),
            api_address: m.api_address.clone(),
            state: m.state.clone(),
            incarnation: m.incarnation,
            epoch: m.epoch,
            last_seen_ms_ago: m.last_seen_ms_ago,
        }
    }
}

pub async fn members(server: &str, json: bool) -> anyhow::Result<()> {
    let mut admin = connect_admin(server).await?;
    let r = admin
        .members(MembersRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let mut all: Vec<(bool, &Member)> = r.this.iter().map(|m| (true, m)).collect();
    all.extend(r.members.iter().map(|m| (false, m)));
    if json {
        let list: Vec<MemberJson> = all.iter().map(|(_, m)| MemberJson::from(*m)).collect();
        println!("{}", to_json(&list)?);
        return Ok(());
    }
    println!(
        "{:<18} {:<22} {:<22} {:<8} {:>5} {:>6} {:>10}",
        "ID", "GOSSIP", "API", "STATE", "INC", "EPOCH", "SEEN"
    );
    for (me, m) in all {
        let seen = match (me, m.last_seen_ms_ago) {
            (true, _) => "(this)".to_string(),
            (false, Some(ms)) => format!("{ms} ms"),
            (false, None) => "never".to_string(),
        };
        println!(
            "{:<18} {:<22} {:<22} {:<8} {:>5} {:>6} {:>10}",
            term(&m.id),
            term(&m.address),
            term(&m.api_address),
            term(&m.state),
            m.incarnation,
            m.epoch,
            seen
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct OriginJson {
    origin: String,
    head: u64,
    gaps: u64,
    missing: u64,
    refused: u64,
    /// Of them, stamped too far ahead: the origin's clock is fast.
    clock_ahead: u64,
    hidden: bool,
}

#[derive(Serialize)]
struct PeerJson {
    peer: String,
    last_ms_ago: u64,
    lacking: u64,
    records_in: u64,
    ok: bool,
    sessions: u64,
}

#[derive(Serialize)]
struct ViewJson {
    /// The region the agent serves (empty for the global tier).
    region: String,
    stands: bool,
    /// Why it does not stand (lowercase reason names).
    reasons: Vec<String>,
    members_recent: u32,
    members_alive: u32,
    syncs_completed: u64,
    oldest_gap_ms: u64,
    /// Peers' clocks minus this agent's (median), over how many peers.
    clock_offset_ms: i64,
    clock_samples: u32,
}

#[derive(Serialize)]
struct StatusJson {
    node: String,
    view: Option<ViewJson>,
    keys: u64,
    live: u64,
    revision: u64,
    health: u32,
    origins: Vec<OriginJson>,
    datagrams_in: u64,
    datagrams_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    dropped_datagrams: u64,
    refuted_for_others: u64,
    attend_unreachable: u64,
    down_news_applied: u64,
    tree_prunes: u64,
    tree_grafts: u64,
    tree_grafts_refused: u64,
    tree_from_strangers: u64,
    tree_inbound_replaced: u64,
    syncs: u64,
    sync_failures: u64,
    sync_unstarted: u64,
    sync_records_in: u64,
    sync_records_out: u64,
    sync_bytes_in: u64,
    sync_bytes_out: u64,
    peers: Vec<PeerJson>,
    dropped_no_key: u64,
    dropped_plaintext: u64,
    tls: Option<TlsJson>,
}

#[derive(Serialize)]
struct TlsJson {
    state: String,
    own_expires_in_secs: i64,
    ca_expires_in_secs: i64,
    soonest_peer: String,
    soonest_peer_expires_in_secs: i64,
    reloads: u64,
    reload_failures: u64,
}

/// Seconds as days (or hours, under two days).
fn days(secs: i64) -> String {
    if secs.abs() < 2 * 86_400 {
        format!("{} h", secs / 3600)
    } else {
        format!("{} days", secs / 86_400)
    }
}

pub async fn status(server: &str, json: bool) -> anyhow::Result<()> {
    let mut admin = connect_admin(server).await?;
    let r = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    // Whoami says whether its view stands (an older agent answers without it).
    let me = admin
        .whoami(WhoamiRequest {})
        .await
        .ok()
        .map(|m| m.into_inner());
    let view = me.and_then(|m| {
        let v = m.view?;
        Some(ViewJson {
            region: m.region,
            stands: v.stands,
            reasons: v
                .reasons()
                .map(|r| {
                    r.as_str_name()
                        .trim_start_matches("VIEW_REASON_")
                        .to_lowercase()
                })
                .collect(),
            members_recent: v.members_recent,
            members_alive: v.members_alive,
            syncs_completed: v.syncs_completed,
            oldest_gap_ms: v.oldest_gap_ms,
            clock_offset_ms: v.clock_offset_ms,
            clock_samples: v.clock_samples,
        })
    });
    let s = StatusJson {
        node: r.node,
        view,
        keys: r.keys,
        live: r.live,
        revision: r.revision,
        health: r.health,
        origins: r
            .origins
            .iter()
            .map(|o| OriginJson {
                origin: o.origin.clone(),
                head: o.head,
                gaps: o.gaps,
                missing: o.missing,
                refused: o.refused,
                clock_ahead: o.clock_ahead,
                hidden: o.hidden,
            })
            .collect(),
        datagrams_in: r.datagrams_in,
        datagrams_out: r.datagrams_out,
        bytes_in: r.bytes_in,
        bytes_out: r.bytes_out,
        dropped_datagrams: r.dropped_datagrams,
        refuted_for_others: r.refuted_for_others,
        attend_unreachable: r.attend_unreachable,
        down_news_applied: r.down_news_applied,
        tree_prunes: r.tree_prunes,
        tree_grafts: r.tree_grafts,
        tree_grafts_refused: r.tree_grafts_refused,
        tree_from_strangers: r.tree_from_strangers,
        tree_inbound_replaced: r.tree_inbound_replaced,
        syncs: r.syncs,
        sync_failures: r.sync_failures,
        sync_unstarted: r.sync_unstarted,
        sync_records_in: r.sync_records_in,
        sync_records_out: r.sync_records_out,
        sync_bytes_in: r.sync_bytes_in,
        sync_bytes_out: r.sync_bytes_out,
        peers: r
            .peers
            .iter()
            .map(|p| PeerJson {
                peer: p.peer.clone(),
                last_ms_ago: p.last_ms_ago,
                lacking: p.lacking,
                records_in: p.records_in,
                ok: p.ok,
                sessions: p.sessions,
            })
            .collect(),
        dropped_no_key: r.dropped_no_key,
        dropped_plaintext: r.dropped_plaintext,
        tls: r.tls.map(|t| TlsJson {
            state: t.state,
            own_expires_in_secs: t.own_expires_in_secs,
            ca_expires_in_secs: t.ca_expires_in_secs,
            soonest_peer: t.soonest_peer,
            soonest_peer_expires_in_secs: t.soonest_peer_expires_in_secs,
            reloads: t.reloads,
            reload_failures: t.reload_failures,
        }),
    };
    if json {
        println!("{}", to_json(&s)?);
        return Ok(());
    }
    println!(
        "node {}  keys {}  live {}  revision {}  local health {}",
        term(&s.node),
        s.keys,
        s.live,
        s.revision,
        s.health
    );
    if let Some(v) = &s.view {
        let region = if v.region.is_empty() {
            String::new()
        } else {
            format!("region {}  ", term(&v.region))
        };
        let stands = if v.stands {
            "stands".to_owned()
        } else {
            format!("does not stand ({})", v.reasons.join(", "))
        };
        println!(
            "{region}view {stands}: {} of {} members alive, {} sessions completed, oldest gap {} ms; peers' clocks {:+} ms from this one's ({} sampled)",
            v.members_alive,
            v.members_recent,
            v.syncs_completed,
            v.oldest_gap_ms,
            v.clock_offset_ms,
            v.clock_samples
        );
    }
    match &s.tls {
        Some(t) => {
            let peer = if t.soonest_peer.is_empty() {
                String::new()
            } else {
                format!(
                    "; soonest peer {} in {}",
                    term(&t.soonest_peer),
                    days(t.soonest_peer_expires_in_secs)
                )
            };
            println!(
                "tls {}: certificate expires in {}, CA in {}{peer}; {} sets loaded, {} failed",
                t.state,
                days(t.own_expires_in_secs),
                days(t.ca_expires_in_secs),
                t.reloads,
                t.reload_failures
            );
        }
        None => println!("tls off"),
    }
    println!(
        "gossip: {} datagrams in ({} B), {} out ({} B), {} dropped ({} under no key, {} plaintext refused), {} suspicions refuted for members that answered, {} attended members found killed, {} members suspected on sessions' down news, {} tree prunes and {} grafts sent; sync: {} sessions, {} failed, {} never began, {} records in ({} B), {} out ({} B)",
        s.datagrams_in,
        s.bytes_in,
        s.datagrams_out,
        s.bytes_out,
        s.dropped_datagrams,
        s.dropped_no_key,
        s.dropped_plaintext,
        s.refuted_for_others,
        s.attend_unreachable,
        s.down_news_applied,
        s.tree_prunes,
        s.tree_grafts,
        s.syncs,
        s.sync_failures,
        s.sync_unstarted,
        s.sync_records_in,
        s.sync_bytes_in,
        s.sync_records_out,
        s.sync_bytes_out
    );
    let missing: u64 = s.origins.iter().map(|o| o.missing).sum();
    if missing > 0 {
        // A joining agent learns each origin's head from the first batch (newest first):
        // what is left below it is the catch-up still to come.
        println!("catching up: {missing} versions known to exist and not held yet");
    }
    println!(
        "{:<18} {:>10} {:>6} {:>10} {:>8} {:>11} {:>7}",
        "ORIGIN", "HEAD", "GAPS", "MISSING", "REFUSED", "CLOCK AHEAD", "HIDDEN"
    );
    for o in &s.origins {
        println!(
            "{:<18} {:>10} {:>6} {:>10} {:>8} {:>11} {:>7}",
            term(&o.origin),
            o.head,
            o.gaps,
            o.missing,
            o.refused,
            o.clock_ahead,
            if o.hidden { "yes" } else { "" }
        );
    }
    if !s.peers.is_empty() {
        println!(
            "{:<40} {:>10} {:>10} {:>10} {:>6} {:>9}",
            "SYNC PEER", "AGO (ms)", "LACKING", "RECEIVED", "OK", "SESSIONS"
        );
        for p in &s.peers {
            println!(
                "{:<40} {:>10} {:>10} {:>10} {:>6} {:>9}",
                term(&p.peer),
                p.last_ms_ago,
                p.lacking,
                p.records_in,
                if p.ok { "yes" } else { "no" },
                p.sessions
            );
        }
    }
    Ok(())
}

pub async fn forget(server: &str, member: String) -> anyhow::Result<()> {
    let mut admin = connect_admin(server).await?;
    let r = admin
        .forget(ForgetRequest {
            member: member.clone(),
        })
        .await
        .map_err(status_error)?
        .into_inner();
    println!(
        "forgot {}: {} machines deleted",
        term(&member),
        r.tombstoned
    );
    Ok(())
}

/// Connect to an agent's region service.
pub async fn connect(server: &str) -> anyhow::Result<RegionClient<Channel>> {
    Ok(RegionClient::new(channel(server).await?).max_decoding_message_size(64 * 1024 * 1024))
}

/// How the client commands reach agents: mTLS with the files given, or plaintext when none
/// is (agents with `tls = "off"`).
#[derive(clap::Args, Debug, Default)]
pub struct ClientTls {
    /// Client TLS: a directory holding `ca.pem`, `cert.pem` and `key.pem` (as `patina certs`
    /// writes them); `--tls-ca`, `--tls-cert` and `--tls-key` name files one by one.
    #[arg(long, global = true, env = "PATINA_TLS_DIR")]
    pub tls_dir: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "PATINA_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "PATINA_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, global = true, env = "PATINA_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The cluster the server must be an agent of (`region/NAME` or `global/NAME`): a server
    /// whose certificate names another cluster is refused before any call. Without it, any
    /// agent or bridge the CA vouches for is taken.
    #[arg(long, global = true, env = "PATINA_CLUSTER")]
    pub cluster: Option<String>,
}

static DIAL: std::sync::OnceLock<patina_trust::Dial> = std::sync::OnceLock::new();

impl ClientTls {
    /// The files to use, if any was given.
    pub fn paths(&self) -> Option<patina_trust::Paths> {
        if self.tls_dir.is_none()
            && self.tls_ca.is_none()
            && self.tls_cert.is_none()
            && self.tls_key.is_none()
        {
            return None;
        }
        let dir = self.tls_dir.clone().unwrap_or_default();
        Some(patina_trust::Paths::in_dir(&dir).or_given(
            self.tls_ca.as_ref(),
            self.tls_cert.as_ref(),
            self.tls_key.as_ref(),
        ))
    }

    /// Load the files (once, for this process's client calls).
    pub fn install(&self) -> anyhow::Result<()> {
        let dial = match self.paths() {
            None => patina_trust::Dial::Plain,
            Some(paths) => {
                let m = patina_trust::Material::load(&paths).context("client TLS files")?;
                let trust = patina_trust::Trust::fixed(m);
                match &self.cluster {
                    None => patina_trust::Dial::tls_any(trust),
                    Some(c) => {
                        let scope = patina_trust::Scope::parse(c).with_context(|| {
                            format!("--cluster {c:?}: region/NAME or global/NAME")
                        })?;
                        patina_trust::Dial::tls(trust, scope)
                    }
                }
            }
        };
        let _ = DIAL.set(dial);
        Ok(())
    }
}

/// How this process's client calls reach agents.
pub fn dial() -> patina_trust::Dial {
    DIAL.get().cloned().unwrap_or(patina_trust::Dial::Plain)
}

/// A channel to an agent; `ADDR` may be `host:port` or a full `http://` URL.
async fn channel(server: &str) -> anyhow::Result<Channel> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let endpoint = Channel::from_shared(url.clone())
        .with_context(|| format!("bad server address {server:?}"))?;
    let dial = dial();
    let hint = match dial {
        patina_trust::Dial::Plain => {
            " (agents run with TLS unless tls = \"off\": give the client's files with --tls-dir or PATINA_TLS_DIR)"
        }
        patina_trust::Dial::Tls { .. } => "",
    };
    // A server that accepts but never finishes its TLS handshake must not hang the command.
    tokio::time::timeout(std::time::Duration::from_secs(10), dial.connect(endpoint))
        .await
        .map_err(|_| anyhow::anyhow!("no connection within 10 s"))
        .with_context(|| format!("cannot connect to {url}"))?
        // The error's causes are printed with it (`{:#}`).
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot connect to {url}{hint}"))
}

/// A gRPC error as one readable line: code and message.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    // A plaintext client talking to a TLS agent sees the connection fail at its first call.
    let hint = match (dial(), s.code()) {
        (
            patina_trust::Dial::Plain,
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Internal,
        ) => {
            " (agents run with TLS unless tls = \"off\": give the client's files with --tls-dir or PATINA_TLS_DIR)"
        }
        _ => "",
    };
    anyhow::anyhow!("{:?}: {}{hint}", s.code(), term(s.message()))
}

/// A string from the agent as it may go to a terminal: every control character (C0, DEL and
/// C1, e.g. ESC or U+009B, CSI) written as `\u{..}`, so that a stored value cannot move the
/// cursor, recolour, retitle or clear the terminal. Line breaks are escaped too: one value,
/// one line.
pub fn term(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text that is safe on a terminal and still the same document. serde_json escapes C0
/// controls but writes DEL and C1 (U+007F to U+009F) raw, and terminals act on C1 (U+009B
/// starts an escape sequence). Outside strings JSON holds only ASCII punctuation and
/// whitespace, so these characters can only be inside strings, where `\u00XX` means them.
pub fn json_safe(json: String) -> String {
    let raw = |c: char| ('\u{7f}'..='\u{9f}').contains(&c);
    if !json.chars().any(raw) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if raw(c) {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

/// Pretty JSON of `v`, safe on a terminal.
fn to_json(v: &impl Serialize) -> anyhow::Result<String> {
    Ok(json_safe(serde_json::to_string_pretty(v)?))
}

pub fn parse_state(s: &str) -> anyhow::Result<MachineState> {
    MachineState::from_str_name(&format!("MACHINE_STATE_{}", s.to_ascii_uppercase()))
        .filter(|s| *s != MachineState::Unspecified)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "unknown state {s:?}: one of created, starting, started, stopping, stopped, destroyed"
            )
        })
}

pub fn parse_health(s: &str) -> anyhow::Result<Health> {
    Health::from_str_name(&format!("HEALTH_{}", s.to_ascii_uppercase()))
        .filter(|h| *h != Health::Unspecified)
        .ok_or_else(|| anyhow::anyhow!("unknown health {s:?}: one of passing, warning, critical"))
}

fn state_name(v: i32) -> String {
    MachineState::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |s| {
            s.as_str_name()
                .trim_start_matches("MACHINE_STATE_")
                .to_ascii_lowercase()
        },
    )
}

fn health_name(v: i32) -> String {
    Health::try_from(v).map_or_else(
        |_| format!("unknown({v})"),
        |h| {
            h.as_str_name()
                .trim_start_matches("HEALTH_")
                .to_ascii_lowercase()
        },
    )
}

/// A machine as JSON.
#[derive(Serialize)]
pub struct MachineJson {
    pub id: String,
    pub app: String,
    pub region: String,
    pub host: String,
    pub addresses: Vec<String>,
    pub state: String,
    pub health: String,
    pub metadata: BTreeMap<String, String>,
    pub updated_at: String,
    pub version: VersionJson,
}

#[derive(Serialize)]
pub struct VersionJson {
    /// Hex, as logs print node ids.
    pub origin: String,
    pub seq: u64,
    pub hlc: u64,
}

impl From<&Machine> for MachineJson {
    fn from(m: &Machine) -> Self {
        let v = m.version.unwrap_or_default();
        MachineJson {
            id: m.id.clone(),
            app: m.app.clone(),
            region: m.region.clone(),
            host: m.host.clone(),
            addresses: m.addresses.clone(),
            state: state_name(m.state),
            health: health_name(m.health),
            metadata: m
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            updated_at: m.updated_at.map(rfc3339).unwrap_or_default(),
            version: VersionJson {
                origin: format!("{:016x}", v.origin),
                seq: v.seq,
                hlc: v.hlc,
            },
        }
    }
}

/// A timestamp as RFC 3339 UTC with milliseconds.
fn rfc3339(t: prost_types::Timestamp) -> String {
    let secs = t.seconds.max(0) as u64;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        t.nanos.max(0) / 1_000_000
    )
}

fn print_machine(m: &Machine) {
    let j = MachineJson::from(m);
    println!("id:         {}", term(&j.id));
    println!("app:        {}", term(&j.app));
    println!("region:     {}", term(&j.region));
    println!("host:       {}", term(&j.host));
    println!("addresses:  {}", term(&j.addresses.join(", ")));
    println!("state:      {}", j.state);
    println!("health:     {}", j.health);
    for (k, v) in &j.metadata {
        println!("metadata:   {}={}", term(k), term(v));
    }
    println!("updated_at: {}", j.updated_at);
    println!(
        "version:    origin {} seq {} hlc {}",
        j.version.origin, j.version.seq, j.version.hlc
    );
}

/// `patina machine put` options, besides `--server`.
#[derive(clap::Args)]
pub struct PutArgs {
    #[arg(long)]
    pub app: String,
    #[arg(long)]
    pub id: String,
    /// ip:port; repeat for several.
    #[arg(long = "addr")]
    pub addrs: Vec<String>,
    #[arg(long, default_value = "started")]
    pub state: String,
    #[arg(long, default_value = "passing")]
    pub health: String,
    /// Worker host (default: the agent's).
    #[arg(long)]
    pub host: Option<String>,
    /// KEY=VALUE; repeat for several.
    #[arg(long)]
    pub meta: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub async fn machine_put(server: &str, a: PutArgs) -> anyhow::Result<()> {
    let mut metadata = std::collections::HashMap::new();
    for kv in &a.meta {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--meta {kv:?}: expected KEY=VALUE"))?;
        metadata.insert(k.to_owned(), v.to_owned());
    }
    let machine = Machine {
        id: a.id,
        app: a.app,
        host: a.host.unwrap_or_default(),
        addresses: a.addrs,
        state: parse_state(&a.state)? as i32,
        health: parse_health(&a.health)? as i32,
        metadata,
        ..Machine::default()
    };
    let mut client = connect(server).await?;
    let stored = client
        .upsert_machine(UpsertMachineRequest {
            machine: Some(machine),
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .machine
        .context("the agent answered without the stored machine")?;
    if a.json {
        println!("{}", to_json(&MachineJson::from(&stored))?);
    } else {
        print_machine(&stored);
    }
    Ok(())
}

pub async fn machine_get(server: &str, id: String, json: bool) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let m = client
        .get_machine(GetMachineRequest { id })
        .await
        .map_err(status_error)?
        .into_inner()
        .machine
        .context("the agent answered without a machine")?;
    if json {
        println!("{}", to_json(&MachineJson::from(&m))?);
    } else {
        print_machine(&m);
    }
    Ok(())
}

pub async fn machine_rm(server: &str, id: String) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let v = client
        .delete_machine(DeleteMachineRequest { id: id.clone() })
        .await
        .map_err(status_error)?
        .into_inner()
        .version
        .unwrap_or_default();
    println!("deleted {} (seq {})", term(&id), v.seq);
    Ok(())
}

#[derive(Serialize)]
struct InstancesJson {
    app: String,
    include_all: bool,
    machines: Vec<MachineJson>,
}

/// Largest page the agent serves; fewer round trips for big apps.
const LIST_PAGE_SIZE: i32 = 1000;

/// Every page of an app's instances, in id order.
async fn list_all(
    client: &mut RegionClient<Channel>,
    app: &str,
    all: bool,
) -> anyhow::Result<Vec<Machine>> {
    let mut machines = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_instances(ListInstancesRequest {
                app: app.to_owned(),
                include_all: all,
                page_size: LIST_PAGE_SIZE,
                page_token: page_token.clone(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        machines.extend(page.machines);
        if page.next_page_token.is_empty() {
            return Ok(machines);
        }
        // Each token moves past the previous page; one that does not would loop for ever.
        anyhow::ensure!(
            page.next_page_token != page_token,
            "the agent returned the same page token twice"
        );
        page_token = page.next_page_token;
    }
}

pub async fn instances(server: &str, app: String, all: bool, json: bool) -> anyhow::Result<()> {
    let mut client = connect(server).await?;
    let machines = list_all(&mut client, &app, all).await?;
    if json {
        let doc = InstancesJson {
            app,
            include_all: all,
            machines: machines.iter().map(MachineJson::from).collect(),
        };
        println!("{}", to_json(&doc)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<10} {:<9} {:<20} ADDRESSES",
        "ID", "STATE", "HEALTH", "HOST"
    );
    for m in &machines {
        let j = MachineJson::from(m);
        println!(
            "{:<24} {:<10} {:<9} {:<20} {}",
            term(&j.id),
            j.state,
            j.health,
            term(&j.host),
            term(&j.addresses.join(","))
        );
    }
    Ok(())
}

pub async fn watch(
    server: &str,
    app: Option<String>,
    resume: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use watch_response::Kind;
    let mut client = connect(server).await?;
    let mut stream = client
        .watch(WatchRequest {
            app: app.unwrap_or_default(),
            resume_token: resume.unwrap_or_default(),
            heartbeat_ms: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(status_error)? {
        let kind = Kind::try_from(msg.kind).unwrap_or(Kind::Unspecified);
        if json {
            let changes: Vec<serde_json::Value> = msg
                .changes
                .iter()
                .filter_map(|c| c.change.as_ref())
                .map(|c| match c {
                    machine_change::Change::Upserted(m) => {
                        serde_json::json!({"upserted": MachineJson::from(m)})
                    }
                    machine_change::Change::Deleted(d) => {
                        serde_json::json!({"deleted": {"id": d.id, "app": d.app}})
                    }
                })
                .collect();
            let line = serde_json::json!({
                "kind": kind.as_str_name().trim_start_matches("KIND_").to_ascii_lowercase(),
                "reset": msg.reset,
                "changes": changes,
                "resume_token": msg.resume_token,
            });
            println!("{}", json_safe(line.to_string()));
            continue;
        }
        if msg.reset {
            println!("-- reset: a new snapshot follows");
        }
        for c in msg.changes.iter().filter_map(|c| c.change.as_ref()) {
            match c {
                machine_change::Change::Upserted(m) => {
                    let j = MachineJson::from(m);
                    println!(
                        "upsert {} app={} state={} health={} addrs={}",
                        term(&j.id),
                        term(&j.app),
                        j.state,
                        j.health,
                        term(&j.addresses.join(","))
                    );
                }
                machine_change::Change::Deleted(d) => {
                    println!("delete {} app={}", term(&d.id), term(&d.app))
                }
            }
        }
        if kind == Kind::SnapshotDone {
            println!("-- snapshot done");
        }
        if !msg.resume_token.is_empty() {
            println!("-- resume token {}", term(&msg.resume_token));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_text_escapes_every_control_character_and_nothing_else() {
        let cases = [
            ("plain", "plain"),
            ("zone=a/b é ✓", "zone=a/b é ✓"),
            ("\x1b[31mred", "\\u{1b}[31mred"),
            ("bell\x07", "bell\\u{7}"),
            ("del\x7f", "del\\u{7f}"),
            ("csi\u{9b}2J", "csi\\u{9b}2J"),
            ("two\nlines\r", "two\\u{a}lines\\u{d}"),
        ];
        for (raw, shown) in cases {
            assert_eq!(term(raw), shown, "{raw:?}");
        }
    }

    #[test]
    fn json_escapes_del_and_c1_and_still_parses_to_the_same_value() {
        for value in [
            "plain",
            "\x1b[31m",
            "\u{7f}",
            "a\u{9b}2J\u{85}b",
            "\u{a0}\u{9f}",
        ] {
            let text = json_safe(serde_json::to_string(&value).unwrap());
            assert!(
                !text.chars().any(|c| c.is_control()),
                "{value:?} printed as {text:?}"
            );
            let back: String = serde_json::from_str(&text).unwrap();
            assert_eq!(back, value);
        }
    }
}

#[derive(Serialize)]
struct LookupJson {
    app: String,
    regions: Vec<RegionJson>,
}

#[derive(Serialize)]
struct RegionJson {
    region: String,
    healthy: u32,
    total: u32,
    rtt_ms: Option<u32>,
    view_time_ms: u64,
}

/// `patina lookup`: ask a global agent which regions have healthy instances of an app.
pub async fn lookup(
    server: &str,
    app: String,
    from: Option<String>,
    all: bool,
    json: bool,
) -> anyhow::Result<()> {
    let mut client = patina_proto::v1::global_client::GlobalClient::new(channel(server).await?);
    let answer = client
        .lookup_app(patina_proto::v1::LookupAppRequest {
            app,
            from_region: from.unwrap_or_default(),
            include_empty: all,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    if json {
        let doc = LookupJson {
            app: answer.app,
            regions: answer
                .regions
                .into_iter()
                .map(|r| RegionJson {
                    region: r.region,
                    healthy: r.healthy,
                    total: r.total,
                    rtt_ms: r.rtt_ms,
                    view_time_ms: r.view_time_ms,
                })
                .collect(),
        };
        println!("{}", to_json(&doc)?);
        return Ok(());
    }
    if answer.regions.is_empty() {
        println!("no region has healthy instances of {}", term(&answer.app));
        return Ok(());
    }
    println!(
        "{:<16} {:>8} {:>8} {:>8}",
        "REGION", "HEALTHY", "TOTAL", "RTT_MS"
    );
    for r in &answer.regions {
        let rtt = r.rtt_ms.map_or("-".to_owned(), |ms| ms.to_string());
        println!(
            "{:<16} {:>8} {:>8} {:>8}",
            term(&r.region),
            r.healthy,
            r.total,
            rtt
        );
    }
    Ok(())
}
