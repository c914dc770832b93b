//! [`MachineKind`]: the store's rules for machine records.
//!
//! A machine is routable when it is started and passing its checks. A machine from a peer is
//! checked like a client's write (every rule of `validate.rs`) and must belong to this
//! region, under its own id and app: a peer with a bug must not plant a record the API would
//! have refused.

use patina_proto::v1::{Health, Machine, MachineState};
use patina_store::{Flags, Kind};
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
}
