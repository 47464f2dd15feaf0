//! DPoP proofs (RFC 9449): a wallet proves, on each request, that it holds the key its access
//! token is bound to, so that a stolen token is useless without the key.
//!
//! Validation is IO-free, like [`crate::proof`]: the caller hands in the request's method and
//! URI, the access token it carries (if any), the nonce the server expects (if any) and the
//! time; whether the proof's `jti` was seen before needs shared state and stays with the
//! caller (a replay cache across replicas), which gets the `jti` back.
//!
//! Invariants:
//! - The key that verifies the signature is the key whose thumbprint (RFC 7638) we return, and
//!   it comes only from the proof's `jwk` header, public members only.
//! - `typ` is `dpop+jwt`; the algorithm is one we can tie to a key type (ES256, ES384, EdDSA);
//!   `none` and MAC algorithms never pass.
//! - `htm` equals the method; `htu` equals the request URI without query and fragment, after
//!   syntax- and scheme-based normalisation (case of scheme and host, default port).
//! - `iat` is within the accepted window; with an access token, `ath` is the base64url SHA-256
//!   of it; with an expected nonce, `nonce` equals it, and a missing or stale one is
//!   [`DpopError::UseNonce`], which tells the wallet to retry with the nonce it is sent.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Duration, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind, jwk::Jwk};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::proof::{decode_header, numeric_date, public_jwk_for, signing_alg};

/// The `typ` of a DPoP proof.
pub const DPOP_TYP: &str = "dpop+jwt";
/// The algorithms a DPoP proof may use (advertised as `dpop_signing_alg_values_supported`).
pub const DPOP_ALGS: [Algorithm; 3] = [Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA];

/// Why a DPoP proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpopError {
    /// `invalid_dpop_proof`; the message is fixed ASCII, safe for `error_description`.
    #[error("invalid_dpop_proof: {0}")]
    Invalid(String),
    /// `use_dpop_nonce`: the proof lacks the nonce the server expects, or has an old one.
    #[error("use_dpop_nonce: the DPoP proof must carry the server's current nonce")]
    UseNonce,
}

impl DpopError {
    /// The wire value for the `error` member.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_dpop_proof",
            Self::UseNonce => "use_dpop_nonce",
        }
    }
}

fn invalid(message: &str) -> DpopError {
    DpopError::Invalid(message.to_owned())
}

/// The request a proof must match, and what the server expects of it.
#[derive(Debug, Clone, Copy)]
pub struct DpopRequest<'a> {
    /// The HTTP method, e.g. `POST`.
    pub method: &'a str,
    /// The request's URI as the client addressed it (the server's public URL of the endpoint).
    pub uri: &'a str,
    /// The access token the request carries, when it carries one.
    pub access_token: Option<&'a str>,
    /// The nonce the server expects in the proof, if it requires one.
    pub nonce: Option<&'a str>,
    pub now: DateTime<Utc>,
    /// How old `iat` may be.
    pub max_age: Duration,
    /// How far in the future `iat` may be.
    pub max_future_skew: Duration,
}

/// A proof that passed every stateless check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidDpop {
    /// The JWK SHA-256 thumbprint of the proof's key: `cnf.jkt` of a token bound to it.
    pub jkt: String,
    /// For the caller's replay cache, with the time until which the proof would be accepted.
    pub jti: String,
    pub accepted_until: DateTime<Utc>,
}

/// Validates one DPoP proof for `request`.
pub fn validate_dpop(proof: &str, request: &DpopRequest) -> Result<ValidDpop, DpopError> {
    let header = decode_header(proof).map_err(|e| DpopError::Invalid(e.message))?;
    if header.get("typ").and_then(Value::as_str) != Some(DPOP_TYP) {
        return Err(invalid("typ must be dpop+jwt"));
    }
    if header.contains_key("crit") {
        return Err(invalid("unsupported crit header"));
    }
    let alg = signing_alg(&header, &DPOP_ALGS).map_err(|e| DpopError::Invalid(e.message))?;
    let Some(Value::Object(jwk)) = header.get("jwk") else {
        return Err(invalid("jwk header required"));
    };
    let public = public_jwk_for(jwk, alg).map_err(|e| DpopError::Invalid(e.message))?;
    let typed: Jwk =
        serde_json::from_value(public.clone()).map_err(|_| invalid("jwk is not usable"))?;
    let key = DecodingKey::from_jwk(&typed).map_err(|_| invalid("jwk is not usable"))?;
    let mut validation = Validation::new(alg);
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(proof, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => invalid("signature does not verify with the jwk"),
            _ => invalid("malformed DPoP proof"),
        })?
        .claims;
    let Value::Object(claims) = claims else {
        return Err(invalid("payload is not a JSON object"));
    };
    let text = |name: &str| claims.get(name).and_then(Value::as_str);

    let jti = text("jti")
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| invalid("jti missing"))?;
    if text("htm") != Some(request.method) {
        return Err(invalid("htm does not match the request method"));
    }
    let htu = text("htu").ok_or_else(|| invalid("htu missing"))?;
    match (normalized_uri(htu), normalized_uri(request.uri)) {
        (Some(a), Some(b)) if a == b => {}
        _ => return Err(invalid("htu does not match the request URI")),
    }
    let iat = claims
        .get("iat")
        .and_then(numeric_date)
        .ok_or_else(|| invalid("iat missing or not a NumericDate"))?;
    if iat < request.now - request.max_age {
        return Err(invalid("proof is too old"));
    }
    if iat > request.now + request.max_future_skew {
        return Err(invalid("proof iat is in the future"));
    }
    match (request.access_token, text("ath")) {
        (Some(token), Some(ath)) if ath == access_token_hash(token) => {}
        (Some(_), _) => return Err(invalid("ath does not match the access token")),
        (None, _) => {}
    }
    if let Some(expected) = request.nonce
        && text("nonce") != Some(expected)
    {
        return Err(DpopError::UseNonce);
    }
    Ok(ValidDpop {
        jkt: jwk_thumbprint(&public).ok_or_else(|| invalid("jwk is not usable"))?,
        jti: jti.to_owned(),
        accepted_until: iat + request.max_age,
    })
}

/// `ath`: base64url SHA-256 of the access token.
pub fn access_token_hash(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(access_token.as_bytes()))
}

/// The JWK SHA-256 thumbprint (RFC 7638) of a public EC, OKP or RSA key: the digest of its
/// required members in lexicographic order, no whitespace.
pub fn jwk_thumbprint(jwk: &Value) -> Option<String> {
    let member = |name: &str| jwk.get(name).and_then(Value::as_str);
    let members: &[&str] = match member("kty")? {
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        "RSA" => &["e", "kty", "n"],
        _ => return None,
    };
    let mut canonical = Map::new();
    for name in members {
        canonical.insert((*name).to_owned(), member(name)?.into());
    }
    // serde_json's map keeps keys sorted (no `preserve_order`), which is the order required.
    let json = serde_json::to_string(&Value::Object(canonical)).ok()?;
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(json.as_bytes())))
}

/// `scheme://host[:port]/path` of an absolute http(s) URI: no query or fragment, scheme and
/// host in lower case, the scheme's default port dropped, an empty path as `/`.
fn normalized_uri(uri: &str) -> Option<String> {
    let uri = uri.split(['?', '#']).next()?;
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(default_port).unwrap_or(&authority);
    Some(format!("{scheme}://{authority}{path}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proof::tests::WalletKey;

    const URI: &str = "https://issuer.example.com/issuer/oid4vci/v1/credential";

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_750_000_000, 0).unwrap()
    }

    fn request<'a>(access_token: Option<&'a str>, nonce: Option<&'a str>) -> DpopRequest<'a> {
        DpopRequest {
            method: "POST",
            uri: URI,
            access_token,
            nonce,
            now: now(),
            max_age: Duration::minutes(5),
            max_future_skew: Duration::seconds(60),
        }
    }

    fn header(key: &WalletKey) -> Value {
        json!({"typ": "dpop+jwt", "alg": key.alg(), "jwk": key.jwk()})
    }

    fn claims() -> Value {
        json!({"jti": "j-1", "htm": "POST", "htu": URI, "iat": now().timestamp()})
    }

    fn with(mut v: Value, name: &str, value: Value) -> Value {
        v[name] = value;
        v
    }

    #[test]
    fn a_proof_binds_to_its_keys_thumbprint() {
        for key in [WalletKey::p256(), WalletKey::p384(), WalletKey::ed25519()] {
            let proof = key.sign(&header(&key), &claims());
            let valid = validate_dpop(&proof, &request(None, None)).unwrap();
            assert_eq!(valid.jkt, jwk_thumbprint(&key.jwk()).unwrap());
            assert_eq!(valid.jti, "j-1");
            assert_eq!(valid.accepted_until, now() + Duration::minutes(5));
        }
    }

    #[test]
    fn the_thumbprint_follows_rfc_7638() {
        // RFC 7638 §3.1: the RSA example key's thumbprint.
        let jwk = json!({"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"});
        assert_eq!(
            jwk_thumbprint(&jwk).as_deref(),
            Some("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")
        );
        assert_eq!(jwk_thumbprint(&json!({"kty": "oct", "k": "AA"})), None);
    }

    #[test]
    fn method_uri_and_time_must_match() {
        let key = WalletKey::p256();
        let ok = |c: Value| validate_dpop(&key.sign(&header(&key), &c), &request(None, None));
        // Query, fragment, case and the default port do not matter.
        let same = "HTTPS://Issuer.Example.com:443/issuer/oid4vci/v1/credential?x=1#f";
        assert!(ok(with(claims(), "htu", same.into())).is_ok());
        for (name, value) in [
            ("htm", json!("GET")),
            (
                "htu",
                json!("https://issuer.example.com/issuer/oid4vci/v1/nonce"),
            ),
            (
                "htu",
                json!("http://issuer.example.com/issuer/oid4vci/v1/credential"),
            ),
            (
                "htu",
                json!("https://issuer.example.com:8443/issuer/oid4vci/v1/credential"),
            ),
            ("iat", json!(now().timestamp() - 301)),
            ("iat", json!(now().timestamp() + 61)),
            ("jti", json!("")),
        ] {
            let refused = ok(with(claims(), name, value.clone()));
            assert!(
                matches!(refused, Err(DpopError::Invalid(_))),
                "{name} {value}"
            );
        }
        let mut no_jti = claims();
        no_jti.as_object_mut().unwrap().remove("jti");
        assert!(ok(no_jti).is_err());
    }

    #[test]
    fn an_access_token_needs_its_hash() {
        let key = WalletKey::p256();
        let token = "eyJ.access.token";
        let bound = with(claims(), "ath", access_token_hash(token).into());
        let proof = key.sign(&header(&key), &bound);
        assert!(validate_dpop(&proof, &request(Some(token), None)).is_ok());
        assert!(validate_dpop(&proof, &request(Some("another"), None)).is_err());
        let unbound = key.sign(&header(&key), &claims());
        assert!(validate_dpop(&unbound, &request(Some(token), None)).is_err());
    }

    #[test]
    fn a_missing_or_stale_nonce_asks_for_the_current_one() {
        let key = WalletKey::p256();
        let proof = |c: Value| key.sign(&header(&key), &c);
        let with_nonce = proof(with(claims(), "nonce", "n-2".into()));
        assert!(validate_dpop(&with_nonce, &request(None, Some("n-2"))).is_ok());
        for p in [
            proof(claims()),
            proof(with(claims(), "nonce", "n-1".into())),
        ] {
            assert_eq!(
                validate_dpop(&p, &request(None, Some("n-2"))),
                Err(DpopError::UseNonce)
            );
        }
    }

    #[test]
    fn headers_signatures_and_keys_fail_closed() {
        let key = WalletKey::p256();
        let other = WalletKey::p256();
        let refused = |h: Value, signer: &WalletKey| {
            validate_dpop(&signer.sign(&h, &claims()), &request(None, None)).unwrap_err()
        };
        for h in [
            with(header(&key), "typ", "openid4vci-proof+jwt".into()),
            with(header(&key), "alg", "HS256".into()),
            with(header(&key), "alg", "none".into()),
            with(header(&key), "crit", json!(["x"])),
            with(header(&key), "jwk", with(key.jwk(), "d", "AAAA".into())),
            json!({"typ": "dpop+jwt", "alg": "ES256"}),
        ] {
            assert!(
                matches!(refused(h.clone(), &key), DpopError::Invalid(_)),
                "{h}"
            );
        }
        // Signed by another key than the one in the header.
        assert!(matches!(
            refused(header(&key), &other),
            DpopError::Invalid(_)
        ));
        assert!(validate_dpop("not.a.jwt", &request(None, None)).is_err());
    }
}
