//! Wiring: turns `Settings` into connected stores, locks, keys and the use-case services that
//! both the REST shim and the gRPC service call.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context;
use issuer_auth::{AesSealer, SecretHasher, ServerSecret, SigningKey, TokenService};
use issuer_coordination::{
    InProcessLock, RedisLock,
    events::EventHub,
    ratelimit::{LocalLimiter, RateLimiter, RedisLimiter},
};
use issuer_domain::{
    catalog::Catalog,
    lifecycle::Lifecycle,
    ports::{Clock, CodeSealer, IdempotencyLock, Store, SystemClock},
    service::{IdempotencySettings, IssuancePorts, IssuanceService},
};
use issuer_oid4vci::{WalletService, WalletSettings};
use issuer_store::{Metered, SqlStore};

use crate::{
    config::Settings,
    files::{private_dir, private_file},
    watch::WatchTiming,
};

/// Everything a request handler needs, shared by REST and gRPC.
pub struct App {
    pub settings: Settings,
    pub store: Arc<dyn Store>,
    pub lock: Arc<dyn IdempotencyLock>,
    pub tokens: Arc<TokenService>,
    pub wallet: WalletService,
    /// Public keys that verify issued credentials: the current signing key first.
    pub credential_jwks: serde_json::Value,
    pub hasher: SecretHasher,
    pub clock: Arc<dyn Clock>,
    pub issuances: Arc<IssuanceService>,
    /// Plans and applies changes of issuances (the workers' way to change one).
    pub lifecycle: Lifecycle,
    /// Announces new events to watchers on every replica.
    pub hub: Arc<EventHub>,
    pub sealer: Arc<dyn CodeSealer>,
    /// Tenants' webhook endpoints.
    pub webhooks: crate::webhooks::WebhookEndpoints,
    /// Delivers the webhook outbox.
    pub dispatcher: Arc<crate::webhooks::Dispatcher>,
    /// Wakes this replica's webhook dispatcher (manual retries, finished attempts).
    pub dispatch_wake: tokio::sync::broadcast::Sender<()>,
    /// Opens `WatchIssuance` and SSE streams.
    pub watches: crate::watch::Watches,
    /// The status lists verifiers fetch, cached per change.
    pub status_lists: Arc<crate::status_lists::StatusLists>,
    /// Sends offer emails (SMTP, or `.eml` files without it).
    pub mailer: Arc<crate::mail::MailWorker>,
    /// Turns true when shutdown begins: readiness fails, watch streams end.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Request budgets per API client and per client address.
    pub limits: Arc<crate::limits::Limits>,
    /// The client-credentials grant of the token endpoint.
    pub client_credentials: crate::grant::ClientCredentials,
    /// Where `/metrics` is served, once [`crate::serve`] has bound it.
    pub metrics_addr: std::sync::OnceLock<std::net::SocketAddr>,
}

impl App {
    /// Starts shutting down: readiness and gRPC health report not serving, and open watch
    /// streams end so that their connections can close.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Connects to the configured stores (migrating them when `migrate_on_start`) and loads
    /// or, in the embedded default, creates the keys.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = connect_store(&settings, settings.migrate_on_start).await?;
        Self::with_store(settings, store).await
    }

    pub async fn with_store(settings: Settings, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let (lock, limiter): (Arc<dyn IdempotencyLock>, Arc<dyn RateLimiter>) =
            match &settings.redis_url {
                Some(url) => {
                    let redis = RedisLock::connect(url.expose()).context("ISSUER_REDIS_URL")?;
                    let limiter = RedisLimiter::new(redis.connection(), "issuer:rl:");
                    (Arc::new(redis), Arc::new(limiter))
                }
                None => (
                    Arc::new(InProcessLock::new()),
                    Arc::new(LocalLimiter::new()),
                ),
            };
        let limits = Arc::new(crate::limits::Limits::new(&settings, limiter.clone()));
        let lock: Arc<dyn IdempotencyLock> = Arc::new(crate::metrics::MeteredLock(lock));
        let secret = server_secret(&settings)?;
        let signing = token_signing_key(&settings)?;
        let issuer = format!("{}/issuer", settings.public_url);
        let tokens = Arc::new(TokenService::new(
            &issuer,
            &format!("{issuer}/api"),
            settings.token_ttl_secs,
            &signing,
            &[],
        ));
        let (credential_key, previous_credential_keys) = credential_keys(&settings)?;
        let credential_jwks = serde_json::json!({
            "keys": std::iter::once(&credential_key)
                .chain(&previous_credential_keys)
                .map(SigningKey::public_jwk)
                .collect::<Vec<_>>()
        });
        let catalog = match &settings.catalog_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                Catalog::from_json(&text).map_err(anyhow::Error::msg)?
            }
            None => Catalog::builtin(),
        };
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let hub = match &settings.redis_url {
            Some(url) => EventHub::with_redis(url.expose()).context("ISSUER_REDIS_URL")?,
            None => EventHub::local(),
        };
        let watch_timing = WatchTiming {
            heartbeat: Duration::from_secs(settings.watch_heartbeat_secs),
            resync: Duration::from_secs(settings.watch_resync_secs),
        };
        let sealer: Arc<dyn CodeSealer> = Arc::new(AesSealer::new(&secret));
        let catalog = Arc::new(catalog);
        let status_lists = crate::status_lists::StatusLists::new(
            store.clone(),
            credential_key.clone(),
            &issuer,
            Duration::from_secs(settings.status_list_ttl_secs),
            hub.clone(),
        );
        // Whatever changes credential status tells this replica's lists directly.
        let announcer: Arc<dyn issuer_domain::ports::EventNotifier> =
            Arc::new(crate::status_lists::Announcer {
                hub: hub.clone(),
                lists: status_lists.clone(),
            });
        let wallet = WalletService::new(
            store.clone(),
            clock.clone(),
            sealer.clone(),
            tokens.clone(),
            credential_key,
            catalog.clone(),
            &issuer,
            secret.derive("issuer/nonce/v1"),
            WalletSettings {
                tx_code_max_attempts: settings.tx_code_max_attempts,
                credential_ttl: chrono::Duration::days(settings.credential_ttl_days),
                batch_size: settings.batch_credential_size,
                status_list_size: settings.status_list_size,
                ..WalletSettings::default()
            },
            hub.clone(),
        );
        let policy = issuer_webhooks::NetworkPolicy::parse(&settings.webhook_allow_networks)
            .map_err(|e| anyhow::anyhow!("ISSUER_WEBHOOK_ALLOW_NETWORKS: {e}"))?;
        let webhook_sender = issuer_webhooks::Sender::try_new(
            policy.clone(),
            Duration::from_millis(settings.webhook_timeout_ms),
        )?;
        let webhook_schedule = match &settings.webhook_retry_schedule {
            Some(s) => issuer_webhooks::RetrySchedule::parse(s)
                .map_err(|e| anyhow::anyhow!("ISSUER_WEBHOOK_RETRY_SCHEDULE: {e}"))?,
            None => issuer_webhooks::RetrySchedule::default(),
        };
        let dispatch_wake = tokio::sync::broadcast::channel(1024).0;
        let webhooks = crate::webhooks::WebhookEndpoints {
            store: store.clone(),
            sealer: sealer.clone(),
            clock: clock.clone(),
            policy: Arc::new(policy),
            wake: dispatch_wake.clone(),
        };
        let dispatcher = Arc::new(crate::webhooks::Dispatcher {
            outbox: Arc::new(store.clone()),
            transport: Arc::new(webhook_sender),
            sealer: sealer.clone(),
            clock: clock.clone(),
            schedule: webhook_schedule,
            concurrency: settings.webhook_concurrency,
            disable_after: chrono::Duration::hours(settings.webhook_disable_after_hours),
            wake: dispatch_wake.clone(),
        });
        let transport = crate::mail::Mailer::from_settings(&settings)?;
        let mailer = Arc::new(crate::mail::MailWorker {
            outbox: Arc::new(crate::mail::StoreOutbox {
                store: store.clone(),
                lifecycle: Lifecycle::new(store.clone(), hub.clone()),
            }),
            from: transport.from.clone(),
            schedule: transport.schedule.clone(),
            transport: Arc::new(transport),
            pace: (settings.smtp_max_per_sec > 0).then(|| crate::mail::Pace {
                limiter: limiter.clone(),
                quota: issuer_coordination::ratelimit::Quota {
                    per_sec: settings.smtp_max_per_sec,
                    burst: settings.smtp_max_per_sec,
                },
            }),
            clock: clock.clone(),
            links: issuer_domain::service::OfferLinks::new(&settings.public_url),
        });
        let issuances = Arc::new(IssuanceService::new(
            IssuancePorts {
                store: store.clone(),
                lock: lock.clone(),
                sealer: sealer.clone(),
                clock: clock.clone(),
                notifier: announcer.clone(),
            },
            catalog,
            &settings.public_url,
            IdempotencySettings {
                lock_wait: Duration::from_millis(settings.idempotency_lock_wait_ms),
                ..IdempotencySettings::default()
            },
        ));
        let stopping = tokio::sync::watch::channel(false).0;
        let watches = crate::watch::Watches {
            issuances: issuances.clone(),
            store: store.clone(),
            hub: hub.clone(),
            timing: watch_timing,
            counts: Arc::default(),
            max_per_tenant: settings.watch_max_per_tenant,
            stopping: stopping.subscribe(),
        };
        let client_credentials = crate::grant::ClientCredentials {
            store: store.clone(),
            hasher: SecretHasher::new(&secret),
            tokens: tokens.clone(),
            clock: clock.clone(),
            limits: limits.clone(),
            issuances: issuances.clone(),
        };
        Ok(Self {
            client_credentials,
            lifecycle: Lifecycle::new(store.clone(), announcer),
            hasher: SecretHasher::new(&secret),
            settings,
            store,
            lock,
            tokens,
            wallet,
            credential_jwks,
            clock,
            issuances,
            hub,
            watches,
            status_lists,
            sealer,
            webhooks,
            dispatcher,
            dispatch_wake,
            mailer,
            stopping,
            metrics_addr: std::sync::OnceLock::new(),
            limits,
        })
    }
}

/// Opens the configured store, traced and counted; migrates it when asked.
pub async fn connect_store(settings: &Settings, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    let store = match &settings.database_url {
        Some(url) => {
            let store = SqlStore::connect_postgres(url.expose(), settings.database_max_connections)
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))
                .context("connecting to ISSUER_DATABASE_URL")?;
            if migrate {
                store
                    .migrate()
                    .await
                    .map_err(|e| anyhow::anyhow!(e.chain()))?;
            }
            store
        }
        None => {
            private_dir(&settings.data_dir)
                .with_context(|| format!("creating data dir {}", settings.data_dir.display()))?;
            let path = settings.data_dir.join("issuer.db");
            // SQLite gives its -wal and -shm files the database file's mode.
            for file in ["issuer.db", "issuer.db-wal", "issuer.db-shm"] {
                let file = settings.data_dir.join(file);
                if file == path || file.exists() {
                    private_file(&file)
                        .with_context(|| format!("protecting {}", file.display()))?;
                }
            }
            let store = SqlStore::open_sqlite(&path.to_string_lossy())
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))
                .with_context(|| format!("opening {}", path.display()))?;
            // The embedded database always follows the binary's schema.
            store
                .migrate()
                .await
                .map_err(|e| anyhow::anyhow!(e.chain()))?;
            store
        }
    };
    let system = store.system();
    Ok(Arc::new(Metered::new(store, system)))
}

fn server_secret(settings: &Settings) -> anyhow::Result<ServerSecret> {
    let text = match &settings.secret_key {
        Some(s) => s.expose().to_owned(),
        None => read_or_create(
            &settings.data_dir.join("secret.key"),
            ServerSecret::generate_text,
        )?,
    };
    ServerSecret::new(text.trim().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("ISSUER_SECRET_KEY: {e}"))
}

/// The credential signing key and the retired ones still published.
fn credential_keys(settings: &Settings) -> anyhow::Result<(SigningKey, Vec<SigningKey>)> {
    let pem = match (
        &settings.credential_signing_key,
        &settings.credential_signing_key_file,
    ) {
        (Some(pem), _) => pem.expose().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading ISSUER_CREDENTIAL_SIGNING_KEY_FILE {}",
                path.display()
            )
        })?,
        (None, None) => read_or_create(
            &settings.data_dir.join("credential-signing-key.pem"),
            || SigningKey::generate().to_pem(),
        )?,
    };
    let current =
        SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("credential signing key: {e}"))?;
    let mut previous = Vec::new();
    if let Some(path) = &settings.credential_previous_keys_file {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "reading ISSUER_CREDENTIAL_PREVIOUS_KEYS_FILE {}",
                path.display()
            )
        })?;
        for block in pem_blocks(&text) {
            let key = SigningKey::from_pem(&block)
                .map_err(|e| anyhow::anyhow!("ISSUER_CREDENTIAL_PREVIOUS_KEYS_FILE: {e}"))?;
            if key.kid() != current.kid() {
                previous.push(key);
            }
        }
    }
    Ok((current, previous))
}

/// The `-----BEGIN ...-----` to `-----END ...-----` blocks of a PEM bundle.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.starts_with("-----BEGIN") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END") {
            blocks.extend(current.take());
        }
    }
    blocks
}

fn token_signing_key(settings: &Settings) -> anyhow::Result<SigningKey> {
    let pem = match (
        &settings.token_signing_key,
        &settings.token_signing_key_file,
    ) {
        (Some(pem), _) => pem.expose().to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("reading ISSUER_TOKEN_SIGNING_KEY_FILE {}", path.display()))?,
        (None, None) => read_or_create(&settings.data_dir.join("token-signing-key.pem"), || {
            SigningKey::generate().to_pem()
        })?,
    };
    SigningKey::from_pem(&pem).map_err(|e| anyhow::anyhow!("token signing key: {e}"))
}

/// Reads a file of the embedded default's data dir, creating it (mode 0600) on first start.
fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if path.exists() {
        return std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()));
    }
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    let value = make();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    use std::io::Write;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(value.as_bytes())?;
    tracing::info!(path = %path.display(), "generated a key for the embedded default");
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_bundles_split_into_keys() {
        let (a, b) = (SigningKey::generate(), SigningKey::generate());
        let bundle = format!("{}\n{}", a.to_pem(), b.to_pem());
        let kids: Vec<String> = pem_blocks(&bundle)
            .iter()
            .map(|p| SigningKey::from_pem(p).unwrap().kid().to_owned())
            .collect();
        assert_eq!(kids, [a.kid(), b.kid()]);
    }
}
