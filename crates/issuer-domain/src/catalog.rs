//! The credential-configuration catalog: which credentials this issuer offers, in which format,
//! and the JSON schema a create request's `payload` must satisfy. Configurations are data: the
//! built-in catalog below can be replaced by a JSON file of the same shape.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{error::FieldViolation, schema::Schema};

/// One credential configuration (OID4VCI `credential_configurations_supported` entry plus the
/// payload schema).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CredentialConfiguration {
    pub id: String,
    /// Credential format, e.g. `dc+sd-jwt`.
    pub format: String,
    /// SD-JWT VC type.
    pub vct: String,
    /// OID4VCI display objects.
    #[serde(default)]
    pub display: Value,
    /// JSON schema (2020-12) of the create request's `payload`.
    pub schema: Value,
    /// `schema`, compiled when the catalog is built.
    #[serde(skip)]
    compiled: Option<Schema>,
}

impl PartialEq for CredentialConfiguration {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.id,
            &self.format,
            &self.vct,
            &self.display,
            &self.schema,
        ) == (
            &other.id,
            &other.format,
            &other.vct,
            &other.display,
            &other.schema,
        )
    }
}

impl CredentialConfiguration {
    /// Validates a payload; violations are reported under `payload.`.
    pub fn validate_payload(&self, payload: &Value) -> Vec<FieldViolation> {
        match &self.compiled {
            Some(schema) => schema.validate(payload, "payload"),
            // Only a configuration that never went through `Catalog::new` lacks it.
            None => match Schema::compile(&self.schema, &self.id) {
                Ok(schema) => schema.validate(payload, "payload"),
                Err(e) => vec![FieldViolation::new("credential_configuration_id", e)],
            },
        }
    }
}

/// The set of configurations, keyed by id.
#[derive(Debug, Clone)]
pub struct Catalog {
    configs: BTreeMap<String, CredentialConfiguration>,
}

impl Catalog {
    /// Builds a catalog, compiling each payload schema once; an invalid schema is refused.
    pub fn new(configs: Vec<CredentialConfiguration>) -> Result<Self, String> {
        let mut map = BTreeMap::new();
        for mut c in configs {
            c.compiled = Some(Schema::compile(&c.schema, &format!("{}.schema", c.id))?);
            if map.insert(c.id.clone(), c).is_some() {
                return Err("duplicate credential configuration id".into());
            }
        }
        Ok(Self { configs: map })
    }

    /// Parses a catalog file: a JSON array of configurations.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let configs: Vec<CredentialConfiguration> =
            serde_json::from_str(text).map_err(|e| format!("catalog file: {e}"))?;
        Self::new(configs)
    }

    /// The catalog shipped with the service.
    pub fn builtin() -> Self {
        Self::new(vec![lear_credential_employee()]).expect("the built-in catalog is valid")
    }

    pub fn get(&self, id: &str) -> Option<&CredentialConfiguration> {
        self.configs.get(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.configs.keys().map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = &CredentialConfiguration> {
        self.configs.values()
    }
}

/// `learcredential.employee.sd.1`: a LEARCredentialEmployee as an SD-JWT VC (DESIGN §7).
fn lear_credential_employee() -> CredentialConfiguration {
    // Not blank: at least one character that is not white space.
    let text =
        |max: u64| json!({"type": "string", "minLength": 1, "maxLength": max, "pattern": "\\S"});
    let email = json!({"type": "string", "format": "email", "maxLength": 254});
    CredentialConfiguration {
        id: "learcredential.employee.sd.1".into(),
        format: "dc+sd-jwt".into(),
        vct: "learcredential.employee.sd.1".into(),
        display: json!([{"name": "LEAR Credential Employee", "locale": "en"}]),
        compiled: None,
        schema: json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["mandator", "mandatee", "power"],
            "properties": {
                "mandator": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["organizationIdentifier"],
                    "properties": {
                        "organizationIdentifier": text(128),
                        "organization": text(256),
                        "commonName": text(256),
                        "email": email,
                        "country": {"type": "string", "minLength": 2, "maxLength": 2},
                        "serialNumber": text(128)
                    }
                },
                "mandatee": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["firstName", "lastName", "email"],
                    "properties": {
                        "firstName": text(256),
                        "lastName": text(256),
                        "email": email,
                        "employeeId": text(128)
                    }
                },
                "power": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 64,
                    "items": {
                        "type": "object",
                        "additionalProperties": false,
                        "required": ["function", "action"],
                        "properties": {
                            "type": text(128),
                            "domain": text(128),
                            "function": text(128),
                            "action": {
                                "type": ["string", "array"],
                                "minItems": 1,
                                "minLength": 1,
                                "items": text(128)
                            }
                        }
                    }
                }
            }
        }),
    }
}
