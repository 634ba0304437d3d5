//! Kong plugins on the request path: the access phase runs a route's chain in priority order
//! (any plugin may answer the request itself), and response headers the plugins ask for are
//! added on the way back. Statuses, messages and header names are Kong's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use meshgate_model::kong::plugins::{
    Acl, BasicAuth, Consumers, CorrelationId, IpRestriction, Jwt, KeyAuth, LimitBy, Plugin, PluginChain, ProxyCache,
    RateLimiting, RequestSizeLimiting, RequestTermination, TransformOps, Transformer, Window,
};

use crate::body::{self, ResponseBody};
use crate::response_flags::ResponseFlags;

const CONSUMER_ID: &str = "x-consumer-id";
const CONSUMER_CUSTOM_ID: &str = "x-consumer-custom-id";
const CONSUMER_USERNAME: &str = "x-consumer-username";
const CREDENTIAL_IDENTIFIER: &str = "x-credential-identifier";
const ANONYMOUS: &str = "x-anonymous-consumer";
const CONSUMER_GROUPS: &str = "x-consumer-groups";

/// Counters that outlive a request and a reload: rate-limit windows, shared by all workers.
#[derive(Default)]
pub struct PluginState {
    /// Local rate-limit counters: (window start, count) by a keyed 64-bit hash of instance,
    /// route, window and identifier (the process's random SipHash key, so clients cannot
    /// aim at collisions), sharded to keep lock contention between workers low.
    shards: [Mutex<HashMap<u64, (u64, u64)>>; 16],
    counter_keys: std::collections::hash_map::RandomState,
    correlation_counter: AtomicU64,
    redis: crate::redis::RedisPool,
    /// proxy-cache entries by key (shared with the bodies that fill it).
    cache: Arc<Mutex<HashMap<u64, Arc<CachedResponse>>>>,
    /// file-log writers by path, opened on first use and kept across reloads.
    file_logs: Mutex<HashMap<std::path::PathBuf, std::sync::Arc<crate::access_log::AccessLog>>>,
}

/// What the log plugins (file-log, http-log) report about a request, taken in the access
/// phase; credentials are masked.
struct LogContext {
    started: std::time::Instant,
    started_at_ms: u64,
    request: serde_json::Value,
    client_ip: String,
    route: String,
    consumer: Option<serde_json::Value>,
}

/// Who the request runs as after authentication.
struct Authenticated<'a> {
    consumers: &'a Arc<Consumers>,
    consumer: usize,
    credential: Option<&'a str>,
}

/// What the plugins change: request headers (and URI) for the upstream, applied when the
/// request is forwarded, and headers added to the response on its way back.
#[derive(Default)]
pub struct PluginEffects {
    /// A full replacement of the request headers (request-transformer), applied first.
    request_header_map: Option<HeaderMap>,
    /// Then these: `None` removes the header.
    request_headers: Vec<(HeaderName, Option<HeaderValue>)>,
    request_uri: Option<http::Uri>,
    /// request-transformer's `replace.uri`: the path goes upstream as it is (Kong's
    /// `kong.service.request.set_path`), not through `strip_path` and the service's path.
    upstream_path_fixed: bool,
    request_method: Option<Method>,
    response_headers: Vec<(HeaderName, HeaderValue)>,
    log: Option<LogContext>,
    /// proxy-cache: the key to store a cacheable response under, and when it was asked.
    cache_store: Option<(u64, std::time::Instant)>,
    /// The consumer the auth plugins identified (index in the chain's consumers), so the
    /// response phase runs the plugins scoped to them.
    consumer: Option<usize>,
    /// The consumers `consumer` indexes, for upstreams that hash on the consumer.
    consumers: Option<Arc<Consumers>>,
}

/// A response kept by proxy-cache.
struct CachedResponse {
    status: StatusCode,
    headers: HeaderMap,
    body: bytes::Bytes,
    stored: std::time::Instant,
    expires: std::time::Instant,
}

/// Entries kept at most, and the largest body stored.
const CACHE_ENTRIES: usize = 10_000;
const CACHE_BODY_LIMIT: usize = 1 << 20;

/// Marks a request whose path a plugin set for the upstream as it is.
#[derive(Clone, Copy)]
pub struct FixedUpstreamPath;

/// The consumer the auth plugins identified, for Kong `hash_on: consumer`.
#[derive(Clone)]
pub struct AuthenticatedConsumer {
    consumers: Arc<Consumers>,
    index: usize,
}

impl AuthenticatedConsumer {
    pub fn id(&self) -> Option<&str> {
        self.consumers.list.get(self.index).map(|c| c.id.as_str())
    }
}

/// The path the client sent, kept when a plugin replaced the URI (Kong `hash_on: path` and
/// `uri_capture` read the client's path, nginx's `$uri`).
#[derive(Clone)]
pub struct ClientPath(pub String);

impl PluginEffects {
    fn set(&mut self, name: HeaderName, value: Option<HeaderValue>) {
        self.request_headers.retain(|(n, _)| *n != name);
        self.request_headers.push((name, value));
    }

    /// The request headers as the plugins so far have left them.
    fn current_headers<B>(&self, req: &Request<B>) -> HeaderMap {
        let mut map = self.request_header_map.clone().unwrap_or_else(|| req.headers().clone());
        apply_header_edits(&mut map, &self.request_headers);
        map
    }

    /// Applies the request edits to the request about to be forwarded.
    pub fn apply_to_request<B>(&self, req: &mut Request<B>) {
        if let Some(map) = &self.request_header_map {
            *req.headers_mut() = map.clone();
        }
        apply_header_edits(req.headers_mut(), &self.request_headers);
        if let Some(method) = &self.request_method {
            *req.method_mut() = method.clone();
        }
        if let Some(uri) = &self.request_uri {
            let client_path = ClientPath(req.uri().path().to_string());
            req.extensions_mut().insert(client_path);
            *req.uri_mut() = uri.clone();
        }
        if self.upstream_path_fixed {
            req.extensions_mut().insert(FixedUpstreamPath);
        }
    }

    /// The consumer the auth plugins identified, if any.
    pub fn authenticated_consumer(&self) -> Option<AuthenticatedConsumer> {
        Some(AuthenticatedConsumer {
            consumers: Arc::clone(self.consumers.as_ref()?),
            index: self.consumer?,
        })
    }

    /// Adds the headers plugins asked for, runs response-transformer, and hands the request's
    /// log entry to the log plugins.
    pub fn apply_to_response(self, chain: &PluginChain, response: &mut Response<ResponseBody>, state: &PluginState) {
        let chain = chain.for_consumer(self.consumer);
        let headers = response.headers_mut();
        for (name, value) in self.response_headers {
            headers.insert(name, value);
        }
        for plugin in &chain.plugins {
            if let Plugin::ResponseTransformer(t) = plugin {
                transform_headers(&t.headers, headers);
            }
        }
        if let Some((key, _)) = self.cache_store
            && let Some(Plugin::ProxyCache(c)) = chain.plugins.iter().find(|p| matches!(p, Plugin::ProxyCache(_)))
        {
            cache_store(c, key, response, state);
        }
        if let Some(log) = self.log {
            emit_logs(chain, log, response, state);
        }
    }
}

fn apply_header_edits(headers: &mut HeaderMap, edits: &[(HeaderName, Option<HeaderValue>)]) {
    for (name, value) in edits {
        match value {
            Some(v) => {
                headers.insert(name.clone(), v.clone());
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

/// Kong's transformer order on headers: remove, rename, replace (if present), add (if
/// absent), append.
fn transform_headers(ops: &TransformOps, headers: &mut HeaderMap) {
    let name_of = |n: &str| HeaderName::from_bytes(n.as_bytes()).ok();
    let value_of = |v: &str| HeaderValue::from_str(v).ok();
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (from, to) in &ops.rename {
        if let (Some(values), Some(to)) = (
            headers
                .contains_key(from.as_str())
                .then(|| headers.get_all(from.as_str()).iter().cloned().collect::<Vec<_>>()),
            name_of(to),
        ) {
            headers.remove(from.as_str());
            for v in values {
                headers.append(to.clone(), v);
            }
        }
    }
    for (name, value) in &ops.replace {
        if headers.contains_key(name.as_str())
            && let (Some(n), Some(v)) = (name_of(name), value_of(value))
        {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if !headers.contains_key(name.as_str())
            && let (Some(n), Some(v)) = (name_of(name), value_of(value))
        {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.append {
        if let (Some(n), Some(v)) = (name_of(name), value_of(value)) {
            headers.append(n, v);
        }
    }
}

/// Runs the access phase of `chain`; `Err` is the response that ends the request there.
pub async fn access<B>(
    chain: &PluginChain,
    req: &Request<B>,
    client: IpAddr,
    route: &str,
    state: &PluginState,
) -> Result<PluginEffects, Rejection> {
    let mut effects = PluginEffects::default();
    let mut authenticated: Option<Authenticated<'_>> = None;
    let logging = chain
        .plugins
        .iter()
        .any(|p| matches!(p, Plugin::FileLog(_) | Plugin::HttpLog(_)));
    let result = run_access(chain, req, client, route, state, &mut effects, &mut authenticated).await;
    effects.consumer = authenticated.as_ref().map(|a| a.consumer);
    effects.consumers = authenticated.as_ref().map(|a| Arc::clone(a.consumers));
    // A consumer's own chain may add a log plugin.
    let logging = logging
        || !chain.by_consumer.is_empty()
            && chain
                .for_consumer(effects.consumer)
                .plugins
                .iter()
                .any(|p| matches!(p, Plugin::FileLog(_) | Plugin::HttpLog(_)));
    let log = logging.then(|| log_context(req, client, route, authenticated.as_ref()));
    match result {
        Ok(()) => {
            effects.log = log;
            Ok(effects)
        }
        Err(mut rejection) => {
            // Kong logs requests its plugins answered, too.
            if let Some(log) = log {
                emit_logs(chain.for_consumer(effects.consumer), log, &mut rejection, state);
            }
            Err(rejection)
        }
    }
}

/// Headers whose values are credentials: masked in log entries.
const SECRET_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie", "apikey", "x-api-key"];

fn log_context<B>(req: &Request<B>, client: IpAddr, route: &str, who: Option<&Authenticated<'_>>) -> LogContext {
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let shown = if SECRET_HEADERS.contains(&name.as_str()) {
            "REDACTED".to_string()
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        headers.insert(name.as_str().to_string(), shown.into());
    }
    let mut querystring = serde_json::Map::new();
    for pair in req.uri().query().unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let lower = k.to_ascii_lowercase();
        let shown = if lower.contains("key") || lower == "jwt" || lower.contains("token") {
            "REDACTED"
        } else {
            v
        };
        querystring.insert(k.to_string(), shown.into());
    }
    let uri = req.uri().path().to_string();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let consumer = who
        .and_then(|w| w.consumers.list.get(w.consumer))
        .map(|c| serde_json::json!({"id": c.id, "username": c.username, "custom_id": c.custom_id}));
    LogContext {
        started: std::time::Instant::now(),
        started_at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        request: serde_json::json!({
            "method": req.method().as_str(),
            "uri": uri,
            "url": format!("http://{host}{uri}"),
            "querystring": querystring,
            "headers": headers,
            "size": req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
        }),
        client_ip: client.to_string(),
        route: route.to_string(),
        consumer,
    }
}

/// Kong's basic log serializer, written by file-log and sent by http-log.
fn emit_logs(chain: &PluginChain, log: LogContext, response: &mut Response<ResponseBody>, state: &PluginState) {
    let mut response_headers = serde_json::Map::new();
    for (name, value) in response.headers() {
        response_headers.insert(
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes()).into_owned().into(),
        );
    }
    let elapsed = log.started.elapsed().as_millis() as u64;
    let mut entry = serde_json::json!({
        "request": log.request,
        "response": {
            "status": response.status().as_u16(),
            "headers": response_headers,
            "size": response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok()),
        },
        "route": {"name": log.route},
        "latencies": {"request": elapsed, "kong": elapsed, "proxy": -1},
        "client_ip": log.client_ip,
        "started_at": log.started_at_ms,
    });
    if let Some(consumer) = log.consumer {
        entry["consumer"] = consumer;
    }
    let line = entry.to_string();
    for plugin in &chain.plugins {
        match plugin {
            Plugin::FileLog(f) => {
                let writer = {
                    let mut logs = state.file_logs.lock().unwrap_or_else(|p| p.into_inner());
                    match logs.get(&f.path) {
                        Some(w) => Some(w.clone()),
                        None => match crate::access_log::AccessLog::open(&crate::access_log::AccessLogOptions {
                            path: f.path.clone(),
                            format: crate::access_log::AccessLogFormat::Json,
                        }) {
                            Ok(w) => {
                                let w = std::sync::Arc::new(w);
                                logs.insert(f.path.clone(), w.clone());
                                Some(w)
                            }
                            Err(e) => {
                                tracing::warn!(path = %f.path.display(), error = %e, "file-log: cannot open the log file");
                                None
                            }
                        },
                    }
                };
                if let Some(w) = writer {
                    w.record_line(format!("{line}\n"));
                }
            }
            Plugin::HttpLog(h) => send_http_log(h, line.clone()),
            _ => {}
        }
    }
}

/// http-log: posts the entry to the log server without delaying the response; failures are
/// logged, never retried.
fn send_http_log(h: &meshgate_model::kong::plugins::HttpLog, body: String) {
    let Some((authority, path)) = h
        .endpoint
        .strip_prefix("http://")
        .map(|rest| rest.split_at(rest.find('/').unwrap_or(rest.len())))
    else {
        return;
    };
    let authority = authority.to_string();
    let path = if path.is_empty() {
        "/".to_string()
    } else {
        path.to_string()
    };
    let method = h.method.clone();
    let content_type = h.content_type.clone();
    let extra = h.headers.clone();
    let timeout = std::time::Duration::from_millis(h.timeout_ms);
    tokio::spawn(async move {
        let sent = async {
            let stream = tokio::net::TcpStream::connect(&authority)
                .await
                .map_err(|e| e.to_string())?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            let mut builder = Request::builder()
                .method(method.as_str())
                .uri(path.as_str())
                .header(header::HOST, authority.as_str())
                .header(header::CONTENT_TYPE, content_type.as_str());
            for (name, value) in &extra {
                builder = builder.header(name.as_str(), value.as_str());
            }
            let request = builder
                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .map_err(|e| e.to_string())?;
            sender
                .send_request(request)
                .await
                .map_err(|e| e.to_string())
                .map(|_| ())
        };
        match tokio::time::timeout(timeout, sent).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(endpoint = %authority, error = %e, "http-log: sending the log entry failed"),
            Err(_) => tracing::warn!(endpoint = %authority, "http-log: log server did not answer in time"),
        }
    });
}

async fn run_access<'c, B>(
    chain: &'c PluginChain,
    req: &Request<B>,
    client: IpAddr,
    route: &str,
    state: &PluginState,
    effects: &mut PluginEffects,
    authenticated: &mut Option<Authenticated<'c>>,
) -> Result<(), Rejection> {
    // Once an auth plugin has identified a consumer with plugins scoped to them, the rest of
    // the request runs their chain, from the next lower priority on.
    // (Consumer chains have no `by_consumer` of their own, so the switch happens once.)
    let mut active = chain;
    let mut index = 0;
    let mut last_priority = i32::MAX;
    loop {
        if !active.by_consumer.is_empty()
            && let Some(who) = authenticated.as_ref()
            && let Some(scoped) = active.by_consumer.get(&who.consumer)
        {
            active = scoped;
            index = active
                .plugins
                .iter()
                .position(|p| p.priority() < last_priority)
                .unwrap_or(active.plugins.len());
        }
        let Some(plugin) = active.plugins.get(index) else { break };
        index += 1;
        last_priority = plugin.priority();
        match plugin {
            Plugin::CorrelationId(c) => correlation_id(c, req, state, effects),
            Plugin::KeyAuth(k) => key_auth(k, req, authenticated, effects)?,
            Plugin::IpRestriction(r) => ip_restriction(r, client)?,
            Plugin::Acl(a) => acl(a, authenticated.as_ref(), effects)?,
            Plugin::RateLimiting(r) => {
                rate_limit(r, req, client, route, authenticated.as_ref(), state, effects).await?
            }
            Plugin::RequestTermination(t) => return Err(terminate(t)),
            Plugin::BasicAuth(b) => basic_auth(b, req, authenticated, effects)?,
            Plugin::Jwt(j) => jwt(j, req, authenticated, effects)?,
            Plugin::RequestSizeLimiting(l) => request_size(l, req)?,
            Plugin::RequestTransformer(t) => transform_request(t, req, effects),
            // Applied to the response (`apply_to_response`) and by the route's CORS handling.
            Plugin::ProxyCache(c) => cache_lookup(c, req, route, state, effects)?,
            Plugin::ResponseTransformer(_) | Plugin::Cors(_) | Plugin::FileLog(_) | Plugin::HttpLog(_) => {}
        }
    }
    Ok(())
}

fn basic_auth<'c, B>(
    b: &'c BasicAuth,
    req: &Request<B>,
    authenticated: &mut Option<Authenticated<'c>>,
    effects: &mut PluginEffects,
) -> Result<(), Rejection> {
    if b.anonymous.is_some() && authenticated.as_ref().is_some_and(|a| a.credential.is_some()) {
        return Ok(());
    }
    let fail = |anonymous: Option<usize>,
                authenticated: &mut Option<Authenticated<'c>>,
                effects: &mut PluginEffects,
                resp: Rejection| {
        let Some(anonymous) = anonymous else {
            return Err(resp);
        };
        let who = Authenticated {
            consumers: &b.consumers,
            consumer: anonymous,
            credential: None,
        };
        set_consumer_headers(effects, &who);
        *authenticated = Some(who);
        Ok(())
    };
    let presented = [header::AUTHORIZATION, header::PROXY_AUTHORIZATION]
        .iter()
        .find_map(|name| req.headers().get(name).and_then(|v| v.to_str().ok()).map(|v| (name, v)));
    let Some((header_name, value)) = presented else {
        let mut resp = kong_error(401, "Unauthorized", ResponseFlags::UNAUTHORIZED);
        if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", b.realm)) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return fail(b.anonymous, authenticated, effects, resp);
    };
    let invalid = || kong_error(401, "Invalid authentication credentials", ResponseFlags::UNAUTHORIZED);
    let decoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok());
    let Some((username, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) else {
        return fail(b.anonymous, authenticated, effects, invalid());
    };
    match b.consumers.basic.get(username) {
        Some((consumer, credential, stored)) if constant_time_eq(stored.as_bytes(), password.as_bytes()) => {
            if b.hide_credentials {
                effects.set(header_name.clone(), None);
            }
            let who = Authenticated {
                consumers: &b.consumers,
                consumer: *consumer,
                credential: Some(credential.as_str()),
            };
            set_consumer_headers(effects, &who);
            *authenticated = Some(who);
            Ok(())
        }
        _ => fail(b.anonymous, authenticated, effects, invalid()),
    }
}

/// The tokens a request presents: query parameters, cookies, and `Bearer` tokens in headers.
fn jwt_tokens<B>(j: &Jwt, req: &Request<B>) -> Vec<String> {
    let mut tokens: Vec<String> = Vec::new();
    let mut push = |t: String| {
        if !t.is_empty() && !tokens.contains(&t) {
            tokens.push(t);
        }
    };
    if let Some(query) = req.uri().query() {
        for name in &j.uri_param_names {
            for v in query_values(query, name) {
                push(crate::uri_decoding::decode_query_value(v));
            }
        }
    }
    for cookie in req.headers().get_all(header::COOKIE) {
        for pair in cookie.to_str().unwrap_or("").split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && j.cookie_names.iter().any(|n| n == k)
            {
                push(v.to_string());
            }
        }
    }
    for name in &j.header_names {
        if let Some(v) = req.headers().get(name.as_str()).and_then(|v| v.to_str().ok()) {
            let v = v.trim_start();
            if let Some(token) = v.strip_prefix("Bearer").or_else(|| v.strip_prefix("bearer"))
                && token.starts_with(char::is_whitespace)
            {
                push(token.trim().to_string());
            }
        }
    }
    tokens
}

fn jwt<'c, B>(
    j: &'c Jwt,
    req: &Request<B>,
    authenticated: &mut Option<Authenticated<'c>>,
    effects: &mut PluginEffects,
) -> Result<(), Rejection> {
    if !j.run_on_preflight && req.method() == Method::OPTIONS {
        return Ok(());
    }
    if j.anonymous.is_some() && authenticated.as_ref().is_some_and(|a| a.credential.is_some()) {
        return Ok(());
    }
    match verify_jwt(j, req) {
        Ok(secret) => {
            let who = Authenticated {
                consumers: &j.consumers,
                consumer: secret.consumer,
                credential: Some(secret.id.as_str()),
            };
            set_consumer_headers(effects, &who);
            *authenticated = Some(who);
            Ok(())
        }
        Err(resp) => match j.anonymous {
            Some(anonymous) => {
                let who = Authenticated {
                    consumers: &j.consumers,
                    consumer: anonymous,
                    credential: None,
                };
                set_consumer_headers(effects, &who);
                *authenticated = Some(who);
                Ok(())
            }
            None => Err(resp),
        },
    }
}

/// Kong's jwt checks, in its order, with its messages.
fn verify_jwt<'c, B>(j: &'c Jwt, req: &Request<B>) -> Result<&'c meshgate_model::kong::plugins::JwtSecret, Rejection> {
    let unauthorized = |message: &str| kong_error(401, message, ResponseFlags::UNAUTHORIZED);
    let tokens = jwt_tokens(j, req);
    let token = match tokens.as_slice() {
        [] => return Err(unauthorized("Unauthorized")),
        [one] => one,
        _ => return Err(unauthorized("Multiple tokens provided")),
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let [header_b64, claims_b64, signature_b64] = parts.as_slice() else {
        return Err(unauthorized("Bad token; invalid JWT"));
    };
    let decode_json = |part: &str| -> Option<serde_json::Value> {
        let bytes = b64.decode(part.trim_end_matches('=')).ok()?;
        serde_json::from_slice(&bytes).ok().filter(serde_json::Value::is_object)
    };
    let (Some(jwt_header), Some(claims)) = (decode_json(header_b64), decode_json(claims_b64)) else {
        return Err(unauthorized("Bad token; invalid JSON"));
    };
    let Ok(signature) = b64.decode(signature_b64.trim_end_matches('=')) else {
        return Err(unauthorized("Bad token; invalid signature encoding"));
    };
    let key_claim = &j.key_claim_name;
    let Some(key) = claims.get(key_claim).or_else(|| jwt_header.get(key_claim)) else {
        return Err(unauthorized(&format!("No mandatory '{key_claim}' in claims")));
    };
    let Some(key) = key.as_str().filter(|k| !k.is_empty()) else {
        return Err(unauthorized(&format!("Invalid '{key_claim}' in claims")));
    };
    let Some(secret) = j.consumers.jwt.get(key) else {
        return Err(unauthorized(&format!("No credentials found for given '{key_claim}'")));
    };
    // `alg: none` or any other algorithm than the credential's is refused here.
    if jwt_header.get("alg").and_then(|a| a.as_str()) != Some(secret.algorithm.as_str()) {
        return Err(unauthorized("Invalid algorithm"));
    }
    let signing_input = format!("{header_b64}.{claims_b64}");
    if !signature_valid(j, secret, signing_input.as_bytes(), &signature) {
        return Err(unauthorized("Invalid signature"));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut errors = serde_json::Map::new();
    for claim in &j.claims_to_verify {
        match (claim.as_str(), claims.get(claim)) {
            (_, None) => {}
            (name, Some(v)) if !v.is_number() => {
                errors.insert(name.to_string(), "must be a number".into());
            }
            ("exp", Some(v)) if v.as_f64().is_some_and(|exp| exp <= now) => {
                errors.insert("exp".to_string(), "token expired".into());
            }
            ("nbf", Some(v)) if v.as_f64().is_some_and(|nbf| nbf > now) => {
                errors.insert("nbf".to_string(), "token not valid yet".into());
            }
            _ => {}
        }
    }
    if j.maximum_expiration > 0 {
        match claims.get("exp").and_then(|e| e.as_f64()) {
            None => {
                errors.insert("exp".to_string(), "exp is required".into());
            }
            Some(exp) if exp - now > j.maximum_expiration as f64 => {
                errors.insert("exp".to_string(), "exceeds maximum allowed expiration".into());
            }
            Some(_) => {}
        }
    }
    if !errors.is_empty() {
        let mut resp = Response::new(body::full(serde_json::Value::Object(errors).to_string()));
        *resp.status_mut() = StatusCode::UNAUTHORIZED;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        ResponseFlags::mark(&mut resp, ResponseFlags::UNAUTHORIZED);
        return Err(Box::new(resp));
    }
    Ok(secret)
}

fn signature_valid(j: &Jwt, secret: &meshgate_model::kong::plugins::JwtSecret, input: &[u8], signature: &[u8]) -> bool {
    use ring::{hmac, signature as sig};
    let hmac_with = |algorithm: hmac::Algorithm| {
        let key_bytes = if j.secret_is_base64 {
            match base64::engine::general_purpose::STANDARD.decode(&secret.secret) {
                Ok(k) => k,
                Err(_) => return false,
            }
        } else {
            secret.secret.clone()
        };
        hmac::verify(&hmac::Key::new(algorithm, &key_bytes), input, signature).is_ok()
    };
    let public = |algorithm: &'static dyn sig::VerificationAlgorithm| {
        sig::UnparsedPublicKey::new(algorithm, &secret.public_key)
            .verify(input, signature)
            .is_ok()
    };
    match secret.algorithm.as_str() {
        "HS256" => hmac_with(hmac::HMAC_SHA256),
        "HS384" => hmac_with(hmac::HMAC_SHA384),
        "HS512" => hmac_with(hmac::HMAC_SHA512),
        "RS256" => public(&sig::RSA_PKCS1_2048_8192_SHA256),
        "RS384" => public(&sig::RSA_PKCS1_2048_8192_SHA384),
        "RS512" => public(&sig::RSA_PKCS1_2048_8192_SHA512),
        "ES256" => public(&sig::ECDSA_P256_SHA256_FIXED),
        "ES384" => public(&sig::ECDSA_P384_SHA384_FIXED),
        _ => false,
    }
}

/// The cache key of a request: method, host, path, query (or only `vary_query_params`) and
/// `vary_headers`, hashed with the route and plugin instance.
fn cache_key<B>(c: &ProxyCache, req: &Request<B>, route: &str, state: &PluginState) -> u64 {
    use std::hash::BuildHasher;
    let query = req.uri().query().unwrap_or("");
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            c.vary_query_params.is_empty()
                || c.vary_query_params
                    .iter()
                    .any(|v| p.split('=').next() == Some(v.as_str()))
        })
        .collect();
    params.sort_unstable();
    let headers: Vec<Option<&[u8]>> = c
        .vary_headers
        .iter()
        .map(|h| req.headers().get(h.as_str()).map(|v| v.as_bytes()))
        .collect();
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or(req.uri().authority().map(|a| a.as_str().as_bytes()));
    state.counter_keys.hash_one((
        &c.instance,
        route,
        req.method().as_str(),
        host,
        req.uri().path(),
        params,
        headers,
    ))
}

/// proxy-cache's access phase: answer from the cache (`X-Cache-Status: Hit`), or mark the
/// response for storing (`Miss`), or pass methods it does not cache (`Bypass`).
fn cache_lookup<B>(
    c: &ProxyCache,
    req: &Request<B>,
    route: &str,
    state: &PluginState,
    effects: &mut PluginEffects,
) -> Result<(), Rejection> {
    let status_header = HeaderName::from_static("x-cache-status");
    if !c.request_methods.iter().any(|m| m == req.method().as_str()) {
        effects
            .response_headers
            .push((status_header, HeaderValue::from_static("Bypass")));
        return Ok(());
    }
    let key = cache_key(c, req, route, state);
    let key_value = HeaderValue::from_str(&format!("{key:016x}")).unwrap_or(HeaderValue::from_static("-"));
    let now = std::time::Instant::now();
    let hit = state
        .cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .filter(|e| e.expires > now)
        .cloned();
    if let Some(entry) = hit {
        let mut resp = Response::new(body::full(entry.body.clone()));
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = entry.headers.clone();
        resp.headers_mut()
            .insert(status_header, HeaderValue::from_static("Hit"));
        resp.headers_mut().insert("x-cache-key", key_value);
        resp.headers_mut().insert(
            header::AGE,
            HeaderValue::from(now.duration_since(entry.stored).as_secs()),
        );
        return Err(Box::new(resp));
    }
    effects
        .response_headers
        .push((status_header, HeaderValue::from_static("Miss")));
    effects
        .response_headers
        .push((HeaderName::from_static("x-cache-key"), key_value));
    effects.cache_store = Some((key, now));
    Ok(())
}

/// Stores a cacheable response (status and media type allowed) as it streams to the client.
fn cache_store(c: &ProxyCache, key: u64, response: &mut Response<ResponseBody>, state: &PluginState) {
    if !c.response_codes.contains(&response.status().as_u16()) {
        return;
    }
    let media_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase())
        .unwrap_or_default();
    if !c.content_types.contains(&media_type) {
        return;
    }
    let mut headers = response.headers().clone();
    for name in ["x-cache-status", "x-cache-key", "connection", "transfer-encoding"] {
        headers.remove(name);
    }
    let status = response.status();
    let ttl = c.ttl;
    let store = state.cache.clone();
    let inner = std::mem::replace(response.body_mut(), body::empty());
    *response.body_mut() = ResponseBody::Caching(Box::new(body::CachingBody::new(
        inner,
        CACHE_BODY_LIMIT,
        move |bytes| {
            let now = std::time::Instant::now();
            let mut cache = store.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_ENTRIES {
                cache.retain(|_, e| e.expires > now);
                if cache.len() >= CACHE_ENTRIES {
                    return;
                }
            }
            cache.insert(
                key,
                Arc::new(CachedResponse {
                    status,
                    headers,
                    body: bytes,
                    stored: now,
                    expires: now + ttl,
                }),
            );
        },
    )));
}

/// Compares without an early exit, so timing does not reveal a matching prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(!x));
    }
    diff == 0
}

fn request_size<B>(l: &RequestSizeLimiting, req: &Request<B>) -> Result<(), Rejection> {
    match req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(length) if length > l.limit => Err(kong_error(413, "Request size limit exceeded", ResponseFlags::NONE)),
        Some(_) => Ok(()),
        None if l.require_content_length && req.method() != Method::GET && req.method() != Method::HEAD => Err(
            kong_error(411, "A valid Content-Length header is required", ResponseFlags::NONE),
        ),
        None => Ok(()),
    }
}

/// request-transformer: headers, query string, method and URI for the upstream request.
fn transform_request<B>(t: &Transformer, req: &Request<B>, effects: &mut PluginEffects) {
    let mut headers = effects.current_headers(req);
    transform_headers(&t.headers, &mut headers);
    effects.request_header_map = Some(headers);
    effects.request_headers.clear();
    if let Some(method) = t
        .method
        .as_deref()
        .and_then(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
    {
        effects.request_method = Some(method);
    }
    let q = &t.querystring;
    let has_query_ops = !(q.remove.is_empty()
        && q.rename.is_empty()
        && q.replace.is_empty()
        && q.add.is_empty()
        && q.append.is_empty());
    if t.uri.is_none() && !has_query_ops {
        return;
    }
    let uri = effects.request_uri.clone().unwrap_or_else(|| req.uri().clone());
    let mut pairs: Vec<(String, String)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_string(), v.to_string())
        })
        .collect();
    pairs.retain(|(k, _)| !q.remove.contains(k));
    for (from, to) in &q.rename {
        for pair in pairs.iter_mut().filter(|(k, _)| k == from) {
            pair.0 = to.clone();
        }
    }
    for (name, value) in &q.replace {
        for pair in pairs.iter_mut().filter(|(k, _)| k == name) {
            pair.1 = value.clone();
        }
    }
    for (name, value) in &q.add {
        if !pairs.iter().any(|(k, _)| k == name) {
            pairs.push((name.clone(), value.clone()));
        }
    }
    for (name, value) in &q.append {
        pairs.push((name.clone(), value.clone()));
    }
    effects.upstream_path_fixed |= t.uri.is_some();
    let path = t.uri.as_deref().unwrap_or(uri.path());
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| if v.is_empty() { k.clone() } else { format!("{k}={v}") })
        .collect();
    let path_and_query = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", query.join("&"))
    };
    let mut parts = uri.into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(path_and_query) {
        parts.path_and_query = Some(pq);
        if let Ok(new_uri) = http::Uri::from_parts(parts) {
            effects.request_uri = Some(new_uri);
        }
    }
}

/// Kong's error reply: `{"message": ...}` as JSON.
/// A plugin's answer that ends the request (boxed: it is the rare path).
pub type Rejection = Box<Response<ResponseBody>>;

fn kong_error(status: u16, message: &str, flags: ResponseFlags) -> Rejection {
    let body = serde_json::json!({ "message": message }).to_string();
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    ResponseFlags::mark(&mut resp, flags);
    Box::new(resp)
}

fn correlation_id<B>(c: &CorrelationId, req: &Request<B>, state: &PluginState, effects: &mut PluginEffects) {
    let Ok(name) = HeaderName::from_bytes(c.header_name.as_bytes()) else {
        return;
    };
    let value = match req.headers().get(&name) {
        Some(v) if !v.is_empty() => v.clone(),
        _ => {
            let id = match c.generator.as_str() {
                "uuid" => crate::uuid::v4(),
                "tracker" => format!(
                    "{}-{}",
                    crate::uuid::v4(),
                    state.correlation_counter.fetch_add(1, Relaxed)
                ),
                _ => format!(
                    "{}#{}",
                    crate::uuid::v4(),
                    state.correlation_counter.fetch_add(1, Relaxed) + 1
                ),
            };
            let Ok(v) = HeaderValue::from_str(&id) else { return };
            effects.set(name.clone(), Some(v.clone()));
            v
        }
    };
    if c.echo_downstream {
        effects.response_headers.push((name, value));
    }
}

/// The value of query parameter `name`, and how many times it appears.
fn query_values<'q>(query: &'q str, name: &str) -> Vec<&'q str> {
    query
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            k.eq_ignore_ascii_case(name).then_some(v)
        })
        .collect()
}

fn key_auth<'c, B>(
    k: &'c KeyAuth,
    req: &Request<B>,
    authenticated: &mut Option<Authenticated<'c>>,
    effects: &mut PluginEffects,
) -> Result<(), Rejection> {
    if !k.run_on_preflight && req.method() == Method::OPTIONS {
        return Ok(());
    }
    if k.anonymous.is_some() && authenticated.as_ref().is_some_and(|a| a.credential.is_some()) {
        // Already authenticated by another plugin: anonymous makes the plugins an OR.
        return Ok(());
    }
    match find_key(k, req) {
        Ok(Some((name, key, from_query))) => {
            // The map lookup hashes the presented key with a per-process random SipHash key,
            // so response timing does not reveal how much of a stored key matched.
            match k.consumers.keys.get(&key) {
                Some((consumer, credential)) => {
                    if k.hide_credentials {
                        hide_key(req, &name, from_query, effects);
                    }
                    let who = Authenticated {
                        consumers: &k.consumers,
                        consumer: *consumer,
                        credential: Some(credential.as_str()),
                    };
                    set_consumer_headers(effects, &who);
                    *authenticated = Some(who);
                    Ok(())
                }
                None => anonymous_or(
                    k,
                    authenticated,
                    effects,
                    kong_error(401, "Invalid authentication credentials", ResponseFlags::UNAUTHORIZED),
                ),
            }
        }
        Ok(None) => {
            let mut resp = kong_error(401, "No API key found in request", ResponseFlags::UNAUTHORIZED);
            if let Ok(v) = HeaderValue::from_str(&format!("Key realm=\"{}\"", k.realm)) {
                resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            anonymous_or(k, authenticated, effects, resp)
        }
        Err(resp) => anonymous_or(k, authenticated, effects, resp),
    }
}

/// With `anonymous` set, a failed authentication runs the request as that consumer instead.
fn anonymous_or<'c>(
    k: &'c KeyAuth,
    authenticated: &mut Option<Authenticated<'c>>,
    effects: &mut PluginEffects,
    failure: Rejection,
) -> Result<(), Rejection> {
    let Some(anonymous) = k.anonymous else {
        return Err(failure);
    };
    let who = Authenticated {
        consumers: &k.consumers,
        consumer: anonymous,
        credential: None,
    };
    set_consumer_headers(effects, &who);
    *authenticated = Some(who);
    Ok(())
}

/// The presented key: `(key name, key, found in the query)`; `Err` for a duplicate key.
#[allow(clippy::type_complexity)]
fn find_key<B>(k: &KeyAuth, req: &Request<B>) -> Result<Option<(String, String, bool)>, Rejection> {
    for name in &k.key_names {
        if k.key_in_header {
            let mut values = req.headers().get_all(name.as_str()).iter();
            if let Some(first) = values.next() {
                if values.next().is_some() {
                    return Err(kong_error(401, "Duplicate API key found", ResponseFlags::UNAUTHORIZED));
                }
                if let Ok(key) = first.to_str()
                    && !key.is_empty()
                {
                    return Ok(Some((name.clone(), key.to_string(), false)));
                }
            }
        }
        if k.key_in_query
            && let Some(query) = req.uri().query()
        {
            let values = query_values(query, name);
            if values.len() > 1 {
                return Err(kong_error(401, "Duplicate API key found", ResponseFlags::UNAUTHORIZED));
            }
            if let Some(v) = values.first().filter(|v| !v.is_empty()) {
                return Ok(Some((name.clone(), crate::uri_decoding::decode_query_value(v), true)));
            }
        }
    }
    Ok(None)
}

/// `hide_credentials`: the key does not reach the upstream.
fn hide_key<B>(req: &Request<B>, name: &str, from_query: bool, effects: &mut PluginEffects) {
    if let Ok(header) = HeaderName::from_bytes(name.as_bytes()) {
        effects.set(header, None);
    }
    if !from_query {
        return;
    }
    let uri = req.uri().clone();
    let Some(query) = uri.query() else { return };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !pair.split('=').next().unwrap_or("").eq_ignore_ascii_case(name))
        .collect();
    let path_and_query = if kept.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), kept.join("&"))
    };
    let mut parts = uri.into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(path_and_query) {
        parts.path_and_query = Some(pq);
        if let Ok(new_uri) = http::Uri::from_parts(parts) {
            effects.request_uri = Some(new_uri);
        }
    }
}

/// Kong's `X-Consumer-*` headers for the upstream; values a client sent are never passed on.
fn set_consumer_headers(effects: &mut PluginEffects, who: &Authenticated<'_>) {
    let consumer = who.consumers.list.get(who.consumer);
    let mut set = |name: &'static str, value: Option<&str>| {
        let value = value.and_then(|v| HeaderValue::from_str(v).ok());
        effects.set(HeaderName::from_static(name), value);
    };
    let Some(consumer) = consumer else {
        for name in [
            CONSUMER_ID,
            CONSUMER_CUSTOM_ID,
            CONSUMER_USERNAME,
            CREDENTIAL_IDENTIFIER,
            ANONYMOUS,
        ] {
            set(name, None);
        }
        return;
    };
    set(CONSUMER_ID, Some(&consumer.id));
    set(CONSUMER_CUSTOM_ID, consumer.custom_id.as_deref());
    set(CONSUMER_USERNAME, consumer.username.as_deref());
    set(CREDENTIAL_IDENTIFIER, who.credential);
    set(ANONYMOUS, who.credential.is_none().then_some("true"));
}

fn ip_restriction(r: &IpRestriction, client: IpAddr) -> Result<(), Rejection> {
    let denied = r.deny.iter().any(|n| n.contains(client));
    let allowed = r.allow.is_empty() || r.allow.iter().any(|n| n.contains(client));
    if denied || !allowed {
        return Err(kong_error(r.status, &r.message, ResponseFlags::UNAUTHORIZED));
    }
    Ok(())
}

fn acl(a: &Acl, who: Option<&Authenticated<'_>>, effects: &mut PluginEffects) -> Result<(), Rejection> {
    let Some(who) = who else {
        return Err(kong_error(401, "Unauthorized", ResponseFlags::UNAUTHORIZED));
    };
    let groups: &[String] = who
        .consumers
        .list
        .get(who.consumer)
        .map_or(&[], |c| c.groups.as_slice());
    let in_any = |list: &[String]| groups.iter().any(|g| list.contains(g));
    let blocked = if a.allow.is_empty() {
        in_any(&a.deny)
    } else {
        !in_any(&a.allow)
    };
    if blocked {
        return Err(kong_error(
            403,
            "You cannot consume this service",
            ResponseFlags::UNAUTHORIZED,
        ));
    }
    let value = (!a.hide_groups_header && !groups.is_empty())
        .then(|| HeaderValue::from_str(&groups.join(", ")).ok())
        .flatten();
    effects.set(HeaderName::from_static(CONSUMER_GROUPS), value);
    Ok(())
}

/// Fixed windows aligned to the clock, one counter per window and identifier: in this process
/// (Kong's `local` policy) or in Redis (`redis`).
async fn rate_limit<B>(
    r: &RateLimiting,
    req: &Request<B>,
    client: IpAddr,
    route: &str,
    who: Option<&Authenticated<'_>>,
    state: &PluginState,
    effects: &mut PluginEffects,
) -> Result<(), Rejection> {
    let identifier = identifier(r, req, client, route, who);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let usage = match &r.redis {
        None => local_usage(r, route, &identifier, now, state),
        Some(target) => match redis_usage(r, target, route, &identifier, now, state).await {
            Ok(usage) => usage,
            Err(e) if r.fault_tolerant => {
                tracing::warn!(error = %e, "rate-limiting: Redis unavailable; request let through (fault_tolerant)");
                return Ok(());
            }
            Err(e) => {
                tracing::error!(error = %e, "rate-limiting: Redis unavailable");
                return Err(kong_error(500, "An unexpected error occurred", ResponseFlags::NONE));
            }
        },
    };
    let exceeded = usage.iter().filter(|u| u.exceeded).map(|u| u.reset).max();
    let usage: Vec<(Window, u64, u64, u64)> = usage
        .iter()
        .map(|u| (u.window, u.limit, u.remaining, u.reset))
        .collect();
    let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
    if !r.hide_client_headers {
        for &(window, limit, remaining, _) in &usage {
            let (limit_name, remaining_name) = window_header_names(window);
            headers.push((HeaderName::from_static(limit_name), HeaderValue::from(limit)));
            headers.push((HeaderName::from_static(remaining_name), HeaderValue::from(remaining)));
        }
        // RateLimit-*: the most constraining window (fewest requests left).
        if let Some(&(_, limit, remaining, reset)) = usage.iter().min_by_key(|(_, _, remaining, _)| *remaining) {
            headers.push((HeaderName::from_static("ratelimit-limit"), HeaderValue::from(limit)));
            headers.push((
                HeaderName::from_static("ratelimit-remaining"),
                HeaderValue::from(remaining),
            ));
            headers.push((HeaderName::from_static("ratelimit-reset"), HeaderValue::from(reset)));
        }
    }
    if let Some(retry_after) = exceeded {
        let mut resp = kong_error(r.error_code, &r.error_message, ResponseFlags::RATE_LIMITED);
        for (name, value) in headers {
            resp.headers_mut().insert(name, value);
        }
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        return Err(resp);
    }
    effects.response_headers.extend(headers);
    Ok(())
}

/// Kong's `X-RateLimit-Limit-<Window>` / `X-RateLimit-Remaining-<Window>` (lower-cased).
fn window_header_names(window: Window) -> (&'static str, &'static str) {
    match window {
        Window::Second => ("x-ratelimit-limit-second", "x-ratelimit-remaining-second"),
        Window::Minute => ("x-ratelimit-limit-minute", "x-ratelimit-remaining-minute"),
        Window::Hour => ("x-ratelimit-limit-hour", "x-ratelimit-remaining-hour"),
        Window::Day => ("x-ratelimit-limit-day", "x-ratelimit-remaining-day"),
        Window::Month => ("x-ratelimit-limit-month", "x-ratelimit-remaining-month"),
        Window::Year => ("x-ratelimit-limit-year", "x-ratelimit-remaining-year"),
    }
}

/// One window's state for a request.
struct WindowUsage {
    window: Window,
    limit: u64,
    /// Requests left after this one.
    remaining: u64,
    /// Seconds until the window ends.
    reset: u64,
    exceeded: bool,
}

fn window_usage(window: Window, limit: u64, used: u64, now: u64) -> WindowUsage {
    let start = now - now % window.seconds();
    let exceeded = used >= limit;
    WindowUsage {
        window,
        limit,
        remaining: if exceeded { 0 } else { limit - used - 1 },
        reset: start + window.seconds() - now,
        exceeded,
    }
}

/// Kong's `local` policy: counters in this process, shared by the workers.
fn local_usage(r: &RateLimiting, route: &str, identifier: &str, now: u64, state: &PluginState) -> Vec<WindowUsage> {
    use std::hash::BuildHasher;
    let key_of = |window: Window| {
        state
            .counter_keys
            .hash_one((&r.instance, route, window.seconds(), identifier))
    };
    // Advances a window's counter to `start` and returns it.
    let current = |counters: &mut HashMap<u64, (u64, u64)>, key: u64, start: u64| -> u64 {
        // A counter of an older window restarts as it is met, keeping the map bounded by clients.
        let entry = counters.entry(key).or_insert((start, 0));
        if entry.0 != start {
            *entry = (start, 0);
        }
        entry.1
    };
    if let [(window, limit)] = r.limits[..] {
        // One window (the common case): check and count under one lock.
        let start = now - now % window.seconds();
        let key = key_of(window);
        let mut counters = state.shards[(key % 16) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let used = current(&mut counters, key, start);
        let usage = window_usage(window, limit, used, now);
        if !usage.exceeded
            && let Some(entry) = counters.get_mut(&key)
        {
            entry.1 += 1;
        }
        return vec![usage];
    }
    let mut usage = Vec::with_capacity(r.limits.len());
    for &(window, limit) in &r.limits {
        let start = now - now % window.seconds();
        let key = key_of(window);
        let mut counters = state.shards[(key % 16) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        usage.push(window_usage(window, limit, current(&mut counters, key, start), now));
    }
    if !usage.iter().any(|u| u.exceeded) {
        for &(window, _) in &r.limits {
            let key = key_of(window);
            let mut counters = state.shards[(key % 16) as usize]
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = counters.get_mut(&key) {
                entry.1 += 1;
            }
        }
    }
    usage
}

/// Kong's `redis` policy: read every window's counter in one pipeline, and when the request
/// is allowed, increment them (with their expiry) in a second.
async fn redis_usage(
    r: &RateLimiting,
    target: &meshgate_model::kong::plugins::RedisTarget,
    route: &str,
    identifier: &str,
    now: u64,
    state: &PluginState,
) -> Result<Vec<WindowUsage>, String> {
    let keys: Vec<String> = r
        .limits
        .iter()
        .map(|(window, _)| {
            let start = now - now % window.seconds();
            let period = window.header_suffix().to_ascii_lowercase();
            format!("ratelimit:{}:{route}:{identifier}:{start}:{period}", r.instance)
        })
        .collect();
    let reads: Vec<Vec<String>> = keys.iter().map(|k| vec!["GET".to_string(), k.clone()]).collect();
    let replies = state.redis.pipeline(target, &reads).await?;
    let mut usage = Vec::with_capacity(r.limits.len());
    for (&(window, limit), reply) in r.limits.iter().zip(&replies) {
        let used = reply.as_count().ok_or("unexpected Redis reply to GET")?;
        usage.push(window_usage(window, limit, used, now));
    }
    if !usage.iter().any(|u| u.exceeded) {
        let mut writes = Vec::with_capacity(keys.len() * 2);
        for (key, (window, _)) in keys.iter().zip(&r.limits) {
            writes.push(vec!["INCRBY".to_string(), key.clone(), "1".to_string()]);
            writes.push(vec!["EXPIRE".to_string(), key.clone(), window.seconds().to_string()]);
        }
        state.redis.pipeline(target, &writes).await?;
    }
    Ok(usage)
}

/// Whom a request counts against; Kong falls back to the client IP when the value is absent.
fn identifier<B>(
    r: &RateLimiting,
    req: &Request<B>,
    client: IpAddr,
    route: &str,
    who: Option<&Authenticated<'_>>,
) -> String {
    let ip = || format!("ip:{client}");
    match &r.limit_by {
        LimitBy::Ip => ip(),
        LimitBy::Consumer => who
            .and_then(|w| w.consumers.list.get(w.consumer))
            .map_or_else(ip, |c| format!("consumer:{}", c.id)),
        LimitBy::Credential => who
            .and_then(|w| w.credential)
            .map_or_else(ip, |c| format!("credential:{c}")),
        LimitBy::Service(service) => format!("service:{service}:{route}"),
        LimitBy::Header(name) => req
            .headers()
            .get(name.as_str())
            .and_then(|v| v.to_str().ok())
            .map_or_else(ip, |v| format!("header:{v}")),
        LimitBy::Path(path) => {
            if req.uri().path() == path {
                format!("path:{path}")
            } else {
                ip()
            }
        }
    }
}

fn terminate(t: &RequestTermination) -> Rejection {
    let status = StatusCode::from_u16(t.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    match (&t.body, &t.message) {
        (Some(body), _) => {
            let mut resp = Response::new(body::full(body.clone()));
            *resp.status_mut() = status;
            if let Some(v) = t.content_type.as_deref().and_then(|c| HeaderValue::from_str(c).ok()) {
                resp.headers_mut().insert(header::CONTENT_TYPE, v);
            }
            Box::new(resp)
        }
        (None, Some(message)) => kong_error(t.status, message, ResponseFlags::NONE),
        (None, None) => kong_error(
            t.status,
            status.canonical_reason().unwrap_or("Terminated"),
            ResponseFlags::NONE,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_keys_are_matched_case_insensitively() {
        assert_eq!(query_values("apikey=1&x=2&APIKEY=3", "apikey"), ["1", "3"]);
    }
}
