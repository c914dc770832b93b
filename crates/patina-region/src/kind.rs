//! [`MachineKind`]: the store's rules for machine records.
//!
//! A machine is routable when it is started and passing its checks. A machine from a peer is
//! checked like a client's write (every rule of `validate.rs`) and must belong to this
//! region, under its own id and app: a peer with a bug must not plant a record the API would
//! have refused.

use patina_proto::v1::{Health, Machine, MachineState};
use patina_store::{Candidate, Flags, Kind};
use prost::Message;

use crate::validate;

pub struct MachineKind {
    region: String,
}

impl MachineKind {
    pub fn new(region: &str) -> MachineKind {
        MachineKind {
            region: region.to_owned(),
        }
    }
}

impl Kind for MachineKind {
    fn name(&self) -> &'static str {
        "machine"
    }

    fn flags(&self, value: &[u8]) -> Flags {
        // Runs on the writer thread for every write: read the two fields routing needs from
        // the wire format instead of decoding the whole machine (its metadata map, strings).
        // An undecodable value is not routable.
        let (state, health) = state_and_health(value).unwrap_or_default();
        Flags {
            routable: state == MachineState::Started as i32 && health == Health::Passing as i32,
        }
    }

    /// By version, except that of two versions with the same timestamp, one a machine's checks
    /// wrote (`health_from_checks`, a successor one tick after the version it judged) loses
    /// to any other: a write made in the same millisecond as the version judged, at another
    /// agent (a move, a deletion), is never undone by a judgement of what it replaced.
    fn wins(&self, incoming: &Candidate<'_>, current: &Candidate<'_>) -> bool {
        if incoming.version.hlc == current.version.hlc {
            let judged = |c: &Candidate<'_>| c.value.is_some_and(from_checks);
            let (a, b) = (judged(incoming), judged(current));
            if a != b {
                return b;
            }
        }
        incoming.version > current.version
    }

    fn check(&self, key: &str, group: &str, value: Option<&[u8]>) -> Result<(), String> {
        validate::machine_id(key).map_err(|e| e.to_string())?;
        validate::app_name(group).map_err(|e| e.to_string())?;
        let Some(value) = value else {
            return Ok(());
        };
        // The raw bytes: unknown fields would pass a check of the decoded machine.
        if value.len() > validate::MAX_RECORD_BYTES {
            return Err(format!(
                "a machine of {} bytes, at most {} allowed",
                value.len(),
                validate::MAX_RECORD_BYTES
            ));
        }
        let m = Machine::decode(value).map_err(|e| format!("not a machine: {e}"))?;
        if m.id != key || m.app != group {
            return Err("the machine's id or app differs from the record's key or group".into());
        }
        if m.region != self.region {
            return Err("a machine of another region".into());
        }
        if m.host.is_empty() {
            return Err("a machine without a host".into());
        }
        validate::machine(&m, &self.region, &m.host)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// `Machine.health_from_checks` (field 12; the last occurrence wins); false for bytes that are
/// not a valid message.
fn from_checks(mut buf: &[u8]) -> bool {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    const FROM_CHECKS: u32 = 12;
    let mut set = false;
    while !buf.is_empty() {
        let Ok((tag, wire)) = decode_key(&mut buf) else {
            return false;
        };
        let ok = match (tag, wire) {
            (FROM_CHECKS, WireType::Varint) => decode_varint(&mut buf).map(|v| set = v != 0),
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default()),
        };
        if ok.is_err() {
            return false;
        }
    }
    set
}

/// `Machine.state` and `Machine.health` (fields 6 and 7; the last occurrence wins, as in a
/// full decode), or `None` for bytes that are not a valid message.
fn state_and_health(mut buf: &[u8]) -> Option<(i32, i32)> {
    use prost::encoding::{DecodeContext, WireType, decode_key, decode_varint, skip_field};
    const STATE: u32 = 6;
    const HEALTH: u32 = 7;
    let (mut state, mut health) = (0, 0);
    while !buf.is_empty() {
        let (tag, wire) = decode_key(&mut buf).ok()?;
        match (tag, wire) {
            (STATE, WireType::Varint) => state = decode_varint(&mut buf).ok()? as i32,
            (HEALTH, WireType::Varint) => health = decode_varint(&mut buf).ok()? as i32,
            _ => skip_field(wire, tag, &mut buf, DecodeContext::default()).ok()?,
        }
    }
    Some((state, health))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> Machine {
        Machine {
            id: "m1".into(),
            app: "web".into(),
            region: "ord".into(),
            host: "worker-1".into(),
            addresses: vec!["10.0.0.1:80".into()],
            state: MachineState::Started as i32,
            health: Health::Passing as i32,
            ..Machine::default()
        }
    }

    #[test]
    fn a_valid_machine_of_this_region_passes_and_started_passing_is_routable() {
        let kind = MachineKind::new("ord");
        let v = machine().encode_to_vec();
        assert_eq!(kind.check("m1", "web", Some(&v)), Ok(()));
        assert_eq!(kind.check("m1", "web", None), Ok(()), "a tombstone");
        assert!(kind.flags(&v).routable);
        let mut stopped = machine();
        stopped.state = MachineState::Stopped as i32;
        assert!(!kind.flags(&stopped.encode_to_vec()).routable);
        assert!(!kind.flags(b"\xff garbage").routable);
        // The wire scan agrees with a full decode, metadata and unknown fields included.
        let mut m = machine();
        m.metadata.insert("k".into(), "v".repeat(300));
        let mut bytes = m.encode_to_vec();
        prost::encoding::bytes::encode(1000, &vec![7u8; 40], &mut bytes);
        assert!(kind.flags(&bytes).routable);
        for (state, health) in [(3, 1), (3, 2), (5, 1), (0, 0)] {
            m.state = state;
            m.health = health;
            let full = Machine::decode(&m.encode_to_vec()[..]).unwrap();
            assert_eq!(
                state_and_health(&m.encode_to_vec()),
                Some((full.state, full.health))
            );
        }
    }

    #[test]
    fn peers_cannot_plant_what_the_api_would_refuse() {
        let kind = MachineKind::new("ord");
        type Edit = fn(&mut Machine);
        let cases: [(&str, Edit); 5] = [
            ("another region", |m| m.region = "fra".into()),
            ("no host", |m| m.host.clear()),
            ("bad address", |m| m.addresses = vec!["nope".into()]),
            ("bad state", |m| m.state = 99),
            ("id mismatch", |m| m.id = "m2".into()),
        ];
        for (what, change) in cases {
            let mut m = machine();
            change(&mut m);
            assert!(
                kind.check("m1", "web", Some(&m.encode_to_vec())).is_err(),
                "{what} accepted"
            );
        }
        assert!(kind.check("m1", "web", Some(b"\xff\xff")).is_err());
        // Unknown fields pad a valid machine past the record limit: refused on its bytes.
        let mut padded = machine().encode_to_vec();
        prost::encoding::bytes::encode(1000, &vec![0u8; 8192], &mut padded);
        assert!(Machine::decode(&padded[..]).is_ok());
        assert!(kind.check("m1", "web", Some(&padded)).is_err());
        // Tombstones are checked too: their key and group.
        assert!(kind.check("bad id!", "web", None).is_err());
        assert!(kind.check("m1", "\x1b[31m", None).is_err());
    }

    #[test]
    fn on_a_tie_of_timestamps_a_judgement_loses_to_any_other_write() {
        use patina_store::{Hlc, NodeId, Version};
        let kind = MachineKind::new("ord");
        let plain = machine().encode_to_vec();
        let judged = Machine {
            health_from_checks: true,
            ..machine()
        }
        .encode_to_vec();
        assert!(from_checks(&judged) && !from_checks(&plain) && !from_checks(b"\xff"));
        let v = |hlc, origin| Version {
            hlc: Hlc(hlc),
            origin: NodeId(origin),
            seq: 1,
        };
        let c = |version, value: Option<&'static [u8]>| Candidate { version, value };
        let judged: &'static [u8] = Box::leak(judged.into_boxed_slice());
        let plain: &'static [u8] = Box::leak(plain.into_boxed_slice());
        // Same timestamp: the judgement loses whichever origin is higher, and to a tombstone.
        let j = c(v(100, 9), Some(judged));
        for other in [c(v(100, 1), Some(plain)), c(v(100, 1), None)] {
            assert!(kind.wins(&other, &j) && !kind.wins(&j, &other));
        }
        // Otherwise the version decides.
        let later = c(v(101, 1), Some(judged));
        let earlier = c(v(100, 9), Some(plain));
        assert!(kind.wins(&later, &earlier) && !kind.wins(&earlier, &later));
        // Two judgements, or two plain writes: by version.
        let j2 = c(v(100, 3), Some(judged));
        assert!(kind.wins(&j, &j2) && !kind.wins(&j2, &j));
    }
}
