//! meshgate's data plane.
//!
//! A request arrives on a [`listener`] owned by one worker thread, is routed by the compiled
//! snapshot it started with ([`active`]), and is answered locally or forwarded through an
//! upstream cluster's pool ([`upstream`]) by [`service`]. Configuration is swapped whole by
//! [`reload`]; [`admin`] reports readiness, config and [`stats`].

pub mod access_log;
pub mod active;
pub mod admin;
pub mod body;
mod coarse_timer;
mod config_watch;
pub mod cors;
mod downstream_socket;
pub mod http1;
mod http1_framing;
pub mod http2;
pub mod kong_admin;
pub mod kong_store;
pub mod listener;
pub mod plugins;
pub mod redis;
pub mod reload;
pub mod resident;
mod response_date;
pub mod response_flags;
pub mod service;
pub mod stats;
pub mod tls;
pub mod upstream;
pub mod uri_decoding;
pub mod uuid;
pub mod worker;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use meshgate_model::CompileOptions;
use tokio::sync::watch;

use active::Active;

/// Largest request header block accepted (Envoy's default `max_request_headers_kb` is 60).
pub const MAX_REQUEST_HEADERS_BYTES: usize = 60 * 1024;

/// How the proxy was started.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// Config files or folders, reloaded on change.
    pub config_paths: Vec<PathBuf>,
    /// Address listeners bind to unless their config names one.
    pub bind_address: IpAddr,
    pub admin_addr: SocketAddr,
    pub workers: usize,
    pub compile: CompileOptions,
    /// On SIGTERM/SIGINT, how long requests in flight may take to finish before exit.
    pub drain_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request head, counted from when the
    /// connection starts waiting for it (so it also bounds idle keep-alive time); `None`: no
    /// limit. Checked every half second.
    pub request_headers_timeout: Option<Duration>,
    /// Envoy's `idle_timeout` for HTTP/2 connections: one with no open stream for this long
    /// is sent GOAWAY and closed; `None`: no limit. (An idle HTTP/1.1 connection is bounded
    /// by `request_headers_timeout`.)
    pub idle_timeout: Option<Duration>,
    /// Where and how to write access logs; `None`: no access log.
    pub access_log: Option<access_log::AccessLogOptions>,
    /// The Kong-compatible Admin API, when enabled; its stored state is compiled with the
    /// config files.
    pub kong_admin: Option<kong_admin::KongAdminOptions>,
    /// Which implementation serves HTTP/2 to clients.
    pub http2_server: Http2Server,
    /// Which implementation serves HTTP/1.1 to clients.
    pub http1_server: Http1Server,
}

/// The implementation of downstream HTTP/1.1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Http1Server {
    /// meshgate's own codec (`http1`); upgrade requests are handed to hyper.
    #[default]
    Meshgate,
    /// hyper's HTTP/1.1 server, what meshgate used before its own codec.
    Hyper,
}

/// The implementation of downstream HTTP/2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Http2Server {
    /// meshgate's own codec (`http2`).
    #[default]
    Meshgate,
    /// hyper with the `h2` crate, what meshgate used before its own codec.
    Hyper,
}

/// State shared by the workers, the admin listener and the reloader.
pub struct Shared {
    pub options: ProxyOptions,
    /// The configuration being served; requests take an `Arc` to it when they start.
    pub active: ArcSwap<Active>,
    /// Version of `active`, so workers learn when to rebind listeners.
    pub version: watch::Sender<u64>,
    pub stats: stats::Stats,
    /// Per worker: the config version whose listeners are all bound (0 = not all bound).
    pub ready: Box<[AtomicU64]>,
    /// Connection settings for downstream HTTP/1.1 and HTTP/2 when the protocol is not known
    /// before the first read (TLS without ALPN, a client slow to send its first octets) or
    /// HTTP/2 goes to hyper (`--http2-server hyper`).
    pub http: auto::Builder<TokioExecutor>,
    /// The same HTTP/1.1 settings, for connections known to be HTTP/1.1 (from their first
    /// octets, or ALPN `http/1.1`): they skip the `auto` builder's protocol detection.
    pub http1: hyper::server::conn::http1::Builder,
    /// Set on SIGTERM: `/ready` fails while requests in flight finish.
    pub draining: std::sync::atomic::AtomicBool,
    /// Becomes `true` on SIGTERM, so HTTP/2 connections send GOAWAY and take no new streams.
    pub drain_signal: watch::Sender<bool>,
    pub access_log: Option<access_log::AccessLog>,
    /// Kong plugin state kept across requests and reloads (rate-limit counters).
    pub plugin_state: plugins::PluginState,
    /// The Admin API's stored decK document, compiled with the config files on each reload.
    pub admin_api_documents: ArcSwap<Vec<meshgate_model::source::Document>>,
}

impl Shared {
    /// Fails when the access log cannot be opened.
    pub fn new(options: ProxyOptions) -> Result<Self, String> {
        let access_log = match &options.access_log {
            Some(log) => Some(
                access_log::AccessLog::open(log)
                    .map_err(|e| format!("cannot open access log {}: {e}", log.path.display()))?,
            ),
            None => None,
        };
        let mut http = auto::Builder::new(TokioExecutor::new());
        let mut http1 = hyper::server::conn::http1::Builder::new();
        let max_buf_size = MAX_REQUEST_HEADERS_BYTES + 4 * 1024;
        http.http1().max_buf_size(max_buf_size);
        http1.max_buf_size(max_buf_size);
        // Slow-header (slowloris) protection. Envoy leaves `request_headers_timeout` unset, but
        // an edge proxy should not hold connections for clients that never finish their
        // headers. hyper arms one timer per request for it: a coarse one (see coarse_timer).
        if let Some(timeout) = options.request_headers_timeout {
            http.http1()
                .timer(coarse_timer::CoarseTimer)
                .header_read_timeout(timeout);
            http1.timer(coarse_timer::CoarseTimer).header_read_timeout(timeout);
        }
        http.http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_REQUEST_HEADERS_BYTES as u32);
        let ready = (0..options.workers).map(|_| AtomicU64::new(0)).collect();
        Ok(Shared {
            options,
            active: ArcSwap::from_pointee(Active::empty()),
            version: watch::channel(0).0,
            stats: stats::Stats::default(),
            ready,
            http,
            http1,
            draining: std::sync::atomic::AtomicBool::new(false),
            drain_signal: watch::channel(false).0,
            access_log,
            plugin_state: plugins::PluginState::default(),
            admin_api_documents: ArcSwap::from_pointee(Vec::new()),
        })
    }

    /// True once a config is active and every worker has bound all of its listeners.
    pub fn is_ready(&self) -> bool {
        let version = self.active.load().version;
        !self.draining.load(Relaxed) && version > 0 && self.ready.iter().all(|r| r.load(Relaxed) == version)
    }
}

/// Runs the proxy until SIGTERM or SIGINT. Fails if the initial config does not load or the
/// admin port cannot be bound.
pub fn run(options: ProxyOptions) -> Result<(), String> {
    if let Some(admin) = &options.kong_admin
        && !admin.addr.ip().is_loopback()
        && admin.token.is_none()
    {
        return Err(format!(
            "the Admin API on {} is reachable beyond loopback: set --admin-api-token",
            admin.addr
        ));
    }
    let shared = Arc::new(Shared::new(options)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start runtime: {e}"))?;
    runtime.block_on(async {
        let kong_admin = match &shared.options.kong_admin {
            Some(options) => {
                let admin = kong_admin::KongAdmin::open(options.clone()).await?;
                admin.load_into(&shared).await?;
                Some(Arc::new(admin))
            }
            None => None,
        };
        reload::reload(&shared).map_err(|e| format!("initial configuration: {e}"))?;
        let admin = admin::bind(shared.options.admin_addr)
            .await
            .map_err(|e| format!("cannot bind admin listener {}: {e}", shared.options.admin_addr))?;
        tracing::info!(addr = %shared.options.admin_addr, "admin listener ready");
        listener::spawn_workers(&shared).map_err(|e| format!("cannot start workers: {e}"))?;
        tokio::spawn(admin::serve(admin, shared.clone()));
        if let Some(kong) = kong_admin {
            let addr = kong.options().addr;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot bind the Admin API on {addr}: {e}"))?;
            tracing::info!(%addr, database = %kong.options().database, "Kong Admin API ready");
            tokio::spawn(kong_admin::serve(listener, shared.clone(), kong.clone()));
            tokio::spawn(kong_admin::watch(shared.clone(), kong));
        }
        tokio::spawn(reload::watch(shared.clone()));
        tokio::spawn(upstream::health::run(shared.clone()));
        tokio::spawn(release_start_up_code(shared.clone()));
        wait_for_shutdown().await;
        drain(&shared).await;
        Ok(())
    })
}

/// Once every listener serves, start-up's code need not stay resident (`resident`).
async fn release_start_up_code(shared: Arc<Shared>) {
    for _ in 0..600 {
        if shared.is_ready() {
            resident::release_code_pages();
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops reporting ready (so load balancers move traffic away) and waits for the requests in
/// flight to be answered, at most `drain_timeout`, before the process exits.
async fn drain(shared: &Shared) {
    shared.draining.store(true, Relaxed);
    shared.drain_signal.send_replace(true);
    let deadline = tokio::time::Instant::now() + shared.options.drain_timeout;
    let in_flight = || shared.stats.requests_in_flight.load(Relaxed);
    tracing::info!(in_flight = in_flight(), "shutting down: draining requests in flight");
    while in_flight() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(unfinished = in_flight(), "shut down");
}

async fn wait_for_shutdown() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
