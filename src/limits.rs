//! Per-client limits: how many blob downloads not served from the cache one client address may
//! have under way at once, counted by guards that give their slot back when dropped.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Counts the uncached downloads each client address has under way.
#[derive(Debug)]
pub struct PerClient {
    max: usize,
    // Address → downloads under way. A std mutex: every critical section is a map update, with
    // no `.await` inside. Entries are removed at zero, so the map only holds active clients.
    held: Mutex<HashMap<IpAddr, usize>>,
}

/// One download slot of one client; dropping it gives the slot back.
#[derive(Debug)]
#[must_use = "the slot is given back as soon as it is dropped"]
pub struct Slot {
    owner: Arc<PerClient>,
    client: IpAddr,
}

impl PerClient {
    /// At most `max` downloads per client address.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(PerClient {
            max,
            held: Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A panic cannot leave the map half-updated (each update is one statement), so a
        // poisoned lock still holds consistent counts.
        crate::flight::lock(&self.held)
    }

    /// A slot for `client`, or `None` when it already holds the maximum.
    pub fn try_take(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        // An IPv4 client reaching a dual-stack listener is counted as the IPv4 address.
        let client = client.to_canonical();
        let mut held = self.map();
        let n = held.entry(client).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            client,
        })
    }

    /// Downloads `client` has under way.
    pub fn held(&self, client: IpAddr) -> usize {
        self.map().get(&client.to_canonical()).copied().unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.owner.map();
        if let Some(n) = held.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_address_and_given_back_on_drop() {
        let limits = PerClient::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = limits.try_take(a).unwrap();
        let second = limits.try_take(a).unwrap();
        assert!(limits.try_take(a).is_none());
        // Another client is not affected.
        let other = limits.try_take(b).unwrap();
        assert_eq!(limits.held(a), 2);
        drop(first);
        assert_eq!(limits.held(a), 1);
        let third = limits.try_take(a).unwrap();
        drop((second, third, other));
        assert_eq!(limits.held(a), 0);
        assert!(
            limits.map().is_empty(),
            "idle clients leave no entry behind"
        );
    }

    #[test]
    fn an_ipv4_mapped_address_is_the_same_client() {
        let limits = PerClient::new(1);
        let _slot = limits.try_take("192.0.2.7".parse().unwrap()).unwrap();
        assert!(
            limits
                .try_take("::ffff:192.0.2.7".parse().unwrap())
                .is_none()
        );
    }
}
