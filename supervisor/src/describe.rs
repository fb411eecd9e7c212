//! Described methods: what a plugin says its methods take and give, as JSON Schema.
//!
//! An SDK sends the list one way before Ready (`Notify "plugd.describe"`, JSON); the status
//! shows it, and a JSON call whose input does not match its method's input schema is
//! refused by plugd with the schema error, before the plugin sees it. The checker covers
//! what the SDKs generate (`type`, `properties`, `required`, `additionalProperties`,
//! `items`, `enum`, `anyOf`); a keyword it does not know is not checked (the plugin still
//! validates its own input), never a reason to refuse.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The Notify method that carries the descriptions.
pub const DESCRIBE_NOTIFY: &str = "plugd.describe";

/// The most of a description list that is kept, in bytes of JSON.
pub const DESCRIBE_MAX: usize = 256 << 10;

/// One method as its plugin describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodInfo {
    /// The method's name.
    pub name: String,
    /// One line for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of its input, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<Value>,
    /// JSON Schema of its result, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
}

/// Reads a `plugd.describe` payload (JSON bytes): None when it is too big or not a list.
pub fn parse(bytes: &[u8]) -> Option<Vec<MethodInfo>> {
    if bytes.len() > DESCRIBE_MAX {
        return None;
    }
    serde_json::from_slice(bytes).ok()
}

/// Checks `value` against `schema`; the error names where (`$.pair[1]`) and what.
pub fn check(schema: &Value, value: &Value) -> Result<(), String> {
    check_at(schema, value, "$", 0)
}

fn type_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn check_at(schema: &Value, value: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > 64 {
        return Ok(()); // a schema that deep is not one an SDK made; the plugin checks itself
    }
    let Value::Object(s) = schema else { return Ok(()) };
    if let Some(t) = s.get("type") {
        let allowed: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let got = type_of(value);
        let ok = allowed.is_empty()
            || allowed.iter().any(|a| *a == got || (*a == "number" && got == "integer"));
        if !ok {
            return Err(format!(
                "{at}: expected {}, got {got} ({})",
                allowed.join(" or "),
                cut(value)
            ));
        }
    }
    if let Some(Value::Array(options)) = s.get("enum") {
        if !options.contains(value) {
            return Err(format!(
                "{at}: {} is not one of {}",
                cut(value),
                Value::Array(options.clone())
            ));
        }
    }
    // oneOf (schemars' tagged enums) is checked as anyOf: a value must match one of them
    // (that it matches only one is the plugin's to check).
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(any)) = s.get(key) {
            let errors: Vec<String> =
                any.iter().filter_map(|o| check_at(o, value, at, depth + 1).err()).collect();
            if errors.len() == any.len() && !any.is_empty() {
                return Err(errors.join("; or "));
            }
        }
    }
    if let Some(c) = s.get("const") {
        if c != value {
            return Err(format!("{at}: expected {}, got {}", cut(c), cut(value)));
        }
    }
    match value {
        Value::Object(obj) => {
            if let Some(Value::Array(required)) = s.get("required") {
                for key in required.iter().filter_map(Value::as_str) {
                    if !obj.contains_key(key) {
                        return Err(format!("{at}: the key {key:?} is missing"));
                    }
                }
            }
            let props = s.get("properties").and_then(Value::as_object);
            for (key, v) in obj {
                let here = format!("{at}.{key}");
                match (props.and_then(|p| p.get(key)), s.get("additionalProperties")) {
                    (Some(sub), _) => check_at(sub, v, &here, depth + 1)?,
                    (None, Some(Value::Bool(false))) => {
                        return Err(format!("{at}: the key {key:?} is not one it takes"))
                    }
                    (None, Some(extra @ Value::Object(_))) => check_at(extra, v, &here, depth + 1)?,
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item) = s.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check_at(item, v, &format!("{at}[{i}]"), depth + 1)?;
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// A value as the error shows it: short, one line.
fn cut(v: &Value) -> String {
    let text = v.to_string();
    if text.chars().count() > 40 {
        format!("{}…", text.chars().take(40).collect::<String>())
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_subset_the_sdks_generate_is_checked_and_errors_say_where() {
        let s = json!({"type": "object", "properties": {
            "pair": {"type": "array", "items": {"type": "number"}},
            "mode": {"enum": ["fast", "slow"]},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]}
        }, "required": ["pair"], "additionalProperties": false});
        assert_eq!(check(&s, &json!({"pair": [1, 2.5], "mode": "fast", "note": null})), Ok(()));
        let e = check(&s, &json!({"pair": [1, "x"]})).unwrap_err();
        assert_eq!(e, "$.pair[1]: expected number, got string (\"x\")");
        assert!(check(&s, &json!({})).unwrap_err().contains("\"pair\" is missing"));
        assert!(check(&s, &json!({"pair": [], "mode": "odd"})).unwrap_err().contains("not one of"));
        assert!(check(&s, &json!({"pair": [], "x": 1})).unwrap_err().contains("not one it takes"));
        assert!(check(&s, &json!({"pair": [], "note": 3})).is_err());
        // schemars' shapes: oneOf (tagged enums) and const.
        let tagged = json!({"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "buy"}, "qty": {"type": "integer"}},
             "required": ["kind", "qty"]},
            {"type": "object", "properties": {"kind": {"const": "cancel"}}, "required": ["kind"]}
        ]});
        assert_eq!(check(&tagged, &json!({"kind": "buy", "qty": 3})), Ok(()));
        assert_eq!(check(&tagged, &json!({"kind": "cancel"})), Ok(()));
        let e = check(&tagged, &json!({"kind": "sell", "qty": 1})).unwrap_err();
        assert!(e.contains("expected \"buy\"") && e.contains("expected \"cancel\""), "{e}");
        assert!(check(&json!({"type": "integer"}), &json!(2.5)).is_err());
        assert_eq!(check(&json!({"type": "number"}), &json!(2)), Ok(()));
        // Unknown keywords and non-object schemas check nothing.
        assert_eq!(check(&json!({"pattern": "^a"}), &json!("b")), Ok(()));
        assert_eq!(check(&json!(true), &json!(1)), Ok(()));
        assert_eq!(parse(b"[{\"name\": \"add\"}]").unwrap()[0].name, "add");
        assert_eq!(parse(b"{}"), None);
        // A plugin cannot make plugd hold more than DESCRIBE_MAX of descriptions.
        let huge = format!("[{{\"name\": \"{}\"}}]", "a".repeat(DESCRIBE_MAX));
        assert_eq!(parse(huge.as_bytes()), None);
    }
}
