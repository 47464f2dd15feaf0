//! The issuer service: a multi-tenant credential issuer with a gRPC API and a REST shim on one
//! port. `run` is what both `main` and the tests call.

use std::{future::Future, sync::Arc};

use axum::Router;
use tokio::net::TcpListener;

pub mod admin;
pub mod app;
pub mod cli;
pub mod config;
pub mod files;
pub mod grant;
pub mod grpc;
pub mod html;
pub mod import;
pub mod limits;
pub mod mail;
pub mod metrics;
pub mod qr;
pub mod rest;
pub mod retention;
pub mod server;
pub mod status_lists;
pub mod telemetry;
#[cfg(test)]
mod test_support;
pub mod view;
pub mod watch;
pub mod webhooks;
pub mod wire;

pub use app::App;
pub use config::Settings;

/// Builds the app from settings and serves it on `listener` until `shutdown` resolves.
/// On the first start of an empty embedded database it creates a bootstrap tenant and client
/// and writes their credentials to `bootstrap-credentials.env` in the data dir.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = App::build(settings).await?;
    if app.settings.is_embedded()
        && let Some(creds) = admin::bootstrap_if_empty(&app)
            .await
            .map_err(|e| anyhow::anyhow!(e.chain()))?
    {
        write_bootstrap(&creds, &app.settings)?;
    }
    serve(Arc::new(app), listener, shutdown).await
}

/// How long requests under way may take to finish once shutdown begins; below the chart's
/// termination grace period, which also covers the workers' drain.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// Serves an already built app.
pub async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let sweeper = tokio::spawn(sweep(app.clone()));
    let upkeep = tokio::spawn(metrics::upkeep());
    let (stop_workers, workers_stopped) = tokio::sync::watch::channel(false);
    let mut dispatcher = tokio::spawn(
        app.dispatcher
            .clone()
            .run(app.hub.subscribe(), workers_stopped.clone()),
    );
    let retention = tokio::spawn(
        retention::Retention::new(
            Arc::new(app.store.clone()),
            app.clock.clone(),
            std::time::Duration::from_secs(app.settings.retention_secs),
        )
        .run(
            std::time::Duration::from_secs(app.settings.retention_interval_secs),
            workers_stopped.clone(),
        ),
    );
    let mut mailer = tokio::spawn(app.mailer.clone().run(app.hub.subscribe(), workers_stopped));
    // Attempts under way get their own timeout and a margin to record the result.
    let drain = std::time::Duration::from_millis(
        app.settings
            .webhook_timeout_ms
            .max(app.settings.email_timeout_ms),
    ) + std::time::Duration::from_secs(2);
    let (health, health_service) = tonic_health::server::health_reporter();
    let readiness = tokio::spawn(follow_readiness(app.clone(), health.clone()));
    // On the signal: readiness and gRPC health say not serving, watch streams end, the
    // listener stops accepting, and requests under way finish, within SHUTDOWN_GRACE.
    let stopping = {
        let (app, health) = (app.clone(), health.clone());
        async move {
            shutdown.await;
            app.begin_shutdown();
            for name in ["", "issuer.v1.IssuanceService"] {
                health
                    .set_service_status(name, tonic_health::ServingStatus::NotServing)
                    .await;
            }
        }
    };
    let mut stopped = app.stopping.subscribe();
    let metrics_server = serve_metrics(&app).await?;
    let connection_limits = server::ConnectionLimits {
        header_read: std::time::Duration::from_millis(app.settings.http_header_timeout_ms),
        idle: std::time::Duration::from_secs(app.settings.http_idle_timeout_secs),
        max_connections: app.settings.http_max_connections,
    };
    let router = router(app, health_service)?;
    tracing::info!(addr = %listener.local_addr()?, "serving REST and gRPC");
    let server = server::serve(listener, router, connection_limits, stopping);
    tokio::select! {
        () = server => {}
        _ = async {
            let _ = stopped.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("requests still under way after the shutdown grace period; closing them");
        }
    }
    sweeper.abort();
    upkeep.abort();
    retention.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    readiness.abort();
    let _ = stop_workers.send(true);
    let drained = tokio::time::timeout(drain, async {
        let _ = (&mut dispatcher).await;
        let _ = (&mut mailer).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "webhook or email attempts still under way at shutdown; their leases will expire"
        );
        dispatcher.abort();
        mailer.abort();
    }
    Ok(())
}

/// Expires overdue pending issuances on time, whether or not anyone reads them. Runs on every
/// replica; the store's conditional transition keeps them from doing anything twice.
async fn sweep(app: Arc<App>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(
        app.settings.sweep_interval_ms,
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // A full batch means more are due: go again without waiting.
        loop {
            match app.issuances.expire_overdue(SWEEP_BATCH).await {
                Ok(n) if n as u32 == SWEEP_BATCH => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e.chain(), "expiry sweep failed; retrying on the next tick");
                    break;
                }
            }
        }
    }
}

const SWEEP_BATCH: u32 = 500;

/// REST and gRPC (`issuer.v1.IssuanceService`, `grpc.health.v1.Health`, server reflection v1
/// and v1alpha, h2c and gRPC-web) on one router.
pub fn router<H>(app: Arc<App>, health: H) -> anyhow::Result<Router>
where
    H: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    // One limit for every call, checked before anything is decoded or authenticated: a batch
    // over gRPC fits in it too (larger loads are for the streaming import).
    let limit = app.settings.max_body_bytes;
    let issuances = grpc::pb::issuance_service_server::IssuanceServiceServer::new(
        grpc::IssuanceGrpc::new(app.clone()),
    )
    .max_decoding_message_size(limit);
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(grpc::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let grpc = tonic::service::Routes::new(issuances)
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?)
        .into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new());
    let (limited, timed) = (app.clone(), app.clone());
    Ok(rest::router(app)
        .merge(grpc)
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            timed,
            server::request_timeout,
        ))
        // Inside the metrics, so that refusals are counted and timed like any answer.
        .layer(axum::middleware::from_fn_with_state(
            limited,
            server::enforce_limits,
        ))
        // After routing, so that REST requests are labelled with their route template.
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(axum::middleware::from_fn(server::track_activity)))
}

/// Any other path: `UNIMPLEMENTED` for a gRPC call, else a 404 problem.
async fn not_found(req: axum::extract::Request) -> axum::response::Response {
    use axum::response::IntoResponse;
    let grpc = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        tonic::Status::unimplemented("no such method").into_http()
    } else {
        rest::ApiError(issuer_domain::Error::not_found("resource")).into_response()
    }
}

/// Serves `/metrics` on `ISSUER_METRICS_ADDR`, apart from the public port: the series show
/// every tenant's activity, which is for the operator's scraper only.
async fn serve_metrics(app: &Arc<App>) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if app.settings.metrics_addr.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(&app.settings.metrics_addr)
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot listen for metrics on {} (ISSUER_METRICS_ADDR): {e}",
                app.settings.metrics_addr
            )
        })?;
    let addr = listener.local_addr()?;
    let _ = app.metrics_addr.set(addr);
    tracing::info!(%addr, "serving metrics");
    let (store, clock) = (app.store.clone(), app.clock.clone());
    let router = Router::new().route(
        "/metrics",
        axum::routing::get(move || metrics::scrape(store.clone(), clock.clone())),
    );
    Ok(Some(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the metrics listener failed");
        }
    })))
}

/// gRPC health follows readiness: `SERVING` while the database answers (Redis loss only
/// degrades, see DESIGN §5), for the server as a whole and for `issuer.v1.IssuanceService`.
async fn follow_readiness(app: Arc<App>, health: tonic_health::server::HealthReporter) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let status =
            match tokio::time::timeout(std::time::Duration::from_secs(2), app.store.ping()).await {
                Ok(Ok(())) if !app.is_stopping() => tonic_health::ServingStatus::Serving,
                _ => tonic_health::ServingStatus::NotServing,
            };
        for name in ["", "issuer.v1.IssuanceService"] {
            health.set_service_status(name, status).await;
        }
    }
}

/// The bootstrap client's credentials go to `bootstrap-credentials.env` in the data dir (0600),
/// and to the terminal when there is one. Never to the log: a container's stdout ends up in a
/// log store, so without a terminal only the file's path is logged.
fn write_bootstrap(creds: &admin::ClientCredentials, settings: &Settings) -> anyhow::Result<()> {
    use std::io::{IsTerminal, Write};
    let exports = format!(
        "export ISSUER_URL={}\n\
         export ISSUER_TENANT_ID={}\n\
         export ISSUER_CLIENT_ID={}\n\
         export ISSUER_CLIENT_SECRET={}\n",
        settings.public_url, creds.tenant_id, creds.client_id, creds.client_secret
    );
    let path = settings.data_dir.join("bootstrap-credentials.env");
    files::private_file(&path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)?;
    file.write_all(exports.as_bytes())?;
    if std::io::stdout().is_terminal() {
        println!(
            "\nissuer: first start - created tenant \"default\" and an API client with every scope.\n\
             Its credentials, also in {}:\n\n{exports}",
            path.display()
        );
    } else {
        tracing::info!(
            path = %path.display(),
            "first start: created tenant \"default\" and an API client with every scope; its credentials are in the file"
        );
    }
    Ok(())
}
