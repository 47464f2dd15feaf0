//! Runs the conformance suite against both backends: SQLite on a temporary file and in memory,
//! Postgres on a throwaway database (`TEST_DATABASE_URL`, default: local trust-auth server).

use std::{
    any::Any,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use issuer_domain::{ErrorCode, ports::Store};
use sqlx::{
    Connection, Executor, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::{PgStore, SqliteStore, conformance};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs the checks in a task so that a failing one still lets the caller clean up; the caller
/// re-raises the panic afterwards.
async fn guarded(store: Arc<dyn Store>, concurrent: usize) -> Result<(), Box<dyn Any + Send>> {
    tokio::spawn(async move {
        conformance::run_all(store.as_ref()).await;
        conformance::run_concurrency(Arc::clone(&store)).await;
        if concurrent != 50 {
            conformance::concurrent_duplicates(store, concurrent).await;
        }
    })
    .await
    .map_err(|e| e.into_panic())
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_conforms() {
    let admin_url = admin_url();
    let name = format!("issuer_store_test_{}", Uuid::new_v4().simple());
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .unwrap_or_else(|e| panic!("cannot reach Postgres at {admin_url}: {e}"));
    // The name is generated above from hex digits only; identifiers cannot be bound.
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("create test database");

    let options = PgConnectOptions::from_str(&admin_url)
        .expect("parse TEST_DATABASE_URL")
        .database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect_with(options)
        .await
        .expect("connect to test database");
    let store = PgStore::from_pool(pool);
    store.migrate().await.expect("migrate");
    // Migrations must be repeatable: a restarted service runs them again.
    store.migrate().await.expect("second migrate");

    let outcome = guarded(Arc::new(store.clone()), 100).await;

    store.pool().close().await;
    admin
        .execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {name} WITH (FORCE)"
        )))
        .await
        .expect("drop test database");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn postgres_down_is_unavailable_and_fast() {
    // Port 1 on loopback: nothing listens, so the connection is refused.
    let started = Instant::now();
    let err = PgStore::connect("postgres://postgres@127.0.0.1:1/postgres", 2)
        .await
        .expect_err("connecting to a closed port must fail");
    assert_eq!(err.code, ErrorCode::Unavailable, "{}", err.chain());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a down database must answer within the acquire timeout, took {:?}",
        started.elapsed()
    );
}

/// Removes an SQLite database file and its WAL companions when dropped.
struct TempDb(PathBuf);

impl Drop for TempDb {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.0.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_conforms() {
    let file = TempDb(
        std::env::temp_dir().join(format!("issuer_store_test_{}.db", Uuid::new_v4().simple())),
    );
    let path = file.0.to_str().expect("temp path is UTF-8");
    let store = SqliteStore::open(path).await.expect("open sqlite file");
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("second migrate");

    let outcome = guarded(Arc::new(store.clone()), 100).await;

    store.pool().close().await;
    drop(file);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_in_memory_conforms() {
    let store = SqliteStore::in_memory()
        .await
        .expect("open in-memory sqlite");
    if let Err(panic) = guarded(Arc::new(store), 50).await {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn sqlite_open_accepts_a_url_and_creates_the_file() {
    let file = TempDb(
        std::env::temp_dir().join(format!("issuer_store_test_{}.db", Uuid::new_v4().simple())),
    );
    let url = format!("sqlite://{}", file.0.display());
    let store = SqliteStore::open(&url).await.expect("open sqlite url");
    store.migrate().await.expect("migrate");
    store.ping().await.expect("ping");
    assert!(file.0.exists(), "open must create the database file");
    store.pool().close().await;
}
