//! Who a certificate speaks for: the grants its URI subject alternative names carry.
//!
//! Every Patina certificate names its grants as SPIFFE-style URIs under the trust domain
//! `patina`, one per grant:
//!
//! | URI | grant |
//! |---|---|
//! | `spiffe://patina/region/<cluster>/agent` | a peer of region cluster `<cluster>` (Sync, Admin, last checks) |
//! | `spiffe://patina/region/<cluster>/writer` | machine writes in that region, for every host |
//! | `spiffe://patina/region/<cluster>/writer/<host>` | machine writes for `<host>` only (one URI per host) |
//! | `spiffe://patina/region/<cluster>/reader` | reads and watches of that region |
//! | `spiffe://patina/global/<cluster>/agent` | a peer of global cluster `<cluster>` |
//! | `spiffe://patina/global/<cluster>/bridge/<region>` | a bridge of `<region>` in that global cluster: a peer there, and the signer of `<region>`'s summaries |
//! | `spiffe://patina/global/<cluster>/reader` | lookups and WatchApps of that global cluster (edges) |
//!
//! Other URIs (another trust domain, a path this code does not know) grant nothing and are
//! ignored, so one certificate can serve other systems too. Names are 1 to 63 characters of
//! `a-z`, `0-9`, `.`, `_` and `-`, as cluster names are.

use std::fmt;

/// The trust domain of every Patina URI.
pub const TRUST_DOMAIN: &str = "patina";
/// Most grants one certificate may carry (a writer restricted to many hosts is the large
/// case); a certificate with more is refused whole.
pub const MAX_GRANTS: usize = 256;

/// Which tier a cluster belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    Region,
    Global,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Region => "region",
            Tier::Global => "global",
        }
    }
}

/// The cluster a service belongs to: its tier and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    pub tier: Tier,
    pub cluster: String,
}

impl Scope {
    pub fn new(tier: Tier, cluster: impl Into<String>) -> Scope {
        Scope {
            tier,
            cluster: cluster.into(),
        }
    }
}

impl Scope {
    /// `region/NAME` or `global/NAME`, as [`Scope`] displays itself.
    pub fn parse(text: &str) -> Option<Scope> {
        let (tier, name) = text.split_once('/')?;
        let tier = match tier {
            "region" => Tier::Region,
            "global" => Tier::Global,
            _ => return None,
        };
        valid_name(name).then(|| Scope::new(tier, name))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.tier.as_str(), self.cluster)
    }
}

/// What a grant lets its holder do within its scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// An agent of the cluster.
    Agent,
    /// Machine writes; `Some(host)` for one host only.
    Writer(Option<String>),
    /// Reads and watches.
    Reader,
    /// A bridge of this region (global clusters only).
    Bridge(String),
}

/// One grant: a role in one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Grant {
    pub scope: Scope,
    pub role: Role,
}

impl Grant {
    pub fn new(tier: Tier, cluster: &str, role: Role) -> Grant {
        Grant {
            scope: Scope::new(tier, cluster),
            role,
        }
    }

    /// The URI that carries this grant.
    pub fn uri(&self) -> String {
        let base = format!("spiffe://{TRUST_DOMAIN}/{}", self.scope);
        match &self.role {
            Role::Agent => format!("{base}/agent"),
            Role::Writer(None) => format!("{base}/writer"),
            Role::Writer(Some(host)) => format!("{base}/writer/{host}"),
            Role::Reader => format!("{base}/reader"),
            Role::Bridge(region) => format!("{base}/bridge/{region}"),
        }
    }

    /// The grant a URI carries, if it is one of Patina's and well formed.
    pub fn parse(uri: &str) -> Option<Grant> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        if parts.next()? != TRUST_DOMAIN {
            return None;
        }
        let tier = match parts.next()? {
            "region" => Tier::Region,
            "global" => Tier::Global,
            _ => return None,
        };
        let cluster = name(parts.next()?)?;
        let role = match (tier, parts.next()?, parts.next()) {
            (_, "agent", None) => Role::Agent,
            (_, "reader", None) => Role::Reader,
            (Tier::Region, "writer", None) => Role::Writer(None),
            (Tier::Region, "writer", Some(host)) => Role::Writer(Some(name(host)?.to_owned())),
            (Tier::Global, "bridge", Some(region)) => Role::Bridge(name(region)?.to_owned()),
            _ => return None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Grant::new(tier, cluster, role))
    }
}

/// A name as Patina's URIs carry it.
fn name(s: &str) -> Option<&str> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    ok.then_some(s)
}

/// Is `s` a name a Patina URI can carry?
pub fn valid_name(s: &str) -> bool {
    name(s).is_some()
}

/// What the caller of a service must hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// An agent of this cluster (or, in a global cluster, a bridge: bridges are peers there).
    Peer,
    /// An agent of this cluster, never a bridge: what changes the cluster itself (forgetting
    /// a member, the gossip keyring).
    Agent,
    /// A writer of this cluster (host restrictions are checked where the request is read).
    Writer,
    /// Any grant in this cluster: reads are open to every role of it.
    Reader,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Peer => "peer",
            Need::Agent => "agent",
            Need::Writer => "writer",
            Need::Reader => "reader",
        }
    }
}

/// The identity behind a verified certificate: its grants, and when it expires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub grants: Vec<Grant>,
    /// The certificate's notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
    /// For logs: the certificate's first Patina URI, or its subject.
    pub name: String,
}

impl Principal {
    /// Does this principal meet `need` in `scope`?
    pub fn allows(&self, scope: &Scope, need: Need) -> bool {
        self.grants.iter().any(|g| {
            g.scope == *scope
                && matches!(
                    (need, &g.role),
                    (_, Role::Agent)
                        | (Need::Peer, Role::Bridge(_))
                        | (Need::Writer, Role::Writer(_))
                        | (Need::Reader, _)
                )
        })
    }

    /// May this principal write machines of `host` in `scope`? Agents may (they forward
    /// nothing today, but an agent is trusted with its cluster's data anyway).
    pub fn may_write_host(&self, scope: &Scope, host: &str) -> bool {
        self.grants.iter().any(|g| {
            g.scope == *scope
                && match &g.role {
                    Role::Agent | Role::Writer(None) => true,
                    Role::Writer(Some(h)) => h == host,
                    _ => false,
                }
        })
    }

    /// The regions whose summaries this principal may sign in the global cluster `scope`.
    pub fn bridge_regions<'a>(&'a self, scope: &'a Scope) -> impl Iterator<Item = &'a str> + 'a {
        self.grants
            .iter()
            .filter(move |g| g.scope == *scope)
            .filter_map(|g| match &g.role {
                Role::Bridge(region) => Some(region.as_str()),
                _ => None,
            })
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// Why a certificate names no principal.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrincipalError {
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    #[error("the certificate carries more than {MAX_GRANTS} Patina grants")]
    TooMany,
}

/// The principal a DER certificate names. Its chain is not checked here (rustls did that).
pub fn principal_of(der: &[u8]) -> Result<Principal, PrincipalError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PrincipalError::Parse(e.to_string()))?;
    let mut grants = Vec::new();
    let mut first = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = n
                && let Some(g) = Grant::parse(uri)
            {
                if grants.len() == MAX_GRANTS {
                    return Err(PrincipalError::TooMany);
                }
                first.get_or_insert_with(|| (*uri).to_owned());
                grants.push(g);
            }
        }
    }
    Ok(Principal {
        grants,
        not_after: cert.validity().not_after.timestamp(),
        name: first.unwrap_or_else(|| cert.subject().to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_as_they_display() {
        for s in [
            Scope::new(Tier::Region, "ord"),
            Scope::new(Tier::Global, "global"),
        ] {
            assert_eq!(Scope::parse(&s.to_string()), Some(s));
        }
        for bad in ["ord", "edge/ord", "region/", "region/Ord", "region/a/b"] {
            assert_eq!(Scope::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn uris_round_trip_and_strangers_grant_nothing() {
        let grants = [
            Grant::new(Tier::Region, "ord", Role::Agent),
            Grant::new(Tier::Region, "ord", Role::Writer(None)),
            Grant::new(Tier::Region, "ord", Role::Writer(Some("worker-1".into()))),
            Grant::new(Tier::Region, "ord", Role::Reader),
            Grant::new(Tier::Global, "global", Role::Agent),
            Grant::new(Tier::Global, "global", Role::Bridge("ord".into())),
            Grant::new(Tier::Global, "global", Role::Reader),
        ];
        for g in grants {
            assert_eq!(Grant::parse(&g.uri()), Some(g.clone()), "{}", g.uri());
        }
        for bad in [
            "spiffe://other/region/ord/agent",
            "spiffe://patina/region/ord",
            "spiffe://patina/region/ord/agent/extra",
            "spiffe://patina/region/Ord/agent",
            "spiffe://patina/region//agent",
            "spiffe://patina/region/ord/bridge/ord",
            "spiffe://patina/global/g/writer",
            "spiffe://patina/planet/ord/agent",
            "https://patina/region/ord/agent",
            "spiffe://patina/region/ord/writer/",
        ] {
            assert_eq!(Grant::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn roles_allow_what_the_table_says_and_only_in_their_cluster() {
        let ord = Scope::new(Tier::Region, "ord");
        let fra = Scope::new(Tier::Region, "fra");
        let global = Scope::new(Tier::Global, "global");
        let p = |grants: Vec<Grant>| Principal {
            grants,
            not_after: 0,
            name: "test".into(),
        };
        let agent = p(vec![Grant::new(Tier::Region, "ord", Role::Agent)]);
        assert!(agent.allows(&ord, Need::Peer) && agent.allows(&ord, Need::Writer));
        assert!(!agent.allows(&fra, Need::Reader), "another cluster's agent");
        let writer = p(vec![Grant::new(
            Tier::Region,
            "ord",
            Role::Writer(Some("h1".into())),
        )]);
        assert!(writer.allows(&ord, Need::Writer) && writer.allows(&ord, Need::Reader));
        assert!(!writer.allows(&ord, Need::Peer));
        assert!(writer.may_write_host(&ord, "h1") && !writer.may_write_host(&ord, "h2"));
        let reader = p(vec![Grant::new(Tier::Region, "ord", Role::Reader)]);
        assert!(reader.allows(&ord, Need::Reader));
        assert!(!reader.allows(&ord, Need::Writer) && !reader.allows(&ord, Need::Peer));
        assert!(!reader.may_write_host(&ord, "h1"));
        let bridge = p(vec![
            Grant::new(Tier::Region, "ord", Role::Reader),
            Grant::new(Tier::Global, "global", Role::Bridge("ord".into())),
        ]);
        assert!(bridge.allows(&global, Need::Peer) && bridge.allows(&ord, Need::Reader));
        assert!(!bridge.allows(&ord, Need::Peer));
        assert_eq!(bridge.bridge_regions(&global).collect::<Vec<_>>(), ["ord"]);
        assert_eq!(agent.bridge_regions(&global).count(), 0);
    }
}
