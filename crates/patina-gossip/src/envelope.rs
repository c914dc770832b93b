//! The envelope around every gossip datagram: magic, version, flags, cluster name, payload.
//!
//! A datagram from another program (garbage on the port), another protocol version, or
//! another cluster (a region's agents and the global tier share hosts) is dropped before its
//! payload is decoded. The flags byte leaves room for a MAC (authenticated gossip comes
//! later): today every flag must be zero.
//!
//! Layout (all lengths in bytes):
//!
//! ```text
//! 0..4  magic "PTNA"
//! 4     version (1)
//! 5     flags (0)
//! 6     cluster name length n (1..=64)
//! 7..   cluster name (n bytes), then the payload
//! ```

/// Identifies Patina gossip datagrams.
pub const MAGIC: [u8; 4] = *b"PTNA";
/// The envelope format this code writes and reads.
pub const VERSION: u8 = 1;
/// Longest cluster name: short enough to spend little of each datagram on it.
pub const MAX_CLUSTER_NAME: usize = 64;
/// Bytes before the cluster name.
const FIXED: usize = 7;

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
}

/// Wraps and unwraps datagrams of one cluster.
#[derive(Clone, Debug)]
pub struct Envelope {
    header: Vec<u8>,
}

impl Envelope {
    pub fn new(cluster: &ClusterName) -> Envelope {
        let mut header = Vec::with_capacity(FIXED + cluster.0.len());
        header.extend_from_slice(&MAGIC);
        header.push(VERSION);
        header.push(0);
        header.push(cluster.0.len() as u8);
        header.extend_from_slice(cluster.0.as_bytes());
        Envelope { header }
    }

    /// Bytes the envelope adds to a payload: budget the payload's size with it so that a
    /// datagram stays under the MTU.
    pub fn overhead(&self) -> usize {
        self.header.len()
    }

    /// Append the envelope and `payload` to `out`.
    pub fn seal(&self, payload: &[u8], out: &mut Vec<u8>) {
        out.reserve(self.header.len() + payload.len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(payload);
    }

    /// The payload of a datagram of this cluster, or why it is dropped.
    pub fn open<'a>(&self, datagram: &'a [u8]) -> Result<&'a [u8], EnvelopeError> {
        if datagram.len() < FIXED {
            return Err(EnvelopeError::TooShort);
        }
        if datagram[..4] != MAGIC {
            return Err(EnvelopeError::BadMagic);
        }
        if datagram[4] != VERSION {
            return Err(EnvelopeError::UnsupportedVersion(datagram[4]));
        }
        if datagram[5] != 0 {
            return Err(EnvelopeError::UnsupportedFlags(datagram[5]));
        }
        let n = datagram[6] as usize;
        let name = datagram
            .get(FIXED..FIXED + n)
            .ok_or(EnvelopeError::TooShort)?;
        if name != &self.header[FIXED..] {
            return Err(EnvelopeError::ForeignCluster);
        }
        Ok(&datagram[FIXED + n..])
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn envelope(name: &str) -> Envelope {
        Envelope::new(&ClusterName::new(name).unwrap())
    }

    #[test]
    fn a_sealed_datagram_has_exactly_the_documented_bytes() {
        let mut out = Vec::new();
        envelope("ord").seal(b"\x00\xffpayload", &mut out);
        assert_eq!(out, b"PTNA\x01\x00\x03ord\x00\xffpayload");
        assert_eq!(envelope("ord").overhead(), 10);
        assert_eq!(envelope("ord").open(&out), Ok(&b"\x00\xffpayload"[..]));
        let mut empty = Vec::new();
        envelope("ord").seal(b"", &mut empty);
        assert_eq!(envelope("ord").open(&empty), Ok(&b""[..]));
    }

    #[test]
    fn foreign_and_malformed_datagrams_are_dropped_with_a_reason() {
        let e = envelope("ord");
        let cases: [(&[u8], EnvelopeError); 8] = [
            (b"", EnvelopeError::TooShort),
            (b"PTNA\x01\x00", EnvelopeError::TooShort),
            (b"GET / HTTP/1.1\r\n", EnvelopeError::BadMagic),
            (
                b"PTNA\x02\x00\x03ordx",
                EnvelopeError::UnsupportedVersion(2),
            ),
            (b"PTNA\x01\x01\x03ordx", EnvelopeError::UnsupportedFlags(1)),
            (b"PTNA\x01\x00\x03fraxx", EnvelopeError::ForeignCluster),
            (b"PTNA\x01\x00\x04ordxyz", EnvelopeError::ForeignCluster),
            (b"PTNA\x01\x00\x09or", EnvelopeError::TooShort),
        ];
        for (datagram, why) in cases {
            assert_eq!(e.open(datagram), Err(why), "{datagram:?}");
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
            prop_assert_eq!(out.len(), payload.len() + e.overhead());
            prop_assert_eq!(e.open(&out), Ok(&payload[..]));
            prop_assert_eq!(envelope("region-2").open(&out), Err(EnvelopeError::ForeignCluster));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = envelope("ord").open(&bytes);
        }
    }
}
