//! What one agent grants its clients: connections, streams per connection and Watch streams.
//! Each bound keeps what a client (or many) can make the agent hold finite; `docs/api.md`
//! says what a client sees when it meets one.

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Bounds on what clients may hold open at once. The defaults fit one agent per worker host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open client connections. One more is answered `RESOURCE_EXHAUSTED` and closed.
    /// Every connection costs a file descriptor and a task: the process's descriptor limit
    /// must be above this.
    pub max_connections: NonZeroUsize,
    /// A connection that has not sent a single byte by then is closed: an idle socket must
    /// not hold a connection slot for ever.
    pub handshake_timeout: Duration,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`: concurrent calls on one connection.
    pub max_streams_per_connection: NonZeroU32,
    /// Open Watch streams across the agent. One more is answered `RESOURCE_EXHAUSTED` at once.
    pub max_watches: NonZeroUsize,
    /// A connection this old is asked to go away (HTTP/2 GOAWAY: calls in flight finish,
    /// the client makes its next ones on a new connection), and a Watch stream ends at 90 to
    /// 100 % of this age (its client resumes with its token). Bounds how long a certificate
    /// the agent no longer trusts (its CA dropped from the bundle) keeps being served.
    pub max_connection_age: Duration,
    /// Where the listener and the Watch streams count what is open now (for metrics).
    pub occupancy: Occupancy,
}

/// What clients hold open now: client connections admitted and Watch streams.
#[derive(Debug, Default)]
pub struct Counts {
    pub connections: AtomicI64,
    pub watches: AtomicI64,
    /// xDS (ADS) streams.
    pub xds_streams: AtomicI64,
}

/// A handle on an agent's [`Counts`] (none: not counted). One per agent for the process's
/// life: [`Occupancy::new`] leaks its few bytes so that `Limits` stays `Copy`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Occupancy(Option<&'static Counts>);

impl Occupancy {
    pub fn new() -> Occupancy {
        Occupancy(Some(Box::leak(Box::default())))
    }

    pub fn counts(&self) -> Option<&'static Counts> {
        self.0
    }

    /// One more of `what` open until the guard drops.
    pub fn hold(&self, what: fn(&Counts) -> &AtomicI64) -> Held {
        if let Some(c) = self.0 {
            what(c).fetch_add(1, Ordering::Relaxed);
        }
        Held(self.0.map(what))
    }
}

/// Two limits are the same whatever they count into.
impl PartialEq for Occupancy {
    fn eq(&self, _: &Occupancy) -> bool {
        true
    }
}
impl Eq for Occupancy {}

/// Counted while held.
#[derive(Debug)]
pub struct Held(Option<&'static AtomicI64>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(a) = self.0 {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // 16 Ki: far above the proxies and orchestrators of one region, and (with its
            // descriptor reserve) below the common 65536 hard descriptor limit.
            max_connections: NonZeroUsize::new(16 * 1024).expect("non-zero"),
            // A real client sends its HTTP/2 preface right after connecting; 5 s covers a
            // slow handshake on a congested link.
            handshake_timeout: Duration::from_secs(5),
            // What many gRPC servers advertise; a proxy multiplexes its calls on a few
            // connections, and more streams than this on one is a client bug or an attack.
            max_streams_per_connection: NonZeroU32::new(256).expect("non-zero"),
            // A stalled watcher costs the agent its HTTP/2 send buffer (hyper's 400 KiB) plus
            // one message being built: about 350 KiB measured with typical machines
            // (`cargo xtask bench watchers`), up to ~2.4 MiB with 4 KiB records. 1024 is
            // several times the proxies and bridges of one region; every watcher stalled then
            // costs ~350 MiB with typical records (~2.4 GiB at the 4 KiB record limit): lower
            // it on small hosts.
            max_watches: NonZeroUsize::new(1024).expect("non-zero"),
            // An hour: a dropped CA's connections are gone within 65 minutes, and every
            // client reconnects (a watch resumes) about once an hour.
            max_connection_age: Duration::from_secs(3600),
            occupancy: Occupancy::default(),
        }
    }
}
