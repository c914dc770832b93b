//! Versions, the hybrid logical clock, and the merge rule.
//!
//! Every record carries a [`Version`]: the origin that wrote it, that origin's sequence
//! number, and a hybrid logical clock timestamp. Two versions of one key are ordered by
//! `(hlc, origin, seq)`; the highest wins on every node. Because that is a total order and
//! the merge keeps the maximum, merging is commutative, associative and idempotent, so any
//! delivery order converges (see `tests.rs` for the property tests).

use std::cmp::Ordering;
use std::fmt;

/// Identity of a store, and so of the origin of every write it accepts. Random, created with
/// the data directory and never reused: a wiped data directory starts a new origin, so its
/// sequence numbers can never collide with the old one's.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u64);

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// A hybrid logical clock timestamp: wall-clock milliseconds in the top 48 bits and a logical
/// counter in the low 16. It orders like a timestamp but never goes backwards on one node,
/// even when the wall clock does.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct Hlc(pub u64);

/// Bits of an [`Hlc`] that hold the logical counter.
const LOGICAL_BITS: u32 = 16;

impl Hlc {
    /// The wall-clock part, in milliseconds since the Unix epoch.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    /// The logical counter.
    pub fn logical(self) -> u16 {
        (self.0 & ((1 << LOGICAL_BITS) - 1)) as u16
    }

    /// The smallest timestamp at a given wall-clock millisecond.
    pub fn from_physical_ms(ms: u64) -> Hlc {
        Hlc(ms << LOGICAL_BITS)
    }
}

/// The clock a store stamps its writes with. Owned by the writer thread; the caller passes the
/// wall-clock time in, so the clock itself is deterministic.
#[derive(Debug, Default, Clone)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that will never issue a timestamp at or below `floor` (the highest timestamp
    /// this store ever persisted or saw).
    pub fn starting_after(floor: Hlc) -> HlcClock {
        HlcClock { last: floor }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp, strictly greater than every earlier one.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        let next = Hlc::from_physical_ms(wall_ms).max(Hlc(self.last.0.saturating_add(1)));
        self.last = next;
        next
    }

    /// Take note of a timestamp from elsewhere, so that later local writes order after it.
    pub fn observe(&mut self, seen: Hlc) {
        self.last = self.last.max(seen);
    }

    /// Roll back to an earlier state (after a failed commit: nothing issued since was used).
    pub(crate) fn reset_to(&mut self, last: Hlc) {
        self.last = last;
    }
}

/// The version of one write.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Version {
    pub hlc: Hlc,
    pub origin: NodeId,
    pub seq: u64,
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.hlc, self.origin, self.seq).cmp(&(other.hlc, other.origin, other.seq))
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where a store reads wall-clock time. Injected so that a simulation can run many stores on
/// one virtual clock; [`SystemClock`] everywhere else.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The operating system's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to: for simulations and tests.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicU64);

impl ManualClock {
    pub fn new(now_ms: u64) -> ManualClock {
        ManualClock(std::sync::atomic::AtomicU64::new(now_ms))
    }

    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}
