//! A small OID4VCI 1.0 wallet written for the tests from the specifications alone, independent of
//! the issuing code: HTTP with reqwest, P-256 / ES256 with aws-lc-rs, JOSE by hand, and an
//! RFC 9901 SD-JWT verifier.

use std::collections::{HashMap, HashSet};

use aws_lc_rs::{
    digest,
    encoding::AsBigEndian,
    rand::SystemRandom,
    signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING,
        EcdsaKeyPair, Ed25519KeyPair, KeyPair, UnparsedPublicKey,
    },
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use reqwest::{Client, Response, Url, header};
use serde_json::{Map, Value, json};

pub const CONFIG_ID: &str = "learcredential.employee.sd.1";
pub const PRE_AUTH_GRANT: &str = "urn:ietf:params:oauth:grant-type:pre-authorized_code";
pub const OFFER_PREFIX: &str = "openid-credential-offer://?credential_offer_uri=";
pub const PROOF_TYP: &str = "openid4vci-proof+jwt";

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn b64_json(v: &Value) -> String {
    b64(&serde_json::to_vec(v).unwrap())
}

fn unb64(part: &str) -> Vec<u8> {
    URL_SAFE_NO_PAD
        .decode(part)
        .unwrap_or_else(|e| panic!("{part:?} is not base64url without padding: {e}"))
}

fn unb64_json(part: &str) -> Value {
    let bytes = unb64(part);
    serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)))
}

pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A holder key pair: P-256 by default; P-384 and Ed25519 for the other proof algorithms.
pub struct HolderKey {
    kind: KeyKind,
}

enum KeyKind {
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl HolderKey {
    /// A P-256 key for ES256.
    pub fn generate() -> Self {
        Self {
            kind: KeyKind::P256(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap()),
        }
    }

    /// A key for the JWS algorithm `alg`, if this wallet knows it.
    pub fn for_alg(alg: &str) -> Option<Self> {
        let kind = match alg {
            "ES256" => return Some(Self::generate()),
            "ES384" => {
                KeyKind::P384(EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING).unwrap())
            }
            "EdDSA" => KeyKind::Ed25519(Ed25519KeyPair::generate().unwrap()),
            _ => return None,
        };
        Some(Self { kind })
    }

    pub fn alg(&self) -> &'static str {
        match self.kind {
            KeyKind::P256(_) => "ES256",
            KeyKind::P384(_) => "ES384",
            KeyKind::Ed25519(_) => "EdDSA",
        }
    }

    /// The public JWK (RFC 7518 §6.2.1, RFC 8037 §2).
    pub fn jwk(&self) -> Value {
        match &self.kind {
            KeyKind::P256(pair) | KeyKind::P384(pair) => {
                let point = pair.public_key().as_ref();
                let n = (point.len() - 1) / 2;
                assert_eq!(point[0], 4, "uncompressed point");
                let crv = if n == 32 { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "x": b64(&point[1..=n]), "y": b64(&point[n + 1..])})
            }
            KeyKind::Ed25519(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "x": b64(pair.public_key().as_ref())})
            }
        }
    }

    /// The private scalar `d` of an EC key, base64url.
    pub fn d(&self) -> String {
        match &self.kind {
            KeyKind::P256(pair) | KeyKind::P384(pair) => {
                b64(pair.private_key().as_be_bytes().unwrap().as_ref())
            }
            KeyKind::Ed25519(_) => panic!("EC keys only"),
        }
    }

    /// A JWS signature over `input` (ECDSA as r || s).
    pub fn sign(&self, input: &[u8]) -> Vec<u8> {
        match &self.kind {
            KeyKind::P256(pair) | KeyKind::P384(pair) => pair
                .sign(&SystemRandom::new(), input)
                .unwrap()
                .as_ref()
                .to_vec(),
            KeyKind::Ed25519(pair) => pair.sign(input).as_ref().to_vec(),
        }
    }
}

/// A compact JWS whose signature is `sign(signing input)`.
pub fn compact(header: &Value, payload: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = format!("{}.{}", b64_json(header), b64_json(payload));
    let sig = sign(input.as_bytes());
    format!("{input}.{}", b64(&sig))
}

/// The header of a JWT key proof (OID4VCI 1.0 Appendix F.1) for `key`.
pub fn proof_header(key: &HolderKey) -> Value {
    json!({"typ": PROOF_TYP, "alg": key.alg(), "jwk": key.jwk()})
}

/// The claims of a JWT key proof without `iss` (anonymous pre-authorized access).
pub fn proof_claims(aud: &str, nonce: &str) -> Value {
    json!({"aud": aud, "iat": now(), "nonce": nonce})
}

/// A valid JWT key proof.
pub fn proof(key: &HolderKey, aud: &str, nonce: &str) -> String {
    compact(&proof_header(key), &proof_claims(aud, nonce), |m| {
        key.sign(m)
    })
}

/// An OID4VCI 1.0 credential request with one JWT proof.
pub fn request_v1(proof: &str) -> Value {
    json!({"credential_configuration_id": CONFIG_ID, "proofs": {"jwt": [proof]}})
}

/// A draft-13/15 credential request with `format` and a single `proof`.
pub fn request_draft(format: &str, proof: &str) -> Value {
    json!({"format": format, "vct": CONFIG_ID, "proof": {"proof_type": "jwt", "jwt": proof}})
}

pub fn header_of(res: &Response, name: header::HeaderName) -> String {
    res.headers()
        .get(&name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// Asserts the status of `res` and returns its JSON body.
pub async fn expect_json(res: Response, status: u16, what: &str) -> Value {
    let got = res.status();
    let text = res.text().await.unwrap();
    assert_eq!(got.as_u16(), status, "{what}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {text}"))
}

/// Asserts an OAuth / OID4VCI error response: `status` and JSON `error`.
pub async fn expect_error(res: Response, status: u16, error: &str, what: &str) -> Value {
    let body = expect_json(res, status, what).await;
    assert_eq!(body["error"], error, "{what}: {body}");
    body
}

/// The well-known URL for an identifier with a path (RFC 8414 §3.1 insertion:
/// `https://host/.well-known/{suffix}/path`).
pub fn well_known(identifier: &str, suffix: &str) -> String {
    let url = Url::parse(identifier).unwrap();
    let path = url.path().trim_end_matches('/');
    format!(
        "{}/.well-known/{suffix}{path}",
        url.origin().ascii_serialization()
    )
}

/// The percent-decoded `credential_offer_uri` parameter of an offer deep link.
pub fn offer_url(offer_uri: &str) -> String {
    let encoded = offer_uri
        .strip_prefix(OFFER_PREFIX)
        .unwrap_or_else(|| panic!("{offer_uri} does not start with {OFFER_PREFIX}"));
    assert!(
        !encoded.contains(['/', ':', '?']),
        "the offer URL is percent-encoded: {encoded}"
    );
    percent_encoding::percent_decode_str(encoded)
        .decode_utf8()
        .unwrap()
        .into_owned()
}

/// GETs the offer behind a deep link; asserts 200 and `Cache-Control: no-store`.
pub async fn resolve_offer(http: &Client, offer_uri: &str) -> Value {
    let res = http.get(offer_url(offer_uri)).send().await.unwrap();
    assert!(
        header_of(&res, header::CACHE_CONTROL).contains("no-store"),
        "offer cache-control"
    );
    expect_json(res, 200, "credential offer").await
}

/// The pre-authorized code of an offer.
pub fn pre_authorized_code(offer: &Value) -> String {
    offer["grants"][PRE_AUTH_GRANT]["pre-authorized_code"]
        .as_str()
        .unwrap_or_else(|| panic!("no pre-authorized code in {offer}"))
        .to_owned()
}

pub async fn get_json(http: &Client, url: &str) -> Value {
    let res = http.get(url).send().await.unwrap();
    expect_json(res, 200, url).await
}

fn url_field(v: &Value, k: &str) -> String {
    v[k].as_str()
        .unwrap_or_else(|| panic!("`{k}` is not a string in {v}"))
        .to_owned()
}

/// What a wallet learns from the issuer's metadata.
pub struct Issuer {
    pub credential_issuer: String,
    pub metadata: Value,
    pub as_metadata: Value,
    pub token_endpoint: String,
    pub credential_endpoint: String,
    pub nonce_endpoint: String,
    pub notification_endpoint: String,
}

/// Fetches the Credential Issuer metadata and the metadata of its authorization server.
pub async fn discover(http: &Client, credential_issuer: &str) -> Issuer {
    let metadata = get_json(
        http,
        &well_known(credential_issuer, "openid-credential-issuer"),
    )
    .await;
    assert_eq!(metadata["credential_issuer"], credential_issuer);
    let as_id = match metadata.get("authorization_servers") {
        Some(list) => list[0].as_str().unwrap().to_owned(),
        None => credential_issuer.to_owned(),
    };
    let as_metadata = get_json(http, &well_known(&as_id, "oauth-authorization-server")).await;
    assert_eq!(as_metadata["issuer"], as_id.as_str());
    Issuer {
        credential_issuer: credential_issuer.to_owned(),
        token_endpoint: url_field(&as_metadata, "token_endpoint"),
        credential_endpoint: url_field(&metadata, "credential_endpoint"),
        nonce_endpoint: url_field(&metadata, "nonce_endpoint"),
        notification_endpoint: url_field(&metadata, "notification_endpoint"),
        metadata,
        as_metadata,
    }
}

impl Issuer {
    /// A pre-authorized code token request, no client authentication; `extra` adds form fields.
    pub async fn token_request(
        &self,
        http: &Client,
        code: &str,
        extra: &[(&str, &str)],
    ) -> Response {
        let mut form = vec![
            ("grant_type", PRE_AUTH_GRANT),
            ("pre-authorized_code", code),
        ];
        form.extend_from_slice(extra);
        http.post(&self.token_endpoint)
            .form(&form)
            .send()
            .await
            .unwrap()
    }

    /// Redeems `code` (with `extra`); asserts a 200 Bearer token response and returns it.
    pub async fn access_token_with(
        &self,
        http: &Client,
        code: &str,
        extra: &[(&str, &str)],
    ) -> String {
        let res = self.token_request(http, code, extra).await;
        assert!(
            header_of(&res, header::CACHE_CONTROL).contains("no-store"),
            "token response cache-control"
        );
        let body = expect_json(res, 200, "token request").await;
        assert_eq!(body["token_type"], "Bearer", "{body}");
        assert!(
            body["expires_in"].as_i64().is_some_and(|s| s > 0),
            "expires_in: {body}"
        );
        body["access_token"]
            .as_str()
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| panic!("no access_token: {body}"))
            .to_owned()
    }

    pub async fn access_token(&self, http: &Client, code: &str) -> String {
        self.access_token_with(http, code, &[]).await
    }

    /// A fresh `c_nonce` from the nonce endpoint.
    pub async fn nonce(&self, http: &Client) -> String {
        let res = http.post(&self.nonce_endpoint).send().await.unwrap();
        assert!(
            header_of(&res, header::CACHE_CONTROL).contains("no-store"),
            "nonce response cache-control"
        );
        let body = expect_json(res, 200, "nonce request").await;
        body["c_nonce"]
            .as_str()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| panic!("no c_nonce: {body}"))
            .to_owned()
    }

    pub async fn credential_request(&self, http: &Client, token: &str, body: &Value) -> Response {
        http.post(&self.credential_endpoint)
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// A fresh nonce, a proof by `key`, and an OID4VCI 1.0 credential request.
    pub async fn request_credential(
        &self,
        http: &Client,
        token: &str,
        key: &HolderKey,
    ) -> Response {
        let nonce = self.nonce(http).await;
        let proof = proof(key, &self.credential_issuer, &nonce);
        self.credential_request(http, token, &request_v1(&proof))
            .await
    }

    pub async fn notify(&self, http: &Client, token: &str, id: &str, event: &str) -> Response {
        http.post(&self.notification_endpoint)
            .bearer_auth(token)
            .json(&json!({"notification_id": id, "event": event}))
            .send()
            .await
            .unwrap()
    }
}

/// The issuer keys published for SD-JWT VC verification (SD-JWT VC §5).
pub async fn issuer_jwks(http: &Client, credential_issuer: &str) -> Value {
    let meta = get_json(http, &well_known(credential_issuer, "jwt-vc-issuer")).await;
    assert_eq!(meta["issuer"], credential_issuer, "{meta}");
    assert!(meta["jwks"]["keys"].is_array(), "{meta}");
    meta["jwks"].clone()
}

/// A verified SD-JWT.
pub struct VerifiedSdJwt {
    pub header: Value,
    /// The issuer-signed payload as signed.
    pub signed: Value,
    /// The decoded Disclosures: `[salt, name, value]` or `[salt, value]`.
    pub disclosures: Vec<Value>,
    /// The processed payload (RFC 9901 §7.1): every Disclosure in place, `_sd_alg` removed.
    pub claims: Value,
}

/// Verifies the ES256 signature of a compact JWS with a P-256 JWK.
fn verify_es256(jws: &str, jwk: &Value) {
    let (input, sig) = jws.rsplit_once('.').unwrap();
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("EC"), Some("P-256")),
        "{jwk}"
    );
    let mut point = vec![4u8];
    point.extend(unb64(jwk["x"].as_str().unwrap()));
    point.extend(unb64(jwk["y"].as_str().unwrap()));
    assert_eq!(point.len(), 65, "{jwk}");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(input.as_bytes(), &unb64(sig))
        .expect("the issuer's ES256 signature verifies with the published key");
}

/// Verifies an SD-JWT without Key Binding per RFC 9901 §7.1 against `jwks`.
pub fn verify_sd_jwt(sd_jwt: &str, jwks: &Value) -> VerifiedSdJwt {
    let parts: Vec<&str> = sd_jwt.split('~').collect();
    assert!(parts.len() >= 2, "not an SD-JWT: {sd_jwt}");
    assert_eq!(
        parts.last(),
        Some(&""),
        "an SD-JWT without Key Binding ends with `~`"
    );
    let jwt = parts[0];
    let segments: Vec<&str> = jwt.split('.').collect();
    assert_eq!(segments.len(), 3, "the issuer-signed JWT is a compact JWS");
    let header = unb64_json(segments[0]);
    let signed = unb64_json(segments[1]);
    assert_eq!(header["alg"], "ES256", "{header}");
    let kid = header["kid"]
        .as_str()
        .unwrap_or_else(|| panic!("no kid: {header}"));
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("kid {kid} is not published in {jwks}"));
    assert!(jwk.get("d").is_none(), "a private key is published: {jwk}");
    verify_es256(jwt, jwk);
    assert_eq!(signed["_sd_alg"], "sha-256", "{signed}");

    let disclosure_strs = &parts[1..parts.len() - 1];
    let mut by_digest: HashMap<String, Value> = HashMap::new();
    let mut disclosures = Vec::new();
    for d in disclosure_strs {
        assert!(!d.is_empty(), "empty disclosure in {sd_jwt}");
        let digest = b64(digest::digest(&digest::SHA256, d.as_bytes()).as_ref());
        let decoded = unb64_json(d);
        let arr = decoded
            .as_array()
            .unwrap_or_else(|| panic!("disclosure {decoded} is not an array"));
        assert!(arr.len() == 2 || arr.len() == 3, "disclosure {decoded}");
        assert!(arr[0].is_string(), "salt of {decoded}");
        assert!(
            by_digest.insert(digest, decoded.clone()).is_none(),
            "the same disclosure twice"
        );
        disclosures.push(decoded);
    }
    let mut used = HashSet::new();
    let mut claims = process(&signed, &by_digest, &mut used);
    claims.as_object_mut().unwrap().remove("_sd_alg");
    assert_eq!(
        used.len(),
        by_digest.len(),
        "every disclosure is referenced by a digest in the signed payload"
    );
    VerifiedSdJwt {
        header,
        signed,
        disclosures,
        claims,
    }
}

/// RFC 9901 §7.1 step 3: replaces digests by the disclosed values, recursively.
fn process(v: &Value, by_digest: &HashMap<String, Value>, used: &mut HashSet<String>) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                if k != "_sd" {
                    out.insert(k.clone(), process(x, by_digest, used));
                }
            }
            if let Some(sd) = m.get("_sd") {
                for digest in sd.as_array().expect("`_sd` is an array") {
                    let digest = digest.as_str().expect("`_sd` holds strings");
                    let Some(d) = by_digest.get(digest) else {
                        continue; // a decoy
                    };
                    assert!(used.insert(digest.to_owned()), "digest {digest} used twice");
                    let d = d.as_array().unwrap();
                    assert_eq!(
                        d.len(),
                        3,
                        "an object digest refers to a property disclosure"
                    );
                    let name = d[1].as_str().expect("claim name is a string");
                    assert!(name != "_sd" && name != "...", "reserved claim name {name}");
                    let value = process(&d[2], by_digest, used);
                    assert!(
                        out.insert(name.to_owned(), value).is_none(),
                        "disclosed claim {name} already exists"
                    );
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => {
            let mut out = Vec::new();
            for x in a {
                match x.as_object() {
                    Some(o) if o.len() == 1 && o.contains_key("...") => {
                        let digest = o["..."].as_str().expect("`...` holds a string");
                        let Some(d) = by_digest.get(digest) else {
                            continue; // a decoy
                        };
                        assert!(used.insert(digest.to_owned()), "digest {digest} used twice");
                        let d = d.as_array().unwrap();
                        assert_eq!(
                            d.len(),
                            2,
                            "an array digest refers to an element disclosure"
                        );
                        out.push(process(&d[1], by_digest, used));
                    }
                    _ => out.push(process(x, by_digest, used)),
                }
            }
            Value::Array(out)
        }
        other => other.clone(),
    }
}

/// Asserts that `v` reveals nothing by itself: objects hold only `_sd`, array elements are
/// only `{"...": digest}`.
pub fn assert_concealed(v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            for k in m.keys() {
                assert_eq!(k, "_sd", "a plain member `{k}` at {at}: {v}");
            }
        }
        Value::Array(a) => {
            for x in a {
                let ok = x
                    .as_object()
                    .is_some_and(|o| o.len() == 1 && o["..."].is_string());
                assert!(ok, "a plain array element at {at}: {x}");
            }
        }
        _ => {}
    }
}

/// Every string anywhere in `v`.
pub fn strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(m) => m.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}
