//! A Kong-compatible Admin API (`--admin-api`): CRUD on services, routes, consumers (with
//! their credentials), plugins, upstreams (with their targets), certificates and SNIs;
//! `POST /config` for a whole declarative file; `/status`; `/schemas/plugins/{name}`.
//!
//! The state is one decK document kept in the Admin API's database ([`crate::kong_store`]).
//! A change is applied to the latest stored document under the database's write lock,
//! validated by the same compiler as every config, stored, and applied by an immediate
//! reload, so it serves before the response is sent. Changes made by other instances sharing
//! the database are picked up by polling its revision ([`watch`]).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use meshgate_model::source::Document;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::Shared;
use crate::kong_store::{Change, Store, StoreLocation, Stored};

/// The API's OpenAPI document, checked in as `docs/admin-api.openapi.json` and served at
/// `/openapi.json`.
const OPENAPI: &str = include_str!("../../../docs/admin-api.openapi.json");

/// Largest request body the Admin API reads (a declarative config).
const MAX_BODY: usize = 16 << 20;

/// How often the database's revision is checked for changes made elsewhere.
const POLL_INTERVAL: Duration = Duration::from_millis(300);

/// The Kong release whose Admin API and decK format meshgate follows (`GET /` reports it as
/// `version`).
const KONG_API_VERSION: &str = "3.9.0";

/// Kong's default page size for listings.
const DEFAULT_PAGE_SIZE: usize = 100;

#[derive(Debug, Clone)]
pub struct KongAdminOptions {
    pub addr: SocketAddr,
    /// Required (`Kong-Admin-Token` header) on every request when set.
    pub token: Option<String>,
    /// Where the state is kept.
    pub database: StoreLocation,
}

pub struct KongAdmin {
    options: KongAdminOptions,
    store: Store,
    /// The revision of the stored state the proxy serves.
    applied: AtomicI64,
}

/// Top-level collections and the field that names their entities (besides `id`).
const COLLECTIONS: [(&str, &str); 7] = [
    ("services", "name"),
    ("routes", "name"),
    ("consumers", "username"),
    ("plugins", "instance_name"),
    ("upstreams", "name"),
    ("certificates", "id"),
    ("snis", "name"),
];

/// Entities decK nests in a parent: (parent collection, path segment, decK field, naming
/// field).
const NESTED: [(&str, &str, &str, &str); 6] = [
    ("consumers", "key-auth", "keyauth_credentials", "key"),
    ("consumers", "basic-auth", "basicauth_credentials", "username"),
    ("consumers", "jwt", "jwt_secrets", "key"),
    ("consumers", "acls", "acls", "group"),
    ("upstreams", "targets", "targets", "target"),
    ("certificates", "snis", "snis", "name"),
];

impl KongAdmin {
    /// Opens the database; fails when it cannot be reached or holds no decK document.
    pub async fn open(options: KongAdminOptions) -> Result<KongAdmin, String> {
        let store = Store::open(options.database.clone()).await?;
        Ok(KongAdmin {
            options,
            store,
            applied: AtomicI64::new(-1),
        })
    }

    pub fn options(&self) -> &KongAdminOptions {
        &self.options
    }

    /// Reads the stored state and makes it part of the proxy's config (without reloading).
    pub async fn load_into(&self, shared: &Shared) -> Result<(), String> {
        let stored = self.store.load().await?;
        self.install(shared, &stored)
    }

    /// Puts `stored` among the documents the proxy compiles.
    fn install(&self, shared: &Shared, stored: &Stored) -> Result<(), String> {
        let documents = documents(&self.options.database, &stored.document)?;
        shared.admin_api_documents.store(Arc::new(documents));
        self.applied.store(stored.revision, Ordering::Relaxed);
        Ok(())
    }

    /// Installs `stored` and reloads.
    fn apply(&self, shared: &Shared, stored: &Stored) {
        if let Err(e) = self.install(shared, stored) {
            tracing::error!(error = %e, "Admin API: the stored state cannot be read");
            return;
        }
        if let Err(e) = crate::reload::reload(shared) {
            tracing::warn!(error = %e, revision = stored.revision, "Admin API: reload after a change failed");
        }
    }
}

/// The stored decK document as the config compiler reads it; findings name the database.
pub fn documents(location: &StoreLocation, document: &Value) -> Result<Vec<Document>, String> {
    let name = std::path::PathBuf::from(location.to_string());
    let text = serde_json::to_string(document).map_err(|e| e.to_string())?;
    let docs = meshgate_model::source::parse_str(&name, &text).map_err(|f| f.to_string())?;
    if docs.iter().any(|d| d.kind != meshgate_model::kong::KIND) {
        return Err(format!("{location}: the stored state is not a decK document"));
    }
    Ok(docs)
}

/// Polls the database's revision and applies changes made by other instances or by
/// `meshgate config import`, so they serve within a second.
pub async fn watch(shared: Arc<Shared>, admin: Arc<KongAdmin>) {
    let mut reported_error = false;
    loop {
        tokio::time::sleep(POLL_INTERVAL).await;
        let revision = match admin.store.revision().await {
            Ok(r) => r,
            Err(e) => {
                if !reported_error {
                    tracing::warn!(error = %e, "Admin API database unreachable; still serving the last state");
                    reported_error = true;
                }
                continue;
            }
        };
        reported_error = false;
        if revision == admin.applied.load(Ordering::Relaxed) {
            continue;
        }
        match admin.store.load().await {
            Ok(stored) => {
                tracing::info!(revision = stored.revision, "Admin API state changed in the database");
                admin.apply(&shared, &stored);
            }
            Err(e) => tracing::warn!(error = %e, "Admin API: cannot read the changed state"),
        }
    }
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

impl From<Reply> for Change<Reply> {
    /// A reply that changes nothing.
    fn from(answer: Reply) -> Self {
        Change { write: None, answer }
    }
}

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn no_content() -> Reply {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    resp
}

fn message(status: StatusCode, text: &str) -> Reply {
    reply(status, &json!({"message": text}))
}

fn not_found() -> Reply {
    message(StatusCode::NOT_FOUND, "Not found")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

/// One Admin API request as the routing functions see it.
struct Call<'a> {
    method: &'a Method,
    path: &'a [&'a str],
    query: &'a str,
    body: &'a Bytes,
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
    let method = req.method().clone();
    let path: Vec<String> = req
        .uri()
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let form = content_type
        .as_deref()
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"));
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(message(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large")),
    };
    // `curl -F config=@kong.yml`, as Kong's documentation loads a declarative file.
    let body = match multipart_boundary(content_type.as_deref()) {
        Some(boundary) => multipart_field(&body, &boundary, "config").unwrap_or(body),
        None => body,
    };
    // Kong's documented `curl --data a=b` style: the same entity as JSON.
    let body = if form {
        match crate::kong_form::to_json(&body) {
            Ok(map) => Bytes::from(Value::Object(map).to_string()),
            Err(e) => return Ok(schema_violation(&e)),
        }
    } else {
        body
    };
    let segments: Vec<&str> = path.iter().map(String::as_str).collect();
    let call = Call {
        method: &method,
        path: &segments,
        query: &query,
        body: &body,
    };
    if let Some(reply) = stateless(&call, &shared, &admin).await {
        return Ok(reply);
    }
    if method == Method::GET || method == Method::HEAD {
        return Ok(match admin.store.load().await {
            Ok(stored) => route(&call, stored.document, &shared, &admin).answer,
            Err(e) => database_error(&e),
        });
    }
    let result = admin
        .store
        .update(|current| route(&call, current.document, &shared, &admin))
        .await;
    Ok(match result {
        Ok((Some(stored), answer)) => {
            admin.apply(&shared, &stored);
            answer
        }
        Ok((None, answer)) => answer,
        Err(e) => database_error(&e),
    })
}

/// The boundary of a `multipart/form-data` content type.
fn multipart_boundary(content_type: Option<&str>) -> Option<String> {
    let content_type = content_type?;
    if !content_type.to_ascii_lowercase().starts_with("multipart/form-data") {
        return None;
    }
    content_type.split(';').find_map(|p| {
        let (k, v) = p.trim().split_once('=')?;
        k.eq_ignore_ascii_case("boundary")
            .then(|| v.trim_matches('"').to_string())
    })
}

/// The content of the part named `name` of a multipart body.
fn multipart_field(body: &Bytes, boundary: &str, name: &str) -> Option<Bytes> {
    let delimiter = format!("--{boundary}");
    let text = body.as_ref();
    let find = |hay: &[u8], needle: &[u8], from: usize| {
        hay.get(from..)?
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|i| i + from)
    };
    let mut at = find(text, delimiter.as_bytes(), 0)?;
    loop {
        let headers_start = at + delimiter.len();
        let headers_end = find(text, b"\r\n\r\n", headers_start)?;
        let headers = String::from_utf8_lossy(&text[headers_start..headers_end]).to_ascii_lowercase();
        let content_start = headers_end + 4;
        let next = find(text, format!("\r\n{delimiter}").as_bytes(), content_start)?;
        if headers.contains(&format!("name=\"{name}\"")) {
            return Some(body.slice(content_start..next));
        }
        at = next + 2;
    }
}

fn database_error(e: &str) -> Reply {
    tracing::error!(error = %e, "Admin API database error");
    message(StatusCode::INTERNAL_SERVER_ERROR, "An unexpected error occurred")
}

/// `%XX` escapes in a path segment (ids and names may be escaped by clients).
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = segment.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Endpoints that do not read the stored state.
async fn stateless(call: &Call<'_>, shared: &Shared, admin: &KongAdmin) -> Option<Reply> {
    Some(match (call.method, call.path) {
        (&Method::GET, []) => reply(
            StatusCode::OK,
            &json!({
                "tagline": "Welcome to meshgate",
                // The Kong version whose Admin API this one follows: clients such as decK
                // choose their behaviour by it.
                "version": KONG_API_VERSION,
                "meshgate_version": env!("CARGO_PKG_VERSION"),
                "configuration": {
                    "database": admin.options.database.kind(),
                    "admin_listen": [admin.options.addr.to_string()],
                },
                "plugins": {"available_on_server": meshgate_model::kong::schemas::available()},
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
        (&Method::GET, ["status"]) => {
            let reachable = admin.store.revision().await.is_ok();
            reply(
                StatusCode::OK,
                &json!({
                    "database": {"reachable": reachable},
                    "configuration_hash": format!("{:032x}", shared.active.load().version),
                    "server": {"connections_active": shared.stats.requests_in_flight.load(Ordering::Relaxed)},
                }),
            )
        }
        (&Method::GET, ["schemas", "plugins", name]) => match meshgate_model::kong::schemas::plugin(name) {
            Some(schema) => reply(StatusCode::OK, &schema),
            None => message(StatusCode::NOT_FOUND, &format!("No plugin named '{name}'")),
        },
        (&Method::POST, ["schemas", "plugins", "validate"]) => {
            let fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return Some(schema_violation(&e)),
            };
            // The config is checked as a global plugin over one route (plugins are compiled
            // into the routes they run on); what it is attached to is not part of the schema.
            let mut fields = fields;
            for reference in ["service", "route", "consumer"] {
                fields.remove(reference);
            }
            let candidate = json!({
                "_format_version": "3.0",
                "services": [{"name": "validate", "url": "http://127.0.0.1:9",
                              "routes": [{"name": "validate", "paths": ["/"]}]}],
                "plugins": [Value::Object(fields)],
            });
            match validate(shared, admin, &candidate) {
                Ok(()) => message(StatusCode::OK, "schema validation successful"),
                Err(e) => schema_violation(&e),
            }
        }
        _ => return None,
    })
}

fn schema_violation(text: &str) -> Reply {
    reply(
        StatusCode::BAD_REQUEST,
        &json!({"code": 2, "name": "schema violation", "message": text, "fields": {}}),
    )
}

/// Compiles `candidate` alone; a refusal names the fields (the message of Kong's schema
/// violation).
fn validate(shared: &Shared, admin: &KongAdmin, candidate: &Value) -> Result<(), String> {
    let docs = documents(&admin.options.database, candidate)?;
    let compiled = meshgate_model::compile(&docs, &shared.options.compile).map_err(|findings| {
        let errors: Vec<String> = findings
            .errors()
            .map(|f| format!("{}: {}", f.field, f.message))
            .collect();
        errors.join("; ")
    })?;
    // Certificates must load as keys the TLS listener can serve, not only look like PEM.
    for listener in &compiled.snapshot.listeners {
        if let Some(tls) = &listener.tls {
            crate::tls::server_config(tls, &listener.name).map_err(|e| format!("certificates: {e}"))?;
        }
    }
    Ok(())
}

/// Stores `candidate` if it compiles; the reply carries `answer`.
fn commit(shared: &Shared, admin: &KongAdmin, candidate: Value, status: StatusCode, answer: &Value) -> Change<Reply> {
    match validate(shared, admin, &candidate) {
        Ok(()) => Change {
            write: Some(candidate),
            answer: if status == StatusCode::NO_CONTENT {
                no_content()
            } else {
                reply(status, answer)
            },
        },
        Err(e) => schema_violation(&e).into(),
    }
}

/// Endpoints on the stored state. Reads return no write.
fn route(call: &Call<'_>, state: Value, shared: &Shared, admin: &KongAdmin) -> Change<Reply> {
    match (call.method, call.path) {
        (&Method::GET, ["config"]) => reply(StatusCode::OK, &state).into(),
        (&Method::POST, ["config"]) => {
            // The file itself, or Kong's `{"config": "<file text>"}` (also what a form's
            // `config=` field becomes).
            let wrapped = match serde_json::from_slice::<Value>(call.body) {
                Ok(Value::Object(map)) if !map.contains_key("_format_version") => {
                    map.get("config").and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            };
            let text = wrapped.unwrap_or_else(|| String::from_utf8_lossy(call.body).into_owned());
            let docs = match meshgate_model::source::parse_str(std::path::Path::new("config"), &text) {
                Ok(d) => d,
                Err(f) => return schema_violation(&f.to_string()).into(),
            };
            match docs.into_iter().next() {
                Some(doc) if doc.kind == meshgate_model::kong::KIND => {
                    let mut body = doc.body;
                    assign_ids(&mut body);
                    commit(shared, admin, body.clone(), StatusCode::CREATED, &body)
                }
                _ => schema_violation("expected a declarative configuration with _format_version").into(),
            }
        }
        (&Method::GET, ["upstreams", key, "health"]) => upstream_health(&state, key, shared).into(),
        (&Method::PUT | &Method::POST, ["upstreams", key, "targets", target, verdict @ ("healthy" | "unhealthy")]) => {
            set_target_health(&state, key, target, *verdict == "healthy", shared).into()
        }
        (_, [collection, rest @ ..]) if COLLECTIONS.iter().any(|(c, _)| c == collection) => {
            let mut state = state;
            if !state.is_object() {
                state = json!({"_format_version": "3.0"});
            }
            entity(call, collection, rest, state, shared, admin)
        }
        _ => not_found().into(),
    }
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

/// Where an entity sits in the decK document, and which parent decK nested it in.
struct Entry {
    /// JSON pointer to the entity.
    pointer: String,
    /// `("service", {"id": ..})` for a route nested in a service, and so on.
    parent: Option<(&'static str, Value)>,
}

/// A parent's reference as Kong shows it: `{"id": ..}` (or the name when it has no id).
fn reference(parent: &Value, name_field: &str) -> Value {
    match parent.get("id") {
        Some(id) => json!({"id": id}),
        None => json!({"name": parent.get(name_field).cloned().unwrap_or(Value::Null)}),
    }
}

/// Every entity of `collection`, wherever decK allows it: routes top-level or nested in a
/// service; plugins top-level or nested in a service, a route or a consumer.
fn entries(state: &Value, collection: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    let each = |pointer: &str| -> Vec<(String, Value)> {
        state
            .pointer(pointer)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{pointer}/{i}"), v.clone()))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (pointer, _) in each(&format!("/{collection}")) {
        out.push(Entry { pointer, parent: None });
    }
    match collection {
        "routes" => {
            for (service, s) in each("/services") {
                for (pointer, _) in each(&format!("{service}/routes")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("service", reference(&s, "name"))),
                    });
                }
            }
        }
        "plugins" => {
            let mut routes: Vec<(String, Value)> = each("/routes");
            for (service, s) in each("/services") {
                for (pointer, _) in each(&format!("{service}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("service", reference(&s, "name"))),
                    });
                }
                routes.extend(each(&format!("{service}/routes")));
            }
            for (route, r) in routes {
                for (pointer, _) in each(&format!("{route}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("route", reference(&r, "name"))),
                    });
                }
            }
            for (consumer, c) in each("/consumers") {
                for (pointer, _) in each(&format!("{consumer}/plugins")) {
                    out.push(Entry {
                        pointer,
                        parent: Some(("consumer", reference(&c, "username"))),
                    });
                }
            }
        }
        _ => {}
    }
    out
}

/// Kong's defaults for fields an entity leaves out, as Kong's Admin API shows them (the stored
/// decK document keeps only what was given, so an export stays as written).
fn with_kong_defaults(collection: &str, mut entity: Value) -> Value {
    let defaults = match collection {
        "services" => json!({
            "protocol": "http", "port": 80, "path": null, "retries": 5,
            "connect_timeout": 60000, "write_timeout": 60000, "read_timeout": 60000,
            "tags": null, "enabled": true, "tls_verify": null, "tls_verify_depth": null,
            "ca_certificates": null, "client_certificate": null,
        }),
        "routes" => json!({
            "protocols": ["http", "https"], "methods": null, "hosts": null, "paths": null,
            "headers": null, "snis": null, "sources": null, "destinations": null,
            "https_redirect_status_code": 426, "regex_priority": 0, "strip_path": true,
            "path_handling": "v0", "preserve_host": false, "request_buffering": true,
            "response_buffering": true, "tags": null,
        }),
        "consumers" => json!({"username": null, "custom_id": null, "tags": null}),
        "plugins" => json!({
            "enabled": true, "protocols": ["grpc", "grpcs", "http", "https"],
            "service": null, "route": null, "consumer": null, "config": {}, "tags": null,
        }),
        "upstreams" => json!({
            "algorithm": "round-robin", "hash_on": "none", "hash_fallback": "none",
            "hash_on_cookie_path": "/", "slots": 10000, "host_header": null,
            "use_srv_name": false, "tags": null,
        }),
        "targets" => json!({"weight": 100, "tags": null}),
        "certificates" => json!({"cert_alt": null, "key_alt": null, "snis": [], "tags": null}),
        _ => return entity,
    };
    if let (Some(map), Value::Object(defaults)) = (entity.as_object_mut(), defaults) {
        for (field, value) in defaults {
            map.entry(field).or_insert(value);
        }
        if let Some(created) = map.get("created_at").cloned() {
            map.entry("updated_at").or_insert(created);
        }
    }
    entity
}

/// The entity as the Admin API shows it: with its parent's reference when decK nested it,
/// and Kong's defaults.
fn view(state: &Value, entry: &Entry, collection: &str) -> Value {
    let mut entity = with_kong_defaults(
        collection,
        state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null),
    );
    if let (Some((field, parent)), Some(map)) = (&entry.parent, entity.as_object_mut()) {
        map.insert(field.to_string(), parent.clone());
    }
    // Nested credentials and targets have their own endpoints, as in Kong.
    if let Some(map) = entity.as_object_mut() {
        for (_, _, field, _) in NESTED {
            if field != "snis" {
                map.remove(field);
            }
        }
        map.remove("routes");
        map.remove("plugins");
    }
    entity
}

/// True when `entity` is the one `key` (an id or its name) names.
fn names(entity: &Value, key: &str, name_field: &str) -> bool {
    entity.get("id").and_then(Value::as_str) == Some(key) || entity.get(name_field).and_then(Value::as_str) == Some(key)
}

fn find_entry(state: &Value, collection: &str, key: &str, name_field: &str) -> Option<Entry> {
    entries(state, collection)
        .into_iter()
        .find(|e| state.pointer(&e.pointer).is_some_and(|v| names(v, key, name_field)))
}

/// True when `entity` belongs to `parent` (given as its reference field and entity).
fn belongs_to(state: &Value, entry: &Entry, field: &str, parent: &Value) -> bool {
    let entity = view(state, entry, "");
    let Some(reference) = entity.get(field).filter(|r| !r.is_null()) else {
        return false;
    };
    let key = match reference {
        Value::String(s) => Some(s.as_str()),
        Value::Object(map) => map.get("id").or_else(|| map.get("name")).and_then(Value::as_str),
        _ => None,
    };
    let name_field = if field == "consumer" { "username" } else { "name" };
    key.is_some_and(|k| names(parent, k, name_field))
}

/// `?size=N&offset=M` paging over `items`, Kong's `{"data": [...], "next": ...}` shape.
fn page(items: Vec<Value>, query: &str, path: &str) -> Reply {
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    };
    let size = match param("size").map(|s| s.parse::<usize>()) {
        None => DEFAULT_PAGE_SIZE,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => return schema_violation("size: must be between 1 and 1000"),
    };
    let offset = match param("offset").map(|s| s.parse::<usize>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return reply(
                StatusCode::BAD_REQUEST,
                &json!({"code": 7, "name": "invalid offset", "message": "'offset' is not a valid offset"}),
            );
        }
    };
    let tags: Vec<String> = param("tags")
        .map(|t| t.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let items: Vec<Value> = items
        .into_iter()
        .filter(|item| {
            tags.is_empty()
                || tags.iter().all(|t| {
                    item.get("tags")
                        .and_then(Value::as_array)
                        .is_some_and(|have| have.iter().any(|h| h.as_str() == Some(t)))
                })
        })
        .collect();
    let end = (offset + size).min(items.len());
    let data: Vec<Value> = items
        .get(offset.min(end)..end)
        .map(<[Value]>::to_vec)
        .unwrap_or_default();
    let next = (end < items.len()).then(|| format!("/{path}?offset={end}&size={size}"));
    let mut body = json!({"data": data, "next": next});
    if next.is_some() {
        body["offset"] = json!(end.to_string());
    }
    reply(StatusCode::OK, &body)
}

/// Fills what Kong fills on create: `id`, `created_at`, and per-kind defaults.
fn prepare_new(collection: &str, fields: &mut Map<String, Value>) -> Result<(), String> {
    if collection == "services" {
        expand_url(fields)?;
    }
    if collection == "certificates" {
        for required in ["cert", "key"] {
            if !fields.get(required).is_some_and(Value::is_string) {
                return Err(format!("{required}: required field missing"));
            }
        }
        // The Admin API takes `snis` as names; decK keeps `{name: ..}` objects.
        if let Some(Value::Array(snis)) = fields.get_mut("snis") {
            for sni in snis.iter_mut() {
                if let Value::String(name) = sni {
                    *sni = json!({"name": name.clone()});
                }
                if let Some(fields) = sni.as_object_mut() {
                    fields.entry("id").or_insert_with(|| Value::String(new_id()));
                }
            }
        }
    }
    fields.entry("id").or_insert_with(|| Value::String(new_id()));
    fields.entry("created_at").or_insert_with(|| json!(now_secs()));
    Ok(())
}

fn conflict(field: &str, value: &str) -> Reply {
    reply(
        StatusCode::CONFLICT,
        &json!({"code": 5, "name": "unique constraint violation",
                "message": format!("UNIQUE violation detected on '{{{field}=\"{value}\"}}'")}),
    )
}

/// True for Kong's id format (a UUID), so `PUT /services/{key}` knows whether `key` is an id
/// or a name.
fn is_uuid(key: &str) -> bool {
    key.len() == 36
        && key.char_indices().all(|(i, c)| {
            if [8, 13, 18, 23].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Creates a top-level entity of `collection`: Kong's generated fields, `409` when its id or
/// `name_field` is taken, `201` with the entity as Kong shows it.
fn create(
    collection: &str,
    name_field: &str,
    mut fields: Map<String, Value>,
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    if let Err(e) = prepare_new(collection, &mut fields) {
        return schema_violation(&e).into();
    }
    for unique in ["id", name_field] {
        if let Some(value) = fields.get(unique).and_then(Value::as_str)
            && find_entry(&state, collection, value, unique).is_some()
        {
            return conflict(unique, value).into();
        }
    }
    let created = Value::Object(fields);
    push(&mut state, &format!("/{collection}"), created.clone());
    let shown = with_kong_defaults(collection, created);
    commit(shared, admin, state, StatusCode::CREATED, &shown)
}

/// CRUD on one collection, and the nested ones Kong has.
fn entity(
    call: &Call<'_>,
    collection: &str,
    rest: &[&str],
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    if collection == "snis" {
        return snis(call, rest, state, shared, admin);
    }
    let name_field = COLLECTIONS
        .iter()
        .find(|(c, _)| *c == collection)
        .map_or("name", |(_, f)| *f);
    match (call.method, rest) {
        (&Method::GET, []) => {
            let items = entries(&state, collection)
                .iter()
                .map(|e| view(&state, e, collection))
                .collect();
            page(items, call.query, collection).into()
        }
        (&Method::POST, []) => match parse_body(call.body) {
            Ok(fields) => create(collection, name_field, fields, state, shared, admin),
            Err(e) => schema_violation(&e).into(),
        },
        (_, [key]) => {
            let found = find_entry(&state, collection, key, name_field);
            match (call.method, found) {
                (&Method::GET, Some(entry)) => reply(StatusCode::OK, &view(&state, &entry, collection)).into(),
                (&Method::DELETE, Some(entry)) => {
                    // Routes refer to their service; Kong refuses to leave them dangling.
                    if collection == "services" {
                        let service = state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null);
                        if entries(&state, "routes")
                            .iter()
                            .any(|r| belongs_to(&state, r, "service", &service))
                        {
                            return reply(
                                StatusCode::BAD_REQUEST,
                                &json!({"code": 9, "name": "foreign key violation",
                                        "message": "an existing 'routes' entity references this 'services' entity",
                                        "fields": {"@referenced_by": "routes"}}),
                            )
                            .into();
                        }
                    }
                    remove(&mut state, &entry.pointer);
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                // Kong answers 204 to deleting what does not exist.
                (&Method::DELETE, None) => no_content().into(),
                (&Method::PATCH, Some(entry)) => {
                    let mut fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    if collection == "services"
                        && let Err(e) = expand_url(&mut fields)
                    {
                        return schema_violation(&e).into();
                    }
                    let Some(target) = state.pointer_mut(&entry.pointer) else {
                        return not_found().into();
                    };
                    for (k, v) in fields {
                        if k != "id" {
                            target[k] = v;
                        }
                    }
                    target["updated_at"] = json!(now_secs());
                    let shown = view(
                        &state,
                        &Entry {
                            pointer: entry.pointer.clone(),
                            parent: entry.parent,
                        },
                        collection,
                    );
                    commit(shared, admin, state, StatusCode::OK, &shown)
                }
                // PUT replaces the entity, or creates it under that id or name.
                (&Method::PUT, found) => {
                    let mut fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    let (pointer, parent) = match found {
                        Some(entry) => {
                            let old = state.pointer(&entry.pointer).cloned().unwrap_or(Value::Null);
                            for kept in ["id", "created_at"] {
                                if let Some(v) = old.get(kept) {
                                    fields.insert(kept.to_string(), v.clone());
                                }
                            }
                            (entry.pointer, entry.parent)
                        }
                        None => {
                            let field = if is_uuid(key) { "id" } else { name_field };
                            fields.insert(field.to_string(), json!(key));
                            let list = format!("/{collection}");
                            let len = state.pointer(&list).and_then(Value::as_array).map_or(0, Vec::len);
                            push(&mut state, &list, Value::Null);
                            (format!("{list}/{len}"), None)
                        }
                    };
                    if let Err(e) = prepare_new(collection, &mut fields) {
                        return schema_violation(&e).into();
                    }
                    fields.insert("updated_at".to_string(), json!(now_secs()));
                    if let Some(target) = state.pointer_mut(&pointer) {
                        // Nested children stay with their parent.
                        let children: Vec<(String, Value)> = target
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .filter(|(k, _)| {
                                        ["routes", "plugins"].contains(&k.as_str())
                                            || NESTED.iter().any(|(_, _, f, _)| f == k)
                                    })
                                    .map(|(k, v)| (k.clone(), v.clone()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        for (k, v) in children {
                            fields.entry(k).or_insert(v);
                        }
                        *target = Value::Object(fields);
                    }
                    let shown = view(&state, &Entry { pointer, parent }, collection);
                    commit(shared, admin, state, StatusCode::OK, &shown)
                }
                (&Method::GET | &Method::PATCH, None) => not_found().into(),
                _ => message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed").into(),
            }
        }
        (_, [key, nested, item @ ..]) => {
            let Some(parent_entry) = find_entry(&state, collection, key, name_field) else {
                return not_found().into();
            };
            let parent = state.pointer(&parent_entry.pointer).cloned().unwrap_or(Value::Null);
            let reference_field = match collection {
                "services" => Some("service"),
                "routes" => Some("route"),
                "consumers" => Some("consumer"),
                _ => None,
            };
            match (*nested, reference_field) {
                // Routes and plugins of a service (plugins of a route or consumer) are
                // top-level entities referring to it, or nested in it by decK.
                ("routes", Some("service")) | ("plugins", Some(_)) => {
                    let field = reference_field.unwrap_or("service");
                    match (call.method, item) {
                        (&Method::GET, []) => {
                            let items = entries(&state, nested)
                                .iter()
                                .filter(|e| belongs_to(&state, e, field, &parent))
                                .map(|e| view(&state, e, nested))
                                .collect();
                            page(items, call.query, &format!("{collection}/{key}/{nested}")).into()
                        }
                        (&Method::POST, []) => {
                            let mut fields = match parse_body(call.body) {
                                Ok(f) => f,
                                Err(e) => return schema_violation(&e).into(),
                            };
                            fields.insert(field.to_string(), reference(&parent, name_field));
                            let nested_name = if *nested == "routes" { "name" } else { "instance_name" };
                            create(nested, nested_name, fields, state, shared, admin)
                        }
                        _ => not_found().into(),
                    }
                }
                _ => match NESTED.iter().find(|(c, n, _, _)| *c == collection && n == nested) {
                    Some(&(_, _, field, naming)) => {
                        let list = format!("{}/{field}", parent_entry.pointer);
                        nested_entity(call, item, &list, naming, state, shared, admin)
                    }
                    None => not_found().into(),
                },
            }
        }
        _ => not_found().into(),
    }
}

/// CRUD on credentials, targets and SNIs, which decK keeps in their parent's `list`.
fn nested_entity(
    call: &Call<'_>,
    item: &[&str],
    list: &str,
    naming: &str,
    mut state: Value,
    shared: &Shared,
    admin: &KongAdmin,
) -> Change<Reply> {
    let items: Vec<Value> = state
        .pointer(list)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let field = list.rsplit('/').next().unwrap_or("");
    match (call.method, item) {
        (&Method::GET, []) => page(items, call.query, list.trim_start_matches('/')).into(),
        (&Method::POST, []) => {
            let mut fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e).into(),
            };
            // Kong generates what a credential needs when it is not given.
            match field {
                "keyauth_credentials" => {
                    fields
                        .entry("key")
                        .or_insert_with(|| Value::String(new_id().replace('-', "")));
                }
                "jwt_secrets" => {
                    fields
                        .entry("key")
                        .or_insert_with(|| Value::String(new_id().replace('-', "")));
                    let algorithm = fields.get("algorithm").and_then(Value::as_str).unwrap_or("HS256");
                    if algorithm.starts_with("HS") {
                        fields
                            .entry("secret")
                            .or_insert_with(|| Value::String(new_id().replace('-', "")));
                    }
                }
                _ => {}
            }
            if let Some(value) = fields.get(naming).and_then(Value::as_str)
                && field != "targets"
                && field != "acls"
                && items
                    .iter()
                    .any(|i| i.get(naming).and_then(Value::as_str) == Some(value))
            {
                return conflict(naming, value).into();
            }
            fields.entry("id").or_insert_with(|| Value::String(new_id()));
            fields.entry("created_at").or_insert_with(|| json!(now_secs()));
            let created = Value::Object(fields);
            push(&mut state, list, created.clone());
            commit(shared, admin, state, StatusCode::CREATED, &created)
        }
        (_, [key]) => {
            let index = items.iter().position(|i| names(i, key, naming));
            match (call.method, index) {
                (&Method::GET, Some(i)) => reply(StatusCode::OK, &items[i]).into(),
                (&Method::DELETE, Some(i)) => {
                    remove(&mut state, &format!("{list}/{i}"));
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                (&Method::DELETE, None) => no_content().into(),
                (&Method::PATCH, Some(i)) => {
                    let fields = match parse_body(call.body) {
                        Ok(f) => f,
                        Err(e) => return schema_violation(&e).into(),
                    };
                    let mut updated = items[i].clone();
                    for (k, v) in fields {
                        if k != "id" {
                            updated[k] = v;
                        }
                    }
                    if let Some(target) = state.pointer_mut(&format!("{list}/{i}")) {
                        *target = updated.clone();
                    }
                    commit(shared, admin, state, StatusCode::OK, &updated)
                }
                _ => not_found().into(),
            }
        }
        _ => not_found().into(),
    }
}

/// `/snis`: Kong's SNI entities, kept by decK in their certificate's `snis`.
fn snis(call: &Call<'_>, rest: &[&str], mut state: Value, shared: &Shared, admin: &KongAdmin) -> Change<Reply> {
    let all: Vec<(String, Value)> = entries(&state, "certificates")
        .into_iter()
        .flat_map(|cert| {
            let certificate = state.pointer(&cert.pointer).cloned().unwrap_or(Value::Null);
            let list = format!("{}/snis", cert.pointer);
            state
                .pointer(&list)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(move |(i, sni)| {
                    let mut shown = sni;
                    shown["certificate"] = json!({"id": certificate.get("id")});
                    (format!("{list}/{i}"), shown)
                })
        })
        .collect();
    match (call.method, rest) {
        (&Method::GET, []) => page(all.into_iter().map(|(_, v)| v).collect(), call.query, "snis").into(),
        (&Method::POST, []) => {
            let mut fields = match parse_body(call.body) {
                Ok(f) => f,
                Err(e) => return schema_violation(&e).into(),
            };
            let Some(name) = fields.get("name").and_then(Value::as_str).map(str::to_string) else {
                return schema_violation("name: required field missing").into();
            };
            if all
                .iter()
                .any(|(_, s)| s.get("name").and_then(Value::as_str) == Some(&name))
            {
                return conflict("name", &name).into();
            }
            let certificate = fields
                .remove("certificate")
                .and_then(|c| c.get("id").and_then(Value::as_str).map(str::to_string));
            let Some(cert) = certificate.and_then(|id| find_entry(&state, "certificates", &id, "id")) else {
                return schema_violation("certificate: required field missing or not an existing certificate").into();
            };
            fields.entry("id").or_insert_with(|| Value::String(new_id()));
            fields.entry("created_at").or_insert_with(|| json!(now_secs()));
            let created = Value::Object(fields);
            push(&mut state, &format!("{}/snis", cert.pointer), created.clone());
            commit(shared, admin, state, StatusCode::CREATED, &created)
        }
        (_, [key]) => {
            let found = all.iter().find(|(_, s)| names(s, key, "name"));
            match (call.method, found) {
                (&Method::GET, Some((_, sni))) => reply(StatusCode::OK, sni).into(),
                (&Method::DELETE, Some((pointer, _))) => {
                    let pointer = pointer.clone();
                    remove(&mut state, &pointer);
                    commit(shared, admin, state, StatusCode::NO_CONTENT, &Value::Null)
                }
                (&Method::DELETE, None) => no_content().into(),
                _ => not_found().into(),
            }
        }
        _ => not_found().into(),
    }
}

/// Appends `value` to the array at `pointer`, creating the array when missing.
fn push(state: &mut Value, pointer: &str, value: Value) {
    if state.pointer(pointer).is_none_or(|v| !v.is_array()) {
        let (parent, field) = pointer.rsplit_once('/').unwrap_or(("", pointer));
        if let Some(Value::Object(map)) = state.pointer_mut(parent) {
            map.insert(field.to_string(), json!([]));
        } else if parent.is_empty()
            && let Some(map) = state.as_object_mut()
        {
            map.insert(field.to_string(), json!([]));
        }
    }
    if let Some(Value::Array(array)) = state.pointer_mut(pointer) {
        array.push(value);
    }
}

/// Removes the array element at `pointer`.
fn remove(state: &mut Value, pointer: &str) {
    let Some((list, index)) = pointer.rsplit_once('/') else {
        return;
    };
    let Ok(index) = index.parse::<usize>() else { return };
    if let Some(Value::Array(array)) = state.pointer_mut(list)
        && index < array.len()
    {
        array.remove(index);
    }
}

/// The running cluster of upstream `key` (id or name) and the upstream as stored.
fn upstream_runtime(
    state: &Value,
    key: &str,
    shared: &Shared,
) -> Option<(Value, Option<Arc<crate::upstream::cluster::ClusterRuntime>>)> {
    let entry = find_entry(state, "upstreams", key, "name")?;
    let upstream = state.pointer(&entry.pointer).cloned()?;
    let cluster_name = format!(
        "kong|{}",
        upstream.get("name").and_then(Value::as_str).unwrap_or_default()
    );
    let cluster = shared
        .active
        .load()
        .clusters
        .iter()
        .find(|c| c.config.name == cluster_name)
        .cloned();
    Some((upstream, cluster))
}

/// The endpoint index of `target` (`host[:port]`, Kong's default port 8000) in `cluster`.
fn target_endpoint(cluster: &crate::upstream::cluster::ClusterRuntime, target: &str) -> Option<usize> {
    let authority = if target.starts_with('[') {
        if target.contains("]:") {
            target.to_string()
        } else {
            format!("{target}:8000")
        }
    } else {
        match target.matches(':').count() {
            0 => format!("{target}:8000"),
            1 => target.to_string(),
            _ => format!("[{target}]:8000"),
        }
    };
    cluster
        .endpoints
        .iter()
        .position(|e| e.authority.as_str().eq_ignore_ascii_case(&authority))
}

/// `GET /upstreams/{u}/health`: each target's health as the balancer sees it now.
fn upstream_health(state: &Value, key: &str, shared: &Shared) -> Reply {
    let Some((upstream, cluster)) = upstream_runtime(state, key, shared) else {
        return not_found();
    };
    let targets = upstream
        .get("targets")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let data: Vec<Value> = targets
        .into_iter()
        .map(|target| {
            let address = target.get("target").and_then(Value::as_str).unwrap_or_default();
            let health = match (&cluster, cluster.as_ref().and_then(|c| target_endpoint(c, address))) {
                (Some(c), Some(i)) if c.health.is_some() || c.outlier.is_some() => {
                    let healthy = c.health.as_ref().is_none_or(|h| h.is_healthy(i))
                        && c.outlier.as_ref().is_none_or(|o| !o.is_ejected(i));
                    if healthy { "HEALTHY" } else { "UNHEALTHY" }
                }
                _ => "HEALTHCHECKS_OFF",
            };
            let mut shown = with_kong_defaults("targets", target);
            shown["upstream"] = json!({"id": upstream.get("id")});
            shown["health"] = json!(health);
            shown
        })
        .collect();
    reply(StatusCode::OK, &json!({"data": data, "next": null}))
}

/// `PUT /upstreams/{u}/targets/{t}/healthy|unhealthy`: sets a target's state by hand until
/// the health checks change it again, as Kong does.
fn set_target_health(state: &Value, key: &str, target: &str, healthy: bool, shared: &Shared) -> Reply {
    let Some((upstream, cluster)) = upstream_runtime(state, key, shared) else {
        return not_found();
    };
    let address = upstream
        .get("targets")
        .and_then(Value::as_array)
        .and_then(|targets| targets.iter().find(|t| names(t, target, "target")))
        .and_then(|t| t.get("target").and_then(Value::as_str))
        .map(str::to_string);
    let (Some(cluster), Some(address)) = (cluster, address) else {
        return not_found();
    };
    let Some(index) = target_endpoint(&cluster, &address) else {
        return not_found();
    };
    if cluster.health.is_none() && cluster.outlier.is_none() {
        return message(
            StatusCode::BAD_REQUEST,
            &format!("health checks are not enabled for upstream {key:?}"),
        );
    }
    if let Some(health) = &cluster.health {
        health.set_healthy(index, healthy);
    }
    if let Some(outlier) = &cluster.outlier {
        if healthy {
            outlier.reinstate(index);
        } else if cluster.health.is_none() {
            outlier.eject_until_reinstated(index);
        }
    }
    no_content()
}

/// decK fields holding arrays of entities, at any depth.
const ENTITY_ARRAYS: [&str; 12] = [
    "services",
    "routes",
    "plugins",
    "consumers",
    "upstreams",
    "targets",
    "certificates",
    "snis",
    "keyauth_credentials",
    "basicauth_credentials",
    "jwt_secrets",
    "acls",
];

/// Calls `visit` on every entity of a decK document, at any depth (services, their routes,
/// the routes' plugins, consumers' credentials, ...).
fn for_each_entity(value: &mut Value, visit: &mut impl FnMut(&mut Map<String, Value>)) {
    let Some(map) = value.as_object_mut() else { return };
    for (key, child) in map.iter_mut() {
        if !ENTITY_ARRAYS.contains(&key.as_str()) {
            continue;
        }
        for entity in child.as_array_mut().into_iter().flatten() {
            if let Some(fields) = entity.as_object_mut() {
                visit(fields);
            }
            for_each_entity(entity, visit);
        }
    }
}

/// Gives every entity without an `id` a new one, as Kong does when it loads a declarative
/// file, so the Admin API can address each of them.
fn assign_ids(value: &mut Value) {
    for_each_entity(value, &mut |fields| {
        fields.entry("id").or_insert_with(|| Value::String(new_id()));
    });
}

/// Ids other entities refer to (`service: {id: ..}`, `route: <id>`, ...).
fn referenced_ids(value: &Value, out: &mut std::collections::HashSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                if ["service", "route", "consumer", "upstream", "certificate"].contains(&key.as_str()) {
                    match child {
                        Value::String(s) => {
                            out.insert(s.clone());
                        }
                        Value::Object(r) => {
                            if let Some(id) = r.get("id").and_then(Value::as_str) {
                                out.insert(id.to_string());
                            }
                        }
                        _ => {}
                    }
                }
                referenced_ids(child, out);
            }
        }
        Value::Array(items) => items.iter().for_each(|i| referenced_ids(i, out)),
        _ => {}
    }
}

/// The state as `deck gateway dump` writes it: timestamps dropped, and ids dropped unless
/// another entity refers to them (or `with_ids`).
fn strip_generated(value: &mut Value, referenced: &std::collections::HashSet<String>, with_ids: bool) {
    for_each_entity(value, &mut |fields| {
        fields.remove("created_at");
        fields.remove("updated_at");
        let keep = with_ids
            || fields
                .get("id")
                .and_then(Value::as_str)
                .is_some_and(|id| referenced.contains(id));
        if !keep {
            fields.remove("id");
        }
    });
}

/// `meshgate config import`: validates a decK document and makes it the stored state (a
/// running proxy on the same database applies it within a second). Returns the new revision.
pub async fn import(
    location: &StoreLocation,
    deck: Value,
    options: &meshgate_model::CompileOptions,
) -> Result<i64, String> {
    let mut deck = deck;
    assign_ids(&mut deck);
    let docs = documents(location, &deck)?;
    if let Err(findings) = meshgate_model::compile(&docs, options) {
        let errors: Vec<String> = findings.errors().map(ToString::to_string).collect();
        return Err(errors.join("\n"));
    }
    let store = Store::open(location.clone()).await?;
    let (stored, ()) = store
        .update(|_| Change {
            write: Some(deck),
            answer: (),
        })
        .await?;
    Ok(stored.map_or(0, |s| s.revision))
}

/// `meshgate config export`: the stored state as a decK document.
pub async fn export(location: &StoreLocation, with_ids: bool) -> Result<Value, String> {
    let store = Store::open(location.clone()).await?;
    let mut document = store.load().await?.document;
    let mut referenced = std::collections::HashSet::new();
    referenced_ids(&document, &mut referenced);
    strip_generated(&mut document, &referenced, with_ids);
    Ok(document)
}
