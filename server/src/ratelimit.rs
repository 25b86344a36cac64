//! Token buckets: one per connection (owned by its task) and one per tenant (shared). A bucket
//! refills at `rate` tokens per second up to a burst of one second's worth.

use std::sync::Mutex;
use std::time::Instant;

use dashmap::DashMap;

use hoard_types::TenantId;

/// A token bucket.
#[derive(Debug)]
pub struct TokenBucket {
    rate_per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate_per_second: u32) -> TokenBucket {
        TokenBucket {
            rate_per_second: f64::from(rate_per_second),
            tokens: f64::from(rate_per_second),
            last: Instant::now(),
        }
    }

    /// Takes `cost` tokens at time `now`; on refusal, how long until they would be there (ms).
    pub fn take_at(&mut self, cost: u64, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate_per_second).min(self.rate_per_second);
        let cost = cost as f64;
        if cost <= self.tokens {
            self.tokens -= cost;
            return Ok(());
        }
        if self.rate_per_second <= 0.0 {
            return Err(1_000);
        }
        let missing = cost.min(self.rate_per_second) - self.tokens;
        Err(((missing / self.rate_per_second) * 1_000.0).ceil().max(1.0) as u64)
    }

    pub fn take(&mut self, cost: u64) -> Result<(), u64> {
        self.take_at(cost, Instant::now())
    }
}

/// Per-tenant buckets, created on first use.
pub struct TenantBuckets {
    rate_per_second: u32,
    buckets: DashMap<TenantId, Mutex<TokenBucket>>,
}

impl TenantBuckets {
    pub fn new(rate_per_second: u32) -> TenantBuckets {
        TenantBuckets {
            rate_per_second,
            buckets: DashMap::new(),
        }
    }

    pub fn take(&self, tenant: TenantId, cost: u64) -> Result<(), u64> {
        let bucket = self
            .buckets
            .entry(tenant)
            .or_insert_with(|| Mutex::new(TokenBucket::new(self.rate_per_second)));
        let result = bucket.lock().expect("bucket lock").take(cost);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10);
        bucket.last = start;
        for _ in 0..10 {
            bucket.take_at(1, start).unwrap();
        }
        let wait = bucket.take_at(1, start).unwrap_err();
        assert_eq!(wait, 100);
        bucket.take_at(1, start + Duration::from_millis(100)).unwrap();
        assert!(bucket.take_at(1, start + Duration::from_millis(100)).is_err());
        // Never more than the burst, however long it rested.
        let later = start + Duration::from_secs(60);
        bucket.take_at(10, later).unwrap();
        assert!(bucket.take_at(1, later).is_err());
    }

    #[test]
    fn tenants_have_separate_buckets() {
        let buckets = TenantBuckets::new(2);
        buckets.take(TenantId(1), 2).unwrap();
        assert!(buckets.take(TenantId(1), 1).is_err());
        buckets.take(TenantId(2), 2).unwrap();
    }
}
