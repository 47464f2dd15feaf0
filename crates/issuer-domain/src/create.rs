//! Parsing and validating a create request, and its canonical fingerprint.
//!
//! Both adapters hand the request over as JSON (`serde_json::Value`; gRPC converts its message
//! first), so validation, field paths and the idempotency fingerprint are one implementation.
//! Once a `ValidCreate` exists, every field in it is valid.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::{
    catalog::Catalog,
    error::{Error, FieldViolation},
    model::{Delivery, PRE_AUTHORIZED_CODE_GRANT, Tenant},
};

/// A `client_request_id`: 1..=255 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientRequestId(String);

impl ClientRequestId {
    pub const MAX_LEN: usize = 255;

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("must not be empty".into());
        }
        if s.len() > Self::MAX_LEN {
            return Err(format!("must be at most {} characters", Self::MAX_LEN));
        }
        if !s.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
            return Err("must be printable ASCII".into());
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A recipient email address (RFC 5321 addr-spec, conservatively: no quoting, no comments,
/// no whitespace or control characters, so nothing can be smuggled into mail headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress(String);

impl EmailAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        if is_valid_email(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err("must be a valid email address".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// See [`EmailAddress`].
pub fn is_valid_email(s: &str) -> bool {
    if s.len() > 254 {
        return false;
    }
    let Some((local, domain)) = s.rsplit_once('@') else {
        return false;
    };
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// A create request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidCreate {
    pub client_request_id: ClientRequestId,
    pub credential_configuration_id: String,
    pub payload: Value,
    pub delivery: Delivery,
    pub email: Option<EmailAddress>,
    pub grant_type: String,
    /// Offer lifetime in seconds, within the tenant's bounds.
    pub expires_in: i64,
    /// Whether `expires_in` was given (it is part of the fingerprint only then).
    pub explicit_expires_in: bool,
    /// The offer needs a transaction code.
    pub tx_code: bool,
}

impl ValidCreate {
    /// Validates a create request given as JSON. All problems are reported at once.
    pub fn parse(body: &Value, catalog: &Catalog, tenant: &Tenant) -> Result<Self, Error> {
        let Some(obj) = body.as_object() else {
            return Err(Error::invalid_field(
                "",
                "the request body must be a JSON object",
            ));
        };
        let mut v = Vec::new();

        let client_request_id = match string_field(obj, "client_request_id", &mut v) {
            Some(s) => ClientRequestId::parse(s)
                .map_err(|m| v.push(FieldViolation::new("client_request_id", m)))
                .ok(),
            None => {
                v.push(FieldViolation::new("client_request_id", "is required"));
                None
            }
        };

        let configuration = match string_field(obj, "credential_configuration_id", &mut v) {
            Some(id) => match catalog.get(id) {
                Some(c) => Some(c),
                None => {
                    let known: Vec<&str> = catalog.ids().collect();
                    v.push(FieldViolation::new(
                        "credential_configuration_id",
                        format!(
                            "unknown credential configuration `{id}`; known: {}",
                            known.join(", ")
                        ),
                    ));
                    None
                }
            },
            None => {
                v.push(FieldViolation::new(
                    "credential_configuration_id",
                    "is required",
                ));
                None
            }
        };

        let payload = match obj.get("payload") {
            None | Some(Value::Null) => {
                v.push(FieldViolation::new("payload", "is required"));
                None
            }
            Some(p) => {
                if let Some(c) = configuration {
                    v.extend(c.validate_payload(p));
                } else if !p.is_object() {
                    v.push(FieldViolation::new("payload", "must be an object"));
                }
                Some(p.clone())
            }
        };

        let delivery = match string_field(obj, "delivery", &mut v) {
            None => Some(Delivery::None),
            Some(s) => s
                .parse()
                .map_err(|m| v.push(FieldViolation::new("delivery", m)))
                .ok(),
        };

        let email = match string_field(obj, "email", &mut v) {
            None => None,
            Some(s) => EmailAddress::parse(s)
                .map_err(|m| v.push(FieldViolation::new("email", m)))
                .ok(),
        };
        if delivery == Some(Delivery::Email)
            && email.is_none()
            && !v.iter().any(|x| x.field == "email")
        {
            v.push(FieldViolation::new(
                "email",
                "is required when delivery is `email`",
            ));
        }

        let grant_type = match string_field(obj, "grant_type", &mut v) {
            None | Some(PRE_AUTHORIZED_CODE_GRANT) | Some("pre-authorized_code") => {
                Some(PRE_AUTHORIZED_CODE_GRANT.to_owned())
            }
            Some(other) => {
                v.push(FieldViolation::new(
                    "grant_type",
                    format!("unsupported grant type `{other}`; use `{PRE_AUTHORIZED_CODE_GRANT}`"),
                ));
                None
            }
        };

        let (expires_in, explicit_expires_in) = match obj.get("expires_in") {
            None | Some(Value::Null) => (tenant.default_offer_ttl_secs, false),
            Some(x) => match x.as_i64() {
                Some(n) if (1..=tenant.max_offer_ttl_secs).contains(&n) => (n, true),
                _ => {
                    v.push(FieldViolation::new(
                        "expires_in",
                        format!(
                            "must be an integer from 1 to {} (seconds)",
                            tenant.max_offer_ttl_secs
                        ),
                    ));
                    (0, true)
                }
            },
        };

        let tx_code = match obj.get("tx_code") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                v.push(FieldViolation::new("tx_code", "must be a boolean"));
                false
            }
        };

        if !v.is_empty() {
            return Err(Error::invalid(v));
        }
        // Every `None` above pushed a violation, so these are all present.
        match (
            client_request_id,
            configuration,
            payload,
            delivery,
            grant_type,
        ) {
            (Some(client_request_id), Some(c), Some(payload), Some(delivery), Some(grant_type)) => {
                Ok(Self {
                    client_request_id,
                    credential_configuration_id: c.id.clone(),
                    payload,
                    delivery,
                    email,
                    grant_type,
                    expires_in,
                    explicit_expires_in,
                    tx_code,
                })
            }
            _ => Err(Error::internal("create validation lost a violation")),
        }
    }

    /// SHA-256 (hex) of the canonical JSON of everything but the idempotency key itself:
    /// object keys sorted, no insignificant whitespace, defaults filled in, so that equal
    /// requests written differently have equal fingerprints.
    pub fn fingerprint(&self) -> String {
        let mut m = Map::new();
        m.insert(
            "credential_configuration_id".into(),
            self.credential_configuration_id.clone().into(),
        );
        m.insert("payload".into(), self.payload.clone());
        m.insert("delivery".into(), self.delivery.as_str().into());
        if let Some(e) = &self.email {
            m.insert("email".into(), e.as_str().into());
        }
        m.insert("grant_type".into(), self.grant_type.clone().into());
        if self.explicit_expires_in {
            m.insert("expires_in".into(), self.expires_in.into());
        }
        if self.tx_code {
            m.insert("tx_code".into(), true.into());
        }
        let mut canonical = String::new();
        write_canonical(&Value::Object(m), &mut canonical);
        hex(&Sha256::digest(canonical.as_bytes()))
    }
}

/// A string member, or a violation when it is present but not a string. `null` counts as absent.
fn string_field<'a>(
    obj: &'a Map<String, Value>,
    name: &str,
    v: &mut Vec<FieldViolation>,
) -> Option<&'a str> {
    match obj.get(name) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => {
            v.push(FieldViolation::new(name, "must be a string"));
            None
        }
    }
}

/// Canonical JSON: sorted keys, compact separators (RFC 8785-like for the values we accept).
pub fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod proptests {
    //! Whatever body arrives, `ValidCreate::parse` accepts it or refuses it with
    //! `invalid_request` and at least one field violation; it never panics.

    use chrono::Utc;
    use proptest::prelude::*;
    use serde_json::{Map, Value, json};

    use super::*;
    use crate::error::ErrorCode;

    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("client_request_id".to_owned()),
            Just("credential_configuration_id".to_owned()),
            Just("payload".to_owned()),
            Just("delivery".to_owned()),
            Just("email".to_owned()),
            Just("grant_type".to_owned()),
            Just("tx_code".to_owned()),
            Just("expires_in".to_owned()),
            Just("mandator".to_owned()),
            Just("mandatee".to_owned()),
            Just("power".to_owned()),
            Just("action".to_owned()),
            Just("function".to_owned()),
            Just("organizationIdentifier".to_owned()),
            "[a-zA-Z_]{0,10}",
        ]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-1e15f64..1e15).prop_map(|f| json!(f)),
            Just(json!("email")),
            Just(json!("learcredential.employee.sd.1")),
            Just(json!("ada@example.com")),
            ".{0,40}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
            ]
        })
    }

    fn check(body: &Value) -> Result<(), TestCaseError> {
        let tenant = Tenant::new("t", Utc::now());
        match ValidCreate::parse(body, &Catalog::builtin(), &tenant) {
            Ok(_) => Ok(()),
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::InvalidRequest, "{}", e.message);
                prop_assert!(!e.violations.is_empty() || !e.message.is_empty());
                Ok(())
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn any_body_is_accepted_or_refused_as_invalid_request(body in json()) {
            check(&body)?;
        }

        /// A valid body with one member (at the top or in the payload) replaced by anything.
        #[test]
        fn a_valid_body_with_one_member_replaced(
            path in prop_oneof![
                Just(vec!["client_request_id"]),
                Just(vec!["credential_configuration_id"]),
                Just(vec!["delivery"]),
                Just(vec!["email"]),
                Just(vec!["payload"]),
                Just(vec!["payload", "mandator"]),
                Just(vec!["payload", "mandatee"]),
                Just(vec!["payload", "power"]),
                Just(vec!["payload", "mandatee", "email"]),
                Just(vec!["payload", "mandator", "organizationIdentifier"]),
            ],
            value in json(),
        ) {
            let mut body = super::tests::valid_body();
            let mut at = &mut body;
            for (i, k) in path.iter().enumerate() {
                if i + 1 == path.len() {
                    at[*k] = value.clone();
                } else {
                    at = &mut at[*k];
                }
            }
            check(&body)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;

    use super::*;
    use crate::error::ErrorCode;

    fn tenant() -> Tenant {
        Tenant::new("t", Utc::now())
    }

    pub(crate) fn valid_body() -> Value {
        json!({
            "client_request_id": "req-1",
            "credential_configuration_id": "learcredential.employee.sd.1",
            "payload": {
                "mandator": {"organizationIdentifier": "VATES-B12345678", "organization": "Acme"},
                "mandatee": {"firstName": "Ada", "lastName": "Lovelace", "email": "ada@example.com"},
                "power": [{"function": "Onboarding", "action": ["Execute"]}]
            },
            "delivery": "none"
        })
    }

    fn fields(body: Value) -> Vec<String> {
        let err = ValidCreate::parse(&body, &Catalog::builtin(), &tenant()).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        err.violations.into_iter().map(|v| v.field).collect()
    }

    #[test]
    fn accepts_the_documented_request() {
        let c = ValidCreate::parse(&valid_body(), &Catalog::builtin(), &tenant()).unwrap();
        assert_eq!(c.client_request_id.as_str(), "req-1");
        assert_eq!(c.grant_type, PRE_AUTHORIZED_CODE_GRANT);
        assert_eq!(c.expires_in, Tenant::DEFAULT_OFFER_TTL_SECS);
    }

    #[test]
    fn reports_every_bad_field_with_its_path() {
        let mut b = valid_body();
        b["client_request_id"] = json!("");
        b["credential_configuration_id"] = json!("nope");
        b["delivery"] = json!("email");
        b["grant_type"] = json!("authorization_code");
        assert_eq!(
            fields(b),
            vec![
                "client_request_id",
                "credential_configuration_id",
                "email",
                "grant_type"
            ]
        );

        let mut b = valid_body();
        b["payload"]["mandator"]
            .as_object_mut()
            .unwrap()
            .remove("organizationIdentifier");
        b["email"] = json!("not an email");
        assert_eq!(
            fields(b),
            vec!["payload.mandator.organizationIdentifier", "email"]
        );
    }

    #[test]
    fn client_request_id_bounds() {
        assert!(ClientRequestId::parse(&"a".repeat(255)).is_ok());
        assert!(ClientRequestId::parse(&"a".repeat(256)).is_err());
        assert!(ClientRequestId::parse("").is_err());
        assert!(ClientRequestId::parse("tab\there").is_err());
        assert!(ClientRequestId::parse("é").is_err());
    }

    #[test]
    fn emails_with_line_breaks_or_spaces_are_refused() {
        for bad in [
            "a@b",
            "a b@c.de",
            "a@b.de\r\nBcc: x@y.z",
            "@b.de",
            "a@-b.de",
            "a..b@c.de",
            "a@b..de",
        ] {
            assert!(!is_valid_email(bad), "{bad:?}");
        }
        for good in ["a@b.de", "first.last+tag@sub.example.com", "x_y@a-b.io"] {
            assert!(is_valid_email(good), "{good:?}");
        }
    }

    #[test]
    fn fingerprint_ignores_key_order_and_the_key_itself_but_not_content() {
        let t = tenant();
        let cat = Catalog::builtin();
        let a = ValidCreate::parse(&valid_body(), &cat, &t).unwrap();
        let reordered: Value = serde_json::from_str(
            r#"{"delivery":"none","payload":{"power":[{"action":["Execute"],"function":"Onboarding"}],
            "mandatee":{"email":"ada@example.com","lastName":"Lovelace","firstName":"Ada"},
            "mandator":{"organization":"Acme","organizationIdentifier":"VATES-B12345678"}},
            "credential_configuration_id":"learcredential.employee.sd.1","client_request_id":"other"}"#,
        )
        .unwrap();
        let b = ValidCreate::parse(&reordered, &cat, &t).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut changed = valid_body();
        changed["payload"]["mandatee"]["firstName"] = json!("Grace");
        let c = ValidCreate::parse(&changed, &cat, &t).unwrap();
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn expires_in_is_bounded_by_the_tenant() {
        let mut b = valid_body();
        b["expires_in"] = json!(Tenant::MAX_OFFER_TTL_SECS + 1);
        assert_eq!(fields(b), vec!["expires_in"]);
    }
}
