//! The per-request path: route lookup, local replies, and forwarding upstream.
//!
//! Header handling follows Envoy at the edge: hop-by-hop headers are dropped (RFC 9110
//! §7.6.1), the client address is appended to `x-forwarded-for`, `x-forwarded-proto` is set
//! to the downstream scheme, and `x-request-id` is generated (edge) or kept (mesh).

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use meshgate_model::matcher::{RequestInfo, StringMatch};
use meshgate_model::snapshot::{
    FaultAbort, Forward, GeneratedCookieValue, HashKey, HeaderOps, ListenerFlavor, LoadBalancer, Mirror, PathRewrite,
    Redirect, RedirectPort, RequestMatch, RetryBudget, RetryPolicy, RouteAction, TryFailure, UpstreamProtocol,
};
use tokio::time::Instant;

use crate::Shared;
use crate::access_log::{self, UpstreamHost, UpstreamInfo};
use crate::body::{self, DownstreamBody, ReplayableBody, ResponseBody, UpstreamBody, UpstreamResponseBody};
use crate::cors;
use crate::plugins;
use crate::response_flags::ResponseFlags;
use crate::stats::{Breaker, RouteStats};
use crate::upstream::cluster::ClusterRuntime;
use crate::upstream::outlier::TryOutcome;
use crate::upstream::pool::{EndpointPool, RequestSlot, UpstreamError};

/// What the request path knows about the connection a request arrived on.
pub struct Connection {
    pub shared: Arc<Shared>,
    /// The listener's bound address; identifies its config across reloads.
    pub listener: SocketAddr,
    pub remote: SocketAddr,
    /// The client's IP as a header value, for `x-forwarded-for`.
    pub remote_ip: HeaderValue,
    pub tls: bool,
    /// The TLS SNI the client sent (lowercase), for detecting misdirected requests.
    pub sni: Option<Box<str>>,
    /// An edge listener (a gateway) regenerates `x-request-id` as Envoy does at the edge;
    /// the mesh (sidecar outbound) listener keeps the one the application propagates.
    pub edge: bool,
    /// The `x-forwarded-client-cert` describing the client certificate the TLS handshake
    /// verified (mutual TLS), if any.
    pub client_cert: Option<HeaderValue>,
}

/// Envoy's header describing a client certificate to the upstream.
const X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `Hash=<hex SHA-256 of the certificate>`: Envoy's `x-forwarded-client-cert` element for a
/// verified client certificate (`der`, the leaf).
pub fn client_cert_header(der: &[u8]) -> Option<HeaderValue> {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut value = String::with_capacity(5 + 64);
    value.push_str("Hash=");
    for b in digest.as_ref() {
        let _ = write!(value, "{b:02x}");
    }
    HeaderValue::from_str(&value).ok()
}

/// Envoy's local-reply texts, so clients and scripts see familiar bodies.
const NO_HEALTHY_UPSTREAM: &str = "no healthy upstream";
const CONNECT_FAILURE: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection failure";
const CONNECTION_TERMINATION: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: connection termination";
const UPSTREAM_TIMEOUT: &str = "upstream request timeout";
/// Envoy's reply when a circuit breaker refuses the request (response flag `UO`).
const OVERFLOW: &str = "upstream connect error or disconnect/reset before headers. reset reason: overflow";

pub async fn handle(
    mut req: Request<DownstreamBody>,
    conn: Arc<Connection>,
) -> Result<Response<ResponseBody>, Infallible> {
    let _in_flight = RequestInFlight::start(&conn.shared.stats.requests_in_flight);
    let mut watch = DownstreamWatch {
        conn: &conn,
        logged: conn.shared.access_log.is_some().then(|| {
            (
                std::time::SystemTime::now(),
                Instant::now(),
                LoggedRequest::capture(&req),
            )
        }),
        answered: false,
    };
    // The request's work is one heap allocation: hyper moves the future it gets from here
    // (into its dispatcher, or into a task per HTTP/2 stream), and a small one moves cheaply.
    // The request stays here: the layers below borrow it rather than move its head along.
    let mut resp = Box::pin(route_request(&mut req, &conn)).await;
    if let Some(timing) = resp.extensions_mut().remove::<KongTiming>() {
        timing.add_headers(resp.headers_mut());
        // Kong (3.5+) names every response with its request id, local answers included.
        if !resp.headers().contains_key(X_KONG_REQUEST_ID) {
            resp.headers_mut().insert(X_KONG_REQUEST_ID, kong_request_id());
        }
    }
    watch.answered = true;
    let flags = ResponseFlags::of(&resp);
    if !flags.is_empty() {
        conn.shared.stats.record_flags(flags);
    }
    if let Some((start, started, request)) = watch.logged.take() {
        let upstream = resp.extensions_mut().remove::<UpstreamInfo>();
        let sent = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        log_request(
            &conn,
            &request,
            start,
            started,
            resp.status().as_u16(),
            flags,
            sent,
            upstream.as_ref(),
        );
    }
    Ok(resp)
}

/// Envoy's `DC`: the client went away before its response was ready. hyper then drops the
/// request's future, and this guard with it, which records the flag (and the access log line,
/// with status 0 as Envoy writes it).
struct DownstreamWatch<'a> {
    conn: &'a Connection,
    logged: Option<(std::time::SystemTime, Instant, LoggedRequest)>,
    answered: bool,
}

impl Drop for DownstreamWatch<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        let flags = ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION;
        self.conn.shared.stats.record_flags(flags);
        if let Some((start, started, request)) = self.logged.take() {
            log_request(self.conn, &request, start, started, 0, flags, None, None);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn log_request(
    conn: &Connection,
    request: &LoggedRequest,
    start: std::time::SystemTime,
    started: Instant,
    status: u16,
    flags: ResponseFlags,
    bytes_sent: Option<u64>,
    upstream: Option<&UpstreamInfo>,
) {
    let Some(log) = conn.shared.access_log.as_ref() else {
        return;
    };
    let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
    let entry = access_log::Entry {
        start,
        method: request.method.as_str(),
        path: &request.path,
        protocol: request.protocol,
        status,
        flags,
        bytes_received: header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0),
        bytes_sent,
        duration: started.elapsed(),
        forwarded_for: header("x-forwarded-for"),
        user_agent: header("user-agent"),
        request_id: upstream
            .and_then(|u| u.request_id.as_deref())
            .or(header("x-request-id")),
        authority: request.authority.as_deref(),
        upstream,
    };
    if !log.record(&entry) {
        conn.shared.stats.access_log_dropped.fetch_add(1, Relaxed);
    }
}

/// `route_request`, whose error type is uninhabited.
/// Marks a response of a Kong listener, for Kong's latency headers (its default
/// `headers = latency_tokens`): `X-Kong-Proxy-Latency` and `X-Kong-Upstream-Latency` on
/// proxied responses, `X-Kong-Response-Latency` on those meshgate answered itself; in ms.
#[derive(Clone, Copy)]
struct KongTiming {
    /// When the request was routed (only Kong listeners read the clock for this).
    started: std::time::Instant,
    /// When the request was handed to the upstream; `None` for local answers.
    forwarded_at: Option<std::time::Instant>,
}

/// `resp` marked for Kong's latency headers when `started` is set (a Kong listener).
fn kong_timed(
    mut resp: Response<ResponseBody>,
    started: Option<std::time::Instant>,
    forwarded_at: Option<std::time::Instant>,
) -> Response<ResponseBody> {
    mark_kong_timed(&mut resp, started, forwarded_at);
    resp
}

/// [`kong_timed`] in place, so the hot path does not move the response in and out.
fn mark_kong_timed(
    resp: &mut Response<ResponseBody>,
    started: Option<std::time::Instant>,
    forwarded_at: Option<std::time::Instant>,
) {
    if let Some(started) = started {
        resp.extensions_mut().insert(KongTiming { started, forwarded_at });
    }
}

impl KongTiming {
    fn add_headers(self, headers: &mut HeaderMap) {
        let started = self.started;
        let ms = |d: std::time::Duration| HeaderValue::from(d.as_millis() as u64);
        match self.forwarded_at {
            Some(forwarded) => {
                headers.insert("x-kong-upstream-latency", ms(forwarded.elapsed()));
                headers.insert("x-kong-proxy-latency", ms(forwarded.saturating_duration_since(started)));
                headers.insert(header::VIA, HeaderValue::from_static(VIA));
            }
            None => {
                headers.insert("x-kong-response-latency", ms(started.elapsed()));
            }
        }
    }
}

/// Kong's `server_tokens` `Via` on proxied responses, naming meshgate.
const VIA: &str = concat!("1.1 meshgate/", env!("CARGO_PKG_VERSION"));

/// What the access log needs from a request, taken before the request is consumed.
struct LoggedRequest {
    method: http::Method,
    path: String,
    protocol: &'static str,
    authority: Option<String>,
    headers: HeaderMap,
}

impl LoggedRequest {
    fn capture<B>(req: &Request<B>) -> Self {
        let mut headers = HeaderMap::new();
        for name in ["x-forwarded-for", "user-agent", "x-request-id", "content-length"] {
            if let Some(v) = req.headers().get(name) {
                headers.insert(name, v.clone());
            }
        }
        LoggedRequest {
            method: req.method().clone(),
            path: req.uri().path_and_query().map_or("/", PathAndQuery::as_str).to_string(),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            authority: request_authority(req).map(str::to_string),
            headers,
        }
    }
}

/// Counts a request as in flight until its response headers are ready, for draining.
struct RequestInFlight<'a>(&'a std::sync::atomic::AtomicU64);

impl<'a> RequestInFlight<'a> {
    fn start(counter: &'a std::sync::atomic::AtomicU64) -> Self {
        counter.fetch_add(1, Relaxed);
        RequestInFlight(counter)
    }
}

impl Drop for RequestInFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

async fn route_request(req: &mut Request<DownstreamBody>, conn: &Arc<Connection>) -> Response<ResponseBody> {
    let active = conn.shared.active.load_full();
    let Some(li) = active.listener_index(&conn.listener) else {
        // The listener was removed by a reload while this connection stayed open.
        return flagged(local_reply(StatusCode::NOT_FOUND, ""), ResponseFlags::NO_ROUTE);
    };
    if matches!(req.body(), DownstreamBody::Hyper(_)) && request_head_size(req) > crate::MAX_REQUEST_HEADERS_BYTES {
        // hyper's own bound is its read buffer's, which a head arriving in large reads can
        // pass; Envoy's `max_request_headers_kb` answers 431 and closes the connection.
        let mut resp = local_reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "");
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return resp;
    }
    let listener = &active.snapshot.listeners[li];
    let runtime = &active.listeners[li];
    runtime.stats.requests.fetch_add(1, Relaxed);
    let kong_started = (listener.flavor == ListenerFlavor::Kong).then(std::time::Instant::now);

    let authority = request_authority(req).unwrap_or("");
    let host = host_of(authority);
    let scheme = if conn.tls { "https" } else { "http" };
    let info = RequestInfo {
        host: &host,
        authority,
        path: req.uri().path(),
        query: req.uri().query(),
        method: req.method().as_str(),
        scheme,
        port: conn.listener.port(),
        headers: req.headers(),
        sni: conn.sni.as_deref(),
    };
    if is_misdirected(listener, conn.sni.as_deref(), &host) {
        return local_reply(StatusCode::MISDIRECTED_REQUEST, "Misdirected Request");
    }
    let Some(vh_index) = listener.routes.virtual_host_index(&host) else {
        runtime.stats.no_route.fetch_add(1, Relaxed);
        return kong_timed(no_route(listener.flavor), kong_started, None);
    };
    let virtual_host = &listener.routes.virtual_hosts[vh_index];
    if virtual_host.https_redirect && !conn.tls {
        // Gateway `tls.httpsRedirect`: every plain-HTTP request to these hosts, routed or not.
        let pq = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let location = format!("https://{host}{pq}");
        return redirect_reply(StatusCode::MOVED_PERMANENTLY, &location);
    }
    let Some((route_index, matched)) = virtual_host.find(&info) else {
        runtime.stats.no_route.fetch_add(1, Relaxed);
        return kong_timed(no_route(listener.flavor), kong_started, None);
    };
    let route = &virtual_host.routes[route_index];
    let stats = &runtime.route_stats[vh_index][route_index];
    let plugin_effects = match &route.plugins {
        // Boxed, as every rarely taken await below: a future is as large as its largest
        // branch, and each request moves this one into place.
        Some(chain) => match Box::pin(plugins::access(
            chain,
            req,
            conn.remote.ip().to_canonical(),
            &route.name,
            &conn.shared.plugin_state,
        ))
        .await
        {
            Ok(effects) => Some(effects),
            Err(mut resp) => {
                stats[0].record(resp.status().as_u16());
                apply_header_ops(resp.headers_mut(), &route.response_headers);
                return kong_timed(*resp, kong_started, None);
            }
        },
        None => None,
    };
    let cors_origin = match &route.cors {
        Some(policy) => {
            if let Some(resp) = cors::preflight(policy, req) {
                return resp;
            }
            req.headers().get(header::ORIGIN).cloned()
        }
        None => None,
    };

    let mut response = match &route.action {
        RouteAction::DirectResponse(d) => {
            let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = local_reply(status, "");
            if !d.body.is_empty() {
                *resp.body_mut() = body::full(d.body.clone());
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            stats[0].record(d.status);
            resp
        }
        RouteAction::Redirect(r) => {
            let location = redirect_location(r, req, scheme, &host, conn.listener.port(), matched);
            let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
            stats[0].record(status.as_u16());
            redirect_reply(status, &location)
        }
        RouteAction::Forward(forward) => {
            // Envoy's fault filter runs before the router: the delay, then the abort.
            let mut injected = ResponseFlags::NONE;
            if let Some(fault) = &forward.fault {
                if let Some(delay) = &fault.delay
                    && chance(delay.per_million)
                {
                    Box::pin(tokio::time::sleep(delay.duration)).await;
                    injected = ResponseFlags::DELAY_INJECTED;
                }
                if let Some((abort, per_million)) = fault.abort
                    && chance(per_million)
                {
                    let mut resp = fault_abort(abort);
                    stats[0].record(resp.status().as_u16());
                    ResponseFlags::mark(&mut resp, injected | ResponseFlags::FAULT_INJECTED);
                    apply_header_ops(resp.headers_mut(), &route.response_headers);
                    return resp;
                }
            }
            let pick = pick_destination(forward);
            let destination = &forward.destinations[pick];
            if destination.invalid {
                // Gateway API: the share of traffic sent to an unresolvable backend gets 500.
                stats[pick].record(500);
                let mut resp = local_reply(StatusCode::INTERNAL_SERVER_ERROR, "");
                apply_header_ops(resp.headers_mut(), &route.response_headers);
                return resp;
            }
            let cluster = &active.clusters[destination.cluster];
            // Kong's upstream headers name the request as the client sent it (nginx's `$host`,
            // `$request_uri`), and are set after the plugins' edits, as nginx sets them last.
            let kong_origin = (listener.flavor == ListenerFlavor::Kong)
                .then(|| (host.to_string(), HeaderValue::from_str(req.uri().path()).ok()));
            if let Some(effects) = &plugin_effects {
                effects.apply_to_request(req);
                if cluster.config.load_balancer.hashes_on_consumer()
                    && let Some(consumer) = effects.authenticated_consumer()
                {
                    req.extensions_mut().insert(consumer);
                }
            }
            let kong_request_id = kong_origin
                .map(|(host, path)| kong_upstream_headers(req, &conn.remote_ip, &host, path, conn.listener.port()));
            let forwarded_at = kong_started.map(|_| std::time::Instant::now());
            let mut resp = forward_request(
                req,
                conn,
                forward,
                pick,
                matched,
                &route.request_headers,
                cluster,
                &stats[pick],
                Mirroring {
                    mirrors: &route.mirrors,
                    clusters: &active.clusters,
                },
                listener.flavor,
            )
            .await;
            apply_header_ops(resp.headers_mut(), &destination.response_headers);
            if let Some(id) = kong_request_id {
                resp.headers_mut().insert(X_KONG_REQUEST_ID, id);
            }
            if !injected.is_empty() {
                ResponseFlags::mark(&mut resp, injected);
            }
            mark_kong_timed(&mut resp, kong_started, forwarded_at);
            if conn.shared.access_log.is_some() {
                let host = resp.extensions_mut().remove::<UpstreamHost>();
                resp.extensions_mut().insert(UpstreamInfo {
                    route: route.name.clone(),
                    cluster: Some(cluster.config.name.clone()),
                    host: host.as_ref().map(|h| h.address.clone()),
                    request_id: host.and_then(|h| h.request_id),
                });
            }
            resp
        }
    };
    if kong_started.is_some() && response.extensions().get::<KongTiming>().is_none() {
        mark_kong_timed(&mut response, kong_started, None);
    }
    if conn.shared.access_log.is_some() && response.extensions().get::<UpstreamInfo>().is_none() {
        response.extensions_mut().insert(UpstreamInfo {
            route: route.name.clone(),
            ..UpstreamInfo::default()
        });
    }
    apply_header_ops(response.headers_mut(), &route.response_headers);
    if let Some(policy) = &route.cors {
        cors::decorate(policy, cors_origin.as_ref(), response.headers_mut());
    }
    // Checked before the (large) effects are moved, so a route without plugins copies nothing.
    if let Some(chain) = &route.plugins
        && let Some(effects) = plugin_effects
    {
        effects.apply_to_response(chain, &mut response, &conn.shared.plugin_state);
    }
    response
}

/// The request head's size as Envoy counts it for `max_request_headers_kb`: method, target
/// and every field's name and value.
fn request_head_size<B>(req: &Request<B>) -> usize {
    let fields: usize = req
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    req.method().as_str().len() + req.uri().path_and_query().map_or(0, |pq| pq.as_str().len()) + fields
}

/// RFC 9110 §15.5.20: on a TLS listener serving several host groups (Gateway listeners or
/// Istio servers sharing a port), a request whose `Host` picks a different group than the SNI
/// of its connection, as HTTP/2 connection reuse can produce, is answered 421 so the client
/// retries on a connection of its own. Gateway API requires this.
fn is_misdirected(listener: &meshgate_model::snapshot::Listener, sni: Option<&str>, host: &str) -> bool {
    let (Some(tls), Some(sni)) = (&listener.tls, sni) else {
        return false;
    };
    if tls.certificates.len() < 2 {
        return false;
    }
    let groups = || tls.certificates.iter().map(|c| c.sni_hosts.as_slice());
    crate::tls::most_specific_group(groups(), sni) != crate::tls::most_specific_group(groups(), host)
}

/// The request's authority: `:authority` for HTTP/2, else the Host header.
fn request_authority<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(header::HOST).and_then(|h| h.to_str().ok()),
    }
}

/// Lower-cased host without the port; borrows when already lower-case.
fn host_of(authority: &str) -> Cow<'_, str> {
    let host = if authority.starts_with('[') {
        authority.find(']').map_or(authority, |i| &authority[..=i])
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

fn pick_destination(forward: &Forward) -> usize {
    if forward.destinations.len() == 1 || forward.total_weight == 0 {
        return 0;
    }
    let mut ticket = fastrand::u32(..forward.total_weight);
    for (i, d) in forward.destinations.iter().enumerate() {
        if ticket < d.weight {
            return i;
        }
        ticket -= d.weight;
    }
    forward.destinations.len() - 1
}

#[allow(clippy::too_many_arguments)]
async fn forward_request(
    req: &mut Request<DownstreamBody>,
    conn: &Connection,
    forward: &Forward,
    pick: usize,
    matched: Option<&RequestMatch>,
    route_headers: &HeaderOps,
    cluster: &ClusterRuntime,
    stats: &RouteStats,
    mirroring: Mirroring<'_>,
    flavor: ListenerFlavor,
) -> Response<ResponseBody> {
    let destination = &forward.destinations[pick];

    // Endpoint selection: the pool to use, the address to connect to, the endpoint index.
    let (hash, hash_cookie) = match &cluster.config.load_balancer {
        LoadBalancer::ConsistentHash(key) if !cluster.is_original_destination() => {
            request_hash(key, req, conn, matched)
        }
        _ => (None, None),
    };
    let target = if cluster.is_original_destination() {
        original_destination(req).map(|address| Target {
            pool: cluster.pool_for_address(address.as_str()),
            address,
            endpoint: None,
        })
    } else {
        cluster.pick(hash).map(|i| Target::endpoint(cluster, i))
    };
    let Some(target) = target else {
        return failure_reply(stats, flavor, Failure::NoHealthyUpstream);
    };

    // WebSocket and other HTTP/1.1 upgrades are tunnelled after the upstream's 101.
    let upgrade = is_upgrade_request(req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));
    let use_http2 = !upgrade
        && if cluster.config.pool.use_client_protocol {
            // Istio `useClientProtocol`: the client's protocol, whatever the port's is.
            req.version() == Version::HTTP_2
        } else {
            cluster.config.protocol == UpstreamProtocol::Http2
                || (req.version() == Version::HTTP_2 && is_grpc(req.headers()))
        };

    // Taken whole only here, where the head becomes the upstream request's: the caller keeps
    // an empty request in its place.
    let (mut parts, body) = std::mem::replace(
        req,
        Request::new(DownstreamBody::Http1(crate::http1::RequestBody::empty())),
    )
    .into_parts();
    let body = match checked_chunked_body(&parts, body).await {
        Ok(b) => b,
        Err(()) => {
            stats.record(400);
            let mut resp = local_reply(StatusCode::BAD_REQUEST, "Bad Request");
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    let path_and_query = match parts.extensions.get::<plugins::FixedUpstreamPath>() {
        // request-transformer's `replace.uri` is the upstream path itself.
        Some(_) => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
        None => rewritten_path(&parts.uri, forward, matched),
    };

    let headers = &mut parts.headers;
    // Envoy's SANITIZE_SET (Istio's gateway default): at the edge a client's own
    // x-forwarded-client-cert never goes upstream; a certificate the handshake verified is
    // described instead.
    remove_hop_by_hop_and(headers, upgrade, conn.edge.then_some(&X_FORWARDED_CLIENT_CERT));
    if conn.edge
        && let Some(xfcc) = &conn.client_cert
    {
        headers.insert(X_FORWARDED_CLIENT_CERT, xfcc.clone());
    }
    append_forwarded_for(headers, &conn.remote_ip);
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if conn.edge || !headers.contains_key(X_REQUEST_ID) {
        headers.insert(X_REQUEST_ID, request_id());
    }

    // The Host sent upstream: a rewrite, else what the client sent (`:authority` for HTTP/2).
    match forward.rewrite.as_ref().and_then(|r| r.authority.as_deref()) {
        Some(a) => {
            if let Ok(h) = HeaderValue::from_str(a) {
                headers.insert(header::HOST, h);
            }
        }
        None => {
            if let Some(h) = parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                headers.insert(header::HOST, h);
            }
        }
    }
    // Envoy's order: the destination's (weighted cluster's) edits, then the route's, so the
    // route-level value wins where both set a header — the same order as for responses.
    apply_header_ops(headers, &destination.request_headers);
    apply_header_ops(headers, route_headers);

    // HTTP/1.1 upstream requests use origin-form; HTTP/2 needs `:scheme` and `:authority`.
    parts.uri = if use_http2 {
        let authority = headers
            .get(header::HOST)
            .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
            .unwrap_or_else(|| cluster_authority(target.address.as_str()));
        let mut uri_parts = http::uri::Parts::default();
        // `:scheme` names the upstream connection's scheme: https when the cluster speaks TLS.
        uri_parts.scheme = Some(if cluster.tls.is_some() {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        });
        uri_parts.authority = Some(authority);
        uri_parts.path_and_query = Some(path_and_query);
        match Uri::from_parts(uri_parts) {
            Ok(u) => u,
            Err(_) => return local_reply(StatusCode::BAD_REQUEST, ""),
        }
    } else {
        Uri::from(path_and_query)
    };
    parts.version = if use_http2 { Version::HTTP_2 } else { Version::HTTP_11 };
    let mut body = body;
    if !mirroring.mirrors.is_empty() {
        let prepared = mirroring.prepare(&parts);
        if !prepared.is_empty() {
            if hyper::body::Body::is_end_stream(&body) {
                dispatch_mirrors(prepared, bytes::Bytes::new());
            } else {
                // Sent once the whole body has gone by (copied up to the buffer limit).
                body = UpstreamBody::Teed(Box::new(body::MirrorTee::new(body, move |copy| {
                    dispatch_mirrors(prepared, copy)
                })));
            }
        }
    }

    // Upgrades are never retried: the tunnel's bytes cannot be replayed.
    let policy = match &forward.retry {
        Some(policy) if !upgrade => policy,
        _ => {
            // Without retries, one upstream try is the whole request: the shorter timeout applies.
            let timeout = match (forward.timeout, forward.backend_timeout) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let outcome = send_try(conn, cluster, &target, use_http2, &mut parts, body, timeout).await;
            let hash_cookie = hash_cookie.filter(|_| outcome.is_ok());
            let mut resp = finish(outcome, cluster, stats, downstream_upgrade, flavor);
            add_hash_cookie(&mut resp, hash_cookie);
            return resp;
        }
    };

    let mut retrying = Retrying {
        policy,
        cluster,
        per_try_timeout: match (policy.per_try_timeout, forward.backend_timeout) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        deadline: forward.timeout.map(|t| Instant::now() + t),
        body: if hyper::body::Body::is_end_stream(&body) {
            ReplaySource::Empty
        } else {
            ReplaySource::Body(ReplayableBody::new(body))
        },
        retries: 0,
        tried: Vec::new(),
        budget: None,
        overflowed: false,
    };
    let mut target = target;
    loop {
        let Some(timeout) = retrying.try_timeout() else {
            return failure_reply(stats, flavor, Failure::Timeout);
        };
        let body = retrying.body.next_try();
        let outcome = send_try(conn, cluster, &target, use_http2, &mut parts, body, timeout).await;
        let retriable = match &outcome {
            Ok((resp, _)) => policy.retries_response(resp.status().as_u16(), grpc_status(resp.headers())),
            Err(TryError::Timeout) if retrying.deadline_passed() => {
                return failure_reply(stats, flavor, Failure::Timeout);
            }
            Err(TryError::Timeout) => {
                cluster.stats.per_try_timeouts.fetch_add(1, Relaxed);
                policy.retries_failure(TryFailure::PerTryTimeout)
            }
            Err(TryError::Upstream(e)) => e.failure().is_some_and(|f| policy.retries_failure(f)),
        };
        if !retriable || !retrying.admit_retry() {
            if retrying.retries > 0 && !retriable && outcome.is_ok() {
                cluster.stats.retry_successes.fetch_add(1, Relaxed);
            }
            let exhausted = retriable && retrying.retries >= policy.num_retries;
            let hash_cookie = hash_cookie.filter(|_| outcome.is_ok());
            let mut resp = finish(outcome, cluster, stats, None, flavor);
            add_hash_cookie(&mut resp, hash_cookie);
            if exhausted {
                ResponseFlags::mark(&mut resp, ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED);
            } else if retrying.overflowed {
                // As Envoy: the failed try's outcome, marked as a retry overflow.
                ResponseFlags::mark(&mut resp, ResponseFlags::UPSTREAM_OVERFLOW);
            }
            return resp;
        }
        // The failed response is dropped unread, which closes its connection, as Envoy resets
        // the upstream stream of a try it retries.
        drop(outcome);
        if Box::pin(retrying.back_off()).await.is_err() {
            return failure_reply(stats, flavor, Failure::Timeout);
        }
        if let Some(i) = target.endpoint {
            retrying.tried.push(i);
            // Istio leaves the previous-hosts predicate out for consistent hashing: a retry
            // stays on the endpoint the key maps to.
            let consistent_hash = matches!(cluster.config.load_balancer, LoadBalancer::ConsistentHash(_));
            let avoid = policy.avoid_previous_hosts && !consistent_hash;
            if let Some(next) = retrying.next_endpoint(hash, avoid) {
                target = Target::endpoint(cluster, next);
            }
        }
    }
}

/// Where a try goes.
struct Target {
    pool: Arc<EndpointPool>,
    /// `host:port` to connect to (cloned from the endpoint without an allocation).
    address: http::uri::Authority,
    /// Index in the cluster's endpoints; `None` for original-destination clusters.
    endpoint: Option<usize>,
}

impl Target {
    fn endpoint(cluster: &ClusterRuntime, i: usize) -> Self {
        Target {
            pool: cluster.pool(i).clone(),
            address: cluster.endpoints[i].authority.clone(),
            endpoint: Some(i),
        }
    }
}

/// Why a try ended without a response.
enum TryError {
    Upstream(UpstreamError),
    /// The try's time ran out: its per-try timeout, or the route's overall one.
    Timeout,
}

type TryResult = Result<(Response<UpstreamResponseBody>, RequestSlot), TryError>;

/// Sends one try upstream and waits for its response headers. With access logs on, the
/// response records where it came from. The request head is borrowed, so tries after the
/// first need no copy of it for HTTP/1.1.
async fn send_try(
    conn: &Connection,
    cluster: &ClusterRuntime,
    target: &Target,
    use_http2: bool,
    parts: &mut http::request::Parts,
    body: UpstreamBody,
    timeout: Option<Duration>,
) -> TryResult {
    cluster.stats.requests.fetch_add(1, Relaxed);
    let _in_flight = InFlight::start(cluster, target.endpoint);
    let logged = conn.shared.access_log.is_some().then(|| UpstreamHost {
        address: target.address.as_str().to_string(),
        request_id: parts
            .headers
            .get(X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    // TLS: the server name for this request, and the pool of connections opened with it.
    let mut tls_pool = None;
    let tls = match &cluster.tls {
        None => None,
        Some(_) => {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or(target.address.as_str());
            let tls = cluster.tls_target(use_http2, host).map_err(TryError::Upstream)?;
            if let Some(t) = &tls {
                tls_pool = Some(cluster.pool_for_tls(&target.pool, target.address.as_str(), t));
            }
            tls
        }
    };
    let pool = tls_pool.as_ref().unwrap_or(&target.pool);
    // `None`: the try's time ran out. The branches are spelled out rather than wrapped in one
    // async block, which would nest (and copy) the send future once more.
    let result = if use_http2 {
        let req = Request::from_parts(clone_parts(parts), body);
        let sent = Box::pin(pool.send_http2(target.address.as_str(), &cluster.stats, req, tls.as_ref()));
        match timeout {
            Some(t) => tokio::time::timeout(t, sent).await.ok(),
            None => Some(sent.await),
        }
    } else {
        let sent = pool.send_http1(target.address.as_str(), &cluster.stats, parts, body, tls.as_ref());
        match timeout {
            Some(t) => tokio::time::timeout(t, sent).await.ok(),
            None => Some(sent.await),
        }
    };
    if let (Some(outlier), Some(endpoint)) = (&cluster.outlier, target.endpoint) {
        let outcome = match &result {
            Some(Ok((resp, _))) => Some(TryOutcome::Status(resp.status().as_u16())),
            // A breaker's refusal says nothing about the endpoint.
            Some(Err(UpstreamError::Overflow(_))) => None,
            Some(Err(_)) | None => Some(TryOutcome::LocalFailure),
        };
        if let Some(outcome) = outcome {
            outlier.record(endpoint, outcome, &cluster.stats);
        }
    }
    match result {
        Some(Ok(mut sent)) => {
            if let Some(host) = logged {
                sent.0.extensions_mut().insert(host);
            }
            Ok(sent)
        }
        Some(Err(e)) => Err(TryError::Upstream(e)),
        None => Err(TryError::Timeout),
    }
}

/// The downstream response for the last try: the upstream's response as-is, or Envoy's local
/// reply for a failure without one.
fn finish(
    outcome: TryResult,
    cluster: &ClusterRuntime,
    stats: &RouteStats,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    flavor: ListenerFlavor,
) -> Response<ResponseBody> {
    let (mut resp, pool_return) = match outcome {
        Ok(r) => r,
        Err(TryError::Timeout) => return failure_reply(stats, flavor, Failure::Timeout),
        Err(TryError::Upstream(e)) => {
            tracing::debug!(cluster = %cluster.config.name, error = ?e, "upstream request failed");
            let failure = match e {
                UpstreamError::Overflow(_) => Failure::Overflow,
                UpstreamError::Connect(_) => Failure::Connect,
                UpstreamError::ConnectTimeout => Failure::ConnectTimeout,
                UpstreamError::Reset(_) | UpstreamError::RefusedStream(_) => Failure::Reset,
            };
            return failure_reply(stats, flavor, failure);
        }
    };
    stats.record(resp.status().as_u16());

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection now belongs to the tunnel, never to the pool.
        drop(pool_return);
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(down), Ok(up)) = (downstream.await, upstream.await) {
                    let mut down = hyper_util::rt::TokioIo::new(down);
                    let mut up = hyper_util::rt::TokioIo::new(up);
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
        return resp.map(|_| body::empty());
    }
    remove_hop_by_hop(resp.headers_mut(), false);
    resp.map(|b| ResponseBody::upstream(b, Some(pool_return)))
}

/// Why a request got no upstream response.
#[derive(Clone, Copy)]
enum Failure {
    NoHealthyUpstream,
    Connect,
    ConnectTimeout,
    Reset,
    Overflow,
    Timeout,
}

/// The local reply for a failure, counted for the route: Envoy's status and text, or on a Kong
/// listener what Kong (nginx) answers: 502 for a failed or broken connection, 504 for a
/// timeout, 503 when the balancer has no target.
fn failure_reply(stats: &RouteStats, flavor: ListenerFlavor, failure: Failure) -> Response<ResponseBody> {
    let (status, envoy_text, kong_message, flag) = match failure {
        Failure::NoHealthyUpstream => (
            StatusCode::SERVICE_UNAVAILABLE,
            NO_HEALTHY_UPSTREAM,
            "failure to get a peer from the ring-balancer",
            ResponseFlags::NO_HEALTHY_UPSTREAM,
        ),
        Failure::Connect => (
            StatusCode::SERVICE_UNAVAILABLE,
            CONNECT_FAILURE,
            KONG_BAD_GATEWAY,
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        ),
        // nginx answers 504 when `proxy_connect_timeout` expires.
        Failure::ConnectTimeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            CONNECT_FAILURE,
            KONG_TIMEOUT,
            ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        ),
        Failure::Reset => (
            StatusCode::SERVICE_UNAVAILABLE,
            CONNECTION_TERMINATION,
            KONG_BAD_GATEWAY,
            ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        ),
        Failure::Overflow => (
            StatusCode::SERVICE_UNAVAILABLE,
            OVERFLOW,
            OVERFLOW,
            ResponseFlags::UPSTREAM_OVERFLOW,
        ),
        Failure::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            UPSTREAM_TIMEOUT,
            KONG_TIMEOUT,
            ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        ),
    };
    let resp = if flavor == ListenerFlavor::Kong {
        let status = match failure {
            Failure::Connect | Failure::Reset => StatusCode::BAD_GATEWAY,
            Failure::ConnectTimeout => StatusCode::GATEWAY_TIMEOUT,
            _ => status,
        };
        kong_message_reply(status, kong_message)
    } else {
        local_reply(status, envoy_text)
    };
    stats.record(resp.status().as_u16());
    flagged(resp, flag)
}

/// Kong's 502 text (its `S502_MESSAGE`).
const KONG_BAD_GATEWAY: &str = "An invalid response was received from the upstream server";
/// Kong's 504 text.
const KONG_TIMEOUT: &str = "The upstream server is timing out";

/// Kong's JSON error body, `{"message":"..."}`, in the layout of its other errors.
fn kong_message_reply(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let mut resp = local_reply(status, "");
    let body = format!("{{\n  \"message\":{}\n}}", serde_json::Value::from(message));
    *resp.body_mut() = body::full(bytes::Bytes::from(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

/// True for `per_million` of a million calls.
fn chance(per_million: u32) -> bool {
    per_million >= 1_000_000 || fastrand::u32(..1_000_000) < per_million
}

/// The reply of an injected abort, as Envoy's fault filter makes it: the status with body
/// `fault filter abort`, or for gRPC an HTTP 200 trailers-only response with `grpc-status`.
fn fault_abort(abort: FaultAbort) -> Response<ResponseBody> {
    const BODY: &str = "fault filter abort";
    match abort {
        FaultAbort::Http(status) => local_reply(
            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            BODY,
        ),
        FaultAbort::Grpc(code) => {
            let mut resp = Response::new(body::empty());
            let headers = resp.headers_mut();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert(GRPC_STATUS, HeaderValue::from(code));
            headers.insert("grpc-message", HeaderValue::from_static(BODY));
            resp
        }
    }
}

/// The 404 for a request no route matches: Envoy's empty one, or Kong's JSON message.
fn no_route(flavor: ListenerFlavor) -> Response<ResponseBody> {
    let resp = if flavor == ListenerFlavor::Kong {
        kong_message_reply(StatusCode::NOT_FOUND, "no Route matched with those values")
    } else {
        local_reply(StatusCode::NOT_FOUND, "")
    };
    flagged(resp, ResponseFlags::NO_ROUTE)
}

/// `resp` marked with response `flags` (for access logs and metrics).
fn flagged(mut resp: Response<ResponseBody>, flags: ResponseFlags) -> Response<ResponseBody> {
    ResponseFlags::mark(&mut resp, flags);
    resp
}

/// The request as each try sends it (hyper consumes the request it sends).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// The gRPC status of a trailers-only response (the status in the headers).
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The request body as tries send it.
enum ReplaySource {
    /// No body: every try sends an empty one.
    Empty,
    Body(ReplayableBody),
}

impl ReplaySource {
    fn next_try(&self) -> UpstreamBody {
        match self {
            ReplaySource::Empty => UpstreamBody::Buffered(http_body_util::Full::new(bytes::Bytes::new())),
            ReplaySource::Body(b) => b.next_try(),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            ReplaySource::Empty => true,
            ReplaySource::Body(b) => b.replayable(),
        }
    }
}

/// Envoy's default `host_selection_retry_max_attempts` in Istio: how often a retry re-picks
/// an endpoint that was already tried before taking another one.
const HOST_SELECTION_ATTEMPTS: usize = 5;

/// State of one request on a route with a retry policy.
struct Retrying<'a> {
    policy: &'a RetryPolicy,
    cluster: &'a ClusterRuntime,
    per_try_timeout: Option<Duration>,
    /// End of the route's overall timeout, which bounds every try and backoff.
    deadline: Option<Instant>,
    body: ReplaySource,
    /// Retries admitted so far.
    retries: u32,
    /// Endpoints tried so far (empty until the first retry, so no allocation before).
    tried: Vec<usize>,
    /// The admitted retry, counted against the budget until the next one or the end.
    budget: Option<RetryInFlight<'a>>,
    /// A retry was refused by `max_retries` or the budget (the response gets `UO`).
    overflowed: bool,
}

impl Retrying<'_> {
    /// The next try's timeout; `None` when the route's deadline has already passed.
    fn try_timeout(&self) -> Option<Option<Duration>> {
        let Some(deadline) = self.deadline else {
            return Some(self.per_try_timeout);
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        Some(Some(self.per_try_timeout.map_or(left, |t| t.min(left))))
    }

    fn deadline_passed(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether another try may be sent: retries left, the body still replayable, and room in
    /// the cluster's retry budget (else the last outcome stands, counted as an overflow).
    fn admit_retry(&mut self) -> bool {
        if self.retries >= self.policy.num_retries || !self.body.replayable() {
            return false;
        }
        self.budget = None;
        let Some(admitted) = RetryInFlight::admit(self.cluster, self.policy.budget) else {
            self.cluster.stats.retry_overflows.fetch_add(1, Relaxed);
            self.cluster.stats.overflows[Breaker::Retries as usize].fetch_add(1, Relaxed);
            self.overflowed = true;
            return false;
        };
        self.budget = Some(admitted);
        self.retries += 1;
        self.cluster.stats.retries.fetch_add(1, Relaxed);
        true
    }

    /// Waits Envoy's jittered exponential backoff before retry number `self.retries`: a random
    /// time up to `(2^n - 1) * base`, capped at the policy's maximum. `Err` when the route's
    /// deadline comes first (after waiting for it).
    async fn back_off(&self) -> Result<(), ()> {
        let wait = backoff_ceiling(self.policy, self.retries).mul_f64(fastrand::f64());
        match self.deadline {
            Some(d) if Instant::now() + wait >= d => {
                tokio::time::sleep_until(d).await;
                Err(())
            }
            _ => {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                Ok(())
            }
        }
    }

    /// The endpoint for the next try. With `avoid_tried` (Envoy's `previous_hosts` predicate)
    /// the balancer is asked again up to [`HOST_SELECTION_ATTEMPTS`] times for one not tried
    /// yet; if it keeps answering tried ones, the first untried endpoint is taken, so a retry
    /// never lands on a failed endpoint while another is left.
    fn next_endpoint(&self, hash: Option<u64>, avoid_tried: bool) -> Option<usize> {
        let mut pick = self.cluster.pick(hash)?;
        if !avoid_tried {
            return Some(pick);
        }
        for _ in 1..HOST_SELECTION_ATTEMPTS {
            if !self.tried.contains(&pick) {
                return Some(pick);
            }
            pick = self.cluster.pick(hash)?;
        }
        if !self.tried.contains(&pick) {
            return Some(pick);
        }
        Some(
            (0..self.cluster.endpoints.len())
                .find(|i| !self.tried.contains(i))
                .unwrap_or(pick),
        )
    }
}

/// The longest backoff before retry number `retry` (1 for the first): `(2^n - 1) * base`,
/// capped at the policy's maximum.
fn backoff_ceiling(policy: &RetryPolicy, retry: u32) -> Duration {
    let factor = (1u32 << retry.min(16)) - 1;
    policy.backoff_base.saturating_mul(factor).min(policy.backoff_max)
}

/// A retry counted against its cluster's retry budget while alive.
struct RetryInFlight<'a>(&'a ClusterRuntime);

impl<'a> RetryInFlight<'a> {
    /// Counts a retry in flight; `None` when the cluster's `max_retries` circuit breaker or
    /// `budget` has no room for it (a retry must pass both).
    fn admit(cluster: &'a ClusterRuntime, budget: Option<RetryBudget>) -> Option<Self> {
        let before = cluster.stats.retries_active.fetch_add(1, Relaxed);
        let over_breaker = before >= u64::from(cluster.config.pool.max_retries);
        let over_budget = budget.is_some_and(|budget| {
            let active = cluster.stats.requests_active.load(Relaxed);
            before >= (active * u64::from(budget.percent) / 100).max(u64::from(budget.min_concurrency))
        });
        if over_breaker || over_budget {
            cluster.stats.retries_active.fetch_sub(1, Relaxed);
            return None;
        }
        Some(RetryInFlight(cluster))
    }
}

impl Drop for RetryInFlight<'_> {
    fn drop(&mut self) {
        self.0.stats.retries_active.fetch_sub(1, Relaxed);
    }
}

/// The route's request mirrors and the clusters they point at.
struct Mirroring<'a> {
    mirrors: &'a [Mirror],
    clusters: &'a [Arc<ClusterRuntime>],
}

/// A mirror copy ready to go once its body is known.
struct PreparedMirror {
    cluster: Arc<ClusterRuntime>,
    address: String,
    pool: Arc<crate::upstream::pool::EndpointPool>,
    parts: http::request::Parts,
    /// The primary request's Host: the TLS server name, where the copy's Host says `-shadow`.
    server_host: Option<String>,
}

impl Mirroring<'_> {
    /// Chooses the mirrors this request goes to (each with its configured probability) and
    /// prepares their requests: the request as it goes upstream, its Host with Envoy's
    /// `-shadow` suffix.
    fn prepare(&self, parts: &http::request::Parts) -> Vec<PreparedMirror> {
        let mut prepared = Vec::new();
        for mirror in self.mirrors {
            let (num, den) = mirror.fraction;
            if num < den && fastrand::u32(..den.max(1)) >= num {
                continue;
            }
            let Some(cluster) = self.clusters.get(mirror.cluster).cloned() else {
                continue;
            };
            let Some(endpoint) = cluster.pick(None) else { continue };
            let address = cluster.endpoints[endpoint].authority.as_str().to_string();
            let pool = cluster.pool(endpoint).clone();
            let mut req = Request::new(());
            *req.method_mut() = parts.method.clone();
            *req.headers_mut() = parts.headers.clone();
            *req.version_mut() = Version::HTTP_11;
            *req.uri_mut() = match parts.uri.path_and_query() {
                Some(pq) => Uri::from(pq.clone()),
                None => Uri::from_static("/"),
            };
            if let Some(host) = parts.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
                let shadow = match host.rsplit_once(':') {
                    Some((h, p)) if p.parse::<u16>().is_ok() => format!("{h}-shadow:{p}"),
                    _ => format!("{host}-shadow"),
                };
                if let Ok(v) = HeaderValue::from_str(&shadow) {
                    req.headers_mut().insert(header::HOST, v);
                }
            }
            prepared.push(PreparedMirror {
                cluster,
                address,
                pool,
                parts: req.into_parts().0,
                server_host: parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string),
            });
        }
        prepared
    }
}

/// Sends the mirror copies, fire-and-forget: their responses, failures or slowness never
/// touch the primary request.
fn dispatch_mirrors(prepared: Vec<PreparedMirror>, body: bytes::Bytes) {
    for mirror in prepared {
        let PreparedMirror {
            cluster,
            address,
            pool,
            mut parts,
            server_host,
        } = mirror;
        if !body.is_empty() {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            parts.headers.remove(header::TRANSFER_ENCODING);
        }
        let body = UpstreamBody::Buffered(http_body_util::Full::new(body.clone()));
        tokio::spawn(async move {
            cluster.stats.requests.fetch_add(1, Relaxed);
            let http2 = cluster.config.protocol == UpstreamProtocol::Http2;
            // The copy's Host carries `-shadow`; the connection is to the primary's host.
            let tls = match cluster.tls.is_some().then_some(server_host.as_deref()).flatten() {
                None => Ok(None),
                Some(host) => cluster.tls_target(http2, host),
            };
            let tls = match tls {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(cluster = %cluster.config.name, error = ?e, "mirror request failed");
                    return;
                }
            };
            let pool = match &tls {
                Some(t) => cluster.pool_for_tls(&pool, &address, t),
                None => pool,
            };
            let sent = if http2 {
                // gRPC and other HTTP/2 clusters get the copy in HTTP/2, with an absolute URI.
                let authority = parts
                    .headers
                    .get(header::HOST)
                    .and_then(|h| http::uri::Authority::try_from(h.as_bytes()).ok())
                    .unwrap_or_else(|| cluster_authority(&address));
                let mut uri = http::uri::Parts::default();
                uri.scheme = Some(if cluster.tls.is_some() {
                    Scheme::HTTPS
                } else {
                    Scheme::HTTP
                });
                uri.authority = Some(authority);
                uri.path_and_query = parts.uri.path_and_query().cloned();
                let Ok(uri) = Uri::from_parts(uri) else { return };
                parts.uri = uri;
                parts.version = Version::HTTP_2;
                let req = Request::from_parts(parts, body);
                tokio::time::timeout(
                    MIRROR_TIMEOUT,
                    pool.send_http2(&address, &cluster.stats, req, tls.as_ref()),
                )
                .await
            } else {
                tokio::time::timeout(
                    MIRROR_TIMEOUT,
                    pool.send_http1(&address, &cluster.stats, &mut parts, body, tls.as_ref()),
                )
                .await
            };
            match sent {
                Ok(Ok((resp, ret))) => {
                    // Drain the mirror's response so its connection can be reused.
                    let body = ResponseBody::upstream(resp.into_body(), Some(ret));
                    let _ = tokio::time::timeout(MIRROR_TIMEOUT, http_body_util::BodyExt::collect(body)).await;
                }
                Ok(Err(e)) => tracing::debug!(cluster = %cluster.config.name, error = ?e, "mirror request failed"),
                Err(_) => tracing::debug!(cluster = %cluster.config.name, "mirror request timed out"),
            }
        });
    }
}

/// How long a mirror copy may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Where an original-destination (PASSTHROUGH) request goes: the authority the client asked
/// for, port 80 by default. (Envoy's `x-envoy-original-dst-host` header is not honoured: any
/// client could use it to reach any host.)
fn original_destination<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    let target = request_authority(req)?;
    let has_port = target
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && !p.contains(']'));
    let target = if has_port {
        target.to_string()
    } else {
        format!("{target}:80")
    };
    http::uri::Authority::try_from(target).ok()
}

fn cluster_authority(address: &str) -> http::uri::Authority {
    http::uri::Authority::try_from(address).unwrap_or_else(|_| http::uri::Authority::from_static("upstream"))
}

/// For a chunked HTTP/1 request, reads the first body frame before anything is sent
/// upstream, so broken chunk framing is answered with 400 instead of reaching the upstream.
/// Bodies with a length, and HTTP/2 bodies, are streamed without waiting.
async fn checked_chunked_body(parts: &http::request::Parts, mut body: DownstreamBody) -> Result<UpstreamBody, ()> {
    use hyper::body::Body;
    let chunked = parts.version <= Version::HTTP_11 && parts.headers.contains_key(header::TRANSFER_ENCODING);
    if !chunked || body.is_end_stream() {
        return Ok(UpstreamBody::Streaming(body));
    }
    match http_body_util::BodyExt::frame(&mut body).await {
        Some(Ok(first)) => Ok(UpstreamBody::Prefixed {
            first: Some(first),
            rest: body,
        }),
        None => Ok(UpstreamBody::Streaming(body)),
        Some(Err(_)) => Err(()),
    }
}

/// Keeps the endpoint's and cluster's in-flight counts right however the request ends.
struct InFlight<'a> {
    cluster: &'a ClusterRuntime,
    endpoint: Option<usize>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.cluster.stats.requests_active.fetch_sub(1, Relaxed);
        if let Some(i) = self.endpoint {
            self.cluster.endpoints[i].active.fetch_sub(1, Relaxed);
        }
    }
}

impl<'a> InFlight<'a> {
    fn start(cluster: &'a ClusterRuntime, endpoint: Option<usize>) -> Self {
        cluster.stats.requests_active.fetch_add(1, Relaxed);
        if let Some(i) = endpoint {
            cluster.endpoints[i].active.fetch_add(1, Relaxed);
        }
        InFlight { cluster, endpoint }
    }
}

fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_tokens(req.headers()).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim).filter(|t| !t.is_empty()))
}

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Whether `name` is one of the hop-by-hop headers RFC 9110 §7.6.1 names.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Removes hop-by-hop headers: those RFC 9110 §7.6.1 names and any listed in `Connection`.
/// `TE: trailers` survives (gRPC needs it); an upgrade keeps `Connection`/`Upgrade`.
pub(crate) fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_hop_by_hop_and(headers, keep_upgrade, None);
}

/// [`remove_hop_by_hop`], also removing `extra`, found in the same pass over the names.
fn remove_hop_by_hop_and(headers: &mut HeaderMap, keep_upgrade: bool, extra: Option<&HeaderName>) {
    // Most messages carry none: one pass over the names instead of a lookup per name.
    let (mut hop_by_hop, mut has_extra) = (false, false);
    for name in headers.keys() {
        hop_by_hop |= is_hop_by_hop(name);
        has_extra |= extra == Some(name);
    }
    if let (true, Some(extra)) = (has_extra, extra) {
        headers.remove(extra);
    }
    if !hop_by_hop {
        return;
    }
    if headers.contains_key(header::CONNECTION) {
        let listed: Vec<HeaderName> = connection_tokens(headers)
            .filter(|t| !(keep_upgrade && t.eq_ignore_ascii_case("upgrade")))
            // `close` and `keep-alive` name no header worth a lookup (the latter goes below).
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .filter(|n| n != header::TE)
            .collect();
        for name in listed {
            headers.remove(name);
        }
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            headers.remove(header::CONNECTION);
        }
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, header::TRANSFER_ENCODING] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if let Some(te) = headers.get(header::TE) {
        if te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            return;
        }
        let trailers = te
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        } else {
            headers.remove(header::TE);
        }
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, remote_ip: &HeaderValue) {
    let value = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if !existing.is_empty() => {
            let joined = format!("{existing}, {}", remote_ip.to_str().unwrap_or(""));
            HeaderValue::from_str(&joined).unwrap_or_else(|_| remote_ip.clone())
        }
        _ => remote_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, value);
}

const X_KONG_REQUEST_ID: HeaderName = HeaderName::from_static("x-kong-request-id");

/// Kong's request id: 32 hex digits, as nginx's `$request_id`.
fn kong_request_id() -> HeaderValue {
    let text = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The upstream headers Kong sets (its "Upstream headers"), for a client it does not trust
/// (Kong's default, no `trusted_ips`): `X-Real-IP`, `X-Forwarded-Host` (the client's host),
/// `X-Forwarded-Port` (the listener's), `X-Forwarded-Path`, and `X-Kong-Request-Id`, whose
/// value is returned for the response; a client's `X-Forwarded-Prefix` is dropped, as Kong
/// only passes it from trusted addresses. (`X-Forwarded-For` and `-Proto` are set for every
/// listener.)
fn kong_upstream_headers<B>(
    req: &mut Request<B>,
    remote_ip: &HeaderValue,
    host: &str,
    path: Option<HeaderValue>,
    port: u16,
) -> HeaderValue {
    let id = kong_request_id();
    let headers = req.headers_mut();
    headers.insert(HeaderName::from_static("x-real-ip"), remote_ip.clone());
    if let Ok(h) = HeaderValue::from_str(host) {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    headers.insert(HeaderName::from_static("x-forwarded-port"), HeaderValue::from(port));
    if let Some(path) = path {
        headers.insert(HeaderName::from_static("x-forwarded-path"), path);
    }
    headers.remove("x-forwarded-prefix");
    headers.insert(X_KONG_REQUEST_ID, id.clone());
    id
}

/// A random (version 4) UUID, the form Envoy generates for `x-request-id`.
fn request_id() -> HeaderValue {
    HeaderValue::from_bytes(&crate::uuid::v4_bytes()).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// Replaces the part of `path` a prefix match matched (the whole path after other matches),
/// as Istio's `rewrite.uri` and Gateway API's `ReplacePrefixMatch` do.
fn replace_matched(path: &str, matched: Option<&RequestMatch>, replacement: &str) -> String {
    match matched.and_then(|m| m.path.as_ref()) {
        Some(m) => match &m.matcher {
            StringMatch::Prefix(prefix) if path.len() >= prefix.len() => {
                let prefix_len = if m.segment_prefix {
                    prefix.trim_end_matches('/').len()
                } else {
                    prefix.len()
                };
                let rest = &path[prefix_len..];
                if m.segment_prefix && replacement.ends_with('/') && rest.starts_with('/') {
                    format!("{replacement}{}", &rest[1..])
                } else if m.segment_prefix && rest.is_empty() && replacement.is_empty() {
                    "/".to_string()
                } else {
                    format!("{replacement}{rest}")
                }
            }
            _ => replacement.to_string(),
        },
        None => replacement.to_string(),
    }
}

/// Kong's upstream path: the request path, less the matched prefix (or regex match) with
/// `strip_path`, joined to the service's path. `path_handling` v0 puts a `/` between them
/// when neither has one; v1 concatenates; both collapse the `//` the join would produce.
fn kong_upstream_path(
    path: &str,
    matched: Option<&RequestMatch>,
    service_path: &str,
    strip: bool,
    strip_regex: Option<&meshgate_model::Regex>,
    legacy_concat: bool,
) -> String {
    let rest = if !strip {
        path
    } else if let Some(re) = strip_regex {
        re.find(path).map_or(path, |m| &path[m.end()..])
    } else {
        match matched.and_then(|m| m.path.as_ref()).map(|p| &p.matcher) {
            Some(StringMatch::Prefix(prefix)) if path.starts_with(prefix.as_str()) => &path[prefix.len()..],
            _ => path,
        }
    };
    let base = if service_path.is_empty() { "/" } else { service_path };
    if rest.is_empty() {
        return base.to_string();
    }
    match (base.ends_with('/'), rest.starts_with('/')) {
        (true, true) => format!("{base}{}", &rest[1..]),
        (false, false) if !legacy_concat => format!("{base}/{rest}"),
        _ => format!("{base}{rest}"),
    }
}

/// The path and query sent upstream after `rewrite.uri` / `uriRegexRewrite`.
fn rewritten_path(uri: &Uri, forward: &Forward, matched: Option<&RequestMatch>) -> PathAndQuery {
    let original = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let Some(rewrite) = forward.rewrite.as_ref().and_then(|r| r.path.as_ref()) else {
        return original;
    };
    let path = original.path();
    let new_path: String = match rewrite {
        PathRewrite::Full(p) => p.clone(),
        PathRewrite::ReplaceMatched(replacement) => replace_matched(path, matched, replacement),
        PathRewrite::Regex { pattern, substitution } => pattern.replace_all(path, substitution.as_str()).into_owned(),
        PathRewrite::Kong {
            service_path,
            strip,
            strip_regex,
            legacy_concat,
        } => kong_upstream_path(
            path,
            matched,
            service_path,
            *strip,
            strip_regex.as_ref(),
            *legacy_concat,
        ),
    };
    let new_path = if new_path.is_empty() { "/".to_string() } else { new_path };
    let full = match original.query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    PathAndQuery::try_from(full).unwrap_or(original)
}

fn redirect_location<B>(
    r: &Redirect,
    req: &Request<B>,
    scheme: &str,
    host: &str,
    listener_port: u16,
    matched: Option<&RequestMatch>,
) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(scheme);
    let authority = request_authority(req).unwrap_or("");
    let request_port = authority
        .rsplit_once(':')
        .and_then(|(h, p)| (!h.ends_with(']') || p.parse::<u16>().is_ok()).then_some(p))
        .and_then(|p| p.parse::<u16>().ok());
    let host = r.authority.as_deref().unwrap_or(host);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = match &r.port {
        Some(RedirectPort::Fixed(p)) => Some(*p),
        Some(RedirectPort::FromProtocolDefault) => None,
        Some(RedirectPort::FromRequestPort) => Some(request_port.unwrap_or(listener_port)),
        // Without a port directive the port is kept unless the scheme changes.
        None if r.scheme.is_some() => None,
        None => request_port,
    };
    let port = port.filter(|p| *p != default_port);
    let replaced_prefix = r
        .replace_prefix
        .as_deref()
        .map(|replacement| replace_matched(req.uri().path(), matched, replacement));
    let path = match replaced_prefix.as_ref().or(r.path.as_ref()) {
        Some(p) => {
            if p.contains('?') {
                p.clone()
            } else {
                match (matched.and_then(|m| m.path.as_ref()), req.uri().query()) {
                    (_, Some(q)) => format!("{p}?{q}"),
                    _ => p.clone(),
                }
            }
        }
        None => req.uri().path_and_query().map_or("/", PathAndQuery::as_str).to_string(),
    };
    match port {
        Some(p) => format!("{scheme}://{host}:{p}{path}"),
        None => format!("{scheme}://{host}{path}"),
    }
}

/// The consistent-hash key of a request, and the `Set-Cookie` to send back when the key is a
/// cookie the proxy made because the request had none.
/// `None` when the request has no such value; `matched` is the route match (for regex
/// captures).
fn request_hash<B>(
    key: &HashKey,
    req: &Request<B>,
    conn: &Connection,
    matched: Option<&RequestMatch>,
) -> (Option<u64>, Option<HeaderValue>) {
    use std::hash::{Hash, Hasher};
    let digest = |value: &dyn Fn(&mut std::collections::hash_map::DefaultHasher)| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value(&mut h);
        h.finish()
    };
    // The path the client sent, as Kong (nginx's `$uri`) reads it.
    let client_path = || {
        req.extensions()
            .get::<plugins::ClientPath>()
            .map_or(req.uri().path(), |p| p.0.as_str())
    };
    let hash = match key {
        HashKey::Header(name) => req
            .headers()
            .get(name.as_str())
            .map(|v| digest(&|h| v.as_bytes().hash(h))),
        HashKey::SourceIp => Some(digest(&|h| conn.remote.ip().to_canonical().hash(h))),
        HashKey::Cookie(cookie) => match request_cookie(req.headers(), &cookie.name) {
            Some(value) => Some(digest(&|h| value.hash(h))),
            None => {
                let Some(generate) = &cookie.generate else {
                    return (None, None);
                };
                let (value, set_cookie) = match generate.value {
                    // One value per downstream connection, as Envoy (from the client's address
                    // and the listener's): its requests race for the cookie and should all land
                    // on the endpoint it names.
                    GeneratedCookieValue::ConnectionDigest => {
                        let value = format!("{:016x}", digest(&|h| (conn.remote, conn.listener).hash(h)));
                        let set_cookie = format!("{}=\"{value}\"{}", cookie.name, generate.attributes);
                        (value, set_cookie)
                    }
                    GeneratedCookieValue::Uuid => {
                        let value = crate::uuid::v4();
                        let set_cookie = format!("{}={value}{}", cookie.name, generate.attributes);
                        (value, set_cookie)
                    }
                };
                let hash = digest(&|h| value.as_str().hash(h));
                return (Some(hash), HeaderValue::from_str(&set_cookie).ok());
            }
        },
        HashKey::QueryParameter(name) => req
            .uri()
            .query()
            .and_then(|q| {
                q.split('&')
                    .find_map(|p| p.strip_prefix(name.as_str())?.strip_prefix('='))
            })
            .map(|value| digest(&|h| value.hash(h))),
        HashKey::Path => {
            let path = crate::uri_decoding::nginx_normalized_path(client_path());
            Some(digest(&|h| path.as_str().hash(h)))
        }
        HashKey::QueryArgument(name) => {
            let mut values = crate::uri_decoding::query_argument_values(req.uri().query().unwrap_or(""), name);
            values.sort_unstable();
            (!values.is_empty()).then(|| digest(&|h| values.join(",").as_str().hash(h)))
        }
        HashKey::UriCapture(name) => uri_capture(matched, client_path(), name).map(|v| digest(&|h| v.hash(h))),
        HashKey::Consumer => req
            .extensions()
            .get::<plugins::AuthenticatedConsumer>()
            .and_then(plugins::AuthenticatedConsumer::id)
            .map(|id| digest(&|h| id.hash(h))),
        HashKey::FirstPresent(keys) => {
            for key in keys {
                let found = request_hash(key, req, conn, matched);
                if found.0.is_some() {
                    return found;
                }
            }
            // Kong hashes the empty string when the request has none of its inputs.
            Some(digest(&|h| "".hash(h)))
        }
    };
    (hash, None)
}

/// The named capture `name` of the route's regex path match on `path`. Kong looks captures up
/// by the configured string, so only named groups can be used.
fn uri_capture<'p>(matched: Option<&RequestMatch>, path: &'p str, name: &str) -> Option<&'p str> {
    let Some(StringMatch::Regex(regex)) = matched.and_then(|m| m.path.as_ref()).map(|p| &p.matcher) else {
        return None;
    };
    regex.captures(path)?.name(name).map(|c| c.as_str())
}

/// A cookie's value from the request's `Cookie` headers, without the double quotes RFC 6265
/// allows around it (so a cookie the proxy made, sent back quoted, hashes as it did). An empty
/// value counts as no cookie, as in Envoy.
fn request_cookie<'r>(headers: &'r HeaderMap, name: &str) -> Option<&'r str> {
    let value = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))?;
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    (!value.is_empty()).then_some(value)
}

/// Sends a cookie the proxy made for hashing with the upstream's response, as Envoy and
/// Kong do (never with a reply the proxy makes itself).
fn add_hash_cookie(resp: &mut Response<ResponseBody>, set_cookie: Option<HeaderValue>) {
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
}

/// Applies header edits in Envoy's order: remove, set, add.
pub fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
    if ops.is_empty() {
        return;
    }
    for name in &ops.remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &ops.set {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &ops.add {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
            headers.append(n, v);
        }
    }
}

/// A reply made by the proxy itself; a non-empty body is sent as `text/plain`.
pub fn local_reply(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(if text.is_empty() {
        body::empty()
    } else {
        body::full(text)
    });
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    resp
}

fn redirect_reply(status: StatusCode, location: &str) -> Response<ResponseBody> {
    let mut resp = local_reply(status, "");
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_is_a_v4_uuid() {
        let id = request_id();
        let id = id.to_str().expect("ascii");
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none() && h.get("keep-alive").is_none() && h.get(header::CONNECTION).is_none());
        assert_eq!(h.get(header::TE).map(|v| v.as_bytes()), Some(&b"trailers"[..]));
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn host_strips_port_and_lowercases() {
        assert_eq!(host_of("Example.COM:8080"), "example.com");
        assert_eq!(host_of("[::1]:80"), "[::1]");
        assert_eq!(host_of("plain"), "plain");
    }

    #[test]
    fn backoff_grows_exponentially_up_to_the_maximum() {
        let policy = RetryPolicy::istio_default();
        let ceilings: Vec<u128> = (1..=6).map(|n| backoff_ceiling(&policy, n).as_millis()).collect();
        assert_eq!(ceilings, [25, 75, 175, 250, 250, 250]);
        assert_eq!(backoff_ceiling(&policy, u32::MAX), Duration::from_millis(250));
    }

    fn test_cluster(endpoints: usize) -> ClusterRuntime {
        let config = meshgate_model::snapshot::Cluster {
            name: "c".into(),
            service: "s".into(),
            subset: String::new(),
            port: 80,
            protocol: UpstreamProtocol::Http1,
            load_balancer: LoadBalancer::RoundRobin,
            discovery: meshgate_model::snapshot::Discovery::Static,
            endpoints: (0..endpoints)
                .map(|i| meshgate_model::snapshot::Endpoint {
                    address: format!("127.0.0.{}", i + 1),
                    port: 80,
                    weight: 1,
                    labels: Default::default(),
                })
                .collect(),
            pool: Default::default(),
            outlier: None,
            health_check: None,
            tls: None,
        };
        ClusterRuntime::new(config, Default::default(), 1).expect("cluster")
    }

    #[test]
    fn retry_budget_is_a_fifth_of_active_requests_but_at_least_three() {
        let cluster = test_cluster(1);
        let budget = Some(RetryBudget::ENVOY_DEFAULT);
        let admitted: Vec<_> = (0..5).filter_map(|_| RetryInFlight::admit(&cluster, budget)).collect();
        assert_eq!(admitted.len(), 3);
        drop(admitted);
        assert_eq!(cluster.stats.retries_active.load(Relaxed), 0);
        cluster.stats.requests_active.store(50, Relaxed);
        let admitted: Vec<_> = (0..20).filter_map(|_| RetryInFlight::admit(&cluster, budget)).collect();
        assert_eq!(admitted.len(), 10);
        drop(admitted);
        let unbudgeted: Vec<_> = (0..20).filter_map(|_| RetryInFlight::admit(&cluster, None)).collect();
        assert_eq!(unbudgeted.len(), 20, "without a budget only num_retries bounds retries");
    }

    #[test]
    fn max_retries_caps_retries_in_flight_with_or_without_a_budget() {
        let mut cluster = test_cluster(1);
        cluster.config.pool.max_retries = 2;
        cluster.stats.requests_active.store(1000, Relaxed);
        for budget in [None, Some(RetryBudget::ENVOY_DEFAULT)] {
            let admitted: Vec<_> = (0..5).filter_map(|_| RetryInFlight::admit(&cluster, budget)).collect();
            assert_eq!(admitted.len(), 2, "budget {budget:?}");
        }
        assert_eq!(cluster.stats.retries_active.load(Relaxed), 0);
    }

    #[test]
    fn retries_pick_endpoints_not_tried_yet() {
        let cluster = test_cluster(3);
        let policy = RetryPolicy::istio_default();
        let mut retrying = Retrying {
            policy: &policy,
            cluster: &cluster,
            per_try_timeout: None,
            deadline: None,
            body: ReplaySource::Empty,
            retries: 0,
            tried: vec![0, 1],
            budget: None,
            overflowed: false,
        };
        for _ in 0..10 {
            assert_eq!(retrying.next_endpoint(None, true), Some(2));
        }
        retrying.tried.push(2);
        assert!(retrying.next_endpoint(None, true).is_some(), "all tried: any endpoint");
    }
}

#[cfg(test)]
mod replay_tests {
    use super::*;
    use http_body_util::BodyExt;

    fn source(bytes: &'static [u8]) -> UpstreamBody {
        UpstreamBody::Buffered(http_body_util::Full::new(bytes::Bytes::from_static(bytes)))
    }

    #[tokio::test]
    async fn every_try_sends_the_whole_body() {
        let body = ReplayableBody::new(source(b"hello"));
        for _ in 0..3 {
            let sent = body.next_try().collect().await.expect("body").to_bytes();
            assert_eq!(&sent[..], b"hello");
            assert!(body.replayable());
        }
    }

    #[tokio::test]
    async fn an_abandoned_try_can_no_longer_read() {
        let body = ReplayableBody::new(source(b"hello"));
        let mut first = body.next_try();
        let second = body.next_try();
        assert!(first.frame().await.expect("frame").is_err());
        assert_eq!(&second.collect().await.expect("body").to_bytes()[..], b"hello");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_replayable() {
        static BIG: [u8; body::REPLAY_BUFFER_LIMIT + 1] = [b'x'; body::REPLAY_BUFFER_LIMIT + 1];
        let body = ReplayableBody::new(source(&BIG));
        let sent = body.next_try().collect().await.expect("body").to_bytes();
        assert_eq!(sent.len(), BIG.len(), "the first try still gets all of it");
        assert!(!body.replayable());
    }
}
