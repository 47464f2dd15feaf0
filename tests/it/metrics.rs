//! `/metrics`: the documented Prometheus series move with the requests that feed them.

use std::collections::HashMap;

use reqwest::StatusCode;
use serde_json::Value;

use crate::helpers::{TestApp, TestDb, create_body, create_request_pb, pg_settings, redis_url};

/// One scrape: every sample as (name, labels, value).
struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    async fn take(app: &TestApp) -> Self {
        let res = app.http.get(app.metrics_url()).send().await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers()[reqwest::header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/plain")
        );
        let text = res.text().await.unwrap();
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let labels = labels
                .split("\",")
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            samples.push((name.to_owned(), labels, value.parse().unwrap()));
        }
        Self(samples)
    }

    /// The sum of the samples of `name` whose labels include `want`.
    fn value(&self, name: &str, want: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, labels, _)| {
                n == name
                    && want
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_series_move_with_requests() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let before = Scrape::take(&app).await;

    // A token grant, and a refused one.
    let (creds, token) = app.tenant_token().await;
    let res = app
        .http
        .post(app.url("/issuer/oauth/token"))
        .basic_auth(&creds.client_id, Some(&creds.client_secret))
        .form(&[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);

    // REST: a create, two replays, a read.
    let body = create_body("metrics-1");
    let created: Value = app.create_rest(&token, &body).await.json().await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            app.create_rest(&token, &body).await.status(),
            StatusCode::OK
        );
    }
    let id = created["issuance_id"].as_str().unwrap();
    assert_eq!(app.get_rest(&token, id).await.status(), StatusCode::OK);
    assert_eq!(app.cancel_rest(&token, id).await.status(), StatusCode::OK);

    // gRPC: a create and a read of an unknown issuance.
    let mut grpc = app.grpc().await;
    let mut req = tonic::Request::new(create_request_pb(&create_body("metrics-2")));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    grpc.create_issuance(req).await.unwrap();
    let mut req = tonic::Request::new(issuer::grpc::pb::GetIssuanceRequest {
        issuance_id: uuid::Uuid::now_v7().to_string(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    assert_eq!(
        grpc.get_issuance(req).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let after = Scrape::take(&app).await;
    let delta =
        |name: &str, want: &[(&str, &str)]| after.value(name, want) - before.value(name, want);

    assert_eq!(
        delta(
            "issuer_token_grants_total",
            &[("grant_type", "client_credentials"), ("outcome", "issued")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "issuer_token_grants_total",
            &[
                ("grant_type", "other"),
                ("outcome", "unsupported_grant_type")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta("issuer_issuances_created_total", &[("transport", "rest")]),
        1.0
    );
    assert_eq!(
        delta("issuer_issuances_created_total", &[("transport", "grpc")]),
        1.0
    );
    assert_eq!(
        delta("issuer_idempotent_replays_total", &[("transport", "rest")]),
        2.0
    );
    let rest_creates = [
        ("protocol", "rest"),
        ("method", "POST"),
        ("route", "/issuer/api/v1/issuances"),
    ];
    assert_eq!(
        delta(
            "issuer_http_requests_total",
            &[
                rest_creates[0],
                rest_creates[1],
                rest_creates[2],
                ("status", "201")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "issuer_http_requests_total",
            &[
                rest_creates[0],
                rest_creates[1],
                rest_creates[2],
                ("status", "200")
            ]
        ),
        2.0
    );
    assert_eq!(
        delta("issuer_http_request_duration_seconds_count", &rest_creates),
        3.0
    );
    assert_eq!(
        delta(
            "issuer_http_requests_total",
            &[
                ("protocol", "rest"),
                ("route", "/issuer/api/v1/issuances/{issuance_id}"),
                ("status", "200")
            ]
        ),
        1.0,
        "routes are templates, not paths with ids"
    );
    assert_eq!(
        delta(
            "issuer_http_requests_total",
            &[
                ("protocol", "grpc"),
                ("method", "CreateIssuance"),
                ("status", "0")
            ]
        ),
        1.0
    );
    assert_eq!(
        delta(
            "issuer_http_requests_total",
            &[
                ("protocol", "grpc"),
                ("method", "GetIssuance"),
                ("status", "5")
            ]
        ),
        1.0,
        "gRPC calls carry their status code"
    );
    // Every create, replays included, took the idempotency lock.
    assert_eq!(
        delta("issuer_idempotency_locks_total", &[("outcome", "acquired")]),
        4.0
    );
    assert_eq!(
        delta(
            "issuer_issuance_status_changes_total",
            &[("status", "rejected"), ("reason", "cancelled")]
        ),
        1.0
    );
    // Read from the store at scrape time.
    assert_eq!(after.value("issuer_db_pool_max_connections", &[]), 30.0);
    let pool_open = after.value("issuer_db_pool_connections", &[("state", "in_use")])
        + after.value("issuer_db_pool_connections", &[("state", "idle")]);
    assert!(
        (1.0..=30.0).contains(&pool_open),
        "the pool has open connections: {pool_open}"
    );
    for outbox in ["webhooks", "emails"] {
        assert!(
            after.0.iter().any(|(n, l, _)| n == "issuer_outbox_pending"
                && l.get("outbox").map(String::as_str) == Some(outbox)),
            "outbox_pending for {outbox}"
        );
        assert_eq!(
            after.value("issuer_outbox_overdue_seconds", &[("outbox", outbox)]),
            0.0,
            "nothing is overdue"
        );
    }
    // Buckets exist for the latency histogram.
    assert!(after.0.iter().any(
        |(n, l, _)| n == "issuer_http_request_duration_seconds_bucket" && l.get("le").is_some()
    ));
}

/// Anonymous requests with made-up methods and paths add no series, and the public port does
/// not serve the metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_input_cannot_grow_the_series_and_the_public_port_hides_them() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let res = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(
        res.status(),
        StatusCode::NOT_FOUND,
        "not on the public port"
    );

    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("issuer_http_requests_total"))
            .count()
    };
    let send = |i: usize| {
        let method = reqwest::Method::from_bytes(format!("X{i}Y").as_bytes()).unwrap();
        app.http
            .request(method, app.url(&format!("/no/such/path/{i}")))
            .send()
    };
    // Warm up: the first of each kind may add its `other` series.
    for i in 0..3 {
        send(i).await.unwrap();
        app.http
            .get(app.url(&format!("/nothing-{i}")))
            .send()
            .await
            .unwrap();
    }
    let before = app.metrics_text().await;
    for i in 3..203 {
        send(i).await.unwrap();
        app.http
            .get(app.url(&format!("/nothing-{i}")))
            .send()
            .await
            .unwrap();
    }
    let after = app.metrics_text().await;
    assert_eq!(series(&before), series(&after), "{after}");
    assert!(
        after.contains(r#"method="other""#) && after.contains(r#"route="other""#),
        "{after}"
    );
    assert!(
        !after.contains("X100Y") && !after.contains("nothing-"),
        "{after}"
    );
}
