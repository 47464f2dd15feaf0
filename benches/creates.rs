//! Create throughput and latency over REST and gRPC, against pgbench running the equivalent SQL
//! transaction on the same database in the same run.
//!
//! Run with `scripts/bench.sh` (Postgres and Redis on 127.0.0.1). Settings by environment:
//! `BENCH_SECS` (per load and round, default 5), `BENCH_ROUNDS` (default 3),
//! `BENCH_CONNECTIONS` (default `16,64`),
//! `TEST_DATABASE_URL`, `TEST_REDIS_URL`. The service runs in this process on its own runtime;
//! the load generator and pgbench share the machine with it, as they would any benchmark here.

use std::sync::Arc;

use issuer::grpc::{
    pb::{CreateIssuanceRequest, issuance_service_client::IssuanceServiceClient},
    structs::json_to_struct,
};
use serde_json::json;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, Stage, drive, env_or, payload, pgbench};

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
