//! Coordination between replicas, on Redis or in-process. `events`: fan-out of "new events"
//! announcements. `ratelimit`: request budgets. `replay`: single-use values (DPoP `jti`s). Idempotency locks: `RedisLock` for replicas
//! sharing a Redis (`SET NX PX`, released by a compare-and-delete script) and `InProcessLock`
//! for the embedded default. Both only spare
//! duplicate work; the store's unique constraint is what makes creates idempotent, so every
//! Redis failure is reported as a `LockError` for the caller to proceed without the lock,
//! quickly: operations time out instead of hanging.

pub mod events;
pub mod ratelimit;
pub mod replay;

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
    Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::Notify;

/// Sets each free key to the token with a time to live; 1 for each key taken, 0 for each held.
/// The keys of one call share their tenant's hash tag, so on Redis Cluster they share a slot.
const ACQUIRE: &str = r#"local taken = {}
for i, key in ipairs(KEYS) do
  if redis.call("SET", key, ARGV[1], "NX", "PX", ARGV[2]) then taken[i] = 1 else taken[i] = 0 end
end
return taken"#;

/// Deletes each key only while it still holds our token.
const RELEASE: &str = r#"local n = 0
for _, key in ipairs(KEYS) do
  if redis.call("GET", key) == ARGV[1] then n = n + redis.call("DEL", key) end
end
return n"#;

/// A lock in Redis, shared by every replica.
#[derive(Clone)]
pub struct RedisLock {
    conn: ConnectionManager,
    acquire: Script,
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
            acquire: Script::new(ACQUIRE),
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

/// The pause between looks at held keys: short at first, since a holder usually finishes
/// within milliseconds, then bounded.
fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(Duration::from_millis(25))
}

#[async_trait]
impl IdempotencyLock for RedisLock {
    #[tracing::instrument(name = "redis.lock.acquire", skip_all, fields(db.system = "redis", db.operation = "EVALSHA", otel.kind = "client", keys = keys.len()))]
    async fn acquire_many(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<Vec<LockAttempt>, LockError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let token = random_token(16);
        let mut call = self.acquire.prepare_invoke();
        for key in keys {
            call.key(key);
        }
        let taken: Vec<i64> = call
            .arg(&token)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(err)?;
        Ok((0..keys.len())
            .map(|i| match taken.get(i) {
                Some(1) => LockAttempt::Acquired(LockToken(token.clone())),
                _ => LockAttempt::Busy,
            })
            .collect())
    }

    #[tracing::instrument(name = "redis.lock.wait", skip_all, fields(db.system = "redis", db.operation = "EXISTS", otel.kind = "client", keys = keys.len()))]
    async fn wait_released(&self, keys: &[String], wait: Duration) -> Result<bool, LockError> {
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        let mut conn = self.conn.clone();
        loop {
            // One slot (the tenant's hash tag), so one multi-key EXISTS.
            let held: u64 = redis::cmd("EXISTS")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if held == 0 {
                return Ok(true);
            }
            if Instant::now() + pause > deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = next_pause(pause);
        }
    }

    #[tracing::instrument(name = "redis.lock.release", skip_all, fields(db.system = "redis", db.operation = "EVALSHA", otel.kind = "client", keys = keys.len()))]
    async fn release_many(&self, keys: &[String], token: &LockToken) -> Result<(), LockError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut call = self.release.prepare_invoke();
        for key in keys {
            call.key(key);
        }
        let _: i64 = call
            .arg(&token.0)
            .invoke_async(&mut self.conn.clone())
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

    /// The held keys, with lapsed holds dropped.
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        held.retain(|_, (_, until)| *until > now);
        held
    }
}

#[async_trait]
impl IdempotencyLock for InProcessLock {
    async fn acquire_many(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> Result<Vec<LockAttempt>, LockError> {
        let token = random_token(16);
        let mut held = self.held();
        let until = Instant::now() + ttl;
        Ok(keys
            .iter()
            .map(|key| {
                if held.contains_key(key) {
                    LockAttempt::Busy
                } else {
                    held.insert(key.clone(), (token.clone(), until));
                    LockAttempt::Acquired(LockToken(token.clone()))
                }
            })
            .collect())
    }

    async fn wait_released(&self, keys: &[String], wait: Duration) -> Result<bool, LockError> {
        let deadline = Instant::now() + wait;
        loop {
            // Register interest before checking, so a release in between is not missed.
            let notified = self.released.notified();
            if !keys.iter().any(|k| self.held().contains_key(k)) {
                return Ok(true);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            // Also wake up periodically: a holder's lock may lapse without a release.
            let _ = tokio::time::timeout((deadline - now).min(Duration::from_millis(50)), notified)
                .await;
        }
    }

    async fn release_many(&self, keys: &[String], token: &LockToken) -> Result<(), LockError> {
        {
            let mut held = self.held();
            for key in keys {
                if held.get(key).is_some_and(|(t, _)| *t == token.0) {
                    held.remove(key);
                }
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
        let LockAttempt::Acquired(first) = lock.acquire(key, ttl).await.unwrap() else {
            panic!("a free lock is acquired");
        };
        assert_eq!(lock.acquire(key, ttl).await.unwrap(), LockAttempt::Busy);
        let keys = [key.to_owned()];
        assert!(
            !lock
                .wait_released(&keys, Duration::from_millis(30))
                .await
                .unwrap(),
            "a held key is not released by waiting"
        );
        // Releasing with a foreign token leaves the lock held.
        lock.release(key, &LockToken("other".into())).await.unwrap();
        assert_eq!(lock.acquire(key, ttl).await.unwrap(), LockAttempt::Busy);
        // A waiter learns as soon as the holder releases it.
        let waiter = {
            let (lock, keys) = (lock.clone(), keys.clone());
            tokio::spawn(async move { lock.wait_released(&keys, Duration::from_secs(5)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        lock.release(key, &first).await.unwrap();
        assert!(waiter.await.unwrap().unwrap(), "released within the wait");
        let LockAttempt::Acquired(second) = lock.acquire(key, ttl).await.unwrap() else {
            panic!("a released lock is free");
        };
        lock.release(key, &second).await.unwrap();
    }

    /// A group takes its free keys at once, under one token, and reports the held ones busy.
    async fn grouped(lock: Arc<dyn IdempotencyLock>, prefix: &str) {
        let ttl = Duration::from_secs(5);
        let keys: Vec<String> = (0..4).map(|i| format!("{prefix}{i}")).collect();
        let LockAttempt::Acquired(first) = lock.acquire(&keys[2], ttl).await.unwrap() else {
            panic!("a free lock is acquired");
        };
        let attempts = lock.acquire_many(&keys, ttl).await.unwrap();
        assert_eq!(attempts[2], LockAttempt::Busy);
        let LockAttempt::Acquired(group) = attempts[0].clone() else {
            panic!("free keys of a group are taken: {attempts:?}");
        };
        for i in [0, 1, 3] {
            assert_eq!(attempts[i], LockAttempt::Acquired(group.clone()));
        }
        // Waiting for several keys ends when the last of them is released.
        let waiter = {
            let (lock, keys) = (lock.clone(), keys.clone());
            tokio::spawn(async move { lock.wait_released(&keys, Duration::from_secs(5)).await })
        };
        lock.release_many(&keys, &group).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "one key is still held");
        lock.release(&keys[2], &first).await.unwrap();
        assert!(waiter.await.unwrap().unwrap());
        let again = lock.acquire_many(&keys, ttl).await.unwrap();
        let LockAttempt::Acquired(t) = again[0].clone() else {
            panic!("every key is free again: {again:?}");
        };
        assert!(again.iter().all(|a| *a == LockAttempt::Acquired(t.clone())));
        lock.release_many(&keys, &t).await.unwrap();
    }

    #[tokio::test]
    async fn in_process_lock_is_exclusive() {
        exclusive(Arc::new(InProcessLock::new()), "k").await;
        grouped(Arc::new(InProcessLock::new()), "g").await;
    }

    #[tokio::test]
    async fn in_process_lock_lapses_after_ttl() {
        let lock = InProcessLock::new();
        let ttl = Duration::from_millis(20);
        assert!(matches!(
            lock.acquire("k", ttl).await.unwrap(),
            LockAttempt::Acquired(_)
        ));
        assert!(
            lock.wait_released(&["k".to_owned()], Duration::from_millis(500))
                .await
                .unwrap()
        );
        assert!(matches!(
            lock.acquire("k", ttl).await.unwrap(),
            LockAttempt::Acquired(_)
        ));
    }

    #[tokio::test]
    async fn redis_lock_is_exclusive() {
        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let key = format!("issuer:{{test}}:lock:{}", random_token(8));
        exclusive(Arc::new(RedisLock::connect(&url).unwrap()), &key).await;
        grouped(
            Arc::new(RedisLock::connect(&url).unwrap()),
            &format!("{key}:"),
        )
        .await;
    }

    #[tokio::test]
    async fn redis_down_is_an_error_not_a_hang() {
        // Nothing listens on port 1.
        let lock = RedisLock::connect("redis://127.0.0.1:1").unwrap();
        let started = Instant::now();
        assert!(lock.acquire("k", Duration::from_secs(1)).await.is_err());
        assert!(
            lock.wait_released(&["k".to_owned()], Duration::from_secs(1))
                .await
                .is_err()
        );
        assert!(lock.ping().await.is_err());
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
