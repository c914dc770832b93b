//! What a store knows, per origin: the digest.
//!
//! For every origin a store has heard of, it keeps a **head** (the highest sequence number it
//! knows) and the **gaps** below it (ranges of sequence numbers it still lacks). A sequence
//! number is *known* when it is `1..=head` and in no gap: the store holds that version, or
//! holds a newer version of the same key (the old one was superseded), or a peer told it the
//! number is "covered, nothing left". Known is durable: knowledge is persisted in the same
//! transaction as the records, so a version is never marked known before it is durable.
//!
//! The digest's size grows with origins and gaps, never with records. It cannot be derived
//! from the rows: superseded rows are deleted.

use std::collections::BTreeMap;
use std::fmt;

use crate::NodeId;

/// The highest sequence number an origin may issue: SQLite stores them as signed 64-bit
/// integers, and `hi + 1` never overflows below it. A peer's record above it is refused.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// An inclusive range of sequence numbers of one origin, `lo..=hi`, with
/// `1 <= lo <= hi <= MAX_SEQ`: only [`SeqRange::new`] builds one, so every range is valid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct SeqRange {
    lo: u64,
    hi: u64,
}

impl SeqRange {
    /// `lo..=hi`, or `None` when empty, when it names sequence number 0 (never issued), or
    /// when it reaches above [`MAX_SEQ`].
    pub fn new(lo: u64, hi: u64) -> Option<SeqRange> {
        (lo >= 1 && lo <= hi && hi <= MAX_SEQ).then_some(SeqRange { lo, hi })
    }

    /// One sequence number.
    pub fn single(seq: u64) -> Option<SeqRange> {
        SeqRange::new(seq, seq)
    }

    pub fn lo(&self) -> u64 {
        self.lo
    }

    pub fn hi(&self) -> u64 {
        self.hi
    }

    pub fn contains(&self, seq: u64) -> bool {
        self.lo <= seq && seq <= self.hi
    }
}

impl fmt::Display for SeqRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.lo, self.hi)
    }
}

/// Most gaps kept for one origin. A gap opens when a version arrives ahead of its
/// predecessors, or splits when one arrives in its middle. A peer (or a bug) that sends every
/// other sequence number must not grow the digest without bound: at the bound, a number that
/// would open or split a gap is refused. Numbers that extend the head or touch a gap's edge
/// never add a gap and are always taken, so a peer streaming a gap from either end (newest
/// first, as anti-entropy does, or oldest first) always closes it.
pub const MAX_GAPS_PER_ORIGIN: usize = 4096;

/// One origin's knowledge: `1..=head` minus `gaps`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginKnowledge {
    head: u64,
    /// Disjoint, non-adjacent ranges below `head`, keyed by `lo`, value `hi`.
    gaps: BTreeMap<u64, u64>,
}

/// Why a sequence number could not be learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooManyGaps;

impl OriginKnowledge {
    /// Knowledge of `1..=head` with no gaps (an origin's own writes, or a rebuilt store).
    pub fn dense(head: u64) -> OriginKnowledge {
        OriginKnowledge {
            head,
            gaps: BTreeMap::new(),
        }
    }

    /// Rebuild from persisted parts; `None` if they break the invariants (gaps disjoint,
    /// non-adjacent, inside `1..head`).
    pub fn from_parts(head: u64, gaps: &[SeqRange]) -> Option<OriginKnowledge> {
        if head > MAX_SEQ {
            return None;
        }
        let mut k = OriginKnowledge::dense(head);
        let mut last_hi = 0u64;
        for g in gaps {
            if g.lo < 1 || g.lo > g.hi || g.hi >= head || (last_hi > 0 && g.lo <= last_hi + 1) {
                return None;
            }
            k.gaps.insert(g.lo, g.hi);
            last_hi = g.hi;
        }
        Some(k)
    }

    /// The highest sequence number known.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The ranges below the head still lacking, lowest first.
    pub fn gaps(&self) -> impl Iterator<Item = SeqRange> + '_ {
        self.gaps.iter().map(|(&lo, &hi)| SeqRange { lo, hi })
    }

    pub fn gap_count(&self) -> usize {
        self.gaps.len()
    }

    /// Is `seq` known?
    pub fn knows(&self, seq: u64) -> bool {
        seq >= 1 && seq <= self.head && self.gap_containing(seq).is_none()
    }

    fn gap_containing(&self, seq: u64) -> Option<SeqRange> {
        self.gaps
            .range(..=seq)
            .next_back()
            .map(|(&lo, &hi)| SeqRange { lo, hi })
            .filter(|g| g.contains(seq))
    }

    /// Would learning `range` add a gap: open one above the head, or split one in two?
    fn adds_gap(&self, range: SeqRange) -> bool {
        range.lo > self.head + 1
            || self
                .gap_containing(range.lo)
                .is_some_and(|g| g.lo < range.lo && range.hi < g.hi)
    }

    /// Mark every number of `range` known. Fails, changing nothing, when it would add a gap
    /// past [`MAX_GAPS_PER_ORIGIN`].
    pub fn learn(&mut self, range: SeqRange) -> Result<(), TooManyGaps> {
        if self.gaps.len() >= MAX_GAPS_PER_ORIGIN && self.adds_gap(range) {
            return Err(TooManyGaps);
        }
        if range.hi > self.head {
            if range.lo > self.head + 1 {
                self.gaps.insert(self.head + 1, range.lo - 1);
            }
            // Whatever of the range lies at or below the old head is handled below.
            let old_head = self.head;
            self.head = range.hi;
            if range.lo > old_head {
                self.debug_check();
                return Ok(());
            }
            return self.learn(SeqRange {
                lo: range.lo,
                hi: old_head,
            });
        }
        // Below the head: cut `range` out of every gap it touches.
        let touching: Vec<(u64, u64)> = self
            .gaps
            .range(..=range.hi)
            .rev()
            .take_while(|&(_, &hi)| hi >= range.lo)
            .map(|(&lo, &hi)| (lo, hi))
            .collect();
        for (lo, hi) in touching {
            self.gaps.remove(&lo);
            if lo < range.lo {
                self.gaps.insert(lo, range.lo - 1);
            }
            if hi > range.hi {
                self.gaps.insert(range.hi + 1, hi);
            }
        }
        self.debug_check();
        Ok(())
    }

    /// The known parts of `range`, lowest first.
    pub fn known_within(&self, range: SeqRange) -> Vec<SeqRange> {
        let top = range.hi.min(self.head);
        let mut out = Vec::new();
        let mut next = range.lo;
        if next > top {
            return out;
        }
        // Gaps that may overlap [next, top], in order.
        let start = self.gap_containing(next).map_or(next, |g| g.lo);
        for (&lo, &hi) in self.gaps.range(start..=top) {
            if lo > next {
                out.push(SeqRange {
                    lo: next,
                    hi: lo - 1,
                });
            }
            next = next.max(hi + 1);
        }
        if next <= top {
            out.push(SeqRange { lo: next, hi: top });
        }
        out
    }

    /// The invariant: gaps are disjoint, non-adjacent, lowest first, and below the head.
    fn debug_check(&self) {
        if cfg!(debug_assertions) {
            let mut last_hi: Option<u64> = None;
            for (&lo, &hi) in &self.gaps {
                assert!(
                    1 <= lo && lo <= hi && hi < self.head,
                    "gap {lo}..={hi} out of place"
                );
                if let Some(prev) = last_hi {
                    assert!(lo > prev + 1, "gaps overlap or touch at {lo}");
                }
                last_hi = Some(hi);
            }
        }
    }
}

/// Knowledge of every origin: the store's digest.
pub type Digest = BTreeMap<NodeId, OriginKnowledge>;

#[cfg(test)]
mod tests {
    use super::*;

    fn r(lo: u64, hi: u64) -> SeqRange {
        SeqRange::new(lo, hi).unwrap()
    }

    fn gaps(k: &OriginKnowledge) -> Vec<(u64, u64)> {
        k.gaps().map(|g| (g.lo, g.hi)).collect()
    }

    #[test]
    fn in_order_learning_keeps_no_gaps() {
        let mut k = OriginKnowledge::default();
        for s in 1..=5 {
            k.learn(r(s, s)).unwrap();
        }
        assert_eq!((k.head(), gaps(&k)), (5, vec![]));
        assert!(k.knows(5) && !k.knows(6) && !k.knows(0));
    }

    #[test]
    fn a_jump_opens_a_gap_and_filling_it_splits_then_closes_it() {
        let mut k = OriginKnowledge::dense(2);
        k.learn(r(9, 9)).unwrap();
        assert_eq!((k.head(), gaps(&k)), (9, vec![(3, 8)]));
        k.learn(r(5, 5)).unwrap();
        assert_eq!(gaps(&k), vec![(3, 4), (6, 8)]);
        assert!(k.knows(5) && !k.knows(4) && !k.knows(6));
        // A covered range spanning both gaps closes them.
        k.learn(r(3, 8)).unwrap();
        assert_eq!((k.head(), gaps(&k)), (9, vec![]));
    }

    #[test]
    fn a_range_straddling_the_head_fills_below_and_extends_above() {
        let mut k = OriginKnowledge::dense(1);
        k.learn(r(5, 6)).unwrap();
        assert_eq!(gaps(&k), vec![(2, 4)]);
        k.learn(r(3, 10)).unwrap();
        assert_eq!((k.head(), gaps(&k)), (10, vec![(2, 2)]));
    }

    #[test]
    fn known_within_lists_the_known_parts() {
        let mut k = OriginKnowledge::dense(3);
        k.learn(r(7, 7)).unwrap();
        k.learn(r(10, 12)).unwrap();
        assert_eq!(gaps(&k), vec![(4, 6), (8, 9)]);
        assert_eq!(k.known_within(r(1, 20)), vec![r(1, 3), r(7, 7), r(10, 12)]);
        assert_eq!(k.known_within(r(5, 11)), vec![r(7, 7), r(10, 11)]);
        assert_eq!(k.known_within(r(13, 20)), vec![]);
        assert_eq!(k.known_within(r(4, 6)), vec![]);
    }

    #[test]
    fn gaps_are_bounded_and_a_refused_learn_changes_nothing() {
        let mut k = OriginKnowledge::default();
        for i in 0..MAX_GAPS_PER_ORIGIN as u64 {
            k.learn(r(2 * i + 2, 2 * i + 2)).unwrap();
        }
        assert_eq!(k.gap_count(), MAX_GAPS_PER_ORIGIN);
        let before = k.clone();
        assert_eq!(k.learn(r(MAX_SEQ - 1, MAX_SEQ - 1)), Err(TooManyGaps));
        assert_eq!(k, before);
        // Filling a gap is always allowed, and extending the head without a jump too.
        k.learn(r(1, 1)).unwrap();
        k.learn(r(k.head() + 1, k.head() + 1)).unwrap();
        // So is closing a gap from either edge; splitting one is not.
        let mut k = OriginKnowledge::dense(1);
        k.learn(r(100, 100)).unwrap();
        for i in 0..MAX_GAPS_PER_ORIGIN as u64 - 1 {
            k.learn(r(200 + 2 * i, 200 + 2 * i)).unwrap();
        }
        assert_eq!(k.gap_count(), MAX_GAPS_PER_ORIGIN);
        let before = k.clone();
        assert_eq!(
            k.learn(r(50, 50)),
            Err(TooManyGaps),
            "a split past the bound"
        );
        assert_eq!(k, before);
        k.learn(r(99, 99)).unwrap(); // the top edge of 2..=99
        k.learn(r(2, 2)).unwrap(); // its bottom edge
        assert_eq!(k.gap_count(), MAX_GAPS_PER_ORIGIN);
        k.learn(r(3, 98)).unwrap(); // the rest: the gap closes
        assert_eq!(k.gap_count(), MAX_GAPS_PER_ORIGIN - 1);
    }

    #[test]
    fn ranges_stay_below_the_largest_sequence_number() {
        assert!(SeqRange::new(1, MAX_SEQ).is_some());
        assert!(SeqRange::new(1, MAX_SEQ + 1).is_none());
        assert!(SeqRange::new(0, 1).is_none() && SeqRange::new(3, 2).is_none());
        let mut k = OriginKnowledge::default();
        k.learn(r(MAX_SEQ, MAX_SEQ)).unwrap();
        assert_eq!(k.known_within(r(1, MAX_SEQ)), vec![r(MAX_SEQ, MAX_SEQ)]);
    }

    #[test]
    fn persisted_parts_are_checked() {
        assert!(OriginKnowledge::from_parts(10, &[r(2, 3), r(5, 9)]).is_some());
        assert!(OriginKnowledge::from_parts(10, &[r(2, 3), r(4, 5)]).is_none()); // adjacent
        assert!(OriginKnowledge::from_parts(10, &[r(5, 10)]).is_none()); // reaches the head
        assert!(OriginKnowledge::from_parts(10, &[r(5, 6), r(2, 3)]).is_none()); // unordered
    }
}
