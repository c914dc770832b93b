//! The tombstone collector: a tombstone goes once it has been held for the TTL while this
//! agent was in touch with its region (the horizon: what was held a TTL ago, sampled from
//! store revisions), in bounded passes.

use std::time::Duration;

use super::Gossip;

/// Tombstones one collection pass takes at most (the store sends them to its writer in
/// bounded requests).
const COLLECT_PASS: usize = 65_536;

/// Collect tombstones, in passes every `ttl / 8` (at most every minute, at least every
/// second). A tombstone goes when its timestamp is older than `ttl` and this store has held
/// it for `ttl` while in touch with the region: each pass that finds at least one member
/// alive and at least one anti-entropy session completed since the previous pass (or the
/// agent runs alone: no seeds, and nobody ever joined it) records the store's revision; tombstones committed at or
/// below the revision recorded `ttl` ago may go. So a timestamp that was old on arrival, or
/// a deletion made while cut off, waits `ttl` from when the region could have it. After a
/// restart nothing is recorded yet: nothing goes for `ttl`.
pub(super) async fn collect_tombstones(
    gossip: Gossip,
    ttl: Duration,
    alone: bool,
    beat: patina_watchdog::Beat,
) {
    let every = (ttl / 8).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let store = gossip.store.clone();
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let mut horizon = Horizon::new(ttl, alone);
    let mut sessions_seen = gossip
        .sync_counters
        .completed
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut stamp = tokio::time::interval(patina_watchdog::STAMP_EVERY);
    loop {
        // Stamps its beat while it waits for the next pass.
        loop {
            beat.stamp();
            tokio::select! {
                _ = tick.tick() => break,
                _ = stamp.tick() => {}
            }
        }
        let sessions = gossip
            .sync_counters
            .completed
            .load(std::sync::atomic::Ordering::Relaxed);
        let synced = sessions > sessions_seen;
        sessions_seen = sessions;
        let members = gossip.snapshot().await.map_or(0, |s| {
            s.members
                .iter()
                .filter(|m| m.state == crate::node::MemberState::Alive)
                .count()
        });
        let now = std::time::Instant::now();
        let Some(max_rev) = horizon.pass(now, members, synced, store.stats().revision) else {
            continue;
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let before = now_ms.saturating_sub(ttl_ms);
        // A pass walks every key and hands the writer its deletions in chunks: it may take
        // seconds after a mass deletion. The beat is stamped while it waits for the store
        // (whose writer has a beat of its own): this loop is late only when its task is.
        let pass = store.collect_tombstones(before, max_rev, COLLECT_PASS);
        tokio::pin!(pass);
        let collected = loop {
            beat.stamp();
            tokio::select! {
                done = &mut pass => break done,
                _ = stamp.tick() => {}
            }
        };
        match collected {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                collected = n,
                ttl_secs = ttl.as_secs(),
                "tombstones collected"
            ),
            Err(e) if store.failure().is_some() => {
                tracing::warn!(error = %e, "tombstone collection: the store failed");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "tombstone collection refused; next pass retries"),
        }
    }
}

/// Which revisions a store has held for a TTL while in touch with the region: the
/// collector's record, one pass at a time.
struct Horizon {
    ttl: Duration,
    /// Configured without seeds.
    alone: bool,
    /// Some member was ever alive: a seed agent cut off now is not alone.
    joined: bool,
    /// (when, revision held then), oldest first; at most one per `ttl / 64`, pruned to the
    /// newest one older than `ttl`: about 65 entries.
    held: std::collections::VecDeque<(std::time::Instant, u64)>,
}

impl Horizon {
    fn new(ttl: Duration, alone: bool) -> Horizon {
        Horizon {
            ttl,
            alone,
            joined: false,
            held: Default::default(),
        }
    }

    /// One pass: `members` alive now, whether a session completed since the last pass, the
    /// store's revision now. Returns the highest revision held for a TTL while in touch, if
    /// any.
    fn pass(
        &mut self,
        now: std::time::Instant,
        members: usize,
        synced: bool,
        revision: u64,
    ) -> Option<u64> {
        self.joined |= members > 0;
        let in_touch = (self.alone && !self.joined) || (members > 0 && synced);
        let spaced = self
            .held
            .back()
            .is_none_or(|(last, _)| now.duration_since(*last) >= self.ttl / 64);
        if in_touch && spaced {
            self.held.push_back((now, revision));
        }
        while self.held.len() > 1 && now.duration_since(self.held[1].0) >= self.ttl {
            self.held.pop_front();
        }
        self.held
            .front()
            .filter(|(at, _)| now.duration_since(*at) >= self.ttl)
            .map(|(_, rev)| *rev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_what_was_held_a_ttl_ago_while_in_touch() {
        let t0 = std::time::Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut h = Horizon::new(Duration::from_secs(64), false);
        assert_eq!(
            h.pass(s(0), 3, true, 10),
            None,
            "nothing held for a TTL yet"
        );
        // Cut off (no member, or no session): nothing is recorded.
        assert_eq!(h.pass(s(10), 0, false, 20), None);
        assert_eq!(h.pass(s(20), 3, false, 30), None);
        assert_eq!(h.pass(s(64), 3, true, 40), Some(10));
        assert_eq!(h.pass(s(70), 3, true, 50), Some(10));
        // The record at 64 s comes of age at 128 s; 10 and 20 / 30 never were recorded.
        assert_eq!(h.pass(s(128), 3, true, 60), Some(40));
        // A deletion made while cut off waits a TTL from when the region could have it.
        let mut cut = Horizon::new(Duration::from_secs(64), false);
        for t in 0..100 {
            assert_eq!(cut.pass(s(t), 0, false, t), None);
        }
        assert_eq!(cut.pass(s(100), 2, true, 100), None);
        assert_eq!(cut.pass(s(164), 2, true, 164), Some(100));
    }

    #[test]
    fn an_agent_without_seeds_is_alone_until_someone_joins() {
        let t0 = std::time::Instant::now();
        let s = |secs: u64| t0 + Duration::from_secs(secs);
        let mut h = Horizon::new(Duration::from_secs(64), true);
        assert_eq!(h.pass(s(0), 0, false, 5), None);
        assert_eq!(
            h.pass(s(64), 0, false, 9),
            Some(5),
            "alone: in touch with itself"
        );
        // Joined once, then cut off: no longer alone, nothing new is recorded.
        assert_eq!(h.pass(s(70), 1, false, 12), Some(5));
        assert_eq!(h.pass(s(200), 0, false, 30), Some(9));
        assert_eq!(
            h.pass(s(400), 0, false, 40),
            Some(9),
            "nothing recorded since"
        );
    }

    #[test]
    fn the_record_stays_small_whatever_the_ttl() {
        let t0 = std::time::Instant::now();
        let mut h = Horizon::new(Duration::from_secs(64_000), false);
        for t in 0..100_000u64 {
            h.pass(t0 + Duration::from_secs(t), 1, true, t);
        }
        assert!(h.held.len() <= 66, "{} records", h.held.len());
    }
}
