//! Nearest-first from measured round trips: the global tier's network coordinates (each
//! agent's Vivaldi coordinate, kept from its anti-entropy hellos) order the regions where the
//! region table has no measured round trip. A region's place is the most confident
//! coordinate among its live bridges (and this agent's own, for its own region).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use patina_edge::Table;
use patina_gossip::coords::Coordinate;
use patina_gossip::shell::{Gossip, PlaceView};

/// A coordinate less sure than this (Vivaldi's error starts at 1.5 and falls as samples
/// agree) places nothing.
const MAX_ERROR: f64 = 1.0;

/// How often the table's estimates are refreshed.
pub const EVERY: Duration = Duration::from_secs(10);

/// Each region's most confident coordinate: its bridges' (by their store's origin), and
/// `own` for `own_region`.
pub fn region_places(
    place: &PlaceView,
    bridges: &[(u64, Arc<str>)],
    own_region: &str,
) -> HashMap<Arc<str>, Coordinate> {
    let peers: HashMap<u64, &Coordinate> = place.peers.iter().map(|(n, c)| (n.0, c)).collect();
    let mut out: HashMap<Arc<str>, Coordinate> = HashMap::new();
    let mut offer = |region: Arc<str>, c: &Coordinate| {
        if !c.is_valid() || c.error >= MAX_ERROR {
            return;
        }
        match out.get(&region) {
            Some(held) if held.error <= c.error => {}
            _ => {
                out.insert(region, c.clone());
            }
        }
    };
    offer(Arc::from(own_region), &place.own);
    for (bridge, region) in bridges {
        if let Some(c) = peers.get(bridge) {
            offer(region.clone(), c);
        }
    }
    out
}

/// Refresh the table's estimates from `gossip`'s coordinates every [`EVERY`], for ever.
pub async fn follow_coordinates(gossip: Gossip, table: Arc<Table>, own_region: String) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let places = region_places(&gossip.place(), &table.bridge_regions(), &own_region);
        if places.len() < 2 {
            continue;
        }
        let est = |a: &str, b: &str| {
            let (a, b) = (places.get(a)?, places.get(b)?);
            Some(
                (a.distance_to(b) * 1000.0)
                    .round()
                    .clamp(0.0, f64::from(u32::MAX - 1)) as u32,
            )
        };
        if table.set_estimated_rtts(&est) {
            tracing::info!(
                regions = places.len(),
                "regions reordered by the global tier's measured round trips"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_store::NodeId;

    fn at(x: f64, error: f64) -> Coordinate {
        let mut c = Coordinate {
            error,
            ..Coordinate::default()
        };
        c.vec[0] = x;
        c
    }

    #[test]
    fn each_region_takes_its_most_confident_coordinate_and_unsure_ones_place_nothing() {
        let place = PlaceView {
            own: at(0.0, 0.2),
            peers: vec![
                (NodeId(1), at(0.050, 0.5)),
                (NodeId(2), at(0.055, 0.3)),
                (NodeId(3), at(0.200, 1.4)),
                (NodeId(4), at(0.100, 0.1)),
            ],
            shared: Vec::new(),
        };
        let bridges: Vec<(u64, Arc<str>)> = vec![
            (1, "fra".into()),
            (2, "fra".into()),
            (3, "syd".into()),
            (9, "iad".into()),
        ];
        let p = region_places(&place, &bridges, "ord");
        assert_eq!(
            p.len(),
            2,
            "syd's only coordinate is unsure; iad's bridge sent none"
        );
        assert_eq!(p["fra"].vec[0], 0.055);
        assert_eq!(p["ord"].vec[0], 0.0);
    }
}
