//! Attendance: each node holds an idle gRPC stream open to the next [`Config::attend`]
//! members after it (ordered by gossip address, a ring), so every member is attended by that
//! many others. When a process dies on a host that stays up, the kernel closes its
//! connections: the attending node sees its stream end, finds the member's port refusing
//! connections, and suspects it at once ([`Node::handle_unreachable`]): a corroborated
//! suspicion, down after `suspicion_min`. Without it, a dead member waits until some
//! member's probe happens to pick it (0 to ~4 probe periods at 20 members) and then a full
//! probe period more. A vanished host or a partition closes nothing: SWIM's probes find
//! those, as before. Idle, attendance sends nothing.
//!
//! [`Config::attend`]: super::Config::attend

use std::time::Duration;

use super::{Node, Output};
use crate::identity::Identity;

/// The attended members are chosen again at most this often (a membership change only marks
/// them stale): at thousands of members, a join storm brings thousands of changes, and each
/// choice is a pass over the membership.
pub const ATTEND_REFRESH: Duration = Duration::from_millis(100);

impl Node {
    /// Choose the attended members again if the membership changed since the last choice
    /// (at most every [`ATTEND_REFRESH`]); tell the shell when they differ.
    pub(super) fn refresh_attendance(&mut self) {
        if self.cfg.attend == 0 || !self.attend_stale {
            return;
        }
        if self
            .attend_chosen_at
            .is_some_and(|at| self.now < at + ATTEND_REFRESH)
        {
            return;
        }
        self.attend_stale = false;
        self.attend_chosen_at = Some(self.now);
        let chosen = if self.leaving {
            Vec::new()
        } else {
            // foca's active members only (alive or suspect): down ones are remembered for a
            // day and would make each pass longer.
            successors(
                self.identity(),
                self.foca.iter_members().map(|m| *m.id()),
                self.cfg.attend,
            )
        };
        if chosen != self.attending {
            self.attending = chosen.clone();
            self.out.push(Output::Attend { members: chosen });
        }
    }

    /// The members this node attends now.
    pub fn attending(&self) -> &[Identity] {
        &self.attending
    }

    /// An attended member's stream ended and its port refused a connection: its process is
    /// gone. If it is alive here, suspect it now (gossiped, so that it refutes if it does
    /// run after all) and hold the suspicion as one of this node's own, corroboration asked
    /// as for any: down after `suspicion_min`, unless the port answers.
    pub fn handle_unreachable(&mut self, now: Duration, member: Identity) {
        self.now = now;
        // Counted whether or not it changes anything here (a probe may have suspected the
        // member first): what the attendants saw.
        self.count(|c| c.attend_unreachable += 1);
        let Some(incarnation) = self
            .foca
            .iter_membership_state()
            .find(|m| *m.id() == member && m.state() == foca::State::Alive)
            .map(|m| m.incarnation())
        else {
            return; // suspect or down already, renamed, or never a member
        };
        let Some(token) = self.swim_token else {
            return;
        };
        tracing::warn!(member = %member, "an attended member's stream ended and its port refuses: suspected at once");
        self.suspect_corroborated(member, incarnation, false, token);
        self.after_foca();
    }
}

/// The `k` members after `me` on the ring of gossip addresses (wrapping around), in that
/// order: one pass, whatever the membership's size.
pub(super) fn successors(
    me: Identity,
    members: impl Iterator<Item = Identity>,
    k: usize,
) -> Vec<Identity> {
    // Ordered by (wrapped, address): members after me first, then those before me.
    let mut best: Vec<(bool, Identity)> = Vec::with_capacity(k + 1);
    for m in members {
        if m.addr == me.addr {
            continue;
        }
        let key = (m.addr < me.addr, m.addr);
        let at = best.partition_point(|(w, b)| (*w, b.addr) < key);
        if at < k {
            best.insert(at, (key.0, m));
            best.truncate(k);
        }
    }
    best.into_iter().map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_store::NodeId;

    fn id(port: u16) -> Identity {
        Identity {
            node: NodeId(u64::from(port)),
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            api_port: port + 1,
            epoch: 1,
        }
    }

    #[test]
    fn successors_are_the_next_members_on_the_ring_wrapping_around() {
        let all: Vec<Identity> = [10, 50, 20, 40, 30].into_iter().map(id).collect();
        let ports = |me: u16, k: usize| -> Vec<u16> {
            successors(id(me), all.iter().copied(), k)
                .iter()
                .map(|m| m.addr.port())
                .collect()
        };
        assert_eq!(ports(20, 2), vec![30, 40]);
        assert_eq!(ports(40, 2), vec![50, 10], "wraps around");
        assert_eq!(ports(50, 3), vec![10, 20, 30]);
        assert_eq!(ports(30, 10), vec![40, 50, 10, 20], "never itself");
        assert_eq!(ports(30, 0), Vec::<u16>::new());
        // Every member is attended by exactly k others.
        for k in 1..=3 {
            let mut attended = std::collections::BTreeMap::<u16, usize>::new();
            for me in [10, 20, 30, 40, 50] {
                for p in ports(me, k) {
                    *attended.entry(p).or_default() += 1;
                }
            }
            assert!(attended.values().all(|n| *n == k), "{k}: {attended:?}");
        }
    }
}
