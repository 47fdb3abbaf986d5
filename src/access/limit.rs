//! Failed logins counted per client address: after `max` failures within a window that starts
//! at the first of them, the address may not try again until the window is over. Runs on
//! tokio's clock, so tests drive it with paused time.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::flight::lock;

/// Failures of one address within the current window.
#[derive(Debug)]
struct Window {
    started: Instant,
    failures: u32,
}

/// The failed-login counters.
pub struct FailedLogins {
    max: u32,
    window: Duration,
    // One small mutex per address, held only to read or bump its counter (never across an
    // `.await`). The cache bounds memory under a flood of addresses; its own time-to-live
    // (wall clock) only forgets old entries, the decisions use tokio's clock.
    by_address: moka::sync::Cache<IpAddr, Arc<Mutex<Window>>>,
}

/// The key an address is counted under: IPv6 clients by their /64, since one host usually
/// holds a whole /64.
fn key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl FailedLogins {
    /// At most `max` failures per address within `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        FailedLogins {
            max,
            window,
            by_address: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(window)
                .build(),
        }
    }

    /// The window failures are counted in.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// `Err(retry_after)` while `ip` has used up its failures for the current window.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        let Some(entry) = self.by_address.get(&key(ip)) else {
            return Ok(());
        };
        let w = lock(&entry);
        let ends = w.started + self.window;
        let now = Instant::now();
        if w.failures >= self.max && now < ends {
            return Err(ends - now);
        }
        Ok(())
    }

    /// Counts a failed login from `ip`. Returns true when this failure used up the last try.
    pub fn fail(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        let entry = self.by_address.get_with(key(ip), || {
            Arc::new(Mutex::new(Window {
                started: now,
                failures: 0,
            }))
        });
        let mut w = lock(&entry);
        if now >= w.started + self.window {
            *w = Window {
                started: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        w.failures == self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn blocks_after_max_failures_until_the_window_ends() {
        let limit = FailedLogins::new(3, Duration::from_secs(60));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(limit.check(a), Ok(()));
        assert!(!limit.fail(a));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!limit.fail(a));
        assert_eq!(limit.check(a), Ok(()));
        assert!(limit.fail(a));
        // The window started with the first failure: 50 s are left.
        assert_eq!(limit.check(a), Err(Duration::from_secs(50)));
        assert_eq!(limit.check(b), Ok(()));
        tokio::time::advance(Duration::from_secs(49)).await;
        assert_eq!(limit.check(a), Err(Duration::from_secs(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(limit.check(a), Ok(()));
        // A new window starts with the next failure.
        assert!(!limit.fail(a));
        assert_eq!(limit.check(a), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let limit = FailedLogins::new(1, Duration::from_secs(60));
        limit.fail("2001:db8:1:2::1".parse().unwrap());
        assert!(limit.check("2001:db8:1:2::ffff".parse().unwrap()).is_err());
        assert!(limit.check("2001:db8:1:3::1".parse().unwrap()).is_ok());
        limit.fail("::ffff:192.0.2.7".parse().unwrap());
        assert!(limit.check("192.0.2.7".parse().unwrap()).is_err());
    }
}
