//! The wallet's side of an issuance (OID4VCI 1.0 pre-authorized code flow): redeem the code for
//! an access token, get a nonce, trade a key proof for the SD-JWT VC, report what became of it.
//!
//! Every change of the issuance is planned by the domain's lifecycle and applied with a
//! compare-and-set, so races are decided there. Invariants: a pre-authorized code yields one
//! token; a transaction code has an attempt cap after which the offer's code is dead;
//! a nonce is accepted once; an issuance yields one credential, and issuing it moves the
//! issuance to `accepted`, which purges the payload.

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use hmac::{Hmac, Mac};
use issuer_auth::{SigningKey, TokenService};
use issuer_domain::{
    Error, OAuthCode,
    catalog::{Catalog, CredentialConfiguration},
    ids::{IssuanceId, TenantId, random_token},
    lifecycle::{Command, Executed, Lifecycle, OfferPhase},
    model::WalletEvent,
    ports::{Clock, CodeSealer, EventNotifier, Store},
    service::hash_code,
    status::{StatusBlock, StatusRef},
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    CREDENTIAL_PAYLOAD_CLAIM, ProofPolicy, SdJwtVcInput, ValidProof, issue_sd_jwt_vc,
    statuslist::status_list_uri, validate_proofs,
};

type HmacSha256 = Hmac<Sha256>;

/// An error for the wallet, in the vocabulary of the endpoint it called (RFC 6749 §5.2 at the
/// token endpoint, OID4VCI §8.3.1.2 / §11.3 at the credential and notification endpoints).
#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("{code}: {description}")]
    Refused {
        code: OAuthCode,
        description: String,
    },
    /// A store failure: 503 or 500, never the wallet's fault.
    #[error(transparent)]
    Internal(#[from] Error),
}

impl WalletError {
    fn refused(code: OAuthCode, description: impl Into<String>) -> Self {
        Self::Refused {
            code,
            description: description.into(),
        }
    }
}

/// Tunables of the wallet flow.
#[derive(Debug, Clone)]
pub struct WalletSettings {
    /// Wrong transaction codes allowed before the offer's code is dead.
    pub tx_code_max_attempts: i64,
    pub nonce_ttl: Duration,
    /// Validity of issued credentials.
    pub credential_ttl: Duration,
    /// The most key proofs (credential copies) one credential request may carry.
    pub batch_size: usize,
    /// Entries of each new status list.
    pub status_list_size: i64,
}

impl Default for WalletSettings {
    fn default() -> Self {
        Self {
            tx_code_max_attempts: 5,
            nonce_ttl: Duration::minutes(5),
            credential_ttl: Duration::days(365),
            batch_size: 10,
            status_list_size: 131_072,
        }
    }
}

/// The token endpoint's answer to a wallet.
#[derive(Debug, Clone)]
pub struct WalletToken {
    pub access_token: String,
    pub expires_in: i64,
}

/// Which request shape the wallet used; the response follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestShape {
    /// OID4VCI 1.0: `credential_configuration_id` + `proofs`.
    V1,
    /// Draft 13/15: `format` (+ `vct`) + `proof`.
    Draft,
}

#[derive(Debug, Clone)]
pub struct IssuedCredential {
    /// One credential per key proof, in the order of the proofs (one for the draft shape).
    pub credentials: Vec<String>,
    pub notification_id: String,
    pub shape: RequestShape,
}

impl IssuedCredential {
    /// The credential response body for the request's shape.
    pub fn body(&self) -> Value {
        match self.shape {
            RequestShape::V1 => json!({
                "credentials": self
                    .credentials
                    .iter()
                    .map(|c| json!({"credential": c}))
                    .collect::<Vec<_>>(),
                "notification_id": self.notification_id,
            }),
            RequestShape::Draft => json!({
                "credential": self.credentials.first(),
                "notification_id": self.notification_id,
            }),
        }
    }
}

pub struct WalletService {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    sealer: Arc<dyn CodeSealer>,
    tokens: Arc<TokenService>,
    credential_key: SigningKey,
    catalog: Arc<Catalog>,
    credential_issuer: String,
    nonce_key: [u8; 32],
    settings: WalletSettings,
    lifecycle: Lifecycle,
}

impl WalletService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        sealer: Arc<dyn CodeSealer>,
        tokens: Arc<TokenService>,
        credential_key: SigningKey,
        catalog: Arc<Catalog>,
        credential_issuer: &str,
        nonce_key: [u8; 32],
        settings: WalletSettings,
        notifier: Arc<dyn EventNotifier>,
    ) -> Self {
        Self {
            lifecycle: Lifecycle::new(store.clone(), notifier),
            store,
            clock,
            sealer,
            tokens,
            credential_key,
            catalog,
            credential_issuer: credential_issuer.to_owned(),
            nonce_key,
            settings,
        }
    }

    /// The pre-authorized code grant: one code, one token.
    pub async fn token(
        &self,
        code: Option<&str>,
        tx_code: Option<&str>,
    ) -> Result<WalletToken, WalletError> {
        let code = code.filter(|c| !c.is_empty()).ok_or_else(|| {
            WalletError::refused(OAuthCode::InvalidRequest, "pre-authorized_code is required")
        })?;
        let invalid_grant = || {
            WalletError::refused(
                OAuthCode::InvalidGrant,
                "the pre-authorized code is invalid or expired",
            )
        };
        let now = self.clock.now();
        let issuance = self
            .store
            .find_issuance_by_code_hash(&hash_code(code))
            .await?
            .filter(|i| i.offer_phase(now) == OfferPhase::Open)
            .ok_or_else(invalid_grant)?;
        let (tenant, id) = (issuance.tenant_id, issuance.id);
        if let Some(expected) = issuance.tx_code_hash.clone() {
            let given = tx_code.filter(|t| !t.is_empty()).ok_or_else(|| {
                WalletError::refused(
                    OAuthCode::InvalidRequest,
                    "tx_code is required for this offer",
                )
            })?;
            // The attempt is reserved before the comparison, in one conditional write: however
            // many guesses arrive at once, at most the cap of them is ever compared.
            let attempts = self
                .lifecycle
                .reserve_tx_code_attempt(issuance.clone(), self.settings.tx_code_max_attempts, now)
                .await?
                .map_err(|_| invalid_grant())?;
            if !constant_time_eq(self.sealer.digest(given).as_bytes(), expected.as_bytes()) {
                tracing::info!(
                    tenant_id = %tenant,
                    issuance_id = %id,
                    attempts,
                    "wrong transaction code"
                );
                return Err(WalletError::refused(
                    OAuthCode::InvalidGrant,
                    "the transaction code is wrong",
                ));
            }
        }
        // Another request redeemed it first, or it was cancelled meanwhile: refused.
        let Executed::Applied(_) = self
            .lifecycle
            .execute(tenant, id, Some(issuance), &Command::RedeemCode, now)
            .await?
        else {
            return Err(invalid_grant());
        };
        let token = self.tokens.issue_wallet(tenant, id, None, now);
        tracing::info!(tenant_id = %tenant, issuance_id = %id, "wallet token issued");
        Ok(WalletToken {
            access_token: token.access_token,
            expires_in: token.expires_in,
        })
    }

    /// A fresh nonce: 8 bytes of expiry, 16 random bytes and a 128-bit MAC over both, so it
    /// verifies without storage; single use is enforced when a proof spends it.
    pub fn nonce(&self) -> String {
        let exp = (self.clock.now() + self.settings.nonce_ttl).timestamp();
        let mut body = exp.to_be_bytes().to_vec();
        body.extend(
            URL_SAFE_NO_PAD
                .decode(random_token(16))
                .expect("random_token is base64url"),
        );
        let tag = self.nonce_mac(&body);
        body.extend_from_slice(&tag[..16]);
        URL_SAFE_NO_PAD.encode(body)
    }

    fn nonce_mac(&self, body: &[u8]) -> [u8; 32] {
        let mut mac =
            HmacSha256::new_from_slice(&self.nonce_key).expect("HMAC takes any key length");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }

    /// The nonce's expiry if this service made it and it has not expired.
    fn check_nonce(&self, nonce: &str, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let raw = URL_SAFE_NO_PAD.decode(nonce).ok()?;
        if raw.len() != 40 {
            return None;
        }
        let (body, tag) = raw.split_at(24);
        if !constant_time_eq(&self.nonce_mac(body)[..16], tag) {
            return None;
        }
        let exp = DateTime::from_timestamp(i64::from_be_bytes(body[..8].try_into().ok()?), 0)?;
        (exp > now).then_some(exp)
    }

    /// The wallet's issuance, from its access token.
    fn wallet(&self, access_token: &str) -> Result<(TenantId, IssuanceId), WalletError> {
        self.tokens
            .verify_wallet(access_token)
            .map(|grant| (grant.tenant, grant.issuance))
            .map_err(|e| WalletError::refused(OAuthCode::InvalidToken, e.0))
    }

    /// Issues the credential for a credential request (1.0 or draft shape).
    pub async fn credential(
        &self,
        access_token: &str,
        body: &Value,
    ) -> Result<IssuedCredential, WalletError> {
        let (tenant, id) = self.wallet(access_token)?;
        let now = self.clock.now();
        let issuance = self.store.get_issuance(tenant, id).await?.ok_or_else(|| {
            WalletError::refused(
                OAuthCode::InvalidToken,
                "the access token's offer no longer exists",
            )
        })?;
        let not_issuable = || {
            WalletError::refused(
                OAuthCode::InvalidCredentialRequest,
                "the credential of this offer was already issued, or the offer ended",
            )
        };
        // Planned up front (with placeholder copies), so that nothing is allocated or signed
        // for an issuance that cannot take a credential; applied only once they are signed.
        let probe = Command::IssueCredential {
            notification_id: String::new(),
            copies: vec![StatusRef {
                list_id: uuid::Uuid::nil(),
                idx: 0,
            }],
            expires_at: now,
        };
        if issuance.plan(&probe, now).is_err() {
            return Err(not_issuable());
        }
        let config = self
            .catalog
            .get(&issuance.credential_configuration_id)
            .ok_or_else(|| {
                Error::internal("the issuance's credential configuration left the catalog")
            })?;
        let (shape, proofs) = parse_credential_request(config, body, self.settings.batch_size)?;
        let valid = validate_proofs(
            &proofs,
            &ProofPolicy::new(self.credential_issuer.clone()),
            now,
        )
        .map_err(|e| WalletError::refused(e.code.into(), e.message))?;
        self.spend_nonces(tenant, &valid, now).await?;
        let payload = issuance
            .payload
            .clone()
            .ok_or_else(|| Error::internal("a pending issuance has no payload"))?;
        let copies: Vec<StatusRef> = self
            .store
            .allocate_status(valid.len() as i64, self.settings.status_list_size)
            .await?
            .iter()
            .flat_map(StatusBlock::refs)
            .collect();
        let expires_at = now + self.settings.credential_ttl;
        let credentials =
            self.sign_copies(&config.vct, payload, &valid, &copies, now, expires_at)?;

        let notification_id = random_token(16);
        let issue = Command::IssueCredential {
            notification_id: notification_id.clone(),
            copies,
            expires_at,
        };
        match self
            .lifecycle
            .execute(tenant, id, Some(issuance), &issue, now)
            .await?
        {
            Executed::Applied(_) => {
                tracing::info!(
                    tenant_id = %tenant,
                    issuance_id = %id,
                    copies = credentials.len(),
                    "credential issued"
                );
                Ok(IssuedCredential {
                    credentials,
                    notification_id,
                    shape,
                })
            }
            // A concurrent request issued it, or the offer was cancelled: these copies are
            // dropped (their status entries are never used, nor handed out again).
            Executed::Unchanged(_) | Executed::Refused(..) | Executed::NotFound => {
                Err(not_issuable())
            }
        }
    }

    /// Every proof carries a nonce of ours; each distinct one is spent once (a batch usually
    /// signs one nonce into every proof).
    async fn spend_nonces(
        &self,
        tenant: TenantId,
        proofs: &[ValidProof],
        now: DateTime<Utc>,
    ) -> Result<(), WalletError> {
        let mut nonces: Vec<&str> = Vec::new();
        for proof in proofs {
            let nonce = proof.nonce.as_deref().ok_or_else(|| {
                WalletError::refused(
                    OAuthCode::InvalidProof,
                    "every proof must carry a nonce from the nonce endpoint",
                )
            })?;
            if !nonces.contains(&nonce) {
                nonces.push(nonce);
            }
        }
        for nonce in nonces {
            self.spend_nonce(tenant, nonce, now).await?;
        }
        Ok(())
    }

    /// One SD-JWT VC of `payload` per proof: bound to the proof's key, with its own salts and
    /// its own status entry of `copies`.
    fn sign_copies(
        &self,
        vct: &str,
        payload: Value,
        proofs: &[ValidProof],
        copies: &[StatusRef],
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Vec<String>, WalletError> {
        let mut claims = Map::new();
        claims.insert(CREDENTIAL_PAYLOAD_CLAIM.to_owned(), payload);
        proofs
            .iter()
            .zip(copies)
            .map(|(proof, copy)| {
                let uri = status_list_uri(&self.credential_issuer, copy.list_id);
                issue_sd_jwt_vc(
                    &SdJwtVcInput {
                        issuer: &self.credential_issuer,
                        vct,
                        iat: now,
                        exp: expires_at,
                        holder_jwk: &proof.holder_jwk,
                        claims: &claims,
                        status_list: Some((copy.idx, &uri)),
                    },
                    &self.credential_key,
                )
                .map(|issued| issued.compact)
                .map_err(|e| WalletError::refused(OAuthCode::InvalidProof, e.to_string()))
            })
            .collect()
    }

    /// Spends a nonce of ours: unknown, expired or used before is `invalid_nonce`.
    async fn spend_nonce(
        &self,
        tenant: TenantId,
        nonce: &str,
        now: DateTime<Utc>,
    ) -> Result<(), WalletError> {
        let nonce_exp = self.check_nonce(nonce, now).ok_or_else(|| {
            WalletError::refused(OAuthCode::InvalidNonce, "the nonce is unknown or expired")
        })?;
        let nonce_hash = URL_SAFE_NO_PAD.encode(Sha256::digest(nonce.as_bytes()));
        if !self.store.use_nonce(tenant, &nonce_hash, nonce_exp).await? {
            return Err(WalletError::refused(
                OAuthCode::InvalidNonce,
                "the nonce was already used",
            ));
        }
        Ok(())
    }

    /// A wallet's notification about the credential it received.
    pub async fn notify(&self, access_token: &str, body: &Value) -> Result<(), WalletError> {
        let (tenant, id) = self.wallet(access_token)?;
        let bad = |m: &str| WalletError::refused(OAuthCode::InvalidNotificationRequest, m);
        let notification_id = body
            .get("notification_id")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("notification_id is required"))?;
        let event = body
            .get("event")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("event is required"))?;
        let issuance = self.store.get_issuance(tenant, id).await?;
        let issuance = issuance.filter(|i| i.notification_id.as_deref() == Some(notification_id));
        let Some(issuance) = issuance else {
            return Err(WalletError::refused(
                OAuthCode::InvalidNotificationId,
                "unknown notification_id",
            ));
        };
        let command = Command::Notify(event.parse::<WalletEvent>().map_err(|m| bad(&m))?);
        // A notification after the status already moved on changes nothing and is no error:
        // wallets retry notifications.
        let outcome = self
            .lifecycle
            .execute(tenant, id, Some(issuance), &command, self.clock.now())
            .await?;
        tracing::info!(
            tenant_id = %tenant,
            issuance_id = %id,
            event,
            applied = matches!(outcome, Executed::Applied(_)),
            "wallet notification"
        );
        Ok(())
    }
}

/// The credential request's shape (1.0 or draft) and its `jwt` proofs (1 to `batch_size`, one
/// for the draft shape), for an offer of `config`. Refusals use the OID4VCI §8.3.1.2 codes.
pub fn parse_credential_request(
    config: &CredentialConfiguration,
    body: &Value,
    batch_size: usize,
) -> Result<(RequestShape, Vec<String>), WalletError> {
    let bad = |m: &str| WalletError::refused(OAuthCode::InvalidCredentialRequest, m);
    let obj = body
        .as_object()
        .ok_or_else(|| bad("the body must be a JSON object"))?;
    let shape = if obj.contains_key("format") {
        let format = obj["format"].as_str().unwrap_or_default();
        // `vc+sd-jwt` is the format name before SD-JWT VC draft 06.
        if format != config.format && !(config.format == "dc+sd-jwt" && format == "vc+sd-jwt") {
            return Err(WalletError::refused(
                OAuthCode::UnsupportedCredentialFormat,
                "this offer is for another credential format",
            ));
        }
        if obj
            .get("vct")
            .is_some_and(|v| v.as_str() != Some(config.vct.as_str()))
        {
            return Err(WalletError::refused(
                OAuthCode::UnsupportedCredentialFormat,
                "this offer is for another vct",
            ));
        }
        RequestShape::Draft
    } else {
        match obj
            .get("credential_configuration_id")
            .and_then(Value::as_str)
        {
            Some(id) if id == config.id => RequestShape::V1,
            Some(_) => {
                return Err(WalletError::refused(
                    OAuthCode::UnknownCredentialConfiguration,
                    "this offer is for another credential configuration",
                ));
            }
            None if obj.contains_key("credential_identifier") => {
                return Err(WalletError::refused(
                    OAuthCode::UnknownCredentialIdentifier,
                    "credential identifiers are not issued by this issuer; use credential_configuration_id",
                ));
            }
            None => return Err(bad("credential_configuration_id is required")),
        }
    };
    let proof = match (obj.get("proofs"), obj.get("proof")) {
        (Some(_), Some(_)) => return Err(bad("send either proofs or proof, not both")),
        (Some(proofs), None) => {
            let p = proofs.as_object().ok_or_else(|| {
                WalletError::refused(OAuthCode::InvalidProof, "proofs must be an object")
            })?;
            if p.keys().any(|k| k != "jwt") {
                return Err(WalletError::refused(
                    OAuthCode::InvalidProof,
                    "only the jwt proof type is supported",
                ));
            }
            match p.get("jwt").and_then(Value::as_array) {
                Some(jwts) if jwts.len() > batch_size => {
                    return Err(bad(&format!(
                        "at most {batch_size} proofs (batch_credential_issuance.batch_size)"
                    )));
                }
                Some(jwts) if !jwts.is_empty() => Some(
                    jwts.iter()
                        .map(|j| j.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| {
                            WalletError::refused(
                                OAuthCode::InvalidProof,
                                "every jwt proof must be a string",
                            )
                        })?,
                ),
                _ => None,
            }
        }
        (None, Some(proof)) => {
            if proof.get("proof_type").and_then(Value::as_str) != Some("jwt") {
                return Err(WalletError::refused(
                    OAuthCode::InvalidProof,
                    "only the jwt proof type is supported",
                ));
            }
            proof
                .get("jwt")
                .and_then(Value::as_str)
                .map(|j| vec![j.to_owned()])
        }
        (None, None) => None,
    };
    let proof = proof.ok_or_else(|| {
        WalletError::refused(OAuthCode::InvalidProof, "a jwt key proof is required")
    })?;
    Ok((shape, proof))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
