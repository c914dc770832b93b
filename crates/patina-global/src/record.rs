//! The global tier's records and their rules ([`SummaryKind`]).
//!
//! - A summary: key `APP/REGION`, group `APP`, value `patina.v1.SummaryRecord` (healthy and
//!   total counts, and the region view it was made from). One per (app, region) stands.
//! - A bridge's heartbeat: key `_bridge/ORIGIN` (the bridge's origin in 16 hex digits), group
//!   `_bridges`, value `patina.v1.BridgeRecord` (its region and the freshness of its view).
//!   It is the bridge's registration too: a bridge's region is fixed by its first heartbeat,
//!   and a summary is accepted from a peer only when its origin's heartbeat names the
//!   summary's region.
//! - A bridge's certificate: key `_bridgecert/ORIGIN`, group `_bridges`, value
//!   `patina.v1.BridgeCertRecord`, signed by the certified key over the origin, the
//!   publication time and the certificate. With TLS on ([`SummaryKind::signed`]), a peer's heartbeat
//!   and summaries are taken only when signed with the key of that certificate, which must
//!   chain to the operator's CA and name a bridge of their region (see
//!   [`patina_edge::signed`]). Deletions are not signed: a faulty global agent can withdraw
//!   a summary, never make one up; a certificate's deletion from a peer is refused.
//!
//! Which summary of a key stands: the one made from the newer region view (its `view_hlc`),
//! then the higher version. So a bridge that publishes late what it saw early loses to one
//! that saw more recently, whichever published last.

use std::sync::Arc;

use patina_edge::is_dns_label;
use patina_edge::signed::{bridge_of, certificate_message, heartbeat_message, summary_message};
use patina_proto::v1::{BridgeCertRecord, BridgeRecord, SummaryRecord};
use patina_store::{Candidate, Entry, Flags, Hlc, Kind, NodeId};
use patina_trust::{Scope, Verifier};
use prost::Message;

/// The group of bridges' heartbeats and certificates (not a DNS label, so no app can take
/// it).
pub const BRIDGES_GROUP: &str = "_bridges";
const BRIDGE_PREFIX: &str = "_bridge/";
const CERT_PREFIX: &str = "_bridgecert/";
/// Largest stored certificate record: the certificate, its publication time and its
/// signature, each with its tag and length.
pub const MAX_CERT_VALUE_BYTES: usize =
    patina_trust::signing::MAX_CERTIFICATE + patina_trust::signing::MAX_SIGNATURE + 32;

/// Largest stored summary or heartbeat value: a few fields; anything larger is refused.
pub const MAX_VALUE_BYTES: usize = 256;

/// Most instances one summary may count.
pub const MAX_INSTANCES: u32 = patina_edge::table::MAX_INSTANCES;

/// What a key names.
#[derive(Debug, PartialEq, Eq)]
pub enum Key<'a> {
    Summary { app: &'a str, region: &'a str },
    Bridge(NodeId),
    BridgeCert(NodeId),
}

pub fn summary_key(app: &str, region: &str) -> String {
    format!("{app}/{region}")
}

pub fn bridge_key(bridge: NodeId) -> String {
    format!("{BRIDGE_PREFIX}{:016x}", bridge.0)
}

pub fn bridge_cert_key(bridge: NodeId) -> String {
    format!("{CERT_PREFIX}{:016x}", bridge.0)
}

/// Sixteen lowercase hex digits.
fn node_hex(hex: &str) -> Option<NodeId> {
    if hex.len() != 16
        || !hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(NodeId)
}

/// Parse a record key; `None` for anything else.
pub fn parse_key(key: &str) -> Option<Key<'_>> {
    if let Some(hex) = key.strip_prefix(BRIDGE_PREFIX) {
        return node_hex(hex).map(Key::Bridge);
    }
    if let Some(hex) = key.strip_prefix(CERT_PREFIX) {
        return node_hex(hex).map(Key::BridgeCert);
    }
    let (app, region) = key.split_once('/')?;
    (is_dns_label(app) && is_dns_label(region)).then_some(Key::Summary { app, region })
}

/// How far ahead of this host's clock a stored view may be (as for record timestamps): a view
/// from further ahead could not be replaced by any real one until the clock caught up.
pub const MAX_VIEW_AHEAD_MS: u64 = patina_store::MAX_CLOCK_AHEAD_MS;

fn check_view(view_hlc: u64) -> Result<(), String> {
    let now_ms = patina_store::Clock::now_ms(&patina_store::SystemClock);
    let ahead = (view_hlc >> 16).saturating_sub(now_ms);
    if ahead > MAX_VIEW_AHEAD_MS {
        return Err(format!("a view {ahead} ms ahead of this host's clock"));
    }
    Ok(())
}

/// Decode a summary value and check it on its own: counts in range, size.
pub fn decode_summary(value: &[u8]) -> Result<SummaryRecord, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "a value of {} bytes, at most {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    let s = SummaryRecord::decode(value).map_err(|e| format!("not a summary: {e}"))?;
    if s.healthy > s.total || s.total > MAX_INSTANCES {
        return Err(format!(
            "counts out of range: {} healthy of {}",
            s.healthy, s.total
        ));
    }
    Ok(s)
}

/// Decode a heartbeat value.
pub fn decode_bridge(value: &[u8]) -> Result<BridgeRecord, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "a value of {} bytes, at most {MAX_VALUE_BYTES}",
            value.len()
        ));
    }
    let b = BridgeRecord::decode(value).map_err(|e| format!("not a bridge heartbeat: {e}"))?;
    if !is_dns_label(&b.region) {
        return Err("a heartbeat whose region is not a DNS label".into());
    }
    Ok(b)
}

/// Decode a certificate record.
pub fn decode_cert(value: &[u8]) -> Result<BridgeCertRecord, String> {
    if value.len() > MAX_CERT_VALUE_BYTES {
        return Err(format!(
            "a certificate record of {} bytes, at most {MAX_CERT_VALUE_BYTES}",
            value.len()
        ));
    }
    BridgeCertRecord::decode(value).map_err(|e| format!("not a certificate record: {e}"))
}

/// The rules of the global tier's records. [`SummaryKind::signed`] also checks bridges'
/// signatures (TLS on); the default takes unsigned records (TLS off).
#[derive(Clone, Debug, Default)]
pub struct SummaryKind {
    signed: Option<Signed>,
}

/// What signatures are checked against: the CA bundle, and the global cluster whose bridges
/// may sign.
#[derive(Clone, Debug)]
struct Signed {
    verifier: Arc<Verifier>,
    scope: Scope,
}

impl SummaryKind {
    /// Rules that take a peer's heartbeat or summary only when a bridge of its region in
    /// `scope` (the global cluster) signed it.
    pub fn signed(verifier: Arc<Verifier>, scope: Scope) -> SummaryKind {
        SummaryKind {
            signed: Some(Signed { verifier, scope }),
        }
    }

    /// The certificate `origin` published, vouched for as a bridge of `region`.
    fn signer(
        &self,
        s: &Signed,
        origin: NodeId,
        region: &str,
        held: &dyn Fn(&str) -> Option<Entry>,
    ) -> Result<Arc<patina_trust::Vouched>, String> {
        let cert = held(&bridge_cert_key(origin))
            .and_then(|e| e.value().map(<[u8]>::to_vec))
            .ok_or("a signed record from an origin with no bridge certificate (yet)")?;
        let cert = decode_cert(&cert)?.certificate;
        bridge_of(&s.verifier, &s.scope, &cert, region)
    }
}

impl Kind for SummaryKind {
    fn name(&self) -> &'static str {
        "summary"
    }

    /// Summaries are the millions; bridge records and certificates, looked up by key, stay in
    /// memory.
    fn lean_key(&self, key: &str) -> bool {
        matches!(parse_key(key), Some(Key::Summary { .. }) | None)
    }

    fn flags(&self, value: &[u8]) -> Flags {
        // Heartbeats decode as summaries with no counts: not routable.
        Flags {
            routable: SummaryRecord::decode(value).is_ok_and(|s| s.healthy > 0),
        }
    }

    fn check(&self, key: &str, group: &str, value: Option<&[u8]>) -> Result<(), String> {
        match parse_key(key) {
            Some(Key::Summary { app, region }) => {
                if group != app {
                    return Err("a summary whose group is not its app".into());
                }
                if let Some(v) = value {
                    let s = decode_summary(v)?;
                    if s.region != region {
                        return Err("a summary whose region differs from its key's".into());
                    }
                    check_view(s.view_hlc)?;
                }
                Ok(())
            }
            Some(Key::Bridge(_)) => {
                if group != BRIDGES_GROUP {
                    return Err("a heartbeat outside the bridges' group".into());
                }
                value.map_or(Ok(()), |v| check_view(decode_bridge(v)?.view_hlc))
            }
            Some(Key::BridgeCert(_)) => {
                if group != BRIDGES_GROUP {
                    return Err("a certificate outside the bridges' group".into());
                }
                // Its publication time orders it (field 4): bounded as a view is.
                value.map_or(Ok(()), |v| check_view(decode_cert(v)?.published_hlc))
            }
            None => Err("a key that is neither APP/REGION nor a bridge's".into()),
        }
    }

    fn check_held(
        &self,
        origin: NodeId,
        key: &str,
        value: Option<&[u8]>,
        held: &dyn Fn(&str) -> Option<Entry>,
    ) -> Result<(), String> {
        let registered = |bridge: NodeId| -> Option<String> {
            let e = held(&bridge_key(bridge))?;
            decode_bridge(e.value()?).ok().map(|b| b.region)
        };
        match parse_key(key) {
            Some(Key::Summary { app, region }) => {
                match registered(origin) {
                    Some(r) if r == region => {}
                    Some(r) => {
                        return Err(format!(
                            "a bridge of region {r} published for region {region}: refused"
                        ));
                    }
                    None => {
                        return Err(
                            "a summary from an origin with no bridge heartbeat (yet)".into()
                        );
                    }
                }
                let (Some(s), Some(v)) = (&self.signed, value) else {
                    return Ok(());
                };
                let summary = decode_summary(v)?;
                let signer = self.signer(s, origin, region, held)?;
                let message = summary_message(
                    app,
                    region,
                    summary.healthy,
                    summary.total,
                    summary.view_hlc,
                );
                signer
                    .verify(&message, &summary.signature)
                    .map_err(|e| format!("summary {app}/{region}: {e}"))
            }
            Some(Key::Bridge(bridge)) => {
                if bridge != origin {
                    return Err("a heartbeat written for another bridge".into());
                }
                let Some(v) = value else { return Ok(()) };
                let heartbeat = decode_bridge(v)?;
                let region = &heartbeat.region;
                match registered(bridge) {
                    Some(r) if r != *region => {
                        return Err(format!(
                            "a bridge of region {r} now claims region {region}: a bridge's region is fixed"
                        ));
                    }
                    _ => {}
                }
                let Some(s) = &self.signed else { return Ok(()) };
                let signer = self.signer(s, origin, region, held)?;
                signer
                    .verify(
                        &heartbeat_message(origin.0, region, heartbeat.view_hlc),
                        &heartbeat.signature,
                    )
                    .map_err(|e| format!("heartbeat: {e}"))
            }
            Some(Key::BridgeCert(bridge)) => {
                if bridge != origin {
                    return Err("a certificate written for another bridge".into());
                }
                let Some(s) = &self.signed else {
                    return Ok(());
                };
                // Deletions are not signed: a peer cannot withdraw a bridge's certificate
                // (its summaries would be refused everywhere until it published again).
                let Some(v) = value else {
                    return Err("a deletion of a bridge's certificate from a peer".into());
                };
                let record = decode_cert(v)?;
                let cert = record.certificate;
                let vouched = s.verifier.vouched(&cert).map_err(|e| e.to_string())?;
                // Signed by the certified key for this origin and this publication: no peer
                // can store a certificate under an origin that never held its key, nor date
                // one again to make it win.
                vouched
                    .verify(
                        &certificate_message(bridge.0, record.published_hlc, &cert),
                        &record.signature,
                    )
                    .map_err(|e| format!("certificate record: {e}"))?;
                let mut regions = vouched.principal.bridge_regions(&s.scope);
                match (registered(bridge), regions.next()) {
                    (_, None) => Err(format!(
                        "a certificate ({}) that names no bridge of this cluster",
                        vouched.principal.name
                    )),
                    (Some(r), Some(first)) => {
                        if first == r || regions.any(|x| x == r) {
                            Ok(())
                        } else {
                            Err(format!(
                                "a certificate for a bridge of region {r} that does not name it"
                            ))
                        }
                    }
                    (None, Some(_)) => Ok(()),
                }
            }
            None => Err("unknown key".into()),
        }
    }

    fn wins(&self, incoming: &Candidate<'_>, current: &Candidate<'_>) -> bool {
        (stamp(incoming), incoming.version) > (stamp(current), current.version)
    }

    /// A bridge's summaries and heartbeat are bound to the origin that wrote them (a summary
    /// is taken only from an origin whose heartbeat names its region): a bridge that moves
    /// publishes again under its new origin, and its old origin's records go with it.
    fn rename_on_move(&self) -> bool {
        false
    }
}

/// How far back a deletion is stamped. A bridge deletes a zero summary that has stood for
/// `bridge::Timing::zero_retain` (10 min, far longer than this), so the deletion beats the
/// zero it deletes; a summary from a view of the last minute (an instance that started while
/// the deletion was on its way, seen by another bridge) beats the deletion instead, and the
/// app is not lost from the region until the next zero. The same holds for the tombstones
/// `Admin.Forget` writes: a forgotten bridge's records whose views are under a minute old
/// outlive its tombstones (forget a bridge a minute after it died).
pub const DELETE_LAG_MS: u64 = 60_000;

/// The view a candidate was made from: its value's `view_hlc` (field 4 of both value
/// messages); a tombstone's is its own timestamp set back by [`DELETE_LAG_MS`].
fn stamp(c: &Candidate<'_>) -> u64 {
    match c.value {
        Some(v) => view_hlc_of(v).unwrap_or(c.version.hlc.0),
        None => c
            .version
            .hlc
            .0
            .saturating_sub(Hlc::from_physical_ms(DELETE_LAG_MS).0),
    }
}

/// Field 4 (`view_hlc`) of an encoded summary or heartbeat, without decoding the rest.
fn view_hlc_of(mut buf: &[u8]) -> Option<u64> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    let mut hlc = 0;
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        match (tag, wire) {
            (4, WireType::Varint) => hlc = decode_varint(&mut buf).ok()?,
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default()).ok()?,
        }
    }
    Some(hlc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_store::Version;

    fn summary(region: &str, healthy: u32, total: u32, view: u64) -> Vec<u8> {
        SummaryRecord {
            region: region.into(),
            healthy,
            total,
            view_hlc: view,
            signature: Vec::new(),
        }
        .encode_to_vec()
    }

    fn v(hlc: u64, origin: u64, seq: u64) -> Version {
        Version {
            hlc: Hlc(hlc),
            origin: NodeId(origin),
            seq,
        }
    }

    #[test]
    fn a_deletion_is_stamped_a_minute_before_it_was_written() {
        let kind = SummaryKind::default();
        let ms = |m: u64| Hlc::from_physical_ms(m).0;
        let written = 1_700_000_000_000;
        let deletion = Candidate {
            version: v(ms(written), 2, 9),
            value: None,
        };
        // The ten-minute-old zero it deletes: the deletion wins.
        let old_zero = summary("ord", 0, 0, ms(written - 600_000));
        let old_zero = Candidate {
            version: v(ms(written - 600_000), 1, 3),
            value: Some(&old_zero),
        };
        assert!(
            kind.wins(&deletion, &old_zero),
            "a deletion beats the old zero"
        );
        // A summary from a view of the last minute (an instance that just started, seen by
        // another bridge while the deletion travelled): it wins, whichever came last.
        let recent = summary("ord", 1, 1, ms(written - 30_000));
        let recent = Candidate {
            version: v(ms(written - 30_000), 1, 4),
            value: Some(&recent),
        };
        assert!(
            kind.wins(&recent, &deletion),
            "a recent view beats the deletion"
        );
        assert!(!kind.wins(&deletion, &recent));
        // From a view older than the lag, it loses to the deletion.
        let stale = summary("ord", 1, 1, ms(written - 90_000));
        let stale = Candidate {
            version: v(ms(written - 90_000), 1, 5),
            value: Some(&stale),
        };
        assert!(kind.wins(&deletion, &stale));
    }

    #[test]
    fn keys_parse_and_refuse_what_they_should() {
        assert_eq!(
            parse_key("web/ord"),
            Some(Key::Summary {
                app: "web",
                region: "ord"
            })
        );
        assert_eq!(
            parse_key(&bridge_key(NodeId(0xab))),
            Some(Key::Bridge(NodeId(0xab)))
        );
        for bad in [
            "web",
            "web/",
            "/ord",
            "Web/ord",
            "web/ord/x",
            "_bridge/12",
            "_bridge/00000000000000AB",
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_newer_view_wins_whoever_published_last() {
        let k = SummaryKind::default();
        let early = summary("ord", 1, 1, 100);
        let late = summary("ord", 0, 1, 200);
        // The early view published later (higher hlc, higher seq) still loses.
        let lagging = Candidate {
            version: v(900, 1, 5),
            value: Some(&early),
        };
        let fresh = Candidate {
            version: v(300, 2, 1),
            value: Some(&late),
        };
        assert!(k.wins(&fresh, &lagging));
        assert!(!k.wins(&lagging, &fresh));
        // Same view: the version decides, so exactly one of two wins.
        let same = summary("ord", 1, 1, 200);
        let other = Candidate {
            version: v(301, 3, 1),
            value: Some(&same),
        };
        assert!(k.wins(&other, &fresh) != k.wins(&fresh, &other));
        // A tombstone counts as a view of its own time set back by the deletion lag.
        let gone = Candidate {
            version: v(250 + Hlc::from_physical_ms(DELETE_LAG_MS).0, 2, 2),
            value: None,
        };
        assert!(k.wins(&gone, &fresh));
        assert!(!k.wins(
            &gone,
            &Candidate {
                version: v(260, 2, 3),
                value: Some(&summary("ord", 1, 1, 255))
            }
        ));
    }

    #[test]
    fn bad_values_are_refused() {
        let k = SummaryKind::default();
        assert!(
            k.check("web/ord", "web", Some(&summary("ord", 1, 2, 1)))
                .is_ok()
        );
        assert!(
            k.check("web/ord", "api", Some(&summary("ord", 1, 2, 1)))
                .is_err()
        );
        assert!(
            k.check("web/ord", "web", Some(&summary("fra", 1, 2, 1)))
                .is_err()
        );
        assert!(
            k.check("web/ord", "web", Some(&summary("ord", 3, 2, 1)))
                .is_err()
        );
        assert!(k.check("web/ord", "web", Some(&[0xff, 0xff])).is_err());
        assert!(k.check("web/ord", "web", Some(&vec![0u8; 300])).is_err());
        let hb = BridgeRecord {
            region: "ord".into(),
            view_hlc: 1,
            signature: Vec::new(),
        }
        .encode_to_vec();
        assert!(
            k.check(&bridge_key(NodeId(1)), BRIDGES_GROUP, Some(&hb))
                .is_ok()
        );
        assert!(k.check(&bridge_key(NodeId(1)), "web", Some(&hb)).is_err());
        assert!(k.check("nope", "web", None).is_err());
        assert!(!k.flags(&summary("ord", 0, 2, 1)).routable);
        assert!(k.flags(&summary("ord", 1, 2, 1)).routable);
        assert!(!k.flags(&hb).routable);
    }

    mod signed {
        use std::collections::BTreeMap;
        use std::time::Duration;

        use patina_trust::certs::Authority;
        use patina_trust::{Grant, Material, Role, Scope, Tier, Trust, Verifier};

        use super::*;

        fn material(ca: &Authority, grants: Vec<Grant>) -> Material {
            ca.issue_set(grants, Duration::from_secs(3600)).unwrap()
        }

        fn bridge(ca: &Authority, region: &str) -> Material {
            material(
                ca,
                vec![Grant::new(
                    Tier::Global,
                    "global",
                    Role::Bridge(region.into()),
                )],
            )
        }

        /// A store's view: key -> (origin, value).
        #[derive(Default)]
        struct Held(BTreeMap<String, (NodeId, Vec<u8>)>);

        impl Held {
            fn put(&mut self, origin: NodeId, key: &str, value: Vec<u8>) {
                self.0.insert(key.to_owned(), (origin, value));
            }

            fn check(
                &self,
                kind: &SummaryKind,
                origin: NodeId,
                key: &str,
                v: &[u8],
            ) -> Result<(), String> {
                let held = |k: &str| {
                    self.0.get(k).map(|(o, v)| {
                        let version = patina_store::Version {
                            hlc: Hlc(1),
                            origin: *o,
                            seq: 1,
                        };
                        Entry::new(k, BRIDGES_GROUP, Some(v), Flags::default(), version, 1)
                    })
                };
                let group = match parse_key(key) {
                    Some(Key::Summary { app, .. }) => app.to_owned(),
                    _ => BRIDGES_GROUP.to_owned(),
                };
                kind.check(key, &group, Some(v))?;
                kind.check_held(origin, key, Some(v), &held)
            }
        }

        /// `m`'s certificate record as a bridge stored under `origin` publishes it.
        fn cert_record(m: &Material, origin: NodeId) -> Vec<u8> {
            BridgeCertRecord {
                certificate: m.certificate().to_vec(),
                published_hlc: 1,
                signature: m
                    .sign(&certificate_message(origin.0, 1, m.certificate()))
                    .unwrap(),
            }
            .encode_to_vec()
        }

        fn heartbeat(m: Option<&Material>, origin: NodeId, region: &str, view: u64) -> Vec<u8> {
            let message = heartbeat_message(origin.0, region, view);
            BridgeRecord {
                region: region.into(),
                view_hlc: view,
                signature: m.map(|m| m.sign(&message).unwrap()).unwrap_or_default(),
            }
            .encode_to_vec()
        }

        fn summary(m: &Material, app: &str, region: &str, healthy: u32, view: u64) -> Vec<u8> {
            SummaryRecord {
                region: region.into(),
                healthy,
                total: healthy,
                view_hlc: view,
                signature: m
                    .sign(&summary_message(app, region, healthy, healthy, view))
                    .unwrap(),
            }
            .encode_to_vec()
        }

        #[test]
        fn only_what_a_bridge_of_the_region_signed_is_taken() {
            let ca = Authority::generate("ca", Duration::from_secs(3600)).unwrap();
            let other_ca = Authority::generate("other", Duration::from_secs(3600)).unwrap();
            let agent = material(&ca, vec![Grant::new(Tier::Global, "global", Role::Agent)]);
            let kind = SummaryKind::signed(
                Arc::new(Verifier::new(Trust::fixed(agent))),
                Scope::new(Tier::Global, "global"),
            );
            let (ord, fra) = (bridge(&ca, "ord"), bridge(&ca, "fra"));
            let (o, f) = (NodeId(1), NodeId(2));
            let view = Hlc::from_physical_ms(1_000).0;
            let mut held = Held::default();

            // The ord bridge: its certificate, its signed heartbeat, its signed summary.
            let cert = cert_record(&ord, o);
            assert_eq!(held.check(&kind, o, &bridge_cert_key(o), &cert), Ok(()));
            held.put(o, &bridge_cert_key(o), cert);
            // The same record under another origin, re-dated, or with no signature: refused
            // (no peer can publish a bridge's certificate under an origin it never held).
            let err = held
                .check(&kind, f, &bridge_cert_key(f), &cert_record(&ord, o))
                .unwrap_err();
            assert!(err.contains("certificate record"), "{err}");
            let mut redated = decode_cert(&cert_record(&ord, o)).unwrap();
            redated.published_hlc = 2;
            assert!(
                held.check(&kind, o, &bridge_cert_key(o), &redated.encode_to_vec())
                    .is_err()
            );
            redated.published_hlc = 1;
            redated.signature.clear();
            assert!(
                held.check(&kind, o, &bridge_cert_key(o), &redated.encode_to_vec())
                    .is_err()
            );
            let hb = heartbeat(Some(&ord), o, "ord", view);
            assert_eq!(held.check(&kind, o, &bridge_key(o), &hb), Ok(()));
            held.put(o, &bridge_key(o), hb);
            let good = summary(&ord, "web", "ord", 3, view);
            assert_eq!(held.check(&kind, o, "web/ord", &good), Ok(()));

            // Unsigned, or signed over other counts: refused.
            let mut unsigned = decode_summary(&good).unwrap();
            unsigned.signature.clear();
            assert!(
                held.check(&kind, o, "web/ord", &unsigned.encode_to_vec())
                    .is_err()
            );
            let mut inflated = decode_summary(&good).unwrap();
            inflated.healthy = 9;
            inflated.total = 9;
            assert!(
                held.check(&kind, o, "web/ord", &inflated.encode_to_vec())
                    .is_err()
            );
            assert!(
                held.check(&kind, o, &bridge_key(o), &heartbeat(None, o, "ord", view))
                    .is_err()
            );
            // A valid summary replayed under another key (another app): refused.
            let err = held
                .check(&kind, o, "api/ord", &summary(&ord, "web", "ord", 3, view))
                .unwrap_err();
            assert!(err.contains("signature"), "{err}");
            // The heartbeat of origin 1 carried by another origin: refused.
            held.put(f, &bridge_cert_key(f), cert_record(&ord, f));
            assert!(
                held.check(
                    &kind,
                    f,
                    &bridge_key(f),
                    &heartbeat(Some(&ord), o, "ord", view)
                )
                .is_err()
            );

            // Another region's bridge signing for ord, under an origin registered for ord:
            // its certificate does not name ord.
            let n = NodeId(3);
            held.put(n, &bridge_key(n), heartbeat(None, n, "ord", 0));
            let err = held
                .check(&kind, n, &bridge_cert_key(n), &cert_record(&fra, n))
                .unwrap_err();
            assert!(err.contains("does not name"), "{err}");
            held.put(n, &bridge_cert_key(n), cert_record(&fra, n));
            let err = held
                .check(&kind, n, "web/ord", &summary(&fra, "web", "ord", 3, view))
                .unwrap_err();
            assert!(
                err.contains("does not name a bridge of region ord"),
                "{err}"
            );
            // A certificate of another CA, or of an agent (no bridge grant): refused.
            let m = NodeId(4);
            let stranger = bridge(&other_ca, "ord");
            assert!(
                held.check(&kind, m, &bridge_cert_key(m), &cert_record(&stranger, m))
                    .is_err()
            );
            let not_a_bridge = material(&ca, vec![Grant::new(Tier::Global, "global", Role::Agent)]);
            assert!(
                held.check(
                    &kind,
                    m,
                    &bridge_cert_key(m),
                    &cert_record(&not_a_bridge, m)
                )
                .is_err()
            );
            // Without TLS (the default kind), unsigned records pass as before.
            assert_eq!(
                held.check(
                    &SummaryKind::default(),
                    o,
                    "web/ord",
                    &unsigned.encode_to_vec()
                ),
                Ok(())
            );
        }
    }
}
