//! Anti-entropy sessions over gRPC (`patina.v1.Sync/Exchange`), both sides of one stream:
//! hello with digests both ways, then each side streams what the other lacks (newest first,
//! within `sync::SESSION_BYTES`) and a done, and applies what it receives.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use patina_proto::v1::sync_client::SyncClient;
use patina_proto::v1::sync_message::Body;
use patina_proto::v1::sync_server::{Sync, SyncServer};
use patina_proto::v1::{
    AttendNotice, AttendRequest, CoveredSpan, DownMember, OriginDigest, SeqSpan, SyncBatch,
    SyncDone, SyncHello, SyncMessage, SyncRecord,
};
use patina_store::{
    Digest, Hlc, NodeId, OriginKnowledge, ReadBudget, Record, RemoteBatch, SeqRange, Version,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Gossip;
use crate::identity::Identity;
use crate::node::SyncEnd;
use crate::sync::{BATCH_BYTES, BATCH_OPS, Claim, SESSION_BYTES, lacking, within_claim};

/// Sessions this agent serves at once; more get RESOURCE_EXHAUSTED (the peer tries another
/// member or the next round). Each holds at most a few batches in memory.
pub const MAX_SERVED_SESSIONS: usize = 8;
/// Sessions this agent serves at once to one peer (by IP): one peer, however busy or
/// hostile, cannot take every slot and starve the others' repairs.
pub const MAX_SESSIONS_PER_PEER: usize = 2;
/// Batches queued per session direction: bounds a session's memory to a few batches.
const SESSION_QUEUE: usize = 4;
/// How long a peer may take to say hello, and a whole session to finish.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const SESSION_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Our hello, and the claim it makes: the digest this side plans its half of the session
/// from. It carries our wall clock (and, in a server's, when the client's hello arrived),
/// from which the client measures the offset between the two clocks.
/// Also the monotonic time read beside the wall clock (a sample measures from it).
fn hello(g: &Gossip, received_wall_ms: u64) -> (SyncMessage, Claim, std::time::Instant) {
    let digest = g.store.digest();
    let sent = std::time::Instant::now();
    let wall_ms = g.store.wall_ms();
    let (own, shared) = {
        let place = g.place.read().expect("place lock");
        (place.own.clone(), place.shared.clone())
    };
    let message = SyncMessage {
        body: Some(Body::Hello(SyncHello {
            cluster: g.cluster.to_string(),
            node: g.store.node().0,
            wall_ms,
            received_wall_ms,
            coordinate: Some(coordinate_msg(&own)),
            peer_coordinates: shared
                .iter()
                .take(crate::node::SHARED_COORDINATES)
                .map(|(n, c)| patina_proto::v1::PeerCoordinate {
                    node: n.0,
                    coordinate: Some(coordinate_msg(c)),
                })
                .collect(),
            recent_downs: g
                .recent_downs
                .read()
                .expect("down news lock")
                .members
                .iter()
                .rev()
                .filter(|(_, at)| at.elapsed() <= crate::node::DOWN_NEWS_AGE)
                .take(crate::node::MAX_DOWN_NEWS)
                .map(|(m, _)| DownMember {
                    node: m.node.0,
                    gossip_addr: m.addr.to_string(),
                    api_port: u32::from(m.api_port),
                    epoch: m.epoch,
                })
                .collect(),
            digest: digest
                .iter()
                .map(|(o, k)| OriginDigest {
                    origin: o.0,
                    head: k.head(),
                    gaps: k
                        .gaps()
                        .map(|r| SeqSpan {
                            lo: r.lo(),
                            hi: r.hi(),
                        })
                        .collect(),
                })
                .collect(),
        })),
    };
    (message, Claim::of(digest), sent)
}

/// The clock readings a hello carries, and its sender's coordinate.
#[derive(Clone, Debug, Default)]
struct HelloClock {
    wall_ms: u64,
    received_wall_ms: u64,
    coordinate: Option<crate::coords::Coordinate>,
}

fn coordinate_msg(c: &crate::coords::Coordinate) -> patina_proto::v1::NetworkCoordinate {
    patina_proto::v1::NetworkCoordinate {
        vec: c.vec.to_vec(),
        error: c.error,
        adjustment: c.adjustment,
        height: c.height,
    }
}

/// A coordinate from the wire: 8 finite components, finite and bounded scalars (a peer's word
/// is checked before it moves ours).
fn coordinate_of(c: &patina_proto::v1::NetworkCoordinate) -> Option<crate::coords::Coordinate> {
    let vec: [f64; crate::coords::DIMENSIONS] = c.vec.as_slice().try_into().ok()?;
    // Seconds: no round trip on Earth is near 10 s, so nothing honest is refused, and a
    // forged coordinate cannot place a peer further than that.
    let bounded = |v: f64| v.is_finite() && v.abs() < 10.0;
    if !vec.iter().all(|v| bounded(*v))
        || !bounded(c.error)
        || !bounded(c.adjustment)
        || !bounded(c.height)
        || c.height < 0.0
        || c.error < 0.0
    {
        return None;
    }
    Some(crate::coords::Coordinate {
        vec,
        error: c.error,
        adjustment: c.adjustment,
        height: c.height,
    })
}

/// The offset of the server's clock from ours (ms), within an error of half the round trip,
/// from NTP's four timestamps: `t0` ours as our hello left, `t1` the server's as it arrived,
/// `t2` the server's as its hello left, `t3` ours as it arrived. `None` when the server sent
/// no readings.
fn clock_sample(t0: u64, t1: u64, t2: u64, t3: u64) -> Option<(i64, u64)> {
    if t1 == 0 || t2 == 0 {
        return None;
    }
    // A server's readings are its word: ones that cannot be (its hello took it longer than
    // a session may last) are dropped, and the arithmetic cannot overflow.
    if t2 < t1 || t2 - t1 > SESSION_TIMEOUT.as_millis() as u64 {
        return None;
    }
    let (t0, t1, t2, t3) = (t0 as i128, t1 as i128, t2 as i128, t3 as i128);
    let offset = ((t1 - t0) + (t2 - t3)) / 2;
    let round_trip = ((t3 - t0) - (t2 - t1)).max(0);
    Some((
        offset.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        (round_trip / 2).min(u64::MAX as i128) as u64,
    ))
}

/// A peer's digest from its hello, checked.
fn their_digest(g: &Gossip, msg: Option<SyncMessage>) -> Result<(Digest, HelloClock), Status> {
    let Some(SyncMessage {
        body: Some(Body::Hello(h)),
    }) = msg
    else {
        return Err(Status::invalid_argument(
            "a sync session starts with a hello",
        ));
    };
    if h.cluster != *g.cluster {
        return Err(Status::failed_precondition("another cluster"));
    }
    if h.digest.len() > crate::sync::MAX_DIGEST_ORIGINS {
        return Err(Status::resource_exhausted("digest has too many origins"));
    }
    // A hint, never a reason to refuse the session (a later version may list more): the
    // first MAX_DOWN_NEWS that parse.
    let downs: Vec<Identity> = h
        .recent_downs
        .iter()
        .take(crate::node::MAX_DOWN_NEWS)
        .filter_map(|d| {
            Some(Identity {
                node: NodeId(d.node),
                addr: d.gossip_addr.parse().ok()?,
                api_port: u16::try_from(d.api_port).ok()?,
                epoch: d.epoch,
            })
        })
        .collect();
    let clock = HelloClock {
        wall_ms: h.wall_ms,
        received_wall_ms: h.received_wall_ms,
        coordinate: h.coordinate.as_ref().and_then(coordinate_of),
    };
    let mut out = Digest::new();
    for d in h.digest {
        let gaps: Option<Vec<SeqRange>> =
            d.gaps.iter().map(|s| SeqRange::new(s.lo, s.hi)).collect();
        let k = gaps
            .and_then(|g| OriginKnowledge::from_parts(d.head, &g))
            .ok_or_else(|| Status::invalid_argument("malformed digest"))?;
        out.insert(NodeId(d.origin), k);
    }
    if !downs.is_empty() {
        // Not awaited: a full input channel drops the news (SWIM still carries it).
        let _ = g.inputs.try_send(super::Input::DownNews(downs));
    }
    // The sender's coordinate and some of its peers': a hint, like the down news (the node
    // keeps only members' it has none of).
    let shared: Vec<(NodeId, crate::coords::Coordinate)> = clock
        .coordinate
        .clone()
        .map(|c| (NodeId(h.node), c))
        .into_iter()
        .chain(
            h.peer_coordinates
                .iter()
                .take(crate::node::SHARED_COORDINATES)
                .filter_map(|p| Some((NodeId(p.node), coordinate_of(p.coordinate.as_ref()?)?))),
        )
        .collect();
    if !shared.is_empty() {
        let _ = g.inputs.try_send(super::Input::SharedCoordinates(shared));
    }
    Ok((out, clock))
}

/// Where a side's outbound messages go.
enum Out {
    Client(mpsc::Sender<SyncMessage>),
    Server(mpsc::Sender<Result<SyncMessage, Status>>),
}

/// How long one message may take to be taken by the peer, or to arrive from it: a peer that
/// stops reading or writing frees its session slot this soon, not at the session's deadline.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(5);

impl Out {
    async fn send(&self, m: SyncMessage) -> bool {
        match self {
            Out::Client(tx) => tx.send_timeout(m, MESSAGE_TIMEOUT).await.is_ok(),
            Out::Server(tx) => tx.send_timeout(Ok(m), MESSAGE_TIMEOUT).await.is_ok(),
        }
    }
}

fn record_bytes(r: &Record) -> usize {
    48 + r.key.len() + r.group.len() + r.value.as_ref().map_or(0, |v| v.len())
}

/// Stream what the peer lacks, then a done. The plan comes from what we claimed in our
/// hello, never from a later digest: everything sent is then within that claim (a range
/// known at the hello stays known, and a read of it returns records and covered ranges
/// inside it), which is all the peer will take.
async fn send_lacking(g: &Gossip, out: &Out, ours: &Claim, theirs: &Digest) -> Result<(), String> {
    let mut budget = SESSION_BYTES;
    let mut batch = SyncBatch::default();
    let mut batch_bytes = 0usize;
    let mut truncated = false;
    'plan: for (origin, range) in ours.plan(theirs) {
        let mut rest = Some(range);
        while let Some(r) = rest {
            if budget == 0 {
                truncated = true;
                break 'plan;
            }
            let got = g
                .store
                .read_origin(
                    origin,
                    r,
                    ReadBudget {
                        max_records: BATCH_OPS,
                        max_bytes: budget.min(BATCH_BYTES),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            debug_assert!(
                got.records.iter().all(|x| r.contains(x.version.seq))
                    && got
                        .covered
                        .iter()
                        .all(|c| r.lo() <= c.lo() && c.hi() <= r.hi()),
                "a read of a claimed range stays within it"
            );
            for rec in got.records {
                let n = record_bytes(&rec);
                budget = budget.saturating_sub(n);
                batch_bytes += n;
                g.sync_counters.records_out.fetch_add(1, Ordering::Relaxed);
                batch.records.push(SyncRecord {
                    key: rec.key.to_string(),
                    group: rec.group.to_string(),
                    value: rec.value.map(|v| v.to_vec()),
                    hlc: rec.version.hlc.0,
                    origin: rec.version.origin.0,
                    seq: rec.version.seq,
                });
                if batch.records.len() + batch.covered.len() >= BATCH_OPS
                    || batch_bytes >= BATCH_BYTES
                {
                    flush(g, out, &mut batch, &mut batch_bytes).await?;
                }
            }
            for c in got.covered {
                batch.covered.push(CoveredSpan {
                    origin: origin.0,
                    lo: c.lo(),
                    hi: c.hi(),
                });
                if batch.records.len() + batch.covered.len() >= BATCH_OPS {
                    flush(g, out, &mut batch, &mut batch_bytes).await?;
                }
            }
            rest = got.rest;
        }
    }
    flush(g, out, &mut batch, &mut batch_bytes).await?;
    if !out
        .send(SyncMessage {
            body: Some(Body::Done(SyncDone { truncated })),
        })
        .await
    {
        return Err("peer went away".into());
    }
    Ok(())
}

async fn flush(
    g: &Gossip,
    out: &Out,
    batch: &mut SyncBatch,
    bytes: &mut usize,
) -> Result<(), String> {
    if batch.records.is_empty() && batch.covered.is_empty() {
        return Ok(());
    }
    let b = std::mem::take(batch);
    *bytes = 0;
    g.sync_counters
        .bytes_out
        .fetch_add(prost::Message::encoded_len(&b) as u64, Ordering::Relaxed);
    if out
        .send(SyncMessage {
            body: Some(Body::Batch(b)),
        })
        .await
    {
        Ok(())
    } else {
        Err("peer went away".into())
    }
}

/// A batch from a peer, converted and checked against what the peer claimed in its hello
/// ([`within_claim`]).
fn remote_batch(b: SyncBatch, theirs: &Digest) -> Result<RemoteBatch, String> {
    if b.records.len() + b.covered.len() > BATCH_OPS {
        return Err("batch too large".into());
    }
    let mut out = RemoteBatch::default();
    for r in b.records {
        if r.seq == 0 || r.origin == 0 {
            return Err("record without a version".into());
        }
        out.records.push(Record {
            key: r.key.into(),
            group: r.group.into(),
            value: r.value.map(Arc::from),
            version: Version {
                hlc: Hlc(r.hlc),
                origin: NodeId(r.origin),
                seq: r.seq,
            },
        });
    }
    for c in b.covered {
        let range = SeqRange::new(c.lo, c.hi).ok_or("malformed covered range")?;
        out.covered.push((NodeId(c.origin), range));
    }
    within_claim(&out, theirs).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Apply what the peer sends until its done; whether the peer cut its half short (its
/// session budget ran out).
async fn receive(
    g: &Gossip,
    inbound: &mut Streaming<SyncMessage>,
    theirs: &Digest,
    received: &std::sync::atomic::AtomicU64,
) -> Result<bool, String> {
    loop {
        let next = tokio::time::timeout(MESSAGE_TIMEOUT, inbound.message())
            .await
            .map_err(|_| "the peer sent nothing for too long".to_string())?;
        match next {
            Ok(Some(SyncMessage {
                body: Some(Body::Batch(b)),
            })) => {
                g.sync_counters
                    .bytes_in
                    .fetch_add(prost::Message::encoded_len(&b) as u64, Ordering::Relaxed);
                let batch = remote_batch(b, theirs)?;
                let n = batch.records.len() as u64;
                g.sync_counters.records_in.fetch_add(n, Ordering::Relaxed);
                received.fetch_add(n, Ordering::Relaxed);
                g.reporter.apply(batch).await?;
            }
            Ok(Some(SyncMessage {
                body: Some(Body::Done(SyncDone { truncated })),
            })) => return Ok(truncated),
            Ok(Some(_)) => return Err("unexpected message".into()),
            Ok(None) => return Err("stream ended before done".into()),
            Err(e) => return Err(e.to_string()),
        }
    }
}

async fn both(
    g: &Gossip,
    out: Out,
    inbound: &mut Streaming<SyncMessage>,
    ours: Claim,
    theirs: Digest,
    peer: Option<std::net::IpAddr>,
) -> SyncEnd {
    // How far behind this peer we were at the hellos: what it knows that we lacked.
    let behind: u64 = lacking(&theirs, ours.digest())
        .iter()
        .map(|(_, r)| r.hi() - r.lo() + 1)
        .sum();
    let received = std::sync::atomic::AtomicU64::new(0);
    let session = async {
        let (sent, got) = tokio::join!(
            send_lacking(g, &out, &ours, &theirs),
            receive(g, inbound, &theirs, &received)
        );
        sent.and(got)
    };
    let result = match tokio::time::timeout(SESSION_TIMEOUT, session).await {
        Ok(r) => r,
        Err(_) => Err("session timed out".into()),
    };
    g.sync_counters.sessions.fetch_add(1, Ordering::Relaxed);
    if let Some(ip) = peer {
        g.sync_counters
            .record_peer(ip, behind, received.load(Ordering::Relaxed), result.is_ok());
    }
    match result {
        Ok(truncated) => {
            g.sync_counters.completed.fetch_add(1, Ordering::Relaxed);
            if truncated {
                SyncEnd::Partial
            } else {
                SyncEnd::Complete
            }
        }
        Err(e) => {
            g.sync_counters.failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %e, "sync session failed");
            SyncEnd::Failed
        }
    }
}

/// Run a session with `peer` as the client.
pub(super) async fn run_client(g: &Gossip, peer: Identity) -> SyncEnd {
    // A deadline over the handshake (a stopped peer whose kernel still accepts connections
    // must not hold a session slot for ever); the session has its own. A session that began
    // and failed is counted by `both`; one that never began, here.
    let opened = tokio::time::timeout(SESSION_TIMEOUT, async {
        let endpoint =
            super::peer_endpoint(g.advertised, peer, CONNECT_TIMEOUT).map_err(|e| e.to_string())?;
        let channel = g
            .dial
            .connect_from(endpoint, super::local_ip(g.advertised))
            .await
            .map_err(|e| e.to_string())?;
        let mut client = SyncClient::new(channel);
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        // Read beside the hello's wall clock: a step between the two readings could pass a
        // sample of the clock before it as one taken after it.
        let (hello, ours, sent) = hello(g, 0);
        let t0 = match &hello.body {
            Some(Body::Hello(h)) => h.wall_ms,
            _ => 0,
        };
        tx.send(hello).await.map_err(|e| e.to_string())?;
        let response = client
            .exchange(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?;
        let mut inbound = response.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| "no hello".to_string())?
            .map_err(|e| e.to_string())?;
        // Our clock when it arrived: t0 plus the monotonic time since (a step of our wall
        // clock in between cannot spoil the sample).
        let t3 = t0 + sent.elapsed().as_millis() as u64;
        let (theirs, clock) = their_digest(g, first).map_err(|e| e.to_string())?;
        // The round trip: our hello out and theirs back, less the time the server held ours
        // (its two readings).
        let held = Duration::from_millis(clock.wall_ms.saturating_sub(clock.received_wall_ms));
        if let Some(coordinate) = clock.coordinate.clone()
            && clock.received_wall_ms > 0
        {
            let rtt = sent.elapsed().saturating_sub(held);
            let _ = g.inputs.try_send(super::Input::CoordinateSample {
                peer,
                coordinate,
                rtt,
            });
        }
        if let Some((offset_ms, err_ms)) =
            clock_sample(t0, clock.received_wall_ms, clock.wall_ms, t3)
        {
            // Not awaited: a full input channel drops a sample, never holds a session.
            let _ = g.inputs.try_send(super::Input::ClockSample {
                peer,
                offset_ms,
                err_ms,
                sent,
            });
        }
        Ok::<_, String>((tx, inbound, ours, theirs))
    })
    .await
    .unwrap_or_else(|_| Err("no session within its deadline".into()));
    let (tx, mut inbound, ours, theirs) = match opened {
        Ok(o) => o,
        Err(e) => {
            g.sync_counters.unstarted.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %peer, error = %e, "sync session failed to start");
            return SyncEnd::Failed;
        }
    };
    let end = both(
        g,
        Out::Client(tx),
        &mut inbound,
        ours,
        theirs,
        Some(peer.api_addr().ip()),
    )
    .await;
    // Hold the call open until the server ends it, which it does once it has our done:
    // dropping it earlier resets the stream, and the server could lose our last batch and our
    // done (its session then failed with "stream ended before done").
    if end != SyncEnd::Failed {
        let _ = tokio::time::timeout(MESSAGE_TIMEOUT, async {
            while let Ok(Some(_)) = inbound.message().await {}
        })
        .await;
    }
    end
}

/// A slot of `per_peer` for the caller's address, or `refusal` as RESOURCE_EXHAUSTED when
/// it holds its share. Loopback is exempt: agents that share a host (`patina dev`, tests)
/// share an IP.
pub(super) fn peer_slot<T>(
    per_peer: &patina_trust::per_address::PerAddress,
    request: &Request<T>,
    refusal: &'static str,
) -> Result<Option<patina_trust::per_address::AddressSlot>, Status> {
    match patina_trust::server::remote_addr(request).filter(|a| !a.ip().is_loopback()) {
        Some(addr) => per_peer
            .take(addr.ip())
            .map(Some)
            .ok_or_else(|| Status::resource_exhausted(refusal)),
        None => Ok(None),
    }
}

/// The server side of `patina.v1.Sync`.
#[derive(Clone)]
pub struct SyncService {
    gossip: Gossip,
    sessions: Arc<Semaphore>,
    per_peer: patina_trust::per_address::PerAddress,
    attended: Arc<Semaphore>,
    attended_per_peer: patina_trust::per_address::PerAddress,
}

impl SyncService {
    pub(super) fn new(gossip: Gossip) -> SyncService {
        SyncService {
            gossip,
            sessions: Arc::new(Semaphore::new(MAX_SERVED_SESSIONS)),
            per_peer: patina_trust::per_address::PerAddress::new(MAX_SESSIONS_PER_PEER),
            attended: Arc::new(Semaphore::new(super::attend::MAX_ATTENDED)),
            attended_per_peer: patina_trust::per_address::PerAddress::new(
                super::attend::MAX_ATTENDED_PER_PEER,
            ),
        }
    }

    pub fn into_server(self) -> SyncServer<SyncService> {
        SyncServer::new(self)
    }
}

#[tonic::async_trait]
impl Sync for SyncService {
    type ExchangeStream = ReceiverStream<Result<SyncMessage, Status>>;
    type AttendStream = ReceiverStream<Result<AttendNotice, Status>>;

    async fn attend(
        &self,
        request: Request<AttendRequest>,
    ) -> Result<Response<Self::AttendStream>, Status> {
        super::attend::serve(
            &self.gossip,
            &self.attended,
            &self.attended_per_peer,
            self.gossip.stream_max_age,
            request,
        )
    }

    async fn exchange(
        &self,
        request: Request<Streaming<SyncMessage>>,
    ) -> Result<Response<Self::ExchangeStream>, Status> {
        // The map holds at most MAX_SERVED_SESSIONS IPs: a slot is taken only with a permit.
        let permit = self
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| Status::resource_exhausted("too many sync sessions"))?;
        let slot = peer_slot(
            &self.per_peer,
            &request,
            "too many sync sessions from this peer",
        )?;
        let peer_ip = patina_trust::server::remote_addr(&request).map(|a| a.ip());
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let arrived = self.gossip.store.wall_ms();
        let (theirs, _) = their_digest(&self.gossip, first)?;
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let (hello, ours, _) = hello(&self.gossip, arrived);
        let _ = tx.send(Ok(hello)).await;
        let g = self.gossip.clone();
        tokio::spawn(async move {
            both(&g, Out::Server(tx), &mut inbound, ours, theirs, peer_ip).await;
            drop(slot);
            drop(permit);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_coordinate_is_taken_only_when_finite_and_bounded() {
        let good = patina_proto::v1::NetworkCoordinate {
            vec: vec![0.01; crate::coords::DIMENSIONS],
            error: 0.5,
            adjustment: -0.001,
            height: 0.0001,
        };
        assert!(coordinate_of(&good).is_some());
        let bad = [
            patina_proto::v1::NetworkCoordinate {
                vec: vec![0.01; 3],
                ..good.clone()
            },
            patina_proto::v1::NetworkCoordinate {
                vec: vec![f64::NAN; crate::coords::DIMENSIONS],
                ..good.clone()
            },
            patina_proto::v1::NetworkCoordinate {
                vec: vec![50.0; crate::coords::DIMENSIONS],
                ..good.clone()
            },
            patina_proto::v1::NetworkCoordinate {
                error: -1.0,
                ..good.clone()
            },
            patina_proto::v1::NetworkCoordinate {
                height: 20.0,
                ..good.clone()
            },
            patina_proto::v1::NetworkCoordinate {
                adjustment: -50.0,
                ..good.clone()
            },
        ];
        for c in bad {
            assert!(coordinate_of(&c).is_none(), "taken: {c:?}");
        }
    }

    #[test]
    fn one_peer_gets_at_most_its_share_of_served_sessions() {
        let map = patina_trust::per_address::PerAddress::new(MAX_SESSIONS_PER_PEER);
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        let first = map.take(a).expect("a first session");
        let _second = map.take(a).expect("a second session");
        assert!(map.take(a).is_none(), "a third from one peer");
        let _other = map.take(b).expect("another peer is not starved");
        drop(first);
        assert!(map.take(a).is_some(), "a slot given back is free");
        drop(_other);
        assert_eq!(map.addresses(), 1, "no entry left behind");
    }
}
