//! What travels inside the envelope: a kind byte, then a SWIM packet (foca's, encoded by
//! `identity::Codec`) or a push of changes; and the items that carry changes.
//!
//! ```text
//! payload = kind u8 (1 swim | 2 push | 3 tree push | 4 prune | 5 graft | 6 link) | body
//! push    = sender node u64 LE | hops left u8 | (item length u16 LE | item)+
//! tree push: as push (forwarded along the origin's tree, `node/tree.rs`)
//! prune   = sender node u64 LE | (origin u64 LE)+
//! graft   = sender node u64 LE | (origin u64 LE | seq u64 LE)+
//! link    = sender node u64 LE
//! item    = tag u8 | origin u64 LE | seq u64 LE | rest
//!   tag 1 record: hlc u64 LE | key length u16 LE | key | group length u16 LE | group
//!                 | has value u8 (0 tombstone, 1 value) | value (to the end)
//!   tag 2 notice: nothing more. "This version exists": a change too large for a datagram;
//!                 the receiver's gap opens and anti-entropy fetches it.
//!   tag 3 announce: nothing more. "I have this version" (tree dissemination's lazy path):
//!                 a receiver that lacks it for a while grafts onto the announcer.
//! ```
//!
//! Items are hand-framed so that a truncated or hostile item is an error, never a panic, and
//! so that their size is known before they are queued (foca keeps an item that does not fit
//! a packet in its queue for ever).

use std::sync::Arc;

use patina_store::{Hlc, NodeId, Record, Version};

pub const KIND_SWIM: u8 = 1;
pub const KIND_PUSH: u8 = 2;
pub const KIND_TREE_PUSH: u8 = 3;
pub const KIND_PRUNE: u8 = 4;
pub const KIND_GRAFT: u8 = 5;
pub const KIND_LINK: u8 = 6;

const TAG_RECORD: u8 = 1;
const TAG_NOTICE: u8 = 2;
const TAG_ANNOUNCE: u8 = 3;

/// Why an item or push did not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("truncated")]
    Truncated,
    #[error("unknown item tag {0}")]
    Tag(u8),
    #[error("key or group is not UTF-8")]
    Utf8,
    #[error("sequence number 0")]
    ZeroSeq,
    #[error("empty push")]
    Empty,
}

/// One change as gossip carries it.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// The record itself.
    Record(Record),
    /// Only that a version exists (the record would not fit a datagram).
    Notice { origin: NodeId, seq: u64 },
    /// The sender holds this version (tree dissemination's lazy path).
    Announce { origin: NodeId, seq: u64 },
}

impl Item {
    pub fn origin(&self) -> NodeId {
        match self {
            Item::Record(r) => r.version.origin,
            Item::Notice { origin, .. } | Item::Announce { origin, .. } => *origin,
        }
    }

    pub fn seq(&self) -> u64 {
        match self {
            Item::Record(r) => r.version.seq,
            Item::Notice { seq, .. } | Item::Announce { seq, .. } => *seq,
        }
    }

    /// The item for `record`: the record if its encoding is at most `max_len` bytes, else a
    /// notice.
    pub fn for_record(record: &Record, max_len: usize) -> Item {
        let len = 1
            + 8
            + 8
            + 8
            + 2
            + record.key.len()
            + 2
            + record.group.len()
            + 1
            + record.value.as_ref().map_or(0, |v| v.len());
        if len <= max_len {
            Item::Record(record.clone())
        } else {
            Item::Notice {
                origin: record.version.origin,
                seq: record.version.seq,
            }
        }
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Record(r) => {
                out.push(TAG_RECORD);
                out.extend_from_slice(&r.version.origin.0.to_le_bytes());
                out.extend_from_slice(&r.version.seq.to_le_bytes());
                out.extend_from_slice(&r.version.hlc.0.to_le_bytes());
                out.extend_from_slice(&(r.key.len() as u16).to_le_bytes());
                out.extend_from_slice(r.key.as_bytes());
                out.extend_from_slice(&(r.group.len() as u16).to_le_bytes());
                out.extend_from_slice(r.group.as_bytes());
                match &r.value {
                    None => out.push(0),
                    Some(v) => {
                        out.push(1);
                        out.extend_from_slice(v);
                    }
                }
            }
            Item::Notice { origin, seq } | Item::Announce { origin, seq } => {
                out.push(if matches!(self, Item::Notice { .. }) {
                    TAG_NOTICE
                } else {
                    TAG_ANNOUNCE
                });
                out.extend_from_slice(&origin.0.to_le_bytes());
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decode one item that fills `bytes` exactly.
    pub fn decode(bytes: &[u8]) -> Result<Item, WireError> {
        let mut r = Cursor(bytes);
        let tag = r.u8()?;
        let origin = NodeId(r.u64()?);
        let seq = r.u64()?;
        if seq == 0 {
            return Err(WireError::ZeroSeq);
        }
        match tag {
            TAG_NOTICE | TAG_ANNOUNCE => {
                if !r.0.is_empty() {
                    return Err(WireError::Truncated);
                }
                Ok(if tag == TAG_NOTICE {
                    Item::Notice { origin, seq }
                } else {
                    Item::Announce { origin, seq }
                })
            }
            TAG_RECORD => {
                let hlc = Hlc(r.u64()?);
                let key = r.str()?;
                let group = r.str()?;
                let value = match r.u8()? {
                    0 if r.0.is_empty() => None,
                    1 => Some(Arc::<[u8]>::from(r.0)),
                    _ => return Err(WireError::Truncated),
                };
                Ok(Item::Record(Record {
                    key: key.into(),
                    group: group.into(),
                    value,
                    version: Version { hlc, origin, seq },
                }))
            }
            other => Err(WireError::Tag(other)),
        }
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| WireError::Utf8)
    }
}

/// A push of changes: sent at once to a few members, forwarded on first receipt while hops
/// are left.
#[derive(Clone, Debug, PartialEq)]
pub struct Push {
    pub sender: NodeId,
    pub hops: u8,
    /// Sent along its origin's tree ([`KIND_TREE_PUSH`]), not to random members.
    pub tree: bool,
    /// Encoded items.
    pub items: Vec<Vec<u8>>,
}

/// Bytes a push adds around its items (kind, sender, hops).
pub const PUSH_OVERHEAD: usize = 1 + 8 + 1;

impl Push {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.tree { KIND_TREE_PUSH } else { KIND_PUSH });
        out.extend_from_slice(&self.sender.0.to_le_bytes());
        out.push(self.hops);
        for item in &self.items {
            out.extend_from_slice(&(item.len() as u16).to_le_bytes());
            out.extend_from_slice(item);
        }
    }

    /// Decode a push body (after the kind byte; `tree`: it was [`KIND_TREE_PUSH`]).
    pub fn decode(body: &[u8], tree: bool) -> Result<Push, WireError> {
        let mut r = Cursor(body);
        let sender = NodeId(r.u64()?);
        let hops = r.u8()?;
        let mut items = Vec::new();
        while !r.0.is_empty() {
            let n = r.u16()? as usize;
            if n == 0 {
                return Err(WireError::Truncated);
            }
            items.push(r.take(n)?.to_vec());
        }
        if items.is_empty() {
            return Err(WireError::Empty);
        }
        Ok(Push {
            sender,
            hops,
            tree,
            items,
        })
    }
}

/// Most entries a prune or graft carries (what fits a datagram, well above what one
/// node sends at once).
pub const MAX_TREE_ENTRIES: usize = 64;

/// Tree dissemination's control messages (`node/tree.rs`).
#[derive(Clone, Debug, PartialEq)]
pub enum TreeControl {
    /// "Stop pushing these origins' changes to me: I get them from another parent."
    Prune {
        sender: NodeId,
        origins: Vec<NodeId>,
    },
    /// "I lack these versions you announced: send them, and push me that origin's changes
    /// from now on."
    Graft {
        sender: NodeId,
        versions: Vec<(NodeId, u64)>,
    },
    /// "You are in my view: push me changes too" (links go both ways).
    Link { sender: NodeId },
}

impl TreeControl {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            TreeControl::Prune { sender, origins } => {
                out.push(KIND_PRUNE);
                out.extend_from_slice(&sender.0.to_le_bytes());
                for o in origins {
                    out.extend_from_slice(&o.0.to_le_bytes());
                }
            }
            TreeControl::Link { sender } => {
                out.push(KIND_LINK);
                out.extend_from_slice(&sender.0.to_le_bytes());
            }
            TreeControl::Graft { sender, versions } => {
                out.push(KIND_GRAFT);
                out.extend_from_slice(&sender.0.to_le_bytes());
                for (o, seq) in versions {
                    out.extend_from_slice(&o.0.to_le_bytes());
                    out.extend_from_slice(&seq.to_le_bytes());
                }
            }
        }
    }

    /// Decode the body of a prune, a graft or a link (after its kind byte, `kind`).
    pub fn decode(kind: u8, body: &[u8]) -> Result<TreeControl, WireError> {
        let mut r = Cursor(body);
        let sender = NodeId(r.u64()?);
        if kind == KIND_LINK {
            if !r.0.is_empty() {
                return Err(WireError::Truncated);
            }
            return Ok(TreeControl::Link { sender });
        }
        let entry = if kind == KIND_PRUNE { 8 } else { 16 };
        if r.0.is_empty() {
            return Err(WireError::Empty);
        }
        if r.0.len() % entry != 0 || r.0.len() / entry > MAX_TREE_ENTRIES {
            return Err(WireError::Truncated);
        }
        if kind == KIND_PRUNE {
            let mut origins = Vec::new();
            while !r.0.is_empty() {
                origins.push(NodeId(r.u64()?));
            }
            Ok(TreeControl::Prune { sender, origins })
        } else if kind == KIND_GRAFT {
            let mut versions = Vec::new();
            while !r.0.is_empty() {
                let origin = NodeId(r.u64()?);
                let seq = r.u64()?;
                if seq == 0 {
                    return Err(WireError::ZeroSeq);
                }
                versions.push((origin, seq));
            }
            Ok(TreeControl::Graft { sender, versions })
        } else {
            Err(WireError::Tag(kind))
        }
    }
}

/// A stable 64-bit hash of a key (FNV-1a): the same on every node and every run, so it may
/// decide which queued item replaces which.
pub fn key_hash(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(value: Option<&[u8]>) -> Record {
        Record {
            key: "m1".into(),
            group: "web".into(),
            value: value.map(Arc::from),
            version: Version {
                hlc: Hlc(0x10),
                origin: NodeId(7),
                seq: 2,
            },
        }
    }

    #[test]
    fn a_record_item_has_an_exact_layout() {
        let bytes = Item::Record(record(Some(b"+v"))).to_bytes();
        let mut want = vec![1];
        want.extend_from_slice(&7u64.to_le_bytes());
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&0x10u64.to_le_bytes());
        want.extend_from_slice(&[2, 0, b'm', b'1', 3, 0, b'w', b'e', b'b', 1, b'+', b'v']);
        assert_eq!(bytes, want);
    }

    #[test]
    fn items_round_trip_and_every_truncation_is_an_error() {
        for item in [
            Item::Record(record(Some(b"+value"))),
            Item::Record(record(Some(b""))),
            Item::Record(record(None)),
            Item::Notice {
                origin: NodeId(9),
                seq: 4,
            },
            Item::Announce {
                origin: NodeId(9),
                seq: 4,
            },
        ] {
            let bytes = item.to_bytes();
            assert_eq!(Item::decode(&bytes), Ok(item.clone()));
            for cut in 0..bytes.len() {
                let decoded = Item::decode(&bytes[..cut]);
                // A record with a value may be cut inside its value: that decodes, as a
                // shorter value (the length is the datagram's); everything else must fail.
                if let Ok(Item::Record(r)) = &decoded {
                    assert!(r.value.is_some() && cut > bytes.len() - 7, "cut {cut}");
                } else {
                    assert!(decoded.is_err(), "cut {cut} of {item:?}");
                }
            }
        }
    }

    #[test]
    fn bad_items_are_errors() {
        let mut bytes = Item::Notice {
            origin: NodeId(1),
            seq: 1,
        }
        .to_bytes();
        bytes[0] = 9;
        assert_eq!(Item::decode(&bytes), Err(WireError::Tag(9)));
        let zero = Item::Notice {
            origin: NodeId(1),
            seq: 0,
        }
        .to_bytes();
        assert_eq!(Item::decode(&zero), Err(WireError::ZeroSeq));
        let mut tomb = Item::Record(record(None)).to_bytes();
        tomb.push(0);
        assert_eq!(Item::decode(&tomb), Err(WireError::Truncated));
        let mut bad_utf8 = Item::Record(record(None)).to_bytes();
        bad_utf8[27] = 0xff;
        assert_eq!(Item::decode(&bad_utf8), Err(WireError::Utf8));
    }

    #[test]
    fn a_record_too_large_for_a_datagram_travels_as_a_notice() {
        let r = record(Some(&[b'+'; 100]));
        assert!(matches!(Item::for_record(&r, 1000), Item::Record(_)));
        assert_eq!(
            Item::for_record(&r, 100),
            Item::Notice {
                origin: NodeId(7),
                seq: 2
            }
        );
    }

    #[test]
    fn pushes_round_trip_and_bad_ones_are_errors() {
        for tree in [false, true] {
            let push = Push {
                sender: NodeId(3),
                hops: 2,
                tree,
                items: vec![Item::Record(record(None)).to_bytes(), vec![1, 2, 3]],
            };
            let mut bytes = Vec::new();
            push.encode(&mut bytes);
            assert_eq!(bytes[0], if tree { KIND_TREE_PUSH } else { KIND_PUSH });
            assert_eq!(Push::decode(&bytes[1..], tree), Ok(push.clone()));
            assert_eq!(Push::decode(&bytes[1..10], tree), Err(WireError::Empty));
            // A cut between items is a shorter push; anywhere else it is an error.
            let boundary = 1 + 8 + 1 + 2 + push.items[0].len();
            for cut in 1..bytes.len() {
                let decoded = Push::decode(&bytes[1..cut], tree);
                if cut == boundary {
                    assert_eq!(decoded.unwrap().items, push.items[..1]);
                } else {
                    assert!(decoded.is_err(), "cut {cut}");
                }
            }
        }
    }

    #[test]
    fn prunes_and_grafts_round_trip_and_bad_ones_are_errors() {
        let prune = TreeControl::Prune {
            sender: NodeId(3),
            origins: vec![NodeId(7), NodeId(8)],
        };
        let graft = TreeControl::Graft {
            sender: NodeId(4),
            versions: vec![(NodeId(7), 2), (NodeId(9), 5)],
        };
        for (msg, kind) in [(prune, KIND_PRUNE), (graft, KIND_GRAFT)] {
            let mut bytes = Vec::new();
            msg.encode(&mut bytes);
            assert_eq!(bytes[0], kind);
            assert_eq!(TreeControl::decode(kind, &bytes[1..]), Ok(msg.clone()));
            // Every cut that is not a whole number of entries, and no entry at all, fails.
            let entry = if kind == KIND_PRUNE { 8 } else { 16 };
            for cut in 1..bytes.len() {
                let decoded = TreeControl::decode(kind, &bytes[1..cut]);
                let body = cut - 1;
                if body > 8 && (body - 8) % entry == 0 {
                    assert!(decoded.is_ok(), "cut {cut}");
                } else {
                    assert!(decoded.is_err(), "cut {cut} of {msg:?}");
                }
            }
        }
        let link = TreeControl::Link { sender: NodeId(5) };
        let mut bytes = Vec::new();
        link.encode(&mut bytes);
        assert_eq!(bytes[0], KIND_LINK);
        assert_eq!(TreeControl::decode(KIND_LINK, &bytes[1..]), Ok(link));
        assert!(TreeControl::decode(KIND_LINK, &bytes[1..8]).is_err());
        assert!(TreeControl::decode(KIND_LINK, &[bytes[1..].to_vec(), vec![0]].concat()).is_err());
        // Too many entries, and a graft of sequence number 0.
        let mut many = vec![0u8; 8];
        many.extend(std::iter::repeat_n(1u8, 8 * (MAX_TREE_ENTRIES + 1)));
        assert_eq!(
            TreeControl::decode(KIND_PRUNE, &many),
            Err(WireError::Truncated)
        );
        let mut zero = Vec::new();
        TreeControl::Graft {
            sender: NodeId(4),
            versions: vec![(NodeId(7), 0)],
        }
        .encode(&mut zero);
        assert_eq!(
            TreeControl::decode(KIND_GRAFT, &zero[1..]),
            Err(WireError::ZeroSeq)
        );
    }
}
