//! `patina.v1.Admin`: membership, replication status and forgetting dead members.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use patina_proto::v1::admin_server::{Admin, AdminServer};
use patina_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ForgetRequest, ForgetResponse, KeyringRequest,
    KeyringResponse, Member, MembersRequest, MembersResponse, OriginStatus, PeerSync,
    WhoamiRequest,
};
use patina_store::{LocalWrite, NodeId, StoreError};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use super::{Gossip, Input};
use crate::identity::Identity;
use crate::node::{MemberInfo, MemberState, ViewReason, ViewStatus};

/// Deletes per write when forgetting a member: one group commit's share.
const FORGET_CHUNK: usize = 500;

#[derive(Clone)]
pub struct AdminService {
    gossip: Gossip,
}

impl AdminService {
    pub(super) fn new(gossip: Gossip) -> AdminService {
        AdminService { gossip }
    }

    /// This agent as Whoami and Members report it: with its region and whether its view
    /// stands.
    fn this(&self, snap: &super::Snapshot) -> Member {
        Member {
            region: self.gossip.region().to_owned(),
            view: Some(self.gossip.view_message()),
            ..member(&snap.me, snap.incarnation, "alive", Some(0))
        }
    }

    pub fn into_server(self) -> AdminServer<AdminService> {
        AdminServer::new(self)
    }

    /// Membership as the node sees it now, or UNAVAILABLE once gossip has stopped.
    async fn snapshot(&self) -> Result<super::Snapshot, Status> {
        self.gossip
            .snapshot()
            .await
            .ok_or_else(|| Status::unavailable("gossip stopped"))
    }
}

fn state_name(s: MemberState) -> &'static str {
    match s {
        MemberState::Alive => "alive",
        MemberState::Suspect => "suspect",
        MemberState::Down => "down",
    }
}

fn member(id: &Identity, incarnation: u16, state: &str, ago: Option<u64>) -> Member {
    Member {
        id: id.node.to_string(),
        address: id.addr.to_string(),
        api_address: id.api_addr().to_string(),
        state: state.to_string(),
        incarnation: u32::from(incarnation),
        epoch: id.epoch,
        last_seen_ms_ago: ago,
        region: String::new(),
        view: None,
    }
}

/// A view as the wire carries it; `None`: the gossip loop is gone.
pub(super) fn view_message(view: Option<&ViewStatus>) -> patina_proto::v1::ViewStatus {
    use patina_proto::v1::ViewReason as R;
    let Some(v) = view else {
        return patina_proto::v1::ViewStatus {
            stands: false,
            reasons: vec![R::NoCluster as i32],
            ..Default::default()
        };
    };
    patina_proto::v1::ViewStatus {
        stands: v.stands,
        reasons: v
            .reasons
            .iter()
            .map(|r| {
                (match r {
                    ViewReason::NotJoined => R::NotJoined,
                    ViewReason::NoMajority => R::NoMajority,
                    ViewReason::Settling => R::Settling,
                    ViewReason::NotSynced => R::NotSynced,
                    ViewReason::OldGap => R::OldGap,
                    ViewReason::ClockOff => R::ClockOff,
                }) as i32
            })
            .collect(),
        members_recent: v.members_recent,
        members_alive: v.members_alive,
        syncs_completed: v.syncs_completed,
        oldest_gap_ms: v.oldest_gap.as_millis() as u64,
        clock_offset_ms: v.clock_offset_ms,
        clock_samples: v.clock_samples,
    }
}

fn tls_status(trust: &patina_trust::Trust) -> patina_proto::v1::TlsStatus {
    let r = trust.expiry();
    let (peer, peer_secs) = r.soonest_peer.unwrap_or_default();
    patina_proto::v1::TlsStatus {
        own_expires_in_secs: r.own_secs,
        ca_expires_in_secs: r.ca_secs,
        soonest_peer: peer,
        soonest_peer_expires_in_secs: peer_secs,
        state: r.state.as_str().to_owned(),
        reloads: trust.counters.loaded.load(Ordering::Relaxed),
        reload_failures: trust.counters.failed.load(Ordering::Relaxed),
    }
}

fn parse_node(s: &str) -> Option<NodeId> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .ok()
        .map(NodeId)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn members(
        &self,
        _: Request<MembersRequest>,
    ) -> Result<Response<MembersResponse>, Status> {
        let snap = self.snapshot().await?;
        let members = snap
            .members
            .iter()
            .map(|m: &MemberInfo| {
                let ago = m
                    .last_seen
                    .map(|t| snap.now.saturating_sub(t).as_millis() as u64);
                member(&m.identity, m.incarnation, state_name(m.state), ago)
            })
            .collect();
        Ok(Response::new(MembersResponse {
            this: Some(self.this(&snap)),
            members,
        }))
    }

    async fn whoami(&self, _: Request<WhoamiRequest>) -> Result<Response<Member>, Status> {
        let snap = self.snapshot().await?;
        Ok(Response::new(self.this(&snap)))
    }

    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.gossip
            .cluster_status()
            .await
            .map(Response::new)
            .ok_or_else(|| Status::unavailable("gossip stopped"))
    }

    async fn forget(
        &self,
        request: Request<ForgetRequest>,
    ) -> Result<Response<ForgetResponse>, Status> {
        let wanted = request.into_inner().member;
        let snap = self.snapshot().await?;
        let addr: Option<SocketAddr> = wanted.parse().ok();
        let node = parse_node(&wanted);
        let found = snap
            .members
            .iter()
            .filter(|m| Some(m.identity.addr()) == addr || Some(m.identity.node) == node)
            .max_by_key(|m| m.identity.epoch);
        let owner = match (found, node) {
            (Some(m), _) => {
                if m.state != MemberState::Down {
                    return Err(Status::failed_precondition(format!(
                        "member {} is {}: only a down member can be forgotten",
                        m.identity,
                        state_name(m.state)
                    )));
                }
                let (tx, rx) = oneshot::channel();
                let _ = self.gossip.inputs.send(Input::Forget(m.identity, tx)).await;
                let _ = rx.await;
                m.identity.node
            }
            // Not a member any more (removed long ago): its records may still be held.
            (None, Some(node)) => node,
            _ => return Err(Status::not_found("no such member")),
        };
        if owner == self.gossip.store.node() {
            return Err(Status::failed_precondition("an agent cannot forget itself"));
        }
        if !self.gossip.store.down_owners().contains(&owner) {
            return Err(Status::failed_precondition(format!(
                "{owner} is not down here: only the records of a member this agent holds down can be forgotten"
            )));
        }
        // Each key with the version read here: a key written again meanwhile (the member came
        // back, or another agent took the key over) is not deleted.
        let seen: Vec<(String, patina_store::Version)> = self
            .gossip
            .store
            .read_owned_by(owner)
            .await
            .map_err(|e| Status::unavailable(format!("reading {owner}'s records: {e}")))?
            .iter()
            .filter(|e| e.is_live())
            .map(|e| (e.key().to_string(), e.version()))
            .collect();
        let mut tombstoned = 0u64;
        let mut skipped = 0u64;
        for chunk in seen.chunks(FORGET_CHUNK) {
            let mut chunk: Vec<(String, patina_store::Version)> = chunk.to_vec();
            // Bounded: each refusal drops one key from the chunk.
            while !chunk.is_empty() {
                let ops = chunk
                    .iter()
                    .map(|(key, version)| LocalWrite::DeleteIf {
                        key: key.clone(),
                        version: *version,
                    })
                    .collect();
                match self.gossip.store.write(ops).await {
                    Ok(done) => {
                        tombstoned += done.len() as u64;
                        break;
                    }
                    // Rewritten, deleted, or held at a newer version (a fast writer's) since
                    // the scan: left alone.
                    Err(
                        StoreError::Changed(key)
                        | StoreError::NotFound(key)
                        | StoreError::Stale(key),
                    ) => {
                        chunk.retain(|(k, _)| **k != *key);
                        skipped += 1;
                    }
                    Err(e) => return Err(Status::unavailable(e.to_string())),
                }
            }
        }
        if skipped > 0 {
            tracing::info!(owner = %owner, skipped, "forget: keys written or deleted since they were read were left alone");
        }
        tracing::warn!(owner = %owner, tombstoned, "forgot a member: its records are deleted");
        Ok(Response::new(ForgetResponse { tombstoned }))
    }

    async fn keyring(
        &self,
        request: Request<KeyringRequest>,
    ) -> Result<Response<KeyringResponse>, Status> {
        super::keys::keyring(&self.gossip, request.into_inner())
            .await
            .map(Response::new)
    }
}

impl Gossip {
    /// The agent's status, as `Admin.ClusterStatus` answers it (`None`: gossip stopped).
    pub async fn cluster_status(&self) -> Option<ClusterStatusResponse> {
        let snap = self.snapshot().await?;
        let store = &self.store;
        let stats = store.stats();
        let refusals = store.refusals();
        let down = store.down_owners();
        let digest = store.digest();
        let mut origins: Vec<OriginStatus> = digest
            .iter()
            .map(|(o, k)| OriginStatus {
                origin: o.to_string(),
                head: k.head(),
                gaps: k.gap_count() as u64,
                missing: k.gaps().map(|r| r.hi() - r.lo() + 1).sum(),
                refused: refusals.get(o).map_or(0, |r| r.count),
                hidden: down.contains(o),
                clock_ahead: refusals.get(o).map_or(0, |r| r.clock_ahead),
            })
            .collect();
        // Origins whose every record was refused (a fast clock's, say) are in no digest:
        // shown all the same, never dropped in silence.
        origins.extend(
            refusals
                .iter()
                .filter(|(o, _)| !digest.contains_key(o))
                .map(|(o, r)| OriginStatus {
                    origin: o.to_string(),
                    refused: r.count,
                    clock_ahead: r.clock_ahead,
                    hidden: down.contains(o),
                    ..OriginStatus::default()
                }),
        );
        let c = &snap.counters;
        let s = &self.sync_counters;
        Some(ClusterStatusResponse {
            node: stats.node.to_string(),
            keys: stats.keys as u64,
            live: stats.live as u64,
            revision: stats.revision,
            origins,
            health: snap.health,
            datagrams_in: c.datagrams_in,
            datagrams_out: c.datagrams_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            dropped_datagrams: c.dropped_envelope
                + c.dropped_decode
                + c.dropped_no_key
                + c.dropped_plaintext,
            dropped_no_key: c.dropped_no_key,
            dropped_plaintext: c.dropped_plaintext,
            keyring: super::keys::current(self)
                .await
                .map(|r| super::keys::state(&r)),
            tls: match &self.dial {
                patina_trust::Dial::Tls { trust, .. } => Some(tls_status(trust)),
                patina_trust::Dial::Plain => None,
            },
            refuted_for_others: c.refuted_for_others,
            attend_unreachable: c.attend_unreachable,
            down_news_applied: c.down_news_applied,
            tree_prunes: c.tree_prunes_sent,
            tree_grafts: c.tree_grafts_sent,
            tree_grafts_refused: c.tree_grafts_refused,
            tree_from_strangers: c.tree_from_strangers,
            tree_inbound_replaced: c.tree_inbound_replaced,
            peers: {
                let now = std::time::Instant::now();
                let mut peers: Vec<PeerSync> = s
                    .peers
                    .lock()
                    .expect("peer records")
                    .iter()
                    .map(|(ip, p)| PeerSync {
                        peer: ip.to_string(),
                        last_ms_ago: now.saturating_duration_since(p.at).as_millis() as u64,
                        lacking: p.lacking,
                        records_in: p.records_in,
                        ok: p.ok,
                        sessions: p.sessions,
                    })
                    .collect();
                peers.sort_by_key(|p| p.last_ms_ago);
                peers
            },
            syncs: s.sessions.load(Ordering::Relaxed),
            sync_failures: s.failures.load(Ordering::Relaxed),
            sync_unstarted: s.unstarted.load(Ordering::Relaxed),
            sync_records_in: s.records_in.load(Ordering::Relaxed),
            sync_records_out: s.records_out.load(Ordering::Relaxed),
            sync_bytes_in: s.bytes_in.load(Ordering::Relaxed),
            sync_bytes_out: s.bytes_out.load(Ordering::Relaxed),
        })
    }
}
