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
        // Only the two fields routing needs; an undecodable value is not routable.
        let routable = Machine::decode(value).is_ok_and(|m| {
            m.state == MachineState::Started as i32 && m.health == Health::Passing as i32
        });
        Flags { routable }
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
