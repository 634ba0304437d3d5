//! Listeners on the worker threads: binding, accepting, TLS, and serving HTTP/1.1 and HTTP/2.
//!
//! Every worker binds each listener itself with `SO_REUSEPORT`, so the kernel spreads new
//! connections across workers and no accept lock is shared. On a config change each worker
//! reconciles its sockets: new listeners are bound, removed ones stop accepting, and the
//! connections already accepted keep being served.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

use crate::body::DownstreamBody;
use crate::downstream_socket::DownstreamSocket;
use crate::http1;
use crate::http2;
use crate::service::{self, Connection};
use crate::stats::ListenerStats;
use crate::worker;
use crate::{Http1Server, Http2Server, MAX_REQUEST_HEADERS_BYTES, Shared};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Retry period for listeners that failed to bind (e.g. the port was busy).
const BIND_RETRY: Duration = Duration::from_secs(1);

/// Starts `shared.options.workers` worker threads.
pub fn spawn_workers(shared: &Arc<Shared>) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
    (0..shared.options.workers)
        .map(|id| {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("meshgate-worker-{id}"))
                .spawn(move || run_worker(shared, id))
        })
        .collect()
}

fn run_worker(shared: Arc<Shared>, id: usize) {
    worker::set_current(id);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(worker = id, error = %e, "cannot start worker runtime");
            return;
        }
    };
    runtime.block_on(reconcile_forever(shared, id));
}

async fn reconcile_forever(shared: Arc<Shared>, id: usize) {
    let mut versions = shared.version.subscribe();
    let mut bound: HashMap<SocketAddr, AbortHandle> = HashMap::new();
    loop {
        let active = shared.active.load_full();
        bound.retain(|addr, accept| {
            let keep = active.listener_by_addr.contains_key(addr);
            if !keep {
                accept.abort();
            }
            keep
        });
        let mut all_bound = true;
        for &addr in active.listener_by_addr.keys() {
            if bound.contains_key(&addr) {
                continue;
            }
            match bind(addr) {
                Ok(listener) => {
                    let task = tokio::spawn(accept_loop(listener, addr, shared.clone()));
                    bound.insert(addr, task.abort_handle());
                }
                Err(e) => {
                    all_bound = false;
                    if id == 0 {
                        tracing::error!(%addr, error = %e, "cannot bind listener; retrying");
                    }
                }
            }
        }
        shared.ready[id].store(if all_bound { active.version } else { 0 }, Relaxed);
        drop(active);
        if all_bound {
            if versions.changed().await.is_err() {
                return;
            }
        } else {
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(BIND_RETRY) => {}
            }
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, addr: SocketAddr, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, remote, addr, shared.clone()));
            }
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                tracing::warn!(%addr, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Decrements the active-connection gauge however the connection ends.
struct OpenConnection(Arc<ListenerStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Relaxed);
    }
}

async fn serve(stream: TcpStream, remote: SocketAddr, listener: SocketAddr, shared: Arc<Shared>) {
    let (tls, stats) = {
        let active = shared.active.load();
        let Some(&i) = active.listener_by_addr.get(&listener) else {
            return;
        };
        (active.listeners[i].tls.clone(), active.listeners[i].stats.clone())
    };
    stats.connections_opened.fetch_add(1, Relaxed);
    stats.connections_active.fetch_add(1, Relaxed);
    let _open = OpenConnection(stats);

    let edge = shared.options.compile.mesh_port != Some(listener.port());
    let connection = |sni: Option<Box<str>>, client_cert: Option<http::HeaderValue>| {
        Arc::new(Connection {
            shared: shared.clone(),
            listener,
            remote,
            remote_ip: http::HeaderValue::from_str(&remote.ip().to_canonical().to_string())
                .unwrap_or_else(|_| http::HeaderValue::from_static("unknown")),
            tls: tls.is_some(),
            sni,
            edge,
            client_cert,
        })
    };
    let own_http2 = shared.options.http2_server == Http2Server::Meshgate;
    let own_http1 = shared.options.http1_server == Http1Server::Meshgate;
    let result = match &tls {
        None => {
            let conn = connection(None, None);
            // A client that sends nothing is held no longer than a slow HTTP/1.1 head would be.
            let sniff = starts_with_http2_preface(&stream);
            let http2 = match shared.options.request_headers_timeout {
                Some(limit) => tokio::time::timeout(limit, sniff).await.unwrap_or(None),
                None => sniff.await,
            };
            if own_http2 && http2 == Some(true) {
                return serve_http2(stream, conn, remote).await;
            }
            if own_http1 && http2 == Some(false) {
                return serve_own_http1(DownstreamSocket::new(stream), conn, remote).await;
            }
            let service =
                service_fn(move |req: Request<Incoming>| service::handle(req.map(DownstreamBody::Hyper), conn.clone()));
            let io = TokioIo::new(DownstreamSocket::new(stream));
            if http2 == Some(false) {
                // Awaited here rather than through `serve_http1`: one future layer less on
                // every poll of the busiest path.
                shared
                    .http1
                    .serve_connection(io, service)
                    .with_upgrades()
                    .await
                    .map_err(Into::into)
            } else {
                // HTTP/2 for hyper's codec, or not yet told: hyper-util looks again.
                shared.http.serve_connection_with_upgrades(io, service).await
            }
        }
        Some(config) => {
            let accept = tokio_rustls::TlsAcceptor::from(config.clone()).accept(DownstreamSocket::new(stream));
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept).await {
                Ok(Ok(mut tls_stream)) => {
                    let http2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                    let sni = tls_stream
                        .get_ref()
                        .1
                        .server_name()
                        .map(|n| n.to_ascii_lowercase().into());
                    let client_cert = tls_stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .and_then(|leaf| service::client_cert_header(leaf.as_ref()));
                    let conn = connection(sni, client_cert);
                    if own_http2 && http2 {
                        return serve_http2(tls_stream, conn, remote).await;
                    }
                    let http1 = tls_stream.get_ref().1.alpn_protocol() == Some(b"http/1.1");
                    tls_stream.get_mut().0.set_http2(http2);
                    if own_http1 && http1 {
                        return serve_own_http1(tls_stream, conn, remote).await;
                    }
                    let service = service_fn(move |req: Request<Incoming>| {
                        service::handle(req.map(DownstreamBody::Hyper), conn.clone())
                    });
                    let io = TokioIo::new(tls_stream);
                    if http1 {
                        serve_http1(&shared, io, service).await
                    } else {
                        shared.http.serve_connection_with_upgrades(io, service).await
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Serves a connection known to speak HTTP/1.1 with hyper's HTTP/1.1 codec directly, without
/// hyper-util's protocol detection (and the re-reading of the bytes it looked at).
async fn serve_http1<IO, S>(shared: &Shared, io: IO, service: S) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    shared
        .http1
        .serve_connection(io, service)
        .with_upgrades()
        .await
        .map_err(Into::into)
}

/// Serves a connection known to speak HTTP/1.1 with meshgate's codec; a request that
/// switches protocols hands the rest of the connection to hyper's.
async fn serve_own_http1<IO>(io: IO, conn: Arc<Connection>, remote: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shared = conn.shared.clone();
    let settings = http1::ServerSettings {
        max_head_bytes: MAX_REQUEST_HEADERS_BYTES,
        head_timeout: shared.options.request_headers_timeout,
    };
    let handler_conn = conn.clone();
    let served = http1::serve(io, settings, &shared.draining, move |head, body| {
        service::handle(head.map(|()| DownstreamBody::Http1(body)), handler_conn.clone())
    })
    .await;
    let result = match served {
        Ok(http1::Ended::Closed) => Ok(()),
        Ok(http1::Ended::Upgrade(io)) => {
            let service =
                service_fn(move |req: Request<Incoming>| service::handle(req.map(DownstreamBody::Hyper), conn.clone()));
            serve_http1(&shared, TokioIo::new(io), service).await
        }
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Whether a plain-text connection opens with the HTTP/2 preface (h2c with prior knowledge),
/// looked at without consuming it: `None` when it cannot be told yet (the connection closed,
/// or the client sent under 4 octets for a while). Only `PRI ` is needed to tell it from
/// HTTP/1.1 methods.
async fn starts_with_http2_preface(stream: &TcpStream) -> Option<bool> {
    const DECISIVE: usize = 4;
    let mut first = [0u8; DECISIVE];
    // A first segment shorter than 4 octets is rare: look again shortly, a bounded number of times.
    for _ in 0..50 {
        let n = match stream.peek(&mut first).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => n,
        };
        if first[..n] != http2::frame::PREFACE[..n] {
            return Some(false);
        }
        if n == DECISIVE {
            return Some(true);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// Serves a connection with meshgate's HTTP/2 codec.
async fn serve_http2<IO>(io: IO, conn: Arc<Connection>, remote: SocketAddr)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let settings = http2::ServerSettings {
        max_header_list_size: MAX_REQUEST_HEADERS_BYTES as u32,
        idle_timeout: conn.shared.options.idle_timeout,
        // The preface is the HTTP/2 client's first request head: the same limit applies.
        preface_timeout: conn.shared.options.request_headers_timeout,
        ..http2::ServerSettings::default()
    };
    let mut drain = conn.shared.drain_signal.subscribe();
    let draining = Box::pin(async move {
        let _ = drain.wait_for(|draining| *draining).await;
    });
    let result = http2::serve(io, settings, draining, move |req| {
        Box::pin(service::handle(req.map(DownstreamBody::Http2), conn.clone()))
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "HTTP/2 connection ended with an error");
    }
}
