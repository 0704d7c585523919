//! Token buckets per key, in memory: failed enrollments per client address,
//! and (`notify::subscribe`) self-service subscription requests per client
//! and confirmation mails per address.
//!
//! A check is free; what is charged is the caller's choice: enrollment
//! charges only failures, so a farm of machines behind one NAT enrolling with
//! good tokens is never slowed, and an address that keeps presenting bad
//! tokens is refused (before its token is looked at) until the allowance
//! refills; a subscription request takes one from each of its buckets
//! ([`Buckets::take`]). The map is bounded: when it is full, the keys whose
//! allowance is whole again (which carry no state) are forgotten first.
//! If none is, [`Buckets::take`] refuses the new key ([`Refused::full`])
//! rather than forget a charged one: forgetting would hand that key its
//! whole allowance back, so a client with many /64s could reset the limit
//! on a victim's mail address by filling the map. [`Buckets::charge`] (a
//! failure that already happened) forgets the one charged longest ago
//! instead. An IPv6 address counts as its /64, the block one subscriber
//! usually gets; a mail address counts in lower case.
//!
//! Not `governor`: its keyed limiter charges every check, and enrollment
//! must check for free and charge only a failure.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Keys tracked at once; beyond it the least useful entries go.
const MAX_TRACKED: usize = 10_000;

/// One key's allowance.
#[derive(Clone, Copy)]
struct Bucket {
    /// Charges it may still take now (fractional while refilling).
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
    /// Whether its being refused has been logged since it last had room, so
    /// a flood of refusals logs once.
    refusal_logged: bool,
}

/// What [`Buckets::check`] says about a key that must wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// How long until it may try again.
    pub(crate) retry_after: Duration,
    /// Whether this is the first refusal since it last had room (log it).
    pub(crate) first: bool,
    /// Whether the key was refused not for its own allowance but because
    /// the map is full of keys still charged ([`Buckets::take`] only).
    pub(crate) full: bool,
}

/// What a bucket is kept under: the same client or recipient always maps
/// to the same key.
pub(crate) trait BucketKey: Eq + Hash + Clone {
    /// The key this one is counted under.
    fn normalized(&self) -> Self;
}

/// IPv4 as is (also when mapped into IPv6), IPv6 by its /64.
impl BucketKey for IpAddr {
    fn normalized(&self) -> IpAddr {
        match *self {
            IpAddr::V4(_) => *self,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(Ipv6Addr::from(prefix))
                }
            },
        }
    }
}

/// A mail address, case-insensitively (as the `notify` tree keys it).
impl BucketKey for String {
    fn normalized(&self) -> String {
        self.trim().to_ascii_lowercase()
    }
}

/// Token buckets by key. Cheap to clone (one shared map).
#[derive(Clone)]
pub(crate) struct Buckets<K> {
    buckets: Arc<Mutex<HashMap<K, Bucket>>>,
    burst: f64,
    /// Tokens regained per second.
    refill: f64,
    max_tracked: usize,
}

/// Failed enrollments by client address (`network.enroll_failures`).
pub(crate) type FailedEnrollments = Buckets<IpAddr>;

impl<K: BucketKey> Buckets<K> {
    /// At most `burst` charges at once per key, refilling completely over
    /// `window`.
    pub(crate) fn new(burst: u32, window: Duration) -> Buckets<K> {
        let burst = f64::from(burst.max(1));
        Buckets {
            buckets: Arc::default(),
            burst,
            refill: burst / window.as_secs_f64().max(0.001),
            max_tracked: MAX_TRACKED,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Bucket>> {
        // A panic while holding this lock leaves only counters behind.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refilled(&self, b: &Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.refill).min(self.burst)
    }

    /// Whether `key` may be charged now (charges nothing).
    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), Refused> {
        self.check_in(&mut self.lock(), &key.normalized(), now)
    }

    fn check_in(&self, map: &mut HashMap<K, Bucket>, k: &K, now: Instant) -> Result<(), Refused> {
        let Some(b) = map.get_mut(k) else {
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
            full: false,
        })
    }

    /// Charges one to `key` (e.g. a failed enrollment).
    pub(crate) fn charge(&self, key: &K, now: Instant) {
        self.charge_in(&mut self.lock(), key.normalized(), now);
    }

    fn charge_in(&self, map: &mut HashMap<K, Bucket>, k: K, now: Instant) {
        if !map.contains_key(&k)
            && map.len() >= self.max_tracked
            && self.forget_refilled(map, now).is_some()
            && let Some(oldest) = map.iter().min_by_key(|(_, b)| b.at).map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
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

    /// Charges one to `key` if it has room (check and charge under one
    /// lock, so concurrent requests cannot both take the last one). A new
    /// key is refused ([`Refused::full`]) while the map is full of keys
    /// still charged: none is forgotten before its allowance is whole.
    pub(crate) fn take(&self, key: &K, now: Instant) -> Result<(), Refused> {
        let k = key.normalized();
        let mut map = self.lock();
        self.check_in(&mut map, &k, now)?;
        if !map.contains_key(&k)
            && map.len() >= self.max_tracked
            && let Some(retry_after) = self.forget_refilled(&mut map, now)
        {
            return Err(Refused {
                retry_after,
                first: true,
                full: true,
            });
        }
        self.charge_in(&mut map, k, now);
        Ok(())
    }

    /// Forgets the keys whose allowance is whole again (they carry no
    /// state). If the map is still full, how long until the first of the
    /// others is whole again.
    fn forget_refilled(&self, map: &mut HashMap<K, Bucket>, now: Instant) -> Option<Duration> {
        map.retain(|_, b| self.refilled(b, now) < self.burst);
        if map.len() < self.max_tracked {
            return None;
        }
        let most = map
            .values()
            .map(|b| self.refilled(b, now))
            .fold(0.0, f64::max);
        Some(Duration::from_secs_f64(
            ((self.burst - most) / self.refill).max(0.0),
        ))
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
            assert!(f.check(&a, t0).is_ok());
            f.charge(&a, t0);
        }
        let refused = f.check(&a, t0).unwrap_err();
        assert!(refused.first);
        // One failure refills every 10 s.
        assert_eq!(refused.retry_after.as_secs_f64().round(), 10.0);
        let again = f.check(&a, t0 + Duration::from_secs(4)).unwrap_err();
        assert!(!again.first, "a flood of refusals is logged once");
        assert_eq!(again.retry_after.as_secs_f64().round(), 6.0);
        // Another address is not affected.
        assert!(f.check(&ip("192.0.2.2"), t0).is_ok());
        // After the wait, one more try.
        let later = t0 + Duration::from_secs(10);
        assert!(f.check(&a, later).is_ok());
        f.charge(&a, later);
        assert!(f.check(&a, later).is_err());
    }

    #[test]
    fn checks_cost_nothing_only_failures_do() {
        let f = FailedEnrollments::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        let a = ip("198.51.100.7");
        for _ in 0..100 {
            assert!(f.check(&a, t0).is_ok());
        }
        f.charge(&a, t0);
        assert!(f.check(&a, t0).is_err());
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let f = FailedEnrollments::new(1, Duration::from_secs(60));
        let t0 = Instant::now();
        f.charge(&ip("2001:db8:1:2::1"), t0);
        assert!(f.check(&ip("2001:db8:1:2:ffff::9"), t0).is_err());
        assert!(f.check(&ip("2001:db8:1:3::1"), t0).is_ok());
        f.charge(&ip("::ffff:192.0.2.9"), t0);
        assert!(f.check(&ip("192.0.2.9"), t0).is_err());
    }

    #[test]
    fn the_map_stays_bounded_and_forgets_the_refilled_first() {
        let mut f = FailedEnrollments::new(2, Duration::from_secs(10));
        f.max_tracked = 3;
        let t0 = Instant::now();
        f.charge(&ip("10.0.0.1"), t0);
        f.charge(&ip("10.0.0.2"), t0 + Duration::from_secs(1));
        f.charge(&ip("10.0.0.2"), t0 + Duration::from_secs(1));
        f.charge(&ip("10.0.0.3"), t0 + Duration::from_secs(2));
        // At t0+6s, 10.0.0.1 has refilled (5 s for one failure): forgotten.
        f.charge(&ip("10.0.0.4"), t0 + Duration::from_secs(6));
        assert_eq!(f.lock().len(), 3);
        assert!(!f.lock().contains_key(&ip("10.0.0.1")));
        // Nothing refilled: the one that failed longest ago goes.
        f.charge(&ip("10.0.0.5"), t0 + Duration::from_secs(6));
        assert_eq!(f.lock().len(), 3);
        assert!(!f.lock().contains_key(&ip("10.0.0.2")));
        assert!(
            f.check(&ip("10.0.0.4"), t0 + Duration::from_secs(6))
                .is_ok()
        );
    }

    #[test]
    fn a_full_map_refuses_new_keys_to_take_rather_than_forget_a_charged_one() {
        let mut f: Buckets<String> = Buckets::new(2, Duration::from_secs(100));
        f.max_tracked = 3;
        let t0 = Instant::now();
        let victim = "victim@example.org".to_string();
        f.take(&victim, t0).unwrap();
        f.take(&victim, t0).unwrap();
        assert!(f.take(&victim, t0).is_err());
        // Others fill the map (one charge each: not whole again for 50 s).
        for i in 0..2 {
            f.take(&format!("filler{i}@example.org"), t0).unwrap();
        }
        let later = t0 + Duration::from_secs(10);
        let refused = f.take(&"new@example.org".to_string(), later).unwrap_err();
        assert!(refused.full, "{refused:?}");
        // The fillers are whole again 50 s after their charge: 40 s from now.
        assert_eq!(refused.retry_after.as_secs_f64().round(), 40.0);
        assert_eq!(f.lock().len(), 3);
        // The victim's bucket was kept: still refused for its own allowance.
        let own = f.take(&victim, later).unwrap_err();
        assert!(!own.full);
        // Once the fillers are whole again they are forgotten, and a new key
        // is taken; the victim is still charged.
        let whole = t0 + Duration::from_secs(60);
        f.take(&"new@example.org".to_string(), whole).unwrap();
        assert!(f.lock().contains_key(&victim));
        assert!(f.check(&victim, whole).is_ok(), "one refilled after 50 s");
        f.take(&victim, whole).unwrap();
        assert!(f.take(&victim, whole).is_err());
    }

    #[test]
    fn take_charges_only_when_there_is_room_and_addresses_ignore_case() {
        let f: Buckets<String> = Buckets::new(3, Duration::from_secs(3600));
        let t0 = Instant::now();
        let alice = "Alice@Example.org".to_string();
        for _ in 0..3 {
            assert!(f.take(&alice, t0).is_ok());
        }
        let refused = f.take(&" alice@example.ORG".to_string(), t0).unwrap_err();
        // One mail refills every 20 minutes.
        assert_eq!(refused.retry_after.as_secs(), 20 * 60);
        // A refused take charged nothing: the wait does not grow.
        let again = f.take(&alice, t0).unwrap_err();
        assert_eq!(again.retry_after, refused.retry_after);
        assert!(f.take(&"bob@example.org".to_string(), t0).is_ok());
        assert!(f.take(&alice, t0 + Duration::from_secs(20 * 60)).is_ok());
        assert!(f.take(&alice, t0 + Duration::from_secs(20 * 60)).is_err());
    }
}
