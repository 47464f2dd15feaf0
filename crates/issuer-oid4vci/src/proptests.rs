//! Property tests of the parsers that take a wallet's input: key-proof JWTs (headers and
//! claims of any shape) and credential requests. Whatever arrives, nothing panics and every
//! refusal carries a code the OID4VCI 1.0 error catalogue (§8.3.1.2) documents.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use chrono::Utc;
use issuer_domain::{OAuthCode, catalog::Catalog};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

use crate::{
    ProofPolicy, WalletError, flow::parse_credential_request, proof::ProofErrorCode, validate_proof,
};

/// Object keys the parsers look for, and some they do not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("typ".to_owned()),
        Just("alg".to_owned()),
        Just("jwk".to_owned()),
        Just("kid".to_owned()),
        Just("x5c".to_owned()),
        Just("crit".to_owned()),
        Just("kty".to_owned()),
        Just("crv".to_owned()),
        Just("x".to_owned()),
        Just("y".to_owned()),
        Just("d".to_owned()),
        Just("aud".to_owned()),
        Just("iat".to_owned()),
        Just("nonce".to_owned()),
        Just("iss".to_owned()),
        Just("format".to_owned()),
        Just("vct".to_owned()),
        Just("proofs".to_owned()),
        Just("proof".to_owned()),
        Just("proof_type".to_owned()),
        Just("credential_configuration_id".to_owned()),
        Just("credential_identifier".to_owned()),
        "[a-z_]{0,8}",
    ]
}

/// Values the parsers compare against, and anything else.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e12f64..1e12).prop_map(|f| json!(f)),
        Just(json!("openid4vci-proof+jwt")),
        Just(json!("ES256")),
        Just(json!("EC")),
        Just(json!("P-256")),
        Just(json!("dc+sd-jwt")),
        Just(json!("vc+sd-jwt")),
        Just(json!("jwt")),
        Just(json!("learcredential.employee.sd.1")),
        ".{0,24}".prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// Headers that pass the first checks (the right `typ`), so that the later ones are reached.
fn proof_header() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("ES256")),
            Just(json!("ES384")),
            Just(json!("EdDSA")),
            Just(json!("none")),
            Just(json!("HS256")),
            leaf(),
        ],
        prop_oneof![
            json(),
            Just(json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"})),
            Just(json!({"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA", "d": "AAAA"})),
        ],
        prop::option::of(json()),
    )
        .prop_map(|(alg, jwk, kid)| {
            let mut h = json!({"typ": "openid4vci-proof+jwt", "alg": alg, "jwk": jwk});
            if let Some(kid) = kid {
                h["kid"] = kid;
            }
            h
        })
}

const CREDENTIAL_CODES: [OAuthCode; 5] = [
    OAuthCode::InvalidCredentialRequest,
    OAuthCode::InvalidProof,
    OAuthCode::UnsupportedCredentialFormat,
    OAuthCode::UnknownCredentialConfiguration,
    OAuthCode::UnknownCredentialIdentifier,
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_as_a_proof_is_refused_with_a_documented_code(jwt in ".{0,300}") {
        let policy = ProofPolicy::new("https://issuer.example/issuer".to_owned());
        let e = validate_proof(&jwt, &policy, Utc::now()).unwrap_err();
        prop_assert!(matches!(e.code, ProofErrorCode::InvalidProof | ProofErrorCode::InvalidNonce));
    }

    #[test]
    fn any_proof_header_and_claims_are_refused_with_a_documented_code(
        header in json(),
        claims in json(),
        signature in "[A-Za-z0-9_-]{0,90}",
    ) {
        let policy = ProofPolicy::new("https://issuer.example/issuer".to_owned());
        let jwt = format!("{}.{}.{signature}", b64(&header), b64(&claims));
        // No signature made here verifies, so every one of these is refused.
        let e = validate_proof(&jwt, &policy, Utc::now()).unwrap_err();
        prop_assert!(matches!(e.code, ProofErrorCode::InvalidProof | ProofErrorCode::InvalidNonce));
        prop_assert!(!e.message.is_empty());
    }

    #[test]
    fn proofs_with_a_plausible_header_are_refused_with_a_documented_code(
        header in proof_header(),
        claims in json(),
        signature in "[A-Za-z0-9_-]{0,90}",
    ) {
        let policy = ProofPolicy::new("https://issuer.example/issuer".to_owned());
        let jwt = format!("{}.{}.{signature}", b64(&header), b64(&claims));
        let e = validate_proof(&jwt, &policy, Utc::now()).unwrap_err();
        prop_assert!(matches!(e.code, ProofErrorCode::InvalidProof | ProofErrorCode::InvalidNonce));
    }

    #[test]
    fn any_credential_request_is_parsed_or_refused_with_a_documented_code(body in json()) {
        let catalog = Catalog::builtin();
        let config = catalog.get("learcredential.employee.sd.1").unwrap();
        match parse_credential_request(config, &body, 10) {
            // Parsed: the proof itself is validated next, by `validate_proof`.
            Ok(_) => {}
            Err(WalletError::Refused { code, .. }) => {
                prop_assert!(CREDENTIAL_CODES.contains(&code), "undocumented code {code}");
            }
            Err(WalletError::Internal(e)) => prop_assert!(false, "internal error: {}", e.chain()),
        }
    }
}
