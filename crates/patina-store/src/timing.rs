//! Latency histograms the store keeps for operators (exported as Prometheus histograms by
//! `patina-ops`): lock-free, fixed buckets, bounded memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds: 50 µs to 10 s, in steps of 2 to 4 (and +Inf),
/// fine around the watchdog's bounds (2 and 2.5 s).
pub const BUCKETS: [f64; 17] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram: counts per bucket (the last one past every bound), their sum.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// What a [`Histogram`] held when read: counts per bucket (not cumulative; the last is past
/// every bound), how many, their sum in seconds.
#[derive(Clone, Debug, PartialEq)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            d.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: counts.iter().sum(),
            counts,
            sum_secs: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// The store's latencies.
#[derive(Debug, Default)]
pub struct Timings {
    /// A local write, from its call to its answer (queueing, the group commit, its fsync).
    pub write: Histogram,
    /// A batch from a peer, from its call to its answer.
    pub apply: Histogram,
    /// A group commit's COMMIT: the WAL's write and fsync.
    pub fsync: Histogram,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.counts[0], 2, "50 µs is at most the first bound");
        assert_eq!(s.counts[6], 1, "3 ms: at most 5 ms");
        assert_eq!(s.counts[BUCKETS.len()], 1, "60 s: past every bound");
        assert!((s.sum_secs - 60.00306).abs() < 1e-9, "{}", s.sum_secs);
    }
}
