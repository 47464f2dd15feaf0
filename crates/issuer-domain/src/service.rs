//! The issuance use cases shared by the gRPC and REST adapters: create (idempotent), get, list,
//! and the wallet's credential-offer lookup.
//!
//! Idempotency (DESIGN §5): the unique (tenant, client_request_id) constraint in the store is the
//! guarantee. The lock only lets a concurrent duplicate wait for the first request instead of
//! doing the work again; when the lock is unavailable the store still decides.

use std::{
    collections::{HashMap, hash_map::Entry},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    catalog::Catalog,
    create::ValidCreate,
    error::{Error, ErrorCode, FieldViolation, Result},
    ids::{IssuanceId, TenantId, new_offer_id, new_pre_authorized_code, new_tx_code},
    lifecycle::{Command, Executed, Lifecycle, OfferPhase, Refused},
    model::{
        InsertOutcome, Issuance, IssuanceEvent, IssuanceStatus, ListFilter,
        PRE_AUTHORIZED_CODE_GRANT, Scope, Tenant,
    },
    ports::{Clock, CodeSealer, EventNotifier, IdempotencyLock, LockAttempt, Store},
    status::CredentialStatus,
};

/// Who is calling: taken only from a verified access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub tenant_id: TenantId,
    pub client_id: String,
    pub scopes: Vec<Scope>,
    /// When the caller's access token expires: streams opened with it end then.
    pub expires_at: DateTime<Utc>,
}

impl Principal {
    pub fn require(&self, scope: Scope) -> Result<()> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(Error::insufficient_scope(scope.as_str()))
        }
    }
}

/// The result of a create: the issuance and whether it already existed (a replay).
#[derive(Debug, Clone)]
pub struct CreateOutcome {
    pub issuance: Issuance,
    pub replayed: bool,
    /// The transaction code, in the response that created the issuance only: the caller
    /// delivers it to the recipient over a channel other than the offer's.
    pub tx_code: Option<String>,
}

/// List parameters as the caller sent them; validated here for both adapters.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub page_size: Option<i64>,
    pub page_token: Option<String>,
    pub status: Option<String>,
    pub client_request_id: Option<String>,
    /// Only the issuances of this batch create.
    pub batch_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub issuances: Vec<Issuance>,
    pub next_page_token: Option<String>,
}

/// Tunables of the create path.
#[derive(Debug, Clone)]
pub struct IdempotencySettings {
    /// How long a lock holder may take before the lock lapses.
    pub lock_ttl: Duration,
    /// How long a concurrent duplicate waits for the first request.
    pub lock_wait: Duration,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        Self {
            lock_ttl: Duration::from_secs(30),
            lock_wait: Duration::from_secs(10),
        }
    }
}

pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// Digits of a transaction code.
pub const TX_CODE_LENGTH: usize = 6;
pub const MAX_PAGE_SIZE: i64 = 200;

pub struct IssuanceService {
    store: Arc<dyn Store>,
    lock: Arc<dyn IdempotencyLock>,
    sealer: Arc<dyn CodeSealer>,
    clock: Arc<dyn Clock>,
    catalog: Arc<Catalog>,
    links: OfferLinks,
    idempotency: IdempotencySettings,
    tenants: Mutex<HashMap<TenantId, (Tenant, DateTime<Utc>)>>,
    notifier: Arc<dyn EventNotifier>,
    lifecycle: Lifecycle,
}

/// How long tenant settings are cached per instance, and how many.
const TENANT_CACHE_TTL: chrono::Duration = chrono::Duration::seconds(60);
const TENANT_CACHE_MAX: usize = 10_000;

/// The ports the issuance use cases run on.
pub struct IssuancePorts {
    pub store: Arc<dyn Store>,
    pub lock: Arc<dyn IdempotencyLock>,
    pub sealer: Arc<dyn CodeSealer>,
    pub clock: Arc<dyn Clock>,
    pub notifier: Arc<dyn EventNotifier>,
}

impl IssuanceService {
    pub fn new(
        ports: IssuancePorts,
        catalog: Arc<Catalog>,
        public_url: &str,
        idempotency: IdempotencySettings,
    ) -> Self {
        let IssuancePorts {
            store,
            lock,
            sealer,
            clock,
            notifier,
        } = ports;
        Self {
            lifecycle: Lifecycle::new(store.clone(), notifier.clone()),
            store,
            lock,
            sealer,
            clock,
            catalog,
            links: OfferLinks::new(public_url),
            idempotency,
            tenants: Mutex::new(HashMap::new()),
            notifier,
        }
    }

    /// The credential issuer identifier, `{public}/issuer`.
    pub fn credential_issuer(&self) -> String {
        self.links.credential_issuer()
    }

    /// Where this service's offers are found.
    pub fn links(&self) -> &OfferLinks {
        &self.links
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// `openid-credential-offer://?credential_offer_uri=<percent-encoded offer URL>`.
    pub fn credential_offer_uri(&self, issuance: &Issuance) -> String {
        self.links.credential_offer_uri(&issuance.offer_id)
    }

    /// Creates an offer, or returns the existing one for a replayed `client_request_id`.
    pub async fn create(&self, who: &Principal, body: &Value) -> Result<CreateOutcome> {
        self.create_in(who, body, None).await
    }

    /// A create that came in with a batch: as [`Self::create`], recording `batch` on a new
    /// issuance (a replay keeps the batch its issuance was created in).
    pub async fn create_in(
        &self,
        who: &Principal,
        body: &Value,
        batch: Option<uuid::Uuid>,
    ) -> Result<CreateOutcome> {
        self.create_many(who, std::slice::from_ref(body), batch)
            .await?
            .pop()
            .unwrap_or_else(|| Err(Error::internal("a create got no outcome")))
    }

    /// Many creates at once (a batch, or a group of an import stream). Each item is answered
    /// exactly as its own create would be, in order, and fails alone. A key repeated among the
    /// items replays its first valid occurrence, or is `idempotency_key_reused` when the
    /// requests differ. The items' idempotency locks are taken together (one round trip to a
    /// shared lock) and their rows written together (a few statements, not one each).
    pub async fn create_many(
        &self,
        who: &Principal,
        bodies: &[Value],
        batch: Option<uuid::Uuid>,
    ) -> Result<Vec<Result<CreateOutcome>>> {
        who.require(Scope::IssuanceWrite)?;
        let tenant = self.tenant(who.tenant_id).await?;
        let mut out: Vec<Option<Result<CreateOutcome>>> = bodies.iter().map(|_| None).collect();
        // The first valid occurrence of each key is written; the others follow it.
        let mut leads: Vec<Lead> = Vec::new();
        let mut lead_of: HashMap<String, usize> = HashMap::new();
        let mut repeats: Vec<(usize, usize, String)> = Vec::new();
        for (index, body) in bodies.iter().enumerate() {
            let request = match ValidCreate::parse(body, &self.catalog, &tenant) {
                Ok(request) => request,
                Err(e) => {
                    out[index] = Some(Err(e));
                    continue;
                }
            };
            let fingerprint = request.fingerprint();
            match lead_of.entry(request.client_request_id.as_str().to_owned()) {
                Entry::Occupied(lead) => repeats.push((index, *lead.get(), fingerprint)),
                Entry::Vacant(slot) => {
                    slot.insert(leads.len());
                    leads.push(Lead {
                        index,
                        request,
                        fingerprint,
                    });
                }
            }
        }
        let indices: Vec<usize> = leads.iter().map(|l| l.index).collect();
        let fingerprints: Vec<String> = leads.iter().map(|l| l.fingerprint.clone()).collect();
        let written = self.write_locked(who, &tenant, leads, batch).await;
        for (index, lead, fingerprint) in &repeats {
            out[*index] = Some(match &written[*lead] {
                Ok((InsertOutcome::Inserted(i) | InsertOutcome::Duplicate(i), _)) => {
                    replay(i.clone(), fingerprint)
                }
                Err(e) => Err(e.for_another()),
            });
        }
        for ((written, index), fingerprint) in written.into_iter().zip(indices).zip(fingerprints) {
            out[index] = Some(written.and_then(|(outcome, tx_code)| match outcome {
                InsertOutcome::Inserted(issuance) => Ok(CreateOutcome {
                    issuance,
                    replayed: false,
                    tx_code,
                }),
                InsertOutcome::Duplicate(existing) => replay(existing, &fingerprint),
            }));
        }
        Ok(out
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::internal("a create got no outcome"))))
            .collect())
    }

    /// Writes the leads under their idempotency locks, taken together: first those whose key
    /// nobody holds; then, holding nothing, the others once their holders are done (or the
    /// wait ran out), when the store finds the rows their holders wrote. The lock only spares
    /// racing duplicates the work: when it cannot be reached, the store decides alone. One
    /// outcome per lead, in order, with the transaction code of a new issuance.
    async fn write_locked(
        &self,
        who: &Principal,
        tenant: &Tenant,
        leads: Vec<Lead>,
        batch: Option<uuid::Uuid>,
    ) -> Vec<Written> {
        // Hash tag `{tenant}` keeps a tenant's keys on one Redis Cluster slot.
        let keys: Vec<String> = leads
            .iter()
            .map(|l| {
                format!(
                    "issuer:{{{}}}:idem:{}",
                    tenant.id,
                    URL_SAFE_NO_PAD.encode(l.request.client_request_id.as_str())
                )
            })
            .collect();
        let attempts = match self
            .lock
            .acquire_many(&keys, self.idempotency.lock_ttl)
            .await
        {
            Ok(attempts) => attempts,
            Err(e) => {
                tracing::warn!(error = %e, "idempotency lock unavailable; the database decides alone");
                Vec::new()
            }
        };
        let mut token = None;
        let (mut held, mut busy) = (Vec::new(), Vec::new());
        let (mut now, mut later) = (Vec::new(), Vec::new());
        for (((n, lead), key), attempt) in leads.into_iter().enumerate().zip(keys).zip(
            attempts
                .into_iter()
                .map(Some)
                .chain(std::iter::repeat(None)),
        ) {
            match attempt {
                Some(LockAttempt::Acquired(t)) => {
                    token = Some(t);
                    held.push(key);
                    now.push((n, lead));
                }
                Some(LockAttempt::Busy) => {
                    busy.push(key);
                    later.push((n, lead));
                }
                None => now.push((n, lead)),
            }
        }
        let mut out: Vec<Option<Written>> = (0..now.len() + later.len()).map(|_| None).collect();
        let first = self
            .insert_group(who, tenant.require_tx_code, now, batch)
            .await;
        if let Some(token) = token
            && let Err(e) = self.lock.release_many(&held, &token).await
        {
            tracing::warn!(error = %e, "idempotency locks not released; they lapse by themselves");
        }
        if !busy.is_empty() {
            match self
                .lock
                .wait_released(&busy, self.idempotency.lock_wait)
                .await
            {
                Ok(true) => {}
                Ok(false) => tracing::debug!(
                    keys = busy.len(),
                    "idempotency locks still held after the wait; the database decides"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "idempotency lock unavailable; the database decides alone")
                }
            }
        }
        let second = self
            .insert_group(who, tenant.require_tx_code, later, batch)
            .await;
        for (n, result) in first.into_iter().chain(second) {
            out[n] = Some(result);
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Err(Error::internal("a create was not written"))))
            .collect()
    }

    /// The tenant's settings, cached briefly: they bound offer lifetimes and rate limits,
    /// change rarely, and every create needs them.
    pub async fn tenant(&self, id: TenantId) -> Result<Tenant> {
        let now = self.clock.now();
        if let Some((tenant, until)) = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            && *until > now
        {
            return Ok(tenant.clone());
        }
        let tenant = self.store.get_tenant(id).await?.ok_or_else(|| {
            Error::new(
                ErrorCode::InvalidToken,
                "the token's tenant no longer exists",
            )
        })?;
        let mut cache = self.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= TENANT_CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, (tenant.clone(), now + TENANT_CACHE_TTL));
        Ok(tenant)
    }

    /// Drops the cached settings of a tenant changed through this process; other replicas see
    /// the change when their cache entry lapses (a minute at most).
    pub fn forget_tenant(&self, id: TenantId) {
        self.tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Inserts new issuances. The store's unique (tenant, client_request_id) constraint turns
    /// a duplicate, whether it raced this request or came long before, into a replay or a
    /// reuse error; the locks only made racing duplicates wait their turn.
    async fn insert_group(
        &self,
        who: &Principal,
        tenant_requires_tx_code: bool,
        leads: Vec<(usize, Lead)>,
        batch_id: Option<uuid::Uuid>,
    ) -> Vec<(usize, Written)> {
        if leads.is_empty() {
            return Vec::new();
        }
        let positions: Vec<usize> = leads.iter().map(|(n, _)| *n).collect();
        let now = self.clock.now();
        let mut tx_codes = Vec::with_capacity(leads.len());
        let items: Vec<(Issuance, IssuanceEvent)> = leads
            .into_iter()
            .map(|(_, lead)| {
                let request = lead.request;
                let code = new_pre_authorized_code();
                let tx_code = (request.tx_code || tenant_requires_tx_code).then(new_tx_code);
                let issuance = Issuance {
                    tenant_id: who.tenant_id,
                    id: IssuanceId::new(),
                    client_request_id: request.client_request_id.as_str().to_owned(),
                    request_fingerprint: lead.fingerprint,
                    credential_configuration_id: request.credential_configuration_id,
                    status: IssuanceStatus::Pending,
                    reason: None,
                    version: 1,
                    batch_id,
                    payload: Some(request.payload),
                    delivery: request.delivery,
                    email: request.email.map(|e| e.as_str().to_owned()),
                    grant_type: request.grant_type,
                    offer_id: new_offer_id(),
                    pre_authorized_code_hash: hash_code(&code),
                    pre_authorized_code_sealed: self.sealer.seal(&code),
                    tx_code_hash: tx_code.as_deref().map(|c| self.sealer.digest(c)),
                    tx_code_failures: 0,
                    code_redeemed_at: None,
                    offer_retrieved_at: None,
                    credential: None,
                    notification_id: None,
                    expires_at: now + chrono::Duration::seconds(request.expires_in),
                    created_at: now,
                    updated_at: now,
                };
                let event = issuance.created_event();
                tx_codes.push(tx_code);
                (issuance, event)
            })
            .collect();
        let outcomes = match self.store.insert_issuances(&items).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                let mut failed: Vec<_> = positions
                    .iter()
                    .skip(1)
                    .map(|n| (*n, Err(e.for_another())))
                    .collect();
                failed.insert(0, (positions[0], Err(e)));
                return failed;
            }
        };
        outcomes
            .into_iter()
            .zip(tx_codes)
            .zip(positions)
            .map(|((outcome, tx_code), n)| (n, outcome.map(|o| (o, tx_code))))
            .map(|(n, written)| {
                let Ok((outcome, tx_code)) = written else {
                    return (n, written);
                };
                if let InsertOutcome::Inserted(stored) = &outcome {
                    self.notifier.notify(stored.tenant_id, stored.id);
                    tracing::info!(
                        tenant_id = %stored.tenant_id,
                        issuance_id = %stored.id,
                        client_id = %who.client_id,
                        delivery = stored.delivery.as_str(),
                        batch_id = stored.batch_id.map(tracing::field::display),
                        "issuance created"
                    );
                }
                (n, Ok((outcome, tx_code)))
            })
            .collect()
    }

    /// One issuance of the caller's tenant; another tenant's is `NotFound` like a missing one.
    pub async fn get(&self, who: &Principal, id: &str) -> Result<Issuance> {
        who.require(Scope::IssuanceRead)?;
        let Ok(id) = id.parse::<IssuanceId>() else {
            return Err(Error::not_found("issuance"));
        };
        self.store
            .get_issuance(who.tenant_id, id)
            .await?
            .ok_or_else(|| Error::not_found("issuance"))
    }

    /// The `credential_offer_uri` of one of the caller's issuances, while its offer can still be
    /// redeemed; `InvalidState` once it is redeemed, cancelled or expired. The offer is a
    /// secret of `issuance:write`: whoever holds it can redeem it.
    pub async fn open_offer_uri(&self, who: &Principal, id: &str) -> Result<String> {
        who.require(Scope::IssuanceWrite)?;
        let issuance = self.get(who, id).await?;
        let closed = |why: &str| {
            Err(Error::new(ErrorCode::InvalidState, why.to_owned())
                .with("status", issuance.status.as_str()))
        };
        match issuance.offer_phase(self.clock.now()) {
            OfferPhase::Open => Ok(self.credential_offer_uri(&issuance)),
            phase @ (OfferPhase::Expired | OfferPhase::Used) => closed(phase.describe()),
            OfferPhase::Withdrawn => closed(&format!(
                "the offer is closed: the issuance is `{}`",
                issuance.status.as_str()
            )),
        }
    }

    pub async fn list(&self, who: &Principal, params: ListParams) -> Result<Page> {
        who.require(Scope::IssuanceRead)?;
        let mut violations = Vec::new();
        let limit = match params.page_size {
            None | Some(0) => DEFAULT_PAGE_SIZE,
            Some(n) if (1..=MAX_PAGE_SIZE).contains(&n) => n,
            Some(_) => {
                violations.push(crate::FieldViolation::new(
                    "page_size",
                    format!("must be from 1 to {MAX_PAGE_SIZE}"),
                ));
                DEFAULT_PAGE_SIZE
            }
        };
        let before = match params.page_token.as_deref().filter(|t| !t.is_empty()) {
            None => None,
            Some(t) => match decode_page_token(t) {
                Some(id) => Some(id),
                None => {
                    violations.push(crate::FieldViolation::new(
                        "page_token",
                        "is not a token this service issued",
                    ));
                    None
                }
            },
        };
        let status = match params.status.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => s
                .parse()
                .map_err(|m: String| violations.push(crate::FieldViolation::new("status", m)))
                .ok(),
        };
        let client_request_id = match params.client_request_id.filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => crate::create::ClientRequestId::parse(&s)
                .map_err(|m| violations.push(crate::FieldViolation::new("client_request_id", m)))
                .ok()
                .map(|_| s),
        };
        let batch_id = match params.batch_id.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => uuid::Uuid::parse_str(s)
                .map_err(|_| {
                    violations.push(crate::FieldViolation::new(
                        "batch_id",
                        "must be the batch_id of a batch create",
                    ))
                })
                .ok(),
        };
        if !violations.is_empty() {
            return Err(Error::invalid(violations));
        }
        let filter = ListFilter {
            status,
            client_request_id,
            batch_id,
            before,
            limit: (limit + 1) as u32,
        };
        let mut issuances = self.store.list_issuances(who.tenant_id, &filter).await?;
        let next_page_token = if issuances.len() as i64 > limit {
            issuances.truncate(limit as usize);
            issuances
                .last()
                .map(|i| URL_SAFE_NO_PAD.encode(i.id.to_string()))
        } else {
            None
        };
        Ok(Page {
            issuances,
            next_page_token,
        })
    }

    /// Cancels a pending issuance: `rejected` with reason `cancelled`; its offer and code stop
    /// working. Cancelling a cancelled issuance again returns it unchanged; one that already
    /// ended otherwise is `InvalidState`.
    pub async fn cancel(&self, who: &Principal, id: &str) -> Result<Issuance> {
        who.require(Scope::IssuanceWrite)?;
        let Ok(id) = id.parse::<IssuanceId>() else {
            return Err(Error::not_found("issuance"));
        };
        let now = self.clock.now();
        match self
            .lifecycle
            .execute(who.tenant_id, id, None, &Command::Cancel, now)
            .await?
        {
            Executed::Applied(i) => {
                tracing::info!(tenant_id = %i.tenant_id, issuance_id = %i.id, "issuance cancelled");
                Ok(i)
            }
            Executed::Unchanged(i) => Ok(i),
            Executed::Refused(i, _) => Err(Error::new(
                ErrorCode::InvalidState,
                format!(
                    "the issuance is {}{} and can no longer be cancelled",
                    i.status,
                    i.reason.map(|r| format!(" ({r})")).unwrap_or_default()
                ),
            )
            .with("status", i.status.as_str())),
            Executed::NotFound => Err(Error::not_found("issuance")),
        }
    }

    /// Revokes (`Revoked`, final), suspends (`Suspended`) or reinstates (`Valid`) every copy of
    /// the issuance's credentials; `reason` is recorded with the event. Asking for the status
    /// the credentials already have returns the issuance unchanged. An issuance without a
    /// credential, or a revoked one asked to change, is `InvalidState`.
    pub async fn set_credential_status(
        &self,
        who: &Principal,
        id: &str,
        to: CredentialStatus,
        reason: Option<&str>,
    ) -> Result<Issuance> {
        who.require(Scope::IssuanceWrite)?;
        let reason = reason.map(str::trim).filter(|r| !r.is_empty());
        if let Some(r) = reason
            && (r.chars().count() > 200 || r.chars().any(char::is_control))
        {
            return Err(Error::invalid(vec![FieldViolation::new(
                "reason",
                "must be at most 200 characters, without control characters",
            )]));
        }
        let Ok(id) = id.parse::<IssuanceId>() else {
            return Err(Error::not_found("issuance"));
        };
        let command = Command::SetCredentialStatus {
            to,
            reason: reason.map(str::to_owned),
        };
        match self
            .lifecycle
            .execute(who.tenant_id, id, None, &command, self.clock.now())
            .await?
        {
            Executed::Applied(i) => {
                tracing::info!(
                    tenant_id = %i.tenant_id,
                    issuance_id = %i.id,
                    credential_status = %to,
                    "credential status changed"
                );
                Ok(i)
            }
            Executed::Unchanged(i) => Ok(i),
            Executed::Refused(i, refused) => {
                let message = match refused {
                    Refused::CredentialRevoked => {
                        "the credentials are revoked, which is final".to_owned()
                    }
                    _ if i.status == IssuanceStatus::Pending => {
                        "the issuance is pending: no credential was issued yet (cancel it instead)"
                            .to_owned()
                    }
                    _ => format!("the issuance is {} and no credential was issued", i.status),
                };
                Err(Error::new(ErrorCode::InvalidState, message).with("status", i.status.as_str()))
            }
            Executed::NotFound => Err(Error::not_found("issuance")),
        }
    }

    /// Moves pending issuances past `expires_at` to `rejected` / `expired`, at most `limit` per
    /// call; returns how many it expired. Safe on every replica at once: a transition applies
    /// only while the issuance is still pending.
    pub async fn expire_overdue(&self, limit: u32) -> Result<usize> {
        let now = self.clock.now();
        let mut expired = 0;
        for (tenant, id) in self.store.overdue_pending(now, limit).await? {
            if let Executed::Applied(_) = self
                .lifecycle
                .execute(tenant, id, None, &Command::Expire, now)
                .await?
            {
                tracing::info!(tenant_id = %tenant, issuance_id = %id, "issuance expired");
                expired += 1;
            }
        }
        Ok(expired)
    }

    /// Events of one of the caller's issuances with `sequence > after`, oldest first, and the
    /// issuance itself.
    pub async fn events(
        &self,
        who: &Principal,
        id: &str,
        after: i64,
    ) -> Result<(Issuance, Vec<IssuanceEvent>)> {
        let issuance = self.get(who, id).await?;
        let events = self
            .store
            .list_events(who.tenant_id, issuance.id, after.max(0))
            .await?;
        Ok((issuance, events))
    }

    /// The issuance behind an offer id; a string that cannot be one is not looked up.
    async fn find_offer(&self, offer_id: &str) -> Result<Option<Issuance>> {
        if !crate::ids::is_offer_id(offer_id) {
            return Ok(None);
        }
        self.store.find_issuance_by_offer_id(offer_id).await
    }

    /// The credential offer JSON a wallet fetches from `credential_offer_uri`, while the
    /// issuance is pending and unexpired.
    pub async fn credential_offer(&self, offer_id: &str) -> Result<Value> {
        let now = self.clock.now();
        let gone = || Error::not_found("credential offer");
        let issuance = self.find_offer(offer_id).await?.ok_or_else(gone)?;
        // Only the first fetch is an event; every later one is a read.
        let issuance = match self
            .lifecycle
            .execute(
                issuance.tenant_id,
                issuance.id,
                Some(issuance),
                &Command::RetrieveOffer,
                now,
            )
            .await?
        {
            Executed::Applied(i) | Executed::Unchanged(i) => i,
            Executed::Refused(..) | Executed::NotFound => return Err(gone()),
        };
        let code = self.sealer.open(&issuance.pre_authorized_code_sealed)?;
        let mut grant = json!({"pre-authorized_code": code});
        if issuance.tx_code_hash.is_some() {
            grant["tx_code"] = json!({
                "input_mode": "numeric",
                "length": TX_CODE_LENGTH,
                "description": "Enter the code you received separately from this offer"
            });
        }
        Ok(json!({
            "credential_issuer": self.credential_issuer(),
            "credential_configuration_ids": [issuance.credential_configuration_id],
            "grants": { PRE_AUTHORIZED_CODE_GRANT: grant }
        }))
    }
}

/// What the recipient's landing page shows: the issuer as the tenant brands it and where the
/// offer stands. Nothing from the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Landing {
    pub issuer_name: String,
    pub branding: crate::model::Branding,
    pub offer: OfferState,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferState {
    /// Redeemable: the deep link, its expiry, and whether a transaction code will be asked for.
    Open {
        credential_offer_uri: String,
        expires_at: DateTime<Utc>,
        needs_tx_code: bool,
    },
    Expired,
    /// A wallet redeemed it.
    Used,
    /// Cancelled by the issuer, or ended without a credential.
    Withdrawn,
}

impl IssuanceService {
    /// The landing page of an offer, by its offer id (the recipient's link holds nothing else).
    pub async fn landing(&self, offer_id: &str) -> Result<Landing> {
        let issuance = self
            .find_offer(offer_id)
            .await?
            .ok_or_else(|| Error::not_found("offer"))?;
        let tenant = self.tenant(issuance.tenant_id).await?;
        let offer = match issuance.offer_phase(self.clock.now()) {
            OfferPhase::Open => OfferState::Open {
                credential_offer_uri: self.credential_offer_uri(&issuance),
                expires_at: issuance.expires_at,
                needs_tx_code: issuance.tx_code_hash.is_some(),
            },
            OfferPhase::Expired => OfferState::Expired,
            OfferPhase::Used => OfferState::Used,
            OfferPhase::Withdrawn => OfferState::Withdrawn,
        };
        Ok(Landing {
            issuer_name: tenant
                .branding
                .display_name
                .clone()
                .unwrap_or_else(|| tenant.name.clone()),
            branding: tenant.branding,
            offer,
        })
    }
}

/// What writing one create came to: the store's outcome, with the transaction code of a new
/// issuance.
type Written = Result<(InsertOutcome, Option<String>)>;

/// A create to write: the first valid occurrence of its key among the items of one call.
struct Lead {
    /// Its position among the items.
    index: usize,
    request: ValidCreate,
    fingerprint: String,
}

fn replay(existing: Issuance, fingerprint: &str) -> Result<CreateOutcome> {
    if existing.request_fingerprint == fingerprint {
        Ok(CreateOutcome {
            issuance: existing,
            replayed: true,
            tx_code: None,
        })
    } else {
        Err(Error::new(
            ErrorCode::IdempotencyKeyReused,
            "client_request_id was already used with a different request",
        ))
    }
}

/// SHA-256 of a pre-authorized code, base64url: what the store keeps and looks codes up by.
pub fn hash_code(code: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(code.as_bytes()))
}

fn decode_page_token(t: &str) -> Option<IssuanceId> {
    let bytes = URL_SAFE_NO_PAD.decode(t).ok()?;
    std::str::from_utf8(&bytes).ok()?.parse().ok()
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
/// Where an offer is found, from the service's public URL: the deep link a wallet opens and the
/// page a recipient opens in a browser.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferLinks {
    public_url: String,
}

impl OfferLinks {
    pub fn new(public_url: &str) -> Self {
        Self {
            public_url: public_url.trim_end_matches('/').to_owned(),
        }
    }

    /// The credential issuer identifier, `{public}/issuer`.
    pub fn credential_issuer(&self) -> String {
        format!("{}/issuer", self.public_url)
    }

    /// `openid-credential-offer://?credential_offer_uri=<percent-encoded offer URL>`.
    pub fn credential_offer_uri(&self, offer_id: &str) -> String {
        let url = format!(
            "{}/oid4vci/v1/credential-offer/{offer_id}",
            self.credential_issuer()
        );
        format!(
            "openid-credential-offer://?credential_offer_uri={}",
            percent_encode(&url)
        )
    }

    /// The recipient's landing page.
    pub fn landing_url(&self, offer_id: &str) -> String {
        format!("{}/issuer/offer/{offer_id}", self.public_url)
    }
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3 / 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offer_uri_is_percent_encoded() {
        assert_eq!(
            percent_encode("https://x.example/issuer/oid4vci/v1/credential-offer/a_b-c"),
            "https%3A%2F%2Fx.example%2Fissuer%2Foid4vci%2Fv1%2Fcredential-offer%2Fa_b-c"
        );
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let id = IssuanceId::new();
        assert_eq!(
            decode_page_token(&URL_SAFE_NO_PAD.encode(id.to_string())),
            Some(id)
        );
        assert_eq!(decode_page_token("!!"), None);
        assert_eq!(decode_page_token(&URL_SAFE_NO_PAD.encode("x")), None);
    }

    proptest::proptest! {
        /// Any text is a page token or nothing; never a panic.
        #[test]
        fn any_text_decodes_to_a_page_or_nothing(t in ".{0,80}", raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..60)) {
            let _ = decode_page_token(&t);
            let _ = decode_page_token(&URL_SAFE_NO_PAD.encode(&raw));
        }

        #[test]
        fn every_id_round_trips(bits in proptest::prelude::any::<u128>()) {
            let id = IssuanceId(uuid::Uuid::from_u128(bits));
            proptest::prop_assert_eq!(decode_page_token(&URL_SAFE_NO_PAD.encode(id.to_string())), Some(id));
        }
    }
}
