//! The public listener: connections accepted under a cap, with the timeouts an exposed server
//! needs (DESIGN §14), for REST (HTTP/1.1) and gRPC (h2c) alike.
//!
//! - **Header read**: a connection must deliver a complete request head within
//!   `ISSUER_HTTP_HEADER_TIMEOUT_MS` of starting one, and an HTTP/1.1 keep-alive connection
//!   must start its next request within as long (hyper re-arms the same timer after each
//!   response); otherwise it is closed. Slowloris clients hold a connection for that long only.
//! - **Idle**: a connection with no request in flight for `ISSUER_HTTP_IDLE_TIMEOUT_SECS` is
//!   closed gracefully (HTTP/2 `GOAWAY`). This also covers HTTP/2 connections, and clients that
//!   connect and send nothing at all. A streaming response (SSE, `WatchIssuance`) counts as in
//!   flight until its body ends.
//! - **Connections**: at most `ISSUER_HTTP_MAX_CONNECTIONS` at once; past that the listener
//!   stops accepting, so further clients wait in the kernel's backlog instead of being reset.
//! - **Shutdown**: on the signal the listener closes, every connection is asked to finish
//!   (HTTP/1.1 closes after its current response, HTTP/2 sends `GOAWAY`), and this returns
//!   once all have.
//!
//! The request timeout of unary calls is [`request_timeout`], a middleware.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tower::{Layer, Service};

use crate::app::App;

/// The limits of the public listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read: Duration,
    pub idle: Duration,
    pub max_connections: u32,
}

/// What the idle check of one connection sees: requests in flight (streaming bodies
/// included) and whether anything happened since it last looked.
#[derive(Clone, Default)]
struct Activity(Arc<(AtomicUsize, AtomicBool)>);

/// Holds its connection busy while alive.
struct InFlight(Activity);

impl InFlight {
    fn new(activity: Activity) -> Self {
        activity.0.0.fetch_add(1, Relaxed);
        activity.0.1.store(true, Relaxed);
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.0.0.fetch_sub(1, Relaxed);
        self.0.0.1.store(true, Relaxed);
    }
}

/// A response body that keeps its connection busy until it ends.
struct Tracked {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Marks the request's connection busy until its response body ends. The outermost layer.
pub async fn track_activity(req: Request, next: Next) -> Response {
    let Some(activity) = req.extensions().get::<Activity>().cloned() else {
        return next.run(req).await;
    };
    let in_flight = InFlight::new(activity);
    next.run(req).await.map(|body| {
        Body::new(Tracked {
            body,
            _in_flight: in_flight,
        })
    })
}

/// Serves `router` on `listener` until `shutdown` resolves and every connection has finished.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Finds peers that vanished without closing; idle ones are closed below.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    let max = limits.max_connections.max(1);
    let permits = Arc::new(Semaphore::new(max as usize));
    let (stop_tx, stop_rx) = watch::channel(());
    let mut make = router.into_make_service_with_connect_info::<SocketAddr>();
    tokio::pin!(shutdown);
    let mut warned_full = false;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if !warned_full {
                    tracing::warn!(max, "connection cap reached; new connections wait");
                    warned_full = true;
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => p.expect("the semaphore stays open"),
                    () = &mut shutdown => break,
                }
            }
        };
        let (tcp, addr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        warned_full = false;
        // gRPC writes headers, data and trailers separately: without TCP_NODELAY, Nagle's
        // algorithm and delayed ACKs hold each response for ~40 ms.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let activity = Activity::default();
        let Ok(svc) = make.call(addr).await;
        let svc = TowerToHyperService::new(axum::Extension(activity.clone()).layer(svc));
        let (builder, mut stop, idle) = (builder.clone(), stop_rx.clone(), limits.idle);
        tokio::spawn(async move {
            let _permit = permit;
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
            tokio::pin!(conn);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
            let mut closing = false;
            loop {
                tokio::select! {
                    done = conn.as_mut() => {
                        if let Err(e) = done {
                            tracing::debug!(error = %e, %addr, "connection ended with an error");
                        }
                        break;
                    }
                    _ = stop.changed(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = tick.tick(), if !closing => {
                        let (in_flight, touched) = (&activity.0.0, &activity.0.1);
                        if in_flight.load(Relaxed) == 0 && !touched.swap(false, Relaxed) {
                            tracing::debug!(%addr, "closing an idle connection");
                            closing = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(());
    // Every connection task holds a permit until it ends.
    let _ = permits.acquire_many(max).await;
}

/// Bounds a unary call: past `ISSUER_REQUEST_TIMEOUT_MS` the caller gets 503 `unavailable`
/// (gRPC `DEADLINE_EXCEEDED`) and the work is dropped. Streams (SSE, `WatchIssuance`) are
/// bounded by their own rules instead.
pub async fn request_timeout(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let streaming = path == "/issuer.v1.IssuanceService/WatchIssuance"
        || (path.ends_with("/events")
            && req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/event-stream")));
    if streaming {
        return next.run(req).await;
    }
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let limit = Duration::from_millis(app.settings.request_timeout_ms);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(res) => res,
        Err(_) => {
            tracing::warn!(
                timeout_ms = app.settings.request_timeout_ms,
                "request timed out"
            );
            let message = format!(
                "the request took longer than {} ms and was abandoned",
                app.settings.request_timeout_ms
            );
            if grpc {
                tonic::Status::deadline_exceeded(message).into_http()
            } else {
                crate::rest::ApiError(issuer_domain::Error::new(
                    issuer_domain::ErrorCode::Unavailable,
                    message,
                ))
                .into_response()
            }
        }
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// Whether a refusal on `path` takes the OAuth error format (token, nonce, credential and
/// notification endpoints) rather than problem+json.
fn oauth_format(path: &str) -> bool {
    path == "/issuer/oauth/token"
        || (path.starts_with("/issuer/oid4vci/") && !path.contains("/credential-offer/"))
}

/// Spends the request's budget (see `limits.rs`) before it reaches its handler; a refusal
/// answers in the transport's own format.
pub async fn enforce_limits(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let Some(class) = crate::limits::Class::of(path) else {
        return next.run(req).await;
    };
    let grpc = is_grpc(req.headers());
    let oauth = oauth_format(path);
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let limits = &app.limits;
    let caller = (class == crate::limits::Class::Management)
        .then(|| {
            let value = req
                .headers()
                .get(http::header::AUTHORIZATION)?
                .to_str()
                .ok()?;
            let token = crate::wire::bearer_token(value)?;
            app.tokens.verify(token).ok()
        })
        .flatten();
    if let Some(who) = &caller {
        // The handler takes the caller from here instead of verifying the token again.
        req.extensions_mut()
            .insert(crate::wire::Verified(who.clone()));
    }
    let verdict = match &caller {
        Some(who) => {
            limits
                .client(&app.issuances, &who.client_id, Some(who.tenant_id))
                .await
        }
        None => limits.address(limits.client_ip(req.headers(), peer)).await,
    };
    let Some(verdict) = verdict else {
        return next.run(req).await;
    };
    if !verdict.allowed() {
        crate::limits::refused(class);
        return if grpc {
            crate::grpc::rate_limited(&verdict)
        } else if oauth {
            crate::rest::oauth_rate_limited(&verdict)
        } else {
            crate::rest::rate_limited(&verdict)
        };
    }
    let mut res = next.run(req).await;
    if caller.is_some() && !grpc {
        verdict.write_headers(res.headers_mut());
    }
    res
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn refusals_take_the_oauth_format_on_the_oauth_and_oid4vci_endpoints() {
        assert!(oauth_format("/issuer/oauth/token"));
        assert!(oauth_format("/issuer/oid4vci/v1/credential"));
        assert!(!oauth_format("/issuer/oid4vci/v1/credential-offer/x"));
        assert!(!oauth_format("/issuer/offer/x"));
    }
}
