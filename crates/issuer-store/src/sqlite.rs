//! The single-node store on SQLite, for development, small deployments and tests.
//!
//! Ids are stored as lowercase hyphenated UUID text and timestamps as RFC 3339 UTC text with
//! exactly six fractional digits, so that text order equals UUID and time order. Writers that
//! must be atomic take the write lock up front (`BEGIN IMMEDIATE`) and queue on the busy
//! timeout instead of failing with `SQLITE_BUSY` halfway through.

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    error::Result,
    ids::{IssuanceId, TenantId},
    lifecycle::{EmailChange, Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, Delivery, EmailDelivery, InsertOutcome, Issuance, IssuanceEvent,
        ListFilter, Purged, RateLimit, Scope, StoreGauges, Tenant,
    },
    ports::Store,
    webhook::{AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use serde_json::Value;
use sqlx::{
    QueryBuilder, Row, Sqlite, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow},
};
use uuid::Uuid;

use crate::rows::{
    self, Backend, RowAccess, client_columns, decode_error, delivery_columns, email_columns,
    endpoint_columns, event_columns, issuance_columns, issuance_insert_columns, tenant_columns,
    trunc_micros,
};

/// How long a writer waits for another writer's lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL lets readers proceed next to the one writer; more connections than this buy nothing.
const MAX_CONNECTIONS: u32 = 8;

fn db_error(e: sqlx::Error) -> Error {
    rows::db_error(Backend::Sqlite, e)
}

/// The stored form of an id.
fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// The stored form of a timestamp; fixed width so that text comparison is time comparison.
fn time_text(t: DateTime<Utc>) -> String {
    trunc_micros(t).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A [`Store`] on an SQLite database file (or an in-memory database, for tests).
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens the database at `path_or_url` (a file path or an `sqlite:` URL), creating the file
    /// if it is missing. Call [`SqliteStore::migrate`] before use.
    pub async fn open(path_or_url: &str) -> Result<Self> {
        let options = if path_or_url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(path_or_url).map_err(db_error)?
        } else {
            SqliteConnectOptions::new().filename(path_or_url)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(db_error)?;
        Ok(Self { pool })
    }

    /// A private, empty in-memory database, already migrated.
    ///
    /// Every connection to `:memory:` opens a database of its own, so the pool holds exactly
    /// one connection and never lets it go: dropping it would drop the data.
    pub async fn in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(db_error)?
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(db_error)?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    /// Wraps a pool configured by the caller.
    pub fn from_pool(pool: SqlitePool) -> Self {
        Self { pool }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Applies the embedded migrations (`migrations/sqlite`) that have not run yet.
    pub async fn migrate(&self) -> Result<()> {
        sqlx::migrate!("./migrations/sqlite")
            .run(&self.pool)
            .await
            .map_err(|e| rows::migrate_error(Backend::Sqlite, e))
    }
}

impl RowAccess for SqliteRow {
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        let raw: String = self.try_get(col)?;
        Uuid::parse_str(&raw).map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        let raw: String = self.try_get(col)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let raw: Option<String> = self.try_get(col)?;
        raw.map(|raw| {
            DateTime::parse_from_rfc3339(&raw)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
        })
        .transpose()
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
        let raw: Option<String> = self.try_get(col)?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|e| decode_error(col, e.to_string())))
            .transpose()
    }
}

#[async_trait]
impl Store for SqliteStore {
    #[tracing::instrument(name = "store.ping", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }

    #[tracing::instrument(name = "store.gauges", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
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

    #[tracing::instrument(name = "store.insert_tenant", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn insert_tenant(&self, tenant: &Tenant) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO tenants (",
            tenant_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(id_text(tenant.id.0))
        .bind(&tenant.name)
        .bind(tenant.default_offer_ttl_secs)
        .bind(tenant.max_offer_ttl_secs)
        .bind(time_text(tenant.created_at))
        .bind(tenant.require_tx_code)
        .bind(&tenant.branding.display_name)
        .bind(&tenant.branding.logo_url)
        .bind(&tenant.branding.support_contact)
        .bind(tenant.client_rate_limit.map(|l| i64::from(l.per_sec)))
        .bind(tenant.client_rate_limit.map(|l| i64::from(l.burst)))
        .execute(&self.pool)
        .await
        .map_err(|e| {
            rows::conflict_or_db_error(Backend::Sqlite, e, &[], || {
                format!("tenant `{}` already exists", tenant.id)
            })
        })?;
        Ok(())
    }

    #[tracing::instrument(name = "store.update_tenant_rate_limit", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn update_tenant_rate_limit(
        &self,
        id: TenantId,
        limit: Option<RateLimit>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET rate_limit_per_sec = ?2, rate_limit_burst = ?3 WHERE id = ?1",
        )
        .bind(id_text(id.0))
        .bind(limit.map(|l| i64::from(l.per_sec)))
        .bind(limit.map(|l| i64::from(l.burst)))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.update_tenant_branding", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn update_tenant_branding(&self, id: TenantId, branding: &Branding) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE tenants SET display_name = ?2, logo_url = ?3, support_contact = ?4 \
             WHERE id = ?1",
        )
        .bind(id_text(id.0))
        .bind(&branding.display_name)
        .bind(&branding.logo_url)
        .bind(&branding.support_contact)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.get_tenant", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>> {
        sqlx::query(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = ?"
        ))
        .bind(id_text(id.0))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::tenant(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.count_tenants", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn count_tenants(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants")
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)?;
        u64::try_from(n).map_err(Error::internal)
    }

    #[tracing::instrument(name = "store.insert_client", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn insert_client(&self, client: &ApiClient) -> Result<()> {
        let created_at = time_text(client.created_at);
        sqlx::query(concat!(
            "INSERT INTO api_clients (",
            client_columns!(),
            ", updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(id_text(client.tenant_id.0))
        .bind(&client.client_id)
        .bind(&client.secret_hash)
        .bind(Scope::join(&client.scopes))
        .bind(client.active)
        .bind(&created_at)
        .bind(&created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| {
            // Both unique constraints of api_clients (the primary key and client_id) mean the
            // client id is taken.
            rows::conflict_or_db_error(Backend::Sqlite, e, &[], || {
                format!("client `{}` already exists", client.client_id)
            })
        })?;
        Ok(())
    }

    #[tracing::instrument(name = "store.find_client", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn find_client(&self, client_id: &str) -> Result<Option<ApiClient>> {
        sqlx::query(concat!(
            "SELECT ",
            client_columns!(),
            " FROM api_clients WHERE client_id = ?"
        ))
        .bind(client_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::client(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.update_client_secret", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn update_client_secret(
        &self,
        tenant: TenantId,
        client_id: &str,
        secret_hash: &str,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE api_clients SET secret_hash = ?, updated_at = ? \
             WHERE tenant_id = ? AND client_id = ?",
        )
        .bind(secret_hash)
        .bind(time_text(Utc::now()))
        .bind(id_text(tenant.0))
        .bind(client_id)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() > 0)
    }

    #[tracing::instrument(name = "store.insert_issuance", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn insert_issuance(
        &self,
        issuance: &Issuance,
        first_event: &IssuanceEvent,
    ) -> Result<InsertOutcome> {
        rows::check_first_event(issuance, first_event)?;
        let payload = issuance
            .payload
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(Error::internal)?;
        // IMMEDIATE takes the write lock now, where the busy timeout applies; a deferred
        // transaction could fail with SQLITE_BUSY when upgrading from read to write.
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let inserted = sqlx::query(concat!(
            "INSERT INTO issuances (",
            issuance_insert_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant_id, client_request_id) DO NOTHING \
             RETURNING ",
            issuance_columns!()
        ))
        .bind(id_text(issuance.tenant_id.0))
        .bind(id_text(issuance.id.0))
        .bind(&issuance.client_request_id)
        .bind(&issuance.request_fingerprint)
        .bind(&issuance.credential_configuration_id)
        .bind(issuance.status.as_str())
        .bind(issuance.reason.map(|r| r.as_str()))
        .bind(payload)
        .bind(issuance.delivery.as_str())
        .bind(&issuance.email)
        .bind(&issuance.grant_type)
        .bind(&issuance.offer_id)
        .bind(&issuance.pre_authorized_code_hash)
        .bind(&issuance.pre_authorized_code_sealed)
        .bind(time_text(issuance.expires_at))
        .bind(time_text(issuance.created_at))
        .bind(time_text(issuance.updated_at))
        .bind(&issuance.tx_code_hash)
        .bind(issuance.tx_code_failures)
        .bind(issuance.code_redeemed_at.map(time_text))
        .bind(&issuance.notification_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;

        let Some(row) = inserted else {
            // Read on the transaction's connection: the pool of an in-memory store has only
            // this one, and the write lock guarantees the conflicting row is committed.
            let existing = sqlx::query(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE tenant_id = ? AND client_request_id = ?"
            ))
            .bind(id_text(issuance.tenant_id.0))
            .bind(&issuance.client_request_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db_error)?;
            tx.rollback().await.map_err(db_error)?;
            let existing = existing.ok_or_else(|| {
                Error::internal("insert conflicted on client_request_id but no row holds it")
            })?;
            return Ok(InsertOutcome::Duplicate(rows::issuance(&existing)?));
        };

        sqlx::query(
            "INSERT INTO issuance_events \
             (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id_text(first_event.tenant_id.0))
        .bind(id_text(first_event.issuance_id.0))
        .bind(first_event.sequence)
        .bind(first_event.kind.as_str())
        .bind(first_event.status.as_str())
        .bind(&first_event.reason)
        .bind(time_text(first_event.occurred_at))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        // Map before committing: a decode failure must not leave a committed row behind a
        // reported error.
        let stored = rows::issuance(&row)?;
        if let Some(message) = rows::webhook_message(&stored, first_event, false) {
            queue_deliveries(&mut tx, &stored, first_event, message).await?;
        }
        if stored.delivery == Delivery::Email {
            sqlx::query(
                "INSERT INTO email_deliveries (tenant_id, issuance_id, state, attempts, \
                 next_attempt_at, created_at, updated_at) VALUES (?1, ?2, 'pending', 0, ?3, ?3, ?3)",
            )
            .bind(id_text(stored.tenant_id.0))
            .bind(id_text(stored.id.0))
            .bind(time_text(stored.created_at))
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        }
        tx.commit().await.map_err(db_error)?;
        Ok(InsertOutcome::Inserted(stored))
    }

    #[tracing::instrument(name = "store.get_issuance", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn get_issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = ? AND id = ?"
        ))
        .bind(id_text(tenant.0))
        .bind(id_text(id.0))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.find_issuance_by_request_id", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn find_issuance_by_request_id(
        &self,
        tenant: TenantId,
        client_request_id: &str,
    ) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = ? AND client_request_id = ?"
        ))
        .bind(id_text(tenant.0))
        .bind(client_request_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.list_issuances", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn list_issuances(&self, tenant: TenantId, filter: &ListFilter) -> Result<Vec<Issuance>> {
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = "
        ));
        q.push_bind(id_text(tenant.0));
        if let Some(status) = filter.status {
            q.push(" AND status = ").push_bind(status.as_str());
        }
        if let Some(crid) = &filter.client_request_id {
            q.push(" AND client_request_id = ").push_bind(crid.clone());
        }
        if let Some(before) = filter.before {
            q.push(" AND id < ").push_bind(id_text(before.0));
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

    #[tracing::instrument(name = "store.find_issuance_by_offer_id", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn find_issuance_by_offer_id(&self, offer_id: &str) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE offer_id = ?"
        ))
        .bind(offer_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| rows::issuance(&row))
        .transpose()
    }

    #[tracing::instrument(name = "store.find_issuance_by_code_hash", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn find_issuance_by_code_hash(&self, code_hash: &str) -> Result<Option<Issuance>> {
        sqlx::query(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE pre_authorized_code_hash = ?"
        ))
        .bind(code_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .as_ref()
        .map(rows::issuance)
        .transpose()
    }

    #[tracing::instrument(name = "store.reserve_tx_code_attempt", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn reserve_tx_code_attempt(&self, attempt: &TxCodeAttempt) -> Result<Option<i64>> {
        // One conditional statement: concurrent guesses serialize on the write lock, and only
        // the first `max_attempts` of them find the counter below the cap.
        sqlx::query(
            "UPDATE issuances SET tx_code_failures = tx_code_failures + 1 \
             WHERE tenant_id = ? AND id = ? AND version = ? AND tx_code_failures < ? \
             RETURNING tx_code_failures",
        )
        .bind(id_text(attempt.tenant_id.0))
        .bind(id_text(attempt.id.0))
        .bind(attempt.version)
        .bind(attempt.max_attempts)
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .map(|row| row.try_get("tx_code_failures").map_err(db_error))
        .transpose()
    }

    #[tracing::instrument(name = "store.use_nonce", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn use_nonce(
        &self,
        tenant: TenantId,
        nonce_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO used_nonces (tenant_id, nonce_hash, expires_at) VALUES (?, ?, ?) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .bind(id_text(tenant.0))
        .bind(nonce_hash)
        .bind(time_text(expires_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.purge_used_nonces", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM used_nonces WHERE nonce_hash IN (SELECT nonce_hash FROM used_nonces \
             WHERE expires_at < ? LIMIT ?)",
        )
        .bind(time_text(now))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected())
    }

    #[tracing::instrument(name = "store.purge_ended", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let doomed: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant_id, id FROM issuances WHERE status <> 'pending' AND updated_at < ? \
             ORDER BY updated_at LIMIT ?",
        )
        .bind(time_text(ended_before))
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let mut purged = Purged::default();
        for (tenant, id) in &doomed {
            // Children first; email rows and webhook attempts go by cascade.
            for (sql, counter) in [
                (
                    "DELETE FROM issuance_events WHERE tenant_id = ? AND issuance_id = ?",
                    &mut purged.events,
                ),
                (
                    "DELETE FROM webhook_deliveries WHERE tenant_id = ? AND issuance_id = ?",
                    &mut purged.webhook_deliveries,
                ),
                (
                    "DELETE FROM issuances WHERE tenant_id = ? AND id = ?",
                    &mut purged.issuances,
                ),
            ] {
                *counter += sqlx::query(sql)
                    .bind(tenant)
                    .bind(id)
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?
                    .rows_affected();
            }
        }
        tx.commit().await.map_err(db_error)?;
        Ok(purged)
    }

    #[tracing::instrument(name = "store.transition", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn transition(&self, t: &Transition) -> Result<TransitionOutcome> {
        let (after, event) = (&t.after, &t.event);
        let (tenant, id) = (id_text(after.tenant_id.0), id_text(after.id.0));
        // IMMEDIATE: the write lock serializes concurrent writers from the start; only the
        // first that planned from the current version applies (compare-and-set).
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let done = sqlx::query(
            "UPDATE issuances SET status = ?3, reason = ?4, version = ?5, updated_at = ?6, \
             payload = CASE WHEN ?7 THEN payload ELSE NULL END, code_redeemed_at = ?8, \
             notification_id = ?9, offer_retrieved_at = ?10 \
             WHERE tenant_id = ?1 AND id = ?2 AND version = ?11",
        )
        .bind(&tenant)
        .bind(&id)
        .bind(after.status.as_str())
        .bind(after.reason.map(|r| r.as_str()))
        .bind(after.version)
        .bind(time_text(after.updated_at))
        .bind(after.payload.is_some())
        .bind(after.code_redeemed_at.map(time_text))
        .bind(&after.notification_id)
        .bind(after.offer_retrieved_at.map(time_text))
        .bind(t.expected_version)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if done.rows_affected() == 0 {
            tx.rollback().await.map_err(db_error)?;
            return Ok(TransitionOutcome::Stale);
        }
        match &t.email {
            Some(EmailChange::Record(email)) => {
                // Only under the attempt's own lease, as on Postgres.
                let done = sqlx::query(
                    "UPDATE email_deliveries SET state = ?3, attempts = attempts + 1, \
                     next_attempt_at = COALESCE(?4, next_attempt_at), last_error = ?5, \
                     sent_at = CASE WHEN ?3 = 'sent' THEN ?6 ELSE sent_at END, updated_at = ?6 \
                     WHERE tenant_id = ?1 AND issuance_id = ?2 AND state = 'pending' \
                     AND next_attempt_at = ?7",
                )
                .bind(&tenant)
                .bind(&id)
                .bind(email.state.as_str())
                .bind(email.next_attempt_at.map(time_text))
                .bind(&email.error)
                .bind(time_text(event.occurred_at))
                .bind(time_text(email.claimed_until))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
                if done.rows_affected() == 0 {
                    tx.rollback().await.map_err(db_error)?;
                    return Ok(TransitionOutcome::EmailLeaseLost);
                }
            }
            Some(EmailChange::CancelPending) => {
                sqlx::query(
                    "UPDATE email_deliveries SET state = 'cancelled', updated_at = ?3 \
                     WHERE tenant_id = ?1 AND issuance_id = ?2 AND state = 'pending'",
                )
                .bind(&tenant)
                .bind(&id)
                .bind(time_text(event.occurred_at))
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            }
            None => {}
        }
        sqlx::query(
            "INSERT INTO issuance_events \
             (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .bind(&tenant)
        .bind(&id)
        .bind(event.sequence)
        .bind(event.kind.as_str())
        .bind(event.status.as_str())
        .bind(&event.reason)
        .bind(time_text(event.occurred_at))
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if let Some(message) = t.webhook_message() {
            queue_deliveries(&mut tx, after, event, message).await?;
        }
        tx.commit().await.map_err(db_error)?;
        rows::count_status_change(t);
        Ok(TransitionOutcome::Applied(Box::new(rows::as_stored(after))))
    }

    #[tracing::instrument(name = "store.overdue_pending", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn overdue_pending(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(TenantId, IssuanceId)>> {
        sqlx::query(
            "SELECT tenant_id, id FROM issuances \
             WHERE status = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        )
        .bind(time_text(now))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| {
            let parse = |col: &str| -> Result<Uuid> {
                let text: String = r.try_get(col).map_err(db_error)?;
                Uuid::parse_str(&text).map_err(Error::internal)
            };
            Ok((TenantId(parse("tenant_id")?), IssuanceId(parse("id")?)))
        })
        .collect()
    }

    #[tracing::instrument(name = "store.insert_webhook_endpoint", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn insert_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<()> {
        sqlx::query(concat!(
            "INSERT INTO webhook_endpoints (",
            endpoint_columns!(),
            ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        ))
        .bind(id_text(e.tenant_id.0))
        .bind(id_text(e.id))
        .bind(&e.url)
        .bind(e.event_types.join(" "))
        .bind(&e.secret_sealed)
        .bind(&e.previous_secret_sealed)
        .bind(e.previous_secret_expires_at.map(time_text))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(e.failing_since.map(time_text))
        .bind(time_text(e.created_at))
        .bind(time_text(e.updated_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }

    #[tracing::instrument(name = "store.list_webhook_endpoints", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn list_webhook_endpoints(&self, tenant: TenantId) -> Result<Vec<WebhookEndpoint>> {
        sqlx::query(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = ? ORDER BY created_at, id"
        ))
        .bind(id_text(tenant.0))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_endpoint)
        .collect()
    }

    #[tracing::instrument(name = "store.get_webhook_endpoint", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn get_webhook_endpoint(
        &self,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>> {
        sqlx::query(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = ? AND id = ?"
        ))
        .bind(id_text(tenant.0))
        .bind(id_text(id))
        .fetch_optional(&self.pool)
        .await
        .map_err(db_error)?
        .as_ref()
        .map(rows::webhook_endpoint)
        .transpose()
    }

    #[tracing::instrument(name = "store.update_webhook_endpoint", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn update_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_endpoints SET url = ?3, event_types = ?4, secret_sealed = ?5, \
             previous_secret_sealed = ?6, previous_secret_expires_at = ?7, enabled = ?8, \
             disabled_reason = ?9, failing_since = ?10, updated_at = ?11 \
             WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(id_text(e.tenant_id.0))
        .bind(id_text(e.id))
        .bind(&e.url)
        .bind(e.event_types.join(" "))
        .bind(&e.secret_sealed)
        .bind(&e.previous_secret_sealed)
        .bind(e.previous_secret_expires_at.map(time_text))
        .bind(e.enabled)
        .bind(&e.disabled_reason)
        .bind(e.failing_since.map(time_text))
        .bind(time_text(e.updated_at))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.delete_webhook_endpoint", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn delete_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<bool> {
        let done = sqlx::query("DELETE FROM webhook_endpoints WHERE tenant_id = ? AND id = ?")
            .bind(id_text(tenant.0))
            .bind(id_text(id))
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.claim_deliveries", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        // One statement under SQLite's single writer: nothing else can claim in between.
        sqlx::query(concat!(
            "UPDATE webhook_deliveries SET next_attempt_at = ?2, updated_at = ?1 \
             WHERE (tenant_id, id) IN (SELECT d.tenant_id, d.id FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id \
             WHERE d.state = 'pending' AND d.next_attempt_at <= ?1 AND e.enabled \
             ORDER BY d.next_attempt_at LIMIT ?3) RETURNING ",
            delivery_columns!()
        ))
        .bind(time_text(now))
        .bind(time_text(lease_until))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.record_attempt", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn record_attempt(&self, a: &AttemptRecord) -> Result<()> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(db_error)?;
        let row = sqlx::query(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = ?3, \
             next_attempt_at = COALESCE(?4, next_attempt_at), last_status = ?5, last_error = ?6, \
             last_latency_ms = ?7, updated_at = ?8 WHERE tenant_id = ?1 AND id = ?2 \
             AND state = 'pending' AND next_attempt_at = ?9 RETURNING attempts",
        )
        .bind(id_text(a.tenant_id.0))
        .bind(id_text(a.delivery_id))
        .bind(a.state.as_str())
        .bind(a.next_attempt_at.map(time_text))
        .bind(a.status)
        .bind(&a.error)
        .bind(a.latency_ms)
        .bind(time_text(a.at))
        .bind(time_text(a.claimed_until))
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?;
        let Some(row) = row else {
            tx.rollback().await.map_err(db_error)?;
            return Ok(());
        };
        let attempt: i64 = row.try_get("attempts").map_err(db_error)?;
        sqlx::query(
            "INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, at, status, error, latency_ms) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id_text(a.tenant_id.0))
        .bind(id_text(a.delivery_id))
        .bind(attempt)
        .bind(time_text(a.at))
        .bind(a.status)
        .bind(&a.error)
        .bind(a.latency_ms)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        sqlx::query(
            "UPDATE webhook_endpoints SET \
             failing_since = CASE WHEN ?3 THEN NULL ELSE COALESCE(failing_since, ?4) END, \
             enabled = CASE WHEN ?5 IS NULL THEN enabled ELSE 0 END, \
             disabled_reason = COALESCE(?5, disabled_reason), updated_at = ?4 \
             WHERE tenant_id = ?1 AND id = ?2 \
             AND ((?3 AND failing_since IS NOT NULL) OR (NOT ?3 AND failing_since IS NULL) \
             OR ?5 IS NOT NULL)",
        )
        .bind(id_text(a.tenant_id.0))
        .bind(id_text(a.endpoint_id))
        .bind(a.state == DeliveryState::Delivered)
        .bind(time_text(a.at))
        .bind(&a.disable_endpoint)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)
    }

    #[tracing::instrument(name = "store.list_deliveries", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn list_deliveries(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        sqlx::query(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM webhook_deliveries WHERE tenant_id = ? AND endpoint_id = ? \
             ORDER BY created_at DESC, sequence DESC LIMIT ?"
        ))
        .bind(id_text(tenant.0))
        .bind(id_text(endpoint))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::webhook_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.retry_delivery", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn retry_delivery(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = ?4, updated_at = ?4 \
             WHERE tenant_id = ?1 AND endpoint_id = ?2 AND id = ?3",
        )
        .bind(id_text(tenant.0))
        .bind(id_text(endpoint))
        .bind(id_text(id))
        .bind(time_text(now))
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(done.rows_affected() == 1)
    }

    #[tracing::instrument(name = "store.claim_emails", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>> {
        // One statement under SQLite's single writer: nothing else can claim in between.
        sqlx::query(concat!(
            "UPDATE email_deliveries SET next_attempt_at = ?2, updated_at = ?1 \
             WHERE (tenant_id, issuance_id) IN (SELECT tenant_id, issuance_id \
             FROM email_deliveries WHERE state = 'pending' AND next_attempt_at <= ?1 \
             ORDER BY next_attempt_at LIMIT ?3) RETURNING ",
            email_columns!()
        ))
        .bind(time_text(now))
        .bind(time_text(lease_until))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::email_delivery)
        .collect()
    }

    #[tracing::instrument(name = "store.get_email_deliveries", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
    async fn get_email_deliveries(
        &self,
        tenant: TenantId,
        ids: &[IssuanceId],
    ) -> Result<Vec<EmailDelivery>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut q = QueryBuilder::<Sqlite>::new(concat!(
            "SELECT ",
            email_columns!(),
            " FROM email_deliveries WHERE tenant_id = "
        ));
        q.push_bind(id_text(tenant.0)).push(" AND issuance_id IN (");
        let mut list = q.separated(", ");
        for id in ids {
            list.push_bind(id_text(id.0));
        }
        q.push(")");
        q.build()
            .fetch_all(&self.pool)
            .await
            .map_err(db_error)?
            .iter()
            .map(rows::email_delivery)
            .collect()
    }

    #[tracing::instrument(name = "store.list_events", skip_all, fields(db.system = "sqlite", otel.kind = "client"))]
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
             WHERE tenant_id = ? AND issuance_id = ? AND sequence > ? \
             ORDER BY sequence"
        ))
        .bind(id_text(tenant.0))
        .bind(id_text(issuance.0))
        .bind(after)
        .fetch_all(&self.pool)
        .await
        .map_err(db_error)?
        .iter()
        .map(rows::event)
        .collect()
    }
}

/// Queues `message` for the tenant's enabled endpoints that asked for its type, inside the
/// transaction that wrote `event`.
async fn queue_deliveries(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    issuance: &Issuance,
    event: &IssuanceEvent,
    (kind, message_id, payload): (&'static str, String, Value),
) -> Result<()> {
    let endpoints = sqlx::query(
        "SELECT id, event_types FROM webhook_endpoints WHERE tenant_id = ? AND enabled",
    )
    .bind(id_text(issuance.tenant_id.0))
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    let payload = payload.to_string();
    let traceparent = rows::traceparent(&tracing::Span::current());
    for row in endpoints {
        let types: String = row.try_get("event_types").map_err(db_error)?;
        if !types.split_whitespace().any(|t| t == kind) {
            continue;
        }
        let endpoint: String = row.try_get("id").map_err(db_error)?;
        sqlx::query(
            "INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, sequence, \
             event_type, message_id, payload, state, attempts, next_attempt_at, traceparent, \
             created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', 0, ?9, ?10, ?9, ?9)",
        )
        .bind(id_text(issuance.tenant_id.0))
        .bind(id_text(Uuid::new_v4()))
        .bind(endpoint)
        .bind(id_text(issuance.id.0))
        .bind(event.sequence)
        .bind(kind)
        .bind(&message_id)
        .bind(&payload)
        .bind(time_text(event.occurred_at))
        .bind(&traceparent)
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}
