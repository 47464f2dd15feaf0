//! What the hardening costs, measured in one run on this machine:
//!
//! 1. REST creates against two services of the same build side by side, one checking every
//!    request against its rate-limit budgets (in Redis, as in production, with budgets large
//!    enough never to refuse the benchmark's one client and address) and one with limits off.
//!    Both have the same listener with its timeouts and caps. Rounds alternate the two.
//! 2. Repeated reads of one offer (what a wallet and a landing page fetch, anonymous) against
//!    `GetIssuance` of the same issuance over REST and gRPC, on the service with limits on.
//!
//! Run with `scripts/bench.sh`. Settings by environment: `BENCH_SECS` (per load and round,
//! default 5), `BENCH_ROUNDS` (default 3), `BENCH_CONNECTIONS` (default 64).

use std::sync::Arc;

use issuer::grpc::pb::{GetIssuanceRequest, issuance_service_client::IssuanceServiceClient};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, Stage, clients, drive, env_or, payload};

fn creates(
    rt: &tokio::runtime::Runtime,
    service: &BenchService,
    label: &str,
    conns: usize,
    secs: u64,
    round: usize,
) -> Stage {
    let (base, token, clients) = (service.base.clone(), service.token.clone(), clients(conns));
    let label = label.to_owned();
    rt.block_on(drive(
        format!("REST creates, limits {label}"),
        conns,
        secs,
        move |w, seq| {
            let (clients, base, token, label) =
                (clients.clone(), base.clone(), token.clone(), label.clone());
            async move {
                let body = json!({
                    "client_request_id": format!("{label}-{round}-{w}-{seq}"),
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
    ))
}

/// Repeated GETs of `url`, with `token` when given.
fn reads(
    rt: &tokio::runtime::Runtime,
    name: String,
    url: String,
    token: Option<String>,
    conns: usize,
    secs: u64,
) -> Stage {
    let clients = clients(conns);
    rt.block_on(drive(name, conns, secs, move |w, _| {
        let (clients, url, token) = (clients.clone(), url.clone(), token.clone());
        async move {
            let mut req = clients[w].get(&url);
            if let Some(t) = &token {
                req = req.bearer_auth(t);
            }
            matches!(req.send().await, Ok(r) if r.status() == 200)
        }
    }))
}

fn grpc_gets(
    rt: &tokio::runtime::Runtime,
    service: &BenchService,
    id: &str,
    conns: usize,
    secs: u64,
) -> Stage {
    let (base, token, id) = (service.base.clone(), service.token.clone(), id.to_owned());
    rt.block_on(async move {
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
        drive(
            format!("gRPC GetIssuance, {conns} conns"),
            conns,
            secs,
            move |w, _| {
                let mut client = channels[w].clone();
                let (token, id) = (token.clone(), id.clone());
                async move {
                    let mut req = tonic::Request::new(GetIssuanceRequest { issuance_id: id });
                    req.metadata_mut()
                        .insert("authorization", format!("Bearer {token}").parse().unwrap());
                    client.get_issuance(req).await.is_ok()
                }
            },
        )
        .await
    })
}

fn main() {
    let secs: u64 = env_or("BENCH_SECS", "5").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let conns: usize = env_or("BENCH_CONNECTIONS", "64").parse().unwrap();
    // Budgets checked on every request but never binding: one client, one address.
    let limited = BenchService::start_with("hardening_on", |s| issuer::Settings {
        rate_limit_client_per_sec: 1_000_000,
        rate_limit_client_burst: 1_000_000,
        rate_limit_ip_per_sec: 1_000_000,
        rate_limit_ip_burst: 1_000_000,
        ..s
    });
    let unlimited = BenchService::start_with("hardening_off", |s| issuer::Settings {
        rate_limit_client_per_sec: 0,
        rate_limit_ip_per_sec: 0,
        ..s
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    println!(
        "issuer hardening benchmark: {rounds} rounds of {secs} s per load, {conns} connections, service and clients on this machine ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let (mut on, mut off) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Alternate which goes first, so that drift in the machine's load hits both alike.
        let (a, b) = if round % 2 == 0 {
            let a = creates(&rt, &limited, "on", conns, secs, round);
            (a, creates(&rt, &unlimited, "off", conns, secs, round))
        } else {
            let b = creates(&rt, &unlimited, "off", conns, secs, round);
            (creates(&rt, &limited, "on", conns, secs, round), b)
        };
        println!(
            "  round {}: limits on {:.0}/s, off {:.0}/s",
            round + 1,
            a.rate(),
            b.rate()
        );
        on.push(a);
        off.push(b);
    }
    let on = Stage::merge(format!("REST creates, limits on, {conns} conns"), on);
    let off = Stage::merge(format!("REST creates, limits off, {conns} conns"), off);

    // One issuance and its offer, fetched once first as a wallet would.
    let (id, offer_url) = rt.block_on(async {
        let res: Value = reqwest::Client::new()
            .post(format!("{}/issuer/api/v1/issuances", limited.base))
            .bearer_auth(&limited.token)
            .json(&json!({
                "client_request_id": "offer-reads",
                "credential_configuration_id": "learcredential.employee.sd.1",
                "payload": payload(),
            }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let uri = res["credential_offer_uri"].as_str().unwrap();
        let encoded = uri.split_once("credential_offer_uri=").unwrap().1;
        let url = encoded.replace("%3A", ":").replace("%2F", "/");
        (res["issuance_id"].as_str().unwrap().to_owned(), url)
    });
    let (mut offers, mut gets, mut grpcs) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let offer = reads(
            &rt,
            "offer GET".into(),
            offer_url.clone(),
            None,
            conns,
            secs,
        );
        let get = reads(
            &rt,
            "GetIssuance REST".into(),
            format!("{}/issuer/api/v1/issuances/{id}", limited.base),
            Some(limited.token.clone()),
            conns,
            secs,
        );
        let grpc = grpc_gets(&rt, &limited, &id, conns, secs);
        println!(
            "  round {}: offer GET {:.0}/s, GetIssuance REST {:.0}/s, gRPC {:.0}/s",
            round + 1,
            offer.rate(),
            get.rate(),
            grpc.rate()
        );
        offers.push(offer);
        gets.push(get);
        grpcs.push(grpc);
    }
    let offers = Stage::merge(format!("offer GET (anonymous), {conns} conns"), offers);
    let gets = Stage::merge(format!("GetIssuance REST, {conns} conns"), gets);
    let grpcs = Stage::merge(format!("GetIssuance gRPC, {conns} conns"), grpcs);

    println!();
    for s in [&on, &off, &offers, &gets, &grpcs] {
        s.print();
    }
    println!(
        "cost of rate limiting: creates with limits on / off = {:.3} (p99 {:.2} ms vs {:.2} ms)",
        on.rate() / off.rate(),
        on.pct(0.99),
        off.pct(0.99)
    );
    println!(
        "offer reads / GetIssuance: REST {:.2}, gRPC {:.2} (p99 {:.2} ms vs {:.2} ms, {:.2} ms)",
        offers.rate() / gets.rate(),
        offers.rate() / grpcs.rate(),
        offers.pct(0.99),
        gets.pct(0.99),
        grpcs.pct(0.99)
    );
    drop(rt);
    limited.finish();
    unlimited.finish();
}
