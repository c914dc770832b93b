//! Network coordinates (Vivaldi, with Serf's parameters): each node places itself in an
//! 8-dimensional space plus a height (its access link) from the round trips it measures to
//! its peers, so that the distance between two nodes' coordinates estimates their round trip
//! without ever measuring it. The global tier orders regions nearest-first by them where the
//! region table has no measured round trip (issue 19).
//!
//! Sans-IO and deterministic: samples come in as calls with their round trip, randomness from
//! a seeded generator. Bounded: the latency filter keeps at most [`MAX_PEERS`] peers (the
//! oldest-touched are forgotten first) and [`FILTER_SAMPLES`] samples each.
//!
//! The algorithm is Dabek et al.'s Vivaldi with the refinements Serf uses (Ledlie et al.'s
//! height and latency filter, an adjustment term from the recent residuals, and a gravity
//! toward the origin that stops the whole system drifting).

use std::collections::{HashMap, VecDeque};

/// Dimensions of the Euclidean part (Serf's default).
pub const DIMENSIONS: usize = 8;
/// Most peers whose recent samples the filter keeps.
pub const MAX_PEERS: usize = 4096;
/// Samples per peer the latency filter takes the median of (Serf: 3).
pub const FILTER_SAMPLES: usize = 3;

/// Serf's defaults (`coordinate.DefaultConfig`).
const ERROR_MAX: f64 = 1.5;
const CE: f64 = 0.25;
const CC: f64 = 0.25;
const ADJUSTMENT_WINDOW: usize = 20;
/// Seconds.
const HEIGHT_MIN: f64 = 10e-6;
const GRAVITY_RHO: f64 = 150.0;
const ZERO: f64 = 1.0e-6;

/// A node's place: where it is, how sure it is, and its access link's height (seconds).
#[derive(Clone, Debug, PartialEq)]
pub struct Coordinate {
    pub vec: [f64; DIMENSIONS],
    /// Confidence: 1.5 (nothing known) down towards 0.
    pub error: f64,
    /// Mean recent residual, added to distances (seconds; may be negative).
    pub adjustment: f64,
    pub height: f64,
}

impl Default for Coordinate {
    fn default() -> Self {
        Coordinate {
            vec: [0.0; DIMENSIONS],
            error: ERROR_MAX,
            adjustment: 0.0,
            height: HEIGHT_MIN,
        }
    }
}

impl Coordinate {
    /// Whether every component is a finite number (a peer's coordinate from the wire must be
    /// checked before it is used).
    pub fn is_valid(&self) -> bool {
        self.vec.iter().all(|v| v.is_finite())
            && self.error.is_finite()
            && self.adjustment.is_finite()
            && self.height.is_finite()
            && self.height >= 0.0
    }

    /// The estimated round trip to `other`, in seconds.
    pub fn distance_to(&self, other: &Coordinate) -> f64 {
        let raw = self.raw_distance_to(other);
        let adjusted = raw + self.adjustment + other.adjustment;
        if adjusted > 0.0 { adjusted } else { raw }
    }

    fn raw_distance_to(&self, other: &Coordinate) -> f64 {
        magnitude(&diff(&self.vec, &other.vec)) + self.height + other.height
    }

    /// Moved by `force` (seconds) away from `other` (towards it when negative).
    fn apply_force(&self, force: f64, other: &Coordinate, rng: &mut Xorshift) -> Coordinate {
        let (unit, mag) = unit_vector_at(&self.vec, &other.vec, rng);
        let mut out = self.clone();
        for (o, u) in out.vec.iter_mut().zip(unit) {
            *o += u * force;
        }
        if mag > ZERO {
            out.height = ((self.height + other.height) * force / mag + self.height).max(HEIGHT_MIN);
        }
        out
    }
}

fn diff(a: &[f64; DIMENSIONS], b: &[f64; DIMENSIONS]) -> [f64; DIMENSIONS] {
    let mut out = [0.0; DIMENSIONS];
    for i in 0..DIMENSIONS {
        out[i] = a[i] - b[i];
    }
    out
}

fn magnitude(v: &[f64; DIMENSIONS]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The unit vector from `b` to `a` and the distance between them; a random direction when
/// they coincide (two new nodes at the origin must be pushed apart somehow).
fn unit_vector_at(
    a: &[f64; DIMENSIONS],
    b: &[f64; DIMENSIONS],
    rng: &mut Xorshift,
) -> ([f64; DIMENSIONS], f64) {
    let d = diff(a, b);
    let mag = magnitude(&d);
    if mag > ZERO {
        return (d.map(|x| x / mag), mag);
    }
    let mut r = [0.0; DIMENSIONS];
    for x in r.iter_mut() {
        *x = rng.unit() - 0.5;
    }
    let m = magnitude(&r);
    if m > ZERO {
        return (r.map(|x| x / m), 0.0);
    }
    let mut axis = [0.0; DIMENSIONS];
    axis[0] = 1.0;
    (axis, 0.0)
}

/// A small seeded generator: deterministic in simulations, no dependency.
#[derive(Clone, Debug)]
struct Xorshift(u64);

impl Xorshift {
    fn unit(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One node's coordinate, kept current from the round trips it measures.
#[derive(Clone, Debug)]
pub struct Vivaldi<P> {
    coord: Coordinate,
    origin: Coordinate,
    /// Recent samples per peer, and when each peer was last touched (for eviction).
    filter: HashMap<P, (VecDeque<f64>, u64)>,
    touched: u64,
    adjustments: [f64; ADJUSTMENT_WINDOW],
    adjustment_index: usize,
    rng: Xorshift,
}

impl<P: std::hash::Hash + Eq + Clone> Vivaldi<P> {
    /// A node at the origin, knowing nothing; `seed` picks its random directions.
    pub fn new(seed: u64) -> Vivaldi<P> {
        Vivaldi {
            coord: Coordinate::default(),
            origin: Coordinate::default(),
            filter: HashMap::new(),
            touched: 0,
            adjustments: [0.0; ADJUSTMENT_WINDOW],
            adjustment_index: 0,
            rng: Xorshift(seed | 1),
        }
    }

    pub fn coordinate(&self) -> &Coordinate {
        &self.coord
    }

    /// The estimated round trip to a node at `other`, in seconds.
    pub fn estimate(&self, other: &Coordinate) -> f64 {
        self.coord.distance_to(other)
    }

    /// `peer`, at `other`, answered in `rtt_secs`. Samples that are not finite or positive,
    /// and peers' coordinates that are not valid, change nothing; returns whether it was taken.
    pub fn observe(&mut self, peer: P, other: &Coordinate, rtt_secs: f64) -> bool {
        let taken = rtt_secs.is_finite() && rtt_secs > 0.0 && rtt_secs < 10.0;
        if !taken || !other.is_valid() {
            return false;
        }
        let rtt = self.filtered(peer, rtt_secs);
        self.update_vivaldi(other, rtt);
        self.update_adjustment(other, rtt);
        self.update_gravity();
        if !self.coord.is_valid() {
            // Never keep a broken coordinate: start again.
            self.coord = Coordinate::default();
        }
        true
    }

    /// The median of the peer's last few round trips (seconds), if any were sampled.
    pub fn measured(&self, peer: &P) -> Option<f64> {
        let (samples, _) = self.filter.get(peer)?;
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }

    /// A peer left: forget its samples.
    pub fn forget(&mut self, peer: &P) {
        self.filter.remove(peer);
    }

    /// The median of the peer's last few samples, this one included.
    fn filtered(&mut self, peer: P, rtt: f64) -> f64 {
        self.touched += 1;
        if !self.filter.contains_key(&peer) && self.filter.len() >= MAX_PEERS {
            // Bounded: forget the peer touched longest ago.
            if let Some(oldest) = self
                .filter
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(p, _)| p.clone())
            {
                self.filter.remove(&oldest);
            }
        }
        let touched = self.touched;
        let (samples, t) = self.filter.entry(peer).or_default();
        *t = touched;
        samples.push_back(rtt);
        while samples.len() > FILTER_SAMPLES {
            samples.pop_front();
        }
        let mut sorted: Vec<f64> = samples.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    fn update_vivaldi(&mut self, other: &Coordinate, rtt: f64) {
        let rtt = rtt.max(ZERO);
        let dist = self.coord.raw_distance_to(other);
        let wrongness = (dist - rtt).abs() / rtt;
        let total_error = (self.coord.error + other.error).max(ZERO);
        let weight = self.coord.error / total_error;
        self.coord.error =
            (CE * weight * wrongness + self.coord.error * (1.0 - CE * weight)).min(ERROR_MAX);
        let force = CC * weight * (rtt - dist);
        self.coord = self.coord.apply_force(force, other, &mut self.rng);
    }

    fn update_adjustment(&mut self, other: &Coordinate, rtt: f64) {
        self.adjustments[self.adjustment_index] = rtt - self.coord.raw_distance_to(other);
        self.adjustment_index = (self.adjustment_index + 1) % ADJUSTMENT_WINDOW;
        self.coord.adjustment =
            self.adjustments.iter().sum::<f64>() / (2.0 * ADJUSTMENT_WINDOW as f64);
    }

    fn update_gravity(&mut self) {
        let dist = self.origin.distance_to(&self.coord);
        let force = -(dist / GRAVITY_RHO).powi(2);
        let origin = self.origin.clone();
        self.coord = self.coord.apply_force(force, &origin, &mut self.rng);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known latency matrix: nodes at random places on a plane 200 ms across, each with an
    /// access link of 0.5 to 5 ms, round trip = distance + both links, with ±5 % noise on
    /// every sample. After every node has sampled random peers for a while, its estimates
    /// order any two other nodes as the true round trips do for at least 95 % of pairs.
    #[test]
    fn estimates_order_nodes_as_the_true_round_trips_do() {
        const N: usize = 40;
        let mut rng = Xorshift(0x5eed_c00d);
        let places: Vec<(f64, f64, f64)> = (0..N)
            .map(|_| {
                (
                    rng.unit() * 0.200,
                    rng.unit() * 0.200,
                    0.0005 + rng.unit() * 0.0045,
                )
            })
            .collect();
        let true_rtt = |i: usize, j: usize| {
            let (a, b) = (places[i], places[j]);
            ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() + a.2 + b.2
        };
        let mut nodes: Vec<Vivaldi<usize>> = (0..N).map(|i| Vivaldi::new(i as u64 + 1)).collect();
        for _round in 0..300 {
            for i in 0..N {
                let j = (rng.unit() * N as f64) as usize % N;
                if i == j {
                    continue;
                }
                let noise = 1.0 + (rng.unit() - 0.5) * 0.1;
                let other = nodes[j].coordinate().clone();
                assert!(nodes[i].observe(j, &other, true_rtt(i, j) * noise));
            }
        }
        let (mut agree, mut total) = (0u64, 0u64);
        let mut rel_errors = Vec::new();
        for i in 0..N {
            for j in 0..N {
                if j == i {
                    continue;
                }
                let est_j = nodes[i].estimate(nodes[j].coordinate());
                rel_errors.push((est_j - true_rtt(i, j)).abs() / true_rtt(i, j));
                for k in (j + 1)..N {
                    if k == i {
                        continue;
                    }
                    let est_k = nodes[i].estimate(nodes[k].coordinate());
                    total += 1;
                    if (est_j < est_k) == (true_rtt(i, j) < true_rtt(i, k)) {
                        agree += 1;
                    }
                }
            }
        }
        rel_errors.sort_by(f64::total_cmp);
        let share = agree as f64 / total as f64;
        let median = rel_errors[rel_errors.len() / 2];
        println!(
            "pairs ordered as the true round trips: {:.1} % of {total}; median relative error {:.1} %",
            share * 100.0,
            median * 100.0
        );
        assert!(share >= 0.95, "{share}");
        assert!(median < 0.15, "{median}");
    }

    #[test]
    fn bad_samples_and_coordinates_change_nothing_and_the_filter_is_bounded() {
        let mut v: Vivaldi<u64> = Vivaldi::new(7);
        let start = v.coordinate().clone();
        let good = Coordinate::default();
        for rtt in [f64::NAN, -1.0, 0.0, f64::INFINITY, 100.0] {
            assert!(!v.observe(1, &good, rtt), "{rtt}");
        }
        let mut bad = Coordinate::default();
        bad.vec[3] = f64::NAN;
        assert!(!v.observe(1, &bad, 0.01));
        bad = Coordinate {
            height: -1.0,
            ..Coordinate::default()
        };
        assert!(!v.observe(1, &bad, 0.01));
        assert_eq!(v.coordinate(), &start);
        for p in 0..(MAX_PEERS as u64 + 100) {
            assert!(v.observe(p, &good, 0.01));
        }
        assert_eq!(v.filter.len(), MAX_PEERS);
        assert!(v.coordinate().is_valid());
        v.forget(&(MAX_PEERS as u64 + 99));
        assert_eq!(v.filter.len(), MAX_PEERS - 1);
    }
}
