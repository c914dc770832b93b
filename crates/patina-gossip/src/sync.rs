//! What anti-entropy sends: from our digest and a peer's, the ranges of sequence numbers we
//! know and the peer lacks, per origin, newest first.
//!
//! A session (see `docs/replication.md`, "Anti-entropy") runs both ways at once: each side
//! sends its digest, then streams what the other lacks within a byte budget. Ranges are
//! served newest first because the newest changes matter most to routing, and origins take
//! turns so that one origin with a long history cannot use a session's whole budget.

use std::collections::BTreeMap;

use patina_store::{Digest, NodeId, OriginKnowledge, RemoteBatch, SeqRange};

/// Bytes of records one side sends in one session. A peer that lacks more gets the rest in
/// the next session (the periodic rounds, or at once while gaps remain).
pub const SESSION_BYTES: usize = 8 << 20;
/// Bytes of records in one batch message (well under gRPC's 4 MiB message limit).
pub const BATCH_BYTES: usize = 256 << 10;
/// Records and covered ranges in one batch: the store's largest apply batch.
pub const BATCH_OPS: usize = 1024;
/// Origins a digest may describe: the store's own bound.
pub const MAX_DIGEST_ORIGINS: usize = patina_store::MAX_ORIGINS;

/// The known parts of `1..=k.head()`, ascending.
fn known_ranges(k: &OriginKnowledge) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut next = 1u64;
    for g in k.gaps() {
        if g.lo() > next {
            out.push((next, g.lo() - 1));
        }
        next = g.hi().saturating_add(1);
    }
    if k.head() >= next {
        out.push((next, k.head()));
    }
    out
}

/// `a` minus `b`, both ascending and disjoint.
fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(lo, hi) in a {
        let mut lo = lo;
        for &(blo, bhi) in b {
            if bhi < lo || blo > hi {
                continue;
            }
            if blo > lo {
                out.push((lo, blo - 1));
            }
            if bhi >= hi {
                lo = hi.saturating_add(1);
                break;
            }
            lo = bhi + 1;
        }
        if lo <= hi {
            out.push((lo, hi));
        }
    }
    out
}

/// What the peer lacks of one origin, given our knowledge and its own (absent: nothing).
pub fn lacking_of(ours: &OriginKnowledge, theirs: Option<&OriginKnowledge>) -> Vec<SeqRange> {
    let mine = known_ranges(ours);
    let known = theirs.map(known_ranges).unwrap_or_default();
    let mut out: Vec<SeqRange> = subtract(&mine, &known)
        .into_iter()
        .filter_map(|(lo, hi)| SeqRange::new(lo, hi))
        .collect();
    out.reverse();
    out
}

/// Everything the peer lacks that we know, newest first within each origin, origins taking
/// turns range by range.
pub fn lacking(ours: &Digest, theirs: &Digest) -> Vec<(NodeId, SeqRange)> {
    let mut per_origin: BTreeMap<NodeId, std::vec::IntoIter<SeqRange>> = ours
        .iter()
        .map(|(o, k)| (*o, lacking_of(k, theirs.get(o)).into_iter()))
        .filter(|(_, v)| v.len() > 0)
        .collect();
    let mut out = Vec::new();
    while !per_origin.is_empty() {
        per_origin.retain(|origin, ranges| match ranges.next() {
            Some(r) => {
                out.push((*origin, r));
                true
            }
            None => false,
        });
    }
    out
}

/// What one side of a session said it knows, in its hello: the only digest it plans from.
/// The peer checks every record and covered range it receives against this claim
/// ([`within_claim`]); a plan from a later digest would send numbers written or applied
/// after the hello (the pushes a gap-triggered session races), and the peer would abort the
/// session. Writes made after the hello reach the peer by push or in its next session.
#[derive(Clone, Debug, Default)]
pub struct Claim(Digest);

impl Claim {
    /// The digest sent in the hello.
    pub fn of(digest: Digest) -> Claim {
        Claim(digest)
    }

    pub fn digest(&self) -> &Digest {
        &self.0
    }

    /// What a peer that claimed `theirs` lacks of what we claimed, newest first.
    pub fn plan(&self, theirs: &Digest) -> Vec<(NodeId, SeqRange)> {
        lacking(&self.0, theirs)
    }
}

/// Why a batch from a peer is refused: it holds numbers the peer's hello did not claim.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutsideClaim {
    /// A record whose version the peer did not claim to know.
    #[error("a record ({origin:?}, {seq}) the peer's digest does not claim")]
    Record { origin: NodeId, seq: u64 },
    /// A covered range not wholly within what the peer claimed: taking it would raise our
    /// knowledge past what the peer said it knows.
    #[error("a covered range of {origin:?} ({lo}..={hi}) the peer's digest does not claim")]
    Covered { origin: NodeId, lo: u64, hi: u64 },
}

/// Is everything in `batch` within what its sender claimed in its hello? A peer cannot claim,
/// in passing, numbers it did not say it knows (a covered range raises the receiver's head,
/// so a forged one could make it ignore an origin's future writes).
pub fn within_claim(batch: &RemoteBatch, claim: &Digest) -> Result<(), OutsideClaim> {
    for r in &batch.records {
        let (origin, seq) = (r.version.origin, r.version.seq);
        if !claim.get(&origin).is_some_and(|k| k.knows(seq)) {
            return Err(OutsideClaim::Record { origin, seq });
        }
    }
    for (origin, range) in &batch.covered {
        let claimed = claim
            .get(origin)
            .map(|k| k.known_within(*range))
            .unwrap_or_default();
        if claimed != [*range] {
            return Err(OutsideClaim::Covered {
                origin: *origin,
                lo: range.lo(),
                hi: range.hi(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(head: u64, gaps: &[(u64, u64)]) -> OriginKnowledge {
        let gaps: Vec<SeqRange> = gaps
            .iter()
            .map(|&(lo, hi)| SeqRange::new(lo, hi).unwrap())
            .collect();
        OriginKnowledge::from_parts(head, &gaps).unwrap()
    }

    fn spans(v: &[SeqRange]) -> Vec<(u64, u64)> {
        v.iter().map(|r| (r.lo(), r.hi())).collect()
    }

    #[test]
    fn a_peer_that_knows_nothing_lacks_everything_we_know_newest_first() {
        assert_eq!(
            spans(&lacking_of(&k(10, &[(3, 4)]), None)),
            [(5, 10), (1, 2)]
        );
        assert!(lacking_of(&k(0, &[]), None).is_empty());
    }

    #[test]
    fn a_peer_lacks_its_gaps_and_what_is_above_its_head() {
        // We know 1..=20 but 8..=9; the peer knows 1..=12 but 2..=5.
        let ours = k(20, &[(8, 9)]);
        let theirs = k(12, &[(2, 5)]);
        assert_eq!(spans(&lacking_of(&ours, Some(&theirs))), [(13, 20), (2, 5)]);
    }

    #[test]
    fn nothing_is_sent_that_both_know_or_that_we_lack_too() {
        let ours = k(10, &[(4, 6)]);
        assert!(lacking_of(&ours, Some(&k(10, &[]))).is_empty());
        assert!(lacking_of(&ours, Some(&k(12, &[(4, 6)]))).is_empty());
        assert!(lacking_of(&ours, Some(&ours)).is_empty());
    }

    #[test]
    fn origins_take_turns() {
        let mut ours = Digest::new();
        ours.insert(NodeId(1), k(10, &[(3, 4), (7, 7)]));
        ours.insert(NodeId(2), k(5, &[]));
        let got = lacking(&ours, &Digest::new());
        let got: Vec<(u64, u64, u64)> = got.iter().map(|(o, r)| (o.0, r.lo(), r.hi())).collect();
        assert_eq!(got, [(1, 8, 10), (2, 1, 5), (1, 5, 6), (1, 1, 2)]);
    }

    /// Exhaustive check against sets on small heads: the ranges are exactly
    /// known(ours) \ known(theirs), disjoint and descending.
    #[test]
    fn lacking_equals_set_difference() {
        let all_gaps: Vec<Vec<(u64, u64)>> = vec![
            vec![],
            vec![(1, 1)],
            vec![(2, 3)],
            vec![(1, 2), (5, 5)],
            vec![(3, 6)],
            vec![(2, 2), (4, 4), (6, 6)],
        ];
        for head_a in 0..8 {
            for head_b in 0..8 {
                for ga in &all_gaps {
                    for gb in &all_gaps {
                        let ga: Vec<_> = ga.iter().copied().filter(|g| g.1 < head_a).collect();
                        let gb: Vec<_> = gb.iter().copied().filter(|g| g.1 < head_b).collect();
                        let a = k(head_a, &ga);
                        let b = k(head_b, &gb);
                        let want: Vec<u64> = (1..=8)
                            .filter(|s| a.knows(*s) && !b.knows(*s))
                            .rev()
                            .collect();
                        let got: Vec<u64> = lacking_of(&a, Some(&b))
                            .iter()
                            .flat_map(|r| (r.lo()..=r.hi()).rev())
                            .collect();
                        assert_eq!(got, want, "a {head_a} {ga:?} b {head_b} {gb:?}");
                    }
                }
            }
        }
    }
}
