//! Test harness: fresh databases, service instances on ephemeral ports, provisioning, clients.

use std::{
    net::SocketAddr,
    sync::{Arc, OnceLock},
};

use issuer::{
    App, Settings, admin, config::Secret, grpc::pb::issuance_service_client::IssuanceServiceClient,
};
use issuer_domain::model::Scope;
use serde_json::{Value, json};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

pub fn pg_admin_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Logs only with `TEST_LOG=1`.
pub fn init_logs() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if std::env::var("TEST_LOG").is_ok_and(|v| v == "1") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter("info,issuer=debug")
                .try_init();
        }
    });
}

/// A Postgres database created for one test and dropped when the value is dropped.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!(
            "issuer_it_{}",
            issuer_domain::ids::random_token(9)
                .to_lowercase()
                .replace(['-', '_'], "x")
        );
        let admin = pg_admin_url();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin)
            .await
            .expect("Postgres must be running (scripts/test.sh starts it)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("TEST_DATABASE_URL needs a database path"),
        };
        Self { url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut c) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&pg_admin_url()).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

/// One token-signing key and server secret per test process, shared by every instance so
/// that instances of one test accept each other's tokens.
pub fn shared_keys() -> (&'static str, &'static str) {
    static KEYS: OnceLock<(String, String)> = OnceLock::new();
    let (pem, secret) = KEYS.get_or_init(|| {
        (
            issuer_auth::SigningKey::generate().to_pem(),
            issuer_auth::ServerSecret::generate_text(),
        )
    });
    (pem, secret)
}

/// The credential signing key of every Postgres instance in this process: distinct from the
/// token key, as in production.
pub fn shared_credential_key() -> &'static str {
    static KEY: OnceLock<String> = OnceLock::new();
    KEY.get_or_init(|| issuer_auth::SigningKey::generate().to_pem())
}

/// Settings for an instance on Postgres (and Redis when given).
pub fn pg_settings(db_url: &str, redis: Option<&str>) -> Settings {
    let (pem, secret) = shared_keys();
    Settings {
        database_url: Some(Secret::new(db_url)),
        redis_url: redis.map(Secret::new),
        secret_key: Some(Secret::new(secret)),
        token_signing_key: Some(Secret::new(pem)),
        credential_signing_key: Some(Secret::new(shared_credential_key())),
        database_max_connections: 30,
        // Offer emails of tests that do not read them: out of the working tree.
        mail_dir: Some(std::env::temp_dir().join("issuer-test-mail")),
        // Every test calls from 127.0.0.1, and the budgets in the test Redis are shared by
        // all of them: the tests of the limits turn them on with addresses of their own.
        rate_limit_ip_per_sec: 0,
        ..Settings::default()
    }
}

/// Settings for the embedded default in `dir`.
pub fn embedded_settings(dir: &std::path::Path) -> Settings {
    Settings {
        data_dir: dir.to_path_buf(),
        rate_limit_ip_per_sec: 0,
        ..Settings::default()
    }
}

/// A running instance.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub app: Arc<App>,
    pub http: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

#[derive(Debug, Clone)]
pub struct Creds {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
}

impl TestApp {
    /// Starts an instance with `settings` on 127.0.0.1:0; `public_url` follows the port.
    pub async fn spawn(settings: Settings) -> Self {
        Self::spawn_at(settings, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Stops the instance and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// The `/metrics` URL on the instance's metrics listener.
    pub fn metrics_url(&self) -> String {
        let addr = self.app.metrics_addr.get().expect("metrics are served");
        format!("http://{addr}/metrics")
    }

    /// One scrape of the metrics listener, as text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(self.metrics_url())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// A new tenant with one client holding `scopes`.
    pub async fn provision(&self, scopes: &[Scope]) -> Creds {
        let tenant = admin::create_tenant(&self.app, "test tenant")
            .await
            .unwrap();
        let c = admin::create_client(&self.app, tenant.id, scopes)
            .await
            .unwrap();
        Creds {
            tenant_id: c.tenant_id,
            client_id: c.client_id,
            client_secret: c.client_secret,
        }
    }

    /// An access token for `creds` from the token endpoint (client_secret_basic).
    pub async fn token(&self, creds: &Creds) -> String {
        fetch_token(token_request(&self.http, &self.base, creds)).await
    }

    /// A tenant with every scope and a token for it.
    pub async fn tenant_token(&self) -> (Creds, String) {
        let creds = self.provision(&Scope::ALL).await;
        let token = self.token(&creds).await;
        (creds, token)
    }

    pub async fn create_rest(&self, token: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url("/issuer/api/v1/issuances"))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get_rest(&self, token: &str, id: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/issuer/api/v1/issuances/{id}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    /// The issuance's event history (`{"events": [...]}`).
    pub async fn events_rest(&self, token: &str, id: &str) -> Value {
        self.http
            .get(self.url(&format!("/issuer/api/v1/issuances/{id}/events")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn cancel_rest(&self, token: &str, id: impl std::fmt::Display) -> reqwest::Response {
        self.http
            .post(self.url(&format!("/issuer/api/v1/issuances/{id}/cancel")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    pub async fn grpc(&self) -> IssuanceServiceClient<Channel> {
        let channel = Channel::from_shared(self.base.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        IssuanceServiceClient::new(channel)
    }

    /// Rows of a table in this instance's store, for "nothing was written" checks.
    pub async fn count_issuances(&self, creds: &Creds) -> usize {
        let tenant = creds.tenant_id.parse().unwrap();
        let filter = issuer_domain::model::ListFilter {
            limit: 1000,
            ..Default::default()
        };
        self.app
            .store
            .list_issuances(tenant, &filter)
            .await
            .unwrap()
            .len()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A gRPC request carrying a bearer token.
pub fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A valid create body for `learcredential.employee.sd.1`.
pub fn create_body(client_request_id: &str) -> Value {
    json!({
        "client_request_id": client_request_id,
        "credential_configuration_id": "learcredential.employee.sd.1",
        "payload": {
            "mandator": {
                "organizationIdentifier": "VATES-B12345678",
                "organization": "Acme Corp",
                "commonName": "Jane Boss",
                "email": "boss@acme.example",
                "country": "ES"
            },
            "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@acme.example"},
            "power": [{"type": "Domain", "domain": "DOME", "function": "Onboarding", "action": ["Execute"]}]
        },
        "delivery": "none"
    })
}

/// The gRPC `CreateIssuanceRequest` for a create body in the REST JSON shape; absent strings are
/// left empty as proto3 sends them.
pub fn create_request_pb(body: &Value) -> issuer::grpc::pb::CreateIssuanceRequest {
    use issuer::grpc::pb;
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    issuer::grpc::pb::CreateIssuanceRequest {
        client_request_id: s("client_request_id"),
        credential_configuration_id: s("credential_configuration_id"),
        payload: body
            .get("payload")
            .and_then(Value::as_object)
            .map(issuer::grpc::structs::json_to_struct),
        delivery_method: match s("delivery").as_str() {
            "" => pb::DeliveryMethod::Unspecified,
            "none" => pb::DeliveryMethod::None,
            "email" => pb::DeliveryMethod::Email,
            "link" => pb::DeliveryMethod::Link,
            "qr" => pb::DeliveryMethod::Qr,
            other => panic!("no delivery method `{other}`"),
        } as i32,
        email: s("email"),
        grant_type: s("grant_type"),
        expires_in: body.get("expires_in").and_then(Value::as_i64),
        tx_code: body.get("tx_code").and_then(Value::as_bool),
        ..Default::default()
    }
}

impl TestApp {
    /// Starts an instance on `addr`, e.g. the address of a stopped instance to restart it under
    /// the same public URL.
    pub async fn spawn_at(mut settings: Settings, addr: SocketAddr) -> Self {
        init_logs();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        settings.listen_addr = addr;
        settings.public_url = format!("http://{addr}");
        // Instances run side by side: each gets its own metrics port.
        settings.metrics_addr = "127.0.0.1:0".into();
        let app = Arc::new(
            App::build(settings.validate().unwrap())
                .await
                .expect("app builds"),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(issuer::serve(app.clone(), listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            base: format!("http://{addr}"),
            app,
            http: reqwest::Client::new(),
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }
}

/// The real binary, `issuer serve`, as a child process on its own port, configured through the
/// environment as in production.
pub struct ServiceProcess {
    pub base: String,
    pub child: tokio::process::Child,
    env: Vec<(String, String)>,
    _data: tempfile::TempDir,
}

impl ServiceProcess {
    /// Starts the service on `db_url` (and the test Redis) with `extra` environment, its stdout
    /// piped (`child.stdout`) when `capture_stdout`, and waits until it is ready.
    pub async fn start(db_url: &str, extra: &[(&str, &str)], capture_stdout: bool) -> Self {
        use std::process::Stdio;
        use std::time::{Duration, Instant};
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let base = format!("http://127.0.0.1:{port}");
        let data = tempfile::tempdir().unwrap();
        let (pem, secret) = shared_keys();
        let mut env: Vec<(String, String)> = [
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("ISSUER_LISTEN_ADDR", format!("127.0.0.1:{port}")),
            ("ISSUER_PUBLIC_URL", base.clone()),
            ("ISSUER_DATABASE_URL", db_url.to_owned()),
            ("ISSUER_REDIS_URL", redis_url()),
            ("ISSUER_SECRET_KEY", secret.to_owned()),
            ("ISSUER_TOKEN_SIGNING_KEY", pem.to_owned()),
            (
                "ISSUER_CREDENTIAL_SIGNING_KEY",
                shared_credential_key().to_owned(),
            ),
            ("ISSUER_DATA_DIR", data.path().display().to_string()),
            ("ISSUER_LOG_LEVEL", "warn".to_owned()),
            ("ISSUER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
            ("ISSUER_RATE_LIMIT_IP_PER_SEC", "0".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"));
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .arg("serve")
            .stdin(Stdio::null())
            .stdout(if capture_stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let child = cmd.spawn().unwrap();
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !matches!(http.get(format!("{base}/readyz")).send().await, Ok(r) if r.status() == 200)
        {
            assert!(
                Instant::now() < deadline,
                "the service did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Self {
            base,
            child,
            env,
            _data: data,
        }
    }

    /// Runs an `issuer` subcommand with the service's configuration; returns its JSON output.
    pub async fn cli(&self, args: &[&str]) -> Value {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_issuer"))
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "issuer {args:?} failed");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// A new tenant and a client with `scopes` (comma-separated), provisioned through the CLI.
    pub async fn provision(&self, scopes: &str) -> Creds {
        let tenant = self
            .cli(&["tenant", "create", "--name", "process", "--output", "json"])
            .await;
        let tenant_id = tenant["tenant_id"].as_str().unwrap().to_owned();
        let client = self
            .cli(&[
                "client", "create", "--tenant", &tenant_id, "--scopes", scopes, "--output", "json",
            ])
            .await;
        Creds {
            tenant_id,
            client_id: client["client_id"].as_str().unwrap().to_owned(),
            client_secret: client["client_secret"].as_str().unwrap().to_owned(),
        }
    }

    /// An access token for `creds`.
    pub async fn token(&self, creds: &Creds) -> String {
        fetch_token(token_request(&reqwest::Client::new(), &self.base, creds)).await
    }
}

/// A client-credentials token request for `creds` (client_secret_basic) to the service at
/// `base`; add headers before sending.
pub fn token_request(http: &reqwest::Client, base: &str, creds: &Creds) -> reqwest::RequestBuilder {
    http.post(format!("{base}/issuer/oauth/token"))
        .basic_auth(&creds.client_id, Some(&creds.client_secret))
        .form(&[("grant_type", "client_credentials")])
}

/// Sends a token request and returns the access token; it must succeed.
pub async fn fetch_token(request: reqwest::RequestBuilder) -> String {
    let res = request.send().await.unwrap();
    assert_eq!(res.status(), 200, "token request failed");
    res.json::<Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Fires `requests` (raw HTTP/1.1 with `Connection: close`) at `addr` so that the service sees
/// them arrive together: each goes over its own connection with all but its last byte, and only
/// when every connection holds its request are the last bytes sent. Returns each response's
/// status and body, in request order.
pub async fn race_http1(addr: SocketAddr, requests: Vec<Vec<u8>>) -> Vec<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = requests.len();
    let ready = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| {
            let ready = Arc::clone(&ready);
            let mut go = go_rx.clone();
            tokio::spawn(async move {
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (head, last) = request.split_at(request.len() - 1);
                stream.write_all(head).await.unwrap();
                stream.flush().await.unwrap();
                ready.wait().await;
                go.wait_for(|go| *go).await.unwrap();
                stream.write_all(last).await.unwrap();
                let mut raw = Vec::new();
                stream.read_to_end(&mut raw).await.unwrap();
                let raw = String::from_utf8_lossy(&raw).into_owned();
                let status = raw
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no HTTP status in {raw:?}"));
                let body = raw
                    .split_once("\r\n\r\n")
                    .map(|(_, b)| b.to_owned())
                    .unwrap_or_default();
                (status, body)
            })
        })
        .collect();
    ready.wait().await;
    go_tx.send(true).unwrap();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("racing request panicked"));
    }
    out
}

/// A raw HTTP/1.1 form POST for [`race_http1`].
pub fn raw_form_post(path: &str, form: &[(&str, &str)]) -> Vec<u8> {
    let body = serde_urlencoded::to_string(form).unwrap();
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A raw HTTP/1.1 JSON POST with a bearer token, for [`race_http1`].
pub fn raw_json_post(path: &str, token: &str, body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}
