//! End-to-end tests of the service: the real binary's `run` on 127.0.0.1:0 against real
//! Postgres, Redis and SQLite, driven by real HTTP and gRPC clients. One test binary.

mod api;
mod architecture;
mod auth;
mod bulk;
mod email;
mod hardening;
#[allow(dead_code)] // each test module uses a subset of the harness
mod helpers;
mod idempotency;
mod lifecycle;
mod metrics;
mod offers;
mod openapi;
mod ops;
mod outage;
mod privacy;
mod status;
mod traces;
mod walkthrough;
mod wallet;
mod watch;
mod webhooks;
