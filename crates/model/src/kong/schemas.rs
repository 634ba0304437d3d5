//! Kong's plugin schemas as `GET /schemas/plugins/{name}` shows them, for the plugins
//! meshgate implements: each config field with Kong's type and default, so that clients that
//! build forms or validate against the schema (Kong Manager, decK) keep working.
//!
//! The table is kept beside the plugin decoders in [`super::plugins`]; a test decodes every
//! field listed here with its default, so a field the decoders do not know cannot be listed.

use serde_json::{Value, json};

/// One config field: name, Kong type (`array<string>` for arrays and sets of strings),
/// default as JSON (`""`: none), and whether Kong requires it.
type Field = (&'static str, &'static str, &'static str, bool);

/// Plugins meshgate serves, with their config fields.
const PLUGINS: &[(&str, &[Field])] = &[
    (
        "key-auth",
        &[
            ("key_names", "array<string>", r#"["apikey"]"#, true),
            ("hide_credentials", "boolean", "false", true),
            ("anonymous", "string", "", false),
            ("key_in_header", "boolean", "true", true),
            ("key_in_query", "boolean", "true", true),
            ("key_in_body", "boolean", "false", true),
            ("run_on_preflight", "boolean", "true", true),
            ("realm", "string", "", false),
        ],
    ),
    (
        "basic-auth",
        &[
            ("anonymous", "string", "", false),
            ("hide_credentials", "boolean", "false", true),
            ("realm", "string", "", false),
        ],
    ),
    (
        "jwt",
        &[
            ("uri_param_names", "array<string>", r#"["jwt"]"#, false),
            ("cookie_names", "array<string>", "[]", false),
            ("key_claim_name", "string", r#""iss""#, false),
            ("secret_is_base64", "boolean", "false", true),
            ("claims_to_verify", "array<string>", "", false),
            ("anonymous", "string", "", false),
            ("run_on_preflight", "boolean", "true", true),
            ("maximum_expiration", "number", "0", false),
            ("header_names", "array<string>", r#"["authorization"]"#, false),
            ("realm", "string", "", false),
        ],
    ),
    (
        "acl",
        &[
            ("allow", "array<string>", "", false),
            ("deny", "array<string>", "", false),
            ("hide_groups_header", "boolean", "false", true),
            ("always_use_authenticated_groups", "boolean", "false", true),
            ("include_consumer_groups", "boolean", "false", false),
        ],
    ),
    (
        "ip-restriction",
        &[
            ("allow", "array<string>", "", false),
            ("deny", "array<string>", "", false),
            ("status", "number", "", false),
            ("message", "string", "", false),
        ],
    ),
    (
        "rate-limiting",
        &[
            ("second", "number", "", false),
            ("minute", "number", "", false),
            ("hour", "number", "", false),
            ("day", "number", "", false),
            ("month", "number", "", false),
            ("year", "number", "", false),
            ("limit_by", "string", r#""consumer""#, false),
            ("header_name", "string", "", false),
            ("path", "string", "", false),
            ("policy", "string", r#""local""#, false),
            ("fault_tolerant", "boolean", "true", true),
            ("hide_client_headers", "boolean", "false", true),
            ("error_code", "number", "429", false),
            ("error_message", "string", r#""API rate limit exceeded""#, false),
            ("sync_rate", "number", "-1", true),
            ("redis", "record", "", true),
        ],
    ),
    (
        "request-size-limiting",
        &[
            ("allowed_payload_size", "integer", "128", false),
            ("size_unit", "string", r#""megabytes""#, true),
            ("require_content_length", "boolean", "false", true),
        ],
    ),
    (
        "request-transformer",
        &[
            ("http_method", "string", "", false),
            ("remove", "record", "", true),
            ("rename", "record", "", true),
            ("replace", "record", "", true),
            ("add", "record", "", true),
            ("append", "record", "", true),
        ],
    ),
    ("response-transformer", RESPONSE_TRANSFORMER),
    (
        "cors",
        &[
            ("origins", "array<string>", "", false),
            ("headers", "array<string>", "", false),
            ("exposed_headers", "array<string>", "", false),
            (
                "methods",
                "array<string>",
                r#"["GET","HEAD","PUT","PATCH","POST","DELETE","OPTIONS","TRACE","CONNECT"]"#,
                false,
            ),
            ("max_age", "number", "", false),
            ("credentials", "boolean", "false", true),
            ("private_network", "boolean", "false", true),
            ("preflight_continue", "boolean", "false", true),
        ],
    ),
    (
        "correlation-id",
        &[
            ("header_name", "string", r#""Kong-Request-ID""#, false),
            ("generator", "string", r#""uuid#counter""#, true),
            ("echo_downstream", "boolean", "false", true),
        ],
    ),
    (
        "request-termination",
        &[
            ("status_code", "integer", "503", true),
            ("message", "string", "", false),
            ("body", "string", "", false),
            ("content_type", "string", "", false),
            ("trigger", "string", "", false),
            ("echo", "boolean", "false", true),
        ],
    ),
    (
        "proxy-cache",
        &[
            ("response_code", "array<integer>", "[200, 301, 404]", true),
            ("request_method", "array<string>", r#"["GET","HEAD"]"#, true),
            (
                "content_type",
                "array<string>",
                r#"["text/plain","application/json"]"#,
                true,
            ),
            ("cache_ttl", "integer", "300", false),
            ("strategy", "string", r#""memory""#, true),
            ("cache_control", "boolean", "false", true),
            ("ignore_uri_case", "boolean", "false", false),
            ("vary_headers", "array<string>", "", false),
            ("vary_query_params", "array<string>", "", false),
        ],
    ),
    (
        "file-log",
        &[("path", "string", "", true), ("reopen", "boolean", "false", true)],
    ),
    (
        "http-log",
        &[
            ("http_endpoint", "string", "", true),
            ("method", "string", r#""POST""#, false),
            ("content_type", "string", r#""application/json""#, false),
            ("timeout", "number", "10000", false),
            ("keepalive", "number", "60000", false),
            ("headers", "map", "", false),
        ],
    ),
    (
        "prometheus",
        &[
            ("per_consumer", "boolean", "false", false),
            ("status_code_metrics", "boolean", "false", false),
            ("latency_metrics", "boolean", "false", false),
            ("bandwidth_metrics", "boolean", "false", false),
            ("upstream_health_metrics", "boolean", "false", false),
        ],
    ),
];

/// response-transformer: sections of header and JSON body edits.
const RESPONSE_TRANSFORMER: &[Field] = &[
    ("remove", "record", "", true),
    ("rename", "record", "", true),
    ("replace", "record", "", true),
    ("add", "record", "", true),
    ("append", "record", "", true),
];

/// Names of the plugins meshgate serves, sorted.
pub fn available() -> Vec<&'static str> {
    let mut names: Vec<&str> = PLUGINS.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    names
}

/// Kong's schema document for plugin `name`, or `None` for a plugin meshgate does not serve.
pub fn plugin(name: &str) -> Option<Value> {
    let (_, fields) = PLUGINS.iter().find(|(n, _)| *n == name)?;
    let config_fields: Vec<Value> = fields
        .iter()
        .map(|&(field, kind, default, required)| {
            let mut spec = match kind.split_once('<') {
                Some((container, element)) => json!({
                    "type": container,
                    "elements": {"type": element.trim_end_matches('>')},
                }),
                None => json!({"type": kind}),
            };
            if !default.is_empty()
                && let Ok(value) = serde_json::from_str::<Value>(default)
            {
                spec["default"] = value;
            }
            spec["required"] = json!(required);
            json!({ field: spec })
        })
        .collect();
    let protocols = ["grpc", "grpcs", "http", "https"];
    Some(json!({
        "fields": [
            {"consumer": {"type": "foreign", "reference": "consumers"}},
            {"service": {"type": "foreign", "reference": "services"}},
            {"route": {"type": "foreign", "reference": "routes"}},
            {"protocols": {
                "type": "set",
                "required": true,
                "default": protocols,
                "elements": {"type": "string", "one_of": protocols},
            }},
            {"config": {"type": "record", "required": true, "fields": config_fields}},
        ]
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles a decK file with one global instance of the plugin.
    fn compiles_plugin(name: &str, config: &Value) -> Result<(), String> {
        let deck = json!({
            "_format_version": "3.0",
            "services": [{"name": "s", "url": "http://127.0.0.1:9", "routes": [{"name": "r", "paths": ["/"]}]}],
            "plugins": [{"name": name, "config": config}],
            "consumers": [{"username": "x"}],
        });
        let docs = crate::source::parse_str(std::path::Path::new("schema-test.yaml"), &deck.to_string())
            .map_err(|f| f.to_string())?;
        crate::compile(&docs, &crate::CompileOptions::default())
            .map(|_| ())
            .map_err(|f| f.errors().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }

    /// Every listed field, set to its default (or a sample value), is one the plugin's decoder
    /// accepts: the schema cannot name fields meshgate does not read.
    #[test]
    fn every_schema_field_is_accepted_by_the_plugin() {
        let mut failures = Vec::new();
        for (name, fields) in PLUGINS {
            for &(field, kind, default, _) in *fields {
                let value: Value = if default.is_empty() {
                    match kind {
                        "string" if field == "http_endpoint" => json!("http://127.0.0.1:9/log"),
                        "string" if field == "path" => json!("/tmp/meshgate-schema-test.log"),
                        "string" if field == "limit_by" => json!("ip"),
                        _ if field == "claims_to_verify" => json!(["exp"]),
                        "string" => json!("x"),
                        "boolean" => json!(false),
                        "number" | "integer" => json!(403),
                        "record" | "map" => json!({}),
                        _ => json!(["10.0.0.0/8"]),
                    }
                } else {
                    serde_json::from_str(default).expect("default is JSON")
                };
                let mut config = json!({ field: value });
                // Plugins that need one field to be valid at all.
                match *name {
                    "rate-limiting" if field != "minute" => config["minute"] = json!(5),
                    "file-log" if field != "path" => config["path"] = json!("/tmp/meshgate-schema-test.log"),
                    "http-log" if field != "http_endpoint" => config["http_endpoint"] = json!("http://127.0.0.1:9/log"),
                    "ip-restriction" | "acl" if field != "allow" && field != "deny" => {
                        config["allow"] = json!(["10.0.0.0/8"])
                    }
                    "request-termination" if field == "echo" || field == "trigger" => {}
                    _ => {}
                }
                if *name == "rate-limiting" && field == "header_name" {
                    config["limit_by"] = json!("header");
                }
                if *name == "rate-limiting" && field == "path" {
                    config["limit_by"] = json!("path");
                }
                if let Err(e) = compiles_plugin(name, &config) {
                    failures.push(format!("{name}.{field}: {e}"));
                }
            }
        }
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[test]
    fn schemas_have_kongs_shape() {
        let schema = plugin("key-auth").expect("key-auth");
        let config = &schema["fields"][4]["config"];
        assert_eq!(config["type"], "record");
        assert_eq!(config["fields"][0]["key_names"]["default"], json!(["apikey"]));
        assert_eq!(config["fields"][0]["key_names"]["elements"]["type"], "string");
        assert!(plugin("no-such-plugin").is_none());
        assert!(available().contains(&"rate-limiting"));
    }
}
