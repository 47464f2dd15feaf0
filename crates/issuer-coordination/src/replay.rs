//! Replay caches for single-use values (DPoP proof `jti`s): in Redis, shared by every replica
//! (`SET NX PXAT`), or in-process on the embedded default. While Redis cannot answer, the Redis
//! cache records in this replica's own memory: replays through the same replica are still
//! caught, and no wallet is refused for an outage.

use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_domain::ports::{LockError, ReplayCache};
use redis::aio::ConnectionManager;
use sha2::{Digest, Sha256};

/// Values an in-process cache holds at most; past that (after dropping the expired ones) it
/// refuses to answer rather than grow without bound.
const MAX_ENTRIES: usize = 1_000_000;

/// A replay cache in this process's memory.
#[derive(Debug, Default)]
pub struct InProcessReplayCache {
    seen: Mutex<HashMap<String, DateTime<Utc>>>,
}

impl InProcessReplayCache {
    pub fn new() -> Self {
        Self::default()
    }

    fn record(
        &self,
        key: &str,
        until: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, LockError> {
        let mut seen = self.seen.lock().expect("replay cache lock");
        if seen.get(key).is_some_and(|&expires| expires > now) {
            return Ok(false);
        }
        if seen.len() >= MAX_ENTRIES {
            seen.retain(|_, expires| *expires > now);
            if seen.len() >= MAX_ENTRIES {
                return Err(LockError("the replay cache is full".into()));
            }
        }
        seen.insert(key.to_owned(), until);
        Ok(true)
    }
}

#[async_trait]
impl ReplayCache for InProcessReplayCache {
    async fn first_use(&self, key: &str, until: DateTime<Utc>) -> Result<bool, LockError> {
        self.record(key, until, Utc::now())
    }
}

/// A replay cache in Redis, under `prefix` and the SHA-256 of each value (bounded key length
/// whatever a client sends).
pub struct RedisReplayCache {
    conn: ConnectionManager,
    prefix: String,
    fallback: InProcessReplayCache,
}

impl RedisReplayCache {
    pub fn new(conn: ConnectionManager, prefix: &str) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            fallback: InProcessReplayCache::new(),
        }
    }
}

#[async_trait]
impl ReplayCache for RedisReplayCache {
    #[tracing::instrument(name = "redis.replay.first_use", skip_all, fields(db.system = "redis", db.operation = "SET", otel.kind = "client"))]
    async fn first_use(&self, key: &str, until: DateTime<Utc>) -> Result<bool, LockError> {
        let digest = Sha256::digest(key.as_bytes());
        let mut name = self.prefix.clone();
        for b in &digest[..16] {
            name.push_str(&format!("{b:02x}"));
        }
        let set: redis::RedisResult<Option<String>> = redis::cmd("SET")
            .arg(&name)
            .arg(1)
            .arg("NX")
            .arg("PXAT")
            .arg(until.timestamp_millis().max(1))
            .query_async(&mut self.conn.clone())
            .await;
        match set {
            Ok(reply) => Ok(reply.is_some()),
            Err(e) => {
                tracing::warn!(error = %e, "replay cache in Redis unavailable; using this replica's");
                self.fallback.first_use(key, until).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    async fn single_use(cache: &dyn ReplayCache, key: &str) {
        let until = Utc::now() + Duration::seconds(60);
        assert!(cache.first_use(key, until).await.unwrap(), "first use");
        assert!(!cache.first_use(key, until).await.unwrap(), "a replay");
        assert!(
            cache
                .first_use(&format!("{key}-other"), until)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn in_process_values_are_single_use_until_they_expire() {
        let cache = InProcessReplayCache::new();
        single_use(&cache, "jti-1").await;
        let now = Utc::now();
        assert!(
            cache
                .record("old", now + Duration::seconds(1), now)
                .unwrap()
        );
        assert!(
            !cache
                .record("old", now + Duration::seconds(1), now)
                .unwrap()
        );
        let later = now + Duration::seconds(2);
        assert!(
            cache
                .record("old", later + Duration::seconds(1), later)
                .unwrap(),
            "expired"
        );
    }

    #[tokio::test]
    async fn redis_values_are_single_use_across_connections() {
        let url =
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!(
            "issuer:test:replay:{}:",
            issuer_domain::ids::random_token(8)
        );
        let lock = crate::RedisLock::connect(&url).unwrap();
        let a = RedisReplayCache::new(lock.connection(), &prefix);
        single_use(&a, "jti-1").await;
        // Another replica's cache sees the same values.
        let b = RedisReplayCache::new(
            crate::RedisLock::connect(&url).unwrap().connection(),
            &prefix,
        );
        assert!(
            !b.first_use("jti-1", Utc::now() + Duration::seconds(60))
                .await
                .unwrap()
        );
        // Values expire with their window.
        let soon = Utc::now() + Duration::milliseconds(50);
        assert!(a.first_use("brief", soon).await.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        assert!(
            b.first_use("brief", Utc::now() + Duration::seconds(1))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn with_redis_down_replays_through_one_replica_are_still_caught() {
        let lock = crate::RedisLock::connect("redis://127.0.0.1:1").unwrap();
        let cache = RedisReplayCache::new(lock.connection(), "issuer:dpop:");
        single_use(&cache, "jti-1").await;
    }
}
