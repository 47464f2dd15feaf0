//! The wallet flow end to end, as a wallet runs it against the service: resolve the offer,
//! fetch issuer and authorization-server metadata, redeem the pre-authorized code, get a
//! nonce, prove possession of a fresh P-256 key and receive the SD-JWT VC.
//!
//! Run with `scripts/bench.sh` or `cargo bench --bench wallet` (Postgres and Redis on
//! 127.0.0.1). `BENCH_FLOWS` (default 200) flows are measured one at a time for latency — the
//! sum of the wallet's request times on loopback, i.e. the server-side time plus loopback round
//! trips — then again with `BENCH_CONCURRENCY` (default 16) wallets at once for throughput.
//! Offers are created beforehand and not measured.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

use common::{BenchService, env_or, percentile_ms};

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// A key proof (OID4VCI 1.0 Appendix F.1) by a fresh P-256 key.
fn proof(aud: &str, nonce: &str) -> String {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let point = key.public_key().as_ref();
    let jwk = json!({
        "kty": "EC", "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(&point[1..33]), "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
    });
    let header = json!({"typ": "openid4vci-proof+jwt", "alg": "ES256", "jwk": jwk});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({"aud": aud, "iat": now, "nonce": nonce});
    let input = format!("{}.{}", b64(&header), b64(&claims));
    let sig = key.sign(&rng, input.as_bytes()).unwrap();
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}

async fn json(req: reqwest::RequestBuilder, elapsed: &mut Duration) -> Value {
    let start = Instant::now();
    let res = req.send().await.expect("request sent");
    let status = res.status();
    let body: Value = res.json().await.expect("JSON body");
    *elapsed += start.elapsed();
    assert!(status.is_success(), "wallet step failed: {status} {body}");
    body
}

/// One wallet flow; returns the time spent in the wallet's requests.
async fn flow(http: &reqwest::Client, offer_uri: &str) -> Duration {
    let mut t = Duration::ZERO;
    let encoded = offer_uri.split_once("credential_offer_uri=").unwrap().1;
    let offer_url = percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .unwrap();
    let offer = json(http.get(offer_url.as_ref()), &mut t).await;
    let issuer = offer["credential_issuer"].as_str().unwrap();
    let (origin, path) = issuer.split_at(issuer.find("/issuer").unwrap());
    let meta = json(
        http.get(format!(
            "{origin}/.well-known/openid-credential-issuer{path}"
        )),
        &mut t,
    )
    .await;
    let as_meta = json(
        http.get(format!(
            "{origin}/.well-known/oauth-authorization-server{path}"
        )),
        &mut t,
    )
    .await;
    let code = offer["grants"]["urn:ietf:params:oauth:grant-type:pre-authorized_code"]["pre-authorized_code"]
        .as_str()
        .unwrap();
    let token = json(
        http.post(as_meta["token_endpoint"].as_str().unwrap())
            .form(&[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:pre-authorized_code",
                ),
                ("pre-authorized_code", code),
            ]),
        &mut t,
    )
    .await;
    let access = token["access_token"].as_str().unwrap();
    let nonce = json(http.post(meta["nonce_endpoint"].as_str().unwrap()), &mut t).await;
    let proof = proof(issuer, nonce["c_nonce"].as_str().unwrap());
    let credential = json(
        http.post(meta["credential_endpoint"].as_str().unwrap())
            .bearer_auth(access)
            .json(&json!({
                "credential_configuration_id": "learcredential.employee.sd.1",
                "proofs": {"jwt": [proof]}
            })),
        &mut t,
    )
    .await;
    assert!(
        credential["credentials"][0]["credential"]
            .as_str()
            .is_some()
    );
    t
}

fn main() {
    let flows: usize = env_or("BENCH_FLOWS", "200").parse().unwrap();
    let concurrency: usize = env_or("BENCH_CONCURRENCY", "16").parse().unwrap();
    let service = BenchService::start("wallet");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = reqwest::Client::new();

    let offers: Vec<String> = rt.block_on(async {
        let mut offers = Vec::new();
        for i in 0..flows * 2 {
            let res: Value = http
                .post(format!("{}/issuer/api/v1/issuances", service.base))
                .bearer_auth(&service.token)
                .json(&json!({
                    "client_request_id": format!("wallet-bench-{i}"),
                    "credential_configuration_id": "learcredential.employee.sd.1",
                    "payload": {
                        "mandator": {"organizationIdentifier": "VATES-B12345678", "organization": "Acme Corp"},
                        "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@acme.example"},
                        "power": [{"type": "Domain", "domain": "DOME", "function": "Onboarding", "action": ["Execute"]}]
                    }
                }))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            offers.push(res["credential_offer_uri"].as_str().unwrap().to_owned());
        }
        offers
    });
    let (sequential, concurrent) = offers.split_at(flows);

    println!("issuer wallet-flow benchmark: {flows} flows, service and wallets on this machine");
    let times: Vec<Duration> = rt.block_on(async {
        let mut times = Vec::new();
        for offer in sequential {
            times.push(flow(&http, offer).await);
        }
        times
    });
    println!(
        "one wallet at a time:      p50 {:>6.2} ms   p99 {:>6.2} ms   (6 requests per flow)",
        percentile_ms(&times, 0.50),
        percentile_ms(&times, 0.99)
    );

    let started = Instant::now();
    let times: Vec<Duration> = rt.block_on(async {
        let queue = Arc::new(tokio::sync::Mutex::new(concurrent.to_vec()));
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (queue, http) = (queue.clone(), http.clone());
            tasks.push(tokio::spawn(async move {
                let mut times = Vec::new();
                loop {
                    let Some(offer) = queue.lock().await.pop() else {
                        break;
                    };
                    times.push(flow(&http, &offer).await);
                }
                times
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{concurrency} wallets at once:        p50 {:>6.2} ms   p99 {:>6.2} ms   {:.0} credentials/s",
        percentile_ms(&times, 0.50),
        percentile_ms(&times, 0.99),
        times.len() as f64 / secs
    );
    service.finish();
}
