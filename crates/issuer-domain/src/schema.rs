//! A small JSON Schema validator for credential payload schemas.
//!
//! The catalog's schemas use a deliberately small subset of JSON Schema (2020-12 keywords):
//! `type` (one name or a list), `properties`, `required`, `additionalProperties` (boolean),
//! `items`, `minItems`, `maxItems`, `minLength`, `maxLength`, `enum` and `format: "email"`.
//! Every violation names the exact field path (`payload.power[0].action`), which is what callers
//! need to fix a request, and a schema that uses any other keyword is refused when the catalog
//! is loaded rather than silently half-checked.

use serde_json::Value;

use crate::{create::is_valid_email, error::FieldViolation};

const KEYWORDS: &[&str] = &[
    "$schema",
    "$id",
    "title",
    "description",
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "enum",
    "format",
];

/// Checks that `schema` only uses supported keywords; returns the first offending path.
pub fn check_schema(schema: &Value, path: &str) -> Result<(), String> {
    let Some(obj) = schema.as_object() else {
        return Err(format!("{path}: a schema must be an object"));
    };
    for (k, v) in obj {
        if !KEYWORDS.contains(&k.as_str()) {
            return Err(format!("{path}: unsupported schema keyword `{k}`"));
        }
        match k.as_str() {
            "properties" => {
                for (name, sub) in v
                    .as_object()
                    .ok_or(format!("{path}.properties: not an object"))?
                {
                    check_schema(sub, &format!("{path}.properties.{name}"))?;
                }
            }
            "items" => check_schema(v, &format!("{path}.items"))?,
            "format" if v != "email" => return Err(format!("{path}: unsupported format {v}")),
            "additionalProperties" if !v.is_boolean() => {
                return Err(format!("{path}: additionalProperties must be a boolean"));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Validates `value` at `path` against `schema`, appending violations.
pub fn validate(schema: &Value, value: &Value, path: &str, out: &mut Vec<FieldViolation>) {
    if let Some(types) = schema.get("type") {
        let names: Vec<&str> = match types {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !names.iter().any(|t| type_matches(t, value)) {
            out.push(FieldViolation::new(
                path,
                format!("must be {}", describe(&names)),
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        out.push(FieldViolation::new(
            path,
            format!("must be one of {}", Value::Array(allowed.clone())),
        ));
    }
    match value {
        Value::Object(obj) => {
            let props = schema.get("properties").and_then(Value::as_object);
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for name in required.iter().filter_map(Value::as_str) {
                    let missing = match obj.get(name) {
                        None | Some(Value::Null) => true,
                        Some(Value::String(s)) => s.trim().is_empty(),
                        _ => false,
                    };
                    if missing {
                        out.push(FieldViolation::new(join(path, name), "is required"));
                    }
                }
            }
            let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
            for (name, v) in obj {
                match props.and_then(|p| p.get(name)) {
                    Some(sub) => validate(sub, v, &join(path, name), out),
                    None if closed => out.push(FieldViolation::new(
                        join(path, name),
                        "is not a known field",
                    )),
                    None => {}
                }
            }
        }
        Value::Array(items) => {
            let len = items.len() as u64;
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && len < min
            {
                out.push(FieldViolation::new(
                    path,
                    format!("must have at least {min} item(s)"),
                ));
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && len > max
            {
                out.push(FieldViolation::new(
                    path,
                    format!("must have at most {max} item(s)"),
                ));
            }
            if let Some(sub) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    validate(sub, item, &format!("{path}[{i}]"), out);
                }
            }
        }
        Value::String(s) => {
            // No store keeps U+0000 in text (Postgres refuses it), and no credential needs it.
            if s.contains('\0') {
                out.push(FieldViolation::new(path, "must not contain NUL characters"));
            }
            let len = s.chars().count() as u64;
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                out.push(FieldViolation::new(
                    path,
                    format!("must be at least {min} character(s)"),
                ));
            }
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                out.push(FieldViolation::new(
                    path,
                    format!("must be at most {max} characters"),
                ));
            }
            if schema.get("format").and_then(Value::as_str) == Some("email") && !is_valid_email(s) {
                out.push(FieldViolation::new(path, "must be a valid email address"));
            }
        }
        _ => {}
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn type_matches(name: &str, v: &Value) -> bool {
    match name {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "null" => v.is_null(),
        _ => false,
    }
}

fn describe(names: &[&str]) -> String {
    let with_article: Vec<String> = names
        .iter()
        .map(|n| match *n {
            "object" | "array" | "integer" => format!("an {n}"),
            other => format!("a {other}"),
        })
        .collect();
    with_article.join(" or ")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn violations(schema: Value, value: Value) -> Vec<String> {
        let mut out = Vec::new();
        validate(&schema, &value, "payload", &mut out);
        out.into_iter()
            .map(|v| format!("{}: {}", v.field, v.message))
            .collect()
    }

    #[test]
    fn reports_nested_paths() {
        let schema = json!({"type": "object", "required": ["a"], "properties": {
            "a": {"type": "object", "required": ["b"], "properties": {"b": {"type": "string"}}},
            "list": {"type": "array", "items": {"type": ["string", "array"]}}
        }});
        assert_eq!(
            violations(schema.clone(), json!({"a": {}, "list": ["x", 3]})),
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
    fn blank_required_strings_are_missing() {
        let schema = json!({"type": "object", "required": ["a"]});
        assert_eq!(
            violations(schema, json!({"a": "  "})),
            vec!["payload.a: is required"]
        );
    }

    #[test]
    fn unsupported_keywords_are_refused() {
        assert!(check_schema(&json!({"oneOf": []}), "s").is_err());
        assert!(check_schema(&json!({"type": "string", "format": "uri"}), "s").is_err());
        assert!(
            check_schema(
                &json!({"type": "object", "properties": {"a": {"type": "string"}}}),
                "s"
            )
            .is_ok()
        );
    }
}
