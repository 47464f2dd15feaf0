//! Retention (DESIGN §6, §14): what the service no longer needs is deleted on a schedule.
//!
//! - Used nonces once they have expired: an expired nonce is refused by its MAC anyway.
//! - Issuances that ended (left `pending`) more than `ISSUER_RETENTION_SECS` ago, with their
//!   events, email rows, webhook deliveries and attempts. A purged issuance reads as 404 and
//!   its `client_request_id` may be used again.
//!
//! Every replica runs a pass every `ISSUER_RETENTION_INTERVAL_SECS`, in batches of one
//! transaction each; the store gives concurrent passes disjoint rows (`SKIP LOCKED`), so
//! replicas share the work instead of repeating it.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use issuer_domain::{
    Error,
    model::Purged,
    ports::{Clock, Store},
};

/// Rows a batch deletes at most.
const BATCH: u32 = 500;

/// What a pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub nonces: u64,
    pub purged: Purged,
}

/// What retention needs of the store: the two kinds of deletion, in bounded batches.
#[async_trait]
pub trait Purge: Send + Sync + 'static {
    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, Error>;
    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged, Error>;
}

#[async_trait]
impl Purge for Arc<dyn Store> {
    async fn purge_used_nonces(&self, now: DateTime<Utc>, limit: u32) -> Result<u64, Error> {
        Store::purge_used_nonces(self.as_ref(), now, limit).await
    }
    async fn purge_ended(&self, ended_before: DateTime<Utc>, limit: u32) -> Result<Purged, Error> {
        Store::purge_ended(self.as_ref(), ended_before, limit).await
    }
}

pub struct Retention {
    store: Arc<dyn Purge>,
    clock: Arc<dyn Clock>,
    keep: chrono::Duration,
}

impl Retention {
    pub fn new(store: Arc<dyn Purge>, clock: Arc<dyn Clock>, keep: Duration) -> Self {
        Self {
            store,
            clock,
            keep: chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::MAX),
        }
    }

    /// Deletes everything due, batch by batch, until a batch comes back short.
    pub async fn pass(&self) -> Result<PassReport, Error> {
        let mut report = PassReport::default();
        loop {
            let n = self
                .store
                .purge_used_nonces(self.clock.now(), BATCH)
                .await?;
            count("nonces", n);
            report.nonces += n;
            if n < u64::from(BATCH) {
                break;
            }
        }
        loop {
            let before = self
                .clock
                .now()
                .checked_sub_signed(self.keep)
                .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
            let p = self.store.purge_ended(before, BATCH).await?;
            count("issuances", p.issuances);
            count("events", p.events);
            count("webhook_deliveries", p.webhook_deliveries);
            report.purged.issuances += p.issuances;
            report.purged.events += p.events;
            report.purged.webhook_deliveries += p.webhook_deliveries;
            if p.issuances < u64::from(BATCH) {
                break;
            }
            // Leave room for the traffic between two full batches.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if report != PassReport::default() {
            tracing::info!(
                nonces = report.nonces,
                issuances = report.purged.issuances,
                events = report.purged.events,
                webhook_deliveries = report.purged.webhook_deliveries,
                "retention pass deleted data past its lifetime"
            );
        }
        Ok(report)
    }

    /// Runs a pass every `interval` until `stop` turns true.
    pub async fn run(self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            if let Err(e) = self.pass().await {
                tracing::warn!(error = %e.chain(), "retention pass failed; retrying on the next tick");
            }
        }
    }
}

/// `issuer_retention_purged_total{kind}`.
fn count(kind: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("issuer_retention_purged_total", "kind" => kind).increment(n);
    }
}

/// A pass against a fake store: batches until one comes back short, and the cutoff.
#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use chrono::TimeZone;

    use super::*;
    use crate::test_support::FixedClock;

    /// Has `nonces` expired nonces and `ended` ended issuances (each with 3 events and 1
    /// delivery) to give, and keeps the cutoffs it was asked for.
    struct FakeStore {
        left: Mutex<(u64, u64)>,
        cutoffs: Mutex<Vec<DateTime<Utc>>>,
    }

    #[async_trait]
    impl Purge for FakeStore {
        async fn purge_used_nonces(&self, _: DateTime<Utc>, limit: u32) -> Result<u64, Error> {
            let mut left = self.left.lock().unwrap();
            let n = left.0.min(u64::from(limit));
            left.0 -= n;
            Ok(n)
        }
        async fn purge_ended(&self, before: DateTime<Utc>, limit: u32) -> Result<Purged, Error> {
            self.cutoffs.lock().unwrap().push(before);
            let mut left = self.left.lock().unwrap();
            let n = left.1.min(u64::from(limit));
            left.1 -= n;
            Ok(Purged {
                issuances: n,
                events: 3 * n,
                webhook_deliveries: n,
            })
        }
    }

    #[tokio::test]
    async fn a_pass_deletes_in_batches_until_one_is_short() {
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 9, 0, 0).unwrap();
        let store = Arc::new(FakeStore {
            left: Mutex::new((1_200, 1_000)),
            cutoffs: Mutex::new(Vec::new()),
        });
        let retention = Retention::new(
            store.clone(),
            Arc::new(FixedClock(now)),
            Duration::from_secs(30 * 24 * 3600),
        );
        let report = retention.pass().await.unwrap();
        assert_eq!(
            report,
            PassReport {
                nonces: 1_200,
                purged: Purged {
                    issuances: 1_000,
                    events: 3_000,
                    webhook_deliveries: 1_000,
                },
            }
        );
        assert_eq!(*store.left.lock().unwrap(), (0, 0));
        // Two full batches and a short one, each with the same cutoff: 30 days back.
        let cutoffs = store.cutoffs.lock().unwrap().clone();
        assert_eq!(cutoffs.len(), 3);
        assert!(
            cutoffs
                .iter()
                .all(|c| *c == now - chrono::Duration::days(30))
        );
        // Nothing left: one short batch of each kind.
        assert_eq!(retention.pass().await.unwrap(), PassReport::default());
    }
}
