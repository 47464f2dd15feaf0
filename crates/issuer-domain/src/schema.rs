//! Payload schemas: JSON Schema 2020-12, compiled once when the catalog loads, by the
//! `jsonschema` crate with remote and file references off (a schema refers only to itself,
//! through `$ref` / `$defs`). An operator's catalog may use any keyword of the draft (`pattern`,
//! `const`, `oneOf`, `minimum`, `format: date`, ...). `format: email` means a plain address, as
//! the service accepts for offer emails (no display name or quoting).
//!
//! Every violation names its exact field path (`payload.power[0].action`) and says what is wrong
//! in words that never repeat the offending value: values are personal data, and refusals are
//! logged.

use std::sync::Arc;

use jsonschema::{Draft, ValidationError, Validator, error::ValidationErrorKind};
use serde_json::Value;

use crate::error::FieldViolation;

/// A schema compiled for validation.
#[derive(Clone)]
pub struct Schema(Arc<Validator>);

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

impl Schema {
    /// Compiles `schema`; an invalid one, or one that refers outside itself, is refused with
    /// `path` (its place in the catalog) in the message.
    pub fn compile(schema: &Value, path: &str) -> Result<Self, String> {
        jsonschema::options()
            .with_draft(Draft::Draft202012)
            .should_validate_formats(true)
            // A plain address (no display name, quoting or spaces), as offer emails need.
            .with_format("email", crate::create::is_valid_email)
            .build(schema)
            .map(|v| Self(Arc::new(v)))
            .map_err(|e| format!("{path}: invalid schema: {}", e.masked()))
    }

    /// The violations of `value`, reported under `root` (e.g. `payload`).
    pub fn validate(&self, value: &Value, root: &str) -> Vec<FieldViolation> {
        let mut out = Vec::new();
        // No store keeps U+0000 in text (Postgres refuses it), and no credential needs it.
        if has_nul(value) {
            nul_strings(value, root, &mut out);
        }
        for e in self.0.iter_errors(value) {
            violations(&e, value, root, &mut out);
        }
        out
    }
}

/// The field path of a JSON pointer into `value`: `/power/0/action` under `payload` is
/// `payload.power[0].action` (an index only where the value there is an array).
fn field_path(pointer: &str, value: &Value, root: &str) -> String {
    let mut path = root.to_owned();
    let mut at = Some(value);
    for raw in pointer.split('/').skip(1) {
        let segment = raw.replace("~1", "/").replace("~0", "~");
        match at {
            Some(Value::Array(items)) => {
                path.push_str(&format!("[{segment}]"));
                at = segment.parse::<usize>().ok().and_then(|i| items.get(i));
            }
            _ => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&segment);
                at = at.and_then(|v| v.get(&segment));
            }
        }
    }
    path
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn violations(e: &ValidationError<'_>, value: &Value, root: &str, out: &mut Vec<FieldViolation>) {
    let path = field_path(e.instance_path().as_str(), value, root);
    let message = match e.kind() {
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or_default();
            out.push(FieldViolation::new(join(&path, name), "is required"));
            return;
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            for name in unexpected {
                out.push(FieldViolation::new(
                    join(&path, name),
                    "is not a known field",
                ));
            }
            return;
        }
        ValidationErrorKind::Type { kind } => {
            let names: Vec<String> = match kind {
                jsonschema::error::TypeKind::Single(t) => vec![t.to_string()],
                jsonschema::error::TypeKind::Multiple(set) => {
                    set.iter().map(|t| t.to_string()).collect()
                }
            };
            format!("must be {}", describe(&names))
        }
        ValidationErrorKind::MinLength { limit } => {
            format!("must be at least {limit} character(s)")
        }
        ValidationErrorKind::MaxLength { limit } => format!("must be at most {limit} characters"),
        ValidationErrorKind::MinItems { limit } => format!("must have at least {limit} item(s)"),
        ValidationErrorKind::MaxItems { limit } => format!("must have at most {limit} item(s)"),
        ValidationErrorKind::Enum { options } => format!("must be one of {options}"),
        ValidationErrorKind::Format { format } if format == "email" => {
            "must be a valid email address".to_owned()
        }
        ValidationErrorKind::Pattern { pattern } if pattern == r"\S" => {
            "must not be blank".to_owned()
        }
        // The library's own words, with the offending value masked.
        _ => e.masked_with("the value").to_string(),
    };
    out.push(FieldViolation::new(path, message));
}

fn describe(names: &[String]) -> String {
    names
        .iter()
        .map(|n| match n.as_str() {
            "object" | "array" | "integer" => format!("an {n}"),
            other => format!("a {other}"),
        })
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Whether any string or field name in `value` holds a NUL: the common answer, no, without
/// building the path of every node.
fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(obj) => obj.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

fn nul_strings(value: &Value, path: &str, out: &mut Vec<FieldViolation>) {
    match value {
        Value::String(s) if s.contains('\0') => {
            out.push(FieldViolation::new(path, "must not contain NUL characters"));
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                nul_strings(item, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(obj) => {
            for (k, v) in obj {
                if k.contains('\0') {
                    out.push(FieldViolation::new(
                        path,
                        "must not contain NUL characters in field names",
                    ));
                }
                nul_strings(v, &join(path, k), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn violations(schema: Value, value: Value) -> Vec<String> {
        Schema::compile(&schema, "test")
            .unwrap()
            .validate(&value, "payload")
            .into_iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect()
    }

    #[test]
    fn reports_nested_paths() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "object", "required": ["b"], "properties": {"b": {"type": "string"}}},
            "list": {"type": "array", "items": {"type": ["string", "array"]}}
        }});
        let mut got = violations(schema.clone(), json!({"a": {}, "list": ["x", 3]}));
        got.sort();
        assert_eq!(
            got,
            vec![
                "payload.a.b: is required",
                "payload.list[1]: must be a string or an array"
            ]
        );
        assert!(violations(schema, json!({"a": {"b": "x"}, "list": [["y"]]})).is_empty());
    }

    #[test]
    fn closed_objects_refuse_unknown_fields() {
        let schema = json!({"type": "object", "additionalProperties": false, "properties": {}});
        assert_eq!(
            violations(schema, json!({"x": 1})),
            vec!["payload.x: is not a known field"]
        );
    }

    #[test]
    fn blank_strings_fail_a_non_blank_pattern() {
        let schema =
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "\\S"}}});
        assert_eq!(
            violations(schema, json!({"a": "  "})),
            vec!["payload.a: must not be blank"]
        );
    }

    #[test]
    fn nul_characters_are_refused_anywhere() {
        let schema = json!({"type": "object"});
        assert_eq!(
            violations(schema, json!({"a": ["x", "y\u{0}"]})),
            vec!["payload.a[1]: must not contain NUL characters"]
        );
    }

    /// What an operator's catalog may now use: `$defs` / `$ref`, `pattern`, `const`, `oneOf`,
    /// `minimum`, `format: date`, each violation at its exact path and without the value.
    #[test]
    fn the_whole_draft_is_available() {
        let schema = json!({
            "type": "object",
            "$defs": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "properties": {
                "unit": {"$ref": "#/$defs/code"},
                "level": {"type": "integer", "minimum": 1},
                "born": {"type": "string", "format": "date"},
                "kind": {"const": "employee"},
                "power": {"type": "array", "items": {"oneOf": [
                    {"type": "object", "required": ["action"]},
                    {"type": "string"}
                ]}}
            }
        });
        let got = violations(
            schema.clone(),
            json!({"unit": "secret-unit", "level": 0, "born": "1990-13-45", "kind": "x",
                   "power": [{"action": "a"}, 5]}),
        );
        let fields: Vec<&str> = got.iter().map(|v| v.split(':').next().unwrap()).collect();
        for f in [
            "payload.unit",
            "payload.level",
            "payload.born",
            "payload.kind",
            "payload.power[1]",
        ] {
            assert!(fields.contains(&f), "{f} in {got:?}");
        }
        assert!(
            got.iter()
                .all(|v| !v.contains("secret-unit") && !v.contains("1990-13-45")),
            "no value is repeated: {got:?}"
        );
        assert!(
            violations(
                schema,
                json!({"unit": "ABC", "level": 2, "born": "1990-01-31", "kind": "employee",
                       "power": [{"action": "a"}, "b"]})
            )
            .is_empty()
        );
    }

    #[test]
    fn invalid_schemas_and_outside_references_are_refused() {
        assert!(Schema::compile(&json!({"type": "no-such-type"}), "s").is_err());
        assert!(Schema::compile(&json!({"$ref": "https://example.com/schema.json"}), "s").is_err());
        assert!(Schema::compile(&json!({"$ref": "file:///etc/passwd"}), "s").is_err());
    }
}
