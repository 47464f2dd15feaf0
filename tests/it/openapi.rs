//! The OpenAPI document: served, committed, true to the routes, and true to the answers
//! (schemathesis, with valid and invalid input).

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{ServiceProcess, TestApp, TestDb, create_body, pg_settings, redis_url};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");

/// The committed `docs/openapi.json` is exactly what the service serves. After changing the
/// API, regenerate it with `UPDATE_OPENAPI=1 cargo nextest run openapi::`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_committed_document_is_the_served_one() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let res = app
        .http
        .get(app.url("/issuer/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/json");
    let served = res.text().await.unwrap();
    if std::env::var("UPDATE_OPENAPI").is_ok_and(|v| v == "1") {
        std::fs::write(COMMITTED, &served).unwrap();
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == served,
        "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo nextest run openapi::` and commit it"
    );
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    // The webhook event types documented are those an endpoint may subscribe to.
    let mut documented: Vec<&str> = doc["components"]["schemas"]["WebhookEventType"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let mut accepted = issuer_domain::webhook::ALL_TYPES.to_vec();
    documented.sort();
    accepted.sort();
    assert_eq!(documented, accepted);
}

/// Every documented operation reaches a handler (no 404/405 from the router, no gRPC
/// fallback), and the REST routes are all documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_operation_is_routed_and_every_route_documented() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let doc: Value = serde_json::from_str(issuer::rest::apidoc::json()).unwrap();
    let paths = doc["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, item) in paths {
        let concrete = path
            .split('/')
            .map(|seg| if seg.starts_with('{') { "x" } else { seg })
            .collect::<Vec<_>>()
            .join("/");
        for method in item.as_object().unwrap().keys() {
            operations += 1;
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let res = app
                .http
                .request(method.clone(), app.url(&concrete))
                .send()
                .await
                .unwrap();
            let ct = res
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            assert!(
                !ct.starts_with("application/grpc"),
                "{method} {path} fell through to the gRPC router"
            );
            assert_ne!(res.status(), 405, "{method} {path}: method not routed");
            if res.status() == 404 {
                // A handler's 404 names what was not found; the router's is empty.
                let body = res.text().await.unwrap();
                assert!(!body.is_empty(), "{method} {path}: no route");
            }
        }
    }
    // The routes of `rest::router` (kept in step with it by hand; the check above catches a
    // documented route that does not exist, this count a route added without documentation).
    assert_eq!(operations, 33, "documented operations");
    for undocumented in ["/metrics", "/issuer/api/v1/openapi.json"] {
        assert!(!paths.contains_key(undocumented));
    }
}

/// The API reference page works offline: Swagger UI and its assets come from the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_docs_page_is_served_from_the_binary() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let res = app
        .http
        .get(app.url("/issuer/api/docs/"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let html = res.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    for asset in [
        "swagger-ui-bundle.js",
        "swagger-ui.css",
        "swagger-initializer.js",
    ] {
        let res = app
            .http
            .get(app.url(&format!("/issuer/api/docs/{asset}")))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{asset}");
        let body = res.text().await.unwrap();
        assert!(!body.is_empty(), "{asset}");
        if asset == "swagger-initializer.js" {
            assert!(
                body.contains("/issuer/api/v1/openapi.json"),
                "the page loads our document: {body}"
            );
        }
    }
    assert!(
        !html.contains("https://"),
        "the page loads nothing from elsewhere"
    );
}

/// schemathesis (installed by scripts/test.sh) against the real binary with a valid token:
/// every documented operation, valid and invalid input, bounded examples. No answer is a 5xx,
/// and every answer matches the document (status, content type, headers, body schema).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_document() {
    let st = std::env::var("ISSUER_TEST_ST")
        .unwrap_or_else(|_| format!("{}/.tools/st-venv/bin/st", env!("CARGO_MANIFEST_DIR")));
    let db = TestDb::new().await;
    // The longest token lifetime, so that one token lasts the run.
    let service = ServiceProcess::start(&db.url, &[("ISSUER_TOKEN_TTL_SECS", "900")], false).await;
    let creds = service
        .provision("issuance:write,issuance:read,webhooks:manage")
        .await;
    let token = service.token(&creds).await;

    // Data for the operations on one resource, so that they reach past "not found": an
    // endpoint with a delivery, and an open offer.
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| {
        http.post(format!("{}{path}", service.base))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let endpoint: Value = post(
        "/issuer/api/v1/webhook-endpoints",
        json!({"url": "https://hooks.example.com/issuer", "event_types": ["issuance.created"]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let endpoint_id = endpoint["id"]
        .as_str()
        .expect("endpoint registered")
        .to_owned();
    let issuance: Value = post("/issuer/api/v1/issuances", create_body("schemathesis-seed"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let issuance_id = issuance["issuance_id"].as_str().unwrap().to_owned();
    let offer_uri = issuance["credential_offer_uri"].as_str().unwrap();
    let offer_id = offer_uri.rsplit("%2F").next().unwrap().to_owned();
    let deliveries: Value = http
        .get(format!(
            "{}/issuer/api/v1/webhook-endpoints/{endpoint_id}/deliveries",
            service.base
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let delivery_id = deliveries["deliveries"][0]["id"]
        .as_str()
        .expect("the create queued a delivery")
        .to_owned();
    let reports = tempfile::tempdir().unwrap();
    let config = reports.path().join("schemathesis.toml");
    std::fs::write(
        &config,
        format!(
            "[parameters]\n\
             \"path.issuance_id\" = \"{issuance_id}\"\n\
             \"path.id\" = \"{endpoint_id}\"\n\
             \"path.delivery_id\" = \"{delivery_id}\"\n\
             \"path.offer_id\" = \"{offer_id}\"\n"
        ),
    )
    .unwrap();
    let run = tokio::process::Command::new(&st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(format!("{}/issuer/api/v1/openapi.json", service.base))
        .args(["--url", &service.base])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_headers_conformance,response_schema_conformance",
        ])
        .args(["--phases", "examples,coverage,fuzzing", "--mode", "all"])
        .args(["--max-examples", "100", "--generation-deterministic"])
        // Our token on every call, not generated credentials.
        .args(["--generation-with-security-parameters", "false"])
        .args(["--workers", "2"])
        .args(["--request-timeout", "10"])
        // Readiness answers 503 by design when the database is down or the service stops.
        .args(["--exclude-path", "/readyz"])
        .args(["--no-color", "--report", "junit", "--report-dir"])
        .arg(reports.path())
        .current_dir(reports.path())
        .env("CI", "true")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(900), run)
        .await
        .expect("schemathesis finished within its time budget")
        .unwrap_or_else(|e| panic!("run {st} (scripts/test.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems (exit {:?}):\n{stdout}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{stdout}");
}
