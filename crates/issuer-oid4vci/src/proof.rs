//! Validation of OID4VCI `jwt` key proofs (OID4VCI 1.0 Appendix F.1 "`jwt` Proof Type" and
//! F.4 "Verifying Proof", as required for the `proofs` parameter of §8.2).
//!
//! A key proof is how the wallet shows it holds the private key the credential will be bound to
//! (`cnf.jwk`). If we accepted a proof we should not, anyone could get a credential bound to a key
//! of their choosing, or replay someone else's proof; so every check below fails closed.
//!
//! Invariants:
//! - The key that verifies the signature is the key we return as `holder_jwk`, and it comes only
//!   from the proof's own header (`jwk`, or a `kid` that is a self-contained `did:jwk`). We never
//!   fetch keys (no `x5u`/`jku`/DID resolution over the network), so validation is IO-free.
//! - The algorithm is decided by our allow-list intersected with what we can tie to a key type
//!   (ES256 / ES384 / EdDSA); `none` and MAC algorithms are refused whatever the policy says,
//!   because a MAC "proof" proves nothing about an asymmetric key.
//! - `holder_jwk` holds only the public members for its key type, so nothing the wallet sent
//!   beyond the key itself (private parts, `x5c`, custom members) can reach a credential.
//! - Nonce freshness is *not* decided here: whether the `c_nonce` was issued by us and is unused
//!   needs state, so we hand it back and the caller answers `invalid_nonce`
//!   ([`ProofError::invalid_nonce`]). Per OID4VCI §8.3.1.2 a proof that *lacks* a nonce when the
//!   issuer has a Nonce Endpoint is `invalid_proof`, an unknown/expired/reused one is
//!   `invalid_nonce`.
//! - Error messages are fixed ASCII text without `"` or `\`, so they can go straight into an
//!   `error_description` (whose character set excludes those) and never echo attacker input.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk,
};
use serde_json::{Map, Value};

use crate::PRIVATE_JWK_MEMBERS;

/// The `typ` header value OID4VCI requires for `jwt` key proofs.
pub const PROOF_TYP: &str = "openid4vci-proof+jwt";

/// The most proofs one credential request may ever carry, whatever the configured batch size:
/// it bounds the signature verifications one request can make us do.
pub const MAX_PROOFS: usize = 100;

const DID_JWK_PREFIX: &str = "did:jwk:";

/// What a proof must satisfy besides its own internal consistency.
#[derive(Debug, Clone)]
pub struct ProofPolicy {
    /// The Credential Issuer Identifier; the proof's `aud` must contain it.
    pub audience: String,
    /// How old `iat` may be. Bounds the window in which a captured proof is replayable even if
    /// the caller's nonce bookkeeping were to fail.
    pub max_age: Duration,
    /// How far in the future `iat` may be, to tolerate wallet clock drift without letting a
    /// wallet pre-mint proofs that stay fresh for a long time.
    pub max_future_skew: Duration,
    /// Acceptable proof algorithms. Only ES256, ES384 and EdDSA can ever pass, because those are
    /// the ones we can match to a key type; anything else listed here is ignored.
    pub allowed_algs: Vec<Algorithm>,
    /// `Some(client_id)` when the wallet authenticated at the token endpoint: `iss` must then
    /// equal it. `None` for anonymous pre-authorized access, where `iss` may be absent.
    pub require_iss: Option<String>,
}

impl ProofPolicy {
    /// Defaults: 5 minutes of age, 60 s of future skew, ES256 / ES384 / EdDSA, no `iss` required.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            audience: audience.into(),
            max_age: Duration::minutes(5),
            max_future_skew: Duration::seconds(60),
            allowed_algs: vec![Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA],
            require_iss: None,
        }
    }
}

/// A proof that passed every stateless check.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidProof {
    /// The holder's public key: only `kty`, `crv`, `x` (and `y` for EC), ready for `cnf.jwk`.
    pub holder_jwk: Value,
    /// The `nonce` claim, for the caller to match against a `c_nonce` it issued and has not
    /// consumed. `None` when the proof carries none; whether that is acceptable is the caller's
    /// call (it is `invalid_proof` when a Nonce Endpoint is advertised).
    pub nonce: Option<String>,
    /// The algorithm the proof was signed with.
    pub alg: Algorithm,
}

/// The OID4VCI credential-error code a failed proof maps to (§8.3.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofErrorCode {
    InvalidProof,
    InvalidNonce,
}

impl ProofErrorCode {
    /// The wire value for the `error` member.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidProof => "invalid_proof",
            Self::InvalidNonce => "invalid_nonce",
        }
    }
}

impl From<ProofErrorCode> for issuer_domain::OAuthCode {
    fn from(code: ProofErrorCode) -> Self {
        match code {
            ProofErrorCode::InvalidProof => Self::InvalidProof,
            ProofErrorCode::InvalidNonce => Self::InvalidNonce,
        }
    }
}

impl std::fmt::Display for ProofErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a proof was refused; `message` is safe to use as `error_description`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ProofError {
    pub code: ProofErrorCode,
    pub message: String,
}

impl ProofError {
    pub fn invalid_proof(message: impl Into<String>) -> Self {
        Self {
            code: ProofErrorCode::InvalidProof,
            message: message.into(),
        }
    }

    /// For the caller's nonce bookkeeping: the proof's `c_nonce` is unknown, expired or spent.
    pub fn invalid_nonce(message: impl Into<String>) -> Self {
        Self {
            code: ProofErrorCode::InvalidNonce,
            message: message.into(),
        }
    }
}

fn invalid(message: &str) -> ProofError {
    ProofError::invalid_proof(message)
}

/// Validates every proof of a request; all must pass, each over a key of its own (a key is
/// bound to one credential at most). Between 1 and [`MAX_PROOFS`] proofs are accepted: an
/// empty list is a missing proof, a longer one more work than any wallet needs.
pub fn validate_proofs(
    jwts: &[String],
    policy: &ProofPolicy,
    now: DateTime<Utc>,
) -> Result<Vec<ValidProof>, ProofError> {
    if jwts.is_empty() {
        return Err(invalid("no key proof"));
    }
    if jwts.len() > MAX_PROOFS {
        return Err(invalid("too many key proofs"));
    }
    let valid: Vec<ValidProof> = jwts
        .iter()
        .map(|jwt| validate_proof(jwt, policy, now))
        .collect::<Result<_, _>>()?;
    for (n, proof) in valid.iter().enumerate() {
        if valid[..n].iter().any(|p| p.holder_jwk == proof.holder_jwk) {
            return Err(invalid("two key proofs are over the same key"));
        }
    }
    Ok(valid)
}

/// Validates one `jwt` key proof against `policy` at time `now`.
pub fn validate_proof(
    jwt: &str,
    policy: &ProofPolicy,
    now: DateTime<Utc>,
) -> Result<ValidProof, ProofError> {
    // We read the header ourselves rather than through `jsonwebtoken::Header`: its typed `Jwk`
    // silently drops private members such as `d`, which is exactly what we must detect.
    let header = decode_header(jwt)?;

    if header.get("typ").and_then(Value::as_str) != Some(PROOF_TYP) {
        return Err(invalid("typ must be openid4vci-proof+jwt"));
    }
    // RFC 7515 4.1.11: an extension we do not understand marked critical must be refused.
    if header.contains_key("crit") {
        return Err(invalid("unsupported crit header"));
    }

    let alg = signing_alg(&header, &policy.allowed_algs)?;
    let jwk = header_key(&header)?;
    let holder_jwk = public_jwk_for(&jwk, alg)?;

    let typed: Jwk = serde_json::from_value(holder_jwk.clone())
        .map_err(|_| invalid("header key is not a usable JWK"))?;
    let key = DecodingKey::from_jwk(&typed).map_err(|_| invalid("header key is not usable"))?;

    // Signature only: time and audience are checked below against the injected `now` and the
    // policy, so the library must not apply its own clock or claim rules.
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => invalid("signature does not verify with the header key"),
            _ => invalid("malformed key proof"),
        })?
        .claims;
    let Value::Object(claims) = claims else {
        return Err(invalid("proof payload is not a JSON object"));
    };

    check_audience(&claims, &policy.audience)?;
    check_times(&claims, policy, now)?;
    check_issuer(&claims, policy.require_iss.as_deref())?;

    let nonce = match claims.get("nonce") {
        None => None,
        Some(Value::String(n)) => Some(n.clone()),
        Some(_) => return Err(invalid("nonce must be a string")),
    };

    Ok(ValidProof {
        holder_jwk,
        nonce,
        alg,
    })
}

pub(crate) fn decode_header(jwt: &str) -> Result<Map<String, Value>, ProofError> {
    let mut parts = jwt.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(invalid("key proof is not a compact JWS"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| invalid("proof header is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(invalid("proof header is not a JSON object")),
    }
}

/// The header's `alg`, when it is one we can tie to a key type (ES256, ES384, EdDSA) and
/// `allowed` lists it; `none` and MAC algorithms never pass.
pub(crate) fn signing_alg(
    header: &Map<String, Value>,
    allowed: &[Algorithm],
) -> Result<Algorithm, ProofError> {
    let Some(name) = header.get("alg").and_then(Value::as_str) else {
        return Err(invalid("alg missing"));
    };
    if name.eq_ignore_ascii_case("none") {
        return Err(invalid("alg none is not allowed"));
    }
    let alg: Algorithm = name.parse().map_err(|_| invalid("unsupported alg"))?;
    // Checked separately from the allow-list so a misconfigured policy can never admit a MAC.
    if alg.family() == AlgorithmFamily::Hmac {
        return Err(invalid("symmetric alg is not allowed"));
    }
    if !matches!(alg, Algorithm::ES256 | Algorithm::ES384 | Algorithm::EdDSA)
        || !allowed.contains(&alg)
    {
        return Err(invalid("alg not allowed"));
    }
    Ok(alg)
}

/// The JWK named by the header: inline `jwk`, or `kid` as a `did:jwk`. Exactly one must be there,
/// since two would leave it ambiguous which key the credential is bound to (F.1 forbids it).
fn header_key(header: &Map<String, Value>) -> Result<Map<String, Value>, ProofError> {
    if header.contains_key("x5c") {
        return Err(invalid("x5c key proofs are not supported"));
    }
    if header.contains_key("trust_chain") {
        return Err(invalid("trust_chain key proofs are not supported"));
    }
    match (header.get("jwk"), header.get("kid")) {
        (Some(_), Some(_)) => Err(invalid("jwk and kid must not both be present")),
        (None, None) => Err(invalid("jwk or kid required")),
        (Some(Value::Object(jwk)), None) => Ok(jwk.clone()),
        (Some(_), None) => Err(invalid("jwk must be a JSON object")),
        (None, Some(Value::String(kid))) => resolve_did_jwk(kid),
        (None, Some(_)) => Err(invalid("kid must be a string")),
    }
}

/// `did:jwk` carries the key in the identifier itself, so resolving it needs no network. Its DID
/// document has a single verification method, `#0`, hence the only fragment we accept.
fn resolve_did_jwk(kid: &str) -> Result<Map<String, Value>, ProofError> {
    let Some(rest) = kid.strip_prefix(DID_JWK_PREFIX) else {
        return Err(invalid("unsupported kid"));
    };
    let encoded = match rest.split_once('#') {
        None => rest,
        Some((encoded, "0")) => encoded,
        Some(_) => return Err(invalid("unsupported kid")),
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|_| invalid("did:jwk is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(invalid("did:jwk does not hold a JWK")),
    }
}

/// Checks the key fits `alg` and returns its public members only.
pub(crate) fn public_jwk_for(
    jwk: &Map<String, Value>,
    alg: Algorithm,
) -> Result<Value, ProofError> {
    if PRIVATE_JWK_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return Err(invalid("header key contains private key material"));
    }
    // A key that declares its own `alg` or `use` (RFC 7517 4.2, 4.4) restricts what it may be
    // used for; honour that instead of letting the header override it.
    if let Some(key_alg) = jwk.get("alg")
        && key_alg.as_str() != Some(alg_name(alg))
    {
        return Err(invalid("key alg does not match proof alg"));
    }
    if let Some(key_use) = jwk.get("use")
        && key_use.as_str() != Some("sig")
    {
        return Err(invalid("key is not a signing key"));
    }

    let str_member = |name: &str| jwk.get(name).and_then(Value::as_str);
    let (kty, crv, coordinate_len) = match alg {
        Algorithm::ES256 => ("EC", "P-256", 32),
        Algorithm::ES384 => ("EC", "P-384", 48),
        Algorithm::EdDSA => ("OKP", "Ed25519", 32),
        _ => return Err(invalid("alg not allowed")),
    };
    if str_member("kty") != Some(kty) || str_member("crv") != Some(crv) {
        return Err(invalid("key type does not match alg"));
    }
    // Length checks catch truncated or padded coordinates up front; whether the point is on the
    // curve is left to the signature check, which fails for any point that is not.
    let coordinate = |name: &str| -> Result<String, ProofError> {
        let value = str_member(name).ok_or_else(|| invalid("key coordinate missing"))?;
        match URL_SAFE_NO_PAD.decode(value) {
            Ok(bytes) if bytes.len() == coordinate_len => Ok(value.to_owned()),
            _ => Err(invalid("key coordinate malformed")),
        }
    };
    let mut public = Map::new();
    public.insert("kty".into(), kty.into());
    public.insert("crv".into(), crv.into());
    public.insert("x".into(), coordinate("x")?.into());
    if kty == "EC" {
        public.insert("y".into(), coordinate("y")?.into());
    }
    Ok(Value::Object(public))
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 => "ES256",
        Algorithm::ES384 => "ES384",
        Algorithm::EdDSA => "EdDSA",
        // Unreachable after `signing_alg`; a name no JWK uses keeps the comparison failing closed.
        _ => "",
    }
}

fn check_audience(claims: &Map<String, Value>, audience: &str) -> Result<(), ProofError> {
    let matches = match claims.get("aud") {
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        Some(_) => false,
        None => return Err(invalid("aud missing")),
    };
    if matches {
        Ok(())
    } else {
        Err(invalid("aud does not name this credential issuer"))
    }
}

fn check_times(
    claims: &Map<String, Value>,
    policy: &ProofPolicy,
    now: DateTime<Utc>,
) -> Result<(), ProofError> {
    let iat = match claims.get("iat") {
        None => return Err(invalid("iat missing")),
        Some(v) => numeric_date(v).ok_or_else(|| invalid("iat is not a NumericDate"))?,
    };
    if iat < now - policy.max_age {
        return Err(invalid("proof is too old"));
    }
    if iat > now + policy.max_future_skew {
        return Err(invalid("proof iat is in the future"));
    }
    // Not required by F.1, but a wallet that bounded its own proof's life meant it (RFC 7519 4.1.4).
    if let Some(exp) = claims.get("exp") {
        let exp = numeric_date(exp).ok_or_else(|| invalid("exp is not a NumericDate"))?;
        if exp <= now {
            return Err(invalid("proof has expired"));
        }
    }
    Ok(())
}

/// RFC 7519 NumericDate: seconds since the epoch, possibly fractional.
pub(crate) fn numeric_date(value: &Value) -> Option<DateTime<Utc>> {
    if let Some(secs) = value.as_i64() {
        return DateTime::from_timestamp(secs, 0);
    }
    let secs = value.as_f64()?;
    if !secs.is_finite() || secs.abs() > i64::MAX as f64 {
        return None;
    }
    // Fractions round down: a proof is never treated as younger than it claims.
    DateTime::from_timestamp(secs.floor() as i64, 0)
}

fn check_issuer(claims: &Map<String, Value>, required: Option<&str>) -> Result<(), ProofError> {
    match (claims.get("iss"), required) {
        (Some(Value::String(iss)), Some(client_id)) if iss == client_id => Ok(()),
        (_, Some(_)) => Err(invalid("iss must be the client_id")),
        (None | Some(Value::String(_)), None) => Ok(()),
        (Some(_), None) => Err(invalid("iss must be a string")),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::{
        rand::SystemRandom,
        signature::{
            ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
            Ed25519KeyPair, KeyPair,
        },
    };
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const AUD: &str = "https://issuer.example.com";

    /// A wallet key, signing with aws-lc-rs directly so proofs with any header we like (including
    /// malformed ones jsonwebtoken would refuse to build) can be made.
    pub(crate) enum WalletKey {
        Ec(EcdsaKeyPair, &'static str, usize),
        Ed(Ed25519KeyPair),
    }

    impl WalletKey {
        pub(crate) fn p256() -> Self {
            Self::ec(&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256", 32)
        }

        pub(crate) fn p384() -> Self {
            Self::ec(&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384", 48)
        }

        fn ec(
            alg: &'static aws_lc_rs::signature::EcdsaSigningAlgorithm,
            crv: &'static str,
            len: usize,
        ) -> Self {
            let doc = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).unwrap();
            Self::Ec(
                EcdsaKeyPair::from_pkcs8(alg, doc.as_ref()).unwrap(),
                crv,
                len,
            )
        }

        pub(crate) fn ed25519() -> Self {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Self::Ed(Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap())
        }

        pub(crate) fn alg(&self) -> &'static str {
            match self {
                Self::Ec(_, "P-256", _) => "ES256",
                Self::Ec(..) => "ES384",
                Self::Ed(_) => "EdDSA",
            }
        }

        pub(crate) fn jwk(&self) -> Value {
            match self {
                Self::Ec(pair, crv, len) => {
                    let point = pair.public_key().as_ref();
                    json!({
                        "kty": "EC", "crv": crv,
                        "x": URL_SAFE_NO_PAD.encode(&point[1..1 + len]),
                        "y": URL_SAFE_NO_PAD.encode(&point[1 + len..]),
                    })
                }
                Self::Ed(pair) => json!({
                    "kty": "OKP", "crv": "Ed25519",
                    "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref()),
                }),
            }
        }

        pub(crate) fn sign(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(header.to_string()),
                URL_SAFE_NO_PAD.encode(claims.to_string())
            );
            let sig = match self {
                Self::Ec(pair, ..) => pair
                    .sign(&SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                Self::Ed(pair) => pair.sign(input.as_bytes()).as_ref().to_vec(),
            };
            format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
        }

        fn header(&self) -> Value {
            json!({"typ": PROOF_TYP, "alg": self.alg(), "jwk": self.jwk()})
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000, 0).unwrap()
    }

    fn claims() -> Value {
        json!({"aud": AUD, "iat": now().timestamp(), "nonce": "n-123"})
    }

    fn did_jwk(jwk: &Value) -> String {
        format!("did:jwk:{}", URL_SAFE_NO_PAD.encode(jwk.to_string()))
    }

    fn check(jwt: &str) -> Result<ValidProof, ProofError> {
        validate_proof(jwt, &ProofPolicy::new(AUD), now())
    }

    #[track_caller]
    fn assert_invalid_proof<T: std::fmt::Debug>(
        result: Result<T, ProofError>,
        expected_message: &str,
    ) {
        let err = result.expect_err("proof must be refused");
        assert_eq!(err.code, ProofErrorCode::InvalidProof, "{err}");
        assert!(
            err.message.contains(expected_message),
            "expected {expected_message:?}, got {:?}",
            err.message
        );
    }

    #[test]
    fn es256_proof_with_jwk_passes_and_returns_the_public_key() {
        let key = WalletKey::p256();
        let proof = check(&key.sign(&key.header(), &claims())).unwrap();
        assert_eq!(proof.holder_jwk, key.jwk());
        assert_eq!(proof.nonce.as_deref(), Some("n-123"));
        assert_eq!(proof.alg, Algorithm::ES256);
    }

    #[test]
    fn es384_and_eddsa_proofs_pass() {
        for key in [WalletKey::p384(), WalletKey::ed25519()] {
            let proof = check(&key.sign(&key.header(), &claims())).unwrap();
            assert_eq!(proof.holder_jwk, key.jwk());
        }
    }

    #[test]
    fn did_jwk_kid_resolves_to_the_embedded_key() {
        let key = WalletKey::p256();
        for kid in [did_jwk(&key.jwk()), format!("{}#0", did_jwk(&key.jwk()))] {
            let header = json!({"typ": PROOF_TYP, "alg": "ES256", "kid": kid});
            let proof = check(&key.sign(&header, &claims())).unwrap();
            assert_eq!(proof.holder_jwk, key.jwk());
        }
    }

    #[test]
    fn extra_jwk_members_are_dropped_from_the_holder_key() {
        let key = WalletKey::p256();
        let mut jwk = key.jwk();
        jwk["kid"] = json!("wallet-key-1");
        jwk["alg"] = json!("ES256");
        jwk["use"] = json!("sig");
        let header = json!({"typ": PROOF_TYP, "alg": "ES256", "jwk": jwk});
        let proof = check(&key.sign(&header, &claims())).unwrap();
        assert_eq!(proof.holder_jwk, key.jwk());
    }

    #[test]
    fn nonce_and_iss_are_optional_without_client_authentication() {
        let key = WalletKey::p256();
        let proof = check(&key.sign(
            &key.header(),
            &json!({"aud": [AUD, "other"], "iat": now().timestamp()}),
        ))
        .unwrap();
        assert_eq!(proof.nonce, None);
    }

    #[test]
    fn wrong_typ_is_refused() {
        let key = WalletKey::p256();
        for typ in [json!("JWT"), json!("OPENID4VCI-PROOF+JWT"), Value::Null] {
            let mut header = key.header();
            header["typ"] = typ;
            assert_invalid_proof(check(&key.sign(&header, &claims())), "typ");
        }
        let mut header = key.header();
        header.as_object_mut().unwrap().remove("typ");
        assert_invalid_proof(check(&key.sign(&header, &claims())), "typ");
    }

    #[test]
    fn alg_none_is_refused() {
        let key = WalletKey::p256();
        let header = json!({"typ": PROOF_TYP, "alg": "none", "jwk": key.jwk()});
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims().to_string())
        );
        assert_invalid_proof(check(&token), "alg none");
    }

    #[test]
    fn hs256_is_refused_even_if_the_policy_lists_it() {
        let key = WalletKey::p256();
        let mut header = Header::new(Algorithm::HS256);
        header.typ = Some(PROOF_TYP.into());
        header.jwk = Some(serde_json::from_value(key.jwk()).unwrap());
        let token =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        let mut policy = ProofPolicy::new(AUD);
        policy.allowed_algs.push(Algorithm::HS256);
        assert_invalid_proof(validate_proof(&token, &policy, now()), "symmetric");
    }

    #[test]
    fn alg_outside_the_allow_list_is_refused() {
        let key = WalletKey::p384();
        let mut policy = ProofPolicy::new(AUD);
        policy.allowed_algs = vec![Algorithm::ES256];
        let token = key.sign(&key.header(), &claims());
        assert_invalid_proof(validate_proof(&token, &policy, now()), "alg not allowed");
    }

    #[test]
    fn key_type_must_fit_the_alg() {
        // A P-384 key presented under ES256, and an EC key presented under EdDSA.
        let p384 = WalletKey::p384();
        let header = json!({"typ": PROOF_TYP, "alg": "ES256", "jwk": p384.jwk()});
        assert_invalid_proof(check(&p384.sign(&header, &claims())), "key type");
        let p256 = WalletKey::p256();
        let header = json!({"typ": PROOF_TYP, "alg": "EdDSA", "jwk": p256.jwk()});
        assert_invalid_proof(check(&p256.sign(&header, &claims())), "key type");
    }

    #[test]
    fn wrong_audience_is_refused() {
        let key = WalletKey::p256();
        let mut c = claims();
        c["aud"] = json!("https://evil.example.com");
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "aud");
        c["aud"] = json!(["https://evil.example.com"]);
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "aud");
        c.as_object_mut().unwrap().remove("aud");
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "aud missing");
    }

    #[test]
    fn iat_window_is_enforced() {
        let key = WalletKey::p256();
        let mut c = claims();
        c["iat"] = json!((now() - Duration::minutes(10)).timestamp());
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "too old");
        c["iat"] = json!((now() + Duration::minutes(10)).timestamp());
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "future");
        // Inside both edges, including fractional seconds.
        c["iat"] = json!((now() - Duration::minutes(4)).timestamp() as f64 + 0.5);
        check(&key.sign(&key.header(), &c)).unwrap();
        c["iat"] = json!((now() + Duration::seconds(30)).timestamp());
        check(&key.sign(&key.header(), &c)).unwrap();
    }

    #[test]
    fn missing_or_malformed_iat_is_refused() {
        let key = WalletKey::p256();
        let mut c = claims();
        c.as_object_mut().unwrap().remove("iat");
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "iat missing");
        c["iat"] = json!("1750000000");
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "iat");
    }

    #[test]
    fn expired_exp_is_refused() {
        let key = WalletKey::p256();
        let mut c = claims();
        c["exp"] = json!(now().timestamp() - 1);
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "expired");
    }

    #[test]
    fn private_key_material_in_jwk_is_refused() {
        let key = WalletKey::p256();
        for member in ["d", "k", "p"] {
            let mut header = key.header();
            header["jwk"][member] = json!("AAAA");
            assert_invalid_proof(check(&key.sign(&header, &claims())), "private key");
        }
        let mut jwk = key.jwk();
        jwk["d"] = json!("AAAA");
        let header = json!({"typ": PROOF_TYP, "alg": "ES256", "kid": did_jwk(&jwk)});
        assert_invalid_proof(check(&key.sign(&header, &claims())), "private key");
    }

    #[test]
    fn both_or_neither_jwk_and_kid_are_refused() {
        let key = WalletKey::p256();
        let mut header = key.header();
        header["kid"] = json!(did_jwk(&key.jwk()));
        assert_invalid_proof(check(&key.sign(&header, &claims())), "both");
        let header = json!({"typ": PROOF_TYP, "alg": "ES256"});
        assert_invalid_proof(check(&key.sign(&header, &claims())), "jwk or kid required");
    }

    #[test]
    fn x5c_and_trust_chain_are_unsupported() {
        let key = WalletKey::p256();
        let mut header = json!({"typ": PROOF_TYP, "alg": "ES256", "x5c": ["MIIB"]});
        assert_invalid_proof(check(&key.sign(&header, &claims())), "x5c");
        header = json!({"typ": PROOF_TYP, "alg": "ES256", "kid": "k", "trust_chain": ["a"]});
        assert_invalid_proof(check(&key.sign(&header, &claims())), "trust_chain");
    }

    #[test]
    fn signature_by_another_key_is_refused() {
        let key = WalletKey::p256();
        let other = WalletKey::p256();
        let token = other.sign(&key.header(), &claims());
        assert_invalid_proof(check(&token), "signature");
        // Tampered payload under a genuine signature.
        let token = key.sign(&key.header(), &claims());
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD
            .encode(json!({"aud": AUD, "iat": now().timestamp(), "nonce": "other"}).to_string());
        parts[1] = &forged;
        assert_invalid_proof(check(&parts.join(".")), "signature");
    }

    #[test]
    fn unsupported_kid_is_refused() {
        let key = WalletKey::p256();
        for kid in [
            "did:web:wallet.example.com#key-1".to_owned(),
            "key-1".to_owned(),
            format!("{}#1", did_jwk(&key.jwk())),
        ] {
            let header = json!({"typ": PROOF_TYP, "alg": "ES256", "kid": kid});
            assert_invalid_proof(check(&key.sign(&header, &claims())), "unsupported kid");
        }
    }

    #[test]
    fn crit_header_is_refused() {
        let key = WalletKey::p256();
        let mut header = key.header();
        header["crit"] = json!(["b64"]);
        header["b64"] = json!(false);
        assert_invalid_proof(check(&key.sign(&header, &claims())), "crit");
    }

    #[test]
    fn issuer_must_match_an_authenticated_client() {
        let key = WalletKey::p256();
        let mut policy = ProofPolicy::new(AUD);
        policy.require_iss = Some("wallet-client".into());
        let mut c = claims();
        assert_invalid_proof(
            validate_proof(&key.sign(&key.header(), &c), &policy, now()),
            "iss",
        );
        c["iss"] = json!("someone-else");
        assert_invalid_proof(
            validate_proof(&key.sign(&key.header(), &c), &policy, now()),
            "iss",
        );
        c["iss"] = json!("wallet-client");
        validate_proof(&key.sign(&key.header(), &c), &policy, now()).unwrap();
    }

    #[test]
    fn non_string_nonce_is_refused() {
        let key = WalletKey::p256();
        let mut c = claims();
        c["nonce"] = json!(42);
        assert_invalid_proof(check(&key.sign(&key.header(), &c)), "nonce");
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        for token in ["", "a", "a.b", "a.b.c.d", "!!!.e30.", "e30.e30.e30"] {
            assert_invalid_proof(check(token), "");
        }
    }

    #[test]
    fn batches_need_every_proof_valid_over_distinct_keys_and_a_cap() {
        let key = WalletKey::p256();
        let good = key.sign(&key.header(), &claims());
        let bad = WalletKey::p256().sign(&key.header(), &claims());
        let policy = ProofPolicy::new(AUD);
        let other = WalletKey::p256();
        let second = other.sign(&other.header(), &claims());
        assert_eq!(
            validate_proofs(&[good.clone(), second], &policy, now())
                .unwrap()
                .len(),
            2
        );
        assert_invalid_proof(
            validate_proofs(&[good.clone(), good.clone()], &policy, now()),
            "same key",
        );
        assert_invalid_proof(
            validate_proofs(&[good.clone(), bad], &policy, now()),
            "signature",
        );
        assert_invalid_proof(validate_proofs(&[], &policy, now()), "no key proof");
        let eleven = vec![good; MAX_PROOFS + 1];
        assert_invalid_proof(validate_proofs(&eleven, &policy, now()), "too many");
    }

    #[test]
    fn error_codes_render_as_oid4vci_wire_values() {
        assert_eq!(
            ProofError::invalid_nonce("stale").to_string(),
            "invalid_nonce: stale"
        );
        assert_eq!(ProofErrorCode::InvalidProof.as_str(), "invalid_proof");
    }
}
