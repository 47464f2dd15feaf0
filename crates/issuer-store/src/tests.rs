//! Runs the conformance suite against both backends: SQLite on a temporary file and in memory,
//! Postgres on a throwaway database (`TEST_DATABASE_URL`, default: local trust-auth server).

use std::{
    any::Any,
    path::PathBuf,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

use issuer_domain::{ErrorCode, model::InsertOutcome, ports::Store};
use sqlx::{
    Connection, Executor, PgConnection,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use uuid::Uuid;

use crate::{SqlStore, conformance};

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Runs `check` in a task so that a failing one still lets the caller clean up; the caller
/// re-raises the panic afterwards.
async fn guarded<F, Fut>(store: Arc<dyn Store>, check: F) -> Result<(), Box<dyn Any + Send>>
where
    F: FnOnce(Arc<dyn Store>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move { check(store).await })
        .await
        .map_err(|e| e.into_panic())
}

/// A store under test: opened fresh (and migrated) for one check, cleaned up after it.
trait Backend: Sized {
    async fn open() -> Self;
    fn store(&self) -> Arc<dyn Store>;
    async fn close(self);
}

/// Runs one conformance check against a fresh `B`, then cleans up and re-raises its panic.
async fn run_check<B, F, Fut>(check: F)
where
    B: Backend,
    F: FnOnce(Arc<dyn Store>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let backend = B::open().await;
    let outcome = guarded(backend.store(), check).await;
    backend.close().await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// One `#[tokio::test]` per check, so that a failure names its check and hides no other.
/// `name` calls `conformance::name(&store)`; `name(args)` calls `conformance::name(store,
/// args)` with the `Arc` (the concurrent checks).
macro_rules! checks {
    ($backend:ty => $($check:ident $(($($arg:expr),*))?),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $check() {
                run_check::<$backend, _, _>(|store| async move {
                    checks!(@call store, $check $(($($arg),*))?);
                })
                .await;
            }
        )*
    };
    (@call $store:ident, $check:ident) => {
        conformance::$check($store.as_ref()).await
    };
    (@call $store:ident, $check:ident ($($arg:expr),*)) => {
        conformance::$check($store, $($arg),*).await
    };
}

/// The whole suite for one backend; `$n` is how many tasks race in the duplicate-create check.
macro_rules! conformance_suite {
    ($backend:ty, $n:expr) => {
        checks!($backend =>
            ping,
            tenant_round_trip,
            clients,
            insert_returns_inserted,
            duplicate_returns_first,
            request_id_is_per_tenant,
            reads_are_scoped_by_tenant,
            find_by_offer_id,
            list_order_and_filters,
            list_paging,
            first_event_written,
            global_sequence_increases,
            payload_round_trip,
            transition_applies_purges_and_appends,
            stale_transition_changes_nothing,
            transition_of_unknown_or_foreign_is_stale,
            plain_event_keeps_status_and_payload,
            overdue_pending_lists_only_due_pending,
            code_lookup_and_tx_code_failures,
            redemption_applies_once_and_keeps_notification_id,
            nonces_are_single_use_across_tenants,
            webhook_outbox_follows_events,
            webhook_claims_are_leased_and_recorded,
            email_outbox,
            retention_purges_ended_issuances_and_everything_of_theirs,
            concurrent_duplicates($n),
            concurrent_transitions(50),
            concurrent_redemptions(50),
            concurrent_tx_code_attempts(50, 5),
            concurrent_claims_are_disjoint(),
            concurrent_mixed_creates(),
            grouped_insert_answers_each_item,
            concurrent_grouped_inserts(8),
            status_allocations_are_unique_and_fill_lists,
            concurrent_status_allocations(50),
            credential_status_changes_reach_every_copy,
        );
    };
}

fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A migrated throwaway Postgres database, dropped by [`PgDb::finish`].
struct PgDb {
    admin: PgConnection,
    name: String,
    store: SqlStore,
}

impl PgDb {
    async fn create() -> Self {
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
        let store = SqlStore::from_pg_pool(pool);
        store.migrate().await.expect("migrate");
        Self { admin, name, store }
    }

    /// Drops the database, then re-raises the checks' panic, if any.
    async fn finish(mut self, outcome: Result<(), Box<dyn Any + Send>>) {
        self.store.close().await;
        self.admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE {} WITH (FORCE)",
                self.name
            )))
            .await
            .expect("drop test database");
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

impl Backend for PgDb {
    async fn open() -> Self {
        let db = Self::create().await;
        // Migrations must be repeatable: a restarted service runs them again.
        db.store.migrate().await.expect("second migrate");
        db
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn close(self) {
        self.finish(Ok(())).await;
    }
}

mod postgres {
    use super::*;
    conformance_suite!(PgDb, 100);
}

/// A batch is written in a few multi-row statements, not one per row; a row that cannot be
/// written (the schema refuses its event) fails alone, its neighbours written as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_writes_a_batch_in_few_statements_and_isolates_a_bad_row() {
    let db = PgDb::create().await;
    let store = db.store.clone();
    let outcome = tokio::spawn(async move {
        let tenant = conformance::new_tenant(&store).await;
        let batch = |n: usize| -> Vec<_> {
            (0..n)
                .map(|_| conformance::sample_issuance(tenant, &conformance::new_request_id()))
                .collect()
        };
        let items = batch(300);
        let before = store.create_writes();
        let outcomes = store.insert_issuances(&items).await.unwrap();
        let after = store.create_writes();
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Ok(InsertOutcome::Inserted(_))))
        );
        let statements = after.statements - before.statements;
        assert_eq!(after.creates - before.creates, 300);
        assert!(
            statements <= 300_u64.div_ceil(64),
            "300 rows took {statements} statements"
        );

        let mut items = batch(100);
        items[40].1.sequence = 0;
        let outcomes = store.insert_issuances(&items).await.unwrap();
        for (n, ((issuance, _), outcome)) in items.iter().zip(outcomes).enumerate() {
            match outcome {
                Ok(InsertOutcome::Inserted(i)) => {
                    assert_ne!(n, 40);
                    assert_eq!(i, conformance::normalized(issuance));
                }
                Err(_) => {
                    assert_eq!(n, 40, "only the bad row fails");
                    assert_eq!(store.get_issuance(tenant, issuance.id).await.unwrap(), None);
                }
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .map_err(|e| e.into_panic());
    db.finish(outcome).await;
}

/// Concurrent creates share statements, and a row that cannot be written (the schema refuses
/// its event) fails alone: the creates grouped with it are written and answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_groups_concurrent_creates_and_isolates_a_bad_row() {
    let db = PgDb::create().await;
    let store = db.store.clone();
    let outcome = tokio::spawn(async move {
        let tenant = conformance::new_tenant(&store).await;
        let before = store.create_writes();
        let tasks: Vec<_> = (0..203)
            .map(|n| {
                let (issuance, mut event) =
                    conformance::sample_issuance(tenant, &conformance::new_request_id());
                // Every 70th create carries an event the schema refuses (sequence 0).
                let valid = n % 70 != 35;
                if !valid {
                    event.sequence = 0;
                }
                let store = store.clone();
                tokio::spawn(async move {
                    let outcome = store.insert_issuance(&issuance, &event).await;
                    (valid, issuance, outcome)
                })
            })
            .collect();
        let (mut written, mut refused) = (0, 0);
        for task in tasks {
            let (valid, issuance, outcome) = task.await.expect("insert task panicked");
            match (valid, outcome) {
                (true, Ok(InsertOutcome::Inserted(i))) => {
                    assert_eq!(i, conformance::normalized(&issuance));
                    assert_eq!(
                        store.get_issuance(tenant, i.id).await.unwrap().as_ref(),
                        Some(&i)
                    );
                    written += 1;
                }
                (false, Err(_)) => {
                    assert_eq!(
                        store.get_issuance(tenant, issuance.id).await.unwrap(),
                        None,
                        "a refused create leaves no row"
                    );
                    refused += 1;
                }
                (valid, outcome) => panic!(
                    "unexpected answer for a create (valid: {valid}): {:?}",
                    outcome.map_err(|e| e.chain())
                ),
            }
        }
        assert_eq!((written, refused), (200, 3));
        let after = store.create_writes();
        let (statements, creates) = (
            after.statements - before.statements,
            after.creates - before.creates,
        );
        assert_eq!(creates, 203, "every create went through the group writer");
        assert!(
            statements < creates,
            "203 concurrent creates took {statements} statements; none were grouped"
        );
    })
    .await
    .map_err(|e| e.into_panic());
    db.finish(outcome).await;
}

#[tokio::test]
async fn postgres_down_is_unavailable_and_fast() {
    // Port 1 on loopback: nothing listens, so the connection is refused.
    let started = Instant::now();
    let err = SqlStore::connect_postgres("postgres://postgres@127.0.0.1:1/postgres", 2)
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

/// A migrated SQLite database in a temporary file.
struct SqliteFile {
    store: SqlStore,
    _file: TempDb,
}

impl Backend for SqliteFile {
    async fn open() -> Self {
        let file = TempDb(
            std::env::temp_dir().join(format!("issuer_store_test_{}.db", Uuid::new_v4().simple())),
        );
        let path = file.0.to_str().expect("temp path is UTF-8");
        let store = SqlStore::open_sqlite(path).await.expect("open sqlite file");
        store.migrate().await.expect("migrate");
        store.migrate().await.expect("second migrate");
        Self { store, _file: file }
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.store.clone())
    }

    async fn close(self) {
        self.store.close().await;
    }
}

/// A private in-memory SQLite database.
struct SqliteMemory(SqlStore);

impl Backend for SqliteMemory {
    async fn open() -> Self {
        Self(
            SqlStore::sqlite_in_memory()
                .await
                .expect("open in-memory sqlite"),
        )
    }

    fn store(&self) -> Arc<dyn Store> {
        Arc::new(self.0.clone())
    }

    async fn close(self) {}
}

mod sqlite_file {
    use super::*;
    conformance_suite!(SqliteFile, 100);
}

mod sqlite_memory {
    use super::*;
    conformance_suite!(SqliteMemory, 50);
}

#[tokio::test]
async fn sqlite_open_accepts_a_url_and_creates_the_file() {
    let file = TempDb(
        std::env::temp_dir().join(format!("issuer_store_test_{}.db", Uuid::new_v4().simple())),
    );
    let url = format!("sqlite://{}", file.0.display());
    let store = SqlStore::open_sqlite(&url).await.expect("open sqlite url");
    store.migrate().await.expect("migrate");
    store.ping().await.expect("ping");
    assert!(file.0.exists(), "open must create the database file");
    store.close().await;
}
