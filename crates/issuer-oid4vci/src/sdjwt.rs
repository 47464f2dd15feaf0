//! Issuing SD-JWT VCs: RFC 9901 (Selective Disclosure for JWTs) profiled by
//! draft-ietf-oauth-sd-jwt-vc (`typ: dc+sd-jwt`, `vct`, `cnf`).
//!
//! The holder should be able to show a verifier any subset of the credential's claims, so every
//! claim the caller supplies is made selectively disclosable, at every depth: each object member
//! becomes an object-property Disclosure `[salt, name, value]` referenced from that object's `_sd`
//! array, each array element an array-element Disclosure `[salt, value]` replaced in place by
//! `{"...": digest}`. Nested values are concealed first, so an inner object's Disclosure carries
//! the inner object's own `_sd` digests and disclosing a parent reveals no child by itself.
//!
//! Invariants:
//! - The issuer-signed payload holds no claim name or value from the input, only digests; the
//!   registered claims (`iss`, `iat`, `nbf`, `exp`, `vct`, `cnf`, `status`, `_sd_alg`) stay in the clear
//!   because verifiers must read them before any disclosure (SD-JWT VC forbids concealing them).
//! - Every Disclosure's digest is referenced exactly once; no decoy digests are added.
//! - Each salt is 128 bits from the OS CSPRNG, so a digest cannot be brute-forced back to a
//!   guessable value (a birth date, a country code).
//! - `_sd` arrays are sorted by digest. Digests are hashes over random salts, so sorted order is
//!   a uniformly random permutation of the claims and leaks nothing about their original order.
//! - The holder key goes into `cnf.jwk` with its public members only; a key with private material
//!   is refused rather than stripped, since it means the caller passed the wrong thing.

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::PRIVATE_JWK_MEMBERS;

/// The `typ` header of an SD-JWT VC.
pub const SD_JWT_VC_TYP: &str = "dc+sd-jwt";

/// Top-level names we set ourselves or that SD-JWT VC forbids making selectively disclosable
/// (`status`, `vct#integrity`); a caller claim under one of them would either clash with ours or
/// have to be concealed against the spec.
const RESERVED_TOP_LEVEL: &[&str] = &[
    "iss",
    "iat",
    "nbf",
    "exp",
    "vct",
    "vct#integrity",
    "cnf",
    "status",
    "_sd_alg",
];

/// Names with meaning to the SD-JWT processing itself (RFC 9901 §4.2.4); a claim by either name,
/// at any depth, would be misread by a verifier as a digest reference.
const RESERVED_ANYWHERE: &[&str] = &["_sd", "..."];

/// What goes into one credential.
#[derive(Debug, Clone, Copy)]
pub struct SdJwtVcInput<'a> {
    /// `iss`: the Credential Issuer Identifier.
    pub issuer: &'a str,
    /// `vct`: the credential type.
    pub vct: &'a str,
    pub iat: DateTime<Utc>,
    pub exp: DateTime<Utc>,
    /// The proof-of-possession key from the wallet's key proof; becomes `cnf.jwk`.
    pub holder_jwk: &'a Value,
    /// The credential's own claims, e.g. `{"mandate": {...}}`; all made selectively disclosable.
    pub claims: &'a Map<String, Value>,
    /// The credential's entry in a status list, `(idx, list URL)`: becomes
    /// `status.status_list` (in the clear, as SD-JWT VC requires).
    pub status_list: Option<(i64, &'a str)>,
}

/// An issued SD-JWT VC in compact form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSdJwt {
    /// `<issuer-signed JWT>~<disclosure>~...~`: ends with `~` because there is no Key Binding JWT
    /// at issuance (the holder adds one at presentation).
    pub compact: String,
    /// How many Disclosures `compact` carries.
    pub disclosures: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdJwtError {
    #[error("claim name {0:?} is reserved and cannot be carried as a credential claim")]
    ReservedClaimName(String),
    #[error("exp must be later than iat")]
    InvalidValidity,
    #[error("holder key is not a public JWK: {0}")]
    InvalidHolderKey(&'static str),
    #[error("random salt generation failed")]
    Randomness,
    #[error("signing the SD-JWT failed: {0}")]
    Signing(String),
}

/// Builds and signs (ES256, `kid` = the key's thumbprint) an SD-JWT VC with every input claim
/// selectively disclosable.
#[tracing::instrument(name = "sdjwt.sign", skip_all, fields(vct = %input.vct))]
pub fn issue_sd_jwt_vc(
    input: &SdJwtVcInput,
    key: &issuer_auth::SigningKey,
) -> Result<IssuedSdJwt, SdJwtError> {
    if input.exp <= input.iat {
        return Err(SdJwtError::InvalidValidity);
    }
    let holder_jwk = checked_holder_jwk(input.holder_jwk)?;
    if let Some(name) = input
        .claims
        .keys()
        .find(|k| RESERVED_TOP_LEVEL.contains(&k.as_str()))
    {
        return Err(SdJwtError::ReservedClaimName(name.clone()));
    }

    let mut concealer = Concealer::new();
    let top_level_sd = concealer.conceal_members(input.claims)?;

    let mut payload = Map::new();
    payload.insert("iss".into(), input.issuer.into());
    payload.insert("iat".into(), input.iat.timestamp().into());
    payload.insert("nbf".into(), input.iat.timestamp().into());
    payload.insert("exp".into(), input.exp.timestamp().into());
    payload.insert("vct".into(), input.vct.into());
    payload.insert("cnf".into(), json!({ "jwk": holder_jwk }));
    if let Some((idx, uri)) = input.status_list {
        payload.insert(
            "status".into(),
            json!({ "status_list": { "idx": idx, "uri": uri } }),
        );
    }
    payload.insert("_sd_alg".into(), "sha-256".into());
    payload.extend(top_level_sd);

    let mut header = Header::new(Algorithm::ES256);
    header.typ = Some(SD_JWT_VC_TYP.into());
    header.kid = Some(key.kid().into());
    let jwt = jsonwebtoken::encode(&header, &Value::Object(payload), &key.encoding_key())
        .map_err(|e| SdJwtError::Signing(e.to_string()))?;

    let disclosures = concealer.disclosures.len();
    let mut compact = jwt;
    compact.push('~');
    for disclosure in &concealer.disclosures {
        compact.push_str(disclosure);
        compact.push('~');
    }
    Ok(IssuedSdJwt {
        compact,
        disclosures,
    })
}

fn checked_holder_jwk(jwk: &Value) -> Result<Value, SdJwtError> {
    let Value::Object(map) = jwk else {
        return Err(SdJwtError::InvalidHolderKey("not a JSON object"));
    };
    if !map.get("kty").is_some_and(Value::is_string) {
        return Err(SdJwtError::InvalidHolderKey("kty missing"));
    }
    if PRIVATE_JWK_MEMBERS.iter().any(|m| map.contains_key(*m)) {
        return Err(SdJwtError::InvalidHolderKey(
            "contains private key material",
        ));
    }
    Ok(jwk.clone())
}

/// Turns claims into digests, collecting the Disclosures that reveal them.
struct Concealer {
    rng: SystemRandom,
    disclosures: Vec<String>,
}

impl Concealer {
    fn new() -> Self {
        Self {
            rng: SystemRandom::new(),
            disclosures: Vec::new(),
        }
    }

    /// Conceals every member of `object`; returns the members that replace them: just `_sd`, or
    /// nothing for an empty object (an empty `_sd` would say nothing a verifier needs).
    fn conceal_members(
        &mut self,
        object: &Map<String, Value>,
    ) -> Result<Map<String, Value>, SdJwtError> {
        let mut digests = Vec::with_capacity(object.len());
        for (name, value) in object {
            if RESERVED_ANYWHERE.contains(&name.as_str()) {
                return Err(SdJwtError::ReservedClaimName(name.clone()));
            }
            let concealed = self.conceal_value(value)?;
            let salt = self.salt()?;
            digests.push(self.disclose(json!([salt, name, concealed])));
        }
        digests.sort_unstable();
        let mut replacement = Map::new();
        if !digests.is_empty() {
            replacement.insert(
                "_sd".into(),
                digests.into_iter().map(Value::String).collect(),
            );
        }
        Ok(replacement)
    }

    /// Conceals the inside of `value`; scalars are returned as they are.
    fn conceal_value(&mut self, value: &Value) -> Result<Value, SdJwtError> {
        match value {
            Value::Object(object) => Ok(Value::Object(self.conceal_members(object)?)),
            Value::Array(elements) => {
                let mut out = Vec::with_capacity(elements.len());
                for element in elements {
                    let concealed = self.conceal_value(element)?;
                    let salt = self.salt()?;
                    let digest = self.disclose(json!([salt, concealed]));
                    out.push(json!({ "...": digest }));
                }
                Ok(Value::Array(out))
            }
            scalar => Ok(scalar.clone()),
        }
    }

    /// Records a Disclosure and returns its digest: base64url(SHA-256(ASCII of the base64url
    /// Disclosure)), hashing the encoded form so verifiers need not re-serialise JSON the same way.
    fn disclose(&mut self, array: Value) -> String {
        let disclosure = URL_SAFE_NO_PAD.encode(array.to_string());
        let digest = URL_SAFE_NO_PAD.encode(Sha256::digest(disclosure.as_bytes()));
        self.disclosures.push(disclosure);
        digest
    }

    fn salt(&self) -> Result<String, SdJwtError> {
        let mut bytes = [0u8; 16];
        self.rng
            .fill(&mut bytes)
            .map_err(|_| SdJwtError::Randomness)?;
        Ok(URL_SAFE_NO_PAD.encode(bytes))
    }
}

#[cfg(test)]
mod tests {
    //! The verifier here is written from RFC 9901 §7.1/§7.3 and shares no code with the issuing
    //! side (its own base64, hashing and ECDSA check via aws-lc-rs), so a bug in how we conceal
    //! cannot be mirrored by the check that is meant to catch it.

    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use issuer_auth::SigningKey;

    struct Verified {
        header: Value,
        payload: Value,
        /// The payload with all disclosures applied and SD-JWT machinery removed.
        processed: Map<String, Value>,
        disclosure_count: usize,
    }

    fn b64_json(segment: &str) -> Value {
        serde_json::from_slice(&B64.decode(segment).expect("base64url")).expect("JSON")
    }

    fn sha256_b64(input: &str) -> String {
        B64.encode(Sha256::digest(input.as_bytes()))
    }

    fn verify(compact: &str, issuer_jwk: &Value) -> Verified {
        // §4: <JWT>~<D1>~...~<Dn>~ with no KB-JWT after the last tilde.
        let mut parts: Vec<&str> = compact.split('~').collect();
        assert_eq!(parts.pop(), Some(""), "must end with ~ and carry no KB-JWT");
        let jwt = parts.remove(0);
        let disclosures = parts;

        let segments: Vec<&str> = jwt.split('.').collect();
        assert_eq!(segments.len(), 3);
        let header = b64_json(segments[0]);
        let payload = b64_json(segments[1]);
        assert_eq!(header["alg"], "ES256");
        let mut point = vec![4u8];
        point.extend(B64.decode(issuer_jwk["x"].as_str().unwrap()).unwrap());
        point.extend(B64.decode(issuer_jwk["y"].as_str().unwrap()).unwrap());
        let signature = B64.decode(segments[2]).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(
                format!("{}.{}", segments[0], segments[1]).as_bytes(),
                &signature,
            )
            .expect("issuer signature verifies");
        assert_eq!(payload["_sd_alg"], "sha-256");

        // Digest -> decoded disclosure; distinct disclosures must have distinct digests.
        let mut by_digest: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for d in &disclosures {
            let decoded = b64_json(d);
            let arr = decoded.as_array().expect("disclosure is an array").clone();
            assert!(arr.len() == 2 || arr.len() == 3, "disclosure arity");
            assert!(arr[0].is_string(), "salt is a string");
            assert_eq!(
                B64.decode(arr[0].as_str().unwrap()).unwrap().len(),
                16,
                "128-bit salt"
            );
            assert!(
                by_digest.insert(sha256_b64(d), arr).is_none(),
                "duplicate disclosure"
            );
        }

        // Every digest reference, in the payload and inside disclosed values, counted.
        let mut references: BTreeMap<String, usize> = BTreeMap::new();
        collect_references(&payload, &mut references);
        for arr in by_digest.values() {
            collect_references(arr.last().unwrap(), &mut references);
        }
        for digest in by_digest.keys() {
            assert_eq!(
                references.get(digest),
                Some(&1),
                "digest referenced exactly once"
            );
        }
        assert_eq!(
            references.keys().collect::<BTreeSet<_>>(),
            by_digest.keys().collect::<BTreeSet<_>>(),
            "no reference without a disclosure (we issue no decoys)"
        );

        let mut used = BTreeSet::new();
        let Value::Object(processed) = rebuild(&payload, &by_digest, &mut used) else {
            panic!("payload is an object");
        };
        assert_eq!(used.len(), by_digest.len(), "every disclosure was used");
        let mut processed = processed;
        processed.remove("_sd_alg");
        Verified {
            header,
            payload,
            processed,
            disclosure_count: disclosures.len(),
        }
    }

    fn collect_references(value: &Value, out: &mut BTreeMap<String, usize>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("_sd", Value::Array(ds)) => {
                            for d in ds {
                                *out.entry(d.as_str().unwrap().to_owned()).or_default() += 1;
                            }
                        }
                        ("...", Value::String(d)) => *out.entry(d.clone()).or_default() += 1,
                        _ => collect_references(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| collect_references(i, out)),
            _ => {}
        }
    }

    /// RFC 9901 §7.1 step 3: replace digests by what their disclosures reveal, recursively.
    fn rebuild(
        value: &Value,
        by_digest: &BTreeMap<String, Vec<Value>>,
        used: &mut BTreeSet<String>,
    ) -> Value {
        match value {
            Value::Object(map) => {
                let mut out = Map::new();
                for (k, v) in map {
                    if k != "_sd" {
                        out.insert(k.clone(), rebuild(v, by_digest, used));
                    }
                }
                if let Some(Value::Array(digests)) = map.get("_sd") {
                    for d in digests {
                        let d = d.as_str().unwrap();
                        let arr = &by_digest[d];
                        assert_eq!(arr.len(), 3, "object digest names a property disclosure");
                        assert!(used.insert(d.to_owned()), "digest used twice");
                        let name = arr[1].as_str().unwrap();
                        assert!(name != "_sd" && name != "...");
                        let revealed = rebuild(&arr[2], by_digest, used);
                        assert!(
                            out.insert(name.to_owned(), revealed).is_none(),
                            "name clash"
                        );
                    }
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| match item.as_object() {
                        Some(o) if o.len() == 1 && o.contains_key("...") => {
                            let d = o["..."].as_str().unwrap();
                            let arr = &by_digest[d];
                            assert_eq!(arr.len(), 2, "array digest names an element disclosure");
                            assert!(used.insert(d.to_owned()), "digest used twice");
                            rebuild(&arr[1], by_digest, used)
                        }
                        _ => rebuild(item, by_digest, used),
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }

    fn mandate() -> Map<String, Value> {
        json!({
            "mandate": {
                "mandator": {
                    "organizationIdentifier": "VATES-B12345678",
                    "organization": "Acme Widgets SL",
                    "commonName": "Juana Directora",
                    "email": "boss@acme.example",
                    "country": "ES",
                    "serialNumber": "IDCES-99999999R"
                },
                "mandatee": {
                    "firstName": "Zebulon",
                    "lastName": "Quixote-Vargas",
                    "email": "zq@acme.example",
                    "employeeId": 4711
                },
                "power": [
                    {"type": "domain", "domain": "DOME", "function": "Onboarding", "action": "execute"},
                    {"function": "ProductOffering", "action": ["create", "update", "delete"]}
                ],
                "nothing": {},
                "flags": [true, null, 1.5]
            }
        })
        .as_object()
        .unwrap()
        .clone()
    }

    fn holder() -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": "nUWAoAv3XZith8E7i19OdaxOLYFOwM-Z2EuM02TirT4", "y": "HskHU8BjUi1U9Xqi7Swmj8gwAK_0xkcDjEW_71SosEY"})
    }

    fn issue(claims: &Map<String, Value>, key: &SigningKey) -> Result<IssuedSdJwt, SdJwtError> {
        let holder = holder();
        let iat = DateTime::from_timestamp(1_750_000_000, 0).unwrap();
        issue_sd_jwt_vc(
            &SdJwtVcInput {
                issuer: "https://issuer.example.com",
                vct: "learcredential.employee.sd.1",
                iat,
                exp: iat + chrono::Duration::days(365),
                holder_jwk: &holder,
                claims,
                status_list: Some((7, "https://issuer.example.com/status-lists/l1")),
            },
            key,
        )
    }

    #[test]
    fn round_trip_through_an_independent_verifier() {
        let key = SigningKey::generate();
        let claims = mandate();
        let issued = issue(&claims, &key).unwrap();
        let v = verify(&issued.compact, &key.public_jwk());

        assert_eq!(v.header["typ"], "dc+sd-jwt");
        assert_eq!(v.header["kid"], key.kid());
        assert_eq!(v.payload["iss"], "https://issuer.example.com");
        assert_eq!(v.payload["vct"], "learcredential.employee.sd.1");
        assert_eq!(v.payload["iat"], 1_750_000_000);
        assert_eq!(v.payload["nbf"], 1_750_000_000);
        assert_eq!(v.payload["exp"], 1_750_000_000 + 365 * 86_400);
        assert_eq!(v.payload["cnf"], json!({"jwk": holder()}));
        let status =
            json!({"status_list": {"idx": 7, "uri": "https://issuer.example.com/status-lists/l1"}});
        assert_eq!(v.payload["status"], status);

        // mandate 1, its members 5, mandator 6, mandatee 4, power elements 2, their members 4 + 2,
        // action elements 3, flags elements 3.
        assert_eq!(issued.disclosures, 30);
        assert_eq!(v.disclosure_count, issued.disclosures);

        let mut expected = claims.clone();
        for (k, val) in [
            ("iss", json!("https://issuer.example.com")),
            ("vct", json!("learcredential.employee.sd.1")),
            ("iat", json!(1_750_000_000)),
            ("nbf", json!(1_750_000_000)),
            ("exp", json!(1_750_000_000 + 365 * 86_400)),
            ("cnf", json!({"jwk": holder()})),
            ("status", status.clone()),
        ] {
            expected.insert(k.into(), val);
        }
        assert_eq!(v.processed, expected);
    }

    #[test]
    fn signed_payload_reveals_no_claim_names_or_values() {
        let key = SigningKey::generate();
        let issued = issue(&mandate(), &key).unwrap();
        let jwt = issued.compact.split('~').next().unwrap();
        let payload =
            String::from_utf8(B64.decode(jwt.split('.').nth(1).unwrap()).unwrap()).unwrap();
        for secret in [
            "Zebulon",
            "Quixote",
            "firstName",
            "mandatee",
            "mandate",
            "VATES",
            "ProductOffering",
            "power",
            "Onboarding",
        ] {
            assert!(!payload.contains(secret), "{secret} leaked into {payload}");
        }
        let top: Value = serde_json::from_str(&payload).unwrap();
        let keys: BTreeSet<&str> = top
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "_sd", "_sd_alg", "cnf", "exp", "iat", "iss", "nbf", "status", "vct"
            ]
            .into()
        );
        let sd = top["_sd"].as_array().unwrap();
        assert_eq!(sd.len(), 1);
    }

    #[test]
    fn sd_arrays_are_sorted_and_salts_differ_between_issuances() {
        let key = SigningKey::generate();
        let a = issue(&mandate(), &key).unwrap();
        let b = issue(&mandate(), &key).unwrap();
        let disclosures = |c: &str| -> BTreeSet<String> {
            c.split('~')
                .skip(1)
                .filter(|d| !d.is_empty())
                .map(str::to_owned)
                .collect()
        };
        assert!(disclosures(&a.compact).is_disjoint(&disclosures(&b.compact)));
        for d in disclosures(&a.compact) {
            let arr = b64_json(&d);
            if let Some(Value::Object(o)) = arr.as_array().unwrap().last()
                && let Some(Value::Array(sd)) = o.get("_sd")
            {
                let digests: Vec<&str> = sd.iter().map(|v| v.as_str().unwrap()).collect();
                let mut sorted = digests.clone();
                sorted.sort_unstable();
                assert_eq!(digests, sorted);
            }
        }
    }

    #[test]
    fn reserved_names_and_bad_inputs_are_refused() {
        let key = SigningKey::generate();
        for claims in [
            json!({"iss": "x"}),
            json!({"cnf": {}}),
            json!({"status": {}}),
            json!({"a": {"_sd": []}}),
            json!({"a": [{"...": "x"}]}),
        ] {
            let claims = claims.as_object().unwrap().clone();
            assert!(
                matches!(issue(&claims, &key), Err(SdJwtError::ReservedClaimName(_))),
                "{claims:?}"
            );
        }

        let iat = DateTime::from_timestamp(1_750_000_000, 0).unwrap();
        let claims = mandate();
        let mut private = holder();
        private["d"] = json!("AAAA");
        let input = |holder_jwk, exp| SdJwtVcInput {
            issuer: "https://issuer.example.com",
            vct: "v",
            iat,
            exp,
            holder_jwk,
            claims: &claims,
            status_list: None,
        };
        assert_eq!(
            issue_sd_jwt_vc(&input(&private, iat + chrono::Duration::days(1)), &key),
            Err(SdJwtError::InvalidHolderKey(
                "contains private key material"
            ))
        );
        assert_eq!(
            issue_sd_jwt_vc(&input(&holder(), iat), &key),
            Err(SdJwtError::InvalidValidity)
        );
    }

    #[test]
    fn empty_claims_give_a_credential_without_disclosures() {
        let key = SigningKey::generate();
        let issued = issue(&Map::new(), &key).unwrap();
        assert_eq!(issued.disclosures, 0);
        let v = verify(&issued.compact, &key.public_jwk());
        assert!(v.payload.get("_sd").is_none());
    }
}
