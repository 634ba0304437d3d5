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
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::Shared;
use crate::kong_store::{Change, Store, StoreLocation, Stored};

mod deck;
mod entities;
mod form;
mod health;

use deck::assign_ids;
pub use deck::{export, import};
use entities::{entity, parse_body};
use health::{set_target_health, upstream_health};

/// The API's OpenAPI document, checked in as `docs/admin-api.openapi.json` and served at
/// `/openapi.json`.
const OPENAPI: &str = include_str!("../../../../docs/admin-api.openapi.json");

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
const COLLECTIONS: [(&str, &str); 8] = [
    ("services", "name"),
    ("routes", "name"),
    ("consumers", "username"),
    ("plugins", "instance_name"),
    ("upstreams", "name"),
    ("certificates", "id"),
    ("snis", "name"),
    ("ca_certificates", "id"),
];

/// Kong's top-level credential endpoints (`/key-auths`, ...): every consumer's credentials of
/// one kind. (endpoint, the consumer's nested path segment.)
const CREDENTIAL_LISTS: [(&str, &str); 4] = [
    ("key-auths", "key-auth"),
    ("basic-auths", "basic-auth"),
    ("jwts", "jwt"),
    ("acls", "acls"),
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
        // Ids and names may be escaped by clients.
        .map(crate::uri_decoding::decode_path_segment)
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
        match form::to_json(&body) {
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
        (_, [list, rest @ ..]) if let Some(&(_, nested)) = CREDENTIAL_LISTS.iter().find(|(l, _)| l == list) => {
            entities::credential_list(call, list, nested, rest, state, shared, admin)
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
