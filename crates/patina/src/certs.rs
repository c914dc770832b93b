//! `patina certs`: a CA and the certificates it issues, for small deployments and tests, as
//! `consul tls` makes them. Larger deployments issue from their own PKI: all Patina reads of
//! a certificate is its chain and its URIs (docs/security.md).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use patina_trust::certs::{Authority, Leaf, write_file, write_set};
use patina_trust::{Grant, Role, Tier};

#[derive(clap::Subcommand, Debug)]
#[allow(clippy::large_enum_variant)] // parsed once per run
pub enum CertsCommand {
    /// Make a CA: `ca.pem` and `ca-key.pem` (owner-only) in `--dir`.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 1825)]
        days: u64,
    },
    /// Issue a certificate from the CA in `--ca-dir` into `--out` (`ca.pem`, `cert.pem`,
    /// `key.pem`: what an agent's `<data_dir>/tls/` and the client's `--tls-dir` hold).
    Issue {
        #[arg(long)]
        ca_dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// The subject's name, for people reading the certificate.
        #[arg(long)]
        name: String,
        /// A region agent: the region cluster's name (repeatable).
        #[arg(long)]
        region_agent: Vec<String>,
        /// A global agent of this global cluster.
        #[arg(long)]
        global_agent: Vec<String>,
        /// A bridge of REGION in the global cluster `global` (and a reader of the region).
        #[arg(long)]
        bridge: Vec<String>,
        /// Machine writes in this region cluster (`REGION` for every host, `REGION/HOST` for
        /// one host's machines).
        #[arg(long)]
        writer: Vec<String>,
        /// Reads of this cluster: `region/NAME` or `global/NAME`.
        #[arg(long)]
        reader: Vec<String>,
        /// Any grant as a URI (`spiffe://patina/...`).
        #[arg(long)]
        grant: Vec<String>,
        /// Addresses and DNS names it serves under (for clients that check them, such as
        /// grpcurl; Patina checks grants).
        #[arg(long)]
        ip: Vec<IpAddr>,
        #[arg(long)]
        dns: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u64,
        /// Write `key.pem` and `cert.pem` only (key first), leaving `ca.pem` as it is: a leaf
        /// renewed in place, or issued from a new CA while the bundle holds both (the rotation
        /// runbooks in docs/security.md).
        #[arg(long)]
        keep_ca: bool,
    },
}

fn name(kind: &str, s: &str) -> anyhow::Result<String> {
    anyhow::ensure!(
        patina_trust::principal::valid_name(s),
        "{kind} {s:?}: 1 to 63 characters of a-z, 0-9, '.', '_' and '-'"
    );
    Ok(s.to_owned())
}

pub fn run(command: &CertsCommand) -> anyhow::Result<()> {
    match command {
        CertsCommand::Ca { dir, days } => {
            let cert = dir.join("ca.pem");
            anyhow::ensure!(
                !cert.exists(),
                "{} exists: not replacing a CA",
                cert.display()
            );
            let ca = Authority::generate("patina CA", Duration::from_secs(days * 86_400))?;
            std::fs::create_dir_all(dir)?;
            write_file(&dir.join("ca-key.pem"), ca.key_pem().as_bytes(), true)?;
            write_file(&cert, ca.cert_pem().as_bytes(), false)?;
            println!("CA in {} (ca.pem; keep ca-key.pem offline)", dir.display());
        }
        CertsCommand::Issue {
            ca_dir,
            out,
            name: subject,
            region_agent,
            global_agent,
            bridge,
            writer,
            reader,
            grant,
            ip,
            dns,
            days,
            keep_ca,
        } => {
            let read = |f: &str| {
                std::fs::read_to_string(ca_dir.join(f))
                    .with_context(|| format!("{}", ca_dir.join(f).display()))
            };
            let ca = Authority::from_pem(&read("ca.pem")?, &read("ca-key.pem")?)?;
            let mut grants = Vec::new();
            for c in region_agent {
                grants.push(Grant::new(Tier::Region, &name("region", c)?, Role::Agent));
            }
            for c in global_agent {
                grants.push(Grant::new(Tier::Global, &name("cluster", c)?, Role::Agent));
            }
            for r in bridge {
                let r = name("region", r)?;
                grants.push(Grant::new(Tier::Global, "global", Role::Bridge(r.clone())));
                grants.push(Grant::new(Tier::Region, &r, Role::Reader));
            }
            for w in writer {
                let (c, host) = match w.split_once('/') {
                    Some((c, h)) => (c, Some(name("host", h)?)),
                    None => (w.as_str(), None),
                };
                grants.push(Grant::new(
                    Tier::Region,
                    &name("region", c)?,
                    Role::Writer(host),
                ));
            }
            for r in reader {
                let g = Grant::parse(&format!("spiffe://patina/{r}/reader"))
                    .with_context(|| format!("--reader {r:?}: region/NAME or global/NAME"))?;
                grants.push(g);
            }
            for u in grant {
                grants.push(
                    Grant::parse(u).with_context(|| format!("--grant {u:?}: not a Patina URI"))?,
                );
            }
            anyhow::ensure!(
                !grants.is_empty(),
                "no grant: a certificate without one may call health checks only"
            );
            let issued = ca.issue(&Leaf {
                name: subject.clone(),
                grants: grants.clone(),
                dns: dns.clone(),
                ips: ip.clone(),
                not_before: None,
                valid_for: Duration::from_secs(days * 86_400),
            })?;
            if *keep_ca {
                let paths = patina_trust::Paths::in_dir(out);
                anyhow::ensure!(
                    paths.ca.exists(),
                    "--keep-ca: {} holds no ca.pem to keep",
                    out.display()
                );
                write_file(&paths.key, issued.key_pem.as_bytes(), true)?;
                write_file(&paths.cert, issued.cert_pem.as_bytes(), false)?;
            } else {
                write_set(out, ca.cert_pem(), &issued)?;
            }
            println!("{} in {}:", subject, out.display());
            for g in grants {
                println!("  {}", g.uri());
            }
        }
    }
    Ok(())
}
