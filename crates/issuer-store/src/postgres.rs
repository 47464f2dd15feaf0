//! Postgres: connecting, the outage bookkeeping of the pool, and what only Postgres does (the
//! group commit of creates is in `pg_batch.rs`; the one-statement retention pass is here).
//!
//! Idempotency rests on the `issuances_client_request_id_key` constraint: an insert that
//! conflicts with a concurrent one waits for it to commit, then finds its row.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use issuer_domain::{error::Result, model::Purged};
use serde_json::Value;
use sqlx::{
    PgPool, Row as _,
    postgres::{PgPoolOptions, PgRow},
};
use uuid::Uuid;

use crate::{
    SqlStore,
    db::{Db, Sql},
    rows::{Backend, RowAccess},
};

/// How long a request waits for a pooled connection. Short, so that with the database down a
/// request fails with `Unavailable` quickly instead of piling up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// When the database was last seen unreachable. After an outage (a restart, a failover) every
/// pooled connection is dead, but the pool does not test connections before handing them out
/// (that would cost every query a round trip). Instead, once a ping has failed for want of a
/// connection, connections opened before that moment are dropped when next acquired, so that
/// the first requests after the database is back do not fail one by one on dead connections.
#[derive(Debug)]
pub(crate) struct ConnectionsLost {
    epoch: Instant,
    /// Milliseconds after `epoch`; 0 while no outage has been seen.
    at_ms: AtomicU64,
}

impl ConnectionsLost {
    pub(crate) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn record(&self) {
        self.at_ms
            .fetch_max(self.now_ms().max(1), Ordering::Relaxed);
    }

    /// Whether a connection of this age was opened before (or at) the last outage seen.
    fn predates_outage(&self, age: Duration) -> bool {
        let at = self.at_ms.load(Ordering::Relaxed);
        let age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        at != 0 && self.now_ms().saturating_sub(age_ms) <= at
    }
}

impl SqlStore {
    /// Connects to Postgres with a pool of up to `max_connections`; fails if the database
    /// cannot be reached within a few seconds. Call [`SqlStore::migrate`] before use.
    pub async fn connect_postgres(url: &str, max_connections: u32) -> Result<Self> {
        let lost = Arc::new(ConnectionsLost::new());
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            // No ping before every query: a dead connection fails its query, is discarded and
            // the caller gets a retryable error, where a ping would cost every query one more
            // round trip. Idle connections are still recycled by `idle_timeout`.
            .test_before_acquire(false)
            .before_acquire({
                let lost = lost.clone();
                move |_, meta| {
                    let keep = !lost.predates_outage(meta.age);
                    Box::pin(async move { Ok(keep) })
                }
            })
            .connect(url)
            .await
            .map_err(|e| crate::rows::db_error(Backend::Postgres, e))?;
        Ok(Self {
            lost,
            ..Self::from_pg_pool(pool)
        })
    }

    /// Wraps a Postgres pool configured by the caller (without the outage tracking of
    /// [`Self::connect_postgres`]).
    pub fn from_pg_pool(pool: PgPool) -> Self {
        Self::with_db(Db::Postgres(pool))
    }
}

impl RowAccess for PgRow {
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, sqlx::Error> {
        self.try_get(col)
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        self.try_get(col)
    }
    fn text(&self, col: &str) -> Result<String, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(col)
    }
    fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
        self.try_get(col)
    }
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
        self.try_get(col)
    }
    fn json(&self, col: &str) -> Result<Option<Value>, sqlx::Error> {
        self.try_get(col)
    }
}

/// One retention pass in one statement: the events and deliveries go with their issuance
/// (email rows and webhook attempts by cascade); the foreign key of the events is checked at
/// its end. SKIP LOCKED gives concurrent passes disjoint rows and leaves an issuance that a
/// transition holds right now for the next pass.
pub(crate) async fn purge_ended(
    db: &Db,
    ended_before: DateTime<Utc>,
    limit: u32,
) -> Result<Purged> {
    let q = Sql::new(
        "WITH doomed AS (SELECT tenant_id, id FROM issuances \
         WHERE status <> 'pending' AND updated_at < $1 AND (credential_status IS NULL \
         OR credential_status = 'revoked' OR credential_expires_at < $1) \
         ORDER BY updated_at LIMIT $2 \
         FOR UPDATE SKIP LOCKED), \
         ev AS (DELETE FROM issuance_events e USING doomed d \
         WHERE e.tenant_id = d.tenant_id AND e.issuance_id = d.id RETURNING 1), \
         wd AS (DELETE FROM webhook_deliveries w USING doomed d \
         WHERE w.tenant_id = d.tenant_id AND w.issuance_id = d.id RETURNING 1), \
         iss AS (DELETE FROM issuances i USING doomed d \
         WHERE i.tenant_id = d.tenant_id AND i.id = d.id RETURNING 1) \
         SELECT (SELECT count(*) FROM iss) AS issuances, (SELECT count(*) FROM ev) AS events, \
         (SELECT count(*) FROM wd) AS deliveries",
    )
    .time(ended_before)
    .int(i64::from(limit));
    let row = db.on().fetch_one(&q).await?;
    let count = |col: &str| -> Result<u64> {
        let n = row.int(col).map_err(issuer_domain::Error::internal)?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    Ok(Purged {
        issuances: count("issuances")?,
        events: count("events")?,
        webhook_deliveries: count("deliveries")?,
    })
}
