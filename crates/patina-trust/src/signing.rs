//! Signatures on records, made with a certificate's key and checked against the CA bundle:
//! a bridge signs each summary and heartbeat it writes, and every global agent and edge
//! checks the signature, the certificate's chain, and that the certificate names the bridge's
//! region, before it takes the record. So no global agent can make anyone believe a summary
//! that no bridge of the region made.
//!
//! A signature is the TLS signature scheme (2 bytes, big-endian) followed by the signature:
//! Ed25519 for the bridge certificates `patina certs` issues; ECDSA P-256 and P-384 for those
//! of other PKIs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ring::signature::{self, UnparsedPublicKey};
use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::material::{Material, PeerVerifier};
use crate::principal::{Principal, principal_of};
use crate::reload::Trust;

/// The schemes a signer may use, in order of preference.
const SCHEMES: [SignatureScheme; 3] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
];

/// Longest signature taken (an ECDSA P-384 one is at most 104 bytes with its scheme).
pub const MAX_SIGNATURE: usize = 2 + 128;
/// Longest certificate taken on a record.
pub const MAX_CERTIFICATE: usize = 4096;
/// Certificates a [`Verifier`] keeps checked; past it, it starts over.
const MAX_CACHED: usize = 4096;

/// Why a record's signature or certificate was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("no signature")]
    Unsigned,
    #[error("a signature that does not verify")]
    BadSignature,
    #[error("a certificate the CA bundle does not vouch for: {0}")]
    Untrusted(String),
    #[error("this key cannot sign: {0}")]
    CannotSign(String),
}

impl Material {
    /// Sign `message` with this set's key.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let signer = self
            .signing
            .choose_scheme(&SCHEMES)
            .ok_or_else(|| SignError::CannotSign("not Ed25519 or ECDSA P-256/P-384".into()))?;
        let sig = signer
            .sign(message)
            .map_err(|e| SignError::CannotSign(e.to_string()))?;
        let mut out = Vec::with_capacity(2 + sig.len());
        out.extend_from_slice(&u16::from(signer.scheme()).to_be_bytes());
        out.extend_from_slice(&sig);
        Ok(out)
    }

    /// This set's certificate (DER): what a record carries for its signatures to be checked.
    pub fn certificate(&self) -> &[u8] {
        self.cert.as_ref()
    }

    /// Check `der` against this set's CA bundle (chain and validity now) and read whom it
    /// names.
    pub fn vouch(&self, der: &[u8]) -> Result<Vouched, SignError> {
        if der.len() > MAX_CERTIFICATE {
            return Err(SignError::Untrusted(format!(
                "{} bytes, at most {MAX_CERTIFICATE}",
                der.len()
            )));
        }
        let cert = CertificateDer::from(der.to_vec());
        let checker = PeerVerifier {
            roots: self.roots.clone(),
            algs: self.algs,
        };
        checker
            .check_chain(&cert, &[], UnixTime::now())
            .map_err(|e| SignError::Untrusted(e.to_string()))?;
        let principal = principal_of(der).map_err(|e| SignError::Untrusted(e.to_string()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| SignError::Untrusted(e.to_string()))?;
        Ok(Vouched {
            principal,
            public_key: parsed.public_key().subject_public_key.data.to_vec(),
        })
    }
}

/// A certificate the CA bundle vouched for: whom it names and its public key.
#[derive(Clone, Debug)]
pub struct Vouched {
    pub principal: Principal,
    public_key: Vec<u8>,
}

impl Vouched {
    /// Whether `sig` (as [`Material::sign`] made it) signs `message` under this key.
    pub fn verify(&self, message: &[u8], sig: &[u8]) -> Result<(), SignError> {
        verify_with(&self.public_key, message, sig)
    }
}

impl Material {
    /// Whether `sig` signs `message` under this set's own key (what it signed earlier, read
    /// back: no chain check, the set's certificate is its own).
    pub fn signed(&self, message: &[u8], sig: &[u8]) -> Result<(), SignError> {
        let (_, parsed) = x509_parser::parse_x509_certificate(self.cert.as_ref())
            .map_err(|e| SignError::Untrusted(e.to_string()))?;
        verify_with(&parsed.public_key().subject_public_key.data, message, sig)
    }
}

fn verify_with(public_key: &[u8], message: &[u8], sig: &[u8]) -> Result<(), SignError> {
    if sig.is_empty() {
        return Err(SignError::Unsigned);
    }
    if sig.len() < 2 || sig.len() > MAX_SIGNATURE {
        return Err(SignError::BadSignature);
    }
    let scheme = SignatureScheme::from(u16::from_be_bytes([sig[0], sig[1]]));
    let alg: &dyn signature::VerificationAlgorithm = match scheme {
        SignatureScheme::ED25519 => &signature::ED25519,
        SignatureScheme::ECDSA_NISTP256_SHA256 => &signature::ECDSA_P256_SHA256_ASN1,
        SignatureScheme::ECDSA_NISTP384_SHA384 => &signature::ECDSA_P384_SHA384_ASN1,
        _ => return Err(SignError::BadSignature),
    };
    UnparsedPublicKey::new(alg, public_key)
        .verify(message, &sig[2..])
        .map_err(|_| SignError::BadSignature)
}

/// Checks records' certificates against the current CA bundle (following its reloads),
/// keeping those it vouched for so that each is checked once per bundle.
pub struct Verifier {
    trust: Trust,
    cache: Mutex<HashMap<Vec<u8>, Checked>>,
}

/// A certificate vouched for under the bundle of this source.
type Checked = (u64, Arc<Vouched>);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(trust: Trust) -> Verifier {
        Verifier {
            trust,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The certificate `der`, vouched for by the current bundle (from the cache when it was
    /// checked under this bundle already).
    pub fn vouched(&self, der: &[u8]) -> Result<Arc<Vouched>, SignError> {
        let material = self.trust.current();
        let source = material.source ^ material.ca_not_after as u64;
        let key = ring::digest::digest(&ring::digest::SHA256, der)
            .as_ref()
            .to_vec();
        if let Some((s, v)) = self.cache.lock().expect("verifier cache").get(&key)
            && *s == source
            && v.principal.not_after > crate::reload::now_secs()
        {
            return Ok(v.clone());
        }
        let v = Arc::new(material.vouch(der)?);
        let mut cache = self.cache.lock().expect("verifier cache");
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, (source, v.clone()));
        Ok(v)
    }

    /// The trust this verifier follows (its own set signs).
    pub fn trust(&self) -> &Trust {
        &self.trust
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::certs::Authority;
    use crate::principal::{Grant, Role, Tier};

    fn material(ca: &Authority, grants: Vec<Grant>) -> Material {
        ca.issue_set(grants, Duration::from_secs(3600)).unwrap()
    }

    #[test]
    fn a_bridge_signs_and_only_its_signature_over_that_message_verifies() {
        let ca = Authority::generate("ca", Duration::from_secs(3600)).unwrap();
        let bridge = material(
            &ca,
            vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge("ord".into()),
            )],
        );
        let agent = material(&ca, vec![Grant::new(Tier::Global, "global", Role::Agent)]);
        let sig = bridge.sign(b"web/ord 3 of 4").unwrap();
        // Bridges get Ed25519 keys; agents keep ECDSA P-256: both sign and verify.
        assert_eq!(
            &sig[..2],
            &u16::from(SignatureScheme::ED25519).to_be_bytes()
        );
        let vouched = agent.vouch(bridge.certificate()).unwrap();
        assert!(vouched.principal.grants[0].role == Role::Bridge("ord".into()));
        assert_eq!(vouched.verify(b"web/ord 3 of 4", &sig), Ok(()));
        assert_eq!(
            vouched.verify(b"web/ord 4 of 4", &sig),
            Err(SignError::BadSignature)
        );
        assert_eq!(vouched.verify(b"x", &[]), Err(SignError::Unsigned));
        assert_eq!(vouched.verify(b"x", &[0]), Err(SignError::BadSignature));
        let mut flipped = sig.clone();
        flipped[10] ^= 1;
        assert!(vouched.verify(b"web/ord 3 of 4", &flipped).is_err());
        let ecdsa = agent.sign(b"m").unwrap();
        assert_eq!(
            &ecdsa[..2],
            &u16::from(SignatureScheme::ECDSA_NISTP256_SHA256).to_be_bytes()
        );
        assert_eq!(
            bridge
                .vouch(agent.certificate())
                .unwrap()
                .verify(b"m", &ecdsa),
            Ok(())
        );
        // Another CA's certificate, or garbage, is not vouched for.
        let other = Authority::generate("other", Duration::from_secs(3600)).unwrap();
        let stranger = material(
            &other,
            vec![Grant::new(
                Tier::Global,
                "global",
                Role::Bridge("ord".into()),
            )],
        );
        assert!(matches!(
            agent.vouch(stranger.certificate()),
            Err(SignError::Untrusted(_))
        ));
        assert!(agent.vouch(b"not a certificate").is_err());
        // The verifier caches what it vouched for and refuses the same strangers.
        let v = Verifier::new(Trust::fixed(agent));
        assert!(v.vouched(bridge.certificate()).is_ok());
        assert!(v.vouched(bridge.certificate()).is_ok());
        assert!(v.vouched(stranger.certificate()).is_err());
    }
}
