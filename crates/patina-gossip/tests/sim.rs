//! The seeded cluster simulation: many nodes in one process on virtual time, with loss,
//! delay, duplication, partitions, crashes, restarts and pauses. Every run must converge to
//! identical state on every live node, and once failure detection has fired no live node may
//! list a crashed node's machines.
//!
//! `PATINA_SIM_SEED=N` replays one seed; `PATINA_SIM_RUNS=N` runs that many seeds (default 4;
//! set it higher for a longer search). A failing run prints the command that replays it.

use std::collections::BTreeSet;
use std::time::Duration;

use patina_gossip::sim::{Net, World};
use patina_gossip::wire::{Item, Push};
use patina_gossip::{ClusterName, Config, Dissemination, Envelope};
use patina_store::{Digest, NodeId};
use rand::RngExt;

fn config() -> Config {
    Config::lan(ClusterName::new("sim").unwrap())
}

fn seeds() -> Vec<u64> {
    patina_gossip::sim::seeds(4, 0x9a71_0000)
}

/// Run `scenario` for every seed; on a failure, say how to replay it.
fn for_seeds(name: &str, scenario: impl Fn(u64) -> u64 + std::panic::RefUnwindSafe) {
    for seed in seeds() {
        if let Err(e) = std::panic::catch_unwind(|| scenario(seed)) {
            eprintln!(
                "simulation {name} failed; rerun with PATINA_SIM_SEED={seed} cargo test -p patina-gossip --test sim {name}"
            );
            std::panic::resume_unwind(e);
        }
    }
}

/// A node's digest without origins it knows nothing of (every store lists its own origin,
/// at head 0 before its first write).
fn digest(w: &World, i: usize) -> Digest {
    w.digest(i)
        .into_iter()
        .filter(|(_, k)| k.head() > 0)
        .collect()
}

/// Every live node holds the same records and the same digest.
fn assert_converged(w: &World, keys: &BTreeSet<String>) {
    let live: Vec<usize> = (0..w.len()).filter(|i| w.is_up(*i)).collect();
    let first = live[0];
    let held = w.held(first, keys);
    let known = digest(w, first);
    for &i in &live[1..] {
        let other = w.held(i, keys);
        let differ: Vec<&String> = keys
            .iter()
            .filter(|k| other.get(*k) != held.get(*k))
            .collect();
        assert!(
            differ.is_empty(),
            "node {i} holds other records than node {first}: {differ:?}"
        );
        let d = digest(w, i);
        let differ: Vec<_> = d
            .iter()
            .filter(|(o, k)| known.get(o) != Some(k))
            .chain(known.iter().filter(|(o, _)| !d.contains_key(o)))
            .collect();
        assert!(
            differ.is_empty(),
            "node {i} knows otherwise than node {first}: {differ:?}"
        );
    }
}

const NODES: usize = 100;

/// Churn, loss, duplication, a partition that heals, crashes and restarts, a paused node.
fn chaos(seed: u64) -> u64 {
    chaos_with(seed, config())
}

fn chaos_with(seed: u64, cfg: Config) -> u64 {
    let net = Net {
        loss: 0.05,
        duplicate: 0.02,
        ..Net::lan()
    };
    let mut w = World::new(NODES, cfg, net, seed);
    w.run_for(Duration::from_secs(5));
    let mut keys = BTreeSet::new();
    let crashed = 7;
    // The node that will crash owns a machine, so that hiding it is checked on every seed.
    w.write(crashed, "owned-by-7", "app", b"+v");
    keys.insert("owned-by-7".to_string());
    for round in 0..40u32 {
        for _ in 0..5 {
            let i = w.rng().random_range(0..NODES);
            let key = format!("m{}", w.rng().random_range(0..200u32));
            if w.rng().random_bool(0.1) {
                w.delete(i, &key);
            } else {
                w.write(i, &key, "app", format!("+v{round}").as_bytes());
            }
            keys.insert(key);
        }
        match round {
            5 => w.partition(
                &(0..NODES / 2).collect::<Vec<_>>(),
                &(NODES / 2..NODES).collect::<Vec<_>>(),
            ),
            12 => w.heal(),
            15 => w.crash(crashed),
            18 => w.pause(3, Duration::from_secs(2)),
            25 => w.crash(11),
            30 => w.restart(11),
            _ => {}
        }
        w.run_for(Duration::from_millis(250));
    }
    // Quiesce: no faults, several sync intervals.
    w.net.loss = 0.0;
    w.net.duplicate = 0.0;
    w.run_for(Duration::from_secs(30));
    assert_converged(&w, &keys);
    // The crashed node's machines are listed nowhere (and the check is not vacuous).
    assert!(
        w.held(0, &keys)["owned-by-7"].is_some(),
        "the crashed node's machine reached the others"
    );
    let dead = w.node_id(crashed);
    for i in (0..NODES).filter(|i| w.is_up(*i)) {
        let listed = w.served(i);
        assert!(
            listed.values().all(|(owner, _)| *owner != dead),
            "node {i} still lists machines of crashed node {crashed}"
        );
    }
    w.trace()
}

#[test]
fn a_hundred_nodes_converge_through_loss_partitions_crashes_and_pauses() {
    for_seeds("a_hundred_nodes", |seed| {
        chaos(seed);
        0
    });
}

#[test]
fn a_hundred_nodes_converge_through_the_same_faults_with_tree_dissemination() {
    for_seeds("a_hundred_nodes_tree", |seed| {
        chaos_with(
            seed,
            Config {
                dissemination: Dissemination::Tree,
                ..config()
            },
        );
        0
    });
}

/// Tree dissemination: once an origin's tree has formed, its change reaches every node with
/// no duplicate copy (no prune is sent), and when an interior node of the tree crashes, the
/// nodes below it graft onto announcers and get the next change within a second or two,
/// long before any anti-entropy round (a minute apart here).
#[test]
fn a_tree_forms_without_duplicates_and_grafts_around_a_crashed_parent() {
    for_seeds("a_tree_forms", |seed| {
        const N: usize = 40;
        let cfg = Config {
            dissemination: Dissemination::Tree,
            sync_interval: Duration::from_secs(60),
            ..config()
        };
        let mut w = World::new(N, cfg, Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        let writer = 0;
        let origin = w.node_id(writer);
        let prunes = |w: &World| -> u64 {
            (0..N)
                .filter_map(|i| w.node(i))
                .map(|n| n.counters().tree_prunes_sent)
                .sum()
        };
        let grafts = |w: &World| -> u64 {
            (0..N)
                .filter_map(|i| w.node(i))
                .map(|n| n.counters().tree_grafts_sent)
                .sum()
        };
        for k in 0..3 {
            w.write(writer, &format!("warm-{k}"), "app", b"+v");
            w.run_for(Duration::from_millis(500));
        }
        assert!(
            prunes(&w) > 0,
            "the first change flooded the views: duplicates pruned"
        );
        let before = prunes(&w);
        w.write(writer, "settled", "app", b"+v");
        w.run_for(Duration::from_millis(500));
        for i in 0..N {
            if !w.served(i).contains_key("settled") {
                // Who would push to it, and what it counted: the failure's context.
                let me = w.node(i).unwrap().identity();
                let feeders: Vec<usize> = (0..N)
                    .filter(|j| {
                        w.node(*j)
                            .is_some_and(|n| n.tree_targets(origin).contains(&me))
                    })
                    .collect();
                panic!(
                    "node {i} lacks it; fed by {feeders:?}; {:?} {:?}",
                    w.node(i).unwrap().counters(),
                    w.node(i).unwrap().tree_sizes()
                );
            }
        }
        assert_eq!(prunes(&w), before, "a formed tree delivered a duplicate");
        // A record too large for a datagram goes down the tree as a notice; anti-entropy
        // fetches it.
        w.write(writer, "large", "app", &[b'+'; 3000]);
        w.run_for(Duration::from_secs(1));
        for i in 0..N {
            assert!(
                w.served(i).contains_key("large"),
                "node {i} lacks the large record"
            );
        }
        // The node that pushes the writer's changes to the most others.
        let parent = (1..N)
            .max_by_key(|i| w.node(*i).map_or(0, |n| n.tree_targets(origin).len()))
            .expect("nodes");
        let children = w.node(parent).map_or(0, |n| n.tree_targets(origin).len());
        assert!(children > 0, "no interior node in the writer's tree");
        w.crash(parent);
        let grafts_before = grafts(&w);
        w.write(writer, "after-crash", "app", b"+v");
        w.run_for(Duration::from_secs(2));
        for i in (0..N).filter(|i| *i != parent) {
            assert!(
                w.served(i).contains_key("after-crash"),
                "node {i} lacks the change 2 s after its parent ({parent}, {children} children) crashed"
            );
        }
        assert!(grafts(&w) > grafts_before, "nobody grafted");
        0
    });
}

#[test]
fn one_seed_replays_exactly() {
    let seed = seeds()[0];
    assert_eq!(chaos(seed), chaos(seed), "two runs of seed {seed} differ");
}

/// Down news needs no write: a crashed owner's machines vanish from every listing once the
/// membership declares it down, and return when it restarts.
#[test]
fn a_crashed_owner_is_hidden_everywhere_and_returns_on_restart() {
    for_seeds("a_crashed_owner", |seed| {
        let mut w = World::new(20, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        w.write(4, "m4", "app", b"+up");
        w.run_for(Duration::from_secs(1));
        for i in 0..20 {
            assert!(w.served(i).contains_key("m4"), "node {i} lacks m4");
        }
        w.crash(4);
        w.run_for(Duration::from_secs(5));
        for i in (0..20).filter(|i| *i != 4) {
            assert!(!w.served(i).contains_key("m4"), "node {i} still lists m4");
        }
        w.restart(4);
        w.run_for(Duration::from_secs(5));
        for i in 0..20 {
            assert!(
                w.served(i).contains_key("m4"),
                "node {i} did not show m4 again"
            );
        }
        0
    });
}

/// A node that was away when an owner died learns of the death as an already-down member
/// (foca sends no MemberDown for a member it never saw up) and must hide its records too.
#[test]
fn a_returning_node_hides_an_owner_that_died_while_it_was_away() {
    for_seeds("a_returning_node", |seed| {
        let mut w = World::new(10, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        w.write(4, "m4", "app", b"+up");
        w.run_for(Duration::from_secs(1));
        assert!(w.served(6).contains_key("m4"), "node 6 lacks m4");
        w.crash(6);
        w.crash(4);
        w.run_for(Duration::from_secs(5));
        w.restart(6);
        // Up to OWNERLESS_AFTER sync intervals, plus one round.
        w.run_for(Duration::from_secs(20));
        for i in (0..10).filter(|i| *i != 4) {
            assert!(!w.served(i).contains_key("m4"), "node {i} still lists m4");
        }
        0
    });
}

/// Lifeguard: a member that keeps stalling (SIGSTOP/SIGCONT cycles, a starved CPU) must not get
/// healthy members declared down. It stops 150 ms of every 500 ms for 60 s, as in
/// `cargo xtask bench propagation`, and then 1.5 s of every 3 s.
#[test]
fn a_stalling_member_gets_no_healthy_member_declared_down() {
    for_seeds("a_stalling_member", |seed| {
        let mut w = World::new(20, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(5));
        let starved = 3;
        for (stop, every, cycles) in [(150u64, 500u64, 120), (1500, 3000, 10)] {
            for _ in 0..cycles {
                w.pause(starved, Duration::from_millis(stop));
                w.run_for(Duration::from_millis(every));
            }
        }
        w.run_for(Duration::from_secs(5));
        let healthy_downs: u64 = w
            .downs
            .iter()
            .filter(|(n, _)| **n != w.node_id(starved))
            .map(|(_, c)| c)
            .sum();
        assert_eq!(
            healthy_downs, 0,
            "healthy members were declared down: {:?}",
            w.downs
        );
        let healthy_renewals: u64 = w
            .renewals
            .iter()
            .filter(|(i, _)| **i != starved)
            .map(|(_, c)| c)
            .sum();
        assert_eq!(
            healthy_renewals, 0,
            "healthy members took themselves for down: {:?}",
            w.renewals
        );
        0
    });
}

/// The last check: a member whose datagrams nobody receives (so its refutations never
/// arrive) but whose gossip loop answers over gRPC is suspected again and again and never
/// declared down; once it stops answering (paused), it goes down.
#[test]
fn a_suspect_that_answers_the_last_check_stays_and_a_silent_one_goes() {
    for_seeds("a_suspect_that_answers", |seed| {
        let n = 12;
        let mut w = World::new(n, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(5));
        let muted = 5;
        for j in (0..n).filter(|j| *j != muted) {
            w.drop_datagrams(muted, j);
        }
        w.run_for(Duration::from_secs(20));
        assert_eq!(
            w.downs.get(&w.node_id(muted)).copied().unwrap_or(0),
            0,
            "a member that answered its last checks was declared down"
        );
        assert_eq!(
            w.renewals.values().sum::<u64>(),
            0,
            "members took themselves for down: {:?}",
            w.renewals
        );
        let refuted: u64 = (0..n)
            .filter_map(|i| w.node(i))
            .map(|node| node.counters().refuted_for_others)
            .sum();
        assert!(refuted > 0, "nobody suspected the muted member");
        // Silent now: paused, it answers nothing.
        w.pause(muted, Duration::from_secs(15));
        w.run_for(Duration::from_secs(10));
        assert!(
            w.downs.get(&w.node_id(muted)).copied().unwrap_or(0) > 0,
            "a member that stopped answering was never declared down"
        );
        0
    });
}

/// Origin retirement: an origin whose agent is gone for good and whose records were all
/// superseded leaves every digest; when its agent comes back after all and writes, the new
/// number takes the origin back and the write reaches everyone.
#[test]
fn a_long_gone_fully_covered_origin_retires_everywhere_and_returns_with_its_agent() {
    for_seeds("a_long_gone_origin", |seed| {
        let cfg = Config {
            retire_after: Duration::from_secs(20),
            ..config()
        };
        let n = 10;
        let mut w = World::new(n, cfg, Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        let gone = 4;
        let origin = w.node_id(gone);
        w.write(gone, "m4", "app", b"+first");
        w.run_for(Duration::from_secs(1));
        w.write(2, "m4", "app", b"+taken-over");
        w.run_for(Duration::from_secs(1));
        w.crash(gone);
        // Down, then gone and fully covered for `retire_after`, then a sync round or two.
        w.run_for(Duration::from_secs(45));
        for i in (0..n).filter(|i| *i != gone) {
            assert!(
                !w.store(i).digest().contains_key(&origin),
                "node {i} still lists the gone origin"
            );
            assert!(w.store(i).is_retired(origin), "node {i} did not retire it");
        }
        w.restart(gone);
        w.run_for(Duration::from_secs(3));
        w.write(gone, "m4b", "app", b"+back");
        w.run_for(Duration::from_secs(3));
        for i in 0..n {
            assert!(
                w.served(i).contains_key("m4b"),
                "node {i} lacks the returned agent's write"
            );
            assert!(!w.store(i).is_retired(origin));
        }
        0
    });
}

/// A member paused for a second (a GC pause, a VM migration) is suspected, refutes when it
/// runs again, and must then stay what it was: not declared down, and not told it was (foca
/// sends `TurnUndead` with every suspect-to-down timeout it is given, even one it then does
/// not apply, so the node gives it only timeouts of members still suspect).
#[test]
fn a_member_that_refuted_a_suspicion_is_not_turned_undead() {
    for_seeds("a_member_that_refuted", |seed| {
        let n = 12;
        let mut w = World::new(n, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(5));
        let paused = 7;
        for _ in 0..5 {
            w.pause(paused, Duration::from_millis(1_000));
            w.run_for(Duration::from_secs(6));
        }
        assert_eq!(
            w.downs.get(&w.node_id(paused)).copied().unwrap_or(0),
            0,
            "a member paused for 1 s was declared down"
        );
        assert_eq!(
            w.renewals.values().sum::<u64>(),
            0,
            "a member that refuted took itself for down: {:?}",
            w.renewals
        );
        0
    });
}

/// Anti-entropy sessions run while every node writes and applies pushes: each session's hello
/// and plan are a round trip apart, so writes land between them. Every session must finish:
/// a side that planned from a digest newer than its hello would send numbers it never
/// claimed, and its peer would abort (the region's propagation benchmark saw exactly this).
#[test]
fn anti_entropy_sessions_finish_while_writes_go_on() {
    for_seeds("anti_entropy_sessions_finish", |seed| {
        let net = Net {
            loss: 0.05,
            min_delay: Duration::from_micros(200),
            max_delay: Duration::from_millis(2),
            ..Net::lan()
        };
        let mut w = World::new(6, config(), net, seed);
        w.run_for(Duration::from_secs(3));
        let mut keys = BTreeSet::new();
        // Two writers, a write each per millisecond, for 8 s: sessions start on the gaps the
        // lost pushes open, and on the periodic rounds.
        for ms in 0..8_000u32 {
            for writer in [0, 1] {
                let key = format!("w{writer}-{}", ms % 300);
                w.write(writer, &key, "app", format!("+{ms}").as_bytes());
                keys.insert(key);
            }
            w.run_for(Duration::from_millis(1));
        }
        let during = w.session_counts;
        w.net.loss = 0.0;
        w.run_for(Duration::from_secs(20));
        assert_converged(&w, &keys);
        assert!(
            during.ok >= 10,
            "sessions ran while writes went on: {during:?}"
        );
        assert_eq!(
            w.session_counts.refused, 0,
            "no session is aborted for a batch outside its sender's claim: {:?}",
            w.session_counts
        );
        w.trace()
    });
}

/// A store that takes nothing for a while (a full disk, an overloaded writer) drops what it
/// was sent; it has refused nothing. Once space returns, the copies still travelling (pushes
/// forwarded, piggybacked items) and a session for what it noticed bring the change at once,
/// long before the next periodic round (30 s here). Reported as refused, the versions were
/// remembered and every copy ignored until that round.
#[test]
fn a_store_that_took_nothing_for_a_while_catches_up_when_space_returns() {
    for_seeds("a_store_that_took_nothing", |seed| {
        let cfg = Config {
            sync_interval: Duration::from_secs(30),
            ..config()
        };
        let mut w = World::new(8, cfg, Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        let full = 5;
        w.set_disk_full(full, true);
        let keys: BTreeSet<String> = (0..20).map(|k| format!("k{k}")).collect();
        for k in &keys {
            w.write(0, k, "app", b"+v");
        }
        w.run_for(Duration::from_millis(300));
        assert!(
            w.served(full).is_empty(),
            "a node whose disk is full took nothing"
        );
        w.set_disk_full(full, false);
        w.run_for(Duration::from_secs(3));
        let served = w.served(full);
        let missing: Vec<&String> = keys.iter().filter(|k| !served.contains_key(*k)).collect();
        assert!(
            missing.is_empty(),
            "3 s after space returned, node {full} still lacks {missing:?}"
        );
        w.trace()
    });
}

/// A UDP sender floods every agent with notices from 100,000 origins it invented (in pushes,
/// forged). Nothing it sent may pile up (notices only of origins of members seen up; a notice
/// is never pending), so a real write afterwards is still taken from its push by every node:
/// before, the notices filled `pending` to its bound and every later push was dropped.
#[test]
fn forged_notices_from_a_hundred_thousand_origins_leave_pushes_working() {
    for_seeds("forged_notices", |seed| {
        let cfg = Config {
            sync_interval: Duration::from_secs(30),
            ..config()
        };
        let nodes = 5;
        let mut w = World::new(nodes, cfg, Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        let envelope = Envelope::new(&ClusterName::new("sim").unwrap());
        for batch in 0..1_000u64 {
            let items = (0..100u64)
                .map(|k| {
                    let origin = NodeId(0x00f0_0000_0000 + batch * 100 + k);
                    Item::Notice { origin, seq: 7 }.to_bytes()
                })
                .collect();
            let push = Push {
                sender: NodeId(0xbad),
                hops: 3,
                tree: false,
                items,
            };
            let mut payload = Vec::new();
            push.encode(&mut payload);
            let mut datagram = Vec::new();
            envelope.seal(&payload, &mut datagram);
            for i in 0..nodes {
                w.inject(i, datagram.clone());
            }
        }
        w.run_for(Duration::from_millis(200));
        let mut dropped = Vec::new();
        for i in 0..nodes {
            let node = w.node(i).unwrap();
            let sizes = node.sizes();
            assert!(
                sizes.noticed <= nodes && sizes.pending <= 16,
                "node {i} holds what forged datagrams sent: {sizes:?}"
            );
            dropped.push(node.counters().items_dropped);
        }
        w.write(0, "real", "app", b"+v");
        w.run_for(Duration::from_millis(100));
        for (i, before) in dropped.into_iter().enumerate() {
            assert!(
                w.served(i).contains_key("real"),
                "node {i} lacks a real write 100 ms after it"
            );
            assert_eq!(
                w.node(i).unwrap().counters().items_dropped,
                before,
                "node {i} dropped a push after the flood"
            );
        }
        w.trace()
    });
}

/// One agent of a region is cut off from the others: it takes them for down one after
/// another and hides their records, from a view that must not stand while it does (a bridge
/// following it would publish the losses to every edge). When one of the others really dies,
/// the survivors hide it from views that stand again soon. After the heal and a session, the
/// cut-off agent's view stands again.
#[test]
fn an_isolated_node_hides_its_peers_only_from_a_view_that_does_not_stand() {
    for_seeds("an_isolated_node", |seed| {
        let nodes = 5;
        let mut w = World::new(nodes, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(8));
        for i in 0..nodes {
            w.write(i, &format!("m{i}"), "app", b"+v");
        }
        w.run_for(Duration::from_secs(2));
        for i in 0..nodes {
            let view = w.view(i);
            assert!(view.stands, "node {i} stands in a quiet region: {view:?}");
        }
        // Cut node 0 off: it hides all four others in time, never from a standing view.
        w.partition(&[0], &(1..nodes).collect::<Vec<_>>());
        w.run_for(Duration::from_secs(20));
        assert!(
            w.served(0).len() <= 1,
            "the cut-off node hid its peers' records"
        );
        let view = w.view(0);
        assert!(
            !view.stands,
            "the cut-off node's view does not stand: {view:?}"
        );
        assert_eq!(
            w.hides_standing.get(&0).copied().unwrap_or(0),
            0,
            "the cut-off node hid an owner from a view that stood"
        );
        // Meanwhile a real death on the other side: the survivors hide it, and stand again.
        w.crash(4);
        w.run_for(Duration::from_secs(10));
        for i in 1..4 {
            let view = w.view(i);
            assert!(
                view.stands,
                "survivor {i} stands again after a death: {view:?}"
            );
            assert!(
                !w.served(i).contains_key("m4"),
                "survivor {i} hides the dead one"
            );
        }
        // Heal: the cut-off node rejoins, syncs, and its view stands again.
        w.heal();
        w.run_for(Duration::from_secs(15));
        let view = w.view(0);
        assert!(view.stands, "the healed node stands again: {view:?}");
        w.trace()
    });
}

/// A member that missed every SWIM copy of a death (every datagram to it dropped while the
/// news spread and used up its sends) learns it from a session's hello: it suspects the dead
/// member, whose port refuses, and excludes it within about a sync interval. With the news
/// off it waits for its own probe of the dead member: at 60 members, up to a probe round.
#[test]
fn a_member_that_missed_the_down_news_repairs_at_its_next_session() {
    for_seeds("a_member_that_missed", |seed| {
        let (with, counted, trace) = missed_down_news(seed, true);
        let (without, _, _) = missed_down_news(seed, false);
        eprintln!("seed {seed}: excluded after {with:?} with down news, {without:?} without");
        let bound = config().sync_interval * 2;
        assert!(
            with <= bound,
            "the member that missed the news kept the dead one {with:?} (bound {bound:?}; \
             {counted} members suspected on down news)"
        );
        trace
    });
}

/// Node 5 of 60 misses every datagram for 3 s while node 40 crashes: how long after that
/// node 5 still holds node 40 active, its `down_news_applied`, and the run's trace.
fn missed_down_news(seed: u64, news: bool) -> (Duration, u64, u64) {
    let (n, k, v) = (60, 5, 40);
    let mut cfg = config();
    cfg.down_news = news;
    let mut w = World::new(n, cfg, Net::lan(), seed);
    w.run_for(Duration::from_secs(15));
    for j in (0..n).filter(|j| *j != k) {
        w.drop_datagrams(j, k);
    }
    let dead = w.node(v).unwrap().identity();
    w.crash(v);
    w.run_for(Duration::from_secs(3));
    w.heal();
    let healed = w.now;
    // Bounded: 60 s of virtual time at most.
    while w.node(k).unwrap().active().contains(&dead) && w.now < healed + Duration::from_secs(60) {
        w.run_for(Duration::from_millis(50));
    }
    let counted = w.node(k).unwrap().counters().down_news_applied;
    (w.now - healed, counted, w.trace())
}

/// Addresses node `i` holds as active members.
fn active_addrs(w: &World, i: usize) -> BTreeSet<std::net::SocketAddr> {
    w.node(i)
        .map(|n| n.active().iter().map(|m| m.addr()).collect())
        .unwrap_or_default()
}

/// A node whose datagrams no member's keyring opens (another key, or none at all) never
/// becomes a member: its datagrams are dropped before decoding and counted by reason, and
/// its writes reach no one.
#[test]
fn an_agent_without_the_key_never_becomes_a_member() {
    use patina_gossip::{GossipKey, Keyring};
    for_seeds("an_agent_without_the_key", |seed| {
        let key = GossipKey::generate();
        let mut cfg = config();
        cfg.keyring = Keyring::with_key(key);
        // Node 8 has no keys (plaintext); node 9 another key. Both seed through 0 and 1.
        let mut w = World::with_keyrings(10, cfg, Net::lan(), seed, |i| match i {
            8 => Some(Keyring::default()),
            9 => Some(Keyring::with_key(GossipKey::generate())),
            _ => None,
        });
        let outsiders: Vec<std::net::SocketAddr> = [8, 9]
            .iter()
            .filter_map(|i| w.node(*i).map(|n| n.identity().addr()))
            .collect();
        w.write(8, "m8", "app", b"+up");
        w.write(9, "m9", "app", b"+up");
        for step in 0..50 {
            w.run_for(Duration::from_millis(100));
            for i in 0..8 {
                let members = active_addrs(&w, i);
                assert!(
                    outsiders.iter().all(|o| !members.contains(o)),
                    "node {i} took an outsider for a member at {:?}",
                    w.trace()
                );
                if step >= 30 {
                    assert_eq!(members.len(), 7, "node {i} lacks an insider: {members:?}");
                }
            }
        }
        for i in 8..10 {
            assert!(
                active_addrs(&w, i).is_empty(),
                "outsider {i} joined someone"
            );
        }
        for i in 0..8 {
            let served = w.served(i);
            assert!(!served.contains_key("m8") && !served.contains_key("m9"));
        }
        let (no_key, plaintext) = (0..8).fold((0, 0), |(a, b), i| {
            let c = w.node(i).unwrap().counters();
            (a + c.dropped_no_key, b + c.dropped_plaintext)
        });
        assert!(
            no_key > 0 && plaintext > 0,
            "no_key {no_key} plaintext {plaintext}"
        );
        0
    });
}

/// Encryption turned on in a running plaintext cluster, one node at a time in each step
/// (install the key everywhere, use it everywhere, refuse plaintext everywhere), with writes
/// going on: no member is ever taken for down and every write reaches every node. After it,
/// a plaintext node cannot join.
#[test]
fn a_rolling_enable_takes_no_member_down() {
    use patina_gossip::{GossipKey, Keyring, KeyringOp};
    for_seeds("a_rolling_enable", |seed| {
        const N: usize = 12;
        let mut w = World::new(N, config(), Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        let key = GossipKey::generate();
        let mut keys = BTreeSet::new();
        let mut n = 0;
        for op in [
            KeyringOp::Install(key.clone()),
            KeyringOp::Use(key.clone()),
            KeyringOp::AcceptPlaintext(false),
        ] {
            let mut order: Vec<usize> = (0..N).collect();
            for j in (1..N).rev() {
                let k = w.rng().random_range(0..=j);
                order.swap(j, k);
            }
            for i in order {
                let mut ring = w.keyring(i).clone();
                ring.apply(&op).unwrap();
                w.set_keyring(i, ring);
                let key = format!("k{n}");
                assert!(w.write(i, &key, "app", b"+up"));
                keys.insert(key);
                n += 1;
                w.run_for(Duration::from_millis(400));
            }
        }
        w.run_for(Duration::from_secs(8));
        assert!(w.downs.is_empty(), "members taken for down: {:?}", w.downs);
        assert_converged(&w, &keys);
        for i in 0..N {
            assert_eq!(active_addrs(&w, i).len(), N - 1, "node {i}");
            assert_eq!(w.served(i).len(), keys.len(), "node {i}");
            let c = w.node(i).unwrap().counters();
            assert_eq!(c.dropped_no_key, 0, "node {i}");
        }
        // Plaintext is refused now: a node that lost its keyring stays out.
        let addr = w.node(5).unwrap().identity().addr();
        w.crash(5);
        w.set_keyring(5, Keyring::default());
        w.restart(5);
        w.run_for(Duration::from_secs(5));
        for i in (0..N).filter(|i| *i != 5) {
            assert!(!active_addrs(&w, i).contains(&addr), "node {i} took 5 back");
        }
        0
    });
}

/// Network coordinates from real session interleavings: nodes at known places on a plane
/// 200 ms across (plus an access-link height of 0.5 to 5 ms each), one-way latency half the
/// round trip, 2 % loss. Each node's coordinate moves only by its sessions' hellos (our hello
/// out, the server's back, carrying the server's coordinate as it sent it). After five
/// simulated minutes, each node's estimates order any two others as the true round trips do
/// for at least 95 % of pairs.
#[test]
fn coordinates_from_session_hellos_order_peers_as_the_true_round_trips() {
    const N: usize = 30;
    for seed in seeds().into_iter().take(2) {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
        let places: Vec<(f64, f64, f64)> = (0..N)
            .map(|_| {
                (
                    rng.random_range(0.0..0.200),
                    rng.random_range(0.0..0.200),
                    rng.random_range(0.0005..0.005),
                )
            })
            .collect();
        let true_rtt = |i: usize, j: usize| {
            let (a, b) = (places[i], places[j]);
            ((a.0 - b.0).powi(2) + (a.1 - b.1).powi(2)).sqrt() + a.2 + b.2
        };
        let matrix: Vec<Vec<Duration>> = (0..N)
            .map(|i| {
                (0..N)
                    .map(|j| {
                        Duration::from_secs_f64(if i == j { 0.0 } else { true_rtt(i, j) / 2.0 })
                    })
                    .collect()
            })
            .collect();
        let net = Net {
            loss: 0.02,
            latency: Some(patina_gossip::sim::Latency::matrix(matrix)),
            ..Net::lan()
        };
        // A WAN's timings: probes and suspicions far above the round trips.
        let cfg = Config {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(600),
            suspicion_min: Duration::from_secs(3),
            suspicion_max: Duration::from_secs(15),
            sync_interval: Duration::from_secs(1),
            ..config()
        };
        let mut w = World::new(N, cfg, net, seed);
        w.run_for(Duration::from_secs(300));
        let coord = |i: usize| w.node(i).expect("running").coordinate().clone();
        let (mut agree, mut total) = (0u64, 0u64);
        for i in 0..N {
            let me = coord(i);
            for j in 0..N {
                if j == i {
                    continue;
                }
                let est_j = me.distance_to(&coord(j));
                for k in (j + 1)..N {
                    if k == i {
                        continue;
                    }
                    let est_k = me.distance_to(&coord(k));
                    total += 1;
                    if (est_j < est_k) == (true_rtt(i, j) < true_rtt(i, k)) {
                        agree += 1;
                    }
                }
            }
        }
        let share = agree as f64 / total as f64;
        println!(
            "seed {seed:#x}: pairs ordered as the true round trips: {:.1} % of {total}",
            share * 100.0
        );
        assert!(share >= 0.95, "seed {seed:#x}: {share}");
        // Peers' coordinates are kept (members only) for the global tier's ordering.
        assert!(w.node(0).unwrap().peer_coordinates().count() > N / 2);
    }
}

/// Milliseconds of virtual time from now until no node but `dead` lists `key` (bounded: 10 s
/// in 5 ms steps; `None` if it never happens).
fn excluded_after(w: &mut World, dead: usize, key: &str) -> Option<u64> {
    let start = w.now;
    for step in 1..=2000u64 {
        w.run_until(start + Duration::from_millis(step * 5));
        if (0..w.len())
            .filter(|i| *i != dead && w.is_up(*i))
            .all(|i| !w.served(i).contains_key(key))
        {
            return Some(step * 5);
        }
    }
    None
}

fn attend_unreachable(w: &World) -> u64 {
    (0..w.len())
        .filter_map(|i| w.node(i))
        .map(|n| n.counters().attend_unreachable)
        .sum()
}

/// Attendance: a killed member (its host up, so its connections close) is suspected at once
/// by the members attending it, corroborated, and excluded everywhere within one probe period
/// plus `suspicion_min` (a member the down news missed hears it at its next gossip tick),
/// whoever's probe would have picked it. One that dies behind a
/// partition closes nothing its attendants see: SWIM's probes find it, as before.
#[test]
fn a_killed_member_is_excluded_through_its_attendants_and_a_cut_one_through_probes() {
    for_seeds("a_killed_member_attended", |seed| {
        let n = 20;
        let cfg = config();
        let bound = cfg.probe_period.as_millis() as u64 + cfg.suspicion_min.as_millis() as u64;
        let mut w = World::new(n, cfg, Net::lan(), seed);
        w.run_for(Duration::from_secs(3));
        for i in [4, 9] {
            w.write(i, &format!("m{i}"), "app", b"+up");
        }
        w.run_for(Duration::from_secs(1));
        for i in 0..n {
            assert_eq!(w.node(i).map(|n| n.attending().len()), Some(2), "node {i}");
        }
        w.crash(4);
        let t = excluded_after(&mut w, 4, "m4").expect("a killed member was never excluded");
        assert!(
            t <= bound,
            "a killed member took {t} ms to be excluded everywhere (attended: at most {bound})"
        );
        let reported = attend_unreachable(&w);
        assert!(
            (1..=2).contains(&reported),
            "attendants that reported the killed member: {reported}"
        );
        w.run_for(Duration::from_secs(2));
        // Cut off from everyone, then killed: nobody sees its connections close.
        let others: Vec<usize> = (0..n).filter(|i| *i != 9).collect();
        w.partition(&[9], &others);
        w.crash(9);
        excluded_after(&mut w, 9, "m9").expect("a cut-off dead member was never excluded");
        assert_eq!(
            attend_unreachable(&w),
            reported,
            "a member behind a partition was reported by attendance"
        );
        0
    });
}
