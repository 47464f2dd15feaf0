//! Prometheus metrics, served at `GET /metrics` in the text exposition format on their own
//! listener (`ISSUER_METRICS_ADDR`), never on the public port.
//!
//! Series (all prefixed `issuer_`):
//! - `http_requests_total` and `http_request_duration_seconds` (histogram), labelled `protocol`
//!   (`rest` or `grpc`), `method` (a standard HTTP method, or the gRPC method name; anything
//!   else is `other`), `route` (the matched route template, never a raw path with ids;
//!   unmatched paths are `other`) and `status` (HTTP status, or the gRPC code);
//! - `issuances_created_total{transport}`, `idempotent_replays_total{transport}`;
//! - `token_grants_total{grant_type, outcome}`;
//! - `webhook_attempts_total{outcome}`, `email_attempts_total{outcome}`;
//! - `issuance_status_changes_total{status, reason}` (counted by the metered store as they commit);
//! - `idempotency_locks_total{outcome}`, `idempotency_lock_wait_seconds{outcome}`;
//! - at scrape time: `outbox_pending{outbox}`, `outbox_overdue_seconds{outbox}` (how long the
//!   earliest due item has been waiting), `db_pool_connections{state}`,
//!   `db_pool_max_connections`.
//!
//! Labels never carry ids, payload values or addresses, so their number stays bounded.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use issuer_domain::ports::{Clock, IdempotencyLock, LockAttempt, LockError, LockToken, Store};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::Instrument;

/// Latency buckets, in seconds: from a cached read to a slow SMTP or webhook attempt.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The gRPC methods served; any other path is counted as `other`.
const GRPC_METHODS: [&str; 10] = [
    "CreateIssuance",
    "BatchCreateIssuances",
    "ImportIssuances",
    "GetIssuance",
    "ListIssuances",
    "CancelIssuance",
    "RevokeCredential",
    "SuspendCredential",
    "ReinstateCredential",
    "WatchIssuance",
];
const GRPC_SERVICE: &str = "/issuer.v1.IssuanceService/";

/// The label value of whatever is not one of the known methods or routes: labels come from a
/// fixed set, so anonymous requests cannot add series.
const OTHER: &str = "other";

/// The request method as a label: the standard ones by name, anything else `other`.
fn http_method(method: &http::Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => OTHER,
    }
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder, installed on first use. One per process: every app in it (tests
/// start several) reports into the same registry.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &BUCKETS)
            .expect("the buckets are not empty");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics stays empty");
        }
        handle
    })
}

/// `GET /metrics`. Store gauges (outbox backlogs, pool) are read at scrape time.
pub async fn scrape(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> impl IntoResponse {
    let recorder = handle();
    match store.gauges().await {
        Ok(g) => {
            let now = clock.now();
            let age = |due: Option<chrono::DateTime<chrono::Utc>>| {
                due.map_or(0.0, |d| (now - d).num_milliseconds().max(0) as f64 / 1000.0)
            };
            for (outbox, pending, oldest) in [
                ("webhooks", g.webhooks_pending, g.webhook_oldest_due),
                ("emails", g.emails_pending, g.email_oldest_due),
            ] {
                metrics::gauge!("issuer_outbox_pending", "outbox" => outbox).set(pending as f64);
                metrics::gauge!("issuer_outbox_overdue_seconds", "outbox" => outbox)
                    .set(age(oldest));
            }
            let in_use = g.pool_size.saturating_sub(g.pool_idle);
            metrics::gauge!("issuer_db_pool_connections", "state" => "in_use").set(in_use);
            metrics::gauge!("issuer_db_pool_connections", "state" => "idle").set(g.pool_idle);
            metrics::gauge!("issuer_db_pool_max_connections").set(g.pool_max);
        }
        Err(e) => tracing::warn!(error = %e.chain(), "store gauges unavailable for this scrape"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        recorder.render(),
    )
}

/// Counts and times idempotency-lock acquisitions around any lock.
pub struct MeteredLock(pub Arc<dyn IdempotencyLock>);

#[async_trait::async_trait]
impl IdempotencyLock for MeteredLock {
    async fn acquire_many(
        &self,
        keys: &[String],
        ttl: std::time::Duration,
    ) -> Result<Vec<LockAttempt>, LockError> {
        let attempts = self.0.acquire_many(keys, ttl).await;
        let (taken, busy) = match &attempts {
            Ok(attempts) => {
                let taken = attempts
                    .iter()
                    .filter(|a| matches!(a, LockAttempt::Acquired(_)))
                    .count();
                (taken, attempts.len() - taken)
            }
            Err(_) => {
                metrics::counter!("issuer_idempotency_locks_total", "outcome" => "unavailable")
                    .increment(keys.len() as u64);
                (0, 0)
            }
        };
        for (outcome, n) in [("acquired", taken), ("busy", busy)] {
            if n > 0 {
                metrics::counter!("issuer_idempotency_locks_total", "outcome" => outcome)
                    .increment(n as u64);
            }
        }
        attempts
    }

    async fn wait_released(
        &self,
        keys: &[String],
        wait: std::time::Duration,
    ) -> Result<bool, LockError> {
        let started = Instant::now();
        let released = self.0.wait_released(keys, wait).await;
        let outcome = match &released {
            Ok(true) => "released",
            Ok(false) => "still_held",
            Err(_) => "unavailable",
        };
        metrics::histogram!("issuer_idempotency_lock_wait_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        released
    }

    async fn release_many(&self, keys: &[String], token: &LockToken) -> Result<(), LockError> {
        self.0.release_many(keys, token).await
    }

    async fn ping(&self) -> Result<(), LockError> {
        self.0.ping().await
    }
}

/// Keeps histograms bounded in memory; run every few seconds.
pub async fn upkeep() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        tick.tick().await;
        handle().run_upkeep();
    }
}

/// Records every request's duration and outcome, REST and gRPC alike (both share the router),
/// inside a server span that continues the caller's trace (`traceparent` header or metadata).
pub async fn track(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let (protocol, method, route) = if grpc {
        let name = req
            .uri()
            .path()
            .strip_prefix(GRPC_SERVICE)
            .and_then(|m| GRPC_METHODS.iter().find(|known| **known == m))
            .map_or(OTHER, |m| *m);
        (
            "grpc",
            name.to_owned(),
            GRPC_SERVICE.trim_matches('/').to_owned(),
        )
    } else {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or(OTHER, MatchedPath::as_str)
            .to_owned();
        ("rest", http_method(req.method()).to_owned(), route)
    };
    let span = if matches!(route.as_str(), "/healthz" | "/readyz" | "/metrics")
        || req.uri().path().starts_with("/grpc.health.")
    {
        // Probes and scrapes every few seconds would bury the traces that matter.
        tracing::Span::none()
    } else if grpc {
        let path = req.uri().path();
        let name = if method != OTHER || path.starts_with("/grpc.") {
            path.trim_start_matches('/')
        } else {
            OTHER
        };
        tracing::info_span!(
            "rpc",
            otel.name = %name,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = %route,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        )
    } else {
        tracing::info_span!(
            "request",
            otel.name = %format!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = %method,
            http.route = %route,
            http.response.status_code = tracing::field::Empty,
        )
    };
    crate::telemetry::continue_trace(&span, req.headers());
    let res = next.run(req).instrument(span.clone()).await;
    let status = if grpc {
        // A failed call answers with its status in the headers (trailers-only); a successful
        // one sends it in the trailers, after the body: `0`.
        res.headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("0")
            .to_owned()
    } else {
        res.status().as_u16().to_string()
    };
    let labels = [
        ("protocol", protocol.to_owned()),
        ("method", method),
        ("route", route),
        ("status", status),
    ];
    let failed = if grpc {
        span.record("rpc.grpc.status_code", labels[3].1.as_str());
        // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
        matches!(labels[3].1.as_str(), "2" | "4" | "12" | "13" | "14" | "15")
    } else {
        span.record("http.response.status_code", res.status().as_u16());
        res.status().is_server_error()
    };
    if failed {
        span.record("otel.status_code", "ERROR");
    }
    metrics::counter!("issuer_http_requests_total", &labels).increment(1);
    metrics::histogram!("issuer_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    res
}

/// A create answered: new or replayed.
pub fn create(transport: &'static str, replayed: bool) {
    if replayed {
        metrics::counter!("issuer_idempotent_replays_total", "transport" => transport).increment(1);
    } else {
        metrics::counter!("issuer_issuances_created_total", "transport" => transport).increment(1);
    }
}

/// A token endpoint answer, by grant type (`client_credentials`, `pre-authorized_code`, or
/// `other`) and outcome (`issued` or the OAuth error code).
pub fn token_grant(grant_type: &str, outcome: &str) {
    let grant_type = match grant_type {
        "client_credentials" => "client_credentials",
        issuer_domain::model::PRE_AUTHORIZED_CODE_GRANT => "pre-authorized_code",
        _ => "other",
    };
    metrics::counter!(
        "issuer_token_grants_total",
        "grant_type" => grant_type,
        "outcome" => outcome.to_owned()
    )
    .increment(1);
}

/// One webhook attempt, by outcome (`delivered`, `retry`, `failed`).
pub fn webhook_attempt(outcome: &'static str) {
    metrics::counter!("issuer_webhook_attempts_total", "outcome" => outcome).increment(1);
}

/// One email attempt, by outcome (`sent`, `retry`, `failed`).
pub fn email_attempt(outcome: &'static str) {
    metrics::counter!("issuer_email_attempts_total", "outcome" => outcome).increment(1);
}
