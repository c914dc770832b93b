//! The shell's parts besides the node's task, and what supervises them: the liveness task
//! (carries the node's liveness changes to the store, coalesced per owner) and `supervise`,
//! which ends the shell when any part ends and says which.

use std::time::Duration;

use patina_store::{NodeId, Store};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{LEAVE_GRACE, ShellFailed};

/// Hide and show owners' records, the latest wish per owner winning. A change the store
/// could not take (its queue full, the disk full) is retried until it is taken: down news
/// must not be lost.
pub(super) fn spawn_liveness(
    store: Store,
) -> (
    mpsc::UnboundedSender<(NodeId, bool)>,
    tokio::task::JoinHandle<()>,
) {
    // Unbounded but small: the wishes coalesce per owner, and foca bounds owners by members.
    let (tx, mut rx) = mpsc::unbounded_channel::<(NodeId, bool)>();
    let task = tokio::spawn(async move {
        let mut wanted: std::collections::BTreeMap<NodeId, bool> = Default::default();
        loop {
            if wanted.is_empty() {
                match rx.recv().await {
                    Some((node, down)) => {
                        wanted.insert(node, down);
                    }
                    None => return,
                }
            }
            while let Ok((node, down)) = rx.try_recv() {
                wanted.insert(node, down);
            }
            let Some((&node, &down)) = wanted.iter().next() else {
                continue;
            };
            match store.set_owner_down(node, down).await {
                Ok(c) => {
                    tracing::info!(owner = %node, down, changed = c.changed, records = c.records, "liveness overlay");
                    if wanted.get(&node) == Some(&down) {
                        wanted.remove(&node);
                    }
                }
                Err(patina_store::StoreError::OwnNode(_)) => {
                    wanted.remove(&node);
                }
                Err(e) if store.failure().is_some() => {
                    tracing::warn!(owner = %node, down, error = %e, "liveness overlay: the store failed");
                    return;
                }
                Err(e) => {
                    tracing::warn!(owner = %node, down, error = %e, "liveness overlay change refused; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    (tx, task)
}

/// How long after another part ends the node's thread is waited for, to name it as the cause.
const THREAD_BLAME: Duration = Duration::from_millis(200);

/// Wait for the shell to end: the node's thread after `stop` (a graceful leave), or any part
/// first, which is a failure: `stop` is cancelled so that the node leaves, the rest is
/// stopped, and the caller learns which part ended.
pub(super) async fn supervise(
    stop: CancellationToken,
    mut thread: tokio::task::JoinHandle<bool>,
    parts: Vec<(&'static str, tokio::task::JoinHandle<()>)>,
) -> Result<(), ShellFailed> {
    let mut set = JoinSet::new();
    let mut aborts = Vec::new();
    for (name, part) in parts {
        aborts.push(part.abort_handle());
        set.spawn(async move {
            let _ = part.await;
            name
        });
    }
    let mut thread_ended = None;
    let first = tokio::select! {
        biased;
        joined = &mut thread => {
            let clean = joined.unwrap_or(false);
            thread_ended = Some(clean);
            if clean { "the gossip thread" } else { "the gossip thread (it panicked)" }
        }
        Some(Ok(name)) = set.join_next() => {
            // The node's task owns the liveness channel: when the thread dies, the liveness
            // task ends with it, and may be seen first. Name the thread then.
            match tokio::time::timeout(THREAD_BLAME, &mut thread).await {
                Ok(joined) => {
                    let clean = joined.unwrap_or(false);
                    thread_ended = Some(clean);
                    if clean { "the gossip thread" } else { "the gossip thread (it panicked)" }
                }
                Err(_) => name,
            }
        }
    };
    // Anything that ends after `stop` is part of the stop (the liveness task ends when the
    // node's task is dropped).
    let failed = match thread_ended {
        Some(true) | None if stop.is_cancelled() => None,
        _ => Some(format!("{first} ended")),
    };
    if let Some(why) = &failed {
        tracing::error!(part = %why, "a part of the gossip shell ended: the agent must stop");
        stop.cancel();
    }
    if thread_ended.is_none() {
        // The node leaves (bounded: its loop ends LEAVE_GRACE after the stop).
        let _ = tokio::time::timeout(LEAVE_GRACE * 4, &mut thread).await;
    }
    for a in aborts {
        a.abort();
    }
    set.shutdown().await;
    match failed {
        Some(why) => Err(ShellFailed(why)),
        None => Ok(()),
    }
}
