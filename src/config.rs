//! Settings: built-in defaults, then an optional TOML file, then `ISSUER_*` environment
//! variables, then `validate()`. Secrets are wrapped so they never print.

use std::{fmt, net::SocketAddr, path::PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize};

/// A value that must not reach logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("**redacted**")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting, with its environment variable in the doc comment. The README's configuration
/// table and the Helm values use the same names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `ISSUER_LISTEN_ADDR`: REST, gRPC and gRPC-web on one port.
    pub listen_addr: SocketAddr,
    /// `ISSUER_METRICS_ADDR`: where `/metrics` is served, apart from the public port (which
    /// answers 404 for it). Empty: not served.
    pub metrics_addr: String,
    /// `ISSUER_PUBLIC_URL`: the externally visible base URL; every absolute URL is built from it.
    pub public_url: String,
    /// `ISSUER_DATABASE_URL`: `postgres://...`; unset = embedded SQLite file in the data dir.
    pub database_url: Option<Secret>,
    /// `ISSUER_DATABASE_MAX_CONNECTIONS`.
    pub database_max_connections: u32,
    /// `ISSUER_REDIS_URL`: `redis://...`; unset = in-process locks (one instance only).
    pub redis_url: Option<Secret>,
    /// `ISSUER_DATA_DIR`: where the embedded default keeps its database and generated keys.
    pub data_dir: PathBuf,
    /// `ISSUER_SECRET_KEY`: server secret (>= 32 bytes) from which the client-secret pepper and
    /// the code-sealing key derive. Required with Postgres; generated in the data dir otherwise.
    pub secret_key: Option<Secret>,
    /// `ISSUER_TOKEN_SIGNING_KEY`: PEM of the P-256 key that signs access tokens.
    pub token_signing_key: Option<Secret>,
    /// `ISSUER_TOKEN_SIGNING_KEY_FILE`: the same, from a file. One of the two is required with
    /// Postgres; generated in the data dir otherwise.
    pub token_signing_key_file: Option<PathBuf>,
    /// `ISSUER_CREDENTIAL_SIGNING_KEY`: PEM of the P-256 key that signs credentials.
    pub credential_signing_key: Option<Secret>,
    /// `ISSUER_CREDENTIAL_SIGNING_KEY_FILE`: the same, from a file. One of the two is required
    /// with Postgres; generated in the data dir otherwise.
    pub credential_signing_key_file: Option<PathBuf>,
    /// `ISSUER_CREDENTIAL_PREVIOUS_KEYS_FILE`: PEM blocks of retired credential signing keys,
    /// still published so credentials they signed keep verifying until they expire.
    pub credential_previous_keys_file: Option<PathBuf>,
    /// `ISSUER_CREDENTIAL_TTL_DAYS`: validity of issued credentials.
    pub credential_ttl_days: i64,
    /// `ISSUER_BATCH_CREDENTIAL_SIZE`: the most key proofs (credential copies) one credential
    /// request may carry (OID4VCI `batch_credential_issuance.batch_size`; 1 turns batches off).
    pub batch_credential_size: usize,
    /// `ISSUER_STATUS_LIST_SIZE`: entries of each status list, shared by every tenant; a new
    /// list opens when one fills. Larger lists hide a credential in a bigger crowd.
    pub status_list_size: i64,
    /// `ISSUER_STATUS_LIST_TTL_SECS`: how long verifiers may cache a status list (its `ttl`
    /// and `Cache-Control: max-age`); a replica never serves a list older than this.
    pub status_list_ttl_secs: u64,
    /// `ISSUER_TX_CODE_MAX_ATTEMPTS`: wrong transaction codes before an offer's code is dead.
    pub tx_code_max_attempts: i64,
    /// `ISSUER_TOKEN_TTL_SECS`: access-token lifetime, 300..=900.
    pub token_ttl_secs: i64,
    /// `ISSUER_CATALOG_FILE`: JSON credential-configuration catalog replacing the built-in one.
    pub catalog_file: Option<PathBuf>,
    /// `ISSUER_MAX_BODY_BYTES`: request body limit (REST and gRPC messages).
    pub max_body_bytes: usize,
    /// `ISSUER_SMTP_MAX_PER_SEC`: offer emails sent per second at most, by all replicas
    /// together (through Redis when configured); 0: unpaced.
    pub smtp_max_per_sec: u32,
    /// `ISSUER_BATCH_MAX_ITEMS`: create bodies one batch create may hold.
    pub batch_max_items: usize,
    /// `ISSUER_BATCH_MAX_BYTES`: body limit of a batch create.
    pub batch_max_bytes: usize,
    /// `ISSUER_MIGRATE_ON_START`: run database migrations when serving starts.
    pub migrate_on_start: bool,
    /// `ISSUER_IDEMPOTENCY_LOCK_WAIT_MS`: how long a concurrent duplicate create waits.
    pub idempotency_lock_wait_ms: u64,
    /// `ISSUER_SWEEP_INTERVAL_MS`: how often overdue pending issuances are expired.
    pub sweep_interval_ms: u64,
    /// `ISSUER_WATCH_HEARTBEAT_SECS`: heartbeat interval of idle watch and SSE streams.
    pub watch_heartbeat_secs: u64,
    /// `ISSUER_WATCH_RESYNC_SECS`: how often an idle watcher re-reads the store anyway, in case
    /// an announcement was lost.
    pub watch_resync_secs: u64,
    /// `ISSUER_WEBHOOK_ALLOW_NETWORKS`: comma-separated CIDRs webhooks may reach although they
    /// are private, loopback or otherwise refused (tests, private deployments); also permits
    /// plain `http://` to them. Empty: public `https` endpoints only.
    pub webhook_allow_networks: String,
    /// `ISSUER_WEBHOOK_TIMEOUT_MS`: per-attempt timeout.
    pub webhook_timeout_ms: u64,
    /// `ISSUER_WEBHOOK_RETRY_SCHEDULE`: delays between attempts, e.g. `5s,5m,30m,2h,5h,10h,10h`.
    pub webhook_retry_schedule: Option<String>,
    /// `ISSUER_WEBHOOK_DISABLE_AFTER_HOURS`: an endpoint failing this long is disabled.
    pub webhook_disable_after_hours: i64,
    /// `ISSUER_WEBHOOK_CONCURRENCY`: attempts in flight per replica.
    pub webhook_concurrency: usize,
    /// `ISSUER_SMTP_URL`: `smtp://user:pass@host:587?tls=required` (STARTTLS),
    /// `?tls=opportunistic`, or `smtps://user:pass@host:465` (implicit TLS); always name the
    /// port. Unset: offer emails are written as `.eml` files into the mail directory.
    pub smtp_url: Option<Secret>,
    /// `ISSUER_SMTP_FROM`: the sender of offer emails, e.g. `Acme Credentials <no-reply@acme.example>`.
    pub smtp_from: String,
    /// `ISSUER_MAIL_DIR`: where emails go without SMTP; default `mail/` in the data dir.
    pub mail_dir: Option<PathBuf>,
    /// `ISSUER_EMAIL_TIMEOUT_MS`: bound on one SMTP send.
    pub email_timeout_ms: u64,
    /// `ISSUER_EMAIL_RETRY_SCHEDULE`: delays between attempts while SMTP fails, e.g.
    /// `30s,2m,10m,30m,1h,2h,4h` (the default).
    pub email_retry_schedule: Option<String>,
    /// `ISSUER_RATE_LIMIT_CLIENT_PER_SEC`: sustained requests per second of each API client
    /// (management API and token endpoint); 0 = unlimited. A tenant may have its own.
    pub rate_limit_client_per_sec: u32,
    /// `ISSUER_RATE_LIMIT_CLIENT_BURST`: requests an API client may make at once.
    pub rate_limit_client_burst: u32,
    /// `ISSUER_RATE_LIMIT_IP_PER_SEC`: sustained requests per second of each client address on
    /// the unauthenticated endpoints (token, offer, nonce, credential, notification, landing
    /// page) and of callers with an invalid token; 0 = unlimited.
    pub rate_limit_ip_per_sec: u32,
    /// `ISSUER_RATE_LIMIT_IP_BURST`: requests a client address may make at once.
    pub rate_limit_ip_burst: u32,
    /// `ISSUER_CLIENT_IP_HEADER`: the header in which the trusted reverse proxy in front of
    /// the service puts the client's address (e.g. `X-Forwarded-For`, of which the last entry
    /// counts); empty = the connection's peer address. Only set it behind such a proxy: a
    /// client could otherwise choose its own address.
    pub client_ip_header: String,
    /// `ISSUER_HTTP_HEADER_TIMEOUT_MS`: a connection must deliver a request head this soon
    /// after starting one, and an idle HTTP/1.1 keep-alive connection must start its next
    /// request this soon; otherwise it is closed.
    pub http_header_timeout_ms: u64,
    /// `ISSUER_HTTP_IDLE_TIMEOUT_SECS`: a connection with no request in flight this long is
    /// closed (HTTP/2 included).
    pub http_idle_timeout_secs: u64,
    /// `ISSUER_HTTP_MAX_CONNECTIONS`: open connections at most; past it, new ones wait.
    pub http_max_connections: u32,
    /// `ISSUER_REQUEST_TIMEOUT_MS`: bound on a unary call (not on watch streams).
    pub request_timeout_ms: u64,
    /// `ISSUER_WATCH_MAX_PER_TENANT`: open watch streams (gRPC and SSE) of one tenant on one
    /// replica at most; past it, 429 / `RESOURCE_EXHAUSTED`.
    pub watch_max_per_tenant: usize,
    /// `ISSUER_RETENTION_SECS`: how long ended issuances (with their events, email rows and
    /// webhook deliveries) are kept after their last change; default 90 days.
    pub retention_secs: u64,
    /// `ISSUER_RETENTION_INTERVAL_SECS`: how often each replica deletes what is past it.
    pub retention_interval_secs: u64,
    /// `ISSUER_LOG_FORMAT`: `json` or `pretty`.
    pub log_format: LogFormat,
    /// `ISSUER_LOG_LEVEL`: a `tracing` filter such as `info` or `issuer=debug,info`.
    pub log_level: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:8080".parse().expect("valid address"),
            metrics_addr: "127.0.0.1:9464".into(),
            public_url: "http://localhost:8080".into(),
            database_url: None,
            database_max_connections: 20,
            redis_url: None,
            data_dir: PathBuf::from("data"),
            secret_key: None,
            token_signing_key: None,
            token_signing_key_file: None,
            credential_signing_key: None,
            credential_signing_key_file: None,
            credential_previous_keys_file: None,
            credential_ttl_days: 365,
            batch_credential_size: 10,
            status_list_size: 131_072,
            status_list_ttl_secs: 300,
            tx_code_max_attempts: 5,
            token_ttl_secs: 300,
            catalog_file: None,
            max_body_bytes: 64 * 1024,
            smtp_max_per_sec: 10,
            batch_max_items: 1_000,
            batch_max_bytes: 8 * 1024 * 1024,
            migrate_on_start: true,
            idempotency_lock_wait_ms: 10_000,
            sweep_interval_ms: 1_000,
            watch_heartbeat_secs: 15,
            webhook_allow_networks: String::new(),
            webhook_timeout_ms: 10_000,
            webhook_retry_schedule: None,
            webhook_disable_after_hours: 120,
            webhook_concurrency: 32,
            watch_resync_secs: 60,
            smtp_url: None,
            smtp_from: "Credential Issuer <no-reply@localhost>".into(),
            mail_dir: None,
            email_timeout_ms: 30_000,
            email_retry_schedule: None,
            retention_secs: 90 * 24 * 3600,
            retention_interval_secs: 300,
            http_header_timeout_ms: 10_000,
            http_idle_timeout_secs: 120,
            http_max_connections: 10_000,
            request_timeout_ms: 30_000,
            watch_max_per_tenant: 1_000,
            rate_limit_client_per_sec: 200,
            rate_limit_client_burst: 400,
            rate_limit_ip_per_sec: 50,
            rate_limit_ip_burst: 100,
            client_ip_header: String::new(),
            log_format: LogFormat::Json,
            log_level: "info".into(),
        }
    }
}

impl Settings {
    /// Defaults → `file` (or `$ISSUER_CONFIG`) → `ISSUER_*` environment → validation.
    pub fn load(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file.or_else(|| std::env::var_os("ISSUER_CONFIG").map(PathBuf::from)) {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(Env::prefixed("ISSUER_").ignore(&["config"]));
        let settings: Settings = fig.extract()?;
        settings.validate()
    }

    /// Normalises empty values to unset and checks ranges and combinations.
    pub fn validate(mut self) -> anyhow::Result<Self> {
        for opt in [
            &mut self.credential_signing_key,
            &mut self.database_url,
            &mut self.redis_url,
            &mut self.secret_key,
            &mut self.token_signing_key,
            &mut self.smtp_url,
        ] {
            if opt.as_ref().is_some_and(|s| s.expose().trim().is_empty()) {
                *opt = None;
            }
        }
        self.public_url = self.public_url.trim_end_matches('/').to_owned();
        self.metrics_addr = self.metrics_addr.trim().to_owned();
        anyhow::ensure!(
            self.metrics_addr.is_empty() || self.metrics_addr.parse::<SocketAddr>().is_ok(),
            "ISSUER_METRICS_ADDR must be an address such as 127.0.0.1:9464 (or empty), got `{}`",
            self.metrics_addr
        );
        anyhow::ensure!(
            self.public_url.starts_with("https://") || self.public_url.starts_with("http://"),
            "ISSUER_PUBLIC_URL must be an http(s) URL, got `{}`",
            self.public_url
        );
        anyhow::ensure!(
            (300..=900).contains(&self.token_ttl_secs),
            "ISSUER_TOKEN_TTL_SECS must be from 300 to 900 (RFC 9068 tokens stay short-lived)"
        );
        anyhow::ensure!(
            (100..=30_000).contains(&self.webhook_timeout_ms),
            "ISSUER_WEBHOOK_TIMEOUT_MS must be from 100 to 30000 (well inside the 60 s delivery lease)"
        );
        anyhow::ensure!(
            (100..=120_000).contains(&self.email_timeout_ms),
            "ISSUER_EMAIL_TIMEOUT_MS must be from 100 to 120000 (well inside the mailer's lease)"
        );
        anyhow::ensure!(
            self.smtp_from.parse::<lettre::message::Mailbox>().is_ok(),
            "ISSUER_SMTP_FROM must be a mailbox such as `Name <address@example.org>`, got `{}`",
            self.smtp_from
        );
        anyhow::ensure!(
            (1..=1024).contains(&self.webhook_concurrency),
            "ISSUER_WEBHOOK_CONCURRENCY must be from 1 to 1024"
        );
        anyhow::ensure!(
            self.webhook_disable_after_hours >= 1,
            "ISSUER_WEBHOOK_DISABLE_AFTER_HOURS must be at least 1"
        );
        anyhow::ensure!(
            (1..=300).contains(&self.watch_heartbeat_secs),
            "ISSUER_WATCH_HEARTBEAT_SECS must be from 1 to 300"
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.watch_resync_secs),
            "ISSUER_WATCH_RESYNC_SECS must be from 1 to 3600"
        );
        anyhow::ensure!(
            (1..=3650).contains(&self.credential_ttl_days),
            "ISSUER_CREDENTIAL_TTL_DAYS must be from 1 to 3650"
        );
        anyhow::ensure!(
            (1..=issuer_oid4vci::MAX_PROOFS).contains(&self.batch_credential_size),
            "ISSUER_BATCH_CREDENTIAL_SIZE must be from 1 to {}",
            issuer_oid4vci::MAX_PROOFS
        );
        anyhow::ensure!(
            (16..=1 << 24).contains(&self.status_list_size),
            "ISSUER_STATUS_LIST_SIZE must be from 16 to 16777216"
        );
        anyhow::ensure!(
            (1..=86_400).contains(&self.status_list_ttl_secs),
            "ISSUER_STATUS_LIST_TTL_SECS must be from 1 to 86400"
        );
        anyhow::ensure!(
            (1..=20).contains(&self.tx_code_max_attempts),
            "ISSUER_TX_CODE_MAX_ATTEMPTS must be from 1 to 20"
        );
        anyhow::ensure!(
            self.max_body_bytes >= 1024,
            "ISSUER_MAX_BODY_BYTES must be at least 1024"
        );
        anyhow::ensure!(
            self.smtp_max_per_sec <= 10_000,
            "ISSUER_SMTP_MAX_PER_SEC must be from 0 (unpaced) to 10000"
        );
        anyhow::ensure!(
            (1..=10_000).contains(&self.batch_max_items),
            "ISSUER_BATCH_MAX_ITEMS must be from 1 to 10000"
        );
        anyhow::ensure!(
            self.batch_max_bytes >= self.max_body_bytes,
            "ISSUER_BATCH_MAX_BYTES must be at least ISSUER_MAX_BODY_BYTES"
        );
        anyhow::ensure!(
            self.retention_secs >= 1,
            "ISSUER_RETENTION_SECS must be at least 1"
        );
        anyhow::ensure!(
            (1..=86_400).contains(&self.retention_interval_secs),
            "ISSUER_RETENTION_INTERVAL_SECS must be from 1 to 86400"
        );
        anyhow::ensure!(
            (100..=300_000).contains(&self.http_header_timeout_ms),
            "ISSUER_HTTP_HEADER_TIMEOUT_MS must be from 100 to 300000"
        );
        anyhow::ensure!(
            (1..=3600).contains(&self.http_idle_timeout_secs),
            "ISSUER_HTTP_IDLE_TIMEOUT_SECS must be from 1 to 3600"
        );
        anyhow::ensure!(
            self.http_max_connections >= 1,
            "ISSUER_HTTP_MAX_CONNECTIONS must be at least 1"
        );
        anyhow::ensure!(
            (100..=600_000).contains(&self.request_timeout_ms),
            "ISSUER_REQUEST_TIMEOUT_MS must be from 100 to 600000"
        );
        anyhow::ensure!(
            self.watch_max_per_tenant >= 1,
            "ISSUER_WATCH_MAX_PER_TENANT must be at least 1"
        );
        for (name, per_sec, burst) in [
            (
                "CLIENT",
                self.rate_limit_client_per_sec,
                self.rate_limit_client_burst,
            ),
            ("IP", self.rate_limit_ip_per_sec, self.rate_limit_ip_burst),
        ] {
            anyhow::ensure!(
                per_sec == 0 || issuer_domain::model::RateLimit::new(per_sec, burst).is_ok(),
                "ISSUER_RATE_LIMIT_{name}_BURST must be at least ISSUER_RATE_LIMIT_{name}_PER_SEC \
                 and at most 1000000 (or the rate 0, unlimited)"
            );
        }
        self.client_ip_header = self.client_ip_header.trim().to_ascii_lowercase();
        anyhow::ensure!(
            self.client_ip_header.is_empty()
                || http::HeaderName::from_bytes(self.client_ip_header.as_bytes()).is_ok(),
            "ISSUER_CLIENT_IP_HEADER must be a header name"
        );
        if let Some(url) = &self.database_url {
            let url = url.expose();
            anyhow::ensure!(
                url.starts_with("postgres://") || url.starts_with("postgresql://"),
                "ISSUER_DATABASE_URL must be a postgres:// URL (unset it for the embedded SQLite default)"
            );
            anyhow::ensure!(
                self.secret_key.is_some(),
                "ISSUER_SECRET_KEY is required with ISSUER_DATABASE_URL: every replica must share it"
            );
            anyhow::ensure!(
                self.token_signing_key.is_some() || self.token_signing_key_file.is_some(),
                "ISSUER_TOKEN_SIGNING_KEY or ISSUER_TOKEN_SIGNING_KEY_FILE is required with ISSUER_DATABASE_URL"
            );
            anyhow::ensure!(
                self.credential_signing_key.is_some() || self.credential_signing_key_file.is_some(),
                "ISSUER_CREDENTIAL_SIGNING_KEY or ISSUER_CREDENTIAL_SIGNING_KEY_FILE is required with ISSUER_DATABASE_URL"
            );
        }
        Ok(self)
    }

    /// True when running on the embedded SQLite default.
    pub fn is_embedded(&self) -> bool {
        self.database_url.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Settings {
            secret_key: Some(Secret::new("super-secret-value")),
            ..Settings::default()
        };
        assert!(!format!("{s:?}").contains("super-secret-value"));
    }

    #[test]
    fn postgres_needs_shared_secrets() {
        let s = Settings {
            database_url: Some(Secret::new("postgres://localhost/x")),
            ..Settings::default()
        };
        assert!(s.validate().is_err());
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail fixes the closure's error type
    fn env_overrides_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("ISSUER_LISTEN_ADDR", "127.0.0.1:9999");
            jail.set_env("ISSUER_DATABASE_URL", "");
            let s = Settings::load(None).map_err(|e| e.to_string())?;
            assert_eq!(s.listen_addr.port(), 9999);
            assert!(s.is_embedded());
            Ok(())
        });
    }
}
