//! The one SQL store: every statement written once, run on Postgres or SQLite through the
//! dialect layer (`db.rs`). What only one backend does stays with it: the group commit of
//! creates and the one-statement retention pass on Postgres (`postgres.rs`, `pg_batch.rs`), the
//! retention loop on SQLite (`sqlite.rs`).
//!
//! Tracing and metrics are not here: [`crate::Metered`] wraps a store with them.

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    error::Result,
    ids::{IssuanceId, TenantId},
    lifecycle::{EmailChange, StatusEntries, Transition, TransitionOutcome, TxCodeAttempt},
    model::{
        ApiClient, Branding, Delivery, EmailDelivery, InsertOutcome, Issuance, IssuanceEvent,
        ListFilter, Purged, RateLimit, Scope, StoreGauges, Tenant,
    },
    ports::{StatusListContent, Store},
    status::{StatusBlock, StatusRef},
    webhook::{AttemptRecord, DeliveryState, WebhookDelivery, WebhookEndpoint},
};
use serde_json::Value;
use uuid::Uuid;

use crate::{
    db::{Db, DbError, Row, Sql, Tx},
    pg_batch::{CreateWrites, InsertBatcher, NewIssuance},
    postgres::ConnectionsLost,
    rows::{
        self, Backend, RowAccess, client_columns, delivery_columns, email_columns,
        endpoint_columns, event_columns, issuance_columns, issuance_insert_columns, tenant_columns,
    },
};

// What SQL cannot share, per backend, as text for `concat!`: each statement that needs one is
// written once and built at compile time for both backends (`per_backend!`).

/// A fresh random UUID, in the backend's stored form.
macro_rules! new_uuid {
    (postgres) => {
        "gen_random_uuid()"
    };
    (sqlite) => {
        "lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' || \
         substr(hex(randomblob(2)), 2) || '-' || substr('89ab', 1 + abs(random()) % 4, 1) || \
         substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6)))"
    };
}

/// Whether `$4` (the event type) is one of the words of `event_types`.
macro_rules! event_type_listed {
    (postgres) => {
        "$4 = ANY(string_to_array(event_types, ' '))"
    };
    (sqlite) => {
        "instr(' ' || event_types || ' ', ' ' || $4 || ' ') > 0"
    };
}

/// Row locking for the subquery of a claim: concurrent claimers on other replicas take other
/// rows instead of waiting (Postgres). SQLite's one writer needs none.
macro_rules! skip_locked {
    (postgres) => {
        " FOR UPDATE SKIP LOCKED"
    };
    (postgres, $of:literal) => {
        concat!(" FOR UPDATE OF ", $of, " SKIP LOCKED")
    };
    (sqlite $(, $of:literal)?) => {
        ""
    };
}

/// The statement `$sql!(backend)` for the backend at hand.
macro_rules! per_backend {
    ($backend:expr, $sql:ident) => {
        match $backend {
            Backend::Postgres => $sql!(postgres),
            Backend::Sqlite => $sql!(sqlite),
        }
    };
}

macro_rules! queue_deliveries_sql {
    ($d:ident) => {
        concat!(
            "INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, sequence, \
             event_type, message_id, payload, state, attempts, next_attempt_at, traceparent, \
             created_at, updated_at) SELECT tenant_id, ",
            new_uuid!($d),
            ", id, $2, $3, $4, $5, $6, 'pending', 0, $7, $8, $7, $7 \
             FROM webhook_endpoints WHERE tenant_id = $1 AND enabled AND ",
            event_type_listed!($d)
        )
    };
}

macro_rules! purge_nonces_sql {
    ($d:ident) => {
        concat!(
            "DELETE FROM used_nonces WHERE nonce_hash IN (SELECT nonce_hash FROM used_nonces \
             WHERE expires_at < $1 LIMIT $2",
            skip_locked!($d),
            ")"
        )
    };
}

macro_rules! claim_deliveries_sql {
    ($d:ident) => {
        concat!(
            "UPDATE webhook_deliveries SET next_attempt_at = $2, updated_at = $1 \
             WHERE (tenant_id, id) IN (SELECT d.tenant_id, d.id FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.tenant_id = d.tenant_id AND e.id = d.endpoint_id \
             WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND e.enabled \
             ORDER BY d.next_attempt_at LIMIT $3",
            skip_locked!($d, "d"),
            ") RETURNING ",
            delivery_columns!()
        )
    };
}

macro_rules! claim_emails_sql {
    ($d:ident) => {
        concat!(
            "UPDATE email_deliveries SET next_attempt_at = $2, updated_at = $1 \
             WHERE (tenant_id, issuance_id) IN (SELECT tenant_id, issuance_id \
             FROM email_deliveries WHERE state = 'pending' AND next_attempt_at <= $1 \
             ORDER BY next_attempt_at LIMIT $3",
            skip_locked!($d),
            ") RETURNING ",
            email_columns!()
        )
    };
}

/// A [`Store`] on Postgres (production) or SQLite (single node, development, tests).
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(crate) db: Db,
    /// Postgres: the group commit of creates.
    pub(crate) batcher: Option<Arc<InsertBatcher>>,
    /// Postgres: when the database was last seen unreachable.
    pub(crate) lost: Arc<ConnectionsLost>,
}

impl SqlStore {
    pub(crate) fn with_db(db: Db) -> Self {
        let batcher = match &db {
            Db::Postgres(pool) => Some(InsertBatcher::new(pool.clone())),
            Db::Sqlite(_) => None,
        };
        Self {
            db,
            batcher,
            lost: Arc::new(ConnectionsLost::new()),
        }
    }

    /// `postgresql` or `sqlite`, as OpenTelemetry's `db.system` names them.
    pub fn system(&self) -> &'static str {
        self.db.backend().system()
    }

    /// How many statements the creates so far took (Postgres groups concurrent creates; on
    /// SQLite each create is its own transaction and nothing is counted).
    pub fn create_writes(&self) -> CreateWrites {
        self.batcher
            .as_ref()
            .map(|b| b.writes())
            .unwrap_or_default()
    }

    /// Closes the pool: waits for the connections in use, closes them all.
    pub async fn close(&self) {
        match &self.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }

    /// Applies the embedded migrations of the backend that have not run yet.
    pub async fn migrate(&self) -> Result<()> {
        let backend = self.db.backend();
        match &self.db {
            Db::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await,
            Db::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await,
        }
        .map_err(|e| rows::migrate_error(backend, e))
    }

    async fn fetch_issuance(&self, q: Sql) -> Result<Option<Issuance>> {
        self.optional(&q, rows::issuance).await
    }

    /// Every row of `q`, mapped.
    async fn all<T>(&self, q: &Sql, map: impl Fn(&Row) -> Result<T>) -> Result<Vec<T>> {
        self.db.on().fetch_all(q).await?.iter().map(map).collect()
    }

    /// The row of `q` if there is one, mapped.
    async fn optional<T>(&self, q: &Sql, map: impl Fn(&Row) -> Result<T>) -> Result<Option<T>> {
        self.db
            .on()
            .fetch_optional(q)
            .await?
            .as_ref()
            .map(map)
            .transpose()
    }

    /// A create in a transaction of its own: the issuance, its first event, its webhook
    /// deliveries and its email row, or the existing issuance of its `client_request_id`.
    async fn insert_alone(
        &self,
        issuance: &Issuance,
        first_event: &IssuanceEvent,
    ) -> Result<InsertOutcome> {
        let mut tx = self.db.begin_write().await?;
        if let Some(stored) = write_create(&mut tx, issuance, first_event).await? {
            tx.commit().await?;
            return Ok(InsertOutcome::Inserted(stored));
        }
        // Read in the transaction: the pool of an in-memory SQLite store has only this one
        // connection, and the conflicting row is committed (SQLite's write lock; Postgres
        // waited for the conflicting transaction before `DO NOTHING`).
        let existing = tx
            .on()
            .fetch_optional(
                &Sql::new(concat!(
                    "SELECT ",
                    issuance_columns!(),
                    " FROM issuances WHERE tenant_id = $1 AND client_request_id = $2"
                ))
                .id(issuance.tenant_id.0)
                .text(&issuance.client_request_id),
            )
            .await?;
        tx.rollback().await?;
        let existing = existing.ok_or_else(conflict_without_row)?;
        Ok(InsertOutcome::Duplicate(rows::issuance(&existing)?))
    }

    /// The creates of a batch in one transaction (SQLite: one commit, one sync, for all);
    /// `true` for each row written, `false` where the key existed. Should the transaction fail,
    /// each create runs alone, so that one bad row cannot fail its neighbours.
    async fn insert_together(&self, items: &[(Issuance, IssuanceEvent)]) -> Vec<Result<bool>> {
        let together = async {
            let mut tx = self.db.begin_write().await?;
            let mut written = Vec::with_capacity(items.len());
            for (issuance, event) in items {
                written.push(write_create(&mut tx, issuance, event).await?.is_some());
            }
            tx.commit().await?;
            Ok::<_, Error>(written)
        };
        match together.await {
            Ok(written) => written.into_iter().map(Ok).collect(),
            Err(e) => {
                tracing::debug!(error = %e.chain(), rows = items.len(), "batched insert failed; writing its rows one by one");
                let mut written = Vec::with_capacity(items.len());
                for (issuance, event) in items {
                    written.push(
                        self.insert_alone(issuance, event)
                            .await
                            .map(|o| matches!(o, InsertOutcome::Inserted(_))),
                    );
                }
                written
            }
        }
    }

    /// The tenant's issuances holding any of `keys`, by key; in statements of a few hundred
    /// keys each.
    async fn find_by_request_ids(
        &self,
        tenant: TenantId,
        keys: &[&str],
    ) -> Result<HashMap<String, Issuance>> {
        let mut found = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(500) {
            let mut q = Sql::new(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE tenant_id = $1 AND client_request_id IN ("
            ))
            .id(tenant.0);
            for (i, key) in chunk.iter().enumerate() {
                let placeholder = format!(
                    "{}${}",
                    if i == 0 { "" } else { ", " },
                    q.next_placeholder()
                );
                q = q.push(&placeholder).text(*key);
            }
            for issuance in self.all(&q.push(")"), rows::issuance).await? {
                found.insert(issuance.client_request_id.clone(), issuance);
            }
        }
        Ok(found)
    }
}

impl SqlStore {
    /// `take` allocations of the oldest list with room for them, in one statement: concurrent
    /// callers serialize on the list's row for that statement only, never for a transaction.
    async fn reserve_status_block(&self, take: i64) -> Result<Option<StatusBlock>> {
        let q = Sql::new(
            "UPDATE status_lists SET allocated = allocated + $1 \
             WHERE id = (SELECT id FROM status_lists WHERE allocated + $1 <= size \
             ORDER BY created_at, id LIMIT 1) AND allocated + $1 <= size \
             RETURNING id, size, seed, allocated",
        )
        .int(take);
        self.optional(&q, |row| rows::status_block(row, take)).await
    }

    /// Opens a new status list with a fresh id and permutation key, its first `take`
    /// allocations taken by the caller.
    async fn open_status_list(&self, size: i64, take: i64) -> Result<StatusBlock> {
        let (id, seed) = (Uuid::new_v4(), rand::random::<[u8; 16]>());
        let q = Sql::new(
            "INSERT INTO status_lists (id, size, allocated, seed, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .id(id)
        .int(size)
        .int(take)
        .text(rows::status_seed_text(&seed))
        .time(Utc::now());
        self.db.on().execute(&q).await?;
        tracing::info!(size, "status list opened");
        Ok(StatusBlock {
            list_id: id,
            size,
            seed,
            first: 0,
            count: take,
        })
    }
}

fn conflict_without_row() -> Error {
    Error::internal("insert conflicted on client_request_id but no row holds it")
}

/// Writes a create inside `tx`: the issuance, and when its key was free its first event,
/// webhook deliveries and email row. The stored issuance, or `None` when the key was taken.
async fn write_create(
    tx: &mut Tx,
    issuance: &Issuance,
    first_event: &IssuanceEvent,
) -> Result<Option<Issuance>> {
    let inserted = tx
        .on()
        .fetch_optional(&issuance_values(
            Sql::new(concat!(
                "INSERT INTO issuances (",
                issuance_insert_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
                 $16, $17, $18, $19, $20, $21, $22) \
                 ON CONFLICT (tenant_id, client_request_id) DO NOTHING RETURNING ",
                issuance_columns!()
            )),
            issuance,
        ))
        .await?;
    let Some(row) = inserted else {
        return Ok(None);
    };
    append_event(tx, first_event).await?;
    // Mapped before committing: a decode failure must not leave a committed row behind a
    // reported error.
    let stored = rows::issuance(&row)?;
    if let Some(message) = rows::webhook_message(&stored, first_event, false) {
        queue_deliveries(tx, &stored, first_event, message).await?;
    }
    if stored.delivery == Delivery::Email {
        tx.on()
            .execute(
                &Sql::new(
                    "INSERT INTO email_deliveries (tenant_id, issuance_id, state, attempts, \
                     next_attempt_at, created_at, updated_at) \
                     VALUES ($1, $2, 'pending', 0, $3, $3, $3)",
                )
                .id(stored.tenant_id.0)
                .id(stored.id.0)
                .time(stored.created_at),
            )
            .await?;
    }
    Ok(Some(stored))
}

/// Binds the columns of [`issuance_insert_columns`] in their order.
fn issuance_values(q: Sql, i: &Issuance) -> Sql {
    q.id(i.tenant_id.0)
        .id(i.id.0)
        .text(&i.client_request_id)
        .text(&i.request_fingerprint)
        .text(&i.credential_configuration_id)
        .text(i.status.as_str())
        .opt_text(i.reason.map(|r| r.as_str()))
        .json(i.payload.clone())
        .text(i.delivery.as_str())
        .opt_text(i.email.as_deref())
        .text(&i.grant_type)
        .text(&i.offer_id)
        .text(&i.pre_authorized_code_hash)
        .text(&i.pre_authorized_code_sealed)
        .time(i.expires_at)
        .time(i.created_at)
        .time(i.updated_at)
        .opt_text(i.tx_code_hash.as_deref())
        .int(i.tx_code_failures)
        .opt_time(i.code_redeemed_at)
        .opt_text(i.notification_id.as_deref())
        .opt_id(i.batch_id)
}

/// The columns of `webhook_endpoints` an insert writes: [`endpoint_columns`] with
/// `created_at` last, so that an update binds the same first eleven.
const ENDPOINT_INSERT_COLUMNS: &str = "tenant_id, id, url, event_types, secret_sealed, \
    previous_secret_sealed, previous_secret_expires_at, enabled, disabled_reason, failing_since, \
    updated_at, created_at";

/// Binds an endpoint's columns but `created_at`, in the order of [`ENDPOINT_INSERT_COLUMNS`].
fn endpoint_values(q: Sql, e: &WebhookEndpoint) -> Sql {
    q.id(e.tenant_id.0)
        .id(e.id)
        .text(&e.url)
        .text(e.event_types.join(" "))
        .text(&e.secret_sealed)
        .opt_text(e.previous_secret_sealed.as_deref())
        .opt_time(e.previous_secret_expires_at)
        .flag(e.enabled)
        .opt_text(e.disabled_reason.as_deref())
        .opt_time(e.failing_since)
        .time(e.updated_at)
}

async fn append_event(tx: &mut Tx, e: &IssuanceEvent) -> Result<()> {
    tx.on()
        .execute(
            &Sql::new(
                "INSERT INTO issuance_events \
                 (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .id(e.tenant_id.0)
            .id(e.issuance_id.0)
            .int(e.sequence)
            .text(e.kind.as_str())
            .text(e.status.as_str())
            .opt_text(e.reason.as_deref())
            .time(e.occurred_at),
        )
        .await?;
    Ok(())
}

/// Queues `message` for the tenant's enabled endpoints that asked for its type, inside the
/// transaction that wrote `event`, with the caller's trace context.
/// The status-list entries of a credential's copies, all valid, in one statement.
async fn add_status_entries(
    tx: &mut Tx,
    tenant: TenantId,
    issuance: IssuanceId,
    copies: &[StatusRef],
    at: DateTime<Utc>,
) -> Result<()> {
    let mut q = Sql::new(
        "INSERT INTO status_entries (list_id, idx, tenant_id, issuance_id, status, updated_at) \
         VALUES ",
    );
    for (n, copy) in copies.iter().enumerate() {
        let p = q.next_placeholder();
        q = q
            .push(&format!(
                "{}(${p}, ${}, ${}, ${}, 0, ${})",
                if n == 0 { "" } else { ", " },
                p + 1,
                p + 2,
                p + 3,
                p + 4
            ))
            .id(copy.list_id)
            .int(copy.idx)
            .id(tenant.0)
            .id(issuance.0)
            .time(at);
    }
    tx.on().execute(&q).await?;
    Ok(())
}

async fn queue_deliveries(
    tx: &mut Tx,
    issuance: &Issuance,
    event: &IssuanceEvent,
    (kind, message_id, payload): (&'static str, String, Value),
) -> Result<()> {
    let sql = per_backend!(tx.backend(), queue_deliveries_sql);
    tx.on()
        .execute(
            &Sql::new(sql)
                .id(issuance.tenant_id.0)
                .id(issuance.id.0)
                .int(event.sequence)
                .text(kind)
                .text(message_id)
                .json(Some(payload))
                .time(event.occurred_at)
                .opt_text(rows::traceparent(&tracing::Span::current())),
        )
        .await?;
    Ok(())
}

impl Backend {
    /// OpenTelemetry's `db.system`.
    pub(crate) fn system(self) -> &'static str {
        match self {
            Backend::Postgres => "postgresql",
            Backend::Sqlite => "sqlite",
        }
    }
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[async_trait]
impl Store for SqlStore {
    async fn ping(&self) -> Result<()> {
        let ping = self.db.on().execute(&Sql::new("SELECT 1")).await;
        if let Err(DbError { backend, source }) = &ping
            && rows::is_connection_lost(*backend, source)
        {
            self.lost.record();
        }
        ping?;
        Ok(())
    }

    async fn gauges(&self) -> Result<StoreGauges> {
        let row = self.db.on().fetch_one(&Sql::new(rows::GAUGES_SQL)).await?;
        let (size, idle, max) = self.db.pool_stats();
        rows::gauges(&row, size, idle, max)
    }

    async fn insert_tenant(&self, tenant: &Tenant) -> Result<()> {
        let q = Sql::new(concat!(
            "INSERT INTO tenants (",
            tenant_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .id(tenant.id.0)
        .text(&tenant.name)
        .int(tenant.default_offer_ttl_secs)
        .int(tenant.max_offer_ttl_secs)
        .time(tenant.created_at)
        .flag(tenant.require_tx_code)
        .opt_text(tenant.branding.display_name.as_deref())
        .opt_text(tenant.branding.logo_url.as_deref())
        .opt_text(tenant.branding.support_contact.as_deref())
        .opt_int(tenant.client_rate_limit.map(|l| i64::from(l.per_sec)))
        .opt_int(tenant.client_rate_limit.map(|l| i64::from(l.burst)));
        self.db.on().execute(&q).await.map_err(|e| {
            rows::conflict_or_db_error(e.backend, e.source, &["tenants_pkey"], || {
                format!("tenant `{}` already exists", tenant.id)
            })
        })?;
        Ok(())
    }

    async fn get_tenant(&self, id: TenantId) -> Result<Option<Tenant>> {
        let q = Sql::new(concat!(
            "SELECT ",
            tenant_columns!(),
            " FROM tenants WHERE id = $1"
        ))
        .id(id.0);
        self.optional(&q, rows::tenant).await
    }

    async fn count_tenants(&self) -> Result<u64> {
        let q = Sql::new("SELECT count(*) AS n FROM tenants");
        let row = self.db.on().fetch_one(&q).await?;
        Ok(count(row.int("n").map_err(Error::internal)?))
    }

    async fn update_tenant_branding(&self, id: TenantId, branding: &Branding) -> Result<bool> {
        let q = Sql::new(
            "UPDATE tenants SET display_name = $2, logo_url = $3, support_contact = $4 \
             WHERE id = $1",
        )
        .id(id.0)
        .opt_text(branding.display_name.as_deref())
        .opt_text(branding.logo_url.as_deref())
        .opt_text(branding.support_contact.as_deref());
        Ok(self.db.on().execute(&q).await? > 0)
    }

    async fn update_tenant_rate_limit(
        &self,
        id: TenantId,
        limit: Option<RateLimit>,
    ) -> Result<bool> {
        let q = Sql::new(
            "UPDATE tenants SET rate_limit_per_sec = $2, rate_limit_burst = $3 WHERE id = $1",
        )
        .id(id.0)
        .opt_int(limit.map(|l| i64::from(l.per_sec)))
        .opt_int(limit.map(|l| i64::from(l.burst)));
        Ok(self.db.on().execute(&q).await? > 0)
    }

    async fn insert_client(&self, client: &ApiClient) -> Result<()> {
        let q = Sql::new(concat!(
            "INSERT INTO api_clients (",
            client_columns!(),
            ", updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)"
        ))
        .id(client.tenant_id.0)
        .text(&client.client_id)
        .text(&client.secret_hash)
        .text(Scope::join(&client.scopes))
        .flag(client.active)
        .time(client.created_at);
        self.db.on().execute(&q).await.map_err(|e| {
            // Both unique constraints of api_clients (the primary key and client_id) mean the
            // client id is taken (SQLite does not name them; there any violation counts).
            rows::conflict_or_db_error(
                e.backend,
                e.source,
                &["api_clients_client_id_key", "api_clients_pkey"],
                || format!("client `{}` already exists", client.client_id),
            )
        })?;
        Ok(())
    }

    async fn find_client(&self, client_id: &str) -> Result<Option<ApiClient>> {
        let q = Sql::new(concat!(
            "SELECT ",
            client_columns!(),
            " FROM api_clients WHERE client_id = $1"
        ))
        .text(client_id);
        self.optional(&q, rows::client).await
    }

    async fn update_client_secret(
        &self,
        tenant: TenantId,
        client_id: &str,
        secret_hash: &str,
    ) -> Result<bool> {
        let q = Sql::new(
            "UPDATE api_clients SET secret_hash = $3, updated_at = $4 \
             WHERE tenant_id = $1 AND client_id = $2",
        )
        .id(tenant.0)
        .text(client_id)
        .text(secret_hash)
        .time(Utc::now());
        Ok(self.db.on().execute(&q).await? > 0)
    }

    async fn insert_issuances(
        &self,
        items: &[(Issuance, IssuanceEvent)],
    ) -> Result<Vec<Result<InsertOutcome>>> {
        for (issuance, event) in items {
            rows::check_first_event(issuance, event)?;
        }
        let written = match &self.batcher {
            Some(batcher) => {
                let traceparent = rows::traceparent(&tracing::Span::current());
                let rows = items
                    .iter()
                    .map(|(issuance, event)| {
                        let webhook = rows::webhook_message(issuance, event, false);
                        NewIssuance {
                            issuance: issuance.clone(),
                            event: event.clone(),
                            traceparent: webhook.as_ref().and(traceparent.clone()),
                            webhook,
                        }
                    })
                    .collect();
                batcher.insert_group(rows).await
            }
            None => self.insert_together(items).await,
        };
        // The existing issuances of the keys that were taken, a few statements per tenant.
        let mut taken: HashMap<TenantId, Vec<&str>> = HashMap::new();
        for ((issuance, _), written) in items.iter().zip(&written) {
            if let Ok(false) = written {
                taken
                    .entry(issuance.tenant_id)
                    .or_default()
                    .push(&issuance.client_request_id);
            }
        }
        let mut existing = HashMap::new();
        for (tenant, keys) in taken {
            existing.insert(tenant, self.find_by_request_ids(tenant, &keys).await?);
        }
        Ok(items
            .iter()
            .zip(written)
            .map(|((issuance, _), written)| match written? {
                true => Ok(InsertOutcome::Inserted(rows::as_stored(issuance))),
                false => existing
                    .get_mut(&issuance.tenant_id)
                    .and_then(|found| found.remove(&issuance.client_request_id))
                    .map(InsertOutcome::Duplicate)
                    .ok_or_else(conflict_without_row),
            })
            .collect())
    }

    async fn get_issuance(&self, tenant: TenantId, id: IssuanceId) -> Result<Option<Issuance>> {
        self.fetch_issuance(
            Sql::new(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE tenant_id = $1 AND id = $2"
            ))
            .id(tenant.0)
            .id(id.0),
        )
        .await
    }

    async fn find_issuance_by_request_id(
        &self,
        tenant: TenantId,
        client_request_id: &str,
    ) -> Result<Option<Issuance>> {
        self.fetch_issuance(
            Sql::new(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE tenant_id = $1 AND client_request_id = $2"
            ))
            .id(tenant.0)
            .text(client_request_id),
        )
        .await
    }

    async fn list_issuances(&self, tenant: TenantId, filter: &ListFilter) -> Result<Vec<Issuance>> {
        let mut q = Sql::new(concat!(
            "SELECT ",
            issuance_columns!(),
            " FROM issuances WHERE tenant_id = $1"
        ))
        .id(tenant.0);
        if let Some(status) = filter.status {
            let n = q.next_placeholder();
            q = q.push(&format!(" AND status = ${n}")).text(status.as_str());
        }
        if let Some(crid) = &filter.client_request_id {
            let n = q.next_placeholder();
            q = q.push(&format!(" AND client_request_id = ${n}")).text(crid);
        }
        if let Some(batch) = filter.batch_id {
            let n = q.next_placeholder();
            q = q.push(&format!(" AND batch_id = ${n}")).id(batch);
        }
        if let Some(before) = filter.before {
            let n = q.next_placeholder();
            q = q.push(&format!(" AND id < ${n}")).id(before.0);
        }
        let n = q.next_placeholder();
        q = q
            .push(&format!(" ORDER BY id DESC LIMIT ${n}"))
            .int(i64::from(filter.limit));
        self.all(&q, rows::issuance).await
    }

    async fn find_issuance_by_offer_id(&self, offer_id: &str) -> Result<Option<Issuance>> {
        self.fetch_issuance(
            Sql::new(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE offer_id = $1"
            ))
            .text(offer_id),
        )
        .await
    }

    async fn find_issuance_by_code_hash(&self, code_hash: &str) -> Result<Option<Issuance>> {
        self.fetch_issuance(
            Sql::new(concat!(
                "SELECT ",
                issuance_columns!(),
                " FROM issuances WHERE pre_authorized_code_hash = $1"
            ))
            .text(code_hash),
        )
        .await
    }

    async fn reserve_tx_code_attempt(&self, attempt: &TxCodeAttempt) -> Result<Option<i64>> {
        // One conditional statement: concurrent guesses serialize on the row (the write lock
        // on SQLite), and only the first `max_attempts` of them find the counter below the cap.
        let q = Sql::new(
            "UPDATE issuances SET tx_code_failures = tx_code_failures + 1 \
             WHERE tenant_id = $1 AND id = $2 AND version = $3 AND tx_code_failures < $4 \
             RETURNING tx_code_failures",
        )
        .id(attempt.tenant_id.0)
        .id(attempt.id.0)
        .int(attempt.version)
        .int(attempt.max_attempts);
        self.db
            .on()
            .fetch_optional(&q)
            .await?
            .map(|row| row.int("tx_code_failures").map_err(Error::internal))
            .transpose()
    }

    async fn use_nonce(
        &self,
        tenant: TenantId,
        nonce_hash: &str,
        expires_at: DateTime<Utc>,
    ) -> Result<bool> {
        let q = Sql::new(
            "INSERT INTO used_nonces (tenant_id, nonce_hash, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (nonce_hash) DO NOTHING",
        )
        .id(tenant.0)
        .text(nonce_hash)
        .time(expires_at);
        Ok(self.db.on().execute(&q).await? == 1)
    }

    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64> {
        let q = Sql::new(per_backend!(self.db.backend(), purge_nonces_sql))
            .time(now)
            .int(i64::from(limit));
        Ok(self.db.on().execute(&q).await?)
    }

    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged> {
        match &self.db {
            Db::Postgres(_) => crate::postgres::purge_ended(&self.db, ended_before, limit).await,
            Db::Sqlite(_) => crate::sqlite::purge_ended(&self.db, ended_before, limit).await,
        }
    }

    async fn transition(&self, t: &Transition) -> Result<TransitionOutcome> {
        let (after, event) = (&t.after, &t.event);
        let (tenant, id) = (after.tenant_id.0, after.id.0);
        let mut tx = self.db.begin_write().await?;
        // The compare-and-set: concurrent writers of one issuance serialize on its row (the
        // write lock on SQLite), and only the first that planned from the current version
        // applies.
        let cas = Sql::new(
            "UPDATE issuances SET status = $3, reason = $4, version = $5, updated_at = $6, \
             payload = CASE WHEN $7 THEN payload ELSE NULL END, code_redeemed_at = $8, \
             notification_id = $9, offer_retrieved_at = $10, credential_status = $12, \
             credentials_issued = $13, credential_expires_at = $14 \
             WHERE tenant_id = $1 AND id = $2 AND version = $11",
        )
        .id(tenant)
        .id(id)
        .text(after.status.as_str())
        .opt_text(after.reason.map(|r| r.as_str()))
        .int(after.version)
        .time(after.updated_at)
        .flag(after.payload.is_some())
        .opt_time(after.code_redeemed_at)
        .opt_text(after.notification_id.as_deref())
        .opt_time(after.offer_retrieved_at)
        .int(t.expected_version)
        .opt_text(after.credential.map(|c| c.status.as_str()))
        .int(after.credential.map_or(0, |c| c.count))
        .opt_time(after.credential.map(|c| c.expires_at));
        if tx.on().execute(&cas).await? == 0 {
            tx.rollback().await?;
            return Ok(TransitionOutcome::Stale);
        }
        match &t.email {
            Some(EmailChange::Record(email)) => {
                // Only under the attempt's own lease: a result that comes after another mailer
                // took the row over is dropped, event and all (the transaction rolls back).
                let q = Sql::new(
                    "UPDATE email_deliveries SET state = $3, attempts = attempts + 1, \
                     next_attempt_at = COALESCE($4, next_attempt_at), last_error = $5, \
                     sent_at = CASE WHEN $3 = 'sent' THEN $6 ELSE sent_at END, updated_at = $6 \
                     WHERE tenant_id = $1 AND issuance_id = $2 AND state = 'pending' \
                     AND next_attempt_at = $7",
                )
                .id(tenant)
                .id(id)
                .text(email.state.as_str())
                .opt_time(email.next_attempt_at)
                .opt_text(email.error.as_deref())
                .time(event.occurred_at)
                .time(email.claimed_until);
                if tx.on().execute(&q).await? == 0 {
                    tx.rollback().await?;
                    return Ok(TransitionOutcome::EmailLeaseLost);
                }
            }
            Some(EmailChange::CancelPending) => {
                let q = Sql::new(
                    "UPDATE email_deliveries SET state = 'cancelled', updated_at = $3 \
                     WHERE tenant_id = $1 AND issuance_id = $2 AND state = 'pending'",
                )
                .id(tenant)
                .id(id)
                .time(event.occurred_at);
                tx.on().execute(&q).await?;
            }
            None => {}
        }
        match &t.status_entries {
            Some(StatusEntries::Add(copies)) => {
                add_status_entries(
                    &mut tx,
                    after.tenant_id,
                    after.id,
                    copies,
                    event.occurred_at,
                )
                .await?;
            }
            Some(StatusEntries::Set(status)) => {
                let q = Sql::new(
                    "UPDATE status_entries SET status = $3, updated_at = $4 \
                     WHERE tenant_id = $1 AND issuance_id = $2",
                )
                .id(tenant)
                .id(id)
                .int(i64::from(status.list_value()))
                .time(event.occurred_at);
                tx.on().execute(&q).await?;
            }
            None => {}
        }
        append_event(&mut tx, event).await?;
        if let Some(message) = t.webhook_message() {
            queue_deliveries(&mut tx, after, event, message).await?;
        }
        tx.commit().await?;
        Ok(TransitionOutcome::Applied(Box::new(rows::as_stored(after))))
    }

    async fn overdue_pending(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<(TenantId, IssuanceId)>> {
        let q = Sql::new(
            "SELECT tenant_id, id FROM issuances \
             WHERE status = 'pending' AND expires_at <= $1 ORDER BY expires_at LIMIT $2",
        )
        .time(now)
        .int(i64::from(limit));
        self.db
            .on()
            .fetch_all(&q)
            .await?
            .iter()
            .map(|r| {
                let tenant = r.uuid("tenant_id").map_err(Error::internal)?;
                let id = r.uuid("id").map_err(Error::internal)?;
                Ok((TenantId(tenant), IssuanceId(id)))
            })
            .collect()
    }

    async fn insert_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<()> {
        let q = endpoint_values(
            Sql::new(format!(
                "INSERT INTO webhook_endpoints ({ENDPOINT_INSERT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
            )),
            e,
        )
        .time(e.created_at);
        self.db.on().execute(&q).await?;
        Ok(())
    }

    async fn list_webhook_endpoints(&self, tenant: TenantId) -> Result<Vec<WebhookEndpoint>> {
        let q = Sql::new(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = $1 ORDER BY created_at, id"
        ))
        .id(tenant.0);
        self.all(&q, rows::webhook_endpoint).await
    }

    async fn get_webhook_endpoint(
        &self,
        tenant: TenantId,
        id: Uuid,
    ) -> Result<Option<WebhookEndpoint>> {
        let q = Sql::new(concat!(
            "SELECT ",
            endpoint_columns!(),
            " FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2"
        ))
        .id(tenant.0)
        .id(id);
        self.optional(&q, rows::webhook_endpoint).await
    }

    async fn update_webhook_endpoint(&self, e: &WebhookEndpoint) -> Result<bool> {
        let q = endpoint_values(
            Sql::new(
                "UPDATE webhook_endpoints SET url = $3, event_types = $4, secret_sealed = $5, \
                 previous_secret_sealed = $6, previous_secret_expires_at = $7, enabled = $8, \
                 disabled_reason = $9, failing_since = $10, updated_at = $11 \
                 WHERE tenant_id = $1 AND id = $2",
            ),
            e,
        );
        Ok(self.db.on().execute(&q).await? == 1)
    }

    async fn delete_webhook_endpoint(&self, tenant: TenantId, id: Uuid) -> Result<bool> {
        let q = Sql::new("DELETE FROM webhook_endpoints WHERE tenant_id = $1 AND id = $2")
            .id(tenant.0)
            .id(id);
        Ok(self.db.on().execute(&q).await? == 1)
    }

    async fn claim_deliveries(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        // One statement: on SQLite nothing else can claim in between (one writer); on Postgres
        // dispatchers on other replicas skip the rows this one locked.
        let q = Sql::new(per_backend!(self.db.backend(), claim_deliveries_sql))
            .time(now)
            .time(lease_until)
            .int(i64::from(limit));
        self.all(&q, rows::webhook_delivery).await
    }

    async fn record_attempt(&self, a: &AttemptRecord) -> Result<()> {
        let mut tx = self.db.begin_write().await?;
        // Only while the delivery is still pending under the attempt's lease.
        let q = Sql::new(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, state = $3, \
             next_attempt_at = COALESCE($4, next_attempt_at), last_status = $5, last_error = $6, \
             last_latency_ms = $7, updated_at = $8 WHERE tenant_id = $1 AND id = $2 \
             AND state = 'pending' AND next_attempt_at = $9 RETURNING attempts",
        )
        .id(a.tenant_id.0)
        .id(a.delivery_id)
        .text(a.state.as_str())
        .opt_time(a.next_attempt_at)
        .opt_int(a.status)
        .opt_text(a.error.as_deref())
        .int(a.latency_ms)
        .time(a.at)
        .time(a.claimed_until);
        let Some(row) = tx.on().fetch_optional(&q).await? else {
            tx.rollback().await?;
            return Ok(());
        };
        let attempt = row.int("attempts").map_err(Error::internal)?;
        let q = Sql::new(
            "INSERT INTO webhook_attempts (tenant_id, delivery_id, attempt, at, status, error, \
             latency_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .id(a.tenant_id.0)
        .id(a.delivery_id)
        .int(attempt)
        .time(a.at)
        .opt_int(a.status)
        .opt_text(a.error.as_deref())
        .int(a.latency_ms);
        tx.on().execute(&q).await?;
        // The endpoint row is only touched when its state changes, so that concurrent
        // successful deliveries to one endpoint do not queue on its row lock.
        let q = Sql::new(
            "UPDATE webhook_endpoints SET \
             failing_since = CASE WHEN $3 THEN NULL ELSE COALESCE(failing_since, $4) END, \
             enabled = enabled AND CAST($5 AS TEXT) IS NULL, \
             disabled_reason = COALESCE(CAST($5 AS TEXT), disabled_reason), updated_at = $4 \
             WHERE tenant_id = $1 AND id = $2 \
             AND (($3 AND failing_since IS NOT NULL) OR (NOT $3 AND failing_since IS NULL) \
             OR CAST($5 AS TEXT) IS NOT NULL)",
        )
        .id(a.tenant_id.0)
        .id(a.endpoint_id)
        .flag(a.state == DeliveryState::Delivered)
        .time(a.at)
        .opt_text(a.disable_endpoint.as_deref());
        tx.on().execute(&q).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_deliveries(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        limit: u32,
    ) -> Result<Vec<WebhookDelivery>> {
        let q = Sql::new(concat!(
            "SELECT ",
            delivery_columns!(),
            " FROM webhook_deliveries WHERE tenant_id = $1 AND endpoint_id = $2 \
             ORDER BY created_at DESC, sequence DESC LIMIT $3"
        ))
        .id(tenant.0)
        .id(endpoint)
        .int(i64::from(limit));
        self.all(&q, rows::webhook_delivery).await
    }

    async fn retry_delivery(
        &self,
        tenant: TenantId,
        endpoint: Uuid,
        id: Uuid,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let q = Sql::new(
            "UPDATE webhook_deliveries SET state = 'pending', next_attempt_at = $4, \
             updated_at = $4 WHERE tenant_id = $1 AND endpoint_id = $2 AND id = $3",
        )
        .id(tenant.0)
        .id(endpoint)
        .id(id)
        .time(now);
        Ok(self.db.on().execute(&q).await? == 1)
    }

    async fn claim_emails(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<EmailDelivery>> {
        // As `claim_deliveries`: one statement, skipping rows other mailers hold.
        let q = Sql::new(per_backend!(self.db.backend(), claim_emails_sql))
            .time(now)
            .time(lease_until)
            .int(i64::from(limit));
        self.all(&q, rows::email_delivery).await
    }

    async fn get_email_deliveries(
        &self,
        tenant: TenantId,
        ids: &[IssuanceId],
    ) -> Result<Vec<EmailDelivery>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let placeholders: Vec<String> = (2..ids.len() + 2).map(|n| format!("${n}")).collect();
        let mut q = Sql::new(format!(
            concat!(
                "SELECT ",
                email_columns!(),
                " FROM email_deliveries WHERE tenant_id = $1 AND issuance_id IN ({})"
            ),
            placeholders.join(", ")
        ))
        .id(tenant.0);
        for id in ids {
            q = q.id(id.0);
        }
        self.all(&q, rows::email_delivery).await
    }

    async fn list_events(
        &self,
        tenant: TenantId,
        issuance: IssuanceId,
        after: i64,
    ) -> Result<Vec<IssuanceEvent>> {
        let q = Sql::new(concat!(
            "SELECT ",
            event_columns!(),
            " FROM issuance_events \
             WHERE tenant_id = $1 AND issuance_id = $2 AND sequence > $3 ORDER BY sequence"
        ))
        .id(tenant.0)
        .id(issuance.0)
        .int(after);
        self.all(&q, rows::event).await
    }

    async fn allocate_status(&self, count: i64, list_size: i64) -> Result<Vec<StatusBlock>> {
        let mut blocks = Vec::new();
        let mut need = count;
        while need > 0 {
            let take = need.min(list_size);
            // Lists near their end give what they have left, one allocation at a time (the
            // rare path); when no list has room, a new one opens with this request's block
            // already taken, so that every turn of the loop makes progress however many
            // requests race for the lists.
            let block = match self.reserve_status_block(take).await? {
                None if take > 1 => self.reserve_status_block(1).await?,
                block => block,
            };
            let block = match block {
                Some(block) => block,
                None => self.open_status_list(list_size, take).await?,
            };
            need -= block.count;
            blocks.push(block);
        }
        Ok(blocks)
    }

    async fn status_list(
        &self,
        list_id: Uuid,
        changed_since: Option<DateTime<Utc>>,
    ) -> Result<Option<StatusListContent>> {
        let Some(size) = self
            .optional(
                &Sql::new("SELECT size FROM status_lists WHERE id = $1").id(list_id),
                |row| row.int("size").map_err(Error::internal),
            )
            .await?
        else {
            return Ok(None);
        };
        let q = match changed_since {
            None => Sql::new(
                "SELECT idx, status FROM status_entries WHERE list_id = $1 AND status <> 0",
            )
            .id(list_id),
            Some(since) => Sql::new(
                "SELECT idx, status FROM status_entries WHERE list_id = $1 AND updated_at >= $2",
            )
            .id(list_id)
            .time(since),
        };
        let entries = self
            .all(&q, |row| {
                let idx = row.int("idx").map_err(Error::internal)?;
                let status = row.int("status").map_err(Error::internal)?;
                Ok((idx, u8::try_from(status).map_err(Error::internal)?))
            })
            .await?;
        Ok(Some(StatusListContent { size, entries }))
    }

    async fn status_lists_of(&self, tenant: TenantId, issuance: IssuanceId) -> Result<Vec<Uuid>> {
        self.all(
            &Sql::new(
                "SELECT DISTINCT list_id FROM status_entries \
                 WHERE tenant_id = $1 AND issuance_id = $2",
            )
            .id(tenant.0)
            .id(issuance.0),
            |row| row.uuid("list_id").map_err(Error::internal),
        )
        .await
    }
}
