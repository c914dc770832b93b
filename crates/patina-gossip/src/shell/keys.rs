//! `Admin.Keyring`: a keyring operation applied on this agent, written to its keyring file,
//! then sent to every active member (each applies it to itself and answers for itself), as
//! `consul keyring` does. A refusal here changes nothing anywhere.

use std::sync::Arc;
use std::time::Duration;

use patina_proto::v1::admin_client::AdminClient;
use patina_proto::v1::{
    KeyInfo, KeyringAgent, KeyringOp as WireOp, KeyringRequest, KeyringResponse, KeyringState,
};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tonic::Status;

use super::checks::peer_endpoint;
use super::{Gossip, Input, write_keyring};
use crate::identity::Identity;
use crate::keyring::{GossipKey, Keyring, KeyringError, KeyringOp};
use crate::node::MemberState;

/// How long each member gets to answer.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(5);
/// Members asked at once.
const MEMBER_CONCURRENCY: usize = 32;

/// The operation a request asks for (`None`: list), or INVALID_ARGUMENT.
fn parse(req: &KeyringRequest) -> Result<Option<KeyringOp>, Status> {
    let op = WireOp::try_from(req.op)
        .map_err(|_| Status::invalid_argument(format!("unknown keyring op {}", req.op)))?;
    let key = || GossipKey::parse(&req.key).map_err(|e| Status::invalid_argument(e.to_string()));
    Ok(match op {
        WireOp::KeyringList => None,
        WireOp::KeyringInstall => Some(KeyringOp::Install(key()?)),
        WireOp::KeyringUse => Some(KeyringOp::Use(key()?)),
        WireOp::KeyringRemove => Some(KeyringOp::Remove(key()?)),
        WireOp::KeyringAcceptPlaintext => Some(KeyringOp::AcceptPlaintext(true)),
        WireOp::KeyringRefusePlaintext => Some(KeyringOp::AcceptPlaintext(false)),
        WireOp::KeyringStopSealing => Some(KeyringOp::StopSealing),
    })
}

pub(super) fn state(ring: &Keyring) -> KeyringState {
    KeyringState {
        keys: ring
            .keys()
            .iter()
            .map(|k| KeyInfo {
                fingerprint: k.fingerprint(),
                in_use: ring.primary() == Some(k),
            })
            .collect(),
        accepts_plaintext: ring.accepts_plaintext(),
    }
}

/// The keyring as this agent's node holds it now.
pub(super) async fn current(gossip: &Gossip) -> Option<Keyring> {
    let (tx, rx) = oneshot::channel();
    gossip.inputs.send(Input::Keyring(None, tx)).await.ok()?;
    rx.await.ok()?.ok().map(|(_, ring)| ring)
}

/// Apply `op` on this agent and write the keyring file (changes in the order the node
/// made them: an older generation never overwrites a newer one).
async fn apply_here(gossip: &Gossip, op: Option<KeyringOp>) -> Result<Keyring, Status> {
    let (tx, rx) = oneshot::channel();
    let gone = || Status::unavailable("gossip stopped");
    gossip
        .inputs
        .send(Input::Keyring(op.clone(), tx))
        .await
        .map_err(|_| gone())?;
    let (generation, ring) = rx.await.map_err(|_| gone())?.map_err(refusal)?;
    if op.is_some() {
        let path = gossip.keyring_file.clone();
        let saved = gossip.keyring_saved.clone();
        let to_write = ring.clone();
        tokio::task::spawn_blocking(move || {
            let mut last = saved.lock().expect("keyring generation");
            if generation > *last {
                write_keyring(&path, &to_write)?;
                *last = generation;
            }
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| {
            Status::unavailable(format!(
                "the keyring changed but could not be written (it is lost at restart): {e}"
            ))
        })?;
    }
    Ok(ring)
}

fn refusal(e: KeyringError) -> Status {
    match e {
        KeyringError::BadKey => Status::invalid_argument(e.to_string()),
        _ => Status::failed_precondition(e.to_string()),
    }
}

/// What a member that `op` would cut off is doing, for operations checked on every member
/// first (`None`: applied without a check).
fn precondition(op: &KeyringOp) -> Option<String> {
    match op {
        KeyringOp::Use(k) => Some(format!("key {} is not installed on", k.fingerprint())),
        KeyringOp::Remove(k) => Some(format!("key {} is still in use on", k.fingerprint())),
        KeyringOp::AcceptPlaintext(false) => Some("plaintext is still sent by".to_owned()),
        KeyringOp::StopSealing => Some("plaintext is refused by".to_owned()),
        _ => None,
    }
}

/// Whether `op`, applied everywhere, would cut off a member whose keyring is `ring`: sealing
/// with a key it lacks, refusing plaintext while it still sends plaintext, removing the key it
/// still seals with (its datagrams could no longer be opened), or sending plaintext while it
/// refuses plaintext.
fn cuts_off(op: &KeyringOp, ring: &KeyringState) -> bool {
    match op {
        KeyringOp::Use(k) => !ring.keys.iter().any(|x| x.fingerprint == k.fingerprint()),
        KeyringOp::Remove(k) => ring
            .keys
            .iter()
            .any(|x| x.in_use && x.fingerprint == k.fingerprint()),
        KeyringOp::AcceptPlaintext(false) => !ring.keys.iter().any(|x| x.in_use),
        KeyringOp::StopSealing => !ring.accepts_plaintext,
        _ => false,
    }
}

pub(super) async fn keyring(
    gossip: &Gossip,
    req: KeyringRequest,
) -> Result<KeyringResponse, Status> {
    let op = parse(&req)?;
    let snap = gossip
        .snapshot()
        .await
        .ok_or_else(|| Status::unavailable("gossip stopped"))?;
    let members: Vec<Identity> = if req.local_only {
        Vec::new()
    } else {
        snap.members
            .iter()
            .filter(|m| m.state != MemberState::Down)
            .map(|m| m.identity)
            .collect()
    };
    // Changes that would cut members off are checked on every member first (see
    // [`cuts_off`]); a member that does not answer counts as one that would be.
    if let Some(what) = op.as_ref().and_then(precondition)
        && !members.is_empty()
    {
        let list = KeyringRequest {
            op: WireOp::KeyringList as i32,
            key: String::new(),
            local_only: true,
        };
        let op = op.as_ref().expect("a precondition comes from an op");
        let lacking: Vec<String> = ask_all(gossip, &members, list)
            .await
            .into_iter()
            .filter(|a| {
                a.keyring
                    .as_ref()
                    .filter(|_| a.ok)
                    .is_none_or(|ring| cuts_off(op, ring))
            })
            .map(|a| a.api_address)
            .collect();
        if !lacking.is_empty() {
            return Err(Status::failed_precondition(format!(
                "{what} {} (or they did not answer): nothing was changed",
                lacking.join(", ")
            )));
        }
    }
    let here = apply_here(gossip, op).await?;
    let mut agents = vec![KeyringAgent {
        member: snap.me.addr.to_string(),
        api_address: snap.me.api_addr().to_string(),
        ok: true,
        error: String::new(),
        keyring: Some(state(&here)),
    }];
    if req.local_only {
        return Ok(KeyringResponse { agents });
    }
    let forward = KeyringRequest {
        local_only: true,
        ..req
    };
    agents.extend(ask_all(gossip, &members, forward).await);
    Ok(KeyringResponse { agents })
}

/// `req` sent to every one of `members` (a few at a time, each within
/// [`MEMBER_TIMEOUT`]): each one's answer for itself, in the order of `members`.
async fn ask_all(gossip: &Gossip, members: &[Identity], req: KeyringRequest) -> Vec<KeyringAgent> {
    let slots = Arc::new(tokio::sync::Semaphore::new(MEMBER_CONCURRENCY));
    let mut asks = JoinSet::new();
    for (i, member) in members.iter().copied().enumerate() {
        let (dial, slots, forward, advertised) = (
            gossip.dial.clone(),
            slots.clone(),
            req.clone(),
            gossip.advertised,
        );
        asks.spawn(async move {
            let _slot = slots.acquire_owned().await;
            let answer = tokio::time::timeout(MEMBER_TIMEOUT, async {
                let endpoint = peer_endpoint(advertised, member, MEMBER_TIMEOUT)
                    .map_err(|e| e.to_string())?
                    .timeout(MEMBER_TIMEOUT);
                let channel = dial
                    .connect_from(endpoint, super::checks::local_ip(advertised))
                    .await
                    .map_err(|e| e.to_string())?;
                AdminClient::new(channel)
                    .keyring(forward)
                    .await
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))
            })
            .await
            .unwrap_or_else(|_| Err("no answer in time".to_owned()));
            let agent = match answer {
                Ok(r) => {
                    let mut r = r.into_inner();
                    match r.agents.drain(..).next() {
                        Some(a) => a,
                        None => failed(member, "an empty answer".into()),
                    }
                }
                Err(e) => failed(member, e),
            };
            (i, agent)
        });
    }
    let mut answers = Vec::new();
    while let Some(done) = asks.join_next().await {
        if let Ok(a) = done {
            answers.push(a);
        }
    }
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

fn failed(member: Identity, error: String) -> KeyringAgent {
    KeyringAgent {
        member: member.addr.to_string(),
        api_address: member.api_addr().to_string(),
        ok: false,
        error,
        keyring: None,
    }
}
