//! A watchdog that sees each loop. Every long-lived loop of an agent (the store's writer
//! thread, the gossip thread, each runtime, the bridge's loop, ...) holds a [`Beat`] and
//! stamps it on every turn, idle or not (an idle loop wakes at least every
//! [`STAMP_EVERY`] to stamp). A monitor thread, outside every runtime so that a stuck
//! runtime cannot hold it up, checks them: a loop late past its budget is logged by name
//! with how late; past the fatal bound the monitor calls the agent's fatal action once (turn
//! unready, leave, exit non-zero so its supervisor restarts it). Under systemd it sends
//! `WATCHDOG=1` only while every loop is fresh, so systemd's own watchdog fires too when the
//! agent cannot act.
//!
//! A seed's "contagious deadlock" was a stalled loop that nothing noticed: this is what
//! notices it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often an idle loop must wake to stamp its beat.
pub const STAMP_EVERY: Duration = Duration::from_millis(250);
/// How often the monitor looks.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

struct LoopState {
    name: String,
    /// Milliseconds since the watchdog's start at the last stamp.
    last_ms: AtomicU64,
    /// Cleared when the loop ended (its beat dropped): no longer watched.
    active: AtomicBool,
}

struct Inner {
    start: Instant,
    loops: Mutex<Vec<Arc<LoopState>>>,
    /// Set when the agent was asked to stop: its loops end, and the monitor stops acting.
    disarmed: AtomicBool,
}

/// The registry of loops, shared by everything that starts one. Cheap to clone.
#[derive(Clone)]
pub struct Watchdog {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Watchdog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchdog").finish_non_exhaustive()
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Watchdog::new()
    }
}

/// A loop's heartbeat: stamp it on every turn. Dropped when the loop ends (it is then no
/// longer watched). A detached beat ([`Beat::detached`]) stamps nothing.
pub struct Beat {
    state: Option<(Arc<LoopState>, Instant)>,
}

impl Beat {
    /// A beat no watchdog watches (tests, simulations, libraries used without an agent).
    pub fn detached() -> Beat {
        Beat { state: None }
    }

    /// The loop turned.
    pub fn stamp(&self) {
        if let Some((s, start)) = &self.state {
            if BLOCK_ARMED.load(Ordering::Relaxed) {
                block_if_asked(&s.name);
            }
            s.last_ms
                .store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

/// Set once a test asked for a loop to block ([`block_loop_after`]): the only cost to every
/// stamp is this load.
static BLOCK_ARMED: AtomicBool = AtomicBool::new(false);
static BLOCK: std::sync::OnceLock<(String, Instant)> = std::sync::OnceLock::new();

/// Test-only fault injection (`PATINA_FAULT=loop-block=NAME,after-ms=N`): the loop named
/// `name` blocks its thread for good at its first stamp `after` from now, as a deadlock
/// would. Every watched loop of that name in the process blocks. Production code never calls
/// this.
pub fn block_loop_after(name: &str, after: Duration) {
    if BLOCK.set((name.to_owned(), Instant::now() + after)).is_ok() {
        BLOCK_ARMED.store(true, Ordering::Relaxed);
    }
}

fn block_if_asked(name: &str) {
    if let Some((blocked, at)) = BLOCK.get()
        && blocked == name
        && Instant::now() >= *at
    {
        tracing::warn!(
            name,
            "PATINA_FAULT: this loop blocks for good (fault injection)"
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

impl Drop for Beat {
    fn drop(&mut self) {
        if let Some((s, _)) = &self.state {
            s.active.store(false, Ordering::Relaxed);
        }
    }
}

/// A loop that is late: its name and how long since its last stamp.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Late {
    pub name: String,
    pub since: Duration,
}

/// What the monitor does past the bounds.
pub struct Bounds {
    /// A loop silent this long is logged (by name, with how late).
    pub budget: Duration,
    /// A loop silent this long ends the agent (the fatal action).
    pub fatal: Duration,
}

impl Watchdog {
    pub fn new() -> Watchdog {
        Watchdog {
            inner: Arc::new(Inner {
                start: Instant::now(),
                loops: Mutex::new(Vec::new()),
                disarmed: AtomicBool::new(false),
            }),
        }
    }

    /// Watch a new loop named `name` (names are few and fixed: they are metric labels).
    pub fn register(&self, name: impl Into<String>) -> Beat {
        let state = Arc::new(LoopState {
            name: name.into(),
            last_ms: AtomicU64::new(self.inner.start.elapsed().as_millis() as u64),
            active: AtomicBool::new(true),
        });
        let mut loops = self.inner.loops.lock().unwrap_or_else(|e| e.into_inner());
        loops.retain(|l| l.active.load(Ordering::Relaxed));
        loops.push(state.clone());
        Beat {
            state: Some((state, self.inner.start)),
        }
    }

    /// Count every loop as having turned now (after the whole process was paused: a VM
    /// paused or migrated, SIGSTOP, a frozen cgroup stops every loop at once, and none of
    /// them is stuck).
    fn forgive_all(&self) {
        let now = self.inner.start.elapsed().as_millis() as u64;
        let loops = self.inner.loops.lock().unwrap_or_else(|e| e.into_inner());
        for l in loops.iter() {
            l.last_ms.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Stop acting (the agent was asked to stop; its loops end one by one): the monitor
    /// thread returns at its next look.
    pub fn disarm(&self) {
        self.inner.disarmed.store(true, Ordering::Relaxed);
    }

    /// Each watched loop and how long since it last stamped.
    pub fn silences(&self) -> Vec<Late> {
        let now = self.inner.start.elapsed().as_millis() as u64;
        let loops = self.inner.loops.lock().unwrap_or_else(|e| e.into_inner());
        loops
            .iter()
            .filter(|l| l.active.load(Ordering::Relaxed))
            .map(|l| Late {
                name: l.name.clone(),
                since: Duration::from_millis(now.saturating_sub(l.last_ms.load(Ordering::Relaxed))),
            })
            .collect()
    }

    /// Start the monitor thread: every [`CHECK_EVERY`], each loop silent past
    /// `bounds.budget` is logged (once as it turns late, then every second while it stays
    /// so, and once when it is back); the first past `bounds.fatal` calls `fatal` with why
    /// (once). While every loop is fresh, `fresh` is called (systemd's `WATCHDOG=1`).
    pub fn spawn_monitor(
        &self,
        bounds: Bounds,
        fresh: impl Fn() + Send + 'static,
        fatal: impl FnOnce(String) + Send + 'static,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let dog = self.clone();
        std::thread::Builder::new()
            .name("patina-watchdog".into())
            .spawn(move || {
                let mut fatal = Some(fatal);
                let mut late_logged: std::collections::HashMap<String, Instant> =
                    std::collections::HashMap::new();
                loop {
                    let slept = Instant::now();
                    std::thread::sleep(CHECK_EVERY);
                    if dog.inner.disarmed.load(Ordering::Relaxed) {
                        return;
                    }
                    // The monitor's own sleep overran by half the budget: the whole process
                    // was paused, not one loop stuck. Every loop starts its count again.
                    let overran = slept.elapsed().saturating_sub(CHECK_EVERY);
                    if overran > bounds.budget / 2 {
                        tracing::warn!(paused_ms = overran.as_millis() as u64, "the process was paused: the watchdog counts every loop from now");
                        dog.forgive_all();
                        continue;
                    }
                    let silences = dog.silences();
                    let mut all_fresh = true;
                    for l in &silences {
                        if l.since <= bounds.budget {
                            if late_logged.remove(&l.name).is_some() {
                                tracing::warn!(loop_name = %l.name, "the loop turns again");
                            }
                            continue;
                        }
                        all_fresh = false;
                        let due = late_logged
                            .get(&l.name)
                            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                        if due {
                            tracing::warn!(loop_name = %l.name, late_ms = l.since.as_millis() as u64, budget_ms = bounds.budget.as_millis() as u64, "a loop is late");
                            late_logged.insert(l.name.clone(), Instant::now());
                        }
                        if l.since > bounds.fatal
                            && let Some(f) = fatal.take()
                        {
                            let why = format!(
                                "the {} loop has not turned for {} ms (bound {} ms)",
                                l.name,
                                l.since.as_millis(),
                                bounds.fatal.as_millis()
                            );
                            // Act first: logging may block (a full stderr pipe).
                            f(why.clone());
                            tracing::error!(reason = %why, "watchdog: the agent stops");
                        }
                    }
                    if all_fresh {
                        fresh();
                    }
                }
            })
    }
}

/// systemd's notification socket (`$NOTIFY_SOCKET`), if the agent runs under systemd with
/// `Type=notify`.
pub struct Notify {
    socket: std::os::unix::net::UnixDatagram,
    addr: std::os::unix::net::SocketAddr,
}

impl Notify {
    /// From the environment (`None`: not under systemd's notify protocol).
    pub fn from_env() -> Option<Notify> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let path = path.to_str()?;
        let addr = if let Some(name) = path.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
        } else {
            std::os::unix::net::SocketAddr::from_pathname(path).ok()?
        };
        let socket = std::os::unix::net::UnixDatagram::unbound().ok()?;
        Some(Notify { socket, addr })
    }

    /// Send `state` (e.g. `READY=1`, `WATCHDOG=1`); errors are ignored (systemd may be gone).
    pub fn send(&self, state: &str) {
        let _ = self.socket.send_to_addr(state.as_bytes(), &self.addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_loop_is_seen_and_a_dropped_one_is_forgotten() {
        let dog = Watchdog::new();
        let busy = dog.register("busy");
        let _stuck = dog.register("stuck");
        let gone = dog.register("gone");
        drop(gone);
        std::thread::sleep(Duration::from_millis(60));
        busy.stamp();
        let s = dog.silences();
        assert_eq!(s.len(), 2, "{s:?}");
        let of = |n: &str| s.iter().find(|l| l.name == n).unwrap().since;
        assert!(of("stuck") >= Duration::from_millis(50), "{s:?}");
        assert!(of("busy") < Duration::from_millis(50), "{s:?}");
        Beat::detached().stamp();
    }

    #[test]
    fn the_monitor_calls_fatal_once_for_a_stuck_loop() {
        let dog = Watchdog::new();
        let _stuck = dog.register("stuck");
        let (tx, rx) = std::sync::mpsc::channel();
        dog.spawn_monitor(
            Bounds {
                budget: Duration::from_millis(100),
                fatal: Duration::from_millis(300),
            },
            || {},
            move |why| tx.send(why).unwrap(),
        )
        .unwrap();
        let why = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(why.contains("the stuck loop"), "{why}");
        assert!(rx.recv_timeout(Duration::from_millis(500)).is_err(), "once");
    }
}
