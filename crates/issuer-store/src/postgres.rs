//! The production store on Postgres.
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

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    error::Result,
    ids::{IssuanceId, TenantId},
    lifecycle::{EmailChange, Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, EmailDelivery, InsertOutcome, Issuance, IssuanceEvent, ListFilter,
        Purged, RateLimit, Scope, StoreGauges, Tenant,
    },
    ports::Store,
    webhook::{AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use serde_json::Value;
use sqlx::{
    PgPool, Postgres, QueryBuilder, Row,
    postgres::{PgPoolOptions, PgRow},
    types::Json,
};
use uuid::Uuid;

use crate::pg_batch::{CreateWrites, InsertBatcher, NewIssuance};
use crate::rows::{
    self, Backend, RowAccess, client_columns, delivery_columns, email_columns, endpoint_columns,
    event_columns, issuance_columns, tenant_columns, trunc_micros,
};

/// How long a request waits for a pooled connection. Short, so that with the database down a
/// request fails with `Unavailable` quickly instead of piling up.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

fn db_error(e: sqlx::Error) -> Error {
    rows::db_error(Backend::Postgres, e)
}

/// A [`Store`] on a Postgres connection pool.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    batcher: Arc<InsertBatcher>,
    lost: Arc<ConnectionsLost>,
}

/// When the database was last seen unreachable. After an outage (a restart, a failover) every
/// pooled connection is dead, but the pool does not test connections before handing them out
/// (that would cost every query a round trip). Instead, once a ping has failed for want of a
/// connection, connections opened before that moment are dropped when next acquired, so that
/// the first requests after the database is back do not fail one by one on dead connections.
#[derive(Debug)]
struct ConnectionsLost {
    epoch: Instant,
    /// Milliseconds after `epoch`; 0 while no outage has been seen.
    at_ms: AtomicU64,
}

impl ConnectionsLost {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            at_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn record(&self) {
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

impl PgStore {
    /// Connects a pool of up to `max_connections`; fails if the database cannot be reached
    /// within a few seconds.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
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
            .map_err(db_error)?;
        Ok(Self {
            lost,
            ..Self::from_pool(pool)
        })
    }

    /// Wraps a pool configured by the caller (without the outage tracking of [`Self::connect`]).
    pub fn from_pool(pool: PgPool) -> Self {
        Self {
            batcher: InsertBatcher::new(pool.clone()),
            pool,
            lost: Arc::new(ConnectionsLost::new()),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How many statements the creates so far took; concurrent creates share statements.
    pub fn create_writes(&self) -> CreateWrites {
        self.batcher.writes()
    }

    /// Applies the embedded migrations (`migrations/postgres`) that have not run yet.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| rows::migrate_error(Backend::Postgres, e))
    }
}

impl RowAccess for PgRow {
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
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

#[async_trait]
impl Store for PgStore {
    #[tracing::instrument(name = "store.ping", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if rows::is_connection_lost(Backend::Postgres, &e) {
                    self.lost.record();
                }
                db_error(e)
            })?;
        Ok(())
    }

    #[tracing::instrument(name = "store.gauges", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn gauges(&self) -> Result<StoreGauges> {
        let row = sqlx::query(rows::GAUGES_SQL)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        rows::gauges(
            &row,
            self.pool.size(),
            u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
            self.pool.options().get_max_connections(),
        )
    }

    #[tracing::instrument(name = "store.insert_tenant", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn insert_tenant(&self, tenant: &Tenant) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO tenants (",
            tenant_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(tenant.id.0)
        .bind(&tenant.name)
        .bind(tenant.default_offer_ttl_secs)
        .bind(tenant.max_offer_ttl_secs)
        .bind(trunc_micros(tenant.created_at))
        .bind(tenant.require_tx_code)
        .bind(&tenant.branding.display_name)
        .bind(&tenant.branding.logo_url)
        .bind(&tenant.branding.support_contact)
        .bind(tenant.client_rate_limit.map(|l| i64::from(l.per_sec)))
        .bind(tenant.client_rate_limit.map(|l| i64::from(l.burst)))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            rows::conflict_or_db_error(Backend::Postgres, e, &["tenants_pkey"], || {
                format!("tenant `{}` already exists", tenant.id)
            })
        })?;
        Ok(())
    }

    #[tracing::instrument(name = "store.get_tenant", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>> {
        sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::tenant(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.update_tenant_rate_limit", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn update_tenant_rate_limit(
        &self,
        id: TenantId,
        limit: Option<RateLimit>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET rate_limit_per_sec = $2, rate_limit_burst = $3 WHERE id = $1",
        )
        .bind(id.0)
        .bind(limit.map(|l| i64::from(l.per_sec)))
        .bind(limit.map(|l| i64::from(l.burst)))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.update_tenant_branding", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn update_tenant_branding(&self, id: TenantId, branding: &Branding) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET display_name = $2, logo_url = $3, support_contact = $4 \
             WHERE id = $1",
        )
        .bind(id.0)
        .bind(&branding.display_name)
        .bind(&branding.logo_url)
        .bind(&branding.support_contact)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.count_tenants", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn count_tenants(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        u64::try_from(n).map_err(Error::internal)
    }

    #[tracing::instrument(name = "store.insert_client", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn insert_client(&self, client: &ApiClient) -> Result<()> {
        let created_at = trunc_micros(client.created_at);
        sqlx::query(concat!(
            "INSERT INTO api_clients (",
            client_columns!(),
            ", updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)"
        ))
        .bind(client.tenant_id.0)
        .bind(&client.client_id)
        .bind(&client.secret_hash)
        .bind(Scope::join(&client.scopes))
        .bind(client.active)
        .bind(created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            rows::conflict_or_db_error(
                Backend::Postgres,
                e,
                &["api_clients_client_id_key", "api_clients_pkey"],
                || format!("client `{}` already exists", client.client_id),
            )
        })?;
        Ok(())
    }

    #[tracing::instrument(name = "store.find_client", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn find_client(&self, client_id: &str) -> Result<Option<ApiClient>> {
        sqlx::query(concat!(
            "SELECT ",
            client_columns!(),
            " FROM api_clients WHERE client_id = $1"
        ))
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::client(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.update_client_secret", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn update_client_secret(
        &self,
        tenant: TenantId,
        client_id: &str,
        secret_hash: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_clients SET secret_hash = $3, updated_at = $4 \
             WHERE tenant_id = $1 AND client_id = $2",
        )
        .bind(tenant.0)
        .bind(client_id)
        .bind(secret_hash)
        .bind(trunc_micros(Utc::now()))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.insert_issuance", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn insert_issuance(
        &self,
        issuance: &Issuance,
        first_event: &IssuanceEvent,
    ) -> Result<InsertOutcome> {
        rows::check_first_event(issuance, first_event)?;
        // `issuance.created` is opt-in; the statement queues it for the endpoints that asked.
        let webhook = rows::webhook_message(issuance, first_event, false);
        let written = self
            .batcher
            .insert(NewIssuance {
                issuance: issuance.clone(),
                event: first_event.clone(),
                traceparent: webhook
                    .as_ref()
                    .and_then(|_| rows::traceparent(&tracing::Span::current())),
                webhook,
            })
            .await?;
        if written {
            // The row holds exactly what was bound; reading it back would only cost the
            // payload's round trip through jsonb text.
            return Ok(InsertOutcome::Inserted(rows::as_stored(issuance)));
        }
        // A new statement gets a fresh snapshot (READ COMMITTED): the conflicting row is
        // committed by now.
        let existing = self
            .find_issuance_by_request_id(issuance.tenant_id, &issuance.client_request_id)
            .await?
            .ok_or_else(|| {
                Error::internal("insert conflicted on client_request_id but no row holds it")
            })?;
        Ok(InsertOutcome::Duplicate(existing))
    }

    #[tracing::instrument(name = "store.get_issuance", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn get_issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant.0)
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.find_issuance_by_request_id", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn find_issuance_by_request_id(
        &self,
        tenant: TenantId,
        client_request_id: &str,
    ) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = $1 AND client_request_id = $2"
        ))
        .bind(tenant.0)
        .bind(client_request_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.list_issuances", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn list_issuances(&self, tenant: TenantId, filter: &ListFilter) -> Result<Vec<Issuance>> {
        let mut q = QueryBuilder::<Postgres>::new(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = "
        ));
        q.push_bind(tenant.0);
        if let Some(status) = filter.status {
            q.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(crid) = &filter.client_request_id {
            q.push(" AND client_request_id = ").push_bind(crid.as_str());
        }
        if let Some(before) = filter.before {
            q.push(" AND id < ").push_bind(before.0);
        }
        q.push(" ORDER BY id DESC LIMIT ")
            .push_bind(i64::from(filter.limit));
        q.build()
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?
            .iter()
            .map(rows::issuance)
            .collect()
    }

    #[tracing::instrument(name = "store.find_issuance_by_offer_id", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn find_issuance_by_offer_id(&self, offer_id: &str) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE offer_id = $1"
        ))
        .bind(offer_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.find_issuance_by_code_hash", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn find_issuance_by_code_hash(&self, code_hash: &str) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE pre_authorized_code_hash = $1"
        ))
        .bind(code_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .as_ref()
        .map(rows::issuance)
        .transpose()
    }

    #[tracing::instrument(name = "store.reserve_tx_code_attempt", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn reserve_tx_code_attempt(&self, attempt: &TxCodeAttempt) -> Result<Option<i64>> {
        // One conditional statement: concurrent guesses serialize on the row, and only the
        // first `max_attempts` of them find the counter below the cap.
        sqlx::query(
            "UPDATE issuances SET tx_code_failures = tx_code_failures + 1 \
             WHERE tenant_id = $1 AND id = $2 AND version = $3 AND tx_code_failures < $4 \
             RETURNING tx_code_failures",
        )
        .bind(attempt.tenant_id.0)
        .bind(attempt.id.0)
        .bind(attempt.version)
        .bind(attempt.max_attempts)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| row.try_get("tx_code_failures").map_err(db_error))
        .transpose()
    }

    #[tracing::instrument(name = "store.use_nonce", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn use_nonce(
        &self,
        tenant: TenantId,
        nonce_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO used_nonces (tenant_id, nonce_hash, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .bind(tenant.0)
        .bind(nonce_hash)
        .bind(trunc_micros(expires_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.purge_used_nonces", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM used_nonces WHERE nonce_hash IN (SELECT nonce_hash FROM used_nonces \
             WHERE expires_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(name = "store.purge_ended", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged> {
        // One statement: the events and deliveries go with their issuance (email rows and
        // webhook attempts by cascade); the foreign key of the events is checked at its end.
        // SKIP LOCKED gives concurrent passes disjoint rows and leaves an issuance that a
        // transition holds right now for the next pass.
        let row = sqlx::query(
            "WITH doomed AS (SELECT tenant_id, id FROM issuances \
             WHERE status <> 'pending' AND updated_at < $1 ORDER BY updated_at LIMIT $2 \
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
        .bind(ended_before)
        .bind(i64::from(limit))
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)?;
        let count = |col: &str| -> Result<u64> {
            let n: i64 = row.try_get(col).map_err(db_error)?;
            Ok(u64::try_from(n).unwrap_or(0))
        };
        Ok(Purged {
            issuances: count("issuances")?,
            events: count("events")?,
            webhook_deliveries: count("deliveries")?,
        })
    }

    #[tracing::instrument(name = "store.transition", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn transition(&self, t: &Transition) -> Result<TransitionOutcome> {
        let (after, event) = (&t.after, &t.event);
        let (tenant, id) = (after.tenant_id.0, after.id.0);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        // The compare-and-set: concurrent writers of one issuance serialize on its row, and
        // only the first that planned from the current version applies.
        let done = sqlx::query(
            "UPDATE issuances SET status = $3, reason = $4, version = $5, updated_at = $6, \
             payload = CASE WHEN $7 THEN payload ELSE NULL END, code_redeemed_at = $8, \
             notification_id = $9, offer_retrieved_at = $10 \
             WHERE tenant_id = $1 AND id = $2 AND version = $11",
        )
        .bind(tenant)
        .bind(id)
        .bind(after.status.as_str())
        .bind(after.reason.map(|r| r.as_str()))
        .bind(after.version)
        .bind(trunc_micros(after.updated_at))
        .bind(after.payload.is_some())
        .bind(after.code_redeemed_at.map(trunc_micros))
        .bind(&after.notification_id)
        .bind(after.offer_retrieved_at.map(trunc_micros))
        .bind(t.expected_version)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            return Ok(TransitionOutcome::Stale);
        }
        match &t.email {
            Some(EmailChange::Record(email)) => {
                // Only under the attempt's own lease: a result that comes after another mailer
                // took the row over is dropped, event and all (the transaction rolls back).
                let done = sqlx::query(
                    "UPDATE email_deliveries SET state = $3, attempts = attempts + 1, \
                     next_attempt_at = COALESCE($4, next_attempt_at), last_error = $5, \
                     sent_at = CASE WHEN $3 = 'sent' THEN $6 ELSE sent_at END, updated_at = $6 \
                     WHERE tenant_id = $1 AND issuance_id = $2 AND state = 'pending' \
                     AND next_attempt_at = $7",
                )
                .bind(tenant)
                .bind(id)
                .bind(email.state.as_str())
                .bind(email.next_attempt_at.map(trunc_micros))
                .bind(&email.error)
                .bind(trunc_micros(event.occurred_at))
                .bind(trunc_micros(email.claimed_until))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                if done.rows_affected() == 0 {
                    return Ok(TransitionOutcome::EmailLeaseLost);
                }
            }
            Some(EmailChange::CancelPending) => {
                sqlx::query(
                    "UPDATE email_deliveries SET state = 'cancelled', updated_at = $3 \
                     WHERE tenant_id = $1 AND issuance_id = $2 AND state = 'pending'",
                )
                .bind(tenant)
                .bind(id)
                .bind(trunc_micros(event.occurred_at))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
            None => {}
        }
        sqlx::query(
            "INSERT INTO issuance_events \
             (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(tenant)
        .bind(id)
        .bind(event.sequence)
        .bind(event.kind.as_str())
        .bind(event.status.as_str())
        .bind(&event.reason)
        .bind(trunc_micros(event.occurred_at))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some((kind, message_id, payload)) = t.webhook_message() {
            sqlx::query(
                "INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, sequence, \
                 event_type, message_id, payload, state, attempts, next_attempt_at, traceparent, \
                 created_at, updated_at) \
                 SELECT tenant_id, gen_random_uuid(), id, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, \
                 $7, $7 \
                 FROM webhook_endpoints \
                 WHERE tenant_id = $1 AND enabled AND $4 = ANY(string_to_array(event_types, ' '))",
            )
            .bind(tenant)
            .bind(id)
            .bind(event.sequence)
            .bind(kind)
            .bind(message_id)
            .bind(Json(payload))
            .bind(trunc_micros(event.occurred_at))
            .bind(rows::traceparent(&tracing::Span::current()))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        rows::count_status_change(t);
        Ok(TransitionOutcome::Applied(Box::new(rows::as_stored(after))))
    }

    #[tracing::instrument(name = "store.overdue_pending", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn overdue_pending(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(TenantId, IssuanceId)>> {
        sqlx::query(
            "SELECT tenant_id, id FROM issuances \
             WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| {
            let tenant: Uuid = r.try_get("tenant_id").map_err(db_error)?;
            let id: Uuid = r.try_get("id").map_err(db_error)?;
            Ok((TenantId(tenant), IssuanceId(id)))
        })
        .collect()
    }

    #[tracing::instrument(name = "store.insert_webhook_endpoint", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn insert_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO webhook_endpoints (",
            endpoint_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(e.tenant_id.0)
        .bind(e.id)
        .bind(&e.url)
        .bind(e.event_types.join(" "))
        .bind(&e.secret_sealed)
        .bind(&e.previous_secret_sealed)
        .bind(e.previous_secret_expires_at.map(trunc_micros))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(e.failing_since.map(trunc_micros))
        .bind(trunc_micros(e.created_at))
        .bind(trunc_micros(e.updated_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    #[tracing::instrument(name = "store.list_webhook_endpoints", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn list_webhook_endpoints(&self, tenant: TenantId) -> Result<Vec<WebhookEndpoint>> {
        sqlx::query(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY created_at, id"
        ))
        .bind(tenant.0)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_endpoint)
        .collect()
    }

    #[tracing::instrument(name = "store.get_webhook_endpoint", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn get_webhook_endpoint(
        &self,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>> {
        sqlx::query(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2"
        ))
        .bind(tenant.0)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .as_ref()
        .map(rows::webhook_endpoint)
        .transpose()
    }

    #[tracing::instrument(name = "store.update_webhook_endpoint", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn update_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_endpoints SET url = $3, event_types = $4, secret_sealed = $5, \
             previous_secret_sealed = $6, previous_secret_expires_at = $7, enabled = $8, \
             disabled_reason = $9, failing_since = $10, updated_at = $11 \
             WHERE tenant_id = $1 AND id = $2",
        )
        .bind(e.tenant_id.0)
        .bind(e.id)
        .bind(&e.url)
        .bind(e.event_types.join(" "))
        .bind(&e.secret_sealed)
        .bind(&e.previous_secret_sealed)
        .bind(e.previous_secret_expires_at.map(trunc_micros))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(e.failing_since.map(trunc_micros))
        .bind(trunc_micros(e.updated_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.delete_webhook_endpoint", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn delete_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<bool> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
            .bind(tenant.0)
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.claim_deliveries", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        // SKIP LOCKED: dispatchers on other replicas take other rows instead of waiting.
        sqlx::query(concat!(
            "UPDATE webhook_deliveries SET next_attempt_at = $2, updated_at = $1 \
             WHERE (tenant_id, id) IN (SELECT d.tenant_id, d.id FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id \
             WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND e.enabled \
             ORDER BY d.next_attempt_at LIMIT $3 FOR UPDATE OF d SKIP LOCKED) RETURNING ",
            delivery_columns!()
        ))
        .bind(trunc_micros(now))
        .bind(trunc_micros(lease_until))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.record_attempt", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn record_attempt(&self, a: &AttemptRecord) -> Result<()> {
        // One statement: the delivery's state, the attempt log and the endpoint's bookkeeping
        // commit together. The endpoint row is only touched when its state changes, so that
        // concurrent successful deliveries to one endpoint do not queue on its row lock.
        sqlx::query(
            "WITH d AS (UPDATE webhook_deliveries SET attempts = attempts + 1, state = $3, \
             next_attempt_at = COALESCE($4, next_attempt_at), last_status = $5, last_error = $6, \
             last_latency_ms = $7, updated_at = $8 WHERE tenant_id = $1 AND id = $2 \
             AND state = 'pending' AND next_attempt_at = $12 \
             RETURNING tenant_id, id, attempts), \
             a AS (INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, at, status, error, \
             latency_ms) SELECT tenant_id, id, attempts, $8, $5, $6, $7 FROM d) \
             UPDATE webhook_endpoints SET \
             failing_since = CASE WHEN $10 THEN NULL ELSE COALESCE(failing_since, $8) END, \
             enabled = enabled AND $11::text IS NULL, \
             disabled_reason = COALESCE($11, disabled_reason), updated_at = $8 \
             WHERE tenant_id = $1 AND id = $9 AND EXISTS (SELECT 1 FROM d) \
             AND (($10 AND failing_since IS NOT NULL) OR (NOT $10 AND failing_since IS NULL) \
             OR $11::text IS NOT NULL)",
        )
        .bind(a.tenant_id.0)
        .bind(a.delivery_id)
        .bind(a.state.as_str())
        .bind(a.next_attempt_at.map(trunc_micros))
        .bind(a.status)
        .bind(&a.error)
        .bind(a.latency_ms)
        .bind(trunc_micros(a.at))
        .bind(a.endpoint_id)
        .bind(a.state == DeliveryState::Delivered)
        .bind(&a.disable_endpoint)
        .bind(trunc_micros(a.claimed_until))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    #[tracing::instrument(name = "store.list_deliveries", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn list_deliveries(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM webhook_deliveries WHERE tenant_id = $1 AND endpoint_id = $2 \
             ORDER BY created_at DESC, sequence DESC LIMIT $3"
        ))
        .bind(tenant.0)
        .bind(endpoint)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.retry_delivery", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn retry_delivery(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $4, updated_at = $4 \
             WHERE tenant_id = $1 AND endpoint_id = $2 AND id = $3",
        )
        .bind(tenant.0)
        .bind(endpoint)
        .bind(id)
        .bind(trunc_micros(now))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.claim_emails", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>> {
        // SKIP LOCKED: mailers on other replicas take other rows instead of waiting.
        sqlx::query(concat!(
            "UPDATE email_deliveries SET next_attempt_at = $2, updated_at = $1 \
             WHERE (tenant_id, issuance_id) IN (SELECT tenant_id, issuance_id \
             FROM email_deliveries WHERE state = 'pending' AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED) RETURNING ",
            email_columns!()
        ))
        .bind(trunc_micros(now))
        .bind(trunc_micros(lease_until))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::email_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.get_email_deliveries", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn get_email_deliveries(
        &self,
        tenant: TenantId,
        ids: &[IssuanceId],
    ) -> Result<Vec<EmailDelivery>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = ids.iter().map(|i| i.0).collect();
        sqlx::query(concat!(
            "SELECT ",
            email_columns!(),
            " FROM email_deliveries WHERE tenant_id = $1 AND issuance_id = ANY($2)"
        ))
        .bind(tenant.0)
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::email_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.list_events", skip_all, fields(db.system = "postgresql", otel.kind = "client"))]
    async fn list_events(
        &self,
        tenant: TenantId,
        issuance: IssuanceId,
        after: i64,
    ) -> Result<Vec<IssuanceEvent>> {
        sqlx::query(concat!(
            "SELECT ",
            event_columns!(),
            " FROM issuance_events \
             WHERE tenant_id = $1 AND issuance_id = $2 AND sequence > $3 \
             ORDER BY sequence"
        ))
        .bind(tenant.0)
        .bind(issuance.0)
        .bind(after)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::event)
        .collect()
    }
}
