//! Rate limits: `governor`'s GCRA with a bounded, least-recently-used key store.
//!
//! A limit allows `burst` at once and refills at `per_second` (requests or facts, depending on
//! the caller). governor's own keyed stores grow with every key and are only shrunk by a sweep
//! over all of them; keys come from the request (source addresses, client ids), so here they
//! live in an [`lru::LruCache`] of a fixed capacity: a new key beyond it evicts the least
//! recently seen one in O(1), and memory is bounded whatever the traffic. An evicted key starts
//! again with a full burst, which needs `capacity` other keys to be seen in between.

use std::fmt;
use std::hash::Hash;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use governor::clock::DefaultClock;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::Quota;
use lru::LruCache;
use serde::{Deserialize, Serialize};

/// One limit: sustained rate and burst. A rate of 0 disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub per_second: f64,
    pub burst: f64,
}

impl Limit {
    /// Checks the values (at configuration load).
    pub fn validate(&self) -> Result<(), String> {
        if !self.per_second.is_finite() || self.per_second < 0.0 {
            return Err(format!("per_second = {} must be 0 (off) or more", self.per_second));
        }
        if self.per_second > 0.0 && !(self.burst >= 1.0 && self.burst <= f64::from(u32::MAX)) {
            return Err(format!("burst = {} must be at least 1", self.burst));
        }
        Ok(())
    }

    fn quota(&self) -> Option<Quota> {
        if self.per_second <= 0.0 || !self.per_second.is_finite() {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / self.per_second).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst.clamp(1.0, f64::from(u32::MAX)) as u32)?;
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

/// governor state (the GCRA's "theoretical arrival time" per key) in an LRU cache.
pub struct LruStore<K: Hash + Eq> {
    map: Mutex<LruCache<K, Nanos>>,
}

impl<K: Hash + Eq> LruStore<K> {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self { map: Mutex::new(LruCache::new(capacity)) }
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq + Clone> StateStore for LruStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let (result, state) = f(map.get(key).copied())?;
        // `put` of a new key beyond the capacity evicts the least recently used one.
        map.put(key.clone(), state);
        Ok(result)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for LruStore<K> {
    /// Not used by the collector (eviction is by capacity); kept correct for governor.
    fn retain_recent(&self, drop_below: Nanos) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let old: Vec<K> = map.iter().filter(|(_, t)| **t < drop_below).map(|(k, _)| k.clone()).collect();
        for k in old {
            map.pop(&k);
        }
    }

    fn len(&self) -> usize {
        LruStore::len(self)
    }

    fn is_empty(&self) -> bool {
        LruStore::is_empty(self)
    }
}

impl<K: Hash + Eq> fmt::Debug for LruStore<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LruStore").field("keys", &self.len()).finish()
    }
}

/// A rate limit per key `K`, remembering at most `capacity` keys.
pub struct RateLimiter<K: Hash + Eq + Clone> {
    limit: Limit,
    inner: Option<governor::RateLimiter<K, LruStore<K>, DefaultClock>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: Limit, capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        let inner =
            limit.quota().map(|q| governor::RateLimiter::new(q, LruStore::new(capacity), DefaultClock::default()));
        Self { limit, inner }
    }

    /// Takes one unit for `key`; false when the key is over its limit (nothing is taken then).
    pub fn check(&self, key: &K) -> bool {
        self.inner.as_ref().is_none_or(|l| l.check_key(key).is_ok())
    }

    /// Keys remembered.
    pub fn len(&self) -> usize {
        self.inner.as_ref().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq + Clone> fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter").field("limit", &self.limit).field("keys", &self.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(Limit { per_second: 10.0, burst: 5.0 }, 100);
        for _ in 0..5 {
            assert!(rl.check(&"ip"));
        }
        assert!(!rl.check(&"ip"));
        assert!(rl.check(&"other"), "keys are independent");
        std::thread::sleep(Duration::from_millis(120));
        assert!(rl.check(&"ip"), "one unit refilled after 100 ms");
        assert!(!rl.check(&"ip"));
    }

    #[test]
    fn zero_rate_disables() {
        let rl = RateLimiter::new(Limit { per_second: 0.0, burst: 0.0 }, 10);
        assert!((0..1000).all(|_| rl.check(&1)));
        assert_eq!(rl.len(), 0);
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_key_goes_first() {
        let rl = RateLimiter::new(Limit { per_second: 0.001, burst: 1.0 }, 3);
        for k in 0..100_000u32 {
            assert!(rl.check(&k), "a new key has its burst");
        }
        assert_eq!(rl.len(), 3, "only the capacity is kept");
        // 99_999 was seen last: still limited. 0 was evicted long ago: a fresh burst.
        assert!(!rl.check(&99_999));
        assert!(rl.check(&0));
        // Touching a key keeps it: the new key 2 evicts 0, not 99_999 checked just before.
        rl.check(&1);
        assert!(!rl.check(&99_999));
        rl.check(&2);
        assert!(!rl.check(&99_999));
        assert!(rl.check(&0), "0 was evicted again");
    }

    #[test]
    fn limits_are_validated() {
        assert!(Limit { per_second: 1.0, burst: 1.0 }.validate().is_ok());
        assert!(Limit { per_second: 0.0, burst: 0.0 }.validate().is_ok());
        assert!(Limit { per_second: 1.0, burst: 0.5 }.validate().is_err());
        assert!(Limit { per_second: f64::NAN, burst: 1.0 }.validate().is_err());
    }
}
