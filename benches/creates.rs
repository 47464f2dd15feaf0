//! Create throughput and latency over REST and gRPC, against pgbench running the equivalent SQL
//! transaction on the same database in the same run.
//!
//! Run with `scripts/bench.sh` (Postgres and Redis on 127.0.0.1). Settings by environment:
//! `BENCH_SECS` (per load and round, default 5), `BENCH_ROUNDS` (default 3),
//! `BENCH_CONNECTIONS` (default `16,64`),
//! `TEST_DATABASE_URL`, `TEST_REDIS_URL`. The service runs in this process on its own runtime;
//! the load generator and pgbench share the machine with it, as they would any benchmark here.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use issuer::grpc::{
    pb::{CreateIssuanceRequest, issuance_service_client::IssuanceServiceClient},
    structs::json_to_struct,
};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, Stage, drive, env_or, payload};

fn pgbench(db_url: &str, tenant: &str, conns: usize, secs: u64) -> Stage {
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

fn main() {
    let secs: u64 = env_or("BENCH_SECS", "5").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let conn_list: Vec<usize> = env_or("BENCH_CONNECTIONS", "16,64")
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let service = BenchService::start("creates");
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
        "issuer create benchmark: {rounds} rounds of {secs} s per load, service and clients on this machine ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    for &conns in &conn_list {
        let (mut rests, mut grpcs, mut pgs) = (Vec::new(), Vec::new(), Vec::new());
        // Rounds alternate the three loads so that drift in the machine's load hits all alike.
        for round in 0..rounds {
            // REST: one HTTP/1.1 connection per worker.
            let rest = client_rt.block_on({
                let (base, token) = (base.clone(), token.clone());
                let clients: Vec<reqwest::Client> = (0..conns)
                    .map(|_| {
                        reqwest::Client::builder()
                            .pool_max_idle_per_host(1)
                            .build()
                            .unwrap()
                    })
                    .collect();
                let clients = Arc::new(clients);
                drive(
                    format!("REST creates, {conns} conns"),
                    conns,
                    secs,
                    move |w, seq| {
                        let (clients, base, token) = (clients.clone(), base.clone(), token.clone());
                        async move {
                            let body = json!({
                                "client_request_id": format!("rest-{conns}-{round}-{w}-{seq}"),
                                "credential_configuration_id": "learcredential.employee.sd.1",
                                "payload": payload(),
                            });
                            let res = clients[w]
                                .post(format!("{base}/issuer/api/v1/issuances"))
                                .bearer_auth(&token)
                                .json(&body)
                                .send()
                                .await;
                            matches!(res, Ok(r) if r.status() == 201)
                        }
                    },
                )
            });

            // gRPC: one HTTP/2 connection per worker.
            let grpc = client_rt.block_on({
                let (base, token) = (base.clone(), token.clone());
                async move {
                    let mut channels = Vec::new();
                    for _ in 0..conns {
                        let ch = tonic::transport::Channel::from_shared(base.clone())
                            .unwrap()
                            .connect()
                            .await
                            .unwrap();
                        channels.push(IssuanceServiceClient::new(ch));
                    }
                    let channels = Arc::new(channels);
                    let payload = json_to_struct(payload().as_object().unwrap());
                    drive(
                        format!("gRPC creates, {conns} conns"),
                        conns,
                        secs,
                        move |w, seq| {
                            let mut client = channels[w].clone();
                            let (token, payload) = (token.clone(), payload.clone());
                            async move {
                                let mut req = tonic::Request::new(CreateIssuanceRequest {
                                    client_request_id: format!("grpc-{conns}-{round}-{w}-{seq}"),
                                    credential_configuration_id: "learcredential.employee.sd.1"
                                        .into(),
                                    payload: Some(payload),
                                    ..Default::default()
                                });
                                req.metadata_mut().insert(
                                    "authorization",
                                    format!("Bearer {token}").parse().unwrap(),
                                );
                                client.create_issuance(req).await.is_ok()
                            }
                        },
                    )
                    .await
                }
            });

            let pg = pgbench(&db_url, &tenant_id, conns, secs);
            println!(
                "  round {}: REST {:.0}/s, gRPC {:.0}/s, pgbench {:.0}/s",
                round + 1,
                rest.rate(),
                grpc.rate(),
                pg.rate()
            );
            rests.push(rest);
            grpcs.push(grpc);
            pgs.push(pg);
        }
        let rest = Stage::merge(format!("REST creates, {conns} conns"), rests);
        let grpc = Stage::merge(format!("gRPC creates, {conns} conns"), grpcs);
        let pg = Stage::merge(format!("pgbench same SQL, {conns} conns"), pgs);
        rest.print();
        grpc.print();
        pg.print();
        println!(
            "ratio at {conns} conns: REST/pgbench {:.2}, gRPC/pgbench {:.2}\n",
            rest.rate() / pg.rate(),
            grpc.rate() / pg.rate()
        );
    }

    service.finish();
}
