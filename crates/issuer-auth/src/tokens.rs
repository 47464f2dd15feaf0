//! RFC 9068 JWT access tokens for the management API.

use std::{collections::HashMap, sync::Mutex};

use chrono::{DateTime, Utc};
use issuer_domain::{
    ids::{IssuanceId, TenantId},
    model::Scope,
    service::Principal,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::keys::SigningKey;

/// Why a token was refused. The message is for logs and `error_description`; it says what is
/// wrong without echoing the token.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

#[derive(Debug, Serialize, Deserialize)]
struct AccessClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: String,
    client_id: String,
    scope: String,
    tenant_id: String,
}

/// A freshly issued token, as the token endpoint returns it.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    pub access_token: String,
    pub expires_in: i64,
    pub scope: String,
}

/// Issues and verifies access tokens with one signing key; older keys may stay for
/// verification during rotation.
pub struct TokenService {
    issuer: String,
    audience: String,
    ttl_secs: i64,
    signing_kid: String,
    encoding: EncodingKey,
    verifying: HashMap<String, DecodingKey>,
    jwks: Value,
    /// Tokens already verified, until their `exp`: a backend reuses one token for many calls,
    /// and an ES256 verification costs more than the rest of a read. The key is the whole
    /// token, so a cached entry proves the exact bytes were verified.
    verified: Mutex<HashMap<String, (Principal, i64)>>,
}

const VERIFIED_CACHE_MAX: usize = 10_000;

impl TokenService {
    /// `issuer` and `audience` are compared exactly on verification.
    pub fn new(
        issuer: &str,
        audience: &str,
        ttl_secs: i64,
        signing: &SigningKey,
        previous: &[SigningKey],
    ) -> Self {
        let mut verifying = HashMap::new();
        let mut keys = Vec::new();
        for k in std::iter::once(signing).chain(previous) {
            verifying.insert(k.kid().to_owned(), k.decoding_key());
            keys.push(k.public_jwk());
        }
        Self {
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            ttl_secs,
            signing_kid: signing.kid().to_owned(),
            encoding: signing.encoding_key(),
            verifying,
            jwks: json!({ "keys": keys }),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// `{"keys": [...]}` with every verification key.
    pub fn jwks(&self) -> &Value {
        &self.jwks
    }

    pub fn issue(
        &self,
        tenant: TenantId,
        client_id: &str,
        scopes: &[Scope],
        now: DateTime<Utc>,
    ) -> IssuedToken {
        let scope = Scope::join(scopes);
        let claims = AccessClaims {
            iss: self.issuer.clone(),
            sub: client_id.to_owned(),
            aud: self.audience.clone(),
            exp: now.timestamp() + self.ttl_secs,
            iat: now.timestamp(),
            nbf: now.timestamp(),
            jti: Uuid::new_v4().to_string(),
            client_id: client_id.to_owned(),
            scope: scope.clone(),
            tenant_id: tenant.to_string(),
        };
        IssuedToken {
            access_token: self.sign(&claims),
            expires_in: self.ttl_secs,
            scope,
        }
    }

    /// An RFC 9068 JWT: ES256, `typ: at+jwt`, the current `kid`.
    fn sign(&self, claims: &impl Serialize) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.signing_kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("ES256 signing does not fail")
    }

    /// Verifies signature, algorithm (ES256 only), `typ`, `kid`, `iss`, `aud`, `exp`, `nbf`.
    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        let now = chrono::Utc::now().timestamp();
        if let Some((principal, exp)) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            && now < *exp
        {
            return Ok(principal.clone());
        }
        let (principal, exp) = self.verify_signed(token)?;
        let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= VERIFIED_CACHE_MAX {
            cache.retain(|_, (_, e)| now < *e);
            if cache.len() >= VERIFIED_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(token.to_owned(), (principal.clone(), exp));
        Ok(principal)
    }

    /// The full check: header, signature and claims. Returns the principal and `exp`.
    fn verify_signed(&self, token: &str) -> Result<(Principal, i64), TokenError> {
        let key = self.header_key(token)?;
        let data =
            jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation(&self.audience))
                .map_err(describe)?;
        let c = data.claims;
        let tenant_id = c
            .tenant_id
            .parse()
            .map_err(|_| TokenError("token has no valid tenant".into()))?;
        let scopes = Scope::parse_list(&c.scope).map_err(TokenError)?;
        let principal = Principal {
            tenant_id,
            client_id: c.client_id,
            scopes,
            expires_at: chrono::DateTime::from_timestamp(c.exp, 0)
                .ok_or_else(|| TokenError("token has no valid expiry".into()))?,
        };
        // Cached only until `exp` itself, without the leeway granted above.
        Ok((principal, c.exp))
    }
}

impl TokenService {
    /// Checks the header before any key is used: ES256 only (no `none`, no HS256 with a public
    /// key), `typ: at+jwt`, and a `kid` this service signs with.
    fn header_key(&self, token: &str) -> Result<&DecodingKey, TokenError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| TokenError("malformed access token".into()))?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError("unsupported token algorithm".into()));
        }
        let typ_ok = header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt")
        });
        if !typ_ok {
            return Err(TokenError(
                "not an access token (typ must be at+jwt)".into(),
            ));
        }
        header
            .kid
            .as_deref()
            .and_then(|kid| self.verifying.get(kid))
            .ok_or_else(|| TokenError("unknown signing key".into()))
    }

    /// Exact `iss` and `aud`, required `exp`/`nbf`/`sub`, 30 s leeway.
    fn validation(&self, audience: &str) -> Validation {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub", "nbf"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        validation
    }
}

/// Says what is wrong without echoing library internals or token contents.
fn describe(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    TokenError(
        match e.kind() {
            ErrorKind::ExpiredSignature => "the access token has expired",
            ErrorKind::ImmatureSignature => "the access token is not valid yet",
            ErrorKind::InvalidAudience | ErrorKind::InvalidIssuer => {
                "the access token was not issued for this service"
            }
            ErrorKind::InvalidSignature => "the access token signature does not verify",
            _ => "the access token is invalid",
        }
        .into(),
    )
}

/// Claims of a wallet's access token: bound to one issuance, audience the credential issuer
/// (so it is useless at the management API, whose audience differs, and vice versa).
#[derive(Debug, Serialize, Deserialize)]
struct WalletClaims {
    iss: String,
    sub: String,
    aud: String,
    exp: i64,
    iat: i64,
    nbf: i64,
    jti: String,
    tenant_id: String,
    issuance_id: String,
    /// RFC 9449 §6: the thumbprint of the key the token is bound to (`{"jkt": ...}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cnf: Option<Confirmation>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Confirmation {
    jkt: String,
}

/// What a verified wallet token grants: one issuance, and the key it is bound to, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalletGrant {
    pub tenant: TenantId,
    pub issuance: IssuanceId,
    /// The JWK thumbprint of the DPoP key the token is bound to; `None` for a bearer token.
    pub jkt: Option<String>,
}

impl TokenService {
    /// An access token for the wallet redeeming `issuance`'s pre-authorized code, bound to the
    /// DPoP key with thumbprint `jkt` when given (RFC 9449 `cnf.jkt`).
    pub fn issue_wallet(
        &self,
        tenant: TenantId,
        issuance: IssuanceId,
        jkt: Option<&str>,
        now: DateTime<Utc>,
    ) -> IssuedToken {
        let claims = WalletClaims {
            iss: self.issuer.clone(),
            sub: issuance.to_string(),
            aud: self.issuer.clone(),
            exp: now.timestamp() + self.ttl_secs,
            iat: now.timestamp(),
            nbf: now.timestamp(),
            jti: Uuid::new_v4().to_string(),
            tenant_id: tenant.to_string(),
            issuance_id: issuance.to_string(),
            cnf: jkt.map(|jkt| Confirmation {
                jkt: jkt.to_owned(),
            }),
        };
        IssuedToken {
            access_token: self.sign(&claims),
            expires_in: self.ttl_secs,
            scope: String::new(),
        }
    }

    /// Verifies a wallet token like `verify` does a management token, with the credential
    /// issuer as audience; returns the issuance it is bound to and its key binding.
    pub fn verify_wallet(&self, token: &str) -> Result<WalletGrant, TokenError> {
        let key = self.header_key(token)?;
        let data = jsonwebtoken::decode::<WalletClaims>(token, key, &self.validation(&self.issuer))
            .map_err(describe)?;
        let c = data.claims;
        match (c.tenant_id.parse(), c.issuance_id.parse()) {
            (Ok(tenant), Ok(issuance)) => Ok(WalletGrant {
                tenant,
                issuance,
                jkt: c.cnf.map(|c| c.jkt),
            }),
            _ => Err(TokenError("the access token is invalid".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(key: &SigningKey) -> TokenService {
        TokenService::new(
            "https://i.example/issuer",
            "https://i.example/issuer/api",
            300,
            key,
            &[],
        )
    }

    #[test]
    fn issued_tokens_verify_and_carry_the_principal() {
        let key = SigningKey::generate();
        let s = service(&key);
        let tenant = TenantId::new();
        let t = s.issue(tenant, "cli_1", &[Scope::IssuanceRead], Utc::now());
        let p = s.verify(&t.access_token).unwrap();
        assert_eq!(
            (p.tenant_id, p.client_id.as_str(), p.scopes),
            (tenant, "cli_1", vec![Scope::IssuanceRead])
        );
    }

    #[test]
    fn refuses_expired_foreign_and_unknown_key_tokens() {
        let key = SigningKey::generate();
        let s = service(&key);
        let old = s.issue(
            TenantId::new(),
            "c",
            &[],
            Utc::now() - chrono::Duration::hours(1),
        );
        assert!(s.verify(&old.access_token).is_err());
        let other = service(&SigningKey::generate());
        let foreign = other.issue(TenantId::new(), "c", &[], Utc::now());
        assert!(s.verify(&foreign.access_token).is_err());
        let wrong_aud = TokenService::new("https://i.example/issuer", "x", 300, &key, &[]);
        assert!(
            s.verify(
                &wrong_aud
                    .issue(TenantId::new(), "c", &[], Utc::now())
                    .access_token
            )
            .is_err()
        );
    }

    #[test]
    fn wallet_tokens_carry_their_key_binding() {
        let key = SigningKey::generate();
        let s = service(&key);
        let (tenant, issuance) = (TenantId::new(), IssuanceId::new());
        let bearer = s.issue_wallet(tenant, issuance, None, Utc::now());
        let grant = s.verify_wallet(&bearer.access_token).unwrap();
        assert_eq!(
            (grant.tenant, grant.issuance, grant.jkt),
            (tenant, issuance, None)
        );
        let bound = s.issue_wallet(tenant, issuance, Some("thumb"), Utc::now());
        let grant = s.verify_wallet(&bound.access_token).unwrap();
        assert_eq!(grant.jkt.as_deref(), Some("thumb"));
        use base64::Engine;
        let payload = bound.access_token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["cnf"], serde_json::json!({"jkt": "thumb"}));
        // A management token is no wallet token.
        let management = s.issue(tenant, "c", &[], Utc::now());
        assert!(s.verify_wallet(&management.access_token).is_err());
    }

    #[test]
    fn previous_keys_still_verify_during_rotation() {
        let old = SigningKey::generate();
        let new = SigningKey::generate();
        let token = service(&old).issue(TenantId::new(), "c", &[], Utc::now());
        let rotated = TokenService::new(
            "https://i.example/issuer",
            "https://i.example/issuer/api",
            300,
            &new,
            &[old],
        );
        assert!(rotated.verify(&token.access_token).is_ok());
        assert_eq!(rotated.jwks()["keys"].as_array().unwrap().len(), 2);
    }
}
