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

pub struct Retention {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keep: chrono::Duration,
}

impl Retention {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>, keep: Duration) -> Self {
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
