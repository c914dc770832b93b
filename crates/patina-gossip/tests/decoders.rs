//! Every decoder of bytes from the network, fed arbitrary and mutated input: an error or a
//! value, never a panic; and a node fed garbage, truncated, oversized and foreign datagrams
//! drops and counts them and goes on working.

use std::net::SocketAddr;
use std::time::Duration;

use foca::Codec as _;
use patina_gossip::identity::Codec;
use patina_gossip::wire::{Item, KIND_GRAFT, KIND_LINK, KIND_PRUNE, Push, TreeControl};
use patina_gossip::{ClusterName, Config, Envelope, Identity, Node};
use patina_store::NodeId;
use proptest::prelude::*;

/// Member `i` at 10.0.0.`i`.
fn member(i: u8) -> Identity {
    Identity {
        node: NodeId(u64::from(i)),
        addr: format!("10.0.0.{i}:7000").parse().unwrap(),
        api_port: 7001,
        epoch: 1,
    }
}

/// Node 1 spreading changes as `dissemination` says, seeded through node 2.
fn node_with(dissemination: patina_gossip::Dissemination) -> Node {
    let seeds: Vec<SocketAddr> = vec![member(2).addr()];
    Node::new(
        member(1),
        Config {
            dissemination,
            ..Config::lan(ClusterName::new("fuzz").unwrap())
        },
        Default::default(),
        seeds,
        7,
    )
}

fn node() -> Node {
    node_with(patina_gossip::Dissemination::Push)
}

fn tree_node() -> Node {
    node_with(patina_gossip::Dissemination::Tree)
}

fn sealed(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    Envelope::new(&ClusterName::new("fuzz").unwrap()).seal(payload, &mut out);
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = Envelope::new(&ClusterName::new("fuzz").unwrap()).open(&bytes);
        let _ = Codec.decode_header(&bytes[..]);
        let _ = Codec.decode_member(&bytes[..]);
        let _ = Item::decode(&bytes);
        let _ = Push::decode(&bytes, false);
        let _ = Push::decode(&bytes, true);
        let _ = TreeControl::decode(KIND_PRUNE, &bytes);
        let _ = TreeControl::decode(KIND_GRAFT, &bytes);
        let _ = TreeControl::decode(KIND_LINK, &bytes);
    }

    #[test]
    fn a_node_survives_any_datagram(kind in 0u8..8, tree in any::<bool>(), body in proptest::collection::vec(any::<u8>(), 0..1500)) {
        let mut n = if tree { tree_node() } else { node() };
        n.start(Duration::ZERO);
        let mut payload = vec![kind];
        payload.extend_from_slice(&body);
        n.handle_datagram(Duration::from_millis(1), &sealed(&payload));
        n.handle_datagram(Duration::from_millis(2), &body);
        let _ = n.drain();
    }
}

#[test]
fn garbage_foreign_truncated_and_oversized_datagrams_are_dropped_and_counted() {
    let mut n = node();
    n.start(Duration::ZERO);
    let _ = n.drain();
    let mut other = Vec::new();
    Envelope::new(&ClusterName::new("other").unwrap()).seal(&[1, 2, 3], &mut other);
    let cases: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(), // garbage
        other,                              // another cluster
        sealed(&[1])[..5].to_vec(),         // truncated envelope
        sealed(&[1, 0, 0, 0]),              // truncated SWIM packet
        sealed(&[2, 1, 2, 3]),              // truncated push
        sealed(&[9, 9, 9]),                 // unknown kind
        sealed(&vec![1; 65_000]),           // oversized SWIM packet
    ];
    for (i, bytes) in cases.iter().enumerate() {
        n.handle_datagram(Duration::from_millis(i as u64 + 1), bytes);
    }
    let c = n.counters();
    assert_eq!(c.datagrams_in, cases.len() as u64);
    assert_eq!(c.dropped_envelope, 3, "{c:?}");
    assert_eq!(c.dropped_decode, 4, "{c:?}");
    assert!(
        n.drain()
            .iter()
            .all(|o| !matches!(o, patina_gossip::Output::Apply { .. }))
    );
}

/// The push socket takes pushes only: a SWIM packet arriving there (even a valid one) is
/// dropped and counted, while the same packet on the SWIM socket is handled.
#[test]
fn the_push_socket_drops_swim_packets() {
    let mut a = node();
    a.start(Duration::ZERO);
    // A real SWIM packet: what the node sends its seeds when it starts (an announce).
    let swim = a
        .drain()
        .into_iter()
        .find_map(|o| match o {
            patina_gossip::Output::Send {
                bytes,
                lane: patina_gossip::Lane::Swim,
                ..
            } => Some(bytes),
            _ => None,
        })
        .expect("a starting node announces itself");
    // The seed it announced to.
    let mut b = Node::new(
        Identity {
            node: NodeId(2),
            addr: "10.0.0.2:7000".parse().unwrap(),
            api_port: 7001,
            epoch: 1,
        },
        Config::lan(ClusterName::new("fuzz").unwrap()),
        Default::default(),
        Vec::new(),
        8,
    );
    b.start(Duration::ZERO);
    let _ = b.drain();
    b.handle_datagram_on(Duration::from_millis(1), &swim, patina_gossip::Lane::Push);
    assert_eq!(b.counters().dropped_decode, 1);
    b.handle_datagram_on(Duration::from_millis(2), &swim, patina_gossip::Lane::Swim);
    assert_eq!(b.counters().dropped_decode, 1, "handled on the SWIM socket");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    /// Tree messages from a member (node 2), with any body: dropped or taken, never a panic,
    /// and the node's tree state stays within its bounds.
    #[test]
    fn a_tree_node_survives_any_tree_message_from_a_member(
        kind in 3u8..7,
        body in proptest::collection::vec(any::<u8>(), 0..1400),
    ) {
        let mut n = tree_node();
        n.start(Duration::ZERO);
        n.assume_members(Duration::ZERO, &[member(2)]);
        let mut payload = vec![kind];
        payload.extend_from_slice(&2u64.to_le_bytes());
        payload.extend_from_slice(&body);
        n.handle_datagram(Duration::from_millis(1), &sealed(&payload));
        let _ = n.drain();
        let sizes = n.tree_sizes();
        prop_assert!(sizes.missing <= patina_gossip::node::MAX_MISSING);
        prop_assert!(sizes.origins <= 2, "link state for an origin no member has: {sizes:?}");
    }
}
