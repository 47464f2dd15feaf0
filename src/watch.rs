//! The watch stream shared by `WatchIssuance` and SSE: the events of one issuance after a
//! sequence, then live ones as they commit, until the outcome.
//!
//! A watcher subscribes to the event hub before it reads history (no gap), de-duplicates by
//! sequence (no repeats), and re-reads the store after any broadcast lag, after the hub reports
//! that announcements may have been lost, and every `resync` interval.
//!
//! A stream is bounded: one tenant holds at most `ISSUER_WATCH_MAX_PER_TENANT` open on a
//! replica, and a stream ends with `invalid_token` when the access token it was opened with
//! expires (the client resumes with a fresh token from the last sequence it received).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use issuer_coordination::events::EventHub;
use issuer_domain::{
    Error, ErrorCode,
    ids::TenantId,
    model::{EventKind, IssuanceEvent, IssuanceStatus},
    ports::Store,
    service::{IssuanceService, Principal},
    status::CredentialStatus,
};
use tokio::sync::{broadcast, mpsc};

/// One item of a watch stream.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Event(IssuanceEvent),
    Heartbeat,
}

/// Timing of watch streams.
#[derive(Debug, Clone, Copy)]
pub struct WatchTiming {
    pub heartbeat: Duration,
    pub resync: Duration,
}

/// Open watch streams per tenant on this replica.
#[derive(Debug, Default)]
pub struct WatchCounts(Mutex<HashMap<TenantId, usize>>);

/// One open stream of a tenant, counted until dropped.
pub struct WatchSlot {
    counts: Arc<WatchCounts>,
    tenant: TenantId,
}

impl WatchCounts {
    /// A slot for one more stream of `tenant`, unless it already holds `max`.
    pub fn acquire(self: &Arc<Self>, tenant: TenantId, max: usize) -> Result<WatchSlot, Error> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = counts.entry(tenant).or_insert(0);
        if *open >= max {
            return Err(Error::new(
                ErrorCode::RateLimited,
                format!("this tenant already has {max} watch streams open; close one first"),
            )
            .with("limit", max.to_string()));
        }
        *open += 1;
        Ok(WatchSlot {
            counts: Arc::clone(self),
            tenant,
        })
    }

    /// Streams of `tenant` open now.
    pub fn open(&self, tenant: TenantId) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&tenant)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = counts.get_mut(&self.tenant) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                counts.remove(&self.tenant);
            }
        }
    }
}

/// Opens watch streams: what one needs is here, not the whole service.
pub struct Watches {
    pub issuances: Arc<IssuanceService>,
    pub store: Arc<dyn Store>,
    pub hub: Arc<EventHub>,
    pub timing: WatchTiming,
    /// Open streams per tenant on this replica, and the most one tenant may hold.
    pub counts: Arc<WatchCounts>,
    pub max_per_tenant: usize,
    /// Turns true when the service shuts down: streams end then.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl Watches {
    /// The events of one issuance after `after`, then live ones as they commit, ending after the
    /// event that leaves `pending` (the outcome); resumed after the outcome, a stream of an
    /// issuance with credentials goes on until they are revoked. Heartbeats keep idle streams
    /// alive. Fails with `NotFound` for another tenant's issuance, before anything is streamed.
    pub async fn open(
        &self,
        who: Principal,
        issuance_id: String,
        after: i64,
    ) -> Result<mpsc::Receiver<Result<WatchItem, Error>>, Error> {
        // Subscribe before reading history, so nothing committed in between is missed.
        let mut news = self.hub.subscribe();
        // The whole history (a handful of events): it also tells where the log ends, so a resume
        // point past the end cannot hide the events still to come.
        let (issuance, history) = self.issuances.events(&who, &issuance_id, 0).await?;
        let slot = self.counts.acquire(who.tenant_id, self.max_per_tenant)?;
        let token_left = (who.expires_at - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO);
        let token_expires = tokio::time::Instant::now() + token_left;
        let end = history.last().map_or(0, |e| e.sequence);
        let (tx, rx) = mpsc::channel(64);
        let timing = self.timing;
        let mut stopping = self.stopping.clone();
        let (hub, store) = (self.hub.clone(), self.store.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (tenant, id) = (issuance.tenant_id, issuance.id);
            let mut last = after.clamp(0, end);
            // A stream ends at the outcome; resumed after it, a stream of an issuance with
            // credentials follows them until they are revoked.
            let outcome = history
                .iter()
                .find(|e| e.status != IssuanceStatus::Pending)
                .map(|e| e.sequence);
            let until = match outcome {
                Some(seq) if last >= seq && issuance.credential.is_some() => Until::Revocation,
                _ => Until::Outcome,
            };
            // `true` once the last event to send has been sent (or lies before `after`).
            let mut done = false;
            let first = take_new(history, &mut last, &mut done, until);
            let revoked = issuance
                .credential
                .is_some_and(|c| c.status == CredentialStatus::Revoked);
            if first.is_empty()
                && match until {
                    Until::Outcome => issuance.status != IssuanceStatus::Pending,
                    Until::Revocation => revoked,
                }
            {
                // Resumed after the last event there will be: nothing more will come.
                done = true;
            }
            for e in first {
                if tx.send(Ok(WatchItem::Event(e))).await.is_err() {
                    return;
                }
            }
            let mut heartbeat = tokio::time::interval(timing.heartbeat);
            heartbeat.tick().await;
            let mut since_resync = Duration::ZERO;
            let mut generation = hub.generation();
            while !done {
                let reread = tokio::select! {
                    msg = news.recv() => match msg {
                        Ok((t, i)) => t == tenant && i == id,
                        Err(broadcast::error::RecvError::Lagged(_)) => true,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    _ = heartbeat.tick() => {
                        if tx.send(Ok(WatchItem::Heartbeat)).await.is_err() {
                            return;
                        }
                        since_resync += timing.heartbeat;
                        let g = hub.generation();
                        let lost = g != generation;
                        generation = g;
                        if since_resync >= timing.resync || lost {
                            since_resync = Duration::ZERO;
                            true
                        } else {
                            false
                        }
                    }
                    _ = tx.closed() => return,
                    () = tokio::time::sleep_until(token_expires) => {
                        let expired = Error::new(
                            ErrorCode::InvalidToken,
                            "the access token expired; resume with a fresh one after the last sequence received",
                        );
                        let _ = tx.send(Err(expired)).await;
                        return;
                    }
                    // Shutting down: end the stream cleanly; the client resumes elsewhere from
                    // the last sequence it received.
                    _ = async { let _ = stopping.wait_for(|s| *s).await; } => return,
                };
                if !reread {
                    continue;
                }
                match store.list_events(tenant, id, last).await {
                    Ok(events) => {
                        for e in take_new(events, &mut last, &mut done, until) {
                            if tx.send(Ok(WatchItem::Event(e))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// The last event a stream sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Until {
    /// The one that leaves `pending`.
    Outcome,
    /// The revocation of the issued credentials (a stream resumed after the outcome).
    Revocation,
}

/// The events after `last` up to and including the last one to send; advances `last`, sets
/// `done` at that one. Drops anything already sent, so re-reads never repeat an event.
fn take_new(
    events: Vec<IssuanceEvent>,
    last: &mut i64,
    done: &mut bool,
    until: Until,
) -> Vec<IssuanceEvent> {
    let mut out = Vec::new();
    for e in events {
        if e.sequence <= *last {
            continue;
        }
        *last = e.sequence;
        let end = match until {
            Until::Outcome => e.status != IssuanceStatus::Pending,
            Until::Revocation => e.kind == EventKind::CredentialRevoked,
        };
        out.push(e);
        if end {
            *done = true;
            break;
        }
    }
    out
}
