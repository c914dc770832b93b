//! The region table: where regions are, so that lookups answer nearest first.
//!
//! Each region may give coordinates (latitude, longitude in degrees) and measured round
//! trips to other regions. The round trip between two regions is the measured one when
//! either side gives it, else (at a table fed by the global tier's network coordinates,
//! [`crate::Table::set_estimated_rtts`]) the one gossip measured, else one estimated from
//! the great-circle distance (light in fibre covers about 100 km per millisecond of round
//! trip), else unknown. Regions are ordered by
//! round trip from the caller's region, unknown last, ties by name: the same order on every
//! edge.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One region of the table, as configured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionSpec {
    /// The region's name: a DNS label, as region agents and bridges are configured.
    pub name: String,
    /// Latitude in degrees (-90 to 90).
    #[serde(default)]
    pub lat: Option<f64>,
    /// Longitude in degrees (-180 to 180).
    #[serde(default)]
    pub lon: Option<f64>,
    /// Measured round trips to other regions, in milliseconds; they win over coordinates.
    #[serde(default)]
    pub rtt_ms: BTreeMap<String, u32>,
    /// Where clients outside the region reach its apps: "ip:port" addresses of its ingress
    /// (load balancers, gateway proxies), at most 16. A global agent's xDS endpoints and DNS
    /// answers for an app are its regions' ingress addresses; a region without any is left
    /// out of them (lookups still list it).
    #[serde(default)]
    pub ingress: Vec<String>,
}

/// Most ingress addresses a region may list.
pub const MAX_INGRESS: usize = 16;

/// Kilometres of great-circle distance per millisecond of round trip (light in fibre goes
/// about 200 km per ms one way).
const KM_PER_RTT_MS: f64 = 100.0;
const EARTH_RADIUS_KM: f64 = 6371.0;

/// The configured regions.
#[derive(Clone, Debug, Default)]
pub struct RegionTable {
    specs: BTreeMap<String, RegionSpec>,
}

impl RegionTable {
    /// A table from configured regions: names must be distinct DNS labels, coordinates in
    /// range and given together.
    pub fn new(specs: Vec<RegionSpec>) -> Result<RegionTable, String> {
        let mut map = BTreeMap::new();
        for s in specs {
            if !is_dns_label(&s.name) {
                return Err(format!("region {:?}: not a DNS label", s.name));
            }
            match (s.lat, s.lon) {
                (Some(lat), Some(lon)) => {
                    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
                        return Err(format!("region {}: coordinates out of range", s.name));
                    }
                }
                (None, None) => {}
                _ => return Err(format!("region {}: give both lat and lon", s.name)),
            }
            for other in s.rtt_ms.keys() {
                if !is_dns_label(other) {
                    return Err(format!("region {}: rtt_ms names {other:?}", s.name));
                }
            }
            if s.ingress.len() > MAX_INGRESS {
                return Err(format!(
                    "region {}: {} ingress addresses, at most {MAX_INGRESS}",
                    s.name,
                    s.ingress.len()
                ));
            }
            for a in &s.ingress {
                if a.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "region {}: ingress {a:?} is not an \"ip:port\" (\"[v6]:port\") address",
                        s.name
                    ));
                }
            }
            let name = s.name.clone();
            if map.insert(name.clone(), s).is_some() {
                return Err(format!("region {name}: listed twice"));
            }
        }
        Ok(RegionTable { specs: map })
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Whether the table lists this region.
    pub fn contains(&self, region: &str) -> bool {
        self.specs.contains_key(region)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.specs.keys().map(String::as_str)
    }

    /// A region's ingress addresses ("ip:port"), as configured.
    pub fn ingress(&self, region: &str) -> &[String] {
        self.specs.get(region).map_or(&[], |s| s.ingress.as_slice())
    }

    /// The round trip between two regions in milliseconds, when the table can tell: the
    /// configured measurement, else the estimate from coordinates.
    pub fn rtt_ms(&self, from: &str, to: &str) -> Option<u32> {
        self.measured_rtt_ms(from, to)
            .or_else(|| self.geo_rtt_ms(from, to))
    }

    /// The configured (measured) round trip, if either side gives one.
    pub fn measured_rtt_ms(&self, from: &str, to: &str) -> Option<u32> {
        if from == to {
            return Some(0);
        }
        let a = self.specs.get(from);
        let b = self.specs.get(to);
        if let Some(ms) = a.and_then(|a| a.rtt_ms.get(to)) {
            return Some(*ms);
        }
        b.and_then(|b| b.rtt_ms.get(from)).copied()
    }

    /// The round trip estimated from the great-circle distance, when both give coordinates.
    pub fn geo_rtt_ms(&self, from: &str, to: &str) -> Option<u32> {
        let (a, b) = (self.specs.get(from)?, self.specs.get(to)?);
        let km = haversine_km(a.lat?, a.lon?, b.lat?, b.lon?);
        Some((km / KM_PER_RTT_MS).round() as u32)
    }
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let h = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// A DNS label: 1 to 63 of a-z, 0-9 and '-', not starting or ending with '-'. App and region
/// names follow it.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, lat: f64, lon: f64) -> RegionSpec {
        RegionSpec {
            name: name.into(),
            lat: Some(lat),
            lon: Some(lon),
            rtt_ms: BTreeMap::new(),
            ingress: Vec::new(),
        }
    }

    #[test]
    fn round_trips_come_from_measurements_then_coordinates() {
        let mut ord = spec("ord", 41.98, -87.90);
        ord.rtt_ms.insert("fra".into(), 97);
        let t = RegionTable::new(vec![
            ord,
            spec("fra", 50.03, 8.57),
            spec("iad", 38.95, -77.45),
            RegionSpec {
                name: "lab".into(),
                ..RegionSpec::default()
            },
        ])
        .unwrap();
        assert_eq!(t.rtt_ms("ord", "ord"), Some(0));
        assert_eq!(t.rtt_ms("ord", "fra"), Some(97), "measured");
        assert_eq!(
            t.rtt_ms("fra", "ord"),
            Some(97),
            "either side's measurement"
        );
        // Chicago to Washington is about 950 km.
        let est = t.rtt_ms("ord", "iad").unwrap();
        assert!((8..=11).contains(&est), "{est}");
        assert_eq!(t.rtt_ms("ord", "lab"), None, "no coordinates");
        assert_eq!(t.rtt_ms("ord", "nowhere"), None);
    }

    #[test]
    fn bad_tables_are_refused() {
        let bad = [
            vec![spec("Ord", 0.0, 0.0)],
            vec![spec("ord", 91.0, 0.0)],
            vec![spec("ord", 0.0, 0.0), spec("ord", 1.0, 1.0)],
            vec![RegionSpec {
                name: "ord".into(),
                lat: Some(1.0),
                ..RegionSpec::default()
            }],
        ];
        for specs in bad {
            assert!(RegionTable::new(specs.clone()).is_err(), "{specs:?}");
        }
    }
}
