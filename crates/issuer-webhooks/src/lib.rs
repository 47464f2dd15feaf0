//! The IO edge of webhook delivery (DESIGN §9).
//!
//! This crate knows how to put one signed webhook on the wire safely and how
//! long to wait before the next try. It deliberately knows nothing about the
//! outbox, storage, endpoints or workers: those decide *what* to send and
//! *when*, and call in here for *how*.
//!
//! - [`signing`]: Standard Webhooks `whsec_` secrets and `webhook-signature`.
//! - [`guard`]: the SSRF guard: which destinations may be contacted at all,
//!   checked on the URL at registration and on every resolved address at
//!   connect time.
//! - [`sender`]: one delivery attempt over HTTP, classified into an
//!   [`Outcome`](sender::Outcome) the scheduler can act on.
//! - [`schedule`]: the retry back-off with jitter and `Retry-After`.

pub mod guard;
pub mod schedule;
pub mod sender;
pub mod signing;

pub use guard::{
    ALLOW_NETWORKS_ENV, Cidr, GuardError, GuardedResolver, NetworkPolicy, ResolveError,
    refusal_reason,
};
pub use schedule::RetrySchedule;
pub use sender::{Attempt, Delivery, Outcome, RETRY_AFTER_CAP, Sender, parse_retry_after};
pub use signing::{SecretError, WebhookSecret, sign};

#[cfg(test)]
mod sender_tests;
