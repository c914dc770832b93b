//! What a name means, sans I/O: the zone an agent answers for and the records of each name.
//!
//! A region agent is authoritative for `REGION.DOMAIN.`:
//! - `APP.app.REGION.DOMAIN.`: A/AAAA of the app's routable instances in the region, SRV
//!   with their ports (targets under `addr`, their addresses in the additional section);
//! - `HEX.addr.REGION.DOMAIN.`: the address spelled in hex (8 digits IPv4, 32 IPv6).
//!
//! A global agent is authoritative for `DOMAIN.`:
//! - `APP.app.DOMAIN.`: SRV of every region's ingress with healthy instances of the app, the
//!   nearest region first (priority 0, 1, ... by round trip from the agent's region), weighted
//!   by healthy count; A/AAAA of the nearest such region's ingress;
//! - `HEX.addr.DOMAIN.`: as above.
//!
//! An app that does not exist is NXDOMAIN; one that exists with nothing to route to answers
//! NOERROR with no records; a name outside the zone is REFUSED.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use patina_xds::Source;
use patina_xds::protocol::Client;
use patina_xds::resources::Locality;

/// The outcome of a question.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Authoritative answer (maybe no records: the name exists, the type has none).
    Answer {
        answers: Vec<Record>,
        additionals: Vec<Record>,
    },
    NxDomain,
    /// Outside this agent's zone.
    Refused,
    /// The agent does not hold its whole first state yet (SERVFAIL: ask again or elsewhere,
    /// not "no such app").
    NotReady,
}

/// Which tier the zone belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tier {
    /// A region agent of this region.
    Region(String),
    /// A global agent (its own region orders the regions).
    Global,
}

/// An agent's zone and where its answers come from.
pub struct Zone {
    tier: Tier,
    /// The zone's labels, lowercase, without the root: `["ord", "patina"]` or `["patina"]`.
    suffix: Vec<String>,
    /// The zone's name with a trailing dot.
    origin: String,
    source: Arc<dyn Source>,
    ttl: u32,
    max_answers: usize,
}

impl Zone {
    /// `domain`: the top label(s) of every Patina name ("patina").
    pub fn new(
        tier: Tier,
        domain: &str,
        source: Arc<dyn Source>,
        ttl: u32,
        max_answers: usize,
    ) -> Zone {
        let mut suffix: Vec<String> = Vec::new();
        if let Tier::Region(r) = &tier {
            suffix.push(r.to_ascii_lowercase());
        }
        suffix.extend(
            domain
                .trim_end_matches('.')
                .split('.')
                .map(str::to_ascii_lowercase),
        );
        let origin = format!("{}.", suffix.join("."));
        Zone {
            tier,
            suffix,
            origin,
            source,
            ttl,
            max_answers: max_answers.max(1),
        }
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Answer `qtype` for `qname` (any case; with or without the trailing dot). `seed`
    /// rotates the order of equal records between questions.
    pub fn answer(&self, qname: &str, qtype: RecordType, seed: usize) -> Outcome {
        let lower = qname.trim_end_matches('.').to_ascii_lowercase();
        let labels: Vec<&str> = if lower.is_empty() {
            Vec::new()
        } else {
            lower.split('.').collect()
        };
        if labels.len() < self.suffix.len()
            || labels[labels.len() - self.suffix.len()..]
                .iter()
                .zip(&self.suffix)
                .any(|(a, b)| a != b)
        {
            return Outcome::Refused;
        }
        let rest = &labels[..labels.len() - self.suffix.len()];
        match rest {
            [] => Outcome::Answer {
                answers: Vec::new(),
                additionals: Vec::new(),
            },
            [app, "app"] => self.app(app, qtype, seed),
            [hex, "addr"] => match parse_hex_ip(hex) {
                None => Outcome::NxDomain,
                Some(ip) => {
                    let mut answers = Vec::new();
                    if let Some(name) = self.name(&format!("{lower}."))
                        && let Some(r) = self.address_record(&name, ip, qtype)
                    {
                        answers.push(r);
                    }
                    Outcome::Answer {
                        answers,
                        additionals: Vec::new(),
                    }
                }
            },
            _ => Outcome::NxDomain,
        }
    }

    fn name(&self, s: &str) -> Option<Name> {
        Name::from_ascii(s).ok().map(|mut n| {
            n.set_fqdn(true);
            n
        })
    }

    fn address_record(&self, name: &Name, ip: IpAddr, qtype: RecordType) -> Option<Record> {
        let name = name.clone();
        match (ip, qtype) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                Some(Record::from_rdata(name, self.ttl, RData::A(A(v4))))
            }
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                Some(Record::from_rdata(name, self.ttl, RData::AAAA(AAAA(v6))))
            }
            _ => None,
        }
    }

    fn app(&self, app: &str, qtype: RecordType, seed: usize) -> Outcome {
        if !self.source.is_synced() {
            return Outcome::NotReady;
        }
        if !patina_xds::is_app_name(app) || !self.source.exists(app) {
            return Outcome::NxDomain;
        }
        let mut localities: Vec<Locality> = Vec::new();
        self.source
            .localities(app, &Client::default(), &mut localities);
        let qname = format!("{app}.app.{}", self.origin);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        match qtype {
            RecordType::A | RecordType::AAAA | RecordType::ANY => {
                let want = |ip: &IpAddr| match qtype {
                    RecordType::A => ip.is_ipv4(),
                    RecordType::AAAA => ip.is_ipv6(),
                    _ => true,
                };
                // A region: every instance. The global tier: the nearest region that has
                // addresses of the family asked for.
                let chosen: Vec<&Locality> = match self.tier {
                    Tier::Region(_) => localities.iter().collect(),
                    Tier::Global => localities
                        .iter()
                        .find(|l| l.hosts.iter().any(|h| want(&h.addr.ip)))
                        .into_iter()
                        .collect(),
                };
                let mut ips: Vec<IpAddr> = chosen
                    .iter()
                    .flat_map(|l| l.hosts.iter().map(|h| h.addr.ip))
                    .filter(|ip| want(ip))
                    .collect();
                ips.dedup();
                rotate(&mut ips, seed);
                ips.truncate(self.max_answers);
                if let Some(owner) = self.name(&qname) {
                    answers.extend(
                        ips.into_iter()
                            .filter_map(|ip| self.address_record(&owner, ip, qtype)),
                    );
                }
            }
            RecordType::SRV => {
                let Some(owner) = self.name(&qname) else {
                    return Outcome::NxDomain;
                };
                for l in &localities {
                    let mut hosts: Vec<_> = l.hosts.iter().collect();
                    rotate(&mut hosts, seed);
                    for h in hosts {
                        if answers.len() >= self.max_answers {
                            break;
                        }
                        let target = format!("{}.addr.{}", hex_ip(h.addr.ip), self.origin);
                        let Some(target_name) = self.name(&target) else {
                            continue;
                        };
                        let weight = match self.tier {
                            Tier::Region(_) => 1,
                            Tier::Global => l.weight.clamp(1, u32::from(u16::MAX)) as u16,
                        };
                        answers.push(Record::from_rdata(
                            owner.clone(),
                            self.ttl,
                            RData::SRV(SRV::new(
                                l.priority.min(u32::from(u16::MAX)) as u16,
                                weight,
                                h.addr.port,
                                target_name.clone(),
                            )),
                        ));
                        if let Some(r) =
                            self.address_record(&target_name, h.addr.ip, RecordType::ANY)
                            && !additionals.contains(&r)
                        {
                            additionals.push(r);
                        }
                    }
                }
            }
            _ => {}
        }
        Outcome::Answer {
            answers,
            additionals,
        }
    }
}

/// Rotate `v` by `seed`: answers to successive questions start at different records.
fn rotate<T>(v: &mut [T], seed: usize) {
    if !v.is_empty() {
        let n = v.len();
        v.rotate_left(seed % n);
    }
}

/// An address in hex: 8 digits for IPv4, 32 for IPv6 (as Consul's `addr` names).
pub fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn parse_hex_ip(s: &str) -> Option<IpAddr> {
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Vec<u8> = (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16))
        .collect::<Result<_, _>>()
        .ok()?;
    match (s.len(), bytes.as_slice()) {
        (8, b) => Some(IpAddr::from([b[0], b[1], b[2], b[3]])),
        (32, b) => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_xds::resources::{Addr, Host};

    struct Fixed(Vec<(&'static str, Vec<Locality>)>);

    impl Source for Fixed {
        fn apps(&self) -> Vec<Arc<str>> {
            self.0.iter().map(|(a, _)| Arc::from(*a)).collect()
        }
        fn exists(&self, app: &str) -> bool {
            self.0.iter().any(|(a, _)| *a == app)
        }
        fn localities(&self, app: &str, _: &Client, out: &mut Vec<Locality>) {
            if let Some((_, l)) = self.0.iter().find(|(a, _)| *a == app) {
                out.extend(l.iter().cloned());
            }
        }
    }

    fn loc(region: &str, priority: u32, weight: u32, addrs: &[&str]) -> Locality {
        Locality {
            region: region.into(),
            priority,
            weight,
            hosts: addrs
                .iter()
                .map(|a| Host {
                    addr: Addr::parse(a).unwrap(),
                    more: vec![],
                })
                .collect(),
        }
    }

    fn records(o: &Outcome) -> Vec<String> {
        match o {
            Outcome::Answer { answers, .. } => answers.iter().map(|r| r.data.to_string()).collect(),
            other => vec![format!("{other:?}")],
        }
    }

    /// A source still taking its first state: app names get SERVFAIL (not NXDOMAIN, which
    /// resolvers cache as "no such app"), then answers once it holds it.
    #[test]
    fn app_names_are_not_ready_until_the_source_is_synced() {
        struct Unsynced(Fixed, tokio::sync::watch::Sender<bool>);
        impl Source for Unsynced {
            fn apps(&self) -> Vec<Arc<str>> {
                self.0.apps()
            }
            fn exists(&self, app: &str) -> bool {
                self.0.exists(app)
            }
            fn localities(&self, app: &str, c: &Client, out: &mut Vec<Locality>) {
                self.0.localities(app, c, out)
            }
            fn synced(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
                Some(self.1.subscribe())
            }
        }
        let source = Arc::new(Unsynced(
            Fixed(vec![("web", vec![loc("ord", 0, 1, &["10.0.0.1:80"])])]),
            tokio::sync::watch::Sender::new(false),
        ));
        let z = Zone::new(Tier::Region("ord".into()), "patina", source.clone(), 0, 8);
        for name in ["web.app.ord.patina.", "nope.app.ord.patina."] {
            assert_eq!(
                z.answer(name, RecordType::A, 0),
                Outcome::NotReady,
                "{name}"
            );
        }
        assert_eq!(z.answer("example.com.", RecordType::A, 0), Outcome::Refused);
        source.1.send_replace(true);
        assert_eq!(
            records(&z.answer("web.app.ord.patina.", RecordType::A, 0)),
            ["10.0.0.1"]
        );
        assert_eq!(
            z.answer("nope.app.ord.patina.", RecordType::A, 0),
            Outcome::NxDomain
        );
    }

    #[test]
    fn region_zone_answers_apps_addresses_and_refuses_outside() {
        let source = Arc::new(Fixed(vec![
            (
                "web",
                vec![loc("ord", 0, 2, &["10.0.0.1:80", "[fd00::1]:81"])],
            ),
            ("idle", vec![]),
        ]));
        let z = Zone::new(Tier::Region("ord".into()), "patina", source, 0, 8);
        assert_eq!(
            records(&z.answer("web.app.ord.patina.", RecordType::A, 0)),
            ["10.0.0.1"]
        );
        assert_eq!(
            records(&z.answer("WEB.App.Ord.Patina", RecordType::AAAA, 0)),
            ["fd00::1"]
        );
        let srv = z.answer("web.app.ord.patina.", RecordType::SRV, 0);
        let Outcome::Answer {
            answers,
            additionals,
        } = &srv
        else {
            panic!()
        };
        assert_eq!(answers.len(), 2);
        assert_eq!(additionals.len(), 2);
        assert!(
            answers[0]
                .data
                .to_string()
                .contains("0a000001.addr.ord.patina.")
        );
        assert_eq!(
            z.answer("nope.app.ord.patina.", RecordType::A, 0),
            Outcome::NxDomain
        );
        assert_eq!(
            records(&z.answer("idle.app.ord.patina.", RecordType::A, 0)),
            Vec::<String>::new()
        );
        assert_eq!(
            z.answer("web.app.fra.patina.", RecordType::A, 0),
            Outcome::Refused
        );
        assert_eq!(z.answer("example.com.", RecordType::A, 0), Outcome::Refused);
        assert_eq!(
            z.answer("x.y.ord.patina.", RecordType::A, 0),
            Outcome::NxDomain
        );
        assert_eq!(
            records(&z.answer("0a000001.addr.ord.patina.", RecordType::A, 0)),
            ["10.0.0.1"]
        );
        assert_eq!(
            z.answer("0a0001.addr.ord.patina.", RecordType::A, 0),
            Outcome::NxDomain
        );
    }

    #[test]
    fn global_zone_orders_regions_by_priority_and_answers_the_nearest_for_a() {
        let source = Arc::new(Fixed(vec![(
            "shop",
            vec![
                loc("ord", 0, 3, &["192.0.2.1:443"]),
                loc("fra", 1, 70_000, &["192.0.2.2:443", "[2001:db8::2]:443"]),
            ],
        )]));
        let z = Zone::new(Tier::Global, "patina", source, 5, 8);
        assert_eq!(
            records(&z.answer("shop.app.patina.", RecordType::A, 1)),
            ["192.0.2.1"]
        );
        // No IPv6 in the nearest region: the nearest that has one.
        assert_eq!(
            records(&z.answer("shop.app.patina.", RecordType::AAAA, 0)),
            ["2001:db8::2"]
        );
        let srv = records(&z.answer("shop.app.patina.", RecordType::SRV, 0));
        assert_eq!(srv.len(), 3);
        assert!(
            srv[0].starts_with("0 3 443 c0000201.addr.patina."),
            "{srv:?}"
        );
        assert!(srv[1].starts_with("1 65535 443 "), "{srv:?}");
        assert_eq!(
            z.answer("shop.app.ord.patina.", RecordType::A, 0),
            Outcome::NxDomain
        );
    }

    #[test]
    fn answers_are_bounded() {
        let addrs: Vec<String> = (0..100).map(|i| format!("10.0.{i}.1:80")).collect();
        let refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let source = Arc::new(Fixed(vec![("big", vec![loc("ord", 0, 100, &refs)])]));
        let z = Zone::new(Tier::Region("ord".into()), "patina", source, 0, 10);
        assert_eq!(
            records(&z.answer("big.app.ord.patina", RecordType::A, 3)).len(),
            10
        );
        assert_eq!(
            records(&z.answer("big.app.ord.patina", RecordType::SRV, 3)).len(),
            10
        );
        assert_ne!(
            records(&z.answer("big.app.ord.patina", RecordType::A, 3)),
            records(&z.answer("big.app.ord.patina", RecordType::A, 4)),
            "rotated"
        );
    }
}
