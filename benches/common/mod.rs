//! Shared by the benchmarks: a fresh Postgres database, the service on its own runtime
//! (Postgres + Redis, as in production), a tenant with a client, and a management token.

// Each benchmark uses a part of this module.
#![allow(dead_code)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use issuer::{App, Settings, admin, admin::ClientCredentials, config::Secret};
use issuer_domain::model::Scope;
use serde_json::Value;

/// One HTTP/1.1 connection per worker.
pub fn clients(conns: usize) -> Arc<Vec<reqwest::Client>> {
    Arc::new(
        (0..conns)
            .map(|_| {
                reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .unwrap()
            })
            .collect(),
    )
}

/// The payload of every benchmark's creates.
pub fn payload() -> Value {
    serde_json::json!({
        "mandator": {"organizationIdentifier": "VATES-B12345678", "organization": "Acme Corp",
                     "commonName": "Jane Boss", "email": "boss@acme.example", "country": "ES"},
        "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@acme.example"},
        "power": [{"type": "Domain", "domain": "DOME", "function": "Onboarding", "action": ["Execute"]}]
    })
}

pub fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

pub struct BenchService {
    pub base: String,
    pub db_url: String,
    pub creds: ClientCredentials,
    pub token: String,
    /// Runs the service; load generators use their own runtime.
    pub server_rt: tokio::runtime::Runtime,
    app: Arc<App>,
    admin_url: String,
    db_name: String,
}

impl BenchService {
    pub fn start(name: &str) -> Self {
        Self::start_with(name, |s| s)
    }

    /// Starts with settings adjusted by `tune` (e.g. a webhook allow-list).
    pub fn start_with(name: &str, tune: impl FnOnce(Settings) -> Settings) -> Self {
        let admin_url = env_or(
            "TEST_DATABASE_URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        );
        let redis_url = env_or("TEST_REDIS_URL", "redis://127.0.0.1:6379");
        let server_rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name("service")
            .enable_all()
            .build()
            .unwrap();
        let db_name = format!("issuer_bench_{name}_{}", std::process::id());
        let db_url = format!("{}/{db_name}", admin_url.rsplit_once('/').unwrap().0);
        server_rt.block_on(async {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
                .await
                .unwrap();
            for sql in [
                format!("DROP DATABASE IF EXISTS {db_name}"),
                format!("CREATE DATABASE {db_name}"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&mut c)
                    .await
                    .unwrap();
            }
        });
        let listener = server_rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = tune(Settings {
            listen_addr: addr,
            public_url: format!("http://{addr}"),
            database_url: Some(Secret::new(&db_url)),
            redis_url: Some(Secret::new(&redis_url)),
            secret_key: Some(Secret::new(issuer_auth::ServerSecret::generate_text())),
            token_signing_key: Some(Secret::new(issuer_auth::SigningKey::generate().to_pem())),
            credential_signing_key: Some(Secret::new(issuer_auth::SigningKey::generate().to_pem())),
            metrics_addr: "127.0.0.1:0".into(),
            // Budgets are checked as in production but never bind: the loads come from one
            // client on one address. `BENCH_LIMITS=off` leaves the checks out altogether.
            rate_limit_client_per_sec: limits_rate(),
            rate_limit_client_burst: 1_000_000,
            rate_limit_ip_per_sec: limits_rate(),
            rate_limit_ip_burst: 1_000_000,
            ..Settings::default()
        })
        .validate()
        .unwrap();
        // Logs and traces as the binary installs them (no OTLP endpoint: nothing exported),
        // so that their cost is in the figures; BENCH_TELEMETRY=off leaves them out, to
        // measure that cost.
        static TELEMETRY: std::sync::OnceLock<Option<issuer::telemetry::Telemetry>> =
            std::sync::OnceLock::new();
        TELEMETRY.get_or_init(|| {
            if std::env::var("BENCH_TELEMETRY").is_ok_and(|v| v == "off") {
                return None;
            }
            let quiet = Settings {
                log_level: "warn".into(),
                ..settings.clone()
            };
            Some(
                server_rt
                    .block_on(async {
                        issuer::telemetry::init(&quiet, issuer::telemetry::LogTo::Stderr)
                    })
                    .unwrap(),
            )
        });
        let app = Arc::new(server_rt.block_on(App::build(settings)).unwrap());
        let creds = server_rt.block_on(async {
            let t = admin::create_tenant(&app, "bench").await.unwrap();
            admin::create_client(&app, t.id, &Scope::ALL).await.unwrap()
        });
        server_rt.spawn(issuer::serve(app.clone(), listener, std::future::pending()));
        let base = format!("http://{addr}");
        let token = server_rt.block_on(async {
            let res: Value = reqwest::Client::new()
                .post(format!("{base}/issuer/oauth/token"))
                .basic_auth(&creds.client_id, Some(&creds.client_secret))
                .form(&[("grant_type", "client_credentials")])
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            res["access_token"].as_str().unwrap().to_owned()
        });
        Self {
            base,
            db_url,
            creds,
            token,
            server_rt,
            app,
            admin_url,
            db_name,
        }
    }

    /// The running service, for what a benchmark measures in process.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops the service and drops the database.
    pub fn finish(self) {
        let Self {
            server_rt,
            app,
            admin_url,
            db_name,
            ..
        } = self;
        server_rt.block_on(async {
            drop(app);
            if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await {
                let sql = format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)");
                let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
            }
        });
        server_rt.shutdown_timeout(Duration::from_secs(1));
    }
}

/// pgbench running the service's single-create statement, one create per transaction, on
/// `conns` connections for `secs`, against the tenant `tenant` of `db_url`.
pub fn pgbench(db_url: &str, tenant: &str, conns: usize, secs: u64) -> Stage {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("create.sql");
    // The service's create statement: the issuance row, its first event, its webhook outbox
    // rows (none here: the tenant has no endpoints) and its email outbox row (none: delivery
    // `none`), atomically.
    // The payload is a bound parameter, as the service binds it, so Postgres parses it on every
    // execution; a literal would be parsed once when the statement is prepared.
    // (pgbench reads `:name` as a variable, hence the grant-type URN built with chr(58).)
    std::fs::write(
        &script,
        format!(
            "WITH i AS (INSERT INTO issuances (tenant_id, id, client_request_id, request_fingerprint,
  credential_configuration_id, status, payload, delivery, grant_type, offer_id,
  pre_authorized_code_hash, pre_authorized_code_sealed, expires_at, created_at, updated_at)
  VALUES ('{tenant}', gen_random_uuid(), 'pgb-' || gen_random_uuid(), md5(random()::text) || md5(random()::text),
  'learcredential.employee.sd.1', 'pending', CAST(:payload AS jsonb), 'none',
  replace('urn;ietf;params;oauth;grant-type;pre-authorized_code', ';', chr(58)), md5(random()::text), md5(random()::text),
  md5(random()::text) || md5(random()::text), now() + interval '1 day', now(), now())
  ON CONFLICT (tenant_id, client_request_id) DO NOTHING RETURNING tenant_id, id),
e AS (INSERT INTO issuance_events (tenant_id, issuance_id, sequence, kind, status, occurred_at)
  SELECT tenant_id, id, 1, 'created', 'pending', now() FROM i),
d AS (INSERT INTO webhook_deliveries (tenant_id, id, endpoint_id, issuance_id, sequence,
  event_type, message_id, payload, state, attempts, next_attempt_at, created_at, updated_at)
  SELECT ep.tenant_id, gen_random_uuid(), ep.id, i.id, 1, 'issuance.created', md5(random()::text),
  '{{}}'::jsonb, 'pending', 0, now(), now(), now() FROM i JOIN webhook_endpoints ep
  ON ep.tenant_id = i.tenant_id WHERE ep.enabled
  AND 'issuance.created' = ANY(string_to_array(ep.event_types, ' '))),
m AS (INSERT INTO email_deliveries (tenant_id, issuance_id, state, attempts, next_attempt_at,
  created_at, updated_at) SELECT tenant_id, id, 'pending', 0, now(), now(), now() FROM i
  WHERE CAST(:delivery AS text) = 'email')
SELECT id FROM i;
"
        ),
    )
    .unwrap();
    let prefix = dir.path().join("log");
    let started = Instant::now();
    let out = std::process::Command::new("pgbench")
        .args([
            "-n",
            "-M",
            "prepared",
            "-c",
            &conns.to_string(),
            "-j",
            "2",
            "-T",
            &secs.to_string(),
            "-D",
            &format!("payload={}", payload()),
            "-D",
            "delivery=none",
        ])
        .arg("-f")
        .arg(&script)
        .arg("-l")
        .arg(format!("--log-prefix={}", prefix.display()))
        .arg(db_url)
        .output()
        .expect("pgbench is installed (postgresql-client)");
    assert!(
        out.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("log")
        {
            for line in std::fs::read_to_string(path).unwrap().lines() {
                // client_id transaction_no time_us script_no time_epoch time_us_fraction
                if let Some(us) = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    latencies.push(Duration::from_micros(us));
                }
            }
        }
    }
    Stage {
        name: format!("pgbench same SQL, {conns} conns"),
        ops: latencies.len(),
        secs: started
            .elapsed()
            .as_secs_f64()
            .min(secs as f64 + 0.5)
            .max(secs as f64),
        latencies,
    }
}

/// Milliseconds at quantile `p` of `samples`.
pub fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    let mut s = samples.to_vec();
    s.sort();
    if s.is_empty() {
        return f64::NAN;
    }
    s[((s.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

/// The budget rate of the bench service: 1,000,000/s (checked, never binding), or 0 (no
/// checks) with `BENCH_LIMITS=off`.
fn limits_rate() -> u32 {
    if std::env::var("BENCH_LIMITS").is_ok_and(|v| v == "off") {
        0
    } else {
        1_000_000
    }
}

/// The figures of one load.
pub struct Stage {
    pub name: String,
    pub ops: usize,
    pub secs: f64,
    pub latencies: Vec<Duration>,
}

impl Stage {
    /// Folds the rounds of one kind into one figure: total operations over total time.
    pub fn merge(name: String, rounds: Vec<Stage>) -> Stage {
        let mut out = Stage {
            name,
            ops: 0,
            secs: 0.0,
            latencies: Vec::new(),
        };
        for r in rounds {
            out.ops += r.ops;
            out.secs += r.secs;
            out.latencies.extend(r.latencies);
        }
        out
    }

    pub fn rate(&self) -> f64 {
        self.ops as f64 / self.secs
    }

    pub fn pct(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies, p)
    }

    pub fn print(&self) {
        println!(
            "{:<34} {:>9.0} /s   p50 {:>7.2} ms   p99 {:>7.2} ms   ({} ops)",
            self.name,
            self.rate(),
            self.pct(0.50),
            self.pct(0.99),
            self.ops
        );
    }
}

/// Runs `conns` workers for `secs`, each calling `op(worker, seq)` in a loop.
pub async fn drive<F, Fut>(name: String, conns: usize, secs: u64, op: F) -> Stage
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..conns {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                assert!(op(w, seq).await, "a request failed during the benchmark");
                lat.push(t.elapsed());
                seq += 1;
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    Stage {
        name,
        ops: latencies.len(),
        secs: start.elapsed().as_secs_f64(),
        latencies,
    }
}
