//! Group commit for creates: inserts that arrive while earlier ones are still running are
//! written together, in one statement and one transaction.
//!
//! A create's cost in Postgres is dominated by its transaction (the commit's WAL flush, the
//! round trip, the backend's wake-up), not by its rows. Under load, requests queue here while at
//! most [`MAX_RUNNING`] statements run; each statement takes up to [`MAX_BATCH`] of them. An idle
//! service writes each create at once, alone, so batching adds no latency when there is nothing
//! to share a commit with. See `docs/adr/0008-create-throughput.md`.
//!
//! The statement writes what a single create writes: the issuance, its first event, its webhook
//! outbox rows and, for `delivery: email`, its email outbox row.
//!
//! Every caller still gets its own answer: inserted, or a duplicate of an existing request (the
//! unique constraint decides, as for a single insert). A statement that fails is retried row by
//! row, so that one bad row cannot fail its neighbours and each caller sees its own error.

use std::{
    collections::{HashSet, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    error::Result,
    model::{Issuance, IssuanceEvent},
};
use serde_json::Value;
use sqlx::{PgPool, Row, types::Json};
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::rows::{self, Backend, issuance_insert_columns, trunc_micros};

/// Statements in flight at once; further creates queue and share the next statement.
const MAX_RUNNING: usize = 4;
/// Creates written by one statement at most.
const MAX_BATCH: usize = 128;

/// One create: the issuance, its first event and the webhook it announces, if any.
pub(crate) struct NewIssuance {
    pub issuance: Issuance,
    pub event: IssuanceEvent,
    pub webhook: Option<(&'static str, String, Value)>,
    /// The caller's trace context, written with the webhook deliveries.
    pub traceparent: Option<String>,
}

impl NewIssuance {
    fn key(&self) -> (Uuid, &str) {
        (self.issuance.tenant_id.0, &self.issuance.client_request_id)
    }
}

struct Waiting {
    row: NewIssuance,
    /// `true` when this row was written, `false` when its key already existed.
    reply: oneshot::Sender<Result<bool>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    running: usize,
}

pub(crate) struct InsertBatcher {
    pool: PgPool,
    queue: Mutex<Queue>,
    statements: AtomicU64,
    creates: AtomicU64,
}

/// How creates were written so far: `creates` rows in `statements` statements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateWrites {
    pub statements: u64,
    pub creates: u64,
}

impl std::fmt::Debug for InsertBatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InsertBatcher").finish_non_exhaustive()
    }
}

impl InsertBatcher {
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            queue: Mutex::new(Queue::default()),
            statements: AtomicU64::new(0),
            creates: AtomicU64::new(0),
        })
    }

    pub fn writes(&self) -> CreateWrites {
        CreateWrites {
            statements: self.statements.load(Ordering::Relaxed),
            creates: self.creates.load(Ordering::Relaxed),
        }
    }

    /// Writes each row unless its (tenant, client_request_id) exists (`Ok(true)` when written),
    /// the rows of a batch queued together, so that they fill statements of their own (run side by side, up to [`MAX_RUNNING`]) and share
    /// them with concurrent single creates. One answer per row, in order.
    pub async fn insert_group(self: &Arc<Self>, rows: Vec<NewIssuance>) -> Vec<Result<bool>> {
        let answers = self.enqueue(rows);
        futures::future::join_all(answers.into_iter().map(answered)).await
    }

    /// Queues `rows` and starts the runners they need (one per statement's worth, within
    /// [`MAX_RUNNING`]).
    fn enqueue(self: &Arc<Self>, rows: Vec<NewIssuance>) -> Vec<oneshot::Receiver<Result<bool>>> {
        let wanted = rows.len().div_ceil(MAX_BATCH).max(1);
        let mut answers = Vec::with_capacity(rows.len());
        let start = {
            let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            for row in rows {
                let (reply, answer) = oneshot::channel();
                queue.waiting.push_back(Waiting { row, reply });
                answers.push(answer);
            }
            let start = wanted.min(MAX_RUNNING.saturating_sub(queue.running));
            queue.running += start;
            start
        };
        for _ in 0..start {
            // A task of its own, so that a caller that goes away (a client hanging up) cannot
            // abandon the statement of the creates it carries.
            let me = self.clone();
            tokio::spawn(async move { me.run().await });
        }
        answers
    }

    /// Writes queued creates until none are left.
    async fn run(&self) {
        loop {
            let batch: Vec<Waiting> = {
                let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.waiting.is_empty() {
                    queue.running -= 1;
                    return;
                }
                let n = queue.waiting.len().min(MAX_BATCH);
                queue.waiting.drain(..n).collect()
            };
            self.write(batch).await;
        }
    }

    async fn write(&self, mut batch: Vec<Waiting>) {
        self.statements.fetch_add(1, Ordering::Relaxed);
        self.creates
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        if batch.len() == 1 {
            let Waiting { row, reply } = batch.remove(0);
            let _ = reply.send(insert_one(&self.pool, &row).await);
            return;
        }
        // One key order for every statement, so two statements never wait on each other's
        // keys in opposite orders (a deadlock).
        batch.sort_by(|a, b| a.row.key().cmp(&b.row.key()));
        // The same key twice in one batch: the first is written, the rest are its duplicates,
        // answered once the first has committed.
        let mut lead: Vec<Waiting> = Vec::with_capacity(batch.len());
        let mut repeats = Vec::new();
        for w in batch {
            if lead.last().is_some_and(|l| l.row.key() == w.row.key()) {
                repeats.push(w);
            } else {
                lead.push(w);
            }
        }
        match insert_many(&self.pool, &lead).await {
            Ok(written) => {
                for Waiting { row, reply } in lead {
                    let _ = reply.send(Ok(written.contains(&row.issuance.id.0)));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, rows = lead.len(), "batched insert failed; writing its rows one by one");
                for Waiting { row, reply } in lead {
                    let _ = reply.send(insert_one(&self.pool, &row).await);
                }
            }
        }
        for Waiting { reply, .. } in repeats {
            let _ = reply.send(Ok(false));
        }
    }
}

async fn answered(answer: oneshot::Receiver<Result<bool>>) -> Result<bool> {
    answer
        .await
        .map_err(|_| Error::unavailable("the insert was abandoned: the service is stopping"))?
}

fn db_error(e: sqlx::Error) -> Error {
    rows::db_error(Backend::Postgres, e)
}

/// The webhook columns of a create that announces none: no endpoint matches an empty type.
fn webhook_parts(row: &NewIssuance) -> (&'static str, String, Json<Value>) {
    match &row.webhook {
        Some((kind, id, payload)) => (kind, id.clone(), Json(payload.clone())),
        None => ("", String::new(), Json(Value::Null)),
    }
}

/// One create in one statement, so one round trip and atomic without BEGIN/COMMIT: the event
/// insert reads the issuance CTE's RETURNING rows, so it writes nothing on a conflict. On a
/// conflict with an uncommitted insert, Postgres waits for that transaction and then does
/// nothing; no unique-violation error is raised.
async fn insert_one(pool: &PgPool, row: &NewIssuance) -> Result<bool> {
    let (issuance, event) = (&row.issuance, &row.event);
    let (wh_type, wh_id, wh_payload) = webhook_parts(row);
    let inserted = sqlx::query(concat!(
        "WITH i AS (INSERT INTO issuances (",
        issuance_insert_columns!(),
        ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $31) \
         ON CONFLICT (tenant_id, client_request_id) DO NOTHING \
         RETURNING tenant_id, id), e AS (INSERT INTO issuance_events \
         (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
         SELECT tenant_id, id, $22, $23, $24, $25, $26 FROM i), \
         d AS (INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, \
         sequence, event_type, message_id, payload, state, attempts, next_attempt_at, \
         traceparent, created_at, updated_at) \
         SELECT ep.tenant_id, gen_random_uuid(), ep.id, i.id, $22, $27, $28, $29, 'pending', \
         0, $26, $30, $26, $26 FROM i JOIN webhook_endpoints ep ON ep.tenant_id = i.tenant_id \
         WHERE ep.enabled AND $27 = ANY(string_to_array(ep.event_types, ' '))), \
         m AS (INSERT INTO email_deliveries (tenant_id, issuance_id, state, attempts, \
         next_attempt_at, created_at, updated_at) \
         SELECT tenant_id, id, 'pending', 0, $16, $16, $16 FROM i WHERE $9 = 'email') \
         SELECT id FROM i"
    ))
    .bind(issuance.tenant_id.0)
    .bind(issuance.id.0)
    .bind(&issuance.client_request_id)
    .bind(&issuance.request_fingerprint)
    .bind(&issuance.credential_configuration_id)
    .bind(issuance.status.as_str())
    .bind(issuance.reason.map(|r| r.as_str()))
    .bind(issuance.payload.as_ref().map(Json))
    .bind(issuance.delivery.as_str())
    .bind(&issuance.email)
    .bind(&issuance.grant_type)
    .bind(&issuance.offer_id)
    .bind(&issuance.pre_authorized_code_hash)
    .bind(&issuance.pre_authorized_code_sealed)
    .bind(trunc_micros(issuance.expires_at))
    .bind(trunc_micros(issuance.created_at))
    .bind(trunc_micros(issuance.updated_at))
    .bind(&issuance.tx_code_hash)
    .bind(issuance.tx_code_failures)
    .bind(issuance.code_redeemed_at.map(trunc_micros))
    .bind(&issuance.notification_id)
    .bind(event.sequence)
    .bind(event.kind.as_str())
    .bind(event.status.as_str())
    .bind(&event.reason)
    .bind(trunc_micros(event.occurred_at))
    .bind(wh_type)
    .bind(wh_id)
    .bind(wh_payload)
    .bind(&row.traceparent)
    .bind(issuance.batch_id)
    .fetch_optional(pool)
    .await
    .map_err(db_error)?;
    Ok(inserted.is_some())
}

/// Column arrays for `unnest`, one element per create.
#[derive(Default)]
struct Columns<'a> {
    tenant_id: Vec<Uuid>,
    id: Vec<Uuid>,
    client_request_id: Vec<&'a str>,
    request_fingerprint: Vec<&'a str>,
    credential_configuration_id: Vec<&'a str>,
    status: Vec<&'static str>,
    reason: Vec<Option<&'a str>>,
    payload: Vec<Option<Json<&'a Value>>>,
    delivery: Vec<&'static str>,
    email: Vec<Option<&'a str>>,
    grant_type: Vec<&'a str>,
    offer_id: Vec<&'a str>,
    code_hash: Vec<&'a str>,
    code_sealed: Vec<&'a str>,
    expires_at: Vec<DateTime<Utc>>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    tx_code_hash: Vec<Option<&'a str>>,
    tx_code_failures: Vec<i64>,
    code_redeemed_at: Vec<Option<DateTime<Utc>>>,
    notification_id: Vec<Option<&'a str>>,
    batch_id: Vec<Option<Uuid>>,
    ev_sequence: Vec<i64>,
    ev_kind: Vec<&'a str>,
    ev_status: Vec<&'static str>,
    ev_reason: Vec<Option<&'a str>>,
    ev_occurred_at: Vec<DateTime<Utc>>,
    wh_type: Vec<&'static str>,
    wh_message_id: Vec<String>,
    wh_payload: Vec<Json<Value>>,
    wh_traceparent: Vec<Option<&'a str>>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, row: &'a NewIssuance) {
        let (i, e) = (&row.issuance, &row.event);
        self.tenant_id.push(i.tenant_id.0);
        self.id.push(i.id.0);
        self.client_request_id.push(&i.client_request_id);
        self.request_fingerprint.push(&i.request_fingerprint);
        self.credential_configuration_id
            .push(&i.credential_configuration_id);
        self.status.push(i.status.as_str());
        self.reason.push(i.reason.map(|r| r.as_str()));
        self.payload.push(i.payload.as_ref().map(Json));
        self.delivery.push(i.delivery.as_str());
        self.email.push(i.email.as_deref());
        self.grant_type.push(&i.grant_type);
        self.offer_id.push(&i.offer_id);
        self.code_hash.push(&i.pre_authorized_code_hash);
        self.code_sealed.push(&i.pre_authorized_code_sealed);
        self.expires_at.push(trunc_micros(i.expires_at));
        self.created_at.push(trunc_micros(i.created_at));
        self.updated_at.push(trunc_micros(i.updated_at));
        self.tx_code_hash.push(i.tx_code_hash.as_deref());
        self.tx_code_failures.push(i.tx_code_failures);
        self.code_redeemed_at
            .push(i.code_redeemed_at.map(trunc_micros));
        self.notification_id.push(i.notification_id.as_deref());
        self.batch_id.push(i.batch_id);
        self.ev_sequence.push(e.sequence);
        self.ev_kind.push(e.kind.as_str());
        self.ev_status.push(e.status.as_str());
        self.ev_reason.push(e.reason.as_deref());
        self.ev_occurred_at.push(trunc_micros(e.occurred_at));
        let (wh_type, wh_id, wh_payload) = webhook_parts(row);
        self.wh_type.push(wh_type);
        self.wh_message_id.push(wh_id);
        self.wh_payload.push(wh_payload);
        self.wh_traceparent.push(row.traceparent.as_deref());
    }
}

/// Several creates (distinct keys, in key order) in one statement; returns the ids written.
async fn insert_many(pool: &PgPool, rows: &[Waiting]) -> Result<HashSet<Uuid>> {
    let mut c = Columns::default();
    for w in rows {
        c.push(&w.row);
    }
    let written = sqlx::query(concat!(
        "WITH v AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], \
         $5::text[], $6::text[], $7::text[], $8::jsonb[], $9::text[], $10::text[], $11::text[], \
         $12::text[], $13::text[], $14::text[], $15::timestamptz[], $16::timestamptz[], \
         $17::timestamptz[], $18::text[], $19::int8[], $20::timestamptz[], $21::text[], \
         $31::uuid[], $22::int8[], $23::text[], $24::text[], $25::text[], $26::timestamptz[], $27::text[], \
         $28::text[], $29::jsonb[], $30::text[]) WITH ORDINALITY AS v(",
        issuance_insert_columns!(),
        ", ev_sequence, ev_kind, ev_status, ev_reason, ev_occurred_at, \
         wh_type, wh_message_id, wh_payload, wh_traceparent, n)), \
         i AS (INSERT INTO issuances (",
        issuance_insert_columns!(),
        ") SELECT ",
        issuance_insert_columns!(),
        " FROM v ORDER BY n \
         ON CONFLICT (tenant_id, client_request_id) DO NOTHING \
         RETURNING tenant_id, id), \
         e AS (INSERT INTO issuance_events \
         (tenant_id, issuance_id, sequence, kind, status, reason, occurred_at) \
         SELECT v.tenant_id, v.id, v.ev_sequence, v.ev_kind, v.ev_status, v.ev_reason, \
         v.ev_occurred_at FROM v JOIN i ON i.tenant_id = v.tenant_id AND i.id = v.id \
         ORDER BY v.n), \
         d AS (INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, \
         sequence, event_type, message_id, payload, state, attempts, next_attempt_at, \
         traceparent, created_at, updated_at) \
         SELECT ep.tenant_id, gen_random_uuid(), ep.id, v.id, v.ev_sequence, v.wh_type, \
         v.wh_message_id, v.wh_payload, 'pending', 0, v.ev_occurred_at, v.wh_traceparent, \
         v.ev_occurred_at, v.ev_occurred_at FROM v JOIN i ON i.tenant_id = v.tenant_id AND i.id = v.id \
         JOIN webhook_endpoints ep ON ep.tenant_id = v.tenant_id \
         WHERE ep.enabled AND v.wh_type = ANY(string_to_array(ep.event_types, ' '))), \
         m AS (INSERT INTO email_deliveries (tenant_id, issuance_id, state, attempts, \
         next_attempt_at, created_at, updated_at) \
         SELECT v.tenant_id, v.id, 'pending', 0, v.created_at, v.created_at, v.created_at \
         FROM v JOIN i ON i.tenant_id = v.tenant_id AND i.id = v.id WHERE v.delivery = 'email') \
         SELECT id FROM i"
    ))
    .bind(&c.tenant_id)
    .bind(&c.id)
    .bind(&c.client_request_id)
    .bind(&c.request_fingerprint)
    .bind(&c.credential_configuration_id)
    .bind(&c.status)
    .bind(&c.reason)
    .bind(&c.payload)
    .bind(&c.delivery)
    .bind(&c.email)
    .bind(&c.grant_type)
    .bind(&c.offer_id)
    .bind(&c.code_hash)
    .bind(&c.code_sealed)
    .bind(&c.expires_at)
    .bind(&c.created_at)
    .bind(&c.updated_at)
    .bind(&c.tx_code_hash)
    .bind(&c.tx_code_failures)
    .bind(&c.code_redeemed_at)
    .bind(&c.notification_id)
    .bind(&c.ev_sequence)
    .bind(&c.ev_kind)
    .bind(&c.ev_status)
    .bind(&c.ev_reason)
    .bind(&c.ev_occurred_at)
    .bind(&c.wh_type)
    .bind(&c.wh_message_id)
    .bind(&c.wh_payload)
    .bind(&c.wh_traceparent)
    .bind(&c.batch_id)
    .fetch_all(pool)
    .await
    .map_err(db_error)?;
    written
        .iter()
        .map(|r| r.try_get::<Uuid, _>("id").map_err(db_error))
        .collect()
}
