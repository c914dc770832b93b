//! What a bridge signs, and the check every global agent and edge makes before it takes a
//! summary or a heartbeat: the bridge's certificate chains to the operator's CA and names the
//! record's region in the global cluster, and the signature covers exactly this record (its
//! app and region included, so a signed summary cannot be replayed under another key).
//!
//! Messages are domain-separated and length-prefixed, so no summary's bytes are a heartbeat's
//! or another summary's.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use patina_proto::v1::{AppSummary, BridgeState};
use patina_trust::{Scope, SignError, Verifier, Vouched};

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The bytes a bridge signs for a summary.
pub fn summary_message(
    app: &str,
    region: &str,
    healthy: u32,
    total: u32,
    view_hlc: u64,
) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + app.len() + region.len());
    field(&mut m, b"patina-summary-v1");
    field(&mut m, app.as_bytes());
    field(&mut m, region.as_bytes());
    m.extend_from_slice(&healthy.to_be_bytes());
    m.extend_from_slice(&total.to_be_bytes());
    m.extend_from_slice(&view_hlc.to_be_bytes());
    m
}

/// The bytes a bridge signs for a heartbeat: its origin, so that no other origin can carry it.
pub fn heartbeat_message(bridge: u64, region: &str, view_hlc: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + region.len());
    field(&mut m, b"patina-heartbeat-v1");
    m.extend_from_slice(&bridge.to_be_bytes());
    field(&mut m, region.as_bytes());
    m.extend_from_slice(&view_hlc.to_be_bytes());
    m
}

/// The bytes a bridge signs for its certificate record: the origin it is stored under and
/// when it was published, so that no other origin can carry it and no peer can re-date it.
pub fn certificate_message(bridge: u64, published_hlc: u64, cert: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(64 + cert.len());
    field(&mut m, b"patina-bridgecert-v1");
    m.extend_from_slice(&bridge.to_be_bytes());
    m.extend_from_slice(&published_hlc.to_be_bytes());
    field(&mut m, cert);
    m
}

/// Whether `cert` is a bridge of `region` in the global cluster `scope`, vouched for by the
/// CA bundle `verifier` follows.
pub fn bridge_of(
    verifier: &Verifier,
    scope: &Scope,
    cert: &[u8],
    region: &str,
) -> Result<Arc<Vouched>, String> {
    if cert.is_empty() {
        return Err("no bridge certificate".into());
    }
    let v = verifier.vouched(cert).map_err(|e| e.to_string())?;
    if !v.principal.bridge_regions(scope).any(|r| r == region) {
        return Err(format!(
            "the certificate ({}) does not name a bridge of region {region}",
            v.principal.name
        ));
    }
    Ok(v)
}

/// Bridges an edge vouched for: at most this many are kept (each came with a certificate the
/// CA signed, so only the operator can make more).
pub const MAX_BRIDGES: usize = 65_536;

/// The checks an edge makes on what a global agent streams: heartbeats carry the bridge's
/// certificate and signature; a summary is taken only from a bridge whose heartbeat passed,
/// for that bridge's region, with its signature. What fails is dropped and counted, and the
/// table keeps what it held.
pub struct EdgeChecks {
    verifier: Arc<Verifier>,
    scope: Scope,
    /// Each bridge whose heartbeat passed: its region and certificate (checked again against
    /// the bundle, cached, for every summary: an expired certificate or a dropped CA stops
    /// vouching at once).
    bridges: HashMap<u64, (String, Vec<u8>)>,
    refusals: Arc<Refusals>,
    /// Most threads one message's summaries are checked on.
    threads: usize,
}

/// Records an edge refused, by reason: read without the checks' lock (the checks run on a
/// blocking thread; a proxy's metrics read these from its own threads at any time).
#[derive(Debug, Default)]
pub struct Refusals {
    unsigned: AtomicU64,
    bad: AtomicU64,
}

impl Refusals {
    /// Refused for want of a signature, and for a bad one (wrong key, another region's
    /// bridge, an untrusted or expired certificate).
    pub fn get(&self) -> (u64, u64) {
        (
            self.unsigned.load(Ordering::Relaxed),
            self.bad.load(Ordering::Relaxed),
        )
    }
}

impl EdgeChecks {
    pub fn new(verifier: Arc<Verifier>, scope: Scope) -> EdgeChecks {
        EdgeChecks {
            verifier,
            scope,
            bridges: HashMap::new(),
            refusals: Arc::default(),
            threads: std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(MAX_THREADS),
        }
    }

    /// Its counts of refusals, shared (they go on counting as the checks run).
    pub fn refusals(&self) -> Arc<Refusals> {
        self.refusals.clone()
    }

    fn refuse(&mut self, why: String, unsigned: bool) -> Result<(), String> {
        let count = if unsigned {
            &self.refusals.unsigned
        } else {
            &self.refusals.bad
        };
        count.fetch_add(1, Ordering::Relaxed);
        Err(why)
    }

    /// Check a heartbeat (a removal passes: it withdraws, it claims nothing).
    pub fn bridge(&mut self, b: &BridgeState) -> Result<(), String> {
        if b.removed {
            self.bridges.remove(&b.bridge);
            return Ok(());
        }
        let vouched = match bridge_of(&self.verifier, &self.scope, &b.certificate, &b.region) {
            Ok(v) => v,
            Err(e) => return self.refuse(e, b.certificate.is_empty()),
        };
        let message = heartbeat_message(b.bridge, &b.region, b.view_hlc);
        if let Err(e) = vouched.verify(&message, &b.signature) {
            return self.refuse(format!("heartbeat: {e}"), e == SignError::Unsigned);
        }
        if self.bridges.len() >= MAX_BRIDGES && !self.bridges.contains_key(&b.bridge) {
            return self.refuse("too many bridges".into(), false);
        }
        self.bridges
            .insert(b.bridge, (b.region.clone(), b.certificate.clone()));
        Ok(())
    }

    /// Keep in `msg` only the heartbeats and summaries that pass (heartbeats first: a summary
    /// is checked against its bridge's). Summaries are checked on up to [`MAX_THREADS`]
    /// threads when there are many (a snapshot after a failover). Refusals are counted, and
    /// the first few of each message logged, then how many more.
    pub fn filter(&mut self, msg: &mut patina_proto::v1::WatchAppsResponse) {
        let mut log = RefusalLog::default();
        msg.bridges.retain(|b| match self.bridge(b) {
            Ok(()) => true,
            Err(why) => {
                if log.take() {
                    tracing::warn!(bridge = %format_args!("{:016x}", b.bridge), region = %b.region.escape_debug(), %why, "refused a bridge heartbeat: keeping the last good state");
                }
                false
            }
        });
        let verdicts = self.check_all(&msg.summaries);
        let mut verdicts = verdicts.into_iter();
        msg.summaries.retain(|s| {
            let Some(Err(refusal)) = verdicts.next() else {
                return true;
            };
            let why = self.refused(refusal, s.bridge);
            if log.take() {
                tracing::warn!(app = %s.app.escape_debug(), region = %s.region.escape_debug(), %why, "refused a summary: keeping the last good state");
            }
            false
        });
        if log.more > 0 {
            tracing::warn!(
                more = log.more,
                "refused more heartbeats or summaries in the same message"
            );
        }
    }

    /// Each summary's verdict, in order: on one thread for a few, split across threads for
    /// many.
    fn check_all(&self, summaries: &[AppSummary]) -> Vec<Result<(), Refusal>> {
        // Each bridge's certificate checked against the bundle once per message (not once
        // per summary).
        let mut vouched = HashMap::new();
        for s in summaries {
            if let Some((region, cert)) = self.bridges.get(&s.bridge) {
                vouched
                    .entry(s.bridge)
                    .or_insert_with(|| bridge_of(&self.verifier, &self.scope, cert, region));
            }
        }
        let vouched = &vouched;
        let threads = self.threads_for(summaries.len());
        let check = |part: &[AppSummary]| -> Vec<Result<(), Refusal>> {
            part.iter()
                .map(|s| self.check_summary(s, vouched))
                .collect()
        };
        if threads == 1 {
            return check(summaries);
        }
        let chunk = summaries.len().div_ceil(threads);
        std::thread::scope(|scope| {
            // A part whose thread could not be started is checked here, after the others
            // start; a part whose thread failed (a check panicked) is refused whole.
            let parts: Vec<_> = summaries
                .chunks(chunk)
                .map(|part| {
                    let spawned = std::thread::Builder::new()
                        .name("patina-edge-check".into())
                        .spawn_scoped(scope, move || check(part));
                    (part, spawned.ok())
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|(part, handle)| match handle {
                    None => check(part),
                    Some(h) => h.join().unwrap_or_else(|_| {
                        part.iter()
                            .map(|_| Err(Refusal::new("a signature check failed".into(), false)))
                            .collect()
                    }),
                })
                .collect()
        })
    }

    /// Check a message's summaries on at most `threads` threads (1 to [`MAX_THREADS`]; by
    /// default as many as the machine has, up to that).
    pub fn with_threads(mut self, threads: usize) -> EdgeChecks {
        self.threads = threads.clamp(1, MAX_THREADS);
        self
    }

    /// How many threads a message of `summaries` summaries is checked on.
    pub fn threads_for(&self, summaries: usize) -> usize {
        self.threads.min(summaries / PER_THREAD).max(1)
    }

    /// Check a summary (a removal passes, as for heartbeats).
    pub fn summary(&mut self, s: &AppSummary) -> Result<(), String> {
        let vouched = self
            .bridges
            .get(&s.bridge)
            .map(|(region, cert)| {
                (
                    s.bridge,
                    bridge_of(&self.verifier, &self.scope, cert, region),
                )
            })
            .into_iter()
            .collect();
        match self.check_summary(s, &vouched) {
            Ok(()) => Ok(()),
            Err(refusal) => Err(self.refused(refusal, s.bridge)),
        }
    }

    /// Count a refusal (and forget a bridge whose certificate stopped vouching): its reason.
    fn refused(&mut self, refusal: Refusal, bridge: u64) -> String {
        if refusal.forget_bridge {
            self.bridges.remove(&bridge);
        }
        self.refuse(refusal.why, refusal.unsigned)
            .expect_err("a refusal")
    }

    /// `vouched`: each bridge's certificate as the bundle judges it now.
    fn check_summary(
        &self,
        s: &AppSummary,
        vouched: &HashMap<u64, Result<Arc<Vouched>, String>>,
    ) -> Result<(), Refusal> {
        if s.removed {
            return Ok(());
        }
        let Some((region, _)) = self.bridges.get(&s.bridge) else {
            return Err(Refusal::new(
                format!(
                    "a summary of {}/{} from a bridge with no checked heartbeat",
                    s.app, s.region
                ),
                s.signature.is_empty(),
            ));
        };
        if *region != s.region {
            let why = format!("a bridge of {region} signed for region {}", s.region);
            return Err(Refusal::new(why, false));
        }
        let vouched = match vouched.get(&s.bridge) {
            Some(Ok(v)) => v,
            Some(Err(why)) => {
                return Err(Refusal {
                    forget_bridge: true,
                    ..Refusal::new(why.clone(), false)
                });
            }
            None => return Err(Refusal::new("a bridge not checked".into(), false)),
        };
        let message = summary_message(&s.app, &s.region, s.healthy, s.total, s.view_hlc);
        vouched.verify(&message, &s.signature).map_err(|e| {
            let why = format!("summary {}/{}: {e}", s.app, s.region);
            Refusal::new(why, e == SignError::Unsigned)
        })
    }
}

/// At most this many threads check one message's summaries.
pub const MAX_THREADS: usize = 8;
/// Fewest summaries worth a thread of their own (below, one thread checks them all).
pub const PER_THREAD: usize = 1024;
/// Refusals logged one by one per message; the rest are counted in one line.
const LOGGED_PER_MESSAGE: u32 = 8;

/// Why a summary was refused, before it is counted.
struct Refusal {
    why: String,
    unsigned: bool,
    /// Its bridge's certificate no longer vouches: forget the bridge.
    forget_bridge: bool,
}

impl Refusal {
    fn new(why: String, unsigned: bool) -> Refusal {
        Refusal {
            why,
            unsigned,
            forget_bridge: false,
        }
    }
}

#[derive(Default)]
struct RefusalLog {
    logged: u32,
    more: u64,
}

impl RefusalLog {
    /// Whether to log this refusal (else it is counted for the closing line).
    fn take(&mut self) -> bool {
        if self.logged < LOGGED_PER_MESSAGE {
            self.logged += 1;
            true
        } else {
            self.more += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_differ_whenever_a_field_does() {
        let base = summary_message("web", "ord", 1, 2, 3);
        for other in [
            summary_message("web2", "ord", 1, 2, 3),
            summary_message("web", "fra", 1, 2, 3),
            summary_message("web", "ord", 2, 2, 3),
            summary_message("web", "ord", 1, 3, 3),
            summary_message("web", "ord", 1, 2, 4),
            // Moving a byte from the app to the region changes the message too.
            summary_message("we", "bord", 1, 2, 3),
            heartbeat_message(1, "ord", 3),
        ] {
            assert_ne!(base, other);
        }
        assert_ne!(
            heartbeat_message(1, "ord", 3),
            heartbeat_message(2, "ord", 3)
        );
    }
}
