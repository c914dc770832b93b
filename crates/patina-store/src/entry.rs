//! [`Entry`]: one record's state as the store holds it in memory.
//!
//! Every record in memory is one immutable allocation holding its version, revision, flags,
//! key, group and value, so a reader takes it with one reference-count increment and the
//! index spends two pointer-sized slots on it. At a million machines that is the difference
//! between ~200 and ~500 bytes per machine (`cargo xtask bench store`).

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use crate::{Flags, Hlc, NodeId, Version};

/// Longest key or group, in bytes. Region keys are at most 64 characters and groups 63; the
/// bound keeps lengths in a `u16` and records small.
pub const MAX_KEY_LEN: usize = 1024;

// Layout of the allocation (little endian):
//   0..8 hlc | 8..16 origin | 16..24 seq | 24..32 rev | 32 flags | 33..35 key len |
//   35..37 group len | key | group | value
const HLC: usize = 0;
const ORIGIN: usize = 8;
const SEQ: usize = 16;
const REV: usize = 24;
const FLAGS: usize = 32;
const KEY_LEN: usize = 33;
const GROUP_LEN: usize = 35;
const HEADER: usize = 37;
const LIVE: u8 = 1;
const ROUTABLE: u8 = 2;
/// The key was in other groups before this state (its stored row lists them).
const MOVED: u8 = 4;
/// A hidden view: what the feed carries for a live record whose owner is down (never in the
/// index, never stored). See `overlay.rs`.
const HIDDEN: u8 = 8;

/// A record's state: live (with a value) or a tombstone. Cheap to clone.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry(Arc<[u8]>);

impl Entry {
    /// Build an entry. `key` and `group` must be at most [`MAX_KEY_LEN`] bytes (the writer
    /// checks before it gets here).
    /// `value` is `None` for a tombstone; `flags` apply to live values only.
    pub fn new(
        key: &str,
        group: &str,
        value: Option<&[u8]>,
        flags: Flags,
        version: Version,
        rev: u64,
    ) -> Entry {
        assert!(key.len() <= MAX_KEY_LEN && group.len() <= MAX_KEY_LEN);
        let live = value.is_some();
        let value = value.unwrap_or_default();
        let mut buf = Vec::with_capacity(HEADER + key.len() + group.len() + value.len());
        buf.extend_from_slice(&version.hlc.0.to_le_bytes());
        buf.extend_from_slice(&version.origin.0.to_le_bytes());
        buf.extend_from_slice(&version.seq.to_le_bytes());
        buf.extend_from_slice(&rev.to_le_bytes());
        let flags = match (live, flags.routable) {
            (false, _) => 0,
            (true, false) => LIVE,
            (true, true) => LIVE | ROUTABLE,
        };
        buf.push(flags);
        buf.extend_from_slice(&(key.len() as u16).to_le_bytes());
        buf.extend_from_slice(&(group.len() as u16).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(group.as_bytes());
        buf.extend_from_slice(value);
        Entry(Arc::from(buf))
    }

    /// Heap bytes of this entry's allocation (counted once however many handles share it).
    pub fn heap_bytes(&self) -> usize {
        // The Arc's two counters plus the bytes.
        16 + self.0.len()
    }

    fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    fn u16_at(&self, at: usize) -> usize {
        u16::from_le_bytes([self.0[at], self.0[at + 1]]) as usize
    }

    fn str_at(&self, start: usize, len: usize) -> &str {
        std::str::from_utf8(&self.0[start..start + len]).expect("built from a str")
    }

    pub fn key(&self) -> &str {
        self.str_at(HEADER, self.u16_at(KEY_LEN))
    }

    pub fn group(&self) -> &str {
        self.str_at(HEADER + self.u16_at(KEY_LEN), self.u16_at(GROUP_LEN))
    }

    /// The encoded value; `None` for a tombstone.
    pub fn value(&self) -> Option<&[u8]> {
        self.is_live()
            .then(|| &self.0[HEADER + self.u16_at(KEY_LEN) + self.u16_at(GROUP_LEN)..])
    }

    pub fn is_live(&self) -> bool {
        self.0[FLAGS] & LIVE != 0
    }

    /// Is this the hidden view of a live record whose owner is down (the liveness overlay)?
    /// It is not live, not routable and has no value, so a watcher reads it as a removal; the
    /// record itself is unchanged in the store. Only watch changes carry hidden views.
    pub fn is_hidden(&self) -> bool {
        self.0[FLAGS] & HIDDEN != 0
    }

    /// Whether the record may be routed to (for machines: started and passing).
    pub fn routable(&self) -> bool {
        self.0[FLAGS] & ROUTABLE != 0
    }

    /// Was the key in another group before this state? (Then its stored row lists the
    /// groups it left, for watchers resuming after a restart.)
    pub(crate) fn moved(&self) -> bool {
        self.0[FLAGS] & MOVED != 0
    }

    /// The same state, marked as having left other groups.
    pub(crate) fn with_moved(mut self) -> Entry {
        match Arc::get_mut(&mut self.0) {
            Some(bytes) => bytes[FLAGS] |= MOVED,
            None => {
                let mut bytes = self.0.to_vec();
                bytes[FLAGS] |= MOVED;
                self.0 = Arc::from(bytes);
            }
        }
        self
    }

    /// This state's hidden view, under revision `rev`: same key, group and version, no value,
    /// neither live nor routable.
    pub(crate) fn hidden_view(&self, rev: u64) -> Entry {
        let end = HEADER + self.u16_at(KEY_LEN) + self.u16_at(GROUP_LEN);
        let mut bytes = self.0[..end].to_vec();
        bytes[REV..REV + 8].copy_from_slice(&rev.to_le_bytes());
        bytes[FLAGS] = HIDDEN;
        Entry(Arc::from(bytes))
    }

    /// The same state under revision `rev`: a record revealed again, as the feed carries it.
    pub(crate) fn with_rev(&self, rev: u64) -> Entry {
        let mut bytes = self.0.to_vec();
        bytes[REV..REV + 8].copy_from_slice(&rev.to_le_bytes());
        Entry(Arc::from(bytes))
    }

    pub fn flags(&self) -> Flags {
        Flags {
            routable: self.routable(),
        }
    }

    /// The agent whose failure hides this record: the origin of its current version, i.e.
    /// the agent that accepted the write (orchestrators write a host's machines to that
    /// host's agent). See `docs/replication.md`, "Owners".
    pub fn owner(&self) -> NodeId {
        NodeId(self.u64_at(ORIGIN))
    }

    pub fn version(&self) -> Version {
        Version {
            hlc: Hlc(self.u64_at(HLC)),
            origin: NodeId(self.u64_at(ORIGIN)),
            seq: self.u64_at(SEQ),
        }
    }

    /// The store revision of the change that produced this state.
    pub fn rev(&self) -> u64 {
        self.u64_at(REV)
    }
}

impl fmt::Debug for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("key", &self.key())
            .field("group", &self.group())
            .field("value", &self.value().map(String::from_utf8_lossy))
            .field("routable", &self.routable())
            .field("hidden", &self.is_hidden())
            .field("version", &self.version())
            .field("rev", &self.rev())
            .finish()
    }
}

/// An entry in a set keyed (hashed, compared, ordered, looked up by `&str`) by its key alone.
#[derive(Clone)]
pub struct ByKey(pub Entry);

impl Hash for ByKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.key().hash(state);
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.key() == other.0.key()
    }
}

impl Eq for ByKey {}

impl Ord for ByKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.key().cmp(other.0.key())
    }
}

impl PartialOrd for ByKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Borrow<str> for ByKey {
    fn borrow(&self) -> &str {
        self.0.key()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_round_trips_every_field() {
        let v = Version {
            hlc: Hlc(u64::MAX - 1),
            origin: NodeId(0x0123_4567_89ab_cdef),
            seq: 42,
        };
        let on = Flags { routable: true };
        let e = Entry::new("m-1", "web", Some(b"\x00value\xff"), on, v, 7);
        assert_eq!((e.key(), e.group()), ("m-1", "web"));
        assert_eq!(e.value(), Some(&b"\x00value\xff"[..]));
        assert!(e.is_live() && e.routable());
        assert_eq!((e.version(), e.rev()), (v, 7));
        let t = Entry::new("m-1", "web", None, on, v, 8);
        assert!(!t.is_live() && !t.routable());
        assert_eq!(t.value(), None);
        let quiet = Entry::new("", "", Some(b""), Flags::default(), v, 0);
        assert!(quiet.is_live() && !quiet.routable());
        assert_eq!(quiet.value(), Some(&b""[..]));
        assert!(!e.is_hidden());
    }

    #[test]
    fn a_hidden_view_keeps_key_group_and_version_and_drops_the_rest() {
        let v = Version {
            hlc: Hlc(9),
            origin: NodeId(3),
            seq: 4,
        };
        let e = Entry::new("m-1", "web", Some(b"+v"), Flags { routable: true }, v, 7);
        let h = e.hidden_view(12);
        assert_eq!(
            (h.key(), h.group(), h.version(), h.rev()),
            ("m-1", "web", v, 12)
        );
        assert!(h.is_hidden() && !h.is_live() && !h.routable());
        assert_eq!(h.value(), None);
        let back = e.with_rev(13);
        assert_eq!(
            (back.value(), back.version(), back.rev()),
            (e.value(), v, 13)
        );
        assert!(back.is_live() && back.routable() && !back.is_hidden());
    }
}
