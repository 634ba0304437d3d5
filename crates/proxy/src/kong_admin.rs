//! A Kong-compatible Admin API (`--admin-api`): CRUD on services, routes, consumers (with their
//! key-auth credentials), plugins and upstreams (with their targets), `POST /config` for a
//! whole declarative file, `/status`. The state is one decK document, validated by the same
//! compiler as every config, persisted to a file that is part of the proxy's config, and
//! applied by an immediate reload: changes take effect before the response is sent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::Shared;

/// The API's OpenAPI document, checked in as `docs/admin-api.openapi.json` and served at
/// `/openapi.json`.
const OPENAPI: &str = include_str!("../../../docs/admin-api.openapi.json");

/// Largest request body the Admin API reads (a declarative config).
const MAX_BODY: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct KongAdminOptions {
    pub addr: SocketAddr,
    /// Required (`Kong-Admin-Token` header) on every request when set.
    pub token: Option<String>,
    /// The decK file holding the Admin API's state; also one of the proxy's config files.
    pub state_file: PathBuf,
}

pub struct KongAdmin {
    options: KongAdminOptions,
    /// The last state read or written; re-read from the file on each request, so that
    /// `meshgate config import` and edits to the file are seen.
    state: Mutex<Value>,
}

/// Collections and the field that names their entities (besides `id`).
const COLLECTIONS: [(&str, &str); 5] = [
    ("services", "name"),
    ("routes", "name"),
    ("consumers", "username"),
    ("plugins", "instance_name"),
    ("upstreams", "name"),
];

impl KongAdmin {
    /// Loads (or creates) the state file; fails when an existing one is not a decK document.
    pub fn open(options: KongAdminOptions) -> Result<KongAdmin, String> {
        let state = match std::fs::read_to_string(&options.state_file) {
            Ok(text) => {
                let docs = meshgate_model::source::parse_str(&options.state_file, &text).map_err(|f| f.to_string())?;
                match docs.into_iter().next() {
                    Some(doc) if doc.kind == meshgate_model::kong::KIND => doc.body,
                    _ => return Err(format!("{}: not a decK file", options.state_file.display())),
                }
            }
            Err(_) => {
                let empty = json!({"_format_version": "3.0"});
                write_state(&options.state_file, &empty)?;
                empty
            }
        };
        Ok(KongAdmin {
            options,
            state: Mutex::new(state),
        })
    }

    pub fn options(&self) -> &KongAdminOptions {
        &self.options
    }

    /// Refreshes the in-memory state from the state file, when it parses as decK.
    fn refresh(&self) {
        let Ok(text) = std::fs::read_to_string(&self.options.state_file) else {
            return;
        };
        let Ok(docs) = meshgate_model::source::parse_str(&self.options.state_file, &text) else {
            return;
        };
        if let Some(doc) = docs.into_iter().next().filter(|d| d.kind == meshgate_model::kong::KIND) {
            *self.state.lock().unwrap_or_else(|p| p.into_inner()) = doc.body;
        }
    }
}

fn write_state(path: &PathBuf, state: &Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(state).map_err(|e| e.to_string())?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, admin: Arc<KongAdmin>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone(), admin.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn message(status: StatusCode, text: &str) -> Reply {
    reply(status, &json!({"message": text}))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

async fn handle(req: Request<Incoming>, shared: Arc<Shared>, admin: Arc<KongAdmin>) -> Result<Reply, Infallible> {
    if let Some(token) = &admin.options.token {
        let presented = req
            .headers()
            .get("kong-admin-token")
            .map(|v| v.as_bytes())
            .unwrap_or(b"");
        if !constant_time_eq(presented, token.as_bytes()) {
            return Ok(message(
                StatusCode::UNAUTHORIZED,
                "Invalid credentials. Token or User credentials required",
            ));
        }
    }
    admin.refresh();
    let method = req.method().clone();
    let path: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(message(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")),
    };
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    Ok(route(&method, &segments, &body, &shared, &admin))
}

fn route(method: &Method, path: &[&str], body: &Bytes, shared: &Shared, admin: &KongAdmin) -> Reply {
    match (method, path) {
        (&Method::GET, []) => reply(
            StatusCode::OK,
            &json!({
                "tagline": "Welcome to meshgate",
                "version": env!("CARGO_PKG_VERSION"),
                "configuration": {"database": "off", "admin_listen": [admin.options.addr.to_string()]},
            }),
        ),
        // Kong's prometheus plugin serves metrics here; meshgate's are always on.
        (&Method::GET, ["metrics"]) => {
            let mut resp = Response::new(Full::new(Bytes::from(shared.stats.render_prometheus())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            resp
        }
        (&Method::GET, ["openapi.json"]) => {
            let mut resp = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        (&Method::GET, ["status"]) => reply(
            StatusCode::OK,
            &json!({
                "database": {"reachable": true},
                "configuration_hash": format!("{:032x}", shared.active.load().version),
                "server": {"connections_active": shared.stats.requests_in_flight.load(std::sync::atomic::Ordering::Relaxed)},
            }),
        ),
        (&Method::GET, ["config"]) => {
            let state = admin.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
            reply(StatusCode::OK, &state)
        }
        (&Method::POST, ["config"]) => {
            let text = String::from_utf8_lossy(body);
            let docs = match meshgate_model::source::parse_str(&admin.options.state_file, &text) {
                Ok(d) => d,
                Err(f) => return schema_violation(&f.to_string()),
            };
            match docs.into_iter().next() {
                Some(doc) if doc.kind == meshgate_model::kong::KIND => {
                    commit(shared, admin, doc.body, StatusCode::CREATED)
                }
                _ => schema_violation("expected a declarative configuration with _format_version"),
            }
        }
        (_, [collection, rest @ ..]) if COLLECTIONS.iter().any(|(c, _)| c == collection) => {
            entity(method, collection, rest, body, shared, admin)
        }
        _ => message(StatusCode::NOT_FOUND, "Not found"),
    }
}

fn schema_violation(text: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        &json!({"code": 2, "name": "schema violation", "message": text, "fields": {}}),
    )
}

/// Validates `candidate` with the config compiler, persists it and reloads; the response is
/// `answer` (or the candidate itself when `answer` is null).
fn commit_with(shared: &Shared, admin: &KongAdmin, candidate: Value, status: StatusCode, answer: Value) -> Reply {
    let text = match serde_json::to_string(&candidate) {
        Ok(t) => t,
        Err(e) => return schema_violation(&e.to_string()),
    };
    let docs = match meshgate_model::source::parse_str(&admin.options.state_file, &text) {
        Ok(d) => d,
        Err(f) => return schema_violation(&f.to_string()),
    };
    if let Err(findings) = meshgate_model::compile(&docs, &shared.options.compile) {
        let errors: Vec<String> = findings
            .errors()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect();
        return schema_violation(&errors.join("; "));
    }
    let mut state = admin.state.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = write_state(&admin.options.state_file, &candidate) {
        return message(StatusCode::INTERNAL_SERVER_ERROR, &e);
    }
    *state = candidate;
    drop(state);
    if let Err(e) = crate::reload::reload(shared) {
        tracing::warn!(error = %e, "admin API: reload after a change failed");
    }
    let body = if answer.is_null() {
        admin.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    } else {
        answer
    };
    reply(status, &body)
}

fn commit(shared: &Shared, admin: &KongAdmin, candidate: Value, status: StatusCode) -> Reply {
    commit_with(shared, admin, candidate, status, Value::Null)
}

fn new_id() -> String {
    let mut bytes = fastrand::u128(..).to_be_bytes();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The index of the entity of `list` whose id or naming field is `key`.
fn find(list: &[Value], key: &str, name_field: &str) -> Option<usize> {
    list.iter().position(|e| {
        e.get("id").and_then(Value::as_str) == Some(key) || e.get(name_field).and_then(Value::as_str) == Some(key)
    })
}

fn parse_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, String> {
    if body.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("the body must be a JSON object".to_string()),
    }
}

/// Kong stores a service's `url` as `protocol`, `host`, `port` and `path`, so that later
/// changes to one of them apply.
fn expand_url(fields: &mut serde_json::Map<String, Value>) -> Result<(), String> {
    let Some(url) = fields.remove("url") else { return Ok(()) };
    let Some(url) = url.as_str() else {
        return Err("url: expected a string".to_string());
    };
    let Some((protocol, rest)) = url.split_once("://") else {
        return Err(format!("url: not a URL: {url:?}"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => match p.parse::<u16>() {
            Ok(port) => (h, Some(port)),
            Err(_) => return Err(format!("url: bad port in {url:?}")),
        },
        _ => (authority, None),
    };
    let default_port = if protocol == "https" || protocol == "grpcs" {
        443
    } else {
        80
    };
    fields.insert("protocol".to_string(), json!(protocol));
    fields.insert(
        "host".to_string(),
        json!(host.trim_start_matches('[').trim_end_matches(']')),
    );
    fields.insert("port".to_string(), json!(port.unwrap_or(default_port)));
    if let Some(path) = path {
        fields.insert("path".to_string(), json!(path));
    }
    Ok(())
}

/// CRUD on one collection, and the nested ones Kong has.
fn entity(method: &Method, collection: &str, rest: &[&str], body: &Bytes, shared: &Shared, admin: &KongAdmin) -> Reply {
    let name_field = COLLECTIONS
        .iter()
        .find(|(c, _)| *c == collection)
        .map_or("name", |(_, f)| *f);
    let mut state = admin.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if !state.get(collection).is_some_and(Value::is_array) {
        state[collection] = json!([]);
    }
    let list = state[collection].as_array().cloned().unwrap_or_default();
    match (method, rest) {
        (&Method::GET, []) => reply(StatusCode::OK, &json!({"data": list, "next": null})),
        (&Method::POST, []) => {
            let mut fields = match parse_body(body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e),
            };
            if collection == "services"
                && let Err(e) = expand_url(&mut fields)
            {
                return schema_violation(&e);
            }
            if let Some(name) = fields.get(name_field).and_then(Value::as_str)
                && find(&list, name, name_field).is_some()
            {
                return reply(
                    StatusCode::CONFLICT,
                    &json!({"code": 5, "name": "unique constraint violation",
                            "message": format!("UNIQUE violation detected on '{{{name_field}=\"{name}\"}}'")}),
                );
            }
            fields.entry("id").or_insert_with(|| Value::String(new_id()));
            fields.entry("created_at").or_insert_with(|| json!(now_secs()));
            let created = Value::Object(fields);
            if let Some(array) = state[collection].as_array_mut() {
                array.push(created.clone());
            }
            commit_with(shared, admin, state, StatusCode::CREATED, created)
        }
        (_, [key]) => {
            let Some(index) = find(&list, key, name_field) else {
                return match method {
                    &Method::DELETE => Response::builder()
                        .status(StatusCode::NO_CONTENT)
                        .body(Full::new(Bytes::new()))
                        .unwrap_or_else(|_| message(StatusCode::NO_CONTENT, "")),
                    _ => message(StatusCode::NOT_FOUND, "Not found"),
                };
            };
            match *method {
                Method::GET => reply(StatusCode::OK, &list[index]),
                Method::DELETE => {
                    if let Some(array) = state[collection].as_array_mut() {
                        array.remove(index);
                    }
                    let resp = commit(shared, admin, state, StatusCode::NO_CONTENT);
                    if resp.status() == StatusCode::NO_CONTENT {
                        return Response::builder()
                            .status(StatusCode::NO_CONTENT)
                            .body(Full::new(Bytes::new()))
                            .unwrap_or(resp);
                    }
                    resp
                }
                Method::PATCH | Method::PUT => {
                    let mut fields = match parse_body(body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e),
                    };
                    if collection == "services"
                        && let Err(e) = expand_url(&mut fields)
                    {
                        return schema_violation(&e);
                    }
                    let mut updated = if *method == Method::PUT {
                        json!({"id": list[index].get("id"), "created_at": list[index].get("created_at")})
                    } else {
                        list[index].clone()
                    };
                    for (k, v) in fields {
                        if k != "id" {
                            updated[k] = v;
                        }
                    }
                    state[collection][index] = updated.clone();
                    commit_with(shared, admin, state, StatusCode::OK, updated)
                }
                _ => message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
            }
        }
        (_, [key, nested]) => {
            let Some(index) = find(&list, key, name_field) else {
                return message(StatusCode::NOT_FOUND, "Not found");
            };
            let parent_id = list[index].get("id").cloned().unwrap_or(Value::Null);
            match (collection, *nested, method) {
                // Routes and plugins of a service live top-level with a reference to it.
                ("services", "routes" | "plugins", &Method::GET) => {
                    let children: Vec<Value> = state[*nested]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c.pointer("/service/id") == Some(&parent_id))
                        .cloned()
                        .collect();
                    reply(StatusCode::OK, &json!({"data": children, "next": null}))
                }
                ("services", "routes" | "plugins", &Method::POST) => {
                    let mut fields = match parse_body(body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e),
                    };
                    fields.insert("service".to_string(), json!({"id": parent_id}));
                    fields.entry("id").or_insert_with(|| Value::String(new_id()));
                    fields.entry("created_at").or_insert_with(|| json!(now_secs()));
                    let created = Value::Object(fields);
                    if !state.get(*nested).is_some_and(Value::is_array) {
                        state[*nested] = json!([]);
                    }
                    if let Some(array) = state[*nested].as_array_mut() {
                        array.push(created.clone());
                    }
                    commit_with(shared, admin, state, StatusCode::CREATED, created)
                }
                // Credentials and targets are nested in their parent, as decK writes them.
                ("consumers", "key-auth", _) | ("consumers", "acls", _) | ("upstreams", "targets", _) => {
                    let field = match *nested {
                        "key-auth" => "keyauth_credentials",
                        "acls" => "acls",
                        _ => "targets",
                    };
                    match *method {
                        Method::GET => reply(
                            StatusCode::OK,
                            &json!({"data": list[index].get(field).cloned().unwrap_or(json!([])), "next": null}),
                        ),
                        Method::POST => {
                            let mut fields = match parse_body(body) {
                                Ok(f) => f,
                                Err(e) => return schema_violation(&e),
                            };
                            if field == "keyauth_credentials" && !fields.contains_key("key") {
                                fields.insert("key".to_string(), Value::String(new_id().replace('-', "")));
                            }
                            fields.entry("id").or_insert_with(|| Value::String(new_id()));
                            let created = Value::Object(fields);
                            let parent = &mut state[collection][index];
                            if !parent.get(field).is_some_and(Value::is_array) {
                                parent[field] = json!([]);
                            }
                            if let Some(array) = parent[field].as_array_mut() {
                                array.push(created.clone());
                            }
                            commit_with(shared, admin, state, StatusCode::CREATED, created)
                        }
                        _ => message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
                    }
                }
                _ => message(StatusCode::NOT_FOUND, "Not found"),
            }
        }
        _ => message(StatusCode::NOT_FOUND, "Not found"),
    }
}
