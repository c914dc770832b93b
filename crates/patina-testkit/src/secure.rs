//! Agents with security on, as production runs them: a throwaway CA issues each agent the
//! certificate of its role, gossip is sealed with a key, and the harness's own calls carry a
//! client certificate that may do anything (`Agent::dial`).

use std::path::Path;
use std::time::Duration;

use patina_trust::certs::{Authority, Leaf, write_set};
use patina_trust::{Dial, Grant, Role, Tier, Trust};

/// A CA, a gossip key, and the harness's client.
pub struct Secure {
    ca: Authority,
    /// The gossip key every cluster of the harness uses.
    pub key: String,
    /// TLS with a certificate holding every grant of the clusters it was made for.
    pub dial: Dial,
}

const VALID: Duration = Duration::from_secs(30 * 86_400);

impl Secure {
    /// A CA, and a client that is agent, writer and reader of each region in `regions` and of
    /// the global cluster `global`.
    pub fn new(regions: &[String]) -> Secure {
        let ca = Authority::generate("patina test CA", VALID).expect("a CA");
        let mut grants = vec![
            Grant::new(Tier::Global, "global", Role::Agent),
            Grant::new(Tier::Global, "global", Role::Reader),
        ];
        for r in regions {
            grants.push(Grant::new(Tier::Region, r, Role::Agent));
            grants.push(Grant::new(Tier::Region, r, Role::Writer(None)));
            grants.push(Grant::new(Tier::Region, r, Role::Reader));
        }
        let client = ca
            .issue_set(grants, VALID)
            .expect("the client's certificate");
        Secure {
            key: patina_gossip::GossipKey::generate().encode(),
            dial: Dial::tls_any(Trust::fixed(client)),
            ca,
        }
    }

    /// Issue a certificate with `grants` into `dir/tls/`, and return what the agent's
    /// configuration needs, to append after its `[gossip]` table's keys: the gossip key,
    /// then a `[tls]` table naming the files.
    pub fn agent_config(&self, dir: &Path, ip: &str, grants: Vec<Grant>) -> String {
        let tls = dir.join("tls");
        let issued = self
            .ca
            .issue(&Leaf {
                name: format!("agent at {ip}"),
                grants,
                ips: ip.parse().into_iter().collect(),
                valid_for: VALID,
                ..Leaf::default()
            })
            .expect("an agent's certificate");
        write_set(&tls, self.ca.cert_pem(), &issued).expect("writing the agent's TLS files");
        let p = patina_trust::Paths::in_dir(&tls);
        format!(
            "encrypt = \"{}\"\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.key,
            p.ca.display(),
            p.cert.display(),
            p.key.display()
        )
    }

    /// A set with `grants` from this CA (what an attacker holding such a certificate has).
    pub fn issue(&self, grants: Vec<Grant>) -> patina_trust::Material {
        self.ca.issue_set(grants, VALID).expect("a certificate")
    }

    /// A region agent's grants.
    pub fn region_agent(region: &str) -> Vec<Grant> {
        vec![Grant::new(Tier::Region, region, Role::Agent)]
    }

    /// A global agent's grants.
    pub fn global_agent() -> Vec<Grant> {
        vec![Grant::new(Tier::Global, "global", Role::Agent)]
    }

    /// A bridge's grants: a bridge of its region, and a reader of the region's cluster.
    pub fn bridge(region: &str) -> Vec<Grant> {
        vec![
            Grant::new(Tier::Global, "global", Role::Bridge(region.into())),
            Grant::new(Tier::Region, region, Role::Reader),
        ]
    }
}
