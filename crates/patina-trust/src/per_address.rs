//! [`PerAddress`]: slots per client address, so that one host cannot take every slot of a
//! bounded resource (served anti-entropy sessions, DNS TCP connections). Only addresses that
//! hold a slot have an entry: memory follows what is open, not who ever connected.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// At most `max` slots held at once by one address.
#[derive(Clone, Debug)]
pub struct PerAddress {
    max: usize,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// One slot of [`PerAddress`], given back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    ip: IpAddr,
    held: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PerAddress {
    pub fn new(max: usize) -> PerAddress {
        PerAddress {
            max,
            held: Arc::default(),
        }
    }

    /// A slot for `ip`, or `None` when it holds `max` already.
    pub fn take(&self, ip: IpAddr) -> Option<AddressSlot> {
        let mut held = self.held.lock().expect("per-address slots");
        let n = held.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            ip,
            held: self.held.clone(),
        })
    }

    /// Addresses holding a slot now.
    pub fn addresses(&self) -> usize {
        self.held.lock().expect("per-address slots").len()
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut held = self.held.lock().expect("per-address slots");
        if let Some(n) = held.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}
