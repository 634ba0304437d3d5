//! Per-worker upstream connection pools, one per endpoint.
//!
//! Each worker thread keeps its own idle HTTP/1.1 connections (and one multiplexed HTTP/2
//! connection) per endpoint, so checking a connection out touches no lock another core holds
//! and no hash map: the endpoint index chosen by the load balancer is the pool's index.
//! A connection goes back to its pool only when its response body has been read to the end;
//! a response abandoned half-way closes its connection, so it can never answer the next
//! request with the previous one's bytes.
//!
//! Circuit breakers follow Envoy and count across all workers (atomics in the cluster's
//! [`UpstreamStats`]): a request with no idle connection opens one while the cluster is under
//! `max_connections` (or this pool has none at all, as Envoy's pools do, so a worker is never
//! starved by another's idle connections), and waits as *pending* meanwhile; when no
//! connection may be opened it waits for one to be freed. Pending requests beyond
//! `max_pending_requests`, and requests beyond `max_requests` in flight (from sending until the
//! response body ends), fail at once with [`UpstreamError::Overflow`]. With Istio's defaults
//! (2^32-1) the fast path costs a compare per limit.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use http::{Request, Response};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use meshgate_model::snapshot::{ConnectionPoolSettings, TryFailure};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::connector::{ConnectionSlot, CountedStream, TlsTarget, Transport};
use super::http1::{self, ExchangeError, Http1Connection};
use crate::body::{UpstreamBody, UpstreamResponseBody};
use crate::stats::{Breaker, UpstreamStats};

/// Idle HTTP/1.1 connections kept per endpoint and worker; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Why an upstream request failed before a response arrived.
#[derive(Debug)]
pub enum UpstreamError {
    /// No connection could be made (Envoy's `UF`, "connection failure").
    Connect(String),
    /// No connection within `connectTimeout` (handshake included): a connection failure to
    /// Envoy, a timeout (504) to Kong.
    ConnectTimeout,
    /// The connection broke before response headers (Envoy's `UC`, "connection termination").
    Reset(String),
    /// The HTTP/2 upstream refused the stream (`REFUSED_STREAM`): it did not process the
    /// request, so it is safe to send again.
    RefusedStream(String),
    /// A circuit breaker refused the request (Envoy's `UO`); never retried, as in Envoy.
    Overflow(Breaker),
}

impl UpstreamError {
    /// The failure as retry conditions distinguish it.
    /// The failure as retry conditions distinguish it; `None` for an overflow, which no
    /// retry condition covers.
    pub fn failure(&self) -> Option<TryFailure> {
        match self {
            UpstreamError::Connect(_) | UpstreamError::ConnectTimeout => Some(TryFailure::ConnectFailure),
            UpstreamError::Reset(_) => Some(TryFailure::Reset),
            UpstreamError::RefusedStream(_) => Some(TryFailure::RefusedStream),
            UpstreamError::Overflow(_) => None,
        }
    }

    fn from_http2(e: hyper::Error) -> Self {
        // hyper does not expose h2's reason code; h2 names it in the error's text.
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(err) = source {
            if err.to_string().contains("refused stream") {
                return UpstreamError::RefusedStream(e.to_string());
            }
            source = err.source();
        }
        UpstreamError::Reset(e.to_string())
    }
}

/// The pool's multiplexed HTTP/2 connection.
struct Http2Conn {
    sender: http2::SendRequest<UpstreamBody>,
    /// The TLS server name it was opened with, if TLS.
    server_name: Option<ServerName<'static>>,
    opened: Instant,
    requests: u32,
    last_used: Instant,
}

#[derive(Default)]
struct Idle {
    /// Boxed, so checking one out, sending on it and putting it back move a pointer.
    #[allow(clippy::vec_box)]
    http1: Vec<Box<Http1Connection>>,
    http2: Option<Http2Conn>,
    /// Whether the idle-timeout sweeper task runs.
    sweeping: bool,
}

/// The connections of one worker to one endpoint.
pub struct EndpointPool {
    idle: Mutex<Idle>,
    /// Connections of this pool open or being opened.
    open: Arc<AtomicU32>,
    limits: ConnectionPoolSettings,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts an upstream request against `max_requests` until dropped (with the response body
/// when streamed downstream). Holds nothing when the cluster has no limit.
pub struct RequestSlot(Option<Arc<UpstreamStats>>);

impl RequestSlot {
    fn acquire(stats: &Arc<UpstreamStats>, limits: &ConnectionPoolSettings) -> Result<Self, UpstreamError> {
        if limits.max_requests == u32::MAX {
            return Ok(RequestSlot(None));
        }
        let before = stats.requests_open.fetch_add(1, Relaxed);
        if before >= u64::from(limits.max_requests) {
            stats.requests_open.fetch_sub(1, Relaxed);
            return Err(overflow(stats, Breaker::Requests));
        }
        Ok(RequestSlot(Some(stats.clone())))
    }
}

impl Drop for RequestSlot {
    fn drop(&mut self) {
        if let Some(stats) = &self.0 {
            stats.requests_open.fetch_sub(1, Relaxed);
        }
    }
}

/// A request counted as pending (waiting for a connection) while alive.
struct Pending<'a>(&'a UpstreamStats);

impl<'a> Pending<'a> {
    fn enter(stats: &'a UpstreamStats, limits: &ConnectionPoolSettings) -> Result<Self, UpstreamError> {
        let before = stats.requests_pending.fetch_add(1, SeqCst);
        if before >= u64::from(limits.max_pending_requests) {
            stats.requests_pending.fetch_sub(1, SeqCst);
            return Err(overflow(stats, Breaker::Pending));
        }
        Ok(Pending(stats))
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.requests_pending.fetch_sub(1, SeqCst);
    }
}

fn overflow(stats: &UpstreamStats, breaker: Breaker) -> UpstreamError {
    stats.overflows[breaker as usize].fetch_add(1, Relaxed);
    UpstreamError::Overflow(breaker)
}

/// Wakes requests waiting for a connection, if any.
pub(crate) fn connection_freed(stats: &UpstreamStats) {
    if stats.requests_pending.load(SeqCst) > 0 {
        stats.connection_freed.notify_waiters();
    }
}

/// Where an HTTP/1.1 connection goes back to once its response has been read whole.
pub struct ReturnTo {
    pool: Arc<EndpointPool>,
    stats: Arc<UpstreamStats>,
}

impl ReturnTo {
    pub fn put_back(self, conn: Box<Http1Connection>) {
        self.pool.put_back(conn, &self.stats);
    }
}

impl EndpointPool {
    pub fn new(limits: ConnectionPoolSettings) -> Self {
        EndpointPool {
            idle: Mutex::default(),
            open: Arc::default(),
            limits,
        }
    }

    /// Whether a connection has served its `maxRequestsPerConnection` or outlived
    /// `maxConnectionDuration`; the clock is read only when the latter is set.
    fn expired(&self, opened: Instant, requests: u32) -> bool {
        let max = self.limits.max_requests_per_connection;
        (max != 0 && requests >= max)
            || self
                .limits
                .max_connection_duration
                .is_some_and(|d| opened.elapsed() >= d)
    }

    /// Pools an HTTP/1.1 connection whose response was read whole, unless it has served its
    /// `maxRequestsPerConnection` or outlived `maxConnectionDuration` (then it closes).
    fn put_back(self: &Arc<Self>, mut conn: Box<Http1Connection>, stats: &UpstreamStats) {
        let now = Instant::now();
        if self.expired(conn.opened, conn.requests) {
            return;
        }
        conn.idle_since = now;
        let mut idle = locked(&self.idle);
        if idle.http1.len() >= MAX_IDLE_PER_ENDPOINT {
            return;
        }
        idle.http1.push(conn);
        self.start_sweeper(&mut idle);
        drop(idle);
        connection_freed(stats);
    }

    /// Starts the task closing connections idle for `idleTimeout`, unless it runs already. It
    /// ends when the pool has nothing idle left (or is dropped).
    fn start_sweeper(self: &Arc<Self>, idle: &mut Idle) {
        if idle.sweeping {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        idle.sweeping = true;
        let pool: Weak<Self> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                let Some(p) = pool.upgrade() else { return };
                let timeout = p.limits.idle_timeout;
                let next =
                    {
                        let mut idle = locked(&p.idle);
                        let now = Instant::now();
                        idle.http1
                            .retain_mut(|c| now.saturating_duration_since(c.idle_since) < timeout && !c.is_closed());
                        if idle.http2.as_ref().is_some_and(|c| {
                            now.saturating_duration_since(c.last_used) >= timeout || c.sender.is_closed()
                        }) {
                            // Streams still open keep the connection until they end.
                            idle.http2 = None;
                        }
                        let oldest = idle
                            .http1
                            .iter()
                            .map(|c| c.idle_since)
                            .chain(idle.http2.as_ref().map(|c| c.last_used))
                            .min();
                        match oldest {
                            Some(t) => t + timeout,
                            None => {
                                idle.sweeping = false;
                                return;
                            }
                        }
                    };
                drop(p);
                tokio::time::sleep_until(next).await;
            }
        });
    }

    /// Reserves a new connection: under `max_connections`, or this pool has none at all.
    /// The caller counts a refusal once per request (Envoy's `upstream_cx_overflow`).
    fn reserve(&self, stats: &Arc<UpstreamStats>) -> Option<ConnectionSlot> {
        let before = stats.connections_reserved.fetch_add(1, SeqCst);
        if before >= u64::from(self.limits.max_connections) && self.open.load(SeqCst) > 0 {
            stats.connections_reserved.fetch_sub(1, SeqCst);
            return None;
        }
        Some(ConnectionSlot::new(stats.clone(), self.open.clone()))
    }

    /// Sends `req` over HTTP/1.1 on an idle connection, or a new one. A request that an idle
    /// connection could not even start sending (the upstream closed it meanwhile) is sent
    /// again on a fresh connection, as Envoy and hyper's pool do. Upgrade requests go over a
    /// connection of their own, which the tunnel keeps.
    pub async fn send_http1(
        self: &Arc<Self>,
        address: &str,
        stats: &Arc<UpstreamStats>,
        parts: &mut http::request::Parts,
        mut body: UpstreamBody,
        tls: Option<&TlsTarget>,
    ) -> Result<(Response<UpstreamResponseBody>, RequestSlot), UpstreamError> {
        if parts.headers.contains_key(http::header::UPGRADE) {
            let mut req = Request::new(body);
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = parts.uri.clone();
            *req.headers_mut() = parts.headers.clone();
            *req.extensions_mut() = std::mem::take(&mut parts.extensions);
            return Box::pin(self.send_upgrade(address, stats, req, tls)).await;
        }
        let (head, framing) = http1::encode_head(parts, &body, address);
        let mut pending: Option<Pending<'_>> = None;
        let mut fresh_only = false;
        loop {
            let Some(conn) = self.checkout(address, stats, &mut pending, fresh_only, tls).await? else {
                continue;
            };
            let slot = match RequestSlot::acquire(stats, &self.limits) {
                Ok(s) => s,
                Err(e) => {
                    self.put_back(conn, stats);
                    return Err(e);
                }
            };
            let home = ReturnTo {
                pool: self.clone(),
                stats: stats.clone(),
            };
            match http1::exchange(conn, &head, framing, body, &parts.method, home).await {
                Ok(resp) => return Ok((resp, slot)),
                Err(ExchangeError::Stale(unsent)) => {
                    body = unsent;
                    fresh_only = true;
                }
                Err(ExchangeError::Failed(e)) => return Err(UpstreamError::Reset(e)),
            }
        }
    }

    /// An idle connection that still looks open, or a new one; `None` to look again (a
    /// connection was freed, or the idle one found was closed or worn out).
    async fn checkout<'a>(
        &self,
        address: &str,
        stats: &'a Arc<UpstreamStats>,
        pending: &mut Option<Pending<'a>>,
        fresh_only: bool,
        tls: Option<&TlsTarget>,
    ) -> Result<Option<Box<Http1Connection>>, UpstreamError> {
        let freed = stats.connection_freed.notified();
        tokio::pin!(freed);
        if pending.is_some() {
            // Registered before looking, so a connection freed meanwhile is not missed.
            freed.as_mut().enable();
        }
        let idle = if fresh_only {
            None
        } else {
            let mut idle = locked(&self.idle);
            match tls {
                None => idle.http1.pop(),
                // TLS connections serve one server name each: the newest one for this name.
                Some(t) => idle
                    .http1
                    .iter()
                    .rposition(|c| c.server_name.as_ref() == Some(&t.server_name))
                    .map(|i| idle.http1.remove(i)),
            }
        };
        if let Some(mut c) = idle {
            if c.is_closed() || self.expired(c.opened, c.requests) {
                return Ok(None);
            }
            *pending = None;
            c.requests += 1;
            return Ok(Some(c));
        }
        match self.reserve(stats) {
            Some(slot) => {
                // As in Envoy, a request waiting for its connection is pending.
                let _connecting = match pending.take() {
                    Some(p) => p,
                    None => Pending::enter(stats, &self.limits)?,
                };
                let io = Box::pin(connect(address, stats, &self.limits, slot, tls)).await?;
                let mut conn = Box::new(Http1Connection::new(io, tls.map(|t| t.server_name.clone())));
                conn.requests = 1;
                Ok(Some(conn))
            }
            None => {
                if pending.is_none() {
                    stats.overflows[Breaker::Connections as usize].fetch_add(1, Relaxed);
                    *pending = Some(Pending::enter(stats, &self.limits)?);
                    return Ok(None);
                }
                freed.await;
                Ok(None)
            }
        }
    }

    /// An upgrade request (WebSocket) on a new connection through hyper, which hands the
    /// connection to the tunnel after a `101`. It never returns to the pool.
    async fn send_upgrade(
        &self,
        address: &str,
        stats: &Arc<UpstreamStats>,
        req: Request<UpstreamBody>,
        tls: Option<&TlsTarget>,
    ) -> Result<(Response<UpstreamResponseBody>, RequestSlot), UpstreamError> {
        let slot = self.reserve(stats).ok_or_else(|| {
            stats.overflows[Breaker::Connections as usize].fetch_add(1, Relaxed);
            UpstreamError::Overflow(Breaker::Connections)
        })?;
        let io = connect(address, stats, &self.limits, slot, tls).await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        let slot = RequestSlot::acquire(stats, &self.limits)?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UpstreamError::Reset(e.to_string()))?;
        Ok((resp.map(UpstreamResponseBody::Hyper), slot))
    }

    /// The pooled HTTP/2 connection, if it may take another request; counts the request.
    fn http2_sender(
        self: &Arc<Self>,
        server_name: Option<&ServerName<'static>>,
    ) -> Option<http2::SendRequest<UpstreamBody>> {
        let mut idle = locked(&self.idle);
        let now = Instant::now();
        let conn = idle.http2.as_mut()?;
        if conn.server_name.as_ref() != server_name {
            // Another TLS server name: a connection of its own replaces this one in the pool
            // (streams open on this one finish on it).
            return None;
        }
        if conn.sender.is_closed() || self.expired(conn.opened, conn.requests) {
            idle.http2 = None;
            return None;
        }
        conn.requests += 1;
        conn.last_used = now;
        let sender = conn.sender.clone();
        if self.expired(conn.opened, conn.requests) {
            // Its last request: the next one opens a new connection; this one closes once
            // its streams end.
            idle.http2 = None;
        }
        Some(sender)
    }

    /// Sends `req` over the endpoint's multiplexed HTTP/2 connection, opening it if needed.
    pub async fn send_http2(
        self: &Arc<Self>,
        address: &str,
        stats: &Arc<UpstreamStats>,
        req: Request<UpstreamBody>,
        tls: Option<&TlsTarget>,
    ) -> Result<(Response<UpstreamResponseBody>, RequestSlot), UpstreamError> {
        let mut pending: Option<Pending<'_>> = None;
        let mut sender = loop {
            let freed = stats.connection_freed.notified();
            tokio::pin!(freed);
            if pending.is_some() {
                freed.as_mut().enable();
            }
            if let Some(s) = self.http2_sender(tls.map(|t| &t.server_name)) {
                break s;
            }
            let Some(slot) = self.reserve(stats) else {
                if pending.is_none() {
                    stats.overflows[Breaker::Connections as usize].fetch_add(1, Relaxed);
                    pending = Some(Pending::enter(stats, &self.limits)?);
                    continue;
                }
                freed.await;
                continue;
            };
            if pending.is_none() {
                pending = Some(Pending::enter(stats, &self.limits)?);
            }
            let io = connect(address, stats, &self.limits, slot, tls).await?;
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(Duration::from_secs(30))
                .handshake(TokioIo::new(io))
                .await
                .map_err(|e| UpstreamError::Connect(e.to_string()))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let now = Instant::now();
            let mut idle = locked(&self.idle);
            let conn = Http2Conn {
                sender: sender.clone(),
                server_name: tls.map(|t| t.server_name.clone()),
                opened: now,
                requests: 1,
                last_used: now,
            };
            if !self.expired(conn.opened, conn.requests) {
                idle.http2 = Some(conn);
                self.start_sweeper(&mut idle);
            }
            break sender;
        };
        drop(pending);
        let slot = RequestSlot::acquire(stats, &self.limits)?;
        sender.ready().await.map_err(UpstreamError::from_http2)?;
        let resp = sender.send_request(req).await.map_err(UpstreamError::from_http2)?;
        Ok((resp.map(UpstreamResponseBody::Hyper), slot))
    }
}

/// Opens a connection to `address`: TCP, then the TLS handshake when `tls` is given. As in
/// Envoy, `connectTimeout` covers both, and a failed handshake is a connection failure.
async fn connect(
    address: &str,
    stats: &Arc<UpstreamStats>,
    limits: &ConnectionPoolSettings,
    slot: ConnectionSlot,
    tls: Option<&TlsTarget>,
) -> Result<CountedStream, UpstreamError> {
    let opening = async {
        let stream = TcpStream::connect(address).await.map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        if let Some(k) = &limits.tcp_keepalive {
            set_keepalive(&stream, k);
        }
        match tls {
            None => Ok(Transport::Plain(stream)),
            Some(t) => tokio_rustls::TlsConnector::from(t.config.clone())
                .connect(t.server_name.clone(), stream)
                .await
                .map(|s| Transport::Tls(Box::new(s)))
                .map_err(|e| format!("TLS handshake: {e}")),
        }
    };
    let failure = match tokio::time::timeout(limits.connect_timeout, opening).await {
        Ok(Ok(io)) => return Ok(CountedStream::new(io, slot)),
        Ok(Err(e)) => UpstreamError::Connect(e),
        Err(_) => UpstreamError::ConnectTimeout,
    };
    stats.connect_failures.fetch_add(1, Relaxed);
    Err(failure)
}

/// `SO_KEEPALIVE` with Istio's `tcpKeepalive` (unset fields keep the system's defaults).
fn set_keepalive(stream: &TcpStream, k: &meshgate_model::snapshot::TcpKeepalive) {
    let mut keepalive = socket2::TcpKeepalive::new();
    if let Some(t) = k.time {
        keepalive = keepalive.with_time(t.max(Duration::from_secs(1)));
    }
    #[cfg(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "freebsd",
        target_os = "windows"
    ))]
    if let Some(i) = k.interval {
        keepalive = keepalive.with_interval(i.max(Duration::from_secs(1)));
    }
    #[cfg(any(target_os = "linux", target_os = "macos", target_os = "freebsd"))]
    if let Some(p) = k.probes {
        keepalive = keepalive.with_retries(p);
    }
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}
