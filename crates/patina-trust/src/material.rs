//! The TLS material an agent or client holds: its certificate and key, and the CA bundle it
//! trusts, read from PEM files and turned into rustls configurations. A set is checked whole
//! before it is used: the key must match the certificate and the certificate must chain to
//! the bundle, so a half-rotated set never replaces a good one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::principal::{Principal, principal_of};

/// Where the material is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// PEM: one or more CA certificates (old and new together while a CA rotates).
    pub ca: PathBuf,
    /// PEM: this agent's or client's certificate (and any intermediates after it).
    pub cert: PathBuf,
    /// PEM: its private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

impl Paths {
    /// The files as `patina certs` and `patina dev` write them: `ca.pem`, `cert.pem` and
    /// `key.pem` in `dir`.
    pub fn in_dir(dir: &Path) -> Paths {
        Paths {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        }
    }

    /// These paths, with each file given replacing its default.
    pub fn or_given(
        self,
        ca: Option<&PathBuf>,
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
    ) -> Paths {
        Paths {
            ca: ca.cloned().unwrap_or(self.ca),
            cert: cert.cloned().unwrap_or(self.cert),
            key: key.cloned().unwrap_or(self.key),
        }
    }
}

/// Why a set of files cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaterialError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("the certificate and key do not go together, or rustls refuses them: {0}")]
    Config(String),
    #[error("the certificate is not signed by the CA bundle: {0}")]
    Untrusted(String),
    #[error("the certificate: {0}")]
    Principal(String),
}

/// A checked set: configurations for both ends of a connection, and who it names.
pub struct Material {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    /// Who this certificate names.
    pub own: Principal,
    /// The earliest notAfter of the CA certificates (seconds since the Unix epoch).
    pub ca_not_after: i64,
    /// How many CA certificates the bundle holds.
    pub cas: usize,
    /// A hash of what it was made from: tells a changed set from the same one read again.
    pub source: u64,
    /// This set's own certificate, and its key for signing (a bridge's summaries).
    pub(crate) cert: CertificateDer<'static>,
    pub(crate) signing: Arc<dyn rustls::sign::SigningKey>,
    /// The CA bundle, for certificates met outside a handshake (a bridge's, on a record).
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("own", &self.own)
            .field("ca_not_after", &self.ca_not_after)
            .field("cas", &self.cas)
            .finish()
    }
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> MaterialError {
    MaterialError::File {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every certificate in a PEM file (at least one).
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e))?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate in it"));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// Read and check the files (blocking: call it off the async runtime's threads).
    pub fn load(paths: &Paths) -> Result<Material, MaterialError> {
        let cas = read_certs(&paths.ca)?;
        let chain = read_certs(&paths.cert)?;
        let key_bytes = std::fs::read(&paths.key).map_err(|e| file_error(&paths.key, e))?;
        let key = PrivateKeyDer::from_pem_slice(&key_bytes)
            .map_err(|e| file_error(&paths.key, format!("not a PEM private key: {e}")))?;
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for c in cas.iter().chain(&chain) {
            c.as_ref().hash(&mut h);
        }
        key_bytes.hash(&mut h);
        let mut m = Material::from_parts(cas, chain, key)?;
        m.source = h.finish();
        Ok(m)
    }

    /// Check and assemble a set from PEM text (as [`crate::certs`] makes it).
    pub fn from_pem(ca: &str, cert: &str, key: &str) -> Result<Material, MaterialError> {
        let certs = |pem: &str, what: &str| {
            CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| MaterialError::Config(format!("{what}: {e}")))
        };
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|e| MaterialError::Config(format!("the key: {e}")))?;
        let (cas, chain) = (certs(ca, "the CA")?, certs(cert, "the certificate")?);
        if cas.is_empty() || chain.is_empty() {
            return Err(MaterialError::Config("no certificate in the PEM".into()));
        }
        Material::from_parts(cas, chain, key)
    }

    /// Check and assemble a set already read.
    pub fn from_parts(
        cas: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Material, MaterialError> {
        let provider = provider();
        let mut roots = RootCertStore::empty();
        let mut ca_not_after = i64::MAX;
        for ca in &cas {
            roots
                .add(ca.clone())
                .map_err(|e| MaterialError::Untrusted(format!("a CA certificate: {e}")))?;
            let p = principal_of(ca).map_err(|e| MaterialError::Principal(e.to_string()))?;
            ca_not_after = ca_not_after.min(p.not_after);
        }
        let roots = Arc::new(roots);
        let own = principal_of(&chain[0]).map_err(|e| MaterialError::Principal(e.to_string()))?;
        // The chain must be one the peers will take.
        let verifier = PeerVerifier {
            roots: roots.clone(),
            algs: provider.signature_verification_algorithms,
        };
        verifier
            .check_chain(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| MaterialError::Untrusted(e.to_string()))?;

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| MaterialError::Config(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| MaterialError::Config(e.to_string()))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| MaterialError::Config(e.to_string()))?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let signing = provider
            .key_provider
            .load_private_key(key.clone_key())
            .map_err(|e| MaterialError::Config(e.to_string()))?;
        let cert = chain[0].clone();
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| MaterialError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| MaterialError::Config(e.to_string()))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Material {
            server: Arc::new(server),
            client: Arc::new(client),
            own,
            ca_not_after,
            cas: cas.len(),
            source: 0,
            cert,
            signing,
            roots,
            algs: provider.signature_verification_algorithms,
        })
    }
}

/// Checks a server's chain against the CA bundle, not its name: Patina dials agents by
/// address, and what it needs of the server is its grant, which the caller checks on the
/// finished connection ([`crate::client`]).
#[derive(Debug)]
pub(crate) struct PeerVerifier {
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) algs: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    pub(crate) fn check_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check_chain(end_entity, intermediates, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use super::*;
    use crate::certs::{Authority, Issued, Leaf};
    use crate::principal::{Grant, Role, Tier};

    pub fn leaf(ca: &Authority, grants: Vec<Grant>) -> Issued {
        ca.issue(&Leaf {
            name: "test".into(),
            grants,
            ips: vec!["127.0.0.1".parse().unwrap()],
            valid_for: Duration::from_secs(3600),
            ..Leaf::default()
        })
        .unwrap()
    }

    pub fn write(dir: &Path, ca_pem: &str, issued: &Issued) -> Paths {
        let paths = Paths::in_dir(dir);
        std::fs::write(&paths.ca, ca_pem).unwrap();
        std::fs::write(&paths.cert, &issued.cert_pem).unwrap();
        std::fs::write(&paths.key, &issued.key_pem).unwrap();
        paths
    }

    #[test]
    fn a_set_is_taken_only_whole_and_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::generate("ca", Duration::from_secs(7200)).unwrap();
        let other = Authority::generate("other", Duration::from_secs(7200)).unwrap();
        let grants = vec![Grant::new(Tier::Region, "ord", Role::Agent)];
        let good = leaf(&ca, grants.clone());
        let paths = write(dir.path(), ca.cert_pem(), &good);
        let m = Material::load(&paths).unwrap();
        assert_eq!(m.own.grants, grants);
        assert_eq!(m.cas, 1);

        // A key of another certificate.
        let stranger = leaf(&ca, grants.clone());
        std::fs::write(&paths.key, &stranger.key_pem).unwrap();
        let err = Material::load(&paths).unwrap_err();
        assert!(matches!(err, MaterialError::Config(_)), "{err}");

        // A certificate of another CA.
        let foreign = leaf(&other, grants.clone());
        let paths = write(dir.path(), ca.cert_pem(), &foreign);
        let err = Material::load(&paths).unwrap_err();
        assert!(matches!(err, MaterialError::Untrusted(_)), "{err}");

        // Both CAs in the bundle (a CA rotation's middle step): taken.
        let both = format!("{}{}", ca.cert_pem(), other.cert_pem());
        let paths = write(dir.path(), &both, &foreign);
        assert_eq!(Material::load(&paths).unwrap().cas, 2);

        // Half a file, an empty one, a missing one.
        let paths = write(dir.path(), ca.cert_pem(), &good);
        std::fs::write(&paths.cert, &good.cert_pem[..good.cert_pem.len() / 2]).unwrap();
        assert!(matches!(
            Material::load(&paths).unwrap_err(),
            MaterialError::File { .. }
        ));
        std::fs::write(&paths.cert, "").unwrap();
        assert!(matches!(
            Material::load(&paths).unwrap_err(),
            MaterialError::File { .. }
        ));
        std::fs::remove_file(&paths.cert).unwrap();
        assert!(matches!(
            Material::load(&paths).unwrap_err(),
            MaterialError::File { .. }
        ));
    }
}
