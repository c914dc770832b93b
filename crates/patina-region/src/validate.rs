//! Input validation for machine records. Every rule here is documented in `docs/api.md`; a
//! violation becomes `InvalidArgument` (or `ResourceExhausted` for a size limit) with a
//! message naming the field, and nothing is written.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use patina_proto::v1::{Check, Health, Machine, MachineState, check};
use prost::Message;

/// Longest machine id. Fly-style ids are 14 characters; 64 leaves room for UUIDs and prefixes.
pub const MAX_ID_LEN: usize = 64;
/// A DNS label's limit (RFC 1035), since apps become DNS names.
pub const MAX_APP_LEN: usize = 63;
/// A DNS name's limit (RFC 1035).
pub const MAX_HOST_LEN: usize = 253;
/// Addresses per machine: a few IPs times a few ports is plenty; bounds the record.
pub const MAX_ADDRESSES: usize = 16;
/// Metadata entries per machine.
pub const MAX_METADATA_ENTRIES: usize = 32;
/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 63;
/// Longest metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 1024;
/// Largest encoded machine record, in bytes. Records are replicated to every agent of the
/// region and held in memory: they must stay small.
pub const MAX_RECORD_BYTES: usize = 4096;
/// Most machines in one UpsertMachines call (one transaction, one acknowledgement).
pub const MAX_BATCH: usize = 1000;
/// Most checks on one machine (`checks.rs`).
pub const MAX_CHECKS: usize = 4;
/// A check's shortest and longest interval, and its default.
pub const MIN_CHECK_INTERVAL_MS: u32 = 200;
pub const MAX_CHECK_INTERVAL_MS: u32 = 3_600_000;
pub const DEFAULT_CHECK_INTERVAL_MS: u32 = 10_000;
/// A check's shortest timeout, and its longest default.
pub const MIN_CHECK_TIMEOUT_MS: u32 = 50;
pub const DEFAULT_CHECK_TIMEOUT_MS: u32 = 2_000;
/// Most consecutive results a check may ask for before it changes.
pub const MAX_CHECK_STREAK: u32 = 100;
/// Longest check name, HTTP path and gRPC service name.
pub const MAX_CHECK_NAME_LEN: usize = 32;
pub const MAX_CHECK_PATH_LEN: usize = 256;
pub const MAX_CHECK_SERVICE_LEN: usize = 128;

/// Most characters of a client's string that an error message repeats: enough to recognise
/// it, and a message stays small whatever the client sent (a 1 MiB name must not come back
/// as a 1 MiB status, nor fill the logs of every proxy that prints it).
pub const MAX_ECHO_CHARS: usize = 64;

/// What is wrong with the input, and which kind of wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// Malformed or not allowed: maps to `InvalidArgument`.
    #[error("{0}")]
    Argument(String),
    /// Over a size or count limit: maps to `ResourceExhausted`.
    #[error("{0}")]
    TooLarge(String),
}

impl Invalid {
    /// The same error, with the field path prefixed (e.g. `machines[3].`).
    pub fn at(self, prefix: &str) -> Invalid {
        match self {
            Invalid::Argument(m) => Invalid::Argument(format!("{prefix}{m}")),
            Invalid::TooLarge(m) => Invalid::TooLarge(format!("{prefix}{m}")),
        }
    }
}

/// A client's string as an error message repeats it: Debug-quoted, so control characters are
/// escaped, and cut after [`MAX_ECHO_CHARS`] characters (on a character boundary) with an
/// ellipsis and the full length in bytes.
pub fn echo(s: &str) -> String {
    match s.char_indices().nth(MAX_ECHO_CHARS) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &s[..cut], s.len()),
    }
}

fn arg(msg: impl Into<String>) -> Invalid {
    Invalid::Argument(msg.into())
}

fn too_large(msg: impl Into<String>) -> Invalid {
    Invalid::TooLarge(msg.into())
}

/// Machine ids: 1 to 64 characters from `[A-Za-z0-9_.-]`, starting with a letter or digit.
pub fn machine_id(id: &str) -> Result<(), Invalid> {
    if id.is_empty() {
        return Err(arg("id: must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(arg(format!(
            "id: {} characters, at most {MAX_ID_LEN} allowed",
            id.len()
        )));
    }
    let first_ok = id.as_bytes()[0].is_ascii_alphanumeric();
    let rest_ok = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if !first_ok || !rest_ok {
        return Err(arg(format!(
            "id: {} must be letters, digits, '_', '.' or '-', starting with a letter or digit",
            echo(id)
        )));
    }
    Ok(())
}

/// App names are DNS labels: 1 to 63 characters from `[a-z0-9-]`, not starting or ending
/// with '-'.
pub fn app_name(app: &str) -> Result<(), Invalid> {
    dns_label(app).map_err(|why| arg(format!("app: {} is not a DNS label ({why})", echo(app))))
}

/// Region codes follow the same rule as app names.
pub fn region_name(region: &str) -> Result<(), Invalid> {
    dns_label(region).map_err(|why| {
        arg(format!(
            "region: {} is not a DNS label ({why})",
            echo(region)
        ))
    })
}

fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > MAX_APP_LEN {
        return Err("longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only a-z, 0-9 and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("must not start or end with '-'");
    }
    Ok(())
}

/// Host names: dot-separated DNS labels, at most 253 characters.
pub fn host_name(host: &str) -> Result<(), Invalid> {
    if host.len() > MAX_HOST_LEN {
        return Err(arg(format!("host: longer than {MAX_HOST_LEN} characters")));
    }
    for label in host.split('.') {
        let lower = label.to_ascii_lowercase();
        dns_label(&lower)
            .map_err(|why| arg(format!("host: {} is not a DNS name ({why})", echo(host))))?;
    }
    Ok(())
}

/// A machine ready to store: validated and normalized. (Whether it may be routed to is the
/// record kind's to say: `MachineKind::flags`.)
#[derive(Debug, Clone)]
pub struct ValidMachine {
    pub id: String,
    pub app: String,
    /// The encoded record (version and update time cleared: the store adds those).
    pub encoded: Vec<u8>,
}

/// Validate a machine from a client and fill in this agent's region and host where empty.
pub fn machine(m: &Machine, region: &str, host: &str) -> Result<ValidMachine, Invalid> {
    machine_id(&m.id)?;
    app_name(&m.app)?;
    if !m.region.is_empty() && m.region != region {
        return Err(arg(format!(
            "region: {} is not this agent's region {region:?}; leave it empty or send the write to an agent of that region",
            echo(&m.region)
        )));
    }
    if !m.host.is_empty() {
        host_name(&m.host)?;
        if m.host != host {
            return Err(arg(format!(
                "host: {:?} is not this agent's host {host:?}; leave it empty or write the machine to the agent on its host (that agent owns it: its failure hides the machine)",
                m.host
            )));
        }
    }
    let state = MachineState::try_from(m.state)
        .ok()
        .filter(|s| *s != MachineState::Unspecified)
        .ok_or_else(|| arg(format!("state: {} is not a machine state (created, starting, started, stopping, stopped, destroyed)", m.state)))?;
    let health = Health::try_from(m.health)
        .ok()
        .filter(|h| *h != Health::Unspecified)
        .ok_or_else(|| {
            arg(format!(
                "health: {} is not a health (passing, warning, critical)",
                m.health
            ))
        })?;
    if m.addresses.len() > MAX_ADDRESSES {
        return Err(too_large(format!(
            "addresses: {} given, at most {MAX_ADDRESSES} allowed",
            m.addresses.len()
        )));
    }
    let mut seen = HashSet::new();
    for (i, a) in m.addresses.iter().enumerate() {
        let addr: SocketAddr = a.parse().map_err(|_| {
            arg(format!(
                "addresses[{i}]: {} is not ip:port (use [v6]:port for IPv6)",
                echo(a)
            ))
        })?;
        if addr.port() == 0 || addr.ip().is_unspecified() {
            return Err(arg(format!(
                "addresses[{i}]: {} is not routable (port 0 or an unspecified address)",
                echo(a)
            )));
        }
        if !seen.insert(addr) {
            return Err(arg(format!("addresses[{i}]: {} is listed twice", echo(a))));
        }
    }
    if state == MachineState::Started && m.addresses.is_empty() {
        return Err(arg(
            "addresses: a started machine needs at least one address",
        ));
    }
    if m.metadata.len() > MAX_METADATA_ENTRIES {
        return Err(too_large(format!(
            "metadata: {} entries, at most {MAX_METADATA_ENTRIES} allowed",
            m.metadata.len()
        )));
    }
    for (k, v) in &m.metadata {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_METADATA_KEY_LEN
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'));
        if !key_ok {
            return Err(arg(format!(
                "metadata: key {} must be 1 to {MAX_METADATA_KEY_LEN} characters from [A-Za-z0-9_./-]",
                echo(k)
            )));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            return Err(too_large(format!(
                "metadata[{}]: value of {} bytes, at most {MAX_METADATA_VALUE_LEN} allowed",
                echo(k),
                v.len()
            )));
        }
    }
    checks(m)?;
    let stored = Machine {
        id: m.id.clone(),
        app: m.app.clone(),
        region: region.to_owned(),
        host: if m.host.is_empty() {
            host.to_owned()
        } else {
            m.host.clone()
        },
        addresses: m.addresses.clone(),
        state: state as i32,
        health: health as i32,
        metadata: m.metadata.clone(),
        updated_at: None,
        version: None,
        checks: m.checks.clone(),
        health_from_checks: false,
    };
    let encoded = stored.encode_to_vec();
    if encoded.len() > MAX_RECORD_BYTES {
        return Err(too_large(format!(
            "machine: {} bytes encoded, at most {MAX_RECORD_BYTES} allowed",
            encoded.len()
        )));
    }
    Ok(ValidMachine {
        id: stored.id,
        app: stored.app,
        encoded,
    })
}

/// A check's interval and timeout, defaults filled in.
pub fn check_timing(c: &Check) -> (Duration, Duration) {
    let interval = match c.interval_ms {
        0 => DEFAULT_CHECK_INTERVAL_MS,
        ms => ms,
    };
    let timeout = match c.timeout_ms {
        0 => interval.min(DEFAULT_CHECK_TIMEOUT_MS),
        ms => ms,
    };
    (
        Duration::from_millis(interval.into()),
        Duration::from_millis(timeout.into()),
    )
}

/// A machine's checks: each well formed, names unique, and an address to run them against.
fn checks(m: &Machine) -> Result<(), Invalid> {
    if m.checks.is_empty() {
        return Ok(());
    }
    if m.checks.len() > MAX_CHECKS {
        return Err(too_large(format!(
            "checks: {} given, at most {MAX_CHECKS} allowed",
            m.checks.len()
        )));
    }
    if m.addresses.is_empty() {
        return Err(arg(
            "checks: a machine with checks needs an address (they run against the first)",
        ));
    }
    let mut names = HashSet::new();
    for (i, c) in m.checks.iter().enumerate() {
        let at = |msg: String| arg(format!("checks[{i}].{msg}"));
        let name_ok = c.name.len() <= MAX_CHECK_NAME_LEN
            && c.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(at(format!(
                "name: {} must be at most {MAX_CHECK_NAME_LEN} characters from [a-z0-9-]",
                echo(&c.name)
            )));
        }
        let name = if c.name.is_empty() {
            format!("check-{i}")
        } else {
            c.name.clone()
        };
        if !names.insert(name) {
            return Err(at(format!("name: {} is used twice", echo(&c.name))));
        }
        let port = match &c.target {
            None => return Err(at("target: one of http, tcp or grpc is required".into())),
            Some(check::Target::Http(h)) => {
                let path_ok = h.path.is_empty()
                    || (h.path.starts_with('/')
                        && h.path.len() <= MAX_CHECK_PATH_LEN
                        && h.path.bytes().all(|b| b.is_ascii_graphic()));
                if !path_ok {
                    return Err(at(format!(
                        "http.path: {} must start with '/' and be at most {MAX_CHECK_PATH_LEN} printable characters without spaces",
                        echo(&h.path)
                    )));
                }
                if h.expect_status != 0 && !(100..600).contains(&h.expect_status) {
                    return Err(at(format!(
                        "http.expect_status: {} is not an HTTP status (100 to 599, or 0 for any 2xx)",
                        h.expect_status
                    )));
                }
                ("http", h.port)
            }
            Some(check::Target::Tcp(t)) => ("tcp", t.port),
            Some(check::Target::Grpc(g)) => {
                let ok = g.service.len() <= MAX_CHECK_SERVICE_LEN
                    && g.service.bytes().all(|b| b.is_ascii_graphic());
                if !ok {
                    return Err(at(format!(
                        "grpc.service: {} must be at most {MAX_CHECK_SERVICE_LEN} printable characters without spaces",
                        echo(&g.service)
                    )));
                }
                ("grpc", g.port)
            }
        };
        if port.1 > u32::from(u16::MAX) {
            return Err(at(format!("{}.port: {} is not a port", port.0, port.1)));
        }
        if c.interval_ms != 0
            && !(MIN_CHECK_INTERVAL_MS..=MAX_CHECK_INTERVAL_MS).contains(&c.interval_ms)
        {
            return Err(at(format!(
                "interval_ms: {} is outside {MIN_CHECK_INTERVAL_MS} to {MAX_CHECK_INTERVAL_MS}",
                c.interval_ms
            )));
        }
        let (interval, timeout) = check_timing(c);
        if c.timeout_ms != 0 && (c.timeout_ms < MIN_CHECK_TIMEOUT_MS || timeout > interval) {
            return Err(at(format!(
                "timeout_ms: {} is outside {MIN_CHECK_TIMEOUT_MS} to the interval ({} ms)",
                c.timeout_ms,
                interval.as_millis()
            )));
        }
        for (field, n) in [
            ("passes_before_passing", c.passes_before_passing),
            ("failures_before_critical", c.failures_before_critical),
        ] {
            if n > MAX_CHECK_STREAK {
                return Err(at(format!("{field}: {n}, at most {MAX_CHECK_STREAK}")));
            }
        }
    }
    Ok(())
}

/// Validate a batch: its size, distinct ids, and every machine, naming the bad index.
pub fn batch(ms: &[Machine], region: &str, host: &str) -> Result<Vec<ValidMachine>, Invalid> {
    if ms.is_empty() {
        return Err(arg("machines: empty batch"));
    }
    if ms.len() > MAX_BATCH {
        return Err(too_large(format!(
            "machines: {} in one batch, at most {MAX_BATCH} allowed",
            ms.len()
        )));
    }
    let mut ids = HashSet::with_capacity(ms.len());
    let mut out = Vec::with_capacity(ms.len());
    for (i, m) in ms.iter().enumerate() {
        let valid = machine(m, region, host).map_err(|e| e.at(&format!("machines[{i}].")))?;
        if !ids.insert(valid.id.clone()) {
            return Err(arg(format!(
                "machines[{i}].id: {} appears twice in the batch",
                echo(&m.id)
            )));
        }
        out.push(valid);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Machine {
        Machine {
            id: "e2865013c99d89".into(),
            app: "web".into(),
            addresses: vec!["10.0.0.1:8080".into(), "[fdaa::1]:8080".into()],
            state: MachineState::Started as i32,
            health: Health::Passing as i32,
            ..Machine::default()
        }
    }

    #[test]
    fn a_good_machine_gets_this_agents_region_and_host() {
        let v = machine(&good(), "ord", "worker-1").unwrap();
        let m = Machine::decode(&*v.encoded).unwrap();
        assert_eq!((m.region.as_str(), m.host.as_str()), ("ord", "worker-1"));
    }

    #[test]
    fn only_started_and_passing_is_routable() {
        use patina_store::Kind;
        let kind = crate::kind::MachineKind::new("ord");
        let routable = |m: &Machine| {
            kind.flags(&machine(m, "ord", "h").unwrap().encoded)
                .routable
        };
        let mut m = good();
        assert!(routable(&m));
        m.health = Health::Warning as i32;
        assert!(!routable(&m));
        m.health = Health::Passing as i32;
        m.state = MachineState::Stopping as i32;
        assert!(!routable(&m));
    }

    #[test]
    fn a_machine_of_another_host_is_refused() {
        let mut m = good();
        m.host = "worker-2".into();
        let err = machine(&m, "ord", "worker-1").unwrap_err();
        assert!(matches!(err, Invalid::Argument(_)) && err.to_string().starts_with("host:"));
        m.host = "worker-1".into();
        assert!(machine(&m, "ord", "worker-1").is_ok());
    }

    #[test]
    fn dns_labels_are_enforced() {
        for bad in ["", "Web", "-web", "web-", "we_b", &"a".repeat(64)] {
            assert!(app_name(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["web", "a", "my-app-2", &"a".repeat(63)] {
            assert!(app_name(ok).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn machine_ids_follow_the_documented_format() {
        for bad in ["", "-x", ".x", "a b", "a/b", &"a".repeat(65)] {
            assert!(machine_id(bad).is_err(), "{bad:?} accepted");
        }
        for ok in ["e2865013c99d89", "A_b.c-d", &"a".repeat(64)] {
            assert!(machine_id(ok).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn messages_echo_a_bounded_prefix_of_what_the_client_sent() {
        const MIB: usize = 1024 * 1024;
        // Bounded by MAX_ECHO_CHARS of echo plus the rule's own words.
        const MAX_MESSAGE: usize = 300;
        let huge = "x".repeat(MIB);
        let cases: Vec<(&str, Machine, &str)> = vec![
            (
                "app",
                Machine {
                    app: huge.clone(),
                    ..good()
                },
                "app: ",
            ),
            (
                "region",
                Machine {
                    region: huge.clone(),
                    ..good()
                },
                "region: ",
            ),
            (
                "address",
                Machine {
                    addresses: vec![huge.clone()],
                    ..good()
                },
                "addresses[0]: ",
            ),
            (
                "metadata key",
                Machine {
                    metadata: [(huge.clone(), "v".to_owned())].into(),
                    ..good()
                },
                "metadata: key ",
            ),
            (
                "id with a bad character past the length check",
                Machine {
                    id: format!("{}\u{1b}", "a".repeat(60)),
                    ..good()
                },
                "id: ",
            ),
        ];
        for (name, m, field) in cases {
            let msg = machine(&m, "ord", "h").unwrap_err().to_string();
            assert!(msg.len() < MAX_MESSAGE, "{name}: {} bytes", msg.len());
            assert!(msg.starts_with(field), "{name}: {msg}");
        }
        let msg = host_name(&format!("{}.", "a".repeat(MIB)))
            .unwrap_err()
            .to_string();
        assert!(
            msg.len() < MAX_MESSAGE && msg.starts_with("host: "),
            "{msg}"
        );
        let batch_msg = batch(&[good(), good()], "ord", "h")
            .unwrap_err()
            .to_string();
        assert!(batch_msg.contains("machines[1].id"), "{batch_msg}");
    }

    #[test]
    fn echo_cuts_on_a_character_boundary_and_escapes_controls() {
        let cases = [
            ("web", "\"web\""),
            ("a\u{1b}[31m\n", "\"a\\u{1b}[31m\\n\""),
            (
                &"é".repeat(100),
                &format!("\"{}\"… (200 bytes)", "é".repeat(64)),
            ),
            (&"a".repeat(64), &format!("\"{}\"", "a".repeat(64))),
        ];
        for (input, shown) in cases {
            assert_eq!(echo(input), *shown, "{input:?}");
        }
    }

    #[test]
    fn sizes_are_resource_exhausted_and_shapes_are_invalid() {
        let mut m = good();
        m.metadata
            .insert("k".into(), "v".repeat(MAX_METADATA_VALUE_LEN + 1));
        assert!(matches!(machine(&m, "ord", "h"), Err(Invalid::TooLarge(_))));
        let mut m = good();
        m.addresses = (0..17).map(|i| format!("10.0.0.1:{}", 1000 + i)).collect();
        assert!(matches!(machine(&m, "ord", "h"), Err(Invalid::TooLarge(_))));
        let mut m = good();
        m.addresses = vec!["10.0.0.1".into()];
        assert!(matches!(machine(&m, "ord", "h"), Err(Invalid::Argument(_))));
        let big: Vec<Machine> = (0..=MAX_BATCH)
            .map(|i| Machine {
                id: format!("m{i}"),
                ..good()
            })
            .collect();
        assert!(matches!(batch(&big, "ord", "h"), Err(Invalid::TooLarge(_))));
        let twice = vec![good(), good()];
        let err = batch(&twice, "ord", "h").unwrap_err();
        assert!(err.to_string().contains("machines[1].id"), "{err}");
    }

    #[test]
    fn checks_are_validated_field_by_field() {
        use patina_proto::v1::{GrpcCheck, HttpCheck, TcpCheck};
        let http = |path: &str, expect: u32| Check {
            target: Some(check::Target::Http(HttpCheck {
                port: 0,
                path: path.into(),
                expect_status: expect,
            })),
            ..Check::default()
        };
        let with = |checks: Vec<Check>| Machine { checks, ..good() };
        let tcp = |port: u32| Check {
            name: "tcp".into(),
            target: Some(check::Target::Tcp(TcpCheck { port })),
            ..Check::default()
        };
        let grpc = Check {
            name: "grpc".into(),
            target: Some(check::Target::Grpc(GrpcCheck {
                port: 9000,
                service: "patina.v1.Region".into(),
            })),
            interval_ms: 1_000,
            timeout_ms: 500,
            passes_before_passing: 3,
            failures_before_critical: 2,
        };
        let ok = with(vec![http("/health", 204), tcp(8081), grpc.clone()]);
        let stored = Machine::decode(&*machine(&ok, "ord", "h").unwrap().encoded).unwrap();
        assert_eq!(stored.checks, ok.checks, "checks are stored as given");
        assert_eq!(
            check_timing(&Check::default()),
            (Duration::from_secs(10), Duration::from_secs(2))
        );
        assert_eq!(
            check_timing(&Check {
                interval_ms: 300,
                ..Check::default()
            }),
            (Duration::from_millis(300), Duration::from_millis(300))
        );
        let bad: Vec<(&str, Machine)> = vec![
            ("checks[0].target", with(vec![Check::default()])),
            ("checks[0].http.path", with(vec![http("health", 0)])),
            ("checks[0].http.path", with(vec![http("/a b", 0)])),
            ("checks[0].http.expect_status", with(vec![http("/", 42)])),
            ("checks[1].name", with(vec![tcp(1), tcp(2)])),
            ("checks[0].tcp.port", with(vec![tcp(70_000)])),
            (
                "checks[0].name",
                with(vec![Check {
                    name: "Bad Name".into(),
                    ..tcp(1)
                }]),
            ),
            (
                "checks[0].interval_ms",
                with(vec![Check {
                    interval_ms: 10,
                    ..tcp(1)
                }]),
            ),
            (
                "checks[0].timeout_ms",
                with(vec![Check {
                    timeout_ms: 5_000,
                    interval_ms: 1_000,
                    ..tcp(1)
                }]),
            ),
            (
                "checks[0].failures_before_critical",
                with(vec![Check {
                    failures_before_critical: 101,
                    ..tcp(1)
                }]),
            ),
            (
                "checks[0].grpc.service",
                with(vec![Check {
                    target: Some(check::Target::Grpc(GrpcCheck {
                        port: 0,
                        service: "a b".into(),
                    })),
                    ..Check::default()
                }]),
            ),
            (
                "checks: a machine with checks needs an address",
                Machine {
                    addresses: vec![],
                    state: MachineState::Created as i32,
                    ..with(vec![tcp(1)])
                },
            ),
        ];
        for (field, m) in bad {
            let err = machine(&m, "ord", "h").unwrap_err();
            assert!(matches!(err, Invalid::Argument(_)), "{field}: {err:?}");
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
        let five = with((0..5).map(|i| tcp(i + 1)).collect());
        assert!(matches!(
            machine(&five, "ord", "h"),
            Err(Invalid::TooLarge(_))
        ));
    }
}
