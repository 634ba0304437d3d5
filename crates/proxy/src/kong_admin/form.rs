//! Kong's form-encoded Admin API bodies (`curl --data name=x --data config.minute=5`, the
//! style Kong's own documentation uses) turned into the JSON the Admin API stores.
//!
//! Keys nest with dots (`config.minute`), `name[]` appends to an array, `name[2]` sets an
//! index, and a repeated key becomes an array. Form values are all strings; like Kong's
//! schema-driven coercion, fields whose type is known become numbers, booleans or arrays
//! (plugin `config` fields by the plugin's schema).

use serde_json::{Map, Value};

/// Entity fields that are arrays of strings.
const ARRAY_FIELDS: [&str; 8] = [
    "paths",
    "hosts",
    "methods",
    "protocols",
    "snis",
    "tags",
    "sources",
    "destinations",
];
/// Entity fields that are integers.
const INTEGER_FIELDS: [&str; 9] = [
    "port",
    "retries",
    "connect_timeout",
    "read_timeout",
    "write_timeout",
    "regex_priority",
    "https_redirect_status_code",
    "weight",
    "slots",
];
/// Entity fields that are booleans.
const BOOLEAN_FIELDS: [&str; 6] = [
    "strip_path",
    "preserve_host",
    "enabled",
    "request_buffering",
    "response_buffering",
    "tls_verify",
];

/// The form body as a JSON object; `Err` names what could not be read.
pub fn to_json(body: &[u8]) -> Result<Map<String, Value>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the form body is not UTF-8".to_string())?;
    let mut root = Value::Object(Map::new());
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(key)?;
        let value = Value::String(decode(value)?);
        insert(&mut root, &path_of(&key)?, value)?;
    }
    let Value::Object(mut map) = root else {
        return Err("the form body is not an object".to_string());
    };
    coerce_entity(&mut map);
    Ok(map)
}

/// One step of a form key: an object field, an array index, or an append (`[]`).
#[derive(Debug, PartialEq)]
enum Step {
    Field(String),
    Index(usize),
    Append,
}

/// `config.allow[]` → `config`, `allow`, append.
fn path_of(key: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for part in key.split('.') {
        let (name, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if name.is_empty() {
            return Err(format!("form field {key:?}: empty name"));
        }
        steps.push(Step::Field(name.to_string()));
        while let Some(stripped) = rest.strip_prefix('[') {
            let Some(end) = stripped.find(']') else {
                return Err(format!("form field {key:?}: unclosed ["));
            };
            let inside = &stripped[..end];
            steps.push(if inside.is_empty() {
                Step::Append
            } else {
                // Kong's indexes are 1-based.
                match inside.parse::<usize>() {
                    Ok(n) if n >= 1 => Step::Index(n - 1),
                    _ => return Err(format!("form field {key:?}: bad index {inside:?}")),
                }
            });
            rest = &stripped[end + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("form field {key:?}: unexpected {rest:?}"));
        }
    }
    Ok(steps)
}

fn insert(target: &mut Value, steps: &[Step], value: Value) -> Result<(), String> {
    let Some((step, rest)) = steps.split_first() else {
        // A repeated key becomes an array of its values.
        match target {
            Value::Null => *target = value,
            Value::Array(items) => items.push(value),
            other => {
                let first = other.take();
                *other = Value::Array(vec![first, value]);
            }
        }
        return Ok(());
    };
    match step {
        Step::Field(name) => {
            if target.is_null() {
                *target = Value::Object(Map::new());
            }
            let Value::Object(map) = target else {
                return Err(format!("form field {name:?} mixes a value and an object"));
            };
            insert(map.entry(name.clone()).or_insert(Value::Null), rest, value)
        }
        Step::Append | Step::Index(_) => {
            if target.is_null() {
                *target = Value::Array(Vec::new());
            }
            let Value::Array(items) = target else {
                return Err("form field mixes a value and an array".to_string());
            };
            let index = match step {
                Step::Index(i) => *i,
                _ => items.len(),
            };
            if index > 1000 {
                return Err("form array index too large".to_string());
            }
            while items.len() <= index {
                items.push(Value::Null);
            }
            insert(&mut items[index], rest, value)
        }
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte.
fn decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent escape in {text:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

fn coerce_entity(map: &mut Map<String, Value>) {
    for (field, value) in map.iter_mut() {
        let field = field.as_str();
        if ARRAY_FIELDS.contains(&field) {
            to_array(value);
        } else if INTEGER_FIELDS.contains(&field) {
            to_number(value);
        } else if BOOLEAN_FIELDS.contains(&field) {
            to_bool(value);
        } else if field == "headers"
            && let Value::Object(headers) = value
        {
            // A route's `headers.x-version=v2`: each header takes a list of values.
            headers.values_mut().for_each(to_array);
        }
    }
    let name = map.get("name").and_then(Value::as_str).map(str::to_string);
    if let (Some(name), Some(Value::Object(config))) = (name, map.get_mut("config"))
        && let Some(schema) = meshgate_model::kong::schemas::plugin(&name)
    {
        coerce_config(&schema, config);
    }
}

/// Plugin `config` fields by the types the plugin's schema gives them.
fn coerce_config(schema: &Value, config: &mut Map<String, Value>) {
    let fields = schema["fields"]
        .as_array()
        .and_then(|f| f.iter().find_map(|f| f.get("config")))
        .and_then(|c| c["fields"].as_array());
    for field in fields.into_iter().flatten() {
        let Some((name, spec)) = field.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let Some(value) = config.get_mut(name) else { continue };
        match spec["type"].as_str() {
            Some("number" | "integer") => to_number(value),
            Some("boolean") => to_bool(value),
            Some("array" | "set") => {
                to_array(value);
                if matches!(spec["elements"]["type"].as_str(), Some("integer" | "number"))
                    && let Value::Array(items) = value
                {
                    items.iter_mut().for_each(to_number);
                }
            }
            _ => {}
        }
    }
}

fn to_array(value: &mut Value) {
    if !value.is_array() && !value.is_null() {
        *value = Value::Array(vec![value.take()]);
    }
}

fn to_number(value: &mut Value) {
    if let Value::String(s) = value {
        if let Ok(n) = s.parse::<i64>() {
            *value = Value::from(n);
        } else if let Some(n) = s.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            *value = Value::Number(n);
        }
    }
}

fn to_bool(value: &mut Value) {
    if let Value::String(s) = value {
        match s.as_str() {
            "true" => *value = Value::Bool(true),
            "false" => *value = Value::Bool(false),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kong_doc_style_forms_become_typed_json() {
        let form = b"name=rate-limiting&config.minute=5&config.policy=local&config.fault_tolerant=false";
        assert_eq!(
            Value::Object(to_json(form).expect("form")),
            json!({"name": "rate-limiting", "config": {"minute": 5, "policy": "local", "fault_tolerant": false}})
        );
        let form = b"name=r&paths[]=/a&paths[]=/b&methods=GET&strip_path=false&headers.x-version=v2";
        assert_eq!(
            Value::Object(to_json(form).expect("form")),
            json!({"name": "r", "paths": ["/a", "/b"], "methods": ["GET"], "strip_path": false,
                   "headers": {"x-version": ["v2"]}})
        );
        let form = b"name=key-auth&config.key_names=apikey&config.key_names=x-key";
        assert_eq!(
            Value::Object(to_json(form).expect("form")),
            json!({"name": "key-auth", "config": {"key_names": ["apikey", "x-key"]}})
        );
        // Strings stay strings where the type is not known to be otherwise.
        let form = b"key=12345&url=http%3A%2F%2Fexample.com%2Fa+b";
        assert_eq!(
            Value::Object(to_json(form).expect("form")),
            json!({"key": "12345", "url": "http://example.com/a b"})
        );
        assert!(to_json(b"a[x]=1").is_err());
        assert!(to_json(b"a=%zz").is_err());
    }
}
