//! The lifecycle of an issuance as one state machine (DESIGN §6).
//!
//! Every change is planned here, by [`Issuance::plan`], from the issuance as it was read: the
//! plan is a [`Transition`] holding the issuance after the change, the event that records it,
//! its effect on the email outbox and the webhook it announces. A store applies a transition
//! atomically and only while the issuance still has the version the plan started from (a
//! compare-and-set); when another writer got in between, [`Lifecycle::execute`] reads again and
//! plans again. No store or transport decides a rule: they read, apply and translate.
//!
//! ```text
//!            retrieve offer, redeem code, email outcome
//!              ┌────┐
//!              ▼    │   issue credential         wallet: deleted / failure
//! create ──▶ pending ───────────────────▶ accepted ───────────────────────▶ rejected / error
//!              │                             │ wallet: accepted, email outcome
//!              │ cancel, expire              └──┘
//!              ▼
//!           rejected (cancelled / expired)
//! ```

use std::{fmt, str::FromStr, sync::Arc};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    ids::{IssuanceId, TenantId},
    model::{
        Delivery, EmailState, EventKind, Issuance, IssuanceEvent, IssuanceStatus, Reason,
        WalletEvent,
    },
    ports::{EventNotifier, Store},
    status::{CredentialStatus, IssuedCredentials, StatusRef},
    webhook,
};

/// Where an issuance's offer stands for whoever holds its link. The one rule that the offer
/// endpoint, the landing page, the QR endpoint, the token endpoint and the mailer all follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferPhase {
    /// Redeemable: pending, unexpired, its code not yet redeemed.
    Open,
    Expired,
    /// A wallet redeemed the code (and holds a token or the credential).
    Used,
    /// Cancelled by the issuer, or ended without a credential.
    Withdrawn,
}

impl OfferPhase {
    /// How a wallet is told that the offer is closed.
    pub const fn describe(self) -> &'static str {
        match self {
            OfferPhase::Open => "the offer is open",
            OfferPhase::Expired => "the offer has expired",
            OfferPhase::Used => "the offer has been redeemed by a wallet",
            OfferPhase::Withdrawn => "the offer was withdrawn",
        }
    }
}

/// Something that may happen to an issuance after it was created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// A wallet fetches the offer; only the first fetch is an event.
    RetrieveOffer,
    /// A wallet redeems the pre-authorized code for an access token.
    RedeemCode,
    /// The credentials were signed for the wallet, which gets this notification id with them:
    /// one copy per status entry, valid until `expires_at`.
    IssueCredential {
        notification_id: String,
        copies: Vec<StatusRef>,
        expires_at: DateTime<Utc>,
    },
    /// The issuer's backend revokes (final), suspends or reinstates the issued credentials;
    /// `reason` is its own words for the history.
    SetCredentialStatus {
        to: CredentialStatus,
        reason: Option<String>,
    },
    /// The wallet's notification about the credential it holds.
    Notify(WalletEvent),
    /// The issuer's backend withdraws the offer.
    Cancel,
    /// The sweeper ends an offer that reached its expiry.
    Expire,
    /// The outcome of an offer email attempt.
    EmailOutcome(EmailUpdate),
}

/// Why a command does not apply to the issuance as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The offer cannot be fetched or redeemed any more.
    OfferClosed(OfferPhase),
    /// The credential was already issued, the code was never redeemed, or the offer ended.
    NotIssuable,
    /// The issuance ended otherwise and can no longer be cancelled.
    NotCancellable {
        status: IssuanceStatus,
        reason: Option<Reason>,
    },
    /// Every transaction-code attempt is spent.
    TxCodeAttemptsSpent,
    /// Another mailer took the email over; this attempt's outcome is dropped.
    EmailLeaseLost,
    /// No credential was issued (yet): there is no status to change.
    NoCredential { status: IssuanceStatus },
    /// The credentials are revoked, which is final.
    CredentialRevoked,
}

/// What a transition does to the status-list entries of the issuance's credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusEntries {
    /// New entries, one per credential copy, all valid.
    Add(Vec<StatusRef>),
    /// Every entry of the issuance takes this status.
    Set(CredentialStatus),
}

/// The outcome of one email attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailUpdate {
    /// The lease the attempt ran under (the claimed row's `next_attempt_at`).
    pub claimed_until: DateTime<Utc>,
    pub state: EmailState,
    /// When `state` is `Pending`: the next attempt.
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
}

/// What a transition does to the issuance's email outbox row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailChange {
    /// Records an attempt, only while the row is still pending under the attempt's lease.
    Record(EmailUpdate),
    /// The offer is over: an email not sent yet must not go out.
    CancelPending,
}

/// A planned change, applied atomically: the issuance row, its event, the email outbox and the
/// webhook deliveries, or nothing at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// Applies only while the stored issuance has this version.
    pub expected_version: i64,
    /// The issuance after the change; its `version` is one more, its payload `None` when purged.
    pub after: Issuance,
    /// The event that records the change; its `sequence` is the new version.
    pub event: IssuanceEvent,
    pub email: Option<EmailChange>,
    /// The change of its status-list entries, if any.
    pub status_entries: Option<StatusEntries>,
    /// The webhook type the event announces, if any.
    pub webhook: Option<&'static str>,
}

impl Transition {
    /// The new status and reason when the transition changes them.
    pub fn status_change(&self) -> Option<(IssuanceStatus, Option<Reason>)> {
        (self.event.kind.changes_status()).then_some((self.after.status, self.after.reason))
    }

    /// The webhook message: `(type, message id, body)`.
    pub fn webhook_message(&self) -> Option<(&'static str, String, Value)> {
        self.webhook.map(|kind| {
            (
                kind,
                webhook::message_id(self.after.id, self.event.sequence),
                webhook::payload(&self.after, &self.event, kind),
            )
        })
    }

    /// Applies the transition to `current` as a store does: the issuance after it, or `None`
    /// when `current` moved on since the plan (the compare-and-set fails; nothing changes).
    pub fn apply_to(&self, current: &Issuance) -> Option<Issuance> {
        (current.version == self.expected_version && current.id == self.after.id)
            .then(|| self.after.clone())
    }
}

/// What applying a transition did.
#[derive(Debug, Clone, PartialEq)]
pub enum TransitionOutcome {
    /// Applied; the issuance as stored now.
    Applied(Box<Issuance>),
    /// The issuance is gone or no longer has the expected version: nothing changed.
    Stale,
    /// The email row is no longer pending under the attempt's lease: nothing changed.
    EmailLeaseLost,
}

/// A transaction-code attempt to reserve before the code is compared: counted only while the
/// issuance still has `version` (its offer open) and fewer than `max_attempts` were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxCodeAttempt {
    pub tenant_id: TenantId,
    pub id: IssuanceId,
    pub version: i64,
    pub max_attempts: i64,
}

impl Issuance {
    /// Where the offer stands at `now`.
    pub fn offer_phase(&self, now: DateTime<Utc>) -> OfferPhase {
        match self.status {
            _ if self.code_redeemed_at.is_some() => OfferPhase::Used,
            IssuanceStatus::Pending if self.expires_at > now => OfferPhase::Open,
            IssuanceStatus::Pending => OfferPhase::Expired,
            _ if self.reason == Some(Reason::Expired) => OfferPhase::Expired,
            IssuanceStatus::Accepted => OfferPhase::Used,
            IssuanceStatus::Rejected | IssuanceStatus::Error => OfferPhase::Withdrawn,
        }
    }

    /// The first event of a new issuance.
    pub fn created_event(&self) -> IssuanceEvent {
        IssuanceEvent {
            tenant_id: self.tenant_id,
            issuance_id: self.id,
            sequence: 1,
            global_sequence: 0,
            kind: EventKind::Created,
            status: IssuanceStatus::Pending,
            reason: None,
            occurred_at: self.created_at,
        }
    }

    /// Plans `command` at `now`: the transition to apply, `Ok(None)` when there is nothing to
    /// change (the command already took effect, or a wallet retried), or why it is refused.
    pub fn plan(
        &self,
        command: &Command,
        now: DateTime<Utc>,
    ) -> Result<Option<Transition>, Refused> {
        use IssuanceStatus::{Accepted, Error as Failed, Pending, Rejected};
        let phase = self.offer_phase(now);
        let mut after = self.clone();
        let mut status_entries = None;
        let mut reason = None;
        let (kind, email) = match command {
            Command::RetrieveOffer => {
                if phase != OfferPhase::Open {
                    return Err(Refused::OfferClosed(phase));
                }
                if self.offer_retrieved_at.is_some() {
                    return Ok(None);
                }
                after.offer_retrieved_at = Some(now);
                (EventKind::OfferRetrieved, None)
            }
            Command::RedeemCode => {
                if phase != OfferPhase::Open {
                    return Err(Refused::OfferClosed(phase));
                }
                after.code_redeemed_at = Some(now);
                (EventKind::TokenIssued, None)
            }
            Command::IssueCredential {
                notification_id,
                copies,
                expires_at,
            } => {
                if self.status != Pending || self.code_redeemed_at.is_none() || copies.is_empty() {
                    return Err(Refused::NotIssuable);
                }
                after.status = Accepted;
                after.notification_id = Some(notification_id.clone());
                after.credential = Some(IssuedCredentials {
                    status: CredentialStatus::Valid,
                    count: copies.len() as i64,
                    expires_at: *expires_at,
                });
                status_entries = Some(StatusEntries::Add(copies.clone()));
                (EventKind::CredentialIssued, None)
            }
            Command::SetCredentialStatus { to, reason: why } => {
                let Some(mut credential) = self.credential else {
                    return Err(Refused::NoCredential {
                        status: self.status,
                    });
                };
                // Already so (revoking a revoked credential, reinstating a valid one): as
                // asked, nothing to change.
                if credential.status == *to {
                    return Ok(None);
                }
                if credential.status == CredentialStatus::Revoked {
                    return Err(Refused::CredentialRevoked);
                }
                credential.status = *to;
                after.credential = Some(credential);
                after.updated_at = now;
                status_entries = Some(StatusEntries::Set(*to));
                reason = why.clone();
                let kind = match to {
                    CredentialStatus::Revoked => EventKind::CredentialRevoked,
                    CredentialStatus::Suspended => EventKind::CredentialSuspended,
                    CredentialStatus::Valid => EventKind::CredentialReinstated,
                };
                (kind, None)
            }
            Command::Notify(event) => {
                // A notification after the status moved on changes nothing and is no error:
                // wallets retry notifications.
                if self.status != Accepted {
                    return Ok(None);
                }
                match event {
                    WalletEvent::Accepted => {}
                    WalletEvent::Deleted => {
                        after.status = Rejected;
                        after.reason = Some(Reason::Declined);
                    }
                    WalletEvent::Failure => {
                        after.status = Failed;
                        after.reason = Some(Reason::CredentialFailure);
                    }
                }
                (event.kind(), None)
            }
            Command::Cancel => match (self.status, self.reason) {
                (Pending, _) => {
                    after.status = Rejected;
                    after.reason = Some(Reason::Cancelled);
                    (EventKind::Cancelled, None)
                }
                (Rejected, Some(Reason::Cancelled)) => return Ok(None),
                (status, reason) => return Err(Refused::NotCancellable { status, reason }),
            },
            Command::Expire => {
                if self.status != Pending || self.expires_at > now {
                    return Ok(None);
                }
                after.status = Rejected;
                after.reason = Some(Reason::Expired);
                (EventKind::Expired, None)
            }
            Command::EmailOutcome(update) => {
                let kind = if update.state == EmailState::Sent {
                    EventKind::EmailSent
                } else {
                    EventKind::EmailFailed
                };
                (kind, Some(EmailChange::Record(update.clone())))
            }
        };
        let status_changed = after.status != self.status;
        if status_changed {
            after.updated_at = now;
            if !after.status.keeps_payload() {
                after.payload = None;
            }
        }
        after.version = self.version + 1;
        let email = match email {
            None if status_changed
                && self.status == Pending
                && self.delivery == Delivery::Email =>
            {
                Some(EmailChange::CancelPending)
            }
            email => email,
        };
        let event = IssuanceEvent {
            tenant_id: self.tenant_id,
            issuance_id: self.id,
            sequence: after.version,
            global_sequence: 0,
            kind,
            status: after.status,
            // An email attempt's event carries its error, a credential status change the
            // caller's reason; every other event the issuance's reason.
            reason: match &email {
                Some(EmailChange::Record(update)) => update.error.clone(),
                _ if kind.changes_credential_status() => reason,
                _ => after.reason.map(|r| r.as_str().to_owned()),
            },
            occurred_at: now,
        };
        Ok(Some(Transition {
            expected_version: self.version,
            webhook: webhook::event_type(&event, status_changed),
            after,
            event,
            email,
            status_entries,
        }))
    }

    /// Plans a transaction-code attempt: while the offer is open and attempts remain.
    pub fn plan_tx_code_attempt(
        &self,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> Result<TxCodeAttempt, Refused> {
        match self.offer_phase(now) {
            OfferPhase::Open if self.tx_code_failures < max_attempts => Ok(TxCodeAttempt {
                tenant_id: self.tenant_id,
                id: self.id,
                version: self.version,
                max_attempts,
            }),
            OfferPhase::Open => Err(Refused::TxCodeAttemptsSpent),
            phase => Err(Refused::OfferClosed(phase)),
        }
    }
}

impl EventKind {
    /// Whether events of this kind change the status of issued credentials.
    pub const fn changes_credential_status(self) -> bool {
        matches!(
            self,
            EventKind::CredentialRevoked
                | EventKind::CredentialSuspended
                | EventKind::CredentialReinstated
        )
    }

    /// Whether events of this kind move the issuance to another status.
    pub const fn changes_status(self) -> bool {
        matches!(
            self,
            EventKind::Cancelled
                | EventKind::Expired
                | EventKind::CredentialIssued
                | EventKind::CredentialDeleted
                | EventKind::CredentialFailure
        )
    }
}

/// What executing a command did.
#[derive(Debug, Clone, PartialEq)]
pub enum Executed {
    /// Applied and announced; the issuance as it is now.
    Applied(Issuance),
    /// Nothing to change; the issuance as it is.
    Unchanged(Issuance),
    /// The command does not apply; the issuance as it is.
    Refused(Issuance, Refused),
    NotFound,
}

/// How often a command is planned again when other writers keep getting in first. Each retry
/// means another change of the same issuance committed meanwhile, and an issuance has only a
/// handful of writers (its wallet, its backend, the sweeper, the mailer).
const MAX_PLANS: usize = 16;

/// Runs commands: read, plan, apply with compare-and-set, announce.
#[derive(Clone)]
pub struct Lifecycle {
    store: Arc<dyn Store>,
    notifier: Arc<dyn EventNotifier>,
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lifecycle").finish_non_exhaustive()
    }
}

impl Lifecycle {
    pub fn new(store: Arc<dyn Store>, notifier: Arc<dyn EventNotifier>) -> Self {
        Self { store, notifier }
    }

    /// Executes `command` on the issuance, starting from `read` when the caller already holds
    /// it (it is read again when it turns out stale).
    pub async fn execute(
        &self,
        tenant: TenantId,
        id: IssuanceId,
        read: Option<Issuance>,
        command: &Command,
        now: DateTime<Utc>,
    ) -> Result<Executed> {
        let mut current = read;
        for _ in 0..MAX_PLANS {
            let issuance = match current.take() {
                Some(i) => i,
                None => match self.store.get_issuance(tenant, id).await? {
                    Some(i) => i,
                    None => return Ok(Executed::NotFound),
                },
            };
            let transition = match issuance.plan(command, now) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(Executed::Unchanged(issuance)),
                Err(refused) => return Ok(Executed::Refused(issuance, refused)),
            };
            match self.store.transition(&transition).await? {
                TransitionOutcome::Applied(after) => {
                    self.notifier.notify(tenant, id);
                    if let Some(StatusEntries::Set(_)) = transition.status_entries {
                        self.announce_status_lists(tenant, id).await;
                    }
                    return Ok(Executed::Applied(*after));
                }
                TransitionOutcome::EmailLeaseLost => {
                    return Ok(Executed::Refused(issuance, Refused::EmailLeaseLost));
                }
                TransitionOutcome::Stale => {}
            }
        }
        Err(Error::unavailable(
            "the issuance kept changing while this request tried to change it; retry",
        ))
    }

    /// Tells every replica that the issuance's status lists changed. The change is committed
    /// whatever happens here: a failure only leaves replicas to notice at their next
    /// revalidation.
    async fn announce_status_lists(&self, tenant: TenantId, id: IssuanceId) {
        match self.store.status_lists_of(tenant, id).await {
            Ok(lists) => self.notifier.status_lists_changed(&lists),
            Err(e) => tracing::warn!(
                tenant_id = %tenant,
                issuance_id = %id,
                error = %e,
                "status lists of a changed credential not announced"
            ),
        }
    }

    /// Reserves a transaction-code attempt before the code is compared; returns the attempts
    /// made so far, this one included. However many guesses arrive at once, at most
    /// `max_attempts` in all are ever reserved.
    pub async fn reserve_tx_code_attempt(
        &self,
        read: Issuance,
        max_attempts: i64,
        now: DateTime<Utc>,
    ) -> Result<Result<i64, Refused>> {
        let mut issuance = read;
        for _ in 0..MAX_PLANS {
            let attempt = match issuance.plan_tx_code_attempt(max_attempts, now) {
                Ok(a) => a,
                Err(refused) => return Ok(Err(refused)),
            };
            if let Some(n) = self.store.reserve_tx_code_attempt(&attempt).await? {
                return Ok(Ok(n));
            }
            // Counted out by concurrent guesses, or the issuance changed: look again.
            issuance = match self
                .store
                .get_issuance(attempt.tenant_id, attempt.id)
                .await?
            {
                Some(i) => i,
                None => return Ok(Err(Refused::OfferClosed(OfferPhase::Withdrawn))),
            };
        }
        Err(Error::unavailable(
            "the issuance kept changing while this request tried to change it; retry",
        ))
    }
}

impl FromStr for WalletEvent {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "credential_accepted" => Ok(WalletEvent::Accepted),
            "credential_deleted" => Ok(WalletEvent::Deleted),
            "credential_failure" => Ok(WalletEvent::Failure),
            _ => Err(
                "event must be credential_accepted, credential_deleted or credential_failure"
                    .to_owned(),
            ),
        }
    }
}

impl WalletEvent {
    /// The kind of the event it records.
    pub const fn kind(self) -> EventKind {
        match self {
            WalletEvent::Accepted => EventKind::CredentialAccepted,
            WalletEvent::Deleted => EventKind::CredentialDeleted,
            WalletEvent::Failure => EventKind::CredentialFailure,
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn t0() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).unwrap()
    }

    fn new_issuance(delivery: Delivery) -> Issuance {
        Issuance {
            tenant_id: TenantId::new(),
            id: IssuanceId::new(),
            client_request_id: "crid-1".into(),
            request_fingerprint: "fp".into(),
            credential_configuration_id: "LEARCredentialEmployee".into(),
            status: IssuanceStatus::Pending,
            reason: None,
            version: 1,
            batch_id: None,
            payload: Some(json!({"mandatee": {"firstName": "Ada"}})),
            delivery,
            email: (delivery == Delivery::Email).then(|| "ada@example.com".into()),
            grant_type: crate::model::PRE_AUTHORIZED_CODE_GRANT.into(),
            offer_id: "offer".into(),
            pre_authorized_code_hash: "hash".into(),
            pre_authorized_code_sealed: "sealed".into(),
            tx_code_hash: None,
            tx_code_failures: 0,
            code_redeemed_at: None,
            notification_id: None,
            offer_retrieved_at: None,
            credential: None,
            expires_at: t0() + Duration::seconds(100),
            created_at: t0(),
            updated_at: t0(),
        }
    }

    /// An issuance, its event log and its email row, changed only as a store changes them.
    #[derive(Debug, Clone, PartialEq)]
    struct Memory {
        issuance: Issuance,
        events: Vec<IssuanceEvent>,
        /// The email row: its state and lease.
        email: Option<(EmailState, DateTime<Utc>)>,
        webhooks: Vec<&'static str>,
    }

    impl Memory {
        fn new(delivery: Delivery) -> Self {
            let issuance = new_issuance(delivery);
            Self {
                events: vec![issuance.created_event()],
                email: (delivery == Delivery::Email).then_some((EmailState::Pending, t0())),
                webhooks: Vec::new(),
                issuance,
            }
        }

        fn apply(&mut self, t: &Transition) -> TransitionOutcome {
            let Some(after) = t.apply_to(&self.issuance) else {
                return TransitionOutcome::Stale;
            };
            let mut email = self.email;
            match &t.email {
                Some(EmailChange::Record(update)) => match email {
                    Some((EmailState::Pending, lease)) if lease == update.claimed_until => {
                        email = Some((
                            update.state,
                            update.next_attempt_at.unwrap_or(update.claimed_until),
                        ));
                    }
                    _ => return TransitionOutcome::EmailLeaseLost,
                },
                Some(EmailChange::CancelPending) => {
                    if let Some((EmailState::Pending, lease)) = email {
                        email = Some((EmailState::Cancelled, lease));
                    }
                }
                None => {}
            }
            self.email = email;
            self.issuance = after.clone();
            self.events.push(t.event.clone());
            self.webhooks.extend(t.webhook);
            TransitionOutcome::Applied(Box::new(after))
        }
    }

    fn command() -> impl Strategy<Value = Command> {
        let email = (0..4u8, any::<bool>()).prop_map(|(state, own_lease)| {
            let state = [
                EmailState::Pending,
                EmailState::Sent,
                EmailState::Failed,
                EmailState::Cancelled,
            ][usize::from(state)];
            Command::EmailOutcome(EmailUpdate {
                claimed_until: if own_lease {
                    t0()
                } else {
                    t0() + Duration::seconds(1)
                },
                state,
                next_attempt_at: None,
                error: (state != EmailState::Sent).then(|| "smtp: 451".into()),
            })
        });
        prop_oneof![
            Just(Command::RetrieveOffer),
            Just(Command::RedeemCode),
            ("[a-z]{4}", 0..3usize).prop_map(|(notification_id, n)| issue(&notification_id, n)),
            (0..3usize, any::<bool>()).prop_map(|(to, reason)| Command::SetCredentialStatus {
                to: CredentialStatus::ALL[to],
                reason: reason.then(|| "left the company".into()),
            }),
            Just(Command::Notify(WalletEvent::Accepted)),
            Just(Command::Notify(WalletEvent::Deleted)),
            Just(Command::Notify(WalletEvent::Failure)),
            Just(Command::Cancel),
            Just(Command::Expire),
            email,
        ]
    }

    /// Issuing `copies` credentials.
    fn issue(notification_id: &str, copies: usize) -> Command {
        Command::IssueCredential {
            notification_id: notification_id.into(),
            copies: (0..copies as i64)
                .map(|idx| StatusRef {
                    list_id: uuid::Uuid::nil(),
                    idx,
                })
                .collect(),
            expires_at: t0() + Duration::days(365),
        }
    }

    fn is_terminal(status: IssuanceStatus) -> bool {
        matches!(status, IssuanceStatus::Rejected | IssuanceStatus::Error)
    }

    fn check_invariants(m: &Memory) {
        let i = &m.issuance;
        // Sequences are gap-free from 1, and the version is the last one.
        for (n, e) in m.events.iter().enumerate() {
            assert_eq!(e.sequence, n as i64 + 1);
        }
        assert_eq!(i.version, m.events.len() as i64);
        // The status is the last event's.
        assert_eq!(Some(i.status), m.events.last().map(|e| e.status));
        // Exactly one event ends the issuance once it ended, none before.
        let ending = m
            .events
            .iter()
            .filter(|e| e.kind.changes_status() && is_terminal(e.status))
            .count();
        assert_eq!(ending, usize::from(is_terminal(i.status)));
        // Only a pending issuance keeps its payload.
        assert_eq!(i.payload.is_some(), i.status == IssuanceStatus::Pending);
        // A credential was issued exactly when a notification id was handed out.
        let issued = m
            .events
            .iter()
            .filter(|e| e.kind == EventKind::CredentialIssued)
            .count();
        assert!(issued <= 1);
        assert_eq!(issued == 1, i.notification_id.is_some());
        assert_eq!(issued == 1, i.credential.is_some());
        // Credential status changes come after the credential, one event each, and nothing
        // follows a revocation but wallet and email news.
        let mut credential = None;
        for e in &m.events {
            match e.kind {
                EventKind::CredentialIssued => credential = Some(CredentialStatus::Valid),
                EventKind::CredentialRevoked => {
                    assert!(matches!(credential, Some(s) if s != CredentialStatus::Revoked));
                    credential = Some(CredentialStatus::Revoked);
                }
                EventKind::CredentialSuspended => {
                    assert_eq!(credential, Some(CredentialStatus::Valid));
                    credential = Some(CredentialStatus::Suspended);
                }
                EventKind::CredentialReinstated => {
                    assert_eq!(credential, Some(CredentialStatus::Suspended));
                    credential = Some(CredentialStatus::Valid);
                }
                _ => {}
            }
        }
        assert_eq!(credential, i.credential.map(|c| c.status));
        let credential_hooks = m.webhooks.iter().filter(|w| w.starts_with("credential."));
        let credential_events = m
            .events
            .iter()
            .filter(|e| e.kind.changes_credential_status());
        assert_eq!(credential_hooks.count(), credential_events.count());
        // A code is redeemed at most once, an offer's first fetch recorded at most once.
        for kind in [EventKind::TokenIssued, EventKind::OfferRetrieved] {
            assert!(m.events.iter().filter(|e| e.kind == kind).count() <= 1);
        }
        // Each status change announces its outcome once.
        let outcomes = m
            .webhooks
            .iter()
            .filter(|w| w.starts_with("issuance."))
            .count();
        let changes = m.events.iter().filter(|e| e.kind.changes_status()).count()
            + m.events
                .iter()
                .filter(|e| e.kind == EventKind::OfferRetrieved)
                .count();
        assert_eq!(outcomes, changes);
        // No email goes out once the offer is over.
        if i.status != IssuanceStatus::Pending && i.delivery == Delivery::Email {
            assert_ne!(m.email.map(|(s, _)| s), Some(EmailState::Pending));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any sequence of commands, at any times, applied fresh or from a stale read, keeps
        /// the invariants; a stale plan changes nothing.
        #[test]
        fn any_sequence_of_commands_keeps_the_invariants(
            email in any::<bool>(),
            steps in prop::collection::vec((command(), 0i64..60, any::<bool>()), 1..40),
        ) {
            let mut m = Memory::new(if email { Delivery::Email } else { Delivery::Qr });
            let mut now = t0();
            let mut previous = m.issuance.clone();
            for (command, advance, from_stale_read) in steps {
                now += Duration::seconds(advance);
                let read = if from_stale_read { previous.clone() } else { m.issuance.clone() };
                previous = m.issuance.clone();
                let before = m.clone();
                let Ok(Some(t)) = read.plan(&command, now) else { continue };
                let outcome = m.apply(&t);
                match outcome {
                    TransitionOutcome::Applied(after) => {
                        prop_assert_eq!(&*after, &m.issuance);
                        prop_assert_eq!(read.version, before.issuance.version);
                        // Nothing leaves a terminal status.
                        if is_terminal(before.issuance.status) {
                            prop_assert_eq!(after.status, before.issuance.status);
                        }
                    }
                    TransitionOutcome::Stale | TransitionOutcome::EmailLeaseLost => {
                        prop_assert_eq!(&m, &before);
                    }
                }
                check_invariants(&m);
            }
        }
    }

    #[test]
    fn the_offer_phase_follows_status_code_and_clock() {
        let open = new_issuance(Delivery::Qr);
        assert_eq!(open.offer_phase(t0()), OfferPhase::Open);
        assert_eq!(
            open.offer_phase(t0() + Duration::seconds(100)),
            OfferPhase::Expired
        );
        let redeemed = open
            .plan(&Command::RedeemCode, t0())
            .unwrap()
            .unwrap()
            .after;
        assert_eq!(redeemed.offer_phase(t0()), OfferPhase::Used);
        let cancelled = open.plan(&Command::Cancel, t0()).unwrap().unwrap().after;
        assert_eq!(cancelled.offer_phase(t0()), OfferPhase::Withdrawn);
        let expired = open
            .plan(&Command::Expire, t0() + Duration::seconds(100))
            .unwrap()
            .unwrap()
            .after;
        assert_eq!(expired.offer_phase(t0()), OfferPhase::Expired);
    }

    #[test]
    fn cancel_is_idempotent_and_refused_after_another_ending() {
        let open = new_issuance(Delivery::Email);
        let t = open.plan(&Command::Cancel, t0()).unwrap().unwrap();
        assert_eq!(t.email, Some(EmailChange::CancelPending));
        assert_eq!(t.webhook, Some(webhook::ISSUANCE_REJECTED));
        assert_eq!(t.event.reason.as_deref(), Some("cancelled"));
        assert_eq!(t.after.payload, None);
        assert_eq!(t.after.plan(&Command::Cancel, t0()), Ok(None));
        let expired = open
            .plan(&Command::Expire, t0() + Duration::seconds(100))
            .unwrap()
            .unwrap()
            .after;
        assert_eq!(
            expired.plan(&Command::Cancel, t0()),
            Err(Refused::NotCancellable {
                status: IssuanceStatus::Rejected,
                reason: Some(Reason::Expired)
            })
        );
    }

    #[test]
    fn a_credential_needs_a_redeemed_code_and_is_issued_once() {
        let open = new_issuance(Delivery::Qr);
        let issue = issue("n", 2);
        assert_eq!(open.plan(&issue, t0()), Err(Refused::NotIssuable));
        let redeemed = open
            .plan(&Command::RedeemCode, t0())
            .unwrap()
            .unwrap()
            .after;
        assert_eq!(
            redeemed.plan(&Command::RedeemCode, t0()),
            Err(Refused::OfferClosed(OfferPhase::Used))
        );
        let accepted = redeemed.plan(&issue, t0()).unwrap().unwrap();
        assert_eq!(accepted.webhook, Some(webhook::ISSUANCE_ACCEPTED));
        assert_eq!(
            accepted.status_change(),
            Some((IssuanceStatus::Accepted, None))
        );
        assert_eq!(accepted.after.plan(&issue, t0()), Err(Refused::NotIssuable));
        assert_eq!(accepted.after.credential.map(|c| c.count), Some(2));
        assert!(matches!(
            &accepted.status_entries,
            Some(StatusEntries::Add(copies)) if copies.len() == 2
        ));
        assert_eq!(
            redeemed.plan(
                &super::Command::IssueCredential {
                    notification_id: "n".into(),
                    copies: Vec::new(),
                    expires_at: t0(),
                },
                t0()
            ),
            Err(Refused::NotIssuable)
        );
    }

    fn set(to: CredentialStatus) -> Command {
        Command::SetCredentialStatus {
            to,
            reason: Some("left the company".into()),
        }
    }

    #[test]
    fn credential_status_changes_follow_the_rules_and_are_idempotent() {
        use CredentialStatus::{Revoked, Suspended, Valid};
        let open = new_issuance(Delivery::Qr);
        assert_eq!(
            open.plan(&set(Revoked), t0()),
            Err(Refused::NoCredential {
                status: IssuanceStatus::Pending
            })
        );
        let redeemed = open
            .plan(&Command::RedeemCode, t0())
            .unwrap()
            .unwrap()
            .after;
        let valid = redeemed.plan(&issue("n", 1), t0()).unwrap().unwrap().after;
        // Reinstating a valid credential changes nothing.
        assert_eq!(valid.plan(&set(Valid), t0()), Ok(None));
        let t = valid.plan(&set(Suspended), t0()).unwrap().unwrap();
        assert_eq!(t.event.kind, EventKind::CredentialSuspended);
        assert_eq!(t.event.status, IssuanceStatus::Accepted);
        assert_eq!(t.event.reason.as_deref(), Some("left the company"));
        assert_eq!(t.webhook, Some(webhook::CREDENTIAL_SUSPENDED));
        assert_eq!(t.status_entries, Some(StatusEntries::Set(Suspended)));
        assert_eq!(t.status_change(), None);
        let suspended = t.after;
        assert_eq!(suspended.plan(&set(Suspended), t0()), Ok(None));
        let reinstated = suspended.plan(&set(Valid), t0()).unwrap().unwrap();
        assert_eq!(reinstated.webhook, Some(webhook::CREDENTIAL_REINSTATED));
        let revoked = suspended.plan(&set(Revoked), t0()).unwrap().unwrap();
        assert_eq!(revoked.webhook, Some(webhook::CREDENTIAL_REVOKED));
        let revoked = revoked.after;
        assert_eq!(revoked.plan(&set(Revoked), t0()), Ok(None));
        for to in [Valid, Suspended] {
            assert_eq!(
                revoked.plan(&set(to), t0()),
                Err(Refused::CredentialRevoked)
            );
        }
        // The wallet deleting its copy ends the issuance, but the credential can still be
        // revoked: a copy may survive elsewhere.
        let declined = valid
            .plan(&Command::Notify(WalletEvent::Deleted), t0())
            .unwrap()
            .unwrap()
            .after;
        let t = declined.plan(&set(Revoked), t0()).unwrap().unwrap();
        assert_eq!(t.after.status, IssuanceStatus::Rejected);
        assert_eq!(t.after.credential.map(|c| c.status), Some(Revoked));
    }

    #[test]
    fn tx_code_attempts_are_planned_while_the_offer_is_open() {
        let mut open = new_issuance(Delivery::Qr);
        let attempt = open.plan_tx_code_attempt(5, t0()).unwrap();
        assert_eq!(attempt.version, 1);
        open.tx_code_failures = 5;
        assert_eq!(
            open.plan_tx_code_attempt(5, t0()),
            Err(Refused::TxCodeAttemptsSpent)
        );
        assert_eq!(
            open.plan_tx_code_attempt(5, t0() + Duration::seconds(100)),
            Err(Refused::OfferClosed(OfferPhase::Expired))
        );
    }
}
