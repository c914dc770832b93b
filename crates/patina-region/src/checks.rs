//! Health checks run by the agent of a machine's host (`docs/checks.md`).
//!
//! A machine may carry up to [`validate::MAX_CHECKS`] checks: an HTTP GET with an expected
//! status, a TCP connect, or a gRPC health call, each against the machine's first address
//! (its port, or another one the check names), with an interval, a timeout, and how many
//! consecutive results move it (passes before passing, failures before critical). The agent
//! whose host the machine names runs them: at most `max_in_flight` at once, each check's first
//! run spread over its first second, one run of a check at a time. A machine's health is
//! critical while any of its checks is critical, passing once every check passes, and the
//! runner writes only a change of it.
//!
//! A judgement is written as a *successor* of the version it judged
//! ([`LocalWrite::PutAfter`]): one logical tick after it, and only while that version is still
//! the live one. Every write an orchestrator makes later, here or anywhere, is newer and wins,
//! and so does a deletion made anywhere: the runner never overwrites what somebody else wrote,
//! nor brings a deleted machine back. (Upserts of a machine are made at its host's agent only,
//! `validate::machine`, the same store that runs its checks.)
//!
//! Bounded: machines tracked (`max_machines`, others are counted and logged, not checked),
//! checks in flight, one pending run per check, one write in flight per machine, and every
//! probe reads at most [`HTTP_READ_LIMIT`] bytes.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use patina_proto::v1::{Check, Health, Machine, MachineState, check};
use patina_store::{Entry, LocalWrite, Store, StoreError, Version, WatchItem};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::validate;

/// Most bytes an HTTP check reads of a response: its status line is all it needs.
pub const HTTP_READ_LIMIT: usize = 1024;
/// The loop wakes at least this often (the watchdog's beat).
const WAKE_EVERY: Duration = Duration::from_millis(250);
/// A judgement whose write failed (not because a newer write came first) is tried again
/// after this long.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// A failed write is logged at most this often (with how many failed since).
const WARN_EVERY: Duration = Duration::from_secs(10);
/// Most machines remembered as past `max_machines`, to be checked once there is room.
const MAX_SKIPPED: usize = 100_000;

/// The runner's bounds.
#[derive(Debug, Clone)]
pub struct CheckerConfig {
    /// Checks running at once; more that are due wait their turn.
    pub max_in_flight: usize,
    /// Machines whose checks this agent runs; more are counted and not checked.
    pub max_machines: usize,
    /// Whether checks may probe loopback addresses (off: a writer could otherwise aim them at
    /// the host's own services). Link-local, multicast, broadcast and unspecified addresses
    /// are never probed.
    pub allow_loopback: bool,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        CheckerConfig {
            max_in_flight: 64,
            max_machines: 4096,
            allow_loopback: false,
        }
    }
}

/// What the runner did, for metrics and status.
#[derive(Debug, Default)]
pub struct CheckStats {
    /// Machines whose checks run here now.
    pub machines: AtomicU64,
    /// Checks of those machines.
    pub checks: AtomicU64,
    /// Machines with checks on this host that are not checked: past `max_machines`.
    pub untracked: AtomicU64,
    /// Check runs that passed.
    pub passed: AtomicU64,
    /// Check runs that failed (an error, a wrong status, or the timeout).
    pub failed: AtomicU64,
    /// Changes of a machine's health written.
    pub transitions: AtomicU64,
    /// Writes of a judgement that failed (other than a newer write winning).
    pub write_errors: AtomicU64,
    /// Runs that started later than due by more than a second (too many checks at once).
    pub late_runs: AtomicU64,
}

/// One check, as the runner runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub name: String,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub passes: u32,
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Http {
        addr: SocketAddr,
        path: String,
        /// 0: any 2xx.
        expect: u16,
    },
    Tcp {
        addr: SocketAddr,
    },
    Grpc {
        addr: SocketAddr,
        service: String,
    },
}

/// The checks of a valid machine, with defaults filled in; `None` for a machine that
/// validation would refuse (never stored).
pub fn specs(m: &Machine) -> Option<Vec<Spec>> {
    let first: SocketAddr = m.addresses.first()?.parse().ok()?;
    m.checks
        .iter()
        .enumerate()
        .map(|(i, c)| spec(c, i, first))
        .collect()
}

fn spec(c: &Check, i: usize, first: SocketAddr) -> Option<Spec> {
    let at = |port: u32| {
        let port = if port == 0 {
            first.port()
        } else {
            u16::try_from(port).ok()?
        };
        Some(SocketAddr::new(first.ip(), port))
    };
    let probe = match c.target.as_ref()? {
        check::Target::Http(h) => Probe::Http {
            addr: at(h.port)?,
            path: if h.path.is_empty() {
                "/".into()
            } else {
                h.path.clone()
            },
            expect: u16::try_from(h.expect_status).ok()?,
        },
        check::Target::Tcp(t) => Probe::Tcp { addr: at(t.port)? },
        check::Target::Grpc(g) => Probe::Grpc {
            addr: at(g.port)?,
            service: g.service.clone(),
        },
    };
    let (interval, timeout) = validate::check_timing(c);
    Some(Spec {
        name: if c.name.is_empty() {
            format!("check-{i}")
        } else {
            c.name.clone()
        },
        probe,
        interval,
        timeout,
        passes: c.passes_before_passing.max(1),
        failures: c.failures_before_critical.max(1),
    })
}

/// Run the checks of this host's machines until the store closes.
pub async fn run(
    store: Store,
    host: String,
    config: CheckerConfig,
    stats: Arc<CheckStats>,
    beat: patina_watchdog::Beat,
) {
    let mut runner = Runner {
        store: store.clone(),
        host,
        config,
        stats,
        machines: HashMap::new(),
        checks: 0,
        dirty: HashSet::new(),
        due: BinaryHeap::new(),
        generation: 0,
        warned_untracked: false,
        skipped: std::collections::BTreeSet::new(),
        retry_at: HashMap::new(),
        next_retry: None,
        failed_writes: 0,
        warned_at: None,
    };
    let mut cursor = store.watch(None, None, 256);
    let mut probes: JoinSet<Outcome> = JoinSet::new();
    let mut writes: JoinSet<Written> = JoinSet::new();
    loop {
        beat.stamp();
        runner.launch_due(&mut probes);
        let wake = runner
            .due
            .peek()
            .map(|Reverse(d)| d.at)
            .filter(|_| probes.len() < runner.config.max_in_flight)
            .unwrap_or_else(|| Instant::now() + WAKE_EVERY)
            .min(Instant::now() + WAKE_EVERY);
        tokio::select! {
            item = cursor.next() => match item {
                Some(item) => runner.take(item),
                None => return,
            },
            Some(done) = probes.join_next(), if !probes.is_empty() => {
                if let Ok(outcome) = done {
                    runner.result(outcome);
                }
            }
            Some(done) = writes.join_next(), if !writes.is_empty() => {
                if let Ok(w) = done {
                    runner.written(w);
                }
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
        runner.retries_due();
        runner.write_judgements(&mut writes);
    }
}

/// A run that is due.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Due {
    at: Instant,
    id: String,
    check: usize,
    generation: u64,
}

/// A judgement's write, answered.
struct Written {
    id: String,
    health: Health,
    result: Result<Option<Version>, StoreError>,
}

/// What one run found.
struct Outcome {
    id: String,
    check: usize,
    generation: u64,
    result: Result<(), String>,
}

struct Tracked {
    /// The machine as last seen live, and its version.
    machine: Machine,
    version: Version,
    checks: Vec<CheckState>,
    /// Tells this machine's runs from those of an earlier set of its checks.
    generation: u64,
    /// A write of a judgement is in flight.
    writing: bool,
}

struct CheckState {
    spec: Spec,
    /// `Some(true)` passing, `Some(false)` critical, `None` not known yet.
    status: Option<bool>,
    /// Consecutive results against the status.
    streak: u32,
    /// What the last failure was, for the log.
    last_error: Option<String>,
}

impl Tracked {
    /// The health the checks say: critical while one is critical, passing once all pass.
    fn judgement(&self) -> Option<Health> {
        if self.checks.iter().any(|c| c.status == Some(false)) {
            Some(Health::Critical)
        } else if self.checks.iter().all(|c| c.status == Some(true)) {
            Some(Health::Passing)
        } else {
            None
        }
    }
}

struct Runner {
    store: Store,
    host: String,
    config: CheckerConfig,
    stats: Arc<CheckStats>,
    machines: HashMap<String, Tracked>,
    /// Checks of those machines (kept as they change: the counts are published on every
    /// change the feed brings).
    checks: usize,
    /// Machines whose judgement or record changed since their judgement was last compared
    /// with their record.
    dirty: HashSet<String>,
    due: BinaryHeap<Reverse<Due>>,
    generation: u64,
    warned_untracked: bool,
    /// Machines past `max_machines`, checked once there is room (at most [`MAX_SKIPPED`]).
    skipped: std::collections::BTreeSet<String>,
    /// Judgements whose write failed, and when to try again.
    retry_at: HashMap<String, Instant>,
    /// The earliest of those (the map is scanned only once it is due).
    next_retry: Option<Instant>,
    /// Failed writes since the last warning, and when it was logged.
    failed_writes: u64,
    warned_at: Option<Instant>,
}

impl Runner {
    fn take(&mut self, item: WatchItem) {
        match item {
            WatchItem::Snapshot { reset, entries } => {
                if reset {
                    self.machines.clear();
                    self.checks = 0;
                    self.dirty.clear();
                    self.skipped.clear();
                    self.retry_at.clear();
                    self.next_retry = None;
                }
                for e in &entries {
                    self.observe(e);
                }
            }
            WatchItem::SnapshotDone { .. } => {}
            WatchItem::Delta { changes, .. } => {
                for c in &changes {
                    self.observe(&c.entry);
                }
            }
        }
        self.refill();
        self.publish_counts();
    }

    /// Machines left out for want of room, checked now that there is some.
    fn refill(&mut self) {
        while self.machines.len() < self.config.max_machines {
            let Some(id) = self.skipped.pop_first() else {
                break;
            };
            if let Some(e) = self.store.get_live(&id) {
                self.observe(&e);
            }
        }
    }

    /// Judgements whose retry is due are compared with their record again.
    fn retries_due(&mut self) {
        let now = Instant::now();
        if self.next_retry.is_none_or(|at| at > now) {
            return;
        }
        self.next_retry = None;
        let due: Vec<String> = self
            .retry_at
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            self.retry_at.remove(&id);
            self.dirty.insert(id);
        }
        self.next_retry = self.retry_at.values().min().copied();
    }

    fn publish_counts(&self) {
        self.stats
            .machines
            .store(self.machines.len() as u64, Ordering::Relaxed);
        self.stats
            .untracked
            .store(self.skipped.len() as u64, Ordering::Relaxed);
        self.stats
            .checks
            .store(self.checks as u64, Ordering::Relaxed);
    }

    /// Stop checking `key`'s machine, if it was checked.
    fn untrack(&mut self, key: &str) {
        if let Some(t) = self.machines.remove(key) {
            self.checks -= t.checks.len();
        }
    }

    /// A record's new state: start, change or stop checking its machine.
    fn observe(&mut self, e: &Entry) {
        if e.is_hidden() {
            // Its owner is down: the record itself is unchanged (and a machine of this host
            // is owned by this agent, which is not down).
            return;
        }
        let key = e.key();
        self.skipped.remove(key);
        let machine = e
            .value()
            .and_then(|v| Machine::decode(v).ok())
            .filter(|m| m.host == self.host && !m.checks.is_empty() && checked_state(m.state));
        let Some(machine) = machine else {
            self.untrack(key);
            return;
        };
        let Some(specs) = specs(&machine) else {
            self.untrack(key);
            return;
        };
        let version = e.version();
        if let Some(t) = self.machines.get_mut(key)
            && t.checks.len() == specs.len()
            && t.checks.iter().zip(&specs).all(|(c, s)| c.spec == *s)
        {
            t.machine = machine;
            t.version = version;
            self.dirty.insert(key.to_owned());
            return;
        }
        let is_new = !self.machines.contains_key(key);
        if is_new && self.machines.len() >= self.config.max_machines {
            if self.skipped.len() < MAX_SKIPPED {
                self.skipped.insert(key.to_owned());
            }
            if !self.warned_untracked {
                self.warned_untracked = true;
                tracing::warn!(
                    max = self.config.max_machines,
                    machine = key,
                    "more machines with checks on this host than the agent runs checks for; those past the bound are not checked"
                );
            }
            return;
        }
        // New, or its checks changed: start from what its record says (an agent that restarts
        // does not flap its machines), each check's first run within its first second.
        let seeded = match Health::try_from(machine.health) {
            Ok(Health::Passing) => Some(true),
            Ok(Health::Critical) => Some(false),
            _ => None,
        };
        self.generation += 1;
        let generation = self.generation;
        let now = Instant::now();
        for (i, s) in specs.iter().enumerate() {
            let spread = s.interval.min(Duration::from_secs(1));
            self.due.push(Reverse(Due {
                at: now + spread.mul_f64(random_unit()),
                id: key.to_owned(),
                check: i,
                generation,
            }));
        }
        let checks: Vec<CheckState> = specs
            .into_iter()
            .map(|spec| CheckState {
                spec,
                status: seeded,
                streak: 0,
                last_error: None,
            })
            .collect();
        let writing = self.machines.get(key).is_some_and(|t| t.writing);
        self.untrack(key);
        self.checks += checks.len();
        self.machines.insert(
            key.to_owned(),
            Tracked {
                machine,
                version,
                checks,
                generation,
                writing,
            },
        );
        self.dirty.insert(key.to_owned());
    }

    /// Start every run that is due, up to the bound on runs in flight.
    fn launch_due(&mut self, probes: &mut JoinSet<Outcome>) {
        let now = Instant::now();
        while probes.len() < self.config.max_in_flight {
            match self.due.peek() {
                Some(Reverse(d)) if d.at <= now => {}
                _ => return,
            }
            let Some(Reverse(d)) = self.due.pop() else {
                return;
            };
            let Some(t) = self
                .machines
                .get(&d.id)
                .filter(|t| t.generation == d.generation)
            else {
                continue; // gone, or its checks changed since
            };
            if now.duration_since(d.at) > Duration::from_secs(1) {
                self.stats.late_runs.fetch_add(1, Ordering::Relaxed);
            }
            let spec = t.checks[d.check].spec.clone();
            let refused = refused_target(spec.probe.addr(), self.config.allow_loopback);
            probes.spawn(async move {
                let result = match refused {
                    Some(why) => Err(why),
                    None => match tokio::time::timeout(spec.timeout, probe(&spec.probe)).await {
                        Ok(r) => r,
                        Err(_) => Err(format!("no answer within {} ms", spec.timeout.as_millis())),
                    },
                };
                Outcome {
                    id: d.id,
                    check: d.check,
                    generation: d.generation,
                    result,
                }
            });
        }
    }

    /// A run ended: move its check's status, and schedule its next run.
    fn result(&mut self, o: Outcome) {
        let Some(t) = self
            .machines
            .get_mut(&o.id)
            .filter(|t| t.generation == o.generation)
        else {
            return;
        };
        let c = &mut t.checks[o.check];
        let ok = o.result.is_ok();
        if ok {
            self.stats.passed.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        if c.status == Some(ok) {
            c.streak = 0;
        } else {
            c.streak += 1;
            let needed = if ok { c.spec.passes } else { c.spec.failures };
            if c.streak >= needed {
                c.status = Some(ok);
                c.streak = 0;
                self.dirty.insert(o.id.clone());
            }
        }
        c.last_error = o.result.err();
        // Runs of one check follow each other: the next starts an interval after this one
        // ended, give or take a twentieth.
        let next = c.spec.interval.mul_f64(0.95 + 0.1 * random_unit());
        self.due.push(Reverse(Due {
            at: Instant::now() + next,
            id: o.id,
            check: o.check,
            generation: o.generation,
        }));
    }

    /// Write the judgement of every machine whose record says otherwise (one write per
    /// machine in flight).
    fn write_judgements(&mut self, writes: &mut JoinSet<Written>) {
        let dirty: Vec<String> = self.dirty.drain().collect();
        for id in dirty {
            let Some(t) = self.machines.get_mut(&id) else {
                continue;
            };
            let Some(health) = t.judgement() else {
                continue;
            };
            if t.machine.health == health as i32 {
                continue;
            }
            if t.writing {
                // Compared again once the write in flight is answered.
                self.dirty.insert(id);
                continue;
            }
            t.writing = true;
            let failing: Vec<String> = t
                .checks
                .iter()
                .filter(|c| c.status == Some(false))
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.spec.name,
                        c.last_error.as_deref().unwrap_or("failing")
                    )
                })
                .collect();
            tracing::info!(
                machine = %id,
                app = %t.machine.app,
                from = ?Health::try_from(t.machine.health).unwrap_or(Health::Unspecified),
                to = ?health,
                failing = ?failing,
                "a machine's checks changed its health"
            );
            let mut m = t.machine.clone();
            m.health = health as i32;
            m.health_from_checks = true;
            m.version = None;
            m.updated_at = None;
            let op = LocalWrite::PutAfter {
                key: id.clone(),
                group: m.app.clone(),
                value: m.encode_to_vec(),
                version: t.version,
            };
            let store = self.store.clone();
            writes.spawn(async move {
                let result = store.write(vec![op]).await.map(|v| v.first().copied());
                Written { id, health, result }
            });
        }
    }

    fn written(&mut self, w: Written) {
        let Written { id, health, result } = w;
        if let Some(t) = self.machines.get_mut(&id) {
            t.writing = false;
            // What it wrote stands until the feed brings something newer.
            if let Ok(Some(version)) = &result
                && *version > t.version
            {
                t.version = *version;
                t.machine.health = health as i32;
            }
        }
        match result {
            Ok(_) => {
                self.stats.transitions.fetch_add(1, Ordering::Relaxed);
                self.dirty.insert(id);
            }
            // A newer write (the orchestrator's, a deletion) came first: the feed brings it,
            // and the judgement is compared with it then (`observe`).
            Err(StoreError::Changed(_) | StoreError::NotFound(_)) => {}
            // Anything else (the clock fence, a full disk, a full queue, a version this
            // store would not take): again after a pause, logged at most every WARN_EVERY.
            Err(e) => {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                self.failed_writes += 1;
                let now = Instant::now();
                if self
                    .warned_at
                    .is_none_or(|at| now.duration_since(at) >= WARN_EVERY)
                {
                    tracing::warn!(machine = %id, error = %e, failed = self.failed_writes, "writing a machine's health from its checks failed; trying again");
                    self.warned_at = Some(now);
                    self.failed_writes = 0;
                }
                if self.machines.contains_key(&id) {
                    let at = now + RETRY_AFTER;
                    self.next_retry = Some(self.next_retry.map_or(at, |n| n.min(at)));
                    self.retry_at.insert(id, at);
                }
            }
        }
    }
}

impl Probe {
    /// Where it connects.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Probe::Http { addr, .. } | Probe::Tcp { addr } | Probe::Grpc { addr, .. } => *addr,
        }
    }
}

/// Why a check may not connect to `addr`, if it may not: never link-local (a cloud's metadata
/// service lives there), multicast, broadcast or unspecified; loopback only when allowed.
pub fn refused_target(addr: SocketAddr, allow_loopback: bool) -> Option<String> {
    let ip = addr.ip().to_canonical();
    let refused = match ip {
        // 0.0.0.0/8 ("this network"), link-local (169.254/16: clouds' metadata services),
        // broadcast.
        std::net::IpAddr::V4(v4) => v4.octets()[0] == 0 || v4.is_link_local() || v4.is_broadcast(),
        // Link-local (fe80::/10), and AWS's IPv6 metadata service (fd00:ec2::254).
        std::net::IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    };
    if ip.is_unspecified() || ip.is_multicast() || refused {
        return Some(format!(
            "{addr}: checks never probe link-local, metadata-service, multicast, broadcast or unspecified addresses"
        ));
    }
    if ip.is_loopback() && !allow_loopback {
        return Some(format!(
            "{addr}: checks probe loopback addresses only with checks.allow_loopback"
        ));
    }
    None
}

/// Checks run while a machine is meant to be up or on its way: not once it is stopping.
fn checked_state(state: i32) -> bool {
    matches!(
        MachineState::try_from(state),
        Ok(MachineState::Created | MachineState::Starting | MachineState::Started)
    )
}

/// One run of a probe: `Ok` when it passes, else why not.
pub async fn probe(p: &Probe) -> Result<(), String> {
    match p {
        Probe::Tcp { addr } => tokio::net::TcpStream::connect(addr)
            .await
            .map(drop)
            .map_err(|e| format!("tcp {addr}: {e}")),
        Probe::Http { addr, path, expect } => http(*addr, path, *expect).await,
        Probe::Grpc { addr, service } => grpc(*addr, service).await,
    }
}

async fn http(addr: SocketAddr, path: &str, expect: u16) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("http {addr}: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: patina-check\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("http {addr}: {e}"))?;
    let mut buf = vec![0u8; HTTP_READ_LIMIT];
    let mut got = 0;
    let line_end = loop {
        if let Some(end) = buf[..got].windows(2).position(|w| w == b"\r\n") {
            break end;
        }
        if got == buf.len() {
            return Err(format!(
                "http {addr}: no status line in {HTTP_READ_LIMIT} bytes"
            ));
        }
        let n = s
            .read(&mut buf[got..])
            .await
            .map_err(|e| format!("http {addr}: {e}"))?;
        if n == 0 {
            return Err(format!("http {addr}: closed before a status line"));
        }
        got += n;
    };
    let status = parse_status(&buf[..line_end])
        .ok_or_else(|| format!("http {addr}: not an HTTP status line"))?;
    let passes = if expect == 0 {
        (200..300).contains(&status)
    } else {
        status == expect
    };
    if passes {
        Ok(())
    } else {
        Err(format!("http {addr}{path}: status {status}"))
    }
}

/// The status code of `HTTP/1.x NNN reason`.
fn parse_status(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.splitn(3, ' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

async fn grpc(addr: SocketAddr, service: &str) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("grpc {addr}: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("grpc {addr}: {e}"))?;
    let answer = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
        .map_err(|s| format!("grpc {addr}: {:?}: {}", s.code(), s.message()))?;
    let status = answer.into_inner().status;
    if status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!(
            "grpc {addr}: {:?}",
            ServingStatus::try_from(status).unwrap_or(ServingStatus::Unknown)
        ))
    }
}

/// A number in [0, 1) from the standard library's per-process hash keys: enough to spread
/// runs, with no dependency.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status(b"HTTP/1.1 204"), Some(204));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status(b"HTTP/1.1 20 OK"), None);
        assert_eq!(parse_status(b"HTTP/1.1 999 what"), None);
    }

    /// Each probe against a real server, passing and failing.
    #[tokio::test]
    async fn probes_pass_and_fail_against_real_servers() {
        use tonic_health::ServingStatus;
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("web", ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let grpc = |service: &str| Probe::Grpc {
            addr,
            service: service.into(),
        };
        assert_eq!(probe(&grpc("web")).await, Ok(()));
        assert_eq!(probe(&Probe::Tcp { addr }).await, Ok(()));
        reporter
            .set_service_status("web", ServingStatus::NotServing)
            .await;
        let err = probe(&grpc("web")).await.unwrap_err();
        assert!(err.contains("NotServing"), "{err}");
        let err = probe(&grpc("other")).await.unwrap_err();
        assert!(err.contains("NotFound"), "{err}");
        // HTTP/2 only: an HTTP/1.1 GET gets no status line it can take.
        let http = Probe::Http {
            addr,
            path: "/".into(),
            expect: 0,
        };
        assert!(
            tokio::time::timeout(Duration::from_secs(2), probe(&http))
                .await
                .is_ok_and(|r| r.is_err())
        );
        server.abort();
        let _ = server.await;
        let err = probe(&Probe::Tcp { addr }).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
        let err = probe(&grpc("web")).await.unwrap_err();
        assert!(err.starts_with("grpc"), "{err}");
    }

    #[test]
    fn checks_never_probe_link_local_or_unspecified_and_loopback_only_when_allowed() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        for bad in [
            "169.254.169.254:80",
            "[fe80::1]:80",
            "224.0.0.1:80",
            "255.255.255.255:80",
            "[::ffff:169.254.169.254]:80",
            "[fd00:ec2::254]:80",
            "0.1.2.3:80",
        ] {
            assert!(refused_target(at(bad), true).is_some(), "{bad}");
        }
        assert!(refused_target(at("127.0.0.1:80"), false).is_some());
        assert!(refused_target(at("[::1]:80"), false).is_some());
        assert!(refused_target(at("127.0.0.1:80"), true).is_none());
        assert!(refused_target(at("10.0.0.7:8080"), false).is_none());
        assert!(refused_target(at("[fdaa::3]:8080"), false).is_none());
    }
}
