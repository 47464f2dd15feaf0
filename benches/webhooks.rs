//! Webhook delivery: throughput to a local receiver and the latency from a state change to
//! the receiver having the webhook.
//!
//! Run with `scripts/bench.sh` or `cargo bench --bench webhooks` (Postgres and Redis on
//! 127.0.0.1). The service (release build, in this process on its own runtime) has one
//! endpoint, an HTTP receiver in this process answering 200. `BENCH_WEBHOOKS` (default 2000)
//! issuances are created, then cancelled by `BENCH_CONCURRENCY` (default 16) callers; each
//! cancel commits an `issuance.rejected` webhook in its transaction.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, http::HeaderMap, routing::post};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, env_or, percentile_ms};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

fn main() {
    let n: usize = env_or("BENCH_WEBHOOKS", "2000").parse().unwrap();
    let concurrency: usize = env_or("BENCH_CONCURRENCY", "16").parse().unwrap();
    let service = BenchService::start_with("webhooks", |s| issuer::Settings {
        webhook_allow_networks: "127.0.0.0/8".into(),
        webhook_concurrency: 64,
        webhook_timeout_ms: 30_000,
        ..s
    });
    // Open: the receiver answers at once; closed: it holds requests until opened.
    let (gate, gate_rx) = tokio::sync::watch::channel(true);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let arrivals: Arrivals = Arc::default();
    let receiver = rt.block_on(async {
        let arrivals = arrivals.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap| {
                let (arrivals, mut gate) = (arrivals.clone(), gate_rx.clone());
                async move {
                    let _ = gate.wait_for(|open| *open).await;
                    if let Some(id) = headers.get("webhook-id").and_then(|v| v.to_str().ok()) {
                        arrivals
                            .lock()
                            .unwrap()
                            .entry(id.to_owned())
                            .or_insert_with(Instant::now);
                    }
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    });

    let http = reqwest::Client::new();
    let (base, token) = (service.base.clone(), service.token.clone());
    rt.block_on(async {
        let res = http
            .post(format!("{base}/issuer/api/v1/webhook-endpoints"))
            .bearer_auth(&token)
            .json(&json!({"url": receiver}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201, "endpoint registration");
    });
    let create = |count: usize, prefix: &str| -> Vec<String> {
        rt.block_on(async {
            let mut ids = Vec::new();
            for i in 0..count {
                let res: Value = http
                    .post(format!("{base}/issuer/api/v1/issuances"))
                    .bearer_auth(&token)
                    .json(&json!({
                        "client_request_id": format!("{prefix}-{i}"),
                        "credential_configuration_id": "learcredential.employee.sd.1",
                        "payload": {
                            "mandator": {"organizationIdentifier": "VATES-B12345678"},
                            "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@acme.example"},
                            "power": [{"function": "Onboarding", "action": "Execute"}]
                        }
                    }))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                ids.push(res["issuance_id"].as_str().unwrap().to_owned());
            }
            ids
        })
    };
    let cancel_all = |ids: Vec<String>, callers: usize| -> HashMap<String, Instant> {
        rt.block_on(async {
            let queue = Arc::new(tokio::sync::Mutex::new(ids));
            let mut tasks = Vec::new();
            for _ in 0..callers {
                let (queue, http, base, token) =
                    (queue.clone(), http.clone(), base.clone(), token.clone());
                tasks.push(tokio::spawn(async move {
                    let mut done = Vec::new();
                    loop {
                        let Some(id) = queue.lock().await.pop() else {
                            break;
                        };
                        let res = http
                            .post(format!("{base}/issuer/api/v1/issuances/{id}/cancel"))
                            .bearer_auth(&token)
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(res.status(), 200);
                        done.push((id, Instant::now()));
                    }
                    done
                }));
            }
            let mut all = HashMap::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        })
    };
    let wait_for = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(120);
        while arrivals.lock().unwrap().len() < count {
            assert!(
                Instant::now() < deadline,
                "not every webhook arrived within 120 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let msg_id = |issuance: &str| format!("msg_{}_2", issuance.replace('-', ""));

    println!("issuer webhook benchmark: issuance.rejected webhooks to one local receiver");
    let latency_n: usize = env_or("BENCH_LATENCY_WEBHOOKS", "300").parse().unwrap();
    let ids = create(latency_n, "webhook-latency");
    let cancelled = cancel_all(ids, 4);
    wait_for(latency_n);
    let latencies: Vec<Duration> = {
        let arrivals = arrivals.lock().unwrap();
        cancelled
            .iter()
            .map(|(id, at)| arrivals[&msg_id(id)].saturating_duration_since(*at))
            .collect()
    };
    println!(
        "state change -> webhook received ({latency_n} cancels, 4 callers): p50 {:.1} ms, p99 {:.1} ms",
        percentile_ms(&latencies, 0.50),
        percentile_ms(&latencies, 0.99)
    );

    gate.send_replace(false);
    let ids = create(n, "webhook-throughput");
    let started = Instant::now();
    let backlog = cancel_all(ids, concurrency);
    println!(
        "backlog of {n} built by {concurrency} callers in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let released = Instant::now();
    gate.send_replace(true);
    wait_for(latency_n + n);
    let last = {
        let arrivals = arrivals.lock().unwrap();
        backlog
            .keys()
            .map(|id| arrivals[&msg_id(id)])
            .max()
            .unwrap()
    };
    let secs = (last - released).as_secs_f64();
    println!(
        "{n} backlogged webhooks delivered in {secs:.2} s: {:.0} deliveries/s",
        n as f64 / secs
    );
    drop(rt);
    service.finish();
}
