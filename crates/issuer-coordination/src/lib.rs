//! Coordination between replicas, on Redis or in-process. `events`: fan-out of "new events"
//! announcements. `ratelimit`: request budgets. Idempotency locks: `RedisLock` for replicas
//! sharing a Redis (`SET NX PX`, released by a compare-and-delete script) and `InProcessLock`
//! for the embedded default. Both only spare
//! duplicate work; the store's unique constraint is what makes creates idempotent, so every
//! Redis failure is reported as a `LockError` for the caller to proceed without the lock,
//! quickly: operations time out instead of hanging.

pub mod events;
pub mod ratelimit;

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use async_trait::async_trait;
use issuer_domain::{
    ids::random_token,
    ports::{IdempotencyLock, LockAttempt, LockError, LockToken},
};
use redis::{
    AsyncCommands, Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::Notify;

/// Deletes the key only while it still holds our token.
const RELEASE: &str = r#"if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) else return 0 end"#;

/// A lock in Redis, shared by every replica.
#[derive(Clone)]
pub struct RedisLock {
    conn: ConnectionManager,
    release: Script,
}

impl RedisLock {
    /// Connects lazily: the service starts, degraded, while Redis is down.
    pub fn connect(url: &str) -> Result<Self, LockError> {
        let client = Client::open(url).map_err(err)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_millis(500)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(err)?;
        Ok(Self {
            conn,
            release: Script::new(RELEASE),
        })
    }

    /// The connection, for other users of the same Redis (rate limits).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

fn err(e: redis::RedisError) -> LockError {
    LockError(e.to_string())
}

#[async_trait]
impl IdempotencyLock for RedisLock {
    #[tracing::instrument(name = "redis.lock.acquire", skip_all, fields(db.system = "redis", db.operation = "SET NX", otel.kind = "client"))]
    async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<LockAttempt, LockError> {
        let token = random_token(16);
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        let mut conn = self.conn.clone();
        loop {
            let opts = redis::SetOptions::default()
                .conditional_set(redis::ExistenceCheck::NX)
                .with_expiration(redis::SetExpiry::PX(ttl.as_millis() as u64));
            let set: Option<String> = conn.set_options(key, &token, opts).await.map_err(err)?;
            if set.is_some() {
                return Ok(LockAttempt::Acquired(LockToken(token)));
            }
            if Instant::now() + pause > deadline {
                return Ok(LockAttempt::Busy);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    #[tracing::instrument(name = "redis.lock.release", skip_all, fields(db.system = "redis", db.operation = "EVALSHA", otel.kind = "client"))]
    async fn release(&self, key: &str, token: &LockToken) -> Result<(), LockError> {
        let mut conn = self.conn.clone();
        let _: i64 = self
            .release
            .key(key)
            .arg(&token.0)
            .invoke_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), LockError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING")
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(())
    }
}

/// A lock inside one process, for the embedded default (one instance, no Redis).
#[derive(Default)]
pub struct InProcessLock {
    held: Mutex<HashMap<String, (String, Instant)>>,
    released: Notify,
}

impl InProcessLock {
    pub fn new() -> Self {
        Self::default()
    }

    fn try_take(&self, key: &str, token: &str, ttl: Duration) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        held.retain(|_, (_, until)| *until > now);
        if held.contains_key(key) {
            return false;
        }
        held.insert(key.to_owned(), (token.to_owned(), now + ttl));
        true
    }
}

#[async_trait]
impl IdempotencyLock for InProcessLock {
    async fn acquire(
        &self,
        key: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<LockAttempt, LockError> {
        let token = random_token(16);
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before checking, so a release in between is not missed.
            let notified = self.released.notified();
            if self.try_take(key, &token, ttl) {
                return Ok(LockAttempt::Acquired(LockToken(token)));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(LockAttempt::Busy);
            }
            // Also wake up periodically: a holder's lock may lapse without a release.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(50)), notified)
                .await;
        }
    }

    async fn release(&self, key: &str, token: &LockToken) -> Result<(), LockError> {
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if held.get(key).is_some_and(|(t, _)| *t == token.0) {
                held.remove(key);
            }
        }
        self.released.notify_waiters();
        Ok(())
    }

    async fn ping(&self) -> Result<(), LockError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    async fn exclusive(lock: Arc<dyn IdempotencyLock>, key: &str) {
        let ttl = Duration::from_secs(5);
        let LockAttempt::Acquired(first) = lock.acquire(key, ttl, Duration::ZERO).await.unwrap()
        else {
            panic!("a free lock is acquired");
        };
        assert_eq!(
            lock.acquire(key, ttl, Duration::from_millis(30))
                .await
                .unwrap(),
            LockAttempt::Busy
        );
        // Releasing with a foreign token leaves the lock held.
        lock.release(key, &LockToken("other".into())).await.unwrap();
        assert_eq!(
            lock.acquire(key, ttl, Duration::ZERO).await.unwrap(),
            LockAttempt::Busy
        );
        // A waiter gets the lock as soon as the holder releases it.
        let waiter = {
            let lock = lock.clone();
            let key = key.to_owned();
            tokio::spawn(async move { lock.acquire(&key, ttl, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        lock.release(key, &first).await.unwrap();
        let LockAttempt::Acquired(second) = waiter.await.unwrap().unwrap() else {
            panic!("the waiter gets the released lock");
        };
        lock.release(key, &second).await.unwrap();
    }

    #[tokio::test]
    async fn in_process_lock_is_exclusive() {
        exclusive(Arc::new(InProcessLock::new()), "k").await;
    }

    #[tokio::test]
    async fn in_process_lock_lapses_after_ttl() {
        let lock = InProcessLock::new();
        let ttl = Duration::from_millis(20);
        assert!(matches!(
            lock.acquire("k", ttl, Duration::ZERO).await.unwrap(),
            LockAttempt::Acquired(_)
        ));
        assert!(matches!(
            lock.acquire("k", ttl, Duration::from_millis(200))
                .await
                .unwrap(),
            LockAttempt::Acquired(_)
        ));
    }

    #[tokio::test]
    async fn redis_lock_is_exclusive() {
        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let key = format!("issuer:{{test}}:lock:{}", random_token(8));
        exclusive(Arc::new(RedisLock::connect(&url).unwrap()), &key).await;
    }

    #[tokio::test]
    async fn redis_down_is_an_error_not_a_hang() {
        // Nothing listens on port 1.
        let lock = RedisLock::connect("redis://127.0.0.1:1").unwrap();
        let started = Instant::now();
        assert!(
            lock.acquire("k", Duration::from_secs(1), Duration::from_secs(1))
                .await
                .is_err()
        );
        assert!(lock.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
