//! What operators and platform tooling talk to: gRPC health and server reflection.

use std::time::{Duration, Instant};

use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{TestApp, TestDb, pg_settings, redis_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_serving_while_the_database_answers() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let channel = tonic::transport::Channel::from_shared(app.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    for service in ["", "issuer.v1.IssuanceService"] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let res = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await;
            if matches!(&res, Ok(r) if r.get_ref().status == ServingStatus::Serving as i32) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "`{service}` never became SERVING: {res:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

/// `buf curl --list-methods` (npm `@bufbuild/buf`, installed by scripts/test.sh) finds every
/// method through server reflection, as grpcurl-style tools and gateways do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services_to_buf_curl() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(pg_settings(&db.url, Some(&redis_url()))).await;
    let buf = std::env::var("ISSUER_TEST_BUF").unwrap_or_else(|_| {
        format!(
            "{}/.tools/node_modules/.bin/buf",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let out = tokio::process::Command::new(&buf)
        .args([
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--list-methods",
        ])
        .arg(&app.base)
        .output()
        .await
        .unwrap_or_else(|e| panic!("run {buf} (scripts/test.sh installs it): {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "buf curl failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let methods: Vec<&str> = stdout.lines().map(str::trim).collect();
    for m in [
        "issuer.v1.IssuanceService/CreateIssuance",
        "issuer.v1.IssuanceService/GetIssuance",
        "issuer.v1.IssuanceService/ListIssuances",
        "issuer.v1.IssuanceService/CancelIssuance",
        "issuer.v1.IssuanceService/WatchIssuance",
        "grpc.health.v1.Health/Check",
        "grpc.health.v1.Health/Watch",
    ] {
        assert!(methods.contains(&m), "{m} missing from {methods:?}");
    }
}
