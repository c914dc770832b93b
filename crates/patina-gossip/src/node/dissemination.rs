//! Dissemination: a change is pushed at once to a few members (the first hop), forwarded
//! by each that receives it first (a bounded number of hops), and queued on SWIM traffic
//! (the piggyback path) for the few the pushes missed. New items go to the store as an
//! [`Output::Apply`]; notices (records too large for a datagram) open a gap to sync for.

use std::net::SocketAddr;
use std::time::Duration;

use patina_store::Record;
use rand::RngExt;

use super::{Lane, Node, Output};
use crate::identity::Identity;
use crate::wire::{Item, PUSH_OVERHEAD, Push};

impl Node {
    pub(super) fn handle_push(&mut self, push: Push) {
        let mut fresh = Vec::new();
        let mut fresh_bytes = Vec::new();
        {
            let mut s = self.shared.lock().expect("gossip shared state");
            for bytes in push.items {
                match Item::decode(&bytes) {
                    Ok(item) => {
                        if s.take(&item) {
                            fresh.push(item);
                            fresh_bytes.push(bytes);
                        }
                    }
                    Err(_) => s.counters.dropped_decode += 1,
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let sender = self
            .foca
            .iter_members()
            .map(|m| *m.id())
            .find(|m| m.node == push.sender);
        // Queue the change on our SWIM traffic too: it reaches, within a probe period or two,
        // the few members no eager push happened to choose.
        let queue = !self
            .shared
            .lock()
            .expect("gossip shared state")
            .backlog_full;
        if queue {
            for bytes in &fresh_bytes {
                let _ = self.foca.add_broadcast(bytes);
            }
        }
        if push.hops > 0 {
            let exclude = sender.map(|s| s.addr());
            self.push(
                fresh_bytes,
                push.hops - 1,
                self.cfg.forward_fanout.get(),
                exclude,
            );
        }
        self.update_backlog();
        self.deliver(fresh, sender);
    }

    /// Items taken from foca's piggyback path this turn.
    pub(super) fn take_inbox(&mut self, sender: Option<Identity>) {
        let items = std::mem::take(&mut self.shared.lock().expect("gossip shared state").inbox);
        if !items.is_empty() {
            // Forward new piggybacked changes at once rather than at the next probe.
            let _ = self.foca.broadcast(&mut self.rt);
            self.after_foca();
            self.deliver(items, sender);
        }
    }

    /// Hand new items to the store; notices make a gap we must sync for.
    pub(super) fn deliver(&mut self, items: Vec<Item>, sender: Option<Identity>) {
        let mut records = Vec::new();
        for item in items {
            match item {
                Item::Record(r) => records.push(r),
                // Noticed when taken (`Shared::notice`).
                Item::Notice { .. } => {
                    self.gap_hint = sender.or(self.gap_hint);
                    self.arm_gap_check();
                }
                // Announcements come only in tree pushes (`tree.rs`), never taken here.
                Item::Announce { .. } => {}
            }
        }
        if !records.is_empty() {
            if sender.is_some() {
                self.gap_hint = sender;
            }
            self.out.push(Output::Apply { records });
        }
    }

    /// Local changes are durable: push them at once and queue them for piggybacking.
    pub fn handle_local(&mut self, now: Duration, records: &[Record]) {
        self.now = now;
        if self.cfg.dissemination == super::Dissemination::Tree {
            let items = records
                .iter()
                .map(|r| {
                    let item = Item::for_record(r, self.max_item);
                    let bytes = item.to_bytes();
                    (item, bytes)
                })
                .collect();
            self.tree_spread(items, None, super::tree::TREE_HOPS);
            return;
        }
        let mut items = Vec::with_capacity(records.len());
        for r in records {
            let bytes = Item::for_record(r, self.max_item).to_bytes();
            let queue = {
                let s = self.shared.lock().expect("gossip shared state");
                !s.backlog_full
            };
            if queue {
                let _ = self.foca.add_broadcast(&bytes);
            }
            items.push(bytes);
        }
        self.push(items, self.cfg.push_hops, self.cfg.push_fanout.get(), None);
        self.update_backlog();
    }

    /// Send encoded items to `fanout` random active members (not `exclude`), packed into
    /// as few datagrams as fit.
    pub(super) fn push(
        &mut self,
        items: Vec<Vec<u8>>,
        hops: u8,
        fanout: usize,
        exclude: Option<SocketAddr>,
    ) {
        let mut targets: Vec<Identity> = self
            .foca
            .iter_members()
            .map(|m| *m.id())
            .filter(|m| Some(m.addr()) != exclude)
            .collect();
        if targets.is_empty() {
            return;
        }
        // Pushed to every active member: nobody is left for a forward to reach.
        let hops = if fanout >= targets.len() { 0 } else { hops };
        // A partial Fisher-Yates shuffle: the first `fanout` are a uniform sample.
        let k = fanout.min(targets.len());
        for i in 0..k {
            let j = self.rng.random_range(i..targets.len());
            targets.swap(i, j);
        }
        targets.truncate(k);
        let room = self
            .cfg
            .max_datagram
            .saturating_sub(self.envelope.overhead() + PUSH_OVERHEAD);
        let me = self.identity().node;
        let mut packets = Vec::new();
        let mut current = Push {
            sender: me,
            hops,
            tree: false,
            items: Vec::new(),
        };
        let mut used = 0;
        for item in items {
            if item.len() + 2 > room {
                continue; // cannot happen: items are sized by `max_item`
            }
            if used + item.len() + 2 > room && !current.items.is_empty() {
                packets.push(std::mem::replace(
                    &mut current,
                    Push {
                        sender: me,
                        hops,
                        tree: false,
                        items: Vec::new(),
                    },
                ));
                used = 0;
            }
            used += item.len() + 2;
            current.items.push(item);
        }
        if !current.items.is_empty() {
            packets.push(current);
        }
        for p in packets {
            let mut payload = Vec::new();
            p.encode(&mut payload);
            let mut bytes = Vec::with_capacity(payload.len() + self.envelope.overhead());
            self.envelope.seal(&payload, &mut bytes);
            for t in &targets {
                self.send(t.push_addr(), bytes.clone(), Lane::Push);
            }
        }
    }
}
