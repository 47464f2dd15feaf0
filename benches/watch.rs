//! Many open `WatchIssuance` streams against one service process: its resident memory while
//! they are held open, and how fast an outcome reaches all of them.
//!
//! Run with `scripts/bench.sh` or `cargo bench --bench watch` (Postgres and Redis on
//! 127.0.0.1). The service is the release binary in its own process, so its RSS is its own.
//! `BENCH_STREAMS` (default 5000) streams watch `BENCH_ISSUANCES` (default 50) issuances over
//! `BENCH_CHANNELS` (default 50) HTTP/2 connections; then every issuance is cancelled and the
//! time from each cancel's response to each watcher's receipt of the outcome is measured.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use issuer::grpc::pb::{
    CancelIssuanceRequest, CreateIssuanceRequest, WatchIssuanceRequest,
    issuance_service_client::IssuanceServiceClient, watch_issuance_response::Item,
};
use serde_json::Value;
use tonic::transport::Channel;

mod common;

use common::{env_or, percentile_ms};

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn authed<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn main() {
    let streams: usize = env_or("BENCH_STREAMS", "5000").parse().unwrap();
    let issuances: usize = env_or("BENCH_ISSUANCES", "50").parse().unwrap();
    let channels: usize = env_or("BENCH_CHANNELS", "50").parse().unwrap();
    let admin_url = env_or(
        "TEST_DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let redis_url = env_or("TEST_REDIS_URL", "redis://127.0.0.1:6379");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let db_name = format!("issuer_bench_watch_{}", std::process::id());
    let db_url = format!("{}/{db_name}", admin_url.rsplit_once('/').unwrap().0);
    rt.block_on(async {
        let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut c)
            .await
            .unwrap();
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let env = [
        ("ISSUER_LISTEN_ADDR", format!("127.0.0.1:{port}")),
        ("ISSUER_PUBLIC_URL", base.clone()),
        ("ISSUER_DATABASE_URL", db_url.clone()),
        ("ISSUER_REDIS_URL", redis_url),
        (
            "ISSUER_SECRET_KEY",
            issuer_auth::ServerSecret::generate_text(),
        ),
        (
            "ISSUER_TOKEN_SIGNING_KEY",
            issuer_auth::SigningKey::generate().to_pem(),
        ),
        (
            "ISSUER_CREDENTIAL_SIGNING_KEY",
            issuer_auth::SigningKey::generate().to_pem(),
        ),
        ("ISSUER_LOG_LEVEL", "warn".to_owned()),
        ("ISSUER_RATE_LIMIT_CLIENT_PER_SEC", "0".to_owned()),
        ("ISSUER_RATE_LIMIT_IP_PER_SEC", "0".to_owned()),
        ("ISSUER_METRICS_ADDR", "127.0.0.1:0".to_owned()),
    ];
    let bin = env!("CARGO_BIN_EXE_issuer");
    let cli = |args: &[&str]| -> Value {
        let out = Command::new(bin)
            .args(args)
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().rev().find(|l| l.starts_with('{')).unwrap()).unwrap()
    };
    let tenant = cli(&["tenant", "create", "--name", "bench", "--output", "json"]);
    let client = cli(&[
        "client",
        "create",
        "--tenant",
        tenant["tenant_id"].as_str().unwrap(),
        "--scopes",
        "issuance:write,issuance:read",
        "--output",
        "json",
    ]);
    let service = Service(
        Command::new(bin)
            .envs(env.iter().cloned())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = service.0.id();

    rt.block_on(async {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http.get(format!("{base}/readyz")).send().await.map(|r| r.status() != 200).unwrap_or(true) {
            assert!(Instant::now() < deadline, "the service did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let token: Value = http
            .post(format!("{base}/issuer/oauth/token"))
            .basic_auth(client["client_id"].as_str().unwrap(), client["client_secret"].as_str())
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = token["access_token"].as_str().unwrap().to_owned();

        let mut clients = Vec::new();
        for _ in 0..channels {
            let ch = Channel::from_shared(base.clone()).unwrap().connect().await.unwrap();
            clients.push(IssuanceServiceClient::new(ch));
        }
        let mut ids = Vec::new();
        for i in 0..issuances {
            let payload = serde_json::json!({
                "mandator": {"organizationIdentifier": "VATES-B12345678"},
                "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@acme.example"},
                "power": [{"function": "Onboarding", "action": "Execute"}]
            });
            let created = clients[0]
                .clone()
                .create_issuance(authed(
                    &token,
                    CreateIssuanceRequest {
                        client_request_id: format!("watch-bench-{i}"),
                        credential_configuration_id: "learcredential.employee.sd.1".into(),
                        payload: Some(issuer::grpc::structs::json_to_struct(payload.as_object().unwrap())),
                        ..Default::default()
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            ids.push(created.issuance_id);
        }
        let rss_before = rss_kib(pid);

        // Open every stream and wait for its history (the `created` event).
        let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(streams);
        let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<(usize, Instant)>(streams);
        for s in 0..streams {
            let mut client = clients[s % channels].clone();
            let (token, id) = (token.clone(), ids[s % issuances].clone());
            let (opened_tx, done_tx) = (opened_tx.clone(), done_tx.clone());
            tokio::spawn(async move {
                let mut stream = client
                    .watch_issuance(authed(&token, WatchIssuanceRequest { issuance_id: id, after_sequence: 0 }))
                    .await
                    .unwrap()
                    .into_inner();
                while let Ok(Some(msg)) = stream.message().await {
                    if let Some(Item::Event(e)) = msg.item {
                        if e.sequence == 1 {
                            let _ = opened_tx.send(()).await;
                        }
                        if e.state() != issuer::grpc::pb::issuance::State::Pending {
                            let _ = done_tx.send((s % issuances, Instant::now())).await;
                        }
                    }
                }
            });
        }
        let started = Instant::now();
        for _ in 0..streams {
            opened_rx.recv().await.unwrap();
        }
        let open_secs = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let rss_open = rss_kib(pid);

        let mut cancelled_at = Vec::new();
        for id in &ids {
            clients[0]
                .clone()
                .cancel_issuance(authed(&token, CancelIssuanceRequest { issuance_id: id.clone() }))
                .await
                .unwrap();
            cancelled_at.push(Instant::now());
        }
        let mut lat = Vec::new();
        for _ in 0..streams {
            let (issuance, at) = tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
                .await
                .expect("every watcher receives the outcome")
                .unwrap();
            lat.push(at.saturating_duration_since(cancelled_at[issuance]));
        }
        println!("issuer watch benchmark: {streams} WatchIssuance streams on {issuances} issuances over {channels} HTTP/2 connections");
        println!("opened and received history in {open_secs:.2} s");
        println!(
            "service RSS: {:.1} MiB before, {:.1} MiB with {streams} streams open ({:.1} KiB per stream)",
            rss_before as f64 / 1024.0,
            rss_open as f64 / 1024.0,
            (rss_open.saturating_sub(rss_before)) as f64 / streams as f64
        );
        println!(
            "cancel -> outcome at every watcher: p50 {:.2} ms, p99 {:.2} ms",
            percentile_ms(&lat, 0.50),
            percentile_ms(&lat, 0.99)
        );
    });
    drop(service);
    rt.block_on(async {
        if let Ok(mut c) = <sqlx::PgConnection as sqlx::Connection>::connect(&admin_url).await {
            let sql = format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut c).await;
        }
    });
}
