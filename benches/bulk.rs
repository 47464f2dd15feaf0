//! Bulk issuance: creates per second through batches over REST and through the
//! `ImportIssuances` stream, against single REST creates and pgbench running the single-create
//! statement one create per transaction, in the same run; then an import of 100,000 items and
//! how much the process grew meanwhile.
//!
//! Run with `scripts/bench.sh` (Postgres and Redis on 127.0.0.1). Settings by environment:
//! `BENCH_SECS` (per load and round, default 5), `BENCH_ROUNDS` (default 3), `BENCH_BATCH`
//! (items per batch, default 500), `BENCH_BATCH_CALLS` (batches in flight, default 4),
//! `BENCH_CONNECTIONS` (single creates and pgbench, default 64), `BENCH_IMPORT_ITEMS` (default
//! 100000). The service runs in this process on its own runtime; the RSS figure is the whole
//! process (service and load generator), so it bounds the service's growth from above.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt;
use issuer::grpc::{
    pb::{
        CreateIssuanceRequest, import_issuances_response::Outcome,
        issuance_service_client::IssuanceServiceClient,
    },
    structs::json_to_struct,
};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, Stage, drive, env_or, payload, pgbench};

fn create_body(key: String) -> Value {
    json!({
        "client_request_id": key,
        "credential_configuration_id": "learcredential.employee.sd.1",
        "payload": payload(),
    })
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

async fn grpc_client(base: &str) -> IssuanceServiceClient<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(base.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    IssuanceServiceClient::new(channel)
}

/// One `ImportIssuances` stream of `items` creates keyed `{prefix}-{n}`, generated as they are
/// sent; `(created, seconds)`. Every item must be created.
async fn import(base: &str, token: &str, prefix: String, items: u64) -> (u64, f64) {
    let mut client = grpc_client(base).await;
    let payload = json_to_struct(payload().as_object().unwrap());
    let outbound = futures::stream::iter(0..items).map(move |n| CreateIssuanceRequest {
        client_request_id: format!("{prefix}-{n}"),
        credential_configuration_id: "learcredential.employee.sd.1".into(),
        payload: Some(payload.clone()),
        ..Default::default()
    });
    let mut request = tonic::Request::new(outbound);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let started = Instant::now();
    let mut answers = client.import_issuances(request).await.unwrap().into_inner();
    let mut created = 0;
    while let Some(answer) = answers.message().await.unwrap() {
        assert!(
            matches!(answer.outcome, Some(Outcome::Issuance(_))) && !answer.replayed,
            "an import item failed: {answer:?}"
        );
        created += 1;
    }
    assert_eq!(created, items, "one answer per item");
    (created, started.elapsed().as_secs_f64())
}

fn main() {
    let secs: u64 = env_or("BENCH_SECS", "5").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let batch: usize = env_or("BENCH_BATCH", "500").parse().unwrap();
    let calls: usize = env_or("BENCH_BATCH_CALLS", "4").parse().unwrap();
    let conns: usize = env_or("BENCH_CONNECTIONS", "64").parse().unwrap();
    let import_items: u64 = env_or("BENCH_IMPORT_ITEMS", "100000").parse().unwrap();
    let service = BenchService::start("bulk");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    let (base, token, db_url) = (
        service.base.clone(),
        service.token.clone(),
        service.db_url.clone(),
    );
    let tenant_id = service.creds.tenant_id.clone();
    println!(
        "issuer bulk benchmark: {rounds} rounds of {secs} s per load, batches of {batch} ({calls} in flight), \
         single creates and pgbench at {conns} connections, service and clients on this machine ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let (mut batches, mut streams, mut singles, mut pgs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Rounds alternate the loads so that drift in the machine's load hits all alike.
    for round in 0..rounds {
        // Batches over REST: `calls` callers, each posting a batch and waiting for its answer.
        let batched = client_rt.block_on({
            let (base, token) = (base.clone(), token.clone());
            let clients: Arc<Vec<reqwest::Client>> = Arc::new(
                (0..calls)
                    .map(|_| reqwest::Client::builder().build().unwrap())
                    .collect(),
            );
            drive(
                format!("REST batches of {batch}"),
                calls,
                secs,
                move |w, seq| {
                    let (clients, base, token) = (clients.clone(), base.clone(), token.clone());
                    async move {
                        let items: Vec<Value> = (0..batch)
                            .map(|i| create_body(format!("batch-{round}-{w}-{seq}-{i}")))
                            .collect();
                        let res = clients[w]
                            .post(format!("{base}/issuer/api/v1/issuances/batch"))
                            .bearer_auth(&token)
                            .json(&json!({ "issuances": items }))
                            .send()
                            .await;
                        let Ok(res) = res else { return false };
                        let Ok(answer) = res.json::<Value>().await else {
                            return false;
                        };
                        answer["results"].as_array().is_some_and(|r| {
                            r.len() == batch && r.iter().all(|r| r["status"] == 201)
                        })
                    }
                },
            )
        });

        // The import stream: one stream for the same time, items generated as they are sent.
        let streamed = client_rt.block_on({
            let (base, token) = (base.clone(), token.clone());
            async move {
                let done = Arc::new(AtomicBool::new(false));
                let sent = Arc::new(AtomicU64::new(0));
                let mut client = grpc_client(&base).await;
                let payload = json_to_struct(payload().as_object().unwrap());
                let outbound = {
                    let (done, sent) = (done.clone(), sent.clone());
                    futures::stream::iter(0..)
                        .take_while(move |_| std::future::ready(!done.load(Ordering::Relaxed)))
                        .map(move |n: u64| {
                            sent.fetch_add(1, Ordering::Relaxed);
                            CreateIssuanceRequest {
                                client_request_id: format!("stream-{round}-{n}"),
                                credential_configuration_id: "learcredential.employee.sd.1".into(),
                                payload: Some(payload.clone()),
                                ..Default::default()
                            }
                        })
                };
                let mut request = tonic::Request::new(outbound);
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let started = Instant::now();
                let mut answers = client.import_issuances(request).await.unwrap().into_inner();
                let stop = started + Duration::from_secs(secs);
                let mut latencies = Vec::new();
                let mut last = Instant::now();
                while let Some(answer) = answers.message().await.unwrap() {
                    assert!(
                        matches!(answer.outcome, Some(Outcome::Issuance(_))),
                        "a stream item failed: {answer:?}"
                    );
                    // Time between answers, per item.
                    latencies.push(last.elapsed());
                    last = Instant::now();
                    if Instant::now() >= stop {
                        done.store(true, Ordering::Relaxed);
                    }
                }
                Stage {
                    name: "ImportIssuances stream".into(),
                    ops: latencies.len(),
                    secs: started.elapsed().as_secs_f64(),
                    latencies,
                }
            }
        });

        // Single creates over REST, one HTTP/1.1 connection per worker.
        let single = client_rt.block_on({
            let (base, token) = (base.clone(), token.clone());
            let clients: Arc<Vec<reqwest::Client>> = Arc::new(
                (0..conns)
                    .map(|_| {
                        reqwest::Client::builder()
                            .pool_max_idle_per_host(1)
                            .build()
                            .unwrap()
                    })
                    .collect(),
            );
            drive(
                format!("REST single creates, {conns} conns"),
                conns,
                secs,
                move |w, seq| {
                    let (clients, base, token) = (clients.clone(), base.clone(), token.clone());
                    async move {
                        let res = clients[w]
                            .post(format!("{base}/issuer/api/v1/issuances"))
                            .bearer_auth(&token)
                            .json(&create_body(format!("single-{round}-{w}-{seq}")))
                            .send()
                            .await;
                        matches!(res, Ok(r) if r.status() == 201)
                    }
                },
            )
        });

        let pg = pgbench(&db_url, &tenant_id, conns, secs);
        println!(
            "  round {}: batches {:.0} creates/s, stream {:.0} creates/s, single {:.0}/s, pgbench {:.0}/s",
            round + 1,
            batched.rate() * batch as f64,
            streamed.rate(),
            single.rate(),
            pg.rate()
        );
        batches.push(batched);
        streams.push(streamed);
        singles.push(single);
        pgs.push(pg);
    }
    let batched = Stage::merge(format!("REST batches of {batch} (per batch)"), batches);
    let streamed = Stage::merge("ImportIssuances stream".into(), streams);
    let single = Stage::merge(format!("REST single creates, {conns} conns"), singles);
    let pg = Stage::merge(format!("pgbench one create per tx, {conns} conns"), pgs);
    let batch_rate = batched.rate() * batch as f64;
    println!();
    batched.print();
    println!(
        "{:<34} {:>9.0} /s",
        format!("  = creates through batches"),
        batch_rate
    );
    println!(
        "{:<34} {:>9.0} /s   (gap between answers p99 {:.2} ms)",
        streamed.name,
        streamed.rate(),
        streamed.pct(0.99)
    );
    single.print();
    pg.print();
    println!(
        "ratio to pgbench one-create-per-tx: batches {:.2}, stream {:.2}, single creates {:.2}\n",
        batch_rate / pg.rate(),
        streamed.rate() / pg.rate(),
        single.rate() / pg.rate()
    );

    // The long import: RSS before, sampled during (peak), and after.
    let before = rss();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        std::thread::spawn(move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let (created, took) = client_rt.block_on(import(&base, &token, "import".into(), import_items));
    sampling.store(false, Ordering::Relaxed);
    sampler.join().unwrap();
    let after = rss();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "import of {created} items over one stream: {took:.1} s, {:.0} creates/s; process RSS {:.1} MiB before, \
         peak {:.1} MiB (growth {:.1} MiB), {:.1} MiB after",
        created as f64 / took,
        mib(before),
        mib(peak.load(Ordering::Relaxed)),
        mib(peak.load(Ordering::Relaxed).saturating_sub(before)),
        mib(after)
    );

    service.finish();
}
