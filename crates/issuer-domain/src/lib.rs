//! The issuer's core, free of IO: entities and id newtypes, validated input, the error codes
//! every adapter maps exactly once, the credential catalog, the ports (store, idempotency lock,
//! clock) and the use cases that the gRPC and REST adapters share.
//!
//! Nothing here knows tonic, axum, sqlx or redis; adapters depend on this crate, never the
//! reverse.

pub mod catalog;
pub mod create;
pub mod error;
pub mod ids;
pub mod lifecycle;
pub mod model;
pub mod ports;
pub mod schema;
pub mod service;
pub mod status;
pub mod webhook;

pub use error::{Error, ErrorCode, FieldViolation, OAuthCode};
