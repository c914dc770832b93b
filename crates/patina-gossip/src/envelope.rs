//! The envelope around every gossip datagram: magic, version, flags, cluster name, payload.
//!
//! A datagram from another program (garbage on the port), another protocol version, or
//! another cluster (a region's agents and the global tier share hosts) is dropped before its
//! payload is decoded. So is a datagram no installed gossip key opens, and a plaintext one
//! once the keyring refuses plaintext (see [`crate::keyring`]).
//!
//! Layout (all lengths in bytes):
//!
//! ```text
//! 0..4  magic "PTNA"
//! 4     version (1)
//! 5     flags: 0 plaintext, 1 (FLAG_SEALED) sealed
//! 6     cluster name length n (1..=64)
//! 7..   cluster name (n bytes), then
//!       plaintext: the payload
//!       sealed:    nonce (12), the payload sealed with ChaCha20-Poly1305, tag (16); the
//!                  header (bytes 0..7+n) is the associated data
//! ```

/// Identifies Patina gossip datagrams.
pub const MAGIC: [u8; 4] = *b"PTNA";
/// The envelope format this code writes and reads.
pub const VERSION: u8 = 1;
/// Longest cluster name: short enough to spend little of each datagram on it.
pub const MAX_CLUSTER_NAME: usize = 64;
/// Bytes before the cluster name.
const FIXED: usize = 7;
/// The flag of a sealed datagram.
pub const FLAG_SEALED: u8 = 0x01;

use std::borrow::Cow;

use crate::keyring::{Keyring, OpenError, SEAL_OVERHEAD, Sealer};

/// A cluster's name: 1 to 64 characters from `[a-z0-9-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterName(String);

impl ClusterName {
    pub fn new(name: &str) -> Result<ClusterName, EnvelopeError> {
        let ok = !name.is_empty()
            && name.len() <= MAX_CLUSTER_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if ok {
            Ok(ClusterName(name.to_owned()))
        } else {
            Err(EnvelopeError::BadClusterName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a datagram was dropped (or a name refused). Nothing was decoded past the envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Shorter than an envelope: not ours.
    #[error("datagram too short for an envelope")]
    TooShort,
    /// Does not start with the magic: not a Patina datagram.
    #[error("not a patina datagram")]
    BadMagic,
    /// A version this code does not read (a newer agent during a rolling upgrade).
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u8),
    /// Flags this code does not understand (e.g. a MAC it cannot check).
    #[error("envelope flags {0:#04x} are not supported")]
    UnsupportedFlags(u8),
    /// From another cluster.
    #[error("datagram of another cluster")]
    ForeignCluster,
    /// A cluster name that breaks the rules (`[a-z0-9-]`, 1 to 64 characters).
    #[error("cluster names are 1 to 64 characters from [a-z0-9-]")]
    BadClusterName,
    /// Sealed, and no installed key opens it (another key, forged, or damaged).
    #[error("sealed datagram no installed key opens")]
    NoKey,
    /// In plaintext, and the keyring refuses plaintext.
    #[error("plaintext datagram refused")]
    Plaintext,
}

/// Wraps and unwraps datagrams of one cluster, sealed with its keyring's key in use (or in
/// plaintext while none is).
#[derive(Clone, Debug)]
pub struct Envelope {
    header: Vec<u8>,
    /// The header with [`FLAG_SEALED`]: the associated data of sealed datagrams.
    sealed_header: Vec<u8>,
    sealer: Sealer,
}

impl Envelope {
    /// An envelope without keys: plaintext out, plaintext taken.
    pub fn new(cluster: &ClusterName) -> Envelope {
        Envelope::with_keyring(cluster, Keyring::default())
    }

    pub fn with_keyring(cluster: &ClusterName, keyring: Keyring) -> Envelope {
        let mut header = Vec::with_capacity(FIXED + cluster.0.len());
        header.extend_from_slice(&MAGIC);
        header.push(VERSION);
        header.push(0);
        header.push(cluster.0.len() as u8);
        header.extend_from_slice(cluster.0.as_bytes());
        let mut sealed_header = header.clone();
        sealed_header[5] = FLAG_SEALED;
        Envelope {
            header,
            sealed_header,
            sealer: Sealer::new(keyring),
        }
    }

    pub fn keyring(&self) -> &Keyring {
        self.sealer.keyring()
    }

    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.sealer = Sealer::new(keyring);
    }

    /// Bytes the envelope adds to a payload, sealed or not (the same whatever the keyring
    /// holds, so that packet sizes never change with it): budget the payload's size with it
    /// so that a datagram stays under the MTU.
    pub fn overhead(&self) -> usize {
        self.header.len() + SEAL_OVERHEAD
    }

    /// Append the envelope and `payload` to `out`: sealed with the key in use, if any.
    pub fn seal(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(self.overhead() + payload.len());
        if self.sealer.seals() {
            out.extend_from_slice(&self.sealed_header);
            self.sealer.seal(&self.sealed_header, payload, out);
        } else {
            out.extend_from_slice(&self.header);
            out.extend_from_slice(payload);
        }
    }

    /// The payload of a datagram of this cluster, or why it is dropped.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<Cow<'a, [u8]>, EnvelopeError> {
        if datagram.len() < FIXED {
            return Err(EnvelopeError::TooShort);
        }
        if datagram[..4] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if datagram[4] != VERSION {
            return Err(EnvelopeError::UnsupportedVersion(datagram[4]));
        }
        let flags = datagram[5];
        if flags & !FLAG_SEALED != 0 {
            return Err(EnvelopeError::UnsupportedFlags(flags));
        }
        let n = datagram[6] as usize;
        let name = datagram
            .get(FIXED..FIXED + n)
            .ok_or(EnvelopeError::TooShort)?;
        if name != &self.header[FIXED..] {
            return Err(EnvelopeError::ForeignCluster);
        }
        let (header, rest) = datagram.split_at(FIXED + n);
        if flags == 0 {
            if !self.sealer.keyring().accepts_plaintext() {
                return Err(EnvelopeError::Plaintext);
            }
            return Ok(Cow::Borrowed(rest));
        }
        match self.sealer.open(header, rest) {
            Ok(payload) => Ok(Cow::Owned(payload)),
            Err(OpenError::NoKey) => Err(EnvelopeError::NoKey),
            Err(OpenError::Short) => Err(EnvelopeError::TooShort),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn envelope(name: &str) -> Envelope {
        Envelope::new(&ClusterName::new(name).unwrap())
    }

    fn open(e: &Envelope, datagram: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
        e.open(datagram).map(|p| p.into_owned())
    }

    fn keyed(name: &str, ring: Keyring) -> Envelope {
        Envelope::with_keyring(&ClusterName::new(name).unwrap(), ring)
    }

    #[test]
    fn sealed_datagrams_open_under_an_installed_key_only() {
        use crate::keyring::{GossipKey, KeyringOp};
        let (k1, k2) = (GossipKey::generate(), GossipKey::generate());
        let sender = keyed("ord", Keyring::with_key(k1.clone()));
        let mut out = Vec::new();
        sender.seal(b"payload", &mut out);
        assert_eq!(out.len(), 7 + sender.overhead());
        assert_eq!(&out[..10], b"PTNA\x01\x01\x03ord");
        assert!(
            !out.windows(7).any(|w| w == b"payload"),
            "sealed, not readable"
        );
        assert_eq!(open(&sender, &out), Ok(b"payload".to_vec()));
        // Another key, no key, another cluster's header: dropped before any decoding.
        assert_eq!(
            open(&keyed("ord", Keyring::with_key(k2.clone())), &out),
            Err(EnvelopeError::NoKey)
        );
        assert_eq!(open(&envelope("ord"), &out), Err(EnvelopeError::NoKey));
        let mut moved = out.clone();
        moved[7..10].copy_from_slice(b"ams");
        assert_eq!(
            open(&keyed("ams", Keyring::with_key(k1.clone())), &moved),
            Err(EnvelopeError::NoKey)
        );
        // A receiver holding both keys opens it; a plaintext one only while it accepts them.
        let mut both = Keyring::with_key(k2.clone());
        both.apply(&KeyringOp::Install(k1.clone())).unwrap();
        assert_eq!(
            open(&keyed("ord", both.clone()), &out),
            Ok(b"payload".to_vec())
        );
        let mut plain = Vec::new();
        envelope("ord").seal(b"payload", &mut plain);
        assert_eq!(
            open(&keyed("ord", both.clone()), &plain),
            Err(EnvelopeError::Plaintext)
        );
        both.apply(&KeyringOp::AcceptPlaintext(true)).unwrap();
        assert_eq!(open(&keyed("ord", both), &plain), Ok(b"payload".to_vec()));
        // Sealed twice, the same payload differs (a fresh nonce each time).
        let mut again = Vec::new();
        sender.seal(b"payload", &mut again);
        assert_ne!(out, again);
        // Appending to a buffer that holds something already keeps it and opens alike.
        let mut prefixed = b"xx".to_vec();
        sender.seal(b"payload", &mut prefixed);
        assert_eq!(open(&sender, &prefixed[2..]), Ok(b"payload".to_vec()));
    }

    #[test]
    fn a_sealed_datagram_has_exactly_the_documented_bytes() {
        let mut out = Vec::new();
        envelope("ord").seal(b"\x00\xffpayload", &mut out);
        assert_eq!(out, b"PTNA\x01\x00\x03ord\x00\xffpayload");
        assert_eq!(envelope("ord").overhead(), 10 + SEAL_OVERHEAD);
        assert_eq!(
            open(&envelope("ord"), &out),
            Ok(b"\x00\xffpayload".to_vec())
        );
        let mut empty = Vec::new();
        envelope("ord").seal(b"", &mut empty);
        assert_eq!(open(&envelope("ord"), &empty), Ok(Vec::new()));
    }

    #[test]
    fn foreign_and_malformed_datagrams_are_dropped_with_a_reason() {
        let e = envelope("ord");
        let unopened = [b"PTNA\x01\x01\x03ord".as_slice(), &[0u8; 40]].concat();
        let cases: [(&[u8], EnvelopeError); 10] = [
            (b"", EnvelopeError::TooShort),
            (b"PTNA\x01\x00", EnvelopeError::TooShort),
            (b"GET / HTTP/1.1\r\n", EnvelopeError::BadMagic),
            (
                b"PTNA\x02\x00\x03ordx",
                EnvelopeError::UnsupportedVersion(2),
            ),
            (b"PTNA\x01\x02\x03ordx", EnvelopeError::UnsupportedFlags(2)),
            (b"PTNA\x01\x01\x03ordx", EnvelopeError::TooShort),
            (&unopened, EnvelopeError::NoKey),
            (b"PTNA\x01\x00\x03fraxx", EnvelopeError::ForeignCluster),
            (b"PTNA\x01\x00\x04ordxyz", EnvelopeError::ForeignCluster),
            (b"PTNA\x01\x00\x09or", EnvelopeError::TooShort),
        ];
        for (datagram, why) in cases {
            assert_eq!(open(&e, datagram), Err(why), "{datagram:?}");
        }
    }

    #[test]
    fn cluster_names_follow_the_rule() {
        for ok in ["ord", "global", "a", &"a".repeat(64), "eu-west-1"] {
            assert!(ClusterName::new(ok).is_ok(), "{ok:?}");
        }
        for bad in ["", "Ord", "o d", "ørd", &"a".repeat(65)] {
            assert_eq!(
                ClusterName::new(bad),
                Err(EnvelopeError::BadClusterName),
                "{bad:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn any_payload_round_trips(payload in prop::collection::vec(any::<u8>(), 0..1500)) {
            let e = envelope("region-1");
            let mut out = Vec::new();
            e.seal(&payload, &mut out);
            prop_assert_eq!(out.len(), payload.len() + e.overhead() - SEAL_OVERHEAD);
            prop_assert_eq!(open(&e, &out), Ok(payload.clone()));
            prop_assert_eq!(open(&envelope("region-2"), &out), Err(EnvelopeError::ForeignCluster));
            let k = keyed("region-1", Keyring::with_key(crate::keyring::GossipKey::generate()));
            let mut sealed = Vec::new();
            k.seal(&payload, &mut sealed);
            prop_assert_eq!(sealed.len(), payload.len() + k.overhead());
            prop_assert_eq!(open(&k, &sealed), Ok(payload));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = envelope("ord").open(&bytes);
        }
    }
}
