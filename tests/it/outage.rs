//! A database outage on a Postgres cluster owned by the test: the service says so quickly and
//! comes back by itself once the database does.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use reqwest::StatusCode;
use serde_json::Value;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::helpers::{TestApp, authed, create_body, create_request_pb, pg_settings, redis_url};

/// A throwaway Postgres cluster (initdb + pg_ctl from the installed server) on a free port, so
/// that the test can stop and start its database without touching anyone else's.
struct OwnedCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    /// initdb refuses to run as root; then the tools run as `postgres`.
    as_root: bool,
}

impl OwnedCluster {
    fn create() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect(
                "PostgreSQL server binaries in /usr/lib/postgresql (scripts/test.sh installs them)",
            )
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .max()
            .map(|v| PathBuf::from(format!("/usr/lib/postgresql/{v}/bin")))
            .expect("a PostgreSQL version under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        let cluster = Self {
            bin,
            dir,
            port,
            as_root,
        };
        if cluster.as_root {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(cluster.dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown the cluster directory to postgres");
        }
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
            ],
        );
        cluster.start();
        cluster
    }

    fn data(&self) -> String {
        format!("{}/data", self.dir.path().display())
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A server tool, run as `postgres` when the test runs as root.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&self) {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = format!("{}/server.log", self.dir.path().display());
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
        );
    }

    /// A fast shutdown: the server ends every session, as in a failover or a restart.
    fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }
}

impl Drop for OwnedCluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
    }
}

/// Every call must answer within this, whatever the database does.
const NO_HANG: Duration = Duration::from_secs(12);

async fn bounded<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    let started = Instant::now();
    let out = tokio::time::timeout(NO_HANG, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for more than {NO_HANG:?}"));
    assert!(started.elapsed() < NO_HANG);
    out
}

async fn health_status(health: &mut HealthClient<tonic::transport::Channel>) -> i32 {
    bounded(
        "gRPC health check",
        health.check(HealthCheckRequest {
            service: "issuer.v1.IssuanceService".into(),
        }),
    )
    .await
    .expect("the health service answers even without a database")
    .get_ref()
    .status
}

async fn wait_for_health(
    health: &mut HealthClient<tonic::transport::Channel>,
    want: ServingStatus,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = health_status(health).await;
        if got == want as i32 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gRPC health stayed {got}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn assert_unavailable(what: &str, res: &reqwest::Response) {
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE, "{what}");
    let retry = res
        .headers()
        .get("retry-after")
        .unwrap_or_else(|| panic!("{what}: 503 without Retry-After"));
    assert!(
        retry.to_str().unwrap().parse::<u64>().is_ok_and(|s| s > 0),
        "{what}: Retry-After {retry:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_postgres_stopped_requests_get_503_and_unavailable_then_recover_without_restart() {
    let cluster = tokio::task::block_in_place(OwnedCluster::create);
    let app = TestApp::spawn(pg_settings(&cluster.url(), Some(&redis_url()))).await;
    let (creds, token) = app.tenant_token().await;
    let res = app.create_rest(&token, &create_body("before-outage")).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["issuance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let channel = tonic::transport::Channel::from_shared(app.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    wait_for_health(&mut health, ServingStatus::Serving).await;
    let mut grpc = app.grpc().await;
    // Warm most of the pool (30 connections), so that the outage leaves dead ones behind.
    let warm = (0..28).map(|_| app.get_rest(&token, &id));
    for res in futures::future::join_all(warm).await {
        assert_eq!(res.status(), 200);
    }

    tokio::task::block_in_place(|| cluster.stop());

    let res = bounded("GET /readyz", app.http.get(app.url("/readyz")).send())
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["database"], "unavailable");
    // Every request kind, several times over, so that the pool's dead connections and the
    // refused new ones are both met.
    for round in 0..2 {
        let res = bounded(
            "REST create",
            app.create_rest(&token, &create_body(&format!("during-{round}"))),
        )
        .await;
        assert_unavailable("REST create", &res);
        let problem: Value = res.json().await.unwrap();
        assert_eq!(problem["code"], "unavailable", "{problem}");
        let res = bounded("REST get", app.get_rest(&token, &id)).await;
        assert_unavailable("REST get", &res);
        let res = bounded(
            "token request",
            app.http
                .post(app.url("/issuer/oauth/token"))
                .basic_auth(&creds.client_id, Some(&creds.client_secret))
                .form(&[("grant_type", "client_credentials")])
                .send(),
        )
        .await
        .unwrap();
        assert_unavailable("token request", &res);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["error"], "temporarily_unavailable");

        let body = create_body(&format!("grpc-during-{round}"));
        let err = bounded(
            "gRPC CreateIssuance",
            grpc.create_issuance(authed(&token, create_request_pb(&body))),
        )
        .await
        .expect_err("CreateIssuance must fail while the database is down");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let details = tonic_types::StatusExt::get_error_details(&err);
        let retry = details
            .retry_info()
            .and_then(|r| r.retry_delay)
            .expect("UNAVAILABLE carries RetryInfo");
        assert!(retry > Duration::ZERO);
        let err = bounded(
            "gRPC GetIssuance",
            grpc.get_issuance(authed(
                &token,
                issuer::grpc::pb::GetIssuanceRequest {
                    issuance_id: id.clone(),
                },
            )),
        )
        .await
        .expect_err("GetIssuance must fail while the database is down");
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    }
    wait_for_health(&mut health, ServingStatus::NotServing).await;

    tokio::task::block_in_place(|| cluster.start());

    // As soon as the database is back, every request succeeds: no connection from before the
    // outage is handed out again...
    let gets = (0..12).map(|_| app.get_rest(&token, &id));
    for res in futures::future::join_all(gets).await {
        assert_eq!(res.status(), 200, "{:?}", res.text().await);
    }
    let res = app.create_rest(&token, &create_body("after-outage")).await;
    assert_eq!(res.status(), 201);
    // ...and readiness and gRPC health follow by themselves.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let res = bounded("GET /readyz", app.http.get(app.url("/readyz")).send())
            .await
            .unwrap();
        if res.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never recovered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for_health(&mut health, ServingStatus::Serving).await;
    let res = app.create_rest(&token, &create_body("during-0")).await;
    assert_eq!(
        res.status(),
        201,
        "a create refused during the outage left nothing behind: its retry creates"
    );
    let body = create_body("grpc-after-outage");
    grpc.create_issuance(authed(&token, create_request_pb(&body)))
        .await
        .expect("gRPC create after recovery");
    // The token endpoint answers again (`token` asserts 200).
    app.token(&creds).await;
    assert_eq!(app.count_issuances(&creds).await, 4);
    app.stop().await;
}
