//! Failed enrollments per address: a token bucket each, in memory.
//!
//! Only failures draw from an address's allowance, so a farm of machines
//! behind one NAT enrolling with good tokens is never slowed; an address that
//! keeps presenting bad tokens is refused (before its token is looked at)
//! until the allowance refills. The map is bounded: when it is full, the
//! addresses whose allowance is whole again (which carry no state) are
//! forgotten first, then the one that failed longest ago. An IPv6 address
//! counts as its /64, the block one subscriber usually gets.
//!
//! Not `governor`: its keyed limiter charges every check, and here a check
//! must be free and only a failure charged.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Addresses tracked at once; beyond it the least useful entries go.
const MAX_TRACKED: usize = 10_000;

/// One address's allowance.
#[derive(Clone, Copy)]
struct Bucket {
    /// Failures it may still make now (fractional while refilling).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Whether its being refused has been logged since it last had room, so
    /// a flood of refusals logs once.
    refusal_logged: bool,
}

/// What [`FailedEnrollments::check`] says about an address that must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// How long until it may try again.
    pub(crate) retry_after: Duration,
    /// Whether this is the first refusal since it last had room (log it).
    pub(crate) first: bool,
}

/// Failed enrollments by address. Cheap to clone (one shared map).
#[derive(Clone)]
pub(crate) struct FailedEnrollments {
    buckets: Arc<Mutex<HashMap<IpAddr, Bucket>>>,
    burst: f64,
    /// Tokens regained per second.
    refill: f64,
    max_tracked: usize,
}

impl FailedEnrollments {
    /// At most `burst` failures at once per address, refilling completely
    /// over `window`.
    pub(crate) fn new(burst: u32, window: Duration) -> FailedEnrollments {
        let burst = f64::from(burst.max(1));
        FailedEnrollments {
            buckets: Arc::default(),
            burst,
            refill: burst / window.as_secs_f64().max(0.001),
            max_tracked: MAX_TRACKED,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Bucket>> {
        // A panic while holding this lock leaves only counters behind.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.refill).min(self.burst)
    }

    /// Whether `addr` may try to enroll now.
    pub(crate) fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Refused> {
        let mut map = self.lock();
        let Some(b) = map.get_mut(&key(addr)) else {
            return Ok(());
        };
        let tokens = self.refilled(b, now);
        if tokens >= 1.0 {
            b.refusal_logged = false;
            return Ok(());
        }
        let first = !b.refusal_logged;
        b.refusal_logged = true;
        Err(Refused {
            retry_after: Duration::from_secs_f64((1.0 - tokens) / self.refill),
            first,
        })
    }

    /// Charges one failed enrollment to `addr`.
    pub(crate) fn failed(&self, addr: IpAddr, now: Instant) {
        let k = key(addr);
        let mut map = self.lock();
        if !map.contains_key(&k) && map.len() >= self.max_tracked {
            self.make_room(&mut map, now);
        }
        let burst = self.burst;
        let b = map.entry(k).or_insert(Bucket {
            tokens: burst,
            at: now,
            refusal_logged: false,
        });
        let tokens = self.refilled(b, now);
        b.tokens = (tokens - 1.0).max(0.0);
        b.at = now;
    }

    /// Forgets the addresses whose allowance is whole again; if none is,
    /// the one that failed longest ago.
    fn make_room(&self, map: &mut HashMap<IpAddr, Bucket>, now: Instant) {
        map.retain(|_, b| self.refilled(b, now) < self.burst);
        if map.len() >= self.max_tracked
            && let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
    }
}

/// The key an address is counted under: IPv4 as is (also when mapped into
/// IPv6), IPv6 by its /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_beyond_the_burst_wait_for_the_refill() {
        let f = FailedEnrollments::new(3, Duration::from_secs(30));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(f.check(a, t0).is_ok());
            f.failed(a, t0);
        }
        let refused = f.check(a, t0).unwrap_err();
        assert!(refused.first);
        // One failure refills every 10 s.
        assert_eq!(refused.retry_after.as_secs_f64().round(), 10.0);
        let again = f.check(a, t0 + Duration::from_secs(4)).unwrap_err();
        assert!(!again.first, "a flood of refusals is logged once");
        assert_eq!(again.retry_after.as_secs_f64().round(), 6.0);
        // Another address is not affected.
        assert!(f.check(ip("192.0.2.2"), t0).is_ok());
        // After the wait, one more try.
        let later = t0 + Duration::from_secs(10);
        assert!(f.check(a, later).is_ok());
        f.failed(a, later);
        assert!(f.check(a, later).is_err());
    }

    #[test]
    fn checks_cost_nothing_only_failures_do() {
        let f = FailedEnrollments::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        for _ in 0..100 {
            assert!(f.check(a, t0).is_ok());
        }
        f.failed(a, t0);
        assert!(f.check(a, t0).is_err());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let f = FailedEnrollments::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        f.failed(ip("2001:db8:1:2::1"), t0);
        assert!(f.check(ip("2001:db8:1:2:ffff::9"), t0).is_err());
        assert!(f.check(ip("2001:db8:1:3::1"), t0).is_ok());
        f.failed(ip("::ffff:192.0.2.9"), t0);
        assert!(f.check(ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_the_refilled_first() {
        let mut f = FailedEnrollments::new(2, Duration::from_secs(10));
        f.max_tracked = 3;
        let t0 = Instant::now();
        f.failed(ip("10.0.0.1"), t0);
        f.failed(ip("10.0.0.2"), t0 + Duration::from_secs(1));
        f.failed(ip("10.0.0.2"), t0 + Duration::from_secs(1));
        f.failed(ip("10.0.0.3"), t0 + Duration::from_secs(2));
        // At t0+6s, 10.0.0.1 has refilled (5 s for one failure): forgotten.
        f.failed(ip("10.0.0.4"), t0 + Duration::from_secs(6));
        assert_eq!(f.lock().len(), 3);
        assert!(!f.lock().contains_key(&ip("10.0.0.1")));
        // Nothing refilled: the one that failed longest ago goes.
        f.failed(ip("10.0.0.5"), t0 + Duration::from_secs(6));
        assert_eq!(f.lock().len(), 3);
        assert!(!f.lock().contains_key(&ip("10.0.0.2")));
        assert!(f.check(ip("10.0.0.4"), t0 + Duration::from_secs(6)).is_ok());
    }
}
