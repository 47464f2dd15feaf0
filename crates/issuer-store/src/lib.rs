//! Durable state of the issuer: the [`Store`](issuer_domain::ports::Store) port implemented
//! once, by [`SqlStore`], on Postgres (production) and SQLite (single node, development, tests),
//! over a small dialect layer; [`Metered`] adds tracing and metrics around any store.
//!
//! Both backends share one schema shape (`migrations/postgres`, `migrations/sqlite`, embedded
//! and applied by `migrate()`): every table carries `tenant_id` and leads its keys with it, so
//! the data can later be distributed by tenant. Idempotent creation is decided by the database
//! through the unique (tenant, client_request_id) constraint, never by a lock.
//!
//! Timestamps are stored at microsecond precision; the store truncates what it is given (see
//! [`trunc_micros`]), so an entity read back equals the input after that truncation.
//!
//! `conformance` (tests, or the `conformance` feature) is the behaviour both backends must
//! show, runnable against any `Store`.

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;
mod db;
mod metered;
mod pg_batch;
mod postgres;
mod rows;
mod sql;
mod sqlite;

pub use metered::Metered;
pub use pg_batch::CreateWrites;
pub use rows::{traceparent, trunc_micros};
pub use sql::SqlStore;

#[cfg(test)]
mod tests;
