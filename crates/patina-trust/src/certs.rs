//! Certificates for small deployments and tests (`patina certs`, `patina dev`): a CA, and
//! leaves it issues with Patina's grants. Keys are ECDSA P-256, but a bridge's (which signs
//! summaries) is Ed25519. Large deployments issue from
//! their own PKI; all Patina needs of a certificate is its chain and its URIs
//! ([`crate::principal`]).

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::principal::Grant;

/// A certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("bad validity: {0}")]
    Time(String),
    #[error("the CA files do not parse: {0}")]
    Ca(String),
    #[error("the issued set does not load: {0}")]
    Material(String),
}

/// A certificate authority that can issue leaves.
pub struct Authority {
    cert_pem: String,
    key: KeyPair,
}

/// A certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// What a leaf certificate says.
#[derive(Clone, Debug, Default)]
pub struct Leaf {
    /// The subject's common name (for people reading it; Patina reads the URIs).
    pub name: String,
    pub grants: Vec<Grant>,
    /// DNS names and addresses it may serve under (agents; Patina's clients check grants,
    /// other clients such as grpcurl check these).
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    /// Valid from `not_before` for `valid_for`.
    pub not_before: Option<SystemTime>,
    pub valid_for: Duration,
}

fn at(t: SystemTime) -> Result<time::OffsetDateTime, CertError> {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_err(|e| CertError::Time(e.to_string()))?
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .map_err(|e| CertError::Time(e.to_string()))
}

impl Authority {
    /// A new self-signed CA named `name`, valid from now (less a minute of clock skew) for
    /// `valid_for`.
    pub fn generate(name: &str, valid_for: Duration) -> Result<Authority, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = at(now - Duration::from_secs(60))?;
        params.not_after = at(now + valid_for)?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key,
        })
    }

    /// A CA from its PEM certificate and key (as [`Authority::cert_pem`] and
    /// [`Authority::key_pem`] wrote them).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, CertError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Ca(e.to_string()))?;
        // Checked now: issuing would fail later, less clearly.
        Issuer::from_ca_cert_pem(cert_pem, &key).map_err(|e| CertError::Ca(e.to_string()))?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            key,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issue a leaf with `grants`, valid from now for `valid_for`, and load it as a set that
    /// trusts this CA alone (tests and tools).
    pub fn issue_set(
        &self,
        grants: Vec<Grant>,
        valid_for: Duration,
    ) -> Result<crate::Material, CertError> {
        let issued = self.issue(&Leaf {
            name: "patina".into(),
            grants,
            valid_for,
            ..Leaf::default()
        })?;
        crate::Material::from_pem(&self.cert_pem, &issued.cert_pem, &issued.key_pem)
            .map_err(|e| CertError::Material(e.to_string()))
    }

    /// Issue a leaf for client and server authentication, with a fresh key.
    pub fn issue(&self, leaf: &Leaf) -> Result<Issued, CertError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| CertError::Ca(e.to_string()))?;
        // A bridge signs what it publishes: Ed25519, short and fast to check everywhere.
        let bridge = leaf
            .grants
            .iter()
            .any(|g| matches!(g.role, crate::principal::Role::Bridge(_)));
        let key = if bridge {
            KeyPair::generate_for(&rcgen::PKCS_ED25519)?
        } else {
            KeyPair::generate()?
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, leaf.name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        for g in &leaf.grants {
            params
                .subject_alt_names
                .push(SanType::URI(g.uri().as_str().try_into()?));
        }
        for d in &leaf.dns {
            params
                .subject_alt_names
                .push(SanType::DnsName(d.as_str().try_into()?));
        }
        for ip in &leaf.ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let from = leaf
            .not_before
            .unwrap_or_else(|| SystemTime::now() - Duration::from_secs(60));
        params.not_before = at(from)?;
        params.not_after = at(from + leaf.valid_for)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Write a set as agents and clients read it: `ca.pem` (the bundle), `cert.pem` and
/// `key.pem` (owner-only) in `dir`, each written whole to a temporary file first and renamed
/// into place (a reloading agent never reads half a file).
pub fn write_set(dir: &std::path::Path, ca_pem: &str, issued: &Issued) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let paths = crate::Paths::in_dir(dir);
    write_file(&paths.ca, ca_pem.as_bytes(), false)?;
    write_file(&paths.key, issued.key_pem.as_bytes(), true)?;
    write_file(&paths.cert, issued.cert_pem.as_bytes(), false)
}

/// Write `path` through a temporary file and a rename; `secret`: readable by its owner only.
pub fn write_file(path: &std::path::Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut f = options.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::{Role, Tier, principal_of};

    #[test]
    fn an_issued_leaf_names_its_grants_and_expiry() {
        let ca = Authority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let grants = vec![
            Grant::new(Tier::Region, "ord", Role::Reader),
            Grant::new(Tier::Global, "global", Role::Bridge("ord".into())),
        ];
        let issued = ca
            .issue(&Leaf {
                name: "bridge-1".into(),
                grants: grants.clone(),
                ips: vec!["127.0.0.1".parse().unwrap()],
                valid_for: Duration::from_secs(600),
                ..Leaf::default()
            })
            .unwrap();
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: rustls_pki_types::CertificateDer<'static>| c)
            .unwrap();
        let p = principal_of(&der).unwrap();
        assert_eq!(p.grants, grants);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (p.not_after - (now + 540)).abs() < 5,
            "{} vs {now}",
            p.not_after
        );
        // The CA reloads from its files and issues again.
        let again = Authority::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        again.issue(&Leaf::default()).unwrap();
    }
}
