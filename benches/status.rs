//! Credential status, measured in one run on this machine:
//!
//! 1. Serving a cached status list (`GET /issuer/status-lists/{id}`, a default-size list of
//!    131,072 entries with 1 % revoked) against `GetIssuance` over REST, same connections.
//! 2. Revocations per second: `POST /issuer/api/v1/issuances/{id}/revoke`, each of a different
//!    accepted issuance, on `BENCH_CONNECTIONS` connections (every revocation a transaction of
//!    the issuance, its entries, the event and its webhook outbox row, then an announcement).
//! 3. Rebuilding a 1,048,576-entry list after a change (read of its non-valid entries, packing,
//!    ZLIB, signing), forced after each change, with the list holding every revocation of (2),
//!    and a full list with 10 % of its entries revoked.
//!
//! Issuances are seeded with batch creates; their credentials (one copy each) are recorded
//! in SQL, as the credential endpoint records them. The full list's entries are SQL only.
//!
//! Run with `scripts/bench.sh`. Settings by environment: `BENCH_SECS` (per load and round,
//! default 5), `BENCH_ROUNDS` (default 3), `BENCH_CONNECTIONS` (default 64).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use uuid::Uuid;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, Stage, clients, drive, env_or, payload, percentile_ms};

const BIG: i64 = 1 << 20;
const DEFAULT: i64 = 131_072;

/// `n` pending issuances of the service's tenant, by batch creates of 500; their ids.
async fn seed_pending(service: &BenchService, prefix: &str, n: usize) -> Vec<String> {
    let http = reqwest::Client::new();
    let mut ids = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(500) {
        let items: Vec<Value> = (0..500.min(n - chunk * 500))
            .map(|i| {
                json!({
                    "client_request_id": format!("{prefix}-{chunk}-{i}"),
                    "credential_configuration_id": "learcredential.employee.sd.1",
                    "payload": payload(),
                })
            })
            .collect();
        let res: Value = http
            .post(format!("{}/issuer/api/v1/issuances/batch", service.base))
            .bearer_auth(&service.token)
            .json(&json!({ "issuances": items }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for r in res["results"].as_array().unwrap() {
            ids.push(r["issuance"]["issuance_id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

/// A status list of `size` entries, all of them allocated.
async fn full_list_row(db: &sqlx::PgPool, size: i64) -> Uuid {
    let list = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO status_lists (id, size, allocated, seed, created_at) \
         VALUES ($1, $2, $2, 'AAAAAAAAAAAAAAAAAAAAAA', now())",
    )
    .bind(list)
    .bind(size)
    .execute(db)
    .await
    .unwrap();
    list
}

/// Opens a list of `size` entries and records one accepted credential per issuance of `ids`
/// on it (entries 0.. in order; the order does not matter to what is measured), `revoked` of
/// them revoked.
async fn accept_on_list(db: &sqlx::PgPool, ids: &[String], size: i64, revoked: usize) -> Uuid {
    let list = full_list_row(db, size).await;
    let ids: Vec<Uuid> = ids.iter().map(|i| i.parse().unwrap()).collect();
    sqlx::query(
        "UPDATE issuances SET status = 'accepted', payload = NULL, version = version + 1, \
         code_redeemed_at = now(), credential_status = 'valid', credentials_issued = 1, \
         credential_expires_at = now() + interval '365 days' WHERE id = ANY($1)",
    )
    .bind(&ids)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO status_entries (list_id, idx, tenant_id, issuance_id, status, updated_at) \
         SELECT $1, n - 1, i.tenant_id, i.id, CASE WHEN n <= $3 THEN 1 ELSE 0 END, now() \
         FROM unnest($2::uuid[]) WITH ORDINALITY AS u(id, n) JOIN issuances i ON i.id = u.id",
    )
    .bind(list)
    .bind(&ids)
    .bind(revoked as i64)
    .execute(db)
    .await
    .unwrap();
    list
}

/// A full list of `BIG` entries (of credentials of other issuers' tenants, as far as this
/// replica knows), each revoked with probability `share`: scattered as revocations are, which
/// compresses worse than any pattern would.
async fn full_list(db: &sqlx::PgPool, share: f64) -> Uuid {
    let list = full_list_row(db, BIG).await;
    sqlx::query(
        "INSERT INTO status_entries (list_id, idx, tenant_id, issuance_id, status, updated_at) \
         SELECT $1, n, gen_random_uuid(), gen_random_uuid(), \
         CASE WHEN random() < $3 THEN 1 ELSE 0 END, now() FROM generate_series(0, $2 - 1) n",
    )
    .bind(list)
    .bind(BIG)
    .bind(share)
    .execute(db)
    .await
    .unwrap();
    sqlx::query("ANALYZE status_entries")
        .execute(db)
        .await
        .unwrap();
    list
}

/// Rebuild times of `list` after a change: each time one entry changes (as a status change
/// writes it), the list is marked changed (as its announcement does), and the next request
/// builds the new token.
fn rebuilds(
    service: &BenchService,
    db: &sqlx::PgPool,
    list: Uuid,
    last: i64,
    n: usize,
) -> Vec<Duration> {
    let (app, db) = (service.app().clone(), db.clone());
    service.server_rt.block_on(async move {
        app.status_lists
            .token(list)
            .await
            .unwrap()
            .expect("the list");
        let mut times = Vec::new();
        for i in 0..n {
            // Entries from the list's last one down: a valid or suspended one revoked, a revoked
            // one suspended.
            sqlx::query(
                "UPDATE status_entries SET status = CASE status WHEN 1 THEN 2 ELSE 1 END, \
                 updated_at = now() WHERE list_id = $1 AND idx = $2",
            )
            .bind(list)
            .bind(last - i as i64)
            .execute(&db)
            .await
            .unwrap();
            let before = app
                .status_lists
                .token(list)
                .await
                .unwrap()
                .unwrap()
                .etag
                .clone();
            app.status_lists.changed(&[list]);
            let t = Instant::now();
            let token = app
                .status_lists
                .token(list)
                .await
                .unwrap()
                .expect("the list");
            times.push(t.elapsed());
            assert_ne!(token.etag, before, "the rebuild shows the change");
        }
        times
    })
}

fn main() {
    let secs: u64 = env_or("BENCH_SECS", "5").parse().unwrap();
    let rounds: usize = env_or("BENCH_ROUNDS", "3").parse().unwrap();
    let conns: usize = env_or("BENCH_CONNECTIONS", "64").parse().unwrap();
    let service = BenchService::start("status");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load")
        .enable_all()
        .build()
        .unwrap();
    println!(
        "issuer status benchmark: {rounds} rounds of {secs} s per load, {conns} connections, service and clients on this machine ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    // Enough accepted issuances that no revocation is a repeat: 4,000/s at most.
    let revocable = rounds * secs as usize * 4_000;
    let db = rt.block_on(sqlx::PgPool::connect(&service.db_url)).unwrap();
    let seeding = Instant::now();
    let (served_list, served_id, big_list, revocable_ids) = rt.block_on(async {
        let served = seed_pending(&service, "served", 1_311).await;
        let served_list = accept_on_list(&db, &served, DEFAULT, served.len()).await;
        let revocable_ids = seed_pending(&service, "revoke", revocable).await;
        let big_list = accept_on_list(&db, &revocable_ids, BIG, 0).await;
        (served_list, served[0].clone(), big_list, revocable_ids)
    });
    println!(
        "seeded {} accepted issuances in {:.1} s",
        revocable + 1_311,
        seeding.elapsed().as_secs_f64()
    );

    // 1. Cached list against GetIssuance.
    let list_url = format!("{}/issuer/status-lists/{served_list}", service.base);
    let get_url = format!("{}/issuer/api/v1/issuances/{served_id}", service.base);
    let size = rt.block_on(async {
        let res = reqwest::get(&list_url).await.unwrap();
        assert_eq!(res.status(), 200);
        res.bytes().await.unwrap().len()
    });
    let (mut lists, mut gets) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let c = clients(conns);
        let url = list_url.clone();
        let list = rt.block_on(drive("status list GET".into(), conns, secs, move |w, _| {
            let (c, url) = (c.clone(), url.clone());
            async move {
                match c[w].get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        }));
        let c = clients(conns);
        let (url, token) = (get_url.clone(), service.token.clone());
        let get = rt.block_on(drive("GetIssuance".into(), conns, secs, move |w, _| {
            let (c, url, token) = (c.clone(), url.clone(), token.clone());
            async move {
                matches!(c[w].get(&url).bearer_auth(&token).send().await, Ok(r) if r.status() == 200)
            }
        }));
        println!(
            "  round {}: status list {:.0}/s, GetIssuance {:.0}/s",
            round + 1,
            list.rate(),
            get.rate()
        );
        lists.push(list);
        gets.push(get);
    }
    let lists = Stage::merge(format!("status list GET ({size} B), {conns} conns"), lists);
    let gets = Stage::merge(format!("GetIssuance REST, {conns} conns"), gets);

    // 2. Revocations, each of another issuance.
    let ids = Arc::new(revocable_ids);
    let next = Arc::new(AtomicUsize::new(0));
    let mut revokes = Vec::new();
    for round in 0..rounds {
        let (c, ids, next) = (clients(conns), ids.clone(), next.clone());
        let (base, token) = (service.base.clone(), service.token.clone());
        let stage = rt.block_on(drive("revocations".into(), conns, secs, move |w, _| {
            let (c, ids, next, base, token) = (
                c.clone(),
                ids.clone(),
                next.clone(),
                base.clone(),
                token.clone(),
            );
            async move {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else {
                    panic!("seed more issuances: all {} are revoked", ids.len());
                };
                let res = c[w]
                    .post(format!("{base}/issuer/api/v1/issuances/{id}/revoke"))
                    .bearer_auth(&token)
                    .json(&json!({"reason": "benchmark"}))
                    .send()
                    .await;
                match res {
                    Ok(r) if r.status() == 200 => {
                        let body: Value = r.json().await.unwrap_or_default();
                        body["credential_status"] == "revoked"
                    }
                    _ => false,
                }
            }
        }));
        println!("  round {}: {:.0} revocations/s", round + 1, stage.rate());
        revokes.push(stage);
    }
    let revokes = Stage::merge(format!("revocations REST, {conns} conns"), revokes);
    let revoked = next.load(Ordering::Relaxed).min(ids.len());

    // 3. Rebuilds of the 1,048,576-entry list: with the revocations above, then with 10 %.
    let after_revocations = rebuilds(&service, &db, big_list, ids.len() as i64 - 1, 30);
    let tenth = rt.block_on(full_list(&db, 0.1));
    let at_tenth = rebuilds(&service, &db, tenth, BIG - 1, 30);

    println!();
    for s in [&lists, &gets, &revokes] {
        s.print();
    }
    println!(
        "cached status list / GetIssuance: {:.2} (p99 {:.2} ms vs {:.2} ms)",
        lists.rate() / gets.rate(),
        lists.pct(0.99),
        gets.pct(0.99)
    );
    for (what, times) in [
        (format!("{revoked} revoked"), &after_revocations),
        ("about 10 % revoked, scattered".to_owned(), &at_tenth),
    ] {
        println!(
            "rebuild of a {BIG}-entry list after a change, {what}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile_ms(times, 0.50),
            percentile_ms(times, 0.99),
            times.iter().max().unwrap().as_secs_f64() * 1000.0
        );
    }
    drop(rt);
    service.finish();
}
