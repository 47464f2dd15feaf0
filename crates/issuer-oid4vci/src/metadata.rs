//! The discovery documents a wallet fetches before talking to us, as plain JSON builders:
//! Credential Issuer metadata (OID4VCI 1.0 §12.2), OAuth Authorization Server metadata
//! (RFC 8414 with the OID4VCI §12.3 addition) and SD-JWT VC issuer metadata
//! (draft-ietf-oauth-sd-jwt-vc, `/.well-known/jwt-vc-issuer`).
//!
//! Invariants:
//! - What we advertise is what the rest of this crate enforces: the proof algorithms listed are
//!   exactly those [`crate::proof`] can verify, the binding methods exactly the key forms it
//!   accepts (`jwk`, `did:jwk`), the signing algorithm the one [`crate::sdjwt`] uses. A wallet
//!   that follows the metadata must not be refused for it.
//! - `credential_issuer` is the issuer string as given, byte for byte: wallets compare it to the
//!   URL they derived the well-known location from, without normalisation (§12.2.4).
//! - `authorization_servers` is omitted: the issuer is its own authorization server, which is what
//!   omission means (§12.2.4), and it saves wallets a choice they cannot get wrong.

use serde_json::{Map, Value, json};

/// The claim under which a credential carries its configuration-validated payload; claim paths
/// in the metadata start with it, and the issuing code must nest the payload under the same name.
pub const CREDENTIAL_PAYLOAD_CLAIM: &str = "mandate";

/// Proof algorithms [`crate::proof::validate_proof`] can verify (with the default policy).
const PROOF_SIGNING_ALGS: [&str; 3] = ["ES256", "ES384", "EdDSA"];

/// The parts of a credential configuration the metadata needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigurationView {
    /// The key in `credential_configurations_supported`, e.g. `learcredential.employee.sd.1`.
    pub id: String,
    /// Credential format, e.g. `dc+sd-jwt`.
    pub format: String,
    pub vct: String,
    /// Display objects (an array, or a single object which is wrapped; `null` omits it).
    pub display: Value,
    /// JSON Schema of the payload; its `properties` become the advertised claims.
    pub schema: Value,
}

/// Credential Issuer metadata without issuer-level `display`.
pub fn credential_issuer_metadata<'a>(
    issuer: &str,
    configurations: impl IntoIterator<Item = &'a ConfigurationView>,
) -> Value {
    credential_issuer_metadata_with_display(issuer, None, 1, configurations)
}

/// Credential Issuer metadata (OID4VCI §12.2.4). Endpoints hang off the issuer identifier under
/// `/oid4vci/v1/`; `issuer_display` is the issuer's own `display` (array or single object).
/// A `batch_size` of 2 or more is advertised as `batch_credential_issuance` (§12.2.4: the
/// most key proofs one credential request may carry).
pub fn credential_issuer_metadata_with_display<'a>(
    issuer: &str,
    issuer_display: Option<&Value>,
    batch_size: usize,
    configurations: impl IntoIterator<Item = &'a ConfigurationView>,
) -> Value {
    // Only the endpoint URLs are normalised; `credential_issuer` itself must stay as given.
    let base = issuer.trim_end_matches('/');
    let supported: Map<String, Value> = configurations
        .into_iter()
        .map(|c| (c.id.clone(), configuration_metadata(c)))
        .collect();

    let mut metadata = Map::new();
    metadata.insert("credential_issuer".into(), issuer.into());
    metadata.insert(
        "credential_endpoint".into(),
        format!("{base}/oid4vci/v1/credential").into(),
    );
    metadata.insert(
        "nonce_endpoint".into(),
        format!("{base}/oid4vci/v1/nonce").into(),
    );
    metadata.insert(
        "notification_endpoint".into(),
        format!("{base}/oid4vci/v1/notification").into(),
    );
    if batch_size >= 2 {
        metadata.insert(
            "batch_credential_issuance".into(),
            json!({ "batch_size": batch_size }),
        );
    }
    if let Some(display) = issuer_display.and_then(display_array) {
        metadata.insert("display".into(), display);
    }
    metadata.insert(
        "credential_configurations_supported".into(),
        Value::Object(supported),
    );
    Value::Object(metadata)
}

fn configuration_metadata(c: &ConfigurationView) -> Value {
    let mut credential_metadata = Map::new();
    if let Some(display) = display_array(&c.display) {
        credential_metadata.insert("display".into(), display);
    }
    let claims = claim_descriptions(&c.schema);
    // §12.2.4 wants a non-empty array when present.
    if !claims.is_empty() {
        credential_metadata.insert("claims".into(), Value::Array(claims));
    }

    // No `scope`: wallets get here by credential offer and pre-authorized code, never by an
    // authorization request naming a scope.
    let mut entry = json!({
        "format": c.format,
        "vct": c.vct,
        "cryptographic_binding_methods_supported": ["jwk", "did:jwk"],
        "credential_signing_alg_values_supported": ["ES256"],
        "proof_types_supported": {
            "jwt": {"proof_signing_alg_values_supported": PROOF_SIGNING_ALGS}
        },
    });
    if !credential_metadata.is_empty() {
        entry["credential_metadata"] = Value::Object(credential_metadata);
    }
    entry
}

/// Display is a non-empty array in every place the spec uses it; accept a lone object for
/// convenience and drop anything else rather than publish an invalid member.
fn display_array(display: &Value) -> Option<Value> {
    match display {
        Value::Array(items) if !items.is_empty() => Some(display.clone()),
        Value::Object(_) => Some(Value::Array(vec![display.clone()])),
        _ => None,
    }
}

/// One claims description (§B.2) per leaf of the payload schema, with claims path pointers
/// (§C) rooted at [`CREDENTIAL_PAYLOAD_CLAIM`]. Arrays of objects use `null` ("every element")
/// in the path. Only leaves are listed: a path to an object and a path into it would describe
/// the same data twice for display. A schema `title` becomes the claim's display name.
/// Order follows the schema's property order as `serde_json` keeps it (alphabetical unless the
/// `preserve_order` feature is on).
fn claim_descriptions(schema: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        let root = vec![Value::from(CREDENTIAL_PAYLOAD_CLAIM)];
        collect_claims(properties, &root, &mut out);
    }
    out
}

fn collect_claims(properties: &Map<String, Value>, prefix: &[Value], out: &mut Vec<Value>) {
    for (name, property) in properties {
        let mut path = prefix.to_vec();
        path.push(name.as_str().into());
        if let Some(nested) = property.get("properties").and_then(Value::as_object) {
            collect_claims(nested, &path, out);
            continue;
        }
        if let Some(nested) = property
            .get("items")
            .and_then(|items| items.get("properties"))
            .and_then(Value::as_object)
        {
            path.push(Value::Null);
            collect_claims(nested, &path, out);
            continue;
        }
        let mut description = Map::new();
        description.insert("path".into(), Value::Array(path));
        if let Some(title) = property.get("title").and_then(Value::as_str) {
            description.insert("display".into(), json!([{ "name": title }]));
        }
        out.push(Value::Object(description));
    }
}

/// OAuth 2.0 Authorization Server metadata (RFC 8414) for our token endpoint.
///
/// `response_types_supported`, which RFC 8414 requires, is omitted as OID4VCI §12.3 permits:
/// there is no authorization endpoint, and both grants we support (pre-authorized code, client
/// credentials) are token-endpoint only, so any value would be a claim we do not honour.
pub fn authorization_server_metadata(issuer: &str, token_endpoint: &str, jwks_uri: &str) -> Value {
    json!({
        "issuer": issuer,
        "token_endpoint": token_endpoint,
        "jwks_uri": jwks_uri,
        "grant_types_supported": [
            "urn:ietf:params:oauth:grant-type:pre-authorized_code",
            "client_credentials"
        ],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "pre-authorized_grant_anonymous_access_supported": true,
    })
}

/// SD-JWT VC issuer metadata (`/.well-known/jwt-vc-issuer`): the keys verifiers use for the
/// `kid` in our credentials' header. `jwks` is embedded rather than referenced by `jwks_uri` so
/// verifiers need one fetch, and `issuer` must equal the credentials' `iss`.
pub fn jwt_vc_issuer_metadata(issuer: &str, jwks: Value) -> Value {
    json!({ "issuer": issuer, "jwks": jwks })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn employee() -> ConfigurationView {
        ConfigurationView {
            id: "learcredential.employee.sd.1".into(),
            format: "dc+sd-jwt".into(),
            vct: "learcredential.employee.sd.1".into(),
            display: json!({"name": "LEAR Credential Employee", "locale": "en"}),
            schema: json!({
                "type": "object",
                "properties": {
                    "mandatee": {
                        "type": "object",
                        "properties": {
                            "firstName": {"type": "string", "title": "First name"},
                            "lastName": {"type": "string"}
                        }
                    },
                    "power": {
                        "type": "array",
                        "items": {"type": "object", "properties": {
                            "function": {"type": "string"},
                            "action": {"type": ["string", "array"]}
                        }}
                    }
                }
            }),
        }
    }

    #[test]
    fn credential_issuer_metadata_describes_endpoints_and_configurations() {
        let configs = [employee()];
        let m = credential_issuer_metadata("https://issuer.example.com/tenant-a/", configs.iter());
        assert_eq!(
            m["credential_issuer"],
            "https://issuer.example.com/tenant-a/"
        );
        assert_eq!(
            m["credential_endpoint"],
            "https://issuer.example.com/tenant-a/oid4vci/v1/credential"
        );
        assert_eq!(
            m["nonce_endpoint"],
            "https://issuer.example.com/tenant-a/oid4vci/v1/nonce"
        );
        assert_eq!(
            m["notification_endpoint"],
            "https://issuer.example.com/tenant-a/oid4vci/v1/notification"
        );
        assert!(m.get("authorization_servers").is_none());
        assert!(m.get("display").is_none());

        let c = &m["credential_configurations_supported"]["learcredential.employee.sd.1"];
        assert_eq!(c["format"], "dc+sd-jwt");
        assert_eq!(c["vct"], "learcredential.employee.sd.1");
        assert!(c.get("scope").is_none());
        assert_eq!(
            c["cryptographic_binding_methods_supported"],
            json!(["jwk", "did:jwk"])
        );
        assert_eq!(
            c["credential_signing_alg_values_supported"],
            json!(["ES256"])
        );
        assert_eq!(
            c["proof_types_supported"],
            json!({"jwt": {"proof_signing_alg_values_supported": ["ES256", "ES384", "EdDSA"]}})
        );
        assert_eq!(
            c["credential_metadata"]["display"],
            json!([{"name": "LEAR Credential Employee", "locale": "en"}])
        );
        assert_eq!(
            c["credential_metadata"]["claims"],
            json!([
                {"path": ["mandate", "mandatee", "firstName"], "display": [{"name": "First name"}]},
                {"path": ["mandate", "mandatee", "lastName"]},
                {"path": ["mandate", "power", null, "action"]},
                {"path": ["mandate", "power", null, "function"]},
            ])
        );
    }

    #[test]
    fn advertised_proof_algs_match_the_default_policy() {
        let policy = crate::proof::ProofPolicy::new("x");
        let names: Vec<String> = policy
            .allowed_algs
            .iter()
            .map(|a| format!("{a:?}"))
            .collect();
        assert_eq!(names, PROOF_SIGNING_ALGS);
    }

    #[test]
    fn issuer_display_is_included_when_given() {
        let display = json!([{"name": "Acme Issuer", "locale": "en"}]);
        let m =
            credential_issuer_metadata_with_display("https://i.example", Some(&display), 10, []);
        assert_eq!(m["batch_credential_issuance"], json!({"batch_size": 10}));
        assert_eq!(m["display"], display);
        assert_eq!(m["credential_configurations_supported"], json!({}));
        let mut bare = employee();
        bare.display = Value::Null;
        bare.schema = json!({"type": "object"});
        let m = credential_issuer_metadata("https://i.example", [&bare]);
        assert!(
            m["credential_configurations_supported"][&bare.id]
                .get("credential_metadata")
                .is_none()
        );
    }

    #[test]
    fn authorization_server_and_jwt_vc_issuer_metadata() {
        let m = authorization_server_metadata(
            "https://i.example",
            "https://i.example/oauth/token",
            "https://i.example/.well-known/jwks.json",
        );
        assert_eq!(m["issuer"], "https://i.example");
        assert_eq!(m["token_endpoint"], "https://i.example/oauth/token");
        assert_eq!(m["jwks_uri"], "https://i.example/.well-known/jwks.json");
        assert_eq!(
            m["grant_types_supported"],
            json!([
                "urn:ietf:params:oauth:grant-type:pre-authorized_code",
                "client_credentials"
            ])
        );
        assert_eq!(
            m["token_endpoint_auth_methods_supported"],
            json!(["client_secret_basic", "client_secret_post", "none"])
        );
        assert_eq!(m["pre-authorized_grant_anonymous_access_supported"], true);
        assert!(m.get("response_types_supported").is_none());

        let jwks = json!({"keys": [{"kty": "EC", "kid": "k1"}]});
        assert_eq!(
            jwt_vc_issuer_metadata("https://i.example", jwks.clone()),
            json!({"issuer": "https://i.example", "jwks": jwks})
        );
    }
}
