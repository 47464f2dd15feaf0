//! Rate limits as GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp
//! per key): in Redis for budgets shared by every replica, in-process otherwise.
//!
//! A quota of `per_sec` with `burst` admits `burst` requests at once and then one every
//! `1/per_sec` seconds. The state of a key is its theoretical arrival time (TAT): a request at
//! `now` is admitted when `max(TAT, now) + T - burst * T <= now`, and then moves the TAT on by
//! `T`. In Redis this is one script (one round trip) on the server's clock, so replicas with
//! skewed clocks share one budget. When Redis fails, each replica falls back to its own
//! in-process buckets for a while: limits loosen to per-replica budgets, they never refuse
//! everything.

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use redis::{Script, aio::ConnectionManager};

/// A budget: `per_sec` sustained, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_sec: u32,
    pub burst: u32,
}

impl Quota {
    /// Microseconds between two requests at the sustained rate (at least 1).
    fn interval_us(self) -> u64 {
        (1_000_000 / u64::from(self.per_sec.max(1))).max(1)
    }

    /// Seconds a drained bucket takes to fill up (the policy's window), at least 1.
    pub fn window_secs(self) -> u64 {
        (u64::from(self.burst.max(1)) * self.interval_us()).div_ceil(1_000_000)
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Requests that could still be made at once.
    pub remaining: u32,
    /// When refused: how long until one request is admitted again.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Takes one request from `key`'s budget under `quota`.
    async fn check(&self, key: &str, quota: Quota) -> Decision;
}

/// The GCRA step on a TAT in microseconds: the new TAT (when admitted) and the decision.
fn gcra(tat: u64, now: u64, quota: Quota) -> (Option<u64>, Decision) {
    let t = quota.interval_us();
    let burst = u64::from(quota.burst.max(1));
    let tat = tat.max(now);
    let new_tat = tat + t;
    let allow_at = new_tat.saturating_sub(burst * t);
    if now < allow_at {
        return (
            None,
            Decision {
                allowed: false,
                remaining: 0,
                retry_after: Duration::from_micros(allow_at - now),
                reset: Duration::from_micros(tat - now),
            },
        );
    }
    let remaining = (now + burst * t - new_tat) / t;
    (
        Some(new_tat),
        Decision {
            allowed: true,
            remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
            retry_after: Duration::ZERO,
            reset: Duration::from_micros(new_tat - now),
        },
    )
}

/// Keys kept in-process at most; past it, expired buckets are dropped, and if that is not
/// enough, requests of new keys are admitted untracked rather than growing memory without
/// bound (the per-connection and per-client limits still hold).
const LOCAL_MAX_KEYS: usize = 100_000;

/// Buckets in this process: the embedded default's limiter, and the fallback of the Redis one.
pub struct LocalLimiter {
    epoch: Instant,
    tats: Mutex<HashMap<String, u64>>,
}

impl Default for LocalLimiter {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            tats: Mutex::new(HashMap::new()),
        }
    }
}

impl LocalLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    pub fn check_now(&self, key: &str, quota: Quota) -> Decision {
        let now = self.now_us();
        let mut tats = self.tats.lock().unwrap_or_else(|p| p.into_inner());
        let tat = tats.get(key).copied().unwrap_or(now);
        let (new_tat, decision) = gcra(tat, now, quota);
        if let Some(new_tat) = new_tat {
            if tats.len() >= LOCAL_MAX_KEYS && !tats.contains_key(key) {
                tats.retain(|_, tat| *tat > now);
                if tats.len() >= LOCAL_MAX_KEYS {
                    tracing::warn!("rate-limit table full; admitting a new key untracked");
                    return decision;
                }
            }
            tats.insert(key.to_owned(), new_tat);
        }
        decision
    }
}

#[async_trait]
impl RateLimiter for LocalLimiter {
    async fn check(&self, key: &str, quota: Quota) -> Decision {
        self.check_now(key, quota)
    }
}

/// GCRA on the Redis server's clock. KEYS[1]: the bucket; ARGV: interval (µs), burst.
/// Returns {allowed, retry_after_us, remaining, reset_us}. Microsecond timestamps (~1.8e15)
/// are exact in Lua's doubles (up to 2^53).
const GCRA: &str = r#"
local t = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + t
local allow_at = new_tat - burst * t
if now < allow_at then
  return {0, allow_at - now, 0, tat - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0, math.floor((now + burst * t - new_tat) / t), new_tat - now}
"#;

/// How long a failed Redis call sends this replica to its local buckets before it tries
/// Redis again, so that an outage costs one slow call per interval, not one per request.
const REDIS_BACKOFF: Duration = Duration::from_secs(1);
/// A rate-limit check may not hold a request up longer than this.
const REDIS_TIMEOUT: Duration = Duration::from_millis(100);

/// Buckets in Redis, shared by every replica, falling back to [`LocalLimiter`].
pub struct RedisLimiter {
    conn: ConnectionManager,
    script: Script,
    prefix: String,
    fallback: LocalLimiter,
    epoch: Instant,
    /// Microseconds since `epoch` before which Redis is not asked.
    skip_until: AtomicU64,
}

impl RedisLimiter {
    /// `prefix` is put before every key (e.g. `issuer:rl:`).
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            script: Script::new(GCRA),
            prefix: prefix.to_owned(),
            fallback: LocalLimiter::new(),
            epoch: Instant::now(),
            skip_until: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    async fn remote(&self, key: &str, quota: Quota) -> Result<Decision, String> {
        let mut conn = self.conn.clone();
        // One hash tag per bucket: a single-key script, so any cluster slot will do.
        let key = format!("{}{{{key}}}", self.prefix);
        let mut call = self.script.key(key);
        call.arg(quota.interval_us()).arg(quota.burst.max(1));
        let reply: (i64, i64, i64, i64) =
            tokio::time::timeout(REDIS_TIMEOUT, call.invoke_async(&mut conn))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(Decision {
            allowed: reply.0 == 1,
            remaining: u32::try_from(reply.2).unwrap_or(0),
            retry_after: us(reply.1),
            reset: us(reply.3),
        })
    }
}

#[async_trait]
impl RateLimiter for RedisLimiter {
    #[tracing::instrument(name = "redis.ratelimit", skip_all, fields(db.system = "redis", db.operation = "EVALSHA", otel.kind = "client"))]
    async fn check(&self, key: &str, quota: Quota) -> Decision {
        if self.now_us() >= self.skip_until.load(Ordering::Relaxed) {
            match self.remote(key, quota).await {
                Ok(decision) => return decision,
                Err(e) => {
                    let until = self.now_us() + REDIS_BACKOFF.as_micros() as u64;
                    self.skip_until.store(until, Ordering::Relaxed);
                    tracing::warn!(error = %e, "rate limits fall back to this replica's buckets");
                }
            }
        }
        self.fallback.check_now(key, quota)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const Q: Quota = Quota {
        per_sec: 10,
        burst: 3,
    };

    #[test]
    fn a_fresh_key_admits_exactly_the_burst_then_one_per_interval() {
        let mut tat = 0;
        let now = 1_000_000;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (new, d) = gcra(tat, now, Q);
            assert!(d.allowed);
            remaining.push(d.remaining);
            tat = new.unwrap();
        }
        assert_eq!(remaining, [2, 1, 0]);
        let (new, d) = gcra(tat, now, Q);
        assert!(!d.allowed && new.is_none());
        assert_eq!(d.retry_after, Duration::from_millis(100));
        let (_, d) = gcra(tat, now + 99_999, Q);
        assert!(!d.allowed, "not before the interval");
        let (_, d) = gcra(tat, now + 100_000, Q);
        assert!(d.allowed, "one more after the interval");
    }

    #[test]
    fn an_idle_key_refills_to_the_burst_and_no_further() {
        let (tat, _) = gcra(0, 5_000_000, Q);
        let (_, d) = gcra(tat.unwrap(), 60_000_000, Q);
        assert!(d.allowed);
        assert_eq!(d.remaining, 2);
    }

    #[test]
    fn the_window_is_the_time_to_refill_the_burst() {
        let q = Quota {
            per_sec: 200,
            burst: 400,
        };
        assert_eq!(q.window_secs(), 2);
        assert_eq!(Q.window_secs(), 1);
    }

    #[test]
    fn local_buckets_are_per_key() {
        let l = LocalLimiter::new();
        assert!((0..3).all(|_| l.check_now("a", Q).allowed));
        assert!(!l.check_now("a", Q).allowed);
        assert!(l.check_now("b", Q).allowed);
    }
}
