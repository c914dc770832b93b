//! [`Hub`]: what changed, for every ADS stream of an agent: a bounded log of changes to apps
//! (sequence-numbered) and a watch of the newest sequence number. Producers (a region's
//! store follower, a global agent's table follower) publish at most once per debounce
//! period; each stream reads the log from its own position, so one change to one app costs
//! every stream a message about that app, not a snapshot. A stream that falls more than the
//! log's length behind starts over (state of the world) or is ended (delta: its client
//! reconnects and says what it holds).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// What happened to an app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// It exists now and did not before: every resource of it is new.
    Added,
    /// It no longer exists: every resource of it is gone.
    Removed,
    /// Its endpoints changed.
    Endpoints,
}

/// One change: to one app, or (`app: None`) to every app's endpoints (a region went stale
/// or fresh at a global agent: every order and locality may differ).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub app: Option<Arc<str>>,
    pub change: Change,
}

/// The stream fell further behind than the log holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Behind;

/// Changes kept by default: about 3 MiB of log at most.
pub const DEFAULT_LOG: usize = 65_536;

pub struct Hub {
    log: Mutex<Log>,
    newest: watch::Sender<u64>,
}

struct Log {
    events: VecDeque<Event>,
    cap: usize,
    next: u64,
}

impl Hub {
    pub fn new(cap: usize) -> Hub {
        Hub {
            log: Mutex::new(Log {
                events: VecDeque::new(),
                cap: cap.max(1),
                next: 1,
            }),
            newest: watch::channel(0).0,
        }
    }

    /// Publish changes (one batch: one wake-up of every stream).
    pub fn publish(&self, changes: impl IntoIterator<Item = (Option<Arc<str>>, Change)>) {
        let newest = {
            let mut log = self.log.lock().expect("hub log");
            let mut published = false;
            for (app, change) in changes {
                let seq = log.next;
                log.next += 1;
                if log.events.len() == log.cap {
                    log.events.pop_front();
                }
                log.events.push_back(Event { seq, app, change });
                published = true;
            }
            if !published {
                return;
            }
            log.next - 1
        };
        self.newest.send_replace(newest);
    }

    /// The newest sequence number, and a receiver that wakes when it moves.
    pub fn subscribe(&self) -> (u64, watch::Receiver<u64>) {
        let mut rx = self.newest.subscribe();
        let now = *rx.borrow_and_update();
        (now, rx)
    }

    pub fn newest(&self) -> u64 {
        *self.newest.borrow()
    }

    /// The changes after `after`, oldest first, or [`Behind`] when some of them have left
    /// the log.
    pub fn since(&self, after: u64) -> Result<Vec<Event>, Behind> {
        let log = self.log.lock().expect("hub log");
        let Some(first) = log.events.front() else {
            return Ok(Vec::new());
        };
        if after + 1 < first.seq {
            return Err(Behind);
        }
        let skip = (after + 1 - first.seq) as usize;
        Ok(log.events.iter().skip(skip).cloned().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_read_from_their_position_and_learn_when_they_fell_behind() {
        let hub = Hub::new(3);
        let (start, _rx) = hub.subscribe();
        assert_eq!(start, 0);
        hub.publish([(Some("a".into()), Change::Added)]);
        hub.publish([
            (Some("b".into()), Change::Added),
            (Some("a".into()), Change::Endpoints),
        ]);
        assert_eq!(hub.newest(), 3);
        let all = hub.since(0).unwrap();
        assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(hub.since(2).unwrap().len(), 1);
        assert!(hub.since(3).unwrap().is_empty());
        hub.publish([(None, Change::Endpoints)]);
        assert_eq!(hub.since(0), Err(Behind), "event 1 left the log");
        assert_eq!(hub.since(1).unwrap().len(), 3);
        hub.publish(std::iter::empty());
        assert_eq!(hub.newest(), 4, "an empty batch publishes nothing");
    }
}
