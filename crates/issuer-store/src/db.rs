//! The dialect layer under the one SQL store: a statement with its arguments in domain types,
//! run on Postgres or SQLite, each encoding the arguments in its stored form (UUIDs and
//! timestamps natively on Postgres, as fixed-width text on SQLite; JSON as `jsonb` or text).
//!
//! Statements are written once, with `$1`-style placeholders, which both backends accept. What
//! the SQL itself cannot share is a [`Backend`] fragment (row locking, a fresh UUID, a word in a
//! space-separated list).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use issuer_domain::Error;
use serde_json::Value;
use sqlx::{
    PgPool, Postgres, Sqlite, SqlitePool, Transaction,
    postgres::PgRow,
    sqlite::{SqliteArguments, SqliteRow},
    types::Json,
};
use uuid::Uuid;

use crate::rows::{self, Backend, RowAccess, trunc_micros};

/// A value to bind, in the domain's types.
#[derive(Debug, Clone)]
enum Arg {
    Id(Option<Uuid>),
    Time(Option<DateTime<Utc>>),
    Text(Option<String>),
    Int(Option<i64>),
    Bool(bool),
    Json(Option<Value>),
}

/// A statement and its arguments, in placeholder order.
#[derive(Debug, Clone)]
pub(crate) struct Sql {
    text: Cow<'static, str>,
    args: Vec<Arg>,
}

impl Sql {
    pub fn new(text: impl Into<Cow<'static, str>>) -> Self {
        Self {
            text: text.into(),
            args: Vec::new(),
        }
    }

    pub fn id(self, id: Uuid) -> Self {
        self.opt_id(Some(id))
    }

    pub fn opt_id(mut self, id: Option<Uuid>) -> Self {
        self.args.push(Arg::Id(id));
        self
    }

    pub fn time(self, t: DateTime<Utc>) -> Self {
        self.opt_time(Some(t))
    }

    pub fn opt_time(mut self, t: Option<DateTime<Utc>>) -> Self {
        self.args.push(Arg::Time(t));
        self
    }

    pub fn text(self, s: impl Into<String>) -> Self {
        self.opt_text(Some(s.into()))
    }

    pub fn opt_text(mut self, s: Option<impl Into<String>>) -> Self {
        self.args.push(Arg::Text(s.map(Into::into)));
        self
    }

    pub fn int(self, n: i64) -> Self {
        self.opt_int(Some(n))
    }

    pub fn opt_int(mut self, n: Option<i64>) -> Self {
        self.args.push(Arg::Int(n));
        self
    }

    pub fn flag(mut self, b: bool) -> Self {
        self.args.push(Arg::Bool(b));
        self
    }

    pub fn json(mut self, v: Option<Value>) -> Self {
        self.args.push(Arg::Json(v));
        self
    }

    /// The next placeholder's number.
    pub fn next_placeholder(&self) -> usize {
        self.args.len() + 1
    }

    /// Appends SQL text (for statements built from optional parts).
    pub fn push(mut self, text: &str) -> Self {
        self.text.to_mut().push_str(text);
        self
    }

    fn postgres(&self) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.text.as_ref()));
        for arg in &self.args {
            q = match arg {
                Arg::Id(id) => q.bind(*id),
                Arg::Time(t) => q.bind(t.map(trunc_micros)),
                Arg::Text(s) => q.bind(s.as_deref()),
                Arg::Int(n) => q.bind(*n),
                Arg::Bool(b) => q.bind(*b),
                Arg::Json(v) => q.bind(v.as_ref().map(Json)),
            };
        }
        q
    }

    fn sqlite(&self) -> sqlx::query::Query<'_, Sqlite, SqliteArguments> {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(self.text.as_ref()));
        for arg in &self.args {
            q = match arg {
                Arg::Id(id) => q.bind(id.map(id_text)),
                Arg::Time(t) => q.bind(t.map(time_text)),
                Arg::Text(s) => q.bind(s.clone()),
                Arg::Int(n) => q.bind(*n),
                Arg::Bool(b) => q.bind(*b),
                Arg::Json(v) => q.bind(v.as_ref().map(Value::to_string)),
            };
        }
        q
    }
}

/// The stored form of an id on SQLite.
pub(crate) fn id_text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// The stored form of a timestamp on SQLite; fixed width so that text comparison is time
/// comparison.
pub(crate) fn time_text(t: DateTime<Utc>) -> String {
    trunc_micros(t).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// A sqlx failure and the backend it came from, mapped to the domain's error by `?`.
#[derive(Debug)]
pub(crate) struct DbError {
    pub backend: Backend,
    pub source: sqlx::Error,
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        rows::db_error(e.backend, e.source)
    }
}

pub(crate) type DbResult<T> = std::result::Result<T, DbError>;

/// A row of either backend.
pub(crate) enum Row {
    Postgres(PgRow),
    Sqlite(SqliteRow),
}

macro_rules! delegate_row {
    ($($name:ident -> $ty:ty),* $(,)?) => {
        impl RowAccess for Row {
            $(fn $name(&self, col: &str) -> Result<$ty, sqlx::Error> {
                match self {
                    Row::Postgres(r) => r.$name(col),
                    Row::Sqlite(r) => r.$name(col),
                }
            })*
        }
    };
}

delegate_row! {
    uuid -> Uuid,
    opt_uuid -> Option<Uuid>,
    time -> DateTime<Utc>,
    opt_time -> Option<DateTime<Utc>>,
    opt_int -> Option<i64>,
    text -> String,
    opt_text -> Option<String>,
    int -> i64,
    flag -> bool,
    json -> Option<Value>,
}

/// A connection pool of either backend.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl Db {
    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Runs statements on whichever connection the pool gives.
    pub fn on(&self) -> Exec<'_> {
        match self {
            Db::Postgres(p) => Exec::PgPool(p),
            Db::Sqlite(p) => Exec::SqlitePool(p),
        }
    }

    /// Begins a transaction that will write: on SQLite it takes the write lock at once
    /// (`BEGIN IMMEDIATE`), where the busy timeout applies, instead of failing with
    /// `SQLITE_BUSY` when a read turns into a write halfway through.
    pub async fn begin_write(&self) -> DbResult<Tx> {
        let backend = self.backend();
        match self {
            Db::Postgres(p) => p.begin().await.map(Tx::Postgres),
            Db::Sqlite(p) => p.begin_with("BEGIN IMMEDIATE").await.map(Tx::Sqlite),
        }
        .map_err(|source| DbError { backend, source })
    }

    /// Connections of the pool: open, idle, and the most it may open.
    pub fn pool_stats(&self) -> (u32, u32, u32) {
        let idle = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        match self {
            Db::Postgres(p) => (
                p.size(),
                idle(p.num_idle()),
                p.options().get_max_connections(),
            ),
            Db::Sqlite(p) => (
                p.size(),
                idle(p.num_idle()),
                p.options().get_max_connections(),
            ),
        }
    }
}

/// A transaction of either backend.
pub(crate) enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

impl Tx {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Postgres(_) => Backend::Postgres,
            Tx::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Runs statements on the transaction's connection.
    pub fn on(&mut self) -> Exec<'_> {
        match self {
            Tx::Postgres(tx) => Exec::PgConn(tx),
            Tx::Sqlite(tx) => Exec::SqliteConn(tx),
        }
    }

    pub async fn commit(self) -> DbResult<()> {
        let backend = self.backend();
        match self {
            Tx::Postgres(tx) => tx.commit().await,
            Tx::Sqlite(tx) => tx.commit().await,
        }
        .map_err(|source| DbError { backend, source })
    }

    /// Rolls back now (dropping a transaction also rolls it back, but only once its connection
    /// is used again; SQLite's write lock should not wait for that).
    pub async fn rollback(self) -> DbResult<()> {
        let backend = self.backend();
        match self {
            Tx::Postgres(tx) => tx.rollback().await,
            Tx::Sqlite(tx) => tx.rollback().await,
        }
        .map_err(|source| DbError { backend, source })
    }
}

/// Where one statement runs: a pool or a transaction's connection, of either backend.
pub(crate) enum Exec<'a> {
    PgPool(&'a PgPool),
    PgConn(&'a mut sqlx::PgConnection),
    SqlitePool(&'a SqlitePool),
    SqliteConn(&'a mut sqlx::SqliteConnection),
}

impl Exec<'_> {
    fn backend(&self) -> Backend {
        match self {
            Exec::PgPool(_) | Exec::PgConn(_) => Backend::Postgres,
            Exec::SqlitePool(_) | Exec::SqliteConn(_) => Backend::Sqlite,
        }
    }

    /// Runs `q`; returns how many rows it changed.
    pub async fn execute(self, q: &Sql) -> DbResult<u64> {
        let backend = self.backend();
        match self {
            Exec::PgPool(e) => q.postgres().execute(e).await.map(|r| r.rows_affected()),
            Exec::PgConn(e) => q.postgres().execute(e).await.map(|r| r.rows_affected()),
            Exec::SqlitePool(e) => q.sqlite().execute(e).await.map(|r| r.rows_affected()),
            Exec::SqliteConn(e) => q.sqlite().execute(e).await.map(|r| r.rows_affected()),
        }
        .map_err(|source| DbError { backend, source })
    }

    pub async fn fetch_optional(self, q: &Sql) -> DbResult<Option<Row>> {
        let backend = self.backend();
        match self {
            Exec::PgPool(e) => q
                .postgres()
                .fetch_optional(e)
                .await
                .map(|r| r.map(Row::Postgres)),
            Exec::PgConn(e) => q
                .postgres()
                .fetch_optional(e)
                .await
                .map(|r| r.map(Row::Postgres)),
            Exec::SqlitePool(e) => q
                .sqlite()
                .fetch_optional(e)
                .await
                .map(|r| r.map(Row::Sqlite)),
            Exec::SqliteConn(e) => q
                .sqlite()
                .fetch_optional(e)
                .await
                .map(|r| r.map(Row::Sqlite)),
        }
        .map_err(|source| DbError { backend, source })
    }

    pub async fn fetch_all(self, q: &Sql) -> DbResult<Vec<Row>> {
        let backend = self.backend();
        let pg = |rows: Vec<PgRow>| rows.into_iter().map(Row::Postgres).collect();
        let lite = |rows: Vec<SqliteRow>| rows.into_iter().map(Row::Sqlite).collect();
        match self {
            Exec::PgPool(e) => q.postgres().fetch_all(e).await.map(pg),
            Exec::PgConn(e) => q.postgres().fetch_all(e).await.map(pg),
            Exec::SqlitePool(e) => q.sqlite().fetch_all(e).await.map(lite),
            Exec::SqliteConn(e) => q.sqlite().fetch_all(e).await.map(lite),
        }
        .map_err(|source| DbError { backend, source })
    }

    pub async fn fetch_one(self, q: &Sql) -> DbResult<Row> {
        let backend = self.backend();
        self.fetch_optional(q).await?.ok_or(DbError {
            backend,
            source: sqlx::Error::RowNotFound,
        })
    }
}
