//! Suspicion, Lifeguard-style: a suspect-to-down timeout is held by the node and starts
//! long; a corroboration (the suspect's gRPC port refuses) cuts it short; when it runs out,
//! the suspect itself is asked (the last check), and one that answers is refuted on its
//! behalf. A held timeout reaches foca only while the member is still suspect under its
//! incarnation.

use std::time::Duration;

use super::{Node, Output, TimerKind};
use crate::identity::Identity;

/// A suspicion timeout held by the node (Lifeguard: start long, cut short when corroborated).
pub(super) struct Held {
    pub(super) timer: foca::Timer<Identity>,
    pub(super) started: Duration,
    /// The long timeout ran out and the suspect was asked ([`Output::Confirm`]) in this
    /// round (rounds are numbered per node, so a late answer cannot settle a later
    /// suspicion of the same address).
    pub(super) confirming: Option<u64>,
    /// Corroborated (this node's own suspicion, or down news), not one learned from others'
    /// gossip and held long.
    pub(super) corroborated: bool,
}

/// A suspicion this node learned from others (it did not see the member fail) is held this
/// many times as long as one of its own before the last check.
pub const LEARNED_SUSPICION: u32 = 3;

/// How long the shell (or the simulator) takes at most to answer [`Output::Confirm`]: an
/// unanswered check is answered `None` then.
pub const CONFIRM_ASK: Duration = Duration::from_millis(800);

/// The backstop: a check still unanswered this long after it was asked (its answer lost
/// behind a stalled loop) lets the member go down.
pub const CONFIRM_BACKSTOP: Duration = Duration::from_millis(3_000);

impl Node {
    /// LHA-Suspicion: hold a suspect-to-down timeout, starting long; corroboration (the
    /// suspect's port refuses) cuts it short, and when it runs out the suspect is asked.
    pub(super) fn hold_suspicion(&mut self, timer: foca::Timer<Identity>) {
        let foca::Timer::ChangeSuspectToDown { member_id, .. } = &timer else {
            return;
        };
        let member = *member_id;
        self.hold(timer, self.stretch(self.cfg.suspicion_max), true);
        self.out.push(Output::Corroborate { member });
    }

    /// Suspect `member` at `incarnation` now, unless it is suspect here already (gossiped:
    /// a member that runs refutes it), and hold the suspicion as one of this node's own,
    /// corroborated: down after `suspicion_min` when its port refuses, else the last check.
    /// What attendance and down news do with a member they have reason to think gone. The
    /// caller runs `after_foca`.
    pub(super) fn suspect_corroborated(
        &mut self,
        member: Identity,
        incarnation: foca::Incarnation,
        already_suspect: bool,
        token: foca::TimerToken,
    ) {
        if !already_suspect {
            let _ = self.foca.apply_many(
                std::iter::once(foca::Member::new(member, incarnation, foca::State::Suspect)),
                true,
                &mut self.rt,
            );
        }
        self.hold_suspicion(foca::Timer::ChangeSuspectToDown {
            member_id: member,
            incarnation,
            token,
        });
    }

    /// Hold `timer` for `after`, then the last check.
    fn hold(&mut self, timer: foca::Timer<Identity>, after: Duration, corroborated: bool) {
        let foca::Timer::ChangeSuspectToDown { member_id, .. } = &timer else {
            return;
        };
        let member = *member_id;
        self.held.insert(
            member.addr(),
            Held {
                timer: timer.clone(),
                started: self.now,
                confirming: None,
                corroborated,
            },
        );
        self.schedule(after, TimerKind::Swim(timer));
    }

    /// foca times out a suspicion only when its own probe failed; a member it learned as
    /// suspect from others (it joined while the member was suspect, or the news came by
    /// gossip) stays suspect until this node happens to probe it, a whole probe cycle later
    /// in a large cluster. A member that died in such a window stayed listed here for longer
    /// than the simulation's 30 s of quiet. So every suspect without a held timeout gets one,
    /// under its suspected incarnation. Not corroborated, and longer than a suspicion of our
    /// own ([`LEARNED_SUSPICION`] times): this node did not see the member fail, and a path
    /// of its own that is bad must not take down a member others merely suspect. The down
    /// news of the node that suspected it first usually comes long before; otherwise the
    /// last check decides, and a refutation still clears it.
    pub(super) fn hold_unheld_suspects(&mut self) {
        let Some(token) = self.swim_token else {
            return;
        };
        let unheld: Vec<foca::Timer<Identity>> = self
            .foca
            .iter_membership_state()
            .filter(|m| {
                m.state() == foca::State::Suspect && !self.held.contains_key(&m.id().addr())
            })
            .map(|m| foca::Timer::ChangeSuspectToDown {
                member_id: *m.id(),
                incarnation: m.incarnation(),
                token,
            })
            .collect();
        let after = self.stretch(self.cfg.suspicion_max) * LEARNED_SUSPICION;
        for timer in unheld {
            self.hold(timer, after, false);
        }
    }

    /// The answer to [`Output::Corroborate`]: `gone` when the member's port refused or did
    /// not answer.
    pub fn handle_corroboration(&mut self, now: Duration, member: Identity, gone: bool) {
        self.now = now;
        if !gone {
            return;
        }
        let Some(held) = self.held.get(&member.addr()) else {
            return;
        };
        let due = held.started + self.stretch(self.cfg.suspicion_min);
        let after = due.saturating_sub(now);
        self.schedule(after, TimerKind::SuspicionCut(member.addr()));
    }

    /// The answer to [`Output::Confirm`]: `incarnation` is what the suspect itself said
    /// (through its gossip loop, so that loop runs), `None` when it did not answer or is
    /// another identity now. A suspect that answered is alive: its suspicion is refuted here
    /// on its behalf, at an incarnation above the suspected one, and that news is gossiped:
    /// a member whose own refutations do not get through (its datagrams lost, its UDP
    /// blocked) stays up while its gossip loop answers. One that did not goes down now.
    pub fn handle_confirmation(
        &mut self,
        now: Duration,
        member: Identity,
        round: u64,
        incarnation: Option<u16>,
    ) {
        self.now = now;
        if self.held.get(&member.addr()).and_then(|h| h.confirming) != Some(round) {
            return; // settled meanwhile, or an answer of an earlier round
        }
        self.settle_confirmation(member, incarnation);
    }

    pub(super) fn settle_confirmation(&mut self, member: Identity, incarnation: Option<u16>) {
        let Some(h) = self.held.remove(&member.addr()) else {
            return;
        };
        let suspected = self
            .foca
            .iter_membership_state()
            .find(|m| *m.id() == member && m.state() == foca::State::Suspect)
            .map(|m| m.incarnation());
        let refute = match (incarnation, suspected) {
            (Some(_), None) => return, // no longer suspect here
            // At the largest incarnation a refutation cannot be made: down, and it renews.
            (Some(own), Some(suspected)) => suspected.checked_add(1).map(|next| own.max(next)),
            (None, _) => None,
        };
        match refute {
            None => self.deliver_suspicion(h.timer),
            Some(refuted) => {
                tracing::warn!(suspect = %member, incarnation = refuted, "a suspect answered the last check: its suspicion is refuted");
                self.count(|c| c.refuted_for_others += 1);
                let _ = self.foca.apply_many(
                    std::iter::once(foca::Member::new(member, refuted, foca::State::Alive)),
                    true,
                    &mut self.rt,
                );
                self.after_foca();
            }
        }
    }

    /// Is the member of a suspect-to-down timer still suspect under the timer's incarnation?
    pub(super) fn suspect_under(&self, timer: &foca::Timer<Identity>) -> bool {
        match timer {
            foca::Timer::ChangeSuspectToDown {
                member_id,
                incarnation,
                ..
            } => self.foca.iter_membership_state().any(|m| {
                m.id() == member_id
                    && m.state() == foca::State::Suspect
                    && m.incarnation() == *incarnation
            }),
            _ => true,
        }
    }

    /// Give a held suspect-to-down timer to foca, but only if the member is still suspect
    /// under its incarnation. foca checks the incarnation before declaring the member down,
    /// yet sends it `TurnUndead` either way; a member that had refuted the suspicion then
    /// takes itself for declared down and rejoins under a new epoch (with 1,000 writes/s
    /// into 20 agents on two cores, 8 to 17 healthy agents a run did so; none since).
    pub(super) fn deliver_suspicion(&mut self, timer: foca::Timer<Identity>) {
        if !self.suspect_under(&timer) {
            return;
        }
        let _ = self.foca.handle_timer(timer, &mut self.rt);
        self.after_foca();
    }

    /// The long suspicion timeout of a held suspect ran out: unless it was cut short or
    /// refuted meanwhile, ask the suspect itself first (the last check).
    pub(super) fn suspicion_ran_out(&mut self, t: foca::Timer<Identity>) {
        let foca::Timer::ChangeSuspectToDown { member_id, .. } = &t else {
            return;
        };
        // The long timeout: only if still held (not cut short already), and not
        // yet: first a last check of the suspect itself.
        let member = *member_id;
        if !self
            .held
            .get(&member.addr())
            .is_some_and(|h| h.timer == t && h.confirming.is_none())
        {
            return;
        }
        if !self.suspect_under(&t) {
            self.held.remove(&member.addr()); // refuted by itself meanwhile
            return;
        }
        self.confirm_round += 1;
        let round = self.confirm_round;
        if let Some(h) = self.held.get_mut(&member.addr()) {
            h.confirming = Some(round);
        }
        self.out.push(Output::Confirm { member, round });
        self.schedule(
            CONFIRM_BACKSTOP,
            TimerKind::ConfirmTimeout(member.addr(), round),
        );
    }
}
