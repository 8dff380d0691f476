//! Per-IP and per-client rate limits (token buckets).
//!
//! A bucket holds up to `burst` tokens and refills at `per_second`; each request (per IP) or
//! fact (per client) takes one. Idle buckets are forgotten, so memory is bounded by the number
//! of active keys.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One limit: sustained rate and burst. A rate of 0 disables the limit.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub per_second: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets keyed by `K`.
#[derive(Debug)]
pub struct RateLimiter<K> {
    limit: Limit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    pub fn new(limit: Limit) -> Self {
        Self { limit, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes `n` tokens for `key` at `now`; false when the key is over its limit.
    pub fn try_take(&self, key: &K, n: f64, now: Instant) -> bool {
        if self.limit.per_second <= 0.0 {
            return true;
        }
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        if buckets.len() > 100_000 {
            // Forget buckets that have refilled completely: they behave like new ones.
            let full_after = self.limit.burst / self.limit.per_second;
            buckets.retain(|_, b| now.duration_since(b.updated).as_secs_f64() < full_after);
        }
        let b = buckets.entry(key.clone()).or_insert(Bucket { tokens: self.limit.burst, updated: now });
        let elapsed = now.saturating_duration_since(b.updated).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.limit.per_second).min(self.limit.burst);
        b.updated = now;
        if b.tokens >= n {
            b.tokens -= n;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(Limit { per_second: 10.0, burst: 5.0 });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(rl.try_take(&"ip", 1.0, t0));
        }
        assert!(!rl.try_take(&"ip", 1.0, t0));
        assert!(rl.try_take(&"other", 1.0, t0), "keys are independent");
        assert!(rl.try_take(&"ip", 1.0, t0 + Duration::from_millis(100)));
        assert!(!rl.try_take(&"ip", 1.0, t0 + Duration::from_millis(100)));
    }

    #[test]
    fn zero_rate_disables() {
        let rl = RateLimiter::new(Limit { per_second: 0.0, burst: 0.0 });
        assert!((0..1000).all(|_| rl.try_take(&1, 1.0, Instant::now())));
    }
}
