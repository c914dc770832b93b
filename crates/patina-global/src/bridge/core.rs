//! [`BridgeCore`]: a bridge's decisions, with no I/O (the runner and the simulator drive it).
//!
//! It folds its region's Watch stream into per-app counts, learns what the global tier holds
//! for its region's keys, and says what to publish and when:
//!
//! - a change the bridge saw in its region (news) is published once the bridge's view is
//!   newer than the stamp of the summary that stands, at once when an app's healthy count
//!   goes to or from zero, else coalesced (at most `coalesce`);
//! - a summary that stands but disagrees with the bridge's view (no news) is replaced only
//!   when the bridge's view is newer by more than `settle`: a bridge that follows a lagging
//!   region agent must not undo a fresher bridge's down news;
//! - a key with no summary standing (its bridge died, so its summary is hidden) is published
//!   at once: that is how surviving bridges take over a dead one's summaries.
//!
//! Nothing is published before the bridge's first complete snapshot of its region, and a
//! snapshot that replaces the view (after a reset) is applied whole at its end.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use patina_proto::v1::watch_response::Kind;
use patina_proto::v1::{Health, MachineState, WatchResponse, machine_change};

/// Healthy and total instances of one app in the region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub healthy: u32,
    pub total: u32,
}

/// The summary that stands in the global tier for one of the region's apps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    pub counts: Counts,
    pub view_hlc: u64,
}

/// What stands in the global tier for one of the region's apps, as the bridge's own store
/// shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    /// No summary (never published, or deleted).
    Nothing,
    /// A summary whose bridge is down: hidden by the liveness overlay, and back if that
    /// bridge returns, so it must be replaced even when the view has no instances.
    Hidden,
    Summary(Held),
}

/// A summary to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub app: Arc<str>,
    pub counts: Counts,
    pub view_hlc: u64,
    /// Delete the summary instead: it has said zero instances for `Timing::zero_retain`
    /// and the view still says so (apps come and go; their summaries must not pile up).
    pub delete: bool,
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// Count changes that keep an app above zero wait at most this long (coalesced).
    pub coalesce: Duration,
    /// How much newer this bridge's view must be to replace a disagreeing summary without
    /// news: more than replication takes between the region's agents.
    pub settle: Duration,
    /// How long a zero summary (an app that left the region) stands before it is deleted.
    /// Long enough for every edge to have seen the zero, and longer than
    /// `record::DELETE_LAG_MS` (or the deletion would lose to the zero it deletes); the
    /// deletion's tombstone is then collected after the tombstone TTL.
    pub zero_retain: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            coalesce: Duration::from_millis(500),
            settle: Duration::from_secs(2),
            zero_retain: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
struct MachineView {
    app: Arc<str>,
    routable: bool,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    at: Duration,
    news: bool,
}

pub struct BridgeCore {
    timing: Timing,
    machines: HashMap<Box<str>, MachineView>,
    /// The snapshot under way (after a reset), applied whole when it is done.
    staging: Option<HashMap<Box<str>, MachineView>>,
    counts: HashMap<Arc<str>, Counts>,
    /// The region view: the `view_hlc` of the latest message applied (never goes back).
    view_hlc: u64,
    /// The view of the snapshot under way, which becomes `view_hlc` when it is complete.
    staging_view: u64,
    synced: bool,
    /// Did the latest message applied come from a view that stands (`WatchResponse.view`)?
    /// Only a standing view is published from, stamps a summary or advances the view: an
    /// agent cut off from its region, restarted empty or of another region shows a view that
    /// is fresh and wrong, and the edges must keep the last good state instead.
    standing: bool,
    held: HashMap<Arc<str>, Standing>,
    pending: HashMap<Arc<str>, Pending>,
    /// Per app, replacements made without news in a row, and when the last was: each
    /// doubles the margin the next needs, so two bridges whose agents disagree for good (a
    /// region split in two) do not overwrite each other every few seconds for ever. Forgotten
    /// after [`OVERRIDES_FORGOTTEN`] without one, and on news.
    overrides: HashMap<Arc<str>, (u32, Duration)>,
    /// Replacements decided without news, not yet known to be written.
    replacing: HashSet<Arc<str>>,
    /// Per app, the view at which a write over a hidden or missing summary lost (a summary
    /// from a newer view stands, hidden): not tried again until the view moves past it.
    lost: HashMap<Arc<str>, u64>,
    /// Since when a zero summary has stood for an app with no instance in the view.
    zero_since: HashMap<Arc<str>, Duration>,
    last_sweep: Duration,
}

/// How often summaries that disagree with the view without news are looked at again.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// How long a run of replacements without news is remembered.
const OVERRIDES_FORGOTTEN: Duration = Duration::from_secs(600);

impl BridgeCore {
    pub fn new(timing: Timing) -> BridgeCore {
        BridgeCore {
            timing,
            machines: HashMap::new(),
            staging: None,
            counts: HashMap::new(),
            view_hlc: 0,
            staging_view: 0,
            synced: false,
            standing: false,
            held: HashMap::new(),
            pending: HashMap::new(),
            overrides: HashMap::new(),
            replacing: HashSet::new(),
            lost: HashMap::new(),
            zero_since: HashMap::new(),
            last_sweep: Duration::ZERO,
        }
    }

    /// The view of the region (its agents' clock) as of the latest message applied.
    pub fn view_hlc(&self) -> u64 {
        self.view_hlc
    }

    /// Has a complete snapshot of the region been applied, and is none under way?
    pub fn synced(&self) -> bool {
        self.synced && self.staging.is_none()
    }

    /// May the bridge publish (and heartbeat) now: synced, from a view that stands?
    pub fn publishing(&self) -> bool {
        self.synced() && self.standing
    }

    pub fn counts(&self, app: &str) -> Counts {
        self.counts.get(app).copied().unwrap_or_default()
    }

    /// Apps with instances in the view.
    pub fn apps(&self) -> usize {
        self.counts.len()
    }

    /// Apply one message of the region's Watch stream. The counts follow every message; the
    /// view advances, and publishing goes on, only with messages whose view stands.
    pub fn region_message(&mut self, now: Duration, msg: &WatchResponse) {
        let view_before = self.view_hlc;
        self.apply_region_message(now, msg);
        // The view a bridge stamps with never goes back, and moves only with a view that
        // stands.
        debug_assert!(self.view_hlc >= view_before, "the bridge's view went back");
        debug_assert!(
            self.view_hlc == view_before || msg.view.as_ref().is_some_and(|v| v.stands),
            "the bridge's view advanced from a view that does not stand"
        );
    }

    fn apply_region_message(&mut self, now: Duration, msg: &WatchResponse) {
        let stands = msg.view.as_ref().is_some_and(|v| v.stands);
        if msg.reset {
            self.staging = Some(HashMap::new());
            self.staging_view = 0;
        }
        // A snapshot's view counts only once it is complete: until then the counts are the
        // previous view's and must not be stamped with the new one.
        if !stands {
            self.standing = false;
        } else if self.staging.is_some() {
            self.staging_view = self.staging_view.max(msg.view_hlc);
        } else {
            self.view_hlc = self.view_hlc.max(msg.view_hlc);
            self.standing = true;
        }
        let kind = Kind::try_from(msg.kind).unwrap_or(Kind::Unspecified);
        for c in &msg.changes {
            let (id, view) = match &c.change {
                Some(machine_change::Change::Upserted(m)) => (
                    m.id.as_str(),
                    Some(MachineView {
                        app: self.intern(&m.app),
                        routable: m.state == MachineState::Started as i32
                            && m.health == Health::Passing as i32,
                    }),
                ),
                Some(machine_change::Change::Deleted(d)) => (d.id.as_str(), None),
                None => continue,
            };
            match (&mut self.staging, view) {
                (Some(staging), Some(v)) => {
                    staging.insert(id.into(), v);
                }
                (Some(staging), None) => {
                    staging.remove(id);
                }
                (None, view) => self.change_machine(now, id, view),
            }
        }
        if kind == Kind::SnapshotDone {
            if let Some(staging) = self.staging.take() {
                if stands {
                    self.view_hlc = self.view_hlc.max(self.staging_view);
                }
                self.replace_view(now, staging);
            }
            self.synced = true;
            self.standing = stands;
        }
    }

    /// The region's stream broke: a snapshot under way is dropped (the next stream starts
    /// another, or resumes where the view is), and nothing stands until a message says so.
    pub fn region_interrupted(&mut self) {
        self.staging = None;
        self.standing = false;
    }

    /// What the global tier holds for `app` in this bridge's region.
    pub fn global_summary(&mut self, now: Duration, app: &str, standing: Standing) {
        let app = self.intern(app);
        match standing {
            Standing::Summary(h) if h.counts == Counts::default() => {
                self.zero_since.entry(app.clone()).or_insert(now);
            }
            _ => {
                self.zero_since.remove(&app);
            }
        }
        match standing {
            Standing::Nothing => {
                self.held.remove(&app);
            }
            s => {
                self.held.insert(app.clone(), s);
            }
        }
        self.schedule(app, now, false);
    }

    /// What to publish now. The caller writes each and, once written, calls
    /// [`BridgeCore::published`]; a write that loses (a fresher summary stands) is dropped.
    pub fn due(&mut self, now: Duration) -> Vec<Publish> {
        if !self.publishing() {
            return Vec::new();
        }
        let mut ready: BTreeMap<Arc<str>, bool> = BTreeMap::new();
        self.pending.retain(|app, p| {
            if p.at <= now {
                ready.insert(app.clone(), p.news);
                false
            } else {
                true
            }
        });
        if now.saturating_sub(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            for app in self.counts.keys().chain(self.held.keys()) {
                if !self.pending.contains_key(app) {
                    ready.entry(app.clone()).or_insert(false);
                }
            }
        }
        let mut out = Vec::new();
        for (app, news) in ready {
            if news {
                self.overrides.remove(&app);
            }
            if let Some(p) = self.decide(now, &app, news) {
                if !news && matches!(self.held.get(&app), Some(Standing::Summary(_))) {
                    self.replacing.insert(app.clone());
                }
                out.push(p);
            }
        }
        out
    }

    /// A publish lost to a summary from a newer view (its write was refused as stale).
    pub fn lost(&mut self, p: &Publish) {
        self.replacing.remove(&p.app);
        self.lost.insert(p.app.clone(), p.view_hlc);
    }

    /// A publish was written (and stands, until the global tier says otherwise).
    pub fn published(&mut self, now: Duration, p: &Publish) {
        self.lost.remove(&p.app);
        if p.delete {
            self.replacing.remove(&p.app);
            self.zero_since.remove(&p.app);
            self.held.remove(&p.app);
            return;
        }
        if p.counts == Counts::default() {
            self.zero_since.entry(p.app.clone()).or_insert(now);
        }
        if self.replacing.remove(&p.app) {
            let o = self.overrides.entry(p.app.clone()).or_insert((0, now));
            o.0 = o.0.saturating_add(1);
            o.1 = now;
        }
        self.held.insert(
            p.app.clone(),
            Standing::Summary(Held {
                counts: p.counts,
                view_hlc: p.view_hlc,
            }),
        );
    }

    /// A publish could not be written (not a lost race: an overloaded or failing store):
    /// decide again shortly, as news.
    pub fn retry(&mut self, now: Duration, app: &str) {
        let app = self.intern(app);
        let at = now + Duration::from_millis(100);
        let p = self
            .pending
            .entry(app)
            .or_insert(Pending { at, news: true });
        p.news = true;
    }

    /// When [`BridgeCore::due`] next has something to do (`None`: not before the next input,
    /// since nothing is published while no complete view is held).
    pub fn next_due(&self) -> Option<Duration> {
        if !self.publishing() {
            return None;
        }
        let sweep = self.last_sweep + SWEEP_EVERY;
        self.pending
            .values()
            .map(|p| p.at)
            .min()
            .map_or(Some(sweep), |at| Some(at.min(sweep)))
    }

    fn decide(&mut self, now: Duration, app: &Arc<str>, news: bool) -> Option<Publish> {
        let want = self.counts(app);
        // A zero that has stood long enough, with no instance in the view: delete it.
        let zero = Counts::default();
        match self.held.get(app) {
            Some(Standing::Summary(h)) if h.counts == zero && want == zero => {
                let since = *self.zero_since.entry(app.clone()).or_insert(now);
                let lost_here = self.lost.get(app).is_some_and(|v| *v >= self.view_hlc);
                if now.saturating_sub(since) >= self.timing.zero_retain
                    && h.view_hlc < self.view_hlc
                    && !lost_here
                {
                    return Some(Publish {
                        app: app.clone(),
                        counts: zero,
                        view_hlc: self.view_hlc,
                        delete: true,
                    });
                }
                return None;
            }
            _ => {
                self.zero_since.remove(app);
            }
        }
        // Lost to a newer hidden view at this very view: wait for the view to move on.
        let lost_here = self.lost.get(app).is_some_and(|v| *v >= self.view_hlc);
        let publish = match self.held.get(app) {
            Some(Standing::Summary(h)) if h.counts == want => false,
            Some(Standing::Summary(h)) if news => h.view_hlc < self.view_hlc,
            Some(Standing::Summary(h)) => {
                let overrides = match self.overrides.get(app) {
                    Some((n, at)) if now.saturating_sub(*at) < OVERRIDES_FORGOTTEN => (*n).min(6),
                    _ => 0,
                };
                let margin = settle_hlc(self.timing.settle).saturating_mul(1 << overrides);
                h.view_hlc.saturating_add(margin) < self.view_hlc
            }
            // Hidden: its bridge may come back with it; replace it whatever the view holds.
            Some(Standing::Hidden) => !lost_here,
            Some(Standing::Nothing) | None => want.total > 0 && !lost_here,
        };
        publish.then(|| Publish {
            app: app.clone(),
            counts: want,
            view_hlc: self.view_hlc,
            delete: false,
        })
    }

    fn intern(&self, app: &str) -> Arc<str> {
        self.counts
            .get_key_value(app)
            .map(|(k, _)| k.clone())
            .or_else(|| self.held.get_key_value(app).map(|(k, _)| k.clone()))
            .unwrap_or_else(|| app.into())
    }

    fn change_machine(&mut self, now: Duration, id: &str, view: Option<MachineView>) {
        let old = match &view {
            Some(v) => self.machines.insert(id.into(), v.clone()),
            None => self.machines.remove(id),
        };
        if let Some(o) = &old {
            self.count(now, &o.app, o.routable, -1);
        }
        if let Some(v) = &view {
            self.count(now, &v.app, v.routable, 1);
        }
    }

    fn count(&mut self, now: Duration, app: &Arc<str>, routable: bool, delta: i64) {
        let c = self.counts.entry(app.clone()).or_default();
        let before = *c;
        c.total = (c.total as i64 + delta).max(0) as u32;
        if routable {
            c.healthy = (c.healthy as i64 + delta).max(0) as u32;
        }
        let after = *c;
        if after.total == 0 {
            self.counts.remove(app);
        }
        self.changed(now, app.clone(), before, after);
    }

    fn replace_view(&mut self, now: Duration, machines: HashMap<Box<str>, MachineView>) {
        let mut counts: HashMap<Arc<str>, Counts> = HashMap::new();
        for m in machines.values() {
            let c = counts.entry(m.app.clone()).or_default();
            c.total += 1;
            c.healthy += u32::from(m.routable);
        }
        let mut apps: BTreeMap<Arc<str>, (Counts, Counts)> = BTreeMap::new();
        for (app, c) in &self.counts {
            apps.entry(app.clone()).or_default().0 = *c;
        }
        for (app, c) in &counts {
            apps.entry(app.clone()).or_default().1 = *c;
        }
        self.machines = machines;
        self.counts = counts;
        for (app, (before, after)) in apps {
            self.changed(now, app, before, after);
        }
    }

    fn changed(&mut self, now: Duration, app: Arc<str>, before: Counts, after: Counts) {
        if before == after {
            return;
        }
        let urgent = (before.healthy == 0) != (after.healthy == 0);
        let at = if urgent {
            now
        } else {
            now + self.timing.coalesce
        };
        let p = self
            .pending
            .entry(app)
            .or_insert(Pending { at, news: true });
        p.at = p.at.min(at);
        p.news = true;
    }

    fn schedule(&mut self, app: Arc<str>, now: Duration, news: bool) {
        let p = self.pending.entry(app).or_insert(Pending { at: now, news });
        p.news |= news;
    }
}

/// A duration as a difference of hybrid logical clock values (milliseconds above 16 bits).
fn settle_hlc(d: Duration) -> u64 {
    (d.as_millis() as u64) << 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use patina_proto::v1::{Machine, MachineChange, MachineDeleted};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn hlc(ms: u64) -> u64 {
        ms << 16
    }

    fn machine(id: &str, app: &str, healthy: bool) -> MachineChange {
        MachineChange {
            change: Some(machine_change::Change::Upserted(Machine {
                id: id.into(),
                app: app.into(),
                state: MachineState::Started as i32,
                health: if healthy {
                    Health::Passing as i32
                } else {
                    Health::Critical as i32
                },
                ..Machine::default()
            })),
        }
    }

    fn deleted(id: &str, app: &str) -> MachineChange {
        MachineChange {
            change: Some(machine_change::Change::Deleted(MachineDeleted {
                id: id.into(),
                app: app.into(),
                version: None,
            })),
        }
    }

    fn msg(kind: Kind, reset: bool, view: u64, changes: Vec<MachineChange>) -> WatchResponse {
        WatchResponse {
            kind: kind as i32,
            reset,
            changes,
            resume_token: String::new(),
            view_hlc: view,
            region: "ord".into(),
            view: Some(patina_proto::v1::ViewStatus {
                stands: true,
                ..Default::default()
            }),
        }
    }

    /// [`msg`] from a view that does not stand.
    fn unstanding(
        kind: Kind,
        reset: bool,
        view: u64,
        changes: Vec<MachineChange>,
    ) -> WatchResponse {
        WatchResponse {
            view: Some(patina_proto::v1::ViewStatus {
                stands: false,
                reasons: vec![patina_proto::v1::ViewReason::NoMajority as i32],
                ..Default::default()
            }),
            ..msg(kind, reset, view, changes)
        }
    }

    fn synced_bridge() -> BridgeCore {
        let mut b = BridgeCore::new(Timing::default());
        b.region_message(
            ms(0),
            &msg(
                Kind::Snapshot,
                true,
                hlc(10),
                vec![machine("a", "web", true), machine("b", "web", true)],
            ),
        );
        assert!(
            b.due(ms(0)).is_empty(),
            "nothing before the snapshot is complete"
        );
        b.region_message(ms(0), &msg(Kind::SnapshotDone, false, hlc(11), vec![]));
        b
    }

    /// A synced bridge whose first summaries are written.
    fn published_bridge() -> BridgeCore {
        let mut b = synced_bridge();
        b.due(ms(0)).iter().for_each(|p| b.published(ms(0), p));
        b
    }

    #[test]
    fn a_view_that_does_not_stand_publishes_nothing_and_stamps_nothing() {
        let mut b = published_bridge();
        // The agent is cut off from its region: it hides both machines, from a view that does
        // not stand (fresher, and wrong).
        b.region_message(
            ms(100),
            &unstanding(
                Kind::Delta,
                false,
                hlc(50),
                vec![deleted("a", "web"), deleted("b", "web")],
            ),
        );
        assert!(!b.publishing());
        assert!(b.due(ms(100)).is_empty(), "the zero is not published");
        assert!(b.due(ms(5_000)).is_empty(), "nor later");
        assert_eq!(b.next_due(), None, "and the loop sleeps");
        assert_eq!(b.view_hlc(), hlc(11), "the view does not advance");
        // It stands again, with both machines back: nothing to say.
        b.region_message(
            ms(6_000),
            &msg(
                Kind::Delta,
                false,
                hlc(60),
                vec![machine("a", "web", true), machine("b", "web", true)],
            ),
        );
        assert!(b.publishing());
        assert!(b.due(ms(6_000)).is_empty(), "the standing summary is right");
        assert_eq!(b.view_hlc(), hlc(60));
        // A real loss, from a standing view, is published at once.
        b.region_message(
            ms(7_000),
            &msg(
                Kind::Delta,
                false,
                hlc(70),
                vec![deleted("a", "web"), deleted("b", "web")],
            ),
        );
        let p = b.due(ms(7_000));
        assert_eq!((p[0].counts, p[0].view_hlc), (Counts::default(), hlc(70)));
    }

    #[test]
    fn a_snapshot_that_does_not_stand_publishes_nothing_until_a_view_does() {
        // An agent restarted empty: its snapshot shows nothing, and its view does not stand.
        let mut b = published_bridge();
        b.region_message(ms(100), &unstanding(Kind::Snapshot, true, hlc(50), vec![]));
        b.region_message(
            ms(100),
            &unstanding(Kind::SnapshotDone, false, hlc(51), vec![]),
        );
        assert!(b.synced() && !b.publishing());
        assert!(b.due(ms(100)).is_empty() && b.due(ms(9_000)).is_empty());
        assert_eq!(b.view_hlc(), hlc(11));
        // An interruption: nothing stands until a message says so.
        b.region_message(ms(9_100), &msg(Kind::Delta, false, hlc(52), vec![]));
        assert!(b.publishing());
        b.region_interrupted();
        assert!(!b.publishing());
    }

    #[test]
    fn a_snapshot_then_changes_publish_counts_down_at_once_and_others_coalesced() {
        let mut b = synced_bridge();
        let p = b.due(ms(0));
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].counts,
            Counts {
                healthy: 2,
                total: 2
            }
        );
        assert_eq!(p[0].view_hlc, hlc(11));
        b.published(ms(0), &p[0]);
        // One goes unhealthy: 2 -> 1 healthy, coalesced.
        b.region_message(
            ms(10),
            &msg(
                Kind::Delta,
                false,
                hlc(20),
                vec![machine("a", "web", false)],
            ),
        );
        assert!(b.due(ms(10)).is_empty());
        let p = b.due(ms(510));
        assert_eq!(
            p[0].counts,
            Counts {
                healthy: 1,
                total: 2
            }
        );
        b.published(ms(0), &p[0]);
        // The last healthy one goes: at once.
        b.region_message(
            ms(600),
            &msg(Kind::Delta, false, hlc(30), vec![deleted("b", "web")]),
        );
        let p = b.due(ms(600));
        assert_eq!(
            p[0].counts,
            Counts {
                healthy: 0,
                total: 1
            }
        );
        assert_eq!(p[0].view_hlc, hlc(30));
    }

    #[test]
    fn a_fresher_disagreeing_summary_stands_until_the_view_is_newer_by_the_settle_time() {
        let mut b = published_bridge();
        // Another bridge saw a later view: web down to 0 healthy.
        let theirs = Held {
            counts: Counts {
                healthy: 0,
                total: 2,
            },
            view_hlc: hlc(5_000),
        };
        b.global_summary(ms(100), "web", Standing::Summary(theirs));
        assert!(b.due(ms(100)).is_empty(), "their view is newer");
        // Our view (a heartbeat) moves past theirs, but within the settle time: it stands.
        b.region_message(ms(200), &msg(Kind::Delta, false, hlc(6_000), vec![]));
        assert!(b.due(ms(2_000)).is_empty());
        // Past it: ours replaces it (our agent has had time to learn what theirs saw).
        b.region_message(ms(3_000), &msg(Kind::Delta, false, hlc(7_500), vec![]));
        let p = b.due(ms(3_000));
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].counts,
            Counts {
                healthy: 2,
                total: 2
            }
        );
    }

    #[test]
    fn a_missing_summary_is_taken_over_at_once() {
        let mut b = published_bridge();
        // Another bridge's newer summary stood, then its bridge died: hidden, so nothing stands.
        b.global_summary(
            ms(10),
            "web",
            Standing::Summary(Held {
                counts: Counts {
                    healthy: 2,
                    total: 2,
                },
                view_hlc: hlc(50),
            }),
        );
        assert!(b.due(ms(10)).is_empty(), "it agrees with ours");
        b.global_summary(ms(20), "web", Standing::Hidden);
        let p = b.due(ms(20));
        assert_eq!(p.len(), 1);
        // An app that left the region altogether publishes zero to replace what stands.
        b.published(ms(0), &p[0]);
        b.region_message(
            ms(30),
            &msg(
                Kind::Delta,
                false,
                hlc(60),
                vec![deleted("a", "web"), deleted("b", "web")],
            ),
        );
        let p = b.due(ms(30));
        assert_eq!(p[0].counts, Counts::default());
    }

    #[test]
    fn a_hidden_summary_is_replaced_even_by_zero_and_disagreements_back_off() {
        let mut b = published_bridge();
        b.region_message(
            ms(10),
            &msg(
                Kind::Delta,
                false,
                hlc(60),
                vec![deleted("a", "web"), deleted("b", "web")],
            ),
        );
        // Another bridge's summary stood and is hidden (its bridge is down): it would be back
        // if that bridge returned, so zero replaces it.
        b.global_summary(ms(10), "web", Standing::Hidden);
        let p = b.due(ms(10));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].counts, Counts::default());
        // A summary that disagrees without news is replaced after the settle time, then
        // after twice that, and so on.
        b.published(ms(0), &p[0]);
        let theirs = |view| {
            Standing::Summary(Held {
                counts: Counts {
                    healthy: 1,
                    total: 1,
                },
                view_hlc: hlc(view),
            })
        };
        b.global_summary(ms(20), "web", theirs(100));
        b.region_message(ms(20), &msg(Kind::Delta, false, hlc(2_200), vec![]));
        let p = b.due(ms(1_100));
        assert_eq!(p.len(), 1, "2.1 s newer: replaced");
        b.published(ms(1_100), &p[0]);
        b.global_summary(ms(1_200), "web", theirs(2_300));
        b.region_message(ms(1_300), &msg(Kind::Delta, false, hlc(4_400), vec![]));
        assert!(b.due(ms(2_400)).is_empty(), "the second time needs 4 s");
        b.region_message(ms(3_000), &msg(Kind::Delta, false, hlc(6_400), vec![]));
        assert_eq!(b.due(ms(3_500)).len(), 1);
        // A write that loses (a newer hidden view stands) is not tried again at the same
        // view, only once the view moves on.
        b.global_summary(ms(4_000), "web", Standing::Hidden);
        let p = b.due(ms(4_000));
        assert_eq!(p.len(), 1);
        b.lost(&p[0]);
        assert!(b.due(ms(5_100)).is_empty(), "same view: not again");
        b.region_message(ms(5_200), &msg(Kind::Delta, false, hlc(7_000), vec![]));
        assert_eq!(b.due(ms(6_300)).len(), 1, "the view moved on");
    }

    #[test]
    fn a_snapshot_under_way_publishes_nothing_and_stamps_nothing() {
        let mut b = published_bridge();
        b.region_message(ms(10), &msg(Kind::Snapshot, true, hlc(90), vec![]));
        assert_eq!(
            b.view_hlc(),
            hlc(11),
            "the old view until the snapshot is done"
        );
        assert!(!b.synced());
        b.global_summary(ms(20), "web", Standing::Hidden);
        assert!(
            b.due(ms(2_000)).is_empty(),
            "nothing while the counts are the old view's"
        );
        b.region_message(ms(30), &msg(Kind::SnapshotDone, false, hlc(91), vec![]));
        assert_eq!(b.view_hlc(), hlc(91));
        let p = b.due(ms(3_000));
        assert_eq!(p[0].view_hlc, hlc(91));
    }

    #[test]
    fn a_zero_summary_is_deleted_once_it_has_stood_long_enough() {
        let mut b = published_bridge();
        b.region_message(
            ms(10),
            &msg(
                Kind::Delta,
                false,
                hlc(20),
                vec![deleted("a", "web"), deleted("b", "web")],
            ),
        );
        let p = b.due(ms(10));
        assert_eq!((p[0].counts, p[0].delete), (Counts::default(), false));
        b.published(ms(10), &p[0]);
        b.region_message(ms(20), &msg(Kind::Delta, false, hlc(30), vec![]));
        assert!(b.due(ms(300_000)).is_empty(), "not yet");
        let p = b.due(ms(601_000));
        assert_eq!(p.len(), 1);
        assert!(p[0].delete);
        b.published(ms(601_000), &p[0]);
        assert!(
            b.due(ms(700_000)).is_empty(),
            "deleted: nothing stands, nothing to say"
        );
        // The app comes back: published as news.
        b.region_message(
            ms(700_100),
            &msg(
                Kind::Delta,
                false,
                hlc(800),
                vec![machine("c", "web", true)],
            ),
        );
        let p = b.due(ms(700_100));
        assert_eq!((p[0].counts.healthy, p[0].delete), (1, false));
    }

    #[test]
    fn a_reset_replaces_the_view_whole_at_its_end() {
        let mut b = published_bridge();
        b.region_message(
            ms(10),
            &msg(
                Kind::Snapshot,
                true,
                hlc(40),
                vec![machine("c", "api", true)],
            ),
        );
        assert_eq!(
            b.counts("web").total,
            2,
            "the old view serves until the snapshot is done"
        );
        b.region_message(ms(10), &msg(Kind::SnapshotDone, false, hlc(41), vec![]));
        assert_eq!(b.counts("web"), Counts::default());
        let mut p = b.due(ms(10));
        p.sort_by(|a, b| a.app.cmp(&b.app));
        assert_eq!(p.len(), 2);
        assert_eq!((&*p[0].app, p[0].counts.healthy), ("api", 1));
        assert_eq!((&*p[1].app, p[1].counts.total), ("web", 0));
    }
}
