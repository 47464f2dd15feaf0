//! SQLite: opening a database file (or a private in-memory database) and what only SQLite does
//! (the retention pass as a loop in one transaction).
//!
//! Ids are stored as lowercase hyphenated UUID text and timestamps as RFC 3339 UTC text with
//! exactly six fractional digits, so that text order equals UUID and time order. Writers that
//! must be atomic take the write lock up front (`BEGIN IMMEDIATE`) and queue on the busy
//! timeout instead of failing with `SQLITE_BUSY` halfway through.

use std::{str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use issuer_domain::{error::Result, model::Purged};
use serde_json::Value;
use sqlx::{
    Row as _, SqlitePool,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow},
};
use uuid::Uuid;

use crate::{
    SqlStore,
    db::{Db, Sql},
    rows::{self, Backend, RowAccess, decode_error},
};

/// How long a writer waits for another writer's lock before giving up with `SQLITE_BUSY`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL lets readers proceed next to the one writer; more connections than this buy nothing.
const MAX_CONNECTIONS: u32 = 8;

fn db_error(e: sqlx::Error) -> issuer_domain::Error {
    rows::db_error(Backend::Sqlite, e)
}

impl SqlStore {
    /// Opens the SQLite database at `path_or_url` (a file path or an `sqlite:` URL), creating
    /// the file if it is missing. Call [`SqlStore::migrate`] before use.
    pub async fn open_sqlite(path_or_url: &str) -> Result<Self> {
        let options = if path_or_url.starts_with("sqlite:") {
            SqliteConnectOptions::from_str(path_or_url).map_err(db_error)?
        } else {
            SqliteConnectOptions::new().filename(path_or_url)
        };
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await
            .map_err(db_error)?;
        Ok(Self::from_sqlite_pool(pool))
    }

    /// A private, empty in-memory SQLite database, already migrated.
    ///
    /// Every connection to `:memory:` opens a database of its own, so the pool holds exactly
    /// one connection and never lets it go: dropping it would drop the data.
    pub async fn sqlite_in_memory() -> Result<Self> {
        let options = SqliteConnectOptions::from_str("sqlite::memory:")
            .map_err(db_error)?
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(db_error)?;
        let store = Self::from_sqlite_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Wraps an SQLite pool configured by the caller.
    pub fn from_sqlite_pool(pool: SqlitePool) -> Self {
        Self::with_db(Db::Sqlite(pool))
    }
}

impl RowAccess for SqliteRow {
    fn uuid(&self, col: &str) -> Result<Uuid, sqlx::Error> {
        let raw: String = self.try_get(col)?;
        Uuid::parse_str(&raw).map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
    }
    fn opt_uuid(&self, col: &str) -> Result<Option<Uuid>, sqlx::Error> {
        let raw: Option<String> = self.try_get(col)?;
        raw.map(|raw| Uuid::parse_str(&raw).map_err(|e| decode_error(col, format!("`{raw}`: {e}"))))
            .transpose()
    }
    fn time(&self, col: &str) -> Result<DateTime<Utc>, sqlx::Error> {
        let raw: String = self.try_get(col)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
    }
    fn opt_int(&self, col: &str) -> Result<Option<i64>, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_time(&self, col: &str) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        let raw: Option<String> = self.try_get(col)?;
        raw.map(|raw| {
            DateTime::parse_from_rfc3339(&raw)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| decode_error(col, format!("`{raw}`: {e}")))
        })
        .transpose()
    }
    fn text(&self, col: &str) -> Result<String, sqlx::Error> {
        self.try_get(col)
    }
    fn opt_text(&self, col: &str) -> Result<Option<String>, sqlx::Error> {
        self.try_get(col)
    }
    fn int(&self, col: &str) -> Result<i64, sqlx::Error> {
        self.try_get(col)
    }
    fn flag(&self, col: &str) -> Result<bool, sqlx::Error> {
        self.try_get(col)
    }
    fn json(&self, col: &str) -> Result<Option<Value>, sqlx::Error> {
        let raw: Option<String> = self.try_get(col)?;
        raw.map(|raw| serde_json::from_str(&raw).map_err(|e| decode_error(col, e.to_string())))
            .transpose()
    }
}

/// One retention pass in one write transaction: the ended issuances found first, then each
/// one's children and itself (email rows and webhook attempts go by cascade).
pub(crate) async fn purge_ended(
    db: &Db,
    ended_before: DateTime<Utc>,
    limit: u32,
) -> Result<Purged> {
    let mut tx = db.begin_write().await?;
    let doomed = tx
        .on()
        .fetch_all(
            &Sql::new(
                "SELECT tenant_id, id FROM issuances WHERE status <> 'pending' \
                 AND updated_at < $1 AND (credential_status IS NULL \
                 OR credential_status = 'revoked' OR credential_expires_at < $1) \
                 ORDER BY updated_at LIMIT $2",
            )
            .time(ended_before)
            .int(i64::from(limit)),
        )
        .await?;
    let mut purged = Purged::default();
    for row in &doomed {
        let tenant = row
            .uuid("tenant_id")
            .map_err(issuer_domain::Error::internal)?;
        let id = row.uuid("id").map_err(issuer_domain::Error::internal)?;
        for (sql, counter) in [
            (
                "DELETE FROM issuance_events WHERE tenant_id = $1 AND issuance_id = $2",
                &mut purged.events,
            ),
            (
                "DELETE FROM webhook_deliveries WHERE tenant_id = $1 AND issuance_id = $2",
                &mut purged.webhook_deliveries,
            ),
            (
                "DELETE FROM issuances WHERE tenant_id = $1 AND id = $2",
                &mut purged.issuances,
            ),
        ] {
            *counter += tx.on().execute(&Sql::new(sql).id(tenant).id(id)).await?;
        }
    }
    tx.commit().await?;
    Ok(purged)
}
